//! `GET /v1/events`: the same stream as Server-Sent Events, for consumers that cannot speak
//! WebSocket (README, "Consumers: the unified WebSocket endpoint").
//!
//! Filters are query parameters (`providers`, `types`, `subjects`: comma-separated, repeated
//! keys also accepted) and `from` as in `subscribe`; `Last-Event-ID` resumes after that seq.
//! Each event is `id: <seq>` and one `data:` line with the envelope. A comment every 15 s keeps
//! proxies from closing an idle stream. A consumer too slow to keep up gets a final
//! `event: error` (`slow consumer`) and the stream ends; it reconnects with `Last-Event-ID`.
//! So does one that does not read its replay (see [`super::budget`]). A token that holds
//! `limits.max_connections_per_token` connections already is refused with 429.
//!
//! **Durable** (`?durable=NAME`, README "Durable subscriptions over SSE"): the bridge keeps the
//! cursor, so `Last-Event-ID` is ignored and `from` applies only when the durable is created;
//! `ack_wait`, `max_deliver` and `max_unacked` are query parameters as in the `/v1/ws`
//! subscribe. The stream starts with `event: subscribed`
//! (`{"durable","session","acked","pending"}`), then each event is `id: <seq>` and one `data:`
//! line with the object the WebSocket event frame carries,
//! `{"seq":42,"delivery":1,"event":<envelope>}`: every event, redelivered or not, is a default
//! (`message`) event, so a client listening for messages alone misses none, and the delivery
//! count is there for all. The client acknowledges with `POST /v1/durables/{name}/ack`
//! ([`super::acks`]); an ack `upto` a seq names the stream by the `session` its `subscribed`
//! event gave, and settles only what that stream holds. The stream ends with `event: error`
//! (`unknown_durable: ...`) when the durable is deleted. A refusal of the subscribe is a JSON
//! 4xx/503 with the `/v1/ws` error code.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{stream, StreamExt};
use serde_json::json;

use super::durable::{Delivery, DurableHandle, DurableRequest, Refused};
use super::subscription::{self, FeedControl, FeedEnd, FeedItem, OpenError, Start};
use super::{Consumer, Hub};
use crate::routing::{Filter, FilterConfig};

/// Query parameters of `/v1/events`, each list accepting commas and repeats.
#[derive(Default)]
pub(super) struct SseQuery {
    pub(super) token: Option<String>,
    filter: FilterConfig,
    from: Option<String>,
    /// A durable subscription's name (absent: a plain stream).
    durable: Option<String>,
    ack_wait: Option<String>,
    max_deliver: Option<String>,
    max_unacked: Option<String>,
}

pub(super) fn parse_query(raw: Option<&str>) -> SseQuery {
    let mut q = SseQuery::default();
    for (k, v) in url::form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        let list = |v: &str| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect::<Vec<_>>()
        };
        match k.as_ref() {
            "token" => q.token = Some(v.into_owned()),
            "providers" => q.filter.providers.extend(list(&v)),
            "types" => q.filter.types.extend(list(&v)),
            "subjects" => q.filter.subjects.extend(list(&v)),
            "from" => q.from = Some(v.into_owned()),
            "durable" => q.durable = Some(v.into_owned()),
            "ack_wait" => q.ack_wait = Some(v.into_owned()),
            "max_deliver" => q.max_deliver = Some(v.into_owned()),
            "max_unacked" => q.max_unacked = Some(v.into_owned()),
            _ => {}
        }
    }
    q
}

/// A JSON refusal `{"code","message"}` with `status` (the consumer endpoints' error shape).
pub(super) fn bad(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        axum::Json(json!({"code": code, "message": message})),
    )
        .into_response()
}

/// The SSE handler.
pub async fn stream(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let q = parse_query(raw.as_deref());
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
    let filter = match Filter::from_config(&q.filter) {
        Ok(f) => f,
        Err(issues) => {
            let msg = issues
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            return bad(StatusCode::BAD_REQUEST, "bad_pattern", msg);
        }
    };
    if let Some(name) = q.durable.clone() {
        // The bridge keeps a durable's cursor: Last-Event-ID means nothing here.
        return durable_stream(hub, consumer, slot, q, name).await;
    }
    let last_event_id = headers.get("last-event-id").and_then(|v| v.to_str().ok());
    let start = match last_event_id {
        Some(id) => match id.trim().parse::<u64>() {
            Ok(seq) => Start::Seq(seq.saturating_add(1)),
            Err(_) => {
                return bad(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("Last-Event-ID {id:?} is not a seq"),
                )
            }
        },
        None => match parse_from(q.from.as_deref()) {
            Ok(start) => start,
            Err(m) => return bad(StatusCode::BAD_REQUEST, "bad_request", m),
        },
    };
    let budget = hub.replay.connection();
    let control = FeedControl {
        stop: tokio_util::sync::CancellationToken::new(),
        slow: tokio_util::sync::CancellationToken::new(),
        budget: budget.clone(),
    };
    let stop = control.stop.clone();
    let slow = control.slow.clone();
    let feed = match subscription::open(&hub, filter, consumer.allow.clone(), start, None, control)
        .await
    {
        Ok(feed) => feed,
        Err(OpenError::Position(e)) => {
            return bad(
                StatusCode::CONFLICT,
                "unrecoverable_position",
                e.to_string(),
            )
        }
        Err(OpenError::Store(e)) => return bad(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e),
    };
    let guard = hub.session();
    let revoked = consumer.revoked.clone();
    // A consumer that stopped reading is not polled any more, so the stream cannot act on a
    // slow verdict: a watcher counts it and drops the queued events (and the replay budget
    // they hold) at once; the stream ends with the verdict when it is next polled.
    let feed = Arc::new(tokio::sync::Mutex::new(Some(feed)));
    watch_slow(&hub, &consumer, &slow, &stop, {
        let feed = feed.clone();
        || async move {
            feed.lock().await.take();
        }
    });
    let alive = Alive {
        _guard: guard,
        _slot: slot,
        _stop: stop.drop_guard(),
        revoked,
        slow,
        budget,
    };
    let state = (feed, Some(alive), hub.clone());
    let events = stream::unfold(state, |(feed, alive, hub)| async move {
        // `alive` holds the session guard and stops the replay task when the stream is dropped.
        let alive = alive?;
        let next = tokio::select! {
            // Queued events first: a slow verdict comes after what was already queued.
            biased;
            item = async {
                match feed.lock().await.as_mut() {
                    Some(feed) => feed.next().await,
                    // Dropped by the slow-consumer watcher.
                    None => Some(FeedItem::End(FeedEnd::SlowConsumer)),
                }
            } => item,
            // The feed found this consumer too slow (its queue may have had no room for
            // the verdict).
            _ = alive.slow.cancelled() => Some(FeedItem::End(FeedEnd::SlowConsumer)),
            // Shutting down: end the stream so the server can finish.
            _ = hub.shutdown.cancelled() => None,
            // A reload removed or changed this consumer: say so, then end the stream (the
            // same rule as /v1/ws, which closes with 1008).
            _ = alive.revoked.cancelled() => {
                return Some((
                    Ok(Event::default().event("error").data("consumer configuration changed")),
                    (feed, None, hub),
                ));
            }
        };
        match next {
            Some(item @ (FeedItem::Event(_) | FeedItem::Replayed(_))) => {
                let (seq, text) = item.event_text()?;
                // Ends as the event is handed to the response stream.
                let _span = hub.trace_send("sse", seq, text);
                hub.stats
                    .frames_sent
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let event = Event::default().id(seq.to_string()).data(text);
                // The server asked for this event: the consumer reads. A replayed event's
                // budget is given back as `item` drops here.
                alive.budget.written();
                Some((Ok::<_, Infallible>(event), (feed, Some(alive), hub)))
            }
            Some(FeedItem::Unreadable { seq, reason }) => {
                // Told, not skipped: `id` moves the consumer's Last-Event-ID past it, and the
                // stream goes on.
                let data = json!({"code": "unreadable_event", "seq": seq, "message": reason});
                let event = Event::default()
                    .id(seq.to_string())
                    .event("unreadable_event")
                    .data(data.to_string());
                Some((Ok(event), (feed, Some(alive), hub)))
            }
            Some(FeedItem::End(end)) => {
                let message = match end {
                    // Counted by the watcher.
                    FeedEnd::SlowConsumer => "slow consumer".to_string(),
                    FeedEnd::Store(e) => format!("store unavailable: {e}"),
                    FeedEnd::Unrecoverable(e) => format!("unrecoverable_position: {e}"),
                };
                Some((
                    Ok(Event::default().event("error").data(message)),
                    (feed, None, hub),
                ))
            }
            None => None,
        }
    });
    respond(events)
}

/// The SSE response over `events`, with a `: keep-alive` comment every 15 s so that proxies
/// do not close an idle stream.
fn respond<S>(events: S) -> Response
where
    S: futures_util::Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    Sse::new(events)
        .keep_alive(
            KeepAlive::new()
                .interval(Duration::from_secs(15))
                .text("keep-alive"),
        )
        .into_response()
}

/// Counts and logs a slow-consumer verdict on `slow` as soon as it comes, then runs `then`
/// (a consumer that stopped reading is not polled, so its stream cannot act on it); ends
/// with `stop`, cancelled when the stream is dropped.
fn watch_slow<F, Fut>(
    hub: &Arc<Hub>,
    consumer: &Arc<Consumer>,
    slow: &tokio_util::sync::CancellationToken,
    stop: &tokio_util::sync::CancellationToken,
    then: F,
) where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let (hub, consumer, slow, stop) = (hub.clone(), consumer.clone(), slow.clone(), stop.clone());
    tokio::spawn(async move {
        tokio::select! {
            _ = slow.cancelled() => {
                hub.stats
                    .slow_disconnects
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(consumer = %consumer.name, "closing a slow SSE consumer");
                then().await;
            }
            _ = stop.cancelled() => {}
        }
    });
}

/// `from` as a query parameter: absent or `latest`, `earliest`, or a positive seq; otherwise
/// what is wrong (a `bad_request`).
fn parse_from(from: Option<&str>) -> Result<Start, String> {
    match from {
        None | Some("latest") => Ok(Start::Latest),
        Some("earliest") => Ok(Start::Earliest),
        Some(s) => match s.parse::<u64>() {
            Ok(seq) if seq > 0 => Ok(Start::Seq(seq)),
            _ => Err(format!("from={s:?}: use latest, earliest or a seq")),
        },
    }
}

/// A number query parameter, or what is wrong with it.
fn parse_number<T: std::str::FromStr>(what: &str, v: Option<&str>) -> Result<Option<T>, String> {
    v.map(|t| {
        t.trim()
            .parse::<T>()
            .map_err(|_| format!("{what}={t:?} is not a number"))
    })
    .transpose()
}

/// `ack_wait` as a query parameter: a duration like `30s` or `250ms`, or a number of
/// milliseconds (as on `/v1/ws`); otherwise what is wrong.
fn parse_ack_wait(v: Option<&str>) -> Result<Option<Duration>, String> {
    v.map(|t| {
        let t = t.trim();
        t.parse::<u64>()
            .map(Duration::from_millis)
            .or_else(|_| humantime::parse_duration(t))
            .map_err(|_| format!("ack_wait={t:?}: a duration like \"30s\" or milliseconds"))
    })
    .transpose()
}

/// The answer to a refused durable subscribe: its `/v1/ws` error code with a status that
/// says what to do (each code spelled out, so `tests/it/asyncapi` finds what is sent).
fn refusal(r: Refused) -> Response {
    let m = r.message;
    match r.code {
        "durable_mismatch" => bad(StatusCode::CONFLICT, "durable_mismatch", m),
        "unrecoverable_position" => bad(StatusCode::CONFLICT, "unrecoverable_position", m),
        "too_many_durables" => bad(StatusCode::TOO_MANY_REQUESTS, "too_many_durables", m),
        "unavailable" => bad(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m),
        "bad_pattern" => bad(StatusCode::BAD_REQUEST, "bad_pattern", m),
        _ => bad(StatusCode::BAD_REQUEST, "bad_request", m),
    }
}

/// The durable subscription's request from the query, or what is wrong (a `bad_request`).
fn durable_request(q: &SseQuery, name: String) -> Result<DurableRequest, String> {
    let start = match q.from.as_deref() {
        None => None,
        from => Some(parse_from(from)?),
    };
    Ok(DurableRequest {
        name,
        start,
        ack_wait: parse_ack_wait(q.ack_wait.as_deref())?,
        max_deliver: parse_number("max_deliver", q.max_deliver.as_deref())?,
        max_unacked: parse_number("max_unacked", q.max_unacked.as_deref())?,
    })
}

/// `data` of a durable event: `{"seq":<seq>,"delivery":<n>,"event":<envelope>}` around the
/// journal's serialised envelope (the members of the `/v1/ws` event frame).
fn durable_data(seq: u64, delivery: u32, envelope: &str) -> String {
    use std::fmt::Write as _;
    let mut data = String::with_capacity(envelope.len() + 48);
    // Writing into a String cannot fail.
    let _ = write!(data, r#"{{"seq":{seq},"delivery":{delivery},"event":"#);
    data.push_str(envelope);
    data.push('}');
    data
}

/// `GET /v1/events?durable=NAME`: attaches this stream to the durable (see the module doc).
async fn durable_stream(
    hub: Arc<Hub>,
    consumer: Arc<Consumer>,
    slot: super::ConnectionSlot,
    q: SseQuery,
    name: String,
) -> Response {
    let req = match durable_request(&q, name) {
        Ok(req) => req,
        Err(m) => return bad(StatusCode::BAD_REQUEST, "bad_request", m),
    };
    let slow = tokio_util::sync::CancellationToken::new();
    let sub = match hub
        .durables
        .subscribe(&hub, &consumer, &q.filter, &req, &slow)
        .await
    {
        Ok(sub) => sub,
        Err(r) => return refusal(r),
    };
    tracing::debug!(consumer = %consumer.name, durable = %req.name, "durable SSE stream attached");
    let guard = hub.session();
    let session = guard.id;
    let handle = Arc::new(sub.handle);
    hub.sse_durable.insert(session, &consumer.name, &handle);
    let subscribed = Event::default().event("subscribed").data(
        json!({"durable": req.name, "session": format!("s{session}"), "acked": sub.acked, "pending": sub.pending})
            .to_string(),
    );
    // The durable detaches a connection that cannot take its events (and gives them to the
    // others); a watcher counts that at once, even while the stream is not polled.
    let stop = tokio_util::sync::CancellationToken::new();
    watch_slow(&hub, &consumer, &slow, &stop, || async {});
    let state = DurableAlive {
        events: sub.events,
        handle,
        session,
        _guard: guard,
        _slot: slot,
        _stop: stop.drop_guard(),
        revoked: consumer.revoked.clone(),
        slow,
        hub,
    };
    let events = stream::unfold(Some(state), |alive| async move {
        // Dropping `alive` (the end of the stream, or the client gone) detaches the
        // connection: what it holds unacknowledged goes to another one at once.
        let mut alive = alive?;
        let end = |message: &str| Some((Ok(Event::default().event("error").data(message)), None));
        tokio::select! {
            biased;
            // The verdict first: the durable has detached this stream already, and what it
            // still has queued went to the other connections.
            _ = alive.slow.cancelled() => end("slow consumer"),
            d = alive.events.recv() => match d {
                Some(d) => {
                    let event = alive.event(&d);
                    Some((Ok::<_, Infallible>(event), Some(alive)))
                }
                None => match alive.handle.lost() {
                    Some(_) => end("unavailable: this bridge instance lost the durable's lease; subscribe again"),
                    None => end("unknown_durable: the durable was deleted"),
                },
            },
            _ = alive.hub.shutdown.cancelled() => None,
            _ = alive.revoked.cancelled() => end("consumer configuration changed"),
        }
    });
    let events = stream::once(async move { Ok(subscribed) }).chain(events);
    respond(events)
}

/// What lives as long as a durable stream: its events, its hold on the durable (detached when
/// dropped), the session count, the connection's place and what ends the stream.
struct DurableAlive {
    events: tokio::sync::mpsc::Receiver<Delivery>,
    handle: Arc<DurableHandle>,
    /// Its session number, under which [`DurableStreams`] knows it.
    session: u64,
    _guard: super::SessionGuard,
    _slot: super::ConnectionSlot,
    _stop: tokio_util::sync::DropGuard,
    revoked: tokio_util::sync::CancellationToken,
    slow: tokio_util::sync::CancellationToken,
    hub: Arc<Hub>,
}

impl Drop for DurableAlive {
    fn drop(&mut self) {
        self.hub.sse_durable.remove(self.session);
    }
}

/// The open durable SSE streams by session number, each with its consumer's name.
type StreamMap = std::collections::HashMap<u64, (Arc<str>, std::sync::Weak<DurableHandle>)>;

/// The open durable SSE streams: an ack `upto` a seq names its stream (`session`, from its
/// `subscribed` event) and settles only what that stream holds, never another worker's
/// events. One entry per open stream (removed when it ends), so bounded by the connections.
#[derive(Default)]
pub struct DurableStreams(std::sync::Mutex<StreamMap>);

impl DurableStreams {
    fn lock(&self) -> std::sync::MutexGuard<'_, StreamMap> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn insert(&self, session: u64, consumer: &Arc<str>, handle: &Arc<DurableHandle>) {
        self.lock()
            .insert(session, (consumer.clone(), Arc::downgrade(handle)));
    }

    fn remove(&self, session: u64) {
        self.lock().remove(&session);
    }

    /// The stream `session` ("s12") if it is open, of `consumer`, on the durable `name`.
    pub(super) fn get(
        &self,
        session: &str,
        consumer: &str,
        name: &str,
    ) -> Option<Arc<DurableHandle>> {
        let n: u64 = session.strip_prefix('s')?.parse().ok()?;
        let (owner, handle) = self.lock().get(&n).cloned()?;
        let handle = handle.upgrade()?;
        (&*owner == consumer && handle.name() == name).then_some(handle)
    }
}

impl DurableAlive {
    /// The SSE event of one delivery, traced and counted.
    fn event(&self, d: &Delivery) -> Event {
        let text = std::str::from_utf8(&d.bytes).unwrap_or("null");
        // Ends as the event is handed to the response stream.
        let _span = self.hub.trace_send("sse", d.seq, text);
        self.hub
            .stats
            .frames_sent
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Event::default()
            .id(d.seq.to_string())
            .data(durable_data(d.seq, d.delivery, text))
    }
}

/// What lives as long as the stream: the session count, the connection's place, the replay task
/// (stopped when dropped) and what ends the stream.
struct Alive {
    _guard: super::SessionGuard,
    _slot: super::ConnectionSlot,
    _stop: tokio_util::sync::DropGuard,
    revoked: tokio_util::sync::CancellationToken,
    slow: tokio_util::sync::CancellationToken,
    budget: Arc<super::budget::ConnectionBudget>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_lists_accept_commas_and_repeats() {
        let q = parse_query(Some("providers=voipbin,hashi&types=voipbin.call.*&types=hashi.lobby.*&from=earliest&token=t"));
        assert_eq!(q.filter.providers, vec!["voipbin", "hashi"]);
        assert_eq!(q.filter.types, vec!["voipbin.call.*", "hashi.lobby.*"]);
        assert_eq!(q.from.as_deref(), Some("earliest"));
        assert_eq!(q.token.as_deref(), Some("t"));
    }

    #[test]
    fn durable_parameters_parse_as_the_subscribe_members() {
        let q = parse_query(Some(
            "durable=billing&ack_wait=250ms&max_deliver=3&max_unacked=16&from=earliest",
        ));
        let req = durable_request(&q, "billing".into()).expect("valid");
        assert_eq!(req.start, Some(Start::Earliest));
        assert_eq!(req.ack_wait, Some(Duration::from_millis(250)));
        assert_eq!((req.max_deliver, req.max_unacked), (Some(3), Some(16)));
        // Milliseconds as a bare number, as on /v1/ws; no `from`: the durable's own cursor.
        let q = parse_query(Some("durable=b&ack_wait=1500"));
        let req = durable_request(&q, "b".into()).expect("valid");
        assert_eq!(
            (req.start, req.ack_wait),
            (None, Some(Duration::from_millis(1500)))
        );
        for bad in ["ack_wait=soon", "max_deliver=-1", "max_unacked=x", "from=0"] {
            let q = parse_query(Some(bad));
            assert!(durable_request(&q, "b".into()).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_durable_event_carries_seq_delivery_and_the_envelope() {
        let data = durable_data(42, 2, r#"{"id":"e1","seq":42}"#);
        let v: serde_json::Value = serde_json::from_str(&data).expect("JSON");
        assert_eq!(
            v,
            json!({"seq": 42, "delivery": 2, "event": {"id": "e1", "seq": 42}})
        );
    }
}
