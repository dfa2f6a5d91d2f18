//! Replay memory: how many bytes of journal events replays may hold, per connection and in
//! total, and the rule that closes a consumer that does not read its replay.
//!
//! A replayed event is read from the journal by its subscription's replay task and held until the
//! connection writes it to its socket. Before reading a page the replay task reserves the page's
//! byte budget, first from its connection's budget and then from the total budget (shared by
//! every connection), one replay task of a connection at a time, so a connection never holds more
//! of the total than its own budget; after the read it keeps a [`Charge`] per event it queues (the
//! event's bytes) and gives the rest back. The charge travels with the event and is released
//! when the event is written or dropped, so the bytes replays hold are never more than the
//! budgets (`limits.replay_memory_per_connection`, `limits.replay_memory_total`), however
//! many subscriptions start from `earliest` and however slowly their consumers read: a replay
//! that finds no room waits (counted in `wsbridge_consumer_replay_budget_waits_total`).
//!
//! The slow-consumer rule for replays: while a replay task waits for its connection's budget or
//! for room in its queue, the connection is stalled if it has replayed events queued and has
//! written none of them for `limits.replay_stall_timeout`; the replay task then ends the
//! connection as a slow consumer (the same verdict as the live path's lag, 4001 on
//! WebSocket). A wait for the *total* budget is not the consumer's fault and has no deadline.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::LimitsConfig;

/// Bookkeeping per replayed event on top of its bytes (the queue item, its id), so that many
/// tiny events are not free.
pub const EVENT_OVERHEAD: usize = 128;
/// Largest page a replay task reserves at once (a page holds at least one event, whatever size).
const MAX_PAGE_BYTES: usize = 1024 * 1024;

/// The downstream limits from `[limits]`, as the hub applies them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DownstreamLimits {
    /// Connections one consumer token may hold at once.
    pub max_connections_per_token: usize,
    /// Replay bytes per connection.
    pub replay_per_connection: usize,
    /// Replay bytes of all connections together.
    pub replay_total: usize,
    /// How long replayed events may wait unwritten before the connection counts as slow.
    pub replay_stall: Duration,
}

impl DownstreamLimits {
    /// From the validated `[limits]` section.
    pub fn from_config(c: &LimitsConfig) -> DownstreamLimits {
        let bytes = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        DownstreamLimits {
            max_connections_per_token: c.max_connections_per_token,
            replay_per_connection: bytes(c.replay_memory_per_connection),
            replay_total: bytes(c.replay_memory_total),
            replay_stall: c.replay_stall_timeout,
        }
    }
}

impl Default for DownstreamLimits {
    fn default() -> Self {
        DownstreamLimits::from_config(&LimitsConfig::default())
    }
}

/// The total replay budget, shared by every connection of a hub.
#[derive(Debug)]
pub struct ReplayBudget {
    total: Arc<Semaphore>,
    total_capacity: usize,
    per_connection: usize,
    stall: Duration,
    waits: AtomicU64,
}

/// Tokio semaphores count permits in `u32` per acquisition and at most
/// [`Semaphore::MAX_PERMITS`] in all; budgets are clamped to both.
fn clamp_capacity(bytes: usize) -> usize {
    bytes.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize))
}

impl ReplayBudget {
    /// A budget with `limits`.
    pub fn new(limits: &DownstreamLimits) -> Arc<ReplayBudget> {
        let total_capacity = clamp_capacity(limits.replay_total);
        Arc::new(ReplayBudget {
            total: Arc::new(Semaphore::new(total_capacity)),
            total_capacity,
            per_connection: clamp_capacity(limits.replay_per_connection).min(total_capacity),
            // Validated to at most an hour; clamped so deadline arithmetic cannot overflow.
            stall: limits.replay_stall.min(Duration::from_secs(24 * 3600)),
            waits: AtomicU64::new(0),
        })
    }

    /// A new connection's share.
    pub fn connection(self: &Arc<Self>) -> Arc<ConnectionBudget> {
        Arc::new(ConnectionBudget {
            shared: self.clone(),
            own: Arc::new(Semaphore::new(self.per_connection)),
            capacity: self.per_connection,
            base: Instant::now(),
            last_written_ms: AtomicU64::new(0),
            queued: AtomicUsize::new(0),
            reserving: tokio::sync::Mutex::new(()),
        })
    }

    /// Replayed bytes held now, all connections together.
    pub fn in_use(&self) -> usize {
        self.total_capacity
            .saturating_sub(self.total.available_permits())
    }

    /// How many times a replay page had to wait for room in a budget.
    pub fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }
}

/// One connection's replay budget and write progress.
#[derive(Debug)]
pub struct ConnectionBudget {
    shared: Arc<ReplayBudget>,
    own: Arc<Semaphore>,
    capacity: usize,
    base: Instant,
    /// When the connection last wrote an event, in ms after `base`.
    last_written_ms: AtomicU64,
    /// Replayed events queued for the connection and not written or dropped yet.
    queued: AtomicUsize,
    /// Held while one replay task of the connection reserves: the others wait holding nothing.
    reserving: tokio::sync::Mutex<()>,
}

/// The connection is not reading: its replayed events waited unwritten past the deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stalled;

/// Bytes held for a page being read, shrunk into per-event [`Charge`]s.
#[derive(Debug)]
pub struct Reservation {
    total: OwnedSemaphorePermit,
    own: OwnedSemaphorePermit,
}

/// The budget one queued replayed event holds until it is written or dropped.
#[derive(Debug)]
pub struct Charge {
    _total: OwnedSemaphorePermit,
    _own: OwnedSemaphorePermit,
    conn: Arc<ConnectionBudget>,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.conn.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnectionBudget {
    /// Bytes a replay task reserves for one page.
    pub fn page_bytes(&self) -> usize {
        (self.capacity / 4).clamp(1, MAX_PAGE_BYTES)
    }

    /// Records that the connection wrote events to its consumer (it is reading).
    pub fn written(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_written_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn last_written(&self) -> Instant {
        self.base + Duration::from_millis(self.last_written_ms.load(Ordering::Relaxed))
    }

    /// Runs `wait` (a wait for this connection's consumer to take something) under the
    /// stall rule: `Err(Stalled)` once the connection has replayed events queued and has
    /// written nothing for the stall timeout, counted from the later of when this wait began
    /// and the last write.
    pub async fn unless_stalled<F: Future>(&self, wait: F) -> Result<F::Output, Stalled> {
        tokio::pin!(wait);
        let mut since = Instant::now();
        loop {
            let deadline = since.max(self.last_written()) + self.shared.stall;
            if let Ok(out) = tokio::time::timeout_at(deadline, &mut wait).await {
                return Ok(out);
            }
            if self.last_written() + self.shared.stall > Instant::now() {
                continue; // written meanwhile: the deadline moves on
            }
            if self.queued.load(Ordering::Acquire) > 0 {
                return Err(Stalled);
            }
            // Nothing of this connection waits for its consumer (the wait is on someone
            // else): not the consumer's fault, start counting again.
            since = Instant::now();
        }
    }

    /// Reserves `bytes` (at most this connection's whole budget) for reading a page: from
    /// this connection's budget under the stall rule, then from the total budget (no
    /// deadline: other connections hold it); one replay task of the connection at a time.
    pub async fn reserve(&self, bytes: usize) -> Result<Reservation, Stalled> {
        let n = u32::try_from(bytes.clamp(1, self.capacity)).unwrap_or(u32::MAX);
        let _turn = self.reserving.lock().await;
        let own = match self.own.clone().try_acquire_many_owned(n) {
            Ok(p) => p,
            Err(_) => {
                self.shared.waits.fetch_add(1, Ordering::Relaxed);
                match self
                    .unless_stalled(self.own.clone().acquire_many_owned(n))
                    .await?
                {
                    Ok(p) => p,
                    // The semaphore is never closed; treat it as a stall rather than panic.
                    Err(_) => return Err(Stalled),
                }
            }
        };
        let total = match self.shared.total.clone().try_acquire_many_owned(n) {
            Ok(p) => p,
            Err(_) => {
                self.shared.waits.fetch_add(1, Ordering::Relaxed);
                match self.shared.total.clone().acquire_many_owned(n).await {
                    Ok(p) => p,
                    Err(_) => return Err(Stalled),
                }
            }
        };
        Ok(Reservation { total, own })
    }

    /// Takes a charge of `bytes` out of `reservation` for one event; `None` when the
    /// reservation holds less (the caller reserves again, see [`Self::reserve`]).
    pub fn charge(self: &Arc<Self>, reservation: &mut Reservation, bytes: usize) -> Option<Charge> {
        let n = bytes.max(1);
        if reservation.own.num_permits() < n || reservation.total.num_permits() < n {
            return None;
        }
        let total = reservation.total.split(n)?;
        let own = reservation.own.split(n)?;
        self.queued.fetch_add(1, Ordering::AcqRel);
        Some(Charge {
            _total: total,
            _own: own,
            conn: self.clone(),
        })
    }

    /// The cost of an event of `len` bytes, capped so that one event always fits the budget.
    pub fn cost(&self, len: usize) -> usize {
        len.saturating_add(EVENT_OVERHEAD).min(self.capacity)
    }
}

impl Reservation {
    /// Bytes still reserved.
    pub fn bytes(&self) -> usize {
        self.own.num_permits().min(self.total.num_permits())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per: usize, total: usize, stall_ms: u64) -> DownstreamLimits {
        DownstreamLimits {
            max_connections_per_token: 10,
            replay_per_connection: per,
            replay_total: total,
            replay_stall: Duration::from_millis(stall_ms),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn charges_hold_the_budget_until_dropped() {
        let budget = ReplayBudget::new(&limits(1000, 1500, 1000));
        let a = budget.connection();
        let mut r = a.reserve(600).await.expect("room");
        assert_eq!(budget.in_use(), 600);
        let c1 = a.charge(&mut r, 200).expect("fits");
        let c2 = a.charge(&mut r, 300).expect("fits");
        assert!(a.charge(&mut r, 200).is_none(), "only 100 left");
        drop(r);
        assert_eq!(budget.in_use(), 500, "the unused rest is given back");
        drop(c1);
        assert_eq!(budget.in_use(), 300);
        drop(c2);
        assert_eq!(budget.in_use(), 0);
        assert_eq!(a.queued.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_whose_queued_events_are_not_written_is_stalled() {
        let budget = ReplayBudget::new(&limits(1000, 2000, 1000));
        let a = budget.connection();
        let mut r = a.reserve(1000).await.expect("room");
        let _queued = a.charge(&mut r, 1000).expect("fits");
        // The budget is full and nothing is written: the next reservation stalls.
        let start = Instant::now();
        assert_eq!(a.reserve(10).await.err(), Some(Stalled));
        assert_eq!(start.elapsed(), Duration::from_millis(1000));
        assert_eq!(budget.waits(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn writing_moves_the_deadline_and_waits_for_others_are_not_stalls() {
        let budget = ReplayBudget::new(&limits(1000, 1000, 1000));
        let a = budget.connection();
        let b = budget.connection();
        // `b` holds the whole total budget; `a` has nothing queued: `a` waits, never stalls.
        let mut rb = b.reserve(1000).await.expect("room");
        let held = b.charge(&mut rb, 1000).expect("fits");
        let waiting = tokio::spawn({
            let a = a.clone();
            async move { a.reserve(10).await.map(|r| r.bytes()) }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiting.is_finished());
        drop(held);
        assert_eq!(waiting.await.expect("task"), Ok(10));

        // A connection that keeps writing is not stalled while its budget stays full.
        let budget = ReplayBudget::new(&limits(1000, 2000, 1000));
        let a = budget.connection();
        let mut r = a.reserve(1000).await.expect("room");
        let queued = a.charge(&mut r, 1000).expect("fits");
        let writer = tokio::spawn({
            let a = a.clone();
            async move {
                for _ in 0..5 {
                    tokio::time::sleep(Duration::from_millis(600)).await;
                    a.written();
                }
                drop(queued);
            }
        });
        let start = Instant::now();
        assert!(a.reserve(10).await.is_ok());
        assert_eq!(start.elapsed(), Duration::from_millis(3000));
        writer.await.expect("writer");
    }
}
