//! `wsbridge route --explain`: which routes an event matches, and why the others do not.
//!
//! Operators route with configuration, so they need to see the configuration's verdict on a
//! real event without running the bridge: the input is either a canonical envelope (as a
//! webhook receiver or consumer got it) or a raw provider frame, which is decoded first with
//! the adapter of the named upstream, or of the provider whose dialect the frame's shape
//! shows.

use anyhow::{bail, Context};
use chrono::Utc;
use serde_json::Value;
use wsbridge_adapters::{Inbound, Provider};

use crate::config::Config;
use crate::envelope::{source_for, Envelope};

/// Turns the input into an envelope; also says how it was obtained.
pub fn to_envelope(
    config: &Config,
    input: &str,
    upstream: Option<&str>,
) -> anyhow::Result<(Envelope, String)> {
    let value: Value = serde_json::from_str(input).context("the event file is not JSON")?;
    if value.get("specversion").is_some() {
        let envelope: Envelope =
            serde_json::from_value(value).context("not a valid wsbridge envelope")?;
        return Ok((envelope, "a canonical envelope".into()));
    }
    let chosen = match upstream {
        Some(name) => config
            .upstreams
            .iter()
            .find(|u| u.name == name)
            .with_context(|| format!("no upstream named {name:?} in the config"))?,
        None => {
            let provider = guess_provider(&value);
            config
                .upstreams
                .iter()
                .find(|u| u.adapter == provider)
                .with_context(|| format!("the frame looks like {provider}, but no {provider} upstream is configured (use --upstream)"))?
        }
    };
    let adapter = wsbridge_adapters::build_adapter(chosen.adapter, chosen.adapter_settings())?;
    match adapter.decode(input) {
        Ok(Inbound::Event(decoded)) => {
            let envelope = Envelope::new(
                decoded,
                &source_for(&chosen.name),
                chosen.adapter,
                Utc::now(),
            );
            Ok((
                envelope,
                format!(
                    "a {} frame, decoded as upstream {:?}",
                    chosen.adapter, chosen.name
                ),
            ))
        }
        Ok(Inbound::Control(c)) => bail!(
            "that {} frame is a control frame ({c:?}), not an event",
            chosen.adapter
        ),
        Err(e) => bail!(
            "the {} adapter cannot decode the frame: {e}",
            chosen.adapter
        ),
    }
}

/// The dialect a raw frame's shape shows: `event_type` is VoIPBIN, a `<family>:event` type
/// or a `data.type` is Hashi, anything else with a `type` is VoicePact.
fn guess_provider(frame: &Value) -> Provider {
    if frame.get("event_type").is_some() {
        return Provider::Voipbin;
    }
    let kind = frame.get("type").and_then(Value::as_str).unwrap_or("");
    if kind.ends_with(":event") || frame.pointer("/data/type").is_some() {
        Provider::Hashi
    } else {
        Provider::VoicePact
    }
}

/// The human-readable report.
pub fn report(config: &Config, envelope: &Envelope, how: &str) -> String {
    let mut out = format!(
        "event: {} (subject {}, provider {}) from {how}\n",
        envelope.event_type,
        envelope.subject.as_deref().unwrap_or("-"),
        envelope.provider
    );
    let explanations = config.router.explain(envelope);
    if explanations.is_empty() {
        out.push_str("no [[routes]] are configured: the event goes to no webhook\n");
    }
    for (route, e) in config.routes.iter().zip(&explanations) {
        let verdict = if e.matched {
            format!("MATCH    -> {}", route.to.join(", "))
        } else {
            "no match".to_string()
        };
        out.push_str(&format!("\nroute {:?}: {verdict}\n", e.route));
        for reason in &e.reasons {
            out.push_str(&format!("    {reason}\n"));
        }
    }
    let targets = config.router.targets(envelope);
    out.push_str(&format!(
        "\nwebhooks: {}\n",
        if targets.is_empty() {
            "(none)".to_string()
        } else {
            targets
                .iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn dialects_are_guessed_from_shape() {
        assert_eq!(
            guess_provider(&json!({"event_type": "call.status"})),
            Provider::Voipbin
        );
        assert_eq!(
            guess_provider(&json!({"type": "lobby:event", "data": {}})),
            Provider::Hashi
        );
        assert_eq!(
            guess_provider(&json!({"type": "payment_update"})),
            Provider::VoicePact
        );
    }
}
