//! Collector micro-benchmark, no broker: parse and map provider results the
//! way the collector does (parse the line, summarise the body, build and
//! serialise the result record) for a 50,000-line OpenAI output file, a
//! 100,000-line Anthropic results stream and paginated xAI results.
//!
//! Run: `cargo bench --bench collector`. Reports results/s and MB/s on one
//! core.

use std::time::Instant;

use batchline::collector::summarize;
use batchline::config::ProviderKind;
use batchline::model::{ResultRecord, Source, Status, Timings};
use batchline::provider::{LineOutcome, LineResult};
use serde_json::{json, Value};

fn params(i: usize) -> Value {
    json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": format!("Summarise support ticket number {i}: the customer cannot log in after a password reset and asks for help.")}],
        "max_tokens": 64
    })
}

fn openai_file(n: usize) -> String {
    let mut out = String::new();
    for i in 0..n {
        let body = batchline::sim::openai::response_body(
            "/v1/chat/completions",
            &params(i),
            1_700_000_000,
        );
        let line = json!({"id": format!("batch_req_{i}"), "custom_id": format!("req-{i:06}"), "response": {"status_code": 200, "request_id": format!("req_{i}"), "body": body}, "error": null});
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out
}

fn anthropic_stream(n: usize) -> String {
    let mut out = String::new();
    for i in 0..n {
        let mut p = params(i);
        p["model"] = "claude-haiku-4-5".into();
        let message = batchline::sim::anthropic::message_body(&p, "msgbatch_bench");
        let line = json!({"custom_id": format!("req-{i:06}"), "result": {"type": "succeeded", "message": message}});
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out
}

fn xai_pages(n: usize, page: usize) -> Vec<String> {
    (0..n)
        .collect::<Vec<_>>()
        .chunks(page)
        .map(|chunk| {
            let rows: Vec<Value> = chunk
                .iter()
                .map(|&i| {
                    let mut p = params(i);
                    p["model"] = "grok-4.3".into();
                    let body = batchline::sim::xai::chat_completion(&p, 1_700_000_000);
                    json!({"batch_request_id": format!("req-{i:06}"), "batch_result": {"response": {"chat_get_completion": body}}})
                })
                .collect();
            json!({"results": rows, "pagination_token": "next"}).to_string()
        })
        .collect()
}

/// What the collector does with each line once it is parsed.
fn publishable(kind: ProviderKind, endpoint: &str, outcome: LineOutcome) -> usize {
    let (status, body) = match outcome.result {
        LineResult::Succeeded { body } => (Status::Succeeded, Some(body)),
        LineResult::Failed { status, body, .. } => (status, body),
    };
    let summary = body
        .as_deref()
        .map(|b| summarize(kind, endpoint, b))
        .unwrap_or_default();
    let mut record = ResultRecord {
        custom_id: &outcome.custom_id,
        status,
        provider: Some("bench"),
        model: summary.model.as_deref(),
        batch_id: Some("batch_bench"),
        attempt: 1,
        response: body.as_deref(),
        content: summary.content.as_deref(),
        finish_reason: summary.finish_reason,
        usage: summary.usage,
        cost_usd: summary.provider_cost_usd,
        error: None,
        metadata: None,
        source: Source {
            topic: "llm.requests".into(),
            partition: 0,
            offset: 0,
        },
        timings: Timings::default(),
        truncated: false,
    };
    record.to_bytes(1_000_000).len()
}

fn report(name: &str, results: usize, input_bytes: usize, secs: f64) {
    println!(
        "{name:<34} {results:>7} results  {:>10.0} results/s  {:>7.1} MB/s  ({secs:.3} s)",
        results as f64 / secs,
        input_bytes as f64 / 1e6 / secs
    );
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: run a tiny size then.
    let full = std::env::args().any(|a| a == "--bench");
    let scale = if full { 1 } else { 100 };

    let file = openai_file(50_000 / scale);
    let start = Instant::now();
    let mut n = 0;
    for line in file.lines() {
        let o = batchline::provider::openai::parse_output_line(line).unwrap();
        publishable(ProviderKind::Openai, "/v1/chat/completions", o);
        n += 1;
    }
    report(
        "openai output file (50,000 lines)",
        n,
        file.len(),
        start.elapsed().as_secs_f64(),
    );

    let stream = anthropic_stream(100_000 / scale);
    let start = Instant::now();
    let mut n = 0;
    for line in stream.lines() {
        let o = batchline::provider::anthropic::parse_result_line(line).unwrap();
        publishable(ProviderKind::Anthropic, "/v1/messages", o);
        n += 1;
    }
    report(
        "anthropic results (100,000 lines)",
        n,
        stream.len(),
        start.elapsed().as_secs_f64(),
    );

    let pages = xai_pages(50_000 / scale, 1000);
    let bytes: usize = pages.iter().map(String::len).sum();
    let start = Instant::now();
    let mut n = 0;
    for page in &pages {
        #[derive(serde::Deserialize)]
        struct Page {
            results: Vec<Box<serde_json::value::RawValue>>,
        }
        let page: Page = serde_json::from_str(page).unwrap();
        for row in page.results {
            let o = batchline::provider::xai::parse_result_row(row.get()).unwrap();
            publishable(ProviderKind::Xai, "/v1/chat/completions", o);
            n += 1;
        }
    }
    report(
        "xai results (50 pages of 1,000)",
        n,
        bytes,
        start.elapsed().as_secs_f64(),
    );
}
