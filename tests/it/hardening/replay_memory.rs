//! Finding 6 of issue 12: replays let one consumer pin hundreds of MB.
//!
//! 64 subscriptions from `earliest` on a connection that never reads took the bridge from 44
//! to 325 MB, none was closed as slow (a feeder blocked during replay never saw `Lagged`),
//! and the replays queued on the store's one reader ahead of webhook and readiness queries;
//! any number of connections could use one token. Now replay memory is bounded per
//! connection and in total (`limits.replay_memory_per_connection`,
//! `limits.replay_memory_total`), a consumer that does not read its replay is closed with
//! 4001 after `limits.replay_stall_timeout`, replays read on their own connections, and
//! `limits.max_connections_per_token` caps connections per consumer.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;
use wsbridge::bridge::Bridge;
use wsbridge_adapters::{hashi, Provider};

use crate::common::nats::webhook_block;
use crate::common::receiver::{Answer, Receiver};
use crate::common::ws::{connect, recv, Ws};
use crate::common::*;

const TOKEN: &str = "token-replay-memory";

/// The `[limits]` of these tests: small budgets and a short stall timeout.
const LIMITS: &str = "[limits]\nmax_connections_per_token = 2\nreplay_memory_per_connection = \"1MiB\"\nreplay_memory_total = \"2MiB\"\nreplay_stall_timeout = \"2s\"\n";
/// The total replay budget configured above.
const TOTAL_BUDGET: u64 = 2 * 1024 * 1024;

fn consumer_block() -> String {
    format!("[[consumers]]\nname = \"replayer\"\ntoken = \"{TOKEN}\"\n")
}

/// A VoIPBIN event of about 4 KiB.
fn padded_call(i: usize) -> Value {
    wsbridge_adapters::voipbin::wire::event(
        "call.status",
        "2024-01-15T10:30:00.000000Z",
        &format!("customer_id:abc123:call:c{i}"),
        json!({"id": format!("c{i}"), "status": "ringing", "n": i, "pad": "x".repeat(4096)}),
    )
}

fn lobby(i: usize) -> Value {
    hashi::wire::event(
        "lobby",
        "lobby.joined",
        json!({"lobbyId": "ABC123", "timestamp": "2024-01-15T10:30:00.000Z", "payload": {"n": i}}),
    )
}

/// Anonymous resident memory of this process (the bridge runs in it), in bytes.
fn rss_anon() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .expect("RssAnon in /proc/self/status")
}

/// A client whose socket receive buffer is small: a consumer that stopped reading.
async fn connect_small_window(bridge: &Bridge) -> Ws {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(16 * 1024).expect("SO_RCVBUF");
    let stream = socket.connect(bridge.local_addr()).await.expect("connect");
    let req = crate::common::ws::request(bridge, TOKEN);
    let (ws, _) = tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(stream))
        .await
        .expect("handshake");
    ws
}

/// One metric's value from `/metrics` (the first sample whose line starts with `name`).
async fn metric(bridge: &Bridge, name: &str) -> Option<f64> {
    let text = http_client()
        .get(format!("http://{}/metrics", bridge.local_addr()))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_never_reads_its_replays_is_closed_as_slow_with_bounded_memory() {
    let vb = start_sim(Provider::Voipbin).await;
    let hs = start_sim(Provider::Hashi).await;
    let hook = Receiver::start(vec![], Answer::status(200)).await;
    let cfg = config(&[
        upstream_block("vb", &vb, FAST),
        upstream_block("hs", &hs, FAST),
        webhook_block("hook", &hook.url(), ""),
        "[[routes]]\nname = \"lobbies\"\nproviders = [\"hashi\"]\nto = [\"hook\"]\n".to_string(),
        consumer_block(),
        LIMITS.to_string(),
    ]);
    let (bridge, _rx) = start_bridge(&cfg).await;
    wait_sim_ready(&vb, 1).await;
    wait_sim_ready(&hs, 1).await;

    // A journal of 3,000 events of ~4 KiB (12 MiB).
    const JOURNAL: usize = 3000;
    for i in 0..JOURNAL {
        vb.emit(padded_call(i)).await;
    }
    wait_published(&bridge, JOURNAL as u64).await;
    let baseline = rss_anon();

    // Two connections (the per-token cap), 64 subscriptions from earliest each, never read.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut ws = connect_small_window(&bridge).await;
        assert_eq!(recv(&mut ws).await["op"], "ready");
        for s in 0..64 {
            ws.send(Message::text(
                json!({"op": "subscribe", "id": s, "from": "earliest"}).to_string(),
            ))
            .await
            .expect("subscribe");
        }
        stalled.push(ws);
    }

    // Meanwhile webhooks keep getting their events and /readyz answers in time; the replay
    // budget is never exceeded. Until both stalled connections are closed as slow.
    let http = http_client();
    let mut peak = baseline;
    let mut peak_budget = 0.0f64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    let mut k = 0;
    while bridge.hub().counters().slow_disconnects < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the consumers that never read were not closed as slow ({:?}); anonymous RSS grew by {} MiB",
            bridge.hub().counters(),
            (peak - baseline) / (1024 * 1024)
        );
        assert_eq!(hs.emit(lobby(k)).await, 1);
        k += 1;
        hook.wait_for(k, DEADLINE).await;
        let ready = tokio::time::timeout(
            Duration::from_secs(5),
            http.get(format!("http://{}/readyz", bridge.local_addr()))
                .send(),
        )
        .await
        .expect("/readyz answers within 5 s during the replays")
        .expect("/readyz");
        assert_eq!(ready.status().as_u16(), 200);
        if let Some(b) = metric(&bridge, "wsbridge_consumer_replay_bytes").await {
            peak_budget = peak_budget.max(b);
        }
        peak = peak.max(rss_anon());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    peak = peak.max(rss_anon());
    let grown = peak.saturating_sub(baseline);
    assert!(
        grown < 48 * 1024 * 1024,
        "anonymous RSS grew by {} MiB with two stalled replaying connections",
        grown / (1024 * 1024)
    );
    assert!(
        peak_budget <= TOTAL_BUDGET as f64,
        "replay bytes {peak_budget} over the total budget {TOTAL_BUDGET}"
    );
    assert!(
        metric(&bridge, "wsbridge_consumer_replay_budget_waits_total")
            .await
            .unwrap_or(0.0)
            > 0.0,
        "the budget was reached and counted"
    );

    // Each stalled connection gets what was buffered, then 4001 "slow consumer" (both read
    // at once: the server waits a while for a slow consumer to take its close frame).
    let readers = stalled.into_iter().map(|mut ws| async move {
        let close = loop {
            match tokio::time::timeout(DEADLINE, ws.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => break frame,
                Ok(Some(Ok(_))) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        };
        let frame = close.expect("a close frame with a code");
        assert_eq!(u16::from(frame.code), 4001);
        assert_eq!(frame.reason.as_str(), "slow consumer");
    });
    futures_util::future::join_all(readers).await;
    bridge.shutdown().await;
}

/// Sends `GET /v1/events` and returns the status line.
async fn sse_status(bridge: &Bridge) -> (String, TcpStream) {
    let mut s = TcpStream::connect(bridge.local_addr())
        .await
        .expect("connect");
    s.write_all(
        format!("GET /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nAccept: text/event-stream\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("write");
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    tokio::time::timeout(DEADLINE, reader.read_line(&mut line))
        .await
        .expect("a status line in time")
        .expect("read");
    (line, reader.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_per_token_cap_are_refused_with_429() {
    let vb = start_sim(Provider::Voipbin).await;
    let cfg = config(&[
        upstream_block("vb", &vb, FAST),
        consumer_block(),
        LIMITS.to_string(),
    ]);
    let (bridge, _rx) = start_bridge(&cfg).await;
    let mut first = connect(&bridge, TOKEN).await;
    assert_eq!(recv(&mut first).await["op"], "ready");
    let (status, sse) = sse_status(&bridge).await;
    assert!(status.contains("200"), "{status}");
    // Two connections of this token are open (one WebSocket, one SSE): the third is refused.
    match tokio_tungstenite::connect_async(crate::common::ws::request(&bridge, TOKEN)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 429)
        }
        Ok(_) => panic!("a third connection of a token limited to 2 was accepted"),
        Err(e) => panic!("expected HTTP 429, got {e}"),
    }
    let (status, _) = sse_status(&bridge).await;
    assert!(status.contains("429"), "{status}");
    assert_eq!(
        metric(
            &bridge,
            "wsbridge_consumer_connections_refused_total{reason=\"token_limit\"}"
        )
        .await,
        Some(2.0)
    );
    // Closing one frees its place (the server notices the close on its own time).
    drop(sse);
    let (mut again, _) = eventually("a place freed", DEADLINE, || async {
        tokio_tungstenite::connect_async(crate::common::ws::request(&bridge, TOKEN)).await
    })
    .await;
    assert_eq!(recv(&mut again).await["op"], "ready");
    let _ = first.close(None).await;
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_consumer_that_never_reads_its_replay_is_ended_as_slow_and_frees_its_budget() {
    let vb = start_sim(Provider::Voipbin).await;
    let cfg = config(&[
        upstream_block("vb", &vb, FAST),
        consumer_block(),
        LIMITS.to_string(),
    ]);
    let (bridge, _rx) = start_bridge(&cfg).await;
    wait_sim_ready(&vb, 1).await;
    const JOURNAL: usize = 3000;
    for i in 0..JOURNAL {
        vb.emit(padded_call(i)).await;
    }
    wait_published(&bridge, JOURNAL as u64).await;

    // An SSE consumer from earliest behind a small window that never reads.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(16 * 1024).expect("SO_RCVBUF");
    let mut stream = socket.connect(bridge.local_addr()).await.expect("connect");
    stream
        .write_all(
            format!("GET /v1/events?from=earliest HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nAccept: text/event-stream\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("request");

    // Judged slow, and its replay budget given back while it still reads nothing.
    eventually(
        "the SSE consumer that never reads its replay ended as slow",
        Duration::from_secs(30),
        || async {
            let c = bridge.hub().counters();
            if c.slow_disconnects >= 1 && c.replay_bytes == 0 {
                Ok(())
            } else {
                Err(format!("{c:?}"))
            }
        },
    )
    .await;
    assert_eq!(bridge.hub().counters().slow_disconnects, 1);

    // When it reads, what was buffered ends with the verdict.
    let mut lines = BufReader::new(stream).lines();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .expect("the stream's end in time")
            .expect("read")
            .expect("the stream ends with an error event, not before");
        if line.contains("slow consumer") {
            break;
        }
    }
    bridge.shutdown().await;
}
