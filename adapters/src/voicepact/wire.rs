//! Every VoicePact frame shape, shared by the adapter and the simulator.

use serde_json::{json, Value};

/// The endpoint's path prefix in the provider's server (a server setting); the endpoint is
/// `<prefix>/{client_id}`.
pub const PATH_PREFIX: &str = "/api/v1/ws";

/// Client heartbeat request type.
pub const PING: &str = "ping";
/// Server heartbeat answer type (echoes the ping's `timestamp`, `null` if absent).
pub const PONG: &str = "pong";
/// Client request for one contract's status.
pub const CONTRACT_STATUS: &str = "contract_status";
/// Server answer to [`CONTRACT_STATUS`].
pub const CONTRACT_STATUS_RESPONSE: &str = "contract_status_response";
/// Pushed to the contract's parties only.
pub const CONTRACT_UPDATE: &str = "contract_update";
/// Broadcast to every connected client.
pub const PAYMENT_UPDATE: &str = "payment_update";

/// The client's heartbeat frame.
pub fn ping(now_unix: i64) -> String {
    json!({"type": PING, "timestamp": now_unix}).to_string()
}

/// The server's answer to a ping frame (the timestamp echoed as received).
pub fn pong(timestamp: Option<&Value>) -> String {
    json!({"type": PONG, "timestamp": timestamp.cloned().unwrap_or(Value::Null)}).to_string()
}

/// The client's contract status request.
pub fn contract_status(contract_id: &str) -> String {
    json!({"type": CONTRACT_STATUS, "contract_id": contract_id}).to_string()
}

/// The server's answer to a contract status request (`status` is `null` for an unknown
/// contract).
pub fn contract_status_response(contract_id: &str, status: Option<&str>) -> String {
    json!({"type": CONTRACT_STATUS_RESPONSE, "contract_id": contract_id, "status": status})
        .to_string()
}

/// A `contract_update` push, with the timestamp as the string of unix seconds the server
/// really sends.
pub fn contract_update(contract_id: &str, status: &str, unix: i64) -> Value {
    json!({
        "type": CONTRACT_UPDATE,
        "contract_id": contract_id,
        "status": status,
        "timestamp": unix.to_string(),
    })
}

/// A `payment_update` broadcast (`amount` is a float in USD).
pub fn payment_update(contract_id: &str, status: &str, amount: f64, unix: i64) -> Value {
    json!({
        "type": PAYMENT_UPDATE,
        "contract_id": contract_id,
        "status": status,
        "amount": amount,
        "timestamp": unix.to_string(),
    })
}

/// One frame of every event type the doc lists, for the demo and the benchmarks.
pub fn samples(unix: i64) -> Vec<Value> {
    vec![
        contract_update("ctr-1001", "active", unix),
        payment_update("ctr-1001", "completed", 250.5, unix),
        contract_update("ctr-1001", "completed", unix + 1),
    ]
}

/// The server's answer to a contract status request exactly as the provider's server builds
/// it: the request's `contract_id` echoed as sent (`null` if absent) and the status (`null`
/// when unknown). [`contract_status_response`] is the same frame for string ids.
pub fn contract_status_reply(contract_id: Option<&Value>, status: Option<&Value>) -> String {
    json!({
        "type": CONTRACT_STATUS_RESPONSE,
        "contract_id": contract_id.cloned().unwrap_or(Value::Null),
        "status": status.cloned().unwrap_or(Value::Null),
    })
    .to_string()
}
