//! Finding 8 of issue 12: deduplication by content merged real state changes. A VoicePact
//! contract going active → paused → active sends a third frame identical to the first; it was
//! dropped as a duplicate, so every consumer ended on `paused`. Now identical frames on one
//! connection are distinct events, while the same frame over two connections (two
//! `client_id`s) or from two instances within `storage.dedup_window` is still one event, and
//! an id that comes back after the window is a new event under a fresh id: every id stays
//! unique in the journal, on both backends.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::broadcast;
use wsbridge::bridge::Bridge;
use wsbridge::envelope::{Envelope, Published};
use wsbridge::storage::nats::NatsStore;
use wsbridge::storage::{Appended, NewEvent, Store};
use wsbridge_adapters::{voicepact, Provider};

use crate::common::nats::*;
use crate::common::receiver::{Answer, Receiver};
use crate::common::*;

const CLIENT_A: &str = "+254700000001";
const CLIENT_B: &str = "+254700000002";
/// Generous: every wait ends as soon as its condition holds.
const LONG: Duration = Duration::from_secs(30);

/// The three frames of a contract that goes active → paused → active within one second:
/// the first and the third are byte for byte the same.
fn flip_flop() -> Vec<Value> {
    ["active", "paused", "active"]
        .iter()
        .map(|s| voicepact::wire::contract_update("k1", s, 1_700_000_000))
        .collect()
}

/// A VoicePact upstream block for one `client_id`.
fn voicepact_block(
    name: &str,
    sim: &wsbridge_adapters::sim::Simulator,
    client_id: &str,
    extra: &str,
) -> String {
    format!(
        "[[upstreams]]\nname = \"{name}\"\nadapter = \"voicepact\"\nurl = \"{}\"\nclient_id = \"{client_id}\"\n{FAST}{extra}\n",
        sim.base_url()
    )
}

/// Waits until ingest has seen `n` events (published or dropped as copies) on `bridges`.
async fn wait_ingested(bridges: &[&Bridge], n: u64) {
    eventually(&format!("ingest seeing {n} events"), LONG, || async {
        let seen: u64 = bridges
            .iter()
            .map(|b| {
                let s = b.ingest_stats();
                s.published + s.duplicates
            })
            .sum();
        if seen >= n {
            Ok(())
        } else {
            Err(format!("{seen} seen"))
        }
    })
    .await;
}

/// The next `n` published events.
async fn published(rx: &mut broadcast::Receiver<Arc<Published>>, n: usize) -> Vec<Envelope> {
    let mut out = Vec::new();
    while out.len() < n {
        let p = next_matching(rx, "a published event", |_| true).await;
        out.push(p.envelope.clone());
    }
    out
}

fn statuses(events: &[Envelope]) -> Vec<String> {
    events
        .iter()
        .map(|e| e.data["status"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn distinct_ids(events: &[Envelope]) -> usize {
    events
        .iter()
        .map(|e| e.id.as_str())
        .collect::<HashSet<_>>()
        .len()
}

/// One connection: the third frame, identical to the first, is its own event, so consumers
/// end on `active`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_that_flips_back_on_one_connection_is_three_events() {
    let vp = start_sim(Provider::VoicePact).await;
    vp.set_contract_parties("k1", &[CLIENT_A]);
    let cfg = config(&[voicepact_block("vp", &vp, CLIENT_A, "")]);
    let (bridge, mut rx) = start_bridge(&cfg).await;
    wait_sim_ready(&vp, 1).await;

    for frame in flip_flop() {
        assert_eq!(vp.emit(frame).await, 1);
    }
    let events = published(&mut rx, 3).await;
    assert_eq!(statuses(&events), ["active", "paused", "active"]);
    assert_eq!(distinct_ids(&events), 3, "every occurrence has its own id");
    assert_eq!(bridge.ingest_stats().duplicates, 0);
    // The journal holds the three, each once.
    let ids: Vec<String> = bridge
        .store()
        .read_from(1, 10)
        .await
        .expect("journal reads")
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 3, "{ids:?}");
    bridge.shutdown().await;
    vp.shutdown().await;
}

/// Two `client_id`s on one VoicePact host: every `payment_update` broadcast reaches both
/// connections and is one event, including a broadcast identical to an earlier one, which
/// is a new event on both connections alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_over_two_client_ids_is_one_event_each_time() {
    let vp = start_sim(Provider::VoicePact).await;
    let cfg = config(&[
        voicepact_block("vp-a", &vp, CLIENT_A, ""),
        voicepact_block("vp-b", &vp, CLIENT_B, ""),
    ]);
    let (bridge, mut rx) = start_bridge(&cfg).await;
    wait_sim_ready(&vp, 2).await;

    let p = voicepact::wire::payment_update("k1", "pending", 5.0, 1_700_000_000);
    let q = voicepact::wire::payment_update("k1", "completed", 5.0, 1_700_000_001);
    for frame in [p.clone(), q, p] {
        assert_eq!(vp.emit(frame).await, 2, "broadcast to both connections");
    }
    wait_ingested(&[&bridge], 6).await;
    let stats = bridge.ingest_stats();
    assert_eq!((stats.published, stats.duplicates), (3, 3), "{stats:?}");
    let events = published(&mut rx, 3).await;
    assert_eq!(statuses(&events), ["pending", "completed", "pending"]);
    assert_eq!(distinct_ids(&events), 3);
    bridge.shutdown().await;
    vp.shutdown().await;
}

/// Two instances read the same upstream (`ownership = "all"`) into one NATS journal: the
/// flip-flop is three events, stored once each, and the webhook gets three distinct ids
/// ending on `active`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_store_each_occurrence_once_on_nats() {
    let prefix = unique_prefix("dedupwin");
    let vp = start_sim(Provider::VoicePact).await;
    vp.set_contract_parties("k1", &[CLIENT_A]);
    let hook = Receiver::start(Vec::new(), Answer::status(200)).await;
    let blocks = vec![
        voicepact_block("vp", &vp, CLIENT_A, "ownership = \"all\"\n"),
        webhook_block("crm", &hook.url(), ""),
        "[[routes]]\nname = \"r-crm\"\nproviders = [\"voicepact\"]\nto = [\"crm\"]\n".to_string(),
    ];
    let urls = [SHARED_NATS.to_string()];
    let cfg = nats_config(&blocks, &urls, &prefix, "");
    let (a, _) = start_bridge(&cfg).await;
    let (b, _) = start_bridge(&cfg).await;
    wait_sim_ready(&vp, 2).await;

    for frame in flip_flop() {
        assert_eq!(
            vp.emit(frame).await,
            2,
            "both instances' connections get it"
        );
    }
    wait_ingested(&[&a, &b], 6).await;
    let (sa, sb) = (a.ingest_stats(), b.ingest_stats());
    assert_eq!(sa.published + sb.published, 3, "{sa:?} {sb:?}");
    let got = hook.wait_for(3, LONG).await;
    let ids: BTreeSet<&str> = got.iter().map(|r| r.header("webhook-id")).collect();
    assert_eq!(ids.len(), 3, "three distinct webhook ids");
    let mut bodies: Vec<Envelope> = got
        .iter()
        .map(|r| serde_json::from_slice(&r.body).expect("an envelope"))
        .collect();
    bodies.sort_by_key(|e| e.seq);
    assert_eq!(statuses(&bodies), ["active", "paused", "active"]);
    a.shutdown().await;
    b.shutdown().await;
    vp.shutdown().await;
    cleanup(SHARED_NATS, &prefix).await;
}

/// A NATS store for `prefix` on the shared server, as one bridge instance opens it.
async fn nats_store(prefix: &str) -> Arc<NatsStore> {
    let upstream = "[[upstreams]]\nname = \"vb\"\nadapter = \"voipbin\"\nurl = \"ws://127.0.0.1:9\"\ntoken = \"unused-token\"\n";
    let cfg = nats_config(
        &[upstream.to_string()],
        &[SHARED_NATS.to_string()],
        prefix,
        "",
    );
    NatsStore::connect(&cfg.storage)
        .await
        .expect("NATS store opens")
}

/// An event with id `id` received `ago` before now.
fn received(id: &str, ago: chrono::Duration) -> NewEvent {
    let recv = chrono::Utc::now() - ago;
    let envelope = Envelope {
        specversion: "1.0".into(),
        id: id.into(),
        source: "wsbridge://vb".into(),
        event_type: "voipbin.call.status".into(),
        subject: None,
        time: recv.to_rfc3339(),
        datacontenttype: "application/json".into(),
        data: json!({"id": id}),
        provider: "voipbin".into(),
        recvtime: recv.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        gap: None,
        seq: None,
    };
    NewEvent::new(envelope, Vec::new()).expect("an envelope serialises")
}

/// Appends one event; its stored id, or `None` for a copy.
async fn append_one(store: &NatsStore, event: NewEvent) -> Option<String> {
    match Store::append(store, vec![event])
        .await
        .expect("append")
        .pop()
    {
        Some(Appended::Stored { envelope, .. }) => Some(envelope.id),
        Some(Appended::Duplicate) => None,
        other => panic!("unexpected outcome {other:?}"),
    }
}

/// On NATS, with two instances at once: a copy within the window is one event, an id back
/// after the window is a new event under a fresh id that both instances agree on, and every
/// id in the journal is unique.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_back_after_the_window_is_a_new_unique_event_on_nats() {
    let prefix = unique_prefix("renew");
    let (a, b) = (nats_store(&prefix).await, nats_store(&prefix).await);
    let minutes = chrono::Duration::minutes;
    let second = chrono::Duration::seconds(1);

    assert_eq!(
        append_one(&a, received("x", minutes(10))).await.as_deref(),
        Some("x")
    );
    assert_eq!(
        append_one(&b, received("x", minutes(10) - second)).await,
        None,
        "a copy"
    );
    let renewed = append_one(&b, received("x", minutes(5)))
        .await
        .expect("back after the window: a new event");
    assert_ne!(renewed, "x");
    assert_eq!(
        append_one(&a, received("x", minutes(5) - second)).await,
        None,
        "its copy"
    );
    // Held through a long outage: received before the newest event by more than the window.
    // The journal moved past it; it is a copy, and the renewed id is not stored twice.
    assert_eq!(
        append_one(&b, received("x", minutes(20))).await,
        None,
        "a stale copy"
    );

    // Both instances store the same return at once: one event.
    for id in ["y", "z"] {
        assert!(append_one(&a, received(id, minutes(10))).await.is_some());
        let (ra, rb) = tokio::join!(
            append_one(&a, received(id, minutes(5))),
            append_one(&b, received(id, minutes(5))),
        );
        assert!(
            ra.is_some() ^ rb.is_some(),
            "exactly one stored: {ra:?} {rb:?}"
        );
    }

    let journal = Store::read_from(a.as_ref(), 1, 100)
        .await
        .expect("journal reads");
    let ids: Vec<&str> = journal.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), 6, "{ids:?}");
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        6,
        "ids unique: {ids:?}"
    );
    cleanup(SHARED_NATS, &prefix).await;
}
