//! The embedded store's delivery queue ([`DeliveryQueue`]): due rows read from the file, and
//! in memory, per endpoint, the seqs handed out and not yet answered ([`HeldSet`]). A held
//! row is still `pending` in the file (so a crash forgets nothing: it is sent again after a
//! restart); the set only keeps this process from handing it out twice. It is bounded by the
//! queue's `max_held`, and every entry leaves it when its handle is answered or dropped.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use super::queries::{self, Readers};
use super::to_i64;
use super::writer::Writer;
use crate::storage::{
    AttemptRecord, DeliveryQueue, DueDelivery, HeldDelivery, Holder, NextStep, QueueOptions,
    StoreError,
};

/// The seqs of one endpoint's deliveries handed out and not yet answered. Shared by every
/// queue the store gives out for that endpoint, so a queue made on a reload never hands out
/// what the previous one's attempts still hold.
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
    /// none un-held while the query ran.
    pub(super) fn take(
        self: &Arc<Self>,
        reading: Reading<'_>,
        rows: Vec<DueDelivery>,
        room: usize,
    ) -> Vec<HeldDelivery> {
        let holder: Arc<dyn Holder> = self.clone();
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

    fn held(&self) -> usize {
        self.lock().seqs.len()
    }
}

impl Holder for HeldSet {
    fn unhold(&self, seq: u64) {
        let mut state = self.lock();
        if state.seqs.remove(&seq) && state.reading > 0 {
            state.stale.insert(seq);
        }
    }
}

/// Every endpoint's [`HeldSet`], by endpoint name (one small entry per endpoint ever asked
/// for a queue: the configured endpoints).
#[derive(Debug, Default)]
pub(super) struct HeldSets {
    by_endpoint: Mutex<HashMap<String, Arc<HeldSet>>>,
}

impl HeldSets {
    /// `endpoint`'s set, created empty the first time.
    pub(super) fn of(&self, endpoint: &str) -> Arc<HeldSet> {
        let mut map = self
            .by_endpoint
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.entry(endpoint.to_string()).or_default().clone()
    }
}

/// One endpoint's queue on the embedded store. It shares the store's writer and readers, so
/// the writer thread runs until the store and every queue are dropped.
pub(super) struct EmbeddedQueue {
    pub(super) endpoint: String,
    pub(super) options: QueueOptions,
    pub(super) writer: Writer,
    pub(super) readers: Readers,
    pub(super) held: Arc<HeldSet>,
}

#[async_trait]
impl DeliveryQueue for EmbeddedQueue {
    async fn due(&self, now_ms: i64, limit: usize) -> Result<Vec<HeldDelivery>, StoreError> {
        let room = limit.min(self.options.max_held.saturating_sub(self.held.held()));
        if room == 0 {
            return Ok(Vec::new());
        }
        let (held, reading) = self.held.begin();
        // Held rows are still pending (and due) in the file: read enough to pass them.
        let endpoint = self.endpoint.clone();
        let ordered = self.options.ordered;
        let rows = to_i64(room.saturating_add(held) as u64);
        let rows = self
            .readers
            .with_reader(move |conn| queries::due(conn, &endpoint, now_ms, rows, ordered))
            .await?;
        Ok(self.held.take(reading, rows, room))
    }

    async fn next_due(&self, after_ms: i64) -> Result<Option<i64>, StoreError> {
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
        let result = self
            .writer
            .record(&self.endpoint, held.seq, attempt, next)
            .await;
        // Un-held only now that the outcome is committed (or failed: then it is still
        // pending and due, and goes out again), however this future ends.
        drop(held);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{queue_options, received, temp_db};
    use super::super::EmbeddedStore;
    use super::HeldSet;
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
        let set = std::sync::Arc::new(HeldSet::default());
        let (_, reading) = set.begin();
        let held = set.take(reading, vec![row(1), row(2)], 10);
        assert_eq!(seqs(&held), [1, 2]);
        // A query starts; meanwhile 1's outcome is committed and it is un-held.
        let (n, reading) = set.begin();
        assert_eq!(n, 2);
        let mut held = held.into_iter();
        drop(held.next());
        // The query's row of 1 predates that commit: not handed out; 3 is.
        let out = set.take(reading, vec![row(1), row(3)], 10);
        assert_eq!(seqs(&out), [3]);
        // The next query reads afresh: 1 goes out again.
        let (_, reading) = set.begin();
        assert_eq!(seqs(&set.take(reading, vec![row(1)], 10)), [1]);
        // Un-held with no query running: nothing is marked stale.
        drop(out);
        let (_, reading) = set.begin();
        assert_eq!(seqs(&set.take(reading, vec![row(3)], 10)), [3]);
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
        let q = store
            .delivery_queue(
                "hook",
                QueueOptions {
                    ordered: true,
                    ..options(16)
                },
            )
            .await
            .unwrap();
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
}
