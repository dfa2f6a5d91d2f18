//! `[prepare]`: the HTTP call a dialect makes before every connect (a token, or the URL
//! itself, from the provider's REST API), and again every `refresh` while connected.
//!
//! The call goes out with the upstream's own TLS settings (the bridge's one trust policy,
//! `tls_ca`, a client certificate), within `connect_timeout`, and its answer is read up to
//! the upstream read limit (2 × `limits.max_event_bytes` + 64 KiB): a larger answer is a
//! failure, not a buffer without bound. A 401
//! or 403, or an answer the dialect's `fail` matches, means the credentials were refused
//! (`auth_failed`); any other failure is retried with backoff. Nothing of the request or the
//! answer is logged: both may carry credentials.

use std::time::Duration;

use tokio::time::timeout;
use wsbridge_adapters::{Adapter, PrepareRefused};

use super::session::SessionEnd;
use crate::failure::{Failure, Reason};
use crate::tls::ClientTls;

/// The HTTP client of one upstream's `[prepare]` calls.
pub(crate) struct Preparer {
    /// `Err` when the TLS settings could not be built (every call then fails with it).
    client: Result<reqwest::Client, Failure>,
}

impl Preparer {
    /// A client with the upstream's TLS settings; `who` names it in warnings.
    pub(crate) fn new(tls: &ClientTls, who: &str) -> Preparer {
        let client = tls
            .client_config(who)
            .map_err(|e| Failure::new(Reason::TlsOther, e.to_string()))
            .and_then(|config| {
                reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .user_agent(concat!("wsbridge/", env!("CARGO_PKG_VERSION")))
                    .tls_backend_preconfigured(config)
                    .build()
                    .map_err(|e| Failure::new(Reason::Other, format!("HTTP client: {e}")))
            });
        Preparer { client }
    }

    /// Makes the adapter's prepare call and hands it the answer (its `$prepared`), all
    /// within `limit`; the answer may be at most `max_bytes`.
    pub(crate) async fn run(
        &self,
        adapter: &dyn Adapter,
        limit: Duration,
        max_bytes: usize,
    ) -> Result<(), SessionEnd> {
        let Some(request) = adapter.prepare_request() else {
            return Ok(());
        };
        let request = request
            .map_err(|e| SessionEnd::ConnectFailed(Failure::new(Reason::Other, e.to_string())))?;
        let client = self
            .client
            .as_ref()
            .map_err(|f| SessionEnd::ConnectFailed(f.clone()))?;
        let peer = request
            .uri()
            .authority()
            .map_or_else(String::new, |a| a.host().to_string());
        let request = reqwest::Request::try_from(request).map_err(|e| {
            SessionEnd::ConnectFailed(Failure::new(
                Reason::Other,
                format!("[prepare] request: {}", e.without_url()),
            ))
        })?;
        let call = async {
            let mut response = client
                .execute(request)
                .await
                .map_err(|e| failed(e, &peer))?;
            let status = response.status().as_u16();
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(|e| failed(e, &peer))? {
                if body.len().saturating_add(chunk.len()) > max_bytes {
                    return Err(Failure::new(
                        Reason::Protocol,
                        format!("[prepare] answer larger than the upstream read limit ({max_bytes} bytes)"),
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            Ok((status, body))
        };
        let (status, body) = match timeout(limit, call).await {
            Err(_) => {
                return Err(SessionEnd::ConnectFailed(Failure::new(
                    Reason::Timeout,
                    format!(
                        "[prepare] no answer from {peer} within {} ms (connect_timeout)",
                        limit.as_millis()
                    ),
                )))
            }
            Ok(r) => r.map_err(SessionEnd::ConnectFailed)?,
        };
        adapter.prepared(status, &body).map_err(|e| match e {
            PrepareRefused::Auth(m) => SessionEnd::AuthRejected(m),
            PrepareRefused::Failed(m) => {
                let reason = if (200..300).contains(&status) {
                    Reason::Protocol
                } else {
                    Reason::HttpStatus
                };
                SessionEnd::ConnectFailed(Failure::new(reason, m))
            }
        })
    }
}

/// A failed call as a failure with its reason, without the URL (it may hold credentials).
fn failed(e: reqwest::Error, peer: &str) -> Failure {
    Failure::in_chain(&e, peer).unwrap_or_else(|| {
        let reason = if e.is_timeout() {
            Reason::Timeout
        } else if e.is_connect() {
            Reason::Connect
        } else {
            Reason::Other
        };
        Failure::new(reason, format!("[prepare] {}", e.without_url()))
    })
}
