//! The input consumer: reads requests, validates and routes them, packs them
//! into windows, and commits offsets up to the first request without a
//! delivered result.
//!
//! The group consumer is a `BaseConsumer` polled on its own thread, so
//! rebalance callbacks run there and other stages never block it. Bad input
//! never stops the loop: it becomes a dead letter and a `rejected` result.
//! When too much work is held, partitions are paused, not the loop.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ProviderKind, RouteLimits};
use crate::metrics::Metrics;
use crate::model::{decode_request, RejectReason, Rejection, Source};
use crate::offsets::OffsetTracker;
use crate::packer::{PackError, PackRequest, Packer, Route, SealedBatch};
use crate::publisher::RejectedInput;

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
}

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
            model: model.into(),
            endpoint,
        };
        Ok((route, target.limits))
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
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

/// Consumer callbacks: record rebalances for the poll loop, commit finished
/// offsets of partitions before they are revoked, log commit failures.
pub struct IngestContext {
    topic: String,
    offsets: Arc<Mutex<OffsetTracker>>,
    events: Mutex<Vec<RebalanceEvent>>,
}

impl ClientContext for IngestContext {}

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
            tracing::info!(partitions = ?revoked, "partitions revoked");
            self.events
                .lock()
                .expect("rebalance events lock")
                .push(RebalanceEvent::Revoked(revoked));
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let assigned = partitions_of(tpl, &self.topic);
            tracing::info!(partitions = ?assigned, "partitions assigned");
            self.events
                .lock()
                .expect("rebalance events lock")
                .push(RebalanceEvent::Assigned(assigned));
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::warn!(error = %e, "offset commit failed; the next commit covers it");
        }
    }
}

/// Where ingest sends its work.
pub struct IngestOutputs {
    pub batches: mpsc::Sender<SealedBatch>,
    pub rejections: mpsc::Sender<RejectedInput>,
}

pub struct Ingest {
    consumer: Arc<BaseConsumer<IngestContext>>,
    topic: String,
    topic_arc: Arc<str>,
    packer: Packer,
    router: Router,
    offsets: Arc<Mutex<OffsetTracker>>,
    backlog: Arc<Backlog>,
    metrics: Metrics,
    max_held_requests: u64,
    max_spool_bytes: u64,
    assigned: HashSet<i32>,
    paused: bool,
    commit_interval: Duration,
}

impl Ingest {
    pub fn new(
        cfg: &Config,
        offsets: Arc<Mutex<OffsetTracker>>,
        backlog: Arc<Backlog>,
        metrics: Metrics,
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
            // Prefetch is per partition: keep memory flat with many partitions.
            .set("queued.max.messages.kbytes", "8192")
            .set("fetch.max.bytes", "16777216");
        for (k, v) in &cfg.kafka.consumer {
            client.set(k, v);
        }
        let context = IngestContext {
            topic: cfg.topics.requests.clone(),
            offsets: offsets.clone(),
            events: Mutex::new(Vec::new()),
        };
        let consumer: BaseConsumer<IngestContext> = client
            .create_with_context(context)
            .map_err(IngestError::Consumer)?;
        Ok(Ingest {
            consumer: Arc::new(consumer),
            topic: cfg.topics.requests.clone(),
            topic_arc: cfg.topics.requests.as_str().into(),
            packer: Packer::new(&cfg.spool.dir, cfg.topics.requests.as_str())?,
            router: Router::new(cfg),
            offsets,
            backlog,
            metrics,
            max_held_requests: cfg.limits.max_held_requests,
            max_spool_bytes: cfg.limits.max_spool_bytes.0,
            assigned: HashSet::new(),
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
            let consumer = self.consumer.clone();
            let message = consumer.poll(timeout);
            self.drain_events();
            match message {
                Some(Ok(m)) => self.handle(&m, outputs)?,
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
        if !self.assigned.contains(&partition) {
            return Ok(());
        }
        if !self
            .offsets
            .lock()
            .expect("offset tracker lock")
            .track(partition, offset)
        {
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

    fn send_batch(&self, batch: SealedBatch, outputs: &IngestOutputs) {
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
                    self.assigned.extend(ps.iter().copied());
                    if self.paused {
                        self.pause(&ps);
                    }
                }
                RebalanceEvent::Revoked(ps) => {
                    let mut offsets = self.offsets.lock().expect("offset tracker lock");
                    for p in ps {
                        self.assigned.remove(&p);
                        let held = self.packer.discard_partition(p);
                        self.backlog.release(held.requests, 0);
                        offsets.forget(p);
                    }
                }
            }
        }
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

    fn pause_all(&mut self) {
        let ps: Vec<i32> = self.assigned.iter().copied().collect();
        self.pause(&ps);
        self.paused = true;
    }

    fn apply_backpressure(&mut self) {
        let (requests, bytes) = (self.backlog.requests(), self.backlog.bytes());
        if !self.paused && (requests >= self.max_held_requests || bytes >= self.max_spool_bytes) {
            tracing::info!(
                requests,
                bytes,
                "holding too much work; pausing consumption"
            );
            self.pause_all();
            self.metrics.consumer_paused(true);
        } else if self.paused
            && requests * 5 < self.max_held_requests * 4
            && bytes * 5 < self.max_spool_bytes * 4
        {
            let mut tpl = TopicPartitionList::new();
            for &p in &self.assigned {
                tpl.add_partition(&self.topic, p);
            }
            if let Err(e) = self.consumer.resume(&tpl) {
                tracing::warn!(error = %e, "resuming partitions failed");
                return;
            }
            tracing::info!(requests, bytes, "resuming consumption");
            self.paused = false;
            self.metrics.consumer_paused(false);
        }
    }

    fn commit(&mut self, mode: CommitMode) {
        let candidates = {
            let offsets = self.offsets.lock().expect("offset tracker lock");
            offsets.commit_candidates()
        };
        let mut tpl = TopicPartitionList::new();
        for &(p, o) in &candidates {
            if self.assigned.contains(&p) {
                let _ = tpl.add_partition_offset(&self.topic, p, Offset::Offset(o));
            }
        }
        if tpl.count() == 0 {
            return;
        }
        match self.consumer.commit(&tpl, mode) {
            Ok(()) => {
                let mut offsets = self.offsets.lock().expect("offset tracker lock");
                for (p, o) in candidates {
                    offsets.mark_committed(p, o);
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
