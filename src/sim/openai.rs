//! The OpenAI Files + Batch API, simulated (PROVIDERS.md section 1).
//!
//! Serves `POST/GET /files`, `GET/DELETE /files/{id}`,
//! `GET /files/{id}/content`, `POST/GET /batches`, `GET /batches/{id}` and
//! `POST /batches/{id}/cancel` with OpenAI's paths, objects, status machine,
//! limits, auth and error bodies, so the official SDKs work against it
//! unchanged. A background task per batch walks the status machine
//! (`lifecycle`); completions are deterministic (`completions`), so tests can
//! compute every expected result line.
//!
//! It must never hold a whole file in memory (uploads stream to disk, results
//! stream from disk) and never panic on request data: bad input gets the
//! 400 OpenAI would send.
//!
//! With a data directory, every file's and batch's state is also a record on
//! disk (`openai/files/`, `openai/batches/`); a simulator started on the same
//! directory reloads them and resumes every unfinished batch (`lifecycle`).

mod completions;
mod lifecycle;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::multipart::{Field, MultipartError, MultipartRejection};
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Multipart, OriginalUri, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::io::AsyncWriteExt;
use tokio_util::io::ReaderStream;
use tokio_util::sync::CancellationToken;

use super::store::{self, Records, Slot};
use super::{lock, random_base62, random_hex, unix_millis, unix_now, CallFault, Sim};

pub use completions::{
    chat_reply, dropped_result, injected_error, injected_error_status, invalid_line, response_body,
};

/// Endpoints a batch may target (CreateBatchRequest.endpoint).
pub const BATCH_ENDPOINTS: [&str; 8] = [
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/videos",
];
/// Largest upload the Files API takes.
const MAX_UPLOAD_BYTES: u64 = 512 * 1024 * 1024;
/// Slack over [`MAX_UPLOAD_BYTES`] for the multipart framing and form fields.
const MULTIPART_OVERHEAD_BYTES: usize = 1024 * 1024;
/// Batch input files and result files expire after 30 days by default.
const DEFAULT_FILE_TTL_SECS: i64 = 30 * 24 * 3600;
/// Range of `expires_after[seconds]` / `output_expires_after.seconds`.
const FILE_TTL_RANGE_SECS: std::ops::RangeInclusive<i64> = 3600..=2_592_000;
/// A batch's completion window, the only one OpenAI offers.
const COMPLETION_WINDOW_SECS: i64 = 24 * 3600;
const METADATA_MAX_PAIRS: usize = 16;
const METADATA_MAX_KEY_CHARS: usize = 64;
const METADATA_MAX_VALUE_CHARS: usize = 512;
/// Organization named in messages that quote one.
const ORGANIZATION: &str = "org-batchline-sim";

/// The OpenAI sub-router, to be nested under a `/v1`-style prefix.
pub(crate) fn router(sim: Arc<Sim>) -> io::Result<Router> {
    let dir = sim.provider_dir("openai")?;
    let state = Arc::new(OpenAi {
        file_records: Records::open(&sim, &dir, "files")?,
        batch_records: Records::open(&sim, &dir, "batches")?,
        dir,
        sim,
        files: Mutex::new(Listing::default()),
        batches: Mutex::new(Listing::default()),
    });
    reload(&state)?;
    let upload_limit = usize::try_from(MAX_UPLOAD_BYTES)
        .unwrap_or(usize::MAX)
        .saturating_add(MULTIPART_OVERHEAD_BYTES);
    Ok(Router::new()
        .route(
            "/files",
            post(upload_file)
                .layer(DefaultBodyLimit::max(upload_limit))
                .get(list_files),
        )
        .route("/files/{id}", get(retrieve_file).delete(delete_file))
        .route("/files/{id}/content", get(file_content))
        .route("/batches", post(create_batch).get(list_batches))
        .route("/batches/{id}", get(retrieve_batch))
        .route("/batches/{id}/cancel", post(cancel_batch))
        .fallback(invalid_url)
        .method_not_allowed_fallback(invalid_url)
        .layer(middleware::from_fn_with_state(Arc::clone(&state), gate))
        .with_state(state))
}

/// State of the simulated OpenAI account.
struct OpenAi {
    sim: Arc<Sim>,
    /// Where uploaded and result files live, one `<file-id>.jsonl` each,
    /// plus each running batch's own copy of its input when durable.
    dir: PathBuf,
    files: Mutex<Listing<FileObject>>,
    batches: Mutex<Listing<BatchEntry>>,
    /// Durable records of files and batches (nothing without a data_dir).
    file_records: Records,
    batch_records: Records,
}

impl OpenAi {
    fn file_path(&self, file_id: &str) -> PathBuf {
        self.dir.join(format!("{file_id}.jsonl"))
    }

    /// A running batch's own copy of its input file (durable mode only),
    /// read again if the batch is resumed after a restart.
    fn input_copy_path(&self, batch_id: &str) -> PathBuf {
        self.dir.join(format!("{batch_id}.input.jsonl"))
    }

    /// Registers a file written to [`Self::file_path`], durably first.
    async fn add_file(self: &Arc<Self>, file: FileObject) -> io::Result<()> {
        let record = FileRecord {
            order: self.sim.order_stamp(),
            file,
        };
        let state = Arc::clone(self);
        let record = self
            .sim
            .blocking(move || {
                state.file_records.write(&record.file.id, &record)?;
                Ok(record)
            })
            .await?;
        lock(&self.files).insert(record.file.id.clone(), record.file);
        Ok(())
    }

    fn batch(&self, id: &str) -> Option<Batch> {
        lock(&self.batches).get(id).map(|entry| entry.batch.clone())
    }

    /// The batch and its lifecycle state.
    fn batch_and_life(&self, id: &str) -> Option<(Batch, Life)> {
        lock(&self.batches)
            .get(id)
            .map(|entry| (entry.batch.clone(), entry.life.clone()))
    }

    /// Applies `change` to the batch under the lock and returns what it
    /// returned, or `None` if the batch is unknown.
    fn update_batch<R>(&self, id: &str, change: impl FnOnce(&mut Batch) -> R) -> Option<R> {
        lock(&self.batches)
            .get_mut(id)
            .map(|entry| change(&mut entry.batch))
    }

    /// Like [`Self::update_batch`], with the lifecycle state too.
    fn update<R>(&self, id: &str, change: impl FnOnce(&mut Batch, &mut Life) -> R) -> Option<R> {
        lock(&self.batches)
            .get_mut(id)
            .map(|entry| change(&mut entry.batch, &mut entry.life))
    }

    /// Writes the batch's record as it is now (when durable); once the
    /// batch is terminal, its copy of the input goes.
    async fn save(self: &Arc<Self>, id: &str) -> io::Result<()> {
        let snapshot = {
            let batches = lock(&self.batches);
            let Some(entry) = batches.get(id) else {
                return Ok(());
            };
            let record = BatchRecordOut {
                batch: &entry.batch,
                life: &entry.life,
            };
            let snapshot = self.batch_records.snapshot(id, &entry.slot, &record)?;
            snapshot.map(|snapshot| (snapshot, entry.batch.status.is_terminal()))
        };
        let Some((snapshot, terminal)) = snapshot else {
            return Ok(());
        };
        let input_copy = self.input_copy_path(id);
        self.sim
            .blocking(move || {
                snapshot.write()?;
                if terminal {
                    store::remove_if_present(&input_copy)?;
                }
                Ok(())
            })
            .await
    }
}

/// Loads the files and batches a simulator on the same data directory left
/// behind, and resumes every batch that had not finished.
fn reload(state: &Arc<OpenAi>) -> io::Result<()> {
    if !state.batch_records.durable() {
        return Ok(());
    }
    store::remove_parts(&state.dir)?;
    let mut files: Vec<FileRecord> = state.file_records.load()?;
    files.sort_by_key(|record| record.order);
    {
        let mut listing = lock(&state.files);
        for record in files {
            state.sim.saw_order_stamp(record.order);
            listing.insert(record.file.id.clone(), record.file);
        }
    }
    let mut batches: Vec<BatchRecordIn> = state.batch_records.load()?;
    batches.sort_by_key(|record| record.life.order);
    let mut resumed = Vec::new();
    for BatchRecordIn { batch, life } in batches {
        state.sim.saw_order_stamp(life.order);
        // A crash between the record and the ledger event loses nothing.
        state.sim.record_batch_created(&batch.id)?;
        let cancel = CancellationToken::new();
        if batch.status == BatchStatus::Cancelling {
            cancel.cancel();
        }
        if !batch.status.is_terminal() {
            resumed.push((batch.id.clone(), cancel.clone()));
        }
        lock(&state.batches).insert(
            batch.id.clone(),
            BatchEntry {
                batch,
                life,
                cancel,
                slot: Arc::default(),
            },
        );
    }
    for (id, cancel) in resumed {
        tracing::debug!(batch_id = %id, "sim openai: resuming batch");
        state
            .sim
            .spawn(lifecycle::drive(Arc::clone(state), id, cancel));
    }
    Ok(())
}

/// Objects kept in creation order, for OpenAI's cursor lists.
struct Listing<T> {
    by_id: HashMap<String, T>,
    /// Ids oldest first.
    order: Vec<String>,
}

impl<T> Default for Listing<T> {
    fn default() -> Self {
        Self {
            by_id: HashMap::new(),
            order: Vec::new(),
        }
    }
}

impl<T> Listing<T> {
    /// Adds `item` as the newest, or replaces the item with its id in place.
    fn insert(&mut self, id: String, item: T) {
        if let Some(existing) = self.by_id.get_mut(&id) {
            *existing = item;
            return;
        }
        self.order.push(id.clone());
        self.by_id.insert(id, item);
    }

    fn get(&self, id: &str) -> Option<&T> {
        self.by_id.get(id)
    }

    fn get_mut(&mut self, id: &str) -> Option<&mut T> {
        self.by_id.get_mut(id)
    }

    fn remove(&mut self, id: &str) -> Option<T> {
        let item = self.by_id.remove(id)?;
        self.order.retain(|other| other != id);
        Some(item)
    }

    /// One page of items that pass `keep`, newest first unless `oldest_first`,
    /// starting after the item `after`; also says whether more follow.
    fn page(
        &self,
        oldest_first: bool,
        after: Option<&str>,
        limit: usize,
        keep: impl Fn(&T) -> bool,
    ) -> (Vec<&T>, bool) {
        let ordered: Box<dyn Iterator<Item = &String>> = if oldest_first {
            Box::new(self.order.iter())
        } else {
            Box::new(self.order.iter().rev())
        };
        let mut ordered = ordered.peekable();
        if let Some(after) = after {
            // An unknown cursor yields an empty page rather than restarting.
            for id in ordered.by_ref() {
                if id == after {
                    break;
                }
            }
        }
        let mut matching = ordered
            .filter_map(|id| self.by_id.get(id))
            .filter(|item| keep(item));
        let page: Vec<&T> = matching.by_ref().take(limit).collect();
        let has_more = matching.next().is_some();
        (page, has_more)
    }
}

/// OpenAI's File object.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FileObject {
    id: String,
    #[serde(skip_deserializing, default = "file_object")]
    object: &'static str,
    bytes: u64,
    created_at: i64,
    expires_at: Option<i64>,
    filename: String,
    purpose: String,
    #[serde(skip_deserializing, default = "processed")]
    status: &'static str,
    status_details: Option<String>,
}

fn file_object() -> &'static str {
    "file"
}

fn processed() -> &'static str {
    "processed"
}

impl FileObject {
    fn new(id: String, bytes: u64, filename: String, purpose: &str, ttl_secs: i64) -> Self {
        let created_at = unix_now();
        Self {
            id,
            object: "file",
            bytes,
            created_at,
            expires_at: Some(created_at + ttl_secs),
            filename,
            purpose: purpose.to_owned(),
            status: "processed",
            status_details: None,
        }
    }
}

/// A file's durable record.
#[derive(Serialize, Deserialize)]
struct FileRecord {
    /// Orders the files list across restarts.
    order: u64,
    file: FileObject,
}

struct BatchEntry {
    batch: Batch,
    life: Life,
    /// Fired by `POST /batches/{id}/cancel`; the batch's task listens.
    cancel: CancellationToken,
    /// Orders the saves of the batch's record.
    slot: Arc<Slot>,
}

/// What a batch's lifecycle needs to carry on after a restart, kept in its
/// record beside the Batch object. Times are Unix milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Life {
    /// Orders the batches list across restarts.
    order: u64,
    /// How long result files live (seconds).
    output_ttl_secs: i64,
    /// What the dice decided at create.
    fate: lifecycle::Fate,
    created_ms: i64,
    in_progress_ms: Option<i64>,
    finalizing_ms: Option<i64>,
    /// When the client asked to cancel.
    cancel_ms: Option<i64>,
    /// Which requests run, fixed before any does.
    plan: Option<lifecycle::Plan>,
    /// The published result files and counts, until the batch settles.
    outcome: Option<lifecycle::Outcome>,
}

/// A batch's durable record, as written.
#[derive(Serialize)]
struct BatchRecordOut<'a> {
    batch: &'a Batch,
    life: &'a Life,
}

/// A batch's durable record, as read back.
#[derive(Deserialize)]
struct BatchRecordIn {
    batch: Batch,
    life: Life,
}

/// OpenAI's Batch object.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Batch {
    id: String,
    #[serde(skip_deserializing, default = "batch_object")]
    object: &'static str,
    endpoint: String,
    model: Option<String>,
    errors: Option<BatchErrors>,
    input_file_id: String,
    #[serde(skip_deserializing, default = "completion_window")]
    completion_window: &'static str,
    status: BatchStatus,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    created_at: i64,
    in_progress_at: Option<i64>,
    expires_at: Option<i64>,
    finalizing_at: Option<i64>,
    completed_at: Option<i64>,
    failed_at: Option<i64>,
    expired_at: Option<i64>,
    cancelling_at: Option<i64>,
    cancelled_at: Option<i64>,
    request_counts: RequestCounts,
    usage: BatchUsage,
    metadata: Option<BTreeMap<String, String>>,
}

fn batch_object() -> &'static str {
    "batch"
}

fn completion_window() -> &'static str {
    "24h"
}

fn list_object() -> &'static str {
    "list"
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum BatchStatus {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl BatchStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Validating => "validating",
            Self::Failed => "failed",
            Self::InProgress => "in_progress",
            Self::Finalizing => "finalizing",
            Self::Completed => "completed",
            Self::Expired => "expired",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
        }
    }

    fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Failed | Self::Completed | Self::Expired | Self::Cancelled
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct BatchErrors {
    #[serde(skip_deserializing, default = "list_object")]
    object: &'static str,
    data: Vec<BatchError>,
}

/// One entry of a failed batch's `errors.data`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct BatchError {
    code: String,
    message: String,
    param: Option<String>,
    line: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct RequestCounts {
    total: u64,
    completed: u64,
    failed: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct BatchUsage {
    input_tokens: u64,
    input_tokens_details: CachedTokens,
    output_tokens: u64,
    output_tokens_details: ReasoningTokens,
    total_tokens: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct CachedTokens {
    cached_tokens: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct ReasoningTokens {
    reasoning_tokens: u64,
}

impl BatchUsage {
    fn new(input_tokens: u64, output_tokens: u64) -> Self {
        Self {
            input_tokens,
            output_tokens,
            total_tokens: input_tokens + output_tokens,
            ..Self::default()
        }
    }
}

/// The id of the API call being served, also sent as `x-request-id`.
#[derive(Debug, Clone)]
struct RequestId(String);

/// Runs before every API route: assigns the request id, checks the bearer
/// key, then rolls the call-fault dice.
async fn gate(State(state): State<Arc<OpenAi>>, mut request: Request, next: Next) -> Response {
    let request_id = format!("req_{}", random_hex(32));
    request
        .extensions_mut()
        .insert(RequestId(request_id.clone()));
    let mut response = match authorize(request.headers(), state.sim.config().api_key.as_deref()) {
        Err(refusal) => refusal.into_response(),
        Ok(()) => match state.sim.roll_call_fault() {
            Some(CallFault::RateLimited) => ApiError::rate_limited(&state.sim).into_response(),
            Some(CallFault::ServerError) => ApiError::server_error(&request_id).into_response(),
            None => next.run(request).await,
        },
    };
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response
            .headers_mut()
            .insert(HeaderName::from_static("x-request-id"), value);
    }
    response
}

fn authorize(headers: &HeaderMap, expected: Option<&str>) -> Result<(), ApiError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            let (scheme, token) = value.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|token| !token.is_empty());
    match (presented, expected) {
        (None, _) => Err(ApiError::missing_api_key()),
        (Some(key), Some(expected)) if key != expected => Err(ApiError::incorrect_api_key(key)),
        (Some(_), _) => Ok(()),
    }
}

async fn invalid_url(method: Method, OriginalUri(uri): OriginalUri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("Invalid URL ({method} {})", uri.path()),
    )
}

async fn upload_file(
    State(state): State<Arc<OpenAi>>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Json<FileObject>, ApiError> {
    let mut multipart = multipart
        .map_err(|rejection| ApiError::invalid_request(rejection.body_text(), None, None))?;
    let id = format!("file-{}", random_base62(22));
    let mut upload = PartialUpload::new(state.file_path(&id));
    let mut received: Option<(String, u64)> = None;
    let mut purpose: Option<String> = None;
    let mut anchor: Option<String> = None;
    let mut seconds: Option<String> = None;
    while let Some(field) = multipart.next_field().await.map_err(multipart_error)? {
        match field.name().unwrap_or_default() {
            "file" => {
                if received.is_some() {
                    return Err(ApiError::invalid_request(
                        "Only one 'file' may be uploaded per request.",
                        Some("file"),
                        None,
                    ));
                }
                let filename = field.file_name().unwrap_or("file").to_owned();
                let bytes = upload.write(field).await?;
                received = Some((filename, bytes));
            }
            "purpose" => purpose = Some(field.text().await.map_err(multipart_error)?),
            "expires_after[anchor]" => {
                anchor = Some(field.text().await.map_err(multipart_error)?);
            }
            "expires_after[seconds]" => {
                seconds = Some(field.text().await.map_err(multipart_error)?);
            }
            // Other form fields are ignored, as extra multipart fields are.
            _ => {}
        }
    }

    let purpose = purpose.ok_or_else(|| ApiError::missing_parameter("purpose"))?;
    if purpose != "batch" {
        return Err(ApiError::invalid_request(
            format!(
                "Invalid value for 'purpose': '{purpose}'. This simulator serves the Batch API only; the supported value is 'batch'."
            ),
            Some("purpose"),
            Some("invalid_value"),
        ));
    }
    let (filename, bytes) = received.ok_or_else(|| ApiError::missing_parameter("file"))?;
    if !filename.ends_with(".jsonl") {
        return Err(ApiError::invalid_request(
            "Invalid file format for Batch API. Must be .jsonl",
            Some("file"),
            None,
        ));
    }
    let ttl = file_ttl(anchor.as_deref(), seconds.as_deref(), "expires_after")?;
    let file = FileObject::new(id, bytes, filename, "batch", ttl);
    state
        .add_file(file.clone())
        .await
        .map_err(|err| ApiError::internal("recording the file", &err))?;
    upload.keep();
    tracing::debug!(file_id = %file.id, bytes, "sim openai: file uploaded");
    Ok(Json(file))
}

/// An upload being streamed to disk; deleted unless [`Self::keep`] is called.
struct PartialUpload {
    path: PathBuf,
    keep: bool,
}

impl PartialUpload {
    fn new(path: PathBuf) -> Self {
        Self { path, keep: false }
    }

    /// Streams the field to disk chunk by chunk, returning its size.
    async fn write(&mut self, mut field: Field<'_>) -> Result<u64, ApiError> {
        let file = tokio::fs::File::create(&self.path)
            .await
            .map_err(|err| ApiError::internal("creating the upload file", &err))?;
        let mut out = tokio::io::BufWriter::with_capacity(256 * 1024, file);
        let mut bytes: u64 = 0;
        while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
            bytes += chunk.len() as u64;
            if bytes > MAX_UPLOAD_BYTES {
                return Err(ApiError::invalid_request(
                    format!(
                        "File is too large. The maximum file size is {} MB.",
                        MAX_UPLOAD_BYTES / (1024 * 1024)
                    ),
                    Some("file"),
                    None,
                ));
            }
            out.write_all(&chunk)
                .await
                .map_err(|err| ApiError::internal("writing the upload", &err))?;
        }
        out.flush()
            .await
            .map_err(|err| ApiError::internal("writing the upload", &err))?;
        // Durable before the file is acknowledged.
        out.get_ref()
            .sync_data()
            .await
            .map_err(|err| ApiError::internal("writing the upload", &err))?;
        Ok(bytes)
    }

    fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for PartialUpload {
    fn drop(&mut self) {
        if !self.keep {
            // A single unlink; the file may not exist if no `file` part came.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn multipart_error(err: MultipartError) -> ApiError {
    ApiError::invalid_request(err.body_text(), None, None)
}

/// Seconds a file lives, from an `{anchor, seconds}` expiry or the default.
fn file_ttl(
    anchor: Option<&str>,
    seconds: Option<&str>,
    param: &'static str,
) -> Result<i64, ApiError> {
    match (anchor, seconds) {
        (None, None) => Ok(DEFAULT_FILE_TTL_SECS),
        (Some("created_at"), Some(seconds)) => seconds
            .trim()
            .parse::<i64>()
            .ok()
            .filter(|seconds| FILE_TTL_RANGE_SECS.contains(seconds))
            .ok_or_else(|| {
                ApiError::invalid_request(
                    format!(
                        "Invalid '{param}.seconds': expected an integer between {} and {}, got '{seconds}'.",
                        FILE_TTL_RANGE_SECS.start(),
                        FILE_TTL_RANGE_SECS.end()
                    ),
                    Some(param),
                    Some("invalid_value"),
                )
            }),
        (Some(other), Some(_)) => Err(ApiError::invalid_request(
            format!("Invalid '{param}.anchor': '{other}'. The supported anchor is 'created_at'."),
            Some(param),
            Some("invalid_value"),
        )),
        _ => Err(ApiError::invalid_request(
            format!("'{param}' needs both 'anchor' and 'seconds'."),
            Some(param),
            Some("missing_required_parameter"),
        )),
    }
}

async fn list_files(
    State(state): State<Arc<OpenAi>>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) =
        query.map_err(|rejection| ApiError::invalid_request(rejection.body_text(), None, None))?;
    let limit = parse_limit(&query, 1, 10_000, 10_000)?;
    let oldest_first = match query.get("order").map(String::as_str) {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(other) => {
            return Err(ApiError::invalid_request(
                format!(
                    "Invalid value for 'order': '{other}'. Supported values are: 'asc' and 'desc'."
                ),
                Some("order"),
                Some("invalid_value"),
            ))
        }
    };
    let purpose = query.get("purpose").map(String::as_str);
    let files = lock(&state.files);
    let (page, has_more) = files.page(
        oldest_first,
        query.get("after").map(String::as_str),
        limit,
        |file| purpose.is_none_or(|purpose| file.purpose == purpose),
    );
    Ok(Json(list_envelope(&page, |file| &file.id, has_more)))
}

async fn retrieve_file(
    State(state): State<Arc<OpenAi>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<FileObject>, ApiError> {
    let id = path_id(id)?;
    lock(&state.files)
        .get(&id)
        .map(|file| Json(file.clone()))
        .ok_or_else(|| ApiError::no_such_file(&id))
}

async fn file_content(
    State(state): State<Arc<OpenAi>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = path_id(id)?;
    if lock(&state.files).get(&id).is_none() {
        return Err(ApiError::no_such_file(&id));
    }
    let file = match tokio::fs::File::open(state.file_path(&id)).await {
        Ok(file) => file,
        // Deleted between the lookup and the open.
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Err(ApiError::no_such_file(&id))
        }
        Err(err) => return Err(ApiError::internal("opening the file", &err)),
    };
    let length = file
        .metadata()
        .await
        .map_err(|err| ApiError::internal("reading the file size", &err))?
        .len();
    let body = Body::from_stream(ReaderStream::with_capacity(file, 64 * 1024));
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (header::CONTENT_LENGTH, HeaderValue::from(length)),
        ],
        body,
    )
        .into_response())
}

async fn delete_file(
    State(state): State<Arc<OpenAi>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = path_id(id)?;
    if lock(&state.files).remove(&id).is_none() {
        return Err(ApiError::no_such_file(&id));
    }
    // A batch already reading the file keeps its open handle (and, when
    // durable, its own copy), as a provider keeps its own; later readers
    // find it gone.
    let (records, path) = (Arc::clone(&state), state.file_path(&id));
    let file_id = id.clone();
    state
        .sim
        .blocking(move || {
            records.file_records.remove(&file_id)?;
            store::remove_if_present(&path)
        })
        .await
        .map_err(|err| ApiError::internal("deleting the file", &err))?;
    Ok(Json(json!({"id": id, "object": "file", "deleted": true})))
}

async fn create_batch(
    State(state): State<Arc<OpenAi>>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Batch>, ApiError> {
    let body =
        body.map_err(|rejection| ApiError::invalid_request(rejection.body_text(), None, None))?;
    let request = CreateBatch::parse(&body)?;
    match lock(&state.files).get(&request.input_file_id) {
        None => return Err(ApiError::cannot_find_file(&request.input_file_id)),
        Some(file) if file.purpose != "batch" => {
            return Err(ApiError::invalid_request(
                format!(
                    "The input file {} has purpose '{}'; a batch input file must be uploaded with purpose 'batch'.",
                    request.input_file_id, file.purpose
                ),
                Some("input_file_id"),
                None,
            ))
        }
        Some(_) => {}
    }

    let created_at = unix_now();
    let batch = Batch {
        id: format!("batch_{}", random_hex(32)),
        object: "batch",
        endpoint: request.endpoint,
        model: None,
        errors: None,
        input_file_id: request.input_file_id,
        completion_window: "24h",
        status: BatchStatus::Validating,
        output_file_id: None,
        error_file_id: None,
        created_at,
        in_progress_at: None,
        expires_at: Some(created_at + COMPLETION_WINDOW_SECS),
        finalizing_at: None,
        completed_at: None,
        failed_at: None,
        expired_at: None,
        cancelling_at: None,
        cancelled_at: None,
        request_counts: RequestCounts::default(),
        usage: BatchUsage::default(),
        metadata: request.metadata,
    };
    let config = state.sim.config();
    let fate = lifecycle::Fate {
        fail: state.sim.roll_batch_fate(config.fail_rate),
        token_limit: state.sim.roll_batch_fate(config.token_limit_rate),
        expire: state.sim.roll_batch_fate(config.expire_rate),
    };
    let life = Life {
        order: state.sim.order_stamp(),
        output_ttl_secs: request.output_ttl_secs,
        fate,
        created_ms: unix_millis(),
        ..Life::default()
    };
    let cancel = CancellationToken::new();
    lock(&state.batches).insert(
        batch.id.clone(),
        BatchEntry {
            batch: batch.clone(),
            life,
            cancel: cancel.clone(),
            slot: Arc::default(),
        },
    );
    // On its own task, so a client hanging up cannot leave it half done.
    let start = tokio::spawn(start_batch(Arc::clone(&state), batch.id.clone(), cancel));
    start
        .await
        .map_err(io::Error::other)
        .and_then(|started| started)
        .map_err(|err| ApiError::internal("recording the batch", &err))?;
    tracing::debug!(batch_id = %batch.id, ?fate, "sim openai: batch created");

    if state.sim.roll_ambiguous_create() {
        // The batch exists and runs; only the answer is lost.
        return Err(ApiError::server_error(&request_id));
    }
    Ok(Json(batch))
}

/// Records a new batch (its record first: a batch the ledger counts always
/// exists, and a reload records what a crash kept from the ledger) and
/// starts its task; forgets it again if it cannot be recorded.
async fn start_batch(state: Arc<OpenAi>, id: String, cancel: CancellationToken) -> io::Result<()> {
    let sim = Arc::clone(&state.sim);
    let batch_id = id.clone();
    let recorded = match state.save(&id).await {
        Ok(()) => {
            state
                .sim
                .blocking(move || sim.record_batch_created(&batch_id))
                .await
        }
        Err(err) => Err(err),
    };
    if let Err(err) = recorded {
        lock(&state.batches).remove(&id);
        let _ = state.batch_records.remove(&id);
        return Err(err);
    }
    state
        .sim
        .spawn(lifecycle::drive(Arc::clone(&state), id, cancel));
    Ok(())
}

/// A validated `POST /batches` body.
struct CreateBatch {
    input_file_id: String,
    endpoint: String,
    metadata: Option<BTreeMap<String, String>>,
    output_ttl_secs: i64,
}

impl CreateBatch {
    fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let value: Value =
            serde_json::from_slice(body).map_err(|_| ApiError::unparseable_json())?;
        let Value::Object(fields) = value else {
            return Err(ApiError::invalid_request(
                "The request body must be a JSON object.",
                None,
                None,
            ));
        };
        const KNOWN: [&str; 5] = [
            "input_file_id",
            "endpoint",
            "completion_window",
            "metadata",
            "output_expires_after",
        ];
        if let Some(unknown) = fields.keys().find(|key| !KNOWN.contains(&key.as_str())) {
            return Err(ApiError::invalid_request(
                format!("Unrecognized request argument supplied: {unknown}"),
                None,
                None,
            ));
        }
        let input_file_id = required_string(&fields, "input_file_id")?;
        let endpoint = required_string(&fields, "endpoint")?;
        if !BATCH_ENDPOINTS.contains(&endpoint.as_str()) {
            return Err(ApiError::invalid_value(
                "endpoint",
                &endpoint,
                &BATCH_ENDPOINTS,
            ));
        }
        let window = required_string(&fields, "completion_window")?;
        if window != "24h" {
            return Err(ApiError::invalid_value(
                "completion_window",
                &window,
                &["24h"],
            ));
        }
        let metadata = match fields.get("metadata") {
            None | Some(Value::Null) => None,
            Some(value) => Some(parse_metadata(value)?),
        };
        let output_ttl_secs = match fields.get("output_expires_after") {
            None | Some(Value::Null) => DEFAULT_FILE_TTL_SECS,
            Some(Value::Object(expiry)) => {
                let anchor = expiry.get("anchor").and_then(Value::as_str);
                let seconds = expiry.get("seconds").map(|seconds| match seconds {
                    Value::String(text) => text.clone(),
                    other => other.to_string(),
                });
                file_ttl(
                    Some(anchor.unwrap_or_default()),
                    Some(seconds.as_deref().unwrap_or_default()),
                    "output_expires_after",
                )?
            }
            Some(_) => {
                return Err(ApiError::invalid_type("output_expires_after", "an object"));
            }
        };
        Ok(Self {
            input_file_id,
            endpoint,
            metadata,
            output_ttl_secs,
        })
    }
}

fn required_string(fields: &Map<String, Value>, name: &'static str) -> Result<String, ApiError> {
    match fields.get(name) {
        None | Some(Value::Null) => Err(ApiError::missing_parameter(name)),
        Some(Value::String(text)) => Ok(text.clone()),
        Some(_) => Err(ApiError::invalid_type(name, "a string")),
    }
}

fn parse_metadata(value: &Value) -> Result<BTreeMap<String, String>, ApiError> {
    let Value::Object(pairs) = value else {
        return Err(ApiError::invalid_type("metadata", "an object"));
    };
    if pairs.len() > METADATA_MAX_PAIRS {
        return Err(ApiError::invalid_request(
            format!(
                "Invalid 'metadata': too many properties. Expected an object with at most {METADATA_MAX_PAIRS} properties, but got an object with {} properties instead.",
                pairs.len()
            ),
            Some("metadata"),
            Some("object_above_max_properties"),
        ));
    }
    let mut metadata = BTreeMap::new();
    for (key, value) in pairs {
        let key_chars = key.chars().count();
        if key_chars > METADATA_MAX_KEY_CHARS {
            return Err(ApiError::invalid_request(
                format!(
                    "Invalid 'metadata': key '{key}' is too long. Expected a key with at most {METADATA_MAX_KEY_CHARS} characters, but got {key_chars}."
                ),
                Some("metadata"),
                Some("string_above_max_length"),
            ));
        }
        let Value::String(value) = value else {
            return Err(ApiError::invalid_type(
                "metadata",
                "an object of string values",
            ));
        };
        let value_chars = value.chars().count();
        if value_chars > METADATA_MAX_VALUE_CHARS {
            return Err(ApiError::invalid_request(
                format!(
                    "Invalid 'metadata.{key}': string too long. Expected a string with maximum length {METADATA_MAX_VALUE_CHARS}, but got a string with length {value_chars} instead."
                ),
                Some("metadata"),
                Some("string_above_max_length"),
            ));
        }
        metadata.insert(key.clone(), value.clone());
    }
    Ok(metadata)
}

async fn retrieve_batch(
    State(state): State<Arc<OpenAi>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Batch>, ApiError> {
    let id = path_id(id)?;
    state.sim.slow_poll().await;
    state
        .batch(&id)
        .map(Json)
        .ok_or_else(|| ApiError::no_such_batch(&id))
}

async fn cancel_batch(
    State(state): State<Arc<OpenAi>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Batch>, ApiError> {
    let id = path_id(id)?;
    let batch = {
        let mut batches = lock(&state.batches);
        let entry = batches
            .get_mut(&id)
            .ok_or_else(|| ApiError::no_such_batch(&id))?;
        let batch = &mut entry.batch;
        match batch.status {
            status if status.is_terminal() => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!("Cannot cancel a batch with status '{}'.", status.as_str()),
                ))
            }
            BatchStatus::Cancelling => return Ok(Json(batch.clone())),
            _ => {
                // Status, time and token change under one lock, so the
                // batch's task sees either none or all of them.
                let now = unix_millis();
                batch.status = BatchStatus::Cancelling;
                batch.cancelling_at = Some(now.div_euclid(1000));
                entry.life.cancel_ms = Some(now);
                entry.cancel.cancel();
                tracing::debug!(batch_id = %id, "sim openai: batch cancelling");
                batch.clone()
            }
        }
    };
    state
        .save(&id)
        .await
        .map_err(|err| ApiError::internal("recording the cancel", &err))?;
    Ok(Json(batch))
}

async fn list_batches(
    State(state): State<Arc<OpenAi>>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) =
        query.map_err(|rejection| ApiError::invalid_request(rejection.body_text(), None, None))?;
    let limit = parse_limit(&query, 1, 100, 20)?;
    let batches = lock(&state.batches);
    let (page, has_more) =
        batches.page(false, query.get("after").map(String::as_str), limit, |_| {
            true
        });
    let page: Vec<&Batch> = page.into_iter().map(|entry| &entry.batch).collect();
    Ok(Json(list_envelope(&page, |batch| &batch.id, has_more)))
}

/// OpenAI's list envelope around one page.
fn list_envelope<T: Serialize>(
    page: &[&T],
    id_of: impl Fn(&T) -> &String,
    has_more: bool,
) -> Value {
    json!({
        "object": "list",
        "data": page,
        "first_id": page.first().map(|item| id_of(item)),
        "last_id": page.last().map(|item| id_of(item)),
        "has_more": has_more,
    })
}

fn parse_limit(
    query: &HashMap<String, String>,
    min: usize,
    max: usize,
    default: usize,
) -> Result<usize, ApiError> {
    let Some(raw) = query.get("limit") else {
        return Ok(default);
    };
    let Ok(limit) = raw.trim().parse::<i64>() else {
        return Err(ApiError::invalid_request(
            format!("Invalid 'limit': expected an integer, but got '{raw}' instead."),
            Some("limit"),
            Some("invalid_type"),
        ));
    };
    if limit < min as i64 {
        return Err(ApiError::invalid_request(
            format!("Invalid 'limit': integer below minimum value. Expected a value >= {min}, but got {limit} instead."),
            Some("limit"),
            Some("integer_below_min_value"),
        ));
    }
    if limit > max as i64 {
        return Err(ApiError::invalid_request(
            format!("Invalid 'limit': integer above maximum value. Expected a value <= {max}, but got {limit} instead."),
            Some("limit"),
            Some("integer_above_max_value"),
        ));
    }
    Ok(usize::try_from(limit).unwrap_or(default))
}

fn path_id(id: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    id.map(|Path(id)| id)
        .map_err(|rejection| ApiError::invalid_request(rejection.body_text(), None, None))
}

/// An OpenAI error response: `{"error":{"message","type","param","code"}}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
    /// Extra headers (a 429's retry hints); boxed to keep errors small.
    headers: Option<Box<HeaderMap>>,
}

impl ApiError {
    /// An `invalid_request_error` with no param or code.
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
            headers: None,
        }
    }

    fn invalid_request(
        message: impl Into<String>,
        param: Option<&'static str>,
        code: Option<&'static str>,
    ) -> Self {
        Self {
            param,
            code,
            ..Self::new(StatusCode::BAD_REQUEST, message)
        }
    }

    fn missing_parameter(name: &'static str) -> Self {
        Self::invalid_request(
            format!("Missing required parameter: '{name}'."),
            Some(name),
            Some("missing_required_parameter"),
        )
    }

    fn invalid_type(name: &'static str, expected: &str) -> Self {
        Self::invalid_request(
            format!("Invalid type for '{name}': expected {expected}."),
            Some(name),
            Some("invalid_type"),
        )
    }

    fn invalid_value(name: &'static str, got: &str, supported: &[&str]) -> Self {
        let supported = supported
            .iter()
            .map(|value| format!("'{value}'"))
            .collect::<Vec<_>>()
            .join(", ");
        Self::invalid_request(
            format!("Invalid value: '{got}'. Supported values are: {supported}."),
            Some(name),
            Some("invalid_value"),
        )
    }

    fn unparseable_json() -> Self {
        Self::invalid_request(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)",
            None,
            None,
        )
    }

    fn missing_api_key() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank username) if you're accessing the API from your browser and are prompted for a username and password. You can obtain an API key from https://platform.openai.com/account/api-keys.",
        )
    }

    fn incorrect_api_key(key: &str) -> Self {
        Self {
            code: Some("invalid_api_key"),
            ..Self::new(
                StatusCode::UNAUTHORIZED,
                format!(
                    "Incorrect API key provided: {}. You can find your API key at https://platform.openai.com/account/api-keys.",
                    mask_key(key)
                ),
            )
        }
    }

    fn rate_limited(sim: &Sim) -> Self {
        let retry_after = sim.config().retry_after;
        let mut headers = sim.retry_after_headers();
        headers.insert(
            HeaderName::from_static("x-ratelimit-remaining-requests"),
            HeaderValue::from_static("0"),
        );
        if let Ok(reset) = HeaderValue::from_str(&format!("{}ms", retry_after.as_millis())) {
            headers.insert(HeaderName::from_static("x-ratelimit-reset-requests"), reset);
        }
        Self {
            kind: "requests",
            code: Some("rate_limit_exceeded"),
            headers: Some(Box::new(headers)),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "Rate limit reached for requests in organization {ORGANIZATION}. Please try again in {}ms.",
                    retry_after.as_millis()
                ),
            )
        }
    }

    fn server_error(request_id: &str) -> Self {
        Self {
            kind: "server_error",
            ..Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(
                    "The server had an error while processing your request. Sorry about that! You can retry your request. (Please include the request ID {request_id} in your message.)"
                ),
            )
        }
    }

    fn internal(doing: &str, err: &io::Error) -> Self {
        tracing::error!(error = %err, "sim openai: {doing}");
        Self {
            kind: "server_error",
            ..Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("The server had an error while {doing}: {err}"),
            )
        }
    }

    fn no_such_file(id: &str) -> Self {
        Self {
            param: Some("id"),
            ..Self::new(StatusCode::NOT_FOUND, format!("No such File object: {id}"))
        }
    }

    fn no_such_batch(id: &str) -> Self {
        Self {
            param: Some("batch_id"),
            ..Self::new(StatusCode::NOT_FOUND, format!("No such Batch object: {id}"))
        }
    }

    fn cannot_find_file(id: &str) -> Self {
        Self::invalid_request(
            format!(
                "Cannot find file {id}, or organization {ORGANIZATION} does not have access to it."
            ),
            Some("input_file_id"),
            None,
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        });
        let mut response = (self.status, Json(body)).into_response();
        if let Some(headers) = self.headers {
            response.headers_mut().extend(*headers);
        }
        response
    }
}

/// Masks a key as OpenAI does (`sk-proj-****…MxYA`): never echoed whole.
fn mask_key(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() <= 12 {
        return "*".repeat(chars.len());
    }
    let head: String = chars[..8].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}{}{tail}", "*".repeat(chars.len() - 12))
}
