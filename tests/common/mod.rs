//! The fixture every integration test shares: a real Kafka-protocol broker
//! (Tansu started on a free 127.0.0.1 port, or `KAFKA_BROKERS`), provider
//! simulators served in-process, batchline run in-process, and helpers to
//! produce and read topics. Every test uses its own topics and group id.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use batchline::config::{Config, ProviderConfig, ProviderKind};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

mod process;
#[allow(unused_imports)]
pub use process::{wait_for_log, write_config, Process};

pub use batchline::sim::SimConfig;

/// How long a test waits for its results before failing.
pub const RESULT_TIMEOUT: Duration = Duration::from_secs(180);

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The command that runs a Tansu broker listening on `addr` with `storage`
/// (`$TANSU`, else `tansu` on the PATH). The broker gets SIGKILL when the
/// thread that spawned it ends.
pub fn tansu_broker(addr: &str, storage: &str) -> Command {
    let url = format!("tcp://{addr}");
    let mut cmd = Command::new(std::env::var("TANSU").unwrap_or_else(|_| "tansu".into()));
    cmd.args([
        "broker",
        "--listener-url",
        &url,
        "--advertised-listener-url",
        &url,
        "--storage-engine",
        storage,
    ]);
    // SAFETY: prctl only, between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd
}

struct Tansu {
    brokers: String,
    _child: Child,
}

/// Starts Tansu from a thread that lives as long as the test process, so the
/// parent-death signal kills the broker exactly when the tests end.
fn start_tansu() -> String {
    let port = free_port();
    let brokers = format!("127.0.0.1:{port}");
    let (tx, rx) = std::sync::mpsc::channel();
    let b = brokers.clone();
    std::thread::spawn(move || {
        let mut cmd = tansu_broker(&b, "memory://tansu/");
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let child = cmd.spawn().expect("starting tansu (install it with `cargo install tansu --locked --features dynostore,libsql`, or set KAFKA_BROKERS)");
        tx.send(Tansu {
            brokers: b,
            _child: child,
        })
        .unwrap();
        loop {
            std::thread::park();
        }
    });
    let tansu = rx.recv().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&tansu.brokers).is_err() {
        assert!(
            Instant::now() < deadline,
            "tansu did not start listening on {}",
            tansu.brokers
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::mem::forget(tansu);
    brokers
}

static BROKERS: OnceLock<String> = OnceLock::new();

/// The brokers every test in this process uses.
pub fn brokers() -> &'static str {
    BROKERS.get_or_init(|| std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| start_tansu()))
}

/// Points every helper of this test process at `addr` instead (a test that
/// starts and restarts its own broker). Must come before any `brokers()`.
pub fn use_brokers(addr: &str) {
    BROKERS
        .set(addr.to_owned())
        .expect("use_brokers comes before any use of brokers()");
}

/// A name unique to this test run.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

pub async fn create_topic(name: &str, partitions: i32) {
    create_topic_with(name, partitions, &[]).await
}

/// Creates `name` with topic configs such as `("retention.ms", "3600000")`.
pub async fn create_topic_with(name: &str, partitions: i32, configs: &[(&str, &str)]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let topic = configs.iter().fold(
        NewTopic::new(name, partitions, TopicReplication::Fixed(1)),
        |topic, (k, v)| topic.set(k, v),
    );
    let results = admin
        .create_topics(
            &[topic],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .unwrap();
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
    }
}

/// One record to produce.
#[derive(Clone, Debug)]
pub struct Produce {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub partition: Option<i32>,
}

impl Produce {
    pub fn json(key: &str, value: &serde_json::Value) -> Produce {
        Produce {
            key: Some(key.as_bytes().to_vec()),
            value: Some(serde_json::to_vec(value).unwrap()),
            partition: None,
        }
    }

    pub fn raw(key: Option<&str>, value: &[u8]) -> Produce {
        Produce {
            key: key.map(|k| k.as_bytes().to_vec()),
            value: Some(value.to_vec()),
            partition: None,
        }
    }

    pub fn in_partition(mut self, p: i32) -> Produce {
        self.partition = Some(p);
        self
    }
}

/// Produces every record, in order, and waits for their deliveries.
pub async fn produce(topic: &str, records: &[Produce]) {
    produce_with(topic, records, "10000").await
}

/// Produces each record in a record batch of its own. Tansu answers a fetch
/// from an offset inside a multi-record batch with the batch after it (or
/// nothing, inside the last one), so a consumer restarted from a committed
/// offset mid-batch never sees the rest of that batch. Tests that restart
/// consumers produce their input this way; real Kafka needs no such care.
pub async fn produce_unbatched(topic: &str, records: &[Produce]) {
    produce_with(topic, records, "1").await
}

async fn produce_with(topic: &str, records: &[Produce], batch_messages: &str) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("batch.num.messages", batch_messages)
        .create()
        .unwrap();
    let mut pending = Vec::with_capacity(records.len());
    for r in records {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
        if let Some(k) = &r.key {
            record = record.key(k);
        }
        if let Some(v) = &r.value {
            record = record.payload(v);
        }
        if let Some(p) = r.partition {
            record = record.partition(p);
        }
        pending.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
    }
    for d in pending {
        d.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
}

/// A consumed record.
#[derive(Clone, Debug)]
pub struct Record {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: BTreeMap<String, String>,
    pub partition: i32,
    pub offset: i64,
}

impl Record {
    pub fn key_str(&self) -> &str {
        std::str::from_utf8(self.key.as_deref().unwrap_or_default()).unwrap()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(self.value.as_deref().expect("record has a value"))
            .expect("record value is JSON")
    }
}

fn to_record(m: &rdkafka::message::BorrowedMessage<'_>) -> Record {
    let mut headers = BTreeMap::new();
    if let Some(h) = m.headers() {
        for header in h.iter() {
            headers.insert(
                header.key.to_owned(),
                String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
            );
        }
    }
    Record {
        key: m.key().map(<[u8]>::to_vec),
        value: m.payload().map(<[u8]>::to_vec),
        headers,
        partition: m.partition(),
        offset: m.offset(),
    }
}

fn reader(topic: &str) -> (BaseConsumer, Vec<i32>) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .unwrap();
    let mut partitions = Vec::new();
    let mut tpl = TopicPartitionList::new();
    for t in md.topics() {
        for p in t.partitions() {
            partitions.push(p.id());
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .unwrap();
        }
    }
    consumer.assign(&tpl).unwrap();
    (consumer, partitions)
}

/// Every record of `topic` written so far. Tansu's high watermark is not
/// the end of the log (it lags behind multi-record batches), so an end
/// marker is written to every partition and each is read up to its marker.
pub async fn read_all(topic: &str) -> Vec<Record> {
    let (consumer, partitions) = reader(topic);
    let marker = unique("end-of-log");
    let markers: Vec<Produce> = partitions
        .iter()
        .map(|&p| Produce::raw(Some(&marker), b"").in_partition(p))
        .collect();
    produce(topic, &markers).await;
    tokio::task::block_in_place(|| {
        let mut remaining: HashSet<i32> = partitions.into_iter().collect();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !remaining.is_empty() {
            assert!(
                Instant::now() < deadline,
                "reading {topic} to its end timed out"
            );
            let Some(m) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let r = to_record(&m.unwrap());
            if r.key_str() == marker {
                remaining.remove(&r.partition);
            } else {
                out.push(r);
            }
        }
        out
    })
}

/// Reads `topic` from the start until every key in `expected` has appeared.
pub fn wait_for_keys(topic: &str, expected: &HashSet<String>, timeout: Duration) -> Vec<Record> {
    let (out, missing) = read_until_keys(topic, expected, timeout);
    if !missing.is_empty() {
        let sample: Vec<_> = missing.iter().take(5).collect();
        panic!(
            "{} of {} results missing on {topic} after {timeout:?}, e.g. {sample:?}",
            missing.len(),
            expected.len()
        );
    }
    out
}

/// Reads `topic` from the start until every key in `expected` has appeared
/// or `timeout` has passed: the records read and the keys still missing.
pub fn read_until_keys(
    topic: &str,
    expected: &HashSet<String>,
    timeout: Duration,
) -> (Vec<Record>, HashSet<String>) {
    let (consumer, _) = reader(topic);
    tokio::task::block_in_place(|| {
        let mut missing = expected.clone();
        let mut out = Vec::new();
        let deadline = Instant::now() + timeout;
        while !missing.is_empty() && Instant::now() < deadline {
            let Some(m) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let r = to_record(&m.unwrap());
            missing.remove(r.key_str());
            out.push(r);
        }
        (out, missing)
    })
}

/// Reads `topic` from the start until `n` distinct keys have appeared.
pub fn wait_for_count(topic: &str, n: usize, timeout: Duration) {
    let (consumer, _) = reader(topic);
    tokio::task::block_in_place(|| {
        let mut seen = HashSet::new();
        let deadline = Instant::now() + timeout;
        while seen.len() < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} results on {topic} after {timeout:?}",
                seen.len()
            );
            if let Some(m) = consumer.poll(Duration::from_millis(200)) {
                seen.insert(to_record(&m.unwrap()).key_str().to_owned());
            }
        }
    })
}

/// The group's committed offset per partition.
pub fn committed(group: &str, topic: &str, partitions: i32) -> BTreeMap<i32, i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let c = consumer
        .committed_offsets(tpl, Duration::from_secs(30))
        .unwrap();
    c.elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect()
}

/// A provider simulator served in-process.
pub struct Sim {
    pub addr: String,
    shutdown: CancellationToken,
}

impl Sim {
    pub async fn start(config: SimConfig) -> Sim {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shutdown = CancellationToken::new();
        tokio::spawn(batchline::sim::serve(listener, config, shutdown.clone()));
        Sim { addr, shutdown }
    }

    /// The OpenAI base URL, as a provider's `base_url`.
    pub fn openai_url(&self) -> String {
        format!("http://{}/openai/v1", self.addr)
    }

    /// `GET` of a path of the simulator's OpenAI API, as JSON.
    pub async fn openai_get(&self, path: &str) -> serde_json::Value {
        reqwest::Client::new()
            .get(format!("{}{path}", self.openai_url()))
            .bearer_auth("sk-test")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn stats(&self) -> serde_json::Value {
        reqwest::get(format!("http://{}/sim/stats", self.addr))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Topics and group of one test.
pub struct Topics {
    pub requests: String,
    pub results: String,
    pub dlq: String,
    pub state: String,
    pub group: String,
}

impl Topics {
    pub async fn create(partitions: i32) -> Topics {
        let t = Topics::named();
        create_topic(&t.requests, partitions).await;
        t
    }

    /// Fresh names; no topic is created.
    pub fn named() -> Topics {
        Topics {
            requests: unique("requests"),
            results: unique("results"),
            dlq: unique("dlq"),
            state: unique("state"),
            group: unique("group"),
        }
    }
}

/// A configuration for tests: short timeouts, fast polls, one `openai`
/// provider pointed at `sim_url`, and a temporary spool directory.
pub fn test_config(topics: &Topics, sim_url: &str, spool: &std::path::Path) -> Config {
    let mut cfg = Config::load_from(None, Vec::<(String, String)>::new()).unwrap();
    cfg.kafka.brokers = brokers().to_owned();
    cfg.kafka.group_id = topics.group.clone();
    for (k, v) in [
        ("session.timeout.ms", "6000"),
        ("heartbeat.interval.ms", "500"),
        ("topic.metadata.refresh.interval.ms", "1000"),
        // Lag and broker states show within a second.
        ("statistics.interval.ms", "1000"),
    ] {
        cfg.kafka.consumer.insert(k.into(), v.into());
    }
    cfg.topics.requests = topics.requests.clone();
    cfg.topics.results = topics.results.clone();
    cfg.topics.dlq = topics.dlq.clone();
    cfg.topics.state = topics.state.clone();
    cfg.window.max_wait = Duration::from_millis(500);
    cfg.batch.lookup_grace = Duration::from_millis(300);
    cfg.retry.initial_backoff = Duration::from_millis(50);
    cfg.retry.max_backoff = Duration::from_millis(500);
    cfg.spool.dir = spool.to_owned();
    cfg.http.listen = "127.0.0.1:0".into();
    cfg.shutdown.timeout = Duration::from_secs(20);
    cfg.providers.clear();
    cfg.providers.insert("openai".into(), provider(sim_url));
    cfg
}

/// An OpenAI-kind provider at `base_url` with a key and fast polling.
pub fn provider(base_url: &str) -> ProviderConfig {
    ProviderConfig {
        kind: ProviderKind::Openai,
        base_url: base_url.to_owned(),
        api_key_env: None,
        api_key_file: None,
        poll_interval: Duration::from_millis(100),
        headers: Default::default(),
        max_batches_in_flight: Some(50),
        max_enqueued_tokens: None,
        max_wait: None,
        max_requests: None,
        max_bytes: None,
        request_timeout: Duration::from_secs(30),
        api_key: Some(batchline::config::ApiKey::new("sk-test-key")),
    }
}

/// batchline running in-process.
pub struct Batchline {
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), batchline::app::AppError>>,
}

impl Batchline {
    pub fn start(cfg: Config) -> Batchline {
        cfg.validate().expect("test configuration is valid");
        // RUST_LOG=batchline=info writes batchline's log to standard error
        // (every thread's, which the test harness would not capture).
        if let Ok(filter) = std::env::var("RUST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(false)
                .with_writer(std::io::stderr)
                .try_init();
        }
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(batchline::app::run(cfg, shutdown.clone()));
        Batchline { shutdown, handle }
    }

    /// Graceful shutdown: returns once batchline has drained and committed.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.handle)
            .await
            .expect("batchline stops within 60 s")
            .unwrap()
            .expect("batchline exits cleanly");
    }
}

/// `n` chat request messages for `provider` and `model`, with custom_ids
/// `<prefix>-00000`, `<prefix>-00001`, ... and prompts `<prefix> <i>`, and
/// the set of those custom_ids.
pub fn numbered_chat_requests(
    prefix: &str,
    provider: &str,
    model: &str,
    n: usize,
) -> (Vec<Produce>, HashSet<String>) {
    (0..n)
        .map(|i| {
            let id = format!("{prefix}-{i:05}");
            let request = chat_request(&id, provider, model, &format!("{prefix} {i}"));
            (Produce::json(&id, &request), id)
        })
        .unzip()
}

/// A chat request message for `custom_id`.
pub fn chat_request(custom_id: &str, provider: &str, model: &str, text: &str) -> serde_json::Value {
    serde_json::json!({
        "custom_id": custom_id,
        "provider": provider,
        "body": {
            "model": model,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": 200,
        },
        "metadata": {"test": "yes", "id": custom_id},
    })
}

/// Results by custom_id, asserting each appears exactly once.
pub fn exactly_once(records: &[Record]) -> HashMap<String, serde_json::Value> {
    let mut out = HashMap::new();
    for r in records {
        let v = r.json();
        assert_eq!(
            v["custom_id"].as_str(),
            Some(r.key_str()),
            "result key is its custom_id"
        );
        if out.insert(r.key_str().to_owned(), v).is_some() {
            panic!("custom_id {} has more than one result", r.key_str());
        }
    }
    out
}

/// The compiled JSON Schema at `schemas/<name>`.
pub fn schema(name: &str) -> jsonschema::Validator {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "schemas", name]
        .iter()
        .collect();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    jsonschema::validator_for(&serde_json::from_str(&text).unwrap()).unwrap()
}

pub fn assert_valid(validator: &jsonschema::Validator, value: &serde_json::Value) {
    if let Err(e) = validator.validate(value) {
        panic!("{value} does not match its schema: {e}");
    }
}
