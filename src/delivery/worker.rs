//! The delivery engine: one dispatcher task per webhook endpoint, attempts as tasks.
//!
//! A dispatcher asks the store for due deliveries of its endpoint (never more than
//! `max_in_flight` at once), sends each as a signed POST on its own task, records the outcome
//! in the store, and sleeps until something changes: an attempt finished, ingest enqueued new
//! events, an admin replayed or re-enabled, or the next retry falls due. Endpoints share
//! nothing but the store, so a dead or slow endpoint only ever fills its own in-flight slots;
//! the others and ingest carry on (isolation: docs/architecture.md, "Invariants").
//!
//! Outcome of an attempt (a contract: README, "Webhook delivery"):
//! - 2xx: delivered (the row is removed);
//! - 410 Gone: the endpoint is disabled until an admin re-enables it; the delivery stays
//!   pending and goes out after re-enabling;
//! - 429/503 with `Retry-After`: retried no sooner than it says (clamped to an hour), and the
//!   whole endpoint pauses that long; 429/502/503/504 without it pause the endpoint until the
//!   scheduled retry ("slow down");
//! - anything else, timeouts and connection errors: retried after the next `retry` delay
//!   (±20 % jitter); once the schedule is exhausted the delivery is dead-lettered.
//!
//! A delivery in flight when the process dies is still pending in the store and is sent
//! again after restart: at-least-once, same `webhook-id`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use serde::Serialize;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::config::{Mode, WebhookConfig};
use super::signing::{Signer, HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP};
use super::ssrf;
use crate::envelope::{StoredEnvelope, CLOUDEVENTS_JSON};
use crate::failure::{Failure, Reason, ReasonCounts};
use crate::storage::{AttemptRecord, DueDelivery, NextStep, Store};
use crate::supervise::{deadline_after, unix_ms_after, TaskHealth};

/// How often a dispatcher re-reads its endpoint's state from a shared store.
const SHARED_STATE_EVERY: Duration = Duration::from_secs(1);

/// Longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Why the delivery engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// An endpoint's secrets are unusable (normally caught by config validation).
    #[error("webhook {name}: {reason}")]
    Endpoint {
        /// The endpoint.
        name: String,
        /// Why.
        reason: String,
    },
}

/// Live counters of one endpoint.
#[derive(Debug, Default)]
pub struct EndpointStats {
    in_flight: AtomicU64,
    delivered: AtomicU64,
    failed_attempts: AtomicU64,
    dead_lettered: AtomicU64,
}

/// Plain-number copy of [`EndpointStats`].
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct EndpointCounters {
    /// Attempts running now.
    pub in_flight: u64,
    /// Deliveries completed since start.
    pub delivered: u64,
    /// Attempts that failed since start.
    pub failed_attempts: u64,
    /// Deliveries dead-lettered since start.
    pub dead_lettered: u64,
    /// Restarts of the endpoint's dispatcher task after it died.
    pub dispatcher_restarts: u64,
}

/// Everything a dispatcher and its attempts share.
struct Endpoint {
    name: Arc<str>,
    /// Attempt durations (shared family; this endpoint's series).
    latency: prometheus_client::metrics::histogram::Histogram,
    config: WebhookConfig,
    signer: Signer,
    client: reqwest::Client,
    static_headers: reqwest::header::HeaderMap,
    wake: Notify,
    /// `Some(reason)` while disabled by a 410.
    disabled: Mutex<Option<String>>,
    stats: EndpointStats,
    /// The dispatcher task's health (failed, restarts).
    health: Arc<TaskHealth>,
    /// Failed attempts per reason.
    failures: ReasonCounts,
    /// The last failed attempt's failure and when it started (unix ms), until a delivery
    /// succeeds.
    last_failure: Mutex<Option<(Failure, i64)>>,
}

impl Endpoint {
    fn set_last_failure(&self, failure: Option<(Failure, i64)>) {
        if let Ok(mut last) = self.last_failure.lock() {
            *last = failure;
        }
    }

    fn disabled_reason(&self) -> Option<String> {
        self.disabled.lock().map(|d| d.clone()).unwrap_or(None)
    }

    fn set_disabled(&self, reason: Option<String>) {
        if let Ok(mut d) = self.disabled.lock() {
            *d = reason;
        }
    }
}

/// The running delivery engine: one dispatcher per configured endpoint. The set of endpoints
/// can change at runtime ([`DeliveryService::reconcile`], used by hot reload).
pub struct DeliveryService {
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
    endpoints: RwLock<HashMap<Arc<str>, Running>>,
    /// Every attempt in flight, so shutdown can let them finish within a grace period.
    attempts: tokio_util::task::TaskTracker,
    /// Attempt latency per endpoint, for `/metrics`.
    latency: LatencyFamily,
}

/// Attempt latency histograms, one series per endpoint (`webhook` label).
pub type LatencyFamily = prometheus_client::metrics::family::Family<
    Vec<(String, String)>,
    prometheus_client::metrics::histogram::Histogram,
    fn() -> prometheus_client::metrics::histogram::Histogram,
>;

fn latency_histogram() -> prometheus_client::metrics::histogram::Histogram {
    // 1 ms .. ~16 s.
    prometheus_client::metrics::histogram::Histogram::new(
        prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15),
    )
}

/// One endpoint's dispatcher.
struct Running {
    endpoint: Arc<Endpoint>,
    stop: CancellationToken,
    task: JoinHandle<()>,
    /// This dispatcher's attempts (also tracked by the service-wide tracker for shutdown).
    in_flight: tokio_util::task::TaskTracker,
}

/// What the admin API shows of one endpoint.
#[derive(Clone, Debug, Serialize)]
pub struct EndpointView {
    /// The endpoint's name.
    pub name: String,
    /// The URL without credentials.
    pub url: String,
    /// False after a 410 until an admin re-enables it.
    pub enabled: bool,
    /// Why it is disabled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<String>,
    /// `running`, or `failed` while its dead dispatcher task waits to be restarted.
    pub dispatcher: &'static str,
    /// Why the dispatcher task died, while it is `failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dispatcher_error: Option<String>,
    /// The last failed attempt's error, until a delivery succeeds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Its reason (`dns`, `refused`, `timeout`, `tls_unknown_issuer`, `http_status`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error_reason: Option<Reason>,
    /// When that attempt started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error_at: Option<chrono::DateTime<Utc>>,
    /// Failed attempts since start, per reason (reasons not seen left out).
    #[serde(serialize_with = "ser_reason_counts")]
    pub failures_by_reason: Vec<(Reason, u64)>,
    /// Live counters.
    #[serde(flatten)]
    pub counters: EndpointCounters,
}

/// Ingest wakes an endpoint's dispatcher through this after committing its new deliveries.
impl crate::ingest::Wake for DeliveryService {
    fn wake(&self, endpoint: &str) {
        DeliveryService::wake(self, endpoint);
    }
}

impl DeliveryService {
    /// Starts a dispatcher for every endpoint. Endpoints disabled before a restart stay
    /// disabled.
    pub async fn start(
        webhooks: &[WebhookConfig],
        store: Arc<dyn Store>,
        shutdown: CancellationToken,
    ) -> Result<DeliveryService, DeliveryError> {
        let service = DeliveryService {
            store,
            shutdown,
            endpoints: RwLock::new(HashMap::new()),
            attempts: tokio_util::task::TaskTracker::new(),
            latency: LatencyFamily::new_with_constructor(latency_histogram),
        };
        service.reconcile(webhooks).await?;
        Ok(service)
    }

    /// Makes the running endpoints match `webhooks`: new ones start, removed ones stop,
    /// changed ones restart with their new settings, unchanged ones are left alone. Pending
    /// deliveries stay in the store throughout (a removed endpoint's resume if it comes back).
    /// Every new endpoint is built before anything is stopped, so an error changes nothing.
    /// Returns a line per change.
    pub async fn reconcile(
        &self,
        webhooks: &[WebhookConfig],
    ) -> Result<Vec<String>, DeliveryError> {
        let mut fresh = Vec::new();
        for config in webhooks {
            let same = self
                .read()
                .get(config.name.as_str())
                .is_some_and(|r| r.endpoint.config == *config);
            if !same {
                let latency = self
                    .latency
                    .get_or_create(&vec![("webhook".to_string(), config.name.clone())])
                    .clone();
                fresh.push(build_endpoint(config, self.store.as_ref(), latency).await?);
            }
        }
        let mut changes = Vec::new();
        let mut stopped = Vec::new();
        {
            let mut map = self.write();
            let wanted: Vec<&str> = webhooks.iter().map(|w| w.name.as_str()).collect();
            let gone: Vec<Arc<str>> = map
                .keys()
                .filter(|k| !wanted.contains(&k.as_ref()))
                .cloned()
                .collect();
            for name in gone {
                if let Some(r) = map.remove(&name) {
                    changes.push(format!("webhook {name}: removed"));
                    stopped.push(r);
                }
            }
            for endpoint in fresh {
                let stop = self.shutdown.child_token();
                let in_flight = tokio_util::task::TaskTracker::new();
                let name = endpoint.name.clone();
                // An updated endpoint's new dispatcher starts once the old one has stopped and
                // its attempts have finished: otherwise both would send the rows the old one
                // has in flight (a duplicate, and for `ordered` an overtaking).
                let predecessor = map.remove(&name).map(|old| {
                    changes.push(format!("webhook {name}: updated"));
                    old.stop.cancel();
                    (old.task, old.in_flight)
                });
                if predecessor.is_none() {
                    changes.push(format!("webhook {name}: added"));
                }
                let run = {
                    let (endpoint, store, stop, attempts, in_flight) = (
                        endpoint.clone(),
                        self.store.clone(),
                        stop.clone(),
                        self.attempts.clone(),
                        in_flight.clone(),
                    );
                    move || {
                        let (endpoint, store, stop, attempts, in_flight) = (
                            endpoint.clone(),
                            store.clone(),
                            stop.clone(),
                            attempts.clone(),
                            in_flight.clone(),
                        );
                        async move {
                            // A restarted dispatcher first lets its predecessor's attempts
                            // finish: it would send the rows they hold again otherwise.
                            in_flight.close();
                            tokio::select! {
                                _ = in_flight.wait() => {}
                                _ = stop.cancelled() => return,
                            }
                            in_flight.reopen();
                            dispatch(endpoint, store, stop, attempts, in_flight).await;
                        }
                    }
                };
                let run = crate::supervise::supervise(
                    "webhook",
                    name.clone(),
                    endpoint.health.clone(),
                    stop.clone(),
                    |_| {},
                    run,
                );
                let wait_stop = stop.clone();
                let task = tokio::spawn(async move {
                    if let Some((old_task, old_in_flight)) = predecessor {
                        let drained = async {
                            let _ = old_task.await;
                            old_in_flight.close();
                            old_in_flight.wait().await;
                        };
                        tokio::select! {
                            _ = drained => {}
                            _ = wait_stop.cancelled() => return,
                        }
                    }
                    run.await;
                });
                map.insert(
                    name,
                    Running {
                        endpoint,
                        stop,
                        task,
                        in_flight,
                    },
                );
            }
        }
        for r in stopped {
            r.stop.cancel();
            let _ = r.task.await;
        }
        Ok(changes)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Arc<str>, Running>> {
        self.endpoints
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<Arc<str>, Running>> {
        self.endpoints
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Tells an endpoint's dispatcher that it has new work (new events, a replay).
    pub fn wake(&self, endpoint: &str) {
        if let Some(r) = self.read().get(endpoint) {
            r.endpoint.wake.notify_one();
        }
    }

    /// The attempt-latency histograms, for `/metrics`.
    pub fn latency(&self) -> &LatencyFamily {
        &self.latency
    }

    /// Whether `name` is a configured endpoint.
    pub fn has(&self, name: &str) -> bool {
        self.read().contains_key(name)
    }

    /// Re-enables an endpoint disabled by a 410 and wakes it; false for an unknown name.
    pub async fn enable(
        &self,
        name: &str,
        store: &dyn Store,
    ) -> Result<bool, crate::storage::StoreError> {
        let Some(endpoint) = self.read().get(name).map(|r| r.endpoint.clone()) else {
            return Ok(false);
        };
        store.set_disabled(name, None).await?;
        endpoint.set_disabled(None);
        info!(webhook = %name, "endpoint re-enabled");
        endpoint.wake.notify_one();
        Ok(true)
    }

    /// Every endpoint's state, in name order.
    pub fn views(&self) -> Vec<EndpointView> {
        let mut out: Vec<EndpointView> = self
            .read()
            .values()
            .map(|r| {
                let e = &r.endpoint;
                let reason = e.disabled_reason();
                let mut url = e.config.url.clone();
                let _ = url.set_username("");
                let _ = url.set_password(None);
                let failure = e.health.failure();
                let last = e.last_failure.lock().ok().and_then(|l| l.clone());
                EndpointView {
                    name: e.name.to_string(),
                    url: url.to_string(),
                    enabled: reason.is_none(),
                    disabled_reason: reason,
                    dispatcher: if failure.is_some() {
                        "failed"
                    } else {
                        "running"
                    },
                    dispatcher_error: failure,
                    last_error_reason: last.as_ref().map(|(f, _)| f.reason),
                    last_error_at: last
                        .as_ref()
                        .and_then(|(_, at)| chrono::DateTime::from_timestamp_millis(*at)),
                    last_error: last.map(|(f, _)| f.message),
                    failures_by_reason: e.failures.snapshot(),
                    counters: EndpointCounters {
                        in_flight: e.stats.in_flight.load(Ordering::Relaxed),
                        delivered: e.stats.delivered.load(Ordering::Relaxed),
                        failed_attempts: e.stats.failed_attempts.load(Ordering::Relaxed),
                        dead_lettered: e.stats.dead_lettered.load(Ordering::Relaxed),
                        dispatcher_restarts: e.health.restarts(),
                    },
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Waits for every dispatcher to stop (after the shutdown token is cancelled), then for
    /// the attempts in flight, at most `grace`: an attempt cut short stays pending in the
    /// store and is sent again after the restart. Returns how many were cut short.
    pub async fn join(&self, grace: Duration) -> usize {
        let running: Vec<Running> = self.write().drain().map(|(_, r)| r).collect();
        for r in running {
            let _ = r.task.await;
        }
        self.attempts.close();
        if tokio::time::timeout(grace, self.attempts.wait())
            .await
            .is_err()
        {
            let left = self.attempts.len();
            warn!(in_flight = left, grace_ms = grace.as_millis() as u64, "webhook attempts still in flight after the grace period; they will be retried after restart");
            return left;
        }
        0
    }
}

fn ser_reason_counts<S: serde::Serializer>(
    counts: &[(Reason, u64)],
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(counts.len()))?;
    for (reason, n) in counts {
        map.serialize_entry(reason.as_str(), n)?;
    }
    map.end()
}

/// Builds an endpoint (client, signer, headers, persisted disabled state) from its config.
async fn build_endpoint(
    config: &WebhookConfig,
    store: &dyn Store,
    latency: prometheus_client::metrics::histogram::Histogram,
) -> Result<Arc<Endpoint>, DeliveryError> {
    let fail = |reason: String| DeliveryError::Endpoint {
        name: config.name.clone(),
        reason,
    };
    let signer = config.signer().map_err(|e| fail(e.to_string()))?;
    let mut builder = reqwest::Client::builder()
        .timeout(config.timeout)
        .connect_timeout(config.timeout.min(Duration::from_secs(10)))
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(config.max_in_flight)
        .user_agent(concat!("wsbridge/", env!("CARGO_PKG_VERSION")));
    if !config.allow_private {
        // The SSRF guard: names are resolved and checked by the client's own resolver, so it
        // connects to exactly the addresses that were checked. Directly: through an HTTP
        // proxy (`HTTPS_PROXY` and the like) the proxy would resolve the name itself and the
        // check would mean nothing.
        builder = builder.dns_resolver(ssrf::GuardedResolver).no_proxy();
    } else {
        // The system resolver, with its failures reported as such (reason `dns`).
        builder = builder.dns_resolver(ssrf::SystemResolver);
    }
    if config.url.scheme() == "https" {
        // The bridge's one trust policy (the machine's store, `tls_ca`, a client
        // certificate, `tls_server_name`), not the HTTP client's own.
        let mut tls = config
            .tls
            .client_config(&format!("webhook {}", config.name))
            .map_err(|e| fail(e.to_string()))?;
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        builder = builder.tls_backend_preconfigured(tls);
    }
    let client = builder
        .build()
        .map_err(|e| fail(format!("HTTP client: {e}")))?;
    let mut static_headers = reqwest::header::HeaderMap::new();
    for (k, v) in &config.headers {
        let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
            .map_err(|e| fail(format!("header {k:?}: {e}")))?;
        let mut value = reqwest::header::HeaderValue::from_str(v.expose())
            .map_err(|_| fail(format!("header {k:?}: bad value")))?;
        value.set_sensitive(true);
        static_headers.insert(name, value);
    }
    // An attempt may run for `timeout`; a shared store must not hand the delivery to another
    // instance meanwhile.
    let ack_wait = config
        .timeout
        .saturating_mul(2)
        .saturating_add(Duration::from_secs(10));
    if let Err(e) = store
        .prepare_endpoint(&config.name, config.ordered, ack_wait)
        .await
    {
        error!(webhook = %config.name, error = %e, "cannot set up the endpoint's queue; retried on first use");
    }
    let disabled = store.disabled(&config.name).await.unwrap_or_else(|e| {
        error!(webhook = %config.name, error = %e, "cannot read endpoint state; assuming enabled");
        None
    });
    Ok(Arc::new(Endpoint {
        name: Arc::from(config.name.as_str()),
        latency,
        config: config.clone(),
        signer,
        client,
        static_headers,
        wake: Notify::new(),
        disabled: Mutex::new(disabled),
        stats: EndpointStats::default(),
        health: Arc::new(TaskHealth::default()),
        failures: ReasonCounts::default(),
        last_failure: Mutex::new(None),
    }))
}

/// What an attempt tells its dispatcher.
struct Finished {
    seq: u64,
    /// Pause the whole endpoint until then (429/5xx slow-down).
    pause_until: Option<Instant>,
    /// The endpoint answered 410 Gone.
    gone: bool,
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

async fn dispatch(
    endpoint: Arc<Endpoint>,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
    attempts: tokio_util::task::TaskTracker,
    own_attempts: tokio_util::task::TaskTracker,
) {
    let name = endpoint.name.clone();
    let max = endpoint.config.max_in_flight;
    let mut in_flight: HashSet<u64> = HashSet::new();
    let (done_tx, mut done_rx) = mpsc::channel::<Finished>(max);
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
        if !disabled && !paused && (in_flight.is_empty() || in_flight.len() + refill <= max) {
            let now_ms = Utc::now().timestamp_millis();
            // In-flight rows are still pending in the store: ask for enough to skip them.
            match store
                .due(
                    &name,
                    now_ms,
                    max + in_flight.len(),
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
                        if in_flight.contains(&d.seq) {
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
                in_flight.remove(&done.seq);
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

/// Frees an attempt's in-flight slot however the attempt ends: a panicking attempt that never
/// told its dispatcher held the slot for good. The delivery stays pending (its outcome was
/// not recorded) and the endpoint pauses a second, so a delivery that always panics is not
/// retried in a hot loop.
struct SlotGuard {
    webhook: Arc<str>,
    seq: u64,
    done: Option<mpsc::Sender<Finished>>,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            if std::thread::panicking() {
                error!(webhook = %self.webhook, seq = self.seq, "delivery attempt panicked; the delivery stays pending");
            }
            let _ = done.try_send(Finished {
                seq: self.seq,
                pause_until: Some(deadline_after(Duration::from_secs(1))),
                gone: false,
            });
        }
    }
}

/// Sends one delivery, records the outcome, tells the dispatcher.
async fn attempt(
    endpoint: Arc<Endpoint>,
    store: Arc<dyn Store>,
    due: DueDelivery,
    done: mpsc::Sender<Finished>,
) {
    let mut guard = SlotGuard {
        webhook: endpoint.name.clone(),
        seq: due.seq,
        done: Some(done),
    };
    let name = &endpoint.name;
    let started_ms = Utc::now().timestamp_millis();
    let t0 = Instant::now();
    let result = send(&endpoint, &due).await;
    let elapsed = t0.elapsed();
    endpoint.latency.observe(elapsed.as_secs_f64());
    let duration_ms = elapsed.as_millis() as u64;
    let attempts_after = due.attempts + 1;
    let schedule = &endpoint.config.retry;
    let scheduled = schedule.get(due.attempts as usize).map(|d| jitter(*d));
    let mut finished = Finished {
        seq: due.seq,
        pause_until: None,
        gone: false,
    };
    let (status, failure, next) = match result {
        Ok(Response { status, .. }) if (200..300).contains(&status) => {
            (Some(status), None, NextStep::Delivered)
        }
        Ok(Response { status: 410, .. }) => {
            finished.gone = true;
            // Stays pending and due: it goes out as soon as the endpoint is re-enabled.
            (
                Some(410),
                Some(Failure::new(
                    Reason::HttpStatus,
                    "410 Gone: endpoint disabled",
                )),
                NextStep::HoldUntil(started_ms),
            )
        }
        Ok(Response {
            status,
            retry_after,
        }) => {
            let plan = after_refusal(
                status,
                retry_after,
                scheduled,
                attempts_after as usize <= schedule.len(),
                (started_ms, elapsed),
                Utc::now().timestamp_millis(),
            );
            finished.pause_until = plan.pause.map(deadline_after);
            let next = plan.next;
            (
                Some(status),
                Some(Failure::new(Reason::HttpStatus, format!("HTTP {status}"))),
                next,
            )
        }
        Err(reason) => {
            let next = match scheduled {
                Some(delay) => {
                    NextStep::RetryAt(unix_ms_after(Utc::now().timestamp_millis(), delay))
                }
                None => NextStep::Dead,
            };
            (None, Some(reason), next)
        }
    };
    if let Some(f) = &failure {
        endpoint.failures.count(f.reason);
    }
    endpoint.set_last_failure(failure.clone().map(|f| (f, started_ms)));
    // Recorded and shown as `reason: message`, so the admin API's attempt list says why.
    let error = failure.map(|f| format!("{}: {}", f.reason, f.message));
    match next {
        NextStep::Delivered => {
            endpoint.stats.delivered.fetch_add(1, Ordering::Relaxed);
            debug!(webhook = %name, seq = due.seq, id = %due.id, duration_ms, "delivered");
        }
        NextStep::Dead => {
            endpoint
                .stats
                .failed_attempts
                .fetch_add(1, Ordering::Relaxed);
            endpoint.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            warn!(webhook = %name, seq = due.seq, id = %due.id, attempts = attempts_after, error = error.as_deref().unwrap_or(""), "delivery dead-lettered");
        }
        NextStep::HoldUntil(_) => {
            endpoint
                .stats
                .failed_attempts
                .fetch_add(1, Ordering::Relaxed);
            info!(webhook = %name, seq = due.seq, id = %due.id, "endpoint answered 410 Gone; the delivery waits until it is re-enabled");
        }
        NextStep::RetryAt(at) => {
            endpoint
                .stats
                .failed_attempts
                .fetch_add(1, Ordering::Relaxed);
            info!(webhook = %name, seq = due.seq, id = %due.id, attempt = attempts_after,
                error = error.as_deref().unwrap_or(""), retry_in_ms = at.saturating_sub(Utc::now().timestamp_millis()), "delivery failed; will retry");
        }
    }
    let record = AttemptRecord {
        at_ms: started_ms,
        status,
        error,
        duration_ms,
    };
    if let Err(e) = store.record(name, due.seq, record, next).await {
        // The delivery stays pending and is attempted again: at-least-once holds.
        error!(webhook = %name, seq = due.seq, error = %e, "cannot record the attempt");
    }
    if let Some(done) = guard.done.take() {
        let _ = done.send(finished).await;
    }
}

struct Response {
    status: u16,
    retry_after: Option<Duration>,
}

/// Builds, signs and sends the request; `Err` is a failure without a response.
async fn send(endpoint: &Endpoint, due: &DueDelivery) -> Result<Response, Failure> {
    let config = &endpoint.config;
    let mut request = endpoint
        .client
        .post(config.url.clone())
        .headers(endpoint.static_headers.clone());
    let body: Bytes = match config.mode {
        Mode::Structured => {
            request = request.header(reqwest::header::CONTENT_TYPE, CLOUDEVENTS_JSON);
            due.bytes.clone()
        }
        Mode::Binary => {
            // Read without the depth limit of a full parse: `data` is sent as journalled.
            let envelope = StoredEnvelope::parse(&due.bytes).map_err(|e| {
                error!(endpoint = %endpoint.name, seq = due.seq, event_id = %due.id, error = %e,
                    "journalled envelope unreadable; the attempt fails and is recorded");
                Failure::new(
                    Reason::Other,
                    format!("journalled envelope unreadable: {e}"),
                )
            })?;
            request = request
                .header(
                    reqwest::header::CONTENT_TYPE,
                    envelope.datacontenttype.as_str(),
                )
                .header("ce-specversion", ce_header(&envelope.specversion))
                .header("ce-id", ce_header(&envelope.id))
                .header("ce-source", ce_header(&envelope.source))
                .header("ce-type", ce_header(&envelope.event_type))
                .header("ce-time", ce_header(&envelope.time))
                .header("ce-provider", ce_header(&envelope.provider))
                .header("ce-recvtime", ce_header(&envelope.recvtime));
            if let Some(subject) = &envelope.subject {
                request = request.header("ce-subject", ce_header(subject));
            }
            if let Some(seq) = envelope.seq {
                request = request.header("ce-seq", seq.to_string());
            }
            // `data` exactly as journalled: serde_json wrote it compactly from the payload, so
            // this is the payload's own serialisation (parsing it into a tree and writing it
            // again could even change a float's last digit).
            Bytes::copy_from_slice(envelope.data.get().as_bytes())
        }
    };
    // Signed just before sending: receivers reject timestamps older than a few minutes.
    let timestamp = Utc::now().timestamp();
    let signature = endpoint.signer.sign(&due.id, timestamp, &body);
    let response = request
        .header(HEADER_ID, due.id.as_str())
        .header(HEADER_TIMESTAMP, timestamp.to_string())
        .header(HEADER_SIGNATURE, signature)
        .body(body)
        .send()
        .await
        .map_err(|e| describe(e, &config.url))?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    Ok(Response {
        status,
        retry_after,
    })
}

/// `Retry-After` as delta-seconds or an HTTP date.
fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let ms = at
        .timestamp_millis()
        .saturating_sub(Utc::now().timestamp_millis());
    Some(Duration::from_millis(u64::try_from(ms).unwrap_or(0)).min(MAX_RETRY_AFTER))
}

/// A `ce-*` header value encoded as the CloudEvents HTTP binding (§3.1.3.2) requires:
/// space, `\"`, `%` and every byte outside printable ASCII are percent-encoded (UTF-8), so a
/// provider's non-ASCII subject cannot make the request unbuildable.
fn ce_header(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for &b in value.as_bytes() {
        if (0x21..=0x7e).contains(&b) && b != b'"' && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What went wrong with a request that got no response, classified. The text names the host
/// and port, never the URL: an endpoint URL may carry a key in its query string, and this
/// text is logged and returned by the admin API.
fn describe(e: reqwest::Error, url: &url::Url) -> Failure {
    let peer = format!(
        "{}:{}",
        url.host_str().unwrap_or(""),
        url.port_or_known_default().unwrap_or(0)
    );
    if let Some(refused) = ssrf::refusal(&e) {
        // The guard's resolver refused the host, or could not resolve it.
        let reason = match refused {
            ssrf::Refused::Internal { .. } => Reason::Ssrf,
            ssrf::Refused::Unresolved { .. } | ssrf::Refused::NoAddress { .. } => Reason::Dns,
        };
        return Failure::new(reason, refused.to_string());
    }
    if e.is_timeout() {
        return Failure::new(
            Reason::Timeout,
            format!("{peer} did not answer in time (timeout)"),
        );
    }
    if let Some(found) = Failure::in_chain(&e, &peer) {
        return found;
    }
    if e.is_connect() {
        return Failure::new(Reason::Connect, format!("cannot connect to {peer}"));
    }
    let transport = e.is_request() || e.is_body() || e.is_decode();
    let text = e.without_url().to_string();
    if transport {
        Failure::new(Reason::Transport, format!("{peer}: {text}"))
    } else {
        Failure::new(Reason::Other, format!("{peer}: {text}"))
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
fn jitter(d: Duration) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * rand::random_range(0.8..=1.2)).unwrap_or(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ce_headers_are_percent_encoded_per_the_http_binding() {
        assert_eq!(ce_header("lobby/ABC123"), "lobby/ABC123");
        assert_eq!(ce_header("a b\"c%d"), "a%20b%22c%25d");
        assert_eq!(ce_header("salle/é"), "salle/%C3%A9");
        assert!(reqwest::header::HeaderValue::from_str(&ce_header("x\r\ny")).is_ok());
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 120 "), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

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
    fn huge_delays_neither_panic_nor_wrap() {
        for _ in 0..100 {
            assert!(jitter(Duration::MAX) > Duration::from_secs(u64::MAX / 2));
        }
        assert_eq!(
            parse_retry_after("18446744073709551615"),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(
            parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT"),
            Some(MAX_RETRY_AFTER)
        );
    }

    #[test]
    fn jitter_stays_within_a_fifth() {
        for _ in 0..100 {
            let d = jitter(Duration::from_secs(10));
            assert!(d >= Duration::from_secs(8) && d <= Duration::from_secs(12));
        }
    }
}
