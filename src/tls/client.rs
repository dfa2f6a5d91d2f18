//! The trust policy of outbound TLS: what an upstream, a webhook or the NATS store trusts,
//! and what it presents.
//!
//! By default a connection trusts the machine's trust store (read once per process with
//! `rustls-native-certs`: on Debian `/etc/ssl/certs`, which `update-ca-certificates` fills;
//! `SSL_CERT_FILE` or `SSL_CERT_DIR` point it elsewhere), the same for every client, so a
//! private CA added there works for upstreams and webhooks alike. Per connection:
//! - `tls_ca`: a PEM file of CAs trusted in addition; with `tls_ca_only = true`, instead;
//! - `tls_cert` + `tls_key`: a client certificate for mutual TLS;
//! - `tls_server_name`: the name the server's certificate is checked against (and, where the
//!   bridge opens the connection itself, the SNI sent) when it differs from the host dialled;
//! - `tls_insecure_skip_verify = true`: no verification at all, for a throwaway test setup
//!   only; every handshake logs a warning. It cannot be combined with the keys above.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::Deserialize;
use tracing::{info, warn};

use super::{provider, read_certificates, read_private_key, Identity, TlsError};

/// The `tls_*` keys of one connection (an upstream, a webhook, `[storage]`) as written, its
/// files not yet read. They sit flat in the connection's table; the config loader takes them
/// out of it before the rest is read (see [`TlsSettings::KEYS`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM file of CAs to trust in addition to the machine's trust store (instead of it with
    /// `tls_ca_only`).
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// Trust only `tls_ca`, not the machine's trust store.
    #[serde(default)]
    pub tls_ca_only: bool,
    /// PEM client certificate (chain) for mutual TLS, with `tls_key`.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert` (never logged or shown).
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// The name the server's certificate is checked against when the URL dials something
    /// else (an IP address).
    #[serde(default)]
    pub tls_server_name: Option<String>,
    /// Accept any certificate, unverified. Dangerous: for a throwaway test setup only; every
    /// handshake logs a warning.
    #[serde(default)]
    pub tls_insecure_skip_verify: bool,
}

impl TlsSettings {
    /// The keys, as they appear in a connection's table.
    pub const KEYS: [&'static str; 6] = [
        "tls_ca",
        "tls_ca_only",
        "tls_cert",
        "tls_key",
        "tls_server_name",
        "tls_insecure_skip_verify",
    ];

    /// The first key that is set, if any (a plain `ws://` or `http://` URL has no use for
    /// them, and a key that silently does nothing misleads).
    pub fn first_set(&self) -> Option<&'static str> {
        [
            self.tls_ca.is_some(),
            self.tls_ca_only,
            self.tls_cert.is_some(),
            self.tls_key.is_some(),
            self.tls_server_name.is_some(),
            self.tls_insecure_skip_verify,
        ]
        .into_iter()
        .zip(Self::KEYS)
        .find_map(|(set, k)| set.then_some(k))
    }
}

/// What one connection trusts and presents, with the files' contents as read at load.
/// Compared by content, so a reload notices a renewed CA or client certificate.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    ca: Vec<CertificateDer<'static>>,
    ca_only: bool,
    identity: Option<Identity>,
    server_name: Option<ServerName<'static>>,
    insecure_skip_verify: bool,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("extra_cas", &self.ca.len())
            .field("ca_only", &self.ca_only)
            .field("identity", &self.identity)
            .field("server_name", &self.server_name)
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .finish()
    }
}

impl ClientTls {
    /// Checks the keys and reads their files. Problems come back as `(key, reason)`, every
    /// one found.
    pub fn load(keys: &TlsSettings) -> Result<ClientTls, Vec<(&'static str, String)>> {
        let mut problems = Vec::new();
        let mut tls = ClientTls {
            ca_only: keys.tls_ca_only,
            insecure_skip_verify: keys.tls_insecure_skip_verify,
            ..ClientTls::default()
        };
        if keys.tls_ca_only && keys.tls_ca.is_none() {
            problems.push((
                "tls_ca_only",
                "needs tls_ca: the CA to trust instead of the machine's trust store".to_string(),
            ));
        }
        if keys.tls_insecure_skip_verify {
            if let Some(key) = [
                ("tls_ca", keys.tls_ca.is_some()),
                ("tls_ca_only", keys.tls_ca_only),
                ("tls_server_name", keys.tls_server_name.is_some()),
            ]
            .into_iter()
            .find_map(|(k, set)| set.then_some(k))
            {
                problems.push((
                    "tls_insecure_skip_verify",
                    format!(
                        "turns verification off, so {key} would have no effect; remove one of them"
                    ),
                ));
            }
        }
        if let Some(path) = &keys.tls_ca {
            match read_certificates(path) {
                Ok(certs) => {
                    for (i, cert) in certs.iter().enumerate() {
                        if let Err(e) = RootCertStore::empty().add(cert.clone()) {
                            problems.push((
                                "tls_ca",
                                format!(
                                    "certificate {} in {} cannot be used as a CA: {e}",
                                    i + 1,
                                    path.display()
                                ),
                            ));
                        }
                    }
                    tls.ca = certs;
                }
                Err(reason) => problems.push(("tls_ca", reason)),
            }
        }
        match (&keys.tls_cert, &keys.tls_key) {
            (Some(cert), Some(key)) => match Identity::load(("tls_cert", cert), ("tls_key", key)) {
                Ok(identity) => tls.identity = Some(identity),
                Err(list) => problems.extend(list),
            },
            (None, None) => {}
            // The file given is still checked, so that one load reports every problem.
            (Some(cert), None) => {
                problems.push((
                    "tls_key",
                    "tls_cert needs tls_key (its private key)".to_string(),
                ));
                if let Err(reason) = read_certificates(cert) {
                    problems.push(("tls_cert", reason));
                }
            }
            (None, Some(key)) => {
                problems.push((
                    "tls_cert",
                    "tls_key needs tls_cert (the certificate it belongs to)".to_string(),
                ));
                if let Err(reason) = read_private_key(key) {
                    problems.push(("tls_key", reason));
                }
            }
        }
        if let Some(name) = &keys.tls_server_name {
            match ServerName::try_from(name.to_string()) {
                Ok(n) => tls.server_name = Some(n),
                Err(_) => problems.push((
                    "tls_server_name",
                    format!("{name:?} is not a DNS name or an IP address"),
                )),
            }
        }
        if problems.is_empty() {
            Ok(tls)
        } else {
            Err(problems)
        }
    }

    /// The name to check the server's certificate against (and to send as SNI) instead of the
    /// host dialled, when `tls_server_name` is set.
    pub fn server_name(&self) -> Option<&ServerName<'static>> {
        self.server_name.as_ref()
    }

    /// The rustls client configuration of this policy. `who` names the connection in the
    /// warnings of `tls_insecure_skip_verify`. ALPN is left to the caller.
    pub fn client_config(&self, who: &str) -> Result<rustls::ClientConfig, TlsError> {
        let fail = |source| TlsError {
            who: who.to_string(),
            source,
        };
        let provider = provider();
        let algorithms = provider.signature_verification_algorithms;
        let mut verifier: Arc<dyn ServerCertVerifier> = if self.insecure_skip_verify {
            Arc::new(ChainNotChecked {
                accept_for: Some(who.to_string()),
                algorithms,
            })
        } else {
            let mut roots = if self.ca_only {
                RootCertStore::empty()
            } else {
                RootCertStore::clone(&system_roots())
            };
            for cert in &self.ca {
                roots.add(cert.clone()).map_err(fail)?;
            }
            if roots.is_empty() {
                Arc::new(ChainNotChecked {
                    accept_for: None,
                    algorithms,
                })
            } else {
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| fail(rustls::Error::General(e.to_string())))?
            }
        };
        if let Some(name) = &self.server_name {
            verifier = Arc::new(NameOverride {
                inner: verifier,
                name: name.clone(),
            });
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(fail)?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        match &self.identity {
            Some(id) => builder
                .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
                .map_err(fail),
            None => Ok(builder.with_no_client_auth()),
        }
    }
}

/// The machine's trust store, read once per process (a change needs a restart).
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                warn!(error = %e, "part of the machine's trust store could not be read");
            }
            let mut roots = RootCertStore::empty();
            let (added, ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                warn!("the machine's trust store is empty or unreadable: only CAs given with tls_ca are trusted (install ca-certificates, or set SSL_CERT_FILE)");
            } else {
                info!(
                    certificates = added,
                    ignored, "loaded the machine's trust store"
                );
            }
            Arc::new(roots)
        })
        .clone()
}

/// Checks the certificate against `tls_server_name` instead of the host dialled.
#[derive(Debug)]
struct NameOverride {
    inner: Arc<dyn ServerCertVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for NameOverride {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A verifier that does not look at the chain: with `accept_for` (`tls_insecure_skip_verify =
/// true`) it accepts any certificate, warning at every handshake; without it there is no
/// trust anchor at all (an empty machine store and no `tls_ca`), so every certificate is of an
/// unknown issuer, which is what the failure then says. Handshake signatures are still
/// checked either way.
#[derive(Debug)]
struct ChainNotChecked {
    accept_for: Option<String>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ChainNotChecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(who) = &self.accept_for else {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            ));
        };
        warn!(connection = %who, server = %server_name.to_str(),
            "TLS certificate NOT verified (tls_insecure_skip_verify = true): anyone on the path can read and change this connection");
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_combinations_are_checked() {
        let missing = || Some(PathBuf::from("/nonexistent/file.pem"));
        let problems = |keys: TlsSettings| -> Vec<&'static str> {
            ClientTls::load(&keys)
                .err()
                .unwrap_or_default()
                .into_iter()
                .map(|(k, _)| k)
                .collect()
        };
        let none = TlsSettings::default;
        assert_eq!(problems(none()), Vec::<&str>::new());
        let cases: [(TlsSettings, &[&str]); 5] = [
            (
                TlsSettings {
                    tls_ca_only: true,
                    ..none()
                },
                &["tls_ca_only"],
            ),
            (
                TlsSettings {
                    tls_ca: missing(),
                    ..none()
                },
                &["tls_ca"],
            ),
            (
                TlsSettings {
                    tls_cert: missing(),
                    ..none()
                },
                &["tls_key", "tls_cert"],
            ),
            (
                TlsSettings {
                    tls_server_name: Some("not a name".into()),
                    ..none()
                },
                &["tls_server_name"],
            ),
            (
                TlsSettings {
                    tls_insecure_skip_verify: true,
                    tls_server_name: Some("x.example".into()),
                    ..none()
                },
                &["tls_insecure_skip_verify"],
            ),
        ];
        for (keys, want) in cases {
            assert!(keys.first_set().is_some());
            assert_eq!(problems(keys.clone()), want, "{keys:?}");
        }
        let ok = ClientTls::load(&TlsSettings {
            tls_server_name: Some("10.0.0.1".into()),
            ..none()
        })
        .expect("an IP address is a server name");
        assert!(ok.server_name().is_some());
    }

    #[test]
    fn the_default_policy_builds_a_client() {
        let config = ClientTls::default().client_config("test").expect("builds");
        assert!(!config.client_auth_cert_resolver.has_certs());
    }
}
