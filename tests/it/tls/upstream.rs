//! `wss://` upstreams: a simulator behind a TLS terminator, trusted or not.

use wsbridge::bridge::Bridge;
use wsbridge::failure::Reason;
use wsbridge::upstream::UpstreamState;
use wsbridge_adapters::Provider;

use crate::common::*;
use crate::tls::front::TlsFront;
use crate::tls::pki::{Ca, Kind};
use crate::tls::{
    cert_dir, cert_lines, config, config_text, get_json, has_series, metrics, named, parse,
    toml_path, upstream_at, wss_url,
};

/// Waits until upstream `name` failed for `reason`; returns its last error.
async fn wait_reason(bridge: &Bridge, name: &str, reason: Reason) -> String {
    let u = bridge.upstream(name).expect("configured");
    let s = wait_status(&u, reason.as_str(), |s| s.last_error_reason == Some(reason)).await;
    assert_ne!(s.state, UpstreamState::Subscribed, "{name}: {s:?}");
    s.last_error.unwrap_or_default()
}

#[tokio::test]
async fn a_wss_upstream_is_trusted_through_tls_ca_and_refused_without_it_with_the_reason_shown() {
    let dir = cert_dir("upstream-ca");
    let ca = Ca::new("wsbridge test CA");
    let ca_path = ca.write(&dir, "ca.pem");
    let leaf = ca.leaf(&["localhost", "127.0.0.1"], Kind::Server);
    let sim = start_sim(Provider::Voipbin).await;
    let front = TlsFront::start(leaf.server_config(None), sim.local_addr()).await;
    let url = wss_url(&sim, "localhost", front.addr.port());
    let cfg = config(&[
        upstream_at(
            "trusted",
            &sim,
            &url,
            &format!("tls_ca = {}\n", toml_path(&ca_path)),
        ),
        upstream_at("untrusted", &sim, &url, ""),
    ]);
    let bridge = Bridge::start(&cfg).await.expect("bridge starts");
    let mut rx = bridge.subscribe();

    // Trusted through tls_ca: subscribed, and events flow over wss://.
    wait_subscribed(&bridge.upstream("trusted").expect("configured")).await;
    wait_sim_ready(&sim, 1).await;
    assert_eq!(sim.emit(numbered_call(1)).await, 1);
    let p = next_matching(&mut rx, "an event over wss://", |p| {
        p.envelope.source == "wsbridge://trusted"
    })
    .await;
    assert_eq!(p.envelope.data["n"], 1);

    // Without it, the CA is unknown (not in the machine's store), and it is said so.
    let error = wait_reason(&bridge, "untrusted", Reason::TlsUnknownIssuer).await;
    assert!(
        error.contains("tls_ca") && error.contains(&format!("localhost:{}", front.addr.port())),
        "{error}"
    );
    let status = get_json(&bridge, "/v1/status").await;
    let untrusted = named(&status["upstreams"], "untrusted");
    assert_eq!(
        untrusted["last_error_reason"], "tls_unknown_issuer",
        "{untrusted}"
    );
    assert!(
        untrusted["failures_by_reason"]["tls_unknown_issuer"]
            .as_u64()
            .is_some_and(|n| n >= 1),
        "{untrusted}"
    );
    assert_eq!(
        named(&status["upstreams"], "trusted")["state"],
        "subscribed"
    );
    let admin = get_json(&bridge, "/v1/admin/upstreams").await;
    assert_eq!(
        named(&admin["upstreams"], "untrusted")["last_error_reason"],
        "tls_unknown_issuer"
    );
    assert!(has_series(
        &metrics(&bridge).await,
        "wsbridge_upstream_failures_total",
        &[("upstream", "untrusted"), ("reason", "tls_unknown_issuer")]
    ));
    bridge.shutdown().await;
}

#[tokio::test]
async fn expired_and_wrong_name_certificates_are_refused_with_their_reasons() {
    let dir = cert_dir("upstream-bad-certs");
    let ca = Ca::new("wsbridge test CA");
    let tls_ca = format!("tls_ca = {}\n", toml_path(&ca.write(&dir, "ca.pem")));
    let expired = ca.leaf(&["localhost"], Kind::ExpiredServer);
    let other_name = ca.leaf(&["upstream.example"], Kind::Server);
    let sim = start_sim(Provider::Voipbin).await;
    let expired_front = TlsFront::start(expired.server_config(None), sim.local_addr()).await;
    let other_front = TlsFront::start(other_name.server_config(None), sim.local_addr()).await;
    let cfg = config(&[
        upstream_at(
            "expired",
            &sim,
            &wss_url(&sim, "localhost", expired_front.addr.port()),
            &tls_ca,
        ),
        upstream_at(
            "wrong-name",
            &sim,
            &wss_url(&sim, "localhost", other_front.addr.port()),
            &tls_ca,
        ),
        // An IP-addressed upstream whose certificate carries a name: tls_server_name.
        upstream_at(
            "by-address",
            &sim,
            &wss_url(&sim, "127.0.0.1", other_front.addr.port()),
            &format!("{tls_ca}tls_server_name = \"upstream.example\"\n"),
        ),
    ]);
    let bridge = Bridge::start(&cfg).await.expect("bridge starts");

    let error = wait_reason(&bridge, "expired", Reason::TlsExpired).await;
    assert!(error.contains("expired"), "{error}");
    let error = wait_reason(&bridge, "wrong-name", Reason::TlsNameMismatch).await;
    assert!(
        error.contains("upstream.example") && error.contains("tls_server_name"),
        "the presented name and the fix are named: {error}"
    );
    wait_subscribed(&bridge.upstream("by-address").expect("configured")).await;
    let status = get_json(&bridge, "/v1/status").await;
    assert_eq!(
        named(&status["upstreams"], "expired")["last_error_reason"],
        "tls_expired"
    );
    assert_eq!(
        named(&status["upstreams"], "wrong-name")["last_error_reason"],
        "tls_name_mismatch"
    );
    bridge.shutdown().await;
}

#[tokio::test]
async fn skipping_verification_must_be_spelled_out_and_then_connects() {
    let dir = cert_dir("upstream-skip");
    let ca = Ca::new("unknown CA");
    let _ = ca.write(&dir, "ca.pem");
    let expired = ca.leaf(&["elsewhere.example"], Kind::ExpiredServer);
    let sim = start_sim(Provider::Voipbin).await;
    let front = TlsFront::start(expired.server_config(None), sim.local_addr()).await;
    let url = wss_url(&sim, "localhost", front.addr.port());
    let cfg = config(&[upstream_at(
        "unverified",
        &sim,
        &url,
        "tls_insecure_skip_verify = true\n",
    )]);
    let bridge = Bridge::start(&cfg).await.expect("bridge starts");
    // Unknown CA, expired, another name: accepted all the same (and warned about).
    wait_subscribed(&bridge.upstream("unverified").expect("configured")).await;
    assert!(front.handshakes() >= 1);
    bridge.shutdown().await;
}

#[tokio::test]
async fn a_provider_requiring_a_client_certificate_gets_it_and_a_missing_one_is_named() {
    let dir = cert_dir("upstream-mtls");
    let ca = Ca::new("wsbridge test CA");
    let tls_ca = format!("tls_ca = {}\n", toml_path(&ca.write(&dir, "ca.pem")));
    let client = ca
        .leaf(&["wsbridge-client"], Kind::Client)
        .write(&dir, "client");
    let server = ca.leaf(&["localhost"], Kind::Server);
    let sim = start_sim(Provider::Voipbin).await;
    let front = TlsFront::start(server.server_config(Some(&ca)), sim.local_addr()).await;
    let url = wss_url(&sim, "localhost", front.addr.port());
    let cfg = config(&[
        upstream_at(
            "with-cert",
            &sim,
            &url,
            &format!("{tls_ca}{}", cert_lines(&client)),
        ),
        upstream_at("without-cert", &sim, &url, &tls_ca),
    ]);
    let bridge = Bridge::start(&cfg).await.expect("bridge starts");
    wait_subscribed(&bridge.upstream("with-cert").expect("configured")).await;
    let error = wait_reason(&bridge, "without-cert", Reason::TlsClientCert).await;
    assert!(error.contains("client certificate"), "{error}");
    bridge.shutdown().await;
}

/// The `tls_*` files are read again on reload: a CA file replaced in place (a renewal) is a
/// changed config, and the upstream reconnects with it.
#[tokio::test]
async fn a_reload_reads_the_certificate_files_again() {
    let dir = cert_dir("upstream-reload");
    let ca = Ca::new("wsbridge test CA");
    let wrong = Ca::new("another CA");
    let ca_path = wrong.write(&dir, "ca.pem");
    let leaf = ca.leaf(&["localhost"], Kind::Server);
    let sim = start_sim(Provider::Voipbin).await;
    let front = TlsFront::start(leaf.server_config(None), sim.local_addr()).await;
    let url = wss_url(&sim, "localhost", front.addr.port());
    let text = config_text(&[upstream_at(
        "rotating",
        &sim,
        &url,
        &format!("tls_ca = {}\ntls_ca_only = true\n", toml_path(&ca_path)),
    )]);
    let bridge = Bridge::start(&parse(&text)).await.expect("bridge starts");
    wait_reason(&bridge, "rotating", Reason::TlsUnknownIssuer).await;

    // The same config text; only the file changed.
    let unchanged = bridge.reload(parse(&text)).await.expect("reload");
    assert!(unchanged.applied.is_empty(), "{unchanged:?}");
    std::fs::write(&ca_path, &ca.pem).expect("replace the CA file");
    let report = bridge.reload(parse(&text)).await.expect("reload");
    assert!(
        report
            .applied
            .iter()
            .any(|c| c == "upstream rotating: reconnecting with new settings"),
        "{report:?}"
    );
    wait_subscribed(&bridge.upstream("rotating").expect("configured")).await;
    bridge.shutdown().await;
}
