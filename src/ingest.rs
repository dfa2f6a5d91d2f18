//! Ingest: the one place where events from every upstream meet, are journalled (which
//! deduplicates them and gives them their `seq` and their one serialisation) and are
//! published.
//!
//! Upstream supervisors push [`Envelope`]s ([`Queued`]) into one bounded queue; a task drains it in
//! batches, checks, serialises (once: the journal appends the seq to those bytes) and routes
//! each, and hands the batch to a committer task, which gives it to the journal to commit in
//! one transaction (group commit), in order. Only then is anything published: write-ahead
//! (docs/architecture.md, "Invariants").
//! An event whose dialect has a `reply` carries it ([`Reply`]): the committer hands it back
//! to the event's connection once the event is journalled (or found already journalled), so
//! the provider's acknowledgement means "durable".
//! Ingest hands each event it journalled to the backend's live feed
//! ([`crate::storage::Publisher`]): the embedded backend publishes it to the ring; with NATS
//! the journal's tail feeds the ring (it also carries other instances' events), so ingest's
//! side does nothing. Ingest does not ask which backend it has.
//! A copy of an event journalled within `storage.dedup_window` is counted and dropped: the
//! same VoicePact `payment_update` reaching two `client_id` connections, or a frame re-sent
//! right after a reconnect, is one event (README, "Event identity: what is one event and
//! what is two").
//!
//! Backpressure: when the ingest queue is full, supervisors stop reading their sockets; when
//! the journal is slow, or cannot write at all (a full disk, a NATS outage: the store retries
//! with backoff and `/readyz` says why), this task waits for it, and the queue fills. The
//! publish side is a bounded broadcast ring: a subscriber that falls more than [`PUBLISH_CAPACITY`] events
//! behind is told how many it lost (`Lagged`) and must resume from the journal; nobody can
//! make ingest buffer without bound.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, error, warn};

use crate::envelope::{sequenced_len, Envelope, Published};
use crate::routing::Router;
use crate::storage::{Appended, NewEvent, Publisher, Store, StoreError};
use crate::traces::Traces;

/// An event on its way to the journal, with the frame its provider waits for once it is
/// journalled (a dialect's `reply`), if any.
#[derive(Debug)]
pub struct Queued {
    /// The event.
    pub envelope: Envelope,
    /// Sent back on the event's connection once the event is journalled (or found already
    /// journalled); never for an event the journal refused.
    pub reply: Option<Reply>,
}

impl From<Envelope> for Queued {
    fn from(envelope: Envelope) -> Queued {
        Queued {
            envelope,
            reply: None,
        }
    }
}

/// A frame for the provider, handed back to the connection an event came from after the
/// journal commit: acknowledging an event only once it is durable makes the whole path
/// at-least-once for providers that redeliver what was not acknowledged.
#[derive(Debug)]
pub struct Reply {
    /// The frame's text.
    pub frame: String,
    /// The connection's bounded reply queue; closed once the connection is gone.
    pub to: mpsc::Sender<String>,
    /// Counted when the frame cannot be handed over (the connection is gone or its queue is
    /// full): the provider then redelivers the event, which the journal deduplicates.
    pub dropped: Arc<AtomicU64>,
}

impl Reply {
    /// Hands the frame to its connection without waiting: the committer never blocks on one
    /// connection.
    fn hand_over(self) {
        if let Err(e) = self.to.try_send(self.frame) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            let why = match e {
                mpsc::error::TrySendError::Full(_) => "its reply queue is full",
                mpsc::error::TrySendError::Closed(_) => "its connection is gone",
            };
            debug!(
                reason = why,
                "reply to the provider dropped; it will redeliver"
            );
        }
    }
}

/// Capacity of the queue from the supervisors to ingest.
pub const INGEST_QUEUE: usize = 4096;
/// Capacity of the publish ring.
pub const PUBLISH_CAPACITY: usize = 8192;
/// Most events taken from the queue per batch.
const BATCH: usize = 512;
/// Most events between a supervisor and the journal commit: the ingest queue and the
/// prepared batches. A connection's reply queue holds as many, so that a reply is dropped
/// only when its connection is gone or stopped reading it.
pub const IN_FLIGHT: usize = INGEST_QUEUE + PIPELINE * BATCH;

/// Ingest counters.
#[derive(Debug, Default)]
pub struct IngestStats {
    received: AtomicU64,
    duplicates: AtomicU64,
    published: AtomicU64,
    rejected: AtomicU64,
    too_large: AtomicU64,
}

/// Plain-number copy of [`IngestStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct IngestSnapshot {
    /// Envelopes taken from the queue.
    pub received: u64,
    /// Envelopes dropped because their id was already seen.
    pub duplicates: u64,
    /// Envelopes given a seq and published.
    pub published: u64,
    /// Envelopes the store can never accept (too large for NATS, refused by the stream, an
    /// embedded write that fails for that event alone), dropped: counted so an operator
    /// sees the loss without reading logs.
    pub rejected: u64,
    /// Envelopes larger than `limits.max_event_bytes`, refused before the journal (an event
    /// the bridge journals must be deliverable on every path), logged and counted.
    pub too_large: u64,
}

impl IngestStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> IngestSnapshot {
        IngestSnapshot {
            received: self.received.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            published: self.published.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            too_large: self.too_large.load(Ordering::Relaxed),
        }
    }
}

/// Whoever delivers what ingest routed to webhook endpoints: told, after each commit, which
/// endpoints got new deliveries. Ingest needs only this of the delivery side (implemented by
/// [`crate::delivery::DeliveryService`]), so it does not depend on how delivery runs.
pub trait Wake: Send + Sync {
    /// `endpoint` has new deliveries in the store.
    fn wake(&self, endpoint: &str);
}

/// Where ingest sends what it journalled.
pub struct Sinks {
    /// The routing rules: which webhook endpoints get an event (swapped by hot reload).
    pub router: Arc<arc_swap::ArcSwap<Router>>,
    /// The webhook dispatchers, woken for each endpoint that got new deliveries.
    pub wake: Arc<dyn Wake>,
    /// The live stream's ingest side ([`crate::storage::LiveFeed::start`]): told of every
    /// event journalled here; whether it publishes them or the store feeds the stream itself
    /// is the backend's business.
    pub publish: Publisher,
    /// `limits.max_event_bytes`: a larger envelope is refused here, before the journal.
    pub max_event_bytes: usize,
    /// Traces (`[telemetry]`): each event's receive and journal spans; `None`: off.
    pub traces: Option<Traces>,
}

/// Starts the ingest task. It ends when every sender of `queue` is gone and what they queued
/// is journalled and published.
///
/// Two stages, so that preparing a batch (checking, serialising and routing it) overlaps with
/// journalling the one before: this task prepares, and a committer task journals, publishes
/// and wakes delivery, in order. At most [`PIPELINE`] prepared batches wait for the committer,
/// which journals whatever has gathered as one append (a larger transaction when the journal
/// is the slower side).
pub fn spawn(
    mut queue: mpsc::Receiver<Queued>,
    store: Arc<dyn Store>,
    sinks: Sinks,
    stats: Arc<IngestStats>,
) -> JoinHandle<()> {
    let Sinks {
        router,
        wake,
        publish,
        max_event_bytes,
        traces,
    } = sinks;
    let (prepared, to_commit) = mpsc::channel(PIPELINE);
    let committer = tokio::spawn(commit(
        to_commit,
        store,
        publish,
        wake,
        stats.clone(),
        traces,
    ));
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(BATCH);
        while queue.recv_many(&mut batch, BATCH).await > 0 {
            stats
                .received
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            // Routing happens before journalling so that the event and its deliveries are
            // committed together: after a crash, nothing journalled lacks its deliveries.
            let router = router.load();
            let mut events = Vec::with_capacity(batch.len());
            let mut replies = Vec::new();
            for Queued { envelope, reply } in batch.drain(..) {
                let Some(unsequenced) = admit(&envelope, max_event_bytes, &stats) else {
                    continue;
                };
                if let Some(reply) = reply {
                    replies.push((events.len(), reply));
                }
                events.push(NewEvent {
                    targets: router.targets(&envelope),
                    envelope,
                    unsequenced,
                });
            }
            if events.is_empty() {
                continue;
            }
            // The committer is gone only when the journal closed.
            if prepared.send(Prepared { events, replies }).await.is_err() {
                return;
            }
        }
        drop(prepared);
        let _ = committer.await;
    })
}

/// Prepared batches the committer may have waiting (each up to [`BATCH`] events).
pub const PIPELINE: usize = 4;

/// A batch ready to journal, with the replies of those of its events that have one, by
/// their position in `events` (ascending): most events have none.
struct Prepared {
    events: Vec<NewEvent>,
    replies: Vec<(usize, Reply)>,
}

/// The committer: journals what ingest prepared, in order, then publishes it and wakes the
/// endpoints that got deliveries.
async fn commit(
    mut prepared: mpsc::Receiver<Prepared>,
    store: Arc<dyn Store>,
    publish: Publisher,
    wake: Arc<dyn Wake>,
    stats: Arc<IngestStats>,
    traces: Option<Traces>,
) {
    let mut batches = Vec::with_capacity(PIPELINE);
    let mut woken: Vec<Arc<str>> = Vec::new();
    while prepared.recv_many(&mut batches, PIPELINE).await > 0 {
        let mut events: Vec<NewEvent> = Vec::new();
        let mut replies: Vec<(usize, Reply)> = Vec::new();
        for b in batches.drain(..) {
            let offset = events.len();
            replies.extend(b.replies.into_iter().map(|(at, r)| (offset + at, r)));
            events.extend(b.events);
        }
        for target in events.iter().flat_map(|n| n.targets.iter()) {
            if !woken.contains(target) {
                woken.push(target.clone());
            }
        }
        let n = events.len() as u64;
        let traced = traces.as_ref().map(|_| trace::before_append(&events));
        let appended = match store.append(events).await {
            Ok(a) => a,
            // Closed: the bridge is shutting down (or the store's writer is gone, which
            // readiness reports); nothing can be journalled any more.
            Err(StoreError::Closed) => {
                error!(events = n, "journal closed; ingest stops");
                return;
            }
            // Stores retry their own failures (readiness says so meanwhile) and reject events
            // they can never take one by one, so this is not expected; should it happen,
            // these events are counted as rejected rather than stopping ingest for every
            // later event.
            Err(e) => {
                error!(error = %e, events = n, "journal refused a batch; its events are rejected");
                stats.rejected.fetch_add(n, Ordering::Relaxed);
                woken.clear();
                continue;
            }
        };
        if let (Some(t), Some(traced)) = (&traces, traced) {
            trace::after_append(t, traced, &appended);
        }
        // One outcome per event, in order; the replies are in the same order.
        let mut replies = replies.into_iter().peekable();
        for (at, outcome) in appended.into_iter().enumerate() {
            let reply = replies.next_if(|(r, _)| *r == at).map(|(_, r)| r);
            match outcome {
                Appended::Stored {
                    bytes, envelope, ..
                } => {
                    stats.published.fetch_add(1, Ordering::Relaxed);
                    publish.journalled(Published::new(*envelope, bytes));
                    if let Some(r) = reply {
                        r.hand_over();
                    }
                }
                Appended::Duplicate => {
                    stats.duplicates.fetch_add(1, Ordering::Relaxed);
                    debug!("duplicate event dropped");
                    // Already journalled: the provider's redelivery is acknowledged too.
                    if let Some(r) = reply {
                        r.hand_over();
                    }
                }
                Appended::Rejected => {
                    // The store has logged which event and why. Not acknowledged: the
                    // provider keeps it (and may redeliver it).
                    stats.rejected.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        for endpoint in woken.drain(..) {
            wake.wake(&endpoint);
        }
    }
}

/// The envelope serialised (without its seq, which the journal appends), if it fits
/// `limits.max_event_bytes`. One that does not is refused here, so that nothing is journalled
/// that some path (a `/v1/ws` frame, a webhook body, the NATS journal) could not carry: it is
/// logged with what identifies it, counted, and the events after it go on. Serialising here,
/// on ingest's task, keeps that work off the journal's single writer.
fn admit(envelope: &Envelope, max_event_bytes: usize, stats: &IngestStats) -> Option<Bytes> {
    let unsequenced = match envelope.to_unsequenced() {
        Ok(bytes) => bytes,
        Err(e) => {
            // A JSON tree always serialises; should it not, the journal could not store it.
            error!(source = %envelope.source, event_id = %envelope.id, error = %e,
                "event cannot be serialised; refused (not journalled)");
            stats.rejected.fetch_add(1, Ordering::Relaxed);
            return None;
        }
    };
    let size = sequenced_len(unsequenced.len());
    if size <= max_event_bytes {
        return Some(unsequenced);
    }
    stats.too_large.fetch_add(1, Ordering::Relaxed);
    warn!(
        source = %envelope.source,
        event_id = %envelope.id,
        event_type = %envelope.event_type,
        size,
        max_event_bytes,
        "event larger than limits.max_event_bytes; refused (not journalled)"
    );
    None
}

/// The receive and journal spans of a committed batch (only with `[telemetry]` on).
mod trace {
    use std::time::{Duration, SystemTime};

    use opentelemetry::KeyValue;

    use crate::storage::{Appended, NewEvent};
    use crate::traces::{EventTrace, Traces};

    /// What is known of an event before the append.
    pub(super) struct Pending {
        ids: EventTrace,
        received: Option<SystemTime>,
        attributes: Vec<KeyValue>,
    }

    /// Before the append: each event's ids and what its receive span says, and when the
    /// append started.
    pub(super) fn before_append(events: &[NewEvent]) -> (SystemTime, Vec<Pending>) {
        let pending = events
            .iter()
            .map(|n| {
                let e = &n.envelope;
                Pending {
                    ids: EventTrace::of(&e.source, &e.id),
                    received: e
                        .received_ms()
                        .and_then(|ms| u64::try_from(ms).ok())
                        .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms)),
                    attributes: vec![
                        KeyValue::new("wsbridge.provider", e.provider.clone()),
                        KeyValue::new("wsbridge.source", e.source.clone()),
                        KeyValue::new("wsbridge.event_id", e.id.clone()),
                        KeyValue::new("wsbridge.event_type", e.event_type.clone()),
                    ],
                }
            })
            .collect();
        (SystemTime::now(), pending)
    }

    /// After it: each event's receive span (`recvtime` until the append started) and journal
    /// span, with its seq or what happened to it. A duplicate's copy is a receive span under
    /// the original's (it has the original's identity, so the derived ids are taken).
    pub(super) fn after_append(
        traces: &Traces,
        (started, pending): (SystemTime, Vec<Pending>),
        appended: &[Appended],
    ) {
        for (p, outcome) in pending.into_iter().zip(appended) {
            let outcome = match outcome {
                Appended::Stored { seq, .. } => {
                    KeyValue::new("wsbridge.seq", i64::try_from(*seq).unwrap_or(i64::MAX))
                }
                Appended::Duplicate => {
                    let mut attributes = p.attributes;
                    attributes.push(KeyValue::new("wsbridge.outcome", "duplicate"));
                    traces.received(&p.ids, p.received, started, attributes, true);
                    continue;
                }
                Appended::Rejected => KeyValue::new("wsbridge.outcome", "rejected"),
            };
            traces.received(&p.ids, p.received, started, p.attributes, false);
            traces.journalled(&p.ids, started, vec![outcome]);
        }
    }
}
