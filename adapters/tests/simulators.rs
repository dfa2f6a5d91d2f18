//! The provider simulators over real sockets, driven by a plain tokio-tungstenite client: what
//! each provider's doc promises (paths, auth, replies, routing) and the control knobs the
//! bridge's tests rely on (raw frames, silence, abrupt drops, refusals, shutdown).
//!
//! No test sleeps for a fixed time: they wait for a simulator state with
//! `Simulator::wait_until`, or for a frame with a deadline.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wsbridge_adapters::sim::{
    self, HashiAuthFailure, SimOptions, SimSnapshot, Simulator, DEFAULT_HASHI_TOKEN,
    DEFAULT_VOIPBIN_TOKEN,
};
use wsbridge_adapters::{hashi, voicepact, voipbin, Provider};

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long any single wait may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(5);
/// How long a test listens to be sure that nothing arrives.
const QUIET: Duration = Duration::from_millis(150);

async fn start(provider: Provider) -> Simulator {
    Simulator::start(provider, SimOptions::for_provider(provider))
        .await
        .expect("simulator starts")
}

async fn connect(url: &str) -> Client {
    // Nagle off, so that a test's small frames are not held back by delayed ACKs.
    let connecting = tokio_tungstenite::connect_async_with_config(url, None, true);
    match tokio::time::timeout(DEADLINE, connecting).await {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(e)) => panic!("connecting to {url}: {e}"),
        Err(_) => panic!("connecting to {url} timed out"),
    }
}

async fn connect_error(url: &str) -> tungstenite::Error {
    match tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(url)).await {
        Ok(Ok(_)) => panic!("{url} upgraded, expected a failure"),
        Ok(Err(e)) => e,
        Err(_) => panic!("connecting to {url} timed out"),
    }
}

fn vp_url(sim: &Simulator, client_id: &str) -> String {
    format!("{}/{client_id}", sim.base_url())
}

fn token_url(sim: &Simulator, token: &str) -> String {
    format!("{}?token={token}", sim.base_url())
}

async fn send(ws: &mut Client, text: impl Into<String>) {
    ws.send(Message::text(text.into())).await.expect("send");
}

/// The next text frame as JSON (protocol pings and pongs are skipped).
async fn next_json(ws: &mut Client) -> Value {
    let text = next_text(ws).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"))
}

async fn next_text(ws: &mut Client) -> String {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return t.to_string(),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(other) => panic!("expected a text frame, got {other:?}"),
            Err(_) => panic!("no text frame within {DEADLINE:?}"),
        }
    }
}

/// Asserts that no text frame arrives for a while.
async fn assert_quiet(ws: &mut Client) {
    let deadline = tokio::time::Instant::now() + QUIET;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(other) => panic!("expected silence, got {other:?}"),
        }
    }
}

/// Reads until the stream ends; returns whether a close frame came first.
async fn closed_with_frame(ws: &mut Client) -> bool {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut saw_close = false;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(None | Some(Err(_))) => return saw_close,
            Ok(Some(Ok(Message::Close(_)))) => saw_close = true,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(Some(Ok(other))) => panic!("expected the stream to end, got {other:?}"),
            Err(_) => panic!("the stream did not end within {DEADLINE:?}"),
        }
    }
}

async fn wait(sim: &Simulator, what: &str, pred: impl Fn(&SimSnapshot) -> bool) -> SimSnapshot {
    sim.wait_until(DEADLINE, pred)
        .await
        .unwrap_or_else(|s| panic!("{:?}: never {what}: {s:?}", sim.provider()))
}

fn subscribed(s: &SimSnapshot, sub: &str) -> usize {
    s.connections
        .iter()
        .filter(|c| c.subscriptions.iter().any(|x| x == sub))
        .count()
}

fn http_status(e: &tungstenite::Error) -> u16 {
    match e {
        tungstenite::Error::Http(resp) => resp.status().as_u16(),
        other => panic!("expected an HTTP error response, got {other}"),
    }
}

fn http_body(e: &tungstenite::Error) -> Value {
    match e {
        tungstenite::Error::Http(resp) => {
            let body = resp.body().as_deref().unwrap_or_default();
            serde_json::from_slice(body).unwrap_or_else(|err| panic!("body {body:?}: {err}"))
        }
        other => panic!("expected an HTTP error response, got {other}"),
    }
}

fn call_event(call: &str) -> Value {
    voipbin::wire::event(
        "call.status",
        "2024-01-15T10:30:00.000000Z",
        &format!("customer_id:abc123:call:{call}"),
        json!({"id": call, "status": "ringing"}),
    )
}

// --- VoicePact -------------------------------------------------------------------------------

#[tokio::test]
async fn voicepact_echoes_pings_and_ignores_junk() {
    let sim = start(Provider::VoicePact).await;
    let mut ws = connect(&vp_url(&sim, "+254700000001")).await;
    let s = wait(&sim, "registered the client", |s| s.connections.len() == 1).await;
    assert_eq!(s.connections[0].identity, "+254700000001");
    assert!(s.connections[0].subscriptions.is_empty());

    // Invalid JSON and unknown types: no answer, the connection stays.
    send(&mut ws, "not json").await;
    send(&mut ws, r#"{"type":"dance"}"#).await;
    send(&mut ws, voicepact::wire::ping(1717171717)).await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "pong", "timestamp": 1717171717})
    );
    send(&mut ws, r#"{"type":"ping"}"#).await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "pong", "timestamp": null})
    );

    let s = wait(&sim, "counted the frames", |s| s.client_frames == 4).await;
    assert_eq!(s.pings_received, 2);
    assert_eq!(s.accepted, 1);
}

#[tokio::test]
async fn voicepact_contract_updates_reach_parties_and_payments_reach_everyone() {
    let sim = start(Provider::VoicePact).await;
    sim.set_contract_parties("ctr-1", &["alice", "bob"]);
    let mut alice = connect(&vp_url(&sim, "alice")).await;
    let mut bob = connect(&vp_url(&sim, "bob")).await;
    let mut carol = connect(&vp_url(&sim, "carol")).await;
    wait(&sim, "three connections", |s| s.connections.len() == 3).await;

    let update = voicepact::wire::contract_update("ctr-1", "active", 1717171717);
    assert_eq!(sim.emit(update.clone()).await, 2);
    assert_eq!(next_json(&mut alice).await, update);
    assert_eq!(next_json(&mut bob).await, update);
    // A contract nobody is party to reaches nobody.
    assert_eq!(
        sim.emit(voicepact::wire::contract_update("ctr-2", "active", 1))
            .await,
        0
    );

    let payment = voicepact::wire::payment_update("ctr-1", "completed", 250.5, 1717171718);
    assert_eq!(sim.emit(payment.clone()).await, 3);
    // Carol's first frame is the payment: she never got the contract update.
    assert_eq!(next_json(&mut carol).await, payment);
    assert_eq!(next_json(&mut alice).await, payment);
    assert_eq!(next_json(&mut bob).await, payment);

    // The status request answers with the last emitted status.
    send(&mut carol, voicepact::wire::contract_status("ctr-1")).await;
    assert_eq!(
        next_json(&mut carol).await,
        json!({"type": "contract_status_response", "contract_id": "ctr-1", "status": "active"})
    );
    send(&mut carol, voicepact::wire::contract_status("ctr-404")).await;
    assert_eq!(next_json(&mut carol).await["status"], Value::Null);
}

#[tokio::test]
async fn voicepact_connections_may_share_a_client_id() {
    let sim = start(Provider::VoicePact).await;
    sim.set_contract_parties("ctr-1", &["alice"]);
    let mut a1 = connect(&vp_url(&sim, "alice")).await;
    let mut a2 = connect(&vp_url(&sim, "alice")).await;
    wait(&sim, "two connections", |s| s.connections.len() == 2).await;
    assert_eq!(
        sim.emit(voicepact::wire::contract_update("ctr-1", "completed", 1))
            .await,
        2
    );
    assert_eq!(next_json(&mut a1).await["status"], "completed");
    assert_eq!(next_json(&mut a2).await["status"], "completed");
}

#[tokio::test]
async fn voicepact_other_paths_are_404() {
    let sim = start(Provider::VoicePact).await;
    let addr = sim.local_addr();
    for path in ["/", "/api/v1/ws", "/api/v1/ws/a/b", "/v1.0/ws"] {
        let e = connect_error(&format!("ws://{addr}{path}")).await;
        assert_eq!(http_status(&e), 404, "{path}");
    }
    assert_eq!(sim.snapshot().accepted, 0);
}

// --- VoIPBIN ---------------------------------------------------------------------------------

#[tokio::test]
async fn voipbin_rejects_bad_tokens_with_http_401_before_the_upgrade() {
    let sim = start(Provider::Voipbin).await;
    let e = connect_error(&token_url(&sim, "wrong-token")).await;
    assert_eq!(http_status(&e), 401);
    assert_eq!(http_body(&e), json!({"message": "unauthorized"}));
    let e = connect_error(&sim.base_url()).await;
    assert_eq!(http_status(&e), 401);
    let s = sim.snapshot();
    assert_eq!((s.auth_rejected, s.accepted), (2, 0));
    assert!(s.connections.is_empty());

    // The token may also come as a bearer header or a cookie.
    let mut open = Vec::new();
    for (name, value) in [
        ("authorization", format!("Bearer {DEFAULT_VOIPBIN_TOKEN}")),
        ("cookie", format!("lang=en; token={DEFAULT_VOIPBIN_TOKEN}")),
    ] {
        use tungstenite::client::IntoClientRequest;
        let mut req = sim.base_url().into_client_request().expect("request");
        req.headers_mut()
            .insert(name, value.parse().expect("header"));
        let (ws, resp) = tokio_tungstenite::connect_async(req)
            .await
            .expect("upgrade");
        assert_eq!(resp.status(), 101, "{name}");
        open.push(ws);
    }
    let s = wait(&sim, "two connections", |s| s.connections.len() == 2).await;
    for c in &s.connections {
        assert!(c.identity.starts_with("agent-"), "{c:?}");
        assert!(!c.identity.contains(DEFAULT_VOIPBIN_TOKEN), "{c:?}");
    }
}

#[tokio::test]
async fn voipbin_routes_events_by_topic_with_wildcards() {
    let sim = start(Provider::Voipbin).await;
    let url = token_url(&sim, DEFAULT_VOIPBIN_TOKEN);
    let mut calls = connect(&url).await;
    let mut messages = connect(&url).await;
    let mut idle = connect(&url).await;
    send(
        &mut calls,
        voipbin::wire::subscribe(&["customer_id:abc123:call:*".into()]),
    )
    .await;
    send(
        &mut messages,
        voipbin::wire::subscribe(&["customer_id:abc123:*:m-42".into()]),
    )
    .await;
    // No acknowledgement: the simulator's state shows the subscriptions.
    wait(&sim, "both subscribed", |s| {
        subscribed(s, "customer_id:abc123:call:*") == 1
            && subscribed(s, "customer_id:abc123:*:m-42") == 1
    })
    .await;

    assert_eq!(sim.emit(call_event("xyz789")).await, 1);
    assert_eq!(
        next_json(&mut calls).await["topic"],
        "customer_id:abc123:call:xyz789"
    );
    let msg = voipbin::wire::event(
        "message.received",
        "t",
        "customer_id:abc123:message:m-42",
        json!({"id": "m-42"}),
    );
    assert_eq!(sim.emit(msg).await, 1);
    assert_eq!(
        next_json(&mut messages).await["event_type"],
        "message.received"
    );
    // Another customer's call reaches nobody.
    let other = voipbin::wire::event("call.status", "t", "customer_id:zzz:call:c1", json!({}));
    assert_eq!(sim.emit(other).await, 0);
    // A legacy frame without a topic goes to every subscribed connection.
    let legacy = json!({"type": "call_created", "data": {"id": "legacy-1"}});
    assert_eq!(sim.emit(legacy.clone()).await, 2);
    assert_eq!(next_json(&mut calls).await, legacy);
    assert_eq!(next_json(&mut messages).await, legacy);
    assert_quiet(&mut idle).await;
}

#[tokio::test]
async fn voipbin_unsubscribe_stops_delivery() {
    let sim = start(Provider::Voipbin).await;
    let mut ws = connect(&token_url(&sim, DEFAULT_VOIPBIN_TOKEN)).await;
    let topics = vec![
        "customer_id:abc123:call:*".to_string(),
        "customer_id:abc123:queue:*".to_string(),
    ];
    send(&mut ws, voipbin::wire::subscribe(&topics)).await;
    wait(&sim, "subscribed", |s| {
        s.connections.iter().any(|c| c.subscriptions == topics)
    })
    .await;
    send(&mut ws, voipbin::wire::unsubscribe(&topics[..1])).await;
    wait(&sim, "unsubscribed", |s| {
        s.connections.iter().any(|c| c.subscriptions == topics[1..])
    })
    .await;
    assert_eq!(sim.emit(call_event("c1")).await, 0);
    assert_quiet(&mut ws).await;
}

#[tokio::test]
async fn voipbin_invalid_topic_closes_the_socket() {
    let sim = start(Provider::Voipbin).await;
    let mut ws = connect(&token_url(&sim, DEFAULT_VOIPBIN_TOKEN)).await;
    wait(&sim, "one connection", |s| s.connections.len() == 1).await;
    send(
        &mut ws,
        voipbin::wire::subscribe(&[
            "customer_id:abc123:call:*".into(),
            "customer_id:abc123".into(),
        ]),
    )
    .await;
    assert!(
        !closed_with_frame(&mut ws).await,
        "the socket is closed without a close frame"
    );
    let s = wait(&sim, "dropped the connection", |s| s.connections.is_empty()).await;
    assert_eq!(s.client_frames, 1);
}

#[tokio::test]
async fn voipbin_pings_clients_and_drops_those_that_do_not_answer() {
    let sim = Simulator::start(
        Provider::Voipbin,
        SimOptions {
            server_ping_interval: Duration::from_millis(20),
            pong_timeout: Duration::from_millis(200),
            ..SimOptions::for_provider(Provider::Voipbin)
        },
    )
    .await
    .expect("simulator starts");
    let url = token_url(&sim, DEFAULT_VOIPBIN_TOKEN);
    let mut reader = connect(&url).await;
    let _mute = connect(&url).await; // never read, so its pings are never answered
    let s = wait(&sim, "two connections", |s| s.connections.len() == 2).await;
    let reader_id = s.connections[0].id;

    // The reader answers (tungstenite does, as it reads) and outlives the pong timeout.
    let reading = tokio::spawn(async move {
        let mut pings = 0;
        while let Some(Ok(m)) = reader.next().await {
            if m.is_ping() {
                pings += 1;
            }
        }
        pings
    });
    let s = wait(&sim, "dropped the mute client", |s| {
        s.connections.len() == 1
    })
    .await;
    assert_eq!(s.connections[0].id, reader_id, "the answering client stays");
    sim.shutdown().await;
    let pings = tokio::time::timeout(DEADLINE, reading)
        .await
        .expect("reader ends")
        .expect("reader");
    assert!(pings >= 5, "only {pings} server pings seen");
}

// --- Hashi -----------------------------------------------------------------------------------

#[tokio::test]
async fn hashi_greets_with_connected_and_answers_pings() {
    let sim = start(Provider::Hashi).await;
    let mut ws = connect(&token_url(&sim, DEFAULT_HASHI_TOKEN)).await;
    let hello = next_json(&mut ws).await;
    assert_eq!(hello["type"], "connected");
    let player = hello["data"]["playerId"]
        .as_str()
        .expect("a player id")
        .to_string();
    assert!(
        player.starts_with("player-") && !player.contains(DEFAULT_HASHI_TOKEN),
        "{player}"
    );
    let s = sim.snapshot();
    assert_eq!(s.connections.len(), 1);
    assert_eq!(s.connections[0].identity, player);

    send(&mut ws, hashi::wire::ping()).await;
    assert_eq!(next_json(&mut ws).await, json!({"type": "pong"}));
    // Bad input gets an error frame and the connection stays.
    for junk in ["not json", r#"{"type":"dance"}"#] {
        send(&mut ws, junk).await;
        let e = next_json(&mut ws).await;
        assert_eq!(
            (e["type"].as_str(), e["data"]["code"].as_str()),
            (Some("error"), Some("INVALID_MESSAGE")),
            "{junk}"
        );
    }
    send(&mut ws, hashi::wire::ping()).await;
    assert_eq!(next_json(&mut ws).await["type"], "pong");
    let s = sim.snapshot();
    assert_eq!(
        (s.pings_received, s.client_frames, s.connections.len()),
        (2, 4, 1)
    );
}

#[tokio::test]
async fn hashi_bad_token_gets_an_auth_error_frame_then_a_close() {
    let sim = start(Provider::Hashi).await;
    for url in [token_url(&sim, "wrong-token"), sim.base_url()] {
        let mut ws = connect(&url).await;
        assert_eq!(
            next_json(&mut ws).await,
            json!({"type": "error", "data": {"message": "Authentication failed", "code": "AUTH_ERROR"}})
        );
        assert!(
            closed_with_frame(&mut ws).await,
            "{url}: a close frame follows the error"
        );
    }
    let s = sim.snapshot();
    assert_eq!(
        (s.auth_rejected, s.accepted, s.connections.len()),
        (2, 0, 0)
    );
}

#[tokio::test]
async fn hashi_http401_mode_rejects_before_the_upgrade() {
    let sim = Simulator::start(
        Provider::Hashi,
        SimOptions {
            hashi_auth_failure: HashiAuthFailure::Http401,
            ..SimOptions::for_provider(Provider::Hashi)
        },
    )
    .await
    .expect("simulator starts");
    let e = connect_error(&token_url(&sim, "wrong-token")).await;
    assert_eq!(http_status(&e), 401);
    assert_eq!(http_body(&e)["data"]["code"], "AUTH_ERROR");
    assert_eq!(sim.snapshot().auth_rejected, 1);
    // A good token still works in this mode.
    let mut ws = connect(&token_url(&sim, DEFAULT_HASHI_TOKEN)).await;
    assert_eq!(next_json(&mut ws).await["type"], "connected");
}

#[tokio::test]
async fn hashi_routes_lobby_and_storage_events_to_room_members_and_contracts_to_all() {
    let sim = start(Provider::Hashi).await;
    let url = token_url(&sim, DEFAULT_HASHI_TOKEN);
    let mut member = connect(&url).await;
    let mut other = connect(&url).await;
    let mut lurker = connect(&url).await;
    for ws in [&mut member, &mut other, &mut lurker] {
        assert_eq!(next_json(ws).await["type"], "connected");
    }
    send(&mut member, hashi::wire::subscribe("ABC123")).await;
    send(&mut other, hashi::wire::subscribe("XYZ789")).await;
    wait(&sim, "both in their rooms", |s| {
        subscribed(s, "ABC123") == 1 && subscribed(s, "XYZ789") == 1
    })
    .await;

    let ts = "2024-01-15T10:30:00.000Z";
    let lobby = hashi::wire::event(
        "lobby",
        "lobby.joined",
        json!({"lobbyId": "ABC123", "timestamp": ts, "payload": {"participantCount": 2}}),
    );
    assert_eq!(sim.emit(lobby.clone()).await, 1);
    assert_eq!(next_json(&mut member).await, lobby);
    // A lobby event also reaches the room named by its lobbyCode.
    let by_code = hashi::wire::event(
        "lobby",
        "lobby.left",
        json!({"lobbyId": "550e8400", "lobbyCode": "XYZ789", "timestamp": ts}),
    );
    assert_eq!(sim.emit(by_code.clone()).await, 1);
    assert_eq!(next_json(&mut other).await, by_code);
    let storage = hashi::wire::event(
        "storage",
        "storage.deleted",
        json!({"storageId": "st-1", "lobbyId": "ABC123", "timestamp": ts}),
    );
    assert_eq!(sim.emit(storage.clone()).await, 1);
    assert_eq!(next_json(&mut member).await, storage);
    let contract = hashi::wire::event(
        "contract",
        "contract.created",
        json!({"contractId": "k1", "lobbyId": "ABC123", "timestamp": ts}),
    );
    assert_eq!(sim.emit(contract.clone()).await, 3);
    for ws in [&mut member, &mut other, &mut lurker] {
        assert_eq!(
            next_json(ws).await,
            contract,
            "the lurker's first event is the contract"
        );
    }

    send(&mut member, hashi::wire::unsubscribe("ABC123")).await;
    wait(&sim, "left the room", |s| subscribed(s, "ABC123") == 0).await;
    assert_eq!(sim.emit(lobby).await, 0);
    assert_quiet(&mut member).await;
}

// --- Control knobs ---------------------------------------------------------------------------

#[tokio::test]
async fn send_raw_reaches_every_authenticated_connection() {
    let sim = start(Provider::Hashi).await;
    let mut a = connect(&token_url(&sim, DEFAULT_HASHI_TOKEN)).await;
    let mut b = connect(&token_url(&sim, DEFAULT_HASHI_TOKEN)).await;
    for ws in [&mut a, &mut b] {
        assert_eq!(next_json(ws).await["type"], "connected");
    }
    // A rejected client is not an audience.
    let mut rejected = connect(&token_url(&sim, "wrong-token")).await;
    assert_eq!(next_json(&mut rejected).await["data"]["code"], "AUTH_ERROR");
    assert_eq!(sim.send_raw("not json at all").await, 2);
    assert_eq!(next_text(&mut a).await, "not json at all");
    assert_eq!(next_text(&mut b).await, "not json at all");
}

#[tokio::test]
async fn silence_stops_app_pongs_until_cleared() {
    let sim = start(Provider::VoicePact).await;
    let mut ws = connect(&vp_url(&sim, "alice")).await;
    wait(&sim, "connected", |s| s.connections.len() == 1).await;
    sim.set_silent(true);
    send(&mut ws, voicepact::wire::ping(1)).await;
    assert_quiet(&mut ws).await;
    assert_eq!(
        sim.snapshot().client_frames,
        0,
        "a silent server does not read"
    );
    sim.set_silent(false);
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "pong", "timestamp": 1})
    );
}

#[tokio::test]
async fn silence_stops_protocol_pongs_until_cleared() {
    let sim = start(Provider::Voipbin).await;
    let mut ws = connect(&token_url(&sim, DEFAULT_VOIPBIN_TOKEN)).await;
    wait(&sim, "connected", |s| s.connections.len() == 1).await;
    sim.set_silent(true);
    ws.send(Message::Ping("hb".into())).await.expect("ping");
    match tokio::time::timeout(QUIET, ws.next()).await {
        Err(_) => {}
        Ok(other) => panic!("a silent server answered: {other:?}"),
    }
    sim.set_silent(false);
    match tokio::time::timeout(DEADLINE, ws.next()).await {
        Ok(Some(Ok(Message::Pong(p)))) => assert_eq!(&p[..], b"hb"),
        other => panic!("expected the pong after the silence, got {other:?}"),
    }
    assert_eq!(sim.snapshot().pings_received, 1);
}

#[tokio::test]
async fn silence_holds_new_upgrades_and_events() {
    let sim = start(Provider::Hashi).await;
    sim.set_silent(true);
    let url = token_url(&sim, DEFAULT_HASHI_TOKEN);
    let mut pending = tokio::spawn(async move {
        tokio_tungstenite::connect_async(url)
            .await
            .map(|(ws, _)| ws)
    });
    assert!(
        tokio::time::timeout(QUIET, &mut pending).await.is_err(),
        "a silent server does not upgrade"
    );
    assert_eq!(sim.snapshot().accepted, 0);
    sim.set_silent(false);
    let mut ws = tokio::time::timeout(DEADLINE, pending)
        .await
        .expect("upgrade after the silence")
        .expect("task")
        .expect("upgrade");
    assert_eq!(next_json(&mut ws).await["type"], "connected");
    assert_eq!(sim.snapshot().accepted, 1);
}

#[tokio::test]
async fn drop_all_ends_client_streams_without_a_close_frame() {
    let sim = start(Provider::VoicePact).await;
    let mut a = connect(&vp_url(&sim, "alice")).await;
    let mut b = connect(&vp_url(&sim, "bob")).await;
    wait(&sim, "two connections", |s| s.connections.len() == 2).await;
    sim.drop_all();
    assert!(!closed_with_frame(&mut a).await);
    assert!(!closed_with_frame(&mut b).await);
    wait(&sim, "no connections", |s| s.connections.is_empty()).await;
    // New connections are not affected.
    let mut c = connect(&vp_url(&sim, "carol")).await;
    wait(&sim, "a new connection", |s| s.connections.len() == 1).await;
    assert_eq!(
        sim.emit(voicepact::wire::payment_update("ctr", "pending", 1.0, 1))
            .await,
        1
    );
    assert_eq!(next_json(&mut c).await["type"], "payment_update");
}

#[tokio::test]
async fn refuse_for_refuses_then_recovers() {
    let sim = start(Provider::VoicePact).await;
    let refusal = Duration::from_millis(300);
    sim.refuse_for(refusal);
    let refusal_ends = tokio::time::Instant::now() + refusal;
    let e = connect_error(&vp_url(&sim, "alice")).await;
    assert!(
        !matches!(e, tungstenite::Error::Http(_)),
        "refused before any HTTP answer: {e}"
    );
    let s = sim.snapshot();
    assert_eq!((s.refused, s.accepted), (1, 0));
    tokio::time::sleep_until(refusal_ends).await;
    let _ws = connect(&vp_url(&sim, "alice")).await;
    assert_eq!(sim.snapshot().accepted, 1);
}

#[tokio::test]
async fn shutdown_closes_connections_and_stops_listening() {
    let sim = start(Provider::VoicePact).await;
    let mut ws = connect(&vp_url(&sim, "alice")).await;
    wait(&sim, "connected", |s| s.connections.len() == 1).await;
    let url = vp_url(&sim, "bob");
    let (_, closed) = tokio::join!(sim.shutdown(), closed_with_frame(&mut ws));
    assert!(closed, "shutdown closes with a close frame");
    assert!(sim.snapshot().connections.is_empty());
    assert!(tokio_tungstenite::connect_async(url).await.is_err());
}

/// A client's close is answered the way a real server answers it: the frames the server sent
/// (queued) before the close arrived reach the client first, then the close answer, then the
/// server ends the connection (RFC 6455, 5.5.1). The bridge's drain at shutdown relies on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_close_is_answered_after_the_frames_already_sent() {
    let sim = start(Provider::VoicePact).await;
    let mut ws = connect(&vp_url(&sim, "alice")).await;
    wait(&sim, "connected", |s| s.connections.len() == 1).await;
    // Silent, so the frames and the client's close are both waiting when the server resumes.
    sim.set_silent(true);
    for i in 0..50 {
        let frame = voicepact::wire::payment_update(&format!("ctr-{i}"), "pending", 1.0, 1);
        assert_eq!(sim.emit(frame).await, 1);
    }
    ws.close(None).await.expect("close sent");
    sim.set_silent(false);
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let answered = loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(t.as_str()).expect("JSON");
                got.push(v["contract_id"].as_str().expect("contract_id").to_string());
            }
            Ok(Some(Ok(Message::Close(_)))) => break true,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(None | Some(Err(_))) => break false,
            Ok(Some(Ok(other))) => panic!("unexpected {other:?}"),
            Err(_) => panic!("no close answer within {DEADLINE:?}"),
        }
    };
    assert!(answered, "the close is answered with a close frame");
    let sent: Vec<String> = (0..50).map(|i| format!("ctr-{i}")).collect();
    assert_eq!(got, sent, "every frame sent before the close, in order");
    wait(&sim, "the connection ended", |s| {
        s.connections.is_empty() && s.client_closes == 1
    })
    .await;
}

#[tokio::test]
async fn wait_until_returns_the_last_snapshot_on_timeout() {
    let sim = start(Provider::VoicePact).await;
    let err = sim
        .wait_until(Duration::from_millis(20), |s| s.accepted > 0)
        .await
        .expect_err("nothing connects");
    assert_eq!(err.accepted, 0);
}

#[tokio::test]
async fn start_all_serves_every_provider_at_its_base_url() {
    let sims = sim::start_all(true).await.expect("simulators start");
    let providers: Vec<Provider> = sims.iter().map(Simulator::provider).collect();
    assert_eq!(providers, Provider::ALL.to_vec());
    for s in &sims {
        let port = s.local_addr().port();
        assert_ne!(port, 0);
        let expected = match s.provider() {
            Provider::VoicePact => format!("ws://127.0.0.1:{port}/api/v1/ws"),
            Provider::Voipbin => format!("ws://127.0.0.1:{port}/v1.0/ws"),
            Provider::Hashi => format!("ws://127.0.0.1:{port}/"),
        };
        assert_eq!(s.base_url(), expected);
    }
    let vp = connect(&vp_url(&sims[0], "alice")).await;
    let vb = connect(&token_url(&sims[1], DEFAULT_VOIPBIN_TOKEN)).await;
    let mut hs = connect(&token_url(&sims[2], DEFAULT_HASHI_TOKEN)).await;
    assert_eq!(next_json(&mut hs).await["type"], "connected");
    for s in &sims {
        wait(s, "one connection", |snap| snap.connections.len() == 1).await;
    }
    drop((vp, vb, hs));
    for s in &sims {
        s.shutdown().await;
        assert!(s.snapshot().connections.is_empty());
    }
}
