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

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use serde_json::json;

use super::subscription::{self, FeedControl, FeedEnd, FeedItem, OpenError, Start};
use super::Hub;
use crate::routing::{Filter, FilterConfig};

/// Query parameters of `/v1/events`, each list accepting commas and repeats.
#[derive(Default)]
struct SseQuery {
    token: Option<String>,
    filter: FilterConfig,
    from: Option<String>,
}

fn parse_query(raw: Option<&str>) -> SseQuery {
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
            _ => {}
        }
    }
    q
}

fn bad(status: StatusCode, code: &str, message: String) -> Response {
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
    let last_event_id = headers.get("last-event-id").and_then(|v| v.to_str().ok());
    let start = match (last_event_id, q.from.as_deref()) {
        (Some(id), _) => match id.trim().parse::<u64>() {
            Ok(seq) => Start::Seq(seq.saturating_add(1)),
            Err(_) => {
                return bad(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("Last-Event-ID {id:?} is not a seq"),
                )
            }
        },
        (None, None | Some("latest")) => Start::Latest,
        (None, Some("earliest")) => Start::Earliest,
        (None, Some(s)) => match s.parse::<u64>() {
            Ok(seq) if seq > 0 => Start::Seq(seq),
            _ => {
                return bad(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("from={s:?}: use latest, earliest or a seq"),
                )
            }
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
    tokio::spawn({
        let (feed, slow, stop, hub) = (feed.clone(), slow.clone(), stop.clone(), hub.clone());
        async move {
            tokio::select! {
                _ = slow.cancelled() => {
                    hub.stats
                        .slow_disconnects
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(consumer = %consumer.name, "closing a slow SSE consumer");
                    feed.lock().await.take();
                }
                _ = stop.cancelled() => {}
            }
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
    Sse::new(events)
        .keep_alive(
            KeepAlive::new()
                .interval(Duration::from_secs(15))
                .text("keep-alive"),
        )
        .into_response()
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
}
