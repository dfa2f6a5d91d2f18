//! `https://` webhooks: a real receiver behind a TLS terminator, trusted or not, with and
//! without a client certificate.

use serde_json::Value;
use wsbridge::bridge::Bridge;
use wsbridge_adapters::sim::Simulator;
use wsbridge_adapters::Provider;

use crate::common::receiver::{Answer, Receiver};
use crate::common::*;
use crate::tls::front::TlsFront;
use crate::tls::pki::{Ca, Kind};
use crate::tls::{
    cert_dir, cert_lines, config, get_json, has_series, metrics, named, route_block, toml_path,
    wait_json, webhook_block,
};

/// Waits until webhook `name` shows a failed attempt of `reason`; returns the first attempt
/// error recorded for its delivery (as the admin API lists it).
async fn wait_attempt_reason(bridge: &Bridge, name: &str, reason: &str) -> String {
    let views = wait_json(bridge, "/v1/admin/webhooks", reason, |v| {
        v["webhooks"]
            .as_array()
            .and_then(|l| l.iter().find(|w| w["name"] == name))
            .is_some_and(|w| w["last_error_reason"] == reason)
    })
    .await;
    let view = named(&views["webhooks"], name);
    assert!(
        view["failures_by_reason"][reason]
            .as_u64()
            .is_some_and(|n| n >= 1),
        "{view}"
    );
    let listed = get_json(bridge, &format!("/v1/admin/webhooks/{name}/deliveries")).await;
    listed["deliveries"][0]["attempts"][0]["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no attempt error listed: {listed}"))
        .to_string()
}

/// A bridge with the VoIPBIN simulator as its upstream and `blocks` (webhooks, routes); one
/// event emitted once it is subscribed. The simulator is returned to keep it running.
async fn one_event_to(blocks: &[String]) -> (Bridge, Simulator) {
    let sim = start_sim(Provider::Voipbin).await;
    let mut all = vec![upstream_block("vb", &sim, FAST)];
    all.extend_from_slice(blocks);
    let (bridge, _rx) = start_bridge(&config(&all)).await;
    wait_sim_ready(&sim, 1).await;
    assert_eq!(sim.emit(numbered_call(1)).await, 1);
    (bridge, sim)
}

#[tokio::test]
async fn an_https_webhook_is_delivered_with_tls_ca_and_refused_without_it_with_the_reason() {
    let dir = cert_dir("webhook-ca");
    let ca = Ca::new("wsbridge test CA");
    let tls_ca = format!("tls_ca = {}\n", toml_path(&ca.write(&dir, "ca.pem")));
    let receiver = Receiver::start(vec![], Answer::status(204)).await;
    let front = TlsFront::start(
        ca.leaf(&["localhost"], Kind::Server).server_config(None),
        receiver.addr,
    )
    .await;
    let url = format!(
        "https://localhost:{}/hooks?key=url-secret",
        front.addr.port()
    );
    let (bridge, _sim) = one_event_to(&[
        webhook_block("trusted", &url, &tls_ca),
        webhook_block("untrusted", &url, ""),
        route_block(&["trusted", "untrusted"]),
    ])
    .await;

    let got = receiver.wait_for(1, DEADLINE).await;
    assert_eq!(got[0].answered, 204);
    assert!(!got[0].header("webhook-signature").is_empty());

    let error = wait_attempt_reason(&bridge, "untrusted", "tls_unknown_issuer").await;
    assert!(
        error.starts_with("tls_unknown_issuer: ") && error.contains("tls_ca"),
        "{error}"
    );
    assert!(
        !error.contains("url-secret"),
        "the URL's query is not shown: {error}"
    );
    let status = get_json(&bridge, "/v1/status").await;
    let view = named(&status["webhooks"], "untrusted");
    assert_eq!(view["last_error_reason"], "tls_unknown_issuer", "{view}");
    assert!(view.get("last_error").and_then(Value::as_str).is_some());
    assert!(
        named(&status["webhooks"], "trusted")
            .get("last_error")
            .is_none(),
        "a delivered endpoint shows no error"
    );
    assert!(has_series(
        &metrics(&bridge).await,
        "wsbridge_webhook_attempt_failures_total",
        &[("webhook", "untrusted"), ("reason", "tls_unknown_issuer")]
    ));
    // Only the trusted endpoint's request ever got through.
    assert_eq!(receiver.requests().len(), 1);
    bridge.shutdown().await;
}

#[tokio::test]
async fn mutual_tls_delivers_with_the_client_certificate_and_names_a_missing_one() {
    let dir = cert_dir("webhook-mtls");
    let ca = Ca::new("wsbridge test CA");
    let tls_ca = format!("tls_ca = {}\n", toml_path(&ca.write(&dir, "ca.pem")));
    let client = ca
        .leaf(&["wsbridge-client"], Kind::Client)
        .write(&dir, "client");
    let receiver = Receiver::start(vec![], Answer::status(200)).await;
    let front = TlsFront::start(
        ca.leaf(&["localhost"], Kind::Server)
            .server_config(Some(&ca)),
        receiver.addr,
    )
    .await;
    let url = format!("https://localhost:{}/hooks", front.addr.port());
    let with_cert = format!("{tls_ca}{}", cert_lines(&client));
    let (bridge, _sim) = one_event_to(&[
        webhook_block("with-cert", &url, &with_cert),
        webhook_block("without-cert", &url, &tls_ca),
        route_block(&["with-cert", "without-cert"]),
    ])
    .await;

    receiver.wait_for(1, DEADLINE).await;
    let error = wait_attempt_reason(&bridge, "without-cert", "tls_client_cert").await;
    assert!(error.contains("client certificate"), "{error}");
    assert_eq!(
        receiver.requests().len(),
        1,
        "only the mutual-TLS request got through"
    );
    // The receiver counts the request before it answers; the bridge counts the delivery
    // once the answer is back.
    eventually("the delivery counted in /v1/status", DEADLINE, || async {
        let status = get_json(&bridge, "/v1/status").await;
        let delivered = named(&status["webhooks"], "with-cert")["delivered"].clone();
        if delivered == 1 {
            Ok(())
        } else {
            Err(format!("delivered {delivered}"))
        }
    })
    .await;
    bridge.shutdown().await;
}
