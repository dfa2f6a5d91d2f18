//! The live tail: every instance follows the journal stream and publishes what it reads to its
//! local broadcast ring, so WebSocket and SSE consumers on any instance see every event, in
//! stream order, whichever instance journalled it.
//!
//! With the nats backend ingest publishes nothing itself (an event it journalled may be a
//! duplicate of another instance's copy, and the other instances' events never pass through
//! it); the tail is the one source of the live stream. It is this backend's live feed
//! ([`crate::storage::LiveFeed`]), started by the bridge before any upstream. It reads with an ordered consumer, so
//! its sequence has no holes; after an error it reopens from the next sequence it expects.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{self, pull};
use futures_util::StreamExt;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use super::{with_seq, NatsStore};
use crate::envelope::{Envelope, Published};

/// Starts following the journal from `from` (normally head + 1 at start).
pub fn spawn(
    store: Arc<NatsStore>,
    from: u64,
    publish: broadcast::Sender<Arc<Published>>,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        tokio::select! {
            _ = follow(&store, from, &publish) => {}
            _ = shutdown.cancelled() => {}
        }
    })
}

async fn follow(store: &NatsStore, mut next: u64, publish: &broadcast::Sender<Arc<Published>>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match read(store, &mut next, publish).await {
            Ok(()) => backoff = Duration::from_millis(50),
            Err(e) => {
                warn!(error = %e, next_seq = next, "journal tail interrupted; reopening");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

async fn read(
    store: &NatsStore,
    next: &mut u64,
    publish: &broadcast::Sender<Arc<Published>>,
) -> Result<(), async_nats::Error> {
    let stream = store.jetstream().get_stream(&store.names().events).await?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: store.names().events_filter(),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: (*next).max(1),
            },
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    while let Some(m) = messages.next().await {
        let m = m?;
        let seq = m.info()?.stream_sequence;
        if seq < *next {
            continue;
        }
        *next = seq + 1;
        let bytes = with_seq(&m.message.payload, seq);
        // Read without the depth limit of a full parse (see `StoredEnvelope`).
        let envelope: Envelope = match crate::envelope::read_stored(&bytes) {
            Ok(e) => e,
            Err(e) => {
                // Not published: each live feed sees the hole in the seqs, reads it from the
                // journal and tells its consumer (`unreadable_event`), so no gap is silent.
                error!(seq, error = %e, "journalled event unreadable; not published live (feeds report it from the journal)");
                continue;
            }
        };
        // No receiver is not an error: nobody is listening yet.
        let _ = publish.send(Arc::new(Published::new(envelope, bytes)));
    }
    debug!("journal tail ended");
    Ok(())
}
