//! The state tail (DESIGN.md "Assignment"): one consumer outside the group,
//! on its own thread, reads every state partition this instance owns from
//! its claim on, for as long as it owns it. It serves two purposes:
//! - read-backs: a record of this owner is void when another owner's claim
//!   lies between its claim and it. [`Tail::confirm`] waits until the tail
//!   has read past a record and says whether one does, without a new
//!   client per confirmation;
//! - cancel records (`<batch>/cancel/<uuid>`), which any instance may write,
//!   and `submitted` records of other epochs (an owner that had lost the
//!   partition created a batch: a possible orphan): each is handed to the
//!   owner.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, Notify};

use crate::journal::{Body, ProviderBatchRef, Record};

/// A record of an owned state partition its owner acts on.
#[derive(Debug, Clone, PartialEq)]
pub enum TailEvent {
    /// An operator asked to cancel a batch.
    Cancel(CancelSeen),
    /// Another epoch's `submitted` record after this owner's claim: that
    /// owner had lost the partition, and its provider batch may be an
    /// orphan.
    VoidCreate {
        partition: i32,
        batch_id: String,
        provider_batch: ProviderBatchRef,
    },
}

/// A cancel record read from an owned state partition.
#[derive(Debug, Clone, PartialEq)]
pub struct CancelSeen {
    pub partition: i32,
    pub batch_id: String,
    /// The record's key, to tombstone with the batch.
    pub key: String,
}

/// What the tail knows of one owned state partition.
#[derive(Debug)]
struct Followed {
    epoch: String,
    /// `<p>/claim/`: the keys of the partition's claims.
    claim_prefix: String,
    /// The offset after the last record read: every record below it has
    /// been seen (each offset once: Tansu hands a compacted partition's
    /// records out again after later ones).
    next: i64,
    /// The first claim of another epoch read after this owner's claim.
    other_claim: Option<i64>,
}

impl Followed {
    /// Takes one record in; returns what its owner acts on.
    fn take(
        &mut self,
        p: i32,
        offset: i64,
        key: &str,
        payload: Option<&[u8]>,
    ) -> Option<TailEvent> {
        if offset < self.next {
            return None;
        }
        self.next = offset + 1;
        if self.other_claim.is_some() {
            // This owner's records are void from there on: it acts on
            // nothing more (and the later records are the next owner's).
            return None;
        }
        // A tombstone of an earlier claim (its owner's cleanup) claims
        // nothing.
        if let Some(epoch) = key
            .strip_prefix(&self.claim_prefix)
            .filter(|e| *e != self.epoch && payload.is_some())
        {
            tracing::debug!(partition = p, offset, epoch, "another owner's claim read");
            self.other_claim.get_or_insert(offset);
            return None;
        }
        if let Some((batch_id, _)) = key.split_once("/cancel/") {
            return payload.map(|_| {
                TailEvent::Cancel(CancelSeen {
                    partition: p,
                    batch_id: batch_id.to_owned(),
                    key: key.to_owned(),
                })
            });
        }
        let (batch_id, epoch) = key.split_once("/submitted/")?;
        if epoch == self.epoch {
            return None;
        }
        let record: Record = serde_json::from_slice(payload?).ok()?;
        let Body::Batch(b) = record.body else {
            return None;
        };
        Some(TailEvent::VoidCreate {
            partition: p,
            batch_id: batch_id.to_owned(),
            provider_batch: ProviderBatchRef {
                provider: b.route.provider,
                id: b.provider_batch_id?,
            },
        })
    }
}

struct Shared {
    followed: Mutex<HashMap<i32, Followed>>,
    /// Set when the followed partitions changed: the thread re-assigns.
    reassign: AtomicBool,
    stop: AtomicBool,
    /// Woken after each record read.
    progressed: Notify,
}

/// How long the tail's fetches wait at the broker for new records: the
/// most a confirmation waits for a record already written.
const FETCH_WAIT_MS: &str = "20";

/// The state tail. Dropping it stops its thread.
pub struct Tail {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Tail {
    /// Starts the tail on `topic`, with `client` (a consumer configuration
    /// outside the group). What the owner acts on goes to the returned
    /// receiver.
    pub fn start(
        mut client: ClientConfig,
        topic: String,
    ) -> Result<(Tail, mpsc::UnboundedReceiver<TailEvent>), rdkafka::error::KafkaError> {
        client.set("fetch.wait.max.ms", FETCH_WAIT_MS);
        let consumer: BaseConsumer = client.create()?;
        let shared = Arc::new(Shared {
            followed: Mutex::new(HashMap::new()),
            reassign: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            progressed: Notify::new(),
        });
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("state-tail".into())
            .spawn({
                let shared = shared.clone();
                move || run(consumer, topic, shared, events_tx)
            })
            .expect("spawning the state tail thread");
        Ok((
            Tail {
                shared,
                thread: Some(thread),
            },
            events_rx,
        ))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Followed>> {
        self.shared.followed.lock().expect("state tail lock")
    }

    /// Follows state partition `p` for `epoch`, whose claim is at `claim`.
    pub fn follow(&self, p: i32, epoch: &str, claim: i64) {
        self.lock().insert(
            p,
            Followed {
                epoch: epoch.to_owned(),
                claim_prefix: format!("{p}/claim/"),
                next: claim + 1,
                other_claim: None,
            },
        );
        self.shared.reassign.store(true, Ordering::Release);
    }

    /// Stops following `p` (revoked or lost).
    pub fn unfollow(&self, p: i32) {
        if self.lock().remove(&p).is_some() {
            self.shared.reassign.store(true, Ordering::Release);
        }
        self.shared.progressed.notify_waiters();
    }

    /// Waits until the tail has read `epoch`'s record at `offset` in `p`:
    /// `Some(true)` when no other owner's claim lies before it, `Some(false)`
    /// when one does, `None` when `p` is not followed for `epoch` (any more)
    /// or `timeout` passed.
    pub async fn confirm(
        &self,
        p: i32,
        epoch: &str,
        offset: i64,
        timeout: Duration,
    ) -> Option<bool> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let progressed = self.shared.progressed.notified();
            tokio::pin!(progressed);
            progressed.as_mut().enable();
            {
                let followed = self.lock();
                let f = followed.get(&p).filter(|f| f.epoch == epoch)?;
                if let Some(at) = f.other_claim.filter(|at| *at < offset) {
                    tracing::debug!(partition = p, offset, other_claim = at, "record void");
                    return Some(false);
                }
                if f.next > offset {
                    return Some(true);
                }
            }
            if tokio::time::timeout_at(deadline, progressed).await.is_err() {
                return None;
            }
        }
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    consumer: BaseConsumer,
    topic: String,
    shared: Arc<Shared>,
    events: mpsc::UnboundedSender<TailEvent>,
) {
    while !shared.stop.load(Ordering::Acquire) {
        if shared.reassign.swap(false, Ordering::AcqRel) {
            let mut tpl = TopicPartitionList::new();
            for (p, f) in shared.followed.lock().expect("state tail lock").iter() {
                if let Err(e) = tpl.add_partition_offset(&topic, *p, Offset::Offset(f.next)) {
                    tracing::warn!(partition = p, error = %e, "state tail: partition not followed");
                }
            }
            if let Err(e) = consumer.assign(&tpl) {
                tracing::warn!(error = %e, "state tail: assigning partitions failed; retrying");
                shared.reassign.store(true, Ordering::Release);
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "state tail: read failed");
                continue;
            }
        };
        let key = m.key().map(String::from_utf8_lossy).unwrap_or_default();
        let event = shared
            .followed
            .lock()
            .expect("state tail lock")
            .get_mut(&m.partition())
            .and_then(|f| f.take(m.partition(), m.offset(), &key, m.payload()));
        if let Some(e) = event {
            let _ = events.send(e);
        }
        shared.progressed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn followed() -> Followed {
        Followed {
            epoch: "mine".into(),
            claim_prefix: "3/claim/".into(),
            next: 11,
            other_claim: None,
        }
    }

    const LIVE: Option<&[u8]> = Some(b"{}");

    #[test]
    fn another_claim_is_noted_once_and_records_are_taken_once() {
        let mut f = followed();
        assert_eq!(f.take(3, 11, "bl-3-a/intent/mine", LIVE), None);
        assert_eq!(f.take(3, 12, "3/claim/mine", LIVE), None);
        assert_eq!(f.other_claim, None);
        assert_eq!(f.take(3, 14, "3/claim/theirs", LIVE), None);
        assert_eq!(f.take(3, 15, "3/claim/third", LIVE), None);
        assert_eq!(f.other_claim, Some(14));
        assert_eq!(f.next, 16);
        // Handed out again after later ones: not taken twice.
        assert_eq!(f.take(3, 13, "3/claim/late", LIVE), None);
        assert_eq!(f.other_claim, Some(14));
        assert_eq!(f.other_claim, Some(14));
        assert_eq!(f.next, 16);
        // Void from there on: nothing is acted on.
        assert_eq!(f.take(3, 16, "bl-3-a/cancel/u1", LIVE), None);
    }

    #[test]
    fn a_tombstoned_claim_claims_nothing() {
        let mut f = followed();
        assert_eq!(f.take(3, 11, "3/claim/earlier", None), None);
        assert_eq!(f.other_claim, None);
        assert_eq!(f.next, 12);
    }

    #[test]
    fn cancel_records_are_handed_on_and_their_tombstones_are_not() {
        let mut f = followed();
        assert_eq!(
            f.take(3, 11, "bl-3-a/cancel/u1", LIVE),
            Some(TailEvent::Cancel(CancelSeen {
                partition: 3,
                batch_id: "bl-3-a".into(),
                key: "bl-3-a/cancel/u1".into(),
            }))
        );
        assert_eq!(f.take(3, 12, "bl-3-a/cancel/u1", None), None);
        assert_eq!(f.take(3, 11, "bl-3-a/cancel/u1", LIVE), None, "seen");
    }

    #[test]
    fn another_epochs_create_is_a_possible_orphan_and_ours_is_not() {
        let submitted = |epoch: &str, pb: &str| {
            let record = Record {
                epoch: epoch.into(),
                time_ms: 1,
                body: Body::Batch(Box::new(crate::journal::BatchRecord {
                    id: "bl-3-a".into(),
                    phase: crate::journal::Phase::Submitted,
                    route: crate::journal::RouteRecord {
                        provider: "openai".into(),
                        model: "m".into(),
                        endpoint: "/v1/chat/completions".into(),
                    },
                    attempt: 1,
                    requeues: 0,
                    offsets: [7].into_iter().collect(),
                    file_id: None,
                    provider_batch_id: Some(pb.into()),
                    terminal: None,
                    released: Vec::new(),
                })),
            };
            serde_json::to_string(&record).unwrap()
        };
        let mut f = followed();
        let ours = submitted("mine", "batch_1");
        assert_eq!(
            f.take(3, 11, "bl-3-a/submitted/mine", Some(ours.as_bytes())),
            None
        );
        let theirs = submitted("zombie", "batch_2");
        assert_eq!(
            f.take(3, 12, "bl-3-a/submitted/zombie", Some(theirs.as_bytes())),
            Some(TailEvent::VoidCreate {
                partition: 3,
                batch_id: "bl-3-a".into(),
                provider_batch: ProviderBatchRef {
                    provider: "openai".into(),
                    id: "batch_2".into(),
                },
            })
        );
    }
}
