//! One attempt at a delivery: the request built (structured or binary mode), signed just
//! before it is sent, sent, and its answer (or why none came) classified by
//! [`super::outcome`], recorded through the endpoint's queue (which answers the held
//! delivery) and reported to the dispatcher.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::config::Mode;
use super::dispatcher::Finished;
use super::outcome::{classify, jitter, Attempt, Outcome, Response, MAX_RETRY_AFTER};
use super::service::Endpoint;
use super::signing::{HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP};
use super::ssrf;
use crate::envelope::{StoredEnvelope, CLOUDEVENTS_JSON};
use crate::failure::{Failure, Reason};
use crate::storage::{AttemptRecord, DeliveryQueue, DueDelivery, HeldDelivery, NextStep};
use crate::supervise::deadline_after;
use crate::traces::{traceparent, EventTrace, Span as _};
use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;

/// Frees an attempt's in-flight slot however the attempt ends: a panicking attempt that never
/// told its dispatcher held the slot for good. The delivery stays pending (its outcome was
/// not recorded; its dropped handle releases it) and the endpoint pauses a second, so a
/// delivery that always panics is not retried in a hot loop.
struct SlotGuard {
    webhook: Arc<str>,
    seq: u64,
    done: Option<mpsc::Sender<Finished>>,
    /// The dispatcher was told the request was answered (the slot is free; the outcome is
    /// being recorded).
    answered: bool,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            if std::thread::panicking() {
                error!(webhook = %self.webhook, seq = self.seq, "delivery attempt panicked; the delivery stays pending");
            }
            let mut last = Finished::recorded();
            if !self.answered {
                last.frees_slot = true;
                last.pause_until = Some(deadline_after(Duration::from_secs(1)));
            }
            let _ = done.try_send(last);
        }
    }
}

/// Sends one delivery, records the outcome (answering the held delivery), tells the
/// dispatcher.
pub(super) async fn attempt(
    endpoint: Arc<Endpoint>,
    queue: Arc<dyn DeliveryQueue>,
    due: HeldDelivery,
    done: mpsc::Sender<Finished>,
) {
    let mut guard = SlotGuard {
        webhook: endpoint.name.clone(),
        seq: due.seq,
        done: Some(done),
        answered: false,
    };
    let name = &endpoint.name;
    let started_ms = Utc::now().timestamp_millis();
    // Boxed: held across the request, so it is part of every attempt's state.
    let mut span = endpoint.traces.as_ref().and_then(|t| {
        let ids = EventTrace::of_json(&due.bytes)?;
        Some(Box::new(t.stage(
            &ids,
            "wsbridge.webhook.attempt",
            SpanKind::Client,
            vec![
                KeyValue::new("wsbridge.webhook", name.to_string()),
                KeyValue::new("wsbridge.seq", i64::try_from(due.seq).unwrap_or(i64::MAX)),
                KeyValue::new("wsbridge.attempt", i64::from(due.attempts) + 1),
            ],
        )))
    });
    let parent = span.as_ref().map(|s| traceparent(s.span_context()));
    let t0 = Instant::now();
    let result = send(&endpoint, &due, parent.as_deref()).await;
    let elapsed = t0.elapsed();
    endpoint.latency.observe(elapsed.as_secs_f64());
    let duration_ms = elapsed.as_millis() as u64;
    let attempts_after = due.attempts.saturating_add(1);
    let Outcome {
        status,
        failure,
        next,
        pause,
        gone,
    } = classify(
        result,
        &Attempt {
            schedule: &endpoint.config.retry,
            attempts_before: due.attempts,
            started_ms,
            elapsed,
            now_ms: Utc::now().timestamp_millis(),
        },
        jitter,
    );
    let finished = Finished {
        frees_slot: true,
        pause_until: pause.map(deadline_after),
        gone,
    };
    if let Some(f) = &failure {
        endpoint.failures.count(f.reason);
    }
    endpoint.set_last_failure(failure.clone().map(|f| (f, started_ms)));
    if let Some(span) = &mut span {
        if let Some(code) = status {
            span.set_attribute(KeyValue::new("http.response.status_code", i64::from(code)));
        }
        if let Some(f) = &failure {
            span.set_status(opentelemetry::trace::Status::error(f.reason.to_string()));
        }
        span.end();
    }
    // Recorded and shown as `reason: message`, so the admin API's attempt list says why.
    let error = failure.map(|f| format!("{}: {}", f.reason, f.message));
    match next {
        NextStep::Delivered => {
            endpoint.stats.delivered.fetch_add(1, Ordering::Relaxed);
            debug!(webhook = %name, seq = due.seq, id = %due.id, duration_ms, "delivered");
        }
        NextStep::Dead => {
            endpoint
                .stats
                .failed_attempts
                .fetch_add(1, Ordering::Relaxed);
            endpoint.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            warn!(webhook = %name, seq = due.seq, id = %due.id, attempts = attempts_after, error = error.as_deref().unwrap_or(""), "delivery dead-lettered");
        }
        NextStep::HoldUntil(_) => {
            endpoint
                .stats
                .failed_attempts
                .fetch_add(1, Ordering::Relaxed);
            info!(webhook = %name, seq = due.seq, id = %due.id, "endpoint answered 410 Gone; the delivery waits until it is re-enabled");
        }
        NextStep::RetryAt(at) => {
            endpoint
                .stats
                .failed_attempts
                .fetch_add(1, Ordering::Relaxed);
            info!(webhook = %name, seq = due.seq, id = %due.id, attempt = attempts_after,
                error = error.as_deref().unwrap_or(""), retry_in_ms = at.saturating_sub(Utc::now().timestamp_millis()), "delivery failed; will retry");
        }
    }
    let record = AttemptRecord {
        at_ms: started_ms,
        status,
        error,
        duration_ms,
    };
    // The slot is free once the receiver answered: the dispatcher starts the next delivery
    // while this outcome is being recorded, and the queue holds this one until it is
    // (recording waits for the journal's writer, which ingest's commits share).
    if let Some(done) = &guard.done {
        let _ = done.send(finished).await;
        guard.answered = true;
    }
    let seq = due.seq;
    if let Err(e) = queue.record(due, record, next).await {
        // The delivery stays pending and is attempted again: at-least-once holds.
        error!(webhook = %name, seq, error = %e, "cannot record the attempt");
    }
    if let Some(done) = guard.done.take() {
        let _ = done.send(Finished::recorded()).await;
    }
}

/// Builds, signs and sends the request; `Err` is a failure without a response.
/// `traceparent`: the attempt's span, sent so that the receiver can join the trace.
///
/// The request is built directly rather than through reqwest's builder: the builder parses
/// every header name given as text (allocating the custom ones) and merges a header map
/// entry by entry, per request (the webhook profile, issue 15).
async fn send(
    endpoint: &Endpoint,
    due: &DueDelivery,
    traceparent: Option<&str>,
) -> Result<Response, Failure> {
    use reqwest::header::{HeaderName, HeaderValue, CONTENT_TYPE};
    let config = &endpoint.config;
    let mut request = reqwest::Request::new(reqwest::Method::POST, config.url.clone());
    let headers = request.headers_mut();
    *headers = endpoint.static_headers.clone();
    // A value the journal holds that HTTP cannot carry fails the attempt, recorded as such.
    let unsendable = |what: &str| {
        Failure::new(
            Reason::Other,
            format!("the {what} cannot be sent as an HTTP header value"),
        )
    };
    if let Some(value) = traceparent {
        headers.insert(
            HeaderName::from_static("traceparent"),
            HeaderValue::from_str(value).map_err(|_| unsendable("traceparent"))?,
        );
    }
    let body: Bytes = match config.mode {
        Mode::Structured => {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(CLOUDEVENTS_JSON));
            due.bytes.clone()
        }
        Mode::Binary => {
            // Read without the depth limit of a full parse: `data` is sent as journalled.
            let envelope = StoredEnvelope::parse(&due.bytes).map_err(|e| {
                error!(endpoint = %endpoint.name, seq = due.seq, event_id = %due.id, error = %e,
                    "journalled envelope unreadable; the attempt fails and is recorded");
                Failure::new(
                    Reason::Other,
                    format!("journalled envelope unreadable: {e}"),
                )
            })?;
            let mut ce = |name: &'static str, value: &str| {
                // `ce_header` leaves only printable ASCII: always a valid value.
                if let Ok(v) = HeaderValue::try_from(ce_header(value)) {
                    headers.insert(HeaderName::from_static(name), v);
                }
            };
            ce("ce-specversion", &envelope.specversion);
            ce("ce-id", &envelope.id);
            ce("ce-source", &envelope.source);
            ce("ce-type", &envelope.event_type);
            ce("ce-time", &envelope.time);
            ce("ce-provider", &envelope.provider);
            ce("ce-recvtime", &envelope.recvtime);
            if let Some(subject) = &envelope.subject {
                ce("ce-subject", subject);
            }
            if let Some(seq) = envelope.seq {
                ce("ce-seq", &seq.to_string());
            }
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_str(envelope.datacontenttype.as_str())
                    .map_err(|_| unsendable("datacontenttype"))?,
            );
            // `data` exactly as journalled: serde_json wrote it compactly from the payload, so
            // this is the payload's own serialisation (parsing it into a tree and writing it
            // again could even change a float's last digit).
            Bytes::copy_from_slice(envelope.data.get().as_bytes())
        }
    };
    // Signed just before sending: receivers reject timestamps older than a few minutes.
    let timestamp = Utc::now().timestamp();
    let signature = endpoint.signer.sign(&due.id, timestamp, &body);
    headers.insert(
        HeaderName::from_static(HEADER_ID),
        HeaderValue::from_str(&due.id).map_err(|_| unsendable("event id"))?,
    );
    headers.insert(
        HeaderName::from_static(HEADER_TIMESTAMP),
        HeaderValue::from(timestamp),
    );
    headers.insert(
        HeaderName::from_static(HEADER_SIGNATURE),
        HeaderValue::try_from(signature).map_err(|_| unsendable("signature"))?,
    );
    *request.body_mut() = Some(body.into());
    let response = endpoint
        .client
        .execute(request)
        .await
        .map_err(|e| describe(e, &config.url))?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    Ok(Response {
        status,
        retry_after,
    })
}

/// `Retry-After` as delta-seconds or an HTTP date.
fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let ms = at
        .timestamp_millis()
        .saturating_sub(Utc::now().timestamp_millis());
    Some(Duration::from_millis(u64::try_from(ms).unwrap_or(0)).min(MAX_RETRY_AFTER))
}

/// A `ce-*` header value encoded as the CloudEvents HTTP binding (§3.1.3.2) requires:
/// space, `\"`, `%` and every byte outside printable ASCII are percent-encoded (UTF-8), so a
/// provider's non-ASCII subject cannot make the request unbuildable.
fn ce_header(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for &b in value.as_bytes() {
        if (0x21..=0x7e).contains(&b) && b != b'"' && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What went wrong with a request that got no response, classified. The text names the host
/// and port, never the URL: an endpoint URL may carry a key in its query string, and this
/// text is logged and returned by the admin API.
fn describe(e: reqwest::Error, url: &url::Url) -> Failure {
    let peer = format!(
        "{}:{}",
        url.host_str().unwrap_or(""),
        url.port_or_known_default().unwrap_or(0)
    );
    if let Some(refused) = ssrf::refusal(&e) {
        // The guard's resolver refused the host, or could not resolve it.
        let reason = match refused {
            ssrf::Refused::Internal { .. } => Reason::Ssrf,
            ssrf::Refused::Unresolved { .. } | ssrf::Refused::NoAddress { .. } => Reason::Dns,
        };
        return Failure::new(reason, refused.to_string());
    }
    if e.is_timeout() {
        return Failure::new(
            Reason::Timeout,
            format!("{peer} did not answer in time (timeout)"),
        );
    }
    if let Some(found) = Failure::in_chain(&e, &peer) {
        return found;
    }
    if e.is_connect() {
        return Failure::new(Reason::Connect, format!("cannot connect to {peer}"));
    }
    let transport = e.is_request() || e.is_body() || e.is_decode();
    let text = e.without_url().to_string();
    if transport {
        Failure::new(Reason::Transport, format!("{peer}: {text}"))
    } else {
        Failure::new(Reason::Other, format!("{peer}: {text}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ce_headers_are_percent_encoded_per_the_http_binding() {
        assert_eq!(ce_header("lobby/ABC123"), "lobby/ABC123");
        assert_eq!(ce_header("a b\"c%d"), "a%20b%22c%25d");
        assert_eq!(ce_header("salle/é"), "salle/%C3%A9");
        assert!(reqwest::header::HeaderValue::from_str(&ce_header("x\r\ny")).is_ok());
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 120 "), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn huge_delays_neither_panic_nor_wrap() {
        for _ in 0..100 {
            assert!(jitter(Duration::MAX) > Duration::from_secs(u64::MAX / 2));
        }
        assert_eq!(
            parse_retry_after("18446744073709551615"),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(
            parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT"),
            Some(MAX_RETRY_AFTER)
        );
    }
}
