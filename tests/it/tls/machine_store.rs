//! The default trust policy is the machine's trust store, the same for upstreams and
//! webhooks. The binary runs with `SSL_CERT_FILE` pointing at a bundle holding the test CA
//! (what `update-ca-certificates` produces on Debian, without touching this machine's store),
//! and neither connection has a `tls_ca`: both must trust the CA.

use std::process::{Child, Command, Stdio};

use wsbridge_adapters::Provider;

use crate::common::receiver::{Answer, Receiver};
use crate::common::*;
use crate::tls::front::TlsFront;
use crate::tls::pki::{Ca, Kind};
use crate::tls::{cert_dir, route_block, upstream_at, webhook_block, wss_url};

/// The bridge binary; killed when the test ends, however it ends.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn upstreams_and_webhooks_trust_the_machines_store_by_default() {
    let dir = cert_dir("machine-store");
    let ca = Ca::new("a CA added to the machine's store");
    let bundle = ca.write(&dir, "ca-certificates.crt");
    let server = ca.leaf(&["localhost"], Kind::Server);
    let sim = start_sim(Provider::Voipbin).await;
    let upstream_front = TlsFront::start(server.server_config(None), sim.local_addr()).await;
    let receiver = Receiver::start(vec![], Answer::status(200)).await;
    let webhook_front = TlsFront::start(server.server_config(None), receiver.addr).await;

    let config = dir.join("config.toml");
    let text = config_text(&[
        upstream_at(
            "vb",
            &sim,
            &wss_url(&sim, "localhost", upstream_front.addr.port()),
            "",
        ),
        webhook_block(
            "hook",
            &format!("https://localhost:{}/hooks", webhook_front.addr.port()),
            "",
        ),
        route_block(&["hook"]),
    ]);
    std::fs::write(&config, text).expect("write config");
    let _bridge = Process(
        Command::new(env!("CARGO_BIN_EXE_wsbridge"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("SSL_CERT_FILE", &bundle)
            .env_remove("SSL_CERT_DIR")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("bridge starts"),
    );

    // The upstream got through TLS and subscribed; an event reaches the https:// webhook.
    wait_sim_ready(&sim, 1).await;
    assert_eq!(sim.emit(numbered_call(7)).await, 1);
    let got = receiver.wait_for(1, DEADLINE).await;
    let body: serde_json::Value = serde_json::from_slice(&got[0].body).expect("JSON body");
    assert_eq!(body["data"]["n"], 7);
    assert!(upstream_front.handshakes() >= 1 && webhook_front.handshakes() >= 1);
}
