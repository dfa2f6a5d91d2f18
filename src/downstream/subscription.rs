//! One subscription's event feed: replay from the journal, then live, with no gap and no
//! duplicate, whatever arrives meanwhile.
//!
//! A [`Feed`] takes its live receiver on the shared ring *before* it reads the journal's
//! position. Every event is committed to the journal before it is published, so an event is
//! either already readable in the journal when the replay reads it, or published after the
//! live receiver exists; the feed keeps a cursor (`next`, the next seq it owes the consumer)
//! and skips anything below it, so the overlap between the two sources is never sent twice.
//!
//! Live events are read from the ring by the connection's own task ([`Feed::next`]): no task,
//! no queue and no copy per subscription, one shared pointer per event. Only a replay runs
//! as a task of its own (it reads the journal while the connection writes), with a bounded
//! queue ([`QUEUE`]) it waits on, so a consumer reading at full speed is never punished for a
//! burst; when the journal has nothing more, the task hands the live receiver back and ends.
//! The ring holds [`crate::ingest::PUBLISH_CAPACITY`] events, one copy for all consumers. A
//! consumer that falls further behind than the ring holds goes back to the journal from its
//! cursor and catches up from there (as a replay does), so a reader that is as fast as
//! ingest but was outrun for a moment (a burst, a pause of its own) loses nothing and is not
//! disconnected; the journal holds what the ring no longer does. One that falls a ring behind
//! more than [`MAX_LIVE_CATCH_UPS`] times within [`LIVE_CATCH_UP_WINDOW`] cannot keep up: the
//! feed cancels the connection's `slow` token, the connection is closed (`4001 slow
//! consumer`) and the consumer resumes from its cursor. One that stops reading is closed by
//! the replay's stall rule below. A long replay (`from` far back) that the ring outruns
//! catches up the same way (a bounded number of rounds).
//!
//! Replay memory is bounded apart from the queue length: a replay reads bounded pages
//! ([`PAGE`] events, and bytes from its connection's budget) and every replayed event holds
//! its share of the connection's and the total replay budget until it is written (see
//! [`super::budget`]). A replay whose consumer does not read (its events stay unwritten past
//! `limits.replay_stall_timeout`) gets the slow-consumer verdict, as a lagging live feed does.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::error;

use super::budget::{Charge, ConnectionBudget, Stalled, EVENT_OVERHEAD};
use super::Hub;
use crate::envelope::{Envelope, Published};
use crate::routing::Filter;
use crate::storage::JournalPosition;

/// Replayed events a subscription's replay task may have queued for its connection.
pub const QUEUE: usize = 256;
/// Events read from the journal per page during replay.
const PAGE: usize = 256;
/// How many times a replay may be outrun by the live ring before the consumer counts as
/// unable to keep up (a consumer faster than ingest needs fewer rounds each time).
const MAX_CATCH_UPS: u32 = 8;
/// How many times a consumer reading live may fall a whole ring behind, within
/// [`LIVE_CATCH_UP_WINDOW`], and catch up from the journal; once more is the slow-consumer
/// verdict (it reads slower than ingest writes).
pub const MAX_LIVE_CATCH_UPS: u32 = 4;
/// The window [`MAX_LIVE_CATCH_UPS`] counts in.
pub const LIVE_CATCH_UP_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// Where a subscription starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Only events published from now on.
    Latest,
    /// Everything the journal still holds.
    Earliest,
    /// From this seq (inclusive): a consumer resuming with `last seq + 1`.
    Seq(u64),
}

/// Why a requested start position cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unrecoverable(pub String);

/// Checks a start position against the journal; the first seq to send.
pub fn first_seq(
    start: Start,
    epoch: Option<&str>,
    pos: &JournalPosition,
) -> Result<u64, Unrecoverable> {
    if let Some(e) = epoch {
        if e != pos.epoch {
            return Err(Unrecoverable(format!(
                "position from epoch {e:?}, but this store is epoch {:?}: re-sync from earliest or latest",
                pos.epoch
            )));
        }
    }
    match start {
        Start::Latest => Ok(pos.head + 1),
        Start::Earliest => Ok(pos.first),
        Start::Seq(s) if s < pos.first => Err(Unrecoverable(format!(
            "seq {s} is no longer retained (the journal starts at {}): re-sync",
            pos.first
        ))),
        Start::Seq(s) if s > pos.head + 1 => Err(Unrecoverable(format!(
            "seq {s} is beyond the newest stored seq {} (a position from another store?): re-sync",
            pos.head
        ))),
        Start::Seq(s) => Ok(s),
    }
}

/// How a feed ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedEnd {
    /// The consumer's queue was full while live.
    SlowConsumer,
    /// The journal could not be read.
    Store(String),
    /// The feed's position was pruned by retention before the consumer read it (a consumer
    /// far behind): it must re-sync, as with `unrecoverable_position` at subscribe time.
    Unrecoverable(String),
}

/// What a feed puts in its queue.
#[derive(Debug)]
pub enum FeedItem {
    /// The next event for this subscription, from the live stream.
    Event(Arc<Published>),
    /// The journal holds bytes at `seq` that are not an envelope: it cannot be sent, and
    /// whether it matched is unknown, so the consumer is told instead of meeting a silent gap.
    /// The feed goes on after it.
    Unreadable {
        /// The journal position.
        seq: u64,
        /// Why it could not be read.
        reason: String,
    },
    /// The next event for this subscription, from the journal: boxed so the queue's slots
    /// stay small for the many live-only subscriptions.
    Replayed(Box<Replayed>),
    /// The feed is over.
    End(FeedEnd),
}

impl FeedItem {
    /// The event's seq and its envelope as text (`None` for an end): a live event's text was
    /// checked once for all consumers, a replayed one is checked here (bytes that are not
    /// UTF-8, never written by the journal, read as `null`).
    pub fn event_text(&self) -> Option<(u64, &str)> {
        match self {
            FeedItem::Event(p) => Some((p.envelope.seq.unwrap_or(0), p.text())),
            FeedItem::Replayed(r) => Some((r.seq, std::str::from_utf8(&r.bytes).unwrap_or("null"))),
            FeedItem::Unreadable { .. } | FeedItem::End(_) => None,
        }
    }
}

/// A replayed event: only what is sent (not the parsed envelope), and the replay budget it
/// holds until it is written or dropped.
#[derive(Debug)]
pub struct Replayed {
    /// The journal position.
    pub seq: u64,
    /// The envelope as journalled.
    pub bytes: Bytes,
    _charge: Charge,
}

/// What ends a feed and bounds it: `stop` (unsubscribe, disconnect), `slow` (cancelled by the
/// feed itself when its consumer fell behind the ring or stalled its replay; the connection
/// watches it) and the connection's replay budget.
#[derive(Clone, Debug)]
pub struct FeedControl {
    /// Ends the feed's replay task: the subscription's own token, or its connection's for a
    /// subscription that starts live (dropping the feed ends the task too).
    pub stop: CancellationToken,
    /// Shared by every feed of one connection; cancelled on a slow-consumer verdict.
    pub slow: CancellationToken,
    /// The connection's share of the replay budget, shared by its feeds.
    pub budget: Arc<ConnectionBudget>,
}

/// What a feed needs to (re)start a replay: shared by the feed and its replay task.
struct FeedShared {
    hub: Arc<Hub>,
    filter: Filter,
    allow: Arc<Filter>,
    control: FeedControl,
}

impl FeedShared {
    fn wanted(&self, e: &Envelope) -> bool {
        self.allow.matches(e) && self.filter.matches(e)
    }
}

/// What a replay task sends its feed: items, then (when the journal has nothing more) the
/// live receiver to go on with.
enum FromReplay {
    Item(FeedItem),
    Live {
        live: broadcast::Receiver<Arc<Published>>,
        next: u64,
    },
}

enum State {
    /// A replay task reads the journal; its bounded queue holds what it read.
    Replaying(mpsc::Receiver<FromReplay>),
    /// Reading the shared ring directly; `next` is the next seq owed to the consumer.
    Live {
        live: broadcast::Receiver<Arc<Published>>,
        next: u64,
    },
    Ended,
}

/// One subscription's feed, read by its connection's task: events from a replay task while
/// the journal has older ones, then straight from the shared ring (no task, no queue, no copy
/// per consumer once live).
pub struct Feed {
    state: State,
    shared: Arc<FeedShared>,
    /// Whether the live stream has caught up with the cursor since the feed opened.
    in_sync: bool,
    /// How many times a replay has been outrun by the live ring.
    catch_ups: u32,
    /// Catch-ups from the journal after the feed was in sync.
    live_catch_ups: LiveCatchUps,
}

/// Counts a live feed's catch-ups from the journal in windows of [`LIVE_CATCH_UP_WINDOW`].
#[derive(Debug)]
struct LiveCatchUps {
    window_start: tokio::time::Instant,
    in_window: u32,
}

impl LiveCatchUps {
    fn new(now: tokio::time::Instant) -> LiveCatchUps {
        LiveCatchUps {
            window_start: now,
            in_window: 0,
        }
    }

    /// Whether one more catch-up is allowed at `now` (counted when it is).
    fn allow(&mut self, now: tokio::time::Instant) -> bool {
        if now.duration_since(self.window_start) >= LIVE_CATCH_UP_WINDOW {
            self.window_start = now;
            self.in_window = 0;
        }
        if self.in_window >= MAX_LIVE_CATCH_UPS {
            return false;
        }
        self.in_window += 1;
        true
    }
}

/// What one live receive means for the feed.
enum LiveStep {
    Deliver(FeedItem),
    Skip,
    /// Go back to the journal from the cursor (a hole, or the ring outran a replay).
    Replay,
    End(FeedEnd),
    Closed,
}

impl Feed {
    /// The next item, waiting for one; `None` once the feed is over (stopped, or the live
    /// stream closed).
    pub async fn next(&mut self) -> Option<FeedItem> {
        loop {
            let step = match &mut self.state {
                State::Ended => return None,
                State::Replaying(rx) => match rx.recv().await {
                    Some(FromReplay::Item(item)) => return Some(self.after(item)),
                    Some(FromReplay::Live { live, next }) => {
                        self.state = State::Live { live, next };
                        continue;
                    }
                    None => {
                        self.state = State::Ended;
                        return None;
                    }
                },
                State::Live { live, .. } => {
                    let received = live.recv().await;
                    self.live_step(received)
                }
            };
            if let Some(item) = self.apply(step) {
                return item;
            }
        }
    }

    /// The next seq the feed owes once it reads the live ring (everything before it was
    /// handed out or did not match); `None` while it replays.
    pub fn live_cursor(&self) -> Option<u64> {
        match &self.state {
            State::Live { next, .. } => Some(*next),
            _ => None,
        }
    }

    /// The next item if one is ready now (never waits): a connection writes what is ready
    /// in one batch.
    pub fn try_next(&mut self) -> Option<FeedItem> {
        loop {
            let step = match &mut self.state {
                State::Ended => return None,
                State::Replaying(rx) => match rx.try_recv() {
                    Ok(FromReplay::Item(item)) => return Some(self.after(item)),
                    Ok(FromReplay::Live { live, next }) => {
                        self.state = State::Live { live, next };
                        continue;
                    }
                    Err(_) => return None,
                },
                State::Live { live, .. } => {
                    let received = match live.try_recv() {
                        Ok(p) => Ok(p),
                        Err(broadcast::error::TryRecvError::Lagged(n)) => {
                            Err(broadcast::error::RecvError::Lagged(n))
                        }
                        Err(broadcast::error::TryRecvError::Empty) => return None,
                        // Seen again (and ended on) by the next `next()`.
                        Err(broadcast::error::TryRecvError::Closed) => return None,
                    };
                    self.live_step(received)
                }
            };
            match self.apply(step) {
                Some(item) => return item,
                // A replay restarted: its items come through `next()`.
                None if matches!(self.state, State::Replaying(_)) => return None,
                None => {}
            }
        }
    }

    /// An item from the replay task: an end ends the feed.
    fn after(&mut self, item: FeedItem) -> FeedItem {
        if matches!(item, FeedItem::End(_)) {
            self.state = State::Ended;
        }
        item
    }

    /// Acts on a live step: `Some(item)` to hand out (`Some(None)`: the feed is over), `None`
    /// to read on.
    fn apply(&mut self, step: LiveStep) -> Option<Option<FeedItem>> {
        match step {
            LiveStep::Deliver(item) => Some(Some(item)),
            LiveStep::Skip => None,
            LiveStep::Replay => {
                if let State::Live { live, next } = &self.state {
                    let (live, next) = (live.resubscribe(), *next);
                    self.state = State::Replaying(spawn_replay(self.shared.clone(), live, next));
                }
                None
            }
            LiveStep::End(end) => {
                self.state = State::Ended;
                Some(Some(FeedItem::End(end)))
            }
            LiveStep::Closed => {
                self.state = State::Ended;
                Some(None)
            }
        }
    }

    fn live_step(
        &mut self,
        received: Result<Arc<Published>, broadcast::error::RecvError>,
    ) -> LiveStep {
        let State::Live { next, .. } = &mut self.state else {
            return LiveStep::Skip;
        };
        match received {
            Ok(p) => {
                let seq = p.envelope.seq.unwrap_or(0);
                if seq < *next {
                    return LiveStep::Skip; // already sent from the journal
                }
                if seq > *next {
                    // A hole between the journal read and the live stream cannot happen
                    // (journal before publish), but if it ever did, fill it from the journal.
                    return LiveStep::Replay;
                }
                *next = seq + 1;
                self.in_sync = true;
                if self.shared.wanted(&p.envelope) {
                    LiveStep::Deliver(FeedItem::Event(p))
                } else {
                    LiveStep::Skip
                }
            }
            Err(broadcast::error::RecvError::Lagged(_))
                if !self.in_sync && self.catch_ups < MAX_CATCH_UPS =>
            {
                // The ring moved on while a long replay ran: the consumer was reading the
                // journal, not falling behind. Catch up from the journal again.
                self.catch_ups += 1;
                LiveStep::Replay
            }
            Err(broadcast::error::RecvError::Lagged(_))
                if self.in_sync && self.live_catch_ups.allow(tokio::time::Instant::now()) =>
            {
                // A ring behind once live: the journal holds what the ring no longer does.
                LiveStep::Replay
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                // A ring behind too often once live (or replays that never catch up): this
                // consumer cannot keep up.
                self.shared.control.slow.cancel();
                LiveStep::End(FeedEnd::SlowConsumer)
            }
            Err(broadcast::error::RecvError::Closed) => LiveStep::Closed,
        }
    }
}

/// Starts a replay task from seq `from`; `live` must have been taken from the hub's stream
/// before `from` was computed (every event is committed to the journal before it is
/// published, so nothing falls between the two). The task ends when `control.stop` is
/// cancelled, the feed is dropped, or the journal has nothing more (then it hands `live`
/// over).
fn spawn_replay(
    shared: Arc<FeedShared>,
    live: broadcast::Receiver<Arc<Published>>,
    from: u64,
) -> mpsc::Receiver<FromReplay> {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(async move {
        let stop = shared.control.stop.clone();
        // The feed dropped (its subscription gone) ends the task too, token or not.
        let feed_gone = tx.clone();
        tokio::select! {
            _ = replay(&shared, live, from, &tx) => {}
            _ = stop.cancelled() => {}
            _ = feed_gone.closed() => {}
        }
    });
    rx
}

/// Pages through the journal from `next` until it has nothing at or after the cursor, each
/// page within the bytes reserved for it, then hands the live receiver over.
async fn replay(
    shared: &FeedShared,
    live: broadcast::Receiver<Arc<Published>>,
    mut next: u64,
    tx: &mpsc::Sender<FromReplay>,
) {
    let FeedControl { slow, budget, .. } = &shared.control;
    let hub = &shared.hub;
    let send = |item: FeedItem| tx.send(FromReplay::Item(item));
    // A replay that stalled: the consumer is not reading.
    let stalled = || {
        slow.cancel();
        let _ = tx.try_send(FromReplay::Item(FeedItem::End(FeedEnd::SlowConsumer)));
    };
    loop {
        let Ok(mut reserved) = budget.reserve(budget.page_bytes()).await else {
            stalled();
            return;
        };
        // Bytes and count such that the page's charges (bytes plus overhead) fit.
        let bytes = reserved.bytes();
        let count = PAGE.min(bytes / (2 * EVENT_OVERHEAD)).max(1);
        let max_bytes = bytes.saturating_sub(count.saturating_mul(EVENT_OVERHEAD));
        let page = match hub.store.read_page(next, count, max_bytes).await {
            Ok(p) => p,
            Err(e @ crate::storage::StoreError::NotRetained { .. }) => {
                let _ = send(FeedItem::End(FeedEnd::Unrecoverable(e.to_string()))).await;
                return;
            }
            Err(e) => {
                let _ = send(FeedItem::End(FeedEnd::Store(e.to_string()))).await;
                return;
            }
        };
        if page.is_empty() {
            let _ = tx.send(FromReplay::Live { live, next }).await;
            return;
        }
        for stored in page {
            next = stored.seq + 1;
            // Read without the depth limit of a full parse (see `StoredEnvelope`): only bytes
            // that are not an envelope fail here, and the consumer is told.
            let envelope: Envelope = match crate::envelope::read_stored(&stored.bytes) {
                Ok(e) => e,
                Err(e) => {
                    hub.stats.unreadable_events.fetch_add(1, Ordering::Relaxed);
                    error!(seq = stored.seq, event_id = %stored.id, error = %e,
                        "journalled event unreadable; the consumer is told (unreadable_event)");
                    let item = FeedItem::Unreadable {
                        seq: stored.seq,
                        reason: format!(
                            "journalled event at seq {} is unreadable: {e}",
                            stored.seq
                        ),
                    };
                    if send(item).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            if !shared.wanted(&envelope) {
                continue;
            }
            drop(envelope);
            let cost = budget.cost(stored.bytes.len());
            let charge = match budget.charge(&mut reserved, cost) {
                Some(c) => c,
                None => {
                    // Only a page's first event can be larger than its reservation (the page
                    // is then that one event): reserve its own size, holding nothing else
                    // meanwhile.
                    drop(reserved);
                    let Ok(r) = budget.reserve(cost).await else {
                        stalled();
                        return;
                    };
                    reserved = r;
                    match budget.charge(&mut reserved, cost) {
                        Some(c) => c,
                        None => {
                            let _ = send(FeedItem::End(FeedEnd::Store(format!(
                                "replay budget cannot hold event {}",
                                stored.seq
                            ))))
                            .await;
                            return;
                        }
                    }
                }
            };
            let item = FeedItem::Replayed(Box::new(Replayed {
                seq: stored.seq,
                bytes: stored.bytes,
                _charge: charge,
            }));
            match budget.unless_stalled(send(item)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return,
                Err(Stalled) => {
                    stalled();
                    return;
                }
            }
        }
    }
}

/// Opens a feed for (`filter` ∩ `allow`): takes the live receiver, then checks the start
/// against the journal. A feed from `latest` reads the ring from the start; any other
/// replays the journal first.
pub async fn open(
    hub: &Arc<Hub>,
    filter: Filter,
    allow: Arc<Filter>,
    start: Start,
    epoch: Option<&str>,
    control: FeedControl,
) -> Result<Feed, OpenError> {
    let live = hub.publish.subscribe();
    let pos = hub
        .store
        .position()
        .await
        .map_err(|e| OpenError::Store(e.to_string()))?;
    let from = first_seq(start, epoch, &pos).map_err(OpenError::Position)?;
    let shared = Arc::new(FeedShared {
        hub: hub.clone(),
        filter,
        allow,
        control,
    });
    let state = if start == Start::Latest {
        State::Live { live, next: from }
    } else {
        State::Replaying(spawn_replay(shared.clone(), live, from))
    };
    Ok(Feed {
        state,
        shared,
        in_sync: false,
        catch_ups: 0,
        live_catch_ups: LiveCatchUps::new(tokio::time::Instant::now()),
    })
}

/// Why a feed could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The start position is not servable.
    #[error(transparent)]
    Position(Unrecoverable),
    /// The journal could not be read.
    #[error("store unavailable: {0}")]
    Store(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_live_feed_catches_up_a_few_times_a_minute_then_is_slow() {
        let start = tokio::time::Instant::now();
        let mut catch_ups = LiveCatchUps::new(start);
        for _ in 0..MAX_LIVE_CATCH_UPS {
            assert!(catch_ups.allow(tokio::time::Instant::now()));
        }
        assert!(
            !catch_ups.allow(tokio::time::Instant::now()),
            "one more within the minute: too slow"
        );
        tokio::time::advance(LIVE_CATCH_UP_WINDOW - std::time::Duration::from_millis(1)).await;
        assert!(!catch_ups.allow(tokio::time::Instant::now()));
        tokio::time::advance(std::time::Duration::from_millis(1)).await;
        assert!(
            catch_ups.allow(tokio::time::Instant::now()),
            "a new minute, a new allowance"
        );
    }

    fn pos(first: u64, head: u64) -> JournalPosition {
        JournalPosition {
            epoch: "e1".into(),
            head,
            first,
        }
    }

    #[test]
    fn start_positions() {
        let p = pos(1, 10);
        assert_eq!(first_seq(Start::Latest, None, &p), Ok(11));
        assert_eq!(first_seq(Start::Earliest, None, &p), Ok(1));
        assert_eq!(first_seq(Start::Seq(5), Some("e1"), &p), Ok(5));
        assert_eq!(
            first_seq(Start::Seq(11), None, &p),
            Ok(11),
            "the next one is fine"
        );
        assert!(
            first_seq(Start::Seq(12), None, &p).is_err(),
            "from the future"
        );
        assert!(
            first_seq(Start::Seq(5), Some("e0"), &p).is_err(),
            "another epoch"
        );
        assert!(
            first_seq(Start::Seq(2), None, &pos(3, 10)).is_err(),
            "no longer retained"
        );
        assert_eq!(
            first_seq(Start::Earliest, None, &pos(1, 0)),
            Ok(1),
            "empty journal"
        );
    }
}
