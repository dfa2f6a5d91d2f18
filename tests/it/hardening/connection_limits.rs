//! Finding 4 of issue 12: any client could exhaust the bridge's file descriptors without a
//! token. With no header-read timeout, no idle timeout and no cap on inbound connections,
//! idle TCP connections against a bridge with few descriptors made `accept` fail in a loop,
//! `/healthz` stopped answering and webhook POSTs failed until they were dead-lettered.
//!
//! The fix under test: inbound connections are capped (`limits.max_connections`, by default
//! what the open-file limit leaves after a reserve for upstreams, webhooks and the store), a
//! connection over the cap is answered 503 and closed at once, a request head must arrive
//! within `limits.header_timeout`, a keep-alive connection without a request is closed after
//! `limits.idle_timeout`, and `/v1/ws` sessions are not subject to either.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use wsbridge_adapters::Provider;

use crate::common::nats::free_addr;
use crate::common::receiver::{Answer, Receiver};
use crate::common::*;

/// The bridge's open-file limit in the flood test: small enough that 1,050 connections
/// would exhaust it many times over.
const BRIDGE_NOFILE: u64 = 256;
const IDLE_FLOOD: usize = 1_000;
const SLOW_HEADERS: usize = 50;
const CONSUMER_TOKEN: &str = "limits-consumer-token";

fn spawn_limited(config: &Path, nofile: u64) -> Process {
    let child = Command::new("prlimit")
        .arg(format!("--nofile={nofile}:{nofile}"))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_wsbridge"))
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("prlimit (util-linux) runs the bridge");
    Process(child)
}

/// Raises this test process's own soft open-file limit so that it can hold the flood
/// (the bridge under test is the one that runs short, not the test).
fn raise_own_nofile(needed: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read or write the struct passed by pointer.
    unsafe {
        assert_eq!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim),
            0,
            "getrlimit"
        );
        if lim.rlim_cur < needed as libc::rlim_t {
            lim.rlim_cur = lim.rlim_max;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0, "setrlimit");
        }
    }
    assert!(
        lim.rlim_cur >= needed as libc::rlim_t,
        "this test needs {needed} open files in the test process; the hard limit is {}",
        lim.rlim_max
    );
}

/// GET `path` with a short per-attempt limit, retried until it answers 200 within the deadline.
async fn get_ok(addr: SocketAddr, path: &str) -> String {
    let client = http_client();
    eventually(&format!("GET {path} answering 200"), DEADLINE, || async {
        match client
            .get(format!("http://{addr}{path}"))
            .timeout(Duration::from_secs(1))
            .send()
            .await
        {
            Ok(resp) if resp.status().as_u16() == 200 => {
                resp.text().await.map_err(|e| format!("body: {e}"))
            }
            Ok(resp) => Err(format!("status {}", resp.status())),
            Err(e) => Err(format!("{e}")),
        }
    })
    .await
}

/// The value of the metric line that starts with `series` (name and labels, as rendered).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Opens a connection and sends the start of a request head.
async fn start_slow_header(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("slow connection");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: bridge\r\n")
        .await
        .expect("first header bytes");
    s
}

/// Goes on sending the request head one header line at a time, never finishing it
/// (slowloris). Resolves when the server closes the connection, with what it answered.
async fn slow_header(mut s: TcpStream) -> String {
    // The attacker's pace: one more header line every 250 ms, far below any size limit.
    let mut pace = tokio::time::interval(Duration::from_millis(250));
    let mut buf = [0u8; 512];
    let mut answered = String::new();
    loop {
        tokio::select! {
            read = s.read(&mut buf) => match read {
                Ok(0) | Err(_) => return answered,
                Ok(n) => answered.push_str(&String::from_utf8_lossy(&buf[..n])),
            },
            _ = pace.tick() => {
                if s.write_all(b"X-Slow: 1\r\n").await.is_err() {
                    return answered;
                }
            }
        }
    }
}

/// Subscribes a `/v1/ws` consumer to everything and returns it.
async fn ws_consumer(addr: SocketAddr) -> Ws {
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws?token={CONSUMER_TOKEN}"))
            .await
            .expect("consumer connects");
    let hello = common_ws_recv(&mut ws).await;
    assert_eq!(hello["op"], "ready", "{hello}");
    ws.send(Message::text(
        json!({"op": "subscribe", "id": "all"}).to_string(),
    ))
    .await
    .expect("subscribe");
    assert_eq!(common_ws_recv(&mut ws).await["op"], "subscribed");
    ws
}

type Ws = crate::common::ws::Ws;

async fn common_ws_recv(ws: &mut Ws) -> Value {
    crate::common::ws::recv(ws).await
}

/// Reads event frames until every `c{i}` in `ids` arrived.
async fn ws_events(ws: &mut Ws, ids: &[usize]) {
    let mut missing: Vec<String> = ids.iter().map(|i| format!("\"c{i}\"")).collect();
    while !missing.is_empty() {
        let f = common_ws_recv(ws).await;
        assert_eq!(f["op"], "event", "unexpected frame {f}");
        let text = f.to_string();
        missing.retain(|m| !text.contains(m.as_str()));
    }
}

fn config_text(addr: SocketAddr, dir: &Path, blocks: &str, limits: &str) -> String {
    format!(
        "[server]\nlisten = \"{addr}\"\nshutdown_grace = \"2s\"\n[storage]\npath = {:?}\n\n\
         [limits]\n{limits}\n{blocks}\n\
         [[consumers]]\nname = \"watcher\"\ntoken = \"{CONSUMER_TOKEN}\"\n",
        dir.join("wsbridge.db").display().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_header_floods_leave_webhooks_consumers_and_healthz_working() {
    raise_own_nofile(2 * (IDLE_FLOOD + SLOW_HEADERS) as u64);
    let vb = start_sim(Provider::Voipbin).await;
    let rx = Receiver::start(vec![], Answer::status(200)).await;
    let dir = temp_dir("connection-limits");
    let addr = free_addr();
    let blocks = format!(
        "{}\n[[webhooks]]\nname = \"crm\"\nurl = \"{}\"\nsecrets = [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]\n\
         allow_private = true\nretry = [\"100ms\", \"100ms\", \"100ms\"]\n\n\
         [[routes]]\nname = \"all\"\nto = [\"crm\"]\n",
        upstream_block("vb", &vb, FAST),
        rx.url()
    );
    // The cap is left at its default (derived from the open-file limit); the header timeout
    // is short so that the slow connections are closed within the test's deadline.
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        config_text(addr, &dir, &blocks, "header_timeout = \"1s\"\n"),
    )
    .expect("write config");
    let _bridge = spawn_limited(&config, BRIDGE_NOFILE);
    wait_sim_ready(&vb, 1).await;
    get_ok(addr, "/healthz").await;
    let mut consumer = ws_consumer(addr).await;

    // No event before the flood: the webhook client has no pooled connection to reuse, so
    // every delivery below needs a new descriptor, as after a receiver's keep-alive ends.

    // The flood: slow-header connections first (so that they are the ones inside the cap),
    // then idle connections that never send a byte. All are held until the end of the test.
    let mut slow = JoinSet::new();
    for _ in 0..SLOW_HEADERS {
        slow.spawn(slow_header(start_slow_header(addr).await));
    }
    let mut connecting = JoinSet::new();
    for _ in 0..IDLE_FLOOD {
        connecting.spawn(async move {
            tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await
        });
    }
    let mut idle = Vec::with_capacity(IDLE_FLOOD);
    while let Some(done) = connecting.join_next().await {
        if let Ok(Ok(Ok(stream))) = done {
            idle.push(stream);
        }
    }
    assert!(
        idle.len() > BRIDGE_NOFILE as usize,
        "only {} idle connections were opened",
        idle.len()
    );

    // Upstream events still reach the webhook and the connected consumer.
    let ids: Vec<usize> = (1..=5).collect();
    for &i in &ids {
        assert_eq!(vb.emit(numbered_call(i)).await, 1);
    }
    let received = rx
        .wait_until(DEADLINE, "events sent during the flood", |r| {
            let bodies: Vec<String> = r
                .iter()
                .filter(|q| q.answered == 200)
                .map(|q| String::from_utf8_lossy(&q.body).into_owned())
                .collect();
            ids.iter()
                .all(|i| bodies.iter().any(|b| b.contains(&format!("\"c{i}\""))))
        })
        .await;
    assert!(!received.is_empty());
    ws_events(&mut consumer, &ids).await;

    // /healthz answers, and every slow-header connection (all inside the cap) is closed by
    // the server for its header timeout, without an answer.
    get_ok(addr, "/healthz").await;
    tokio::time::timeout(DEADLINE, async {
        while let Some(done) = slow.join_next().await {
            let answered = done.expect("slow-header task");
            assert_eq!(answered, "", "an unfinished request head got an answer");
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{} of {SLOW_HEADERS} slow-header connections still open after {DEADLINE:?}",
            slow.len()
        )
    });

    // Refusals and timeouts are counted.
    let text = get_ok(addr, "/metrics").await;
    let refused = metric(&text, "wsbridge_http_connections_refused_total").unwrap_or(0.0);
    assert!(refused > 0.0, "no refused connections counted:\n{text}");
    let header = metric(&text, "wsbridge_http_timeouts_total{kind=\"header\"}").unwrap_or(0.0);
    assert!(
        header >= SLOW_HEADERS as f64,
        "header timeouts {header}:\n{text}"
    );
    assert!(
        text.contains("# HELP wsbridge_http_connections_refused_total Inbound"),
        "{text}"
    );
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed_but_ws_sessions_and_cap_hold() {
    let vb = start_sim(Provider::Voipbin).await;
    let dir = temp_dir("connection-idle");
    let text = config_text(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &dir,
        &upstream_block("vb", &vb, FAST),
        "max_connections = 3\nheader_timeout = \"60s\"\nidle_timeout = \"300ms\"\n",
    );
    let config = wsbridge::config::Config::from_toml(&text, |_| None, false)
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    let (bridge, _events) = start_bridge(&config).await;
    wait_sim_ready(&vb, 1).await;
    let addr = bridge.local_addr();

    // A consumer session and two connections that have not sent a request yet fill the cap
    // (3): a fourth connection is answered 503 and closed at once.
    let mut consumer = ws_consumer(addr).await;
    let mut keep_alive = TcpStream::connect(addr).await.expect("connect");
    let mut third = TcpStream::connect(addr).await.expect("third");
    let mut fourth = TcpStream::connect(addr).await.expect("fourth");
    let mut refused = String::new();
    tokio::time::timeout(DEADLINE, fourth.read_to_string(&mut refused))
        .await
        .expect("the connection over the cap is closed in time")
        .expect("read");
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");

    // A keep-alive connection that makes one request and goes quiet is closed once it has
    // been idle for idle_timeout.
    keep_alive
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: bridge\r\n\r\n")
        .await
        .expect("request");
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(DEADLINE, keep_alive.read(&mut buf))
        .await
        .expect("an answer in time")
        .expect("read");
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    let closed = tokio::time::timeout(DEADLINE, keep_alive.read(&mut buf))
        .await
        .expect("the idle keep-alive connection is closed in time");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");

    // The connection that was inside the cap is served.
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: bridge\r\nConnection: close\r\n\r\n")
        .await
        .expect("request on the third connection");
    let mut answer = String::new();
    tokio::time::timeout(DEADLINE, third.read_to_string(&mut answer))
        .await
        .expect("answer in time")
        .expect("read");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // The consumer session, quiet for longer than idle_timeout, still gets events.
    assert_eq!(vb.emit(numbered_call(7)).await, 1);
    ws_events(&mut consumer, &[7]).await;

    let text = get_ok(addr, "/metrics").await;
    assert_eq!(
        metric(&text, "wsbridge_http_timeouts_total{kind=\"idle\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "wsbridge_http_connections_refused_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "wsbridge_http_connections_max"),
        Some(3.0),
        "{text}"
    );
    bridge.shutdown().await;
}
