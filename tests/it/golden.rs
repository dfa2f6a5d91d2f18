//! Golden tests for the envelope contract (README, "The canonical envelope (contract)" and
//! "How each dialect maps").
//!
//! Every `tests/fixtures/<provider>/<name>.frame.json` is one raw frame exactly as the provider
//! sends it; the `<name>.envelope.json` beside it is the envelope the bridge must emit for it,
//! stamped as if it arrived on upstream `<provider>-main` at [`RECEIVED`] and was journalled at
//! `seq` 1. The directory is walked, so a new fixture pair is picked up without touching this
//! file (see `tests/fixtures/README.md`).

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Value};
use wsbridge::envelope::{source_for, Envelope};
use wsbridge_adapters::dialect::{builtin, Params};
use wsbridge_adapters::{build_adapter, Adapter, Inbound, Provider};

/// Where the fixtures live.
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// The receive time every fixture is stamped with (and its expected `recvtime`).
const RECEIVED: &str = "2024-06-01T12:00:00.123456Z";

/// The CloudEvents attributes in the order the envelope serialises them (fixed by
/// `src/envelope.rs`; receivers may rely on it).
const ATTRIBUTE_ORDER: [&str; 11] = [
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "data",
    "provider",
    "recvtime",
    "seq",
];

/// The upstream name each provider's fixtures are received on: `<dialect>-main`.
fn upstream_name(provider: &str) -> String {
    format!("{provider}-main")
}

/// At least this many fixtures must exist per provider, so a lost or emptied directory fails.
fn min_fixtures(provider: Provider) -> usize {
    match provider {
        Provider::VoicePact => 7,
        Provider::Voipbin => 18,
        Provider::Hashi => 20,
    }
}

/// Every event type the provider's doc (and the wire facts in its adapter's module doc) names;
/// each needs a fixture.
fn documented_types(provider: Provider) -> &'static [&'static str] {
    match provider {
        Provider::VoicePact => &["voicepact.contract_update", "voicepact.payment_update"],
        Provider::Voipbin => &[
            "voipbin.call.status",
            "voipbin.call.created",
            "voipbin.message.received",
            "voipbin.message.sent",
            "voipbin.message.delivery",
            "voipbin.activeflow.updated",
            "voipbin.activeflow.completed",
            "voipbin.conference.joined",
            "voipbin.conference.left",
            "voipbin.queue.joined",
            "voipbin.queue.connected",
            "voipbin.agent.status",
            "voipbin.recording.completed",
            "voipbin.call.ended",
            "voipbin.call.assigned",
            "voipbin.call_created",
        ],
        Provider::Hashi => &[
            "hashi.contract.created",
            "hashi.contract.initializing",
            "hashi.contract.initialized",
            "hashi.contract.deleted",
            "hashi.contract.payment_transferred",
            "hashi.contract.outcome_attested",
            "hashi.contract.decision_contested",
            "hashi.contract.mediation_submitted",
            "hashi.contract.admin_decision",
            "hashi.contract.payout_finalized",
            "hashi.lobby.created",
            "hashi.lobby.joined",
            "hashi.lobby.left",
            "hashi.lobby.deleted",
            "hashi.storage.external_url_created",
            "hashi.storage.presigned_url_created",
            "hashi.storage.multipart_completed",
            "hashi.storage.multipart_aborted",
            "hashi.storage.deleted",
        ],
    }
}

/// The built-in dialect of `provider` bound to a fixture upstream at `url` (the provider's
/// simulator URL when `None`).
fn bind(provider: Provider, client_id: &str, url: Option<&str>) -> Arc<dyn Adapter> {
    let (default_url, key, value) = match provider {
        Provider::VoicePact => ("ws://127.0.0.1:9101/api/v1/ws", "client_id", client_id),
        Provider::Voipbin => ("ws://127.0.0.1:9102/v1.0/ws", "token", "t"),
        Provider::Hashi => ("ws://127.0.0.1:9103/", "token", "t"),
    };
    let url = url::Url::parse(url.unwrap_or(default_url)).expect("fixture upstream URL parses");
    let mut p = Params::new(&url);
    p.set(key, serde_json::Value::String(value.to_string()));
    let dialect = builtin(provider.name())
        .expect("built in")
        .expect("built-in dialect loads");
    build_adapter(dialect, &p).unwrap_or_else(|e| panic!("{provider} adapter builds: {e}"))
}

fn adapter(provider: Provider) -> Arc<dyn Adapter> {
    bind(provider, "+254700000001", None)
}

fn received() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(RECEIVED)
        .expect("RECEIVED is RFC 3339")
        .with_timezone(&Utc)
}

/// One frame/envelope pair.
struct Fixture {
    provider: Provider,
    /// `<provider>/<name>`, for messages.
    name: String,
    /// The frame as it arrived on the wire (one trailing newline of the file removed).
    frame: String,
    /// The expected envelope.
    expected: Value,
    /// The expected file's attribute names in the order written.
    expected_keys: Vec<String>,
}

/// The member names of a JSON object in the order they appear in its text (independent of
/// how `serde_json::Value` orders maps).
struct KeyOrder(Vec<String>);

impl<'de> Deserialize<'de> for KeyOrder {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> Visitor<'de> for Keys {
            type Value = KeyOrder;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<KeyOrder, A::Error> {
                let mut keys = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    map.next_value::<IgnoredAny>()?;
                    keys.push(key);
                }
                Ok(KeyOrder(keys))
            }
        }
        deserializer.deserialize_map(Keys)
    }
}

/// Every fixture pair, checked for completeness: each frame has an envelope, each envelope a
/// frame, every provider directory is named after a provider and holds enough fixtures.
fn fixtures() -> Vec<Fixture> {
    let mut out = Vec::new();
    let root = Path::new(FIXTURES);
    let mut entries: Vec<PathBuf> = fs::read_dir(root)
        .unwrap_or_else(|e| panic!("reading {}: {e}", root.display()))
        .map(|e| e.expect("fixture dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let file_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if !path.is_dir() {
            assert!(
                !file_name.ends_with(".json"),
                "{}: fixtures go in tests/fixtures/<provider>/",
                path.display()
            );
            continue;
        }
        let provider: Provider = file_name.parse().unwrap_or_else(|e| {
            panic!(
                "{}: a fixture directory is named after a provider: {e}",
                path.display()
            )
        });
        let before = out.len();
        collect(provider, root, &path, &mut out);
        let found = out.len() - before;
        assert!(
            found >= min_fixtures(provider),
            "{provider}: found {found} fixtures in {}, expected at least {}",
            path.display(),
            min_fixtures(provider)
        );
    }
    for provider in Provider::ALL {
        assert!(
            out.iter().any(|f| f.provider == provider),
            "no fixtures at all for {provider} under {FIXTURES}"
        );
    }
    out
}

fn collect(provider: Provider, root: &Path, dir: &Path, out: &mut Vec<Fixture>) {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("fixture dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect(provider, root, &path, out);
            continue;
        }
        let shown = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .display()
            .to_string();
        let file_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if let Some(stem) = file_name.strip_suffix(".envelope.json") {
            assert!(
                path.with_file_name(format!("{stem}.frame.json")).is_file(),
                "{shown}: expected envelope without a {stem}.frame.json beside it"
            );
            continue;
        }
        let Some(stem) = file_name.strip_suffix(".frame.json") else {
            panic!("{shown}: not a fixture (expected <name>.frame.json or <name>.envelope.json)");
        };
        let envelope_path = path.with_file_name(format!("{stem}.envelope.json"));
        let frame = fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {shown}: {e}"));
        let frame = frame.strip_suffix('\n').unwrap_or(&frame).to_string();
        let expected = fs::read_to_string(&envelope_path).unwrap_or_else(|e| {
            panic!("{shown} has no readable {stem}.envelope.json beside it: {e}")
        });
        let KeyOrder(expected_keys) = serde_json::from_str(&expected).unwrap_or_else(|e| {
            panic!("{stem}.envelope.json beside {shown} is not a JSON object: {e}")
        });
        let expected: Value = serde_json::from_str(&expected)
            .unwrap_or_else(|e| panic!("{stem}.envelope.json beside {shown} is not JSON: {e}"));
        out.push(Fixture {
            provider,
            name: shown.trim_end_matches(".frame.json").to_string(),
            frame,
            expected,
            expected_keys,
        });
    }
}

/// Decodes one frame on the provider's fixture adapter and stamps it like the bridge does.
fn envelope_for(adapter: &dyn Adapter, frame: &str) -> Result<Envelope, String> {
    let provider = adapter.provider();
    match adapter.decode(frame) {
        Ok(Inbound::Event(decoded)) => {
            let mut env = Envelope::new(
                decoded,
                &source_for(&upstream_name(provider)),
                provider,
                received(),
            );
            env.seq = Some(1);
            Ok(env)
        }
        Ok(Inbound::Control(c)) => Err(format!("decoded as a control frame, not an event: {c:?}")),
        Err(e) => Err(format!("decode error: {e}")),
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("<unprintable: {e}>"))
}

/// JSON pointers where `actual` and `expected` differ, for a short summary above the dumps.
fn differences(path: &str, actual: &Value, expected: &Value, out: &mut Vec<String>) {
    match (actual, expected) {
        (Value::Object(a), Value::Object(e)) => {
            for (k, ev) in e {
                let p = format!("{path}/{k}");
                match a.get(k) {
                    Some(av) => differences(&p, av, ev, out),
                    None => out.push(format!("{p}: missing (expected {ev})")),
                }
            }
            for (k, av) in a {
                if !e.contains_key(k) {
                    out.push(format!("{path}/{k}: unexpected {av}"));
                }
            }
        }
        (Value::Array(a), Value::Array(e)) if a.len() == e.len() => {
            for (i, (av, ev)) in a.iter().zip(e).enumerate() {
                differences(&format!("{path}/{i}"), av, ev, out);
            }
        }
        _ if actual != expected => out.push(format!(
            "{}: got {actual}, expected {expected}",
            if path.is_empty() { "/" } else { path }
        )),
        _ => {}
    }
}

/// Checks one fixture; `Err` holds a readable report.
fn check(fixture: &Fixture, adapter: &dyn Adapter) -> Result<(), String> {
    let header = format!("=== {} ===\nframe: {}\n", fixture.name, fixture.frame);
    let env = envelope_for(adapter, &fixture.frame).map_err(|e| format!("{header}{e}"))?;
    let bytes = env
        .to_bytes()
        .map_err(|e| format!("{header}envelope does not serialise: {e}"))?;
    let actual: Value = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{header}serialised envelope is not JSON: {e}"))?;

    if actual != fixture.expected {
        let mut diffs = Vec::new();
        differences("", &actual, &fixture.expected, &mut diffs);
        return Err(format!(
            "{header}envelope differs from the expected file:\n  {}\n--- expected\n{}\n--- actual\n{}",
            diffs.join("\n  "),
            pretty(&fixture.expected),
            pretty(&actual)
        ));
    }

    // Same value; now the order of the attributes in the serialised bytes.
    let order: Vec<String> = ATTRIBUTE_ORDER
        .iter()
        .filter(|k| actual.get(**k).is_some())
        .map(|k| k.to_string())
        .collect();
    let KeyOrder(written) = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{header}serialised envelope is not an object: {e}"))?;
    if written != order {
        return Err(format!(
            "{header}serialised attribute order {written:?}, expected {order:?}\n{}",
            String::from_utf8_lossy(&bytes)
        ));
    }
    if fixture.expected_keys != order {
        return Err(format!(
            "{header}the expected file lists attributes as {:?}; write them in the order {order:?}",
            fixture.expected_keys
        ));
    }
    // `data` is the provider's payload unchanged: byte-identical, member order included.
    let data = |v: &Value| serde_json::to_string(&v["data"]).unwrap_or_default();
    if data(&actual) != data(&fixture.expected) {
        return Err(format!(
            "{header}`data` is equal as a value but not byte for byte (member order changed?)\n--- expected\n{}\n--- actual\n{}",
            data(&fixture.expected),
            data(&actual)
        ));
    }
    Ok(())
}

#[test]
fn every_fixture_frame_decodes_to_its_golden_envelope() {
    let fixtures = fixtures();
    let adapters: Vec<(Provider, Arc<dyn Adapter>)> =
        Provider::ALL.into_iter().map(|p| (p, adapter(p))).collect();
    let mut failures = Vec::new();
    for fixture in &fixtures {
        let (_, adapter) = adapters
            .iter()
            .find(|(p, _)| *p == fixture.provider)
            .expect("an adapter per provider");
        if let Err(report) = check(fixture, adapter.as_ref()) {
            failures.push(report);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} golden fixtures failed:\n\n{}",
        failures.len(),
        fixtures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn fixtures_cover_every_documented_event_type() {
    let fixtures = fixtures();
    for provider in Provider::ALL {
        let types: BTreeSet<&str> = fixtures
            .iter()
            .filter(|f| f.provider == provider)
            .filter_map(|f| f.expected["type"].as_str())
            .collect();
        let documented = documented_types(provider);
        let missing: Vec<&&str> = documented.iter().filter(|t| !types.contains(**t)).collect();
        assert!(missing.is_empty(), "{provider}: no fixture for {missing:?}");
        assert!(
            types.iter().any(|t| !documented.contains(t)),
            "{provider}: needs a fixture of an undocumented type (unknown types are forwarded)"
        );
    }
    // The real VoicePact server sends `timestamp` as a string; the doc says a number. Both.
    let payment_timestamps: Vec<Value> = fixtures
        .iter()
        .filter(|f| f.expected["type"] == "voicepact.payment_update")
        .map(|f| f.expected["data"]["timestamp"].clone())
        .collect();
    assert!(
        payment_timestamps.iter().any(Value::is_string)
            && payment_timestamps.iter().any(Value::is_number),
        "voicepact.payment_update needs fixtures with a string and a numeric timestamp: {payment_timestamps:?}"
    );
}

/// Rebuilds `v` with every object's members in reverse order.
fn reversed(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, v) in m.iter().rev() {
                out.insert(k.clone(), reversed(v));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(reversed).collect()),
        other => other.clone(),
    }
}

#[test]
fn id_ignores_member_order_and_whitespace() {
    let fixtures = fixtures();
    for provider in Provider::ALL {
        let adapter = adapter(provider);
        for fixture in fixtures.iter().filter(|f| f.provider == provider) {
            let parsed: Value = serde_json::from_str(&fixture.frame)
                .unwrap_or_else(|e| panic!("{}: frame is not JSON: {e}", fixture.name));
            let reshaped = serde_json::to_string_pretty(&reversed(&parsed)).expect("serialises");
            assert_ne!(
                reshaped, fixture.frame,
                "{}: reshaping changed nothing",
                fixture.name
            );
            let original = envelope_for(adapter.as_ref(), &fixture.frame)
                .unwrap_or_else(|e| panic!("{}: {e}", fixture.name));
            let again = envelope_for(adapter.as_ref(), &reshaped)
                .unwrap_or_else(|e| panic!("{}: reshaped: {e}", fixture.name));
            assert_eq!(
                again.id, original.id,
                "{}: the same frame with other member order and whitespace got another id\n{reshaped}",
                fixture.name
            );
            assert_eq!(
                Some(again.id.as_str()),
                fixture.expected["id"].as_str(),
                "{}",
                fixture.name
            );
        }
    }
}

#[test]
fn payment_update_broadcast_is_one_event_across_client_ids() {
    let fixture = fixtures()
        .into_iter()
        .find(|f| f.name == "voicepact/payment_update")
        .expect("fixture voicepact/payment_update exists");
    let mut ids = Vec::new();
    for client_id in ["+254700000001", "+254700000002"] {
        let adapter = bind(Provider::VoicePact, client_id, None);
        match adapter.decode(&fixture.frame) {
            Ok(Inbound::Event(e)) => ids.push(e.id),
            other => panic!("client {client_id}: expected an event, got {other:?}"),
        }
    }
    assert_eq!(
        ids[0], ids[1],
        "one payment_update broadcast to two client_id connections must be one event"
    );
    assert_eq!(Some(ids[0].as_str()), fixture.expected["id"].as_str());

    // The host is part of the id: the same frame from another server is another event.
    let other = bind(
        Provider::VoicePact,
        "+254700000001",
        Some("ws://127.0.0.1:9201/api/v1/ws"),
    );
    match other.decode(&fixture.frame) {
        Ok(Inbound::Event(e)) => assert_ne!(e.id, ids[0], "another host must give another id"),
        other => panic!("expected an event, got {other:?}"),
    }
}
