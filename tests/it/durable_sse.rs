//! Durable subscriptions over SSE (`GET /v1/events?durable=NAME`) and their acknowledgements
//! (`POST /v1/durables/{name}/ack`), against the real bridge, a simulated VoIPBIN feed and the
//! real journal file: a stream gets its events with `delivery`, acks by POST settle them, a
//! reconnected stream gets back exactly the unacknowledged ones (`delivery` 2) and ignores
//! `Last-Event-ID`, two streams share one durable, a deleted durable ends its stream, and the
//! refusals (unknown durable 404, wrong token 401, bad body 400, `durable_mismatch` 409,
//! `too_many_durables` 429, bad parameters 400) are JSON with the `/v1/ws` error code. The
//! stream tests run on both backends (the embedded file and the shared NATS server).

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::common::nats::{cleanup, nats_config, unique_prefix, SHARED_NATS};
use crate::common::*;
use serde_json::{json, Value};
use wsbridge::bridge::Bridge;
use wsbridge::envelope::Published;
use wsbridge::storage::DurableKey;
use wsbridge_adapters::sim::Simulator;
use wsbridge_adapters::Provider;

const TOKEN: &str = "token-durable-sse";
const OTHER_TOKEN: &str = "token-durable-sse-other";
const CALLS: &str = "types=voipbin.call.*";

#[derive(Clone, Copy, Debug)]
enum Backend {
    Embedded,
    Nats,
}

struct Setup {
    bridge: Bridge,
    vb: Simulator,
    published: tokio::sync::broadcast::Receiver<Arc<Published>>,
    /// The NATS backend's prefix, for the cleanup.
    nats_prefix: Option<String>,
}

async fn setup(extra: &str) -> Setup {
    setup_on(Backend::Embedded, extra).await
}

async fn setup_on(backend: Backend, extra: &str) -> Setup {
    let vb = start_sim(Provider::Voipbin).await;
    let blocks = [
        upstream_block("vb", &vb, FAST),
        format!(
            "[[consumers]]\nname = \"billing\"\ntoken = \"{TOKEN}\"\n\n\
             [[consumers]]\nname = \"other\"\ntoken = \"{OTHER_TOKEN}\"\n\n{extra}"
        ),
    ];
    let (cfg, nats_prefix) = match backend {
        Backend::Embedded => (config(&blocks), None),
        Backend::Nats => {
            let prefix = unique_prefix("dsse");
            (
                nats_config(&blocks, &[SHARED_NATS.to_string()], &prefix, ""),
                Some(prefix),
            )
        }
    };
    let (bridge, published) = start_bridge(&cfg).await;
    wait_sim_ready(&vb, 1).await;
    Setup {
        bridge,
        vb,
        published,
        nats_prefix,
    }
}

impl Setup {
    /// Stops the bridge and removes what it left on NATS.
    async fn finish(self) {
        self.bridge.shutdown().await;
        if let Some(prefix) = &self.nats_prefix {
            cleanup(SHARED_NATS, prefix).await;
        }
    }

    /// Emits calls `range` and waits until each is journalled; their seqs.
    async fn emit(&mut self, range: std::ops::Range<usize>) -> Vec<u64> {
        let mut seqs = Vec::new();
        for i in range {
            assert_eq!(self.vb.emit(numbered_call(i)).await, 1, "call {i}");
            let p = next_matching(&mut self.published, &format!("call c{i}"), |p| {
                p.envelope.data["n"] == json!(i)
            })
            .await;
            seqs.push(p.envelope.seq.expect("a published event has a seq"));
        }
        seqs
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.bridge.local_addr())
    }

    /// `POST /v1/durables/{name}/ack` with `body` and `token`: the status and the JSON answer.
    async fn ack(&self, token: &str, name: &str, body: &str) -> (u16, Value) {
        let resp = http_client()
            .post(self.url(&format!("/v1/durables/{name}/ack")))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("ack request");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("ack body");
        let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        (status, v)
    }

    /// Opens `/v1/events?<query>` with `token` (and a `Last-Event-ID`, which a durable
    /// stream ignores): the stream, or the refusal's status and JSON body.
    async fn open(
        &self,
        token: &str,
        query: &str,
        last_event_id: Option<u64>,
    ) -> Result<SseStream, (u16, Value)> {
        let mut req = http_client()
            .get(self.url(&format!("/v1/events?{query}")))
            .bearer_auth(token)
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id.to_string());
        }
        let resp = tokio::time::timeout(DEADLINE, req.send())
            .await
            .expect("an answer in time")
            .expect("GET /v1/events");
        let status = resp.status().as_u16();
        if status != 200 {
            let text = resp.text().await.expect("body");
            let v = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("refusal {status} is not JSON ({e}): {text}"));
            return Err((status, v));
        }
        Ok(SseStream {
            resp,
            buf: String::new(),
        })
    }

    /// Opens a durable stream that must be accepted, and reads its `subscribed` event.
    async fn attach(&self, query: &str) -> (SseStream, Value) {
        let mut stream = self
            .open(TOKEN, query, None)
            .await
            .unwrap_or_else(|(s, v)| panic!("{query}: refused {s} {v}"));
        let first = stream.next().await;
        assert_eq!(first.event, "subscribed", "{first:?}");
        let data = serde_json::from_str(&first.data).expect("subscribed data is JSON");
        (stream, data)
    }
}

/// One SSE event: its type (`message` when not named), `id` and `data`.
#[derive(Debug)]
struct SseEvent {
    event: String,
    id: Option<u64>,
    data: String,
}

/// An open SSE response, parsed event by event (comments skipped).
struct SseStream {
    resp: reqwest::Response,
    buf: String,
}

impl SseStream {
    /// The next event, within the deadline.
    async fn next(&mut self) -> SseEvent {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut ev = SseEvent {
                    event: "message".into(),
                    id: None,
                    data: String::new(),
                };
                let mut has_data = false;
                for line in block.lines() {
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match field {
                        "event" => ev.event = value.to_string(),
                        "id" => ev.id = value.parse().ok(),
                        "data" => {
                            if has_data {
                                ev.data.push('\n');
                            }
                            ev.data.push_str(value);
                            has_data = true;
                        }
                        _ => {}
                    }
                }
                if has_data {
                    return ev;
                }
                continue;
            }
            let chunk = tokio::time::timeout(DEADLINE, self.resp.chunk())
                .await
                .expect("an SSE event in time")
                .expect("read the stream")
                .expect("the stream is still open");
            self.buf
                .push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
        }
    }

    /// The next `n` events, each a delivery: `(seq, delivery)`, checked against `id` and the
    /// envelope's own seq.
    async fn deliveries(&mut self, n: usize) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        while out.len() < n {
            out.push(self.delivery().await);
        }
        out
    }

    async fn delivery(&mut self) -> (u64, u64) {
        let ev = self.next().await;
        assert_eq!(ev.event, "message", "{ev:?}");
        let data: Value = serde_json::from_str(&ev.data).expect("data is JSON");
        let seq = data["seq"].as_u64().expect("seq");
        assert_eq!(ev.id, Some(seq), "id is the seq: {ev:?}");
        assert_eq!(data["event"]["seq"], json!(seq), "the envelope: {data}");
        assert_eq!(data["event"]["type"], "voipbin.call.status", "{data}");
        (seq, data["delivery"].as_u64().expect("delivery"))
    }
}

fn ones(seqs: &[u64], delivery: u64) -> Vec<(u64, u64)> {
    seqs.iter().map(|s| (*s, delivery)).collect()
}

/// Events, acks by POST, and a reconnect that gets back exactly the unacknowledged ones with
/// `delivery` 2 (the bridge keeps the cursor: `from` and `Last-Event-ID` do not move it).
async fn acks_by_post_and_a_reconnect_gets_back_only_the_unacked(backend: Backend) {
    let mut s = setup_on(backend, "").await;
    let seqs = s.emit(1..6).await;
    let query = format!("durable=billing-sync&{CALLS}&from=earliest");

    let (mut stream, subscribed) = s.attach(&query).await;
    let session = subscribed["session"].as_str().expect("session").to_string();
    assert_eq!(
        subscribed,
        json!({"durable": "billing-sync", "session": session, "acked": 0, "pending": 5})
    );
    assert_eq!(stream.deliveries(5).await, ones(&seqs, 1));

    let (status, out) = s
        .ack(
            TOKEN,
            "billing-sync",
            &json!({"seqs": &seqs[..3]}).to_string(),
        )
        .await;
    assert_eq!((status, out), (200, json!({"acked": 3, "ignored": 0})));
    // Acking again, or a seq never sent: ignored and counted, not an error.
    let (status, out) = s
        .ack(
            TOKEN,
            "billing-sync",
            &json!({"seqs": [seqs[0], 999]}).to_string(),
        )
        .await;
    assert_eq!((status, out), (200, json!({"acked": 0, "ignored": 2})));

    // Disconnect with two unacknowledged; a new stream (whose Last-Event-ID would skip
    // them, were it not a durable) gets exactly those two again.
    drop(stream);
    let mut stream = s
        .open(TOKEN, &query, Some(seqs[4]))
        .await
        .unwrap_or_else(|(st, v)| panic!("reconnect refused {st} {v}"));
    let first = stream.next().await;
    assert_eq!(first.event, "subscribed");
    let subscribed: Value = serde_json::from_str(&first.data).expect("JSON");
    assert_eq!(subscribed["acked"], json!(seqs[2]), "{subscribed}");
    assert_eq!(subscribed["pending"], 2, "{subscribed}");
    assert_eq!(stream.deliveries(2).await, ones(&seqs[3..], 2));

    // Live events follow on the same stream; `upto` settles everything this stream holds up
    // to it. It names the stream: without its session, or with a closed stream's, it is
    // refused.
    let live = s.emit(6..7).await;
    assert_eq!(stream.deliveries(1).await, ones(&live, 1));
    let upto = |session: &str| json!({"upto": live[0], "session": session}).to_string();
    let (status, out) = s
        .ack(TOKEN, "billing-sync", &json!({"upto": live[0]}).to_string())
        .await;
    assert_eq!(
        (status, &out["code"]),
        (400, &json!("bad_request")),
        "{out}"
    );
    let (status, out) = s.ack(TOKEN, "billing-sync", &upto(&session)).await;
    assert_eq!(
        (status, &out["code"]),
        (404, &json!("unknown_session")),
        "{out}"
    );
    let session = subscribed["session"].as_str().expect("session");
    // Another consumer cannot ack this consumer's stream.
    let (status, out) = s.ack(OTHER_TOKEN, "billing-sync", &upto(session)).await;
    assert_eq!(status, 404, "{out}");
    let (status, out) = s.ack(TOKEN, "billing-sync", &upto(session)).await;
    assert_eq!((status, out), (200, json!({"acked": 3, "ignored": 0})));

    // Everything is acknowledged: the next stream starts with the next new event.
    drop(stream);
    let (mut stream, subscribed) = s.attach(&query).await;
    assert_eq!(subscribed["acked"], json!(live[0]), "{subscribed}");
    assert_eq!(subscribed["pending"], 0, "{subscribed}");
    let next = s.emit(7..8).await;
    assert_eq!(stream.deliveries(1).await, ones(&next, 1));
    drop(stream);
    s.finish().await;
}

#[tokio::test]
async fn acks_by_post_and_a_reconnect_gets_back_only_the_unacked_embedded() {
    acks_by_post_and_a_reconnect_gets_back_only_the_unacked(Backend::Embedded).await;
}

#[tokio::test]
async fn acks_by_post_and_a_reconnect_gets_back_only_the_unacked_nats() {
    acks_by_post_and_a_reconnect_gets_back_only_the_unacked(Backend::Nats).await;
}

/// Two streams on one durable share its events: each to one of them, none lost, none twice.
async fn two_streams_share_one_durable(backend: Backend) {
    let mut s = setup_on(backend, "").await;
    let query = format!("durable=workers&{CALLS}&max_unacked=2");
    let (mut a, a_sub) = s.attach(&query).await;
    let (mut b, b_sub) = s.attach(&query).await;

    // Four events, none acked: each stream holds two (its max_unacked). An ack `upto` the
    // newest with one stream's session settles that stream's two, not the other's.
    let first = s.emit(1..5).await;
    let mut held = a.deliveries(2).await;
    held.extend(b.deliveries(2).await);
    let mut held_seqs: Vec<u64> = held.iter().map(|(seq, _)| *seq).collect();
    held_seqs.sort_unstable();
    assert_eq!(held_seqs, first, "{held:?}");
    for sub in [&a_sub, &b_sub] {
        let body = json!({"upto": first[3], "session": sub["session"]}).to_string();
        let (status, out) = s.ack(TOKEN, "workers", &body).await;
        assert_eq!((status, out), (200, json!({"acked": 2, "ignored": 0})));
    }

    // Ten more, each acked as it is handled: each to one of them, none twice.
    let seqs = s.emit(5..15).await;
    let mut got = Vec::new();
    let mut per_stream = [0usize; 2];
    while got.len() < seqs.len() {
        let (which, (seq, delivery)) = tokio::select! {
            d = a.delivery() => (0, d),
            d = b.delivery() => (1, d),
        };
        assert_eq!(delivery, 1, "seq {seq}: no redelivery while both ack");
        per_stream[which] += 1;
        got.push(seq);
        let (status, out) = s
            .ack(TOKEN, "workers", &json!({"seqs": [seq]}).to_string())
            .await;
        assert_eq!((status, out), (200, json!({"acked": 1, "ignored": 0})));
    }
    let unique: BTreeSet<u64> = got.iter().copied().collect();
    assert_eq!(got.len(), unique.len(), "an event went twice: {got:?}");
    assert_eq!(
        unique,
        seqs.iter().copied().collect(),
        "every event once ({per_stream:?} per stream)"
    );
    drop((a, b));
    s.finish().await;
}

#[tokio::test]
async fn two_streams_share_one_durable_embedded() {
    two_streams_share_one_durable(Backend::Embedded).await;
}

#[tokio::test]
async fn two_streams_share_one_durable_nats() {
    two_streams_share_one_durable(Backend::Nats).await;
}

/// Deleting the durable ends its stream with a final `event: error`.
#[tokio::test]
async fn a_deleted_durable_ends_its_stream() {
    let s = setup("").await;
    let (mut stream, _) = s.attach(&format!("durable=gone&{CALLS}")).await;
    s.bridge
        .hub()
        .durables
        .delete(&DurableKey {
            consumer: "billing".into(),
            name: "gone".into(),
        })
        .await
        .expect("delete");
    let last = stream.next().await;
    assert_eq!(last.event, "error", "{last:?}");
    assert!(last.data.starts_with("unknown_durable"), "{last:?}");
    let (status, out) = s.ack(TOKEN, "gone", r#"{"seqs": [1]}"#).await;
    assert_eq!(status, 404, "{out}");
    s.bridge.shutdown().await;
}

/// The ack endpoint's refusals: wrong token 401, another consumer's or an unknown durable
/// 404, a bad body 400; `?token=` is accepted as on `/v1/events`.
#[tokio::test]
async fn ack_refusals() {
    let s = setup("").await;
    let (_stream, _) = s.attach(&format!("durable=mine&{CALLS}")).await;
    let (status, out) = s.ack("not-a-known-token", "mine", r#"{"seqs":[1]}"#).await;
    assert_eq!(
        (status, &out["code"]),
        (401, &json!("unauthorized")),
        "{out}"
    );
    let (status, out) = s.ack(TOKEN, "nope", r#"{"seqs":[1]}"#).await;
    assert_eq!(
        (status, &out["code"]),
        (404, &json!("unknown_durable")),
        "{out}"
    );
    // A durable belongs to the consumer that created it.
    let (status, out) = s.ack(OTHER_TOKEN, "mine", r#"{"seqs":[1]}"#).await;
    assert_eq!(
        (status, &out["code"]),
        (404, &json!("unknown_durable")),
        "{out}"
    );
    for body in [
        "",
        "not json",
        "{}",
        r#"{"seqs":[1],"upto":2}"#,
        r#"{"upto":2}"#,
        r#"{"seqs":[1],"session":"s1"}"#,
        r#"{"seqs":[-1]}"#,
        r#"{"upto":1,"more":true}"#,
    ] {
        let (status, out) = s.ack(TOKEN, "mine", body).await;
        assert_eq!(
            (status, &out["code"]),
            (400, &json!("bad_request")),
            "{body:?}: {out}"
        );
    }
    let resp = http_client()
        .post(s.url(&format!("/v1/durables/mine/ack?token={TOKEN}")))
        .body(r#"{"seqs":[]}"#)
        .send()
        .await
        .expect("ack with ?token=");
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        serde_json::from_str::<Value>(&resp.text().await.expect("body")).expect("JSON"),
        json!({"acked": 0, "ignored": 0})
    );
    s.bridge.shutdown().await;
}

/// Refused durable subscribes: JSON with the `/v1/ws` code and a status that says what to do.
#[tokio::test]
async fn durable_stream_refusals() {
    let s = setup("[limits]\nmax_durables = 1\nmax_unacked = 300\n").await;
    let (_stream, _) = s.attach(&format!("durable=one&{CALLS}&ack_wait=5s")).await;
    let cases = [
        // Same name, another filter or ack_wait.
        (
            "durable=one&types=hashi.*".to_string(),
            409,
            "durable_mismatch",
        ),
        (
            format!("durable=one&{CALLS}&ack_wait=6s"),
            409,
            "durable_mismatch",
        ),
        // A second durable over limits.max_durables.
        (format!("durable=two&{CALLS}"), 429, "too_many_durables"),
        // Bad parameters.
        (format!("durable=a%20b&{CALLS}"), 400, "bad_request"),
        (
            format!("durable=one&{CALLS}&max_unacked=0"),
            400,
            "bad_request",
        ),
        (
            format!("durable=one&{CALLS}&max_unacked=301"),
            400,
            "bad_request",
        ),
        (
            format!("durable=one&{CALLS}&max_unacked=many"),
            400,
            "bad_request",
        ),
        (
            format!("durable=one&{CALLS}&ack_wait=soon"),
            400,
            "bad_request",
        ),
        (
            format!("durable=one&{CALLS}&max_deliver=0"),
            400,
            "bad_request",
        ),
        (format!("durable=one&{CALLS}&from=0"), 400, "bad_request"),
        ("durable=three&types=a.**.b".to_string(), 400, "bad_pattern"),
    ];
    for (query, status, code) in cases {
        match s.open(TOKEN, &query, None).await {
            Ok(_) => panic!("{query}: accepted"),
            Err((got, body)) => {
                assert_eq!(
                    (got, &body["code"]),
                    (status, &json!(code)),
                    "{query}: {body}"
                );
                assert!(body["message"].is_string(), "{body}");
            }
        }
    }
    // The name is free for another consumer (durables belong to their consumer).
    let other = s.open(OTHER_TOKEN, "durable=one&types=hashi.*", None).await;
    assert!(other.is_ok(), "another consumer's durable of the same name");
    s.bridge.shutdown().await;
}
