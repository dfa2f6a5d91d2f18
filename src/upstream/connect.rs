//! Opening an upstream connection: DNS, TCP, TLS (for `wss://`) and the WebSocket upgrade,
//! each step with its own failure reason.
//!
//! The bridge opens the TLS connection itself (rather than leaving it to the WebSocket
//! library) so that it uses the bridge's one trust policy ([`crate::tls::ClientTls`]: the
//! machine's trust store, `tls_ca`, a client certificate, `tls_server_name`), and so that a
//! failure says which step failed and why: `dns`, `refused`, `timeout`,
//! `tls_unknown_issuer`, `tls_name_mismatch`, `tls_expired`, `http_status`, ….

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self};
use tokio_tungstenite::WebSocketStream;
use tokio_util::either::Either;

use crate::failure::{Failure, Reason};
use crate::tls::ClientTls;

/// An upstream connection's byte stream: plain TCP for `ws://`, TLS over TCP for `wss://`.
pub type Stream = Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

/// How an upstream connects over TLS: built once per upstream from its config.
#[derive(Clone)]
pub struct Connector {
    /// `None` for a `ws://` upstream, or when the TLS settings could not be built (then a
    /// `wss://` connect fails with that reason).
    tls: Result<Option<(tokio_rustls::TlsConnector, Option<ServerName<'static>>)>, Failure>,
}

impl Connector {
    /// The connector of an upstream with these TLS settings (used for `wss://` URLs only);
    /// `who` names it in warnings.
    pub fn new(tls: &ClientTls, wss: bool, who: &str) -> Connector {
        if !wss {
            return Connector { tls: Ok(None) };
        }
        let built = tls.client_config(who).map(|config| {
            Some((
                tokio_rustls::TlsConnector::from(Arc::new(config)),
                tls.server_name().cloned(),
            ))
        });
        Connector {
            tls: built.map_err(|e| Failure::new(Reason::TlsOther, e.to_string())),
        }
    }
}

/// Why opening failed: the failure, and whether the server refused the credentials.
pub enum OpenError {
    /// The upgrade was answered with a status that means the credentials were refused.
    Auth(String),
    /// Anything else.
    Failed(Failure),
}

/// Opens `request`'s URL within `limit`: resolve, connect (each address in turn), TLS for
/// `wss://`, then the upgrade. An upgrade answered with one of `auth_statuses` is
/// [`OpenError::Auth`].
pub async fn open(
    request: Request,
    connector: &Connector,
    ws_config: WebSocketConfig,
    limit: Duration,
    auth_statuses: &[u16],
) -> Result<WebSocketStream<Stream>, OpenError> {
    let deadline = Instant::now() + limit;
    let within = |step: &str| {
        Failure::new(
            Reason::Timeout,
            format!("{step} within {} ms (connect_timeout)", limit.as_millis()),
        )
    };
    let uri = request.uri().clone();
    let tls = match uri.scheme_str() {
        Some("wss") => true,
        Some("ws") => false,
        other => {
            return Err(OpenError::Failed(Failure::new(
                Reason::Other,
                format!("unsupported scheme {other:?}"),
            )))
        }
    };
    let host = uri
        .host()
        .unwrap_or("")
        .trim_matches(['[', ']'])
        .to_string();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let peer = format!("{host}:{port}");

    let addrs: Vec<SocketAddr> = match timeout_at(deadline, resolve(&host, port)).await {
        Err(_) => return Err(OpenError::Failed(within(&format!("{host} not resolved")))),
        Ok(r) => r.map_err(OpenError::Failed)?,
    };
    let tcp = match timeout_at(deadline, connect_any(&addrs, &peer)).await {
        Err(_) => {
            return Err(OpenError::Failed(within(&format!(
                "no TCP connection to {peer}"
            ))))
        }
        Ok(r) => r.map_err(OpenError::Failed)?,
    };
    let _ = tcp.set_nodelay(true);
    let stream: Stream = if tls {
        let (connector, name) = match &connector.tls {
            Ok(Some(c)) => c,
            Ok(None) => {
                return Err(OpenError::Failed(Failure::new(
                    Reason::TlsOther,
                    "no TLS settings for a wss:// URL",
                )))
            }
            Err(f) => return Err(OpenError::Failed(f.clone())),
        };
        let name = match name {
            Some(n) => n.clone(),
            None => server_name(&host).ok_or_else(|| {
                OpenError::Failed(Failure::new(
                    Reason::TlsOther,
                    format!("{host:?} is not a valid TLS server name; set tls_server_name"),
                ))
            })?,
        };
        match timeout_at(deadline, connector.connect(name, tcp)).await {
            Err(_) => {
                return Err(OpenError::Failed(within(&format!(
                    "TLS handshake with {peer} not finished"
                ))))
            }
            Ok(Err(e)) => return Err(OpenError::Failed(Failure::io(&e, &peer))),
            Ok(Ok(s)) => Either::Right(s),
        }
    } else {
        Either::Left(tcp)
    };
    let upgrade = tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config));
    match timeout_at(deadline, upgrade).await {
        Err(_) => Err(OpenError::Failed(within("no upgrade"))),
        Ok(Ok((ws, _response))) => Ok(ws),
        Ok(Err(e)) => Err(upgrade_error(e, &peer, auth_statuses)),
    }
}

/// A failed upgrade: a status in `auth_statuses` (the dialect's, 401/403 by default) is the
/// credentials, another status is `http_status`, an I/O error is classified (a TLS alert
/// about our client certificate arrives here in TLS 1.3).
fn upgrade_error(e: tungstenite::Error, peer: &str, auth_statuses: &[u16]) -> OpenError {
    match e {
        tungstenite::Error::Http(resp) => {
            let status = resp.status();
            let message = format!("HTTP {status} on upgrade");
            if auth_statuses.contains(&status.as_u16()) {
                OpenError::Auth(message)
            } else {
                OpenError::Failed(Failure::new(Reason::HttpStatus, message))
            }
        }
        tungstenite::Error::Io(io) => {
            let f = Failure::io(&io, peer);
            OpenError::Failed(match f.reason {
                // Dropped during the upgrade without a TLS reason: the server closed on us.
                Reason::Transport => Failure::new(
                    Reason::Closed,
                    format!("{peer} closed the connection during the upgrade: {io}"),
                ),
                _ => f,
            })
        }
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            OpenError::Failed(Failure::new(
                Reason::Closed,
                format!("{peer} closed the connection during the upgrade"),
            ))
        }
        // tungstenite's errors describe the failure (I/O, protocol), never the request, so
        // they cannot carry the token from the URL.
        other => OpenError::Failed(Failure::new(
            Reason::Protocol,
            format!("upgrade with {peer} failed: {other}"),
        )),
    }
}

/// The TLS name of a URL host: an IP address or a DNS name.
fn server_name(host: &str) -> Option<ServerName<'static>> {
    match host.parse::<IpAddr>() {
        Ok(ip) => Some(ServerName::IpAddress(ip.into())),
        Err(_) => ServerName::try_from(host.to_string()).ok(),
    }
}

async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, Failure> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| Failure::new(Reason::Dns, format!("cannot resolve {host}: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(Failure::new(
            Reason::Dns,
            format!("{host} resolves to no address"),
        ));
    }
    Ok(addrs)
}

/// Connects to the first address that accepts; the failure is the last address's.
async fn connect_any(addrs: &[SocketAddr], peer: &str) -> Result<TcpStream, Failure> {
    let mut last = Failure::new(
        Reason::Connect,
        format!("no address to connect to for {peer}"),
    );
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => {
                last = Failure::io(&e, peer);
                if last.reason == Reason::Transport {
                    last.reason = Reason::Connect;
                }
            }
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    #[test]
    fn server_names_of_hosts() {
        assert!(matches!(
            server_name("127.0.0.1"),
            Some(ServerName::IpAddress(_))
        ));
        assert!(matches!(server_name("::1"), Some(ServerName::IpAddress(_))));
        assert!(matches!(
            server_name("ws.example.com"),
            Some(ServerName::DnsName(_))
        ));
    }

    #[tokio::test]
    async fn a_closed_port_is_refused() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let connector = Connector::new(&ClientTls::default(), false, "test");
        let request = format!("ws://127.0.0.1:{port}/x")
            .into_client_request()
            .unwrap();
        match open(
            request,
            &connector,
            WebSocketConfig::default(),
            Duration::from_secs(5),
            &[401, 403],
        )
        .await
        {
            Err(OpenError::Failed(f)) => assert_eq!(f.reason, Reason::Refused, "{f}"),
            _ => panic!("expected a refusal"),
        }
    }
}
