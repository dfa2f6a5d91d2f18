//! The SSRF guard: a webhook URL must not make the bridge call into its own network.
//!
//! Endpoints are configured by operators, but a bridge often runs next to admin services
//! (cloud metadata at 169.254.169.254, databases on private addresses). Unless an endpoint
//! says `allow_private = true`, destinations that are loopback, private, link-local,
//! unspecified, or unique-local (IPv6) are refused: at config load for literal addresses and
//! `localhost`, and before every attempt for names, after resolving them (DNS can change).

use std::net::IpAddr;

/// Whether an address is one the guard refuses.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.octets()[0] == 100 && (64..128).contains(&v4.octets()[1]) // CGNAT 100.64/10
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
        }
    }
}

/// Config-time check of a URL whose host is a literal address or `localhost`.
pub fn check_literal(url: &url::Url) -> Result<(), String> {
    let refused = match url.host() {
        Some(url::Host::Ipv4(ip)) => is_internal(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => is_internal(IpAddr::V6(ip)),
        Some(url::Host::Domain(d)) => {
            d.eq_ignore_ascii_case("localhost") || d.to_ascii_lowercase().ends_with(".localhost")
        }
        None => true,
    };
    if refused {
        Err(format!(
            "{} is a loopback, private or link-local destination; set allow_private = true if that is intended",
            url.host_str().unwrap_or("(no host)")
        ))
    } else {
        Ok(())
    }
}

/// Attempt-time check: resolves the host and refuses if any address is internal.
pub async fn check_resolved(url: &url::Url) -> Result<(), String> {
    check_literal(url)?;
    let Some(host) = url.host_str() else {
        return Err("the URL has no host".into());
    };
    let port = url.port_or_known_default().unwrap_or(443);
    let addrs = tokio::net::lookup_host((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?;
    for addr in addrs {
        if is_internal(addr.ip()) {
            return Err(format!(
                "{host} resolves to the internal address {}; refused (allow_private is off)",
                addr.ip()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_ranges() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(is_internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "172.32.0.1"] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn literal_hosts_are_checked_at_load() {
        for u in [
            "http://127.0.0.1:9200/h",
            "http://localhost/h",
            "http://[::1]/h",
            "http://169.254.169.254/latest",
        ] {
            assert!(check_literal(&url::Url::parse(u).unwrap()).is_err(), "{u}");
        }
        assert!(check_literal(&url::Url::parse("https://hooks.example.com/x").unwrap()).is_ok());
    }
}
