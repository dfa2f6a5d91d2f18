//! OpenTelemetry traces of each event's way through the bridge, exported over OTLP/HTTP
//! (protobuf) when `[telemetry] otlp_endpoint` is set (README, "Tracing").
//!
//! One trace per event: `wsbridge.receive` (from the frame's arrival, `recvtime`, until
//! ingest admits it) → `wsbridge.journal` (the group commit that gave it its `seq`) → one
//! `wsbridge.webhook.attempt` per delivery attempt and one `wsbridge.consumer.send` per
//! `/v1/ws` or SSE frame carrying it. Webhook requests carry the attempt's W3C `traceparent`
//! header, so a receiver's own spans join the trace.
//!
//! Why the ids are derived from the event's identity (`source` and `id`) rather than carried:
//! a delivery is read back from the journal, possibly by another instance or after a restart,
//! and nothing but the envelope travels with it. Hashing the identity gives every stage the
//! same trace id and the ids of the receive and journal spans without touching the journal's
//! format; a redelivery or a replay joins the event's trace. The sampling decision
//! (`sample_ratio`) is a function of the trace id, so every stage agrees on it too.
//!
//! Off (the default), the bridge holds `None` and does nothing per event: no span, no hash,
//! no allocation.

use std::cell::Cell;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, Sampler, SamplingDecision, SdkTracer, SdkTracerProvider,
    ShouldSample,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};

pub use opentelemetry::trace::Span;
pub use opentelemetry_sdk::trace::Span as SdkSpan;

/// Smallest and largest `telemetry.export_timeout`.
const EXPORT_TIMEOUT_BOUNDS: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(60));

/// `[telemetry]`: where traces go, and how many.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// The OTLP/HTTP traces URL (`http://collector:4318/v1/traces`; a URL whose path is `/`
    /// gets `/v1/traces`). Unset: no traces, and no work per event.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// Fraction of events traced, 0.0–1.0; decided per event from its trace id, so all the
    /// spans of one event are kept or dropped together.
    #[serde(default = "one")]
    pub sample_ratio: f64,
    /// How long one export request may take before it is abandoned (spans are dropped, never
    /// retried: tracing must not hold the bridge back).
    #[serde(
        default = "ten_seconds",
        deserialize_with = "crate::values::de_duration"
    )]
    pub export_timeout: Duration,
}

fn one() -> f64 {
    1.0
}

fn ten_seconds() -> Duration {
    Duration::from_secs(10)
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            sample_ratio: one(),
            export_timeout: ten_seconds(),
        }
    }
}

impl TelemetryConfig {
    /// Problems with the section, as (key, reason).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            out.push(("sample_ratio", "must be between 0.0 and 1.0".to_string()));
        }
        let (lo, hi) = EXPORT_TIMEOUT_BOUNDS;
        if self.export_timeout < lo || self.export_timeout > hi {
            out.push((
                "export_timeout",
                "must be between 100ms and 60s".to_string(),
            ));
        }
        if let Some(text) = &self.otlp_endpoint {
            if let Err(reason) = endpoint(text) {
                out.push(("otlp_endpoint", reason));
            }
        }
        out
    }
}

/// `otlp_endpoint` as the URL spans are posted to, or why it cannot be one.
fn endpoint(text: &str) -> Result<url::Url, String> {
    let mut url = url::Url::parse(text).map_err(|e| format!("not a URL: {e}"))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err("must be an http:// or https:// URL".to_string());
    }
    if url.path() == "/" {
        url.set_path("/v1/traces");
    }
    Ok(url)
}

/// The exporter's HTTP client: blocking (the batch exporter's thread waits for each export),
/// with the bridge's one TLS trust policy (the machine's store) for an `https://` collector.
/// Built on a thread of its own: a blocking client must not be made on the runtime.
fn http_client(
    endpoint: &url::Url,
    timeout: Duration,
) -> Result<reqwest::blocking::Client, TracesError> {
    let mut builder = reqwest::blocking::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        // The collector is the operator's, named by URL: no proxy from the environment.
        .no_proxy();
    if endpoint.scheme() == "https" {
        crate::install_crypto_provider();
        let tls = crate::tls::ClientTls::default()
            .client_config("telemetry.otlp_endpoint")
            .map_err(|e| TracesError(e.to_string()))?;
        builder = builder.tls_backend_preconfigured(tls);
    }
    std::thread::Builder::new()
        .name("otlp-client".into())
        .spawn(move || builder.build())
        .map_err(|e| TracesError(format!("cannot start a thread: {e}")))?
        .join()
        .map_err(|_| TracesError("building the HTTP client panicked".into()))?
        .map_err(|e| TracesError(format!("HTTP client: {e}")))
}

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the OTLP trace exporter: {0}")]
pub struct TracesError(String);

/// The ids every stage of one event's trace derives from its identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventTrace {
    /// The event's trace.
    pub trace_id: TraceId,
    /// The `wsbridge.receive` span.
    pub receive: SpanId,
    /// The `wsbridge.journal` span: parent of every attempt and consumer send.
    pub journal: SpanId,
}

impl EventTrace {
    /// The ids of the event `id` from `source` (the bridge's event identity).
    pub fn of(source: &str, id: &str) -> EventTrace {
        let mut h = Sha256::new();
        h.update(b"wsbridge trace\0");
        h.update(source.as_bytes());
        h.update(b"\0");
        h.update(id.as_bytes());
        let d = h.finalize();
        let mut trace = [0u8; 16];
        trace.copy_from_slice(&d[..16]);
        let mut receive = [0u8; 8];
        receive.copy_from_slice(&d[16..24]);
        let mut journal = [0u8; 8];
        journal.copy_from_slice(&d[24..32]);
        // An all-zero id is invalid; one in 2^64 (2^128) digests gives it.
        let nonzero = |b: &mut [u8]| {
            if b.iter().all(|&x| x == 0) {
                b[0] = 1;
            }
        };
        nonzero(&mut trace);
        nonzero(&mut receive);
        nonzero(&mut journal);
        EventTrace {
            trace_id: TraceId::from_bytes(trace),
            receive: SpanId::from_bytes(receive),
            journal: SpanId::from_bytes(journal),
        }
    }

    /// The ids of a serialised envelope (`None`: not an envelope with `source` and `id`).
    pub fn of_json(bytes: &[u8]) -> Option<EventTrace> {
        #[derive(Deserialize)]
        struct Identity<'a> {
            #[serde(borrow)]
            source: std::borrow::Cow<'a, str>,
            #[serde(borrow)]
            id: std::borrow::Cow<'a, str>,
        }
        let identity: Identity = serde_json::from_slice(bytes).ok()?;
        Some(EventTrace::of(&identity.source, &identity.id))
    }
}

thread_local! {
    /// The ids the next span started on this thread must have (see [`Forced`]).
    static FORCED: Cell<Option<(TraceId, SpanId)>> = const { Cell::new(None) };
}

/// Gives a span the ids derived for it: the SDK asks its id generator synchronously while
/// starting a span, on the calling thread, so [`Traces`] sets them just before and clears
/// them just after; any other span gets random ids.
#[derive(Debug)]
struct Forced(RandomIdGenerator);

impl IdGenerator for Forced {
    fn new_trace_id(&self) -> TraceId {
        FORCED
            .with(Cell::get)
            .map(|(t, _)| t)
            .unwrap_or_else(|| self.0.new_trace_id())
    }

    fn new_span_id(&self) -> SpanId {
        FORCED
            .with(Cell::get)
            .map(|(_, s)| s)
            .unwrap_or_else(|| self.0.new_span_id())
    }
}

/// The tracer the bridge's components share (cheap to clone); present only when
/// `otlp_endpoint` is set.
#[derive(Clone, Debug)]
pub struct Traces {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    ratio: Sampler,
}

impl Traces {
    /// Starts the exporter (a background thread batching spans) when `otlp_endpoint` is set.
    pub fn start(config: &TelemetryConfig) -> Result<Option<Traces>, TracesError> {
        let Some(text) = &config.otlp_endpoint else {
            return Ok(None);
        };
        let endpoint = endpoint(text).map_err(TracesError)?;
        let client = http_client(&endpoint, config.export_timeout)?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(endpoint.as_str())
            .with_timeout(config.export_timeout)
            .build()
            .map_err(|e| TracesError(e.to_string()))?;
        let ratio = Sampler::TraceIdRatioBased(config.sample_ratio);
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::ParentBased(Box::new(ratio.clone())))
            .with_id_generator(Forced(RandomIdGenerator::default()))
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name("wsbridge")
                    .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                    .build(),
            )
            .build();
        let tracer = provider.tracer("wsbridge");
        Ok(Some(Traces {
            provider,
            tracer,
            ratio,
        }))
    }

    /// Exports what is buffered and stops the exporter (blocking: call off the runtime).
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "trace exporter did not shut down cleanly");
        }
    }

    fn sampled(&self, trace_id: TraceId) -> bool {
        let r = self
            .ratio
            .should_sample(None, trace_id, "", &SpanKind::Internal, &[], &[]);
        !matches!(r.decision, SamplingDecision::Drop)
    }

    /// A context whose (remote) parent is `span` of `trace`.
    fn parent(&self, trace: &EventTrace, span: SpanId) -> Context {
        let flags = if self.sampled(trace.trace_id) {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        Context::new().with_remote_span_context(SpanContext::new(
            trace.trace_id,
            span,
            flags,
            true,
            TraceState::default(),
        ))
    }

    fn start_forced(
        &self,
        ids: (TraceId, SpanId),
        builder: opentelemetry::trace::SpanBuilder,
        parent: &Context,
    ) -> SdkSpan {
        FORCED.with(|f| f.set(Some(ids)));
        let span = self.tracer.build_with_context(builder, parent);
        FORCED.with(|f| f.set(None));
        span
    }

    /// Records `wsbridge.receive` of an event, from `received` (its `recvtime`) to `until`.
    /// A `duplicate` (a copy of an event already journalled, whose derived ids the original
    /// has) is a child of the original's receive span, with ids of its own.
    pub fn received(
        &self,
        trace: &EventTrace,
        received: Option<SystemTime>,
        until: SystemTime,
        attributes: Vec<KeyValue>,
        duplicate: bool,
    ) {
        let builder = self.receive_builder(received, attributes);
        let mut span = if duplicate {
            self.tracer
                .build_with_context(builder, &self.parent(trace, trace.receive))
        } else {
            self.start_forced((trace.trace_id, trace.receive), builder, &Context::new())
        };
        span.end_with_timestamp(until);
    }

    fn receive_builder(
        &self,
        received: Option<SystemTime>,
        attributes: Vec<KeyValue>,
    ) -> opentelemetry::trace::SpanBuilder {
        let mut builder = self
            .tracer
            .span_builder("wsbridge.receive")
            .with_kind(SpanKind::Consumer)
            .with_attributes(attributes);
        if let Some(at) = received {
            builder = builder.with_start_time(at);
        }
        builder
    }

    /// Records `wsbridge.journal` of an event, from `started` until now.
    pub fn journalled(&self, trace: &EventTrace, started: SystemTime, attributes: Vec<KeyValue>) {
        let builder = self
            .tracer
            .span_builder("wsbridge.journal")
            .with_kind(SpanKind::Internal)
            .with_start_time(started)
            .with_attributes(attributes);
        let parent = self.parent(trace, trace.receive);
        let mut span = self.start_forced((trace.trace_id, trace.journal), builder, &parent);
        span.end();
    }

    /// Starts a span of a later stage (`wsbridge.webhook.attempt`, `wsbridge.consumer.send`),
    /// a child of the event's journal span; it ends when dropped or `end`ed.
    pub fn stage(
        &self,
        trace: &EventTrace,
        name: &'static str,
        kind: SpanKind,
        attributes: Vec<KeyValue>,
    ) -> SdkSpan {
        let builder = self
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes);
        self.tracer
            .build_with_context(builder, &self.parent(trace, trace.journal))
    }
}

/// The W3C `traceparent` header value naming `span` (version 00).
pub fn traceparent(span: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        span.trace_id(),
        span.span_id(),
        span.trace_flags().to_u8()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_a_function_of_the_identity() {
        let a = EventTrace::of("vp-main", "e1");
        assert_eq!(a, EventTrace::of("vp-main", "e1"));
        assert_ne!(a.trace_id, EventTrace::of("vp-main", "e2").trace_id);
        // The separator keeps ("a", "bc") and ("ab", "c") apart.
        assert_ne!(EventTrace::of("a", "bc"), EventTrace::of("ab", "c"));
        assert_ne!(a.receive, a.journal);
        let json = br#"{"specversion":"1.0","id":"e1","source":"vp-main","x":[1,2]}"#;
        assert_eq!(EventTrace::of_json(json), Some(a));
        assert_eq!(EventTrace::of_json(b"[1]"), None);
    }

    #[test]
    fn traceparent_is_w3c() {
        let sc = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        assert_eq!(
            traceparent(&sc),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
    }

    #[test]
    fn bad_values_are_named() {
        let c = TelemetryConfig {
            sample_ratio: 1.5,
            export_timeout: Duration::from_secs(600),
            otlp_endpoint: Some("ftp://x/".to_string()),
        };
        let keys: Vec<_> = c.problems().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["sample_ratio", "export_timeout", "otlp_endpoint"]);
        assert!(TelemetryConfig::default().problems().is_empty());
    }
}
