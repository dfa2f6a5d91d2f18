//! The admin API under `/v1/admin/` (README, "Admin API"): what operators use to see and steer
//! upstreams, webhook deliveries and durable subscriptions ([`super::admin_durables`]).
//!
//! Authentication is `Authorization: Bearer <server.admin_token>` (401 otherwise, compared in
//! constant time); with no admin token configured the whole API is off and answers 404.
//! Answers are JSON and never contain a secret or token.

use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::AppState;
use crate::storage::{DeliveryState, ReplaySelection};
use crate::upstream::UpstreamView;

/// Routes of the admin API. Every route is behind the bearer check, which reads the token
/// from `state`.
pub(super) fn routes(state: Arc<AppState>) -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/admin/upstreams", get(upstreams))
        .route("/v1/admin/webhooks", get(webhooks))
        .route("/v1/admin/webhooks/{name}/deliveries", get(deliveries))
        .route("/v1/admin/webhooks/{name}/replay", post(replay))
        .route("/v1/admin/webhooks/{name}/enable", post(enable))
        .route("/v1/admin/durables", get(super::admin_durables::list))
        .route(
            "/v1/admin/durables/{consumer}/{name}",
            axum::routing::delete(super::admin_durables::delete),
        )
        .route(
            "/v1/admin/durables/{consumer}/{name}/dead-letters",
            get(super::admin_durables::dead_letters),
        )
        .route(
            "/v1/admin/durables/{consumer}/{name}/seek",
            post(super::admin_durables::seek),
        )
        .route(
            "/v1/admin/durables/{consumer}/{name}/replay",
            post(super::admin_durables::replay),
        )
        .route_layer(axum::middleware::from_fn_with_state(state, require_admin))
}

/// A JSON error answer.
pub(super) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

/// The `{name}` segment of a webhook route, or why it cannot be read, for the JSON 400
/// answer the API documents (`docs/openapi.json`): axum's own rejection, for a name that is
/// not UTF-8 once percent-decoded, is plain text.
fn webhook_name(path: Result<Path<String>, PathRejection>) -> Result<String, String> {
    path.map(|Path(name)| name).map_err(|e| e.body_text())
}

/// The bearer check in front of every admin route.
async fn require_admin(
    State(state): State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(token) = &state.admin_token else {
        return error(
            StatusCode::NOT_FOUND,
            "the admin API is off (no server.admin_token)",
        );
    };
    let presented = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if token.matches(presented) {
        next.run(request).await
    } else {
        error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token")
    }
}

/// One upstream as the admin API shows it: the status view and its URL (credentials
/// redacted), which the unauthenticated status summary leaves out.
#[derive(Serialize)]
struct AdminUpstream {
    #[serde(flatten)]
    view: UpstreamView,
    url: String,
}

async fn upstreams(State(state): State<Arc<AppState>>) -> Response {
    let list: Vec<AdminUpstream> = state
        .upstreams
        .snapshot()
        .iter()
        .map(|u| AdminUpstream {
            view: UpstreamView::of(u),
            url: u.adapter().display_url(),
        })
        .collect();
    Json(json!({ "upstreams": list })).into_response()
}

async fn webhooks(State(state): State<Arc<AppState>>) -> Response {
    let mut list = Vec::new();
    for view in state.delivery.views() {
        let counts = match state.store.counts(&view.name).await {
            Ok(c) => c,
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        };
        let mut v = json!(view);
        v["pending"] = json!(counts.pending);
        v["dead"] = json!(counts.dead);
        list.push(v);
    }
    Json(json!({ "webhooks": list })).into_response()
}

#[derive(Deserialize)]
struct ListQuery {
    state: Option<DeliveryState>,
    limit: Option<usize>,
}

async fn deliveries(
    State(state): State<Arc<AppState>>,
    name: Result<Path<String>, PathRejection>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let name = match webhook_name(name) {
        Ok(n) => n,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    if !state.delivery.has(&name) {
        return error(StatusCode::NOT_FOUND, format!("no webhook named {name:?}"));
    }
    let Ok(Query(q)) = query else {
        return error(
            StatusCode::BAD_REQUEST,
            "state must be pending or dead; limit a number",
        );
    };
    let which = q.state.unwrap_or(DeliveryState::Pending);
    let limit = q.limit.unwrap_or(100).min(10_000);
    match state.store.deliveries(&name, which, limit).await {
        Ok(list) => {
            Json(json!({ "webhook": name, "state": which, "deliveries": list })).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// The most events one replay request may select by ids or by a seq range: a replay runs in
/// the journal writer's transaction, and a huge one would hold up ingest while it runs.
const MAX_REPLAY_EVENTS: usize = 100_000;

/// The replay request body: exactly one selection.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    dead: Option<bool>,
    ids: Option<Vec<String>>,
    from_seq: Option<u64>,
    to_seq: Option<u64>,
    since: Option<chrono::DateTime<chrono::Utc>>,
    until: Option<chrono::DateTime<chrono::Utc>>,
}

impl ReplayBody {
    fn selection(self) -> Result<ReplaySelection, String> {
        let chosen = [
            self.dead == Some(true),
            self.ids.is_some(),
            self.from_seq.is_some() || self.to_seq.is_some(),
            self.since.is_some() || self.until.is_some(),
        ];
        if chosen.iter().filter(|c| **c).count() != 1 {
            return Err("give exactly one of {\"dead\": true}, {\"ids\": [..]}, {\"from_seq\", \"to_seq\"} or {\"since\", \"until\"}".into());
        }
        if self.dead == Some(true) {
            return Ok(ReplaySelection::Dead);
        }
        if let Some(ids) = self.ids {
            if ids.len() > MAX_REPLAY_EVENTS {
                return Err(format!(
                    "at most {MAX_REPLAY_EVENTS} ids per replay; send several requests"
                ));
            }
            return Ok(ReplaySelection::Ids(ids));
        }
        if let (Some(from), Some(to)) = (self.from_seq, self.to_seq) {
            if from > to {
                return Err("from_seq is after to_seq".into());
            }
            if to - from >= MAX_REPLAY_EVENTS as u64 {
                return Err(format!(
                    "at most {MAX_REPLAY_EVENTS} seqs per replay; split the range"
                ));
            }
            return Ok(ReplaySelection::Seqs { from, to });
        }
        if let (Some(since), Some(until)) = (self.since, self.until) {
            if since > until {
                return Err("since is after until".into());
            }
            return Ok(ReplaySelection::Received {
                since_ms: since.timestamp_millis(),
                until_ms: until.timestamp_millis(),
            });
        }
        Err("a range needs both ends (from_seq and to_seq, or since and until)".into())
    }
}

async fn replay(
    State(state): State<Arc<AppState>>,
    name: Result<Path<String>, PathRejection>,
    body: Result<Json<ReplayBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let name = match webhook_name(name) {
        Ok(n) => n,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    if !state.delivery.has(&name) {
        return error(StatusCode::NOT_FOUND, format!("no webhook named {name:?}"));
    }
    let selection = match body
        .map_err(|e| e.body_text())
        .and_then(|Json(b)| b.selection())
    {
        Ok(s) => s,
        Err(reason) => return error(StatusCode::BAD_REQUEST, reason),
    };
    match state.store.replay(&name, selection).await {
        Ok(n) => {
            tracing::info!(webhook = %name, queued = n, "replay queued");
            state.delivery.wake(&name);
            Json(json!({ "queued": n })).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn enable(
    State(state): State<Arc<AppState>>,
    name: Result<Path<String>, PathRejection>,
) -> Response {
    let name = match webhook_name(name) {
        Ok(n) => n,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    match state.delivery.enable(&name, state.store.as_ref()).await {
        Ok(true) => Json(json!({ "webhook": name, "enabled": true })).into_response(),
        Ok(false) => error(StatusCode::NOT_FOUND, format!("no webhook named {name:?}")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_body_needs_exactly_one_selection() {
        let parse = |s: &str| {
            serde_json::from_str::<ReplayBody>(s)
                .map_err(|e| e.to_string())
                .and_then(|b| b.selection())
        };
        assert_eq!(parse(r#"{"dead": true}"#), Ok(ReplaySelection::Dead));
        assert_eq!(
            parse(r#"{"ids": ["a"]}"#),
            Ok(ReplaySelection::Ids(vec!["a".into()]))
        );
        assert_eq!(
            parse(r#"{"from_seq": 2, "to_seq": 5}"#),
            Ok(ReplaySelection::Seqs { from: 2, to: 5 })
        );
        assert!(
            parse(r#"{"since": "2024-01-01T00:00:00Z", "until": "2024-01-02T00:00:00Z"}"#).is_ok()
        );
        assert!(parse(r#"{}"#).is_err());
        assert!(parse(r#"{"dead": true, "ids": []}"#).is_err());
        assert!(parse(r#"{"from_seq": 5, "to_seq": 2}"#).is_err());
        assert!(parse(r#"{"from_seq": 5}"#).is_err());
        assert!(parse(r#"{"colour": 1}"#).is_err());
    }
}
