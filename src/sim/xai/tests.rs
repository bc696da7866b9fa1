//! The simulated xAI Batch API driven over HTTP, as a client would.

use std::time::Duration;

use reqwest::{multipart, Client, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{chat_completion, error_detail, result_response, row_cost};
use crate::sim::openai::injected_error;
use crate::sim::{serve, SimConfig};

const KEY: &str = "xai-simulator-test-key-0123456789yz";
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
        batch_duration: Duration::from_millis(80),
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
        format!("{}/xai/v1{path}", self.root)
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(self.url(path)).bearer_auth(KEY)
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.post(self.url(path)).bearer_auth(KEY)
    }

    async fn upload(&self, content: String) -> Value {
        let form = multipart::Form::new().text("purpose", "batch").part(
            "file",
            multipart::Part::text(content).file_name("requests.jsonl"),
        );
        let response = self
            .post("/files")
            .multipart(form)
            .send()
            .await
            .expect("upload");
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.expect("file json")
    }

    async fn create(&self, input_file_id: &str) -> reqwest::Response {
        self.post("/batches")
            .json(&json!({"name": "bl-3-test", "input_file_id": input_file_id}))
            .send()
            .await
            .expect("create")
    }

    async fn submit(&self, content: String) -> Value {
        let file = self.upload(content).await;
        let response = self.create(file["id"].as_str().unwrap()).await;
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

    async fn wait_until(&self, id: &str, done: impl Fn(&Value) -> bool) -> Value {
        // Generous: CI machines are small and run many tests at once.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let batch = self.batch(id).await;
            if done(&batch) {
                return batch;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("batch {id} never reached the awaited state: {batch}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until xAI's "done": requests recorded and none pending, or the
    /// batch refused.
    async fn wait_done(&self, id: &str) -> Value {
        self.wait_until(id, |batch| {
            !batch["cancel_by_xai_message"].is_null()
                || (batch["state"]["num_requests"].as_u64() > Some(0)
                    && batch["state"]["num_pending"] == 0)
        })
        .await
    }

    async fn page(&self, path: &str, limit: usize, token: Option<&str>) -> Value {
        let mut request = self.get(path).query(&[("limit", limit.to_string())]);
        if let Some(token) = token {
            request = request.query(&[("pagination_token", token)]);
        }
        let response = request.send().await.expect("page");
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.expect("page json")
    }

    /// Every result row, following the tokens; also the tokens seen.
    async fn results(&self, id: &str, limit: usize) -> (Vec<Value>, Vec<Value>) {
        let mut rows = Vec::new();
        let mut tokens = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .page(&format!("/batches/{id}/results"), limit, token.as_deref())
                .await;
            rows.extend(page["results"].as_array().unwrap().iter().cloned());
            tokens.push(page["pagination_token"].clone());
            match page["pagination_token"].as_str() {
                Some(next) if !next.is_empty() => token = Some(next.to_owned()),
                _ => return (rows, tokens),
            }
        }
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

fn line(custom_id: &str, url: &str, model: &str, text: &str) -> Value {
    json!({
        "custom_id": custom_id,
        "method": "POST",
        "url": url,
        "body": {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 64},
    })
}

fn jsonl(lines: &[Value]) -> String {
    lines.iter().map(|line| format!("{line}\n")).collect()
}

fn chat_lines(prefix: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            line(
                &format!("{prefix}-{i}"),
                CHAT,
                "grok-4.3",
                &format!("Summarize ticket {i}"),
            )
        })
        .collect()
}

fn row<'a>(rows: &'a [Value], custom_id: &Value) -> &'a Value {
    rows.iter()
        .find(|row| row["batch_request_id"] == *custom_id)
        .expect("one row per request")
}

#[tokio::test]
async fn a_batch_runs_until_nothing_is_pending() {
    let sim = TestSim::start(fast()).await;
    let mut lines = chat_lines("ok", 3);
    lines.push(line(
        "resp",
        "/v1/responses",
        "grok-4-fast-reasoning",
        "Tell me a joke",
    ));
    lines[3]["body"] = json!({"model": "grok-4-fast-reasoning", "input": "Tell me a joke"});
    let text = jsonl(&lines);
    let file = sim.upload(text.clone()).await;
    assert!(file["id"].as_str().unwrap().starts_with("file_"));
    assert_eq!(file["object"], "file");
    assert_eq!(file["bytes"], text.len());
    assert_eq!(file["filename"], "requests.jsonl");
    assert_eq!(file["purpose"], "");
    assert!(file["expires_at"].is_null());

    let response = sim.create(file["id"].as_str().unwrap()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let created: Value = response.json().await.unwrap();
    let id = created["batch_id"].as_str().unwrap();
    assert!(id.starts_with("batch_"));
    assert!(uuid::Uuid::parse_str(&id["batch_".len()..]).is_ok());
    assert_eq!(created["name"], "bl-3-test");
    assert_eq!(created["input_file_id"], file["id"]);
    assert!(created["cancel_time"].is_null() && created["cancel_by_xai_message"].is_null());
    assert_eq!(
        created["state"],
        json!({"num_requests": 0, "num_pending": 0, "num_success": 0, "num_error": 0, "num_cancelled": 0})
    );
    assert_eq!(created["cost_breakdown"]["total_cost_usd_ticks"], 0);
    assert!(created["create_api_key_id"].is_string());
    let create_time =
        chrono::DateTime::parse_from_rfc3339(created["create_time"].as_str().unwrap()).unwrap();
    let expire_time =
        chrono::DateTime::parse_from_rfc3339(created["expire_time"].as_str().unwrap()).unwrap();
    assert_eq!(expire_time - create_time, chrono::Duration::days(30));

    // Counters move while the requests run.
    let running = sim
        .wait_until(id, |batch| batch["state"]["num_requests"] == 4)
        .await;
    assert!(running["state"]["num_pending"].as_u64().unwrap() <= 4);

    let batch = sim.wait_done(id).await;
    assert_eq!(
        batch["state"],
        json!({"num_requests": 4, "num_pending": 0, "num_success": 4, "num_error": 0, "num_cancelled": 0})
    );
    assert!(batch["cancel_time"].is_null());

    let (rows, _) = sim.results(id, 1000).await;
    assert_eq!(rows.len(), 4);
    let mut total_cost = 0;
    for sent in &lines {
        let row = row(&rows, &sent["custom_id"]);
        let response = &row["batch_result"]["response"];
        let body = &response["chat_get_completion"];
        assert_eq!(body["object"], "chat.completion");
        let created = body["created"].as_i64().unwrap();
        assert_eq!(*body, chat_completion(&sent["body"], created));
        assert_eq!(
            *response,
            result_response(sent["url"].as_str().unwrap(), &sent["body"], created).unwrap()
        );
        total_cost += row_cost(response);
    }
    let reasoning =
        &row(&rows, &json!("resp"))["batch_result"]["response"]["chat_get_completion"]["usage"];
    assert!(
        reasoning["completion_tokens_details"]["reasoning_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_eq!(batch["cost_breakdown"]["total_cost_usd_ticks"], total_cost);
    let endpoint_costs = batch["cost_breakdown"]["endpoint_costs"]
        .as_array()
        .unwrap();
    assert_eq!(endpoint_costs.len(), 2);
    assert_eq!(endpoint_costs[0]["endpoint"], CHAT);
    assert_eq!(endpoint_costs[0]["request_count"], 3);

    let requests = sim
        .page(&format!("/batches/{id}/requests"), 100, None)
        .await;
    let metadata = requests["batch_request_metadata"].as_array().unwrap();
    assert_eq!(metadata.len(), 4);
    assert_eq!(metadata[3]["batch_request_id"], "resp");
    assert_eq!(metadata[3]["endpoint"], "/v1/responses");
    assert_eq!(metadata[3]["model"], "grok-4-fast-reasoning");
    assert_eq!(metadata[0]["state"], "succeeded");
    assert!(metadata[0]["finish_time"].is_string());
    assert_eq!(requests["pagination_token"], "");

    let stats = sim.stats().await;
    assert_eq!(stats["batches_created"], 1);
    assert_eq!(stats["requests_submitted"], 4);
    assert_eq!(stats["requests_billed"], 4);
    assert_eq!(
        stats["custom_ids"]["ok-0"],
        json!({"submitted": 1, "billed": 1})
    );
}

#[tokio::test]
async fn bad_keys_get_xai_400_bodies() {
    let sim = TestSim::start(fast()).await;
    let response = sim
        .client
        .get(sim.url("/batches"))
        .bearer_auth("xai-wrong-key-abcdefyz")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({
            "code": "Client specified an invalid argument",
            "error": "Incorrect API key provided: xa***yz. You can obtain an API key from https://console.x.ai.",
        })
    );
    let response = sim.client.get(sim.url("/batches")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "Client specified an invalid argument");
    assert!(body["error"]
        .as_str()
        .unwrap()
        .starts_with("Incorrect API key provided: ***."));

    let open = TestSim::start(SimConfig::default()).await;
    let response = open
        .client
        .get(open.url("/batches"))
        .bearer_auth("anything")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn broken_files_make_xai_cancel_the_batch() {
    let sim = TestSim::start(fast()).await;
    let a = line("a", CHAT, "grok-4.3", "one");
    let cases = [
        (format!("{a}\n{{not json\n"), "JSONL file validation failed: line 2: invalid JSON: "),
        (jsonl(&[a.clone(), line("b", CHAT, "gpt-4o-mini", "x")]), "JSONL file validation failed: line 2: model 'gpt-4o-mini' is not supported for batch processing"),
        (jsonl(&[a.clone(), a.clone()]), "JSONL file validation failed: line 2: duplicate custom_id 'a'"),
    ];
    for (text, message) in cases {
        let batch = sim.submit(text).await;
        let batch = sim.wait_done(batch["batch_id"].as_str().unwrap()).await;
        assert!(
            batch["cancel_by_xai_message"]
                .as_str()
                .unwrap()
                .starts_with(message),
            "{batch}"
        );
        assert!(batch["cancel_time"].is_string());
        assert_eq!(batch["state"]["num_requests"], 0);
        assert_eq!(batch["state"]["num_pending"], 0);
    }
    let stats = sim.stats().await;
    assert_eq!(stats["batches_created"], 3);
    assert_eq!(stats["requests_submitted"], 0);

    let sim = TestSim::start(SimConfig {
        fail_rate: 1.0,
        ..fast()
    })
    .await;
    let batch = sim.submit(jsonl(&chat_lines("f", 2))).await;
    let batch = sim.wait_done(batch["batch_id"].as_str().unwrap()).await;
    assert!(batch["cancel_by_xai_message"]
        .as_str()
        .unwrap()
        .contains("'grok-4.3' is not supported for batch processing"));
    assert_eq!(batch["state"]["num_requests"], 0);
}

#[tokio::test]
async fn failed_rows_carry_string_or_object_errors() {
    let config = SimConfig {
        error_rate: 0.5,
        seed: 5,
        ..fast()
    };
    let sim = TestSim::start(config.clone()).await;
    let lines = chat_lines("er", 40);
    let batch = sim.submit(jsonl(&lines)).await;
    let batch = sim.wait_done(batch["batch_id"].as_str().unwrap()).await;
    let failing: Vec<&str> = lines
        .iter()
        .filter_map(|line| line["custom_id"].as_str())
        .filter(|id| injected_error(id, config.error_rate, config.seed))
        .collect();
    assert_eq!(batch["state"]["num_error"], failing.len());
    assert_eq!(batch["state"]["num_success"], 40 - failing.len());
    let (rows, _) = sim.results(batch["batch_id"].as_str().unwrap(), 7).await;
    assert_eq!(rows.len(), 40);
    let (mut strings, mut objects) = (0, 0);
    for custom_id in &failing {
        let row = row(&rows, &json!(custom_id));
        let error = &row["batch_result"]["error"];
        assert!(row["batch_result"].get("response").is_none());
        assert_eq!(*error, error_detail(custom_id, config.seed));
        if error.is_string() {
            strings += 1;
        } else {
            assert!(error["code"] == 3 || error["code"] == 13, "{error}");
            objects += 1;
        }
    }
    assert!(
        strings > 0 && objects > 0,
        "{strings} strings, {objects} objects"
    );
    assert_eq!(sim.stats().await["requests_billed"], 40 - failing.len());
}

#[tokio::test]
async fn results_page_until_a_null_token_and_batches_until_an_empty_one() {
    let sim = TestSim::start(fast()).await;
    let batch = sim.submit(jsonl(&chat_lines("pg", 5))).await;
    let id = batch["batch_id"].as_str().unwrap().to_owned();
    sim.wait_done(&id).await;
    let (rows, tokens) = sim.results(&id, 2).await;
    assert_eq!(rows.len(), 5);
    assert_eq!(tokens.len(), 3);
    assert!(tokens[..2]
        .iter()
        .all(|token| token.as_str().is_some_and(|t| !t.is_empty())));
    assert!(tokens[2].is_null());
    let mut ids: Vec<&str> = rows
        .iter()
        .map(|row| row["batch_request_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["pg-0", "pg-1", "pg-2", "pg-3", "pg-4"]);
    let response = sim
        .get(&format!("/batches/{id}/results"))
        .query(&[("pagination_token", "3")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    let file = sim.upload(jsonl(&chat_lines("more", 1))).await;
    let mut created = vec![id];
    for _ in 0..3 {
        let batch: Value = sim
            .create(file["id"].as_str().unwrap())
            .await
            .json()
            .await
            .unwrap();
        created.push(batch["batch_id"].as_str().unwrap().to_owned());
    }
    created.reverse();
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = sim.page("/batches", 3, token.as_deref()).await;
        seen.extend(
            page["batches"]
                .as_array()
                .unwrap()
                .iter()
                .map(|batch| batch["batch_id"].as_str().unwrap().to_owned()),
        );
        match page["pagination_token"].as_str() {
            Some("") => break,
            Some(next) => token = Some(next.to_owned()),
            None => panic!("the batches list ends with \"\": {page}"),
        }
    }
    assert_eq!(seen, created);
}

#[tokio::test]
async fn results_are_readable_before_the_batch_finishes() {
    let sim = TestSim::start(SimConfig {
        batch_duration: Duration::from_secs(4),
        ..fast()
    })
    .await;
    let batch = sim.submit(jsonl(&chat_lines("early", 8))).await;
    let id = batch["batch_id"].as_str().unwrap();
    let partial = sim
        .wait_until(id, |batch| batch["state"]["num_success"].as_u64() > Some(0))
        .await;
    assert!(
        partial["state"]["num_pending"].as_u64().unwrap() > 0,
        "{partial}"
    );
    let (rows, _) = sim.results(id, 100).await;
    assert!(!rows.is_empty() && rows.len() < 8, "{} rows", rows.len());
    let requests = sim
        .page(&format!("/batches/{id}/requests"), 100, None)
        .await;
    let states: Vec<&str> = requests["batch_request_metadata"]
        .as_array()
        .unwrap()
        .iter()
        .map(|meta| meta["state"].as_str().unwrap())
        .collect();
    assert!(
        states.contains(&"pending") && states.contains(&"succeeded"),
        "{states:?}"
    );
}

#[tokio::test]
async fn cancelling_keeps_what_ran_and_cancels_the_rest() {
    let sim = TestSim::start(SimConfig {
        batch_duration: Duration::from_secs(4),
        ..fast()
    })
    .await;
    let batch = sim.submit(jsonl(&chat_lines("cx", 20))).await;
    let id = batch["batch_id"].as_str().unwrap();
    sim.wait_until(id, |batch| batch["state"]["num_success"].as_u64() > Some(0))
        .await;
    let response = sim
        .post(&format!("/batches/{id}:cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let cancelled: Value = response.json().await.unwrap();
    assert!(cancelled["cancel_time"].is_string());
    assert!(cancelled["cancel_by_xai_message"].is_null());

    let batch = sim.wait_done(id).await;
    let state = &batch["state"];
    let succeeded = state["num_success"].as_u64().unwrap();
    assert!((1..20).contains(&succeeded), "{state}");
    assert_eq!(state["num_cancelled"].as_u64().unwrap(), 20 - succeeded);
    let (rows, _) = sim.results(id, 1000).await;
    assert_eq!(rows.len(), 20);
    let cancelled_rows: Vec<&Value> = rows
        .iter()
        .filter(|row| row["batch_result"].get("error").is_some())
        .collect();
    assert_eq!(cancelled_rows.len() as u64, 20 - succeeded);
    for row in cancelled_rows {
        assert_eq!(
            row["batch_result"]["error"],
            json!({"code": 1, "message": "Batch cancelled"})
        );
    }
    assert_eq!(sim.stats().await["requests_billed"], succeeded);

    // Cancelling again changes nothing.
    let again: Value = sim
        .post(&format!("/batches/{id}:cancel"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["cancel_time"], batch["cancel_time"]);
    let response = sim
        .post(&format!("/batches/{id}:pause"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = sim
        .post("/batches/batch_missing:cancel")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "Some requested entity was not found");
}

#[tokio::test]
async fn expired_requests_stay_pending_until_cancelled() {
    let sim = TestSim::start(SimConfig {
        expire_rate: 1.0,
        expire_completed_fraction: 0.5,
        ..fast()
    })
    .await;
    let batch = sim.submit(jsonl(&chat_lines("ex", 4))).await;
    let id = batch["batch_id"].as_str().unwrap();
    let stuck = sim
        .wait_until(id, |batch| batch["state"]["num_success"] == 2)
        .await;
    // Well past batch_duration, the rest are still pending.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stuck_later = sim.batch(id).await;
    assert_eq!(stuck_later["state"], stuck["state"]);
    assert_eq!(stuck_later["state"]["num_pending"], 2);

    sim.post(&format!("/batches/{id}:cancel"))
        .send()
        .await
        .unwrap();
    let batch = sim.wait_done(id).await;
    assert_eq!(
        batch["state"],
        json!({"num_requests": 4, "num_pending": 0, "num_success": 2, "num_error": 0, "num_cancelled": 2})
    );
    let (rows, _) = sim.results(id, 10).await;
    // The first floor(4 * 0.5) lines in file order ran.
    for (i, custom_id) in ["ex-0", "ex-1", "ex-2", "ex-3"].iter().enumerate() {
        let result = &row(&rows, &json!(custom_id))["batch_result"];
        assert_eq!(result.get("response").is_some(), i < 2, "{custom_id}");
    }
    assert_eq!(sim.stats().await["requests_billed"], 2);
}

#[tokio::test]
async fn files_can_be_read_and_deleted() {
    let sim = TestSim::start(fast()).await;
    let text = jsonl(&chat_lines("d", 1));
    let form = multipart::Form::new().text("expires_after", "3600").part(
        "file",
        multipart::Part::text(text.clone()).file_name("d.jsonl"),
    );
    let file: Value = sim
        .post("/files")
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = file["id"].as_str().unwrap();
    assert_eq!(
        file["expires_at"].as_i64().unwrap() - file["created_at"].as_i64().unwrap(),
        3600
    );
    let retrieved: Value = sim
        .get(&format!("/files/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(retrieved, file);
    let content = sim
        .get(&format!("/files/{id}/content"))
        .send()
        .await
        .unwrap();
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
    assert_eq!(deleted, json!({"id": id, "deleted": true}));
    for path in [format!("/files/{id}"), format!("/files/{id}/content")] {
        let response = sim.get(&path).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    }
    // A deleted (or unknown) input file cannot start a batch.
    let response = sim.create(id).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "Some requested entity was not found");
    assert_eq!(sim.stats().await["batches_created"], 0);

    // Bad uploads and create bodies get 400s.
    let form = multipart::Form::new().text("expires_after", "60").part(
        "file",
        multipart::Part::text(text.clone()).file_name("d.jsonl"),
    );
    let response = sim.post("/files").multipart(form).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let form =
        multipart::Form::new().part("file", multipart::Part::text(text).file_name("a;b.jsonl"));
    let response = sim.post("/files").multipart(form).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let response = sim
        .post("/batches")
        .json(&json!({"input_file_id": "file_x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("missing field `name`"));
}

#[tokio::test]
async fn an_input_file_deleted_before_validation_cancels_the_batch() {
    let sim = TestSim::start(SimConfig {
        validate_duration: Duration::from_millis(500),
        ..fast()
    })
    .await;
    let batch = sim.submit(jsonl(&chat_lines("gone", 1))).await;
    let file_id = batch["input_file_id"].as_str().unwrap();
    sim.client
        .delete(sim.url(&format!("/files/{file_id}")))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    let batch = sim.wait_done(batch["batch_id"].as_str().unwrap()).await;
    assert_eq!(
        batch["cancel_by_xai_message"],
        format!("JSONL file validation failed: input file {file_id} not found")
    );
}

#[tokio::test]
async fn mixed_endpoints_come_back_under_their_keys() {
    let sim = TestSim::start(fast()).await;
    let lines = [
        line("chat", CHAT, "grok-4.3", "hi"),
        json!({"custom_id": "img", "method": "POST", "url": "/v1/images/generations", "body": {"model": "grok-imagine-image", "prompt": "a cat", "n": 2}}),
        json!({"custom_id": "vid", "method": "POST", "url": "/v1/videos/generations", "body": {"model": "grok-imagine-video", "prompt": "a cat"}}),
    ];
    let batch = sim.submit(jsonl(&lines)).await;
    let batch = sim.wait_done(batch["batch_id"].as_str().unwrap()).await;
    assert_eq!(batch["state"]["num_success"], 3);
    let (rows, _) = sim.results(batch["batch_id"].as_str().unwrap(), 10).await;
    for (custom_id, key) in [
        ("chat", "chat_get_completion"),
        ("img", "image_generation"),
        ("vid", "video_generation"),
    ] {
        let response = &row(&rows, &json!(custom_id))["batch_result"]["response"];
        assert!(response[key].is_object(), "{custom_id}: {response}");
    }
    let total: i64 = rows
        .iter()
        .map(|row| row_cost(&row["batch_result"]["response"]))
        .sum();
    assert_eq!(batch["cost_breakdown"]["total_cost_usd_ticks"], total);
    assert_eq!(
        batch["cost_breakdown"]["endpoint_costs"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

#[tokio::test]
async fn http_faults_answer_in_xai_shapes() {
    let sim = TestSim::start(SimConfig {
        http_429_rate: 1.0,
        retry_after: Duration::from_millis(1500),
        ..fast()
    })
    .await;
    let response = sim.get("/batches").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "2");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "Some resource has been exhausted");
    assert!(body["error"].is_string());

    let sim = TestSim::start(SimConfig {
        http_5xx_rate: 1.0,
        ..fast()
    })
    .await;
    let first = sim.get("/batches").send().await.unwrap();
    assert_eq!(first.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body: Value = first.json().await.unwrap();
    assert_eq!(body["code"], "Internal error");
    let second = sim.get("/batches").send().await.unwrap();
    assert_eq!(second.status(), StatusCode::SERVICE_UNAVAILABLE);

    let sim = TestSim::start(SimConfig {
        ambiguous_create_rate: 1.0,
        ..fast()
    })
    .await;
    let file = sim.upload(jsonl(&chat_lines("amb", 1))).await;
    let response = sim.create(file["id"].as_str().unwrap()).await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let listed = sim.page("/batches", 10, None).await;
    let batches = listed["batches"].as_array().unwrap();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0]["name"], "bl-3-test");
    sim.wait_done(batches[0]["batch_id"].as_str().unwrap())
        .await;
    assert_eq!(sim.stats().await["custom_ids"]["amb-0"]["billed"], 1);
}

/// A simulator config that keeps its state in `dir`.
fn durable(dir: &tempfile::TempDir, config: SimConfig) -> SimConfig {
    SimConfig {
        data_dir: Some(dir.path().to_path_buf()),
        ..config
    }
}

impl TestSim {
    /// Every entry of `GET /batches/{id}/requests`, following the tokens.
    async fn request_metadata(&self, id: &str) -> Vec<Value> {
        let mut entries = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .page(&format!("/batches/{id}/requests"), 7, token.as_deref())
                .await;
            entries.extend(page["batch_request_metadata"].as_array().unwrap().clone());
            match page["pagination_token"].as_str() {
                Some(next) if !next.is_empty() => token = Some(next.to_owned()),
                _ => return entries,
            }
        }
    }
}

/// Each request has exactly one row, and the ledger billed exactly the
/// successes, once.
fn assert_one_row_each_billed_once(rows: &[Value], lines: &[Value], stats: &Value) {
    assert_eq!(rows.len(), lines.len());
    for line in lines {
        let custom_id = &line["custom_id"];
        let matching: Vec<&Value> = rows
            .iter()
            .filter(|row| row["batch_request_id"] == *custom_id)
            .collect();
        assert_eq!(matching.len(), 1, "{custom_id}");
        let billed = u64::from(matching[0]["batch_result"].get("response").is_some());
        assert_eq!(
            stats["custom_ids"][custom_id.as_str().unwrap()],
            json!({"submitted": 1, "billed": billed}),
            "{custom_id}"
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
            batch_duration: Duration::from_millis(1200),
            ..fast()
        },
    );
    let done_lines = chat_lines("done", 8);
    let mid_lines = chat_lines("mid", 30);
    let sim = TestSim::start(config.clone()).await;

    // One batch ends before the restart...
    let done = sim.submit(jsonl(&done_lines)).await;
    let done_id = done["batch_id"].as_str().unwrap().to_owned();
    let done = sim.wait_done(&done_id).await;
    let (done_rows, _) = sim.results(&done_id, 5).await;
    let done_requests = sim.request_metadata(&done_id).await;
    assert_eq!(done_requests.len(), 8);

    // ...the other is cut off after its first step.
    let mid = sim.submit(jsonl(&mid_lines)).await;
    let mid_id = mid["batch_id"].as_str().unwrap().to_owned();
    let cut = sim
        .wait_until(&mid_id, |batch| {
            batch["state"]["num_pending"]
                .as_u64()
                .is_some_and(|n| (1..30).contains(&n))
        })
        .await;
    sim.stop().await;

    let sim = TestSim::start(config.clone()).await;
    // The finished batch, its rows and its requests are as they were.
    assert_eq!(sim.batch(&done_id).await, done);
    assert_eq!(sim.results(&done_id, 5).await.0, done_rows);
    assert_eq!(sim.request_metadata(&done_id).await, done_requests);
    let file: Value = sim
        .get(&format!(
            "/files/{}",
            done["input_file_id"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(file["object"], "file");
    assert_eq!(file["bytes"], jsonl(&done_lines).len());

    // What the cut-off batch had done is still there.
    let batch = sim.batch(&mid_id).await;
    assert!(
        batch["state"]["num_pending"].as_u64() <= cut["state"]["num_pending"].as_u64(),
        "{batch}"
    );
    let page: Value = sim.page("/batches", 10, None).await;
    let listed: Vec<&str> = page["batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|batch| batch["batch_id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [mid_id.as_str(), done_id.as_str()]);

    // It carries on and ends as if nothing had happened.
    let mid = sim.wait_done(&mid_id).await;
    let failures = mid_lines
        .iter()
        .filter(|line| {
            injected_error(
                line["custom_id"].as_str().unwrap(),
                config.error_rate,
                config.seed,
            )
        })
        .count();
    assert_eq!(
        mid["state"],
        json!({"num_requests": 30, "num_pending": 0, "num_success": 30 - failures, "num_error": failures, "num_cancelled": 0})
    );
    let (rows, _) = sim.results(&mid_id, 7).await;
    let stats = sim.stats().await;
    assert_one_row_each_billed_once(&rows, &mid_lines, &stats);
    assert_one_row_each_billed_once(&done_rows, &done_lines, &stats);
    let total_cost: i64 = rows.iter().map(row_cost_of).sum();
    assert_eq!(mid["cost_breakdown"]["total_cost_usd_ticks"], total_cost);
    let requests = sim.request_metadata(&mid_id).await;
    assert_eq!(requests.len(), 30);
    for request in &requests {
        let row = row(&rows, &request["batch_request_id"]);
        let expected = if row["batch_result"].get("response").is_some() {
            "succeeded"
        } else {
            "failed"
        };
        assert_eq!(request["state"], expected, "{request}");
    }
    assert_eq!(stats["batches_created"], 2);
    assert_eq!(stats["requests_submitted"], 38);
}

/// A row's cost, as the batch's cost breakdown counts it.
fn row_cost_of(row: &Value) -> i64 {
    row["batch_result"].get("response").map_or(0, row_cost)
}

#[tokio::test]
async fn steps_run_again_after_a_restart_are_not_billed_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = durable(
        &dir,
        SimConfig {
            error_rate: 0.25,
            batch_duration: Duration::from_millis(1200),
            ..fast()
        },
    );
    let lines = chat_lines("again", 20);
    let sim = TestSim::start(config.clone()).await;
    let batch = sim.submit(jsonl(&lines)).await;
    let id = batch["batch_id"].as_str().unwrap().to_owned();

    // The record as it was after the first step: what a crash just after
    // the billing of each later step, before its commit was saved, leaves.
    let path = dir.path().join("xai/batches").join(format!("{id}.json"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let after_first = loop {
        assert!(tokio::time::Instant::now() < deadline, "no first step");
        let bytes = std::fs::read(&path).unwrap();
        let record: Value = serde_json::from_slice(&bytes).unwrap();
        if record["life"]["steps"].as_array().map(Vec::len) == Some(1)
            && record["life"]["pending"].is_null()
        {
            break bytes;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let first = sim.wait_done(&id).await;
    let stats = sim.stats().await;
    sim.stop().await;
    std::fs::write(&path, after_first).unwrap();

    let sim = TestSim::start(config).await;
    let again = sim.wait_done(&id).await;
    assert_eq!(again["state"], first["state"]);
    assert_eq!(
        again["cost_breakdown"]["total_cost_usd_ticks"],
        first["cost_breakdown"]["total_cost_usd_ticks"]
    );
    let (rows, _) = sim.results(&id, 6).await;
    // The ledger is exactly what it was before the restart.
    assert_eq!(sim.stats().await, stats);
    assert_one_row_each_billed_once(&rows, &lines, &stats);
}

#[tokio::test]
async fn requests_left_pending_can_be_cancelled_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = durable(
        &dir,
        SimConfig {
            expire_rate: 1.0,
            expire_completed_fraction: 0.5,
            ..fast()
        },
    );
    let sim = TestSim::start(config.clone()).await;
    let batch = sim.submit(jsonl(&chat_lines("ex", 4))).await;
    let id = batch["batch_id"].as_str().unwrap().to_owned();
    sim.wait_until(&id, |batch| batch["state"]["num_success"] == 2)
        .await;
    sim.stop().await;

    let sim = TestSim::start(config).await;
    let stuck = sim.batch(&id).await;
    assert_eq!(stuck["state"]["num_pending"], 2, "{stuck}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(sim.batch(&id).await["state"], stuck["state"]);
    let response = sim
        .post(&format!("/batches/{id}:cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let batch = sim.wait_done(&id).await;
    assert_eq!(
        batch["state"],
        json!({"num_requests": 4, "num_pending": 0, "num_success": 2, "num_error": 0, "num_cancelled": 2})
    );
    let (rows, _) = sim.results(&id, 10).await;
    assert_eq!(rows.len(), 4);
    assert_eq!(sim.stats().await["requests_billed"], 2);
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
    let batch = sim.submit(jsonl(&chat_lines("slow", 2))).await;
    sim.page("/batches", 10, None).await;
    // Uploads, creates and lists are not status calls.
    assert!(started.elapsed() < delay, "{:?}", started.elapsed());

    let started = tokio::time::Instant::now();
    let polled = sim.batch(batch["batch_id"].as_str().unwrap()).await;
    assert!(started.elapsed() >= delay, "{:?}", started.elapsed());
    assert_eq!(polled["batch_id"], batch["batch_id"]);
}
