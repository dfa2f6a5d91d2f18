//! `POST /v1/durables/{name}/ack`: the acknowledgements of durable SSE streams (README,
//! "Durable subscriptions over SSE"), which cannot send on their stream. `/v1/ws` durable
//! subscriptions ack with their `ack` op instead.

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::sse::{bad, parse_query};
use super::Hub;

/// The body of `POST /v1/durables/{name}/ack`: exactly one of `seqs` and `upto`, and with
/// `upto` the stream's `session`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AckBody {
    #[serde(default)]
    seqs: Option<Vec<u64>>,
    #[serde(default)]
    upto: Option<u64>,
    #[serde(default)]
    session: Option<String>,
}

/// `POST /v1/durables/{name}/ack`: acknowledges events of the consumer's durable `name`, for
/// SSE consumers (which cannot send on their stream). Same authentication as
/// `/v1/events`. Body `{"seqs":[..]}` (any connection's events: one may finish what went to
/// another after its ack deadline) or `{"upto":n,"session":"s12"}` (every event up to `n`
/// that the stream `session` holds, never another stream's: the rule of `upto` on `/v1/ws`).
/// Answers 200 `{"acked":n,"ignored":m}` (unknown and already acknowledged seqs are ignored
/// and counted, never an error), 401 for an unknown token, 404 for a durable this consumer
/// does not have (`unknown_durable`) or a stream that is not open (`unknown_session`), 400
/// for a bad body; errors are JSON `{"code","message"}`.
pub async fn post(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    path: Result<axum::extract::Path<String>, axum::extract::rejection::PathRejection>,
    RawQuery(raw): RawQuery,
    body: axum::body::Bytes,
) -> Response {
    let q = parse_query(raw.as_deref());
    let Some(consumer) = hub.authenticate(&headers, q.token.as_deref()) else {
        return bad(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "unknown or missing consumer token".into(),
        );
    };
    let name = match path {
        Ok(axum::extract::Path(name)) => name,
        Err(e) => return bad(StatusCode::BAD_REQUEST, "bad_request", e.body_text()),
    };
    let body = match serde_json::from_slice::<AckBody>(&body) {
        Ok(b) => b,
        Err(e) => {
            return bad(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("body: {e}; expected {{\"seqs\":[..]}} or {{\"upto\":n}}"),
            )
        }
    };
    let seqs = match (body.seqs, body.upto, body.session) {
        (Some(seqs), None, None) if seqs.len() > hub.max_ack_seqs => {
            return bad(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!(
                    "at most {} seqs per ack (limits.max_unacked)",
                    hub.max_ack_seqs
                ),
            )
        }
        (Some(seqs), None, None) => seqs,
        (None, Some(upto), Some(session)) => {
            let Some(handle) = hub.sse_durable.get(&session, &consumer.name, &name) else {
                return bad(
                    StatusCode::NOT_FOUND,
                    "unknown_session",
                    format!("no open stream {session:?} of the durable {name:?}"),
                );
            };
            let out = handle.ack_upto(upto);
            return axum::Json(json!({"acked": out.acked, "ignored": out.ignored}))
                .into_response();
        }
        (None, Some(_), None) => {
            return bad(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "upto needs the stream's session (from its subscribed event): it acks only what that stream holds".into(),
            )
        }
        _ => {
            return bad(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "ack takes either {\"seqs\":[..]} or {\"upto\":n,\"session\":..}".into(),
            )
        }
    };
    let key = crate::storage::DurableKey {
        consumer: consumer.name.to_string(),
        name,
    };
    match hub.durables.ack(&key, &seqs) {
        Ok(out) => axum::Json(json!({"acked": out.acked, "ignored": out.ignored})).into_response(),
        Err(super::durable::AdminError::Unknown { .. }) => bad(
            StatusCode::NOT_FOUND,
            "unknown_durable",
            format!("this consumer has no durable {:?}", key.name),
        ),
        Err(e) => bad(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        ),
    }
}
