//! One connection's life, from the upgrade request to its end.
//!
//! A session returns *why* it ended ([`SessionEnd`]); the supervisor decides what that means
//! for the backoff. Within a session, every inbound frame refreshes the liveness clock
//! (provider pongs, protocol pings and pongs, events alike), and a connection silent for
//! `stale_after` is abandoned: a half-open TCP connection is otherwise indistinguishable from
//! a quiet provider.

use std::borrow::Cow;
use std::fmt;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::{timeout_at, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wsbridge_adapters::{Control, Decoded, FrameEvent, Greeting, Heartbeat, StepCheck};

use super::connect::{self, OpenError};
use super::gaps::Sequences;
use super::occurrence::Occurrences;
use super::{Shared, UpstreamState};
use crate::envelope::Envelope;
use crate::failure::{Failure, Reason};
use crate::ingest::{Queued, Reply};
use crate::supervise::{deadline_after, MAX_WAIT};

type Ws = WebSocketStream<connect::Stream>;

/// Why a session ended. The supervisor maps these onto backoff and state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The bridge is shutting down.
    Shutdown,
    /// The ingest queue is gone (the bridge is stopping).
    IngestClosed,
    /// The provider refused the credentials (HTTP 401/403, or an auth error frame).
    AuthRejected(String),
    /// DNS, TCP, TLS or the upgrade failed, or the greeting never came; with its reason.
    ConnectFailed(Failure),
    /// The provider closed the connection, or the stream ended.
    Closed(String),
    /// Nothing arrived for this long.
    Stale(Duration),
    /// A read or write failed mid-connection.
    Transport(String),
    /// The provider asked us to reconnect (a `reconnect` control frame): reconnect at once,
    /// without backoff; not a failure.
    Moved,
}

impl fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionEnd::Shutdown => f.write_str("shutting down"),
            SessionEnd::IngestClosed => f.write_str("ingest queue closed"),
            SessionEnd::AuthRejected(m) => write!(f, "authentication failed: {m}"),
            SessionEnd::ConnectFailed(m) => write!(f, "connect failed: {m}"),
            SessionEnd::Closed(m) => write!(f, "connection closed: {m}"),
            SessionEnd::Stale(d) => write!(f, "stale: nothing received for {} ms", d.as_millis()),
            SessionEnd::Transport(m) => write!(f, "transport error: {m}"),
            SessionEnd::Moved => f.write_str("the provider asked to reconnect"),
        }
    }
}

impl SessionEnd {
    /// The failure reason of this end (`None` for a stop of our own).
    pub fn reason(&self) -> Option<Reason> {
        match self {
            SessionEnd::Shutdown | SessionEnd::IngestClosed | SessionEnd::Moved => None,
            SessionEnd::AuthRejected(_) => Some(Reason::Auth),
            SessionEnd::ConnectFailed(f) => Some(f.reason),
            SessionEnd::Closed(_) => Some(Reason::Closed),
            SessionEnd::Stale(_) => Some(Reason::Stale),
            SessionEnd::Transport(_) => Some(Reason::Transport),
        }
    }
}

/// How a session went: why it ended, and whether it was healthy long enough to reset the
/// backoff.
pub(crate) struct Outcome {
    pub end: SessionEnd,
    pub healthy: bool,
}

/// Runs one connection to its end.
pub(crate) async fn run(
    shared: &Shared,
    ingest: &mpsc::Sender<Queued>,
    shutdown: &CancellationToken,
) -> Outcome {
    let mut subscribed_at = None;
    // Replies (a dialect's `reply`) come back here from ingest once their event is
    // journalled; they go out on this connection only.
    let (reply_to, mut replies) = mpsc::channel(REPLY_QUEUE);
    let end = connect_and_serve(
        shared,
        ingest,
        shutdown,
        &mut subscribed_at,
        (reply_to, &mut replies),
    )
    .await;
    // The connection is gone: replies still waiting, and any that come later, are dropped
    // and counted (the provider redelivers those events; the journal deduplicates them).
    replies.close();
    let mut unsent = 0u64;
    while replies.try_recv().is_ok() {
        unsent = unsent.saturating_add(1);
    }
    if unsent > 0 {
        shared
            .counters
            .replies_dropped
            .fetch_add(unsent, Ordering::Relaxed);
        debug!(upstream = %shared.name, replies = unsent, "connection ended before these replies were sent");
    }
    let healthy =
        subscribed_at.is_some_and(|t: Instant| t.elapsed() >= shared.timing.healthy_after);
    Outcome { end, healthy }
}

/// The largest inbound message accepted from a provider is `limits.max_frame_bytes`
/// (derived from `limits.max_event_bytes`): a larger one ends the connection, since buffering
/// it would be unbounded memory; one below it is read whole, and ingest refuses it if its
/// envelope is too large, keeping the connection.
fn ws_config(limits: &super::FrameLimits) -> WebSocketConfig {
    // Provider frames are small JSON; no need for tungstenite's 128 KiB default read buffer.
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(limits.max_frame_bytes))
        .max_frame_size(Some(limits.max_frame_bytes))
}

/// Runs the dialect's `[prepare]` call, if it has one (its answer is `$prepared` for what
/// the connection sends).
async fn prepare(shared: &Shared) -> Result<(), SessionEnd> {
    match &shared.preparer {
        Some(p) => {
            p.run(
                shared.adapter.as_ref(),
                shared.timing.connect_timeout,
                shared.limits.max_frame_bytes,
            )
            .await
        }
        None => Ok(()),
    }
}

async fn connect(shared: &Shared) -> Result<Ws, SessionEnd> {
    prepare(shared).await?;
    let request = shared
        .adapter
        .connect_request()
        .map_err(|e| SessionEnd::ConnectFailed(Failure::new(Reason::Other, e.to_string())))?;
    connect::open(
        request,
        &shared.connector,
        ws_config(&shared.limits),
        shared.timing.connect_timeout,
        shared.adapter.auth_failure_statuses(),
    )
    .await
    .map_err(|e| match e {
        OpenError::Auth(m) => SessionEnd::AuthRejected(m),
        OpenError::Failed(f) => SessionEnd::ConnectFailed(f),
    })
}

/// Where a connection is in its handshake.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Upgraded; waiting for the provider's greeting until the deadline.
    AwaitGreeting(Instant),
    /// Subscriptions sent; events flow.
    Subscribed,
}

async fn connect_and_serve(
    shared: &Shared,
    ingest: &mpsc::Sender<Queued>,
    shutdown: &CancellationToken,
    subscribed_at: &mut Option<Instant>,
    replies: (mpsc::Sender<String>, &mut mpsc::Receiver<String>),
) -> SessionEnd {
    let mut ws = tokio::select! {
        connected = connect(shared) => match connected {
            Ok(ws) => ws,
            Err(end) => return end,
        },
        _ = shutdown.cancelled() => return SessionEnd::Shutdown,
    };
    let name = &shared.name;
    let timing = &shared.timing;
    let (reply_to, replies) = replies;
    let mut seen = Seen {
        occurrences: Occurrences::new(shared.limits.dedup_window, shared.limits.tracked_frames),
        sequences: Sequences::new(shared.limits.tracked_frames),
        reply_to,
    };
    let greeted = tokio::select! {
        done = run_session(shared, &mut ws, ingest, &mut seen) => match done {
            Ok(greeted) => greeted,
            Err(end) => return end,
        },
        _ = shutdown.cancelled() => return SessionEnd::Shutdown,
    };
    // Subscriptions whose acknowledgement (`[subscribe] ack`) has not arrived yet.
    let mut acks: Option<Acks> = None;
    let mut phase = match shared.adapter.greeting() {
        Greeting::AwaitConnected if !greeted => {
            Phase::AwaitGreeting(deadline_after(timing.connect_timeout))
        }
        _ => {
            shared.set_state(UpstreamState::Connected);
            match subscribe(shared, &mut ws).await {
                Ok(None) => *subscribed_at = Some(Instant::now()),
                Ok(Some(waiting)) => acks = Some(waiting),
                Err(end) => return end,
            }
            Phase::Subscribed
        }
    };

    // Validation bounds ping_interval; the cap keeps an unvalidated one from overflowing.
    // The upstream's own ping_interval wins over the dialect's `[heartbeat] interval`.
    let period = timing
        .ping_interval
        .or_else(|| shared.adapter.heartbeat_interval())
        .unwrap_or(super::DEFAULT_PING_INTERVAL)
        .min(MAX_WAIT);
    let mut ping = tokio::time::interval_at(deadline_after(period), period);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let check_every = (timing.stale_after / 4)
        .max(Duration::from_millis(5))
        .min(MAX_WAIT);
    let mut check = tokio::time::interval(check_every);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_seen = Instant::now();
    // `[prepare] refresh`: the call repeated while connected.
    let mut refresh = shared.adapter.prepare_refresh().map(|every| {
        let every = every.min(MAX_WAIT);
        let mut i = tokio::time::interval_at(deadline_after(every), every);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });

    loop {
        tokio::select! {
            msg = ws.next() => {
                let msg = match msg {
                    None => return SessionEnd::Closed("the server ended the stream".into()),
                    Some(Err(tungstenite::Error::Capacity(e))) => {
                        shared.counters.frames_too_large.fetch_add(1, Ordering::Relaxed);
                        warn!(upstream = %name, error = %e, max_bytes = shared.limits.max_frame_bytes,
                            "frame larger than the upstream read limit (2 x limits.max_event_bytes + 64 KiB); reconnecting");
                        return SessionEnd::Transport(format!("frame too large: {e}"));
                    }
                    Some(Err(e)) => return SessionEnd::Transport(e.to_string()),
                    Some(Ok(m)) => m,
                };
                last_seen = Instant::now();
                if let (Some(waiting), Message::Text(t)) = (acks.as_mut(), &msg) {
                    if waiting.take(shared, t.as_str()) {
                        if waiting.pending.is_empty() {
                            acks = None;
                            shared.set_state(UpstreamState::Subscribed);
                            *subscribed_at = Some(Instant::now());
                            info!(upstream = %name, subscriptions = shared.adapter.subscriptions().len(), "upstream subscribed (every subscription acknowledged)");
                        }
                        continue;
                    }
                }
                match read_frame(shared, &mut seen, msg) {
                    Frame::Skip => {}
                    Frame::Closed(why) => return SessionEnd::Closed(why),
                    Frame::Events(envelopes) => {
                        let mut envelopes = envelopes.into_iter();
                        while let Some(envelope) = envelopes.next() {
                            // A full queue blocks this reader: backpressure reaches the
                            // provider's TCP window instead of our memory. A stop while
                            // blocked keeps the frame's events: the drain queues them first.
                            tokio::select! {
                                permit = ingest.reserve() => match permit {
                                    Ok(permit) => permit.send(envelope),
                                    Err(_) => return SessionEnd::IngestClosed,
                                },
                                _ = shutdown.cancelled() => {
                                    let pending = std::iter::once(envelope).chain(envelopes).collect();
                                    return drain(shared, ingest, &mut ws, &mut seen, pending).await;
                                }
                            }
                        }
                        // Time spent blocked on a full ingest queue is our stall, not the
                        // provider's silence: it must not make the connection look stale.
                        last_seen = Instant::now();
                    }
                    Frame::Control(control) => match control {
                        Control::Connected => {
                            if let Phase::AwaitGreeting(_) = phase {
                                shared.set_state(UpstreamState::Connected);
                                match subscribe(shared, &mut ws).await {
                                    Ok(None) => *subscribed_at = Some(Instant::now()),
                                    Ok(Some(waiting)) => acks = Some(waiting),
                                    Err(end) => return end,
                                }
                                phase = Phase::Subscribed;
                            }
                        }
                        Control::AuthFailed { message } => {
                            let _ = ws.close(None).await;
                            return SessionEnd::AuthRejected(message);
                        }
                        Control::Error { code, message } => {
                            warn!(upstream = %name, code = code.as_deref().unwrap_or(""), message = %message, "provider reported an error");
                        }
                        Control::Reconnect => {
                            info!(upstream = %name, "the provider asked to reconnect; reconnecting now");
                            let _ = ws.close(None).await;
                            return SessionEnd::Moved;
                        }
                        Control::Pong | Control::Reply => {}
                    },
                }
            }
            Some(frame) = replies.recv() => {
                if let Err(e) = ws.send(Message::text(frame)).await {
                    shared.counters.replies_dropped.fetch_add(1, Ordering::Relaxed);
                    return SessionEnd::Transport(format!("reply not sent: {e}"));
                }
                shared.counters.replies.fetch_add(1, Ordering::Relaxed);
            }
            _ = async { match refresh.as_mut() {
                Some(i) => { i.tick().await; }
                None => std::future::pending().await,
            } } => {
                match prepare(shared).await {
                    Ok(()) => debug!(upstream = %name, "[prepare] refreshed"),
                    Err(SessionEnd::AuthRejected(m)) => {
                        let _ = ws.close(None).await;
                        return SessionEnd::AuthRejected(m);
                    }
                    Err(e) => {
                        shared.counters.prepare_failures.fetch_add(1, Ordering::Relaxed);
                        warn!(upstream = %name, error = %e, "[prepare] refresh failed; keeping the connection and the last answer");
                    }
                }
            }
            _ = ping.tick() => {
                let beat = match shared.adapter.heartbeat(Utc::now().timestamp()) {
                    Heartbeat::Text(t) => Message::text(t),
                    Heartbeat::Protocol => Message::Ping(Default::default()),
                };
                if let Err(e) = ws.send(beat).await {
                    return SessionEnd::Transport(format!("heartbeat not sent: {e}"));
                }
            }
            _ = check.tick() => {
                let silent = last_seen.elapsed();
                if silent >= timing.stale_after {
                    return SessionEnd::Stale(silent);
                }
                if let Some(waiting) = &acks {
                    if Instant::now() >= waiting.deadline {
                        shared.counters.ack_timeouts.fetch_add(1, Ordering::Relaxed);
                        warn!(upstream = %name, unacknowledged = ?waiting.pending,
                            "no acknowledgement of these subscriptions within [subscribe] ack_timeout; reconnecting");
                        let _ = ws.close(None).await;
                        return SessionEnd::ConnectFailed(Failure::new(
                            Reason::Timeout,
                            format!("{} subscription(s) not acknowledged in time", waiting.pending.len()),
                        ));
                    }
                }
                if let Phase::AwaitGreeting(deadline) = phase {
                    if Instant::now() >= deadline {
                        return SessionEnd::ConnectFailed(Failure::new(
                            Reason::Protocol,
                            "no greeting from the server",
                        ));
                    }
                }
            }
            _ = shutdown.cancelled() => return drain(shared, ingest, &mut ws, &mut seen, Vec::new()).await,
        }
    }
}

/// Runs the dialect's session steps (`[[session]]`) after the upgrade, before subscribing:
/// each sends its frames, then waits (up to its timeout) for its `expect` frame; its `fail`
/// frame means the credentials were refused. Other frames meanwhile are read as usual
/// (events go to ingest). Returns whether the provider's greeting arrived meanwhile.
async fn run_session(
    shared: &Shared,
    ws: &mut Ws,
    ingest: &mpsc::Sender<Queued>,
    seen: &mut Seen,
) -> Result<bool, SessionEnd> {
    let adapter = &shared.adapter;
    let mut greeted = false;
    for step in 0..adapter.session_steps() {
        let frames = adapter
            .session_send(step)
            .map_err(|e| SessionEnd::ConnectFailed(Failure::new(Reason::Other, e.to_string())))?;
        for frame in frames {
            ws.send(Message::text(frame))
                .await
                .map_err(|e| SessionEnd::Transport(format!("session step {step} not sent: {e}")))?;
        }
        let Some(limit) = adapter.session_timeout(step) else {
            continue;
        };
        let deadline = Instant::now() + limit.min(MAX_WAIT);
        loop {
            let msg = match timeout_at(deadline, ws.next()).await {
                Err(_) => {
                    return Err(SessionEnd::ConnectFailed(Failure::new(
                        Reason::Timeout,
                        format!(
                            "session step {step}: no expected frame within {} ms",
                            limit.as_millis()
                        ),
                    )))
                }
                Ok(None) => return Err(SessionEnd::Closed("the server ended the stream".into())),
                Ok(Some(Err(e))) => return Err(SessionEnd::Transport(e.to_string())),
                Ok(Some(Ok(msg))) => msg,
            };
            if let Message::Text(t) = &msg {
                match adapter.session_check(step, t.as_str()) {
                    StepCheck::Done => break,
                    StepCheck::Failed(why) => {
                        let _ = ws.close(None).await;
                        return Err(SessionEnd::AuthRejected(why));
                    }
                    StepCheck::Other => {}
                }
            }
            match read_frame(shared, seen, msg) {
                Frame::Skip => {}
                Frame::Closed(why) => return Err(SessionEnd::Closed(why)),
                Frame::Events(envelopes) => {
                    for envelope in envelopes {
                        if ingest.send(envelope).await.is_err() {
                            return Err(SessionEnd::IngestClosed);
                        }
                    }
                }
                Frame::Control(Control::Connected) => greeted = true,
                Frame::Control(Control::AuthFailed { message }) => {
                    let _ = ws.close(None).await;
                    return Err(SessionEnd::AuthRejected(message));
                }
                Frame::Control(Control::Reconnect) => return Err(SessionEnd::Moved),
                Frame::Control(_) => {}
            }
        }
        debug!(upstream = %shared.name, step, "session step complete");
    }
    Ok(greeted)
}

/// What one connection remembers of the frames it read: content-identified frames (to
/// number their repeats) and the provider's sequence numbers (to detect gaps).
struct Seen {
    occurrences: Occurrences,
    sequences: Sequences,
    /// Where this connection's replies come back once their events are journalled.
    reply_to: mpsc::Sender<String>,
}

/// Replies one connection may have waiting to be sent: room for every event between it and
/// the journal commit, so a reply is dropped only when the connection is gone (or stopped
/// reading its queue). Each is a small frame.
const REPLY_QUEUE: usize = crate::ingest::IN_FLIGHT;

/// What one inbound message means to the session.
enum Frame {
    /// Nothing to act on (protocol ping or pong, a skipped bad frame).
    Skip,
    /// The provider closed the connection; why.
    Closed(String),
    /// The frame's events (one, or a `split` frame's items), stamped and counted, for
    /// ingest, in order.
    Events(Vec<Queued>),
    /// A control frame of the dialect.
    Control(Control),
}

/// Counts and decodes one inbound message (the same way while serving and while draining);
/// a repeat of a content-identified frame gets its occurrence's id ([`Occurrences`]).
fn read_frame(shared: &Shared, seen: &mut Seen, msg: Message) -> Frame {
    let name = &shared.name;
    let text = match &msg {
        Message::Text(t) => Cow::Borrowed(t.as_str()),
        Message::Binary(b) => match wsbridge_adapters::binary_text(
            b,
            shared.adapter.binary_frames(),
            shared.limits.max_frame_bytes,
        ) {
            Ok(t) => Cow::Owned(t),
            Err(e) => {
                shared.counters.frames.fetch_add(1, Ordering::Relaxed);
                shared
                    .counters
                    .decode_errors
                    .fetch_add(1, Ordering::Relaxed);
                if e.is_too_large() {
                    shared
                        .counters
                        .inflate_refused
                        .fetch_add(1, Ordering::Relaxed);
                }
                warn!(upstream = %name, bytes = b.len(), error = %e, "skipping binary frame");
                return Frame::Skip;
            }
        },
        Message::Close(frame) => {
            return Frame::Closed(frame.as_ref().map_or_else(
                || "close frame without a code".to_string(),
                |f| format!("close code {} {:?}", u16::from(f.code), f.reason.as_str()),
            ));
        }
        // Protocol pings are answered by tungstenite itself; both only prove liveness.
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return Frame::Skip,
    };
    shared.counters.frames.fetch_add(1, Ordering::Relaxed);
    let decoded = wsbridge_adapters::check_depth(&text, shared.limits.max_depth).and_then(|()| {
        shared
            .adapter
            .decode_frame(&text, shared.limits.max_split_events)
    });
    match decoded {
        Ok(Decoded::Events(events)) => {
            let now = Utc::now();
            let envelopes = events
                .into_iter()
                .map(|e| stamp(shared, seen, e, now))
                .collect();
            Frame::Events(envelopes)
        }
        Ok(Decoded::Control(control)) => Frame::Control(control),
        Err(e) => {
            shared
                .counters
                .decode_errors
                .fetch_add(1, Ordering::Relaxed);
            warn!(upstream = %name, error = %e, bytes = text.len(), "skipping malformed frame");
            Frame::Skip
        }
    }
}

/// One decoded event as an envelope (with its reply, if any): a repeat of a content-identified event gets its
/// occurrence's id ([`Occurrences`]), a sequence gap is counted and marked, the event counted.
fn stamp(
    shared: &Shared,
    seen: &mut Seen,
    event: FrameEvent,
    now: chrono::DateTime<Utc>,
) -> Queued {
    let FrameEvent {
        event: mut decoded,
        sequence,
        reply,
    } = event;
    if decoded.id_from_content {
        decoded.id = seen.occurrences.id_for(decoded.id, Instant::now());
        let untracked = seen.occurrences.take_evicted();
        if untracked > 0 {
            shared
                .counters
                .untracked
                .fetch_add(untracked, Ordering::Relaxed);
        }
    }
    let mut envelope = Envelope::new(decoded, &shared.source, shared.adapter.provider(), now);
    if let Some(seq) = sequence {
        if let Some(missed) = seen.sequences.observe(&seq.key, seq.number) {
            shared.counters.gaps.fetch_add(1, Ordering::Relaxed);
            warn!(upstream = %shared.name, key = %seq.key, sequence = seq.number, missed,
                "the provider's sequence skipped numbers: events missed");
            envelope.gap = Some(missed);
        }
    }
    shared.counters.count_event(&envelope.event_type);
    shared
        .counters
        .last_event_unix_ms
        .store(now.timestamp_millis(), Ordering::Relaxed);
    Queued {
        envelope,
        reply: reply.map(|frame| Reply {
            frame,
            to: seen.reply_to.clone(),
            dropped: shared.counters.replies_dropped.clone(),
        }),
    }
}

/// Ends a connection without losing what the provider already sent: sends the close frame,
/// then keeps reading (and queueing every event to ingest) until the provider answers the
/// close or ends the stream, for at most the drain grace (`server.shutdown_grace`). Providers
/// do not replay, so an event left unread in the socket would be lost. `pending` are events
/// read before the stop that ingest had no room for yet.
async fn drain(
    shared: &Shared,
    ingest: &mpsc::Sender<Queued>,
    ws: &mut Ws,
    seen: &mut Seen,
    pending: Vec<Queued>,
) -> SessionEnd {
    let name = &shared.name;
    let grace = shared.timing.drain_grace;
    let deadline = Instant::now() + grace;
    shared.set_state(UpstreamState::Draining);
    let mut drained: u64 = 0;
    for envelope in pending {
        if !queue_until(ingest, envelope, deadline).await {
            return drain_cut_short(shared, grace, drained, "ingest queue full or closed");
        }
        drained += 1;
    }
    // The close goes out first: it tells the provider to stop sending, and everything it sent
    // before its answer arrives ahead of that answer.
    let close = CloseFrame {
        code: CloseCode::Normal,
        reason: "client closing".into(),
    };
    match timeout_at(deadline, ws.close(Some(close))).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            // The connection is already gone: nothing more can arrive on it.
            debug!(upstream = %name, error = %e, "close frame not sent");
            return SessionEnd::Shutdown;
        }
        Err(_) => return drain_cut_short(shared, grace, drained, "close frame not sent"),
    }
    debug!(upstream = %name, grace_ms = grace.as_millis() as u64, "close sent; reading what the provider already sent");
    loop {
        let msg = match timeout_at(deadline, ws.next()).await {
            Err(_) => return drain_cut_short(shared, grace, drained, "no close answer"),
            // The stream ended (or failed) after our close: nothing more can arrive.
            Ok(None | Some(Err(_))) => break,
            Ok(Some(Ok(msg))) => msg,
        };
        match read_frame(shared, seen, msg) {
            Frame::Closed(_) => break,
            Frame::Events(envelopes) => {
                for envelope in envelopes {
                    if !queue_until(ingest, envelope, deadline).await {
                        return drain_cut_short(
                            shared,
                            grace,
                            drained,
                            "ingest queue full or closed",
                        );
                    }
                    drained += 1;
                }
            }
            Frame::Skip | Frame::Control(_) => {}
        }
    }
    if drained > 0 {
        info!(upstream = %name, events = drained, "connection closed; events read while closing were queued");
    }
    SessionEnd::Shutdown
}

/// Queues `envelope` to ingest, waiting for room until `deadline`; false when it could not.
async fn queue_until(ingest: &mpsc::Sender<Queued>, envelope: Queued, deadline: Instant) -> bool {
    matches!(
        timeout_at(deadline, ingest.send(envelope)).await,
        Ok(Ok(()))
    )
}

/// A drain that ran out of grace (no close answer in time, or ingest had no room in time):
/// counted and logged, never silent: what the provider sent after this point is lost.
fn drain_cut_short(shared: &Shared, grace: Duration, drained: u64, why: &str) -> SessionEnd {
    shared
        .counters
        .drain_timeouts
        .fetch_add(1, Ordering::Relaxed);
    warn!(upstream = %shared.name, grace_ms = grace.as_millis() as u64, queued = drained, reason = why,
        "closing connection cut off at server.shutdown_grace; \
         what the provider sent after this point was not journalled");
    SessionEnd::Shutdown
}

/// Subscriptions sent whose acknowledgement has not arrived, and until when it may.
struct Acks {
    pending: Vec<String>,
    deadline: Instant,
}

impl Acks {
    /// Whether `text` acknowledges pending subscriptions (then they are no longer pending,
    /// and the frame is consumed).
    fn take(&mut self, shared: &Shared, text: &str) -> bool {
        let acked = shared.adapter.subscribe_acked(text, &self.pending);
        if acked.is_empty() {
            return false;
        }
        let mut i = 0;
        self.pending.retain(|_| {
            i += 1;
            !acked.contains(&(i - 1))
        });
        true
    }
}

/// Sends the adapter's subscribe frames for every configured subscription. When the dialect
/// expects acknowledgements, the upstream stays `connected` and the subscriptions waiting
/// for theirs are returned.
async fn subscribe(shared: &Shared, ws: &mut Ws) -> Result<Option<Acks>, SessionEnd> {
    let subs = shared.adapter.subscriptions();
    for frame in shared.adapter.subscribe_frames(subs) {
        ws.send(Message::text(frame))
            .await
            .map_err(|e| SessionEnd::Transport(format!("subscribe not sent: {e}")))?;
    }
    if let Some(limit) = shared.adapter.ack_timeout() {
        if !subs.is_empty() {
            debug!(upstream = %shared.name, subscriptions = subs.len(), "subscribed; waiting for acknowledgements");
            return Ok(Some(Acks {
                pending: subs.to_vec(),
                deadline: Instant::now() + limit.min(MAX_WAIT),
            }));
        }
    }
    shared.set_state(UpstreamState::Subscribed);
    if subs.is_empty() {
        debug!(upstream = %shared.name, "connected (nothing to subscribe to)");
    }
    info!(upstream = %shared.name, subscriptions = subs.len(), "upstream subscribed");
    Ok(None)
}
