//! The HTTP side: `/metrics` for Prometheus, `/healthz` (the process is
//! alive), `/readyz` (it is doing its work: 200 `ready`, or 503 with the
//! reasons as JSON), and the status API over this instance's in-flight
//! batches: `GET /v1/batches`, `GET /v1/batches/{id}` and
//! `POST /v1/batches/{id}/cancel`, and the daily budget: `GET /v1/budget`
//! and `PUT /v1/budget` (`{"max_usd_per_day": 250.0}`, or `null` for no
//! cap). Bound to loopback by default.
//!
//! When a token is configured (`http.token_env`), every `/v1/*` route
//! requires `Authorization: Bearer <token>`; metrics and health stay open.
//! The token is never logged and never echoed in a response.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use crate::budget::{Budget, BudgetUpdate};
use crate::config::ApiKey;
use crate::health::Readiness;
use crate::journal::partition_of;
use crate::metrics::Metrics;
use crate::state::Journal;
use crate::status::{BatchPhase, CancelAccepted, CancelRefused, Registry};

#[derive(Clone)]
struct HttpState {
    metrics: Metrics,
    readiness: Readiness,
    batches: Registry,
    budget: Arc<Budget>,
    token: Option<Arc<ApiKey>>,
    /// Where cancels are written for the partition's owner, wherever it
    /// runs; without it, only this instance's batches can be cancelled.
    journal: Option<Arc<Journal>>,
}

/// Every route; `token`, when set, guards the status API.
pub fn router(
    metrics: Metrics,
    readiness: Readiness,
    batches: Registry,
    budget: Arc<Budget>,
    token: Option<ApiKey>,
    journal: Option<Arc<Journal>>,
) -> Router {
    let state = HttpState {
        metrics,
        readiness,
        batches,
        budget,
        token: token.map(Arc::new),
        journal,
    };
    let status_api = Router::new()
        .route("/v1/batches", get(list_batches))
        .route("/v1/batches/{id}", get(get_batch))
        .route("/v1/batches/{id}/cancel", post(cancel_batch))
        .route("/v1/budget", get(get_budget).put(set_budget))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .merge(status_api)
        .with_state(state)
}

async fn render_metrics(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// 200 `ready`, or 503 with `{"ready": false, "reasons": [...]}`.
async fn ready(State(state): State<HttpState>) -> Response {
    let reasons = state.readiness.reasons();
    if reasons.is_empty() {
        return "ready\n".into_response();
    }
    let body = serde_json::json!({"ready": false, "reasons": reasons});
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

/// A JSON error body: `{"error": {"type": ..., "message": ...}}`.
fn api_error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    let body = serde_json::json!({"error": {"type": kind, "message": message.into()}});
    (status, Json(body)).into_response()
}

/// Whether `headers` carry the bearer token. Compared in constant time, so
/// a caller learns nothing from how long a wrong guess took.
fn bearer_matches(headers: &HeaderMap, token: &ApiKey) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, presented)) = value.trim().split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return false;
    }
    let (presented, expected) = (presented.trim().as_bytes(), token.expose().as_bytes());
    presented.len() == expected.len()
        && presented
            .iter()
            .zip(expected)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

async fn require_token(State(state): State<HttpState>, request: Request, next: Next) -> Response {
    match &state.token {
        Some(token) if !bearer_matches(request.headers(), token) => {
            let mut response = api_error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the status API needs `Authorization: Bearer <token>` with the token from http.token_env",
            );
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            response
        }
        _ => next.run(request).await,
    }
}

async fn list_batches(State(state): State<HttpState>) -> Response {
    Json(state.batches.list()).into_response()
}

async fn get_batch(State(state): State<HttpState>, Path(id): Path<String>) -> Response {
    match state.batches.get(&id) {
        Some(view) => Json(view).into_response(),
        None => refused(CancelRefused::Unknown(id)),
    }
}

/// Cancels a batch: the cancel is written to the journal, where the
/// owner of the batch's partition acts on it from its tail (DESIGN.md
/// "Cancel"), and a batch of this instance is cancelled at once.
async fn cancel_batch(State(state): State<HttpState>, Path(id): Path<String>) -> Response {
    let local = state.batches.get(&id);
    if let Some(batch) = &local {
        if batch.phase == BatchPhase::Collecting {
            return refused(CancelRefused::Ended { id });
        }
    }
    let journaled = match (&state.journal, partition_of(&id)) {
        (Some(journal), Some(p)) => match journal.write_cancel(p, &id).await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(batch = %id, error = %e, "writing a cancel record failed");
                return api_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "journal_unavailable",
                    format!("writing the cancel record for {id}: {e}"),
                );
            }
        },
        _ => false,
    };
    let batch = match state.batches.request_cancel(&id) {
        Ok(batch) => {
            state.metrics.cancel_requested(&batch.provider);
            Some(batch)
        }
        Err(CancelRefused::Unknown(_)) if journaled => None,
        Err(e) => return refused(e),
    };
    tracing::info!(batch = %id, on_this_instance = batch.is_some(), journaled, "cancel requested through the status API");
    let accepted = CancelAccepted {
        id,
        batch,
        journaled,
    };
    (StatusCode::ACCEPTED, Json(accepted)).into_response()
}

async fn get_budget(State(state): State<HttpState>) -> Response {
    Json(state.budget.view()).into_response()
}

async fn set_budget(State(state): State<HttpState>, body: axum::body::Bytes) -> Response {
    let update: BudgetUpdate = match serde_json::from_slice(&body) {
        Ok(u) => u,
        Err(e) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("expected {{\"max_usd_per_day\": <number or null>}}: {e}"),
            )
        }
    };
    match state.budget.set_limit(update.max_usd_per_day) {
        Ok(view) => Json(view).into_response(),
        Err(e) => api_error(StatusCode::BAD_REQUEST, "invalid_request", e.to_string()),
    }
}

fn refused(e: CancelRefused) -> Response {
    let (status, kind) = match &e {
        CancelRefused::Unknown(_) => (StatusCode::NOT_FOUND, "not_found"),
        CancelRefused::Ended { .. } => (StatusCode::CONFLICT, "already_ended"),
    };
    api_error(status, kind, e.to_string())
}

/// Serves `app` until `shutdown` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::BatchState;
    use crate::status::tests::{provider_batch, route};

    /// Serves `router` on a free loopback port; returns its base URL.
    async fn spawn(router: Router) -> (String, CancellationToken) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, router, stop.clone()));
        (url, stop)
    }

    /// Sends `request`; the answer's status and JSON body.
    async fn call(request: reqwest::RequestBuilder) -> (u16, serde_json::Value) {
        let resp = request.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap())
    }

    #[tokio::test]
    async fn the_status_api_lists_shows_and_cancels_batches() {
        let batches = Registry::new();
        let metrics = Metrics::new();
        let readiness = metrics.readiness().clone();
        let budget = Arc::new(Budget::new(None, 1000, metrics.clone()));
        let (url, stop) = spawn(router(
            metrics,
            readiness,
            batches.clone(),
            budget,
            None,
            None,
        ))
        .await;
        let client = reqwest::Client::new();
        let get = |path: &str| client.get(format!("{url}{path}"));
        let cancel = |id: &str| client.post(format!("{url}/v1/batches/{id}/cancel"));

        let (status, body) = call(get("/v1/batches")).await;
        assert_eq!(status, 200);
        assert_eq!(body["batches"], serde_json::json!([]));
        assert_eq!(body["totals"]["batches"], 0);

        let route = route("openai", "gpt-4o-mini");
        let uploading = batches.register("bl-0-up", &route, 0, 2, 20);
        uploading.set_phase(BatchPhase::Uploading);
        let submitted = batches.register("bl-1-sub", &route, 1, 3, 30);
        submitted.submitted(&provider_batch("batch_9", BatchState::InProgress));

        let (status, body) = call(get("/v1/batches")).await;
        assert_eq!(status, 200);
        assert_eq!(body["batches"].as_array().unwrap().len(), 2);
        assert_eq!(body["totals"]["requests"], 5);
        assert_eq!(
            body["totals"]["by_provider"]["openai"]["by_phase"]["uploading"],
            1
        );

        let (status, body) = call(get("/v1/batches/bl-1-sub")).await;
        assert_eq!(status, 200);
        assert_eq!(body["provider_batch_id"], "batch_9");
        assert_eq!(body["request_counts"]["completed"], 4);

        let (status, body) = call(get("/v1/batches/bl-0-nope")).await;
        assert_eq!(status, 404);
        assert_eq!(body["error"]["type"], "not_found");

        // Before its create: accepted, and no create will be sent.
        let (status, body) = call(cancel("bl-0-up")).await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["batch"]["phase"], "uploading");
        // No journal here: the cancel holds in this process only.
        assert_eq!(body["journaled"], false);
        assert!(uploading.cancel_requested().is_cancelled());

        let (status, body) = call(cancel("bl-0-nope")).await;
        assert_eq!(status, 404, "{body}");

        let (status, body) = call(cancel("bl-1-sub")).await;
        assert_eq!(status, 202);
        assert_eq!(body["batch"]["id"], "bl-1-sub");
        assert_eq!(body["batch"]["cancel_requested"], true);
        assert!(submitted.cancel_requested().is_cancelled());
        stop.cancel();
    }

    #[tokio::test]
    async fn a_configured_token_guards_the_status_api_only() {
        let batches = Registry::new();
        let _r = batches.register("bl-0-a", &route("openai", "m"), 0, 1, 1);
        let token = "tok-1234567890";
        let metrics = Metrics::new();
        let readiness = metrics.readiness().clone();
        readiness.partition_ready(0);
        let budget = Arc::new(Budget::new(None, 1000, metrics.clone()));
        let (url, stop) = spawn(router(
            metrics,
            readiness,
            batches,
            budget,
            Some(ApiKey::new(token)),
            None,
        ))
        .await;
        let client = reqwest::Client::new();
        for path in ["/v1/batches", "/v1/batches/bl-0-a", "/v1/budget"] {
            let resp = client.get(format!("{url}{path}")).send().await.unwrap();
            assert_eq!(resp.headers()[header::WWW_AUTHENTICATE.as_str()], "Bearer");
            let (status, body) = (resp.status().as_u16(), resp.text().await.unwrap());
            assert_eq!(status, 401, "{path}");
            assert!(body.contains(r#""type":"unauthorized""#), "{body}");
            assert!(!body.contains(token));
            for wrong in [
                "Bearer tok-1234567891",
                "Bearer tok",
                "Basic tok-1234567890",
                token,
            ] {
                let (status, _) = call(
                    client
                        .get(format!("{url}{path}"))
                        .header("authorization", wrong),
                )
                .await;
                assert_eq!(status, 401, "{path} with {wrong:?}");
            }
            let (status, _) = call(client.get(format!("{url}{path}")).bearer_auth(token)).await;
            assert_eq!(status, 200, "{path}");
        }
        let (status, _) = call(client.post(format!("{url}/v1/batches/bl-0-a/cancel"))).await;
        assert_eq!(status, 401);
        let (status, _) = call(
            client
                .put(format!("{url}/v1/budget"))
                .json(&serde_json::json!({"max_usd_per_day": 1e9})),
        )
        .await;
        assert_eq!(status, 401);
        for open in ["/metrics", "/healthz", "/readyz"] {
            let resp = client.get(format!("{url}{open}")).send().await.unwrap();
            assert_eq!(resp.status().as_u16(), 200, "{open}");
        }
        stop.cancel();
    }

    #[tokio::test]
    async fn readyz_answers_503_with_the_reasons_until_ready() {
        let metrics = Metrics::new();
        let readiness = metrics.readiness().clone();
        let budget = Arc::new(Budget::new(None, 1000, metrics.clone()));
        let (url, stop) = spawn(router(
            metrics.clone(),
            readiness.clone(),
            Registry::new(),
            budget,
            Some(ApiKey::new("tok-1234567890")),
            None,
        ))
        .await;
        let readyz = || async {
            let resp = reqwest::get(format!("{url}/readyz")).await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        };

        let (status, body) = readyz().await;
        assert_eq!(status, 503);
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"ready": false, "reasons": ["no partitions assigned"]})
        );

        readiness.partition_replaying(3);
        readiness.partition_ready(1);
        metrics.route_failing("openai");
        let (status, body) = readyz().await;
        assert_eq!(status, 503);
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            body["reasons"],
            serde_json::json!([
                "partition 3: replaying the journal",
                "provider openai: credentials or quota refused"
            ])
        );
        assert!(metrics.render().contains("batchline_ready 0"));

        readiness.partition_ready(3);
        metrics.route_ok("openai");
        assert_eq!(readyz().await, (200, "ready\n".to_owned()));
        assert!(metrics.render().contains("batchline_ready 1"));
        stop.cancel();
    }

    #[tokio::test]
    async fn the_budget_api_shows_and_changes_the_cap() {
        let metrics = Metrics::new();
        let budget = Arc::new(Budget::new(Some(5.0), 1000, metrics.clone()));
        let (url, stop) = spawn(router(
            metrics.clone(),
            metrics.readiness().clone(),
            Registry::new(),
            budget.clone(),
            None,
            None,
        ))
        .await;
        let client = reqwest::Client::new();
        let put = |body: &str| {
            client
                .put(format!("{url}/v1/budget"))
                .header("content-type", "application/json")
                .body(body.to_owned())
        };

        let (status, body) = call(client.get(format!("{url}/v1/budget"))).await;
        assert_eq!(status, 200);
        assert_eq!(body["max_usd_per_day"], 5.0);
        assert_eq!(body["spent_usd"], 0.0);
        assert!(
            body["resets_at"].as_str().unwrap().ends_with("T00:00:00Z"),
            "{body}"
        );

        let (status, body) = call(put(r#"{"max_usd_per_day": 12.5}"#)).await;
        assert_eq!(status, 200);
        assert_eq!(body["max_usd_per_day"], 12.5);
        assert_eq!(budget.view().max_usd_per_day, Some(12.5));
        assert!(metrics.render().contains("batchline_budget_limit_usd 12.5"));

        for bad in [
            r#"{"max_usd_per_day": -3}"#,
            r#"{"max": 3}"#,
            "{}",
            "nonsense",
        ] {
            let (status, body) = call(put(bad)).await;
            assert_eq!(status, 400, "{bad}");
            assert_eq!(body["error"]["type"], "invalid_request");
        }
        assert_eq!(budget.view().max_usd_per_day, Some(12.5));

        let (status, body) = call(put(r#"{"max_usd_per_day": null}"#)).await;
        assert_eq!(status, 200);
        assert_eq!(body["max_usd_per_day"], serde_json::Value::Null);
        stop.cancel();
    }
}
