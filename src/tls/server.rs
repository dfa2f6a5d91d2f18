//! The server side: `server.tls_cert` and `server.tls_key` make the bridge serve HTTPS (and
//! `wss://` for `/v1/ws`) on `server.listen`.
//!
//! The certificate is held behind a swappable pointer: a reload that read a renewed
//! certificate replaces it for every handshake from then on, while the connections already
//! open keep the one they started with. Turning TLS on or off needs a restart (the listener's
//! protocol changes).

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::{provider, Identity, TlsError};

/// The server's certificate chain and key as read at load (compared by content).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerTls {
    identity: Identity,
}

impl ServerTls {
    /// Reads and checks `server.tls_cert` and `server.tls_key`; problems come back as
    /// `(key, reason)`.
    pub fn load(cert: &Path, key: &Path) -> Result<ServerTls, Vec<(&'static str, String)>> {
        Ok(ServerTls {
            identity: Identity::load(("tls_cert", cert), ("tls_key", key))?,
        })
    }

    fn certified_key(&self) -> Result<Arc<CertifiedKey>, TlsError> {
        self.identity
            .certified_key()
            .map(Arc::new)
            .map_err(|source| TlsError {
                who: "server".to_string(),
                source,
            })
    }
}

/// The certificate presented by every new handshake; replaced on reload.
#[derive(Debug)]
struct CurrentCert(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// Accepts TLS on the HTTP server's connections, with a certificate a reload can replace.
#[derive(Clone)]
pub struct Acceptor {
    current: Arc<CurrentCert>,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl Acceptor {
    /// An acceptor presenting `tls`, offering HTTP/2 and HTTP/1.1 by ALPN.
    pub fn new(tls: &ServerTls) -> Result<Acceptor, TlsError> {
        let current = Arc::new(CurrentCert(ArcSwap::new(tls.certified_key()?)));
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError {
                who: "server".to_string(),
                source,
            })?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Acceptor {
            current,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Presents `tls` from the next handshake on.
    pub fn replace(&self, tls: &ServerTls) -> Result<(), TlsError> {
        self.current.0.store(tls.certified_key()?);
        Ok(())
    }

    /// The handshake half, for the accept loop.
    pub fn acceptor(&self) -> &tokio_rustls::TlsAcceptor {
        &self.acceptor
    }
}
