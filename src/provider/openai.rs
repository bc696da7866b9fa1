//! OpenAI Files + Batch API (PROVIDERS.md section 1), also used for any
//! OpenAI-compatible `/v1/batches` server.
//!
//! The input file is streamed from the spool file; output and error files
//! are streamed to disk. Result lines are classified as PROVIDERS.md 1.6
//! says: by their `error` and `status_code`, never by the file they came in.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use futures::TryStreamExt;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::AsyncWriteExt;

use super::{
    batch_file_form, local_id_time, BatchError, BatchState, CreateError, HttpClient, LineOutcome,
    LineResult, Provider, ProviderBatch, ProviderError, RequestCounts,
};
use crate::config::ProviderKind;
use crate::model::{ErrorInfo, Status};
use crate::packer::SealedBatch;

/// The metadata key that tags a batch with its local batch id.
pub const TAG_KEY: &str = "batchline_id";

pub struct OpenAi {
    http: HttpClient,
}

impl OpenAi {
    pub fn new(http: HttpClient) -> Self {
        OpenAi { http }
    }

    fn authed(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let req = match &self.http.key {
            Some(key) => req.bearer_auth(key.expose()),
            None => req,
        };
        self.http.with_headers(req)
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
                let resp = self.http.send(op, req).await?;
                let bytes = resp
                    .bytes()
                    .await
                    .map_err(|e| self.http.transport_error(op, e))?;
                serde_json::from_slice(&bytes)
                    .map_err(|e| self.http.decode_error(op, e.to_string()))
            })
            .await
    }

    async fn download_file(&self, file_id: &str, path: &Path) -> Result<(), ProviderError> {
        let op = format!("downloading file {file_id}");
        self.http
            .retrying(&op, || async {
                let req = self.authed(
                    self.http
                        .client
                        .get(self.http.url(&format!("/files/{file_id}/content"))),
                );
                let resp = self.http.send(&op, req).await?;
                let io_err = |source| ProviderError::Io {
                    op: op.clone(),
                    path: path.to_owned(),
                    source,
                };
                let mut file = tokio::fs::File::create(path).await.map_err(io_err)?;
                let mut stream = resp.bytes_stream();
                while let Some(chunk) = stream
                    .try_next()
                    .await
                    .map_err(|e| self.http.transport_error(&op, e))?
                {
                    file.write_all(&chunk).await.map_err(io_err)?;
                }
                file.flush().await.map_err(io_err)?;
                Ok(())
            })
            .await
    }
}

#[derive(Debug, Deserialize)]
struct FileObject {
    id: String,
}

#[derive(Debug, Deserialize)]
pub(crate) struct BatchObject {
    id: String,
    status: String,
    #[serde(default)]
    input_file_id: Option<String>,
    #[serde(default)]
    output_file_id: Option<String>,
    #[serde(default)]
    error_file_id: Option<String>,
    #[serde(default)]
    errors: Option<BatchErrors>,
    #[serde(default)]
    request_counts: Option<Counts>,
    #[serde(default)]
    metadata: Option<HashMap<String, serde_json::Value>>,
    #[serde(default)]
    created_at: Option<i64>,
    #[serde(default)]
    completed_at: Option<i64>,
    #[serde(default)]
    failed_at: Option<i64>,
    #[serde(default)]
    expired_at: Option<i64>,
    #[serde(default)]
    cancelled_at: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct BatchErrors {
    #[serde(default)]
    data: Vec<BatchErrorObject>,
}

#[derive(Debug, Deserialize)]
struct BatchErrorObject {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    line: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct Counts {
    #[serde(default)]
    total: u64,
    #[serde(default)]
    completed: u64,
    #[serde(default)]
    failed: u64,
}

#[derive(Debug, Deserialize)]
struct BatchList {
    data: Vec<BatchObject>,
    #[serde(default)]
    has_more: bool,
    #[serde(default)]
    last_id: Option<String>,
}

impl BatchObject {
    pub(crate) fn normalise(self) -> ProviderBatch {
        let state = match self.status.as_str() {
            "validating" => BatchState::Validating,
            "in_progress" => BatchState::InProgress,
            "finalizing" => BatchState::Finalizing,
            "cancelling" => BatchState::Cancelling,
            "completed" => BatchState::Completed,
            "failed" => BatchState::Failed,
            "expired" => BatchState::Expired,
            "cancelled" => BatchState::Cancelled,
            other => {
                // A status added after this was written: keep polling.
                tracing::warn!(batch = %self.id, status = other, "unknown OpenAI batch status");
                BatchState::InProgress
            }
        };
        let tag = self
            .metadata
            .as_ref()
            .and_then(|m| m.get(TAG_KEY))
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        ProviderBatch {
            ended_at: self
                .completed_at
                .or(self.failed_at)
                .or(self.expired_at)
                .or(self.cancelled_at),
            id: self.id,
            state,
            counts: self
                .request_counts
                .map(|c| RequestCounts {
                    total: c.total,
                    completed: c.completed,
                    failed: c.failed,
                })
                .unwrap_or_default(),
            input_file_id: self.input_file_id,
            output_file_id: self.output_file_id,
            error_file_id: self.error_file_id,
            errors: self
                .errors
                .map(|e| {
                    e.data
                        .into_iter()
                        .map(|d| BatchError {
                            code: d.code.unwrap_or_else(|| "batch_failed".into()),
                            message: d.message.unwrap_or_default(),
                            line: d.line,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            tag,
            created_at: self.created_at,
        }
    }
}

#[derive(Debug, Deserialize)]
struct OutputLine {
    custom_id: String,
    #[serde(default)]
    response: Option<OutputResponse>,
    #[serde(default)]
    error: Option<LineError>,
}

#[derive(Debug, Deserialize)]
struct OutputResponse {
    status_code: u16,
    body: Box<RawValue>,
}

#[derive(Debug, Deserialize)]
struct LineError {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: EndpointError,
}

#[derive(Debug, Deserialize)]
struct EndpointError {
    #[serde(default)]
    message: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    code: Option<serde_json::Value>,
}

/// Maps one output- or error-file line (PROVIDERS.md 1.6).
pub fn parse_output_line(line: &str) -> Result<LineOutcome, String> {
    let parsed: OutputLine =
        serde_json::from_str(line).map_err(|e| format!("bad result line: {e}"))?;
    let result = match (parsed.error, parsed.response) {
        (Some(error), _) => {
            let code = error.code.unwrap_or_else(|| "batch_error".into());
            let status = match code.as_str() {
                "batch_expired" => Status::Expired,
                "batch_cancelled" => Status::Canceled,
                _ => Status::Errored,
            };
            LineResult::Failed {
                status,
                error: ErrorInfo::new(code, error.message.unwrap_or_default()),
                body: None,
                status_code: None,
            }
        }
        (None, Some(resp)) if (200..300).contains(&resp.status_code) => {
            LineResult::Succeeded { body: resp.body }
        }
        (None, Some(resp)) => {
            let (kind, message) = match serde_json::from_str::<ErrorBody>(resp.body.get()) {
                Ok(b) => {
                    let code = b.error.code.and_then(|c| match c {
                        serde_json::Value::String(s) => Some(s),
                        serde_json::Value::Null => None,
                        other => Some(other.to_string()),
                    });
                    (
                        code.or(b.error.kind)
                            .unwrap_or_else(|| format!("http_{}", resp.status_code)),
                        b.error.message.unwrap_or_default(),
                    )
                }
                Err(_) => (
                    format!("http_{}", resp.status_code),
                    resp.body.get().chars().take(500).collect(),
                ),
            };
            LineResult::Failed {
                status: Status::Errored,
                error: ErrorInfo::new(kind, message),
                body: Some(resp.body),
                status_code: Some(resp.status_code),
            }
        }
        (None, None) => LineResult::Failed {
            status: Status::Errored,
            error: ErrorInfo::new(
                "invalid_result",
                "result line has neither response nor error",
            ),
            body: None,
            status_code: None,
        },
    };
    Ok(LineOutcome {
        custom_id: parsed.custom_id,
        result,
    })
}

#[async_trait]
impl Provider for OpenAi {
    fn name(&self) -> &str {
        &self.http.provider
    }

    fn kind(&self) -> ProviderKind {
        ProviderKind::Openai
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
                let resp = self.http.send(&op, req).await?;
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
                    .decode_error(&op, "an OpenAI batch needs an uploaded input file"),
            )
        })?;
        let body = serde_json::json!({
            "input_file_id": file_id,
            "endpoint": batch.route.endpoint,
            "completion_window": "24h",
            "metadata": { TAG_KEY: batch.id },
        });
        let req = self
            .authed(self.http.client.post(self.http.url("/batches")))
            .timeout(self.http.request_timeout)
            .json(&body);
        let resp = self
            .http
            .send(&op, req)
            .await
            .map_err(CreateError::classify)?;
        // The batch exists now: an unreadable answer is ambiguous, not refused.
        let object: BatchObject = resp
            .json()
            .await
            .map_err(|e| CreateError::Ambiguous(self.http.decode_error(&op, e.to_string())))?;
        Ok(object.normalise())
    }

    async fn status(&self, id: &str) -> Result<ProviderBatch, ProviderError> {
        let object: BatchObject = self
            .get_json(&format!("retrieving batch {id}"), &format!("/batches/{id}"))
            .await?;
        Ok(object.normalise())
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
                            .post(self.http.url(&format!("/batches/{id}/cancel"))),
                    )
                    .timeout(self.http.request_timeout);
                let resp = self.http.send(&op, req).await?;
                resp.json()
                    .await
                    .map_err(|e| self.http.decode_error(&op, e.to_string()))
            })
            .await?;
        Ok(object.normalise())
    }

    async fn download_results(
        &self,
        batch: &ProviderBatch,
        dir: &Path,
        local_id: &str,
    ) -> Result<Vec<PathBuf>, ProviderError> {
        let mut paths = Vec::new();
        for (suffix, file_id) in [
            ("output", &batch.output_file_id),
            ("errors", &batch.error_file_id),
        ] {
            if let Some(file_id) = file_id {
                let path = dir.join(format!("{local_id}.{suffix}.jsonl"));
                self.download_file(file_id, &path).await?;
                paths.push(path);
            }
        }
        Ok(paths)
    }

    fn parse_result_line(&self, line: &str) -> Result<LineOutcome, String> {
        parse_output_line(line)
    }

    async fn find_candidates(
        &self,
        batch: &SealedBatch,
        file_id: Option<&str>,
    ) -> Result<Vec<ProviderBatch>, ProviderError> {
        // Listings are newest first and cannot filter: page back until
        // batches older than the local batch itself (less a margin).
        let tag = batch.id.as_str();
        let oldest = local_id_time(tag).map(|t| t - 3600);
        let mut after: Option<String> = None;
        for _ in 0..1000 {
            let path = match &after {
                Some(a) => format!("/batches?limit=100&after={a}"),
                None => "/batches?limit=100".to_owned(),
            };
            let page: BatchList = self.get_json("listing batches", &path).await?;
            let mut older = false;
            for b in page.data {
                older |= matches!((oldest, b.created_at), (Some(o), Some(c)) if c < o);
                let b = b.normalise();
                if b.tag.as_deref() == Some(tag)
                    && (file_id.is_none() || b.input_file_id.as_deref() == file_id)
                {
                    return Ok(vec![b]);
                }
            }
            if !page.has_more || older || page.last_id.is_none() {
                break;
            }
            after = page.last_id;
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
                self.http.send(&op, req).await.map(drop)
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

    // Recorded bodies from PROVIDERS.md 1.3 and 1.6, themselves taken from
    // https://platform.openai.com/docs/api-reference/batch and
    // https://platform.openai.com/docs/guides/batch.

    #[test]
    fn completed_batch_object_normalises() {
        let body = r#"{"id":"batch_abc123","object":"batch","endpoint":"/v1/chat/completions","errors":null,"input_file_id":"file-abc123","completion_window":"24h","status":"completed","output_file_id":"file-cvaTdG","error_file_id":"file-HOWS94","created_at":1711471533,"in_progress_at":1711471538,"expires_at":1711557933,"finalizing_at":1711493133,"completed_at":1711493163,"failed_at":null,"request_counts":{"total":100,"completed":95,"failed":5},"metadata":{"batchline_id":"bl-3-019a8c1e-7b3f-7c2a-9d41-5e6f7a8b9c0d"}}"#;
        let b = serde_json::from_str::<BatchObject>(body)
            .unwrap()
            .normalise();
        assert_eq!(b.state, BatchState::Completed);
        assert_eq!(
            b.counts,
            RequestCounts {
                total: 100,
                completed: 95,
                failed: 5
            }
        );
        assert_eq!(b.output_file_id.as_deref(), Some("file-cvaTdG"));
        assert_eq!(b.error_file_id.as_deref(), Some("file-HOWS94"));
        assert_eq!(
            b.tag.as_deref(),
            Some("bl-3-019a8c1e-7b3f-7c2a-9d41-5e6f7a8b9c0d")
        );
        assert_eq!(b.ended_at, Some(1711493163));
    }

    #[test]
    fn failed_batch_keeps_its_errors() {
        let body = r#"{"id":"batch_def456","object":"batch","status":"failed","errors":{"object":"list","data":[{"code":"token_limit_exceeded","message":"Enqueued token limit reached for gpt-4o-mini in organization org-x. Limit: 2,000,000 enqueued tokens. Please try again once some in_progress batches have been completed.","param":null,"line":null}]},"output_file_id":null,"error_file_id":null,"failed_at":1711471540,"request_counts":{"total":0,"completed":0,"failed":0}}"#;
        let b = serde_json::from_str::<BatchObject>(body)
            .unwrap()
            .normalise();
        assert_eq!(b.state, BatchState::Failed);
        assert_eq!(b.errors.len(), 1);
        assert_eq!(b.errors[0].code, "token_limit_exceeded");
        assert!(b.errors[0].message.starts_with("Enqueued token limit"));
        assert_eq!(b.ended_at, Some(1711471540));
    }

    #[test]
    fn output_lines_classify_by_error_and_status_code() {
        let ok = r#"{"id":"batch_req_123","custom_id":"request-2","response":{"status_code":200,"request_id":"req_123","body":{"id":"chatcmpl-123","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello."},"finish_reason":"stop"}],"usage":{"prompt_tokens":22,"completion_tokens":2,"total_tokens":24}}},"error":null}"#;
        let o = parse_output_line(ok).unwrap();
        assert_eq!(o.custom_id, "request-2");
        assert!(
            matches!(o.result, LineResult::Succeeded { ref body } if body.get().contains("chatcmpl-123"))
        );

        let refused = r#"{"id":"batch_req_456","custom_id":"request-5","response":{"status_code":400,"request_id":"0538a1cc","body":{"error":{"message":"This model's maximum context length is 128000 tokens.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}},"error":null}"#;
        match parse_output_line(refused).unwrap().result {
            LineResult::Failed {
                status,
                error,
                status_code,
                body,
            } => {
                assert_eq!(status, Status::Errored);
                assert_eq!(error.kind, "context_length_exceeded");
                assert_eq!(
                    error.message,
                    "This model's maximum context length is 128000 tokens."
                );
                assert_eq!(status_code, Some(400));
                assert!(body.is_some());
            }
            other => panic!("{other:?}"),
        }

        let expired = r#"{"id":"batch_req_789","custom_id":"request-3","response":null,"error":{"code":"batch_expired","message":"This request could not be executed before the completion window expired."}}"#;
        match parse_output_line(expired).unwrap().result {
            LineResult::Failed { status, error, .. } => {
                assert_eq!(status, Status::Expired);
                assert_eq!(error.kind, "batch_expired");
            }
            other => panic!("{other:?}"),
        }
        let cancelled = expired.replace("batch_expired", "batch_cancelled");
        assert!(matches!(
            parse_output_line(&cancelled).unwrap().result,
            LineResult::Failed {
                status: Status::Canceled,
                ..
            }
        ));
        assert!(parse_output_line("{oops").is_err());
    }

    #[test]
    fn local_ids_carry_their_time() {
        let id = format!("bl-3-{}", uuid::Uuid::now_v7());
        let t = local_id_time(&id).unwrap();
        assert!((t - chrono::Utc::now().timestamp()).abs() < 5);
    }
}
