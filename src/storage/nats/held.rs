//! The deliveries one instance holds of one endpoint: messages fetched from the endpoint's
//! consumers and not yet answered (acknowledged, nak'd or terminated). A pure table (no I/O,
//! no clock of its own: the time is given), generic over the message's acknowledgement handle
//! so that its rules are tested on their own:
//! - never hand out what is in flight (the rule of [`crate::storage::DeliveryQueue`]): a
//!   delivery handed to the dispatcher is not handed out again until the dispatcher releases
//!   it (it did not start it: its handle was dropped) or it is answered (it leaves the table);
//! - at most `max_held` are handed out and unanswered at once;
//! - one event is held once: a redelivery of the same message renews the entry's handle (the
//!   attempt keeps running, the answer goes to the newer delivery), while a second message
//!   for an event already held (a replay of an event the journal consumer holds, or the
//!   other way round) is `Busy`: the caller defers it, so it goes out after the held one;
//! - released deliveries go out again oldest seq first; an ordered endpoint's retry held
//!   here goes out no sooner than its time.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::storage::DueDelivery;

/// A delivery this instance holds (fetched, not yet answered).
#[derive(Debug)]
pub(super) struct Held<A> {
    /// How the message is answered.
    pub(super) acker: A,
    /// Where the message came from: `None` for the endpoint's journal consumer, the replay
    /// stream's sequence for an admin replay. One event can be held from both at once (a
    /// replay of an event whose retry the journal consumer then redelivers); only a
    /// redelivery of the same message may take over the entry's acker, or the other message
    /// would never be answered (and be sent again after its ack wait).
    pub(super) replay_seq: Option<u64>,
    /// The event id.
    pub(super) id: String,
    /// The envelope as sent.
    pub(super) bytes: Bytes,
    /// Handed to the dispatcher and not released: an attempt runs (or is about to).
    taken: bool,
    /// Attempts made before the next one.
    attempts: u32,
    /// Ordered endpoints: a retry this instance holds until then (see [`HeldTable::retry_at`]).
    not_before: Option<Instant>,
    /// When the server was last told the delivery is still being worked on.
    progressed: Instant,
}

/// What became of a message that arrived for an event.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Arrival<A> {
    /// A redelivery of the message held: the entry now answers with the newer handle and
    /// nothing new is handed out.
    Renewed,
    /// Another message of this event is held: the caller defers this one.
    Busy(A),
    /// The event is not held: the caller may hold it ([`HeldTable::hold`]).
    Free(A),
}

/// The deliveries held of one endpoint, by event seq.
#[derive(Debug)]
pub(super) struct HeldTable<A> {
    held: HashMap<u64, Held<A>>,
}

impl<A> Default for HeldTable<A> {
    fn default() -> Self {
        HeldTable {
            held: HashMap::new(),
        }
    }
}

impl<A> HeldTable<A> {
    /// Whether nothing is held.
    pub(super) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Hands out held deliveries the dispatcher released (or retries now due), oldest seq
    /// first: at most `limit`, and no more than keeps what is handed out and unanswered at
    /// `max_held`. Returns them and the room left for new messages.
    pub(super) fn take_released(
        &mut self,
        limit: usize,
        max_held: usize,
        now: Instant,
    ) -> (Vec<DueDelivery>, usize) {
        let taken = self.held.values().filter(|f| f.taken).count();
        let room = limit.min(max_held.saturating_sub(taken));
        let mut released: Vec<(&u64, &mut Held<A>)> = self
            .held
            .iter_mut()
            .filter(|(_, f)| !f.taken && !matches!(f.not_before, Some(t) if t > now))
            .collect();
        released.sort_by_key(|(seq, _)| **seq);
        let mut out = Vec::new();
        for (seq, f) in released.into_iter().take(room) {
            f.taken = true;
            f.not_before = None;
            out.push(DueDelivery {
                seq: *seq,
                id: f.id.clone(),
                bytes: f.bytes.clone(),
                attempts: f.attempts,
            });
        }
        let left = room.saturating_sub(out.len());
        (out, left)
    }

    /// A message from the endpoint's journal consumer for event `seq`.
    pub(super) fn arrived_from_journal(&mut self, seq: u64, acker: A) -> Arrival<A> {
        match self.held.get_mut(&seq) {
            // Redelivered while this instance still holds it (its ack wait ran out): keep the
            // attempt running, answer on the newer delivery.
            Some(f) if f.replay_seq.is_none() => {
                f.acker = acker;
                Arrival::Renewed
            }
            // A replay of this event is being delivered now: this delivery goes after it
            // (the replay's acker stays).
            Some(_) => Arrival::Busy(acker),
            None => Arrival::Free(acker),
        }
    }

    /// A message from the endpoint's replay consumer (replay stream sequence `replay_seq`,
    /// when known) for event `seq`.
    pub(super) fn arrived_from_replay(
        &mut self,
        seq: u64,
        replay_seq: Option<u64>,
        acker: A,
    ) -> Arrival<A> {
        match self.held.get_mut(&seq) {
            // This replay, redelivered while this instance still holds it: keep the attempt
            // running, answer on the newer delivery.
            Some(f) if replay_seq.is_some() && f.replay_seq == replay_seq => {
                f.acker = acker;
                Arrival::Renewed
            }
            // The same event is being delivered now: send the replay after it.
            Some(_) => Arrival::Busy(acker),
            None => Arrival::Free(acker),
        }
    }

    /// Holds a fetched message as handed to the dispatcher; returns its delivery.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn hold(
        &mut self,
        seq: u64,
        acker: A,
        replay_seq: Option<u64>,
        id: String,
        bytes: Bytes,
        attempts: u32,
        now: Instant,
    ) -> DueDelivery {
        self.held.insert(
            seq,
            Held {
                acker,
                replay_seq,
                id: id.clone(),
                bytes: bytes.clone(),
                taken: true,
                attempts,
                not_before: None,
                progressed: now,
            },
        );
        DueDelivery {
            seq,
            id,
            bytes,
            attempts,
        }
    }

    /// Marks deliveries the dispatcher did not start as available again.
    pub(super) fn release(&mut self, seqs: &[u64]) {
        for seq in seqs {
            if let Some(f) = self.held.get_mut(seq) {
                f.taken = false;
            }
        }
    }

    /// Takes `seq`'s entry out, to answer its message (or to tell the server it is still
    /// being worked on, then [`HeldTable::progressed`] puts it back).
    pub(super) fn remove(&mut self, seq: u64) -> Option<Held<A>> {
        self.held.remove(&seq)
    }

    /// Puts a failed delivery back (an ordered endpoint's retry, held here instead of nak'd):
    /// one more attempt made, handed out again from `not_before` on.
    pub(super) fn retry_at(&mut self, seq: u64, mut held: Held<A>, not_before: Instant) {
        held.taken = false;
        held.attempts = held.attempts.saturating_add(1);
        held.not_before = Some(not_before);
        self.held.insert(seq, held);
    }

    /// The held retries whose server-side ack wait was last extended `every` or longer ago.
    pub(super) fn needing_progress(&self, now: Instant, every: Duration) -> Vec<u64> {
        self.held
            .iter()
            .filter(|(_, f)| {
                f.not_before.is_some() && now.saturating_duration_since(f.progressed) >= every
            })
            .map(|(seq, _)| *seq)
            .collect()
    }

    /// Puts an entry back after its ack wait was extended at `now`.
    pub(super) fn progressed(&mut self, seq: u64, mut held: Held<A>, now: Instant) {
        held.progressed = now;
        self.held.insert(seq, held);
    }

    /// Every held delivery: its seq and its entry, in no particular order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u64, &Held<A>)> {
        self.held.iter().map(|(seq, f)| (*seq, f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for a message's acknowledgement handle: which delivery of which message.
    type Handle = &'static str;

    fn seqs(due: &[DueDelivery]) -> Vec<u64> {
        due.iter().map(|d| d.seq).collect()
    }

    fn hold(table: &mut HeldTable<Handle>, seq: u64, acker: Handle, replay_seq: Option<u64>) {
        hold_at(table, seq, acker, replay_seq, Instant::now());
    }

    fn hold_at(
        table: &mut HeldTable<Handle>,
        seq: u64,
        acker: Handle,
        replay_seq: Option<u64>,
        at: Instant,
    ) {
        let due = table.hold(
            seq,
            acker,
            replay_seq,
            format!("id{seq}"),
            Bytes::from(format!("body{seq}")),
            0,
            at,
        );
        assert_eq!(
            (due.seq, due.id.as_str()),
            (seq, format!("id{seq}").as_str())
        );
    }

    #[test]
    fn what_is_in_flight_is_never_handed_out_again_until_released() {
        let now = Instant::now();
        let mut table = HeldTable::default();
        for seq in [3, 1, 2] {
            hold(&mut table, seq, "m", None);
        }
        // All three run: nothing to hand out; the room is the limit.
        let (due, room) = table.take_released(10, 16, now);
        assert!(due.is_empty());
        assert_eq!(room, 10);
        // The dispatcher did not start 3 and 1: they go out again, oldest first, once.
        table.release(&[3, 1]);
        let (due, room) = table.take_released(10, 16, now);
        assert_eq!(seqs(&due), [1, 3]);
        assert_eq!(due[0].bytes, Bytes::from("body1"));
        assert_eq!(room, 10 - 2);
        let (due, _) = table.take_released(10, 16, now);
        assert!(due.is_empty(), "handed out already: {:?}", seqs(&due));
        // Releasing what is not held changes nothing.
        table.release(&[99]);
        assert!(table.take_released(10, 16, now).0.is_empty());
    }

    #[test]
    fn released_deliveries_go_out_within_the_room_oldest_first() {
        let now = Instant::now();
        let mut table = HeldTable::default();
        for seq in 1..=5 {
            hold(&mut table, seq, "m", None);
        }
        table.release(&[5, 4, 2, 1]);
        // One running (3) of at most four held: three go out, whatever the limit.
        let (due, room) = table.take_released(5, 4, now);
        assert_eq!(seqs(&due), [1, 2, 4]);
        assert_eq!(room, 0);
        // Four held now: no room for 5 however much is asked.
        assert!(table.take_released(8, 4, now).0.is_empty());
        // Within a larger bound, the limit decides.
        let (due, room) = table.take_released(3, 8, now);
        assert_eq!(seqs(&due), [5]);
        assert_eq!(room, 2);
    }

    #[test]
    fn an_answered_delivery_leaves_the_table_and_may_come_back() {
        let now = Instant::now();
        let mut table = HeldTable::default();
        hold(&mut table, 7, "first", None);
        // Acknowledged (or nak'd): answered with the handle it was held with.
        let held = table.remove(7).expect("held");
        assert_eq!((held.acker, held.id.as_str()), ("first", "id7"));
        assert!(table.is_empty());
        assert!(table.remove(7).is_none(), "answered once");
        assert!(table.take_released(10, 16, now).0.is_empty());
        // The server redelivers it later (a nak's delay ran out): a new delivery.
        assert_eq!(
            table.arrived_from_journal(7, "again"),
            Arrival::Free("again")
        );
    }

    #[test]
    fn a_redelivery_of_the_held_message_renews_its_handle_and_is_not_handed_out() {
        let now = Instant::now();
        let mut table = HeldTable::default();
        hold(&mut table, 4, "journal-1", None);
        assert_eq!(table.arrived_from_journal(4, "journal-2"), Arrival::Renewed);
        assert!(
            table.take_released(10, 16, now).0.is_empty(),
            "still running"
        );
        assert_eq!(table.remove(4).map(|h| h.acker), Some("journal-2"));

        hold(&mut table, 5, "replay-1", Some(40));
        assert_eq!(
            table.arrived_from_replay(5, Some(40), "replay-2"),
            Arrival::Renewed
        );
        assert_eq!(table.remove(5).map(|h| h.acker), Some("replay-2"));
    }

    #[test]
    fn a_second_message_of_a_held_event_waits_behind_it() {
        let mut table = HeldTable::default();
        // The journal consumer holds 4: a replay of 4 is deferred, the journal's handle stays.
        hold(&mut table, 4, "journal", None);
        assert_eq!(
            table.arrived_from_replay(4, Some(40), "replay"),
            Arrival::Busy("replay")
        );
        // A replay whose stream sequence is unknown never renews another message's entry.
        assert_eq!(
            table.arrived_from_replay(4, None, "replay?"),
            Arrival::Busy("replay?")
        );
        assert_eq!(table.remove(4).map(|h| h.acker), Some("journal"));
        // A replay holds 5: the journal's redelivery of 5, and another replay of it, wait.
        hold(&mut table, 5, "replay-40", Some(40));
        assert_eq!(
            table.arrived_from_journal(5, "journal"),
            Arrival::Busy("journal")
        );
        assert_eq!(
            table.arrived_from_replay(5, Some(41), "replay-41"),
            Arrival::Busy("replay-41")
        );
        let held = table.remove(5).expect("held");
        assert_eq!((held.acker, held.replay_seq), ("replay-40", Some(40)));
        // Events not held are free, from either consumer.
        assert_eq!(table.arrived_from_journal(6, "j"), Arrival::Free("j"));
        assert_eq!(
            table.arrived_from_replay(6, Some(42), "r"),
            Arrival::Free("r")
        );
    }

    #[test]
    fn a_retry_held_here_goes_out_at_its_time_with_its_attempt_counted() {
        let now = Instant::now();
        let mut table = HeldTable::default();
        hold(&mut table, 2, "m", None);
        let held = table.remove(2).expect("held");
        table.retry_at(2, held, now + Duration::from_secs(5));
        assert!(!table.is_empty(), "an ordered endpoint's retry stays held");
        assert!(table.take_released(10, 16, now).0.is_empty(), "not yet due");
        assert!(table
            .take_released(10, 16, now + Duration::from_secs(4))
            .0
            .is_empty());
        let (due, _) = table.take_released(10, 16, now + Duration::from_secs(5));
        assert_eq!(seqs(&due), [2]);
        assert_eq!(due[0].attempts, 1);
        // Handed out: running again, and no longer waiting for a time.
        assert!(table.take_released(10, 16, now).0.is_empty());
        table.release(&[2]);
        assert_eq!(seqs(&table.take_released(10, 16, now).0), [2]);
    }

    #[test]
    fn only_held_retries_need_their_ack_wait_extended() {
        let start = Instant::now();
        let every = Duration::from_secs(10);
        let mut table = HeldTable::default();
        hold_at(&mut table, 1, "running", None, start);
        hold_at(&mut table, 2, "retry", None, start);
        let held = table.remove(2).expect("held");
        table.retry_at(2, held, start + Duration::from_secs(60));
        assert!(table.needing_progress(start, every).is_empty(), "too soon");
        let later = start + every;
        assert_eq!(table.needing_progress(later, every), [2]);
        // Extended at `later`: not again until `every` after that.
        let held = table.remove(2).expect("held");
        table.progressed(2, held, later);
        assert!(table
            .needing_progress(later + Duration::from_secs(9), every)
            .is_empty());
        assert_eq!(table.needing_progress(later + every, every), [2]);
    }

    #[test]
    fn the_listing_shows_every_held_delivery() {
        let mut table = HeldTable::default();
        hold(&mut table, 9, "a", None);
        hold(&mut table, 8, "b", Some(1));
        let mut listed: Vec<(u64, String)> = table.iter().map(|(s, h)| (s, h.id.clone())).collect();
        listed.sort();
        assert_eq!(listed, [(8, "id8".to_string()), (9, "id9".to_string())]);
    }
}
