//! A journal file written by an earlier release opens, is migrated, and keeps its meaning:
//! its events, its deliveries (pending, dead, with their attempts), a disabled endpoint, its
//! epoch, and deduplication against what it holds. The fixture
//! (`tests/journals/journal-0.5.0.db`) was written by wsbridge 0.5.0 through its store
//! API; what it holds is listed in `tests/journals/README.md` and asserted here, so a
//! schema change that forgets a migration, or migrates one table wrongly, fails this test.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::json;
use wsbridge::envelope::Envelope;
use wsbridge::storage::config::Durability;
use wsbridge::storage::embedded::EmbeddedStore;
use wsbridge::storage::{Appended, DeliveryState, DurableKey, NewEvent, SavedDurable, Store};

/// The fixture's epoch, as 0.5.0 created it.
const EPOCH: &str = "fixture-epoch";

/// The envelope the fixture's event `id` was made from, received at `recvtime`.
fn fixture_envelope(id: &str, recvtime: &str) -> Envelope {
    Envelope {
        specversion: "1.0".into(),
        id: id.into(),
        source: "wsbridge://fixture".into(),
        event_type: "voipbin.call.status".into(),
        subject: Some(format!("call/{id}")),
        time: "2026-12-01T10:00:00Z".into(),
        datacontenttype: "application/json".into(),
        data: json!({"id": id, "status": "answered"}),
        provider: "voipbin".into(),
        recvtime: recvtime.into(),
        gap: None,
        seq: None,
    }
}

fn copy_of_fixture() -> PathBuf {
    let from = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/journals/journal-0.5.0.db");
    let to = crate::common::temp_dir("storage-file").join("wsbridge.db");
    std::fs::copy(&from, &to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    to
}

#[tokio::test]
async fn a_journal_written_by_0_5_0_opens_with_its_events_deliveries_and_dedup() {
    let path = copy_of_fixture();
    let store = EmbeddedStore::open(&path, Durability::Normal).expect("the 0.5.0 file opens");

    let pos = store.position().await.expect("position");
    assert_eq!(
        (pos.epoch.as_str(), pos.first, pos.head),
        (EPOCH, 1, 5),
        "{pos:?}"
    );
    let events = store.read_from(1, 100).await.expect("read");
    let ids: Vec<(u64, &str)> = events.iter().map(|e| (e.seq, e.id.as_str())).collect();
    assert_eq!(
        ids,
        [
            (1, "fx-1"),
            (2, "fx-2"),
            (3, "fx-3"),
            (4, "fx-4"),
            (5, wsbridge::storage::renewed_id("fx-2", 2).as_str())
        ],
        "events and ids as written"
    );
    for e in &events {
        let envelope: Envelope = serde_json::from_slice(&e.bytes).expect("an envelope");
        assert_eq!(envelope.seq, Some(e.seq), "the body carries its seq");
        assert_eq!(envelope.id, e.id);
    }

    // Deliveries: hook-a had fx-1 retried once (pending), fx-2 dead after one attempt, fx-3
    // pending untouched; hook-b is disabled.
    let counts = store.counts("hook-a").await.expect("counts");
    assert_eq!((counts.pending, counts.dead), (2, 1), "{counts:?}");
    let pending = store
        .deliveries("hook-a", DeliveryState::Pending, 10)
        .await
        .expect("pending");
    let pending: Vec<(u64, usize)> = pending.iter().map(|d| (d.seq, d.attempts.len())).collect();
    assert_eq!(pending, [(1, 1), (3, 0)]);
    let dead = store
        .deliveries("hook-a", DeliveryState::Dead, 10)
        .await
        .expect("dead");
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].seq, dead[0].id.as_str()), (2, "fx-2"));
    assert_eq!(dead[0].attempts[0].status, Some(500));
    assert_eq!(
        store.disabled("hook-b").await.expect("disabled").as_deref(),
        Some("410 Gone")
    );
    assert_eq!(store.disabled("hook-a").await.expect("enabled"), None);

    // Dedup against the file: fx-3 again a minute after it was received is a copy; fx-2,
    // back after the window again, is renewed against its newest event (seq 5).
    let appended = store
        .append(vec![
            NewEvent::new(
                fixture_envelope("fx-3", "2026-12-01T10:01:00Z"),
                vec![Arc::from("hook-a")],
            )
            .expect("an envelope serialises"),
            NewEvent::new(fixture_envelope("fx-2", "2026-12-01T11:00:00Z"), vec![])
                .expect("an envelope serialises"),
        ])
        .await
        .expect("append");
    assert!(
        matches!(appended[0], Appended::Duplicate),
        "{:?}",
        appended[0]
    );
    match &appended[1] {
        Appended::Stored { envelope, .. } => {
            assert_eq!(envelope.seq, Some(6));
            assert_eq!(envelope.id, wsbridge::storage::renewed_id("fx-2", 5));
        }
        other => panic!("fx-2 after the window is a new event: {other:?}"),
    }
    drop(store);
    // And it opens again, as the current schema now.
    let store = EmbeddedStore::open(&path, Durability::Normal).expect("reopens");
    assert_eq!(store.position().await.expect("position").head, 6);

    // The migrated file keeps durable consumers, as a new one does.
    assert!(store.durables().await.expect("durables").is_empty());
    let saved = SavedDurable {
        key: DurableKey {
            consumer: "all".into(),
            name: "billing".into(),
        },
        state: bytes::Bytes::from_static(b"state"),
        keep_from: 2,
    };
    store.save_durable(saved.clone()).await.expect("save");
    assert_eq!(store.durables().await.expect("durables"), vec![saved]);
    assert_eq!(store.seq_at(0).await.expect("seek"), 1);
}
