//! Every VoIPBIN frame shape and the topic grammar, shared by the adapter and the simulator.

use serde_json::{json, Value};

/// Client frame type that adds topics.
pub const SUBSCRIBE: &str = "subscribe";
/// Client frame type that removes topics.
pub const UNSUBSCRIBE: &str = "unsubscribe";

/// The path of the WebSocket endpoint (`wss://api.voipbin.net/v1.0/ws?token=<token>`).
pub const PATH: &str = "/v1.0/ws";

/// The JSON body of the HTTP 401 the server answers a missing or bad token with, before the
/// upgrade.
pub fn unauthorized_body() -> String {
    json!({"message": "unauthorized"}).to_string()
}

/// `{"type":"subscribe","topics":[..]}`.
pub fn subscribe(topics: &[String]) -> String {
    json!({"type": SUBSCRIBE, "topics": topics}).to_string()
}

/// `{"type":"unsubscribe","topics":[..]}`.
pub fn unsubscribe(topics: &[String]) -> String {
    json!({"type": UNSUBSCRIBE, "topics": topics}).to_string()
}

/// Checks a topic against `<scope>:<scope_id>:<resource>:<resource_id>`: four non-empty
/// segments, each either a literal without spaces or `*`.
pub fn check_topic(topic: &str) -> Result<(), String> {
    let segments: Vec<&str> = topic.split(':').collect();
    if segments.len() != 4 {
        return Err(format!(
            "a topic has 4 segments <scope>:<scope_id>:<resource>:<resource_id>, this has {}",
            segments.len()
        ));
    }
    if let Some(bad) = segments
        .iter()
        .find(|s| s.is_empty() || s.chars().any(char::is_whitespace))
    {
        return Err(format!("segment {bad:?} is empty or has whitespace"));
    }
    Ok(())
}

/// Whether an event's topic matches a subscription pattern, segment by segment, where a `*`
/// segment matches any one segment.
pub fn topic_matches(pattern: &str, topic: &str) -> bool {
    let mut p = pattern.split(':');
    let mut t = topic.split(':');
    loop {
        match (p.next(), t.next()) {
            (None, None) => return true,
            (Some(ps), Some(ts)) if ps == "*" || ps == ts => continue,
            _ => return false,
        }
    }
}

/// An `event_type` frame as the server pushes it.
pub fn event(event_type: &str, timestamp: &str, topic: &str, data: Value) -> Value {
    json!({"event_type": event_type, "timestamp": timestamp, "topic": topic, "data": data})
}

/// One frame of every event type the doc lists (plus one legacy `{type,data}` frame), all on
/// customer `abc123`, for the demo and the benchmarks.
pub fn samples(timestamp: &str) -> Vec<Value> {
    let t = timestamp;
    let call = "customer_id:abc123:call:xyz789";
    let msg = "customer_id:abc123:message:m-42";
    vec![
        event(
            "call.created",
            t,
            call,
            json!({"id": "xyz789", "source": "+15551234", "destination": "+15555678", "status": "dialing"}),
        ),
        event(
            "call.status",
            t,
            call,
            json!({"id": "xyz789", "status": "ringing"}),
        ),
        event(
            "call.status",
            t,
            call,
            json!({"id": "xyz789", "status": "answered"}),
        ),
        event(
            "message.received",
            t,
            msg,
            json!({"id": "m-42", "source": "+15551234", "text": "What are your hours?"}),
        ),
        event(
            "message.sent",
            t,
            msg,
            json!({"id": "m-43", "destination": "+15551234", "text": "We're open Mon-Fri 9-5!"}),
        ),
        event(
            "message.delivery",
            t,
            msg,
            json!({"id": "m-43", "status": "delivered"}),
        ),
        event(
            "activeflow.updated",
            t,
            "customer_id:abc123:activeflow:af-7",
            json!({"id": "af-7", "current_action": "talk"}),
        ),
        event(
            "activeflow.completed",
            t,
            "customer_id:abc123:activeflow:af-7",
            json!({"id": "af-7", "status": "ended"}),
        ),
        event(
            "conference.joined",
            t,
            "customer_id:abc123:conference:cf-1",
            json!({"id": "cf-1", "call_id": "xyz789"}),
        ),
        event(
            "conference.left",
            t,
            "customer_id:abc123:conference:cf-1",
            json!({"id": "cf-1", "call_id": "xyz789"}),
        ),
        event(
            "queue.joined",
            t,
            "customer_id:abc123:queue:q-sales",
            json!({"id": "q-sales", "call_id": "xyz789"}),
        ),
        event(
            "queue.connected",
            t,
            "customer_id:abc123:queue:q-sales",
            json!({"id": "q-sales", "call_id": "xyz789", "agent_id": "agent123"}),
        ),
        event(
            "agent.status",
            t,
            "customer_id:abc123:agent:agent123",
            json!({"id": "agent123", "status": "available"}),
        ),
        event(
            "recording.completed",
            t,
            "customer_id:abc123:recording:rec-9",
            json!({"id": "rec-9", "call_id": "xyz789", "duration": 42}),
        ),
        event(
            "call.status",
            t,
            call,
            json!({"id": "xyz789", "status": "hangup"}),
        ),
        json!({"type": "call_created", "data": {"id": "legacy-1", "status": "dialing"}}),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_one_segment() {
        assert!(topic_matches(
            "customer_id:abc123:call:*",
            "customer_id:abc123:call:xyz789"
        ));
        assert!(topic_matches(
            "customer_id:abc123:*:*",
            "customer_id:abc123:message:m1"
        ));
        assert!(!topic_matches(
            "customer_id:abc123:call:*",
            "customer_id:abc123:message:m1"
        ));
        assert!(!topic_matches(
            "customer_id:abc123:call:*",
            "customer_id:other:call:x"
        ));
        assert!(!topic_matches(
            "customer_id:abc123:call",
            "customer_id:abc123:call:x"
        ));
    }

    #[test]
    fn topic_grammar() {
        assert!(check_topic("agent_id:agent123:queue:*").is_ok());
        assert!(check_topic("agent_id:agent123:queue").is_err());
        assert!(check_topic("agent_id::queue:*").is_err());
    }
}
