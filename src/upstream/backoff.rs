//! Reconnect delays: exponential from `initial`, doubling per consecutive failure up to
//! `max`, with "equal jitter" (a delay is uniformly drawn from `[d/2, d]`).
//!
//! Equal jitter keeps the first retry within the first step (`<= initial`), so a reconnect
//! storm resolves within `initial`, while still spreading many bridges (or many upstreams of
//! one bridge) that lost the same server at the same instant.

use std::time::Duration;

/// The backoff schedule of one upstream.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// A schedule starting at `initial` and capped at `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            failures: 0,
        }
    }

    /// The un-jittered delay for the next failure, and counts the failure.
    fn step(&mut self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(20)).unwrap_or(u32::MAX);
        self.failures = self.failures.saturating_add(1);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The delay before the next attempt after an ordinary failure.
    pub fn next_delay(&mut self) -> Duration {
        jitter(self.step())
    }

    /// The delay after the server refused our credentials: straight to the longest step,
    /// because a bad token will not fix itself in a second and hammering an auth endpoint
    /// gets accounts locked.
    pub fn auth_failure_delay(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        jitter(self.max)
    }

    /// Forgets past failures after a healthy connection.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

fn jitter(d: Duration) -> Duration {
    let half = d / 2;
    let extra = rand::random_range(0..=half.as_micros().min(u64::MAX as u128) as u64);
    half + Duration::from_micros(extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_with_bounded_jitter() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let expected = [1, 2, 4, 8, 16, 30, 30];
        for secs in expected {
            let d = b.next_delay();
            let full = Duration::from_secs(secs);
            assert!(
                d >= full / 2 && d <= full,
                "{d:?} not in [{:?}, {full:?}]",
                full / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(1));
    }

    #[test]
    fn auth_failure_waits_the_longest_step() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let d = b.auth_failure_delay();
        assert!(d >= Duration::from_secs(15) && d <= Duration::from_secs(30));
    }

    #[test]
    fn many_failures_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_secs(5));
        for _ in 0..200 {
            assert!(b.next_delay() <= Duration::from_secs(5));
        }
    }
}
