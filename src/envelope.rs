//! The canonical envelope: every provider's event as one CloudEvents 1.0 JSON object.
//!
//! This is an external contract (DESIGN §3): webhook receivers and WebSocket consumers in other
//! languages parse it, so attribute names, formats and the field order are fixed here and
//! nowhere else. The provider's payload travels unchanged in `data`; everything derived from
//! it (type, subject, time) sits beside it, never in place of it.
//!
//! An envelope is serialised once, after the journal has given it its `seq`; the resulting
//! bytes are shared by every webhook and consumer (see [`crate::ingest::Published`]).

use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use wsbridge_adapters::{DecodedEvent, Provider};

/// The CloudEvents version we emit.
pub const SPEC_VERSION: &str = "1.0";
/// The media type of `data`: every provider speaks JSON.
pub const DATA_CONTENT_TYPE: &str = "application/json";
/// The media type of a whole envelope in structured mode.
pub const CLOUDEVENTS_JSON: &str = "application/cloudevents+json";

/// One event in canonical form. Field order is the serialised order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Always `"1.0"`.
    pub specversion: String,
    /// Provider event id, or the adapter's deterministic digest; the deduplication key.
    pub id: String,
    /// `wsbridge://<upstream name>`: which configured connection received it.
    pub source: String,
    /// `<provider>.<event>`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The natural key (VoIPBIN topic, `contract/<id>`, ...), absent when the frame has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Provider time (or receive time), RFC 3339 UTC.
    pub time: String,
    /// Always `application/json`.
    pub datacontenttype: String,
    /// The provider's payload, unchanged.
    pub data: Value,
    /// Extension: `voicepact`, `voipbin` or `hashi`.
    pub provider: String,
    /// Extension: when the bridge received the frame, RFC 3339 UTC with microseconds.
    pub recvtime: String,
    /// Extension: the journal position; absent only before the event is journalled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

impl Envelope {
    /// Stamps a decoded event with the upstream it came from and when it arrived.
    pub fn new(
        decoded: DecodedEvent,
        source: &str,
        provider: Provider,
        received: DateTime<Utc>,
    ) -> Envelope {
        Envelope {
            specversion: SPEC_VERSION.to_string(),
            id: decoded.id,
            source: source.to_string(),
            event_type: decoded.event_type,
            subject: decoded.subject,
            time: format_time(decoded.time.unwrap_or(received)),
            datacontenttype: DATA_CONTENT_TYPE.to_string(),
            data: decoded.data,
            provider: provider.name().to_string(),
            recvtime: received.to_rfc3339_opts(SecondsFormat::Micros, true),
            seq: None,
        }
    }

    /// Serialises the envelope, once, into bytes shared by every recipient.
    pub fn to_bytes(&self) -> Result<Arc<[u8]>, serde_json::Error> {
        Ok(serde_json::to_vec(self)?.into())
    }
}

/// `source` for an upstream name.
pub fn source_for(upstream: &str) -> String {
    format!("wsbridge://{upstream}")
}

/// RFC 3339 UTC with as many fractional digits as the instant needs (none for whole seconds).
pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    #[test]
    fn serialises_cloudevents_attributes_in_order() {
        let received = Utc.with_ymd_and_hms(2024, 1, 15, 10, 30, 1).unwrap();
        let mut env = Envelope::new(
            DecodedEvent {
                id: "abc".into(),
                event_type: "voipbin.call.status".into(),
                subject: Some("customer_id:abc123:call:xyz789".into()),
                time: None,
                data: json!({"status": "answered"}),
            },
            &source_for("voipbin-main"),
            Provider::Voipbin,
            received,
        );
        env.seq = Some(7);
        let text = String::from_utf8(env.to_bytes().unwrap().to_vec()).unwrap();
        assert_eq!(
            text,
            r#"{"specversion":"1.0","id":"abc","source":"wsbridge://voipbin-main","type":"voipbin.call.status","subject":"customer_id:abc123:call:xyz789","time":"2024-01-15T10:30:01Z","datacontenttype":"application/json","data":{"status":"answered"},"provider":"voipbin","recvtime":"2024-01-15T10:30:01.000000Z","seq":7}"#
        );
        let back: Envelope = serde_json::from_str(&text).unwrap();
        assert_eq!(back, env);
    }
}
