//! Hashi: the wrapped `contract:event` dialect.
//!
//! Wire facts (provider doc; Hashi publishes no server code, so the shapes the doc leaves open
//! are our choice, written here and mirrored by the simulator in `sim.rs`):
//! - Endpoint `<base>?token=<jwt>`. The server greets with `{"type":"connected","data":{..}}`;
//!   the adapter waits for it before subscribing.
//! - Auth failure arrives as `{"type":"error","data":{"code":"AUTH_ERROR",..}}` followed by a
//!   close, or as HTTP 401 on the upgrade; both put the upstream in `auth_failed`.
//! - Client frames: `{"type":"ping"}` (answered by `{"type":"pong"}`),
//!   `{"type":"subscribe","data":{"lobbyId":..}}`, `{"type":"unsubscribe","data":{"lobbyId":..}}`,
//!   one frame per lobby. The doc shows no subscription acknowledgement, so none is awaited
//!   (a `subscribed` frame, should the server ever send one, is forwarded like any unknown
//!   frame, as the envelope contract says: only `connected`, `pong` and `error` are control
//!   frames; README, "How each dialect maps").
//! - Server frames: `{"type":"<kind>:event","data":{"type":"<kind>.<event>",..}}` for kinds
//!   `contract` (broadcast to everyone), `lobby` and `storage` (to the lobby's room only).
//!
//! Mapping (the envelope contract, README "How each dialect maps"): `data` is the frame's
//! `data` member; type `hashi.<data.type>`; subject `<kind>/<data.<kind>Id>`
//! (`contract/<contractId>`, `lobby/<lobbyId>`, `storage/<storageId>`, and the same rule for
//! kinds the doc does not list yet, such as the bounty updates its title mentions); time from
//! `data.timestamp`. A `:event` frame whose `data` has no string `type` is a decode error. Any
//! other unknown frame `type` is forwarded as `hashi.<type>` with its `data` member (or the
//! whole frame when it has none), never dropped.

pub mod sim;
pub mod wire;

use serde_json::Value;

use crate::{
    id_host, parse_object, redacted_url, str_or_number, upgrade_request, with_token, Adapter,
    AdapterError, Control, DecodeError, DecodedEvent, Greeting, Heartbeat, Inbound, Provider,
    UpstreamSettings,
};

/// The Hashi dialect bound to one player token and its lobby rooms.
#[derive(Debug)]
pub struct HashiAdapter {
    url: url::Url,
    host: String,
    lobbies: Vec<String>,
}

impl HashiAdapter {
    /// Builds the adapter; a token is required.
    pub fn new(settings: UpstreamSettings) -> Result<Self, AdapterError> {
        let token = settings.token.ok_or(AdapterError::Missing {
            provider: Provider::Hashi.name().to_string(),
            key: "token".to_string(),
        })?;
        if let Some(bad) = settings.lobbies.iter().find(|l| l.is_empty()) {
            return Err(AdapterError::Invalid {
                key: "lobbies".to_string(),
                reason: format!("empty lobby id {bad:?}"),
            });
        }
        let url = with_token(&settings.url, &token);
        Ok(HashiAdapter {
            host: id_host(&url),
            url,
            lobbies: settings.lobbies,
        })
    }
}

impl Adapter for HashiAdapter {
    fn provider(&self) -> Provider {
        Provider::Hashi
    }

    fn connect_request(&self) -> Result<http::Request<()>, AdapterError> {
        upgrade_request(&self.url)
    }

    fn display_url(&self) -> String {
        redacted_url(&self.url)
    }

    fn greeting(&self) -> Greeting {
        Greeting::AwaitConnected
    }

    fn subscriptions(&self) -> &[String] {
        &self.lobbies
    }

    fn subscribe_frames(&self, subs: &[String]) -> Vec<String> {
        subs.iter().map(|l| wire::subscribe(l)).collect()
    }

    fn unsubscribe_frames(&self, subs: &[String]) -> Vec<String> {
        subs.iter().map(|l| wire::unsubscribe(l)).collect()
    }

    fn heartbeat(&self, _now_unix: i64) -> Heartbeat {
        Heartbeat::Text(wire::ping())
    }

    fn decode(&self, text: &str) -> Result<Inbound, DecodeError> {
        let frame = parse_object(text)?;
        let kind = match frame.get("type") {
            Some(Value::String(t)) if !t.is_empty() => t.clone(),
            Some(_) => return Err(DecodeError::new("`type` is not a non-empty string")),
            None => return Err(DecodeError::new("frame has no `type`")),
        };
        match kind.as_str() {
            wire::CONNECTED => return Ok(Inbound::Control(Control::Connected)),
            wire::PONG => return Ok(Inbound::Control(Control::Pong)),
            wire::ERROR => return Ok(Inbound::Control(error_control(frame.get("data")))),
            _ => {}
        }
        let mut frame = Value::Object(frame);
        let id = crate::event_id(Provider::Hashi.name(), &self.host, &frame);
        if let Some(family) = kind.strip_suffix(wire::EVENT_SUFFIX) {
            let data = frame.get_mut("data").map(Value::take).unwrap_or_default();
            let Some(Value::String(event)) = data.get("type") else {
                return Err(DecodeError::new(format!(
                    "`{kind}` frame has no `data.type` string"
                )));
            };
            let event_type = format!("hashi.{event}");
            let subject = str_or_number(data.get(format!("{family}Id").as_str()))
                .map(|id| format!("{family}/{id}"));
            return Ok(Inbound::Event(DecodedEvent {
                id_from_content: true,
                id,
                event_type,
                subject,
                time: crate::parse_provider_time(data.get("timestamp")),
                data,
            }));
        }
        // An unknown non-event frame: forwarded, never dropped.
        let data = match frame.get_mut("data") {
            Some(d) => d.take(),
            None => frame,
        };
        Ok(Inbound::Event(DecodedEvent {
            id_from_content: true,
            id,
            event_type: format!("hashi.{kind}"),
            subject: None,
            time: crate::parse_provider_time(data.get("timestamp")),
            data,
        }))
    }
}

fn error_control(data: Option<&Value>) -> Control {
    let code = data
        .and_then(|d| d.get("code"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let message = data
        .and_then(|d| d.get("message"))
        .and_then(Value::as_str)
        .unwrap_or("(no message)")
        .to_string();
    if code.as_deref() == Some(wire::AUTH_ERROR) {
        Control::AuthFailed { message }
    } else {
        Control::Error { code, message }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Secret;

    fn adapter() -> HashiAdapter {
        HashiAdapter::new(UpstreamSettings {
            url: url::Url::parse("ws://127.0.0.1:9103/").unwrap(),
            client_id: None,
            token: Some(Secret::new("jwt")),
            topics: vec![],
            lobbies: vec!["ABC123".into()],
        })
        .unwrap()
    }

    #[test]
    fn control_frames() {
        let a = adapter();
        assert_eq!(
            a.decode(r#"{"type":"connected","data":{}}"#),
            Ok(Inbound::Control(Control::Connected))
        );
        assert_eq!(
            a.decode(r#"{"type":"pong"}"#),
            Ok(Inbound::Control(Control::Pong))
        );
        assert_eq!(
            a.decode(
                r#"{"type":"error","data":{"message":"Authentication failed","code":"AUTH_ERROR"}}"#
            ),
            Ok(Inbound::Control(Control::AuthFailed {
                message: "Authentication failed".into()
            }))
        );
        assert!(matches!(
            a.decode(r#"{"type":"error","data":{"message":"nope","code":"RATE"}}"#),
            Ok(Inbound::Control(Control::Error { .. }))
        ));
    }

    #[test]
    fn unknown_families_follow_the_same_rule() {
        let a = adapter();
        match a
            .decode(r#"{"type":"bounty:event","data":{"type":"bounty.claimed","bountyId":"b1"}}"#)
        {
            Ok(Inbound::Event(e)) => {
                assert_eq!(e.event_type, "hashi.bounty.claimed");
                assert_eq!(e.subject.as_deref(), Some("bounty/b1"));
            }
            other => panic!("{other:?}"),
        }
        assert!(a
            .decode(r#"{"type":"lobby:event","data":{"lobbyId":"x"}}"#)
            .is_err());
        assert!(a.decode(r#"{"data":{}}"#).is_err());
    }

    #[test]
    fn one_subscribe_frame_per_lobby() {
        let a = adapter();
        assert_eq!(
            a.subscribe_frames(a.subscriptions()),
            vec![r#"{"type":"subscribe","data":{"lobbyId":"ABC123"}}"#]
        );
    }
}
