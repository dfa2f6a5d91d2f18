//! The delivery service: one dispatcher per configured webhook endpoint, started, updated
//! and stopped as the config changes, and the endpoint state the admin API shows. Ingest
//! wakes an endpoint's dispatcher through it when new deliveries are committed.
//!
//! A delivery in flight when the process dies is still pending in the store and is sent
//! again after restart: at-least-once, same `webhook-id`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::Utc;
use serde::Serialize;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::config::WebhookConfig;
use super::dispatcher::dispatch;
use super::signing::Signer;
use super::ssrf;
use crate::failure::{Failure, Reason, ReasonCounts};
use crate::storage::Store;
use crate::supervise::TaskHealth;
use crate::traces::Traces;

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
pub(super) struct EndpointStats {
    pub(super) in_flight: AtomicU64,
    pub(super) delivered: AtomicU64,
    pub(super) failed_attempts: AtomicU64,
    pub(super) dead_lettered: AtomicU64,
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
pub(super) struct Endpoint {
    pub(super) name: Arc<str>,
    /// Attempt durations (shared family; this endpoint's series).
    pub(super) latency: prometheus_client::metrics::histogram::Histogram,
    pub(super) config: WebhookConfig,
    pub(super) signer: Signer,
    pub(super) client: reqwest::Client,
    pub(super) static_headers: reqwest::header::HeaderMap,
    pub(super) wake: Notify,
    /// `Some(reason)` while disabled by a 410.
    disabled: Mutex<Option<String>>,
    pub(super) stats: EndpointStats,
    /// The dispatcher task's health (failed, restarts).
    health: Arc<TaskHealth>,
    /// Failed attempts per reason.
    pub(super) failures: ReasonCounts,
    /// The last failed attempt's failure and when it started (unix ms), until a delivery
    /// succeeds.
    last_failure: Mutex<Option<(Failure, i64)>>,
    /// Traces (`[telemetry]`); `None`: off.
    pub(super) traces: Option<Traces>,
}

impl Endpoint {
    /// Remembers the last failed attempt (`None`: a delivery succeeded).
    pub(super) fn set_last_failure(&self, failure: Option<(Failure, i64)>) {
        if let Ok(mut last) = self.last_failure.lock() {
            *last = failure;
        }
    }

    /// Why the endpoint is disabled (`None`: it is not).
    pub(super) fn disabled_reason(&self) -> Option<String> {
        self.disabled.lock().map(|d| d.clone()).unwrap_or(None)
    }

    /// Disables the endpoint for `reason` (`None`: enables it).
    pub(super) fn set_disabled(&self, reason: Option<String>) {
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
    /// Traces (`[telemetry]`): a span per attempt; `None`: off.
    traces: Option<Traces>,
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
        Self::start_traced(webhooks, store, shutdown, None).await
    }

    /// [`DeliveryService::start`], each attempt traced with `traces` (a span per attempt,
    /// its `traceparent` sent with the request).
    pub async fn start_traced(
        webhooks: &[WebhookConfig],
        store: Arc<dyn Store>,
        shutdown: CancellationToken,
        traces: Option<Traces>,
    ) -> Result<DeliveryService, DeliveryError> {
        let service = DeliveryService {
            store,
            shutdown,
            endpoints: RwLock::new(HashMap::new()),
            attempts: tokio_util::task::TaskTracker::new(),
            latency: LatencyFamily::new_with_constructor(latency_histogram),
            traces,
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
                fresh.push(
                    build_endpoint(config, self.store.as_ref(), latency, self.traces.clone())
                        .await?,
                );
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
                // its attempts have finished: the queue hands out nothing the old one holds,
                // but both would run attempts at once, past `max_in_flight`.
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
                            // finish, so that `max_in_flight` holds across the restart.
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
    traces: Option<Traces>,
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
        traces,
    }))
}
