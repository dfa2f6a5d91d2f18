//! `wsbridge tail` and `wsbridge admin`: the bridge's consumer protocol and admin API for a
//! person at a terminal, so that watching events or replaying dead letters needs neither a
//! WebSocket client nor `curl` with hand-written JSON.
//!
//! Both talk to a running bridge at a base URL (`--url`, or `WSBRIDGE_URL`; default
//! `http://127.0.0.1:8080`): [`tail`] over `/v1/ws` with a consumer token, [`admin`] over
//! `/v1/admin/` with the admin token. Tokens are held as [`Secret`]s and sent only in the
//! `Authorization` header: never in a URL, an error message or a log line. HTTPS and `wss://`
//! use the bridge's one trust policy (the machine's trust store, see [`crate::tls`]).

pub mod admin;
pub mod tail;

use url::Url;
use wsbridge_adapters::Secret;

/// The base URL used when neither `--url` nor `WSBRIDGE_URL` is given: the default listener.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";

/// Why a CLI command failed; printed as `error: <message>` with exit code 1.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// `--url` is not an http(s)/ws(s) URL.
    #[error("{url} is not a bridge URL: {reason} (expected e.g. {DEFAULT_URL})")]
    BadUrl {
        /// What was given.
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// The bridge could not be reached.
    #[error("cannot reach the bridge at {url}: {reason}")]
    Connect {
        /// Where (without credentials).
        url: String,
        /// The transport error.
        reason: String,
    },
    /// The bridge answered with an error status.
    #[error("{what}: HTTP {status}: {message}")]
    Http {
        /// The request (method and path).
        what: String,
        /// The status code.
        status: u16,
        /// The bridge's `error` message, or a hint.
        message: String,
    },
    /// The bridge refused the request: an error frame, or an answer that does not follow
    /// the protocol.
    #[error("{0}")]
    Protocol(String),
    /// The bridge closed a `/v1/ws` session.
    #[error("the bridge closed the connection: {0}")]
    Closed(String),
    /// A command-line value that the bridge would refuse anyway.
    #[error("{0}")]
    Usage(String),
    /// Writing to stdout failed (other than a closed pipe, which ends quietly).
    #[error("writing the output: {0}")]
    Output(#[source] std::io::Error),
    /// The TLS client could not be set up.
    #[error("TLS: {0}")]
    Tls(String),
}

/// A bridge to talk to: its base URL (no path beyond an optional prefix, no credentials) and
/// the token for the part of the API being used.
#[derive(Clone, Debug)]
pub struct Target {
    base: Url,
    token: Secret,
}

impl Target {
    /// Checks `url` (http, https, ws or wss; a path is kept as a prefix; user info, query and
    /// fragment are refused so that no credential ends up in a URL that is printed).
    pub fn new(url: &str, token: Secret) -> Result<Target, CliError> {
        // A URL with credentials or a query is echoed without them.
        let shown = match url.find(['@', '?']) {
            Some(_) => "the URL given".to_string(),
            None => url.to_string(),
        };
        let bad = |reason: &str| CliError::BadUrl {
            url: shown.clone(),
            reason: reason.to_string(),
        };
        let mut base = Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https" | "ws" | "wss") {
            return Err(bad("the scheme must be http, https, ws or wss"));
        }
        if base.host_str().is_none() {
            return Err(bad("no host"));
        }
        if !base.username().is_empty() || base.password().is_some() {
            return Err(bad(
                "credentials do not belong in the URL (use the token flag or variable)",
            ));
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(bad("no query or fragment"));
        }
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        Ok(Target { base, token })
    }

    /// The URL of `segments` (e.g. `["v1", "ws"]`; each one percent-encoded) under the
    /// base, with the scheme for a WebSocket or for plain HTTP.
    fn endpoint(&self, segments: &[&str], websocket: bool) -> Result<Url, CliError> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| CliError::BadUrl {
                url: self.base.to_string(),
                reason: "cannot be a base".to_string(),
            })?
            .pop_if_empty()
            .extend(segments);
        let secure = matches!(self.base.scheme(), "https" | "wss");
        let scheme = match (websocket, secure) {
            (true, true) => "wss",
            (true, false) => "ws",
            (false, true) => "https",
            (false, false) => "http",
        };
        // Between the special schemes http(s) and ws(s) the change is always allowed.
        url.set_scheme(scheme).map_err(|()| CliError::BadUrl {
            url: self.base.to_string(),
            reason: format!("cannot use {scheme}"),
        })?;
        Ok(url)
    }

    /// The `Authorization` header's value.
    fn bearer(&self) -> String {
        format!("Bearer {}", self.token.expose())
    }
}

/// The rustls configuration of the CLI's connections: the bridge's one trust policy with no
/// per-connection keys (the machine's trust store).
fn tls_config(alpn: &[&[u8]]) -> Result<rustls::ClientConfig, CliError> {
    crate::install_crypto_provider();
    let mut config = crate::tls::client::ClientTls::default()
        .client_config("wsbridge cli")
        .map_err(|e| CliError::Tls(e.to_string()))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Writes one line to stdout and flushes it, so that a pipe sees each line at once. `Ok(false)`
/// when the reader has gone (a closed pipe, e.g. `| head`): the command ends quietly.
fn print_line(out: &mut impl std::io::Write, line: &str) -> Result<bool, CliError> {
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(CliError::Output(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_keep_a_prefix_and_switch_schemes() {
        let t = Target::new("https://bridge.example:8443/ops", Secret::new("t")).expect("url");
        assert_eq!(
            t.endpoint(&["v1", "ws"], true).expect("ws").as_str(),
            "wss://bridge.example:8443/ops/v1/ws"
        );
        assert_eq!(
            t.endpoint(&["v1", "admin", "webhooks", "a b"], false)
                .expect("http")
                .as_str(),
            "https://bridge.example:8443/ops/v1/admin/webhooks/a%20b"
        );
        let t = Target::new("ws://127.0.0.1:8080", Secret::new("t")).expect("url");
        assert_eq!(
            t.endpoint(&["v1", "admin", "upstreams"], false)
                .expect("http")
                .as_str(),
            "http://127.0.0.1:8080/v1/admin/upstreams"
        );
    }

    #[test]
    fn urls_with_credentials_or_other_schemes_are_refused_without_echoing_a_token() {
        for bad in [
            "ftp://h/",
            "http://user:pw@h/",
            "http://h/?token=x",
            "not a url",
        ] {
            let e = Target::new(bad, Secret::new("s3cret")).expect_err(bad);
            assert!(matches!(e, CliError::BadUrl { .. }), "{bad}: {e}");
            assert!(!e.to_string().contains("s3cret"));
            assert!(!e.to_string().contains("pw"), "{e}");
        }
    }
}
