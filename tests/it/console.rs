//! The operator console at `/`, driven in headless Chromium by Playwright (`playwright-core`
//! from npm, installed once per test run under the cargo target's scratch directory, with
//! Debian's `chromium`): without the token only the public parts show; with the admin token
//! typed in, the live tail shows the journalled events and expands a row to its envelope, a
//! chart has points, and the dead letter's Replay button makes it arrive at the test's
//! receiver. The token stays out of every URL.
//!
//! `WSBRIDGE_UPDATE_SCREENSHOT=1` also writes the screenshot the script takes to
//! `docs/console.png` (the README's).

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use wsbridge_adapters::{voipbin, Provider};

use crate::common::examples::{blocking, npm_install, Group};
use crate::common::receiver::{Answer, Receiver};
use crate::common::*;

const ADMIN: &str = "console-admin-token";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// How long the whole browser run may take (a cold Chromium on a busy 2-core machine).
const DRIVE_DEADLINE: Duration = Duration::from_secs(180);

/// Runs `console/drive.js` against `url`; what it saw, as JSON.
async fn drive(url: &str, webhook: &str, dead_seq: u64, events: usize, shot: &Path) -> Value {
    let modules = blocking(|| {
        npm_install(
            "console-node",
            &["playwright-core@^1.50"],
            "installing playwright-core from npm (is node/npm installed and the npm registry reachable?)",
        )
    })
    .await;
    let mut cmd = tokio::process::Command::new("node");
    cmd.env("NODE_PATH", &modules)
        .arg(repo().join("tests/it/console/drive.js"))
        .args([url, ADMIN, webhook])
        .arg(dead_seq.to_string())
        .arg(events.to_string())
        .arg(shot);
    let (status, out, err) = Group::spawn("node", &mut cmd)
        .output("the console driver", DRIVE_DEADLINE)
        .await;
    let stdout = String::from_utf8_lossy(&out);
    assert!(
        status.success(),
        "the console driver failed ({status}):\n{stdout}\n{}",
        String::from_utf8_lossy(&err)
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("driver output is not JSON ({e}): {stdout}"))
}

#[tokio::test]
async fn the_console_tails_charts_and_replays_a_dead_letter() {
    // Two failures, then every request succeeds: the event is dead-lettered after its two
    // attempts (`retry` has one step) and the replay is delivered.
    let hook = Receiver::start(
        vec![Answer::status(500), Answer::status(500)],
        Answer::status(200),
    )
    .await;
    // Answers the call's first delivery 410 Gone, which disables the endpoint until the
    // console's Re-enable button; then 200.
    let gone = Receiver::start(vec![Answer::status(410)], Answer::status(200)).await;
    // Gets the Hashi events, emitted all along the browser run: live rates and latencies.
    let audit = Receiver::start(vec![], Answer::status(200)).await;
    let vb = start_sim(Provider::Voipbin).await;
    let hs = start_sim(Provider::Hashi).await;
    let cfg = config_with_admin(
        &[
            upstream_block("voipbin-main", &vb, FAST),
            upstream_block("hashi-main", &hs, FAST),
            format!(
                "[[webhooks]]\nname = \"crm\"\nurl = \"{}\"\nsecrets = [\"{SECRET}\"]\nallow_private = true\nretry = [\"50ms\"]\n\n\
                 [[routes]]\nname = \"calls\"\nproviders = [\"voipbin\"]\nto = [\"crm\", \"gone\"]\n",
                hook.url()
            ),
            format!(
                "[[webhooks]]\nname = \"gone\"\nurl = \"{}\"\nsecrets = [\"{SECRET}\"]\nallow_private = true\n",
                gone.url()
            ),
            format!(
                "[[webhooks]]\nname = \"audit\"\nurl = \"{}\"\nsecrets = [\"{SECRET}\"]\nallow_private = true\n\n\
                 [[routes]]\nname = \"lobbies\"\nproviders = [\"hashi\"]\nto = [\"audit\"]\n",
                audit.url()
            ),
        ],
        ADMIN,
    );
    let (bridge, mut rx) = start_bridge(&cfg).await;
    wait_sim_ready(&vb, 1).await;
    wait_sim_ready(&hs, 1).await;
    assert_eq!(
        vb.emit(voipbin::wire::event(
            "call.status",
            "2024-01-15T10:30:00.000000Z",
            "customer_id:abc123:call:c1",
            json!({"id": "c1", "status": "answered"}),
        ))
        .await,
        1
    );
    for i in 0..2 {
        assert_eq!(hs.emit(numbered_lobby_join(i)).await, 1);
    }
    let call = next_matching(&mut rx, "the call event", |p| {
        p.envelope.provider == "voipbin"
    })
    .await;
    let seq = call.envelope.seq.expect("journalled");
    wait_published(&bridge, 3).await;
    let first = hook.wait_for(2, DEADLINE).await;
    let id = first[0].header("webhook-id").to_string();
    eventually("the delivery dead-lettered", DEADLINE, || async {
        let status: Value = serde_json::from_str(&get_text(&bridge, "/v1/status").await).ok()?;
        let hooks = status["webhooks"].as_array()?;
        let crm = hooks.iter().find(|w| w["name"] == "crm")?;
        let gone = hooks.iter().find(|w| w["name"] == "gone")?;
        (crm["dead"] == 1 && gone["enabled"] == false).then_some(())
    })
    .await;
    gone.wait_for(1, DEADLINE).await;
    // A durable subscription for the console's table (owned by the admin consumer), left
    // idle with everything unacked: its lag is the journal's head.
    {
        use futures_util::SinkExt;
        let mut ws = crate::common::ws::connect(&bridge, ADMIN).await;
        crate::common::ws::recv(&mut ws).await;
        ws.send(tokio_tungstenite::tungstenite::Message::text(
            json!({"op": "subscribe", "id": 1, "durable": "console", "from": "earliest", "max_unacked": 1})
                .to_string(),
        ))
        .await
        .expect("subscribe");
        assert_eq!(crate::common::ws::recv(&mut ws).await["op"], "subscribed");
    }

    // Hashi events keep coming while the browser runs (four a second, until it is done).
    let live = tokio::spawn({
        let hs = hs.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            for i in 2u64.. {
                tick.tick().await;
                hs.emit(numbered_lobby_join(i)).await;
            }
        }
    });
    let shot = temp_dir("console-shot").join("console.png");
    let seen = drive(
        &format!("http://{}/", bridge.local_addr()),
        "crm",
        seq,
        3,
        &shot,
    )
    .await;
    live.abort();

    assert_eq!(seen["publicTailHidden"], true, "{seen}");
    assert_eq!(seen["durableName"], "console", "{seen}");
    assert!(
        seen["durableLag"]
            .as_str()
            .and_then(|t| t.replace(',', "").parse::<u64>().ok())
            .is_some_and(|lag| lag >= 3),
        "the durable's lag is shown: {seen}"
    );
    assert_eq!(seen["publicDeadHidden"], true, "{seen}");
    assert_eq!(seen["tokenInStorage"], ADMIN);
    assert_eq!(
        seen["tokenFieldAfter"], "",
        "the field is cleared once used"
    );
    assert!(seen["tailRows"].as_u64().is_some_and(|n| n >= 3), "{seen}");
    let providers: Vec<&str> = seen["tailProviders"]
        .as_array()
        .expect("providers")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    // Newest first: the journal's first event (the call) is the last row.
    assert_eq!(providers.last(), Some(&"voipbin"), "{seen}");
    assert!(providers.contains(&"hashi"), "{seen}");
    assert_eq!(
        seen["envelope"]["specversion"], "1.0",
        "a row expands to its envelope: {seen}"
    );
    assert!(
        seen["pausedState"]
            .as_str()
            .is_some_and(|s| s.starts_with("paused")),
        "{seen}"
    );
    assert!(
        seen["chartEventsPoints"].as_u64().is_some_and(|n| n >= 2),
        "{seen}"
    );
    let series: Vec<&str> = seen["chartEventsSeries"]
        .as_array()
        .expect("series")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        series.contains(&"voipbin") && series.contains(&"hashi"),
        "{seen}"
    );
    assert!(seen["chartJournalPoints"].as_u64().is_some_and(|n| n >= 2));
    assert!(
        seen["chartLatencySeries"]
            .as_array()
            .is_some_and(|s| s.contains(&json!("audit p50")) && s.contains(&json!("audit p99"))),
        "{seen}"
    );
    assert!(
        seen["deadRowText"]
            .as_str()
            .is_some_and(|t| t.contains(&id)),
        "the dead letter is listed with its id: {seen}"
    );
    assert_eq!(seen["replayed"], true);
    // The token travelled in headers only.
    for url in seen["urls"].as_array().expect("urls") {
        let url = url.as_str().unwrap_or("");
        assert!(!url.contains(ADMIN), "the token is in a URL: {url}");
    }
    let auth = seen["eventsAuth"].as_array().expect("auth headers");
    assert!(!auth.is_empty());
    assert!(auth.iter().all(|a| a == &json!(format!("Bearer {ADMIN}"))));

    // The replay arrives at the receiver: the same event, answered 200.
    let got = hook.wait_for(3, DEADLINE).await;
    assert_eq!(got[2].answered, 200);
    assert_eq!(got[2].header("webhook-id"), id);
    let body: Value = serde_json::from_slice(&got[2].body).expect("envelope");
    assert_eq!(body["seq"], seq);

    // Re-enabled with its button: the held delivery goes out and is answered 200.
    assert_eq!(seen["reenabled"], true, "{seen}");
    let got = gone.wait_for(2, DEADLINE).await;
    assert_eq!(got[1].answered, 200);
    assert_eq!(got[1].header("webhook-id"), id);

    assert!(shot.is_file(), "the driver took a screenshot");
    if std::env::var_os("WSBRIDGE_UPDATE_SCREENSHOT").is_some() {
        std::fs::copy(&shot, repo().join("docs/console.png")).expect("docs/console.png");
    }
    bridge.shutdown().await;
}

/// The console tails with the admin token: `/v1/events` and `/v1/ws` take it as a consumer
/// that sees everything, from the `Authorization` header only, never from `?token=` (a URL
/// ends up in logs and histories).
#[tokio::test]
async fn the_admin_token_opens_the_stream_from_the_header_only() {
    let vb = start_sim(Provider::Voipbin).await;
    let cfg = config_with_admin(&[upstream_block("vb", &vb, FAST)], ADMIN);
    let (bridge, _rx) = start_bridge(&cfg).await;
    let client = http_client();
    let url = format!("http://{}/v1/events", bridge.local_addr());
    let header = client
        .get(&url)
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("request");
    assert_eq!(header.status().as_u16(), 200);
    assert!(header
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream")));
    drop(header);
    let query = client
        .get(format!("{url}?token={ADMIN}"))
        .send()
        .await
        .expect("request");
    assert_eq!(query.status().as_u16(), 401);
    let wrong = client
        .get(&url)
        .bearer_auth("not-the-admin-token")
        .send()
        .await
        .expect("request");
    assert_eq!(wrong.status().as_u16(), 401);
    bridge.shutdown().await;
}
