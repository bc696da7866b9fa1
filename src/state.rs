//! The journal's Kafka side (DESIGN.md "Durability"): writing confirmed
//! records to the compacted state topic, one partition per input
//! partition, and reading a state partition back on assignment.
//!
//! [`Journal`] is the writer every batch task shares. It knows which input
//! partitions this instance owns and under which epoch; a write for a
//! partition it no longer owns is refused, so a batch whose partition was
//! revoked stops before its next step. Records of finished batches are
//! tombstoned once a confirmed commit has passed all their offsets.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::journal::{BatchRecord, Body, Orphan, Phase, ProviderBatchRef, Record, Replay};
use crate::tail::{Tail, TailEvent};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("creating a state topic client: {0}")]
    Client(KafkaError),
    #[error("partition {0} is not owned by this instance any more")]
    NotOwner(i32),
    #[error("writing to the state topic: {0}")]
    Write(KafkaError),
    #[error("reading state partition {partition}: {message}")]
    Read { partition: i32, message: String },
}

/// Keys written for one batch, to tombstone once it is committed past.
struct Written {
    keys: Vec<String>,
    max_offset: i64,
    done: bool,
    /// Provider batches its valid records name.
    provider_batches: Vec<String>,
    /// Provider batches only void records name (another owner's creates),
    /// waiting for this batch's `done`: those it did not adopt are orphans.
    void_submitted: Vec<ProviderBatchRef>,
    /// Found in the journal at the claim: earlier owners' keys.
    adopted: bool,
}

impl Written {
    fn new(max_offset: i64, done: bool) -> Written {
        Written {
            keys: Vec::new(),
            max_offset,
            done,
            provider_batches: Vec::new(),
            void_submitted: Vec::new(),
            adopted: false,
        }
    }

    /// The noted void creates this batch did not adopt: orphans once it is
    /// done.
    fn orphans(&mut self, local_batch: &str) -> Vec<Orphan> {
        let kept = &self.provider_batches;
        std::mem::take(&mut self.void_submitted)
            .into_iter()
            .filter(|r| !kept.contains(&r.id))
            .map(|r| Orphan {
                local_batch: local_batch.to_owned(),
                provider_batch: r,
            })
            .collect()
    }
}

struct Owned {
    epoch: String,
    /// No other owner's claim lies between the claim (where this starts)
    /// and this offset: a confirmation reads on from here, not from the
    /// claim, so that its cost does not grow with the life of the
    /// assignment.
    confirmed_upto: i64,
    /// Cancelled when the partition is given up: its batch tasks stop.
    revoked: CancellationToken,
    /// Its replay has ended: what the journal held is known here.
    replayed: bool,
    /// Earlier owners' live claims and marks: tombstoned once none of
    /// their batches is live any more and this owner has marked.
    stale: Vec<String>,
    batches: HashMap<String, Written>,
}

/// Orders claims against revocations, per partition. A claim sent for an
/// assignment that is revoked meanwhile must land before the revocation
/// completes: otherwise it can land after the next owner's claim and void
/// every record that owner writes (DESIGN.md "Revocation is a barrier").
#[derive(Default)]
struct ClaimGate {
    /// How many times each partition was revoked.
    revocations: HashMap<i32, u64>,
    /// Claims being written, per partition.
    in_flight: HashMap<i32, usize>,
}

/// How long a revocation waits for a claim in flight: the journal
/// producer's `message.timeout.ms`, and a margin.
const CLAIM_WAIT: Duration = Duration::from_secs(35);

/// What a revocation waits for (DESIGN.md "Revocation is a barrier").
#[derive(Default)]
struct Drain {
    /// Creates and collections in progress, per partition.
    collecting: HashMap<i32, usize>,
    /// Partitions being given up: no collection or create starts there.
    draining: HashSet<i32>,
}

/// Work on a partition that its revocation waits for: a collection, from
/// its first result to its confirmed `done` and released offsets
/// ([`Journal::collecting`]), or a create, from the record that allows it
/// to its `submitted` record ([`Journal::creating`]).
pub struct InProgress<'a> {
    journal: &'a Journal,
    partition: i32,
}

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        let mut drain = self.journal.drain.lock().expect("drain lock");
        if let Some(n) = drain.collecting.get_mut(&self.partition) {
            *n -= 1;
        }
        self.journal.collection_ended.notify_all();
    }
}

/// How long a confirmation waits for the tail to read a written record.
const CONFIRM_WAIT: Duration = Duration::from_secs(30);

/// Writes journal records for the partitions this instance owns.
pub struct Journal {
    producer: FutureProducer,
    topic: String,
    /// What a reader of the state topic needs.
    reader: Arc<ReaderConfig>,
    /// Follows the owned state partitions: read-backs and cancel records.
    tail: Tail,
    tail_events: Mutex<Option<mpsc::UnboundedReceiver<TailEvent>>>,
    /// Batches a replayed cancel record names, until their task starts.
    pending_cancels: Mutex<HashSet<String>>,
    /// Void creates the tail read before their partition's replay ended,
    /// by partition: judged once it has ([`Self::replayed`]).
    unjudged: Mutex<HashMap<i32, Vec<(String, ProviderBatchRef)>>>,
    /// Orphans found, for the task that cancels them.
    orphans_tx: mpsc::UnboundedSender<Orphan>,
    orphans_rx: Mutex<Option<mpsc::UnboundedReceiver<Orphan>>>,
    /// Collections in progress, per partition, and the partitions being
    /// given up: a revocation lets the collections finish first.
    drain: Mutex<Drain>,
    collection_ended: Condvar,
    owned: Mutex<HashMap<i32, Owned>>,
    gate: Mutex<ClaimGate>,
    claim_landed: Condvar,
    /// Partitions whose epoch turned out void (another instance's claim
    /// follows it), with that epoch: see [`Self::take_voided`].
    voided: Mutex<Vec<(i32, String)>>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Journal {
    pub fn new(cfg: &Config) -> Result<Journal, StateError> {
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &cfg.kafka.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "0")
            .set("message.timeout.ms", "30000");
        for (k, v) in &cfg.kafka.producer {
            client.set(k, v);
        }
        let reader = ReaderConfig::new(cfg);
        let (orphans_tx, orphans_rx) = mpsc::unbounded_channel();
        let (tail, tail_events) = Tail::start(reader.client.clone(), cfg.topics.state.clone())
            .map_err(StateError::Client)?;
        Ok(Journal {
            producer: client.create().map_err(StateError::Client)?,
            topic: cfg.topics.state.clone(),
            reader: Arc::new(reader),
            tail,
            tail_events: Mutex::new(Some(tail_events)),
            pending_cancels: Mutex::new(HashSet::new()),
            unjudged: Mutex::new(HashMap::new()),
            orphans_tx,
            orphans_rx: Mutex::new(Some(orphans_rx)),
            drain: Mutex::new(Drain::default()),
            collection_ended: Condvar::new(),
            owned: Mutex::new(HashMap::new()),
            gate: Mutex::new(ClaimGate::default()),
            claim_landed: Condvar::new(),
            voided: Mutex::new(Vec::new()),
        })
    }

    /// The state topic's name.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// How many times `p` has been revoked so far: an assignment notes it
    /// (in the rebalance callback) and hands it to [`Self::claim`].
    pub fn revocations(&self, p: i32) -> u64 {
        let gate = self.gate.lock().expect("claim gate lock");
        gate.revocations.get(&p).copied().unwrap_or(0)
    }

    /// Takes partition `p` under a fresh epoch: the claim record is
    /// confirmed before anything else is written for `p`. Returns the epoch.
    /// `revocations` is [`Self::revocations`] as of the assignment: if `p`
    /// has been revoked since, nothing is written, and a claim that was in
    /// flight when it was revoked does not make this instance its owner.
    pub async fn claim(&self, p: i32, revocations: u64) -> Result<String, StateError> {
        let epoch = uuid::Uuid::new_v4().to_string();
        let record = Record {
            epoch: epoch.clone(),
            time_ms: now_ms(),
            body: Body::Claim,
        };
        {
            let mut gate = self.gate.lock().expect("claim gate lock");
            if gate.revocations.get(&p).copied().unwrap_or(0) != revocations {
                return Err(StateError::NotOwner(p));
            }
            *gate.in_flight.entry(p).or_default() += 1;
        }
        let sent = self.send(p, &record.key(p), Some(&record)).await;
        let mut gate = self.gate.lock().expect("claim gate lock");
        if let Some(n) = gate.in_flight.get_mut(&p) {
            *n -= 1;
        }
        self.claim_landed.notify_all();
        let claimed_at = sent?;
        if gate.revocations.get(&p).copied().unwrap_or(0) != revocations {
            return Err(StateError::NotOwner(p));
        }
        // Under the gate: a revocation cannot slip in before ownership is
        // recorded.
        self.unjudged.lock().expect("journal lock").remove(&p);
        self.tail.follow(p, &epoch, claimed_at);
        self.owned.lock().expect("journal lock").insert(
            p,
            Owned {
                epoch: epoch.clone(),
                confirmed_upto: claimed_at,
                revoked: CancellationToken::new(),
                replayed: false,
                stale: Vec::new(),
                batches: HashMap::new(),
            },
        );
        Ok(epoch)
    }

    /// Gives `p` up: every later write for it is refused and its batch
    /// tasks are told to stop. A claim for `p` still in flight is waited
    /// for (blocking), so that it lands before the next owner's claim.
    pub fn release(&self, p: i32) {
        let mut gate = self.gate.lock().expect("claim gate lock");
        *gate.revocations.entry(p).or_default() += 1;
        let deadline = Instant::now() + CLAIM_WAIT;
        while gate.in_flight.get(&p).copied().unwrap_or(0) > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    partition = p,
                    "a claim still in flight at revocation; it may void the next owner's records"
                );
                break;
            }
            gate = self
                .claim_landed
                .wait_timeout(gate, left)
                .expect("claim gate lock")
                .0;
        }
        self.tail.unfollow(p);
        if let Some(o) = self.owned.lock().expect("journal lock").remove(&p) {
            o.revoked.cancel();
        }
        self.drain.lock().expect("drain lock").draining.remove(&p);
        self.unjudged.lock().expect("journal lock").remove(&p);
    }

    /// Starts a collection on `p`: a revocation of `p` waits until the
    /// returned guard drops. `None` while `p` is being given up: the
    /// collection is left to the next owner.
    pub fn collecting(&self, p: i32) -> Option<InProgress<'_>> {
        let mut drain = self.drain.lock().expect("drain lock");
        if drain.draining.contains(&p) {
            return None;
        }
        *drain.collecting.entry(p).or_default() += 1;
        Some(InProgress {
            journal: self,
            partition: p,
        })
    }

    /// A create on its way on `p`, through its `submitted` record: a
    /// revocation of `p` waits until the returned guard drops. Just before
    /// the create, [`Self::draining`] says whether `p` is being given up:
    /// then no create is sent, and the batch hands its requests back
    /// through a `done` under the guard.
    pub fn creating(&self, p: i32) -> InProgress<'_> {
        let mut drain = self.drain.lock().expect("drain lock");
        *drain.collecting.entry(p).or_default() += 1;
        InProgress {
            journal: self,
            partition: p,
        }
    }

    /// Whether `p` is being given up (see [`Self::drain`]).
    pub fn draining(&self, p: i32) -> bool {
        self.drain.lock().expect("drain lock").draining.contains(&p)
    }

    /// The first half of a revocation (blocking): no collection or create
    /// starts on `partitions` from now on, and those in progress finish
    /// (publish, confirm their `done`, release their offsets) within
    /// `timeout`. Returns the partitions whose collections did not; their
    /// next owner collects those again. [`Self::release`] follows.
    pub fn drain(&self, partitions: &[i32], timeout: Duration) -> Vec<i32> {
        let deadline = Instant::now() + timeout;
        let mut drain = self.drain.lock().expect("drain lock");
        drain.draining.extend(partitions.iter().copied());
        let in_progress: usize = partitions
            .iter()
            .filter_map(|p| drain.collecting.get(p))
            .sum();
        if in_progress > 0 {
            tracing::info!(partitions = ?partitions, collections = in_progress, "revocation waits for the collections in progress");
        }
        loop {
            let busy: Vec<i32> = partitions
                .iter()
                .copied()
                .filter(|p| drain.collecting.get(p).copied().unwrap_or(0) > 0)
                .collect();
            let left = deadline.saturating_duration_since(Instant::now());
            if busy.is_empty() || left.is_zero() {
                return busy;
            }
            drain = self
                .collection_ended
                .wait_timeout(drain, left)
                .expect("drain lock")
                .0;
        }
    }

    /// Orphans found (from replay, the tail, or a batch's `done`), once:
    /// the task that cancels them at their provider takes them.
    pub fn take_orphans(&self) -> Option<mpsc::UnboundedReceiver<Orphan>> {
        self.orphans_rx.lock().expect("journal lock").take()
    }

    /// Provider batches of batch `batch_id` of `p` known from the replay:
    /// `valid`, named by its non-void records (adopted or its own), and
    /// `void`, named only by void `submitted` records. A void one the
    /// batch does not adopt by its `done` is an orphan; if it is done
    /// already, at once.
    pub fn note_provider_batches(
        &self,
        p: i32,
        batch_id: &str,
        valid: impl IntoIterator<Item = String>,
        void: impl IntoIterator<Item = ProviderBatchRef>,
    ) {
        let mut owned = self.owned.lock().expect("journal lock");
        let Some(o) = owned.get_mut(&p) else {
            return;
        };
        let w = o
            .batches
            .entry(batch_id.to_owned())
            .or_insert_with(|| Written::new(-1, false));
        w.provider_batches.extend(valid);
        w.void_submitted.extend(void);
        if w.done {
            for orphan in w.orphans(batch_id) {
                let _ = self.orphans_tx.send(orphan);
            }
        }
    }

    /// Hands an orphan found while replaying to the task that cancels it.
    pub fn report_orphan(&self, orphan: Orphan) {
        let _ = self.orphans_tx.send(orphan);
    }

    /// A void `submitted` record read by the tail: another owner, which had
    /// lost `p`, created `pb` for batch `batch_id`. Judged once `p`'s
    /// replay has ended: until then, the batch may not be known here yet,
    /// and its owner may still adopt the create by lookup.
    pub fn note_void_create(&self, p: i32, batch_id: &str, pb: ProviderBatchRef) {
        let replayed = self
            .owned
            .lock()
            .expect("journal lock")
            .get(&p)
            .is_some_and(|o| o.replayed);
        if replayed {
            self.judge_void_create(p, batch_id, pb);
        } else {
            self.unjudged
                .lock()
                .expect("journal lock")
                .entry(p)
                .or_default()
                .push((batch_id.to_owned(), pb));
        }
    }

    /// `p`'s replay has ended: the void creates read meanwhile are judged.
    pub fn replayed(&self, p: i32) {
        if let Some(o) = self.owned.lock().expect("journal lock").get_mut(&p) {
            o.replayed = true;
        }
        let unjudged = self
            .unjudged
            .lock()
            .expect("journal lock")
            .remove(&p)
            .unwrap_or_default();
        for (batch_id, pb) in unjudged {
            self.judge_void_create(p, &batch_id, pb);
        }
    }

    /// A void create is an orphan unless its batch is open here (then,
    /// unless the batch adopts it by its `done`) or adopted it already.
    /// A batch unknown after the replay has finished and been cleaned up.
    fn judge_void_create(&self, p: i32, batch_id: &str, pb: ProviderBatchRef) {
        let mut owned = self.owned.lock().expect("journal lock");
        let Some(o) = owned.get_mut(&p) else {
            return;
        };
        let orphans = match o.batches.get_mut(batch_id) {
            Some(w) => {
                w.void_submitted.push(pb);
                if w.done {
                    w.orphans(batch_id)
                } else {
                    Vec::new()
                }
            }
            None => vec![Orphan {
                local_batch: batch_id.to_owned(),
                provider_batch: pb,
            }],
        };
        for orphan in orphans {
            let _ = self.orphans_tx.send(orphan);
        }
    }

    /// What the tail reads for the owner to act on (cancel records, void
    /// creates), once: the owner's handler takes them.
    pub fn take_tail_events(&self) -> Option<mpsc::UnboundedReceiver<TailEvent>> {
        self.tail_events.lock().expect("journal lock").take()
    }

    /// Writes a cancel record for `batch_id` to state partition `p`. Any
    /// instance may: cancel records are never void, and `p`'s owner acts on
    /// them from its tail (DESIGN.md "Cancel").
    pub async fn write_cancel(&self, p: i32, batch_id: &str) -> Result<i64, StateError> {
        let record = Record {
            epoch: String::new(),
            time_ms: now_ms(),
            body: Body::Cancel {
                batch_id: batch_id.to_owned(),
            },
        };
        self.send(p, &record.key(p), Some(&record)).await
    }

    /// A replayed cancel record names `batch_id`, an open batch: its task
    /// takes the cancel when it starts ([`Self::take_pending_cancel`]).
    pub fn remember_cancel(&self, batch_id: &str) {
        self.pending_cancels
            .lock()
            .expect("journal lock")
            .insert(batch_id.to_owned());
    }

    /// Whether a replayed cancel record names `batch_id` (once).
    pub fn take_pending_cancel(&self, batch_id: &str) -> bool {
        self.pending_cancels
            .lock()
            .expect("journal lock")
            .remove(batch_id)
    }

    /// Keeps `key` (a cancel record) with batch `batch_id` of `p`, to be
    /// tombstoned with the batch's own keys. `false` when this owner has
    /// written nothing for the batch: the record names an unknown or
    /// finished batch.
    pub fn keep_key(&self, p: i32, batch_id: &str, key: String) -> bool {
        let mut owned = self.owned.lock().expect("journal lock");
        match owned.get_mut(&p).and_then(|o| o.batches.get_mut(batch_id)) {
            Some(w) => {
                if !w.keys.contains(&key) {
                    // Before `done`, which stays last.
                    let at = w.keys.len().saturating_sub(usize::from(w.done));
                    w.keys.insert(at, key);
                }
                true
            }
            None => false,
        }
    }

    /// Tombstones `key` in state partition `p`, if this instance owns it.
    pub async fn tombstone(&self, p: i32, key: &str) -> Result<(), StateError> {
        if !self.owned.lock().expect("journal lock").contains_key(&p) {
            return Err(StateError::NotOwner(p));
        }
        self.send(p, key, None).await.map(drop)
    }

    /// Fires when `epoch` stops owning `p` (already fired if it does not).
    pub fn revoked(&self, p: i32, epoch: &str) -> CancellationToken {
        match self.owned.lock().expect("journal lock").get(&p) {
            Some(o) if o.epoch == epoch => o.revoked.clone(),
            _ => {
                let t = CancellationToken::new();
                t.cancel();
                t
            }
        }
    }

    /// Whether `epoch` is still this instance's epoch for `p`.
    pub fn owns(&self, p: i32, epoch: &str) -> bool {
        self.owned
            .lock()
            .expect("journal lock")
            .get(&p)
            .is_some_and(|o| o.epoch == epoch)
    }

    /// Writes and confirms a phase of a batch of partition `p`, if `epoch`
    /// still owns `p`.
    pub async fn write_batch(
        &self,
        p: i32,
        epoch: &str,
        batch: BatchRecord,
    ) -> Result<i64, StateError> {
        if !self.owns(p, epoch) {
            return Err(StateError::NotOwner(p));
        }
        let (id, phase) = (batch.id.clone(), batch.phase);
        let max_offset = batch.offsets.max().unwrap_or(-1);
        let provider_batch = batch.provider_batch_id.clone();
        let record = Record {
            epoch: epoch.to_owned(),
            time_ms: now_ms(),
            body: Body::Batch(Box::new(batch)),
        };
        let key = record.key(p);
        let offset = self.send(p, &key, Some(&record)).await?;
        let mut owned = self.owned.lock().expect("journal lock");
        let Some(o) = owned.get_mut(&p).filter(|o| o.epoch == epoch) else {
            return Err(StateError::NotOwner(p));
        };
        let written = o
            .batches
            .entry(id.clone())
            .or_insert_with(|| Written::new(max_offset, false));
        written.max_offset = written.max_offset.max(max_offset);
        written.keys.push(key);
        written.done |= phase == Phase::Done;
        if let Some(pb) = provider_batch {
            written.provider_batches.push(pb);
        }
        if phase == Phase::Done {
            for orphan in written.orphans(&id) {
                let _ = self.orphans_tx.send(orphan);
            }
        }
        Ok(offset)
    }

    /// Confirms that the record at `offset` in state partition `p` is not
    /// void: no other owner claimed `p` between this owner's claim and it
    /// (DESIGN.md "Ownership and claims"). The in-process ownership map
    /// knows only of revocations this instance was told about; an instance
    /// whose session expired without its knowing (a zombie) learns here
    /// that it lost the partition, before a create it must not send.
    /// `Ok(false)`: lost.
    pub async fn confirm(&self, p: i32, epoch: &str, offset: i64) -> Result<bool, StateError> {
        {
            let owned = self.owned.lock().expect("journal lock");
            match owned.get(&p) {
                Some(o) if o.epoch == epoch && offset <= o.confirmed_upto => return Ok(true),
                Some(o) if o.epoch == epoch => {}
                _ => return Ok(false),
            }
        }
        let other = match self.tail.confirm(p, epoch, offset, CONFIRM_WAIT).await {
            Some(mine) => !mine,
            // Revoked or voided meanwhile.
            None if !self.owns(p, epoch) => return Ok(false),
            None => {
                return Err(StateError::Read {
                    partition: p,
                    message: format!(
                        "confirming a record: offset {offset} not read back within {CONFIRM_WAIT:?}"
                    ),
                })
            }
        };
        if other {
            self.voided(p, epoch);
        } else if let Some(o) = self
            .owned
            .lock()
            .expect("journal lock")
            .get_mut(&p)
            .filter(|o| o.epoch == epoch)
        {
            o.confirmed_upto = o.confirmed_upto.max(offset);
        }
        Ok(!other)
    }

    /// `epoch`'s records in `p` are void: another instance claimed `p` after
    /// it. Every write for `p` under `epoch` is refused from now on and its
    /// batch tasks stop. Ingest learns of it through [`Self::take_voided`]:
    /// if the group still assigns `p` here (the other claim came from an
    /// assignment that overlapped this one and was revoked, or was sent
    /// late), nobody else works on `p`, and it must be claimed again.
    fn voided(&self, p: i32, epoch: &str) {
        let mut owned = self.owned.lock().expect("journal lock");
        if owned.get(&p).is_some_and(|o| o.epoch == epoch) {
            self.tail.unfollow(p);
            self.unjudged.lock().expect("journal lock").remove(&p);
            if let Some(o) = owned.remove(&p) {
                o.revoked.cancel();
            }
            self.voided
                .lock()
                .expect("voided lock")
                .push((p, epoch.to_owned()));
        }
    }

    /// Partitions found void since the last call, with the epoch that was.
    pub fn take_voided(&self) -> Vec<(i32, String)> {
        std::mem::take(&mut *self.voided.lock().expect("voided lock"))
    }

    /// After a confirmed commit of `committed` on `p`: writes it as a mark,
    /// then tombstones every key of each finished batch wholly below it
    /// (`done` last). Returns how many batches were cleaned up.
    pub async fn committed(&self, p: i32, committed: i64) -> Result<usize, StateError> {
        let (epoch, finished, stale) = {
            let owned = self.owned.lock().expect("journal lock");
            let Some(o) = owned.get(&p) else {
                return Err(StateError::NotOwner(p));
            };
            let done = |w: &Written| w.done && w.max_offset < committed;
            let finished: Vec<String> = o
                .batches
                .iter()
                .filter(|(_, w)| done(w))
                .map(|(id, _)| id.clone())
                .collect();
            // Earlier claims and marks go once no record of theirs lies
            // before this owner's claim any more (DESIGN.md "Durability").
            let stale = if o.batches.values().all(|w| !w.adopted || done(w)) {
                o.stale.clone()
            } else {
                Vec::new()
            };
            (o.epoch.clone(), finished, stale)
        };
        if finished.is_empty() && stale.is_empty() {
            return Ok(0);
        }
        let mark = Record {
            epoch: epoch.clone(),
            time_ms: now_ms(),
            body: Body::Mark { offset: committed },
        };
        self.send(p, &mark.key(p), Some(&mark)).await?;
        for id in &finished {
            let keys = {
                let owned = self.owned.lock().expect("journal lock");
                match owned.get(&p).filter(|o| o.epoch == epoch) {
                    Some(o) => o.batches.get(id).map(|w| w.keys.clone()),
                    None => return Err(StateError::NotOwner(p)),
                }
            };
            // Keys were pushed in phase order: `done` goes last.
            for key in keys.unwrap_or_default() {
                self.send(p, &key, None).await?;
            }
            if let Some(o) = self.owned.lock().expect("journal lock").get_mut(&p) {
                o.batches.remove(id);
            }
        }
        for key in &stale {
            self.send(p, key, None).await?;
        }
        if !stale.is_empty() {
            if let Some(o) = self.owned.lock().expect("journal lock").get_mut(&p) {
                o.stale.retain(|k| !stale.contains(k));
            }
        }
        Ok(finished.len())
    }

    /// Earlier owners' live claims and marks of `p`, found at the claim.
    pub fn adopt_stale(&self, p: i32, keys: Vec<String>) {
        if let Some(o) = self.owned.lock().expect("journal lock").get_mut(&p) {
            o.stale = keys;
        }
    }

    /// Records keys of a replayed batch this owner must tombstone too once
    /// it is finished (written by an earlier owner).
    pub fn adopt_keys(&self, p: i32, batch: &str, keys: Vec<String>, max_offset: i64, done: bool) {
        if let Some(o) = self.owned.lock().expect("journal lock").get_mut(&p) {
            let w = o
                .batches
                .entry(batch.to_owned())
                .or_insert_with(|| Written::new(max_offset, done));
            w.adopted = true;
            let mut all = keys;
            all.append(&mut w.keys);
            w.keys = all;
            w.done |= done;
        }
    }

    /// Sends one record to partition `p` and waits for the broker's
    /// acknowledgement; returns its offset.
    async fn send(&self, p: i32, key: &str, record: Option<&Record>) -> Result<i64, StateError> {
        let payload = record.map(|r| serde_json::to_vec(r).expect("records serialise"));
        let mut out: FutureRecord<'_, str, Vec<u8>> =
            FutureRecord::to(&self.topic).partition(p).key(key);
        if let Some(payload) = &payload {
            out = out.payload(payload);
        }
        self.producer
            .send(out, Duration::from_secs(30))
            .await
            .map(|delivery| delivery.offset)
            .map_err(|(e, _)| StateError::Write(e))
    }

    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer.flush(timeout);
    }
}

/// A consumer configuration for reading the state topic outside the group.
struct ReaderConfig {
    client: ClientConfig,
    topic: String,
}

impl ReaderConfig {
    fn new(cfg: &Config) -> ReaderConfig {
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &cfg.kafka.brokers)
            .set("group.id", format!("{}.state-reader", cfg.kafka.group_id))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest");
        for (k, v) in &cfg.kafka.consumer {
            client.set(k, v);
        }
        client.set("statistics.interval.ms", "0");
        ReaderConfig {
            client,
            topic: cfg.topics.state.clone(),
        }
    }

    /// A reader outside the group on state partition `p`, from `from`.
    fn assign(&self, p: i32, from: Offset) -> Result<InOrder, StateError> {
        let read_err = |e: KafkaError| StateError::Read {
            partition: p,
            message: e.to_string(),
        };
        let consumer: BaseConsumer = self.client.create().map_err(StateError::Client)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, p, from)
            .map_err(read_err)?;
        consumer.assign(&tpl).map_err(read_err)?;
        let next = match from {
            Offset::Offset(o) => o,
            _ => 0,
        };
        Ok(InOrder { consumer, next })
    }
}

/// A state partition's records, each offset once and in order: a broker may
/// hand a compacted partition's records out again after later ones (Tansu
/// does), and an old claim read twice would void the records after it.
struct InOrder {
    consumer: BaseConsumer,
    /// The offset after the last record handed out.
    next: i64,
}

impl InOrder {
    /// The next record not yet handed out; `None` when none came within
    /// `wait`.
    fn poll(&mut self, wait: Duration) -> Option<KafkaResult<BorrowedMessage<'_>>> {
        match self.consumer.poll(wait)? {
            Ok(m) if m.offset() < self.next => None,
            Ok(m) => {
                self.next = m.offset() + 1;
                Some(Ok(m))
            }
            Err(e) => Some(Err(e)),
        }
    }
}

/// A state partition read back up to the reader's own claim.
pub struct ReadBack {
    pub replay: Replay,
    /// Every live key seen, by batch id, in log order.
    pub keys: HashMap<String, Vec<String>>,
    /// The live claims and marks of earlier epochs.
    pub stale: Vec<String>,
}

/// Reads state partition `p` from the start up to the claim of `epoch`
/// (which must already be written), with a consumer outside the group, and
/// folds it. Blocking.
pub fn read_back(
    journal: &Journal,
    p: i32,
    epoch: &str,
    timeout: Duration,
) -> Result<ReadBack, StateError> {
    let read_err = |message: String| StateError::Read {
        partition: p,
        message,
    };
    let mut reader = journal.reader.assign(p, Offset::Beginning)?;
    let claim_key = format!("{p}/claim/{epoch}");
    let mut records: Vec<Option<Record>> = Vec::new();
    let mut keys: HashMap<String, Vec<String>> = HashMap::new();
    let mut stale: Vec<String> = Vec::new();
    let (claim_prefix, mark_prefix) = (format!("{p}/claim/"), format!("{p}/mark/"));
    let deadline = Instant::now() + timeout;
    loop {
        if Instant::now() >= deadline {
            return Err(read_err(format!(
                "own claim not seen within {timeout:?} ({} records read)",
                records.len()
            )));
        }
        let Some(m) = reader.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m.map_err(|e| read_err(e.to_string()))?;
        let key = m
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default();
        if key == claim_key {
            break;
        }
        let record = match m.payload() {
            None => None,
            Some(bytes) => match serde_json::from_slice::<Record>(bytes) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(partition = p, offset = m.offset(), key, error = %e, "unreadable state record skipped");
                    continue;
                }
            },
        };
        let list = match key.split('/').next().filter(|b| b.starts_with("bl-")) {
            Some(batch) => Some(keys.entry(batch.to_owned()).or_default()),
            None if key.starts_with(&claim_prefix) || key.starts_with(&mark_prefix) => {
                Some(&mut stale)
            }
            None => None,
        };
        if let Some(list) = list {
            if record.is_some() {
                if !list.contains(&key) {
                    list.push(key.clone());
                }
            } else {
                list.retain(|k| *k != key);
            }
        }
        records.push(record);
    }
    let replay = Replay::fold(records.iter().map(Option::as_ref));
    Ok(ReadBack {
        replay,
        keys,
        stale,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A journal on a broker that never answers: every send fails after
    /// `message.timeout.ms`.
    fn unreachable_journal(timeout_ms: u64) -> Journal {
        let mut cfg = Config::load_from(None, Vec::<(String, String)>::new()).unwrap();
        cfg.kafka.brokers = "127.0.0.1:1".into();
        cfg.kafka
            .producer
            .insert("message.timeout.ms".into(), timeout_ms.to_string());
        Journal::new(&cfg).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revocation_waits_for_a_claim_in_flight_and_refuses_later_ones() {
        let journal = Arc::new(unreachable_journal(1500));
        let seen = journal.revocations(3);
        let claiming = {
            let journal = journal.clone();
            tokio::spawn(async move { journal.claim(3, seen).await })
        };
        // Once the claim is being written, revoke.
        while journal
            .gate
            .lock()
            .unwrap()
            .in_flight
            .get(&3)
            .copied()
            .unwrap_or(0)
            == 0
        {
            tokio::task::yield_now().await;
        }
        let released = {
            let journal = journal.clone();
            tokio::task::spawn_blocking(move || {
                journal.release(3);
                // What was in flight when the revocation returned.
                journal.gate.lock().unwrap().in_flight.get(&3).copied()
            })
        };
        // The send fails at its 1.5 s timeout; the revocation returns only
        // after it, and the claim does not make this instance the owner.
        assert_eq!(released.await.unwrap(), Some(0));
        assert!(claiming.await.unwrap().is_err());
        assert!(!journal.owns(3, ""));
        // A claim for the revoked assignment is refused before it is sent.
        assert!(matches!(
            journal.claim(3, seen).await,
            Err(StateError::NotOwner(3))
        ));
        assert_eq!(journal.gate.lock().unwrap().in_flight.get(&3), Some(&0));
        assert_eq!(journal.revocations(3), seen + 1);
        assert_eq!(journal.revocations(4), 0);
    }
}
