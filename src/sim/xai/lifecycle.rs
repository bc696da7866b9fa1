//! One file-mode batch's life (PROVIDERS.md 3.4), driven by a background
//! task per batch. xAI has no status: what a client sees is the counters
//! and the cancel fields moving.
//!
//! 1. For `validate_duration` the counters stay 0; then the input file is
//!    read line by line. A broken line, an unsupported model or a duplicate
//!    custom_id makes xAI cancel the batch: `cancel_by_xai_message` is set
//!    and the counters stay 0.
//! 2. Otherwise `num_requests = num_pending = n`, and the requests run in a
//!    few steps across `batch_duration`, in file order: each step appends
//!    its rows to the results file (readable at once) and moves the
//!    counters and the cost.
//! 3. An expiring batch stops after `floor(n * expire_completed_fraction)`
//!    requests and leaves the rest pending (xAI has no expiry code) until
//!    the client cancels; a cancel turns every pending request into a
//!    `{"code":1,"message":"Batch cancelled"}` row.
//!
//! Only one line and one step's outcomes are in memory at a time, besides
//! the per-request metadata `GET /batches/{id}/requests` lists.
//!
//! Each step is saved in the batch's record, so a simulator restarted on
//! the same data directory resumes the batch from what the record says: a
//! batch not yet accepted is validated again once its validation time
//! (counted from `created_ms`) has passed; an accepted one carries on from
//! the batch's own copy of its input, at the first request not done. A step
//! is decided (`pending`) and saved before it runs; its rows are appended to
//! the results file, its successes billed in one ledger event keyed by the
//! batch and the step's first request (applied at most once), and only then
//! are the rows published (`results_len`) and the step saved. After a
//! restart, rows past `results_len` are cut off and a pending step is done
//! again as decided, so nothing is billed twice and no row is seen twice.
//! Steps fall due at `accepted.at_ms + k * step_time`, so a restart does not
//! stretch the batch's time.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::completions::{
    error_detail, is_batch_model, result_response, row_cost, BATCH_ENDPOINTS,
};
use super::{Batch, Life, RequestMeta, RequestState, Xai};
use crate::sim::openai::{dropped_result, injected_error};
use crate::sim::store;
use crate::sim::{deadline, pause_until, share, unix_millis};

/// Most requests one batch file may hold.
pub(super) const MAX_REQUESTS: u64 = 50_000;
/// Most steps a batch's requests are worked through in.
const MAX_STEPS: u64 = 4;
/// Buffer size for reading inputs and writing results.
const IO_BUFFER_BYTES: usize = 256 * 1024;
/// How every message of a file xAI refused begins.
const VALIDATION_FAILED: &str = "JSONL file validation failed";

/// What the dice decided for a batch when it was created.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub(super) struct Fate {
    /// xAI cancels the batch: its model is "not supported".
    pub(super) fail: bool,
    /// Some requests stay pending until the client cancels.
    pub(super) expire: bool,
}

/// When the file passed validation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Accepted {
    /// Unix milliseconds: the requests' `create_time`, and what the steps'
    /// due times count from.
    pub(super) at_ms: i64,
    /// The `created` of the response bodies (Unix seconds).
    created: i64,
}

/// Whether a step runs its requests or cancels them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Mode {
    Run,
    Cancel,
}

/// A committed step: the requests before `end` (file order) not done by an
/// earlier step were done in `mode` at `at_ms` (Unix milliseconds).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Step {
    pub(super) end: u64,
    pub(super) mode: Mode,
    pub(super) at_ms: i64,
}

/// A step decided and saved before it runs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(super) struct StepPlan {
    target: u64,
    mode: Mode,
}

/// Whether the batch's task still has something to do.
pub(super) fn has_work_left(batch: &Batch, life: &Life) -> bool {
    batch.input_file_id.is_some()
        && batch.cancel_by_xai_message.is_none()
        && (life.accepted.is_none()
            || life.pending.is_some()
            || life.done() < batch.state.num_requests)
}

/// The per-request metadata of a reloaded batch: validated again from the
/// batch's copy of its input, with the states its committed steps gave
/// (a run request failed if the error dice say so, as when it ran).
pub(super) fn reload_requests(state: &Xai, id: &str, life: &Life) -> io::Result<Vec<RequestMeta>> {
    if life.accepted.is_none() {
        return Ok(Vec::new());
    }
    let input = File::open(state.input_copy_path(id))?;
    let mut requests: Vec<RequestMeta> = validate(&input)?
        .map_err(|message| io::Error::new(io::ErrorKind::InvalidData, message))?
        .into_iter()
        .map(|request| request.meta)
        .collect();
    let config = state.sim.config();
    let mut first = 0;
    for step in &life.steps {
        let end = usize::try_from(step.end)
            .unwrap_or(usize::MAX)
            .min(requests.len());
        let finish_time = chrono::DateTime::from_timestamp_millis(step.at_ms);
        for meta in requests.get_mut(first.min(end)..end).unwrap_or_default() {
            meta.state = match step.mode {
                Mode::Cancel => RequestState::Cancelled,
                Mode::Run
                    if injected_error(&meta.batch_request_id, config.error_rate, config.seed) =>
                {
                    RequestState::Failed
                }
                Mode::Run => RequestState::Succeeded,
            };
            meta.finish_time = finish_time;
        }
        first = end;
    }
    Ok(requests)
}

/// Works the batch until nothing is pending, or until the simulator shuts
/// down (a simulator started later on the same data directory carries on).
pub(super) async fn drive(state: Arc<Xai>, id: String, cancel: CancellationToken) {
    let shutdown = state.sim.shutdown().clone();
    tokio::select! {
        () = shutdown.cancelled() => {}
        result = run(&state, &id, &cancel) => {
            let Err(err) = result else { return };
            if shutdown.is_cancelled() {
                // Cut short by the shutdown, not broken.
                return;
            }
            tracing::error!(batch_id = %id, error = %err, "sim xai: batch could not be processed");
            state.cancel_by_xai(&id, format!("Batch processing failed: {err}"));
            if let Err(err) = state.save(&id).await {
                tracing::error!(batch_id = %id, error = %err, "sim xai: batch could not be recorded");
            }
        }
    }
}

/// Carries the batch on from wherever its record says it is.
async fn run(state: &Arc<Xai>, id: &str, cancel: &CancellationToken) -> io::Result<()> {
    let config = state.sim.config().clone();
    let Some((batch, life)) = state.batch_and_life(id) else {
        return Ok(());
    };
    let Some(input_file_id) = batch.input_file_id.clone() else {
        // An inline-mode batch: nothing to read.
        return Ok(());
    };
    if !has_work_left(&batch, &life) {
        return Ok(());
    }
    let (input, accepted) = match life.accepted.clone() {
        Some(accepted) => {
            let input = File::open(state.input_copy_path(id)).map_err(|err| {
                io::Error::new(
                    err.kind(),
                    format!("the batch's copy of its input file is unreadable: {err}"),
                )
            })?;
            (input, accepted)
        }
        None => match validate_batch(state, id, cancel, &input_file_id, &life).await? {
            Some(started) => started,
            // Refused.
            None => return Ok(()),
        },
    };

    let Some((total, done, results_len, pending)) = state.update(id, |batch, life| {
        (
            batch.state.num_requests,
            life.done(),
            life.results_len,
            life.pending,
        )
    }) else {
        return Ok(());
    };
    let (path, batch_id) = (state.results_path(id), id.to_owned());
    let (error_rate, drop_rate, seed, shutdown) = (
        config.error_rate,
        config.drop_rate,
        config.seed,
        state.sim.shutdown().clone(),
    );
    let mut runner = state
        .sim
        .blocking(move || {
            Runner::open(
                input,
                &path,
                done,
                results_len,
                Context {
                    batch_id,
                    created: accepted.created,
                    error_rate,
                    drop_rate,
                    seed,
                    shutdown,
                },
            )
        })
        .await?;
    if let Some(pending) = pending {
        // Decided before a restart: done as decided.
        runner = advance(state, runner, pending.target, pending.mode).await?;
    }

    let runnable = if life.fate.expire {
        share(total, config.expire_completed_fraction)
    } else {
        total
    };
    let steps = total.clamp(1, MAX_STEPS);
    let step_time = config.batch_duration / u32::try_from(steps).unwrap_or(1);
    let mut cancelled = cancel.is_cancelled();
    for step in 1..=steps {
        let target = share(total, step as f64 / steps as f64).min(runnable);
        if target <= runner.next {
            continue;
        }
        let due = deadline(
            accepted.at_ms,
            step_time * u32::try_from(step).unwrap_or(u32::MAX),
        );
        if cancelled || pause_until(due, cancel).await {
            cancelled = true;
            break;
        }
        runner = advance(state, runner, target, Mode::Run).await?;
    }
    if runner.next < total {
        // Expired requests stay pending until the client cancels.
        if !cancelled {
            cancel.cancelled().await;
        }
        runner = advance(state, runner, total, Mode::Cancel).await?;
    }
    tracing::debug!(batch_id = %id, done = runner.next, "sim xai: nothing pending");
    Ok(())
}

/// Waits out the validation time and reads the input file. Either refuses
/// the batch (`None`) or records its requests as pending.
async fn validate_batch(
    state: &Arc<Xai>,
    id: &str,
    cancel: &CancellationToken,
    input_file_id: &str,
    life: &Life,
) -> io::Result<Option<(File, Accepted)>> {
    let config = state.sim.config();
    // Counters stay 0 while the file is read.
    pause_until(deadline(life.created_ms, config.validate_duration), cancel).await;
    let input_path = state
        .file_exists(input_file_id)
        .then(|| state.file_path(input_file_id));
    let checked = match input_path {
        None => None,
        Some(path) => {
            state
                .sim
                .blocking(move || {
                    Ok(open_and_validate(&path)?.map(|(input, verdict)| (path, input, verdict)))
                })
                .await?
        }
    };
    let (path, input, requests) = match checked {
        None => {
            state.cancel_by_xai(
                id,
                format!("{VALIDATION_FAILED}: input file {input_file_id} not found"),
            );
            state.save(id).await?;
            return Ok(None);
        }
        Some((_, _, Err(message))) => {
            state.cancel_by_xai(id, message);
            state.save(id).await?;
            return Ok(None);
        }
        Some((path, input, Ok(requests))) => (path, input, requests),
    };
    if life.fate.fail {
        let first = &requests[0];
        state.cancel_by_xai(
            id,
            format!(
                "{VALIDATION_FAILED}: line {}: model '{}' is not supported for batch processing (simulated whole-batch failure)",
                first.line, first.meta.model
            ),
        );
        state.save(id).await?;
        return Ok(None);
    }

    if state.batch_records.durable() {
        // From here on a resumed batch reads its own copy, which the client
        // deleting the file leaves alone.
        let (copy, handle) = (state.input_copy_path(id), input.try_clone()?);
        state
            .sim
            .blocking(move || store::keep_copy(&path, &handle, &copy))
            .await?;
    }
    // The ledger before the record: if the record is lost, the batch is
    // validated again and the ledger ignores the repeat.
    let (sim, batch_id) = (Arc::clone(&state.sim), id.to_owned());
    let requests = state
        .sim
        .blocking(move || {
            sim.record_submitted(
                &batch_id,
                requests
                    .iter()
                    .map(|request| request.meta.batch_request_id.as_str()),
            )?;
            Ok(requests)
        })
        .await?;
    let total = requests.len() as u64;
    let now = unix_millis();
    let accepted = Accepted {
        at_ms: now,
        created: now.div_euclid(1000),
    };
    state.accept(
        id,
        requests.into_iter().map(|request| request.meta).collect(),
        accepted.clone(),
    );
    state.save(id).await?;
    tracing::debug!(batch_id = %id, total, "sim xai: batch accepted");
    Ok(Some((input, accepted)))
}

/// Runs (or cancels) requests up to `target` on a blocking thread, bills
/// the successes, then publishes their rows and counters. The step is saved
/// as decided before it runs, and as done after.
async fn advance(state: &Arc<Xai>, runner: Runner, target: u64, mode: Mode) -> io::Result<Runner> {
    let id = runner.context.batch_id.clone();
    let first = runner.next;
    state.update(&id, |_, life| {
        life.pending = Some(StepPlan { target, mode });
    });
    state.save(&id).await?;
    let sim = Arc::clone(&state.sim);
    let (runner, outcomes) = state
        .sim
        .blocking(move || {
            let (runner, outcomes) = runner.advance(target, mode)?;
            // The commit point: once billed, a re-run of the step bills
            // nothing more.
            sim.record_billed(
                &format!("{}#{first}", runner.context.batch_id),
                outcomes
                    .iter()
                    .filter_map(|outcome| outcome.billed.as_deref()),
            )?;
            Ok((runner, outcomes))
        })
        .await?;
    state.commit(&id, first, &outcomes, runner.results_len, mode);
    state.save(&id).await?;
    Ok(runner)
}

/// One request of a file that passed validation.
struct ValidRequest {
    /// Line number in the file, for messages.
    line: u64,
    meta: RequestMeta,
}

/// An opened input file and what validation said about it.
type CheckedInput = (File, Result<Vec<ValidRequest>, String>);

/// Opens the input file (`None` if it is gone) and validates it.
fn open_and_validate(path: &Path) -> io::Result<Option<CheckedInput>> {
    let input = match File::open(path) {
        Ok(input) => input,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err),
    };
    let verdict = validate(&input)?;
    // The requests are read again, from the top, through this handle.
    (&input).seek(SeekFrom::Start(0))?;
    Ok(Some((input, verdict)))
}

/// Checks every line of the input file, stopping at the first broken one
/// with xAI's `cancel_by_xai_message`. A file may mix endpoints and models.
fn validate(input: &File) -> io::Result<Result<Vec<ValidRequest>, String>> {
    let mut reader = BufReader::with_capacity(IO_BUFFER_BYTES, input);
    let mut buf = Vec::new();
    let mut line_number: u64 = 0;
    let mut requests = Vec::new();
    let mut custom_ids = HashSet::new();
    let mut models: HashMap<String, Arc<str>> = HashMap::new();
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        line_number += 1;
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if requests.len() as u64 >= MAX_REQUESTS {
            return Ok(Err(format!(
                "{VALIDATION_FAILED}: the file has more than the maximum of {MAX_REQUESTS} requests"
            )));
        }
        let (custom_id, endpoint, model) = match check_line(&buf) {
            Ok(checked) => checked,
            Err(problem) => {
                return Ok(Err(format!(
                    "{VALIDATION_FAILED}: line {line_number}: {problem}"
                )))
            }
        };
        if !custom_ids.insert(custom_id.clone()) {
            return Ok(Err(format!(
                "{VALIDATION_FAILED}: line {line_number}: duplicate custom_id '{custom_id}'"
            )));
        }
        let model = Arc::clone(
            models
                .entry(model)
                .or_insert_with_key(|model| Arc::from(model.as_str())),
        );
        requests.push(ValidRequest {
            line: line_number,
            meta: RequestMeta {
                batch_request_id: custom_id,
                endpoint,
                model,
                state: RequestState::Pending,
                finish_time: None,
            },
        });
    }
    if requests.is_empty() {
        return Ok(Err(format!(
            "{VALIDATION_FAILED}: the file contains no requests"
        )));
    }
    Ok(Ok(requests))
}

/// Checks one line; returns its custom_id, endpoint and model.
fn check_line(raw: &[u8]) -> Result<(String, &'static str, String), String> {
    let value =
        serde_json::from_slice::<Value>(raw).map_err(|err| format!("invalid JSON: {err}"))?;
    let Value::Object(fields) = value else {
        return Err("expected a JSON object".to_owned());
    };
    let custom_id = match fields.get("custom_id") {
        Some(Value::String(id)) if !id.is_empty() => id.clone(),
        Some(Value::String(_)) | None | Some(Value::Null) => {
            return Err("missing custom_id".to_owned())
        }
        Some(_) => return Err("custom_id must be a string".to_owned()),
    };
    match fields.get("method") {
        None | Some(Value::Null) => {}
        Some(Value::String(method)) if method.eq_ignore_ascii_case("POST") => {}
        Some(other) => {
            return Err(format!(
                "unsupported method {other}; only POST is supported"
            ))
        }
    }
    let url = match fields.get("url") {
        Some(Value::String(url)) => url.as_str(),
        _ => return Err("missing url".to_owned()),
    };
    let Some((endpoint, _)) = BATCH_ENDPOINTS
        .iter()
        .find(|(endpoint, _)| *endpoint == url)
    else {
        return Err(format!("unsupported url '{url}'"));
    };
    let Some(Value::Object(body)) = fields.get("body") else {
        return Err("missing body".to_owned());
    };
    let model = match body.get("model") {
        Some(Value::String(model)) if !model.is_empty() => model.clone(),
        _ => return Err("missing body.model".to_owned()),
    };
    if !is_batch_model(&model) {
        return Err(format!(
            "model '{model}' is not supported for batch processing"
        ));
    }
    Ok((custom_id, endpoint, model))
}

/// What became of one request in a step.
pub(super) struct Outcome {
    pub(super) state: RequestState,
    pub(super) endpoint: &'static str,
    pub(super) cost_usd_ticks: i64,
    /// The custom_id to bill, for successes.
    pub(super) billed: Option<String>,
}

/// Works through the input file in order, appending one row per request to
/// the results file; moves between the batch's task and blocking threads.
struct Runner {
    reader: BufReader<File>,
    results: BufWriter<File>,
    /// Bytes of complete rows written so far.
    results_len: u64,
    /// Requests (non-blank lines) done so far.
    next: u64,
    context: Context,
}

/// What a [`Runner`] needs besides its files.
struct Context {
    batch_id: String,
    created: i64,
    error_rate: f64,
    drop_rate: f64,
    seed: u64,
    /// The simulator stopping: the work stops too, to be redone later.
    shutdown: CancellationToken,
}

impl Runner {
    /// A runner at request `done` of `input`, appending to the results file
    /// at `results_len` (rows past it, from a step a restart cut short, are
    /// cut off).
    fn open(
        input: File,
        results: &Path,
        done: u64,
        results_len: u64,
        context: Context,
    ) -> io::Result<Self> {
        let mut reader = BufReader::with_capacity(IO_BUFFER_BYTES, input);
        reader.seek(SeekFrom::Start(0))?;
        let mut buf = Vec::new();
        let mut skipped = 0;
        while skipped < done {
            buf.clear();
            if reader.read_until(b'\n', &mut buf)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the input file ended after {skipped} requests"),
                ));
            }
            if !buf.iter().all(u8::is_ascii_whitespace) {
                skipped += 1;
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(results)?;
        file.set_len(results_len)?;
        Ok(Self {
            reader,
            results: BufWriter::with_capacity(IO_BUFFER_BYTES, file),
            results_len,
            next: done,
            context,
        })
    }

    fn advance(mut self, target: u64, mode: Mode) -> io::Result<(Self, Vec<Outcome>)> {
        let mut outcomes = Vec::new();
        let mut buf = Vec::new();
        while self.next < target {
            if self.context.shutdown.is_cancelled() {
                return Err(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "the simulator is shutting down",
                ));
            }
            buf.clear();
            if self.reader.read_until(b'\n', &mut buf)? == 0 {
                // Validation counted more requests than are there.
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the input file ended after {} requests", self.next),
                ));
            }
            if buf.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            // Validated through this very handle, so it parses.
            let request = serde_json::from_slice::<Value>(&buf).unwrap_or(Value::Null);
            let custom_id = request["custom_id"].as_str().unwrap_or_default();
            let url = request["url"].as_str().unwrap_or_default();
            let endpoint = BATCH_ENDPOINTS
                .iter()
                .find(|(endpoint, _)| *endpoint == url)
                .map_or("", |(endpoint, _)| endpoint);
            let (result, outcome) = match mode {
                Mode::Run => self.run_request(custom_id, endpoint, &request["body"]),
                Mode::Cancel => (
                    json!({"error": {"code": 1, "message": "Batch cancelled"}}),
                    Outcome {
                        state: RequestState::Cancelled,
                        endpoint,
                        cost_usd_ticks: 0,
                        billed: None,
                    },
                ),
            };
            if mode == Mode::Run
                && dropped_result(custom_id, self.context.drop_rate, self.context.seed)
            {
                // Lost by xAI: settled and counted, but no row, never billed.
                outcomes.push(Outcome {
                    billed: None,
                    cost_usd_ticks: 0,
                    ..outcome
                });
                self.next += 1;
                continue;
            }
            let row = json!({"batch_request_id": custom_id, "batch_result": result});
            let mut line = serde_json::to_vec(&row)?;
            line.push(b'\n');
            self.results.write_all(&line)?;
            self.results_len += line.len() as u64;
            outcomes.push(outcome);
            self.next += 1;
        }
        // Rows become readable only once they are whole on disk.
        self.results.flush()?;
        self.results.get_ref().sync_data()?;
        Ok((self, outcomes))
    }

    fn run_request(
        &self,
        custom_id: &str,
        endpoint: &'static str,
        body: &Value,
    ) -> (Value, Outcome) {
        if injected_error(custom_id, self.context.error_rate, self.context.seed) {
            return (
                json!({"error": error_detail(custom_id, self.context.seed)}),
                Outcome {
                    state: RequestState::Failed,
                    endpoint,
                    cost_usd_ticks: 0,
                    billed: None,
                },
            );
        }
        let response = result_response(endpoint, body, self.context.created).unwrap_or(Value::Null);
        let cost_usd_ticks = row_cost(&response);
        (
            json!({"response": response}),
            Outcome {
                state: RequestState::Succeeded,
                endpoint,
                cost_usd_ticks,
                billed: Some(custom_id.to_owned()),
            },
        )
    }
}

/// One page of rows from the results file: up to `limit` whole rows from
/// byte `from`, never past `committed` (rows still being written). `None`
/// if `from` is not the start of a row.
pub(super) fn read_rows(
    path: &Path,
    from: u64,
    committed: u64,
    limit: usize,
) -> io::Result<Option<(Vec<Box<serde_json::value::RawValue>>, u64)>> {
    use std::io::{Read, Seek, SeekFrom};

    if from > committed {
        return Ok(None);
    }
    if committed == 0 {
        return Ok(Some((Vec::new(), 0)));
    }
    let mut file = File::open(path)?;
    if from > 0 {
        file.seek(SeekFrom::Start(from - 1))?;
        let mut previous = [0u8; 1];
        file.read_exact(&mut previous)?;
        if previous[0] != b'\n' {
            return Ok(None);
        }
    }
    let mut reader = BufReader::new(file.take(committed - from));
    let mut rows = Vec::with_capacity(limit.min(1024));
    let mut offset = from;
    let mut line = Vec::new();
    while rows.len() < limit {
        line.clear();
        let read = reader.read_until(b'\n', &mut line)?;
        if read == 0 {
            break;
        }
        offset += read as u64;
        let row = serde_json::from_slice(&line).map_err(io::Error::other)?;
        rows.push(row);
    }
    Ok(Some((rows, offset)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate_text(text: &str) -> Result<Vec<ValidRequest>, String> {
        let mut file = tempfile::tempfile().expect("tempfile");
        file.write_all(text.as_bytes()).expect("write");
        file.seek(SeekFrom::Start(0)).expect("seek");
        validate(&file).expect("io")
    }

    fn line(custom_id: &str, url: &str, model: &str) -> String {
        format!(
            r#"{{"custom_id":"{custom_id}","method":"POST","url":"{url}","body":{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}}}"#
        )
    }

    #[test]
    fn a_file_may_mix_endpoints_and_models() {
        let text = format!(
            "{}\n\n{}\n{}\n",
            line("a", "/v1/chat/completions", "grok-4.3"),
            line("b", "/v1/responses", "grok-4-fast"),
            line("c", "/v1/images/generations", "grok-imagine-image"),
        );
        let requests = validate_text(&text).expect("valid");
        assert_eq!(requests.len(), 3);
        assert_eq!(requests[1].meta.endpoint, "/v1/responses");
        assert_eq!(&*requests[2].meta.model, "grok-imagine-image");
        assert_eq!(requests[2].line, 4);
    }

    #[test]
    fn each_broken_rule_names_its_line() {
        let chat = "/v1/chat/completions";
        let cases = [
            (format!("{}\nnot json\n", line("a", chat, "grok-4.3")), "JSONL file validation failed: line 2: invalid JSON: "),
            (format!("{}\n{}\n", line("a", chat, "grok-4.3"), line("a", chat, "grok-4.3")), "JSONL file validation failed: line 2: duplicate custom_id 'a'"),
            (line("a", chat, "gpt-4o-mini"), "JSONL file validation failed: line 1: model 'gpt-4o-mini' is not supported for batch processing"),
            (line("a", "/v1/embeddings", "grok-4.3"), "JSONL file validation failed: line 1: unsupported url '/v1/embeddings'"),
            (line("", chat, "grok-4.3"), "JSONL file validation failed: line 1: missing custom_id"),
            ("\n".to_owned(), "JSONL file validation failed: the file contains no requests"),
        ];
        for (text, expected) in cases {
            let message = validate_text(&text)
                .err()
                .unwrap_or_else(|| panic!("{expected}: accepted"));
            assert!(message.starts_with(expected), "{message}");
        }
    }

    #[test]
    fn more_than_fifty_thousand_requests_are_too_many() {
        let mut text = String::new();
        for i in 0..=MAX_REQUESTS {
            text.push_str(&line(&format!("r{i}"), "/v1/chat/completions", "grok-4.3"));
            text.push('\n');
        }
        let message = validate_text(&text).err().expect("refused");
        assert_eq!(
            message,
            "JSONL file validation failed: the file has more than the maximum of 50000 requests"
        );
    }

    #[test]
    fn rows_are_read_in_whole_pages_from_row_starts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("results.jsonl");
        let rows = "{\"a\":1}\n{\"b\":2}\n{\"c\":3}\n";
        std::fs::write(&path, rows).expect("write");
        let committed = rows.len() as u64;
        let (page, next) = read_rows(&path, 0, committed, 2).unwrap().unwrap();
        assert_eq!(page.len(), 2);
        assert_eq!(page[1].get(), "{\"b\":2}");
        let (page, end) = read_rows(&path, next, committed, 2).unwrap().unwrap();
        assert_eq!(page.len(), 1);
        assert_eq!(end, committed);
        // Rows still being written are not shown.
        let (page, _) = read_rows(&path, 0, 8, 10).unwrap().unwrap();
        assert_eq!(page.len(), 1);
        assert!(read_rows(&path, 3, committed, 2).unwrap().is_none());
        assert!(read_rows(&path, committed + 1, committed, 2)
            .unwrap()
            .is_none());
    }
}
