//! Durable consumers: a named cursor the bridge keeps for a consumer, with acknowledgements,
//! shared by every connection subscribed to it (the protocol: README, "Durable
//! subscriptions").
//!
//! Each durable is [`state::DurableState`] (the rules, pure) behind a mutex, plus a *pump*
//! task that runs while connections are attached: it reads matching events from the journal
//! through an ordinary [`Feed`] (replay from the durable's cursor, then live from the shared
//! ring), only as many as the connections may hold unacknowledged, hands them out, fires ack
//! deadlines and saves the state when it changed. Connections act on the state directly
//! (ack, nak, detach) and wake the pump. A save is one [`Store::save_durable`] of the whole
//! state (bounded: acks above the floor are at most what the connections may hold, dead
//! letters at most `limits.durable_dead_letters`), so acks are batched into the store's
//! group commits and a crash loses at most the acks of the last moment, whose events are
//! then delivered again: at least once.
//!
//! The store keeps each durable's state opaque ([`Saved`] as JSON) with the lowest seq it
//! still needs, so retention keeps what a durable owes.

pub mod state;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::state::{AckOutcome, Checkpoint, ConnId, DeadLetter, DurableState, NotHeld, Settings};
use super::subscription::{self, Feed, FeedControl, FeedEnd, FeedItem, OpenError, Start};
use super::{Consumer, Hub};
use crate::routing::{Filter, FilterConfig};
use crate::storage::nats::lease::Leases;
use crate::storage::{DurableKey, SavedDurable, Store, StoreError};

/// Longest durable name.
pub const MAX_NAME: usize = 64;
/// `ack_wait` when the subscribe does not give one.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);
/// `max_deliver` when the subscribe does not give one.
pub const DEFAULT_MAX_DELIVER: u32 = 10;
/// `max_unacked` when the subscribe does not give one (or `limits.max_unacked` if lower).
pub const DEFAULT_MAX_UNACKED: usize = 256;
/// The range `ack_wait` must be in.
pub const ACK_WAIT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(24 * 3600);
/// The longest `nak` delay.
pub const MAX_NAK_DELAY: Duration = Duration::from_secs(24 * 3600);
/// How long the pump waits before reading again after the journal failed.
const STORE_RETRY: Duration = Duration::from_secs(1);
/// How long a subscribe waits for a durable's lease on a shared store (the lease is tried at
/// once and then every `storage.lease_ttl`/5, so this covers a handover from an instance
/// whose last connection just closed).
const LEASE_WAIT: Duration = Duration::from_secs(3);

/// `[limits]` as they apply to durables.
#[derive(Clone, Copy, Debug)]
pub struct DurableLimits {
    /// Durables one consumer may have.
    pub max_durables: usize,
    /// The largest `max_unacked` a connection may ask for.
    pub max_unacked: usize,
    /// A durable with no connection and no ack for this long is deleted.
    pub ttl: Duration,
    /// Dead letters one durable keeps (the oldest are dropped beyond it).
    pub dead_letters: usize,
}

impl DurableLimits {
    /// From `[limits]`.
    pub fn from_config(limits: &crate::config::LimitsConfig) -> DurableLimits {
        DurableLimits {
            max_durables: limits.max_durables,
            max_unacked: limits.max_unacked,
            ttl: limits.durable_ttl,
            dead_letters: limits.durable_dead_letters,
        }
    }
}

/// A durable's state as saved (JSON, opaque to the store).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Saved {
    /// The filter it was created with.
    pub filter: FilterConfig,
    /// `ack_wait` and `max_deliver`.
    pub settings: Settings,
    /// Created (unix ms).
    pub created_ms: i64,
    /// Last attach, detach or ack (unix ms): `limits.durable_ttl` counts from it.
    pub active_ms: i64,
    /// The cursor.
    pub checkpoint: Checkpoint,
}

/// One event handed to a connection.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// The journal position.
    pub seq: u64,
    /// Which delivery of this event it is (1 = first).
    pub delivery: u32,
    /// The envelope as journalled.
    pub bytes: Bytes,
}

/// A subscribe's durable part, as the client asked for it.
#[derive(Clone, Debug, Default)]
pub struct DurableRequest {
    /// The durable's name.
    pub name: String,
    /// Where a new durable starts.
    pub start: Option<Start>,
    /// Explicit `ack_wait` (must match an existing durable's).
    pub ack_wait: Option<Duration>,
    /// Explicit `max_deliver` (must match an existing durable's).
    pub max_deliver: Option<u32>,
    /// This connection's `max_unacked`.
    pub max_unacked: Option<usize>,
}

/// Why a durable subscribe was refused: the protocol's error code and its message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Refused {
    /// `bad_request`, `durable_mismatch`, `too_many_durables`, `unrecoverable_position`,
    /// `unavailable`.
    pub code: &'static str,
    /// What is wrong.
    pub message: String,
}

fn refused(code: &'static str, message: impl Into<String>) -> Refused {
    Refused {
        code,
        message: message.into(),
    }
}

/// Checks a durable name: 1 to [`MAX_NAME`] characters of `A-Z a-z 0-9 _ - .`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "durable must be 1 to {MAX_NAME} characters of A-Z, a-z, 0-9, '_', '-' and '.'"
        ))
    }
}

/// A durable as listed by the admin API and `/v1/status`.
#[derive(Clone, Debug, Serialize)]
pub struct DurableInfo {
    /// The owning consumer.
    pub consumer: String,
    /// The durable's name.
    pub name: String,
    /// Its filter.
    pub filter: FilterConfig,
    /// Every matching seq up to it is acknowledged (or dead-lettered).
    pub acked: u64,
    /// Events after the floor not acknowledged yet: those read and unacked, plus every
    /// journal event after the durable's read cursor (an upper bound while it has unread
    /// events: whether they match is known only once they are read).
    pub pending: u64,
    /// The journal head less the floor.
    pub lag: u64,
    /// Connections attached now.
    pub connections: usize,
    /// Dead letters kept.
    pub dead: usize,
    /// Redeliveries since the bridge started.
    pub redeliveries: u64,
    /// `ack_wait` in milliseconds.
    pub ack_wait_ms: u64,
    /// Deliveries before an event is dead-lettered.
    pub max_deliver: u32,
    /// Created (RFC 3339).
    pub created: String,
    /// Last active (RFC 3339).
    pub active: String,
}

/// Where an admin seek moves a durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeekTo {
    /// The next event sent is the first matching at or after this seq.
    Seq(u64),
    /// The next event sent is the first matching received at or after this (unix ms).
    Time(i64),
}

/// Why an admin operation on a durable failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No such durable.
    #[error("no durable {name:?} of consumer {consumer:?}")]
    Unknown {
        /// The consumer.
        consumer: String,
        /// The name.
        name: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Durable consumers' counters.
#[derive(Debug, Default)]
struct Stats {
    acks_ignored: AtomicU64,
    expired: AtomicU64,
}

/// Every durable of the bridge.
pub struct Durables {
    store: Arc<dyn Store>,
    /// A shared store's leases (NATS): one instance at a time serves a durable.
    leases: Option<Arc<Leases>>,
    limits: DurableLimits,
    map: Mutex<BTreeMap<DurableKey, Arc<Durable>>>,
    /// Whether the store keeps durables (loaded at start); when not, durable subscribes get
    /// `unavailable`.
    available: std::sync::atomic::AtomicBool,
    next_conn: AtomicU64,
    stats: Arc<Stats>,
}

/// One durable.
struct Durable {
    key: DurableKey,
    filter_config: FilterConfig,
    filter: Filter,
    created_ms: i64,
    active_ms: AtomicI64,
    state: Mutex<DurableState>,
    /// Senders to the attached connections.
    links: Mutex<HashMap<ConnId, Link>>,
    /// Wakes the pump (an ack, a nak, a connection came or went, an admin change).
    wake: Notify,
    /// Whether a pump task runs (set and cleared under `links`' lock).
    pumping: std::sync::atomic::AtomicBool,
    /// Cancelled when the durable is deleted: its pump ends and its connections are told.
    deleted: CancellationToken,
    /// One save at a time, in order.
    saving: tokio::sync::Mutex<()>,
    /// Counts seeks: the pump reads from the new cursor when it changes.
    moved: AtomicU64,
    /// Held while a connection attaches (and while a finished pump decides to give the
    /// lease up), so attaching and taking or releasing the lease do not interleave.
    attach: tokio::sync::Mutex<()>,
    /// The lease this instance holds on a shared store while it serves the durable.
    lease: Mutex<Option<LeaseHold>>,
    /// Set when the lease was lost while serving: the connections' subscriptions end with
    /// `unavailable` instead of `unknown_durable`.
    lease_lost: AtomicBool,
    /// How often a serving pump saves even without a change, so that the saved activity
    /// time stays fresh for other instances' `limits.durable_ttl` expiry.
    heartbeat: Duration,
}

/// A held lease: the flag says whether it is still held; cancelling `stop` and dropping
/// every clone of the flag gives it up.
struct LeaseHold {
    stop: CancellationToken,
    held: tokio::sync::watch::Receiver<bool>,
}

struct Link {
    tx: mpsc::Sender<Delivery>,
    /// Cancelled when the connection cannot take its events (the session closes it as slow).
    slow: CancellationToken,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl Durables {
    /// Durables over `store`, within `limits`; empty until [`Durables::load`].
    pub fn new(
        store: Arc<dyn Store>,
        leases: Option<Arc<Leases>>,
        limits: DurableLimits,
    ) -> Arc<Durables> {
        Arc::new(Durables {
            store,
            leases,
            limits,
            map: Mutex::new(BTreeMap::new()),
            available: std::sync::atomic::AtomicBool::new(false),
            next_conn: AtomicU64::new(1),
            stats: Arc::new(Stats::default()),
        })
    }

    /// Loads the saved durables. A store without durables leaves the feature off (logged);
    /// a saved state that cannot be read is skipped and logged, never fatal.
    pub async fn load(&self) -> Result<(), StoreError> {
        let saved = match self.store.durables().await {
            Ok(s) => s,
            Err(StoreError::Unsupported(what)) => {
                info!(
                    what,
                    "the storage backend keeps no durable consumers: durable subscribes are refused"
                );
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let mut map = lock(&self.map);
        for s in saved {
            if let Some(d) = self.parse(s) {
                map.insert(d.key.clone(), Arc::new(d));
            }
        }
        info!(durables = map.len(), "durable consumers loaded");
        self.available.store(true, Ordering::Release);
        Ok(())
    }

    /// A saved durable, or `None` (logged) when its state cannot be used.
    fn parse(&self, s: SavedDurable) -> Option<Durable> {
        match serde_json::from_slice::<Saved>(&s.state) {
            Ok(saved) => {
                let d = Durable::from_saved(s.key.clone(), saved, &self.limits);
                if d.is_none() {
                    warn!(consumer = %s.key.consumer, durable = %s.key.name, "saved durable has a filter that no longer compiles; skipped");
                }
                d
            }
            Err(e) => {
                warn!(consumer = %s.key.consumer, durable = %s.key.name, error = %e, "saved durable state unreadable; skipped");
                None
            }
        }
    }

    /// On a store other bridge instances share (NATS): takes every durable this instance
    /// does not serve now from the store again (another instance may have moved it, created
    /// it or deleted it), so a durable continues on this instance where the other left off,
    /// and the admin API, status and expiry see what the store holds. A durable this
    /// instance serves keeps its live state. Nothing to do on a store of its own.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        if !self.store.shared() || !self.available.load(Ordering::Acquire) {
            return Ok(());
        }
        let saved = self.store.durables().await?;
        let parsed: Vec<Durable> = saved.into_iter().filter_map(|s| self.parse(s)).collect();
        let mut map = lock(&self.map);
        let keys: std::collections::BTreeSet<DurableKey> =
            parsed.iter().map(|d| d.key.clone()).collect();
        map.retain(|k, d| keys.contains(k) || d.serving());
        for d in parsed {
            match map.get(&d.key) {
                Some(ours) if ours.serving() => {}
                _ => {
                    map.insert(d.key.clone(), Arc::new(d));
                }
            }
        }
        Ok(())
    }

    /// Deletes durables idle (no connection, no ack) for longer than `limits.durable_ttl`,
    /// every `every`, until `shutdown`.
    pub async fn expire_idle(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let ttl = i64::try_from(self.limits.ttl.as_millis()).unwrap_or(i64::MAX);
            let cutoff = now_ms().saturating_sub(ttl);
            if let Err(e) = self.refresh().await {
                warn!(error = %e, "cannot read the durables from the store; expiry waits for the next round");
                continue;
            }
            let idle: Vec<Arc<Durable>> = lock(&self.map)
                .values()
                .filter(|d| {
                    lock(&d.links).is_empty() && d.active_ms.load(Ordering::Relaxed) < cutoff
                })
                .cloned()
                .collect();
            for d in idle {
                match self.remove(&d).await {
                    Ok(()) => {
                        self.stats.expired.fetch_add(1, Ordering::Relaxed);
                        info!(consumer = %d.key.consumer, durable = %d.key.name, ttl = %humantime::format_duration(self.limits.ttl), "durable deleted after limits.durable_ttl without activity");
                    }
                    Err(e) => {
                        warn!(consumer = %d.key.consumer, durable = %d.key.name, error = %e, "could not delete an expired durable; trying again later")
                    }
                }
            }
        }
    }

    /// Attaches a connection of `consumer` to the durable `req.name` (created if new) with
    /// `filter`. On success: the `subscribed` frame's floor and pending count, the handle
    /// (ack, nak; detaches when dropped) and the events to write.
    pub async fn subscribe(
        &self,
        hub: &Arc<Hub>,
        consumer: &Consumer,
        filter_config: &FilterConfig,
        req: &DurableRequest,
        slow: &CancellationToken,
    ) -> Result<Subscribed, Refused> {
        if !self.available.load(Ordering::Acquire) {
            return Err(refused(
                "unavailable",
                "this bridge's storage backend keeps no durable consumers",
            ));
        }
        check_name(&req.name).map_err(|m| refused("bad_request", m))?;
        let max_unacked = req
            .max_unacked
            .unwrap_or(DEFAULT_MAX_UNACKED.min(self.limits.max_unacked));
        if max_unacked == 0 || max_unacked > self.limits.max_unacked {
            return Err(refused(
                "bad_request",
                format!(
                    "max_unacked must be 1 to {} (limits.max_unacked)",
                    self.limits.max_unacked
                ),
            ));
        }
        if let Some(w) = req.ack_wait {
            if !ACK_WAIT_RANGE.contains(&w) {
                return Err(refused("bad_request", "ack_wait must be 100ms to 24h"));
            }
        }
        if req.max_deliver == Some(0) {
            return Err(refused("bad_request", "max_deliver must be at least 1"));
        }
        let key = DurableKey {
            consumer: consumer.name.to_string(),
            name: req.name.clone(),
        };
        let pos = self
            .store
            .position()
            .await
            .map_err(|e| refused("unavailable", e.to_string()))?;
        self.refresh()
            .await
            .map_err(|e| refused("unavailable", e.to_string()))?;
        let existing = lock(&self.map).get(&key).cloned();
        let durable = match existing {
            Some(d) => {
                d.check_same(filter_config, req)?;
                d
            }
            None => self.create(key, filter_config, req, &pos).await?,
        };
        let attaching = durable.clone();
        let _attaching = attaching.attach.lock().await;
        if durable.deleted.is_cancelled() {
            return Err(refused(
                "unavailable",
                "the durable was deleted while subscribing; subscribe again",
            ));
        }
        if let Some(leases) = &self.leases {
            self.ensure_lease(&durable, leases).await?;
        }
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(max_unacked.saturating_mul(2).max(2));
        let (acked, pending) = {
            let mut links = lock(&durable.links);
            links.insert(
                conn,
                Link {
                    tx,
                    slow: slow.clone(),
                },
            );
            let mut st = lock(&durable.state);
            st.attach(conn, max_unacked);
            let start_pump = !durable.pumping.swap(true, Ordering::AcqRel);
            if start_pump {
                tokio::spawn(pump(durable.clone(), hub.clone(), consumer.allow.clone()));
            }
            (st.floor(), st.pending(pos.head))
        };
        durable.touch();
        durable.wake.notify_one();
        Ok(Subscribed {
            acked,
            pending,
            handle: DurableHandle {
                durable,
                conn,
                stats: self.stats.clone(),
            },
            events: rx,
        })
    }

    /// Makes sure this instance holds `d`'s lease (a shared store): when it does not yet,
    /// takes it (waiting at most [`LEASE_WAIT`]) and then reads the durable's newest saved
    /// state, which the instance that served it last saved before giving the lease up.
    async fn ensure_lease(&self, d: &Arc<Durable>, leases: &Leases) -> Result<(), Refused> {
        if lock(&d.lease).as_ref().is_some_and(|h| *h.held.borrow()) {
            return Ok(());
        }
        if let Some(old) = lock(&d.lease).take() {
            old.stop.cancel();
        }
        let stop = CancellationToken::new();
        let mut held = leases
            .keep_durable(&d.key, stop.clone())
            .map_err(|e| refused("unavailable", e.to_string()))?;
        let got = matches!(
            tokio::time::timeout(LEASE_WAIT, held.wait_for(|h| *h)).await,
            Ok(Ok(_))
        );
        if !got {
            stop.cancel();
            return Err(refused(
                "unavailable",
                "another bridge instance serves this durable now: connect its workers to that instance, or subscribe again once its connections have closed",
            ));
        }
        match self.store.durables().await {
            Ok(saved) => {
                if let Some(fresh) = saved
                    .into_iter()
                    .find(|s| s.key == d.key)
                    .and_then(|s| serde_json::from_slice::<Saved>(&s.state).ok())
                {
                    *lock(&d.state) = DurableState::new(
                        fresh.settings,
                        fresh.checkpoint,
                        self.limits.dead_letters,
                    );
                    d.active_ms.fetch_max(fresh.active_ms, Ordering::Relaxed);
                }
            }
            Err(e) => {
                stop.cancel();
                return Err(refused("unavailable", e.to_string()));
            }
        }
        d.lease_lost.store(false, Ordering::Release);
        *lock(&d.lease) = Some(LeaseHold { stop, held });
        Ok(())
    }

    /// Every durable, for the admin API and status (`head`: the journal's newest seq); on a
    /// shared store call [`Durables::refresh`] first.
    pub fn list(&self, head: u64) -> Vec<DurableInfo> {
        lock(&self.map).values().map(|d| d.info(head)).collect()
    }

    /// The dead letters of a durable.
    pub async fn dead_letters(&self, key: &DurableKey) -> Result<Vec<DeadLetter>, AdminError> {
        self.refresh().await?;
        Ok(lock(&self.get(key)?.state).dead_letters())
    }

    /// Moves the durable's cursor (kept within the journal); its connections get what follows
    /// from there. Returns the seq it moved to.
    pub async fn seek(&self, key: &DurableKey, to: SeekTo) -> Result<u64, AdminError> {
        self.refresh().await?;
        let d = self.get(key)?;
        let pos = self.store.position().await?;
        let seq = match to {
            SeekTo::Seq(s) => s,
            SeekTo::Time(ms) => self.store.seq_at(ms).await?,
        };
        // Before the oldest retained event: from the oldest; beyond the head: from the next
        // new event. The answer says where it went.
        let seq = seq.clamp(pos.first.max(1), pos.head.saturating_add(1));
        lock(&d.state).seek(seq.saturating_sub(1));
        d.moved.fetch_add(1, Ordering::AcqRel);
        d.wake.notify_one();
        d.save(&self.store).await?;
        info!(consumer = %key.consumer, durable = %key.name, seq, "durable moved by the admin API");
        Ok(seq)
    }

    /// Sends the durable's dead letters again (delivery counts reset); how many.
    pub async fn replay_dead(&self, key: &DurableKey) -> Result<usize, AdminError> {
        self.refresh().await?;
        let d = self.get(key)?;
        let n = lock(&d.state).replay_dead();
        d.wake.notify_one();
        d.save(&self.store).await?;
        Ok(n)
    }

    /// Deletes a durable; its connections' subscriptions end (`unknown_durable`).
    pub async fn delete(&self, key: &DurableKey) -> Result<(), AdminError> {
        self.refresh().await?;
        let d = self.get(key)?;
        self.remove(&d).await?;
        info!(consumer = %key.consumer, durable = %key.name, "durable deleted by the admin API");
        Ok(())
    }

    /// Acks from outside a connection (`POST /v1/durables/{name}/ack`, for SSE consumers):
    /// `seqs`, whichever connection holds them.
    pub fn ack(&self, key: &DurableKey, seqs: &[u64]) -> Result<AckOutcome, AdminError> {
        let d = self.get(key)?;
        let out = lock(&d.state).ack(seqs);
        Ok(acked(&d, &self.stats, out))
    }

    /// Acks that settled nothing since start (unknown or already acked seqs).
    pub fn acks_ignored(&self) -> u64 {
        self.stats.acks_ignored.load(Ordering::Relaxed)
    }

    /// Durables deleted by `limits.durable_ttl` since start.
    pub fn expired(&self) -> u64 {
        self.stats.expired.load(Ordering::Relaxed)
    }

    fn get(&self, key: &DurableKey) -> Result<Arc<Durable>, AdminError> {
        lock(&self.map)
            .get(key)
            .cloned()
            .ok_or_else(|| AdminError::Unknown {
                consumer: key.consumer.clone(),
                name: key.name.clone(),
            })
    }

    async fn remove(&self, d: &Arc<Durable>) -> Result<(), StoreError> {
        {
            // Under the save lock: no save is under way, and none starts until the deletion
            // is decided (a save landing after the delete would bring the durable back).
            let _turn = d.saving.lock().await;
            self.store.delete_durable(&d.key).await?;
            d.deleted.cancel();
        }
        let mut map = lock(&self.map);
        if map.get(&d.key).is_some_and(|x| Arc::ptr_eq(x, d)) {
            map.remove(&d.key);
        }
        lock(&d.links).clear();
        if let Some(hold) = lock(&d.lease).take() {
            hold.stop.cancel();
        }
        Ok(())
    }

    async fn create(
        &self,
        key: DurableKey,
        filter_config: &FilterConfig,
        req: &DurableRequest,
        pos: &crate::storage::JournalPosition,
    ) -> Result<Arc<Durable>, Refused> {
        let filter = Filter::from_config(filter_config).map_err(|issues| {
            let msg = issues
                .iter()
                .map(|i| format!("filter.{i}"))
                .collect::<Vec<_>>()
                .join("; ");
            refused("bad_pattern", msg)
        })?;
        let owned = lock(&self.map)
            .keys()
            .filter(|k| k.consumer == key.consumer)
            .count();
        if owned >= self.limits.max_durables {
            return Err(refused(
                "too_many_durables",
                format!("this consumer already has {owned} durables (limits.max_durables)"),
            ));
        }
        let start = req.start.unwrap_or(Start::Latest);
        let first = subscription::first_seq(start, None, pos)
            .map_err(|e| refused("unrecoverable_position", e.to_string()))?;
        let settings = Settings {
            ack_wait_ms: u64::try_from(req.ack_wait.unwrap_or(DEFAULT_ACK_WAIT).as_millis())
                .unwrap_or(u64::MAX),
            max_deliver: req.max_deliver.unwrap_or(DEFAULT_MAX_DELIVER),
        };
        let now = now_ms();
        let checkpoint = Checkpoint {
            floor: first.saturating_sub(1),
            ..Checkpoint::default()
        };
        let d = Arc::new(Durable::new(
            key.clone(),
            filter_config.clone(),
            filter,
            settings,
            checkpoint,
            now,
            now,
            &self.limits,
        ));
        // Two connections creating the same durable at once: the first one in wins.
        let d = {
            let mut map = lock(&self.map);
            map.entry(key.clone()).or_insert(d).clone()
        };
        d.check_same(filter_config, req)?;
        d.save(&self.store)
            .await
            .map_err(|e| refused("unavailable", e.to_string()))?;
        info!(consumer = %key.consumer, durable = %key.name, from = first, "durable created");
        Ok(d)
    }
}

/// A successful durable subscribe.
pub struct Subscribed {
    /// The floor for the `subscribed` frame.
    pub acked: u64,
    /// Pending for the `subscribed` frame.
    pub pending: u64,
    /// Acks and naks; detaches the connection when dropped.
    pub handle: DurableHandle,
    /// The events to write (the stream ends when the durable is deleted).
    pub events: mpsc::Receiver<Delivery>,
}

/// A connection's hold on a durable: acks, naks, and the detach when dropped (its unacked
/// events go to another connection at once).
pub struct DurableHandle {
    durable: Arc<Durable>,
    conn: ConnId,
    stats: Arc<Stats>,
}

impl DurableHandle {
    /// Acknowledges `seqs`; returns how many settled something (the rest are counted).
    pub fn ack(&self, seqs: &[u64]) -> AckOutcome {
        let out = lock(&self.durable.state).ack(seqs);
        self.after_ack(out)
    }

    /// Acknowledges every event this connection holds up to `upto`.
    pub fn ack_upto(&self, upto: u64) -> AckOutcome {
        let out = lock(&self.durable.state).ack_upto(self.conn, upto);
        self.after_ack(out)
    }

    /// Gives `seq` back, to be sent again after `delay`.
    pub fn nak(&self, seq: u64, delay: Duration) -> Result<(), NotHeld> {
        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        lock(&self.durable.state).nak(self.conn, seq, delay_ms, now_ms())?;
        self.durable.wake.notify_one();
        Ok(())
    }

    /// The durable's name.
    pub fn name(&self) -> &str {
        &self.durable.key.name
    }

    /// Why the durable's events stopped (its channel closed): `Some` with the reason when this
    /// instance lost the durable's lease (the consumer subscribes again), `None` when the
    /// durable was deleted.
    pub fn lost(&self) -> Option<&'static str> {
        self.durable
            .lease_lost
            .load(Ordering::Acquire)
            .then_some("this bridge instance lost the durable's lease (its store is unreachable?): subscribe again")
    }

    fn after_ack(&self, out: AckOutcome) -> AckOutcome {
        acked(&self.durable, &self.stats, out)
    }
}

/// After an ack of `d`: ignored seqs are counted; settled ones mark the durable active and
/// wake its pump (its connections have room again, its state is to be saved).
fn acked(d: &Durable, stats: &Stats, out: AckOutcome) -> AckOutcome {
    if out.ignored > 0 {
        stats.acks_ignored.fetch_add(out.ignored, Ordering::Relaxed);
    }
    if out.acked > 0 {
        d.touch();
        d.wake.notify_one();
    }
    out
}

impl Drop for DurableHandle {
    fn drop(&mut self) {
        lock(&self.durable.links).remove(&self.conn);
        lock(&self.durable.state).detach(self.conn);
        self.durable.touch();
        self.durable.wake.notify_one();
    }
}

impl Durable {
    #[allow(clippy::too_many_arguments)]
    fn new(
        key: DurableKey,
        filter_config: FilterConfig,
        filter: Filter,
        settings: Settings,
        checkpoint: Checkpoint,
        created_ms: i64,
        active_ms: i64,
        limits: &DurableLimits,
    ) -> Durable {
        Durable {
            key,
            filter_config,
            filter,
            created_ms,
            active_ms: AtomicI64::new(active_ms),
            state: Mutex::new(DurableState::new(settings, checkpoint, limits.dead_letters)),
            links: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            pumping: std::sync::atomic::AtomicBool::new(false),
            deleted: CancellationToken::new(),
            saving: tokio::sync::Mutex::new(()),
            moved: AtomicU64::new(0),
            attach: tokio::sync::Mutex::new(()),
            lease: Mutex::new(None),
            lease_lost: AtomicBool::new(false),
            heartbeat: (limits.ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(60)),
        }
    }

    fn from_saved(key: DurableKey, saved: Saved, limits: &DurableLimits) -> Option<Durable> {
        let filter = Filter::from_config(&saved.filter).ok()?;
        Some(Durable::new(
            key,
            saved.filter,
            filter,
            saved.settings,
            saved.checkpoint,
            saved.created_ms,
            saved.active_ms,
            limits,
        ))
    }

    /// Whether this instance serves the durable now (connections attached, or its pump
    /// still finishing).
    fn serving(&self) -> bool {
        self.pumping.load(Ordering::Acquire) || !lock(&self.links).is_empty()
    }

    fn touch(&self) {
        self.active_ms.fetch_max(now_ms(), Ordering::Relaxed);
    }

    /// A subscribe naming this durable must ask for the same filter, and for the same
    /// `ack_wait` and `max_deliver` where it names them.
    fn check_same(&self, filter: &FilterConfig, req: &DurableRequest) -> Result<(), Refused> {
        let settings = lock(&self.state).settings();
        let mismatch = |what: &str| {
            refused(
                "durable_mismatch",
                format!(
                    "durable {:?} exists with another {what}; delete it or use another name",
                    self.key.name
                ),
            )
        };
        if *filter != self.filter_config {
            return Err(mismatch("filter"));
        }
        if let Some(w) = req.ack_wait {
            if u64::try_from(w.as_millis()).unwrap_or(u64::MAX) != settings.ack_wait_ms {
                return Err(mismatch("ack_wait"));
            }
        }
        if req.max_deliver.is_some_and(|m| m != settings.max_deliver) {
            return Err(mismatch("max_deliver"));
        }
        Ok(())
    }

    fn info(&self, head: u64) -> DurableInfo {
        let st = lock(&self.state);
        let settings = st.settings();
        DurableInfo {
            consumer: self.key.consumer.clone(),
            name: self.key.name.clone(),
            filter: self.filter_config.clone(),
            acked: st.floor(),
            pending: st.pending(head),
            lag: head.saturating_sub(st.floor()),
            connections: st.connections(),
            dead: st.dead_count(),
            redeliveries: st.redeliveries(),
            ack_wait_ms: settings.ack_wait_ms,
            max_deliver: settings.max_deliver,
            created: rfc3339(self.created_ms),
            active: rfc3339(self.active_ms.load(Ordering::Relaxed)),
        }
    }

    /// Saves the state if it changed (`force`: whether or not).
    async fn save_if(&self, store: &Arc<dyn Store>, force: bool) -> Result<(), StoreError> {
        let _turn = self.saving.lock().await;
        let checkpoint = {
            let mut st = lock(&self.state);
            match st.checkpoint() {
                Some(c) => c,
                None if force => st.snapshot(),
                None => return Ok(()),
            }
        };
        if self.deleted.is_cancelled() {
            return Ok(());
        }
        let keep_from = checkpoint.keep_from();
        let saved = Saved {
            filter: self.filter_config.clone(),
            settings: lock(&self.state).settings(),
            created_ms: self.created_ms,
            active_ms: self.active_ms.load(Ordering::Relaxed),
            checkpoint,
        };
        let state = Bytes::from(serde_json::to_vec(&saved)?);
        let result = store
            .save_durable(SavedDurable {
                key: self.key.clone(),
                state,
                keep_from,
            })
            .await;
        if result.is_err() {
            // Saved again on the next change or turn of the pump.
            lock(&self.state).mark_dirty();
        }
        result
    }

    async fn save(&self, store: &Arc<dyn Store>) -> Result<(), StoreError> {
        self.save_if(store, true).await
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Writes `sends` to their connections. A connection whose queue is full (it has not read
/// for a long while) is told it is slow; it and a gone one are detached, and what they
/// held is ready for the others.
fn deliver(d: &Durable, sends: Vec<state::Send>) {
    if sends.is_empty() {
        return;
    }
    let mut failed = Vec::new();
    {
        let links = lock(&d.links);
        for s in sends {
            let Some(link) = links.get(&s.conn) else {
                failed.push(s.conn);
                continue;
            };
            let delivery = Delivery {
                seq: s.seq,
                delivery: s.delivery,
                bytes: s.bytes,
            };
            match link.tx.try_send(delivery) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    link.slow.cancel();
                    failed.push(s.conn);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => failed.push(s.conn),
            }
        }
    }
    if !failed.is_empty() {
        failed.sort_unstable();
        failed.dedup();
        let mut links = lock(&d.links);
        for conn in &failed {
            links.remove(conn);
        }
        drop(links);
        let mut st = lock(&d.state);
        for conn in failed {
            st.detach(conn);
        }
    }
}

/// Reads the journal bytes of replayed dead letters into the state.
async fn requeue_wanted(d: &Durable, store: &Arc<dyn Store>) {
    let wanted = lock(&d.state).take_requeue_wanted();
    for seq in wanted {
        match store.read_from(seq, 1).await {
            Ok(page) => match page.into_iter().next() {
                Some(e) if e.seq == seq => lock(&d.state).requeue(seq, e.bytes),
                _ => {
                    warn!(consumer = %d.key.consumer, durable = %d.key.name, seq, "a replayed dead letter is no longer in the journal; dropped");
                    lock(&d.state).requeue_lost(seq);
                }
            },
            Err(e) => {
                warn!(consumer = %d.key.consumer, durable = %d.key.name, seq, error = %e, "cannot read a replayed dead letter; dropped");
                lock(&d.state).requeue_lost(seq);
            }
        }
    }
}

/// The durable's pump: runs while connections are attached (see the module doc).
async fn pump(d: Arc<Durable>, hub: Arc<Hub>, allow: Arc<Filter>) {
    let store = hub.store.clone();
    let budget = hub.replay.connection();
    // Ends the feed's replay task when the pump ends.
    let stop = CancellationToken::new();
    let _stop_guard = stop.clone().drop_guard();
    let mut feed: Option<Feed> = None;
    let mut moved = d.moved.load(Ordering::Acquire);
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut heartbeat = tokio::time::interval(d.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    heartbeat.tick().await;
    // The save in progress: saves run beside the pump (one at a time, each of the newest
    // state), so handing out events never waits for the store's commit.
    let mut saving: Option<tokio::task::JoinHandle<()>> = None;
    // On a shared store: whether this instance still holds the durable's lease.
    let mut lease = lock(&d.lease).as_ref().map(|h| h.held.clone());
    loop {
        requeue_wanted(&d, &store).await;
        let now = now_ms();
        let (sends, next_timer) = {
            let mut st = lock(&d.state);
            st.expire(now);
            (st.dispatch(now), st.next_timer())
        };
        deliver(&d, sends);
        if saving.is_none() && lock(&d.state).dirty() {
            let (d, store) = (d.clone(), store.clone());
            saving = Some(tokio::spawn(async move {
                if let Err(e) = d.save_if(&store, false).await {
                    warn!(consumer = %d.key.consumer, durable = %d.key.name, error = %e, "cannot save the durable's state; retrying with the next change");
                }
            }));
        }
        if d.deleted.is_cancelled() {
            break;
        }
        {
            let links = lock(&d.links);
            if links.is_empty() {
                d.pumping.store(false, Ordering::Release);
                break;
            }
        }
        let now_moved = d.moved.load(Ordering::Acquire);
        if now_moved != moved {
            moved = now_moved;
            feed = None;
        }
        let room = lock(&d.state).room();
        if room > 0 && feed.is_none() && retry_at.is_none_or(|t| tokio::time::Instant::now() >= t) {
            retry_at = None;
            let from = lock(&d.state).read_through().saturating_add(1);
            let control = FeedControl {
                stop: stop.clone(),
                slow: CancellationToken::new(),
                budget: budget.clone(),
            };
            match subscription::open(
                &hub,
                d.filter.clone(),
                allow.clone(),
                Start::Seq(from),
                None,
                control,
            )
            .await
            {
                Ok(f) => feed = Some(f),
                Err(OpenError::Position(e)) => {
                    resync(&d, &store, &e.to_string()).await;
                    continue;
                }
                Err(OpenError::Store(e)) => {
                    warn!(consumer = %d.key.consumer, durable = %d.key.name, error = %e, "durable cannot read the journal; retrying");
                    retry_at = Some(tokio::time::Instant::now() + STORE_RETRY);
                }
            }
        }
        let timer = next_timer.map(|at| {
            let wait = u64::try_from(at.saturating_sub(now_ms())).unwrap_or(0);
            tokio::time::Instant::now() + Duration::from_millis(wait)
        });
        let reading = room > 0 && feed.is_some();
        tokio::select! {
            _ = d.wake.notified() => {}
            _ = d.deleted.cancelled() => {}
            _ = async { if let Some(h) = saving.as_mut() { let _ = h.await; } }, if saving.is_some() => {
                saving = None;
            }
            held = lease_changed(&mut lease), if lease.is_some() => {
                if !held {
                    warn!(consumer = %d.key.consumer, durable = %d.key.name, "lost the durable's lease; its connections are told to subscribe again");
                    d.lease_lost.store(true, Ordering::Release);
                    lease = None;
                    lock(&d.links).clear();
                }
            }
            _ = heartbeat.tick() => {
                d.touch();
                if let Err(e) = d.save_if(&store, true).await {
                    warn!(consumer = %d.key.consumer, durable = %d.key.name, error = %e, "cannot save the durable's state; retrying with the next change");
                }
            }
            _ = sleep_until(timer), if timer.is_some() => {}
            _ = sleep_until(retry_at), if retry_at.is_some() && feed.is_none() => {}
            item = next_of(&mut feed), if reading => {
                let mut item = item;
                loop {
                    let go_on = take_item(&d, &store, &mut feed, item).await;
                    if !go_on || lock(&d.state).room() == 0 {
                        break;
                    }
                    match feed.as_mut().and_then(Feed::try_next) {
                        Some(next) => item = Some(next),
                        None => break,
                    }
                }
                if let Some(cursor) = feed.as_ref().and_then(Feed::live_cursor) {
                    lock(&d.state).passed(cursor.saturating_sub(1));
                }
            }
        }
    }
    if let Some(h) = saving {
        let _ = h.await;
    }
    let _ = d.save_if(&store, false).await;
    // Saved: give the lease up, unless a connection attached meanwhile (its subscribe then
    // started a pump that serves under the same lease).
    drop(lease);
    let _attaching = d.attach.lock().await;
    if !d.serving() {
        if let Some(hold) = lock(&d.lease).take() {
            hold.stop.cancel();
        }
    }
}

/// The lease flag's next value (false when its keeper is gone).
async fn lease_changed(lease: &mut Option<tokio::sync::watch::Receiver<bool>>) -> bool {
    match lease {
        Some(rx) => match rx.changed().await {
            Ok(()) => *rx.borrow(),
            Err(_) => false,
        },
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn next_of(feed: &mut Option<Feed>) -> Option<FeedItem> {
    match feed {
        Some(f) => f.next().await,
        None => std::future::pending().await,
    }
}

/// Applies one feed item; false when the feed is over (dropped here).
async fn take_item(
    d: &Durable,
    store: &Arc<dyn Store>,
    feed: &mut Option<Feed>,
    item: Option<FeedItem>,
) -> bool {
    match item {
        Some(FeedItem::Event(p)) => {
            lock(&d.state).push(p.envelope.seq.unwrap_or(0), p.bytes.clone());
            true
        }
        Some(FeedItem::Replayed(r)) => {
            lock(&d.state).push(r.seq, r.bytes.clone());
            true
        }
        Some(FeedItem::Unreadable { seq, .. }) => {
            // Counted and logged by the feed; a durable cannot send it either.
            lock(&d.state).passed(seq);
            true
        }
        Some(FeedItem::End(FeedEnd::SlowConsumer)) => {
            // The ring outran the durable while its connections were full: read on from
            // the journal when they have room.
            *feed = None;
            false
        }
        Some(FeedItem::End(FeedEnd::Unrecoverable(e))) => {
            *feed = None;
            resync(d, store, &e).await;
            false
        }
        Some(FeedItem::End(FeedEnd::Store(e))) => {
            warn!(consumer = %d.key.consumer, durable = %d.key.name, error = %e, "durable cannot read the journal; reopening");
            *feed = None;
            false
        }
        None => {
            *feed = None;
            false
        }
    }
}

/// The durable's cursor is not in the journal (retention pruned what it owed, or the store
/// was replaced): it goes on from the oldest event kept, or from the head, and says so.
async fn resync(d: &Durable, store: &Arc<dyn Store>, why: &str) {
    let Ok(pos) = store.position().await else {
        return;
    };
    let mut st = lock(&d.state);
    let from = st.read_through().saturating_add(1);
    let floor = if from < pos.first {
        pos.first.saturating_sub(1)
    } else {
        pos.head
    };
    warn!(consumer = %d.key.consumer, durable = %d.key.name, reason = %why, from, resumed_after = floor, "durable's position is not in the journal; events in between are skipped");
    st.seek(floor);
}
