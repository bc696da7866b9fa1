//! The state tail (DESIGN.md "Assignment"): one consumer outside the group,
//! on its own thread, reads every state partition this instance owns from
//! its claim on, for as long as it owns it. It serves two purposes:
//! - read-backs: a record of this owner is void when another owner's claim
//!   lies between its claim and it. [`Tail::confirm`] waits until the tail
//!   has read past a record and says whether one does, without a new
//!   client per confirmation;
//! - cancel records (`<batch>/cancel/<uuid>`), which any instance may write:
//!   each one read is handed to the owner's cancel handler.

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
    /// The offset after the last record read: every record below it has
    /// been seen (each offset once: Tansu hands a compacted partition's
    /// records out again after later ones).
    next: i64,
    /// The first claim of another epoch read after this owner's claim.
    other_claim: Option<i64>,
}

impl Followed {
    /// Takes one record in; returns a cancel it carries.
    fn take(&mut self, p: i32, offset: i64, key: &str, live: bool) -> Option<CancelSeen> {
        if offset < self.next {
            return None;
        }
        self.next = offset + 1;
        if let Some(epoch) = key
            .strip_prefix(&format!("{p}/claim/"))
            .filter(|e| *e != self.epoch)
        {
            tracing::debug!(partition = p, offset, epoch, "another owner's claim read");
            self.other_claim.get_or_insert(offset);
            return None;
        }
        let (batch_id, _) = key.split_once("/cancel/")?;
        live.then(|| CancelSeen {
            partition: p,
            batch_id: batch_id.to_owned(),
            key: key.to_owned(),
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
    /// outside the group). Cancel records read go to the returned receiver.
    pub fn start(
        mut client: ClientConfig,
        topic: String,
    ) -> Result<(Tail, mpsc::UnboundedReceiver<CancelSeen>), rdkafka::error::KafkaError> {
        client.set("fetch.wait.max.ms", FETCH_WAIT_MS);
        let consumer: BaseConsumer = client.create()?;
        let shared = Arc::new(Shared {
            followed: Mutex::new(HashMap::new()),
            reassign: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            progressed: Notify::new(),
        });
        let (cancels_tx, cancels_rx) = mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("state-tail".into())
            .spawn({
                let shared = shared.clone();
                move || run(consumer, topic, shared, cancels_tx)
            })
            .expect("spawning the state tail thread");
        Ok((
            Tail {
                shared,
                thread: Some(thread),
            },
            cancels_rx,
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
    cancels: mpsc::UnboundedSender<CancelSeen>,
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
        let cancel = shared
            .followed
            .lock()
            .expect("state tail lock")
            .get_mut(&m.partition())
            .and_then(|f| f.take(m.partition(), m.offset(), &key, m.payload().is_some()));
        if let Some(c) = cancel {
            let _ = cancels.send(c);
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
            next: 11,
            other_claim: None,
        }
    }

    #[test]
    fn another_claim_is_noted_once_and_records_are_taken_once() {
        let mut f = followed();
        assert_eq!(f.take(3, 11, "bl-3-a/intent/mine", true), None);
        assert_eq!(f.take(3, 12, "3/claim/mine", true), None);
        assert_eq!(f.other_claim, None);
        assert_eq!(f.take(3, 14, "3/claim/theirs", true), None);
        assert_eq!(f.take(3, 15, "3/claim/third", true), None);
        assert_eq!(f.other_claim, Some(14));
        assert_eq!(f.next, 16);
        // Handed out again after later ones: not taken twice.
        assert_eq!(f.take(3, 13, "3/claim/late", true), None);
        assert_eq!(f.other_claim, Some(14));
        assert_eq!(f.next, 16);
    }

    #[test]
    fn cancel_records_are_handed_on_and_their_tombstones_are_not() {
        let mut f = followed();
        assert_eq!(
            f.take(3, 11, "bl-3-a/cancel/u1", true),
            Some(CancelSeen {
                partition: 3,
                batch_id: "bl-3-a".into(),
                key: "bl-3-a/cancel/u1".into(),
            })
        );
        assert_eq!(f.take(3, 12, "bl-3-a/cancel/u1", false), None);
        assert_eq!(f.take(3, 11, "bl-3-a/cancel/u1", true), None, "seen");
    }
}
