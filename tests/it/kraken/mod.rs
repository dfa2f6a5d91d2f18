//! A fourth provider from a file alone: Kraken's Spot WebSocket API v2, through the dialect
//! file shipped as an example (`examples/dialects/kraken.toml`), loaded with `[dialects]
//! paths` exactly as a user would, against a test server written from Kraken's docs
//! ([`sim`]) on a real socket. Events reach a real webhook receiver and `/v1/ws` with their
//! types, ids and subjects; a frame of several trades is one event per trade; a reconnect
//! subscribes afresh and the trade snapshot it brings is deduplicated by the trade ids; a
//! book subscription carries its `depth` and its snapshot is journalled; a refused
//! subscription keeps the upstream from `subscribed` and is retried. (`dialect
//! check` on the file is in `cli.rs`.)

mod sim;

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use wsbridge::config::Config;
use wsbridge::upstream::UpstreamState;

use crate::common::receiver::{Answer, Receiver};
use crate::common::ws::{connect, recv, Ws};
use crate::common::*;
use sim::KrakenSim;

const CONSUMER_TOKEN: &str = "kraken-consumer-token";

/// The shipped example file.
fn kraken_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/dialects/kraken.toml")
}

/// A Kraken test server (knowing BTC/USD and ETH/USD, heartbeats every 50 ms), a webhook
/// receiver, and a config in a fresh directory: `[dialects] paths = [dialect]`, a consumer,
/// the webhook with a route for every `kraken` event, and one upstream of `symbols` ×
/// `channels` on the server with `extra` keys.
struct Setup {
    kraken: KrakenSim,
    hook: Receiver,
    config: Config,
    _dir: PathBuf,
}

async fn setup(
    tag: &str,
    dialect: &Path,
    symbols: &[&str],
    channels: &[&str],
    extra: &str,
) -> Setup {
    let kraken = KrakenSim::start(&["BTC/USD", "ETH/USD"], Duration::from_millis(50)).await;
    let hook = Receiver::start(vec![], Answer::status(200)).await;
    let dir = temp_dir(tag);
    let path = dir.join("config.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\npath = {:?}\n[dialects]\npaths = [{:?}]\n\n\
         [[consumers]]\nname = \"c\"\ntoken = \"{CONSUMER_TOKEN}\"\n\n\
         [[webhooks]]\nname = \"desk\"\nurl = \"{}\"\nsecrets = [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]\nallow_private = true\nretry = [\"100ms\"]\ntimeout = \"5s\"\n\n\
         [[routes]]\nname = \"markets\"\nproviders = [\"kraken\"]\nto = [\"desk\"]\n\n\
         [[upstreams]]\nname = \"kraken-spot\"\nadapter = \"kraken\"\nurl = \"{}\"\nsymbols = {}\nchannels = {}\n{extra}{FAST}",
        dir.join("j.db").display().to_string(),
        dialect.display().to_string(),
        hook.url(),
        kraken.url(),
        json!(symbols),
        json!(channels),
    );
    std::fs::write(&path, text).expect("write config");
    let config = Config::load(&path).expect("valid config");
    Setup {
        kraken,
        hook,
        config,
        _dir: dir,
    }
}

/// Connects to `/v1/ws` and subscribes to every `kraken` event from now on.
async fn kraken_consumer(bridge: &wsbridge::bridge::Bridge) -> Ws {
    let mut ws = connect(bridge, CONSUMER_TOKEN).await;
    assert_eq!(recv(&mut ws).await["op"], "ready");
    ws.send(Message::text(
        json!({"op": "subscribe", "id": "k", "filter": {"providers": ["kraken"]}}).to_string(),
    ))
    .await
    .expect("send");
    assert_eq!(recv(&mut ws).await["op"], "subscribed");
    ws
}

/// The next event delivered on `ws`.
async fn next_event(ws: &mut Ws) -> Value {
    loop {
        let frame = recv(ws).await;
        if frame["op"] == "event" {
            return frame["event"].clone();
        }
    }
}

#[tokio::test]
async fn kraken_from_its_dialect_file_reaches_webhooks_and_v1_ws_and_resubscribes_on_reconnect() {
    let env = setup(
        "kraken-e2e",
        &kraken_file(),
        &["BTC/USD", "ETH/USD"],
        &["trade", "ticker"],
        "",
    )
    .await;
    let (kraken, hook, config) = (&env.kraken, &env.hook, &env.config);
    // Subscribed only once the status greeting came and all four (channel, symbol)
    // subscriptions were acknowledged.
    let (bridge, _rx) = start_bridge(config).await;
    let upstream = bridge.upstreams()[0].clone();
    kraken.wait_subscribed(0, 4, DEADLINE).await;
    let mut ws = kraken_consumer(&bridge).await;

    // One frame of two trades: two events, ids `<symbol>/<trade_id>`.
    assert_eq!(kraken.trades("BTC/USD", &[100, 101]).await, 1);
    assert_eq!(kraken.ticker("ETH/USD", 0.1003).await, 1);
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next_event(&mut ws).await);
    }
    let seen: Vec<(String, String, String)> = got
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or("").to_string(),
                e["subject"].as_str().unwrap_or("").to_string(),
                e["provider"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("kraken.trade".into(), "BTC/USD".into(), "kraken".into()),
            ("kraken.trade".into(), "BTC/USD".into(), "kraken".into()),
            ("kraken.ticker".into(), "ETH/USD".into(), "kraken".into()),
        ]
    );
    assert_eq!(got[0]["id"], "BTC/USD/100", "{}", got[0]);
    assert_eq!(got[1]["id"], "BTC/USD/101", "{}", got[1]);
    assert_eq!(got[0]["data"]["trade_id"], 100);
    assert_eq!(got[1]["data"]["qty"], 201.0);
    assert_eq!(got[0]["time"], "2023-09-25T07:48:36.925533Z");
    assert_eq!(got[2]["data"]["last"], 0.1003);
    assert_eq!(got[2]["source"], "wsbridge://kraken-spot");

    // The same three reach the webhook, one request each, in order.
    let requests = hook.wait_for(3, DEADLINE).await;
    let bodies: Vec<Value> = requests
        .iter()
        .map(|r| serde_json::from_slice(&r.body).expect("the envelope"))
        .collect();
    assert_eq!(
        bodies.iter().map(|b| b["id"].clone()).collect::<Vec<_>>(),
        vec![
            got[0]["id"].clone(),
            got[1]["id"].clone(),
            got[2]["id"].clone()
        ]
    );
    assert_eq!(bodies[2]["type"], "kraken.ticker");
    assert_eq!(requests[0].header("webhook-id"), "BTC/USD/100");

    // App-level pings were answered with pongs and heartbeats arrived: neither, nor the
    // status or the acknowledgements, is an event.
    eventually("pings answered and heartbeats sent", DEADLINE, || async {
        let (pings, beats, _) = kraken.counts();
        if pings >= 2 && beats >= 3 {
            Ok(())
        } else {
            Err(format!("{pings} pings, {beats} heartbeats"))
        }
    })
    .await;
    assert_eq!(upstream.counters().events, 3, "{:?}", upstream.counters());
    assert_eq!(upstream.counters().decode_errors, 0);

    // The server restarts: the bridge reconnects, is greeted, subscribes afresh. The trade
    // snapshot of the new subscription repeats trades 100 and 101: the same ids, so no new
    // events; then trade 102 arrives as one.
    kraken.drop_all().await;
    eventually("a second connection", DEADLINE, || async {
        (kraken.connections() >= 2).then_some(())
    })
    .await;
    kraken.wait_subscribed(1, 4, DEADLINE).await;
    wait_subscribed(&upstream).await;
    assert_eq!(kraken.trades("BTC/USD", &[102]).await, 1);
    let e = next_event(&mut ws).await;
    assert_eq!(e["id"], "BTC/USD/102", "{e}");
    assert!(e.get("gap").is_none(), "{e}");

    // Trade ids are sequence numbers per symbol: 103 skipped, so 104 carries `gap` = 1.
    assert_eq!(kraken.trades("BTC/USD", &[104]).await, 1);
    let e = next_event(&mut ws).await;
    assert_eq!(e["id"], "BTC/USD/104", "{e}");
    assert_eq!(e["gap"], 1, "{e}");
    assert_eq!(upstream.counters().gaps, 1);
    // The webhook got each event once: the snapshot's repeats were not delivered again.
    let requests = hook
        .wait_until(DEADLINE, "trade 104", |r| {
            r.iter().any(|r| r.header("webhook-id") == "BTC/USD/104")
        })
        .await;
    let ids: Vec<String> = requests
        .iter()
        .map(|r| r.header("webhook-id").to_string())
        .collect();
    assert_eq!(
        ids,
        vec![
            "BTC/USD/100".to_string(),
            "BTC/USD/101".to_string(),
            got[2]["id"].as_str().unwrap_or("").to_string(),
            "BTC/USD/102".to_string(),
            "BTC/USD/104".to_string(),
        ]
    );
    bridge.shutdown().await;
}

#[tokio::test]
async fn a_refused_kraken_subscription_is_logged_counted_and_retried() {
    // The shipped file with a short acknowledgement timeout (10s would outlast the test).
    let dir = temp_dir("kraken-refused-dialect");
    let dialect = dir.join("kraken.toml");
    let text = std::fs::read_to_string(kraken_file()).expect("the example file");
    assert!(text.contains("ack_timeout = \"10s\""));
    std::fs::write(
        &dialect,
        text.replace("ack_timeout = \"10s\"", "ack_timeout = \"300ms\""),
    )
    .expect("write");
    let Setup {
        kraken,
        config,
        _dir,
        ..
    } = setup(
        "kraken-refused",
        &dialect,
        &["BTC/USD", "NOPE/USD"],
        &["trade"],
        "",
    )
    .await;
    let bridge = wsbridge::bridge::Bridge::start(&config)
        .await
        .expect("bridge starts");
    let u = bridge.upstreams()[0].clone();
    eventually("refusals, ack timeouts and a retry", DEADLINE, || async {
        let (c, (_, _, refused), conns) = (u.counters(), kraken.counts(), kraken.connections());
        (c.ack_timeouts >= 2 && refused >= 2 && conns >= 2)
            .then_some(())
            .ok_or_else(|| format!("{c:?}, {refused} refused, {conns} connections"))
    })
    .await;
    assert_ne!(u.status().state, UpstreamState::Subscribed);
    // The refusals are `error` controls: neither events nor decode errors.
    assert_eq!(u.counters().events, 0, "{:?}", u.counters());
    assert_eq!(u.counters().decode_errors, 0);
    bridge.shutdown().await;
}

#[tokio::test]
async fn a_kraken_book_subscription_sends_its_depth_and_journals_the_snapshot() {
    let book_env = setup(
        "kraken-book",
        &kraken_file(),
        &["BTC/USD"],
        &["book"],
        "depth = 25\n",
    )
    .await;
    let (bridge, mut rx) = start_bridge(&book_env.config).await;
    let book = next_matching(&mut rx, "the book snapshot", |p| {
        p.envelope.event_type == "kraken.book.snapshot"
    })
    .await;
    assert_eq!(book.envelope.subject.as_deref(), Some("BTC/USD"));
    let subscribe = book_env
        .kraken
        .requests()
        .into_iter()
        .find(|r| r["method"] == "subscribe")
        .expect("a subscribe request");
    assert_eq!(
        subscribe,
        json!({"method": "subscribe", "params": {"channel": "book", "symbol": ["BTC/USD"], "snapshot": true, "depth": 25}})
    );
    book_env
        .hook
        .wait_until(DEADLINE, "the book snapshot delivered", |r| !r.is_empty())
        .await;
    bridge.shutdown().await;
}
