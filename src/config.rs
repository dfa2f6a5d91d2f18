//! Configuration: one TOML file layered with `WSBRIDGE_*` environment overrides (figment),
//! `${VAR}` substitution in any string, and validation that names every bad key at once.
//!
//! Loading is three steps, each reporting problems as [`ConfigIssue`]s (`key: reason`):
//! 1. figment merges the file and `WSBRIDGE_SECTION__KEY` variables (`__` separates nesting;
//!    only variables with a `__` are taken, so `WSBRIDGE_ADMIN_TOKEN` stays free to be used
//!    as `${WSBRIDGE_ADMIN_TOKEN}`);
//! 2. every string is expanded: `${VAR}` must be set, `${VAR:-default}` falls back;
//! 3. each section, and each `[[upstreams]]` entry on its own, is deserialised and checked, so
//!    one typo does not hide the next.
//!
//! The result is immutable and validated: nothing downstream re-checks a config value.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use wsbridge_adapters::dialect::{self, Dialect, Params, Registry};
use wsbridge_adapters::{Adapter, AdapterError, Secret};

use crate::delivery::WebhookConfig;
use crate::downstream::{compile_consumers, Consumer, ConsumerConfig};
use crate::routing::{RouteConfig, Router};
pub use crate::storage::config::{Durability, StorageBackend, StorageConfig};
use crate::tls::{ClientTls, ServerTls, TlsSettings};
use crate::values::{
    bounds, de_duration, de_opt_duration, de_opt_secret, out_of_bounds, shown_url,
};

/// The validated configuration of one bridge process.
#[derive(Clone, Debug)]
pub struct Config {
    /// `[server]`.
    pub server: ServerConfig,
    /// `[storage]`.
    pub storage: StorageConfig,
    /// `[[upstreams]]`, in file order.
    pub upstreams: Vec<UpstreamConfig>,
    /// `[[webhooks]]`, in file order.
    pub webhooks: Vec<WebhookConfig>,
    /// `[[routes]]`, in file order (compiled once into [`Config::router`]).
    pub routes: Vec<RouteConfig>,
    /// The compiled routes.
    pub router: Arc<Router>,
    /// `[[consumers]]`, with their `allow` compiled.
    pub consumers: Vec<Arc<Consumer>>,
    /// `[limits]`.
    pub limits: LimitsConfig,
    /// `[dialects]`: where users' dialect files are.
    pub dialects: DialectsConfig,
    /// The dialects upstreams may name: the built-in ones and those `[dialects] paths` held
    /// at load (a reload reads them again).
    pub registry: Registry,
    /// `[telemetry]`: OpenTelemetry traces (off unless `otlp_endpoint` is set).
    pub telemetry: crate::traces::TelemetryConfig,
}

/// `[dialects]`: users' dialect files, loaded at start and on every reload.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DialectsConfig {
    /// Dialect files, or folders whose `*.toml` files are each a dialect; a relative path is
    /// relative to the config file's folder.
    #[serde(default)]
    pub paths: Vec<PathBuf>,
}

/// `[server]`: where the bridge listens and who may administer it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address for /v1/ws, /v1/events, /healthz, /readyz, /metrics and /v1/admin/*.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Bearer token of the admin API; without one the admin API is off.
    #[serde(default, deserialize_with = "de_opt_secret")]
    pub admin_token: Option<Secret>,
    /// At shutdown, how long webhook attempts in flight may take to finish; also how long a
    /// closing upstream connection (shutdown, reload, lease handover) is read for what the
    /// provider sent before answering the close (providers do not replay).
    #[serde(default = "d_10s", deserialize_with = "de_duration")]
    pub shutdown_grace: Duration,
    /// PEM certificate chain to serve HTTPS (and `wss://` for `/v1/ws`) with, together with
    /// `tls_key`; without them the server speaks plain HTTP (put a TLS proxy in front).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert` (never logged or shown).
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// What `tls_cert` and `tls_key` held at load (a reload re-reads them).
    #[serde(skip)]
    pub tls: Option<ServerTls>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            admin_token: None,
            shutdown_grace: d_10s(),
            tls_cert: None,
            tls_key: None,
            tls: None,
        }
    }
}

/// Bounds of `limits.max_connections`.
const MAX_CONNECTIONS_RANGE: std::ops::RangeInclusive<usize> = 1..=1_000_000;
/// Bounds of `limits.header_timeout`.
const HEADER_TIMEOUT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(600);
/// Bounds of `limits.idle_timeout`.
const IDLE_TIMEOUT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(24 * 3600);

impl LimitsConfig {
    /// Problems with the inbound connection limits, as (key, reason).
    fn connection_problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some(n) = self.max_connections {
            if !MAX_CONNECTIONS_RANGE.contains(&n) {
                out.push((
                    "max_connections",
                    format!(
                        "must be between {} and {} (leave it out to derive it from the open-file limit)",
                        MAX_CONNECTIONS_RANGE.start(),
                        MAX_CONNECTIONS_RANGE.end()
                    ),
                ));
            }
        }
        for (key, d, range) in [
            ("header_timeout", self.header_timeout, HEADER_TIMEOUT_RANGE),
            ("idle_timeout", self.idle_timeout, IDLE_TIMEOUT_RANGE),
        ] {
            if !range.contains(&d) {
                out.push((
                    key,
                    format!(
                        "must be between {} and {}",
                        humantime::format_duration(*range.start()),
                        humantime::format_duration(*range.end())
                    ),
                ));
            }
        }
        out
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

/// `[limits]`: the bounds every peer-controlled size is held to, in one table.
///
/// Each key has a safe default and is validated; hitting a limit gives a log line naming it
/// and a counter, never a crash and never a silent gap (see the README's "Limits" section).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest serialised envelope (the CloudEvents JSON, `seq` included) the bridge accepts.
    /// A larger event is refused at ingest and counted (`wsbridge_events_too_large_total`),
    /// never journalled; every path (the upstream read, `/v1/ws` frames, SSE, webhook bodies,
    /// the NATS journal) is sized to carry an event of this size, so one that is accepted is
    /// deliverable everywhere.
    #[serde(default = "default_max_event_bytes")]
    pub max_event_bytes: usize,
    /// Deepest nesting of arrays and objects in an upstream frame. A deeper frame is a decode
    /// error (counted, logged, skipped; the connection stays up): JSON readers, ours
    /// included, stop at a fixed depth, and the envelope and the `/v1/ws` frame add levels
    /// around the payload, so a deeper frame could be journalled but never read back.
    #[serde(default = "default_max_depth")]
    pub max_depth: usize,
    // Inbound HTTP connections (src/http/server.rs): no peer, token or not, may exhaust the
    // bridge's file descriptors.
    /// Most inbound HTTP connections open at once, `/v1/ws` and SSE sessions included; one
    /// over it is answered 503 and closed. Unset: what the open-file limit leaves after a
    /// reserve for upstreams, webhooks and the store (at most 16384); a configured value
    /// is also bounded by that.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// A connection must send a complete request head within this, counted from the
    /// accept (and from the first byte of each later request on a keep-alive connection).
    #[serde(default = "d_10s", deserialize_with = "de_duration")]
    pub header_timeout: Duration,
    /// A keep-alive connection with no request in progress is closed after this long
    /// (upgraded `/v1/ws` sessions and SSE streams are not affected).
    #[serde(default = "d_60s", deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    /// Connections (WebSocket and SSE together) one consumer token may hold at once; one
    /// more is refused with HTTP 429, so one consumer cannot take every replay and socket.
    #[serde(default = "default_max_connections_per_token")]
    pub max_connections_per_token: usize,
    /// Bytes of replayed events one connection may hold (read from the journal, not yet
    /// written to its socket), all its subscriptions together; replays wait for room.
    #[serde(
        default = "default_replay_memory_per_connection",
        deserialize_with = "de_byte_size"
    )]
    pub replay_memory_per_connection: u64,
    /// Bytes of replayed events all connections together may hold; replays wait for room.
    #[serde(
        default = "default_replay_memory_total",
        deserialize_with = "de_byte_size"
    )]
    pub replay_memory_total: u64,
    /// How long a connection's replayed events may wait unwritten (its consumer does not
    /// read) before it is closed as a slow consumer (4001 on WebSocket).
    #[serde(default = "d_30s", deserialize_with = "de_duration")]
    pub replay_stall_timeout: Duration,
    /// Frames without a provider id that one upstream connection remembers (for
    /// `storage.dedup_window`) to tell a repeat from a copy: under 100 bytes each. Beyond it
    /// the least recently seen is forgotten and counted (`wsbridge_upstream_untracked_total`).
    #[serde(default = "default_tracked_frames")]
    pub tracked_frames: usize,
    /// Most events one upstream frame may carry (a dialect's `split` rule); a frame with
    /// more is a decode error (counted, logged, skipped), so one frame cannot flood the
    /// journal.
    #[serde(default = "default_max_split_events")]
    pub max_split_events: usize,
    /// Durable subscriptions one consumer may have; one more is refused
    /// (`too_many_durables`), so one token cannot fill the store with cursors.
    #[serde(default = "default_max_durables")]
    pub max_durables: usize,
    /// The largest `max_unacked` a durable subscription may ask for: what one connection
    /// may hold unacknowledged, the bound of a durable's memory per connection.
    #[serde(default = "default_max_unacked")]
    pub max_unacked: usize,
    /// A durable with no connection and no ack for this long is deleted (and logged);
    /// until then retention keeps what it owes.
    #[serde(default = "d_7d", deserialize_with = "de_duration")]
    pub durable_ttl: Duration,
    /// Dead letters one durable keeps; beyond it the oldest are dropped (counted, logged).
    #[serde(default = "default_durable_dead_letters")]
    pub durable_dead_letters: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_event_bytes: default_max_event_bytes(),
            max_depth: default_max_depth(),
            max_connections: None,
            header_timeout: d_10s(),
            idle_timeout: d_60s(),
            max_connections_per_token: default_max_connections_per_token(),
            replay_memory_per_connection: default_replay_memory_per_connection(),
            replay_memory_total: default_replay_memory_total(),
            replay_stall_timeout: d_30s(),
            tracked_frames: default_tracked_frames(),
            max_split_events: default_max_split_events(),
            max_durables: default_max_durables(),
            max_unacked: default_max_unacked(),
            durable_ttl: d_7d(),
            durable_dead_letters: default_durable_dead_letters(),
        }
    }
}

/// 1 MiB less 8 KiB: far above any documented provider event, and with the NATS headers'
/// reserve ([`crate::storage::nats::HEADER_RESERVE`]) exactly nats-server's default
/// `max_payload` of 1 MiB, so the default NATS server takes every event the bridge accepts.
fn default_max_event_bytes() -> usize {
    (1 << 20) - crate::storage::nats::HEADER_RESERVE
}

fn default_max_durables() -> usize {
    16
}

fn default_max_unacked() -> usize {
    10_000
}

fn default_durable_dead_letters() -> usize {
    1_000
}

fn d_7d() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

fn default_tracked_frames() -> usize {
    100_000
}

fn default_max_split_events() -> usize {
    wsbridge_adapters::DEFAULT_MAX_SPLIT_EVENTS
}

fn default_max_depth() -> usize {
    64
}

/// Smallest `limits.max_event_bytes`: room for an envelope's own attributes.
pub const MIN_EVENT_BYTES: usize = 1024;
/// Largest `limits.max_event_bytes` (64 MiB): every event is held in memory whole, several
/// times over on its way through the bridge.
pub const MAX_EVENT_BYTES: usize = 64 << 20;
/// Largest `limits.max_depth`. serde_json (our journal reader, and the Rust consumers')
/// stops at 128 levels; the envelope adds one level around a VoicePact frame and the
/// `/v1/ws` event frame another, so frames must stay well below 126.
pub const MAX_DEPTH: usize = 100;

impl LimitsConfig {
    /// Problems with the limits, as (key, reason).
    fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if !(MIN_EVENT_BYTES..=MAX_EVENT_BYTES).contains(&self.max_event_bytes) {
            out.push((
                "max_event_bytes",
                format!("must be between {MIN_EVENT_BYTES} and {MAX_EVENT_BYTES} bytes"),
            ));
        }
        if !(1..=MAX_DEPTH).contains(&self.max_depth) {
            out.push((
                "max_depth",
                format!(
                    "must be between 1 and {MAX_DEPTH} (JSON readers stop at 128 levels, and the \
                     envelope and the /v1/ws frame add levels around the payload)"
                ),
            ));
        }
        out
    }

    /// Largest WebSocket message read from a provider. It is larger than
    /// `max_event_bytes` (a frame carries members the envelope drops, and whitespace), so a
    /// frame whose envelope is too large is still read and refused as one event, connection
    /// kept; only a frame beyond this ends the connection (buffering it would be unbounded).
    pub fn max_upstream_frame_bytes(&self) -> usize {
        self.max_event_bytes
            .saturating_mul(2)
            .saturating_add(UPSTREAM_FRAME_SLACK)
    }

    /// Largest `/v1/ws` event frame: the envelope plus the frame's own members (`op`, the
    /// subscription id, `seq`).
    pub fn max_downstream_frame_bytes(&self) -> usize {
        self.max_event_bytes
            .saturating_add(DOWNSTREAM_FRAME_OVERHEAD)
    }
}

/// Slack on the upstream read limit beyond twice the envelope limit.
const UPSTREAM_FRAME_SLACK: usize = 64 * 1024;
/// Room for a `/v1/ws` event frame's members around the envelope: `op`, `seq` and the
/// subscription id (a client's JSON string or number, itself within the client frame limit).
pub const DOWNSTREAM_FRAME_OVERHEAD: usize = 128 * 1024;

/// Who connects to an upstream when several bridge instances share a NATS journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ownership {
    /// Every instance holds the connection; the journal's dedup removes the copies, and
    /// failover has no gap.
    All,
    /// One instance at a time holds the connection under a KV lease; another takes over
    /// within `storage.lease_ttl` when the holder dies (for providers that allow only one
    /// connection per identity, such as VoicePact).
    Lease,
}

/// `[[upstreams]]`: one provider connection and how to keep it alive.
///
/// The keys below are common to every dialect; every other key is a parameter of the
/// upstream's dialect (its `[params]`), checked against the dialect at load.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct UpstreamConfig {
    /// Unique name; becomes the envelope `source` (`wsbridge://<name>`) and every log line's
    /// `upstream` field.
    pub name: String,
    /// The dialect: a built-in one (`voicepact`, `voipbin`, `hashi`) or one loaded from
    /// `[dialects] paths`.
    pub adapter: String,
    /// Base URL (`$url` in the dialect's expressions); required when the dialect reads it.
    #[serde(default, deserialize_with = "de_opt_ws_url")]
    pub url: Option<url::Url>,
    /// First reconnect delay; doubles per failure up to `backoff_max`.
    #[serde(default = "d_1s", deserialize_with = "de_duration")]
    pub backoff_initial: Duration,
    /// Longest reconnect delay, also the delay after an auth failure.
    #[serde(default = "d_30s", deserialize_with = "de_duration")]
    pub backoff_max: Duration,
    /// How often the heartbeat is sent; unset: the dialect's `[heartbeat] interval`, else 20s.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub ping_interval: Option<Duration>,
    /// A connection with no inbound frame for this long is stale and is reconnected.
    #[serde(default = "d_60s", deserialize_with = "de_duration")]
    pub stale_after: Duration,
    /// A connection subscribed for this long counts as healthy and resets the backoff.
    #[serde(default = "d_10s", deserialize_with = "de_duration")]
    pub healthy_after: Duration,
    /// Limit on TCP connect plus the WebSocket handshake (and the greeting, where one is due).
    #[serde(default = "d_10s", deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// With the nats backend: `all` or `lease` (default: the dialect's `[dialect] ownership`,
    /// `lease` for VoicePact, which keeps one socket per client_id). Ignored by the embedded
    /// backend.
    #[serde(default)]
    pub ownership: Option<Ownership>,
    /// The dialect's parameters (every key not above), checked against its `[params]`.
    #[serde(flatten)]
    pub params: ParamValues,
    /// The trust policy of this upstream: the `tls_*` keys ([`TlsSettings`]) with their files
    /// as read at load.
    #[serde(skip)]
    pub tls: ClientTls,
    /// The dialect `adapter` names, resolved at load.
    #[serde(skip)]
    pub dialect: DialectRef,
}

/// An upstream's dialect parameters as written. `Debug` shows the keys only: values may be
/// credentials.
#[derive(Clone, Default, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct ParamValues(pub BTreeMap<String, Value>);

impl fmt::Debug for ParamValues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// The dialect an upstream runs, once resolved. Two are equal when loaded from the same text,
/// so a reload reconnects an upstream whose dialect file changed and keeps the others.
#[derive(Clone, Default)]
pub struct DialectRef(pub Option<Arc<Dialect>>);

impl PartialEq for DialectRef {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => a.same_as(b),
            (None, None) => true,
            _ => false,
        }
    }
}

impl fmt::Debug for DialectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(d) => write!(f, "{} ({})", d.name(), d.origin()),
            None => f.write_str("(unresolved)"),
        }
    }
}

impl UpstreamConfig {
    /// The ownership mode in force: the configured one, or the dialect's default.
    pub fn ownership(&self) -> Ownership {
        self.ownership
            .unwrap_or(match self.dialect.0.as_ref().map(|d| d.ownership()) {
                Some(dialect::Ownership::Lease) => Ownership::Lease,
                _ => Ownership::All,
            })
    }

    /// The dialect's view of this upstream: `url` and the parameters.
    pub fn adapter_params(&self) -> Params {
        let mut p = match &self.url {
            Some(u) => Params::new(u),
            None => Params::without_url(),
        };
        for (k, v) in &self.params.0 {
            p.set(k, v.clone());
        }
        p
    }

    /// Whether the upstream connects over TLS: its dialect's connect URL is `wss://` (`url`'s
    /// scheme when the dialect cannot build it, e.g. before the config is validated).
    pub fn uses_tls(&self) -> bool {
        match self.build_adapter().map(|a| a.connect_request()) {
            Ok(Ok(req)) => req.uri().scheme_str() == Some("wss"),
            _ => self.url.as_ref().is_none_or(|url| url.scheme() == "wss"),
        }
    }

    /// The adapter of this upstream: its dialect bound to its parameters.
    pub fn build_adapter(&self) -> Result<Arc<dyn Adapter>, AdapterError> {
        let dialect = self
            .dialect
            .0
            .clone()
            .ok_or_else(|| AdapterError::Invalid {
                key: "adapter".to_string(),
                reason: format!("no dialect {:?} is loaded", self.adapter),
            })?;
        wsbridge_adapters::build_adapter(dialect, &self.adapter_params())
    }
}

fn d_1s() -> Duration {
    Duration::from_secs(1)
}
fn d_10s() -> Duration {
    Duration::from_secs(10)
}
fn d_30s() -> Duration {
    Duration::from_secs(30)
}
fn d_60s() -> Duration {
    Duration::from_secs(60)
}

// ---- `[limits]` ---------------------------------------------------------------------------

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

fn default_max_connections_per_token() -> usize {
    100
}
fn default_replay_memory_per_connection() -> u64 {
    8 * MIB
}
fn default_replay_memory_total() -> u64 {
    256 * MIB
}

impl LimitsConfig {
    /// Problems with the per-consumer and replay limits, as (key, reason).
    fn replay_problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if !(1..=1_000_000).contains(&self.max_connections_per_token) {
            out.push((
                "max_connections_per_token",
                "must be between 1 and 1000000".to_string(),
            ));
        }
        // A replay page holds at least one event, so a connection's share must fit a few.
        if !(64 * KIB..=GIB).contains(&self.replay_memory_per_connection) {
            out.push((
                "replay_memory_per_connection",
                "must be between 64KiB and 1GiB".to_string(),
            ));
        }
        if !(64 * KIB..=64 * GIB).contains(&self.replay_memory_total) {
            out.push((
                "replay_memory_total",
                "must be between 64KiB and 64GiB".to_string(),
            ));
        } else if self.replay_memory_total < self.replay_memory_per_connection {
            out.push((
                "replay_memory_total",
                "must be at least replay_memory_per_connection".to_string(),
            ));
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(3600))
            .contains(&self.replay_stall_timeout)
        {
            out.push((
                "replay_stall_timeout",
                "must be between 100ms and 1h".to_string(),
            ));
        }
        if !(1_000..=10_000_000).contains(&self.tracked_frames) {
            out.push((
                "tracked_frames",
                "must be between 1000 and 10000000".to_string(),
            ));
        }
        if !(1..=100_000).contains(&self.max_split_events) {
            out.push((
                "max_split_events",
                "must be between 1 and 100000".to_string(),
            ));
        }
        if self.max_durables > 10_000 {
            out.push(("max_durables", "must be at most 10000".to_string()));
        }
        if !(1..=1_000_000).contains(&self.max_unacked) {
            out.push(("max_unacked", "must be between 1 and 1000000".to_string()));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(365 * 24 * 3600))
            .contains(&self.durable_ttl)
        {
            out.push(("durable_ttl", "must be between 1s and 365d".to_string()));
        }
        if !(1..=1_000_000).contains(&self.durable_dead_letters) {
            out.push((
                "durable_dead_letters",
                "must be between 1 and 1000000".to_string(),
            ));
        }
        out
    }
}

/// Parses a size: a number of bytes, or a string with a unit (`"64KiB"`, `"8MiB"`, `"1GiB"`;
/// `B`, `KiB`, `MiB`, `GiB`, also `KB`/`MB`/`GB` as the same binary units).
pub(crate) fn parse_byte_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size like \"65536\", \"64KiB\" or \"8MiB\""))?;
    let unit_bytes = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" | "KiB" => KIB,
        "M" | "MB" | "MiB" => MIB,
        "G" | "GB" | "GiB" => GIB,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?}; use B, KiB, MiB or GiB"
            ))
        }
    };
    n.checked_mul(unit_bytes)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn de_byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Bytes(n) => Ok(n),
        Size::Text(s) => parse_byte_size(&s).map_err(serde::de::Error::custom),
    }
}

// ---- end of `[limits]` --------------------------------------------------------------------

/// One problem with a config: the dotted key and why it is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigIssue {
    /// `upstreams[1].token`, `server.listen`, or `(file)` for the file as a whole.
    pub key: String,
    /// What is wrong, in words an operator can act on.
    pub reason: String,
    /// The `name` of the `[[upstreams]]`, `[[webhooks]]`, `[[routes]]` or `[[consumers]]`
    /// entry the key is in, when it has one: an index alone is hard to find in a long file.
    pub item: Option<String>,
}

impl fmt::Display for ConfigIssue {
    /// `webhooks[1] ("lan-hook").url: reason`, or `key: reason` outside a named entry.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.item, self.key.find(']')) {
            (Some(name), Some(end)) => write!(
                f,
                "{} ({name:?}){}: {}",
                &self.key[..=end],
                &self.key[end + 1..],
                self.reason
            ),
            _ => write!(f, "{}: {}", self.key, self.reason),
        }
    }
}

/// Every problem found in a config; the config is refused as a whole.
#[derive(Debug, thiserror::Error)]
#[error("invalid config ({} problem{}):\n{}", .0.len(), if .0.len() == 1 { "" } else { "s" },
    .0.iter().map(|i| format!("  - {i}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError(pub Vec<ConfigIssue>);

fn issue(key: impl Into<String>, reason: impl Into<String>) -> ConfigIssue {
    ConfigIssue {
        key: key.into(),
        reason: reason.into(),
        item: None,
    }
}

/// The array-of-tables sections whose entries have a `name`.
const NAMED_SECTIONS: [&str; 4] = ["upstreams", "webhooks", "routes", "consumers"];

/// Longest entry name quoted in an issue (a name is shown, not trusted to be short).
const MAX_SHOWN_NAME: usize = 64;

/// Each named section's entry names in file order (`None` where an entry has no string
/// `name`), read from the raw tree so that an entry that fails to parse is named too.
fn entry_names(
    top: &serde_json::Map<String, Value>,
) -> BTreeMap<&'static str, Vec<Option<String>>> {
    NAMED_SECTIONS
        .into_iter()
        .map(|section| {
            let names = match top.get(section) {
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|item| {
                        item.get("name")
                            .and_then(Value::as_str)
                            .filter(|n| !n.is_empty())
                            .map(|n| n.chars().take(MAX_SHOWN_NAME).collect())
                    })
                    .collect(),
                _ => Vec::new(),
            };
            (section, names)
        })
        .collect()
}

/// Sets [`ConfigIssue::item`] of every issue whose key is inside a named entry.
fn name_items(issues: &mut [ConfigIssue], names: &BTreeMap<&'static str, Vec<Option<String>>>) {
    for i in issues.iter_mut() {
        let Some((section, rest)) = i.key.split_once('[') else {
            continue;
        };
        let Some(index) = rest
            .split_once(']')
            .and_then(|(n, _)| n.parse::<usize>().ok())
        else {
            continue;
        };
        if let Some(Some(name)) = names.get(section).and_then(|list| list.get(index)) {
            i.item = Some(name.clone());
        }
    }
}

/// `key` (`routes[k].to[0]`, `[k].token`) with the leading index `k`, a position in the list
/// of parsed entries, replaced by that entry's position in the file, and `section` in front.
fn at_file_position(section: &str, key: &str, positions: &[usize]) -> String {
    let rest = key.strip_prefix(section).unwrap_or(key);
    if let Some((index, tail)) = rest
        .strip_prefix('[')
        .and_then(|r| r.split_once(']'))
        .and_then(|(n, tail)| Some((n.parse::<usize>().ok()?, tail)))
    {
        if let Some(pos) = positions.get(index) {
            return format!("{section}[{pos}]{tail}");
        }
    }
    format!("{section}{rest}")
}

/// Where each parsed entry of the array sections sits in the file (an entry that failed to
/// parse is skipped, so the k-th parsed one may be a later one in the file).
#[derive(Default)]
struct Positions {
    upstreams: Vec<usize>,
    webhooks: Vec<usize>,
    routes: Vec<usize>,
}

impl Config {
    /// Loads `path`, applies `WSBRIDGE_*` overrides from the process environment, expands
    /// `${VAR}` and validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError(vec![issue(
                "(file)",
                format!("cannot read {}: {e}", path.display()),
            )])
        })?;
        let base = path.parent().unwrap_or(Path::new(""));
        Self::from_toml_in(&text, |name| std::env::var(name).ok(), true, base)
    }

    /// Builds a config from TOML text; `env` resolves `${VAR}`, and `use_env_overrides` adds
    /// the `WSBRIDGE_*` layer (off for tests and the demo, which must not depend on the shell).
    /// Relative `[dialects] paths` are relative to the current directory.
    pub fn from_toml(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
        use_env_overrides: bool,
    ) -> Result<Config, ConfigError> {
        Self::from_toml_in(text, env, use_env_overrides, Path::new(""))
    }

    /// [`Config::from_toml`] with relative `[dialects] paths` taken from `base_dir` (the
    /// config file's folder).
    pub fn from_toml_in(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
        use_env_overrides: bool,
        base_dir: &Path,
    ) -> Result<Config, ConfigError> {
        let mut figment = Figment::new().merge(Toml::string(text));
        if use_env_overrides {
            figment = figment.merge(
                Env::prefixed("WSBRIDGE_")
                    .filter(|k| k.as_str().contains("__"))
                    .split("__"),
            );
        }
        let mut tree: Value = figment
            .extract()
            .map_err(|e| ConfigError(e.into_iter().map(figment_issue).collect()))?;
        let mut issues = Vec::new();
        expand_env(&mut tree, &mut String::new(), &env, &mut issues);
        let config = Self::from_tree(tree, base_dir, &mut issues);
        match config {
            Some(c) if issues.is_empty() => Ok(c),
            _ => Err(ConfigError(issues)),
        }
    }

    fn from_tree(tree: Value, base_dir: &Path, issues: &mut Vec<ConfigIssue>) -> Option<Config> {
        let Value::Object(mut top) = tree else {
            issues.push(issue("(file)", "the config must be a TOML table"));
            return None;
        };
        let names = entry_names(&top);
        let tls = TlsTables::take(&mut top);
        let mut positions = Positions::default();
        let server = section(top.remove("server"), "server", issues).unwrap_or_default();
        let storage: StorageConfig =
            section(top.remove("storage"), "storage", issues).unwrap_or_default();
        let limits: LimitsConfig =
            section(top.remove("limits"), "limits", issues).unwrap_or_default();
        let mut dialects: DialectsConfig =
            section(top.remove("dialects"), "dialects", issues).unwrap_or_default();
        let telemetry: crate::traces::TelemetryConfig =
            section(top.remove("telemetry"), "telemetry", issues).unwrap_or_default();
        for p in &mut dialects.paths {
            if p.is_relative() {
                *p = base_dir.join(&*p);
            }
        }
        let registry = match Registry::load(&dialects.paths) {
            Ok(r) => r,
            Err(errors) => {
                issues.extend(
                    errors
                        .into_iter()
                        .map(|e| issue(format!("dialects.paths[{}]", e.index), e.message)),
                );
                Registry::default()
            }
        };
        // Each upstream keeps its position in the file, so later checks name the right entry
        // even when an earlier one failed to parse.
        let mut upstreams = Vec::new();
        match top.remove("upstreams") {
            None => {}
            Some(Value::Array(items)) => {
                for (i, item) in items.into_iter().enumerate() {
                    if let Some(u) =
                        parse_at::<UpstreamConfig>(item, &format!("upstreams[{i}]"), issues)
                    {
                        upstreams.push(u);
                        positions.upstreams.push(i);
                    }
                }
            }
            Some(_) => issues.push(issue(
                "upstreams",
                "must be an array of tables ([[upstreams]])",
            )),
        }
        let (webhooks, webhook_positions): (Vec<WebhookConfig>, _) =
            array_section(top.remove("webhooks"), "webhooks", issues);
        positions.webhooks = webhook_positions;
        let (routes, route_positions): (Vec<RouteConfig>, _) =
            array_section(top.remove("routes"), "routes", issues);
        positions.routes = route_positions;
        let (consumer_configs, consumer_positions): (Vec<ConsumerConfig>, _) =
            array_section(top.remove("consumers"), "consumers", issues);
        let consumers = match compile_consumers(&consumer_configs) {
            Ok(c) => c,
            Err(list) => {
                issues.extend(list.into_iter().map(|i| {
                    issue(
                        at_file_position("consumers", &i.key, &consumer_positions),
                        i.reason,
                    )
                }));
                Vec::new()
            }
        };
        let router = match Router::compile(&routes) {
            Ok(r) => r,
            Err(route_issues) => {
                issues.extend(route_issues.into_iter().map(|i| {
                    issue(
                        at_file_position("routes", &i.key, &positions.routes),
                        i.reason,
                    )
                }));
                Router::default()
            }
        };
        for key in top.keys() {
            issues.push(issue(
                key.clone(),
                "unknown section; expected server, storage, limits, dialects, telemetry, upstreams, webhooks, consumers or routes",
            ));
        }
        let mut config = Config {
            server,
            storage,
            upstreams,
            webhooks,
            routes,
            router: Arc::new(router),
            consumers,
            limits,
            dialects,
            registry,
            telemetry,
        };
        config.resolve_dialects(&positions, issues);
        config.load_tls(&positions, tls, issues);
        config.validate(&positions, issues);
        name_items(issues, &names);
        Some(config)
    }

    /// Finds each upstream's dialect and checks its parameters against it: an unknown
    /// `adapter`, an unknown key, a missing required one, a wrong type, a value the dialect's
    /// `check` refuses, and values a `unique = true` parameter shares with another upstream
    /// (same dialect, same `url`) are refused, each named with the upstream and the key.
    fn resolve_dialects(&mut self, positions: &Positions, issues: &mut Vec<ConfigIssue>) {
        let mut unique: BTreeMap<(String, String, String, String), usize> = BTreeMap::new();
        // When a dialect file did not load, its upstreams' `adapter` is not a second problem.
        let files_failed = issues.iter().any(|i| i.key.starts_with("dialects."));
        for (&i, u) in positions.upstreams.iter().zip(&mut self.upstreams) {
            let at = |k: &str| format!("upstreams[{i}].{k}");
            let Some(d) = self.registry.get(&u.adapter) else {
                if files_failed {
                    continue;
                }
                issues.push(issue(
                    at("adapter"),
                    format!(
                        "unknown adapter {:?}; expected a built-in dialect or one loaded from [dialects] paths: {}",
                        u.adapter,
                        self.registry.names().join(", ")
                    ),
                ));
                continue;
            };
            let params = u.adapter_params();
            let problems = d.param_problems(&params);
            for p in &problems {
                issues.push(issue(at(&p.key), p.reason.clone()));
            }
            for spec in d.params().filter(|p| p.unique) {
                let Some(value) = params.get(spec.name) else {
                    continue;
                };
                let url = u
                    .url
                    .as_ref()
                    .map(|u| u.as_str().trim_end_matches('/').to_string())
                    .unwrap_or_default();
                let key = (
                    d.name().to_string(),
                    url,
                    spec.name.to_string(),
                    value.to_string(),
                );
                if let Some(first) = unique.insert(key, i) {
                    let shown = if spec.secret {
                        "its value".to_string()
                    } else {
                        value.to_string()
                    };
                    issues.push(issue(
                        at(spec.name),
                        format!(
                            "{shown} at this url is already used by upstreams[{first}]; the {} dialect allows one connection per {} (unique = true)",
                            d.name(),
                            spec.name
                        ),
                    ));
                }
            }
            if problems.is_empty() {
                u.dialect = DialectRef(Some(d.clone()));
                // What the parameters alone cannot show: the connect URL and every frame the
                // connection sends, built once now.
                if let Err(e) = u.build_adapter() {
                    let key = match &e {
                        AdapterError::Missing { key, .. } | AdapterError::Invalid { key, .. } => {
                            key.clone()
                        }
                    };
                    issues.push(issue(at(&key), e.to_string()));
                }
            }
        }
    }

    /// Reads the files of every `tls_*` key (upstreams, webhooks, the NATS store, the server)
    /// into the config, so that it holds what they held at load and a reload re-reads them.
    fn load_tls(&mut self, positions: &Positions, tls: TlsTables, issues: &mut Vec<ConfigIssue>) {
        let mut upstream_tls = tls.upstreams;
        for (&i, u) in positions.upstreams.iter().zip(&mut self.upstreams) {
            let table = upstream_tls.get_mut(i).map(Value::take);
            let uses_tls = u.uses_tls();
            if let Some(t) = load_client_tls(&format!("upstreams[{i}]"), table, uses_tls, issues) {
                u.tls = t;
            }
        }
        let mut webhook_tls = tls.webhooks;
        for (&i, w) in positions.webhooks.iter().zip(&mut self.webhooks) {
            let table = webhook_tls.get_mut(i).map(Value::take);
            let uses_tls = w.url.scheme() == "https";
            if let Some(t) = load_client_tls(&format!("webhooks[{i}]"), table, uses_tls, issues) {
                w.tls = t;
            }
        }
        if self.storage.backend == StorageBackend::Nats {
            // A nats:// server may still ask for TLS, so the keys always apply.
            if let Some(t) = load_client_tls("storage", tls.storage, true, issues) {
                self.storage.tls = t;
            }
        }
        let server = &mut self.server;
        match (&server.tls_cert, &server.tls_key) {
            (Some(cert), Some(key)) => match ServerTls::load(cert, key) {
                Ok(tls) => server.tls = Some(tls),
                Err(problems) => issues.extend(
                    problems
                        .into_iter()
                        .map(|(k, reason)| issue(format!("server.{k}"), reason)),
                ),
            },
            (None, None) => {}
            (Some(_), None) => issues.push(issue(
                "server.tls_key",
                "server.tls_cert needs tls_key (its private key)",
            )),
            (None, Some(_)) => issues.push(issue(
                "server.tls_cert",
                "server.tls_key needs tls_cert (the certificate it belongs to)",
            )),
        }
    }

    /// Checks what types alone cannot: unique names, what each adapter needs, sane timings.
    /// `positions.upstreams[k]` is the file index of `self.upstreams[k]` (and so on).
    fn validate(&self, positions: &Positions, issues: &mut Vec<ConfigIssue>) {
        for (key, reason) in self.storage.nats_problems() {
            issues.push(issue(format!("storage.{key}"), reason));
        }
        for (key, reason) in self.storage.duration_problems() {
            issues.push(issue(format!("storage.{key}"), reason));
        }
        if let Some(reason) = out_of_bounds(
            self.server.shutdown_grace,
            Duration::ZERO,
            bounds::SHUTDOWN_GRACE_MAX,
        ) {
            issues.push(issue("server.shutdown_grace", reason));
        }
        for (key, reason) in self.limits.problems() {
            issues.push(issue(format!("limits.{key}"), reason));
        }
        for (key, reason) in self.limits.connection_problems() {
            issues.push(issue(format!("limits.{key}"), reason));
        }
        for (key, reason) in self.limits.replay_problems() {
            issues.push(issue(format!("limits.{key}"), reason));
        }
        for (key, reason) in self.telemetry.problems() {
            issues.push(issue(format!("telemetry.{key}"), reason));
        }
        if self.upstreams.is_empty() && !issues.iter().any(|i| i.key.starts_with("upstreams")) {
            issues.push(issue(
                "upstreams",
                "at least one [[upstreams]] entry is needed",
            ));
        }
        let mut webhook_names = BTreeMap::new();
        for (&i, w) in positions.webhooks.iter().zip(&self.webhooks) {
            for (key, reason) in w.problems() {
                issues.push(issue(format!("webhooks[{i}].{key}"), reason));
            }
            for (key, reason) in w.duration_problems() {
                issues.push(issue(format!("webhooks[{i}].{key}"), reason));
            }
            if let Some(first) = webhook_names.insert(w.name.as_str(), i) {
                issues.push(issue(
                    format!("webhooks[{i}].name"),
                    format!("{:?} is already used by webhooks[{first}]", w.name),
                ));
            }
        }
        for (&i, r) in positions.routes.iter().zip(&self.routes) {
            for (j, target) in r.to.iter().enumerate() {
                if !webhook_names.contains_key(target.as_str()) {
                    issues.push(issue(
                        format!("routes[{i}].to[{j}]"),
                        format!("no [[webhooks]] entry is named {target:?}"),
                    ));
                }
            }
        }
        let mut seen = BTreeMap::new();
        for (&i, u) in positions.upstreams.iter().zip(&self.upstreams) {
            let at = |k: &str| format!("upstreams[{i}].{k}");
            if u.name.is_empty()
                || !u
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                issues.push(issue(
                    at("name"),
                    "use letters, digits, '-', '_' or '.' (it becomes a URI)",
                ));
            }
            if let Some(first) = seen.insert(u.name.clone(), i) {
                issues.push(issue(
                    at("name"),
                    format!("{:?} is already used by upstreams[{first}]", u.name),
                ));
            }
            for (key, d, min, max) in [
                (
                    "backoff_initial",
                    u.backoff_initial,
                    bounds::TIMER_MIN,
                    bounds::BACKOFF_MAX,
                ),
                (
                    "backoff_max",
                    u.backoff_max,
                    bounds::TIMER_MIN,
                    bounds::BACKOFF_MAX,
                ),
                (
                    "stale_after",
                    u.stale_after,
                    bounds::TIMER_MIN,
                    bounds::STALE_AFTER_MAX,
                ),
                (
                    "healthy_after",
                    u.healthy_after,
                    Duration::ZERO,
                    bounds::STALE_AFTER_MAX,
                ),
                (
                    "connect_timeout",
                    u.connect_timeout,
                    bounds::TIMER_MIN,
                    bounds::TIMEOUT_MAX,
                ),
            ] {
                if let Some(reason) = out_of_bounds(d, min, max) {
                    issues.push(issue(at(key), reason));
                }
            }
            if u.backoff_initial > u.backoff_max {
                issues.push(issue(at("backoff_initial"), "is longer than backoff_max"));
            }
            if let Some(reason) = u
                .ping_interval
                .and_then(|d| out_of_bounds(d, bounds::TIMER_MIN, bounds::PING_INTERVAL_MAX))
            {
                issues.push(issue(at("ping_interval"), reason));
            }
            // Without its own ping_interval an upstream beats at its dialect's interval.
            let ping = u
                .ping_interval
                .or_else(|| {
                    self.registry
                        .get(&u.adapter)
                        .and_then(|d| d.heartbeat_interval())
                })
                .unwrap_or(crate::upstream::DEFAULT_PING_INTERVAL);
            if u.stale_after <= ping {
                issues.push(issue(
                    at("stale_after"),
                    "must be longer than ping_interval (or the dialect's [heartbeat] interval), or every quiet connection looks stale",
                ));
            }
        }
    }
}

/// The `tls_*` keys ([`TlsSettings::KEYS`]) of every connection, taken out of its table
/// before the table is read: one definition of the keys serves upstreams, webhooks and
/// `[storage]`, and each table's own fields stay what is particular to it.
struct TlsTables {
    /// Per `[[upstreams]]` entry, in file order.
    upstreams: Vec<Value>,
    /// Per `[[webhooks]]` entry, in file order.
    webhooks: Vec<Value>,
    /// `[storage]`'s.
    storage: Option<Value>,
}

impl TlsTables {
    fn take(top: &mut serde_json::Map<String, Value>) -> TlsTables {
        let mut entries = |section: &str| match top.get_mut(section) {
            Some(Value::Array(items)) => items.iter_mut().map(take_tls_keys).collect(),
            _ => Vec::new(),
        };
        TlsTables {
            upstreams: entries("upstreams"),
            webhooks: entries("webhooks"),
            storage: top.get_mut("storage").map(take_tls_keys),
        }
    }
}

/// Removes the `tls_*` keys from a table, returning them as a table of their own.
fn take_tls_keys(table: &mut Value) -> Value {
    let mut taken = serde_json::Map::new();
    if let Value::Object(map) = table {
        for key in TlsSettings::KEYS {
            if let Some(v) = map.remove(key) {
                taken.insert(key.to_string(), v);
            }
        }
    }
    Value::Object(taken)
}

/// Loads one connection's `tls_*` keys (`at` is its key prefix, `upstreams[2]`), recording
/// every problem; `None` when there is one, or when the connection does not use TLS (then a
/// `tls_*` key set is itself a problem: it would do nothing).
fn load_client_tls(
    at: &str,
    table: Option<Value>,
    uses_tls: bool,
    issues: &mut Vec<ConfigIssue>,
) -> Option<ClientTls> {
    let keys: TlsSettings = match table {
        Some(t) => parse_at(t, at, issues)?,
        None => TlsSettings::default(),
    };
    if !uses_tls {
        if let Some(key) = keys.first_set() {
            issues.push(issue(
                format!("{at}.{key}"),
                "only applies to a TLS URL (wss:// or https://)",
            ));
        }
        return None;
    }
    match ClientTls::load(&keys) {
        Ok(tls) => Some(tls),
        Err(problems) => {
            issues.extend(
                problems
                    .into_iter()
                    .map(|(key, reason)| issue(format!("{at}.{key}"), reason)),
            );
            None
        }
    }
}

/// Parses an array-of-tables section element by element (an entry that fails is skipped,
/// its problem recorded), so one typo does not hide the next. Returns the parsed entries and
/// each one's position in the file.
fn array_section<T: DeserializeOwned>(
    v: Option<Value>,
    key: &str,
    issues: &mut Vec<ConfigIssue>,
) -> (Vec<T>, Vec<usize>) {
    match v {
        None => (Vec::new(), Vec::new()),
        Some(Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .filter_map(|(i, item)| Some((parse_at(item, &format!("{key}[{i}]"), issues)?, i)))
            .unzip(),
        Some(_) => {
            issues.push(issue(
                key,
                format!("must be an array of tables ([[{key}]])"),
            ));
            (Vec::new(), Vec::new())
        }
    }
}

fn section<T: DeserializeOwned>(
    v: Option<Value>,
    key: &str,
    issues: &mut Vec<ConfigIssue>,
) -> Option<T> {
    parse_at(v?, key, issues)
}

fn parse_at<T: DeserializeOwned>(v: Value, key: &str, issues: &mut Vec<ConfigIssue>) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(v) {
        Ok(t) => Some(t),
        Err(e) => {
            let path = e.path().to_string();
            let full = if path == "." {
                key.to_string()
            } else {
                format!("{key}.{path}")
            };
            issues.push(issue(full, e.into_inner().to_string()));
            None
        }
    }
}

fn figment_issue(e: figment::Error) -> ConfigIssue {
    let key = if e.path.is_empty() {
        "(file)".to_string()
    } else {
        e.path.join(".")
    };
    issue(key, e.kind.to_string())
}

/// Replaces `${VAR}` and `${VAR:-default}` in every string of the tree; an unset variable
/// without a default is an issue at that key. `$$` writes a literal `$`.
fn expand_env(
    v: &mut Value,
    path: &mut String,
    env: &impl Fn(&str) -> Option<String>,
    issues: &mut Vec<ConfigIssue>,
) {
    match v {
        Value::String(s) if s.contains('$') => match expand_str(s, env) {
            Ok(out) => *s = out,
            Err(reason) => issues.push(issue(path.clone(), reason)),
        },
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                expand_env(item, path, env, issues);
                path.truncate(len);
            }
        }
        Value::Object(map) => {
            for (k, item) in map.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                expand_env(item, path, env, issues);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

fn expand_str(s: &str, env: &impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body.find('}').ok_or_else(|| {
                "unclosed ${ (a `}` is missing; `$$` is a literal `$`)".to_string()
            })?;
            let expr = &body[..end];
            let (name, default) = match expr.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (expr, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("${{{expr}}} is not a valid variable reference"));
            }
            match (env(name), default) {
                (Some(val), _) => out.push_str(&val),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(format!(
                        "environment variable {name} is not set (write ${{{name}:-default}} for a fallback)"
                    ))
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn de_opt_ws_url<'de, D: Deserializer<'de>>(d: D) -> Result<Option<url::Url>, D::Error> {
    let s = String::deserialize(d)?;
    let u = url::Url::parse(&s).map_err(|e| serde::de::Error::custom(format!("not a URL: {e}")))?;
    if !matches!(u.scheme(), "ws" | "wss") || u.host_str().is_none() {
        return Err(serde::de::Error::custom(format!(
            "{} must be a ws:// or wss:// URL with a host",
            shown_url(&u)
        )));
    }
    Ok(Some(u))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::config::MAX_NATS_PREFIX;

    fn env(name: &str) -> Option<String> {
        match name {
            "TOKEN" => Some("t0k".into()),
            _ => None,
        }
    }

    /// Asserts that `text` is refused with (at least) a problem at each of `keys`.
    fn assert_refused(text: &str, keys: &[&str]) {
        let found: Vec<String> = Config::from_toml(text, env, false)
            .unwrap_err()
            .0
            .into_iter()
            .map(|i| i.key)
            .collect();
        for key in keys {
            assert!(
                found.iter().any(|k| k == key),
                "{key} missing from {found:?}"
            );
        }
    }

    const GOOD: &str = r#"
        [server]
        listen = "127.0.0.1:0"
        [[upstreams]]
        name = "vb"
        adapter = "voipbin"
        url = "ws://127.0.0.1:9102/v1.0/ws"
        token = "${TOKEN}"
        topics = ["customer_id:abc123:call:*"]
        backoff_initial = "50ms"
    "#;

    #[test]
    fn loads_and_expands() {
        let c = Config::from_toml(GOOD, env, false).unwrap();
        assert_eq!(c.upstreams[0].params.0["token"], "t0k");
        assert_eq!(c.upstreams[0].backoff_initial, Duration::from_millis(50));
        assert_eq!(c.upstreams[0].backoff_max, Duration::from_secs(30));
        assert_eq!(c.storage.backend, StorageBackend::Embedded);
    }

    #[test]
    fn expansion_rules() {
        assert_eq!(expand_str("a${TOKEN}b", &env).unwrap(), "at0kb");
        assert_eq!(expand_str("${NOPE:-x}", &env).unwrap(), "x");
        assert_eq!(expand_str("$$5 and $x", &env).unwrap(), "$5 and $x");
        assert!(expand_str("${NOPE}", &env)
            .unwrap_err()
            .contains("NOPE is not set"));
        assert!(expand_str("${TOKEN", &env).is_err());
    }

    #[test]
    fn reports_every_problem_with_its_key() {
        let bad = r#"
            colour = "blue"
            [server]
            listen = "nowhere"
            [[upstreams]]
            name = "a"
            adapter = "voipbin"
            url = "http://x"
            [[upstreams]]
            name = "a"
            adapter = "hashi"
            url = "ws://h/"
            token = "${MISSING}"
            [[upstreams]]
            name = "a"
            adapter = "voicepact"
            url = "ws://h/api/v1/ws"
            stale_after = "1s"
            ping_interval = "2s"
            [[upstreams]]
            name = "d"
            adapter = "voicepact"
            url = "ws://h/api/v1/ws"
            client_id = "+1"
            ping_interval = "soon"
        "#;
        let err = Config::from_toml(bad, env, false).unwrap_err();
        let keys: Vec<&str> = err.0.iter().map(|i| i.key.as_str()).collect();
        for want in [
            "colour",
            "server.listen",
            "upstreams[0].url",
            "upstreams[1].token",
            "upstreams[3].ping_interval",
            "upstreams[2].name",
            "upstreams[2].client_id",
            "upstreams[2].stale_after",
        ] {
            assert!(keys.contains(&want), "missing {want} in {err}");
        }
        assert!(!err.to_string().contains("t0k"));
    }

    #[test]
    fn limits_have_safe_defaults_and_bad_values_name_their_key() {
        let c = Config::from_toml(GOOD, env, false).unwrap();
        assert_eq!(c.limits, LimitsConfig::default());
        assert_eq!(c.limits.max_event_bytes, 1024 * 1024 - 8 * 1024);
        assert_eq!(c.limits.max_depth, 64);
        assert!(c.limits.max_upstream_frame_bytes() > c.limits.max_event_bytes);
        assert!(c.limits.max_downstream_frame_bytes() > c.limits.max_event_bytes);

        let set = format!("{GOOD}\n[limits]\nmax_event_bytes = 300000\nmax_depth = 20\n");
        let c = Config::from_toml(&set, env, false).unwrap();
        assert_eq!(
            (c.limits.max_event_bytes, c.limits.max_depth),
            (300_000, 20)
        );

        for (text, key) in [
            ("max_event_bytes = 10", "limits.max_event_bytes"),
            ("max_event_bytes = 1000000000000", "limits.max_event_bytes"),
            ("max_depth = 0", "limits.max_depth"),
            ("max_depth = 127", "limits.max_depth"),
            ("max_depth = -1", "limits.max_depth"),
            ("max_depht = 3", "limits.max_depht"),
        ] {
            let bad = format!("{GOOD}\n[limits]\n{text}\n");
            let err = Config::from_toml(&bad, env, false).unwrap_err();
            assert!(err.0.iter().any(|i| i.key == key), "{text}: {err}");
        }
    }

    #[test]
    fn replay_limits_have_defaults_and_bad_values_name_their_keys() {
        let c = Config::from_toml(GOOD, env, false).unwrap();
        assert_eq!(c.limits, LimitsConfig::default());
        assert_eq!(c.limits.replay_memory_per_connection, 8 * 1024 * 1024);
        let set = format!(
            "{GOOD}\n[limits]\nmax_connections_per_token = 3\nreplay_memory_per_connection = \"1MiB\"\nreplay_memory_total = 4194304\nreplay_stall_timeout = \"2s\"\n"
        );
        let c = Config::from_toml(&set, env, false).unwrap();
        assert_eq!(c.limits.max_connections_per_token, 3);
        assert_eq!(c.limits.replay_memory_per_connection, 1024 * 1024);
        assert_eq!(c.limits.replay_memory_total, 4 * 1024 * 1024);
        assert_eq!(c.limits.replay_stall_timeout, Duration::from_secs(2));
        let bad = format!(
            "{GOOD}\n[limits]\nmax_connections_per_token = 0\nreplay_memory_per_connection = \"2GiB\"\nreplay_memory_total = \"1MiB\"\nreplay_stall_timeout = \"10ms\"\n"
        );
        assert_refused(
            &bad,
            &[
                "limits.max_connections_per_token",
                "limits.replay_memory_per_connection",
                "limits.replay_memory_total",
                "limits.replay_stall_timeout",
            ],
        );
        let unit = format!("{GOOD}\n[limits]\nreplay_memory_total = \"8 parsecs\"\n");
        let err = Config::from_toml(&unit, env, false).unwrap_err();
        assert_eq!(err.0[0].key, "limits.replay_memory_total", "{err}");
        assert_eq!(parse_byte_size("64KiB"), Ok(64 * 1024));
        assert_eq!(parse_byte_size("7"), Ok(7));
        assert!(parse_byte_size("99999999999999GiB").is_err());
    }

    #[test]
    fn secrets_do_not_print() {
        let c = Config::from_toml(GOOD, env, false).unwrap();
        assert!(!format!("{c:?}").contains("t0k"));
    }

    #[test]
    fn nats_storage_is_accepted_with_a_url_or_a_list() {
        let one =
            format!("{GOOD}\n[storage]\nbackend = \"nats\"\nurl = \"nats://127.0.0.1:4222\"\n");
        let c = Config::from_toml(&one, env, false).unwrap();
        assert_eq!(c.storage.backend, StorageBackend::Nats);
        assert_eq!(c.storage.url, vec!["nats://127.0.0.1:4222".to_string()]);
        assert_eq!(c.storage.prefix, "wsbridge");
        assert_eq!(c.storage.replicas, 1);
        assert_eq!(c.upstreams[0].ownership(), Ownership::All);
        let list = format!(
            "{GOOD}\nownership = \"lease\"\n[storage]\nbackend = \"nats\"\nurl = [\"nats://a:4222\", \"tls://b:4222\"]\nreplicas = 3\nprefix = \"prod-1\"\ntoken = \"${{TOKEN}}\"\n"
        );
        let c = Config::from_toml(&list, env, false).unwrap();
        assert_eq!(c.storage.url.len(), 2);
        assert_eq!(c.storage.replicas, 3);
        assert_eq!(c.upstreams[0].ownership(), Ownership::Lease);
        assert!(
            !format!("{c:?}").contains("t0k"),
            "the NATS token never prints"
        );
    }

    #[test]
    fn nats_storage_problems_name_their_keys() {
        let bad = format!(
            "{GOOD}\n[storage]\nbackend = \"nats\"\nurl = [\"http://x\"]\nprefix = \"a.b\"\nreplicas = 7\ncredentials = \"/nonexistent/x.creds\"\ntoken = \"t\"\ntls_cert = \"/nonexistent/c.pem\"\nlease_ttl = \"10ms\"\n"
        );
        assert_refused(
            &bad,
            &[
                "storage.url",
                "storage.prefix",
                "storage.replicas",
                "storage.token",
                "storage.tls_key",
                "storage.credentials",
                "storage.tls_cert",
                "storage.lease_ttl",
            ],
        );
        let missing = format!("{GOOD}\n[storage]\nbackend = \"nats\"\n");
        let err = Config::from_toml(&missing, env, false).unwrap_err();
        assert_eq!(err.0[0].key, "storage.url");
        let bad_ownership = format!("{GOOD}\nownership = \"some\"\n");
        let err = Config::from_toml(&bad_ownership, env, false).unwrap_err();
        assert!(err.0[0].key.starts_with("upstreams[0]"), "{err}");
    }

    #[test]
    fn connection_limits_default_and_are_bounded() {
        let c = Config::from_toml(GOOD, env, false).unwrap();
        assert_eq!(c.limits, LimitsConfig::default());
        assert_eq!(c.limits.header_timeout, Duration::from_secs(10));
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.limits.max_connections, None);
        let set = format!(
            "{GOOD}\n[limits]\nmax_connections = 500\nheader_timeout = \"2s\"\nidle_timeout = \"5m\"\n"
        );
        let c = Config::from_toml(&set, env, false).unwrap();
        assert_eq!(c.limits.max_connections, Some(500));
        assert_eq!(c.limits.header_timeout, Duration::from_secs(2));
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(300));
        let bad = format!(
            "{GOOD}\n[limits]\nmax_connections = 0\nheader_timeout = \"20m\"\nidle_timeout = \"0s\"\n"
        );
        assert_refused(
            &bad,
            &[
                "limits.max_connections",
                "limits.header_timeout",
                "limits.idle_timeout",
            ],
        );
        let negative = format!("{GOOD}\n[limits]\nmax_connections = -1\n");
        let err = Config::from_toml(&negative, env, false).unwrap_err();
        assert_eq!(err.0[0].key, "limits.max_connections", "{err}");
    }

    #[test]
    fn a_nats_prefix_too_long_for_bounded_subjects_is_refused() {
        let storage = |prefix: &str| {
            format!("{GOOD}\n[storage]\nbackend = \"nats\"\nurl = \"nats://127.0.0.1:4222\"\nprefix = \"{prefix}\"\n")
        };
        let longest = "p".repeat(MAX_NATS_PREFIX);
        assert!(Config::from_toml(&storage(&longest), env, false).is_ok());
        let err = Config::from_toml(&storage(&format!("{longest}p")), env, false).unwrap_err();
        assert_eq!(err.0[0].key, "storage.prefix", "{err}");
        assert!(err.to_string().contains("at most 64"), "{err}");
    }
}
