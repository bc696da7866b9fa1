//! One batch's life, from `validating` to a terminal status (PROVIDERS.md
//! 1.4), driven by a background task per batch.
//!
//! The input file is read twice, line by line, on blocking threads: once to
//! validate it and once to run its requests, writing result lines straight
//! to the output and error files. Only one line (and one small chunk of
//! result lines, shuffled because OpenAI's results are unordered) is in
//! memory at a time; the set of custom_ids, needed to reject duplicates, is
//! the one thing that grows with the batch.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use xxhash_rust::xxh3::xxh3_64;

use super::completions::{body_usage, embedding_input_count, request_model};
use super::{
    injected_error, injected_error_status, response_body, BatchError, BatchErrors, BatchStatus,
    BatchUsage, FileObject, OpenAi, ORGANIZATION,
};
use crate::sim::{lock, random_base62, random_hex, unix_now, Sim};

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
#[derive(Debug, Clone, Copy)]
pub(super) struct Fate {
    /// Fails validation as a whole.
    pub(super) fail: bool,
    /// Fails with `token_limit_exceeded`.
    pub(super) token_limit: bool,
    /// Expires before every request has run.
    pub(super) expire: bool,
}

/// Walks the batch through its statuses until it is terminal, or until the
/// simulator shuts down.
pub(super) async fn drive(state: Arc<OpenAi>, id: String, cancel: CancellationToken, fate: Fate) {
    let shutdown = state.sim.shutdown().clone();
    tokio::select! {
        () = shutdown.cancelled() => {}
        result = run(&state, &id, &cancel, fate) => {
            if let Err(err) = result {
                tracing::error!(batch_id = %id, error = %err, "sim openai: batch could not be processed");
                fail(&state, &id, BatchError::whole_file(
                    "server_error",
                    format!("The batch could not be processed: {err}"),
                ));
            }
        }
    }
}

async fn run(
    state: &Arc<OpenAi>,
    id: &str,
    cancel: &CancellationToken,
    fate: Fate,
) -> io::Result<()> {
    let config = state.sim.config().clone();
    let Some(batch) = state.batch(id) else {
        return Ok(());
    };

    // validating
    pause(config.validate_duration, cancel).await;
    let input_path = lock(&state.files)
        .get(&batch.input_file_id)
        .map(|_| state.file_path(&batch.input_file_id));
    let endpoint = batch.endpoint.clone();
    let checked = match input_path {
        None => None,
        Some(path) => blocking(move || open_and_validate(&path, &endpoint)).await?,
    };
    let (input, valid) = match checked {
        Some((input, Ok(valid))) => (input, valid),
        Some((_, Err(error))) => {
            fail(state, id, error);
            return Ok(());
        }
        None => {
            let error = BatchError {
                param: Some("file_id"),
                ..BatchError::whole_file(
                    "invalid_request",
                    format!(
                        "Cannot find file {}, or organization {ORGANIZATION} does not have access to it.",
                        batch.input_file_id
                    ),
                )
            };
            fail(state, id, error);
            return Ok(());
        }
    };
    let total = valid.lines;
    if cancel.is_cancelled() {
        // Cancelled before anything ran: every request is cancelled.
        let outcome = process(state, id, input, 0, Some(Tail::Cancelled), unix_now()).await?;
        settle_after(
            state,
            id,
            BatchStatus::Cancelled,
            outcome,
            config.finalize_duration,
        )
        .await;
        return Ok(());
    }
    if fate.fail {
        let error = BatchError::whole_file(
            "invalid_request",
            "The batch input file failed validation (simulated whole-batch failure).",
        );
        fail(state, id, error);
        return Ok(());
    }
    if fate.token_limit {
        let error = BatchError::whole_file(
            "token_limit_exceeded",
            format!(
                "Enqueued token limit reached for {} in organization {ORGANIZATION}. Limit: 2,000,000 enqueued tokens. Please try again once some in_progress batches have been completed.",
                valid.model
            ),
        );
        fail(state, id, error);
        return Ok(());
    }

    // in_progress
    let created = unix_now();
    let started = state.update_batch(id, |batch| {
        if batch.status != BatchStatus::Validating {
            return false;
        }
        batch.status = BatchStatus::InProgress;
        batch.in_progress_at = Some(created);
        batch.model = Some(valid.model.clone());
        batch.request_counts.total = total;
        true
    });
    if started != Some(true) {
        // A cancel landed while the file was being read.
        let outcome = process(state, id, input, 0, Some(Tail::Cancelled), created).await?;
        settle_after(
            state,
            id,
            BatchStatus::Cancelled,
            outcome,
            config.finalize_duration,
        )
        .await;
        return Ok(());
    }
    state
        .sim
        .record_submitted(valid.custom_ids.iter().map(String::as_str));
    drop(valid);
    tracing::debug!(batch_id = %id, total, "sim openai: batch in_progress");

    let clock = Instant::now();
    if pause(config.batch_duration, cancel).await {
        let ran = share(
            total,
            clock.elapsed().as_secs_f64() / config.batch_duration.as_secs_f64(),
        );
        let outcome = process(state, id, input, ran, Some(Tail::Cancelled), created).await?;
        settle_after(
            state,
            id,
            BatchStatus::Cancelled,
            outcome,
            config.finalize_duration,
        )
        .await;
        return Ok(());
    }
    if fate.expire {
        let ran = share(total, config.expire_completed_fraction);
        let outcome = process(state, id, input, ran, Some(Tail::Expired), created).await?;
        settle(state, id, BatchStatus::Expired, outcome);
        return Ok(());
    }
    let outcome = process(state, id, input, total, None, created).await?;

    // finalizing
    let finalizing = state.update_batch(id, |batch| {
        if batch.status == BatchStatus::Cancelling {
            return false;
        }
        batch.status = BatchStatus::Finalizing;
        batch.finalizing_at = Some(unix_now());
        true
    });
    if finalizing == Some(true) && !pause(config.finalize_duration, cancel).await {
        settle(state, id, BatchStatus::Completed, outcome);
        return Ok(());
    }
    // Cancelled after every request ran: all results stay.
    settle_after(
        state,
        id,
        BatchStatus::Cancelled,
        outcome,
        config.finalize_duration,
    )
    .await;
    Ok(())
}

/// Sleeps for `duration` or until the batch is cancelled; says whether it is.
async fn pause(duration: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(duration) => cancel.is_cancelled(),
        () = cancel.cancelled() => true,
    }
}

/// `floor(total * fraction)`, with the fraction clamped to `[0, 1]`.
fn share(total: u64, fraction: f64) -> u64 {
    let fraction = if fraction.is_nan() {
        1.0
    } else {
        fraction.clamp(0.0, 1.0)
    };
    ((total as f64 * fraction).floor() as u64).min(total)
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(io::Error::other)?
}

/// Marks the batch `failed` with `error` (or `cancelled`, if a cancel is
/// already pending: the cancel was asked first).
fn fail(state: &OpenAi, id: &str, error: BatchError) {
    let now = unix_now();
    state.update_batch(id, |batch| {
        if batch.status == BatchStatus::Cancelling {
            batch.status = BatchStatus::Cancelled;
            batch.cancelled_at = Some(now);
            return;
        }
        tracing::debug!(batch_id = %id, code = error.code, "sim openai: batch failed");
        batch.status = BatchStatus::Failed;
        batch.failed_at = Some(now);
        batch.errors = Some(BatchErrors {
            object: "list",
            data: vec![error],
        });
    });
}

/// Waits `delay` (the "shortly after" of `cancelling -> cancelled`), then
/// settles the batch.
async fn settle_after(
    state: &OpenAi,
    id: &str,
    status: BatchStatus,
    outcome: Processed,
    delay: Duration,
) {
    tokio::time::sleep(delay).await;
    settle(state, id, status, outcome);
}

/// Publishes the result files and moves the batch to its terminal `status`.
fn settle(state: &OpenAi, id: &str, status: BatchStatus, outcome: Processed) {
    let now = unix_now();
    let Some(ttl) = state.update_batch(id, |batch| batch.output_ttl_secs) else {
        return;
    };
    let register = |written: &Option<WrittenFile>, kind: &str| {
        written.as_ref().map(|file| {
            let object = FileObject::new(
                file.id.clone(),
                file.bytes,
                format!("{id}_{kind}.jsonl"),
                "batch_output",
                ttl,
            );
            state.add_file(object);
            file.id.clone()
        })
    };
    let output_file_id = register(&outcome.output, "output");
    let error_file_id = register(&outcome.errors, "error");
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
        batch.output_file_id = output_file_id;
        batch.error_file_id = error_file_id;
        batch.request_counts.total = outcome.succeeded + outcome.failed;
        batch.request_counts.completed = outcome.succeeded;
        batch.request_counts.failed = outcome.failed;
        batch.usage = BatchUsage::new(outcome.input_tokens, outcome.output_tokens);
        tracing::debug!(batch_id = %id, status = status.as_str(), "sim openai: batch settled");
    });
}

impl BatchError {
    fn whole_file(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            param: None,
            line: None,
        }
    }

    fn at_line(
        code: &'static str,
        message: impl Into<String>,
        param: Option<&'static str>,
        line: u64,
    ) -> Self {
        Self {
            code,
            message: message.into(),
            param,
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
) -> io::Result<Option<(File, Result<ValidInput, BatchError>)>> {
    let mut input = match File::open(path) {
        Ok(input) => input,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err),
    };
    let verdict = validate(&mut input, endpoint)?;
    Ok(Some((input, verdict)))
}

/// Checks every line of the input file against the batch's rules, stopping
/// at the first broken one.
fn validate(input: &mut File, endpoint: &str) -> io::Result<Result<ValidInput, BatchError>> {
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
#[derive(Debug, Clone, Copy)]
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
    output: Option<WrittenFile>,
    errors: Option<WrittenFile>,
    succeeded: u64,
    failed: u64,
    input_tokens: u64,
    output_tokens: u64,
}

struct WrittenFile {
    id: String,
    bytes: u64,
}

/// Runs the first `ran` requests of `input` (file order); the rest get
/// `tail` error lines. Billing is recorded as success lines are written.
async fn process(
    state: &Arc<OpenAi>,
    batch_id: &str,
    input: File,
    ran: u64,
    tail: Option<Tail>,
    created: i64,
) -> io::Result<Processed> {
    let config = state.sim.config();
    let output_id = format!("file-{}", random_base62(22));
    let error_id = format!("file-{}", random_base62(22));
    let job = Job {
        endpoint: state
            .batch(batch_id)
            .map(|batch| batch.endpoint)
            .unwrap_or_default(),
        created,
        ran,
        tail,
        error_rate: config.error_rate,
        seed: config.seed,
        shuffle_seed: xxh3_64(batch_id.as_bytes()),
        output: (output_id.clone(), state.file_path(&output_id)),
        errors: (error_id.clone(), state.file_path(&error_id)),
    };
    let sim = Arc::clone(&state.sim);
    blocking(move || run_requests(input, &job, &sim)).await
}

/// Everything [`run_requests`] needs, owned so it can move to a blocking
/// thread.
struct Job {
    endpoint: String,
    created: i64,
    ran: u64,
    tail: Option<Tail>,
    error_rate: f64,
    seed: u64,
    shuffle_seed: u64,
    output: (String, PathBuf),
    errors: (String, PathBuf),
}

fn run_requests(mut input: File, job: &Job, sim: &Sim) -> io::Result<Processed> {
    input.seek(SeekFrom::Start(0))?;
    let mut reader = BufReader::with_capacity(IO_BUFFER_BYTES, input);
    let mut sink = ResultSink::new(job, sim);
    let mut buf = Vec::new();
    let mut index: u64 = 0;
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        // The file passed validation through this very handle.
        let Ok(request) = serde_json::from_slice::<Value>(&buf) else {
            continue;
        };
        let custom_id = request["custom_id"].as_str().unwrap_or_default();
        if index < job.ran {
            run_request(&mut sink, job, custom_id, &request["body"])?;
        } else if let Some(tail) = job.tail {
            let line = ResultLine {
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

fn run_request(
    sink: &mut ResultSink<'_>,
    job: &Job,
    custom_id: &str,
    body: &Value,
) -> io::Result<()> {
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
    let body = response_body(&job.endpoint, body, job.created);
    let usage = body_usage(&body);
    let line = ResultLine {
        id: line_id(),
        custom_id,
        response: Some(LineResponse {
            status_code: 200,
            request_id: format!("req_{}", random_hex(32)),
            body,
        }),
        error: None,
    };
    sink.push(Destination::Output, &line, Some((custom_id, usage)))
}

fn line_id() -> String {
    format!("batch_req_{}", random_hex(32))
}

/// One line of an output or error file (PROVIDERS.md 1.6).
#[derive(Serialize)]
struct ResultLine<'a> {
    id: String,
    custom_id: &'a str,
    response: Option<LineResponse>,
    error: Option<LineError>,
}

#[derive(Serialize)]
struct LineResponse {
    status_code: u16,
    request_id: String,
    body: Value,
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
struct ResultSink<'a> {
    sim: &'a Sim,
    output: JsonlFile,
    errors: JsonlFile,
    chunk: Vec<PendingLine>,
    shuffle: StdRng,
    input_tokens: u64,
    output_tokens: u64,
}

struct PendingLine {
    destination: Destination,
    json: Vec<u8>,
    /// The custom_id to bill once the line is written, for success lines.
    billed: Option<String>,
}

impl<'a> ResultSink<'a> {
    fn new(job: &Job, sim: &'a Sim) -> Self {
        Self {
            sim,
            output: JsonlFile::new(&job.output),
            errors: JsonlFile::new(&job.errors),
            chunk: Vec::with_capacity(SHUFFLE_CHUNK),
            shuffle: StdRng::seed_from_u64(job.shuffle_seed),
            input_tokens: 0,
            output_tokens: 0,
        }
    }

    fn push(
        &mut self,
        destination: Destination,
        line: &ResultLine<'_>,
        success: Option<(&str, (u64, u64))>,
    ) -> io::Result<()> {
        let json = serde_json::to_vec(line).map_err(io::Error::other)?;
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
        for line in &self.chunk {
            match line.destination {
                Destination::Output => self.output.write_line(&line.json)?,
                Destination::Errors => self.errors.write_line(&line.json)?,
            }
        }
        self.sim
            .record_billed(self.chunk.iter().filter_map(|line| line.billed.as_deref()));
        self.chunk.clear();
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
        validate(&mut file, endpoint).expect("io")
    }

    fn line(custom_id: &str, model: &str) -> String {
        format!(
            r#"{{"custom_id":"{custom_id}","method":"POST","url":"/v1/chat/completions","body":{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}}}"#
        )
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
    fn shares_are_floored_and_clamped() {
        assert_eq!(share(10, 0.25), 2);
        assert_eq!(share(10, 1.5), 10);
        assert_eq!(share(10, -1.0), 0);
        assert_eq!(share(3, f64::NAN), 3);
    }
}
