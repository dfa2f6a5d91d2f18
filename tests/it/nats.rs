//! Scale-out on NATS JetStream, against real NATS: several bridge instances on one stream,
//! nothing lost or doubled. Each test has its own prefix (streams, consumers, buckets), so
//! runs never collide on the shared server at 127.0.0.1:4222; tests that stop NATS start
//! servers of their own on loopback ports.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::common::nats::*;
use crate::common::receiver::{Answer, Receiver};
use crate::common::ws::{connect, recv, sse_events, Ws};
use crate::common::*;
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use wsbridge::bridge::Bridge;
use wsbridge::storage::Store;
use wsbridge_adapters::sim::Simulator;
use wsbridge_adapters::{voipbin, Provider};

const TOKEN: &str = "token-all";
/// Generous: every wait in these tests ends as soon as its condition holds.
const LONG: Duration = Duration::from_secs(30);
/// After a NATS node dies: a new stream leader is elected and the dead node's readers are
/// replaced, which on a loaded 2-core machine can take a while.
const ELECTION: Duration = Duration::from_secs(60);

fn consumer_block() -> String {
    format!("[[consumers]]\nname = \"all\"\ntoken = \"{TOKEN}\"\n")
}

fn route_block(to: &str) -> String {
    format!("[[routes]]\nname = \"r-{to}\"\nproviders = [\"voipbin\"]\nto = [\"{to}\"]\n")
}

async fn emit_range(sim: &Simulator, range: std::ops::Range<usize>) {
    for i in range {
        sim.emit(numbered_call(i)).await;
    }
}

/// Webhook requests per `webhook-id`.
fn per_id(requests: &[crate::common::receiver::Received]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in requests {
        *m.entry(r.header("webhook-id").to_string()).or_default() += 1;
    }
    m
}

async fn subscribe(ws: &mut Ws, from: Value) -> Value {
    subscribe_op(
        ws,
        json!({"op": "subscribe", "id": "s", "filter": {}, "from": from}),
    )
    .await
    .0
}

/// Reads `ready`, sends the subscribe `op`; `ready` and the `subscribed` answer.
async fn subscribe_op(ws: &mut Ws, op: Value) -> (Value, Value) {
    let ready = recv(ws).await;
    assert_eq!(ready["op"], "ready", "{ready}");
    ws.send(Message::text(op.to_string())).await.expect("send");
    let answer = recv(ws).await;
    assert_eq!(answer["op"], "subscribed", "{answer}");
    (ready, answer)
}

/// Reads `n` event frames: (seq, event id).
async fn events(ws: &mut Ws, n: usize) -> Vec<(u64, String)> {
    event_frames(ws, n, |f| {
        assert_eq!(f["seq"], f["event"]["seq"], "frame seq is the envelope seq");
        (
            f["seq"].as_u64().expect("seq"),
            f["event"]["id"].as_str().expect("id").to_string(),
        )
    })
    .await
}

/// Reads `n` event frames, each through `take`.
async fn event_frames<T>(ws: &mut Ws, n: usize, take: impl Fn(&Value) -> T) -> Vec<T> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let f = recv(ws).await;
        assert_eq!(f["op"], "event", "unexpected frame {f}");
        out.push(take(&f));
    }
    out
}

/// Two bridge instances on the shared NATS server with one prefix, both connected to one
/// VoIPBIN simulator (`ownership = "all"`), routing everything to a webhook `crm` at `rx`
/// (with `webhook_extra`). Returns the prefix, the simulator and the two bridges.
async fn two_instances(
    tag: &str,
    rx: &Receiver,
    webhook_extra: &str,
) -> (String, Simulator, Bridge, Bridge) {
    let prefix = unique_prefix(tag);
    let vb = start_sim(Provider::Voipbin).await;
    let blocks = [
        upstream_block("vb", &vb, &format!("{FAST}ownership = \"all\"\n")),
        webhook_block("crm", &rx.url(), webhook_extra),
        route_block("crm"),
        consumer_block(),
    ];
    let urls = [SHARED_NATS.to_string()];
    let cfg = nats_config(&blocks, &urls, &prefix, "");
    let (a, _) = start_bridge(&cfg).await;
    let (b, _) = start_bridge(&cfg).await;
    wait_sim_ready(&vb, 2).await;
    (prefix, vb, a, b)
}

/// Two instances, both connected to the same upstream (`ownership = "all"`): each event is
/// journalled once and delivered once, as with one instance; a consumer on either instance
/// sees every event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_upstream_journal_and_deliver_each_event_once() {
    let rx = Receiver::start(Vec::new(), Answer::status(200)).await;
    let (prefix, vb, a, b) = two_instances("dedup", &rx, "").await;
    let mut on_b = connect(&b, TOKEN).await;
    subscribe(&mut on_b, json!("latest")).await;

    const N: usize = 200;
    emit_range(&vb, 0..N).await;
    let seen = events(&mut on_b, N).await;
    let ids: BTreeSet<&String> = seen.iter().map(|(_, id)| id).collect();
    assert_eq!(ids.len(), N, "instance B's consumer saw every event once");
    rx.wait_until(LONG, "every event delivered", |r| per_id(r).len() == N)
        .await;
    // Shutdown drains what is in flight, so the count after it is final.
    a.shutdown().await;
    let pos = b.store().position().await.expect("position");
    let journal = b.store().read_from(1, 10 * N).await.expect("read");
    b.shutdown().await;

    let counts = per_id(&rx.requests());
    assert_eq!(counts.len(), N);
    let doubled: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(doubled.is_empty(), "delivered more than once: {doubled:?}");
    assert_eq!(pos.head, N as u64, "the stream holds each event once");
    let journal_ids: BTreeSet<String> = journal.iter().map(|e| e.id.clone()).collect();
    assert_eq!(journal.len(), N);
    assert_eq!(journal_ids.len(), N);
    cleanup(SHARED_NATS, &prefix).await;
}

/// A consumer reads half the events on instance A, then resumes on instance B from its last
/// seq + 1 while events keep coming: no gap, no duplicate; SSE resumes likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_resumes_on_another_instance_without_gap() {
    let prefix = unique_prefix("resume");
    let vb = start_sim(Provider::Voipbin).await;
    let blocks = [upstream_block("vb", &vb, FAST), consumer_block()];
    let urls = [SHARED_NATS.to_string()];
    let cfg = nats_config(&blocks, &urls, &prefix, "");
    let (a, _) = start_bridge(&cfg).await;
    let (b, _) = start_bridge(&cfg).await;
    wait_sim_ready(&vb, 2).await;

    let mut on_a = connect(&a, TOKEN).await;
    let ready_a = subscribe(&mut on_a, json!("earliest")).await;
    emit_range(&vb, 0..100).await;
    let first = events(&mut on_a, 60).await;
    drop(on_a);
    let last = first.last().expect("events").0;

    emit_range(&vb, 100..150).await;
    let mut on_b = connect(&b, TOKEN).await;
    let ready_b = subscribe(&mut on_b, json!(last + 1)).await;
    assert_eq!(ready_a["epoch"], ready_b["epoch"], "one stream, one epoch");
    let rest = events(&mut on_b, 90).await;

    let seqs: Vec<u64> = first.iter().chain(&rest).map(|(s, _)| *s).collect();
    let expected: Vec<u64> = (1..=150).collect();
    assert_eq!(seqs, expected, "contiguous seqs across instances");
    let ids: BTreeSet<&String> = first.iter().chain(&rest).map(|(_, id)| id).collect();
    assert_eq!(ids.len(), 150, "no duplicate event");

    // SSE likewise: resume on instance A after the same cursor.
    let sse = sse_events(&a, TOKEN, "providers=voipbin", Some(last), 90).await;
    let sse_seqs: Vec<u64> = sse.iter().map(|(id, _)| *id).collect();
    assert_eq!(sse_seqs, (last + 1..=150).collect::<Vec<u64>>());
    let ws_ids: Vec<&String> = rest.iter().map(|(_, id)| id).collect();
    let sse_ids: Vec<&str> = sse
        .iter()
        .map(|(_, e)| e["id"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        ws_ids, sse_ids,
        "SSE on A and /v1/ws on B carry the same events"
    );

    a.shutdown().await;
    b.shutdown().await;
    cleanup(SHARED_NATS, &prefix).await;
}

/// Subscribes durable `name` from `earliest`; the `subscribed` answer.
async fn subscribe_durable(ws: &mut Ws, name: &str) -> Value {
    subscribe_op(
        ws,
        json!({"op": "subscribe", "id": "d", "durable": name, "from": "earliest"}),
    )
    .await
    .1
}

/// `n` durable event frames as (seq, delivery).
async fn durable_events(ws: &mut Ws, n: usize) -> Vec<(u64, u64)> {
    event_frames(ws, n, |f| {
        (
            f["seq"].as_u64().expect("seq"),
            f["delivery"].as_u64().expect("delivery"),
        )
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_consumed_on_one_instance_continues_on_another() {
    let prefix = unique_prefix("durable");
    let vb = start_sim(Provider::Voipbin).await;
    let blocks = [upstream_block("vb", &vb, FAST), consumer_block()];
    let urls = [SHARED_NATS.to_string()];
    let cfg = nats_config(&blocks, &urls, &prefix, "");
    let (a, _) = start_bridge(&cfg).await;
    let (b, _) = start_bridge(&cfg).await;
    wait_sim_ready(&vb, 2).await;

    let mut on_a = connect(&a, TOKEN).await;
    let sub = subscribe_durable(&mut on_a, "billing").await;
    assert_eq!(sub["acked"], 0, "{sub}");
    // While A serves it, B refuses it (one instance at a time, by the durable's lease).
    let mut early = connect(&b, TOKEN).await;
    recv(&mut early).await;
    early
        .send(Message::text(
            json!({"op": "subscribe", "id": "d", "durable": "billing"}).to_string(),
        ))
        .await
        .expect("send");
    let refused = recv(&mut early).await;
    assert_eq!(refused["code"], "unavailable", "{refused}");
    drop(early);
    emit_range(&vb, 0..20).await;
    let first = durable_events(&mut on_a, 20).await;
    assert!(first.iter().all(|(_, d)| *d == 1), "{first:?}");
    // Ack the first 12 (and one more above the gap), then leave instance A.
    on_a.send(Message::text(
        json!({"op": "ack", "id": "d", "upto": first[11].0}).to_string(),
    ))
    .await
    .expect("ack");
    on_a.send(Message::text(
        json!({"op": "ack", "id": "d", "seqs": [first[15].0]}).to_string(),
    ))
    .await
    .expect("ack");
    // The acks reach the store with A's next save; wait until A shows them, then close.
    eventually("A saved the acks", DEADLINE, || async {
        let v = admin(&a, "GET", "durables", None).await;
        match v["durables"][0]["acked"].as_u64() {
            Some(f) if f == first[11].0 => Ok(()),
            other => Err(format!("{other:?} in {v}")),
        }
    })
    .await;
    drop(on_a);
    // A's pump saves once more when the connection is gone; B reads the store when its
    // connection subscribes.
    eventually("the durable is idle on A", DEADLINE, || async {
        let v = admin(&a, "GET", "durables", None).await;
        match v["durables"][0]["connections"].as_u64() {
            Some(0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // A gives the lease up once its state is saved; B takes it over (a subscribe may come
    // a moment early and be refused: try again).
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let (mut on_b, sub) = loop {
        let mut ws = connect(&b, TOKEN).await;
        recv(&mut ws).await;
        ws.send(Message::text(
            json!({"op": "subscribe", "id": "d", "durable": "billing", "from": "earliest"})
                .to_string(),
        ))
        .await
        .expect("send");
        let answer = recv(&mut ws).await;
        if answer["op"] == "subscribed" {
            break (ws, answer);
        }
        assert_eq!(answer["code"], "unavailable", "{answer}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "B never got the durable"
        );
    };
    assert_eq!(sub["acked"], first[11].0, "{sub}");
    let expected: Vec<(u64, u64)> = first[12..]
        .iter()
        .filter(|(s, _)| *s != first[15].0)
        .map(|(s, _)| (*s, 2))
        .collect();
    let again = durable_events(&mut on_b, expected.len()).await;
    assert_eq!(
        again, expected,
        "exactly the unacked, as redeliveries, on B"
    );
    emit_range(&vb, 20..22).await;
    let new = durable_events(&mut on_b, 2).await;
    assert!(new.iter().all(|(_, d)| *d == 1), "{new:?}");
    // B's admin view lists it with its connection.
    let v = admin(&b, "GET", "durables", None).await;
    assert_eq!(v["durables"][0]["connections"], 1, "{v}");

    a.shutdown().await;
    b.shutdown().await;
    cleanup(SHARED_NATS, &prefix).await;
}

async fn admin(bridge: &Bridge, method: &str, path: &str, body: Option<Value>) -> Value {
    let url = format!("http://{}/v1/admin/{path}", bridge.local_addr());
    let client = http_client();
    let req = match method {
        "POST" => client
            .post(url)
            .header("content-type", "application/json")
            .body(body.unwrap_or(json!({})).to_string()),
        _ => client.get(url),
    };
    let resp = req
        .bearer_auth("admin-token")
        .send()
        .await
        .expect("admin request");
    assert!(
        resp.status().is_success(),
        "admin {path}: {}",
        resp.status()
    );
    serde_json::from_slice(&resp.bytes().await.expect("admin body")).expect("admin JSON")
}

/// Polls the admin API until `pred` holds for the answer to GET `path`.
async fn admin_until(
    bridge: &Bridge,
    path: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    eventually(what, LONG, || async {
        let v = admin(bridge, "GET", path, None).await;
        if pred(&v) {
            Ok(v)
        } else {
            Err(v)
        }
    })
    .await
}

fn crm(v: &Value) -> Value {
    v["webhooks"]
        .as_array()
        .and_then(|l| l.iter().find(|w| w["name"] == "crm"))
        .cloned()
        .unwrap_or(Value::Null)
}

/// Failed deliveries run through the retry schedule on either instance, are dead-lettered
/// once, listed by the admin API of any instance, and replayed from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_shared_listed_and_replayed_by_any_instance() {
    // 3 events x 3 attempts fail, then everything succeeds.
    let rx = Receiver::start(vec![Answer::status(500); 9], Answer::status(200)).await;
    let (prefix, vb, a, b) = two_instances("dlq", &rx, "retry = [\"50ms\", \"50ms\"]\n").await;
    emit_range(&vb, 0..3).await;

    let dead = admin_until(
        &b,
        "webhooks/crm/deliveries?state=dead",
        "3 dead letters",
        |v| v["deliveries"].as_array().is_some_and(|l| l.len() == 3),
    )
    .await;
    let first = &dead["deliveries"][0];
    assert!(first["seq"].as_u64().is_some_and(|s| s >= 1), "{first}");
    assert_eq!(
        rx.requests().len(),
        9,
        "each event tried once per schedule step"
    );
    let view = crm(&admin(&a, "GET", "webhooks", None).await);
    assert_eq!(view["dead"], 3, "{view}");

    let queued = admin(
        &a,
        "POST",
        "webhooks/crm/replay",
        Some(json!({"dead": true})),
    )
    .await;
    assert_eq!(queued["queued"], 3);
    let got = rx
        .wait_until(LONG, "replayed deliveries", |r| {
            r.iter().filter(|x| x.answered == 200).count() >= 3
        })
        .await;
    let ok: BTreeSet<&str> = got
        .iter()
        .filter(|x| x.answered == 200)
        .map(|x| x.header("webhook-id"))
        .collect();
    assert_eq!(ok.len(), 3, "each dead letter delivered on replay");
    admin_until(
        &b,
        "webhooks/crm/deliveries?state=dead",
        "empty dead-letter list",
        |v| v["deliveries"].as_array().is_some_and(|l| l.is_empty()),
    )
    .await;

    // A journal range replays whatever happened before.
    let queued = admin(
        &b,
        "POST",
        "webhooks/crm/replay",
        Some(json!({"from_seq": 1, "to_seq": 2})),
    )
    .await;
    assert_eq!(queued["queued"], 2);
    rx.wait_until(LONG, "range replay", |r| {
        r.iter().filter(|x| x.answered == 200).count() >= 5
    })
    .await;
    a.shutdown().await;
    b.shutdown().await;
    cleanup(SHARED_NATS, &prefix).await;
}

/// A 410 seen by one instance disables the endpoint on every instance; `enable` on any
/// instance resumes delivery everywhere, and nothing routed meanwhile is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_disables_every_instance_and_enable_on_any_resumes() {
    let rx = Receiver::start(vec![Answer::status(410)], Answer::status(200)).await;
    let (prefix, vb, a, b) = two_instances("gone", &rx, "").await;
    emit_range(&vb, 0..1).await;
    rx.wait_for(1, LONG).await;
    for bridge in [&a, &b] {
        admin_until(
            bridge,
            "webhooks",
            "endpoint disabled on every instance",
            |v| crm(v)["enabled"] == false,
        )
        .await;
    }
    emit_range(&vb, 1..4).await;
    let mut on_a = connect(&a, TOKEN).await;
    subscribe(&mut on_a, json!("earliest")).await;
    events(&mut on_a, 4).await; // journalled while disabled
    assert_eq!(rx.requests().len(), 1, "nothing sent while disabled");

    admin(&b, "POST", "webhooks/crm/enable", None).await;
    let got = rx
        .wait_until(LONG, "deliveries after enable", |r| {
            per_id(&r[1..]).len() == 4
        })
        .await;
    assert!(got[1..].iter().all(|r| r.answered == 200));
    admin_until(
        &a,
        "webhooks",
        "endpoint enabled on the other instance",
        |v| crm(v)["enabled"] == true,
    )
    .await;
    a.shutdown().await;
    b.shutdown().await;
    cleanup(SHARED_NATS, &prefix).await;
}

/// `ownership = "lease"` (VoicePact's default): two bridge processes, one holds the upstream.
/// The holder is SIGKILLed under load; the other takes over within about the lease TTL and
/// events keep flowing. Frames the provider pushes while nobody is connected are lost (the
/// provider does not buffer); the test reports how many. It asserts the takeover bound, that
/// every frame reaching the survivor is journalled, and that none is journalled twice. The
/// reported count of frames that reached the killed holder but are not journalled is not
/// asserted to be 0: a SIGKILL loses what the process had read and not yet published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_holder_killed_under_load_the_other_instance_takes_over() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let prefix = unique_prefix("lease");
    let vp = start_sim(Provider::VoicePact).await;
    let dir = temp_dir("lease");
    let urls = [SHARED_NATS.to_string()];
    let ttl = Duration::from_secs(2);
    let blocks = [upstream_block("vp", &vp, FAST), consumer_block()];
    let extra = "lease_ttl = \"2s\"\n";
    let addrs = [free_addr(), free_addr()];
    let mut procs: Vec<BridgeProcess> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| {
            BridgeProcess::spawn(
                &dir,
                &format!("b{i}"),
                *a,
                &nats_config_on(*a, &blocks, &urls, &prefix, extra),
            )
        })
        .collect();
    let holder = eventually("one holder and one standby", LONG, || async {
        let s0 = procs[0].upstream_state("vp").await?;
        let s1 = procs[1].upstream_state("vp").await?;
        match (s0.as_str(), s1.as_str()) {
            ("subscribed", "standby") => Some(0),
            ("standby", "subscribed") => Some(1),
            _ => None,
        }
    })
    .await;
    let survivor = 1 - holder;
    wait_sim_ready(&vp, 1).await;

    // Load: a numbered payment_update every few ms; remember which reached a connection.
    let sent: Arc<Mutex<Vec<bool>>> = Arc::default();
    let running = Arc::new(AtomicBool::new(true));
    let emitter = {
        let (vp, sent, running) = (vp.clone(), sent.clone(), running.clone());
        tokio::spawn(async move {
            let mut i = 0usize;
            while running.load(Ordering::Relaxed) {
                // payment_update is broadcast to every connection (contract_update only to
                // the contract's parties).
                let frame = wsbridge_adapters::voicepact::wire::payment_update(
                    &format!("k{i}"),
                    "paid",
                    1.5,
                    1_717_171_717,
                );
                let reached = vp.emit(frame).await > 0;
                sent.lock().expect("sent").push(reached);
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let cfg = nats_config(&blocks, &urls, &prefix, extra);
    eventually("events journalled before the kill", LONG, || async {
        (sent.lock().expect("sent").len() >= 100).then_some(())
    })
    .await;
    let killed_at = tokio::time::Instant::now();
    let index_at_kill = sent.lock().expect("sent").len();
    procs[holder].kill();
    eventually("the survivor subscribed", LONG, || async {
        (procs[survivor].upstream_state("vp").await? == "subscribed").then_some(())
    })
    .await;
    let takeover = killed_at.elapsed();
    let index_at_takeover = sent.lock().expect("sent").len();
    let reached_survivor = || {
        let s = sent.lock().expect("sent");
        s[index_at_takeover..].iter().filter(|r| **r).count()
    };
    eventually("frames reaching the survivor", LONG, || async {
        (reached_survivor() >= 100).then_some(())
    })
    .await;
    running.store(false, Ordering::Relaxed);
    emitter.await.expect("emitter");
    let sent = sent.lock().expect("sent").clone();
    // Everything that reached the survivor's connection is journalled.
    let must: BTreeSet<String> = (index_at_takeover..sent.len())
        .filter(|i| sent[*i])
        .map(|i| format!("k{i}"))
        .collect();
    let (journal, copies) = eventually("the survivor's frames journalled", LONG, || async {
        let all: Vec<String> = journalled_data(&cfg)
            .await?
            .iter()
            .filter_map(|d| d["contract_id"].as_str().map(str::to_string))
            .collect();
        let j: BTreeSet<String> = all.iter().cloned().collect();
        must.is_subset(&j).then_some((j, all.len()))
    })
    .await;
    assert_eq!(copies, journal.len(), "each frame journalled once");
    let gap = (index_at_kill..index_at_takeover)
        .filter(|i| !sent[*i])
        .count();
    let lost: Vec<usize> = (0..sent.len())
        .filter(|i| sent[*i] && !journal.contains(&format!("k{i}")))
        .collect();
    eprintln!(
        "lease takeover: {takeover:?} after SIGKILL (ttl {ttl:?}); {gap} frames pushed while no \
         instance was connected; {} frames reached the killed holder but were not journalled; \
         {} frames sent in total",
        lost.len(),
        sent.len()
    );
    assert!(
        takeover < ttl * 3,
        "takeover took {takeover:?}, more than the lease TTL allows"
    );
    for p in &mut procs {
        p.kill();
    }
    cleanup(SHARED_NATS, &prefix).await;
}

/// `/readyz` status code of a bridge.
async fn readyz(bridge: &Bridge) -> u16 {
    http_client()
        .get(format!("http://{}/readyz", bridge.local_addr()))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Emits numbered VoIPBIN calls every few ms until stopped; records how many were sent.
fn spawn_load(
    sim: &Simulator,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    tokio::task::JoinHandle<usize>,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let running = std::sync::Arc::new(AtomicBool::new(true));
    let task = {
        let (sim, running) = (sim.clone(), running.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while running.load(Ordering::Relaxed) {
                sim.emit(numbered_call(i)).await;
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            i
        })
    };
    (running, task)
}

/// Every journalled envelope's `data` in the stream of `cfg`, read straight from NATS; `None`
/// if NATS does not answer (a cluster electing a leader).
async fn journalled_data(cfg: &wsbridge::config::Config) -> Option<Vec<Value>> {
    let store = wsbridge::storage::nats::NatsStore::connect(&cfg.storage)
        .await
        .ok()?;
    let mut out = Vec::new();
    let mut from = 1;
    loop {
        let page = wsbridge::storage::Store::read_from(store.as_ref(), from, 1000)
            .await
            .ok()?;
        let Some(last) = page.last() else { break };
        from = last.seq + 1;
        for e in &page {
            let mut v: Value = serde_json::from_slice(&e.bytes).ok()?;
            out.push(v["data"].take());
        }
    }
    Some(out)
}

/// The call numbers (`data.n`) journalled, in journal order, copies included (so a test can
/// tell a duplicate from a single copy).
async fn journalled_calls(cfg: &wsbridge::config::Config) -> Option<Vec<u64>> {
    let data = journalled_data(cfg).await?;
    Some(data.iter().filter_map(|d| d["n"].as_u64()).collect())
}

/// Waits until the journal of `cfg` holds every call in `want`, then asserts it holds each
/// exactly once and nothing else (a set comparison alone would pass with a duplicate).
async fn assert_journalled_once(
    cfg: &wsbridge::config::Config,
    want: &BTreeSet<u64>,
    limit: Duration,
) {
    let calls = eventually("every event journalled", limit, || async {
        let calls = journalled_calls(cfg).await?;
        let distinct: BTreeSet<u64> = calls.iter().copied().collect();
        want.is_subset(&distinct).then_some(calls)
    })
    .await;
    let distinct: BTreeSet<u64> = calls.iter().copied().collect();
    assert_eq!(&distinct, want, "the journal holds exactly the events sent");
    assert_eq!(
        calls.len(),
        distinct.len(),
        "each event journalled exactly once ({} entries for {} events)",
        calls.len(),
        distinct.len()
    );
}

/// A VoIPBIN simulator and a webhook receiver, with the config blocks routing one to the
/// other (the rig of the NATS failure tests).
async fn load_rig() -> (Simulator, Receiver, Vec<String>) {
    let vb = start_sim(Provider::Voipbin).await;
    let rx = Receiver::start(Vec::new(), Answer::status(200)).await;
    let blocks = vec![
        upstream_block(
            "vb",
            &vb,
            "backoff_initial = \"50ms\"\nbackoff_max = \"400ms\"\n",
        ),
        webhook_block("crm", &rx.url(), ""),
        route_block("crm"),
        consumer_block(),
    ];
    (vb, rx, blocks)
}

/// Stops the load, then waits until every call it sent is in the journal of `journal` and has
/// reached the receiver; returns how many were sent.
async fn stop_load_and_check(
    running: std::sync::Arc<std::sync::atomic::AtomicBool>,
    load: tokio::task::JoinHandle<usize>,
    journal: &wsbridge::config::Config,
    rx: &Receiver,
    limit: Duration,
) -> u64 {
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    let sent = load.await.expect("load") as u64;
    let all: BTreeSet<u64> = (0..sent).collect();
    assert_journalled_once(journal, &all, limit).await;
    rx.wait_until(limit, "every event delivered", |r| {
        per_id(r).len() as u64 == sent
    })
    .await;
    sent
}

/// A NATS server of the test's own is restarted under load: the bridge goes unready, holds
/// the upstream back meanwhile, recovers by itself, and every event the upstream sent is
/// journalled and delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_under_load_makes_the_bridge_unready_then_recovers_losing_nothing() {
    let mut server = NatsServer::start("restart");
    server.wait_ready(LONG).await;
    let prefix = unique_prefix("restart");
    let (vb, rx, blocks) = load_rig().await;
    let urls = [server.url()];
    let cfg = nats_config(&blocks, &urls, &prefix, "");
    let (bridge, _) = start_bridge(&cfg).await;
    wait_sim_ready(&vb, 1).await;
    assert_eq!(readyz(&bridge).await, 200);

    let (running, load) = spawn_load(&vb);
    rx.wait_until(LONG, "deliveries before the outage", |r| r.len() >= 50)
        .await;
    server.kill();
    eventually("unready during the outage", LONG, || async {
        (readyz(&bridge).await == 503).then_some(())
    })
    .await;
    let metrics = metrics_text(&bridge).await;
    assert!(
        metrics.contains("wsbridge_store_connected 0"),
        "metrics show the NATS connection down"
    );
    server.restart();
    eventually("ready again", LONG, || async {
        (readyz(&bridge).await == 200).then_some(())
    })
    .await;
    let before_stop = rx.requests().len();
    rx.wait_until(LONG, "deliveries after the outage", |r| {
        r.len() >= before_stop + 50
    })
    .await;
    let sent = stop_load_and_check(running, load, &cfg, &rx, LONG).await;
    eprintln!("nats restart: {sent} events sent under load, all journalled and delivered");
    bridge.shutdown().await;
}

/// A three-node NATS cluster (started by the test on loopback ports) with every stream at 3
/// replicas: one node is killed under load; nothing journalled is lost and delivery goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_killed_under_load_loses_nothing_and_delivery_continues() {
    let mut nodes = NatsServer::cluster("cluster", 3);
    for n in &nodes {
        n.wait_ready(LONG).await;
    }
    let prefix = unique_prefix("cluster");
    let (vb, rx, blocks) = load_rig().await;
    let urls: Vec<String> = nodes.iter().map(NatsServer::url).collect();
    let cfg = nats_config(&blocks, &urls, &prefix, "replicas = 3\n");
    let bridge = eventually("the bridge started on the cluster", LONG, || async {
        // Stream creation needs a JetStream meta leader; retry until the cluster has one.
        match Bridge::start(&cfg).await {
            Ok(b) => Some(b),
            Err(e) => {
                eprintln!("bridge start: {e}");
                None
            }
        }
    })
    .await;
    for u in bridge.upstreams() {
        wait_subscribed(&u).await;
    }
    wait_sim_ready(&vb, 1).await;

    let (running, load) = spawn_load(&vb);
    rx.wait_until(LONG, "deliveries before the node dies", |r| r.len() >= 50)
        .await;
    nodes[0].kill();
    let before = rx.requests().len();
    rx.wait_until(ELECTION, "deliveries after the node died", |r| {
        r.len() >= before + 100
    })
    .await;
    let survivors = nats_config(&blocks, &urls[1..], &prefix, "replicas = 3\n");
    let sent = stop_load_and_check(running, load, &survivors, &rx, ELECTION).await;
    eprintln!("nats cluster: {sent} events under load, one of 3 nodes killed, all journalled and delivered");
    bridge.shutdown().await;
}

/// `ordered = true` on two instances: one delivery of the endpoint at a time across both, so
/// the events of a subject arrive in journal order even when one fails and is retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_endpoint_keeps_journal_order_across_instances() {
    // The first attempt fails: the first event is retried before anything after it goes.
    let rx = Receiver::start(vec![Answer::status(500)], Answer::status(200)).await;
    let extra = "ordered = true\nretry = [\"50ms\", \"50ms\"]\n";
    let (prefix, vb, a, b) = two_instances("ordered", &rx, extra).await;
    const N: usize = 20;
    for i in 0..N {
        // One subject for all: the call id stays the same, the status number changes.
        vb.emit(voipbin::wire::event(
            "call.status",
            "2024-01-15T10:30:00.000000Z",
            "customer_id:abc123:call:same",
            json!({"id": "same", "status": "ringing", "n": i}),
        ))
        .await;
    }
    let got = rx
        .wait_until(LONG, "every event delivered", |r| {
            r.iter().filter(|x| x.answered == 200).count() >= N
        })
        .await;
    let seqs: Vec<u64> = got
        .iter()
        .filter(|x| x.answered == 200)
        .map(|x| {
            let v: Value = serde_json::from_slice(&x.body).expect("envelope");
            v["seq"].as_u64().expect("seq")
        })
        .collect();
    assert_eq!(seqs, (1..=N as u64).collect::<Vec<u64>>(), "journal order");
    a.shutdown().await;
    b.shutdown().await;
    cleanup(SHARED_NATS, &prefix).await;
}

/// An event whose envelope exceeds what the NATS server takes can never be journalled: the
/// bridge only starts when `max_payload` covers `limits.max_event_bytes`, so such an event is
/// refused at ingest and counted, and the events after it still flow (a retry loop on it
/// would fill the ingest queue and stall every upstream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_larger_than_max_payload_is_skipped_and_later_events_flow() {
    let server = NatsServer::start_with_config("maxpayload", Some("max_payload: 16384\n"));
    server.wait_ready(LONG).await;
    let prefix = unique_prefix("maxpayload");
    let (vb, rx, mut blocks) = load_rig().await;
    blocks.push("[limits]\nmax_event_bytes = 8192\n".to_string());
    let urls = [server.url()];
    let cfg = nats_config(&blocks, &urls, &prefix, "");
    let (bridge, _) = start_bridge(&cfg).await;
    wait_sim_ready(&vb, 1).await;

    vb.emit(numbered_call(0)).await;
    let big = voipbin::wire::event(
        "call.status",
        "2024-01-15T10:30:00.000000Z",
        "customer_id:abc123:call:big",
        json!({"id": "big", "status": "ringing", "n": 999, "pad": "x".repeat(8192)}),
    );
    vb.emit(big).await;
    emit_range(&vb, 1..5).await;

    let want: BTreeSet<u64> = (0..5).collect();
    assert_journalled_once(&cfg, &want, LONG).await;
    rx.wait_until(LONG, "the events around the big one delivered", |r| {
        per_id(r).len() == 5
    })
    .await;
    let stats = bridge.ingest_stats();
    assert_eq!(stats.too_large, 1, "the big event is counted: {stats:?}");
    assert_eq!(stats.rejected, 0, "refused before the journal: {stats:?}");
    assert_eq!(stats.published, 5, "{stats:?}");
    bridge.shutdown().await;
}

/// A store on the shared server with its own prefix, and its config (no bridge around it:
/// these tests drive the store's delivery calls themselves).
async fn bare_store(tag: &str) -> (String, std::sync::Arc<wsbridge::storage::nats::NatsStore>) {
    let prefix = unique_prefix(tag);
    let store = store_on(&prefix).await;
    (prefix, store)
}

/// Another store on the shared server with `prefix` (a second instance).
async fn store_on(prefix: &str) -> std::sync::Arc<wsbridge::storage::nats::NatsStore> {
    store_at(SHARED_NATS, prefix, "").await
}

/// A store on the NATS server at `url` with `prefix` and extra `[storage]` lines.
async fn store_at(
    url: &str,
    prefix: &str,
    extra: &str,
) -> std::sync::Arc<wsbridge::storage::nats::NatsStore> {
    // A config needs an upstream; nothing connects to it here.
    let upstream = "[[upstreams]]\nname = \"vb\"\nadapter = \"voipbin\"\nurl = \"ws://127.0.0.1:9\"\ntoken = \"unused-token\"\n";
    let cfg = nats_config(&[upstream.to_string()], &[url.to_string()], prefix, extra);
    wsbridge::storage::nats::NatsStore::connect(&cfg.storage)
        .await
        .expect("store connects")
}

/// An envelope with id `e<i>`, not yet journalled.
fn envelope(i: usize) -> wsbridge::envelope::Envelope {
    wsbridge::envelope::Envelope {
        specversion: "1.0".into(),
        id: format!("e{i}"),
        source: "wsbridge://vb".into(),
        event_type: "voipbin.call.status".into(),
        subject: Some(format!("call/c{i}")),
        time: "2024-01-15T10:30:00Z".into(),
        datacontenttype: "application/json".into(),
        data: json!({"n": i}),
        provider: "voipbin".into(),
        recvtime: "2024-01-15T10:30:00.000000Z".into(),
        gap: None,
        seq: None,
    }
}

/// Journals events `range`, each routed to `to`; returns their seqs.
async fn append_routed(
    store: &wsbridge::storage::nats::NatsStore,
    range: std::ops::Range<usize>,
    to: &str,
) -> Vec<u64> {
    let batch = range
        .map(|i| {
            wsbridge::storage::NewEvent::new(envelope(i), vec![std::sync::Arc::from(to)])
                .expect("an envelope serialises")
        })
        .collect();
    Store::append(store, batch)
        .await
        .expect("append")
        .into_iter()
        .map(|a| match a {
            wsbridge::storage::Appended::Stored { seq, .. } => seq,
            other => panic!("not stored: {other:?}"),
        })
        .collect()
}

fn attempt(status: u16) -> wsbridge::storage::AttemptRecord {
    wsbridge::storage::AttemptRecord {
        at_ms: chrono::Utc::now().timestamp_millis(),
        status: Some(status),
        error: None,
        duration_ms: 1,
    }
}

/// Calls `due` until it returns a delivery of `seq`.
async fn due_until(
    queue: &dyn wsbridge::storage::DeliveryQueue,
    seq: u64,
) -> wsbridge::storage::HeldDelivery {
    eventually("the delivery is due", LONG, || async {
        // The others are released as this answer is dropped.
        let due = queue.due(0, 16).await.ok()?;
        due.into_iter().find(|d| d.seq == seq)
    })
    .await
}

/// An unordered endpoint's queue on `store`, as a dispatcher would ask for it.
async fn queue_of(
    store: &wsbridge::storage::nats::NatsStore,
    endpoint: &str,
) -> std::sync::Arc<dyn wsbridge::storage::DeliveryQueue> {
    let options = wsbridge::storage::QueueOptions {
        ordered: false,
        ack_wait: Duration::from_secs(60),
        max_held: 32,
    };
    Store::delivery_queue(store, endpoint, options)
        .await
        .expect("the endpoint's queue")
}

/// Unanswered and unsent messages of a consumer.
async fn consumer_backlog(stream: &str, consumer: &str) -> Option<u64> {
    let client = async_nats::connect(SHARED_NATS).await.ok()?;
    let js = async_nats::jetstream::new(client);
    let s = js.get_stream(stream).await.ok()?;
    let info = s.consumer_info(consumer).await.ok()?;
    Some(info.num_pending + info.num_ack_pending as u64)
}

/// A replay of an event fetched while the journal consumer then redelivers the same event
/// (its retry fell due): each message keeps its own acker, so when the replay's attempt
/// succeeds the replay message is acknowledged (not left to come back after the ack wait),
/// and the journal consumer's delivery follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_and_a_retry_of_the_same_event_are_each_acknowledged() {
    use wsbridge::storage::{NextStep, ReplaySelection};
    let (prefix, store) = bare_store("collide").await;
    let s = store.as_ref();
    let queue = queue_of(s, "crm").await;
    let seq = append_routed(s, 0..1, "crm").await[0];
    let held = due_until(queue.as_ref(), seq).await;
    let retry_at = chrono::Utc::now().timestamp_millis() + 1500;
    queue
        .record(held, attempt(500), NextStep::RetryAt(retry_at))
        .await
        .expect("record the failure");
    let queued = Store::replay(s, "crm", ReplaySelection::Seqs { from: seq, to: seq })
        .await
        .expect("replay");
    assert_eq!(queued, 1);
    // The replay comes first (its retry is not due yet) and is held, its attempt running.
    let replayed = due_until(queue.as_ref(), seq).await;
    // Then the journal consumer redelivers the same seq to this instance.
    let events = format!("{prefix}_events");
    let main = format!("{prefix}_wh_crm");
    eventually("the retry redelivered to this instance", LONG, || async {
        let _ = queue.due(0, 16).await;
        let client = async_nats::connect(SHARED_NATS).await.ok()?;
        let js = async_nats::jetstream::new(client);
        let info = js
            .get_stream(&events)
            .await
            .ok()?
            .consumer_info(&main)
            .await
            .ok()?;
        (info.delivered.consumer_sequence >= 2).then_some(())
    })
    .await;
    queue
        .record(replayed, attempt(200), NextStep::Delivered)
        .await
        .expect("record the replay's success");
    let replay_stream = format!("{prefix}_replay");
    let replay_consumer = format!("{prefix}_whr_crm");
    eventually(
        "the replay message acknowledged (well within its 60 s ack wait)",
        Duration::from_secs(10),
        || async { (consumer_backlog(&replay_stream, &replay_consumer).await? == 0).then_some(()) },
    )
    .await;
    // The journal consumer's delivery was deferred, not lost: it comes again and is acked.
    let retried = due_until(queue.as_ref(), seq).await;
    queue
        .record(retried, attempt(200), NextStep::Delivered)
        .await
        .expect("record the retry's success");
    eventually("the journal delivery acknowledged", LONG, || async {
        (consumer_backlog(&events, &main).await? == 0).then_some(())
    })
    .await;
    cleanup(SHARED_NATS, &prefix).await;
}

/// The delivery queue's one rule on NATS: a delivery handed out is held (not handed out again,
/// not even by a second queue of the endpoint on this instance) until it is answered; dropped
/// unanswered it is offered again at once, and answered with a retry it comes back when the
/// server redelivers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_delivery_is_handed_out_again_only_once_released_or_due() {
    use wsbridge::storage::NextStep;
    let (prefix, store) = bare_store("heldrule").await;
    let s = store.as_ref();
    let queue = queue_of(s, "crm").await;
    let seqs = append_routed(s, 0..2, "crm").await;
    // A partial answer is dropped (released) and comes first in the next one.
    let mut held = eventually("both deliveries handed out", LONG, || async {
        let due = queue.due(0, 16).await.ok()?;
        (due.len() == 2).then_some(due)
    })
    .await;
    assert_eq!(held.iter().map(|d| d.seq).collect::<Vec<_>>(), seqs);
    assert!(queue.due(0, 16).await.expect("due").is_empty(), "both held");
    let reloaded = queue_of(s, "crm").await;
    assert!(
        reloaded.due(0, 16).await.expect("due").is_empty(),
        "a second queue of the endpoint shares what is held"
    );
    // Released: offered again at once.
    let second = held.pop().expect("two held");
    queue.release(second);
    let again = queue.due(0, 16).await.expect("due");
    assert_eq!(again.iter().map(|d| d.seq).collect::<Vec<_>>(), [seqs[1]]);
    // Answered with a retry: back when the server redelivers it, its attempt counted.
    let first = held.pop().expect("one held");
    let retry_at = chrono::Utc::now().timestamp_millis() + 300;
    queue
        .record(first, attempt(500), NextStep::RetryAt(retry_at))
        .await
        .expect("record the failure");
    let retried = due_until(queue.as_ref(), seqs[0]).await;
    assert_eq!(retried.attempts, 1);
    for done in std::iter::once(retried).chain(again) {
        queue
            .record(done, attempt(200), NextStep::Delivered)
            .await
            .expect("record the success");
    }
    let events = format!("{prefix}_events");
    let main = format!("{prefix}_wh_crm");
    eventually("both acknowledged", LONG, || async {
        (consumer_backlog(&events, &main).await? == 0).then_some(())
    })
    .await;
    cleanup(SHARED_NATS, &prefix).await;
}

/// A dead letter carries a deterministic `Nats-Msg-Id` (a second publish of it, after a crash
/// between the publish and the `Term`, is dropped by the duplicate window), and two instances
/// replaying the dead letters at once queue each of them once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_written_and_replayed_once() {
    use wsbridge::storage::{NextStep, ReplaySelection};
    let (prefix, a) = bare_store("dlqonce").await;
    let b = store_on(&prefix).await;
    let queue = queue_of(a.as_ref(), "crm").await;
    let seq = append_routed(a.as_ref(), 0..1, "crm").await[0];
    let held = due_until(queue.as_ref(), seq).await;
    queue
        .record(held, attempt(500), NextStep::Dead)
        .await
        .expect("dead-letter");

    let client = async_nats::connect(SHARED_NATS).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let dlq = js
        .get_stream(format!("{prefix}_dlq"))
        .await
        .expect("dlq stream");
    let letter = dlq.get_raw_message(1).await.expect("the dead letter");
    assert_eq!(
        letter.headers.get("Nats-Msg-Id").map(|v| v.as_str()),
        Some(format!("dlq:crm:{seq}").as_str()),
        "the dead letter's message id is deterministic"
    );

    let (ra, rb) = tokio::join!(
        Store::replay(a.as_ref(), "crm", ReplaySelection::Dead),
        Store::replay(b.as_ref(), "crm", ReplaySelection::Dead),
    );
    let (ra, rb) = (ra.expect("replay on a"), rb.expect("replay on b"));
    assert_eq!(ra + rb, 1, "one replay queued between the two instances");
    let mut replay = js
        .get_stream(format!("{prefix}_replay"))
        .await
        .expect("replay stream");
    let info = replay.info().await.expect("replay stream info");
    assert_eq!(info.state.messages, 1, "the dead letter is queued once");
    let counts = Store::counts(a.as_ref(), "crm").await.expect("counts");
    assert_eq!(counts.dead, 0, "{counts:?}");
    cleanup(SHARED_NATS, &prefix).await;
}

/// Once the stream's limits remove old messages, reading from a removed seq is an error
/// (`NotRetained`, which a resume turns into `unrecoverable_position`), not a silent jump to
/// the first retained one; `position().first` agrees. A fresh stream reads from 1 as usual,
/// and replays that scan the journal still find what is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_below_the_first_retained_seq_is_not_retained() {
    use wsbridge::storage::{ReplaySelection, StoreError};
    let (prefix, store) = bare_store("pruned").await;
    let s = store.as_ref();
    assert!(Store::read_from(s, 1, 10).await.expect("fresh").is_empty());
    assert!(Store::read_from(s, 0, 10).await.expect("fresh").is_empty());
    assert_eq!(Store::position(s).await.expect("position").first, 1);
    let _queue = queue_of(s, "crm").await;
    let seqs = append_routed(s, 0..5, "crm").await;
    assert_eq!(Store::read_from(s, 1, 10).await.expect("read").len(), 5);

    // Keep only the last two messages.
    update_events_stream(&prefix, |c| c.max_messages = 2).await;

    let first = seqs[3];
    match Store::read_from(s, seqs[0], 10).await {
        Err(StoreError::NotRetained { from, first: f }) => {
            assert_eq!((from, f), (seqs[0], first));
        }
        other => panic!("expected NotRetained, got {other:?}"),
    }
    let kept = Store::read_from(s, first, 10).await.expect("read the rest");
    assert_eq!(
        kept.iter().map(|e| e.seq).collect::<Vec<_>>(),
        seqs[3..].to_vec()
    );
    assert_eq!(Store::position(s).await.expect("position").first, first);
    let queued = Store::replay(s, "crm", ReplaySelection::Ids(vec!["e4".into()]))
        .await
        .expect("replay by id scans what is retained");
    assert_eq!(queued, 1);
    cleanup(SHARED_NATS, &prefix).await;
}

/// A lease holder whose renewal hangs (its NATS server frozen) stops holding the upstream
/// within 2/3 of the TTL of its last renewal, before the lease can expire and be taken by
/// another instance, instead of waiting for the hanging request to fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_holder_whose_renewal_hangs_gives_the_upstream_up_before_the_lease_expires() {
    let server = NatsServer::start("leasehang");
    server.wait_ready(LONG).await;
    let prefix = unique_prefix("leasehang");
    let ttl = Duration::from_secs(2);
    let store = store_at(&server.url(), &prefix, "lease_ttl = \"2s\"\n").await;
    let leases = wsbridge::storage::nats::lease::Leases::open(&store)
        .await
        .expect("leases");
    let stop = tokio_util::sync::CancellationToken::new();
    let held = leases.keep("vp", stop.clone());
    let is_held = |want: bool| {
        let held = held.clone();
        move || {
            let held = held.clone();
            async move { (*held.borrow() == want).then_some(()) }
        }
    };
    eventually("the lease acquired", LONG, is_held(true)).await;
    server.pause();
    let paused = tokio::time::Instant::now();
    eventually("the lease given up", LONG, is_held(false)).await;
    let after = paused.elapsed();
    server.resume();
    stop.cancel();
    // The last renewal was sent before the pause, so its lease lives at least `ttl` from then.
    assert!(
        after < ttl,
        "the holder gave the upstream up {after:?} after NATS froze; the lease may expire after {ttl:?}"
    );
}

/// A saved durable of `consumer` named `name`.
fn saved_durable(
    consumer: &str,
    name: &str,
    state: &'static [u8],
    keep_from: u64,
) -> wsbridge::storage::SavedDurable {
    wsbridge::storage::SavedDurable {
        key: wsbridge::storage::DurableKey {
            consumer: consumer.into(),
            name: name.into(),
        },
        state: bytes::Bytes::from_static(state),
        keep_from,
    }
}

/// Durables saved on one instance are listed on another (key order, names with characters
/// a subject cannot hold, state byte for byte); a save replaces, a delete removes and says
/// whether there was anything to remove.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durables_are_saved_replaced_listed_and_deleted_across_instances() {
    let (prefix, a) = bare_store("durables").await;
    let b = store_on(&prefix).await;
    let (a, b) = (a.as_ref(), b.as_ref());
    assert!(Store::durables(a).await.expect("list").is_empty());
    let odd = saved_durable("a.b", "x *>", &[0, 255, 1], 3);
    for d in [
        saved_durable("b", "sync", b"s1", 7),
        odd.clone(),
        saved_durable("a", "sync", b"", 1),
    ] {
        Store::save_durable(a, d).await.expect("save");
    }
    Store::save_durable(b, saved_durable("b", "sync", b"s2", 9))
        .await
        .expect("replace from the other instance");
    let expected = vec![
        saved_durable("a", "sync", b"", 1),
        odd.clone(),
        saved_durable("b", "sync", b"s2", 9),
    ];
    assert_eq!(Store::durables(a).await.expect("list"), expected);
    assert_eq!(Store::durables(b).await.expect("list"), expected);

    assert!(Store::delete_durable(b, &odd.key).await.expect("delete"));
    assert!(!Store::delete_durable(a, &odd.key).await.expect("delete"));
    let names = |list: Vec<wsbridge::storage::SavedDurable>| {
        list.into_iter()
            .map(|d| (d.key.consumer, d.key.name))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(Store::durables(a).await.expect("list")),
        [("a".into(), "sync".into()), ("b".into(), "sync".into())]
    );

    // Many keys: the listing reads until the server has nothing pending.
    for i in 0..40 {
        Store::save_durable(a, saved_durable("many", &format!("d{i:02}"), b"x", i))
            .await
            .expect("save");
    }
    let listed = Store::durables(b).await.expect("list");
    assert_eq!(listed.len(), 42);
    assert_eq!(
        listed
            .iter()
            .filter(|d| d.key.consumer == "many")
            .map(|d| d.keep_from)
            .collect::<Vec<_>>(),
        (0..40).collect::<Vec<_>>()
    );
    cleanup(SHARED_NATS, &prefix).await;
}

/// A seek by time finds the first message the journal stored at or after the time: head + 1
/// on an empty journal and past the head, and the first retained message once the stream's
/// limits removed older ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seq_at_seeks_the_journal_by_the_time_it_stored_each_event() {
    let (prefix, store) = bare_store("seqat").await;
    let s = store.as_ref();
    let now_ms = || chrono::Utc::now().timestamp_millis();
    assert_eq!(Store::seq_at(s, now_ms()).await.expect("seek"), 1);
    let early = append_routed(s, 0..2, "none").await;
    // A millisecond that starts after both were stored.
    let stored_by = now_ms();
    eventually("the clock moves on", LONG, || async {
        (now_ms() > stored_by).then_some(())
    })
    .await;
    let mid = now_ms();
    let late = append_routed(s, 2..3, "none").await;
    assert_eq!(Store::seq_at(s, 0).await.expect("seek"), early[0]);
    assert_eq!(Store::seq_at(s, i64::MIN).await.expect("seek"), early[0]);
    assert_eq!(Store::seq_at(s, mid).await.expect("seek"), late[0]);
    let head = late[0];
    assert_eq!(
        Store::seq_at(s, now_ms() + 3_600_000).await.expect("seek"),
        head + 1
    );
    assert_eq!(Store::seq_at(s, i64::MAX).await.expect("seek"), head + 1);

    update_events_stream(&prefix, |c| c.max_messages = 1).await;
    assert_eq!(Store::seq_at(s, 0).await.expect("seek"), head);
    cleanup(SHARED_NATS, &prefix).await;
}

/// An event with id `id`, received `ago` before now (the id index decides by that time).
fn received_event(id: &str, ago: chrono::Duration) -> wsbridge::storage::NewEvent {
    let recv = chrono::Utc::now() - ago;
    let mut e = envelope(0);
    e.id = id.to_string();
    e.data = json!({ "id": id });
    e.recvtime = recv.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    wsbridge::storage::NewEvent::new(e, Vec::new()).expect("an envelope serialises")
}

/// Events of one append above the store's chunk (the store publishes an append's events a
/// chunk at a time, as soon as their id claims are answered).
const MANY: usize = 700;

/// Two instances appending the same ids at once, in batches spanning several chunks, with
/// copies inside each batch: each id is stored once, by exactly one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_appending_the_same_ids_at_once_store_each_once() {
    let (prefix, a) = bare_store("sameids").await;
    let b = store_on(&prefix).await;
    let batch = || {
        let mut events: Vec<_> = (0..MANY)
            .map(|i| received_event(&format!("s{i}"), chrono::Duration::seconds(1)))
            .collect();
        // The same frame twice in one batch (two connections), in different chunks.
        events.push(received_event("s3", chrono::Duration::seconds(1)));
        events.insert(200, received_event("s450", chrono::Duration::seconds(1)));
        events
    };
    let (ra, rb) = tokio::join!(
        Store::append(a.as_ref(), batch()),
        Store::append(b.as_ref(), batch())
    );
    let (ra, rb) = (ra.expect("append on a"), rb.expect("append on b"));
    assert_eq!((ra.len(), rb.len()), (MANY + 2, MANY + 2));
    let mut stored: BTreeMap<String, usize> = BTreeMap::new();
    for outcome in ra.iter().chain(rb.iter()) {
        match outcome {
            wsbridge::storage::Appended::Stored { envelope, .. } => {
                *stored.entry(envelope.id.clone()).or_default() += 1;
            }
            wsbridge::storage::Appended::Duplicate => {}
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!(stored.len(), MANY, "every id stored");
    assert!(stored.values().all(|n| *n == 1), "each once: {stored:?}");
    let journal = Store::read_from(a.as_ref(), 1, 4 * MANY)
        .await
        .expect("journal reads");
    let ids: BTreeSet<&str> = journal.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(journal.len(), MANY, "no id twice in the journal");
    assert_eq!(ids.len(), MANY);
    cleanup(SHARED_NATS, &prefix).await;
}

/// One append over several chunks, with ids back after the dedup window among new ones (in
/// the first chunk and a later one): the returned ids get fresh ids, and the journal holds
/// the batch in its order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_several_chunks_keeps_its_order_with_returned_ids_in_it() {
    let (prefix, store) = bare_store("chunks").await;
    let returning = |i: usize| (10..15).contains(&i) || (400..405).contains(&i);
    let old: Vec<_> = (0..MANY)
        .filter(|i| returning(*i))
        .map(|i| received_event(&format!("r{i}"), chrono::Duration::minutes(10)))
        .collect();
    let first = Store::append(store.as_ref(), old).await.expect("append");
    assert!(first
        .iter()
        .all(|a| matches!(a, wsbridge::storage::Appended::Stored { .. })));
    let batch = (0..MANY)
        .map(|i| received_event(&format!("r{i}"), chrono::Duration::seconds(1)))
        .collect();
    let outcomes = Store::append(store.as_ref(), batch).await.expect("append");
    let mut last_seq = 0;
    for (i, outcome) in outcomes.iter().enumerate() {
        let wsbridge::storage::Appended::Stored { seq, envelope, .. } = outcome else {
            panic!("event {i} not stored: {outcome:?}");
        };
        assert!(
            *seq > last_seq,
            "event {i} out of order: {seq} after {last_seq}"
        );
        last_seq = *seq;
        let base = format!("r{i}");
        if returning(i) {
            assert_ne!(envelope.id, base, "back after the window: a fresh id");
        } else {
            assert_eq!(envelope.id, base);
        }
    }
    let journal = Store::read_from(store.as_ref(), 1, 4 * MANY)
        .await
        .expect("journal reads");
    let ids: BTreeSet<&str> = journal.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(journal.len(), MANY + 10);
    assert_eq!(ids.len(), MANY + 10, "every id unique in the journal");
    cleanup(SHARED_NATS, &prefix).await;
}
