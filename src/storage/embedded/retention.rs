//! Retention: the writer thread prunes events older than `storage.retention`, a bounded
//! chunk at a time, keeping those a webhook delivery still refers to and every event a
//! durable consumer may still need, and records how far it got (`pruned_through` in `meta`)
//! so that a reader asking for a pruned seq is told.
//!
//! Durable consumers: no event at or above the lowest `keep_from` of the saved durables is
//! pruned, and the retention point stays below it, so the durable reads what it still owes
//! through the ordinary journal reads (a delivery's event kept below the retention point
//! could not be read that way). Deleting the durable (by the runtime's `durable_ttl`, or the
//! admin API) lets the next pass prune again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection};
use tracing::{info, warn};

use super::{db, to_i64};
use crate::storage::StoreError;

/// How often the writer looks for events to prune, busy or idle.
const PRUNE_EVERY: Duration = Duration::from_secs(30);
/// The most events one pruning pass deletes (one short transaction, so ingest barely waits).
const PRUNE_CHUNK: i64 = 20_000;

/// When the writer prunes next: at once on start, then every [`PRUNE_EVERY`], or again
/// straight away while a pass finds a full chunk. Without retention it never prunes.
pub(super) struct Schedule {
    retention: Option<Duration>,
    next: Instant,
}

impl Schedule {
    /// A schedule for `retention` (`None`: keep everything), first due now.
    pub(super) fn new(retention: Option<Duration>) -> Schedule {
        Schedule {
            retention,
            next: Instant::now(),
        }
    }

    /// Prunes one chunk if a pass is due, and plans the next pass.
    pub(super) fn run_if_due(&mut self, conn: &mut Connection, pruned: &AtomicU64) {
        let Some(retention) = self.retention else {
            return;
        };
        if Instant::now() < self.next {
            return;
        }
        let cutoff_ms = chrono::Utc::now().timestamp_millis()
            - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        match prune(conn, cutoff_ms, pruned) {
            // A full chunk: there is more; go again soon, between batches.
            Ok(n) if n >= PRUNE_CHUNK as u64 => {}
            Ok(_) => self.next = Instant::now() + PRUNE_EVERY,
            Err(e) => {
                warn!(error = %e, "pruning the journal failed; will try again");
                self.next = Instant::now() + PRUNE_EVERY;
            }
        }
    }

    /// How long the writer may wait for a command before the next pass is due (`None`: no
    /// retention, wait as long as it takes).
    pub(super) fn wait(&self) -> Option<Duration> {
        self.retention
            .map(|_| self.next.saturating_duration_since(Instant::now()))
    }
}

/// The retention point recorded by earlier pruning (0: nothing pruned yet).
pub(super) fn load_pruned_through(conn: &Connection) -> Result<u64, StoreError> {
    super::schema::meta_number(conn, "pruned_through", "read retention point")
}

/// Deletes up to [`PRUNE_CHUNK`] of the oldest events received before `cutoff_ms`, except
/// those a webhook delivery still refers to, and moves the retention point past them, but
/// never up to the lowest `keep_from` of a saved durable consumer. Returns how many seqs the
/// retention point advanced.
pub(super) fn prune(
    conn: &mut Connection,
    cutoff_ms: i64,
    pruned: &AtomicU64,
) -> Result<u64, StoreError> {
    let from = to_i64(pruned.load(Ordering::Acquire));
    let tx = conn.transaction().map_err(db("begin prune"))?;
    // The last seq retention may delete: below every durable's `keep_from`. A handful of
    // rows (`max_durables` per consumer), read once per pass.
    let keep_from: Option<i64> = tx
        .query_row("SELECT MIN(keep_from) FROM durables", [], |r| r.get(0))
        .map_err(db("read durables' positions"))?;
    let last_prunable = keep_from.map_or(i64::MAX, |k| k.saturating_sub(1));
    // Seqs follow receive order (give or take clock steps), so the oldest events are the
    // lowest seqs: walk up from the retention point and stop at the first one to keep.
    let through: Option<i64> = {
        let mut stmt = tx
            .prepare_cached(
                "SELECT seq, recv_ms FROM events WHERE seq > ?1 AND seq <= ?3 ORDER BY seq LIMIT ?2",
            )
            .map_err(db("prepare prune"))?;
        let rows = stmt
            .query_map(params![from, PRUNE_CHUNK, last_prunable], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
            })
            .map_err(db("select prune"))?;
        let mut through = None;
        for row in rows {
            let (seq, recv_ms) = row.map_err(db("select prune"))?;
            if recv_ms >= cutoff_ms {
                break;
            }
            through = Some(seq);
        }
        through
    };
    // Events held back below the retention point for a delivery that has since ended (not
    // those a durable created since, or moved back, may still need).
    let released = tx
        .execute(
            "DELETE FROM events WHERE seq <= ?1 AND seq NOT IN (SELECT seq FROM deliveries WHERE seq <= ?1)",
            params![from.min(last_prunable)],
        )
        .map_err(db("prune held events"))?;
    let Some(through) = through else {
        if released > 0 {
            tx.commit().map_err(db("commit prune"))?;
        }
        return Ok(0);
    };
    // A cursor below the new retention point still owes the events above it: they become
    // rows (kept below the retention point like any pending delivery) and the cursor moves
    // up. Only an endpoint a retention period behind (disabled, failing, or gone from the
    // config) has such a cursor; the endpoints are those with a cursor and those the pruned
    // events name (one that never had a queue starts at the floor).
    let mut owed: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    {
        let mut stmt = tx
            .prepare_cached(
                "SELECT endpoint FROM cursors WHERE seq < ?2
                 UNION SELECT DISTINCT targets FROM events WHERE seq > ?1 AND seq <= ?2 AND targets IS NOT NULL",
            )
            .map_err(db("read delivery cursors"))?;
        let rows = stmt
            .query_map(params![from, through], |r| r.get::<_, String>(0))
            .map_err(db("read delivery cursors"))?;
        for row in rows {
            let row = row.map_err(db("read delivery cursors"))?;
            owed.extend(row.split(',').filter(|n| !n.is_empty()).map(str::to_string));
        }
    }
    let now_ms = chrono::Utc::now().timestamp_millis();
    for endpoint in owed {
        super::writer::materialise(&tx, &endpoint, u64::try_from(through).unwrap_or(0), now_ms)?;
    }
    let deleted = tx
        .execute(
            "DELETE FROM events WHERE seq > ?1 AND seq <= ?2
             AND seq NOT IN (SELECT seq FROM deliveries WHERE seq > ?1 AND seq <= ?2)",
            params![from, through],
        )
        .map_err(db("prune events"))?;
    // Past retention is past the dedup window: such an id coming back is a new event anyway.
    tx.execute(
        "DELETE FROM latest WHERE seq > ?1 AND seq <= ?2",
        params![from, through],
    )
    .map_err(db("prune dedup records"))?;
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('pruned_through', ?1)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![through.to_string()],
    )
    .map_err(db("record retention point"))?;
    tx.commit().map_err(db("commit prune"))?;
    pruned.store(through as u64, Ordering::Release);
    info!(through, deleted, "journal pruned by retention");
    Ok((through - from) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::config::Durability;
    use crate::storage::embedded::schema::open_connection;
    use crate::storage::embedded::test_support::{new, queue_options, received, temp_db};
    use crate::storage::embedded::{EmbeddedOptions, EmbeddedStore};
    use crate::storage::{Appended, AttemptRecord, JournalPosition, NextStep, Store};

    /// Waits (with a deadline) until the store's first retained seq is `first`.
    async fn wait_first(store: &EmbeddedStore, first: u64) -> JournalPosition {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let pos = store.position().await.unwrap();
            if pos.first == first {
                return pos;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never pruned: {pos:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Opens the store at `path` with an hour of retention.
    fn open_with_an_hour(path: &std::path::Path) -> std::sync::Arc<EmbeddedStore> {
        EmbeddedStore::open_with(
            path,
            EmbeddedOptions {
                retention: Some(std::time::Duration::from_secs(3600)),
                ..EmbeddedOptions::default()
            },
        )
        .unwrap()
    }

    /// Retention keeps every event from the lowest `keep_from` of the saved durables on, and
    /// prunes again once the durable holding it back is deleted.
    #[tokio::test]
    async fn retention_keeps_what_durables_still_need_and_prunes_again_after_delete() {
        use crate::storage::embedded::test_support::durable;
        let path = temp_db("retention-durables");
        let old = chrono::Duration::hours(2);
        {
            let store = EmbeddedStore::open(&path, Durability::Normal).unwrap();
            store
                .append(vec![
                    received("a", old, &[]),
                    received("b", old, &[]),
                    received("c", old, &[]),
                    received("d", old, &[]),
                    received("e", chrono::Duration::zero(), &[]),
                ])
                .await
                .unwrap();
            store
                .save_durable(durable("c1", "slow", "", 3))
                .await
                .unwrap();
            store
                .save_durable(durable("c2", "less", "", 4))
                .await
                .unwrap();
        }
        {
            let store = open_with_an_hour(&path);
            // 1..=4 are old, but "slow" still needs 3 on: the journal starts at 3.
            let pos = wait_first(&store, 3).await;
            assert_eq!(pos.head, 5);
            assert_eq!(
                store
                    .read_from(3, 10)
                    .await
                    .unwrap()
                    .iter()
                    .map(|e| e.seq)
                    .collect::<Vec<_>>(),
                vec![3, 4, 5]
            );
            assert!(matches!(
                store.read_from(2, 10).await,
                Err(StoreError::NotRetained { from: 2, first: 3 })
            ));
            // However far the cutoff, a pass does not go past it.
            let mut side = open_connection(&path, Durability::Normal).unwrap();
            let now_ms = chrono::Utc::now().timestamp_millis() + 1;
            assert_eq!(prune(&mut side, now_ms, &AtomicU64::new(2)).unwrap(), 0);
            let kept: i64 = side
                .query_row("SELECT COUNT(*) FROM events WHERE seq >= 3", [], |r| {
                    r.get(0)
                })
                .unwrap();
            assert_eq!(kept, 3);
            assert!(store
                .delete_durable(&durable("c1", "slow", "", 0).key)
                .await
                .unwrap());
        }
        {
            // Without "slow", "less" holds the journal at 4.
            let store = open_with_an_hour(&path);
            wait_first(&store, 4).await;
            assert!(store
                .delete_durable(&durable("c2", "less", "", 0).key)
                .await
                .unwrap());
        }
        let store = open_with_an_hour(&path);
        let pos = wait_first(&store, 5).await;
        assert_eq!(pos.head, 5);
        let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
    }

    #[tokio::test]
    async fn retention_prunes_old_events_but_keeps_pending_deliveries_and_the_head() {
        let path = temp_db("retention");
        let old = chrono::Duration::hours(2);
        {
            let store = EmbeddedStore::open(&path, Durability::Normal).unwrap();
            store
                .append(vec![
                    received("a", old, &[]),
                    received("b", old, &["crm"]),
                    received("c", old, &[]),
                    received("d", chrono::Duration::zero(), &[]),
                ])
                .await
                .unwrap();
        }
        let hour = Some(std::time::Duration::from_secs(3600));
        let store = EmbeddedStore::open_with(
            &path,
            EmbeddedOptions {
                retention: hour,
                ..EmbeddedOptions::default()
            },
        )
        .unwrap();
        // 1..=3 are older than the hour: the journal now starts at 4.
        let pos = wait_first(&store, 4).await;
        assert_eq!(pos.head, 4);
        assert!(matches!(
            store.read_from(2, 10).await,
            Err(StoreError::NotRetained { from: 2, first: 4 })
        ));
        assert_eq!(store.read_from(4, 10).await.unwrap().len(), 1);
        // b is still owed to a webhook: its delivery still has its bytes.
        let queue = store.delivery_queue("crm", queue_options()).await.unwrap();
        let mut due = queue.due(i64::MAX, 10).await.unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].seq, due[0].id.as_str()), (2, "b"));
        // Pruned ids are past the dedup window: "a" seen again is a new event, seq 5.
        let again = store
            .append(vec![received("a", chrono::Duration::zero(), &[])])
            .await
            .unwrap();
        assert!(matches!(again[0], Appended::Stored { seq: 5, .. }));
        // Once b is delivered, the next pass releases it too.
        let done = AttemptRecord {
            at_ms: 0,
            status: Some(200),
            error: None,
            duration_ms: 1,
        };
        queue
            .record(due.remove(0), done, NextStep::Delivered)
            .await
            .unwrap();
        let mut side = open_connection(&path, Durability::Normal).unwrap();
        prune(&mut side, 0, &AtomicU64::new(3)).unwrap();
        let held: i64 = side
            .query_row("SELECT COUNT(*) FROM events WHERE seq <= 3", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(held, 0);
        drop(store);

        // Everything old: the head survives a journal pruned empty, and seqs are not reused.
        let path = temp_db("retention-all");
        {
            let store = EmbeddedStore::open(&path, Durability::Normal).unwrap();
            store
                .append(vec![received("x", old, &[]), received("y", old, &[])])
                .await
                .unwrap();
        }
        {
            let store = EmbeddedStore::open_with(
                &path,
                EmbeddedOptions {
                    retention: hour,
                    ..EmbeddedOptions::default()
                },
            )
            .unwrap();
            wait_first(&store, 3).await;
        }
        let store = EmbeddedStore::open(&path, Durability::Normal).unwrap();
        let pos = store.position().await.unwrap();
        assert_eq!((pos.head, pos.first), (2, 3));
        let next = store.append(vec![new("z")]).await.unwrap();
        assert!(matches!(next[0], Appended::Stored { seq: 3, .. }));
        let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
    }
}
