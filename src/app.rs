//! Wires the stages together and runs them until shutdown: ingest on its
//! own thread, the submitter and the rejection publisher as tasks, and the
//! HTTP endpoints. At start-up it creates missing topics and checks the
//! input topic's retention and the state topic's partition count; what it
//! finds is logged and exported, and never stops start-up.
//!
//! Shutdown: ingest stops reading, submits due windows and closes its
//! channels; in-flight batches and deliveries finish, or are abandoned at
//! `shutdown.timeout`; ingest commits last.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::budget::Budget;
use crate::collector::Pricing;
use crate::config::{BatchConfig, Config, RetryConfig};
use crate::health::Readiness;
use crate::ingest::{Backlog, Ingest, IngestError, IngestOutputs};
use crate::journal::Orphan;
use crate::metrics::Metrics;
use crate::offsets::OffsetTracker;
use crate::provider;
use crate::publisher::{PublishError, Publisher, RejectedInput};
use crate::state::Journal;
use crate::status::{CancelRefused, Registry};
use crate::submitter::{BatchContext, ProviderSlot, Submitter};
use crate::tail::TailEvent;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("configuring provider `{name}`: {source}")]
    Provider {
        name: String,
        source: provider::ProviderError,
    },
    #[error("preparing spool directory {path}: {source}")]
    Spool {
        path: String,
        source: std::io::Error,
    },
    #[error("spool directory {0} is in use by another batchline process; give each instance a spool.dir of its own")]
    SpoolInUse(String),
    #[error("preparing topics: {0}")]
    Topics(String),
    #[error("http server on {addr}: {source}")]
    Http {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error("ingest thread panicked")]
    IngestPanicked,
}

/// Runs batchline until `shutdown` fires, then drains and returns.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> Result<(), AppError> {
    let cfg = Arc::new(cfg);
    // Held until this function returns.
    let _spool_lock = take_spool(&cfg.spool.dir).map_err(|e| match e {
        SpoolTaken::InUse => AppError::SpoolInUse(cfg.spool.dir.display().to_string()),
        SpoolTaken::Io(source) => AppError::Spool {
            path: cfg.spool.dir.display().to_string(),
            source,
        },
    })?;
    let readiness = Readiness::new();
    let metrics = Metrics::with_readiness(readiness.clone());
    let admin = admin_client(&cfg)
        .map_err(|e| AppError::Topics(format!("creating the admin client: {e}")))?;
    let layout = ensure_topics(&cfg, &admin).await?;
    if let Some(problem) = layout.state_partitions_problem(&cfg.topics.state) {
        tracing::error!(
            "{problem}: the input partitions without a state partition stay paused; add partitions to the state topic"
        );
        readiness.topic_problem(problem);
    }
    check_input_retention(&cfg, &admin, &metrics).await;
    let abandon = CancellationToken::new();
    let publisher = Arc::new(Publisher::new(&cfg, abandon.clone())?);
    let journal = Arc::new(Journal::new(&cfg)?);
    let offsets = Arc::new(Mutex::new(OffsetTracker::new()));
    let backlog = Arc::new(Backlog::default());
    let status = Registry::new();
    let budget = Arc::new(Budget::new(
        cfg.budget.max_usd_per_day,
        cfg.budget.default_output_tokens,
        metrics.clone(),
    ));

    let mut providers = HashMap::new();
    for (name, p) in &cfg.providers {
        if p.api_key.is_none() {
            continue;
        }
        let adapter = provider::build(name, p, &cfg.retry, &metrics).map_err(|source| {
            AppError::Provider {
                name: name.clone(),
                source,
            }
        })?;
        providers.insert(
            name.clone(),
            ProviderSlot {
                provider: adapter,
                in_flight: Arc::new(Semaphore::new(p.max_batches_in_flight.unwrap_or(20))),
                poll_interval: p.poll_interval,
            },
        );
    }
    let ctx = Arc::new(BatchContext {
        providers,
        publisher: publisher.clone(),
        offsets: offsets.clone(),
        backlog: backlog.clone(),
        pricing: Pricing::new(&cfg.pricing),
        spool_dir: cfg.spool.dir.clone(),
        batch: cfg.batch.clone(),
        retry: cfg.retry.clone(),
        metrics: metrics.clone(),
        journal: journal.clone(),
        known_batches: Default::default(),
        status: status.clone(),
        budget: budget.clone(),
    });

    let http_listener = tokio::net::TcpListener::bind(&cfg.http.listen)
        .await
        .map_err(|source| AppError::Http {
            addr: cfg.http.listen.clone(),
            source,
        })?;
    let http_stop = CancellationToken::new();
    let http = tokio::spawn(crate::http::serve(
        http_listener,
        crate::http::router(
            metrics.clone(),
            readiness.clone(),
            status.clone(),
            budget.clone(),
            cfg.http.token.clone(),
            Some(journal.clone()),
        ),
        http_stop.clone(),
    ));

    let tail_events = journal.take_tail_events().map(|events| {
        tokio::spawn(act_on_tail(
            events,
            journal.clone(),
            status.clone(),
            metrics.clone(),
        ))
    });
    let orphans = journal
        .take_orphans()
        .map(|orphans| tokio::spawn(cancel_orphans(orphans, ctx.clone())));

    let (batch_tx, batch_rx) = mpsc::channel(1024);
    let (reject_tx, reject_rx) = mpsc::channel(4096);
    let ingest = Ingest::new(
        &cfg,
        journal.clone(),
        offsets.clone(),
        backlog.clone(),
        budget,
        metrics.clone(),
        readiness.clone(),
    )?;
    let drained = CancellationToken::new();
    let ingest_thread = {
        let shutdown = shutdown.clone();
        let drained = drained.clone();
        std::thread::Builder::new()
            .name("ingest".into())
            .spawn(move || {
                ingest.run(
                    IngestOutputs {
                        batches: batch_tx,
                        rejections: reject_tx,
                    },
                    shutdown,
                    drained,
                )
            })
            .expect("spawning the ingest thread")
    };
    tracing::info!(brokers = %cfg.kafka.brokers, topic = %cfg.topics.requests, listen = %cfg.http.listen, status_api_auth = cfg.http.token.is_some(), "batchline running");

    let submitter = tokio::spawn(Submitter::new(ctx, batch_rx).run(abandon.clone()));
    let rejections = tokio::spawn(publish_rejections(
        reject_rx,
        publisher.clone(),
        offsets.clone(),
        backlog.clone(),
        metrics.clone(),
    ));

    // Past the shutdown deadline, in-flight work is abandoned: its offsets
    // stay uncommitted and the input topic still holds it.
    let deadline = {
        let shutdown = shutdown.clone();
        let abandon = abandon.clone();
        let timeout = cfg.shutdown.timeout;
        tokio::spawn(async move {
            shutdown.cancelled().await;
            tokio::time::sleep(timeout).await;
            tracing::warn!("shutdown.timeout passed; abandoning in-flight work");
            abandon.cancel();
        })
    };

    let _ = submitter.await;
    let _ = rejections.await;
    drained.cancel();
    let ingest_result = tokio::task::spawn_blocking(move || ingest_thread.join())
        .await
        .expect("joining the ingest thread");
    publisher.flush(Duration::from_secs(5));
    journal.flush(Duration::from_secs(5));
    deadline.abort();
    for task in [tail_events, orphans].into_iter().flatten() {
        task.abort();
    }
    http_stop.cancel();
    let _ = http.await;
    match ingest_result {
        Ok(r) => r.map_err(AppError::from),
        Err(_) => Err(AppError::IngestPanicked),
    }
}

/// Acts on what the state tail reads from the partitions this instance
/// owns. Cancel records, whoever wrote them (DESIGN.md "Cancel"): a record
/// naming a batch this instance has journaled is kept with that batch's
/// keys and tombstoned with them; any other is tombstoned now. Creates of
/// an owner that had lost the partition: possible orphans.
async fn act_on_tail(
    mut events: mpsc::UnboundedReceiver<TailEvent>,
    journal: Arc<Journal>,
    status: Registry,
    metrics: Metrics,
) {
    while let Some(event) = events.recv().await {
        let c = match event {
            TailEvent::Cancel(c) => c,
            TailEvent::VoidCreate {
                partition,
                batch_id,
                provider_batch,
            } => {
                tracing::warn!(batch = %batch_id, provider = %provider_batch.provider, provider_batch = %provider_batch.id, "a void record names a provider batch: another owner created it after losing the partition");
                journal.note_void_create(partition, &batch_id, provider_batch);
                continue;
            }
        };
        let asked_before = status.get(&c.batch_id).map(|b| b.cancel_requested);
        match status.request_cancel(&c.batch_id) {
            Ok(b) => {
                if asked_before == Some(false) {
                    metrics.cancel_requested(&b.provider);
                    tracing::info!(batch = %b.id, provider = %b.provider, "cancel record read from the journal; cancelling");
                }
            }
            Err(CancelRefused::Ended { .. }) => {
                tracing::info!(batch = %c.batch_id, "cancel record for a batch whose provider batch has ended; nothing to cancel");
            }
            // Not started here yet (its task takes the cancel when it
            // starts), or unknown.
            Err(CancelRefused::Unknown(_)) => journal.remember_cancel(&c.batch_id),
        }
        if !journal.keep_key(c.partition, &c.batch_id, c.key.clone()) {
            if let Err(e) = journal.tombstone(c.partition, &c.key).await {
                tracing::debug!(key = %c.key, error = %e, "cancel record not tombstoned");
            }
        }
    }
}

/// Cancels orphans at their provider, at once: provider batches of work
/// already finished (or handed to other batches), whose results nobody
/// will collect (DESIGN.md "Orphans").
async fn cancel_orphans(mut orphans: mpsc::UnboundedReceiver<Orphan>, ctx: Arc<BatchContext>) {
    while let Some(o) = orphans.recv().await {
        let pb = &o.provider_batch;
        let Some(slot) = ctx.providers.get(&pb.provider) else {
            tracing::warn!(batch = %o.local_batch, provider = %pb.provider, provider_batch = %pb.id, "orphan batch of a provider that is not configured; not cancelled");
            continue;
        };
        ctx.metrics.orphan_batch(&pb.provider);
        let mut attempt = 0;
        loop {
            match slot.provider.cancel(&pb.id).await {
                Ok(now) => {
                    tracing::warn!(batch = %o.local_batch, provider = %pb.provider, provider_batch = %pb.id, status = now.state.as_str(), "orphan batch cancelled");
                    break;
                }
                Err(e) if e.is_transient() && attempt < 5 => {
                    attempt += 1;
                    tokio::time::sleep(ctx.retry.backoff(attempt)).await;
                }
                // Ended already, or gone: nothing left to stop.
                Err(e) => {
                    tracing::warn!(batch = %o.local_batch, provider = %pb.provider, provider_batch = %pb.id, error = %e, "orphan batch not cancelled");
                    break;
                }
            }
        }
    }
}

/// Publishes refused inputs, then releases their offsets.
/// Why `spool.dir` could not be taken.
#[derive(Debug)]
enum SpoolTaken {
    /// Another process (or another run in this one) holds its lock.
    InUse,
    Io(std::io::Error),
}

/// Takes `dir` for this process: an exclusive lock on its `.lock` file,
/// held as long as the returned file is open, then the removal of the
/// spool files an earlier process left behind (a crash leaves its windows
/// and downloads). No restart needs them: open batches are rebuilt from
/// the input topic and the journal.
fn take_spool(dir: &std::path::Path) -> Result<std::fs::File, SpoolTaken> {
    use std::os::fd::AsRawFd;
    let spool_err = SpoolTaken::Io;
    std::fs::create_dir_all(dir).map_err(spool_err)?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(".lock"))
        .map_err(spool_err)?;
    // SAFETY: flock on a descriptor this function owns; no memory involved.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => SpoolTaken::InUse,
            _ => spool_err(e),
        });
    }
    let mut removed = 0u64;
    for entry in std::fs::read_dir(dir).map_err(spool_err)?.flatten() {
        let path = entry.path();
        let leftover = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".jsonl"));
        if leftover && entry.file_type().is_ok_and(|t| t.is_file()) {
            removed += u64::from(std::fs::remove_file(&path).is_ok());
        }
    }
    if removed > 0 {
        tracing::info!(dir = %dir.display(), files = removed, "removed spool files an earlier process left");
    }
    Ok(lock)
}

async fn publish_rejections(
    mut rx: mpsc::Receiver<RejectedInput>,
    publisher: Arc<Publisher>,
    offsets: Arc<Mutex<OffsetTracker>>,
    backlog: Arc<Backlog>,
    metrics: Metrics,
) {
    let mut inflight = FuturesUnordered::new();
    let mut open = true;
    while open || !inflight.is_empty() {
        tokio::select! {
            input = rx.recv(), if open && inflight.len() < 1024 => match input {
                Some(input) => {
                    let publisher = publisher.clone();
                    inflight.push(async move {
                        let r = publisher.publish_rejection(&input).await;
                        (input, r)
                    });
                }
                None => open = false,
            },
            Some((input, result)) = inflight.next(), if !inflight.is_empty() => {
                let (source, r) = (&input.source, &input.rejection);
                match result {
                    Ok(()) => {
                        offsets.lock().expect("offset tracker lock").complete(source.partition, source.offset);
                        backlog.release(1, 0);
                        metrics.rejection_published(r.reason, r.provider.as_deref(), r.custom_id.is_some());
                    }
                    Err(e) => tracing::error!(partition = source.partition, offset = source.offset, error = %e, "rejection not published; input stays uncommitted"),
                }
            }
        }
    }
}

/// The partition counts start-up found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TopicLayout {
    /// `None` while the input topic does not exist yet.
    input_partitions: Option<i32>,
    state_partitions: i32,
}

impl TopicLayout {
    /// Input partition *p* keeps its journal in state partition *p*: an
    /// input partition without one can never be replayed.
    fn state_partitions_problem(&self, state_topic: &str) -> Option<String> {
        let input = self.input_partitions?;
        (self.state_partitions < input).then(|| {
            format!(
                "state topic {state_topic} has {} partitions, fewer than the input topic's {input}",
                self.state_partitions
            )
        })
    }
}

/// The settings of the short-lived start-up clients: the consumer's
/// (security and the like), without its statistics, which only ingest reads.
fn startup_client_config(cfg: &Config) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &cfg.kafka.brokers);
    for (k, v) in &cfg.kafka.consumer {
        client.set(k, v);
    }
    client.set("statistics.interval.ms", "0");
    client
}

fn admin_client(cfg: &Config) -> rdkafka::error::KafkaResult<AdminClient<DefaultClientContext>> {
    startup_client_config(cfg).create()
}

/// Creates the results, dead-letter and state topics when missing, with
/// the input topic's partition count (or 1 when the input topic does not
/// exist yet).
async fn ensure_topics(
    cfg: &Config,
    admin: &AdminClient<DefaultClientContext>,
) -> Result<TopicLayout, AppError> {
    let metadata_client: BaseConsumer = startup_client_config(cfg)
        .create()
        .map_err(|e| AppError::Topics(e.to_string()))?;
    let brokers = cfg.kafka.brokers.clone();
    let existing = tokio::task::spawn_blocking(move || -> Result<HashMap<String, i32>, String> {
        let md = metadata_client
            .fetch_metadata(None, Duration::from_secs(30))
            .map_err(|e| format!("reading cluster metadata from {brokers}: {e}"))?;
        Ok(md
            .topics()
            .iter()
            .map(|t| (t.name().to_owned(), t.partitions().len() as i32))
            .collect())
    })
    .await
    .expect("metadata task")
    .map_err(AppError::Topics)?;
    let input_partitions = existing
        .get(&cfg.topics.requests)
        .copied()
        .filter(|n| *n > 0);
    let partitions = input_partitions.unwrap_or(1);
    let layout = TopicLayout {
        input_partitions,
        state_partitions: existing
            .get(&cfg.topics.state)
            .copied()
            .unwrap_or(partitions),
    };
    let missing: Vec<&String> = [&cfg.topics.results, &cfg.topics.dlq, &cfg.topics.state]
        .into_iter()
        .filter(|t| !existing.contains_key(*t))
        .collect();
    if missing.is_empty() {
        return Ok(layout);
    }
    let topics: Vec<NewTopic<'_>> = missing
        .iter()
        .map(|t| {
            let topic = NewTopic::new(t, partitions, TopicReplication::Fixed(-1));
            if **t == cfg.topics.state {
                // The journal: only the latest record per key matters.
                topic.set("cleanup.policy", "compact")
            } else {
                topic
            }
        })
        .collect();
    let results = admin
        .create_topics(
            &topics,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .map_err(|e| AppError::Topics(e.to_string()))?;
    for r in results {
        match r {
            Ok(name) => tracing::info!(topic = %name, partitions, "created topic"),
            Err((name, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {
                tracing::debug!(topic = %name, "topic already exists")
            }
            Err((name, code)) => return Err(AppError::Topics(format!("creating {name}: {code}"))),
        }
    }
    Ok(layout)
}

/// Added to a request's longest life when checking the input topic's
/// retention: time for an operator to notice and fix a stuck instance.
const RETENTION_MARGIN: Duration = Duration::from_secs(24 * 3600);

/// How long an input message must stay readable: open batches re-read
/// their requests by offset, and a request may go through every attempt,
/// each running up to the batch deadline.
fn required_input_retention(retry: &RetryConfig, batch: &BatchConfig) -> Duration {
    batch
        .deadline
        .saturating_mul(retry.max_attempts.max(1))
        .saturating_add(RETENTION_MARGIN)
}

/// A retention setting of the input topic that can delete requests
/// batchline still needs.
#[derive(Debug, PartialEq, Eq)]
enum RetentionRisk {
    /// `retention.ms` is shorter than a request's longest life.
    TooShort { retention_ms: i64, required_ms: u64 },
    /// `retention.bytes` is set: deletion by size ignores age.
    SizeBased { retention_bytes: i64 },
}

/// The risks in the input topic's `retention.ms` and `retention.bytes`
/// (`None`: the broker did not say; -1: unlimited).
fn retention_risks(
    retention_ms: Option<i64>,
    retention_bytes: Option<i64>,
    required: Duration,
) -> Vec<RetentionRisk> {
    let required_ms = u64::try_from(required.as_millis()).unwrap_or(u64::MAX);
    let mut risks = Vec::new();
    if let Some(ms) = retention_ms.filter(|ms| *ms >= 0) {
        if (ms as u64) < required_ms {
            risks.push(RetentionRisk::TooShort {
                retention_ms: ms,
                required_ms,
            });
        }
    }
    if let Some(bytes) = retention_bytes.filter(|b| *b >= 0) {
        risks.push(RetentionRisk::SizeBased {
            retention_bytes: bytes,
        });
    }
    risks
}

impl RetentionRisk {
    /// The warning for `topic`, saying what to set.
    fn warning(&self, topic: &str, retry: &RetryConfig, batch: &BatchConfig) -> String {
        match self {
            RetentionRisk::TooShort {
                retention_ms,
                required_ms,
            } => format!(
                "input topic {topic} has retention.ms={retention_ms} ({}), shorter than the {required_ms} ms ({}) a request may need (retry.max_attempts {} x batch.deadline {} + {} margin): open batches can lose their inputs; set retention.ms to at least {required_ms}, or -1",
                humantime::format_duration(Duration::from_millis(*retention_ms as u64)),
                humantime::format_duration(Duration::from_millis(*required_ms)),
                retry.max_attempts,
                humantime::format_duration(batch.deadline),
                humantime::format_duration(RETENTION_MARGIN),
            ),
            RetentionRisk::SizeBased { retention_bytes } => format!(
                "input topic {topic} has retention.bytes={retention_bytes}: size-based retention can delete the inputs of open batches whatever their age; set retention.bytes to -1 and rely on retention.ms"
            ),
        }
    }
}

/// Warns (log and `batchline_input_retention_short`) when the input
/// topic's retention can delete requests before they are answered. A
/// broker that cannot describe topic configs only gets an info line.
async fn check_input_retention(
    cfg: &Config,
    admin: &AdminClient<DefaultClientContext>,
    metrics: &Metrics,
) {
    let topic = &cfg.topics.requests;
    metrics.input_retention_short(false);
    let described = admin
        .describe_configs(
            &[ResourceSpecifier::Topic(topic)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await;
    let resource = match described.map(|mut r| r.pop()) {
        Ok(Some(Ok(resource))) => resource,
        Ok(Some(Err(code))) => {
            tracing::info!(topic = %topic, error = %code, "the broker did not describe the input topic's configs; retention not checked");
            return;
        }
        Ok(None) => {
            tracing::info!(topic = %topic, "the broker returned no configs for the input topic; retention not checked");
            return;
        }
        Err(e) => {
            tracing::info!(topic = %topic, error = %e, "describing the input topic's configs failed; retention not checked");
            return;
        }
    };
    let setting = |name: &str| -> Option<i64> {
        let value = resource.get(name)?.value.as_deref()?;
        value
            .trim()
            .parse()
            .inspect_err(|_| tracing::info!(topic = %topic, name, value, "unreadable retention setting; not checked"))
            .ok()
    };
    let (retention_ms, retention_bytes) = (setting("retention.ms"), setting("retention.bytes"));
    if retention_ms.is_none() {
        tracing::info!(topic = %topic, "the broker did not report retention.ms for the input topic; not checked");
    }
    let required = required_input_retention(&cfg.retry, &cfg.batch);
    let risks = retention_risks(retention_ms, retention_bytes, required);
    for risk in &risks {
        tracing::warn!("{}", risk.warning(topic, &cfg.retry, &cfg.batch));
    }
    if risks.is_empty() {
        tracing::debug!(topic = %topic, ?retention_ms, ?retention_bytes, "input topic retention is long enough");
    }
    metrics.input_retention_short(!risks.is_empty());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_attempts: u32, deadline: Duration) -> (RetryConfig, BatchConfig) {
        let cfg = Config::load_from(None, Vec::<(String, String)>::new()).unwrap();
        let (mut retry, mut batch) = (cfg.retry, cfg.batch);
        retry.max_attempts = max_attempts;
        batch.deadline = deadline;
        (retry, batch)
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn a_request_lives_every_attempt_to_the_deadline_plus_a_day() {
        let (retry, batch) = limits(3, 26 * HOUR);
        assert_eq!(required_input_retention(&retry, &batch), 102 * HOUR);
        let (retry, batch) = limits(1, 24 * HOUR);
        assert_eq!(required_input_retention(&retry, &batch), 48 * HOUR);
    }

    #[test]
    fn the_defaults_need_less_than_kafkas_default_week() {
        let cfg = Config::load_from(None, Vec::<(String, String)>::new()).unwrap();
        let required = required_input_retention(&cfg.retry, &cfg.batch);
        let week_ms = 7 * 24 * 3600 * 1000;
        assert!(retention_risks(Some(week_ms), Some(-1), required).is_empty());
    }

    #[test]
    fn short_time_retention_is_a_risk_and_says_what_to_set() {
        let (retry, batch) = limits(3, 26 * HOUR);
        let required = required_input_retention(&retry, &batch);
        let day_ms = 24 * 3600 * 1000;
        let risks = retention_risks(Some(day_ms), Some(-1), required);
        assert_eq!(
            risks,
            [RetentionRisk::TooShort {
                retention_ms: day_ms,
                required_ms: 367_200_000
            }]
        );
        let warning = risks[0].warning("llm.requests", &retry, &batch);
        for part in [
            "input topic llm.requests",
            "retention.ms=86400000 (1day)",
            "367200000 ms (4days 6h)",
            "retry.max_attempts 3 x batch.deadline 1day 2h + 1day margin",
            "set retention.ms to at least 367200000",
        ] {
            assert!(warning.contains(part), "{part:?} not in {warning}");
        }
        // Exactly long enough, and unlimited, are fine.
        assert!(retention_risks(Some(367_200_000), None, required).is_empty());
        assert!(retention_risks(Some(-1), None, required).is_empty());
        // Unknown is not a risk: nothing to warn about.
        assert!(retention_risks(None, None, required).is_empty());
    }

    #[test]
    fn any_size_based_retention_is_a_risk() {
        let (retry, batch) = limits(3, 26 * HOUR);
        let required = required_input_retention(&retry, &batch);
        let risks = retention_risks(Some(-1), Some(1 << 30), required);
        assert_eq!(
            risks,
            [RetentionRisk::SizeBased {
                retention_bytes: 1 << 30
            }]
        );
        let warning = risks[0].warning("llm.requests", &retry, &batch);
        assert!(
            warning.contains("retention.bytes=1073741824")
                && warning.contains("set retention.bytes to -1"),
            "{warning}"
        );
        assert_eq!(retention_risks(Some(1000), Some(0), required).len(), 2);
    }

    #[test]
    fn a_huge_deadline_does_not_overflow() {
        let (retry, batch) = limits(u32::MAX, Duration::MAX);
        assert_eq!(required_input_retention(&retry, &batch), Duration::MAX);
        assert_eq!(
            retention_risks(Some(i64::MAX), None, Duration::MAX).len(),
            1,
            "nothing is long enough for forever"
        );
    }

    #[test]
    fn a_state_topic_with_fewer_partitions_than_the_input_is_a_problem() {
        let layout = |input, state| TopicLayout {
            input_partitions: input,
            state_partitions: state,
        };
        assert_eq!(
            layout(Some(4), 2).state_partitions_problem("batchline.state"),
            Some(
                "state topic batchline.state has 2 partitions, fewer than the input topic's 4"
                    .to_owned()
            )
        );
        assert_eq!(layout(Some(4), 4).state_partitions_problem("s"), None);
        assert_eq!(layout(Some(2), 8).state_partitions_problem("s"), None);
        // No input topic yet: nothing to compare with.
        assert_eq!(layout(None, 1).state_partitions_problem("s"), None);
    }

    #[test]
    fn a_spool_dir_is_taken_once_and_cleared_of_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        std::fs::create_dir_all(&spool).unwrap();
        std::fs::write(spool.join("bl-0-x.7.jsonl"), "{}\n").unwrap();
        std::fs::write(spool.join("bl-0-x.7.meta.jsonl"), "{}\n").unwrap();
        std::fs::write(spool.join("keep.txt"), "not ours").unwrap();
        let held = take_spool(&spool).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&spool)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, [".lock", "keep.txt"]);
        match take_spool(&spool) {
            Err(SpoolTaken::InUse) => {}
            other => panic!("a second taker got {other:?}"),
        }
        drop(held);
        assert!(take_spool(&spool).is_ok(), "free again once released");
    }
}
