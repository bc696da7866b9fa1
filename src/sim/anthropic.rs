//! The Anthropic Message Batches API, simulated (PROVIDERS.md section 2).
//!
//! Serves `POST/GET /messages/batches`, `GET/DELETE /messages/batches/{id}`,
//! `POST /messages/batches/{id}/cancel` and
//! `GET /messages/batches/{id}/results` with Anthropic's paths, objects,
//! status machine (`in_progress → [canceling →] ended`, nothing else), limits,
//! auth headers and error bodies, so the official SDKs work against it
//! unchanged. Requests come inline in the create body, which is spooled to
//! disk and parsed as a stream (`intake`); a background task per batch runs
//! them (`lifecycle`); replies are deterministic (`messages`), so tests can
//! compute every expected result line.
//!
//! It must never hold a whole create body or result file in memory and
//! never panic on request data: bad input gets the 400 Anthropic would send.
//! What a knob means here is in [`SimConfig`](super::SimConfig)'s table.
//!
//! With a data directory every batch is also a record on disk
//! (`anthropic/batches/`); a simulator started on the same directory
//! reloads them and resumes every batch that had not ended (`lifecycle`).

mod intake;
mod lifecycle;
mod messages;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{OriginalUri, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio_util::io::ReaderStream;
use tokio_util::sync::CancellationToken;

use super::store::{self, Records, Slot};
use super::{blocking, lock, random_base62, rfc3339, CallFault, EventKind, Sim};

pub use messages::{message_body, message_reply};

/// Largest create request the edge proxy lets through.
pub const MAX_CREATE_BYTES: u64 = 256 * 1024 * 1024;
/// Most requests one batch may hold.
pub const MAX_REQUESTS: u64 = intake::MAX_REQUESTS;
/// `anthropic-version` values the API accepts (PROVIDERS.md 2.1).
const API_VERSIONS: [&str; 3] = ["2023-01-01", "2023-06-01", "2026-10-21"];
/// A batch's processing window: `expires_at` is `created_at` plus this.
const EXPIRY_HOURS: i64 = 24;
/// Range and default of `limit` on `GET /messages/batches`.
const LIST_LIMIT: std::ops::RangeInclusive<usize> = 1..=1000;
const DEFAULT_LIST_LIMIT: usize = 20;
/// Buffer size for spooling bodies and streaming results.
const IO_BUFFER_BYTES: usize = 256 * 1024;

/// The Anthropic sub-router, to be nested under `/anthropic/v1`.
pub(crate) fn router(sim: Arc<Sim>) -> io::Result<Router> {
    let dir = sim.provider_dir("anthropic")?;
    let state = Arc::new(Anthropic {
        records: Records::open(&sim, &dir, "batches")?,
        dir,
        sim,
        batches: Mutex::new(Batches::default()),
        server_faults: AtomicU64::new(0),
    });
    reload(&state)?;
    Ok(Router::new()
        .route("/messages/batches", post(create_batch).get(list_batches))
        .route(
            "/messages/batches/{id}",
            get(retrieve_batch).delete(delete_batch),
        )
        .route("/messages/batches/{id}/cancel", post(cancel_batch))
        .route("/messages/batches/{id}/results", get(batch_results))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(Arc::clone(&state), gate))
        .with_state(state))
}

/// State of the simulated Anthropic workspace.
struct Anthropic {
    sim: Arc<Sim>,
    /// Where each batch keeps its requests and results files.
    dir: PathBuf,
    batches: Mutex<Batches>,
    /// Durable batch records (nothing without a data_dir).
    records: Records,
    /// Injected server errors so far: every other one is a 529.
    server_faults: AtomicU64,
}

impl Anthropic {
    /// The create body, spooled while it is read.
    fn body_path(&self, batch_id: &str) -> PathBuf {
        self.dir.join(format!("{batch_id}.body.json"))
    }

    /// The batch's requests, one `{"custom_id","params"}` line each.
    fn requests_path(&self, batch_id: &str) -> PathBuf {
        self.dir.join(format!("{batch_id}.requests.jsonl"))
    }

    /// The batch's result lines, complete once it has ended.
    fn results_path(&self, batch_id: &str) -> PathBuf {
        self.dir.join(format!("{batch_id}.results.jsonl"))
    }

    fn batch(&self, id: &str) -> Option<MessageBatch> {
        lock(&self.batches)
            .by_id
            .get(id)
            .map(|entry| entry.batch.clone())
    }

    /// Applies `change` to the batch under the lock and returns what it
    /// returned, or `None` if the batch is unknown.
    fn update_batch<R>(&self, id: &str, change: impl FnOnce(&mut MessageBatch) -> R) -> Option<R> {
        lock(&self.batches)
            .by_id
            .get_mut(id)
            .map(|entry| change(&mut entry.batch))
    }

    /// Like [`Self::update_batch`], with the lifecycle state too.
    fn update<R>(
        &self,
        id: &str,
        change: impl FnOnce(&mut MessageBatch, &mut Life) -> R,
    ) -> Option<R> {
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
            self.records.snapshot(id, &entry.slot, &record)?
        };
        match snapshot {
            Some(snapshot) => self.sim.blocking(move || snapshot.write()).await,
            None => Ok(()),
        }
    }
}

/// Loads the batches a simulator on the same data directory left behind,
/// and resumes every one that had not ended.
fn reload(state: &Arc<Anthropic>) -> io::Result<()> {
    if !state.records.durable() {
        return Ok(());
    }
    store::remove_parts(&state.dir)?;
    let mut records: Vec<BatchRecordIn> = state.records.load()?;
    records.sort_by_key(|record| record.life.order);
    let mut resumed = Vec::new();
    for BatchRecordIn { batch, life } in records {
        state.sim.saw_order_stamp(life.order);
        let id = batch.id.clone();
        // A crash between the record and the ledger events loses nothing.
        state.sim.record_batch_created(&id)?;
        if !state.sim.recorded(EventKind::Submitted, &id) {
            let custom_ids = intake::read_custom_ids(&state.requests_path(&id))?;
            state
                .sim
                .record_submitted(&id, custom_ids.iter().map(String::as_str))?;
        }
        let cancel = CancellationToken::new();
        if batch.processing_status == ProcessingStatus::Canceling {
            cancel.cancel();
        }
        if batch.processing_status != ProcessingStatus::Ended {
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
                slot: Arc::default(),
            },
        );
    }
    for (id, cancel) in resumed {
        tracing::debug!(batch_id = %id, "sim anthropic: resuming batch");
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
    batch: MessageBatch,
    life: Life,
    /// Fired by `POST …/cancel`; the batch's task listens.
    cancel: CancellationToken,
    /// Orders the saves of the batch's record.
    slot: Arc<Slot>,
}

/// What a batch's lifecycle needs to carry on after a restart, kept in its
/// record beside the MessageBatch object. Times are Unix milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Life {
    /// Orders the batches list across restarts.
    order: u64,
    /// What the dice decided at create.
    fate: lifecycle::Fate,
    created_ms: i64,
    /// When the client asked to cancel.
    cancel_ms: Option<i64>,
    /// Which requests run, fixed before any does.
    plan: Option<lifecycle::Plan>,
    /// The counts of the published results, once they are out.
    outcome: Option<lifecycle::Outcome>,
}

/// A batch's durable record, as written.
#[derive(Serialize)]
struct BatchRecordOut<'a> {
    batch: &'a MessageBatch,
    life: &'a Life,
}

/// A batch's durable record, as read back.
#[derive(Deserialize)]
struct BatchRecordIn {
    batch: MessageBatch,
    life: Life,
}

/// Anthropic's MessageBatch object (PROVIDERS.md 2.3).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct MessageBatch {
    id: String,
    #[serde(rename = "type", skip_deserializing, default = "message_batch")]
    kind: &'static str,
    processing_status: ProcessingStatus,
    request_counts: RequestCounts,
    ended_at: Option<String>,
    created_at: String,
    expires_at: String,
    cancel_initiated_at: Option<String>,
    archived_at: Option<String>,
    /// Filled in per response from the caller's Host ([`Self::seen_from`]).
    results_url: Option<String>,
}

fn message_batch() -> &'static str {
    "message_batch"
}

impl MessageBatch {
    /// The batch as a client at `base` sees it: once it has ended, with the
    /// absolute URL of its results.
    fn seen_from(mut self, base: &BaseUrl) -> Self {
        if self.processing_status == ProcessingStatus::Ended {
            self.results_url = Some(format!("{}/messages/batches/{}/results", base.0, self.id));
        }
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ProcessingStatus {
    InProgress,
    Canceling,
    Ended,
}

/// The five counts always sum to the batch's size; until it ends all of
/// them sit in `processing` (PROVIDERS.md 2.4).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct RequestCounts {
    processing: u64,
    succeeded: u64,
    errored: u64,
    canceled: u64,
    expired: u64,
}

/// What every handler may need to know about the call it serves.
#[derive(Debug, Clone)]
struct CallContext {
    /// Also sent as the `request-id` header and in error bodies.
    request_id: String,
    base: BaseUrl,
}

/// `http://{Host}{prefix}`: where the client reached this router, so
/// `results_url` leads back to it.
#[derive(Debug, Clone)]
struct BaseUrl(String);

impl BaseUrl {
    fn of(request: &Request) -> Self {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
            .or_else(|| request.uri().authority().map(ToString::to_string))
            .unwrap_or_else(|| "localhost".to_owned());
        // Inside the nest the path has lost its prefix; the original has not.
        let prefix = request
            .extensions()
            .get::<OriginalUri>()
            .and_then(|original| original.path().strip_suffix(request.uri().path()))
            .unwrap_or_default();
        Self(format!("http://{host}{prefix}"))
    }
}

/// Runs before every route: assigns the request id, checks the key and the
/// version header, rolls the call-fault dice, and finally puts the request
/// id on the response and into any error body.
async fn gate(State(state): State<Arc<Anthropic>>, mut request: Request, next: Next) -> Response {
    let context = CallContext {
        request_id: format!("req_011C{}", random_base62(20)),
        base: BaseUrl::of(&request),
    };
    let request_id = context.request_id.clone();
    request.extensions_mut().insert(context);
    let checked = authorize(request.headers(), state.sim.config().api_key.as_deref())
        .and_then(|()| check_version(request.headers()));
    let mut response = match checked {
        Err(refusal) => refusal.into_response(),
        Ok(()) => match state.sim.roll_call_fault() {
            Some(CallFault::RateLimited) => ApiError::rate_limited(&state.sim).into_response(),
            Some(CallFault::ServerError) => {
                let nth = state.server_faults.fetch_add(1, Ordering::Relaxed);
                if nth % 2 == 1 {
                    ApiError::overloaded().into_response()
                } else {
                    ApiError::internal_server_error().into_response()
                }
            }
            None => next.run(request).await,
        },
    };
    if let Some(error) = response.extensions_mut().remove::<ErrorBody>() {
        *response.body_mut() = Body::from(error.render(Some(&request_id)));
    }
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response
            .headers_mut()
            .insert(HeaderName::from_static("request-id"), value);
    }
    response
}

/// Accepts `x-api-key` or, as newer clients send it, `Authorization: Bearer`.
fn authorize(headers: &HeaderMap, expected: Option<&str>) -> Result<(), ApiError> {
    let x_api_key = headers
        .get("x-api-key")
        .and_then(|value| value.to_str().ok())
        .map(str::trim);
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            let (scheme, token) = value.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    let presented = x_api_key.or(bearer).filter(|key| !key.is_empty());
    match (presented, expected) {
        (None, _) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "x-api-key header is required",
        )),
        (Some(key), Some(expected)) if key != expected => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid x-api-key",
        )),
        (Some(_), _) => Ok(()),
    }
}

fn check_version(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(version) = headers.get("anthropic-version") else {
        return Err(ApiError::invalid_request(
            "anthropic-version: header is required",
        ));
    };
    let version = String::from_utf8_lossy(version.as_bytes());
    if API_VERSIONS.contains(&version.trim()) {
        Ok(())
    } else {
        Err(ApiError::invalid_request(format!(
            "anthropic-version: \"{version}\" is not a valid version"
        )))
    }
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found_error", "Not Found")
}

async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!("Method {method} is not allowed for this endpoint."),
    )
}

async fn create_batch(
    State(state): State<Arc<Anthropic>>,
    Extension(context): Extension<CallContext>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<MessageBatch>, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|bytes| bytes > MAX_CREATE_BYTES) {
        return Err(ApiError::request_too_large());
    }

    let id = format!("msgbatch_01{}", random_base62(22));
    let spool = Spooled::new(state.body_path(&id));
    spool.write(body).await?;
    let requests = Spooled::new(state.requests_path(&id));
    let (body_path, requests_path) = (spool.path.clone(), requests.path.clone());
    let verdict = blocking(move || intake::read_create_body(&body_path, &requests_path))
        .await
        .map_err(|err| ApiError::internal("reading the request body", &err))?;
    drop(spool);
    let accepted = verdict.map_err(ApiError::invalid_request)?;
    requests.keep();

    let now = chrono::Utc::now();
    let created_ms = now.timestamp_millis();
    let batch = MessageBatch {
        id: id.clone(),
        kind: "message_batch",
        processing_status: ProcessingStatus::InProgress,
        request_counts: RequestCounts {
            processing: accepted.requests,
            ..RequestCounts::default()
        },
        ended_at: None,
        created_at: rfc3339(now),
        expires_at: rfc3339(now + chrono::Duration::hours(EXPIRY_HOURS)),
        cancel_initiated_at: None,
        archived_at: None,
        results_url: None,
    };
    let config = state.sim.config();
    let fate = lifecycle::Fate {
        fail: state.sim.roll_batch_fate(config.fail_rate),
        expire: state.sim.roll_batch_fate(config.expire_rate),
    };
    let life = Life {
        order: state.sim.order_stamp(),
        fate,
        created_ms,
        ..Life::default()
    };
    let cancel = CancellationToken::new();
    {
        let mut batches = lock(&state.batches);
        batches.order.push(id.clone());
        batches.by_id.insert(
            id.clone(),
            BatchEntry {
                batch: batch.clone(),
                life,
                cancel: cancel.clone(),
                slot: Arc::default(),
            },
        );
    }
    // On its own task, so a client hanging up cannot leave it half done.
    let start = tokio::spawn(start_batch(
        Arc::clone(&state),
        id.clone(),
        accepted,
        cancel,
    ));
    start
        .await
        .map_err(io::Error::other)
        .and_then(|started| started)
        .map_err(|err| ApiError::internal("recording the batch", &err))?;
    tracing::debug!(batch_id = %id, ?fate, "sim anthropic: batch created");

    if state.sim.roll_ambiguous_create() {
        // The batch exists and runs; only the answer is lost.
        return Err(ApiError::internal_server_error());
    }
    Ok(Json(batch.seen_from(&context.base)))
}

/// Records a new batch (its record first: a batch the ledger counts always
/// exists, and a reload records what a crash kept from the ledger) and
/// starts its task; forgets it again if it cannot be recorded.
async fn start_batch(
    state: Arc<Anthropic>,
    id: String,
    accepted: intake::Accepted,
    cancel: CancellationToken,
) -> io::Result<()> {
    let sim = Arc::clone(&state.sim);
    let batch_id = id.clone();
    let recorded = match state.save(&id).await {
        Ok(()) => {
            state
                .sim
                .blocking(move || {
                    sim.record_batch_created(&batch_id)?;
                    // Anthropic has no validating phase: the requests are
                    // taken on now.
                    sim.record_submitted(&batch_id, accepted.custom_ids.iter().map(String::as_str))
                })
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
        let _ = state.records.remove(&id);
        let _ = std::fs::remove_file(state.requests_path(&id));
        return Err(err);
    }
    state
        .sim
        .spawn(lifecycle::drive(Arc::clone(&state), id, cancel));
    Ok(())
}

/// A file being written for a request; deleted unless [`Self::keep`] is
/// called.
struct Spooled {
    path: PathBuf,
    keep: bool,
}

impl Spooled {
    fn new(path: PathBuf) -> Self {
        Self { path, keep: false }
    }

    /// Streams `body` to the file, refusing it past [`MAX_CREATE_BYTES`].
    async fn write(&self, body: Body) -> Result<(), ApiError> {
        let file = tokio::fs::File::create(&self.path)
            .await
            .map_err(|err| ApiError::internal("spooling the request body", &err))?;
        let mut out = tokio::io::BufWriter::with_capacity(IO_BUFFER_BYTES, file);
        let mut stream = body.into_data_stream();
        let mut bytes: u64 = 0;
        while let Some(chunk) = stream.try_next().await.map_err(|err| {
            ApiError::invalid_request(format!("The request body could not be read: {err}"))
        })? {
            bytes += chunk.len() as u64;
            if bytes > MAX_CREATE_BYTES {
                return Err(ApiError::request_too_large());
            }
            out.write_all(&chunk)
                .await
                .map_err(|err| ApiError::internal("spooling the request body", &err))?;
        }
        out.flush()
            .await
            .map_err(|err| ApiError::internal("spooling the request body", &err))
    }

    fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for Spooled {
    fn drop(&mut self) {
        if !self.keep {
            // A single unlink; the file may not exist if nothing was written.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

async fn retrieve_batch(
    State(state): State<Arc<Anthropic>>,
    Extension(context): Extension<CallContext>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<MessageBatch>, ApiError> {
    let id = path_id(id)?;
    state.sim.slow_poll().await;
    state
        .batch(&id)
        .map(|batch| Json(batch.seen_from(&context.base)))
        .ok_or_else(|| ApiError::no_such_batch(&id))
}

async fn list_batches(
    State(state): State<Arc<Anthropic>>,
    Extension(context): Extension<CallContext>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) =
        query.map_err(|rejection| ApiError::invalid_request(rejection.body_text()))?;
    let limit = parse_limit(query.get("limit").map(String::as_str))?;
    let after = query.get("after_id").map(String::as_str);
    let before = query.get("before_id").map(String::as_str);
    if after.is_some() && before.is_some() {
        return Err(ApiError::invalid_request(
            "Only one of after_id and before_id may be given.",
        ));
    }
    let batches = lock(&state.batches);
    // Newest first.
    let newest_first: Vec<&String> = batches.order.iter().rev().collect();
    let (page, has_more) = match (after, before) {
        (_, Some(before)) => {
            // The `limit` batches just newer than `before`, still newest first.
            let end = newest_first
                .iter()
                .position(|id| *id == before)
                .unwrap_or(0);
            let start = end.saturating_sub(limit);
            (&newest_first[start..end], start > 0)
        }
        (Some(after), None) => {
            let start = newest_first
                .iter()
                .position(|id| *id == after)
                .map_or(newest_first.len(), |at| at + 1);
            let end = (start + limit).min(newest_first.len());
            (&newest_first[start..end], end < newest_first.len())
        }
        (None, None) => {
            let end = limit.min(newest_first.len());
            (&newest_first[..end], end < newest_first.len())
        }
    };
    let data: Vec<MessageBatch> = page
        .iter()
        .filter_map(|id| batches.by_id.get(*id))
        .map(|entry| entry.batch.clone().seen_from(&context.base))
        .collect();
    drop(batches);
    Ok(Json(json!({
        "data": data,
        "has_more": has_more,
        "first_id": data.first().map(|batch| &batch.id),
        "last_id": data.last().map(|batch| &batch.id),
    })))
}

fn parse_limit(raw: Option<&str>) -> Result<usize, ApiError> {
    let Some(raw) = raw else {
        return Ok(DEFAULT_LIST_LIMIT);
    };
    let Ok(limit) = raw.trim().parse::<i64>() else {
        return Err(ApiError::invalid_request(
            "limit: Input should be a valid integer, unable to parse string as an integer",
        ));
    };
    if limit < *LIST_LIMIT.start() as i64 {
        return Err(ApiError::invalid_request(format!(
            "limit: Input should be greater than or equal to {}",
            LIST_LIMIT.start()
        )));
    }
    if limit > *LIST_LIMIT.end() as i64 {
        return Err(ApiError::invalid_request(format!(
            "limit: Input should be less than or equal to {}",
            LIST_LIMIT.end()
        )));
    }
    Ok(usize::try_from(limit).unwrap_or(DEFAULT_LIST_LIMIT))
}

async fn cancel_batch(
    State(state): State<Arc<Anthropic>>,
    Extension(context): Extension<CallContext>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<MessageBatch>, ApiError> {
    let id = path_id(id)?;
    let (batch, changed) = {
        let mut batches = lock(&state.batches);
        let entry = batches
            .by_id
            .get_mut(&id)
            .ok_or_else(|| ApiError::no_such_batch(&id))?;
        let batch = &mut entry.batch;
        let changed = match batch.processing_status {
            ProcessingStatus::Ended => {
                return Err(ApiError::invalid_request(format!(
                    "Message Batch {id} has already ended and can no longer be canceled."
                )))
            }
            ProcessingStatus::Canceling => false,
            ProcessingStatus::InProgress => {
                // Status, time and token change under one lock, so the
                // batch's task sees either none or all of them.
                let now = chrono::Utc::now();
                batch.processing_status = ProcessingStatus::Canceling;
                batch.cancel_initiated_at = Some(rfc3339(now));
                entry.life.cancel_ms = Some(now.timestamp_millis());
                entry.cancel.cancel();
                tracing::debug!(batch_id = %id, "sim anthropic: batch canceling");
                true
            }
        };
        (batch.clone(), changed)
    };
    if changed {
        state
            .save(&id)
            .await
            .map_err(|err| ApiError::internal("recording the cancel", &err))?;
    }
    Ok(Json(batch.seen_from(&context.base)))
}

async fn batch_results(
    State(state): State<Arc<Anthropic>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = path_id(id)?;
    let batch = state
        .batch(&id)
        .ok_or_else(|| ApiError::no_such_batch(&id))?;
    if batch.processing_status != ProcessingStatus::Ended {
        return Err(ApiError::invalid_request(format!(
            "Message Batch {id} is still {}. Results are available once processing_status is 'ended'.",
            match batch.processing_status {
                ProcessingStatus::Canceling => "canceling",
                _ => "in_progress",
            }
        )));
    }
    let file = match tokio::fs::File::open(state.results_path(&id)).await {
        Ok(file) => file,
        // Deleted between the lookup and the open.
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Err(ApiError::no_such_batch(&id))
        }
        Err(err) => return Err(ApiError::internal("opening the results", &err)),
    };
    let length = file
        .metadata()
        .await
        .map_err(|err| ApiError::internal("reading the results size", &err))?
        .len();
    let body = Body::from_stream(ReaderStream::with_capacity(file, 64 * 1024));
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/binary"),
            ),
            (header::CONTENT_LENGTH, HeaderValue::from(length)),
        ],
        body,
    )
        .into_response())
}

async fn delete_batch(
    State(state): State<Arc<Anthropic>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = path_id(id)?;
    let slot = {
        let mut batches = lock(&state.batches);
        let entry = batches
            .by_id
            .get(&id)
            .ok_or_else(|| ApiError::no_such_batch(&id))?;
        if entry.batch.processing_status != ProcessingStatus::Ended {
            return Err(ApiError::invalid_request(format!(
                "Message Batch {id} cannot be deleted while it is still processing. Cancel it first and delete it once it has ended."
            )));
        }
        let slot = Arc::clone(&entry.slot);
        batches.by_id.remove(&id);
        batches.order.retain(|other| *other != id);
        slot
    };
    // The batch has ended, so its task is gone and nothing reads its files.
    // The record goes first: a crash then leaves files nobody lists.
    let (files, batch_id) = (Arc::clone(&state), id.clone());
    state
        .sim
        .blocking(move || {
            slot.remove(&files.records, &batch_id)?;
            store::remove_if_present(&files.requests_path(&batch_id))?;
            store::remove_if_present(&files.results_path(&batch_id))
        })
        .await
        .map_err(|err| ApiError::internal("deleting the batch files", &err))?;
    tracing::debug!(batch_id = %id, "sim anthropic: batch deleted");
    Ok(Json(json!({"id": id, "type": "message_batch_deleted"})))
}

fn path_id(id: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    id.map(|Path(id)| id)
        .map_err(|rejection| ApiError::invalid_request(rejection.body_text()))
}

/// An Anthropic error response:
/// `{"type":"error","error":{"type","message"},"request_id"}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    body: ErrorBody,
    /// Extra headers (a 429's retry hints); boxed to keep errors small.
    headers: Option<Box<HeaderMap>>,
}

/// The part of an error the gate renders once it knows the request id.
#[derive(Debug, Clone)]
struct ErrorBody {
    kind: &'static str,
    message: String,
}

impl ErrorBody {
    fn render(&self, request_id: Option<&str>) -> Vec<u8> {
        let body = json!({
            "type": "error",
            "error": {"type": self.kind, "message": self.message},
            "request_id": request_id,
        });
        body.to_string().into_bytes()
    }
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody {
                kind,
                message: message.into(),
            },
            headers: None,
        }
    }

    fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    fn request_too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!(
                "Request exceeds the maximum allowed number of bytes. The maximum size of a Message Batch create request is {} MB.",
                MAX_CREATE_BYTES / (1024 * 1024)
            ),
        )
    }

    fn no_such_batch(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            format!("Message Batch {id} not found."),
        )
    }

    fn rate_limited(sim: &Sim) -> Self {
        let retry_after = sim.config().retry_after;
        let mut headers = sim.retry_after_headers();
        let reset = chrono::Utc::now()
            + chrono::Duration::from_std(retry_after).unwrap_or_else(|_| chrono::Duration::zero());
        for (name, value) in [
            ("anthropic-ratelimit-requests-limit", "50".to_owned()),
            ("anthropic-ratelimit-requests-remaining", "0".to_owned()),
            ("anthropic-ratelimit-requests-reset", rfc3339(reset)),
        ] {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(HeaderName::from_static(name), value);
            }
        }
        Self {
            headers: Some(Box::new(headers)),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "This request would exceed your organization's rate limit of 50 Message Batches API requests per minute. For details, refer to: https://docs.claude.com/en/api/rate-limits. You can see the response headers for current usage. Please try again later.",
            )
        }
    }

    fn internal_server_error() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            "Internal server error",
        )
    }

    fn overloaded() -> Self {
        Self::new(
            // 529 is Anthropic's own: "the API is temporarily overloaded".
            StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            "overloaded_error",
            "Overloaded",
        )
    }

    fn internal(doing: &str, err: &io::Error) -> Self {
        tracing::error!(error = %err, "sim anthropic: {doing}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            format!("Internal server error while {doing}: {err}"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Rendered without the request id; the gate renders it again with it.
        let body = self.body.render(None);
        let mut response = (
            self.status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response();
        if let Some(headers) = self.headers {
            response.headers_mut().extend(*headers);
        }
        response.extensions_mut().insert(self.body);
        response
    }
}
