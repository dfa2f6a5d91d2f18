//! Opening the configured backend: the one place that knows which backends exist.
//!
//! A backend gives the bridge three things, the same three whichever it is, so that the
//! bridge assembles one service without asking which store it has:
//! - the store (journal and delivery queue, [`Store`]);
//! - its upstream leases, when several instances can share the upstreams (NATS only);
//! - its live feed: how journalled events reach the broadcast ring that `/v1/ws` and SSE
//!   consumers read. The embedded store has one writer, this process, so ingest publishes
//!   what it journalled. With NATS, an event this instance journalled may be a copy of
//!   another instance's, and other instances' events never pass through this ingest, so the
//!   journal's tail (`nats::tail`) feeds the ring and ingest publishes nothing.

use std::sync::Arc;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::config::{StorageBackend, StorageConfig};
use super::embedded::{EmbeddedOptions, EmbeddedStore};
use super::nats::lease::Leases;
use super::nats::{tail, NatsStore};
use super::{Store, StoreError};
use crate::envelope::Published;

/// What a backend gives the bridge.
pub struct Opened {
    /// The journal and delivery queue.
    pub store: Arc<dyn Store>,
    /// Upstream leases (`ownership = "lease"`); `None` for a backend no other instance
    /// shares, where this instance always owns its upstreams.
    pub leases: Option<Arc<Leases>>,
    /// How journalled events reach the live stream; started once the ring exists.
    pub live: LiveFeed,
}

/// Opens the backend `config` names. `max_event_bytes` (`limits.max_event_bytes`) is checked
/// against what the backend can store, so that a start that could not journal an admitted
/// event is refused here rather than losing events later.
pub async fn open(config: &StorageConfig, max_event_bytes: usize) -> Result<Opened, StoreError> {
    match config.backend {
        StorageBackend::Embedded => {
            let store = EmbeddedStore::open_with(
                &config.path,
                EmbeddedOptions {
                    durability: config.durability,
                    retention: config.retention,
                    dedup_window: config.dedup_window,
                    id_generation: config.id_generation,
                },
            )?;
            Ok(Opened {
                store,
                leases: None,
                live: LiveFeed(Source::Ingest),
            })
        }
        StorageBackend::Nats => {
            let nats = NatsStore::connect(config).await?;
            nats.check_max_payload(max_event_bytes)?;
            let leases = Arc::new(Leases::open(&nats).await?);
            Ok(Opened {
                store: nats.clone(),
                leases: Some(leases),
                live: LiveFeed(Source::Tail(nats)),
            })
        }
    }
}

/// A backend's way of feeding the live stream, not yet started.
pub struct LiveFeed(Source);

enum Source {
    /// Ingest publishes what it journalled.
    Ingest,
    /// The journal's tail publishes every event journalled from now on, by any instance.
    Tail(Arc<NatsStore>),
}

impl LiveFeed {
    /// Starts feeding `ring` (until `shutdown`), and returns what ingest hands each event it
    /// journalled. Call it before any upstream or consumer can add to or read from the
    /// journal: a tail starts at the journal's head as it is now.
    pub async fn start(
        self,
        ring: &broadcast::Sender<Arc<Published>>,
        shutdown: CancellationToken,
    ) -> Result<Publisher, StoreError> {
        match self.0 {
            Source::Ingest => Ok(Publisher {
                ring: Some(ring.clone()),
            }),
            Source::Tail(nats) => {
                let head = nats.position().await?.head;
                tail::spawn(nats, head.saturating_add(1), ring.clone(), shutdown);
                Ok(Publisher { ring: None })
            }
        }
    }
}

/// Ingest's side of the live feed: told of every event ingest journalled, in journal order,
/// after its commit (write-ahead). It publishes them to the ring when ingest is the feed's
/// source, and ignores them when the store feeds the ring itself.
#[derive(Clone)]
pub struct Publisher {
    ring: Option<broadcast::Sender<Arc<Published>>>,
}

impl Publisher {
    /// `event` was journalled by this instance's ingest.
    pub fn journalled(&self, event: Published) {
        if let Some(ring) = &self.ring {
            // No receiver is not an error: nobody is listening yet.
            let _ = ring.send(Arc::new(event));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Envelope;
    use crate::storage::{Appended, NewEvent};
    use serde_json::json;
    use wsbridge_adapters::DecodedEvent;

    fn envelope(id: &str) -> Envelope {
        Envelope::new(
            DecodedEvent {
                id_from_content: true,
                id: id.into(),
                event_type: "voicepact.payment_update".into(),
                subject: None,
                time: None,
                data: json!({"id": id}),
            },
            "wsbridge://vp",
            "voicepact",
            chrono::Utc::now(),
        )
    }

    /// The embedded backend has no leases, and its live feed is ingest's: what ingest hands
    /// its publisher after the commit reaches the ring, with the bytes the store returned.
    #[tokio::test]
    async fn embedded_feed_publishes_what_ingest_journalled() {
        let dir = std::env::temp_dir().join(format!("wsbridge-open-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let config = StorageConfig {
            path: dir.join("j.db"),
            ..StorageConfig::default()
        };
        let opened = open(&config, 64 * 1024).await.unwrap();
        assert!(opened.leases.is_none());
        let (ring, mut rx) = broadcast::channel(8);
        let publisher = opened
            .live
            .start(&ring, CancellationToken::new())
            .await
            .unwrap();
        let appended = opened
            .store
            .append(vec![
                NewEvent::new(envelope("e1"), vec![]).expect("an envelope serialises")
            ])
            .await
            .unwrap();
        let Some(Appended::Stored {
            seq,
            bytes,
            envelope,
        }) = appended.into_iter().next()
        else {
            panic!("not stored");
        };
        publisher.journalled(Published::new(*envelope, bytes.clone()));
        let got = rx.try_recv().unwrap();
        assert_eq!(got.envelope.seq, Some(seq));
        assert_eq!(got.bytes, bytes);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
