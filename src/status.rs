//! The registry of this instance's in-flight batches, which the status API
//! (`GET /v1/batches`, `POST /v1/batches/{id}/cancel`) and `batchline
//! status` show: one small entry per batch, never per request, behind one
//! mutex that is only held to copy a few fields.
//!
//! A batch task registers when it starts and is removed when its
//! [`Registration`] drops, however the task ends. The registry never calls a
//! provider itself: a cancel request fires the batch's token, and the
//! batch's tracker sends the provider cancel as it does at `batch.deadline`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::packer::Route;
use crate::provider::{ProviderBatch, RequestCounts};

/// Where a batch is in its life, as the status API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchPhase {
    /// Sealed, waiting for admission or writing its intent.
    Planned,
    /// Uploading and creating the provider batch (or resolving a create
    /// whose outcome is unknown).
    Uploading,
    /// The provider batch exists; polled until it ends.
    Submitted,
    /// The provider batch ended (or was refused): results are being
    /// published.
    Collecting,
}

impl BatchPhase {
    pub const ALL: [BatchPhase; 4] = [
        BatchPhase::Planned,
        BatchPhase::Uploading,
        BatchPhase::Submitted,
        BatchPhase::Collecting,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BatchPhase::Planned => "planned",
            BatchPhase::Uploading => "uploading",
            BatchPhase::Submitted => "submitted",
            BatchPhase::Collecting => "collecting",
        }
    }
}

/// One in-flight batch, as the status API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchView {
    /// The local batch id, `bl-<partition>-<uuid>`.
    pub id: String,
    pub provider: String,
    pub model: String,
    pub endpoint: String,
    /// The input partition its requests came from.
    pub partition: i32,
    pub requests: u64,
    pub bytes: u64,
    pub phase: BatchPhase,
    pub provider_batch_id: Option<String>,
    /// The provider batch's status at the last poll (`validating`,
    /// `in_progress`, `cancelling`, ...).
    pub provider_status: Option<String>,
    /// The provider's request counts from the last poll.
    pub request_counts: Option<RequestCounts>,
    /// Seconds since the batch was sealed.
    pub age_seconds: f64,
    /// The sum of `cost_usd` of the results published for it so far.
    pub cost_usd: f64,
    /// A cancel was asked through the status API.
    pub cancel_requested: bool,
}

/// In-flight batches of one provider.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProviderTotals {
    pub batches: u64,
    pub requests: u64,
    pub by_phase: BTreeMap<BatchPhase, u64>,
}

/// Sums over every in-flight batch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub batches: u64,
    /// Requests held in in-flight batches.
    pub requests: u64,
    pub bytes: u64,
    pub cost_usd: f64,
    pub by_phase: BTreeMap<BatchPhase, u64>,
    pub by_provider: BTreeMap<String, ProviderTotals>,
}

impl Totals {
    pub fn of(batches: &[BatchView]) -> Totals {
        let mut t = Totals::default();
        for b in batches {
            t.batches += 1;
            t.requests += b.requests;
            t.bytes += b.bytes;
            t.cost_usd += b.cost_usd;
            *t.by_phase.entry(b.phase).or_default() += 1;
            let p = t.by_provider.entry(b.provider.clone()).or_default();
            p.batches += 1;
            p.requests += b.requests;
            *p.by_phase.entry(b.phase).or_default() += 1;
        }
        t
    }
}

/// `GET /v1/batches`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BatchList {
    /// Oldest first.
    pub batches: Vec<BatchView>,
    pub totals: Totals,
}

/// `POST /v1/batches/{id}/cancel`, accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelAccepted {
    pub id: String,
    /// The batch, when this instance owns it; otherwise the instance that
    /// owns its partition acts on the cancel record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchView>,
    /// The cancel was written to the journal: it holds across a restart
    /// or a hand-over of the partition.
    pub journaled: bool,
}

/// Why a cancel was not accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CancelRefused {
    #[error("no in-flight batch {0} on this instance")]
    Unknown(String),
    #[error("the provider batch of {id} has already ended; its results are being published")]
    Ended { id: String },
}

/// What the registry keeps per batch.
struct Entry {
    /// Tells a re-registered id's entries apart.
    serial: u64,
    route: Route,
    partition: i32,
    requests: u64,
    bytes: u64,
    sealed_at: Instant,
    phase: BatchPhase,
    provider_batch_id: Option<String>,
    provider_status: Option<&'static str>,
    counts: Option<RequestCounts>,
    cost_usd: f64,
    cancel: CancellationToken,
}

impl Entry {
    fn view(&self, id: &str, now: Instant) -> BatchView {
        BatchView {
            id: id.to_owned(),
            provider: self.route.provider.to_string(),
            model: self.route.model.to_string(),
            endpoint: self.route.endpoint.to_owned(),
            partition: self.partition,
            requests: self.requests,
            bytes: self.bytes,
            phase: self.phase,
            provider_batch_id: self.provider_batch_id.clone(),
            provider_status: self.provider_status.map(str::to_owned),
            request_counts: self.counts,
            age_seconds: now.saturating_duration_since(self.sealed_at).as_secs_f64(),
            cost_usd: self.cost_usd,
            cancel_requested: self.cancel.is_cancelled(),
        }
    }
}

/// This instance's in-flight batches. Cloning shares the registry.
#[derive(Clone, Default)]
pub struct Registry {
    batches: Arc<Mutex<HashMap<String, Entry>>>,
    serials: Arc<AtomicU64>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.batches.lock().expect("status registry lock")
    }

    /// Registers a batch that was just sealed (or rebuilt from the journal);
    /// it stays listed until the returned guard drops.
    pub fn register(
        &self,
        id: &str,
        route: &Route,
        partition: i32,
        requests: usize,
        bytes: u64,
    ) -> Registration {
        let serial = self.serials.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        self.lock().insert(
            id.to_owned(),
            Entry {
                serial,
                route: route.clone(),
                partition,
                requests: requests as u64,
                bytes,
                sealed_at: Instant::now(),
                phase: BatchPhase::Planned,
                provider_batch_id: None,
                provider_status: None,
                counts: None,
                cost_usd: 0.0,
                cancel: cancel.clone(),
            },
        );
        Registration {
            registry: self.clone(),
            id: id.to_owned(),
            serial,
            cancel,
        }
    }

    /// Every in-flight batch, oldest first, with totals.
    pub fn list(&self) -> BatchList {
        let now = Instant::now();
        let mut batches: Vec<(Instant, BatchView)> = self
            .lock()
            .iter()
            .map(|(id, e)| (e.sealed_at, e.view(id, now)))
            .collect();
        batches.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)));
        let batches: Vec<BatchView> = batches.into_iter().map(|(_, v)| v).collect();
        let totals = Totals::of(&batches);
        BatchList { batches, totals }
    }

    pub fn get(&self, id: &str) -> Option<BatchView> {
        self.lock().get(id).map(|e| e.view(id, Instant::now()))
    }

    /// Cancels a batch whose provider batch has not ended: one whose
    /// create was not sent yet ends with every request `canceled` and no
    /// create; otherwise its tracker cancels it at the provider (once the
    /// create is sent or resolved).
    pub fn request_cancel(&self, id: &str) -> Result<BatchView, CancelRefused> {
        let batches = self.lock();
        let Some(e) = batches.get(id) else {
            return Err(CancelRefused::Unknown(id.to_owned()));
        };
        match e.phase {
            BatchPhase::Collecting => Err(CancelRefused::Ended { id: id.to_owned() }),
            _ => {
                e.cancel.cancel();
                Ok(e.view(id, Instant::now()))
            }
        }
    }
}

/// A registered batch: its task reports phase changes through it, and
/// dropping it removes the batch from the registry.
pub struct Registration {
    registry: Registry,
    id: String,
    serial: u64,
    cancel: CancellationToken,
}

impl Registration {
    fn update(&self, f: impl FnOnce(&mut Entry)) {
        if let Some(e) = self
            .registry
            .lock()
            .get_mut(&self.id)
            .filter(|e| e.serial == self.serial)
        {
            f(e);
        }
    }

    /// Moves the batch to `phase`. Uploading starts over: whatever a
    /// previous provider batch said no longer applies.
    pub fn set_phase(&self, phase: BatchPhase) {
        self.update(|e| {
            e.phase = phase;
            if phase == BatchPhase::Uploading {
                e.provider_batch_id = None;
                e.provider_status = None;
                e.counts = None;
            }
        });
    }

    /// The provider batch exists (created, adopted or re-attached).
    pub fn submitted(&self, pb: &ProviderBatch) {
        self.update(|e| {
            e.phase = BatchPhase::Submitted;
            observe(e, pb);
        });
    }

    /// What the provider said at the last poll (or cancel).
    pub fn observe(&self, pb: &ProviderBatch) {
        self.update(|e| observe(e, pb));
    }

    /// The cost of the results published so far.
    pub fn set_cost(&self, cost_usd: f64) {
        self.update(|e| e.cost_usd = cost_usd);
    }

    /// Fires when a cancel is asked through the status API.
    pub fn cancel_requested(&self) -> &CancellationToken {
        &self.cancel
    }
}

fn observe(e: &mut Entry, pb: &ProviderBatch) {
    if e.provider_batch_id.as_deref() != Some(pb.id.as_str()) {
        e.provider_batch_id = Some(pb.id.clone());
    }
    e.provider_status = Some(pb.state.as_str());
    e.counts = Some(pb.counts);
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut batches = self.registry.lock();
        if batches
            .get(&self.id)
            .is_some_and(|e| e.serial == self.serial)
        {
            batches.remove(&self.id);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::ProviderKind;
    use crate::provider::BatchState;

    pub(crate) fn route(provider: &str, model: &str) -> Route {
        Route {
            provider: Arc::from(provider),
            kind: ProviderKind::Openai,
            model: Arc::from(model),
            endpoint: "/v1/chat/completions",
        }
    }

    pub(crate) fn provider_batch(id: &str, state: BatchState) -> ProviderBatch {
        ProviderBatch {
            id: id.into(),
            state,
            counts: RequestCounts {
                total: 10,
                completed: 4,
                failed: 1,
            },
            input_file_id: None,
            output_file_id: None,
            error_file_id: None,
            errors: Vec::new(),
            tag: None,
            created_at: None,
            ended_at: None,
        }
    }

    #[test]
    fn a_batch_is_listed_from_registration_until_its_guard_drops() {
        let registry = Registry::new();
        let a = registry.register("bl-0-a", &route("openai", "gpt-4o-mini"), 0, 10, 1000);
        let b = registry.register("bl-1-b", &route("xai", "grok-4"), 1, 5, 500);
        a.set_phase(BatchPhase::Uploading);
        a.submitted(&provider_batch("batch_1", BatchState::InProgress));
        a.set_cost(0.25);

        let list = registry.list();
        assert_eq!(list.batches.len(), 2);
        let first = &list.batches[0];
        assert_eq!(first.id, "bl-0-a", "oldest first");
        assert_eq!(first.phase, BatchPhase::Submitted);
        assert_eq!(first.provider_batch_id.as_deref(), Some("batch_1"));
        assert_eq!(first.provider_status.as_deref(), Some("in_progress"));
        assert_eq!(first.request_counts.unwrap().completed, 4);
        assert_eq!(first.cost_usd, 0.25);
        assert_eq!(list.batches[1].phase, BatchPhase::Planned);
        assert_eq!(list.totals.batches, 2);
        assert_eq!(list.totals.requests, 15);
        assert_eq!(list.totals.by_phase[&BatchPhase::Submitted], 1);
        assert_eq!(list.totals.by_provider["xai"].requests, 5);
        assert_eq!(
            list.totals.by_provider["openai"].by_phase[&BatchPhase::Submitted],
            1
        );

        // Uploading again (a resubmission) forgets the old provider batch.
        a.set_phase(BatchPhase::Uploading);
        assert_eq!(registry.get("bl-0-a").unwrap().provider_batch_id, None);

        drop(a);
        assert!(registry.get("bl-0-a").is_none());
        drop(b);
        assert_eq!(registry.list(), BatchList::default());
    }

    #[test]
    fn a_stale_guard_does_not_remove_a_newer_registration_of_the_same_id() {
        let registry = Registry::new();
        let old = registry.register("bl-0-a", &route("openai", "m"), 0, 1, 1);
        let new = registry.register("bl-0-a", &route("openai", "m"), 0, 1, 1);
        old.set_phase(BatchPhase::Collecting);
        drop(old);
        let view = registry
            .get("bl-0-a")
            .expect("the newer registration stays");
        assert_eq!(view.phase, BatchPhase::Planned);
        drop(new);
        assert!(registry.get("bl-0-a").is_none());
    }

    #[test]
    fn a_batch_can_be_cancelled_until_its_provider_batch_ends() {
        let registry = Registry::new();
        assert_eq!(
            registry.request_cancel("bl-0-x"),
            Err(CancelRefused::Unknown("bl-0-x".into()))
        );
        // Before its create: the submitter sees the token and sends none.
        let early = registry.register("bl-0-e", &route("openai", "m"), 0, 1, 1);
        early.set_phase(BatchPhase::Uploading);
        assert!(registry.request_cancel("bl-0-e").unwrap().cancel_requested);
        assert!(early.cancel_requested().is_cancelled());

        let r = registry.register("bl-0-a", &route("openai", "m"), 0, 1, 1);
        assert!(!r.cancel_requested().is_cancelled());
        r.submitted(&provider_batch("batch_1", BatchState::Validating));
        let view = registry.request_cancel("bl-0-a").unwrap();
        assert!(view.cancel_requested);
        assert!(r.cancel_requested().is_cancelled());
        // Asking twice is harmless.
        assert!(registry.request_cancel("bl-0-a").is_ok());

        r.set_phase(BatchPhase::Collecting);
        assert!(matches!(
            registry.request_cancel("bl-0-a"),
            Err(CancelRefused::Ended { .. })
        ));
    }

    #[test]
    fn views_round_trip_as_json() {
        let registry = Registry::new();
        let r = registry.register("bl-0-a", &route("openai", "m"), 0, 3, 30);
        r.submitted(&provider_batch("batch_1", BatchState::Cancelling));
        let list = registry.list();
        let json = serde_json::to_value(&list).unwrap();
        assert_eq!(json["batches"][0]["phase"], "submitted");
        assert_eq!(json["batches"][0]["provider_status"], "cancelling");
        assert_eq!(json["totals"]["by_phase"]["submitted"], 1);
        assert_eq!(json["totals"]["by_provider"]["openai"]["requests"], 3);
        let back: BatchList = serde_json::from_value(json).unwrap();
        assert_eq!(back, list);
    }
}
