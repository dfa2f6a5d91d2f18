//! Provider dialects for wsbridge, and faithful simulators of the providers' servers.
//!
//! Every provider is a dialect file (`adapters/<provider>.toml` for the built-in ones) run by
//! one engine, [`dialect`]: how to build the connect request and its credentials, the
//! subscribe and unsubscribe frames, the heartbeat, which inbound frames are control frames and
//! how every event frame decodes into a [`DecodedEvent`]. Each built-in provider also has a
//! module (`voicepact`, `voipbin`, `hashi`) with its frame shapes and a simulator of its
//! server, written from the provider's doc and not from the dialect file, so the two check
//! each other.
//!
//! The crate is deliberately free of the bridge's runtime concerns (journal, routing, fan-out):
//! an adapter is a pure translator between one connection's frames and provider-neutral events,
//! which keeps the golden tests exact and the adapters easy to add.

#![warn(missing_docs)]

pub mod binary;
pub mod dialect;
pub mod hashi;
pub mod sim;
pub mod voicepact;
pub mod voipbin;

mod canonical;
mod secret;
mod time;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;

pub use binary::{binary_text, BinaryFrames, BinaryRefused};
pub use canonical::{canonical_json, derived_id, event_id};
pub use secret::Secret;
pub use time::parse_provider_time;

/// The built-in providers, as their simulators and the demo know them. The bridge itself
/// knows a provider only by its dialect's name ([`Adapter::provider`]): a user's dialect file
/// is as much a provider as these three.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Provider {
    /// VoicePact: `type` dialect, one connection per `client_id`, no auth.
    VoicePact,
    /// VoIPBIN: `event_type` dialect, token auth, topic subscriptions.
    Voipbin,
    /// Hashi: wrapped `contract:event` dialect, token auth, lobby rooms.
    Hashi,
}

impl Provider {
    /// Every provider, in a stable order (used by the demo and `check-config` messages).
    pub const ALL: [Provider; 3] = [Provider::VoicePact, Provider::Voipbin, Provider::Hashi];

    /// The lower-case name used in config (`adapter = "voipbin"`) and in envelopes.
    pub fn name(self) -> &'static str {
        match self {
            Provider::VoicePact => "voicepact",
            Provider::Voipbin => "voipbin",
            Provider::Hashi => "hashi",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Provider {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Provider::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown adapter {s:?}; expected one of \"voicepact\", \"voipbin\", \"hashi\""
                )
            })
    }
}

/// Why an adapter could not be built from its settings.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// A setting the adapter needs is absent.
    #[error("{provider} needs `{key}`")]
    Missing {
        /// The provider (dialect) whose adapter refused.
        provider: String,
        /// The config key that is missing.
        key: String,
    },
    /// A setting is present but unusable for this provider.
    #[error("{key}: {reason}")]
    Invalid {
        /// The config key at fault.
        key: String,
        /// Why it is refused.
        reason: String,
    },
}

/// Why a `[prepare]` answer was not taken. Never quotes a secret or the answer's body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrepareRefused {
    /// The credentials were refused (HTTP 401/403, or the dialect's `fail`): `auth_failed`.
    #[error("credentials refused: {0}")]
    Auth(String),
    /// Any other failure (another non-2xx status, an answer that is not JSON): retried with
    /// backoff.
    #[error("{0}")]
    Failed(String),
}

/// A frame that could not be decoded. It is counted and logged by the caller and the
/// connection stays up: one bad frame must never cost the events after it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct DecodeError {
    /// Human-readable reason, safe to log: never the whole frame and never a secret parameter
    /// (a dialect expression's jq message may quote a short piece of the frame; it is bounded).
    pub reason: String,
}

impl DecodeError {
    pub(crate) fn new(reason: impl Into<String>) -> Self {
        DecodeError {
            reason: reason.into(),
        }
    }
}

/// An event in provider-neutral form, before the bridge stamps it with its source, receive time
/// and journal position. The fields map one to one onto the envelope's CloudEvents attributes.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodedEvent {
    /// The provider's event id, or a deterministic digest of (provider, host, canonical frame).
    pub id: String,
    /// Whether `id` is the digest of the frame's content (the provider gave no id). Identical
    /// frames then share an id, so the bridge numbers their repeats on one connection to keep
    /// each a distinct event; a provider's own id is taken as the event's identity.
    pub id_from_content: bool,
    /// `<provider>.<event>`, e.g. `voipbin.call.status`.
    pub event_type: String,
    /// The natural key (`contract/<id>`, a VoIPBIN topic, ...), when the frame carries one.
    pub subject: Option<String>,
    /// The provider's timestamp; `None` when absent or unreadable (the receive time is used).
    pub time: Option<DateTime<Utc>>,
    /// The provider's payload, unchanged (which member that is per dialect is part of the
    /// envelope contract: README, "How each dialect maps").
    pub data: Value,
}

/// A frame that is not an event. The supervisor uses these to drive the connection's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    /// An answer to our heartbeat.
    Pong,
    /// The server's greeting; adapters with [`Greeting::AwaitConnected`] subscribe after it.
    Connected,
    /// A reply to a request of ours that is not an event (e.g. VoicePact contract status).
    Reply,
    /// The server refused our credentials: the upstream goes to `auth_failed`.
    AuthFailed {
        /// The provider's message, safe to log.
        message: String,
    },
    /// The provider asks the client to reconnect now (e.g. before a restart): the
    /// connection is closed and opened again at once, without backoff.
    Reconnect,
    /// Any other error the server reported; logged, the connection stays up.
    Error {
        /// The provider's error code, if any.
        code: Option<String>,
        /// The provider's message.
        message: String,
    },
}

/// An event's place in the provider's numbering: gaps are detected per `key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sequence {
    /// What the numbers count per (`sequence_key`; empty: one numbering for all).
    pub key: String,
    /// The number.
    pub number: u64,
}

/// What an inbound frame means to the session step that is waiting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepCheck {
    /// The step's `expect` frame: the step is complete.
    Done,
    /// The step's `fail` frame: the credentials were refused (`auth_failed`).
    Failed(String),
    /// Neither: the frame is read as any other.
    Other,
}

/// One decoded inbound text frame.
#[derive(Clone, Debug, PartialEq)]
pub enum Inbound {
    /// A provider event, to be journalled and routed.
    Event(DecodedEvent),
    /// A control frame, consumed by the supervisor.
    Control(Control),
}

/// The default of `limits.max_split_events`: most events one frame may carry (a dialect's
/// `split` rule); a frame with more is a decode error, so one frame cannot flood the journal.
pub const DEFAULT_MAX_SPLIT_EVENTS: usize = 1000;

/// One event of an inbound frame, with what its connection does about it.
#[derive(Clone, Debug, PartialEq)]
pub struct FrameEvent {
    /// The event.
    pub event: DecodedEvent,
    /// Its place in the provider's numbering, when its rule has `sequence`.
    pub sequence: Option<Sequence>,
    /// The frame to send back to the provider on the same connection once the event is
    /// journalled (its rule's `reply`): the acknowledgement some providers require per event.
    pub reply: Option<String>,
}

/// Everything one inbound frame decodes to: a control frame, or its events (one, or the
/// items of a `split` rule, in the frame's order; none when a split frame carries none).
#[derive(Clone, Debug, PartialEq)]
pub enum Decoded {
    /// A control frame, consumed by the supervisor.
    Control(Control),
    /// The frame's events, in order.
    Events(Vec<FrameEvent>),
}

/// How an adapter keeps its connection alive and proves it is not stale.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Heartbeat {
    /// Send this application-level text frame; the provider answers with [`Control::Pong`].
    Text(String),
    /// Send a WebSocket protocol ping; the server answers with a protocol pong.
    Protocol,
}

/// What the connection must see before the upstream counts as connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Greeting {
    /// The successful upgrade is the whole handshake.
    Upgrade,
    /// Wait for a [`Control::Connected`] frame (an auth error may arrive instead).
    AwaitConnected,
}

/// One provider dialect bound to one configured upstream connection.
///
/// Implementations are cheap, immutable and shared between the supervisor task and any status
/// reader; everything that changes per connection lives in the supervisor.
pub trait Adapter: Send + Sync + 'static {
    /// The dialect's name: the envelope's `provider`, the prefix of every event type.
    fn provider(&self) -> &str;

    /// The upgrade request to send: the final URL with credentials, and any headers.
    fn connect_request(&self) -> Result<http::Request<()>, AdapterError>;

    /// The connect URL with credentials redacted, for logs and the status API.
    fn display_url(&self) -> String;

    /// What has to arrive after the upgrade before subscribing.
    fn greeting(&self) -> Greeting;

    /// The configured subscriptions (topics, lobbies), as shown in the status API.
    fn subscriptions(&self) -> &[String];

    /// The frames that subscribe to `subs` (sent after every (re)connect).
    fn subscribe_frames(&self, subs: &[String]) -> Vec<String>;

    /// The frames that end the subscriptions `subs` (used when a reload removes them).
    fn unsubscribe_frames(&self, subs: &[String]) -> Vec<String>;

    /// The heartbeat to send every ping interval, given the current unix time in seconds.
    fn heartbeat(&self, now_unix: i64) -> Heartbeat;

    /// How many session steps (`[[session]]`) run after the upgrade, before subscribing.
    fn session_steps(&self) -> usize {
        0
    }

    /// The frames session step `step` sends when it starts (evaluated on every connect).
    fn session_send(&self, step: usize) -> Result<Vec<String>, AdapterError> {
        let _ = step;
        Ok(Vec::new())
    }

    /// What an inbound frame means to session step `step`.
    fn session_check(&self, step: usize, text: &str) -> StepCheck {
        let _ = (step, text);
        StepCheck::Done
    }

    /// How long session step `step` may wait for its frame; `None`: it waits for none.
    fn session_timeout(&self, step: usize) -> Option<std::time::Duration> {
        let _ = step;
        None
    }

    /// How long subscriptions may wait for their acknowledgement (`[subscribe] ack`);
    /// `None`: the dialect expects none.
    fn ack_timeout(&self) -> Option<std::time::Duration> {
        None
    }

    /// The positions in `pending` (subscriptions as shown) that frame `text` acknowledges.
    fn subscribe_acked(&self, text: &str, pending: &[String]) -> Vec<usize> {
        let _ = (text, pending);
        Vec::new()
    }

    /// What binary frames hold (`[connect] binary`).
    fn binary_frames(&self) -> BinaryFrames {
        BinaryFrames::Text
    }

    /// The upgrade statuses that mean the credentials were refused (`auth_failed`).
    fn auth_failure_statuses(&self) -> &[u16] {
        &[401, 403]
    }

    /// The dialect's heartbeat period, used when the upstream sets no `ping_interval`.
    fn heartbeat_interval(&self) -> Option<std::time::Duration> {
        None
    }

    /// Classify and decode one inbound text frame.
    fn decode(&self, text: &str) -> Result<Inbound, DecodeError>;

    /// `[prepare]`: the HTTP request to make before every connect (and every refresh);
    /// `None` when the dialect makes none.
    fn prepare_request(&self) -> Option<Result<http::Request<Vec<u8>>, AdapterError>> {
        None
    }

    /// Takes the answer to the prepare request: a 2xx JSON answer the dialect's `fail` does
    /// not refuse becomes `$prepared` for what the connection sends from now on.
    fn prepared(&self, status: u16, body: &[u8]) -> Result<(), PrepareRefused> {
        let _ = (status, body);
        Ok(())
    }

    /// `[prepare] refresh`: how often the prepare request is repeated while connected.
    fn prepare_refresh(&self) -> Option<std::time::Duration> {
        None
    }

    /// Every event one frame carries (a `split` rule's items, each its own event), with
    /// their sequence numbers and reply frames; at most `max_events` of them (more is a
    /// decode error: `limits.max_split_events`).
    fn decode_frame(&self, text: &str, max_events: usize) -> Result<Decoded, DecodeError> {
        let _ = max_events;
        Ok(match self.decode(text)? {
            Inbound::Control(c) => Decoded::Control(c),
            Inbound::Event(event) => Decoded::Events(vec![FrameEvent {
                event,
                sequence: None,
                reply: None,
            }]),
        })
    }
}

/// Binds `dialect` to one upstream's parameters: the adapter its supervisor runs. Every
/// parameter is checked first (see [`dialect::Dialect::param_problems`]).
pub fn build_adapter(
    dialect: Arc<dialect::Dialect>,
    params: &dialect::Params,
) -> Result<Arc<dyn Adapter>, AdapterError> {
    Ok(Arc::new(dialect::DialectAdapter::bind(dialect, params)?))
}

/// `host[:port]` of an upstream URL: the part of the connection that goes into event ids, so
/// that two connections to the same server (two VoicePact client ids, two bridge instances)
/// produce the same id for the same frame.
pub(crate) fn id_host(url: &url::Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_string(),
        _ => String::new(),
    }
}

/// Checks that `text` nests arrays and objects at most `max_depth` levels deep (`{}` is one
/// level, `{"a":[1]}` two), without parsing it: one pass over the bytes, no recursion and no
/// allocation, so a hostile frame costs no more than its length.
///
/// Why: JSON readers stop at a fixed depth (serde_json at 128 levels), and the bridge wraps
/// a frame in an envelope and a `/v1/ws` event frame, each a level more. A frame just under
/// the reader's limit would be journalled and then be unreadable; the bridge refuses it as a
/// decode error instead. Text that is not JSON is left for the decoder to reject.
pub fn check_depth(text: &str, max_depth: usize) -> Result<(), DecodeError> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in text.as_bytes() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth = depth.saturating_add(1);
                if depth > max_depth {
                    return Err(DecodeError::new(format!(
                        "frame nests deeper than limits.max_depth ({max_depth} levels)"
                    )));
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// A string or number member rendered as a string (ids arrive as either).
pub(crate) fn str_or_number(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A complete WebSocket upgrade request for `url` (key, version and host headers included).
pub(crate) fn upgrade_request(url: &url::Url) -> Result<http::Request<()>, AdapterError> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    url.as_str()
        .into_client_request()
        .map_err(|e| AdapterError::Invalid {
            key: "url".to_string(),
            reason: format!("not a WebSocket URL: {e}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_names_round_trip() {
        for p in Provider::ALL {
            assert_eq!(p.name().parse::<Provider>(), Ok(p));
        }
        assert!("slack".parse::<Provider>().is_err());
    }

    #[test]
    fn depth_counts_nesting_outside_strings_only() {
        assert!(check_depth("{}", 1).is_ok());
        assert!(check_depth(r#"{"a":[1]}"#, 2).is_ok());
        assert!(check_depth(r#"{"a":[1]}"#, 1).is_err());
        assert!(check_depth(r#"{"a":[{}],"b":[[]]}"#, 3).is_ok());
        // Brackets inside strings, escaped quotes included, do not count.
        assert!(check_depth(r#"{"a":"[[[[\"[[[{{{"}"#, 1).is_ok());
        assert!(check_depth(r#"{"a":"\\","b":[[]]}"#, 3).is_ok());
        assert!(check_depth(r#"{"a":"\\","b":[[]]}"#, 2).is_err());
        let deep = format!("{}{}", "[".repeat(126), "]".repeat(126));
        let err = check_depth(&deep, 64).unwrap_err();
        assert!(err.reason.contains("limits.max_depth"), "{err}");
        assert!(check_depth(&deep, 126).is_ok());
        // Not JSON at all is the decoder's business.
        assert!(check_depth("}}}]]", 1).is_ok());
    }
}
