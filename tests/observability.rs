//! What operators watch: batchline's `/metrics` after a real run on a real
//! broker with the simulator (counters agree with what the topics hold, and
//! `promtool check metrics` accepts the exposition), the Grafana dashboard
//! (every query names only metrics batchline exports), and the Prometheus
//! scrape configuration used by docker-compose.yml.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use batchline::collector::Collected;
use batchline::config::ProviderKind;
use batchline::metrics::Metrics;
use batchline::model::{RejectReason, Status};
use batchline::packer::Route;
use batchline::sim::openai::injected_error;
use common::*;

/// A repository file's path.
fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// A free 127.0.0.1 address for batchline's HTTP endpoints, so the test
/// knows where to scrape.
fn free_listen_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// One sample of the text exposition format.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses Prometheus' text exposition format (what `/metrics` serves).
fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).expect("a sample has a value");
        let name = line[..name_end].to_owned();
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices();
            let mut key = String::new();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '}' => {
                        end = Some(i);
                        break;
                    }
                    ',' | ' ' => {}
                    '=' => {
                        assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{line}");
                        let mut value = String::new();
                        loop {
                            match chars.next().expect("label value ends").1 {
                                '"' => break,
                                '\\' => match chars.next().expect("escape").1 {
                                    'n' => value.push('\n'),
                                    other => value.push(other),
                                },
                                other => value.push(other),
                            }
                        }
                        labels.insert(std::mem::take(&mut key), value);
                    }
                    other => key.push(other),
                }
            }
            rest = &body[end.expect("label set ends") + 1..];
        }
        let value = rest.split_whitespace().next().expect("sample value");
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|e| panic!("{line}: {e}")),
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

/// The sum of every sample named `name` whose labels include `labels`.
fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

/// Sums of `name` grouped by the value of `label`.
fn sum_by(samples: &[Sample], name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for s in samples.iter().filter(|s| s.name == name) {
        let key = s.labels.get(label).cloned().unwrap_or_default();
        *out.entry(key).or_default() += s.value;
    }
    out
}

fn sample_names(samples: &[Sample]) -> BTreeSet<String> {
    samples.iter().map(|s| s.name.clone()).collect()
}

async fn scrape(addr: &str) -> String {
    let resp = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap_or_else(|e| panic!("scraping http://{addr}/metrics: {e}"));
    assert!(resp.status().is_success(), "/metrics: {}", resp.status());
    let content_type = resp.headers()[reqwest::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    resp.text().await.unwrap()
}

/// `promtool` on PATH, or `None` with a message saying what is skipped.
fn promtool(skipping: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("promtool"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        println!(
            "SKIPPED: {skipping}: `promtool` is not on PATH \
             (install the Debian package `prometheus`; scripts/setup.sh does)"
        );
    }
    found
}

/// Runs promtool with `stdin`, asserting it succeeds.
fn run_promtool(promtool: &Path, args: &[&str], stdin: &str) {
    let mut child = Command::new(promtool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The metric names a PromQL expression selects: identifiers outside
/// strings, label matchers and range brackets that are neither a function
/// or aggregation (followed by `(`), a keyword, nor a grouping label.
fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: &[&str] = &[
        "and", "or", "unless", "bool", "offset", "inf", "nan", "atan2",
    ];
    const AGGREGATIONS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    const GROUPING: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let skip_past = |mut i: usize, close: char| {
        let mut quote = None;
        while i < chars.len() {
            match (quote, chars[i]) {
                (Some(_), '\\') => i += 1,
                (Some(q), c) if c == q => quote = None,
                (None, '"' | '\'' | '`') => quote = Some(chars[i]),
                (None, c) if c == close => return i + 1,
                _ => {}
            }
            i += 1;
        }
        panic!("unclosed `{close}` in {expr}");
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while chars[i] != c {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
            }
            '{' => i = skip_past(i + 1, '}'),
            '[' => i = skip_past(i + 1, ']'),
            c if c.is_ascii_digit() || c == '.' => {
                // Numbers, including 1e3 and durations such as 5m.
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let ident: String = chars[start..i].iter().collect();
                let mut next = i;
                while next < chars.len() && chars[next].is_whitespace() {
                    next += 1;
                }
                let called = chars.get(next) == Some(&'(');
                let rest: String = chars[next..].iter().collect();
                // `sum by (le) (...)`: an aggregation with its grouping first.
                let grouped = AGGREGATIONS.contains(&ident.as_str())
                    && ["by", "without"].iter().any(|g| {
                        rest.strip_prefix(g)
                            .is_some_and(|r| r.trim_start().starts_with('('))
                    });
                if GROUPING.contains(&ident.as_str()) {
                    if called {
                        i = skip_past(next + 1, ')');
                    }
                } else if !called
                    && !grouped
                    && !KEYWORDS.contains(&ident.to_ascii_lowercase().as_str())
                {
                    names.insert(ident);
                }
            }
            _ => i += 1,
        }
    }
    names
}

#[test]
fn promql_metric_names_skip_functions_labels_and_strings() {
    let names = promql_metric_names(
        r#"histogram_quantile(0.95, sum by (le, provider) (rate(a_bucket{provider=~"$p", x!="by"}[$__rate_interval]))) / on (provider) group_left (model) b_total offset 5m > bool 1e3 or vector(0)"#,
    );
    assert_eq!(
        names,
        BTreeSet::from(["a_bucket".to_owned(), "b_total".to_owned()])
    );
}

/// Every `expr` (and variable query) in the dashboard, with its panel title.
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(v: &serde_json::Value, title: &str, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(m) => {
                let title = m
                    .get("title")
                    .or_else(|| m.get("name"))
                    .and_then(|t| t.as_str())
                    .unwrap_or(title);
                for (k, child) in m {
                    match (k.as_str(), child) {
                        ("expr", serde_json::Value::String(e)) => {
                            out.push((title.to_owned(), e.clone()))
                        }
                        ("definition", serde_json::Value::String(d)) => {
                            out.push((title.to_owned(), d.clone()))
                        }
                        _ => walk(child, title, out),
                    }
                }
            }
            serde_json::Value::Array(items) => {
                for item in items {
                    walk(item, title, out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dashboard, "", &mut out);
    out
}

fn load_dashboard() -> serde_json::Value {
    let path = repo_file("dashboards/batchline.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Asserts every metric the dashboard queries is among `exported`.
fn assert_dashboard_uses_only(exported: &BTreeSet<String>, source: &str) {
    let dashboard = load_dashboard();
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 20, "only {} queries", queries.len());
    let mut unknown = Vec::new();
    for (title, expr) in &queries {
        // A variable's `label_values(metric, label)`: only the metric counts.
        let selector = match expr.strip_prefix("label_values(") {
            Some(args) => args.rsplit_once(',').map_or(args, |(m, _)| m),
            None => expr,
        };
        let names = promql_metric_names(selector);
        assert!(
            !names.is_empty(),
            "panel {title:?} queries no metric: {expr}"
        );
        for name in names {
            if !exported.contains(&name) {
                unknown.push(format!("{title:?}: {name} (in {expr})"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "the dashboard queries metrics {source} does not export:\n{}\nexported: {exported:?}",
        unknown.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_agree_with_the_topics_after_a_run_and_pass_promtool() {
    let seed = 11;
    let error_rate = 0.05;
    let sim = Sim::start(SimConfig {
        error_rate,
        seed,
        ..SimConfig::default()
    })
    .await;
    let topics = Topics::create(2).await;
    let spool = tempfile::tempdir().unwrap();
    let mut cfg = test_config(&topics, &sim.openai_url(), spool.path());
    cfg.window.max_requests = Some(50);
    let listen = free_listen_addr();
    cfg.http.listen = listen.clone();
    let batchline = Batchline::start(cfg);

    let mut records = Vec::new();
    let mut expected = std::collections::HashSet::new();
    let mut errored = 0;
    for i in 0..300 {
        let id = format!("obs-{i:04}");
        let model = if i % 3 == 0 { "gpt-4o" } else { "gpt-4o-mini" };
        records.push(Produce::json(
            &id,
            &chat_request(&id, "openai", model, &format!("question {i}")),
        ));
        errored += injected_error(&id, error_rate, seed) as usize;
        expected.insert(id);
    }
    // Bad input whose custom_id can be recovered, so each also gets a
    // `rejected` result on the output topic.
    let json = |v: serde_json::Value| serde_json::to_vec(&v).unwrap();
    let bad: Vec<(&str, Vec<u8>, RejectReason)> = vec![
        (
            "bad-json-1",
            b"{not json".to_vec(),
            RejectReason::InvalidJson,
        ),
        ("bad-json-2", b"[1,2".to_vec(), RejectReason::InvalidJson),
        (
            "no-such-provider",
            json(chat_request("no-such-provider", "nosuch", "m", "x")),
            RejectReason::UnknownProvider,
        ),
        (
            "no-model",
            json(serde_json::json!({"custom_id": "no-model", "provider": "openai", "body": {}})),
            RejectReason::InvalidBody,
        ),
        (
            "wrong-endpoint",
            json(
                serde_json::json!({"custom_id": "wrong-endpoint", "provider": "openai",
                "endpoint": "/v1/messages", "body": {"model": "gpt-4o-mini"}}),
            ),
            RejectReason::UnsupportedEndpoint,
        ),
    ];
    for (n, (key, value, _)) in bad.iter().enumerate() {
        let at = 40 * n + 7;
        records.insert(at, Produce::raw(Some(key), value));
        expected.insert((*key).to_owned());
    }
    produce(&topics.requests, &records).await;
    wait_for_keys(&topics.results, &expected, RESULT_TIMEOUT);

    let results = exactly_once(&read_all(&topics.results).await);
    let mut on_topic: BTreeMap<String, f64> = BTreeMap::new();
    for r in results.values() {
        *on_topic
            .entry(r["status"].as_str().unwrap().to_owned())
            .or_default() += 1.0;
    }
    assert_eq!(
        on_topic.get("errored").copied().unwrap_or(0.0),
        errored as f64
    );
    assert_eq!(on_topic["rejected"], bad.len() as f64);
    assert!(errored > 0, "the simulator injected no error");

    // Counters move after the deliveries they count, and gauges are
    // refreshed on the commit interval: scrape until they settle.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (text, samples) = loop {
        let text = scrape(&listen).await;
        let samples = parse_exposition(&text);
        let published = sum_by(&samples, "batchline_results_published_total", "status");
        let published: BTreeMap<String, f64> =
            published.into_iter().filter(|(_, n)| *n > 0.0).collect();
        // Lag comes with librdkafka's statistics, once offsets are committed.
        let settled = published == on_topic
            && sum(&samples, "batchline_held_requests", &[]) == 0.0
            && sum(&samples, "batchline_batches_in_flight", &[]) == 0.0
            && sample_names(&samples).contains("batchline_consumer_lag_messages");
        if settled || Instant::now() > deadline {
            break (text, samples);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // In: every message read once; bad input counted by reason.
    assert_eq!(
        sum(&samples, "batchline_requests_consumed_total", &[]),
        records.len() as f64
    );
    for reason in RejectReason::ALL {
        let want = bad.iter().filter(|b| b.2 == reason).count() as f64;
        assert_eq!(
            sum(
                &samples,
                "batchline_requests_rejected_total",
                &[("reason", reason.as_str())]
            ),
            want,
            "rejected {reason}"
        );
    }
    // Out: results by status are exactly what the results topic holds.
    let published: BTreeMap<String, f64> =
        sum_by(&samples, "batchline_results_published_total", "status")
            .into_iter()
            .filter(|(_, n)| *n > 0.0)
            .collect();
    assert_eq!(published, on_topic, "results published by status");
    assert_eq!(sum(&samples, "batchline_held_requests", &[]), 0.0);
    assert_eq!(sum(&samples, "batchline_spool_bytes", &[]), 0.0);

    // Batches: each submitted batch ended completed and none is in flight.
    let submitted = sum(
        &samples,
        "batchline_batches_submitted_total",
        &[("provider", "openai")],
    );
    assert!(
        submitted >= 6.0,
        "300 requests in windows of 50: {submitted}"
    );
    assert_eq!(
        sum(
            &samples,
            "batchline_batches_ended_total",
            &[("provider", "openai"), ("status", "completed")]
        ),
        submitted
    );
    // At least every good request once (retried requests count again).
    assert!(
        sum(
            &samples,
            "batchline_batch_requests_sum",
            &[("provider", "openai")]
        ) >= 300.0
    );
    assert_eq!(sum(&samples, "batchline_batches_in_flight", &[]), 0.0);
    assert_eq!(
        sum(
            &samples,
            "batchline_provider_failing",
            &[("provider", "openai")]
        ),
        0.0
    );
    assert!(
        sum(
            &samples,
            "batchline_tokens_total",
            &[("direction", "output")]
        ) > 0.0
    );
    assert!(
        sum(
            &samples,
            "batchline_cost_usd_total",
            &[("model", "gpt-4o-mini")]
        ) > 0.0
    );

    // Provider calls: every call the adapter made is counted under a
    // named operation; the simulator answered the pipeline's calls with 200.
    let calls = |operation: &str, status: &str| {
        sum(
            &samples,
            "batchline_provider_requests_total",
            &[
                ("provider", "openai"),
                ("operation", operation),
                ("status", status),
            ],
        )
    };
    assert!(calls("upload_file", "200") >= submitted);
    assert_eq!(calls("create_batch", "200"), submitted);
    assert!(calls("get_batch", "200") >= submitted);
    assert!(calls("download_file", "200") >= submitted);
    let by_operation = sum_by(&samples, "batchline_provider_requests_total", "operation");
    assert!(
        !by_operation.contains_key("other"),
        "calls not named: {by_operation:?}"
    );
    for (operation, n) in &by_operation {
        assert_eq!(
            sum(
                &samples,
                "batchline_provider_request_duration_seconds_count",
                &[("operation", operation)]
            ),
            *n,
            "every {operation} call is timed"
        );
    }
    assert_eq!(
        sum(
            &samples,
            "batchline_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );

    // Everything the dashboard shows is in a real scrape.
    assert_dashboard_uses_only(&sample_names(&samples), "a live /metrics scrape");

    if let Some(promtool) = promtool("`promtool check metrics` on the live scrape") {
        run_promtool(&promtool, &["check", "metrics"], &text);
    }
    batchline.stop().await;
}

/// Every metric family rendered, each touched once through its named
/// method so that label-keyed families appear.
fn every_metric_touched() -> Metrics {
    let m = Metrics::new();
    let route = Route {
        provider: Arc::from("openai"),
        kind: ProviderKind::Openai,
        model: Arc::from("gpt-4o-mini"),
        endpoint: "/v1/chat/completions",
    };
    m.provider_configured("openai");
    m.request_consumed();
    m.request_rejected(RejectReason::InvalidJson);
    m.rejection_published(
        batchline::model::RejectReason::InvalidJson,
        Some("openai"),
        true,
    );
    m.held(1, 100, 1);
    m.consumer_paused(false);
    m.batch_submitted(&route, 1, 100);
    m.batch_ended(&route, "completed", Duration::from_secs(60));
    m.results_published(
        &route,
        &Collected {
            by_status: HashMap::from([(Status::Succeeded, 1)]),
            cost_usd: 0.001,
            input_tokens: 10,
            output_tokens: 20,
            ..Collected::default()
        },
    );
    m.result_latency(1.0);
    m.ambiguous_create("openai");
    m.route_failing("openai");
    m.route_ok("openai");
    m.provider_call("openai", "create_batch", "200", 0.1);
    m.input_retention_short(false);
    m.consumer_lag(0, 0);
    m.cancel_requested("openai");
    m.requests_resubmitted("openai", "retry", 1);
    m.orphan_batch("openai");
    m.budget(Some(10.0), 1.5, 0.25, 0);
    m
}

#[test]
fn the_dashboard_queries_only_metrics_batchline_exports() {
    let dashboard = load_dashboard();
    assert_eq!(dashboard["uid"], "batchline");
    assert_eq!(dashboard["title"], "batchline");
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 39);
    // Every panel and query uses the provisioned data source.
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "duplicate id {}",
            panel["id"]
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "prometheus",
            "{}",
            panel["title"]
        );
        for target in panel["targets"].as_array().unwrap() {
            assert_eq!(target["datasource"]["uid"], "prometheus");
        }
    }
    let provisioned =
        std::fs::read_to_string(repo_file("dashboards/provisioning/datasources.yml")).unwrap();
    assert!(provisioned.contains("uid: prometheus"));

    let exposition = every_metric_touched().render();
    let exported = sample_names(&parse_exposition(&exposition));
    assert_dashboard_uses_only(&exported, "Metrics::render()");

    // promtool parses every query (as recording rules), with Grafana's
    // variables replaced by what Grafana would send.
    if let Some(promtool) = promtool("`promtool check rules` on the dashboard's queries") {
        let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
        for (n, (_, expr)) in dashboard_queries(&dashboard).iter().enumerate() {
            if expr.starts_with("label_values(") {
                continue;
            }
            let expr = expr
                .replace("$__rate_interval", "1m")
                .replace("$provider", ".*");
            rules.push_str(&format!(
                "      - record: dashboard:query_{n}\n        expr: {}\n",
                serde_json::to_string(&expr).unwrap()
            ));
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("dashboard.rules.yml");
        std::fs::write(&file, rules).unwrap();
        run_promtool(&promtool, &["check", "rules", file.to_str().unwrap()], "");
    }
}

/// The items of the YAML block sequence under the top-level `key`, each
/// flattened to its `key: value` pairs at any depth; a nested sequence of
/// scalars becomes its key's flow form `[a, b]`. A small subset of YAML,
/// enough for a Prometheus configuration.
fn yaml_list_items(text: &str, key: &str) -> Vec<BTreeMap<String, String>> {
    let lines: Vec<(usize, &str)> = text
        .lines()
        .map(|l| l.split(" #").next().unwrap().trim_end())
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|l| (l.len() - l.trim_start().len(), l.trim_start()))
        .collect();
    let start = lines
        .iter()
        .position(|(depth, l)| *depth == 0 && *l == format!("{key}:"))
        .unwrap_or_else(|| panic!("no top-level `{key}:`"));
    let Some(&(item_indent, _)) = lines.get(start + 1) else {
        return Vec::new();
    };
    let mut items: Vec<BTreeMap<String, String>> = Vec::new();
    let mut open_key = String::new();
    for &(depth, line) in &lines[start + 1..] {
        if depth < item_indent || (depth == item_indent && !line.starts_with("- ")) {
            break;
        }
        let line = match line.strip_prefix("- ") {
            Some(rest) if depth == item_indent => {
                items.push(BTreeMap::new());
                rest
            }
            Some(rest) => rest,
            None => line,
        };
        let item = items.last_mut().expect("a sequence item");
        // `a: b` and `a:` are pairs; `a:b` and quoted strings are scalars.
        let pair = line
            .split_once(": ")
            .or_else(|| line.strip_suffix(':').map(|k| (k, "")));
        match pair {
            Some((k, v)) if !k.starts_with(['"', '\'']) => {
                open_key = k.trim().to_owned();
                item.insert(open_key.clone(), v.trim().to_owned());
            }
            _ => {
                let entry = item.entry(open_key.clone()).or_default();
                let inner = entry.trim_start_matches('[').trim_end_matches(']');
                *entry = if inner.is_empty() {
                    format!("[{line}]")
                } else {
                    format!("[{inner}, {line}]")
                };
            }
        }
    }
    items
}

#[test]
fn prometheus_scrapes_batchline_metrics() {
    let path = repo_file("config/prometheus.yml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains('\t'), "YAML forbids tabs for indentation");
    let jobs = yaml_list_items(&text, "scrape_configs");
    let job = jobs
        .iter()
        .find(|j| j.get("job_name").map(String::as_str) == Some("batchline"))
        .unwrap_or_else(|| panic!("no batchline job in {jobs:?}"));
    // Prometheus' default metrics_path is /metrics too.
    let metrics_path = job.get("metrics_path").map(String::as_str);
    assert!(
        matches!(metrics_path, None | Some("/metrics")),
        "{metrics_path:?}"
    );
    let targets = job
        .get("targets")
        .unwrap_or_else(|| panic!("no targets in {job:?}"));
    let targets: Vec<&str> = targets
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .map(|t| t.trim().trim_matches(|c| c == '"' || c == '\''))
        .collect();
    assert!(targets.contains(&"batchline:9464"), "{targets:?}");
    // docker-compose.yml's batchline listens where Prometheus looks.
    let compose = std::fs::read_to_string(repo_file("docker-compose.yml")).unwrap();
    assert!(compose.contains("BATCHLINE__HTTP__LISTEN: \"0.0.0.0:9464\""));

    // promtool parses the whole file as Prometheus does.
    if let Some(promtool) = promtool("`promtool check config` on config/prometheus.yml") {
        run_promtool(&promtool, &["check", "config", path.to_str().unwrap()], "");
    }
}

/// A status API call's HTTP status and JSON body.
async fn status_api(
    request: reqwest::RequestBuilder,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    let request = match token {
        Some(t) => request.bearer_auth(t),
        None => request,
    };
    let resp = request.send().await.expect("calling the status API");
    let status = resp.status().as_u16();
    let body = resp.json().await.expect("the status API answers JSON");
    (status, body)
}

/// Waits until batchline's HTTP endpoints answer.
async fn wait_until_serving(base: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(resp) = reqwest::get(format!("{base}/healthz")).await {
            if resp.status().is_success() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{base}/healthz never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `/readyz`'s HTTP status and body.
async fn readyz(base: &str) -> (u16, String) {
    let resp = reqwest::get(format!("{base}/readyz"))
        .await
        .unwrap_or_else(|e| panic!("calling {base}/readyz: {e}"));
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// Polls `/readyz` until it answers 200; returns every 503 body seen
/// before, each checked to be `{"ready": false, "reasons": [..]}`.
async fn wait_until_ready(base: &str) -> Vec<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut not_ready = Vec::new();
    loop {
        match reqwest::get(format!("{base}/readyz")).await {
            Ok(resp) if resp.status().as_u16() == 200 => {
                assert_eq!(resp.text().await.unwrap(), "ready\n");
                return not_ready;
            }
            Ok(resp) => {
                assert_eq!(resp.status().as_u16(), 503);
                let body: serde_json::Value = resp.json().await.expect("a JSON 503 body");
                assert_eq!(body["ready"], false, "{body}");
                let reasons: Vec<String> = body["reasons"]
                    .as_array()
                    .unwrap_or_else(|| panic!("no reasons in {body}"))
                    .iter()
                    .map(|r| r.as_str().expect("a reason is a string").to_owned())
                    .collect();
                assert!(!reasons.is_empty(), "{body}");
                not_ready.push(reasons);
            }
            Err(_) => {} // Not listening yet.
        }
        assert!(
            Instant::now() < deadline,
            "{base}/readyz never answered 200; last reasons: {:?}",
            not_ready.last()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_turns_ready_once_partitions_are_replayed_and_lag_is_exported() {
    let sim = Sim::start(SimConfig::default()).await;
    let topics = Topics::create(2).await;
    let spool = tempfile::tempdir().unwrap();
    let mut cfg = test_config(&topics, &sim.openai_url(), spool.path());
    let listen = free_listen_addr();
    cfg.http.listen = listen.clone();
    let base = format!("http://{listen}");
    let batchline = Batchline::start(cfg);

    // Until both partitions are assigned and replayed, /readyz says why not.
    let not_ready = wait_until_ready(&base).await;
    for reasons in &not_ready {
        for reason in reasons {
            assert!(
                reason == "no partitions assigned"
                    || reason.starts_with("partition 0: replaying the journal")
                    || reason.starts_with("partition 1: replaying the journal"),
                "unexpected reason while starting: {reason}"
            );
        }
    }
    let text = scrape(&listen).await;
    let samples = parse_exposition(&text);
    assert_eq!(sum(&samples, "batchline_ready", &[]), 1.0, "{text}");
    // Tansu reports no retention.ms for a topic created without one.
    assert_eq!(sum(&samples, "batchline_input_retention_short", &[]), 0.0);

    let ids: Vec<String> = (0..20).map(|i| format!("ready-{i:02}")).collect();
    let records: Vec<Produce> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            Produce::json(id, &chat_request(id, "openai", "gpt-4o-mini", id))
                .in_partition(i as i32 % 2)
        })
        .collect();
    produce(&topics.requests, &records).await;
    let expected = ids.iter().cloned().collect();
    wait_for_keys(&topics.results, &expected, RESULT_TIMEOUT);

    // Lag appears with the statistics that follow the first commits.
    let deadline = Instant::now() + Duration::from_secs(30);
    let lag = loop {
        let samples = parse_exposition(&scrape(&listen).await);
        let lag: BTreeMap<String, f64> = samples
            .iter()
            .filter(|s| s.name == "batchline_consumer_lag_messages")
            .map(|s| (s.labels["partition"].clone(), s.value))
            .collect();
        if lag.len() == 2 {
            break lag;
        }
        assert!(
            Instant::now() < deadline,
            "no lag for both partitions in a scrape: {lag:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(lag.keys().collect::<Vec<_>>(), ["0", "1"]);
    assert!(lag.values().all(|l| *l >= 0.0), "{lag:?}");
    assert_eq!(readyz(&base).await, (200, "ready\n".to_owned()));
    batchline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_lists_why_an_instance_is_not_ready() {
    // The simulator wants another key: the provider refuses credentials.
    let sim = Sim::start(SimConfig {
        api_key: Some("sk-another-key".into()),
        ..SimConfig::default()
    })
    .await;
    // An hour of retention, size-based retention, and a state topic with
    // one partition for an input topic of two.
    let topics = Topics::named();
    create_topic_with(
        &topics.requests,
        2,
        &[
            ("retention.ms", "3600000"),
            ("retention.bytes", "1073741824"),
        ],
    )
    .await;
    create_topic(&topics.state, 1).await;
    let spool = tempfile::tempdir().unwrap();
    let mut cfg = test_config(&topics, &sim.openai_url(), spool.path());
    let listen = free_listen_addr();
    cfg.http.listen = listen.clone();
    // The held request is abandoned at shutdown.
    cfg.shutdown.timeout = Duration::from_secs(2);
    let base = format!("http://{listen}");
    let batchline = Batchline::start(cfg);
    wait_until_serving(&base).await;

    let id = "not-ready-0";
    produce(
        &topics.requests,
        &[Produce::json(id, &chat_request(id, "openai", "gpt-4o-mini", id)).in_partition(0)],
    )
    .await;

    let state_problem = format!(
        "state topic {} has 1 partitions, fewer than the input topic's 2",
        topics.state
    );
    let failing = "provider openai: credentials or quota refused";
    let deadline = Instant::now() + Duration::from_secs(60);
    let reasons = loop {
        let (status, body) = readyz(&base).await;
        assert_eq!(status, 503, "{body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["ready"], false, "{body}");
        let reasons: Vec<String> = body["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_owned())
            .collect();
        let partition_1_stuck = reasons
            .iter()
            .any(|r| r.starts_with("partition 1: replaying the journal"));
        if reasons.contains(&state_problem)
            && reasons.iter().any(|r| r == failing)
            && partition_1_stuck
        {
            break reasons;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never gave every reason; last: {reasons:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        !reasons.iter().any(|r| r.starts_with("partition 0")),
        "partition 0 has its state partition: {reasons:?}"
    );

    let samples = parse_exposition(&scrape(&listen).await);
    assert_eq!(sum(&samples, "batchline_ready", &[]), 0.0);
    assert_eq!(
        sum(
            &samples,
            "batchline_provider_failing",
            &[("provider", "openai")]
        ),
        1.0
    );
    assert_eq!(
        sum(&samples, "batchline_input_retention_short", &[]),
        1.0,
        "an hour is shorter than 3 attempts of 26 h"
    );
    batchline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_status_api_shows_a_batch_and_cancels_it_at_the_provider() {
    // Batches run for a minute: the cancel lands long before they would end.
    let sim = Sim::start(SimConfig {
        batch_duration: Duration::from_secs(60),
        ..SimConfig::default()
    })
    .await;
    let topics = Topics::create(1).await;
    let spool = tempfile::tempdir().unwrap();
    let mut cfg = test_config(&topics, &sim.openai_url(), spool.path());
    // Every request below fits in one window.
    cfg.window.max_wait = Duration::from_secs(3);
    let listen = free_listen_addr();
    cfg.http.listen = listen.clone();
    let base = format!("http://{listen}");
    let batchline = Batchline::start(cfg);
    let client = reqwest::Client::new();

    let n = 40;
    let ids: Vec<String> = (0..n).map(|i| format!("cancel-{i:03}")).collect();
    let records: Vec<Produce> = ids
        .iter()
        .map(|id| Produce::json(id, &chat_request(id, "openai", "gpt-4o-mini", id)))
        .collect();
    produce(&topics.requests, &records).await;
    wait_until_serving(&base).await;

    // The batch appears, and once the provider batch exists, shows its id.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (batch, list) = loop {
        let (status, list) = status_api(client.get(format!("{base}/v1/batches")), None).await;
        assert_eq!(status, 200, "{list}");
        let submitted = list["batches"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["provider_batch_id"].is_string())
            .cloned();
        if let Some(batch) = submitted {
            break (batch, list);
        }
        assert!(
            Instant::now() < deadline,
            "no batch got a provider batch id: {list}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let id = batch["id"].as_str().unwrap().to_owned();
    let provider_batch = batch["provider_batch_id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("bl-0-"), "{batch}");
    assert_eq!(batch["provider"], "openai");
    assert_eq!(batch["model"], "gpt-4o-mini");
    assert_eq!(batch["endpoint"], "/v1/chat/completions");
    assert_eq!(batch["partition"], 0);
    assert_eq!(batch["requests"], n, "one window holds every request");
    assert!(batch["bytes"].as_u64().unwrap() > 0, "{batch}");
    assert_eq!(batch["phase"], "submitted");
    assert!(provider_batch.starts_with("batch_"), "{batch}");
    let provider_status = batch["provider_status"].as_str().unwrap();
    assert!(
        ["validating", "in_progress"].contains(&provider_status),
        "{batch}"
    );
    assert!(batch["request_counts"].is_object(), "{batch}");
    assert!(batch["age_seconds"].as_f64().unwrap() >= 0.0, "{batch}");
    assert_eq!(batch["cost_usd"], 0.0, "nothing is collected yet");
    assert_eq!(batch["cancel_requested"], false);
    let totals = &list["totals"];
    assert_eq!(totals["batches"], 1, "{list}");
    assert_eq!(totals["requests"], n);
    assert_eq!(totals["by_phase"]["submitted"], 1);
    assert_eq!(totals["by_provider"]["openai"]["requests"], n);

    let (status, one) = status_api(client.get(format!("{base}/v1/batches/{id}")), None).await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["id"], id.as_str());
    assert_eq!(one["provider_batch_id"], provider_batch.as_str());

    // `batchline status` reads the same API.
    let api = batchline::cli::StatusApi::new(&base, None).unwrap();
    let table = batchline::cli::format_status(&api.batches().await.unwrap());
    assert!(table.contains(&id), "{table}");
    assert!(table.contains("1 batch in flight, 40 requests"), "{table}");

    // Unknown ids are 404s with a JSON error for a read; a cancel of an id
    // that names no partition is refused.
    let unknown = "bl-0-00000000-0000-0000-0000-000000000000";
    let (status, body) = status_api(client.get(format!("{base}/v1/batches/{unknown}")), None).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["type"], "not_found");
    let (status, body) =
        status_api(client.post(format!("{base}/v1/batches/nope/cancel")), None).await;
    assert_eq!(status, 404, "{body}");
    match api.cancel("nope").await {
        Err(batchline::cli::StatusApiError::Refused { status: 404, .. }) => {}
        other => panic!("cancelling an id that names no batch: {other:?}"),
    }
    // A well-formed id this instance does not know is left to the owner of
    // its partition (this instance: it tombstones the record).
    let (status, body) = status_api(
        client.post(format!("{base}/v1/batches/{unknown}/cancel")),
        None,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["journaled"], true, "{body}");
    assert!(body.get("batch").is_none(), "{body}");

    // The cancel goes through a second instance of the group, which owns no
    // partition (the only one stays with the first: cooperative-sticky).
    // It writes the cancel to the journal; the owner reads it from its tail.
    let spool_b = tempfile::tempdir().unwrap();
    let mut cfg_b = test_config(&topics, &sim.openai_url(), spool_b.path());
    let listen_b = free_listen_addr();
    cfg_b.http.listen = listen_b.clone();
    let base_b = format!("http://{listen_b}");
    let second = Batchline::start(cfg_b);
    wait_until_serving(&base_b).await;
    let (status, body) = status_api(
        client.post(format!("{base_b}/v1/batches/{id}/cancel")),
        None,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["id"], id.as_str());
    assert_eq!(body["journaled"], true, "{body}");
    assert!(body.get("batch").is_none(), "not the owner: {body}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, one) = status_api(client.get(format!("{base}/v1/batches/{id}")), None).await;
        if one["cancel_requested"] == true || one["provider_status"] == "cancelling" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the owner did not act on the cancel record: {one}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let samples = parse_exposition(&scrape(&listen).await);
    assert_eq!(
        sum(
            &samples,
            "batchline_cancels_requested_total",
            &[("provider", "openai")]
        ),
        1.0
    );

    // Every request gets exactly one result; what had not run is canceled.
    let expected: std::collections::HashSet<String> = ids.iter().cloned().collect();
    let results = exactly_once(&wait_for_keys(
        &topics.results,
        &expected,
        Duration::from_secs(60),
    ));
    assert_eq!(results.len(), n);
    let mut by_status: BTreeMap<&str, usize> = BTreeMap::new();
    for r in results.values() {
        assert_eq!(r["batch_id"], provider_batch.as_str(), "{r}");
        let status = r["status"].as_str().unwrap();
        *by_status.entry(status).or_default() += 1;
        match status {
            "canceled" => assert_eq!(r["error"]["type"], "batch_cancelled", "{r}"),
            "succeeded" => {}
            other => panic!("a request of a cancelled batch ended {other}: {r}"),
        }
    }
    assert!(
        by_status.get("canceled").copied().unwrap_or(0) > 0,
        "the cancel came a minute before the batch would end: {by_status:?}"
    );
    // What ran before the cancel was billed once; what was canceled, never.
    let stats = sim.stats().await;
    for (id, r) in &results {
        let billed = stats["custom_ids"][id]["billed"].as_u64().unwrap_or(0);
        let want = u64::from(r["status"] == "succeeded");
        assert_eq!(billed, want, "{id} billed {billed} times: {r}");
    }

    // The batch leaves the registry once its results are out.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, list) = status_api(client.get(format!("{base}/v1/batches")), None).await;
        if list["batches"].as_array().unwrap().is_empty() {
            assert_eq!(list["totals"]["batches"], 0);
            break;
        }
        assert!(Instant::now() < deadline, "the batch stays listed: {list}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _) = status_api(client.get(format!("{base}/v1/batches/{id}")), None).await;
    assert_eq!(status, 404);
    second.stop().await;
    batchline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_status_api_requires_the_bearer_token_when_one_is_configured() {
    let sim = Sim::start(SimConfig::default()).await;
    let topics = Topics::create(1).await;
    let spool = tempfile::tempdir().unwrap();
    let mut cfg = test_config(&topics, &sim.openai_url(), spool.path());
    let token = "obs-token-4f1c9e";
    cfg.http.token = Some(batchline::config::ApiKey::new(token));
    let listen = free_listen_addr();
    cfg.http.listen = listen.clone();
    let base = format!("http://{listen}");
    let batchline = Batchline::start(cfg);
    wait_until_serving(&base).await;
    let client = reqwest::Client::new();

    for (method, path) in [
        (reqwest::Method::GET, "/v1/batches"),
        (reqwest::Method::GET, "/v1/batches/bl-0-x"),
        (reqwest::Method::POST, "/v1/batches/bl-0-x/cancel"),
    ] {
        let url = format!("{base}{path}");
        for wrong in [None, Some("obs-token-4f1c9f"), Some("")] {
            let (status, body) = status_api(client.request(method.clone(), &url), wrong).await;
            assert_eq!(status, 401, "{method} {path} with {wrong:?}: {body}");
            assert_eq!(body["error"]["type"], "unauthorized");
            assert!(!body.to_string().contains(token), "{body}");
        }
    }
    let (status, body) = status_api(client.get(format!("{base}/v1/batches")), Some(token)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["batches"].is_array());
    let (status, body) =
        status_api(client.get(format!("{base}/v1/batches/bl-0-x")), Some(token)).await;
    assert_eq!(status, 404, "{body}");
    // Metrics and health need no token.
    wait_until_ready(&base).await;
    for open in ["/metrics", "/healthz", "/readyz"] {
        let resp = client.get(format!("{base}{open}")).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{open}");
    }

    // The CLI's client sends the token it is given, and its errors never
    // show one.
    let anonymous = batchline::cli::StatusApi::new(&base, None).unwrap();
    let err = anonymous.batches().await.unwrap_err();
    assert!(
        matches!(
            err,
            batchline::cli::StatusApiError::Refused { status: 401, .. }
        ),
        "{err}"
    );
    let wrong = batchline::cli::StatusApi::new(
        &base,
        Some(batchline::config::ApiKey::new("obs-token-wrong")),
    )
    .unwrap();
    let err = wrong.batches().await.unwrap_err().to_string();
    assert!(!err.contains("obs-token"), "{err}");
    let authorised =
        batchline::cli::StatusApi::new(&base, Some(batchline::config::ApiKey::new(token))).unwrap();
    assert!(authorised.batches().await.unwrap().batches.is_empty());
    batchline.stop().await;
}

/// Polls `GET /v1/budget` until `until` holds; returns that view.
async fn wait_for_budget(
    api: &batchline::cli::StatusApi,
    what: &str,
    until: impl Fn(&batchline::budget::BudgetView) -> bool,
) -> batchline::budget::BudgetView {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let view = api.budget().await.expect("GET /v1/budget");
        if until(&view) {
            return view;
        }
        assert!(Instant::now() < deadline, "{what}: {view:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The requests `ids` as messages for partition 0.
fn chat_records(ids: &[String]) -> Vec<Produce> {
    ids.iter()
        .map(|id| Produce::json(id, &chat_request(id, "openai", "gpt-4o-mini", id)))
        .collect()
}

/// One instance over one partition whose daily budget is 0: its first
/// batch (windows of 10) waits before its `intent`.
struct ZeroBudget {
    sim: Sim,
    topics: Topics,
    _spool: tempfile::TempDir,
    listen: String,
    base: String,
    batchline: Batchline,
    api: batchline::cli::StatusApi,
}

async fn zero_budget() -> ZeroBudget {
    let sim = Sim::start(SimConfig::default()).await;
    let topics = Topics::create(1).await;
    let spool = tempfile::tempdir().unwrap();
    let mut cfg = test_config(&topics, &sim.openai_url(), spool.path());
    cfg.budget.max_usd_per_day = Some(0.0);
    cfg.window.max_requests = Some(10);
    let listen = free_listen_addr();
    cfg.http.listen = listen.clone();
    let base = format!("http://{listen}");
    let batchline = Batchline::start(cfg);
    wait_until_serving(&base).await;
    let api = batchline::cli::StatusApi::new(&base, None).unwrap();
    ZeroBudget {
        sim,
        topics,
        _spool: spool,
        listen,
        base,
        batchline,
        api,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_budget_holds_submission_and_pauses_consumption_until_raised() {
    // Nothing may be spent: the first batch waits.
    let ZeroBudget {
        sim,
        topics,
        _spool,
        listen,
        base,
        batchline,
        api,
    } = zero_budget().await;

    let first: Vec<String> = (0..30).map(|i| format!("budget-a-{i:03}")).collect();
    // One record per batch: consumption resumes mid-topic, and Tansu
    // fetches from inside a record batch wrongly (see tests/crash.rs).
    produce_unbatched(&topics.requests, &chat_records(&first)).await;
    let held = wait_for_budget(&api, "a batch waits for the budget", |b| {
        b.held_batches >= 1
    })
    .await;
    assert_eq!(held.max_usd_per_day, Some(0.0));
    assert_eq!(held.spent_usd, 0.0);
    // Held: nothing reached the provider, consumption is paused (by the
    // ingest loop's next turn), and /readyz and the metrics say why.
    let deadline = Instant::now() + Duration::from_secs(10);
    let samples = loop {
        let samples = parse_exposition(&scrape(&listen).await);
        if sum(&samples, "batchline_consumer_paused", &[]) == 1.0 {
            break samples;
        }
        assert!(Instant::now() < deadline, "consumption not paused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        sum(&samples, "batchline_budget_held_batches", &[]),
        held.held_batches as f64
    );
    assert_eq!(sum(&samples, "batchline_budget_limit_usd", &[]), 0.0);
    let (status, body) = readyz(&base).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("wait for the daily budget"), "{body}");
    assert_eq!(sim.stats().await["batches_created"], 0, "nothing was sent");
    let table = batchline::cli::format_budget(&held);
    assert!(
        table.contains("wait for the budget; consumption is paused"),
        "{table}"
    );

    // Raised: every request goes through, exactly once, and is counted.
    let raised = api.set_budget(Some(1.0)).await.unwrap();
    assert_eq!(raised.max_usd_per_day, Some(1.0));
    let expected: std::collections::HashSet<String> = first.iter().cloned().collect();
    let results = exactly_once(&wait_for_keys(
        &topics.results,
        &expected,
        Duration::from_secs(60),
    ));
    let cost: f64 = results
        .values()
        .map(|r| {
            assert_eq!(r["status"], "succeeded", "{r}");
            r["cost_usd"].as_f64().expect("gpt-4o-mini is priced")
        })
        .sum();
    let after = wait_for_budget(&api, "every batch collected", |b| {
        b.reserved_usd == 0.0 && b.held_batches == 0
    })
    .await;
    assert!(cost > 0.0);
    assert!((after.spent_usd - cost).abs() < 1e-9, "{after:?} vs {cost}");

    // A cap at today's spend holds the next batch again; removing it
    // releases the batch.
    api.set_budget(Some(after.spent_usd)).await.unwrap();
    let second: Vec<String> = (0..5).map(|i| format!("budget-b-{i:03}")).collect();
    produce_unbatched(&topics.requests, &chat_records(&second)).await;
    wait_for_budget(&api, "the cap at today's spend holds a batch", |b| {
        b.held_batches >= 1
    })
    .await;
    let unset = api.set_budget(None).await.unwrap();
    assert_eq!(unset.max_usd_per_day, None);
    let expected: std::collections::HashSet<String> =
        first.iter().chain(&second).cloned().collect();
    let results = exactly_once(&wait_for_keys(
        &topics.results,
        &expected,
        Duration::from_secs(60),
    ));
    assert_eq!(results.len(), 35);
    let stats = sim.stats().await;
    for id in &expected {
        assert_eq!(stats["custom_ids"][id]["billed"], 1, "{id}");
    }
    let samples = parse_exposition(&scrape(&listen).await);
    assert_eq!(sum(&samples, "batchline_budget_held_batches", &[]), 0.0);
    assert_eq!(sum(&samples, "batchline_consumer_paused", &[]), 0.0);
    batchline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_cancelled_before_its_create_is_never_sent() {
    // The daily budget holds the batch before its create, long enough to
    // cancel it there.
    let ZeroBudget {
        sim,
        topics,
        _spool,
        batchline,
        api,
        ..
    } = zero_budget().await;

    let ids: Vec<String> = (0..10).map(|i| format!("early-{i:03}")).collect();
    produce_unbatched(&topics.requests, &chat_records(&ids)).await;
    wait_for_budget(&api, "the batch waits for the budget", |b| {
        b.held_batches == 1
    })
    .await;
    let list = api.batches().await.unwrap();
    assert_eq!(list.batches.len(), 1, "{list:?}");
    let batch = &list.batches[0];
    assert!(batch.provider_batch_id.is_none(), "{batch:?}");
    let accepted = api.cancel(&batch.id).await.unwrap();
    assert!(accepted.journaled);
    let view = accepted.batch.expect("this instance owns the batch");
    assert!(view.cancel_requested);
    assert!(
        batchline::cli::format_cancelled(&api.cancel(&batch.id).await.unwrap()).contains(&batch.id)
    );

    // Let it go: it reaches its create cancelled, and sends none.
    api.set_budget(None).await.unwrap();
    let expected: std::collections::HashSet<String> = ids.iter().cloned().collect();
    let results = exactly_once(&wait_for_keys(
        &topics.results,
        &expected,
        Duration::from_secs(60),
    ));
    assert_eq!(results.len(), 10);
    for r in results.values() {
        assert_eq!(r["status"], "canceled", "{r}");
        assert_eq!(r["error"]["type"], "batch_cancelled", "{r}");
        assert_eq!(r["batch_id"], "", "no provider batch: {r}");
    }
    let stats = sim.stats().await;
    assert_eq!(stats["batches_created"], 0, "no create was sent: {stats}");
    for id in &ids {
        assert_eq!(stats["custom_ids"][id]["billed"].as_u64().unwrap_or(0), 0);
    }
    batchline.stop().await;
}

/// Creates a one-request batch at the simulator's OpenAI API, as another
/// owner would have; returns its id.
async fn create_sim_batch(sim: &Sim, custom_id: &str) -> String {
    let client = reqwest::Client::new();
    let line = serde_json::json!({
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
    });
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::multipart::Part::bytes(format!("{line}\n").into_bytes()).file_name("in.jsonl"),
        );
    let file: serde_json::Value = client
        .post(format!("{}/files", sim.openai_url()))
        .bearer_auth("sk-test-key")
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let batch: serde_json::Value = client
        .post(format!("{}/batches", sim.openai_url()))
        .bearer_auth("sk-test-key")
        .json(&serde_json::json!({
            "input_file_id": file["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    batch["id"].as_str().expect("a batch id").to_owned()
}

async fn sim_batch_status(sim: &Sim, id: &str) -> String {
    let batch = sim.openai_get(&format!("/batches/{id}")).await;
    batch["status"].as_str().unwrap_or_default().to_owned()
}

/// Waits until batchline's `batchline_orphan_batches_total` reaches `n`.
async fn wait_for_orphans(listen: &str, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let samples = parse_exposition(&scrape(listen).await);
        let seen = sum(
            &samples,
            "batchline_orphan_batches_total",
            &[("provider", "openai")],
        );
        if seen >= n {
            assert_eq!(seen, n);
            return;
        }
        assert!(Instant::now() < deadline, "{seen} orphans, not {n}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_create_only_a_void_record_names_is_cancelled_as_an_orphan() {
    let sim = Sim::start(SimConfig {
        batch_duration: Duration::from_secs(4),
        ..SimConfig::default()
    })
    .await;
    let topics = Topics::create(1).await;
    let spool = tempfile::tempdir().unwrap();
    let mut cfg = test_config(&topics, &sim.openai_url(), spool.path());
    cfg.window.max_requests = Some(5);
    let listen = free_listen_addr();
    cfg.http.listen = listen.clone();
    let batchline = Batchline::start(cfg.clone());

    // One batch runs to its end.
    let ids: Vec<String> = (0..5).map(|i| format!("orphan-{i:03}")).collect();
    produce_unbatched(&topics.requests, &chat_records(&ids)).await;
    let expected: std::collections::HashSet<String> = ids.iter().cloned().collect();
    wait_for_keys(&topics.results, &expected, Duration::from_secs(60));
    let state = read_all(&topics.state).await;
    let done = state
        .iter()
        .find(|r| r.key_str().contains("/done/") && r.value.as_ref().is_some_and(|v| !v.is_empty()))
        .expect("the batch's done record");
    let local_batch = done.key_str().split('/').next().unwrap().to_owned();

    // An owner that had lost the partition created a batch for it, and its
    // `submitted` record landed after the current owner's claim: void.
    let orphan = create_sim_batch(&sim, "orphan-000").await;
    let mut void = done.json();
    void["epoch"] = "zombie".into();
    void["phase"] = "submitted".into();
    void["provider_batch_id"] = orphan.as_str().into();
    let map = void.as_object_mut().unwrap();
    map.remove("terminal");
    map.remove("released");
    produce(
        &topics.state,
        &[Produce::json(&format!("{local_batch}/submitted/zombie"), &void).in_partition(0)],
    )
    .await;

    // The owner's tail reads it: the batch is done, so the create is an
    // orphan, cancelled at once and counted.
    wait_for_orphans(&listen, 1.0).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = sim_batch_status(&sim, &orphan).await;
        if status == "cancelling" || status == "cancelled" {
            break;
        }
        assert!(Instant::now() < deadline, "the orphan is {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    batchline.stop().await;

    // A new owner finds it again when it replays the journal.
    let again = Batchline::start(cfg);
    wait_until_serving(&format!("http://{listen}")).await;
    wait_for_orphans(&listen, 1.0).await;
    again.stop().await;
    // The orphan billed nothing: it was cancelled before it ran.
    let stats = sim.stats().await;
    assert_eq!(
        stats["custom_ids"]["orphan-000"]["billed"].as_u64(),
        Some(1),
        "billed once, by the real batch: {stats}"
    );
}
