//! Turns an ended provider batch into one result per request: streams every
//! downloaded result line, maps it to its request by `custom_id`, and
//! accounts for requests the provider said nothing about.
//!
//! It never holds a batch's results in memory: lines are read one at a time
//! from disk and handed to the publisher, which bounds deliveries in flight.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::AsyncBufReadExt;

use crate::config::{Price, ProviderKind};
use crate::model::{
    rfc3339_millis, rfc3339_secs, ErrorInfo, ResultRecord, Source, Status, Timings, Usage,
};
use crate::packer::{MetaBuf, RequestMeta, SealedBatch};
use crate::provider::{
    BatchState, LineOutcome, LineResult, Provider, ProviderBatch, ProviderError,
};
use crate::publisher::{Deliveries, PublishError, Publisher};

/// What a response body says, normalised over endpoints and providers.
#[derive(Debug, Default, PartialEq)]
pub struct Summary {
    pub model: Option<String>,
    pub content: Option<String>,
    pub finish_reason: Option<&'static str>,
    pub usage: Option<Usage>,
    /// Cost the provider reported itself (xAI `cost_in_usd_ticks`).
    pub provider_cost_usd: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
struct Body {
    #[serde(default)]
    model: Option<String>,
    // Chat completions.
    #[serde(default)]
    choices: Vec<Choice>,
    // Responses API.
    #[serde(default)]
    output: Vec<OutputItem>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    incomplete_details: Option<Incomplete>,
    // Anthropic Messages: content blocks, of which `text` ones are read.
    #[serde(default)]
    content: Option<Vec<ContentPart>>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Option<BodyUsage>,
}

#[derive(Debug, Default, Deserialize)]
struct Choice {
    #[serde(default)]
    message: Option<ChoiceMessage>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ChoiceMessage {
    #[serde(default)]
    content: Option<serde_json::Value>,
    #[serde(default)]
    tool_calls: Option<Vec<serde_json::Value>>,
}

#[derive(Debug, Default, Deserialize)]
struct OutputItem {
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    content: Vec<ContentPart>,
}

#[derive(Debug, Default, Deserialize)]
struct ContentPart {
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Incomplete {
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct BodyUsage {
    // Chat completions and embeddings.
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<Details>,
    #[serde(default)]
    completion_tokens_details: Option<Details>,
    // Responses API and Anthropic.
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    input_tokens_details: Option<Details>,
    #[serde(default)]
    output_tokens_details: Option<Details>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    // xAI.
    #[serde(default)]
    cost_in_usd_ticks: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
struct Details {
    #[serde(default)]
    cached_tokens: Option<u64>,
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

fn normalise_finish_reason(reason: &str) -> Option<&'static str> {
    Some(match reason {
        "stop" | "end_turn" | "stop_sequence" | "pause_turn" => "stop",
        "length" | "max_tokens" | "max_output_tokens" | "model_context_window_exceeded" => "length",
        "tool_calls" | "tool_use" | "function_call" => "tool_calls",
        "content_filter" | "refusal" => "content_filter",
        _ => return None,
    })
}

fn text_of(content: &serde_json::Value) -> Option<String> {
    match content {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(parts) => {
            let text: String = parts
                .iter()
                .filter(|p| matches!(p["type"].as_str(), Some("text") | Some("output_text")))
                .filter_map(|p| p["text"].as_str())
                .collect();
            Some(text)
        }
        _ => None,
    }
}

/// Reads content, finish reason, usage and model from a success body.
pub fn summarize(kind: ProviderKind, endpoint: &str, body: &RawValue) -> Summary {
    let Ok(b) = serde_json::from_str::<Body>(body.get()) else {
        return Summary::default();
    };
    let (content, finish_reason) = match (kind, endpoint) {
        (ProviderKind::Anthropic, _) => (
            b.content.as_ref().map(|parts| {
                parts
                    .iter()
                    .filter(|p| p.kind == "text")
                    .filter_map(|p| p.text.as_deref())
                    .collect::<String>()
            }),
            b.stop_reason.as_deref().and_then(normalise_finish_reason),
        ),
        (_, "/v1/embeddings") => (None, None),
        (_, "/v1/responses") if !b.output.is_empty() => {
            let text: String = b
                .output
                .iter()
                .filter(|o| o.kind == "message")
                .flat_map(|o| o.content.iter())
                .filter(|c| c.kind == "output_text")
                .filter_map(|c| c.text.as_deref())
                .collect();
            let finish = if b.output.iter().any(|o| o.kind == "function_call") {
                Some("tool_calls")
            } else {
                match (
                    b.status.as_deref(),
                    b.incomplete_details
                        .as_ref()
                        .and_then(|d| d.reason.as_deref()),
                ) {
                    (Some("incomplete"), Some(reason)) => normalise_finish_reason(reason),
                    _ => Some("stop"),
                }
            };
            (Some(text), finish)
        }
        _ => match b.choices.first() {
            Some(choice) => {
                let content = match &choice.message {
                    Some(m) => m.content.as_ref().and_then(text_of),
                    None => choice.text.clone(),
                };
                let mut finish = choice
                    .finish_reason
                    .as_deref()
                    .and_then(normalise_finish_reason);
                if finish.is_none()
                    && choice
                        .message
                        .as_ref()
                        .and_then(|m| m.tool_calls.as_ref())
                        .is_some_and(|t| !t.is_empty())
                {
                    finish = Some("tool_calls");
                }
                (content, finish)
            }
            None => (None, None),
        },
    };
    let usage = b.usage.as_ref().map(|u| {
        let reasoning = u
            .completion_tokens_details
            .as_ref()
            .or(u.output_tokens_details.as_ref())
            .and_then(|d| d.reasoning_tokens)
            .unwrap_or(0);
        let output = u.completion_tokens.or(u.output_tokens).unwrap_or(0);
        Usage {
            input_tokens: u.prompt_tokens.or(u.input_tokens).unwrap_or(0)
                + u.cache_read_input_tokens.unwrap_or(0)
                + u.cache_creation_input_tokens.unwrap_or(0),
            // xAI counts reasoning apart from completion tokens; both are billed.
            output_tokens: if kind == ProviderKind::Xai {
                output + reasoning
            } else {
                output
            },
            cached_input_tokens: u
                .prompt_tokens_details
                .as_ref()
                .or(u.input_tokens_details.as_ref())
                .and_then(|d| d.cached_tokens)
                .or(u.cache_read_input_tokens)
                .unwrap_or(0),
            reasoning_tokens: reasoning,
        }
    });
    Summary {
        model: b.model,
        content,
        finish_reason,
        usage,
        provider_cost_usd: b
            .usage
            .as_ref()
            .and_then(|u| u.cost_in_usd_ticks)
            .map(|t| t as f64 / 1e10),
    }
}

/// Prices per provider and model, from the configuration.
#[derive(Debug, Clone, Default)]
pub struct Pricing {
    table: HashMap<String, Vec<(String, Price)>>,
}

impl Pricing {
    pub fn new(
        table: &std::collections::BTreeMap<String, std::collections::BTreeMap<String, Price>>,
    ) -> Self {
        let table = table
            .iter()
            .map(|(provider, models)| {
                let mut models: Vec<(String, Price)> =
                    models.iter().map(|(m, p)| (m.clone(), *p)).collect();
                // Longest name first, so `gpt-4o-mini` wins over `gpt-4o`.
                models.sort_by_key(|m| std::cmp::Reverse(m.0.len()));
                (provider.clone(), models)
            })
            .collect();
        Pricing { table }
    }

    /// The price of `model` (exact, else the longest configured prefix, so
    /// a dated snapshot is priced as its alias).
    pub fn price(&self, provider: &str, model: &str) -> Option<Price> {
        let models = self.table.get(provider)?;
        // Configuration keys are case-insensitive (the config crate lowers them).
        let model = model.to_ascii_lowercase();
        let model = model.as_str();
        models
            .iter()
            .find(|(m, _)| m == model)
            .or_else(|| models.iter().find(|(m, _)| model.starts_with(m.as_str())))
            .map(|(_, p)| *p)
    }

    /// Batch cost in USD of `usage`, or `None` for an unpriced model.
    pub fn cost(&self, provider: &str, model: &str, usage: &Usage) -> Option<f64> {
        let p = self.price(provider, model)?;
        let list = (usage.input_tokens as f64 * p.input_per_mtok
            + usage.output_tokens as f64 * p.output_per_mtok)
            / 1e6;
        Some(list * (1.0 - p.batch_discount))
    }
}

/// What a collection published, by status.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Collected {
    pub by_status: HashMap<Status, u64>,
    pub cost_usd: f64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Requests not published but due for another batch, by position.
    pub retry: Vec<u32>,
    /// Whether that batch spends an attempt (expired, per-line 5xx) or not
    /// (the rest of a batch failed for named lines).
    pub retry_spends_attempt: bool,
}

/// Whether a failed line is worth another batch: it expired, or the
/// provider failed it with a server error (OpenAI `status_code` 5xx,
/// Anthropic `api_error` and `overloaded_error`, xAI's gRPC `internal` and
/// `unavailable`). Cancelled lines never are.
pub fn retryable(result: &LineResult) -> bool {
    match result {
        LineResult::Succeeded { .. } => false,
        LineResult::Failed {
            status,
            error,
            status_code,
            ..
        } => {
            *status == Status::Expired
                || status_code.is_some_and(|c| c >= 500)
                || (*status == Status::Errored
                    && status_code.is_none()
                    && matches!(
                        error.kind.as_str(),
                        "api_error" | "overloaded_error" | "internal" | "unavailable"
                    ))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error("downloading results of batch {batch}: {source}")]
    Download {
        batch: String,
        source: ProviderError,
    },
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Publish(#[from] PublishError),
}

/// Everything a collection needs besides the batch.
pub struct CollectContext<'a> {
    pub provider: &'a dyn Provider,
    pub metrics: &'a crate::metrics::Metrics,
    pub publisher: &'a Publisher,
    pub pricing: &'a Pricing,
    pub spool_dir: &'a Path,
    /// Where the batch's cost so far is shown (the status API).
    pub status: Option<&'a crate::status::Registration>,
    /// `retry.max_attempts`: below it, expired and 5xx lines go to another
    /// batch instead of being published.
    pub max_attempts: u32,
}

/// How many results pass between two updates of the cost shown in the
/// status API: often enough to watch, rare enough to cost nothing.
const COST_SHOWN_EVERY: u64 = 256;

/// The error of an I/O call on `path`, for `map_err`: the path is only
/// formatted when there is an error.
fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CollectError + '_ {
    move |source| CollectError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The result builder for one batch.
struct Collection<'a> {
    ctx: &'a CollectContext<'a>,
    batch: &'a SealedBatch,
    pb: &'a ProviderBatch,
    meta: File,
    seen: Vec<bool>,
    deliveries: Deliveries<'a>,
    collected: Collected,
    /// The result being published, serialised (the producer copies it).
    payload: Vec<u8>,
    /// The batch's own times, formatted once.
    submitted_at: Option<String>,
    ended_at: Option<String>,
}

impl<'a> Collection<'a> {
    fn new(
        ctx: &'a CollectContext<'a>,
        batch: &'a SealedBatch,
        pb: &'a ProviderBatch,
        meta: File,
    ) -> Collection<'a> {
        Collection {
            ctx,
            batch,
            pb,
            meta,
            seen: vec![false; batch.len()],
            deliveries: ctx.publisher.deliveries(),
            collected: Collected::default(),
            payload: Vec::new(),
            submitted_at: pb.created_at.and_then(rfc3339_secs),
            ended_at: pb.ended_at.and_then(rfc3339_secs),
        }
    }

    fn timings(&self, meta: &RequestMeta<'_>) -> Timings {
        Timings {
            received_at: meta.timestamp_ms.and_then(rfc3339_millis),
            submitted_at: self.submitted_at.clone(),
            ended_at: self.ended_at.clone(),
        }
    }

    /// Publishes request `i`'s result, or keeps it for a retry.
    async fn publish(
        &mut self,
        i: usize,
        meta: &RequestMeta<'_>,
        outcome: LineResult,
    ) -> Result<(), CollectError> {
        if self.batch.attempt < self.ctx.max_attempts && retryable(&outcome) {
            self.collected.retry.push(i as u32);
            self.collected.retry_spends_attempt = true;
            return Ok(());
        }
        self.publish_final(meta, outcome).await
    }

    /// Publishes a terminal result.
    async fn publish_final(
        &mut self,
        meta: &RequestMeta<'_>,
        outcome: LineResult,
    ) -> Result<(), CollectError> {
        let route = &self.batch.route;
        let source = Source {
            topic: self.batch.topic.to_string(),
            partition: self.batch.partition,
            offset: meta.offset,
        };
        let timings = self.timings(meta);
        let (status, summary, error, body) = match outcome {
            LineResult::Succeeded { body } => {
                let summary = summarize(route.kind, route.endpoint, &body);
                (Status::Succeeded, summary, None, Some(body))
            }
            LineResult::Failed {
                status,
                error,
                body,
                ..
            } => (status, Summary::default(), Some(error), body),
        };
        let model = summary.model.as_deref().unwrap_or(&route.model);
        let cost = match (summary.provider_cost_usd, &summary.usage) {
            (Some(c), _) => Some(c),
            (None, Some(u)) => self.ctx.pricing.cost(&route.provider, &route.model, u),
            (None, None) => None,
        };
        let mut record = ResultRecord {
            custom_id: &meta.custom_id,
            status,
            provider: Some(&route.provider),
            model: Some(model),
            batch_id: Some(&self.pb.id),
            attempt: self.batch.attempt,
            response: body.as_deref(),
            content: summary.content.as_deref(),
            finish_reason: summary.finish_reason,
            usage: summary.usage,
            cost_usd: cost,
            error,
            metadata: meta.metadata,
            source,
            timings,
            truncated: false,
        };
        record.write_to(&mut self.payload, self.ctx.publisher.max_bytes());
        *self.collected.by_status.entry(status).or_default() += 1;
        if let Some(u) = &summary.usage {
            self.collected.input_tokens += u.input_tokens;
            self.collected.output_tokens += u.output_tokens;
        }
        self.collected.cost_usd += cost.unwrap_or(0.0);
        if let Some(ts) = meta.timestamp_ms {
            let now = chrono::Utc::now().timestamp_millis();
            self.ctx.metrics.result_latency((now - ts) as f64 / 1000.0);
        }
        self.deliveries.push(&meta.custom_id, &self.payload).await?;
        let published: u64 = self.collected.by_status.values().sum();
        if published + self.collected.retry.len() as u64 == (self.batch.len() as u64).div_ceil(2) {
            crate::crash_point!("mid_publish");
        }
        if published % COST_SHOWN_EVERY == 0 {
            self.show_cost();
        }
        Ok(())
    }

    fn show_cost(&self) {
        if let Some(status) = self.ctx.status {
            status.set_cost(self.collected.cost_usd);
        }
    }

    async fn read_file(&mut self, path: &Path) -> Result<(), CollectError> {
        let file = tokio::fs::File::open(path).await.map_err(io_err(path))?;
        let mut reader = tokio::io::BufReader::with_capacity(256 * 1024, file);
        let mut meta_buf = MetaBuf::default();
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).await.map_err(io_err(path))? == 0 {
                break;
            }
            let text = line.trim_end_matches(['\n', '\r']);
            if text.trim().is_empty() {
                continue;
            }
            let outcome: LineOutcome = match self.ctx.provider.parse_result_line(text) {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(batch = %self.batch.id, provider_batch = %self.pb.id, error = %e, "skipping unreadable result line");
                    continue;
                }
            };
            let Some(i) = self.batch.index_of(&outcome.custom_id) else {
                tracing::warn!(batch = %self.batch.id, custom_id = %outcome.custom_id, "result for a custom_id not in the batch");
                continue;
            };
            let meta = self
                .batch
                .read_meta(&self.meta, i, &mut meta_buf)
                .map_err(io_err(&self.batch.meta_path))?;
            if meta.custom_id != outcome.custom_id {
                tracing::warn!(batch = %self.batch.id, custom_id = %outcome.custom_id, "result for a custom_id not in the batch");
                continue;
            }
            if std::mem::replace(&mut self.seen[i], true) {
                tracing::warn!(batch = %self.batch.id, custom_id = %outcome.custom_id, "second result line for one request ignored");
                continue;
            }
            self.publish(i, &meta, outcome.result).await?;
        }
        Ok(())
    }

    async fn run(mut self, paths: &[std::path::PathBuf]) -> Result<Collected, CollectError> {
        for path in paths {
            self.read_file(path).await?;
        }
        self.publish_missing().await?;
        self.show_cost();
        self.deliveries.finish().await?;
        Ok(self.collected)
    }

    /// Results for requests no line spoke of.
    async fn publish_missing(&mut self) -> Result<(), CollectError> {
        let named: HashMap<u64, &crate::provider::BatchError> = self
            .pb
            .errors
            .iter()
            .filter_map(|e| e.line.map(|l| (l, e)))
            .collect();
        let whole_batch = (!self.pb.errors.is_empty()).then(|| {
            self.pb
                .errors
                .iter()
                .map(|e| match e.line {
                    Some(l) => format!("{} (line {l}): {}", e.code, e.message),
                    None => format!("{}: {}", e.code, e.message),
                })
                .collect::<Vec<_>>()
                .join("; ")
        });
        // A batch failed for named lines: those lines error, the rest go to
        // another batch without spending an attempt. Only when a named line
        // is one of ours, so that every resubmission is smaller.
        let resubmit_rest = self.pb.state == BatchState::Failed
            && named
                .keys()
                .any(|&l| l >= 1 && l <= self.seen.len() as u64 && !self.seen[l as usize - 1]);
        let mut meta_buf = MetaBuf::default();
        for i in 0..self.seen.len() {
            if self.seen[i] {
                continue;
            }
            if resubmit_rest && !named.contains_key(&(i as u64 + 1)) {
                self.seen[i] = true;
                self.collected.retry.push(i as u32);
                continue;
            }
            let meta = self
                .batch
                .read_meta(&self.meta, i, &mut meta_buf)
                .map_err(io_err(&self.batch.meta_path))?;
            let error = match (self.pb.state, named.get(&(i as u64 + 1)), &whole_batch) {
                (BatchState::Failed, Some(e), _) => {
                    ErrorInfo::new(e.code.clone(), e.message.clone())
                }
                (BatchState::Failed, None, Some(all)) => {
                    let code = self
                        .pb
                        .errors
                        .first()
                        .map(|e| e.code.clone())
                        .unwrap_or_else(|| "batch_failed".into());
                    ErrorInfo::new(code, all.clone())
                }
                (BatchState::Failed, None, None) => ErrorInfo::new(
                    "batch_failed",
                    "the provider failed the batch without saying why",
                ),
                _ => ErrorInfo::new(
                    "missing_result",
                    format!(
                        "provider batch {} ended {} with no result for this request",
                        self.pb.id,
                        self.pb.state.as_str()
                    ),
                ),
            };
            self.seen[i] = true;
            self.publish(
                i,
                &meta,
                LineResult::Failed {
                    status: Status::Errored,
                    error,
                    body: None,
                    status_code: None,
                },
            )
            .await?;
        }
        Ok(())
    }
}

/// Publishes a result for every request of `batch`, from the ended provider
/// batch `pb`. Returns once every result is delivered.
pub async fn collect(
    ctx: &CollectContext<'_>,
    batch: &SealedBatch,
    pb: &ProviderBatch,
) -> Result<Collected, CollectError> {
    let paths = ctx
        .provider
        .download_results(pb, ctx.spool_dir, &batch.id)
        .await
        .map_err(|source| CollectError::Download {
            batch: batch.id.clone(),
            source,
        })?;
    let meta = batch.open_meta().map_err(io_err(&batch.meta_path))?;
    let c = Collection::new(ctx, batch, pb, meta);
    let result = c.run(&paths).await;
    for path in &paths {
        let _ = tokio::fs::remove_file(path).await;
    }
    result
}

/// Publishes every request of `batch` with one status and error, for a
/// batch that never reached the provider (a definite refusal) or whose
/// provider batch is gone.
pub async fn fail_all(
    ctx: &CollectContext<'_>,
    batch: &SealedBatch,
    status: Status,
    error: ErrorInfo,
) -> Result<Collected, CollectError> {
    let pb = ProviderBatch {
        id: String::new(),
        state: BatchState::Failed,
        counts: Default::default(),
        input_file_id: None,
        output_file_id: None,
        error_file_id: None,
        errors: Vec::new(),
        tag: Some(batch.id.clone()),
        created_at: None,
        ended_at: None,
    };
    let meta = batch.open_meta().map_err(io_err(&batch.meta_path))?;
    let mut c = Collection::new(ctx, batch, &pb, meta);
    let mut meta_buf = MetaBuf::default();
    for i in 0..batch.len() {
        let meta = batch
            .read_meta(&c.meta, i, &mut meta_buf)
            .map_err(io_err(&batch.meta_path))?;
        c.publish_final(
            &meta,
            LineResult::Failed {
                status,
                error: error.clone(),
                body: None,
                status_code: None,
            },
        )
        .await?;
    }
    c.deliveries.finish().await?;
    Ok(c.collected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn chat_completion_summary() {
        // https://platform.openai.com/docs/api-reference/chat/object
        let body = raw(
            r#"{"id":"chatcmpl-123","object":"chat.completion","created":1677652288,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there, how may I assist you today?"},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21,"prompt_tokens_details":{"cached_tokens":2},"completion_tokens_details":{"reasoning_tokens":3}}}"#,
        );
        let s = summarize(ProviderKind::Openai, "/v1/chat/completions", &body);
        assert_eq!(s.model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
        assert_eq!(
            s.content.as_deref(),
            Some("Hello there, how may I assist you today?")
        );
        assert_eq!(s.finish_reason, Some("stop"));
        assert_eq!(
            s.usage,
            Some(Usage {
                input_tokens: 9,
                output_tokens: 12,
                cached_input_tokens: 2,
                reasoning_tokens: 3
            })
        );
        // xAI bills reasoning apart from completion tokens and reports cost.
        let body = raw(
            r#"{"id":"x","object":"chat.completion","model":"grok-4.3","choices":[{"index":0,"message":{"role":"assistant","content":"Paris"},"finish_reason":"stop"}],"usage":{"prompt_tokens":10,"completion_tokens":3,"total_tokens":14,"prompt_tokens_details":{"cached_tokens":2},"completion_tokens_details":{"reasoning_tokens":1},"cost_in_usd_ticks":123}}"#,
        );
        let s = summarize(ProviderKind::Xai, "/v1/chat/completions", &body);
        assert_eq!(s.usage.unwrap().output_tokens, 4);
        assert_eq!(s.provider_cost_usd, Some(123e-10));
    }

    #[test]
    fn responses_and_anthropic_and_embeddings_summaries() {
        let body = raw(
            r#"{"id":"resp_1","object":"response","status":"incomplete","incomplete_details":{"reason":"max_output_tokens"},"model":"gpt-4o-mini","output":[{"type":"message","id":"msg_1","status":"completed","role":"assistant","content":[{"type":"output_text","text":"Hel","annotations":[]},{"type":"output_text","text":"lo","annotations":[]}]}],"usage":{"input_tokens":5,"output_tokens":2,"total_tokens":7,"input_tokens_details":{"cached_tokens":0},"output_tokens_details":{"reasoning_tokens":0}}}"#,
        );
        let s = summarize(ProviderKind::Openai, "/v1/responses", &body);
        assert_eq!(s.content.as_deref(), Some("Hello"));
        assert_eq!(s.finish_reason, Some("length"));
        assert_eq!(s.usage.unwrap().input_tokens, 5);

        // https://platform.claude.com/docs/en/build-with-claude/batch-processing
        let body = raw(
            r#"{"id":"msg_014VwiXb","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"Hello again!"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":11,"output_tokens":36,"service_tier":"batch"}}"#,
        );
        let s = summarize(ProviderKind::Anthropic, "/v1/messages", &body);
        assert_eq!(s.content.as_deref(), Some("Hello again!"));
        assert_eq!(s.finish_reason, Some("stop"));
        assert_eq!(s.usage.unwrap().output_tokens, 36);

        let body = raw(
            r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,0.2]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#,
        );
        let s = summarize(ProviderKind::Openai, "/v1/embeddings", &body);
        assert_eq!(s.content, None);
        assert_eq!(s.finish_reason, None);
        assert_eq!(s.usage.unwrap().input_tokens, 8);
    }

    #[test]
    fn pricing_matches_snapshots_by_prefix() {
        let mut models = std::collections::BTreeMap::new();
        models.insert(
            "gpt-4o".to_owned(),
            Price {
                input_per_mtok: 2.5,
                output_per_mtok: 10.0,
                batch_discount: 0.5,
            },
        );
        models.insert(
            "gpt-4o-mini".to_owned(),
            Price {
                input_per_mtok: 0.15,
                output_per_mtok: 0.6,
                batch_discount: 0.5,
            },
        );
        let mut table = std::collections::BTreeMap::new();
        table.insert("openai".to_owned(), models);
        let pricing = Pricing::new(&table);
        let usage = Usage {
            input_tokens: 1_000_000,
            output_tokens: 1_000_000,
            ..Default::default()
        };
        let cost = pricing
            .cost("openai", "gpt-4o-mini-2024-07-18", &usage)
            .unwrap();
        assert!((cost - 0.375).abs() < 1e-9, "{cost}");
        assert!((pricing.cost("openai", "gpt-4o", &usage).unwrap() - 6.25).abs() < 1e-9);
        assert_eq!(pricing.cost("openai", "o3", &usage), None);
        assert_eq!(pricing.cost("other", "gpt-4o", &usage), None);
    }

    #[test]
    fn expired_and_server_errors_are_retryable_and_nothing_else() {
        let failed = |status, kind: &str, code| LineResult::Failed {
            status,
            error: ErrorInfo::new(kind, "m"),
            body: None,
            status_code: code,
        };
        for yes in [
            failed(Status::Expired, "batch_expired", None),
            failed(Status::Expired, "expired", None),
            failed(Status::Errored, "server_error", Some(500)),
            failed(Status::Errored, "http_503", Some(503)),
            failed(Status::Errored, "api_error", None),
            failed(Status::Errored, "overloaded_error", None),
            failed(Status::Errored, "internal", None),
            failed(Status::Errored, "unavailable", None),
        ] {
            assert!(retryable(&yes), "{yes:?}");
        }
        for no in [
            LineResult::Succeeded { body: raw("{}") },
            failed(Status::Errored, "context_length_exceeded", Some(400)),
            failed(Status::Errored, "invalid_request_error", None),
            failed(Status::Errored, "invalid_argument", None),
            failed(Status::Canceled, "batch_cancelled", None),
            failed(Status::Canceled, "api_error", None),
            failed(Status::Errored, "missing_result", None),
        ] {
            assert!(!retryable(&no), "{no:?}");
        }
    }
}
