//! Finding 7 of issue 12: a reused subscription id received the old subscription's events.
//!
//! Subscribing `a` from `earliest` on a 3,000-event journal, unsubscribing and subscribing `a`
//! again from `latest` with a filter that matches nothing delivered 129–253 old events under
//! the new `a`: the old feeder's queue was still being drained and its items were looked up
//! by id only. The new subscription must receive nothing the old one queued.

use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use wsbridge_adapters::Provider;

use crate::common::ws::{connect, recv, Ws};
use crate::common::*;

const TOKEN: &str = "token-subscription-reuse";

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

/// Reads frames until `done` says so; returns how many `event` frames for subscription `a`
/// arrived while `counting` was true. `step` sees every frame and returns (counting, done).
async fn read_until(ws: &mut Ws, mut step: impl FnMut(&Value) -> (bool, bool)) -> usize {
    let mut stray = 0;
    let mut counting = false;
    loop {
        let f = recv(ws).await;
        if counting && f["op"] == "event" && f["subscription"] == "a" {
            stray += 1;
        }
        let (c, done) = step(&f);
        counting = c;
        if done {
            return stray;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_subscription_id_receives_nothing_from_the_old_subscription() {
    let vb = start_sim(Provider::Voipbin).await;
    let cfg = config(&[
        upstream_block("vb", &vb, FAST),
        format!("[[consumers]]\nname = \"reuse\"\ntoken = \"{TOKEN}\"\n"),
    ]);
    let (bridge, _rx) = start_bridge(&cfg).await;
    wait_sim_ready(&vb, 1).await;
    const JOURNAL: usize = 3000;
    for i in 0..JOURNAL {
        vb.emit(numbered_call(i)).await;
    }
    wait_published(&bridge, JOURNAL as u64).await;

    let mut ws = connect(&bridge, TOKEN).await;
    assert_eq!(recv(&mut ws).await["op"], "ready");
    for round in 0..3 {
        // Old `a` from the start of the journal, gone at once, and a new `a` that matches
        // nothing: any `a` event after the new `subscribed` is the old subscription's.
        send(
            &mut ws,
            json!({"op": "subscribe", "id": "a", "from": "earliest"}),
        )
        .await;
        send(&mut ws, json!({"op": "unsubscribe", "id": "a"})).await;
        send(
            &mut ws,
            json!({"op": "subscribe", "id": "a", "from": "latest", "filter": {"types": ["nothing.matches.*"]}}),
        )
        .await;
        let mut acks = 0;
        read_until(&mut ws, |f| {
            if f["op"] == "subscribed" || f["op"] == "unsubscribed" {
                assert_eq!(f["id"], "a", "{f}");
                acks += 1;
            }
            assert_ne!(f["op"], "error", "{f}");
            (false, acks == 3)
        })
        .await;
        // A probe from `latest` and a live event: by the time the probe has it, whatever the
        // old feeder had queued has long been written.
        let probe = format!("probe{round}");
        send(&mut ws, json!({"op": "subscribe", "id": probe})).await;
        let mut stray = read_until(&mut ws, |f| {
            (true, f["op"] == "subscribed" && f["id"] == probe.as_str())
        })
        .await;
        vb.emit(numbered_call(JOURNAL + round)).await;
        stray += read_until(&mut ws, |f| {
            (
                true,
                f["op"] == "event" && f["subscription"] == probe.as_str(),
            )
        })
        .await;
        // Ends the new `a` so the next round reuses the id again.
        send(&mut ws, json!({"op": "unsubscribe", "id": "a"})).await;
        send(&mut ws, json!({"op": "unsubscribe", "id": probe})).await;
        let mut acks = 0;
        stray += read_until(&mut ws, |f| {
            if f["op"] == "unsubscribed" {
                acks += 1;
            }
            (true, acks == 2)
        })
        .await;
        assert_eq!(
            stray, 0,
            "round {round}: {stray} events of the old subscription arrived under the reused id `a`"
        );
    }
    bridge.shutdown().await;
}
