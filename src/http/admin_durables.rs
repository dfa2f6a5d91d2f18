//! The admin API's durable routes (README, "Durable subscriptions"): list every durable with
//! its progress, list a durable's dead letters, move its cursor (`seek`), replay its dead
//! letters, delete it. Mounted by [`super::admin`] behind its bearer check.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::admin::error;
use super::AppState;
use crate::downstream::durable::{AdminError, SeekTo};
use crate::storage::DurableKey;

/// The `{consumer}/{name}` of a durable route, or the 400 answer.
fn key(path: Result<Path<(String, String)>, PathRejection>) -> Result<DurableKey, Box<Response>> {
    path.map(|Path((consumer, name))| DurableKey { consumer, name })
        .map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, e.body_text())))
}

fn failed(e: AdminError) -> Response {
    match e {
        AdminError::Unknown { .. } => error(StatusCode::NOT_FOUND, e.to_string()),
        AdminError::Store(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// `GET /v1/admin/durables`.
pub(super) async fn list(State(state): State<Arc<AppState>>) -> Response {
    if let Err(e) = state.hub.durables.refresh().await {
        return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    }
    match state.store.position().await {
        Ok(pos) => Json(json!({ "durables": state.hub.durables.list(pos.head) })).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// `GET /v1/admin/durables/{consumer}/{name}/dead-letters`.
pub(super) async fn dead_letters(
    State(state): State<Arc<AppState>>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Response {
    let key = match key(path) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    match state.hub.durables.dead_letters(&key).await {
        Ok(list) => {
            let list: Vec<_> = list
                .iter()
                .map(|d| {
                    let at = chrono::DateTime::from_timestamp_millis(d.at_ms)
                        .unwrap_or_default()
                        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                    json!({"seq": d.seq, "deliveries": d.deliveries, "at": at})
                })
                .collect();
            Json(json!({"consumer": key.consumer, "name": key.name, "dead_letters": list}))
                .into_response()
        }
        Err(e) => failed(e),
    }
}

/// The seek body: a seq or a time.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SeekBody {
    seq: Option<u64>,
    time: Option<chrono::DateTime<chrono::Utc>>,
}

/// `POST /v1/admin/durables/{consumer}/{name}/seek`.
pub(super) async fn seek(
    State(state): State<Arc<AppState>>,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Result<Json<SeekBody>, JsonRejection>,
) -> Response {
    let key = match key(path) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    let to = match body {
        Ok(Json(SeekBody {
            seq: Some(s),
            time: None,
        })) => SeekTo::Seq(s),
        Ok(Json(SeekBody {
            seq: None,
            time: Some(t),
        })) => SeekTo::Time(t.timestamp_millis()),
        Ok(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "give exactly one of {\"seq\": n} or {\"time\": \"RFC 3339\"}",
            )
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    match state.hub.durables.seek(&key, to).await {
        Ok(seq) => {
            Json(json!({"consumer": key.consumer, "name": key.name, "seq": seq})).into_response()
        }
        Err(e) => failed(e),
    }
}

/// The replay body: `{"dead": true}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReplayBody {
    dead: bool,
}

/// `POST /v1/admin/durables/{consumer}/{name}/replay`.
pub(super) async fn replay(
    State(state): State<Arc<AppState>>,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Result<Json<ReplayBody>, JsonRejection>,
) -> Response {
    let key = match key(path) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    match body {
        Ok(Json(ReplayBody { dead: true })) => {}
        Ok(_) => return error(StatusCode::BAD_REQUEST, "only {\"dead\": true} is replayed"),
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    }
    match state.hub.durables.replay_dead(&key).await {
        Ok(n) => {
            tracing::info!(consumer = %key.consumer, durable = %key.name, queued = n, "durable dead letters replayed");
            Json(json!({ "queued": n })).into_response()
        }
        Err(e) => failed(e),
    }
}

/// `DELETE /v1/admin/durables/{consumer}/{name}`.
pub(super) async fn delete(
    State(state): State<Arc<AppState>>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Response {
    let key = match key(path) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    match state.hub.durables.delete(&key).await {
        Ok(()) => Json(json!({"consumer": key.consumer, "name": key.name, "deleted": true}))
            .into_response(),
        Err(e) => failed(e),
    }
}
