//! VoIPBIN: the `event_type` dialect.
//!
//! Wire facts (provider doc, plus the provider's public Go monorepo):
//! - Endpoint `<base>?token=<token>`; the server also accepts `Authorization: Bearer` and a
//!   cookie, we use the query the doc shows. A bad token gets **HTTP 401 before the upgrade**
//!   with a JSON error body, which the supervisor reports as `auth_failed`.
//! - `{"type":"subscribe","topics":[..]}` / `{"type":"unsubscribe","topics":[..]}`; the server
//!   sends **no acknowledgement**, so the upstream counts as subscribed once they are written.
//!   An invalid topic makes the server close the socket.
//! - Keep-alive is protocol level: the server pings every 10 s and drops a client that has not
//!   answered for 60 s; tungstenite answers pings as it reads, and our own heartbeat is a
//!   protocol ping too.
//! - Events: `{"event_type":"call.status","timestamp":"<RFC 3339>","topic":..,"data":{..}}`.
//!   Legacy frames `{"type":"call_created","data":{..}}` are also accepted.
//!
//! Mapping (the envelope contract, README "How each dialect maps"): `data` is the frame's
//! `data` member; `event_type` → type `voipbin.<event_type>`, `topic` → subject, `timestamp` →
//! time. Legacy frames become `voipbin.<type>` with their `data` member (and `topic` as subject
//! when present). A frame with neither `event_type` nor `type`, or without `data`, is a decode
//! error.

pub mod sim;
pub mod wire;

use serde_json::Value;

use crate::{
    id_host, parse_object, redacted_url, upgrade_request, with_token, Adapter, AdapterError,
    DecodeError, DecodedEvent, Greeting, Heartbeat, Inbound, Provider, UpstreamSettings,
};

/// The VoIPBIN dialect bound to one token and its topic subscriptions.
#[derive(Debug)]
pub struct VoipbinAdapter {
    url: url::Url,
    host: String,
    topics: Vec<String>,
}

impl VoipbinAdapter {
    /// Builds the adapter; a token is required, topics are checked against the topic format.
    pub fn new(settings: UpstreamSettings) -> Result<Self, AdapterError> {
        let token = settings.token.ok_or(AdapterError::Missing {
            provider: Provider::Voipbin.name().to_string(),
            key: "token".to_string(),
        })?;
        for t in &settings.topics {
            wire::check_topic(t).map_err(|reason| AdapterError::Invalid {
                key: "topics".to_string(),
                reason: format!("{t:?}: {reason}"),
            })?;
        }
        let url = with_token(&settings.url, &token);
        Ok(VoipbinAdapter {
            host: id_host(&url),
            url,
            topics: settings.topics,
        })
    }
}

impl Adapter for VoipbinAdapter {
    fn provider(&self) -> Provider {
        Provider::Voipbin
    }

    fn connect_request(&self) -> Result<http::Request<()>, AdapterError> {
        upgrade_request(&self.url)
    }

    fn display_url(&self) -> String {
        redacted_url(&self.url)
    }

    fn greeting(&self) -> Greeting {
        Greeting::Upgrade
    }

    fn subscriptions(&self) -> &[String] {
        &self.topics
    }

    fn subscribe_frames(&self, subs: &[String]) -> Vec<String> {
        if subs.is_empty() {
            return Vec::new();
        }
        vec![wire::subscribe(subs)]
    }

    fn unsubscribe_frames(&self, subs: &[String]) -> Vec<String> {
        if subs.is_empty() {
            return Vec::new();
        }
        vec![wire::unsubscribe(subs)]
    }

    fn heartbeat(&self, _now_unix: i64) -> Heartbeat {
        Heartbeat::Protocol
    }

    fn decode(&self, text: &str) -> Result<Inbound, DecodeError> {
        let frame = parse_object(text)?;
        let kind = match (frame.get("event_type"), frame.get("type")) {
            (Some(Value::String(t)), _) if !t.is_empty() => t.clone(),
            (Some(_), _) => return Err(DecodeError::new("`event_type` is not a non-empty string")),
            (None, Some(Value::String(t))) if !t.is_empty() => t.clone(),
            _ => {
                return Err(DecodeError::new(
                    "frame has neither `event_type` nor `type`",
                ))
            }
        };
        if !frame.contains_key("data") {
            return Err(DecodeError::new("event frame has no `data`"));
        }
        let subject = match frame.get("topic") {
            Some(Value::String(t)) if !t.is_empty() => Some(t.clone()),
            _ => None,
        };
        let time = crate::parse_provider_time(frame.get("timestamp"));
        let mut frame = Value::Object(frame);
        let id = crate::event_id(Provider::Voipbin.name(), &self.host, &frame);
        let data = frame.get_mut("data").map(Value::take).unwrap_or_default();
        Ok(Inbound::Event(DecodedEvent {
            id_from_content: true,
            id,
            event_type: format!("voipbin.{kind}"),
            subject,
            time,
            data,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Control, Secret};

    fn adapter() -> VoipbinAdapter {
        VoipbinAdapter::new(UpstreamSettings {
            url: url::Url::parse("ws://127.0.0.1:9102/v1.0/ws").unwrap(),
            client_id: None,
            token: Some(Secret::new("tok en&x")),
            topics: vec!["customer_id:abc123:call:*".into()],
            lobbies: vec![],
        })
        .unwrap()
    }

    #[test]
    fn token_goes_in_the_query_and_never_in_the_display_url() {
        let a = adapter();
        let req = a.connect_request().unwrap();
        assert_eq!(req.uri().query(), Some("token=tok+en%26x"));
        assert!(!a.display_url().contains("tok+en"), "{}", a.display_url());
    }

    #[test]
    fn subscribe_frame_lists_topics() {
        let a = adapter();
        let frames = a.subscribe_frames(a.subscriptions());
        assert_eq!(
            frames,
            vec![r#"{"type":"subscribe","topics":["customer_id:abc123:call:*"]}"#]
        );
    }

    #[test]
    fn legacy_frames_are_events_and_malformed_are_errors() {
        let a = adapter();
        match a.decode(r#"{"type":"call_created","data":{"id":"c1"}}"#) {
            Ok(Inbound::Event(e)) => assert_eq!(e.event_type, "voipbin.call_created"),
            other => panic!("{other:?}"),
        }
        assert!(a.decode(r#"{"event_type":"call.status"}"#).is_err());
        assert!(a.decode(r#"{"topic":"x"}"#).is_err());
        assert!(a.decode("{").is_err());
        assert!(!matches!(
            a.decode(r#"{"type":"x","data":1}"#),
            Ok(Inbound::Control(Control::Pong))
        ));
    }

    #[test]
    fn bad_topics_are_refused_at_build() {
        let err = VoipbinAdapter::new(UpstreamSettings {
            url: url::Url::parse("ws://127.0.0.1:9102/v1.0/ws").unwrap(),
            client_id: None,
            token: Some(Secret::new("t")),
            topics: vec!["customer_id:abc123".into()],
            lobbies: vec![],
        });
        assert!(err.is_err());
    }
}
