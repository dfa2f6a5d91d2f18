//! The bridge serving HTTPS and `wss://` itself (`server.tls_cert`, `server.tls_key`), and
//! replacing its certificate on reload.

use std::sync::Arc;

use futures_util::StreamExt;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use wsbridge::bridge::Bridge;
use wsbridge_adapters::Provider;

use crate::common::*;
use crate::tls::pki::{Ca, Kind};
use crate::tls::{cert_dir, config_text, parse, serving_tls};

const CONSUMER: &str = "tls-consumer-token";

/// A client that trusts only `ca`.
fn client_config(ca: &Ca) -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(ca.roots())
        .with_no_client_auth()
}

/// Opens TLS to the bridge as `localhost`; returns the stream and the certificate presented.
async fn tls_to(
    bridge: &Bridge,
    ca: &Ca,
) -> (
    tokio_rustls::client::TlsStream<TcpStream>,
    CertificateDer<'static>,
) {
    let tcp = TcpStream::connect(bridge.local_addr())
        .await
        .expect("connect");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client_config(ca)))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("TLS handshake with the bridge");
    let presented = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("a certificate")
        .clone()
        .into_owned();
    (tls, presented)
}

#[tokio::test]
async fn the_bridge_serves_https_and_wss_and_replaces_its_certificate_on_reload() {
    let dir = cert_dir("server");
    let ca = Ca::new("wsbridge test CA");
    let first = ca.leaf(&["localhost", "127.0.0.1"], Kind::Server);
    let files = first.write(&dir, "server");
    let sim = start_sim(Provider::Voipbin).await;
    let text = serving_tls(
        &config_text(&[
            upstream_block("vb", &sim, FAST),
            format!("[[consumers]]\nname = \"all\"\ntoken = \"{CONSUMER}\"\n"),
        ]),
        &files,
    );
    let (bridge, _rx) = start_bridge(&parse(&text)).await;
    let port = bridge.local_addr().port();

    // HTTPS, verified against the test CA.
    wsbridge::install_crypto_provider();
    let https = reqwest::Client::builder()
        .tls_backend_preconfigured(client_config(&ca))
        .build()
        .expect("client");
    let health = https
        .get(format!("https://localhost:{port}/healthz"))
        .send()
        .await
        .expect("HTTPS request");
    assert_eq!(health.status(), 200);
    let status: serde_json::Value = https
        .get(format!("https://localhost:{port}/v1/status"))
        .send()
        .await
        .expect("HTTPS request")
        .bytes()
        .await
        .map(|b| serde_json::from_slice(&b).expect("JSON"))
        .expect("body");
    assert_eq!(status["upstreams"][0]["state"], "subscribed");

    // Plain HTTP to the TLS port is a failed handshake, counted.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await;
    assert!(plain.is_err() || plain.is_ok_and(|r| r.status() != 200));
    // Counted once the server has dropped the connection: poll for it.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let metrics = https
            .get(format!("https://localhost:{port}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        if metrics.lines().any(|l| {
            l.starts_with("wsbridge_http_tls_handshake_failures_total ") && !l.ends_with(" 0")
        }) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // wss:// for /v1/ws.
    let (tls, presented) = tls_to(&bridge, &ca).await;
    assert_eq!(presented, first.der);
    let mut request = format!("wss://localhost:{port}/v1/ws")
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {CONSUMER}").parse().expect("header"),
    );
    let (mut ws, _) = tokio_tungstenite::client_async(request, tls)
        .await
        .expect("upgrade over TLS");
    match tokio::time::timeout(DEADLINE, ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => assert!(t.as_str().contains("\"ready\""), "{t}"),
        other => panic!("expected the ready frame, got {other:?}"),
    }

    // A renewed certificate in the same files: a reload presents it to new connections,
    // while the open session goes on.
    let renewed = ca.leaf(&["localhost", "127.0.0.1"], Kind::Server);
    renewed.write(&dir, "server");
    let report = bridge.reload(parse(&text)).await.expect("reload");
    assert!(
        report
            .applied
            .iter()
            .any(|c| c.starts_with("server: TLS certificate replaced")),
        "{report:?}"
    );
    let (_, presented) = tls_to(&bridge, &ca).await;
    assert_eq!(presented, renewed.der);
    assert_ne!(presented, first.der);
    ws.close(None)
        .await
        .expect("the session opened before the reload is still up");
    bridge.shutdown().await;
}
