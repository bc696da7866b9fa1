//! One batch's life, from `validating` to a terminal status (PROVIDERS.md
//! 1.4), driven by a background task per batch.
//!
//! The input file is read twice, line by line, on blocking threads: once to
//! validate it and once to run its requests, writing result lines straight
//! to the output and error files. Only one line (and one small chunk of
//! result lines, shuffled because OpenAI's results are unordered) is in
//! memory at a time; the set of custom_ids, needed to reject duplicates, and
//! the custom_ids to bill are the things that grow with the batch.
//!
//! Each step is saved in the batch's record before the next one begins, so
//! a simulator restarted on the same data directory resumes the batch from
//! what the record says ([`run`]):
//!
//! - `validating`: validated again once its validation time (counted from
//!   `created_ms`) has passed.
//! - `in_progress` without a plan: waits out the rest of its time, counted
//!   from `in_progress_ms`, then fixes the plan (how many requests run, and
//!   why the rest do not; a cancel counts from when it was asked).
//! - a plan without an outcome: the requests run again, from the batch's own
//!   copy of its input. Results go to `.part` files; the successes are billed
//!   in one ledger event keyed by the batch, which the ledger applies at
//!   most once; only then are the files published and the outcome saved. A
//!   re-run therefore never bills twice, and nobody saw the lost attempt.
//! - an outcome: `finalizing` or `cancelling` waits out the rest of its
//!   time, then the batch settles.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use xxhash_rust::xxh3::xxh3_64;

use super::completions::{body_usage, embedding_input_count, request_model, ChatCompletion};
use super::{
    dropped_result, injected_error, injected_error_status, response_body, Batch, BatchError,
    BatchErrors, BatchStatus, BatchUsage, FileObject, Life, OpenAi, ORGANIZATION,
};
use crate::sim::store::{self, part_path};
use crate::sim::{
    deadline, lock, pause_until, progress, random_base62, random_hex, share, unix_millis, unix_now,
};

/// Most requests one batch may hold.
const MAX_REQUESTS: u64 = 50_000;
/// Most embedding inputs one `/v1/embeddings` batch may hold in total.
const MAX_EMBEDDING_INPUTS: u64 = 50_000;
/// Largest batch input file.
const MAX_INPUT_BYTES: u64 = 200 * 1024 * 1024;
/// Result lines shuffled together before they are written.
const SHUFFLE_CHUNK: usize = 64;
/// Buffer size for reading inputs and writing results.
const IO_BUFFER_BYTES: usize = 256 * 1024;

/// What the dice decided for a batch when it was created.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub(super) struct Fate {
    /// Fails validation as a whole.
    pub(super) fail: bool,
    /// Fails with `token_limit_exceeded`.
    pub(super) token_limit: bool,
    /// Expires before every request has run.
    pub(super) expire: bool,
}

/// Which requests of a batch run, fixed (and saved) before any does, so a
/// re-run after a restart runs the same ones.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(super) struct Plan {
    /// The first `ran` requests (file order) run.
    ran: u64,
    /// Why the rest do not.
    tail: Option<Tail>,
}

/// A batch's published results, saved until it settles.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Outcome {
    output: Option<WrittenFile>,
    errors: Option<WrittenFile>,
    succeeded: u64,
    failed: u64,
    input_tokens: u64,
    output_tokens: u64,
    /// When the results were published (Unix milliseconds).
    at_ms: i64,
}

/// Walks the batch through its statuses until it is terminal, or until the
/// simulator shuts down (a simulator started later on the same data
/// directory carries on from the batch's record).
pub(super) async fn drive(state: Arc<OpenAi>, id: String, cancel: CancellationToken) {
    let shutdown = state.sim.shutdown().clone();
    tokio::select! {
        () = shutdown.cancelled() => {}
        result = run(&state, &id, &cancel) => {
            let Err(err) = result else { return };
            if shutdown.is_cancelled() {
                // Cut short by the shutdown, not broken.
                return;
            }
            tracing::error!(batch_id = %id, error = %err, "sim openai: batch could not be processed");
            fail(&state, &id, BatchError::whole_file(
                "server_error",
                format!("The batch could not be processed: {err}"),
            ));
            if let Err(err) = state.save(&id).await {
                tracing::error!(batch_id = %id, error = %err, "sim openai: batch could not be recorded");
            }
        }
    }
}

/// Carries the batch on from wherever its record says it is.
async fn run(state: &Arc<OpenAi>, id: &str, cancel: &CancellationToken) -> io::Result<()> {
    let Some((batch, life)) = state.batch_and_life(id) else {
        return Ok(());
    };
    if batch.status.is_terminal() {
        return Ok(());
    }
    // The input, once this run has opened it.
    let mut input = None;
    if life.plan.is_none() && life.in_progress_ms.is_none() {
        match validate_batch(state, id, cancel, &batch, &life).await? {
            Some(opened) => input = Some(opened),
            // It failed validation.
            None => return Ok(()),
        }
    }
    if state.update(id, |_, life| life.plan.is_none()) == Some(true) {
        plan(state, id, cancel).await?;
    }
    if state.update(id, |_, life| life.outcome.is_none()) == Some(true) {
        execute(state, id, input).await?;
    }
    conclude(state, id, cancel).await
}

/// `validating`: waits out the validation time and checks the input file.
/// Either fails the batch (`None`) or starts it: `in_progress`, or, when a
/// cancel came first, a plan in which nothing runs.
async fn validate_batch(
    state: &Arc<OpenAi>,
    id: &str,
    cancel: &CancellationToken,
    batch: &Batch,
    life: &Life,
) -> io::Result<Option<File>> {
    let config = state.sim.config();
    pause_until(deadline(life.created_ms, config.validate_duration), cancel).await;
    let input_path = lock(&state.files)
        .get(&batch.input_file_id)
        .map(|_| state.file_path(&batch.input_file_id));
    let endpoint = batch.endpoint.clone();
    let invalid = (config.invalid_line_rate, config.seed);
    let checked = match input_path {
        None => None,
        Some(path) => {
            state
                .sim
                .blocking(move || {
                    Ok(open_and_validate(&path, &endpoint, invalid)?
                        .map(|(input, verdict)| (path, input, verdict)))
                })
                .await?
        }
    };
    let (path, input, valid) = match checked {
        Some((path, input, Ok(valid))) => (path, input, valid),
        Some((_, _, Err(error))) => {
            fail(state, id, error);
            state.save(id).await?;
            return Ok(None);
        }
        None => {
            let error = BatchError {
                param: Some("file_id".to_owned()),
                ..BatchError::whole_file(
                    "invalid_request",
                    format!(
                        "Cannot find file {}, or organization {ORGANIZATION} does not have access to it.",
                        batch.input_file_id
                    ),
                )
            };
            fail(state, id, error);
            state.save(id).await?;
            return Ok(None);
        }
    };
    // Cancelled before anything ran: every request is cancelled, whatever
    // the dice said.
    if !cancel.is_cancelled() {
        let failure = if life.fate.fail {
            Some(BatchError::whole_file(
                "invalid_request",
                "The batch input file failed validation (simulated whole-batch failure).",
            ))
        } else if life.fate.token_limit {
            Some(BatchError::whole_file(
                "token_limit_exceeded",
                format!(
                    "Enqueued token limit reached for {} in organization {ORGANIZATION}. Limit: 2,000,000 enqueued tokens. Please try again once some in_progress batches have been completed.",
                    valid.model
                ),
            ))
        } else {
            None
        };
        if let Some(error) = failure {
            fail(state, id, error);
            state.save(id).await?;
            return Ok(None);
        }
    }

    if state.batch_records.durable() {
        // From here on the batch reads its own copy, which a restart and
        // the client deleting the file both leave alone.
        let (copy, handle) = (state.input_copy_path(id), input.try_clone()?);
        state
            .sim
            .blocking(move || store::keep_copy(&path, &handle, &copy))
            .await?;
    }
    let total = valid.lines;
    let now = unix_millis();
    let started = state.update(id, |batch, life| {
        if batch.status != BatchStatus::Validating {
            // A cancel landed while the file was being read.
            life.plan = Some(Plan {
                ran: 0,
                tail: Some(Tail::Cancelled),
            });
            return false;
        }
        batch.status = BatchStatus::InProgress;
        batch.in_progress_at = Some(now.div_euclid(1000));
        batch.model = Some(valid.model.clone());
        batch.request_counts.total = total;
        life.in_progress_ms = Some(now);
        true
    });
    if started == Some(true) {
        // The ledger before the record: if the record is lost, the batch is
        // validated again and the ledger ignores the repeat.
        let (sim, batch_id) = (Arc::clone(&state.sim), id.to_owned());
        let custom_ids = valid.custom_ids;
        state
            .sim
            .blocking(move || {
                sim.record_submitted(&batch_id, custom_ids.iter().map(String::as_str))
            })
            .await?;
        tracing::debug!(batch_id = %id, total, "sim openai: batch in_progress");
    }
    state.save(id).await?;
    Ok(Some(input))
}

/// `in_progress`: waits out the rest of the batch's time, then fixes which
/// requests run.
async fn plan(state: &Arc<OpenAi>, id: &str, cancel: &CancellationToken) -> io::Result<()> {
    let duration = state.sim.config().batch_duration;
    let expire_fraction = state.sim.config().expire_completed_fraction;
    let Some(started) = state.update(id, |_, life| life.in_progress_ms).flatten() else {
        return Ok(());
    };
    let cancelled = pause_until(deadline(started, duration), cancel).await;
    state.update(id, |batch, life| {
        let total = batch.request_counts.total;
        let plan = if cancelled {
            // The requests due before the cancel ran.
            let asked = life.cancel_ms.unwrap_or_else(unix_millis);
            Plan {
                ran: share(total, progress(started, asked, duration)),
                tail: Some(Tail::Cancelled),
            }
        } else if life.fate.expire {
            Plan {
                ran: share(total, expire_fraction),
                tail: Some(Tail::Expired),
            }
        } else {
            Plan {
                ran: total,
                tail: None,
            }
        };
        life.plan = Some(plan);
    });
    state.save(id).await
}

/// Runs the plan: writes the result files under temporary names, bills the
/// successes, publishes the files and saves the outcome; a batch that ran
/// everything moves to `finalizing`.
async fn execute(state: &Arc<OpenAi>, id: &str, input: Option<File>) -> io::Result<()> {
    let Some((batch, life)) = state.batch_and_life(id) else {
        return Ok(());
    };
    let Some(plan) = life.plan else {
        return Ok(());
    };
    let input = match input {
        Some(input) => input,
        None => File::open(state.input_copy_path(id)).map_err(|err| {
            io::Error::new(
                err.kind(),
                format!("the batch's copy of its input file is unreadable: {err}"),
            )
        })?,
    };
    let created = batch.in_progress_at.unwrap_or(batch.created_at);
    let mut processed = process(state, id, batch.endpoint, input, plan, created).await?;

    let billed = std::mem::take(&mut processed.billed);
    let parts: Vec<PathBuf> = [&processed.output, &processed.errors]
        .into_iter()
        .flatten()
        .map(|file| state.file_path(&file.id))
        .collect();
    let (sim, batch_id) = (Arc::clone(&state.sim), id.to_owned());
    state
        .sim
        .blocking(move || {
            // The commit point: once billed, a re-run bills nothing more.
            sim.record_billed(&batch_id, billed.iter().map(String::as_str))?;
            for path in parts {
                store::publish(&part_path(&path), &path)?;
            }
            Ok(())
        })
        .await?;

    let now = unix_millis();
    state.update(id, |batch, life| {
        life.outcome = Some(Outcome {
            output: processed.output,
            errors: processed.errors,
            succeeded: processed.succeeded,
            failed: processed.failed,
            input_tokens: processed.input_tokens,
            output_tokens: processed.output_tokens,
            at_ms: now,
        });
        if plan.tail.is_none() && batch.status == BatchStatus::InProgress {
            batch.status = BatchStatus::Finalizing;
            batch.finalizing_at = Some(now.div_euclid(1000));
            life.finalizing_ms = Some(now);
        }
    });
    state.save(id).await
}

/// Ends a batch whose results are out: an expired one at once, a
/// finalizing one once its time is up, a cancelling one shortly after.
async fn conclude(state: &Arc<OpenAi>, id: &str, cancel: &CancellationToken) -> io::Result<()> {
    let finalize = state.sim.config().finalize_duration;
    let Some((batch, life)) = state.batch_and_life(id) else {
        return Ok(());
    };
    let (Some(plan), Some(outcome)) = (life.plan, life.outcome) else {
        return Ok(());
    };
    if batch.status.is_terminal() {
        return Ok(());
    }
    if matches!(plan.tail, Some(Tail::Expired)) {
        return settle(state, id, BatchStatus::Expired, &outcome).await;
    }
    if batch.status == BatchStatus::Finalizing {
        let since = life.finalizing_ms.unwrap_or(outcome.at_ms);
        if !pause_until(deadline(since, finalize), cancel).await {
            return settle(state, id, BatchStatus::Completed, &outcome).await;
        }
    }
    // Cancelled: `cancelling -> cancelled` "shortly after" the cancel or the
    // results, whichever came last. Whatever ran stays.
    let asked = state
        .update(id, |_, life| life.cancel_ms)
        .flatten()
        .unwrap_or(outcome.at_ms);
    let since = outcome.at_ms.max(asked);
    pause_until(deadline(since, finalize), &CancellationToken::new()).await;
    settle(state, id, BatchStatus::Cancelled, &outcome).await
}

/// Marks the batch `failed` with `error` (or `cancelled`, if a cancel is
/// already pending: the cancel was asked first). The caller saves it.
fn fail(state: &OpenAi, id: &str, error: BatchError) {
    let now = unix_now();
    state.update_batch(id, |batch| {
        if batch.status == BatchStatus::Cancelling {
            batch.status = BatchStatus::Cancelled;
            batch.cancelled_at = Some(now);
            return;
        }
        tracing::debug!(batch_id = %id, code = %error.code, "sim openai: batch failed");
        batch.status = BatchStatus::Failed;
        batch.failed_at = Some(now);
        batch.errors = Some(BatchErrors {
            object: "list",
            data: vec![error],
        });
    });
}

/// Registers the result files and moves the batch to its terminal `status`.
async fn settle(
    state: &Arc<OpenAi>,
    id: &str,
    status: BatchStatus,
    outcome: &Outcome,
) -> io::Result<()> {
    let Some(ttl) = state.update(id, |_, life| life.output_ttl_secs) else {
        return Ok(());
    };
    for (written, kind) in [(&outcome.output, "output"), (&outcome.errors, "error")] {
        if let Some(file) = written {
            let object = FileObject::new(
                file.id.clone(),
                file.bytes,
                format!("{id}_{kind}.jsonl"),
                "batch_output",
                ttl,
            );
            state.add_file(object).await?;
        }
    }
    let now = unix_now();
    state.update_batch(id, |batch| {
        // A cancel that lands as the last request finishes does not undo it.
        let status = if status == BatchStatus::Completed && batch.status == BatchStatus::Cancelling
        {
            BatchStatus::Cancelled
        } else {
            status
        };
        batch.status = status;
        match status {
            BatchStatus::Completed => batch.completed_at = Some(now),
            BatchStatus::Expired => batch.expired_at = Some(now),
            BatchStatus::Cancelled => batch.cancelled_at = Some(now),
            _ => {}
        }
        batch.output_file_id = outcome.output.as_ref().map(|file| file.id.clone());
        batch.error_file_id = outcome.errors.as_ref().map(|file| file.id.clone());
        batch.request_counts.total = outcome.succeeded + outcome.failed;
        batch.request_counts.completed = outcome.succeeded;
        batch.request_counts.failed = outcome.failed;
        batch.usage = BatchUsage::new(outcome.input_tokens, outcome.output_tokens);
        tracing::debug!(batch_id = %id, status = status.as_str(), "sim openai: batch settled");
    });
    state.save(id).await
}

impl BatchError {
    fn whole_file(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_owned(),
            message: message.into(),
            param: None,
            line: None,
        }
    }

    fn at_line(code: &str, message: impl Into<String>, param: Option<&str>, line: u64) -> Self {
        Self {
            code: code.to_owned(),
            message: message.into(),
            param: param.map(str::to_owned),
            line: Some(line),
        }
    }
}

/// What validation learned about a well-formed input file.
struct ValidInput {
    /// Requests in the file (blank lines aside).
    lines: u64,
    model: String,
    custom_ids: HashSet<String>,
}

/// Opens the input file (`None` if it is gone) and validates it.
fn open_and_validate(
    path: &Path,
    endpoint: &str,
    invalid: (f64, u64),
) -> io::Result<Option<(File, Result<ValidInput, BatchError>)>> {
    let mut input = match File::open(path) {
        Ok(input) => input,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err),
    };
    let verdict = validate(&mut input, endpoint, invalid)?;
    Ok(Some((input, verdict)))
}

/// Checks every line of the input file against the batch's rules, stopping
/// at the first broken one.
/// The message of a line failed by `invalid_line_rate`.
pub(crate) const INVALID_LINE_MESSAGE: &str =
    "Invalid 'body': this request was rejected by the simulator's invalid_line_rate.";

/// Validates the input file as the real API does, first error wins.
/// `invalid` is `(invalid_line_rate, seed)`.
fn validate(
    input: &mut File,
    endpoint: &str,
    invalid: (f64, u64),
) -> io::Result<Result<ValidInput, BatchError>> {
    if input.metadata()?.len() > MAX_INPUT_BYTES {
        return Ok(Err(BatchError::whole_file(
            "file_too_large",
            format!(
                "The batch input file is larger than the maximum of {} MB.",
                MAX_INPUT_BYTES / (1024 * 1024)
            ),
        )));
    }
    let mut reader = BufReader::with_capacity(IO_BUFFER_BYTES, &*input);
    let mut buf = Vec::new();
    let mut line_number: u64 = 0;
    let mut lines: u64 = 0;
    let mut embedding_inputs: u64 = 0;
    let mut model: Option<String> = None;
    let mut custom_ids = HashSet::new();
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        line_number += 1;
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        lines += 1;
        if lines > MAX_REQUESTS {
            return Ok(Err(BatchError::at_line(
                "too_many_tasks",
                format!(
                    "The batch input file has more than the maximum of {MAX_REQUESTS} requests."
                ),
                None,
                line_number,
            )));
        }
        let request = match check_line(&buf, endpoint, line_number) {
            Ok(request) => request,
            Err(error) => return Ok(Err(error)),
        };
        match &model {
            None => model = Some(request.model),
            Some(first) if *first != request.model => {
                return Ok(Err(BatchError::at_line(
                    "model_mismatch",
                    format!(
                        "The model '{}' on this line differs from the model '{first}' of the lines before it. A batch must use a single model.",
                        request.model
                    ),
                    Some("body.model"),
                    line_number,
                )));
            }
            Some(_) => {}
        }
        if super::invalid_line(&request.custom_id, invalid.0, invalid.1) {
            return Ok(Err(BatchError::at_line(
                "invalid_value",
                INVALID_LINE_MESSAGE,
                Some("body"),
                line_number,
            )));
        }
        if !custom_ids.insert(request.custom_id) {
            return Ok(Err(BatchError::at_line(
                "duplicate_custom_id",
                "The custom_id for this request is a duplicate of another request. The custom_id parameter must be unique for each request in a batch.",
                Some("custom_id"),
                line_number,
            )));
        }
        embedding_inputs += request.embedding_inputs;
        if embedding_inputs > MAX_EMBEDDING_INPUTS {
            return Ok(Err(BatchError::at_line(
                "too_many_tasks",
                format!(
                    "The batch has more than the maximum of {MAX_EMBEDDING_INPUTS} embedding inputs across all requests."
                ),
                Some("body.input"),
                line_number,
            )));
        }
    }
    match model {
        None => Ok(Err(BatchError::whole_file(
            "empty_file",
            "The batch input file is empty.",
        ))),
        Some(model) => Ok(Ok(ValidInput {
            lines,
            model,
            custom_ids,
        })),
    }
}

/// The parts of one valid input line the file-wide checks need.
struct CheckedLine {
    custom_id: String,
    model: String,
    embedding_inputs: u64,
}

fn check_line(raw: &[u8], endpoint: &str, line: u64) -> Result<CheckedLine, BatchError> {
    match read_valid_line(raw, endpoint) {
        Some(valid) => Ok(valid),
        None => check_line_value(raw, endpoint, line),
    }
}

/// A valid chat-style request line for `endpoint`, read in one pass that
/// builds no `Value`: the common case. `None` for anything else (an error,
/// a repeated key, a field of another type, an embeddings request), which
/// [`check_line_value`] then judges, so the two give the same verdicts.
/// The pass is as strict as parsing a `Value` (every string decoded, every
/// number in range), so it accepts no line that one would refuse.
fn read_valid_line(raw: &[u8], endpoint: &str) -> Option<CheckedLine> {
    if endpoint == "/v1/embeddings" {
        return None;
    }
    let line: LineFields<'_> = serde_json::from_slice(raw).ok()?;
    let custom_id = line.custom_id?.into_owned();
    if custom_id.is_empty() || line.method? != "POST" || line.url? != endpoint {
        return None;
    }
    Some(CheckedLine {
        custom_id,
        model: line.model?.into_owned(),
        embedding_inputs: 0,
    })
}

/// What [`read_valid_line`] takes from a line: its string fields and the
/// body's string `model`, each `None` if absent. A field of another type,
/// a body that is not an object, or a key given twice (a `Value` keeps the
/// last) fails the whole pass instead.
#[derive(Default)]
struct LineFields<'de> {
    custom_id: Option<Cow<'de, str>>,
    method: Option<Cow<'de, str>>,
    url: Option<Cow<'de, str>>,
    model: Option<Cow<'de, str>>,
}

fn repeated<E: serde::de::Error>() -> E {
    E::custom("repeated field")
}

impl<'de> Deserialize<'de> for LineFields<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(FieldsVisitor)
    }
}

struct FieldsVisitor;

impl<'de> serde::de::Visitor<'de> for FieldsVisitor {
    type Value = LineFields<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a request line")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = LineFields::default();
        let mut body_seen = false;
        while let Some(key) = map.next_key::<Text<'de>>()? {
            let field = match &*key.0 {
                "custom_id" => &mut fields.custom_id,
                "method" => &mut fields.method,
                "url" => &mut fields.url,
                "body" => {
                    if std::mem::replace(&mut body_seen, true) {
                        return Err(repeated());
                    }
                    fields.model = map.next_value::<Body<'de>>()?.model;
                    continue;
                }
                _ => {
                    map.next_value::<Strict>()?;
                    continue;
                }
            };
            if field.is_some() {
                return Err(repeated());
            }
            *field = Some(map.next_value::<Text<'de>>()?.0);
        }
        Ok(fields)
    }
}

/// A request body object, and its `model` if it has one.
struct Body<'de> {
    model: Option<Cow<'de, str>>,
}

impl<'de> Deserialize<'de> for Body<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(BodyVisitor)
    }
}

struct BodyVisitor;

impl<'de> serde::de::Visitor<'de> for BodyVisitor {
    type Value = Body<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a request body")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut model = None;
        while let Some(key) = map.next_key::<Text<'de>>()? {
            if key.0 != "model" {
                map.next_value::<Strict>()?;
            } else if model.is_some() {
                return Err(repeated());
            } else {
                model = Some(map.next_value::<Text<'de>>()?.0);
            }
        }
        Ok(Body { model })
    }
}

/// A string, borrowed when it has no escapes.
struct Text<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(TextVisitor)
    }
}

struct TextVisitor;

impl<'de> serde::de::Visitor<'de> for TextVisitor {
    type Value = Text<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Self::Value, E> {
        Ok(Text(Cow::Borrowed(text)))
    }
    fn visit_str<E>(self, text: &str) -> Result<Self::Value, E> {
        Ok(Text(Cow::Owned(text.to_owned())))
    }
}

/// Any JSON value, read as strictly as a `Value` is (strings decoded,
/// numbers converted) and kept nowhere. `serde::de::IgnoredAny` would
/// skip strings and numbers without decoding them, and so accept lines a
/// `Value` refuses.
struct Strict;

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Strict;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<Strict, Strict>()?.is_some() {}
        Ok(Strict)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<Strict>()?.is_some() {}
        Ok(Strict)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Strict)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Strict)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Strict)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Strict)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Strict)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Strict)
    }
}

/// [`check_line`] on a parsed `Value`: every verdict and error message.
fn check_line_value(raw: &[u8], endpoint: &str, line: u64) -> Result<CheckedLine, BatchError> {
    let Ok(value) = serde_json::from_slice::<Value>(raw) else {
        return Err(BatchError::at_line(
            "invalid_json_line",
            "This line is not parseable as valid JSON.",
            None,
            line,
        ));
    };
    let Value::Object(fields) = value else {
        return Err(BatchError::at_line(
            "invalid_json_line",
            "This line is not a JSON object.",
            None,
            line,
        ));
    };
    let missing = |name: &'static str| {
        BatchError::at_line(
            "missing_required_parameter",
            format!("Missing required parameter: '{name}'."),
            Some(name),
            line,
        )
    };
    let custom_id = match fields.get("custom_id") {
        None | Some(Value::Null) => return Err(missing("custom_id")),
        Some(Value::String(id)) if !id.is_empty() => id.clone(),
        Some(_) => {
            return Err(BatchError::at_line(
                "invalid_type",
                "Invalid 'custom_id': expected a non-empty string.",
                Some("custom_id"),
                line,
            ))
        }
    };
    match fields.get("method") {
        None | Some(Value::Null) => return Err(missing("method")),
        Some(Value::String(method)) if method == "POST" => {}
        Some(other) => {
            return Err(BatchError::at_line(
                "invalid_method",
                format!("Invalid 'method': {other}. Only 'POST' is supported."),
                Some("method"),
                line,
            ))
        }
    }
    match fields.get("url") {
        None | Some(Value::Null) => return Err(missing("url")),
        Some(Value::String(url)) if url == endpoint => {}
        Some(other) => {
            return Err(BatchError::at_line(
                "url_mismatch",
                format!(
                "The url {other} of this request does not match the batch endpoint '{endpoint}'."
            ),
                Some("url"),
                line,
            ))
        }
    }
    let body = match fields.get("body") {
        None | Some(Value::Null) => return Err(missing("body")),
        Some(body @ Value::Object(_)) => body,
        Some(_) => {
            return Err(BatchError::at_line(
                "invalid_type",
                "Invalid 'body': expected an object.",
                Some("body"),
                line,
            ))
        }
    };
    let Some(model) = request_model(endpoint, body) else {
        return Err(BatchError::at_line(
            "missing_required_parameter",
            "Missing required parameter: 'body.model'.",
            Some("body.model"),
            line,
        ));
    };
    let embedding_inputs = if endpoint == "/v1/embeddings" {
        embedding_input_count(body) as u64
    } else {
        0
    };
    Ok(CheckedLine {
        custom_id,
        model,
        embedding_inputs,
    })
}

/// Why requests past the ones that ran never ran.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Tail {
    Expired,
    Cancelled,
}

impl Tail {
    fn error(self) -> LineError {
        match self {
            Self::Expired => LineError {
                code: "batch_expired",
                message: "This request could not be executed before the completion window expired.",
            },
            Self::Cancelled => LineError {
                code: "batch_cancelled",
                message: "This request was not executed because the batch was cancelled.",
            },
        }
    }
}

/// What running a batch's requests produced.
struct Processed {
    /// Written under their `.part` names, not yet published.
    output: Option<WrittenFile>,
    errors: Option<WrittenFile>,
    succeeded: u64,
    failed: u64,
    input_tokens: u64,
    output_tokens: u64,
    /// The custom_ids of the success lines, to bill.
    billed: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct WrittenFile {
    id: String,
    bytes: u64,
}

/// Runs the plan over `input`: the first `ran` requests (file order) run;
/// the rest get `tail` error lines. Bills nothing: the caller does.
async fn process(
    state: &Arc<OpenAi>,
    batch_id: &str,
    endpoint: String,
    input: File,
    plan: Plan,
    created: i64,
) -> io::Result<Processed> {
    let config = state.sim.config();
    let output_id = format!("file-{}", random_base62(22));
    let error_id = format!("file-{}", random_base62(22));
    let job = Job {
        endpoint,
        created,
        ran: plan.ran,
        tail: plan.tail,
        error_rate: config.error_rate,
        drop_rate: config.drop_rate,
        seed: config.seed,
        shuffle_seed: xxh3_64(batch_id.as_bytes()),
        output: (output_id.clone(), part_path(&state.file_path(&output_id))),
        errors: (error_id.clone(), part_path(&state.file_path(&error_id))),
        shutdown: state.sim.shutdown().clone(),
    };
    state.sim.blocking(move || run_requests(input, &job)).await
}

/// Everything [`run_requests`] needs, owned so it can move to a blocking
/// thread.
struct Job {
    endpoint: String,
    created: i64,
    ran: u64,
    tail: Option<Tail>,
    error_rate: f64,
    drop_rate: f64,
    seed: u64,
    shuffle_seed: u64,
    /// Ids and (temporary) paths of the result files.
    output: (String, PathBuf),
    errors: (String, PathBuf),
    /// The simulator stopping: the work stops too, to be redone later.
    shutdown: CancellationToken,
}

fn run_requests(mut input: File, job: &Job) -> io::Result<Processed> {
    input.seek(SeekFrom::Start(0))?;
    let mut reader = BufReader::with_capacity(IO_BUFFER_BYTES, input);
    let mut sink = ResultSink::new(job);
    let mut buf = Vec::new();
    let mut index: u64 = 0;
    loop {
        if job.shutdown.is_cancelled() {
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "the simulator is shutting down",
            ));
        }
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        // The file passed validation through this very handle.
        let Some(request) = RunLine::parse(&buf) else {
            continue;
        };
        let custom_id = &request.custom_id;
        if index < job.ran {
            run_request(&mut sink, job, custom_id, &request.body)?;
        } else if let Some(tail) = job.tail {
            let line: ResultLine = ResultLine {
                id: line_id(),
                custom_id,
                response: None,
                error: Some(tail.error()),
            };
            sink.push(Destination::Errors, &line, None)?;
        }
        index += 1;
    }
    sink.finish()
}

/// What running an input line needs of it.
#[derive(Deserialize)]
struct RunLine<'a> {
    #[serde(borrow, default)]
    custom_id: Cow<'a, str>,
    #[serde(default)]
    body: Value,
}

impl<'a> RunLine<'a> {
    /// The line's `custom_id` (empty if it has none) and `body` (`null` if
    /// it has none), as indexing a parsed `Value` would give them; `None` if
    /// the line is not JSON.
    fn parse(line: &'a [u8]) -> Option<Self> {
        serde_json::from_slice(line).ok().or_else(|| {
            // Typed parsing is stricter than a `Value` (a repeated key,
            // a non-string `custom_id`), so fall back to one.
            let mut request: Value = serde_json::from_slice(line).ok()?;
            Some(Self {
                custom_id: Cow::Owned(request["custom_id"].as_str().unwrap_or_default().to_owned()),
                body: request.get_mut("body").map(Value::take).unwrap_or_default(),
            })
        })
    }
}

fn run_request(sink: &mut ResultSink, job: &Job, custom_id: &str, body: &Value) -> io::Result<()> {
    if dropped_result(custom_id, job.drop_rate, job.seed) {
        // Lost by the provider: in neither file.
        return Ok(());
    }
    if injected_error(custom_id, job.error_rate, job.seed) {
        let status = injected_error_status(custom_id, job.seed);
        let error = if status == 400 {
            json!({
                "message": "This model's maximum context length is 128000 tokens. However, your messages resulted in 131072 tokens. Please reduce the length of the messages.",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            })
        } else {
            json!({
                "message": "The server had an error while processing your request. Sorry about that!",
                "type": "server_error",
                "param": null,
                "code": null,
            })
        };
        let line = ResultLine {
            id: line_id(),
            custom_id,
            response: Some(LineResponse {
                status_code: status,
                request_id: format!("req_{}", random_hex(32)),
                body: json!({ "error": error }),
            }),
            error: None,
        };
        return sink.push(Destination::Errors, &line, None);
    }
    if job.endpoint == CHAT_ENDPOINT {
        // The endpoint of nearly every batch: written without a `Value`.
        let body = ChatCompletion::new(body, job.created);
        let usage = body.usage();
        return sink.push(
            Destination::Output,
            &success_line(custom_id, body),
            Some((custom_id, usage)),
        );
    }
    let body = response_body(&job.endpoint, body, job.created);
    let usage = body_usage(&body);
    sink.push(
        Destination::Output,
        &success_line(custom_id, body),
        Some((custom_id, usage)),
    )
}

const CHAT_ENDPOINT: &str = "/v1/chat/completions";

fn success_line<B: Serialize>(custom_id: &str, body: B) -> ResultLine<'_, B> {
    ResultLine {
        id: line_id(),
        custom_id,
        response: Some(LineResponse {
            status_code: 200,
            request_id: format!("req_{}", random_hex(32)),
            body,
        }),
        error: None,
    }
}

fn line_id() -> String {
    format!("batch_req_{}", random_hex(32))
}

/// One line of an output or error file (PROVIDERS.md 1.6).
#[derive(Serialize)]
struct ResultLine<'a, B = Value> {
    id: String,
    custom_id: &'a str,
    response: Option<LineResponse<B>>,
    error: Option<LineError>,
}

#[derive(Serialize)]
struct LineResponse<B = Value> {
    status_code: u16,
    request_id: String,
    body: B,
}

#[derive(Serialize)]
struct LineError {
    code: &'static str,
    message: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Destination {
    Output,
    Errors,
}

/// Collects result lines a chunk at a time, shuffles each chunk, and
/// appends it to the output or error file, each created on first use.
struct ResultSink {
    output: JsonlFile,
    errors: JsonlFile,
    chunk: Vec<PendingLine>,
    /// Emptied line buffers of earlier chunks, to serialise into again.
    spare: Vec<Vec<u8>>,
    shuffle: StdRng,
    input_tokens: u64,
    output_tokens: u64,
    /// The custom_ids of the success lines written.
    billed: Vec<String>,
}

struct PendingLine {
    destination: Destination,
    json: Vec<u8>,
    /// The custom_id to bill once the line is written, for success lines.
    billed: Option<String>,
}

impl ResultSink {
    fn new(job: &Job) -> Self {
        Self {
            output: JsonlFile::new(&job.output),
            errors: JsonlFile::new(&job.errors),
            chunk: Vec::with_capacity(SHUFFLE_CHUNK),
            spare: Vec::with_capacity(SHUFFLE_CHUNK),
            shuffle: StdRng::seed_from_u64(job.shuffle_seed),
            input_tokens: 0,
            output_tokens: 0,
            billed: Vec::new(),
        }
    }

    fn push<B: Serialize>(
        &mut self,
        destination: Destination,
        line: &ResultLine<'_, B>,
        success: Option<(&str, (u64, u64))>,
    ) -> io::Result<()> {
        let mut json = self.spare.pop().unwrap_or_default();
        serde_json::to_writer(&mut json, line).map_err(io::Error::other)?;
        let billed = success.map(|(custom_id, (input_tokens, output_tokens))| {
            self.input_tokens += input_tokens;
            self.output_tokens += output_tokens;
            custom_id.to_owned()
        });
        self.chunk.push(PendingLine {
            destination,
            json,
            billed,
        });
        if self.chunk.len() >= SHUFFLE_CHUNK {
            self.flush_chunk()?;
        }
        Ok(())
    }

    fn flush_chunk(&mut self) -> io::Result<()> {
        self.chunk.shuffle(&mut self.shuffle);
        for mut line in self.chunk.drain(..) {
            match line.destination {
                Destination::Output => self.output.write_line(&line.json)?,
                Destination::Errors => self.errors.write_line(&line.json)?,
            }
            self.billed.extend(line.billed);
            line.json.clear();
            self.spare.push(line.json);
        }
        Ok(())
    }

    fn finish(mut self) -> io::Result<Processed> {
        self.flush_chunk()?;
        let succeeded = self.output.lines;
        let failed = self.errors.lines;
        Ok(Processed {
            output: self.output.finish()?,
            errors: self.errors.finish()?,
            succeeded,
            failed,
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            billed: self.billed,
        })
    }
}

/// A JSONL result file, created when its first line is written.
struct JsonlFile {
    id: String,
    path: PathBuf,
    writer: Option<BufWriter<File>>,
    bytes: u64,
    lines: u64,
}

impl JsonlFile {
    fn new((id, path): &(String, PathBuf)) -> Self {
        Self {
            id: id.clone(),
            path: path.clone(),
            writer: None,
            bytes: 0,
            lines: 0,
        }
    }

    fn write_line(&mut self, json: &[u8]) -> io::Result<()> {
        let writer = match &mut self.writer {
            Some(writer) => writer,
            None => self.writer.insert(BufWriter::with_capacity(
                IO_BUFFER_BYTES,
                File::create(&self.path)?,
            )),
        };
        writer.write_all(json)?;
        writer.write_all(b"\n")?;
        self.bytes += json.len() as u64 + 1;
        self.lines += 1;
        Ok(())
    }

    /// Flushes the file; `None` if no line was ever written.
    fn finish(self) -> io::Result<Option<WrittenFile>> {
        let Some(mut writer) = self.writer else {
            return Ok(None);
        };
        writer.flush()?;
        writer.get_ref().sync_data()?;
        Ok(Some(WrittenFile {
            id: self.id,
            bytes: self.bytes,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate_text(text: &str, endpoint: &str) -> Result<ValidInput, BatchError> {
        let mut file = tempfile::tempfile().expect("tempfile");
        file.write_all(text.as_bytes()).expect("write");
        file.seek(SeekFrom::Start(0)).expect("seek");
        validate(&mut file, endpoint, (0.0, 0)).expect("io")
    }

    fn line(custom_id: &str, model: &str) -> String {
        format!(
            r#"{{"custom_id":"{custom_id}","method":"POST","url":"/v1/chat/completions","body":{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}}}"#
        )
    }

    #[test]
    fn the_one_pass_reading_agrees_with_the_value_reading() {
        let chat = "/v1/chat/completions";
        // Lines the one pass must take itself, with what it must read.
        let common = [
            (line("a", "m"), "a", "m"),
            (
                r#" {"body":{"messages":[{"content":"caf\u00e9 \"q\"","role":"user"}],"model":"g\u0070t","n":1.5e3,"x":[true,null,-1]},"url":"/v1/chat/completions","method":"POST","custom_id":"id\/1","extra":{"k":[1,2]}}"#.to_owned(),
                "id/1",
                "gpt",
            ),
        ];
        for (text, id, model) in &common {
            let fast = read_valid_line(text.as_bytes(), chat).expect(text);
            assert_eq!(
                (fast.custom_id.as_str(), fast.model.as_str()),
                (*id, *model)
            );
            let slow = check_line_value(text.as_bytes(), chat, 1).expect(text);
            assert_eq!((slow.custom_id, slow.model), (fast.custom_id, fast.model));
        }
        // Lines it must leave to the `Value` reading, whatever that decides.
        let base = line("a", "m");
        let others = [
            "not json".to_owned(),
            "[\"a\",\"POST\",\"/v1/chat/completions\",{}]".to_owned(),
            base.replace(r#""content":"hi""#, r#""content":"\ud800""#),
            base.replace(r#""content":"hi""#, r#""content":1e400"#),
            base.replace(r#""custom_id":"a""#, r#""custom_id":"a","custom_id":"b""#),
            base.replace(r#""model":"m""#, r#""model":"m","model":"n""#),
            base.replace(r#""model":"m""#, r#""model":7"#),
            base.replace(r#""model":"m","#, ""),
            base.replace(r#""custom_id":"a""#, r#""custom_id":"""#),
            base.replace(r#""custom_id":"a""#, r#""custom_id":5"#),
            base.replace(r#""method":"POST""#, r#""method":"GET""#),
            base.replace("/v1/chat/completions", "/v1/embeddings"),
            base.replace(r#""body":{"#, r#""body":[{"#)
                .replace("}]}}", "}]}]}"),
            format!("{base} trailing"),
        ];
        for text in &others {
            assert!(read_valid_line(text.as_bytes(), chat).is_none(), "{text}");
        }
        // The refusals the one pass defers to are the `Value` reading's.
        assert!(check_line_value(others[2].as_bytes(), chat, 1).is_err());
        assert!(check_line_value(others[3].as_bytes(), chat, 1).is_err());
        let last = check_line_value(others[4].as_bytes(), chat, 1).expect("valid");
        assert_eq!(last.custom_id, "b");
    }

    #[test]
    fn a_well_formed_file_passes() {
        let text = format!("{}\n\n{}\n", line("a", "m"), line("b", "m"));
        let valid = validate_text(&text, "/v1/chat/completions").expect("valid");
        assert_eq!(valid.lines, 2);
        assert_eq!(valid.model, "m");
        assert!(valid.custom_ids.contains("b"));
    }

    #[test]
    fn each_broken_rule_names_its_code_and_line() {
        let chat = "/v1/chat/completions";
        let cases = [
            (
                format!("{}\nnot json\n", line("a", "m")),
                "invalid_json_line",
                Some(2),
            ),
            (
                format!("{}\n{}\n", line("a", "m"), line("a", "m")),
                "duplicate_custom_id",
                Some(2),
            ),
            (
                format!("{}\n{}\n", line("a", "m"), line("b", "other")),
                "model_mismatch",
                Some(2),
            ),
            (
                line("a", "m").replace("/v1/chat/completions", "/v1/embeddings"),
                "url_mismatch",
                Some(1),
            ),
            (
                line("a", "m").replace("POST", "GET"),
                "invalid_method",
                Some(1),
            ),
            (
                r#"{"method":"POST","url":"/v1/chat/completions","body":{"model":"m"}}"#.to_owned(),
                "missing_required_parameter",
                Some(1),
            ),
            ("\n  \n".to_owned(), "empty_file", None),
        ];
        for (text, code, at) in cases {
            let error = validate_text(&text, chat)
                .err()
                .unwrap_or_else(|| panic!("{code}: accepted"));
            assert_eq!(error.code, code, "{text}");
            assert_eq!(error.line, at, "{code}");
        }
    }

    #[test]
    fn more_than_fifty_thousand_requests_are_too_many() {
        let mut text = String::new();
        for i in 0..=MAX_REQUESTS {
            text.push_str(&line(&format!("r{i}"), "m"));
            text.push('\n');
        }
        let error = validate_text(&text, "/v1/chat/completions")
            .err()
            .expect("rejected");
        assert_eq!(error.code, "too_many_tasks");
        assert_eq!(error.line, Some(MAX_REQUESTS + 1));
    }

    #[test]
    fn run_lines_read_what_indexing_a_value_reads() {
        for line in [
            r#"{"custom_id":"a","method":"POST","body":{"model":"m","messages":[]}}"#,
            r#"{"custom_id":"a\"b","body":{"x":1}}"#,
            r#"{"custom_id":"a","custom_id":"b","body":{"x":1}}"#,
            r#"{"custom_id":7,"body":{"x":1}}"#,
            r#"{"custom_id":null,"body":null}"#,
            r#"{"body":{"x":1},"body":{"y":2}}"#,
            r#"{}"#,
        ] {
            let value: Value = serde_json::from_str(line).unwrap();
            let run = RunLine::parse(line.as_bytes()).expect(line);
            assert_eq!(
                run.custom_id,
                value["custom_id"].as_str().unwrap_or_default(),
                "{line}"
            );
            assert_eq!(run.body, value["body"], "{line}");
        }
        assert!(RunLine::parse(b"{not json").is_none());
    }
}
