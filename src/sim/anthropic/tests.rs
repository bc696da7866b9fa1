//! The simulated Message Batches API driven over HTTP, as a client would.

use std::time::Duration;

use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{message_body, message_reply};
use crate::sim::openai::{injected_error, injected_error_status};
use crate::sim::{serve, SimConfig};

const KEY: &str = "sk-ant-api03-simulator-test-key-0123456789";
const VERSION: &str = "2023-06-01";

/// A simulator on a random port, stopped when dropped.
struct TestSim {
    root: String,
    client: Client,
    shutdown: CancellationToken,
    served: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Drop for TestSim {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A simulator config with a key and short phases, for tests to adjust.
fn fast() -> SimConfig {
    SimConfig {
        api_key: Some(KEY.to_owned()),
        batch_duration: Duration::from_millis(50),
        finalize_duration: Duration::from_millis(10),
        ..SimConfig::default()
    }
}

impl TestSim {
    async fn start(config: SimConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let root = format!("http://{}", listener.local_addr().expect("addr"));
        let shutdown = CancellationToken::new();
        let served = tokio::spawn(serve(listener, config, shutdown.clone()));
        Self {
            root,
            client: Client::new(),
            shutdown,
            served: Some(served),
        }
    }

    /// Stops the server as a restart would, and waits until nothing of it
    /// touches its data directory any more.
    async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(served) = self.served.take() {
            served.await.expect("join").expect("serve");
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/anthropic/v1{path}", self.root)
    }

    fn authed(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        request
            .header("x-api-key", KEY)
            .header("anthropic-version", VERSION)
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.authed(self.client.get(self.url(path)))
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.authed(self.client.post(self.url(path)))
    }

    async fn create(&self, requests: &[Value]) -> reqwest::Response {
        self.post("/messages/batches")
            .json(&json!({ "requests": requests }))
            .send()
            .await
            .expect("create")
    }

    async fn submit(&self, requests: &[Value]) -> Value {
        let response = self.create(requests).await;
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.expect("batch json")
    }

    async fn batch(&self, id: &str) -> Value {
        self.get(&format!("/messages/batches/{id}"))
            .send()
            .await
            .expect("retrieve")
            .json()
            .await
            .expect("batch json")
    }

    async fn wait_ended(&self, id: &str) -> Value {
        // Generous: CI machines are small and run many tests at once.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::time::Instant::now() < deadline {
            let batch = self.batch(id).await;
            if batch["processing_status"] == "ended" {
                return batch;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("batch {id} never ended");
    }

    /// The result lines at the batch's `results_url`.
    async fn results(&self, batch: &Value) -> Vec<Value> {
        let url = batch["results_url"].as_str().expect("results_url");
        let response = self
            .authed(self.client.get(url))
            .header("accept", "application/binary")
            .send()
            .await
            .expect("results");
        assert_eq!(response.status(), StatusCode::OK);
        response
            .text()
            .await
            .expect("text")
            .lines()
            .map(|line| serde_json::from_str(line).expect("result line is JSON"))
            .collect()
    }

    async fn stats(&self) -> Value {
        self.client
            .get(format!("{}/sim/stats", self.root))
            .send()
            .await
            .expect("stats")
            .json()
            .await
            .expect("stats json")
    }
}

fn request(custom_id: &str, text: &str) -> Value {
    json!({
        "custom_id": custom_id,
        "params": {
            "model": "claude-sonnet-4-5",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": text}],
        },
    })
}

fn requests(prefix: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            request(
                &format!("{prefix}-{i}"),
                &format!("Please summarize ticket {i}"),
            )
        })
        .collect()
}

fn by_custom_id<'a>(lines: &'a [Value], custom_id: &Value) -> &'a Value {
    lines
        .iter()
        .find(|line| line["custom_id"] == *custom_id)
        .expect("one line per request")
}

fn assert_timestamp(value: &Value) -> chrono::DateTime<chrono::FixedOffset> {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a timestamp: {value}"));
    // RFC 3339 with microseconds: 2024-08-20T18:37:24.100435Z
    assert_eq!(text.len(), 27, "{text}");
    assert!(text.ends_with('Z'), "{text}");
    chrono::DateTime::parse_from_rfc3339(text).expect("RFC 3339")
}

#[tokio::test]
async fn a_batch_runs_to_the_end_with_deterministic_results() {
    let sim = TestSim::start(fast()).await;
    let mut sent = requests("ok", 3);
    sent[2]["params"]["max_tokens"] = json!(2);
    let response = sim.create(&sent).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["request-id"]
        .to_str()
        .unwrap()
        .starts_with("req_"));
    let created: Value = response.json().await.unwrap();
    let id = created["id"].as_str().unwrap();
    assert!(id.starts_with("msgbatch_"), "{id}");
    assert_eq!(created["type"], "message_batch");
    assert_eq!(created["processing_status"], "in_progress");
    assert_eq!(
        created["request_counts"],
        json!({"processing": 3, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0})
    );
    for field in [
        "ended_at",
        "cancel_initiated_at",
        "archived_at",
        "results_url",
    ] {
        assert!(created[field].is_null(), "{field}: {created}");
    }
    let created_at = assert_timestamp(&created["created_at"]);
    let expires_at = assert_timestamp(&created["expires_at"]);
    assert_eq!(expires_at - created_at, chrono::Duration::hours(24));
    // No metadata or name: the object has exactly these fields.
    assert_eq!(created.as_object().unwrap().len(), 10);

    let batch = sim.wait_ended(id).await;
    assert_timestamp(&batch["ended_at"]);
    assert_eq!(
        batch["request_counts"],
        json!({"processing": 0, "succeeded": 3, "errored": 0, "canceled": 0, "expired": 0})
    );
    // Absolute, built from the Host the client used.
    assert_eq!(
        batch["results_url"],
        format!("{}/anthropic/v1/messages/batches/{id}/results", sim.root)
    );

    let lines = sim.results(&batch).await;
    assert_eq!(lines.len(), 3);
    for sent in &sent {
        let line = by_custom_id(&lines, &sent["custom_id"]);
        assert_eq!(line["result"]["type"], "succeeded");
        let message = &line["result"]["message"];
        assert_eq!(*message, message_body(&sent["params"], id));
        let (text, stop_reason) = message_reply(&sent["params"]);
        assert_eq!(message["content"], json!([{"type": "text", "text": text}]));
        assert_eq!(message["stop_reason"], stop_reason);
        assert!(message["id"].as_str().unwrap().starts_with("msg_"));
        assert_eq!(message["model"], "claude-sonnet-4-5");
        assert_eq!(message["usage"]["service_tier"], "batch");
    }
    let cut = by_custom_id(&lines, &sent[2]["custom_id"]);
    assert_eq!(cut["result"]["message"]["stop_reason"], "max_tokens");
    assert_eq!(cut["result"]["message"]["usage"]["output_tokens"], 2);
    assert_eq!(
        by_custom_id(&lines, &sent[0]["custom_id"])["result"]["message"]["stop_reason"],
        "end_turn"
    );

    let stats = sim.stats().await;
    assert_eq!(stats["batches_created"], 1);
    assert_eq!(stats["requests_submitted"], 3);
    assert_eq!(stats["requests_billed"], 3);
    assert_eq!(
        stats["custom_ids"]["ok-1"],
        json!({"submitted": 1, "billed": 1})
    );
}

#[tokio::test]
async fn auth_failures_get_anthropic_401_bodies() {
    let sim = TestSim::start(fast()).await;
    let list = sim.url("/messages/batches");

    let response = sim
        .client
        .get(&list)
        .header("anthropic-version", VERSION)
        .header("x-api-key", "sk-ant-wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let request_id = response.headers()["request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({
            "type": "error",
            "error": {"type": "authentication_error", "message": "invalid x-api-key"},
            "request_id": request_id,
        })
    );

    let response = sim
        .client
        .get(&list)
        .header("anthropic-version", VERSION)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "authentication_error");
    assert_eq!(body["error"]["message"], "x-api-key header is required");

    // Newer clients authenticate with a bearer token instead.
    let response = sim
        .client
        .get(&list)
        .header("anthropic-version", "2026-10-21")
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    // The version header is required on every call.
    let response = sim
        .client
        .get(&list)
        .header("x-api-key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(response.headers().contains_key("request-id"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(
        body["error"]["message"],
        "anthropic-version: header is required"
    );
    let response = sim
        .client
        .get(&list)
        .header("x-api-key", KEY)
        .header("anthropic-version", "2024-10-22")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["error"]["message"],
        "anthropic-version: \"2024-10-22\" is not a valid version"
    );

    // Without a configured key, any non-empty key is accepted.
    let open = TestSim::start(SimConfig::default()).await;
    let response = open
        .client
        .get(open.url("/messages/batches"))
        .header("x-api-key", "anything")
        .header("anthropic-version", VERSION)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(sim.stats().await["batches_created"], 0);
}

#[tokio::test]
async fn invalid_create_bodies_get_400s_naming_the_problem() {
    let sim = TestSim::start(fast()).await;
    let mut bad_id = request("x", "hi");
    bad_id["custom_id"] = json!("has space");
    let mut no_tokens = request("y", "hi");
    no_tokens["params"]["max_tokens"] = json!(0);
    let mut streaming = request("z", "hi");
    streaming["params"]["stream"] = json!(true);
    let cases = [
        (
            vec![request("a", "hi"), request("b", "hi"), request("c", "hi"), bad_id],
            "requests.3.custom_id: String should match pattern '^[a-zA-Z0-9_-]{1,64}$'",
        ),
        (
            vec![request("a", "hi"), request("a", "again")],
            "requests.1.custom_id: Duplicate custom_id 'a'. Each custom_id must be unique within a Message Batch.",
        ),
        (
            vec![no_tokens],
            "requests.0.params.max_tokens: Input should be greater than or equal to 1",
        ),
        (
            vec![streaming],
            "requests.0.params.stream: Streaming is not supported in the Message Batches API",
        ),
        (
            Vec::new(),
            "requests: List should have at least 1 item after validation, not 0",
        ),
    ];
    for (sent, message) in cases {
        let response = sim.create(&sent).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{message}");
        let request_id = response.headers()["request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["message"], message);
        assert_eq!(body["request_id"], request_id);
    }
    let response = sim
        .post("/messages/batches")
        .header("content-type", "application/json")
        .body("{\"requests\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("The request body is not valid JSON"));

    let response = sim
        .get("/messages/batches/msgbatch_missing")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "not_found_error");
    let response = sim.get("/nowhere").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);

    let stats = sim.stats().await;
    assert_eq!(stats["batches_created"], 0);
    assert_eq!(stats["requests_submitted"], 0);
}

#[tokio::test]
async fn bodies_over_256_mb_get_413_before_they_are_read() {
    let sim = TestSim::start(fast()).await;
    let address = sim.root.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    // Only the head is sent: the declared length alone is refused.
    let head = format!(
        "POST /anthropic/v1/messages/batches HTTP/1.1\r\nhost: {address}\r\nx-api-key: {KEY}\r\nanthropic-version: {VERSION}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{{\"requests\":[",
        super::MAX_CREATE_BYTES + 1
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // Read until the JSON body has arrived; the server may keep waiting for
    // the rest of the upload, so the connection is not read to its end.
    while !answer.ends_with(b"}") {
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("answered")
            .unwrap();
        if read == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..read]);
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("\"type\":\"request_too_large\""),
        "{answer}"
    );
    assert_eq!(sim.stats().await["batches_created"], 0);
}

#[tokio::test]
async fn canceling_keeps_what_ran_and_cancels_the_rest() {
    let sim = TestSim::start(SimConfig {
        batch_duration: Duration::from_secs(2),
        finalize_duration: Duration::from_millis(200),
        ..fast()
    })
    .await;
    let batch = sim.submit(&requests("cx", 20)).await;
    let id = batch["id"].as_str().unwrap();
    // A quarter of the window: some requests ran, most did not.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let response = sim
        .post(&format!("/messages/batches/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let canceling: Value = response.json().await.unwrap();
    assert_eq!(canceling["processing_status"], "canceling");
    assert_timestamp(&canceling["cancel_initiated_at"]);
    assert!(canceling["results_url"].is_null());
    // Counts say nothing until the batch has ended.
    assert_eq!(canceling["request_counts"]["processing"], 20);
    // Results are not there yet.
    let response = sim
        .get(&format!("/messages/batches/{id}/results"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    // Nor can it be deleted.
    let response = sim
        .authed(
            sim.client
                .delete(sim.url(&format!("/messages/batches/{id}"))),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    let batch = sim.wait_ended(id).await;
    let lines = sim.results(&batch).await;
    assert_eq!(lines.len(), 20);
    let succeeded = lines
        .iter()
        .filter(|line| line["result"]["type"] == "succeeded")
        .count();
    assert!((1..20).contains(&succeeded), "{succeeded} ran");
    for line in &lines {
        let kind = &line["result"]["type"];
        assert!(
            kind == "succeeded" || line["result"] == json!({"type": "canceled"}),
            "{line}"
        );
    }
    assert_eq!(
        batch["request_counts"],
        json!({"processing": 0, "succeeded": succeeded, "errored": 0, "canceled": 20 - succeeded, "expired": 0})
    );
    assert_eq!(sim.stats().await["requests_billed"], succeeded);

    let response = sim
        .post(&format!("/messages/batches/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    // An ended batch can be deleted, once.
    let delete = || {
        sim.authed(
            sim.client
                .delete(sim.url(&format!("/messages/batches/{id}"))),
        )
        .send()
    };
    let deleted: Value = delete().await.unwrap().json().await.unwrap();
    assert_eq!(deleted, json!({"id": id, "type": "message_batch_deleted"}));
    assert_eq!(delete().await.unwrap().status(), StatusCode::NOT_FOUND);
    let response = sim
        .get(&format!("/messages/batches/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn expiring_batches_keep_the_completed_share() {
    let sim = TestSim::start(SimConfig {
        expire_rate: 1.0,
        expire_completed_fraction: 0.5,
        ..fast()
    })
    .await;
    let sent = requests("ex", 5);
    let batch = sim.submit(&sent).await;
    let batch = sim.wait_ended(batch["id"].as_str().unwrap()).await;
    assert_eq!(
        batch["request_counts"],
        json!({"processing": 0, "succeeded": 2, "errored": 0, "canceled": 0, "expired": 3})
    );
    let lines = sim.results(&batch).await;
    // The first floor(5 * 0.5) requests in body order succeeded.
    for (i, sent) in sent.iter().enumerate() {
        let line = by_custom_id(&lines, &sent["custom_id"]);
        if i < 2 {
            assert_eq!(line["result"]["type"], "succeeded");
        } else {
            assert_eq!(line["result"], json!({"type": "expired"}));
        }
    }
    let stats = sim.stats().await;
    assert_eq!(stats["requests_billed"], 2);
    assert_eq!(
        stats["custom_ids"]["ex-4"],
        json!({"submitted": 1, "billed": 0})
    );
}

#[tokio::test]
async fn per_request_errors_are_nested_error_responses() {
    let config = SimConfig {
        error_rate: 0.4,
        seed: 11,
        ..fast()
    };
    let sim = TestSim::start(config.clone()).await;
    let sent = requests("pr", 40);
    let expected: Vec<&str> = sent
        .iter()
        .filter_map(|request| request["custom_id"].as_str())
        .filter(|id| injected_error(id, config.error_rate, config.seed))
        .collect();
    assert!(!expected.is_empty() && expected.len() < 40);
    let batch = sim.submit(&sent).await;
    let batch = sim.wait_ended(batch["id"].as_str().unwrap()).await;
    assert_eq!(batch["request_counts"]["errored"], expected.len());
    assert_eq!(batch["request_counts"]["succeeded"], 40 - expected.len());
    let lines = sim.results(&batch).await;
    for line in lines
        .iter()
        .filter(|line| line["result"]["type"] == "errored")
    {
        let custom_id = line["custom_id"].as_str().unwrap();
        assert!(expected.contains(&custom_id));
        let error = &line["result"]["error"];
        assert_eq!(error["type"], "error");
        assert!(error["request_id"].as_str().unwrap().starts_with("req_"));
        let kind = if injected_error_status(custom_id, config.seed) == 400 {
            "invalid_request_error"
        } else {
            "api_error"
        };
        assert_eq!(error["error"]["type"], kind, "{line}");
        assert!(error["error"]["message"].is_string());
    }
    assert_eq!(sim.stats().await["requests_billed"], 40 - expected.len());
}

#[tokio::test]
async fn a_failing_batch_errors_every_request() {
    let sim = TestSim::start(SimConfig {
        fail_rate: 1.0,
        ..fast()
    })
    .await;
    let batch = sim.submit(&requests("f", 3)).await;
    let batch = sim.wait_ended(batch["id"].as_str().unwrap()).await;
    assert_eq!(
        batch["request_counts"],
        json!({"processing": 0, "succeeded": 0, "errored": 3, "canceled": 0, "expired": 0})
    );
    for line in sim.results(&batch).await {
        assert_eq!(
            line["result"]["error"]["error"]["type"],
            "invalid_request_error"
        );
    }
    let stats = sim.stats().await;
    assert_eq!(stats["requests_submitted"], 3);
    assert_eq!(stats["requests_billed"], 0);
}

#[tokio::test]
async fn batches_list_newest_first_in_both_directions() {
    let sim = TestSim::start(SimConfig {
        batch_duration: Duration::from_secs(60),
        ..fast()
    })
    .await;
    let mut created = Vec::new();
    for i in 0..5 {
        let batch = sim.submit(&[request(&format!("l{i}"), "hi")]).await;
        created.push(batch["id"].as_str().unwrap().to_owned());
    }
    created.reverse();
    let page = |query: Vec<(&'static str, String)>| {
        let request = sim.get("/messages/batches").query(&query);
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            response.json::<Value>().await.unwrap()
        }
    };
    let ids = |page: &Value| -> Vec<String> {
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|batch| batch["id"].as_str().unwrap().to_owned())
            .collect()
    };

    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut query = vec![("limit", "2".to_owned())];
        if let Some(after) = &after {
            query.push(("after_id", after.clone()));
        }
        let page = page(query).await;
        let data = ids(&page);
        assert_eq!(page["first_id"], data[0]);
        assert_eq!(page["last_id"], data[data.len() - 1]);
        seen.extend(data);
        if !page["has_more"].as_bool().unwrap() {
            break;
        }
        after = page["last_id"].as_str().map(str::to_owned);
    }
    assert_eq!(seen, created);

    // before_id pages back towards the newest.
    let page = page(vec![
        ("limit", "2".to_owned()),
        ("before_id", created[4].clone()),
    ])
    .await;
    assert_eq!(ids(&page), [created[2].clone(), created[3].clone()]);
    assert_eq!(page["has_more"], true);
    let all = page_default(&sim).await;
    assert_eq!(ids(&all), created);
    assert_eq!(all["has_more"], false);

    for limit in ["0", "1001", "x"] {
        let response = sim
            .get("/messages/batches")
            .query(&[("limit", limit)])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{limit}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
}

async fn page_default(sim: &TestSim) -> Value {
    sim.get("/messages/batches")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn http_faults_answer_in_anthropic_shapes() {
    let sim = TestSim::start(SimConfig {
        http_429_rate: 1.0,
        retry_after: Duration::from_millis(1500),
        ..fast()
    })
    .await;
    let response = sim.create(&[request("a", "hi")]).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "2");
    assert_eq!(response.headers()["retry-after-ms"], "1500");
    assert_eq!(
        response.headers()["anthropic-ratelimit-requests-remaining"],
        "0"
    );
    let request_id = response.headers()["request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(body["request_id"], request_id);
    assert_eq!(sim.stats().await["batches_created"], 0);

    let sim = TestSim::start(SimConfig {
        http_5xx_rate: 1.0,
        ..fast()
    })
    .await;
    let first = sim.get("/messages/batches").send().await.unwrap();
    assert_eq!(first.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body: Value = first.json().await.unwrap();
    assert_eq!(body["error"]["type"], "api_error");
    let second = sim.get("/messages/batches").send().await.unwrap();
    assert_eq!(second.status().as_u16(), 529);
    let body: Value = second.json().await.unwrap();
    assert_eq!(body["error"]["type"], "overloaded_error");
}

#[tokio::test]
async fn ambiguous_creates_create_the_batch_and_lose_the_answer() {
    let sim = TestSim::start(SimConfig {
        ambiguous_create_rate: 1.0,
        ..fast()
    })
    .await;
    let response = sim.create(&[request("amb", "hi")]).await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "api_error");
    let listed = page_default(&sim).await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1);
    let batch = sim
        .wait_ended(listed["data"][0]["id"].as_str().unwrap())
        .await;
    assert_eq!(batch["request_counts"]["succeeded"], 1);
    assert_eq!(sim.stats().await["custom_ids"]["amb"]["billed"], 1);
}

/// A simulator config that keeps its state in `dir`.
fn durable(dir: &tempfile::TempDir, config: SimConfig) -> SimConfig {
    SimConfig {
        data_dir: Some(dir.path().to_path_buf()),
        ..config
    }
}

/// The batch as another simulator would show it: without `results_url`,
/// which names the host the client reached.
fn without_url(batch: &Value) -> Value {
    let mut batch = batch.clone();
    batch["results_url"] = Value::Null;
    batch
}

fn succeeding(requests: &[Value], config: &SimConfig) -> usize {
    requests
        .iter()
        .filter(|request| {
            !injected_error(
                request["custom_id"].as_str().unwrap(),
                config.error_rate,
                config.seed,
            )
        })
        .count()
}

/// What `/sim/stats` must say of these requests, each in one batch.
fn assert_billed_once(stats: &Value, requests: &[Value], config: &SimConfig) {
    for request in requests {
        let id = request["custom_id"].as_str().unwrap();
        let billed = u64::from(!injected_error(id, config.error_rate, config.seed));
        assert_eq!(
            stats["custom_ids"][id],
            json!({"submitted": 1, "billed": billed}),
            "{id}"
        );
    }
}

#[tokio::test]
async fn a_restart_resumes_unfinished_batches_and_keeps_ended_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = durable(
        &dir,
        SimConfig {
            error_rate: 0.25,
            batch_duration: Duration::from_millis(1000),
            ..fast()
        },
    );
    let done_requests = requests("done", 8);
    let mid_requests = requests("mid", 30);
    let sim = TestSim::start(config.clone()).await;

    // One batch ends before the restart...
    let done = sim.submit(&done_requests).await;
    let done_id = done["id"].as_str().unwrap().to_owned();
    let done = sim.wait_ended(&done_id).await;
    let done_lines = sim.results(&done).await;
    assert_eq!(done_lines.len(), 8);

    // ...the other is cut off in the middle of `in_progress`.
    let mid = sim.submit(&mid_requests).await;
    let mid_id = mid["id"].as_str().unwrap().to_owned();
    assert_eq!(sim.stats().await["requests_submitted"], 38);
    sim.stop().await;

    let sim = TestSim::start(config.clone()).await;
    // The ended batch and its results are as they were.
    let again = sim.batch(&done_id).await;
    assert_eq!(without_url(&again), without_url(&done));
    assert_eq!(
        again["results_url"],
        format!(
            "{}/anthropic/v1/messages/batches/{done_id}/results",
            sim.root
        )
    );
    assert_eq!(sim.results(&again).await, done_lines);
    let batch = sim.batch(&mid_id).await;
    assert_eq!(batch["processing_status"], "in_progress", "{batch}");

    // The list comes newest first, reloaded batches included.
    let list: Value = sim
        .get("/messages/batches")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|batch| batch["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [mid_id.as_str(), done_id.as_str()]);

    // The cut-off batch carries on and ends as if nothing had happened.
    let mid = sim.wait_ended(&mid_id).await;
    let succeeded = succeeding(&mid_requests, &config);
    assert_eq!(
        mid["request_counts"],
        json!({"processing": 0, "succeeded": succeeded, "errored": 30 - succeeded, "canceled": 0, "expired": 0})
    );
    let lines = sim.results(&mid).await;
    assert_eq!(lines.len(), 30);
    for sent in &mid_requests {
        let line = by_custom_id(&lines, &sent["custom_id"]);
        if line["result"]["type"] == "succeeded" {
            assert_eq!(
                line["result"]["message"],
                message_body(&sent["params"], &mid_id)
            );
        } else {
            assert_eq!(line["result"]["type"], "errored");
        }
    }

    let stats = sim.stats().await;
    assert_eq!(stats["batches_created"], 2);
    assert_eq!(stats["requests_submitted"], 38);
    assert_eq!(
        stats["requests_billed"],
        succeeded + succeeding(&done_requests, &config)
    );
    assert_billed_once(&stats, &mid_requests, &config);
    assert_billed_once(&stats, &done_requests, &config);

    // A deleted batch stays deleted.
    let response = sim
        .client
        .delete(sim.url(&format!("/messages/batches/{done_id}")))
        .header("x-api-key", KEY)
        .header("anthropic-version", VERSION)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    sim.stop().await;
    let sim = TestSim::start(config).await;
    let response = sim
        .get(&format!("/messages/batches/{done_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(sim.batch(&mid_id).await["processing_status"], "ended");
}

#[tokio::test]
async fn a_batch_run_again_after_a_restart_is_not_billed_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = durable(
        &dir,
        SimConfig {
            error_rate: 0.25,
            ..fast()
        },
    );
    let sent = requests("again", 20);
    let sim = TestSim::start(config.clone()).await;
    let batch = sim.submit(&sent).await;
    let id = batch["id"].as_str().unwrap().to_owned();
    let first = sim.wait_ended(&id).await;
    let stats = sim.stats().await;
    sim.stop().await;

    // What a crash just after the billing, before the end was saved, leaves
    // behind: the plan fixed, no outcome, the batch still in progress.
    let path = dir
        .path()
        .join("anthropic/batches")
        .join(format!("{id}.json"));
    let mut record: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert!(record["life"]["plan"].is_object(), "{record}");
    record["batch"]["processing_status"] = json!("in_progress");
    record["batch"]["ended_at"] = Value::Null;
    record["batch"]["request_counts"] =
        json!({"processing": 20, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0});
    record["life"]["outcome"] = Value::Null;
    std::fs::write(&path, record.to_string()).unwrap();

    let sim = TestSim::start(config.clone()).await;
    let again = sim.wait_ended(&id).await;
    assert_eq!(again["request_counts"], first["request_counts"]);
    assert_eq!(sim.results(&again).await.len(), 20);
    // The ledger is exactly what it was before the restart.
    assert_eq!(sim.stats().await, stats);
    assert_billed_once(&stats, &sent, &config);
}

#[tokio::test]
async fn a_cancel_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = durable(
        &dir,
        SimConfig {
            batch_duration: Duration::from_millis(1200),
            finalize_duration: Duration::from_millis(1000),
            ..fast()
        },
    );
    let sim = TestSim::start(config.clone()).await;
    let batch = sim.submit(&requests("cr", 20)).await;
    let id = batch["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let response = sim
        .post(&format!("/messages/batches/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    sim.stop().await;

    let sim = TestSim::start(config).await;
    let batch = sim.batch(&id).await;
    assert_eq!(batch["processing_status"], "canceling", "{batch}");
    assert_timestamp(&batch["cancel_initiated_at"]);
    let batch = sim.wait_ended(&id).await;
    let succeeded = batch["request_counts"]["succeeded"].as_u64().unwrap();
    let canceled = batch["request_counts"]["canceled"].as_u64().unwrap();
    assert_eq!(succeeded + canceled, 20, "{batch}");
    // About a quarter of the window had passed when the cancel came.
    assert!((1..20).contains(&succeeded), "{succeeded} ran");
    let stats = sim.stats().await;
    assert_eq!(stats["requests_submitted"], 20);
    assert_eq!(stats["requests_billed"], succeeded);
}

#[tokio::test]
async fn status_calls_wait_out_the_poll_delay() {
    let delay = Duration::from_millis(800);
    let sim = TestSim::start(SimConfig {
        poll_delay: delay,
        ..fast()
    })
    .await;
    let started = tokio::time::Instant::now();
    let batch = sim.submit(&requests("slow", 2)).await;
    let response = sim.get("/messages/batches").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // Creates and lists are not status calls.
    assert!(started.elapsed() < delay, "{:?}", started.elapsed());

    let started = tokio::time::Instant::now();
    let polled = sim.batch(batch["id"].as_str().unwrap()).await;
    assert!(started.elapsed() >= delay, "{:?}", started.elapsed());
    assert_eq!(polled["id"], batch["id"]);
}
