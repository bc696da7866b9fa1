//! xAI Batch API in file mode (PROVIDERS.md section 3): the OpenAI-shaped
//! JSONL is uploaded, the batch created with the local batch id as its
//! `name`, and results read page by page.
//!
//! xAI has no status enum: the state is derived from the counters and the
//! cancel fields as PROVIDERS.md 3.4 recommends. It has no deadline of its
//! own worth trusting either; batchline's `batch.deadline` cancels.

use std::io::Write;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{
    batch_file_form, parse_time, BatchError, BatchState, CreateError, HttpClient, LineOutcome,
    LineResult, Provider, ProviderBatch, ProviderError, RequestCounts,
};
use crate::config::ProviderKind;
use crate::model::{ErrorInfo, Status};
use crate::packer::SealedBatch;

pub struct Xai {
    http: HttpClient,
}

impl Xai {
    pub fn new(http: HttpClient) -> Self {
        Xai { http }
    }

    fn authed(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let req = match &self.http.key {
            Some(key) => req.bearer_auth(key.expose()),
            None => req,
        };
        self.http.with_headers(req)
    }

    /// Sends a call, reporting xAI's HTTP 400 "Incorrect API key" as the
    /// authentication failure it is.
    async fn send(
        &self,
        op: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ProviderError> {
        self.http.send(op, req).await.map_err(as_auth_failure)
    }

    async fn get_json<T: for<'de> Deserialize<'de>>(
        &self,
        op: &str,
        path: &str,
    ) -> Result<T, ProviderError> {
        self.http
            .retrying(op, || async {
                let req = self
                    .authed(self.http.client.get(self.http.url(path)))
                    .timeout(self.http.request_timeout);
                let resp = self.send(op, req).await?;
                let bytes = resp
                    .bytes()
                    .await
                    .map_err(|e| self.http.transport_error(op, e))?;
                serde_json::from_slice(&bytes)
                    .map_err(|e| self.http.decode_error(op, e.to_string()))
            })
            .await
    }
}

/// xAI answers a wrong key with HTTP 400 (PROVIDERS.md 3.8).
fn as_auth_failure(e: ProviderError) -> ProviderError {
    match e {
        ProviderError::Http {
            provider,
            op,
            status: 400,
            message,
            retry_after,
            ..
        } if message.contains("Incorrect API key")
            || message.contains("API key") && message.contains("invalid") =>
        {
            ProviderError::Http {
                provider,
                op,
                status: 401,
                kind: Some("authentication_error".into()),
                message,
                retry_after,
            }
        }
        other => other,
    }
}

#[derive(Debug, Deserialize)]
struct FileObject {
    id: String,
}

#[derive(Debug, Deserialize)]
struct BatchObject {
    batch_id: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    create_time: Option<String>,
    #[serde(default)]
    expire_time: Option<String>,
    #[serde(default)]
    cancel_time: Option<String>,
    #[serde(default)]
    cancel_by_xai_message: Option<String>,
    #[serde(default)]
    state: Option<Counters>,
    #[serde(default)]
    input_file_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Counters {
    #[serde(default)]
    num_requests: u64,
    #[serde(default)]
    num_pending: u64,
    #[serde(default)]
    num_success: u64,
    #[serde(default)]
    num_error: u64,
    #[serde(default)]
    num_cancelled: u64,
}

#[derive(Debug, Deserialize)]
struct BatchList {
    #[serde(default)]
    batches: Vec<BatchObject>,
    #[serde(default)]
    pagination_token: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ResultsPage {
    #[serde(default)]
    results: Vec<Box<RawValue>>,
    #[serde(default)]
    pagination_token: Option<String>,
}

impl BatchObject {
    /// PROVIDERS.md 3.4, checked top-down.
    fn normalise(self, now: i64) -> ProviderBatch {
        let c = self.state.unwrap_or_default();
        let xai_message = self.cancel_by_xai_message.filter(|m| !m.is_empty());
        let expired = self
            .expire_time
            .as_deref()
            .and_then(parse_time)
            .is_some_and(|t| t <= now);
        let state = if xai_message.is_some() {
            BatchState::Failed
        } else if self.cancel_time.is_some() {
            if c.num_pending == 0 {
                BatchState::Cancelled
            } else {
                BatchState::Cancelling
            }
        } else if c.num_requests == 0 {
            BatchState::Validating
        } else if c.num_pending > 0 {
            if expired {
                BatchState::Expired
            } else {
                BatchState::InProgress
            }
        } else {
            BatchState::Completed
        };
        let errors = xai_message
            .map(|m| {
                // "JSONL file validation failed: line 2: …" names its line.
                let line = m
                    .split("line ")
                    .nth(1)
                    .and_then(|rest| rest.split(|ch: char| !ch.is_ascii_digit()).next())
                    .and_then(|n| n.parse().ok());
                vec![BatchError {
                    code: "cancelled_by_xai".into(),
                    message: m,
                    line,
                }]
            })
            .unwrap_or_default();
        ProviderBatch {
            id: self.batch_id,
            state,
            counts: RequestCounts {
                total: c.num_requests,
                completed: c.num_success,
                failed: c.num_error + c.num_cancelled,
            },
            input_file_id: self.input_file_id,
            output_file_id: None,
            error_file_id: None,
            errors,
            tag: self.name,
            created_at: self.create_time.as_deref().and_then(parse_time),
            // xAI reports no end time; a cancel's time is the only one.
            // Never the clock: a result published again after a crash must
            // be identical.
            ended_at: self
                .cancel_time
                .as_deref()
                .and_then(parse_time)
                .filter(|_| state.is_terminal()),
        }
    }
}

#[derive(Debug, Deserialize)]
struct ResultRow {
    batch_request_id: String,
    #[serde(default)]
    batch_result: Option<BatchResult>,
    #[serde(default)]
    error_message: Option<String>,
}

#[derive(Debug, Deserialize)]
struct BatchResult {
    /// One key named after the endpoint; its body is kept raw, never parsed
    /// into a tree.
    #[serde(default)]
    response: Option<std::collections::BTreeMap<String, Box<RawValue>>>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

/// Maps one results row (PROVIDERS.md 3.6). Success sits under
/// `batch_result.response.<endpoint key>`; a failure is a bare string,
/// `{code, message}` or a top-level `error_message`, kept whole.
pub fn parse_result_row(line: &str) -> Result<LineOutcome, String> {
    let row: ResultRow = serde_json::from_str(line).map_err(|e| format!("bad result row: {e}"))?;
    let result = row.batch_result.unwrap_or(BatchResult {
        response: None,
        error: None,
    });
    let (code, message) = match &result.error {
        None | Some(serde_json::Value::Null) => (0, None),
        Some(serde_json::Value::String(s)) if s.is_empty() => (0, None),
        Some(serde_json::Value::String(s)) => (2, Some(s.clone())),
        Some(serde_json::Value::Object(o)) => (
            o.get("code").and_then(|c| c.as_i64()).unwrap_or(2),
            o.get("message").and_then(|m| m.as_str()).map(str::to_owned),
        ),
        Some(other) => (2, Some(other.to_string())),
    };
    let body = result
        .response
        .and_then(|r| r.into_values().next())
        .filter(|b| b.get() != "null");
    let outcome = match (body, code, row.error_message.filter(|m| !m.is_empty())) {
        (Some(body), 0, None) => LineResult::Succeeded { body },
        (_, code, top) => {
            let message = message
                .or(top)
                .unwrap_or_else(|| "request failed without a message".into());
            // gRPC code 1 is CANCELLED.
            let cancelled = code == 1 || message.eq_ignore_ascii_case("batch cancelled");
            LineResult::Failed {
                status: if cancelled {
                    Status::Canceled
                } else {
                    Status::Errored
                },
                error: ErrorInfo::new(
                    if cancelled {
                        "batch_cancelled".to_owned()
                    } else {
                        grpc_code_name(code)
                    },
                    message,
                ),
                body: result
                    .error
                    .as_ref()
                    .and_then(|e| serde_json::value::to_raw_value(e).ok()),
                status_code: None,
            }
        }
    };
    Ok(LineOutcome {
        custom_id: row.batch_request_id,
        result: outcome,
    })
}

fn grpc_code_name(code: i64) -> String {
    match code {
        1 => "cancelled",
        3 => "invalid_argument",
        4 => "deadline_exceeded",
        5 => "not_found",
        7 => "permission_denied",
        8 => "resource_exhausted",
        9 => "failed_precondition",
        13 => "internal",
        14 => "unavailable",
        _ => "request_error",
    }
    .to_owned()
}

#[async_trait]
impl Provider for Xai {
    fn name(&self) -> &str {
        &self.http.provider
    }

    fn kind(&self) -> ProviderKind {
        ProviderKind::Xai
    }

    async fn upload(&self, batch: &SealedBatch) -> Result<Option<String>, ProviderError> {
        let op = format!("uploading batch file for batch {}", batch.id);
        let file: FileObject = self
            .http
            .retrying(&op, || async {
                let form = batch_file_form(&op, batch).await?;
                let req = self
                    .authed(self.http.client.post(self.http.url("/files")))
                    .multipart(form);
                let resp = self.send(&op, req).await?;
                resp.json::<FileObject>()
                    .await
                    .map_err(|e| self.http.decode_error(&op, e.to_string()))
            })
            .await?;
        Ok(Some(file.id))
    }

    async fn create(
        &self,
        batch: &SealedBatch,
        file_id: Option<&str>,
    ) -> Result<ProviderBatch, CreateError> {
        let op = format!("creating batch {}", batch.id);
        let file_id = file_id.ok_or_else(|| {
            CreateError::Refused(
                self.http
                    .decode_error(&op, "an xAI file-mode batch needs an uploaded file"),
            )
        })?;
        let req = self
            .authed(self.http.client.post(self.http.url("/batches")))
            .timeout(self.http.request_timeout)
            .json(&serde_json::json!({ "name": batch.id, "input_file_id": file_id }));
        let resp = self.send(&op, req).await.map_err(CreateError::classify)?;
        let object: BatchObject = resp
            .json()
            .await
            .map_err(|e| CreateError::Ambiguous(self.http.decode_error(&op, e.to_string())))?;
        Ok(object.normalise(chrono::Utc::now().timestamp()))
    }

    async fn status(&self, id: &str) -> Result<ProviderBatch, ProviderError> {
        let object: BatchObject = self
            .get_json(&format!("retrieving batch {id}"), &format!("/batches/{id}"))
            .await?;
        Ok(object.normalise(chrono::Utc::now().timestamp()))
    }

    async fn cancel(&self, id: &str) -> Result<ProviderBatch, ProviderError> {
        let op = format!("cancelling batch {id}");
        let object: BatchObject = self
            .http
            .retrying(&op, || async {
                let req = self
                    .authed(
                        self.http
                            .client
                            .post(self.http.url(&format!("/batches/{id}:cancel"))),
                    )
                    .timeout(self.http.request_timeout);
                let resp = self.send(&op, req).await?;
                resp.json()
                    .await
                    .map_err(|e| self.http.decode_error(&op, e.to_string()))
            })
            .await?;
        Ok(object.normalise(chrono::Utc::now().timestamp()))
    }

    async fn download_results(
        &self,
        batch: &ProviderBatch,
        dir: &Path,
        local_id: &str,
    ) -> Result<Vec<PathBuf>, ProviderError> {
        let path = dir.join(format!("{local_id}.results.jsonl"));
        let op = format!("downloading results of {}", batch.id);
        let io_err = |source| ProviderError::Io {
            op: op.clone(),
            path: path.clone(),
            source,
        };
        let mut out = std::io::BufWriter::new(std::fs::File::create(&path).map_err(io_err)?);
        let mut token: Option<String> = None;
        loop {
            let mut query = format!("/batches/{}/results?limit=1000", batch.id);
            if let Some(t) = &token {
                query.push_str(&format!("&pagination_token={t}"));
            }
            let page: ResultsPage = self.get_json(&op, &query).await?;
            for row in &page.results {
                out.write_all(row.get().as_bytes()).map_err(io_err)?;
                out.write_all(b"\n").map_err(io_err)?;
            }
            // The last page's token is null or "" (both seen).
            match page.pagination_token.filter(|t| !t.is_empty()) {
                Some(t) if !page.results.is_empty() => token = Some(t),
                _ => break,
            }
        }
        out.flush().map_err(io_err)?;
        Ok(vec![path])
    }

    fn parse_result_line(&self, line: &str) -> Result<LineOutcome, String> {
        parse_result_row(line)
    }

    async fn find_candidates(
        &self,
        batch: &SealedBatch,
        file_id: Option<&str>,
    ) -> Result<Vec<ProviderBatch>, ProviderError> {
        let mut token: Option<String> = None;
        for _ in 0..1000 {
            let mut path = "/batches?limit=100".to_owned();
            if let Some(t) = &token {
                path.push_str(&format!("&pagination_token={t}"));
            }
            let page: BatchList = self.get_json("listing batches", &path).await?;
            for b in page.batches {
                if b.name.as_deref() == Some(batch.id.as_str())
                    && (file_id.is_none() || b.input_file_id.as_deref() == file_id)
                {
                    return Ok(vec![b.normalise(chrono::Utc::now().timestamp())]);
                }
            }
            match page.pagination_token.filter(|t| !t.is_empty()) {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        Ok(Vec::new())
    }

    async fn delete_file(&self, file_id: &str) -> Result<(), ProviderError> {
        let op = format!("deleting file {file_id}");
        let result = self
            .http
            .retrying(&op, || async {
                let req = self
                    .authed(
                        self.http
                            .client
                            .delete(self.http.url(&format!("/files/{file_id}"))),
                    )
                    .timeout(self.http.request_timeout);
                self.send(&op, req).await.map(drop)
            })
            .await;
        match result {
            Err(e) if e.status() == Some(404) => Ok(()),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Bodies from https://docs.x.ai/developers/advanced-api-usage/batch-api and
    // https://docs.x.ai/developers/rest-api-reference/inference/batches (PROVIDERS.md 3.3, 3.6).

    const NOW: i64 = 1_788_000_000; // 2026-08-29

    fn batch(state: &str, extra: &str) -> ProviderBatch {
        let body = format!(
            r#"{{"batch_id":"batch_123","name":"bl-3-x","create_time":"2026-08-25T12:00:00Z","expire_time":"2026-09-24T12:00:00Z","create_api_key_id":"k","state":{state},"cost_breakdown":{{"total_cost_usd_ticks":2747200}},"input_file_id":"file_123"{extra}}}"#
        );
        serde_json::from_str::<BatchObject>(&body)
            .unwrap()
            .normalise(NOW)
    }

    #[test]
    fn states_derive_from_counters_and_cancel_fields() {
        let ended = batch(
            r#"{"num_requests":3,"num_pending":0,"num_success":1,"num_error":1,"num_cancelled":1}"#,
            "",
        );
        assert_eq!(ended.state, BatchState::Completed);
        assert_eq!(
            ended.counts,
            RequestCounts {
                total: 3,
                completed: 1,
                failed: 2
            }
        );
        assert_eq!(ended.tag.as_deref(), Some("bl-3-x"));
        assert_eq!(ended.created_at, Some(1787659200));
        assert_eq!(
            batch(r#"{"num_requests":0,"num_pending":0}"#, "").state,
            BatchState::Validating
        );
        assert_eq!(
            batch(r#"{"num_requests":3,"num_pending":2}"#, "").state,
            BatchState::InProgress
        );
        let cancelling = batch(
            r#"{"num_requests":3,"num_pending":2}"#,
            r#","cancel_time":"2026-08-26T00:00:00Z""#,
        );
        assert_eq!(cancelling.state, BatchState::Cancelling);
        let failed = batch(
            r#"{"num_requests":0,"num_pending":0}"#,
            r#","cancel_by_xai_message":"JSONL file validation failed: line 2: invalid JSON: expected value""#,
        );
        assert_eq!(failed.state, BatchState::Failed);
        assert_eq!(failed.errors[0].line, Some(2));
        assert!(failed.errors[0]
            .message
            .starts_with("JSONL file validation failed"));
        // Date-only times are accepted too.
        assert_eq!(parse_time("2026-08-28"), parse_time("2026-08-28T00:00:00Z"));
    }

    #[test]
    fn result_rows_succeed_or_fail_in_every_shape() {
        let page = r#"{"results":[{"batch_request_id":"t1","batch_result":{"response":{"chat_get_completion":{"id":"x","object":"chat.completion","model":"grok-4.3","choices":[{"index":0,"message":{"role":"assistant","content":"Paris"},"finish_reason":"stop"}],"usage":{"prompt_tokens":10,"completion_tokens":3,"total_tokens":14,"prompt_tokens_details":{"cached_tokens":2},"completion_tokens_details":{"reasoning_tokens":1},"cost_in_usd_ticks":123}}}}},{"batch_request_id":"t2","batch_result":{"error":"Batch cancelled"}}],"pagination_token":null}"#;
        let page: ResultsPage = serde_json::from_str(page).unwrap();
        let ok = parse_result_row(page.results[0].get()).unwrap();
        assert_eq!(ok.custom_id, "t1");
        match ok.result {
            LineResult::Succeeded { body } => assert!(body.get().contains("\"Paris\"")),
            other => panic!("{other:?}"),
        }
        let cancelled = parse_result_row(page.results[1].get()).unwrap();
        assert!(matches!(
            cancelled.result,
            LineResult::Failed {
                status: Status::Canceled,
                ..
            }
        ));

        let bare = r#"{"batch_request_id":"t3","batch_result":{"error":"Maximum number of tokens max_tokens must be positive but max_tokens = -5"}}"#;
        match parse_result_row(bare).unwrap().result {
            LineResult::Failed { status, error, .. } => {
                assert_eq!(status, Status::Errored);
                assert_eq!(
                    error.message,
                    "Maximum number of tokens max_tokens must be positive but max_tokens = -5"
                );
            }
            other => panic!("{other:?}"),
        }
        let coded = r#"{"batch_request_id":"t4","batch_result":{"error":{"code":3,"message":"invalid argument: model"}}}"#;
        match parse_result_row(coded).unwrap().result {
            LineResult::Failed { error, .. } => {
                assert_eq!(error.kind, "invalid_argument");
                assert_eq!(error.message, "invalid argument: model");
            }
            other => panic!("{other:?}"),
        }
        let top = r#"{"batch_request_id":"t5","error_message":"model not supported for batch processing"}"#;
        match parse_result_row(top).unwrap().result {
            LineResult::Failed { error, .. } => {
                assert_eq!(error.message, "model not supported for batch processing")
            }
            other => panic!("{other:?}"),
        }
        let empty_token: ResultsPage =
            serde_json::from_str(r#"{"results":[],"pagination_token":""}"#).unwrap();
        assert_eq!(empty_token.pagination_token.as_deref(), Some(""));
    }

    #[test]
    fn a_wrong_key_is_an_auth_failure() {
        let e = as_auth_failure(ProviderError::Http {
            provider: "xai".into(),
            op: "creating batch".into(),
            status: 400,
            kind: Some("Client specified an invalid argument".into()),
            message: "Incorrect API key provided: xa***yz. You can obtain an API key from https://console.x.ai.".into(),
            retry_after: None,
        });
        assert_eq!(e.status(), Some(401));
    }
}
