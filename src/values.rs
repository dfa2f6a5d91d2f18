//! Config values every section parses alike: durations (with the bounds each key has) and
//! URLs shown without credentials. A leaf: the sections that live beside their components
//! (`[[webhooks]]` in `delivery`, `[storage]` in `storage::config`, the rest in `config`) use it, and it uses none of them.

use std::time::Duration;

use serde::{Deserialize, Deserializer};
use wsbridge_adapters::Secret;

/// Parses a config duration (`"500ms"`, `"30s"`, `"2m"`, `"1h"`), with a reason on failure.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like \"500ms\", \"30s\" or \"2m\": {e}"))
}

/// Deserialises a config duration string (see [`parse_duration`]).
pub fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

/// An optional duration key: absent is `None`, present is parsed like [`de_duration`].
pub fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

/// Bounds of the configured durations. Every duration key has one: a value past it is a typo
/// or a unit mistake, and an unbounded one overflows the clock arithmetic it feeds (an
/// `Instant` deadline, a retry timestamp).
pub mod bounds {
    use std::time::Duration;

    use super::{DAY, HOUR, MINUTE};

    /// Longest `server.shutdown_grace`.
    pub const SHUTDOWN_GRACE_MAX: Duration = HOUR;
    /// Longest `storage.retention` (ten years).
    pub const RETENTION_MAX: Duration = Duration::from_secs(3650 * 24 * 3600);
    /// Longest `storage.lease_ttl`: how long an upstream may stay unread after its holder died.
    pub const LEASE_TTL_MAX: Duration = Duration::from_secs(10 * 60);
    /// Shortest heartbeat and reconnect-related timer: below it the bridge would spin.
    pub const TIMER_MIN: Duration = Duration::from_millis(10);
    /// Longest reconnect delay (`backoff_initial`, `backoff_max`).
    pub const BACKOFF_MAX: Duration = HOUR;
    /// Longest `ping_interval`.
    pub const PING_INTERVAL_MAX: Duration = HOUR;
    /// Longest `stale_after` and `healthy_after`.
    pub const STALE_AFTER_MAX: Duration = DAY;
    /// Longest `connect_timeout` and webhook `timeout`.
    pub const TIMEOUT_MAX: Duration = Duration::from_secs(10 * MINUTE.as_secs());
    /// Longest step of a webhook's `retry` schedule.
    pub const RETRY_STEP_MAX: Duration = DAY;
    /// Most steps in a webhook's `retry` schedule.
    pub const RETRY_STEPS_MAX: usize = 100;
}

/// One second.
pub const SECOND: Duration = Duration::from_secs(1);
/// One minute.
pub const MINUTE: Duration = Duration::from_secs(60);
/// One hour.
pub const HOUR: Duration = Duration::from_secs(3600);
/// One day.
pub const DAY: Duration = Duration::from_secs(24 * 3600);

/// Why `d` is refused, when it is outside `[min, max]` (`min` zero: zero is allowed).
pub fn out_of_bounds(d: Duration, min: Duration, max: Duration) -> Option<String> {
    let shown = |d: Duration| humantime::format_duration(d).to_string();
    if d >= min && d <= max {
        None
    } else if min.is_zero() {
        Some(format!("must be at most {}, not {}", shown(max), shown(d)))
    } else {
        Some(format!(
            "must be between {} and {}, not {}",
            shown(min),
            shown(max),
            shown(d)
        ))
    }
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

/// Deserialises one string or a list of strings (`url = "nats://h:4222"` or a list for a
/// cluster), so that the common case of one needs no brackets.
pub fn de_string_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
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

/// Deserialises an optional secret; an empty string (an unset `${VAR:-}`) means none.
pub fn de_opt_secret<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
    let s = Option::<String>::deserialize(d)?;
    Ok(s.filter(|s| !s.is_empty()).map(Secret::new))
}
