//! One endpoint's delivery cursor over the journal, as the embedded store keeps it in memory
//! ([`Lane`]): pure bookkeeping, no I/O, so every rule is unit-tested here.
//!
//! An event routed to an endpoint is journalled with the endpoint in its `targets`, and no
//! delivery row is written for it. The endpoint's queue reads such events in seq order from
//! its cursor on and hands them out; a row in `deliveries` is written only when an attempt
//! fails (a retry or a dead letter), so the common path (delivered at the first attempt)
//! writes nothing per delivery but, now and then, the cursor.
//!
//! The rule the saved cursor keeps: **every event at or below it that is routed to the
//! endpoint was delivered or has a row**. So the cursor may move only up to just below the
//! oldest event handed out and not yet finished ([`Lane::watermark`]). After a crash the
//! queue starts from the saved cursor: what was delivered above it is sent again
//! (at-least-once; receivers deduplicate by `webhook-id`), nothing is skipped.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

/// Least time between two saves of one endpoint's cursor: at thousands of deliveries a
/// second a save per delivery would be a write transaction each on the journal's one writer.
/// A crash re-sends at most what was delivered within it (at-least-once).
pub(super) const SAVE_INTERVAL: Duration = Duration::from_millis(50);

/// What to do about the saved cursor after an advance ([`Lane::begin_save`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SaveStep {
    /// Save it at this seq now (then report with [`Lane::saved`]).
    Now(u64),
    /// Save it at this time (the last save was too recent); nothing else is scheduled.
    At(Instant),
    /// Nothing: it has not moved, or a save is under way or scheduled.
    Nothing,
}

/// An event the lane handed out (or has to hand out again) and that is not finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Open {
    /// With its taker (an attempt runs, or its outcome is being recorded).
    Held,
    /// Handed back unattempted: offered again before anything newer.
    Released,
}

/// One endpoint's cursor state (see the module doc). Shared, behind a lock, by every queue
/// the store gives out for the endpoint, so a reload's new queue continues where the old one
/// stands.
#[derive(Debug)]
pub(super) struct Lane {
    /// The cursor as last committed.
    saved: u64,
    /// Every seq up to this one has been examined by the queue (handed out when routed to
    /// the endpoint).
    scanned: u64,
    /// Handed out and not finished, by seq.
    open: BTreeMap<u64, Open>,
    /// A save of the cursor is under way (one at a time: a later one picks up every advance).
    saving: bool,
    /// When the last save started.
    last_save: Option<Instant>,
    /// A save is scheduled for later ([`SaveStep::At`]).
    deferred: bool,
}

impl Lane {
    /// A lane whose cursor was saved at `saved`.
    pub(super) fn new(saved: u64) -> Lane {
        Lane {
            saved,
            scanned: saved,
            open: BTreeMap::new(),
            saving: false,
            last_save: None,
            deferred: false,
        }
    }

    /// Where the next scan starts: every seq up to this one was examined.
    pub(super) fn scanned(&self) -> u64 {
        self.scanned
    }

    /// The scan examined every seq up to `through` and hands out `seqs` (ascending, above
    /// the previous `scanned`): they are held from now on.
    pub(super) fn scanned_through(&mut self, through: u64, seqs: &[u64]) {
        for &seq in seqs {
            if seq > self.scanned {
                self.open.insert(seq, Open::Held);
            }
        }
        self.scanned = self.scanned.max(through);
    }

    /// Up to `n` released seqs, oldest first, held again.
    pub(super) fn take_released(&mut self, n: usize) -> Vec<u64> {
        let mut out = Vec::new();
        for (seq, state) in self.open.iter_mut() {
            if out.len() >= n {
                break;
            }
            if *state == Open::Released {
                *state = Open::Held;
                out.push(*seq);
            }
        }
        out
    }

    /// Whether `seq` is one of this lane's open events (handed out by the scan, no row).
    pub(super) fn is_open(&self, seq: u64) -> bool {
        self.open.contains_key(&seq)
    }

    /// `seq` was handed back unattempted (or its outcome could not be recorded): offered
    /// again. A seq the lane does not know is left alone.
    pub(super) fn release(&mut self, seq: u64) {
        if let Some(state) = self.open.get_mut(&seq) {
            *state = Open::Released;
        }
    }

    /// `seq` is finished: delivered, or its outcome is committed as a row.
    pub(super) fn finish(&mut self, seq: u64) {
        self.open.remove(&seq);
    }

    /// How far the cursor may move: just below the oldest open event, else everything
    /// scanned.
    pub(super) fn watermark(&self) -> u64 {
        match self.open.keys().next() {
            Some(&oldest) => oldest.saturating_sub(1).min(self.scanned),
            None => self.scanned,
        }
    }

    /// Whether and when to save the cursor at `now`: at most one save under way, at most
    /// one every [`SAVE_INTERVAL`], and one scheduled when an advance comes too soon (so the
    /// last advance is saved even when no delivery follows).
    pub(super) fn begin_save(&mut self, now: Instant) -> SaveStep {
        let mark = self.watermark();
        if self.saving || mark <= self.saved {
            return SaveStep::Nothing;
        }
        if let Some(due) = self.last_save.map(|last| last + SAVE_INTERVAL) {
            if now < due {
                if self.deferred {
                    return SaveStep::Nothing;
                }
                self.deferred = true;
                return SaveStep::At(due);
            }
        }
        self.saving = true;
        self.deferred = false;
        self.last_save = Some(now);
        SaveStep::Now(mark)
    }

    /// The scheduled save's time came: it runs through [`Lane::begin_save`] like any other.
    pub(super) fn deferred_due(&mut self) {
        self.deferred = false;
    }

    /// The save [`Lane::begin_save`] asked for ended: committed at `seq`, or failed (`None`).
    pub(super) fn saved(&mut self, seq: Option<u64>) {
        self.saving = false;
        if let Some(seq) = seq {
            self.saved = self.saved.max(seq);
        }
    }

    /// How many events are open (handed out or released, not finished).
    #[cfg(test)]
    fn open_count(&self) -> usize {
        self.open.len()
    }

    /// The cursor as last committed.
    #[cfg(test)]
    fn saved_at(&self) -> u64 {
        self.saved
    }
}

/// An event's `targets` column: `,a,b,` for the endpoints it is routed to (`None`: none).
/// Endpoint names are letters, digits, `-`, `_` and `.`, so a comma never occurs in one.
pub(super) fn targets_column(targets: &[std::sync::Arc<str>]) -> Option<String> {
    if targets.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(targets.iter().map(|t| t.len() + 1).sum::<usize>() + 1);
    out.push(',');
    for t in targets {
        out.push_str(t);
        out.push(',');
    }
    Some(out)
}

/// What a `targets` column holds when the event is routed to `endpoint` (`instr` finds it).
pub(super) fn target_pattern(endpoint: &str) -> String {
    format!(",{endpoint},")
}

#[cfg(test)]
mod tests {
    use super::Lane;

    #[test]
    fn targets_are_matched_whole() {
        let column = super::targets_column(&["crm".into(), "crm-eu".into()]).unwrap();
        assert_eq!(column, ",crm,crm-eu,");
        assert!(column.contains(&super::target_pattern("crm")));
        assert!(column.contains(&super::target_pattern("crm-eu")));
        assert!(!column.contains(&super::target_pattern("eu")));
        assert!(!column.contains(&super::target_pattern("cr")));
        assert_eq!(super::targets_column(&[]), None);
    }

    #[test]
    fn the_cursor_stops_below_the_oldest_unfinished_event() {
        let mut lane = Lane::new(10);
        assert_eq!(lane.scanned(), 10);
        lane.scanned_through(20, &[12, 15, 18]);
        assert_eq!(lane.scanned(), 20);
        assert_eq!(lane.watermark(), 11, "12 is not finished");
        lane.finish(15);
        assert_eq!(
            lane.watermark(),
            11,
            "finishing a later one does not move it"
        );
        lane.finish(12);
        assert_eq!(lane.watermark(), 17);
        lane.finish(18);
        assert_eq!(lane.watermark(), 20, "all finished: everything scanned");
    }

    #[tokio::test(start_paused = true)]
    async fn one_save_at_a_time_at_most_one_per_interval_and_never_backwards() {
        use super::{SaveStep, SAVE_INTERVAL};
        use tokio::time::Instant;
        let now = Instant::now;
        let mut lane = Lane::new(0);
        assert_eq!(lane.begin_save(now()), SaveStep::Nothing, "nothing moved");
        lane.scanned_through(5, &[3]);
        assert_eq!(lane.begin_save(now()), SaveStep::Now(2));
        lane.finish(3);
        assert_eq!(
            lane.begin_save(now()),
            SaveStep::Nothing,
            "a save is under way"
        );
        lane.saved(Some(2));
        assert_eq!(lane.saved_at(), 2);
        // Too soon after the last: one save is scheduled, and only one.
        let due = now() + SAVE_INTERVAL;
        assert_eq!(lane.begin_save(now()), SaveStep::At(due));
        assert_eq!(
            lane.begin_save(now()),
            SaveStep::Nothing,
            "already scheduled"
        );
        tokio::time::advance(SAVE_INTERVAL).await;
        lane.deferred_due();
        assert_eq!(
            lane.begin_save(now()),
            SaveStep::Now(5),
            "the advance made meanwhile"
        );
        lane.saved(None);
        assert_eq!(lane.saved_at(), 2, "a failed save changes nothing");
        tokio::time::advance(SAVE_INTERVAL).await;
        assert_eq!(
            lane.begin_save(now()),
            SaveStep::Now(5),
            "and is tried again"
        );
        lane.saved(Some(5));
        lane.saved(Some(4));
        assert_eq!(lane.saved_at(), 5, "never moves back");
    }

    #[test]
    fn a_released_event_is_offered_again_oldest_first_and_holds_the_cursor() {
        let mut lane = Lane::new(0);
        lane.scanned_through(10, &[2, 4, 6]);
        lane.release(6);
        lane.release(2);
        lane.release(99); // unknown: ignored
        assert_eq!(lane.open_count(), 3);
        assert_eq!(lane.watermark(), 1);
        assert_eq!(lane.take_released(1), [2]);
        assert_eq!(lane.take_released(5), [6], "2 is held again");
        assert!(lane.take_released(5).is_empty());
        assert!(lane.is_open(4) && !lane.is_open(5));
    }

    #[test]
    fn a_scan_never_reopens_what_it_examined_before() {
        let mut lane = Lane::new(0);
        lane.scanned_through(10, &[5]);
        lane.finish(5);
        // A stale scan reporting seqs at or below `scanned` (cannot happen with one scan at a
        // time, but must not resurrect a finished event).
        lane.scanned_through(8, &[5]);
        assert!(!lane.is_open(5));
        assert_eq!(lane.scanned(), 10, "scanned never moves back");
    }
}
