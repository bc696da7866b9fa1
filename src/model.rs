//! The message contract: how an input message is decoded and validated, and
//! the shape of the result published for it (DESIGN.md "Messages").
//!
//! Decoding borrows from the Kafka message: the request body is never parsed
//! into a tree, only scanned for its `model`, and is written to the spool
//! byte for byte.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Why batchline refused an input message (`error.type` of a `rejected`
/// result and the `batchline.error.type` DLQ header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    InvalidUtf8,
    InvalidJson,
    MissingCustomId,
    InvalidCustomId,
    DuplicateCustomId,
    UnknownProvider,
    ProviderDisabled,
    InvalidBody,
    UnsupportedEndpoint,
    TooLarge,
}

impl RejectReason {
    pub const ALL: [RejectReason; 10] = [
        RejectReason::InvalidUtf8,
        RejectReason::InvalidJson,
        RejectReason::MissingCustomId,
        RejectReason::InvalidCustomId,
        RejectReason::DuplicateCustomId,
        RejectReason::UnknownProvider,
        RejectReason::ProviderDisabled,
        RejectReason::InvalidBody,
        RejectReason::UnsupportedEndpoint,
        RejectReason::TooLarge,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::InvalidUtf8 => "invalid_utf8",
            RejectReason::InvalidJson => "invalid_json",
            RejectReason::MissingCustomId => "missing_custom_id",
            RejectReason::InvalidCustomId => "invalid_custom_id",
            RejectReason::DuplicateCustomId => "duplicate_custom_id",
            RejectReason::UnknownProvider => "unknown_provider",
            RejectReason::ProviderDisabled => "provider_disabled",
            RejectReason::InvalidBody => "invalid_body",
            RejectReason::UnsupportedEndpoint => "unsupported_endpoint",
            RejectReason::TooLarge => "too_large",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused input message: the reason, a message for humans, and whatever
/// could be recovered to address a `rejected` result.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub reason: RejectReason,
    pub message: String,
    /// A valid custom_id from the value, else from the key.
    pub custom_id: Option<String>,
    pub provider: Option<String>,
    /// The message's `metadata`, when the value was a JSON object holding one.
    pub metadata: Option<Box<RawValue>>,
}

/// `custom_id`: 1 to 64 characters of `[A-Za-z0-9_-]`.
pub fn is_valid_custom_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The fields of an input message, borrowed from its bytes.
#[derive(Debug, Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    custom_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    provider: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    endpoint: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    body: Option<&'a RawValue>,
    #[serde(borrow, default)]
    metadata: Option<&'a RawValue>,
}

/// What batchline reads of a request body, in the one pass that checks it.
#[derive(Debug, Deserialize)]
struct BodyFields<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    // Output caps, for the daily budget's estimate. Raw, so that a cap of
    // the wrong type is ignored rather than refusing the request (the
    // provider judges its own parameters).
    #[serde(borrow, default)]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_completion_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_output_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    n: Option<&'a RawValue>,
}

impl BodyFields<'_> {
    fn output_cap(&self) -> OutputCap {
        let int = |v: Option<&RawValue>| v.and_then(|r| r.get().parse::<u64>().ok());
        OutputCap {
            tokens: int(self.max_completion_tokens)
                .or(int(self.max_output_tokens))
                .or(int(self.max_tokens)),
            choices: int(self.n).unwrap_or(1).max(1),
        }
    }
}

/// The output tokens a request may produce at most, as its body caps them:
/// `max_completion_tokens`, `max_output_tokens` or `max_tokens` (the first
/// set), for each of its `n` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputCap {
    /// `None` when the body sets no cap.
    pub tokens: Option<u64>,
    pub choices: u64,
}

impl OutputCap {
    /// The cap of a request body already accepted by [`decode_request`].
    pub fn of_body(body: &RawValue) -> OutputCap {
        serde_json::from_str::<BodyFields<'_>>(body.get()).map_or(
            OutputCap {
                tokens: None,
                choices: 1,
            },
            |f| f.output_cap(),
        )
    }
}

/// A well-formed input message, still borrowing from the Kafka message.
#[derive(Debug)]
pub struct Decoded<'a> {
    pub custom_id: Cow<'a, str>,
    /// The provider named by the message, or `None` for the default route.
    pub provider: Option<Cow<'a, str>>,
    pub endpoint: Option<Cow<'a, str>>,
    pub model: Cow<'a, str>,
    /// The provider's own request body, verbatim.
    pub body: &'a RawValue,
    /// `metadata`, verbatim; `None` when absent or null.
    pub metadata: Option<&'a RawValue>,
    pub output_cap: OutputCap,
}

/// Decodes an input message's value. Routing checks (provider known,
/// enabled, endpoint supported, size) come after, in ingest, which knows the
/// configuration.
pub fn decode_request<'a>(
    key: Option<&'a [u8]>,
    value: Option<&'a [u8]>,
) -> Result<Decoded<'a>, Rejection> {
    let key_id = key
        .and_then(|k| std::str::from_utf8(k).ok())
        .filter(|k| is_valid_custom_id(k));
    let reject = |reason, message: String, custom_id: Option<&str>| Rejection {
        reason,
        message,
        custom_id: custom_id.or(key_id).map(str::to_owned),
        provider: None,
        metadata: None,
    };

    let Some(value) = value else {
        return Err(reject(
            RejectReason::InvalidJson,
            "message has no value (a tombstone)".into(),
            None,
        ));
    };
    let text = std::str::from_utf8(value).map_err(|e| {
        reject(
            RejectReason::InvalidUtf8,
            format!("value is not UTF-8: {e}"),
            None,
        )
    })?;
    let envelope: Envelope<'a> = serde_json::from_str(text).map_err(|e| {
        let message = if e.is_data() {
            format!("value is not a JSON object: {e}")
        } else {
            format!("value is not valid JSON: {e}")
        };
        reject(RejectReason::InvalidJson, message, None)
    })?;

    let metadata = envelope.metadata.filter(|m| m.get() != "null");
    let value_id: Option<Cow<'a, str>> = envelope
        .custom_id
        .and_then(|raw| serde_json::from_str::<Cow<'a, str>>(raw.get()).ok());
    let recovered = value_id.as_deref().filter(|id| is_valid_custom_id(id));
    let reject = |reason, message: String| Rejection {
        reason,
        message,
        custom_id: recovered.or(key_id).map(str::to_owned),
        provider: envelope.provider.as_deref().map(str::to_owned),
        metadata: metadata.map(|m| m.to_owned()),
    };

    let custom_id = match (envelope.custom_id, &value_id) {
        (None, _) => {
            return Err(reject(
                RejectReason::MissingCustomId,
                "custom_id is required".into(),
            ))
        }
        (Some(raw), None) if raw.get() == "null" => {
            return Err(reject(
                RejectReason::MissingCustomId,
                "custom_id is required".into(),
            ))
        }
        (Some(raw), None) => {
            return Err(reject(
                RejectReason::InvalidCustomId,
                format!(
                    "custom_id must be a string, got {}",
                    truncate(raw.get(), 80)
                ),
            ))
        }
        (Some(_), Some(id)) if !is_valid_custom_id(id) => {
            return Err(reject(
                RejectReason::InvalidCustomId,
                format!(
                    "custom_id `{}` must be 1 to 64 characters of [A-Za-z0-9_-]",
                    truncate(id, 80)
                ),
            ))
        }
        (Some(_), Some(id)) => id.clone(),
    };

    let Some(body) = envelope.body else {
        return Err(reject(
            RejectReason::InvalidBody,
            "body is required: the provider's request body".into(),
        ));
    };
    let fields: BodyFields<'a> = serde_json::from_str(body.get()).map_err(|_| {
        reject(
            RejectReason::InvalidBody,
            "body must be a JSON object (the provider's request body)".into(),
        )
    })?;
    let output_cap = fields.output_cap();
    let model = match fields.model {
        Some(m) if !m.trim().is_empty() => m,
        _ => {
            return Err(reject(
                RejectReason::InvalidBody,
                "body.model is required and must be a non-empty string".into(),
            ))
        }
    };
    if fields.stream == Some(true) {
        return Err(reject(
            RejectReason::InvalidBody,
            "body.stream must not be true: batch requests cannot stream".into(),
        ));
    }

    Ok(Decoded {
        custom_id,
        provider: envelope.provider,
        endpoint: envelope.endpoint,
        model,
        body,
        metadata,
        output_cap,
    })
}

fn truncate(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…", &s[..end]))
}

/// Terminal status of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Succeeded,
    Errored,
    Expired,
    Canceled,
    Rejected,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Succeeded => "succeeded",
            Status::Errored => "errored",
            Status::Expired => "expired",
            Status::Canceled => "canceled",
            Status::Rejected => "rejected",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorInfo {
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
}

impl ErrorInfo {
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        ErrorInfo {
            kind: kind.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
    pub reasoning_tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Source {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    pub received_at: Option<String>,
    pub submitted_at: Option<String>,
    pub ended_at: Option<String>,
}

/// The value published to the results topic, keyed by `custom_id`. Every
/// field comes from the input message or the provider, never from the clock
/// at publish time, so a republished result is identical.
#[derive(Debug, Clone, Serialize)]
pub struct ResultRecord<'a> {
    pub custom_id: &'a str,
    pub status: Status,
    pub provider: Option<&'a str>,
    pub model: Option<&'a str>,
    pub batch_id: Option<&'a str>,
    pub attempt: u32,
    pub response: Option<&'a RawValue>,
    pub content: Option<&'a str>,
    pub finish_reason: Option<&'a str>,
    pub usage: Option<Usage>,
    pub cost_usd: Option<f64>,
    pub error: Option<ErrorInfo>,
    pub metadata: Option<&'a RawValue>,
    pub source: Source,
    pub timings: Timings,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

impl ResultRecord<'_> {
    /// Serialises the record, dropping `response` (and flagging `truncated`)
    /// when the whole record would exceed `max_bytes`.
    pub fn to_bytes(&mut self, max_bytes: usize) -> Vec<u8> {
        let mut bytes = Vec::new();
        self.write_to(&mut bytes, max_bytes);
        bytes
    }

    /// [`Self::to_bytes`] into `buf` (cleared first), so that one buffer
    /// serves every result of a batch.
    pub fn write_to(&mut self, buf: &mut Vec<u8>, max_bytes: usize) {
        buf.clear();
        serde_json::to_writer(&mut *buf, self).expect("result records always serialise");
        if buf.len() <= max_bytes || self.response.is_none() {
            return;
        }
        self.response = None;
        self.truncated = true;
        buf.clear();
        serde_json::to_writer(&mut *buf, self).expect("result records always serialise");
    }
}

/// Formats a Unix timestamp in milliseconds as RFC 3339 (UTC).
pub fn rfc3339_millis(ms: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

/// Formats a Unix timestamp in seconds as RFC 3339 (UTC).
pub fn rfc3339_secs(secs: i64) -> Option<String> {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(value: &str) -> Result<Decoded<'_>, Rejection> {
        decode_request(None, Some(value.as_bytes()))
    }

    #[test]
    fn decodes_a_request_borrowing_its_body() {
        let v = r#"{"custom_id":"t-1","provider":"openai","body":{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi \"x\""}]},"metadata":{"tenant":"acme"}}"#;
        let d = decode(v).unwrap();
        assert_eq!(d.custom_id, "t-1");
        assert_eq!(d.provider.as_deref(), Some("openai"));
        assert_eq!(d.model, "gpt-4o-mini");
        assert!(d.body.get().starts_with(r#"{"model":"gpt-4o-mini""#));
        assert_eq!(d.metadata.unwrap().get(), r#"{"tenant":"acme"}"#);
    }

    #[test]
    fn decoding_reads_the_output_cap_and_ignores_caps_of_the_wrong_type() {
        let cap = |body: &str| {
            let v = format!(r#"{{"custom_id":"t-1","body":{body}}}"#);
            decode(&v).map(|d| d.output_cap).map_err(|r| r.message)
        };
        let capped = |tokens, choices| {
            Ok(OutputCap {
                tokens: Some(tokens),
                choices,
            })
        };
        assert_eq!(
            cap(r#"{"model":"m","max_tokens":100,"n":3}"#),
            capped(100, 3)
        );
        // max_completion_tokens first, then max_output_tokens, then max_tokens.
        assert_eq!(
            cap(r#"{"model":"m","max_tokens":9,"max_completion_tokens":50}"#),
            capped(50, 1)
        );
        assert_eq!(
            cap(r#"{"model":"m","max_tokens":9,"max_output_tokens":7}"#),
            capped(7, 1)
        );
        let uncapped = Ok(OutputCap {
            tokens: None,
            choices: 1,
        });
        assert_eq!(cap(r#"{"model":"m"}"#), uncapped);
        assert_eq!(cap(r#"{"model":"m","max_tokens":"many","n":0}"#), uncapped);
        assert_eq!(cap(r#"{"model":"m","max_tokens":-1,"n":null}"#), uncapped);
        assert_eq!(
            OutputCap::of_body(&RawValue::from_string(r#"{"max_tokens":4,"n":2}"#.into()).unwrap()),
            OutputCap {
                tokens: Some(4),
                choices: 2
            }
        );
    }

    #[test]
    fn custom_id_rule() {
        assert!(is_valid_custom_id("a"));
        assert!(is_valid_custom_id(&"x".repeat(64)));
        assert!(!is_valid_custom_id(&"x".repeat(65)));
        assert!(!is_valid_custom_id(""));
        assert!(!is_valid_custom_id("a b"));
        assert!(!is_valid_custom_id("é"));
    }

    #[test]
    fn rejections_carry_reason_and_recoverable_id() {
        type Case<'a> = (Option<&'a str>, &'a [u8], RejectReason, Option<&'a str>);
        let cases: &[Case<'_>] = &[
            (
                Some("k-1"),
                b"\xff\xfe",
                RejectReason::InvalidUtf8,
                Some("k-1"),
            ),
            (
                Some("k-2"),
                b"{not json",
                RejectReason::InvalidJson,
                Some("k-2"),
            ),
            (None, b"[1,2]", RejectReason::InvalidJson, None),
            (
                Some("k-3"),
                br#"{"body":{"model":"m"}}"#,
                RejectReason::MissingCustomId,
                Some("k-3"),
            ),
            (
                Some("bad key"),
                br#"{"custom_id":"has space","body":{"model":"m"}}"#,
                RejectReason::InvalidCustomId,
                None,
            ),
            (
                None,
                br#"{"custom_id":7,"body":{"model":"m"}}"#,
                RejectReason::InvalidCustomId,
                None,
            ),
            (
                None,
                br#"{"custom_id":"c-1"}"#,
                RejectReason::InvalidBody,
                Some("c-1"),
            ),
            (
                None,
                br#"{"custom_id":"c-2","body":"text"}"#,
                RejectReason::InvalidBody,
                Some("c-2"),
            ),
            (
                None,
                br#"{"custom_id":"c-3","body":{"messages":[]}}"#,
                RejectReason::InvalidBody,
                Some("c-3"),
            ),
            (
                None,
                br#"{"custom_id":"c-4","body":{"model":"m","stream":true}}"#,
                RejectReason::InvalidBody,
                Some("c-4"),
            ),
        ];
        for (key, value, reason, id) in cases {
            let r = decode_request(key.map(str::as_bytes), Some(value)).unwrap_err();
            assert_eq!(r.reason, *reason, "{value:?}");
            assert_eq!(r.custom_id.as_deref(), *id, "{value:?}");
            assert!(!r.message.is_empty());
        }
    }

    #[test]
    fn result_is_truncated_rather_than_cut() {
        let big = RawValue::from_string(format!("\"{}\"", "x".repeat(5000))).unwrap();
        let mut record = ResultRecord {
            custom_id: "c",
            status: Status::Succeeded,
            provider: Some("openai"),
            model: Some("m"),
            batch_id: Some("batch_1"),
            attempt: 1,
            response: Some(&big),
            content: Some("hello"),
            finish_reason: Some("stop"),
            usage: None,
            cost_usd: None,
            error: None,
            metadata: None,
            source: Source {
                topic: "t".into(),
                partition: 0,
                offset: 1,
            },
            timings: Timings::default(),
            truncated: false,
        };
        let bytes = record.to_bytes(2000);
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["truncated"], true);
        assert!(v["response"].is_null());
        assert_eq!(v["content"], "hello");
        let bytes = record.to_bytes(100_000);
        assert!(bytes.len() < 2000);
    }
}
