//! Repeats of one frame on one connection: each is its own event.
//!
//! A frame without a provider id is identified by the digest of its content, so two identical
//! frames would share an id and the journal would keep only the first. On one connection that
//! is wrong: a contract going `active → paused → active` sends the first frame again, and a
//! consumer that never sees the third frame ends on the wrong state. The same frame arriving
//! over another connection (a second VoicePact `client_id`, a second VoIPBIN upstream on one
//! host, a second bridge instance) is the same event seen twice, and must stay one event.
//!
//! So each connection counts how often it has seen each content id: the first occurrence keeps
//! the id, the k-th (k ≥ 2) gets [`occurrence_id`]`(id, k)`. Two connections that saw the same
//! sequence of frames count alike, so their copies still share ids and the journal keeps one
//! of each. A count is forgotten when its frame has not been seen for the dedup window
//! (`storage.dedup_window`): the journal treats an id first stored longer ago than that as a
//! new event anyway (see `storage`), so the count is only needed within it.
//!
//! Memory is bounded by `limits.tracked_frames` per connection: when it is full the
//! least recently seen frame is forgotten early (counted in `wsbridge_upstream_untracked_total`); if
//! that frame repeats within the window its repeat is taken for a copy of the first.

use std::collections::hash_map::{Entry, HashMap};
use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::time::Duration;

use tokio::time::Instant;

/// The id of the `k`-th occurrence (k ≥ 2) of a frame whose content id is `id` on one
/// connection: 32 hex digits of `SHA-256("occurrence" NUL id NUL k)`, the same on every
/// connection and instance that computes it.
pub fn occurrence_id(id: &str, k: u64) -> String {
    wsbridge_adapters::derived_id("occurrence", id, k)
}

/// How often one frame has been seen.
#[derive(Clone, Copy)]
struct Seen {
    count: u64,
    /// Which touch that was (the matching entry of the order queue).
    touch: u64,
}

/// Per-connection occurrence counts of content ids (see the module doc).
pub(crate) struct Occurrences {
    window: Duration,
    capacity: usize,
    /// Keyed by a keyed 64-bit hash of the id: 16 bytes an entry instead of the id's string.
    seen: HashMap<u64, Seen>,
    /// Every (key, touch, time) a frame was seen, oldest first; stale entries (the frame was
    /// seen again later) are skipped when they reach the front.
    order: VecDeque<(u64, u64, Instant)>,
    /// Touches so far: tells an entry of the order queue from a later one of the same frame.
    touches: u64,
    hasher: std::collections::hash_map::RandomState,
    /// Frames forgotten before their window ended because `capacity` was reached.
    evicted: u64,
}

impl Occurrences {
    /// Counts for one new connection.
    pub(crate) fn new(window: Duration, capacity: usize) -> Occurrences {
        Occurrences {
            window,
            capacity: capacity.max(1),
            seen: HashMap::new(),
            order: VecDeque::new(),
            touches: 0,
            hasher: Default::default(),
            evicted: 0,
        }
    }

    /// The id this occurrence of a frame with content id `id`, seen at `now`, goes by.
    pub(crate) fn id_for(&mut self, id: String, now: Instant) -> String {
        self.expire(now);
        let key = self.hasher.hash_one(id.as_str());
        self.touches = self.touches.wrapping_add(1);
        let touch = self.touches;
        let count = match self.seen.entry(key) {
            Entry::Occupied(mut e) => {
                let seen = e.get_mut();
                seen.count = seen.count.saturating_add(1);
                seen.touch = touch;
                seen.count
            }
            Entry::Vacant(e) => {
                e.insert(Seen { count: 1, touch });
                1
            }
        };
        self.order.push_back((key, touch, now));
        self.enforce_capacity();
        if count == 1 {
            id
        } else {
            occurrence_id(&id, count)
        }
    }

    /// Frames forgotten early because the connection's capacity was reached, since the last
    /// call (the caller adds them to a counter).
    pub(crate) fn take_evicted(&mut self) -> u64 {
        std::mem::take(&mut self.evicted)
    }

    /// Forgets frames not seen for the window.
    fn expire(&mut self, now: Instant) {
        while let Some(&(key, touch, at)) = self.order.front() {
            if now.saturating_duration_since(at) < self.window {
                break;
            }
            self.order.pop_front();
            if self.seen.get(&key).is_some_and(|s| s.touch == touch) {
                self.seen.remove(&key);
            }
        }
    }

    /// Forgets the least recently seen frames beyond capacity, and compacts the order queue
    /// when stale pairs (frames seen again since) make up most of it.
    fn enforce_capacity(&mut self) {
        while self.seen.len() > self.capacity {
            let Some((key, touch, _)) = self.order.pop_front() else {
                break;
            };
            if self.seen.get(&key).is_some_and(|s| s.touch == touch) {
                self.seen.remove(&key);
                self.evicted = self.evicted.saturating_add(1);
            }
        }
        if self.order.len() > self.seen.len().saturating_mul(2).saturating_add(64) {
            let seen = &self.seen;
            self.order
                .retain(|(key, touch, _)| seen.get(key).is_some_and(|s| s.touch == *touch));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(120);

    #[tokio::test(start_paused = true)]
    async fn repeats_on_one_connection_get_distinct_ids_and_two_connections_agree() {
        let mut a = Occurrences::new(WINDOW, 100);
        let mut b = Occurrences::new(WINDOW, 100);
        let now = Instant::now();
        let frames = ["active", "paused", "active", "active"];
        let ids_a: Vec<String> = frames
            .iter()
            .map(|f| a.id_for(f.to_string(), now))
            .collect();
        let ids_b: Vec<String> = frames
            .iter()
            .map(|f| b.id_for(f.to_string(), now))
            .collect();
        assert_eq!(
            ids_a, ids_b,
            "two connections that saw the same frames agree"
        );
        assert_eq!(ids_a[0], "active");
        assert_eq!(ids_a[1], "paused");
        assert_eq!(ids_a[2], occurrence_id("active", 2));
        assert_eq!(ids_a[3], occurrence_id("active", 3));
        let unique: std::collections::HashSet<_> = ids_a.iter().collect();
        assert_eq!(unique.len(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_count_is_forgotten_after_the_window_without_the_frame() {
        let mut a = Occurrences::new(WINDOW, 100);
        assert_eq!(a.id_for("x".into(), Instant::now()), "x");
        tokio::time::advance(WINDOW - Duration::from_secs(1)).await;
        assert_eq!(a.id_for("x".into(), Instant::now()), occurrence_id("x", 2));
        // The window runs from the last time the frame was seen.
        tokio::time::advance(WINDOW - Duration::from_secs(1)).await;
        assert_eq!(a.id_for("x".into(), Instant::now()), occurrence_id("x", 3));
        tokio::time::advance(WINDOW).await;
        assert_eq!(a.id_for("x".into(), Instant::now()), "x");
        assert_eq!(a.seen.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn capacity_bounds_memory_and_forgets_the_least_recently_seen() {
        let mut a = Occurrences::new(WINDOW, 3);
        let now = Instant::now();
        for f in ["a", "b", "c", "a", "d"] {
            a.id_for(f.into(), now);
        }
        assert_eq!(a.seen.len(), 3);
        assert_eq!(a.take_evicted(), 1, "b was forgotten");
        assert_eq!(a.take_evicted(), 0);
        // "a" was seen again before "d" arrived, so it is still counted.
        assert_eq!(a.id_for("a".into(), now), occurrence_id("a", 3));
        for i in 0..10_000 {
            a.id_for(format!("f{i}"), now);
            a.id_for("a".into(), now);
        }
        assert!(a.seen.len() <= 3);
        assert!(a.order.len() <= 2 * 3 + 64 + 1, "order queue stays bounded");
    }
}
