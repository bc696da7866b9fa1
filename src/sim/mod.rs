//! The provider simulator: a local, faithful stand-in for the providers'
//! batch APIs, used by the integration tests, the demo and the benchmarks.
//!
//! Each provider module contributes its own sub-router under its own prefix
//! (`/openai/v1`, plus the plain `/v1` alias for tools that assume it) and
//! shares what is common from here: the configuration, the seeded dice that
//! inject faults, the data directory, and the billing ledger that
//! `GET /sim/stats` reports so tests can prove no request was paid twice.
//! A provider module exposes `router(Arc<Sim>) -> io::Result<Router>`,
//! renders the faults `Sim::roll_call_fault` picks in its own error shape,
//! and is nested in `build` below.
//!
//! The simulator never talks to a real provider and never holds a whole file
//! in memory: uploads, input files and result files are streamed to and from
//! disk. Fault injection applies to the provider routes only, never to
//! `/sim/*`.

pub mod openai;

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{extract::State, Router};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// Knobs of the simulator. Rates are fractions in `[0, 1]`; values outside
/// are clamped (a rate of 0 never fires, 1 always does).
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Where files live; `None` = a fresh temp dir kept for the server's life.
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
    /// Fraction of batches that fail validation as a whole.
    pub fail_rate: f64,
    /// Fraction of batches that go `validating -> failed` with
    /// `token_limit_exceeded`.
    pub token_limit_rate: f64,
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
            fail_rate: 0.0,
            token_limit_rate: 0.0,
            expire_rate: 0.0,
            expire_completed_fraction: 0.0,
            http_429_rate: 0.0,
            http_5xx_rate: 0.0,
            ambiguous_create_rate: 0.0,
            retry_after: Duration::from_millis(100),
            seed: 0,
        }
    }
}

/// Serves the simulator on `listener` until `shutdown` is cancelled; batches
/// still running then are abandoned.
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
    served
}

/// The router [`serve`] serves: every provider API plus `/sim/stats`.
pub fn router(config: SimConfig) -> io::Result<Router> {
    Ok(build(config)?.0)
}

fn build(config: SimConfig) -> io::Result<(Router, Arc<Sim>)> {
    let sim = Arc::new(Sim::new(config)?);
    let openai = openai::router(Arc::clone(&sim))?;
    let app = Router::new()
        .route("/sim/stats", get(stats))
        .with_state(Arc::clone(&sim))
        .nest("/openai/v1", openai.clone())
        .nest("/v1", openai);
    Ok((app, sim))
}

async fn stats(State(sim): State<Arc<Sim>>) -> Response {
    // Serialized under the lock: the ledger can hold one entry per custom_id
    // ever seen, and copying it first would double that.
    let body = serde_json::to_vec(&*lock(&sim.ledger));
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
    /// Per-call faults (429, 5xx, ambiguous creates).
    call_dice: Mutex<StdRng>,
    /// Per-batch fates (fail, token limit, expire), on their own stream so
    /// that how often clients poll does not change which batches fail.
    batch_dice: Mutex<StdRng>,
    ledger: Mutex<Ledger>,
    shutdown: CancellationToken,
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
        Ok(Self {
            call_dice: Mutex::new(StdRng::seed_from_u64(config.seed)),
            batch_dice: Mutex::new(StdRng::seed_from_u64(config.seed ^ 0x9e37_79b9_7f4a_7c15)),
            ledger: Mutex::new(Ledger::default()),
            shutdown: CancellationToken::new(),
            config,
            data_dir,
            _temp_dir: temp_dir,
        })
    }

    pub(crate) fn config(&self) -> &SimConfig {
        &self.config
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

    pub(crate) fn record_batch_created(&self) {
        lock(&self.ledger).batches_created += 1;
    }

    /// Records that a batch took these requests on (once per batch each).
    pub(crate) fn record_submitted<'a>(&self, custom_ids: impl IntoIterator<Item = &'a str>) {
        let mut ledger = lock(&self.ledger);
        for custom_id in custom_ids {
            ledger.requests_submitted += 1;
            ledger.entry(custom_id).submitted += 1;
        }
    }

    /// Records that a batch produced a success (2xx) line for these requests.
    pub(crate) fn record_billed<'a>(&self, custom_ids: impl IntoIterator<Item = &'a str>) {
        let mut ledger = lock(&self.ledger);
        for custom_id in custom_ids {
            ledger.requests_billed += 1;
            ledger.entry(custom_id).billed += 1;
        }
    }
}

/// What `GET /sim/stats` reports.
#[derive(Debug, Default, Serialize)]
struct Ledger {
    batches_created: u64,
    requests_submitted: u64,
    requests_billed: u64,
    custom_ids: BTreeMap<String, CustomIdCounts>,
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
        self.custom_ids.entry(custom_id.to_owned()).or_default()
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

/// `len` random lowercase hex digits.
pub(crate) fn random_hex(len: usize) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from(HEX[rng.random_range(0..HEX.len())]))
        .collect()
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
    fn ledger_counts_per_custom_id() {
        let sim = Sim::new(SimConfig::default()).expect("sim");
        sim.record_submitted(["a", "b"]);
        sim.record_submitted(["a"]);
        sim.record_billed(["a"]);
        let ledger = lock(&sim.ledger);
        assert_eq!(ledger.requests_submitted, 3);
        assert_eq!(ledger.requests_billed, 1);
        assert_eq!(ledger.custom_ids["a"].submitted, 2);
        assert_eq!(ledger.custom_ids["a"].billed, 1);
        assert_eq!(ledger.custom_ids["b"].billed, 0);
    }
}
