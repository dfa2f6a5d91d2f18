//! What operators read: /healthz, /readyz, /metrics and /v1/status reflect upstreams,
//! webhooks, consumers and the journal, and never show a secret.

use crate::common::receiver::{Answer, Receiver};
use crate::common::*;
use serde_json::{json, Value};
use wsbridge_adapters::{voipbin, Provider};

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let resp = http_client()
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .expect("GET");
    (resp.status().as_u16(), resp.text().await.expect("body"))
}

/// The value of the metric line that starts with `series` (name and labels, as rendered).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn health_metrics_and_status_reflect_the_bridge() {
    let vb = start_sim(Provider::Voipbin).await;
    let rx = Receiver::start(vec![], Answer::status(200)).await;
    let hook = format!(
        "[[webhooks]]\nname = \"crm\"\nurl = \"{}\"\nsecrets = [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]\nallow_private = true\n\n\
         [[routes]]\nname = \"all\"\nto = [\"crm\"]\n\n[[consumers]]\nname = \"c\"\ntoken = \"ops-consumer-token\"\n",
        rx.url()
    );
    let cfg = config(&[upstream_block("vb", &vb, FAST), hook]);
    let (bridge, _events) = start_bridge(&cfg).await;
    wait_sim_ready(&vb, 1).await;
    let addr = bridge.local_addr();
    for i in 0..3 {
        let frame = voipbin::wire::event(
            "call.status",
            "2024-01-15T10:30:00Z",
            &format!("customer_id:abc123:call:m{i}"),
            json!({"id": i}),
        );
        assert_eq!(vb.emit(frame).await, 1);
    }
    rx.wait_for(3, DEADLINE).await;

    assert_eq!(get(addr, "/healthz").await.0, 200);
    assert_eq!(get(addr, "/readyz").await.0, 200);

    // Deliveries are recorded after the receiver answers: wait for the counters to settle.
    let text = eventually("the deliveries counted in /metrics", DEADLINE, || async {
        let (status, text) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        if metric(
            &text,
            r#"wsbridge_webhook_attempts_total{webhook="crm",outcome="delivered"}"#,
        ) == Some(3.0)
        {
            Ok(text)
        } else {
            Err(format!("\n{text}"))
        }
    })
    .await;
    for (series, want) in [
        (
            r#"wsbridge_upstream_state{upstream="vb",state="subscribed"}"#,
            1.0,
        ),
        (
            r#"wsbridge_upstream_state{upstream="vb",state="backoff"}"#,
            0.0,
        ),
        (
            r#"wsbridge_upstream_events_total{upstream="vb",type="voipbin.call.status"}"#,
            3.0,
        ),
        (
            r#"wsbridge_upstream_decode_errors_total{upstream="vb"}"#,
            0.0,
        ),
        ("wsbridge_journal_appends_total", 3.0),
        ("wsbridge_journal_head_seq", 3.0),
        (r#"wsbridge_webhook_queue_depth{webhook="crm"}"#, 0.0),
        (r#"wsbridge_webhook_dead_letters{webhook="crm"}"#, 0.0),
        (
            r#"wsbridge_webhook_attempt_duration_seconds_count{webhook="crm"}"#,
            3.0,
        ),
        ("wsbridge_consumers_connected", 0.0),
    ] {
        assert_eq!(metric(&text, series), Some(want), "{series} in:\n{text}");
    }
    assert!(metric(&text, "wsbridge_journal_size_bytes").is_some_and(|b| b > 0.0));

    let (status, body) = get(addr, "/v1/status").await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["upstreams"][0]["state"], "subscribed");
    assert_eq!(v["providers"]["voipbin"]["events"], 3);
    assert_eq!(v["webhooks"][0]["name"], "crm");
    for secret in [
        "whsec_",
        "ops-consumer-token",
        wsbridge_adapters::sim::DEFAULT_VOIPBIN_TOKEN,
    ] {
        assert!(
            !body.contains(secret) && !text.contains(secret),
            "{secret} leaked"
        );
    }
    bridge.shutdown().await;
}
