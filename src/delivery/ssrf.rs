//! The SSRF guard: a webhook URL must not make the bridge call into its own network.
//!
//! Endpoints are configured by operators, but a bridge often runs next to admin services
//! (cloud metadata at 169.254.169.254, databases on private addresses). Unless an endpoint
//! says `allow_private = true`, destinations that are internal ([`is_internal`]) are refused:
//! at config load for literal addresses and `localhost` ([`check_literal`]), and for names by
//! the HTTP client's resolver ([`GuardedResolver`]), which resolves, checks and hands the
//! client exactly the addresses it checked. Resolving once to check and again to connect
//! would let a name with a zero TTL answer a public address to the check and an internal
//! one to the connect (DNS rebinding).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Whether an address is one the guard refuses: anything that is not a globally routed
/// unicast destination, and IPv6 forms that embed an IPv4 address that is refused.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => is_internal_v6(v6),
    }
}

fn is_internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    a == 0 // 0.0.0.0/8 "this network" (Linux connects 0.0.0.0 to the local host)
        || a == 10 // private
        || a == 127 // loopback
        || (a == 100 && (b & 0xc0) == 64) // CGNAT 100.64.0.0/10
        || (a == 169 && b == 254) // link-local (cloud metadata)
        || (a == 172 && (b & 0xf0) == 16) // private 172.16.0.0/12
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments 192.0.0.0/24
        || (a == 192 && b == 168) // private
        || (a == 198 && (b & 0xfe) == 18) // benchmarking 198.18.0.0/15
        || a >= 224 // multicast 224/4, reserved 240/4, broadcast
}

fn is_internal_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    let v4 = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    let low_v4 = v4(s[6], s[7]);
    if ip.is_unspecified() || ip.is_loopback() {
        return true;
    }
    // ::/96, IPv4-compatible (deprecated), ::ffff:0:0/96 IPv4-mapped, ::ffff:0:0:0/96
    // IPv4-translated: all reach the embedded IPv4 address.
    if (s[..5] == [0; 5] && matches!(s[5], 0 | 0xffff))
        || (s[..4] == [0; 4] && s[4] == 0xffff && s[5] == 0)
    {
        return is_internal_v4(low_v4);
    }
    match s[0] {
        // NAT64, well-known prefix 64:ff9b::/96: the embedded address; the local-use prefix
        // 64:ff9b:1::/48 is a site's own translator.
        0x64 if s[1] == 0xff9b => {
            if s[2..6] == [0; 4] {
                is_internal_v4(low_v4)
            } else {
                s[2] == 1
            }
        }
        // 6to4 2002::/16: the IPv4 address in bits 16..48.
        0x2002 => is_internal_v4(v4(s[1], s[2])),
        // Teredo 2001::/32: NAT traversal with obfuscated embedded addresses; no webhook
        // receiver lives there.
        0x2001 if s[1] == 0 => true,
        // Discard-only 100::/64.
        0x100 if s[1..4] == [0; 3] => true,
        // Unique-local fc00::/7, link-local fe80::/10, site-local fec0::/10 (deprecated),
        // multicast ff00::/8.
        first => {
            (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || (first & 0xffc0) == 0xfec0
                || (first & 0xff00) == 0xff00
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
            "{} is a loopback, private, link-local or otherwise internal destination; set allow_private = true if that is intended",
            url.host_str().unwrap_or("(no host)")
        ))
    } else {
        Ok(())
    }
}

/// Why the guard's resolver gave the HTTP client no address. Carries the host name, never
/// the URL (its path or query may hold a key).
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The name resolves to an internal address.
    #[error("{host} resolves to the internal address {addr}; refused (allow_private is off)")]
    Internal {
        /// The name.
        host: String,
        /// The first internal address among its addresses.
        addr: IpAddr,
    },
    /// The name could not be resolved.
    #[error("cannot resolve {host}: {source}")]
    Unresolved {
        /// The name.
        host: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// The name resolves to no address at all.
    #[error("{host} resolves to no address")]
    NoAddress {
        /// The name.
        host: String,
    },
}

/// Resolves a name and checks every address; `Err` if any is internal. The addresses
/// returned are the only ones the client may connect to.
pub async fn resolve_checked(host: &str) -> Result<Vec<SocketAddr>, Refused> {
    let addrs = lookup(host).await?;
    // Any internal address refuses the name, so that a name mixing public and internal
    // addresses is reported rather than half-used.
    if let Some(bad) = addrs.iter().find(|a| is_internal(a.ip())) {
        return Err(Refused::Internal {
            host: host.to_string(),
            addr: bad.ip(),
        });
    }
    Ok(addrs)
}

/// The system resolver's addresses of `host` (at least one).
async fn lookup(host: &str) -> Result<Vec<SocketAddr>, Refused> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, 0))
        .await
        .map_err(|source| Refused::Unresolved {
            host: host.to_string(),
            source,
        })?
        .collect();
    if addrs.is_empty() {
        return Err(Refused::NoAddress {
            host: host.to_string(),
        });
    }
    Ok(addrs)
}

/// The resolver of the HTTP client of every endpoint without `allow_private`: the system
/// resolver, then [`resolve_checked`], so the connection goes to exactly the addresses that
/// were checked. (Literal addresses do not reach a resolver; [`check_literal`] refuses the
/// internal ones at load.)
#[derive(Clone, Copy, Debug, Default)]
pub struct GuardedResolver;

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs = resolve_checked(&host).await?;
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

/// The resolver of endpoints with `allow_private = true`: the system resolver, unchecked,
/// with a failed lookup reported as [`Refused::Unresolved`] so that the attempt's reason is
/// `dns` (the HTTP client's own resolver error is opaque).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemResolver;

impl reqwest::dns::Resolve for SystemResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: reqwest::dns::Addrs = Box::new(lookup(&host).await?.into_iter());
            Ok(addrs)
        })
    }
}

/// The guard's refusal inside an HTTP client error, if that is why the request failed.
pub fn refusal(error: &reqwest::Error) -> Option<&Refused> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(refused) = e.downcast_ref::<Refused>() {
            return Some(refused);
        }
        source = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The classification table: every range the guard refuses, with its edges, and public
    /// addresses next to them that it lets through.
    #[test]
    fn classification_table() {
        let refused = [
            // IPv4
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "this network 0/8"),
            ("10.1.2.3", "private 10/8"),
            ("100.64.0.1", "CGNAT 100.64/10"),
            ("100.127.255.254", "CGNAT 100.64/10, top"),
            ("127.0.0.1", "loopback"),
            ("127.255.255.254", "loopback 127/8"),
            ("169.254.169.254", "link-local (metadata)"),
            ("172.16.0.1", "private 172.16/12"),
            ("172.31.255.255", "private 172.16/12, top"),
            ("192.0.0.8", "IETF 192.0.0/24"),
            ("192.168.1.1", "private 192.168/16"),
            ("198.18.0.1", "benchmarking 198.18/15"),
            ("198.19.255.255", "benchmarking 198.18/15, top"),
            ("224.0.0.1", "multicast"),
            ("239.255.255.250", "multicast (SSDP)"),
            ("240.0.0.1", "reserved 240/4"),
            ("255.255.255.255", "broadcast"),
            // IPv6
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("::ffff:10.0.0.1", "IPv4-mapped private"),
            ("::ffff:127.0.0.1", "IPv4-mapped loopback"),
            ("::10.0.0.1", "IPv4-compatible private"),
            ("::127.0.0.1", "IPv4-compatible loopback"),
            ("::169.254.169.254", "IPv4-compatible link-local"),
            ("::ffff:0:192.168.0.1", "IPv4-translated private"),
            ("64:ff9b::127.0.0.1", "NAT64 of loopback"),
            ("64:ff9b::a9fe:a9fe", "NAT64 of metadata"),
            ("64:ff9b::10.0.0.1", "NAT64 of private"),
            ("64:ff9b:1::8.8.8.8", "local-use NAT64 64:ff9b:1::/48"),
            ("2002:7f00:1::1", "6to4 of loopback"),
            ("2002:a00:1::1", "6to4 of private"),
            ("2002:a9fe:a9fe::", "6to4 of metadata"),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
            ("100::1", "discard-only 100::/64"),
            ("fc00::1", "unique-local fc00::/7"),
            ("fd12:3456::1", "unique-local fd00::/8"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local, top"),
            ("fec0::1", "site-local fec0::/10"),
            ("feff::1", "site-local, top"),
            ("ff02::1", "multicast"),
            ("ff0e::1", "global multicast"),
        ];
        for (ip, what) in refused {
            let parsed: IpAddr = ip.parse().unwrap();
            assert!(is_internal(parsed), "{ip} ({what}) must be refused");
        }
        let allowed = [
            "1.1.1.1",
            "8.8.8.8",
            "9.255.255.255",
            "11.0.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "126.255.255.255",
            "128.0.0.1",
            "169.253.0.1",
            "172.15.255.255",
            "172.32.0.1",
            "192.0.1.1",
            "192.167.0.1",
            "192.169.0.1",
            "198.17.255.255",
            "198.20.0.1",
            "198.51.100.7",
            "223.255.255.254",
            "2606:4700::1111",
            "2a00:1450:4001::200e",
            "::ffff:8.8.8.8",
            "::8.8.8.8",
            "64:ff9b::8.8.8.8",
            "64:ff9b::101:101",
            "2002:808:808::1",
            "2001:4860:4860::8888",
            "fbff::1",
        ];
        for ip in allowed {
            let parsed: IpAddr = ip.parse().unwrap();
            assert!(!is_internal(parsed), "{ip} must be allowed");
        }
    }

    #[test]
    fn literal_hosts_are_checked_at_load() {
        for u in [
            "http://127.0.0.1:9200/h",
            "http://localhost/h",
            "http://api.localhost/h",
            "http://[::1]/h",
            "http://169.254.169.254/latest",
            "http://0.0.0.0:8080/",
            "http://[::ffff:127.0.0.1]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://[2002:7f00:1::1]/",
            "http://[fec0::1]/",
            "http://198.18.0.1/",
            "http://224.0.0.1/",
        ] {
            assert!(check_literal(&url::Url::parse(u).unwrap()).is_err(), "{u}");
        }
        assert!(check_literal(&url::Url::parse("https://hooks.example.com/x").unwrap()).is_ok());
        assert!(check_literal(&url::Url::parse("https://8.8.8.8/x").unwrap()).is_ok());
    }

    #[tokio::test]
    async fn resolved_internal_names_are_refused() {
        // `localhost` resolves through /etc/hosts, no DNS needed.
        match resolve_checked("localhost").await {
            Err(Refused::Internal { host, addr }) => {
                assert_eq!(host, "localhost");
                assert!(addr.is_loopback(), "{addr}");
            }
            other => panic!("localhost must be refused, got {other:?}"),
        }
    }

    /// A client built with the guarded resolver never connects to an internal address, and
    /// its error names the host and the refused address but not the URL.
    #[tokio::test]
    async fn a_guarded_client_refuses_before_connecting() {
        crate::install_crypto_provider();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = reqwest::Client::builder()
            .no_proxy()
            .dns_resolver(GuardedResolver)
            .build()
            .unwrap();
        let error = client
            .post(format!("http://localhost:{port}/private-path?key=in-url"))
            .send()
            .await
            .expect_err("refused");
        let refused = refusal(&error).expect("the guard's refusal is in the error chain");
        let text = refused.to_string();
        assert!(
            text.starts_with("localhost resolves to the internal address"),
            "{text}"
        );
        assert!(
            !text.contains("in-url") && !text.contains("private-path"),
            "{text}"
        );
        // Nothing connected (a connect completes in the kernel before the client goes on, so a
        // connection would be waiting here).
        let accepted = listener.accept();
        assert!(
            matches!(&accepted, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "the guarded client connected: {accepted:?}"
        );
    }
}
