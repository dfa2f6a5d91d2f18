//! Dialect capabilities the shipped providers do not all use, each against a scripted test
//! provider on a real socket (a tokio-tungstenite server on an ephemeral port) and through
//! the real bridge: app-level heartbeats as plain text with the dialect's own interval, text
//! control frames, and a provider's request to reconnect.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use wsbridge::config::Config;

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

/// A config with `dialect` (as `dialects/<name>.toml`) and one upstream of it at `url`, with
/// `extra` keys, written to a fresh directory.
fn config_with(tag: &str, name: &str, dialect: &str, url: &str, extra: &str) -> (PathBuf, Config) {
    let dir = temp_dir(tag);
    let dialects = dir.join("dialects");
    std::fs::create_dir_all(&dialects).expect("dialects dir");
    write(&dialects.join(format!("{name}.toml")), dialect);
    let path = dir.join("config.toml");
    write(
        &path,
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\npath = {:?}\n[dialects]\npaths = [{:?}]\n\n[[upstreams]]\nname = \"{name}-up\"\nadapter = \"{name}\"\nurl = \"{url}\"\n{extra}\n",
            dir.join("j.db").display().to_string(),
            dialects.display().to_string(),
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
