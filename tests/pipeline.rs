//! End-to-end tests of the vertical slice on a real broker with the
//! simulator: every custom_id in comes out exactly once, with the status,
//! content and usage the simulator determines.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use batchline::config::{ByteSize, ProviderKind};
use batchline::sim::openai::{chat_reply, injected_error};
use common::*;

/// Asserts a succeeded chat result carries exactly what the simulator
/// answers for its request.
fn assert_chat_success(result: &serde_json::Value, request: &serde_json::Value) {
    assert_chat_success_at(result, request, 1);
}

/// As [`assert_chat_success`], for a request that succeeded in its
/// `attempt`-th batch.
fn assert_chat_success_at(result: &serde_json::Value, request: &serde_json::Value, attempt: u64) {
    assert_eq!(result["status"], "succeeded", "{result}");
    let (content, finish) = chat_reply(&request["body"]);
    assert_eq!(
        result["content"].as_str(),
        Some(content.as_str()),
        "{result}"
    );
    assert_eq!(result["finish_reason"].as_str(), Some(finish));
    assert_eq!(result["model"], request["body"]["model"]);
    assert_eq!(result["provider"], request["provider"]);
    assert_eq!(result["metadata"], request["metadata"]);
    assert!(result["error"].is_null());
    let usage = &result["usage"];
    assert!(usage["input_tokens"].as_u64().unwrap() > 0, "{result}");
    assert!(usage["output_tokens"].as_u64().unwrap() > 0, "{result}");
    assert_eq!(
        result["response"]["choices"][0]["message"]["content"].as_str(),
        Some(content.as_str())
    );
    assert!(result["batch_id"].as_str().unwrap().starts_with("batch_"));
    assert_eq!(result["attempt"], attempt, "{result}");
    for t in ["received_at", "submitted_at", "ended_at"] {
        assert!(result["timings"][t].is_string(), "{t} missing: {result}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_thousand_requests_over_four_partitions_and_two_models() {
    let sim = Sim::start(SimConfig::default()).await;
    let topics = Topics::create(4).await;
    let spool = tempfile::tempdir().unwrap();
    let mut cfg = test_config(&topics, &sim.openai_url(), spool.path());
    cfg.window.max_requests = Some(400);
    let batchline = Batchline::start(cfg);

    let request_schema = schema("request.schema.json");
    let result_schema = schema("result.schema.json");
    let mut requests = HashMap::new();
    let mut records = Vec::new();
    for i in 0..5000 {
        let id = format!("req-{i:05}");
        let model = if i % 2 == 0 { "gpt-4o-mini" } else { "gpt-4o" };
        let request = chat_request(
            &id,
            "openai",
            model,
            &format!("Summarise ticket {i} in one line"),
        );
        assert_valid(&request_schema, &request);
        records.push(Produce::json(&id, &request));
        requests.insert(id, request);
    }
    produce(&topics.requests, &records).await;
    let expected: HashSet<String> = requests.keys().cloned().collect();
    wait_for_keys(&topics.results, &expected, RESULT_TIMEOUT);
    batchline.stop().await;

    let results = exactly_once(&read_all(&topics.results).await);
    assert_eq!(results.len(), 5000);
    let mut partitions = HashSet::new();
    let mut batches: HashMap<String, (String, i64)> = HashMap::new();
    for (id, result) in &results {
        assert_valid(&result_schema, result);
        assert_chat_success(result, &requests[id]);
        assert_eq!(result["source"]["topic"], topics.requests.as_str());
        let partition = result["source"]["partition"].as_i64().unwrap();
        partitions.insert(partition);
        // A batch holds one partition's requests of one model.
        let batch = result["batch_id"].as_str().unwrap().to_owned();
        let model = result["model"].as_str().unwrap().to_owned();
        let seen = batches.entry(batch).or_insert((model.clone(), partition));
        assert_eq!(*seen, (model, partition));
        assert!(
            result["cost_usd"].as_f64().unwrap() > 0.0,
            "priced model has a cost: {result}"
        );
    }
    assert_eq!(partitions.len(), 4);
    assert!(read_all(&topics.dlq).await.is_empty());

    // Nothing was paid twice, and offsets were committed to the end.
    let stats = sim.stats().await;
    for id in requests.keys() {
        assert_eq!(stats["custom_ids"][id]["billed"], 1, "{id}");
    }
    let committed: i64 = committed(&topics.group, &topics.requests, 4).values().sum();
    assert_eq!(committed, 5000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn windows_flush_on_size_on_bytes_and_on_time() {
    let sim = Sim::start(SimConfig::default()).await;
    let topics = Topics::create(1).await;
    let spool = tempfile::tempdir().unwrap();
    let mut cfg = test_config(&topics, &sim.openai_url(), spool.path());
    cfg.window.max_wait = Duration::from_secs(600);
    let line_bytes = batchline::packer::encode_line(
        ProviderKind::Openai,
        "/v1/chat/completions",
        "bybytes-000",
        &serde_json::value::to_raw_value(
            &chat_request("bybytes-000", "bybytes", "gpt-4o-mini", "size 0")["body"],
        )
        .unwrap(),
    )
    .len() as u64;
    let mut by_size = provider(&sim.openai_url());
    by_size.max_requests = Some(10);
    let mut by_bytes = provider(&sim.openai_url());
    by_bytes.max_bytes = Some(ByteSize(line_bytes * 3));
    let mut by_time = provider(&sim.openai_url());
    by_time.max_wait = Some(Duration::from_millis(800));
    cfg.providers.insert("bysize".into(), by_size);
    cfg.providers.insert("bybytes".into(), by_bytes);
    cfg.providers.insert("bytime".into(), by_time);
    let batchline = Batchline::start(cfg);

    let mut records = Vec::new();
    let mut expected = HashSet::new();
    for (provider, n) in [("bysize", 30), ("bybytes", 9), ("bytime", 5)] {
        for i in 0..n {
            let id = format!("{provider}-{i:03}");
            records.push(Produce::json(
                &id,
                &chat_request(&id, provider, "gpt-4o-mini", &format!("size {i}")),
            ));
            expected.insert(id);
        }
    }
    produce(&topics.requests, &records).await;
    wait_for_keys(&topics.results, &expected, RESULT_TIMEOUT);
    batchline.stop().await;

    let results = exactly_once(&read_all(&topics.results).await);
    let mut batch_sizes: BTreeMap<&str, BTreeMap<String, usize>> = BTreeMap::new();
    for r in results.values() {
        assert_eq!(r["status"], "succeeded", "{r}");
        *batch_sizes
            .entry(r["provider"].as_str().unwrap())
            .or_default()
            .entry(r["batch_id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let sizes = |p: &str| -> Vec<usize> { batch_sizes[p].values().copied().collect() };
    // Size: 30 requests, windows of 10, all sealed because full (max_wait is 10 min).
    assert_eq!(sizes("bysize"), vec![10, 10, 10]);
    // Bytes: exactly 3 lines fit, so 9 requests make 3 full windows.
    assert_eq!(sizes("bybytes"), vec![3, 3, 3]);
    // Time: 5 requests, far below every limit, sealed by the route's max_wait.
    assert_eq!(sizes("bytime"), vec![5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_rejected_to_the_dlq_and_good_input_around_it_succeeds() {
    let sim = Sim::start(SimConfig::default()).await;
    let topics = Topics::create(1).await;
    let spool = tempfile::tempdir().unwrap();
    let mut cfg = test_config(&topics, &sim.openai_url(), spool.path());
    let mut disabled = provider(&sim.openai_url());
    disabled.api_key = None;
    disabled.api_key_env = Some("BATCHLINE_TEST_UNSET_KEY".into());
    cfg.providers.insert("nokey".into(), disabled);
    // Long enough that good-1 and its twin share a window.
    cfg.window.max_wait = Duration::from_secs(3);
    let mut small = provider(&sim.openai_url());
    small.max_bytes = Some(ByteSize(400));
    cfg.providers.insert("small".into(), small);
    let batchline = Batchline::start(cfg);

    let good = |i: usize| {
        let id = format!("good-{i}");
        Produce::json(
            &id,
            &chat_request(&id, "openai", "gpt-4o-mini", &format!("hello {i}")),
        )
    };
    let json = |v: serde_json::Value| serde_json::to_vec(&v).unwrap();
    /// Key, value, expected error type, and the custom_id a rejected result
    /// is addressed to.
    type Bad<'a> = (Option<&'a str>, Vec<u8>, &'a str, Option<&'a str>);
    let bad: Vec<Bad<'_>> = vec![
        (
            Some("bad-utf8"),
            b"{\"custom_id\":\"x\xff\"}".to_vec(),
            "invalid_utf8",
            Some("bad-utf8"),
        ),
        (
            Some("bad-json"),
            b"{not json".to_vec(),
            "invalid_json",
            Some("bad-json"),
        ),
        (None, b"[1,2,3]".to_vec(), "invalid_json", None),
        (
            Some("no-id-key"),
            json(serde_json::json!({"body": {"model": "gpt-4o-mini"}})),
            "missing_custom_id",
            Some("no-id-key"),
        ),
        (
            None,
            json(serde_json::json!({"custom_id": "has spaces", "body": {"model": "m"}})),
            "invalid_custom_id",
            None,
        ),
        (
            None,
            json(serde_json::json!({"custom_id": "x".repeat(65), "body": {"model": "m"}})),
            "invalid_custom_id",
            None,
        ),
        (
            Some("good-1"),
            json(chat_request("good-1", "openai", "gpt-4o-mini", "twin")),
            "duplicate_custom_id",
            Some("good-1"),
        ),
        (
            None,
            json(chat_request("unknown-prov", "nosuch", "gpt-4o-mini", "x")),
            "unknown_provider",
            Some("unknown-prov"),
        ),
        (
            None,
            json(chat_request("disabled-prov", "nokey", "gpt-4o-mini", "x")),
            "provider_disabled",
            Some("disabled-prov"),
        ),
        (
            None,
            json(
                serde_json::json!({"custom_id": "no-model", "provider": "openai", "body": {"messages": []}}),
            ),
            "invalid_body",
            Some("no-model"),
        ),
        (
            None,
            json(
                serde_json::json!({"custom_id": "body-text", "provider": "openai", "body": "hello"}),
            ),
            "invalid_body",
            Some("body-text"),
        ),
        (
            None,
            json(
                serde_json::json!({"custom_id": "bad-endpoint", "provider": "openai", "endpoint": "/v1/messages", "body": {"model": "m"}}),
            ),
            "unsupported_endpoint",
            Some("bad-endpoint"),
        ),
        (
            None,
            json(chat_request(
                "too-large",
                "small",
                "gpt-4o-mini",
                &"long ".repeat(200),
            )),
            "too_large",
            Some("too-large"),
        ),
    ];
    let mut records = Vec::new();
    let mut good_ids = HashSet::new();
    for (i, (key, value, _, _)) in bad.iter().enumerate() {
        records.push(good(i));
        good_ids.insert(format!("good-{i}"));
        records.push(Produce::raw(*key, value));
    }
    records.push(good(bad.len()));
    good_ids.insert(format!("good-{}", bad.len()));
    produce(&topics.requests, &records).await;

    let mut expected = good_ids.clone();
    expected.extend(
        bad.iter()
            .filter_map(|b| b.3)
            .filter(|id| *id != "good-1")
            .map(str::to_owned),
    );
    wait_for_keys(&topics.results, &expected, RESULT_TIMEOUT);
    batchline.stop().await;

    let result_schema = schema("result.schema.json");
    let results = read_all(&topics.results).await;
    for r in &results {
        assert_valid(&result_schema, &r.json());
    }
    // Every good request succeeded, once; good-1 also has its twin's rejection.
    let mut by_id: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
    for r in &results {
        by_id
            .entry(r.key_str().to_owned())
            .or_default()
            .push(r.json());
    }
    for id in &good_ids {
        let succeeded = by_id[id]
            .iter()
            .filter(|v| v["status"] == "succeeded")
            .count();
        assert_eq!(succeeded, 1, "{id}: {:?}", by_id[id]);
    }
    for (_, _, kind, id) in &bad {
        let Some(id) = id else { continue };
        let rejected: Vec<_> = by_id[*id]
            .iter()
            .filter(|v| v["status"] == "rejected")
            .collect();
        assert_eq!(rejected.len(), 1, "{id}: {:?}", by_id[*id]);
        assert_eq!(rejected[0]["error"]["type"], *kind, "{id}");
        assert!(!rejected[0]["error"]["message"].as_str().unwrap().is_empty());
    }
    // The DLQ holds every bad message, byte for byte, with its key and why.
    let dlq = read_all(&topics.dlq).await;
    assert_eq!(dlq.len(), bad.len());
    for (record, (key, value, kind, _)) in dlq.iter().zip(&bad) {
        assert_eq!(record.value.as_deref(), Some(value.as_slice()));
        assert_eq!(record.key.as_deref(), key.map(str::as_bytes));
        assert_eq!(record.headers["batchline.error.type"], *kind);
        assert!(!record.headers["batchline.error.message"].is_empty());
        assert_eq!(record.headers["batchline.source.topic"], topics.requests);
        assert_eq!(record.headers["batchline.source.partition"], "0");
        assert!(
            record.headers["batchline.source.offset"]
                .parse::<i64>()
                .unwrap()
                > 0
        );
    }
    let committed = committed(&topics.group, &topics.requests, 1);
    assert_eq!(committed[&0], records.len() as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn provider_faults_give_the_right_statuses() {
    let seed = 7;
    let errors = Sim::start(SimConfig {
        error_rate: 0.2,
        seed,
        ..SimConfig::default()
    })
    .await;
    let failing = Sim::start(SimConfig {
        fail_rate: 1.0,
        ..SimConfig::default()
    })
    .await;
    let expiring_sim = Sim::start(SimConfig {
        expire_rate: 1.0,
        expire_completed_fraction: 0.5,
        ..SimConfig::default()
    })
    .await;
    let splitting = Sim::start(SimConfig {
        token_limit_rate: 0.5,
        seed,
        ..SimConfig::default()
    })
    .await;
    let invalid = Sim::start(SimConfig {
        invalid_line_rate: 0.05,
        seed,
        ..SimConfig::default()
    })
    .await;
    let flaky = Sim::start(SimConfig {
        http_429_rate: 0.2,
        http_5xx_rate: 0.1,
        ambiguous_create_rate: 0.2,
        seed,
        ..SimConfig::default()
    })
    .await;
    let topics = Topics::create(2).await;
    let spool = tempfile::tempdir().unwrap();
    let mut cfg = test_config(&topics, &errors.openai_url(), spool.path());
    cfg.window.max_requests = Some(50);
    cfg.providers
        .insert("failing".into(), provider(&failing.openai_url()));
    cfg.providers
        .insert("expiring".into(), provider(&expiring_sim.openai_url()));
    cfg.providers
        .insert("flaky".into(), provider(&flaky.openai_url()));
    cfg.providers
        .insert("splitting".into(), provider(&splitting.openai_url()));
    cfg.providers
        .insert("invalid".into(), provider(&invalid.openai_url()));
    let batchline = Batchline::start(cfg);

    let mut records = Vec::new();
    let mut requests = HashMap::new();
    for provider in [
        "openai",
        "failing",
        "expiring",
        "flaky",
        "splitting",
        "invalid",
    ] {
        for i in 0..200 {
            let id = format!("{provider}-{i:03}");
            let request = chat_request(&id, provider, "gpt-4o-mini", &format!("question {i}"));
            records.push(Produce::json(&id, &request));
            requests.insert(id, request);
        }
    }
    produce(&topics.requests, &records).await;
    let expected: HashSet<String> = requests.keys().cloned().collect();
    wait_for_keys(&topics.results, &expected, RESULT_TIMEOUT);
    batchline.stop().await;

    let results = exactly_once(&read_all(&topics.results).await);
    assert_eq!(results.len(), 1200);
    let result_schema = schema("result.schema.json");
    // Expiring: (successes by attempt, expired).
    let mut expiring: (HashMap<u64, usize>, usize) = Default::default();
    for (id, r) in &results {
        assert_valid(&result_schema, r);
        match r["provider"].as_str().unwrap() {
            // Per-request errors hit exactly the requests the simulator picks.
            "openai" => {
                if injected_error(id, 0.2, seed) {
                    assert_eq!(r["status"], "errored", "{r}");
                    assert!(r["error"]["type"].is_string());
                    assert!(!r["error"]["message"].as_str().unwrap().is_empty());
                    assert!(
                        r["response"]["error"].is_object(),
                        "the provider's error body is kept: {r}"
                    );
                } else {
                    assert_chat_success(r, &requests[id]);
                }
            }
            // A failed batch errors every request with the provider's message.
            "failing" => {
                assert_eq!(r["status"], "errored", "{r}");
                assert!(!r["error"]["message"].as_str().unwrap().is_empty(), "{r}");
                assert!(r["batch_id"].as_str().unwrap().starts_with("batch_"));
            }
            // An expired batch keeps its billed successes; the rest go to a
            // new batch until retry.max_attempts (3) are spent.
            "expiring" => {
                let attempt = r["attempt"].as_u64().unwrap();
                match r["status"].as_str().unwrap() {
                    "succeeded" => {
                        assert_chat_success_at(r, &requests[id], attempt);
                        *expiring.0.entry(attempt).or_default() += 1;
                    }
                    "expired" => {
                        assert_eq!(r["error"]["type"], "batch_expired", "{r}");
                        assert_eq!(attempt, 3, "expired only once every attempt is spent: {r}");
                        expiring.1 += 1;
                    }
                    other => panic!("unexpected status {other}: {r}"),
                }
            }
            // Batches failed for the enqueued token limit are split and
            // sent again, without spending an attempt: all succeed.
            "splitting" => assert_chat_success(r, &requests[id]),
            // A batch failed for a named line errors that line and sends
            // the rest again, without spending an attempt.
            "invalid" => {
                if batchline::sim::openai::invalid_line(id, 0.05, seed) {
                    assert_eq!(r["status"], "errored", "{r}");
                    assert_eq!(r["error"]["type"], "invalid_value", "{r}");
                    assert_eq!(r["attempt"], 1, "{r}");
                } else {
                    assert_chat_success(r, &requests[id]);
                }
            }
            // 429s, 5xx and ambiguous creates are retried or resolved: all succeed.
            "flaky" => assert_chat_success(r, &requests[id]),
            other => panic!("unexpected provider {other}"),
        }
    }
    assert!(results
        .values()
        .any(|r| r["provider"] == "openai" && r["status"] == "errored"));
    // Half of each batch ran before it expired: 200 -> 100 + 50 + 25
    // successes (give or take a request per odd batch), the rest expired.
    let (by_attempt, expired) = &expiring;
    assert!(
        by_attempt.keys().all(|a| (1..=3).contains(a)),
        "{by_attempt:?}"
    );
    for attempt in 1..=3 {
        assert!(
            by_attempt.get(&attempt).copied().unwrap_or(0) > 0,
            "{by_attempt:?}"
        );
    }
    assert!(
        *expired > 0 && *expired < 50,
        "{expired} expired, {by_attempt:?}"
    );
    // A success is billed once, an expired request never, however many
    // batches it went through.
    let stats = expiring_sim.stats().await;
    for (id, r) in results.iter().filter(|(_, r)| r["provider"] == "expiring") {
        let billed = stats["custom_ids"][id]["billed"].as_u64().unwrap_or(0);
        assert_eq!(billed, u64::from(r["status"] == "succeeded"), "{id}: {r}");
    }
    let stats = splitting.stats().await;
    for i in 0..200 {
        assert_eq!(
            stats["custom_ids"][format!("splitting-{i:03}")]["billed"],
            1
        );
    }
    // Ambiguous creates never billed a request twice.
    let stats = flaky.stats().await;
    for i in 0..200 {
        assert_eq!(stats["custom_ids"][format!("flaky-{i:03}")]["billed"], 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_resumes_from_committed_offsets_without_republishing() {
    let sim = Sim::start(SimConfig::default()).await;
    let topics = Topics::create(2).await;
    let spool = tempfile::tempdir().unwrap();
    let cfg = test_config(&topics, &sim.openai_url(), spool.path());

    let batch = |from: usize, to: usize| -> (Vec<Produce>, HashSet<String>) {
        let ids: Vec<String> = (from..to).map(|i| format!("restart-{i:04}")).collect();
        let records = ids
            .iter()
            .map(|id| Produce::json(id, &chat_request(id, "openai", "gpt-4o-mini", id)))
            .collect();
        (records, ids.into_iter().collect())
    };
    let (first, first_ids) = batch(0, 300);
    let batchline = Batchline::start(cfg.clone());
    produce(&topics.requests, &first).await;
    wait_for_keys(&topics.results, &first_ids, RESULT_TIMEOUT);
    batchline.stop().await;
    let after_first = committed(&topics.group, &topics.requests, 2);
    assert_eq!(after_first.values().sum::<i64>(), 300);

    let (second, second_ids) = batch(300, 500);
    produce(&topics.requests, &second).await;
    let batchline = Batchline::start(cfg);
    wait_for_keys(&topics.results, &second_ids, RESULT_TIMEOUT);
    batchline.stop().await;

    let results = exactly_once(&read_all(&topics.results).await);
    assert_eq!(results.len(), 500);
    assert!(results.values().all(|r| r["status"] == "succeeded"));
    assert_eq!(
        committed(&topics.group, &topics.requests, 2)
            .values()
            .sum::<i64>(),
        500
    );
    let stats = sim.stats().await;
    assert_eq!(stats["requests_billed"], 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_journal_keeps_only_open_batches_live() {
    // Every batch writes its phases to the state topic and, once a
    // confirmed commit passes it, tombstones them: after a clean run only
    // the owner's claim and mark stay live (DESIGN.md "Offsets, marks,
    // tombstones").
    let sim = Sim::start(SimConfig::default()).await;
    let topics = Topics::create(2).await;
    let spool = tempfile::tempdir().unwrap();
    let mut cfg = test_config(&topics, &sim.openai_url(), spool.path());
    cfg.window.max_requests = Some(50);
    let records: Vec<Produce> = (0..400)
        .map(|i| {
            let id = format!("journal-{i:04}");
            Produce::json(&id, &chat_request(&id, "openai", "gpt-4o-mini", "hi"))
        })
        .collect();
    let expected: HashSet<String> = records
        .iter()
        .map(|r| String::from_utf8(r.key.clone().unwrap()).unwrap())
        .collect();
    let batchline = Batchline::start(cfg);
    produce(&topics.requests, &records).await;
    wait_for_keys(&topics.results, &expected, RESULT_TIMEOUT);
    batchline.stop().await;

    let mut latest: BTreeMap<String, Option<serde_json::Value>> = BTreeMap::new();
    for r in read_all(&topics.state).await {
        let value = r
            .value
            .as_deref()
            .map(|v| serde_json::from_slice(v).expect("journal records are JSON"));
        latest.insert(r.key_str().to_owned(), value);
    }
    let phases = |phase: &str| {
        latest
            .keys()
            .filter(|k| k.split('/').nth(1) == Some(phase))
            .count()
    };
    // 400 requests in windows of 50: at least 8 batches went through.
    assert!(phases("intent") >= 8, "{latest:#?}");
    assert_eq!(phases("intent"), phases("uploaded"));
    assert_eq!(phases("intent"), phases("submitted"));
    assert_eq!(phases("intent"), phases("done"));
    let live: Vec<&String> = latest
        .iter()
        .filter(|(_, v)| v.is_some())
        .map(|(k, _)| k)
        .collect();
    assert!(
        live.iter()
            .all(|k| k.contains("/claim/") || k.contains("/mark/")),
        "only claims and marks stay live: {live:#?}"
    );
    assert!(live.iter().any(|k| k.contains("/mark/")), "{live:#?}");
    let done = latest
        .iter()
        .find(|(k, _)| k.contains("/done/"))
        .map(|(k, _)| k)
        .unwrap();
    assert!(latest[done].is_none(), "{done} is tombstoned");
}
