//! One endpoint's dispatcher: it asks the store for due deliveries of its endpoint (never more
//! than `max_in_flight` at once, never one it has in flight), starts each as an attempt on its
//! own task, and sleeps until something changes: an attempt finished, ingest enqueued new
//! events, an admin replayed or re-enabled, or the next retry falls due. Ordering (`ordered`)
//! is the store's: it offers a subject's delivery only once no older one of it is pending.
//! Endpoints share nothing but the store, so a dead or slow endpoint only ever fills its own
//! in-flight slots; the others and ingest carry on (isolation: docs/architecture.md,
//! "Invariants").

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use super::attempt::attempt;
use super::service::Endpoint;
use crate::storage::Store;

/// How often a dispatcher re-reads its endpoint's state from a shared store.
const SHARED_STATE_EVERY: Duration = Duration::from_secs(1);

/// What an attempt tells its dispatcher: twice, once its request is answered (the slot is
/// free, the outcome is being recorded) and once the outcome is recorded (`settled`).
pub(super) struct Finished {
    pub(super) seq: u64,
    /// Pause the whole endpoint until then (429/5xx slow-down).
    pub(super) pause_until: Option<Instant>,
    /// The endpoint answered 410 Gone.
    pub(super) gone: bool,
    /// The outcome is in the store: the delivery may be handed out again if still due.
    pub(super) settled: bool,
}

impl Finished {
    /// The second report: `seq`'s outcome is recorded.
    pub(super) fn settled(seq: u64) -> Finished {
        Finished {
            seq,
            pause_until: None,
            gone: false,
            settled: true,
        }
    }
}

/// A simple token bucket for `max_per_second`.
struct RateLimit {
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    fn new(per_second: u32) -> Self {
        RateLimit {
            per_second: f64::from(per_second),
            tokens: f64::from(per_second),
            last: Instant::now(),
        }
    }

    /// Takes a token, or says how long until one is available.
    fn take(&mut self) -> Result<(), Duration> {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.per_second)
            .min(self.per_second);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.per_second,
            ))
        }
    }
}

/// Runs `endpoint`'s dispatcher until `shutdown`; its attempts run on `attempts` (the
/// service's, for shutdown) and `own_attempts` (this dispatcher's).
pub(super) async fn dispatch(
    endpoint: Arc<Endpoint>,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
    attempts: tokio_util::task::TaskTracker,
    own_attempts: tokio_util::task::TaskTracker,
) {
    let name = endpoint.name.clone();
    let max = endpoint.config.max_in_flight;
    let mut in_flight: HashSet<u64> = HashSet::new();
    // Answered, their outcome being recorded: still pending in the store, not handed out
    // again until recorded. At most `max` (the dispatcher starts nothing while more wait).
    let mut settling: HashSet<u64> = HashSet::new();
    let (done_tx, mut done_rx) = mpsc::channel::<Finished>(max.saturating_mul(2));
    let mut paused_until: Option<Instant> = None;
    let mut rate = endpoint.config.max_per_second.map(RateLimit::new);
    let mut store_backoff = Duration::from_millis(100);
    let mut state_read = Instant::now();
    loop {
        let now = Instant::now();
        let mut wake_at: Option<Instant> = None;
        if store.shared() {
            // Another instance may disable (410) or re-enable the endpoint: re-read its state
            // now and then, and never sleep longer than that.
            if now.duration_since(state_read) >= SHARED_STATE_EVERY {
                state_read = now;
                match store.disabled(&name).await {
                    Ok(reason) => endpoint.set_disabled(reason),
                    Err(e) => {
                        debug!(webhook = %name, error = %e, "cannot re-read the endpoint's state")
                    }
                }
            }
            wake_at = Some(now + SHARED_STATE_EVERY);
        }
        let paused = paused_until.is_some_and(|p| p > now);
        if let (true, Some(p)) = (paused, paused_until) {
            wake_at = Some(wake_at.map_or(p, |w| w.min(p)));
        }
        let disabled = endpoint.disabled_reason().is_some();
        // Refill in batches: each `due` query reads up to `max + in_flight` rows (bodies
        // included) to skip the ones in flight, so querying after every single completion
        // cost O(max) per delivery and was what bounded the webhook benchmark (issue 8).
        // Waiting for an eighth of the slots to free up costs a few completions of latency
        // at most; with nothing in flight (a quiet endpoint) it queries at once.
        let refill = (max / 8).max(1);
        if !disabled
            && !paused
            && settling.len() <= max
            && (in_flight.is_empty() || in_flight.len() + refill <= max)
        {
            let now_ms = Utc::now().timestamp_millis();
            // In-flight and settling rows are still pending in the store: ask for enough to
            // skip them.
            match store
                .due(
                    &name,
                    now_ms,
                    max + in_flight.len() + settling.len(),
                    endpoint.config.ordered,
                )
                .await
            {
                Ok(due) => {
                    store_backoff = Duration::from_millis(100);
                    let mut due = due.into_iter();
                    let mut not_taken = Vec::new();
                    for d in due.by_ref() {
                        if in_flight.len() >= max {
                            not_taken.push(d.seq);
                            break;
                        }
                        if in_flight.contains(&d.seq) || settling.contains(&d.seq) {
                            // Running here still (its outcome not yet read): the store offers
                            // it again later if it holds it.
                            not_taken.push(d.seq);
                            continue;
                        }
                        if let Some(limit) = rate.as_mut() {
                            if let Err(wait) = limit.take() {
                                wake_at = Some(wake_at.map_or(now + wait, |w| w.min(now + wait)));
                                not_taken.push(d.seq);
                                break;
                            }
                        }
                        in_flight.insert(d.seq);
                        endpoint
                            .stats
                            .in_flight
                            .store(in_flight.len() as u64, Ordering::Relaxed);
                        attempts.spawn(own_attempts.track_future(attempt(
                            endpoint.clone(),
                            store.clone(),
                            d,
                            done_tx.clone(),
                        )));
                    }
                    not_taken.extend(due.map(|d| d.seq));
                    if !not_taken.is_empty() {
                        store.release(&name, &not_taken).await;
                    }
                    // Sleep until the next retry falls due (rows due now are either in
                    // flight, waiting behind an older one of their subject, or rate limited,
                    // and all of those wake us otherwise).
                    match store.next_due(&name, now_ms).await {
                        Ok(Some(at_ms)) => {
                            let wait = Duration::from_millis(
                                u64::try_from(at_ms.saturating_sub(now_ms)).unwrap_or(0),
                            );
                            let at = now
                                .checked_add(wait.min(crate::supervise::MAX_WAIT))
                                .unwrap_or(now);
                            wake_at = Some(wake_at.map_or(at, |w| w.min(at)));
                        }
                        Ok(None) => {}
                        Err(e) => {
                            warn!(webhook = %name, error = %e, "cannot read the next due time")
                        }
                    }
                }
                Err(e) => {
                    error!(webhook = %name, error = %e, "cannot read due deliveries; retrying");
                    wake_at = Some(now + store_backoff);
                    store_backoff = (store_backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        let sleep = async {
            match wake_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(done) = done_rx.recv() => {
                // Take every completion already reported, so one `due` query refills for all.
                let mut more = Vec::new();
                while let Ok(d) = done_rx.try_recv() {
                    more.push(d);
                }
                for done in std::iter::once(done).chain(more) {
                // An attempt that ended without its first report (it panicked) settles
                // from in flight directly.
                let was_in_flight = in_flight.remove(&done.seq);
                if done.settled {
                    settling.remove(&done.seq);
                } else if was_in_flight {
                    settling.insert(done.seq);
                }
                endpoint.stats.in_flight.store(in_flight.len() as u64, Ordering::Relaxed);
                if let Some(until) = done.pause_until {
                    paused_until = Some(paused_until.map_or(until, |p| p.max(until)));
                }
                if done.gone && endpoint.disabled_reason().is_none() {
                    let reason = "the endpoint answered 410 Gone".to_string();
                    warn!(webhook = %name, "endpoint answered 410 Gone: disabled until an admin re-enables it");
                    if let Err(e) = store.set_disabled(&name, Some(reason.clone())).await {
                        error!(webhook = %name, error = %e, "cannot persist the disabled state");
                    }
                    endpoint.set_disabled(Some(reason));
                }
                }
            }
            _ = endpoint.wake.notified() => {}
            _ = sleep => {}
            _ = shutdown.cancelled() => break,
        }
    }
    debug!(webhook = %name, in_flight = in_flight.len(), "dispatcher stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_limit_spaces_attempts_and_refills_with_time() {
        let mut r = RateLimit::new(2);
        assert!(r.take().is_ok());
        assert!(r.take().is_ok());
        assert_eq!(
            r.take(),
            Err(Duration::from_millis(500)),
            "the burst is spent"
        );
        tokio::time::advance(Duration::from_millis(250)).await;
        assert_eq!(
            r.take(),
            Err(Duration::from_millis(250)),
            "half a token back"
        );
        tokio::time::advance(Duration::from_millis(250)).await;
        assert!(r.take().is_ok(), "one token after 500 ms");
        assert!(r.take().is_err());
        // A long idle refills to the burst size, never beyond it.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(r.take().is_ok());
        assert!(r.take().is_ok());
        assert!(r.take().is_err());
    }
}
