//! WAL checkpoints off the writer thread. SQLite checkpoints a WAL database from whichever
//! connection commits past `wal_autocheckpoint`: on the writer thread that meant a commit now
//! and then copied up to 64 MiB of pages into the database file and fsynced it while ingest
//! and webhook records waited (12 % of the writer's samples in the issue 8 profile, and the
//! tail of commit latency). Here a thread of its own runs `PRAGMA wal_checkpoint(PASSIVE)`
//! every [`INTERVAL`] on its own connection: a passive checkpoint copies what no reader still
//! needs without blocking the writer, which goes on appending to the log.
//!
//! Starting the log over: SQLite restarts it when a write transaction begins while the
//! whole log is copied and no reader uses it. Under continuous writes a passive checkpoint
//! never gets there (commits land while it copies), so once the log is long this thread
//! takes the [`CommitGate`] for one more passive checkpoint: no commit can land meanwhile,
//! and it has only the frames committed since the last one to copy (a few), so the writer
//! waits that long at most, and its next transaction starts the log over. (`RESTART`, used
//! before, waits for readers with the busy handler's sleeps while holding the writer back:
//! the 30–40 ms tail of commit latency in the latency bench.) A `RESTART` remains the
//! fallback when readers keep the log from being started over for long. The writer also keeps
//! an automatic checkpoint at a far larger size ([`FALLBACK_PAGES`]), so the log stays
//! bounded even if this thread could not keep up. Durability is unchanged: a commit is in the
//! log before it is acknowledged, whoever copies it into the database later.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;
use tracing::debug;

use super::schema;
use crate::storage::config::Durability;
use crate::storage::StoreError;

/// How often the log is checkpointed.
pub(super) const INTERVAL: Duration = Duration::from_millis(100);
/// The writer's own automatic checkpoint, a backstop only: 65,536 pages (256 MiB of log).
pub(super) const FALLBACK_PAGES: u32 = 65_536;
/// A log longer than this (4 KiB pages: 32 MiB) is restarted: under continuous writes a
/// passive checkpoint never sees the whole log copied when the writer begins its next
/// transaction, so the log would only grow (to the backstop) and every page lookup in it
/// slows down. `RESTART` copies what the last passive one left (a few frames) and makes the
/// writer start the log over; it holds new writes back only for that short copy.
const RESTART_FRAMES: i64 = 8_192;
/// Past this many frames (128 MiB) the gentle restart has not worked (readers kept the log
/// in use every time): a `RESTART` checkpoint, which waits for them, starts it over.
const FORCE_RESTART_FRAMES: i64 = RESTART_FRAMES * 4;

/// Held by the writer for each of its write transactions, and by the checkpoint thread for
/// the short checkpoint that lets the log start over (see the module doc).
#[derive(Debug, Default)]
pub(super) struct CommitGate(Mutex<()>);

impl CommitGate {
    /// Holds back commits (or waits for the one under way) until the guard is dropped.
    pub(super) fn hold(&self) -> std::sync::MutexGuard<'_, ()> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The checkpoint thread; dropping it stops the thread (and waits for it).
pub(super) struct Checkpointer {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts checkpointing the database at `path`, whose writer holds `gate` for its
    /// transactions.
    pub(super) fn spawn(
        path: &Path,
        durability: Durability,
        gate: Arc<CommitGate>,
    ) -> Result<Checkpointer, StoreError> {
        let conn = schema::open_reader_connection(path, durability)?;
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("wsbridge-checkpoint".into())
            .spawn(move || run(&conn, &flag, &gate))
            .map_err(|source| StoreError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Checkpointer {
            stop,
            thread: Some(thread),
        })
    }
}

/// `PRAGMA wal_checkpoint(mode)`: (busy, frames in the log, frames copied).
fn checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<(i64, i64, i64)> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })
}

fn run(conn: &Connection, stop: &(Mutex<bool>, Condvar), gate: &CommitGate) {
    let (lock, wake) = stop;
    loop {
        {
            let guard = lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let (guard, _) = wake
                .wait_timeout_while(guard, INTERVAL, |stopped| !*stopped)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if *guard {
                return;
            }
        }
        match checkpoint(conn, "PASSIVE") {
            Ok((_, log, _)) if log > FORCE_RESTART_FRAMES => {
                if let Err(e) = checkpoint(conn, "RESTART") {
                    debug!(error = %e, "log restart failed; trying again");
                }
            }
            Ok((_, log, _)) if log > RESTART_FRAMES => {
                // The rest, with commits held back: the writer's next transaction then
                // finds the whole log copied and starts it over.
                let held = gate.hold();
                let result = checkpoint(conn, "PASSIVE");
                drop(held);
                if let Ok((_, log, copied)) = result {
                    if copied < log {
                        debug!(
                            log,
                            copied, "checkpoint could not finish (a reader still needs the log)"
                        );
                    }
                }
            }
            Ok(_) => {}
            Err(e) => debug!(error = %e, "checkpoint failed; trying again"),
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        let (lock, wake) = &*self.stop;
        *lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = true;
        wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_is_copied_into_the_database_off_the_writer_and_the_thread_stops_when_dropped() {
        let dir = std::env::temp_dir().join(format!("wsbridge-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let db = dir.join("t.db");
        let writer = schema::open_connection(&db, Durability::Normal).expect("writer");
        writer
            .execute_batch(&format!(
                "PRAGMA wal_autocheckpoint = {FALLBACK_PAGES}; CREATE TABLE t (x BLOB);"
            ))
            .expect("schema");
        let checkpointer =
            Checkpointer::spawn(&db, Durability::Normal, Arc::new(CommitGate::default()))
                .expect("spawn");
        for _ in 0..200 {
            writer
                .execute("INSERT INTO t VALUES (zeroblob(4096))", [])
                .expect("insert");
        }
        // Wait (with a deadline) until a checkpoint copied the log: the file then holds the
        // rows, and the writer's next commit starts the log over.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        while size(&db) < 200 * 4096 {
            assert!(
                std::time::Instant::now() < deadline,
                "no checkpoint copied the log"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // A long log is started over: once past RESTART_FRAMES, the writer's next commits
        // begin the log anew (what kept commits fast in the latency bench).
        let total = RESTART_FRAMES * 2;
        for _ in 0..total {
            writer
                .execute("INSERT INTO t VALUES (zeroblob(4000))", [])
                .expect("insert");
        }
        let probe = Connection::open(&db).expect("probe");
        let frames = || {
            probe
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1))
                .expect("log size")
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            writer
                .execute("INSERT INTO t VALUES (zeroblob(100))", [])
                .expect("insert");
            if frames() < RESTART_FRAMES {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the log was never started over"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // Stops (joins) at once, however long its interval.
        let t = std::time::Instant::now();
        drop(checkpointer);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the thread did not stop"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
