//! The embedded store's delivery queue ([`DeliveryQueue`]). An endpoint's deliveries come
//! from two places:
//! - its **cursor** over the journal (cursor.rs): events routed to it that no attempt has
//!   reached, read in seq order with nothing written per delivery but, now and then, the
//!   cursor; an ordered endpoint turns them into rows first (their subjects order them);
//! - **rows** in `deliveries`: attempts that failed (retries, dead letters) and replays.
//!
//! In memory, per endpoint ([`EndpointState`]): the seqs handed out and not yet answered
//! ([`HeldSet`], so nothing is handed out twice at once) and the cursor's [`Lane`]. A held
//! delivery is still owed in the file (above the saved cursor, or a pending row), so a crash
//! forgets nothing: it is sent again after a restart. Both are bounded by the queue's
//! `max_held`, and every entry leaves when its handle is answered or dropped.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tracing::warn;

use super::cursor::{Lane, SaveStep};
use super::queries::{self, Readers};
use super::to_i64;
use super::writer::Writer;
use crate::storage::{
    AttemptRecord, DeliveryQueue, DueDelivery, HeldDelivery, Holder, NextStep, QueueOptions,
    StoreError,
};

/// Most journal seqs one scan query examines: a query for an endpoint that few events go to
/// never runs through a long journal in one go (the reader is shared); the scan goes on with
/// the next chunk.
const SCAN_CHUNK: u64 = 4_096;

/// The seqs of one endpoint's deliveries handed out and not yet answered.
///
/// A delivery is un-held once its outcome is committed, which may happen while a `due` query
/// runs on a snapshot read before that commit: its row there is stale (still due, attempt
/// count and all). So a seq un-held while a query runs is not handed out by that query; the
/// next one, which its taker's report wakes the dispatcher for, reads it afresh.
#[derive(Debug, Default)]
pub(super) struct HeldSet {
    state: Mutex<HeldState>,
}

#[derive(Debug, Default)]
struct HeldState {
    /// Handed out and not yet answered.
    seqs: HashSet<u64>,
    /// `due` queries running on this set.
    reading: usize,
    /// Un-held while a query ran (cleared when none runs): at most what was held.
    stale: HashSet<u64>,
}

/// A `due` query in progress on a [`HeldSet`] (ends when dropped, however the query ends).
pub(super) struct Reading<'a>(&'a HeldSet);

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.reading = state.reading.saturating_sub(1);
        if state.reading == 0 {
            state.stale.clear();
        }
    }
}

impl HeldSet {
    fn lock(&self) -> MutexGuard<'_, HeldState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How many are held, and a query starting (its rows go through [`HeldSet::take`]).
    pub(super) fn begin(&self) -> (usize, Reading<'_>) {
        let mut state = self.lock();
        state.reading += 1;
        (state.seqs.len(), Reading(self))
    }

    /// Holds and hands out up to `room` of `rows` (read by `reading`): none held already,
    /// none un-held while the query ran. Each handle un-holds through `holder`.
    pub(super) fn take(
        &self,
        holder: &Arc<dyn Holder>,
        reading: Reading<'_>,
        rows: Vec<DueDelivery>,
        room: usize,
    ) -> Vec<HeldDelivery> {
        let mut out = Vec::with_capacity(room.min(rows.len()));
        {
            let mut state = self.lock();
            for row in rows {
                if out.len() >= room {
                    break;
                }
                if !state.stale.contains(&row.seq) && state.seqs.insert(row.seq) {
                    out.push(HeldDelivery::new(row, holder.clone()));
                }
            }
        }
        drop(reading);
        out
    }

    /// Holds `rows`, which nothing else can hold (the cursor hands each seq out once).
    fn hold(&self, holder: &Arc<dyn Holder>, rows: Vec<DueDelivery>) -> Vec<HeldDelivery> {
        let mut state = self.lock();
        rows.into_iter()
            .map(|row| {
                state.seqs.insert(row.seq);
                HeldDelivery::new(row, holder.clone())
            })
            .collect()
    }

    fn held(&self) -> usize {
        self.lock().seqs.len()
    }

    fn unhold(&self, seq: u64) {
        let mut state = self.lock();
        if state.seqs.remove(&seq) && state.reading > 0 {
            state.stale.insert(seq);
        }
    }
}

/// One endpoint's deliveries in memory: what its queues hold and its cursor. Shared by every
/// queue the store gives out for the endpoint, so a queue made on a reload never hands out
/// what the previous one's attempts still hold, and continues its cursor.
#[derive(Debug)]
pub(super) struct EndpointState {
    held: HeldSet,
    lane: Mutex<Lane>,
    /// One cursor scan at a time (two would hand out the same events).
    scanning: tokio::sync::Mutex<()>,
}

impl EndpointState {
    fn lane(&self) -> MutexGuard<'_, Lane> {
        self.lane
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How far the endpoint's deliveries are known done in memory (at least the saved
    /// cursor): the admin API's pending list starts above it.
    pub(super) fn watermark(&self) -> u64 {
        self.lane().watermark()
    }
}

impl Holder for EndpointState {
    fn unhold(&self, seq: u64) {
        // Back to the cursor's open events first, so the next `due` offers it again.
        self.lane().release(seq);
        self.held.unhold(seq);
    }
}

/// Every endpoint's [`EndpointState`], by endpoint name (one small entry per endpoint ever
/// asked for a queue: the configured endpoints).
#[derive(Debug, Default)]
pub(super) struct Endpoints {
    by_name: Mutex<HashMap<String, Arc<EndpointState>>>,
}

impl Endpoints {
    fn map(&self) -> MutexGuard<'_, HashMap<String, Arc<EndpointState>>> {
        self.by_name
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `endpoint`'s state, if a queue was made for it.
    pub(super) fn get(&self, endpoint: &str) -> Option<Arc<EndpointState>> {
        self.map().get(endpoint).cloned()
    }

    /// `endpoint`'s state, created with its cursor at `saved` the first time.
    pub(super) fn of(&self, endpoint: &str, saved: u64) -> Arc<EndpointState> {
        self.map()
            .entry(endpoint.to_string())
            .or_insert_with(|| {
                Arc::new(EndpointState {
                    held: HeldSet::default(),
                    lane: Mutex::new(Lane::new(saved)),
                    scanning: tokio::sync::Mutex::new(()),
                })
            })
            .clone()
    }
}

/// Saves `endpoint`'s cursor for as long as the lane says a save is due now; `Some(at)`:
/// one more is due at `at` (the caller schedules it: the lane counts it as scheduled).
async fn save_while_due(
    state: &EndpointState,
    writer: &Writer,
    endpoint: &str,
) -> Option<tokio::time::Instant> {
    loop {
        let step = state.lane().begin_save(tokio::time::Instant::now());
        let seq = match step {
            SaveStep::Now(seq) => seq,
            SaveStep::At(at) => return Some(at),
            SaveStep::Nothing => return None,
        };
        let mut saving = Saving { state, saved: None };
        match writer.save_cursor(endpoint, seq).await {
            Ok(()) => saving.saved = Some(seq),
            // Kept in memory; the next delivery tries again. A crash meanwhile sends the
            // deliveries above the saved cursor again.
            Err(e) => {
                warn!(webhook = %endpoint, error = %e, "cannot save the delivery cursor");
                return None;
            }
        }
    }
}

/// Ends a cursor save on every path: a save whose future is dropped half-way must not leave
/// the lane believing one is still under way (no save would ever start again).
struct Saving<'a> {
    state: &'a EndpointState,
    saved: Option<u64>,
}

impl Drop for Saving<'_> {
    fn drop(&mut self) {
        self.state.lane().saved(self.saved);
    }
}

/// One endpoint's queue on the embedded store. It shares the store's writer and readers, so
/// the writer thread runs until the store and every queue are dropped.
pub(super) struct EmbeddedQueue {
    pub(super) endpoint: String,
    pub(super) options: QueueOptions,
    pub(super) writer: Writer,
    pub(super) readers: Readers,
    pub(super) state: Arc<EndpointState>,
    /// The journal's head (the last seq committed).
    pub(super) head: Arc<AtomicU64>,
    /// The next retry time the last `due` read, and the time it was asked at.
    pub(super) next_due: Mutex<Option<(i64, Option<i64>)>>,
}

impl EmbeddedQueue {
    fn next_due_read(&self) -> MutexGuard<'_, Option<(i64, Option<i64>)>> {
        self.next_due
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn holder(&self) -> Arc<dyn Holder> {
        self.state.clone()
    }

    /// Offers again, held, up to `room` of the cursor's deliveries that were handed back.
    async fn released(&self, room: usize) -> Result<Vec<HeldDelivery>, StoreError> {
        let seqs = self.state.lane().take_released(room);
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let wanted = seqs.clone();
        let rows = match self
            .readers
            .with_reader(move |conn| queries::by_seqs(conn, &wanted))
            .await
        {
            Ok(rows) => rows,
            Err(e) => {
                let mut lane = self.state.lane();
                for seq in seqs {
                    lane.release(seq);
                }
                return Err(e);
            }
        };
        // One no longer journalled was made a row by retention: the row delivers it.
        if rows.len() < seqs.len() {
            let mut lane = self.state.lane();
            for seq in seqs.iter().filter(|s| !rows.iter().any(|r| r.seq == **s)) {
                lane.finish(*seq);
            }
        }
        Ok(self.state.held.hold(&self.holder(), rows))
    }

    /// Holds and hands out the first `want` of `rows`, which a scan read from the cursor
    /// (`after`) up to `through`, asked for up to `asked`; returns them and whether the scan
    /// examined everything up to `through`.
    fn take_scanned(
        &self,
        rows: Vec<DueDelivery>,
        after: u64,
        through: u64,
        asked: usize,
        want: usize,
    ) -> (Vec<HeldDelivery>, bool) {
        let complete = rows.len() < asked && rows.len() <= want;
        let mut rows = rows;
        rows.truncate(want);
        // An answer cut short (by the query's limit or here) examined the journal only up
        // to its last event kept.
        let through = if complete {
            through
        } else {
            rows.last().map_or(after, |last| last.seq)
        };
        let seqs: Vec<u64> = rows.iter().map(|r| r.seq).collect();
        self.state.lane().scanned_through(through, &seqs);
        (self.state.held.hold(&self.holder(), rows), complete)
    }

    /// Reads, holds and hands out up to `room` more events from the cursor on, a chunk at a
    /// time, up to the head (the caller holds the endpoint's scan turn).
    async fn scan_more(&self, room: usize) -> Result<Vec<HeldDelivery>, StoreError> {
        let mut out = Vec::new();
        loop {
            let after = self.state.lane().scanned();
            // Every seq up to the head is committed, so a read starting after this sees it.
            let head = self.head.load(Ordering::Acquire);
            let want = room.saturating_sub(out.len());
            if after >= head || want == 0 {
                return Ok(out);
            }
            let through = head.min(after.saturating_add(SCAN_CHUNK));
            let endpoint = self.endpoint.clone();
            let limit = to_i64(want as u64);
            let rows = self
                .readers
                .with_reader(move |conn| queries::scan(conn, &endpoint, after, through, limit))
                .await?;
            let (held, _) = self.take_scanned(rows, after, through, want, want);
            out.extend(held);
        }
    }

    /// Moves the saved cursor up to what is done: now, or (the last save being too recent)
    /// by a task at the time the lane names, so the last advance is saved even when no
    /// delivery follows it.
    async fn save_cursor(&self) {
        let Some(at) = save_while_due(&self.state, &self.writer, &self.endpoint).await else {
            return;
        };
        let (state, writer, endpoint) = (
            self.state.clone(),
            self.writer.clone(),
            self.endpoint.clone(),
        );
        tokio::spawn(async move {
            let mut at = at;
            loop {
                tokio::time::sleep_until(at).await;
                state.lane().deferred_due();
                match save_while_due(&state, &writer, &endpoint).await {
                    Some(later) => at = later,
                    None => return,
                }
            }
        });
    }

    /// An ordered endpoint works on rows: the events its cursor has not reached become
    /// pending rows (with their subjects), and the cursor moves to the head.
    async fn materialise(&self, now_ms: i64) -> Result<(), StoreError> {
        let head = self.head.load(Ordering::Acquire);
        if self.state.lane().scanned() >= head {
            return Ok(());
        }
        self.writer
            .materialise(&self.endpoint, head, now_ms)
            .await?;
        let mut lane = self.state.lane();
        lane.scanned_through(head, &[]);
        lane.saved(Some(head));
        Ok(())
    }
}

#[async_trait]
impl DeliveryQueue for EmbeddedQueue {
    async fn due(&self, now_ms: i64, limit: usize) -> Result<Vec<HeldDelivery>, StoreError> {
        let room = limit.min(self.options.max_held.saturating_sub(self.state.held.held()));
        if room == 0 {
            return Ok(Vec::new());
        }
        let ordered = self.options.ordered;
        let mut out = Vec::new();
        if ordered {
            self.materialise(now_ms).await?;
        } else {
            out = self.released(room).await?;
            if out.len() >= room {
                return Ok(out);
            }
        }
        // One read for the rows due, the cursor's next chunk and the next retry time (the
        // dispatcher asks for it next): one trip to the reader per refill.
        let turn = if ordered {
            None
        } else {
            self.state.scanning.try_lock().ok()
        };
        let after = self.state.lane().scanned();
        let head = self.head.load(Ordering::Acquire);
        let through = head.min(after.saturating_add(SCAN_CHUNK));
        let scan = turn.is_some() && after < head;
        let want = room.saturating_sub(out.len());
        let (held, reading) = self.state.held.begin();
        let endpoint = self.endpoint.clone();
        // Held rows are still pending (and due) in the file: read enough to pass them.
        let row_limit = to_i64(want.saturating_add(held) as u64);
        let scan_limit = to_i64(want as u64);
        let (rows, scanned, next) = self
            .readers
            .with_reader(move |conn| {
                let rows = queries::due(conn, &endpoint, now_ms, row_limit, ordered)?;
                let scanned = if scan {
                    Some(queries::scan(conn, &endpoint, after, through, scan_limit)?)
                } else {
                    None
                };
                let next = queries::next_due(conn, &endpoint, now_ms)?;
                Ok((rows, scanned, next))
            })
            .await?;
        *self.next_due_read() = Some((now_ms, next));
        out.extend(self.state.held.take(&self.holder(), reading, rows, want));
        if let Some(scanned) = scanned {
            // The rows due took their share of the room first.
            let left = room.saturating_sub(out.len());
            let (held, complete) = self.take_scanned(scanned, after, through, want, left);
            out.extend(held);
            // A sparse endpoint's chunk may hold fewer of its events than there is room for.
            if complete && through < head && out.len() < room {
                let more = self.scan_more(room.saturating_sub(out.len())).await?;
                out.extend(more);
            }
        }
        drop(turn);
        out.sort_by_key(|d| d.seq);
        Ok(out)
    }

    async fn next_due(&self, after_ms: i64) -> Result<Option<i64>, StoreError> {
        // Read by the `due` just before, in the same snapshot (a retry recorded since then
        // wakes the dispatcher anyway).
        if let Some((at, next)) = self.next_due_read().take() {
            if at == after_ms {
                return Ok(next);
            }
        }
        let endpoint = self.endpoint.clone();
        self.readers
            .with_reader(move |conn| queries::next_due(conn, &endpoint, after_ms))
            .await
    }

    async fn record(
        &self,
        held: HeldDelivery,
        attempt: AttemptRecord,
        next: NextStep,
    ) -> Result<(), StoreError> {
        let seq = held.seq;
        let from_cursor = self.state.lane().is_open(seq);
        let result = if from_cursor && next == NextStep::Delivered {
            // Nothing to write for it: the cursor moves past it.
            Ok(())
        } else {
            // The handle lives across the write: if this future is dropped half-way, the
            // handle releases the delivery.
            self.writer
                .record(&self.endpoint, seq, attempt, next, from_cursor)
                .await
        };
        // Answered: from here on this function un-holds it, not the handle.
        drop(held.into_delivery());
        // Un-held only now that the outcome is committed (or failed: then it is still owed
        // and goes out again).
        {
            let mut lane = self.state.lane();
            match &result {
                Ok(()) => lane.finish(seq),
                Err(_) => lane.release(seq),
            }
        }
        self.state.held.unhold(seq);
        if from_cursor && result.is_ok() {
            self.save_cursor().await;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{queue_options, received, temp_db};
    use super::super::EmbeddedStore;
    use super::Endpoints;
    use crate::storage::config::Durability;
    use crate::storage::{
        AttemptRecord, DeliveryState, DueDelivery, HeldDelivery, NextStep, QueueOptions, Store,
    };

    fn options(max_held: usize) -> QueueOptions {
        QueueOptions {
            max_held,
            ..queue_options()
        }
    }

    fn attempt() -> AttemptRecord {
        AttemptRecord {
            at_ms: 0,
            status: Some(500),
            error: None,
            duration_ms: 1,
        }
    }

    fn seqs(due: &[HeldDelivery]) -> Vec<u64> {
        due.iter().map(|d| d.seq).collect()
    }

    /// A store at `name` with `n` events routed to `hook`.
    async fn store_with(name: &str, n: usize) -> std::sync::Arc<EmbeddedStore> {
        let store = EmbeddedStore::open(&temp_db(name), Durability::Normal).unwrap();
        let batch = (0..n)
            .map(|i| received(&format!("e{i}"), chrono::Duration::zero(), &["hook"]))
            .collect();
        store.append(batch).await.unwrap();
        store
    }

    #[tokio::test]
    async fn a_delivery_handed_out_is_not_handed_out_again_until_answered_or_released() {
        let store = store_with("held-once", 3).await;
        let q = store.delivery_queue("hook", options(16)).await.unwrap();
        let first = q.due(i64::MAX, 2).await.unwrap();
        assert_eq!(seqs(&first), [1, 2]);
        // The held two are still pending in the file, yet only the third goes out.
        let second = q.due(i64::MAX, 10).await.unwrap();
        assert_eq!(seqs(&second), [3]);
        assert!(q.due(i64::MAX, 10).await.unwrap().is_empty(), "all held");
        // A second queue for the same endpoint (a reload's) sees the same held deliveries.
        let again = store.delivery_queue("hook", options(16)).await.unwrap();
        assert!(again.due(i64::MAX, 10).await.unwrap().is_empty());
        // Released (not attempted): offered again at once, to either queue.
        let mut first = first.into_iter();
        q.release(first.next().unwrap());
        drop(second);
        assert_eq!(seqs(&again.due(i64::MAX, 10).await.unwrap()), [1, 3]);
        // That answer was dropped unanswered: 1 and 3 are free again; 2 is still held.
        let due = q.due(i64::MAX, 10).await.unwrap();
        assert_eq!(seqs(&due), [1, 3]);
        drop(first);
        drop(due);
        let _ = std::fs::remove_dir_all(temp_db("held-once").parent().unwrap().parent().unwrap());
    }

    fn row(seq: u64) -> DueDelivery {
        DueDelivery {
            seq,
            id: format!("e{seq}"),
            ..DueDelivery::default()
        }
    }

    #[test]
    fn a_delivery_un_held_while_a_query_reads_is_not_handed_out_from_that_read() {
        let endpoints = Endpoints::default();
        let state = endpoints.of("hook", 0);
        let holder: std::sync::Arc<dyn crate::storage::Holder> = state.clone();
        let set = &state.held;
        let (_, reading) = set.begin();
        let held = set.take(&holder, reading, vec![row(1), row(2)], 10);
        assert_eq!(seqs(&held), [1, 2]);
        // A query starts; meanwhile 1's outcome is committed and it is un-held.
        let (n, reading) = set.begin();
        assert_eq!(n, 2);
        let mut held = held.into_iter();
        drop(held.next());
        // The query's row of 1 predates that commit: not handed out; 3 is.
        let out = set.take(&holder, reading, vec![row(1), row(3)], 10);
        assert_eq!(seqs(&out), [3]);
        // The next query reads afresh: 1 goes out again.
        let (_, reading) = set.begin();
        assert_eq!(seqs(&set.take(&holder, reading, vec![row(1)], 10)), [1]);
        // Un-held with no query running: nothing is marked stale.
        drop(out);
        let (_, reading) = set.begin();
        assert_eq!(seqs(&set.take(&holder, reading, vec![row(3)], 10)), [3]);
        drop(held);
    }

    #[tokio::test]
    async fn a_recorded_retry_comes_back_when_due_and_a_delivered_one_never() {
        let store = store_with("held-recorded", 2).await;
        let q = store.delivery_queue("hook", options(16)).await.unwrap();
        // Enqueued due at their receive time, which is now.
        let t = chrono::Utc::now().timestamp_millis() + 1_000;
        let mut due = q.due(t, 10).await.unwrap().into_iter();
        let (one, two) = (due.next().unwrap(), due.next().unwrap());
        q.record(one, attempt(), NextStep::RetryAt(t + 5_000))
            .await
            .unwrap();
        q.record(two, attempt(), NextStep::Delivered).await.unwrap();
        // Recorded: no longer held, but the retry is not due before its time.
        assert!(q.due(t + 4_999, 10).await.unwrap().is_empty());
        assert_eq!(q.next_due(t).await.unwrap(), Some(t + 5_000));
        let again = q.due(t + 5_000, 10).await.unwrap();
        assert_eq!(seqs(&again), [1]);
        assert_eq!(again[0].attempts, 1, "the recorded attempt counts");
        drop(again);
        let pending = store
            .deliveries("hook", DeliveryState::Pending, 10)
            .await
            .unwrap();
        assert_eq!(pending.iter().map(|d| d.seq).collect::<Vec<_>>(), [1]);
        let _ =
            std::fs::remove_dir_all(temp_db("held-recorded").parent().unwrap().parent().unwrap());
    }

    #[tokio::test]
    async fn the_queue_holds_at_most_max_held() {
        let store = store_with("held-bound", 5).await;
        let q = store.delivery_queue("hook", options(2)).await.unwrap();
        let mut due = q.due(i64::MAX, 10).await.unwrap();
        assert_eq!(seqs(&due), [1, 2], "bounded by max_held, not by the limit");
        assert!(q.due(i64::MAX, 10).await.unwrap().is_empty());
        let answered = due.remove(0);
        q.record(answered, attempt(), NextStep::Delivered)
            .await
            .unwrap();
        assert_eq!(seqs(&q.due(i64::MAX, 10).await.unwrap()), [3]);
        let _ = std::fs::remove_dir_all(temp_db("held-bound").parent().unwrap().parent().unwrap());
    }

    #[tokio::test]
    async fn an_ordered_endpoint_holds_back_the_subject_of_a_held_delivery() {
        // Every test event has the same subject.
        let store = store_with("held-ordered", 2).await;
        let q = ordered_queue(&store).await;
        let mut due = q.due(i64::MAX, 10).await.unwrap();
        assert_eq!(seqs(&due), [1]);
        assert!(q.due(i64::MAX, 10).await.unwrap().is_empty(), "1 is held");
        q.record(due.remove(0), attempt(), NextStep::Delivered)
            .await
            .unwrap();
        assert_eq!(seqs(&q.due(i64::MAX, 10).await.unwrap()), [2]);
        let _ =
            std::fs::remove_dir_all(temp_db("held-ordered").parent().unwrap().parent().unwrap());
    }

    /// An ordered queue for "hook".
    async fn ordered_queue(
        store: &EmbeddedStore,
    ) -> std::sync::Arc<dyn crate::storage::DeliveryQueue> {
        let options = QueueOptions {
            ordered: true,
            ..options(16)
        };
        store.delivery_queue("hook", options).await.unwrap()
    }

    /// Events routed to "hook" with the given subjects, in order.
    async fn store_with_subjects(name: &str, subjects: &[&str]) -> std::sync::Arc<EmbeddedStore> {
        let store = EmbeddedStore::open(&temp_db(name), Durability::Normal).unwrap();
        let batch = subjects
            .iter()
            .enumerate()
            .map(|(i, subject)| {
                let mut e = received(&format!("e{i}"), chrono::Duration::zero(), &["hook"]);
                e.envelope.subject = Some((*subject).to_string());
                crate::storage::NewEvent::new(e.envelope, e.targets).unwrap()
            })
            .collect();
        store.append(batch).await.unwrap();
        store
    }

    #[tokio::test]
    async fn an_ordered_endpoint_orders_each_subject_on_its_own() {
        let store = store_with_subjects("ordered-subjects", &["a", "a", "b"]).await;
        let q = ordered_queue(&store).await;
        // 2 waits behind 1 (subject a); 3 (subject b) does not.
        assert_eq!(seqs(&q.due(i64::MAX, 10).await.unwrap()), [1, 3]);
        let _ = std::fs::remove_dir_all(
            temp_db("ordered-subjects")
                .parent()
                .unwrap()
                .parent()
                .unwrap(),
        );
    }

    #[tokio::test]
    async fn a_first_attempt_writes_nothing_unless_it_fails_and_the_cursor_survives_a_restart() {
        let path = temp_db("cursor-restart");
        let rows = |path: &std::path::Path| -> i64 {
            let conn = rusqlite::Connection::open(path).unwrap();
            conn.query_row("SELECT COUNT(*) FROM deliveries", [], |r| r.get(0))
                .unwrap()
        };
        let t = chrono::Utc::now().timestamp_millis() + 1_000;
        {
            let store = store_with("cursor-restart", 4).await;
            let q = store.delivery_queue("hook", options(16)).await.unwrap();
            let mut due = q.due(t, 10).await.unwrap().into_iter();
            let (one, two, three) = (
                due.next().unwrap(),
                due.next().unwrap(),
                due.next().unwrap(),
            );
            let four = due.next().unwrap();
            q.record(one, attempt(), NextStep::Delivered).await.unwrap();
            assert_eq!(rows(&path), 0, "a delivery made at once leaves no row");
            q.record(two, attempt(), NextStep::RetryAt(t + 5_000))
                .await
                .unwrap();
            assert_eq!(rows(&path), 1, "a failed one gets its row");
            q.record(four, attempt(), NextStep::Delivered)
                .await
                .unwrap();
            // 3 is still held (its attempt runs) when the process dies.
            std::mem::forget(three);
        }
        let store = EmbeddedStore::open(&path, Durability::Normal).unwrap();
        let q = store.delivery_queue("hook", options(16)).await.unwrap();
        // The cursor stopped below 3: 3 and 4 again (at-least-once), 1 never; 2 at its time.
        let due = q.due(t, 10).await.unwrap();
        assert_eq!(seqs(&due), [3, 4]);
        drop(due);
        let retry = q.due(t + 5_000, 10).await.unwrap();
        assert_eq!(seqs(&retry), [2, 3, 4]);
        assert_eq!(retry[0].attempts, 1);
        let pending = store
            .deliveries("hook", DeliveryState::Pending, 10)
            .await
            .unwrap();
        assert_eq!(pending.iter().map(|d| d.seq).collect::<Vec<_>>(), [2, 3, 4]);
        assert_eq!(store.counts("hook").await.unwrap().pending, 3);
        drop(retry);
        let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
    }

    #[tokio::test]
    async fn a_replayed_event_above_the_cursor_is_delivered_once_by_its_row() {
        let store = store_with("cursor-replay", 2).await;
        // Replayed before the cursor reached it: the row delivers it, the cursor skips it.
        assert_eq!(
            store
                .replay(
                    "hook",
                    crate::storage::ReplaySelection::Seqs { from: 2, to: 2 }
                )
                .await
                .unwrap(),
            1
        );
        let q = store.delivery_queue("hook", options(16)).await.unwrap();
        let due = q.due(i64::MAX, 10).await.unwrap();
        assert_eq!(seqs(&due), [1, 2]);
        for d in due {
            q.record(d, attempt(), NextStep::Delivered).await.unwrap();
        }
        assert!(q.due(i64::MAX, 10).await.unwrap().is_empty());
        let _ =
            std::fs::remove_dir_all(temp_db("cursor-replay").parent().unwrap().parent().unwrap());
    }

    #[tokio::test]
    async fn owed_events_are_counted_exactly_near_the_cursor_and_bounded_beyond() {
        let store = store_with("owed-window", 10_000).await;
        let unrouted = (0..100)
            .map(|i| received(&format!("u{i}"), chrono::Duration::zero(), &[]))
            .collect();
        store.append(unrouted).await.unwrap();
        // The 10,000 positions above the cursor are examined; the 100 beyond count as owed
        // (an upper bound), so a count never reads more than the window.
        assert_eq!(store.counts("hook").await.unwrap().pending, 10_100);
        let q = store.delivery_queue("hook", options(16)).await.unwrap();
        let due = q.due(i64::MAX, 16).await.unwrap();
        for d in due {
            q.record(d, attempt(), NextStep::Delivered).await.unwrap();
        }
        // The window now starts above 16: 9,984 owed in it, plus the 84 positions beyond.
        assert_eq!(store.counts("hook").await.unwrap().pending, 9_984 + 84);
        let _ = std::fs::remove_dir_all(temp_db("owed-window").parent().unwrap().parent().unwrap());
    }

    #[tokio::test]
    async fn the_last_advance_is_saved_even_when_no_delivery_follows() {
        let path = temp_db("cursor-trailing");
        let store = store_with("cursor-trailing", 2).await;
        let q = store.delivery_queue("hook", options(16)).await.unwrap();
        let mut due = q.due(i64::MAX, 10).await.unwrap().into_iter();
        let (one, two) = (due.next().unwrap(), due.next().unwrap());
        q.record(one, attempt(), NextStep::Delivered).await.unwrap();
        // Within the save interval of the first save: this one is saved later, by itself.
        q.record(two, attempt(), NextStep::Delivered).await.unwrap();
        let saved = || -> i64 {
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.query_row("SELECT seq FROM cursors WHERE endpoint = 'hook'", [], |r| {
                r.get(0)
            })
            .unwrap()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while saved() < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "the trailing save never came"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
    }
}
