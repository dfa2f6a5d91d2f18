//! Finding 12: `promtool check metrics` (Debian's `prometheus` package) reported "no help
//! text" for every counter. The exposition must be lint-clean with traffic on every series
//! (upstreams of all three providers, webhooks delivered and failed, consumers). When promtool
//! is not installed the test fails with a clear message, unless `WSBRIDGE_SKIP_PROMTOOL=1`.

use std::io::Write;
use std::process::{Command, Stdio};

use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use wsbridge_adapters::{hashi, voicepact, Provider};

use crate::common::receiver::{Answer, Receiver};
use crate::common::ws::{connect, recv};
use crate::common::*;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const CONSUMER_TOKEN: &str = "lint-consumer-token";

/// Lints `text` with `promtool check metrics`; `None` when promtool is not installed and the
/// skip is allowed, `Some((exit code, complaints))` otherwise.
fn promtool_check(text: &str) -> Option<(Option<i32>, String)> {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if std::env::var("WSBRIDGE_SKIP_PROMTOOL").as_deref() == Ok("1") {
                eprintln!("promtool not installed; skipped (WSBRIDGE_SKIP_PROMTOOL=1)");
                return None;
            }
            panic!(
                "promtool is not installed: install Debian's `prometheus` package \
                 (apt-get install prometheus), or set WSBRIDGE_SKIP_PROMTOOL=1 to skip this check"
            );
        }
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.code(), said))
}

#[tokio::test]
async fn promtool_finds_nothing_to_complain_about_with_traffic_on_every_series() {
    let vb = start_sim(Provider::Voipbin).await;
    let hs = start_sim(Provider::Hashi).await;
    let vp = start_sim(Provider::VoicePact).await;
    vp.set_contract_parties("ctr-9", &["+254700000001"]);
    let ok = Receiver::start(vec![], Answer::status(200)).await;
    // Fails once, then accepts: both attempt outcomes get a series.
    let flaky = Receiver::start(vec![Answer::status(500)], Answer::status(200)).await;
    let hooks = format!(
        "[[webhooks]]\nname = \"crm\"\nurl = \"{}\"\nsecrets = [\"{SECRET}\"]\nallow_private = true\n\n\
         [[webhooks]]\nname = \"flaky\"\nurl = \"{}\"\nsecrets = [\"{SECRET}\"]\nallow_private = true\nretry = [\"50ms\"]\n\n\
         [[routes]]\nname = \"all\"\nto = [\"crm\", \"flaky\"]\n\n\
         [[consumers]]\nname = \"dash\"\ntoken = \"{CONSUMER_TOKEN}\"\n",
        ok.url(),
        flaky.url()
    );
    let cfg = config(&[
        upstream_block("vb", &vb, FAST),
        upstream_block("hs", &hs, FAST),
        upstream_block("vp", &vp, FAST),
        hooks,
    ]);
    let (bridge, _events) = start_bridge(&cfg).await;
    wait_sim_ready(&vb, 1).await;
    wait_sim_ready(&hs, 1).await;
    wait_sim_ready(&vp, 1).await;
    let mut ws = connect(&bridge, CONSUMER_TOKEN).await;
    assert_eq!(recv(&mut ws).await["op"], "ready");
    ws.send(Message::text(
        json!({"op": "subscribe", "id": "all", "filter": {}}).to_string(),
    ))
    .await
    .expect("subscribe");
    assert_eq!(recv(&mut ws).await["op"], "subscribed");

    assert_eq!(vb.emit(numbered_call(1)).await, 1);
    let lobby = hashi::wire::event(
        "lobby",
        "lobby.joined",
        json!({"lobbyId": "ABC123", "timestamp": "2024-01-15T10:30:00.000Z", "payload": {"participantCount": 2}}),
    );
    assert_eq!(hs.emit(lobby).await, 1);
    assert_eq!(
        vp.emit(voicepact::wire::contract_update(
            "ctr-9", "active", 1717171717
        ))
        .await,
        1
    );
    // A frame that cannot be decoded: the decode-error series counts it.
    assert_eq!(vb.send_raw("{not json").await, 1);
    for _ in 0..3 {
        let frame = recv(&mut ws).await;
        assert_eq!(frame["op"], "event", "{frame}");
    }
    ok.wait_for(3, DEADLINE).await;
    // The failed first attempt and its retry.
    flaky.wait_for(4, DEADLINE).await;

    let addr = bridge.local_addr();
    let text = eventually("the traffic shown in the metrics", DEADLINE, || async {
        let text = http_client()
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text");
        let delivered = text.lines().any(|l| {
            l.starts_with(
                r#"wsbridge_webhook_attempts_total{webhook="flaky",outcome="delivered"} 3"#,
            )
        });
        if delivered && text.contains(r#"wsbridge_upstream_decode_errors_total{upstream="vb"} 1"#) {
            Ok(text)
        } else {
            Err(format!("\n{text}"))
        }
    })
    .await;
    // Prometheus asks for OpenMetrics and gets it (counters named without `_total` in their
    // HELP and TYPE lines there, as that format wants).
    let open_metrics = http_client()
        .get(format!("http://{addr}/metrics"))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .await
        .expect("GET /metrics as OpenMetrics");
    assert!(open_metrics
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/openmetrics-text")));
    let open_metrics = open_metrics.text().await.expect("metrics text");
    assert!(open_metrics.ends_with("# EOF\n"), "{open_metrics}");
    assert!(open_metrics.contains("# TYPE wsbridge_journal_appends counter\n"));
    assert!(
        text.contains("# HELP wsbridge_journal_appends_total "),
        "{text}"
    );
    if let Some((code, said)) = promtool_check(&text) {
        assert!(
            code == Some(0) && said.trim().is_empty(),
            "promtool check metrics complained (exit {code:?}):\n{said}\n--- exposition:\n{text}"
        );
    }
    bridge.shutdown().await;
}
