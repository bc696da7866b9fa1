//! The simulated OpenAI API driven over HTTP, as a client would.

use std::time::Duration;

use reqwest::{multipart, Client, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{injected_error, injected_error_status, response_body};
use crate::sim::{serve, SimConfig};

const KEY: &str = "sk-proj-simulator-test-key-0123456789";
const CHAT: &str = "/v1/chat/completions";

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
        validate_duration: Duration::from_millis(10),
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
        format!("{}/openai/v1{path}", self.root)
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(self.url(path)).bearer_auth(KEY)
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.post(self.url(path)).bearer_auth(KEY)
    }

    async fn upload(&self, content: String) -> Value {
        let response = self.upload_raw(content, "batch", "input.jsonl").await;
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.expect("file json")
    }

    async fn upload_raw(
        &self,
        content: String,
        purpose: &str,
        filename: &str,
    ) -> reqwest::Response {
        let form = multipart::Form::new()
            .text("purpose", purpose.to_owned())
            .part(
                "file",
                multipart::Part::text(content).file_name(filename.to_owned()),
            );
        self.post("/files")
            .multipart(form)
            .send()
            .await
            .expect("upload")
    }

    async fn create(&self, input_file_id: &str, endpoint: &str) -> reqwest::Response {
        self.post("/batches")
            .json(&json!({
                "input_file_id": input_file_id,
                "endpoint": endpoint,
                "completion_window": "24h",
                "metadata": {"batchline_id": "bl-test"},
            }))
            .send()
            .await
            .expect("create")
    }

    async fn submit(&self, content: String, endpoint: &str) -> Value {
        let file = self.upload(content).await;
        let response = self
            .create(file["id"].as_str().expect("file id"), endpoint)
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.expect("batch json")
    }

    async fn batch(&self, id: &str) -> Value {
        self.get(&format!("/batches/{id}"))
            .send()
            .await
            .expect("retrieve")
            .json()
            .await
            .expect("batch json")
    }

    async fn wait_for(&self, id: &str, done: impl Fn(&str) -> bool) -> Value {
        // Generous: CI machines are small and run many tests at once.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::time::Instant::now() < deadline {
            let batch = self.batch(id).await;
            if done(batch["status"].as_str().unwrap_or_default()) {
                return batch;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("batch {id} never reached the awaited status");
    }

    async fn wait_terminal(&self, id: &str) -> Value {
        self.wait_for(id, |status| {
            matches!(status, "completed" | "failed" | "expired" | "cancelled")
        })
        .await
    }

    async fn lines(&self, file_id: &Value) -> Vec<Value> {
        let Some(file_id) = file_id.as_str() else {
            return Vec::new();
        };
        let response = self
            .get(&format!("/files/{file_id}/content"))
            .send()
            .await
            .expect("content");
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

fn chat_line(custom_id: &str, model: &str, text: &str) -> Value {
    json!({
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 64},
    })
}

fn jsonl(lines: &[Value]) -> String {
    lines.iter().map(|line| format!("{line}\n")).collect()
}

fn chat_file(custom_ids: &[String]) -> (Vec<Value>, String) {
    let lines: Vec<Value> = custom_ids
        .iter()
        .map(|id| chat_line(id, "gpt-4o-mini", &format!("Please summarize ticket {id}")))
        .collect();
    let text = jsonl(&lines);
    (lines, text)
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

#[tokio::test]
async fn a_batch_runs_to_completion_with_deterministic_results() {
    let sim = TestSim::start(fast()).await;
    let (requests, text) = chat_file(&ids("ok", 3));
    let file = sim.upload(text.clone()).await;
    assert!(file["id"].as_str().unwrap().starts_with("file-"));
    assert_eq!(file["object"], "file");
    assert_eq!(file["purpose"], "batch");
    assert_eq!(file["status"], "processed");
    assert_eq!(file["bytes"], text.len());
    assert_eq!(file["filename"], "input.jsonl");
    assert_eq!(
        file["expires_at"].as_i64().unwrap() - file["created_at"].as_i64().unwrap(),
        2_592_000
    );

    let response = sim.create(file["id"].as_str().unwrap(), CHAT).await;
    assert!(response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .starts_with("req_"));
    let created: Value = response.json().await.unwrap();
    assert!(created["id"].as_str().unwrap().starts_with("batch_"));
    assert_eq!(created["object"], "batch");
    assert_eq!(created["status"], "validating");
    assert_eq!(created["completion_window"], "24h");
    assert_eq!(created["metadata"], json!({"batchline_id": "bl-test"}));
    assert_eq!(
        created["expires_at"].as_i64().unwrap() - created["created_at"].as_i64().unwrap(),
        86_400
    );
    assert_eq!(
        created["request_counts"],
        json!({"total": 0, "completed": 0, "failed": 0})
    );

    let batch = sim.wait_terminal(created["id"].as_str().unwrap()).await;
    assert_eq!(batch["status"], "completed", "{batch}");
    assert_eq!(
        batch["request_counts"],
        json!({"total": 3, "completed": 3, "failed": 0})
    );
    assert_eq!(batch["model"], "gpt-4o-mini");
    assert!(batch["error_file_id"].is_null());
    for stamp in ["in_progress_at", "finalizing_at", "completed_at"] {
        assert!(batch[stamp].is_i64(), "{stamp}: {batch}");
    }

    let output = sim.lines(&batch["output_file_id"]).await;
    assert_eq!(output.len(), 3);
    let created_at = batch["in_progress_at"].as_i64().unwrap();
    let mut input_tokens = 0;
    let mut output_tokens = 0;
    for request in &requests {
        let line = output
            .iter()
            .find(|line| line["custom_id"] == request["custom_id"])
            .expect("one line per request");
        assert!(line["id"].as_str().unwrap().starts_with("batch_req_"));
        assert!(line["error"].is_null());
        assert_eq!(line["response"]["status_code"], 200);
        assert!(line["response"]["request_id"]
            .as_str()
            .unwrap()
            .starts_with("req_"));
        let expected = response_body(CHAT, &request["body"], created_at);
        assert_eq!(line["response"]["body"], expected);
        input_tokens += expected["usage"]["prompt_tokens"].as_u64().unwrap();
        output_tokens += expected["usage"]["completion_tokens"].as_u64().unwrap();
    }
    assert_eq!(batch["usage"]["input_tokens"], input_tokens);
    assert_eq!(batch["usage"]["output_tokens"], output_tokens);
    assert_eq!(batch["usage"]["total_tokens"], input_tokens + output_tokens);

    let output_file: Value = sim
        .get(&format!(
            "/files/{}",
            batch["output_file_id"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(output_file["purpose"], "batch_output");

    // The plain /v1 alias serves the same account.
    let alias: Value = sim
        .client
        .get(format!(
            "{}/v1/batches/{}",
            sim.root,
            batch["id"].as_str().unwrap()
        ))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(alias["status"], "completed");

    let stats = sim.stats().await;
    assert_eq!(stats["batches_created"], 1);
    assert_eq!(stats["requests_submitted"], 3);
    assert_eq!(stats["requests_billed"], 3);
    assert_eq!(
        stats["custom_ids"]["ok-0"],
        json!({"submitted": 1, "billed": 1})
    );
}

#[tokio::test]
async fn validation_failures_name_their_code_and_line() {
    let sim = TestSim::start(fast()).await;
    let a = chat_line("a", "gpt-4o-mini", "one");
    let b = chat_line("b", "gpt-4o-mini", "two");
    let cases = [
        (
            jsonl(&[a.clone(), b.clone(), a.clone()]),
            "duplicate_custom_id",
            Some(3),
        ),
        (
            jsonl(&[a.clone(), chat_line("c", "gpt-4o", "three")]),
            "model_mismatch",
            Some(2),
        ),
        (format!("{a}\n{{not json\n"), "invalid_json_line", Some(2)),
        ("\n".to_owned(), "empty_file", None),
    ];
    for (text, code, line) in cases {
        let batch = sim.submit(text, CHAT).await;
        let batch = sim.wait_terminal(batch["id"].as_str().unwrap()).await;
        assert_eq!(batch["status"], "failed", "{code}: {batch}");
        assert!(batch["failed_at"].is_i64());
        assert!(batch["output_file_id"].is_null() && batch["error_file_id"].is_null());
        let error = &batch["errors"]["data"][0];
        assert_eq!(batch["errors"]["object"], "list");
        assert_eq!(error["code"], code, "{batch}");
        assert_eq!(error["line"], json!(line), "{code}");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // Nothing ran, so nothing was submitted or billed.
    let stats = sim.stats().await;
    assert_eq!(stats["batches_created"], 4);
    assert_eq!(stats["requests_submitted"], 0);
    assert_eq!(stats["requests_billed"], 0);
}

#[tokio::test]
async fn url_mismatch_fails_the_batch() {
    let sim = TestSim::start(fast()).await;
    let batch = sim
        .submit(jsonl(&[chat_line("a", "m", "x")]), "/v1/responses")
        .await;
    let batch = sim.wait_terminal(batch["id"].as_str().unwrap()).await;
    assert_eq!(batch["errors"]["data"][0]["code"], "url_mismatch");
    assert_eq!(batch["errors"]["data"][0]["line"], 1);
}

#[tokio::test]
async fn auth_failures_get_openai_401_bodies() {
    let sim = TestSim::start(fast()).await;
    let response = sim.client.get(sim.url("/batches")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(response.headers().contains_key("x-request-id"));
    let body: Value = response.json().await.unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("You didn't provide an API key."));
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(body["error"]["code"].is_null());
    assert!(body["error"]["param"].is_null());

    let wrong = "sk-proj-this-is-the-wrong-key-abcd";
    let response = sim
        .client
        .get(sim.url("/batches"))
        .bearer_auth(wrong)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body: Value = response.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("Incorrect API key provided: sk-proj-*"),
        "{message}"
    );
    assert!(
        message.contains("abcd. You can find your API key"),
        "{message}"
    );
    assert!(!message.contains(wrong));
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert_eq!(body["error"]["type"], "invalid_request_error");

    // Without a configured key, any non-empty bearer token is accepted.
    let open = TestSim::start(SimConfig::default()).await;
    let response = open
        .client
        .get(open.url("/batches"))
        .bearer_auth("anything")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let response = open.client.get(open.url("/batches")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn cancelling_keeps_what_ran_and_cancels_the_rest() {
    let sim = TestSim::start(SimConfig {
        batch_duration: Duration::from_secs(2),
        ..fast()
    })
    .await;
    let sim_ids = ids("cx", 20);
    let (_, text) = chat_file(&sim_ids);
    let batch = sim.submit(text, CHAT).await;
    let id = batch["id"].as_str().unwrap();
    sim.wait_for(id, |status| status == "in_progress").await;
    // A quarter of the window: some requests ran, most did not.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let response = sim
        .post(&format!("/batches/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let cancelling: Value = response.json().await.unwrap();
    assert_eq!(cancelling["status"], "cancelling");
    assert!(cancelling["cancelling_at"].is_i64());

    let batch = sim.wait_terminal(id).await;
    assert_eq!(batch["status"], "cancelled", "{batch}");
    assert!(batch["cancelled_at"].is_i64());
    let output = sim.lines(&batch["output_file_id"]).await;
    let errors = sim.lines(&batch["error_file_id"]).await;
    assert_eq!(output.len() + errors.len(), 20);
    assert!((1..20).contains(&output.len()), "{} ran", output.len());
    for line in &errors {
        assert!(line["response"].is_null());
        assert_eq!(line["error"]["code"], "batch_cancelled");
    }
    assert_eq!(batch["request_counts"]["completed"], output.len());
    assert_eq!(batch["request_counts"]["failed"], errors.len());
    assert_eq!(sim.stats().await["requests_billed"], output.len());

    let response = sim
        .post(&format!("/batches/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["error"]["message"],
        "Cannot cancel a batch with status 'cancelled'."
    );
}

#[tokio::test]
async fn cancelling_while_validating_runs_nothing() {
    let sim = TestSim::start(SimConfig {
        validate_duration: Duration::from_secs(5),
        ..fast()
    })
    .await;
    let (_, text) = chat_file(&ids("early", 4));
    let batch = sim.submit(text, CHAT).await;
    let id = batch["id"].as_str().unwrap();
    let cancelling: Value = sim
        .post(&format!("/batches/{id}/cancel"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cancelling["status"], "cancelling");
    let batch = sim.wait_terminal(id).await;
    assert_eq!(batch["status"], "cancelled");
    assert!(batch["output_file_id"].is_null());
    assert_eq!(
        batch["request_counts"],
        json!({"total": 4, "completed": 0, "failed": 4})
    );
    assert_eq!(sim.stats().await["requests_billed"], 0);
}

#[tokio::test]
async fn expiring_batches_keep_the_completed_share() {
    let sim = TestSim::start(SimConfig {
        expire_rate: 1.0,
        expire_completed_fraction: 0.5,
        ..fast()
    })
    .await;
    let (requests, text) = chat_file(&ids("ex", 5));
    let batch = sim.submit(text, CHAT).await;
    let batch = sim.wait_terminal(batch["id"].as_str().unwrap()).await;
    assert_eq!(batch["status"], "expired", "{batch}");
    assert!(batch["expired_at"].is_i64());
    assert_eq!(
        batch["request_counts"],
        json!({"total": 5, "completed": 2, "failed": 3})
    );
    let output = sim.lines(&batch["output_file_id"]).await;
    let errors = sim.lines(&batch["error_file_id"]).await;
    // The first floor(5 * 0.5) lines in file order succeeded.
    let mut succeeded: Vec<&str> = output
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    succeeded.sort_unstable();
    assert_eq!(succeeded, ["ex-0", "ex-1"]);
    for line in &errors {
        assert_eq!(line["error"]["code"], "batch_expired");
        assert_eq!(
            line["error"]["message"],
            "This request could not be executed before the completion window expired."
        );
    }
    assert_eq!(errors.len(), requests.len() - 2);
    let stats = sim.stats().await;
    assert_eq!(stats["requests_billed"], 2);
    assert_eq!(
        stats["custom_ids"]["ex-4"],
        json!({"submitted": 1, "billed": 0})
    );
}

#[tokio::test]
async fn per_request_errors_go_to_the_error_file() {
    let config = SimConfig {
        error_rate: 0.4,
        seed: 11,
        ..fast()
    };
    let sim = TestSim::start(config.clone()).await;
    let custom_ids = ids("pr", 40);
    let expected_failures: Vec<&String> = custom_ids
        .iter()
        .filter(|id| injected_error(id, config.error_rate, config.seed))
        .collect();
    assert!(!expected_failures.is_empty() && expected_failures.len() < 40);
    let (_, text) = chat_file(&custom_ids);
    let batch = sim.submit(text, CHAT).await;
    let batch = sim.wait_terminal(batch["id"].as_str().unwrap()).await;
    assert_eq!(batch["status"], "completed");
    let errors = sim.lines(&batch["error_file_id"]).await;
    assert_eq!(errors.len(), expected_failures.len());
    assert_eq!(batch["request_counts"]["failed"], expected_failures.len());
    assert_eq!(
        batch["request_counts"]["completed"],
        40 - expected_failures.len()
    );
    for line in &errors {
        let custom_id = line["custom_id"].as_str().unwrap();
        assert!(expected_failures.iter().any(|id| *id == custom_id));
        assert!(line["error"].is_null());
        let status = line["response"]["status_code"].as_u64().unwrap();
        assert_eq!(
            status,
            u64::from(injected_error_status(custom_id, config.seed))
        );
        let error = &line["response"]["body"]["error"];
        if status == 400 {
            assert_eq!(error["code"], "context_length_exceeded");
            assert_eq!(error["type"], "invalid_request_error");
        } else {
            assert_eq!(status, 500);
            assert_eq!(error["type"], "server_error");
        }
    }
    let stats = sim.stats().await;
    assert_eq!(stats["requests_submitted"], 40);
    assert_eq!(stats["requests_billed"], 40 - expected_failures.len());
    assert_eq!(
        stats["custom_ids"][expected_failures[0].as_str()],
        json!({"submitted": 1, "billed": 0})
    );
}

#[tokio::test]
async fn every_request_failing_leaves_no_output_file() {
    let sim = TestSim::start(SimConfig {
        error_rate: 1.0,
        ..fast()
    })
    .await;
    let (_, text) = chat_file(&ids("all", 3));
    let batch = sim.submit(text, CHAT).await;
    let batch = sim.wait_terminal(batch["id"].as_str().unwrap()).await;
    assert_eq!(batch["status"], "completed");
    assert!(batch["output_file_id"].is_null());
    assert!(batch["error_file_id"].is_string());
}

#[tokio::test]
async fn resubmitting_the_same_requests_bills_them_twice() {
    let sim = TestSim::start(fast()).await;
    let (_, text) = chat_file(&ids("twice", 2));
    for _ in 0..2 {
        let batch = sim.submit(text.clone(), CHAT).await;
        sim.wait_terminal(batch["id"].as_str().unwrap()).await;
    }
    let stats = sim.stats().await;
    assert_eq!(
        stats["custom_ids"]["twice-1"],
        json!({"submitted": 2, "billed": 2})
    );
    assert_eq!(stats["batches_created"], 2);
}

#[tokio::test]
async fn whole_batch_failures_are_injected() {
    let sim = TestSim::start(SimConfig {
        token_limit_rate: 1.0,
        ..fast()
    })
    .await;
    let (_, text) = chat_file(&ids("tl", 2));
    let batch = sim.submit(text.clone(), CHAT).await;
    let batch = sim.wait_terminal(batch["id"].as_str().unwrap()).await;
    assert_eq!(batch["status"], "failed");
    let error = &batch["errors"]["data"][0];
    assert_eq!(error["code"], "token_limit_exceeded");
    assert!(error["message"]
        .as_str()
        .unwrap()
        .starts_with("Enqueued token limit reached for gpt-4o-mini"));
    assert!(error["line"].is_null());
    assert_eq!(batch["request_counts"]["total"], 0);

    let sim = TestSim::start(SimConfig {
        fail_rate: 1.0,
        ..fast()
    })
    .await;
    let batch = sim.submit(text, CHAT).await;
    let batch = sim.wait_terminal(batch["id"].as_str().unwrap()).await;
    assert_eq!(batch["status"], "failed");
    assert!(batch["errors"]["data"][0]["code"].is_string());
    assert!(batch["output_file_id"].is_null() && batch["error_file_id"].is_null());
    assert_eq!(sim.stats().await["requests_submitted"], 0);
}

#[tokio::test]
async fn http_faults_answer_without_doing_anything() {
    let sim = TestSim::start(SimConfig {
        http_429_rate: 1.0,
        retry_after: Duration::from_millis(1500),
        ..fast()
    })
    .await;
    let response = sim
        .upload_raw(jsonl(&[chat_line("a", "m", "x")]), "batch", "in.jsonl")
        .await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after-ms"], "1500");
    assert_eq!(response.headers()["retry-after"], "2");
    assert!(response.headers().contains_key("x-request-id"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    // /sim/* is never faulted, and the upload never happened.
    assert_eq!(sim.stats().await["batches_created"], 0);

    let sim = TestSim::start(SimConfig {
        http_5xx_rate: 1.0,
        ..fast()
    })
    .await;
    let response = sim.get("/batches").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "server_error");
}

#[tokio::test]
async fn ambiguous_creates_create_the_batch_and_lose_the_answer() {
    let sim = TestSim::start(SimConfig {
        ambiguous_create_rate: 1.0,
        ..fast()
    })
    .await;
    let file = sim.upload(jsonl(&[chat_line("amb", "m", "x")])).await;
    let response = sim.create(file["id"].as_str().unwrap(), CHAT).await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let listed: Value = sim
        .get("/batches")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["data"].as_array().unwrap().len(), 1);
    let batch = &listed["data"][0];
    assert_eq!(batch["metadata"]["batchline_id"], "bl-test");
    let batch = sim.wait_terminal(batch["id"].as_str().unwrap()).await;
    assert_eq!(batch["status"], "completed");
    assert_eq!(sim.stats().await["custom_ids"]["amb"]["billed"], 1);
}

#[tokio::test]
async fn batches_list_newest_first_in_pages() {
    let sim = TestSim::start(SimConfig {
        validate_duration: Duration::from_secs(60),
        ..fast()
    })
    .await;
    let file = sim.upload(jsonl(&[chat_line("a", "m", "x")])).await;
    let mut created = Vec::new();
    for _ in 0..5 {
        let batch: Value = sim
            .create(file["id"].as_str().unwrap(), CHAT)
            .await
            .json()
            .await
            .unwrap();
        created.push(batch["id"].as_str().unwrap().to_owned());
    }
    created.reverse();

    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut request = sim.get("/batches").query(&[("limit", "2")]);
        if let Some(after) = &after {
            request = request.query(&[("after", after)]);
        }
        let page: Value = request.send().await.unwrap().json().await.unwrap();
        assert_eq!(page["object"], "list");
        let data = page["data"].as_array().unwrap();
        assert_eq!(page["first_id"], data[0]["id"]);
        assert_eq!(page["last_id"], data[data.len() - 1]["id"]);
        seen.extend(
            data.iter()
                .map(|batch| batch["id"].as_str().unwrap().to_owned()),
        );
        if !page["has_more"].as_bool().unwrap() {
            break;
        }
        after = page["last_id"].as_str().map(str::to_owned);
    }
    assert_eq!(seen, created);

    for (limit, code) in [
        ("0", "integer_below_min_value"),
        ("101", "integer_above_max_value"),
    ] {
        let response = sim
            .get("/batches")
            .query(&[("limit", limit)])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], code);
    }
}

#[tokio::test]
async fn files_list_filters_and_pages() {
    let sim = TestSim::start(fast()).await;
    let mut uploaded = Vec::new();
    for i in 0..3 {
        let file = sim
            .upload(jsonl(&[chat_line(&format!("f{i}"), "m", "x")]))
            .await;
        uploaded.push(file["id"].as_str().unwrap().to_owned());
    }
    let page: Value = sim
        .get("/files")
        .query(&[("purpose", "batch"), ("limit", "2"), ("order", "asc")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [uploaded[0].as_str(), uploaded[1].as_str()]);
    assert_eq!(page["has_more"], true);
    let page: Value = sim
        .get("/files")
        .query(&[("purpose", "batch_output")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["data"], json!([]));
    assert!(page["first_id"].is_null());
}

#[tokio::test]
async fn files_can_be_read_and_deleted() {
    let sim = TestSim::start(fast()).await;
    let text = jsonl(&[chat_line("d", "m", "x")]);
    let file = sim.upload(text.clone()).await;
    let id = file["id"].as_str().unwrap();
    let content = sim
        .get(&format!("/files/{id}/content"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        content.headers()["content-type"],
        "application/octet-stream"
    );
    assert_eq!(content.text().await.unwrap(), text);

    let deleted: Value = sim
        .client
        .delete(sim.url(&format!("/files/{id}")))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        deleted,
        json!({"id": id, "object": "file", "deleted": true})
    );
    for path in [format!("/files/{id}"), format!("/files/{id}/content")] {
        let response = sim.get(&path).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
    // A deleted (or unknown) input file cannot start a batch.
    let response = sim.create(id, CHAT).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with(&format!("Cannot find file {id}")));
}

#[tokio::test]
async fn an_input_file_deleted_before_validation_fails_the_batch() {
    let sim = TestSim::start(SimConfig {
        validate_duration: Duration::from_millis(500),
        ..fast()
    })
    .await;
    let batch = sim
        .submit(jsonl(&[chat_line("gone", "m", "x")]), CHAT)
        .await;
    let file_id = batch["input_file_id"].as_str().unwrap();
    let response = sim
        .client
        .delete(sim.url(&format!("/files/{file_id}")))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let batch = sim.wait_terminal(batch["id"].as_str().unwrap()).await;
    assert_eq!(batch["status"], "failed");
    assert!(batch["errors"]["data"][0]["message"]
        .as_str()
        .unwrap()
        .starts_with(&format!("Cannot find file {file_id}")));
}

#[tokio::test]
async fn bad_requests_get_openai_400s() {
    let sim = TestSim::start(fast()).await;
    let line = jsonl(&[chat_line("x", "m", "x")]);
    let response = sim.upload_raw(line.clone(), "fine-tune", "in.jsonl").await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["param"], "purpose");
    let response = sim.upload_raw(line, "batch", "in.csv").await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    let file = sim.upload(jsonl(&[chat_line("x", "m", "x")])).await;
    let file_id = file["id"].as_str().unwrap();
    let too_much_metadata: serde_json::Map<String, Value> =
        (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
    let cases = [
        (
            json!({"endpoint": CHAT, "completion_window": "24h"}),
            Some("input_file_id"),
        ),
        (
            json!({"input_file_id": file_id, "endpoint": "/v1/nope", "completion_window": "24h"}),
            Some("endpoint"),
        ),
        (
            json!({"input_file_id": file_id, "endpoint": CHAT, "completion_window": "48h"}),
            Some("completion_window"),
        ),
        (
            json!({"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h", "metadata": too_much_metadata}),
            Some("metadata"),
        ),
        (
            json!({"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h", "metadata": {"k": "v".repeat(513)}}),
            Some("metadata"),
        ),
        (
            json!({"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h", "output_expires_after": {"anchor": "created_at", "seconds": 60}}),
            Some("output_expires_after"),
        ),
        (
            json!({"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h", "surprise": 1}),
            None,
        ),
    ];
    for (body, param) in cases {
        let response = sim.post("/batches").json(&body).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["type"], "invalid_request_error");
        assert_eq!(error["error"]["param"], json!(param), "{body}");
    }
    let response = sim
        .post("/batches")
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    let response = sim.get("/batches/batch_missing").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = sim.get("/nowhere").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["error"]["message"],
        "Invalid URL (GET /openai/v1/nowhere)"
    );
    assert_eq!(sim.stats().await["batches_created"], 0);
}

#[tokio::test]
async fn embeddings_batches_answer_one_vector_per_input() {
    let sim = TestSim::start(fast()).await;
    let request = json!({
        "custom_id": "emb-1",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "text-embedding-3-small", "input": ["alpha", "beta"]},
    });
    let batch = sim
        .submit(jsonl(std::slice::from_ref(&request)), "/v1/embeddings")
        .await;
    let batch = sim.wait_terminal(batch["id"].as_str().unwrap()).await;
    assert_eq!(batch["status"], "completed", "{batch}");
    let output = sim.lines(&batch["output_file_id"]).await;
    let body = &output[0]["response"]["body"];
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    assert_eq!(
        *body,
        response_body(
            "/v1/embeddings",
            &request["body"],
            batch["in_progress_at"].as_i64().unwrap()
        )
    );
}

/// A simulator config that keeps its state in `dir`.
fn durable(dir: &tempfile::TempDir, config: SimConfig) -> SimConfig {
    SimConfig {
        data_dir: Some(dir.path().to_path_buf()),
        ..config
    }
}

/// What `/sim/stats` must say of these custom_ids, each in one batch.
fn assert_billed_once(stats: &Value, custom_ids: &[String], config: &SimConfig) {
    for id in custom_ids {
        let billed = u64::from(!injected_error(id, config.error_rate, config.seed));
        assert_eq!(
            stats["custom_ids"][id.as_str()],
            json!({"submitted": 1, "billed": billed}),
            "{id}"
        );
    }
}

#[tokio::test]
async fn a_restart_resumes_unfinished_batches_and_keeps_finished_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = durable(
        &dir,
        SimConfig {
            error_rate: 0.25,
            batch_duration: Duration::from_millis(1000),
            ..fast()
        },
    );
    let done_ids = ids("done", 8);
    let mid_ids = ids("mid", 30);
    let sim = TestSim::start(config.clone()).await;

    // One batch ends before the restart...
    let (_, text) = chat_file(&done_ids);
    let done = sim.submit(text, CHAT).await;
    let done_id = done["id"].as_str().unwrap().to_owned();
    let done = sim.wait_terminal(&done_id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert!(done["output_file_id"].is_string() && done["error_file_id"].is_string());
    let done_output = sim.lines(&done["output_file_id"]).await;
    let done_errors = sim.lines(&done["error_file_id"]).await;

    // ...the other is cut off in the middle of `in_progress`.
    let (requests, text) = chat_file(&mid_ids);
    let mid = sim.submit(text, CHAT).await;
    let mid_id = mid["id"].as_str().unwrap().to_owned();
    sim.wait_for(&mid_id, |status| status == "in_progress")
        .await;
    let stats = sim.stats().await;
    assert_eq!(stats["requests_submitted"], 38);
    assert_eq!(stats["custom_ids"]["mid-0"]["billed"], 0);
    sim.stop().await;

    let sim = TestSim::start(config.clone()).await;
    // The finished batch and its files are as they were.
    assert_eq!(sim.batch(&done_id).await, done);
    assert_eq!(sim.lines(&done["output_file_id"]).await, done_output);
    assert_eq!(sim.lines(&done["error_file_id"]).await, done_errors);
    let file: Value = sim
        .get(&format!(
            "/files/{}",
            done["output_file_id"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(file["purpose"], "batch_output");
    assert_eq!(file["object"], "file");

    // Lists come newest first, reloaded objects included.
    let batches: Value = sim
        .get("/batches")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed: Vec<&str> = batches["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|batch| batch["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [mid_id.as_str(), done_id.as_str()]);
    let files: Value = sim
        .get("/files")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed: Vec<&Value> = files["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|file| &file["id"])
        .collect();
    assert_eq!(
        listed,
        [
            &mid["input_file_id"],
            &done["error_file_id"],
            &done["output_file_id"],
            &done["input_file_id"],
        ]
    );

    // The cut-off batch carries on and ends as if nothing had happened.
    let mid = sim.wait_terminal(&mid_id).await;
    assert_eq!(mid["status"], "completed", "{mid}");
    let failures = mid_ids
        .iter()
        .filter(|id| injected_error(id, config.error_rate, config.seed))
        .count();
    assert_eq!(
        mid["request_counts"],
        json!({"total": 30, "completed": 30 - failures, "failed": failures})
    );
    let output = sim.lines(&mid["output_file_id"]).await;
    assert_eq!(output.len(), 30 - failures);
    let in_progress_at = mid["in_progress_at"].as_i64().unwrap();
    for line in &output {
        let request = requests
            .iter()
            .find(|request| request["custom_id"] == line["custom_id"])
            .expect("a request per line");
        assert_eq!(
            line["response"]["body"],
            response_body(CHAT, &request["body"], in_progress_at)
        );
    }
    assert_eq!(sim.lines(&mid["error_file_id"]).await.len(), failures);

    let stats = sim.stats().await;
    assert_eq!(stats["batches_created"], 2);
    assert_eq!(stats["requests_submitted"], 38);
    assert_eq!(
        stats["requests_billed"],
        output.len() + done_output.len(),
        "{stats}"
    );
    assert_billed_once(&stats, &mid_ids, &config);
    assert_billed_once(&stats, &done_ids, &config);
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
    let custom_ids = ids("again", 20);
    let sim = TestSim::start(config.clone()).await;
    let (_, text) = chat_file(&custom_ids);
    let batch = sim.submit(text, CHAT).await;
    let id = batch["id"].as_str().unwrap().to_owned();
    let first = sim.wait_terminal(&id).await;
    assert_eq!(first["status"], "completed");
    let stats = sim.stats().await;
    sim.stop().await;

    // What a crash just after the billing, before the outcome was saved,
    // leaves behind: the plan fixed, no outcome, the batch's own input copy.
    let openai = dir.path().join("openai");
    let path = openai.join("batches").join(format!("{id}.json"));
    let mut record: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert!(record["life"]["plan"].is_object(), "{record}");
    record["batch"]["status"] = json!("in_progress");
    for field in [
        "finalizing_at",
        "completed_at",
        "output_file_id",
        "error_file_id",
    ] {
        record["batch"][field] = Value::Null;
    }
    record["batch"]["request_counts"] = json!({"total": 20, "completed": 0, "failed": 0});
    record["life"]["outcome"] = Value::Null;
    record["life"]["finalizing_ms"] = Value::Null;
    std::fs::write(&path, record.to_string()).unwrap();
    let input = first["input_file_id"].as_str().unwrap();
    std::fs::copy(
        openai.join(format!("{input}.jsonl")),
        openai.join(format!("{id}.input.jsonl")),
    )
    .unwrap();

    let sim = TestSim::start(config.clone()).await;
    let again = sim.wait_terminal(&id).await;
    assert_eq!(again["status"], "completed", "{again}");
    assert_eq!(again["request_counts"], first["request_counts"]);
    assert_ne!(again["output_file_id"], first["output_file_id"]);
    let output = sim.lines(&again["output_file_id"]).await;
    assert_eq!(
        output.len() as u64,
        first["request_counts"]["completed"].as_u64().unwrap()
    );
    // The ledger is exactly what it was before the restart.
    assert_eq!(sim.stats().await, stats);
    assert_billed_once(&stats, &custom_ids, &config);
    // The batch's copy of its input is gone once it has ended (and saved).
    sim.stop().await;
    assert!(!openai.join(format!("{id}.input.jsonl")).exists());
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
    let custom_ids = ids("cr", 20);
    let sim = TestSim::start(config.clone()).await;
    let (_, text) = chat_file(&custom_ids);
    let batch = sim.submit(text, CHAT).await;
    let id = batch["id"].as_str().unwrap().to_owned();
    sim.wait_for(&id, |status| status == "in_progress").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let response = sim
        .post(&format!("/batches/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    sim.stop().await;

    let sim = TestSim::start(config).await;
    let batch = sim.batch(&id).await;
    assert_eq!(batch["status"], "cancelling", "{batch}");
    let batch = sim.wait_terminal(&id).await;
    assert_eq!(batch["status"], "cancelled", "{batch}");
    let output = sim.lines(&batch["output_file_id"]).await;
    let errors = sim.lines(&batch["error_file_id"]).await;
    assert_eq!(output.len() + errors.len(), 20);
    // About a quarter of the window had passed when the cancel came.
    assert!((1..20).contains(&output.len()), "{} ran", output.len());
    for line in &errors {
        assert_eq!(line["error"]["code"], "batch_cancelled");
    }
    let stats = sim.stats().await;
    assert_eq!(stats["requests_submitted"], 20);
    assert_eq!(stats["requests_billed"], output.len());
}

#[tokio::test]
async fn without_a_data_dir_nothing_survives() {
    let sim = TestSim::start(fast()).await;
    let (_, text) = chat_file(&ids("gone", 2));
    let batch = sim.submit(text, CHAT).await;
    let id = batch["id"].as_str().unwrap().to_owned();
    sim.wait_terminal(&id).await;
    sim.stop().await;
    let sim = TestSim::start(fast()).await;
    let response = sim.get(&format!("/batches/{id}")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(sim.stats().await["batches_created"], 0);
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
    let (_, text) = chat_file(&ids("slow", 2));
    let batch = sim.submit(text, CHAT).await;
    let id = batch["id"].as_str().unwrap();
    let response = sim.get("/batches").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // Uploads, creates and lists are not status calls.
    assert!(started.elapsed() < delay, "{:?}", started.elapsed());

    let started = tokio::time::Instant::now();
    let polled = sim.batch(id).await;
    assert!(started.elapsed() >= delay, "{:?}", started.elapsed());
    assert_eq!(polled["id"], batch["id"]);
    // So is the /v1 alias.
    let started = tokio::time::Instant::now();
    let response = sim
        .client
        .get(format!("{}/v1/batches/{id}", sim.root))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(started.elapsed() >= delay, "{:?}", started.elapsed());
}
