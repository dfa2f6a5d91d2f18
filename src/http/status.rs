//! Health, readiness and the status summary: what load balancers, orchestrators and the
//! status page ask the bridge.
//!
//! - `GET /healthz`: the process is alive and serving HTTP (always 200 while it is);
//! - `GET /readyz`: ready for traffic: the store answers and its journal writes succeed (not
//!   failing and being retried), the config is loaded, the listener is up (200, or 503 with
//!   the reason);
//! - `GET /v1/status`: one JSON summary of upstreams, webhooks, consumers and the journal for
//!   the status page. It carries names, states and counts only, never a URL with
//!   credentials, a token or a secret, so it is served without authentication.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Json;
use serde_json::{json, Value};

use super::AppState;

/// The operator console at `/`, `/healthz`, `/readyz` and `/v1/status`.
pub(super) fn routes() -> axum::Router<Arc<AppState>> {
    axum::Router::new()
        .route("/", get(page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/v1/status", get(status))
}

/// The operator console: one self-contained HTML file that polls `/v1/status` and `/metrics`
/// for its tables and charts and, with the admin token typed in, tails `/v1/events` and uses
/// the admin API (README, "The operator console").
async fn page() -> Html<&'static str> {
    Html(include_str!("status_page.html"))
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if let Some(why) = state.store.unavailable() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: store: {why}\n"),
        )
            .into_response();
    }
    match state.store.position().await {
        Ok(_) => (StatusCode::OK, "ready\n").into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: store: {e}\n"),
        )
            .into_response(),
    }
}

/// The summary `/v1/status` answers.
async fn summary(state: &AppState) -> Value {
    let upstreams = state.upstreams.views();
    let mut providers = serde_json::Map::new();
    for u in &upstreams {
        let entry = providers
            .entry(u.provider.clone())
            .or_insert_with(|| json!({"events": 0}));
        entry["events"] = json!(entry["events"]
            .as_u64()
            .unwrap_or(0)
            .saturating_add(u.counters.events));
    }
    let mut webhooks = Vec::new();
    let unavailable = state.store.unavailable();
    for view in state.delivery.views() {
        let counts = match unavailable {
            None => state.store.counts(&view.name).await.unwrap_or_default(),
            Some(_) => Default::default(),
        };
        let mut v = json!(view);
        v["pending"] = json!(counts.pending);
        v["dead"] = json!(counts.dead);
        if let Some(o) = v.as_object_mut() {
            o.remove("url");
        }
        webhooks.push(v);
    }
    let position = match &unavailable {
        Some(why) => Err(why.clone()),
        None => state.store.position().await.map_err(|e| e.to_string()),
    };
    let journal = match &position {
        Ok(p) => json!({"head": p.head, "first": p.first, "epoch": p.epoch}),
        Err(why) => json!({"error": why}),
    };
    // Each durable's progress (its filter and timings are on the admin API).
    if position.is_ok() {
        let _ = state.hub.durables.refresh().await;
    }
    let durables: Vec<Value> = match &position {
        Ok(p) => state
            .hub
            .durables
            .list(p.head)
            .into_iter()
            .map(|d| {
                json!({"consumer": d.consumer, "name": d.name, "acked": d.acked, "lag": d.lag,
                       "pending": d.pending, "connections": d.connections, "dead": d.dead})
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": state.started.elapsed().as_secs(),
        "journal": journal,
        "store_connected": state.store.connected(),
        "ingest": state.ingest.snapshot(),
        "providers": providers,
        "upstreams": upstreams,
        "webhooks": webhooks,
        "consumers": state.hub.counters(),
        "durables": durables,
    })
}

async fn status(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(summary(&state).await)
}
