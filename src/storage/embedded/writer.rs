//! The writer thread: it owns the write connection and applies the store's commands
//! (appends, attempt records, delivery cursors, replays, endpoint state, durable consumers'
//! state) in group commits. A failed commit is retried while the environment is at fault and
//! split when a command is.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use super::checkpoint::CommitGate;
use super::cursor::{target_pattern, targets_column};
use super::ids::{self, IdIndex};
use super::retention::Schedule;
use super::{db, to_i64, COMMAND_QUEUE};
use crate::storage::{
    Appended, AttemptRecord, DurableKey, NewEvent, NextStep, ReplaySelection, SavedDurable,
    StoreError,
};

/// Most commands merged into one transaction.
const MAX_COMMANDS_PER_COMMIT: usize = 64;

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
        /// The delivery was read from the endpoint's cursor (it has no row yet): a failed
        /// attempt writes its row.
        from_cursor: bool,
        reply: Reply<()>,
    },
    /// Moves `endpoint`'s cursor up to `seq` (never back).
    SaveCursor {
        endpoint: String,
        seq: u64,
        reply: Reply<()>,
    },
    /// Writes a pending row for each event above `endpoint`'s cursor, up to `through`, that
    /// is routed to it, and moves the cursor to `through`: an ordered endpoint's queue works
    /// on rows (their subjects order them).
    Materialise {
        endpoint: String,
        through: u64,
        now_ms: i64,
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
    /// Insert or replace a durable consumer's state: acks arrive often, so they ride the
    /// group commits of the journal instead of costing an fsync each.
    SaveDurable {
        durable: SavedDurable,
        reply: Reply<()>,
    },
    DeleteDurable {
        key: DurableKey,
        reply: Reply<bool>,
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
    /// Whether the command found what it acted on (a durable deleted).
    Found(bool),
}

/// The store's end of the writer thread: its bounded command queue. Cloned into each
/// endpoint's delivery queue; dropping the last clone stops the thread once it has committed
/// what it was given.
#[derive(Clone)]
pub(super) struct Writer {
    commands: std::sync::mpsc::SyncSender<Command>,
}

impl Writer {
    /// Starts the writer thread on `conn` (the file at `path`, for errors).
    pub(super) fn spawn(
        conn: Connection,
        ids: IdIndex,
        shared: WriterShared,
        path: &Path,
    ) -> Result<Writer, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(COMMAND_QUEUE);
        thread::Builder::new()
            .name("wsbridge-store".into())
            .spawn(move || writer_loop(conn, ids, rx, shared))
            .map_err(|source| StoreError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Writer { commands: tx })
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

    /// Sends the command `make` builds around its reply channel and waits for the answer,
    /// given after the command's transaction committed.
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(make(reply)).await?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Journals `batch` (deduplicated within `window_ms`); see [`append_batch`].
    pub(super) async fn append(
        &self,
        batch: Vec<NewEvent>,
        window_ms: i64,
    ) -> Result<Vec<Appended>, StoreError> {
        self.ask(|reply| Command::Append {
            batch,
            window_ms,
            reply,
        })
        .await
    }

    /// Records an attempt at `endpoint`'s delivery of `seq` and what comes next;
    /// `from_cursor`: the delivery has no row yet (see [`Command::Record`]).
    pub(super) async fn record(
        &self,
        endpoint: &str,
        seq: u64,
        attempt: AttemptRecord,
        next: NextStep,
        from_cursor: bool,
    ) -> Result<(), StoreError> {
        self.ask(|reply| Command::Record {
            endpoint: endpoint.to_string(),
            seq,
            attempt,
            next,
            from_cursor,
            reply,
        })
        .await
    }

    /// Moves `endpoint`'s cursor up to `seq` (never back); answers once committed.
    pub(super) async fn save_cursor(&self, endpoint: &str, seq: u64) -> Result<(), StoreError> {
        self.ask(|reply| Command::SaveCursor {
            endpoint: endpoint.to_string(),
            seq,
            reply,
        })
        .await
    }

    /// Turns `endpoint`'s events above its cursor, up to `through`, into pending rows due at
    /// `now_ms`, and moves the cursor there; answers once committed.
    pub(super) async fn materialise(
        &self,
        endpoint: &str,
        through: u64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.ask(|reply| Command::Materialise {
            endpoint: endpoint.to_string(),
            through,
            now_ms,
            reply,
        })
        .await
    }

    /// Re-queues the selected deliveries of `endpoint`, due at `now_ms`; returns how many.
    pub(super) async fn replay(
        &self,
        endpoint: &str,
        selection: ReplaySelection,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        self.ask(|reply| Command::Replay {
            endpoint: endpoint.to_string(),
            selection,
            now_ms,
            reply,
        })
        .await
    }

    /// Records why `endpoint` is disabled (`None`: enabled).
    pub(super) async fn set_disabled(
        &self,
        endpoint: &str,
        reason: Option<String>,
    ) -> Result<(), StoreError> {
        self.ask(|reply| Command::SetDisabled {
            endpoint: endpoint.to_string(),
            reason,
            reply,
        })
        .await
    }

    /// Inserts or replaces a durable consumer's saved state; answers once committed.
    pub(super) async fn save_durable(&self, durable: SavedDurable) -> Result<(), StoreError> {
        self.ask(|reply| Command::SaveDurable { durable, reply })
            .await
    }

    /// Deletes a durable consumer's saved state; `false` when there was none.
    pub(super) async fn delete_durable(&self, key: &DurableKey) -> Result<bool, StoreError> {
        self.ask(|reply| Command::DeleteDurable {
            key: key.clone(),
            reply,
        })
        .await
    }
}

/// What the writer thread shares with the store handle.
pub(super) struct WriterShared {
    /// The last seq committed.
    pub(super) head: Arc<AtomicU64>,
    /// Every seq up to this one has been pruned by retention (0: none).
    pub(super) pruned: Arc<AtomicU64>,
    /// `storage.retention` (`None`: keep everything).
    pub(super) retention: Option<Duration>,
    /// Whether commits succeed.
    pub(super) health: Arc<WriterHealth>,
    /// Held for every write transaction (the checkpoint thread holds it to let the log
    /// start over: checkpoint.rs).
    pub(super) gate: Arc<CommitGate>,
}

/// Whether the writer's commits succeed, for readiness and metrics: while they fail (the
/// disk is full, the file cannot be written) the writer retries with backoff, ingest waits
/// and upstream reads are held back, and `/readyz` says why instead of "ready".
#[derive(Debug, Default)]
pub(super) struct WriterHealth {
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

    /// Why commits fail, while they do.
    pub(super) fn failing(&self) -> Option<String> {
        self.failing.lock().ok().and_then(|f| f.clone())
    }

    /// Commits that failed and were retried, since the store opened.
    pub(super) fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
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

/// What the writer thread carries from one commit to the next.
struct Journal<'a> {
    /// The seq the next stored event gets.
    next_seq: u64,
    /// Where deduplication finds ids.
    ids: IdIndex,
    /// The head, the retention point and the health the store handle reads.
    shared: &'a WriterShared,
}

fn writer_loop(
    mut conn: Connection,
    ids: IdIndex,
    commands: std::sync::mpsc::Receiver<Command>,
    shared: WriterShared,
) {
    let _stopped = StoppedOnExit(shared.health.clone());
    let mut journal = Journal {
        next_seq: shared.head.load(Ordering::Acquire) + 1,
        ids,
        shared: &shared,
    };
    let mut pruning = Schedule::new(shared.retention);
    loop {
        {
            let _gate = shared.gate.hold();
            pruning.run_if_due(&mut conn, &shared.pruned);
        }
        let first = match pruning.wait() {
            Some(wait) => match commands.recv_timeout(wait) {
                Ok(c) => c,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            },
            None => match commands.recv() {
                Ok(c) => c,
                Err(_) => break,
            },
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
        let _gate = shared.gate.hold();
        match commit_retrying(&mut conn, &mut pending, &mut journal) {
            Ok(()) => {}
            Err(e) if pending.len() == 1 => {
                if let Some(command) = pending.pop() {
                    refuse(&mut conn, command, e, &mut journal);
                }
            }
            Err(e) => {
                warn!(error = %e, commands = pending.len(), "store batch failed; committing its commands one by one");
                for command in pending {
                    let mut one = vec![command];
                    if let Err(e) = commit_retrying(&mut conn, &mut one, &mut journal) {
                        if let Some(command) = one.pop() {
                            refuse(&mut conn, command, e, &mut journal);
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
fn refuse(conn: &mut Connection, command: Command, e: StoreError, journal: &mut Journal<'_>) {
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
        let mut outcome = match commit_retrying(conn, &mut one, journal) {
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
    journal: &mut Journal<'_>,
) -> Result<(), StoreError> {
    let health = journal.shared.health.as_ref();
    let mut delay = COMMIT_RETRY_FIRST;
    let mut failed = false;
    loop {
        journal.ids.begin();
        match commit(conn, pending, journal) {
            Ok((results, new_next)) => {
                journal.next_seq = new_next;
                journal.ids.committed(new_next - 1);
                journal.shared.head.store(new_next - 1, Ordering::Release);
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
                journal.ids.rollback();
                error!(error = %e, retry_in_ms = delay.as_millis() as u64, "store commit failed; retrying (ingest is held back meanwhile)");
                failed = true;
                health.failures.fetch_add(1, Ordering::Relaxed);
                health.set(Some(e.to_string()));
                thread::sleep(delay);
                delay = (delay * 2).min(COMMIT_RETRY_MAX);
            }
            Err(e) => {
                journal.ids.rollback();
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
        Command::Record { reply, .. }
        | Command::SaveCursor { reply, .. }
        | Command::Materialise { reply, .. }
        | Command::SetDisabled { reply, .. }
        | Command::SaveDurable { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Command::DeleteDurable { reply, .. } => {
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
        (
            Command::Record { reply, .. }
            | Command::SaveCursor { reply, .. }
            | Command::Materialise { reply, .. }
            | Command::SetDisabled { reply, .. }
            | Command::SaveDurable { reply, .. },
            _,
        ) => {
            let _ = reply.send(Ok(()));
        }
        (Command::DeleteDurable { reply, .. }, Done::Found(found)) => {
            let _ = reply.send(Ok(found));
        }
        // `commit` answers each command with its own kind of result.
        (Command::Append { reply, .. }, _) => {
            let _ = reply.send(Err(StoreError::Closed));
        }
        (Command::Replay { reply, .. }, _) => {
            let _ = reply.send(Err(StoreError::Closed));
        }
        (Command::DeleteDurable { reply, .. }, _) => {
            let _ = reply.send(Err(StoreError::Closed));
        }
    }
}

/// Applies every pending command in one transaction. Returns one result per command and the
/// next free seq; on error nothing is committed and the caller may simply try again.
fn commit(
    conn: &mut Connection,
    pending: &mut [Command],
    journal: &mut Journal<'_>,
) -> Result<(Vec<Done>, u64), StoreError> {
    let mut next_seq = journal.next_seq;
    let tx = conn.transaction().map_err(db("begin"))?;
    let pruned = to_i64(journal.shared.pruned.load(Ordering::Acquire));
    journal.ids.flush_slice(&tx, pruned)?;
    let ids = &mut journal.ids;
    let mut all = Vec::with_capacity(pending.len());
    for command in pending.iter_mut() {
        let done = match command {
            Command::Append {
                batch, window_ms, ..
            } => {
                let (outcome, next) = append_batch(&tx, ids, batch, *window_ms, next_seq)?;
                next_seq = next;
                Done::Appended(outcome)
            }
            Command::Record {
                endpoint,
                seq,
                attempt,
                next,
                from_cursor,
                ..
            } => {
                record_attempt(&tx, endpoint, *seq, attempt, *next, *from_cursor)?;
                Done::Unit
            }
            Command::SaveCursor { endpoint, seq, .. } => {
                save_cursor(&tx, endpoint, *seq)?;
                Done::Unit
            }
            Command::Materialise {
                endpoint,
                through,
                now_ms,
                ..
            } => {
                materialise(&tx, endpoint, *through, *now_ms)?;
                Done::Unit
            }
            Command::Replay {
                endpoint,
                selection,
                now_ms,
                ..
            } => Done::Count(replay(&tx, ids, endpoint, selection, *now_ms)?),
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
            Command::SaveDurable { durable, .. } => {
                tx.prepare_cached(
                    "INSERT INTO durables (consumer, name, state, keep_from) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (consumer, name) DO UPDATE
                     SET state = excluded.state, keep_from = excluded.keep_from",
                )
                .and_then(|mut st| {
                    st.execute(params![
                        durable.key.consumer,
                        durable.key.name,
                        &durable.state[..],
                        to_i64(durable.keep_from)
                    ])
                })
                .map_err(db("save durable"))?;
                Done::Unit
            }
            Command::DeleteDurable { key, .. } => {
                let deleted = tx
                    .prepare_cached("DELETE FROM durables WHERE consumer = ?1 AND name = ?2")
                    .and_then(|mut st| st.execute(params![key.consumer, key.name]))
                    .map_err(db("delete durable"))?;
                Done::Found(deleted > 0)
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
/// [`crate::storage::renewed_id`]`(id, seq of that newest event)`, so every id stays unique in the
/// journal. The newest event of an id is its `latest` row when it came back before, else the
/// event stored under the id itself, found through the id index ([`IdIndex`]): a new id
/// costs a miss in memory, a miss in the index table and a miss in the small `latest`
/// table, plus the append.
fn append_batch(
    tx: &rusqlite::Transaction<'_>,
    ids: &mut IdIndex,
    batch: &mut [NewEvent],
    window_ms: i64,
    mut next_seq: u64,
) -> Result<(Outcome, u64), StoreError> {
    // An event's deliveries are its `targets`: each endpoint's queue reads them from its
    // cursor on (cursor.rs), so no row is written per delivery.
    let mut insert = tx
        .prepare_cached(
            "INSERT INTO events (seq, id, recv_ms, body, targets) VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .map_err(db("prepare append"))?;
    let mut latest = tx
        .prepare_cached("SELECT seq, recv_ms FROM latest WHERE base = ?1")
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
        let unsequenced = &new.unsequenced;
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
            Some((seq, _)) => Some(crate::storage::renewed_id(&envelope.id, seq as u64)),
            None => None,
        };
        // The id is journalled already when it never came back (no `latest` row), or when
        // its `latest` row was pruned while an older event with it is kept (retention keeps
        // events with pending deliveries): the same rule then decides against that event.
        // Each round moves to a fresh id.
        for _ in 0..MAX_RENEWALS {
            let id = renewed.clone().unwrap_or_else(|| envelope.id.clone());
            let h = ids::hash(&id);
            if let Some((seq, earlier_ms)) = ids.find(tx, &id, h)? {
                if is_copy(recv_ms, earlier_ms) {
                    outcome.push(None);
                    continue 'events;
                }
                renewed = Some(crate::storage::renewed_id(&id, seq as u64));
                continue;
            }
            // Ingest serialised the envelope; only one stored under a renewed id is
            // serialised again, with that id.
            let body = match &renewed {
                None => crate::envelope::with_seq(unsequenced, next_seq),
                Some(fresh) => {
                    let base = std::mem::replace(&mut envelope.id, fresh.clone());
                    let body = envelope.to_unsequenced();
                    envelope.id = base;
                    crate::envelope::with_seq(&body?, next_seq)
                }
            };
            insert
                .execute(params![
                    to_i64(next_seq),
                    id,
                    recv_ms,
                    &body[..],
                    targets_column(&new.targets)
                ])
                .map_err(db("append"))?;
            ids.insert(tx, h, to_i64(next_seq))?;
            if renewed.is_some() {
                remember
                    .execute(params![envelope.id, to_i64(next_seq), recv_ms])
                    .map_err(db("dedup record"))?;
            }
            outcome.push(Some((next_seq, body, renewed)));
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
    from_cursor: bool,
) -> Result<(), StoreError> {
    if from_cursor {
        if next == NextStep::Delivered {
            // Nothing to write: the cursor moves past it (`save_cursor`).
            return Ok(());
        }
        // Its first failure: the delivery gets its row, then is updated as any other.
        tx.prepare_cached(
            "INSERT OR IGNORE INTO deliveries (endpoint, seq, state, attempts, next_at_ms, subject)
             SELECT ?1, seq, 0, 0, 0, json_extract(body, '$.subject') FROM events WHERE seq = ?2",
        )
        .and_then(|mut st| st.execute(params![endpoint, to_i64(seq)]))
        .map_err(db("write delivery row"))?;
    }
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
    ids: &IdIndex,
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
            ReplaySelection::Ids(wanted) => {
                return replay_seqs(tx, endpoint, &select_ids(tx, ids, wanted)?, now_ms);
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

/// The seqs of the journalled events among `wanted`, found through the id index.
fn select_ids(
    tx: &rusqlite::Transaction<'_>,
    ids: &IdIndex,
    wanted: &[String],
) -> Result<Vec<i64>, StoreError> {
    let mut seqs = Vec::with_capacity(wanted.len());
    for id in wanted {
        if let Some((seq, _)) = ids.find(tx, id, ids::hash(id))? {
            seqs.push(seq);
        }
    }
    Ok(seqs)
}

/// Moves `endpoint`'s cursor up to `seq`; a cursor already further stays where it is.
fn save_cursor(tx: &rusqlite::Transaction<'_>, endpoint: &str, seq: u64) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO cursors (endpoint, seq) VALUES (?1, ?2)
         ON CONFLICT (endpoint) DO UPDATE SET seq = max(seq, excluded.seq)",
    )
    .and_then(|mut st| st.execute(params![endpoint, to_i64(seq)]))
    .map_err(db("save delivery cursor"))?;
    Ok(())
}

/// Writes a pending row, due at `now_ms`, for each of `endpoint`'s events above its cursor
/// and up to `through` (none already has one: rows above a cursor come only from replays,
/// which `OR IGNORE` leaves as they are), and moves the cursor to `through`. Used by an
/// ordered endpoint's queue and by retention (which must not prune what a cursor still owes).
pub(super) fn materialise(
    tx: &rusqlite::Transaction<'_>,
    endpoint: &str,
    through: u64,
    now_ms: i64,
) -> Result<(), StoreError> {
    let from = super::queries::cursor(tx, endpoint)?;
    if from >= through {
        return Ok(());
    }
    tx.prepare_cached(
        "INSERT OR IGNORE INTO deliveries (endpoint, seq, state, attempts, next_at_ms, subject)
         SELECT ?1, seq, 0, 0, ?4, json_extract(body, '$.subject') FROM events
         WHERE seq > ?2 AND seq <= ?3 AND instr(targets, ?5) > 0",
    )
    .and_then(|mut st| {
        st.execute(params![
            endpoint,
            to_i64(from),
            to_i64(through),
            now_ms,
            target_pattern(endpoint)
        ])
    })
    .map_err(db("write delivery rows"))?;
    save_cursor(tx, endpoint, through)
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
    use crate::storage::config::Durability;
    use crate::storage::embedded::test_support::{new, queue_options, received, temp_db};
    use crate::storage::embedded::EmbeddedStore;
    use crate::storage::Store;

    /// A store in a fresh file (`name`) whose database refuses the inserts into `table` that
    /// match `when`: a trigger aborts them, standing in for any failure retrying cannot cure.
    fn refusing(name: &str, table: &str, when: &str) -> (std::path::PathBuf, Arc<EmbeddedStore>) {
        let path = temp_db(name);
        let store = EmbeddedStore::open(&path, Durability::Normal).unwrap();
        Connection::open(&path)
            .unwrap()
            .execute_batch(&format!(
                "CREATE TRIGGER refuse_bad BEFORE INSERT ON {table} WHEN {when}
                 BEGIN SELECT RAISE(ABORT, 'refused'); END;"
            ))
            .unwrap();
        (path, store)
    }

    /// An event the database refuses on its own (here a trigger that aborts it, standing in
    /// for any failure retrying cannot cure) is rejected; the events batched with it are
    /// journalled with gapless seqs, and the store stays ready.
    #[tokio::test]
    async fn an_event_refused_on_its_own_is_rejected_and_its_batch_is_journalled() {
        let (path, store) = refusing("refuse", "events", "NEW.id = 'bad'");
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
        let renewed = crate::storage::renewed_id("a", 1);
        assert_eq!(stored_id(&out[0]), (2, renewed.clone()));
        assert_eq!(out[1], Appended::Duplicate);
        // Back again now: renewed from the newest event, not from the first.
        let out = store.append(vec![new("a")]).await.unwrap();
        assert_eq!(stored_id(&out[0]), (3, crate::storage::renewed_id("a", 2)));
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
        let due = store
            .delivery_queue("hook", queue_options())
            .await
            .unwrap()
            .due(i64::MAX, 10)
            .await
            .unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].seq, due[0].id.as_str()), (2, renewed.as_str()));
        let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
    }

    /// Durables are saved, replaced, listed in key order and deleted, and what was saved
    /// survives closing the store.
    #[tokio::test]
    async fn durables_are_saved_replaced_listed_deleted_and_survive_reopening() {
        use crate::storage::embedded::test_support::durable;
        let path = temp_db("durables");
        {
            let store = EmbeddedStore::open(&path, Durability::Normal).unwrap();
            assert!(store.durables().await.unwrap().is_empty());
            // Saved out of key order; one key with characters SQL and subjects care about,
            // one state with bytes that are not UTF-8.
            let mut odd = durable("b", "x.y *>'\"", "", 1);
            odd.state = Bytes::from_static(&[0, 255, 1]);
            store
                .save_durable(durable("b", "sync", "s1", 7))
                .await
                .unwrap();
            store.save_durable(odd.clone()).await.unwrap();
            store
                .save_durable(durable("a", "sync", "s0", 3))
                .await
                .unwrap();
            // Replacing keeps one row with the newest state and position.
            store
                .save_durable(durable("b", "sync", "s2", 9))
                .await
                .unwrap();
            assert_eq!(
                store.durables().await.unwrap(),
                vec![
                    durable("a", "sync", "s0", 3),
                    durable("b", "sync", "s2", 9),
                    odd.clone()
                ]
            );
            assert!(store.delete_durable(&odd.key).await.unwrap());
            assert!(
                !store.delete_durable(&odd.key).await.unwrap(),
                "gone already"
            );
        }
        let store = EmbeddedStore::open(&path, Durability::Normal).unwrap();
        assert_eq!(
            store.durables().await.unwrap(),
            vec![durable("a", "sync", "s0", 3), durable("b", "sync", "s2", 9)]
        );
        let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
    }

    /// A durable save the database refuses on its own fails alone: the appends and saves
    /// committed with it in one batch are split from it and committed.
    #[tokio::test]
    async fn a_durable_save_refused_on_its_own_fails_alone() {
        use crate::storage::embedded::test_support::durable;
        let (path, store) = refusing("durable-refused", "durables", "NEW.name = 'bad'");
        // Sent together, so that they share commits.
        let none = durable("c", "none", "", 1).key;
        let (good, bad, appended, deleted) = tokio::join!(
            store.save_durable(durable("c", "good", "g", 1)),
            store.save_durable(durable("c", "bad", "b", 1)),
            store.append(vec![new("a"), new("b")]),
            store.delete_durable(&none),
        );
        good.unwrap();
        assert!(
            matches!(
                bad,
                Err(StoreError::Database {
                    op: "save durable",
                    ..
                })
            ),
            "{bad:?}"
        );
        assert_eq!(appended.unwrap().len(), 2);
        assert!(!deleted.unwrap());
        assert_eq!(
            store.durables().await.unwrap(),
            vec![durable("c", "good", "g", 1)]
        );
        assert_eq!(store.position().await.unwrap().head, 2);
        assert_eq!(
            store.unavailable(),
            None,
            "a refused save is not the store's failure"
        );
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
}
