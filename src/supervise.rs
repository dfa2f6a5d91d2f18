//! Supervision of the bridge's long-lived tasks (upstream supervisors, webhook dispatchers),
//! and clock arithmetic that cannot overflow.
//!
//! A task that panics, or returns while nobody asked it to stop, would otherwise vanish
//! silently: its upstream stops being read, or its endpoint stops being delivered to, while
//! the status API still shows the last state it reported. [`supervise`] runs the task, and
//! when it ends unexpectedly logs it with the task's name, marks it failed in its
//! [`TaskHealth`] (shown in `/v1/status`, the admin API and `/metrics`), waits a backoff
//! (doubling from [`RESTART_INITIAL`] up to [`RESTART_MAX`]) and starts it again.
//!
//! Config validation bounds every duration, so no configured value can overflow a deadline;
//! [`deadline_after`] and [`unix_ms_after`] keep that true for values that come from
//! elsewhere (a peer's `Retry-After`, a stored timestamp) or a config built in code.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// First delay before restarting a failed task.
pub const RESTART_INITIAL: Duration = Duration::from_secs(1);
/// Longest delay before restarting a task that keeps failing.
pub const RESTART_MAX: Duration = Duration::from_secs(60);
/// A task that ran this long before failing starts again after [`RESTART_INITIAL`].
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Longest wait any timer of the bridge is set for: far beyond every configured duration, far
/// below what an `Instant` can hold.
pub const MAX_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);

/// The deadline `d` from now, with `d` capped at [`MAX_WAIT`] (adding an unchecked
/// `Duration` to an `Instant` panics on overflow).
pub fn deadline_after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d.min(MAX_WAIT)).unwrap_or(now)
}

/// `base_ms + d` in Unix milliseconds, saturating instead of overflowing.
pub fn unix_ms_after(base_ms: i64, d: Duration) -> i64 {
    base_ms.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Whether a supervised task is failed, and how often it was restarted.
#[derive(Debug, Default)]
pub struct TaskHealth {
    failure: Mutex<Option<String>>,
    restarts: AtomicU64,
}

impl TaskHealth {
    /// Why the task failed, while it waits to be restarted; `None` while it runs.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Restarts after a failure so far.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    fn set_failure(&self, reason: Option<String>) {
        *self
            .failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = reason;
    }
}

/// Runs `run()` until `stop` is cancelled: each time the future it returns panics or ends
/// while `stop` is not cancelled, the failure is logged (`task`, `name`, reason), recorded
/// in `health` and passed to `on_failure` (which shows it where the task's own state is
/// shown), and `run()` is called again after the backoff. Returns once `stop` is cancelled.
pub async fn supervise<F, Fut>(
    task: &'static str,
    name: Arc<str>,
    health: Arc<TaskHealth>,
    stop: CancellationToken,
    on_failure: impl Fn(&str),
    mut run: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut delay = RESTART_INITIAL;
    loop {
        let started = Instant::now();
        let outcome = AssertUnwindSafe(run()).catch_unwind().await;
        if stop.is_cancelled() {
            return;
        }
        let reason = match outcome {
            Ok(()) => "the task ended unexpectedly".to_string(),
            Err(payload) => format!("the task panicked: {}", panic_message(payload.as_ref())),
        };
        if started.elapsed() >= HEALTHY_RUN {
            delay = RESTART_INITIAL;
        }
        error!(task, name = %name, reason = %reason, restart_in_ms = delay.as_millis() as u64,
            "task failed; restarting it");
        health.set_failure(Some(reason.clone()));
        on_failure(&reason);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = delay.saturating_mul(2).min(RESTART_MAX);
        health.restarts.fetch_add(1, Ordering::Relaxed);
        health.set_failure(None);
        info!(task, name = %name, "task restarted");
    }
}

/// The message of a panic payload (`panic!` gives a `&str` or a `String`).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::sync::mpsc;

    /// A supervised task that panics on its first run and ends on its own on its second is
    /// shown failed, restarted after the backoff, and stopped by the token.
    #[tokio::test(start_paused = true)]
    async fn a_task_that_dies_is_shown_failed_then_restarted_after_the_backoff() {
        let health = Arc::new(TaskHealth::default());
        let stop = CancellationToken::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let (started_tx, mut started) = mpsc::unbounded_channel::<(usize, Instant)>();
        let (failed_tx, mut failed) = mpsc::unbounded_channel::<(String, Option<String>)>();
        let wrapper = tokio::spawn({
            let (health, stop, runs) = (health.clone(), stop.clone(), runs.clone());
            let seen_by_callback = health.clone();
            supervise(
                "test",
                Arc::from("t1"),
                health,
                stop.clone(),
                move |reason| {
                    let _ = failed_tx.send((reason.to_string(), seen_by_callback.failure()));
                },
                move || {
                    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    let _ = started_tx.send((n, Instant::now()));
                    let stop = stop.clone();
                    async move {
                        match n {
                            1 => panic!("boom {n}"),
                            2 => {}
                            _ => stop.cancelled().await,
                        }
                    }
                },
            )
        });

        let (n, t1) = started.recv().await.expect("first run");
        assert_eq!(n, 1);
        let (reason, shown) = failed.recv().await.expect("first failure");
        assert_eq!(reason, "the task panicked: boom 1");
        assert_eq!(
            shown.as_deref(),
            Some(reason.as_str()),
            "failed while waiting"
        );
        assert_eq!(health.restarts(), 0);

        let (n, t2) = started.recv().await.expect("second run");
        assert_eq!(n, 2);
        assert!(t2 - t1 >= RESTART_INITIAL, "restarted after {:?}", t2 - t1);
        assert_eq!(health.restarts(), 1);
        let (reason, _) = failed.recv().await.expect("second failure");
        assert_eq!(reason, "the task ended unexpectedly");

        let (n, t3) = started.recv().await.expect("third run");
        assert_eq!(n, 3);
        assert!(
            t3 - t2 >= RESTART_INITIAL * 2,
            "the backoff doubles: {:?}",
            t3 - t2
        );
        assert_eq!(health.restarts(), 2);
        assert_eq!(health.failure(), None, "running again");

        stop.cancel();
        wrapper.await.expect("the wrapper returns once stopped");
        assert_eq!(runs.load(Ordering::SeqCst), 3, "no restart after the stop");
        assert!(failed.try_recv().is_err(), "a stop is not a failure");
    }

    #[test]
    fn clock_arithmetic_saturates() {
        let far = deadline_after(Duration::MAX);
        assert!(far > Instant::now());
        assert_eq!(unix_ms_after(i64::MAX - 1, Duration::MAX), i64::MAX);
        assert_eq!(unix_ms_after(1_000, Duration::from_millis(5)), 1_005);
    }
}
