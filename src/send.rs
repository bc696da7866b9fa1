//! `batchline send`: produce requests from a JSONL file to the input topic,
//! keyed by their `custom_id`, and optionally follow the results topic until
//! every one of them has a result.

use std::collections::{BTreeMap, HashSet};
use std::io::BufRead;
use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("timed out after {waited:?} with {missing} of {total} results missing")]
    Timeout {
        waited: Duration,
        missing: usize,
        total: usize,
    },
}

pub struct SendOptions<'a> {
    pub brokers: &'a str,
    pub requests_topic: &'a str,
    pub results_topic: &'a str,
    /// Follow the results topic until every sent custom_id has a result.
    pub wait: bool,
    pub timeout: Duration,
}

/// Counts of results by status.
pub type Summary = BTreeMap<String, u64>;

/// Sends every line of `file`; returns the result counts when waiting.
pub async fn send_file(file: &Path, opts: &SendOptions<'_>) -> Result<Option<Summary>, SendError> {
    let read_err = |source| SendError::Read {
        path: file.display().to_string(),
        source,
    };
    let reader = std::io::BufReader::new(std::fs::File::open(file).map_err(read_err)?);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", opts.brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()?;
    let start_offsets = if opts.wait {
        Some(high_watermarks(opts.brokers, opts.results_topic)?)
    } else {
        None
    };

    let mut ids = HashSet::new();
    let mut pending = futures::stream::FuturesUnordered::new();
    let mut sent = 0u64;
    for line in reader.lines() {
        let line = line.map_err(read_err)?;
        if line.trim().is_empty() {
            continue;
        }
        let key = serde_json::from_str::<serde_json::Value>(&line)
            .ok()
            .and_then(|v| v["custom_id"].as_str().map(str::to_owned));
        if let Some(k) = &key {
            ids.insert(k.clone());
        }
        let producer = producer.clone();
        let topic = opts.requests_topic.to_owned();
        pending.push(async move {
            let mut record = FutureRecord::<str, str>::to(&topic).payload(&line);
            if let Some(k) = &key {
                record = record.key(k);
            }
            producer
                .send(record, Duration::from_secs(60))
                .await
                .map_err(|(e, _)| e)
        });
        sent += 1;
        if pending.len() >= 10_000 {
            drain(&mut pending).await?;
        }
    }
    drain(&mut pending).await?;
    let _ = producer.flush(Duration::from_secs(10));
    eprintln!("sent {sent} requests to {}", opts.requests_topic);

    let Some(start) = start_offsets else {
        return Ok(None);
    };
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", opts.brokers)
        .set(
            "group.id",
            format!("batchline-send-{}", uuid::Uuid::new_v4()),
        )
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for (p, o) in &start {
        tpl.add_partition_offset(opts.results_topic, *p, Offset::Offset(*o))?;
    }
    consumer.assign(&tpl)?;
    let total = ids.len();
    let started = Instant::now();
    let mut summary = Summary::new();
    let mut last_report = Instant::now();
    tokio::task::block_in_place(|| {
        while !ids.is_empty() {
            if started.elapsed() > opts.timeout {
                return Err(SendError::Timeout {
                    waited: opts.timeout,
                    missing: ids.len(),
                    total,
                });
            }
            if last_report.elapsed() > Duration::from_secs(2) {
                eprintln!("{} of {total} results in {:?}", total - ids.len(), summary);
                last_report = Instant::now();
            }
            let Some(m) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let m = m?;
            let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
                continue;
            };
            if ids.remove(key) {
                let status = m
                    .payload()
                    .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
                    .and_then(|v| v["status"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| "unknown".into());
                *summary.entry(status).or_default() += 1;
            }
        }
        Ok(())
    })?;
    Ok(Some(summary))
}

async fn drain<F>(pending: &mut futures::stream::FuturesUnordered<F>) -> Result<(), SendError>
where
    F: std::future::Future<
        Output = Result<rdkafka::producer::future_producer::Delivery, rdkafka::error::KafkaError>,
    >,
{
    use futures::StreamExt;
    while let Some(r) = pending.next().await {
        r?;
    }
    Ok(())
}

/// The current end offset of every partition of `topic` (empty when the
/// topic does not exist yet).
fn high_watermarks(brokers: &str, topic: &str) -> Result<Vec<(i32, i64)>, SendError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(30))?;
    let mut out = Vec::new();
    for t in md.topics() {
        for p in t.partitions() {
            let (_, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(30))?;
            out.push((p.id(), high));
        }
    }
    Ok(out)
}
