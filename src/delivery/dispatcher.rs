//! One endpoint's dispatcher: it takes due deliveries from its endpoint's queue
//! ([`DeliveryQueue`], from the store once when it starts), never more than `max_in_flight`
//! attempts at once, starts each as an attempt on its own task, and sleeps until something
//! changes: an attempt finished, ingest enqueued new events, an admin replayed or re-enabled,
//! or the next retry falls due. The queue never hands out a delivery it holds (one handed out
//! and not yet answered), so the dispatcher keeps no list of what runs, only a count: an
//! attempt's slot is free once the receiver answered, while its delivery stays held until
//! the outcome is recorded. Ordering (`ordered`) is the queue's: it offers a subject's
//! delivery only once no older one of it is pending.
//! Endpoints share nothing but the store, so a dead or slow endpoint only ever fills its own
//! in-flight slots; the others and ingest carry on (isolation: docs/architecture.md,
//! "Invariants").

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use super::attempt::attempt;
use super::config::WebhookConfig;
use super::service::Endpoint;
use crate::storage::{DeliveryQueue, QueueOptions, Store};

/// How often a dispatcher re-reads its endpoint's state from a shared store.
const SHARED_STATE_EVERY: Duration = Duration::from_secs(1);

/// What an attempt tells its dispatcher: twice, once its request is answered (the slot is
/// free, the outcome is being recorded) and once the outcome is recorded (the queue no longer
/// holds the delivery: it may be due again, so the dispatcher looks).
pub(super) struct Finished {
    /// The attempt's in-flight slot is free: its request was answered (the first report), or
    /// it ended without that report (it panicked).
    pub(super) frees_slot: bool,
    /// Pause the whole endpoint until then (429/5xx slow-down).
    pub(super) pause_until: Option<Instant>,
    /// The endpoint answered 410 Gone.
    pub(super) gone: bool,
}

impl Finished {
    /// The second report: the outcome is recorded.
    pub(super) fn recorded() -> Finished {
        Finished {
            frees_slot: false,
            pause_until: None,
            gone: false,
        }
    }
}

/// How the dispatcher's queue is set up from the endpoint's settings.
fn queue_options(config: &WebhookConfig) -> QueueOptions {
    QueueOptions {
        ordered: config.ordered,
        // An attempt may run for `timeout`; a shared store must not hand the delivery to
        // another instance meanwhile.
        ack_wait: config
            .timeout
            .saturating_mul(2)
            .saturating_add(Duration::from_secs(10)),
        // `max_in_flight` running plus as many answered whose outcome is being recorded:
        // beyond that the queue hands out nothing until the store catches up.
        max_held: config.max_in_flight.saturating_mul(2),
    }
}

/// The endpoint's queue, asked of the store until it answers (a NATS server unreachable at
/// start), with backoff; `None` once `shutdown` is cancelled.
async fn open_queue(
    endpoint: &Endpoint,
    store: &dyn Store,
    shutdown: &CancellationToken,
) -> Option<Arc<dyn DeliveryQueue>> {
    let options = queue_options(&endpoint.config);
    let mut backoff = Duration::from_millis(100);
    loop {
        match store.delivery_queue(&endpoint.name, options).await {
            Ok(queue) => return Some(queue),
            Err(e) => {
                error!(webhook = %endpoint.name, error = %e, retry_ms = backoff.as_millis() as u64,
                    "cannot set up the endpoint's queue; retrying");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled() => return None,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
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
    let Some(queue) = open_queue(&endpoint, store.as_ref(), &shutdown).await else {
        return;
    };
    // Attempts whose request has not been answered yet: at most `max`.
    let mut running = 0usize;
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
        // Refill in batches: a `due` query reads past the rows the queue holds (bodies
        // included), so querying after every single completion cost O(max) per delivery and
        // was what bounded the webhook benchmark (issue 8). Waiting for an eighth of the
        // slots to free up costs a few completions of latency at most; with nothing running
        // (a quiet endpoint) it queries at once.
        let refill = (max / 8).max(1);
        if !disabled && !paused && (running == 0 || running + refill <= max) {
            let now_ms = Utc::now().timestamp_millis();
            match queue.due(now_ms, max.saturating_sub(running)).await {
                Ok(due) => {
                    store_backoff = Duration::from_millis(100);
                    for d in due {
                        if running >= max {
                            // Not started: dropping the handle releases it.
                            break;
                        }
                        if let Some(limit) = rate.as_mut() {
                            if let Err(wait) = limit.take() {
                                wake_at = Some(wake_at.map_or(now + wait, |w| w.min(now + wait)));
                                // This one and the rest are released, offered again later.
                                break;
                            }
                        }
                        running += 1;
                        endpoint
                            .stats
                            .in_flight
                            .store(running as u64, Ordering::Relaxed);
                        attempts.spawn(own_attempts.track_future(attempt(
                            endpoint.clone(),
                            queue.clone(),
                            d,
                            done_tx.clone(),
                        )));
                    }
                    // Sleep until the next retry falls due (deliveries due now are either
                    // running, waiting behind an older one of their subject, or rate limited,
                    // and all of those wake us otherwise).
                    match queue.next_due(now_ms).await {
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
                if done.frees_slot {
                    running = running.saturating_sub(1);
                    endpoint.stats.in_flight.store(running as u64, Ordering::Relaxed);
                }
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
    debug!(webhook = %name, in_flight = running, "dispatcher stopped");
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
