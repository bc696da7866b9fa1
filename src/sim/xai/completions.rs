//! Deterministic stand-ins for what xAI's batch endpoints answer, with the
//! cost xAI reports beside the usage.
//!
//! Bodies are the OpenAI simulator's (xAI's endpoints are OpenAI-shaped),
//! adjusted where xAI differs: chat usage counts reasoning tokens apart
//! from completion tokens and carries `cost_in_usd_ticks` (PROVIDERS.md
//! 3.6, 3.10). Everything is a pure function of the request body and the
//! batch's `created` time, so tests can compute the exact expected row.
//! Nothing here does I/O or reads a clock.

use serde_json::{json, Value};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::sim::openai::{injected_error_status, response_body};

/// Endpoints a batch file line may target (PROVIDERS.md 3.5), each with the
/// key its success row holds the body under (`batch_result.response.<key>`).
/// `/v1/responses` lines come back as chat completions, as observed.
pub const BATCH_ENDPOINTS: [(&str, &str); 8] = [
    ("/v1/chat/completions", "chat_get_completion"),
    ("/v1/responses", "chat_get_completion"),
    ("/v1/images/generations", "image_generation"),
    ("/v1/images/edits", "image_edit"),
    ("/v1/videos/generations", "video_generation"),
    ("/v1/videos", "video_generation"),
    ("/v1/videos/edits", "video_edit"),
    ("/v1/videos/extensions", "video_extension"),
];

/// Made-up list prices in USD ticks (1 tick = 1e-10 USD): $2 per million
/// input tokens, $10 per million output (and reasoning) tokens.
const INPUT_TICKS_PER_TOKEN: i64 = 20_000;
const OUTPUT_TICKS_PER_TOKEN: i64 = 100_000;
/// The batch discount on tokens, in percent (20 % as for grok-4.3).
const BATCH_DISCOUNT_PERCENT: i64 = 20;
/// Images and videos are billed at the standard rate: $0.02 per image,
/// $0.20 per video.
const IMAGE_TICKS: i64 = 200_000_000;
const VIDEO_TICKS: i64 = 2_000_000_000;
/// Salt that splits injected errors into bare strings and objects,
/// independent of the draws that picked them and their status.
const FORM_SALT: u64 = 0x5eed_0fe4_0000_0005;
/// The message of an injected invalid-argument error.
const PROMPT_TOO_LONG: &str =
    "This model's maximum prompt length is 131072 but the request contains 140000 tokens.";
/// The message of an injected internal error.
const INTERNAL_ERROR: &str = "Internal error while processing the request. Please retry.";

/// Whether xAI takes batch requests for `model`: the simulator's rule is
/// any `grok-…` model; others get "not supported for batch processing".
pub fn is_batch_model(model: &str) -> bool {
    model.starts_with("grok-")
}

/// The discounted cost of a chat request's tokens, in USD ticks. Reasoning
/// tokens are billed as output tokens.
pub fn cost_in_usd_ticks(prompt_tokens: u64, completion_tokens: u64, reasoning_tokens: u64) -> i64 {
    let list = i128::from(prompt_tokens) * i128::from(INPUT_TICKS_PER_TOKEN)
        + i128::from(completion_tokens + reasoning_tokens) * i128::from(OUTPUT_TICKS_PER_TOKEN);
    let discounted = list * i128::from(100 - BATCH_DISCOUNT_PERCENT) / 100;
    i64::try_from(discounted).unwrap_or(i64::MAX)
}

/// The chat completion xAI answers `body` with (PROVIDERS.md 3.6): the
/// OpenAI simulator's reply, a UUID id, and usage with
/// `completion_tokens_details.reasoning_tokens` (twice the completion
/// tokens for `…-reasoning` models, else 0; not part of
/// `completion_tokens`) and `cost_in_usd_ticks`.
pub fn chat_completion(body: &Value, created: i64) -> Value {
    let mut completion = response_body("/v1/chat/completions", body, created);
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let prompt_tokens = completion["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
    let completion_tokens = completion["usage"]["completion_tokens"]
        .as_u64()
        .unwrap_or(0);
    let reasoning_tokens = if model.ends_with("-reasoning") && !model.ends_with("non-reasoning") {
        2 * completion_tokens
    } else {
        0
    };
    completion["id"] = Value::String(uuid_of(body, created));
    completion["usage"] = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens + reasoning_tokens,
        "prompt_tokens_details": {"text_tokens": prompt_tokens, "audio_tokens": 0, "image_tokens": 0, "cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
        "num_sources_used": 0,
        "cost_in_usd_ticks": cost_in_usd_ticks(prompt_tokens, completion_tokens, reasoning_tokens),
    });
    if let Some(fields) = completion.as_object_mut() {
        fields.remove("service_tier");
    }
    completion
}

/// `batch_result.response` of a request to `url` that succeeded: one key
/// named after the endpoint, holding its body. `None` for a url xAI's
/// batches do not serve.
pub fn result_response(url: &str, body: &Value, created: i64) -> Option<Value> {
    let (_, key) = BATCH_ENDPOINTS
        .iter()
        .find(|(endpoint, _)| *endpoint == url)?;
    let response = match *key {
        "chat_get_completion" => chat_completion(body, created),
        "image_generation" | "image_edit" => {
            let mut images = response_body("/v1/images/generations", body, created);
            let count = images["data"].as_array().map_or(1, Vec::len) as i64;
            images["usage"]["cost_in_usd_ticks"] = json!(IMAGE_TICKS * count);
            images
        }
        _ => {
            let mut video = response_body("/v1/videos", body, created);
            video["usage"] = json!({"cost_in_usd_ticks": VIDEO_TICKS});
            video
        }
    };
    Some(json!({ *key: response }))
}

/// What a success row cost: the `usage.cost_in_usd_ticks` of its body.
pub fn row_cost(response: &Value) -> i64 {
    response
        .as_object()
        .and_then(|by_key| by_key.values().next())
        .and_then(|body| body["usage"]["cost_in_usd_ticks"].as_i64())
        .unwrap_or(0)
}

/// `batch_result.error` of a request given an injected error (see
/// [`injected_error`](crate::sim::openai::injected_error)): about half of
/// the custom_ids get a bare string, the rest `{"code","message"}` with the
/// gRPC code (3 invalid argument for the 400-type errors of
/// [`injected_error_status`], 13 internal for the rest), chosen
/// deterministically.
pub fn error_detail(custom_id: &str, seed: u64) -> Value {
    let (code, message) = if injected_error_status(custom_id, seed) == 400 {
        (3, PROMPT_TOO_LONG)
    } else {
        (13, INTERNAL_ERROR)
    };
    if xxh3_64_with_seed(custom_id.as_bytes(), seed ^ FORM_SALT) & 1 == 0 {
        Value::String(message.to_owned())
    } else {
        json!({"code": code, "message": message})
    }
}

/// A stable UUID-shaped id from the request and its batch time.
fn uuid_of(body: &Value, created: i64) -> String {
    let digest = crate::sim::json_digest128(body, created as u64);
    uuid::Builder::from_random_bytes(digest.to_be_bytes())
        .into_uuid()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(model: &str) -> Value {
        json!({"model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 64})
    }

    #[test]
    fn chat_rows_carry_cost_and_reasoning_apart() {
        let body = chat_completion(&chat("grok-4.20-0309-reasoning"), 1_700_000_000);
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["model"], "grok-4.20-0309-reasoning");
        assert!(uuid::Uuid::parse_str(body["id"].as_str().unwrap()).is_ok());
        assert!(body.get("service_tier").is_none());
        let usage = &body["usage"];
        let prompt = usage["prompt_tokens"].as_u64().unwrap();
        let completion = usage["completion_tokens"].as_u64().unwrap();
        let reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
            .as_u64()
            .unwrap();
        assert_eq!(reasoning, 2 * completion);
        assert_eq!(usage["total_tokens"], prompt + completion + reasoning);
        assert_eq!(
            usage["cost_in_usd_ticks"],
            cost_in_usd_ticks(prompt, completion, reasoning)
        );
        let plain = chat_completion(&chat("grok-4.20-0309-non-reasoning"), 1);
        assert_eq!(
            plain["usage"]["completion_tokens_details"]["reasoning_tokens"],
            0
        );
        assert_eq!(
            plain,
            chat_completion(&chat("grok-4.20-0309-non-reasoning"), 1)
        );
    }

    #[test]
    fn costs_are_discounted_list_prices() {
        // 10 input tokens at 20,000 + 5 output at 100,000 = 700,000; -20 %.
        assert_eq!(cost_in_usd_ticks(10, 5, 0), 560_000);
        assert_eq!(cost_in_usd_ticks(10, 2, 3), 560_000);
        assert_eq!(cost_in_usd_ticks(0, 0, 0), 0);
    }

    #[test]
    fn every_endpoint_answers_under_its_key() {
        let request = json!({"model": "grok-imagine", "prompt": "a cat", "n": 2});
        for (url, key) in BATCH_ENDPOINTS {
            let response = result_response(url, &request, 5).expect(url);
            assert!(response[key].is_object(), "{url}: {response}");
            assert!(row_cost(&response) > 0, "{url}");
        }
        let images = result_response("/v1/images/generations", &request, 5).unwrap();
        assert_eq!(row_cost(&images), 2 * IMAGE_TICKS);
        assert!(result_response("/v1/embeddings", &request, 5).is_none());
        let responses = result_response(
            "/v1/responses",
            &json!({"model": "grok-4.3", "input": "hi"}),
            5,
        )
        .unwrap();
        assert_eq!(
            responses["chat_get_completion"]["object"],
            "chat.completion"
        );
    }

    #[test]
    fn injected_errors_come_as_strings_and_objects() {
        let details: Vec<Value> = (0..200)
            .map(|i| error_detail(&format!("r{i}"), 7))
            .collect();
        let strings = details.iter().filter(|detail| detail.is_string()).count();
        assert!((60..140).contains(&strings), "{strings}");
        for (i, detail) in details.iter().enumerate() {
            let custom_id = format!("r{i}");
            assert_eq!(*detail, error_detail(&custom_id, 7));
            if let Some(code) = detail.get("code") {
                let expected = if injected_error_status(&custom_id, 7) == 400 {
                    3
                } else {
                    13
                };
                assert_eq!(*code, expected);
                assert!(detail["message"].is_string());
            }
        }
    }

    #[test]
    fn only_grok_models_batch() {
        assert!(is_batch_model("grok-4.3"));
        assert!(!is_batch_model("gpt-4o-mini"));
        assert!(!is_batch_model("Grok-4"));
    }
}
