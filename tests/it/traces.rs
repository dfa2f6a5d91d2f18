//! OpenTelemetry traces (`[telemetry] otlp_endpoint`): one event's spans, exported over
//! OTLP/HTTP (protobuf) to a real HTTP receiver on 127.0.0.1 and decoded here with the OTLP
//! protobuf definitions, form the chain receive → journal → webhook attempt and consumer
//! send; the webhook request carries the attempt's `traceparent`.

use std::collections::HashMap;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message as _;
use serde_json::{json, Value};
use wsbridge::traces::EventTrace;
use wsbridge_adapters::{voipbin, Provider};

use crate::common::receiver::{Answer, Received, Receiver};
use crate::common::ws::{recv, subscribe_from};
use crate::common::*;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const TOKEN: &str = "trace-consumer-token";

/// One exported span, as the collector saw it.
#[derive(Clone, Debug)]
struct SeenSpan {
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attributes: HashMap<String, String>,
}

/// Every span in the OTLP requests `collector` received.
fn spans(collector: &[Received]) -> Vec<SeenSpan> {
    let mut out = Vec::new();
    for r in collector {
        assert_eq!(r.header("content-type"), "application/x-protobuf");
        let request = ExportTraceServiceRequest::decode(r.body.as_ref()).unwrap_or_else(|e| {
            panic!("an OTLP request that is not ExportTraceServiceRequest: {e}")
        });
        for resource in request.resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .map(|v| format!("{:?}", v.value));
            assert!(
                service.as_deref().is_some_and(|s| s.contains("wsbridge")),
                "service.name is wsbridge: {service:?}"
            );
            for scope in resource.scope_spans {
                for s in scope.spans {
                    out.push(SeenSpan {
                        name: s.name,
                        trace_id: hex::encode(&s.trace_id),
                        span_id: hex::encode(&s.span_id),
                        parent: hex::encode(&s.parent_span_id),
                        attributes: s
                            .attributes
                            .into_iter()
                            .map(|a| {
                                let v = a.value.and_then(|v| v.value).map(|v| {
                                    use opentelemetry_proto::tonic::common::v1::any_value::Value as V;
                                    match v {
                                        V::StringValue(s) => s,
                                        V::IntValue(i) => i.to_string(),
                                        other => format!("{other:?}"),
                                    }
                                });
                                (a.key, v.unwrap_or_default())
                            })
                            .collect(),
                    });
                }
            }
        }
    }
    out
}

/// The simulator as an upstream, `hook` as webhook `crm` (one retry after 50 ms) getting
/// every VoIPBIN event, a consumer, and `extra`.
fn blocks(vb: &wsbridge_adapters::sim::Simulator, hook: &Receiver, extra: &str) -> Vec<String> {
    vec![
        upstream_block("vb", vb, FAST),
        format!(
            "[[webhooks]]\nname = \"crm\"\nurl = \"{}\"\nsecrets = [\"{SECRET}\"]\nallow_private = true\nretry = [\"50ms\"]\n",
            hook.url()
        ),
        "[[routes]]\nname = \"all\"\nproviders = [\"voipbin\"]\nto = [\"crm\"]\n".to_string(),
        format!("[[consumers]]\nname = \"viewer\"\ntoken = \"{TOKEN}\"\n"),
        extra.to_string(),
    ]
}

#[tokio::test]
async fn one_event_is_one_trace_from_frame_to_webhook_and_consumer() {
    let collector = Receiver::start(vec![], Answer::status(200)).await;
    let hook = Receiver::start(vec![Answer::status(500)], Answer::status(200)).await;
    let vb = start_sim(Provider::Voipbin).await;
    let cfg = config(&blocks(
        &vb,
        &hook,
        &format!(
            "[telemetry]\notlp_endpoint = \"http://{}/v1/traces\"\n",
            collector.addr
        ),
    ));
    assert!(cfg.telemetry.otlp_endpoint.is_some());
    let (bridge, _rx) = start_bridge(&cfg).await;
    wait_sim_ready(&vb, 1).await;
    let mut ws = subscribe_from(&bridge, TOKEN, "live", json!("latest")).await;

    let event = voipbin::wire::event(
        "call.status",
        "2024-01-15T10:30:00.000000Z",
        "customer_id:abc123:call:c1",
        json!({"id": "c1", "status": "answered"}),
    );
    assert_eq!(vb.emit(event).await, 1);
    let frame = recv(&mut ws).await;
    assert_eq!(frame["op"], "event", "{frame}");
    let envelope: &Value = &frame["event"];
    let source = envelope["source"].as_str().expect("source");
    let id = envelope["id"].as_str().expect("id");
    let seq = frame["seq"].as_u64().expect("seq");
    // The first attempt fails (500), the retry is delivered: two attempt spans.
    let requests = hook.wait_for(2, DEADLINE).await;
    // Shutdown exports what the batch exporter still holds.
    let shut = bridge.shutdown().await;
    assert!(shut.journal_complete);

    let expected = EventTrace::of(source, id);
    let trace_id = expected.trace_id.to_string();
    let seen = spans(&collector.requests());
    let of_event: Vec<&SeenSpan> = seen.iter().filter(|s| s.trace_id == trace_id).collect();
    let named = |name: &str| -> Vec<&SeenSpan> {
        of_event
            .iter()
            .copied()
            .filter(|s| s.name == name)
            .collect()
    };
    let receive = named("wsbridge.receive");
    assert_eq!(receive.len(), 1, "one receive span: {seen:#?}");
    let receive = receive[0];
    assert!(
        receive.parent.is_empty(),
        "receive is the root: {receive:?}"
    );
    assert_eq!(receive.attributes["wsbridge.event_id"], id);
    assert_eq!(receive.attributes["wsbridge.source"], source);
    assert_eq!(receive.attributes["wsbridge.provider"], "voipbin");

    let journal = named("wsbridge.journal");
    assert_eq!(journal.len(), 1, "one journal span: {seen:#?}");
    let journal = journal[0];
    assert_eq!(journal.parent, receive.span_id, "journal follows receive");
    assert_eq!(journal.attributes["wsbridge.seq"], seq.to_string());

    let attempts = named("wsbridge.webhook.attempt");
    assert_eq!(attempts.len(), 2, "one span per attempt: {seen:#?}");
    for a in &attempts {
        assert_eq!(
            a.parent, journal.span_id,
            "an attempt is a child of the journal span"
        );
        assert_eq!(a.attributes["wsbridge.webhook"], "crm");
        assert_eq!(a.attributes["wsbridge.seq"], seq.to_string());
    }
    let mut statuses: Vec<&str> = attempts
        .iter()
        .map(|a| a.attributes["http.response.status_code"].as_str())
        .collect();
    statuses.sort();
    assert_eq!(statuses, ["200", "500"]);

    let sends = named("wsbridge.consumer.send");
    assert_eq!(sends.len(), 1, "one consumer send: {seen:#?}");
    assert_eq!(sends[0].parent, journal.span_id);
    assert_eq!(sends[0].attributes["wsbridge.transport"], "ws");

    // Each webhook request names its own attempt's span, in the event's trace.
    for (r, n) in requests.iter().zip(1..) {
        let header = r.header("traceparent");
        let parts: Vec<&str> = header.split('-').collect();
        assert_eq!(parts.len(), 4, "traceparent {header:?}");
        assert_eq!(parts[0], "00");
        assert_eq!(
            parts[1], trace_id,
            "the receiver can join the event's trace"
        );
        assert_eq!(parts[3], "01", "sampled");
        let attempt = attempts
            .iter()
            .find(|a| a.span_id == parts[2])
            .unwrap_or_else(|| panic!("traceparent {header:?} names no attempt span"));
        assert_eq!(attempt.attributes["wsbridge.attempt"], n.to_string());
    }
}

#[tokio::test]
async fn without_telemetry_webhooks_carry_no_traceparent() {
    let hook = Receiver::start(vec![], Answer::status(200)).await;
    let vb = start_sim(Provider::Voipbin).await;
    let cfg = config(&blocks(&vb, &hook, ""));
    assert!(cfg.telemetry.otlp_endpoint.is_none());
    let (bridge, _rx) = start_bridge(&cfg).await;
    wait_sim_ready(&vb, 1).await;
    assert_eq!(vb.emit(numbered_call(1)).await, 1);
    let got = hook.wait_for(1, DEADLINE).await;
    assert!(got[0].headers.get("traceparent").is_none());
    bridge.shutdown().await;
}

/// `sample_ratio = 0.0`: no span of the event is exported, and the webhook's `traceparent`
/// says "not sampled" (flags `00`), so the receiver does not record its part either.
#[tokio::test]
async fn an_unsampled_event_exports_nothing_and_says_so_downstream() {
    let collector = Receiver::start(vec![], Answer::status(200)).await;
    let hook = Receiver::start(vec![], Answer::status(200)).await;
    let vb = start_sim(Provider::Voipbin).await;
    let cfg = config(&blocks(
        &vb,
        &hook,
        &format!(
            "[telemetry]\notlp_endpoint = \"http://{}/\"\nsample_ratio = 0.0\n",
            collector.addr
        ),
    ));
    let (bridge, _rx) = start_bridge(&cfg).await;
    wait_sim_ready(&vb, 1).await;
    assert_eq!(vb.emit(numbered_call(7)).await, 1);
    let got = hook.wait_for(1, DEADLINE).await;
    let envelope: Value = serde_json::from_slice(&got[0].body).expect("envelope");
    let expected = EventTrace::of(
        envelope["source"].as_str().expect("source"),
        envelope["id"].as_str().expect("id"),
    );
    let header = got[0].header("traceparent");
    assert!(
        header.starts_with(&format!("00-{}-", expected.trace_id)) && header.ends_with("-00"),
        "traceparent {header:?}"
    );
    // Shutdown flushes the exporter: whatever it had is at the collector now.
    bridge.shutdown().await;
    let trace_id = expected.trace_id.to_string();
    let exported = spans(&collector.requests());
    assert!(
        exported.iter().all(|s| s.trace_id != trace_id),
        "spans of an unsampled event were exported: {exported:#?}"
    );
}
