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
use wsbridge_adapters::{Provider, Secret, UpstreamSettings};

use crate::delivery::WebhookConfig;
use crate::downstream::{compile_consumers, Consumer, ConsumerConfig};
use crate::routing::{RouteConfig, Router};
use crate::storage::embedded::Durability;

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
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            admin_token: None,
            shutdown_grace: d_10s(),
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

/// Which store holds the journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// One embedded database file; nothing to install.
    #[default]
    Embedded,
    /// NATS JetStream, for several bridge instances.
    Nats,
}

/// `[storage]`: where events are journalled.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// `embedded` (default) or `nats`.
    #[serde(default)]
    pub backend: StorageBackend,
    /// The embedded database file.
    #[serde(default = "default_storage_path")]
    pub path: PathBuf,
    /// `normal` (survives a process crash) or `full` (also power loss; an fsync per commit).
    #[serde(default, deserialize_with = "de_durability")]
    pub durability: Durability,
    /// How long the journal keeps events (resume, replay and dedup reach back this far);
    /// `None` (`"0s"` in the file) keeps everything. Bounds the database file.
    #[serde(default = "default_retention", deserialize_with = "de_retention")]
    pub retention: Option<Duration>,
    /// NATS server URLs (`url = "nats://h:4222"` or a list for a cluster); `nats` only.
    #[serde(default, deserialize_with = "de_string_or_list")]
    pub url: Vec<String>,
    /// Prefix of every stream, consumer, subject and bucket name, so that several bridges (or
    /// test runs) can share one NATS account without seeing each other.
    #[serde(default = "default_nats_prefix")]
    pub prefix: String,
    /// JetStream replicas of the journal and its companions (1, 3 or 5 in a cluster).
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// A NATS `.creds` file (JWT + nkey seed).
    #[serde(default)]
    pub credentials: Option<PathBuf>,
    /// A NATS auth token (instead of `credentials`).
    #[serde(default, deserialize_with = "de_opt_secret")]
    pub token: Option<Secret>,
    /// Require TLS even for `nats://` URLs.
    #[serde(default)]
    pub tls_required: bool,
    /// PEM file of the CA that signed the NATS servers' certificates.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with `tls_key`).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// How long an upstream lease (`ownership = "lease"`) lives without renewal: the most an
    /// upstream stays unread after its holder dies.
    #[serde(default = "d_5s", deserialize_with = "de_duration")]
    pub lease_ttl: Duration,
    /// The journal's duplicate window: copies of one event id published within it (two
    /// instances, a retry after an outage) are stored once.
    #[serde(default = "d_2m", deserialize_with = "de_duration")]
    pub duplicate_window: Duration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: StorageBackend::Embedded,
            path: default_storage_path(),
            durability: Durability::Normal,
            retention: default_retention(),
            url: Vec::new(),
            prefix: default_nats_prefix(),
            replicas: default_replicas(),
            credentials: None,
            token: None,
            tls_required: false,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            lease_ttl: d_5s(),
            duplicate_window: d_2m(),
        }
    }
}

fn default_retention() -> Option<Duration> {
    Some(Duration::from_secs(7 * 24 * 3600))
}

fn de_retention<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let d = de_duration(d)?;
    if d.is_zero() {
        Ok(None)
    } else if d < Duration::from_secs(60) {
        Err(serde::de::Error::custom(
            "must be at least 1m (or \"0s\" to keep everything)",
        ))
    } else {
        Ok(Some(d))
    }
}

fn default_nats_prefix() -> String {
    "wsbridge".to_string()
}

fn default_replicas() -> usize {
    1
}

fn d_5s() -> Duration {
    Duration::from_secs(5)
}

fn d_2m() -> Duration {
    Duration::from_secs(120)
}

impl StorageConfig {
    /// Problems with the NATS settings, as (key, reason); empty for the embedded backend.
    fn nats_problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.backend != StorageBackend::Nats {
            return out;
        }
        if self.url.is_empty() {
            out.push((
                "url",
                "the nats backend needs at least one server URL".to_string(),
            ));
        }
        for u in &self.url {
            match url::Url::parse(u) {
                Ok(parsed)
                    if matches!(parsed.scheme(), "nats" | "tls") && parsed.host().is_some() => {}
                Ok(_) => out.push((
                    "url",
                    format!("{u:?}: use nats://host:port or tls://host:port"),
                )),
                Err(e) => out.push(("url", format!("{u:?}: {e}"))),
            }
        }
        if self.prefix.is_empty()
            || !self
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        {
            out.push((
                "prefix",
                "use letters, digits, '-' or '_' (it names streams, subjects and buckets)"
                    .to_string(),
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            out.push(("replicas", "must be between 1 and 5".to_string()));
        }
        if self.credentials.is_some() && self.token.is_some() {
            out.push((
                "token",
                "give either credentials or token, not both".to_string(),
            ));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            out.push(("tls_key", "tls_cert and tls_key go together".to_string()));
        }
        for (key, file) in [
            ("credentials", &self.credentials),
            ("tls_ca", &self.tls_ca),
            ("tls_cert", &self.tls_cert),
            ("tls_key", &self.tls_key),
        ] {
            if let Some(f) = file {
                if !f.is_file() {
                    out.push((key, format!("{} is not a readable file", f.display())));
                }
            }
        }
        if self.lease_ttl < Duration::from_secs(1) {
            out.push(("lease_ttl", "must be at least 1s".to_string()));
        }
        if self.duplicate_window < Duration::from_secs(1) {
            out.push(("duplicate_window", "must be at least 1s".to_string()));
        }
        out
    }
}

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

fn default_storage_path() -> PathBuf {
    PathBuf::from("data/wsbridge.db")
}

/// `[[upstreams]]`: one provider connection and how to keep it alive.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Unique name; becomes the envelope `source` (`wsbridge://<name>`) and every log line's
    /// `upstream` field.
    pub name: String,
    /// The dialect: `voicepact`, `voipbin` or `hashi`.
    #[serde(deserialize_with = "de_provider")]
    pub adapter: Provider,
    /// Base URL; the adapter appends its path or query (see the adapter's docs).
    #[serde(deserialize_with = "de_ws_url")]
    pub url: url::Url,
    /// VoicePact connection identity.
    #[serde(default)]
    pub client_id: Option<String>,
    /// VoIPBIN / Hashi token.
    #[serde(default, deserialize_with = "de_opt_secret")]
    pub token: Option<Secret>,
    /// VoIPBIN topics.
    #[serde(default)]
    pub topics: Vec<String>,
    /// Hashi lobby rooms.
    #[serde(default)]
    pub lobbies: Vec<String>,
    /// First reconnect delay; doubles per failure up to `backoff_max`.
    #[serde(default = "d_1s", deserialize_with = "de_duration")]
    pub backoff_initial: Duration,
    /// Longest reconnect delay, also the delay after an auth failure.
    #[serde(default = "d_30s", deserialize_with = "de_duration")]
    pub backoff_max: Duration,
    /// How often the heartbeat is sent.
    #[serde(default = "d_20s", deserialize_with = "de_duration")]
    pub ping_interval: Duration,
    /// A connection with no inbound frame for this long is stale and is reconnected.
    #[serde(default = "d_60s", deserialize_with = "de_duration")]
    pub stale_after: Duration,
    /// A connection subscribed for this long counts as healthy and resets the backoff.
    #[serde(default = "d_10s", deserialize_with = "de_duration")]
    pub healthy_after: Duration,
    /// Limit on TCP connect plus the WebSocket handshake (and the greeting, where one is due).
    #[serde(default = "d_10s", deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// With the nats backend: `all` or `lease` (default `lease` for VoicePact, which keeps
    /// one socket per client_id, `all` for the others). Ignored by the embedded backend.
    #[serde(default)]
    pub ownership: Option<Ownership>,
}

impl UpstreamConfig {
    /// The ownership mode in force: the configured one, or the adapter's default.
    pub fn ownership(&self) -> Ownership {
        self.ownership.unwrap_or(match self.adapter {
            Provider::VoicePact => Ownership::Lease,
            Provider::Voipbin | Provider::Hashi => Ownership::All,
        })
    }

    /// The adapter's view of this upstream.
    pub fn adapter_settings(&self) -> UpstreamSettings {
        UpstreamSettings {
            url: self.url.clone(),
            client_id: self.client_id.clone(),
            token: self.token.clone(),
            topics: self.topics.clone(),
            lobbies: self.lobbies.clone(),
        }
    }
}

fn d_1s() -> Duration {
    Duration::from_secs(1)
}
fn d_10s() -> Duration {
    Duration::from_secs(10)
}
fn d_20s() -> Duration {
    Duration::from_secs(20)
}
fn d_30s() -> Duration {
    Duration::from_secs(30)
}
fn d_60s() -> Duration {
    Duration::from_secs(60)
}

/// One problem with a config: the dotted key and why it is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigIssue {
    /// `upstreams[1].token`, `server.listen`, or `(file)` for the file as a whole.
    pub key: String,
    /// What is wrong, in words an operator can act on.
    pub reason: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
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
    }
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
        Self::from_toml(&text, |name| std::env::var(name).ok(), true)
    }

    /// Builds a config from TOML text; `env` resolves `${VAR}`, and `use_env_overrides` adds
    /// the `WSBRIDGE_*` layer (off for tests and the demo, which must not depend on the shell).
    pub fn from_toml(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
        use_env_overrides: bool,
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
        let config = Self::from_tree(tree, &mut issues);
        match config {
            Some(c) if issues.is_empty() => Ok(c),
            _ => Err(ConfigError(issues)),
        }
    }

    fn from_tree(tree: Value, issues: &mut Vec<ConfigIssue>) -> Option<Config> {
        let Value::Object(mut top) = tree else {
            issues.push(issue("(file)", "the config must be a TOML table"));
            return None;
        };
        let server = section(top.remove("server"), "server", issues).unwrap_or_default();
        let storage: StorageConfig =
            section(top.remove("storage"), "storage", issues).unwrap_or_default();
        // Each upstream keeps its position in the file, so later checks name the right entry
        // even when an earlier one failed to parse.
        let mut upstreams = Vec::new();
        let mut positions = Vec::new();
        match top.remove("upstreams") {
            None => {}
            Some(Value::Array(items)) => {
                for (i, item) in items.into_iter().enumerate() {
                    if let Some(u) =
                        parse_at::<UpstreamConfig>(item, &format!("upstreams[{i}]"), issues)
                    {
                        upstreams.push(u);
                        positions.push(i);
                    }
                }
            }
            Some(_) => issues.push(issue(
                "upstreams",
                "must be an array of tables ([[upstreams]])",
            )),
        }
        let webhooks: Vec<WebhookConfig> =
            array_section(top.remove("webhooks"), "webhooks", issues);
        let routes: Vec<RouteConfig> = array_section(top.remove("routes"), "routes", issues);
        let consumer_configs: Vec<ConsumerConfig> =
            array_section(top.remove("consumers"), "consumers", issues);
        let consumers = match compile_consumers(&consumer_configs) {
            Ok(c) => c,
            Err(list) => {
                issues.extend(
                    list.into_iter()
                        .map(|i| issue(format!("consumers{}", i.key), i.reason)),
                );
                Vec::new()
            }
        };
        let router = match Router::compile(&routes) {
            Ok(r) => r,
            Err(route_issues) => {
                issues.extend(route_issues.into_iter().map(|i| issue(i.key, i.reason)));
                Router::default()
            }
        };
        for key in top.keys() {
            issues.push(issue(
                key.clone(),
                "unknown section; expected server, storage, upstreams, webhooks, consumers or routes",
            ));
        }
        let config = Config {
            server,
            storage,
            upstreams,
            webhooks,
            routes,
            router: Arc::new(router),
            consumers,
        };
        config.validate(&positions, issues);
        Some(config)
    }

    /// Checks what types alone cannot: unique names, what each adapter needs, sane timings.
    /// `positions[k]` is the file index of `self.upstreams[k]`.
    fn validate(&self, positions: &[usize], issues: &mut Vec<ConfigIssue>) {
        for (key, reason) in self.storage.nats_problems() {
            issues.push(issue(format!("storage.{key}"), reason));
        }
        if self.upstreams.is_empty() && !issues.iter().any(|i| i.key.starts_with("upstreams")) {
            issues.push(issue(
                "upstreams",
                "at least one [[upstreams]] entry is needed",
            ));
        }
        let mut webhook_names = BTreeMap::new();
        for (i, w) in self.webhooks.iter().enumerate() {
            for (key, reason) in w.problems() {
                issues.push(issue(format!("webhooks[{i}].{key}"), reason));
            }
            if let Some(first) = webhook_names.insert(w.name.as_str(), i) {
                issues.push(issue(
                    format!("webhooks[{i}].name"),
                    format!("{:?} is already used by webhooks[{first}]", w.name),
                ));
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
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
        let mut voicepact_ids = BTreeMap::new();
        for (&i, u) in positions.iter().zip(&self.upstreams) {
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
            // The VoicePact server keeps one connection per client_id (the newest wins and the
            // older one stops getting its pongs): two upstreams with one identity would steal
            // the connection from each other forever.
            if let (Provider::VoicePact, Some(client)) = (u.adapter, &u.client_id) {
                let key = (
                    u.url.as_str().trim_end_matches('/').to_string(),
                    client.clone(),
                );
                if let Some(first) = voicepact_ids.insert(key, i) {
                    issues.push(issue(
                        at("client_id"),
                        format!("{client:?} at this url is already used by upstreams[{first}]; VoicePact keeps one connection per client_id"),
                    ));
                }
            }
            if let Err(e) = wsbridge_adapters::build_adapter(u.adapter, u.adapter_settings()) {
                let key = match &e {
                    wsbridge_adapters::AdapterError::Missing { key, .. }
                    | wsbridge_adapters::AdapterError::Invalid { key, .. } => *key,
                };
                issues.push(issue(at(key), e.to_string()));
            }
            let stray: &[(&str, bool)] = match u.adapter {
                Provider::VoicePact => &[
                    ("token", u.token.is_some()),
                    ("topics", !u.topics.is_empty()),
                    ("lobbies", !u.lobbies.is_empty()),
                ],
                Provider::Voipbin => &[
                    ("client_id", u.client_id.is_some()),
                    ("lobbies", !u.lobbies.is_empty()),
                ],
                Provider::Hashi => &[
                    ("client_id", u.client_id.is_some()),
                    ("topics", !u.topics.is_empty()),
                ],
            };
            for (key, present) in stray {
                if *present {
                    issues.push(issue(
                        at(key),
                        format!("not used by the {} adapter", u.adapter),
                    ));
                }
            }
            for (key, d) in [
                ("backoff_initial", u.backoff_initial),
                ("backoff_max", u.backoff_max),
                ("ping_interval", u.ping_interval),
                ("stale_after", u.stale_after),
                ("connect_timeout", u.connect_timeout),
            ] {
                if d.is_zero() {
                    issues.push(issue(at(key), "must be greater than zero"));
                }
            }
            if u.backoff_initial > u.backoff_max {
                issues.push(issue(at("backoff_initial"), "is longer than backoff_max"));
            }
            if u.stale_after <= u.ping_interval {
                issues.push(issue(
                    at("stale_after"),
                    "must be longer than ping_interval, or every quiet connection looks stale",
                ));
            }
        }
    }
}

/// Parses an array-of-tables section element by element (an entry that fails is skipped,
/// its problem recorded), so one typo does not hide the next.
fn array_section<T: DeserializeOwned>(
    v: Option<Value>,
    key: &str,
    issues: &mut Vec<ConfigIssue>,
) -> Vec<T> {
    match v {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .filter_map(|(i, item)| parse_at(item, &format!("{key}[{i}]"), issues))
            .collect(),
        Some(_) => {
            issues.push(issue(
                key,
                format!("must be an array of tables ([[{key}]])"),
            ));
            Vec::new()
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

/// Parses a config duration (`"500ms"`, `"30s"`, `"2m"`, `"1h"`), with a reason on failure.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like \"500ms\", \"30s\" or \"2m\": {e}"))
}

pub(crate) fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

fn de_durability<'de, D: Deserializer<'de>>(d: D) -> Result<Durability, D::Error> {
    match String::deserialize(d)?.as_str() {
        "normal" => Ok(Durability::Normal),
        "full" => Ok(Durability::Full),
        other => Err(serde::de::Error::custom(format!(
            "{other:?}: use \"normal\" or \"full\""
        ))),
    }
}

fn de_provider<'de, D: Deserializer<'de>>(d: D) -> Result<Provider, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

fn de_ws_url<'de, D: Deserializer<'de>>(d: D) -> Result<url::Url, D::Error> {
    let s = String::deserialize(d)?;
    let u = url::Url::parse(&s).map_err(|e| serde::de::Error::custom(format!("not a URL: {e}")))?;
    if !matches!(u.scheme(), "ws" | "wss") || u.host_str().is_none() {
        return Err(serde::de::Error::custom(format!(
            "{} must be a ws:// or wss:// URL with a host",
            shown_url(&u)
        )));
    }
    Ok(u)
}

/// A URL as it may appear in an error message or log: scheme, host, port and path only (a
/// URL in a config may carry a password or a token in its query).
pub fn shown_url(u: &url::Url) -> String {
    let mut shown = u.clone();
    let _ = shown.set_password(None);
    let _ = shown.set_username("");
    shown.set_query(None);
    shown.set_fragment(None);
    format!("{:?}", shown.as_str())
}

fn de_string_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

fn de_opt_secret<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
    let s = Option::<String>::deserialize(d)?;
    Ok(s.filter(|s| !s.is_empty()).map(Secret::new))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "TOKEN" => Some("t0k".into()),
            _ => None,
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
        assert_eq!(c.upstreams[0].token.as_ref().unwrap().expose(), "t0k");
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
        let keys: Vec<String> = Config::from_toml(&bad, env, false)
            .unwrap_err()
            .0
            .into_iter()
            .map(|i| i.key)
            .collect();
        for key in [
            "storage.url",
            "storage.prefix",
            "storage.replicas",
            "storage.token",
            "storage.tls_key",
            "storage.credentials",
            "storage.tls_cert",
            "storage.lease_ttl",
        ] {
            assert!(keys.iter().any(|k| k == key), "{key} missing from {keys:?}");
        }
        let missing = format!("{GOOD}\n[storage]\nbackend = \"nats\"\n");
        let err = Config::from_toml(&missing, env, false).unwrap_err();
        assert_eq!(err.0[0].key, "storage.url");
        let bad_ownership = format!("{GOOD}\nownership = \"some\"\n");
        let err = Config::from_toml(&bad_ownership, env, false).unwrap_err();
        assert!(err.0[0].key.starts_with("upstreams[0]"), "{err}");
    }
}
