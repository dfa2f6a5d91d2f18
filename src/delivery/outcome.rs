//! What an attempt's result means, as a pure rule (no I/O; the time and the jitter are given),
//! so every branch is tested on its own. The outcome of an attempt (a contract: README,
//! "Webhook delivery"):
//! - 2xx: delivered (the row is removed);
//! - 410 Gone: the endpoint is disabled until an admin re-enables it; the delivery stays
//!   pending and goes out after re-enabling;
//! - 429/503 with `Retry-After`: retried no sooner than it says (clamped to an hour), and the
//!   whole endpoint pauses that long; 429/502/503/504 without it pause the endpoint until the
//!   scheduled retry ("slow down");
//! - anything else, timeouts and connection errors: retried after the next `retry` delay
//!   (±20 % jitter); once the schedule is exhausted the delivery is dead-lettered.

use std::time::Duration;

use crate::failure::{Failure, Reason};
use crate::storage::NextStep;
use crate::supervise::unix_ms_after;

/// Longest `Retry-After` honoured.
pub(super) const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The endpoint's answer to an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Response {
    /// The HTTP status.
    pub(super) status: u16,
    /// Its `Retry-After`, when it had a readable one.
    pub(super) retry_after: Option<Duration>,
}

/// The attempt whose result is classified.
#[derive(Clone, Copy, Debug)]
pub(super) struct Attempt<'a> {
    /// The endpoint's retry schedule (`retry`): the wait after each failed attempt, in turn;
    /// its length is how many failed attempts a delivery may have before it is dead.
    pub(super) schedule: &'a [Duration],
    /// Attempts of this delivery made before this one.
    pub(super) attempts_before: u32,
    /// When this attempt started (unix ms).
    pub(super) started_ms: i64,
    /// How long it took.
    pub(super) elapsed: Duration,
    /// Now (unix ms): when its result came.
    pub(super) now_ms: i64,
}

/// What an attempt comes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Outcome {
    /// The answer's HTTP status, when one came.
    pub(super) status: Option<u16>,
    /// Why the attempt failed (`None`: delivered).
    pub(super) failure: Option<Failure>,
    /// What happens to the delivery.
    pub(super) next: NextStep,
    /// How long the whole endpoint pauses (a slow-down answer).
    pub(super) pause: Option<Duration>,
    /// The endpoint answered 410 Gone: it is to be disabled.
    pub(super) gone: bool,
}

/// Classifies `result` (an answer, or the failure that kept one from coming) of `attempt`;
/// `spread` jitters the schedule's step ([`jitter`] when attempts run).
pub(super) fn classify(
    result: Result<Response, Failure>,
    attempt: &Attempt<'_>,
    spread: impl FnOnce(Duration) -> Duration,
) -> Outcome {
    let schedule = attempt.schedule;
    let scheduled = schedule
        .get(attempt.attempts_before as usize)
        .map(|d| spread(*d));
    match result {
        Ok(Response { status, .. }) if (200..300).contains(&status) => Outcome {
            status: Some(status),
            failure: None,
            next: NextStep::Delivered,
            pause: None,
            gone: false,
        },
        // Stays pending and due: it goes out as soon as the endpoint is re-enabled.
        Ok(Response { status: 410, .. }) => Outcome {
            status: Some(410),
            failure: Some(Failure::new(
                Reason::HttpStatus,
                "410 Gone: endpoint disabled",
            )),
            next: NextStep::HoldUntil(attempt.started_ms),
            pause: None,
            gone: true,
        },
        Ok(Response {
            status,
            retry_after,
        }) => {
            let plan = after_refusal(
                status,
                retry_after,
                scheduled,
                // This attempt is within the schedule (attempts_before + 1 <= its length).
                (attempt.attempts_before as usize) < schedule.len(),
                (attempt.started_ms, attempt.elapsed),
                attempt.now_ms,
            );
            Outcome {
                status: Some(status),
                failure: Some(Failure::new(Reason::HttpStatus, format!("HTTP {status}"))),
                next: plan.next,
                pause: plan.pause,
                gone: false,
            }
        }
        Err(failure) => Outcome {
            status: None,
            failure: Some(failure),
            next: match scheduled {
                Some(delay) => NextStep::RetryAt(unix_ms_after(attempt.now_ms, delay)),
                None => NextStep::Dead,
            },
            pause: None,
            gone: false,
        },
    }
}

/// What follows an answer that is neither a success nor 410: the delivery's next step, and how
/// long the whole endpoint pauses (a slow-down answer).
#[derive(Debug, PartialEq, Eq)]
struct RetryPlan {
    next: NextStep,
    pause: Option<Duration>,
}

/// The rule for an HTTP answer `status` other than 2xx and 410, at unix ms `now_ms`, to an
/// attempt that started at `started.0` (unix ms) and took `started.1`:
/// - a `Retry-After` on 429 or 503 is honoured (clamped to [`MAX_RETRY_AFTER`]), counted from
///   when the answer came, while the schedule has steps left (`within_schedule`);
/// - otherwise the schedule's next step (`scheduled`, already jittered) from now;
/// - no step left: dead;
/// - 429, 502, 503 and 504 also pause the whole endpoint until that retry is due, so the
///   other deliveries do not hammer an endpoint that asked for a break.
fn after_refusal(
    status: u16,
    retry_after: Option<Duration>,
    scheduled: Option<Duration>,
    within_schedule: bool,
    started: (i64, Duration),
    now_ms: i64,
) -> RetryPlan {
    let (started_ms, elapsed) = started;
    let slow_down = matches!(status, 429 | 502 | 503 | 504);
    let honoured = retry_after
        .filter(|_| matches!(status, 429 | 503))
        .map(|d| d.min(MAX_RETRY_AFTER));
    let next = match (honoured, scheduled) {
        (Some(after), _) if within_schedule => {
            NextStep::RetryAt(unix_ms_after(started_ms, elapsed.saturating_add(after)))
        }
        (_, Some(delay)) => NextStep::RetryAt(unix_ms_after(now_ms, delay)),
        _ => NextStep::Dead,
    };
    let pause = match next {
        NextStep::RetryAt(at) if slow_down => Some(Duration::from_millis(
            u64::try_from(at.saturating_sub(now_ms)).unwrap_or(0),
        )),
        _ => None,
    };
    RetryPlan { next, pause }
}

/// A retry delay with ±20 % jitter, so that many failed deliveries do not retry in lockstep.
/// Never panics: a delay too long to scale (validation prevents it) is used as it is.
pub(super) fn jitter(d: Duration) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * rand::random_range(0.8..=1.2)).unwrap_or(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn retry_after_on_429_and_503_is_honoured_from_the_answer_and_pauses_the_endpoint() {
        // Started at t=1000 ms, answered after 300 ms, now 1300 ms; the schedule says 5 s.
        for status in [429, 503] {
            let plan = after_refusal(
                status,
                Some(S(2)),
                Some(S(5)),
                true,
                (1000, Duration::from_millis(300)),
                1300,
            );
            assert_eq!(plan.next, NextStep::RetryAt(3300), "{status}");
            assert_eq!(plan.pause, Some(S(2)), "{status}");
        }
        // Clamped to an hour.
        let plan = after_refusal(
            429,
            Some(S(86_400)),
            Some(S(5)),
            true,
            (0, Duration::ZERO),
            0,
        );
        assert_eq!(plan.next, NextStep::RetryAt(3_600_000));
    }

    #[test]
    fn other_answers_follow_the_schedule_and_only_slow_downs_pause() {
        let now = 10_000;
        // 500: the schedule's step from now, the endpoint keeps going.
        let plan = after_refusal(500, None, Some(S(5)), true, (9_000, S(1)), now);
        assert_eq!(
            plan,
            RetryPlan {
                next: NextStep::RetryAt(15_000),
                pause: None
            }
        );
        // A Retry-After on a 500 is not an instruction.
        let plan = after_refusal(500, Some(S(60)), Some(S(5)), true, (9_000, S(1)), now);
        assert_eq!(plan.next, NextStep::RetryAt(15_000));
        // 502 and 504 pause the endpoint for the scheduled step.
        for status in [502, 504] {
            let plan = after_refusal(status, None, Some(S(5)), true, (9_000, S(1)), now);
            assert_eq!(plan.pause, Some(S(5)), "{status}");
        }
        // 429 without Retry-After: the schedule, and a pause.
        let plan = after_refusal(429, None, Some(S(5)), true, (9_000, S(1)), now);
        assert_eq!(
            plan,
            RetryPlan {
                next: NextStep::RetryAt(15_000),
                pause: Some(S(5))
            }
        );
    }

    #[test]
    fn out_of_steps_is_dead_whatever_the_answer_says() {
        for (status, retry_after) in [(500, None), (429, Some(S(1))), (503, Some(S(1)))] {
            let plan = after_refusal(status, retry_after, None, false, (0, Duration::ZERO), 0);
            assert_eq!(
                plan,
                RetryPlan {
                    next: NextStep::Dead,
                    pause: None
                },
                "{status}"
            );
        }
    }

    #[test]
    fn jitter_stays_within_a_fifth() {
        for _ in 0..100 {
            let d = jitter(Duration::from_secs(10));
            assert!(d >= Duration::from_secs(8) && d <= Duration::from_secs(12));
        }
    }

    // `classify`: started at 9,000 ms, answered after 1 s, now 10,000 ms; retry schedule
    // 1 s, 5 s, 30 s (three failed attempts allowed); no jitter unless a test adds one.
    const SCHEDULE: [Duration; 3] = [
        Duration::from_secs(1),
        Duration::from_secs(5),
        Duration::from_secs(30),
    ];

    fn attempt(attempts_before: u32, schedule: &[Duration]) -> Attempt<'_> {
        Attempt {
            schedule,
            attempts_before,
            started_ms: 9_000,
            elapsed: S(1),
            now_ms: 10_000,
        }
    }

    fn answer(status: u16, retry_after: Option<Duration>) -> Result<Response, Failure> {
        Ok(Response {
            status,
            retry_after,
        })
    }

    fn exact(d: Duration) -> Duration {
        d
    }

    #[test]
    fn a_2xx_is_delivered_with_no_failure_and_no_pause() {
        for status in [200, 201, 202, 204, 299] {
            // Even past the schedule: the answer, not the count, decides.
            for before in [0, 3] {
                assert_eq!(
                    classify(
                        answer(status, Some(S(60))),
                        &attempt(before, &SCHEDULE),
                        exact
                    ),
                    Outcome {
                        status: Some(status),
                        failure: None,
                        next: NextStep::Delivered,
                        pause: None,
                        gone: false,
                    },
                    "{status} after {before}"
                );
            }
        }
    }

    #[test]
    fn gone_disables_the_endpoint_and_holds_the_delivery_without_using_a_step() {
        // The schedule exhausted or not, a 410 holds the delivery (due when the attempt
        // started) instead of dead-lettering it, and says the endpoint is gone.
        for before in [0, 3] {
            assert_eq!(
                classify(answer(410, Some(S(60))), &attempt(before, &SCHEDULE), exact),
                Outcome {
                    status: Some(410),
                    failure: Some(Failure::new(
                        Reason::HttpStatus,
                        "410 Gone: endpoint disabled"
                    )),
                    next: NextStep::HoldUntil(9_000),
                    pause: None,
                    gone: true,
                },
                "after {before}"
            );
        }
    }

    #[test]
    fn other_statuses_fail_and_retry_on_the_schedule_without_pausing() {
        for status in [199, 300, 301, 304, 400, 401, 404, 409, 418, 500, 501, 505] {
            assert_eq!(
                classify(answer(status, None), &attempt(0, &SCHEDULE), exact),
                Outcome {
                    status: Some(status),
                    failure: Some(Failure::new(Reason::HttpStatus, format!("HTTP {status}"))),
                    next: NextStep::RetryAt(11_000),
                    pause: None,
                    gone: false,
                },
                "{status}"
            );
        }
    }

    #[test]
    fn slow_down_statuses_pause_the_endpoint_until_the_retry() {
        for status in [429, 502, 503, 504] {
            let out = classify(answer(status, None), &attempt(1, &SCHEDULE), exact);
            assert_eq!(out.next, NextStep::RetryAt(15_000), "{status}");
            assert_eq!(out.pause, Some(S(5)), "{status}");
            assert!(!out.gone);
        }
    }

    #[test]
    fn retry_after_counts_only_on_429_and_503_and_is_capped() {
        // Honoured from when the answer came (started + elapsed), not from the schedule.
        for status in [429, 503] {
            let out = classify(answer(status, Some(S(20))), &attempt(0, &SCHEDULE), exact);
            assert_eq!(out.next, NextStep::RetryAt(30_000), "{status}");
            assert_eq!(out.pause, Some(S(20)), "{status}");
        }
        // Anywhere else it is not an instruction: the schedule's step.
        for status in [500, 502, 504, 400] {
            let out = classify(answer(status, Some(S(20))), &attempt(0, &SCHEDULE), exact);
            assert_eq!(out.next, NextStep::RetryAt(11_000), "{status}");
        }
        // At most an hour.
        let out = classify(answer(429, Some(S(7_200))), &attempt(0, &SCHEDULE), exact);
        assert_eq!(out.next, NextStep::RetryAt(10_000 + 3_600_000));
        assert_eq!(out.pause, Some(MAX_RETRY_AFTER));
    }

    #[test]
    fn the_wait_grows_with_the_schedule_and_ends_in_the_dead_letters() {
        let failures: [fn() -> Result<Response, Failure>; 3] = [
            || answer(500, None),
            || Err(Failure::new(Reason::Connect, "cannot connect to h:1")),
            || {
                Err(Failure::new(
                    Reason::Timeout,
                    "h:1 did not answer in time (timeout)",
                ))
            },
        ];
        for result in failures {
            let nexts: Vec<NextStep> = (0..=3)
                .map(|before| classify(result(), &attempt(before, &SCHEDULE), exact).next)
                .collect();
            assert_eq!(
                nexts,
                [
                    NextStep::RetryAt(11_000),
                    NextStep::RetryAt(15_000),
                    NextStep::RetryAt(40_000),
                    NextStep::Dead,
                ]
            );
        }
        // No schedule at all: the first failure is final.
        assert_eq!(
            classify(answer(500, None), &attempt(0, &[]), exact).next,
            NextStep::Dead
        );
    }

    #[test]
    fn out_of_steps_is_dead_for_every_kind_of_failure() {
        let results = [
            answer(500, None),
            answer(429, Some(S(1))),
            answer(503, Some(S(1))),
            answer(502, None),
            Err(Failure::new(Reason::Dns, "no such host")),
            Err(Failure::new(
                Reason::Timeout,
                "h:1 did not answer in time (timeout)",
            )),
        ];
        for result in results {
            let out = classify(result.clone(), &attempt(3, &SCHEDULE), exact);
            assert_eq!(out.next, NextStep::Dead, "{result:?}");
            assert_eq!(out.pause, None, "{result:?}");
            assert!(out.failure.is_some(), "{result:?}");
        }
    }

    #[test]
    fn network_errors_and_timeouts_keep_their_failure_and_never_pause() {
        for failure in [
            Failure::new(Reason::Connect, "cannot connect to h:1"),
            Failure::new(Reason::Timeout, "h:1 did not answer in time (timeout)"),
            Failure::new(Reason::Dns, "no such host"),
            Failure::new(Reason::Transport, "h:1: connection reset"),
            Failure::new(Reason::Ssrf, "h resolves to an internal address"),
        ] {
            assert_eq!(
                classify(Err(failure.clone()), &attempt(0, &SCHEDULE), exact),
                Outcome {
                    status: None,
                    failure: Some(failure),
                    next: NextStep::RetryAt(11_000),
                    pause: None,
                    gone: false,
                }
            );
        }
    }

    #[test]
    fn the_schedule_step_is_spread_and_a_retry_after_is_not() {
        let seen = std::cell::Cell::new(None);
        let double = |d: Duration| {
            seen.set(Some(d));
            d * 2
        };
        let out = classify(answer(500, None), &attempt(1, &SCHEDULE), double);
        assert_eq!(
            seen.get(),
            Some(S(5)),
            "the step for the second attempt is spread"
        );
        assert_eq!(out.next, NextStep::RetryAt(20_000));
        let out = classify(
            Err(Failure::new(Reason::Connect, "x")),
            &attempt(1, &SCHEDULE),
            double,
        );
        assert_eq!(out.next, NextStep::RetryAt(20_000));
        let out = classify(answer(429, Some(S(20))), &attempt(1, &SCHEDULE), double);
        assert_eq!(
            out.next,
            NextStep::RetryAt(30_000),
            "Retry-After as the endpoint said"
        );
    }

    #[test]
    fn huge_steps_saturate_instead_of_overflowing() {
        let forever = [Duration::MAX];
        for result in [
            answer(500, None),
            answer(503, None),
            Err(Failure::new(Reason::Connect, "x")),
        ] {
            let out = classify(result, &attempt(0, &forever), exact);
            assert_eq!(out.next, NextStep::RetryAt(i64::MAX));
        }
    }
}
