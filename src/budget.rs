//! The daily spending cap, `budget.max_usd_per_day`.
//!
//! Before a batch is submitted its cost is estimated: about four bytes of
//! batch input a prompt token, and each request's own output cap
//! (`max_tokens`, `max_completion_tokens`, `max_output_tokens`, times `n`),
//! or `budget.default_output_tokens` for a request that sets none, at the
//! route's batch price. The batch is admitted when today's spend, plus the
//! estimates of the batches admitted and not yet collected, plus its own
//! estimate, stays within the cap. Otherwise it waits, before its `intent`
//! and so unsent, until 00:00 UTC, until the cap is raised
//! (`PUT /v1/budget`), or until a collection comes in below its estimate.
//! While any batch waits, ingest pauses consumption, `/readyz` says why and
//! `batchline_budget_held_batches` counts them. No request is ever dropped
//! for the budget: a batch still waiting at shutdown or hand-over is left
//! to the input topic like any unsubmitted window.
//!
//! The ledger is this instance's, since it started: spend is not shared
//! between instances nor kept across a restart (the cost of every result is
//! in `batchline_cost_usd_total` and on the result itself).

use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::collector::Pricing;
use crate::metrics::Metrics;
use crate::model::Usage;
use crate::packer::{OutputCaps, Route};

const DAY_SECS: u64 = 86_400;

/// Prompt tokens are estimated at one per this many bytes of batch input.
const BYTES_PER_TOKEN: u64 = 4;

/// `GET /v1/budget`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetView {
    /// The cap in force; `null` when there is none.
    pub max_usd_per_day: Option<f64>,
    /// The UTC day the spend counts for, `YYYY-MM-DD`.
    pub day: String,
    /// Cost of the results this instance collected today.
    pub spent_usd: f64,
    /// Estimated cost of the batches admitted and not yet collected.
    pub reserved_usd: f64,
    /// Batches waiting for the budget.
    pub held_batches: usize,
    /// When the day's spend starts again from zero (RFC 3339, UTC).
    pub resets_at: String,
}

/// `PUT /v1/budget`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetUpdate {
    /// The new cap; `null` removes it. Required: `{}` is not "no cap".
    #[serde(deserialize_with = "Option::deserialize")]
    pub max_usd_per_day: Option<f64>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("max_usd_per_day must be a finite number of at least 0, not {0}")]
pub struct InvalidLimit(pub f64);

#[derive(Debug)]
struct Ledger {
    limit: Option<f64>,
    /// Days since the Unix epoch, UTC.
    day: u64,
    spent: f64,
    reserved: f64,
    /// Reservations outstanding: at none, `reserved` is exactly 0 again,
    /// whatever rounding the sums left.
    reservations: usize,
}

/// The ledger of one instance; shared by every batch task and the HTTP API.
pub struct Budget {
    ledger: Mutex<Ledger>,
    /// Batches waiting for admission; read by ingest without the lock.
    held: AtomicUsize,
    changed: Notify,
    default_output_tokens: u64,
    /// Also records the readiness reason.
    metrics: Metrics,
}

fn utc_day(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() / DAY_SECS
}

/// The start of the UTC day after the one `now` is in.
fn next_midnight(now: SystemTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs((utc_day(now) + 1) * DAY_SECS)
}

fn format_day(day: u64) -> String {
    let t = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(day * DAY_SECS));
    t.to_string()[..10].to_owned()
}

impl Budget {
    pub fn new(limit: Option<f64>, default_output_tokens: u64, metrics: Metrics) -> Budget {
        let budget = Budget {
            ledger: Mutex::new(Ledger {
                limit,
                day: utc_day(SystemTime::now()),
                spent: 0.0,
                reserved: 0.0,
                reservations: 0,
            }),
            held: AtomicUsize::new(0),
            changed: Notify::new(),
            default_output_tokens,
            metrics,
        };
        budget.publish(&budget.lock(), SystemTime::now());
        budget
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().expect("budget lock")
    }

    /// The ledger as of `now`: a new UTC day starts from zero spend.
    /// Reservations carry over: those batches are still to be paid.
    fn roll(ledger: &mut Ledger, now: SystemTime) {
        let day = utc_day(now);
        if day != ledger.day {
            ledger.day = day;
            ledger.spent = 0.0;
        }
    }

    /// Metrics and readiness after a change.
    fn publish(&self, ledger: &Ledger, now: SystemTime) {
        let held = self.held.load(Ordering::SeqCst);
        self.metrics
            .budget(ledger.limit, ledger.spent, ledger.reserved, held);
        let why = (held > 0).then(|| {
            format!(
                "{held} batch(es) wait for the daily budget: {:.4} USD spent and {:.4} USD reserved of {} today; submission resumes at {} or when the budget is raised",
                ledger.spent,
                ledger.reserved,
                ledger
                    .limit
                    .map_or_else(|| "no cap".to_owned(), |l| format!("{l:.4} USD")),
                humantime::format_rfc3339_seconds(next_midnight(now)),
            )
        });
        self.metrics.readiness().budget_held(why);
    }

    /// The estimated cost of a batch of `route` with `input_bytes` of batch
    /// input and these output caps; 0 for an unpriced model (whose results
    /// carry no cost either).
    pub fn estimate(
        &self,
        pricing: &Pricing,
        route: &Route,
        input_bytes: u64,
        caps: OutputCaps,
    ) -> f64 {
        let usage = Usage {
            input_tokens: input_bytes.div_ceil(BYTES_PER_TOKEN),
            output_tokens: caps.tokens + caps.uncapped * self.default_output_tokens,
            ..Usage::default()
        };
        pricing
            .cost(&route.provider, &route.model, &usage)
            .unwrap_or(0.0)
    }

    /// Reserves `estimate` if it fits today's budget at `now`.
    fn try_reserve(&self, estimate: f64, now: SystemTime) -> bool {
        let mut ledger = self.lock();
        Self::roll(&mut ledger, now);
        let fits = ledger
            .limit
            .is_none_or(|limit| ledger.spent + ledger.reserved + estimate <= limit);
        if fits {
            ledger.reserved += estimate;
            ledger.reservations += 1;
            self.publish(&ledger, now);
        }
        fits
    }

    /// Waits until a batch estimated at `estimate` USD fits the budget and
    /// reserves it; `None` if `abandon` fires first.
    pub async fn admit(
        self: &Arc<Self>,
        estimate: f64,
        abandon: &CancellationToken,
    ) -> Option<Reservation> {
        let mut hold: Option<Hold<'_>> = None;
        loop {
            let mut changed = pin!(self.changed.notified());
            changed.as_mut().enable();
            let now = SystemTime::now();
            if self.try_reserve(estimate, now) {
                drop(hold);
                return Some(Reservation {
                    budget: self.clone(),
                    estimate,
                });
            }
            if hold.is_none() {
                hold = Some(self.hold(estimate, now));
            }
            let midnight = next_midnight(now).duration_since(now).unwrap_or_default();
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep(midnight) => {}
                _ = abandon.cancelled() => return None,
            }
        }
    }

    fn hold(&self, estimate: f64, now: SystemTime) -> Hold<'_> {
        self.held.fetch_add(1, Ordering::SeqCst);
        let ledger = self.lock();
        match ledger.limit {
            Some(limit) if estimate > limit => tracing::error!(
                estimate_usd = estimate,
                max_usd_per_day = limit,
                "a batch's estimated cost exceeds the whole daily budget; it waits until the budget is raised"
            ),
            _ => tracing::warn!(
                estimate_usd = estimate,
                spent_usd = ledger.spent,
                reserved_usd = ledger.reserved,
                max_usd_per_day = ledger.limit,
                "daily budget reached; holding submission and pausing consumption"
            ),
        }
        self.publish(&ledger, now);
        Hold { budget: self }
    }

    /// Adds the cost of a collected batch to today's spend.
    pub fn spend(&self, usd: f64) {
        let now = SystemTime::now();
        let mut ledger = self.lock();
        Self::roll(&mut ledger, now);
        ledger.spent += usd;
        self.publish(&ledger, now);
        drop(ledger);
        self.changed.notify_waiters();
    }

    /// Sets or removes the cap.
    pub fn set_limit(&self, limit: Option<f64>) -> Result<BudgetView, InvalidLimit> {
        if let Some(l) = limit {
            if !l.is_finite() || l < 0.0 {
                return Err(InvalidLimit(l));
            }
        }
        let now = SystemTime::now();
        let mut ledger = self.lock();
        Self::roll(&mut ledger, now);
        tracing::info!(old = ?ledger.limit, new = ?limit, "daily budget changed");
        ledger.limit = limit;
        self.publish(&ledger, now);
        drop(ledger);
        self.changed.notify_waiters();
        Ok(self.view())
    }

    /// Whether any batch waits for the budget.
    pub fn holding(&self) -> bool {
        self.held.load(Ordering::SeqCst) > 0
    }

    pub fn view(&self) -> BudgetView {
        let now = SystemTime::now();
        let mut ledger = self.lock();
        Self::roll(&mut ledger, now);
        BudgetView {
            max_usd_per_day: ledger.limit,
            day: format_day(ledger.day),
            spent_usd: ledger.spent,
            reserved_usd: ledger.reserved,
            held_batches: self.held.load(Ordering::SeqCst),
            resets_at: humantime::format_rfc3339_seconds(next_midnight(now)).to_string(),
        }
    }
}

/// A batch waiting for admission, counted while it lives.
struct Hold<'a> {
    budget: &'a Budget,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(1, Ordering::SeqCst);
        let ledger = self.budget.lock();
        self.budget.publish(&ledger, SystemTime::now());
    }
}

/// An admitted batch's estimate, reserved until it drops (after the
/// batch's cost was spent, or when its work is abandoned).
pub struct Reservation {
    budget: Arc<Budget>,
    estimate: f64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut ledger = self.budget.lock();
        ledger.reservations -= 1;
        ledger.reserved = if ledger.reservations == 0 {
            0.0
        } else {
            (ledger.reserved - self.estimate).max(0.0)
        };
        self.budget.publish(&ledger, SystemTime::now());
        drop(ledger);
        self.budget.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(limit: Option<f64>) -> Arc<Budget> {
        Arc::new(Budget::new(limit, 1000, Metrics::new()))
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn days_are_utc_and_midnight_is_the_next_one() {
        assert_eq!(utc_day(at(DAY_SECS * 20_000 + 5)), 20_000);
        assert_eq!(
            next_midnight(at(DAY_SECS * 20_000 + 5)),
            at(DAY_SECS * 20_001)
        );
        assert_eq!(next_midnight(at(DAY_SECS * 20_000)), at(DAY_SECS * 20_001));
        assert_eq!(format_day(20_000), "2024-10-04");
    }

    #[test]
    fn spend_plus_reservations_plus_estimate_must_fit() {
        let b = budget(Some(10.0));
        let now = SystemTime::now();
        assert!(b.try_reserve(6.0, now));
        assert!(!b.try_reserve(5.0, now), "6 reserved + 5 > 10");
        assert!(b.try_reserve(4.0, now), "6 + 4 fits exactly");
        {
            let mut ledger = b.lock();
            ledger.reserved = 0.0;
            ledger.reservations = 0;
        }
        b.spend(9.5);
        assert!(!b.try_reserve(1.0, now));
        assert!(b.try_reserve(0.5, now));
    }

    #[test]
    fn a_new_utc_day_forgets_spend_but_not_reservations() {
        let b = budget(Some(10.0));
        let today = SystemTime::now();
        assert!(b.try_reserve(3.0, today));
        b.spend(7.0);
        assert!(!b.try_reserve(1.0, today));
        let tomorrow = next_midnight(today);
        assert!(!b.try_reserve(8.0, tomorrow), "3 still reserved");
        assert!(b.try_reserve(7.0, tomorrow));
    }

    #[test]
    fn no_cap_admits_anything_and_bad_caps_are_refused() {
        let b = budget(None);
        assert!(b.try_reserve(1e9, SystemTime::now()));
        assert_eq!(b.set_limit(Some(-1.0)), Err(InvalidLimit(-1.0)));
        assert!(b.set_limit(Some(f64::NAN)).is_err());
        assert_eq!(b.set_limit(Some(5.0)).unwrap().max_usd_per_day, Some(5.0));
    }

    #[tokio::test]
    async fn a_held_batch_waits_until_the_cap_is_raised_and_says_why() {
        let b = budget(Some(1.0));
        let first = b.admit(0.8, &CancellationToken::new()).await.unwrap();
        let waiting = {
            let b = b.clone();
            tokio::spawn(async move { b.admit(0.5, &CancellationToken::new()).await })
        };
        while !b.holding() {
            tokio::task::yield_now().await;
        }
        let reasons = b.metrics.readiness().reasons();
        assert!(
            reasons
                .iter()
                .any(|r| r.starts_with("budget: 1 batch(es) wait")),
            "{reasons:?}"
        );
        b.set_limit(Some(2.0)).unwrap();
        let second = waiting.await.unwrap().expect("admitted");
        assert!(!b.holding());
        assert!(b
            .metrics
            .readiness()
            .reasons()
            .iter()
            .all(|r| !r.starts_with("budget")));
        assert!((b.view().reserved_usd - 1.3).abs() < 1e-9);
        drop(first);
        assert!((b.view().reserved_usd - 0.5).abs() < 1e-9);
        drop(second);
        assert_eq!(b.view().reserved_usd, 0.0);
    }

    #[tokio::test]
    async fn a_collection_below_its_estimate_frees_room() {
        let b = budget(Some(1.0));
        let first = b.admit(0.9, &CancellationToken::new()).await.unwrap();
        let waiting = {
            let b = b.clone();
            tokio::spawn(async move { b.admit(0.5, &CancellationToken::new()).await })
        };
        while !b.holding() {
            tokio::task::yield_now().await;
        }
        b.spend(0.2);
        drop(first);
        let _second = waiting.await.unwrap().expect("admitted");
        let view = b.view();
        assert!((view.spent_usd - 0.2).abs() < 1e-9);
        assert!((view.reserved_usd - 0.5).abs() < 1e-9);
    }

    #[tokio::test]
    async fn an_abandoned_wait_is_no_longer_held() {
        let b = budget(Some(0.0));
        let abandon = CancellationToken::new();
        let waiting = {
            let (b, abandon) = (b.clone(), abandon.clone());
            tokio::spawn(async move { b.admit(0.1, &abandon).await.is_none() })
        };
        while !b.holding() {
            tokio::task::yield_now().await;
        }
        abandon.cancel();
        assert!(waiting.await.unwrap());
        assert!(!b.holding());
        assert_eq!(b.view().reserved_usd, 0.0);
    }

    #[test]
    fn the_estimate_prices_prompt_bytes_and_output_caps() {
        let b = budget(None);
        let mut table = std::collections::BTreeMap::new();
        table.insert(
            "openai".to_owned(),
            [(
                "m".to_owned(),
                crate::config::Price {
                    input_per_mtok: 1.0,
                    output_per_mtok: 4.0,
                    batch_discount: 0.5,
                },
            )]
            .into_iter()
            .collect(),
        );
        let pricing = Pricing::new(&table);
        let route = crate::status::tests::route("openai", "m");
        let caps = OutputCaps {
            tokens: 500_000,
            uncapped: 500,
        };
        // 1M prompt tokens at 1 USD, (500k + 500 x 1000) output at 4 USD, halved.
        let usd = b.estimate(&pricing, &route, 4_000_000, caps);
        assert!((usd - 2.5).abs() < 1e-9, "{usd}");
        let unpriced = crate::status::tests::route("openai", "other");
        assert_eq!(b.estimate(&pricing, &unpriced, 4_000_000, caps), 0.0);
    }
}
