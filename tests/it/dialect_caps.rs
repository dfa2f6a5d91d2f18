//! Dialect capabilities the shipped providers do not all use, each against a scripted test
//! provider on a real socket (a tokio-tungstenite server on an ephemeral port) and through
//! the real bridge: app-level heartbeats as plain text with the dialect's own interval, text
//! control frames, and a provider's request to reconnect; compressed binary frames (a
//! decompression bomb refused and counted) and the dialect's own auth-failure statuses.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use wsbridge::config::Config;
use wsbridge::upstream::UpstreamState;

use crate::common::*;

/// What a test provider saw: every text frame the bridge sent, per connection (in order).
type Seen = Arc<Mutex<Vec<Vec<String>>>>;

/// A scripted test provider: accepts WebSocket connections on an ephemeral port and runs
/// `script(connection number from 0, socket, record)` for each.
struct TestProvider {
    url: String,
    seen: Seen,
}

impl TestProvider {
    async fn start<F, Fut>(script: F) -> TestProvider
    where
        F: Fn(usize, WebSocketStream<TcpStream>, Recorder) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("ws://{}/feed", listener.local_addr().expect("addr"));
        let seen: Seen = Arc::default();
        let record = seen.clone();
        let script = Arc::new(script);
        let count = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else {
                    continue;
                };
                let n = count.fetch_add(1, Ordering::SeqCst);
                record.lock().expect("lock").push(Vec::new());
                let recorder = Recorder {
                    seen: record.clone(),
                    n,
                };
                tokio::spawn(script(n, ws, recorder));
            }
        });
        TestProvider { url, seen }
    }

    /// The text frames received on connection `n` so far.
    fn frames(&self, n: usize) -> Vec<String> {
        self.seen
            .lock()
            .expect("lock")
            .get(n)
            .cloned()
            .unwrap_or_default()
    }

    /// How many connections were accepted.
    fn connections(&self) -> usize {
        self.seen.lock().expect("lock").len()
    }
}

/// Records the text frames one connection receives.
#[derive(Clone)]
struct Recorder {
    seen: Seen,
    n: usize,
}

impl Recorder {
    fn record(&self, text: &str) {
        if let Some(c) = self.seen.lock().expect("lock").get_mut(self.n) {
            c.push(text.to_string());
        }
    }
}

/// Reads the next text frame (recording it); `None` when the connection ends.
async fn next_text(ws: &mut WebSocketStream<TcpStream>, rec: &Recorder) -> Option<String> {
    loop {
        match ws.next().await? {
            Ok(Message::Text(t)) => {
                rec.record(t.as_str());
                return Some(t.as_str().to_string());
            }
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write");
}

/// A config with `dialect` (as `dialects/<name>.toml`) and one upstream of it at `url` (none
/// when empty), with `extra` keys, written to a fresh directory.
fn config_with(tag: &str, name: &str, dialect: &str, url: &str, extra: &str) -> (PathBuf, Config) {
    config_with_top(tag, name, dialect, url, "", extra)
}

/// Like [`config_with`], with `top` (tables such as `[limits]`) before the upstream.
fn config_with_top(
    tag: &str,
    name: &str,
    dialect: &str,
    url: &str,
    top: &str,
    extra: &str,
) -> (PathBuf, Config) {
    let dir = temp_dir(tag);
    let dialects = dir.join("dialects");
    std::fs::create_dir_all(&dialects).expect("dialects dir");
    write(&dialects.join(format!("{name}.toml")), dialect);
    let path = dir.join("config.toml");
    write(
        &path,
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\npath = {:?}\n[dialects]\npaths = [{:?}]\n{top}\n[[upstreams]]\nname = \"{name}-up\"\nadapter = \"{name}\"\n{}{extra}\n",
            dir.join("j.db").display().to_string(),
            dialects.display().to_string(),
            // No `url` for a dialect that needs none (its URL comes from `[prepare]`).
            if url.is_empty() { String::new() } else { format!("url = \"{url}\"\n") },
        ),
    );
    let config = Config::load(&path).expect("valid config");
    (dir, config)
}

const BEAT_DIALECT: &str = r#"
[dialect]
name = "beat"
[connect]
url = '$url'
[heartbeat]
kind = "app"
text = "ping"
interval = "50ms"
[[control]]
text = "pong"
kind = "pong"
[[control]]
match = '.type == "moving"'
kind = "reconnect"
[[events]]
type = '.kind'
"#;

#[tokio::test]
async fn text_heartbeat_at_the_dialects_interval_text_pong_and_a_reconnect_request() {
    // Connection 0: an event, then it answers every "ping" with "pong"; after the third
    // ping it asks the client to move. Connection 1: another event, then pongs.
    let provider = TestProvider::start(|n, mut ws, rec| async move {
        let event = json!({"kind": "hello", "n": n}).to_string();
        if ws.send(Message::text(event)).await.is_err() {
            return;
        }
        let mut pings = 0;
        while let Some(text) = next_text(&mut ws, &rec).await {
            if text == "ping" {
                pings += 1;
                if ws.send(Message::text("pong")).await.is_err() {
                    return;
                }
                if n == 0 && pings == 3 {
                    let moving = json!({"type": "moving"}).to_string();
                    if ws.send(Message::text(moving)).await.is_err() {
                        return;
                    }
                }
            }
        }
    })
    .await;
    // No ping_interval on the upstream: the dialect's 50ms applies (the default 20s would
    // send no ping within the test's deadline). A backoff of a minute proves the reconnect
    // asked for by the provider waits for none.
    let (_dir, config) = config_with(
        "beat",
        "beat",
        BEAT_DIALECT,
        &provider.url,
        "backoff_initial = \"60s\"\nbackoff_max = \"60s\"\nstale_after = \"5s\"\n",
    );
    let (bridge, mut rx) = start_bridge(&config).await;
    let first = next_matching(&mut rx, "the first connection's event", |p| {
        p.envelope.event_type == "beat.hello"
    })
    .await;
    assert_eq!(first.envelope.data["n"], 0);
    let second = next_matching(&mut rx, "the event of the connection after the move", |p| {
        p.envelope.event_type == "beat.hello" && p.envelope.data["n"] == 1
    })
    .await;
    assert_eq!(second.envelope.provider, "beat");
    assert_eq!(provider.connections(), 2);
    let sent = provider.frames(0);
    assert!(
        sent.len() >= 3 && sent.iter().all(|f| f == "ping"),
        "{sent:?}"
    );

    // The pongs were control frames: no decode error, no event of theirs; the move was no
    // failure.
    let u = &bridge.upstreams()[0];
    eventually("pings on the second connection", DEADLINE, || async {
        let n = provider.frames(1).len();
        if n >= 2 {
            Ok(())
        } else {
            Err(format!("{n} pings"))
        }
    })
    .await;
    let counters = u.counters();
    assert_eq!(counters.decode_errors, 0, "{counters:?}");
    assert_eq!(counters.events, 2, "{counters:?}");
    assert_eq!(counters.reconnects, 1, "{counters:?}");
    let metrics = metrics_text(&bridge).await;
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("wsbridge_upstream_failures_total{") && l.contains("beat-up")),
        "the move counted as a failure:\n{metrics}"
    );
    bridge.shutdown().await;
}

#[test]
fn a_bad_heartbeat_interval_is_refused_naming_the_key() {
    for (interval, why) in [("soon", "not a duration"), ("1ms", "must be between")] {
        let text = BEAT_DIALECT.replace("\"50ms\"", &format!("{interval:?}"));
        let err = wsbridge::adapters::dialect::Dialect::load("beat.toml", &text)
            .expect_err("a bad interval");
        let shown = err.to_string();
        assert!(
            shown.contains("heartbeat.interval") && shown.contains(why),
            "{shown}"
        );
    }
}

/// `data` compressed as `mode` ("gzip", raw "deflate", or "zlib").
fn compress(mode: &str, data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let level = flate2::Compression::default();
    match mode {
        "gzip" => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), level);
            e.write_all(data).expect("compress");
            e.finish().expect("compress")
        }
        "deflate" => {
            let mut e = flate2::write::DeflateEncoder::new(Vec::new(), level);
            e.write_all(data).expect("compress");
            e.finish().expect("compress")
        }
        _ => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), level);
            e.write_all(data).expect("compress");
            e.finish().expect("compress")
        }
    }
}

/// A provider that sends compressed binary frames: an event, a bomb (1 MiB of spaces inside
/// a JSON string, a few KiB compressed), a frame that is not compressed data, then another
/// event.
async fn compressed_provider(mode: &'static str) -> TestProvider {
    TestProvider::start(move |_, mut ws, rec| async move {
        let mut bomb = b"{\"kind\":\"bomb\",\"pad\":\"".to_vec();
        bomb.extend(std::iter::repeat_n(b' ', 1 << 20));
        bomb.extend(b"\"}");
        let frames = [
            compress(
                mode,
                json!({"kind": "packed", "n": 1}).to_string().as_bytes(),
            ),
            compress(mode, &bomb),
            b"not compressed at all".to_vec(),
            compress(
                mode,
                json!({"kind": "packed", "n": 2}).to_string().as_bytes(),
            ),
        ];
        for f in frames {
            if ws.send(Message::binary(f)).await.is_err() {
                return;
            }
        }
        while next_text(&mut ws, &rec).await.is_some() {}
    })
    .await
}

#[tokio::test]
async fn compressed_binary_frames_are_inflated_and_a_bomb_is_refused_and_counted() {
    for (binary, mode) in [
        ("gzip", "gzip"),
        ("deflate", "deflate"),
        ("deflate", "zlib"),
    ] {
        let provider = compressed_provider(mode).await;
        let dialect = format!(
            "[dialect]\nname = \"packed\"\n[connect]\nurl = '$url'\nbinary = \"{binary}\"\n[[events]]\ntype = '.kind'\n"
        );
        // A small event limit: the upstream read limit is 2 x 4 KiB + 64 KiB, far below the
        // bomb's 1 MiB.
        let (_dir, config) = config_with_top(
            &format!("packed-{mode}"),
            "packed",
            &dialect,
            &provider.url,
            "[limits]\nmax_event_bytes = 4096\n",
            FAST,
        );
        let (bridge, mut rx) = start_bridge(&config).await;
        for n in [1, 2] {
            let p = next_matching(&mut rx, &format!("{mode} event {n}"), |p| {
                p.envelope.event_type == "packed.packed"
            })
            .await;
            assert_eq!(p.envelope.data["n"], n, "{mode}");
        }
        let u = &bridge.upstreams()[0];
        let counters = u.counters();
        assert_eq!(counters.inflate_refused, 1, "{mode}: {counters:?}");
        assert_eq!(counters.decode_errors, 2, "{mode}: {counters:?}");
        assert_eq!(counters.events, 2, "{mode}: {counters:?}");
        // The bomb cost no reconnect: the connection was kept.
        assert_eq!(provider.connections(), 1, "{mode}");
        let metrics = metrics_text(&bridge).await;
        assert!(
            metrics.contains("wsbridge_upstream_inflate_refused_total{upstream=\"packed-up\"} 1"),
            "{metrics}"
        );
        bridge.shutdown().await;
    }
}

#[tokio::test]
async fn binary_reject_refuses_binary_frames_and_keeps_text_ones() {
    let provider = TestProvider::start(|_, mut ws, rec| async move {
        let bin = Message::binary(json!({"kind": "bin"}).to_string().into_bytes());
        let text = Message::text(json!({"kind": "txt"}).to_string());
        if ws.send(bin).await.is_err() || ws.send(text).await.is_err() {
            return;
        }
        while next_text(&mut ws, &rec).await.is_some() {}
    })
    .await;
    let dialect = "[dialect]\nname = \"textonly\"\n[connect]\nurl = '$url'\nbinary = \"reject\"\n[[events]]\ntype = '.kind'\n";
    let (_dir, config) = config_with("textonly", "textonly", dialect, &provider.url, FAST);
    let (bridge, mut rx) = start_bridge(&config).await;
    next_matching(&mut rx, "the text event", |p| {
        p.envelope.event_type == "textonly.txt"
    })
    .await;
    let counters = bridge.upstreams()[0].counters();
    assert_eq!(counters.decode_errors, 1, "{counters:?}");
    assert_eq!(counters.events, 1, "{counters:?}");
    assert_eq!(counters.inflate_refused, 0, "{counters:?}");
    bridge.shutdown().await;
}

/// A provider that answers every upgrade with HTTP `status`.
async fn refusing_provider(status: u16) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("ws://{}/feed", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                // The callback's type is tungstenite's, large error variant included.
                #[allow(clippy::result_large_err)]
                let refuse = |_: &Request, _: Response| -> Result<Response, ErrorResponse> {
                    let mut answer = ErrorResponse::new(Some("bad key".to_string()));
                    *answer.status_mut() = http::StatusCode::from_u16(status).expect("a status");
                    Err(answer)
                };
                let _ = tokio_tungstenite::accept_hdr_async(tcp, refuse).await;
            });
        }
    });
    url
}

/// Starts a bridge with one upstream of `dialect` (named `name`) at `url` and waits until
/// the upstream is in `state`.
async fn until_state(
    name: &str,
    dialect: &str,
    url: &str,
    state: UpstreamState,
) -> (wsbridge::bridge::Bridge, wsbridge::upstream::UpstreamStatus) {
    until_state_with(name, name, dialect, url, FAST, state).await
}

/// Like [`until_state`], in a directory tagged `tag`, with `extra` upstream keys.
async fn until_state_with(
    tag: &str,
    name: &str,
    dialect: &str,
    url: &str,
    extra: &str,
    state: UpstreamState,
) -> (wsbridge::bridge::Bridge, wsbridge::upstream::UpstreamStatus) {
    let (_dir, config) = config_with(tag, name, dialect, url, extra);
    let bridge = wsbridge::bridge::Bridge::start(&config)
        .await
        .expect("bridge starts");
    let u = bridge.upstreams()[0].clone();
    let status = wait_status(&u, &format!("{state:?}"), |s| s.state == state).await;
    (bridge, status)
}

#[tokio::test]
async fn the_dialects_auth_failure_statuses_decide_auth_failed() {
    let url = refusing_provider(400).await;
    // The dialect says 400 is this provider's answer to a bad key.
    let dialect = "[dialect]\nname = \"strict\"\n[connect]\nurl = '$url'\nauth_failure_status = [400, 401]\n[[events]]\ntype = '.kind'\n";
    let (bridge, status) = until_state("strict", dialect, &url, UpstreamState::AuthFailed).await;
    assert!(
        status.last_error.as_deref().unwrap_or("").contains("400"),
        "{status:?}"
    );
    bridge.shutdown().await;

    // Without the key, 400 is an HTTP status failure with backoff, not auth_failed.
    let dialect =
        "[dialect]\nname = \"lax\"\n[connect]\nurl = '$url'\n[[events]]\ntype = '.kind'\n";
    let (bridge, status) = until_state("lax", dialect, &url, UpstreamState::Backoff).await;
    assert_eq!(
        status.last_error_reason,
        Some(wsbridge::failure::Reason::HttpStatus),
        "{status:?}"
    );
    bridge.shutdown().await;
}

#[test]
fn bad_binary_and_auth_failure_status_values_are_refused_naming_the_key() {
    for (line, key) in [
        ("binary = \"brotli\"", "connect.binary"),
        ("auth_failure_status = [200]", "connect.auth_failure_status"),
        ("auth_failure_status = [429]", "connect.auth_failure_status"),
    ] {
        let text = format!("[dialect]\nname = \"x\"\n[connect]\nurl = '$url'\n{line}\n");
        let err =
            wsbridge::adapters::dialect::Dialect::load("x.toml", &text).expect_err("a bad value");
        assert!(err.to_string().contains(key), "{err}");
    }
}

/// The secret the session test provider shares with its clients.
const SESSION_SECRET: &str = "sess-s3cr3t";

/// HMAC-SHA256 of `msg` under `key`, lower-case hex (what the provider checks).
fn hmac_hex(key: &str, msg: &str) -> String {
    use hmac::{Hmac, KeyInit, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).expect("any key length");
    mac.update(msg.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// A provider with a login: it greets with `{"event":"welcome"}`, then expects
/// `{"op":"auth","key":K,"ts":T,"sig":hmac_sha256(SESSION_SECRET; K + T)}` and answers
/// `{"event":"auth","ok":<signature valid>}` (no answer at all for the key "silent"); after
/// a valid login each `{"op":"sub","topic":X}` gets an event on X. Anything before the
/// login is refused with `{"event":"error"}`.
async fn session_provider() -> TestProvider {
    TestProvider::start(|_, mut ws, rec| async move {
        let welcome = json!({"event": "welcome"}).to_string();
        if ws.send(Message::text(welcome)).await.is_err() {
            return;
        }
        let mut authed = false;
        while let Some(text) = next_text(&mut ws, &rec).await {
            let Ok(frame) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            let answer = match frame["op"].as_str() {
                Some("auth") => {
                    let key = frame["key"].as_str().unwrap_or_default();
                    if key == "silent" {
                        continue;
                    }
                    let signed = format!("{key}{}", frame["ts"]);
                    authed = frame["sig"].as_str() == Some(&hmac_hex(SESSION_SECRET, &signed));
                    json!({"event": "auth", "ok": authed})
                }
                Some("sub") if authed => json!({"kind": "tick", "topic": frame["topic"]}),
                _ => json!({"event": "error", "why": "not logged in"}),
            };
            if ws.send(Message::text(answer.to_string())).await.is_err() {
                return;
            }
        }
    })
    .await
}

const SESSION_DIALECT: &str = r#"
[dialect]
name = "login"
[params]
api_key = { required = true }
api_secret = { required = true, secret = true }
topics = { default = [] }
[connect]
url = '$url'
[[session]]
expect = '.event == "welcome"'
timeout = "5s"
[[session]]
send = '(now | floor) as $ts | {op: "auth", key: $api_key, ts: $ts, sig: hmac_sha256($api_secret; $api_key + ($ts | tostring))}'
expect = '.event == "auth" and .ok'
fail = '.event == "auth" and (.ok | not)'
timeout = "300ms"
[subscribe]
each = '$topics[]'
frame = '{op: "sub", topic: $item}'
[[control]]
match = 'has("event")'
[[events]]
type = '.kind'
subject = '.topic'
"#;

fn login_upstream(key: &str, secret: &str) -> String {
    format!("api_key = \"{key}\"\napi_secret = \"{secret}\"\ntopics = [\"t1\", \"t2\"]\n{FAST}")
}

#[tokio::test]
async fn session_steps_log_in_with_an_hmac_signed_frame_before_subscribing() {
    let provider = session_provider().await;
    let (_dir, config) = config_with(
        "login",
        "login",
        SESSION_DIALECT,
        &provider.url,
        &login_upstream("k1", SESSION_SECRET),
    );
    let (bridge, mut rx) = start_bridge(&config).await;
    for topic in ["t1", "t2"] {
        let p = next_matching(&mut rx, &format!("the tick on {topic}"), |p| {
            p.envelope.subject.as_deref() == Some(topic)
        })
        .await;
        assert_eq!(p.envelope.event_type, "login.tick");
    }
    // The login went first, signed correctly; the subscriptions after it.
    let sent = provider.frames(0);
    let first: serde_json::Value = serde_json::from_str(&sent[0]).expect("JSON");
    assert_eq!(first["op"], "auth", "{sent:?}");
    assert_eq!(
        first["sig"].as_str(),
        Some(hmac_hex(SESSION_SECRET, &format!("k1{}", first["ts"])).as_str())
    );
    assert_eq!(sent.len(), 3, "{sent:?}");
    assert_eq!(provider.connections(), 1);
    bridge.shutdown().await;
}

/// A session test provider and a bridge whose upstream logs in to it with `key` and
/// `secret`, once the upstream is in `state`.
async fn login_until(
    tag: &str,
    key: &str,
    secret: &str,
    state: UpstreamState,
) -> (
    TestProvider,
    wsbridge::bridge::Bridge,
    wsbridge::upstream::UpstreamStatus,
) {
    let provider = session_provider().await;
    let upstream = login_upstream(key, secret);
    let (bridge, status) = until_state_with(
        tag,
        "login",
        SESSION_DIALECT,
        &provider.url,
        &upstream,
        state,
    )
    .await;
    (provider, bridge, status)
}

#[tokio::test]
async fn a_session_fail_frame_is_auth_failed_and_nothing_is_subscribed() {
    let (provider, bridge, status) = login_until(
        "login-bad",
        "k1",
        "not-the-secret",
        UpstreamState::AuthFailed,
    )
    .await;
    let error = status.last_error.clone().unwrap_or_default();
    assert!(error.contains("session[1]"), "{status:?}");
    assert!(!error.contains("not-the-secret"), "{status:?}");
    // Only the login was sent: no subscription after a refused one.
    let sent = provider.frames(0);
    assert_eq!(sent.len(), 1, "{sent:?}");
    bridge.shutdown().await;
}

#[tokio::test]
async fn a_session_step_that_gets_no_answer_times_out_with_backoff() {
    let (_provider, bridge, status) = login_until(
        "login-silent",
        "silent",
        SESSION_SECRET,
        UpstreamState::Backoff,
    )
    .await;
    assert_eq!(
        status.last_error_reason,
        Some(wsbridge::failure::Reason::Timeout),
        "{status:?}"
    );
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("session step 1"),
        "{status:?}"
    );
    bridge.shutdown().await;
}

#[test]
fn bad_session_steps_are_refused_naming_the_key() {
    for (step, key, why) in [
        ("fail = 'true'", "session[0]", "needs `send`"),
        (
            "send = '{}'\ntimeout = \"1s\"",
            "session[0]",
            "belong to a step that waits",
        ),
        (
            "expect = 'true'\ntimeout = \"forever\"",
            "session[0].timeout",
            "not a duration",
        ),
        ("send = '{op: nosuch}'", "session[0].send", "jq"),
    ] {
        let text =
            format!("[dialect]\nname = \"x\"\n[connect]\nurl = '$url'\n[[session]]\n{step}\n");
        let err = wsbridge::adapters::dialect::Dialect::load("x.toml", &text)
            .expect_err("a bad step")
            .to_string();
        assert!(err.contains(key) && err.contains(why), "{step}: {err}");
    }
}

/// A provider that acknowledges each `{"op":"sub","topic":X}` with
/// `{"event":"subscribed","topic":X}` and then sends an event on X, except for the topic
/// "quiet", which it never acknowledges.
async fn acking_provider() -> TestProvider {
    TestProvider::start(|_, mut ws, rec| async move {
        while let Some(text) = next_text(&mut ws, &rec).await {
            let Ok(frame) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            let topic = frame["topic"].clone();
            if topic == "quiet" {
                continue;
            }
            let ack = json!({"event": "subscribed", "topic": topic}).to_string();
            let event = json!({"kind": "tick", "topic": topic}).to_string();
            if ws.send(Message::text(ack)).await.is_err()
                || ws.send(Message::text(event)).await.is_err()
            {
                return;
            }
        }
    })
    .await
}

const ACK_DIALECT: &str = r#"
[dialect]
name = "acked"
[params]
topics = { default = [] }
[connect]
url = '$url'
[subscribe]
each = '$topics[]'
frame = '{op: "sub", topic: $item}'
ack = '.event == "subscribed" and .topic == $item'
ack_timeout = "300ms"
[[events]]
type = '.kind'
subject = '.topic'
"#;

#[tokio::test]
async fn subscriptions_wait_for_their_acknowledgements() {
    let provider = acking_provider().await;
    let extra = format!("topics = [\"a\", \"b\"]\n{FAST}");
    let (_dir, config) = config_with("acked", "acked", ACK_DIALECT, &provider.url, &extra);
    // start_bridge waits for `subscribed`: reached only once both acks arrived.
    let (bridge, mut rx) = start_bridge(&config).await;
    for topic in ["a", "b"] {
        next_matching(&mut rx, &format!("the tick on {topic}"), |p| {
            p.envelope.subject.as_deref() == Some(topic)
        })
        .await;
    }
    let counters = bridge.upstreams()[0].counters();
    // The acknowledgements were consumed, not journalled as events.
    assert_eq!(counters.events, 2, "{counters:?}");
    assert_eq!(counters.ack_timeouts, 0, "{counters:?}");
    assert_eq!(provider.connections(), 1);
    bridge.shutdown().await;
}

#[tokio::test]
async fn a_missing_acknowledgement_is_counted_and_the_connection_retried() {
    let provider = acking_provider().await;
    let extra = format!("topics = [\"a\", \"quiet\"]\n{FAST}");
    let (_dir, config) = config_with("unacked", "acked", ACK_DIALECT, &provider.url, &extra);
    let bridge = wsbridge::bridge::Bridge::start(&config)
        .await
        .expect("bridge starts");
    let u = bridge.upstreams()[0].clone();
    eventually("two ack timeouts and a retry", DEADLINE, || async {
        let c = u.counters();
        if c.ack_timeouts >= 2 && provider.connections() >= 2 {
            Ok(())
        } else {
            Err(format!("{c:?}, {} connections", provider.connections()))
        }
    })
    .await;
    // Never subscribed: one subscription is still unacknowledged.
    assert_ne!(u.status().state, UpstreamState::Subscribed);
    // The acknowledged topic's events still flowed meanwhile.
    assert!(u.counters().events >= 1);
    let metrics = metrics_text(&bridge).await;
    assert!(
        metrics.lines().any(|l| l
            .starts_with("wsbridge_upstream_subscribe_ack_timeouts_total{upstream=\"acked-up\"}")
            && !l.ends_with(" 0")),
        "{metrics}"
    );
    bridge.shutdown().await;
}

const GAP_DIALECT: &str = r#"
[dialect]
name = "seqd"
[connect]
url = '$url'
[[events]]
type = '.kind'
subject = '.ch'
sequence = '.seq'
sequence_key = '.ch'
data = '.'
"#;

#[tokio::test]
async fn sequence_gaps_per_key_are_counted_shown_and_marked_on_the_next_envelope() {
    // Channel a skips 3 and 4; channel b counts on its own, without a gap.
    let frames = [("a", 1), ("a", 2), ("b", 1), ("a", 5), ("b", 2), ("a", 6)];
    let provider = TestProvider::start(move |_, mut ws, rec| async move {
        for (ch, seq) in frames {
            let frame = json!({"kind": "book", "ch": ch, "seq": seq}).to_string();
            if ws.send(Message::text(frame)).await.is_err() {
                return;
            }
        }
        while next_text(&mut ws, &rec).await.is_some() {}
    })
    .await;
    let token = "gap-consumer-token";
    let (_dir, config) = config_with_top(
        "seqd",
        "seqd",
        GAP_DIALECT,
        &provider.url,
        &format!("[[consumers]]\nname = \"c\"\ntoken = \"{token}\"\n"),
        FAST,
    );
    let (bridge, _rx) = start_bridge(&config).await;
    // Through /v1/ws, from the journal's start: the envelopes as journalled.
    let mut ws = crate::common::ws::connect(&bridge, token).await;
    crate::common::ws::recv(&mut ws).await;
    ws.send(Message::text(
        json!({"op": "subscribe", "id": "s", "from": "earliest", "filter": {"providers": ["seqd"]}})
            .to_string(),
    ))
    .await
    .expect("send");
    let mut got = Vec::new();
    while got.len() < frames.len() {
        let frame = crate::common::ws::recv(&mut ws).await;
        if frame["op"] == "event" {
            got.push(frame["event"].clone());
        }
    }
    for (event, (ch, seq)) in got.iter().zip(frames) {
        assert_eq!(event["data"]["ch"], ch, "{event}");
        assert_eq!(event["data"]["seq"], seq, "{event}");
        if (ch, seq) == ("a", 5) {
            assert_eq!(event["gap"], 2, "{event}");
        } else {
            assert!(event.get("gap").is_none(), "{event}");
        }
    }
    let u = &bridge.upstreams()[0];
    assert_eq!(u.counters().gaps, 1);
    let metrics = metrics_text(&bridge).await;
    assert!(
        metrics.contains("wsbridge_upstream_gaps_total{upstream=\"seqd-up\"} 1"),
        "{metrics}"
    );
    let shown = get_text(&bridge, "/v1/status").await;
    assert!(shown.contains("\"gaps\":1"), "{shown}");
    bridge.shutdown().await;
}

#[test]
fn a_sequence_key_without_a_sequence_is_refused() {
    let text = GAP_DIALECT.replace("sequence = '.seq'\n", "");
    let err = wsbridge::adapters::dialect::Dialect::load("seqd.toml", &text)
        .expect_err("refused")
        .to_string();
    assert!(err.contains("events[0].sequence_key"), "{err}");
}

/// A dialect file named `name` that dials the upstream's `url`, with `rules` after.
fn url_dialect(name: &str, rules: &str) -> String {
    format!("[dialect]\nname = \"{name}\"\n[connect]\nurl = '$url'\n{rules}")
}

const SPLIT_RULES: &str = r#"
[[events]]
match = 'has("items")'
split = '.items[]'
type = '.kind'
subject = '$frame.batch'
data = '.'
"#;

#[tokio::test]
async fn a_split_frame_is_journalled_item_by_item_in_order_and_an_oversized_one_is_refused() {
    let batches = [
        json!({"batch": "b1", "items": [{"kind": "a", "n": 1}, {"kind": "b", "n": 2}, {"kind": "a", "n": 3}]}),
        // Over limits.max_split_events (3): a decode error, nothing of it journalled.
        json!({"batch": "b2", "items": [{"kind": "a", "n": 4}, {"kind": "a", "n": 5}, {"kind": "a", "n": 6}, {"kind": "a", "n": 7}]}),
        json!({"batch": "b3", "items": [{"kind": "c", "n": 8}]}),
    ];
    let provider = TestProvider::start(move |_, mut ws, rec| {
        let batches = batches.clone();
        async move {
            for b in batches {
                if ws.send(Message::text(b.to_string())).await.is_err() {
                    return;
                }
            }
            while next_text(&mut ws, &rec).await.is_some() {}
        }
    })
    .await;
    let (_dir, config) = config_with_top(
        "batchy",
        "batchy",
        &url_dialect("batchy", SPLIT_RULES),
        &provider.url,
        "[limits]\nmax_split_events = 3\n",
        FAST,
    );
    let (bridge, mut rx) = start_bridge(&config).await;
    let mut got = Vec::new();
    while got.len() < 4 {
        let p = next_matching(&mut rx, "a batchy event", |p| {
            p.envelope.provider == "batchy"
        })
        .await;
        got.push(p.envelope.clone());
    }
    let seen: Vec<(String, Option<String>, serde_json::Value)> = got
        .iter()
        .map(|e| (e.event_type.clone(), e.subject.clone(), e.data["n"].clone()))
        .collect();
    assert_eq!(
        seen,
        [
            ("batchy.a".into(), Some("b1".into()), json!(1)),
            ("batchy.b".into(), Some("b1".into()), json!(2)),
            ("batchy.a".into(), Some("b1".into()), json!(3)),
            ("batchy.c".into(), Some("b3".into()), json!(8)),
        ]
    );
    // Journalled in the frame's order, each under its own id.
    let seqs: Vec<u64> = got.iter().filter_map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let ids: std::collections::BTreeSet<&str> = got.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), 4);
    assert_eq!(bridge.upstreams()[0].counters().decode_errors, 1);
    bridge.shutdown().await;
}

const ACKED_RULES: &str = r#"
[[events]]
type = '.kind'
id = '.id'
data = '.'
reply = '{ack: .id}'
"#;

/// What the acknowledging provider knows: the journal to check each ack against, the
/// events acknowledged (and whether each was journalled when its ack came), in order.
#[derive(Default)]
struct AckBook {
    store: std::sync::OnceLock<Arc<dyn wsbridge::storage::Store>>,
    acked: Mutex<Vec<(String, bool)>>,
}

impl AckBook {
    fn acked(&self) -> Vec<(String, bool)> {
        self.acked.lock().expect("lock").clone()
    }

    fn is_acked(&self, id: &str) -> bool {
        self.acked().iter().any(|(a, _)| a == id)
    }

    /// Records an ack frame, checking the journal holds its event now.
    async fn record(&self, frame: &str) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(frame) else {
            return;
        };
        let Some(id) = v["ack"].as_str() else { return };
        let journalled = match self.store.get() {
            Some(store) => store
                .read_from(1, 1000)
                .await
                .expect("journal readable")
                .iter()
                .any(|e| e.id == id),
            None => false,
        };
        self.acked
            .lock()
            .expect("lock")
            .push((id.to_string(), journalled));
    }
}

fn acked_event(id: &str, filler: usize) -> String {
    json!({"kind": "note", "id": id, "text": "x".repeat(filler)}).to_string()
}

#[tokio::test]
async fn replies_go_back_on_the_connection_only_after_the_journal_commit_and_redeliveries_are_acked(
) {
    let book = Arc::new(AckBook::default());
    let provider = TestProvider::start({
        let book = book.clone();
        move |n, mut ws, rec| {
            let book = book.clone();
            async move {
                // First connection: two events, then the provider goes away before it reads
                // any acknowledgement.
                if n == 0 {
                    for id in ["e1", "e2"] {
                        let _ = ws.send(Message::text(acked_event(id, 0))).await;
                    }
                    let _ = ws.close(None).await;
                    return;
                }
                // Later: redeliver what was not acknowledged, then a new event too large for
                // the journal (refused: never acknowledged), then e3.
                for id in ["e1", "e2"] {
                    if !book.is_acked(id) {
                        let _ = ws.send(Message::text(acked_event(id, 0))).await;
                    }
                }
                let _ = ws.send(Message::text(acked_event("big", 4096))).await;
                let _ = ws.send(Message::text(acked_event("e3", 0))).await;
                while let Some(frame) = next_text(&mut ws, &rec).await {
                    book.record(&frame).await;
                }
            }
        }
    })
    .await;
    let (_dir, config) = config_with_top(
        "acky",
        "acky",
        &url_dialect("acky", ACKED_RULES),
        &provider.url,
        "[limits]\nmax_event_bytes = 2048\n",
        FAST,
    );
    let bridge = wsbridge::bridge::Bridge::start(&config)
        .await
        .expect("bridge starts");
    let _ = book.store.set(bridge.store().clone());
    eventually("e1, e2 and e3 acknowledged", DEADLINE, || async {
        let acked = book.acked();
        if ["e1", "e2", "e3"].iter().all(|id| book.is_acked(id)) {
            Ok(())
        } else {
            Err(format!("{acked:?}"))
        }
    })
    .await;
    let acked = book.acked();
    // Every ack came after its event was in the journal; the refused event got none (acks
    // follow the journal's order, so it would have come before e3's).
    assert!(acked.iter().all(|(_, journalled)| *journalled), "{acked:?}");
    assert!(!book.is_acked("big"), "{acked:?}");
    // Each event is journalled once, redelivered or not.
    let stored: Vec<String> = bridge
        .store()
        .read_from(1, 100)
        .await
        .expect("journal")
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(stored, ["e1", "e2", "e3"]);
    let c = bridge.upstreams()[0].counters();
    assert!(c.replies >= 3, "{c:?}");
    assert_eq!(bridge.ingest_stats().too_large, 1);
    // The first connection's acks had nowhere to go: dropped and counted (or, if the first
    // connection was still open when e1/e2 were journalled, sent there and lost with it).
    assert!(provider.connections() >= 2);
    let metrics = metrics_text(&bridge).await;
    assert!(
        metrics.contains("wsbridge_upstream_replies_total{upstream=\"acky-up\"}"),
        "{metrics}"
    );
    bridge.shutdown().await;
}

/// A REST endpoint for `[prepare]` tests: `POST /open` with the right bearer key answers
/// `{ok, url, ticket}` (the ticket numbers the calls), or what `mode` says.
struct PrepServer {
    base: String,
    calls: tokio::sync::watch::Sender<u64>,
    /// "ok", "refuse" (`ok: false`), or an HTTP status to answer.
    mode: Mutex<String>,
    ws_url: Mutex<String>,
}

const PREP_KEY: &str = "prep-s3cr3t-key";

impl PrepServer {
    async fn start(ws_url: &str) -> Arc<PrepServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let server = Arc::new(PrepServer {
            base: format!("http://{}", listener.local_addr().expect("addr")),
            calls: tokio::sync::watch::channel(0).0,
            mode: Mutex::new("ok".to_string()),
            ws_url: Mutex::new(ws_url.to_string()),
        });
        let app = axum::Router::new()
            .route("/open", axum::routing::post(prep_open))
            .with_state(server.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        server
    }

    fn calls(&self) -> u64 {
        *self.calls.borrow()
    }
}

async fn prep_open(
    axum::extract::State(s): axum::extract::State<Arc<PrepServer>>,
    headers: axum::http::HeaderMap,
    body: String,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let authorised = headers.get("authorization").and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {PREP_KEY}"));
    let json_body = headers.get("content-type").and_then(|v| v.to_str().ok())
        == Some("application/json")
        && serde_json::from_str::<serde_json::Value>(&body).ok() == Some(json!({"purpose": "ws"}));
    if !authorised || !json_body {
        return (axum::http::StatusCode::BAD_REQUEST, "bad request").into_response();
    }
    s.calls.send_modify(|n| *n += 1);
    let n = s.calls();
    let mode = s.mode.lock().expect("lock").clone();
    if let Ok(status) = mode.parse::<u16>() {
        let status = axum::http::StatusCode::from_u16(status).expect("status");
        return (status, "{}").into_response();
    }
    let ws = s.ws_url.lock().expect("lock").clone();
    axum::Json(
        json!({"ok": mode == "ok", "url": format!("{ws}?ticket=t{n}"), "ticket": format!("t{n}")}),
    )
    .into_response()
}

const PREP_RULES: &str = r#"
[params]
rest_url = { required = true }
api_key = { required = true, secret = true }
[prepare]
method = "POST"
url = '$rest_url + "/open"'
headers = { authorization = '"Bearer " + $api_key' }
body = '{purpose: "ws"}'
fail = '.ok | not'
refresh = "50ms"
[connect]
url = '$prepared.url'
[[session]]
send = '{hello: $prepared.ticket}'
[[events]]
type = '.kind'
"#;

fn prep_dialect() -> String {
    format!("[dialect]\nname = \"prep\"\n{PREP_RULES}")
}

/// A config with the `prep` dialect and one upstream of it (no `url`) using `server`.
fn prep_config(server: &PrepServer) -> (PathBuf, Config) {
    let keys = format!(
        "rest_url = \"{}\"\napi_key = \"{PREP_KEY}\"\n{FAST}",
        server.base
    );
    config_with_top("prep", "prep", &prep_dialect(), "", "", &keys)
}

#[tokio::test]
async fn prepare_runs_before_every_connect_and_refreshes_while_connected() {
    let server_slot: Arc<std::sync::OnceLock<Arc<PrepServer>>> = Arc::default();
    let provider = TestProvider::start({
        let slot = server_slot.clone();
        move |n, mut ws, rec| {
            let slot = slot.clone();
            async move {
                if next_text(&mut ws, &rec).await.is_none() {
                    return;
                }
                let event = json!({"kind": "note", "conn": n}).to_string();
                let _ = ws.send(Message::text(event)).await;
                if n == 0 {
                    // Stay while [prepare] refreshes twice, then go: the bridge reconnects.
                    if let Some(server) = slot.get() {
                        let mut calls = server.calls.subscribe();
                        let _ = calls.wait_for(|c| *c >= 3).await;
                    }
                    let _ = ws.close(None).await;
                    return;
                }
                while next_text(&mut ws, &rec).await.is_some() {}
            }
        }
    })
    .await;
    let server = PrepServer::start(&provider.url).await;
    let _ = server_slot.set(server.clone());
    let (_dir, config) = prep_config(&server);
    let (bridge, mut rx) = start_bridge(&config).await;
    for conn in [0, 1] {
        next_matching(&mut rx, "an event of each connection", |p| {
            p.envelope.data["conn"] == conn
        })
        .await;
    }
    // Connection 0 was opened with the first answer; it stayed through the refreshes.
    assert_eq!(
        provider.frames(0).first().map(String::as_str),
        Some(r#"{"hello":"t1"}"#)
    );
    // The reconnect prepared afresh: a later ticket.
    let hello: serde_json::Value =
        serde_json::from_str(&provider.frames(1)[0]).expect("hello is JSON");
    let ticket: u64 = hello["hello"]
        .as_str()
        .and_then(|t| t.strip_prefix('t'))
        .and_then(|n| n.parse().ok())
        .expect("a ticket");
    assert!(ticket >= 4, "{hello}");
    assert_eq!(provider.connections(), 2);
    let status = get_text(&bridge, "/v1/status").await;
    assert!(!status.contains(PREP_KEY), "{status}");
    bridge.shutdown().await;
}

#[tokio::test]
async fn a_refused_prepare_is_auth_failed_and_a_server_error_backs_off() {
    for (mode, state, why) in [
        ("401", UpstreamState::AuthFailed, "HTTP 401"),
        ("refuse", UpstreamState::AuthFailed, "[prepare] fail"),
        ("500", UpstreamState::Backoff, "HTTP 500"),
    ] {
        let provider = TestProvider::start(|_, mut ws, rec| async move {
            while next_text(&mut ws, &rec).await.is_some() {}
        })
        .await;
        let server = PrepServer::start(&provider.url).await;
        *server.mode.lock().expect("lock") = mode.to_string();
        let (_dir, config) = prep_config(&server);
        let bridge = wsbridge::bridge::Bridge::start(&config)
            .await
            .expect("bridge starts");
        let u = &bridge.upstreams()[0];
        let got = wait_status(u, mode, |s| s.state == state).await;
        let error = got.last_error.unwrap_or_default();
        assert!(error.contains(why), "{mode}: {error}");
        assert!(!error.contains(PREP_KEY), "{error}");
        assert_eq!(provider.connections(), 0, "{mode}: never dialled");
        assert!(server.calls() >= 1);
        bridge.shutdown().await;
    }
}
