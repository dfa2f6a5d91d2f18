//! Why an outbound connection or request failed, as one of a small, fixed set of reasons an
//! operator can act on.
//!
//! "connection failed" does not say whether to fix DNS, a firewall, a CA or a certificate.
//! Every failure of an upstream connection and of a webhook attempt is classified into a
//! [`Reason`] (`dns`, `refused`, `timeout`, `tls_unknown_issuer`, `tls_name_mismatch`,
//! `tls_expired`, `http_status`, …) carried next to its message in logs, the admin API,
//! `/v1/status` and the `reason` label of the failure metrics. The set is closed, so the
//! label's cardinality is bounded whatever the peers do.
//!
//! The classifiers look through error chains for what actually happened: a rustls error (a
//! certificate verdict, or an alert from the peer), or an I/O error kind.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use rustls::{AlertDescription, CertificateError};
use serde::Serialize;

/// The reason of a failure: a metric label value, so the set is fixed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The host name did not resolve.
    Dns,
    /// The TCP connection was refused (nothing listens on that port, or a firewall rejects).
    Refused,
    /// The TCP connection failed otherwise (no route to the host, reset while connecting).
    Connect,
    /// A connect, handshake or response did not finish in time.
    Timeout,
    /// The server's certificate does not chain to a trusted CA (the machine's store, or
    /// `tls_ca`).
    TlsUnknownIssuer,
    /// The server's certificate is not valid for the name dialled (or `tls_server_name`).
    TlsNameMismatch,
    /// The server's certificate has expired.
    TlsExpired,
    /// The server's certificate is not valid yet (often a clock that is off).
    TlsNotYetValid,
    /// The server requires a client certificate, or refused the one presented.
    TlsClientCert,
    /// Any other TLS failure (no common protocol version or cipher, a bad signature, …).
    TlsOther,
    /// The server answered with an HTTP status that is a failure.
    HttpStatus,
    /// The provider refused the credentials.
    Auth,
    /// The SSRF guard refused the destination (an internal address).
    Ssrf,
    /// The peer closed the connection.
    Closed,
    /// Nothing arrived for too long.
    Stale,
    /// A read or write failed on an established connection.
    Transport,
    /// The peer broke the protocol (a bad upgrade answer, no greeting, a bad HTTP answer).
    Protocol,
    /// None of the above.
    Other,
}

impl Reason {
    /// Every reason, in a fixed order (the metric families list them in it).
    pub const ALL: [Reason; 18] = [
        Reason::Dns,
        Reason::Refused,
        Reason::Connect,
        Reason::Timeout,
        Reason::TlsUnknownIssuer,
        Reason::TlsNameMismatch,
        Reason::TlsExpired,
        Reason::TlsNotYetValid,
        Reason::TlsClientCert,
        Reason::TlsOther,
        Reason::HttpStatus,
        Reason::Auth,
        Reason::Ssrf,
        Reason::Closed,
        Reason::Stale,
        Reason::Transport,
        Reason::Protocol,
        Reason::Other,
    ];

    /// The label value (as serialised).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Dns => "dns",
            Reason::Refused => "refused",
            Reason::Connect => "connect",
            Reason::Timeout => "timeout",
            Reason::TlsUnknownIssuer => "tls_unknown_issuer",
            Reason::TlsNameMismatch => "tls_name_mismatch",
            Reason::TlsExpired => "tls_expired",
            Reason::TlsNotYetValid => "tls_not_yet_valid",
            Reason::TlsClientCert => "tls_client_cert",
            Reason::TlsOther => "tls_other",
            Reason::HttpStatus => "http_status",
            Reason::Auth => "auth",
            Reason::Ssrf => "ssrf",
            Reason::Closed => "closed",
            Reason::Stale => "stale",
            Reason::Transport => "transport",
            Reason::Protocol => "protocol",
            Reason::Other => "other",
        }
    }

    fn index(self) -> usize {
        Reason::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A classified failure: its reason and a message for people (which never carries a URL's
/// query, a token or a key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// What kind of failure.
    pub reason: Reason,
    /// What happened, with a hint at the fix where there is one.
    pub message: String,
}

impl Failure {
    /// A failure of `reason` described by `message`.
    pub fn new(reason: Reason, message: impl Into<String>) -> Failure {
        Failure {
            reason,
            message: message.into(),
        }
    }

    /// The failure a TLS error stands for, `peer` naming the server (`host:port`).
    pub fn tls(error: &rustls::Error, peer: &str) -> Failure {
        let reason = tls_reason(error);
        let hint = match reason {
            Reason::TlsUnknownIssuer => {
                "; trust its CA with tls_ca, or add it to the machine's trust store"
            }
            Reason::TlsNameMismatch => {
                "; if the certificate's name differs from the host dialled, set tls_server_name"
            }
            Reason::TlsNotYetValid => "; check this machine's clock",
            Reason::TlsClientCert => "; set tls_cert and tls_key to a certificate it accepts",
            _ => "",
        };
        Failure::new(
            reason,
            format!("TLS with {peer} failed: {}{hint}", tls_summary(error)),
        )
    }

    /// The failure an I/O error of a connect or handshake stands for (a TLS error inside it
    /// is classified as such).
    pub fn io(error: &io::Error, peer: &str) -> Failure {
        if let Some(tls) = rustls_in_io(error) {
            return Failure::tls(tls, peer);
        }
        let reason = io_reason(error);
        let message = match reason {
            Reason::Refused => format!("{peer} refused the connection"),
            Reason::Timeout => format!("{peer} timed out"),
            _ => format!("{peer}: {error}"),
        };
        Failure::new(reason, message)
    }

    /// The first failure found in an error's chain that has a specific reason (a TLS error,
    /// or an I/O error with a telling kind), if any.
    pub fn in_chain(error: &(dyn StdError + 'static), peer: &str) -> Option<Failure> {
        let mut next: Option<&(dyn StdError + 'static)> = Some(error);
        while let Some(e) = next {
            if let Some(tls) = e.downcast_ref::<rustls::Error>() {
                return Some(Failure::tls(tls, peer));
            }
            if let Some(io) = e.downcast_ref::<io::Error>() {
                if rustls_in_io(io).is_some() || io_reason(io) != Reason::Transport {
                    return Some(Failure::io(io, peer));
                }
                // `io::Error::source` skips the error it wraps: look at that one too.
                if let Some(inner) = io.get_ref() {
                    if let Some(found) = Failure::in_chain(inner, peer) {
                        return Some(found);
                    }
                }
            }
            next = e.source();
        }
        None
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The rustls error wrapped in an I/O error (tokio-rustls reports TLS failures that way).
fn rustls_in_io(error: &io::Error) -> Option<&rustls::Error> {
    error.get_ref()?.downcast_ref::<rustls::Error>()
}

/// The reason of an I/O error by its kind.
fn io_reason(error: &io::Error) -> Reason {
    match error.kind() {
        io::ErrorKind::ConnectionRefused => Reason::Refused,
        io::ErrorKind::TimedOut => Reason::Timeout,
        io::ErrorKind::HostUnreachable
        | io::ErrorKind::NetworkUnreachable
        | io::ErrorKind::AddrNotAvailable
        | io::ErrorKind::NetworkDown => Reason::Connect,
        _ => Reason::Transport,
    }
}

/// The reason of a TLS error: the certificate verdict, or the peer's complaint about ours.
pub fn tls_reason(error: &rustls::Error) -> Reason {
    use rustls::Error::{AlertReceived, InvalidCertificate};
    match error {
        InvalidCertificate(CertificateError::UnknownIssuer) => Reason::TlsUnknownIssuer,
        InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => Reason::TlsNameMismatch,
        InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
            Reason::TlsExpired
        }
        InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => Reason::TlsNotYetValid,
        // An alert received is the server's verdict on what we sent: in a handshake that
        // means our client certificate (missing, unknown CA, expired, refused).
        AlertReceived(
            AlertDescription::CertificateRequired
            | AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
            | AlertDescription::AccessDenied,
        ) => Reason::TlsClientCert,
        _ => Reason::TlsOther,
    }
}

/// A TLS error in words (rustls' own, with the alert spelled out).
fn tls_summary(error: &rustls::Error) -> String {
    match error {
        rustls::Error::AlertReceived(AlertDescription::CertificateRequired) => {
            "the server requires a client certificate (alert certificate_required)".to_string()
        }
        rustls::Error::AlertReceived(alert) if tls_reason(error) == Reason::TlsClientCert => {
            format!("the server refused our client certificate (alert {alert:?})")
        }
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "the server's certificate is not issued by a trusted CA (unknown issuer)".to_string()
        }
        other => other.to_string(),
    }
}

/// Failure counts per reason, lock-free (a fixed array: one slot per [`Reason`]).
#[derive(Debug, Default)]
pub struct ReasonCounts([AtomicU64; Reason::ALL.len()]);

impl ReasonCounts {
    /// Counts one failure of `reason`.
    pub fn count(&self, reason: Reason) {
        self.0[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// The reasons counted so far with their counts (reasons never seen are left out).
    pub fn snapshot(&self) -> Vec<(Reason, u64)> {
        Reason::ALL
            .iter()
            .zip(&self.0)
            .map(|(r, n)| (*r, n.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_unique_and_serialise_as_shown() {
        let mut seen = std::collections::HashSet::new();
        for r in Reason::ALL {
            assert!(seen.insert(r.as_str()), "{r} twice");
            assert_eq!(serde_json::to_value(r).unwrap(), r.as_str());
            assert_eq!(Reason::ALL[r.index()], r);
        }
    }

    #[test]
    fn certificate_verdicts_have_their_own_reasons() {
        let cert = |e| rustls::Error::InvalidCertificate(e);
        assert_eq!(
            tls_reason(&cert(CertificateError::UnknownIssuer)),
            Reason::TlsUnknownIssuer
        );
        assert_eq!(
            tls_reason(&cert(CertificateError::NotValidForName)),
            Reason::TlsNameMismatch
        );
        assert_eq!(
            tls_reason(&cert(CertificateError::Expired)),
            Reason::TlsExpired
        );
        assert_eq!(
            tls_reason(&cert(CertificateError::BadSignature)),
            Reason::TlsOther
        );
        assert_eq!(
            tls_reason(&rustls::Error::AlertReceived(
                AlertDescription::CertificateRequired
            )),
            Reason::TlsClientCert
        );
        assert_eq!(
            tls_reason(&rustls::Error::AlertReceived(
                AlertDescription::ProtocolVersion
            )),
            Reason::TlsOther
        );
    }

    #[test]
    fn tls_errors_are_found_inside_io_errors_and_chains() {
        let tls = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let io = io::Error::new(io::ErrorKind::InvalidData, tls);
        let f = Failure::io(&io, "h:443");
        assert_eq!(f.reason, Reason::TlsUnknownIssuer);
        assert!(
            f.message.contains("h:443") && f.message.contains("tls_ca"),
            "{f}"
        );

        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] io::Error);
        let outer = Outer(io);
        assert_eq!(
            Failure::in_chain(&outer, "h:443").map(|f| f.reason),
            Some(Reason::TlsUnknownIssuer)
        );
        let refused = Outer(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert_eq!(
            Failure::in_chain(&refused, "h:1").map(|f| f.reason),
            Some(Reason::Refused)
        );
        let plain = Outer(io::Error::other("something"));
        assert_eq!(Failure::in_chain(&plain, "h:1"), None);
    }

    #[test]
    fn counts_are_per_reason() {
        let c = ReasonCounts::default();
        c.count(Reason::Dns);
        c.count(Reason::Dns);
        c.count(Reason::TlsExpired);
        assert_eq!(
            c.snapshot(),
            vec![(Reason::Dns, 2), (Reason::TlsExpired, 1)]
        );
    }
}
