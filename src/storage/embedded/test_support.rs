//! What the embedded store's unit tests share: envelopes, batches and a fresh database path.

use std::path::PathBuf;
use std::sync::Arc;

use chrono::Utc;
use serde_json::json;
use wsbridge_adapters::DecodedEvent;

use crate::envelope::Envelope;
use crate::storage::{DurableKey, NewEvent, QueueOptions, SavedDurable};

pub(super) fn env(id: &str) -> Envelope {
    Envelope::new(
        DecodedEvent {
            id_from_content: true,
            id: id.into(),
            event_type: "voicepact.payment_update".into(),
            subject: Some("contract/c".into()),
            time: None,
            data: json!({"id": id}),
        },
        "wsbridge://vp",
        "voicepact",
        Utc::now(),
    )
}

pub(super) fn new(id: &str) -> NewEvent {
    NewEvent::new(env(id), vec![]).expect("an envelope serialises")
}

pub(super) fn temp_db(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wsbridge-store-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir.join("nested").join("j.db")
}

pub(super) fn received(id: &str, ago: chrono::Duration, targets: &[&str]) -> NewEvent {
    let mut e = env(id);
    e.recvtime = (Utc::now() - ago).to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    NewEvent::new(e, targets.iter().map(|t| Arc::from(*t)).collect())
        .expect("an envelope serialises")
}

/// An event received at `at_ms` (unix ms).
pub(super) fn received_at_ms(id: &str, at_ms: i64) -> NewEvent {
    let mut e = env(id);
    let at = chrono::DateTime::from_timestamp_millis(at_ms).expect("a time in range");
    e.recvtime = at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    NewEvent::new(e, vec![]).expect("an envelope serialises")
}

/// A durable of `consumer` named `name` with `state`, needing events from `keep_from` on.
pub(super) fn durable(consumer: &str, name: &str, state: &str, keep_from: u64) -> SavedDurable {
    SavedDurable {
        key: DurableKey {
            consumer: consumer.into(),
            name: name.into(),
        },
        state: bytes::Bytes::copy_from_slice(state.as_bytes()),
        keep_from,
    }
}

/// An unordered endpoint's queue settings, holding up to 16 deliveries.
pub(super) fn queue_options() -> QueueOptions {
    QueueOptions {
        ordered: false,
        ack_wait: std::time::Duration::from_secs(60),
        max_held: 16,
    }
}
