//! Deterministic stand-ins for what OpenAI's endpoints answer.
//!
//! Every body is a pure function of the request body (and, for ids and
//! timestamps, the `created` time the batch passes in), so tests can compute
//! the exact expected result line with the same public functions the
//! simulator uses. Nothing here does I/O or reads a clock.

use std::borrow::Cow;

use serde::Serialize;
use serde_json::{json, Map, Value};
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// How many words of the last user message a chat reply quotes.
const QUOTED_WORDS: usize = 8;
/// Vector size of an embedding when the request names no `dimensions`.
const DEFAULT_EMBEDDING_DIMENSIONS: usize = 8;
/// Largest `dimensions` honoured (text-embedding-3-large's size).
const MAX_EMBEDDING_DIMENSIONS: usize = 3072;
/// Salt that splits the per-request error population into 400s and 500s,
/// independent of the draw that picked it.
const STATUS_SALT: u64 = 0x5eed_0fe4_4000_0001;

/// Whether the request with this `custom_id` gets a per-request error: the
/// xxh3 of `custom_id` (seeded with `seed`), mapped to `[0, 1)`, is below
/// `rate`.
pub fn injected_error(custom_id: &str, rate: f64, seed: u64) -> bool {
    if rate.is_nan() || rate <= 0.0 {
        return false;
    }
    unit_interval(xxh3_64_with_seed(custom_id.as_bytes(), seed)) < rate
}

/// Salt that makes the invalid-line draw independent of the others.
const INVALID_LINE_SALT: u64 = 0x1a7a_11d0_0000_0001;

/// Whether the input line of the request with this `custom_id` fails
/// validation (the simulator's `invalid_line_rate`).
pub fn invalid_line(custom_id: &str, rate: f64, seed: u64) -> bool {
    injected_error(custom_id, rate, seed ^ INVALID_LINE_SALT)
}

/// Salt that makes the dropped-result draw independent of the error draw.
const DROP_SALT: u64 = 0xd20f_0000_0000_0001;

/// Whether the provider loses the result of the request with this
/// `custom_id` (the simulator's `drop_rate`): a draw like
/// [`injected_error`]'s, salted so the two are independent.
pub fn dropped_result(custom_id: &str, rate: f64, seed: u64) -> bool {
    injected_error(custom_id, rate, seed ^ DROP_SALT)
}

/// The HTTP status of an injected per-request error: 400
/// (`context_length_exceeded`) for about half of the custom_ids, 500
/// (`server_error`) for the rest, chosen deterministically.
pub fn injected_error_status(custom_id: &str, seed: u64) -> u16 {
    if xxh3_64_with_seed(custom_id.as_bytes(), seed ^ STATUS_SALT) & 1 == 0 {
        400
    } else {
        500
    }
}

/// The assistant's reply to a chat-like request and its finish reason.
///
/// The content is a short sentence holding a hash of the conversation
/// (`messages`, or `input`/`prompt` for the other text endpoints) and the
/// first words of the last user message. One word counts as one token: when
/// `max_completion_tokens`, `max_tokens` or `max_output_tokens` is smaller
/// than the reply's word count, the reply is cut to that many words and the
/// finish reason is `"length"`; otherwise it is `"stop"`.
pub fn chat_reply(body: &Value) -> (String, &'static str) {
    reply_to(body, crate::sim::json_digest64(conversation(body), 0))
}

/// What [`chat_reply`] hashes: `messages`, or `input`/`prompt` for the
/// other text endpoints.
fn conversation(body: &Value) -> &Value {
    CONVERSATION_KEYS
        .iter()
        .find_map(|key| body.get(*key))
        .unwrap_or(&Value::Null)
}

/// The keys [`conversation`] looks for, first found wins.
const CONVERSATION_KEYS: [&str; 3] = ["messages", "input", "prompt"];

/// [`chat_reply`], given the digest of the conversation.
fn reply_to(body: &Value, digest: u64) -> (String, &'static str) {
    use std::fmt::Write as _;
    let mut reply = format!("Simulated reply {digest:016x}");
    let mut words = 3;
    let text = last_user_text(body).unwrap_or_default();
    let mut quoted = text.split_whitespace().take(QUOTED_WORDS).peekable();
    if quoted.peek().is_some() {
        reply.push_str(" to:");
        words += 1;
        for word in quoted {
            let _ = write!(reply, " {word}");
            words += 1;
        }
    } else {
        reply.push('.');
    }

    let limit = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
        .iter()
        .find_map(|key| body.get(*key).and_then(Value::as_u64));
    match limit {
        Some(limit) if limit < words => {
            // `limit < words` so it fits in usize.
            let kept = usize::try_from(limit).unwrap_or(usize::MAX);
            let cut: Vec<&str> = reply.split_whitespace().take(kept).collect();
            (cut.join(" "), "length")
        }
        _ => (reply, "stop"),
    }
}

/// The digests a reply and its id derive from, taken from one
/// serialisation of the request body: the 128-bit XXH3 of the whole body
/// seeded with `seed` (as [`crate::sim::json_digest128`]), and the 64-bit
/// XXH3 of its [`conversation`] (as [`crate::sim::json_digest64`], seed 0).
fn body_digests(body: &Value, seed: u64) -> (u128, u64) {
    use xxhash_rust::xxh3::{xxh3_128_with_seed, xxh3_64_with_seed};
    thread_local! {
        static TEXT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let Value::Object(fields) = body else {
        return (
            crate::sim::json_digest128(body, seed),
            crate::sim::json_digest64(conversation(body), 0),
        );
    };
    TEXT.with_borrow_mut(|text| {
        // The compact form serde_json writes for a map, written a field at a
        // time to note where each conversation key's value lies.
        text.clear();
        text.push(b'{');
        let mut found: [Option<(usize, usize)>; 3] = [None; 3];
        for (i, (key, value)) in fields.iter().enumerate() {
            if i > 0 {
                text.push(b',');
            }
            let written = serde_json::to_writer(&mut *text, key).and_then(|()| {
                text.push(b':');
                let start = text.len();
                serde_json::to_writer(&mut *text, value).map(|()| start)
            });
            let start = written.expect("writing JSON to a Vec cannot fail");
            if let Some(slot) = CONVERSATION_KEYS.iter().position(|k| k == key) {
                found[slot] = Some((start, text.len()));
            }
        }
        text.push(b'}');
        let conversation = match found.iter().flatten().next() {
            Some(&(start, end)) => &text[start..end],
            None => b"null".as_slice(),
        };
        (
            xxh3_128_with_seed(text, seed),
            xxh3_64_with_seed(conversation, 0),
        )
    })
}

/// The endpoint's normal response to `body`, as it would appear in a batch
/// output line. `created` stamps the body (and seeds its ids) so the result
/// is identical every time for the same request within one batch.
pub fn response_body(endpoint: &str, body: &Value, created: i64) -> Value {
    match endpoint {
        "/v1/chat/completions" => chat_completion(body, created),
        "/v1/responses" => response_object(body, created),
        "/v1/embeddings" => embeddings(body),
        "/v1/completions" => text_completion(body, created),
        "/v1/moderations" => moderation(body, created),
        "/v1/images/generations" | "/v1/images/edits" => images(body, created),
        "/v1/videos" => video(body, created),
        _ => json!({
            "id": deterministic_id("sim_", body, created),
            "object": "sim.unsupported_endpoint",
            "created": created,
            "endpoint": endpoint,
        }),
    }
}

/// The model a request runs on: `body.model`, or the endpoint's default
/// for the endpoints where OpenAI makes `model` optional.
pub(crate) fn request_model(endpoint: &str, body: &Value) -> Option<String> {
    if let Some(model) = body.get("model").and_then(Value::as_str) {
        return Some(model.to_owned());
    }
    let default = match endpoint {
        "/v1/moderations" => "omni-moderation-latest",
        "/v1/images/generations" | "/v1/images/edits" => "dall-e-2",
        "/v1/videos" => "sora-2",
        _ => return None,
    };
    Some(default.to_owned())
}

/// How many embedding inputs a `/v1/embeddings` request carries.
pub(crate) fn embedding_input_count(body: &Value) -> usize {
    embedding_inputs(body).len()
}

/// Input and output tokens a success body reports, whatever its endpoint.
pub(crate) fn body_usage(body: &Value) -> (u64, u64) {
    let usage = &body["usage"];
    let input = usage["prompt_tokens"]
        .as_u64()
        .or_else(|| usage["input_tokens"].as_u64())
        .unwrap_or(0);
    let output = usage["completion_tokens"]
        .as_u64()
        .or_else(|| usage["output_tokens"].as_u64())
        .unwrap_or(0);
    (input, output)
}

fn chat_completion(body: &Value, created: i64) -> Value {
    serde_json::to_value(ChatCompletion::new(body, created))
        .expect("a chat completion has string keys only")
}

/// A `chat.completion` object (PROVIDERS.md 1.6), typed so that a batch
/// writes each one without building a `Value` first. Its fields are
/// declared in the order a `Value` writes its keys (sorted), so the two
/// give the same bytes.
#[derive(Serialize)]
pub(crate) struct ChatCompletion<'a> {
    choices: [ChatChoice; 1],
    created: i64,
    id: String,
    model: Cow<'a, Value>,
    object: &'static str,
    service_tier: &'static str,
    system_fingerprint: &'static str,
    usage: ChatUsage,
}

#[derive(Serialize)]
struct ChatChoice {
    finish_reason: &'static str,
    index: u32,
    logprobs: (),
    message: ChatMessage,
}

#[derive(Serialize)]
struct ChatMessage {
    annotations: [(); 0],
    content: String,
    refusal: (),
    role: &'static str,
}

#[derive(Serialize)]
struct ChatUsage {
    completion_tokens: u64,
    completion_tokens_details: ReasoningTokens,
    prompt_tokens: u64,
    prompt_tokens_details: CachedTokens,
    total_tokens: u64,
}

#[derive(Serialize)]
struct ReasoningTokens {
    reasoning_tokens: u64,
}

#[derive(Serialize)]
struct CachedTokens {
    cached_tokens: u64,
}

impl<'a> ChatCompletion<'a> {
    /// The completion of the chat request `body` in a batch stamped
    /// `created`.
    pub(crate) fn new(body: &'a Value, created: i64) -> Self {
        let (id_digest, conversation_digest) = body_digests(body, created as u64);
        let (content, finish_reason) = reply_to(body, conversation_digest);
        let prompt_tokens = prompt_tokens(body);
        let completion_tokens = word_count(&content);
        Self {
            choices: [ChatChoice {
                finish_reason,
                index: 0,
                logprobs: (),
                message: ChatMessage {
                    annotations: [],
                    content,
                    refusal: (),
                    role: "assistant",
                },
            }],
            created,
            id: format!("chatcmpl-{id_digest:032x}"),
            model: body
                .get("model")
                .map_or_else(|| Cow::Owned(Value::from("unknown")), Cow::Borrowed),
            object: "chat.completion",
            service_tier: "default",
            system_fingerprint: "fp_batchline_sim",
            usage: ChatUsage {
                completion_tokens,
                completion_tokens_details: ReasoningTokens {
                    reasoning_tokens: 0,
                },
                prompt_tokens,
                prompt_tokens_details: CachedTokens { cached_tokens: 0 },
                total_tokens: prompt_tokens + completion_tokens,
            },
        }
    }

    /// Input and output tokens, as [`body_usage`] reads them.
    pub(crate) fn usage(&self) -> (u64, u64) {
        (self.usage.prompt_tokens, self.usage.completion_tokens)
    }
}

fn response_object(body: &Value, created: i64) -> Value {
    let (content, finish_reason) = chat_reply(body);
    let input_tokens = prompt_tokens(body);
    let output_tokens = word_count(&content);
    let complete = finish_reason == "stop";
    let (status, incomplete_details) = if complete {
        ("completed", Value::Null)
    } else {
        ("incomplete", json!({"reason": "max_output_tokens"}))
    };
    json!({
        "id": deterministic_id("resp_", body, created),
        "object": "response",
        "created_at": created,
        "status": status,
        "error": null,
        "incomplete_details": incomplete_details,
        "instructions": body.get("instructions").cloned().unwrap_or(Value::Null),
        "max_output_tokens": body.get("max_output_tokens").cloned().unwrap_or(Value::Null),
        "model": model_or_unknown(body),
        "output": [{
            "type": "message",
            "id": deterministic_id("msg_", body, created),
            "status": status,
            "role": "assistant",
            "content": [{"type": "output_text", "text": content, "annotations": []}],
        }],
        "parallel_tool_calls": true,
        "previous_response_id": null,
        "reasoning": {"effort": null, "summary": null},
        "store": true,
        "temperature": body.get("temperature").cloned().unwrap_or(json!(1.0)),
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": body.get("top_p").cloned().unwrap_or(json!(1.0)),
        "truncation": "disabled",
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        },
        "user": null,
        "metadata": body.get("metadata").cloned().unwrap_or_else(|| json!({})),
    })
}

fn embeddings(body: &Value) -> Value {
    let dimensions = body
        .get("dimensions")
        .and_then(Value::as_u64)
        .and_then(|d| usize::try_from(d).ok())
        .filter(|d| (1..=MAX_EMBEDDING_DIMENSIONS).contains(d))
        .unwrap_or(DEFAULT_EMBEDDING_DIMENSIONS);
    let base64 = body.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let inputs = embedding_inputs(body);
    let mut prompt_tokens = 0;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            prompt_tokens += match input {
                Value::String(text) => tokens_for_chars(text.chars().count()),
                Value::Array(tokens) => tokens.len() as u64,
                other => tokens_for_chars(other.to_string().chars().count()),
            };
            let vector = embedding_vector(&input.to_string(), dimensions);
            let embedding = if base64 {
                let bytes: Vec<u8> = vector
                    .iter()
                    .flat_map(|x| (*x as f32).to_le_bytes())
                    .collect();
                Value::String(base64_encode(&bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    json!({
        "object": "list",
        "data": data,
        "model": model_or_unknown(body),
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    })
}

fn text_completion(body: &Value, created: i64) -> Value {
    let (text, finish_reason) = chat_reply(body);
    let prompt_tokens = prompt_tokens(body);
    let completion_tokens = word_count(&text);
    json!({
        "id": deterministic_id("cmpl-", body, created),
        "object": "text_completion",
        "created": created,
        "model": model_or_unknown(body),
        "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish_reason}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    })
}

fn moderation(body: &Value, created: i64) -> Value {
    const CATEGORIES: [&str; 13] = [
        "harassment",
        "harassment/threatening",
        "hate",
        "hate/threatening",
        "illicit",
        "illicit/violent",
        "self-harm",
        "self-harm/instructions",
        "self-harm/intent",
        "sexual",
        "sexual/minors",
        "violence",
        "violence/graphic",
    ];
    let inputs: Vec<Value> = match body.get("input") {
        Some(Value::Array(items)) => items.clone(),
        Some(other) => vec![other.clone()],
        None => Vec::new(),
    };
    let results: Vec<Value> = inputs
        .iter()
        .map(|input| {
            let text = input.to_string();
            let mut categories = Map::new();
            let mut scores = Map::new();
            for (salt, category) in (0u64..).zip(CATEGORIES) {
                categories.insert(category.to_owned(), Value::Bool(false));
                // Small, stable scores well under any flagging threshold.
                let score = round_to(
                    unit_interval(xxh3_64_with_seed(text.as_bytes(), salt)) * 1e-3,
                    1e9,
                );
                scores.insert(category.to_owned(), json!(score));
            }
            json!({"flagged": false, "categories": categories, "category_scores": scores})
        })
        .collect();
    json!({
        "id": deterministic_id("modr-", body, created),
        "model": request_model("/v1/moderations", body).unwrap_or_default(),
        "results": results,
    })
}

fn images(body: &Value, created: i64) -> Value {
    // A 1x1 transparent PNG: the shape matters here, not the picture.
    const PIXEL_PNG: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII=";
    let count = body
        .get("n")
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .clamp(1, 10);
    let data: Vec<Value> = (0..count).map(|_| json!({"b64_json": PIXEL_PNG})).collect();
    let input_tokens = prompt_tokens(body);
    json!({
        "created": created,
        "data": data,
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"text_tokens": input_tokens, "image_tokens": 0},
            "output_tokens": 0,
            "total_tokens": input_tokens,
        },
    })
}

fn video(body: &Value, created: i64) -> Value {
    json!({
        "id": deterministic_id("video_", body, created),
        "object": "video",
        "created_at": created,
        "completed_at": created,
        "status": "completed",
        "model": request_model("/v1/videos", body).unwrap_or_default(),
        "progress": 100,
        "seconds": body.get("seconds").cloned().unwrap_or(json!("4")),
        "size": body.get("size").cloned().unwrap_or(json!("720x1280")),
    })
}

/// The text of the last user turn: the last `role:"user"` message of
/// `messages` or of an `input` list, a plain `input`/`prompt` string, or the
/// last string of a `prompt` list.
fn last_user_text(body: &Value) -> Option<Cow<'_, str>> {
    if let Some(messages) = body.get("messages").and_then(Value::as_array) {
        return last_user_message(messages);
    }
    for key in ["input", "prompt"] {
        match body.get(key) {
            Some(Value::String(text)) => return Some(Cow::Borrowed(text)),
            Some(Value::Array(items)) => {
                if let Some(text) = last_user_message(items) {
                    return Some(text);
                }
                if let Some(text) = items.iter().rev().find_map(Value::as_str) {
                    return Some(Cow::Borrowed(text));
                }
            }
            _ => {}
        }
    }
    None
}

fn last_user_message(messages: &[Value]) -> Option<Cow<'_, str>> {
    messages
        .iter()
        .rev()
        .find(|message| message.get("role").and_then(Value::as_str) == Some("user"))
        .map(|message| content_text(message.get("content").unwrap_or(&Value::Null)))
}

/// The text of a message `content`: a string, or the `text` of its parts
/// (`text`, `input_text`, …) joined by spaces.
fn content_text(content: &Value) -> Cow<'_, str> {
    match content {
        Value::String(text) => Cow::Borrowed(text),
        Value::Array(parts) => Cow::Owned(
            parts
                .iter()
                .filter_map(|part| part.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(" "),
        ),
        _ => Cow::Borrowed(""),
    }
}

/// About one token per four characters of prompt text, at least one.
fn prompt_tokens(body: &Value) -> u64 {
    let mut chars = 0;
    if let Some(messages) = body.get("messages").and_then(Value::as_array) {
        for message in messages {
            chars += content_chars(message.get("content").unwrap_or(&Value::Null));
        }
    }
    for key in ["instructions", "input", "prompt"] {
        chars += match body.get(key) {
            Some(Value::String(text)) => text.chars().count(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| match item {
                    Value::String(text) => text.chars().count(),
                    other => content_chars(other.get("content").unwrap_or(&Value::Null)),
                })
                .sum(),
            _ => 0,
        };
    }
    tokens_for_chars(chars)
}

/// The length in characters of [`content_text`], without building it.
fn content_chars(content: &Value) -> usize {
    match content {
        Value::String(text) => text.chars().count(),
        Value::Array(parts) => {
            let (chars, texts) = parts
                .iter()
                .filter_map(|part| part.get("text").and_then(Value::as_str))
                .fold((0, 0_usize), |(chars, texts), text| {
                    (chars + text.chars().count(), texts + 1)
                });
            // The spaces that join the parts.
            chars + texts.saturating_sub(1)
        }
        _ => 0,
    }
}

fn tokens_for_chars(chars: usize) -> u64 {
    (chars as u64).div_ceil(4).max(1)
}

fn word_count(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

fn model_or_unknown(body: &Value) -> Value {
    body.get("model")
        .cloned()
        .unwrap_or_else(|| Value::String("unknown".to_owned()))
}

/// The inputs of an embeddings request: one per string, or one token list.
fn embedding_inputs(body: &Value) -> Vec<Value> {
    match body.get("input") {
        Some(Value::Array(items)) if items.iter().all(Value::is_number) && !items.is_empty() => {
            vec![Value::Array(items.clone())]
        }
        Some(Value::Array(items)) => items.clone(),
        Some(other) => vec![other.clone()],
        None => Vec::new(),
    }
}

/// A unit-length vector derived from the input text.
fn embedding_vector(text: &str, dimensions: usize) -> Vec<f64> {
    let raw: Vec<f64> = (0u64..)
        .take(dimensions)
        .map(|salt| unit_interval(xxh3_64_with_seed(text.as_bytes(), salt)) * 2.0 - 1.0)
        .collect();
    let norm = raw.iter().map(|x| x * x).sum::<f64>().sqrt();
    let norm = if norm > 0.0 { norm } else { 1.0 };
    raw.iter().map(|x| round_to(x / norm, 1e6)).collect()
}

/// Rounds to a few decimals, so the number survives a trip through JSON
/// text unchanged (serde_json parses long decimals only to within one ulp).
fn round_to(x: f64, scale: f64) -> f64 {
    (x * scale).round() / scale
}

/// A stable id: `prefix` plus the hash of the request and its batch time.
fn deterministic_id(prefix: &str, body: &Value, created: i64) -> String {
    let digest = crate::sim::json_digest128(body, created as u64);
    format!("{prefix}{digest:032x}")
}

/// Maps a hash to `[0, 1)` using its top 53 bits (an f64's precision).
fn unit_interval(hash: u64) -> f64 {
    (hash >> 11) as f64 / (1u64 << 53) as f64
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat_body(max_tokens: Option<u64>) -> Value {
        let mut body = json!({
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Summarize ticket 4711 about the broken login page please"},
            ],
        });
        if let Some(limit) = max_tokens {
            body["max_tokens"] = json!(limit);
        }
        body
    }

    #[test]
    fn chat_reply_quotes_the_last_user_message() {
        let (content, finish) = chat_reply(&chat_body(None));
        assert_eq!(finish, "stop");
        assert!(content.starts_with("Simulated reply "), "{content}");
        assert!(
            content.ends_with("to: Summarize ticket 4711 about the broken login page"),
            "{content}"
        );
        assert_eq!(chat_reply(&chat_body(None)).0, content, "deterministic");
    }

    #[test]
    fn chat_reply_is_cut_at_the_token_limit() {
        let (content, finish) = chat_reply(&chat_body(Some(3)));
        assert_eq!(finish, "length");
        assert_eq!(content.split_whitespace().count(), 3);
        let (_, finish) = chat_reply(&chat_body(Some(1000)));
        assert_eq!(finish, "stop");
    }

    #[test]
    fn chat_completion_has_the_documented_shape() {
        let body = response_body("/v1/chat/completions", &chat_body(Some(4)), 1_700_000_000);
        assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["created"], 1_700_000_000);
        assert_eq!(body["model"], "gpt-4o-mini");
        assert_eq!(body["choices"][0]["message"]["role"], "assistant");
        assert_eq!(body["choices"][0]["finish_reason"], "length");
        let usage = &body["usage"];
        assert_eq!(usage["completion_tokens"], 4);
        assert_eq!(
            usage["total_tokens"].as_u64().unwrap(),
            usage["prompt_tokens"].as_u64().unwrap() + 4
        );
        assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0);
        assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], 0);
        assert_eq!(
            body,
            response_body("/v1/chat/completions", &chat_body(Some(4)), 1_700_000_000)
        );
        assert_ne!(
            body["id"],
            response_body("/v1/chat/completions", &chat_body(Some(4)), 1_700_000_001)["id"]
        );
    }

    #[test]
    fn responses_api_object_has_output_text() {
        let request =
            json!({"model": "gpt-4.1", "input": "Tell me a joke", "max_output_tokens": 2});
        let body = response_body("/v1/responses", &request, 1);
        assert_eq!(body["object"], "response");
        assert_eq!(body["status"], "incomplete");
        assert_eq!(body["incomplete_details"]["reason"], "max_output_tokens");
        assert_eq!(body["output"][0]["type"], "message");
        assert_eq!(body["output"][0]["content"][0]["type"], "output_text");
        assert_eq!(body["usage"]["output_tokens"], 2);
        assert_eq!(body["usage"]["input_tokens_details"]["cached_tokens"], 0);
    }

    #[test]
    fn embeddings_are_small_unit_vectors_one_per_input() {
        let request = json!({"model": "text-embedding-3-small", "input": ["a", "bb", "ccc"]});
        let body = response_body("/v1/embeddings", &request, 1);
        let data = body["data"].as_array().unwrap();
        assert_eq!(data.len(), 3);
        for (i, item) in data.iter().enumerate() {
            assert_eq!(item["index"], i);
            let vector = item["embedding"].as_array().unwrap();
            assert_eq!(vector.len(), DEFAULT_EMBEDDING_DIMENSIONS);
            let norm: f64 = vector.iter().map(|x| x.as_f64().unwrap().powi(2)).sum();
            assert!((norm - 1.0).abs() < 1e-3, "{norm}");
        }
        assert_eq!(body["usage"]["prompt_tokens"], 3);

        let b64 = json!({"model": "m", "input": "x", "dimensions": 4, "encoding_format": "base64"});
        let body = response_body("/v1/embeddings", &b64, 1);
        // 4 f32 = 16 bytes = 24 base64 characters.
        assert_eq!(body["data"][0]["embedding"].as_str().unwrap().len(), 24);
    }

    #[test]
    fn completions_and_moderations_are_plausible() {
        let body = response_body(
            "/v1/completions",
            &json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Say hi"}),
            5,
        );
        assert_eq!(body["object"], "text_completion");
        assert!(body["choices"][0]["text"]
            .as_str()
            .unwrap()
            .contains("Say hi"));
        let body = response_body("/v1/moderations", &json!({"input": ["a", "b"]}), 5);
        assert_eq!(body["results"].as_array().unwrap().len(), 2);
        assert_eq!(body["results"][0]["flagged"], false);
        assert_eq!(body["model"], "omni-moderation-latest");
    }

    #[test]
    fn injected_errors_follow_the_rate_deterministically() {
        let hits = (0..10_000)
            .filter(|i| injected_error(&format!("req-{i}"), 0.2, 7))
            .count();
        assert!((1_700..2_300).contains(&hits), "{hits}");
        assert!(!injected_error("x", 0.0, 7));
        assert!(injected_error("x", 1.0, 7));
        assert_eq!(injected_error("x", 0.5, 7), injected_error("x", 0.5, 7));
        let fives = (0..1000)
            .filter(|i| injected_error_status(&format!("req-{i}"), 7) == 500)
            .count();
        assert!((400..600).contains(&fives), "{fives}");
    }

    #[test]
    fn base64_matches_the_standard_alphabet() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
    }

    /// The bodies the typed chat path is checked on: the shapes
    /// [`last_user_text`], [`prompt_tokens`] and the token limits read.
    fn chat_bodies() -> Vec<Value> {
        vec![
            chat_body(None),
            chat_body(Some(3)),
            chat_body(Some(0)),
            chat_body(Some(12)),
            json!({"model": "m", "messages": [
                {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "image_url"}, {"type": "text", "text": " two  é\"\\ "}]},
                {"role": "assistant", "content": "ok"},
            ], "max_completion_tokens": 5, "temperature": 0.5}),
            json!({"messages": [{"role": "system", "content": "no user here"}]}),
            json!({"model": 7, "messages": [], "prompt": "ignored"}),
            json!({"model": "m", "input": "a plain input string", "instructions": "be brief"}),
            json!({"model": "m", "prompt": ["first", "second prompt"]}),
            json!({"model": "m", "messages": null}),
            json!({}),
            json!({"model": "m", "messages": [{"role": "user", "content": "   "}], "max_tokens": "5"}),
        ]
    }

    /// The `json!` form the typed [`ChatCompletion`] replaced, kept to check
    /// that the two write the same bytes.
    fn reference_chat_completion(body: &Value, created: i64) -> Value {
        let conversation = ["messages", "input", "prompt"]
            .iter()
            .find_map(|key| body.get(*key))
            .unwrap_or(&Value::Null);
        let digest = crate::sim::json_digest64(conversation, 0);
        let quoted = last_user_text(body)
            .map(|text| {
                text.split_whitespace()
                    .take(QUOTED_WORDS)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        let reply = if quoted.is_empty() {
            format!("Simulated reply {digest:016x}.")
        } else {
            format!("Simulated reply {digest:016x} to: {quoted}")
        };
        let limit = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
            .iter()
            .find_map(|key| body.get(*key).and_then(Value::as_u64));
        let words: Vec<&str> = reply.split_whitespace().collect();
        let (content, finish_reason) = match limit {
            Some(limit) if limit < words.len() as u64 => {
                (words[..limit as usize].join(" "), "length")
            }
            _ => (reply.clone(), "stop"),
        };
        let prompt_tokens = prompt_tokens(body);
        let completion_tokens = word_count(&content);
        json!({
            "id": deterministic_id("chatcmpl-", body, created),
            "object": "chat.completion",
            "created": created,
            "model": model_or_unknown(body),
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": null, "annotations": []},
                "logprobs": null,
                "finish_reason": finish_reason,
            }],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0},
            },
            "service_tier": "default",
            "system_fingerprint": "fp_batchline_sim",
        })
    }

    #[test]
    fn typed_chat_completions_write_the_bytes_of_the_value_form() {
        for body in chat_bodies() {
            for created in [0, 1_700_000_000] {
                let reference = reference_chat_completion(&body, created);
                let typed = ChatCompletion::new(&body, created);
                assert_eq!(
                    serde_json::to_string(&typed).unwrap(),
                    reference.to_string(),
                    "{body}"
                );
                assert_eq!(typed.usage(), body_usage(&reference), "{body}");
                assert_eq!(
                    response_body("/v1/chat/completions", &body, created),
                    reference
                );
            }
        }
    }

    #[test]
    fn one_serialisation_gives_both_digests() {
        let mut bodies = chat_bodies();
        bodies.extend([
            json!(null),
            json!([1, 2]),
            json!("text"),
            json!({"input": [{"a": 1}], "prompt": "p"}),
        ]);
        for body in bodies {
            for seed in [0, 1_700_000_000] {
                assert_eq!(
                    body_digests(&body, seed),
                    (
                        crate::sim::json_digest128(&body, seed),
                        crate::sim::json_digest64(conversation(&body), 0)
                    ),
                    "{body}"
                );
            }
        }
    }

    #[test]
    fn content_chars_counts_the_joined_text() {
        for content in [
            json!("héllo"),
            json!([]),
            json!([{"text": "a"}, {"type": "image"}, {"text": "bc"}, {"text": ""}]),
            json!(null),
            json!(3),
        ] {
            assert_eq!(
                content_chars(&content),
                content_text(&content).chars().count(),
                "{content}"
            );
        }
    }
}
