//! Publishes results and dead letters with an idempotent producer
//! (acks=all), and reports each delivery so offsets are committed only past
//! requests whose result is durable.
//!
//! A delivery that fails is sent again until it succeeds or the process is
//! told to abandon its work: a result is never dropped, though a crash may
//! publish it twice (identically).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use tokio::sync::{Notify, Semaphore};
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

/// A message the broker did not take, kept to be sent again.
struct Failed {
    topic: String,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Option<OwnedHeaders>,
    error: KafkaError,
}

/// The deliveries of one [`Deliveries`] set that the broker has not yet
/// confirmed, counted by the producer's delivery callback: no future,
/// channel or allocation per message.
#[derive(Default)]
struct Pending {
    in_flight: AtomicUsize,
    /// Set with `failed`, read without its lock on every send.
    any_failed: AtomicBool,
    failed: Mutex<Vec<Failed>>,
    /// Woken when the last delivery in flight is reported, or one failed.
    changed: Notify,
}

/// The results producer's callbacks: each delivery report lands on the set
/// that sent the message, and frees its place among the process's
/// deliveries in flight.
struct DeliveryCounter {
    inflight: Arc<Semaphore>,
}

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = Arc<Pending>;

    fn delivery(&self, result: &DeliveryResult<'_>, pending: Arc<Pending>) {
        if let Err((error, message)) = result {
            let failed = Failed {
                topic: message.topic().to_owned(),
                key: message.key().map(<[u8]>::to_vec),
                payload: message.payload().map(<[u8]>::to_vec),
                headers: message.headers().map(|h| h.detach()),
                error: error.clone(),
            };
            pending
                .failed
                .lock()
                .expect("failed deliveries lock")
                .push(failed);
            pending.any_failed.store(true, Ordering::Release);
            pending.changed.notify_one();
        }
        self.inflight.add_permits(1);
        if pending.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            pending.changed.notify_one();
        }
    }
}

pub struct Publisher {
    producer: ThreadedProducer<DeliveryCounter>,
    results_topic: String,
    dlq_topic: String,
    max_bytes: usize,
    /// Deliveries in flight over the whole process: memory held by pending
    /// results stays bounded however many batches are collected.
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
        let inflight = Arc::new(Semaphore::new(cfg.limits.max_inflight_deliveries));
        let producer = client
            .create_with_context(DeliveryCounter {
                inflight: inflight.clone(),
            })
            .map_err(PublishError::Create)?;
        Ok(Publisher {
            producer,
            results_topic: cfg.topics.results.clone(),
            dlq_topic: cfg.topics.dlq.clone(),
            max_bytes: cfg.results.max_bytes,
            inflight,
            abandon,
        })
    }

    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// A set of deliveries awaited together, bounded in number over the
    /// process.
    pub fn deliveries(&self) -> Deliveries<'_> {
        Deliveries {
            publisher: self,
            pending: Arc::new(Pending::default()),
            backoff: INITIAL_BACKOFF,
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
        let mut one = self.deliveries();
        one.queue(topic, key, payload, headers).await?;
        one.finish().await
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

/// How long a failed delivery waits before it is sent again, at first; it
/// doubles up to [`MAX_BACKOFF`] while deliveries keep failing.
const INITIAL_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Deliveries in flight for one batch (or one refused input).
pub struct Deliveries<'a> {
    publisher: &'a Publisher,
    pending: Arc<Pending>,
    backoff: Duration,
}

impl Deliveries<'_> {
    /// Queues a result keyed by `custom_id`, first waiting for room among
    /// the process's deliveries in flight.
    /// What failed so far is sent again first.
    pub async fn push(&mut self, custom_id: &str, payload: &[u8]) -> Result<(), PublishError> {
        if self.pending.any_failed.load(Ordering::Acquire) {
            self.resend_failed().await?;
        }
        let topic = &self.publisher.results_topic;
        self.queue(topic, Some(custom_id.as_bytes()), Some(payload), None)
            .await
    }

    /// Waits until every queued delivery is confirmed, sending failed ones
    /// again.
    pub async fn finish(mut self) -> Result<(), PublishError> {
        loop {
            self.resend_failed().await?;
            if self.pending.in_flight.load(Ordering::Acquire) == 0
                && !self.pending.any_failed.load(Ordering::Acquire)
            {
                return Ok(());
            }
            // A report that came since the check left a permit in `changed`.
            tokio::select! {
                () = self.pending.changed.notified() => {}
                () = self.publisher.abandon.cancelled() => {
                    return Err(PublishError::Abandoned {
                        topic: self.publisher.results_topic.clone(),
                    });
                }
            }
        }
    }

    /// Hands one message to the producer once there is room for it.
    async fn queue(
        &mut self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: Option<OwnedHeaders>,
    ) -> Result<(), PublishError> {
        let abandoned = || PublishError::Abandoned {
            topic: topic.into(),
        };
        let inflight = &self.publisher.inflight;
        match inflight.try_acquire() {
            Ok(permit) => permit.forget(),
            Err(_) => tokio::select! {
                permit = inflight.acquire() => {
                    permit.expect("the delivery semaphore is never closed").forget();
                }
                () = self.publisher.abandon.cancelled() => return Err(abandoned()),
            },
        }
        // Given back by the delivery callback, or below if nothing was queued.
        loop {
            if self.publisher.abandon.is_cancelled() {
                inflight.add_permits(1);
                return Err(abandoned());
            }
            let mut record = BaseRecord::with_opaque_to(topic, self.pending.clone());
            if let Some(k) = key {
                record = record.key(k);
            }
            if let Some(p) = payload {
                record = record.payload(p);
            }
            if let Some(h) = &headers {
                record = record.headers(h.clone());
            }
            self.pending.in_flight.fetch_add(1, Ordering::AcqRel);
            let error = match self.publisher.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((e, _)) => e,
            };
            self.pending.in_flight.fetch_sub(1, Ordering::AcqRel);
            match error {
                KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge) => {
                    inflight.add_permits(1);
                    return Err(PublishError::TooLarge {
                        topic: topic.into(),
                        size: payload.map_or(0, <[u8]>::len),
                    });
                }
                e => {
                    tracing::warn!(topic, error = %e, "delivery failed; sending again");
                    self.wait_backoff().await;
                }
            }
        }
    }

    /// Sends again what the broker refused, after a backoff.
    async fn resend_failed(&mut self) -> Result<(), PublishError> {
        if !self.pending.any_failed.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let failed =
            std::mem::take(&mut *self.pending.failed.lock().expect("failed deliveries lock"));
        if failed.is_empty() {
            return Ok(());
        }
        for f in &failed {
            if let KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge) = f.error {
                return Err(PublishError::TooLarge {
                    topic: f.topic.clone(),
                    size: f.payload.as_ref().map_or(0, Vec::len),
                });
            }
        }
        tracing::warn!(topic = %failed[0].topic, messages = failed.len(), error = %failed[0].error, "delivery failed; sending again");
        self.wait_backoff().await;
        for f in failed {
            self.queue(&f.topic, f.key.as_deref(), f.payload.as_deref(), f.headers)
                .await?;
        }
        Ok(())
    }

    async fn wait_backoff(&mut self) {
        tokio::select! {
            _ = tokio::time::sleep(self.backoff) => {}
            _ = self.publisher.abandon.cancelled() => {}
        }
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    //! The delivery paths a healthy broker never takes, on librdkafka's mock
    //! cluster (DESIGN.md: a focused test of broker errors).

    use std::collections::HashSet;

    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::mocking::MockCluster;

    use super::*;

    const TOPIC: &str = "results";

    /// A publisher on `brokers` whose messages time out after 100 ms.
    fn publisher(brokers: &str, abandon: CancellationToken) -> Publisher {
        let mut cfg = Config::load_from(None, Vec::<(String, String)>::new()).unwrap();
        cfg.kafka.brokers = brokers.to_owned();
        cfg.topics.results = TOPIC.to_owned();
        cfg.kafka
            .producer
            .insert("message.timeout.ms".into(), "100".into());
        Publisher::new(&cfg, abandon).unwrap()
    }

    fn keys_in_topic(brokers: &str, want: usize) -> HashSet<String> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "publisher-test")
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        consumer.subscribe(&[TOPIC]).unwrap();
        let mut keys = HashSet::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while keys.len() < want && std::time::Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                keys.insert(String::from_utf8(m.key().unwrap().to_vec()).unwrap());
            }
        }
        keys
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deliveries_that_time_out_are_sent_again_until_the_broker_has_them() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic(TOPIC, 2, 1).unwrap();
        let brokers = cluster.bootstrap_servers();
        let publisher = publisher(&brokers, CancellationToken::new());
        cluster.broker_down(1).unwrap();
        let mut deliveries = publisher.deliveries();
        for i in 0..50 {
            deliveries
                .push(&format!("id-{i}"), format!("{{\"n\":{i}}}").as_bytes())
                .await
                .unwrap();
        }
        // Down for ten times message.timeout.ms: every first send fails.
        let started = std::time::Instant::now();
        let back_up = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            cluster.broker_up(1).unwrap();
        };
        let finishing = async {
            let finished = tokio::time::timeout(Duration::from_secs(60), deliveries.finish()).await;
            (finished, started.elapsed())
        };
        let ((finished, took), ()) = tokio::join!(finishing, back_up);
        finished
            .expect("every delivery is confirmed in time")
            .unwrap();
        assert!(
            took >= Duration::from_secs(1),
            "finished while the broker was down: {took:?}"
        );
        let keys = keys_in_topic(&brokers, 50);
        let want: HashSet<String> = (0..50).map(|i| format!("id-{i}")).collect();
        assert_eq!(keys, want);
        // Every permit came back: nothing is counted in flight.
        assert_eq!(
            publisher.inflight.available_permits(),
            Config::load_from(None, Vec::<(String, String)>::new())
                .unwrap()
                .limits
                .max_inflight_deliveries
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn abandoning_ends_deliveries_the_broker_never_took() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic(TOPIC, 1, 1).unwrap();
        let abandon = CancellationToken::new();
        let publisher = publisher(&cluster.bootstrap_servers(), abandon.clone());
        cluster.broker_down(1).unwrap();
        let mut deliveries = publisher.deliveries();
        deliveries.push("id-1", b"{}").await.unwrap();
        let finishing = tokio::time::timeout(Duration::from_secs(10), deliveries.finish());
        let (finished, ()) = tokio::join!(finishing, async { abandon.cancel() });
        let finished = finished.expect("finish returns once abandoned");
        assert!(
            matches!(finished, Err(PublishError::Abandoned { .. })),
            "{finished:?}"
        );
    }
}
