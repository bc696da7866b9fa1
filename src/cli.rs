//! `batchline status` and `batchline cancel`: clients of a running
//! instance's status API. They read its JSON and print tables; they never
//! touch Kafka or a provider themselves, and never print the bearer token.

use std::fmt::Write as _;
use std::time::Duration;

use crate::budget::{BudgetUpdate, BudgetView};
use crate::config::ApiKey;
use crate::status::{BatchList, BatchPhase, CancelAccepted};

#[derive(Debug, thiserror::Error)]
pub enum StatusApiError {
    #[error("`{url}` is not a status API URL: {message}")]
    Url { url: String, message: String },
    #[error("calling the status API at {url}: {message}")]
    Request { url: String, message: String },
    #[error("the status API at {url} answered {status}: {message}")]
    Refused {
        url: String,
        status: u16,
        message: String,
    },
    #[error("reading the status API's answer from {url}: {message}")]
    Decode { url: String, message: String },
}

/// The status API's URL for an instance listening on `listen`
/// (`http.listen`): a wildcard address is reached on loopback.
pub fn default_url(listen: &str) -> String {
    let listen = listen.trim();
    let local = if let Some(port) = listen.strip_prefix("0.0.0.0:") {
        format!("127.0.0.1:{port}")
    } else if let Some(port) = listen.strip_prefix("[::]:") {
        format!("[::1]:{port}")
    } else {
        listen.to_owned()
    };
    format!("http://{local}")
}

/// A client of one instance's status API.
pub struct StatusApi {
    base: reqwest::Url,
    token: Option<ApiKey>,
    client: reqwest::Client,
}

impl StatusApi {
    pub fn new(url: &str, token: Option<ApiKey>) -> Result<StatusApi, StatusApiError> {
        let url_err = |message: String| StatusApiError::Url {
            url: url.to_owned(),
            message,
        };
        let base = reqwest::Url::parse(url).map_err(|e| url_err(e.to_string()))?;
        if base.cannot_be_a_base() || !matches!(base.scheme(), "http" | "https") {
            return Err(url_err("use http://host:port".into()));
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .user_agent(concat!("batchline/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| url_err(e.to_string()))?;
        Ok(StatusApi {
            base,
            token,
            client,
        })
    }

    /// `base` + `/v1/batches` + `segments`, each segment escaped.
    fn url(&self, segments: &[&str]) -> reqwest::Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("checked in new()")
            .pop_if_empty()
            .extend(["v1", "batches"])
            .extend(segments);
        url
    }

    fn budget_url(&self) -> reqwest::Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("checked in new()")
            .pop_if_empty()
            .extend(["v1", "budget"]);
        url
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        url: &reqwest::Url,
    ) -> Result<T, StatusApiError> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token.expose()),
            None => request,
        };
        let url = url.to_string();
        let response = request.send().await.map_err(|e| StatusApiError::Request {
            url: url.clone(),
            message: error_chain(e),
        })?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| StatusApiError::Request {
                url: url.clone(),
                message: error_chain(e),
            })?;
        if !status.is_success() {
            return Err(StatusApiError::Refused {
                url,
                status: status.as_u16(),
                message: error_message(&body),
            });
        }
        serde_json::from_slice(&body).map_err(|e| StatusApiError::Decode {
            url,
            message: e.to_string(),
        })
    }

    /// `GET /v1/batches`.
    pub async fn batches(&self) -> Result<BatchList, StatusApiError> {
        let url = self.url(&[]);
        self.call(self.client.get(url.clone()), &url).await
    }

    /// `POST /v1/batches/{id}/cancel`.
    pub async fn cancel(&self, id: &str) -> Result<CancelAccepted, StatusApiError> {
        let url = self.url(&[id, "cancel"]);
        self.call(self.client.post(url.clone()), &url).await
    }

    /// `GET /v1/budget`.
    pub async fn budget(&self) -> Result<BudgetView, StatusApiError> {
        let url = self.budget_url();
        self.call(self.client.get(url.clone()), &url).await
    }

    /// `PUT /v1/budget`.
    pub async fn set_budget(
        &self,
        max_usd_per_day: Option<f64>,
    ) -> Result<BudgetView, StatusApiError> {
        let url = self.budget_url();
        let update = BudgetUpdate { max_usd_per_day };
        self.call(self.client.put(url.clone()).json(&update), &url)
            .await
    }
}

/// What `batchline budget` prints.
pub fn format_budget(b: &BudgetView) -> String {
    let cap = match b.max_usd_per_day {
        Some(max) => format!("{max:.2} USD a day"),
        None => "no daily cap".to_owned(),
    };
    let mut out = format!(
        "budget: {cap}\n{}: spent {:.4} USD, reserved {:.4} USD for batches in flight\n",
        b.day, b.spent_usd, b.reserved_usd
    );
    if b.held_batches > 0 {
        out.push_str(&format!(
            "{} batch(es) wait for the budget; consumption is paused until {} or until the cap is raised\n",
            b.held_batches, b.resets_at
        ));
    }
    out
}

/// `e` and its causes ("error sending request: ...: Connection refused"),
/// without the URL, which the caller names once.
fn error_chain(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    message
}

/// The message of a status API error body, or the body itself (cut short).
fn error_message(body: &[u8]) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    match parsed.as_ref().and_then(|v| v["error"]["message"].as_str()) {
        Some(message) => message.to_owned(),
        None => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            match text.char_indices().nth(200) {
                Some((cut, _)) => format!("{}...", &text[..cut]),
                None if text.is_empty() => "(no body)".to_owned(),
                None => text.to_owned(),
            }
        }
    }
}

/// `3h07m`, `4m05s`, `12s`.
pub fn format_age(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

fn format_cost(usd: f64) -> String {
    format!("${usd:.4}")
}

/// `2 submitted, 1 uploading`, in pipeline order.
fn format_phases(by_phase: &std::collections::BTreeMap<BatchPhase, u64>) -> String {
    BatchPhase::ALL
        .iter()
        .filter_map(|p| {
            by_phase
                .get(p)
                .filter(|n| **n > 0)
                .map(|n| format!("{n} {}", p.as_str()))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `1 batch`, `3 batches`.
fn count_batches(n: u64) -> String {
    format!("{n} batch{}", if n == 1 { "" } else { "es" })
}

/// The table `batchline status` prints: one row per in-flight batch, then
/// the totals.
pub fn format_status(list: &BatchList) -> String {
    const HEADER: [&str; 10] = [
        "ID", "PROVIDER", "MODEL", "PHASE", "STATUS", "REQUESTS", "DONE", "FAILED", "AGE", "COST",
    ];
    // Numbers are right-aligned.
    const RIGHT: [bool; 10] = [
        false, false, false, false, false, true, true, true, true, true,
    ];
    if list.batches.is_empty() {
        return "no batches in flight\n".to_owned();
    }
    let dash = || "-".to_owned();
    let rows: Vec<[String; 10]> = list
        .batches
        .iter()
        .map(|b| {
            let counts = b.request_counts;
            [
                b.id.clone(),
                b.provider.clone(),
                b.model.clone(),
                b.phase.as_str().to_owned(),
                match (&b.provider_status, b.cancel_requested) {
                    (Some(s), false) => s.clone(),
                    (Some(s), true) => format!("{s} (cancel asked)"),
                    (None, _) => dash(),
                },
                b.requests.to_string(),
                counts.map_or_else(dash, |c| c.completed.to_string()),
                counts.map_or_else(dash, |c| c.failed.to_string()),
                format_age(b.age_seconds),
                format_cost(b.cost_usd),
            ]
        })
        .collect();
    let mut widths = HEADER.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header = HEADER.map(str::to_owned);
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .zip(RIGHT)
            .map(|((cell, w), right)| {
                if right {
                    format!("{cell:>w$}")
                } else {
                    format!("{cell:<w$}")
                }
            })
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    let t = &list.totals;
    let _ = writeln!(
        out,
        "\n{} in flight, {} requests, cost so far {}: {}",
        count_batches(t.batches),
        t.requests,
        format_cost(t.cost_usd),
        format_phases(&t.by_phase)
    );
    for (provider, p) in &t.by_provider {
        let _ = writeln!(
            out,
            "  {provider}: {}, {} requests ({})",
            count_batches(p.batches),
            p.requests,
            format_phases(&p.by_phase)
        );
    }
    out
}

/// What `batchline cancel` prints once the cancel is accepted.
pub fn format_cancelled(a: &CancelAccepted) -> String {
    match &a.batch {
        Some(b) => format!(
            "cancel requested for {} ({} batch {}, {} requests); requests that did not run will get `canceled` results\n",
            b.id,
            b.provider,
            b.provider_batch_id.as_deref().unwrap_or("-"),
            b.requests
        ),
        None => format!(
            "cancel for {} written to the journal; the instance that owns its partition cancels it, if it is still in flight\n",
            a.id
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::RequestCounts;
    use crate::status::{BatchView, Totals};

    fn view(id: &str, provider: &str, phase: BatchPhase) -> BatchView {
        BatchView {
            id: id.into(),
            provider: provider.into(),
            model: "gpt-4o-mini".into(),
            endpoint: "/v1/chat/completions".into(),
            partition: 0,
            requests: 1200,
            bytes: 42_000,
            phase,
            provider_batch_id: None,
            provider_status: None,
            request_counts: None,
            age_seconds: 65.4,
            cost_usd: 0.0,
            cancel_requested: false,
        }
    }

    #[test]
    fn ages_read_at_a_glance() {
        assert_eq!(format_age(0.4), "0s");
        assert_eq!(format_age(59.9), "59s");
        assert_eq!(format_age(65.0), "1m05s");
        assert_eq!(format_age(3600.0 * 3.0 + 7.0 * 60.0 + 12.0), "3h07m");
        assert_eq!(format_age(-1.0), "0s");
    }

    #[test]
    fn the_status_table_lines_up_and_ends_with_totals() {
        let mut submitted = view("bl-0-0198f2a4-aaaa", "openai", BatchPhase::Submitted);
        submitted.provider_batch_id = Some("batch_abc".into());
        submitted.provider_status = Some("in_progress".into());
        submitted.request_counts = Some(RequestCounts {
            total: 1200,
            completed: 300,
            failed: 7,
        });
        submitted.cost_usd = 0.01234;
        let mut uploading = view("bl-12-0198f2a4-bbbb", "xai", BatchPhase::Uploading);
        uploading.requests = 3;
        uploading.age_seconds = 4000.0;
        let mut cancelling = view("bl-1-0198f2a4-cccc", "openai", BatchPhase::Submitted);
        cancelling.provider_status = Some("cancelling".into());
        cancelling.cancel_requested = true;
        let batches = vec![submitted, uploading, cancelling];
        let list = BatchList {
            totals: Totals::of(&batches),
            batches,
        };
        let table = format_status(&list);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "ID                   PROVIDER  MODEL        PHASE      STATUS                     REQUESTS  DONE  FAILED    AGE     COST"
        );
        assert_eq!(
            lines[1],
            "bl-0-0198f2a4-aaaa   openai    gpt-4o-mini  submitted  in_progress                    1200   300       7  1m05s  $0.0123"
        );
        assert_eq!(
            lines[2],
            "bl-12-0198f2a4-bbbb  xai       gpt-4o-mini  uploading  -                                 3     -       -  1h06m  $0.0000"
        );
        assert_eq!(
            lines[3],
            "bl-1-0198f2a4-cccc   openai    gpt-4o-mini  submitted  cancelling (cancel asked)      1200     -       -  1m05s  $0.0000"
        );
        assert_eq!(lines[4], "");
        assert_eq!(
            lines[5],
            "3 batches in flight, 2403 requests, cost so far $0.0123: 1 uploading, 2 submitted"
        );
        assert_eq!(lines[6], "  openai: 2 batches, 2400 requests (2 submitted)");
        assert_eq!(lines[7], "  xai: 1 batch, 3 requests (1 uploading)");
        assert_eq!(lines.len(), 8);
    }

    #[test]
    fn an_idle_instance_says_so() {
        assert_eq!(
            format_status(&BatchList::default()),
            "no batches in flight\n"
        );
    }

    #[test]
    fn wildcard_listen_addresses_are_reached_on_loopback() {
        assert_eq!(default_url("127.0.0.1:9464"), "http://127.0.0.1:9464");
        assert_eq!(default_url("0.0.0.0:9464"), "http://127.0.0.1:9464");
        assert_eq!(default_url("[::]:9464"), "http://[::1]:9464");
    }

    #[test]
    fn urls_escape_the_batch_id() {
        let api = StatusApi::new("http://127.0.0.1:9464/", None).unwrap();
        assert_eq!(
            api.url(&["bl-0-x/../y", "cancel"]).as_str(),
            "http://127.0.0.1:9464/v1/batches/bl-0-x%2F..%2Fy/cancel"
        );
        assert_eq!(api.url(&[]).as_str(), "http://127.0.0.1:9464/v1/batches");
        assert!(StatusApi::new("127.0.0.1:9464", None).is_err());
    }

    #[test]
    fn error_bodies_give_their_message() {
        assert_eq!(
            error_message(br#"{"error":{"type":"not_found","message":"no in-flight batch x"}}"#),
            "no in-flight batch x"
        );
        assert_eq!(error_message(b"Not Found"), "Not Found");
        assert_eq!(error_message(b""), "(no body)");
    }
}
