//! The provider simulator: a local, faithful stand-in for the providers'
//! batch APIs, used by the integration tests, the demo and the benchmarks.
//!
//! Each provider module contributes its own sub-router under its own prefix
//! (`/openai/v1`, plus the plain `/v1` alias for tools that assume it;
//! `/anthropic/v1`; `/xai/v1`) and shares what is common from here: the
//! configuration, the seeded dice that inject faults, the data directory,
//! and the billing ledger that `GET /sim/stats` reports so tests can prove
//! no request was paid twice. A provider module exposes
//! `router(Arc<Sim>) -> io::Result<Router>`, renders the faults
//! `Sim::roll_call_fault` picks in its own error shape, and is nested in
//! `build` below.
//!
//! The simulator never talks to a real provider and never holds a whole file
//! in memory: uploads, input files and result files are streamed to and from
//! disk. Fault injection applies to the provider routes only, never to
//! `/sim/*`.
//!
//! With a data directory the simulator is durable, as a real provider is:
//! every file's and batch's state is a small JSON record (`store`), and the
//! ledger is an append-only journal of billing events (`ledger.jsonl`),
//! replayed at start. A restarted simulator reloads its files and batches
//! and resumes each unfinished batch where its timestamps say it is. Every
//! ledger event names the batch (or batch step) it belongs to and is applied
//! at most once, so a batch that is re-run after a restart never bills a
//! custom_id twice: its result files are written under temporary names,
//! billed in one journal append, and only then published.

pub mod anthropic;
pub mod openai;
mod store;
pub mod xai;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{extract::State, Router};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Knobs of the simulator. Rates are fractions in `[0, 1]`; values outside
/// are clamped (a rate of 0 never fires, 1 always does).
///
/// The knobs are named after OpenAI's status machine; the other providers
/// map them onto what they have:
///
/// | Knob | Anthropic | xAI |
/// |---|---|---|
/// | `validate_duration` | unused (no validating phase) | time before `num_requests` is set |
/// | `batch_duration` | time in `in_progress` | time to work through the requests, in a few steps |
/// | `finalize_duration` | time in `canceling` | unused |
/// | `error_rate` | `errored` lines | `batch_result.error` rows |
/// | `drop_rate` | no entry in the results stream (counted succeeded) | no row (counted succeeded) |
/// | `fail_rate` | every request `errored` (no failed batch) | `cancel_by_xai_message` set, counters 0 |
/// | `token_limit_rate` | unused | unused |
/// | `invalid_line_rate` | unused | unused |
/// | `expire_rate`, `expire_completed_fraction` | the rest `expired` | the rest stay pending until cancelled |
/// | faults | 429 `rate_limit_error`; 500 `api_error` / 529 `overloaded_error` | 429; 500 / 503 |
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Where files live; `None` = a fresh temp dir kept for the server's
    /// life, with batches and the ledger in memory only. With `Some(dir)`
    /// files, batches and the ledger are kept in `dir` and survive a restart
    /// of the simulator: a new one on the same `dir` carries on.
    pub data_dir: Option<PathBuf>,
    /// If `Some`, `Authorization: Bearer <key>` must match exactly; if `None`
    /// any non-empty bearer token is accepted.
    pub api_key: Option<String>,
    /// Time a batch spends in `validating`.
    pub validate_duration: Duration,
    /// Time a batch spends in `in_progress`.
    pub batch_duration: Duration,
    /// Time a batch spends in `finalizing` (and in `cancelling`).
    pub finalize_duration: Duration,
    /// Fraction of requests answered with a per-request error, chosen
    /// deterministically by `custom_id` (see [`openai::injected_error`]).
    pub error_rate: f64,
    /// Fraction of requests whose result the provider never returns: no
    /// line in either file, no entry in the results stream or pages, and
    /// not billed. Chosen by `custom_id` (see [`openai::dropped_result`]),
    /// independently of `error_rate`.
    pub drop_rate: f64,
    /// Fraction of batches that fail validation as a whole.
    pub fail_rate: f64,
    /// Fraction of batches that go `validating -> failed` with
    /// `token_limit_exceeded`.
    pub token_limit_rate: f64,
    /// Fraction of custom_ids whose input line fails validation (OpenAI):
    /// a batch holding one goes `validating -> failed`, its error naming
    /// the first such line, as the real API names an invalid line.
    pub invalid_line_rate: f64,
    /// Fraction of batches that expire.
    pub expire_rate: f64,
    /// In an expiring batch, the first `floor(n * f)` lines (file order)
    /// succeed; the rest get `batch_expired` error lines.
    pub expire_completed_fraction: f64,
    /// Fraction of API calls answered 429 `rate_limit_exceeded`, nothing done.
    pub http_429_rate: f64,
    /// Fraction of API calls answered 500 `server_error`, nothing done.
    pub http_5xx_rate: f64,
    /// Fraction of batch creates that DO create the batch and then answer 500.
    pub ambiguous_create_rate: f64,
    /// Sent on 429 as `retry-after-ms` and `retry-after` (whole seconds,
    /// rounded up, at least 1).
    pub retry_after: Duration,
    /// Seeds every random choice (per-request errors, batch fates, faults).
    pub seed: u64,
    /// How long every batch status call (OpenAI and xAI
    /// `GET /batches/{id}`, Anthropic `GET /messages/batches/{id}`) waits
    /// before it answers, as a slow provider's does. Zero by default.
    pub poll_delay: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            data_dir: None,
            api_key: None,
            validate_duration: Duration::from_millis(50),
            batch_duration: Duration::from_millis(200),
            finalize_duration: Duration::from_millis(20),
            error_rate: 0.0,
            drop_rate: 0.0,
            fail_rate: 0.0,
            token_limit_rate: 0.0,
            invalid_line_rate: 0.0,
            expire_rate: 0.0,
            expire_completed_fraction: 0.0,
            http_429_rate: 0.0,
            http_5xx_rate: 0.0,
            ambiguous_create_rate: 0.0,
            retry_after: Duration::from_millis(100),
            seed: 0,
            poll_delay: Duration::ZERO,
        }
    }
}

/// Serves the simulator on `listener` until `shutdown` is cancelled; batches
/// still running then are abandoned (with a data directory, a simulator
/// started later on it resumes them). Returns once their background work
/// has stopped, so nothing writes to the data directory any more.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: SimConfig,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let (app, sim) = build(config)?;
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    sim.shutdown.cancel();
    sim.tasks.close();
    sim.tasks.wait().await;
    served
}

/// The router [`serve`] serves: every provider API plus `/sim/stats`.
///
/// Unfinished batches reloaded from a data directory are resumed only if
/// this is called inside a Tokio runtime.
pub fn router(config: SimConfig) -> io::Result<Router> {
    Ok(build(config)?.0)
}

fn build(config: SimConfig) -> io::Result<(Router, Arc<Sim>)> {
    let sim = Arc::new(Sim::new(config)?);
    let openai = openai::router(Arc::clone(&sim))?;
    let anthropic = anthropic::router(Arc::clone(&sim))?;
    let xai = xai::router(Arc::clone(&sim))?;
    let app = Router::new()
        .route("/sim/stats", get(stats))
        .with_state(Arc::clone(&sim))
        .nest("/openai/v1", openai.clone())
        .nest("/v1", openai)
        .nest("/anthropic/v1", anthropic)
        .nest("/xai/v1", xai);
    Ok((app, sim))
}

async fn stats(State(sim): State<Arc<Sim>>) -> Response {
    // Serialized under the lock: the ledger can hold one entry per custom_id
    // ever seen, and copying it first would double that.
    let body = serde_json::to_vec(&lock(&sim.books).ledger);
    match body {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(err) => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("serializing stats: {err}"),
        )
            .into_response(),
    }
}

/// What every provider module shares: configuration, data directory, dice,
/// ledger and the shutdown signal for background batch tasks.
pub(crate) struct Sim {
    config: SimConfig,
    data_dir: PathBuf,
    /// Keeps a temporary data directory alive for the server's life.
    _temp_dir: Option<tempfile::TempDir>,
    /// Whether state is kept on disk across restarts (a data_dir was given).
    durable: bool,
    /// Per-call faults (429, 5xx, ambiguous creates).
    call_dice: Mutex<StdRng>,
    /// Per-batch fates (fail, token limit, expire), on their own stream so
    /// that how often clients poll does not change which batches fail.
    batch_dice: Mutex<StdRng>,
    books: Mutex<Books>,
    /// The last creation stamp handed out ([`Sim::order_stamp`]).
    last_order: AtomicU64,
    shutdown: CancellationToken,
    /// Background batch tasks and their blocking work, awaited on shutdown.
    tasks: TaskTracker,
}

/// A fault injected into one API call before it is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CallFault {
    RateLimited,
    ServerError,
}

impl Sim {
    fn new(config: SimConfig) -> io::Result<Self> {
        let (data_dir, temp_dir) = match &config.data_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                (dir.clone(), None)
            }
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("batchline-sim-")
                    .tempdir()?;
                (temp.path().to_path_buf(), Some(temp))
            }
        };
        let durable = temp_dir.is_none();
        let books = if durable {
            Books::replay(&data_dir.join(LEDGER_FILE))?
        } else {
            Books::default()
        };
        Ok(Self {
            call_dice: Mutex::new(StdRng::seed_from_u64(config.seed)),
            batch_dice: Mutex::new(StdRng::seed_from_u64(config.seed ^ 0x9e37_79b9_7f4a_7c15)),
            books: Mutex::new(books),
            last_order: AtomicU64::new(0),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            durable,
            config,
            data_dir,
            _temp_dir: temp_dir,
        })
    }

    pub(crate) fn config(&self) -> &SimConfig {
        &self.config
    }

    /// Whether files, batches and the ledger are kept across restarts.
    pub(crate) fn durable(&self) -> bool {
        self.durable
    }

    /// Waits [`SimConfig::poll_delay`]: every batch status call does.
    pub(crate) async fn slow_poll(&self) {
        let delay = self.config.poll_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }

    /// A stamp that orders objects by creation, across restarts: the
    /// current time in nanoseconds, but always above every stamp before.
    pub(crate) fn order_stamp(&self) -> u64 {
        let now = u64::try_from(chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0))
            .unwrap_or_default();
        let mut last = self.last_order.load(Ordering::SeqCst);
        loop {
            let next = now.max(last + 1);
            match self
                .last_order
                .compare_exchange(last, next, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return next,
                Err(current) => last = current,
            }
        }
    }

    /// Notes a stamp of a reloaded object, so new stamps come after it.
    pub(crate) fn saw_order_stamp(&self, stamp: u64) {
        self.last_order.fetch_max(stamp, Ordering::SeqCst);
    }

    /// Spawns a batch's background task; the server awaits it on shutdown.
    /// Outside a Tokio runtime the task is dropped with a warning.
    pub(crate) fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        if tokio::runtime::Handle::try_current().is_ok() {
            self.tasks.spawn(task);
        } else {
            tracing::warn!("sim: no Tokio runtime; an unfinished batch is not resumed");
        }
    }

    /// Runs a batch's file work on a blocking thread; the server awaits it
    /// on shutdown, so no half-done work writes after the server stopped.
    pub(crate) async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        self.tasks
            .spawn_blocking(work)
            .await
            .map_err(io::Error::other)?
    }

    /// The directory a provider keeps its files in, created if missing.
    pub(crate) fn provider_dir(&self, provider: &str) -> io::Result<PathBuf> {
        let dir = self.data_dir.join(provider);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// Cancelled when the server stops; background batch tasks end with it.
    pub(crate) fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Rolls the per-call fault dice: 429 first, then 5xx.
    pub(crate) fn roll_call_fault(&self) -> Option<CallFault> {
        if roll(&self.call_dice, self.config.http_429_rate) {
            Some(CallFault::RateLimited)
        } else if roll(&self.call_dice, self.config.http_5xx_rate) {
            Some(CallFault::ServerError)
        } else {
            None
        }
    }

    /// Rolls whether a create answers 500 after creating the batch.
    pub(crate) fn roll_ambiguous_create(&self) -> bool {
        roll(&self.call_dice, self.config.ambiguous_create_rate)
    }

    /// Rolls one batch-fate die with probability `rate`.
    pub(crate) fn roll_batch_fate(&self, rate: f64) -> bool {
        roll(&self.batch_dice, rate)
    }

    /// Headers a 429 carries: `retry-after-ms`, `retry-after` (whole seconds,
    /// rounded up, at least 1).
    pub(crate) fn retry_after_headers(&self) -> HeaderMap {
        let millis = self.config.retry_after.as_millis();
        let seconds = millis.div_ceil(1000).max(1);
        let mut headers = HeaderMap::new();
        headers.insert(
            HeaderName::from_static("retry-after-ms"),
            HeaderValue::from(u64::try_from(millis).unwrap_or(u64::MAX)),
        );
        headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from(u64::try_from(seconds).unwrap_or(u64::MAX)),
        );
        headers
    }

    /// Records that batch `batch` was created (once per batch).
    pub(crate) fn record_batch_created(&self, batch: &str) -> io::Result<()> {
        self.record(EventKind::Created, batch, Vec::new())
    }

    /// Records that batch `batch` took these requests on (once per batch).
    pub(crate) fn record_submitted<'a>(
        &self,
        batch: &str,
        custom_ids: impl IntoIterator<Item = &'a str>,
    ) -> io::Result<()> {
        self.record(
            EventKind::Submitted,
            batch,
            custom_ids.into_iter().collect(),
        )
    }

    /// Records that the work `key` (a batch id, or a step of one) produced
    /// success (2xx) lines for these requests. Recording the same key again,
    /// as a batch re-run after a restart does, changes nothing.
    pub(crate) fn record_billed<'a>(
        &self,
        key: &str,
        custom_ids: impl IntoIterator<Item = &'a str>,
    ) -> io::Result<()> {
        self.record(EventKind::Billed, key, custom_ids.into_iter().collect())
    }

    /// Whether an event of `kind` was recorded for `key`.
    pub(crate) fn recorded(&self, kind: EventKind, key: &str) -> bool {
        lock(&self.books).applied.contains(&kind.tag(key))
    }

    /// Applies one event to the ledger unless one of its kind was already
    /// applied for `key`; journals it first when durable.
    fn record(&self, kind: EventKind, key: &str, ids: Vec<&str>) -> io::Result<()> {
        if kind == EventKind::Billed && ids.is_empty() {
            // Nothing to bill: nothing to remember either.
            return Ok(());
        }
        let mut books = lock(&self.books);
        let tag = kind.tag(key);
        if books.applied.contains(&tag) {
            return Ok(());
        }
        if let Some(journal) = &mut books.journal {
            journal.append(&EventOut {
                kind,
                key,
                ids: &ids,
            })?;
        }
        books.ledger.apply(kind, ids);
        books.applied.insert(tag);
        Ok(())
    }
}

/// The billing journal's file name, in the data directory.
const LEDGER_FILE: &str = "ledger.jsonl";

/// The ledger, what has been applied to it, and its journal.
#[derive(Default)]
struct Books {
    ledger: Ledger,
    /// `kind:key` of every event applied, so none is applied twice.
    applied: HashSet<String>,
    /// The append-only journal, when durable.
    journal: Option<Journal>,
}

/// What a ledger event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum EventKind {
    Created,
    Submitted,
    Billed,
}

impl EventKind {
    fn tag(self, key: &str) -> String {
        let kind = match self {
            Self::Created => "created",
            Self::Submitted => "submitted",
            Self::Billed => "billed",
        };
        format!("{kind}:{key}")
    }
}

/// One journal line, as written.
#[derive(Serialize)]
struct EventOut<'a> {
    kind: EventKind,
    key: &'a str,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    ids: &'a [&'a str],
}

/// One journal line, as read back.
#[derive(Deserialize)]
struct EventIn {
    kind: EventKind,
    key: String,
    #[serde(default)]
    ids: Vec<String>,
}

/// `ledger.jsonl`, open for appending.
struct Journal {
    file: File,
    /// Bytes of whole lines in the file.
    len: u64,
}

impl Journal {
    /// Appends one line and syncs it; on failure, cuts any partial line.
    fn append(&mut self, event: &EventOut<'_>) -> io::Result<()> {
        let mut line = serde_json::to_vec(event).map_err(io::Error::other)?;
        line.push(b'\n');
        let written = self
            .file
            .write_all(&line)
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.len += line.len() as u64;
                Ok(())
            }
            Err(err) => {
                let _ = self.file.set_len(self.len);
                Err(err)
            }
        }
    }
}

impl Books {
    /// Rebuilds the ledger from the journal at `path` (created if missing).
    /// A partial last line, left by a crash mid-append, is cut off.
    fn replay(path: &std::path::Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        let mut books = Self::default();
        let mut reader = BufReader::new(&file);
        let mut line = Vec::new();
        let mut len: u64 = 0;
        loop {
            line.clear();
            let read = reader.read_until(b'\n', &mut line)?;
            if read == 0 || line.last() != Some(&b'\n') {
                break;
            }
            len += read as u64;
            match serde_json::from_slice::<EventIn>(&line) {
                Ok(event) => {
                    let tag = event.kind.tag(&event.key);
                    if books.applied.insert(tag) {
                        books
                            .ledger
                            .apply(event.kind, event.ids.iter().map(String::as_str).collect());
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "sim: skipping an unreadable ledger line");
                }
            }
        }
        drop(reader);
        if file.metadata()?.len() != len {
            file.set_len(len)?;
        }
        books.journal = Some(Journal { file, len });
        Ok(books)
    }
}

/// What `GET /sim/stats` reports.
#[derive(Debug, Default, Serialize)]
struct Ledger {
    batches_created: u64,
    requests_submitted: u64,
    requests_billed: u64,
    /// Hashed, not ordered: it is looked up once per request and event, and
    /// sorted only when `/sim/stats` is read.
    #[serde(serialize_with = "sorted")]
    custom_ids: HashMap<String, CustomIdCounts>,
}

/// Serialises a map with its keys in order, so `/sim/stats` reads the same
/// for the same books.
fn sorted<S: serde::Serializer>(
    map: &HashMap<String, CustomIdCounts>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_map(map.iter().collect::<BTreeMap<_, _>>())
}

#[derive(Debug, Default, Serialize)]
struct CustomIdCounts {
    /// How many batches took this custom_id on: counted when a batch passes
    /// validation and starts running, so batches that failed validation (or
    /// were cancelled while validating) count for nothing.
    submitted: u64,
    /// How many batches produced a success line for it.
    billed: u64,
}

impl Ledger {
    fn entry(&mut self, custom_id: &str) -> &mut CustomIdCounts {
        // Billing finds the custom_ids submission added: no key to copy.
        if !self.custom_ids.contains_key(custom_id) {
            self.custom_ids
                .insert(custom_id.to_owned(), CustomIdCounts::default());
        }
        self.custom_ids
            .get_mut(custom_id)
            .expect("the custom_id was just inserted")
    }

    fn apply(&mut self, kind: EventKind, ids: Vec<&str>) {
        match kind {
            EventKind::Created => self.batches_created += 1,
            EventKind::Submitted => {
                for custom_id in ids {
                    self.requests_submitted += 1;
                    self.entry(custom_id).submitted += 1;
                }
            }
            EventKind::Billed => {
                for custom_id in ids {
                    self.requests_billed += 1;
                    self.entry(custom_id).billed += 1;
                }
            }
        }
    }
}

fn roll(dice: &Mutex<StdRng>, rate: f64) -> bool {
    if rate.is_nan() || rate <= 0.0 {
        return false;
    }
    lock(dice).random::<f64>() < rate
}

/// Locks a mutex, ignoring poisoning: every critical section here leaves the
/// data consistent, so a panic elsewhere must not take the simulator down.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Current time as Unix seconds, the providers' timestamp unit.
pub(crate) fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Current time as Unix milliseconds, the unit of the timestamps a batch's
/// lifecycle resumes from.
pub(crate) fn unix_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// `start_ms` plus `duration`, in Unix milliseconds.
pub(crate) fn deadline(start_ms: i64, duration: Duration) -> i64 {
    start_ms.saturating_add(i64::try_from(duration.as_millis()).unwrap_or(i64::MAX))
}

/// Sleeps until the Unix-millisecond `deadline_ms` (at once if it passed,
/// as it may have while the simulator was down) or until the batch is
/// cancelled; says whether it is.
pub(crate) async fn pause_until(deadline_ms: i64, cancel: &CancellationToken) -> bool {
    let left = u64::try_from(deadline_ms.saturating_sub(unix_millis())).unwrap_or(0);
    pause(Duration::from_millis(left), cancel).await
}

/// How far through a phase of length `duration` that began at `start_ms`
/// the instant `at_ms` is, as a fraction (not clamped).
pub(crate) fn progress(start_ms: i64, at_ms: i64, duration: Duration) -> f64 {
    (at_ms.saturating_sub(start_ms)) as f64 / (duration.as_secs_f64() * 1000.0)
}

/// An instant as RFC 3339 with microseconds, as Anthropic and xAI write
/// them: `2024-08-20T18:37:24.100435Z`.
pub(crate) fn rfc3339(instant: chrono::DateTime<chrono::Utc>) -> String {
    instant.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// `floor(total * fraction)`, with the fraction clamped to `[0, 1]` (NaN
/// counts as 1): how many requests of a batch ran before it was stopped.
pub(crate) fn share(total: u64, fraction: f64) -> u64 {
    let fraction = if fraction.is_nan() {
        1.0
    } else {
        fraction.clamp(0.0, 1.0)
    };
    ((total as f64 * fraction).floor() as u64).min(total)
}

/// Sleeps for `duration` or until the batch is cancelled; says whether it is.
pub(crate) async fn pause(duration: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(duration) => cancel.is_cancelled(),
        () = cancel.cancelled() => true,
    }
}

/// Runs file work on a blocking thread.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(io::Error::other)?
}

/// `len` random lowercase hex digits.
/// The XXH3 hash of `value`'s compact JSON (the bytes of
/// `value.to_string()`), written straight into the hasher: simulated ids and
/// replies derive from the request without a copy of it per line.
fn json_hasher(value: &serde_json::Value, seed: u64) -> xxhash_rust::xxh3::Xxh3 {
    struct Hashing(xxhash_rust::xxh3::Xxh3);
    impl Write for Hashing {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.update(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut hashing = Hashing(xxhash_rust::xxh3::Xxh3::with_seed(seed));
    serde_json::to_writer(&mut hashing, value).expect("a hasher takes every write");
    hashing.0
}

/// 64-bit [`json_hasher`] digest.
pub(crate) fn json_digest64(value: &serde_json::Value, seed: u64) -> u64 {
    json_hasher(value, seed).digest()
}

/// 128-bit [`json_hasher`] digest.
pub(crate) fn json_digest128(value: &serde_json::Value, seed: u64) -> u128 {
    json_hasher(value, seed).digest128()
}

pub(crate) fn random_hex(len: usize) -> String {
    use std::fmt::Write as _;
    let mut rng = rand::rng();
    let mut hex = String::with_capacity(len.next_multiple_of(16));
    while hex.len() < len {
        // Sixteen uniform digits a draw.
        let _ = write!(hex, "{:016x}", rng.random::<u64>());
    }
    hex.truncate(len);
    hex
}

/// `len` random base-62 characters, as in OpenAI's `file-…` ids.
pub(crate) fn random_base62(len: usize) -> String {
    const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_digests_are_those_of_the_serialised_value() {
        use xxhash_rust::xxh3::{xxh3_128_with_seed, xxh3_64_with_seed};
        // Short, mid and long inputs take different paths through XXH3.
        for len in [0, 10, 200, 300, 1_000, 5_000] {
            let value = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "é\"x ".repeat(len)}], "n": len});
            let text = value.to_string();
            for seed in [0, 1_700_000_000] {
                assert_eq!(
                    json_digest64(&value, seed),
                    xxh3_64_with_seed(text.as_bytes(), seed)
                );
                assert_eq!(
                    json_digest128(&value, seed),
                    xxh3_128_with_seed(text.as_bytes(), seed)
                );
            }
        }
    }

    #[test]
    fn random_hex_has_the_asked_length_and_alphabet() {
        for len in [0, 8, 16, 32, 33] {
            let hex = random_hex(len);
            assert_eq!(hex.len(), len);
            assert!(
                hex.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "{hex}"
            );
        }
        assert_ne!(random_hex(32), random_hex(32));
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let sim = Sim::new(SimConfig {
            retry_after: Duration::from_millis(1500),
            ..SimConfig::default()
        })
        .expect("sim");
        let headers = sim.retry_after_headers();
        assert_eq!(headers["retry-after-ms"], "1500");
        assert_eq!(headers["retry-after"], "2");

        let sim = Sim::new(SimConfig::default()).expect("sim");
        let headers = sim.retry_after_headers();
        assert_eq!(headers["retry-after-ms"], "100");
        assert_eq!(headers["retry-after"], "1");
    }

    #[test]
    fn dice_respect_extreme_rates() {
        let sim = Sim::new(SimConfig {
            http_429_rate: 1.0,
            ..SimConfig::default()
        })
        .expect("sim");
        assert_eq!(sim.roll_call_fault(), Some(CallFault::RateLimited));
        assert!(!sim.roll_batch_fate(0.0));
        assert!(!sim.roll_batch_fate(f64::NAN));
        assert!(sim.roll_batch_fate(1.0));
    }

    #[test]
    fn shares_are_floored_and_clamped() {
        assert_eq!(share(10, 0.25), 2);
        assert_eq!(share(10, 1.5), 10);
        assert_eq!(share(10, -1.0), 0);
        assert_eq!(share(3, f64::NAN), 3);
    }

    #[test]
    fn rfc3339_has_microseconds() {
        let instant = chrono::DateTime::from_timestamp(1_724_179_044, 100_435_000).expect("time");
        assert_eq!(rfc3339(instant), "2024-08-20T18:37:24.100435Z");
    }

    #[test]
    fn ledger_counts_per_custom_id() {
        let sim = Sim::new(SimConfig::default()).expect("sim");
        sim.record_submitted("b1", ["a", "b"]).unwrap();
        sim.record_submitted("b2", ["a"]).unwrap();
        sim.record_billed("b1", ["a"]).unwrap();
        let books = lock(&sim.books);
        let ledger = &books.ledger;
        assert_eq!(ledger.requests_submitted, 3);
        assert_eq!(ledger.requests_billed, 1);
        assert_eq!(ledger.custom_ids["a"].submitted, 2);
        assert_eq!(ledger.custom_ids["a"].billed, 1);
        assert_eq!(ledger.custom_ids["b"].billed, 0);
        drop(books);
        // `/sim/stats` lists them in order, whatever the map's.
        sim.record_submitted("b3", ["z", "0", "c", "y", "1"])
            .unwrap();
        let stats = serde_json::to_string(&lock(&sim.books).ledger).unwrap();
        let at = |id: &str| stats.find(&format!("\"{id}\":{{")).expect(id);
        let listed = ["0", "1", "a", "b", "c", "y", "z"].map(at);
        assert!(listed.is_sorted(), "{stats}");
    }

    #[test]
    fn each_event_is_applied_once_per_key() {
        let sim = Sim::new(SimConfig::default()).expect("sim");
        sim.record_batch_created("b1").unwrap();
        sim.record_batch_created("b1").unwrap();
        sim.record_billed("b1", ["a", "b"]).unwrap();
        sim.record_billed("b1", ["a", "b"]).unwrap();
        sim.record_billed("b1#2", ["c"]).unwrap();
        assert!(sim.recorded(EventKind::Billed, "b1"));
        assert!(!sim.recorded(EventKind::Submitted, "b1"));
        let books = lock(&sim.books);
        assert_eq!(books.ledger.batches_created, 1);
        assert_eq!(books.ledger.requests_billed, 3);
        assert_eq!(books.ledger.custom_ids["a"].billed, 1);
    }

    #[test]
    fn the_ledger_is_replayed_from_its_journal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = SimConfig {
            data_dir: Some(dir.path().to_path_buf()),
            ..SimConfig::default()
        };
        {
            let sim = Sim::new(config.clone()).expect("sim");
            sim.record_batch_created("b1").unwrap();
            sim.record_submitted("b1", ["a", "b"]).unwrap();
            sim.record_billed("b1", ["a"]).unwrap();
        }
        // A crash in the middle of an append leaves a partial line.
        let journal = dir.path().join(LEDGER_FILE);
        let mut file = OpenOptions::new().append(true).open(&journal).unwrap();
        file.write_all(br#"{"kind":"billed","key":"b2","ids":["#)
            .unwrap();
        drop(file);

        let sim = Sim::new(config.clone()).expect("sim");
        // Re-billing the same batch after the restart changes nothing.
        sim.record_billed("b1", ["a"]).unwrap();
        sim.record_billed("b2", ["b"]).unwrap();
        {
            let books = lock(&sim.books);
            assert_eq!(books.ledger.batches_created, 1);
            assert_eq!(books.ledger.requests_submitted, 2);
            assert_eq!(books.ledger.requests_billed, 2);
            assert_eq!(books.ledger.custom_ids["a"].billed, 1);
            assert_eq!(books.ledger.custom_ids["b"].billed, 1);
        }
        drop(sim);
        let text = std::fs::read_to_string(&journal).unwrap();
        assert!(text.ends_with('\n'));
        assert_eq!(text.lines().count(), 4, "{text}");
        let sim = Sim::new(config).expect("sim");
        assert_eq!(lock(&sim.books).ledger.requests_billed, 2);
    }

    #[test]
    fn order_stamps_only_go_up() {
        let sim = Sim::new(SimConfig::default()).expect("sim");
        let first = sim.order_stamp();
        sim.saw_order_stamp(first + 1_000_000_000_000);
        let second = sim.order_stamp();
        assert!(second > first + 1_000_000_000_000);
        assert!(sim.order_stamp() > second);
    }
}
