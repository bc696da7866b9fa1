//! `batchline bench`: measures batchline against raw Kafka on one broker in
//! one run, and its memory while it holds many requests.
//!
//! - **throughput**: the passthrough ceiling (consume N messages from one
//!   topic and produce them to another with rust-rdkafka, nothing else),
//!   then batchline end to end (produce → windows → upload → the simulator
//!   with zero latency → download → parse → publish), from first produce to
//!   last result. batchline runs as a child process, so its peak RSS and CPU
//!   time are its own.
//! - **hold**: N requests held at once (long windows, a simulator that never
//!   finishes) at several sizes; reports the RSS slope per held request,
//!   fitted over all of them.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use tokio_util::sync::CancellationToken;

use crate::sim::SimConfig;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Failed(String),
}

pub struct BenchOptions {
    pub brokers: String,
    pub requests: usize,
    pub partitions: i32,
    pub body_bytes: usize,
    /// batchline's `window.max_wait` in the throughput run.
    pub max_wait: Duration,
    /// `compression.type` of the producer that writes the input, in both
    /// runs (the producers stand in for other services' machines).
    pub compression: String,
    /// `fetch.wait.max.ms` of both input consumers, when set.
    pub fetch_wait: Option<Duration>,
    /// Give up on a phase after this long.
    pub timeout: Duration,
}

fn run_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_owned()
}

async fn create_topics(brokers: &str, names: &[&str], partitions: i32) -> Result<(), BenchError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1)))
        .collect();
    for r in admin.create_topics(&topics, &AdminOptions::new()).await? {
        r.map_err(|(t, e)| BenchError::Failed(format!("creating {t}: {e}")))?;
    }
    Ok(())
}

/// Vocabulary of the benchmark's prompts.
const WORDS: &[&str] = &[
    "the",
    "model",
    "batch",
    "request",
    "summarise",
    "explain",
    "customer",
    "invoice",
    "order",
    "shipping",
    "delay",
    "refund",
    "policy",
    "question",
    "answer",
    "context",
    "document",
    "paragraph",
    "translate",
    "French",
    "German",
    "classify",
    "sentiment",
    "positive",
    "negative",
    "neutral",
    "extract",
    "entities",
    "names",
    "dates",
    "amounts",
    "table",
    "report",
    "quarter",
    "revenue",
    "growth",
    "risk",
    "market",
    "product",
    "feature",
    "release",
    "notes",
    "bug",
    "crash",
    "memory",
    "latency",
    "throughput",
    "Kafka",
    "topic",
    "partition",
    "offset",
    "consumer",
    "producer",
    "provider",
    "token",
    "price",
    "cost",
    "please",
    "briefly",
    "detail",
    "example",
    "list",
    "steps",
    "first",
    "second",
    "third",
    "because",
    "however",
    "therefore",
    "although",
    "while",
    "after",
    "before",
    "during",
    "2024",
    "2025",
    "42",
    "17",
    "3.14",
    "version",
    "user",
    "assistant",
    "system",
    "prompt",
    "review",
    "email",
    "reply",
    "meeting",
    "schedule",
    "tomorrow",
    "Monday",
    "urgent",
];

/// Request `i`: a chat request of about `body_bytes`, as producers send
/// them, keyed by its custom_id.
pub fn request_message(i: usize, body_bytes: usize) -> (String, String) {
    let id = format!("bench-{i:08}");
    // Words drawn per message, so that compression sees text about as
    // compressible as real prompts (3-4x with zstd), not one repeated
    // string (100x and more, which says nothing about real input).
    let want = body_bytes.saturating_sub(160).max(16);
    let mut text = String::with_capacity(want + 16);
    let mut x = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while text.len() < want {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let word = WORDS[(x % WORDS.len() as u64) as usize];
        text.push_str(word);
        text.push(if x % 11 == 0 { '.' } else { ' ' });
    }
    text.truncate(want);
    let model = if i % 2 == 0 { "gpt-4o-mini" } else { "gpt-4o" };
    // Written out rather than built as a `serde_json::Value`: the words need
    // no escaping, and building maps per message cost the benchmark's own
    // process more CPU than producing them.
    let value = format!(
        r#"{{"custom_id":"{id}","provider":"openai","body":{{"model":"{model}","messages":[{{"role":"user","content":"{text}"}}],"max_tokens":32}},"metadata":{{"n":{i}}}}}"#
    );
    (id, value)
}

/// Delivery reports of a benchmark producer, counted in its callback: the
/// same way batchline's results producer tracks its deliveries, so that
/// neither side of the comparison pays for a future per message.
#[derive(Default)]
struct DeliveryCount {
    delivered: AtomicUsize,
    failed: Mutex<Option<KafkaError>>,
}

struct CountingContext(Arc<DeliveryCount>);

impl ClientContext for CountingContext {}

impl ProducerContext for CountingContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.0.delivered.fetch_add(1, Ordering::Release);
            }
            Err((e, _)) => {
                self.0
                    .failed
                    .lock()
                    .expect("delivery count lock")
                    .get_or_insert(e.clone());
            }
        }
    }
}

/// A producer that counts its deliveries.
struct CountingProducer {
    producer: ThreadedProducer<CountingContext>,
    count: Arc<DeliveryCount>,
    sent: usize,
}

impl CountingProducer {
    fn new(config: &ClientConfig) -> Result<Self, BenchError> {
        let count = Arc::new(DeliveryCount::default());
        let producer = config.create_with_context(CountingContext(count.clone()))?;
        Ok(CountingProducer {
            producer,
            count,
            sent: 0,
        })
    }

    /// Queues one message, waiting while librdkafka's queue is full.
    async fn send(&mut self, topic: &str, key: &[u8], payload: &[u8]) -> Result<(), BenchError> {
        loop {
            let record = BaseRecord::to(topic).key(key).payload(payload);
            match self.producer.send(record) {
                Ok(()) => {
                    self.sent += 1;
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    self.check()?;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }

    fn check(&self) -> Result<(), BenchError> {
        match self
            .count
            .failed
            .lock()
            .expect("delivery count lock")
            .take()
        {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Waits until the broker has every message sent, up to `timeout`.
    async fn delivered(&self, timeout: Duration) -> Result<(), BenchError> {
        let started = Instant::now();
        while self.count.delivered.load(Ordering::Acquire) < self.sent {
            self.check()?;
            if started.elapsed() > timeout {
                return Err(BenchError::Failed(format!(
                    "{} of {} messages delivered after {timeout:?}",
                    self.count.delivered.load(Ordering::Acquire),
                    self.sent
                )));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }
}

async fn produce_requests(opts: &BenchOptions, topic: &str, n: usize) -> Result<(), BenchError> {
    let mut producer = CountingProducer::new(
        ClientConfig::new()
            .set("bootstrap.servers", &opts.brokers)
            .set("linger.ms", "10")
            .set("compression.type", &opts.compression)
            .set("queue.buffering.max.kbytes", "262144"),
    )?;
    for i in 0..n {
        let (key, value) = request_message(i, opts.body_bytes);
        producer
            .send(topic, key.as_bytes(), value.as_bytes())
            .await?;
    }
    producer.delivered(opts.timeout).await
}

/// Consumes `n` messages from `from` and produces them to `to`; returns
/// the time from the first consumed message to the last delivery.
async fn passthrough(
    opts: &BenchOptions,
    from: &str,
    to: &str,
    n: usize,
) -> Result<Duration, BenchError> {
    let (brokers, timeout) = (opts.brokers.as_str(), opts.timeout);
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("bench-pass-{}", run_id()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false");
    if let Some(wait) = opts.fetch_wait {
        config.set("fetch.wait.max.ms", wait.as_millis().to_string());
    }
    let consumer: BaseConsumer = config.create()?;
    consumer.subscribe(&[from])?;
    let mut producer = CountingProducer::new(
        ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "5")
            .set("enable.idempotence", "true")
            .set("compression.type", "zstd")
            .set("queue.buffering.max.kbytes", "262144"),
    )?;
    let started = Instant::now();
    let mut first: Option<Instant> = None;
    let mut consumed = 0;
    while consumed < n {
        if started.elapsed() > timeout {
            return Err(BenchError::Failed(format!(
                "passthrough consumed {consumed} of {n} in {timeout:?}"
            )));
        }
        let m = tokio::task::block_in_place(|| consumer.poll(Duration::from_millis(100)));
        let Some(m) = m else { continue };
        let m = m?;
        first.get_or_insert_with(Instant::now);
        producer
            .send(
                to,
                m.key().unwrap_or_default(),
                m.payload().unwrap_or_default(),
            )
            .await?;
        consumed += 1;
    }
    producer.delivered(timeout).await?;
    Ok(first.map_or(Duration::ZERO, |f| f.elapsed()))
}

/// Reads `topic` until `n` distinct keys have arrived.
fn await_results(
    brokers: &str,
    topic: &str,
    n: usize,
    timeout: Duration,
) -> Result<(), BenchError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("bench-results-{}", run_id()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        // The clock stops when this reader sees the last result. Tansu holds
        // a fetch for about half of this wait even when data is there, so
        // librdkafka's 500 ms would add up to that much to the measurement.
        .set("fetch.wait.max.ms", "100")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut seen = HashSet::with_capacity(n);
    let started = Instant::now();
    while seen.len() < n {
        if started.elapsed() > timeout {
            return Err(BenchError::Failed(format!(
                "{} of {n} results after {timeout:?}",
                seen.len()
            )));
        }
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m?;
            if let Some(k) = m.key() {
                seen.insert(k.to_vec());
            }
        }
    }
    Ok(())
}

/// Resident memory and CPU of a process, from /proc.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStats {
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
    pub cpu_seconds: f64,
}

pub fn proc_stats(pid: u32) -> Result<ProcStats, BenchError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = |field: &str| {
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at ')'.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11)
        .and_then(|u| u.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0);
    // The kernel's USER_HZ is 100 on every Linux platform batchline runs on.
    Ok(ProcStats {
        rss_bytes: kb("VmRSS:"),
        peak_rss_bytes: kb("VmHWM:"),
        cpu_seconds: ticks / 100.0,
    })
}

/// A `batchline run` child with the given topics, pointed at `sim_addr`.
struct BatchlineChild {
    child: Child,
    http: String,
}

fn free_addr() -> Result<String, BenchError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.to_string())
}

fn spawn_batchline(
    brokers: &str,
    id: &str,
    sim_addr: &str,
    spool: &Path,
    extra: &[(&str, &str)],
) -> Result<BatchlineChild, BenchError> {
    let http = free_addr()?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("run")
        .env("BATCHLINE__KAFKA__BROKERS", brokers)
        .env("BATCHLINE__KAFKA__GROUP_ID", format!("bench-{id}"))
        .env("BATCHLINE__TOPICS__REQUESTS", format!("bench-req-{id}"))
        .env("BATCHLINE__TOPICS__RESULTS", format!("bench-res-{id}"))
        .env("BATCHLINE__TOPICS__DLQ", format!("bench-dlq-{id}"))
        .env("BATCHLINE__TOPICS__STATE", format!("bench-state-{id}"))
        .env(
            "BATCHLINE__PROVIDERS__OPENAI__BASE_URL",
            format!("http://{sim_addr}/openai/v1"),
        )
        .env("BATCHLINE__PROVIDERS__OPENAI__POLL_INTERVAL", "50ms")
        .env("BATCHLINE__PROVIDERS__OPENAI__MAX_BATCHES_IN_FLIGHT", "100")
        .env("BATCHLINE__SPOOL__DIR", spool)
        .env("BATCHLINE__HTTP__LISTEN", &http)
        .env("OPENAI_API_KEY", "sk-bench")
        .env(
            "RUST_LOG",
            std::env::var("BENCH_RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    Ok(BatchlineChild {
        child: cmd.spawn()?,
        http,
    })
}

async fn start_sim(config: SimConfig) -> Result<(String, CancellationToken), BenchError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let stop = CancellationToken::new();
    tokio::spawn(crate::sim::serve(listener, config, stop.clone()));
    Ok((addr, stop))
}

fn zero_latency() -> SimConfig {
    SimConfig {
        validate_duration: Duration::ZERO,
        batch_duration: Duration::ZERO,
        finalize_duration: Duration::ZERO,
        ..SimConfig::default()
    }
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

/// The throughput comparison. Prints its report and returns it.
pub async fn throughput(opts: &BenchOptions) -> Result<String, BenchError> {
    let id = run_id();
    let (pass_in, pass_out) = (
        format!("bench-pass-in-{id}"),
        format!("bench-pass-out-{id}"),
    );
    let req = format!("bench-req-{id}");
    create_topics(&opts.brokers, &[&pass_in, &pass_out, &req], opts.partitions).await?;
    let n = opts.requests;

    eprintln!(
        "passthrough: producing {n} messages of ~{} bytes",
        opts.body_bytes
    );
    let producing = Instant::now();
    produce_requests(opts, &pass_in, n).await?;
    let produce = producing.elapsed();
    eprintln!(
        "passthrough: produced in {produce:.2?} ({:.0}/s)",
        n as f64 / produce.as_secs_f64()
    );
    // The passthrough runs in this process, alone: its CPU is this
    // process's over the run.
    let cpu_before = proc_stats(std::process::id())?.cpu_seconds;
    let pass = passthrough(opts, &pass_in, &pass_out, n).await?;
    let pass_cpu = proc_stats(std::process::id())?.cpu_seconds - cpu_before;
    let pass_rate = n as f64 / pass.as_secs_f64();
    eprintln!("passthrough: {n} in {pass:.2?} ({pass_rate:.0}/s)");

    let (sim_addr, sim_stop) = start_sim(zero_latency()).await?;
    let spool = tempfile::tempdir()?;
    let max_wait = format!("{}ms", opts.max_wait.as_millis());
    let mut extra = vec![("BATCHLINE__WINDOW__MAX_WAIT", max_wait)];
    if let Some(wait) = opts.fetch_wait {
        extra.push((
            "BATCHLINE__KAFKA__CONSUMER__FETCH_WAIT_MAX_MS",
            wait.as_millis().to_string(),
        ));
    }
    let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut child = spawn_batchline(&opts.brokers, &id, &sim_addr, spool.path(), &extra)?;
    // The clock starts once batchline is ready (partitions assigned and
    // their journal replayed), as the ceiling's starts at its first message.
    wait_http(&child.http, "/readyz", opts.timeout).await?;
    let idle = proc_stats(child.child.id())?;
    eprintln!(
        "batchline: idle RSS {:.1} MiB; producing {n} requests",
        mb(idle.rss_bytes)
    );
    let started = Instant::now();
    let harness_before = proc_stats(std::process::id())?.cpu_seconds;
    let brokers = opts.brokers.clone();
    let results_topic = format!("bench-res-{id}");
    let timeout = opts.timeout;
    let waiter =
        tokio::task::spawn_blocking(move || await_results(&brokers, &results_topic, n, timeout));
    produce_requests(opts, &req, n).await?;
    waiter
        .await
        .map_err(|e| BenchError::Failed(e.to_string()))??;
    let e2e = started.elapsed();
    let stats = proc_stats(child.child.id())?;
    let harness_cpu = proc_stats(std::process::id())?.cpu_seconds - harness_before;
    let _ = child.child.kill();
    let _ = child.child.wait();
    sim_stop.cancel();
    let e2e_rate = n as f64 / e2e.as_secs_f64();

    let report = format!(
        "requests:            {n} of ~{body} bytes over {parts} partitions, window.max_wait {wait:?}, input {codec}, input fetch.wait.max.ms {fetch_wait}\n\
         passthrough ceiling: {pass_rate:>10.0} msg/s ({pass:.2?})\n\
         batchline e2e:       {e2e_rate:>10.0} req/s ({e2e:.2?}, first produce to last result)\n\
         ratio:               {ratio:>10.2}x of the ceiling\n\
         batchline idle RSS:  {idle:>10.1} MiB\n\
         batchline peak RSS:  {peak:>10.1} MiB\n\
         batchline CPU:       {cpu:>10.3} s per 1,000 requests ({total:.1} s)\n\
         passthrough CPU:     {pass_cpu_k:>10.3} s per 1,000 messages ({pass_cpu:.1} s, consumer and producer)\n\
         harness CPU in e2e:  {harness_cpu:>10.1} s (input producer, simulator, results consumer; same cores)\n",
        body = opts.body_bytes,
        parts = opts.partitions,
        wait = opts.max_wait,
        fetch_wait = opts
            .fetch_wait
            .map_or("500 (librdkafka's default)".into(), |w| w.as_millis().to_string()),
        codec = opts.compression,
        ratio = e2e_rate / pass_rate,
        idle = mb(idle.rss_bytes),
        peak = mb(stats.peak_rss_bytes),
        cpu = stats.cpu_seconds / (n as f64 / 1000.0),
        total = stats.cpu_seconds,
        pass_cpu_k = pass_cpu / (n as f64 / 1000.0),
    );
    Ok(report)
}

/// Waits until batchline answers 200 on `path`: `/healthz` once it serves,
/// `/readyz` once its partitions are assigned and replayed.
async fn wait_http(addr: &str, path: &str, timeout: Duration) -> Result<(), BenchError> {
    let started = Instant::now();
    loop {
        if let Ok(r) = reqwest::get(format!("http://{addr}{path}")).await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if started.elapsed() > timeout {
            return Err(BenchError::Failed(format!(
                "batchline did not answer 200 on {addr}{path}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads a counter or gauge from batchline's metrics.
async fn metric(addr: &str, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// RSS of batchline holding `n` requests: windows that seal at 50,000 and
/// batches the simulator never finishes.
async fn hold_once(opts: &BenchOptions, n: usize) -> Result<ProcStats, BenchError> {
    let id = run_id();
    let req = format!("bench-req-{id}");
    create_topics(&opts.brokers, &[&req], opts.partitions).await?;
    eprintln!("hold: producing {n} requests");
    produce_requests(opts, &req, n).await?;
    let (sim_addr, sim_stop) = start_sim(SimConfig {
        batch_duration: Duration::from_secs(24 * 3600),
        ..SimConfig::default()
    })
    .await?;
    let spool = tempfile::tempdir()?;
    let mut child = spawn_batchline(
        &opts.brokers,
        &id,
        &sim_addr,
        spool.path(),
        &[
            ("BATCHLINE__WINDOW__MAX_WAIT", "1h"),
            ("BATCHLINE__WINDOW__MAX_REQUESTS", "50000"),
        ],
    )?;
    wait_http(&child.http, "/healthz", opts.timeout).await?;
    let started = Instant::now();
    loop {
        let consumed = metric(&child.http, "batchline_requests_consumed_total")
            .await
            .unwrap_or(0.0);
        if consumed as usize >= n {
            break;
        }
        if started.elapsed() > opts.timeout {
            return Err(BenchError::Failed(format!(
                "hold: consumed {consumed} of {n}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Measure once every sealed window has reached the provider: when the
    // count of submitted batches has held still for a while.
    let mut submitted = -1.0;
    let mut still_since = Instant::now();
    while still_since.elapsed() < HOLD_SETTLE {
        if started.elapsed() > opts.timeout {
            return Err(BenchError::Failed(
                "hold: batches were still being submitted".to_owned(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = metric(&child.http, "batchline_batches_submitted_total")
            .await
            .unwrap_or(0.0);
        if now != submitted {
            submitted = now;
            still_since = Instant::now();
        }
    }
    let stats = proc_stats(child.child.id())?;
    if let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", child.child.id())) {
        let detail: Vec<&str> = status
            .lines()
            .filter(|l| {
                l.starts_with("RssAnon") || l.starts_with("RssFile") || l.starts_with("RssShmem")
            })
            .collect();
        eprintln!(
            "hold {n}: {}",
            detail
                .join(", ")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    let _ = child.child.kill();
    let _ = child.child.wait();
    sim_stop.cancel();
    Ok(stats)
}

/// How long the count of submitted batches must hold still before the
/// memory of a hold run is read.
const HOLD_SETTLE: Duration = Duration::from_secs(2);

/// `points` sizes evenly spaced from `small` to `large`, both included.
pub fn hold_sizes(small: usize, large: usize, points: usize) -> Vec<usize> {
    let points = points.max(2);
    (0..points)
        .map(|i| small + (large.saturating_sub(small)) * i / (points - 1))
        .collect()
}

/// The least-squares slope of `y` over `x`; `None` with fewer than two
/// distinct `x`.
fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// The memory measurement at each of `sizes`.
pub async fn hold(opts: &BenchOptions, sizes: &[usize]) -> Result<String, BenchError> {
    let mut out = String::new();
    let mut points = Vec::new();
    for &n in sizes {
        let stats = hold_once(opts, n).await?;
        out.push_str(&format!(
            "held {n:>9}: RSS {:>8.1} MiB (peak {:.1} MiB)\n",
            mb(stats.rss_bytes),
            mb(stats.peak_rss_bytes),
        ));
        points.push((n as f64, stats.rss_bytes as f64));
    }
    let slope = slope(&points)
        .ok_or_else(|| BenchError::Failed("hold: needs two different sizes".to_owned()))?;
    out.push_str(&format!(
        "slope:            {slope:>8.1} bytes per held request (least squares over {} sizes; bodies of ~{} bytes live on disk)\n",
        sizes.len(),
        opts.body_bytes,
    ));
    Ok(out)
}

impl std::fmt::Debug for BatchlineChild {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Child")
            .field("pid", &self.child.id())
            .field("http", &self.http)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_sizes_are_evenly_spaced_and_the_slope_is_fitted_over_all() {
        assert_eq!(
            hold_sizes(250_000, 1_000_000, 4),
            [250_000, 500_000, 750_000, 1_000_000]
        );
        assert_eq!(hold_sizes(10, 20, 2), [10, 20]);
        let exact = [(1.0, 12.0), (2.0, 14.0), (3.0, 16.0)];
        assert_eq!(slope(&exact), Some(2.0));
        // Every point counts, not only the ends (which give 20 here).
        let noisy = [(0.0, 0.0), (1.0, 10.0), (2.0, 20.0), (3.0, 60.0)];
        let fitted = slope(&noisy).unwrap();
        assert!((fitted - 19.0).abs() < 1e-9, "{fitted}");
        assert_eq!(slope(&[(1.0, 1.0), (1.0, 2.0)]), None);
    }

    #[test]
    fn bench_requests_are_valid_requests_of_about_the_asked_size() {
        for (i, size) in [(0, 1024), (1, 1024), (7, 4096), (12_345, 200)] {
            let (key, value) = request_message(i, size);
            let d = crate::model::decode_request(Some(key.as_bytes()), Some(value.as_bytes()))
                .unwrap_or_else(|r| panic!("request {i} rejected: {}", r.message));
            assert_eq!(d.custom_id, key);
            assert_eq!(d.provider.as_deref(), Some("openai"));
            let model = if i % 2 == 0 { "gpt-4o-mini" } else { "gpt-4o" };
            assert_eq!(d.model, model);
            assert_eq!(d.metadata.unwrap().get(), format!(r#"{{"n":{i}}}"#));
            let body: serde_json::Value = serde_json::from_str(d.body.get()).unwrap();
            assert_eq!(body["max_tokens"], 32);
            assert!(
                value.len().abs_diff(size) < 100,
                "request {i}: {} bytes for {size}",
                value.len()
            );
        }
        // Drawn per message: two messages do not share their text.
        assert_ne!(
            request_message(1, 1024).1[60..],
            request_message(2, 1024).1[60..]
        );
    }
}
