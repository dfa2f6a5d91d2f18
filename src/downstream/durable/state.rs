//! A durable consumer's bookkeeping as a pure state machine: which events it owes, who holds
//! which, when they are due again, what is acknowledged and what is dead. No I/O and no
//! clock of its own (every call takes `now_ms`), so every rule is unit-tested here; the
//! runtime ([`super`]) feeds it journal events and carries out what it decides.
//!
//! Terms:
//! - *read cursor* (`read_through`): the newest journal seq the durable has looked at;
//!   events after it are unread (they stay in the journal, not in memory);
//! - *outstanding*: matching events read and not settled: ready to send, held by a
//!   connection (in flight, with an ack deadline) or waiting for a nak's delay;
//! - *floor*: every matching seq up to it is settled (acked or dead-lettered); a dead letter
//!   replayed by the operator is outstanding again but does not pull the floor back (it is
//!   remembered on its own, so a restart resumes after the floor and redelivers it too).
//!
//! Memory is bounded by the connections' `max_unacked`: new events are read only while the
//! outstanding events are fewer than the attached connections may hold together
//! ([`DurableState::room`]), and dead letters are capped ([`DurableState::new`]).

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A connection attached to a durable (unique within the bridge process).
pub type ConnId = u64;

/// What a durable was created with; fixed for its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// How long a delivered event may stay unacknowledged before it is sent again.
    pub ack_wait_ms: u64,
    /// Deliveries of one event before it becomes a dead letter.
    pub max_deliver: u32,
}

/// One event to write to a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Send {
    /// The connection to write it to.
    pub conn: ConnId,
    /// The journal position.
    pub seq: u64,
    /// Which delivery this is (1 = first).
    pub delivery: u32,
    /// The envelope as journalled.
    pub bytes: Bytes,
}

/// A dead letter: an event delivered `max_deliver` times without an ack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The journal position.
    pub seq: u64,
    /// Deliveries made.
    pub deliveries: u32,
    /// When it died (unix ms).
    pub at_ms: i64,
}

/// What a durable keeps across restarts (serialised by the runtime).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Every matching seq up to it is settled.
    pub floor: u64,
    /// Acked seqs above the floor.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub acked: Vec<u64>,
    /// Replayed dead letters not acked yet (at or below the floor).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requeued: Vec<u64>,
    /// Dead letters, oldest seq first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dead: Vec<DeadLetter>,
    /// The newest seq ever sent: after a restart, an unacked event at or below it has been
    /// delivered at least once, so its next delivery counts from 2.
    pub delivered_through: u64,
}

impl Checkpoint {
    /// The lowest seq the durable may still need from the journal.
    pub fn keep_from(&self) -> u64 {
        let mut keep = self.floor.saturating_add(1);
        if let Some(r) = self.requeued.iter().min() {
            keep = keep.min(*r);
        }
        if let Some(d) = self.dead.first() {
            keep = keep.min(d.seq);
        }
        keep
    }
}

#[derive(Clone, Debug)]
struct Entry {
    bytes: Bytes,
    deliveries: u32,
    holder: Option<ConnId>,
    /// Held: the ack deadline; waiting after a nak: when it is ready again.
    due_ms: Option<i64>,
    /// A replayed dead letter: not part of the floor.
    requeued: bool,
}

#[derive(Clone, Copy, Debug)]
struct Conn {
    max_unacked: usize,
    held: usize,
}

/// Counters of what the acks meant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AckOutcome {
    /// Outstanding events settled by this ack.
    pub acked: u64,
    /// Seqs that were not outstanding (unknown, already acked, or from before a seek).
    pub ignored: u64,
}

/// Why a nak was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("seq {0} is not held unacknowledged by this connection")]
pub struct NotHeld(pub u64);

/// One durable's bookkeeping.
#[derive(Debug)]
pub struct DurableState {
    settings: Settings,
    /// Dead letters kept at most (the oldest are dropped beyond it).
    max_dead: usize,
    floor: u64,
    read_through: u64,
    acked: BTreeSet<u64>,
    outstanding: BTreeMap<u64, Entry>,
    /// Outstanding, not held, due now: sent next, lowest seq first.
    ready: BTreeSet<u64>,
    /// (due, seq) of held events (ack deadline) and nak'd ones (their delay).
    timers: BTreeSet<(i64, u64)>,
    delivered_through: u64,
    /// Unacked events at or below this were delivered before a restart.
    restored_through: u64,
    dead: BTreeMap<u64, DeadLetter>,
    /// Replayed dead letters waiting for their bytes from the journal.
    requeue_wanted: BTreeSet<u64>,
    conns: BTreeMap<ConnId, Conn>,
    /// Where round-robin dispatch starts next.
    next_conn: ConnId,
    redeliveries: u64,
    dead_dropped: u64,
    /// Changed since the last [`DurableState::checkpoint`].
    dirty: bool,
}

impl DurableState {
    /// A durable resuming from `saved` (a new one: `Checkpoint { floor: start - 1, .. }`).
    pub fn new(settings: Settings, saved: Checkpoint, max_dead: usize) -> DurableState {
        let floor = saved.floor;
        let acked = saved.acked.into_iter().filter(|s| *s > floor).collect();
        let requeue_wanted = saved.requeued.into_iter().collect();
        DurableState {
            settings,
            max_dead: max_dead.max(1),
            floor,
            read_through: floor,
            acked,
            outstanding: BTreeMap::new(),
            ready: BTreeSet::new(),
            timers: BTreeSet::new(),
            delivered_through: saved.delivered_through,
            restored_through: saved.delivered_through,
            dead: saved.dead.into_iter().map(|d| (d.seq, d)).collect(),
            requeue_wanted,
            conns: BTreeMap::new(),
            next_conn: 0,
            redeliveries: 0,
            dead_dropped: 0,
            dirty: false,
        }
    }

    /// The fixed settings.
    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// The acked floor.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// The newest seq read from the journal: the next read starts after it.
    pub fn read_through(&self) -> u64 {
        self.read_through
    }

    /// Events read and not settled (ready, in flight or delayed).
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// How many dead letters are kept now.
    pub fn dead_count(&self) -> usize {
        self.dead.len()
    }

    /// Events after the floor not acknowledged yet: those read and unacked, plus every
    /// journal event after the read cursor up to `head` (whether those match is known only
    /// once read, so this is an upper bound while any are unread).
    pub fn pending(&self, head: u64) -> u64 {
        (self.outstanding.len() as u64).saturating_add(head.saturating_sub(self.read_through))
    }

    /// Dead letters kept now.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.dead.values().copied().collect()
    }

    /// Redeliveries since the process started (ack timeouts, naks, closed connections).
    pub fn redeliveries(&self) -> u64 {
        self.redeliveries
    }

    /// Dead letters dropped because the durable already held its maximum.
    pub fn dead_dropped(&self) -> u64 {
        self.dead_dropped
    }

    /// Connections attached now.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Replayed dead letters whose bytes the runtime must read from the journal
    /// ([`DurableState::requeue`]); taken once.
    pub fn take_requeue_wanted(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.requeue_wanted)
            .into_iter()
            .collect()
    }

    /// How many more events may be read from the journal now: what the attached connections
    /// may hold together, less what is outstanding already.
    pub fn room(&self) -> usize {
        let capacity = self
            .conns
            .values()
            .fold(0usize, |n, c| n.saturating_add(c.max_unacked));
        capacity.saturating_sub(self.outstanding.len())
    }

    /// Attaches `conn`, which may hold `max_unacked` events unacknowledged.
    pub fn attach(&mut self, conn: ConnId, max_unacked: usize) {
        self.conns.insert(
            conn,
            Conn {
                max_unacked: max_unacked.max(1),
                held: 0,
            },
        );
    }

    /// Detaches `conn`: what it held is ready for another connection at once (its next
    /// delivery counts one more).
    pub fn detach(&mut self, conn: ConnId) {
        if self.conns.remove(&conn).is_none() {
            return;
        }
        let held: Vec<u64> = self
            .outstanding
            .iter()
            .filter(|(_, e)| e.holder == Some(conn))
            .map(|(s, _)| *s)
            .collect();
        for seq in held {
            self.release(seq, None);
            self.redeliveries += 1;
        }
    }

    /// The journal event `seq` (matching the durable's filter) read after the cursor.
    /// Events at or below the cursor, and ones acked before a restart, are skipped.
    pub fn push(&mut self, seq: u64, bytes: Bytes) {
        if seq <= self.read_through {
            return;
        }
        self.read_through = seq;
        if self.acked.contains(&seq) {
            self.settle_floor();
            return;
        }
        let deliveries = u32::from(seq <= self.restored_through);
        self.outstanding.insert(
            seq,
            Entry {
                bytes,
                deliveries,
                holder: None,
                due_ms: None,
                requeued: false,
            },
        );
        self.ready.insert(seq);
    }

    /// The journal has nothing matching up to `seq` beyond what was pushed: the cursor (and
    /// with it the floor, when nothing is outstanding) moves on.
    pub fn passed(&mut self, seq: u64) {
        if seq > self.read_through {
            self.read_through = seq;
            self.settle_floor();
        }
    }

    /// A replayed dead letter's bytes, read from the journal: it is sent again from delivery 1.
    pub fn requeue(&mut self, seq: u64, bytes: Bytes) {
        if self.outstanding.contains_key(&seq) {
            return;
        }
        self.outstanding.insert(
            seq,
            Entry {
                bytes,
                deliveries: 0,
                holder: None,
                due_ms: None,
                requeued: true,
            },
        );
        self.ready.insert(seq);
        self.dirty = true;
    }

    /// Moves every dead letter to the replay list (the runtime reads their bytes next);
    /// returns how many.
    pub fn replay_dead(&mut self) -> usize {
        let n = self.dead.len();
        for seq in std::mem::take(&mut self.dead).into_keys() {
            self.requeue_wanted.insert(seq);
        }
        if n > 0 {
            self.dirty = true;
        }
        n
    }

    /// Forgets a replayed dead letter the journal no longer holds.
    pub fn requeue_lost(&mut self, seq: u64) {
        self.requeue_wanted.remove(&seq);
        self.dirty = true;
    }

    /// Acknowledges `seqs` (from any connection: an event may have gone to another one
    /// after its ack deadline, and the first may still finish it).
    pub fn ack(&mut self, seqs: &[u64]) -> AckOutcome {
        let mut out = AckOutcome::default();
        for &seq in seqs {
            if self.settle(seq) {
                out.acked += 1;
            } else {
                out.ignored += 1;
            }
        }
        if out.acked > 0 {
            self.settle_floor();
        }
        out
    }

    /// Acknowledges every event `conn` holds up to `upto` (never another connection's).
    pub fn ack_upto(&mut self, conn: ConnId, upto: u64) -> AckOutcome {
        let held: Vec<u64> = self
            .outstanding
            .range(..=upto)
            .filter(|(_, e)| e.holder == Some(conn))
            .map(|(s, _)| *s)
            .collect();
        let mut out = self.ack(&held);
        if held.is_empty() {
            out.ignored = 1;
        }
        out
    }

    /// Gives back `seq`, held by `conn`, to be sent again after `delay_ms`.
    pub fn nak(
        &mut self,
        conn: ConnId,
        seq: u64,
        delay_ms: u64,
        now_ms: i64,
    ) -> Result<(), NotHeld> {
        match self.outstanding.get(&seq) {
            Some(e) if e.holder == Some(conn) => {}
            _ => return Err(NotHeld(seq)),
        }
        let delay = i64::try_from(delay_ms).unwrap_or(i64::MAX);
        let at = (delay > 0).then(|| now_ms.saturating_add(delay));
        self.release(seq, at);
        self.redeliveries += 1;
        Ok(())
    }

    /// Applies every timer due at `now_ms`: held events past their ack deadline become ready
    /// again (a redelivery), delayed ones are ready.
    pub fn expire(&mut self, now_ms: i64) {
        while let Some(&(due, seq)) = self.timers.first() {
            if due > now_ms {
                break;
            }
            self.timers.pop_first();
            let Some(e) = self.outstanding.get(&seq) else {
                continue;
            };
            if e.due_ms != Some(due) {
                continue;
            }
            if e.holder.is_some() {
                self.redeliveries += 1;
            }
            self.release(seq, None);
        }
    }

    /// When the next timer is due (unix ms), if any.
    pub fn next_timer(&self) -> Option<i64> {
        self.timers.first().map(|(due, _)| *due)
    }

    /// Hands out ready events to connections with room, round-robin one at a time, lowest
    /// seq first; an event that has been delivered `max_deliver` times becomes a dead letter
    /// instead.
    pub fn dispatch(&mut self, now_ms: i64) -> Vec<Send> {
        let mut sends = Vec::new();
        while let Some(&seq) = self.ready.first() {
            let Some(conn) = self.pick_conn() else {
                break;
            };
            self.ready.pop_first();
            let Some(e) = self.outstanding.get_mut(&seq) else {
                continue;
            };
            if e.deliveries >= self.settings.max_deliver {
                let deliveries = e.deliveries;
                self.outstanding.remove(&seq);
                self.bury(seq, deliveries, now_ms);
                continue;
            }
            e.deliveries += 1;
            e.holder = Some(conn);
            let ack_wait = i64::try_from(self.settings.ack_wait_ms).unwrap_or(i64::MAX);
            let due = now_ms.saturating_add(ack_wait);
            e.due_ms = Some(due);
            self.timers.insert((due, seq));
            let send = Send {
                conn,
                seq,
                delivery: e.deliveries,
                bytes: e.bytes.clone(),
            };
            if let Some(c) = self.conns.get_mut(&conn) {
                c.held += 1;
            }
            if seq > self.delivered_through {
                self.delivered_through = seq;
                self.dirty = true;
            }
            sends.push(send);
        }
        sends
    }

    /// Moves the cursor: everything up to `floor` counts as settled, nothing is outstanding,
    /// and acks of what was sent before are ignored. Dead letters stay.
    pub fn seek(&mut self, floor: u64) {
        self.floor = floor;
        self.read_through = floor;
        self.acked.clear();
        self.outstanding.clear();
        self.ready.clear();
        self.timers.clear();
        self.restored_through = 0;
        self.delivered_through = self.delivered_through.min(floor);
        for c in self.conns.values_mut() {
            c.held = 0;
        }
        self.dirty = true;
    }

    /// The state to save if it changed since the last call.
    pub fn checkpoint(&mut self) -> Option<Checkpoint> {
        if !self.dirty {
            return None;
        }
        self.dirty = false;
        Some(self.snapshot())
    }

    /// Whether the state changed since the last [`DurableState::checkpoint`].
    pub fn dirty(&self) -> bool {
        self.dirty
    }

    /// Marks the state as changed (a save failed: it must be saved again).
    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// The state to save, whether or not it changed.
    pub fn snapshot(&self) -> Checkpoint {
        let mut requeued: Vec<u64> = self
            .outstanding
            .iter()
            .filter(|(_, e)| e.requeued)
            .map(|(s, _)| *s)
            .collect();
        requeued.extend(self.requeue_wanted.iter().copied());
        requeued.sort_unstable();
        Checkpoint {
            floor: self.floor,
            acked: self.acked.iter().copied().collect(),
            requeued,
            dead: self.dead.values().copied().collect(),
            delivered_through: self.delivered_through,
        }
    }

    /// The connection with room that is next in turn.
    fn pick_conn(&mut self) -> Option<ConnId> {
        let after = self
            .conns
            .range(self.next_conn..)
            .chain(self.conns.range(..self.next_conn))
            .find(|(_, c)| c.held < c.max_unacked)
            .map(|(id, _)| *id)?;
        self.next_conn = after.saturating_add(1);
        Some(after)
    }

    /// Takes `seq` from its holder (if any); ready now, or at `at_ms`.
    fn release(&mut self, seq: u64, at_ms: Option<i64>) {
        let Some(e) = self.outstanding.get_mut(&seq) else {
            return;
        };
        if let Some(due) = e.due_ms.take() {
            self.timers.remove(&(due, seq));
        }
        if let Some(holder) = e.holder.take() {
            if let Some(c) = self.conns.get_mut(&holder) {
                c.held = c.held.saturating_sub(1);
            }
        }
        match at_ms {
            Some(at) => {
                e.due_ms = Some(at);
                self.timers.insert((at, seq));
                self.ready.remove(&seq);
            }
            None => {
                self.ready.insert(seq);
            }
        }
    }

    /// Removes outstanding `seq` as acknowledged; false when it was not outstanding.
    fn settle(&mut self, seq: u64) -> bool {
        if !self.outstanding.contains_key(&seq) {
            return false;
        }
        self.release(seq, None);
        self.ready.remove(&seq);
        let requeued = self
            .outstanding
            .remove(&seq)
            .map(|e| e.requeued)
            .unwrap_or(false);
        if !requeued && seq > self.floor {
            self.acked.insert(seq);
        }
        self.dirty = true;
        true
    }

    fn bury(&mut self, seq: u64, deliveries: u32, now_ms: i64) {
        if let Some(e) = self.outstanding.get(&seq) {
            if let Some(due) = e.due_ms {
                self.timers.remove(&(due, seq));
            }
        }
        self.dead.insert(
            seq,
            DeadLetter {
                seq,
                deliveries,
                at_ms: now_ms,
            },
        );
        while self.dead.len() > self.max_dead {
            self.dead.pop_first();
            self.dead_dropped += 1;
        }
        // A dead letter is settled as far as the floor is concerned.
        if seq > self.floor {
            self.acked.insert(seq);
        }
        self.dirty = true;
        self.settle_floor();
    }

    /// Raises the floor to just below the oldest outstanding event that counts for it (or
    /// to the read cursor when there is none) and forgets the acks it passed.
    fn settle_floor(&mut self) {
        let lowest = self
            .outstanding
            .iter()
            .find(|(_, e)| !e.requeued)
            .map(|(s, _)| *s);
        let floor = match lowest {
            Some(s) => s.saturating_sub(1),
            None => self.read_through,
        };
        if floor > self.floor {
            self.floor = floor;
            self.dirty = true;
        }
        while let Some(&s) = self.acked.first() {
            if s > self.floor {
                break;
            }
            self.acked.pop_first();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            ack_wait_ms: 1_000,
            max_deliver: 3,
        }
    }

    fn fresh() -> DurableState {
        DurableState::new(settings(), Checkpoint::default(), 100)
    }

    fn b(seq: u64) -> Bytes {
        Bytes::from(format!("{{\"seq\":{seq}}}"))
    }

    fn seqs(sends: &[Send]) -> Vec<(ConnId, u64, u32)> {
        sends.iter().map(|s| (s.conn, s.seq, s.delivery)).collect()
    }

    #[test]
    fn reads_only_what_the_connections_may_hold() {
        let mut d = fresh();
        assert_eq!(d.room(), 0, "no connection, nothing is read");
        d.attach(1, 2);
        assert_eq!(d.room(), 2);
        d.push(1, b(1));
        d.push(2, b(2));
        assert_eq!(d.room(), 0);
        let sent = d.dispatch(0);
        assert_eq!(seqs(&sent), vec![(1, 1, 1), (1, 2, 1)]);
        assert_eq!(d.dispatch(0), vec![], "the connection is full");
        assert_eq!(
            d.ack(&[1]),
            AckOutcome {
                acked: 1,
                ignored: 0
            }
        );
        assert_eq!(d.floor(), 1);
        assert_eq!(d.room(), 1);
    }

    #[test]
    fn the_floor_waits_for_the_oldest_unacked_and_acks_above_it_are_kept() {
        let mut d = fresh();
        d.attach(1, 10);
        for s in [3, 5, 8] {
            d.push(s, b(s));
        }
        d.dispatch(0);
        d.ack(&[5, 8]);
        assert_eq!(d.floor(), 2, "3 is still owed");
        let cp = d.checkpoint().unwrap();
        assert_eq!(cp.acked, vec![5, 8]);
        assert_eq!(cp.delivered_through, 8);
        assert_eq!(cp.keep_from(), 3);
        d.ack(&[3]);
        assert_eq!(d.floor(), 8);
        assert_eq!(d.checkpoint().unwrap().acked, Vec::<u64>::new());
        d.passed(20);
        assert_eq!(d.floor(), 20, "nothing matching up to the journal's head");
    }

    #[test]
    fn unknown_and_repeated_acks_are_ignored_and_counted() {
        let mut d = fresh();
        d.attach(1, 10);
        d.push(1, b(1));
        d.dispatch(0);
        assert_eq!(
            d.ack(&[1, 1, 99]),
            AckOutcome {
                acked: 1,
                ignored: 2
            }
        );
        assert_eq!(
            d.ack_upto(1, 50),
            AckOutcome {
                acked: 0,
                ignored: 1
            }
        );
    }

    #[test]
    fn ack_upto_acks_only_the_connections_own_events() {
        let mut d = fresh();
        d.attach(1, 10);
        d.attach(2, 10);
        for s in 1..=4 {
            d.push(s, b(s));
        }
        let sent = d.dispatch(0);
        assert_eq!(
            seqs(&sent),
            vec![(1, 1, 1), (2, 2, 1), (1, 3, 1), (2, 4, 1)],
            "round-robin over the connections"
        );
        assert_eq!(d.ack_upto(1, 4).acked, 2);
        assert_eq!(d.floor(), 1);
        assert_eq!(d.outstanding(), 2);
    }

    #[test]
    fn a_closed_connections_events_go_to_another_at_once_with_the_next_delivery() {
        let mut d = fresh();
        d.attach(1, 10);
        d.push(1, b(1));
        d.push(2, b(2));
        d.dispatch(0);
        d.ack(&[1]);
        d.attach(2, 10);
        d.detach(1);
        assert_eq!(seqs(&d.dispatch(5)), vec![(2, 2, 2)]);
        assert_eq!(d.redeliveries(), 1);
    }

    #[test]
    fn an_event_not_acked_in_time_is_sent_again_then_dead_lettered() {
        let mut d = fresh();
        d.attach(1, 10);
        d.push(7, b(7));
        assert_eq!(seqs(&d.dispatch(0)), vec![(1, 7, 1)]);
        assert_eq!(d.next_timer(), Some(1_000));
        d.expire(999);
        assert_eq!(d.dispatch(999), vec![]);
        d.expire(1_000);
        assert_eq!(seqs(&d.dispatch(1_000)), vec![(1, 7, 2)]);
        d.expire(2_000);
        assert_eq!(seqs(&d.dispatch(2_000)), vec![(1, 7, 3)]);
        d.expire(3_000);
        assert_eq!(d.dispatch(3_000), vec![], "max_deliver 3 reached");
        assert_eq!(
            d.dead_letters(),
            vec![DeadLetter {
                seq: 7,
                deliveries: 3,
                at_ms: 3_000
            }]
        );
        assert_eq!(d.floor(), 7, "a dead letter is settled for the floor");
        assert_eq!(d.checkpoint().unwrap().keep_from(), 7, "but kept");
        assert_eq!(d.next_timer(), None);
    }

    #[test]
    fn a_nak_delays_the_redelivery_and_only_the_holder_may_nak() {
        let mut d = fresh();
        d.attach(1, 10);
        d.attach(2, 10);
        d.push(1, b(1));
        d.dispatch(0);
        assert_eq!(d.nak(2, 1, 0, 0), Err(NotHeld(1)));
        d.nak(1, 1, 500, 100).unwrap();
        assert_eq!(d.dispatch(200), vec![]);
        d.expire(600);
        assert_eq!(seqs(&d.dispatch(600)), vec![(2, 1, 2)]);
        d.nak(2, 1, 0, 700).unwrap();
        assert_eq!(
            seqs(&d.dispatch(700)),
            vec![(1, 1, 3)],
            "no delay: ready at once"
        );
    }

    #[test]
    fn a_restart_resumes_after_the_floor_skips_acked_and_counts_the_earlier_delivery() {
        let mut d = fresh();
        d.attach(1, 10);
        for s in 1..=4 {
            d.push(s, b(s));
        }
        d.dispatch(0);
        d.ack(&[1, 3]);
        let saved = d.checkpoint().unwrap();
        let mut again = DurableState::new(settings(), saved, 100);
        assert_eq!(again.read_through(), 1);
        again.attach(9, 10);
        for s in 2..=5 {
            again.push(s, b(s));
        }
        assert_eq!(
            seqs(&again.dispatch(0)),
            vec![(9, 2, 2), (9, 4, 2), (9, 5, 1)]
        );
    }

    #[test]
    fn replayed_dead_letters_are_sent_again_without_pulling_the_floor_back() {
        let mut d = DurableState::new(
            Settings {
                ack_wait_ms: 10,
                max_deliver: 1,
            },
            Checkpoint::default(),
            100,
        );
        d.attach(1, 10);
        d.push(1, b(1));
        d.push(2, b(2));
        d.dispatch(0);
        d.ack(&[2]);
        d.expire(10);
        d.dispatch(10);
        assert_eq!(d.dead_letters().len(), 1);
        assert_eq!(d.floor(), 2);
        assert_eq!(d.replay_dead(), 1);
        assert_eq!(d.take_requeue_wanted(), vec![1]);
        d.requeue(1, b(1));
        assert_eq!(d.checkpoint().unwrap().requeued, vec![1]);
        assert_eq!(seqs(&d.dispatch(20)), vec![(1, 1, 1)]);
        assert_eq!(d.floor(), 2);
        d.ack(&[1]);
        assert_eq!(d.floor(), 2);
        let cp = d.checkpoint().unwrap();
        assert_eq!(cp.requeued, Vec::<u64>::new());
        assert_eq!(cp.keep_from(), 3);
    }

    #[test]
    fn seek_forgets_what_was_in_flight() {
        let mut d = fresh();
        d.attach(1, 2);
        d.push(1, b(1));
        d.push(2, b(2));
        d.dispatch(0);
        d.seek(10);
        assert_eq!(d.floor(), 10);
        assert_eq!(d.room(), 2);
        assert_eq!(d.ack(&[1]).ignored, 1);
        d.push(5, b(5));
        assert_eq!(d.outstanding(), 0, "below the new cursor");
        d.push(11, b(11));
        assert_eq!(seqs(&d.dispatch(0)), vec![(1, 11, 1)]);
    }

    #[test]
    fn dead_letters_are_capped_oldest_first() {
        let mut d = DurableState::new(
            Settings {
                ack_wait_ms: 1,
                max_deliver: 1,
            },
            Checkpoint::default(),
            2,
        );
        d.attach(1, 10);
        for s in 1..=3 {
            d.push(s, b(s));
        }
        d.dispatch(0);
        d.expire(1);
        d.dispatch(1);
        let dead: Vec<u64> = d.dead_letters().iter().map(|x| x.seq).collect();
        assert_eq!(dead, vec![2, 3]);
        assert_eq!(d.dead_dropped(), 1);
    }
}
