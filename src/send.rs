//! `batchline send`: produce requests from a JSONL file to the input topic,
//! keyed by their `custom_id`, and optionally follow the results topic until
//! every one of them has a result, with a progress bar on stderr when it is
//! a terminal.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io::{BufRead, IsTerminal};
use std::path::Path;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
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
    /// Print this many results (pretty JSON) as they arrive.
    pub show: usize,
}

/// Counts of results by status.
pub type Summary = BTreeMap<String, u64>;

/// What `send --wait` saw.
#[derive(Debug, Clone, PartialEq)]
pub struct WaitReport {
    /// Messages produced.
    pub sent: u64,
    pub by_status: Summary,
    /// From the first message sent to the last result.
    pub elapsed: Duration,
}

impl fmt::Display for WaitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total: u64 = self.by_status.values().sum();
        writeln!(
            f,
            "{total} results for {} messages sent, in {}:",
            self.sent,
            format_elapsed(self.elapsed)
        )?;
        for (status, n) in &self.by_status {
            writeln!(f, "  {status:<10} {n:>8}")?;
        }
        Ok(())
    }
}

/// `4m05.2s`, `12.3s`.
fn format_elapsed(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        format!("{}m{:04.1}s", (secs / 60.0) as u64, secs % 60.0)
    }
}

/// `succeeded 120 · errored 3`, for the progress bar's message.
fn status_counts(summary: &Summary) -> String {
    summary
        .iter()
        .map(|(status, n)| format!("{status} {n}"))
        .collect::<Vec<_>>()
        .join(" · ")
}

/// The bar that follows results while waiting: drawn on stderr when it is a
/// terminal, hidden otherwise (then the periodic lines say the same).
fn results_bar(total: u64) -> ProgressBar {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(total), target);
    let style = ProgressStyle::with_template(
        "{spinner} {elapsed_precise} [{wide_bar}] {pos}/{len} results, ETA {eta} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}

/// Sends every line of `file`; returns what came back when waiting.
pub async fn send_file(
    file: &Path,
    opts: &SendOptions<'_>,
) -> Result<Option<WaitReport>, SendError> {
    let begun = Instant::now();
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
    // Where the results of this send will start: the current end of the
    // results topic, or its beginning if it does not exist yet.
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
        // Invalid custom_ids are answered on the DLQ only.
        if let Some(k) = key.as_ref().filter(|k| crate::model::is_valid_custom_id(k)) {
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
    let started = Instant::now();
    let start: Vec<(i32, i64)> = match start {
        Some(offsets) => offsets,
        // The results topic did not exist when we started: everything in it
        // once it appears is new.
        None => loop {
            if let Some(partitions) = high_watermarks(opts.brokers, opts.results_topic)? {
                break partitions.into_iter().map(|(p, _)| (p, 0)).collect();
            }
            if started.elapsed() > opts.timeout {
                return Err(SendError::Timeout {
                    waited: opts.timeout,
                    missing: ids.len(),
                    total: ids.len(),
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        },
    };
    let mut tpl = TopicPartitionList::new();
    for (p, o) in &start {
        tpl.add_partition_offset(opts.results_topic, *p, Offset::Offset(*o))?;
    }
    consumer.assign(&tpl)?;
    let total = ids.len();
    let mut summary = Summary::new();
    let mut last_report = Instant::now();
    let mut shown = 0;
    let mut reported = usize::MAX;
    let bar = results_bar(total as u64);
    let waited = tokio::task::block_in_place(|| {
        while !ids.is_empty() {
            if started.elapsed() > opts.timeout {
                return Err(SendError::Timeout {
                    waited: opts.timeout,
                    missing: ids.len(),
                    total,
                });
            }
            if bar.is_hidden()
                && last_report.elapsed() > Duration::from_secs(2)
                && reported != ids.len()
            {
                eprintln!(
                    "{} of {total} results: {}",
                    total - ids.len(),
                    status_counts(&summary)
                );
                last_report = Instant::now();
                reported = ids.len();
            }
            let Some(m) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let m = m?;
            let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
                continue;
            };
            if ids.remove(key) {
                let value = m
                    .payload()
                    .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok());
                if shown < opts.show {
                    if let Some(v) = &value {
                        let pretty = serde_json::to_string_pretty(v).unwrap_or_default();
                        bar.suspend(|| println!("{pretty}"));
                        shown += 1;
                    }
                }
                let status = value
                    .as_ref()
                    .and_then(|v| v["status"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| "unknown".into());
                *summary.entry(status).or_default() += 1;
                bar.inc(1);
                bar.set_message(status_counts(&summary));
            }
        }
        Ok(())
    });
    bar.finish_and_clear();
    waited?;
    Ok(Some(WaitReport {
        sent,
        by_status: summary,
        elapsed: begun.elapsed(),
    }))
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

/// The current end offset of every partition of `topic`, or `None` when the
/// topic does not exist yet.
fn high_watermarks(brokers: &str, topic: &str) -> Result<Option<Vec<(i32, i64)>>, SendError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("allow.auto.create.topics", "false")
        .create()?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(30))?;
    let mut out = Vec::new();
    for t in md.topics() {
        if t.error().is_some() || t.partitions().is_empty() {
            return Ok(None);
        }
        for p in t.partitions() {
            let (_, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(30))?;
            out.push((p.id(), high));
        }
    }
    Ok((!out.is_empty()).then_some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_report_counts_by_status_with_the_time_taken() {
        let report = WaitReport {
            sent: 23,
            by_status: Summary::from([("succeeded".into(), 18), ("rejected".into(), 3)]),
            elapsed: Duration::from_millis(83_250),
        };
        assert_eq!(
            report.to_string(),
            "21 results for 23 messages sent, in 1m23.2s:\n  rejected          3\n  succeeded        18\n"
        );
        assert_eq!(format_elapsed(Duration::from_millis(4_560)), "4.6s");
    }

    #[test]
    fn the_bar_message_lists_counts_by_status() {
        let summary = Summary::from([("errored".into(), 2), ("succeeded".into(), 40)]);
        assert_eq!(status_counts(&summary), "errored 2 · succeeded 40");
        assert_eq!(status_counts(&Summary::new()), "");
    }
}
