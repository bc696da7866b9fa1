//! The input consumer: reads requests, validates and routes them, packs them
//! into windows, and commits offsets up to the first request without a
//! delivered result.
//!
//! The group consumer is a `BaseConsumer` polled on its own thread, so
//! rebalance callbacks run there and other stages never block it. Bad input
//! never stops the loop: it becomes a dead letter and a `rejected` result.
//! When too much work is held, partitions are paused, not the loop.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::budget::Budget;
use crate::config::{Config, ProviderKind, RouteLimits};
use crate::health::Readiness;
use crate::journal::{BatchRecord, OffsetSet, Phase};
use crate::metrics::Metrics;
use crate::model::{decode_request, RejectReason, Rejection, Source};
use crate::offsets::OffsetTracker;
use crate::packer::{PackError, PackRequest, Packer, RebuildWindow, Route, SealedBatch};
use crate::publisher::RejectedInput;
use crate::state::{self, Journal};

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("creating the input consumer: {0}")]
    Consumer(rdkafka::error::KafkaError),
    #[error("subscribing to {topic}: {source}")]
    Subscribe {
        topic: String,
        source: rdkafka::error::KafkaError,
    },
    #[error("spool: {0}")]
    Spool(#[from] std::io::Error),
    #[error("holding a request: {0}")]
    Pack(PackError),
}

/// Requests and spool bytes held from consumption to delivered result.
#[derive(Debug, Default)]
pub struct Backlog {
    requests: AtomicU64,
    bytes: AtomicU64,
}

impl Backlog {
    pub fn hold(&self, requests: u64, bytes: u64) {
        self.requests.fetch_add(requests, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn release(&self, requests: u64, bytes: u64) {
        self.requests.fetch_sub(requests, Ordering::Relaxed);
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// A configured provider as routing sees it.
struct RouteTarget {
    name: Arc<str>,
    kind: ProviderKind,
    limits: RouteLimits,
    /// Why requests for it are refused, when its key is missing.
    disabled: Option<String>,
}

/// Resolves a request's provider and endpoint from the configuration.
pub struct Router {
    targets: BTreeMap<String, RouteTarget>,
    default: Option<String>,
    /// Model names seen, shared by every route naming them, so that routing
    /// a request allocates nothing. Bounded: names come from the input.
    models: RefCell<HashSet<Arc<str>>>,
}

/// How many distinct model names [`Router`] keeps; past it, each request
/// naming another one gets its own copy.
const MAX_INTERNED_MODELS: usize = 1024;

impl Router {
    pub fn new(cfg: &Config) -> Router {
        let targets = cfg
            .providers
            .iter()
            .map(|(name, p)| {
                let disabled = p.api_key.is_none().then(|| {
                    let source = match (&p.api_key_file, &p.api_key_env) {
                        (Some(f), _) => format!("file {}", f.display()),
                        (None, Some(var)) => format!("environment variable {var}"),
                        (None, None) => "no api_key_env or api_key_file configured".into(),
                    };
                    format!("provider `{name}` is disabled: its API key is missing ({source})")
                });
                let target = RouteTarget {
                    name: name.as_str().into(),
                    kind: p.kind,
                    limits: cfg.route_limits(name).expect("provider is configured"),
                    disabled,
                };
                (name.clone(), target)
            })
            .collect();
        Router {
            targets,
            default: cfg.routing.default_provider.clone(),
            models: RefCell::new(HashSet::new()),
        }
    }

    /// The route for a request, or why it cannot be routed.
    pub fn route(
        &self,
        provider: Option<&str>,
        endpoint: Option<&str>,
        model: &str,
    ) -> Result<(Route, RouteLimits), (RejectReason, String)> {
        let name = match (provider, &self.default) {
            (Some(p), _) => p,
            (None, Some(d)) => d.as_str(),
            (None, None) => {
                return Err((
                    RejectReason::UnknownProvider,
                    "provider is required (no routing.default_provider is configured)".into(),
                ))
            }
        };
        let Some(target) = self.targets.get(name) else {
            return Err((
                RejectReason::UnknownProvider,
                format!(
                    "unknown provider `{name}` (configured: {})",
                    self.targets.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        };
        if let Some(why) = &target.disabled {
            return Err((RejectReason::ProviderDisabled, why.clone()));
        }
        let endpoint = match endpoint {
            None => target.kind.default_endpoint(),
            Some(e) => match target.kind.endpoints().iter().find(|s| **s == e) {
                Some(s) => s,
                None => {
                    return Err((
                        RejectReason::UnsupportedEndpoint,
                        format!(
                            "endpoint `{e}` is not supported by {} batches (supported: {})",
                            target.kind.as_str(),
                            target.kind.endpoints().join(", ")
                        ),
                    ))
                }
            },
        };
        let route = Route {
            provider: target.name.clone(),
            kind: target.kind,
            model: self.model(model),
            endpoint,
        };
        Ok((route, target.limits))
    }

    fn model(&self, model: &str) -> Arc<str> {
        let mut models = self.models.borrow_mut();
        if let Some(m) = models.get(model) {
            return m.clone();
        }
        let m: Arc<str> = model.into();
        if models.len() < MAX_INTERNED_MODELS {
            models.insert(m.clone());
        }
        m
    }

    /// Providers whose requests are refused, with the reason.
    pub fn disabled(&self) -> impl Iterator<Item = (&str, &str)> {
        self.targets
            .iter()
            .filter_map(|(n, t)| t.disabled.as_deref().map(|d| (n.as_str(), d)))
    }
}

#[derive(Debug)]
enum RebalanceEvent {
    /// Each partition with [`Journal::revocations`] as of its assignment.
    Assigned(Vec<(i32, u64)>),
    Revoked(Vec<i32>),
}

/// Consumer callbacks: record rebalances for the poll loop, commit finished
/// offsets of partitions before they are revoked, log commit failures,
/// export lag and broker reachability from librdkafka's statistics.
pub struct IngestContext {
    topic: String,
    journal: Arc<Journal>,
    offsets: Arc<Mutex<OffsetTracker>>,
    events: Mutex<Vec<RebalanceEvent>>,
    metrics: Metrics,
    readiness: Readiness,
    /// Partitions whose lag the last statistics reported.
    lag_partitions: Mutex<BTreeSet<i32>>,
    /// How long a revocation waits for collections in progress
    /// (`shutdown.timeout`).
    revoke_wait: Duration,
}

/// How often librdkafka reports its statistics (lag, broker states),
/// unless `kafka.consumer` sets `statistics.interval.ms`.
const STATISTICS_INTERVAL: &str = "5000";

/// The few fields of librdkafka's statistics JSON (its STATISTICS.md)
/// batchline reads; everything else is skipped unparsed.
#[derive(Debug, Default, Deserialize)]
struct Statistics {
    #[serde(default)]
    brokers: HashMap<String, BrokerStatistics>,
    #[serde(default)]
    topics: HashMap<String, TopicStatistics>,
}

#[derive(Debug, Default, Deserialize)]
struct BrokerStatistics {
    /// `configured`, `learned`, `internal` or `logical` (the group
    /// coordinator's alias of a real broker).
    #[serde(default)]
    source: String,
    #[serde(default)]
    state: String,
}

#[derive(Debug, Default, Deserialize)]
struct TopicStatistics {
    #[serde(default)]
    partitions: HashMap<i32, PartitionStatistics>,
}

#[derive(Debug, Deserialize)]
struct PartitionStatistics {
    /// The partition's end (high watermark, or last stable offset) less
    /// the group's committed offset; -1 while either is unknown.
    #[serde(default = "unknown_lag")]
    consumer_lag: i64,
}

fn unknown_lag() -> i64 {
    -1
}

/// What one statistics report says about the input topic and the brokers.
#[derive(Debug, PartialEq, Eq)]
struct ConsumerStatistics {
    /// Lag per partition, for partitions where it is known.
    lag: BTreeMap<i32, i64>,
    brokers: BrokerReach,
}

#[derive(Debug, PartialEq, Eq)]
enum BrokerReach {
    /// A connection to a broker is up.
    Up,
    /// None is: why, broker by broker.
    Down(String),
    /// The report lists no broker.
    Unknown,
}

/// Reads a librdkafka statistics report for the input topic `topic`.
fn read_statistics(json: &[u8], topic: &str) -> serde_json::Result<ConsumerStatistics> {
    let stats: Statistics = serde_json::from_slice(json)?;
    let lag = stats
        .topics
        .get(topic)
        .map(|t| {
            t.partitions
                .iter()
                // -1 is librdkafka's internal unassigned partition.
                .filter(|(p, s)| **p >= 0 && s.consumer_lag >= 0)
                .map(|(p, s)| (*p, s.consumer_lag))
                .collect()
        })
        .unwrap_or_default();
    let mut brokers: Vec<(&String, &BrokerStatistics)> = stats
        .brokers
        .iter()
        .filter(|(_, b)| b.source != "logical" && b.source != "internal")
        .collect();
    brokers.sort_by_key(|(name, _)| *name);
    let brokers = if brokers.is_empty() {
        BrokerReach::Unknown
    } else if brokers.iter().any(|(_, b)| b.state == "UP") {
        BrokerReach::Up
    } else {
        let states: Vec<String> = brokers
            .iter()
            .map(|(name, b)| format!("{name} {}", b.state))
            .collect();
        BrokerReach::Down(format!(
            "no broker connection is up ({})",
            states.join(", ")
        ))
    };
    Ok(ConsumerStatistics { lag, brokers })
}

/// A broker answered: the brokers are reachable (again).
fn brokers_answered(readiness: &Readiness) {
    if readiness.brokers_reachable() {
        tracing::info!("kafka brokers reachable again");
    }
}

impl ClientContext for IngestContext {
    fn stats_raw(&self, statistics: &[u8]) {
        let stats = match read_statistics(statistics, &self.topic) {
            Ok(stats) => stats,
            Err(e) => {
                tracing::warn!(error = %e, "librdkafka statistics not understood; lag not updated");
                return;
            }
        };
        {
            let mut shown = self.lag_partitions.lock().expect("lag partitions lock");
            for &p in shown.iter() {
                if !stats.lag.contains_key(&p) {
                    self.metrics.consumer_lag_gone(p);
                }
            }
            for (&p, &lag) in &stats.lag {
                self.metrics.consumer_lag(p, lag);
            }
            *shown = stats.lag.keys().copied().collect();
        }
        match stats.brokers {
            BrokerReach::Up => brokers_answered(&self.readiness),
            BrokerReach::Down(why) => {
                if self.readiness.brokers_unreachable(&why) {
                    tracing::warn!(reason = %why, "kafka brokers unreachable; not ready");
                }
            }
            BrokerReach::Unknown => {}
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            if self.readiness.brokers_unreachable(reason) {
                tracing::warn!(reason, "all kafka brokers are down; not ready");
            }
            return;
        }
        tracing::error!(error = %error, reason, "kafka client error");
    }
}

fn partitions_of(tpl: &TopicPartitionList, topic: &str) -> Vec<i32> {
    tpl.elements_for_topic(topic)
        .iter()
        .map(|e| e.partition())
        .collect()
}

impl ConsumerContext for IngestContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let revoked = partitions_of(tpl, &self.topic);
            if !consumer.assignment_lost() {
                // A barrier: collections in progress on these partitions
                // finish first, so that their results are not published
                // again by the next owner (DESIGN.md "Revocation is a
                // barrier"). Nothing else is waited for: a batch not yet
                // created or still running is carried on from the journal.
                let unfinished = self.journal.drain(&revoked, self.revoke_wait);
                if !unfinished.is_empty() {
                    tracing::warn!(partitions = ?unfinished, timeout = ?self.revoke_wait, "collections still running at the revocation deadline; their next owner publishes them again");
                }
                // Last chance to commit what is finished for these partitions.
                let mut commit = TopicPartitionList::new();
                {
                    let offsets = self.offsets.lock().expect("offset tracker lock");
                    for &p in &revoked {
                        if let Some(w) = offsets.watermark(p) {
                            let _ = commit.add_partition_offset(&self.topic, p, Offset::Offset(w));
                        }
                    }
                }
                if commit.count() > 0 {
                    if let Err(e) = consumer.commit(&commit, CommitMode::Sync) {
                        tracing::warn!(error = %e, "commit on revocation failed");
                    }
                }
            }
            // From here on no journal record, and so no create, is made for
            // these partitions by this instance: their next owner carries on.
            for &p in &revoked {
                self.journal.release(p);
            }
            tracing::info!(partitions = ?revoked, "partitions revoked");
            self.events
                .lock()
                .expect("rebalance events lock")
                .push(RebalanceEvent::Revoked(revoked));
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let assigned = partitions_of(tpl, &self.topic);
            // Nothing is read from a new partition before its journal is
            // replayed (DESIGN.md "Assignment").
            if let Err(e) = consumer.pause(tpl) {
                tracing::warn!(error = %e, "pausing newly assigned partitions failed");
            }
            tracing::info!(partitions = ?assigned, "partitions assigned");
            // Noted here, in order with the revocations: a claim for this
            // assignment is written only if none came since.
            let assigned = assigned
                .into_iter()
                .map(|p| (p, self.journal.revocations(p)))
                .collect();
            self.events
                .lock()
                .expect("rebalance events lock")
                .push(RebalanceEvent::Assigned(assigned));
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        match result {
            Ok(()) => brokers_answered(&self.readiness),
            Err(e) => {
                tracing::warn!(error = %e, "offset commit failed; the next commit covers it")
            }
        }
    }
}

/// Where ingest sends its work.
pub struct IngestOutputs {
    pub batches: mpsc::Sender<SealedBatch>,
    pub rejections: mpsc::Sender<RejectedInput>,
}

/// How often a commit is confirmed and marked in the journal.
const MARK_INTERVAL: Duration = Duration::from_secs(5);

/// Claims partition `p`, reads its journal back and folds it into what
/// reading the partition again must do. A file-provider batch found at
/// `intent` never sent a create: it is ended at once with a `done` that
/// releases its offsets, which are then packed again like new ones.
fn replay(
    cfg: &Config,
    journal: &Journal,
    consumer: &BaseConsumer<IngestContext>,
    runtime: &tokio::runtime::Handle,
    p: i32,
    revocations: u64,
) -> Result<Recovery, String> {
    let epoch = runtime
        .block_on(journal.claim(p, revocations))
        .map_err(|e| e.to_string())?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&cfg.topics.requests, p);
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .map_err(|e| format!("reading the committed offset: {e}"))?
        .find_partition(&cfg.topics.requests, p)
        .and_then(|e| match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        });
    let back =
        state::read_back(journal, p, &epoch, Duration::from_secs(60)).map_err(|e| e.to_string())?;
    let replay = &back.replay;
    let resume = replay.resume_point(committed);
    let mut recovery = Recovery {
        epoch: epoch.clone(),
        resume,
        terminal: OffsetSet::new(),
        released: replay
            .released(resume)
            .into_iter()
            .map(|(o, attempt, requeues)| (o, (attempt, requeues)))
            .collect(),
        rebuilding: Vec::new(),
    };
    for b in replay.batches.values() {
        let below = matches!((b.offsets.max(), resume), (Some(max), Some(c)) if max < c);
        let keys = back.keys.get(&b.id).cloned().unwrap_or_default();
        journal.adopt_keys(
            p,
            &b.id,
            keys,
            b.offsets.max().unwrap_or(-1),
            below || b.phase == Phase::Done,
        );
        if below {
            continue;
        }
        if b.phase == Phase::Done {
            if let Some(t) = &b.terminal {
                recovery.terminal.union_with(t);
            }
            continue;
        }
        let kind = cfg.providers.get(&b.route.provider).map(|p| p.kind);
        if b.phase == Phase::Intent && kind != Some(ProviderKind::Anthropic) {
            let mut done = b.clone();
            done.phase = Phase::Done;
            done.terminal = Some(OffsetSet::new());
            done.released = vec![crate::journal::Released {
                offsets: b.offsets.clone(),
                attempt: b.attempt,
                requeues: b.requeues,
            }];
            runtime
                .block_on(journal.write_batch(p, &epoch, done))
                .map_err(|e| e.to_string())?;
            tracing::info!(partition = p, batch = %b.id, "batch planned but never sent; its requests are packed again");
            continue;
        }
        recovery.rebuilding.push(Rebuilding {
            record: b.clone(),
            window: None,
            remaining: b.offsets.len(),
        });
    }
    // Creates only void records name: orphans now if their batch is done
    // (or known only from void records), or once it is done without
    // adopting them.
    let (orphans, pending) = replay.orphans();
    for o in orphans {
        journal.report_orphan(o);
    }
    for (id, valid) in &replay.provider_batches {
        if replay
            .batches
            .get(id)
            .is_some_and(|b| b.phase != Phase::Done)
        {
            journal.note_provider_batches(p, id, valid.iter().cloned(), []);
        }
    }
    for o in pending {
        journal.note_provider_batches(p, &o.local_batch, [], [o.provider_batch]);
    }
    journal.replayed(p);
    // Cancel records: an open batch takes its cancel when its task starts
    // (those of finished batches go with the batch's keys).
    for id in &replay.cancels {
        if recovery.rebuilding.iter().any(|r| r.record.id == *id) {
            journal.remember_cancel(id);
        }
    }
    // Keys of no batch the journal knows (only void records or cancels name
    // it) go now.
    for (id, keys) in &back.keys {
        if !replay.batches.contains_key(id) {
            for key in keys {
                if let Err(e) = runtime.block_on(journal.tombstone(p, key)) {
                    tracing::debug!(partition = p, key, error = %e, "stale key not tombstoned");
                }
            }
        }
    }
    journal.adopt_stale(p, back.stale.clone());
    Ok(recovery)
}

/// What replaying a partition's journal left to do while reading it again.
struct Recovery {
    epoch: String,
    /// Nothing below it is packed again.
    resume: Option<i64>,
    /// Offsets a `done` answered: skipped, and released for commit.
    terminal: OffsetSet,
    /// Offsets a `done` released to a retry that no later batch took, with
    /// the attempt and requeue count they are due for.
    released: HashMap<i64, (u32, u32)>,
    /// Open batches filled again from the input topic by offset.
    rebuilding: Vec<Rebuilding>,
}

struct Rebuilding {
    record: BatchRecord,
    window: Option<RebuildWindow>,
    remaining: u64,
}

/// An assigned input partition.
enum Part {
    /// Paused while its journal is replayed; `first_dropped` is the first
    /// message that arrived anyway, read again once it is ready.
    Replaying {
        generation: u64,
        stop: CancellationToken,
        first_dropped: Option<i64>,
    },
    Ready(Box<Recovery>),
}

/// The outcome of a replay thread.
struct Replayed {
    partition: i32,
    generation: u64,
    recovery: Recovery,
}

pub struct Ingest {
    consumer: Arc<BaseConsumer<IngestContext>>,
    cfg: Arc<Config>,
    journal: Arc<Journal>,
    runtime: tokio::runtime::Handle,
    replayed_tx: std_mpsc::Sender<Replayed>,
    replayed_rx: std_mpsc::Receiver<Replayed>,
    generation: u64,
    parts: HashMap<i32, Part>,
    last_mark: Instant,
    /// Set for the last commit at shutdown.
    closing: bool,
    topic: String,
    topic_arc: Arc<str>,
    packer: Packer,
    router: Router,
    offsets: Arc<Mutex<OffsetTracker>>,
    backlog: Arc<Backlog>,
    budget: Arc<Budget>,
    metrics: Metrics,
    readiness: Readiness,
    max_held_requests: u64,
    max_spool_bytes: u64,
    paused: bool,
    commit_interval: Duration,
}

impl Ingest {
    pub fn new(
        cfg: &Arc<Config>,
        journal: Arc<Journal>,
        offsets: Arc<Mutex<OffsetTracker>>,
        backlog: Arc<Backlog>,
        budget: Arc<Budget>,
        metrics: Metrics,
        readiness: Readiness,
    ) -> Result<Ingest, IngestError> {
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &cfg.kafka.brokers)
            .set("group.id", &cfg.kafka.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("enable.partition.eof", "false")
            // Prefetched input, over all assigned partitions (the group
            // consumer has one queue): bounded whatever the partition count.
            .set("queued.max.messages.kbytes", "8192")
            // Once a partition's queue is over that cap, librdkafka waits
            // this long before fetching it again (default 1 s): with the
            // small cap, the consumer would sit idle most of each second.
            .set("fetch.queue.backoff.ms", "10")
            // Fetch sizes count compressed bytes: one fetch of well
            // compressed input can be many times larger once decompressed,
            // and the queue cap above only applies between fetches. Small
            // fetches keep that peak bounded. 8 MB, as much as the queue
            // cap: smaller fetches slowed consumption on a broker that fills
            // a fetch from one partition at a time (BENCHMARKS.md, with the
            // memory this costs).
            .set("fetch.max.bytes", "8388608")
            .set("max.partition.fetch.bytes", "1048576")
            // Lag per partition and broker states, read in `stats_raw`.
            .set("statistics.interval.ms", STATISTICS_INTERVAL);
        for (k, v) in &cfg.kafka.consumer {
            client.set(k, v);
        }
        let context = IngestContext {
            topic: cfg.topics.requests.clone(),
            journal: journal.clone(),
            offsets: offsets.clone(),
            events: Mutex::new(Vec::new()),
            metrics: metrics.clone(),
            readiness: readiness.clone(),
            lag_partitions: Mutex::new(BTreeSet::new()),
            revoke_wait: cfg.shutdown.timeout,
        };
        let consumer: BaseConsumer<IngestContext> = client
            .create_with_context(context)
            .map_err(IngestError::Consumer)?;
        let (replayed_tx, replayed_rx) = std_mpsc::channel();
        Ok(Ingest {
            consumer: Arc::new(consumer),
            cfg: cfg.clone(),
            journal,
            runtime: tokio::runtime::Handle::current(),
            replayed_tx,
            replayed_rx,
            generation: 0,
            parts: HashMap::new(),
            last_mark: Instant::now(),
            closing: false,
            topic: cfg.topics.requests.clone(),
            topic_arc: cfg.topics.requests.as_str().into(),
            packer: Packer::new(&cfg.spool.dir, cfg.topics.requests.as_str())?,
            router: Router::new(cfg),
            offsets,
            backlog,
            budget,
            metrics,
            readiness,
            max_held_requests: cfg.limits.max_held_requests,
            max_spool_bytes: cfg.limits.max_spool_bytes.0,
            paused: false,
            commit_interval: Duration::from_millis(500),
        })
    }

    /// Runs the poll loop on the calling thread until `shutdown`; then
    /// submits due windows, closes its outputs and keeps committing until
    /// `drained` fires (every batch finished or abandoned), then commits a
    /// last time.
    pub fn run(
        mut self,
        outputs: IngestOutputs,
        shutdown: CancellationToken,
        drained: CancellationToken,
    ) -> Result<(), IngestError> {
        for (name, why) in self.router.disabled() {
            tracing::warn!(provider = name, "{why}");
        }
        self.consumer
            .subscribe(&[&self.topic])
            .map_err(|source| IngestError::Subscribe {
                topic: self.topic.clone(),
                source,
            })?;
        let result = self.consume(&outputs, &shutdown);
        self.readiness.shutting_down();
        // A replay still running would claim partitions this instance is
        // about to give up.
        for part in self.parts.values() {
            if let Part::Replaying { stop, .. } = part {
                stop.cancel();
            }
        }
        // Full windows were sent as they filled; send those due now and
        // leave the rest to the input topic (their offsets stay uncommitted).
        let flushed = self.send_due(&outputs, Instant::now());
        let discarded = self.packer.discard_all();
        // Open windows hold requests only: bytes are counted when sealed.
        self.backlog.release(discarded.requests, 0);
        drop(outputs);
        self.pause_all();
        while !drained.is_cancelled() {
            self.consumer.poll(Duration::from_millis(100));
            self.drain_events();
            self.commit(CommitMode::Async);
        }
        self.closing = true;
        self.commit(CommitMode::Sync);
        self.consumer.unsubscribe();
        result.and(flushed)
    }

    fn consume(
        &mut self,
        outputs: &IngestOutputs,
        shutdown: &CancellationToken,
    ) -> Result<(), IngestError> {
        let mut last_commit = Instant::now();
        while !shutdown.is_cancelled() {
            let now = Instant::now();
            let timeout = self
                .packer
                .next_due()
                .map(|due| due.saturating_duration_since(now))
                .unwrap_or(Duration::MAX)
                .min(Duration::from_millis(100));
            // A partition becomes ready (and seeks back to what it dropped
            // while replaying) before the next poll, never between a poll
            // and the handling of the message it returned: that message,
            // fetched while replaying, would otherwise be tracked first and
            // the offsets the seek brings back, below it, refused as seen.
            self.finish_replays();
            let consumer = self.consumer.clone();
            let message = consumer.poll(timeout);
            self.drain_events();
            self.retake_voided();
            match message {
                Some(Ok(m)) => {
                    brokers_answered(&self.readiness);
                    self.handle(&m, outputs)?
                }
                Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
                None => {}
            }
            self.send_due(outputs, Instant::now())?;
            self.apply_backpressure();
            if last_commit.elapsed() >= self.commit_interval {
                self.commit(CommitMode::Async);
                last_commit = Instant::now();
                self.metrics.held(
                    self.backlog.requests(),
                    self.backlog.bytes(),
                    self.packer.open_windows(),
                );
            }
        }
        Ok(())
    }

    fn handle(
        &mut self,
        m: &BorrowedMessage<'_>,
        outputs: &IngestOutputs,
    ) -> Result<(), IngestError> {
        let (partition, offset) = (m.partition(), m.offset());
        let mut retry = (1, 0);
        match self.parts.get_mut(&partition) {
            None => return Ok(()),
            Some(Part::Replaying { first_dropped, .. }) => {
                // Fetched before the pause took effect: read again later.
                *first_dropped = Some(first_dropped.map_or(offset, |f| f.min(offset)));
                return Ok(());
            }
            Some(Part::Ready(recovery)) => {
                if recovery.resume.is_some_and(|c| offset < c) {
                    return Ok(());
                }
                if recovery.terminal.contains(offset) {
                    // Answered before the restart; only the commit is left.
                    let mut offsets = self.offsets.lock().expect("offset tracker lock");
                    if offsets.track(partition, offset) {
                        offsets.complete(partition, offset);
                    }
                    return Ok(());
                }
                if let Some(i) = recovery
                    .rebuilding
                    .iter()
                    .position(|b| b.record.offsets.contains(offset))
                {
                    return self.rebuild(m, i, outputs);
                }
                if let Some(due) = recovery.released.remove(&offset) {
                    retry = due;
                }
            }
        }
        if !self.track(partition, offset) {
            return Ok(());
        }
        self.metrics.request_consumed();
        let timestamp_ms = m.timestamp().to_millis();
        let rejection = match decode_request(m.key(), m.payload()) {
            Err(r) => r,
            Ok(d) => match self
                .router
                .route(d.provider.as_deref(), d.endpoint.as_deref(), &d.model)
            {
                Err((reason, message)) => Rejection {
                    reason,
                    message,
                    custom_id: Some(d.custom_id.into_owned()),
                    provider: d.provider.map(|p| p.into_owned()),
                    metadata: d.metadata.map(|m| m.to_owned()),
                },
                Ok((route, limits)) => {
                    let req = PackRequest {
                        custom_id: &d.custom_id,
                        body: d.body,
                        metadata: d.metadata,
                        offset,
                        timestamp_ms,
                        retry,
                        output_cap: d.output_cap,
                    };
                    match self
                        .packer
                        .add(partition, &route, limits, &req, Instant::now())
                    {
                        Ok(sealed) => {
                            self.backlog.hold(1, 0);
                            for batch in sealed {
                                self.send_batch(batch, outputs);
                            }
                            return Ok(());
                        }
                        Err(PackError::Io { path, source }) => {
                            return Err(IngestError::Pack(PackError::Io { path, source }));
                        }
                        Err(e @ PackError::Duplicate(_)) => Rejection {
                            reason: RejectReason::DuplicateCustomId,
                            message: e.to_string(),
                            custom_id: Some(d.custom_id.into_owned()),
                            provider: Some(route.provider.to_string()),
                            metadata: d.metadata.map(|m| m.to_owned()),
                        },
                        Err(e @ PackError::TooLarge { .. }) => Rejection {
                            reason: RejectReason::TooLarge,
                            message: e.to_string(),
                            custom_id: Some(d.custom_id.into_owned()),
                            provider: Some(route.provider.to_string()),
                            metadata: d.metadata.map(|m| m.to_owned()),
                        },
                    }
                }
            },
        };
        self.metrics.request_rejected(rejection.reason);
        tracing::debug!(partition, offset, reason = %rejection.reason, "rejected input");
        let input = RejectedInput {
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec),
            source: Source {
                topic: self.topic.clone(),
                partition,
                offset,
            },
            timestamp_ms,
            rejection,
        };
        self.backlog.hold(1, 0);
        if outputs.rejections.blocking_send(input).is_err() {
            tracing::error!("rejection publisher stopped; input stays uncommitted");
        }
        Ok(())
    }

    /// Adds a re-read request to the open batch it belongs to; once the
    /// batch is whole again it goes to the submitter, which carries on from
    /// its recorded phase.
    fn rebuild(
        &mut self,
        m: &BorrowedMessage<'_>,
        i: usize,
        outputs: &IngestOutputs,
    ) -> Result<(), IngestError> {
        let (partition, offset) = (m.partition(), m.offset());
        if !self.track(partition, offset) {
            return Ok(());
        }
        let Some(Part::Ready(recovery)) = self.parts.get_mut(&partition) else {
            return Ok(());
        };
        let b = &mut recovery.rebuilding[i];
        let decoded = decode_request(m.key(), m.payload());
        match (decoded, b.window.as_mut()) {
            (Ok(d), Some(window)) => {
                let req = PackRequest {
                    custom_id: &d.custom_id,
                    body: d.body,
                    metadata: d.metadata,
                    offset,
                    timestamp_ms: m.timestamp().to_millis(),
                    retry: (b.record.attempt, b.record.requeues),
                    output_cap: d.output_cap,
                };
                window.add(&req).map_err(IngestError::Pack)?;
                self.backlog.hold(1, 0);
            }
            (Err(r), _) => {
                // The bytes decoded when the batch was planned: they changed
                // or the contract did. Its result comes from the provider.
                tracing::error!(partition, offset, batch = %b.record.id, reason = %r.reason, "a request of an open batch no longer decodes");
                self.backlog.hold(1, 0);
            }
            (Ok(_), None) => self.backlog.hold(1, 0),
        }
        b.remaining = b.remaining.saturating_sub(1);
        if b.remaining > 0 {
            return Ok(());
        }
        let b = recovery.rebuilding.swap_remove(i);
        let epoch = recovery.epoch.clone();
        let Some(window) = b.window else {
            tracing::error!(batch = %b.record.id, provider = %b.record.route.provider, "an open batch's provider is not configured; its requests stay uncommitted");
            return Ok(());
        };
        let mut batch = window.seal().map_err(IngestError::Pack)?;
        batch.attempt = b.record.attempt;
        batch.requeues = b.record.requeues;
        batch.epoch = epoch;
        tracing::info!(batch = %batch.id, phase = b.record.phase.as_str(), requests = batch.len(), "open batch re-read from the input topic");
        batch.recovered = Some(Box::new(b.record));
        self.send_batch(batch, outputs);
        Ok(())
    }

    fn send_batch(&self, mut batch: SealedBatch, outputs: &IngestOutputs) {
        if batch.epoch.is_empty() {
            if let Some(Part::Ready(r)) = self.parts.get(&batch.partition) {
                batch.epoch = r.epoch.clone();
            }
        }
        self.backlog.hold(0, batch.input_bytes);
        tracing::debug!(batch = %batch.id, requests = batch.len(), bytes = batch.input_bytes, "window sealed");
        if let Err(mpsc::error::SendError(batch)) = outputs.batches.blocking_send(batch) {
            tracing::error!(batch = %batch.id, "submitter stopped; batch left to the input topic");
            self.backlog.release(batch.len() as u64, batch.input_bytes);
            batch.remove_files();
        }
    }

    fn send_due(&mut self, outputs: &IngestOutputs, now: Instant) -> Result<(), IngestError> {
        for batch in self.packer.seal_due(now).map_err(IngestError::Pack)? {
            self.send_batch(batch, outputs);
        }
        Ok(())
    }

    fn drain_events(&mut self) {
        let events = std::mem::take(
            &mut *self
                .consumer
                .context()
                .events
                .lock()
                .expect("rebalance events lock"),
        );
        for event in events {
            match event {
                RebalanceEvent::Assigned(ps) => {
                    for (p, revocations) in ps {
                        self.start_replay(p, revocations);
                    }
                }
                RebalanceEvent::Revoked(ps) => {
                    // The journal was released in `pre_rebalance`; a
                    // second release here would count a revocation the
                    // next assignment, maybe drained with this one,
                    // never had.
                    for p in ps {
                        self.drop_partition(p);
                        self.readiness.partition_revoked(p);
                    }
                }
            }
        }
    }

    /// Forgets what this instance holds locally for partition `p`: its
    /// replay, the open batches it was rebuilding, its open windows and
    /// its offsets.
    fn drop_partition(&mut self, p: i32) {
        match self.parts.remove(&p) {
            Some(Part::Replaying { stop, .. }) => stop.cancel(),
            Some(Part::Ready(recovery)) => {
                for b in recovery.rebuilding {
                    if let Some(w) = b.window {
                        self.backlog.release(w.len() as u64, 0);
                        w.discard();
                    }
                }
            }
            None => {}
        }
        let held = self.packer.discard_partition(p);
        self.backlog.release(held.requests, 0);
        self.offsets.lock().expect("offset tracker lock").forget(p);
    }

    /// Takes partition `p` again when its epoch turned out void while the
    /// group still assigns it here: another instance's claim followed this
    /// one's (an assignment that overlapped this one, or a claim that
    /// landed late), and that instance has since given `p` up. Nobody works
    /// on `p` then, and every create this instance tries for it is refused
    /// as a zombie's: its work is dropped and `p` is paused, claimed and
    /// replayed as on a new assignment. If the other instance still works
    /// on `p`, its next create finds its own epoch void in turn.
    fn retake_voided(&mut self) {
        for (p, epoch) in self.journal.take_voided() {
            let current = matches!(self.parts.get(&p), Some(Part::Ready(r)) if r.epoch == epoch);
            if !current {
                // Revoked since, or already taken again.
                continue;
            }
            tracing::warn!(
                partition = p,
                "another instance claimed a partition still assigned here; claiming it again"
            );
            self.drop_partition(p);
            self.pause(&[p]);
            self.start_replay(p, self.journal.revocations(p));
        }
    }

    /// Replays partition `p`'s journal on a thread of its own: claim,
    /// read back, fold. The partition stays paused until it is done.
    fn start_replay(&mut self, p: i32, revocations: u64) {
        self.generation += 1;
        let generation = self.generation;
        let stop = CancellationToken::new();
        if let Some(Part::Replaying { stop, .. }) = self.parts.insert(
            p,
            Part::Replaying {
                generation,
                stop: stop.clone(),
                first_dropped: None,
            },
        ) {
            stop.cancel();
        }
        self.readiness.partition_replaying(p);
        let (cfg, journal, consumer, runtime, tx) = (
            self.cfg.clone(),
            self.journal.clone(),
            self.consumer.clone(),
            self.runtime.clone(),
            self.replayed_tx.clone(),
        );
        let metrics = self.metrics.clone();
        let readiness = self.readiness.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("replay-{p}"))
            .spawn(move || {
                let started = Instant::now();
                let mut wait = Duration::from_millis(200);
                loop {
                    if stop.is_cancelled() {
                        return;
                    }
                    match replay(&cfg, &journal, &consumer, &runtime, p, revocations) {
                        Ok(recovery) => {
                            metrics.journal_replayed(started.elapsed());
                            let _ = tx.send(Replayed {
                                partition: p,
                                generation,
                                recovery,
                            });
                            return;
                        }
                        Err(_) if journal.revocations(p) != revocations => {
                            // Revoked meanwhile: nothing more to do here.
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(partition = p, error = %e, "replaying the journal failed; retrying");
                            if !stop.is_cancelled() {
                                readiness.replay_retrying(p, &e);
                            }
                            std::thread::sleep(wait);
                            wait = (wait * 2).min(Duration::from_secs(10));
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(partition = p, error = %e, "spawning a replay thread failed");
        }
    }

    /// Makes replayed partitions ready and resumes them.
    fn finish_replays(&mut self) {
        let mut retry = Vec::new();
        while let Ok(done) = self.replayed_rx.try_recv() {
            let p = done.partition;
            let first_dropped = match self.parts.get(&p) {
                Some(Part::Replaying {
                    generation,
                    first_dropped,
                    ..
                }) if *generation == done.generation => *first_dropped,
                // Revoked, or assigned again since.
                _ => continue,
            };
            // Read again from the resume point: below it everything is
            // finished, and from it on every offset must be seen, so that
            // open batches are rebuilt whole and the commit watermark never
            // passes an offset this instance did not read. The consumer's
            // own position cannot be trusted for that: it may be past the
            // resume point (fetched before the pause, or set from a commit
            // read at another moment).
            let target = match (done.recovery.resume, first_dropped) {
                (Some(c), _) => Some(Offset::Offset(c)),
                (None, Some(o)) => Some(Offset::Offset(o)),
                (None, None) => None,
            };
            if let Some(target) = target {
                if let Err(e) = self
                    .consumer
                    .seek(&self.topic, p, target, Duration::from_secs(5))
                {
                    // Not ready yet: try again on the next turn of the loop.
                    tracing::warn!(partition = p, offset = ?target, error = %e, "seeking to the resume point failed; retrying");
                    retry.push(done);
                    continue;
                }
            }
            let mut recovery = done.recovery;
            for b in &mut recovery.rebuilding {
                b.window = self.rebuild_window(p, &b.record);
            }
            tracing::info!(
                partition = p,
                resume = ?recovery.resume,
                open_batches = recovery.rebuilding.len(),
                "journal replayed; partition ready"
            );
            self.parts.insert(p, Part::Ready(Box::new(recovery)));
            self.readiness.partition_ready(p);
            if !self.paused {
                self.resume(&[p]);
            }
        }
        for done in retry {
            let _ = self.replayed_tx.send(done);
        }
    }

    fn rebuild_window(&self, p: i32, record: &BatchRecord) -> Option<RebuildWindow> {
        let r = &record.route;
        let (route, limits) = self
            .router
            .route(Some(&r.provider), Some(&r.endpoint), &r.model)
            .ok()?;
        RebuildWindow::open(
            &self.cfg.spool.dir,
            self.topic_arc.clone(),
            &record.id,
            p,
            &route,
            limits,
        )
        .inspect_err(
            |e| tracing::error!(batch = %record.id, error = %e, "opening a spool file failed"),
        )
        .ok()
    }

    /// Records that `offset` was read; `false` for a re-delivery.
    fn track(&self, partition: i32, offset: i64) -> bool {
        self.offsets
            .lock()
            .expect("offset tracker lock")
            .track(partition, offset)
    }

    fn ready(&self) -> Vec<i32> {
        self.parts
            .iter()
            .filter(|(_, part)| matches!(part, Part::Ready(_)))
            .map(|(p, _)| *p)
            .collect()
    }

    fn pause(&self, partitions: &[i32]) {
        let mut tpl = TopicPartitionList::new();
        for &p in partitions {
            tpl.add_partition(&self.topic, p);
        }
        if let Err(e) = self.consumer.pause(&tpl) {
            tracing::warn!(error = %e, "pausing partitions failed");
        }
    }

    fn resume(&self, partitions: &[i32]) -> bool {
        let mut tpl = TopicPartitionList::new();
        for &p in partitions {
            tpl.add_partition(&self.topic, p);
        }
        if let Err(e) = self.consumer.resume(&tpl) {
            tracing::warn!(error = %e, "resuming partitions failed");
            return false;
        }
        true
    }

    fn pause_all(&mut self) {
        let ps: Vec<i32> = self.parts.keys().copied().collect();
        self.pause(&ps);
        self.paused = true;
    }

    /// Pauses consumption while too much work is held or a batch waits for
    /// the budget; resumes below 80 % of the limits once none waits.
    fn apply_backpressure(&mut self) {
        let (requests, bytes) = (self.backlog.requests(), self.backlog.bytes());
        let budget = self.budget.holding();
        if !self.paused
            && (budget || requests >= self.max_held_requests || bytes >= self.max_spool_bytes)
        {
            let why = if budget {
                "a batch waits for the daily budget"
            } else {
                "holding too much work"
            };
            tracing::info!(requests, bytes, "{why}; pausing consumption");
            self.pause_all();
            self.metrics.consumer_paused(true);
        } else if self.paused
            && !budget
            && requests * 5 < self.max_held_requests * 4
            && bytes * 5 < self.max_spool_bytes * 4
        {
            if !self.resume(&self.ready()) {
                return;
            }
            tracing::info!(requests, bytes, "resuming consumption");
            self.paused = false;
            self.metrics.consumer_paused(false);
        }
    }

    fn commit(&mut self, mode: CommitMode) {
        // Now and then a commit is made synchronously, so that it is known
        // to be durable: the journal then marks it and tombstones the
        // batches wholly below it. Such a commit covers every partition,
        // moved or not, so a batch finished since the last mark is cleaned
        // up even when the offsets were already committed asynchronously.
        let confirm = matches!(mode, CommitMode::Sync) || self.last_mark.elapsed() >= MARK_INTERVAL;
        let candidates = {
            let offsets = self.offsets.lock().expect("offset tracker lock");
            if confirm {
                self.ready()
                    .into_iter()
                    .filter_map(|p| offsets.watermark(p).map(|w| (p, w)))
                    .collect()
            } else {
                offsets.commit_candidates()
            }
        };
        let mut tpl = TopicPartitionList::new();
        let mut committing = Vec::new();
        for &(p, o) in &candidates {
            if matches!(self.parts.get(&p), Some(Part::Ready(_))) {
                let _ = tpl.add_partition_offset(&self.topic, p, Offset::Offset(o));
                committing.push((p, o));
            }
        }
        if tpl.count() == 0 {
            return;
        }
        let mode = if confirm { CommitMode::Sync } else { mode };
        match self.consumer.commit(&tpl, mode) {
            Ok(()) => {
                {
                    let mut offsets = self.offsets.lock().expect("offset tracker lock");
                    for &(p, o) in &committing {
                        offsets.mark_committed(p, o);
                    }
                }
                if confirm {
                    // A synchronous commit is a broker's answer.
                    brokers_answered(&self.readiness);
                    self.last_mark = Instant::now();
                    let last = self.closing;
                    for (p, o) in committing {
                        let journal = self.journal.clone();
                        let mark = async move {
                            match journal.committed(p, o).await {
                                Ok(0) => {}
                                Ok(n) => tracing::debug!(
                                    partition = p,
                                    offset = o,
                                    batches = n,
                                    "finished batches tombstoned"
                                ),
                                Err(e) => {
                                    tracing::warn!(partition = p, error = %e, "marking a commit in the journal failed")
                                }
                            }
                        };
                        if last {
                            // Shutting down: done before the process exits.
                            self.runtime.block_on(mark);
                        } else {
                            self.runtime.spawn(mark);
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "offset commit failed"),
        }
    }

    /// The input topic's name, shared with sealed batches.
    pub fn topic(&self) -> &Arc<str> {
        &self.topic_arc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reports librdkafka 2.12.1 wrote for a group consumer of
    /// `llm.requests` (two partitions, on Tansu): one while connected, one
    /// after the broker was stopped.
    const STATISTICS: &str = include_str!("../tests/data/librdkafka-consumer-statistics.json");
    const STATISTICS_BROKERS_DOWN: &str =
        include_str!("../tests/data/librdkafka-consumer-statistics-brokers-down.json");

    #[test]
    fn statistics_give_the_lag_of_each_assigned_partition() {
        let stats = read_statistics(STATISTICS.as_bytes(), "llm.requests").unwrap();
        // Partition -1 (librdkafka's internal one, lag -1) is left out.
        assert_eq!(stats.lag, BTreeMap::from([(0, 3), (1, 0)]));
        assert_eq!(stats.brokers, BrokerReach::Up);
    }

    #[test]
    fn statistics_of_another_topic_give_no_lag() {
        let stats = read_statistics(STATISTICS.as_bytes(), "llm.other").unwrap();
        assert!(stats.lag.is_empty());
    }

    #[test]
    fn statistics_with_no_broker_up_say_which_brokers_are_down() {
        let stats = read_statistics(STATISTICS_BROKERS_DOWN.as_bytes(), "llm.requests").unwrap();
        // The coordinator is a logical alias of the real broker: not listed.
        assert_eq!(
            stats.brokers,
            BrokerReach::Down(
                "no broker connection is up (127.0.0.1:33777/111 TRY_CONNECT)".into()
            )
        );
        // librdkafka keeps reporting the last known lag meanwhile.
        assert_eq!(stats.lag, BTreeMap::from([(0, 3), (1, 0)]));
    }

    #[test]
    fn unknown_lag_and_missing_fields_are_skipped() {
        let json = br#"{"brokers": {"b:9092/1": {"source": "learned", "state": "UP"}},
            "topics": {"llm.requests": {"partitions": {
                "0": {"consumer_lag": -1}, "1": {}, "2": {"consumer_lag": 42}}}}}"#;
        let stats = read_statistics(json, "llm.requests").unwrap();
        assert_eq!(stats.lag, BTreeMap::from([(2, 42)]));
        assert_eq!(stats.brokers, BrokerReach::Up);
        let stats = read_statistics(br#"{"brokers": {}}"#, "llm.requests").unwrap();
        assert_eq!(stats.brokers, BrokerReach::Unknown);
        assert!(stats.lag.is_empty());
        assert!(read_statistics(b"{not json", "llm.requests").is_err());
    }

    /// The consumer's callbacks, as librdkafka would call them, without a
    /// broker.
    fn context() -> IngestContext {
        let cfg = Config::load_from(None, Vec::<(String, String)>::new()).unwrap();
        IngestContext {
            topic: "llm.requests".into(),
            journal: Arc::new(Journal::new(&cfg).unwrap()),
            offsets: Arc::new(Mutex::new(OffsetTracker::new())),
            events: Mutex::new(Vec::new()),
            metrics: Metrics::new(),
            readiness: Readiness::new(),
            lag_partitions: Mutex::new(BTreeSet::new()),
            revoke_wait: cfg.shutdown.timeout,
        }
    }

    fn unreachable(ctx: &IngestContext) -> Option<String> {
        ctx.readiness.facts().brokers_unreachable
    }

    #[test]
    fn all_brokers_down_marks_them_unreachable_until_a_broker_answers() {
        let ctx = context();
        ctx.error(
            KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure),
            "127.0.0.1:9092/1: Connect failed",
        );
        assert_eq!(unreachable(&ctx), None, "one failed connection is not all");
        ctx.error(
            KafkaError::Global(RDKafkaErrorCode::AllBrokersDown),
            "1/1 brokers are down",
        );
        assert_eq!(unreachable(&ctx).as_deref(), Some("1/1 brokers are down"));
        assert!(ctx
            .readiness
            .reasons()
            .contains(&"kafka brokers unreachable: 1/1 brokers are down".to_owned()));
        ctx.commit_callback(Ok(()), &TopicPartitionList::new());
        assert_eq!(unreachable(&ctx), None);
    }

    #[test]
    fn statistics_set_lag_and_broker_reachability() {
        let ctx = context();
        ctx.stats_raw(STATISTICS_BROKERS_DOWN.as_bytes());
        assert_eq!(
            unreachable(&ctx).as_deref(),
            Some("no broker connection is up (127.0.0.1:33777/111 TRY_CONNECT)")
        );
        ctx.stats_raw(STATISTICS.as_bytes());
        assert_eq!(unreachable(&ctx), None);
        let text = ctx.metrics.render();
        assert!(
            text.contains(r#"batchline_consumer_lag_messages{partition="0"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"batchline_consumer_lag_messages{partition="1"} 0"#),
            "{text}"
        );
        assert!(!text.contains(r#"partition="-1""#), "{text}");

        // Partition 0 revoked: its series goes, partition 1's stays.
        let only_1 = br#"{"brokers": {"b:9092/1": {"source": "learned", "state": "UP"}},
            "topics": {"llm.requests": {"partitions": {
                "0": {"consumer_lag": -1}, "1": {"consumer_lag": 5}}}}}"#;
        ctx.stats_raw(only_1);
        let text = ctx.metrics.render();
        assert!(!text.contains(r#"partition="0""#), "{text}");
        assert!(
            text.contains(r#"batchline_consumer_lag_messages{partition="1"} 5"#),
            "{text}"
        );
        // A report it cannot read changes nothing.
        ctx.stats_raw(b"{not json");
        assert!(ctx.metrics.render().contains(r#"{partition="1"} 5"#));
    }
}
