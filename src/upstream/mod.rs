//! Upstream supervision: one task per configured provider connection.
//!
//! A supervisor owns its connection for the life of the process: it connects with the
//! adapter's request, waits for the greeting where the dialect has one, subscribes, keeps the
//! connection alive with the adapter's heartbeat, detects a stale connection, and on any end
//! reconnects with exponential backoff and jitter, resubscribing every time. Every decoded
//! event goes, stamped as an [`Envelope`](crate::envelope::Envelope), into the bridge's bounded ingest queue; when that
//! queue is full the supervisor stops reading its socket (the provider's TCP window is the
//! buffer), so ingest can never grow memory without bound.
//!
//! State machine (visible through [`UpstreamHandle::status`]):
//! `connecting → connected → subscribed`, and from anywhere `→ backoff → connecting`, or
//! `→ auth_failed → connecting` (the longest backoff step) when the provider refuses the
//! credentials, and `→ draining → stopped` at shutdown. A supervisor task that panics or ends
//! on its own is shown `failed` (with the reason in `last_error`) and restarted after a
//! backoff ([`crate::supervise`]). Upstreams are independent: one upstream's failure,
//! slowness or bad frames never touch another's task.
//!
//! Closing never drops what the provider already sent (providers do not replay): a connection
//! the bridge ends is sent a close frame and read until the provider's close answer, every
//! event queued to ingest, for at most `server.shutdown_grace` (see `session::drain`).
//!
//! Invariants: a malformed frame is counted, logged with the upstream's name and skipped, and
//! the connection stays up; a token never appears in a log line (URLs are logged redacted).

mod backoff;
mod connect;
pub mod gaps;
pub mod occurrence;
mod prepare;
mod registry;
mod session;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use wsbridge_adapters::Adapter;

pub use registry::{Spawner, StartError, UpstreamView, Upstreams};

pub use backoff::Backoff;
pub use session::SessionEnd;

use crate::config::{LimitsConfig, UpstreamConfig};
use crate::failure::{Reason, ReasonCounts};

/// The supervisor's state, as operators and tests see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamState {
    /// Opening TCP, the WebSocket upgrade, or waiting for the greeting.
    Connecting,
    /// Upgraded (and greeted); subscriptions are being sent.
    Connected,
    /// Subscribed; events flow.
    Subscribed,
    /// Waiting before the next attempt after a failure.
    Backoff,
    /// The provider refused the credentials; waiting the longest backoff step.
    AuthFailed,
    /// Closing: the close frame is sent, and what the provider sent before its close answer is
    /// still being read and queued (at shutdown, a reload removing the upstream, or a lease
    /// handover), for at most `server.shutdown_grace`.
    Draining,
    /// Shut down.
    Stopped,
    /// Another bridge instance holds this upstream's lease (`ownership = "lease"`); this one
    /// waits to take over.
    Standby,
    /// The supervisor task died (a panic, or it ended on its own); it is restarted after a
    /// backoff, and `last_error` says why.
    Failed,
}

impl UpstreamState {
    /// The snake_case name used in logs, metrics and the status API.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamState::Connecting => "connecting",
            UpstreamState::Connected => "connected",
            UpstreamState::Subscribed => "subscribed",
            UpstreamState::Backoff => "backoff",
            UpstreamState::AuthFailed => "auth_failed",
            UpstreamState::Draining => "draining",
            UpstreamState::Stopped => "stopped",
            UpstreamState::Standby => "standby",
            UpstreamState::Failed => "failed",
        }
    }
}

/// A point-in-time view of one upstream's state.
#[derive(Clone, Debug, Serialize)]
pub struct UpstreamStatus {
    /// Current state.
    pub state: UpstreamState,
    /// When the current state began.
    pub since: DateTime<Utc>,
    /// Why the last connection ended (never contains a credential).
    pub last_error: Option<String>,
    /// The reason of `last_error` (`dns`, `refused`, `timeout`, `tls_unknown_issuer`, …).
    pub last_error_reason: Option<Reason>,
    /// In `backoff`/`auth_failed`: how long until the next attempt.
    pub retry_in: Option<Duration>,
    /// Consecutive failed connections (0 once a connection has been healthy).
    pub failures: u32,
}

/// Monotonic counters of one upstream, updated lock-free on the hot path.
#[derive(Debug, Default)]
pub struct UpstreamCounters {
    /// Inbound data frames (text or binary), control frames included.
    pub frames: AtomicU64,
    /// Frames decoded as events and handed to ingest.
    pub events: AtomicU64,
    /// Frames that could not be decoded (skipped, connection kept).
    pub decode_errors: AtomicU64,
    /// Messages larger than the read limit ([`FrameLimits::max_frame_bytes`]): each ended
    /// its connection, which was reopened.
    pub frames_too_large: AtomicU64,
    /// Connection attempts after the first.
    pub reconnects: AtomicU64,
    /// The supervisor task's health (failed, restarts).
    pub task: Arc<crate::supervise::TaskHealth>,
    /// Unix milliseconds of the last event, 0 before the first.
    pub last_event_unix_ms: AtomicI64,
    /// Closes that ended without the provider's close answer within the drain grace
    /// (`server.shutdown_grace`): whatever it sent after that point was not read.
    pub drain_timeouts: AtomicU64,
    /// Connections that failed or ended, per reason.
    pub failures: ReasonCounts,
    /// Content-identified frames whose occurrence count was forgotten before the dedup window
    /// ended because a connection tracked `limits.tracked_frames` others (see
    /// [`occurrence`]): a repeat of one within the window would be taken for a copy.
    pub untracked: AtomicU64,
    /// Binary frames that would inflate past the frame-size limit (a likely decompression
    /// bomb): refused after reading at most the limit, counted as decode errors too.
    pub inflate_refused: AtomicU64,
    /// Connections given up because a subscription's acknowledgement (`[subscribe] ack`)
    /// did not arrive within `ack_timeout`.
    pub ack_timeouts: AtomicU64,
    /// Jumps in the provider's sequence numbers (a dialect's `sequence` rule): events the
    /// provider skipped.
    pub gaps: AtomicU64,
    /// Reply frames (a dialect's `reply`) sent to the provider after their event was
    /// journalled.
    pub replies: AtomicU64,
    /// Reply frames dropped because their connection was gone or its reply queue full (the
    /// provider redelivers; the journal deduplicates).
    pub replies_dropped: Arc<AtomicU64>,
    /// `[prepare] refresh` calls that failed while connected (the connection and the last
    /// answer were kept).
    pub prepare_failures: AtomicU64,
    /// Events per type (a lookup without allocation once a type has been seen).
    events_by_type: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

/// Plain-number copy of [`UpstreamCounters`], for status answers and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CounterSnapshot {
    /// See [`UpstreamCounters::frames`].
    pub frames: u64,
    /// See [`UpstreamCounters::events`].
    pub events: u64,
    /// See [`UpstreamCounters::decode_errors`].
    pub decode_errors: u64,
    /// See [`UpstreamCounters::frames_too_large`].
    pub frames_too_large: u64,
    /// See [`UpstreamCounters::reconnects`].
    pub reconnects: u64,
    /// Restarts of the supervisor task after it died.
    pub task_restarts: u64,
    /// See [`UpstreamCounters::drain_timeouts`].
    pub drain_timeouts: u64,
    /// See [`UpstreamCounters::untracked`].
    pub untracked: u64,
    /// See [`UpstreamCounters::inflate_refused`].
    pub inflate_refused: u64,
    /// See [`UpstreamCounters::ack_timeouts`].
    pub ack_timeouts: u64,
    /// See [`UpstreamCounters::gaps`].
    pub gaps: u64,
    /// See [`UpstreamCounters::replies`].
    pub replies: u64,
    /// See [`UpstreamCounters::replies_dropped`].
    pub replies_dropped: u64,
    /// See [`UpstreamCounters::prepare_failures`].
    pub prepare_failures: u64,
}

/// How many distinct event types one upstream counts separately.
const MAX_COUNTED_TYPES: usize = 256;
/// The key under which types beyond [`MAX_COUNTED_TYPES`] are counted.
const OTHER_TYPES: &str = "(other)";

impl UpstreamCounters {
    /// Counts one event of `event_type`.
    pub fn count_event(&self, event_type: &str) {
        self.events.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut map) = self.events_by_type.lock() {
            if let Some(n) = map.get_mut(event_type) {
                *n += 1;
            } else if map.len() >= MAX_COUNTED_TYPES {
                // Unknown types are forwarded, so the provider picks these keys: past a cap,
                // new ones are counted together (they become metric labels, too).
                *map.entry(OTHER_TYPES.to_string()).or_insert(0) += 1;
            } else {
                map.insert(event_type.to_string(), 1);
            }
        }
    }

    /// Events per type so far.
    pub fn events_by_type(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .events_by_type
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            frames: self.frames.load(Ordering::Relaxed),
            events: self.events.load(Ordering::Relaxed),
            decode_errors: self.decode_errors.load(Ordering::Relaxed),
            frames_too_large: self.frames_too_large.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            task_restarts: self.task.restarts(),
            drain_timeouts: self.drain_timeouts.load(Ordering::Relaxed),
            untracked: self.untracked.load(Ordering::Relaxed),
            inflate_refused: self.inflate_refused.load(Ordering::Relaxed),
            ack_timeouts: self.ack_timeouts.load(Ordering::Relaxed),
            gaps: self.gaps.load(Ordering::Relaxed),
            replies: self.replies.load(Ordering::Relaxed),
            replies_dropped: self.replies_dropped.load(Ordering::Relaxed),
            prepare_failures: self.prepare_failures.load(Ordering::Relaxed),
        }
    }
}

/// The heartbeat period when neither the upstream nor its dialect sets one.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(20);

/// Timing knobs of one supervisor (from the upstream's config).
#[derive(Clone, Debug)]
pub struct Timing {
    /// First reconnect delay.
    pub backoff_initial: Duration,
    /// Longest reconnect delay (and the auth-failure delay).
    pub backoff_max: Duration,
    /// Heartbeat period set on the upstream; `None`: the dialect's `[heartbeat] interval`,
    /// else [`DEFAULT_PING_INTERVAL`].
    pub ping_interval: Option<Duration>,
    /// Silence after which a connection is stale.
    pub stale_after: Duration,
    /// Subscribed time after which the backoff resets.
    pub healthy_after: Duration,
    /// Limit on connect + upgrade + greeting.
    pub connect_timeout: Duration,
    /// How long a closing connection may take to deliver what the provider sent before its
    /// close answer (`server.shutdown_grace`).
    pub drain_grace: Duration,
}

impl From<&UpstreamConfig> for Timing {
    fn from(c: &UpstreamConfig) -> Self {
        Timing {
            backoff_initial: c.backoff_initial,
            backoff_max: c.backoff_max,
            ping_interval: c.ping_interval,
            stale_after: c.stale_after,
            healthy_after: c.healthy_after,
            connect_timeout: c.connect_timeout,
            drain_grace: crate::config::ServerConfig::default().shutdown_grace,
        }
    }
}

/// Per-frame bounds of an upstream connection (from `[limits]`, the same for every upstream).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest WebSocket message read; a larger one ends the connection (see
    /// [`LimitsConfig::max_upstream_frame_bytes`]).
    pub max_frame_bytes: usize,
    /// Deepest nesting accepted in a frame; a deeper frame is a decode error.
    pub max_depth: usize,
    /// How long a connection remembers a content-identified frame to number its repeats
    /// (`storage.dedup_window`, see [`occurrence`]).
    pub dedup_window: Duration,
    /// Most content-identified frames one connection remembers (`limits.tracked_frames`).
    pub tracked_frames: usize,
    /// Most events one frame may carry (`limits.max_split_events`).
    pub max_split_events: usize,
}

impl FrameLimits {
    /// The bounds `[limits]` and `storage.dedup_window` set.
    pub fn new(l: &LimitsConfig, dedup_window: Duration) -> FrameLimits {
        FrameLimits {
            max_frame_bytes: l.max_upstream_frame_bytes(),
            max_depth: l.max_depth,
            dedup_window,
            tracked_frames: l.tracked_frames,
            max_split_events: l.max_split_events,
        }
    }
}

impl Default for FrameLimits {
    fn default() -> Self {
        FrameLimits::new(
            &LimitsConfig::default(),
            crate::config::StorageConfig::default().dedup_window,
        )
    }
}

/// Everything a supervisor task shares with the rest of the bridge.
#[derive(Clone)]
pub(crate) struct Shared {
    pub name: Arc<str>,
    pub source: Arc<str>,
    pub adapter: Arc<dyn Adapter>,
    pub timing: Timing,
    pub limits: FrameLimits,
    pub counters: Arc<UpstreamCounters>,
    pub status: Arc<watch::Sender<UpstreamStatus>>,
    /// DNS, TCP and TLS as this upstream's `tls_*` keys say.
    pub connector: connect::Connector,
    /// The client of the dialect's `[prepare]` calls, when it makes any.
    pub preparer: Option<Arc<prepare::Preparer>>,
}

impl Shared {
    pub(crate) fn set_state(&self, state: UpstreamState) {
        self.status.send_modify(|s| {
            if s.state != state {
                s.state = state;
                s.since = Utc::now();
            }
            if !matches!(state, UpstreamState::Backoff | UpstreamState::AuthFailed) {
                s.retry_in = None;
            }
        });
    }
}

/// A running supervisor: its status, counters and task.
pub struct UpstreamHandle {
    name: Arc<str>,
    config: UpstreamConfig,
    adapter: Arc<dyn Adapter>,
    counters: Arc<UpstreamCounters>,
    status: watch::Receiver<UpstreamStatus>,
    stop: CancellationToken,
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl UpstreamHandle {
    /// The configured name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The adapter (provider, subscriptions, redacted URL).
    pub fn adapter(&self) -> &Arc<dyn Adapter> {
        &self.adapter
    }

    /// The current status.
    pub fn status(&self) -> UpstreamStatus {
        self.status.borrow().clone()
    }

    /// A receiver that sees every status change; tests wait on it instead of sleeping.
    pub fn watch_status(&self) -> watch::Receiver<UpstreamStatus> {
        self.status.clone()
    }

    /// The counters.
    pub fn counters(&self) -> CounterSnapshot {
        self.counters.snapshot()
    }

    /// Events per type so far.
    pub fn events_by_type(&self) -> Vec<(String, u64)> {
        self.counters.events_by_type()
    }

    /// Connections that failed or ended so far, per reason (reasons not seen left out).
    pub fn failures_by_reason(&self) -> Vec<(Reason, u64)> {
        self.counters.failures.snapshot()
    }

    /// Unix milliseconds of the last event (0 before the first).
    pub fn last_event_unix_ms(&self) -> i64 {
        self.counters.last_event_unix_ms.load(Ordering::Relaxed)
    }

    /// The configuration it runs with (a reload compares against it).
    pub fn config(&self) -> &UpstreamConfig {
        &self.config
    }

    /// Stops this upstream and waits for its task to end: the connection is closed with a
    /// close frame, and what the provider sent before answering it is still queued to ingest
    /// (for at most the drain grace, see [`Timing::drain_grace`]).
    pub async fn stop(&self) {
        self.stop.cancel();
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            if let Err(e) = task.await {
                warn!(upstream = %self.name, error = %e, "upstream task ended abnormally");
            }
        }
    }
}

/// Starts the supervisor of one upstream. Events go to `ingest`; the task ends when
/// `shutdown` is cancelled (closing its connection with a normal close frame and draining it,
/// see [`UpstreamHandle::stop`]) or when the ingest queue is closed. Give each upstream its
/// own (child) token so a reload can stop one. `drain_grace` bounds the drain.
pub fn spawn(
    config: &UpstreamConfig,
    limits: FrameLimits,
    adapter: Arc<dyn Adapter>,
    ingest: mpsc::Sender<crate::ingest::Queued>,
    shutdown: CancellationToken,
    drain_grace: Duration,
) -> UpstreamHandle {
    spawn_gated(config, limits, adapter, ingest, shutdown, drain_grace, None)
}

/// Like [`spawn`], but the supervisor connects only while `gate` is true (this instance holds
/// the upstream's lease) and closes (and drains) the connection as soon as it turns false.
/// The supervisor holds `gate` until its task ends, so the lease keeper can tell when a drain
/// is over (the sender's `closed()`) and release the lease only then.
pub fn spawn_gated(
    config: &UpstreamConfig,
    limits: FrameLimits,
    adapter: Arc<dyn Adapter>,
    ingest: mpsc::Sender<crate::ingest::Queued>,
    shutdown: CancellationToken,
    drain_grace: Duration,
    gate: Option<watch::Receiver<bool>>,
) -> UpstreamHandle {
    let (status_tx, status_rx) = watch::channel(UpstreamStatus {
        state: UpstreamState::Connecting,
        since: Utc::now(),
        last_error: None,
        last_error_reason: None,
        retry_in: None,
        failures: 0,
    });
    let shared = Shared {
        name: Arc::from(config.name.as_str()),
        source: Arc::from(crate::envelope::source_for(&config.name)),
        adapter: adapter.clone(),
        timing: Timing {
            drain_grace,
            ..Timing::from(config)
        },
        limits,
        counters: Arc::new(UpstreamCounters::default()),
        status: Arc::new(status_tx),
        connector: connect::Connector::new(
            &config.tls,
            config.uses_tls(),
            &format!("upstream {}", config.name),
        ),
        preparer: adapter.prepare_request().map(|_| {
            Arc::new(prepare::Preparer::new(
                &config.tls,
                &format!("upstream {} [prepare]", config.name),
            ))
        }),
    };
    let handle_parts = (shared.name.clone(), shared.counters.clone());
    let failed = shared.clone();
    let task = tokio::spawn({
        let stop = shutdown.clone();
        crate::supervise::supervise(
            "upstream",
            shared.name.clone(),
            shared.counters.task.clone(),
            shutdown.clone(),
            move |reason: &str| {
                failed.set_state(UpstreamState::Failed);
                failed.status.send_modify(|s| {
                    s.last_error = Some(reason.to_string());
                    s.last_error_reason = None;
                });
            },
            move || supervise(shared.clone(), ingest.clone(), stop.clone(), gate.clone()),
        )
    });
    UpstreamHandle {
        name: handle_parts.0,
        config: config.clone(),
        adapter,
        counters: handle_parts.1,
        status: status_rx,
        stop: shutdown,
        task: std::sync::Mutex::new(Some(task)),
    }
}

async fn supervise(
    shared: Shared,
    ingest: mpsc::Sender<crate::ingest::Queued>,
    shutdown: CancellationToken,
    mut gate: Option<watch::Receiver<bool>>,
) {
    let name = shared.name.clone();
    let mut backoff = Backoff::new(shared.timing.backoff_initial, shared.timing.backoff_max);
    info!(upstream = %name, provider = %shared.adapter.provider(), url = %shared.adapter.display_url(), "upstream starting");
    let mut first = true;
    loop {
        // Without the lease, wait for it; a session ends when the lease is lost.
        let session_stop = shutdown.child_token();
        let mut lease_watch = None;
        if let Some(g) = gate.as_mut() {
            if !*g.borrow_and_update() {
                shared.set_state(UpstreamState::Standby);
                info!(upstream = %name, "another instance holds the lease; standing by");
                tokio::select! {
                    held = g.wait_for(|held| *held) => if held.is_err() { break },
                    _ = shutdown.cancelled() => break,
                }
                info!(upstream = %name, "lease acquired; connecting");
            }
            let mut g = g.clone();
            let stop = session_stop.clone();
            lease_watch = Some(tokio::spawn(async move {
                let _ = g.wait_for(|held| !*held).await;
                stop.cancel();
            }));
        }
        if !first {
            shared.counters.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        first = false;
        shared.set_state(UpstreamState::Connecting);
        let outcome = session::run(&shared, &ingest, &session_stop).await;
        if let Some(w) = lease_watch {
            w.abort();
        }
        if outcome.healthy {
            backoff.reset();
        }
        let (state, delay) = match &outcome.end {
            SessionEnd::Shutdown if shutdown.is_cancelled() => break,
            SessionEnd::Shutdown => {
                warn!(upstream = %name, "lease lost; connection closed");
                continue;
            }
            SessionEnd::Moved => {
                info!(upstream = %name, "reconnecting at the provider's request");
                continue;
            }
            SessionEnd::AuthRejected(_) => {
                (UpstreamState::AuthFailed, backoff.auth_failure_delay())
            }
            _ => (UpstreamState::Backoff, backoff.next_delay()),
        };
        let reason = outcome.end.to_string();
        let kind = outcome.end.reason();
        if let Some(kind) = kind {
            shared.counters.failures.count(kind);
        }
        let kind_label = kind.map_or("", Reason::as_str);
        if state == UpstreamState::AuthFailed {
            warn!(upstream = %name, reason = %reason, kind = kind_label, retry_in_ms = delay.as_millis() as u64,
                "upstream refused our credentials; check the token");
        } else {
            warn!(upstream = %name, reason = %reason, kind = kind_label, retry_in_ms = delay.as_millis() as u64,
                failures = backoff.failures(), "upstream connection ended; reconnecting");
        }
        shared.set_state(state);
        shared.status.send_modify(|s| {
            s.last_error = Some(reason);
            s.last_error_reason = kind;
            s.retry_in = Some(delay);
            s.failures = backoff.failures();
        });
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    shared.set_state(UpstreamState::Stopped);
    info!(upstream = %name, "upstream stopped");
}
