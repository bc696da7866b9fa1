//! One batch's life, `in_progress → [canceling →] ended` (PROVIDERS.md
//! 2.4), driven by a background task per batch.
//!
//! The batch sits in `in_progress` for `batch_duration`, then reads its
//! requests file line by line on a blocking thread and writes one result
//! line per request (2.6). Only one request and a small chunk of result
//! lines (shuffled, because Anthropic's results are unordered) are in memory
//! at a time. Counts stay `processing = n` until the batch has ended; then
//! they are what the lines say.
//!
//! Each step is saved in the batch's record before the next begins, so a
//! simulator restarted on the same data directory resumes the batch from
//! what the record says: without a plan, it waits out the rest of its time
//! (counted from `created_ms`; a cancel counts from when it was asked) and
//! fixes which requests run; with a plan but no outcome, the requests run
//! again. Results go to a `.part` file; the successes are billed in one
//! ledger event keyed by the batch, which the ledger applies at most once;
//! only then is the file published and the batch ended. A re-run therefore
//! never bills twice, and nobody saw the lost attempt (results are served
//! only once the batch has ended).

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use xxhash_rust::xxh3::xxh3_64;

use super::{message_body, Anthropic, ProcessingStatus, RequestCounts};
use crate::sim::openai::{dropped_result, injected_error, injected_error_status};
use crate::sim::store::{self, part_path};
use crate::sim::{deadline, pause_until, progress, random_base62, rfc3339, share, unix_millis};

/// Result lines shuffled together before they are written.
const SHUFFLE_CHUNK: usize = 64;
/// Buffer size for reading requests and writing results.
const IO_BUFFER_BYTES: usize = 256 * 1024;
/// The message of every request of a batch the `fail_rate` dice picked.
const FAILED_BATCH_MESSAGE: &str =
    "params: the request failed validation (simulated whole-batch failure)";
/// The message of an injected `invalid_request_error`.
const PROMPT_TOO_LONG: &str = "prompt is too long: 210000 tokens > 200000 maximum";

/// What the dice decided for a batch when it was created.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub(super) struct Fate {
    /// Every request errors: Anthropic has no failed batch.
    pub(super) fail: bool,
    /// Ends before every request has run; the rest expire.
    pub(super) expire: bool,
}

/// Which requests of a batch run, fixed (and saved) before any does, so a
/// re-run after a restart runs the same ones.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(super) struct Plan {
    /// The first `ran` requests (file order) reach the model.
    ran: u64,
    /// Why the rest do not.
    tail: Option<Tail>,
}

/// What the published results hold.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(super) struct Outcome {
    counts: RequestCounts,
    /// When the results were published (Unix milliseconds).
    at_ms: i64,
}

/// Runs the batch until it has ended, or until the simulator shuts down (a
/// simulator started later on the same data directory carries on).
pub(super) async fn drive(state: Arc<Anthropic>, id: String, cancel: CancellationToken) {
    let shutdown = state.sim.shutdown().clone();
    tokio::select! {
        () = shutdown.cancelled() => {}
        result = run(&state, &id, &cancel) => {
            let Err(err) = result else { return };
            if shutdown.is_cancelled() {
                // Cut short by the shutdown, not broken.
                return;
            }
            // There is no failed batch to report this with: end it with
            // every request errored and no results, as a lost batch.
            tracing::error!(batch_id = %id, error = %err, "sim anthropic: batch could not be processed");
            state.update_batch(&id, |batch| {
                let total = batch.request_counts.processing;
                batch.request_counts = RequestCounts { errored: total, ..RequestCounts::default() };
                batch.processing_status = ProcessingStatus::Ended;
                batch.ended_at = Some(rfc3339(chrono::Utc::now()));
            });
            if let Err(err) = state.save(&id).await {
                tracing::error!(batch_id = %id, error = %err, "sim anthropic: batch could not be recorded");
            }
        }
    }
}

/// Carries the batch on from wherever its record says it is.
async fn run(state: &Arc<Anthropic>, id: &str, cancel: &CancellationToken) -> io::Result<()> {
    let config = state.sim.config().clone();
    let Some((status, total, life)) = state.update(id, |batch, life| {
        (
            batch.processing_status,
            batch.request_counts.processing,
            life.clone(),
        )
    }) else {
        return Ok(());
    };
    if status == ProcessingStatus::Ended {
        return Ok(());
    }
    let plan = match life.plan {
        Some(plan) => plan,
        None => {
            let started = life.created_ms;
            let duration = config.batch_duration;
            let cancelled = pause_until(deadline(started, duration), cancel).await;
            let plan = state.update(id, |_, life| {
                let plan = if cancelled {
                    // The requests due before the cancel ran.
                    let asked = life.cancel_ms.unwrap_or_else(unix_millis);
                    Plan {
                        ran: share(total, progress(started, asked, duration)),
                        tail: Some(Tail::Canceled),
                    }
                } else if life.fate.expire {
                    Plan {
                        ran: share(total, config.expire_completed_fraction),
                        tail: Some(Tail::Expired),
                    }
                } else {
                    Plan {
                        ran: total,
                        tail: None,
                    }
                };
                life.plan = Some(plan);
                plan
            });
            let Some(plan) = plan else {
                return Ok(());
            };
            state.save(id).await?;
            plan
        }
    };
    let canceled = matches!(plan.tail, Some(Tail::Canceled));
    let outcome = match life.outcome {
        Some(outcome) => outcome,
        None => {
            let outcome = execute(state, id, plan, life.fate).await?;
            state.update(id, |_, life| life.outcome = Some(outcome));
            if canceled {
                // Saved before `canceling` waits: the results are out.
                state.save(id).await?;
            }
            outcome
        }
    };
    if canceled {
        // `canceling` lasts a moment after the results are out.
        pause_until(
            deadline(outcome.at_ms, config.finalize_duration),
            &CancellationToken::new(),
        )
        .await;
    }
    state.update_batch(id, |batch| {
        batch.processing_status = ProcessingStatus::Ended;
        batch.ended_at = Some(rfc3339(chrono::Utc::now()));
        batch.request_counts = outcome.counts;
    });
    state.save(id).await?;
    tracing::debug!(batch_id = %id, counts = ?outcome.counts, "sim anthropic: batch ended");
    Ok(())
}

/// Runs the plan: writes the results file under a temporary name, bills
/// the successes, then publishes the file.
async fn execute(state: &Arc<Anthropic>, id: &str, plan: Plan, fate: Fate) -> io::Result<Outcome> {
    let config = state.sim.config();
    let results = state.results_path(id);
    let job = Job {
        batch_id: id.to_owned(),
        requests: state.requests_path(id),
        results: part_path(&results),
        ran: plan.ran,
        tail: plan.tail,
        fail: fate.fail,
        error_rate: config.error_rate,
        drop_rate: config.drop_rate,
        seed: config.seed,
        shutdown: state.sim.shutdown().clone(),
    };
    let sim = Arc::clone(&state.sim);
    let counts = state
        .sim
        .blocking(move || {
            let (counts, billed) = run_requests(&job)?;
            // The commit point: once billed, a re-run bills nothing more.
            sim.record_billed(&job.batch_id, billed.iter().map(String::as_str))?;
            store::publish(&job.results, &results)?;
            Ok(counts)
        })
        .await?;
    Ok(Outcome {
        counts,
        at_ms: unix_millis(),
    })
}

/// Why requests past the ones that ran never ran.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Tail {
    Canceled,
    Expired,
}

/// Everything [`run_requests`] needs, owned so it can move to a blocking
/// thread.
struct Job {
    batch_id: String,
    requests: PathBuf,
    results: PathBuf,
    /// Requests (file order) that reach the model; the rest get `tail`.
    ran: u64,
    tail: Option<Tail>,
    fail: bool,
    error_rate: f64,
    drop_rate: f64,
    seed: u64,
    /// The simulator stopping: the work stops too, to be redone later.
    shutdown: CancellationToken,
}

/// Runs the first `job.ran` requests and writes every result line; returns
/// the counts and the custom_ids of the successes, to bill.
fn run_requests(job: &Job) -> io::Result<(RequestCounts, Vec<String>)> {
    let reader = BufReader::with_capacity(IO_BUFFER_BYTES, File::open(&job.requests)?);
    let mut sink = ResultSink {
        out: BufWriter::with_capacity(IO_BUFFER_BYTES, File::create(&job.results)?),
        chunk: Vec::with_capacity(SHUFFLE_CHUNK),
        shuffle: StdRng::seed_from_u64(xxh3_64(job.batch_id.as_bytes())),
        counts: RequestCounts::default(),
        billed: Vec::new(),
    };
    for (index, line) in (0u64..).zip(reader.lines()) {
        if job.shutdown.is_cancelled() {
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "the simulator is shutting down",
            ));
        }
        let line = line?;
        // Written by `intake` from checked items, so it always parses.
        let Ok(request) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let custom_id = request["custom_id"].as_str().unwrap_or_default();
        let result = if index < job.ran && dropped_result(custom_id, job.drop_rate, job.seed) {
            // Lost by the provider: counted, never in the results.
            sink.counts.succeeded += 1;
            continue;
        } else if index < job.ran {
            run_request(job, custom_id, &request["params"])
        } else {
            match job.tail {
                Some(Tail::Canceled) => json!({"type": "canceled"}),
                Some(Tail::Expired) => json!({"type": "expired"}),
                // `ran` is the whole batch when there is no tail.
                None => continue,
            }
        };
        sink.push(custom_id, result)?;
    }
    sink.finish()
}

/// The `result` of one request that reached the model.
fn run_request(job: &Job, custom_id: &str, params: &Value) -> Value {
    let error = if job.fail {
        Some(("invalid_request_error", FAILED_BATCH_MESSAGE))
    } else if injected_error(custom_id, job.error_rate, job.seed) {
        Some(if injected_error_status(custom_id, job.seed) == 400 {
            ("invalid_request_error", PROMPT_TOO_LONG)
        } else {
            ("api_error", "Internal server error")
        })
    } else {
        None
    };
    match error {
        // The error is a full error response, so it nests (PROVIDERS.md 2.6).
        Some((kind, message)) => json!({
            "type": "errored",
            "error": {
                "type": "error",
                "error": {"type": kind, "message": message},
                "request_id": format!("req_011C{}", random_base62(20)),
            },
        }),
        None => json!({"type": "succeeded", "message": message_body(params, &job.batch_id)}),
    }
}

/// Collects result lines a chunk at a time, shuffles each chunk and
/// appends it to the results file, noting its successes.
struct ResultSink {
    out: BufWriter<File>,
    chunk: Vec<(String, Value)>,
    shuffle: StdRng,
    counts: RequestCounts,
    /// The custom_ids of the success lines written.
    billed: Vec<String>,
}

impl ResultSink {
    fn push(&mut self, custom_id: &str, result: Value) -> io::Result<()> {
        self.chunk.push((custom_id.to_owned(), result));
        if self.chunk.len() >= SHUFFLE_CHUNK {
            self.flush_chunk()?;
        }
        Ok(())
    }

    fn flush_chunk(&mut self) -> io::Result<()> {
        self.chunk.shuffle(&mut self.shuffle);
        for (custom_id, result) in &self.chunk {
            match result["type"].as_str() {
                Some("succeeded") => self.counts.succeeded += 1,
                Some("errored") => self.counts.errored += 1,
                Some("canceled") => self.counts.canceled += 1,
                _ => self.counts.expired += 1,
            }
            let line = json!({"custom_id": custom_id, "result": result});
            serde_json::to_writer(&mut self.out, &line)?;
            self.out.write_all(b"\n")?;
        }
        self.out.flush()?;
        for (custom_id, result) in self.chunk.drain(..) {
            if result["type"] == "succeeded" {
                self.billed.push(custom_id);
            }
        }
        Ok(())
    }

    fn finish(mut self) -> io::Result<(RequestCounts, Vec<String>)> {
        self.flush_chunk()?;
        self.out.get_ref().sync_data()?;
        Ok((self.counts, self.billed))
    }
}
