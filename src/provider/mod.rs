//! Provider batch APIs behind one trait: upload, create, status, results,
//! cancel, find-by-tag, delete-file. Adapters are translation plus HTTP;
//! they know nothing of Kafka.
//!
//! The shared pieces live here: the normalised batch object, error
//! classification (what may be retried, what is an ambiguous create) and the
//! retrying HTTP helpers. A create is never retried blindly: only a request
//! that was never sent (a connect error) or a definite refusal that asks for
//! it (429 rate limits) may be sent again.

pub mod anthropic;
pub mod openai;
pub mod xai;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::value::RawValue;

use crate::config::{ApiKey, ProviderConfig, ProviderKind, RetryConfig};
use crate::metrics::Metrics;
use crate::model::{ErrorInfo, Status};
use crate::packer::SealedBatch;

/// A provider batch's state, normalised over the three APIs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchState {
    Validating,
    InProgress,
    Finalizing,
    Cancelling,
    Completed,
    Failed,
    Expired,
    Cancelled,
}

impl BatchState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            BatchState::Completed
                | BatchState::Failed
                | BatchState::Expired
                | BatchState::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BatchState::Validating => "validating",
            BatchState::InProgress => "in_progress",
            BatchState::Finalizing => "finalizing",
            BatchState::Cancelling => "cancelling",
            BatchState::Completed => "completed",
            BatchState::Failed => "failed",
            BatchState::Expired => "expired",
            BatchState::Cancelled => "cancelled",
        }
    }
}

/// A batch-level error, e.g. OpenAI's `errors.data[]`.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchError {
    pub code: String,
    pub message: String,
    /// The 1-based input line it names, if any.
    pub line: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RequestCounts {
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
}

/// A provider batch as the pipeline sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderBatch {
    pub id: String,
    pub state: BatchState,
    pub counts: RequestCounts,
    pub input_file_id: Option<String>,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub errors: Vec<BatchError>,
    /// The local batch id the batch was tagged with, if echoed.
    pub tag: Option<String>,
    /// Unix seconds.
    pub created_at: Option<i64>,
    /// Unix seconds of the terminal transition.
    pub ended_at: Option<i64>,
}

/// One result line, mapped to batchline's statuses.
#[derive(Debug)]
pub struct LineOutcome {
    pub custom_id: String,
    pub result: LineResult,
}

#[derive(Debug)]
pub enum LineResult {
    Succeeded {
        body: Box<RawValue>,
    },
    Failed {
        status: Status,
        error: ErrorInfo,
        /// The provider's error response body, when there is one.
        body: Option<Box<RawValue>>,
        /// The provider's HTTP status for this request, when it ran.
        status_code: Option<u16>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("{op} at {provider}: HTTP {status}{}: {message}", kind.as_deref().map(|k| format!(" {k}")).unwrap_or_default())]
    Http {
        provider: String,
        op: String,
        status: u16,
        /// The provider's error type or code (`rate_limit_exceeded`, ...).
        kind: Option<String>,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("{op} at {provider}: {message}")]
    Transport {
        provider: String,
        op: String,
        /// The request never left: safe to send again, even a create.
        connect: bool,
        message: String,
    },
    #[error("{op} at {provider}: unexpected response: {message}")]
    Decode {
        provider: String,
        op: String,
        message: String,
    },
    #[error("{op}: {path}: {source}")]
    Io {
        op: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ProviderError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ProviderError::Http { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn kind(&self) -> Option<&str> {
        match self {
            ProviderError::Http { kind, .. } => kind.as_deref(),
            _ => None,
        }
    }

    /// Whether a read, upload, download or cancel may be retried.
    pub fn is_transient(&self) -> bool {
        match self {
            ProviderError::Http { status, kind, .. } => {
                *status == 408
                    || *status == 409
                    || *status >= 500
                    || (*status == 429 && kind.as_deref() != Some("insufficient_quota"))
            }
            ProviderError::Transport { .. } => true,
            ProviderError::Decode { .. } | ProviderError::Io { .. } => false,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::Http { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The message a request errored by this failure carries.
    pub fn error_info(&self) -> ErrorInfo {
        let kind = match self {
            ProviderError::Http { kind: Some(k), .. } => k.clone(),
            ProviderError::Http { status, .. } => format!("http_{status}"),
            ProviderError::Transport { .. } => "transport_error".into(),
            ProviderError::Decode { .. } => "invalid_response".into(),
            ProviderError::Io { .. } => "io_error".into(),
        };
        ErrorInfo::new(kind, self.to_string())
    }
}

/// How a create failed. DESIGN.md "Creates are not idempotent".
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// Nothing was created (any 4xx but 408 and 409).
    #[error("create refused: {0}")]
    Refused(ProviderError),
    /// The batch may or may not exist (timeout, reset, 408, 409, 5xx).
    #[error("create outcome unknown: {0}")]
    Ambiguous(ProviderError),
}

impl CreateError {
    /// Classifies the failure of a create call that was sent.
    pub fn classify(err: ProviderError) -> CreateError {
        match &err {
            ProviderError::Http { status, .. }
                if (400..500).contains(status) && *status != 408 && *status != 409 =>
            {
                CreateError::Refused(err)
            }
            ProviderError::Transport { connect: true, .. } => CreateError::Refused(err),
            _ => CreateError::Ambiguous(err),
        }
    }
}

/// A provider batch API.
#[async_trait]
pub trait Provider: Send + Sync {
    /// The configured name (`openai`, or a named compatible endpoint).
    fn name(&self) -> &str;

    fn kind(&self) -> ProviderKind;

    /// Uploads the batch input. File providers return the file id; providers
    /// that take requests inline return `None`.
    async fn upload(&self, batch: &SealedBatch) -> Result<Option<String>, ProviderError>;

    /// Creates the provider batch, tagged with the local batch id. Sent at
    /// most once per call: the caller resolves ambiguity.
    async fn create(
        &self,
        batch: &SealedBatch,
        file_id: Option<&str>,
    ) -> Result<ProviderBatch, CreateError>;

    async fn status(&self, id: &str) -> Result<ProviderBatch, ProviderError>;

    async fn cancel(&self, id: &str) -> Result<ProviderBatch, ProviderError>;

    /// Downloads every result of an ended batch into files under `dir`,
    /// one provider result per line, and returns their paths.
    async fn download_results(
        &self,
        batch: &ProviderBatch,
        dir: &Path,
        local_id: &str,
    ) -> Result<Vec<PathBuf>, ProviderError>;

    /// Maps one downloaded result line.
    fn parse_result_line(&self, line: &str) -> Result<LineOutcome, String>;

    /// Finds the provider batch created for `batch` (tagged with its local
    /// id, and created from `file_id` when the provider has files), for
    /// resolving an ambiguous create. Providers with a tag return at most
    /// one exact match; others return every plausible candidate.
    async fn find_candidates(
        &self,
        batch: &SealedBatch,
        file_id: Option<&str>,
    ) -> Result<Vec<ProviderBatch>, ProviderError>;

    /// Whether [`Provider::find_candidates`] matches by a tag (exact), or
    /// only by time and size (each candidate must be verified by its
    /// custom_ids once it ends).
    fn tags_batches(&self) -> bool {
        true
    }

    async fn delete_file(&self, file_id: &str) -> Result<(), ProviderError>;
}

/// Builds the adapter for a configured provider; its HTTP calls are counted
/// in `metrics`.
pub fn build(
    name: &str,
    cfg: &ProviderConfig,
    retry: &RetryConfig,
    metrics: &Metrics,
) -> Result<Arc<dyn Provider>, ProviderError> {
    let http = HttpClient::new(name, cfg, retry, metrics.clone())?;
    metrics.provider_configured(name);
    Ok(match cfg.kind {
        ProviderKind::Openai => Arc::new(openai::OpenAi::new(http)),
        ProviderKind::Anthropic => Arc::new(anthropic::Anthropic::new(http)),
        ProviderKind::Xai => Arc::new(xai::Xai::new(http)),
    })
}

/// The HTTP side every adapter shares: one pooled client, the base URL,
/// auth, extra headers, retries with backoff, and a count and timing of
/// every call (`batchline_provider_requests_total`).
#[derive(Clone)]
pub struct HttpClient {
    pub provider: String,
    pub base_url: String,
    pub key: Option<ApiKey>,
    pub headers: Vec<(String, String)>,
    pub client: reqwest::Client,
    pub request_timeout: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub max_retries: u32,
    pub metrics: Metrics,
}

impl HttpClient {
    pub fn new(
        name: &str,
        cfg: &ProviderConfig,
        retry: &RetryConfig,
        metrics: Metrics,
    ) -> Result<HttpClient, ProviderError> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("batchline/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ProviderError::Transport {
                provider: name.into(),
                op: "building HTTP client".into(),
                connect: false,
                message: e.to_string(),
            })?;
        Ok(HttpClient {
            provider: name.into(),
            base_url: cfg.base_url.trim_end_matches('/').to_owned(),
            key: cfg.api_key.clone(),
            headers: cfg
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            client,
            request_timeout: cfg.request_timeout,
            initial_backoff: retry.initial_backoff,
            max_backoff: retry.max_backoff,
            max_retries: 10,
            metrics,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    /// Adds the configured extra headers.
    pub fn with_headers(&self, mut req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        req
    }

    pub fn transport_error(&self, op: &str, e: reqwest::Error) -> ProviderError {
        ProviderError::Transport {
            provider: self.provider.clone(),
            op: op.into(),
            connect: e.is_connect(),
            // reqwest errors name the URL, never headers: no key leaks here.
            message: e.without_url().to_string(),
        }
    }

    pub fn decode_error(&self, op: &str, message: impl Into<String>) -> ProviderError {
        ProviderError::Decode {
            provider: self.provider.clone(),
            op: op.into(),
            message: message.into(),
        }
    }

    /// Sends a request; a non-2xx answer becomes [`ProviderError::Http`]
    /// with the provider's own error type and message. Every call is
    /// counted and timed (to the response headers) under the operation its
    /// method and path name, so adapters need not name it.
    pub async fn send(
        &self,
        op: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ProviderError> {
        let (client, request) = req.build_split();
        // A request that cannot be built is never sent, so never counted.
        let request = request.map_err(|e| self.transport_error(op, e))?;
        let operation = operation_of(request.method(), request.url().path());
        let started = Instant::now();
        let sent = client.execute(request).await;
        let seconds = started.elapsed().as_secs_f64();
        let resp = match sent {
            Ok(resp) => resp,
            Err(e) => {
                self.metrics
                    .provider_call(&self.provider, operation, "error", seconds);
                return Err(self.transport_error(op, e));
            }
        };
        self.metrics
            .provider_call(&self.provider, operation, resp.status().as_str(), seconds);
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(self.http_error(op, resp).await)
    }

    async fn http_error(&self, op: &str, resp: reqwest::Response) -> ProviderError {
        let status = resp.status().as_u16();
        let retry_after = retry_after(resp.headers());
        let text = resp.text().await.unwrap_or_default();
        let (kind, message) = parse_error_body(&text);
        ProviderError::Http {
            provider: self.provider.clone(),
            op: op.into(),
            status,
            kind,
            message: message.unwrap_or_else(|| text.chars().take(500).collect()),
            retry_after,
        }
    }

    /// Runs `call` until it succeeds or fails for good: transient failures
    /// (429, 5xx, transport) are retried after `retry-after` or an
    /// exponential backoff. Not for creates.
    pub async fn retrying<T, F, Fut>(&self, op: &str, mut call: F) -> Result<T, ProviderError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ProviderError>>,
    {
        let mut attempt = 0;
        loop {
            match call().await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() && attempt < self.max_retries => {
                    let wait = e.retry_after().unwrap_or_else(|| self.backoff(attempt));
                    tracing::warn!(provider = %self.provider, op, attempt, wait_ms = wait.as_millis() as u64, error = %e, "retrying provider call");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_backoff);
        // Full jitter keeps a fleet of instances from retrying in lockstep.
        exp.mul_f64(0.5 + rand::random::<f64>() * 0.5)
    }
}

/// The metric name of a provider call, from its method and URL path only:
/// ids in the path are skipped, so the label stays low-cardinality. The path
/// is read from its last `files` or `batches` segment, whatever the base
/// URL's prefix (`/v1`, `/openai/v1`, `/v1/messages`).
pub fn operation_of(method: &reqwest::Method, path: &str) -> &'static str {
    use reqwest::Method;
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let Some(at) = segments
        .iter()
        .rposition(|s| *s == "files" || *s == "batches")
    else {
        return "other";
    };
    let tail = &segments[at + 1..];
    let m = method;
    match (segments[at], tail) {
        ("files", []) if m == Method::POST => "upload_file",
        ("files", []) if m == Method::GET => "list_files",
        ("files", [_]) if m == Method::GET => "get_file",
        ("files", [_]) if m == Method::DELETE => "delete_file",
        ("files", [_, "content"]) if m == Method::GET => "download_file",
        ("batches", []) if m == Method::POST => "create_batch",
        ("batches", []) if m == Method::GET => "list_batches",
        // xAI: `POST /batches/{id}:cancel`.
        ("batches", [id]) if m == Method::POST && id.ends_with(":cancel") => "cancel_batch",
        ("batches", [_]) if m == Method::GET => "get_batch",
        ("batches", [_]) if m == Method::DELETE => "delete_batch",
        ("batches", [_, "cancel"]) if m == Method::POST => "cancel_batch",
        ("batches", [_, "results"]) if m == Method::GET => "get_results",
        ("batches", [_, "requests"]) if m == Method::POST => "add_requests",
        ("batches", [_, "requests"]) if m == Method::GET => "list_requests",
        _ => "other",
    }
}

/// The multipart form of a Files API upload (`purpose=batch`) of `batch`'s
/// spool file, streamed from disk as `<local batch id>.jsonl`. OpenAI and
/// xAI take the same form.
pub async fn batch_file_form(
    op: &str,
    batch: &SealedBatch,
) -> Result<reqwest::multipart::Form, ProviderError> {
    let io_err = |source| ProviderError::Io {
        op: op.to_owned(),
        path: batch.input_path.clone(),
        source,
    };
    let file = tokio::fs::File::open(&batch.input_path)
        .await
        .map_err(io_err)?;
    let len = file.metadata().await.map_err(io_err)?.len();
    let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
        file,
        256 * 1024,
    ));
    let part = reqwest::multipart::Part::stream_with_length(body, len)
        .file_name(format!("{}.jsonl", batch.id))
        .mime_str("application/jsonl")
        .expect("static mime type");
    Ok(reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part("file", part))
}

/// Unix seconds of the UUIDv7 inside a local batch id `bl-<p>-<uuid>`.
pub fn local_id_time(local_id: &str) -> Option<i64> {
    let uuid = local_id.splitn(3, '-').nth(2)?;
    let (secs, _) = uuid::Uuid::parse_str(uuid).ok()?.get_timestamp()?.to_unix();
    Some(secs as i64)
}

/// Unix seconds of an RFC 3339 instant or a bare date (xAI sends both).
pub fn parse_time(s: &str) -> Option<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp());
    }
    let d = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
    Some(d.and_hms_opt(0, 0, 0)?.and_utc().timestamp())
}

/// `retry-after-ms`, then `retry-after` (seconds or an HTTP date).
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
    {
        return Some(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    }
    let value = headers.get("retry-after")?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return Some(Duration::from_secs_f64(secs.max(0.0)));
    }
    let when = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = when.with_timezone(&chrono::Utc) - chrono::Utc::now();
    wait.to_std().ok()
}

/// The error type and message of any of the three providers' error bodies:
/// OpenAI `{"error":{"message","type","code"}}`, Anthropic
/// `{"type":"error","error":{"type","message"}}`, xAI `{"code","error"}`.
pub fn parse_error_body(text: &str) -> (Option<String>, Option<String>) {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
        return (None, None);
    };
    let str_of = |v: &serde_json::Value| v.as_str().map(str::to_owned);
    match &v["error"] {
        serde_json::Value::Object(e) => {
            let kind = e
                .get("code")
                .and_then(str_of)
                .or_else(|| e.get("type").and_then(str_of));
            (kind, e.get("message").and_then(str_of))
        }
        serde_json::Value::String(message) => (str_of(&v["code"]), Some(message.clone())),
        _ => (None, str_of(&v["message"])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_of_every_provider_parse() {
        // OpenAI, https://platform.openai.com/docs/guides/error-codes
        let (k, m) = parse_error_body(
            r#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#,
        );
        assert_eq!(k.as_deref(), Some("rate_limit_exceeded"));
        assert_eq!(m.as_deref(), Some("Rate limit reached"));
        // Anthropic, https://platform.claude.com/docs/en/api/errors
        let (k, m) = parse_error_body(
            r#"{"type":"error","error":{"type":"not_found_error","message":"The requested resource could not be found."},"request_id":"req_1"}"#,
        );
        assert_eq!(k.as_deref(), Some("not_found_error"));
        assert_eq!(
            m.as_deref(),
            Some("The requested resource could not be found.")
        );
        // xAI (PROVIDERS.md 3.8)
        let (k, m) = parse_error_body(
            r#"{"code":"Client specified an invalid argument","error":"Incorrect API key provided: xa***yz."}"#,
        );
        assert_eq!(k.as_deref(), Some("Client specified an invalid argument"));
        assert!(m.unwrap().starts_with("Incorrect API key"));
        assert_eq!(parse_error_body("<html>"), (None, None));
    }

    #[test]
    fn create_failures_classify() {
        let http = |status: u16| ProviderError::Http {
            provider: "p".into(),
            op: "create".into(),
            status,
            kind: None,
            message: String::new(),
            retry_after: None,
        };
        assert!(matches!(
            CreateError::classify(http(400)),
            CreateError::Refused(_)
        ));
        assert!(matches!(
            CreateError::classify(http(429)),
            CreateError::Refused(_)
        ));
        assert!(matches!(
            CreateError::classify(http(408)),
            CreateError::Ambiguous(_)
        ));
        assert!(matches!(
            CreateError::classify(http(409)),
            CreateError::Ambiguous(_)
        ));
        assert!(matches!(
            CreateError::classify(http(502)),
            CreateError::Ambiguous(_)
        ));
        let transport = |connect| ProviderError::Transport {
            provider: "p".into(),
            op: "create".into(),
            connect,
            message: String::new(),
        };
        assert!(matches!(
            CreateError::classify(transport(true)),
            CreateError::Refused(_)
        ));
        assert!(matches!(
            CreateError::classify(transport(false)),
            CreateError::Ambiguous(_)
        ));
    }

    #[test]
    fn operations_are_named_by_method_and_path_template() {
        let cases = [
            // OpenAI and compatible servers, any prefix.
            ("POST /v1/files", "upload_file"),
            ("GET /openai/v1/files", "list_files"),
            ("GET /v1/files/file-abc123", "get_file"),
            ("GET /v1/files/file-abc123/content", "download_file"),
            ("DELETE /openai/v1/files/file-abc123", "delete_file"),
            ("POST /openai/v1/batches", "create_batch"),
            ("GET /v1/batches", "list_batches"),
            ("GET /v1/batches/batch_abc123", "get_batch"),
            ("POST /v1/batches/batch_abc123/cancel", "cancel_batch"),
            // Anthropic.
            ("POST /v1/messages/batches", "create_batch"),
            ("GET /anthropic/v1/messages/batches", "list_batches"),
            ("GET /v1/messages/batches/msgbatch_1", "get_batch"),
            (
                "POST /v1/messages/batches/msgbatch_1/cancel",
                "cancel_batch",
            ),
            ("GET /v1/messages/batches/msgbatch_1/results", "get_results"),
            ("DELETE /v1/messages/batches/msgbatch_1", "delete_batch"),
            // xAI.
            ("POST /xai/v1/batches/batch_9:cancel", "cancel_batch"),
            ("GET /v1/batches/batch_9/results", "get_results"),
            ("POST /v1/batches/batch_9/requests", "add_requests"),
            ("GET /v1/batches/batch_9/requests", "list_requests"),
            // Nothing known.
            ("GET /v1/models", "other"),
            ("PUT /v1/batches/batch_9", "other"),
            ("GET /", "other"),
        ];
        for (call, want) in cases {
            let (method, path) = call.split_once(' ').unwrap();
            let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            assert_eq!(operation_of(&method, path), want, "{call}");
        }
    }

    #[tokio::test]
    async fn every_call_is_counted_by_operation_and_status() {
        use axum::routing::{get, post};
        let app = axum::Router::new()
            .route("/v1/batches/{id}", get(|| async { "{}" }))
            .route(
                "/v1/batches",
                post(|| async { (axum::http::StatusCode::SERVICE_UNAVAILABLE, "{}") }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let defaults =
            crate::config::Config::load_from(None, Vec::<(String, String)>::new()).unwrap();
        let mut cfg = defaults.providers["openai"].clone();
        cfg.base_url = format!("http://{addr}/v1");
        cfg.request_timeout = Duration::from_secs(5);
        let retry = defaults.retry.clone();
        let metrics = Metrics::new();
        let http = HttpClient::new("sim", &cfg, &retry, metrics.clone()).unwrap();
        http.send("get", http.client.get(http.url("/batches/batch_1")))
            .await
            .unwrap();
        let err = http
            .send("create", http.client.post(http.url("/batches")))
            .await
            .unwrap_err();
        assert_eq!(err.status(), Some(503));
        // Nothing listens on port 9 (discard): a transport failure.
        let dead = HttpClient::new(
            "dead",
            &ProviderConfig {
                base_url: "http://127.0.0.1:9/v1".into(),
                ..cfg.clone()
            },
            &retry,
            metrics.clone(),
        )
        .unwrap();
        dead.send("get", dead.client.get(dead.url("/batches/batch_2")))
            .await
            .unwrap_err();
        let text = metrics.render();
        for line in [
            r#"batchline_provider_requests_total{operation="get_batch",provider="sim",status="200"} 1"#,
            r#"batchline_provider_requests_total{operation="create_batch",provider="sim",status="503"} 1"#,
            r#"batchline_provider_requests_total{operation="get_batch",provider="dead",status="error"} 1"#,
            r#"batchline_provider_request_duration_seconds_count{operation="get_batch",provider="sim"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn retry_after_prefers_milliseconds() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", "3".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert("retry-after-ms", "250".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(250)));
    }
}
