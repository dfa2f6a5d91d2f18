//! `GET /v1/ws`: the unified WebSocket endpoint (the protocol: README, "Consumers: the unified
//! WebSocket endpoint").
//!
//! One task per connection owns the socket. It reads client ops, and it writes whatever the
//! connection's subscriptions produce: each `subscribe` opens a [`Feed`] (see
//! [`super::subscription`]) that this task reads, live events straight from the shared ring,
//! so the socket's write side is the only place a frame is built
//! (`{"op":"event",...,"event":<envelope bytes>}`, the envelope bytes as the journal
//! serialised them, copied once into the frame).
//!
//! Bad client input never ends the connection: invalid JSON, an unknown op, a bad pattern or
//! a duplicate subscription id get an `error` frame and the connection stays open. A
//! subscription whose consumer cannot keep up (or does not read its replay) closes the
//! connection with 4001 `slow consumer`; the consumer resumes with `from: last seq + 1`.
//!
//! A subscription id can be reused after `unsubscribe`: every subscription carries a
//! generation number, and whatever the old feed had ready is dropped unsent (the feed with
//! it), never written under the new subscription.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{FuturesUnordered, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::budget::ConnectionBudget;
use super::durable::{self, Delivery, DurableHandle, DurableRequest};
use super::subscription::{self, Feed, FeedControl, FeedEnd, FeedItem, OpenError, Start};
use super::{ConnectionSlot, Consumer, Hub};
use crate::routing::{Filter, FilterConfig};

/// Close code for a consumer that cannot keep up: part of the consumer protocol, so clients can
/// tell "resume from your cursor" from other closes (README, "Consumers: the unified WebSocket
/// endpoint").
pub const CLOSE_SLOW_CONSUMER: u16 = 4001;
/// How long a slow consumer's close frame may wait behind its unread backlog.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);
/// Subscriptions one connection may hold (each has a feed; a replaying one a task and a
/// bounded queue).
const MAX_SUBSCRIPTIONS: usize = 64;
/// Largest client frame accepted (client ops are small JSON).
const MAX_CLIENT_FRAME: usize = 64 * 1024;
/// Bytes buffered before a write goes to the socket.
const WRITE_BUFFER: usize = 4 * 1024;

/// The write buffer's cap for event frames of up to `max_event_frame` bytes: tungstenite
/// refuses a frame that would take its buffer past the cap, and before each frame the buffer
/// holds at most [`WRITE_BUFFER`] bytes (a blocked write is flushed whole first), so the cap
/// is that plus one frame and its header.
fn max_write_buffer(max_event_frame: usize) -> usize {
    const FRAME_HEADER: usize = 14;
    WRITE_BUFFER
        .saturating_add(max_event_frame)
        .saturating_add(FRAME_HEADER)
}

/// `?token=` on the upgrade request.
#[derive(Deserialize)]
pub struct TokenQuery {
    token: Option<String>,
}

/// The upgrade handler: authenticates before upgrading (401 otherwise) and refuses a token
/// that holds `limits.max_connections_per_token` connections already (429).
pub async fn upgrade(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(consumer) = hub.authenticate(&headers, q.token.as_deref()) else {
        return (
            StatusCode::UNAUTHORIZED,
            "unknown or missing consumer token\n",
        )
            .into_response();
    };
    let Some(slot) = hub.admit(&consumer) else {
        return hub.too_many_connections();
    };
    // Client frames are small ops, so a 1 KiB read chunk is plenty (a larger frame just
    // takes several reads); it is allocated for every connection for its whole life, and at
    // 4 KiB it was the largest single cost of an idle consumer (issue 8 memory profile).
    // The write buffer's cap must hold the largest event frame whole on top of what is
    // buffered below the write threshold, or that event could never be sent (the connection
    // would fail at it, and again at every resume that includes it): it follows
    // `limits.max_event_bytes`. Memory is only taken as frames need it.
    ws.read_buffer_size(1024)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(max_write_buffer(hub.max_event_frame))
        .max_message_size(MAX_CLIENT_FRAME)
        .max_frame_size(MAX_CLIENT_FRAME)
        .on_upgrade(move |socket| session(hub, consumer, slot, socket))
}

/// A client op.
// A parse result that lives for one frame: the size of `Subscribe` costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum ClientOp {
    Subscribe {
        id: Value,
        #[serde(default)]
        filter: FilterConfig,
        #[serde(default)]
        from: Option<Value>,
        #[serde(default)]
        epoch: Option<String>,
        /// A durable subscription's name (absent: a plain one).
        #[serde(default)]
        durable: Option<String>,
        #[serde(default)]
        ack_wait: Option<Value>,
        #[serde(default)]
        max_unacked: Option<usize>,
        #[serde(default)]
        max_deliver: Option<u32>,
    },
    Unsubscribe {
        id: Value,
    },
    Ack {
        id: Value,
        #[serde(default)]
        seqs: Option<Vec<u64>>,
        #[serde(default)]
        upto: Option<u64>,
    },
    Nak {
        id: Value,
        seq: u64,
        #[serde(default)]
        delay: Option<Value>,
    },
    Ping,
}

/// A duration given as `"5s"`/`"250ms"` (humantime) or a number of milliseconds.
fn parse_duration(what: &str, v: &Value) -> Result<std::time::Duration, String> {
    match v {
        Value::Number(n) => n
            .as_u64()
            .map(std::time::Duration::from_millis)
            .ok_or_else(|| format!("{what} must be a duration like \"5s\" or milliseconds")),
        Value::String(t) => humantime::parse_duration(t).map_err(|_| {
            format!("{what} must be a duration like \"5s\" or milliseconds, not {t:?}")
        }),
        _ => Err(format!(
            "{what} must be a duration like \"5s\" or milliseconds"
        )),
    }
}

fn error_frame(code: &str, message: impl Into<String>, id: Option<&Value>) -> String {
    let mut v = json!({"op": "error", "code": code, "message": message.into()});
    if let Some(id) = id {
        v["id"] = id.clone();
    }
    v.to_string()
}

fn parse_start(from: Option<&Value>) -> Result<Start, String> {
    match from {
        None | Some(Value::Null) => Ok(Start::Latest),
        Some(Value::String(s)) if s == "latest" => Ok(Start::Latest),
        Some(Value::String(s)) if s == "earliest" => Ok(Start::Earliest),
        Some(Value::Number(n)) => n
            .as_u64()
            .filter(|s| *s > 0)
            .map(Start::Seq)
            .ok_or_else(|| "from must be a positive seq".into()),
        Some(Value::String(s)) => s
            .parse::<u64>()
            .ok()
            .filter(|s| *s > 0)
            .map(Start::Seq)
            .ok_or_else(|| format!("from must be \"latest\", \"earliest\" or a seq, not {s:?}")),
        Some(other) => Err(format!(
            "from must be \"latest\", \"earliest\" or a seq, not {other}"
        )),
    }
}

/// The subscription key: its id rendered as JSON text, so `"a"` and `1` stay distinct.
fn sub_key(id: &Value) -> String {
    id.to_string()
}

struct Sub {
    /// A durable subscription's hold (acks, naks; detaches when dropped).
    durable: Option<DurableHandle>,
    /// Stops its replay task at once on unsubscribe; `None` for a subscription from `latest`,
    /// which has no replay to stop (a catch-up replay it may start later ends when its feed
    /// is dropped, or with the connection): one token fewer per idle consumer.
    stop: Option<CancellationToken>,
    /// The `subscription` member of its event frames, pre-rendered.
    id_json: Arc<str>,
    /// Which subscription of this id it is: a feed's items are written only while its
    /// generation is the one subscribed under the id.
    generation: u64,
}

/// The subscriptions of one connection, by key, and the generation counter.
#[derive(Default)]
struct Subs {
    by_key: HashMap<String, Sub>,
    generations: u64,
}

impl Subs {
    /// The subscription `key` if it is still generation `generation`.
    fn current(&self, key: &str, generation: u64) -> Option<&Sub> {
        self.by_key.get(key).filter(|s| s.generation == generation)
    }
}

async fn session(
    hub: Arc<Hub>,
    consumer: Arc<Consumer>,
    slot: ConnectionSlot,
    mut socket: WebSocket,
) {
    let guard = hub.session();
    let budget = hub.replay.connection();
    let session_id = format!("s{}", guard.id);
    let allow = consumer.allow.clone();
    info!(consumer = %consumer.name, session = %session_id, "consumer connected");

    let ready = match hub.store.position().await {
        Ok(pos) => {
            // Text at once: a `Value` bound here would live (with its map on the heap) for
            // the whole session.
            json!({"op": "ready", "session": session_id, "consumer": &*consumer.name, "epoch": pos.epoch, "head": pos.head})
                .to_string()
        }
        Err(e) => {
            let _ = socket
                .send(close_frame(1011, &format!("store unavailable: {e}")))
                .await;
            return;
        }
    };
    if socket.send(Message::text(ready)).await.is_err() {
        return;
    }

    let mut subs = Subs::default();
    let slow = CancellationToken::new();
    // Every subscription's feed, tagged with its key; drained round-robin.
    let mut feeds = FuturesUnordered::new();

    // The three ways a session ends, made once: a `cancelled()` future built anew on every
    // loop turn registers with (and leaves) the token's waiter list each time, and every
    // session shares the shutdown token and its consumer's token, so that list's lock was
    // contended on every event frame of every consumer (issue 8 fan-out profile).
    let shutdown = hub.shutdown.clone();
    let shutdown = shutdown.cancelled();
    let revoked = consumer.revoked.clone();
    let revoked = revoked.cancelled();
    let slow_verdict = slow.clone();
    let slow_verdict = slow_verdict.cancelled();
    tokio::pin!(shutdown, revoked, slow_verdict);

    // Sends a reply unless a verdict (slow, shutdown, revoked) comes first: a reply stuck on a
    // consumer that stopped reading must not hide them (the loop then acts on the verdict).
    // Whether the socket is still good.
    macro_rules! send_reply {
        ($msg:expr) => {
            tokio::select! {
                r = socket.send($msg) => r.is_ok(),
                _ = &mut slow_verdict => true,
                _ = &mut shutdown => true,
                _ = &mut revoked => true,
            }
        };
    }

    loop {
        tokio::select! {
            incoming = socket.recv() => {
                let msg = match incoming {
                    None | Some(Err(_)) => break,
                    Some(Ok(m)) => m,
                };
                let text = match msg {
                    Message::Text(t) => t,
                    Message::Binary(_) => {
                        if !send_reply!(Message::text(error_frame("bad_request", "frames are JSON text", None))) {
                            break;
                        }
                        continue;
                    }
                    Message::Close(_) => break,
                    Message::Ping(_) | Message::Pong(_) => continue,
                };
                // Boxed: the op's future (subscribe opens a feed, reads the store) is large and
                // short-lived; inline it would be part of every idle session's task forever.
                let (reply, feed) = Box::pin(apply_op(&hub, &consumer, &allow, text.as_str(), &mut subs, &slow, &budget)).await;
                // The ack goes out before the feed is polled, so `subscribed` precedes the
                // subscription's first event.
                // Acks and naks that worked are not answered (an empty reply).
                if !reply.is_empty() && !send_reply!(Message::text(reply)) {
                    break;
                }
                if let Some((key, generation, source)) = feed {
                    feeds.push(next_of(key, generation, source));
                }
            }
            Some((key, generation, next)) = feeds.next(), if !feeds.is_empty() => {
                // A feed of an unsubscribed subscription (its id possibly reused since): it is
                // dropped with everything it had ready, which also ends its replay task.
                let Some(sub) = subs.current(&key, generation) else {
                    continue;
                };
                let (item, mut feed) = match next {
                    Next::Plain(item, feed) => (item, feed),
                    Next::Durable(Some(first), mut events) => {
                        // Boxed, as the plain write below.
                        let sent = tokio::select! {
                            r = Box::pin(write_durable_events(&mut socket, &sub.id_json, first, &mut events, &hub)) => r,
                            _ = &mut slow_verdict => true,
                        };
                        if !sent {
                            break;
                        }
                        feeds.push(next_of(key, generation, Source::Durable(events)));
                        continue;
                    }
                    Next::Durable(None, _) => {
                        // The durable was deleted (admin API), or this instance lost its lease
                        // (a shared store): this subscription ends.
                        if let Some(sub) = subs.by_key.remove(&key) {
                            let id: Value = serde_json::from_str(&sub.id_json).unwrap_or(Value::Null);
                            let frame = match sub.durable.as_ref().and_then(DurableHandle::lost) {
                                Some(why) => error_frame("unavailable", why, Some(&id)),
                                None => error_frame("unknown_durable", "the durable was deleted", Some(&id)),
                            };
                            if !send_reply!(Message::text(frame)) {
                                break;
                            }
                        }
                        continue;
                    }
                };
                let mut item = item;
                if item.as_ref().and_then(FeedItem::event_text).is_some() {
                    let Some(first) = item.take() else { continue };
                    // A write stuck on a consumer that stopped reading must not hide the
                    // slow-consumer verdict. Boxed: a task's future is as large as its largest
                    // await, so inline the write's state would be part of every idle
                    // session's task (+0.3 KiB per idle consumer, issue 15 memory bench); a
                    // box per batch of frames costs nothing next to the frames.
                    let (sent, rest) = tokio::select! {
                        r = Box::pin(write_events(&mut socket, &sub.id_json, first, &mut feed, &hub, &budget)) => r,
                        _ = &mut slow_verdict => (true, None),
                    };
                    if !sent {
                        break;
                    }
                    item = rest;
                    if item.is_none() {
                        feeds.push(next_of(key, generation, Source::Plain(feed)));
                        continue;
                    }
                }
                match item {
                    Some(FeedItem::Unreadable { seq, reason }) => {
                        // Told, not skipped: the subscription goes on after it.
                        let id: Value = serde_json::from_str(&sub.id_json).unwrap_or(Value::Null);
                        let frame = json!({"op": "error", "code": "unreadable_event", "message": reason, "id": id, "seq": seq});
                        if !send_reply!(Message::text(frame.to_string())) {
                            break;
                        }
                        feeds.push(next_of(key, generation, Source::Plain(feed)));
                    }
                    // The `slow` branch below handles the verdict.
                    Some(FeedItem::End(FeedEnd::SlowConsumer)) => {}
                    Some(FeedItem::End(FeedEnd::Unrecoverable(e))) => {
                        // Only this subscription ends; the connection and its others go on.
                        if let Some(sub) = subs.by_key.remove(&key) {
                            let id: Value = serde_json::from_str(&sub.id_json).unwrap_or(Value::Null);
                            let frame = error_frame("unrecoverable_position", e, Some(&id));
                            if !send_reply!(Message::text(frame)) {
                                break;
                            }
                        }
                    }
                    Some(FeedItem::End(FeedEnd::Store(e))) => {
                        let _ = tokio::time::timeout(CLOSE_GRACE, socket.send(close_frame(1011, &format!("store unavailable: {e}")))).await;
                        break;
                    }
                    // The feed was stopped: nothing more from it.
                    Some(FeedItem::Event(_) | FeedItem::Replayed(_)) | None => {}
                }
            }
            _ = &mut shutdown => {
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), socket.send(close_frame(1001, "server shutting down"))).await;
                break;
            }
            _ = &mut revoked => {
                info!(consumer = %consumer.name, session = %session_id, "consumer removed or changed by a reload; closing");
                close_within_grace(&mut socket, close_frame(1008, "consumer configuration changed")).await;
                break;
            }
            _ = &mut slow_verdict => {
                hub.stats.slow_disconnects.fetch_add(1, Ordering::Relaxed);
                info!(consumer = %consumer.name, session = %session_id, "closing a slow consumer");
                // The close frame queues behind what the consumer has not read yet; give it a
                // while to drain, then drop the connection.
                close_within_grace(&mut socket, close_frame(CLOSE_SLOW_CONSUMER, "slow consumer")).await;
                break;
            }
        }
    }
    for sub in subs.by_key.values() {
        if let Some(stop) = &sub.stop {
            stop.cancel();
        }
    }
    // Stops every replay task of the connection (a subscription from `latest` has no token
    // of its own: its catch-up replays stop on the connection's `slow` token, cancelled here
    // once the session is over, or with a slow-consumer verdict).
    slow.cancel();
    debug!(consumer = %consumer.name, session = %session_id, "consumer disconnected");
    drop(guard);
    drop(slot);
}

/// Sends `close` and reads until the consumer's close answer, all within [`CLOSE_GRACE`].
/// Reading on matters: a socket dropped with unread client frames in its receive buffer
/// (ops sent while the session was stuck writing) is reset, and a reset makes the consumer's
/// side discard what it has not read yet, the close frame with its reason included.
async fn close_within_grace(socket: &mut WebSocket, close: Message) {
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        if socket.send(close).await.is_err() {
            return;
        }
        while let Some(Ok(msg)) = socket.recv().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// Most event frames written per flush (one `write` of the socket's buffer, usually).
const WRITE_BATCH: usize = 64;

/// Writes `first` and whatever else this feed already has queued (up to [`WRITE_BATCH`])
/// with a single flush: one syscall per buffer of frames instead of one per frame, which was
/// the largest cost per consumer in the fan-out benchmark (issue 8). Never waits for more
/// events than are already queued, so latency is unchanged. Returns whether the socket is
/// still good, and an `End` item met while draining (for the caller to act on).
async fn write_events(
    socket: &mut WebSocket,
    sub_id_json: &str,
    first: FeedItem,
    feed: &mut Feed,
    hub: &Hub,
    budget: &ConnectionBudget,
) -> (bool, Option<FeedItem>) {
    use futures_util::SinkExt;
    let mut next = Some(first);
    let mut written = 0u64;
    let mut rest = None;
    while let Some(item) = next.take() {
        let Some((seq, text)) = item.event_text() else {
            rest = Some(item);
            break;
        };
        let span = hub.trace_send("ws", seq, text);
        if socket
            .feed(Message::text(event_frame(sub_id_json, seq, text)))
            .await
            .is_err()
        {
            return (false, None);
        }
        drop(span);
        // A replayed event's budget is given back here, once its frame is in the socket's
        // buffer.
        drop(item);
        written += 1;
        if written as usize >= WRITE_BATCH {
            break;
        }
        next = feed.try_next();
    }
    if socket.flush().await.is_err() {
        return (false, None);
    }
    budget.written();
    hub.stats.frames_sent.fetch_add(written, Ordering::Relaxed);
    (true, rest)
}

/// What a subscription's events come from: its own feed, or its durable's pump.
enum Source {
    Plain(Feed),
    Durable(mpsc::Receiver<Delivery>),
}

/// A subscription's next item, with its source to read on from.
enum Next {
    Plain(Option<FeedItem>, Feed),
    Durable(Option<Delivery>, mpsc::Receiver<Delivery>),
}

async fn next_of(key: String, generation: u64, source: Source) -> (String, u64, Next) {
    let next = match source {
        Source::Plain(mut feed) => Next::Plain(feed.next().await, feed),
        Source::Durable(mut events) => Next::Durable(events.recv().await, events),
    };
    (key, generation, next)
}

/// Writes `first` and what else the durable already handed this connection (up to
/// [`WRITE_BATCH`]) with one flush; whether the socket is still good.
async fn write_durable_events(
    socket: &mut WebSocket,
    sub_id_json: &str,
    first: Delivery,
    events: &mut mpsc::Receiver<Delivery>,
    hub: &Hub,
) -> bool {
    use futures_util::SinkExt;
    let mut next = Some(first);
    let mut written = 0u64;
    while let Some(d) = next.take() {
        let text = std::str::from_utf8(&d.bytes).unwrap_or("null");
        let span = hub.trace_send("ws", d.seq, text);
        let frame = durable_event_frame(sub_id_json, d.seq, d.delivery, text);
        if socket.feed(Message::text(frame)).await.is_err() {
            return false;
        }
        drop(span);
        written += 1;
        if written as usize >= WRITE_BATCH {
            break;
        }
        next = events.try_recv().ok();
    }
    if socket.flush().await.is_err() {
        return false;
    }
    hub.stats.frames_sent.fetch_add(written, Ordering::Relaxed);
    true
}

/// `{"op":"event","subscription":<id>,"seq":<seq>,"delivery":<n>,"event":<envelope>}`.
fn durable_event_frame(sub_id_json: &str, seq: u64, delivery: u32, envelope: &str) -> String {
    let mut frame = String::with_capacity(envelope.len() + sub_id_json.len() + 80);
    frame.push_str(r#"{"op":"event","subscription":"#);
    frame.push_str(sub_id_json);
    // Writing into a String cannot fail.
    let _ = write!(frame, r#","seq":{seq},"delivery":{delivery},"event":"#);
    frame.push_str(envelope);
    frame.push('}');
    frame
}

/// `{"op":"event","subscription":<id>,"seq":<seq>,"event":<envelope>}` around the journal's
/// serialised envelope.
fn event_frame(sub_id_json: &str, seq: u64, envelope: &str) -> String {
    let mut frame = String::with_capacity(envelope.len() + sub_id_json.len() + 64);
    frame.push_str(r#"{"op":"event","subscription":"#);
    frame.push_str(sub_id_json);
    frame.push_str(r#","seq":"#);
    // Writing into a String cannot fail.
    let _ = write!(frame, "{seq}");
    frame.push_str(r#","event":"#);
    frame.push_str(envelope);
    frame.push('}');
    frame
}

/// Parses one client frame into its op, or the `error` frame to answer with.
fn parse_op(text: &str) -> Result<ClientOp, String> {
    let raw: Value = serde_json::from_str(text)
        .map_err(|e| error_frame("bad_request", format!("not JSON: {e}"), None))?;
    serde_json::from_value::<ClientOp>(raw.clone()).map_err(|e| {
        let known = matches!(
            raw.get("op").and_then(Value::as_str),
            Some("subscribe" | "unsubscribe" | "ack" | "nak" | "ping")
        );
        let (code, message) = if known {
            ("bad_request", e.to_string())
        } else {
            (
                "unknown_op",
                format!(
                    "unknown op {}; expected subscribe, unsubscribe, ack, nak or ping",
                    raw.get("op").unwrap_or(&Value::Null)
                ),
            )
        };
        error_frame(code, message, raw.get("id"))
    })
}

/// A subscription id is a string or a number; otherwise the `error` frame to answer with.
fn check_id(id: &Value) -> Result<(), String> {
    if id.is_string() || id.is_number() {
        Ok(())
    } else {
        Err(error_frame(
            "bad_request",
            "id must be a string or a number",
            Some(id),
        ))
    }
}

/// A subscribe op's filter, compiled, and its start position, or the `error` frame to answer
/// with.
fn subscribe_target(
    id: &Value,
    filter: &FilterConfig,
    from: Option<&Value>,
) -> Result<(Filter, Start), String> {
    let filter = Filter::from_config(filter).map_err(|issues| {
        let msg = issues
            .iter()
            .map(|i| format!("filter.{i}"))
            .collect::<Vec<_>>()
            .join("; ");
        error_frame("bad_pattern", msg, Some(id))
    })?;
    let start = parse_start(from).map_err(|msg| error_frame("bad_request", msg, Some(id)))?;
    Ok((filter, start))
}

/// Checks one client frame as a connection does before acting on it, without a connection
/// or a store: parsing, then for `subscribe` its id, filter and start position. `Ok` with the
/// op's name, or `Err` with the `error` frame the client would get. It exists so that the
/// fuzz target `ws_client_ops` (fuzz/) can drive the parser clients reach with any bytes.
pub fn check_client_frame(text: &str) -> Result<&'static str, String> {
    match parse_op(text)? {
        ClientOp::Ping => Ok("ping"),
        ClientOp::Unsubscribe { .. } => Ok("unsubscribe"),
        ClientOp::Ack { .. } => Ok("ack"),
        ClientOp::Nak { .. } => Ok("nak"),
        ClientOp::Subscribe {
            id, filter, from, ..
        } => {
            check_id(&id)?;
            subscribe_target(&id, &filter, from.as_ref())?;
            Ok("subscribe")
        }
    }
}

/// A new subscription's key, generation and event source.
type NewFeed = (String, u64, Source);

/// Applies one client op: the frame to answer with, and the feed of a new subscription.
async fn apply_op(
    hub: &Arc<Hub>,
    consumer: &Consumer,
    allow: &Arc<Filter>,
    text: &str,
    subs: &mut Subs,
    slow: &CancellationToken,
    budget: &Arc<ConnectionBudget>,
) -> (String, Option<NewFeed>) {
    let op = match parse_op(text) {
        Ok(op) => op,
        Err(frame) => return (frame, None),
    };
    match op {
        ClientOp::Ping => (json!({"op": "pong"}).to_string(), None),
        ClientOp::Unsubscribe { id } => match subs.by_key.remove(&sub_key(&id)) {
            Some(sub) => {
                if let Some(stop) = &sub.stop {
                    stop.cancel();
                }
                (json!({"op": "unsubscribed", "id": id}).to_string(), None)
            }
            None => (
                error_frame(
                    "unknown_subscription",
                    "no subscription with this id",
                    Some(&id),
                ),
                None,
            ),
        },
        ClientOp::Ack { id, seqs, upto } => {
            let Some(handle) = durable_of(subs, &id) else {
                return (not_durable(subs, &id), None);
            };
            match (seqs, upto) {
                (Some(seqs), None) => {
                    handle.ack(&seqs);
                }
                (None, Some(upto)) => {
                    handle.ack_upto(upto);
                }
                _ => {
                    return (
                        error_frame("bad_request", "ack takes either seqs or upto", Some(&id)),
                        None,
                    )
                }
            }
            // Acks are not answered: a consumer acking every event would double the traffic.
            (String::new(), None)
        }
        ClientOp::Nak { id, seq, delay } => {
            let Some(handle) = durable_of(subs, &id) else {
                return (not_durable(subs, &id), None);
            };
            let delay = match delay.as_ref().map(|d| parse_duration("delay", d)) {
                None => std::time::Duration::ZERO,
                Some(Ok(d)) if d <= durable::MAX_NAK_DELAY => d,
                Some(Ok(_)) => {
                    return (
                        error_frame("bad_request", "delay must be at most 24h", Some(&id)),
                        None,
                    )
                }
                Some(Err(m)) => return (error_frame("bad_request", m, Some(&id)), None),
            };
            match handle.nak(seq, delay) {
                Ok(()) => (String::new(), None),
                Err(e) => (error_frame("not_acked", e.to_string(), Some(&id)), None),
            }
        }
        ClientOp::Subscribe {
            id,
            filter,
            from,
            epoch,
            durable: Some(name),
            ack_wait,
            max_unacked,
            max_deliver,
        } => {
            let key = match new_key(subs, &id) {
                Ok(key) => key,
                Err(frame) => return (frame, None),
            };
            let start = match from.as_ref().map(|f| parse_start(Some(f))) {
                None => None,
                Some(Ok(s)) => Some(s),
                Some(Err(m)) => return (error_frame("bad_request", m, Some(&id)), None),
            };
            if epoch.is_some() {
                return (
                    error_frame(
                        "bad_request",
                        "a durable subscription takes no epoch: the bridge keeps its cursor",
                        Some(&id),
                    ),
                    None,
                );
            }
            let ack_wait = match ack_wait.as_ref().map(|w| parse_duration("ack_wait", w)) {
                None => None,
                Some(Ok(w)) => Some(w),
                Some(Err(m)) => return (error_frame("bad_request", m, Some(&id)), None),
            };
            let req = DurableRequest {
                name,
                start,
                ack_wait,
                max_deliver,
                max_unacked,
            };
            match hub
                .durables
                .subscribe(hub, consumer, &filter, &req, slow)
                .await
            {
                Ok(sub) => {
                    debug!(consumer = %consumer.name, subscription = %key, durable = %req.name, "durable subscribed");
                    subs.generations += 1;
                    let generation = subs.generations;
                    subs.by_key.insert(
                        key.clone(),
                        Sub {
                            durable: Some(sub.handle),
                            stop: None,
                            id_json: Arc::from(key.as_str()),
                            generation,
                        },
                    );
                    (
                        json!({"op": "subscribed", "id": id, "durable": req.name, "acked": sub.acked, "pending": sub.pending}).to_string(),
                        Some((key, generation, Source::Durable(sub.events))),
                    )
                }
                Err(r) => (error_frame(r.code, r.message, Some(&id)), None),
            }
        }
        ClientOp::Subscribe {
            id,
            filter,
            from,
            epoch,
            ..
        } => {
            let key = match new_key(subs, &id) {
                Ok(key) => key,
                Err(frame) => return (frame, None),
            };
            let (filter, start) = match subscribe_target(&id, &filter, from.as_ref()) {
                Ok(target) => target,
                Err(frame) => return (frame, None),
            };
            let stop = (start != Start::Latest).then(CancellationToken::new);
            let control = FeedControl {
                stop: stop.clone().unwrap_or_else(|| slow.clone()),
                slow: slow.clone(),
                budget: budget.clone(),
            };
            match subscription::open(hub, filter, allow.clone(), start, epoch.as_deref(), control)
                .await
            {
                Ok(feed) => {
                    debug!(consumer = %consumer.name, subscription = %key, ?start, "subscribed");
                    subs.generations += 1;
                    let generation = subs.generations;
                    subs.by_key.insert(
                        key.clone(),
                        Sub {
                            durable: None,
                            stop,
                            id_json: Arc::from(key.as_str()),
                            generation,
                        },
                    );
                    (
                        json!({"op": "subscribed", "id": id}).to_string(),
                        Some((key, generation, Source::Plain(feed))),
                    )
                }
                Err(OpenError::Position(e)) => (
                    error_frame("unrecoverable_position", e.to_string(), Some(&id)),
                    None,
                ),
                Err(OpenError::Store(e)) => (error_frame("unavailable", e, Some(&id)), None),
            }
        }
    }
}

/// The key of a new subscription `id`, or the `error` frame when the id is not a string or a
/// number, is taken, or the connection holds its maximum.
fn new_key(subs: &Subs, id: &Value) -> Result<String, String> {
    check_id(id)?;
    let key = sub_key(id);
    room_for(subs, &key, id)?;
    Ok(key)
}

/// Whether a new subscription `key` may be added: the `error` frame when the connection
/// holds its maximum or the id is taken.
fn room_for(subs: &Subs, key: &str, id: &Value) -> Result<(), String> {
    if subs.by_key.len() >= MAX_SUBSCRIPTIONS {
        return Err(error_frame(
            "too_many_subscriptions",
            format!("at most {MAX_SUBSCRIPTIONS} per connection"),
            Some(id),
        ));
    }
    if subs.by_key.contains_key(key) {
        return Err(error_frame(
            "duplicate_subscription",
            "a subscription with this id exists",
            Some(id),
        ));
    }
    Ok(())
}

/// The durable hold of subscription `id`, if it is a durable one.
fn durable_of<'a>(subs: &'a Subs, id: &Value) -> Option<&'a DurableHandle> {
    subs.by_key.get(&sub_key(id))?.durable.as_ref()
}

/// The error for an ack or nak naming a subscription that is not durable.
fn not_durable(subs: &Subs, id: &Value) -> String {
    if subs.by_key.contains_key(&sub_key(id)) {
        error_frame(
            "unknown_durable",
            "this subscription is not durable: nothing to acknowledge",
            Some(id),
        )
    } else {
        error_frame(
            "unknown_subscription",
            "no subscription with this id",
            Some(id),
        )
    }
}

/// A close frame whose reason fits the protocol's 123-byte limit (a longer one would make the
/// close itself fail), cut at a character boundary.
fn close_frame(code: u16, reason: &str) -> Message {
    const MAX_REASON: usize = 123;
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from(reason[..end].to_string()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_parsing() {
        assert_eq!(parse_start(None), Ok(Start::Latest));
        assert_eq!(parse_start(Some(&json!("earliest"))), Ok(Start::Earliest));
        assert_eq!(parse_start(Some(&json!(42))), Ok(Start::Seq(42)));
        assert_eq!(parse_start(Some(&json!("42"))), Ok(Start::Seq(42)));
        assert!(parse_start(Some(&json!(0))).is_err());
        assert!(parse_start(Some(&json!(-3))).is_err());
        assert!(parse_start(Some(&json!("soon"))).is_err());
    }

    /// The codes and ids of the `error` frames a client gets for each kind of bad frame.
    #[test]
    fn client_frames_are_checked_as_a_connection_does() {
        let code = |text: &str| -> (String, Value) {
            let frame: Value =
                serde_json::from_str(&check_client_frame(text).expect_err(text)).expect("JSON");
            assert_eq!(frame["op"], "error", "{frame}");
            (
                frame["code"].as_str().unwrap_or("").to_string(),
                frame["id"].clone(),
            )
        };
        assert_eq!(check_client_frame(r#"{"op":"ping"}"#), Ok("ping"));
        assert_eq!(
            check_client_frame(r#"{"op":"unsubscribe","id":"a"}"#),
            Ok("unsubscribe")
        );
        assert_eq!(
            check_client_frame(
                r#"{"op":"subscribe","id":1,"from":"earliest","filter":{"types":["call.*"]}}"#
            ),
            Ok("subscribe")
        );
        assert_eq!(code("{").0, "bad_request");
        assert_eq!(
            code(r#"{"op":"dance","id":"x"}"#),
            ("unknown_op".into(), json!("x"))
        );
        assert_eq!(code(r#"{"op":"unsubscribe"}"#).0, "bad_request");
        assert_eq!(
            code(r#"{"op":"subscribe","id":[1]}"#),
            ("bad_request".into(), json!([1]))
        );
        assert_eq!(
            code(r#"{"op":"subscribe","id":"p","filter":{"types":["a.**.b"]}}"#),
            ("bad_pattern".into(), json!("p"))
        );
        assert_eq!(
            code(r#"{"op":"subscribe","id":"s","from":0}"#),
            ("bad_request".into(), json!("s"))
        );
    }
}
