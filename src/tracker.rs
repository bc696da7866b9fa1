//! Polls an in-flight provider batch until it ends, enforcing batchline's
//! own deadline: past `batch.deadline`, or when an operator asks through the
//! status API, the batch is cancelled and then collected like any other.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::provider::{Provider, ProviderBatch};
use crate::status::Registration;

/// How tracking a batch ended.
#[derive(Debug)]
pub enum Tracked {
    /// The batch reached a terminal state.
    Ended(Box<ProviderBatch>),
    /// The provider kept answering 404 for longer than the lookup grace.
    NotFound,
    /// Work was abandoned (shutdown deadline): nothing is known.
    Abandoned,
}

pub struct TrackOptions {
    pub poll_interval: Duration,
    /// When batchline cancels the batch itself.
    pub deadline: Instant,
    /// How long a 404 is taken as listing lag rather than absence.
    pub not_found_grace: Duration,
    pub max_backoff: Duration,
}

/// Polls `pb` until it ends. With a `status` registration, every answer is
/// shown in the status API, and a cancel asked there is sent like the
/// deadline's.
pub async fn track(
    provider: &dyn Provider,
    mut pb: ProviderBatch,
    opts: &TrackOptions,
    abandon: &CancellationToken,
    status: Option<&Registration>,
) -> Tracked {
    let never = CancellationToken::new();
    let cancel_requested = status.map_or(&never, |s| s.cancel_requested());
    let mut cancel_sent = false;
    let mut first_404: Option<Instant> = None;
    let mut wait = opts.poll_interval;
    loop {
        if let Some(s) = status {
            s.observe(&pb);
        }
        if pb.state.is_terminal() {
            return Tracked::Ended(Box::new(pb));
        }
        let past_deadline = Instant::now() >= opts.deadline;
        if !cancel_sent && (past_deadline || cancel_requested.is_cancelled()) {
            let why = if past_deadline {
                "batch passed batch.deadline"
            } else {
                "cancel requested through the status API"
            };
            tracing::warn!(provider = provider.name(), batch = %pb.id, "{why}; cancelling");
            match provider.cancel(&pb.id).await {
                Ok(b) => {
                    cancel_sent = true;
                    pb = b;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(provider = provider.name(), batch = %pb.id, error = %e, "cancel failed; will retry")
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            // Wakes once, when the cancel is asked; a failed cancel is
            // retried at the poll interval.
            _ = cancel_requested.cancelled(), if !cancel_requested.is_cancelled() => continue,
            _ = abandon.cancelled() => return Tracked::Abandoned,
        }
        crate::crash_point!("while_polling");
        match provider.status(&pb.id).await {
            Ok(b) => {
                first_404 = None;
                wait = opts.poll_interval;
                pb = b;
            }
            Err(e) if e.status() == Some(404) => {
                let since = *first_404.get_or_insert_with(Instant::now);
                if since.elapsed() >= opts.not_found_grace {
                    return Tracked::NotFound;
                }
            }
            Err(e) => {
                wait = (wait * 2).min(opts.max_backoff.max(opts.poll_interval));
                tracing::warn!(provider = provider.name(), batch = %pb.id, error = %e, "polling batch failed; backing off");
            }
        }
    }
}
