//! Canonical JSON and deterministic event ids.
//!
//! None of the three providers puts an event id on its frames, so the bridge derives one: a
//! SHA-256 digest of the provider, the upstream host and the frame in canonical form (object
//! keys sorted, no insignificant whitespace). The same frame seen twice, through a reconnect,
//! a second bridge instance, or a VoicePact broadcast reaching several `client_id`
//! connections, gets the same id and is stored once. The upstream *name* is deliberately not
//! part of the digest: two names for one server must not split one event in two.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// Writes `value` as canonical JSON: object keys in byte order, no whitespace, strings and
/// numbers as serde_json prints them.
pub fn canonical_json(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                push_json_string(key, out);
                out.push(':');
                canonical_json(&map[key.as_str()], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(item, out);
            }
            out.push(']');
        }
        Value::String(s) => push_json_string(s, out),
        other => out.push_str(&other.to_string()),
    }
}

fn push_json_string(s: &str, out: &mut String) {
    // Serialising a &str cannot fail; fall back to an empty string literal if it ever did.
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| String::from("\"\"")));
}

/// The deterministic id of a frame without a provider id: 32 hex digits (128 bits) of
/// `SHA-256(provider NUL host NUL canonical_json(frame))`.
pub fn event_id(provider: &str, host: &str, frame: &Value) -> String {
    let mut canonical = String::with_capacity(256);
    canonical_json(frame, &mut canonical);
    let mut h = Sha256::new();
    h.update(provider.as_bytes());
    h.update([0u8]);
    h.update(host.as_bytes());
    h.update([0u8]);
    h.update(canonical.as_bytes());
    let digest = h.finalize();
    hex::encode(&digest[..16])
}

/// An id derived from another: 32 hex digits of `SHA-256(tag NUL id NUL n)` (`n` in
/// decimal). The bridge names an event this way when the id it came with must not be reused
/// (the `n`-th repeat of a frame on one connection, an id back after the dedup window);
/// every instance that derives it from the same inputs gets the same id.
pub fn derived_id(tag: &str, id: &str, n: u64) -> String {
    let mut h = Sha256::new();
    h.update(tag.as_bytes());
    h.update([0u8]);
    h.update(id.as_bytes());
    h.update([0u8]);
    h.update(n.to_string().as_bytes());
    hex::encode(&h.finalize()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_order_and_whitespace_do_not_matter() {
        let a: Value = serde_json::from_str(r#"{"b":1, "a":{"y":[1,2],"x":"s"}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a":{"x":"s","y":[1,2]},"b":1}"#).unwrap();
        let mut ca = String::new();
        canonical_json(&a, &mut ca);
        assert_eq!(ca, r#"{"a":{"x":"s","y":[1,2]},"b":1}"#);
        assert_eq!(event_id("p", "h:1", &a), event_id("p", "h:1", &b));
    }

    #[test]
    fn provider_and_host_separate_ids() {
        let f = json!({"type": "payment_update"});
        let id = event_id("voicepact", "h:1", &f);
        assert_eq!(id.len(), 32);
        assert_ne!(id, event_id("voicepact", "h:2", &f));
        assert_ne!(id, event_id("hashi", "h:1", &f));
    }

    #[test]
    fn strings_are_escaped() {
        let mut out = String::new();
        canonical_json(&json!({"q": "a\"b\n"}), &mut out);
        assert_eq!(out, r#"{"q":"a\"b\n"}"#);
    }
}
