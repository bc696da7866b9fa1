//! Deterministic stand-ins for what the Messages API answers.
//!
//! Every message is a pure function of the request's `params` and the id of
//! the batch it ran in, so tests can compute the exact expected result line
//! with the same public functions the simulator uses. The reply text is the
//! OpenAI simulator's [`chat_reply`], so every provider answers the same
//! conversation alike. Nothing here does I/O or reads a clock.

use serde_json::{json, Value};
use xxhash_rust::xxh3::xxh3_128_with_seed;

use crate::sim::openai::chat_reply;

/// Characters of an id's random part, as in `msg_01…` ids.
const ID_CHARS: usize = 22;

/// The assistant's reply to a Messages request and its `stop_reason`.
///
/// The text is [`chat_reply`] on `params`: a sentence holding a hash of the
/// conversation and the first words of the last user turn, one word per
/// token. When `max_tokens` is smaller than the reply's word count the text
/// is cut to that many words and the stop reason is `"max_tokens"`;
/// otherwise it is `"end_turn"`.
pub fn message_reply(params: &Value) -> (String, &'static str) {
    let (text, finish_reason) = chat_reply(params);
    let stop_reason = if finish_reason == "length" {
        "max_tokens"
    } else {
        "end_turn"
    };
    (text, stop_reason)
}

/// The Message a successful batch request produced: what
/// `result.message` of a `succeeded` line holds. `batch_id` seeds the
/// message id, so the same request gets another id in another batch.
pub fn message_body(params: &Value, batch_id: &str) -> Value {
    let (text, stop_reason) = message_reply(params);
    let output_tokens = text.split_whitespace().count() as u64;
    json!({
        "id": message_id(params, batch_id),
        "type": "message",
        "role": "assistant",
        "model": params.get("model").cloned().unwrap_or(Value::Null),
        "content": [{"type": "text", "text": text}],
        "stop_reason": stop_reason,
        "stop_sequence": null,
        "usage": {
            "input_tokens": input_tokens(params),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": output_tokens,
            "service_tier": "batch",
        },
    })
}

/// About one token per four characters of the system prompt and the
/// messages' text, at least one.
fn input_tokens(params: &Value) -> u64 {
    let mut chars = params.get("system").map_or(0, text_chars);
    if let Some(messages) = params.get("messages").and_then(Value::as_array) {
        chars += messages
            .iter()
            .map(|message| message.get("content").map_or(0, text_chars))
            .sum::<usize>();
    }
    (chars as u64).div_ceil(4).max(1)
}

/// Characters of a `content` or `system` value: a string, or the `text` of
/// its blocks.
fn text_chars(content: &Value) -> usize {
    match content {
        Value::String(text) => text.chars().count(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|block| block.get("text").and_then(Value::as_str))
            .map(|text| text.chars().count())
            .sum(),
        _ => 0,
    }
}

/// `msg_01` and 22 base-62 characters derived from the request and batch.
fn message_id(params: &Value, batch_id: &str) -> String {
    const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut digest =
        xxh3_128_with_seed(format!("{batch_id}\n{params}").as_bytes(), 0x6d73_675f_6964);
    let mut id = String::with_capacity(6 + ID_CHARS);
    id.push_str("msg_01");
    for _ in 0..ID_CHARS {
        id.push(char::from(ALPHABET[(digest % 62) as usize]));
        digest /= 62;
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(max_tokens: u64) -> Value {
        json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": max_tokens,
            "system": "Be terse.",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Summarize ticket 4711 about the broken login page please"}]}],
        })
    }

    #[test]
    fn replies_quote_the_user_and_stop_at_max_tokens() {
        let (text, stop) = message_reply(&params(1024));
        assert_eq!(stop, "end_turn");
        assert!(
            text.ends_with("to: Summarize ticket 4711 about the broken login page"),
            "{text}"
        );
        let (text, stop) = message_reply(&params(3));
        assert_eq!(stop, "max_tokens");
        assert_eq!(text.split_whitespace().count(), 3);
    }

    #[test]
    fn messages_have_the_documented_shape() {
        let message = message_body(&params(3), "msgbatch_01abc");
        assert!(message["id"].as_str().unwrap().starts_with("msg_01"));
        assert_eq!(message["id"].as_str().unwrap().len(), 28);
        assert_eq!(message["type"], "message");
        assert_eq!(message["role"], "assistant");
        assert_eq!(message["model"], "claude-sonnet-4-5");
        assert_eq!(message["content"][0]["type"], "text");
        assert_eq!(message["stop_reason"], "max_tokens");
        assert!(message["stop_sequence"].is_null());
        let usage = &message["usage"];
        assert_eq!(usage["output_tokens"], 3);
        // "Be terse." (9) + the user text (56) = 65 characters.
        assert_eq!(usage["input_tokens"], 17);
        assert_eq!(usage["cache_creation_input_tokens"], 0);
        assert_eq!(usage["cache_read_input_tokens"], 0);
        assert_eq!(usage["service_tier"], "batch");
        assert_eq!(message, message_body(&params(3), "msgbatch_01abc"));
        assert_ne!(
            message["id"],
            message_body(&params(3), "msgbatch_01abd")["id"]
        );
    }
}
