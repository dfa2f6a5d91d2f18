//! `[[webhooks]]`: one outbound endpoint, how it is signed, how hard it may be pushed and
//! how long it is retried. Validated at load; the delivery engine never re-checks it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use wsbridge_adapters::Secret;

use super::signing::Signer;
use super::ssrf;
use crate::tls::ClientTls;

/// How an event is put in the request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Body = the whole envelope, `content-type: application/cloudevents+json`.
    #[default]
    Structured,
    /// Body = `data`, the other attributes as `ce-*` headers.
    Binary,
}

/// One webhook endpoint as configured.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Unique name; what routes' `to` lists refer to and the admin API's path segment.
    pub name: String,
    /// Where events are POSTed (`http` or `https`).
    #[serde(deserialize_with = "de_http_url")]
    pub url: url::Url,
    /// `whsec_` secrets; the first is the current one, all sign while rotating.
    #[serde(deserialize_with = "de_secrets")]
    pub secrets: Vec<Secret>,
    /// Structured (default) or binary CloudEvents mode.
    #[serde(default)]
    pub mode: Mode,
    /// Delays after each failed attempt; after the last one fails the event is dead-lettered.
    #[serde(default = "default_retry", deserialize_with = "de_durations")]
    pub retry: Vec<Duration>,
    /// Limit on one attempt (connect, send, response).
    #[serde(
        default = "default_timeout",
        deserialize_with = "crate::values::de_duration"
    )]
    pub timeout: Duration,
    /// Attempts in flight at once for this endpoint.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Allow loopback, private and link-local destinations (off: SSRF guard).
    #[serde(default)]
    pub allow_private: bool,
    /// Static headers added to every request (an API key, Basic auth); values are secret.
    #[serde(default, deserialize_with = "de_headers")]
    pub headers: BTreeMap<String, Secret>,
    /// Deliver events of one subject in journal order, each waiting for the previous.
    #[serde(default)]
    pub ordered: bool,
    /// Rate limit (attempts per second), none by default.
    #[serde(default)]
    pub max_per_second: Option<u32>,
    /// The trust policy of this endpoint: the `tls_*` keys
    /// ([`TlsSettings`](crate::tls::TlsSettings)) with their files as read at load.
    #[serde(skip)]
    pub tls: ClientTls,
}

fn default_retry() -> Vec<Duration> {
    [5, 30, 120, 600, 3600, 21600]
        .into_iter()
        .map(Duration::from_secs)
        .collect()
}
fn default_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_max_in_flight() -> usize {
    16
}

fn de_http_url<'de, D: Deserializer<'de>>(d: D) -> Result<url::Url, D::Error> {
    let s = String::deserialize(d)?;
    let u = url::Url::parse(&s).map_err(|e| serde::de::Error::custom(format!("not a URL: {e}")))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(serde::de::Error::custom(format!(
            "{} must be an http:// or https:// URL with a host",
            crate::values::shown_url(&u)
        )));
    }
    Ok(u)
}

fn de_secrets<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Secret>, D::Error> {
    Ok(Vec::<String>::deserialize(d)?
        .into_iter()
        .map(Secret::new)
        .collect())
}

fn de_durations<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| crate::values::parse_duration(s).map_err(serde::de::Error::custom))
        .collect()
}

fn de_headers<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, Secret>, D::Error> {
    Ok(BTreeMap::<String, String>::deserialize(d)?
        .into_iter()
        .map(|(k, v)| (k, Secret::new(v)))
        .collect())
}

impl WebhookConfig {
    /// Problems with this endpoint as `(key, reason)`, keys relative to the entry.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            out.push((
                "name",
                "use letters, digits, '-', '_' or '.' (it is a URL path segment)".to_string(),
            ));
        }
        if let Err(e) = self.signer() {
            out.push(("secrets", e.to_string()));
        }
        if self.max_in_flight == 0 {
            out.push(("max_in_flight", "must be at least 1".to_string()));
        }
        if self.max_per_second == Some(0) {
            out.push((
                "max_per_second",
                "must be at least 1 (leave it out for no limit)".to_string(),
            ));
        }
        for name in self.headers.keys() {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                out.push(("headers", format!("{name:?} is not a valid header name")));
            } else if name.to_ascii_lowercase().starts_with("webhook-")
                || name.eq_ignore_ascii_case("content-type")
            {
                out.push(("headers", format!("{name:?} is set by the bridge itself")));
            }
        }
        for value in self.headers.values() {
            if http::HeaderValue::from_str(value.expose()).is_err() {
                out.push((
                    "headers",
                    "a header value has characters not allowed in HTTP headers".to_string(),
                ));
            }
        }
        if !self.allow_private {
            if let Err(reason) = ssrf::check_literal(&self.url) {
                out.push(("url", reason));
            }
        }
        out
    }

    /// Durations out of their bounds as `(key, reason)`, keys relative to the entry
    /// (`timeout`, `retry[2]`): an unbounded retry step overflowed the retry arithmetic.
    pub fn duration_problems(&self) -> Vec<(String, String)> {
        use crate::values::{bounds, out_of_bounds};
        let mut out = Vec::new();
        if let Some(reason) = out_of_bounds(self.timeout, bounds::TIMER_MIN, bounds::TIMEOUT_MAX) {
            out.push(("timeout".to_string(), reason));
        }
        if self.retry.len() > bounds::RETRY_STEPS_MAX {
            out.push((
                "retry".to_string(),
                format!(
                    "has {} steps; at most {} are allowed",
                    self.retry.len(),
                    bounds::RETRY_STEPS_MAX
                ),
            ));
        }
        for (i, step) in self.retry.iter().enumerate() {
            let min = std::time::Duration::from_millis(1);
            if let Some(reason) = out_of_bounds(*step, min, bounds::RETRY_STEP_MAX) {
                out.push((format!("retry[{i}]"), reason));
            }
        }
        out
    }

    /// The endpoint's signer (validated at load, so this only fails on an unchecked config).
    pub fn signer(&self) -> Result<Signer, super::signing::SecretError> {
        Signer::from_secrets(self.secrets.iter().map(Secret::expose))
    }
}
