//! The running upstream supervisors, one per configured upstream, as one registry: what the
//! HTTP answers read (a snapshot, one serialisable view per upstream), what a reload changes
//! (reconcile by name: only added, removed or changed upstreams start or stop) and what
//! shutdown stops. Webhook dispatchers have the same shape in
//! [`crate::delivery::DeliveryService`].
//!
//! How one supervisor is started (which ingest queue, which frame limits, whether it waits
//! for a lease) is the bridge's business: it hands the registry a [`Spawner`]. The spawner
//! holds a sender of the ingest queue, so [`Upstreams::stop`] drops it before stopping the
//! supervisors: once they have drained, nothing feeds ingest and it can finish.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use wsbridge_adapters::Adapter;

use super::{CounterSnapshot, UpstreamHandle, UpstreamState};
use crate::config::UpstreamConfig;
use crate::failure::Reason;

/// Starts the supervisor of one upstream with its adapter and drain grace (how long closing
/// its connection may read what the provider already sent: `server.shutdown_grace`).
pub type Spawner =
    Box<dyn Fn(&UpstreamConfig, Arc<dyn Adapter>, Duration) -> UpstreamHandle + Send + Sync>;

/// Why an upstream could not be started.
#[derive(Debug, thiserror::Error)]
#[error("upstream {name}: {source}")]
pub struct StartError {
    /// The upstream's name.
    pub name: String,
    /// The adapter's reason (normally caught by config validation).
    #[source]
    pub source: wsbridge_adapters::AdapterError,
}

/// One upstream as the status summary and the admin API show it: names, states and counts,
/// never a credential.
#[derive(Clone, Debug, Serialize)]
pub struct UpstreamView {
    /// The configured name.
    pub name: String,
    /// The provider: its dialect's name.
    pub provider: String,
    /// The current state.
    pub state: UpstreamState,
    /// Since when.
    pub since: DateTime<Utc>,
    /// Why the last connection ended.
    pub last_error: Option<String>,
    /// Its reason, from a bounded set.
    pub last_error_reason: Option<Reason>,
    /// Failed or ended connections per reason.
    pub failures_by_reason: BTreeMap<&'static str, u64>,
    /// In `backoff`/`auth_failed`: milliseconds until the next attempt.
    pub retry_in_ms: Option<u64>,
    /// What it subscribes to.
    pub subscriptions: Vec<String>,
    /// Its counters.
    pub counters: CounterSnapshot,
    /// Unix milliseconds of the last event (0 before the first).
    pub last_event_unix_ms: i64,
}

impl UpstreamView {
    /// The view of one running supervisor.
    pub fn of(u: &UpstreamHandle) -> UpstreamView {
        let status = u.status();
        UpstreamView {
            name: u.name().to_string(),
            provider: u.adapter().provider().to_string(),
            state: status.state,
            since: status.since,
            last_error: status.last_error,
            last_error_reason: status.last_error_reason,
            failures_by_reason: u
                .failures_by_reason()
                .into_iter()
                .map(|(r, n)| (r.as_str(), n))
                .collect(),
            retry_in_ms: status
                .retry_in
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            subscriptions: u.adapter().subscriptions().to_vec(),
            counters: u.counters(),
            last_event_unix_ms: u.last_event_unix_ms(),
        }
    }
}

/// The registry (see the module doc).
pub struct Upstreams {
    running: RwLock<Vec<Arc<UpstreamHandle>>>,
    /// `None` once stopping: no supervisor starts after that.
    spawner: Mutex<Option<Spawner>>,
}

impl Upstreams {
    /// Starts a supervisor for each of `configs`, in order.
    pub fn start(
        configs: &[UpstreamConfig],
        drain_grace: Duration,
        spawner: Spawner,
    ) -> Result<Upstreams, StartError> {
        let mut running = Vec::with_capacity(configs.len());
        for u in configs {
            running.push(Arc::new(spawner(u, build(u)?, drain_grace)));
        }
        Ok(Upstreams {
            running: RwLock::new(running),
            spawner: Mutex::new(Some(spawner)),
        })
    }

    /// The supervisors, in config order.
    pub fn snapshot(&self) -> Vec<Arc<UpstreamHandle>> {
        self.running.read().map(|u| u.clone()).unwrap_or_default()
    }

    /// The supervisor called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<UpstreamHandle>> {
        self.snapshot().into_iter().find(|u| u.name() == name)
    }

    /// One view per supervisor, in config order.
    pub fn views(&self) -> Vec<UpstreamView> {
        self.snapshot()
            .iter()
            .map(|u| UpstreamView::of(u))
            .collect()
    }

    /// Makes the running set match `configs` by name: an unchanged upstream keeps its
    /// connection, a changed one is replaced, a new one starts, a removed one stops (each
    /// stopped one closes and drains its connection, all at once). Returns one line per
    /// change. After [`Upstreams::stop`] nothing changes.
    pub async fn reconcile(
        &self,
        configs: &[UpstreamConfig],
        drain_grace: Duration,
    ) -> Result<Vec<String>, StartError> {
        let running = self.snapshot();
        let mut changes = Vec::new();
        let mut next = Vec::with_capacity(configs.len());
        let mut to_stop = Vec::new();
        {
            // A reload that panicked half-way left the set as it was: go on with it.
            let spawner = self.spawner.lock().unwrap_or_else(|e| e.into_inner());
            let Some(spawner) = spawner.as_ref() else {
                return Ok(Vec::new());
            };
            for u in configs {
                match running.iter().find(|r| r.name() == u.name) {
                    Some(r) if r.config() == u => next.push(r.clone()),
                    existing => {
                        let adapter = build(u)?;
                        if let Some(old) = existing {
                            to_stop.push(old.clone());
                            let why = if old.config().dialect != u.dialect {
                                "with its changed dialect"
                            } else {
                                "with new settings"
                            };
                            changes.push(format!("upstream {}: reconnecting {why}", u.name));
                        } else {
                            changes.push(format!("upstream {}: added", u.name));
                        }
                        next.push(Arc::new(spawner(u, adapter, drain_grace)));
                    }
                }
            }
        }
        for r in &running {
            if !configs.iter().any(|u| u.name == r.name()) {
                to_stop.push(r.clone());
                changes.push(format!("upstream {}: removed", r.name()));
            }
        }
        if let Ok(mut set) = self.running.write() {
            *set = next;
        }
        futures_util::future::join_all(to_stop.iter().map(|old| old.stop())).await;
        Ok(changes)
    }

    /// Stops every supervisor and waits for them: each closes its connection and drains
    /// what its provider already sent (bounded by its drain grace), all at once. Nothing is
    /// started afterwards, and the ingest sender the spawner held is dropped first.
    pub async fn stop(&self) {
        self.spawner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let running = self.snapshot();
        futures_util::future::join_all(running.iter().map(|u| u.stop())).await;
    }
}

/// The adapter of `u`.
fn build(u: &UpstreamConfig) -> Result<Arc<dyn Adapter>, StartError> {
    u.build_adapter().map_err(|source| StartError {
        name: u.name.clone(),
        source,
    })
}
