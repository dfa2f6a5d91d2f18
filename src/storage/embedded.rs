//! The embedded store: one SQLite file in WAL mode, the default backend (nothing to install).
//!
//! Writes go through one dedicated writer thread that owns the write connection. Each append
//! command is one batch from ingest; the thread also drains every command already queued
//! behind it and commits them all in a single transaction (group commit), so durability
//! costs one fsync per burst rather than one per event. Reads use a second connection on the
//! blocking pool; WAL lets them run while the writer commits. Consumer replays (`read_page`)
//! read on their own small pool of connections ([`REPLAY_READERS`]), so however many replays
//! wait for a turn, webhook `due()` queries and readiness never queue behind them. Waiting
//! for a reader happens on the async side (a semaphore, an async mutex), so waiting readers
//! never occupy blocking-pool threads.
//!
//! Durability: `synchronous = NORMAL` in WAL mode survives a process crash (SIGKILL) with no
//! committed transaction lost; `FULL` (see [`Durability`]) also survives power loss, at the
//! price of an fsync per commit.
//!
//! The writer's command queue is bounded ([`COMMAND_QUEUE`]); when it is full, `append`
//! waits, which blocks ingest, which blocks the upstream readers: backpressure reaches the
//! providers' sockets, never our memory.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use super::config::Durability;
use super::{
    Appended, AttemptRecord, DeliveryCounts, DeliveryInfo, DeliveryState, DueDelivery,
    JournalPosition, NewEvent, NextStep, ReplaySelection, Store, StoreError, StoredEvent,
};

/// Append commands that may wait for the writer thread.
pub const COMMAND_QUEUE: usize = 64;
/// Most commands merged into one transaction.
const MAX_COMMANDS_PER_COMMIT: usize = 64;
/// Connections that serve consumer replays, apart from the reader of webhook queries,
/// readiness and the admin API. Replay pages are short sequential reads; two keep both cores
/// busy without letting replays crowd out everything else.
pub const REPLAY_READERS: usize = 2;
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
];

const PENDING: i64 = 0;
const DEAD: i64 = 1;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Command {
    Append {
        batch: Vec<NewEvent>,
        /// The dedup window in milliseconds.
        window_ms: i64,
        reply: Reply<Vec<Appended>>,
    },
    Record {
        endpoint: String,
        seq: u64,
        attempt: AttemptRecord,
        next: NextStep,
        reply: Reply<()>,
    },
    Replay {
        endpoint: String,
        selection: ReplaySelection,
        now_ms: i64,
        reply: Reply<u64>,
    },
    SetDisabled {
        endpoint: String,
        reason: Option<String>,
        reply: Reply<()>,
    },
}

/// Per event of an append: `Some((seq, bytes, renewed id))` when stored (the id is `Some`
/// when it is not the one ingest gave), `None` for a copy.
type Outcome = Vec<Option<(u64, Bytes, Option<String>)>>;

/// What a command produced inside a transaction (replied only after the commit).
enum Done {
    Appended(Outcome),
    Unit,
    Count(u64),
}

/// The embedded store. Cheap to share (`Arc`); dropping the last handle stops the writer
/// thread after it has committed what it was given.
pub struct EmbeddedStore {
    commands: std::sync::mpsc::SyncSender<Command>,
    reader: Arc<tokio::sync::Mutex<Connection>>,
    replay: Arc<ReplayReaders>,
    epoch: String,
    head: Arc<AtomicU64>,
    /// Every seq up to this one has been pruned by retention (0: none).
    pruned: Arc<AtomicU64>,
    health: Arc<WriterHealth>,
    path: PathBuf,
    /// `storage.dedup_window` in milliseconds.
    dedup_window_ms: i64,
}

/// How an [`EmbeddedStore`] is opened (from `[storage]`).
#[derive(Clone, Copy, Debug)]
pub struct EmbeddedOptions {
    /// How hard a commit is pushed to disk.
    pub durability: Durability,
    /// Events received longer ago than this are pruned (in the background, a bounded chunk
    /// at a time) so the file stops growing; events a webhook still has pending or
    /// dead-lettered are kept until that delivery ends. `None` keeps everything.
    pub retention: Option<Duration>,
    /// Copies of an id received within this are stored once; see [`Store::append`].
    pub dedup_window: Duration,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        let storage = crate::config::StorageConfig::default();
        EmbeddedOptions {
            durability: Durability::Normal,
            retention: None,
            dedup_window: storage.dedup_window,
        }
    }
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .field("epoch", &self.epoch)
            .finish()
    }
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
        let conn = open_connection(&self.path, self.durability)?;
        conn.execute_batch(&format!(
            "PRAGMA cache_size = -{REPLAY_READER_CACHE_KIB}; PRAGMA query_only = ON;"
        ))
        .map_err(db("configure replay reader"))?;
        Ok(conn)
    }
}

fn db(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Database { op, source }
}

fn open_connection(path: &Path, durability: Durability) -> Result<Connection, StoreError> {
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
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let done: usize = conn
        .query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
        .map_err(db("read schema version"))? as usize;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(done) {
        let tx = conn.transaction().map_err(db("begin migration"))?;
        tx.execute_batch(sql).map_err(db("migrate"))?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))
            .map_err(db("record schema version"))?;
        tx.commit().map_err(db("commit migration"))?;
    }
    Ok(())
}

fn load_or_create_epoch(conn: &Connection) -> Result<String, StoreError> {
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

impl EmbeddedStore {
    /// Opens (creating if needed, directory included) the store at `path` and starts its
    /// writer thread.
    pub fn open(path: &Path, durability: Durability) -> Result<Arc<EmbeddedStore>, StoreError> {
        Self::open_with(
            path,
            EmbeddedOptions {
                durability,
                ..EmbeddedOptions::default()
            },
        )
    }

    /// Like [`EmbeddedStore::open`], with every option.
    pub fn open_with(
        path: &Path,
        options: EmbeddedOptions,
    ) -> Result<Arc<EmbeddedStore>, StoreError> {
        let EmbeddedOptions {
            durability,
            retention,
            dedup_window,
        } = options;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let mut writer = open_connection(path, durability)?;
        migrate(&mut writer)?;
        let epoch = load_or_create_epoch(&writer)?;
        let pruned_through = load_pruned_through(&writer)?;
        let stored_head: u64 = writer
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(db("read head"))?
            .try_into()
            .unwrap_or(0);
        // Pruning may have emptied the journal: seqs are never reused within an epoch.
        let head = stored_head.max(pruned_through);
        let reader = open_connection(path, durability)?;
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
        let head = Arc::new(AtomicU64::new(head));
        let pruned = Arc::new(AtomicU64::new(pruned_through));
        let (tx, rx) = std::sync::mpsc::sync_channel(COMMAND_QUEUE);
        let health = Arc::new(WriterHealth::default());
        let shared = WriterShared {
            head: head.clone(),
            pruned: pruned.clone(),
            retention,
            health: health.clone(),
        };
        thread::Builder::new()
            .name("wsbridge-store".into())
            .spawn(move || writer_loop(writer, rx, shared))
            .map_err(|source| StoreError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        info!(path = %path.display(), epoch = %epoch, head = head.load(Ordering::Relaxed), "embedded store open");
        Ok(Arc::new(EmbeddedStore {
            commands: tx,
            reader: Arc::new(tokio::sync::Mutex::new(reader)),
            replay: Arc::new(replay),
            epoch,
            head,
            pruned,
            health,
            path: path.to_path_buf(),
            dedup_window_ms: i64::try_from(dedup_window.as_millis()).unwrap_or(i64::MAX),
        }))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn send(&self, command: Command) -> Result<(), StoreError> {
        // The queue is bounded: a full queue waits here (on the blocking pool, not the
        // runtime's worker threads).
        let commands = self.commands.clone();
        match commands.try_send(command) {
            Ok(()) => Ok(()),
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => Err(StoreError::Closed),
            Err(std::sync::mpsc::TrySendError::Full(command)) => {
                tokio::task::spawn_blocking(move || {
                    commands.send(command).map_err(|_| StoreError::Closed)
                })
                .await
                .map_err(|_| StoreError::Closed)?
            }
        }
    }

    async fn with_reader<T: Send + 'static>(
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
    async fn with_replay_reader<T: Send + 'static>(
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

    fn check_retained(&self, from: u64) -> Result<(), StoreError> {
        let pruned = self.pruned.load(Ordering::Acquire);
        if from <= pruned {
            // Reading on would skip the pruned events silently: a reader gets told instead.
            return Err(StoreError::NotRetained {
                from,
                first: pruned + 1,
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn append(&self, batch: Vec<NewEvent>) -> Result<Vec<Appended>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        self.send(Command::Append {
            batch,
            window_ms: self.dedup_window_ms,
            reply,
        })
        .await?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn read_from(&self, from: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        self.check_retained(from)?;
        let from = to_i64(from);
        let limit = to_i64(limit as u64);
        self.with_reader(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT seq, id, body FROM events WHERE seq >= ?1 ORDER BY seq LIMIT ?2",
                )
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
        })
        .await
    }

    async fn read_page(
        &self,
        from: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.check_retained(from)?;
        let from = to_i64(from);
        let limit = to_i64(limit as u64);
        self.with_replay_reader(move |conn| {
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
                let len = usize::try_from(row.get::<_, i64>(2).map_err(db("read events"))?)
                    .unwrap_or(usize::MAX);
                bytes = bytes.saturating_add(len);
                if !out.is_empty() && bytes > max_bytes {
                    break;
                }
                out.push(StoredEvent {
                    seq: u64::try_from(row.get::<_, i64>(0).map_err(db("read events"))?)
                        .unwrap_or(0),
                    id: row.get(1).map_err(db("read events"))?,
                    bytes: Bytes::from(row.get::<_, Vec<u8>>(3).map_err(db("read events"))?),
                });
            }
            Ok(out)
        })
        .await
    }

    async fn position(&self) -> Result<JournalPosition, StoreError> {
        let head = self.head.load(Ordering::Acquire);
        let epoch = self.epoch.clone();
        let pruned = to_i64(self.pruned.load(Ordering::Acquire));
        // Events kept below the pruning point only for their pending deliveries do not count:
        // a consumer cannot resume from there without a gap.
        let first = self
            .with_reader(move |conn| {
                conn.query_row(
                    "SELECT MIN(seq) FROM events WHERE seq > ?1",
                    [pruned],
                    |r| r.get::<_, Option<i64>>(0),
                )
                .map_err(db("read first seq"))
            })
            .await?;
        Ok(JournalPosition {
            epoch,
            head,
            first: first.map_or(head + 1, |f| f as u64),
        })
    }

    async fn due(
        &self,
        endpoint: &str,
        now_ms: i64,
        limit: usize,
        ordered: bool,
    ) -> Result<Vec<DueDelivery>, StoreError> {
        let endpoint = endpoint.to_string();
        let limit = to_i64(limit as u64);
        self.with_reader(move |conn| {
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
            rows.collect::<Result<Vec<_>, _>>().map_err(db("read due deliveries"))
        })
        .await
    }

    async fn next_due(&self, endpoint: &str, after_ms: i64) -> Result<Option<i64>, StoreError> {
        let endpoint = endpoint.to_string();
        self.with_reader(move |conn| {
            // Cached: the dispatcher asks this after every refill (issue 8 webhook profile).
            conn.prepare_cached(
                "SELECT MIN(next_at_ms) FROM deliveries WHERE endpoint = ?1 AND state = 0 AND next_at_ms > ?2",
            )
            .and_then(|mut st| {
                st.query_row(params![endpoint, after_ms], |r| r.get::<_, Option<i64>>(0))
            })
            .map_err(db("read next due"))
        })
        .await
    }

    async fn record(
        &self,
        endpoint: &str,
        seq: u64,
        attempt: AttemptRecord,
        next: NextStep,
    ) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Record {
            endpoint: endpoint.to_string(),
            seq,
            attempt,
            next,
            reply,
        })
        .await?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn deliveries(
        &self,
        endpoint: &str,
        state: DeliveryState,
        limit: usize,
    ) -> Result<Vec<DeliveryInfo>, StoreError> {
        let endpoint = endpoint.to_string();
        let limit = to_i64(limit as u64);
        let code = match state {
            DeliveryState::Pending => PENDING,
            DeliveryState::Dead => DEAD,
        };
        self.with_reader(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT d.seq, e.id, d.next_at_ms FROM deliveries d JOIN events e ON e.seq = d.seq
                     WHERE d.endpoint = ?1 AND d.state = ?2 ORDER BY d.seq LIMIT ?3",
                )
                .map_err(db("prepare list"))?;
            let rows = stmt
                .query_map(params![endpoint, code, limit], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?))
                })
                .map_err(db("list deliveries"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db("list deliveries"))?;
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
        })
        .await
    }

    async fn counts(&self, endpoint: &str) -> Result<DeliveryCounts, StoreError> {
        let endpoint = endpoint.to_string();
        self.with_reader(move |conn| {
            conn.query_row(
                "SELECT COALESCE(SUM(state = 0), 0), COALESCE(SUM(state = 1), 0) FROM deliveries WHERE endpoint = ?1",
                params![endpoint],
                |r| {
                    Ok(DeliveryCounts {
                        pending: r.get::<_, i64>(0)? as u64,
                        dead: r.get::<_, i64>(1)? as u64,
                    })
                },
            )
            .map_err(db("count deliveries"))
        })
        .await
    }

    async fn replay(&self, endpoint: &str, selection: ReplaySelection) -> Result<u64, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Replay {
            endpoint: endpoint.to_string(),
            selection,
            now_ms: chrono::Utc::now().timestamp_millis(),
            reply,
        })
        .await?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn set_disabled(&self, endpoint: &str, reason: Option<String>) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::SetDisabled {
            endpoint: endpoint.to_string(),
            reason,
            reply,
        })
        .await?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    fn size_bytes(&self) -> Option<u64> {
        files_size(&self.path)
    }

    fn unavailable(&self) -> Option<String> {
        self.health
            .failing()
            .map(|why| format!("journal writes are failing (retrying): {why}"))
    }

    fn write_failures(&self) -> Option<u64> {
        Some(self.health.failures.load(Ordering::Relaxed))
    }

    async fn disabled(&self, endpoint: &str) -> Result<Option<String>, StoreError> {
        let endpoint = endpoint.to_string();
        self.with_reader(move |conn| {
            conn.query_row(
                "SELECT disabled_reason FROM endpoints WHERE name = ?1",
                params![endpoint],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()
            .map(Option::flatten)
            .map_err(db("read endpoint state"))
        })
        .await
    }
}

/// The database file plus its write-ahead log.
fn files_size(path: &Path) -> Option<u64> {
    let main = std::fs::metadata(path).ok()?.len();
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    Some(main + std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0))
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The retention point recorded by earlier pruning (0: nothing pruned yet).
fn load_pruned_through(conn: &Connection) -> Result<u64, StoreError> {
    let v: Option<String> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'pruned_through'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(db("read retention point"))?;
    Ok(v.and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// Deletes up to [`PRUNE_CHUNK`] of the oldest events received before `cutoff_ms`, except
/// those a webhook delivery still refers to, and moves the retention point past them.
/// Returns how many seqs the retention point advanced.
fn prune(conn: &mut Connection, cutoff_ms: i64, pruned: &AtomicU64) -> Result<u64, StoreError> {
    let from = to_i64(pruned.load(Ordering::Acquire));
    let tx = conn.transaction().map_err(db("begin prune"))?;
    // Seqs follow receive order (give or take clock steps), so the oldest events are the
    // lowest seqs: walk up from the retention point and stop at the first one to keep.
    let through: Option<i64> = {
        let mut stmt = tx
            .prepare_cached("SELECT seq, recv_ms FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2")
            .map_err(db("prepare prune"))?;
        let rows = stmt
            .query_map(params![from, PRUNE_CHUNK], |r| {
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
    // Events held back below the retention point for a delivery that has since ended.
    let released = tx
        .execute(
            "DELETE FROM events WHERE seq <= ?1 AND seq NOT IN (SELECT seq FROM deliveries WHERE seq <= ?1)",
            params![from],
        )
        .map_err(db("prune held events"))?;
    let Some(through) = through else {
        if released > 0 {
            tx.commit().map_err(db("commit prune"))?;
        }
        return Ok(0);
    };
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

/// What the writer thread shares with the store handle.
struct WriterShared {
    head: Arc<AtomicU64>,
    pruned: Arc<AtomicU64>,
    retention: Option<Duration>,
    health: Arc<WriterHealth>,
}

/// Whether the writer's commits succeed, for readiness and metrics: while they fail (the
/// disk is full, the file cannot be written) the writer retries with backoff, ingest waits
/// and upstream reads are held back, and `/readyz` says why instead of "ready".
#[derive(Debug, Default)]
pub struct WriterHealth {
    /// Why the last commit failed, while the writer is retrying it (`None`: commits succeed).
    failing: Mutex<Option<String>>,
    /// Commits that failed and were retried, since the store opened.
    failures: AtomicU64,
}

impl WriterHealth {
    fn set(&self, why: Option<String>) {
        if let Ok(mut failing) = self.failing.lock() {
            *failing = why;
        }
    }

    fn failing(&self) -> Option<String> {
        self.failing.lock().ok().and_then(|f| f.clone())
    }
}

/// Marks the writer stopped when its thread ends for any reason (a panic included): no
/// journal write can succeed any more, and readiness must say so.
struct StoppedOnExit(Arc<WriterHealth>);

impl Drop for StoppedOnExit {
    fn drop(&mut self) {
        self.0
            .set(Some("the store's writer thread has stopped".to_string()));
    }
}

/// How often the writer looks for events to prune, busy or idle.
const PRUNE_EVERY: Duration = Duration::from_secs(30);
/// The most events one pruning pass deletes (one short transaction, so ingest barely waits).
const PRUNE_CHUNK: i64 = 20_000;

fn writer_loop(
    mut conn: Connection,
    commands: std::sync::mpsc::Receiver<Command>,
    shared: WriterShared,
) {
    let _stopped = StoppedOnExit(shared.health.clone());
    let head = shared.head.as_ref();
    let health = shared.health.as_ref();
    let mut next_seq = head.load(Ordering::Acquire) + 1;
    let mut next_prune = std::time::Instant::now();
    loop {
        if let Some(retention) = shared.retention {
            if std::time::Instant::now() >= next_prune {
                let cutoff_ms = chrono::Utc::now().timestamp_millis()
                    - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
                match prune(&mut conn, cutoff_ms, &shared.pruned) {
                    // A full chunk: there is more; go again soon, between batches.
                    Ok(n) if n >= PRUNE_CHUNK as u64 => {}
                    Ok(_) => next_prune = std::time::Instant::now() + PRUNE_EVERY,
                    Err(e) => {
                        warn!(error = %e, "pruning the journal failed; will try again");
                        next_prune = std::time::Instant::now() + PRUNE_EVERY;
                    }
                }
            }
        }
        let first = if shared.retention.is_some() {
            let wait = next_prune.saturating_duration_since(std::time::Instant::now());
            match commands.recv_timeout(wait) {
                Ok(c) => c,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match commands.recv() {
                Ok(c) => c,
                Err(_) => break,
            }
        };
        let mut pending = vec![first];
        while pending.len() < MAX_COMMANDS_PER_COMMIT {
            match commands.try_recv() {
                Ok(c) => pending.push(c),
                Err(_) => break,
            }
        }
        // A failed commit is retried with backoff until it succeeds when the failure is the
        // environment's (disk full, I/O error, a file that cannot be written, a lock):
        // nothing was acknowledged, readiness reports the failure, and while we retry the
        // bounded queue fills and ingest stops reading upstream, so no event is dropped on
        // the floor and ingest resumes by itself once the store recovers. A failure that
        // retrying cannot cure (a statement one command makes impossible) must not wedge the
        // writer: the batch is split and only the command that fails on its own is refused;
        // within an append, only the events that fail on their own are rejected.
        match commit_retrying(&mut conn, &mut pending, &mut next_seq, head, health) {
            Ok(()) => {}
            Err(e) if pending.len() == 1 => {
                if let Some(command) = pending.pop() {
                    refuse(&mut conn, command, e, &mut next_seq, head, health);
                }
            }
            Err(e) => {
                warn!(error = %e, commands = pending.len(), "store batch failed; committing its commands one by one");
                for command in pending {
                    let mut one = vec![command];
                    if let Err(e) =
                        commit_retrying(&mut conn, &mut one, &mut next_seq, head, health)
                    {
                        if let Some(command) = one.pop() {
                            refuse(&mut conn, command, e, &mut next_seq, head, health);
                        }
                    }
                }
            }
        }
    }
}

/// Answers a command that fails on its own for a reason retrying cannot cure. An append is
/// committed one event at a time instead, and only the events that fail on their own are
/// [`Appended::Rejected`] (ingest counts them): one impossible event must not cost the
/// events journalled with it.
fn refuse(
    conn: &mut Connection,
    command: Command,
    e: StoreError,
    next_seq: &mut u64,
    head: &AtomicU64,
    health: &WriterHealth,
) {
    let Command::Append {
        batch,
        window_ms,
        reply,
    } = command
    else {
        warn!(error = %e, "store command refused");
        reply_error(command, e);
        return;
    };
    let mut results = Vec::with_capacity(batch.len());
    for event in batch {
        let id = event.envelope.id.clone();
        let (one_reply, mut answer) = oneshot::channel();
        let mut one = vec![Command::Append {
            batch: vec![event],
            window_ms,
            reply: one_reply,
        }];
        let mut outcome = match commit_retrying(conn, &mut one, next_seq, head, health) {
            Ok(()) => answer.try_recv().ok().and_then(Result::ok),
            Err(e) => {
                error!(event_id = %id, error = %e, "the store refuses this event; rejected (not journalled)");
                None
            }
        };
        match outcome.as_mut().and_then(Vec::pop) {
            Some(appended) => results.push(appended),
            None => results.push(Appended::Rejected),
        }
    }
    let _ = reply.send(Ok(results));
}

/// Commits `pending` in one transaction and answers every command, retrying with backoff
/// while the failure is the environment's ([`is_environmental`]), with `health` saying so
/// meanwhile. On a failure only a command can cause, nothing is committed or answered and
/// the error is returned, `pending` untouched, for the caller to split the batch or refuse
/// the command.
fn commit_retrying(
    conn: &mut Connection,
    pending: &mut Vec<Command>,
    next_seq: &mut u64,
    head: &AtomicU64,
    health: &WriterHealth,
) -> Result<(), StoreError> {
    let mut delay = COMMIT_RETRY_FIRST;
    let mut failed = false;
    loop {
        match commit(conn, pending, *next_seq) {
            Ok((results, new_next)) => {
                *next_seq = new_next;
                head.store(new_next - 1, Ordering::Release);
                for (command, result) in pending.drain(..).zip(results) {
                    reply(command, result);
                }
                if failed {
                    info!("store commits succeed again; ingest resumes");
                    health.set(None);
                }
                return Ok(());
            }
            Err(e) if is_environmental(&e) => {
                error!(error = %e, retry_in_ms = delay.as_millis() as u64, "store commit failed; retrying (ingest is held back meanwhile)");
                failed = true;
                health.failures.fetch_add(1, Ordering::Relaxed);
                health.set(Some(e.to_string()));
                thread::sleep(delay);
                delay = (delay * 2).min(COMMIT_RETRY_MAX);
            }
            Err(e) => {
                if failed {
                    health.set(None);
                }
                return Err(e);
            }
        }
    }
}

/// First wait before a failed commit is tried again; it doubles up to [`COMMIT_RETRY_MAX`].
const COMMIT_RETRY_FIRST: Duration = Duration::from_millis(50);
/// Longest wait between two tries of a failed commit.
const COMMIT_RETRY_MAX: Duration = Duration::from_secs(2);

/// Whether a failed commit is the environment's fault (disk full, an I/O error, a file that
/// became read-only or unreadable, a lock, memory), so that the same commit may succeed once
/// the environment recovers, rather than the fault of a command in it (a constraint, a value
/// too big, a misuse): those fail again however often they are tried.
fn is_environmental(e: &StoreError) -> bool {
    use rusqlite::ErrorCode as C;
    match e {
        StoreError::Database {
            source: rusqlite::Error::SqliteFailure(f, _),
            ..
        } => !matches!(
            f.code,
            C::ConstraintViolation
                | C::TooBig
                | C::TypeMismatch
                | C::ParameterOutOfRange
                | C::ApiMisuse
                | C::Unknown
        ),
        StoreError::Io { .. } => true,
        _ => false,
    }
}

/// Answers a command whose own transaction failed for good.
fn reply_error(command: Command, e: StoreError) {
    match command {
        Command::Append { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Command::Replay { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Command::Record { reply, .. } | Command::SetDisabled { reply, .. } => {
            let _ = reply.send(Err(e));
        }
    }
}

fn reply(command: Command, result: Done) {
    match (command, result) {
        (Command::Append { batch, reply, .. }, Done::Appended(outcome)) => {
            let results = batch
                .into_iter()
                .zip(outcome)
                .map(|(new, stored)| match stored {
                    Some((seq, bytes, renewed)) => {
                        let mut envelope = new.envelope;
                        envelope.seq = Some(seq);
                        if let Some(id) = renewed {
                            envelope.id = id;
                        }
                        Appended::Stored {
                            seq,
                            bytes,
                            envelope: Box::new(envelope),
                        }
                    }
                    None => Appended::Duplicate,
                })
                .collect();
            let _ = reply.send(Ok(results));
        }
        (Command::Replay { reply, .. }, Done::Count(n)) => {
            let _ = reply.send(Ok(n));
        }
        (Command::Record { reply, .. } | Command::SetDisabled { reply, .. }, _) => {
            let _ = reply.send(Ok(()));
        }
        // `commit` answers each command with its own kind of result.
        (Command::Append { reply, .. }, _) => {
            let _ = reply.send(Err(StoreError::Closed));
        }
        (Command::Replay { reply, .. }, _) => {
            let _ = reply.send(Err(StoreError::Closed));
        }
    }
}

/// Applies every pending command in one transaction. Returns one result per command and the
/// next free seq; on error nothing is committed and the caller may simply try again.
fn commit(
    conn: &mut Connection,
    pending: &mut [Command],
    mut next_seq: u64,
) -> Result<(Vec<Done>, u64), StoreError> {
    let tx = conn.transaction().map_err(db("begin"))?;
    let mut all = Vec::with_capacity(pending.len());
    for command in pending.iter_mut() {
        let done = match command {
            Command::Append {
                batch, window_ms, ..
            } => {
                let (outcome, next) = append_batch(&tx, batch, *window_ms, next_seq)?;
                next_seq = next;
                Done::Appended(outcome)
            }
            Command::Record {
                endpoint,
                seq,
                attempt,
                next,
                ..
            } => {
                record_attempt(&tx, endpoint, *seq, attempt, *next)?;
                Done::Unit
            }
            Command::Replay {
                endpoint,
                selection,
                now_ms,
                ..
            } => Done::Count(replay(&tx, endpoint, selection, *now_ms)?),
            Command::SetDisabled {
                endpoint, reason, ..
            } => {
                tx.execute(
                    "INSERT INTO endpoints (name, disabled_reason) VALUES (?1, ?2)
                     ON CONFLICT (name) DO UPDATE SET disabled_reason = excluded.disabled_reason",
                    params![endpoint.as_str(), reason.as_deref()],
                )
                .map_err(db("set endpoint state"))?;
                Done::Unit
            }
        };
        all.push(done);
    }
    tx.commit().map_err(db("commit"))?;
    Ok((all, next_seq))
}

/// Journals `batch` from `next_seq` on; see [`Outcome`]. The batch itself is left as it
/// came (a failed transaction is retried with it): a renewed id travels in the outcome.
///
/// Dedup: an id whose newest event was received within `window_ms` of this one (or after it)
/// is a copy (nothing stored). An id seen longer ago than that is a new event: it gets
/// [`super::renewed_id`]`(id, seq of that newest event)`, so every id stays unique in the
/// journal. The newest event of an id is its `latest` row when it came back before, else the
/// event stored under the id itself: a new id costs the insert alone (its conflict check is
/// the lookup), plus a miss in the small `latest` table.
fn append_batch(
    tx: &rusqlite::Transaction<'_>,
    batch: &mut [NewEvent],
    window_ms: i64,
    mut next_seq: u64,
) -> Result<(Outcome, u64), StoreError> {
    let mut insert = tx
        .prepare_cached(
            "INSERT OR IGNORE INTO events (seq, id, recv_ms, body) VALUES (?1, ?2, ?3, ?4)",
        )
        .map_err(db("prepare append"))?;
    let mut enqueue = tx
        .prepare_cached(
            "INSERT OR IGNORE INTO deliveries (endpoint, seq, state, attempts, next_at_ms, subject) VALUES (?1, ?2, 0, 0, ?3, ?4)",
        )
        .map_err(db("prepare enqueue"))?;
    let mut latest = tx
        .prepare_cached("SELECT seq, recv_ms FROM latest WHERE base = ?1")
        .map_err(db("prepare dedup lookup"))?;
    let mut by_id = tx
        .prepare_cached("SELECT seq, recv_ms FROM events WHERE id = ?1")
        .map_err(db("prepare dedup lookup"))?;
    let mut remember = tx
        .prepare_cached(
            "INSERT INTO latest (base, seq, recv_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (base) DO UPDATE SET seq = excluded.seq, recv_ms = excluded.recv_ms",
        )
        .map_err(db("prepare dedup record"))?;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let is_copy = |recv_ms: i64, earlier_ms: i64| recv_ms.saturating_sub(earlier_ms) <= window_ms;
    let mut outcome: Outcome = Vec::with_capacity(batch.len());
    'events: for new in batch.iter_mut() {
        let envelope = &mut new.envelope;
        let recv_ms = envelope.received_ms().unwrap_or(now_ms);
        let newest = latest
            .query_row([envelope.id.as_str()], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
            })
            .optional()
            .map_err(db("dedup lookup"))?;
        let mut renewed = match newest {
            Some((_, earlier_ms)) if is_copy(recv_ms, earlier_ms) => {
                outcome.push(None);
                continue;
            }
            Some((seq, _)) => Some(super::renewed_id(&envelope.id, seq as u64)),
            None => None,
        };
        // The insert collides when the id is journalled already (how an id that never came
        // back is found), or when its `latest` row was pruned while an older event with it is
        // kept (retention keeps events with pending deliveries): the same rule then decides
        // against that event. Each round moves to a fresh id.
        for _ in 0..MAX_RENEWALS {
            envelope.seq = Some(next_seq);
            let base = match renewed.clone() {
                Some(id) => Some(std::mem::replace(&mut envelope.id, id)),
                None => None,
            };
            let body = serde_json::to_vec(&*envelope);
            let id = match base {
                Some(base) => std::mem::replace(&mut envelope.id, base),
                None => envelope.id.clone(),
            };
            envelope.seq = None;
            let body = body?;
            let changed = insert
                .execute(params![to_i64(next_seq), id, recv_ms, body])
                .map_err(db("append"))?;
            if changed == 0 {
                let (seq, earlier_ms) = by_id
                    .query_row([id.as_str()], |r| {
                        Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
                    })
                    .map_err(db("dedup lookup"))?;
                if is_copy(recv_ms, earlier_ms) {
                    outcome.push(None);
                    continue 'events;
                }
                renewed = Some(super::renewed_id(&id, seq as u64));
                continue;
            }
            if renewed.is_some() {
                remember
                    .execute(params![envelope.id, to_i64(next_seq), recv_ms])
                    .map_err(db("dedup record"))?;
            }
            for target in &new.targets {
                enqueue
                    .execute(params![
                        target.as_ref(),
                        to_i64(next_seq),
                        now_ms,
                        envelope.subject
                    ])
                    .map_err(db("enqueue delivery"))?;
            }
            outcome.push(Some((next_seq, Bytes::from(body), renewed)));
            next_seq += 1;
            continue 'events;
        }
        // Ids chained past every round: only a hostile collision gets here.
        warn!(event_id = %envelope.id, "no fresh id found for a returning event; dropped as a copy");
        outcome.push(None);
    }
    Ok((outcome, next_seq))
}

/// Most fresh ids tried for one returning event before it is taken for a copy.
const MAX_RENEWALS: usize = 8;

fn record_attempt(
    tx: &rusqlite::Transaction<'_>,
    endpoint: &str,
    seq: u64,
    attempt: &AttemptRecord,
    next: NextStep,
) -> Result<(), StoreError> {
    let seq = to_i64(seq);
    // Cached statements: this runs once per webhook attempt, and compiling the SQL every time
    // (`execute`) was ~7 % of the bridge's CPU in the webhook benchmark (issue 8, perf:
    // sqlite3Prepare / sqlite3RunParser).
    if next == NextStep::Delivered {
        tx.prepare_cached("DELETE FROM attempts WHERE endpoint = ?1 AND seq = ?2")
            .and_then(|mut st| st.execute(params![endpoint, seq]))
            .map_err(db("clear attempts"))?;
        tx.prepare_cached("DELETE FROM deliveries WHERE endpoint = ?1 AND seq = ?2")
            .and_then(|mut st| st.execute(params![endpoint, seq]))
            .map_err(db("complete delivery"))?;
        return Ok(());
    }
    let updated = match next {
        NextStep::RetryAt(at) => tx.prepare_cached("UPDATE deliveries SET attempts = attempts + 1, next_at_ms = ?3 WHERE endpoint = ?1 AND seq = ?2")
            .and_then(|mut st| st.execute(params![endpoint, seq, at])),
        NextStep::HoldUntil(at) => tx.prepare_cached("UPDATE deliveries SET next_at_ms = ?3 WHERE endpoint = ?1 AND seq = ?2")
            .and_then(|mut st| st.execute(params![endpoint, seq, at])),
        _ => tx.prepare_cached("UPDATE deliveries SET attempts = attempts + 1, state = 1 WHERE endpoint = ?1 AND seq = ?2")
            .and_then(|mut st| st.execute(params![endpoint, seq])),
    }
    .map_err(db("update delivery"))?;
    if updated == 0 {
        // Already completed by an earlier attempt (a replay raced it): nothing to record.
        return Ok(());
    }
    tx.prepare_cached("INSERT OR REPLACE INTO attempts (endpoint, seq, n, at_ms, status, error, duration_ms)
         VALUES (?1, ?2, (SELECT COALESCE(MAX(n), 0) + 1 FROM attempts WHERE endpoint = ?1 AND seq = ?2), ?3, ?4, ?5, ?6)")
            .and_then(|mut st| st.execute(params![
            endpoint,
            seq,
            attempt.at_ms,
            attempt.status.map(i64::from),
            attempt.error,
            to_i64(attempt.duration_ms)
        ]))
    .map_err(db("record attempt"))?;
    Ok(())
}

fn replay(
    tx: &rusqlite::Transaction<'_>,
    endpoint: &str,
    selection: &ReplaySelection,
    now_ms: i64,
) -> Result<u64, StoreError> {
    let seqs: Vec<i64> = {
        let (sql, args): (&str, Vec<rusqlite::types::Value>) = match selection {
            ReplaySelection::Dead => (
                "SELECT seq FROM deliveries WHERE endpoint = ?1 AND state = 1",
                vec![endpoint.to_string().into()],
            ),
            ReplaySelection::Ids(ids) => {
                return replay_seqs(tx, endpoint, &select_ids(tx, ids)?, now_ms);
            }
            ReplaySelection::Seqs { from, to } => (
                "SELECT seq FROM events WHERE seq BETWEEN ?1 AND ?2",
                vec![to_i64(*from).into(), to_i64(*to).into()],
            ),
            ReplaySelection::Received { since_ms, until_ms } => (
                "SELECT seq FROM events WHERE recv_ms BETWEEN ?1 AND ?2",
                vec![(*since_ms).into(), (*until_ms).into()],
            ),
        };
        let mut stmt = tx.prepare(sql).map_err(db("prepare replay selection"))?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(args), |r| r.get::<_, i64>(0))
            .map_err(db("select replay"))?;
        rows.collect::<Result<_, _>>()
            .map_err(db("select replay"))?
    };
    replay_seqs(tx, endpoint, &seqs, now_ms)
}

/// The seqs of the journalled events among `ids`, looked up in chunks so that no statement
/// exceeds SQLite's limit on bound variables.
fn select_ids(tx: &rusqlite::Transaction<'_>, ids: &[String]) -> Result<Vec<i64>, StoreError> {
    const CHUNK: usize = 500;
    let mut seqs = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(CHUNK) {
        let placeholders = vec!["?"; chunk.len()].join(",");
        let mut stmt = tx
            .prepare_cached(&format!(
                "SELECT seq FROM events WHERE id IN ({placeholders})"
            ))
            .map_err(db("prepare replay selection"))?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(chunk), |r| r.get::<_, i64>(0))
            .map_err(db("select replay"))?;
        for row in rows {
            seqs.push(row.map_err(db("select replay"))?);
        }
    }
    Ok(seqs)
}

/// Re-queues each seq for `endpoint`: pending, due now, attempts reset (an existing dead or
/// pending row is reset, a journalled event without one gets one).
fn replay_seqs(
    tx: &rusqlite::Transaction<'_>,
    endpoint: &str,
    seqs: &[i64],
    now_ms: i64,
) -> Result<u64, StoreError> {
    let mut clear = tx
        .prepare_cached("DELETE FROM attempts WHERE endpoint = ?1 AND seq = ?2")
        .map_err(db("prepare replay"))?;
    let mut upsert = tx
        .prepare_cached(
            "INSERT INTO deliveries (endpoint, seq, state, attempts, next_at_ms, subject)
             SELECT ?1, seq, 0, 0, ?3, json_extract(body, '$.subject') FROM events WHERE seq = ?2
             ON CONFLICT (endpoint, seq) DO UPDATE SET state = 0, attempts = 0, next_at_ms = excluded.next_at_ms",
        )
        .map_err(db("prepare replay"))?;
    let mut n = 0;
    for seq in seqs {
        clear
            .execute(params![endpoint, seq])
            .map_err(db("replay"))?;
        n += upsert
            .execute(params![endpoint, seq, now_ms])
            .map_err(db("replay"))? as u64;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Envelope;
    use chrono::Utc;
    use serde_json::json;
    use wsbridge_adapters::DecodedEvent;

    fn env(id: &str) -> Envelope {
        Envelope::new(
            DecodedEvent {
                id_from_content: true,
                id: id.into(),
                event_type: "voicepact.payment_update".into(),
                subject: Some("contract/c".into()),
                time: None,
                data: json!({"id": id}),
            },
            "wsbridge://vp",
            "voicepact",
            Utc::now(),
        )
    }

    fn new(id: &str) -> NewEvent {
        NewEvent {
            envelope: env(id),
            targets: vec![],
        }
    }

    fn temp_db(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("wsbridge-store-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("nested").join("j.db")
    }

    /// An event the database refuses on its own (here a trigger that aborts it, standing in
    /// for any failure retrying cannot cure) is rejected; the events batched with it are
    /// journalled with gapless seqs, and the store stays ready.
    #[tokio::test]
    async fn an_event_refused_on_its_own_is_rejected_and_its_batch_is_journalled() {
        let path = temp_db("refuse");
        let store = EmbeddedStore::open(&path, Durability::Normal).unwrap();
        let other = Connection::open(&path).unwrap();
        other
            .execute_batch(
                "CREATE TRIGGER refuse_bad BEFORE INSERT ON events WHEN NEW.id = 'bad'
                 BEGIN SELECT RAISE(ABORT, 'refused'); END;",
            )
            .unwrap();
        let out = store
            .append(vec![new("a"), new("bad"), new("b")])
            .await
            .unwrap();
        assert!(matches!(out[0], Appended::Stored { seq: 1, .. }), "{out:?}");
        assert_eq!(out[1], Appended::Rejected);
        assert!(matches!(out[2], Appended::Stored { seq: 2, .. }), "{out:?}");
        assert_eq!(
            store.unavailable(),
            None,
            "one event's refusal is not the store's failure"
        );
        assert_eq!(store.write_failures(), Some(0));
        let next = store.append(vec![new("c")]).await.unwrap();
        assert!(
            matches!(next[0], Appended::Stored { seq: 3, .. }),
            "{next:?}"
        );
        let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
    }

    #[test]
    fn the_environment_s_failures_are_retried_a_command_s_are_not() {
        let failure = |code: i32| StoreError::Database {
            op: "commit",
            source: rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None),
        };
        for code in [
            rusqlite::ffi::SQLITE_FULL,
            rusqlite::ffi::SQLITE_IOERR_WRITE,
            rusqlite::ffi::SQLITE_READONLY,
            rusqlite::ffi::SQLITE_READONLY_DBMOVED,
            rusqlite::ffi::SQLITE_CANTOPEN,
            rusqlite::ffi::SQLITE_BUSY,
            rusqlite::ffi::SQLITE_CORRUPT,
        ] {
            assert!(is_environmental(&failure(code)), "{code}");
        }
        for code in [
            rusqlite::ffi::SQLITE_CONSTRAINT_TRIGGER,
            rusqlite::ffi::SQLITE_TOOBIG,
            rusqlite::ffi::SQLITE_MISUSE,
        ] {
            assert!(!is_environmental(&failure(code)), "{code}");
        }
    }

    #[tokio::test]
    async fn appends_in_order_and_stores_each_id_once() {
        let path = temp_db("order");
        let store = EmbeddedStore::open(&path, Durability::Normal).unwrap();
        let out = store
            .append(vec![new("a"), new("b"), new("a")])
            .await
            .unwrap();
        assert!(matches!(out[0], Appended::Stored { seq: 1, .. }));
        assert!(matches!(out[1], Appended::Stored { seq: 2, .. }));
        assert_eq!(out[2], Appended::Duplicate);
        let again = store.append(vec![new("b"), new("c")]).await.unwrap();
        assert_eq!(again[0], Appended::Duplicate);
        assert!(matches!(again[1], Appended::Stored { seq: 3, .. }));

        let read = store.read_from(2, 10).await.unwrap();
        assert_eq!(read.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 3]);
        let stored: Envelope = serde_json::from_slice(&read[0].bytes).unwrap();
        assert_eq!(stored.id, "b");
        assert_eq!(stored.seq, Some(2), "the stored bytes carry their seq");
        let pos = store.position().await.unwrap();
        assert_eq!((pos.head, pos.first), (3, 1));
        let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
    }

    fn stored_id(appended: &Appended) -> (u64, String) {
        match appended {
            Appended::Stored {
                seq,
                envelope,
                bytes,
            } => {
                let from_bytes: Envelope = serde_json::from_slice(bytes).unwrap();
                assert_eq!(from_bytes.id, envelope.id, "the bytes carry the id stored");
                (*seq, envelope.id.clone())
            }
            other => panic!("not stored: {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_id_back_after_the_window_is_a_new_event_with_a_fresh_unique_id() {
        let path = temp_db("window");
        let store = EmbeddedStore::open(&path, Durability::Normal).unwrap();
        let minutes = chrono::Duration::minutes;
        // Received 10 minutes ago, then its copy 9 minutes ago (within the 2m window of it).
        let out = store
            .append(vec![
                received("a", minutes(10), &[]),
                received("a", minutes(9), &[]),
            ])
            .await
            .unwrap();
        assert_eq!(stored_id(&out[0]), (1, "a".to_string()));
        assert_eq!(out[1], Appended::Duplicate);
        // Back 5 minutes later: a new event under a fresh id; its copy a second later is one.
        let out = store
            .append(vec![
                received("a", minutes(5), &["hook"]),
                received("a", minutes(5) - chrono::Duration::seconds(1), &["hook"]),
            ])
            .await
            .unwrap();
        let renewed = super::super::renewed_id("a", 1);
        assert_eq!(stored_id(&out[0]), (2, renewed.clone()));
        assert_eq!(out[1], Appended::Duplicate);
        // Back again now: renewed from the newest event, not from the first.
        let out = store.append(vec![new("a")]).await.unwrap();
        assert_eq!(stored_id(&out[0]), (3, super::super::renewed_id("a", 2)));
        let ids: Vec<String> = store
            .read_from(1, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(ids.len(), 3);
        assert_eq!(
            ids.iter().collect::<std::collections::HashSet<_>>().len(),
            3,
            "every id is unique in the journal: {ids:?}"
        );
        // The delivery was queued under the stored event.
        let due = store.due("hook", i64::MAX, 10, false).await.unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].seq, due[0].id.as_str()), (2, renewed.as_str()));
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

    #[tokio::test]
    async fn reopening_keeps_epoch_head_and_dedup() {
        let path = temp_db("reopen");
        let epoch = {
            let store = EmbeddedStore::open(&path, Durability::Full).unwrap();
            store.append(vec![new("x"), new("y")]).await.unwrap();
            store.position().await.unwrap().epoch
        };
        let store = EmbeddedStore::open(&path, Durability::Normal).unwrap();
        let pos = store.position().await.unwrap();
        assert_eq!(pos.epoch, epoch);
        assert_eq!(pos.head, 2);
        let out = store.append(vec![new("y"), new("z")]).await.unwrap();
        assert_eq!(out[0], Appended::Duplicate);
        assert!(matches!(out[1], Appended::Stored { seq: 3, .. }));
        let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
    }

    #[tokio::test]
    async fn concurrent_appends_get_distinct_gapless_seqs() {
        let path = temp_db("concurrent");
        let store = EmbeddedStore::open(&path, Durability::Normal).unwrap();
        let mut tasks = Vec::new();
        for t in 0..8 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let batch = (0..100).map(|i| new(&format!("{t}-{i}"))).collect();
                store.append(batch).await.unwrap()
            }));
        }
        let mut seqs = Vec::new();
        for t in tasks {
            for a in t.await.unwrap() {
                if let Appended::Stored { seq, .. } = a {
                    seqs.push(seq);
                }
            }
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=800).collect::<Vec<_>>());
        let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
    }

    fn received(id: &str, ago: chrono::Duration, targets: &[&str]) -> NewEvent {
        let mut e = env(id);
        e.recvtime = (Utc::now() - ago).to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        NewEvent {
            envelope: e,
            targets: targets.iter().map(|t| Arc::from(*t)).collect(),
        }
    }

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
        let due = store.due("crm", i64::MAX, 10, false).await.unwrap();
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
        store
            .record("crm", 2, done, NextStep::Delivered)
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
