//! Runs each sealed batch through its life: admission, upload, create,
//! tracking, collection, and finally the release of its offsets.
//!
//! A create is never retried on an ambiguous failure (timeout, reset, 408,
//! 409, 5xx): the input file is deleted first, so a create still in flight
//! anywhere fails, and the batch is then looked up by its tag. Definite
//! refusals follow DESIGN.md "Creates are not idempotent".

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::collector::{self, CollectContext, Pricing};
use crate::config::{BatchConfig, RetryConfig};
use crate::ingest::Backlog;
use crate::metrics::Metrics;
use crate::model::{ErrorInfo, Status};
use crate::offsets::OffsetTracker;
use crate::packer::SealedBatch;
use crate::provider::{BatchState, CreateError, Provider, ProviderBatch, ProviderError};
use crate::publisher::Publisher;
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
    /// Provider batch ids this instance created or adopted: never a
    /// candidate for another batch's ambiguous create.
    pub known_batches: Mutex<HashSet<String>>,
}

impl BatchContext {
    fn owns(&self, provider_batch: &str) -> bool {
        self.known_batches
            .lock()
            .expect("known batches lock")
            .contains(provider_batch)
    }

    fn claim(&self, provider_batch: &str) -> bool {
        self.known_batches
            .lock()
            .expect("known batches lock")
            .insert(provider_batch.to_owned())
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
                        let ctx = self.ctx.clone();
                        let abandon = abandon.clone();
                        tasks.spawn(async move { run_batch(ctx, batch, abandon).await });
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

/// How submission ended.
enum Submission {
    /// `adopted`: found by lookup after an ambiguous create.
    Created {
        pb: ProviderBatch,
        adopted: bool,
    },
    /// The provider refused the batch for good: every request errors.
    Refused(ErrorInfo),
    Abandoned,
}

/// What a definite create refusal calls for.
#[derive(Debug, PartialEq)]
enum Refusal {
    /// Send the same create again after this long.
    RetryAfter(Option<Duration>),
    /// Credentials or quota: hold the requests and retry with backoff.
    HoldRoute,
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
async fn submit(
    ctx: &BatchContext,
    provider: &dyn Provider,
    batch: &SealedBatch,
    abandon: &CancellationToken,
) -> Submission {
    let backoff = |attempt: u32| {
        ctx.retry
            .initial_backoff
            .saturating_mul(1 << attempt.min(16))
            .min(ctx.retry.max_backoff)
    };
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
            if abandon.is_cancelled() {
                delete_file(provider, file_id.as_deref()).await;
                return Submission::Abandoned;
            }
            match provider.create(batch, file_id.as_deref()).await {
                Ok(pb) => {
                    ctx.claim(&pb.id);
                    ctx.metrics.route_ok(provider.name());
                    crate::crash_point!("after_create");
                    return Submission::Created { pb, adopted: false };
                }
                Err(CreateError::Refused(e)) => {
                    let action = classify_refusal(&e);
                    tracing::warn!(provider = provider.name(), batch = %batch.id, error = %e, ?action, "create refused");
                    let wait = match action {
                        Refusal::Fail => {
                            delete_file(provider, file_id.as_deref()).await;
                            return Submission::Refused(e.error_info());
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
                    tracing::warn!(provider = provider.name(), batch = %batch.id, error = %e, "create outcome unknown; resolving by lookup");
                    ctx.metrics.ambiguous_create(provider.name());
                    match resolve_ambiguous(ctx, provider, batch, file_id.as_deref(), abandon).await
                    {
                        Some(Some(pb)) => return Submission::Created { pb, adopted: true },
                        Some(None) => continue 'upload,
                        None => return Submission::Abandoned,
                    }
                }
            }
        }
    }
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
                attempt += 1;
                let wait = ctx
                    .retry
                    .initial_backoff
                    .saturating_mul(1 << attempt.min(16))
                    .min(ctx.retry.max_backoff);
                if !sleep_or_abandon(wait, abandon).await {
                    return None;
                }
            }
        }
    };
    for candidate in candidates.into_iter().filter(|c| !ctx.owns(&c.id)) {
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
            if ctx.claim(&pb.id) {
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
    let pb = match tracker::track(provider, candidate, &opts, abandon).await {
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
            if batch.read_meta(&meta, i)?.custom_id != outcome.custom_id
                || std::mem::replace(&mut seen[i], true)
            {
                return Ok(false);
            }
        }
    }
    Ok(seen.iter().all(|s| *s))
}

async fn delete_file(provider: &dyn Provider, file_id: Option<&str>) {
    if let Some(id) = file_id {
        if let Err(e) = provider.delete_file(id).await {
            tracing::warn!(provider = provider.name(), file = id, error = %e, "deleting provider file failed");
        }
    }
}

/// One batch, from sealed window to released offsets.
async fn run_batch(ctx: Arc<BatchContext>, batch: SealedBatch, abandon: CancellationToken) {
    let Some(slot) = ctx.providers.get(&*batch.route.provider) else {
        // Ingest only routes to enabled providers; this is a bug, not input.
        tracing::error!(batch = %batch.id, provider = %batch.route.provider, "batch for an unconfigured provider");
        return;
    };
    let provider = slot.provider.as_ref();
    let permit = tokio::select! {
        p = slot.in_flight.clone().acquire_owned() => p.expect("semaphores are never closed"),
        _ = abandon.cancelled() => return,
    };
    let started = Instant::now();
    let collect_ctx = CollectContext {
        provider,
        metrics: &ctx.metrics,
        publisher: &ctx.publisher,
        pricing: &ctx.pricing,
        spool_dir: &ctx.spool_dir,
    };
    let (input_file, tracked) = loop {
        let (pb, adopted) = match submit(&ctx, provider, &batch, &abandon).await {
            Submission::Abandoned => return,
            Submission::Refused(error) => {
                tracing::error!(batch = %batch.id, error = %error.message, "provider refused the batch; every request errors");
                finish(
                    &ctx,
                    &collect_ctx,
                    &batch,
                    None,
                    Outcome::All(Status::Errored, error),
                    &abandon,
                )
                .await;
                return;
            }
            Submission::Created { pb, adopted } => (pb, adopted),
        };
        tracing::info!(batch = %batch.id, provider_batch = %pb.id, requests = batch.len(), bytes = batch.input_bytes, adopted, "batch submitted");
        ctx.metrics
            .batch_submitted(&batch.route, batch.len(), batch.input_bytes);
        let opts = TrackOptions {
            poll_interval: slot.poll_interval,
            deadline: batch.opened_at + ctx.batch.deadline,
            not_found_grace: ctx.batch.lookup_grace,
            max_backoff: ctx.retry.max_backoff,
        };
        let input_file = pb.input_file_id.clone();
        let tracked = tracker::track(provider, pb, &opts, &abandon).await;
        if let Tracked::Ended(pb) = &tracked {
            // An adopted batch whose input file we deleted to fence the
            // create may fail validation: nothing ran, so submit again.
            if adopted
                && pb.state == BatchState::Failed
                && pb.counts.completed == 0
                && pb.output_file_id.is_none()
            {
                tracing::warn!(batch = %batch.id, provider_batch = %pb.id, "adopted batch failed before any request ran; submitting again");
                ctx.metrics
                    .batch_ended(&batch.route, pb.state.as_str(), started.elapsed());
                continue;
            }
        }
        break (input_file, tracked);
    };
    drop(permit);
    match tracked {
        Tracked::Abandoned => {}
        Tracked::NotFound => {
            let error = ErrorInfo::new(
                "batch_not_found",
                format!("the provider no longer knows the batch of {}", batch.id),
            );
            finish(
                &ctx,
                &collect_ctx,
                &batch,
                input_file,
                Outcome::All(Status::Errored, error),
                &abandon,
            )
            .await;
        }
        Tracked::Ended(pb) => {
            tracing::info!(batch = %batch.id, provider_batch = %pb.id, state = pb.state.as_str(), secs = started.elapsed().as_secs_f64(), "batch ended");
            ctx.metrics
                .batch_ended(&batch.route, pb.state.as_str(), started.elapsed());
            let files: Vec<String> = [pb.output_file_id.clone(), pb.error_file_id.clone()]
                .into_iter()
                .flatten()
                .collect();
            finish(
                &ctx,
                &collect_ctx,
                &batch,
                input_file,
                Outcome::Collect(&pb),
                &abandon,
            )
            .await;
            for f in files {
                delete_file(provider, Some(&f)).await;
            }
        }
    }
}

/// Where a batch's results come from.
enum Outcome<'a> {
    /// The ended provider batch's result files.
    Collect(&'a ProviderBatch),
    /// One status and error for every request.
    All(Status, ErrorInfo),
}

/// Publishes the batch's results (retrying until delivered or abandoned),
/// then releases its offsets, held load and files.
async fn finish(
    ctx: &BatchContext,
    collect_ctx: &CollectContext<'_>,
    batch: &SealedBatch,
    input_file: Option<String>,
    outcome: Outcome<'_>,
    abandon: &CancellationToken,
) {
    let mut attempt = 0;
    let collected = loop {
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
                let wait = ctx
                    .retry
                    .initial_backoff
                    .saturating_mul(1 << attempt.min(16))
                    .min(ctx.retry.max_backoff);
                if !sleep_or_abandon(wait, abandon).await {
                    return;
                }
            }
        }
    };
    crate::crash_point!("before_commit");
    {
        let mut offsets = ctx.offsets.lock().expect("offset tracker lock");
        for &o in &batch.offsets {
            offsets.complete(batch.partition, o);
        }
    }
    ctx.metrics.results_published(&batch.route, &collected);
    ctx.backlog.release(batch.len() as u64, batch.input_bytes);
    batch.remove_files();
    if let Some(f) = input_file {
        delete_file(collect_ctx.provider, Some(&f)).await;
    }
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
