//! `wsbridge route --explain`: which routes an event matches, and why the others do not.
//!
//! Operators route with configuration, so they need to see the configuration's verdict on a
//! real event without running the bridge: the input is either a canonical envelope (as a
//! webhook receiver or consumer got it) or a raw frame of any dialect, built-in or a user's,
//! which is decoded first with the dialect of the named upstream, or of the configured
//! upstream whose dialect reads the most from it.

use anyhow::{bail, Context};
use chrono::Utc;
use serde_json::Value;
use wsbridge_adapters::{DecodedEvent, Inbound};

use crate::config::{Config, UpstreamConfig};
use crate::envelope::{source_for, Envelope};

/// Turns the input into an envelope; also says how it was obtained.
///
/// A raw frame is decoded with the named upstream's dialect; without `--upstream`, with the
/// dialect of every configured upstream (the first upstream of each), and the decode that
/// reads the most from the frame (a subject, a time, a type other than `<name>.unknown`)
/// wins, ties going to the upstream first in the config; the others that also decode it are
/// named, so the operator can pick one with `--upstream`.
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
    if let Some(name) = upstream {
        let chosen = config
            .upstreams
            .iter()
            .find(|u| u.name == name)
            .with_context(|| format!("no upstream named {name:?} in the config"))?;
        let decoded = decode(chosen, input)?;
        return Ok((
            envelope(chosen, decoded),
            format!(
                "a {} frame, decoded as upstream {:?}",
                chosen.adapter, chosen.name
            ),
        ));
    }
    let mut tried: Vec<&str> = Vec::new();
    let mut decoded: Vec<(&UpstreamConfig, DecodedEvent)> = Vec::new();
    let mut refused: Vec<String> = Vec::new();
    for u in &config.upstreams {
        if tried.contains(&u.adapter.as_str()) {
            continue;
        }
        tried.push(&u.adapter);
        match decode(u, input) {
            Ok(e) => decoded.push((u, e)),
            Err(e) => refused.push(format!("{e:#}")),
        }
    }
    let best = decoded
        .iter()
        .enumerate()
        .max_by_key(|(i, (u, e))| (score(u, e), std::cmp::Reverse(*i)))
        .map(|(i, _)| i);
    let Some(best) = best else {
        if tried.is_empty() {
            bail!("no upstream is configured to decode the frame with");
        }
        bail!(
            "no configured dialect decodes the frame as an event:\n  {}",
            refused.join("\n  ")
        );
    };
    let (chosen, event) = decoded.swap_remove(best);
    let others: Vec<String> = decoded
        .iter()
        .map(|(u, _)| format!("{:?} ({})", u.name, u.adapter))
        .collect();
    let mut how = format!(
        "a {} frame, decoded as upstream {:?}",
        chosen.adapter, chosen.name
    );
    if !others.is_empty() {
        how.push_str(&format!(
            "; it also decodes as {} (choose with --upstream)",
            others.join(", ")
        ));
    }
    Ok((envelope(chosen, event), how))
}

/// How much a dialect read from the frame: a subject, a time, a named type.
fn score(u: &UpstreamConfig, e: &DecodedEvent) -> u8 {
    u8::from(e.subject.is_some())
        + u8::from(e.time.is_some())
        + u8::from(e.event_type != format!("{}.unknown", u.adapter))
}

/// Decodes `input` with `u`'s dialect; anything but an event is an error.
fn decode(u: &UpstreamConfig, input: &str) -> anyhow::Result<DecodedEvent> {
    let adapter = u
        .build_adapter()
        .with_context(|| format!("upstream {:?}", u.name))?;
    match adapter.decode(input) {
        Ok(Inbound::Event(decoded)) => Ok(decoded),
        Ok(Inbound::Control(c)) => bail!(
            "that {} frame is a control frame ({c:?}), not an event",
            u.adapter
        ),
        Err(e) => bail!("the {} dialect cannot decode the frame: {e}", u.adapter),
    }
}

fn envelope(u: &UpstreamConfig, decoded: DecodedEvent) -> Envelope {
    Envelope::new(decoded, &source_for(&u.name), &u.adapter, Utc::now())
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

    /// The three built-ins, VoicePact first (as in the shipped config.toml).
    const CONFIG: &str = r#"
[[upstreams]]
name = "vp"
adapter = "voicepact"
url = "ws://127.0.0.1:9101/api/v1/ws"
client_id = "+1"
[[upstreams]]
name = "vb"
adapter = "voipbin"
url = "ws://127.0.0.1:9102/v1.0/ws"
token = "t"
[[upstreams]]
name = "hs"
adapter = "hashi"
url = "ws://127.0.0.1:9103/"
token = "t"
"#;

    #[test]
    fn a_raw_frame_is_decoded_by_the_dialect_that_reads_the_most_from_it() {
        let config = Config::from_toml(CONFIG, |_| None, false).expect("config");
        for (frame, provider, upstream) in [
            (
                r#"{"event_type":"call.status","timestamp":"2024-01-15T10:30:00Z","topic":"t:1:call:2","data":{}}"#,
                "voipbin",
                "vb",
            ),
            (
                r#"{"type":"contract:event","data":{"type":"contract.created","contractId":"c1","timestamp":"2024-01-15T10:01:00Z"}}"#,
                "hashi",
                "hs",
            ),
            (
                r#"{"type":"payment_update","contract_id":"c1","timestamp":"1717171717"}"#,
                "voicepact",
                "vp",
            ),
        ] {
            let (envelope, how) = to_envelope(&config, frame, None).expect("decodes");
            assert_eq!(envelope.provider, provider, "{frame}: {how}");
            assert!(how.contains(&format!("upstream {upstream:?}")), "{how}");
        }
        let err = to_envelope(&config, r#"{"nothing":1}"#, Some("vb")).expect_err("no type");
        assert!(
            err.to_string().contains("voipbin dialect cannot decode"),
            "{err}"
        );
    }
}
