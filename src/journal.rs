//! The batch journal on the compacted state topic (DESIGN.md "Durability"):
//! record types, keys, the compact form of offset sets, and the replay fold
//! that turns a state partition's log into what its new owner must do.
//!
//! Everything here is pure: no Kafka, no clock. Records are written and
//! read by the owner of input partition `p` in state partition `p`. A record
//! is void when the latest claim before it in the log is another owner's;
//! the fold skips void records and tombstones.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine as _;
use roaring::RoaringTreemap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A set of input offsets, stored as a roaring bitmap: a 100,000-request
/// batch costs a few kilobytes however its offsets interleave.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OffsetSet(RoaringTreemap);

impl OffsetSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, offset: i64) {
        self.0.insert(offset as u64);
    }

    pub fn contains(&self, offset: i64) -> bool {
        self.0.contains(offset as u64)
    }

    pub fn len(&self) -> u64 {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn max(&self) -> Option<i64> {
        self.0.max().map(|o| o as i64)
    }

    pub fn min(&self) -> Option<i64> {
        self.0.min().map(|o| o as i64)
    }

    pub fn iter(&self) -> impl Iterator<Item = i64> + '_ {
        self.0.iter().map(|o| o as i64)
    }

    pub fn union_with(&mut self, other: &OffsetSet) {
        self.0 |= &other.0;
    }

    pub fn remove_all(&mut self, other: &OffsetSet) {
        self.0 -= &other.0;
    }
}

impl FromIterator<i64> for OffsetSet {
    fn from_iter<I: IntoIterator<Item = i64>>(iter: I) -> Self {
        OffsetSet(iter.into_iter().map(|o| o as u64).collect())
    }
}

impl Serialize for OffsetSet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut bytes = Vec::with_capacity(self.0.serialized_size());
        self.0
            .serialize_into(&mut bytes)
            .map_err(serde::ser::Error::custom)?;
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }
}

impl<'de> Deserialize<'de> for OffsetSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)?;
        RoaringTreemap::deserialize_from(&bytes[..])
            .map(OffsetSet)
            .map_err(serde::de::Error::custom)
    }
}

/// A batch's phases, in the order they happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Planned; nothing sent (file providers) or the create may follow
    /// (Anthropic).
    Intent,
    /// The input file is uploaded; the create may follow.
    Uploaded,
    /// The provider batch exists.
    Submitted,
    /// Every offset has a terminal result or is released to a successor.
    Done,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Intent => "intent",
            Phase::Uploaded => "uploaded",
            Phase::Submitted => "submitted",
            Phase::Done => "done",
        }
    }
}

/// Where a batch's requests go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRecord {
    pub provider: String,
    pub model: String,
    pub endpoint: String,
}

/// Offsets a `done` hands to a successor, with the attempt it will be.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Released {
    pub offsets: OffsetSet,
    pub attempt: u32,
    pub requeues: u32,
}

/// A full snapshot of one batch at one phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchRecord {
    /// `bl-<partition>-<uuidv7>`.
    pub id: String,
    pub phase: Phase,
    pub route: RouteRecord,
    pub attempt: u32,
    pub requeues: u32,
    pub offsets: OffsetSet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_batch_id: Option<String>,
    /// With `done`: offsets that got a terminal result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminal: Option<OffsetSet>,
    /// With `done`: offsets handed to successors.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub released: Vec<Released>,
}

/// What a journal record says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Body {
    /// An owner takes the partition.
    Claim,
    /// A phase of a batch.
    Batch(Box<BatchRecord>),
    /// The owner's confirmed commit, written before tombstones.
    Mark { offset: i64 },
    /// An operator asked to cancel a batch (never void).
    Cancel { batch_id: String },
}

/// One journal record: who wrote it, when, and what it says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The writer's epoch: a uuid per assignment.
    pub epoch: String,
    /// Wall-clock time of writing, Unix milliseconds.
    pub time_ms: i64,
    #[serde(flatten)]
    pub body: Body,
}

impl Record {
    /// The compaction key: every writer's records keep their own keys, so a
    /// late, stale record never erases a later phase.
    pub fn key(&self, partition: i32) -> String {
        match &self.body {
            Body::Claim => format!("{partition}/claim/{}", self.epoch),
            Body::Mark { .. } => format!("{partition}/mark/{}", self.epoch),
            Body::Batch(b) => format!("{}/{}/{}", b.id, b.phase.as_str(), self.epoch),
            Body::Cancel { batch_id } => format!("{batch_id}/cancel/{}", uuid::Uuid::new_v4()),
        }
    }
}

/// The partition a local batch id names (`bl-<p>-…`).
pub fn partition_of(batch_id: &str) -> Option<i32> {
    batch_id
        .strip_prefix("bl-")?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// What replaying a state partition up to the owner's claim yields.
#[derive(Debug, Default, PartialEq)]
pub struct Replay {
    /// Each batch's furthest non-void phase, by local batch id.
    pub batches: BTreeMap<String, BatchRecord>,
    /// The largest mark.
    pub mark: Option<i64>,
    /// Cancels asked for batches that were seen.
    pub cancels: Vec<String>,
    /// Records skipped as void.
    pub void: u64,
    /// Provider batches named by non-void records, by local batch id.
    pub provider_batches: BTreeMap<String, BTreeSet<String>>,
    /// Provider batches named by void `submitted` records (an owner that
    /// had lost the partition created them), by local batch id.
    pub void_submitted: BTreeMap<String, Vec<ProviderBatchRef>>,
}

/// A provider batch a journal record names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProviderBatchRef {
    pub provider: String,
    pub id: String,
}

/// A provider batch that belongs to a local batch already at `done`: its
/// results will never be collected, so it is cancelled (DESIGN.md
/// "Orphans").
#[derive(Debug, Clone, PartialEq)]
pub struct Orphan {
    pub local_batch: String,
    pub provider_batch: ProviderBatchRef,
}

impl Replay {
    /// Folds a state partition's records, in log order. `None` values are
    /// tombstones.
    pub fn fold<'a>(records: impl IntoIterator<Item = Option<&'a Record>>) -> Replay {
        let mut replay = Replay::default();
        let mut owner: Option<&str> = None;
        for record in records.into_iter().flatten() {
            match &record.body {
                Body::Claim => owner = Some(&record.epoch),
                // Cancels are never void: any instance may write one.
                Body::Cancel { batch_id } => replay.cancels.push(batch_id.clone()),
                _ if owner != Some(record.epoch.as_str()) => {
                    replay.void += 1;
                    if let Body::Batch(b) = &record.body {
                        if let Some(pb) = &b.provider_batch_id {
                            replay.void_submitted.entry(b.id.clone()).or_default().push(
                                ProviderBatchRef {
                                    provider: b.route.provider.clone(),
                                    id: pb.clone(),
                                },
                            );
                        }
                    }
                }
                Body::Mark { offset } => {
                    replay.mark = Some(replay.mark.map_or(*offset, |m| m.max(*offset)))
                }
                Body::Batch(b) => {
                    if let Some(pb) = &b.provider_batch_id {
                        replay
                            .provider_batches
                            .entry(b.id.clone())
                            .or_default()
                            .insert(pb.clone());
                    }
                    let newer = replay
                        .batches
                        .get(&b.id)
                        .is_none_or(|seen| b.phase >= seen.phase);
                    if newer {
                        replay.batches.insert(b.id.clone(), (**b).clone());
                    }
                }
            }
        }
        replay
    }

    /// Provider batches named only by void records: of a local batch at
    /// `done` or with no valid record (orphans), and of a batch not at
    /// `done` yet, orphans too if its owner ends it without adopting them.
    pub fn orphans(&self) -> (Vec<Orphan>, Vec<Orphan>) {
        let (mut now, mut later) = (Vec::new(), Vec::new());
        for (batch, refs) in &self.void_submitted {
            let kept = self.provider_batches.get(batch);
            for r in refs {
                if kept.is_some_and(|k| k.contains(&r.id)) {
                    continue;
                }
                let orphan = Orphan {
                    local_batch: batch.clone(),
                    provider_batch: r.clone(),
                };
                match self.batches.get(batch) {
                    // Open: its owner may still adopt it by lookup.
                    Some(b) if b.phase != Phase::Done => later.push(orphan),
                    // At `done`, or known only from void records (its
                    // requests are packed again).
                    _ => now.push(orphan),
                }
            }
        }
        (now, later)
    }

    /// The resume point *c*: the larger of the group's committed offset and
    /// the largest mark. Nothing below it is packed again.
    pub fn resume_point(&self, committed: Option<i64>) -> Option<i64> {
        match (committed, self.mark) {
            (Some(c), Some(m)) => Some(c.max(m)),
            (c, m) => c.or(m),
        }
    }

    /// Batches still to be acted on: not at `done`, and not wholly below
    /// the resume point (those are finished whatever their phase).
    pub fn open_batches(&self, resume: Option<i64>) -> impl Iterator<Item = &BatchRecord> {
        self.batches.values().filter(move |b| {
            b.phase != Phase::Done
                && !matches!((b.offsets.max(), resume), (Some(max), Some(c)) if max < c)
        })
    }

    /// Offsets a batch not at `done` covers, or a `done` answered: ingest
    /// skips them.
    pub fn taken(&self) -> OffsetSet {
        let mut taken = OffsetSet::new();
        for b in self.batches.values() {
            match b.phase {
                Phase::Done => {
                    if let Some(t) = &b.terminal {
                        taken.union_with(t);
                    }
                }
                _ => taken.union_with(&b.offsets),
            }
        }
        taken
    }

    /// Offsets released by a `done` and covered by no other batch: due for a
    /// retry, with the attempt each will be, at or above the resume point.
    pub fn released(&self, resume: Option<i64>) -> Vec<(i64, u32, u32)> {
        let taken = self.taken();
        let mut out: BTreeMap<i64, (u32, u32)> = BTreeMap::new();
        // Batch ids sort by time (UUIDv7): the last release of an offset wins.
        for b in self.batches.values().filter(|b| b.phase == Phase::Done) {
            for r in &b.released {
                for o in r.offsets.iter() {
                    if !taken.contains(o) && resume.is_none_or(|c| o >= c) {
                        out.insert(o, (r.attempt, r.requeues));
                    }
                }
            }
        }
        out.into_iter().map(|(o, (a, q))| (o, a, q)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route() -> RouteRecord {
        RouteRecord {
            provider: "openai".into(),
            model: "gpt-4o-mini".into(),
            endpoint: "/v1/chat/completions".into(),
        }
    }

    fn batch(id: &str, phase: Phase, offsets: &[i64]) -> BatchRecord {
        BatchRecord {
            id: id.into(),
            phase,
            route: route(),
            attempt: 1,
            requeues: 0,
            offsets: offsets.iter().copied().collect(),
            file_id: None,
            provider_batch_id: None,
            terminal: None,
            released: Vec::new(),
        }
    }

    fn rec(epoch: &str, body: Body) -> Record {
        Record {
            epoch: epoch.into(),
            time_ms: 0,
            body,
        }
    }

    #[test]
    fn records_round_trip_and_stay_small() {
        // 100,000 offsets interleaved with another route's: the worst case for ranges.
        let offsets: Vec<i64> = (0..200_000).step_by(2).collect();
        let mut b = batch("bl-3-01a2", Phase::Submitted, &offsets);
        b.provider_batch_id = Some("batch_1".into());
        let r = rec("e1", Body::Batch(Box::new(b)));
        let bytes = serde_json::to_vec(&r).unwrap();
        assert!(bytes.len() < 1_000_000, "{} bytes", bytes.len());
        let back: Record = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back, r);
        assert_eq!(r.key(3), "bl-3-01a2/submitted/e1");
        assert_eq!(rec("e1", Body::Claim).key(3), "3/claim/e1");
        assert_eq!(partition_of("bl-12-019a"), Some(12));
    }

    #[test]
    fn fold_takes_the_furthest_phase_and_skips_void_records() {
        let log = [
            rec("a", Body::Claim),
            rec(
                "a",
                Body::Batch(Box::new(batch("bl-0-1", Phase::Intent, &[0, 1]))),
            ),
            rec(
                "a",
                Body::Batch(Box::new(batch("bl-0-1", Phase::Uploaded, &[0, 1]))),
            ),
            rec("b", Body::Claim),
            // Written by `a` after it lost the partition: void.
            rec(
                "a",
                Body::Batch(Box::new(batch("bl-0-1", Phase::Submitted, &[0, 1]))),
            ),
            rec(
                "b",
                Body::Batch(Box::new(batch("bl-0-2", Phase::Intent, &[2]))),
            ),
            rec(
                "a",
                Body::Cancel {
                    batch_id: "bl-0-2".into(),
                },
            ),
        ];
        let replay = Replay::fold(log.iter().map(Some).chain([None]));
        assert_eq!(replay.void, 1);
        assert_eq!(replay.batches["bl-0-1"].phase, Phase::Uploaded);
        assert_eq!(replay.batches["bl-0-2"].phase, Phase::Intent);
        assert_eq!(replay.cancels, vec!["bl-0-2".to_owned()]);
        let open: Vec<_> = replay.open_batches(None).map(|b| b.id.as_str()).collect();
        assert_eq!(open, vec!["bl-0-1", "bl-0-2"]);
    }

    #[test]
    fn creates_only_void_records_name_are_orphans_once_their_batch_is_done() {
        let with_pb = |id: &str, phase: Phase, pb: &str| {
            let mut b = batch(id, phase, &[0]);
            b.provider_batch_id = Some(pb.into());
            Body::Batch(Box::new(b))
        };
        let log = [
            rec("a", Body::Claim),
            rec("a", with_pb("bl-0-done", Phase::Submitted, "batch_kept")),
            rec("b", Body::Claim),
            // `a` had lost the partition: these are void.
            rec("a", with_pb("bl-0-done", Phase::Submitted, "batch_void")),
            rec("a", with_pb("bl-0-done", Phase::Submitted, "batch_kept")),
            rec("a", with_pb("bl-0-open", Phase::Submitted, "batch_maybe")),
            rec("a", with_pb("bl-0-zombie", Phase::Submitted, "batch_lost")),
            rec(
                "b",
                Body::Batch(Box::new(batch("bl-0-done", Phase::Done, &[0]))),
            ),
            rec(
                "b",
                Body::Batch(Box::new(batch("bl-0-open", Phase::Uploaded, &[1]))),
            ),
        ];
        let replay = Replay::fold(log.iter().map(Some));
        let (now, later) = replay.orphans();
        let ids = |os: &[Orphan]| -> Vec<(String, String)> {
            os.iter()
                .map(|o| (o.local_batch.clone(), o.provider_batch.id.clone()))
                .collect()
        };
        // Done without it, or known only from void records: cancel now.
        assert_eq!(
            ids(&now),
            vec![
                ("bl-0-done".to_owned(), "batch_void".to_owned()),
                ("bl-0-zombie".to_owned(), "batch_lost".to_owned()),
            ]
        );
        // Still open: its owner may adopt it by lookup.
        assert_eq!(
            ids(&later),
            vec![("bl-0-open".to_owned(), "batch_maybe".to_owned())]
        );
    }

    #[test]
    fn released_offsets_are_retried_unless_taken_or_below_the_mark() {
        let mut done = batch("bl-0-1", Phase::Done, &[0, 1, 2, 3]);
        done.terminal = Some([0, 1].into_iter().collect());
        done.released = vec![Released {
            offsets: [2, 3].into_iter().collect(),
            attempt: 2,
            requeues: 0,
        }];
        let successor = batch("bl-0-2", Phase::Intent, &[3]);
        let log = [
            rec("a", Body::Claim),
            rec("a", Body::Batch(Box::new(done))),
            rec("a", Body::Batch(Box::new(successor))),
            rec("a", Body::Mark { offset: 0 }),
        ];
        let replay = Replay::fold(log.iter().map(Some));
        let taken: Vec<i64> = replay.taken().iter().collect();
        assert_eq!(taken, vec![0, 1, 3]);
        assert_eq!(replay.released(replay.resume_point(None)), vec![(2, 2, 0)]);
        // A commit past offset 2 finishes it.
        assert!(replay.released(replay.resume_point(Some(3))).is_empty());
        // A batch wholly below the resume point is finished whatever its phase.
        assert_eq!(replay.open_batches(Some(4)).count(), 0);
        assert_eq!(replay.open_batches(Some(3)).count(), 1);
    }
}
