//! `GET /metrics`: rendered with `prometheus-client` (OpenMetrics), served as OpenMetrics to
//! scrapers that ask for it and as the Prometheus text format to everyone else, both clean
//! under `promtool check metrics` (every family has HELP text).
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
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::AppState;
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

const STATES: [UpstreamState; 9] = [
    UpstreamState::Connecting,
    UpstreamState::Connected,
    UpstreamState::Subscribed,
    UpstreamState::Backoff,
    UpstreamState::AuthFailed,
    UpstreamState::Draining,
    UpstreamState::Stopped,
    UpstreamState::Standby,
    UpstreamState::Failed,
];

/// Renders every metric (names carry the `wsbridge_` prefix; counters gain `_total`).
pub async fn render(state: &AppState) -> String {
    let mut r = Registry::with_prefix("wsbridge");
    let now_ms = chrono::Utc::now().timestamp_millis();

    // Upstreams.
    let upstreams = state.upstreams.snapshot();
    let mut up_state = Vec::new();
    // Supervised tasks (upstream supervisors, webhook dispatchers): restarts, and 1 while dead.
    let (mut task_restarts, mut task_failed) = (vec![], vec![]);
    let (mut frames, mut events, mut decode, mut reconnects, mut age, mut drain_timeouts) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut too_large, mut untracked, mut inflate_refused, mut ack_timeouts, mut gaps) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (mut replies, mut replies_dropped, mut prepare_failures) = (vec![], vec![], vec![]);
    let mut up_failures = vec![];
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
        let task = labels(&[("task", "upstream"), ("name", name)]);
        task_failed.push((
            task.clone(),
            i64::from(status.state == UpstreamState::Failed),
        ));
        task_restarts.push((task, c.task_restarts));
        frames.push((labels(&[("upstream", name)]), c.frames));
        decode.push((labels(&[("upstream", name)]), c.decode_errors));
        too_large.push((labels(&[("upstream", name)]), c.frames_too_large));
        reconnects.push((labels(&[("upstream", name)]), c.reconnects));
        drain_timeouts.push((labels(&[("upstream", name)]), c.drain_timeouts));
        for (reason, n) in u.failures_by_reason() {
            up_failures.push((
                labels(&[("upstream", name), ("reason", reason.as_str())]),
                n,
            ));
        }
        untracked.push((labels(&[("upstream", name)]), c.untracked));
        inflate_refused.push((labels(&[("upstream", name)]), c.inflate_refused));
        ack_timeouts.push((labels(&[("upstream", name)]), c.ack_timeouts));
        gaps.push((labels(&[("upstream", name)]), c.gaps));
        replies.push((labels(&[("upstream", name)]), c.replies));
        replies_dropped.push((labels(&[("upstream", name)]), c.replies_dropped));
        prepare_failures.push((labels(&[("upstream", name)]), c.prepare_failures));
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
        "Frames that could not be decoded, or nest deeper than limits.max_depth (skipped, connection kept)",
        decode,
    );
    counter_family(
        &mut r,
        "upstream_frames_too_large",
        "Frames over the upstream read limit (twice limits.max_event_bytes plus 64 KiB); each ended its connection, which was reopened",
        too_large,
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
    counter_family(
        &mut r,
        "upstream_failures",
        "Upstream connections that failed or ended, by reason (dns, refused, connect, timeout, tls_unknown_issuer, tls_name_mismatch, tls_expired, tls_not_yet_valid, tls_client_cert, tls_other, http_status, auth, closed, stale, transport, protocol, other)",
        up_failures,
    );
    counter_family(
        &mut r,
        "upstream_untracked",
        "Frames forgotten before storage.dedup_window ended because a connection remembered limits.tracked_frames others (a repeat within the window is taken for a copy)",
        untracked,
    );
    counter_family(
        &mut r,
        "upstream_inflate_refused",
        "Compressed binary frames refused because they inflate past the upstream read limit (a likely decompression bomb; skipped, connection kept)",
        inflate_refused,
    );
    counter_family(
        &mut r,
        "upstream_subscribe_ack_timeouts",
        "Connections retried because a subscription was not acknowledged within the dialect's [subscribe] ack_timeout",
        ack_timeouts,
    );
    counter_family(
        &mut r,
        "upstream_gaps",
        "Jumps in a provider's sequence numbers (the dialect's sequence rule): events the provider skipped",
        gaps,
    );
    counter_family(
        &mut r,
        "upstream_replies",
        "Reply frames (the dialect's reply) sent to the provider after their event was journalled",
        replies,
    );
    counter_family(
        &mut r,
        "upstream_replies_dropped",
        "Reply frames dropped because their connection was gone (the provider redelivers; the journal deduplicates)",
        replies_dropped,
    );
    counter_family(
        &mut r,
        "upstream_prepare_failures",
        "[prepare] refresh calls that failed while connected (the connection and the last answer were kept)",
        prepare_failures,
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
        "Events dropped because the store refused them for good (over NATS max_payload or the stream's max_msg_size, or a write only that event fails), so later events are not held back",
        ingest.rejected,
    );
    counter(
        &mut r,
        "events_too_large",
        "Events refused at ingest because their envelope is larger than limits.max_event_bytes (not journalled)",
        ingest.too_large,
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
        "1 while the store takes writes (0 while journal writes fail and are retried: ingest is held back, /readyz is 503)",
        i64::from(available),
    );
    if let Some(failures) = state.store.write_failures() {
        counter(
            &mut r,
            "store_write_failures",
            "Journal writes that failed for the store's own reason (disk, file, NATS outage) and were retried with backoff",
            failures,
        );
    }
    let position = match available {
        true => state.store.position().await.ok(),
        false => None,
    };
    if let Some(pos) = &position {
        gauge(
            &mut r,
            "journal_head_seq",
            "Newest journalled seq",
            i64::try_from(pos.head).unwrap_or(i64::MAX),
        );
    }
    // On a shared store, what other instances did since (a failed read keeps the last view).
    if available {
        let _ = state.hub.durables.refresh().await;
    }
    durable_metrics(&mut r, state, position.as_ref().map(|p| p.head));
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
    let mut attempt_failures = vec![];
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
        for (reason, count) in &v.failures_by_reason {
            attempt_failures.push((
                labels(&[("webhook", n), ("reason", reason.as_str())]),
                *count,
            ));
        }
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
        let task = labels(&[("task", "webhook"), ("name", n)]);
        task_failed.push((task.clone(), i64::from(v.dispatcher_error.is_some())));
        task_restarts.push((task, v.counters.dispatcher_restarts));
    }
    counter_family(
        &mut r,
        "webhook_attempts",
        "Delivery attempts by outcome (a failed attempt is retried or dead-lettered)",
        attempts,
    );
    counter_family(
        &mut r,
        "webhook_attempt_failures",
        "Failed delivery attempts by reason (dns, refused, connect, timeout, tls_unknown_issuer, tls_name_mismatch, tls_expired, tls_not_yet_valid, tls_client_cert, tls_other, http_status, ssrf, transport, other)",
        attempt_failures,
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
        "Consumers closed for being too slow (live lag, or a replay they did not read)",
        hub.slow_disconnects,
    );
    counter(
        &mut r,
        "journal_unreadable_events",
        "Journalled events a consumer feed could not read back; each was reported to its consumer as unreadable_event, never skipped silently",
        hub.unreadable_events,
    );

    counter_family(
        &mut r,
        "task_restarts",
        "Restarts of a supervised task (task=upstream supervisor or webhook dispatcher) after it panicked or ended unexpectedly",
        task_restarts,
    );
    gauge_family(
        &mut r,
        "task_failed",
        "1 while a supervised task is dead and waiting to be restarted",
        task_failed,
    );

    // Inbound HTTP connections (src/http/server.rs).
    let http = state.http.snapshot();
    gauge(
        &mut r,
        "http_connections_open",
        "Inbound HTTP connections open, upgraded /v1/ws sessions included",
        i64::try_from(http.open).unwrap_or(i64::MAX),
    );
    gauge(
        &mut r,
        "http_connections_max",
        "The inbound connection cap in force (limits.max_connections, or derived from the open-file limit)",
        i64::try_from(http.max_connections).unwrap_or(i64::MAX),
    );
    counter(
        &mut r,
        "http_connections_accepted",
        "Inbound HTTP connections accepted and served",
        http.accepted,
    );
    counter(
        &mut r,
        "http_connections_refused",
        "Inbound HTTP connections answered 503 and closed because limits.max_connections were open",
        http.refused,
    );
    counter_family(
        &mut r,
        "http_timeouts",
        "Inbound HTTP connections closed by the server: kind=header (no complete request head within limits.header_timeout) or kind=idle (keep-alive without a request for limits.idle_timeout)",
        vec![
            (labels(&[("kind", "header")]), http.header_timeouts),
            (labels(&[("kind", "idle")]), http.idle_timeouts),
        ],
    );
    counter(
        &mut r,
        "http_accept_errors",
        "Failures to accept an inbound connection (such as EMFILE, out of file descriptors); each is followed by a short back-off",
        http.accept_errors,
    );
    counter(
        &mut r,
        "http_tls_handshake_failures",
        "Inbound connections closed because their TLS handshake failed (server.tls_cert set)",
        http.tls_handshake_failures,
    );
    counter_family(
        &mut r,
        "consumer_connections_refused",
        "Consumer connections refused by a limit (token_limit: limits.max_connections_per_token)",
        vec![(
            labels(&[("reason", "token_limit")]),
            hub.refused_token_limit,
        )],
    );
    gauge(
        &mut r,
        "consumer_replay_bytes",
        "Bytes of replayed events read from the journal and not yet written to consumers",
        i64::try_from(hub.replay_bytes).unwrap_or(i64::MAX),
    );
    counter(
        &mut r,
        "consumer_replay_budget_waits",
        "Times a replay waited for room in limits.replay_memory_per_connection or replay_memory_total",
        hub.replay_budget_waits,
    );

    let mut out = String::new();
    if encode(&mut out, &r).is_err() {
        out.clear();
    }
    out
}

/// Durable subscriptions: per durable its lag, pending and redeliveries (when the journal's
/// head is known), and the bridge-wide ack and expiry counters.
fn durable_metrics(r: &mut Registry, state: &AppState, head: Option<u64>) {
    let durables = &state.hub.durables;
    let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    if let Some(head) = head {
        let list = durables.list(head);
        let key = |d: &crate::downstream::durable::DurableInfo| {
            labels(&[("consumer", &d.consumer), ("durable", &d.name)])
        };
        gauge_family(
            r,
            "durable_lag",
            "Journal head less the durable's acked floor (events it is behind)",
            list.iter().map(|d| (key(d), i(d.lag))).collect(),
        );
        gauge_family(
            r,
            "durable_pending",
            "Events after the durable's floor not acknowledged yet (unread journal events counted as pending)",
            list.iter().map(|d| (key(d), i(d.pending))).collect(),
        );
        gauge_family(
            r,
            "durable_connections",
            "Connections attached to the durable now",
            list.iter()
                .map(|d| (key(d), d.connections as i64))
                .collect(),
        );
        gauge_family(
            r,
            "durable_dead_letters",
            "Dead letters the durable keeps (events not acked after max_deliver deliveries)",
            list.iter().map(|d| (key(d), d.dead as i64)).collect(),
        );
        counter_family(
            r,
            "durable_redeliveries",
            "Events sent again (ack_wait passed, nak, or the holding connection closed) since start",
            list.iter().map(|d| (key(d), d.redeliveries)).collect(),
        );
    }
    counter(
        r,
        "durable_acks_ignored",
        "Acks for seqs that were not outstanding (unknown, already acked, or from before a seek)",
        durables.acks_ignored(),
    );
    counter(
        r,
        "durables_expired",
        "Durables deleted after limits.durable_ttl without activity",
        durables.expired(),
    );
}

/// The Prometheus text format (0.0.4) of an OpenMetrics exposition from [`render`]: a
/// counter family's `# HELP`/`# TYPE` lines carry the sample name (`x_total`), and `# EOF`
/// and `# UNIT` lines go. Served to every scraper that does not ask for OpenMetrics (curl,
/// `promtool check metrics`), whose text parser otherwise finds counters without help text.
pub fn to_prometheus_text(open_metrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len() + 64 * counters.len());
    for line in open_metrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let header = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        if let Some((prefix, rest)) = header {
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            if counters.contains(name) {
                out.push_str(prefix);
                out.push_str(name);
                out.push_str("_total ");
                out.push_str(tail);
                out.push('\n');
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Whether the scraper's `Accept` header asks for OpenMetrics (Prometheus does, curl and
/// promtool do not).
fn wants_open_metrics(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

/// `GET /metrics`.
pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new().route("/metrics", get(handler))
}

/// The `/metrics` handler: OpenMetrics when the scraper asks for it, the Prometheus text
/// format otherwise.
async fn handler(
    State(state): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
) -> impl IntoResponse {
    let text = render(&state).await;
    if wants_open_metrics(&headers) {
        (
            [(
                CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
    } else {
        (
            [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
            to_prometheus_text(&text),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_get_their_sample_name_in_the_prometheus_text_format() {
        let mut r = Registry::with_prefix("wsbridge");
        counter(&mut r, "journal_appends", "Events journalled", 3);
        gauge(&mut r, "journal_head_seq", "Newest journalled seq", 3);
        let mut om = String::new();
        encode(&mut om, &r).expect("encodes");
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert_eq!(
            to_prometheus_text(&om),
            "# HELP wsbridge_journal_appends_total Events journalled.\n\
             # TYPE wsbridge_journal_appends_total counter\n\
             wsbridge_journal_appends_total 3\n\
             # HELP wsbridge_journal_head_seq Newest journalled seq.\n\
             # TYPE wsbridge_journal_head_seq gauge\n\
             wsbridge_journal_head_seq 3\n"
        );
    }
}
