//! Durable subscriptions over `/v1/ws` against the real bridge, simulator and database file:
//! acks survive a reconnect and only the unacked come back (`delivery` 2), connections on one
//! durable share its events, ack deadlines, naks, dead letters and their replay, seek, expiry
//! after `limits.durable_ttl`, protocol errors, and a SIGKILL with unacked events.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Duration;

use crate::common::ws::{connect, recv, Ws};
use crate::common::*;
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use wsbridge::bridge::Bridge;
use wsbridge_adapters::sim::Simulator;
use wsbridge_adapters::Provider;

const TOKEN: &str = "token-durable-worker";
const OTHER_TOKEN: &str = "token-durable-other";
const ADMIN: &str = "admin-token-durables";

fn consumers() -> String {
    format!(
        "[[consumers]]\nname = \"worker\"\ntoken = \"{TOKEN}\"\n\n\
         [[consumers]]\nname = \"other\"\ntoken = \"{OTHER_TOKEN}\"\n"
    )
}

async fn setup(limits: &str) -> (Bridge, Simulator) {
    let vb = start_sim(Provider::Voipbin).await;
    let cfg = config_with_admin(
        &[
            upstream_block("vb", &vb, FAST),
            consumers(),
            format!("[limits]\n{limits}"),
        ],
        ADMIN,
    );
    let (bridge, _rx) = start_bridge(&cfg).await;
    wait_sim_ready(&vb, 1).await;
    (bridge, vb)
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

/// Connects, reads `ready`, subscribes `id` to durable `name` with `extra` members; the
/// `subscribed` (or `error`) answer.
async fn subscribe(
    bridge: &Bridge,
    token: &str,
    id: &str,
    name: &str,
    extra: Value,
) -> (Ws, Value) {
    let mut ws = connect(bridge, token).await;
    assert_eq!(recv(&mut ws).await["op"], "ready");
    let mut op = json!({"op": "subscribe", "id": id, "durable": name});
    if let (Some(o), Some(e)) = (op.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    send(&mut ws, op).await;
    let answer = recv(&mut ws).await;
    (ws, answer)
}

/// One event frame: (seq, delivery, the call number `data.n`... here the call id).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Got {
    seq: u64,
    delivery: u64,
}

async fn next_event(ws: &mut Ws) -> Got {
    let f = recv(ws).await;
    assert_eq!(f["op"], "event", "unexpected frame {f}");
    Got {
        seq: f["seq"].as_u64().expect("seq"),
        delivery: f["delivery"].as_u64().expect("delivery"),
    }
}

async fn events(ws: &mut Ws, n: usize) -> Vec<Got> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        out.push(next_event(ws).await);
    }
    out
}

/// Nothing more arrives for a while (used only after everything expected has arrived, to
/// show there is no extra redelivery; the wait is a bound, not a synchronisation).
async fn quiet(ws: &mut Ws, for_: Duration) {
    use futures_util::StreamExt;
    match tokio::time::timeout(for_, ws.next()).await {
        Err(_) => {}
        Ok(Some(Ok(Message::Text(t)))) => panic!("expected nothing, got {t}"),
        Ok(other) => panic!("expected nothing, got {other:?}"),
    }
}

async fn emit(vb: &Simulator, from: usize, to: usize) {
    for i in from..to {
        assert_eq!(vb.emit(numbered_call(i)).await, 1);
    }
}

/// An admin API call with a JSON body; the status and the JSON answer.
async fn admin(
    bridge: &Bridge,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = http_client()
        .request(method, format!("http://{}{path}", bridge.local_addr()))
        .bearer_auth(ADMIN);
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let r = req.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Waits until the (first) durable the admin API lists satisfies `pred`.
async fn wait_durable(bridge: &Bridge, what: &str, pred: impl Fn(&Value) -> bool) {
    eventually(what, DEADLINE, || async {
        match durables(bridge).await.first() {
            Some(d) if pred(d) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

async fn durables(bridge: &Bridge) -> Vec<Value> {
    let (_, v) = admin(bridge, reqwest::Method::GET, "/v1/admin/durables", None).await;
    v["durables"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_events_stay_acked_and_only_the_unacked_come_back_with_delivery_2() {
    let (bridge, vb) = setup("").await;
    let (mut ws, sub) = subscribe(&bridge, TOKEN, "s1", "billing", json!({})).await;
    assert_eq!(sub["op"], "subscribed", "{sub}");
    assert_eq!(sub["durable"], "billing");
    assert_eq!(sub["pending"], 0);
    emit(&vb, 0, 6).await;
    let got = events(&mut ws, 6).await;
    assert!(got.iter().all(|g| g.delivery == 1), "{got:?}");
    let seqs: Vec<u64> = got.iter().map(|g| g.seq).collect();
    // Ack the 1st, 2nd and 4th by list, nothing else.
    send(
        &mut ws,
        json!({"op": "ack", "id": "s1", "seqs": [seqs[0], seqs[1], seqs[3]]}),
    )
    .await;
    wait_durable(&bridge, "the floor moves past the acked prefix", |d| {
        d["acked"] == seqs[1] && d["pending"] == 3
    })
    .await;
    drop(ws);

    let (mut ws, sub) = subscribe(&bridge, TOKEN, "again", "billing", json!({})).await;
    assert_eq!(sub["acked"], seqs[1], "{sub}");
    assert_eq!(sub["pending"], 3, "{sub}");
    let again = events(&mut ws, 3).await;
    assert_eq!(
        again,
        vec![
            Got {
                seq: seqs[2],
                delivery: 2
            },
            Got {
                seq: seqs[4],
                delivery: 2
            },
            Got {
                seq: seqs[5],
                delivery: 2
            },
        ]
    );
    emit(&vb, 6, 7).await;
    let new = next_event(&mut ws).await;
    assert_eq!(new.delivery, 1);
    send(
        &mut ws,
        json!({"op": "ack", "id": "again", "upto": new.seq}),
    )
    .await;
    wait_durable(&bridge, "everything acked", |d| {
        d["acked"] == new.seq && d["pending"] == 0 && d["lag"] == 0
    })
    .await;
    let metrics = metrics_text(&bridge).await;
    assert!(
        metrics.contains("wsbridge_durable_lag{consumer=\"worker\",durable=\"billing\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("wsbridge_durable_redeliveries_total{"),
        "{metrics}"
    );
    let status: Value = serde_json::from_str(&get_text(&bridge, "/v1/status").await).expect("JSON");
    assert_eq!(status["durables"][0]["name"], "billing", "{status}");
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_on_one_durable_share_its_events_and_a_closed_ones_go_to_the_other() {
    let (bridge, vb) = setup("").await;
    let opts = json!({"max_unacked": 4, "from": "latest"});
    let (mut a, sub) = subscribe(&bridge, TOKEN, "a", "crm", opts.clone()).await;
    assert_eq!(sub["op"], "subscribed", "{sub}");
    let (mut b, sub) = subscribe(&bridge, TOKEN, "b", "crm", opts).await;
    assert_eq!(sub["op"], "subscribed", "{sub}");
    const N: usize = 40;
    let emitter = {
        let vb = vb.clone();
        tokio::spawn(async move { emit(&vb, 0, N).await })
    };
    // Each connection acks what it gets; together they see every event once.
    let mut seen_a = Vec::new();
    let mut seen_b = Vec::new();
    while seen_a.len() + seen_b.len() < N {
        tokio::select! {
            f = next_event(&mut a) => {
                send(&mut a, json!({"op": "ack", "id": "a", "seqs": [f.seq]})).await;
                seen_a.push(f);
            }
            f = next_event(&mut b) => {
                send(&mut b, json!({"op": "ack", "id": "b", "seqs": [f.seq]})).await;
                seen_b.push(f);
            }
        }
    }
    emitter.await.expect("emitter");
    assert!(
        !seen_a.is_empty() && !seen_b.is_empty(),
        "both worked: {} / {}",
        seen_a.len(),
        seen_b.len()
    );
    let all: BTreeSet<u64> = seen_a.iter().chain(&seen_b).map(|g| g.seq).collect();
    assert_eq!(all.len(), N, "each event to one of them, none twice");
    assert!(seen_a.iter().chain(&seen_b).all(|g| g.delivery == 1));

    // A holds two events unacked and closes: B gets them at once (delivery 2), without
    // waiting for ack_wait (30 s by default).
    emit(&vb, N, N + 4).await;
    let mut held_by_a = Vec::new();
    let mut got_b = Vec::new();
    while held_by_a.len() + got_b.len() < 4 {
        tokio::select! {
            f = next_event(&mut a) => held_by_a.push(f.seq),
            f = next_event(&mut b) => {
                send(&mut b, json!({"op": "ack", "id": "b", "seqs": [f.seq]})).await;
                got_b.push(f.seq);
            }
        }
    }
    assert!(!held_by_a.is_empty());
    drop(a);
    let redelivered = events(&mut b, held_by_a.len()).await;
    assert_eq!(
        redelivered.iter().map(|g| g.seq).collect::<Vec<_>>(),
        held_by_a
    );
    assert!(
        redelivered.iter().all(|g| g.delivery == 2),
        "{redelivered:?}"
    );
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_events_come_back_after_ack_wait_then_go_to_dead_letters_and_replay() {
    let (bridge, vb) = setup("").await;
    let (mut ws, sub) = subscribe(
        &bridge,
        TOKEN,
        "s",
        "slow-job",
        json!({"ack_wait": "300ms", "max_deliver": 2}),
    )
    .await;
    assert_eq!(sub["op"], "subscribed", "{sub}");
    emit(&vb, 0, 1).await;
    let first = next_event(&mut ws).await;
    assert_eq!(first.delivery, 1);
    let second = next_event(&mut ws).await;
    assert_eq!(
        second,
        Got {
            seq: first.seq,
            delivery: 2
        },
        "sent again after ack_wait"
    );
    wait_durable(&bridge, "dead-lettered after max_deliver", |d| {
        d["dead"] == 1
    })
    .await;
    let (_, dead) = admin(
        &bridge,
        reqwest::Method::GET,
        "/v1/admin/durables/worker/slow-job/dead-letters",
        None,
    )
    .await;
    assert_eq!(dead["dead_letters"][0]["seq"], first.seq, "{dead}");
    assert_eq!(dead["dead_letters"][0]["deliveries"], 2, "{dead}");

    let (status, _) = admin(
        &bridge,
        reqwest::Method::POST,
        "/v1/admin/durables/worker/slow-job/replay",
        Some(json!({"dead": true})),
    )
    .await;
    assert_eq!(status, 200);
    let again = next_event(&mut ws).await;
    assert_eq!(
        again,
        Got {
            seq: first.seq,
            delivery: 1
        },
        "replayed from delivery 1"
    );
    send(
        &mut ws,
        json!({"op": "ack", "id": "s", "seqs": [first.seq]}),
    )
    .await;
    wait_durable(&bridge, "acked and no dead letter left", |d| {
        d["dead"] == 0 && d["pending"] == 0
    })
    .await;
    // Unknown durables are 404 on every route.
    for (method, path) in [
        (
            reqwest::Method::GET,
            "/v1/admin/durables/worker/nope/dead-letters",
        ),
        (
            reqwest::Method::POST,
            "/v1/admin/durables/worker/nope/replay",
        ),
        (reqwest::Method::DELETE, "/v1/admin/durables/worker/nope"),
    ] {
        let (status, _) = admin(&bridge, method, path, Some(json!({"dead": true}))).await;
        assert_eq!(status, 404, "{path}");
    }
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nak_redelivers_after_its_delay_and_bad_ops_get_clear_errors() {
    let (bridge, vb) = setup("max_durables = 2\n").await;
    let (mut ws, sub) = subscribe(
        &bridge,
        TOKEN,
        "s",
        "naks",
        json!({"filter": {"types": ["voipbin.call.*"]}}),
    )
    .await;
    assert_eq!(sub["op"], "subscribed", "{sub}");
    emit(&vb, 0, 1).await;
    let first = next_event(&mut ws).await;
    send(
        &mut ws,
        json!({"op": "nak", "id": "s", "seq": first.seq, "delay": "200ms"}),
    )
    .await;
    assert_eq!(
        next_event(&mut ws).await,
        Got {
            seq: first.seq,
            delivery: 2
        }
    );
    // A nak of a seq this connection does not hold.
    send(
        &mut ws,
        json!({"op": "nak", "id": "s", "seq": first.seq + 100}),
    )
    .await;
    let e = recv(&mut ws).await;
    assert_eq!(e["code"], "not_acked", "{e}");
    // Acks of unknown or repeated seqs are ignored (counted), never answered with errors.
    send(
        &mut ws,
        json!({"op": "ack", "id": "s", "seqs": [first.seq, first.seq, 99_999]}),
    )
    .await;
    send(&mut ws, json!({"op": "ping"})).await;
    assert_eq!(
        recv(&mut ws).await["op"],
        "pong",
        "no error frames for ignored acks"
    );
    // An ack naming a plain subscription, or no subscription.
    send(&mut ws, json!({"op": "subscribe", "id": "plain"})).await;
    assert_eq!(recv(&mut ws).await["op"], "subscribed");
    send(&mut ws, json!({"op": "ack", "id": "plain", "seqs": [1]})).await;
    assert_eq!(recv(&mut ws).await["code"], "unknown_durable");
    send(&mut ws, json!({"op": "ack", "id": "nobody", "seqs": [1]})).await;
    assert_eq!(recv(&mut ws).await["code"], "unknown_subscription");
    send(&mut ws, json!({"op": "ack", "id": "s"})).await;
    assert_eq!(recv(&mut ws).await["code"], "bad_request");
    // The same durable with another filter, or another ack_wait.
    send(
        &mut ws,
        json!({"op": "subscribe", "id": "m", "durable": "naks", "filter": {"types": ["x"]}}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["code"], "durable_mismatch");
    send(&mut ws, json!({"op": "subscribe", "id": "m", "durable": "naks", "filter": {"types": ["voipbin.call.*"]}, "ack_wait": "5s"})).await;
    assert_eq!(recv(&mut ws).await["code"], "durable_mismatch");
    // Names are checked; limits hold.
    for bad in ["", "has space", "ünï", &"x".repeat(65)] {
        send(
            &mut ws,
            json!({"op": "subscribe", "id": "n", "durable": bad}),
        )
        .await;
        assert_eq!(recv(&mut ws).await["code"], "bad_request", "{bad:?}");
    }
    send(
        &mut ws,
        json!({"op": "subscribe", "id": "u", "durable": "big", "max_unacked": 10_000_000}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["code"], "bad_request");
    send(
        &mut ws,
        json!({"op": "subscribe", "id": "d2", "durable": "second"}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["op"], "subscribed");
    send(
        &mut ws,
        json!({"op": "subscribe", "id": "d3", "durable": "third"}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["code"], "too_many_durables");
    // Another consumer's durable of the same name is its own.
    let (_other, sub) = subscribe(&bridge, OTHER_TOKEN, "o", "naks", json!({})).await;
    assert_eq!(sub["op"], "subscribed", "{sub}");
    assert_eq!(durables(&bridge).await.len(), 3);
    let metrics = metrics_text(&bridge).await;
    assert!(
        metrics.contains("wsbridge_durable_acks_ignored_total 2"),
        "{metrics}"
    );
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seek_sends_from_the_new_position_and_delete_ends_the_subscription() {
    let (bridge, vb) = setup("").await;
    let (mut ws, sub) = subscribe(&bridge, TOKEN, "s", "seeker", json!({"from": "latest"})).await;
    assert_eq!(sub["op"], "subscribed", "{sub}");
    emit(&vb, 0, 5).await;
    let got = events(&mut ws, 5).await;
    let last = got.last().expect("events").seq;
    send(&mut ws, json!({"op": "ack", "id": "s", "upto": last})).await;
    wait_durable(&bridge, "all acked", |d| d["acked"] == last).await;
    let (status, _) = admin(
        &bridge,
        reqwest::Method::POST,
        "/v1/admin/durables/worker/seeker/seek",
        Some(json!({"seq": got[2].seq})),
    )
    .await;
    assert_eq!(status, 200);
    let again = events(&mut ws, 3).await;
    assert_eq!(
        again.iter().map(|g| g.seq).collect::<Vec<_>>(),
        got[2..].iter().map(|g| g.seq).collect::<Vec<_>>()
    );
    // Beyond the head: from the next new event (the answer says where).
    let (status, moved) = admin(
        &bridge,
        reqwest::Method::POST,
        "/v1/admin/durables/worker/seeker/seek",
        Some(json!({"seq": 1_000_000})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(moved["seq"], last + 1, "{moved}");
    // By time: from the start of the journal.
    let (status, _) = admin(
        &bridge,
        reqwest::Method::POST,
        "/v1/admin/durables/worker/seeker/seek",
        Some(json!({"time": "2000-01-01T00:00:00Z"})),
    )
    .await;
    assert_eq!(status, 200);
    let from_start = events(&mut ws, 5).await;
    assert_eq!(from_start[0].seq, got[0].seq);

    let (status, _) = admin(
        &bridge,
        reqwest::Method::DELETE,
        "/v1/admin/durables/worker/seeker",
        None,
    )
    .await;
    assert_eq!(status, 200);
    let e = recv(&mut ws).await;
    assert_eq!(e["code"], "unknown_durable", "{e}");
    assert!(durables(&bridge).await.is_empty());
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_durable_is_deleted_after_durable_ttl() {
    let (bridge, _vb) = setup("durable_ttl = \"1s\"\n").await;
    let (ws, sub) = subscribe(&bridge, TOKEN, "s", "short-lived", json!({})).await;
    assert_eq!(sub["op"], "subscribed", "{sub}");
    assert_eq!(durables(&bridge).await.len(), 1);
    drop(ws);
    eventually("the idle durable expires", DEADLINE, || async {
        let list = durables(&bridge).await;
        if list.is_empty() {
            Ok(())
        } else {
            Err(format!("{list:?}"))
        }
    })
    .await;
    let metrics = metrics_text(&bridge).await;
    assert!(
        metrics.contains("wsbridge_durables_expired_total 1"),
        "{metrics}"
    );
    bridge.shutdown().await;
}

/// The durable's saved floor, read from the database file.
fn saved_floor(db: &std::path::Path) -> Option<u64> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()?;
    let state: Vec<u8> = conn
        .query_row("SELECT state FROM durables WHERE name = 'crash'", [], |r| {
            r.get(0)
        })
        .ok()?;
    let v: Value = serde_json::from_slice(&state).ok()?;
    v["checkpoint"]["floor"].as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sigkill_the_unacked_events_are_redelivered_and_the_acked_are_not() {
    let vb = start_sim(Provider::Voipbin).await;
    let dir = temp_dir("durable-crash");
    let addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
        probe.local_addr().expect("addr")
    };
    let db = dir.join("wsbridge.db");
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"{addr}\"\n[storage]\npath = {db:?}\n\n{}\n{}",
            upstream_block("vb", &vb, FAST),
            consumers()
        ),
    )
    .expect("config");
    let spawn = || {
        Process(
            Process::serve_command(&config, "warn")
                .stderr(Stdio::inherit())
                .spawn()
                .expect("bridge starts"),
        )
    };
    let connect_to = |addr: std::net::SocketAddr| async move {
        let url = format!("ws://{addr}/v1/ws?token={TOKEN}");
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            match tokio_tungstenite::connect_async(url.as_str()).await {
                Ok((ws, _)) => return ws,
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("bridge never listened: {e}"),
            }
        }
    };
    let mut bridge = spawn();
    wait_sim_ready(&vb, 1).await;
    let mut ws = connect_to(addr).await;
    assert_eq!(recv(&mut ws).await["op"], "ready");
    send(
        &mut ws,
        json!({"op": "subscribe", "id": "c", "durable": "crash"}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["op"], "subscribed");
    emit(&vb, 0, 10).await;
    let got = events(&mut ws, 10).await;
    send(&mut ws, json!({"op": "ack", "id": "c", "upto": got[4].seq})).await;
    // Acks are saved with the next store commit; wait until the file shows it, then kill.
    eventually("the acks are saved", DEADLINE, || async {
        match saved_floor(&db) {
            Some(f) if f >= got[4].seq => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    bridge.0.kill().expect("SIGKILL");
    let _ = bridge.0.wait();
    drop(ws);

    let restarted = spawn();
    let mut ws = connect_to(addr).await;
    assert_eq!(recv(&mut ws).await["op"], "ready");
    send(
        &mut ws,
        json!({"op": "subscribe", "id": "c", "durable": "crash"}),
    )
    .await;
    let sub = recv(&mut ws).await;
    assert_eq!(sub["acked"], got[4].seq, "{sub}");
    let again = events(&mut ws, 5).await;
    assert_eq!(
        again.iter().map(|g| g.seq).collect::<Vec<_>>(),
        got[5..].iter().map(|g| g.seq).collect::<Vec<_>>(),
        "exactly the unacked, in order"
    );
    assert!(again.iter().all(|g| g.delivery == 2), "{again:?}");
    quiet(&mut ws, Duration::from_millis(300)).await;
    drop(restarted);
}
