//! `--journal N`: wsbridge starts on a journal that already holds N events, to show how ingest
//! holds up as the journal and its id index grow (README, "Benchmarks": "How cost grows").
//! The events go in through the store itself (`EmbeddedStore::append`, batches of 4,096), so
//! the file, its id index and its `meta` are exactly what a bridge that journalled them
//! would leave.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

use serde_json::json;
use wsbridge::adapters::DecodedEvent;
use wsbridge::envelope::Envelope;
use wsbridge::storage::config::Durability;
use wsbridge::storage::embedded::EmbeddedStore;
use wsbridge::storage::{NewEvent, Store};

use crate::Res;

/// Events each wsbridge journal holds before the server starts (`--journal N`; 0 by default).
pub(crate) static JOURNAL: OnceLock<u64> = OnceLock::new();

/// Events per append.
const BATCH: u64 = 4096;

/// Fills the journal at `db` with `n` distinct events shaped like the bench's (a VoIPBIN
/// `call.status` with a content id), on a thread of its own.
pub(crate) fn prefill(db: &Path, n: u64) -> Res<()> {
    let db = db.to_path_buf();
    std::thread::spawn(move || -> Res<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|e| format!("prefill runtime: {e}"))?;
        rt.block_on(async {
            let store = EmbeddedStore::open(&db, Durability::Normal)
                .map_err(|e| format!("prefill open: {e}"))?;
            let t0 = Instant::now();
            let mut done = 0u64;
            while done < n {
                let batch = (done..(done + BATCH).min(n))
                    .map(|i| {
                        NewEvent::new(event(i), Vec::new())
                            .map_err(|e| format!("prefill envelope: {e}"))
                    })
                    .collect::<Res<Vec<_>>>()?;
                done += batch.len() as u64;
                store
                    .append(batch)
                    .await
                    .map_err(|e| format!("prefill append: {e}"))?;
                if done % 1_000_000 < BATCH {
                    eprintln!(
                        "  journal prefill: {done} events ({:.0}/s)",
                        done as f64 / t0.elapsed().as_secs_f64()
                    );
                }
            }
            Ok(())
        })
    })
    .join()
    .map_err(|_| "prefill thread panicked".to_string())?
}

fn event(i: u64) -> Envelope {
    let id = format!("{:016x}{:016x}", rand::random::<u64>(), i);
    Envelope::new(
        DecodedEvent {
            id_from_content: true,
            id,
            event_type: "voipbin.call.status".into(),
            subject: Some(format!("customer_id:abc123:call:p{i}")),
            time: None,
            data: json!({"id": format!("p{i}"), "status": "ringing", "pad": "x".repeat(160)}),
        },
        "wsbridge://prefill",
        "voipbin",
        chrono::Utc::now(),
    )
}
