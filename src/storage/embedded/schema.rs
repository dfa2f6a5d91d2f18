//! The embedded store's schema and connections: the migrations (`PRAGMA user_version` counts
//! how many have run), the pragmas every connection gets, and the journal's identity (its
//! epoch) and head as the file records them.

use std::path::Path;

use rusqlite::config::DbConfig;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::db;
use crate::storage::config::Durability;
use crate::storage::StoreError;

/// Page cache of a replay reader (KiB): replays read sequentially through the memory map, so
/// a large cache would only hold pages that are not read again.
const REPLAY_READER_CACHE_KIB: i64 = 2048;

/// Schema, applied in order; `PRAGMA user_version` records how many have run.
const MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
    CREATE TABLE events (
        seq       INTEGER PRIMARY KEY,
        id        TEXT NOT NULL UNIQUE,
        recv_ms   INTEGER NOT NULL,
        body      BLOB NOT NULL
    );
    "#,
    r#"
    -- state: 0 pending (or in flight), 1 dead. A delivered row is deleted.
    CREATE TABLE deliveries (
        endpoint   TEXT NOT NULL,
        seq        INTEGER NOT NULL,
        state      INTEGER NOT NULL DEFAULT 0,
        attempts   INTEGER NOT NULL DEFAULT 0,
        next_at_ms INTEGER NOT NULL,
        subject    TEXT,
        PRIMARY KEY (endpoint, seq)
    ) WITHOUT ROWID;
    CREATE INDEX deliveries_due ON deliveries (endpoint, state, next_at_ms, seq);
    CREATE INDEX deliveries_subject ON deliveries (endpoint, subject, state, seq);
    CREATE TABLE attempts (
        endpoint    TEXT NOT NULL,
        seq         INTEGER NOT NULL,
        n           INTEGER NOT NULL,
        at_ms       INTEGER NOT NULL,
        status      INTEGER,
        error       TEXT,
        duration_ms INTEGER NOT NULL,
        PRIMARY KEY (endpoint, seq, n)
    ) WITHOUT ROWID;
    CREATE TABLE endpoints (
        name            TEXT PRIMARY KEY,
        disabled_reason TEXT
    ) WITHOUT ROWID;
    "#,
    r#"
    -- Per id as ingest gave it (`base`) that came back after the dedup window and was stored
    -- under a fresh id: its newest event. A base that never came back has no row here (its
    -- one event is the `events` row with that id), so the table stays small.
    CREATE TABLE latest (
        base    TEXT PRIMARY KEY,
        seq     INTEGER NOT NULL,
        recv_ms INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX latest_seq ON latest (seq);
    "#,
    r#"
    -- 0.6.0: the id index leaves the events table (its UNIQUE index took a random page write
    -- per event); ids (hash of the id, seq) is written a generation at a time in hash order
    -- (storage/embedded/ids.rs), and filled from the events on the first open.
    CREATE TABLE ids (
        h   INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (h, seq)
    ) WITHOUT ROWID;
    CREATE TABLE events_v4 (
        seq       INTEGER PRIMARY KEY,
        id        TEXT NOT NULL,
        recv_ms   INTEGER NOT NULL,
        body      BLOB NOT NULL
    );
    INSERT INTO events_v4 (seq, id, recv_ms, body) SELECT seq, id, recv_ms, body FROM events;
    DROP TABLE events;
    ALTER TABLE events_v4 RENAME TO events;
    DELETE FROM meta WHERE key = 'ids_through';
    "#,
    r#"
    -- Durable consumers (issue 16): per (consumer, durable name) the durable runtime's state,
    -- opaque to the store, and the lowest seq the durable may still need, which retention
    -- keeps (retention.rs). Few rows (`max_durables` per consumer), rewritten as acks come.
    CREATE TABLE durables (
        consumer  TEXT NOT NULL,
        name      TEXT NOT NULL,
        state     BLOB NOT NULL,
        keep_from INTEGER NOT NULL,
        PRIMARY KEY (consumer, name)
    ) WITHOUT ROWID;
    "#,
    r#"
    -- 0.8.0: delivery cursors (issue 15; storage/embedded/cursor.rs). An event carries the
    -- endpoints it is routed to (`,a,b,`; names cannot hold a comma) instead of a delivery
    -- row per endpoint; each endpoint reads its events from its cursor on, and a row is
    -- written only for an attempt that failed (or a replay). Rows pending in a file written
    -- before stay rows; every endpoint's cursor starts at the head the file had then.
    ALTER TABLE events ADD COLUMN targets TEXT;
    CREATE TABLE cursors (
        endpoint TEXT PRIMARY KEY,
        seq      INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT OR REPLACE INTO meta (key, value)
        SELECT 'cursor_floor', CAST(COALESCE(MAX(seq), 0) AS TEXT) FROM events;
    "#,
];

/// `deliveries.state` of a delivery still to be made (or in flight).
pub(super) const PENDING: i64 = 0;
/// `deliveries.state` of a dead-lettered delivery.
pub(super) const DEAD: i64 = 1;

/// Opens a connection to the file at `path` with the pragmas every connection of the store
/// shares (WAL, `durability`, the cache and memory-map sizing).
pub(super) fn open_connection(
    path: &Path,
    durability: Durability,
) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let sync = match durability {
        Durability::Normal => "NORMAL",
        Durability::Full => "FULL",
    };
    // Sizing (issue 8, measured with `cargo bench --bench bench -- --only ingest`): the id
    // index takes random inserts (ids are digests), so with SQLite's default 2 MiB page cache
    // every batch re-read index pages from the file (`readDbPage` → pread in the profile)
    // and the WAL was checkpointed every 4 MiB, rewriting the same hot index pages again and
    // again. Reads through a 256 MiB mmap, a 16 MiB cache and a 64 MiB checkpoint interval
    // keep the hot pages in memory and write each of them once per checkpoint. The cache is
    // not larger because every commit scans the cache's hash table (`pcache1TruncateUnsafe`,
    // 6 % of the CPU with 64 MiB in the webhook benchmark, where commits are small and many).
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync}; PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON;
         PRAGMA cache_size = -16384; PRAGMA mmap_size = 268435456; PRAGMA wal_autocheckpoint = 16384;"
    ))
    .map_err(db("configure connection"))?;
    // The query planner's plans must not depend on bound values: a `LIMIT ?` (the delivery
    // scan's and `due`'s, the replay reads') otherwise marks the statement to be compiled
    // again whenever a different value is bound, and those limits change on every call (the
    // webhook profile: `sqlite3Reprepare` under both delivery queries, 4 % of the bridge).
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
        .map_err(db("configure connection"))?;
    Ok(conn)
}

/// Opens a connection that reads beside the writer (the readers, the checkpoint thread):
/// [`open_connection`] without the memory map. A connection starting a read transaction
/// after the writer committed drops its whole map (SQLite unmaps the file whenever the log
/// changed since its last transaction) and maps it again on the next page it reads: with
/// commits every few milliseconds that was an `munmap` of the map per delivery refill and
/// replay page (`sqlite3PagerSharedLock` → `munmap`, 2.5 % of the bridge in the webhook
/// profile, issue 15). What readers read is mostly recent, in the log, which is never mapped.
pub(super) fn open_reader_connection(
    path: &Path,
    durability: Durability,
) -> Result<Connection, StoreError> {
    let conn = open_connection(path, durability)?;
    conn.execute_batch("PRAGMA mmap_size = 0;")
        .map_err(db("configure reader"))?;
    Ok(conn)
}

/// Opens a replay reader: a read-only connection with a small page cache.
pub(super) fn open_replay_connection(
    path: &Path,
    durability: Durability,
) -> Result<Connection, StoreError> {
    let conn = open_reader_connection(path, durability)?;
    conn.execute_batch(&format!(
        "PRAGMA cache_size = -{REPLAY_READER_CACHE_KIB}; PRAGMA query_only = ON;"
    ))
    .map_err(db("configure replay reader"))?;
    Ok(conn)
}

/// Applies the migrations that have not run yet, each in its own transaction.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    migrate_through(conn, MIGRATIONS.len())
}

/// Applies the migrations that have not run yet up to the `through`-th (tests build the files
/// earlier versions made with it).
fn migrate_through(conn: &mut Connection, through: usize) -> Result<(), StoreError> {
    let done: usize = conn
        .query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
        .map_err(db("read schema version"))? as usize;
    for (i, sql) in MIGRATIONS.iter().enumerate().take(through).skip(done) {
        let tx = conn.transaction().map_err(db("begin migration"))?;
        tx.execute_batch(sql).map_err(db("migrate"))?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))
            .map_err(db("record schema version"))?;
        tx.commit().map_err(db("commit migration"))?;
    }
    Ok(())
}

/// The journal's epoch, created (random) the first time the file is opened.
pub(super) fn load_or_create_epoch(conn: &Connection) -> Result<String, StoreError> {
    let existing: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
            r.get(0)
        })
        .optional()
        .map_err(db("read epoch"))?;
    if let Some(e) = existing {
        return Ok(e);
    }
    let epoch = format!("{:016x}", rand::random::<u64>());
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('epoch', ?1)",
        params![epoch],
    )
    .map_err(db("write epoch"))?;
    Ok(epoch)
}

/// The number `meta` holds under `key` (0 when it holds none, or not a number); `op` names
/// the read in errors.
pub(super) fn meta_number<T: std::str::FromStr + Default>(
    conn: &Connection,
    key: &str,
    op: &'static str,
) -> Result<T, StoreError> {
    let v: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
        .map_err(db(op))?;
    Ok(v.and_then(|v| v.parse().ok()).unwrap_or_default())
}

/// The highest seq in the journal (0: empty).
pub(super) fn stored_head(conn: &Connection) -> Result<u64, StoreError> {
    Ok(conn
        .query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| {
            r.get::<_, i64>(0)
        })
        .map_err(db("read head"))?
        .try_into()
        .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::embedded::test_support::{durable, new, temp_db};
    use crate::storage::embedded::EmbeddedStore;
    use crate::storage::Store;

    /// A connection's plans do not depend on bound values: a statement run again with another
    /// `LIMIT` is not compiled again (it was, on every delivery refill and replay read).
    #[tokio::test]
    async fn a_statement_run_with_another_limit_is_not_prepared_again() {
        let path = temp_db("qpsg");
        let store = EmbeddedStore::open(&path, Durability::Normal).unwrap();
        store
            .append(vec![new("a"), new("b"), new("c")])
            .await
            .unwrap();
        drop(store);
        let conn = open_connection(&path, Durability::Normal).unwrap();
        let sql = "SELECT seq FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2";
        for limit in 1..=3i64 {
            let mut st = conn.prepare_cached(sql).unwrap();
            let seqs: Vec<i64> = st
                .query_map(params![0, limit], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(seqs.len() as i64, limit);
        }
        let st = conn.prepare_cached(sql).unwrap();
        assert_eq!(
            st.get_status(rusqlite::StatementStatus::RePrepare),
            0,
            "compiled once, run three times with three limits"
        );
    }

    /// A file made by the schema before durable consumers (version 4, the schema of 0.6.0
    /// up to this change) is migrated on open: its events and their dedup stay, and
    /// durables can be saved in it.
    #[tokio::test]
    async fn a_file_of_the_schema_before_durables_migrates_and_keeps_its_events() {
        let path = temp_db("schema-v4");
        let events = {
            let store = EmbeddedStore::open(&path, Durability::Normal).unwrap();
            store.append(vec![new("a"), new("b")]).await.unwrap();
            store.read_from(1, 10).await.unwrap()
        };
        // Back to exactly what version 4 made: no durables table, no cursors, user_version 4.
        {
            let conn = open_connection(&path, Durability::Normal).unwrap();
            conn.execute_batch(
                "DROP TABLE durables; DROP TABLE cursors; ALTER TABLE events DROP COLUMN targets;
                 DELETE FROM meta WHERE key = 'cursor_floor'; PRAGMA user_version = 4;",
            )
            .unwrap();
        }
        // Also a fresh file created at version 4 and migrated from there.
        let fresh = temp_db("schema-v4-fresh");
        std::fs::create_dir_all(fresh.parent().unwrap()).unwrap();
        let mut conn = open_connection(&fresh, Durability::Normal).unwrap();
        migrate_through(&mut conn, 4).unwrap();
        let tables = |conn: &Connection| -> i64 {
            conn.query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'durables'",
                [],
                |r| r.get(0),
            )
            .unwrap()
        };
        assert_eq!(tables(&conn), 0);
        migrate(&mut conn).unwrap();
        assert_eq!(tables(&conn), 1);
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version as usize, MIGRATIONS.len());
        drop(conn);

        let store = EmbeddedStore::open(&path, Durability::Normal).unwrap();
        assert_eq!(store.read_from(1, 10).await.unwrap(), events);
        let out = store.append(vec![new("b"), new("c")]).await.unwrap();
        assert_eq!(out[0], crate::storage::Appended::Duplicate, "dedup kept");
        store.save_durable(durable("c", "d", "s", 2)).await.unwrap();
        assert_eq!(
            store.durables().await.unwrap(),
            vec![durable("c", "d", "s", 2)]
        );
        for p in [&path, &fresh] {
            let _ = std::fs::remove_dir_all(p.parent().unwrap().parent().unwrap());
        }
    }

    /// A file of 0.7.0's schema (version 5: a delivery row per event and endpoint, written
    /// at ingest) keeps its pending rows; the endpoint's cursor starts at that file's head,
    /// so no event is delivered twice and the new ones come from the cursor.
    #[tokio::test]
    async fn a_file_of_the_schema_before_cursors_keeps_its_rows_and_delivers_new_events_once() {
        use crate::storage::embedded::test_support::{queue_options, received};
        use crate::storage::{AttemptRecord, NextStep, Store};
        let path = temp_db("schema-v5");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        {
            let mut conn = open_connection(&path, Durability::Normal).unwrap();
            migrate_through(&mut conn, 5).unwrap();
            conn.execute_batch(
                r#"INSERT INTO meta (key, value) VALUES ('epoch', 'v5');
                INSERT INTO events (seq, id, recv_ms, body) VALUES
                    (1, 'a', 0, CAST('{"id":"a","subject":"s"}' AS BLOB)),
                    (2, 'b', 0, CAST('{"id":"b","subject":"s"}' AS BLOB)),
                    (3, 'c', 0, CAST('{"id":"c"}' AS BLOB));
                INSERT INTO deliveries (endpoint, seq, state, attempts, next_at_ms, subject) VALUES
                    ('hook', 1, 0, 0, 0, 's'), ('hook', 2, 0, 1, 0, 's');
                INSERT INTO attempts (endpoint, seq, n, at_ms, status, error, duration_ms) VALUES
                    ('hook', 2, 1, 0, 500, NULL, 3);"#,
            )
            .unwrap();
        }
        let attempt = AttemptRecord {
            at_ms: 0,
            status: Some(200),
            error: None,
            duration_ms: 1,
        };
        {
            let store = EmbeddedStore::open(&path, Durability::Normal).unwrap();
            let counts = store.counts("hook").await.unwrap();
            assert_eq!((counts.pending, counts.dead), (2, 0));
            let q = store.delivery_queue("hook", queue_options()).await.unwrap();
            let due = q.due(i64::MAX, 10).await.unwrap();
            let got: Vec<(u64, u32)> = due.iter().map(|d| (d.seq, d.attempts)).collect();
            assert_eq!(got, [(1, 0), (2, 1)], "the rows, and not event 3 (no row)");
            for d in due {
                q.record(d, attempt.clone(), NextStep::Delivered)
                    .await
                    .unwrap();
            }
            store
                .append(vec![received("d", chrono::Duration::zero(), &["hook"])])
                .await
                .unwrap();
            let due = q.due(i64::MAX, 10).await.unwrap();
            assert_eq!(due.iter().map(|d| d.seq).collect::<Vec<_>>(), [4]);
            for d in due {
                q.record(d, attempt.clone(), NextStep::Delivered)
                    .await
                    .unwrap();
            }
            assert!(q.due(i64::MAX, 10).await.unwrap().is_empty());
        }
        // Reopened: the cursor was saved past 4, nothing is owed.
        let store = EmbeddedStore::open(&path, Durability::Normal).unwrap();
        let q = store.delivery_queue("hook", queue_options()).await.unwrap();
        assert!(q.due(i64::MAX, 10).await.unwrap().is_empty());
        assert_eq!(store.counts("hook").await.unwrap().pending, 0);
        let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
    }
}
