//! VoicePact: the `type` dialect.
//!
//! Wire facts (provider doc, plus the provider's public FastAPI server):
//! - Endpoint `<base>/{client_id}`; the adapter appends the configured `client_id` as the last
//!   path segment. No authentication and nothing is sent on connect, so the upgrade itself is
//!   the whole handshake and there is nothing to subscribe to: a connection receives the
//!   `contract_update`s of the contracts its `client_id` is a party to, and every
//!   `payment_update`.
//! - Heartbeat: `{"type":"ping","timestamp":X}` is echoed as `{"type":"pong","timestamp":X}`.
//! - `{"type":"contract_status","contract_id":..}` gets a `contract_status_response`; replies
//!   to our own requests are control frames, not events.
//! - Pushed `timestamp` is unix seconds, sent as a string in practice; both are accepted.
//! - Invalid client frames are ignored by the server (no error frame).
//!
//! Mapping (the envelope contract, README "How each dialect maps"): `data` is the whole frame
//! (VoicePact has no wrapper), type `voicepact.<type>`, subject `contract/<contract_id>`, time
//! from `timestamp`. Unknown types are forwarded the same way; a frame without a string `type`
//! is a decode error.

pub mod sim;
pub mod wire;

use serde_json::Value;

use crate::{
    id_host, parse_object, redacted_url, str_or_number, upgrade_request, Adapter, AdapterError,
    Control, DecodeError, DecodedEvent, Greeting, Heartbeat, Inbound, Provider, UpstreamSettings,
};

/// The VoicePact dialect bound to one `client_id` connection.
#[derive(Debug)]
pub struct VoicePactAdapter {
    url: url::Url,
    host: String,
}

impl VoicePactAdapter {
    /// Builds the adapter; `client_id` is required and becomes the last path segment.
    pub fn new(settings: UpstreamSettings) -> Result<Self, AdapterError> {
        let client_id =
            settings
                .client_id
                .filter(|c| !c.is_empty())
                .ok_or(AdapterError::Missing {
                    provider: Provider::VoicePact.name().to_string(),
                    key: "client_id".to_string(),
                })?;
        let mut url = settings.url;
        url.path_segments_mut()
            .map_err(|()| AdapterError::Invalid {
                key: "url".to_string(),
                reason: "cannot take a path".into(),
            })?
            .pop_if_empty()
            .push(&client_id);
        Ok(VoicePactAdapter {
            host: id_host(&url),
            url,
        })
    }
}

impl Adapter for VoicePactAdapter {
    fn provider(&self) -> Provider {
        Provider::VoicePact
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
        &[]
    }

    fn subscribe_frames(&self, _subs: &[String]) -> Vec<String> {
        Vec::new()
    }

    fn unsubscribe_frames(&self, _subs: &[String]) -> Vec<String> {
        Vec::new()
    }

    fn heartbeat(&self, now_unix: i64) -> Heartbeat {
        Heartbeat::Text(wire::ping(now_unix))
    }

    fn decode(&self, text: &str) -> Result<Inbound, DecodeError> {
        let frame = parse_object(text)?;
        let kind = match frame.get("type") {
            Some(Value::String(t)) if !t.is_empty() => t.clone(),
            Some(_) => return Err(DecodeError::new("`type` is not a non-empty string")),
            None => return Err(DecodeError::new("frame has no `type`")),
        };
        match kind.as_str() {
            wire::PONG => return Ok(Inbound::Control(Control::Pong)),
            wire::CONTRACT_STATUS_RESPONSE => return Ok(Inbound::Control(Control::Reply)),
            _ => {}
        }
        let subject = str_or_number(frame.get("contract_id")).map(|c| format!("contract/{c}"));
        let time = crate::parse_provider_time(frame.get("timestamp"));
        let data = Value::Object(frame);
        Ok(Inbound::Event(DecodedEvent {
            id_from_content: true,
            id: crate::event_id(Provider::VoicePact.name(), &self.host, &data),
            event_type: format!("voicepact.{kind}"),
            subject,
            time,
            data,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter() -> VoicePactAdapter {
        VoicePactAdapter::new(UpstreamSettings {
            url: url::Url::parse("ws://127.0.0.1:9101/api/v1/ws").unwrap(),
            client_id: Some("+254700000001".into()),
            token: None,
            topics: vec![],
            lobbies: vec![],
        })
        .unwrap()
    }

    #[test]
    fn client_id_is_the_last_path_segment() {
        let a = adapter();
        let req = a.connect_request().unwrap();
        assert_eq!(req.uri().path(), "/api/v1/ws/+254700000001");
    }

    #[test]
    fn control_frames_are_not_events() {
        let a = adapter();
        assert_eq!(
            a.decode(r#"{"type":"pong","timestamp":5}"#),
            Ok(Inbound::Control(Control::Pong))
        );
        assert_eq!(
            a.decode(r#"{"type":"contract_status_response","contract_id":"c","status":"active"}"#),
            Ok(Inbound::Control(Control::Reply))
        );
    }

    #[test]
    fn malformed_frames_are_errors() {
        let a = adapter();
        assert!(a.decode("not json").is_err());
        assert!(a.decode("[1,2]").is_err());
        assert!(a.decode(r#"{"contract_id":"c"}"#).is_err());
        assert!(a.decode(r#"{"type":7}"#).is_err());
    }

    #[test]
    fn unknown_types_are_forwarded() {
        let a = adapter();
        match a.decode(r#"{"type":"dispute_opened","contract_id":42}"#) {
            Ok(Inbound::Event(e)) => {
                assert_eq!(e.event_type, "voicepact.dispute_opened");
                assert_eq!(e.subject.as_deref(), Some("contract/42"));
            }
            other => panic!("{other:?}"),
        }
    }
}
