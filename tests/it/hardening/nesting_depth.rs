//! Issue 12, finding 5: deeply nested frames must never become a silent gap.
//!
//! A frame nested deeper than `limits.max_depth` is a counted decode error at the upstream
//! (never journalled), the connection stays up and the next events arrive, and resume from
//! before it works on `/v1/ws` and SSE. An event journalled before the limit existed (its
//! envelope deeper than serde_json parses) is still read back and sent on resume, and bytes in
//! the journal that are not an envelope at all are reported to the consumer
//! (`unreadable_event`) and counted, never skipped.

use futures_util::StreamExt;
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::common::ws::{subscribe_from, Ws};
use crate::common::*;
use wsbridge::bridge::Bridge;
use wsbridge::config::Config;
use wsbridge::envelope::Envelope;
use wsbridge::storage::NewEvent;
use wsbridge_adapters::sim::Simulator;
use wsbridge_adapters::{voicepact, Provider};

const TOKEN: &str = "token-nesting-depth";

/// A VoicePact `payment_update` (broadcast to every client) carrying `n`.
fn payment(n: usize) -> Value {
    let mut frame = voicepact::wire::payment_update("ctr-1", "completed", 1.5, 1_705_314_600);
    frame["n"] = json!(n);
    frame
}

/// `depth` levels of nested arrays.
fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// A VoicePact `payment_update` nested `depth` levels deep in all (its object is one level).
fn deep_payment(n: usize, depth: usize) -> String {
    format!(
        r#"{{"type":"payment_update","contract_id":"ctr-1","status":"completed","amount":1.5,"timestamp":"1705314600","n":{n},"x":{}}}"#,
        nested(depth - 1)
    )
}

async fn rig(provider: Provider) -> (Bridge, Simulator, Config) {
    let sim = start_sim(provider).await;
    let cfg = config(&[
        upstream_block("up", &sim, FAST),
        format!("[[consumers]]\nname = \"all\"\ntoken = \"{TOKEN}\"\n"),
    ]);
    let (bridge, _) = start_bridge(&cfg).await;
    wait_sim_ready(&sim, 1).await;
    (bridge, sim, cfg)
}

/// What the tests read from a `/v1/ws` frame without parsing the event into a tree (an event
/// may be deeper than serde_json parses).
#[derive(Deserialize)]
struct FrameHead {
    op: String,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    #[allow(dead_code)]
    event: Option<IgnoredAny>,
}

/// The next `n` frames as (head, raw text); a close or a dropped connection fails the test.
async fn raw_frames(ws: &mut Ws, n: usize) -> Vec<(FrameHead, String)> {
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(DEADLINE, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let head: FrameHead = serde_json::from_str(t.as_str()).expect("frame head");
                out.push((head, t.as_str().to_string()));
            }
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            other => panic!(
                "expected a text frame, got {other:?} after {} frames",
                out.len()
            ),
        }
    }
    out
}

/// Reads SSE events (`id`, `event` name, raw `data`) from `/v1/events?<query>` until `n`.
async fn sse_raw(bridge: &Bridge, query: &str, n: usize) -> Vec<(Option<u64>, String, String)> {
    let mut stream = TcpStream::connect(bridge.local_addr())
        .await
        .expect("connect");
    let head = format!("GET /v1/events?{query} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nAccept: text/event-stream\r\n\r\n");
    stream.write_all(head.as_bytes()).await.expect("request");
    let mut lines = BufReader::new(stream).lines();
    let mut out = Vec::new();
    let (mut id, mut name) = (None, String::from("message"));
    while out.len() < n {
        let line = tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("an SSE line in time ({} events so far)", out.len()))
            .expect("read")
            .expect("open");
        if let Some(v) = line.strip_prefix("id:") {
            id = v.trim().parse::<u64>().ok();
        } else if let Some(v) = line.strip_prefix("event:") {
            name = v.trim().to_string();
        } else if let Some(v) = line.strip_prefix("data:") {
            out.push((
                id.take(),
                std::mem::replace(&mut name, "message".into()),
                v.trim().to_string(),
            ));
        }
    }
    out
}

fn data_n(frame_text: &str) -> u64 {
    let v: Value = serde_json::from_str(frame_text).expect("a shallow frame parses");
    let event = if v["op"] == "event" { &v["event"] } else { &v };
    event["data"]["n"].as_u64().expect("data.n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_126_deep_frame_is_a_counted_decode_error_and_the_next_events_arrive() {
    let (bridge, vp, _cfg) = rig(Provider::VoicePact).await;
    let mut live = subscribe_from(&bridge, TOKEN, "live", json!("latest")).await;

    vp.emit(payment(0)).await;
    assert!(vp.send_raw(&deep_payment(1, 126)).await >= 1);
    vp.emit(payment(2)).await;
    vp.emit(payment(3)).await;

    let got = raw_frames(&mut live, 3).await;
    let ns: Vec<u64> = got.iter().map(|(_, t)| data_n(t)).collect();
    assert_eq!(ns, vec![0, 2, 3], "the deep frame is not an event");
    let seqs: Vec<u64> = got.iter().map(|(h, _)| h.seq.expect("seq")).collect();
    assert_eq!(
        seqs,
        vec![seqs[0], seqs[0] + 1, seqs[0] + 2],
        "nothing journalled for it"
    );
    let up = bridge.upstream("up").expect("upstream").counters();
    assert_eq!(up.decode_errors, 1, "counted as a decode error: {up:?}");
    assert_eq!(up.reconnects, 0, "the connection stayed up: {up:?}");

    // Resume from before it on /v1/ws and SSE: every event, in order, no gap.
    let mut resumed = subscribe_from(&bridge, TOKEN, "resume", json!(seqs[0])).await;
    let again = raw_frames(&mut resumed, 3).await;
    let pairs: Vec<(u64, u64)> = again
        .iter()
        .map(|(h, t)| (h.seq.expect("seq"), data_n(t)))
        .collect();
    assert_eq!(pairs, vec![(seqs[0], 0), (seqs[1], 2), (seqs[2], 3)]);
    let sse = sse_raw(&bridge, "from=earliest", 3).await;
    let pairs: Vec<(Option<u64>, u64)> = sse.iter().map(|(id, _, d)| (*id, data_n(d))).collect();
    assert_eq!(
        pairs,
        vec![(Some(seqs[0]), 0), (Some(seqs[1]), 2), (Some(seqs[2]), 3)]
    );
    bridge.shutdown().await;
}

/// An envelope numbered `n` for the VoIPBIN upstream `up`, with `data` as given.
fn envelope(n: usize, data: Value) -> Envelope {
    Envelope {
        specversion: "1.0".into(),
        id: format!("journalled-{n}"),
        source: "wsbridge://up".into(),
        event_type: "voipbin.call.status".into(),
        subject: Some(format!("customer_id:abc123:call:j{n}")),
        time: "2024-01-15T10:30:00Z".into(),
        datacontenttype: "application/json".into(),
        data,
        provider: "voipbin".into(),
        recvtime: "2024-01-15T10:30:00.000000Z".into(),
        gap: None,
        seq: None,
    }
}

/// Journals envelopes straight into the bridge's store, as an older bridge (without
/// `limits.max_depth`) would have; returns their seqs.
async fn journal(bridge: &Bridge, envelopes: Vec<Envelope>) -> Vec<u64> {
    let batch = envelopes
        .into_iter()
        .map(|envelope| NewEvent::new(envelope, Vec::new()).expect("an envelope serialises"))
        .collect();
    let appended = bridge.store().append(batch).await.expect("append");
    appended
        .into_iter()
        .map(|a| match a {
            wsbridge::storage::Appended::Stored { seq, .. } => seq,
            other => panic!("not stored: {other:?}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_journalled_deeper_than_serde_json_reads_is_sent_on_resume_not_skipped() {
    let (bridge, _vb, _cfg) = rig(Provider::Voipbin).await;
    // `data` 127 levels deep: the envelope around it is 128, one more than serde_json reads.
    let deep: Value = {
        let mut v = json!([]);
        for _ in 0..126 {
            v = json!([v]);
        }
        v
    };
    let seqs = journal(
        &bridge,
        vec![
            envelope(0, json!({"n": 0})),
            envelope(1, deep),
            envelope(2, json!({"n": 2})),
        ],
    )
    .await;

    let mut ws = subscribe_from(&bridge, TOKEN, "resume", json!(seqs[0])).await;
    let got = raw_frames(&mut ws, 3).await;
    let ops: Vec<(&str, Option<u64>)> = got.iter().map(|(h, _)| (h.op.as_str(), h.seq)).collect();
    assert_eq!(
        ops,
        vec![
            ("event", Some(seqs[0])),
            ("event", Some(seqs[1])),
            ("event", Some(seqs[2]))
        ],
        "no gap at the deep event"
    );
    assert!(
        got[1].1.contains(&nested(127)),
        "the deep payload is sent whole"
    );

    let sse = sse_raw(&bridge, "from=earliest", 3).await;
    let ids: Vec<Option<u64>> = sse.iter().map(|(id, _, _)| *id).collect();
    assert_eq!(ids, vec![Some(seqs[0]), Some(seqs[1]), Some(seqs[2])]);
    assert!(sse[1].2.contains(&nested(127)));
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_bytes_that_are_not_an_envelope_are_reported_to_the_consumer_and_counted() {
    let (bridge, _vb, cfg) = rig(Provider::Voipbin).await;
    let seqs = journal(
        &bridge,
        vec![
            envelope(0, json!({"n": 0})),
            envelope(1, json!({"n": 1})),
            envelope(2, json!({"n": 2})),
        ],
    )
    .await;
    // Damage the middle one in the database file, as a disk or a bad restore would.
    let path = cfg.storage.path.clone();
    let damaged = seqs[1];
    damage_journal_entry(path, damaged).await;

    let mut ws = subscribe_from(&bridge, TOKEN, "resume", json!(seqs[0])).await;
    let got = raw_frames(&mut ws, 3).await;
    assert_eq!(got[0].0.op, "event");
    assert_eq!(got[1].0.op, "error", "{}", got[1].1);
    assert_eq!(got[1].0.code.as_deref(), Some("unreadable_event"));
    assert_eq!(got[1].0.seq, Some(damaged));
    assert_eq!(
        (got[2].0.op.as_str(), got[2].0.seq),
        ("event", Some(seqs[2])),
        "the feed goes on"
    );

    let sse = sse_raw(&bridge, "from=earliest", 3).await;
    assert_eq!(sse[1].0, Some(damaged));
    assert_eq!(sse[1].1, "unreadable_event", "{:?}", sse[1]);
    assert_eq!((sse[2].0, sse[2].1.as_str()), (Some(seqs[2]), "message"));

    let counted = bridge.hub().counters().unreadable_events;
    assert_eq!(counted, 2, "one per feed that met it");
    let text = metrics_text(&bridge).await;
    assert!(text.contains("# HELP wsbridge_journal_unreadable_events"));
    assert!(
        text.contains("wsbridge_journal_unreadable_events_total 2"),
        "{text}"
    );
    bridge.shutdown().await;
}
