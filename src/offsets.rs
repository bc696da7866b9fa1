//! Input offsets and their commit watermark: an offset is committable only
//! when it and every offset before it in its partition has a delivered
//! terminal result.
//!
//! One bit of state per offset between the watermark and the newest offset
//! read, held in a sliding window. Offsets the consumer never saw (gaps left
//! by compaction or transaction markers) count as done.

use std::collections::{HashMap, VecDeque};

#[derive(Debug, Default)]
struct PartitionOffsets {
    /// The first offset not yet done: what a commit would store.
    watermark: i64,
    /// `done[i]` is whether `watermark + i` has its result delivered.
    done: VecDeque<bool>,
    /// The watermark last committed.
    committed: Option<i64>,
    /// The first offset tracked: anything below it was never seen.
    start: i64,
}

impl PartitionOffsets {
    fn next_expected(&self) -> i64 {
        self.watermark + self.done.len() as i64
    }
}

/// Offsets read but not finished, per input partition.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<i32, PartitionOffsets>,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `offset` was read and now awaits a result. Returns false
    /// for an offset already tracked (a re-delivery), which must be ignored.
    pub fn track(&mut self, partition: i32, offset: i64) -> bool {
        let p = self
            .partitions
            .entry(partition)
            .or_insert_with(|| PartitionOffsets {
                watermark: offset,
                start: offset,
                ..Default::default()
            });
        let next = p.next_expected();
        if offset < next {
            if offset < p.start {
                // Not a re-delivery: this offset was never read, and the
                // watermark already passed it. A bug, loudly.
                tracing::error!(
                    partition,
                    offset,
                    first_tracked = p.start,
                    "an offset below the first one tracked was refused"
                );
            }
            return false;
        }
        // Offsets skipped over do not exist for this consumer: transaction
        // markers (one at a time) or a compacted input. More than one is
        // unusual for an input topic, and a broker that skips records
        // would make it a loss: say so.
        if offset - next > 1 {
            tracing::warn!(
                partition,
                from = next,
                to = offset - 1,
                "input offsets skipped by the consumer are taken as done"
            );
        }
        for _ in next..offset {
            p.done.push_back(true);
        }
        p.done.push_back(false);
        Self::advance(p);
        true
    }

    /// Marks `offset` as finished (its result delivered). Unknown partitions
    /// and offsets (revoked, or below the watermark) are ignored.
    pub fn complete(&mut self, partition: i32, offset: i64) {
        let Some(p) = self.partitions.get_mut(&partition) else {
            return;
        };
        if offset < p.watermark {
            return;
        }
        if let Some(slot) = p.done.get_mut((offset - p.watermark) as usize) {
            *slot = true;
        }
        Self::advance(p);
    }

    fn advance(p: &mut PartitionOffsets) {
        while p.done.front() == Some(&true) {
            p.done.pop_front();
            p.watermark += 1;
        }
    }

    /// Offsets whose watermark moved since the last [`Self::mark_committed`].
    pub fn commit_candidates(&self) -> Vec<(i32, i64)> {
        let mut out: Vec<(i32, i64)> = self
            .partitions
            .iter()
            .filter(|(_, p)| p.committed.is_none_or(|c| c < p.watermark))
            .map(|(&partition, p)| (partition, p.watermark))
            .collect();
        out.sort_unstable();
        out
    }

    pub fn mark_committed(&mut self, partition: i32, offset: i64) {
        if let Some(p) = self.partitions.get_mut(&partition) {
            p.committed = Some(p.committed.map_or(offset, |c| c.max(offset)));
        }
    }

    /// The commit watermark of `partition`, if it has been read from.
    pub fn watermark(&self, partition: i32) -> Option<i64> {
        self.partitions.get(&partition).map(|p| p.watermark)
    }

    /// Offsets read and not yet finished, over every partition.
    pub fn pending(&self) -> usize {
        self.partitions
            .values()
            .map(|p| p.done.iter().filter(|d| !**d).count())
            .sum()
    }

    /// Forgets a partition (on revocation): its offsets are someone else's.
    pub fn forget(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermark_waits_for_the_lowest_unfinished_offset() {
        let mut t = OffsetTracker::new();
        for o in 10..15 {
            assert!(t.track(0, o));
        }
        assert_eq!(t.watermark(0), Some(10));
        t.complete(0, 12);
        t.complete(0, 11);
        assert_eq!(t.watermark(0), Some(10));
        t.complete(0, 10);
        assert_eq!(t.watermark(0), Some(13));
        t.complete(0, 14);
        t.complete(0, 13);
        assert_eq!(t.watermark(0), Some(15));
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn gaps_count_as_done_and_redeliveries_are_refused() {
        let mut t = OffsetTracker::new();
        assert!(t.track(1, 0));
        assert!(t.track(1, 5));
        assert!(!t.track(1, 3));
        assert!(!t.track(1, 5));
        t.complete(1, 0);
        assert_eq!(t.watermark(1), Some(5));
        t.complete(1, 5);
        assert_eq!(t.watermark(1), Some(6));
    }

    #[test]
    fn commit_candidates_only_report_progress() {
        let mut t = OffsetTracker::new();
        t.track(0, 0);
        t.track(2, 7);
        assert_eq!(t.commit_candidates(), vec![(0, 0), (2, 7)]);
        t.mark_committed(0, 0);
        t.mark_committed(2, 7);
        assert!(t.commit_candidates().is_empty());
        t.complete(2, 7);
        assert_eq!(t.commit_candidates(), vec![(2, 8)]);
        t.forget(2);
        t.complete(2, 8);
        assert!(t.commit_candidates().is_empty());
    }
}
