//! Hot reload: a valid new config applies without dropping unaffected connections; an
//! invalid one is refused and the running config kept; SIGHUP and file changes trigger it.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::common::receiver::{Answer, Receiver};
use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use wsbridge_adapters::{voipbin, Provider};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn webhook(name: &str, url: &str) -> String {
    format!("[[webhooks]]\nname = \"{name}\"\nurl = \"{url}\"\nsecrets = [\"{SECRET}\"]\nallow_private = true\nretry = [\"100ms\"]\n\n")
}

fn route(name: &str, to: &str) -> String {
    format!("[[routes]]\nname = \"{name}\"\nproviders = [\"voipbin\"]\nto = [\"{to}\"]\n\n")
}

fn consumer(name: &str, token: &str) -> String {
    format!("[[consumers]]\nname = \"{name}\"\ntoken = \"{token}\"\n\n")
}

fn call(i: usize) -> Value {
    voipbin::wire::event(
        "call.status",
        "2024-01-15T10:30:00.000000Z",
        &format!("customer_id:abc123:call:r{i}"),
        json!({"id": format!("r{i}"), "status": "answered"}),
    )
}

/// A consumer connection that survived: it still answers a `ping`.
async fn assert_answers_ping(ws: &mut crate::common::ws::Ws) {
    ws.send(Message::text(json!({"op": "ping"}).to_string()))
        .await
        .expect("send");
    let pong = tokio::time::timeout(DEADLINE, ws.next())
        .await
        .expect("answer")
        .expect("open")
        .expect("frame");
    assert_eq!(pong.into_text().expect("text").as_str(), r#"{"op":"pong"}"#);
}

fn write(path: &Path, text: &str) {
    // Write-then-rename, as editors and config managers do.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write config");
    std::fs::rename(&tmp, path).expect("replace config");
}

#[tokio::test]
async fn a_valid_reload_applies_without_dropping_unaffected_connections_and_an_invalid_one_is_refused(
) {
    let vb = start_sim(Provider::Voipbin).await;
    let first = Receiver::start(vec![], Answer::status(200)).await;
    let second = Receiver::start(vec![], Answer::status(200)).await;
    let dir = temp_dir("reload");
    let path = dir.join("config.toml");
    let base = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\npath = {:?}\n\n{}{}{}{}",
        dir.join("j.db").display().to_string(),
        upstream_block("vb", &vb, FAST),
        webhook("first", &first.url()),
        route("to-first", "first"),
        consumer("alice", "alice-token-1"),
    );
    write(&path, &base);
    let config = wsbridge::config::Config::load(&path).expect("valid config");
    let (bridge, _rx) = start_bridge(&config).await;
    wait_sim_ready(&vb, 1).await;

    // A consumer that must survive the reload.
    let url = format!("ws://{}/v1/ws?token=alice-token-1", bridge.local_addr());
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("consumer connects");
    let _ready = ws.next().await;

    // Add a webhook, a route to it and a consumer; keep everything else.
    let grown = format!(
        "{base}{}{}{}",
        webhook("second", &second.url()),
        route("to-second", "second"),
        consumer("bob", "bob-token-22")
    );
    write(&path, &grown);
    let report = wsbridge::reload::reload_file(&bridge, &path)
        .await
        .expect("reload applies");
    assert!(
        report.applied.iter().any(|c| c == "webhook second: added"),
        "{report:?}"
    );
    assert!(
        report.applied.iter().any(|c| c.starts_with("routes:")),
        "{report:?}"
    );
    assert!(
        report.applied.iter().any(|c| c.starts_with("consumer bob")),
        "{report:?}"
    );
    assert!(
        !report
            .applied
            .iter()
            .any(|c| c.contains("upstream") || c.contains("alice")),
        "{report:?}"
    );

    // Unaffected: the upstream connection was not replaced, the consumer is still connected.
    assert_eq!(vb.snapshot().accepted, 1, "the upstream reconnected");
    assert_answers_ping(&mut ws).await;

    // The new route is live.
    assert_eq!(vb.emit(call(1)).await, 1);
    first.wait_for(1, DEADLINE).await;
    second.wait_for(1, DEADLINE).await;
    let bob = format!("ws://{}/v1/ws?token=bob-token-22", bridge.local_addr());
    assert!(
        tokio_tungstenite::connect_async(bob).await.is_ok(),
        "the new consumer is accepted"
    );

    // An invalid config (a route to a webhook that does not exist) is refused whole.
    write(&path, &format!("{grown}{}", route("broken", "nowhere")));
    match wsbridge::reload::reload_file(&bridge, &path).await {
        Err(wsbridge::reload::ReloadError::Invalid(e)) => {
            assert!(
                e.to_string().contains(r#"routes[2] ("broken").to[0]"#),
                "{e}"
            );
        }
        other => panic!("expected the reload to be refused, got {other:?}"),
    }
    assert_eq!(vb.emit(call(2)).await, 1);
    first.wait_for(2, DEADLINE).await;
    second.wait_for(2, DEADLINE).await;
    assert_eq!(vb.snapshot().accepted, 1);
    bridge.shutdown().await;
}

#[tokio::test]
async fn removing_a_consumer_closes_its_ws_and_sse_sessions_and_refuses_its_token() {
    let vb = start_sim(Provider::Voipbin).await;
    let dir = temp_dir("reload-revoke");
    let path = dir.join("config.toml");
    let head = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\npath = {:?}\n\n{}{}",
        dir.join("j.db").display().to_string(),
        upstream_block("vb", &vb, FAST),
        consumer("alice", "alice-token-1"),
    );
    write(
        &path,
        &format!("{head}{}", consumer("carol", "carol-token-3")),
    );
    let config = wsbridge::config::Config::load(&path).expect("valid config");
    let (bridge, _rx) = start_bridge(&config).await;
    let addr = bridge.local_addr();

    // carol on /v1/ws and on SSE, alice on /v1/ws.
    let (mut carol_ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws?token=carol-token-3"))
            .await
            .expect("carol connects");
    let (mut alice_ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws?token=alice-token-1"))
            .await
            .expect("alice connects");
    for ws in [&mut carol_ws, &mut alice_ws] {
        let ready = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("ready");
        assert!(matches!(ready, Some(Ok(Message::Text(_)))), "{ready:?}");
    }
    let mut sse = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tokio::io::AsyncWriteExt::write_all(
        &mut sse,
        b"GET /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer carol-token-3\r\n\r\n",
    )
    .await
    .expect("request");
    let mut sse = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(sse));
    let status = tokio::time::timeout(DEADLINE, sse.next_line())
        .await
        .expect("status line")
        .expect("read");
    assert!(status.is_some_and(|l| l.contains("200")));
    // Wait until the SSE session is counted, so the reload happens while it is open.
    eventually("three sessions open", DEADLINE, || async {
        let counters = bridge.hub().counters();
        if counters.connected >= 3 {
            Ok(())
        } else {
            Err(format!("{counters:?}"))
        }
    })
    .await;

    // carol is removed from the config.
    write(&path, &head);
    let report = wsbridge::reload::reload_file(&bridge, &path)
        .await
        .expect("reload applies");
    assert!(
        report
            .applied
            .iter()
            .any(|c| c.starts_with("consumer carol")),
        "{report:?}"
    );

    // Her WebSocket is closed with 1008 ...
    let closed = tokio::time::timeout(DEADLINE, carol_ws.next())
        .await
        .expect("carol's socket answers");
    match closed {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1008),
        other => panic!("expected a 1008 close, got {other:?}"),
    }
    // ... her SSE stream ends with an error event ...
    let mut saw_error = false;
    loop {
        let line = tokio::time::timeout(DEADLINE, sse.next_line())
            .await
            .expect("the SSE stream ends in time")
            .expect("read");
        match line {
            Some(l) if l.contains("consumer configuration changed") => saw_error = true,
            Some(_) => {}
            None => break,
        }
        if saw_error {
            break;
        }
    }
    assert!(saw_error, "the SSE stream ended without saying why");
    // ... her token is refused from now on, and alice is untouched.
    match tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws?token=carol-token-3")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 401)
        }
        other => panic!("carol's token must be refused, got {:?}", other.map(|_| ())),
    }
    assert_answers_ping(&mut alice_ws).await;
    bridge.shutdown().await;
}

struct Served(Child, std::path::PathBuf);

impl Served {
    /// Waits until the bridge's log (stderr) contains `needle`.
    async fn wait_log(&self, needle: &str) {
        eventually(&format!("the log saying {needle:?}"), DEADLINE, || async {
            let log = std::fs::read_to_string(&self.1).unwrap_or_default();
            if log.contains(needle) {
                Ok(())
            } else {
                Err(format!("\n{log}"))
            }
        })
        .await;
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `wsbridge serve` on a fixed free port and waits for its admin API.
async fn serve(path: &Path, watch: &str) -> Served {
    let log = path.with_extension("log");
    let stderr = std::fs::File::create(&log).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_wsbridge"))
        .args([
            "serve",
            "--log-format",
            "json",
            "--watch-interval",
            watch,
            "--config",
        ])
        .arg(path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("bridge starts");
    Served(child, log)
}

async fn webhook_names(addr: &str) -> Option<Vec<String>> {
    let resp = http_client()
        .get(format!("http://{addr}/v1/admin/webhooks"))
        .bearer_auth("reload-admin-token")
        .send()
        .await
        .ok()?;
    let v: Value = serde_json::from_str(&resp.text().await.ok()?).ok()?;
    Some(
        v["webhooks"]
            .as_array()?
            .iter()
            .filter_map(|w| w["name"].as_str().map(String::from))
            .collect(),
    )
}

/// Polls the admin API (the bridge runs in another process) until `want` is listed.
async fn wait_for_webhooks(addr: &str, want: &[&str]) {
    eventually(&format!("the webhooks {want:?}"), DEADLINE, || async {
        match webhook_names(addr).await {
            Some(names) if names == want => Ok(()),
            names => Err(format!("{names:?}")),
        }
    })
    .await;
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
    l.local_addr().expect("addr").to_string()
}

#[tokio::test]
async fn sighup_and_file_changes_reload_the_binary() {
    let vb = start_sim(Provider::Voipbin).await;
    let rx = Receiver::start(vec![], Answer::status(200)).await;
    for (watch, by_signal) in [("0s", true), ("100ms", false)] {
        let dir = temp_dir("sighup");
        let path = dir.join("config.toml");
        let addr = free_addr();
        let base = format!(
            "[server]\nlisten = \"{addr}\"\nadmin_token = \"reload-admin-token\"\n[storage]\npath = {:?}\n\n{}{}",
            dir.join("j.db").display().to_string(),
            upstream_block("vb", &vb, FAST),
            webhook("one", &rx.url()),
        );
        write(&path, &base);
        let served = serve(&path, watch).await;
        wait_for_webhooks(&addr, &["one"]).await;

        write(&path, &format!("{base}{}", webhook("two", &rx.url())));
        if by_signal {
            let sent = Command::new("kill")
                .args(["-HUP", &served.0.id().to_string()])
                .status()
                .expect("kill runs");
            assert!(sent.success());
        }
        wait_for_webhooks(&addr, &["one", "two"]).await;

        // Broken config: refused (logged with the key), both endpoints still there.
        write(&path, "[[webhooks]]\nname = 1\n");
        if by_signal {
            Command::new("kill")
                .args(["-HUP", &served.0.id().to_string()])
                .status()
                .expect("kill runs");
        }
        served.wait_log("the running config is kept").await;
        served.wait_log("webhooks[0].name").await;
        wait_for_webhooks(&addr, &["one", "two"]).await;
        drop(served);
    }
}
