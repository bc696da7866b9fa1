//! Anthropic Message Batches (PROVIDERS.md section 2).
//!
//! Requests go inline in the create call: the body `{"requests":[…]}` is
//! streamed from the spool file (a batch may be 200 MB), never built in
//! memory. There is no batch-level failure and no tag: outcomes are per
//! line, and an ambiguous create is resolved by creation time and request
//! count.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::AsyncWriteExt;

use super::{
    local_id_time, parse_time, BatchState, CreateError, HttpClient, LineOutcome, LineResult,
    Provider, ProviderBatch, ProviderError, RequestCounts,
};
use crate::config::ProviderKind;
use crate::model::{ErrorInfo, Status};
use crate::packer::SealedBatch;

/// The API version sent unless the provider's `headers` name another.
pub const DEFAULT_VERSION: &str = "2023-06-01";

pub struct Anthropic {
    http: HttpClient,
}

impl Anthropic {
    pub fn new(mut http: HttpClient) -> Self {
        if !http
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("anthropic-version"))
        {
            http.headers
                .push(("anthropic-version".into(), DEFAULT_VERSION.into()));
        }
        Anthropic { http }
    }

    fn authed(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let req = match &self.http.key {
            Some(key) => req.header("x-api-key", key.expose()),
            None => req,
        };
        self.http.with_headers(req)
    }

    async fn get_json<T: for<'de> Deserialize<'de>>(
        &self,
        op: &str,
        url: &str,
    ) -> Result<T, ProviderError> {
        self.http
            .retrying(op, || async {
                let req = self
                    .authed(self.http.client.get(url))
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
}

/// The create body, streamed: `{"requests":[`, the spool file's lines
/// joined by commas, `]}`.
fn create_body(
    file: tokio::fs::File,
    len: u64,
) -> impl futures::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    let mut remaining = len;
    let lines = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).map(move |chunk| {
        chunk.map(|chunk| {
            let mut chunk = chunk.to_vec();
            remaining -= chunk.len() as u64;
            // Every line ends in '\n': each separates two items, but the last.
            if remaining == 0 && chunk.last() == Some(&b'\n') {
                chunk.pop();
            }
            for b in &mut chunk {
                if *b == b'\n' {
                    *b = b',';
                }
            }
            Bytes::from(chunk)
        })
    });
    futures::stream::once(async { Ok(Bytes::from_static(b"{\"requests\":[")) })
        .chain(lines)
        .chain(futures::stream::once(async {
            Ok(Bytes::from_static(b"]}"))
        }))
}

#[derive(Debug, Deserialize)]
struct MessageBatch {
    id: String,
    processing_status: String,
    #[serde(default)]
    request_counts: Option<Counts>,
    #[serde(default)]
    created_at: Option<String>,
    #[serde(default)]
    ended_at: Option<String>,
    #[serde(default)]
    results_url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Counts {
    #[serde(default)]
    processing: u64,
    #[serde(default)]
    succeeded: u64,
    #[serde(default)]
    errored: u64,
    #[serde(default)]
    canceled: u64,
    #[serde(default)]
    expired: u64,
}

#[derive(Debug, Deserialize)]
struct BatchList {
    data: Vec<MessageBatch>,
    #[serde(default)]
    has_more: bool,
    #[serde(default)]
    last_id: Option<String>,
}

impl MessageBatch {
    fn normalise(self) -> ProviderBatch {
        let state = match self.processing_status.as_str() {
            "in_progress" => BatchState::InProgress,
            "canceling" => BatchState::Cancelling,
            "ended" => BatchState::Completed,
            other => {
                tracing::warn!(batch = %self.id, status = other, "unknown Anthropic processing_status");
                BatchState::InProgress
            }
        };
        let c = self.request_counts.unwrap_or_default();
        ProviderBatch {
            id: self.id,
            state,
            counts: RequestCounts {
                total: c.processing + c.succeeded + c.errored + c.canceled + c.expired,
                completed: c.succeeded,
                failed: c.errored + c.canceled + c.expired,
            },
            input_file_id: None,
            // Anthropic's results live at results_url, carried here.
            output_file_id: self.results_url,
            error_file_id: None,
            errors: Vec::new(),
            tag: None,
            created_at: self.created_at.as_deref().and_then(parse_time),
            ended_at: self.ended_at.as_deref().and_then(parse_time),
        }
    }
}

#[derive(Debug, Deserialize)]
struct ResultLine {
    custom_id: String,
    result: ResultBody,
}

#[derive(Debug, Deserialize)]
struct ResultBody {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    message: Option<Box<RawValue>>,
    #[serde(default)]
    error: Option<Box<RawValue>>,
}

#[derive(Debug, Deserialize)]
struct ErrorObject {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    error: Option<Box<ErrorObject>>,
}

/// Maps one results line (PROVIDERS.md 2.6). An errored line's type is at
/// `result.error.error.type` (the full error response), or at
/// `result.error.type` in the flat shape some parsers expect.
pub fn parse_result_line(line: &str) -> Result<LineOutcome, String> {
    let parsed: ResultLine =
        serde_json::from_str(line).map_err(|e| format!("bad result line: {e}"))?;
    let result = match parsed.result.kind.as_str() {
        "succeeded" => match parsed.result.message {
            Some(body) => LineResult::Succeeded { body },
            None => failed(
                Status::Errored,
                "invalid_result",
                "succeeded line without a message",
                None,
            ),
        },
        "errored" => {
            let (kind, message) = parsed
                .result
                .error
                .as_ref()
                .and_then(|e| serde_json::from_str::<ErrorObject>(e.get()).ok())
                .map(|e| match e.error {
                    Some(inner) => (inner.kind, inner.message),
                    None => (e.kind, e.message),
                })
                .unwrap_or((None, None));
            LineResult::Failed {
                status: Status::Errored,
                error: ErrorInfo::new(
                    kind.unwrap_or_else(|| "api_error".into()),
                    message.unwrap_or_default(),
                ),
                body: parsed.result.error,
                status_code: None,
            }
        }
        "canceled" => failed(
            Status::Canceled,
            "canceled",
            "the batch was canceled before this request ran",
            None,
        ),
        "expired" => failed(
            Status::Expired,
            "expired",
            "the batch expired before this request ran",
            None,
        ),
        other => failed(Status::Errored, other, "unknown result type", None),
    };
    Ok(LineOutcome {
        custom_id: parsed.custom_id,
        result,
    })
}

fn failed(status: Status, kind: &str, message: &str, body: Option<Box<RawValue>>) -> LineResult {
    LineResult::Failed {
        status,
        error: ErrorInfo::new(kind, message),
        body,
        status_code: None,
    }
}

#[async_trait]
impl Provider for Anthropic {
    fn name(&self) -> &str {
        &self.http.provider
    }

    fn kind(&self) -> ProviderKind {
        ProviderKind::Anthropic
    }

    async fn upload(&self, _batch: &SealedBatch) -> Result<Option<String>, ProviderError> {
        Ok(None)
    }

    async fn create(
        &self,
        batch: &SealedBatch,
        _file_id: Option<&str>,
    ) -> Result<ProviderBatch, CreateError> {
        let op = format!("creating batch {}", batch.id);
        let io_err = |source| {
            CreateError::Refused(ProviderError::Io {
                op: op.clone(),
                path: batch.input_path.clone(),
                source,
            })
        };
        let file = tokio::fs::File::open(&batch.input_path)
            .await
            .map_err(io_err)?;
        let len = file.metadata().await.map_err(io_err)?.len();
        let req = self
            .authed(self.http.client.post(self.http.url("/messages/batches")))
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap_stream(create_body(file, len)));
        let resp = self
            .http
            .send(&op, req)
            .await
            .map_err(CreateError::classify)?;
        let object: MessageBatch = resp
            .json()
            .await
            .map_err(|e| CreateError::Ambiguous(self.http.decode_error(&op, e.to_string())))?;
        Ok(object.normalise())
    }

    async fn status(&self, id: &str) -> Result<ProviderBatch, ProviderError> {
        let object: MessageBatch = self
            .get_json(
                &format!("retrieving batch {id}"),
                &self.http.url(&format!("/messages/batches/{id}")),
            )
            .await?;
        Ok(object.normalise())
    }

    async fn cancel(&self, id: &str) -> Result<ProviderBatch, ProviderError> {
        let op = format!("cancelling batch {id}");
        let object: MessageBatch = self
            .http
            .retrying(&op, || async {
                let req = self
                    .authed(
                        self.http
                            .client
                            .post(self.http.url(&format!("/messages/batches/{id}/cancel"))),
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
        let url = match &batch.output_file_id {
            Some(u) => u.clone(),
            None => self
                .http
                .url(&format!("/messages/batches/{}/results", batch.id)),
        };
        let path = dir.join(format!("{local_id}.results.jsonl"));
        let op = format!("downloading results of {}", batch.id);
        self.http
            .retrying(&op, || async {
                let req = self
                    .authed(self.http.client.get(&url))
                    .header("accept", "application/binary");
                let resp = self.http.send(&op, req).await?;
                let io_err = |source| ProviderError::Io {
                    op: op.clone(),
                    path: path.clone(),
                    source,
                };
                let mut file = tokio::fs::File::create(&path).await.map_err(io_err)?;
                let mut stream = resp.bytes_stream();
                while let Some(chunk) = stream
                    .try_next()
                    .await
                    .map_err(|e| self.http.transport_error(&op, e))?
                {
                    file.write_all(&chunk).await.map_err(io_err)?;
                }
                file.flush().await.map_err(io_err)
            })
            .await?;
        Ok(vec![path])
    }

    fn parse_result_line(&self, line: &str) -> Result<LineOutcome, String> {
        parse_result_line(line)
    }

    /// Anthropic has no tag: candidates are batches created around the
    /// local batch's time with its request count (PROVIDERS.md 2.9). Each
    /// is only a probable match until its custom_ids are compared.
    async fn find_candidates(
        &self,
        batch: &SealedBatch,
        _file_id: Option<&str>,
    ) -> Result<Vec<ProviderBatch>, ProviderError> {
        let Some(opened) = local_id_time(&batch.id) else {
            return Ok(Vec::new());
        };
        let (from, to) = (opened - 60, chrono::Utc::now().timestamp() + 60);
        let mut after: Option<String> = None;
        let mut candidates = Vec::new();
        for _ in 0..100 {
            let mut url = self.http.url("/messages/batches?limit=100");
            if let Some(a) = &after {
                url.push_str(&format!("&after_id={a}"));
            }
            let page: BatchList = self.get_json("listing batches", &url).await?;
            let mut older = false;
            for b in page.data {
                let b = b.normalise();
                let created = b.created_at.unwrap_or(0);
                older |= created < from;
                if (from..=to).contains(&created) && b.counts.total == batch.len() as u64 {
                    candidates.push(b);
                }
            }
            if !page.has_more || older {
                break;
            }
            after = page.last_id;
        }
        Ok(candidates)
    }

    fn tags_batches(&self) -> bool {
        false
    }

    async fn delete_file(&self, _file_id: &str) -> Result<(), ProviderError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Bodies from https://platform.claude.com/docs/en/build-with-claude/batch-processing
    // and https://platform.claude.com/docs/en/api/messages/batches (PROVIDERS.md 2.3, 2.6).

    #[test]
    fn ended_batch_normalises() {
        let body = r#"{"id":"msgbatch_01HkcTjaV5","type":"message_batch","processing_status":"ended","request_counts":{"processing":0,"succeeded":1,"errored":1,"canceled":0,"expired":0},"ended_at":"2024-09-24T19:02:11.481920Z","created_at":"2024-09-24T18:37:24.100435Z","expires_at":"2024-09-25T18:37:24.100435Z","cancel_initiated_at":null,"archived_at":null,"results_url":"https://api.anthropic.com/v1/messages/batches/msgbatch_01HkcTjaV5/results"}"#;
        let b = serde_json::from_str::<MessageBatch>(body)
            .unwrap()
            .normalise();
        assert_eq!(b.state, BatchState::Completed);
        assert_eq!(
            b.counts,
            RequestCounts {
                total: 2,
                completed: 1,
                failed: 1
            }
        );
        assert_eq!(
            b.output_file_id.as_deref(),
            Some("https://api.anthropic.com/v1/messages/batches/msgbatch_01HkcTjaV5/results")
        );
        assert_eq!(b.created_at, Some(1727203044));
        assert_eq!(b.ended_at, Some(1727204531));
    }

    #[test]
    fn result_lines_of_every_type() {
        let ok = r#"{"custom_id":"a","result":{"type":"succeeded","message":{"id":"msg_014VwiXb","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"Hello again!"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":11,"output_tokens":36,"service_tier":"batch"}}}}"#;
        assert!(matches!(
            parse_result_line(ok).unwrap().result,
            LineResult::Succeeded { .. }
        ));

        let nested = r#"{"custom_id":"b","result":{"type":"errored","error":{"type":"error","error":{"type":"invalid_request_error","message":"messages.0.content: Input should be a valid string"},"request_id":"req_1"}}}"#;
        match parse_result_line(nested).unwrap().result {
            LineResult::Failed {
                status,
                error,
                body,
                ..
            } => {
                assert_eq!(status, Status::Errored);
                assert_eq!(error.kind, "invalid_request_error");
                assert_eq!(
                    error.message,
                    "messages.0.content: Input should be a valid string"
                );
                assert!(body.is_some());
            }
            other => panic!("{other:?}"),
        }
        let flat = r#"{"custom_id":"b","result":{"type":"errored","error":{"type":"overloaded_error","message":"Overloaded"}}}"#;
        match parse_result_line(flat).unwrap().result {
            LineResult::Failed { error, .. } => assert_eq!(error.kind, "overloaded_error"),
            other => panic!("{other:?}"),
        }
        let canceled = r#"{"custom_id":"c","result":{"type":"canceled"}}"#;
        assert!(matches!(
            parse_result_line(canceled).unwrap().result,
            LineResult::Failed {
                status: Status::Canceled,
                ..
            }
        ));
        let expired = r#"{"custom_id":"d","result":{"type":"expired"}}"#;
        assert!(matches!(
            parse_result_line(expired).unwrap().result,
            LineResult::Failed {
                status: Status::Expired,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn create_body_streams_the_spool_as_a_json_array() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.jsonl");
        let lines = [
            r#"{"custom_id":"a","params":{"model":"m","max_tokens":5,"messages":[]}}"#,
            r#"{"custom_id":"b","params":{"model":"m","max_tokens":5,"messages":[]}}"#,
        ];
        std::fs::write(&path, format!("{}\n{}\n", lines[0], lines[1])).unwrap();
        let file = tokio::fs::File::open(&path).await.unwrap();
        let len = file.metadata().await.unwrap().len();
        let chunks: Vec<Bytes> = create_body(file, len).try_collect().await.unwrap();
        let bytes = chunks.concat();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["requests"].as_array().unwrap().len(), 2);
        assert_eq!(v["requests"][1]["custom_id"], "b");
    }
}
