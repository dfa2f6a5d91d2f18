//! Issue 12, finding 3: one size limit for the whole pipeline (`limits.max_event_bytes`).
//!
//! An event the bridge accepts is deliverable on every path: a ~300 KiB event (above the old
//! 256 KiB `/v1/ws` write buffer) reaches a live `/v1/ws` consumer, a resuming one, SSE and
//! webhooks in both modes. An event whose envelope is over the limit is refused at ingest and
//! counted (`wsbridge_events_too_large_total`), the connection stays up, and the events after
//! it flow.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::receiver::{Answer, Receiver};
use crate::common::ws::{recv, sse_events, subscribe_from, Ws};
use crate::common::*;
use wsbridge::bridge::Bridge;
use wsbridge_adapters::sim::Simulator;
use wsbridge_adapters::{voipbin, Provider};

const TOKEN: &str = "token-event-size";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const LONG: Duration = Duration::from_secs(30);

/// A VoIPBIN call event numbered `i` whose `data.pad` is `pad` bytes long.
fn padded_call(i: usize, pad: usize) -> Value {
    voipbin::wire::event(
        "call.status",
        "2024-01-15T10:30:00.000000Z",
        &format!("customer_id:abc123:call:c{i}"),
        json!({"id": format!("c{i}"), "status": "ringing", "n": i, "pad": "x".repeat(pad)}),
    )
}

fn webhook_block(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[[webhooks]]\nname = \"{name}\"\nurl = \"{url}\"\nsecrets = [\"{SECRET}\"]\nallow_private = true\nretry = [\"100ms\", \"100ms\", \"100ms\"]\ntimeout = \"10s\"\n{extra}\n"
    )
}

/// A bridge reading one VoIPBIN simulator, with a consumer token and two webhooks (one
/// structured, one binary) that get every event.
async fn rig() -> (Bridge, Simulator, Receiver, Receiver) {
    let vb = start_sim(Provider::Voipbin).await;
    let structured = Receiver::start(Vec::new(), Answer::status(200)).await;
    let binary = Receiver::start(Vec::new(), Answer::status(200)).await;
    let cfg = config(&[
        upstream_block("vb", &vb, FAST),
        format!("[[consumers]]\nname = \"all\"\ntoken = \"{TOKEN}\"\n"),
        webhook_block("structured", &structured.url(), ""),
        webhook_block("binary", &binary.url(), "mode = \"binary\"\n"),
        "[[routes]]\nname = \"all\"\nproviders = [\"voipbin\"]\nto = [\"structured\", \"binary\"]\n"
            .to_string(),
    ]);
    let (bridge, _) = start_bridge(&cfg).await;
    wait_sim_ready(&vb, 1).await;
    (bridge, vb, structured, binary)
}

/// The next `n` event frames as (seq, data.n, envelope length); any other frame, a close or
/// a dropped connection fails the test.
async fn read_events(ws: &mut Ws, n: usize) -> Vec<(u64, u64, usize)> {
    let mut out = Vec::new();
    while out.len() < n {
        let f = recv(ws).await;
        assert_eq!(f["op"], "event", "unexpected frame {f}");
        let len = f["event"].to_string().len();
        out.push((
            f["seq"].as_u64().expect("seq"),
            f["event"]["data"]["n"].as_u64().expect("data.n"),
            len,
        ));
    }
    out
}

/// The value of an unlabelled sample in a Prometheus text exposition.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_300_kib_event_reaches_live_and_resuming_ws_consumers_sse_and_webhooks() {
    let (bridge, vb, structured, binary) = rig().await;
    let mut live = subscribe_from(&bridge, TOKEN, "live", json!("latest")).await;

    const PAD: usize = 300 * 1024;
    vb.emit(padded_call(0, 10)).await;
    vb.emit(padded_call(1, PAD)).await;
    vb.emit(padded_call(2, 10)).await;

    // Live: the big event and the one after it arrive on the same connection.
    let got = read_events(&mut live, 3).await;
    let ns: Vec<u64> = got.iter().map(|e| e.1).collect();
    assert_eq!(ns, vec![0, 1, 2], "live consumer: {got:?}");
    assert!(
        got[1].2 > PAD,
        "the big event arrived whole: {} bytes",
        got[1].2
    );
    let first = got[0].0;

    // Resuming from before it: the same three, again and again (a consumer that reconnects).
    for round in 0..2 {
        let mut resumed = subscribe_from(&bridge, TOKEN, "resume", json!(first)).await;
        let again = read_events(&mut resumed, 3).await;
        assert_eq!(again, got, "resume round {round}");
    }

    // SSE from the start.
    let sse = sse_events(&bridge, TOKEN, "from=earliest", None, 3).await;
    let ns: Vec<u64> = sse
        .iter()
        .map(|(_, e)| e["data"]["n"].as_u64().expect("data.n"))
        .collect();
    assert_eq!(ns, vec![0, 1, 2], "SSE");
    assert_eq!(sse[1].1["data"]["pad"].as_str().map(str::len), Some(PAD));

    // Webhooks, structured (the envelope) and binary (the payload).
    let requests = structured.wait_for(3, LONG).await;
    let mut ns: Vec<u64> = requests
        .iter()
        .map(|r| {
            let v: Value = serde_json::from_slice(&r.body).expect("envelope body");
            v["data"]["n"].as_u64().expect("data.n")
        })
        .collect();
    ns.sort_unstable();
    assert_eq!(ns, vec![0, 1, 2], "structured webhook");
    let requests = binary.wait_for(3, LONG).await;
    let big = requests
        .iter()
        .find(|r| r.body.len() > PAD)
        .expect("the big payload reached the binary webhook");
    let data: Value = serde_json::from_slice(&big.body).expect("payload body");
    assert_eq!(data["n"], 1);
    assert_eq!(big.header("ce-type"), "voipbin.call.status");

    let text = metrics_text(&bridge).await;
    assert_eq!(sample(&text, "wsbridge_events_too_large_total"), Some(0.0));
    drop(live);
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_over_max_event_bytes_is_refused_counted_and_the_next_events_flow() {
    let (bridge, vb, structured, _binary) = rig().await;
    let mut live = subscribe_from(&bridge, TOKEN, "live", json!("latest")).await;

    // Over the default limit (1 MiB less 8 KiB) as an envelope, yet a frame the upstream
    // reads whole: refused as one event, the connection kept.
    const PAD: usize = (1 << 20) - 4 * 1024;
    vb.emit(padded_call(0, 10)).await;
    vb.emit(padded_call(1, PAD)).await;
    vb.emit(padded_call(2, 10)).await;
    vb.emit(padded_call(3, 10)).await;

    let got = read_events(&mut live, 3).await;
    let ns: Vec<u64> = got.iter().map(|e| e.1).collect();
    assert_eq!(
        ns,
        vec![0, 2, 3],
        "the big one refused, the rest flow: {got:?}"
    );
    let seqs: Vec<u64> = got.iter().map(|e| e.0).collect();
    assert_eq!(
        seqs,
        vec![seqs[0], seqs[0] + 1, seqs[0] + 2],
        "nothing journalled for the refused event"
    );
    let requests = structured.wait_for(3, LONG).await;
    assert_eq!(requests.len(), 3);

    let up = bridge.upstream("vb").expect("upstream").counters();
    assert_eq!(up.reconnects, 0, "the connection stayed up: {up:?}");
    let text = metrics_text(&bridge).await;
    assert!(
        text.contains("# HELP wsbridge_events_too_large"),
        "metric has HELP text"
    );
    assert_eq!(sample(&text, "wsbridge_events_too_large_total"), Some(1.0));

    // The refusal does not stick: later events keep flowing on the same connection.
    vb.emit(padded_call(4, 10)).await;
    let more = read_events(&mut live, 1).await;
    assert_eq!(more[0].1, 4);
    assert_eq!(more[0].0, seqs[2] + 1);
    bridge.shutdown().await;
}

/// The NATS journal must take every event ingest accepts: a server whose `max_payload` is
/// below `limits.max_event_bytes` (plus room for headers) is refused at start, naming both
/// settings, instead of refusing events one by one later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_whose_max_payload_is_below_max_event_bytes_is_refused_at_start() {
    use crate::common::nats::{cleanup, nats_config, unique_prefix, NatsServer};
    let server = NatsServer::start_with_config("limits-payload", Some("max_payload: 65536\n"));
    server.wait_ready(LONG).await;
    let vb = start_sim(Provider::Voipbin).await;
    let blocks = [upstream_block("vb", &vb, FAST)];
    let urls = [server.url()];

    let prefix = unique_prefix("limits_payload");
    let cfg = nats_config(&blocks, &urls, &prefix, "");
    let err = match Bridge::start(&cfg).await {
        Ok(bridge) => {
            bridge.shutdown().await;
            panic!("a 64 KiB max_payload cannot carry the default max_event_bytes");
        }
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("max_payload is 65536") && err.contains("limits.max_event_bytes"),
        "{err}"
    );
    cleanup(&server.url(), &prefix).await;

    // Lowered to fit, the same server is fine.
    let prefix = unique_prefix("limits_payload_ok");
    let mut blocks = blocks.to_vec();
    blocks.push("[limits]\nmax_event_bytes = 32768\n".to_string());
    let cfg = nats_config(&blocks, &urls, &prefix, "");
    let bridge = Bridge::start(&cfg)
        .await
        .expect("starts when the limit fits");
    bridge.shutdown().await;
    cleanup(&server.url(), &prefix).await;
}

/// A message too large to read at all (over twice `limits.max_event_bytes` plus 64 KiB) is
/// never buffered: the connection is dropped, counted per upstream, and reopened, and the
/// events sent after the reconnect flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_the_upstream_read_limit_is_counted_and_the_connection_reopens() {
    let vb = start_sim(Provider::Voipbin).await;
    let cfg = config(&[
        upstream_block("vb", &vb, FAST),
        format!("[[consumers]]\nname = \"all\"\ntoken = \"{TOKEN}\"\n"),
        "[limits]\nmax_event_bytes = 16384\n".to_string(),
    ]);
    let (bridge, _) = start_bridge(&cfg).await;
    wait_sim_ready(&vb, 1).await;
    let mut live = subscribe_from(&bridge, TOKEN, "live", json!("latest")).await;

    let first = vb.snapshot().connections[0].id;
    vb.emit(padded_call(0, 10)).await;
    // 16 KiB x 2 + 64 KiB = 96 KiB is the most read; this frame is 200 KiB.
    vb.emit(padded_call(1, 200 * 1024)).await;
    // The bridge drops that connection and opens a new one, which subscribes again.
    vb.wait_until(DEADLINE, |s| {
        s.connections
            .iter()
            .any(|c| c.id != first && !c.subscriptions.is_empty())
    })
    .await
    .unwrap_or_else(|s| panic!("no new subscribed connection: {s:?}"));
    let up = bridge.upstream("vb").expect("upstream").counters();
    assert_eq!(up.frames_too_large, 1, "{up:?}");
    assert!(up.reconnects >= 1, "{up:?}");
    vb.emit(padded_call(2, 10)).await;

    let got = read_events(&mut live, 2).await;
    let ns: Vec<u64> = got.iter().map(|e| e.1).collect();
    assert_eq!(ns, vec![0, 2]);
    let text = metrics_text(&bridge).await;
    assert!(
        text.contains("# HELP wsbridge_upstream_frames_too_large"),
        "metric has HELP text"
    );
    assert!(
        text.contains("wsbridge_upstream_frames_too_large_total{upstream=\"vb\"} 1"),
        "{text}"
    );
    bridge.shutdown().await;
}
