//! Wires the stages together and runs them until shutdown: ingest on its
//! own thread, the submitter and the rejection publisher as tasks, and the
//! HTTP endpoints.
//!
//! Shutdown: ingest stops reading, submits due windows and closes its
//! channels; in-flight batches and deliveries finish, or are abandoned at
//! `shutdown.timeout`; ingest commits last.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::collector::Pricing;
use crate::config::Config;
use crate::ingest::{Backlog, Ingest, IngestError, IngestOutputs};
use crate::metrics::Metrics;
use crate::offsets::OffsetTracker;
use crate::provider;
use crate::publisher::{PublishError, Publisher, RejectedInput};
use crate::state::Journal;
use crate::status::Registry;
use crate::submitter::{BatchContext, ProviderSlot, Submitter};

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
    #[error("creating spool directory {path}: {source}")]
    Spool {
        path: String,
        source: std::io::Error,
    },
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
    std::fs::create_dir_all(&cfg.spool.dir).map_err(|source| AppError::Spool {
        path: cfg.spool.dir.display().to_string(),
        source,
    })?;
    ensure_topics(&cfg).await?;

    let metrics = Metrics::new();
    let abandon = CancellationToken::new();
    let publisher = Arc::new(Publisher::new(&cfg, abandon.clone())?);
    let journal = Arc::new(Journal::new(&cfg)?);
    let offsets = Arc::new(Mutex::new(OffsetTracker::new()));
    let backlog = Arc::new(Backlog::default());
    let status = Registry::new();

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
        crate::http::router(metrics.clone(), status, cfg.http.token.clone()),
        http_stop.clone(),
    ));

    let (batch_tx, batch_rx) = mpsc::channel(1024);
    let (reject_tx, reject_rx) = mpsc::channel(4096);
    let ingest = Ingest::new(
        &cfg,
        journal.clone(),
        offsets.clone(),
        backlog.clone(),
        metrics.clone(),
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
    http_stop.cancel();
    let _ = http.await;
    match ingest_result {
        Ok(r) => r.map_err(AppError::from),
        Err(_) => Err(AppError::IngestPanicked),
    }
}

/// Publishes refused inputs, then releases their offsets.
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

/// Creates the results and dead-letter topics when missing, with the input
/// topic's partition count (or 1 when the input topic does not exist yet).
async fn ensure_topics(cfg: &Config) -> Result<(), AppError> {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &cfg.kafka.brokers);
    for (k, v) in &cfg.kafka.consumer {
        client.set(k, v);
    }
    let metadata_client: BaseConsumer = client
        .create()
        .map_err(|e| AppError::Topics(e.to_string()))?;
    let brokers = cfg.kafka.brokers.clone();
    let (existing, partitions) = tokio::task::spawn_blocking({
        let requests = cfg.topics.requests.clone();
        move || -> Result<(Vec<String>, i32), String> {
            let md = metadata_client
                .fetch_metadata(None, Duration::from_secs(30))
                .map_err(|e| format!("reading cluster metadata from {brokers}: {e}"))?;
            let names: Vec<String> = md.topics().iter().map(|t| t.name().to_owned()).collect();
            let partitions = md
                .topics()
                .iter()
                .find(|t| t.name() == requests)
                .map(|t| t.partitions().len() as i32)
                .filter(|n| *n > 0)
                .unwrap_or(1);
            Ok((names, partitions))
        }
    })
    .await
    .expect("metadata task")
    .map_err(AppError::Topics)?;
    let missing: Vec<&String> = [&cfg.topics.results, &cfg.topics.dlq, &cfg.topics.state]
        .into_iter()
        .filter(|t| !existing.contains(t))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = client
        .create()
        .map_err(|e| AppError::Topics(e.to_string()))?;
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
    Ok(())
}
