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
//!
//! The parts: `schema` (migrations, connection pragmas, the epoch), `writer` (the writer
//! thread and everything it commits), `ids` (the id index deduplication looks ids up in),
//! `retention` (pruning), `queries` (the readers and what they read) and `queue` (each
//! endpoint's delivery queue, with the deliveries it holds); this module ties them into the
//! [`Store`].

mod checkpoint;
mod cursor;
mod ids;
mod queries;
mod queue;
mod retention;
mod schema;
#[cfg(test)]
mod test_support;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tracing::info;

use super::config::Durability;
use super::{
    Appended, DeliveryCounts, DeliveryInfo, DeliveryQueue, DeliveryState, DurableKey,
    JournalPosition, NewEvent, QueueOptions, ReplaySelection, SavedDurable, Store, StoreError,
    StoredEvent,
};
use queries::Readers;
use writer::{Writer, WriterHealth, WriterShared};

/// Append commands that may wait for the writer thread.
pub const COMMAND_QUEUE: usize = 64;
/// Connections that serve consumer replays, apart from the reader of webhook queries,
/// readiness and the admin API. Replay pages are short sequential reads; two keep both cores
/// busy without letting replays crowd out everything else.
pub const REPLAY_READERS: usize = 2;

/// The embedded store. Cheap to share (`Arc`); dropping the last handle stops the writer
/// thread after it has committed what it was given.
pub struct EmbeddedStore {
    writer: Writer,
    readers: Readers,
    epoch: String,
    head: Arc<AtomicU64>,
    /// Every seq up to this one has been pruned by retention (0: none).
    pruned: Arc<AtomicU64>,
    health: Arc<WriterHealth>,
    path: PathBuf,
    /// `storage.dedup_window` in milliseconds.
    dedup_window_ms: i64,
    /// Each endpoint's deliveries in memory: what its queues hold, and its cursor.
    endpoints: queue::Endpoints,
    /// Copies the log into the database off the writer thread (stopped when dropped).
    _checkpointer: checkpoint::Checkpointer,
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
    /// `storage.id_generation`: ids the id index holds in memory before writing them out.
    pub id_generation: usize,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        let storage = crate::config::StorageConfig::default();
        EmbeddedOptions {
            durability: Durability::Normal,
            retention: None,
            dedup_window: storage.dedup_window,
            id_generation: storage.id_generation,
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

fn db(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Database { op, source }
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
            id_generation,
        } = options;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let mut writer = schema::open_connection(path, durability)?;
        schema::migrate(&mut writer)?;
        // Checkpoints run on their own thread; the writer's own is only a backstop.
        writer
            .execute_batch(&format!(
                "PRAGMA wal_autocheckpoint = {};",
                checkpoint::FALLBACK_PAGES
            ))
            .map_err(db("configure the writer's checkpoint"))?;
        let epoch = schema::load_or_create_epoch(&writer)?;
        let pruned_through = retention::load_pruned_through(&writer)?;
        let stored_head = schema::stored_head(&writer)?;
        // Pruning may have emptied the journal: seqs are never reused within an epoch.
        let head = stored_head.max(pruned_through);
        let readers = Readers::open(path, durability)?;
        let head = Arc::new(AtomicU64::new(head));
        let pruned = Arc::new(AtomicU64::new(pruned_through));
        let health = Arc::new(WriterHealth::default());
        let gate = Arc::new(checkpoint::CommitGate::default());
        let shared = WriterShared {
            gate: gate.clone(),
            head: head.clone(),
            pruned: pruned.clone(),
            retention,
            health: health.clone(),
        };
        let ids = ids::IdIndex::open(&mut writer, head.load(Ordering::Relaxed), id_generation)?;
        let writer = Writer::spawn(writer, ids, shared, path)?;
        let checkpointer = checkpoint::Checkpointer::spawn(path, durability, gate)?;
        info!(path = %path.display(), epoch = %epoch, head = head.load(Ordering::Relaxed), "embedded store open");
        Ok(Arc::new(EmbeddedStore {
            writer,
            readers,
            epoch,
            head,
            pruned,
            health,
            path: path.to_path_buf(),
            dedup_window_ms: i64::try_from(dedup_window.as_millis()).unwrap_or(i64::MAX),
            endpoints: queue::Endpoints::default(),
            _checkpointer: checkpointer,
        }))
    }

    /// How far `endpoint`'s cursor deliveries are done in memory (0: no queue in this
    /// process; the saved cursor counts then).
    fn done_through(&self, endpoint: &str) -> u64 {
        self.endpoints
            .get(endpoint)
            .map_or(0, |state| state.watermark())
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
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
        self.writer.append(batch, self.dedup_window_ms).await
    }

    async fn read_from(&self, from: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        self.check_retained(from)?;
        let from = to_i64(from);
        let limit = to_i64(limit as u64);
        self.readers
            .with_reader(move |conn| queries::read_from(conn, from, limit))
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
        self.readers
            .with_replay_reader(move |conn| queries::read_page(conn, from, limit, max_bytes))
            .await
    }

    async fn position(&self) -> Result<JournalPosition, StoreError> {
        let head = self.head.load(Ordering::Acquire);
        let epoch = self.epoch.clone();
        let pruned = to_i64(self.pruned.load(Ordering::Acquire));
        // Events kept below the pruning point only for their pending deliveries do not count:
        // a consumer cannot resume from there without a gap.
        let first = self
            .readers
            .with_reader(move |conn| queries::first_retained(conn, pruned))
            .await?;
        Ok(JournalPosition {
            epoch,
            head,
            first: first.map_or(head + 1, |f| f as u64),
        })
    }

    async fn delivery_queue(
        &self,
        endpoint: &str,
        options: QueueOptions,
    ) -> Result<Arc<dyn DeliveryQueue>, StoreError> {
        let state = match self.endpoints.get(endpoint) {
            Some(state) => state,
            None => {
                let name = endpoint.to_string();
                let saved = self
                    .readers
                    .with_reader(move |conn| queries::cursor(conn, &name))
                    .await?;
                // Saved at once: retention keeps what a cursor still owes only once the
                // cursor has a row.
                self.writer.save_cursor(endpoint, saved).await?;
                self.endpoints.of(endpoint, saved)
            }
        };
        Ok(Arc::new(queue::EmbeddedQueue {
            endpoint: endpoint.to_string(),
            options,
            writer: self.writer.clone(),
            readers: self.readers.clone(),
            state,
            head: self.head.clone(),
            next_due: std::sync::Mutex::new(None),
        }))
    }

    async fn deliveries(
        &self,
        endpoint: &str,
        state: DeliveryState,
        limit: usize,
    ) -> Result<Vec<DeliveryInfo>, StoreError> {
        let after = self.done_through(endpoint);
        let endpoint = endpoint.to_string();
        let limit = to_i64(limit as u64);
        self.readers
            .with_reader(move |conn| queries::deliveries(conn, &endpoint, state, limit, after))
            .await
    }

    async fn counts(&self, endpoint: &str) -> Result<DeliveryCounts, StoreError> {
        let after = self.done_through(endpoint);
        let endpoint = endpoint.to_string();
        self.readers
            .with_reader(move |conn| queries::counts(conn, &endpoint, after))
            .await
    }

    async fn replay(&self, endpoint: &str, selection: ReplaySelection) -> Result<u64, StoreError> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        self.writer.replay(endpoint, selection, now_ms).await
    }

    async fn set_disabled(&self, endpoint: &str, reason: Option<String>) -> Result<(), StoreError> {
        self.writer.set_disabled(endpoint, reason).await
    }

    async fn durables(&self) -> Result<Vec<SavedDurable>, StoreError> {
        self.readers.with_reader(queries::durables).await
    }

    async fn save_durable(&self, durable: SavedDurable) -> Result<(), StoreError> {
        self.writer.save_durable(durable).await
    }

    async fn delete_durable(&self, key: &DurableKey) -> Result<bool, StoreError> {
        self.writer.delete_durable(key).await
    }

    async fn seq_at(&self, at_ms: i64) -> Result<u64, StoreError> {
        // The head before the search: an event committed meanwhile gets a later seq, so
        // head + 1 never skips it.
        let head = self.head.load(Ordering::Acquire);
        let pruned = to_i64(self.pruned.load(Ordering::Acquire));
        let found = self
            .readers
            .with_reader(move |conn| queries::seq_at(conn, at_ms, pruned))
            .await?;
        Ok(found.unwrap_or(head.saturating_add(1)))
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
        Some(self.health.failures())
    }

    async fn disabled(&self, endpoint: &str) -> Result<Option<String>, StoreError> {
        let endpoint = endpoint.to_string();
        self.readers
            .with_reader(move |conn| queries::disabled(conn, &endpoint))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{new, temp_db};
    use super::*;

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
}
