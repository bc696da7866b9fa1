//! Every metric batchline exports, declared once. Each event has a named
//! method so the counter and the code that causes it move together. Labels
//! are of low cardinality only: provider, model, status, reason; never a
//! custom_id or a batch id.

use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::collector::Collected;
use crate::health::Readiness;
use crate::model::RejectReason;
use crate::packer::Route;

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    requests_consumed: IntCounter,
    requests_rejected: IntCounterVec,
    dead_letters: IntCounterVec,
    results_published: IntCounterVec,
    held_requests: IntGauge,
    held_bytes: IntGauge,
    open_windows: IntGauge,
    batches_submitted: IntCounterVec,
    batches_in_flight: IntGaugeVec,
    batches_ended: IntCounterVec,
    batch_requests: HistogramVec,
    batch_bytes: HistogramVec,
    batch_duration: HistogramVec,
    ambiguous_creates: IntCounterVec,
    route_failing: IntGaugeVec,
    tokens: IntCounterVec,
    cost: prometheus::CounterVec,
    consumer_paused: IntGauge,
    commit_lag: Histogram,
    journal_replay: Histogram,
    orphans: IntCounterVec,
    cancels_requested: IntCounterVec,
    resubmitted: IntCounterVec,
    provider_requests: IntCounterVec,
    provider_request_duration: HistogramVec,
    ready: IntGauge,
    input_retention_short: IntGauge,
    consumer_lag: IntGaugeVec,
    budget_limit: prometheus::Gauge,
    budget_spent: prometheus::Gauge,
    budget_reserved: prometheus::Gauge,
    budget_held: IntGauge,
    /// Read at each scrape for `batchline_ready`; a failing route is
    /// recorded in it too.
    readiness: Readiness,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

fn float_gauge(r: &Registry, name: &str, help: &str) -> prometheus::Gauge {
    let g = prometheus::Gauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric");
    r.register(Box::new(h.clone()))
        .expect("metric registered once");
    h
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Metrics with a readiness of their own (for tests and tools).
    pub fn new() -> Metrics {
        Metrics::with_readiness(Readiness::new())
    }

    /// Metrics that record failing routes in, and report, `readiness`.
    pub fn with_readiness(readiness: Readiness) -> Metrics {
        let r = Registry::new();
        let requests_consumed =
            IntCounter::new("batchline_requests_consumed_total", "Input messages read.")
                .expect("valid metric");
        r.register(Box::new(requests_consumed.clone()))
            .expect("metric registered once");
        let requests_rejected = counter_vec(
            &r,
            "batchline_requests_rejected_total",
            "Input messages refused, by reason.",
            &["reason"],
        );
        for reason in RejectReason::ALL {
            requests_rejected.with_label_values(&[reason.as_str()]);
        }
        let duration_buckets = vec![
            1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0,
            172800.0,
        ];
        let commit_lag = Histogram::with_opts(
            HistogramOpts::new(
                "batchline_request_latency_seconds",
                "Time from an input message's timestamp to its result's delivery.",
            )
            .buckets(duration_buckets.clone()),
        )
        .expect("valid metric");
        r.register(Box::new(commit_lag.clone()))
            .expect("metric registered once");
        let journal_replay = Histogram::with_opts(
            HistogramOpts::new(
                "batchline_journal_replay_seconds",
                "Time to claim a partition and replay its journal.",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0]),
        )
        .expect("valid metric");
        r.register(Box::new(journal_replay.clone()))
            .expect("metric registered once");
        // Constant 1, so dashboards can show (and join on) the version.
        gauge_vec(
            &r,
            "batchline_build_info",
            "Always 1; the version label says which build is running.",
            &["version"],
        )
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
        Metrics {
            requests_consumed,
            requests_rejected,
            dead_letters: {
                let c = counter_vec(
                    &r,
                    "batchline_dead_letters_total",
                    "Refused inputs written to the dead-letter topic, by reason.",
                    &["reason"],
                );
                for reason in RejectReason::ALL {
                    c.with_label_values(&[reason.as_str()]);
                }
                c
            },
            results_published: counter_vec(
                &r,
                "batchline_results_published_total",
                "Results delivered, by provider and status.",
                &["provider", "status"],
            ),
            held_requests: gauge(
                &r,
                "batchline_held_requests",
                "Requests read and not yet answered.",
            ),
            held_bytes: gauge(
                &r,
                "batchline_spool_bytes",
                "Bytes of batch input held in spool files.",
            ),
            open_windows: gauge(
                &r,
                "batchline_open_windows",
                "Windows open for new requests.",
            ),
            batches_submitted: counter_vec(
                &r,
                "batchline_batches_submitted_total",
                "Provider batches created.",
                &["provider", "model"],
            ),
            batches_in_flight: gauge_vec(
                &r,
                "batchline_batches_in_flight",
                "Provider batches created and not yet collected.",
                &["provider"],
            ),
            batches_ended: counter_vec(
                &r,
                "batchline_batches_ended_total",
                "Provider batches ended, by final state.",
                &["provider", "status"],
            ),
            batch_requests: histogram_vec(
                &r,
                "batchline_batch_requests",
                "Requests per submitted batch.",
                &["provider"],
                vec![
                    1.0, 10.0, 100.0, 1000.0, 5000.0, 10000.0, 25000.0, 50000.0, 100000.0,
                ],
            ),
            batch_bytes: histogram_vec(
                &r,
                "batchline_batch_bytes",
                "Input bytes per submitted batch.",
                &["provider"],
                prometheus::exponential_buckets(1024.0, 4.0, 10).expect("valid buckets"),
            ),
            batch_duration: histogram_vec(
                &r,
                "batchline_batch_duration_seconds",
                "Time from window open to provider batch end.",
                &["provider"],
                duration_buckets,
            ),
            ambiguous_creates: counter_vec(
                &r,
                "batchline_ambiguous_creates_total",
                "Creates whose outcome was unknown and resolved by lookup.",
                &["provider"],
            ),
            route_failing: gauge_vec(
                &r,
                "batchline_provider_failing",
                "1 while a provider refuses credentials or quota.",
                &["provider"],
            ),
            tokens: counter_vec(
                &r,
                "batchline_tokens_total",
                "Tokens billed, by provider, model and direction.",
                &["provider", "model", "direction"],
            ),
            cost: {
                let c = prometheus::CounterVec::new(
                    Opts::new("batchline_cost_usd_total", "Estimated spend in USD."),
                    &["provider", "model"],
                )
                .expect("valid metric");
                r.register(Box::new(c.clone()))
                    .expect("metric registered once");
                c
            },
            consumer_paused: gauge(
                &r,
                "batchline_consumer_paused",
                "1 while consumption is paused, for backpressure or for the budget.",
            ),
            commit_lag,
            journal_replay,
            orphans: counter_vec(
                &r,
                "batchline_orphan_batches_total",
                "Provider batches found for work already finished, cancelled at once.",
                &["provider"],
            ),
            cancels_requested: counter_vec(
                &r,
                "batchline_cancels_requested_total",
                "Batch cancels accepted through the status API.",
                &["provider"],
            ),
            resubmitted: counter_vec(
                &r,
                "batchline_requests_resubmitted_total",
                "Requests handed to a new batch: reason retry (expired or a server error, an attempt spent), split (too large for the provider), failed_lines (the rest of a batch failed for named lines) or resubmit (a create found by lookup whose batch failed before it ran).",
                &["provider", "reason"],
            ),
            provider_requests: counter_vec(
                &r,
                "batchline_provider_requests_total",
                "HTTP calls to provider APIs, by operation and HTTP status (`error`: no answer).",
                &["provider", "operation", "status"],
            ),
            provider_request_duration: histogram_vec(
                &r,
                "batchline_provider_request_duration_seconds",
                "Time from sending a provider HTTP call to its response headers (or failure).",
                &["provider", "operation"],
                vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0,
                ],
            ),
            ready: gauge(
                &r,
                "batchline_ready",
                "1 while /readyz answers 200: brokers reachable, partitions assigned and replayed, no provider failing.",
            ),
            input_retention_short: gauge(
                &r,
                "batchline_input_retention_short",
                "1 when the input topic's retention.ms is shorter than a request's longest life, or retention.bytes is set.",
            ),
            budget_limit: float_gauge(
                &r,
                "batchline_budget_limit_usd",
                "budget.max_usd_per_day in force (0 when there is no cap).",
            ),
            budget_spent: float_gauge(
                &r,
                "batchline_budget_spent_usd",
                "Cost of the results collected by this instance since 00:00 UTC.",
            ),
            budget_reserved: float_gauge(
                &r,
                "batchline_budget_reserved_usd",
                "Estimated cost of the batches admitted by this instance and not yet collected.",
            ),
            budget_held: gauge(
                &r,
                "batchline_budget_held_batches",
                "Batches waiting for the daily budget before they are submitted.",
            ),
            consumer_lag: gauge_vec(
                &r,
                "batchline_consumer_lag_messages",
                "Messages after the group's committed offset in each assigned input partition (librdkafka consumer_lag): read but unanswered requests count.",
                &["partition"],
            ),
            readiness,
            registry: r,
        }
    }

    /// What `/readyz` answers, shared with ingest and the start-up checks.
    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    pub fn request_consumed(&self) {
        self.requests_consumed.inc();
    }

    pub fn request_rejected(&self, reason: RejectReason) {
        self.requests_rejected
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// A refused input reached the DLQ, and its `rejected` result the
    /// results topic when a custom_id was known.
    pub fn rejection_published(
        &self,
        reason: RejectReason,
        provider: Option<&str>,
        with_result: bool,
    ) {
        self.dead_letters
            .with_label_values(&[reason.as_str()])
            .inc();
        if with_result {
            self.results_published
                .with_label_values(&[provider.unwrap_or(""), "rejected"])
                .inc();
        }
    }

    pub fn journal_replayed(&self, took: Duration) {
        self.journal_replay.observe(took.as_secs_f64());
    }

    pub fn requests_resubmitted(&self, provider: &str, reason: &str, n: usize) {
        self.resubmitted
            .with_label_values(&[provider, reason])
            .inc_by(n as u64);
    }

    pub fn cancel_requested(&self, provider: &str) {
        self.cancels_requested.with_label_values(&[provider]).inc();
    }

    pub fn orphan_batch(&self, provider: &str) {
        self.orphans.with_label_values(&[provider]).inc();
    }

    pub fn held(&self, requests: u64, bytes: u64, windows: usize) {
        self.held_requests.set(requests as i64);
        self.held_bytes.set(bytes as i64);
        self.open_windows.set(windows as i64);
    }

    pub fn consumer_paused(&self, paused: bool) {
        self.consumer_paused.set(paused as i64);
    }

    pub fn batch_submitted(&self, route: &Route, requests: usize, bytes: u64) {
        self.batches_submitted
            .with_label_values(&[&route.provider, &route.model])
            .inc();
        self.batches_in_flight
            .with_label_values(&[&route.provider])
            .inc();
        self.batch_requests
            .with_label_values(&[&route.provider])
            .observe(requests as f64);
        self.batch_bytes
            .with_label_values(&[&route.provider])
            .observe(bytes as f64);
    }

    pub fn batch_ended(&self, route: &Route, state: &str, age: Duration) {
        self.batches_in_flight
            .with_label_values(&[&route.provider])
            .dec();
        self.batches_ended
            .with_label_values(&[&route.provider, state])
            .inc();
        self.batch_duration
            .with_label_values(&[&route.provider])
            .observe(age.as_secs_f64());
    }

    pub fn results_published(&self, route: &Route, c: &Collected) {
        for (status, n) in &c.by_status {
            self.results_published
                .with_label_values(&[&route.provider, status.as_str()])
                .inc_by(*n);
        }
        self.tokens
            .with_label_values(&[&route.provider, &route.model, "input"])
            .inc_by(c.input_tokens);
        self.tokens
            .with_label_values(&[&route.provider, &route.model, "output"])
            .inc_by(c.output_tokens);
        if c.cost_usd > 0.0 {
            self.cost
                .with_label_values(&[&route.provider, &route.model])
                .inc_by(c.cost_usd);
        }
    }

    pub fn result_latency(&self, seconds: f64) {
        self.commit_lag.observe(seconds.max(0.0));
    }

    pub fn ambiguous_create(&self, provider: &str) {
        self.ambiguous_creates.with_label_values(&[provider]).inc();
    }

    /// The provider refuses credentials or quota: its requests are held
    /// and this instance is not ready until a create succeeds.
    pub fn route_failing(&self, provider: &str) {
        self.route_failing.with_label_values(&[provider]).set(1);
        self.readiness.provider_failing(provider);
    }

    pub fn route_ok(&self, provider: &str) {
        self.route_failing.with_label_values(&[provider]).set(0);
        self.readiness.provider_ok(provider);
    }

    /// The start-up check of the input topic's retention settings.
    /// The budget's figures, after every change.
    pub fn budget(&self, limit: Option<f64>, spent: f64, reserved: f64, held: usize) {
        self.budget_limit.set(limit.unwrap_or(0.0));
        self.budget_spent.set(spent);
        self.budget_reserved.set(reserved);
        self.budget_held.set(held as i64);
    }

    pub fn input_retention_short(&self, short: bool) {
        self.input_retention_short.set(short as i64);
    }

    /// An assigned input partition's lag, from librdkafka's statistics.
    pub fn consumer_lag(&self, partition: i32, messages: i64) {
        self.consumer_lag
            .with_label_values(&[&partition.to_string()])
            .set(messages);
    }

    /// A partition no longer reported (revoked): its lag series goes away
    /// rather than freezing at its last value.
    pub fn consumer_lag_gone(&self, partition: i32) {
        let _ = self
            .consumer_lag
            .remove_label_values(&[&partition.to_string()]);
    }

    /// Starts a configured provider's series at zero, so its failing flag,
    /// ambiguous creates and batches in flight read 0 rather than "no data"
    /// before the first event, and `rate()` sees the first increment.
    pub fn provider_configured(&self, provider: &str) {
        self.route_failing.with_label_values(&[provider]).set(0);
        self.ambiguous_creates.with_label_values(&[provider]);
        self.batches_in_flight.with_label_values(&[provider]);
    }

    /// One HTTP call to a provider: `operation` is a fixed name such as
    /// `create_batch` (never an id), `status` the HTTP status code or
    /// `error` when no answer came.
    pub fn provider_call(&self, provider: &str, operation: &str, status: &str, seconds: f64) {
        self.provider_requests
            .with_label_values(&[provider, operation, status])
            .inc();
        self.provider_request_duration
            .with_label_values(&[provider, operation])
            .observe(seconds.max(0.0));
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        self.ready.set(self.readiness.is_ready() as i64);
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding never fails");
        String::from_utf8(buf).expect("exposition is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_calls_render_by_operation_and_status() {
        let m = Metrics::new();
        m.provider_call("openai", "create_batch", "200", 0.12);
        m.provider_call("openai", "create_batch", "500", 0.3);
        m.provider_call("openai", "get_batch", "error", 10.0);
        let text = m.render();
        for line in [
            r#"batchline_provider_requests_total{operation="create_batch",provider="openai",status="200"} 1"#,
            r#"batchline_provider_requests_total{operation="create_batch",provider="openai",status="500"} 1"#,
            r#"batchline_provider_requests_total{operation="get_batch",provider="openai",status="error"} 1"#,
            r#"batchline_provider_request_duration_seconds_count{operation="create_batch",provider="openai"} 2"#,
            r#"batchline_provider_request_duration_seconds_bucket{operation="get_batch",provider="openai",le="10"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn build_info_names_the_version() {
        let text = Metrics::new().render();
        let line = format!(
            "batchline_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&line), "missing {line} in\n{text}");
    }

    #[test]
    fn readiness_is_rendered_at_each_scrape() {
        let m = Metrics::new();
        assert!(m.render().contains("batchline_ready 0"));
        m.readiness().partition_ready(0);
        assert!(m.render().contains("batchline_ready 1"));
        m.route_failing("openai");
        assert_eq!(
            m.readiness().reasons(),
            ["provider openai: credentials or quota refused"]
        );
        assert!(m.render().contains("batchline_ready 0"));
        m.route_ok("openai");
        assert!(m.render().contains("batchline_ready 1"));
    }

    #[test]
    fn a_revoked_partition_loses_its_lag_series() {
        let m = Metrics::new();
        m.consumer_lag(0, 12);
        m.consumer_lag(3, 0);
        let text = m.render();
        assert!(text.contains(r#"batchline_consumer_lag_messages{partition="0"} 12"#));
        assert!(text.contains(r#"batchline_consumer_lag_messages{partition="3"} 0"#));
        m.consumer_lag_gone(0);
        m.consumer_lag_gone(7);
        let text = m.render();
        assert!(!text.contains(r#"partition="0""#), "{text}");
        assert!(text.contains(r#"batchline_consumer_lag_messages{partition="3"} 0"#));
    }

    #[test]
    fn a_configured_provider_starts_at_zero() {
        let m = Metrics::new();
        m.provider_configured("anthropic");
        let text = m.render();
        for line in [
            r#"batchline_provider_failing{provider="anthropic"} 0"#,
            r#"batchline_ambiguous_creates_total{provider="anthropic"} 0"#,
            r#"batchline_batches_in_flight{provider="anthropic"} 0"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
