//! Storage: the journal of events and the webhook delivery queue, behind one trait.
//!
//! The journal is the bridge's write-ahead log: an event is in the journal before anyone is
//! told about it, so after a crash every journalled event can still be delivered. It is
//! ordered (`seq`, the resume cursor) and deduplicated by event id, within the dedup window
//! (`storage.dedup_window`):
//! - an id whose newest event was received at most the window before this one is a copy of
//!   it (the same frame over another connection or from another instance, a publish retried
//!   after an outage): [`Appended::Duplicate`], nothing stored;
//! - an id seen longer ago than that is a new event (a provider that sent it again, a frame
//!   whose content came back): it is stored under [`renewed_id`], so every id stays unique in
//!   the journal and every instance that stores the same return picks the same id.
//!
//! Repeats of one frame on one connection never reach this rule as copies: the upstream
//! numbers them ([`crate::upstream::occurrence`]).
//!
//! The store, not its caller, assigns `seq` and serialises the envelope (with its `seq`)
//! exactly once; the bytes it returns are the bytes it stored, so a replay sends exactly what
//! the live path sent.
//!
//! The delivery queue holds, per webhook endpoint, every event routed to it that has not been
//! delivered yet (`pending`, with its attempt count and when it is next due) or that has run
//! out of retries (`dead`). Enqueueing happens in the same atomic step as journalling, so an
//! event is never journalled without its deliveries nor the reverse, whatever crashes when.
//! A delivery that was in flight when the process died is still `pending` on restart and is
//! sent again: delivery is at-least-once, and receivers deduplicate by `webhook-id`.
//!
//! A dispatcher takes its endpoint's deliveries through a [`DeliveryQueue`]
//! ([`Store::delivery_queue`]), whose one rule both backends keep: a delivery handed out is
//! held ([`HeldDelivery`]) and never handed out again until it is answered (its outcome
//! recorded) or released (see `queue`).
//!
//! Implementations: [`embedded::EmbeddedStore`] (one SQLite file, the default) and
//! [`nats::NatsStore`] (NATS JetStream, shared by several bridge instances; its delivery
//! queue is the journal itself, read by one durable consumer per endpoint). [`open()`] opens
//! the configured one and gives the bridge what every backend gives it alike: the store, its
//! upstream leases and its live feed ([`Opened`]).
//! Their settings, `[storage]`, are in [`config`].

pub mod config;
pub mod embedded;
pub mod nats;
mod open;
mod queue;

pub use open::{open, LiveFeed, Opened, Publisher};
pub use queue::{DeliveryQueue, HeldDelivery, Holder, QueueOptions};

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::envelope::Envelope;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or created.
    #[error("cannot open the store at {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: rusqlite::Error,
    },
    /// A database operation failed.
    #[error("store {op} failed: {source}")]
    Database {
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: rusqlite::Error,
    },
    /// An envelope could not be serialised (never expected for a JSON tree).
    #[error("envelope could not be serialised: {0}")]
    Serialise(#[from] serde_json::Error),
    /// The store's worker is gone (the bridge is shutting down).
    #[error("the store is closed")]
    Closed,
    /// The position was pruned by retention while it was being read.
    #[error("seq {from} is no longer retained (the journal starts at {first})")]
    NotRetained {
        /// The seq asked for.
        from: u64,
        /// The oldest seq still retained.
        first: u64,
    },
    /// A NATS JetStream operation failed (the server is unreachable, or refused it).
    #[error("NATS: cannot {op}: {source}")]
    Nats {
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The backend does not offer this operation.
    #[error("this storage backend does not support {0}")]
    Unsupported(&'static str),
    /// I/O around the store (creating its directory).
    #[error("store I/O on {path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// The outcome of journalling one event.
#[derive(Clone, Debug, PartialEq)]
pub enum Appended {
    /// Stored at `seq`; `bytes` is the serialised envelope, `seq` included.
    Stored {
        /// The journal position.
        seq: u64,
        /// The envelope as stored and as it must be sent.
        bytes: Bytes,
        /// The envelope itself (its `seq` set), for routing and filtering.
        envelope: Box<Envelope>,
    },
    /// A copy of an event journalled within the dedup window; nothing was stored.
    Duplicate,
    /// The store can never accept this event (a NATS envelope larger than the server's
    /// `max_payload` or refused by the stream, an embedded write that fails for this event
    /// alone); it was dropped and logged so that the events after it are not held back
    /// forever by a retry that cannot succeed.
    Rejected,
}

/// One journalled event as read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEvent {
    /// The journal position.
    pub seq: u64,
    /// The event id.
    pub id: String,
    /// The serialised envelope, byte for byte as first published.
    pub bytes: Bytes,
}

/// The id of an event whose id `id` was last journalled at `seq` longer than the dedup
/// window ago: the provider (or a frame's content) came back, and it is a new event, yet every
/// id must stay unique in the journal. 32 hex digits of `SHA-256("renewed" NUL id NUL seq)`:
/// every instance that sees the same return computes the same id, so their copies still
/// collapse into one event.
pub fn renewed_id(id: &str, seq: u64) -> String {
    wsbridge_adapters::derived_id("renewed", id, seq)
}

/// How many of `page`'s events fit `max_bytes` (at least one when the page has any).
pub fn page_len(page: &[StoredEvent], max_bytes: usize) -> usize {
    let mut bytes = 0usize;
    for (i, e) in page.iter().enumerate() {
        bytes = bytes.saturating_add(e.bytes.len());
        if i > 0 && bytes > max_bytes {
            return i;
        }
    }
    page.len()
}

/// Where the journal stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalPosition {
    /// Identifies this journal: changes when the store is recreated, so a cursor from an
    /// older store is recognised instead of silently meaning something else.
    pub epoch: String,
    /// The newest seq stored (0 when empty).
    pub head: u64,
    /// The oldest seq still retained (head + 1 when empty).
    pub first: u64,
}

/// An event to journal, with the webhook endpoints the router sent it to.
#[derive(Clone, Debug)]
pub struct NewEvent {
    /// The envelope (its `seq` is assigned by the store).
    pub envelope: Envelope,
    /// Endpoint names that get a delivery if the event is new.
    pub targets: Vec<Arc<str>>,
    /// `envelope` serialised without its seq ([`Envelope::to_unsequenced`]), by ingest, so
    /// that the journal's writer only appends the seq ([`crate::envelope::with_seq`]); it
    /// serialises again only for an event it stores under a renewed id.
    pub unsequenced: Bytes,
}

impl NewEvent {
    /// `envelope` for `targets`, serialised here.
    pub fn new(envelope: Envelope, targets: Vec<Arc<str>>) -> Result<NewEvent, serde_json::Error> {
        Ok(NewEvent {
            unsequenced: envelope.to_unsequenced()?,
            envelope,
            targets,
        })
    }
}

/// One delivery that is due now (handed out inside a [`HeldDelivery`]).
#[derive(Clone, Debug, Default)]
pub struct DueDelivery {
    /// The event's journal position.
    pub seq: u64,
    /// The event id (the `webhook-id`).
    pub id: String,
    /// The serialised envelope, exactly as journalled.
    pub bytes: Bytes,
    /// Attempts made so far.
    pub attempts: u32,
}

/// What one attempt to deliver produced.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AttemptRecord {
    /// When the attempt started (unix ms).
    #[serde(rename = "at", serialize_with = "ser_ms_rfc3339")]
    pub at_ms: i64,
    /// The HTTP status, when there was a response.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// What went wrong without a response (connect error, timeout), or why the status failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How long the attempt took.
    pub duration_ms: u64,
}

fn ser_ms_rfc3339<S: serde::Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
    let t = chrono::DateTime::from_timestamp_millis(*ms).unwrap_or_default();
    s.serialize_str(&t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

/// What happens to a delivery after an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextStep {
    /// Delivered: the delivery and its attempts are removed.
    Delivered,
    /// Try again at this unix ms.
    RetryAt(i64),
    /// Try again at this unix ms without using up a step of the retry schedule: the
    /// endpoint, not the event, is the problem (410 Gone disables it until re-enabled).
    HoldUntil(i64),
    /// Out of retries: moved to the endpoint's dead-letter list.
    Dead,
}

/// A delivery's state as listed by the admin API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    /// Waiting for its first or next attempt (or in flight).
    Pending,
    /// Dead-lettered.
    Dead,
}

/// A delivery with its history, for the admin API.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeliveryInfo {
    /// The event id.
    pub id: String,
    /// The event's journal position.
    pub seq: u64,
    /// Pending or dead.
    pub state: DeliveryState,
    /// When the next attempt is due (pending only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt: Option<String>,
    /// Every attempt so far, oldest first.
    pub attempts: Vec<AttemptRecord>,
}

/// How many deliveries an endpoint has in each state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeliveryCounts {
    /// Pending (including in flight).
    pub pending: u64,
    /// Dead-lettered.
    pub dead: u64,
}

/// Which events an admin replay re-queues for an endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplaySelection {
    /// Every dead letter of the endpoint.
    Dead,
    /// These event ids (dead letters, or any journalled event).
    Ids(Vec<String>),
    /// Journal positions `from..=to`.
    Seqs {
        /// First seq.
        from: u64,
        /// Last seq.
        to: u64,
    },
    /// Events received within `[since, until]` (unix ms).
    Received {
        /// Start (unix ms).
        since_ms: i64,
        /// End (unix ms).
        until_ms: i64,
    },
}

/// A durable consumer's identity: the consumer (token) that owns it and its name. Two
/// consumers may each have a durable of the same name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DurableKey {
    /// The owning consumer's configured name.
    pub consumer: String,
    /// The durable's name (validated by the downstream side).
    pub name: String,
}

/// A durable consumer's state as the store keeps it: the store does not interpret `state`
/// (the downstream durable runtime writes and reads it), only `keep_from`, so that retention
/// keeps what a durable still owes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedDurable {
    /// Whose durable.
    pub key: DurableKey,
    /// Opaque state, returned byte for byte by [`Store::durables`].
    pub state: Bytes,
    /// The lowest seq the durable may still need (its acked floor + 1, or an older dead
    /// letter): retention prunes no event at or above it while the durable exists.
    pub keep_from: u64,
}

/// The storage seam: the journal, each endpoint's delivery queue ([`Store::delivery_queue`])
/// and the admin side of the queues (listing, counts, replay, disabling). Methods are async so that network-backed
/// stores fit; the embedded store runs its blocking work on its own writer thread and on the
/// blocking pool, never on the async runtime's workers.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Journals `batch` in order, with a pending delivery per target for every new event, in
    /// one atomic, durable step (group commit). One result per input event; a copy within
    /// the dedup window is [`Appended::Duplicate`], and a stored event's envelope carries the
    /// id it was stored under (renewed when its id returned after the window; see the module
    /// doc).
    ///
    /// A store that cannot write now (its disk, its server) keeps retrying with backoff and
    /// reports it through [`Store::unavailable`] rather than failing: the caller waits, and
    /// upstream reads are held back. An event no retry can store is [`Appended::Rejected`].
    /// `Err` means the store is closed.
    async fn append(&self, batch: Vec<NewEvent>) -> Result<Vec<Appended>, StoreError>;

    /// Up to `limit` events with `seq >= from`, in order.
    async fn read_from(&self, from: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError>;

    /// A replay page: up to `limit` events with `seq >= from`, in order, stopping before the
    /// event that would take the page's bytes past `max_bytes` (the first event is returned
    /// whatever its size, so a page always makes progress). Consumer replays read through
    /// this, so their memory is bounded by the caller's budget; a store with a separate read
    /// path for replays uses it here, so that replays never hold up webhook and readiness
    /// queries.
    async fn read_page(
        &self,
        from: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let mut page = self.read_from(from, limit).await?;
        page.truncate(page_len(&page, max_bytes));
        Ok(page)
    }

    /// The journal's epoch, head and first retained seq.
    async fn position(&self) -> Result<JournalPosition, StoreError>;

    /// `endpoint`'s delivery queue, set up as `options` says (a NATS store creates or updates
    /// the endpoint's consumers). The dispatcher asks once when it starts; asking again for
    /// the same endpoint (a reload) gives a queue that shares what the earlier one holds, so
    /// nothing held is handed out twice across the two.
    async fn delivery_queue(
        &self,
        endpoint: &str,
        options: QueueOptions,
    ) -> Result<Arc<dyn DeliveryQueue>, StoreError>;

    /// Lists up to `limit` deliveries of `endpoint` in `state`, oldest first.
    async fn deliveries(
        &self,
        endpoint: &str,
        state: DeliveryState,
        limit: usize,
    ) -> Result<Vec<DeliveryInfo>, StoreError>;

    /// Pending and dead counts of `endpoint`.
    async fn counts(&self, endpoint: &str) -> Result<DeliveryCounts, StoreError>;

    /// Re-queues the selected events for `endpoint`, due now, attempts reset; returns how many.
    async fn replay(&self, endpoint: &str, selection: ReplaySelection) -> Result<u64, StoreError>;

    /// Marks `endpoint` disabled (with the reason) or enabled (`None`); survives restarts.
    async fn set_disabled(&self, endpoint: &str, reason: Option<String>) -> Result<(), StoreError>;

    /// Why `endpoint` is disabled, if it is.
    async fn disabled(&self, endpoint: &str) -> Result<Option<String>, StoreError>;

    /// Every saved durable consumer, in key order (read once when the bridge starts and by
    /// the admin API).
    async fn durables(&self) -> Result<Vec<SavedDurable>, StoreError> {
        Err(StoreError::Unsupported("durable consumers"))
    }

    /// Saves a durable's state, replacing what was saved before; the call returns once it is
    /// durable (embedded: batched into the writer's group commits).
    async fn save_durable(&self, _durable: SavedDurable) -> Result<(), StoreError> {
        Err(StoreError::Unsupported("durable consumers"))
    }

    /// Deletes a durable's state; `false` when there was none.
    async fn delete_durable(&self, _key: &DurableKey) -> Result<bool, StoreError> {
        Err(StoreError::Unsupported("durable consumers"))
    }

    /// The seq of the first retained event received at or after `at_ms` (unix ms), or the
    /// head + 1 when there is none (a durable's seek by time).
    async fn seq_at(&self, _at_ms: i64) -> Result<u64, StoreError> {
        Err(StoreError::Unsupported("seek by time"))
    }

    /// True when other processes share this store, so state another instance may change
    /// (an endpoint disabled by a 410 elsewhere) must be re-read instead of cached for good.
    fn shared(&self) -> bool {
        false
    }

    /// Why the store cannot serve now, when it knows without asking (a networked store whose
    /// connection is down, or whose writes fail): readiness fails at once instead of after a
    /// timeout, and metrics skip questions that would only time out. `None` when it can.
    fn unavailable(&self) -> Option<String> {
        None
    }

    /// Whether the store's connection to its server is up; `None` for a store without one
    /// (for health and metrics).
    fn connected(&self) -> Option<bool> {
        None
    }

    /// Bytes the store occupies on disk, where that is known (for metrics).
    fn size_bytes(&self) -> Option<u64> {
        None
    }

    /// Journal writes that failed and were retried since the store opened (the store's
    /// fault, not an event's: a full disk, an unwritable file, a NATS outage), where the
    /// store counts them (for metrics: a failing store is visible before readiness is asked).
    fn write_failures(&self) -> Option<u64> {
        None
    }
}
