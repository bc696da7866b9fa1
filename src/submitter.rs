//! Runs each sealed batch through its life: admission, upload, create,
//! tracking, collection, and finally the release of its offsets.
//!
//! A create is never retried on an ambiguous failure (timeout, reset, 408,
//! 409, 5xx): the input file is deleted first, so a create still in flight
//! anywhere fails, and the batch is then looked up by its tag. Definite
//! refusals follow DESIGN.md "Creates are not idempotent".

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::budget::Budget;
use crate::collector::{self, CollectContext, Pricing};
use crate::config::{BatchConfig, RetryConfig};
use crate::ingest::Backlog;
use crate::journal::{BatchRecord, OffsetSet, Phase, Released, RouteRecord};
use crate::metrics::Metrics;
use crate::model::{ErrorInfo, Status};
use crate::offsets::OffsetTracker;
use crate::packer::SealedBatch;
use crate::provider::{
    BatchState, CreateError, Provider, ProviderBatch, ProviderError, RequestCounts,
};
use crate::publisher::Publisher;
use crate::state::{InProgress, StateError};
use crate::status::{BatchPhase, Registration, Registry};
use crate::tracker::{self, TrackOptions, Tracked};

/// A configured, enabled provider and its admission cap.
pub struct ProviderSlot {
    pub provider: Arc<dyn Provider>,
    pub in_flight: Arc<Semaphore>,
    pub poll_interval: Duration,
}

/// What every batch task shares.
pub struct BatchContext {
    pub providers: HashMap<String, ProviderSlot>,
    pub publisher: Arc<Publisher>,
    pub offsets: Arc<Mutex<OffsetTracker>>,
    pub backlog: Arc<Backlog>,
    pub pricing: Pricing,
    pub spool_dir: PathBuf,
    pub batch: BatchConfig,
    pub retry: RetryConfig,
    pub metrics: Metrics,
    pub journal: Arc<crate::state::Journal>,
    /// Provider batch ids this instance created or adopted, with the local
    /// batch each belongs to: never a candidate for another local batch's
    /// ambiguous create. It may well be one for its own, when the same
    /// instance resolves a create it sent under an earlier epoch (the
    /// partition came back to it).
    pub known_batches: Mutex<HashMap<String, String>>,
    /// The in-flight batches the status API shows.
    pub status: Registry,
    pub budget: Arc<Budget>,
}

impl BatchContext {
    /// Whether `provider_batch` belongs to a local batch other than `local`.
    fn belongs_elsewhere(&self, provider_batch: &str, local: &str) -> bool {
        self.known_batches
            .lock()
            .expect("known batches lock")
            .get(provider_batch)
            .is_some_and(|owner| owner != local)
    }

    /// Records that `provider_batch` is `local`'s; `false` if it is known
    /// as another local batch's.
    fn claim(&self, provider_batch: &str, local: &str) -> bool {
        let mut known = self.known_batches.lock().expect("known batches lock");
        match known.get(provider_batch) {
            Some(owner) => owner == local,
            None => {
                known.insert(provider_batch.to_owned(), local.to_owned());
                true
            }
        }
    }
}

/// Receives sealed batches and runs one task per batch.
pub struct Submitter {
    ctx: Arc<BatchContext>,
    batches: mpsc::Receiver<SealedBatch>,
}

impl Submitter {
    pub fn new(ctx: Arc<BatchContext>, batches: mpsc::Receiver<SealedBatch>) -> Self {
        Submitter { ctx, batches }
    }

    /// Runs until the batch channel closes and every batch task is done, or
    /// until `abandon` fires.
    pub async fn run(mut self, abandon: CancellationToken) {
        let mut tasks = JoinSet::new();
        loop {
            tokio::select! {
                batch = self.batches.recv() => match batch {
                    Some(batch) => {
                        tasks.spawn(run_batch(self.ctx.clone(), batch, abandon.clone()));
                    }
                    None => break,
                },
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => log_panic(joined),
            }
        }
        while let Some(joined) = tasks.join_next().await {
            log_panic(joined);
        }
    }
}

fn log_panic(joined: Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined {
        tracing::error!(error = %e, "batch task failed");
    }
}

/// Where a batch task begins.
enum Start {
    /// Upload and create.
    Submit,
    /// A create may have been sent before a crash or hand-over; the input
    /// file it used, if any.
    Resolve(Option<String>),
    /// The provider batch exists: track it (its input file id, if any).
    Attach(String, Option<String>),
}

/// How submission ended.
enum Submission<'a> {
    /// `adopted`: found by lookup after an ambiguous create.
    Created {
        pb: ProviderBatch,
        adopted: bool,
    },
    /// The provider refused the batch for good: every request errors.
    Refused(ErrorInfo),
    /// The provider refused the batch as too large (413).
    TooLarge(ErrorInfo),
    /// Cancelled through the status API before its create was sent.
    Canceled,
    /// The partition is being handed over and the create was not sent:
    /// the requests go back through a `done` (held by the guard, which the
    /// revocation waits for).
    Release(InProgress<'a>),
    Abandoned,
}

/// What a definite create refusal calls for.
#[derive(Debug, PartialEq)]
enum Refusal {
    /// Send the same create again after this long.
    RetryAfter(Option<Duration>),
    /// Credentials or quota: hold the requests and retry with backoff.
    HoldRoute,
    /// Too large for the provider: split the batch in two.
    Split,
    /// Nothing will make it succeed: error every request.
    Fail,
}

fn classify_refusal(e: &ProviderError) -> Refusal {
    match e {
        ProviderError::Transport { connect: true, .. } => Refusal::RetryAfter(None),
        ProviderError::Http {
            status,
            kind,
            message,
            retry_after,
            ..
        } => match (*status, kind.as_deref()) {
            (429, Some("insufficient_quota")) | (401..=403, _) => Refusal::HoldRoute,
            (429, _) => Refusal::RetryAfter(*retry_after),
            (413, _) => Refusal::Split,
            // Eventual consistency right after an upload (PROVIDERS.md 1.8).
            (400 | 404, _)
                if message.contains("Cannot find file") || message.contains("No such File") =>
            {
                Refusal::RetryAfter(*retry_after)
            }
            _ => Refusal::Fail,
        },
        _ => Refusal::Fail,
    }
}

async fn sleep_or_abandon(d: Duration, abandon: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = abandon.cancelled() => false,
    }
}

/// Uploads and creates the provider batch for `batch`.
async fn submit<'a>(
    ctx: &'a BatchContext,
    provider: &dyn Provider,
    batch: &SealedBatch,
    intent_at: Option<i64>,
    abandon: &CancellationToken,
    cancel: &CancellationToken,
) -> Submission<'a> {
    let backoff = |attempt: u32| ctx.retry.backoff(attempt);
    let mut upload_attempt = 0;
    'upload: loop {
        if abandon.is_cancelled() {
            return Submission::Abandoned;
        }
        let file_id = match provider.upload(batch).await {
            Ok(f) => f,
            Err(e) => {
                let action = if e.is_transient() {
                    Refusal::RetryAfter(None)
                } else {
                    classify_refusal(&e)
                };
                tracing::warn!(provider = provider.name(), batch = %batch.id, error = %e, "upload failed");
                if action == Refusal::Fail {
                    return Submission::Refused(e.error_info());
                }
                if action == Refusal::HoldRoute {
                    ctx.metrics.route_failing(provider.name());
                }
                upload_attempt += 1;
                if !sleep_or_abandon(backoff(upload_attempt), abandon).await {
                    return Submission::Abandoned;
                }
                continue 'upload;
            }
        };
        // The record that allows the create: `uploaded` with a file, the
        // batch's `intent` without one (Anthropic).
        let allowed_at = match (&file_id, intent_at) {
            (Some(_), _) | (None, None) => {
                let (phase, extra) = match &file_id {
                    Some(_) => (
                        Phase::Uploaded,
                        Phased {
                            file_id: file_id.as_deref(),
                            ..Phased::default()
                        },
                    ),
                    None => (Phase::Intent, Phased::default()),
                };
                match record(ctx, batch, phase, extra, abandon).await {
                    Some(offset) => offset,
                    None => {
                        delete_file(provider, file_id.as_deref()).await;
                        return Submission::Abandoned;
                    }
                }
            }
            (None, Some(offset)) => offset,
        };
        // From the record that allows the create through the create and its
        // `submitted` record, a revocation waits for this batch: it then
        // either finds the create sent and recorded, or none sent and the
        // requests handed back, never a create left to a lookup.
        let mut held = Some(ctx.journal.creating(batch.partition));
        if let Some(f) = &file_id {
            tracing::info!(batch = %batch.id, file = %f, "batch file uploaded");
        }
        crate::crash_point!("after_upload");
        let uploaded_at = Instant::now();
        let mut attempt = 0;
        loop {
            if uploaded_at.elapsed() >= ctx.batch.create_deadline {
                // Nothing was sent since the deadline passed: start over with
                // a fresh file rather than send a stale create.
                tracing::warn!(provider = provider.name(), batch = %batch.id, "create deadline passed; uploading again");
                delete_file(provider, file_id.as_deref()).await;
                continue 'upload;
            }
            // Being given up but still owned: decided at the create below.
            if abandon.is_cancelled() || !ctx.journal.owns(batch.partition, &batch.epoch) {
                delete_file(provider, file_id.as_deref()).await;
                return Submission::Abandoned;
            }
            // Read the partition back to the allowing record: a claim by
            // another owner before it means this instance lost the
            // partition without being told, and must not create.
            match ctx
                .journal
                .confirm(batch.partition, &batch.epoch, allowed_at)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(batch = %batch.id, partition = batch.partition, "another owner claimed the partition; not creating");
                    delete_file(provider, file_id.as_deref()).await;
                    return Submission::Abandoned;
                }
                Err(e) => {
                    tracing::warn!(batch = %batch.id, error = %e, "confirming ownership failed; retrying");
                    attempt += 1;
                    if !sleep_or_abandon(backoff(attempt), abandon).await {
                        delete_file(provider, file_id.as_deref()).await;
                        return Submission::Abandoned;
                    }
                    continue;
                }
            }
            // A cancel from here on finds the create sent, and the tracker
            // cancels the provider batch.
            if cancel.is_cancelled() {
                delete_file(provider, file_id.as_deref()).await;
                return Submission::Canceled;
            }
            // Decided under the drain lock: a revocation either waits for
            // this create and its `submitted` record, or finds no create
            // sent and the requests handed back.
            let creating = held
                .take()
                .unwrap_or_else(|| ctx.journal.creating(batch.partition));
            if ctx.journal.draining(batch.partition) {
                delete_file(provider, file_id.as_deref()).await;
                return Submission::Release(creating);
            }
            match provider.create(batch, file_id.as_deref()).await {
                Ok(pb) => {
                    ctx.claim(&pb.id, &batch.id);
                    ctx.metrics.route_ok(provider.name());
                    crate::crash_point!("after_create");
                    let recorded = record_submitted(ctx, batch, &pb, abandon).await;
                    drop(creating);
                    if !recorded {
                        return Submission::Abandoned;
                    }
                    return Submission::Created { pb, adopted: false };
                }
                Err(CreateError::Refused(e)) => {
                    drop(creating);
                    let action = classify_refusal(&e);
                    tracing::warn!(provider = provider.name(), batch = %batch.id, error = %e, ?action, "create refused");
                    let wait = match action {
                        Refusal::Fail => {
                            delete_file(provider, file_id.as_deref()).await;
                            return Submission::Refused(e.error_info());
                        }
                        Refusal::Split => {
                            delete_file(provider, file_id.as_deref()).await;
                            return Submission::TooLarge(e.error_info());
                        }
                        Refusal::RetryAfter(after) => after.unwrap_or_else(|| backoff(attempt)),
                        Refusal::HoldRoute => {
                            ctx.metrics.route_failing(provider.name());
                            backoff(attempt + 4)
                        }
                    };
                    attempt += 1;
                    if !sleep_or_abandon(wait, abandon).await {
                        delete_file(provider, file_id.as_deref()).await;
                        return Submission::Abandoned;
                    }
                }
                Err(CreateError::Ambiguous(e)) => {
                    // The lookup waits minutes: the revocation does not.
                    drop(creating);
                    tracing::warn!(provider = provider.name(), batch = %batch.id, error = %e, "create outcome unknown; resolving by lookup");
                    ctx.metrics.ambiguous_create(provider.name());
                    match resolve_ambiguous(ctx, provider, batch, file_id.as_deref(), abandon).await
                    {
                        Some(Some(pb)) => {
                            ctx.metrics.route_ok(provider.name());
                            if !record_submitted(ctx, batch, &pb, abandon).await {
                                return Submission::Abandoned;
                            }
                            return Submission::Created { pb, adopted: true };
                        }
                        Some(None) => continue 'upload,
                        None => return Submission::Abandoned,
                    }
                }
            }
        }
    }
}

async fn record_submitted(
    ctx: &BatchContext,
    batch: &SealedBatch,
    pb: &ProviderBatch,
    abandon: &CancellationToken,
) -> bool {
    record(
        ctx,
        batch,
        Phase::Submitted,
        Phased {
            file_id: pb.input_file_id.as_deref(),
            provider_batch_id: Some(&pb.id),
            ..Phased::default()
        },
        abandon,
    )
    .await
    .is_some()
}

/// Resolves an ambiguous create: delete the input file (so a create still in
/// flight fails), wait for listings to catch up, then look for the batch by
/// its tag and file. `Some(None)`: it does not exist, submit again.
async fn resolve_ambiguous(
    ctx: &BatchContext,
    provider: &dyn Provider,
    batch: &SealedBatch,
    file_id: Option<&str>,
    abandon: &CancellationToken,
) -> Option<Option<ProviderBatch>> {
    delete_file(provider, file_id).await;
    if !sleep_or_abandon(ctx.batch.lookup_grace, abandon).await {
        return None;
    }
    let mut attempt = 0;
    let candidates = loop {
        match provider.find_candidates(batch, file_id).await {
            Ok(found) => break found,
            Err(e) => {
                tracing::warn!(provider = provider.name(), batch = %batch.id, error = %e, "lookup failed; retrying");
                // A create whose answer was lost (a server may answer 401
                // and reset before reading the body) is looked up with the
                // same key: its refusal marks the route, as the create's would.
                if classify_refusal(&e) == Refusal::HoldRoute {
                    ctx.metrics.route_failing(provider.name());
                }
                attempt += 1;
                let wait = ctx.retry.backoff(attempt);
                if !sleep_or_abandon(wait, abandon).await {
                    return None;
                }
            }
        }
    };
    for candidate in candidates
        .into_iter()
        .filter(|c| !ctx.belongs_elsewhere(&c.id, &batch.id))
    {
        // A tag match is exact; a match by time and size must show our
        // custom_ids before it is ours (DESIGN.md "Creates are not idempotent").
        let adopted = if provider.tags_batches() {
            Some(candidate)
        } else {
            match verify_candidate(ctx, provider, batch, candidate, abandon).await {
                Verified::Ours(pb) => Some(*pb),
                Verified::NotOurs => None,
                Verified::Abandoned => return None,
            }
        };
        if let Some(pb) = adopted {
            if ctx.claim(&pb.id, &batch.id) {
                tracing::info!(provider = provider.name(), batch = %batch.id, provider_batch = %pb.id, "ambiguous create took effect; adopting");
                return Some(Some(pb));
            }
        }
    }
    tracing::info!(provider = provider.name(), batch = %batch.id, "ambiguous create did not take effect; submitting again");
    Some(None)
}

enum Verified {
    Ours(Box<ProviderBatch>),
    NotOurs,
    Abandoned,
}

/// Waits for an untagged candidate to end and compares its results'
/// custom_ids with the batch's: ours only if they are exactly the same set.
async fn verify_candidate(
    ctx: &BatchContext,
    provider: &dyn Provider,
    batch: &SealedBatch,
    candidate: ProviderBatch,
    abandon: &CancellationToken,
) -> Verified {
    let opts = TrackOptions {
        poll_interval: ctx
            .providers
            .get(provider.name())
            .map_or(Duration::from_secs(30), |s| s.poll_interval),
        deadline: Instant::now() + ctx.batch.deadline,
        not_found_grace: ctx.batch.lookup_grace,
        max_backoff: ctx.retry.max_backoff,
    };
    let pb = match tracker::track(provider, candidate, &opts, abandon, None).await {
        Tracked::Ended(pb) => *pb,
        Tracked::NotFound => return Verified::NotOurs,
        Tracked::Abandoned => return Verified::Abandoned,
    };
    let local = format!("{}.verify", batch.id);
    let paths = match provider.download_results(&pb, &ctx.spool_dir, &local).await {
        Ok(p) => p,
        Err(e) => {
            // Batchline never deletes batches: results that cannot be read
            // (gone, 404) mean the candidate is not ours to adopt.
            tracing::warn!(provider = provider.name(), batch = %batch.id, candidate = %pb.id, error = %e, "candidate results unreadable; not ours");
            return Verified::NotOurs;
        }
    };
    let ours = matches_custom_ids(provider, batch, &paths).unwrap_or(false);
    for p in &paths {
        let _ = std::fs::remove_file(p);
    }
    tracing::info!(provider = provider.name(), batch = %batch.id, candidate = %pb.id, ours, "verified ambiguous-create candidate");
    if ours {
        Verified::Ours(Box::new(pb))
    } else {
        Verified::NotOurs
    }
}

/// Whether the result files hold exactly the batch's custom_ids.
fn matches_custom_ids(
    provider: &dyn Provider,
    batch: &SealedBatch,
    paths: &[PathBuf],
) -> std::io::Result<bool> {
    use std::io::BufRead;
    let meta = batch.open_meta()?;
    let mut seen = vec![false; batch.len()];
    let mut meta_buf = crate::packer::MetaBuf::default();
    for path in paths {
        for line in std::io::BufReader::new(std::fs::File::open(path)?).lines() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let Ok(outcome) = provider.parse_result_line(&line) else {
                return Ok(false);
            };
            let Some(i) = batch.index_of(&outcome.custom_id) else {
                return Ok(false);
            };
            if batch.read_meta(&meta, i, &mut meta_buf)?.custom_id != outcome.custom_id
                || std::mem::replace(&mut seen[i], true)
            {
                return Ok(false);
            }
        }
    }
    Ok(seen.iter().all(|s| *s))
}

/// What a journal record adds to the batch's plan.
#[derive(Default)]
struct Phased<'a> {
    file_id: Option<&'a str>,
    provider_batch_id: Option<&'a str>,
    /// With `done`: the offsets that got a terminal result.
    terminal: Option<OffsetSet>,
    /// With `done`: the offsets handed to successors.
    released: Vec<Released>,
}

/// Writes and confirms a phase of `batch` in the journal before the step it
/// allows, retrying broker errors; returns where it landed. `None` when the
/// batch's partition is no longer this instance's, or work is abandoned:
/// the batch stops here, and the partition's next owner carries on from the
/// journal.
async fn record(
    ctx: &BatchContext,
    batch: &SealedBatch,
    phase: Phase,
    extra: Phased<'_>,
    abandon: &CancellationToken,
) -> Option<i64> {
    let r = RouteRecord {
        provider: batch.route.provider.to_string(),
        model: batch.route.model.to_string(),
        endpoint: batch.route.endpoint.to_owned(),
    };
    let record = BatchRecord {
        id: batch.id.clone(),
        phase,
        route: r,
        attempt: batch.attempt,
        requeues: batch.requeues,
        offsets: batch.offsets.iter().copied().collect(),
        file_id: extra.file_id.map(str::to_owned),
        provider_batch_id: extra.provider_batch_id.map(str::to_owned),
        terminal: extra.terminal,
        released: extra.released,
    };
    let mut attempt = 0;
    loop {
        match ctx
            .journal
            .write_batch(batch.partition, &batch.epoch, record.clone())
            .await
        {
            Ok(offset) => return Some(offset),
            Err(StateError::NotOwner(p)) => {
                tracing::info!(batch = %batch.id, partition = p, phase = phase.as_str(), "partition handed over; leaving the batch to its new owner");
                return None;
            }
            Err(e) => {
                tracing::warn!(batch = %batch.id, phase = phase.as_str(), error = %e, "journal write failed; retrying");
                attempt += 1;
                let wait = ctx.retry.backoff(attempt);
                if !sleep_or_abandon(wait, abandon).await {
                    return None;
                }
            }
        }
    }
}

/// Reads the partition back to `batch`'s record at `at`: `false` when
/// another owner's claim lies before it (the record is void: this instance
/// lost the partition without being told) or work is abandoned. A `done`
/// is confirmed so before its offsets are committed and its provider files
/// deleted: a void `done` must leave the files to the next owner.
async fn confirm(
    ctx: &BatchContext,
    batch: &SealedBatch,
    at: i64,
    abandon: &CancellationToken,
) -> bool {
    let mut attempt = 0;
    loop {
        match ctx.journal.confirm(batch.partition, &batch.epoch, at).await {
            Ok(true) => return true,
            Ok(false) => {
                tracing::warn!(batch = %batch.id, partition = batch.partition, "another owner claimed the partition; leaving the batch to it");
                return false;
            }
            Err(e) => {
                tracing::warn!(batch = %batch.id, error = %e, "confirming ownership failed; retrying");
                attempt += 1;
                if !sleep_or_abandon(ctx.retry.backoff(attempt), abandon).await {
                    return false;
                }
            }
        }
    }
}

async fn delete_file(provider: &dyn Provider, file_id: Option<&str>) {
    if let Some(id) = file_id {
        if let Err(e) = provider.delete_file(id).await {
            tracing::warn!(provider = provider.name(), file = id, error = %e, "deleting provider file failed");
        }
    }
}

/// One span per batch: every line it logs carries its ids.
fn batch_span(batch: &SealedBatch) -> tracing::Span {
    tracing::info_span!(
        "batch",
        id = %batch.id,
        partition = batch.partition,
        provider = %batch.route.provider,
        model = %batch.route.model,
        attempt = batch.attempt,
        provider_batch = tracing::field::Empty,
    )
}

/// One batch, from sealed window to released offsets, then its successors
/// (retries, the halves of a split, the rest of a batch failed for named
/// lines) one after the other. However a batch's work ends (finished,
/// handed over, abandoned), what it held locally is released.
async fn run_batch(ctx: Arc<BatchContext>, batch: SealedBatch, abandon: CancellationToken) {
    // The work stops at shutdown's deadline, and as soon as the partition
    // is revoked: the next owner carries on from the journal.
    let local = abandon.child_token();
    let revoked = ctx.journal.revoked(batch.partition, &batch.epoch);
    let stop = local.clone();
    let watcher = tokio::spawn(async move {
        revoked.cancelled().await;
        stop.cancel();
    });
    let mut requeues = batch.requeues;
    let mut queue = std::collections::VecDeque::from([batch]);
    while let Some(batch) = queue.pop_front() {
        // A split waits before its halves go (the provider's enqueued
        // tokens need time to drain).
        let wait = if batch.requeues > requeues {
            ctx.retry.backoff(batch.requeues)
        } else {
            Duration::ZERO
        };
        requeues = batch.requeues;
        let successors = if local.is_cancelled() || !sleep_or_abandon(wait, &local).await {
            Vec::new()
        } else {
            // Listed in the status API until its work ends, however it ends.
            let status = ctx.status.register(
                &batch.id,
                &batch.route,
                batch.partition,
                batch.len(),
                batch.input_bytes,
            );
            // A cancel record read while replaying the journal.
            if ctx.journal.take_pending_cancel(&batch.id) {
                tracing::info!(batch = %batch.id, "a cancel recorded in the journal applies to this batch");
                status.cancel_requested().cancel();
            }
            drive_batch(&ctx, &batch, &local, &status)
                .instrument(batch_span(&batch))
                .await
        };
        ctx.backlog.release(batch.len() as u64, batch.input_bytes);
        batch.remove_files();
        for s in successors {
            ctx.backlog.hold(s.len() as u64, s.input_bytes);
            queue.push_back(s);
        }
    }
    watcher.abort();
}

async fn drive_batch(
    ctx: &Arc<BatchContext>,
    batch: &SealedBatch,
    abandon: &CancellationToken,
    status: &Registration,
) -> Vec<SealedBatch> {
    let (ctx, batch, abandon) = (ctx.clone(), batch, abandon.clone());
    let Some(slot) = ctx.providers.get(&*batch.route.provider) else {
        // Ingest only routes to enabled providers; this is a bug, not input.
        tracing::error!(batch = %batch.id, provider = %batch.route.provider, "batch for an unconfigured provider");
        return Vec::new();
    };
    let provider = slot.provider.as_ref();
    let permit = tokio::select! {
        p = slot.in_flight.clone().acquire_owned() => p.expect("semaphores are never closed"),
        _ = abandon.cancelled() => return Vec::new(),
    };
    let started = Instant::now();
    let collect_ctx = CollectContext {
        provider,
        metrics: &ctx.metrics,
        publisher: &ctx.publisher,
        pricing: &ctx.pricing,
        spool_dir: &ctx.spool_dir,
        status: Some(status),
        max_attempts: ctx.retry.max_attempts,
    };
    // Where this batch starts: planned just now, or found in the journal
    // by a new owner (DESIGN.md "Replay").
    let mut intent_at = None;
    // A new batch waits here, unsent, while the daily budget is spent. A
    // recovered one may already be running at the provider.
    let _reservation = match batch.recovered {
        None => {
            let estimate = ctx.budget.estimate(
                &ctx.pricing,
                &batch.route,
                batch.input_bytes,
                batch.output_caps,
            );
            let Some(r) = ctx.budget.admit(estimate, &abandon).await else {
                return Vec::new();
            };
            Some(r)
        }
        Some(_) => None,
    };
    let mut start = match batch.recovered.as_deref() {
        None => {
            let Some(offset) =
                record(&ctx, batch, Phase::Intent, Phased::default(), &abandon).await
            else {
                return Vec::new();
            };
            crate::crash_point!("after_intent");
            intent_at = Some(offset);
            Start::Submit
        }
        // The create may have been sent: only a lookup can tell.
        Some(r) if r.phase == Phase::Intent || r.phase == Phase::Uploaded => {
            Start::Resolve(r.file_id.clone())
        }
        Some(r) => match &r.provider_batch_id {
            Some(id) => Start::Attach(id.clone(), r.file_id.clone()),
            None => Start::Resolve(r.file_id.clone()),
        },
    };
    let (input_file, tracked) = loop {
        let submission = match std::mem::replace(&mut start, Start::Submit) {
            Start::Submit => {
                status.set_phase(BatchPhase::Uploading);
                submit(
                    &ctx,
                    provider,
                    batch,
                    intent_at.take(),
                    &abandon,
                    status.cancel_requested(),
                )
                .await
            }
            Start::Resolve(file_id) => {
                status.set_phase(BatchPhase::Uploading);
                ctx.metrics.ambiguous_create(provider.name());
                tracing::info!(batch = %batch.id, "resolving a create a previous owner may have sent");
                match resolve_ambiguous(&ctx, provider, batch, file_id.as_deref(), &abandon).await {
                    Some(Some(pb)) => {
                        if !record_submitted(&ctx, batch, &pb, &abandon).await {
                            return Vec::new();
                        }
                        Submission::Created { pb, adopted: true }
                    }
                    Some(None) => continue,
                    None => return Vec::new(),
                }
            }
            Start::Attach(id, input_file_id) => {
                ctx.claim(&id, &batch.id);
                let pb = ProviderBatch {
                    id,
                    state: BatchState::Validating,
                    counts: RequestCounts::default(),
                    input_file_id,
                    output_file_id: None,
                    error_file_id: None,
                    errors: Vec::new(),
                    tag: None,
                    created_at: None,
                    ended_at: None,
                };
                Submission::Created { pb, adopted: false }
            }
        };
        let (pb, adopted) = match submission {
            Submission::Abandoned => return Vec::new(),
            Submission::TooLarge(error) => {
                return split(&ctx, batch, None, &error, &abandon)
                    .await
                    .unwrap_or_default();
            }
            Submission::Release(_creating) => {
                tracing::info!(batch = %batch.id, "partition handed over before the create was sent; its requests go back to the journal");
                let all = (0..batch.len() as u32).collect();
                let group = vec![(all, batch.attempt, batch.requeues)];
                // The next owner packs them again from the `done`.
                if let Some(successors) = hand_off(&ctx, batch, group, "handover", &abandon).await {
                    successors.iter().for_each(SealedBatch::remove_files);
                }
                return Vec::new();
            }
            Submission::Canceled => {
                tracing::info!(batch = %batch.id, "cancelled before its create was sent; every request is canceled");
                let error = ErrorInfo::new(
                    "batch_cancelled",
                    "the batch was cancelled through the status API before it was sent",
                );
                return finish(
                    &ctx,
                    &collect_ctx,
                    batch,
                    None,
                    Outcome::All(Status::Canceled, error),
                    &abandon,
                )
                .await
                .unwrap_or_default();
            }
            Submission::Refused(error) => {
                tracing::error!(batch = %batch.id, error = %error.message, "provider refused the batch; every request errors");
                return finish(
                    &ctx,
                    &collect_ctx,
                    batch,
                    None,
                    Outcome::All(Status::Errored, error),
                    &abandon,
                )
                .await
                .unwrap_or_default();
            }
            Submission::Created { pb, adopted } => (pb, adopted),
        };
        tracing::info!(batch = %batch.id, provider_batch = %pb.id, requests = batch.len(), bytes = batch.input_bytes, adopted, "batch submitted");
        status.submitted(&pb);
        tracing::Span::current().record("provider_batch", pb.id.as_str());
        ctx.metrics
            .batch_submitted(&batch.route, batch.len(), batch.input_bytes);
        let opts = TrackOptions {
            poll_interval: slot.poll_interval,
            deadline: batch.opened_at + ctx.batch.deadline,
            not_found_grace: ctx.batch.lookup_grace,
            max_backoff: ctx.retry.max_backoff,
        };
        let input_file = pb.input_file_id.clone();
        let tracked = tracker::track(provider, pb, &opts, &abandon, Some(status)).await;
        if let Tracked::Ended(pb) = &tracked {
            // An adopted batch whose input file we deleted to fence the
            // create may fail validation: nothing ran, so submit again.
            if adopted
                && pb.state == BatchState::Failed
                && pb.counts.completed == 0
                && pb.output_file_id.is_none()
            {
                tracing::warn!(batch = %batch.id, provider_batch = %pb.id, "adopted batch failed before any request ran; handing its requests to a new batch");
                ctx.metrics
                    .batch_ended(&batch.route, pb.state.as_str(), started.elapsed());
                // Through a `done`, under a new id: this id's journal keeps
                // the failed provider batch as its furthest phase.
                let all = (0..batch.len() as u32).collect();
                let group = vec![(all, batch.attempt, batch.requeues)];
                return hand_off(&ctx, batch, group, "resubmit", &abandon)
                    .await
                    .unwrap_or_default();
            }
        }
        break (input_file, tracked);
    };
    drop(permit);
    match tracked {
        Tracked::Abandoned => Vec::new(),
        Tracked::NotFound => {
            let error = ErrorInfo::new(
                "batch_not_found",
                format!("the provider no longer knows the batch of {}", batch.id),
            );
            finish(
                &ctx,
                &collect_ctx,
                batch,
                input_file,
                Outcome::All(Status::Errored, error),
                &abandon,
            )
            .await
            .unwrap_or_default()
        }
        Tracked::Ended(pb) => {
            tracing::info!(batch = %batch.id, provider_batch = %pb.id, state = pb.state.as_str(), secs = started.elapsed().as_secs_f64(), "batch ended");
            ctx.metrics
                .batch_ended(&batch.route, pb.state.as_str(), started.elapsed());
            if let Some(error) = too_large(&pb) {
                if batch.requeues < ctx.retry.max_requeues {
                    return split(&ctx, batch, input_file, &error, &abandon)
                        .await
                        .unwrap_or_default();
                }
            }
            let files: Vec<String> = [pb.output_file_id.clone(), pb.error_file_id.clone()]
                .into_iter()
                .flatten()
                .collect();
            let successors = finish(
                &ctx,
                &collect_ctx,
                batch,
                input_file,
                Outcome::Collect(&pb),
                &abandon,
            )
            .await;
            // Result files go only once `done` is durable: a new owner
            // collects from them otherwise.
            if successors.is_some() {
                for f in files {
                    delete_file(provider, Some(&f)).await;
                }
            }
            successors.unwrap_or_default()
        }
    }
}

/// The error of a batch the provider failed for its size: its enqueued
/// token limit (OpenAI `token_limit_exceeded`), or too many requests or
/// embedding inputs (`too_many_tasks`, which names the line where the
/// limit was crossed, though that line is not at fault).
fn too_large(pb: &ProviderBatch) -> Option<ErrorInfo> {
    (pb.state == BatchState::Failed)
        .then(|| {
            pb.errors.iter().find(|e| {
                (e.code == "token_limit_exceeded" && e.line.is_none()) || e.code == "too_many_tasks"
            })
        })
        .flatten()
        .map(|e| ErrorInfo::new(e.code.clone(), e.message.clone()))
}

/// Splits a batch the provider found too large (a 413, or its enqueued
/// token limit) in two halves that go one after the other after a backoff,
/// without spending an attempt; a batch of one request is sent again as it
/// is. `None` if the `done` that hands them on did not become durable.
async fn split(
    ctx: &BatchContext,
    batch: &SealedBatch,
    input_file: Option<String>,
    error: &ErrorInfo,
    abandon: &CancellationToken,
) -> Option<Vec<SealedBatch>> {
    let n = batch.len() as u32;
    let halves: Vec<Vec<u32>> = if n > 1 {
        vec![(0..n / 2).collect(), (n / 2..n).collect()]
    } else {
        vec![(0..n).collect()]
    };
    tracing::warn!(batch = %batch.id, requests = n, requeues = batch.requeues + 1, error = %error.message, "the provider refused the batch's size; splitting it");
    let groups = halves
        .into_iter()
        .map(|picks| (picks, batch.attempt, batch.requeues + 1))
        .collect();
    let successors = hand_off(ctx, batch, groups, "split", abandon).await?;
    if let Some(slot) = ctx.providers.get(&*batch.route.provider) {
        delete_file(slot.provider.as_ref(), input_file.as_deref()).await;
    }
    Some(successors)
}

/// Writes `batch`'s `done`: every request not in `groups` got its terminal
/// result; each group's requests go to a new batch with that attempt and
/// requeue count, built from this batch's spool files before the `done`.
/// Then the terminal offsets become committable. Returns the successors,
/// or `None` if the `done` did not become durable (the partition's next
/// owner carries on from the journal).
async fn hand_off(
    ctx: &BatchContext,
    batch: &SealedBatch,
    groups: Vec<(Vec<u32>, u32, u32)>,
    reason: &str,
    abandon: &CancellationToken,
) -> Option<Vec<SealedBatch>> {
    let mut successors: Vec<SealedBatch> = Vec::new();
    for (picks, attempt, requeues) in groups {
        let mut tries = 0;
        let next = loop {
            match batch.successor(&ctx.spool_dir, &picks, attempt, requeues) {
                Ok(b) => break b,
                Err(e) => {
                    tracing::error!(batch = %batch.id, error = %e, "writing a successor batch failed; retrying");
                    tries += 1;
                    if !sleep_or_abandon(ctx.retry.backoff(tries), abandon).await {
                        successors.iter().for_each(SealedBatch::remove_files);
                        return None;
                    }
                }
            }
        };
        successors.push(next);
    }
    let mut terminal: OffsetSet = batch.offsets.iter().copied().collect();
    let released: Vec<Released> = successors
        .iter()
        .map(|s| {
            let offsets: OffsetSet = s.offsets.iter().copied().collect();
            terminal.remove_all(&offsets);
            Released {
                offsets,
                attempt: s.attempt,
                requeues: s.requeues,
            }
        })
        .collect();
    for s in &successors {
        tracing::info!(batch = %batch.id, successor = %s.id, requests = s.len(), attempt = s.attempt, requeues = s.requeues, reason, "requests handed to a new batch");
    }
    let extra = Phased {
        terminal: Some(terminal.clone()),
        released,
        ..Phased::default()
    };
    let confirmed = match record(ctx, batch, Phase::Done, extra, abandon).await {
        Some(at) => confirm(ctx, batch, at, abandon).await,
        None => false,
    };
    if !confirmed {
        successors.iter().for_each(SealedBatch::remove_files);
        return None;
    }
    crate::crash_point!("before_commit");
    for s in &successors {
        ctx.metrics
            .requests_resubmitted(&batch.route.provider, reason, s.len());
    }
    let mut offsets = ctx.offsets.lock().expect("offset tracker lock");
    for &o in batch.offsets.iter().filter(|&&o| terminal.contains(o)) {
        offsets.complete(batch.partition, o);
    }
    Some(successors)
}

/// Where a batch's results come from.
enum Outcome<'a> {
    /// The ended provider batch's result files.
    Collect(&'a ProviderBatch),
    /// One status and error for every request.
    All(Status, ErrorInfo),
}

/// Publishes the batch's results (retrying until delivered or abandoned),
/// records `done`, then releases its offsets and deletes its input file.
/// Returns the batches its retried requests go to, or `None` if it stopped
/// before `done` was durable.
async fn finish(
    ctx: &BatchContext,
    collect_ctx: &CollectContext<'_>,
    batch: &SealedBatch,
    input_file: Option<String>,
    outcome: Outcome<'_>,
    abandon: &CancellationToken,
) -> Option<Vec<SealedBatch>> {
    // Held until the `done` is confirmed and the offsets released: a
    // revocation waits for it.
    let Some(_collecting) = ctx.journal.collecting(batch.partition) else {
        tracing::info!(batch = %batch.id, "partition being handed over; leaving the collection to its new owner");
        return None;
    };
    if let Some(status) = collect_ctx.status {
        status.set_phase(BatchPhase::Collecting);
    }
    let mut attempt = 0;
    let mut collected = loop {
        let published = match &outcome {
            Outcome::Collect(pb) => collector::collect(collect_ctx, batch, pb).await,
            Outcome::All(status, error) => {
                collector::fail_all(collect_ctx, batch, *status, error.clone()).await
            }
        };
        match published {
            Ok(c) => break c,
            Err(e) => {
                tracing::error!(batch = %batch.id, error = %e, "publishing results failed; retrying");
                attempt += 1;
                let wait = ctx.retry.backoff(attempt);
                if !sleep_or_abandon(wait, abandon).await {
                    return None;
                }
            }
        }
    };
    ctx.budget.spend(collected.cost_usd);
    let mut groups = Vec::new();
    if !collected.retry.is_empty() {
        let picks = std::mem::take(&mut collected.retry);
        let attempt = batch.attempt + u32::from(collected.retry_spends_attempt);
        groups.push((picks, attempt, batch.requeues));
    }
    let reason = if collected.retry_spends_attempt {
        "retry"
    } else {
        "failed_lines"
    };
    let successors = hand_off(ctx, batch, groups, reason, abandon).await?;
    ctx.metrics.results_published(&batch.route, &collected);
    let published: u64 = collected.by_status.values().sum();
    tracing::info!(batch = %batch.id, published, resubmitted = batch.len() as u64 - published, cost_usd = collected.cost_usd, "batch done");
    if let Some(f) = input_file {
        delete_file(collect_ctx.provider, Some(&f)).await;
    }
    Some(successors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(status: u16, kind: Option<&str>, message: &str) -> ProviderError {
        ProviderError::Http {
            provider: "p".into(),
            op: "create".into(),
            status,
            kind: kind.map(str::to_owned),
            message: message.into(),
            retry_after: Some(Duration::from_secs(2)),
        }
    }

    #[test]
    fn size_failures_split_and_named_lines_do_not() {
        let failed = |code: &str, line: Option<u64>| ProviderBatch {
            id: "batch_1".into(),
            state: BatchState::Failed,
            counts: RequestCounts::default(),
            input_file_id: None,
            output_file_id: None,
            error_file_id: None,
            errors: vec![crate::provider::BatchError {
                code: code.into(),
                message: "m".into(),
                line,
            }],
            tag: None,
            created_at: None,
            ended_at: None,
        };
        assert!(too_large(&failed("token_limit_exceeded", None)).is_some());
        assert!(too_large(&failed("too_many_tasks", Some(50_001))).is_some());
        assert!(too_large(&failed("invalid_value", Some(3))).is_none());
        assert!(too_large(&failed("invalid_request", None)).is_none());
        let mut completed = failed("token_limit_exceeded", None);
        completed.state = BatchState::Completed;
        assert!(too_large(&completed).is_none());
    }

    #[test]
    fn refusals_follow_the_design() {
        assert_eq!(
            classify_refusal(&http(429, Some("rate_limit_exceeded"), "")),
            Refusal::RetryAfter(Some(Duration::from_secs(2)))
        );
        assert_eq!(
            classify_refusal(&http(429, Some("insufficient_quota"), "")),
            Refusal::HoldRoute
        );
        assert_eq!(
            classify_refusal(&http(401, Some("invalid_api_key"), "")),
            Refusal::HoldRoute
        );
        assert_eq!(classify_refusal(&http(403, None, "")), Refusal::HoldRoute);
        assert_eq!(
            classify_refusal(&http(
                400,
                Some("invalid_request_error"),
                "Cannot find file file-1."
            )),
            Refusal::RetryAfter(Some(Duration::from_secs(2)))
        );
        assert_eq!(
            classify_refusal(&http(400, Some("invalid_request_error"), "bad endpoint")),
            Refusal::Fail
        );
    }
}
