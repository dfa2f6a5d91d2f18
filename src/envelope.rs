//! The canonical envelope: every provider's event as one CloudEvents 1.0 JSON object.
//!
//! This is an external contract (README, "The canonical envelope (contract)"): webhook
//! receivers and WebSocket consumers in other languages parse it, so attribute names, formats
//! and the field order are fixed here and nowhere else. The provider's payload travels
//! unchanged in `data`; everything derived from it (type, subject, time) sits beside it, never
//! in place of it.
//!
//! An envelope is serialised once, after the journal has given it its `seq`; the resulting
//! bytes are shared by every webhook and consumer (see [`Published`]).

use std::sync::Arc;

use std::fmt::Write as _;

use bytes::{Bytes, BytesMut};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use wsbridge_adapters::DecodedEvent;

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
    /// Extension: the dialect's name (`voicepact`, `voipbin`, `hashi`, or a user's dialect).
    pub provider: String,
    /// Extension: when the bridge received the frame, RFC 3339 UTC with microseconds.
    pub recvtime: String,
    /// Extension `gap`: how many sequence numbers the provider skipped just before this
    /// event (its dialect's `sequence` rule); absent when none were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gap: Option<u64>,
    /// Extension: the journal position; absent only before the event is journalled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

impl Envelope {
    /// Stamps a decoded event with the upstream it came from and when it arrived.
    pub fn new(
        decoded: DecodedEvent,
        source: &str,
        provider: &str,
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
            provider: provider.to_string(),
            recvtime: received.to_rfc3339_opts(SecondsFormat::Micros, true),
            gap: None,
            seq: None,
        }
    }

    /// When the bridge received it (unix ms), `None` if `recvtime` is unreadable (never for
    /// an envelope the bridge made).
    pub fn received_ms(&self) -> Option<i64> {
        chrono::DateTime::parse_from_rfc3339(&self.recvtime)
            .ok()
            .map(|t| t.timestamp_millis())
    }

    /// The envelope serialised without its `seq`, once, by ingest: the journal appends the
    /// seq it assigns ([`with_seq`]) instead of serialising again on its one writer, and
    /// ingest checks [`sequenced_len`] of it against `limits.max_event_bytes`.
    pub fn to_unsequenced(&self) -> Result<Bytes, serde_json::Error> {
        if self.seq.is_none() {
            return Ok(serde_json::to_vec(self)?.into());
        }
        let mut unsequenced = self.clone();
        unsequenced.seq = None;
        Ok(serde_json::to_vec(&unsequenced)?.into())
    }

    /// Serialises the envelope, once, into bytes shared by every recipient.
    pub fn to_bytes(&self) -> Result<Arc<[u8]>, serde_json::Error> {
        Ok(serde_json::to_vec(self)?.into())
    }
}

/// A journalled event: the envelope (with its `seq`) and its serialised form, shared by every
/// recipient (the live ring, its consumers, the demo) so that nobody serialises it again.
#[derive(Debug)]
pub struct Published {
    /// The envelope, `seq` set.
    pub envelope: Envelope,
    /// `envelope` as JSON bytes, exactly what is sent and signed.
    pub bytes: Bytes,
    /// The same bytes as text, checked for UTF-8 once here rather than by each of the
    /// thousand consumers that put them in a text frame.
    text: Utf8Bytes,
}

impl Published {
    /// `envelope` as journalled in `bytes`. Bytes that are not UTF-8 (never, for JSON the
    /// journal wrote) read as the text `null`.
    pub fn new(envelope: Envelope, bytes: Bytes) -> Published {
        let text =
            Utf8Bytes::try_from(bytes.clone()).unwrap_or_else(|_| Utf8Bytes::from_static("null"));
        Published {
            envelope,
            bytes,
            text,
        }
    }

    /// The serialised envelope as text (the same bytes as [`Published::bytes`]).
    pub fn text(&self) -> &str {
        self.text.as_str()
    }
}

/// A journalled envelope as read back, with `data` left as the journal's text.
///
/// Why not [`Envelope`]: parsing `data` into a tree stops at serde_json's nesting limit (128
/// levels), and the envelope adds a level around the payload, so an event journalled before
/// `limits.max_depth` existed could be stored and then be unreadable, a silent gap in every
/// resume. Reading `data` as raw text has no depth limit (serde_json skips it without
/// recursion), so every reader gets the attributes it routes and filters on, and the bytes
/// to send, whatever the payload's depth.
#[derive(Debug, Deserialize)]
pub struct StoredEnvelope<'a> {
    /// See [`Envelope::specversion`].
    pub specversion: String,
    /// See [`Envelope::id`].
    pub id: String,
    /// See [`Envelope::source`].
    pub source: String,
    /// See [`Envelope::event_type`].
    #[serde(rename = "type")]
    pub event_type: String,
    /// See [`Envelope::subject`].
    #[serde(default)]
    pub subject: Option<String>,
    /// See [`Envelope::time`].
    pub time: String,
    /// See [`Envelope::datacontenttype`].
    pub datacontenttype: String,
    /// `data` exactly as journalled (compact JSON, as serde_json wrote it).
    #[serde(borrow)]
    pub data: &'a RawValue,
    /// See [`Envelope::provider`].
    pub provider: String,
    /// See [`Envelope::recvtime`].
    pub recvtime: String,
    /// See [`Envelope::gap`].
    #[serde(default)]
    pub gap: Option<u64>,
    /// See [`Envelope::seq`].
    #[serde(default)]
    pub seq: Option<u64>,
}

impl<'a> StoredEnvelope<'a> {
    /// Reads journalled bytes. An error means the bytes are not an envelope at all (never
    /// written by this bridge); callers report it, they never skip it silently.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The envelope with `data` as a tree. A payload nested deeper than serde_json reads
    /// becomes `null` here: readers route and filter on the attributes only and send the
    /// journalled bytes, which still carry it whole.
    pub fn into_envelope(self) -> Envelope {
        let data = serde_json::from_str(self.data.get()).unwrap_or_else(|e| {
            tracing::debug!(event_id = %self.id, error = %e,
                "journalled data not parsed into a tree (sent as journalled)");
            Value::Null
        });
        Envelope {
            specversion: self.specversion,
            id: self.id,
            source: self.source,
            event_type: self.event_type,
            subject: self.subject,
            time: self.time,
            datacontenttype: self.datacontenttype,
            data,
            provider: self.provider,
            recvtime: self.recvtime,
            gap: self.gap,
            seq: self.seq,
        }
    }
}

/// Reads a journalled envelope (see [`StoredEnvelope`]): fails only on bytes that are not an
/// envelope, never on a payload's depth.
pub fn read_stored(bytes: &[u8]) -> Result<Envelope, serde_json::Error> {
    StoredEnvelope::parse(bytes).map(StoredEnvelope::into_envelope)
}

/// What `"seq":N` adds to an envelope at most: `,"seq":` and the 20 digits of `u64::MAX`.
const SEQ_RESERVE: usize = 27;

/// The longest an envelope serialised without its seq (`unsequenced_len` bytes) becomes once
/// the journal appends one.
pub fn sequenced_len(unsequenced_len: usize) -> usize {
    unsequenced_len.saturating_add(SEQ_RESERVE)
}

/// The envelope bytes as sent: `stored` (serialised without `seq`) with `"seq":N` appended
/// as its last member (where serialising the envelope with its seq puts it).
pub fn with_seq(stored: &[u8], seq: u64) -> Bytes {
    let trimmed = match stored.iter().rposition(|b| !b.is_ascii_whitespace()) {
        Some(end) => &stored[..=end],
        None => stored,
    };
    let Some(body) = trimmed.strip_suffix(b"}") else {
        return Bytes::copy_from_slice(stored);
    };
    let mut out = BytesMut::with_capacity(stored.len() + SEQ_RESERVE);
    out.extend_from_slice(body);
    if body.len() > 1 {
        out.extend_from_slice(b",");
    }
    out.extend_from_slice(b"\"seq\":");
    // Writing into a BytesMut cannot fail.
    let _ = write!(out, "{seq}}}");
    out.freeze()
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
                id_from_content: true,
                id: "abc".into(),
                event_type: "voipbin.call.status".into(),
                subject: Some("customer_id:abc123:call:xyz789".into()),
                time: None,
                data: json!({"status": "answered"}),
            },
            &source_for("voipbin-main"),
            "voipbin",
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
        let unsequenced = env.to_unsequenced().unwrap();
        assert_eq!(
            &with_seq(&unsequenced, 7)[..],
            text.as_bytes(),
            "the journal's splice is the serialisation with the seq"
        );
        env.seq = Some(u64::MAX);
        let longest = env.to_bytes().unwrap().len();
        assert_eq!(
            sequenced_len(env.to_unsequenced().unwrap().len()),
            longest,
            "reserves the longest seq"
        );
        assert_eq!(&with_seq(br#"{"id":"a"}"#, 7)[..], br#"{"id":"a","seq":7}"#);
        assert_eq!(&with_seq(b"{}", 1)[..], br#"{"seq":1}"#);
    }

    #[test]
    fn stored_envelopes_read_back_whatever_the_payload_depth() {
        let received = Utc.with_ymd_and_hms(2024, 1, 15, 10, 30, 1).unwrap();
        let mut env = Envelope::new(
            DecodedEvent {
                id_from_content: true,
                id: "deep".into(),
                event_type: "voicepact.contract_update".into(),
                subject: None,
                time: None,
                data: json!({"a": [1, {"b": "x"}]}),
            },
            &source_for("vp"),
            "voicepact",
            received,
        );
        env.seq = Some(3);
        let bytes = env.to_bytes().unwrap();
        assert_eq!(read_stored(&bytes).unwrap(), env);
        // 130 levels of payload: more than serde_json parses into a tree.
        let deep = format!("{}{}", "[".repeat(130), "]".repeat(130));
        let text = String::from_utf8(bytes.to_vec())
            .unwrap()
            .replace(r#"{"a":[1,{"b":"x"}]}"#, &deep);
        assert!(
            serde_json::from_str::<Envelope>(&text).is_err(),
            "too deep for a tree"
        );
        let stored = StoredEnvelope::parse(text.as_bytes()).unwrap();
        assert_eq!(stored.data.get(), deep);
        assert_eq!(stored.seq, Some(3));
        let back = stored.into_envelope();
        assert_eq!(back.id, "deep");
        assert_eq!(back.data, Value::Null);
        assert!(read_stored(b"{\"id\":1}").is_err(), "not an envelope");
    }
}
