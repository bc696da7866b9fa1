//! Publishes results and dead letters with an idempotent producer
//! (acks=all), and reports each delivery so offsets are committed only past
//! requests whose result is durable.
//!
//! A delivery that fails is sent again until it succeeds or the process is
//! told to abandon its work: a result is never dropped, though a crash may
//! publish it twice (identically).

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::model::{rfc3339_millis, ResultRecord, Source, Status, Timings};
use crate::model::{ErrorInfo, Rejection};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("creating the results producer: {0}")]
    Create(KafkaError),
    #[error("publishing to {topic}: message of {size} bytes is larger than the broker accepts")]
    TooLarge { topic: String, size: usize },
    #[error("publishing to {topic} abandoned at shutdown")]
    Abandoned { topic: String },
}

/// An input message batchline refused, owned so it can outlive the
/// consumer's buffer.
#[derive(Debug)]
pub struct RejectedInput {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub source: Source,
    pub timestamp_ms: Option<i64>,
    pub rejection: Rejection,
}

pub struct Publisher {
    producer: FutureProducer,
    results_topic: String,
    dlq_topic: String,
    max_bytes: usize,
    /// Result deliveries in flight over the whole process: memory held by
    /// pending results stays bounded however many batches are collected.
    inflight: Arc<Semaphore>,
    /// Fired when in-flight work must be given up (shutdown deadline).
    abandon: CancellationToken,
}

impl Publisher {
    pub fn new(cfg: &Config, abandon: CancellationToken) -> Result<Publisher, PublishError> {
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &cfg.kafka.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", "zstd")
            .set("linger.ms", "5")
            .set("queue.buffering.max.kbytes", "65536")
            .set("message.timeout.ms", "120000");
        for (k, v) in &cfg.kafka.producer {
            client.set(k, v);
        }
        let producer: FutureProducer = client.create().map_err(PublishError::Create)?;
        Ok(Publisher {
            producer,
            results_topic: cfg.topics.results.clone(),
            dlq_topic: cfg.topics.dlq.clone(),
            max_bytes: cfg.results.max_bytes,
            inflight: Arc::new(Semaphore::new(cfg.limits.max_inflight_deliveries)),
            abandon,
        })
    }

    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// A set of result deliveries awaited together, bounded in number.
    pub fn deliveries(&self) -> Deliveries<'_> {
        Deliveries {
            publisher: self,
            pending: FuturesUnordered::new(),
        }
    }

    /// Sends one record and waits until the broker has it, sending it again
    /// after transient failures.
    pub async fn deliver(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: Option<OwnedHeaders>,
    ) -> Result<(), PublishError> {
        let mut backoff = Duration::from_millis(50);
        loop {
            if self.abandon.is_cancelled() {
                return Err(PublishError::Abandoned {
                    topic: topic.into(),
                });
            }
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
            if let Some(k) = key {
                record = record.key(k);
            }
            if let Some(p) = payload {
                record = record.payload(p);
            }
            if let Some(h) = &headers {
                record = record.headers(h.clone());
            }
            let error = match self.producer.send_result(record) {
                Ok(delivery) => match delivery.await {
                    Ok(Ok(_)) => return Ok(()),
                    Ok(Err((e, _))) => e,
                    Err(_canceled) => KafkaError::Canceled,
                },
                Err((e, _)) => e,
            };
            match error {
                KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge) => {
                    return Err(PublishError::TooLarge {
                        topic: topic.into(),
                        size: payload.map_or(0, <[u8]>::len),
                    });
                }
                e => {
                    tracing::warn!(topic, error = %e, "delivery failed; sending again");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.abandon.cancelled() => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Publishes a refused input: its bytes and key to the DLQ with headers
    /// saying why and where from, and, when a custom_id is known, a
    /// `rejected` result.
    pub async fn publish_rejection(&self, input: &RejectedInput) -> Result<(), PublishError> {
        let r = &input.rejection;
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "batchline.error.type",
                value: Some(r.reason.as_str()),
            })
            .insert(Header {
                key: "batchline.error.message",
                value: Some(r.message.as_str()),
            })
            .insert(Header {
                key: "batchline.source.topic",
                value: Some(input.source.topic.as_str()),
            })
            .insert(Header {
                key: "batchline.source.partition",
                value: Some(&input.source.partition.to_string()),
            })
            .insert(Header {
                key: "batchline.source.offset",
                value: Some(&input.source.offset.to_string()),
            });
        let dlq = self.deliver(
            &self.dlq_topic,
            input.key.as_deref(),
            input.value.as_deref(),
            Some(headers),
        );
        let Some(custom_id) = &r.custom_id else {
            return dlq.await;
        };
        let mut record = ResultRecord {
            custom_id,
            status: Status::Rejected,
            provider: r.provider.as_deref(),
            model: None,
            batch_id: None,
            attempt: 0,
            response: None,
            content: None,
            finish_reason: None,
            usage: None,
            cost_usd: None,
            error: Some(ErrorInfo::new(r.reason.as_str(), r.message.clone())),
            metadata: r.metadata.as_deref(),
            source: input.source.clone(),
            timings: Timings {
                received_at: input.timestamp_ms.and_then(rfc3339_millis),
                submitted_at: None,
                ended_at: None,
            },
            truncated: false,
        };
        let payload = record.to_bytes(self.max_bytes);
        let result = self.deliver(
            &self.results_topic,
            Some(custom_id.as_bytes()),
            Some(&payload),
            None,
        );
        let (a, b) = tokio::join!(dlq, result);
        a.and(b)
    }

    /// Waits for queued messages, up to `timeout`.
    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer.flush(timeout);
    }
}

/// Result deliveries in flight for one batch.
pub struct Deliveries<'a> {
    publisher: &'a Publisher,
    pending: FuturesUnordered<BoxFuture<'a, Result<(), PublishError>>>,
}

impl<'a> Deliveries<'a> {
    /// Queues a result keyed by `custom_id`, first waiting for room among
    /// the process's deliveries in flight.
    pub async fn push(&mut self, custom_id: String, payload: Vec<u8>) -> Result<(), PublishError> {
        let permit = loop {
            // Finished deliveries of this batch free their permits and
            // surface errors while waiting.
            tokio::select! {
                permit = self.publisher.inflight.clone().acquire_owned() => {
                    break permit.expect("the delivery semaphore is never closed");
                }
                Some(r) = self.pending.next(), if !self.pending.is_empty() => r?,
            }
        };
        let publisher = self.publisher;
        self.pending.push(Box::pin(async move {
            let delivered = publisher
                .deliver(
                    &publisher.results_topic,
                    Some(custom_id.as_bytes()),
                    Some(&payload),
                    None,
                )
                .await;
            drop(permit);
            delivered
        }));
        Ok(())
    }

    /// Waits for every queued delivery.
    pub async fn finish(mut self) -> Result<(), PublishError> {
        while let Some(r) = self.pending.next().await {
            r?;
        }
        Ok(())
    }
}
