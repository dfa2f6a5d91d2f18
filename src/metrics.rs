//! `GET /metrics`: Prometheus text format, rendered with `prometheus-client`.
//!
//! Every metric name lives in this one file, so dashboards and alerts have one place to look.
//! The components keep their own lock-free counters (they need them for the status API
//! anyway); a scrape reads them into a fresh registry, so the hot paths pay nothing extra and
//! several bridges in one process (the tests) never share a global recorder. The one
//! distribution, webhook attempt latency, is a persistent histogram family owned by the
//! delivery engine.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::status::StatusState;
use crate::upstream::UpstreamState;

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn counter_family(registry: &mut Registry, name: &str, help: &str, values: Vec<(Labels, u64)>) {
    let family = Family::<Labels, Counter>::default();
    for (l, v) in values {
        family.get_or_create(&l).inc_by(v);
    }
    registry.register(name, help, family);
}

fn gauge_family(registry: &mut Registry, name: &str, help: &str, values: Vec<(Labels, i64)>) {
    let family = Family::<Labels, Gauge>::default();
    for (l, v) in values {
        family.get_or_create(&l).set(v);
    }
    registry.register(name, help, family);
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let g = Gauge::<i64>::default();
    g.set(value);
    registry.register(name, help, g);
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(value);
    registry.register(name, help, c);
}

const STATES: [UpstreamState; 8] = [
    UpstreamState::Connecting,
    UpstreamState::Connected,
    UpstreamState::Subscribed,
    UpstreamState::Backoff,
    UpstreamState::AuthFailed,
    UpstreamState::Draining,
    UpstreamState::Stopped,
    UpstreamState::Standby,
];

/// Renders every metric (names carry the `wsbridge_` prefix; counters gain `_total`).
pub async fn render(state: &StatusState) -> String {
    let mut r = Registry::with_prefix("wsbridge");
    let now_ms = chrono::Utc::now().timestamp_millis();

    // Upstreams.
    let upstreams = state
        .upstreams
        .read()
        .map(|u| u.clone())
        .unwrap_or_default();
    let mut up_state = Vec::new();
    let (mut frames, mut events, mut decode, mut reconnects, mut age, mut drain_timeouts) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for u in &upstreams {
        let name = u.name();
        let status = u.status();
        for s in STATES {
            up_state.push((
                labels(&[("upstream", name), ("state", s.as_str())]),
                i64::from(status.state == s),
            ));
        }
        let c = u.counters();
        frames.push((labels(&[("upstream", name)]), c.frames));
        decode.push((labels(&[("upstream", name)]), c.decode_errors));
        reconnects.push((labels(&[("upstream", name)]), c.reconnects));
        drain_timeouts.push((labels(&[("upstream", name)]), c.drain_timeouts));
        for (t, n) in u.events_by_type() {
            events.push((labels(&[("upstream", name), ("type", &t)]), n));
        }
        let last = u.last_event_unix_ms();
        if last > 0 {
            age.push((
                labels(&[("upstream", name)]),
                ((now_ms - last).max(0) / 1000),
            ));
        }
    }
    gauge_family(
        &mut r,
        "upstream_state",
        "1 for the upstream's current state, 0 for the others",
        up_state,
    );
    counter_family(
        &mut r,
        "upstream_frames",
        "Inbound data frames per upstream",
        frames,
    );
    counter_family(
        &mut r,
        "upstream_events",
        "Events decoded per upstream and type",
        events,
    );
    counter_family(
        &mut r,
        "upstream_decode_errors",
        "Frames that could not be decoded (skipped)",
        decode,
    );
    counter_family(
        &mut r,
        "upstream_reconnects",
        "Connection attempts after the first",
        reconnects,
    );
    counter_family(
        &mut r,
        "upstream_drain_timeouts",
        "Upstream closes not answered by the provider within server.shutdown_grace (what it sent after that was not read)",
        drain_timeouts,
    );
    gauge_family(
        &mut r,
        "upstream_last_event_age_seconds",
        "Seconds since the upstream's last event",
        age,
    );

    // Journal.
    let ingest = state.ingest.snapshot();
    counter(
        &mut r,
        "journal_appends",
        "Events journalled",
        ingest.published,
    );
    counter(
        &mut r,
        "journal_duplicates",
        "Events dropped because their id was already journalled",
        ingest.duplicates,
    );
    counter(
        &mut r,
        "journal_rejected",
        "Events dropped because the store can never accept them (larger than NATS max_payload)",
        ingest.rejected,
    );
    let available = state.store.unavailable().is_none();
    if let Some(connected) = state.store.connected() {
        gauge(
            &mut r,
            "store_connected",
            "1 while the store's server connection (NATS) is up",
            i64::from(connected),
        );
    }
    gauge(
        &mut r,
        "store_available",
        "1 while the store takes writes (0 during a NATS outage: ingest is held back)",
        i64::from(available),
    );
    let position = match available {
        true => state.store.position().await.ok(),
        false => None,
    };
    if let Some(pos) = position {
        gauge(
            &mut r,
            "journal_head_seq",
            "Newest journalled seq",
            i64::try_from(pos.head).unwrap_or(i64::MAX),
        );
    }
    if let Some(bytes) = state.store.size_bytes() {
        gauge(
            &mut r,
            "journal_size_bytes",
            "Bytes of the journal on disk (database and its log)",
            i64::try_from(bytes).unwrap_or(i64::MAX),
        );
    }

    // Webhooks.
    let (mut attempts, mut pending, mut dead, mut in_flight, mut enabled) =
        (vec![], vec![], vec![], vec![], vec![]);
    for v in state.delivery.views() {
        let n = v.name.as_str();
        attempts.push((
            labels(&[("webhook", n), ("outcome", "delivered")]),
            v.counters.delivered,
        ));
        attempts.push((
            labels(&[("webhook", n), ("outcome", "failed")]),
            v.counters.failed_attempts,
        ));
        let counts = match available {
            true => state.store.counts(n).await.unwrap_or_default(),
            false => Default::default(),
        };
        pending.push((
            labels(&[("webhook", n)]),
            i64::try_from(counts.pending).unwrap_or(i64::MAX),
        ));
        dead.push((
            labels(&[("webhook", n)]),
            i64::try_from(counts.dead).unwrap_or(i64::MAX),
        ));
        in_flight.push((
            labels(&[("webhook", n)]),
            i64::try_from(v.counters.in_flight).unwrap_or(i64::MAX),
        ));
        enabled.push((labels(&[("webhook", n)]), i64::from(v.enabled)));
    }
    counter_family(
        &mut r,
        "webhook_attempts",
        "Delivery attempts by outcome (a failed attempt is retried or dead-lettered)",
        attempts,
    );
    gauge_family(
        &mut r,
        "webhook_queue_depth",
        "Deliveries pending (including in flight)",
        pending,
    );
    gauge_family(
        &mut r,
        "webhook_dead_letters",
        "Deliveries in the dead-letter list",
        dead,
    );
    gauge_family(
        &mut r,
        "webhook_in_flight",
        "Attempts running now",
        in_flight,
    );
    gauge_family(
        &mut r,
        "webhook_enabled",
        "0 while disabled by a 410",
        enabled,
    );
    r.register(
        "webhook_attempt_duration_seconds",
        "Duration of delivery attempts",
        state.delivery.latency().clone(),
    );

    // Consumers.
    let hub = state.hub.counters();
    gauge(
        &mut r,
        "consumers_connected",
        "Consumers connected (WebSocket and SSE)",
        i64::try_from(hub.connected).unwrap_or(i64::MAX),
    );
    counter(
        &mut r,
        "consumer_frames_sent",
        "Event frames sent to consumers",
        hub.frames_sent,
    );
    counter(
        &mut r,
        "consumer_slow_disconnects",
        "Consumers closed for being too slow",
        hub.slow_disconnects,
    );

    let mut out = String::new();
    if encode(&mut out, &r).is_err() {
        out.clear();
    }
    out
}

/// The `/metrics` handler.
pub async fn handler(State(state): State<Arc<StatusState>>) -> impl IntoResponse {
    (
        [(
            CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        render(&state).await,
    )
}
