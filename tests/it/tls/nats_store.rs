//! The NATS store's connection follows the same trust policy: a nats-server of the test's own
//! with a certificate from the test CA is trusted through `storage.tls_ca`, and refused
//! without it (the CA is not in the machine's store).

use std::io::Read;
use std::time::Duration;

use wsbridge::bridge::Bridge;
use wsbridge_adapters::Provider;

use crate::common::nats::{nats_config_text, unique_prefix, NatsServer};
use crate::common::*;
use crate::tls::pki::{Ca, Kind};
use crate::tls::{cert_dir, parse, toml_path};

/// Waits until the server greets new connections (its INFO line: sent in the clear even when
/// it requires TLS, which the client then starts).
async fn wait_info(port: u16) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let greeted = tokio::task::spawn_blocking(move || {
            let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
            tcp.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
            let mut buf = [0u8; 4];
            tcp.read_exact(&mut buf).ok()?;
            (&buf == b"INFO").then_some(())
        })
        .await
        .ok()
        .flatten();
        if greeted.is_some() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nats-server on {port} never greeted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_nats_store_is_trusted_through_tls_ca_and_refused_without_it() {
    let dir = cert_dir("nats");
    let ca = Ca::new("wsbridge test CA");
    let ca_path = ca.write(&dir, "ca.pem");
    let (cert, key) = ca
        .leaf(&["localhost", "127.0.0.1"], Kind::Server)
        .write(&dir, "nats");
    let server = NatsServer::start_with_config(
        "tls-nats",
        Some(&format!(
            "tls {{\n  cert_file: {}\n  key_file: {}\n}}\n",
            toml_path(&cert),
            toml_path(&key)
        )),
    );
    wait_info(server.port).await;
    let url = format!("tls://127.0.0.1:{}", server.port);
    let sim = start_sim(Provider::Voipbin).await;
    let upstream = upstream_block("vb", &sim, FAST);

    let refused = parse(&nats_config_text(
        std::slice::from_ref(&upstream),
        std::slice::from_ref(&url),
        &unique_prefix("tls-refused"),
        "",
    ));
    let error = match Bridge::start(&refused).await {
        Ok(_) => panic!("a NATS server with an unknown CA was trusted"),
        Err(e) => e.to_string(),
    };
    assert!(error.to_lowercase().contains("certificate"), "{error}");

    let trusted = parse(&nats_config_text(
        &[upstream],
        &[url],
        &unique_prefix("tls-trusted"),
        &format!("tls_ca = {}\n", toml_path(&ca_path)),
    ));
    let (bridge, mut rx) = start_bridge(&trusted).await;
    wait_sim_ready(&sim, 1).await;
    assert_eq!(sim.emit(numbered_call(3)).await, 1);
    let p = next_matching(&mut rx, "an event journalled in NATS over TLS", |p| {
        p.envelope.data["n"] == 3
    })
    .await;
    assert!(p.envelope.seq.is_some());
    bridge.shutdown().await;
}
