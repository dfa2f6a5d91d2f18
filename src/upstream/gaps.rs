//! Sequence-gap detection: a dialect's event rule may name the provider's sequence number
//! (and the key it counts per, e.g. a channel). On one connection, a number more than one
//! past the last seen for its key means the provider skipped events: the gap is counted,
//! logged, and the next envelope carries the extension `gap` (how many numbers were missed).
//! Numbering restarts with each connection (providers number per connection, and a
//! reconnect's resubscribe starts a new stream); a number at or below the last is a repeat
//! or a restart, not a gap.

use std::collections::HashMap;

/// The last sequence number seen per key on one connection, for at most `max_keys` keys
/// (`limits.tracked_frames`): a provider that numbers per key for ever more keys would
/// otherwise grow the map without bound. A key beyond it is not tracked (its gaps go
/// undetected) and [`Sequences::untracked`] says so.
#[derive(Debug)]
pub struct Sequences {
    last: HashMap<String, u64>,
    max_keys: usize,
    untracked: u64,
}

impl Sequences {
    /// Tracks at most `max_keys` keys.
    pub fn new(max_keys: usize) -> Sequences {
        Sequences {
            last: HashMap::new(),
            max_keys,
            untracked: 0,
        }
    }

    /// Records `number` for `key`; returns how many numbers were skipped before it.
    pub fn observe(&mut self, key: &str, number: u64) -> Option<u64> {
        if let Some(last) = self.last.get_mut(key) {
            let before = std::mem::replace(last, number);
            let missed = number.checked_sub(before)?.checked_sub(1)?;
            return (missed > 0).then_some(missed);
        }
        if self.last.len() < self.max_keys {
            self.last.insert(key.to_string(), number);
        } else {
            self.untracked = self.untracked.saturating_add(1);
        }
        None
    }

    /// Numbers seen for keys beyond the limit (not checked for gaps).
    pub fn untracked(&self) -> u64 {
        self.untracked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_per_key() {
        let mut s = Sequences::new(10);
        assert_eq!(s.observe("a", 1), None);
        assert_eq!(s.observe("a", 2), None);
        assert_eq!(s.observe("b", 10), None);
        assert_eq!(s.observe("a", 5), Some(2));
        assert_eq!(s.observe("b", 11), None);
        // A repeat or a restart is no gap, and the numbering follows it.
        assert_eq!(s.observe("a", 5), None);
        assert_eq!(s.observe("a", 1), None);
        assert_eq!(s.observe("a", 2), None);
        assert_eq!(s.observe("a", u64::MAX), Some(u64::MAX - 3));
    }

    #[test]
    fn keys_are_bounded() {
        let mut s = Sequences::new(3);
        for i in 0..3 {
            s.observe(&i.to_string(), 1);
        }
        assert_eq!(s.observe("one more", 1), None);
        assert_eq!(s.observe("one more", 5), None);
        assert_eq!(s.untracked(), 2);
    }
}
