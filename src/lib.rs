//! wsbridge: bridges several providers' real-time WebSocket event APIs into one stream of
//! CloudEvents.
//!
//! How the pieces fit (`docs/architecture.md` has the data flow, the invariants and the
//! external contracts in brief):
//! - [`config`]: one validated, immutable view of `config.toml` plus `WSBRIDGE_*` overrides;
//! - [`upstream`]: one supervisor task per provider connection (connect, authenticate,
//!   subscribe, heartbeat, reconnect), decoding frames with the provider's adapter from
//!   [`wsbridge_adapters`];
//! - [`envelope`]: the canonical CloudEvents envelope, the external contract;
//! - [`ingest`]: the single path from upstreams to the journal and on to subscribers;
//! - [`storage`]: the journal (write-ahead, deduplicated by id, ordered by `seq`) behind one
//!   trait, with the embedded SQLite implementation (the default) and the NATS JetStream one
//!   (several instances on one stream);
//! - [`routing`]: `[[routes]]` compiled once: which webhooks get which events;
//! - [`delivery`]: signed webhooks with durable retries, dead letters and replay;
//! - [`downstream`]: `/v1/ws` and `/v1/events` for consumers, resumable by `seq`;
//! - [`http`]: everything served over HTTP on one state: the accept loop with the connection
//!   cap, header and idle timeouts; `/healthz`, `/readyz`, the `/v1/status` summary and the
//!   status page; `/metrics`; the admin API under `/v1/admin/`;
//! - [`values`]: config values every section parses alike (durations and their bounds);
//! - [`bridge`]: the above assembled, started and stopped as one;
//! - [`reload`]: SIGHUP and config-file changes applied without a restart;
//! - [`demo`]: simulators + bridge + a printing consumer, for newcomers;
//! - [`cli`]: `wsbridge tail` and `wsbridge admin`, the consumer protocol and the admin API
//!   at a terminal;
//! - [`dialect_tool`]: `wsbridge dialect list | check | decode`, for writing dialect files;
//! - [`tls`]: the one trust policy of every outbound TLS connection, and HTTPS serving;
//! - [`failure`]: why a connection or request failed, as a reason an operator can act on;
//! - [`telemetry`]: logging setup.
//! - [`traces`]: OpenTelemetry traces of each event (OTLP), when configured.

#![warn(missing_docs)]

pub mod bridge;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod demo;
pub mod dialect_tool;
pub mod downstream;
pub mod envelope;
pub mod explain;
pub mod failure;
pub mod http;
pub mod ingest;
pub mod reload;
pub mod routing;
pub mod storage;
pub mod supervise;
pub mod telemetry;
pub mod tls;
pub mod traces;
pub mod upstream;
pub mod values;

pub use wsbridge_adapters as adapters;

/// Selects rustls' crypto (ring) for the whole process. reqwest is built without a default
/// provider so that we do not pull in a second crypto library; every process that builds an
/// HTTP or TLS client must call this first (it is idempotent and cheap).
pub fn install_crypto_provider() {
    // An error only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
