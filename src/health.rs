//! Readiness: whether this instance is doing its work, and when it is not,
//! why. Whoever observes a fact records it here: ingest (broker reachability,
//! assigned partitions and their journal replays), the metrics calls that
//! mark a provider route failing, and the start-up topic checks. `/readyz`
//! and the `batchline_ready` gauge read it.
//!
//! It only records and reads facts: it never does I/O and never blocks on
//! anything but its own short lock.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Where an assigned input partition is on its way to being consumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionPhase {
    /// Paused while its journal is claimed and replayed; `retrying` holds
    /// the last failed attempt's error.
    Replaying {
        retrying: Option<String>,
    },
    Ready,
}

/// Everything readiness depends on, as last recorded.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// Why the brokers are unreachable, while they are.
    pub brokers_unreachable: Option<String>,
    pub partitions: BTreeMap<i32, PartitionPhase>,
    /// Providers refusing credentials or quota.
    pub failing_providers: BTreeSet<String>,
    /// Misconfigured topics found at start-up, each a sentence.
    pub topic_problems: Vec<String>,
    /// Why submission waits for the daily budget, while it does.
    pub budget_held: Option<String>,
    pub shutting_down: bool,
}

impl Facts {
    /// Why this instance is not ready; empty when it is.
    pub fn reasons(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if self.shutting_down {
            reasons.push("shutting down".to_owned());
        }
        if let Some(why) = &self.brokers_unreachable {
            reasons.push(format!("kafka brokers unreachable: {why}"));
        }
        if self.partitions.is_empty() {
            reasons.push("no partitions assigned".to_owned());
        }
        for (p, phase) in &self.partitions {
            match phase {
                PartitionPhase::Ready => {}
                PartitionPhase::Replaying { retrying: None } => {
                    reasons.push(format!("partition {p}: replaying the journal"))
                }
                PartitionPhase::Replaying {
                    retrying: Some(error),
                } => reasons.push(format!(
                    "partition {p}: replaying the journal (retrying after: {error})"
                )),
            }
        }
        for provider in &self.failing_providers {
            reasons.push(format!("provider {provider}: credentials or quota refused"));
        }
        reasons.extend(self.topic_problems.iter().cloned());
        if let Some(why) = &self.budget_held {
            reasons.push(format!("budget: {why}"));
        }
        reasons
    }
}

/// The shared, recorded readiness facts. Clones share one state.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    facts: Arc<Mutex<Facts>>,
    /// Mirrors `facts.brokers_unreachable`, so that ingest can note every
    /// message it reads without taking the lock.
    brokers_down: Arc<AtomicBool>,
}

impl Readiness {
    pub fn new() -> Readiness {
        Readiness::default()
    }

    fn update(&self, f: impl FnOnce(&mut Facts)) {
        f(&mut self.facts.lock().expect("readiness lock"));
    }

    /// A copy of the facts as they are now.
    pub fn facts(&self) -> Facts {
        self.facts.lock().expect("readiness lock").clone()
    }

    /// Why this instance is not ready; empty when it is.
    pub fn reasons(&self) -> Vec<String> {
        self.facts.lock().expect("readiness lock").reasons()
    }

    pub fn is_ready(&self) -> bool {
        self.reasons().is_empty()
    }

    /// Returns whether the brokers were reachable until now.
    pub fn brokers_unreachable(&self, why: &str) -> bool {
        let mut facts = self.facts.lock().expect("readiness lock");
        self.brokers_down.store(true, Ordering::Relaxed);
        facts.brokers_unreachable.replace(why.to_owned()).is_none()
    }

    /// Returns whether the brokers were marked unreachable until now.
    pub fn brokers_reachable(&self) -> bool {
        if !self.brokers_down.load(Ordering::Relaxed) {
            return false;
        }
        let mut facts = self.facts.lock().expect("readiness lock");
        self.brokers_down.store(false, Ordering::Relaxed);
        facts.brokers_unreachable.take().is_some()
    }

    pub fn partition_replaying(&self, p: i32) {
        self.update(|f| {
            f.partitions
                .insert(p, PartitionPhase::Replaying { retrying: None });
        });
    }

    /// A replay attempt of `p` failed and will be retried. Ignored unless
    /// `p` is still replaying.
    pub fn replay_retrying(&self, p: i32, error: &str) {
        self.update(|f| {
            if let Some(PartitionPhase::Replaying { retrying }) = f.partitions.get_mut(&p) {
                *retrying = Some(error.to_owned());
            }
        });
    }

    pub fn partition_ready(&self, p: i32) {
        self.update(|f| {
            f.partitions.insert(p, PartitionPhase::Ready);
        });
    }

    pub fn partition_revoked(&self, p: i32) {
        self.update(|f| {
            f.partitions.remove(&p);
        });
    }

    pub fn provider_failing(&self, provider: &str) {
        self.update(|f| {
            f.failing_providers.insert(provider.to_owned());
        });
    }

    pub fn provider_ok(&self, provider: &str) {
        self.update(|f| {
            f.failing_providers.remove(provider);
        });
    }

    pub fn topic_problem(&self, problem: String) {
        self.update(|f| f.topic_problems.push(problem));
    }

    /// Submission waits for the budget (`Some(why)`), or no longer does.
    pub fn budget_held(&self, why: Option<String>) {
        self.update(|f| f.budget_held = why);
    }

    pub fn shutting_down(&self) {
        self.update(|f| f.shutting_down = true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_with_every_assigned_partition_replayed_and_nothing_failing() {
        let r = Readiness::new();
        r.partition_replaying(0);
        r.partition_replaying(1);
        r.partition_ready(0);
        r.partition_ready(1);
        assert!(r.is_ready(), "{:?}", r.reasons());
        assert!(r.reasons().is_empty());
    }

    #[test]
    fn nothing_assigned_is_not_ready() {
        let r = Readiness::new();
        assert_eq!(r.reasons(), ["no partitions assigned"]);
        r.partition_replaying(2);
        r.partition_revoked(2);
        assert_eq!(r.reasons(), ["no partitions assigned"]);
    }

    #[test]
    fn every_reason_is_listed_in_order() {
        let r = Readiness::new();
        r.partition_ready(0);
        r.partition_replaying(3);
        r.partition_replaying(1);
        r.replay_retrying(1, "reading state partition 1: timed out");
        r.provider_failing("openai");
        r.provider_failing("anthropic");
        let _ = r.brokers_unreachable("1/1 brokers are down");
        r.topic_problem(
            "state topic batchline.state has 2 partitions, fewer than the input topic's 4".into(),
        );
        assert_eq!(
            r.reasons(),
            [
                "kafka brokers unreachable: 1/1 brokers are down",
                "partition 1: replaying the journal (retrying after: reading state partition 1: timed out)",
                "partition 3: replaying the journal",
                "provider anthropic: credentials or quota refused",
                "provider openai: credentials or quota refused",
                "state topic batchline.state has 2 partitions, fewer than the input topic's 4",
            ]
        );
        r.shutting_down();
        assert_eq!(r.reasons()[0], "shutting down");
    }

    #[test]
    fn recovered_facts_clear_their_reasons() {
        let r = Readiness::new();
        r.partition_replaying(0);
        r.provider_failing("openai");
        assert!(r.brokers_unreachable("1/1 brokers are down"));
        assert!(!r.brokers_unreachable("still down"));
        assert_eq!(r.reasons().len(), 3);
        assert!(r
            .reasons()
            .contains(&"kafka brokers unreachable: still down".to_owned()));
        r.partition_ready(0);
        r.provider_ok("openai");
        assert!(r.brokers_reachable());
        assert!(!r.brokers_reachable(), "already cleared");
        assert!(r.is_ready(), "{:?}", r.reasons());
    }

    #[test]
    fn a_retry_error_is_ignored_once_the_partition_moved_on() {
        let r = Readiness::new();
        r.partition_ready(0);
        r.replay_retrying(0, "late error from an old replay");
        r.replay_retrying(5, "partition not assigned");
        assert!(r.is_ready(), "{:?}", r.reasons());
        // A new assignment starts a fresh replay without the old error.
        r.partition_replaying(0);
        r.replay_retrying(0, "state partition 0 missing");
        r.partition_replaying(0);
        assert_eq!(r.reasons(), ["partition 0: replaying the journal"]);
    }
}
