//! `[storage]`: which backend holds the journal and how, beside the stores that use it.
//!
//! The keys and their defaults are in the README's "Configuration reference" (`storage.*`);
//! [`crate::config`] loads the section and reports what [`StorageConfig`]'s checks find under
//! `storage.<key>`.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use wsbridge_adapters::Secret;

use crate::tls::ClientTls;
use crate::values::{
    bounds, de_duration, de_opt_secret, de_string_or_list, out_of_bounds, DAY, MINUTE, SECOND,
};

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
    /// The trust policy of the NATS connection: the `tls_*` keys ([`TlsSettings`]) with their
    /// files as read at load.
    #[serde(skip)]
    pub tls: ClientTls,
    /// How long an upstream lease (`ownership = "lease"`) lives without renewal: the most an
    /// upstream stays unread after its holder dies.
    #[serde(default = "d_5s", deserialize_with = "de_duration")]
    pub lease_ttl: Duration,
    /// The dedup window: copies of one event id received within it (the same frame over two
    /// connections or two instances, a retry after an outage) are stored once; the id coming
    /// back later is a new event with a new id. Also how long a connection remembers a frame
    /// to number its repeats. `duplicate_window` is accepted as its older name.
    #[serde(
        default = "d_2m",
        deserialize_with = "de_duration",
        alias = "duplicate_window"
    )]
    pub dedup_window: Duration,
    /// Embedded backend: how many recently journalled ids the id index holds in memory
    /// before writing them to its table in one sweep (about 60 bytes each, two generations at
    /// most; it grows to a sixteenth of the journal, up to [`MAX_ID_GENERATION`] or this
    /// value if larger). Larger: fewer pages written per event as the journal grows.
    #[serde(default = "default_id_generation")]
    pub id_generation: usize,
}

/// Smallest `storage.id_generation`.
pub const MIN_ID_GENERATION: usize = 1_024;
/// Largest `storage.id_generation`, and the most a generation grows to by itself.
pub const MAX_ID_GENERATION: usize = 4_194_304;

fn default_id_generation() -> usize {
    65_536
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
            tls: ClientTls::default(),
            lease_ttl: d_5s(),
            dedup_window: d_2m(),
            id_generation: default_id_generation(),
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

/// Longest `storage.prefix`: it starts every journal subject, and subjects are bounded
/// (`storage::nats::MAX_SUBJECT_BYTES`).
pub const MAX_NATS_PREFIX: usize = 64;

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
    pub(crate) fn nats_problems(&self) -> Vec<(&'static str, String)> {
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
        if self.prefix.len() > MAX_NATS_PREFIX {
            out.push((
                "prefix",
                format!(
                    "at most {MAX_NATS_PREFIX} characters (it starts every subject, which NATS keeps short)"
                ),
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
        // The tls_* files are read and checked by `Config::load_tls`.
        if let Some(f) = &self.credentials {
            if !f.is_file() {
                out.push((
                    "credentials",
                    format!("{} is not a readable file", f.display()),
                ));
            }
        }
        out
    }

    /// Durations and sizes out of their bounds, as (key, reason); checked for every backend,
    /// so that switching backends later cannot bring in a value that was never looked at.
    pub(crate) fn duration_problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if !(MIN_ID_GENERATION..=MAX_ID_GENERATION).contains(&self.id_generation) {
            out.push((
                "id_generation",
                format!("must be between {MIN_ID_GENERATION} and {MAX_ID_GENERATION}"),
            ));
        }
        if let Some(retention) = self.retention {
            if let Some(reason) = out_of_bounds(retention, MINUTE, bounds::RETENTION_MAX) {
                out.push((
                    "retention",
                    format!("{reason} (or \"0s\" to keep everything)"),
                ));
            }
        }
        for (key, d, min, max) in [
            ("lease_ttl", self.lease_ttl, SECOND, bounds::LEASE_TTL_MAX),
            ("dedup_window", self.dedup_window, SECOND, DAY),
        ] {
            if let Some(reason) = out_of_bounds(d, min, max) {
                out.push((key, reason));
            }
        }
        out
    }
}

/// How hard a commit is pushed to disk (`storage.durability`, embedded backend).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// Survives a process crash (the default).
    #[default]
    Normal,
    /// Also survives power loss or an OS crash.
    Full,
}

fn default_storage_path() -> PathBuf {
    PathBuf::from("data/wsbridge.db")
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
