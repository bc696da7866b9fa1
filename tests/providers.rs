//! End-to-end tests of the Anthropic and xAI adapters, named
//! OpenAI-compatible providers and a mixed deployment, on a real broker with
//! the simulator.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use batchline::config::{ApiKey, ProviderConfig, ProviderKind};
use batchline::sim::anthropic::message_reply;
use batchline::sim::openai::{chat_reply, dropped_result, injected_error};
use common::*;

fn kind_provider(kind: ProviderKind, base_url: &str) -> ProviderConfig {
    let mut p = provider(base_url);
    p.kind = kind;
    p
}

fn anthropic_url(sim: &Sim) -> String {
    format!("http://{}/anthropic/v1", sim.addr)
}

fn xai_url(sim: &Sim) -> String {
    format!("http://{}/xai/v1", sim.addr)
}

/// Requests for `provider` and `model`, keyed by custom_id.
fn requests(
    prefix: &str,
    provider: &str,
    model: &str,
    n: usize,
) -> (Vec<Produce>, HashMap<String, serde_json::Value>) {
    let mut records = Vec::new();
    let mut by_id = HashMap::new();
    for i in 0..n {
        let id = format!("{prefix}-{i:05}");
        // Some replies are cut by max_tokens, to see `length` come back.
        let mut request = chat_request(
            &id,
            provider,
            model,
            &format!("Explain item {i} of the catalogue briefly"),
        );
        if i % 7 == 0 {
            request["body"]["max_tokens"] = 3.into();
        }
        records.push(Produce::json(&id, &request));
        by_id.insert(id, request);
    }
    (records, by_id)
}

async fn run_to_completion(
    cfg: batchline::config::Config,
    topics: &Topics,
    records: &[Produce],
) -> HashMap<String, serde_json::Value> {
    let expected: HashSet<String> = records
        .iter()
        .map(|r| String::from_utf8(r.key.clone().unwrap()).unwrap())
        .collect();
    let batchline = Batchline::start(cfg);
    produce(&topics.requests, records).await;
    wait_for_keys(&topics.results, &expected, RESULT_TIMEOUT);
    batchline.stop().await;
    let results = exactly_once(&read_all(&topics.results).await);
    assert_eq!(results.len(), expected.len());
    let schema = schema("result.schema.json");
    for r in results.values() {
        assert_valid(&schema, r);
    }
    results
}

fn assert_anthropic_success(r: &serde_json::Value, request: &serde_json::Value) {
    assert_eq!(r["status"], "succeeded", "{r}");
    let (text, stop_reason) = message_reply(&request["body"]);
    assert_eq!(r["content"].as_str(), Some(text.as_str()), "{r}");
    assert_eq!(r["response"]["stop_reason"], stop_reason);
    let expected_finish = if stop_reason == "max_tokens" {
        "length"
    } else {
        "stop"
    };
    assert_eq!(r["finish_reason"], expected_finish, "{r}");
    assert_eq!(r["provider"], request["provider"]);
    assert_eq!(r["metadata"], request["metadata"]);
    assert!(r["usage"]["input_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        r["usage"]["output_tokens"].as_u64().unwrap(),
        r["response"]["usage"]["output_tokens"].as_u64().unwrap()
    );
    assert!(
        r["batch_id"].as_str().unwrap().starts_with("msgbatch_"),
        "{r}"
    );
}

fn assert_xai_success(r: &serde_json::Value, request: &serde_json::Value) {
    assert_eq!(r["status"], "succeeded", "{r}");
    let (text, finish) = chat_reply(&request["body"]);
    assert_eq!(r["content"].as_str(), Some(text.as_str()), "{r}");
    assert_eq!(r["finish_reason"], finish);
    let usage = &r["response"]["usage"];
    let reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(
        r["usage"]["output_tokens"].as_u64().unwrap(),
        usage["completion_tokens"].as_u64().unwrap() + reasoning,
        "xAI reasoning tokens are billed as output: {r}"
    );
    let ticks = usage["cost_in_usd_ticks"].as_u64().unwrap();
    let cost = r["cost_usd"].as_f64().unwrap();
    assert!(
        (cost - ticks as f64 / 1e10).abs() < 1e-15,
        "cost comes from xAI's ticks: {r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn anthropic_end_to_end_with_per_request_errors() {
    let seed = 11;
    let sim = Sim::start(SimConfig {
        error_rate: 0.1,
        seed,
        ..SimConfig::default()
    })
    .await;
    let topics = Topics::create(4).await;
    let spool = tempfile::tempdir().unwrap();
    let mut cfg = test_config(&topics, &sim.openai_url(), spool.path());
    cfg.window.max_requests = Some(300);
    cfg.providers.insert(
        "anthropic".into(),
        kind_provider(ProviderKind::Anthropic, &anthropic_url(&sim)),
    );
    let (records, by_id) = requests("anth", "anthropic", "claude-haiku-4-5", 2000);
    let results = run_to_completion(cfg, &topics, &records).await;

    let mut errored = 0;
    for (id, r) in &results {
        if injected_error(id, 0.1, seed) {
            errored += 1;
            assert_eq!(r["status"], "errored", "{r}");
            let kind = r["error"]["type"].as_str().unwrap();
            assert!(
                kind == "invalid_request_error"
                    || kind == "api_error"
                    || kind == "overloaded_error",
                "{r}"
            );
            assert!(!r["error"]["message"].as_str().unwrap().is_empty());
        } else {
            assert_anthropic_success(r, &by_id[id]);
            assert!(
                r["cost_usd"].as_f64().unwrap() > 0.0,
                "claude-haiku-4-5 is priced: {r}"
            );
        }
    }
    assert!(errored > 100, "{errored}");
    let stats = sim.stats().await;
    for id in by_id.keys() {
        let billed = stats["custom_ids"][id]["billed"].as_u64().unwrap_or(0);
        assert_eq!(billed, u64::from(!injected_error(id, 0.1, seed)), "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn anthropic_expired_and_canceled_batches_keep_their_successes() {
    let expiring = Sim::start(SimConfig {
        expire_rate: 1.0,
        expire_completed_fraction: 0.5,
        ..SimConfig::default()
    })
    .await;
    // Batches that would take a minute: batchline's own deadline cancels them.
    let slow = Sim::start(SimConfig {
        batch_duration: Duration::from_secs(60),
        ..SimConfig::default()
    })
    .await;
    let topics = Topics::create(2).await;
    let spool = tempfile::tempdir().unwrap();
    let mut cfg = test_config(&topics, &expiring.openai_url(), spool.path());
    cfg.window.max_requests = Some(100);
    cfg.batch.deadline = Duration::from_secs(3);
    cfg.providers.insert(
        "expiring".into(),
        kind_provider(ProviderKind::Anthropic, &anthropic_url(&expiring)),
    );
    cfg.providers.insert(
        "slow".into(),
        kind_provider(ProviderKind::Anthropic, &anthropic_url(&slow)),
    );
    let (mut records, mut by_id) = requests("exp", "expiring", "claude-haiku-4-5", 1000);
    let (slow_records, slow_ids) = requests("slow", "slow", "claude-haiku-4-5", 1000);
    records.extend(slow_records);
    by_id.extend(slow_ids);
    let results = run_to_completion(cfg, &topics, &records).await;

    let mut per_batch: HashMap<(String, String), (u64, u64)> = HashMap::new();
    for (id, r) in &results {
        let provider = r["provider"].as_str().unwrap().to_owned();
        let entry = per_batch
            .entry((provider.clone(), r["batch_id"].as_str().unwrap().to_owned()))
            .or_default();
        match (provider.as_str(), r["status"].as_str().unwrap()) {
            (_, "succeeded") => {
                assert_anthropic_success(r, &by_id[id]);
                entry.0 += 1;
            }
            ("expiring", "expired") | ("slow", "canceled") => {
                assert!(!r["error"]["type"].as_str().unwrap().is_empty(), "{r}");
                entry.1 += 1;
                // Expired requests go to new batches until every attempt is
                // spent; canceled ones (batchline's own deadline) never do.
                let last = if provider == "expiring" { 3 } else { 1 };
                assert_eq!(r["attempt"], last, "{r}");
            }
            (p, s) => panic!("{p} request ended {s}: {r}"),
        }
    }
    // Half of each batch ran before it expired; a batch's results are its
    // successes and, in the last attempt only, its expired requests.
    for ((provider, batch), (succeeded, failed)) in &per_batch {
        if provider == "expiring" && *failed > 0 {
            assert_eq!(*succeeded, (succeeded + failed) / 2, "{batch}");
        }
    }
    let stats = expiring.stats().await;
    for (id, r) in results.iter().filter(|(_, r)| r["provider"] == "expiring") {
        let billed = stats["custom_ids"][id]["billed"].as_u64().unwrap_or(0);
        assert_eq!(billed, u64::from(r["status"] == "succeeded"), "{id}: {r}");
    }
    assert!(results.values().any(|r| r["status"] == "canceled"));
    // Canceled requests were not billed; successes were billed once.
    let stats = slow.stats().await;
    for (id, r) in &results {
        if r["provider"] == "slow" {
            let billed = stats["custom_ids"][id]["billed"].as_u64().unwrap_or(0);
            assert_eq!(billed, u64::from(r["status"] == "succeeded"), "{id}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn xai_end_to_end_with_string_and_object_errors_and_provider_cost() {
    let seed = 5;
    let sim = Sim::start(SimConfig {
        error_rate: 0.1,
        seed,
        ..SimConfig::default()
    })
    .await;
    let topics = Topics::create(4).await;
    let spool = tempfile::tempdir().unwrap();
    let mut cfg = test_config(&topics, &sim.openai_url(), spool.path());
    cfg.window.max_requests = Some(300);
    cfg.providers.insert(
        "xai".into(),
        kind_provider(ProviderKind::Xai, &xai_url(&sim)),
    );
    let (records, by_id) = requests("xai", "xai", "grok-4.3", 2000);
    let results = run_to_completion(cfg, &topics, &records).await;

    for (id, r) in &results {
        if injected_error(id, 0.1, seed) {
            assert_eq!(r["status"], "errored", "{r}");
            assert!(
                !r["error"]["message"].as_str().unwrap().is_empty(),
                "the message is kept whole: {r}"
            );
        } else {
            assert_xai_success(r, &by_id[id]);
        }
    }
    let stats = sim.stats().await;
    for id in by_id.keys() {
        let billed = stats["custom_ids"][id]["billed"].as_u64().unwrap_or(0);
        assert_eq!(billed, u64::from(!injected_error(id, 0.1, seed)), "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn xai_requests_left_pending_are_canceled_at_the_local_deadline() {
    // xAI has no expiry of its own: requests can stay pending. batchline's
    // deadline cancels, and what never ran comes back `canceled`.
    let sim = Sim::start(SimConfig {
        expire_rate: 1.0,
        expire_completed_fraction: 0.5,
        ..SimConfig::default()
    })
    .await;
    let topics = Topics::create(1).await;
    let spool = tempfile::tempdir().unwrap();
    let mut cfg = test_config(&topics, &sim.openai_url(), spool.path());
    cfg.batch.deadline = Duration::from_secs(3);
    cfg.providers.insert(
        "xai".into(),
        kind_provider(ProviderKind::Xai, &xai_url(&sim)),
    );
    let (records, by_id) = requests("pend", "xai", "grok-4.3", 200);
    let results = run_to_completion(cfg, &topics, &records).await;

    let canceled = results
        .values()
        .filter(|r| r["status"] == "canceled")
        .count();
    assert!(canceled > 0);
    for (id, r) in &results {
        match r["status"].as_str().unwrap() {
            "succeeded" => assert_xai_success(r, &by_id[id]),
            "canceled" => assert!(!r["error"]["message"].as_str().unwrap().is_empty(), "{r}"),
            other => panic!("{other}: {r}"),
        }
    }
}

/// Scrapes batchline's metrics until `line` appears.
async fn wait_for_metric(addr: &str, line: &str) {
    let deadline = Instant::now() + RESULT_TIMEOUT;
    loop {
        let text = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .and_then(|r| r.error_for_status());
        if let Ok(resp) = text {
            if resp
                .text()
                .await
                .unwrap_or_default()
                .lines()
                .any(|l| l == line)
            {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "metric line `{line}` never appeared"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_key_holds_that_providers_requests_and_never_errors_them() {
    let guarded = Sim::start(SimConfig {
        api_key: Some("sk-right".into()),
        ..SimConfig::default()
    })
    .await;
    let open = Sim::start(SimConfig::default()).await;
    let topics = Topics::create(3).await;
    let spool = tempfile::tempdir().unwrap();
    let mut cfg = test_config(&topics, &open.openai_url(), spool.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let http = format!("127.0.0.1:{port}");
    cfg.http.listen = http.clone();
    cfg.shutdown.timeout = Duration::from_secs(2);
    let mut bad_anthropic = kind_provider(ProviderKind::Anthropic, &anthropic_url(&guarded));
    bad_anthropic.api_key = Some(ApiKey::new("sk-wrong"));
    let mut bad_xai = kind_provider(ProviderKind::Xai, &xai_url(&guarded));
    bad_xai.api_key = Some(ApiKey::new("xai-wrong"));
    cfg.providers.insert("badanthropic".into(), bad_anthropic);
    cfg.providers.insert("badxai".into(), bad_xai);
    let batchline = Batchline::start(cfg);

    let (good, good_ids) = requests("good", "openai", "gpt-4o-mini", 50);
    let (bad_a, _) = requests("bada", "badanthropic", "claude-haiku-4-5", 20);
    let (bad_x, _) = requests("badx", "badxai", "grok-4.3", 20);
    let mut records: Vec<Produce> = good.into_iter().map(|r| r.in_partition(0)).collect();
    records.extend(bad_a.into_iter().map(|r| r.in_partition(1)));
    records.extend(bad_x.into_iter().map(|r| r.in_partition(2)));
    produce(&topics.requests, &records).await;

    let good_keys: HashSet<String> = good_ids.keys().cloned().collect();
    wait_for_keys(&topics.results, &good_keys, RESULT_TIMEOUT);
    // Anthropic answers 401, xAI 400 "Incorrect API key": both are auth failures.
    wait_for_metric(
        &http,
        r#"batchline_provider_failing{provider="badanthropic"} 1"#,
    )
    .await;
    wait_for_metric(&http, r#"batchline_provider_failing{provider="badxai"} 1"#).await;
    batchline.stop().await;

    let results = exactly_once(&read_all(&topics.results).await);
    assert_eq!(
        results.len(),
        50,
        "held requests get no result: {:?}",
        results
            .keys()
            .filter(|k| !good_keys.contains(*k))
            .collect::<Vec<_>>()
    );
    let committed = committed(&topics.group, &topics.requests, 3);
    assert_eq!(committed.get(&0), Some(&50));
    // Held requests stay uncommitted: a restart with the right key answers them.
    assert!(committed.get(&1).is_none_or(|o| *o == 0), "{committed:?}");
    assert!(committed.get(&2).is_none_or(|o| *o == 0), "{committed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limits_server_errors_and_ambiguous_creates_at_every_provider() {
    // Ambiguous creates (created, then a 500) are found by tag at xAI and by
    // time, size and custom_ids at Anthropic: never billed twice.
    let sim = Sim::start(SimConfig {
        http_429_rate: 0.3,
        http_5xx_rate: 0.1,
        ambiguous_create_rate: 0.2,
        seed: 3,
        ..SimConfig::default()
    })
    .await;
    let topics = Topics::create(2).await;
    let spool = tempfile::tempdir().unwrap();
    let mut cfg = test_config(&topics, &sim.openai_url(), spool.path());
    cfg.window.max_requests = Some(100);
    cfg.providers.insert(
        "anthropic".into(),
        kind_provider(ProviderKind::Anthropic, &anthropic_url(&sim)),
    );
    cfg.providers.insert(
        "xai".into(),
        kind_provider(ProviderKind::Xai, &xai_url(&sim)),
    );
    let (mut records, mut by_id) = requests("rl-a", "anthropic", "claude-haiku-4-5", 400);
    let (x, xi) = requests("rl-x", "xai", "grok-4.3", 400);
    records.extend(x);
    by_id.extend(xi);
    let results = run_to_completion(cfg, &topics, &records).await;
    for (id, r) in &results {
        match r["provider"].as_str().unwrap() {
            "anthropic" => assert_anthropic_success(r, &by_id[id]),
            "xai" => assert_xai_success(r, &by_id[id]),
            other => panic!("{other}"),
        }
    }
    let stats = sim.stats().await;
    for id in by_id.keys() {
        assert_eq!(stats["custom_ids"][id]["billed"], 1, "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_topic_feeds_every_provider_and_a_named_compatible_one() {
    let sim = Sim::start(SimConfig::default()).await;
    let topics = Topics::create(4).await;
    let spool = tempfile::tempdir().unwrap();
    let mut cfg = test_config(&topics, &sim.openai_url(), spool.path());
    cfg.providers.insert(
        "anthropic".into(),
        kind_provider(ProviderKind::Anthropic, &anthropic_url(&sim)),
    );
    cfg.providers.insert(
        "xai".into(),
        kind_provider(ProviderKind::Xai, &xai_url(&sim)),
    );
    // A self-hosted OpenAI-compatible server at the plain /v1 path, with an
    // extra header as Azure needs.
    let mut local = provider(&format!("http://{}/v1", sim.addr));
    local.headers.insert("api-key".into(), "azure-style".into());
    cfg.providers.insert("local".into(), local);
    let mut records = Vec::new();
    let mut by_id = HashMap::new();
    for (provider, model) in [
        ("openai", "gpt-4o-mini"),
        ("anthropic", "claude-haiku-4-5"),
        ("xai", "grok-4.3"),
        ("local", "llama-3.1-8b"),
    ] {
        let (r, ids) = requests(&format!("mix-{provider}"), provider, model, 250);
        records.extend(r);
        by_id.extend(ids);
    }
    // Interleave providers on the topic.
    records.sort_by_key(|r| {
        r.key
            .clone()
            .unwrap()
            .into_iter()
            .rev()
            .collect::<Vec<u8>>()
    });
    let results = run_to_completion(cfg, &topics, &records).await;
    assert_eq!(results.len(), 1000);
    for (id, r) in &results {
        let request = &by_id[id];
        assert_eq!(r["provider"], request["provider"]);
        match r["provider"].as_str().unwrap() {
            "anthropic" => assert_anthropic_success(r, request),
            "xai" => assert_xai_success(r, request),
            _ => {
                assert_eq!(r["status"], "succeeded", "{r}");
                let (text, finish) = chat_reply(&request["body"]);
                assert_eq!(r["content"].as_str(), Some(text.as_str()));
                assert_eq!(r["finish_reason"], finish);
                assert!(r["usage"]["output_tokens"].as_u64().unwrap() > 0);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn results_a_provider_never_returns_are_errored_as_missing() {
    // Each provider loses about 5 % of the results of batches that end
    // normally: those requests come back `errored` with `missing_result`,
    // everything else `succeeded`, nothing twice.
    let (seed, rate) = (17, 0.05);
    let sim = Sim::start(SimConfig {
        drop_rate: rate,
        seed,
        ..SimConfig::default()
    })
    .await;
    let topics = Topics::create(3).await;
    let spool = tempfile::tempdir().unwrap();
    let mut cfg = test_config(&topics, &sim.openai_url(), spool.path());
    cfg.window.max_requests = Some(250);
    cfg.providers.insert(
        "anthropic".into(),
        kind_provider(ProviderKind::Anthropic, &anthropic_url(&sim)),
    );
    cfg.providers.insert(
        "xai".into(),
        kind_provider(ProviderKind::Xai, &xai_url(&sim)),
    );
    let mut records = Vec::new();
    let mut by_id = HashMap::new();
    for (provider, model) in [
        ("openai", "gpt-4o-mini"),
        ("anthropic", "claude-haiku-4-5"),
        ("xai", "grok-4.3"),
    ] {
        let (r, ids) = requests(&format!("lost-{provider}"), provider, model, 700);
        records.extend(r);
        by_id.extend(ids);
    }
    let results = run_to_completion(cfg, &topics, &records).await;

    let mut missing: HashMap<&str, usize> = HashMap::new();
    for (id, r) in &results {
        let request = &by_id[id];
        let provider = request["provider"].as_str().unwrap();
        assert_eq!(r["provider"], provider);
        if dropped_result(id, rate, seed) {
            *missing.entry(provider).or_default() += 1;
            assert_eq!(r["status"], "errored", "{r}");
            assert_eq!(r["error"]["type"], "missing_result", "{r}");
            assert!(r["content"].is_null(), "{r}");
            assert!(r["batch_id"].is_string(), "{r}");
            continue;
        }
        match provider {
            "anthropic" => assert_anthropic_success(r, request),
            "xai" => assert_xai_success(r, request),
            _ => {
                assert_eq!(r["status"], "succeeded", "{r}");
                let (text, _) = chat_reply(&request["body"]);
                assert_eq!(r["content"].as_str(), Some(text.as_str()));
            }
        }
    }
    for provider in ["openai", "anthropic", "xai"] {
        assert!(
            missing.get(provider).copied().unwrap_or(0) > 10,
            "{missing:?}"
        );
    }
    let stats = sim.stats().await;
    for id in by_id.keys() {
        let billed = stats["custom_ids"][id]["billed"].as_u64().unwrap_or(0);
        assert_eq!(billed, u64::from(!dropped_result(id, rate, seed)), "{id}");
    }
}
