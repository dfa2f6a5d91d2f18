//! Webhook delivery end to end: real simulators, the real bridge with its journal file, and a
//! real HTTP receiver on 127.0.0.1. Retries keep the `webhook-id`, `Retry-After` is honoured,
//! dead letters replay through the admin API, a slow endpoint does not hold up a fast one, and
//! a start that fails after the dispatchers started leaves none of them running.

use std::time::Duration;

use crate::common::receiver::{Answer, Receiver};
use crate::common::*;
use serde_json::{json, Value};
use wsbridge::delivery::signing::Signer;
use wsbridge_adapters::{voipbin, Provider};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const ADMIN: &str = "admin-test-token";

fn webhook_block(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[[webhooks]]\nname = \"{name}\"\nurl = \"{url}\"\nsecrets = [\"{SECRET}\"]\nallow_private = true\nretry = [\"100ms\", \"100ms\", \"100ms\"]\ntimeout = \"10s\"\n{extra}\n"
    )
}

fn route_block(name: &str, to: &[&str]) -> String {
    let to: Vec<String> = to.iter().map(|t| format!("{t:?}")).collect();
    format!(
        "[[routes]]\nname = \"{name}\"\nproviders = [\"voipbin\"]\nto = [{}]\n",
        to.join(", ")
    )
}

fn call(call: &str, status: &str) -> Value {
    voipbin::wire::event(
        "call.status",
        "2024-01-15T10:30:00.000000Z",
        &format!("customer_id:abc123:call:{call}"),
        json!({"id": call, "status": status}),
    )
}

/// Sims + bridge with the given webhook/route blocks; returns the VoIPBIN simulator.
async fn setup(blocks: &[String]) -> (wsbridge::bridge::Bridge, wsbridge_adapters::sim::Simulator) {
    let vb = start_sim(Provider::Voipbin).await;
    let mut all = vec![upstream_block("vb", &vb, FAST)];
    all.extend_from_slice(blocks);
    let cfg = config_with_admin(&all, ADMIN);
    let (bridge, _rx) = start_bridge(&cfg).await;
    wait_sim_ready(&vb, 1).await;
    (bridge, vb)
}

fn verify(r: &crate::common::receiver::Received) {
    let signer = Signer::from_secrets([SECRET]).expect("secret");
    signer
        .verify(
            r.header("webhook-id"),
            r.header("webhook-timestamp"),
            r.header("webhook-signature"),
            &r.body,
        )
        .unwrap_or_else(|e| panic!("signature does not verify: {e:?}"));
}

async fn admin(
    bridge: &wsbridge::bridge::Bridge,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let client = http_client();
    let url = format!("http://{}{path}", bridge.local_addr());
    let mut req = match method {
        "POST" => client.post(url),
        _ => client.get(url),
    }
    .bearer_auth(ADMIN);
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let resp = req.send().await.expect("admin call");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test]
async fn failed_attempts_are_retried_with_the_same_webhook_id_until_delivered() {
    let rx = Receiver::start(
        vec![Answer::status(500), Answer::status(500)],
        Answer::status(200),
    )
    .await;
    let (bridge, vb) = setup(&[
        webhook_block("crm", &rx.url(), ""),
        route_block("calls", &["crm"]),
    ])
    .await;

    assert_eq!(vb.emit(call("c1", "answered")).await, 1);
    let got = rx.wait_for(3, DEADLINE).await;
    assert_eq!(
        got.iter().map(|r| r.answered).collect::<Vec<_>>(),
        vec![500, 500, 200]
    );
    let id = got[0].header("webhook-id").to_string();
    assert!(!id.is_empty());
    for r in &got {
        assert_eq!(
            r.header("webhook-id"),
            id,
            "every retry carries the same webhook-id"
        );
        assert_eq!(r.header("content-type"), "application/cloudevents+json");
        verify(r);
        let envelope: Value = serde_json::from_slice(&r.body).expect("body is the envelope");
        assert_eq!(envelope["id"], id.as_str());
        assert_eq!(envelope["data"]["id"], "c1");
    }
    // Delivered: nothing pending any more (the store is updated after the 200).
    let store = bridge.store().clone();
    eventually("the delivery completed in the store", DEADLINE, || async {
        (store.counts("crm").await.expect("counts").pending == 0).then_some(())
    })
    .await;
    bridge.shutdown().await;
}

#[tokio::test]
async fn retry_after_on_429_is_honoured() {
    let throttled = Answer {
        status: 429,
        retry_after: Some("1"),
        delay: Duration::ZERO,
    };
    let rx = Receiver::start(vec![throttled], Answer::status(204)).await;
    let (bridge, vb) = setup(&[
        webhook_block("crm", &rx.url(), ""),
        route_block("calls", &["crm"]),
    ])
    .await;

    assert_eq!(vb.emit(call("c2", "ringing")).await, 1);
    let got = rx.wait_for(2, DEADLINE).await;
    let gap = got[1].at.duration_since(got[0].at);
    assert!(
        gap >= Duration::from_secs(1),
        "retried after {gap:?}, before Retry-After: 1"
    );
    assert_eq!(got[0].header("webhook-id"), got[1].header("webhook-id"));
    bridge.shutdown().await;
}

#[tokio::test]
async fn an_endpoint_down_for_the_whole_schedule_is_dead_lettered_and_replay_delivers_it() {
    // A port with nothing listening: every attempt is refused.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("probe port");
    let addr = probe.local_addr().expect("probe addr");
    drop(probe);
    let url = format!("http://{addr}/hooks");
    let (bridge, vb) = setup(&[
        webhook_block("crm", &url, ""),
        route_block("calls", &["crm"]),
    ])
    .await;

    assert_eq!(vb.emit(call("c3", "hangup")).await, 1);
    let store = bridge.store().clone();
    eventually("the delivery dead-lettered", DEADLINE, || async {
        (store.counts("crm").await.expect("counts").dead > 0).then_some(())
    })
    .await;
    let (status, listed) = admin(
        &bridge,
        "GET",
        "/v1/admin/webhooks/crm/deliveries?state=dead",
        None,
    )
    .await;
    assert_eq!(status, 200, "{listed}");
    let dead = listed["deliveries"].as_array().expect("list");
    assert_eq!(dead.len(), 1);
    let attempts = dead[0]["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 4, "1 attempt + 3 retries: {listed}");
    assert!(
        attempts
            .iter()
            .all(|a| a["error"].is_string() && a["at"].is_string()),
        "{listed}"
    );

    // The endpoint comes back; an admin replays the dead letters.
    let rx = Receiver::start_on(addr, vec![], Answer::status(200)).await;
    let (status, queued) = admin(
        &bridge,
        "POST",
        "/v1/admin/webhooks/crm/replay",
        Some(json!({"dead": true})),
    )
    .await;
    assert_eq!(
        (status, queued["queued"].as_u64()),
        (200, Some(1)),
        "{queued}"
    );
    let got = rx.wait_for(1, DEADLINE).await;
    verify(&got[0]);
    assert_eq!(
        got[0].header("webhook-id"),
        dead[0]["id"].as_str().expect("id")
    );

    // Admin API hygiene: no token → 401, unknown webhook → 404, bad body → 400.
    let anon = http_client()
        .get(format!("http://{}/v1/admin/webhooks", bridge.local_addr()))
        .send()
        .await
        .expect("call");
    assert_eq!(anon.status().as_u16(), 401);
    assert_eq!(
        admin(&bridge, "GET", "/v1/admin/webhooks/nope/deliveries", None)
            .await
            .0,
        404
    );
    assert_eq!(
        admin(
            &bridge,
            "POST",
            "/v1/admin/webhooks/crm/replay",
            Some(json!({"from_seq": 3}))
        )
        .await
        .0,
        400
    );
    let (_, hooks) = admin(&bridge, "GET", "/v1/admin/webhooks", None).await;
    assert!(
        !hooks.to_string().contains("whsec_"),
        "secrets leak: {hooks}"
    );
    bridge.shutdown().await;
}

#[tokio::test]
async fn a_slow_endpoint_does_not_delay_a_fast_one() {
    let slow_answer = Answer {
        status: 200,
        retry_after: None,
        delay: Duration::from_secs(5),
    };
    let slow = Receiver::start(vec![], slow_answer).await;
    let fast = Receiver::start(vec![], Answer::status(200)).await;
    let (bridge, vb) = setup(&[
        webhook_block("slow", &slow.url(), "max_in_flight = 1"),
        webhook_block("fast", &fast.url(), ""),
        route_block("both", &["slow", "fast"]),
    ])
    .await;

    for i in 0..5 {
        assert_eq!(vb.emit(call(&format!("s{i}"), "ringing")).await, 1);
    }
    fast.wait_for(5, DEADLINE).await;
    assert_eq!(
        slow.requests().len(),
        0,
        "the fast endpoint got everything before the slow one answered once"
    );
    bridge.shutdown().await;
    slow.stop();
}

#[tokio::test]
async fn gone_disables_the_endpoint_until_an_admin_enables_it() {
    // After the 410, three 500s: with the three-step schedule they must all be retried, since
    // a 410 says the endpoint is off, not that the event failed (it uses up no step).
    let script = [410, 500, 500, 500].map(Answer::status).to_vec();
    let rx = Receiver::start(script, Answer::status(200)).await;
    let (bridge, vb) = setup(&[
        webhook_block("crm", &rx.url(), ""),
        route_block("calls", &["crm"]),
    ])
    .await;
    assert_eq!(vb.emit(call("g1", "ringing")).await, 1);
    rx.wait_for(1, DEADLINE).await;
    let hooks = eventually("the endpoint disabled", DEADLINE, || async {
        let (_, hooks) = admin(&bridge, "GET", "/v1/admin/webhooks", None).await;
        if hooks["webhooks"][0]["enabled"] == false {
            Ok(hooks)
        } else {
            Err(hooks)
        }
    })
    .await;
    assert_eq!(hooks["webhooks"][0]["pending"], 1, "{hooks}");
    let (status, _) = admin(&bridge, "POST", "/v1/admin/webhooks/crm/enable", None).await;
    assert_eq!(status, 200);
    let got = rx.wait_for(5, DEADLINE).await;
    assert_eq!(
        got[4].answered, 200,
        "delivered after three retries, not dead-lettered"
    );
    assert!(got
        .iter()
        .all(|r| r.header("webhook-id") == got[0].header("webhook-id")));
    bridge.shutdown().await;
}

#[tokio::test]
async fn binary_mode_sends_data_with_ce_headers_and_static_headers() {
    let rx = Receiver::start(vec![], Answer::status(200)).await;
    let extra = "mode = \"binary\"\nheaders = { \"x-api-key\" = \"k-123\" }";
    let (bridge, vb) = setup(&[
        webhook_block("crm", &rx.url(), extra),
        route_block("calls", &["crm"]),
    ])
    .await;
    assert_eq!(vb.emit(call("b1", "answered")).await, 1);
    let got = rx.wait_for(1, DEADLINE).await;
    let r = &got[0];
    verify(r);
    assert_eq!(r.header("ce-type"), "voipbin.call.status");
    assert_eq!(r.header("ce-subject"), "customer_id:abc123:call:b1");
    assert_eq!(r.header("ce-specversion"), "1.0");
    assert_eq!(r.header("ce-id"), r.header("webhook-id"));
    assert_eq!(r.header("x-api-key"), "k-123");
    assert_eq!(r.header("content-type"), "application/json");
    let data: Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(data, json!({"id": "b1", "status": "answered"}));
    bridge.shutdown().await;
}

/// `Bridge::start` starts the webhook dispatchers before it binds the listen address; when the
/// bind then fails, the dispatchers (and anything else it spawned) must stop, since no
/// `Bridge` exists that could shut them down: they would hold the store and keep delivering
/// in the background of a process that believes the bridge never started. The runtime's
/// count of live tasks, taken before the start, is the observable: it must come back.
#[tokio::test]
async fn a_start_that_fails_after_the_dispatchers_started_leaves_no_task_running() {
    // A std listener holds the address without adding a task to the runtime.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    let addr = taken.local_addr().expect("local address");
    let vb = start_sim(Provider::Voipbin).await;
    let text = config_text(&[
        upstream_block("vb", &vb, FAST),
        webhook_block("crm", "http://127.0.0.1:9/hooks", ""),
        webhook_block("audit", "http://127.0.0.1:9/audit", ""),
    ])
    .replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"{addr}\""),
        1,
    );
    let cfg = wsbridge::config::Config::from_toml(&text, |_| None, false)
        .unwrap_or_else(|e| panic!("{e}\n{text}"));

    let runtime = tokio::runtime::Handle::current().metrics();
    let before = runtime.num_alive_tasks();
    let err = match wsbridge::bridge::Bridge::start(&cfg).await {
        Ok(_) => panic!("the bridge started on an address another socket holds"),
        Err(e) => e,
    };
    assert!(
        matches!(err, wsbridge::bridge::BridgeError::Listen { .. }),
        "{err}"
    );
    eventually("every task of the failed start to end", DEADLINE, || {
        let extra = runtime.num_alive_tasks().saturating_sub(before);
        std::future::ready(match extra {
            0 => Ok(()),
            n => Err(format!("{n} task(s) still running")),
        })
    })
    .await;
    drop(taken);
}
