//! The reader side of the embedded store: one connection for webhook queries, readiness
//! and the admin API, a small pool of connections for consumer replays, and the queries
//! they run. WAL lets every reader run while the writer commits.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension};

use super::cursor::target_pattern;
use super::schema::{meta_number, open_reader_connection, open_replay_connection, DEAD, PENDING};
use super::{db, to_i64, REPLAY_READERS};
use crate::storage::config::Durability;
use crate::storage::{
    AttemptRecord, DeliveryCounts, DeliveryInfo, DeliveryState, DueDelivery, DurableKey,
    SavedDurable, StoreError, StoredEvent,
};

/// The store's read connections (shared: each endpoint's delivery queue reads through a
/// clone).
#[derive(Clone)]
pub(super) struct Readers {
    reader: Arc<tokio::sync::Mutex<Connection>>,
    replay: Arc<ReplayReaders>,
}

/// The replay readers: idle connections and a semaphore that lets at most
/// [`REPLAY_READERS`] reads run; a connection lost to a failed read is reopened on demand.
struct ReplayReaders {
    turns: Arc<tokio::sync::Semaphore>,
    idle: Mutex<Vec<Connection>>,
    path: PathBuf,
    durability: Durability,
}

impl ReplayReaders {
    fn open(&self) -> Result<Connection, StoreError> {
        open_replay_connection(&self.path, self.durability)
    }
}

impl Readers {
    /// Opens the reader and the first replay reader of the file at `path`.
    pub(super) fn open(path: &Path, durability: Durability) -> Result<Readers, StoreError> {
        let reader = open_reader_connection(path, durability)?;
        let replay = ReplayReaders {
            turns: Arc::new(tokio::sync::Semaphore::new(REPLAY_READERS)),
            idle: Mutex::new(Vec::with_capacity(REPLAY_READERS)),
            path: path.to_path_buf(),
            durability,
        };
        let first_replay_reader = replay.open()?;
        if let Ok(mut idle) = replay.idle.lock() {
            idle.push(first_replay_reader);
        }
        Ok(Readers {
            reader: Arc::new(tokio::sync::Mutex::new(reader)),
            replay: Arc::new(replay),
        })
    }

    /// Runs `f` on the reader (waiting, asynchronously, for it).
    pub(super) async fn with_reader<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        // Waiting for the connection is async: a burst of queries does not park blocking
        // threads on a lock.
        let conn = self.reader.clone().lock_owned().await;
        tokio::task::spawn_blocking(move || f(&conn))
            .await
            .map_err(|_| StoreError::Closed)?
    }

    /// Runs `f` on a replay reader (waiting, asynchronously, for a free one).
    pub(super) async fn with_replay_reader<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let turn = self
            .replay
            .turns
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        let readers = self.replay.clone();
        tokio::task::spawn_blocking(move || {
            let idle = readers.idle.lock().ok().and_then(|mut i| i.pop());
            let conn = match idle {
                Some(c) => c,
                None => readers.open()?,
            };
            let out = f(&conn);
            if let Ok(mut idle) = readers.idle.lock() {
                idle.push(conn);
            }
            drop(turn);
            out
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }
}

/// Up to `limit` events from seq `from` on.
pub(super) fn read_from(
    conn: &Connection,
    from: i64,
    limit: i64,
) -> Result<Vec<StoredEvent>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT seq, id, body FROM events WHERE seq >= ?1 ORDER BY seq LIMIT ?2")
        .map_err(db("prepare read"))?;
    let rows = stmt
        .query_map(params![from, limit], |r| {
            Ok(StoredEvent {
                seq: r.get::<_, i64>(0)? as u64,
                id: r.get(1)?,
                bytes: Bytes::from(r.get::<_, Vec<u8>>(2)?),
            })
        })
        .map_err(db("read events"))?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(db("read events"))
}

/// Up to `limit` events from seq `from` on, stopping before the one that would take the page
/// past `max_bytes` (but never before the first).
pub(super) fn read_page(
    conn: &Connection,
    from: i64,
    limit: i64,
    max_bytes: usize,
) -> Result<Vec<StoredEvent>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT seq, id, length(body), body FROM events WHERE seq >= ?1 ORDER BY seq LIMIT ?2",
        )
        .map_err(db("prepare replay read"))?;
    let mut rows = stmt
        .query(params![from, limit])
        .map_err(db("read events"))?;
    let mut out = Vec::new();
    let mut bytes = 0usize;
    while let Some(row) = rows.next().map_err(db("read events"))? {
        // The length comes from the record header: a body that would not fit the page
        // is never loaded.
        let len =
            usize::try_from(row.get::<_, i64>(2).map_err(db("read events"))?).unwrap_or(usize::MAX);
        bytes = bytes.saturating_add(len);
        if !out.is_empty() && bytes > max_bytes {
            break;
        }
        out.push(StoredEvent {
            seq: u64::try_from(row.get::<_, i64>(0).map_err(db("read events"))?).unwrap_or(0),
            id: row.get(1).map_err(db("read events"))?,
            bytes: Bytes::from(row.get::<_, Vec<u8>>(3).map_err(db("read events"))?),
        });
    }
    Ok(out)
}

/// The first seq above the retention point `pruned` that the journal holds (`None`: none).
pub(super) fn first_retained(conn: &Connection, pruned: i64) -> Result<Option<i64>, StoreError> {
    conn.query_row(
        "SELECT MIN(seq) FROM events WHERE seq > ?1",
        [pruned],
        |r| r.get::<_, Option<i64>>(0),
    )
    .map_err(db("read first seq"))
}

/// Up to `limit` of `endpoint`'s pending deliveries due at `now_ms`, oldest first.
pub(super) fn due(
    conn: &Connection,
    endpoint: &str,
    now_ms: i64,
    limit: i64,
    ordered: bool,
) -> Result<Vec<DueDelivery>, StoreError> {
    // Ordered: a delivery is eligible only when no older pending delivery of the same
    // subject exists (the older one may be in flight or waiting for its retry).
    let sql = if ordered {
        "SELECT d.seq, e.id, e.body, d.attempts FROM deliveries d JOIN events e ON e.seq = d.seq
         WHERE d.endpoint = ?1 AND d.state = 0 AND d.next_at_ms <= ?2
           AND NOT EXISTS (SELECT 1 FROM deliveries p WHERE p.endpoint = d.endpoint AND p.state = 0
                           AND p.subject IS d.subject AND p.seq < d.seq)
         ORDER BY d.seq LIMIT ?3"
    } else {
        "SELECT d.seq, e.id, e.body, d.attempts FROM deliveries d JOIN events e ON e.seq = d.seq
         WHERE d.endpoint = ?1 AND d.state = 0 AND d.next_at_ms <= ?2
         ORDER BY d.seq LIMIT ?3"
    };
    let mut stmt = conn.prepare_cached(sql).map_err(db("prepare due"))?;
    let rows = stmt
        .query_map(params![endpoint, now_ms, limit], |r| {
            Ok(DueDelivery {
                seq: r.get::<_, i64>(0)? as u64,
                id: r.get(1)?,
                bytes: Bytes::from(r.get::<_, Vec<u8>>(2)?),
                attempts: r.get::<_, i64>(3)? as u32,
            })
        })
        .map_err(db("read due deliveries"))?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(db("read due deliveries"))
}

/// The events an endpoint is owed from its cursor, as one SQL rule for the scan, the listing
/// and the count: above `?1`, up to `?2`, routed to it (`?3`: its target pattern) and without
/// a delivery row of it (`?4`: its name; a row delivers those).
macro_rules! owed_events {
    () => {
        "FROM events e WHERE e.seq > ?1 AND e.seq <= ?2 AND instr(e.targets, ?3) > 0
           AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.endpoint = ?4 AND d.seq = e.seq)"
    };
}

/// `endpoint`'s saved delivery cursor (cursor.rs); one that never saved one starts at the
/// floor the file recorded when cursors came to it (0 for a file made with them).
pub(super) fn cursor(conn: &Connection, endpoint: &str) -> Result<u64, StoreError> {
    let saved: Option<i64> = conn
        .prepare_cached("SELECT seq FROM cursors WHERE endpoint = ?1")
        .and_then(|mut st| st.query_row([endpoint], |r| r.get(0)).optional())
        .map_err(db("read delivery cursor"))?;
    match saved {
        Some(seq) => Ok(u64::try_from(seq).unwrap_or(0)),
        None => meta_number(conn, "cursor_floor", "read the cursor floor"),
    }
}

/// Up to `limit` events above `after`, up to `through`, routed to `endpoint` and without a
/// delivery row (a replay's row delivers those), oldest first: what the endpoint's cursor
/// hands out next.
pub(super) fn scan(
    conn: &Connection,
    endpoint: &str,
    after: u64,
    through: u64,
    limit: i64,
) -> Result<Vec<DueDelivery>, StoreError> {
    let mut stmt = conn
        .prepare_cached(concat!(
            "SELECT e.seq, e.id, e.body ",
            owed_events!(),
            " ORDER BY e.seq LIMIT ?5"
        ))
        .map_err(db("prepare delivery scan"))?;
    let rows = stmt
        .query_map(
            params![
                to_i64(after),
                to_i64(through),
                target_pattern(endpoint),
                endpoint,
                limit
            ],
            |r| {
                Ok(DueDelivery {
                    seq: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                    id: r.get(1)?,
                    bytes: Bytes::from(r.get::<_, Vec<u8>>(2)?),
                    attempts: 0,
                })
            },
        )
        .map_err(db("scan deliveries"))?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(db("scan deliveries"))
}

/// The events at `seqs` (those still journalled), as first attempts: deliveries handed back
/// unattempted and offered again.
pub(super) fn by_seqs(conn: &Connection, seqs: &[u64]) -> Result<Vec<DueDelivery>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT seq, id, body FROM events WHERE seq = ?1")
        .map_err(db("prepare read by seq"))?;
    let mut out = Vec::with_capacity(seqs.len());
    for &seq in seqs {
        let row = stmt
            .query_row([to_i64(seq)], |r| {
                Ok(DueDelivery {
                    seq,
                    id: r.get(1)?,
                    bytes: Bytes::from(r.get::<_, Vec<u8>>(2)?),
                    attempts: 0,
                })
            })
            .optional()
            .map_err(db("read by seq"))?;
        out.extend(row);
    }
    Ok(out)
}

/// When `endpoint`'s next pending delivery after `after_ms` falls due (`None`: none waits).
pub(super) fn next_due(
    conn: &Connection,
    endpoint: &str,
    after_ms: i64,
) -> Result<Option<i64>, StoreError> {
    // Cached: the dispatcher asks this after every refill (issue 8 webhook profile).
    conn.prepare_cached(
        "SELECT MIN(next_at_ms) FROM deliveries WHERE endpoint = ?1 AND state = 0 AND next_at_ms > ?2",
    )
    .and_then(|mut st| st.query_row(params![endpoint, after_ms], |r| r.get::<_, Option<i64>>(0)))
    .map_err(db("read next due"))
}

/// A listed delivery: (seq, event id, when it is due).
fn listed(r: &rusqlite::Row<'_>) -> rusqlite::Result<(i64, String, i64)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
}

/// Up to `limit` of `endpoint`'s deliveries in `state`, oldest first, with their attempts.
///
/// Pending deliveries include the events above the endpoint's cursor (`after`, or the saved
/// cursor when further) that no attempt has reached yet (no attempts, due at receipt), those
/// within [`OWED_WINDOW`] positions of it.
pub(super) fn deliveries(
    conn: &Connection,
    endpoint: &str,
    state: DeliveryState,
    limit: i64,
    after: u64,
) -> Result<Vec<DeliveryInfo>, StoreError> {
    let code = match state {
        DeliveryState::Pending => PENDING,
        DeliveryState::Dead => DEAD,
    };
    let mut stmt = conn
        .prepare_cached(
            "SELECT d.seq, e.id, d.next_at_ms FROM deliveries d JOIN events e ON e.seq = d.seq
             WHERE d.endpoint = ?1 AND d.state = ?2 ORDER BY d.seq LIMIT ?3",
        )
        .map_err(db("prepare list"))?;
    let mut rows = stmt
        .query_map(params![endpoint, code, limit], listed)
        .map_err(db("list deliveries"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db("list deliveries"))?;
    if state == DeliveryState::Pending {
        let after = after.max(cursor(conn, endpoint)?);
        let mut stmt = conn
            .prepare_cached(concat!(
                "SELECT e.seq, e.id, e.recv_ms ",
                owed_events!(),
                " ORDER BY e.seq LIMIT ?5"
            ))
            .map_err(db("prepare list"))?;
        let window_end = to_i64(after.saturating_add(OWED_WINDOW));
        let backlog = stmt
            .query_map(
                params![
                    to_i64(after),
                    window_end,
                    target_pattern(endpoint),
                    endpoint,
                    limit
                ],
                listed,
            )
            .map_err(db("list deliveries"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db("list deliveries"))?;
        rows.extend(backlog);
        rows.sort_by_key(|r| r.0);
        rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    }
    let mut attempts_stmt = conn
        .prepare_cached(
            "SELECT at_ms, status, error, duration_ms FROM attempts WHERE endpoint = ?1 AND seq = ?2 ORDER BY n",
        )
        .map_err(db("prepare attempts"))?;
    let mut out = Vec::with_capacity(rows.len());
    for (seq, id, next_at_ms) in rows {
        let attempts = attempts_stmt
            .query_map(params![endpoint, seq], |r| {
                Ok(AttemptRecord {
                    at_ms: r.get(0)?,
                    status: r.get::<_, Option<i64>>(1)?.map(|s| s as u16),
                    error: r.get(2)?,
                    duration_ms: r.get::<_, i64>(3)? as u64,
                })
            })
            .map_err(db("list attempts"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db("list attempts"))?;
        out.push(DeliveryInfo {
            id,
            seq: seq as u64,
            state,
            next_attempt: (state == DeliveryState::Pending).then(|| {
                chrono::DateTime::from_timestamp_millis(next_at_ms)
                    .unwrap_or_default()
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            }),
            attempts,
        });
    }
    Ok(out)
}

/// Journal positions above an endpoint's cursor whose routes a count or a listing examines:
/// the status page, the metrics and the admin API ask often, and share the reader with every
/// dispatcher, so an endpoint far behind (disabled for days) must not make them read millions
/// of events.
const OWED_WINDOW: u64 = 10_000;

/// How many of `endpoint`'s deliveries are pending and dead; pending includes the events
/// above its cursor (`after`, or the saved cursor when further) not yet attempted: exactly
/// within [`OWED_WINDOW`] positions of the cursor, and beyond that every journal position up
/// to the head counts (an upper bound, for an endpoint that far behind).
pub(super) fn counts(
    conn: &Connection,
    endpoint: &str,
    after: u64,
) -> Result<DeliveryCounts, StoreError> {
    let mut counts = conn
        .prepare_cached(
            "SELECT COALESCE(SUM(state = 0), 0), COALESCE(SUM(state = 1), 0) FROM deliveries WHERE endpoint = ?1",
        )
        .and_then(|mut st| {
            st.query_row(params![endpoint], |r| {
                Ok(DeliveryCounts {
                    pending: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                    dead: u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                })
            })
        })
        .map_err(db("count deliveries"))?;
    let after = after.max(cursor(conn, endpoint)?);
    let window_end = after.saturating_add(OWED_WINDOW);
    let backlog: i64 = conn
        .prepare_cached(concat!("SELECT COUNT(*) ", owed_events!()))
        .and_then(|mut st| {
            st.query_row(
                params![
                    to_i64(after),
                    to_i64(window_end),
                    target_pattern(endpoint),
                    endpoint
                ],
                |r| r.get(0),
            )
        })
        .map_err(db("count deliveries"))?;
    let beyond = super::schema::stored_head(conn)?.saturating_sub(window_end);
    counts.pending = counts
        .pending
        .saturating_add(u64::try_from(backlog).unwrap_or(0))
        .saturating_add(beyond);
    Ok(counts)
}

/// Why `endpoint` is disabled (`None`: it is not).
pub(super) fn disabled(conn: &Connection, endpoint: &str) -> Result<Option<String>, StoreError> {
    conn.query_row(
        "SELECT disabled_reason FROM endpoints WHERE name = ?1",
        params![endpoint],
        |r| r.get::<_, Option<String>>(0),
    )
    .optional()
    .map(Option::flatten)
    .map_err(db("read endpoint state"))
}

/// Every saved durable consumer, in key order (SQLite compares TEXT bytewise, as `String`'s
/// `Ord` does, so this is [`DurableKey`]'s order).
pub(super) fn durables(conn: &Connection) -> Result<Vec<SavedDurable>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT consumer, name, state, keep_from FROM durables ORDER BY consumer, name",
        )
        .map_err(db("prepare durables"))?;
    let rows = stmt
        .query_map([], |r| {
            Ok(SavedDurable {
                key: DurableKey {
                    consumer: r.get(0)?,
                    name: r.get(1)?,
                },
                state: Bytes::from(r.get::<_, Vec<u8>>(2)?),
                keep_from: u64::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
            })
        })
        .map_err(db("read durables"))?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(db("read durables"))
}

/// The seq of the first event above the retention point `pruned` received at or after
/// `at_ms`; `None` when no retained event was.
///
/// A binary search over seq, not a scan and not an index on `recv_ms`: `recv_ms` is the
/// envelope's `recvtime`, stamped by the upstream session when the frame arrives, and ingest
/// journals events in arrival order through one queue and one writer, so `recv_ms` grows
/// with seq. That costs about log2(head) primary-key lookups per call (some 30 on a journal
/// of a billion events), where an index would cost a B-tree insert on every append (the
/// hot path issue 8 tuned) for a rarely used seek. The order is not strict: events of
/// concurrent upstream connections interleave within milliseconds, and the wall clock may
/// step; the search then lands within that disorder, which a seek by time tolerates
/// (retention's pruning walk relies on the same order). Everything runs in one read
/// transaction, so pruning cannot move the journal under the search.
pub(super) fn seq_at(
    conn: &Connection,
    at_ms: i64,
    pruned: i64,
) -> Result<Option<u64>, StoreError> {
    let tx = conn
        .unchecked_transaction()
        .map_err(db("begin seek by time"))?;
    let last: Option<i64> = tx
        .query_row("SELECT MAX(seq) FROM events", [], |r| r.get(0))
        .map_err(db("read head"))?;
    let Some(last) = last else {
        return Ok(None);
    };
    let mut next = tx
        .prepare_cached("SELECT seq, recv_ms FROM events WHERE seq >= ?1 ORDER BY seq LIMIT 1")
        .map_err(db("prepare seek by time"))?;
    // The first event at or after `seq`: (its seq, its recv_ms).
    let mut first_from = |seq: i64| {
        next.query_row([seq], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
            .optional()
            .map_err(db("seek by time"))
    };
    // The smallest `s` in `lo..=hi` whose first event at or after it was received at or after
    // `at_ms` (or does not exist): `hi` = last + 1 always qualifies.
    let (mut lo, mut hi) = (pruned.saturating_add(1).max(1), last.saturating_add(1));
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match first_from(mid)? {
            Some((_, recv_ms)) if recv_ms < at_ms => lo = mid + 1,
            _ => hi = mid,
        }
    }
    let found = first_from(lo)?.map(|(seq, _)| u64::try_from(seq).unwrap_or(0));
    drop(next);
    tx.finish().map_err(db("end seek by time"))?;
    Ok(found)
}

#[cfg(test)]
mod tests {
    use crate::storage::config::Durability;
    use crate::storage::embedded::test_support::{new, queue_options, temp_db};
    use crate::storage::embedded::EmbeddedStore;
    use crate::storage::Store;

    /// A seek by time finds the first retained event received at or after the time, on an
    /// empty journal, within it, past its head and after pruning (skipping what retention
    /// pruned and what it holds back only for a webhook delivery).
    #[tokio::test]
    async fn seq_at_finds_the_first_retained_event_received_at_or_after_a_time() {
        use crate::storage::embedded::test_support::received_at_ms;
        use crate::storage::embedded::EmbeddedOptions;
        let path = temp_db("seq-at");
        let minute = 60_000;
        let now = chrono::Utc::now().timestamp_millis();
        let base = now - 180 * minute;
        {
            let store = EmbeddedStore::open(&path, Durability::Normal).unwrap();
            assert_eq!(store.seq_at(0).await.unwrap(), 1, "empty: head + 1");
            assert_eq!(store.seq_at(now).await.unwrap(), 1);
            let mut routed = received_at_ms("b", base + 10 * minute);
            routed.targets = vec![std::sync::Arc::from("crm")];
            store
                .append(vec![
                    received_at_ms("a", base),
                    routed,
                    received_at_ms("c", base + 20 * minute),
                    received_at_ms("d", now - 10 * minute),
                    received_at_ms("e", now - 5 * minute),
                ])
                .await
                .unwrap();
            assert_eq!(store.seq_at(i64::MIN).await.unwrap(), 1);
            assert_eq!(store.seq_at(base).await.unwrap(), 1, "at, not after");
            assert_eq!(store.seq_at(base + 1).await.unwrap(), 2);
            assert_eq!(store.seq_at(base + 10 * minute).await.unwrap(), 2);
            assert_eq!(store.seq_at(base + 15 * minute).await.unwrap(), 3);
            assert_eq!(store.seq_at(now - 7 * minute).await.unwrap(), 5);
            assert_eq!(store.seq_at(now).await.unwrap(), 6, "after the head");
            assert_eq!(store.seq_at(i64::MAX).await.unwrap(), 6);
        }
        // Retention prunes 1..=3 (b is held back for its delivery, below the retention point).
        let store = EmbeddedStore::open_with(
            &path,
            EmbeddedOptions {
                retention: Some(std::time::Duration::from_secs(3600)),
                ..EmbeddedOptions::default()
            },
        )
        .unwrap();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while store.position().await.unwrap().first != 4 {
            assert!(tokio::time::Instant::now() < deadline, "never pruned");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let queue = store.delivery_queue("crm", queue_options()).await.unwrap();
        assert_eq!(queue.due(i64::MAX, 10).await.unwrap().len(), 1);
        assert_eq!(store.seq_at(0).await.unwrap(), 4);
        assert_eq!(store.seq_at(base + 10 * minute).await.unwrap(), 4);
        assert_eq!(store.seq_at(now - 7 * minute).await.unwrap(), 5);
        assert_eq!(store.seq_at(now).await.unwrap(), 6);
        let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
    }

    /// The binary search agrees with a scan on a longer journal, at every event's time and
    /// between events.
    #[tokio::test]
    async fn seq_at_agrees_with_a_scan_across_a_longer_journal() {
        use crate::storage::embedded::test_support::received_at_ms;
        let path = temp_db("seq-at-long");
        let store = EmbeddedStore::open(&path, Durability::Normal).unwrap();
        let base = 1_700_000_000_000i64;
        // Several events share a millisecond, as a burst does.
        let times: Vec<i64> = (0..500).map(|i| base + (i / 3) * 1000).collect();
        store
            .append(
                times
                    .iter()
                    .enumerate()
                    .map(|(i, t)| received_at_ms(&format!("e{i}"), *t))
                    .collect(),
            )
            .await
            .unwrap();
        for at in (base - 1000..=base + 170_000).step_by(500) {
            let expected = times
                .iter()
                .position(|t| *t >= at)
                .map_or(times.len() as u64 + 1, |i| i as u64 + 1);
            assert_eq!(store.seq_at(at).await.unwrap(), expected, "at {at}");
        }
        let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
    }

    #[tokio::test]
    async fn replay_pages_stop_at_their_byte_limit_but_always_make_progress() {
        let path = temp_db("pages");
        let store = EmbeddedStore::open(&path, Durability::Normal).unwrap();
        store
            .append((0..10).map(|i| new(&format!("e{i}"))).collect())
            .await
            .unwrap();
        let all = store.read_from(1, 100).await.unwrap();
        let one = all[0].bytes.len();
        // Three events' bytes (and a little): three events.
        let page = store.read_page(1, 100, 3 * one + one / 2).await.unwrap();
        assert_eq!(
            page.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(page, all[..3].to_vec(), "the same bytes as read_from");
        // Less than one event: still the first, so a replay always moves on.
        let page = store.read_page(4, 100, 1).await.unwrap();
        assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![4]);
        // The count limit holds too, and the end of the journal is an empty page.
        assert_eq!(store.read_page(5, 2, usize::MAX).await.unwrap().len(), 2);
        assert!(store.read_page(11, 2, usize::MAX).await.unwrap().is_empty());
        // More replay reads at once than readers: each waits its turn and gets its page.
        let reads = (1..=8u64).map(|from| store.read_page(from, 3, usize::MAX));
        for (i, page) in futures_util::future::join_all(reads)
            .await
            .into_iter()
            .enumerate()
        {
            assert_eq!(page.unwrap()[0].seq, i as u64 + 1);
        }
        let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
    }
}
