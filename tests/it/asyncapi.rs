//! `docs/asyncapi.yaml`, the AsyncAPI 3.0 description of `/v1/ws` and `/v1/events`, kept
//! true: `asyncapi/check.js` parses and validates it with `@asyncapi/parser` (from npm,
//! installed once per test run under the cargo target's scratch directory; if npm or the
//! registry is missing the test fails, it never skips), compares it with what the Rust code
//! can send (ops, error codes, close codes, HTTP refusals, SSE event names, found in
//! `src/downstream`), and validates the frames of a real session, both ways, against its
//! message schemas.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use wsbridge::bridge::Bridge;
use wsbridge_adapters::Provider;

use crate::common::examples::{blocking, npm_install};
use crate::common::ws::{connect, recv, subscribe_from, Ws};
use crate::common::*;

const TOKEN: &str = "token-asyncapi-consumer";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `node_modules` with `@asyncapi/parser`, `ajv` and `ajv-formats`, installed from npm once
/// per test run (tests running in parallel wait for it).
fn node_modules() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        npm_install(
            "asyncapi-node",
            &["@asyncapi/parser@^3.6", "ajv@^8.17", "ajv-formats@^3"],
            "installing @asyncapi/parser, ajv and ajv-formats from npm \
             (is node/npm installed and the npm registry reachable?)",
        )
    })
}

/// Runs `asyncapi/check.js` on the document and the sources, and on `frames` if given:
/// whether it passed, and its report.
async fn run_check(document: PathBuf, frames: Option<PathBuf>) -> (bool, String) {
    blocking(move || {
        let modules = node_modules();
        let root = repo();
        let mut cmd = Command::new("node");
        cmd.env("NODE_PATH", modules)
            .arg(root.join("tests/it/asyncapi/check.js"))
            .arg(document)
            .arg(root.join("src/downstream"))
            .arg(root.join("src/http/server.rs"));
        if let Some(f) = &frames {
            cmd.arg(f);
        }
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("could not start node ({cmd:?}): {e}"));
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), report)
    })
    .await
}

/// [`run_check`] on `docs/asyncapi.yaml`, failing the test with the report unless it passes.
async fn check(frames: Option<PathBuf>) -> String {
    let (passed, report) = run_check(repo().join("docs/asyncapi.yaml"), frames).await;
    assert!(passed, "docs/asyncapi.yaml check failed:\n{report}");
    report
}

#[tokio::test]
async fn the_document_is_valid_asyncapi_and_names_everything_the_code_sends() {
    let report = check(None).await;
    assert!(report.contains("true to the code"), "{report}");
}

/// The check itself: a document that leaves out an error code the code sends, or lists one
/// it never sends, is refused, naming the code.
#[tokio::test]
async fn a_document_missing_or_inventing_an_error_code_is_refused() {
    let text = std::fs::read_to_string(repo().join("docs/asyncapi.yaml")).expect("document");
    let listed = "        - unavailable\n";
    assert!(
        text.contains(listed),
        "the ErrorCode enum lists unavailable"
    );
    let dir = temp_dir("asyncapi-mutated");
    for (name, mutated, expected) in [
        (
            "missing.yaml",
            text.replacen(listed, "", 1),
            "/v1/ws error code: unavailable is sent by the code but not in",
        ),
        (
            "invented.yaml",
            text.replacen(listed, &format!("{listed}        - made_up\n"), 1),
            "/v1/ws error code: made_up is in docs/asyncapi.yaml but the code never sends it",
        ),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, mutated).expect("write");
        let (passed, report) = run_check(path, None).await;
        assert!(!passed, "{name} passed:\n{report}");
        assert!(report.contains(expected), "{name}:\n{report}");
    }
}

/// What a session received, each item naming the document's message it must match.
#[derive(Default)]
struct Frames(Vec<Value>);

impl Frames {
    /// A `/v1/ws` frame that must be message `op`.
    fn ws(&mut self, op: &str, frame: Value) {
        assert_eq!(frame["op"], op, "{frame}");
        self.0
            .push(json!({"message": format!("ws/{op}"), "payload": frame}));
    }

    /// A client frame the document must describe as message `op`, sent on `ws`.
    async fn sent(&mut self, ws: &mut Ws, op: &str, frame: Value) {
        self.ws(op, frame.clone());
        send(ws, frame).await;
    }

    /// A `/v1/ws` `error` frame that must carry `code`.
    fn error(&mut self, code: &str, frame: Value) {
        assert_eq!(frame["code"], code, "{frame}");
        self.ws("error", frame);
    }

    /// A `/v1/events` message.
    fn sse(&mut self, message: &str, payload: Value) {
        self.0
            .push(json!({"message": format!("events/{message}"), "payload": payload}));
    }

    /// An HTTP refusal `status` of `channel` (`ws` or `events`).
    fn status(&mut self, channel: &str, status: u16) {
        self.0.push(json!({"channel": channel, "status": status}));
    }
}

async fn send(ws: &mut Ws, frame: Value) {
    ws.send(Message::text(frame.to_string()))
        .await
        .expect("send");
}

/// The SSE events of `/v1/events?query` until `n` (comments included, as `("comment", text)`),
/// as `(event name, data)`.
async fn sse(bridge: &Bridge, query: &str, n: usize) -> Vec<(String, String)> {
    let url = format!("http://{}/v1/events?{query}", bridge.local_addr());
    let mut resp = http_client()
        .get(url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("SSE request");
    assert_eq!(resp.status().as_u16(), 200);
    let mut text = String::new();
    let mut out = Vec::new();
    while out.len() < n {
        let chunk = tokio::time::timeout(DEADLINE, resp.chunk())
            .await
            .unwrap_or_else(|_| panic!("an SSE chunk in time ({} events so far)", out.len()))
            .expect("read")
            .expect("the stream stays open");
        text.push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            let (mut name, mut data) = ("message".to_string(), None);
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix(':') {
                    out.push(("comment".to_string(), v.trim().to_string()));
                }
            }
            if let Some(data) = data {
                out.push((name, data));
            }
        }
    }
    out
}

/// A `/v1/events` request refused before the stream: its status and JSON body.
async fn sse_refused(bridge: &Bridge, query: &str, last_event_id: Option<&str>) -> (u16, Value) {
    let url = format!("http://{}/v1/events?{query}", bridge.local_addr());
    let mut req = http_client().get(url).bearer_auth(TOKEN);
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    let resp = req.send().await.expect("SSE request");
    let status = resp.status().as_u16();
    let body = resp.text().await.expect("body");
    let body = serde_json::from_str(&body).unwrap_or_else(|_| panic!("JSON body: {body}"));
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_session_s_frames_match_the_document() {
    let vb = start_sim(Provider::Voipbin).await;
    let cfg = config(&[
        upstream_block("vb", &vb, FAST),
        format!("[[consumers]]\nname = \"doc\"\ntoken = \"{TOKEN}\"\n"),
    ]);
    let (bridge, _rx) = start_bridge(&cfg).await;
    wait_sim_ready(&vb, 1).await;
    let mut frames = Frames::default();

    // Refused before the upgrade.
    match tokio_tungstenite::connect_async(crate::common::ws::request(&bridge, "not-a-token")).await
    {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            frames.status("ws", resp.status().as_u16())
        }
        other => panic!("expected an HTTP refusal, got {other:?}"),
    }

    let mut ws = connect(&bridge, TOKEN).await;
    let ready = recv(&mut ws).await;
    let epoch = ready["epoch"].clone();
    frames.ws("ready", ready);

    // Every kind of bad input, each answered with an `error` frame on the open connection.
    ws.send(Message::text("{not json")).await.expect("send");
    frames.error("bad_request", recv(&mut ws).await);
    ws.send(Message::binary(vec![1u8, 2, 3]))
        .await
        .expect("send");
    frames.error("bad_request", recv(&mut ws).await);
    send(&mut ws, json!({"op": "subscribe", "id": [1]})).await;
    frames.error("bad_request", recv(&mut ws).await);
    send(&mut ws, json!({"op": "subscribe", "id": "s", "from": 0})).await;
    frames.error("bad_request", recv(&mut ws).await);
    send(&mut ws, json!({"op": "dance", "id": "x"})).await;
    frames.error("unknown_op", recv(&mut ws).await);
    send(
        &mut ws,
        json!({"op": "subscribe", "id": "p", "filter": {"types": ["a.**.b"]}}),
    )
    .await;
    frames.error("bad_pattern", recv(&mut ws).await);
    send(&mut ws, json!({"op": "unsubscribe", "id": "nope"})).await;
    frames.error("unknown_subscription", recv(&mut ws).await);
    send(
        &mut ws,
        json!({"op": "subscribe", "id": "far", "from": 1_000_000}),
    )
    .await;
    frames.error("unrecoverable_position", recv(&mut ws).await);
    frames.sent(&mut ws, "ping", json!({"op": "ping"})).await;
    frames.ws("pong", recv(&mut ws).await);

    // A subscription and its events.
    frames
        .sent(
            &mut ws,
            "subscribe",
            json!({"op": "subscribe", "id": "calls", "from": "latest",
                   "filter": {"providers": ["voipbin"], "types": ["voipbin.call.*"], "subjects": ["customer_id:abc123:*"]}}),
        )
        .await;
    frames.ws("subscribed", recv(&mut ws).await);
    send(&mut ws, json!({"op": "subscribe", "id": "calls"})).await;
    frames.error("duplicate_subscription", recv(&mut ws).await);
    for i in 0..3 {
        assert_eq!(vb.emit(numbered_call(i)).await, 1);
    }
    let mut seqs = Vec::new();
    for _ in 0..3 {
        let event = recv(&mut ws).await;
        seqs.push(event["seq"].as_u64().expect("seq"));
        frames.ws("event", event);
    }
    // A numeric id resuming from a seq given as a string, with the epoch; unsubscribed.
    let next = (seqs[2] + 1).to_string();
    frames
        .sent(
            &mut ws,
            "subscribe",
            json!({"op": "subscribe", "id": 7, "from": next, "epoch": epoch}),
        )
        .await;
    frames.ws("subscribed", recv(&mut ws).await);
    frames
        .sent(
            &mut ws,
            "unsubscribe",
            json!({"op": "unsubscribe", "id": 7}),
        )
        .await;
    frames.ws("unsubscribed", recv(&mut ws).await);
    // The subscription cap.
    let mut full = connect(&bridge, TOKEN).await;
    recv(&mut full).await;
    for i in 0..64 {
        send(&mut full, json!({"op": "subscribe", "id": format!("m{i}")})).await;
        assert_eq!(recv(&mut full).await["op"], "subscribed");
    }
    send(&mut full, json!({"op": "subscribe", "id": "one-more"})).await;
    frames.error("too_many_subscriptions", recv(&mut full).await);
    drop(full);

    // A journal entry that is not an envelope (damaged storage), met by a resume and by SSE.
    let path = cfg.storage.path.clone();
    let damaged = seqs[1];
    damage_journal_entry(path, damaged).await;
    let mut resume = subscribe_from(&bridge, TOKEN, "resume", json!(seqs[0])).await;
    frames.ws("event", recv(&mut resume).await);
    frames.error("unreadable_event", recv(&mut resume).await);
    frames.ws("event", recv(&mut resume).await);
    drop(resume);

    let got = sse(
        &bridge,
        "providers=voipbin&types=voipbin.call.*,hashi.*&from=earliest",
        3,
    )
    .await;
    let names: Vec<&str> = got.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["message", "unreadable_event", "message"], "{got:?}");
    for (name, data) in &got {
        let data: Value = serde_json::from_str(data).expect("JSON data");
        match name.as_str() {
            "message" => frames.sse("sseEvent", data),
            _ => frames.sse("sseUnreadableEvent", data),
        }
    }
    for (query, last_event_id, status) in [
        ("types=a.**.b", None, 400),
        ("from=soon", None, 400),
        ("from=earliest", Some("x"), 400),
        ("from=1000000", None, 409),
    ] {
        let (got, body) = sse_refused(&bridge, query, last_event_id).await;
        assert_eq!(got, status, "{query}: {body}");
        frames.status("events", got);
        frames.sse("sseRefused", body);
    }
    let anonymous = http_client()
        .get(format!("http://{}/v1/events", bridge.local_addr()))
        .send()
        .await
        .expect("request");
    frames.status("events", anonymous.status().as_u16());

    // A client frame over 64 KiB ends the connection: with a close code the document names,
    // if any.
    let mut big = connect(&bridge, TOKEN).await;
    recv(&mut big).await;
    let _ = big.send(Message::text("x".repeat(65 * 1024 + 1))).await;
    match tokio::time::timeout(DEADLINE, big.next())
        .await
        .expect("the connection ends in time")
    {
        Some(Ok(Message::Close(Some(f)))) => frames.0.push(json!({"close": u16::from(f.code)})),
        Some(Ok(Message::Close(None))) | Some(Err(_)) | None => {}
        Some(Ok(other)) => panic!("expected the connection to end, got {other:?}"),
    }

    // Shutdown closes the session with a close code the document names.
    let shutdown = tokio::spawn(bridge.shutdown());
    let close = loop {
        match tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("a close frame in time")
        {
            Some(Ok(Message::Close(Some(f)))) => break u16::from(f.code),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(close, 1001);
    frames.0.push(json!({"close": close}));
    shutdown.await.expect("shutdown");

    let file = temp_dir("asyncapi").join("frames.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&frames.0).expect("JSON")).expect("write");
    let report = check(Some(file)).await;
    assert!(report.contains("checked"), "{report}");
}
