//! Every Hashi frame shape, shared by the adapter and the simulator.

use serde_json::{json, Value};

/// Server greeting after a successful, authenticated upgrade.
pub const CONNECTED: &str = "connected";
/// Client heartbeat.
pub const PING: &str = "ping";
/// Server heartbeat answer.
pub const PONG: &str = "pong";
/// Server error frame; `data.code` says which.
pub const ERROR: &str = "error";
/// `data.code` of an authentication failure.
pub const AUTH_ERROR: &str = "AUTH_ERROR";
/// `data.code` of a client frame the server could not use (our choice; the doc names none).
pub const INVALID_MESSAGE: &str = "INVALID_MESSAGE";
/// Client frame joining a lobby room.
pub const SUBSCRIBE: &str = "subscribe";
/// Client frame leaving a lobby room.
pub const UNSUBSCRIBE: &str = "unsubscribe";
/// Suffix of every event wrapper type (`contract:event`, `lobby:event`, `storage:event`).
pub const EVENT_SUFFIX: &str = ":event";

/// `{"type":"ping"}`.
pub fn ping() -> String {
    json!({"type": PING}).to_string()
}

/// `{"type":"pong"}`.
pub fn pong() -> String {
    json!({"type": PONG}).to_string()
}

/// `{"type":"subscribe","data":{"lobbyId":..}}`.
pub fn subscribe(lobby_id: &str) -> String {
    json!({"type": SUBSCRIBE, "data": {"lobbyId": lobby_id}}).to_string()
}

/// `{"type":"unsubscribe","data":{"lobbyId":..}}`.
pub fn unsubscribe(lobby_id: &str) -> String {
    json!({"type": UNSUBSCRIBE, "data": {"lobbyId": lobby_id}}).to_string()
}

/// The greeting the simulator sends (our choice of `data`: the player and a message).
pub fn connected(player_id: &str) -> String {
    json!({"type": CONNECTED, "data": {"playerId": player_id, "message": "Connected to Hashi WebSocket"}})
        .to_string()
}

/// An error frame.
pub fn error(code: &str, message: &str) -> String {
    json!({"type": ERROR, "data": {"message": message, "code": code}}).to_string()
}

/// `data.message` of the doc's authentication failure.
pub const AUTH_FAILED_MESSAGE: &str = "Authentication failed";

/// The doc's authentication failure:
/// `{"type":"error","data":{"message":"Authentication failed","code":"AUTH_ERROR"}}`.
pub fn auth_error() -> String {
    error(AUTH_ERROR, AUTH_FAILED_MESSAGE)
}

/// A wrapped event: `{"type":"<family>:event","data":{"type":<event>, ..fields}}`.
pub fn event(family: &str, event: &str, fields: Value) -> Value {
    let mut data = json!({"type": event});
    if let (Some(d), Value::Object(f)) = (data.as_object_mut(), fields) {
        d.extend(f);
    }
    json!({"type": format!("{family}{EVENT_SUFFIX}"), "data": data})
}

/// Every contract event type the doc lists.
pub const CONTRACT_EVENTS: [&str; 10] = [
    "contract.created",
    "contract.initializing",
    "contract.initialized",
    "contract.deleted",
    "contract.payment_transferred",
    "contract.outcome_attested",
    "contract.decision_contested",
    "contract.mediation_submitted",
    "contract.admin_decision",
    "contract.payout_finalized",
];
/// Every lobby event type the doc lists.
pub const LOBBY_EVENTS: [&str; 4] = [
    "lobby.created",
    "lobby.joined",
    "lobby.left",
    "lobby.deleted",
];
/// Every storage event type the doc lists.
pub const STORAGE_EVENTS: [&str; 5] = [
    "storage.external_url_created",
    "storage.presigned_url_created",
    "storage.multipart_completed",
    "storage.multipart_aborted",
    "storage.deleted",
];

/// One frame of every event type the doc lists, in lobby `lobby_id`, for the demo and the
/// benchmarks.
pub fn samples(lobby_id: &str, timestamp: &str) -> Vec<Value> {
    let contract_id = "550e8400-e29b-41d4-a716-446655440000";
    let mut out = Vec::new();
    for e in LOBBY_EVENTS.iter().take(3) {
        out.push(event("lobby", e, json!({
            "lobbyId": lobby_id, "lobbyCode": lobby_id, "timestamp": timestamp,
            "payload": {"lobby": {"id": lobby_id}, "playerId": "player-1", "participantCount": 2}
        })));
    }
    for e in CONTRACT_EVENTS {
        out.push(event(
            "contract",
            e,
            json!({
                "contractId": contract_id, "lobbyId": lobby_id, "timestamp": timestamp,
                "payload": {"id": contract_id, "stake": "10.00"}
            }),
        ));
    }
    for e in STORAGE_EVENTS {
        out.push(event("storage", e, json!({
            "storageId": "st-1", "contractId": contract_id, "lobbyId": lobby_id, "playerId": "player-1",
            "timestamp": timestamp, "payload": {"storage": {"id": "st-1"}}
        })));
    }
    out.push(event(
        "lobby",
        LOBBY_EVENTS[3],
        json!({
            "lobbyId": lobby_id, "lobbyCode": lobby_id, "timestamp": timestamp,
            "payload": {"lobby": {"id": lobby_id}, "playerId": "player-1", "participantCount": 0}
        }),
    ));
    out
}
