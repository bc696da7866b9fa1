//! Reads a `POST /messages/batches` body (PROVIDERS.md 2.5) from its spool
//! file and checks it the way the API does, before a batch exists.
//!
//! The body may be 256 MB, so it is never parsed whole: a streaming serde
//! visitor walks `{"requests":[…]}` one item at a time, checks the item and
//! appends it to the batch's requests file as one JSONL line
//! (`{"custom_id","params"}`), which the batch's task later reads line by
//! line. Only one item, and the set of custom_ids (needed to reject
//! duplicates), are in memory at a time. The first broken rule ends the
//! read with the message Anthropic would send, named by its JSON path
//! (`requests.3.custom_id: …`).

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Write};
use std::path::Path;

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Most requests one batch may hold.
pub(super) const MAX_REQUESTS: u64 = 100_000;
/// Longest custom_id.
const MAX_CUSTOM_ID_CHARS: usize = 64;
/// Buffer size for reading the body and writing the requests file.
const IO_BUFFER_BYTES: usize = 256 * 1024;

/// A create body that passed every check.
#[derive(Debug)]
pub(super) struct Accepted {
    /// Requests written to the requests file, in body order.
    pub(super) requests: u64,
    pub(super) custom_ids: HashSet<String>,
}

/// Reads the create body at `body` and writes its requests to `requests`;
/// `Ok(Err(message))` names the first rule the body broke.
pub(super) fn read_create_body(
    body: &Path,
    requests: &Path,
) -> io::Result<Result<Accepted, String>> {
    let reader = BufReader::with_capacity(IO_BUFFER_BYTES, File::open(body)?);
    let mut out = BufWriter::with_capacity(IO_BUFFER_BYTES, File::create(requests)?);
    let mut intake = Intake {
        out: &mut out,
        custom_ids: HashSet::new(),
        requests: 0,
        saw_requests: false,
        rejection: None,
        io_error: None,
    };
    let mut deserializer = serde_json::Deserializer::from_reader(reader);
    let parsed = BodySeed(&mut intake)
        .deserialize(&mut deserializer)
        .and_then(|()| deserializer.end());
    if let Some(err) = intake.io_error.take() {
        return Err(err);
    }
    if let Some(rejection) = intake.rejection.take() {
        return Ok(Err(rejection));
    }
    if let Err(err) = parsed {
        return match err.classify() {
            serde_json::error::Category::Io => Err(err.into()),
            // Every wrong type is named by the visitors; this is a backstop.
            serde_json::error::Category::Data => Ok(Err(NOT_AN_OBJECT.to_owned())),
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                Ok(Err(format!("The request body is not valid JSON: {err}")))
            }
        };
    }
    if !intake.saw_requests {
        return Ok(Err("requests: Field required".to_owned()));
    }
    if intake.requests == 0 {
        return Ok(Err(
            "requests: List should have at least 1 item after validation, not 0".to_owned(),
        ));
    }
    let accepted = Accepted {
        requests: intake.requests,
        custom_ids: intake.custom_ids,
    };
    out.flush()?;
    out.get_ref().sync_data()?;
    Ok(Ok(accepted))
}

/// The custom_ids of a requests file `read_create_body` wrote, in order:
/// what a reload needs when a crash kept the batch but not its ledger event.
pub(super) fn read_custom_ids(requests: &Path) -> io::Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Line {
        custom_id: String,
    }
    let reader = BufReader::with_capacity(IO_BUFFER_BYTES, File::open(requests)?);
    let mut custom_ids = Vec::new();
    for line in io::BufRead::lines(reader) {
        let line: Line = serde_json::from_str(&line?).map_err(io::Error::other)?;
        custom_ids.push(line.custom_id);
    }
    Ok(custom_ids)
}

/// What the visitors share while they walk the body.
struct Intake<'a> {
    out: &'a mut BufWriter<File>,
    custom_ids: HashSet<String>,
    requests: u64,
    saw_requests: bool,
    /// The first broken rule; set before the walk is aborted with an error.
    rejection: Option<String>,
    /// A failed write of the requests file, which is not the client's fault.
    io_error: Option<io::Error>,
}

impl Intake<'_> {
    /// Records why the body is refused and returns the error that stops
    /// the walk (its text is never shown).
    fn reject<E: serde::de::Error>(&mut self, message: String) -> E {
        self.rejection.get_or_insert(message);
        E::custom("rejected")
    }

    /// Checks one item and appends it to the requests file.
    fn take<E: serde::de::Error>(&mut self, index: u64, item: Value) -> Result<(), E> {
        let (custom_id, params) = match check_item(index, item) {
            Ok(checked) => checked,
            Err(message) => return Err(self.reject(message)),
        };
        if self.custom_ids.contains(&custom_id) {
            return Err(self.reject(format!(
                "requests.{index}.custom_id: Duplicate custom_id '{custom_id}'. Each custom_id must be unique within a Message Batch."
            )));
        }
        let line = serde_json::json!({"custom_id": custom_id, "params": params});
        let written = serde_json::to_writer(&mut *self.out, &line)
            .map_err(io::Error::from)
            .and_then(|()| self.out.write_all(b"\n"));
        if let Err(err) = written {
            self.io_error = Some(err);
            return Err(E::custom("writing the requests file failed"));
        }
        self.custom_ids.insert(custom_id);
        self.requests += 1;
        Ok(())
    }
}

/// Implements the `Visitor` methods for every JSON type but the expected
/// one: each refuses the body with `$message`.
macro_rules! refuse_other_types {
    ($message:expr) => {
        fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
            Err(self.0.reject($message.to_owned()))
        }

        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(), E> {
            Err(self.0.reject($message.to_owned()))
        }

        fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<(), E> {
            Err(self.0.reject($message.to_owned()))
        }

        fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<(), E> {
            Err(self.0.reject($message.to_owned()))
        }

        fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<(), E> {
            Err(self.0.reject($message.to_owned()))
        }

        fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<(), E> {
            Err(self.0.reject($message.to_owned()))
        }
    };
}

/// The whole body: an object whose only field is `requests`.
struct BodySeed<'i, 'a>(&'i mut Intake<'a>);

impl<'de> DeserializeSeed<'de> for BodySeed<'_, '_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for BodySeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object with a `requests` list")
    }

    refuse_other_types!(NOT_AN_OBJECT);

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(self.0.reject(NOT_AN_OBJECT.to_owned()))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let intake = self.0;
        while let Some(key) = map.next_key::<String>()? {
            if key != "requests" {
                return Err(intake.reject(format!("{key}: Extra inputs are not permitted")));
            }
            if intake.saw_requests {
                return Err(intake.reject("requests: Duplicate field".to_owned()));
            }
            intake.saw_requests = true;
            map.next_value_seed(RequestsSeed(&mut *intake))?;
        }
        Ok(())
    }
}

const NOT_AN_OBJECT: &str = "Input should be a valid dictionary or object to extract fields from";
const NOT_A_LIST: &str = "requests: Input should be a valid list";

/// The `requests` list, one item at a time.
struct RequestsSeed<'i, 'a>(&'i mut Intake<'a>);

impl<'de> DeserializeSeed<'de> for RequestsSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RequestsSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of requests")
    }

    refuse_other_types!(NOT_A_LIST);

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(self.0.reject(NOT_A_LIST.to_owned()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let intake = self.0;
        let mut index: u64 = 0;
        while index < MAX_REQUESTS {
            let Some(item) = seq.next_element::<Value>()? else {
                return Ok(());
            };
            intake.take(index, item)?;
            index += 1;
        }
        // Too many: count the rest without keeping them, to name the total.
        let mut total = index;
        while seq.next_element::<IgnoredAny>()?.is_some() {
            total += 1;
        }
        if total > MAX_REQUESTS {
            return Err(intake.reject(format!(
                "requests: List should have at most {MAX_REQUESTS} items after validation, not {total}"
            )));
        }
        Ok(())
    }
}

/// Checks one `{custom_id, params}` item; returns both parts.
fn check_item(index: u64, item: Value) -> Result<(String, Value), String> {
    let at = |path: &str, problem: &str| format!("requests.{index}{path}: {problem}");
    let Value::Object(mut fields) = item else {
        return Err(at(
            "",
            "Input should be a valid dictionary or object to extract fields from",
        ));
    };
    if let Some(extra) = fields
        .keys()
        .find(|key| !matches!(key.as_str(), "custom_id" | "params"))
    {
        return Err(at(&format!(".{extra}"), "Extra inputs are not permitted"));
    }
    let custom_id = match fields.remove("custom_id") {
        None => return Err(at(".custom_id", "Field required")),
        Some(Value::String(custom_id)) => custom_id,
        Some(_) => return Err(at(".custom_id", "Input should be a valid string")),
    };
    if let Some(problem) = custom_id_problem(&custom_id) {
        return Err(at(".custom_id", &problem));
    }
    let params = match fields.remove("params") {
        None => return Err(at(".params", "Field required")),
        Some(Value::Object(params)) => params,
        Some(_) => {
            return Err(at(
                ".params",
                "Input should be a valid dictionary or object to extract fields from",
            ))
        }
    };
    if let Some((field, problem)) = params_problem(&params) {
        return Err(at(&format!(".params.{field}"), problem));
    }
    Ok((custom_id, Value::Object(params)))
}

/// Why a custom_id breaks `^[a-zA-Z0-9_-]{1,64}$`, in pydantic's words.
fn custom_id_problem(custom_id: &str) -> Option<String> {
    let chars = custom_id.chars().count();
    if chars == 0 {
        Some("String should have at least 1 character".to_owned())
    } else if chars > MAX_CUSTOM_ID_CHARS {
        Some(format!(
            "String should have at most {MAX_CUSTOM_ID_CHARS} characters"
        ))
    } else if !custom_id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        Some("String should match pattern '^[a-zA-Z0-9_-]{1,64}$'".to_owned())
    } else {
        None
    }
}

/// The first rule of a non-streaming Messages body that `params` breaks:
/// the field and the problem. The rest of the body is the model's business
/// and is checked (by the real API) only when the request runs.
fn params_problem(params: &Map<String, Value>) -> Option<(&'static str, &'static str)> {
    match params.get("model") {
        None => return Some(("model", "Field required")),
        Some(Value::String(_)) => {}
        Some(_) => return Some(("model", "Input should be a valid string")),
    }
    match params.get("max_tokens") {
        None => return Some(("max_tokens", "Field required")),
        Some(Value::Number(number)) => match number.as_i64() {
            Some(tokens) if tokens >= 1 => {}
            Some(_) => return Some(("max_tokens", "Input should be greater than or equal to 1")),
            None if number.as_u64().is_some() => {}
            None => return Some(("max_tokens", "Input should be a valid integer")),
        },
        Some(_) => return Some(("max_tokens", "Input should be a valid integer")),
    }
    match params.get("messages") {
        None => return Some(("messages", "Field required")),
        Some(Value::Array(_)) => {}
        Some(_) => return Some(("messages", "Input should be a valid list")),
    }
    match params.get("stream") {
        None | Some(Value::Null | Value::Bool(false)) => {}
        Some(_) => {
            return Some((
                "stream",
                "Streaming is not supported in the Message Batches API",
            ))
        }
    }
    if params.contains_key("speed") {
        return Some(("speed", "Not supported in the Message Batches API"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(body: &str) -> (Result<Accepted, String>, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let body_path = dir.path().join("body.json");
        let requests_path = dir.path().join("requests.jsonl");
        std::fs::write(&body_path, body).expect("write");
        let verdict = read_create_body(&body_path, &requests_path).expect("io");
        let written = std::fs::read_to_string(&requests_path).unwrap_or_default();
        (verdict, written)
    }

    fn item(custom_id: &str) -> Value {
        json!({
            "custom_id": custom_id,
            "params": {"model": "claude-sonnet-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]},
        })
    }

    #[test]
    fn a_good_body_becomes_one_line_per_request() {
        let body = json!({"requests": [item("a"), item("b-2_x")]}).to_string();
        let (verdict, written) = read(&body);
        let accepted = verdict.expect("accepted");
        assert_eq!(accepted.requests, 2);
        assert!(accepted.custom_ids.contains("b-2_x"));
        let lines: Vec<Value> = written
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines, [item("a"), item("b-2_x")]);
    }

    #[test]
    fn each_broken_rule_is_named_by_its_path() {
        let mut long = item("x");
        long["custom_id"] = json!("a".repeat(65));
        let mut no_model = item("x");
        no_model["params"].as_object_mut().unwrap().remove("model");
        let mut zero_tokens = item("x");
        zero_tokens["params"]["max_tokens"] = json!(0);
        let mut streaming = item("x");
        streaming["params"]["stream"] = json!(true);
        let mut no_messages = item("x");
        no_messages["params"]
            .as_object_mut()
            .unwrap()
            .remove("messages");
        let cases = [
            (json!({"requests": []}).to_string(), "requests: List should have at least 1 item after validation, not 0"),
            (json!({}).to_string(), "requests: Field required"),
            (json!({"requests": "x"}).to_string(), "requests: Input should be a valid list"),
            (json!({"requests": [item("a")], "extra": 1}).to_string(), "extra: Extra inputs are not permitted"),
            (json!({"requests": [item("a"), long]}).to_string(), "requests.1.custom_id: String should have at most 64 characters"),
            (json!({"requests": [item("a"), item("a b")]}).to_string(), "requests.1.custom_id: String should match pattern '^[a-zA-Z0-9_-]{1,64}$'"),
            (json!({"requests": [item("")]}).to_string(), "requests.0.custom_id: String should have at least 1 character"),
            (json!({"requests": [item("a"), item("b"), item("a")]}).to_string(), "requests.2.custom_id: Duplicate custom_id 'a'. Each custom_id must be unique within a Message Batch."),
            (json!({"requests": [no_model]}).to_string(), "requests.0.params.model: Field required"),
            (json!({"requests": [zero_tokens]}).to_string(), "requests.0.params.max_tokens: Input should be greater than or equal to 1"),
            (json!({"requests": [streaming]}).to_string(), "requests.0.params.stream: Streaming is not supported in the Message Batches API"),
            (json!({"requests": [no_messages]}).to_string(), "requests.0.params.messages: Field required"),
            (json!({"requests": [{"params": {}}]}).to_string(), "requests.0.custom_id: Field required"),
            (json!({"requests": [7]}).to_string(), "requests.0: Input should be a valid dictionary or object to extract fields from"),
            (json!([1]).to_string(), "Input should be a valid dictionary or object to extract fields from"),
        ];
        for (body, expected) in cases {
            let (verdict, _) = read(&body);
            assert_eq!(verdict.err().as_deref(), Some(expected), "{body}");
        }
        let (verdict, _) = read(r#"{"requests": [{"custom_id": "a""#);
        assert!(verdict
            .err()
            .unwrap()
            .starts_with("The request body is not valid JSON: "));
        let (verdict, _) = read(&format!("{} trailing", json!({"requests": [item("a")]})));
        assert!(verdict
            .err()
            .unwrap()
            .starts_with("The request body is not valid JSON: trailing characters"));
    }

    #[test]
    fn more_than_a_hundred_thousand_requests_are_counted_and_refused() {
        let one = item("x").to_string();
        let mut body = String::from("{\"requests\":[");
        for i in 0..=MAX_REQUESTS {
            if i > 0 {
                body.push(',');
            }
            body.push_str(&one.replacen("\"x\"", &format!("\"r{i}\""), 1));
        }
        body.push_str(",1]}");
        let (verdict, _) = read(&body);
        assert_eq!(
            verdict.err().as_deref(),
            Some("requests: List should have at most 100000 items after validation, not 100002")
        );
    }
}
