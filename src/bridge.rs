//! The service assembled: supervisors → ingest (route, journal) → webhooks and subscribers,
//! plus the HTTP server, under one shutdown token.
//!
//! `serve`, the demo and the black-box tests all start the bridge through [`Bridge::start`],
//! so what the tests prove is what runs.
//!
//! Shutdown order (SIGTERM/SIGINT in `serve`): cancel the token: the HTTP server stops
//! accepting, consumers are closed with 1001 "going away", supervisors send their upstream
//! connections a normal close frame, dispatchers stop starting attempts. Then wait for the
//! supervisors to drain: each keeps reading until the provider answers its close (providers
//! do not replay, so what they sent before that answer must be read), queueing every event,
//! for at most `server.shutdown_grace`. Then let ingest journal everything they queued (every
//! append is committed before it is acknowledged, so the journal is flushed when ingest ends),
//! and give webhook attempts in flight `server.shutdown_grace` to finish. An attempt cut short
//! stays pending in the store and is sent again after the restart: nothing journalled is lost.
//! A reload that removes or changes an upstream, and a lease handover, drain the same way.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Config, Ownership};
use crate::delivery::{DeliveryError, DeliveryService};
use crate::downstream::Hub;
use crate::envelope::Published;
use crate::http::server::{self as http_server, HttpLimits, HttpStats};
use crate::http::{self, AppState};
use crate::ingest::{self, IngestSnapshot, IngestStats, Sinks};
use crate::storage::nats::lease::Leases;
use crate::storage::{self, Store, StoreError};
use crate::tls::server::Acceptor;
use crate::traces::Traces;
use crate::upstream::{self, UpstreamHandle, Upstreams};

/// Why the bridge could not start.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// An upstream's adapter refused its settings (normally caught by config validation).
    #[error(transparent)]
    Upstream(#[from] upstream::StartError),
    /// The journal could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A webhook endpoint could not be set up.
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    /// The trace exporter could not be set up.
    #[error(transparent)]
    Traces(#[from] crate::traces::TracesError),
    /// The server's TLS certificate could not be used (normally caught at load).
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The configured address.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// How this bridge starts an upstream's supervisor: its events go to `queue`, it stops with
/// `shutdown` (each on its own child token, so a reload can stop one), and with leases (nats
/// backend) and `ownership = "lease"` it connects only while this instance holds the
/// upstream's lease.
fn spawner(
    limits: upstream::FrameLimits,
    queue: mpsc::Sender<crate::ingest::Queued>,
    shutdown: CancellationToken,
    leases: Option<Arc<Leases>>,
) -> upstream::Spawner {
    Box::new(move |u, adapter, drain_grace| {
        let stop = shutdown.child_token();
        let gate = match (&leases, u.ownership()) {
            (Some(leases), Ownership::Lease) => Some(leases.keep(&u.name, stop.clone())),
            _ => None,
        };
        upstream::spawn_gated(u, limits, adapter, queue.clone(), stop, drain_grace, gate)
    })
}

/// What a reload changed, and what it could not change without a restart.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// One line per applied change.
    pub applied: Vec<String>,
    /// Settings that changed but only take effect after a restart.
    pub needs_restart: Vec<String>,
    /// The new config's `[dialects] paths`: what a file watcher watches beside the config.
    pub dialect_paths: Vec<std::path::PathBuf>,
}

/// A running bridge.
pub struct Bridge {
    upstreams: Arc<Upstreams>,
    router: Arc<arc_swap::ArcSwap<crate::routing::Router>>,
    /// The config currently applied (a reload diffs against it).
    current: tokio::sync::Mutex<Config>,
    store: Arc<dyn Store>,
    delivery: Arc<DeliveryService>,
    hub: Arc<Hub>,
    publish: broadcast::Sender<Arc<Published>>,
    stats: Arc<IngestStats>,
    shutdown: CancellationToken,
    ingest_task: JoinHandle<()>,
    server_task: JoinHandle<()>,
    local_addr: SocketAddr,
    /// The HTTPS certificate in use (`server.tls_cert`), replaced on reload.
    server_tls: Option<Acceptor>,
    /// The trace exporter (`[telemetry]`), flushed at shutdown.
    traces: Option<Traces>,
}

/// How a shutdown ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shutdown {
    /// False when the journal could not take everything read from the upstreams within the
    /// grace period (its store was failing): those events are lost, and the binary exits
    /// non-zero so that its supervisor and operator see it.
    pub journal_complete: bool,
}

impl Bridge {
    /// Opens the store, starts the webhook dispatchers, the upstreams, ingest and the HTTP
    /// server on the current Tokio runtime.
    ///
    /// A start that fails, or whose future is dropped half-way, stops whatever it had
    /// started before it returns.
    pub async fn start(config: &Config) -> Result<Bridge, BridgeError> {
        Self::start_watched(config).await.map(|(bridge, _)| bridge)
    }

    /// Starts as [`Bridge::start`] does, and also returns a receiver of the live stream taken
    /// before any upstream started: the caller sees every event the bridge publishes, the
    /// first ones included (a receiver from [`Bridge::subscribe`] after the start may miss
    /// what a fast provider sent meanwhile). Tests and embedders that count events use it.
    pub async fn start_watched(
        config: &Config,
    ) -> Result<(Bridge, broadcast::Receiver<Arc<Published>>), BridgeError> {
        crate::install_crypto_provider();
        // Before anything starts: a certificate that cannot be used stops the start here.
        let server_tls = config.server.tls.as_ref().map(Acceptor::new).transpose()?;
        // Every task spawned below (webhook dispatchers, upstream supervisors and their lease
        // keepers, the NATS journal tail, the HTTP server) stops when this token is cancelled,
        // and until a `Bridge` is returned nobody else holds it. A start failing after the
        // first of them runs (the listen address is taken, NATS goes away between two calls,
        // an adapter refuses its settings) would leave them running for the life of the
        // process: dispatchers delivering from a store the caller believes closed, supervisors
        // holding provider connections. So until the start completes, this guard cancels the
        // token when dropped; each task then ends as it does at shutdown, and ingest ends once
        // the supervisors have dropped their queue senders.
        let shutdown = CancellationToken::new();
        let started = shutdown.clone().drop_guard();
        // What the backend gives: the store, its leases (NATS) and its live feed. NATS's
        // `max_payload` is checked against `limits.max_event_bytes` here.
        // Traces (`[telemetry] otlp_endpoint`): the exporter's thread starts here; `None` when
        // off, and then nothing per event is done for them.
        let traces = Traces::start(&config.telemetry)?;
        let storage::Opened {
            store,
            leases,
            live,
        } = storage::open(&config.storage, config.limits.max_event_bytes).await?;
        let delivery = Arc::new(
            DeliveryService::start_traced(
                &config.webhooks,
                store.clone(),
                shutdown.child_token(),
                traces.clone(),
            )
            .await?,
        );

        let listener = tokio::net::TcpListener::bind(config.server.listen)
            .await
            .map_err(|source| BridgeError::Listen {
                addr: config.server.listen,
                source,
            })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| BridgeError::Listen {
                addr: config.server.listen,
                source,
            })?;

        let (queue_tx, queue_rx) = mpsc::channel(ingest::INGEST_QUEUE);
        let (publish, watched) = broadcast::channel(ingest::PUBLISH_CAPACITY);
        // Started before any upstream or consumer can add to or read from the journal (with
        // NATS, the live stream is the journal's tail, from its head as it is now).
        let ingest_publish = live.start(&publish, shutdown.child_token()).await?;
        // The hub (and the durable subscriptions it loads from the store) before any upstream
        // starts: nothing the upstreams journal waits behind loading them.
        let hub = Hub::new(
            config.consumers.clone(),
            store.clone(),
            publish.clone(),
            shutdown.clone(),
            &config.limits,
            traces.clone(),
            config.server.admin_token.clone(),
            leases.clone(),
        );
        hub.durables.load().await?;
        tokio::spawn(hub.durables.clone().expire_idle(
            (config.limits.durable_ttl / 4).clamp(
                std::time::Duration::from_secs(1),
                std::time::Duration::from_secs(60),
            ),
            shutdown.child_token(),
        ));
        let stats = Arc::new(IngestStats::default());
        let frame_limits = upstream::FrameLimits::new(&config.limits, config.storage.dedup_window);
        let upstreams = Arc::new(Upstreams::start(
            &config.upstreams,
            config.server.shutdown_grace,
            spawner(frame_limits, queue_tx, shutdown.clone(), leases.clone()),
        )?);
        let router = Arc::new(arc_swap::ArcSwap::new(config.router.clone()));
        let ingest_task = ingest::spawn(
            queue_rx,
            store.clone(),
            Sinks {
                router: router.clone(),
                wake: delivery.clone(),
                publish: ingest_publish,
                max_event_bytes: config.limits.max_event_bytes,
                traces: traces.clone(),
            },
            stats.clone(),
        );

        let http_limits = HttpLimits::from_config(config);
        let http_stats = Arc::new(HttpStats::new(http_limits.max_connections));
        let app = http::router(Arc::new(AppState {
            store: store.clone(),
            upstreams: upstreams.clone(),
            delivery: delivery.clone(),
            hub: hub.clone(),
            ingest: stats.clone(),
            started: std::time::Instant::now(),
            http: http_stats.clone(),
            admin_token: config.server.admin_token.clone(),
        }));
        let server_task = tokio::spawn(http_server::serve(
            listener,
            app,
            http_limits,
            http_stats,
            shutdown.clone(),
            server_tls.clone(),
        ));
        info!(listen = %local_addr, tls = server_tls.is_some(), upstreams = config.upstreams.len(), webhooks = config.webhooks.len(), "bridge started");
        let bridge = Bridge {
            upstreams,
            router,
            current: tokio::sync::Mutex::new(config.clone()),
            store,
            delivery,
            hub,
            publish,
            stats,
            // Started: the token passes from the guard to the bridge, whose shutdown cancels it.
            shutdown: started.disarm(),
            ingest_task,
            server_task,
            local_addr,
            server_tls,
            traces,
        };
        Ok((bridge, watched))
    }

    /// The address the HTTP server listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A receiver of every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Published>> {
        self.publish.subscribe()
    }

    /// The upstream supervisors, in config order (a snapshot).
    pub fn upstreams(&self) -> Vec<Arc<UpstreamHandle>> {
        self.upstreams.snapshot()
    }

    /// The supervisor called `name`.
    pub fn upstream(&self, name: &str) -> Option<Arc<UpstreamHandle>> {
        self.upstreams.get(name)
    }

    /// Applies a new, already validated config without dropping what it does not change:
    /// routes and consumers are swapped, webhook endpoints and upstreams are reconciled by
    /// name (only new, removed or changed ones start or stop). `server` and `storage` changes
    /// need a restart and are reported, not applied.
    pub async fn reload(&self, new: Config) -> Result<ReloadReport, BridgeError> {
        let mut current = self.current.lock().await;
        let mut report = ReloadReport::default();
        if new.server.listen != current.server.listen {
            report.needs_restart.push("server.listen".into());
        }
        if new.storage != current.storage {
            report.needs_restart.push("storage".into());
        }
        if new.limits != current.limits {
            report.needs_restart.push("limits".into());
        }
        if new.telemetry != current.telemetry {
            report.needs_restart.push("telemetry".into());
        }
        // Before webhooks and upstreams, so that a failure here leaves everything as it was.
        match (&self.server_tls, &new.server.tls) {
            (Some(acceptor), Some(tls)) if current.server.tls.as_ref() != Some(tls) => {
                acceptor.replace(tls)?;
                report
                    .applied
                    .push("server: TLS certificate replaced (new handshakes use it)".into());
            }
            (Some(_), Some(_)) | (None, None) => {}
            // Switching the listener between HTTP and HTTPS.
            _ => report.needs_restart.push("server.tls_cert".into()),
        }
        // Webhooks before routes, so a new route never points at an endpoint not yet running.
        report
            .applied
            .extend(self.delivery.reconcile(&new.webhooks).await?);
        if new.routes != current.routes {
            self.router.store(new.router.clone());
            report
                .applied
                .push(format!("routes: {} route(s) now", new.routes.len()));
        }
        report
            .applied
            .extend(self.hub.set_consumers(new.consumers.clone()));
        report.applied.extend(
            self.upstreams
                .reconcile(&new.upstreams, new.server.shutdown_grace)
                .await?,
        );
        if new.server.admin_token != current.server.admin_token {
            report.needs_restart.push("server.admin_token".into());
        }
        for (key, changed) in [
            (
                "limits.max_connections",
                new.limits.max_connections != current.limits.max_connections,
            ),
            (
                "limits.header_timeout",
                new.limits.header_timeout != current.limits.header_timeout,
            ),
            (
                "limits.idle_timeout",
                new.limits.idle_timeout != current.limits.idle_timeout,
            ),
        ] {
            if changed {
                report.needs_restart.push(key.into());
            }
        }
        report.dialect_paths = new.dialects.paths.clone();
        *current = new;
        Ok(report)
    }

    /// The store (journal and delivery queue).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The webhook dispatchers.
    pub fn delivery(&self) -> &Arc<DeliveryService> {
        &self.delivery
    }

    /// The downstream hub (consumer counters).
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Ingest counters.
    pub fn ingest_stats(&self) -> IngestSnapshot {
        self.stats.snapshot()
    }

    /// Stops everything in order and waits for it; says whether everything read from the
    /// upstreams was journalled.
    pub async fn shutdown(self) -> Shutdown {
        self.shutdown.cancel();
        let grace = self.current.lock().await.server.shutdown_grace;
        // Open connections get the grace period to finish; a client that stopped reading (an
        // SSE body hyper is never asked to poll again) must not hold the shutdown forever.
        let mut server_task = self.server_task;
        let server = async {
            if tokio::time::timeout(grace, &mut server_task).await.is_err() {
                warn!(grace = ?grace, "HTTP connections still open after the grace period; closing them");
                server_task.abort();
            }
        };
        // Meanwhile every supervisor closes its connection and reads what its provider sent
        // before answering the close (each bounded by the grace), queueing it to ingest.
        tokio::join!(server, self.upstreams.stop());
        // Ingest ends once every sender of its queue is gone, after journalling everything
        // the drained supervisors queued. A store that cannot write (a full disk, NATS down)
        // is retried with backoff without end, so shutdown waits for it at most the grace
        // period: what is not journalled by then is lost, and the caller is told (the process
        // exits non-zero). The registry dropped its sender when it stopped.
        let mut ingest = self.ingest_task;
        let journal_complete = match tokio::time::timeout(grace, &mut ingest).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                warn!(error = %e, "ingest task ended abnormally");
                false
            }
            Err(_) => {
                ingest.abort();
                let s = self.stats.snapshot();
                let in_flight = s
                    .received
                    .saturating_sub(s.published + s.duplicates + s.rejected);
                error!(
                    grace = ?grace,
                    in_flight,
                    why = self.store.unavailable().unwrap_or_default(),
                    "the journal did not take the last events within the grace period; events read from upstreams and not journalled are lost"
                );
                false
            }
        };
        self.delivery.join(grace).await;
        if let Some(traces) = self.traces {
            // Exports the spans still buffered; blocking (an HTTP request), so off the runtime,
            // and bounded by `telemetry.export_timeout`.
            let _ = tokio::task::spawn_blocking(move || traces.shutdown()).await;
        }
        info!(journal_complete, "bridge stopped");
        Shutdown { journal_complete }
    }
}
