//! The journal's id index: how deduplication finds the event stored under an id without a
//! random B-tree page written per event.
//!
//! Ids are digests or providers' ids, so a B-tree keyed by them (the `UNIQUE` index the
//! journal had until 0.6.0) takes every insert on a random page, and each commit writes
//! every page it touched to the WAL and, at the checkpoint, to the file: 5.6–6.4 KB written
//! per ~500-byte event, the bound of the ingest benchmark (README, "Issue 15").
//!
//! Here the index has two parts, like the first two levels of a log-structured merge tree:
//! - the ids journalled lately, in memory: a hash map from the id's 64-bit hash to its seq
//!   (the *active generation*), and the generation before it, sealed and sorted, while it is
//!   being written out;
//! - the table `ids (h, seq)`, keyed by the hash: a sealed generation is written into it in
//!   hash order, a slice per commit (in the commit's own transaction), so that each page of
//!   the table is written once per generation rather than once per event.
//!
//! A generation holds `storage.id_generation` ids (65,536 by default), or a sixteenth of the
//! journal when that is more (at most [`MAX_ID_GENERATION`]): the table's pages written per
//! event stay a small fraction as the journal grows, and the memory stays bounded (under 60
//! bytes per id held, two generations at most).
//!
//! Hashes can collide, so a hash is only a candidate: each is checked against the journal's
//! own row (`events.id` at that seq), which also makes entries for pruned events harmless
//! (their row is gone). Those entries are deleted as the generations sweep the table.
//!
//! Crash safety: the table and `meta.ids_through` (every id up to that seq is in the table)
//! are written in the writer's transactions, so they are as durable as the journal; the
//! memory part is rebuilt on open from the events after `ids_through`. A transaction that
//! fails is undone in memory too ([`IdIndex::rollback`]).

use std::collections::HashMap;

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use sha2::{Digest, Sha256};
use tracing::info;

use super::db;
use crate::storage::config::MAX_ID_GENERATION;
use crate::storage::StoreError;

/// Entries of a sealed generation written per commit, at most an eighth of it.
const FLUSH_SLICE: usize = 8_192;
/// Events read per statement while indexing a journal on open.
const REINDEX_CHUNK: i64 = 1_000_000;

/// The index key of `id`: the first 8 bytes of its SHA-256, as SQLite's signed integer.
pub(super) fn hash(id: &str) -> i64 {
    let digest = Sha256::digest(id.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// The id index (see the module doc). Owned by the writer thread.
pub(super) struct IdIndex {
    /// Ids journalled since the last seal: hash → seq.
    active: HashMap<i64, i64>,
    /// The sealed generation, sorted by (hash, seq), until all of it is in the table.
    sealed: Vec<(i64, i64)>,
    /// How many entries of `sealed` are in the table (committed or in the open transaction).
    flushed: usize,
    /// The highest seq of `sealed`: `ids_through` once it is all written.
    sealed_through: i64,
    /// The undo record of the open transaction.
    undo: Undo,
    /// `storage.id_generation`: the smallest generation.
    generation: usize,
}

/// What the open transaction changed in memory.
#[derive(Default)]
struct Undo {
    /// Hashes added to `active`.
    added: Vec<i64>,
    /// `flushed` when the transaction began.
    flushed: usize,
}

impl IdIndex {
    /// Loads the index of the journal in `conn` whose newest seq is `head`: indexes into the
    /// table whatever is missing from it beyond one generation (a journal written before the
    /// index existed, or a long stretch since the last write-out), and holds the rest in
    /// memory.
    pub(super) fn open(
        conn: &mut Connection,
        head: u64,
        generation: usize,
    ) -> Result<IdIndex, StoreError> {
        let head = i64::try_from(head).unwrap_or(i64::MAX);
        let generation_ids = i64::try_from(generation).unwrap_or(i64::MAX);
        let mut through = ids_through(conn)?;
        if head.saturating_sub(through) > generation_ids {
            let target = head - generation_ids / 2;
            info!(from = through, to = target, "indexing the journal's ids");
            while through < target {
                let until = through.saturating_add(REINDEX_CHUNK).min(target);
                let tx = conn.transaction().map_err(db("begin id indexing"))?;
                let mut entries = read_entries(&tx, through, until)?;
                entries.sort_unstable();
                {
                    let mut insert = tx
                        .prepare_cached("INSERT OR IGNORE INTO ids (h, seq) VALUES (?1, ?2)")
                        .map_err(db("prepare id indexing"))?;
                    for (h, seq) in entries {
                        insert.execute(params![h, seq]).map_err(db("index ids"))?;
                    }
                }
                set_ids_through(&tx, until)?;
                tx.commit().map_err(db("commit id indexing"))?;
                through = until;
            }
        }
        let tx = conn.transaction().map_err(db("begin id load"))?;
        let recent = read_entries(&tx, through, head)?;
        tx.commit().map_err(db("end id load"))?;
        let mut index = IdIndex {
            active: HashMap::with_capacity(recent.len()),
            sealed: Vec::new(),
            flushed: 0,
            sealed_through: through,
            undo: Undo::default(),
            generation,
        };
        for (h, seq) in recent {
            if let Some(other) = index.active.insert(h, seq) {
                // Two ids with one hash among the recent ones: the table takes the other.
                conn.execute(
                    "INSERT OR IGNORE INTO ids (h, seq) VALUES (?1, ?2)",
                    params![h, other],
                )
                .map_err(db("index ids"))?;
            }
        }
        index.seal_if_full(head);
        Ok(index)
    }

    /// The seq and receive time of the event stored under `id` (whose [`hash`] is `h`), if
    /// the journal has one.
    pub(super) fn find(
        &self,
        tx: &Transaction<'_>,
        id: &str,
        h: i64,
    ) -> Result<Option<(i64, i64)>, StoreError> {
        if let Some(&seq) = self.active.get(&h) {
            if let Some(found) = stored_as(tx, seq, id)? {
                return Ok(Some(found));
            }
        }
        let start = self.sealed.partition_point(|&(k, _)| k < h);
        for &(k, seq) in &self.sealed[start..] {
            if k != h {
                break;
            }
            if let Some(found) = stored_as(tx, seq, id)? {
                return Ok(Some(found));
            }
        }
        let mut in_table = tx
            .prepare_cached("SELECT seq FROM ids WHERE h = ?1")
            .map_err(db("prepare id lookup"))?;
        let seqs = in_table
            .query_map([h], |r| r.get::<_, i64>(0))
            .map_err(db("id lookup"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db("id lookup"))?;
        for seq in seqs {
            if let Some(found) = stored_as(tx, seq, id)? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// Starts a transaction's changes (see [`IdIndex::rollback`]).
    pub(super) fn begin(&mut self) {
        self.undo.added.clear();
        self.undo.flushed = self.flushed;
    }

    /// Records that the event with id hash `h` is stored at `seq` in `tx`.
    pub(super) fn insert(
        &mut self,
        tx: &Transaction<'_>,
        h: i64,
        seq: i64,
    ) -> Result<(), StoreError> {
        match self.active.entry(h) {
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(seq);
                self.undo.added.push(h);
            }
            std::collections::hash_map::Entry::Occupied(_) => {
                // Another recent id has this hash: this one goes to the table at once.
                tx.prepare_cached("INSERT OR IGNORE INTO ids (h, seq) VALUES (?1, ?2)")
                    .and_then(|mut st| st.execute(params![h, seq]))
                    .map_err(db("index ids"))?;
            }
        }
        Ok(())
    }

    /// Writes the next slice of the sealed generation into the table within `tx` (all of
    /// it when the active generation is full already), deleting on the way the entries of
    /// events pruned up to `pruned`; the last slice records `ids_through`.
    pub(super) fn flush_slice(
        &mut self,
        tx: &Transaction<'_>,
        pruned: i64,
    ) -> Result<(), StoreError> {
        if self.flushed >= self.sealed.len() {
            return Ok(());
        }
        let remaining = self.sealed.len() - self.flushed;
        let n = if self.active.len() >= self.generation_for(self.sealed_through) {
            remaining
        } else {
            remaining.min(FLUSH_SLICE.min(self.sealed.len() / 8).max(1))
        };
        let slice = &self.sealed[self.flushed..self.flushed + n];
        let mut insert = tx
            .prepare_cached("INSERT OR IGNORE INTO ids (h, seq) VALUES (?1, ?2)")
            .map_err(db("prepare id write-out"))?;
        for &(h, seq) in slice {
            insert
                .execute(params![h, seq])
                .map_err(db("write out ids"))?;
        }
        if pruned > 0 {
            // The slices sweep the whole key space once per generation.
            // From where the slice before ended, so that no key between two slices is missed.
            let low = match self.flushed {
                0 => i64::MIN,
                k => self.sealed[k - 1].0,
            };
            let done = self.flushed + n >= self.sealed.len();
            let high = if done {
                i64::MAX
            } else {
                slice.last().map_or(i64::MAX, |e| e.0)
            };
            tx.prepare_cached(
                "DELETE FROM ids WHERE h >= ?1 AND h <= ?2 AND seq <= ?3
                 AND NOT EXISTS (SELECT 1 FROM events WHERE events.seq = ids.seq)",
            )
            .and_then(|mut st| st.execute(params![low, high, pruned]))
            .map_err(db("drop pruned ids"))?;
        }
        self.flushed += n;
        if self.flushed >= self.sealed.len() {
            set_ids_through(tx, self.sealed_through)?;
        }
        Ok(())
    }

    /// The open transaction failed: forgets what it added and wrote.
    pub(super) fn rollback(&mut self) {
        for h in self.undo.added.drain(..) {
            self.active.remove(&h);
        }
        self.flushed = self.undo.flushed;
    }

    /// The open transaction committed, and the journal's head is `head`: drops a generation
    /// now wholly in the table, and seals the active one when it is full.
    pub(super) fn committed(&mut self, head: u64) {
        self.undo.added.clear();
        if !self.sealed.is_empty() && self.flushed >= self.sealed.len() {
            self.sealed = Vec::new();
            self.flushed = 0;
        }
        self.seal_if_full(i64::try_from(head).unwrap_or(i64::MAX));
    }

    fn seal_if_full(&mut self, head: i64) {
        if !self.sealed.is_empty() || self.active.len() < self.generation_for(head) {
            return;
        }
        let mut sealed: Vec<(i64, i64)> = self.active.drain().collect();
        sealed.sort_unstable();
        self.sealed_through = sealed
            .iter()
            .map(|e| e.1)
            .max()
            .unwrap_or(self.sealed_through);
        self.sealed = sealed;
        self.flushed = 0;
        self.active.shrink_to(self.generation_for(head));
    }

    /// The generation size for a journal whose newest seq is `head`.
    fn generation_for(&self, head: i64) -> usize {
        usize::try_from(head / 16)
            .unwrap_or(MAX_ID_GENERATION)
            .clamp(self.generation, MAX_ID_GENERATION.max(self.generation))
    }

    /// Ids held in memory (both generations), for tests and sizing.
    #[cfg(test)]
    pub(super) fn in_memory(&self) -> usize {
        self.active.len() + self.sealed.len() - self.flushed
    }
}

/// `(seq, receive time)` when the event at `seq` is stored under `id`.
fn stored_as(tx: &Transaction<'_>, seq: i64, id: &str) -> Result<Option<(i64, i64)>, StoreError> {
    let row = tx
        .prepare_cached("SELECT id, recv_ms FROM events WHERE seq = ?1")
        .map_err(db("prepare id check"))?
        .query_row([seq], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .optional()
        .map_err(db("id check"))?;
    Ok(row.and_then(|(stored, recv_ms)| (stored == id).then_some((seq, recv_ms))))
}

/// `(hash, seq)` of the events with `from < seq <= to`.
fn read_entries(tx: &Transaction<'_>, from: i64, to: i64) -> Result<Vec<(i64, i64)>, StoreError> {
    let mut stmt = tx
        .prepare_cached("SELECT seq, id FROM events WHERE seq > ?1 AND seq <= ?2 ORDER BY seq")
        .map_err(db("prepare id indexing"))?;
    let rows = stmt
        .query_map(params![from, to], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })
        .map_err(db("read ids"))?;
    let mut entries = Vec::new();
    for row in rows {
        let (seq, id) = row.map_err(db("read ids"))?;
        entries.push((hash(&id), seq));
    }
    Ok(entries)
}

fn ids_through(conn: &Connection) -> Result<i64, StoreError> {
    super::schema::meta_number(conn, "ids_through", "read id index point")
}

fn set_ids_through(tx: &Transaction<'_>, through: i64) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO meta (key, value) VALUES ('ids_through', ?1)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )
    .and_then(|mut st| st.execute(params![through.to_string()]))
    .map_err(db("record id index point"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::config::Durability;
    use crate::storage::embedded::schema::{migrate, open_connection};
    use crate::storage::embedded::test_support::temp_db;

    /// The generation the tests run with (the default).
    const MIN_GENERATION: usize = 65_536;

    fn journal(name: &str) -> (std::path::PathBuf, Connection) {
        let path = temp_db(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut conn = open_connection(&path, Durability::Normal).unwrap();
        migrate(&mut conn).unwrap();
        (path, conn)
    }

    /// Appends events `from..=to` (id `e<seq>`) as the writer does: row, then index entry,
    /// in transactions of `per_commit` events, each beginning with a write-out slice.
    fn append(conn: &mut Connection, index: &mut IdIndex, from: i64, to: i64, per_commit: i64) {
        append_pruned(conn, index, from, to, per_commit, 0);
    }

    /// [`append`], telling each write-out slice that events up to `pruned` were pruned.
    fn append_pruned(
        conn: &mut Connection,
        index: &mut IdIndex,
        from: i64,
        to: i64,
        per_commit: i64,
        pruned: i64,
    ) {
        let mut seq = from;
        while seq <= to {
            index.begin();
            let tx = conn.transaction().unwrap();
            index.flush_slice(&tx, pruned).unwrap();
            let last = (seq + per_commit - 1).min(to);
            for s in seq..=last {
                let id = format!("e{s}");
                tx.execute(
                    "INSERT INTO events (seq, id, recv_ms, body) VALUES (?1, ?2, ?1, x'00')",
                    params![s, id],
                )
                .unwrap();
                index.insert(&tx, hash(&id), s).unwrap();
            }
            tx.commit().unwrap();
            index.committed(last as u64);
            seq = last + 1;
        }
    }

    fn find(conn: &mut Connection, index: &IdIndex, id: &str) -> Option<i64> {
        let tx = conn.transaction().unwrap();
        let found = index.find(&tx, id, hash(id)).unwrap().map(|(seq, _)| seq);
        tx.commit().unwrap();
        found
    }

    fn table_len(conn: &Connection) -> i64 {
        conn.query_row("SELECT COUNT(*) FROM ids", [], |r| r.get(0))
            .unwrap()
    }

    /// A full generation is sealed and written out a slice per commit; every id stays
    /// findable throughout, and memory holds at most two generations.
    #[test]
    fn generations_are_written_out_and_every_id_stays_findable() {
        let (path, mut conn) = journal("ids-generations");
        let mut index = IdIndex::open(&mut conn, 0, MIN_GENERATION).unwrap();
        let total = MIN_GENERATION as i64 + 3 * FLUSH_SLICE as i64;
        append(&mut conn, &mut index, 1, total, 1000);
        assert!(index.in_memory() <= 2 * MIN_GENERATION);
        assert!(
            table_len(&conn) > 0,
            "the sealed generation is being written out"
        );
        for seq in [1, 777, MIN_GENERATION as i64, total] {
            assert_eq!(find(&mut conn, &index, &format!("e{seq}")), Some(seq));
        }
        assert_eq!(find(&mut conn, &index, "never"), None);
        // Enough commits to write the whole generation out: `ids_through` records it.
        append(&mut conn, &mut index, total + 1, total + 10_000, 1000);
        // The generation was sealed at the first commit that filled it.
        let through = ids_through(&conn).unwrap();
        assert!((MIN_GENERATION as i64..MIN_GENERATION as i64 + 1000).contains(&through));
        assert_eq!(table_len(&conn), through);
        assert_eq!(find(&mut conn, &index, "e5"), Some(5));
        let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
    }

    /// Reopening rebuilds memory from the events after `ids_through`, and a journal
    /// without an index (one written before it existed) is indexed on open.
    #[test]
    fn open_rebuilds_and_indexes_what_the_table_lacks() {
        let (path, mut conn) = journal("ids-reopen");
        let mut index = IdIndex::open(&mut conn, 0, MIN_GENERATION).unwrap();
        let total = 3 * MIN_GENERATION as i64;
        append(&mut conn, &mut index, 1, total, 4096);
        drop(index);
        let index = IdIndex::open(&mut conn, total as u64, MIN_GENERATION).unwrap();
        for seq in [1, 2 * MIN_GENERATION as i64 + 3, total] {
            assert_eq!(find(&mut conn, &index, &format!("e{seq}")), Some(seq));
        }
        // Forget the table altogether, as a journal from before the index.
        conn.execute_batch("DELETE FROM ids; DELETE FROM meta WHERE key = 'ids_through';")
            .unwrap();
        let index = IdIndex::open(&mut conn, total as u64, MIN_GENERATION).unwrap();
        assert!(index.in_memory() <= MIN_GENERATION, "{}", index.in_memory());
        assert!(table_len(&conn) >= total - MIN_GENERATION as i64);
        for seq in [1, MIN_GENERATION as i64, total - 1] {
            assert_eq!(find(&mut conn, &index, &format!("e{seq}")), Some(seq));
        }
        let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
    }

    /// A hash is only a candidate: an entry whose event holds another id (a collision, or
    /// a pruned event's seq) is not a match, and a colliding id still gets indexed.
    #[test]
    fn a_hash_is_checked_against_the_journal() {
        let (path, mut conn) = journal("ids-collide");
        let mut index = IdIndex::open(&mut conn, 0, MIN_GENERATION).unwrap();
        append(&mut conn, &mut index, 1, 2, 10);
        // "x" is made to collide with "e1" (same key), stored at seq 3.
        index.begin();
        let tx = conn.transaction().unwrap();
        tx.execute(
            "INSERT INTO events (seq, id, recv_ms, body) VALUES (3, 'x', 3, x'00')",
            [],
        )
        .unwrap();
        index.insert(&tx, hash("e1"), 3).unwrap();
        tx.commit().unwrap();
        index.committed(3);
        let tx = conn.transaction().unwrap();
        assert_eq!(index.find(&tx, "x", hash("e1")).unwrap(), Some((3, 3)));
        assert_eq!(index.find(&tx, "e1", hash("e1")).unwrap(), Some((1, 1)));
        assert_eq!(index.find(&tx, "e2", hash("e1")).unwrap(), None);
        tx.execute("DELETE FROM events WHERE seq = 2", []).unwrap();
        assert_eq!(index.find(&tx, "e2", hash("e2")).unwrap(), None, "pruned");
        drop(tx);
        let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
    }

    /// A transaction that fails leaves the index as it was: its ids are forgotten and its
    /// write-out slice is written again by the next one.
    #[test]
    fn a_failed_transaction_is_undone_in_memory() {
        let (path, mut conn) = journal("ids-rollback");
        let mut index = IdIndex::open(&mut conn, 0, MIN_GENERATION).unwrap();
        append(&mut conn, &mut index, 1, MIN_GENERATION as i64, 4096);
        index.begin();
        {
            let tx = conn.transaction().unwrap();
            index.flush_slice(&tx, 0).unwrap();
            tx.execute(
                "INSERT INTO events (seq, id, recv_ms, body) VALUES (?1, 'y', 0, x'00')",
                params![MIN_GENERATION as i64 + 1],
            )
            .unwrap();
            index
                .insert(&tx, hash("y"), MIN_GENERATION as i64 + 1)
                .unwrap();
            // Dropped without commit: rolled back.
        }
        index.rollback();
        assert_eq!(index.flushed, 0);
        assert!(!index.active.contains_key(&hash("y")));
        append(
            &mut conn,
            &mut index,
            MIN_GENERATION as i64 + 1,
            MIN_GENERATION as i64 + 12 * 4096,
            4096,
        );
        assert_eq!(ids_through(&conn).unwrap(), MIN_GENERATION as i64);
        assert_eq!(table_len(&conn), MIN_GENERATION as i64);
        let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
    }

    /// Entries of pruned events are deleted as a generation sweeps the table; entries of
    /// events kept (held for a delivery) stay.
    #[test]
    fn pruned_events_leave_the_table() {
        let (path, mut conn) = journal("ids-prune");
        let mut index = IdIndex::open(&mut conn, 0, MIN_GENERATION).unwrap();
        let gen = MIN_GENERATION as i64;
        append(&mut conn, &mut index, 1, gen + 12 * 4096, 4096);
        assert_eq!(table_len(&conn), gen);
        // Prune the first half except seq 7.
        conn.execute(
            "DELETE FROM events WHERE seq <= ?1 AND seq <> 7",
            params![gen / 2],
        )
        .unwrap();
        let mut seq = gen + 12 * 4096 + 1;
        // Fill and write out the next generation, telling it what was pruned.
        while ids_through(&conn).unwrap() == gen {
            append_pruned(&mut conn, &mut index, seq, seq + 4095, 4096, gen / 2);
            seq += 4096;
        }
        let old: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM ids WHERE seq <= ?1",
                params![gen / 2],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(old, 1, "only the kept event's entry remains");
        assert_eq!(find(&mut conn, &index, "e7"), Some(7));
        let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
    }
}
