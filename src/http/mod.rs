//! Everything the bridge answers over HTTP, on one listener and one state: the operator console,
//! `/healthz`, `/readyz` and `/v1/status` ([`status`]), `/metrics` ([`metrics`]), the OpenAPI
//! document at `/v1/openapi.json` ([`openapi`]), the admin API under `/v1/admin/`
//! ([`admin`]), and the consumers' `/v1/ws` and `/v1/events` (served by
//! [`crate::downstream`], merged here). [`server`] is the accept loop with its connection
//! limits and optional TLS.
//!
//! The handlers read the running bridge through [`AppState`], never through the bridge
//! itself: the bridge builds the state once at start and hands it to [`router`], so these
//! modules depend on the parts they show (store, upstreams, delivery, hub, ingest counters)
//! and nothing depends on them.

mod admin;
mod admin_durables;
pub mod metrics;
pub mod openapi;
pub mod server;
mod status;

use std::sync::Arc;
use std::time::Instant;

use wsbridge_adapters::Secret;

use crate::delivery::DeliveryService;
use crate::downstream::Hub;
use crate::ingest::IngestStats;
use crate::storage::Store;
use crate::upstream::Upstreams;
use server::HttpStats;

/// What every HTTP handler reads and acts on: the parts of the running bridge.
pub struct AppState {
    /// The store (journal position, delivery counts and lists, replays).
    pub store: Arc<dyn Store>,
    /// The upstream supervisors.
    pub upstreams: Arc<Upstreams>,
    /// The webhook dispatchers.
    pub delivery: Arc<DeliveryService>,
    /// The consumer hub (its own routes, and its counters in the status).
    pub hub: Arc<Hub>,
    /// Ingest counters.
    pub ingest: Arc<IngestStats>,
    /// When the bridge started (uptime).
    pub started: Instant,
    /// The accept loop's connection counters.
    pub http: Arc<HttpStats>,
    /// `server.admin_token`; `None` turns the admin API off (404).
    pub admin_token: Option<Secret>,
}

/// Every route the bridge serves, over `state`.
pub fn router(state: Arc<AppState>) -> axum::Router {
    let hub = state.hub.clone();
    axum::Router::new()
        .merge(status::routes())
        .merge(metrics::routes())
        .merge(openapi::routes())
        .merge(admin::routes(state.clone()))
        .with_state(state)
        .merge(crate::downstream::router(hub))
}
