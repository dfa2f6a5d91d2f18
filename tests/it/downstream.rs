//! The unified WebSocket endpoint and SSE, against the real bridge and simulators: auth,
//! protocol errors that keep the connection, `allow`, resume with no gap and no duplicate
//! while events keep flowing, the slow-consumer rule, and SSE resume.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::ws::{connect, recv, sse_events, Ws};
use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;
use wsbridge::bridge::Bridge;
use wsbridge_adapters::sim::Simulator;
use wsbridge_adapters::{hashi, Provider};

const ALL_TOKEN: &str = "token-dashboard-all";
const VOIPBIN_ONLY_TOKEN: &str = "token-voipbin-only";

fn consumers() -> String {
    format!(
        "[[consumers]]\nname = \"all\"\ntoken = \"{ALL_TOKEN}\"\n\n\
         [[consumers]]\nname = \"calls\"\ntoken = \"{VOIPBIN_ONLY_TOKEN}\"\nallow = {{ providers = [\"voipbin\"] }}\n"
    )
}

async fn setup() -> (Bridge, Simulator, Simulator) {
    setup_with("").await
}

/// [`setup`] with `top` (a `[limits]` table, say) before the upstreams.
async fn setup_with(top: &str) -> (Bridge, Simulator, Simulator) {
    let vb = start_sim(Provider::Voipbin).await;
    let hs = start_sim(Provider::Hashi).await;
    let cfg = config(&[
        top.to_string(),
        upstream_block("vb", &vb, FAST),
        upstream_block("hs", &hs, FAST),
        consumers(),
    ]);
    let (bridge, _rx) = start_bridge(&cfg).await;
    wait_sim_ready(&vb, 1).await;
    wait_sim_ready(&hs, 1).await;
    (bridge, vb, hs)
}

fn lobby(i: usize) -> Value {
    hashi::wire::event(
        "lobby",
        "lobby.joined",
        json!({"lobbyId": "ABC123", "timestamp": "2024-01-15T10:30:00.000Z", "payload": {"n": i}}),
    )
}

/// A client whose socket receive buffer is small, like a stalled client behind a small window.
async fn connect_small_window(bridge: &Bridge, token: &str) -> Ws {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(16 * 1024).expect("SO_RCVBUF");
    let stream = socket.connect(bridge.local_addr()).await.expect("connect");
    let req = crate::common::ws::request(bridge, token);
    let (ws, _) = tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(stream))
        .await
        .expect("handshake");
    ws
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

/// Reads frames until `n` events arrived; returns them (panics on anything unexpected).
async fn events(ws: &mut Ws, n: usize) -> Vec<Value> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let f = recv(ws).await;
        assert_eq!(f["op"], "event", "unexpected frame {f}");
        out.push(f);
    }
    out
}

#[tokio::test]
async fn unknown_tokens_get_401_before_the_upgrade() {
    let (bridge, _vb, _hs) = setup().await;
    let req = crate::common::ws::request(&bridge, "nope-nope-nope");
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 401)
        }
        other => panic!("expected HTTP 401, got {other:?}"),
    }
    // ?token= works as well as the header.
    let url = format!("ws://{}/v1/ws?token={ALL_TOKEN}", bridge.local_addr());
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("query token accepted");
    assert_eq!(recv(&mut ws).await["consumer"], "all");
    bridge.shutdown().await;
}

#[tokio::test]
async fn protocol_errors_keep_the_connection_and_filters_apply() {
    let (bridge, vb, hs) = setup().await;
    let mut ws = connect(&bridge, ALL_TOKEN).await;
    let ready = recv(&mut ws).await;
    assert_eq!(ready["op"], "ready");
    assert_eq!(ready["consumer"], "all");
    assert!(
        ready["epoch"].is_string() && ready["head"].is_u64() && ready["session"].is_string(),
        "{ready}"
    );

    ws.send(Message::text("{not json")).await.expect("send");
    assert_eq!(recv(&mut ws).await["code"], "bad_request");
    send(&mut ws, json!({"op": "dance"})).await;
    assert_eq!(recv(&mut ws).await["code"], "unknown_op");
    send(
        &mut ws,
        json!({"op": "subscribe", "id": "x", "filter": {"types": ["a.**.b"]}}),
    )
    .await;
    let err = recv(&mut ws).await;
    assert_eq!(
        (err["code"].as_str(), err["id"].as_str()),
        (Some("bad_pattern"), Some("x")),
        "{err}"
    );
    send(&mut ws, json!({"op": "ping"})).await;
    assert_eq!(recv(&mut ws).await["op"], "pong");

    send(
        &mut ws,
        json!({"op": "subscribe", "id": "lobbies", "filter": {"types": ["hashi.lobby.*"]}}),
    )
    .await;
    assert_eq!(
        recv(&mut ws).await,
        json!({"op": "subscribed", "id": "lobbies"})
    );
    assert_eq!(vb.emit(numbered_call(1)).await, 1);
    assert_eq!(hs.emit(lobby(1)).await, 1);
    let got = events(&mut ws, 1).await;
    assert_eq!(got[0]["subscription"], "lobbies");
    assert_eq!(got[0]["event"]["type"], "hashi.lobby.joined");
    assert_eq!(got[0]["seq"], got[0]["event"]["seq"]);

    send(&mut ws, json!({"op": "unsubscribe", "id": "lobbies"})).await;
    assert_eq!(
        recv(&mut ws).await,
        json!({"op": "unsubscribed", "id": "lobbies"})
    );
    send(&mut ws, json!({"op": "unsubscribe", "id": "lobbies"})).await;
    assert_eq!(recv(&mut ws).await["code"], "unknown_subscription");
    bridge.shutdown().await;
}

#[tokio::test]
async fn a_consumer_never_sees_what_its_allow_forbids() {
    let (bridge, vb, hs) = setup().await;
    let mut ws = connect(&bridge, VOIPBIN_ONLY_TOKEN).await;
    recv(&mut ws).await;
    // Asks for everything, explicitly including hashi.
    send(&mut ws, json!({"op": "subscribe", "id": 1, "filter": {"providers": ["hashi", "voipbin"]}, "from": "earliest"})).await;
    assert_eq!(recv(&mut ws).await["op"], "subscribed");
    for i in 0..5 {
        assert_eq!(hs.emit(lobby(i)).await, 1);
        assert_eq!(vb.emit(numbered_call(i)).await, 1);
    }
    let got = events(&mut ws, 5).await;
    assert!(
        got.iter().all(|f| f["event"]["provider"] == "voipbin"),
        "{got:?}"
    );
    // Nothing else is queued: a ping is answered next, not a hashi event.
    send(&mut ws, json!({"op": "ping"})).await;
    assert_eq!(recv(&mut ws).await["op"], "pong");
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_from_seq_has_no_gap_and_no_duplicate_while_events_keep_arriving() {
    let (bridge, vb, _hs) = setup().await;
    const TOTAL: usize = 600;
    let emitter = {
        let vb = vb.clone();
        tokio::spawn(async move {
            for i in 0..TOTAL {
                vb.emit(numbered_call(i)).await;
                if i % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let mut seen: Vec<u64> = Vec::new();
    let mut epoch = String::new();
    let mut from = json!("earliest");
    // Three sessions: each reads a slice, then drops the connection mid-stream.
    for round in 0..3 {
        let mut ws = connect(&bridge, ALL_TOKEN).await;
        let ready = recv(&mut ws).await;
        if round == 0 {
            epoch = ready["epoch"].as_str().expect("epoch").to_string();
        }
        send(
            &mut ws,
            json!({"op": "subscribe", "id": "s", "from": from, "epoch": epoch}),
        )
        .await;
        assert_eq!(recv(&mut ws).await["op"], "subscribed");
        let take = if round < 2 { 150 } else { TOTAL - seen.len() };
        for f in events(&mut ws, take).await {
            seen.push(f["seq"].as_u64().expect("seq"));
        }
        from = json!(seen.last().expect("some") + 1);
        drop(ws);
    }
    emitter.await.expect("emitter");
    let expected: Vec<u64> = (1..=TOTAL as u64).collect();
    assert_eq!(
        seen, expected,
        "every seq once, in order, across three resumes"
    );

    // A position from another epoch, or from the future, is refused, never a silent gap.
    let mut ws = connect(&bridge, ALL_TOKEN).await;
    recv(&mut ws).await;
    send(
        &mut ws,
        json!({"op": "subscribe", "id": "old", "from": 3, "epoch": "not-this-store"}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["code"], "unrecoverable_position");
    send(
        &mut ws,
        json!({"op": "subscribe", "id": "future", "from": 1_000_000}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["code"], "unrecoverable_position");
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_closed_with_4001_and_a_fast_one_gets_everything() {
    // Fallen a ring behind, a consumer catches up from the journal; one whose replayed events
    // then stay unwritten past the stall timeout gets the verdict.
    let (bridge, vb, _hs) = setup_with("[limits]\nreplay_stall_timeout = \"500ms\"\n").await;
    let mut fast = connect(&bridge, ALL_TOKEN).await;
    let mut slow = connect_small_window(&bridge, ALL_TOKEN).await;
    for ws in [&mut fast, &mut slow] {
        recv(ws).await;
        send(ws, json!({"op": "subscribe", "id": "all"})).await;
        assert_eq!(recv(ws).await["op"], "subscribed");
    }
    // The fast consumer reads concurrently; the slow one does not read until the end, when
    // the events beyond its socket buffers (up to 4 MiB here) and the shared ring (8192
    // events) can only come from the journal.
    const TOTAL: usize = 60_000;
    let reader = tokio::spawn(async move {
        let got = events(&mut fast, TOTAL).await;
        got.iter()
            .map(|f| f["seq"].as_u64().expect("seq"))
            .collect::<Vec<_>>()
    });
    for i in 0..TOTAL {
        vb.emit(numbered_call(i)).await;
    }
    let fast_seqs = reader.await.expect("fast reader");
    assert_eq!(fast_seqs, (1..=TOTAL as u64).collect::<Vec<_>>());

    // The slow one reads half (by then from the journal: more than its buffers and the ring
    // hold), then stops: the rest of its catch-up waits unwritten, the verdict.
    let mut received = 0usize;
    while received < TOTAL / 2 {
        match tokio::time::timeout(DEADLINE, slow.next()).await {
            Ok(Some(Ok(Message::Text(_)))) => received += 1,
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected events, got {other:?}"),
        }
    }
    eventually("the slow-consumer verdict", DEADLINE, || async {
        (bridge.hub().counters().slow_disconnects >= 1).then_some(())
    })
    .await;
    // Whatever was buffered, then a close with 4001 "slow consumer".
    let close = loop {
        match tokio::time::timeout(DEADLINE, slow.next()).await {
            Ok(Some(Ok(Message::Text(_)))) => received += 1,
            Ok(Some(Ok(Message::Close(frame)))) => break frame,
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    let frame = close.expect("a close frame with a code");
    assert_eq!(u16::from(frame.code), 4001);
    assert_eq!(frame.reason.as_str(), "slow consumer");
    assert!(
        received < TOTAL,
        "the slow consumer was cut off, not fed everything"
    );
    bridge.shutdown().await;
}

/// A consumer that stops reading for a moment while more than the ring's worth of events
/// arrives, then reads on, catches up from the journal: every event, in order, no 4001.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_consumer_outrun_by_the_ring_once_catches_up_from_the_journal() {
    let (bridge, vb, _hs) = setup().await;
    let mut fast = connect(&bridge, ALL_TOKEN).await;
    let mut paused = connect_small_window(&bridge, ALL_TOKEN).await;
    for ws in [&mut fast, &mut paused] {
        recv(ws).await;
        send(ws, json!({"op": "subscribe", "id": "all"})).await;
        assert_eq!(recv(ws).await["op"], "subscribed");
    }
    // More than the ring (8192) plus the socket buffers behind the paused one.
    const TOTAL: usize = 30_000;
    let reader = tokio::spawn(async move { events(&mut fast, TOTAL).await.len() });
    for i in 0..TOTAL {
        vb.emit(numbered_call(i)).await;
    }
    // Every event is journalled and published once the fast consumer has them all.
    assert_eq!(reader.await.expect("fast reader"), TOTAL);
    let got = events(&mut paused, TOTAL).await;
    let seqs: Vec<u64> = got
        .iter()
        .map(|f| f["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs, (1..=TOTAL as u64).collect::<Vec<_>>());
    assert_eq!(bridge.hub().counters().slow_disconnects, 0);
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_replay_outrun_by_live_events_catches_up_instead_of_closing() {
    let (bridge, vb, _hs) = setup().await;
    // A backlog larger than the socket buffers, so the feeder is still replaying when ...
    const BACKLOG: usize = 20_000;
    // ... more live events than the shared ring holds arrive.
    const LIVE: usize = 9_000;
    for i in 0..BACKLOG {
        vb.emit(numbered_call(i)).await;
    }
    wait_published(&bridge, BACKLOG as u64).await;
    let mut ws = connect_small_window(&bridge, ALL_TOKEN).await;
    recv(&mut ws).await;
    send(
        &mut ws,
        json!({"op": "subscribe", "id": "all", "from": "earliest"}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["op"], "subscribed");
    // The consumer reads nothing while the live events arrive.
    for i in BACKLOG..BACKLOG + LIVE {
        vb.emit(numbered_call(i)).await;
    }
    wait_published(&bridge, (BACKLOG + LIVE) as u64).await;
    // Now it reads at full speed: everything, in order, and no 4001.
    let seqs: Vec<u64> = events(&mut ws, BACKLOG + LIVE)
        .await
        .iter()
        .map(|f| f["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs, (1..=(BACKLOG + LIVE) as u64).collect::<Vec<_>>());
    assert_eq!(bridge.hub().counters().slow_disconnects, 0);
    bridge.shutdown().await;
}

#[tokio::test]
async fn sse_streams_with_filters_and_resumes_after_last_event_id() {
    let (bridge, vb, hs) = setup().await;
    for i in 0..4 {
        assert_eq!(vb.emit(numbered_call(i)).await, 1);
        assert_eq!(hs.emit(lobby(i)).await, 1);
    }
    // Only voipbin, from the start of the journal.
    let first = sse_events(
        &bridge,
        ALL_TOKEN,
        "providers=voipbin&from=earliest",
        None,
        2,
    )
    .await;
    assert!(first.iter().all(|(_, e)| e["provider"] == "voipbin"));
    for (id, e) in &first {
        assert_eq!(e["seq"].as_u64(), Some(*id));
    }
    // Resume after the second one: the remaining two voipbin events, no repeats.
    let last = first[1].0;
    let rest = sse_events(
        &bridge,
        ALL_TOKEN,
        "providers=voipbin&types=voipbin.call.*",
        Some(last),
        2,
    )
    .await;
    let ids: BTreeSet<u64> = first.iter().chain(rest.iter()).map(|(id, _)| *id).collect();
    assert_eq!(ids.len(), 4, "four distinct voipbin events: {ids:?}");
    assert!(rest.iter().all(|(id, _)| *id > last));
    // Bad patterns are a 400, not a stream.
    let mut s = TcpStream::connect(bridge.local_addr())
        .await
        .expect("connect");
    s.write_all(format!("GET /v1/events?types=a.**.b HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALL_TOKEN}\r\nConnection: close\r\n\r\n").as_bytes()).await.expect("write");
    let mut lines = BufReader::new(s).lines();
    let status = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
        .await
        .expect("answer")
        .expect("read")
        .expect("line");
    assert!(status.contains("400"), "{status}");
    bridge.shutdown().await;
}
