//! TLS: one trust policy for every outbound connection, and the optional server side.
//!
//! - [`client`]: [`ClientTls`], what the `tls_*` keys of an upstream, a webhook or the NATS
//!   store ask for (the machine's trust store, an extra or sole CA, a client certificate, a
//!   server-name override, or, spelled as dangerous, no verification), turned into a rustls
//!   `ClientConfig`. Every outbound TLS client of the bridge is built here, so they all
//!   trust the same roots;
//! - [`server`]: [`ServerTls`], `server.tls_cert`/`server.tls_key` for serving `/v1/ws`, SSE,
//!   the admin API and the rest over HTTPS, with the certificate swapped on reload.
//!
//! The files are read when the config is loaded (and so on every reload): a missing or
//! unparsable file is a config error naming its key, and what was read is part of the config,
//! so a renewed certificate is a changed config that a reload applies. Private keys are never
//! logged, printed or shown: their types print as `[private key]`.

pub mod client;
pub mod server;

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub use client::{ClientTls, TlsSettings};
pub use server::ServerTls;

/// Why a TLS client or server configuration could not be built from checked material (the
/// checks at load make this rare: an unsupported key type, say).
#[derive(Debug, thiserror::Error)]
#[error("TLS setup for {who}: {source}")]
pub struct TlsError {
    /// Which connection (`upstream "vb"`, `webhook "crm"`, `NATS`, `server`).
    pub who: String,
    /// rustls' reason.
    #[source]
    pub source: rustls::Error,
}

/// The crypto every TLS configuration uses (ring, as in the rest of the process).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a file of PEM certificates: at least one, or a reason that names the file.
pub(crate) fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not a valid PEM file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1). The reason never quotes the file.
pub(crate) fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => format!(
            "{} holds no PEM private key (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)",
            path.display()
        ),
        _ => format!("{} is not a valid PEM private key", path.display()),
    })
}

/// Largest `tls_*` file read (8 MiB, many times a full CA bundle): a path to something
/// endless (a device, a pipe) must not hang or exhaust a config load.
pub const MAX_PEM_FILE_BYTES: u64 = 8 << 20;

fn read(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let cannot = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    let file = std::fs::File::open(path).map_err(cannot)?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    if bytes.len() as u64 > MAX_PEM_FILE_BYTES {
        return Err(format!(
            "{} is larger than {} MiB: not a PEM file",
            path.display(),
            MAX_PEM_FILE_BYTES >> 20
        ));
    }
    Ok(bytes)
}

/// A certificate chain with its private key, checked to belong together. Compared by content
/// (so a reload sees a renewed certificate), printed without the key.
#[derive(Clone)]
pub(crate) struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Arc<PrivateKeyDer<'static>>,
}

impl Identity {
    /// Loads `cert` and `key` and checks that the key is usable and matches the certificate;
    /// problems come back as `(key name, reason)`.
    pub fn load(
        cert: (&'static str, &Path),
        key: (&'static str, &Path),
    ) -> Result<Identity, Vec<(&'static str, String)>> {
        let chain = read_certificates(cert.1);
        let private = read_private_key(key.1);
        let (chain, private) = match (chain, private) {
            (Ok(c), Ok(k)) => (c, k),
            (c, k) => {
                let mut out = Vec::new();
                if let Err(reason) = c {
                    out.push((cert.0, reason));
                }
                if let Err(reason) = k {
                    out.push((key.0, reason));
                }
                return Err(out);
            }
        };
        let identity = Identity {
            chain,
            key: Arc::new(private),
        };
        identity.certified_key().map_err(|e| {
            let reason = match e {
                rustls::Error::InconsistentKeys(_) => format!(
                    "{} is not the private key of the certificate in {}",
                    key.1.display(),
                    cert.1.display()
                ),
                other => format!("{}: unusable private key: {other}", key.1.display()),
            };
            vec![(key.0, reason)]
        })?;
        Ok(identity)
    }

    /// The chain and key as rustls signs with them (checks that they match).
    pub fn certified_key(&self) -> Result<rustls::sign::CertifiedKey, rustls::Error> {
        rustls::sign::CertifiedKey::from_der(self.chain.clone(), self.key.clone_key(), &provider())
    }
}

impl PartialEq for Identity {
    fn eq(&self, other: &Self) -> bool {
        self.chain == other.chain && self.key == other.key
    }
}

impl Eq for Identity {}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("certificates", &self.chain.len())
            .field("key", &"[private key]")
            .finish()
    }
}
