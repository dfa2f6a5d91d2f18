//! The dialect engine against the hand-written decoders: every golden fixture, and a set of
//! control, malformed and unusual frames, decoded both ways must give the same result (the
//! same event with the same id and byte-identical `data`, the same control frame, or an
//! error on both sides).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use wsbridge_adapters::dialect::{builtin, DialectAdapter, Params};
use wsbridge_adapters::{
    hashi::HashiAdapter, voicepact::VoicePactAdapter, voipbin::VoipbinAdapter, Adapter, Inbound,
    Provider, Secret, UpstreamSettings,
};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");

/// The connection every fixture is decoded on (tests/fixtures/README.md).
fn settings(provider: Provider) -> UpstreamSettings {
    let (url, client_id, token) = match provider {
        Provider::VoicePact => ("ws://127.0.0.1:9101/api/v1/ws", Some("+254700000001"), None),
        Provider::Voipbin => ("ws://127.0.0.1:9102/v1.0/ws", None, Some(Secret::new("t"))),
        Provider::Hashi => ("ws://127.0.0.1:9103/", None, Some(Secret::new("t"))),
    };
    UpstreamSettings {
        url: url::Url::parse(url).expect("fixture URL parses"),
        client_id: client_id.map(str::to_string),
        token,
        topics: vec!["customer_id:abc123:call:*".into()],
        lobbies: vec!["ABC123".into(), "K7Q2XZ".into()],
    }
}

fn hand_written(provider: Provider) -> Arc<dyn Adapter> {
    let s = settings(provider);
    match provider {
        Provider::VoicePact => Arc::new(VoicePactAdapter::new(s).expect("builds")),
        Provider::Voipbin => Arc::new(VoipbinAdapter::new(s).expect("builds")),
        Provider::Hashi => Arc::new(HashiAdapter::new(s).expect("builds")),
    }
}

fn engine(provider: Provider) -> Arc<dyn Adapter> {
    let dialect = builtin(provider.name())
        .expect("a built-in dialect per provider")
        .unwrap_or_else(|e| panic!("built-in {provider} loads: {e}"));
    Arc::new(
        DialectAdapter::bind(dialect, &Params::from_settings(&settings(provider)))
            .unwrap_or_else(|e| panic!("{provider} binds: {e}")),
    )
}

fn frames(dir: &Path, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            frames(&path, out);
        } else if path.to_string_lossy().ends_with(".frame.json") {
            let text = fs::read_to_string(&path).expect("fixture reads");
            let text = text.strip_suffix('\n').unwrap_or(&text).to_string();
            out.push((path.display().to_string(), text));
        }
    }
}

/// Compares the two decodings of `frame`; `Err` says how they differ.
fn same(provider: Provider, frame: &str) -> Result<(), String> {
    let (a, b) = (
        hand_written(provider).decode(frame),
        engine(provider).decode(frame),
    );
    match (&a, &b) {
        (Ok(Inbound::Event(x)), Ok(Inbound::Event(y))) => {
            let bytes = |v: &serde_json::Value| serde_json::to_string(v).expect("serialises");
            if x != y || bytes(&x.data) != bytes(&y.data) {
                return Err(format!(
                    "events differ:\n  hand-written {x:?}\n  engine       {y:?}"
                ));
            }
            Ok(())
        }
        (Ok(Inbound::Control(x)), Ok(Inbound::Control(y))) if x == y => Ok(()),
        (Err(_), Err(_)) => Ok(()),
        _ => Err(format!("hand-written {a:?}\nengine       {b:?}")),
    }
}

#[test]
fn every_golden_fixture_decodes_identically() {
    let mut checked = 0;
    let mut failures = Vec::new();
    for provider in Provider::ALL {
        let mut found = Vec::new();
        frames(&Path::new(FIXTURES).join(provider.name()), &mut found);
        assert!(!found.is_empty(), "no fixtures for {provider}");
        for (name, frame) in found {
            checked += 1;
            if let Err(e) = same(provider, &frame) {
                failures.push(format!("{name}: {e}"));
            }
            // Every fixture is an event on both paths, not an error on both.
            assert!(
                matches!(engine(provider).decode(&frame), Ok(Inbound::Event(_))),
                "{name}: not an event"
            );
        }
    }
    assert!(checked >= 45, "only {checked} fixtures");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn control_malformed_and_unusual_frames_decode_identically() {
    let cases: &[(Provider, &[&str])] = &[
        (
            Provider::VoicePact,
            &[
                r#"{"type":"pong","timestamp":5}"#,
                r#"{"type":"pong"}"#,
                r#"{"type":"contract_status_response","contract_id":"c","status":"active"}"#,
                r#"{"type":"dispute_opened","contract_id":42}"#,
                r#"{"type":"x","contract_id":4.50}"#,
                r#"{"type":"x","contract_id":""}"#,
                r#"{"type":"x","contract_id":{"a":1}}"#,
                r#"{"type":"x","timestamp":1717171717123}"#,
                r#"{"type":"x","timestamp":"1717171717.25"}"#,
                r#"{"type":"x","timestamp":"yesterday"}"#,
                r#"{"contract_id":"c"}"#,
                r#"{"type":7}"#,
                r#"{"type":""}"#,
                "[1,2]",
                "null",
                "\"text\"",
                "not json",
                "",
            ],
        ),
        (
            Provider::Voipbin,
            &[
                r#"{"type":"call_created","data":{"id":"c1"}}"#,
                r#"{"type":"call_created","data":null,"topic":"t:a:b:c","timestamp":"2024-01-01T00:00:00Z"}"#,
                r#"{"event_type":"call.status"}"#,
                r#"{"event_type":"","data":{}}"#,
                r#"{"event_type":5,"data":{}}"#,
                r#"{"event_type":"a","type":"b","data":[1,{"z":1,"a":2}]}"#,
                r#"{"event_type":"a","topic":"","data":1}"#,
                r#"{"event_type":"a","topic":7,"data":1}"#,
                r#"{"topic":"x"}"#,
                r#"{"type":"","data":1}"#,
                r#"{"type":"x","data":1}"#,
                "{",
                "[]",
                "3",
            ],
        ),
        (
            Provider::Hashi,
            &[
                r#"{"type":"connected","data":{}}"#,
                r#"{"type":"pong"}"#,
                r#"{"type":"error","data":{"message":"Authentication failed","code":"AUTH_ERROR"}}"#,
                r#"{"type":"error","data":{"code":"AUTH_ERROR"}}"#,
                r#"{"type":"error","data":{"message":"nope","code":"RATE"}}"#,
                r#"{"type":"error","data":{"message":7}}"#,
                r#"{"type":"error","data":"boom"}"#,
                r#"{"type":"error"}"#,
                r#"{"type":"bounty:event","data":{"type":"bounty.claimed","bountyId":"b1"}}"#,
                r#"{"type":"lobby:event","data":{"type":"lobby.joined","lobbyId":12}}"#,
                r#"{"type":"lobby:event","data":{"type":"","lobbyId":""}}"#,
                r#"{"type":":event","data":{"type":"x","Id":"i"}}"#,
                r#"{"type":"lobby:event","data":{"lobbyId":"x"}}"#,
                r#"{"type":"lobby:event","data":"str"}"#,
                r#"{"type":"lobby:event"}"#,
                r#"{"type":"subscribed","data":{"lobbyId":"ABC123","timestamp":"2024-01-01T00:00:00Z"}}"#,
                r#"{"type":"subscribed","data":"str"}"#,
                r#"{"type":"subscribed","timestamp":1717171717}"#,
                r#"{"type":"subscribed","data":null}"#,
                r#"{"data":{}}"#,
                r#"{"type":5}"#,
                "[1]",
                "nope",
            ],
        ),
    ];
    let mut failures = Vec::new();
    for (provider, frames) in cases {
        for frame in *frames {
            if let Err(e) = same(*provider, frame) {
                failures.push(format!("{provider} {frame}: {e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn connections_look_the_same() {
    for provider in Provider::ALL {
        let (a, b) = (hand_written(provider), engine(provider));
        assert_eq!(a.provider(), b.provider());
        assert_eq!(a.greeting(), b.greeting(), "{provider}");
        assert_eq!(a.subscriptions(), b.subscriptions(), "{provider}");
        let subs = a.subscriptions().to_vec();
        assert_eq!(
            a.subscribe_frames(&subs),
            b.subscribe_frames(&subs),
            "{provider}"
        );
        assert_eq!(
            a.unsubscribe_frames(&subs),
            b.unsubscribe_frames(&subs),
            "{provider}"
        );
        assert_eq!(
            a.unsubscribe_frames(&subs[..0]),
            b.unsubscribe_frames(&subs[..0])
        );
        let ra = a.connect_request().expect("request");
        let rb = b.connect_request().expect("request");
        assert_eq!(ra.uri().host(), rb.uri().host(), "{provider}");
        assert_eq!(ra.uri().port(), rb.uri().port(), "{provider}");
        // The same path and query once percent-decoded (`@uri` encodes `+` as `%2B`, the
        // hand-written path kept it; the servers decode both the same way).
        let decoded = |r: &http::Request<()>| {
            let u = url::Url::parse(&r.uri().to_string()).expect("URL");
            let query: Vec<(String, String)> =
                u.query_pairs().map(|(k, v)| (k.into(), v.into())).collect();
            (u.path().replace("%2B", "+"), query)
        };
        assert_eq!(decoded(&ra), decoded(&rb), "{provider}");
        assert!(!b.display_url().contains("token=t"), "{}", b.display_url());
        assert_eq!(
            a.display_url().contains("token=***"),
            b.display_url().contains("token=***")
        );
        // Heartbeats: the same kind of beat; VoicePact's carries a timestamp.
        match (a.heartbeat(1717171717), b.heartbeat(1717171717)) {
            (wsbridge_adapters::Heartbeat::Text(x), wsbridge_adapters::Heartbeat::Text(y)) => {
                let (x, y): (serde_json::Value, serde_json::Value) = (
                    serde_json::from_str(&x).expect("JSON beat"),
                    serde_json::from_str(&y).expect("JSON beat"),
                );
                assert_eq!(x["type"], y["type"], "{provider}");
                assert_eq!(x.get("timestamp").is_some(), y.get("timestamp").is_some());
                if let Some(t) = y.get("timestamp") {
                    assert!(t.is_i64(), "{provider}: timestamp {t}");
                }
            }
            (x, y) => assert_eq!(x, y, "{provider}"),
        }
    }
}
