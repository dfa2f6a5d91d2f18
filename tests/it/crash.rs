//! Crash safety and graceful shutdown: the bridge binary is stopped with SIGKILL, or with
//! SIGTERM, while events stream in and deliveries are in flight, then restarted on the same
//! database file. Every event that was journalled is delivered at least once, nothing is
//! delivered that was not journalled first, and the journal holds each id once. SIGTERM also
//! exits 0 and closes consumers with 1001 "going away".

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::receiver::{Answer, Receiver};
use crate::common::*;
use futures_util::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use wsbridge_adapters::{voipbin, Provider};

fn spawn_bridge(config: &Path) -> Process {
    let child = Process::serve_command(config, "warn")
        .stderr(Stdio::inherit())
        .spawn()
        .expect("bridge starts");
    Process(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_nothing_that_was_journalled() {
    interrupted_mid_stream(Stop::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_0_closes_consumers_and_loses_nothing() {
    interrupted_mid_stream(Stop::Term).await;
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    Kill,
    Term,
}

async fn interrupted_mid_stream(stop: Stop) {
    let vb = start_sim(Provider::Voipbin).await;
    // Every third request fails once, so retries are in flight when the kill lands.
    let script = (0..60)
        .map(|i| Answer::status(if i % 3 == 0 { 500 } else { 200 }))
        .collect();
    let rx = Receiver::start(script, Answer::status(200)).await;
    let dir = temp_dir("crash");
    let addr = free_addr();
    let db = dir.join("wsbridge.db");
    let config = dir.join("config.toml");
    let text = format!(
        "[server]\nlisten = \"{addr}\"\nshutdown_grace = \"2s\"\n[storage]\npath = {db:?}\n\n{}\n\
         [[consumers]]\nname = \"watcher\"\ntoken = \"watcher-token\"\n\n\
         [[webhooks]]\nname = \"crm\"\nurl = \"{}\"\nsecrets = [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]\n\
         allow_private = true\nretry = [\"100ms\", \"100ms\", \"200ms\", \"400ms\", \"800ms\"]\nmax_in_flight = 4\n\n\
         [[routes]]\nname = \"all\"\nproviders = [\"voipbin\"]\nto = [\"crm\"]\n",
        upstream_block("vb", &vb, FAST),
        rx.url()
    );
    std::fs::write(&config, text).expect("write config");

    let mut bridge = spawn_bridge(&config);
    wait_sim_ready(&vb, 1).await;

    // Stream events continuously from another task.
    let (streaming, emitter) = stream(&vb, "k");

    // A consumer connected across the stop.
    let url = format!("ws://{addr}/v1/ws?token=watcher-token");
    let (mut consumer, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("consumer connects");

    // Stop once deliveries are flowing (some done, some retrying).
    rx.wait_for(40, DEADLINE).await;
    match stop {
        Stop::Kill => {
            bridge.0.kill().expect("SIGKILL");
            let _ = bridge.0.wait();
        }
        Stop::Term => {
            bridge.terminate();
            let (code, returned) = bridge.exit_code().await;
            bridge = returned;
            assert_eq!(code, Some(0), "SIGTERM exits 0");
            // The consumer was told the server is going away.
            let close = loop {
                match tokio::time::timeout(DEADLINE, consumer.next())
                    .await
                    .expect("a frame in time")
                {
                    Some(Ok(Message::Close(frame))) => break frame,
                    Some(Ok(_)) => continue,
                    other => panic!("expected a close frame, got {other:?}"),
                }
            };
            assert_eq!(close.map(|f| u16::from(f.code)), Some(1001));
        }
    }
    let before_restart: BTreeSet<String> = journal_ids(&db).into_iter().collect();
    assert!(!before_restart.is_empty());

    // Restart on the same file; the stream goes on meanwhile.
    let restarted = spawn_bridge(&config);
    vb.wait_until(DEADLINE, |s| {
        s.accepted >= 2 && s.connections.iter().any(|c| !c.subscriptions.is_empty())
    })
    .await
    .expect("the restarted bridge subscribed");
    rx.wait_until(DEADLINE, "new events after the restart", |r| r.len() > 60)
        .await;
    streaming.store(false, Ordering::Relaxed);
    let emitted = emitter.await.expect("emitter");
    assert!(emitted > 0);

    // Everything journalled (before and after the kill) is delivered at least once.
    let journal = journal_ids(&db);
    let unique = ids_once(&journal);
    assert!(
        before_restart.iter().all(|id| unique.contains(id)),
        "journalled events vanished"
    );
    let delivered = |reqs: &[crate::common::receiver::Received]| -> BTreeSet<String> {
        reqs.iter()
            .filter(|r| r.answered == 200)
            .map(|r| r.header("webhook-id").to_string())
            .collect()
    };
    let final_journal: BTreeSet<String> = journal_ids(&db).into_iter().collect();
    // The emitter ran flat out, so how many events there are to deliver depends on how fast
    // the machine was: a generous deadline, which a healthy run never gets near.
    rx.wait_until(
        Duration::from_secs(120),
        "every journalled event delivered",
        |reqs| {
            let got = delivered(reqs);
            before_restart.iter().all(|id| got.contains(id))
                && final_journal.iter().all(|id| got.contains(id))
        },
    )
    .await;
    // Write-ahead: nothing was delivered that is not in the journal.
    let all_journal: BTreeSet<String> = journal_ids(&db).into_iter().collect();
    for id in delivered(&rx.requests()) {
        assert!(
            all_journal.contains(&id),
            "{id} delivered but never journalled"
        );
    }
    drop(bridge);
    drop(restarted);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The id index's write path (README, "Journal (write-ahead)"): recent ids are held in
/// memory and written to the index table a generation at a time, a slice per commit. A
/// SIGKILL lands while generations are being written out (a small `storage.id_generation`
/// makes every few hundred events one); after the restart, the same frames sent again over
/// the new connection are copies of what was journalled before the kill, whichever part of
/// the index (the table, the slices written, or the memory rebuilt from the journal) holds
/// their ids: the journal keeps each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_the_id_index_is_written_out_keeps_deduplicating() {
    let vb = start_sim(Provider::Voipbin).await;
    let dir = temp_dir("crash-ids");
    let addr = free_addr();
    let db = dir.join("wsbridge.db");
    let config = dir.join("config.toml");
    let text = format!(
        "[server]\nlisten = \"{addr}\"\n[storage]\npath = {db:?}\nid_generation = 1024\n\n{}\n",
        upstream_block("vb", &vb, FAST),
    );
    std::fs::write(&config, text).expect("write config");
    let mut bridge = spawn_bridge(&config);
    wait_sim_ready(&vb, 1).await;
    // Stream until several generations have gone through, then kill mid-stream.
    let (streaming, emitter) = stream(&vb, "g");
    eventually("several id generations journalled", DEADLINE, || async {
        (journal_len(&db) >= 4000).then_some(())
    })
    .await;
    bridge.0.kill().expect("SIGKILL");
    let _ = bridge.0.wait();
    streaming.store(false, Ordering::Relaxed);
    let emitted = emitter.await.expect("emitter");
    let before: BTreeSet<String> = journal_ids(&db).into_iter().collect();
    let (indexed_through, in_table) = index_state(&db);
    assert!(
        indexed_through > 0 && in_table > 0,
        "generations were written out before the kill ({indexed_through}, {in_table})"
    );

    // Restart; send every frame again (copies: the first sight of each on the new
    // connection), then one new frame that marks the end.
    let _restarted = spawn_bridge(&config);
    vb.wait_until(DEADLINE, |s| {
        s.accepted >= 2 && s.connections.iter().any(|c| !c.subscriptions.is_empty())
    })
    .await
    .expect("the restarted bridge subscribed");
    for i in 0..emitted {
        vb.emit(call_frame("g", i)).await;
    }
    vb.emit(call_frame("g", emitted)).await;
    // One connection's frames are journalled in order: once the marker is in, all are.
    let marker = format!("%\"id\":\"g{emitted}\"%");
    eventually("the marker journalled", DEADLINE, || async {
        journal_has(&db, &marker).then_some(())
    })
    .await;
    let journal = journal_ids(&db);
    let unique = ids_once(&journal);
    assert!(before.iter().all(|id| unique.contains(id)));
    // Frames the dead bridge never journalled (read but lost with the process, or never
    // read) are new events now; every frame is in the journal exactly once.
    assert_eq!(journal.len(), emitted as usize + 1, "each frame once");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The set of `journal`'s ids, asserting that each is there once.
fn ids_once(journal: &[String]) -> BTreeSet<&String> {
    let unique: BTreeSet<&String> = journal.iter().collect();
    assert_eq!(
        unique.len(),
        journal.len(),
        "the journal holds a duplicate id"
    );
    unique
}

/// A port free on 127.0.0.1 for a bridge to listen on.
fn free_addr() -> std::net::SocketAddr {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
    probe.local_addr().expect("addr")
}

/// The `i`-th VoIPBIN `call.status` frame of a stream named `tag` (call `<tag><i>`).
fn call_frame(tag: &str, i: u32) -> serde_json::Value {
    voipbin::wire::event(
        "call.status",
        "2024-01-15T10:30:00.000000Z",
        &format!("customer_id:abc123:call:{tag}{i}"),
        json!({"id": format!("{tag}{i}"), "status": "ringing"}),
    )
}

/// Emits [`call_frame`]s of `tag` from `vb` flat out until the flag is cleared; the task
/// answers how many it emitted.
fn stream(
    vb: &wsbridge_adapters::sim::Simulator,
    tag: &'static str,
) -> (Arc<AtomicBool>, tokio::task::JoinHandle<u32>) {
    let streaming = Arc::new(AtomicBool::new(true));
    let emitter = {
        let vb = vb.clone();
        let streaming = streaming.clone();
        tokio::spawn(async move {
            let mut i = 0u32;
            while streaming.load(Ordering::Relaxed) {
                vb.emit(call_frame(tag, i)).await;
                i += 1;
                if i.is_multiple_of(20) {
                    tokio::task::yield_now().await;
                }
            }
            i
        })
    };
    (streaming, emitter)
}

/// Whether an event whose serialised envelope is `LIKE` `pattern` is in the journal at `db`.
fn journal_has(db: &Path, pattern: &str) -> bool {
    let Ok(conn) =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return false;
    };
    conn.query_row(
        "SELECT COUNT(*) FROM events WHERE CAST(body AS TEXT) LIKE ?1",
        [pattern],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n > 0)
    .unwrap_or(false)
}

/// Events in the journal at `db`.
fn journal_len(db: &Path) -> usize {
    let Ok(conn) =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return 0;
    };
    conn.query_row("SELECT COUNT(*) FROM events", [], |r| r.get::<_, i64>(0))
        .map(|n| n as usize)
        .unwrap_or(0)
}

/// The id index's recorded point (`meta.ids_through`) and its table's entries.
fn index_state(db: &Path) -> (i64, i64) {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open journal");
    let through = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'ids_through'",
            [],
            |r| r.get::<_, String>(0),
        )
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let in_table = conn
        .query_row("SELECT COUNT(*) FROM ids", [], |r| r.get(0))
        .expect("count ids");
    (through, in_table)
}
