//! The Hashi server's behaviour for the simulator: a `Dialect` of the provider-neutral core
//! (`crate::sim::server`, the only part of the simulators this module imports). The registry
//! in [`crate::sim`], the public API, picks this dialect for Hashi.
//!
//! Follows the provider doc (Hashi publishes no server code, so where the doc is silent the
//! choices below are ours and mirrored by the adapter):
//! - Endpoint `/?token=<jwt>`; any other path is a 404. A known token upgrades and the server
//!   greets first with `{"type":"connected","data":{"playerId":..}}`, the player id derived from
//!   the token (`player-<digest>`; the raw token is never shown).
//! - A missing or unknown token, per [`HashiAuthFailure`]: the doc's
//!   `{"type":"error","data":{"message":"Authentication failed","code":"AUTH_ERROR"}}` after the
//!   upgrade followed by a close (1008), or an HTTP 401 with that object as its body.
//! - `{"type":"ping"}` → `{"type":"pong"}`; `{"type":"subscribe","data":{"lobbyId":..}}` joins
//!   the lobby room and `unsubscribe` leaves it, without acknowledgement. Anything else (invalid
//!   JSON, an unknown type, a subscribe without `lobbyId`) is answered with an `error` frame
//!   with code `INVALID_MESSAGE`; the connection stays.
//! - Routing: `contract:event` goes to everyone ("broadcast globally"); `lobby:event` to the
//!   members of the room `data.lobbyId` or `data.lobbyCode`; `storage:event` to the members of
//!   the room `data.lobbyId` ("the contract's associated lobby"); any other frame to everyone.

use serde_json::Value;
use tokio_tungstenite::tungstenite::handshake::server::Request;

use super::wire;
use crate::sim::server::{
    query_param, token_identity, Admission, Audience, Dialect, HashiAuthFailure, Reaction,
};
use crate::str_or_number;

/// The Hashi server: the tokens it accepts and how it refuses the others.
pub(crate) struct HashiSim {
    tokens: Vec<String>,
    failure: HashiAuthFailure,
}

impl HashiSim {
    pub(crate) fn new(tokens: Vec<String>, failure: HashiAuthFailure) -> Self {
        HashiSim { tokens, failure }
    }
}

fn invalid(message: &str) -> Reaction {
    Reaction::reply(wire::error(wire::INVALID_MESSAGE, message))
}

/// The lobby id of a subscribe or unsubscribe frame.
fn lobby_of(msg: &serde_json::Map<String, Value>) -> Option<String> {
    str_or_number(msg.get("data")?.get("lobbyId"))
}

impl Dialect for HashiSim {
    fn base_path(&self) -> &'static str {
        "/"
    }

    fn admit(&self, req: &Request) -> Admission {
        if req.uri().path() != "/" {
            return Admission::not_found();
        }
        match query_param(req, "token") {
            Some(t) if self.tokens.contains(&t) => Admission::Accept {
                identity: token_identity("player", &t),
            },
            _ => match self.failure {
                HashiAuthFailure::ErrorFrame => Admission::RejectAfterUpgrade {
                    frames: vec![wire::auth_error()],
                    reason: wire::AUTH_FAILED_MESSAGE,
                },
                HashiAuthFailure::Http401 => Admission::Reject {
                    status: http::StatusCode::UNAUTHORIZED,
                    body: wire::auth_error(),
                    auth: true,
                },
            },
        }
    }

    fn greeting(&self, identity: &str) -> Option<String> {
        Some(wire::connected(identity))
    }

    fn on_text(&self, text: &str) -> Reaction {
        let Ok(Value::Object(msg)) = serde_json::from_str::<Value>(text) else {
            return invalid("Invalid message format");
        };
        match msg.get("type").and_then(Value::as_str) {
            Some(wire::PING) => Reaction {
                app_ping: true,
                ..Reaction::reply(wire::pong())
            },
            Some(kind @ (wire::SUBSCRIBE | wire::UNSUBSCRIBE)) => match lobby_of(&msg) {
                Some(lobby) if kind == wire::SUBSCRIBE => Reaction {
                    join: vec![lobby],
                    ..Reaction::default()
                },
                Some(lobby) => Reaction {
                    leave: vec![lobby],
                    ..Reaction::default()
                },
                None => invalid("lobbyId is required"),
            },
            Some(other) => invalid(&format!("Unknown message type: {other}")),
            None => invalid("Message type is required"),
        }
    }

    fn on_binary(&self, data: &[u8]) -> Reaction {
        // A JavaScript server parses whatever arrives as text.
        match std::str::from_utf8(data) {
            Ok(text) => self.on_text(text),
            Err(_) => invalid("Invalid message format"),
        }
    }

    fn route(&self, frame: &Value) -> Audience {
        let data = frame.get("data");
        let room = |key: &str| str_or_number(data.and_then(|d| d.get(key)));
        let rooms: Vec<String> = match frame.get("type").and_then(Value::as_str) {
            Some("lobby:event") => [room("lobbyId"), room("lobbyCode")]
                .into_iter()
                .flatten()
                .collect(),
            Some("storage:event") => room("lobbyId").into_iter().collect(),
            _ => return Audience::Everyone,
        };
        if rooms.is_empty() {
            return Audience::Nobody;
        }
        Audience::Subscribers(Box::new(move |member_of| {
            rooms.iter().any(|r| r == member_of)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::BTreeSet;

    fn sim(failure: HashiAuthFailure) -> HashiSim {
        HashiSim::new(vec!["good".into()], failure)
    }

    fn request(uri: &str) -> Request {
        http::Request::builder().uri(uri).body(()).unwrap()
    }

    #[test]
    fn admission_per_failure_mode() {
        let s = sim(HashiAuthFailure::ErrorFrame);
        assert!(
            matches!(s.admit(&request("/?token=good")), Admission::Accept { identity } if identity.starts_with("player-"))
        );
        let expect_frame = Admission::RejectAfterUpgrade {
            frames: vec![r#"{"type":"error","data":{"message":"Authentication failed","code":"AUTH_ERROR"}}"#.into()],
            reason: "Authentication failed",
        };
        assert_eq!(s.admit(&request("/?token=bad")), expect_frame);
        assert_eq!(s.admit(&request("/")), expect_frame);
        assert!(
            matches!(s.admit(&request("/x?token=good")), Admission::Reject { status, .. } if status == 404)
        );
        let s = sim(HashiAuthFailure::Http401);
        assert!(
            matches!(s.admit(&request("/?token=bad")), Admission::Reject { status, auth: true, .. } if status == 401)
        );
    }

    #[test]
    fn greeting_names_the_player_not_the_token() {
        let s = sim(HashiAuthFailure::ErrorFrame);
        let Admission::Accept { identity } = s.admit(&request("/?token=good")) else {
            panic!()
        };
        let g: Value = serde_json::from_str(&s.greeting(&identity).unwrap()).unwrap();
        assert_eq!(g["type"], "connected");
        assert_eq!(g["data"]["playerId"], identity.as_str());
    }

    #[test]
    fn client_frames() {
        let s = sim(HashiAuthFailure::ErrorFrame);
        let r = s.on_text(&wire::ping());
        assert!(r.app_ping);
        assert_eq!(r.reply.as_deref(), Some(r#"{"type":"pong"}"#));
        assert_eq!(
            s.on_text(&wire::subscribe("ABC123")).join,
            vec!["ABC123".to_string()]
        );
        assert_eq!(s.on_text(&wire::subscribe("ABC123")).reply, None);
        assert_eq!(
            s.on_text(&wire::unsubscribe("ABC123")).leave,
            vec!["ABC123".to_string()]
        );
        for junk in [
            "nope",
            "[1]",
            r#"{"type":"dance"}"#,
            r#"{"type":"subscribe"}"#,
            "{}",
        ] {
            let r = s.on_text(junk);
            let reply: Value = serde_json::from_str(r.reply.as_deref().unwrap()).unwrap();
            assert_eq!(reply["type"], "error", "{junk}");
            assert_eq!(reply["data"]["code"], "INVALID_MESSAGE", "{junk}");
            assert!(r.join.is_empty() && !r.hang_up);
        }
    }

    #[test]
    fn routing_by_room() {
        let s = sim(HashiAuthFailure::ErrorFrame);
        let abc: BTreeSet<String> = ["ABC123".to_string()].into();
        let uuid: BTreeSet<String> = ["550e".to_string()].into();
        let none = BTreeSet::new();
        let lobby = wire::event(
            "lobby",
            "lobby.joined",
            json!({"lobbyId": "550e", "lobbyCode": "ABC123"}),
        );
        let a = s.route(&lobby);
        assert!(a.includes("p", &abc) && a.includes("p", &uuid) && !a.includes("p", &none));
        let storage = wire::event("storage", "storage.deleted", json!({"lobbyId": "550e"}));
        let a = s.route(&storage);
        assert!(a.includes("p", &uuid) && !a.includes("p", &abc));
        let contract = wire::event("contract", "contract.created", json!({"lobbyId": "550e"}));
        assert!(s.route(&contract).includes("p", &none));
        assert!(s
            .route(&json!({"type": "bounty:event", "data": {}}))
            .includes("p", &none));
        assert!(matches!(
            s.route(&wire::event("lobby", "lobby.joined", json!({}))),
            Audience::Nobody
        ));
    }
}
