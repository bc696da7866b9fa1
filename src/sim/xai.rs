//! The xAI Files + Batch API (REST), simulated (PROVIDERS.md section 3).
//!
//! Serves `POST /files`, `GET/DELETE /files/{id}`, `GET /files/{id}/content`,
//! `POST/GET /batches`, `GET /batches/{id}`, `POST /batches/{id}:cancel`
//! (a colon), `GET /batches/{id}/requests` and `GET /batches/{id}/results`
//! with xAI's paths, objects, counters (there is no status), limits, auth
//! and `{"code","error"}` error bodies. Batches are filled in file mode: a
//! background task per batch reads the uploaded OpenAI-shaped JSONL and
//! works through it (`lifecycle`); bodies and costs are deterministic
//! (`completions`), so tests can compute every expected row.
//!
//! Pages end with a `pagination_token` of `null` on
//! `GET /batches/{id}/results` and of `""` on `GET /batches` and
//! `GET /batches/{id}/requests`: xAI has been seen sending both, and clients
//! must stop on either.
//!
//! It must never hold a whole file in memory (uploads stream to disk,
//! results are paged from disk) and never panic on request data. What a
//! knob means here is in [`SimConfig`](super::SimConfig)'s table.
//!
//! With a data directory every file and batch is also a record on disk
//! (`xai/files/`, `xai/batches/`); a simulator started on the same directory
//! reloads them and resumes every batch with work left (`lifecycle`).

mod completions;
mod lifecycle;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::multipart::{Field, MultipartError, MultipartRejection};
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Multipart, OriginalUri, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;
use tokio::io::AsyncWriteExt;
use tokio_util::io::ReaderStream;
use tokio_util::sync::CancellationToken;
use xxhash_rust::xxh3::xxh3_128_with_seed;

use super::store::{self, Records, Slot};
use super::{blocking, lock, rfc3339, unix_now, CallFault, Sim};

pub use completions::{
    chat_completion, cost_in_usd_ticks, error_detail, is_batch_model, result_response, row_cost,
    BATCH_ENDPOINTS,
};

/// Largest upload the Files reference allows (PROVIDERS.md 3.7).
pub const MAX_UPLOAD_BYTES: u64 = 50 * 1024 * 1024;
/// Most requests one batch file may hold.
pub const MAX_REQUESTS: u64 = lifecycle::MAX_REQUESTS;
/// Slack over [`MAX_UPLOAD_BYTES`] for the multipart framing and fields.
const MULTIPART_OVERHEAD_BYTES: usize = 1024 * 1024;
/// Range of a file's `expires_after`, in seconds.
const FILE_TTL_RANGE_SECS: std::ops::RangeInclusive<i64> = 3600..=2_592_000;
/// Longest filename.
const MAX_FILENAME_CHARS: usize = 255;
/// A batch's `expire_time` is its `create_time` plus this (observed).
const BATCH_RETENTION_DAYS: i64 = 30;
/// Page size when `limit` is missing or not positive, and the largest one.
const DEFAULT_PAGE_SIZE: usize = 100;
const MAX_PAGE_SIZE: usize = 1000;

/// The xAI sub-router, to be nested under `/xai/v1`.
pub(crate) fn router(sim: Arc<Sim>) -> io::Result<Router> {
    let dir = sim.provider_dir("xai")?;
    let state = Arc::new(Xai {
        file_records: Records::open(&sim, &dir, "files")?,
        batch_records: Records::open(&sim, &dir, "batches")?,
        dir,
        sim,
        files: Mutex::new(HashMap::new()),
        batches: Mutex::new(Batches::default()),
        server_faults: AtomicU64::new(0),
    });
    reload(&state)?;
    let upload_limit = usize::try_from(MAX_UPLOAD_BYTES)
        .unwrap_or(usize::MAX)
        .saturating_add(MULTIPART_OVERHEAD_BYTES);
    Ok(Router::new()
        .route(
            "/files",
            post(upload_file).layer(DefaultBodyLimit::max(upload_limit)),
        )
        .route("/files/{id}", get(retrieve_file).delete(delete_file))
        .route("/files/{id}/content", get(file_content))
        .route("/batches", post(create_batch).get(list_batches))
        // `{id}` also matches `{id}:cancel`: the action follows a colon.
        .route("/batches/{id}", get(retrieve_batch).post(batch_action))
        .route(
            "/batches/{id}/requests",
            get(list_requests).post(add_requests),
        )
        .route("/batches/{id}/results", get(list_results))
        .fallback(not_found)
        .method_not_allowed_fallback(not_found)
        .layer(middleware::from_fn_with_state(Arc::clone(&state), gate))
        .with_state(state))
}

/// State of the simulated xAI team.
struct Xai {
    sim: Arc<Sim>,
    /// Uploaded files (`<file-id>`) and results files (`<batch-id>.results.jsonl`).
    dir: PathBuf,
    files: Mutex<HashMap<String, FileObject>>,
    batches: Mutex<Batches>,
    /// Durable records of files and batches (nothing without a data_dir).
    file_records: Records,
    batch_records: Records,
    /// Injected server errors so far: every other one is a 503.
    server_faults: AtomicU64,
}

impl Xai {
    fn file_path(&self, file_id: &str) -> PathBuf {
        self.dir.join(file_id)
    }

    fn results_path(&self, batch_id: &str) -> PathBuf {
        self.dir.join(format!("{batch_id}.results.jsonl"))
    }

    /// A batch's own copy of its input file (durable mode only), read again
    /// when the batch is resumed after a restart.
    fn input_copy_path(&self, batch_id: &str) -> PathBuf {
        self.dir.join(format!("{batch_id}.input.jsonl"))
    }

    /// The batch and its lifecycle state.
    fn batch_and_life(&self, id: &str) -> Option<(Batch, Life)> {
        lock(&self.batches)
            .by_id
            .get(id)
            .map(|entry| (entry.batch.clone(), entry.life.clone()))
    }

    /// Applies `change` to the batch and its lifecycle state under the
    /// lock, or returns `None` if the batch is unknown.
    fn update<R>(&self, id: &str, change: impl FnOnce(&mut Batch, &mut Life) -> R) -> Option<R> {
        lock(&self.batches)
            .by_id
            .get_mut(id)
            .map(|entry| change(&mut entry.batch, &mut entry.life))
    }

    /// Writes the batch's record as it is now (when durable).
    async fn save(&self, id: &str) -> io::Result<()> {
        let snapshot = {
            let batches = lock(&self.batches);
            let Some(entry) = batches.by_id.get(id) else {
                return Ok(());
            };
            let record = BatchRecordOut {
                batch: &entry.batch,
                life: &entry.life,
            };
            self.batch_records.snapshot(id, &entry.slot, &record)?
        };
        match snapshot {
            Some(snapshot) => self.sim.blocking(move || snapshot.write()).await,
            None => Ok(()),
        }
    }

    fn file_exists(&self, file_id: &str) -> bool {
        lock(&self.files).contains_key(file_id)
    }

    fn batch(&self, id: &str) -> Option<Batch> {
        lock(&self.batches)
            .by_id
            .get(id)
            .map(|entry| entry.batch.clone())
    }

    /// xAI refuses the batch: the message is set, the counters stay 0, and
    /// the batch counts as cancelled. The caller saves it.
    fn cancel_by_xai(&self, id: &str, message: String) {
        let now = rfc3339(chrono::Utc::now());
        if let Some(entry) = lock(&self.batches).by_id.get_mut(id) {
            tracing::debug!(batch_id = %id, %message, "sim xai: batch cancelled by xai");
            entry.batch.cancel_time.get_or_insert(now);
            entry.batch.cancel_by_xai_message = Some(message);
        }
    }

    /// The file passed validation: its requests are recorded and pending.
    /// The caller saves it.
    fn accept(&self, id: &str, requests: Vec<RequestMeta>, accepted: lifecycle::Accepted) {
        if let Some(entry) = lock(&self.batches).by_id.get_mut(id) {
            let total = requests.len() as u64;
            entry.batch.state.num_requests = total;
            entry.batch.state.num_pending = total;
            entry.requests = requests;
            entry.life.accepted = Some(accepted);
        }
    }

    /// Publishes a step: rows up to `results_len` are readable, and the
    /// requests from index `first` on have the given outcomes. The caller
    /// saves it.
    fn commit(
        &self,
        id: &str,
        first: u64,
        outcomes: &[lifecycle::Outcome],
        results_len: u64,
        mode: lifecycle::Mode,
    ) {
        // Whole milliseconds, as the record keeps it: a reload shows the same.
        let now = chrono::Utc::now();
        let now = chrono::DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now);
        let mut batches = lock(&self.batches);
        let Some(entry) = batches.by_id.get_mut(id) else {
            return;
        };
        entry.life.steps.push(lifecycle::Step {
            end: first + outcomes.len() as u64,
            mode,
            at_ms: now.timestamp_millis(),
        });
        entry.life.pending = None;
        entry.life.results_len = results_len;
        let start = usize::try_from(first).unwrap_or(usize::MAX);
        for (meta, outcome) in entry.requests.iter_mut().skip(start).zip(outcomes) {
            meta.state = outcome.state;
            meta.finish_time = Some(now);
        }
        let state = &mut entry.batch.state;
        let costs = &mut entry.batch.cost_breakdown;
        for outcome in outcomes {
            match outcome.state {
                RequestState::Pending => continue,
                RequestState::Succeeded => state.num_success += 1,
                RequestState::Failed => state.num_error += 1,
                RequestState::Cancelled => state.num_cancelled += 1,
            }
            state.num_pending = state.num_pending.saturating_sub(1);
            if outcome.state == RequestState::Succeeded {
                costs.total_cost_usd_ticks += outcome.cost_usd_ticks;
                match costs
                    .endpoint_costs
                    .iter_mut()
                    .find(|cost| cost.endpoint == outcome.endpoint)
                {
                    Some(cost) => {
                        cost.cost_usd_ticks += outcome.cost_usd_ticks;
                        cost.request_count += 1;
                    }
                    None => costs.endpoint_costs.push(EndpointCost {
                        endpoint: outcome.endpoint,
                        cost_usd_ticks: outcome.cost_usd_ticks,
                        request_count: 1,
                    }),
                }
            }
        }
        costs.calculation_time = Some(rfc3339(now));
    }
}

/// Loads the files and batches a simulator on the same data directory left
/// behind, and resumes every batch with work left.
fn reload(state: &Arc<Xai>) -> io::Result<()> {
    if !state.batch_records.durable() {
        return Ok(());
    }
    let files: Vec<FileObject> = state.file_records.load()?;
    lock(&state.files).extend(files.into_iter().map(|file| (file.id.clone(), file)));
    let mut records: Vec<BatchRecordIn> = state.batch_records.load()?;
    records.sort_by_key(|record| record.life.order);
    let mut resumed = Vec::new();
    for BatchRecordIn { batch, life } in records {
        state.sim.saw_order_stamp(life.order);
        let id = batch.batch_id.clone();
        // A crash between the record and the ledger event loses nothing.
        state.sim.record_batch_created(&id)?;
        let requests = match lifecycle::reload_requests(state, &id, &life) {
            Ok(requests) => requests,
            Err(err) => {
                tracing::error!(batch_id = %id, error = %err, "sim xai: the batch's requests could not be reloaded");
                Vec::new()
            }
        };
        let cancel = CancellationToken::new();
        if life.cancel_requested {
            cancel.cancel();
        }
        if lifecycle::has_work_left(&batch, &life) {
            resumed.push((id.clone(), cancel.clone()));
        }
        let mut batches = lock(&state.batches);
        batches.order.push(id.clone());
        batches.by_id.insert(
            id,
            BatchEntry {
                batch,
                life,
                cancel,
                requests,
                slot: Arc::default(),
            },
        );
    }
    for (id, cancel) in resumed {
        tracing::debug!(batch_id = %id, "sim xai: resuming batch");
        state
            .sim
            .spawn(lifecycle::drive(Arc::clone(state), id, cancel));
    }
    Ok(())
}

/// Batches in creation order, for the newest-first list.
#[derive(Default)]
struct Batches {
    by_id: HashMap<String, BatchEntry>,
    /// Ids oldest first.
    order: Vec<String>,
}

struct BatchEntry {
    batch: Batch,
    life: Life,
    /// Fired by `POST /batches/{id}:cancel`; the batch's task listens.
    cancel: CancellationToken,
    /// Per-request metadata in file order, once the file passed validation.
    requests: Vec<RequestMeta>,
    /// Orders the saves of the batch's record.
    slot: Arc<Slot>,
}

/// What a batch's lifecycle needs to carry on after a restart, kept in its
/// record beside the Batch object. Times are Unix milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Life {
    /// Orders the batches list across restarts.
    order: u64,
    /// What the dice decided at create.
    fate: lifecycle::Fate,
    created_ms: i64,
    /// The client asked to cancel.
    cancel_requested: bool,
    /// Set once the file passed validation.
    accepted: Option<lifecycle::Accepted>,
    /// The steps committed so far, in order.
    steps: Vec<lifecycle::Step>,
    /// A step decided but not yet committed: done first after a restart.
    pending: Option<lifecycle::StepPlan>,
    /// Bytes of the results file that hold whole, committed rows.
    results_len: u64,
}

impl Life {
    /// Requests done (in file order) so far.
    fn done(&self) -> u64 {
        self.steps.last().map_or(0, |step| step.end)
    }
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

/// What `GET /batches/{id}/requests` lists about one request.
struct RequestMeta {
    batch_request_id: String,
    endpoint: &'static str,
    model: Arc<str>,
    state: RequestState,
    finish_time: Option<chrono::DateTime<chrono::Utc>>,
}

/// A request's processing state (PROVIDERS.md 3.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum RequestState {
    Pending,
    Succeeded,
    Failed,
    Cancelled,
}

/// xAI's Batch object (PROVIDERS.md 3.3).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Batch {
    batch_id: String,
    name: String,
    create_time: String,
    expire_time: String,
    create_api_key_id: String,
    cancel_time: Option<String>,
    cancel_by_xai_message: Option<String>,
    state: BatchState,
    cost_breakdown: CostBreakdown,
    /// File mode only.
    #[serde(skip_serializing_if = "Option::is_none")]
    input_file_id: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct BatchState {
    num_requests: u64,
    num_pending: u64,
    num_success: u64,
    num_error: u64,
    num_cancelled: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct CostBreakdown {
    total_cost_usd_ticks: i64,
    endpoint_costs: Vec<EndpointCost>,
    calculation_time: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
struct EndpointCost {
    endpoint: &'static str,
    cost_usd_ticks: i64,
    request_count: u64,
}

/// An [`EndpointCost`] read back from a record.
#[derive(Deserialize)]
struct StoredEndpointCost {
    endpoint: String,
    cost_usd_ticks: i64,
    request_count: u64,
}

impl<'de> Deserialize<'de> for EndpointCost {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let stored = StoredEndpointCost::deserialize(deserializer)?;
        let endpoint = BATCH_ENDPOINTS
            .iter()
            .map(|(known, _)| *known)
            .find(|known| *known == stored.endpoint)
            .ok_or_else(|| {
                serde::de::Error::custom(format!("unknown endpoint '{}'", stored.endpoint))
            })?;
        Ok(Self {
            endpoint,
            cost_usd_ticks: stored.cost_usd_ticks,
            request_count: stored.request_count,
        })
    }
}

/// xAI's File object.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FileObject {
    id: String,
    #[serde(skip_deserializing, default = "file_object")]
    object: &'static str,
    bytes: u64,
    created_at: i64,
    expires_at: Option<i64>,
    filename: String,
    /// xAI keeps no purpose: always empty.
    #[serde(skip_deserializing)]
    purpose: &'static str,
}

fn file_object() -> &'static str {
    "file"
}

/// A stable, non-secret id of the key that made the call, for
/// `create_api_key_id`.
#[derive(Debug, Clone)]
struct ApiKeyId(String);

/// Runs before every route: checks the bearer key, then rolls the
/// call-fault dice.
async fn gate(State(state): State<Arc<Xai>>, mut request: Request, next: Next) -> Response {
    match authorize(request.headers(), state.sim.config().api_key.as_deref()) {
        Err(refusal) => refusal.into_response(),
        Ok(key_id) => match state.sim.roll_call_fault() {
            Some(CallFault::RateLimited) => ApiError::rate_limited(&state.sim).into_response(),
            Some(CallFault::ServerError) => {
                let nth = state.server_faults.fetch_add(1, Ordering::Relaxed);
                if nth % 2 == 1 {
                    ApiError::unavailable().into_response()
                } else {
                    ApiError::internal_error().into_response()
                }
            }
            None => {
                request.extensions_mut().insert(key_id);
                next.run(request).await
            }
        },
    }
}

/// A missing or wrong key is a 400, not a 401, at xAI (PROVIDERS.md 3.8).
fn authorize(headers: &HeaderMap, expected: Option<&str>) -> Result<ApiKeyId, ApiError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            let (scheme, token) = value.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .unwrap_or_default();
    let accepted = match expected {
        Some(expected) => presented == expected,
        None => !presented.is_empty(),
    };
    if !accepted {
        return Err(ApiError::invalid_argument(format!(
            "Incorrect API key provided: {}. You can obtain an API key from https://console.x.ai.",
            mask_key(presented)
        )));
    }
    let digest = xxh3_128_with_seed(presented.as_bytes(), 0x6b65_795f_6964);
    Ok(ApiKeyId(
        uuid::Builder::from_random_bytes(digest.to_be_bytes())
            .into_uuid()
            .to_string(),
    ))
}

/// Masks a key as xAI does (`xa***yz`): never echoed whole.
fn mask_key(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() <= 4 {
        return "***".to_owned();
    }
    let head: String = chars[..2].iter().collect();
    let tail: String = chars[chars.len() - 2..].iter().collect();
    format!("{head}***{tail}")
}

async fn not_found(method: Method, OriginalUri(uri): OriginalUri) -> ApiError {
    ApiError::not_found(format!("No route for {method} {}", uri.path()))
}

async fn upload_file(
    State(state): State<Arc<Xai>>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Json<FileObject>, ApiError> {
    let mut multipart =
        multipart.map_err(|rejection| ApiError::invalid_argument(rejection.body_text()))?;
    let id = format!("file_{}", uuid::Uuid::new_v4());
    let mut upload = PartialUpload::new(state.file_path(&id));
    let mut received: Option<(String, u64)> = None;
    let mut seconds: Option<String> = None;
    let mut anchor: Option<String> = None;
    while let Some(field) = multipart.next_field().await.map_err(multipart_error)? {
        match field.name().unwrap_or_default() {
            "file" => {
                if received.is_some() {
                    return Err(ApiError::invalid_argument(
                        "Only one file may be uploaded per request.",
                    ));
                }
                let filename = field.file_name().map(str::to_owned).ok_or_else(|| {
                    ApiError::invalid_argument("The 'file' part must name a filename.")
                })?;
                check_filename(&filename)?;
                let bytes = upload.write(field).await?;
                received = Some((filename, bytes));
            }
            "expires_after" | "expires_after[seconds]" => {
                seconds = Some(field.text().await.map_err(multipart_error)?);
            }
            "expires_after[anchor]" => {
                anchor = Some(field.text().await.map_err(multipart_error)?);
            }
            // `purpose` and anything else is accepted and ignored.
            _ => {}
        }
    }
    let (filename, bytes) =
        received.ok_or_else(|| ApiError::invalid_argument("Missing required field 'file'."))?;
    let ttl = file_ttl(anchor.as_deref(), seconds.as_deref())?;
    let created_at = unix_now();
    let file = FileObject {
        id: id.clone(),
        object: "file",
        bytes,
        created_at,
        expires_at: ttl.map(|ttl| created_at + ttl),
        filename,
        purpose: "",
    };
    // Durable before the file is acknowledged.
    let (records, record) = (Arc::clone(&state), file.clone());
    state
        .sim
        .blocking(move || records.file_records.write(&record.id, &record))
        .await
        .map_err(|err| ApiError::internal("recording the file", &err))?;
    upload.keep();
    lock(&state.files).insert(id, file.clone());
    tracing::debug!(file_id = %file.id, bytes, "sim xai: file uploaded");
    Ok(Json(file))
}

/// A filename must be at most 255 characters, without control characters,
/// `"`, `;` or `\` (they would break `Content-Disposition`).
fn check_filename(filename: &str) -> Result<(), ApiError> {
    let bad = filename.is_empty()
        || filename.chars().count() > MAX_FILENAME_CHARS
        || filename
            .chars()
            .any(|c| c.is_control() || matches!(c, '"' | ';' | '\\' | '\u{2028}' | '\u{2029}'));
    if bad {
        return Err(ApiError::invalid_argument(format!(
            "Invalid filename: it must be 1 to {MAX_FILENAME_CHARS} characters without control characters, '\"', ';' or '\\'."
        )));
    }
    Ok(())
}

/// Seconds a file lives: `expires_after` as a plain integer, or the
/// OpenAI-style `expires_after[anchor]=created_at` + `expires_after[seconds]`.
/// `None` (the default) keeps the file until it is deleted.
fn file_ttl(anchor: Option<&str>, seconds: Option<&str>) -> Result<Option<i64>, ApiError> {
    if let Some(anchor) = anchor.filter(|anchor| *anchor != "created_at") {
        return Err(ApiError::invalid_argument(format!(
            "Invalid expires_after anchor '{anchor}'. The supported anchor is 'created_at'."
        )));
    }
    let Some(seconds) = seconds else {
        return Ok(None);
    };
    seconds
        .trim()
        .parse::<i64>()
        .ok()
        .filter(|seconds| FILE_TTL_RANGE_SECS.contains(seconds))
        .map(Some)
        .ok_or_else(|| {
            ApiError::invalid_argument(format!(
                "expires_after must be an integer between {} and {} seconds, got '{seconds}'.",
                FILE_TTL_RANGE_SECS.start(),
                FILE_TTL_RANGE_SECS.end()
            ))
        })
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
                return Err(ApiError::invalid_argument(format!(
                    "File is too large: the maximum file size is {} MB.",
                    MAX_UPLOAD_BYTES / (1024 * 1024)
                )));
            }
            out.write_all(&chunk)
                .await
                .map_err(|err| ApiError::internal("writing the upload", &err))?;
        }
        out.flush()
            .await
            .map_err(|err| ApiError::internal("writing the upload", &err))?;
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
    ApiError::invalid_argument(err.body_text())
}

async fn retrieve_file(
    State(state): State<Arc<Xai>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<FileObject>, ApiError> {
    let id = path_id(id)?;
    lock(&state.files)
        .get(&id)
        .map(|file| Json(file.clone()))
        .ok_or_else(|| ApiError::no_such_file(&id))
}

async fn file_content(
    State(state): State<Arc<Xai>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = path_id(id)?;
    if !state.file_exists(&id) {
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
    State(state): State<Arc<Xai>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = path_id(id)?;
    if lock(&state.files).remove(&id).is_none() {
        return Err(ApiError::no_such_file(&id));
    }
    // A batch already reading the file keeps its open handle (and, when
    // durable, its own copy); later readers find it gone.
    let (records, file_id) = (Arc::clone(&state), id.clone());
    state
        .sim
        .blocking(move || {
            records.file_records.remove(&file_id)?;
            store::remove_if_present(&records.file_path(&file_id))
        })
        .await
        .map_err(|err| ApiError::internal("deleting the file", &err))?;
    Ok(Json(json!({"id": id, "deleted": true})))
}

/// A `POST /batches` body.
#[derive(Debug, Deserialize)]
struct CreateBatch {
    name: String,
    #[serde(default)]
    input_file_id: Option<String>,
}

async fn create_batch(
    State(state): State<Arc<Xai>>,
    Extension(ApiKeyId(key_id)): Extension<ApiKeyId>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Batch>, ApiError> {
    let body = body.map_err(|rejection| ApiError::invalid_argument(rejection.body_text()))?;
    let request: CreateBatch = serde_json::from_slice(&body).map_err(|err| {
        ApiError::invalid_argument(format!(
            "Failed to deserialize the JSON body into the target type: {err}"
        ))
    })?;
    if request.name.trim().is_empty() {
        return Err(ApiError::invalid_argument(
            "The batch name must not be empty.",
        ));
    }
    if let Some(file_id) = &request.input_file_id {
        if !state.file_exists(file_id) {
            return Err(ApiError::no_such_file(file_id));
        }
    }

    let now = chrono::Utc::now();
    let batch = Batch {
        batch_id: format!("batch_{}", uuid::Uuid::new_v4()),
        name: request.name,
        create_time: rfc3339(now),
        expire_time: rfc3339(now + chrono::Duration::days(BATCH_RETENTION_DAYS)),
        create_api_key_id: key_id,
        cancel_time: None,
        cancel_by_xai_message: None,
        state: BatchState::default(),
        cost_breakdown: CostBreakdown::default(),
        input_file_id: request.input_file_id,
    };
    let config = state.sim.config();
    let fate = lifecycle::Fate {
        fail: state.sim.roll_batch_fate(config.fail_rate),
        expire: state.sim.roll_batch_fate(config.expire_rate),
    };
    let life = Life {
        order: state.sim.order_stamp(),
        fate,
        created_ms: now.timestamp_millis(),
        ..Life::default()
    };
    let cancel = CancellationToken::new();
    {
        let mut batches = lock(&state.batches);
        batches.order.push(batch.batch_id.clone());
        batches.by_id.insert(
            batch.batch_id.clone(),
            BatchEntry {
                batch: batch.clone(),
                life,
                cancel: cancel.clone(),
                requests: Vec::new(),
                slot: Arc::default(),
            },
        );
    }
    // On its own task, so a client hanging up cannot leave it half done.
    let start = tokio::spawn(start_batch(
        Arc::clone(&state),
        batch.batch_id.clone(),
        cancel,
    ));
    start
        .await
        .map_err(io::Error::other)
        .and_then(|started| started)
        .map_err(|err| ApiError::internal("recording the batch", &err))?;
    tracing::debug!(batch_id = %batch.batch_id, ?fate, "sim xai: batch created");

    if state.sim.roll_ambiguous_create() {
        // The batch exists and runs; only the answer is lost.
        return Err(ApiError::internal_error());
    }
    Ok(Json(batch))
}

/// Records a new batch (its record first: a batch the ledger counts always
/// exists, and a reload records what a crash kept from the ledger) and
/// starts its task; forgets it again if it cannot be recorded.
async fn start_batch(state: Arc<Xai>, id: String, cancel: CancellationToken) -> io::Result<()> {
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
        {
            let mut batches = lock(&state.batches);
            batches.by_id.remove(&id);
            batches.order.retain(|other| *other != id);
        }
        let _ = state.batch_records.remove(&id);
        return Err(err);
    }
    state
        .sim
        .spawn(lifecycle::drive(Arc::clone(&state), id, cancel));
    Ok(())
}

async fn retrieve_batch(
    State(state): State<Arc<Xai>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Batch>, ApiError> {
    let id = path_id(id)?;
    state.sim.slow_poll().await;
    state
        .batch(&id)
        .map(Json)
        .ok_or_else(|| ApiError::no_such_batch(&id))
}

/// `POST /batches/{id}:{action}`; `cancel` is the only action.
async fn batch_action(
    State(state): State<Arc<Xai>>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Batch>, ApiError> {
    let id_and_action = path_id(id)?;
    match id_and_action.rsplit_once(':') {
        Some((id, "cancel")) => {
            let (batch, changed) = cancel_batch(&state, id)?;
            if changed {
                state
                    .save(id)
                    .await
                    .map_err(|err| ApiError::internal("recording the cancel", &err))?;
            }
            Ok(Json(batch))
        }
        _ => Err(ApiError::not_found(format!(
            "No route for {method} {}",
            uri.path()
        ))),
    }
}

/// Stops the batch: pending requests become cancelled rows. A batch with
/// nothing pending, or one xAI cancelled itself, is returned unchanged.
/// Also says whether the cancel changed anything (to be saved).
fn cancel_batch(state: &Xai, id: &str) -> Result<(Batch, bool), ApiError> {
    let mut batches = lock(&state.batches);
    let entry = batches
        .by_id
        .get_mut(id)
        .ok_or_else(|| ApiError::no_such_batch(id))?;
    let batch = &mut entry.batch;
    let finished = batch.state.num_requests > 0 && batch.state.num_pending == 0;
    let changed = !finished && batch.cancel_by_xai_message.is_none() && batch.cancel_time.is_none();
    if changed {
        // Time, flag and token change under one lock, so the batch's task
        // sees either none or all of them.
        batch.cancel_time = Some(rfc3339(chrono::Utc::now()));
        entry.life.cancel_requested = true;
        entry.cancel.cancel();
        tracing::debug!(batch_id = %id, "sim xai: batch cancelled");
    }
    Ok((batch.clone(), changed))
}

/// `POST /batches/{id}/requests`: inline mode, which batchline does not use.
async fn add_requests(
    State(state): State<Arc<Xai>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = path_id(id)?;
    let batch = state
        .batch(&id)
        .ok_or_else(|| ApiError::no_such_batch(&id))?;
    if batch.input_file_id.is_some() {
        return Err(ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            GrpcCode::FailedPrecondition,
            "Cannot add inline requests to a file-based batch",
        ));
    }
    Err(ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        GrpcCode::Unimplemented,
        "The simulator serves file-mode batches only: create the batch with an input_file_id.",
    ))
}

async fn list_batches(
    State(state): State<Arc<Xai>>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(query) =
        query.map_err(|rejection| ApiError::invalid_argument(rejection.body_text()))?;
    let limit = parse_limit(&query)?;
    let batches = lock(&state.batches);
    // Newest first; the token is the id of the last batch already listed.
    let start = match token(&query) {
        None => 0,
        Some(after) => {
            batches
                .order
                .iter()
                .rev()
                .position(|id| id == after)
                .ok_or_else(ApiError::bad_token)?
                + 1
        }
    };
    let page: Vec<&Batch> = batches
        .order
        .iter()
        .rev()
        .skip(start)
        .take(limit)
        .filter_map(|id| batches.by_id.get(id))
        .map(|entry| &entry.batch)
        .collect();
    let more = start + page.len() < batches.order.len();
    let next = match page.last() {
        Some(last) if more => last.batch_id.clone(),
        _ => String::new(),
    };
    Ok(Json(json!({"batches": page, "pagination_token": next})))
}

async fn list_requests(
    State(state): State<Arc<Xai>>,
    id: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = path_id(id)?;
    let Query(query) =
        query.map_err(|rejection| ApiError::invalid_argument(rejection.body_text()))?;
    let limit = parse_limit(&query)?;
    let start = match token(&query) {
        None => 0,
        Some(token) => token.parse::<usize>().map_err(|_| ApiError::bad_token())?,
    };
    let batches = lock(&state.batches);
    let entry = batches
        .by_id
        .get(&id)
        .ok_or_else(|| ApiError::no_such_batch(&id))?;
    if start > entry.requests.len() {
        return Err(ApiError::bad_token());
    }
    let create_time = entry
        .life
        .accepted
        .as_ref()
        .and_then(|accepted| chrono::DateTime::from_timestamp_millis(accepted.at_ms))
        .map(rfc3339);
    let page: Vec<serde_json::Value> = entry
        .requests
        .iter()
        .skip(start)
        .take(limit)
        .map(|request| {
            json!({
                "batch_request_id": request.batch_request_id,
                "endpoint": request.endpoint,
                "model": &*request.model,
                "state": request.state,
                "create_time": create_time,
                "finish_time": request.finish_time.map(rfc3339),
            })
        })
        .collect();
    let end = start + page.len();
    let next = if end < entry.requests.len() {
        end.to_string()
    } else {
        String::new()
    };
    Ok(Json(
        json!({"batch_request_metadata": page, "pagination_token": next}),
    ))
}

/// One page of `GET /batches/{id}/results`.
#[derive(Serialize)]
struct ResultsPage {
    results: Vec<Box<RawValue>>,
    /// `null` on the last page.
    pagination_token: Option<String>,
}

async fn list_results(
    State(state): State<Arc<Xai>>,
    id: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<ResultsPage>, ApiError> {
    let id = path_id(id)?;
    let Query(query) =
        query.map_err(|rejection| ApiError::invalid_argument(rejection.body_text()))?;
    let limit = parse_limit(&query)?;
    // The token is the byte offset of the next row in the results file.
    let from = match token(&query) {
        None => 0,
        Some(token) => token.parse::<u64>().map_err(|_| ApiError::bad_token())?,
    };
    let committed = lock(&state.batches)
        .by_id
        .get(&id)
        .map(|entry| entry.life.results_len)
        .ok_or_else(|| ApiError::no_such_batch(&id))?;
    let path = state.results_path(&id);
    let (results, next) = blocking(move || lifecycle::read_rows(&path, from, committed, limit))
        .await
        .map_err(|err| ApiError::internal("reading the results", &err))?
        .ok_or_else(ApiError::bad_token)?;
    Ok(Json(ResultsPage {
        results,
        pagination_token: (next < committed).then(|| next.to_string()),
    }))
}

/// `limit`: missing or not positive means 100; more than 1,000 is cut.
fn parse_limit(query: &HashMap<String, String>) -> Result<usize, ApiError> {
    let Some(raw) = query.get("limit") else {
        return Ok(DEFAULT_PAGE_SIZE);
    };
    let limit = raw.trim().parse::<i64>().map_err(|_| {
        ApiError::invalid_argument(format!("Invalid limit '{raw}': expected an integer."))
    })?;
    Ok(match usize::try_from(limit) {
        Ok(0) | Err(_) => DEFAULT_PAGE_SIZE,
        Ok(limit) => limit.min(MAX_PAGE_SIZE),
    })
}

/// The `pagination_token` of a query; an empty one means the first page.
fn token(query: &HashMap<String, String>) -> Option<&str> {
    query
        .get("pagination_token")
        .map(String::as_str)
        .filter(|token| !token.is_empty())
}

fn path_id(id: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    id.map(|Path(id)| id)
        .map_err(|rejection| ApiError::invalid_argument(rejection.body_text()))
}

/// gRPC status codes xAI's `code` field names by their description.
#[derive(Debug, Clone, Copy)]
enum GrpcCode {
    InvalidArgument,
    NotFound,
    FailedPrecondition,
    ResourceExhausted,
    Unimplemented,
    Internal,
    Unavailable,
}

impl GrpcCode {
    fn text(self) -> &'static str {
        match self {
            Self::InvalidArgument => "Client specified an invalid argument",
            Self::NotFound => "Some requested entity was not found",
            Self::FailedPrecondition => {
                "The system is not in a state required for the operation's execution"
            }
            Self::ResourceExhausted => "Some resource has been exhausted",
            Self::Unimplemented => "Operation is not implemented or not supported",
            Self::Internal => "Internal error",
            Self::Unavailable => "The service is currently unavailable",
        }
    }
}

/// An xAI error response: `{"code":"<gRPC status text>","error":"<message>"}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: GrpcCode,
    message: String,
    /// Extra headers (a 429's retry hints); boxed to keep errors small.
    headers: Option<Box<HeaderMap>>,
}

impl ApiError {
    fn new(status: StatusCode, code: GrpcCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            headers: None,
        }
    }

    fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, GrpcCode::InvalidArgument, message)
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, GrpcCode::NotFound, message)
    }

    fn no_such_file(id: &str) -> Self {
        Self::not_found(format!("File {id} not found."))
    }

    fn no_such_batch(id: &str) -> Self {
        Self::not_found(format!("Batch {id} not found."))
    }

    fn bad_token() -> Self {
        Self::invalid_argument("Invalid pagination_token.")
    }

    fn rate_limited(sim: &Sim) -> Self {
        Self {
            headers: Some(Box::new(sim.retry_after_headers())),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                GrpcCode::ResourceExhausted,
                format!(
                    "Too many requests: your team has exceeded its rate limit. Please retry in {} ms.",
                    sim.config().retry_after.as_millis()
                ),
            )
        }
    }

    fn internal_error() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            GrpcCode::Internal,
            "An internal error occurred. Please retry the request.",
        )
    }

    fn unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            GrpcCode::Unavailable,
            "The service is temporarily unavailable. Please retry the request.",
        )
    }

    fn internal(doing: &str, err: &io::Error) -> Self {
        tracing::error!(error = %err, "sim xai: {doing}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            GrpcCode::Internal,
            format!("Internal error while {doing}: {err}"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"code": self.code.text(), "error": self.message});
        let mut response = (self.status, Json(body)).into_response();
        if let Some(headers) = self.headers {
            response.headers_mut().extend(*headers);
        }
        response
    }
}
