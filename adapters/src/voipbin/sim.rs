//! The VoIPBIN server's behaviour for the simulator: a `Dialect` of the provider-neutral core
//! (`crate::sim::server`, the only part of the simulators this module imports). The registry
//! in [`crate::sim`], the public API, picks this dialect for VoIPBIN.
//!
//! Follows the provider doc and its public Go monorepo (`bin-api-manager`'s websocket handler):
//! - Endpoint `/v1.0/ws`; any other path is a 404. The token comes from `?token=`, an
//!   `Authorization: Bearer` header or a `token` cookie (the first of these present is the one
//!   checked); a missing or unknown token gets **HTTP 401 before the upgrade** with the JSON
//!   body `{"message":"unauthorized"}`.
//! - Client frames `{"type":"subscribe"|"unsubscribe","topics":[..]}`, **no acknowledgement**.
//!   Every topic of a frame is checked first ([`wire::check_topic`]); one invalid topic and the
//!   server closes the socket (no close frame, like the provider's `defer ws.Close()`).
//!   Frames that are not JSON of that shape are ignored; a binary frame ends the connection
//!   (the provider reads text frames only).
//! - Keep-alive is protocol level: the server pings every `server_ping_interval` and drops a
//!   client that has not answered within `pong_timeout` (handled by the core).
//! - Routing: a frame with a string `topic` (the doc's `event_type` frames, or a legacy
//!   `{type,data}` frame that carries one) goes to the connections with a subscription that
//!   matches it ([`wire::topic_matches`], `*` matches one segment). A frame **without** a topic
//!   (legacy `{"type":"call_created","data":{..}}` as the provider really sends it) cannot be
//!   matched, so the simulator delivers it to every connection with at least one subscription:
//!   a subscribed client is the one that receives events at all, and the bridge must never drop
//!   such frames.

use serde::Deserialize;
use serde_json::Value;
use tokio_tungstenite::tungstenite::handshake::server::Request;

use super::wire;
use crate::sim::server::{query_param, token_identity, Admission, Audience, Dialect, Reaction};

/// The VoIPBIN server: the tokens it accepts.
pub(crate) struct VoipbinSim {
    tokens: Vec<String>,
}

impl VoipbinSim {
    pub(crate) fn new(tokens: Vec<String>) -> Self {
        VoipbinSim { tokens }
    }
}

/// The token of an upgrade request: query, then `Authorization: Bearer`, then cookie.
fn request_token(req: &Request) -> Option<String> {
    if let Some(t) = query_param(req, "token") {
        return Some(t);
    }
    let headers = req.headers();
    let bearer = headers
        .get_all(http::header::AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| rest.trim().to_string())
        });
    if bearer.is_some() {
        return bearer;
    }
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == "token").then(|| v.to_string())
        })
}

/// A client frame, read the way Go's `json.Unmarshal` reads it into the provider's struct.
#[derive(Deserialize)]
struct Hook {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    topics: Option<Vec<String>>,
}

impl Dialect for VoipbinSim {
    fn base_path(&self) -> &'static str {
        wire::PATH
    }

    fn admit(&self, req: &Request) -> Admission {
        if req.uri().path() != wire::PATH {
            return Admission::not_found();
        }
        match request_token(req) {
            Some(t) if self.tokens.contains(&t) => Admission::Accept {
                identity: token_identity("agent", &t),
            },
            _ => Admission::Reject {
                status: http::StatusCode::UNAUTHORIZED,
                body: wire::unauthorized_body(),
                auth: true,
            },
        }
    }

    fn server_pings(&self) -> bool {
        true
    }

    fn on_text(&self, text: &str) -> Reaction {
        let Ok(hook) = serde_json::from_str::<Hook>(text) else {
            return Reaction::default();
        };
        let topics = hook.topics.unwrap_or_default();
        if topics.iter().any(|t| wire::check_topic(t).is_err()) {
            return Reaction {
                hang_up: true,
                ..Reaction::default()
            };
        }
        match hook.kind.as_deref() {
            Some(wire::SUBSCRIBE) => Reaction {
                join: topics,
                ..Reaction::default()
            },
            Some(wire::UNSUBSCRIBE) => Reaction {
                leave: topics,
                ..Reaction::default()
            },
            _ => Reaction::default(),
        }
    }

    fn on_binary(&self, _data: &[u8]) -> Reaction {
        Reaction {
            hang_up: true,
            ..Reaction::default()
        }
    }

    fn route(&self, frame: &Value) -> Audience {
        match frame.get("topic") {
            Some(Value::String(topic)) => {
                let topic = topic.clone();
                Audience::Subscribers(Box::new(move |pattern| {
                    wire::topic_matches(pattern, &topic)
                }))
            }
            _ => Audience::Subscribers(Box::new(|_| true)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::BTreeSet;

    fn sim() -> VoipbinSim {
        VoipbinSim::new(vec!["good".into()])
    }

    fn request(uri: &str, headers: &[(&str, &str)]) -> Request {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn is_401(a: &Admission) -> bool {
        matches!(a, Admission::Reject { status, auth: true, body } if *status == 401 && body == r#"{"message":"unauthorized"}"#)
    }

    #[test]
    fn token_from_query_bearer_or_cookie() {
        let s = sim();
        let ok = |a: Admission| matches!(a, Admission::Accept { identity } if identity.starts_with("agent-") && !identity.contains("good"));
        assert!(ok(s.admit(&request("/v1.0/ws?token=good", &[]))));
        assert!(ok(s.admit(&request(
            "/v1.0/ws",
            &[("authorization", "Bearer good")]
        ))));
        assert!(ok(
            s.admit(&request("/v1.0/ws", &[("cookie", "a=b; token=good")]))
        ));
        assert!(is_401(&s.admit(&request("/v1.0/ws?token=bad", &[]))));
        assert!(is_401(&s.admit(&request("/v1.0/ws", &[]))));
        assert!(is_401(&s.admit(&request(
            "/v1.0/ws",
            &[("authorization", "Basic good")]
        ))));
        // The query wins over a good header.
        assert!(is_401(&s.admit(&request(
            "/v1.0/ws?token=bad",
            &[("authorization", "Bearer good")]
        ))));
        assert!(
            matches!(s.admit(&request("/v1.0/wss?token=good", &[])), Admission::Reject { status, auth: false, .. } if status == 404)
        );
    }

    #[test]
    fn subscriptions_without_ack_and_invalid_topics_hang_up() {
        let s = sim();
        let topics = vec!["customer_id:abc123:call:*".to_string()];
        let r = s.on_text(&wire::subscribe(&topics));
        assert_eq!(r.join, topics);
        assert_eq!(r.reply, None);
        assert!(!r.hang_up);
        assert_eq!(s.on_text(&wire::unsubscribe(&topics)).leave, topics);
        assert!(
            s.on_text(&wire::subscribe(&["customer_id:abc123".into()]))
                .hang_up
        );
        assert!(s.on_text(&wire::unsubscribe(&["a::b:c".into()])).hang_up);
        for junk in [
            "nope",
            "[1]",
            r#"{"type":"subscribe","topics":"x"}"#,
            r#"{"type":"hello"}"#,
        ] {
            assert_eq!(s.on_text(junk), Reaction::default(), "{junk}");
        }
        assert!(s.on_binary(b"{}").hang_up);
    }

    #[test]
    fn routing_by_topic() {
        let s = sim();
        let calls: BTreeSet<String> = ["customer_id:abc123:call:*".to_string()].into();
        let msgs: BTreeSet<String> = ["customer_id:abc123:message:*".to_string()].into();
        let none = BTreeSet::new();
        let call = wire::event("call.status", "t", "customer_id:abc123:call:c1", json!({}));
        let a = s.route(&call);
        assert!(a.includes("x", &calls) && !a.includes("x", &msgs) && !a.includes("x", &none));
        let legacy = json!({"type": "call_created", "data": {"id": "l1"}});
        let a = s.route(&legacy);
        assert!(a.includes("x", &calls) && a.includes("x", &msgs) && !a.includes("x", &none));
    }
}
