//! Finding 2 of issue 12: on the NATS backend, one VoicePact frame with a 5,000-character
//! `type` became a journal subject longer than nats-server's `max_control_line` (4096). The
//! server dropped the connection at every publish, `append` retried forever, the journal head
//! stopped, `/readyz` went 503 and shutdown hung, on every instance with `ownership = "all"`.
//! Subjects are now bounded (over-long tokens hashed), and a publish that can never succeed is
//! that one event's rejection, not a reason to stop the rest.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use wsbridge::bridge::Bridge;
use wsbridge::storage::nats::MAX_SUBJECT_BYTES;
use wsbridge_adapters::{voicepact, Provider};

use crate::common::nats::*;
use crate::common::receiver::{Answer, Receiver};
use crate::common::*;

/// Generous: every wait ends as soon as its condition holds.
const LONG: Duration = Duration::from_secs(30);

/// A `payment_update` numbered `i` (broadcast to every VoicePact connection).
fn payment(i: usize) -> Value {
    voicepact::wire::payment_update(&format!("k{i}"), "completed", i as f64, 1_700_000_000)
}

/// `GET /readyz` of `bridge`: (status, body).
async fn readyz(bridge: &Bridge) -> (u16, String) {
    let resp = http_client()
        .get(format!("http://{}/readyz", bridge.local_addr()))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("readyz answers");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

/// Two instances read the same VoicePact upstream (`ownership = "all"`): a frame whose `type`
/// is 5,000 characters long is journalled under a bounded (hashed) subject, the events after
/// it are journalled and delivered, both instances stay ready and shut down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5000_char_type_is_journalled_and_events_after_it_flow_on_every_instance() {
    let prefix = unique_prefix("longsubj");
    let vp = start_sim(Provider::VoicePact).await;
    let rx = Receiver::start(Vec::new(), Answer::status(200)).await;
    let blocks = vec![
        upstream_block("vp", &vp, &format!("{FAST}ownership = \"all\"\n")),
        webhook_block("crm", &rx.url(), ""),
        "[[routes]]\nname = \"r-crm\"\nproviders = [\"voicepact\"]\nto = [\"crm\"]\n".to_string(),
    ];
    let urls = [SHARED_NATS.to_string()];
    let cfg = nats_config(&blocks, &urls, &prefix, "");
    let (a, _) = start_bridge(&cfg).await;
    let (b, _) = start_bridge(&cfg).await;
    wait_sim_ready(&vp, 2).await;

    let long_type = "t".repeat(5000);
    vp.emit(payment(0)).await;
    vp.emit(json!({"type": long_type, "contract_id": "long", "n": 1}))
        .await;
    for i in 1..5 {
        vp.emit(payment(i)).await;
    }

    // Every normal event reaches the webhook (once per id), and so does the long one: it is
    // journalled, its subject hashed.
    let got = rx
        .wait_until(LONG, "the events around the long one delivered", |r| {
            r.iter()
                .map(|x| x.header("webhook-id").to_string())
                .collect::<BTreeSet<_>>()
                .len()
                >= 6
        })
        .await;
    let types: BTreeSet<String> = got
        .iter()
        .filter_map(|x| serde_json::from_slice::<Value>(&x.body).ok())
        .filter_map(|v| v["type"].as_str().map(str::to_string))
        .collect();
    assert!(
        types.contains(&format!("voicepact.{long_type}")),
        "the long event keeps its type in the envelope"
    );
    assert!(types.contains("voicepact.payment_update"), "{types:?}");

    // Every journal subject is short, whatever the type.
    let client = async_nats::connect(SHARED_NATS).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let stream = js
        .get_stream(format!("{prefix}_events"))
        .await
        .expect("journal stream");
    let head = a.store().position().await.expect("position").head;
    assert_eq!(head, 6, "six distinct events journalled once each");
    for seq in 1..=head {
        let m = stream.get_raw_message(seq).await.expect("journal message");
        assert!(
            m.subject.len() <= MAX_SUBJECT_BYTES,
            "subject of seq {seq} is {} bytes",
            m.subject.len()
        );
        assert!(
            m.subject
                .starts_with(&format!("{prefix}.events.voicepact.")),
            "{}",
            m.subject
        );
    }

    for (name, bridge) in [("a", &a), ("b", &b)] {
        let (status, body) = readyz(bridge).await;
        assert_eq!(status, 200, "instance {name} not ready: {body}");
    }
    for bridge in [a, b] {
        tokio::time::timeout(LONG, bridge.shutdown())
            .await
            .expect("shutdown completes");
    }
    cleanup(SHARED_NATS, &prefix).await;
}

/// A publish the stream refuses for that message alone (here larger than the stream's
/// `max_msg_size`, set by an operator, though well under the server's `max_payload`) can never
/// succeed: it is that event's rejection, counted, and the events after it are journalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_the_stream_refuses_for_good_is_rejected_and_counted_not_retried() {
    let prefix = unique_prefix("refused");
    let vp = start_sim(Provider::VoicePact).await;
    let blocks = vec![upstream_block("vp", &vp, FAST)];
    let urls = [SHARED_NATS.to_string()];
    let cfg = nats_config(&blocks, &urls, &prefix, "");
    let (bridge, _) = start_bridge(&cfg).await;
    wait_sim_ready(&vp, 1).await;

    update_events_stream(&prefix, |c| c.max_message_size = 2048).await;

    vp.emit(payment(0)).await;
    vp.emit(json!({"type": "big", "contract_id": "big", "pad": "x".repeat(4096)}))
        .await;
    for i in 1..4 {
        vp.emit(payment(i)).await;
    }
    eventually(
        "the events after the refused one journalled",
        LONG,
        || async {
            let s = bridge.ingest_stats();
            if s.published == 4 && s.rejected == 1 {
                Ok(())
            } else {
                Err(format!("{s:?}"))
            }
        },
    )
    .await;
    let head = bridge.store().position().await.expect("position").head;
    assert_eq!(head, 4, "the four small events are journalled");
    let metrics = metrics_text(&bridge).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("wsbridge_journal_rejected") && l.ends_with(" 1")),
        "the rejection is counted in the metrics:\n{metrics}"
    );
    let (status, body) = readyz(&bridge).await;
    assert_eq!(status, 200, "not ready: {body}");
    tokio::time::timeout(LONG, bridge.shutdown())
        .await
        .expect("shutdown completes");
    cleanup(SHARED_NATS, &prefix).await;
}
