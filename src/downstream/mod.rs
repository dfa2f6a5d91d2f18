//! Downstream: the unified WebSocket endpoint (`GET /v1/ws`) and its SSE twin
//! (`GET /v1/events`) through which consumers receive the event stream (the protocol:
//! README, "Consumers: the unified WebSocket endpoint").
//!
//! - [`ConsumerConfig`]: `[[consumers]]`, a token and what that consumer may ever see;
//! - [`subscription`]: the core both protocols share: replay from the journal, then live,
//!   with no gap and no duplicate, and the slow-consumer rule;
//! - [`ws`] and [`sse`]: the two wire protocols, and [`acks`]: `POST
//!   /v1/durables/{name}/ack`, the acknowledgements of durable SSE streams;
//! - [`durable`]: durable subscriptions, the cursors the bridge keeps.
//!
//! Memory is bounded per connection: a live subscription reads shared pointers to events
//! (each serialised once by the journal) from the one shared ring; a consumer more than the
//! ring behind is closed (`4001 slow consumer` on WebSocket) and resumes from its cursor. A
//! replaying subscription's queue is at most [`subscription::QUEUE`] long. WebSocket buffers
//! are sized for small JSON frames. Replays are bounded in bytes
//! per connection and in total ([`budget`]), and one consumer token may hold at most
//! `limits.max_connections_per_token` connections (one more is refused with HTTP 429).

pub mod acks;
pub mod budget;
pub mod durable;
pub mod sse;
pub mod subscription;
pub mod ws;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use wsbridge_adapters::Secret;

use self::budget::{DownstreamLimits, ReplayBudget};
use crate::envelope::Published;
use crate::routing::{Filter, FilterConfig, RouteIssue};
use crate::storage::Store;

/// The consumer name of a session opened with `server.admin_token` (the operator console's
/// live tail): it may see every event.
pub const ADMIN_CONSUMER: &str = "admin";

/// `[[consumers]]`: one consumer identity.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    /// Unique name, shown in `ready` and in logs.
    pub name: String,
    /// The consumer's bearer token (unique; never logged).
    #[serde(deserialize_with = "de_secret")]
    pub token: Secret,
    /// What this consumer may ever see, whatever it subscribes to (empty = everything).
    #[serde(default)]
    pub allow: FilterConfig,
}

fn de_secret<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
    Ok(Secret::new(String::deserialize(d)?))
}

/// A consumer with its `allow` compiled.
#[derive(Debug)]
pub struct Consumer {
    /// The configured name.
    pub name: Arc<str>,
    token: Secret,
    /// The consumer's ceiling: an event outside it is never sent. Shared by its sessions'
    /// subscriptions (not copied per connection).
    pub allow: Arc<Filter>,
    /// Cancelled when a reload removes or changes this consumer: its sessions close.
    revoked: tokio_util::sync::CancellationToken,
    /// Connections (WebSocket and SSE) open with this consumer's token now.
    connections: AtomicUsize,
}

impl Consumer {
    /// Same identity and same ceiling (a reload keeps such a consumer's sessions open).
    fn same_as(&self, other: &Consumer) -> bool {
        self.name == other.name && self.token == other.token && self.allow == other.allow
    }
}

/// Compiles `[[consumers]]`; problems come back as `(key, reason)` with keys relative to the
/// consumers list (`[1].allow.types[0]`).
pub fn compile_consumers(
    configs: &[ConsumerConfig],
) -> Result<Vec<Arc<Consumer>>, Vec<RouteIssue>> {
    let mut issues = Vec::new();
    let mut out = Vec::new();
    for (i, c) in configs.iter().enumerate() {
        if c.token.expose().len() < 8 {
            issues.push(RouteIssue {
                key: format!("[{i}].token"),
                reason: "must be at least 8 characters".into(),
            });
        }
        if configs[..i].iter().any(|o| o.token == c.token) {
            issues.push(RouteIssue {
                key: format!("[{i}].token"),
                reason: "is the same as another consumer's token".into(),
            });
        }
        if configs[..i].iter().any(|o| o.name == c.name) {
            issues.push(RouteIssue {
                key: format!("[{i}].name"),
                reason: format!("{:?} is already used", c.name),
            });
        }
        match Filter::from_config(&c.allow) {
            Ok(allow) => out.push(Arc::new(Consumer {
                name: Arc::from(c.name.as_str()),
                token: c.token.clone(),
                allow: Arc::new(allow),
                revoked: tokio_util::sync::CancellationToken::new(),
                connections: AtomicUsize::new(0),
            })),
            Err(list) => issues.extend(list.into_iter().map(|mut p| {
                p.key = format!("[{i}].allow.{}", p.key);
                p
            })),
        }
    }
    if issues.is_empty() {
        Ok(out)
    } else {
        Err(issues)
    }
}

/// Live counters of the downstream side.
#[derive(Debug, Default)]
pub struct HubStats {
    connected: AtomicU64,
    sessions: AtomicU64,
    frames_sent: AtomicU64,
    slow_disconnects: AtomicU64,
    unreadable_events: AtomicU64,
    refused_token_limit: AtomicU64,
}

/// Plain-number copy of [`HubStats`].
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct HubCounters {
    /// Consumers connected now (WebSocket and SSE).
    pub connected: u64,
    /// Sessions opened since start.
    pub sessions: u64,
    /// Event frames sent since start.
    pub frames_sent: u64,
    /// Consumers closed for being too slow since start (live lag or a stalled replay).
    pub slow_disconnects: u64,
    /// Journalled events a feed could not read back (bytes that are not an envelope), each
    /// reported to its consumer as `unreadable_event` instead of skipped.
    pub unreadable_events: u64,
    /// Connections refused since start because their token had
    /// `limits.max_connections_per_token` open.
    pub refused_token_limit: u64,
    /// Bytes of replayed events held now (read from the journal, not yet written).
    pub replay_bytes: u64,
    /// Times a replay page waited for room in the replay budget since start.
    pub replay_budget_waits: u64,
}

/// What the downstream handlers share: the consumers, the store and the live stream.
pub struct Hub {
    consumers: arc_swap::ArcSwap<Vec<Arc<Consumer>>>,
    store: Arc<dyn Store>,
    publish: broadcast::Sender<Arc<Published>>,
    stats: HubStats,
    /// Cancelled at shutdown: every session closes ("going away") so the server can stop.
    shutdown: tokio_util::sync::CancellationToken,
    /// Largest `/v1/ws` event frame (`limits.max_event_bytes` plus the frame's members): the
    /// socket's write buffer must take one whole, or the event could never be sent.
    max_event_frame: usize,
    /// `[limits]` as they apply downstream.
    limits: DownstreamLimits,
    /// Replay memory of all connections.
    replay: Arc<ReplayBudget>,
    /// Traces (`[telemetry]`): a span per event frame sent; `None`: off.
    traces: Option<crate::traces::Traces>,
    /// `server.admin_token` as a consumer that may see everything, so that the operator
    /// console can tail the stream with the one token it holds; accepted only from the
    /// `Authorization` header, never `?token=` (it must not end up in a URL or a log).
    admin: Option<Arc<Consumer>>,
    /// Durable subscriptions (cursors the bridge keeps, with acks).
    pub durables: Arc<durable::Durables>,
    /// Most seqs one `POST /v1/durables/{name}/ack` may name: `limits.max_unacked`, what one
    /// connection may hold, so one request can always ack all a stream holds while a body
    /// cannot make the bridge walk an unbounded list.
    max_ack_seqs: usize,
    /// The open durable SSE streams, so that an ack `upto` a seq settles only what its own
    /// stream holds.
    sse_durable: sse::DurableStreams,
}

impl Hub {
    /// A hub over `store` and the live `publish` stream, within `limits`; `leases` (a shared
    /// store's) let one instance at a time serve each durable subscription.
    // Each argument is one part of the running bridge, passed once at start.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        consumers: Vec<Arc<Consumer>>,
        store: Arc<dyn Store>,
        publish: broadcast::Sender<Arc<Published>>,
        shutdown: tokio_util::sync::CancellationToken,
        limits: &crate::config::LimitsConfig,
        traces: Option<crate::traces::Traces>,
        admin_token: Option<Secret>,
        leases: Option<Arc<crate::storage::nats::lease::Leases>>,
    ) -> Arc<Hub> {
        let downstream_limits = DownstreamLimits::from_config(limits);
        let admin = admin_token.map(|token| {
            Arc::new(Consumer {
                name: Arc::from(ADMIN_CONSUMER),
                token,
                allow: Arc::new(Filter::default()),
                revoked: tokio_util::sync::CancellationToken::new(),
                connections: AtomicUsize::new(0),
            })
        });
        Arc::new(Hub {
            consumers: arc_swap::ArcSwap::from_pointee(consumers),
            durables: durable::Durables::new(
                store.clone(),
                leases,
                durable::DurableLimits::from_config(limits),
            ),
            store,
            publish,
            stats: HubStats::default(),
            shutdown,
            max_event_frame: limits.max_downstream_frame_bytes(),
            replay: ReplayBudget::new(&downstream_limits),
            limits: downstream_limits,
            traces,
            admin,
            max_ack_seqs: limits.max_unacked,
            sse_durable: sse::DurableStreams::default(),
        })
    }

    /// With traces on, a `wsbridge.consumer.send` span for the event `text` (journal position
    /// `seq`) being written to a consumer over `transport` (`ws`, `sse`); it ends when
    /// dropped, once the frame is written. Off: `None`, and nothing is done.
    pub(crate) fn trace_send(
        &self,
        transport: &'static str,
        seq: u64,
        text: &str,
    ) -> Option<Box<crate::traces::SdkSpan>> {
        let traces = self.traces.as_ref()?;
        let ids = crate::traces::EventTrace::of_json(text.as_bytes())?;
        // Boxed: the span is held across the socket write, so it is part of every
        // connection task's state; unboxed it cost ~400 bytes per consumer with telemetry off.
        Some(Box::new(traces.stage(
            &ids,
            "wsbridge.consumer.send",
            opentelemetry::trace::SpanKind::Producer,
            vec![
                opentelemetry::KeyValue::new("wsbridge.transport", transport),
                opentelemetry::KeyValue::new(
                    "wsbridge.seq",
                    i64::try_from(seq).unwrap_or(i64::MAX),
                ),
            ],
        )))
    }

    /// A place for one more connection of `consumer`, or `None` (counted) when its token
    /// already holds `limits.max_connections_per_token`: one consumer cannot take every
    /// socket and replay of the bridge.
    pub fn admit(&self, consumer: &Arc<Consumer>) -> Option<ConnectionSlot> {
        let max = self.limits.max_connections_per_token;
        let admitted = consumer
            .connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        if admitted {
            Some(ConnectionSlot {
                consumer: consumer.clone(),
            })
        } else {
            self.stats
                .refused_token_limit
                .fetch_add(1, Ordering::Relaxed);
            // Debug only: a client retrying in a loop must not flood the log (the refusals are
            // counted in `wsbridge_consumer_connections_refused_total`).
            tracing::debug!(consumer = %consumer.name, max, "connection refused: the consumer's token is at limits.max_connections_per_token");
            None
        }
    }

    /// The refusal of a connection over the per-token cap (HTTP 429).
    pub fn too_many_connections(&self) -> axum::response::Response {
        use axum::response::IntoResponse;
        (
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            format!(
                "this consumer token already has {} connections open (limits.max_connections_per_token)\n",
                self.limits.max_connections_per_token
            ),
        )
            .into_response()
    }

    /// The consumer presenting `Authorization: Bearer <token>` or `?token=<token>`, if any.
    /// Tokens are compared in constant time.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
    ) -> Option<Arc<Consumer>> {
        let header = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let presented = header.or(query_token)?;
        let consumer = self
            .consumers
            .load()
            .iter()
            .find(|c| c.token.matches(presented))
            .cloned();
        consumer.or_else(|| {
            let admin = self.admin.as_ref()?;
            (header.is_some() && admin.token.matches(presented)).then(|| admin.clone())
        })
    }

    /// Replaces the consumer list (hot reload). Consumers that are unchanged keep their
    /// sessions; sessions of removed or changed consumers are closed (their token or ceiling
    /// no longer holds). Returns a line per change.
    pub fn set_consumers(&self, new: Vec<Arc<Consumer>>) -> Vec<String> {
        let old = self.consumers.load_full();
        let mut changes = Vec::new();
        let merged: Vec<Arc<Consumer>> = new
            .into_iter()
            .map(|c| match old.iter().find(|o| o.same_as(&c)) {
                Some(kept) => kept.clone(),
                None => {
                    changes.push(format!("consumer {}: added or changed", c.name));
                    c
                }
            })
            .collect();
        for o in old.iter() {
            if !merged.iter().any(|c| Arc::ptr_eq(c, o)) {
                changes.push(format!(
                    "consumer {}: sessions closed (removed or changed)",
                    o.name
                ));
                o.revoked.cancel();
            }
        }
        self.consumers.store(Arc::new(merged));
        changes
    }

    /// Counters for metrics and status.
    pub fn counters(&self) -> HubCounters {
        HubCounters {
            connected: self.stats.connected.load(Ordering::Relaxed),
            sessions: self.stats.sessions.load(Ordering::Relaxed),
            frames_sent: self.stats.frames_sent.load(Ordering::Relaxed),
            slow_disconnects: self.stats.slow_disconnects.load(Ordering::Relaxed),
            unreadable_events: self.stats.unreadable_events.load(Ordering::Relaxed),
            refused_token_limit: self.stats.refused_token_limit.load(Ordering::Relaxed),
            replay_bytes: self.replay.in_use() as u64,
            replay_budget_waits: self.replay.waits(),
        }
    }

    /// Counts a session for as long as the guard lives.
    fn session(self: &Arc<Self>) -> SessionGuard {
        self.stats.connected.fetch_add(1, Ordering::Relaxed);
        let n = self.stats.sessions.fetch_add(1, Ordering::Relaxed) + 1;
        SessionGuard {
            hub: self.clone(),
            id: n,
        }
    }
}

/// One of a consumer's connection places; given back when dropped, however the connection
/// ends.
pub struct ConnectionSlot {
    consumer: Arc<Consumer>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.consumer.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Decrements the connected gauge when a session ends, however it ends.
struct SessionGuard {
    hub: Arc<Hub>,
    id: u64,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.hub.stats.connected.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The routes of both endpoints, to be merged at the server root.
pub fn router(hub: Arc<Hub>) -> axum::Router {
    axum::Router::new()
        .route("/v1/ws", axum::routing::get(ws::upgrade))
        .route("/v1/events", axum::routing::get(sse::stream))
        .route("/v1/durables/{name}/ack", axum::routing::post(acks::post))
        .with_state(hub)
}
