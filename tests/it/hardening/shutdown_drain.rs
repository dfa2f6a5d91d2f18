//! Finding 1 of issue 12: graceful shutdown dropped what providers had already sent. Providers
//! do not replay, so on SIGTERM, on a reload that removes an upstream and on a NATS lease
//! handover the bridge sends the WebSocket close, keeps reading until the provider's close
//! answer (for at most `server.shutdown_grace`) and journals everything it read.
//!
//! To make "already sent, not yet read" deterministic, the simulators are made silent (a hung
//! server: it neither reads nor writes) while the events are emitted, so the events wait in
//! the provider's send queue; they are released only once the bridge has begun to close. A
//! real server, like the simulator, sends what it queued before answering a close.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::watch;
use wsbridge::bridge::Bridge;
use wsbridge::config::Config;
use wsbridge::upstream::{UpstreamState, UpstreamStatus};
use wsbridge_adapters::sim::Simulator;
use wsbridge_adapters::{hashi, voicepact, Provider};

use crate::common::nats::{cleanup, nats_config_text, unique_prefix, SHARED_NATS};
use crate::common::*;

/// Upstream timings for these tests: quick reconnects, and a stale limit far above the time a
/// simulator is kept silent, so that silence is never taken for a dead connection.
const TIMINGS: &str = "backoff_initial = \"50ms\"\nbackoff_max = \"400ms\"\nping_interval = \"1s\"\nstale_after = \"60s\"\n";

/// A VoicePact `payment_update` (broadcast to every connection) numbered `i`.
fn payment(i: usize) -> Value {
    voicepact::wire::payment_update(&format!("ctr-{i}"), "completed", 1.5, 1_717_171_717)
}

/// A Hashi `contract:event` (broadcast to every connection) numbered `i`.
fn contract_event(i: usize) -> Value {
    hashi::wire::event(
        "contract",
        "contract.created",
        json!({"contractId": format!("c-{i}"), "lobbyId": "ABC123",
               "timestamp": "2024-01-15T10:30:00.000Z", "payload": {"n": i}}),
    )
}

/// `n` distinct frames of `sim`'s provider.
fn frames(sim: &Simulator, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| match sim.provider() {
            Provider::VoicePact => payment(i),
            Provider::Voipbin => numbered_call(i),
            Provider::Hashi => contract_event(i),
        })
        .collect()
}

/// Emits every frame; each must be queued to exactly one connection.
async fn emit_all(sim: &Simulator, frames: Vec<Value>) {
    for f in frames {
        assert_eq!(sim.emit(f).await, 1, "{:?}: one connection", sim.provider());
    }
}

/// True once the upstream has begun to close (or, on code that does not drain, has stopped).
fn closing(s: &UpstreamStatus) -> bool {
    matches!(s.state.as_str(), "draining" | "stopped")
}

/// The envelopes in the journal whose `provider` is `provider`.
async fn journalled(bridge: &Bridge, provider: &str) -> Vec<Value> {
    let head = bridge.store().position().await.expect("position").head;
    let mut out = Vec::new();
    let mut from = 1;
    while from <= head {
        let batch = bridge.store().read_from(from, 1000).await.expect("read");
        let Some(last) = batch.last() else { break };
        from = last.seq + 1;
        for e in batch {
            let v: Value = serde_json::from_slice(&e.bytes).expect("stored envelope");
            if v["provider"] == provider {
                out.push(v);
            }
        }
    }
    out
}

/// Distinct ids of `envelopes`, asserting none repeats.
fn distinct_ids(envelopes: &[Value]) -> BTreeSet<String> {
    let ids: BTreeSet<String> = envelopes
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(ids.len(), envelopes.len(), "an id journalled twice");
    ids
}

// ---------------------------------------------------------------------------------------------
// SIGTERM

/// Starts `wsbridge serve` with info logs; the returned flag turns true once the process has
/// logged that it is shutting down (its stderr is echoed to the test's).
fn spawn_serve(config: &Path) -> (Process, watch::Receiver<bool>) {
    let mut child = Process::serve_command(config, "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("bridge starts");
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, rx) = watch::channel(false);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("[bridge] {line}");
            if line.contains("shutting down") {
                tx.send_replace(true);
            }
        }
    });
    (Process(child), rx)
}

/// 150 events pushed by the three providers in a burst, still on their way when SIGTERM
/// arrives: the process exits 0 and every one of them is in the journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_journals_every_event_the_providers_already_sent() {
    let sims = [
        start_sim(Provider::VoicePact).await,
        start_sim(Provider::Voipbin).await,
        start_sim(Provider::Hashi).await,
    ];
    let dir = temp_dir("drain-sigterm");
    let db = dir.join("wsbridge.db");
    let config = dir.join("config.toml");
    let blocks: String = sims
        .iter()
        .enumerate()
        .map(|(i, s)| upstream_block(&format!("u{i}"), s, TIMINGS))
        .collect();
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n[storage]\npath = {db:?}\n\n{blocks}"
        ),
    )
    .expect("write config");
    let (bridge, mut shutting_down) = spawn_serve(&config);
    for s in &sims {
        wait_sim_ready(s, 1).await;
    }

    // The burst: sent by the providers, not yet on the wire.
    for s in &sims {
        s.set_silent(true);
        emit_all(s, frames(s, 50)).await;
    }
    bridge.terminate();
    tokio::time::timeout(DEADLINE, shutting_down.wait_for(|s| *s))
        .await
        .expect("the bridge logs its shutdown")
        .expect("log reader alive");
    for s in &sims {
        s.set_silent(false);
    }

    let (code, _bridge) = bridge.exit_code().await;
    assert_eq!(code, Some(0), "SIGTERM exits 0");
    for s in &sims {
        assert!(
            s.snapshot().client_closes >= 1,
            "{:?}: the bridge closed with a close frame",
            s.provider()
        );
    }
    let ids = journal_ids(&db);
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "an id journalled twice");
    assert_eq!(
        ids.len(),
        150,
        "every event the providers sent before the close answer is journalled"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Reload

fn config_at(db: &Path, grace: &str, blocks: &[String]) -> Config {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"{grace}\"\n[storage]\npath = {:?}\n\n{}",
        db.display().to_string(),
        blocks.concat()
    );
    Config::from_toml(&text, |_| None, false).unwrap_or_else(|e| panic!("test config: {e}\n{text}"))
}

/// A reload removes an upstream right after a burst: everything the provider had sent it is
/// journalled, and the kept upstream is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_removing_an_upstream_journals_what_it_was_sent() {
    let vb = start_sim(Provider::Voipbin).await;
    let hs = start_sim(Provider::Hashi).await;
    let db = temp_dir("drain-reload").join("wsbridge.db");
    let kept = upstream_block("hs", &hs, TIMINGS);
    let before = config_at(
        &db,
        "5s",
        &[upstream_block("vb", &vb, TIMINGS), kept.clone()],
    );
    let after = config_at(&db, "5s", &[kept]);
    let (bridge, mut rx) = start_bridge(&before).await;
    wait_sim_ready(&vb, 1).await;
    let removed = bridge.upstream("vb").expect("vb runs");

    vb.set_silent(true);
    emit_all(&vb, frames(&vb, 100)).await;
    let release = async {
        wait_status(&removed, "closing", closing).await;
        vb.set_silent(false);
    };
    let (report, ()) = tokio::time::timeout(DEADLINE, async {
        tokio::join!(bridge.reload(after), release)
    })
    .await
    .expect("the reload ends in time");
    let report = report.expect("reload applies");
    assert!(
        report.applied.iter().any(|c| c.contains("vb: removed")),
        "{report:?}"
    );
    assert_eq!(removed.status().state, UpstreamState::Stopped);
    assert_eq!(vb.snapshot().client_closes, 1, "closed with a close frame");

    // Queued to ingest by the drain; journalled (then published) right after.
    for i in 0..100 {
        next_matching(
            &mut rx,
            &format!("event {i} of the removed upstream"),
            |p| p.envelope.provider == "voipbin",
        )
        .await;
    }
    let got = journalled(&bridge, "voipbin").await;
    assert_eq!(
        distinct_ids(&got).len(),
        100,
        "every event sent to the removed upstream is journalled"
    );
    assert_eq!(
        bridge.upstream("hs").expect("hs kept").status().state,
        UpstreamState::Subscribed
    );
    bridge.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Lease handover (NATS)

/// Two instances on NATS, `ownership = "lease"`: the holder is shut down right after a burst.
/// Every event the provider sent to the old holder is journalled (by the old holder, which
/// drains before it releases the lease), and the next holder connects only after that drain:
/// the provider never sees two connections at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_handover_loses_nothing_sent_to_the_old_holder() {
    let prefix = unique_prefix("drainlease");
    let vp = start_sim(Provider::VoicePact).await;
    let urls = [SHARED_NATS.to_string()];
    let blocks = [upstream_block("vp", &vp, TIMINGS)];
    // A grace far longer than the checks made while the old holder drains.
    let text = nats_config_text(&blocks, &urls, &prefix, "lease_ttl = \"2s\"\n")
        .replace("shutdown_grace = \"2s\"", "shutdown_grace = \"30s\"");
    let cfg = Config::from_toml(&text, |_| None, false).expect("config");
    let (old, _rx) = start_bridge(&cfg).await;
    let new = Bridge::start(&cfg).await.expect("second instance starts");
    let old_vp = old.upstream("vp").expect("vp");
    let new_vp = new.upstream("vp").expect("vp");
    wait_status(&new_vp, "standby", |s| s.state == UpstreamState::Standby).await;
    wait_sim_ready(&vp, 1).await;

    // Most connections the provider ever had open at once, until the new holder's arrives.
    let most = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (vp, most) = (vp.clone(), most.clone());
        tokio::spawn(async move {
            vp.wait_until(DEADLINE * 3, |s| {
                most.fetch_max(s.connections.len(), Ordering::Relaxed);
                s.accepted >= 2
            })
            .await
        })
    };

    vp.set_silent(true);
    emit_all(&vp, frames(&vp, 100)).await;
    let release = async {
        wait_status(&old_vp, "closing", closing).await;
        // The old holder is still draining (the provider has not answered yet): it still
        // holds the lease, so the other instance is still standing by.
        assert!(
            lease_held(&prefix, "vp").await,
            "the lease was released before the drain ended"
        );
        assert_eq!(new_vp.status().state, UpstreamState::Standby);
        vp.set_silent(false);
    };
    tokio::time::timeout(DEADLINE, async { tokio::join!(old.shutdown(), release) })
        .await
        .expect("the old holder stops in time");
    wait_subscribed(&new_vp).await;
    watcher
        .await
        .expect("watcher")
        .expect("the new holder connected");
    assert_eq!(
        most.load(Ordering::Relaxed),
        1,
        "the new holder connected while the old one was still connected"
    );
    assert_eq!(vp.snapshot().client_closes, 1, "closed with a close frame");

    let got = journalled(&new, "voicepact").await;
    assert_eq!(
        distinct_ids(&got).len(),
        100,
        "every event sent to the old holder is journalled"
    );
    // The new holder carries on.
    let mut rx = new.subscribe();
    wait_sim_ready(&vp, 1).await;
    emit_all(&vp, vec![payment(1000)]).await;
    next_matching(&mut rx, "an event via the new holder", |p| {
        p.envelope.provider == "voicepact"
    })
    .await;
    new.shutdown().await;
    cleanup(SHARED_NATS, &prefix).await;
}

/// Whether the lease of `upstream` is held: the last value of its key in the lease bucket (a
/// stream, see `src/storage/nats/lease.rs`) is a holder's, not the empty one a release writes.
async fn lease_held(prefix: &str, upstream: &str) -> bool {
    let client = async_nats::connect(SHARED_NATS).await.expect("nats");
    let js = async_nats::jetstream::new(client);
    let stream = js
        .get_stream(format!("{prefix}_leases"))
        .await
        .expect("lease bucket");
    match stream
        .get_last_raw_message_by_subject(&format!("{prefix}.leases.upstream.{upstream}"))
        .await
    {
        Ok(m) => !m.payload.is_empty(),
        Err(_) => false,
    }
}

// ---------------------------------------------------------------------------------------------
// A provider that never answers

/// A provider that never answers the close (hung) holds shutdown no longer than
/// `server.shutdown_grace`: the drain is cut short, counted and the bridge stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_never_answers_the_close_holds_shutdown_only_for_the_grace() {
    let vb = start_sim(Provider::Voipbin).await;
    let db = temp_dir("drain-hung").join("wsbridge.db");
    let cfg = config_at(&db, "300ms", &[upstream_block("vb", &vb, TIMINGS)]);
    let (bridge, _rx) = start_bridge(&cfg).await;
    wait_sim_ready(&vb, 1).await;
    let u = bridge.upstream("vb").expect("vb");
    let metrics = metrics_text(&bridge).await;
    assert!(
        metrics.contains("# HELP wsbridge_upstream_drain_timeouts")
            && metrics.contains("wsbridge_upstream_drain_timeouts_total{upstream=\"vb\"} 0"),
        "the counter is exposed with its help text:\n{metrics}"
    );
    vb.set_silent(true);
    emit_all(&vb, frames(&vb, 10)).await;
    tokio::time::timeout(DEADLINE, bridge.shutdown())
        .await
        .expect("shutdown is bounded by the grace");
    assert_eq!(u.status().state, UpstreamState::Stopped);
    assert_eq!(
        u.counters().drain_timeouts,
        1,
        "the unanswered close is counted"
    );
}
