//! Webhook delivery queues on JetStream, shared by every bridge instance.
//!
//! Per endpoint there is one durable pull consumer on the journal (`<prefix>_wh_<endpoint>`);
//! whichever instance fetches a message delivers it, so each delivery is made by one instance.
//! The journal is the queue: an event is never journalled without its deliveries. Routing
//! happened at ingest and travels with the event (header `Wsbridge-Targets`); a message not
//! routed to the endpoint is acknowledged and skipped.
//! - 2xx: `ack`; a failure: `nak` with the endpoint's retry delay (the server redelivers it
//!   then, to any instance); out of retries: the envelope is published to the dead-letter
//!   stream (`<prefix>.dlq.<endpoint>`, with its attempts) and the original terminated. The
//!   dead letter's `Nats-Msg-Id` is `dlq:<endpoint>:<seq>` (plus the replay message's sequence
//!   for a replay), so a publish repeated after a crash before the `Term` is stored once.
//!   Replaying a dead letter publishes it with the id `replay:<endpoint>:dlq<n>`, so two
//!   admins replaying it at once queue it once.
//! - An admin replay publishes the selected envelopes to `<prefix>.replay.<endpoint>` (a
//!   work-queue stream); a second durable consumer per endpoint feeds them to the dispatcher
//!   before new events.
//! - `ordered = true`: the consumer allows one unacknowledged message at a time, so order holds
//!   across instances. This orders the whole endpoint, which is stricter than the embedded
//!   store's per-subject order (a failing event holds back every subject).
//! - What this instance holds (fetched, not yet answered) is a [`super::held::HeldTable`]: it
//!   hands out nothing in flight and holds each event once.
//! - Disabled endpoints (410) are a key in the `<prefix>_state` bucket, so a 410 seen by one
//!   instance stops the others, and `enable` on any instance resumes them all.
//!
//! Known limits: the attempt count is the server's delivery count; the attempt history of a
//! dead letter is what the instances that tried it recorded locally; pending deliveries listed
//! by the admin API are those this instance holds or has tried, and the pending count is what
//! the endpoint's consumer has not yet examined or acknowledged (an upper bound).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy, Consumer, DeliverPolicy};
use async_nats::jetstream::message::{AckKind, Acker};
use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use bytes::Bytes;
use chrono::Utc;
use futures_util::StreamExt;
use tracing::{debug, warn};

use super::held::{Arrival, HeldTable};
use super::state::Bucket;
use super::{header, nats_err, token, with_seq, Names, HEADER_TARGETS};
use crate::storage::{
    AttemptRecord, DeliveryCounts, DeliveryInfo, DeliveryQueue, DeliveryState, HeldDelivery,
    Holder, NextStep, QueueOptions, StoreError, StoredEvent,
};

/// How often a dispatcher polls its consumer for work published by other instances (and
/// re-reads the endpoint's shared state).
pub const POLL: Duration = Duration::from_millis(200);
/// How long a fetch may wait for the server's answer (a no-wait request answers at once; one
/// lost in a reconnect must not stall the dispatcher). Messages of an abandoned fetch are
/// redelivered after the ack wait.
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);
/// Expiry of an ordered endpoint's pull requests.
const ORDERED_FETCH_EXPIRES: Duration = Duration::from_millis(250);
/// Event seq of a dead letter or replay.
const HEADER_SEQ: &str = "Wsbridge-Seq";
/// Event id of a dead letter or replay.
const HEADER_ID: &str = "Wsbridge-Id";
/// Attempts of a dead letter (JSON).
const HEADER_ATTEMPTS: &str = "Wsbridge-Attempts";
/// Most deliveries per endpoint whose attempt history is kept in memory.
const HISTORY_CAP: usize = 10_000;
/// Most attempts kept per delivery.
const ATTEMPTS_CAP: usize = 32;
/// How long a dispatcher trusts its cached copy of the disabled flag.
const DISABLED_TTL: Duration = Duration::from_secs(1);
/// Most deliveries of one endpoint unacknowledged at once across all instances (those waiting
/// for a retry included).
const MAX_ACK_PENDING: i64 = 10_000;
/// Settings of a queue prepared without its endpoint's (an admin request for an endpoint
/// whose dispatcher has not set it up yet); the dispatcher's own replace them.
const DEFAULT_OPTIONS: QueueOptions = QueueOptions {
    ordered: false,
    ack_wait: Duration::from_secs(60),
    max_held: 32,
};

/// Fetches up to `n` available messages without waiting for more; bounded in time, so a
/// request lost in a reconnect cannot stall the dispatcher.
async fn fetch(
    consumer: &Consumer<pull::Config>,
    n: usize,
    expires: Option<Duration>,
    op: &'static str,
) -> Result<Vec<jetstream::Message>, StoreError> {
    let mut out = Vec::with_capacity(n);
    let collect = async {
        let mut request = consumer.fetch().max_messages(n);
        if let Some(e) = expires {
            request = request.expires(e);
        }
        let mut batch = request.messages().await.map_err(nats_err(op))?;
        while let Some(m) = batch.next().await {
            out.push(m.map_err(boxed(op))?);
        }
        Ok::<(), StoreError>(())
    };
    // A request with an expiry ends by itself soon after it (a 409 for a consumer at its
    // ack limit may leave it unanswered otherwise).
    let limit = expires.map_or(FETCH_TIMEOUT, |e| e + ORDERED_FETCH_EXPIRES);
    let result = tokio::time::timeout(limit, collect).await;
    // Whatever arrived is held and must be answered, even if the request then failed.
    match result {
        Ok(Ok(())) => Ok(out),
        _ if !out.is_empty() => Ok(out),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(StoreError::Nats {
            op,
            source: "no answer from NATS".into(),
        }),
    }
}

/// Whether a message delete failed because the message is gone already (the server answers
/// "no message found", with the generic delete-failed code on the servers we test with).
fn already_deleted(e: &stream::DeleteMessageError) -> bool {
    match e.kind() {
        stream::DeleteMessageErrorKind::JetStream(j) => {
            j.error_code() == jetstream::ErrorCode::NO_MESSAGE_FOUND
                || (j.error_code() == jetstream::ErrorCode::STREAM_MESSAGE_DELETE_FAILED
                    && j.to_string().contains("no message found"))
        }
        _ => false,
    }
}

fn boxed(op: &'static str) -> impl FnOnce(async_nats::Error) -> StoreError {
    move |source| StoreError::Nats { op, source }
}

/// An attempt as kept in a dead letter's header.
#[derive(serde::Serialize, serde::Deserialize)]
struct Attempt {
    at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    duration_ms: u64,
}

impl From<&AttemptRecord> for Attempt {
    fn from(a: &AttemptRecord) -> Self {
        Attempt {
            at_ms: a.at_ms,
            status: a.status,
            error: a.error.clone(),
            duration_ms: a.duration_ms,
        }
    }
}

impl From<Attempt> for AttemptRecord {
    fn from(a: Attempt) -> Self {
        AttemptRecord {
            at_ms: a.at_ms,
            status: a.status,
            error: a.error,
            duration_ms: a.duration_ms,
        }
    }
}

/// What this instance holds of one endpoint ([`HeldTable`]), shared by every
/// [`EndpointQueue`] made for the endpoint (a reload's re-prepare keeps it), and what a
/// [`HeldDelivery`] dropped unanswered is released in.
#[derive(Default)]
struct Held(Mutex<HeldTable<Acker>>);

impl Held {
    fn lock(&self) -> MutexGuard<'_, HeldTable<Acker>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Holder for Held {
    fn unhold(&self, seq: u64) {
        self.lock().release(&[seq]);
    }
}

/// One endpoint's consumers and local bookkeeping.
struct EndpointQueue {
    token: String,
    ordered: bool,
    ack_wait: Duration,
    /// Most deliveries handed out and not yet answered ([`QueueOptions::max_held`]).
    max_held: usize,
    main: Consumer<pull::Config>,
    replay: Consumer<pull::Config>,
    in_flight: Arc<Held>,
    history: Arc<Mutex<HashMap<u64, Vec<AttemptRecord>>>>,
    disabled: Mutex<Option<(Instant, Option<String>)>>,
}

impl EndpointQueue {
    /// An ordered consumer whose one delivery is held elsewhere leaves a no-wait pull request
    /// unanswered; a short expiry ends it.
    fn fetch_expires(&self) -> Option<Duration> {
        self.ordered.then_some(ORDERED_FETCH_EXPIRES)
    }

    fn in_flight(&self) -> MutexGuard<'_, HeldTable<Acker>> {
        self.in_flight.lock()
    }

    /// `delivery`, handed out held in this endpoint's table.
    fn handle(&self, delivery: crate::storage::DueDelivery) -> HeldDelivery {
        HeldDelivery::new(delivery, self.in_flight.clone())
    }

    fn history(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Vec<AttemptRecord>>> {
        self.history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn note(&self, seq: u64, attempt: AttemptRecord) {
        let mut h = self.history();
        if h.len() >= HISTORY_CAP && !h.contains_key(&seq) {
            return;
        }
        let list = h.entry(seq).or_default();
        if list.len() >= ATTEMPTS_CAP {
            list.remove(0);
        }
        list.push(attempt);
    }
}

/// Every endpoint's delivery queue, plus the dead-letter and replay streams and the shared
/// state bucket.
pub struct Queues {
    js: jetstream::Context,
    names: Names,
    events: String,
    dlq: stream::Stream,
    replay: stream::Stream,
    state: Bucket,
    endpoints: RwLock<HashMap<String, Arc<EndpointQueue>>>,
}

/// The endpoint's name as a subject token and consumer-name part: sanitised, with a hash of
/// the raw name when sanitising changed it (so two names never share a queue).
fn endpoint_token(name: &str) -> String {
    let t = token(name);
    if t == name {
        return t;
    }
    let hash = name.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("{t}_{hash:08x}")
}

impl Queues {
    /// Creates or opens the dead-letter and replay streams and the state bucket.
    pub async fn open(
        js: &jetstream::Context,
        names: &Names,
        replicas: usize,
    ) -> Result<Queues, StoreError> {
        let dlq = js
            .get_or_create_stream(stream::Config {
                name: names.dlq.clone(),
                description: Some("wsbridge dead letters".into()),
                subjects: vec![format!("{}.dlq.>", names.prefix)],
                storage: stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(nats_err("create the dead-letter stream"))?;
        let replay = js
            .get_or_create_stream(stream::Config {
                name: names.replay.clone(),
                description: Some("wsbridge admin replays".into()),
                subjects: vec![format!("{}.replay.>", names.prefix)],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(nats_err("create the replay stream"))?;
        let state = Bucket::open(
            js,
            &names.state,
            &format!("{}.state", names.prefix),
            replicas,
            None,
        )
        .await?;
        Ok(Queues {
            js: js.clone(),
            names: names.clone(),
            events: names.events.clone(),
            dlq,
            replay,
            state,
            endpoints: RwLock::new(HashMap::new()),
        })
    }

    /// Creates or updates the endpoint's consumers: `ordered` allows one unacknowledged
    /// delivery at a time; `ack_wait` must exceed the endpoint's timeout, or a slow attempt is
    /// redelivered to another instance while still running.
    async fn prepare(
        &self,
        endpoint: &str,
        options: QueueOptions,
    ) -> Result<Arc<EndpointQueue>, StoreError> {
        let QueueOptions {
            ordered,
            ack_wait,
            max_held,
        } = options;
        let tok = endpoint_token(endpoint);
        let prefix = &self.names.prefix;
        let events = self
            .js
            .get_stream(&self.events)
            .await
            .map_err(nats_err("open the journal stream"))?;
        let config = |durable: String, description: String, filter: String| pull::Config {
            durable_name: Some(durable),
            description: Some(description),
            filter_subject: filter,
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait,
            max_deliver: -1,
            max_ack_pending: if ordered { 1 } else { MAX_ACK_PENDING },
            ..Default::default()
        };
        let main = events
            .create_consumer(config(
                format!("{prefix}_wh_{tok}"),
                format!("webhook {endpoint}"),
                self.names.events_filter(),
            ))
            .await
            .map_err(nats_err("create the endpoint's consumer"))?;
        let replay = self
            .replay
            .create_consumer(config(
                format!("{prefix}_whr_{tok}"),
                format!("webhook {endpoint} replays"),
                format!("{prefix}.replay.{tok}"),
            ))
            .await
            .map_err(nats_err("create the endpoint's replay consumer"))?;
        let mut map = self
            .endpoints
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // A re-prepare (reload) shares what this instance holds in flight with the queue it
        // replaces: handles the old one gave out are still answered in the same table.
        let (in_flight, history) = match map.get(endpoint) {
            Some(old) => (old.in_flight.clone(), old.history.clone()),
            None => (Arc::default(), Arc::default()),
        };
        let q = Arc::new(EndpointQueue {
            token: tok,
            ordered,
            ack_wait,
            max_held,
            main,
            replay,
            in_flight,
            history,
            disabled: Mutex::new(None),
        });
        map.insert(endpoint.to_string(), q.clone());
        Ok(q)
    }

    /// The endpoint's queue (`queues` is this), as [`crate::storage::Store::delivery_queue`]
    /// gives it.
    pub async fn queue(
        queues: &Arc<Queues>,
        endpoint: &str,
        options: QueueOptions,
    ) -> Result<Arc<dyn DeliveryQueue>, StoreError> {
        let q = queues.prepare(endpoint, options).await?;
        Ok(Arc::new(NatsQueue {
            queues: queues.clone(),
            endpoint: endpoint.to_string(),
            q,
        }))
    }

    async fn get(&self, endpoint: &str) -> Result<Arc<EndpointQueue>, StoreError> {
        if let Some(q) = self.lookup(endpoint) {
            return Ok(q);
        }
        self.prepare(endpoint, DEFAULT_OPTIONS).await
    }

    fn lookup(&self, endpoint: &str) -> Option<Arc<EndpointQueue>> {
        self.endpoints
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(endpoint)
            .cloned()
    }

    fn disabled_key(endpoint: &str) -> String {
        format!("disabled.{}", endpoint_token(endpoint))
    }

    /// Hands out up to `limit` deliveries (fewer when the queue holds nearly `max_held`),
    /// never one this instance holds: first what was fetched earlier but released (or an
    /// ordered endpoint's retry now due), then replays, then new or redelivered journal
    /// messages routed to the endpoint. Nothing while the endpoint is disabled on any
    /// instance.
    async fn due(
        &self,
        endpoint: &str,
        q: &EndpointQueue,
        limit: usize,
    ) -> Result<Vec<HeldDelivery>, StoreError> {
        self.keep_held(q).await;
        if self.disabled_cached(q, endpoint).await?.is_some() {
            return Ok(Vec::new());
        }
        let (released, room) = q
            .in_flight()
            .take_released(limit, q.max_held, Instant::now());
        let mut out: Vec<HeldDelivery> = released.into_iter().map(|d| q.handle(d)).collect();
        if room == 0 {
            return Ok(out);
        }
        let released_count = out.len();
        let replays = match fetch(&q.replay, room, q.fetch_expires(), "fetch replays").await {
            Ok(r) => r,
            // What this call already took from the held list must reach the dispatcher.
            Err(e) if !out.is_empty() => {
                debug!(webhook = %endpoint, error = %e, "replays not fetched this time");
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        for m in replays {
            let (attempts, replay_seq) = match m.info() {
                Ok(i) => (i.delivered.max(1) - 1, Some(i.stream_sequence)),
                Err(_) => (0, None),
            };
            let (msg, acker) = m.split();
            let Some(seq) = header(&msg, HEADER_SEQ).and_then(|s| s.parse::<u64>().ok()) else {
                let _ = acker.ack().await;
                continue;
            };
            let arrival = q.in_flight().arrived_from_replay(seq, replay_seq, acker);
            let acker = match arrival {
                Arrival::Renewed => continue,
                Arrival::Free(a) => a,
                Arrival::Busy(deferred) => {
                    let _ = deferred.ack_with(AckKind::Nak(Some(POLL * 5))).await;
                    continue;
                }
            };
            let id = header(&msg, HEADER_ID).unwrap_or_default();
            let attempts = u32::try_from(attempts).unwrap_or(u32::MAX);
            let held = q.in_flight().hold(
                seq,
                acker,
                replay_seq,
                id,
                msg.payload,
                attempts,
                Instant::now(),
            );
            out.push(q.handle(held));
        }
        for _round in 0..8 {
            let want = room.saturating_sub(out.len() - released_count);
            if want == 0 {
                break;
            }
            if q.ordered && !q.in_flight().is_empty() {
                // The one delivery an ordered consumer allows is held here already.
                break;
            }
            let batch = match fetch(&q.main, want, q.fetch_expires(), "fetch deliveries").await {
                Ok(b) => b,
                // An ordered consumer whose one delivery another instance holds does not
                // answer a pull request: nothing to do here now.
                Err(e) if q.ordered || !out.is_empty() => {
                    debug!(webhook = %endpoint, error = %e, "no deliveries fetched this time");
                    break;
                }
                Err(e) => return Err(e),
            };
            let got = batch.len();
            for m in batch {
                let (seq, attempts) = match m.info() {
                    Ok(i) => (i.stream_sequence, i.delivered.max(1) - 1),
                    Err(_) => continue,
                };
                let (msg, acker) = m.split();
                let routed = header(&msg, HEADER_TARGETS)
                    .is_some_and(|t| t.split(',').any(|name| name == endpoint));
                if !routed {
                    if let Err(e) = acker.ack().await {
                        debug!(webhook = %endpoint, error = %e, "cannot skip an unrouted event");
                    }
                    continue;
                }
                let id = header(&msg, "Nats-Msg-Id").unwrap_or_default();
                let bytes = with_seq(&msg.payload, seq);
                let deferred = {
                    let mut held = q.in_flight();
                    match held.arrived_from_journal(seq, acker) {
                        Arrival::Renewed => continue,
                        Arrival::Busy(acker) => Some(acker),
                        Arrival::Free(acker) => {
                            let attempts = u32::try_from(attempts).unwrap_or(u32::MAX);
                            let d =
                                held.hold(seq, acker, None, id, bytes, attempts, Instant::now());
                            out.push(q.handle(d));
                            None
                        }
                    }
                };
                if let Some(acker) = deferred {
                    if let Err(e) = acker.ack_with(AckKind::Nak(Some(POLL * 5))).await {
                        debug!(webhook = %endpoint, error = %e, "cannot defer a delivery");
                    }
                }
            }
            if got < want {
                break;
            }
        }
        Ok(out)
    }

    /// Tells the server that retries this instance holds (ordered endpoints) are still being
    /// worked on, so it does not hand them to another instance while they wait.
    async fn keep_held(&self, q: &EndpointQueue) {
        let due = q
            .in_flight()
            .needing_progress(Instant::now(), q.ack_wait / 3);
        for seq in due {
            let Some(f) = q.in_flight().remove(seq) else {
                continue;
            };
            if let Err(e) = f.acker.ack_with(AckKind::Progress).await {
                debug!(seq, error = %e, "cannot extend a held retry");
            }
            q.in_flight().progressed(seq, f, Instant::now());
        }
    }

    /// Applies an attempt's outcome to the message this instance holds: the entry leaves
    /// the table as it is answered (an ordered endpoint's retry goes back in, not handed out
    /// before its time).
    async fn record(
        &self,
        q: &EndpointQueue,
        delivery: HeldDelivery,
        attempt: AttemptRecord,
        next: NextStep,
    ) -> Result<(), StoreError> {
        // From here on the table, not the handle, says whether it is held.
        let seq = delivery.into_delivery().seq;
        let Some(held) = q.in_flight().remove(seq) else {
            return Ok(());
        };
        match next {
            NextStep::Delivered => {
                q.history().remove(&seq);
                held.acker.ack().await.map_err(boxed("ack a delivery"))?;
            }
            // JetStream counts every delivery of the message, so on this backend a held
            // delivery (410) does use up a step of the schedule; see the README.
            NextStep::RetryAt(at_ms) | NextStep::HoldUntil(at_ms) => {
                let gone = attempt.status == Some(410);
                q.note(seq, attempt);
                // Capped, so that adding it to an `Instant` below cannot overflow.
                let mut delay = Duration::from_millis(
                    u64::try_from(at_ms.saturating_sub(Utc::now().timestamp_millis())).unwrap_or(0),
                )
                .min(crate::supervise::MAX_WAIT);
                if gone {
                    // The endpoint is being disabled: do not spin on it meanwhile.
                    delay = delay.max(POLL * 5);
                }
                if q.ordered {
                    // A nak'd message still counts against the one unacknowledged message an
                    // ordered consumer allows, and the server answers no pull request while
                    // it waits: hold the retry here (extending its ack wait) and offer it
                    // again when it is due. If this instance dies, the server redelivers it
                    // after the ack wait, still before anything behind it.
                    q.in_flight().retry_at(seq, held, Instant::now() + delay);

                    return Ok(());
                }
                held.acker
                    .ack_with(AckKind::Nak(Some(delay)))
                    .await
                    .map_err(boxed("nak a delivery"))?;
            }
            NextStep::Dead => {
                let mut attempts = q.history().remove(&seq).unwrap_or_default();
                attempts.push(attempt);
                let list: Vec<Attempt> = attempts.iter().map(Attempt::from).collect();
                // Deterministic per delivered message, so a dead letter published again (this
                // instance died between the publish and the `Term`, and the message was
                // redelivered) is dropped by the stream's duplicate window. A replay that dies
                // again is a new dead letter: its replay message's sequence makes it unique.
                let msg_id = match held.replay_seq {
                    None => format!("dlq:{}:{seq}", q.token),
                    Some(r) => format!("dlq:{}:{seq}:r{r}", q.token),
                };
                let publish = jetstream::message::PublishMessage::build()
                    .message_id(msg_id)
                    .payload(held.bytes.clone())
                    .header(HEADER_SEQ, seq.to_string().as_str())
                    .header(HEADER_ID, held.id.as_str())
                    .header(HEADER_ATTEMPTS, serde_json::to_string(&list)?.as_str());
                let subject = format!("{}.dlq.{}", self.names.prefix, q.token);
                let ack = self
                    .js
                    .send_publish(subject, publish)
                    .await
                    .map_err(nats_err("dead-letter a delivery"))?;
                ack.await.map_err(nats_err("dead-letter a delivery"))?;
                held.acker
                    .ack_with(AckKind::Term)
                    .await
                    .map_err(boxed("terminate a dead delivery"))?;
            }
        }
        Ok(())
    }

    /// Dead letters of the endpoint, oldest first, with their DLQ sequence.
    async fn dead_letters(
        &self,
        endpoint: &str,
        limit: usize,
    ) -> Result<Vec<(u64, DeliveryInfo, Bytes)>, StoreError> {
        let subject = format!("{}.dlq.{}", self.names.prefix, endpoint_token(endpoint));
        let mut out = Vec::new();
        let mut from = 1;
        while out.len() < limit {
            let m = match self
                .dlq
                .raw_message_builder()
                .sequence(from)
                .next_by_subject(subject.clone())
                .send()
                .await
            {
                Ok(m) => m,
                Err(e) if matches!(e.kind(), stream::LastRawMessageErrorKind::NoMessageFound) => {
                    break
                }
                Err(e) => return Err(nats_err("read dead letters")(e)),
            };
            from = m.sequence + 1;
            let get = |name: &str| m.headers.get(name).map(|v| v.as_str().to_string());
            let attempts: Vec<Attempt> = get(HEADER_ATTEMPTS)
                .and_then(|a| serde_json::from_str(&a).ok())
                .unwrap_or_default();
            out.push((
                m.sequence,
                DeliveryInfo {
                    id: get(HEADER_ID).unwrap_or_default(),
                    seq: get(HEADER_SEQ).and_then(|s| s.parse().ok()).unwrap_or(0),
                    state: DeliveryState::Dead,
                    next_attempt: None,
                    attempts: attempts.into_iter().map(AttemptRecord::from).collect(),
                },
                m.payload,
            ));
        }
        Ok(out)
    }

    /// Up to `limit` dead letters of the endpoint.
    pub async fn dead(
        &self,
        endpoint: &str,
        limit: usize,
    ) -> Result<Vec<DeliveryInfo>, StoreError> {
        Ok(self
            .dead_letters(endpoint, limit)
            .await?
            .into_iter()
            .map(|(_, info, _)| info)
            .collect())
    }

    /// What this instance holds or has tried of the endpoint's pending deliveries.
    pub fn pending(&self, endpoint: &str, limit: usize) -> Vec<DeliveryInfo> {
        let Some(q) = self.lookup(endpoint) else {
            return Vec::new();
        };
        let history = q.history();
        let mut out: Vec<DeliveryInfo> = q
            .in_flight()
            .iter()
            .map(|(seq, f)| DeliveryInfo {
                id: f.id.clone(),
                seq,
                state: DeliveryState::Pending,
                next_attempt: None,
                attempts: history.get(&seq).cloned().unwrap_or_default(),
            })
            .collect();
        out.sort_by_key(|d| d.seq);
        out.truncate(limit);
        out
    }

    /// Pending (not yet examined or not yet acknowledged by the endpoint's consumers) and
    /// dead counts.
    pub async fn counts(&self, endpoint: &str) -> Result<DeliveryCounts, StoreError> {
        let q = self.get(endpoint).await?;
        let main = q
            .main
            .get_info()
            .await
            .map_err(nats_err("read the endpoint's consumer"))?;
        let replay = q
            .replay
            .get_info()
            .await
            .map_err(nats_err("read the endpoint's replay consumer"))?;
        let subject = format!("{}.dlq.{}", self.names.prefix, q.token);
        let mut subjects = self
            .dlq
            .info_with_subjects(&subject)
            .await
            .map_err(nats_err("count dead letters"))?;
        let mut dead = 0;
        while let Some(s) = subjects.next().await {
            let (_, n) = s.map_err(nats_err("count dead letters"))?;
            dead += n as u64;
        }
        Ok(DeliveryCounts {
            pending: main.num_pending
                + main.num_ack_pending as u64
                + replay.num_pending
                + replay.num_ack_pending as u64,
            dead,
        })
    }

    /// Moves the endpoint's dead letters (all, or those with one of `ids`) to its replay
    /// queue; returns how many and their ids.
    pub async fn replay_dead(
        &self,
        endpoint: &str,
        ids: Option<&[String]>,
    ) -> Result<(u64, Vec<String>), StoreError> {
        let tok = endpoint_token(endpoint);
        let letters = self.dead_letters(endpoint, usize::MAX).await?;
        let mut found = Vec::new();
        let mut queued = 0;
        for (dlq_seq, info, payload) in letters {
            if ids.is_some_and(|ids| !ids.contains(&info.id)) {
                continue;
            }
            // One id per dead letter: two admins replaying it at once (or a retry after a
            // failed delete) queue it once, within the replay stream's duplicate window.
            let msg_id = format!("replay:{tok}:dlq{dlq_seq}");
            if self
                .publish_replay(&tok, info.seq, &info.id, payload, Some(msg_id))
                .await?
            {
                queued += 1;
            }
            match self.dlq.delete_message(dlq_seq).await {
                Ok(_) => {}
                // Removed by a concurrent replay of the same dead letter.
                Err(e) if already_deleted(&e) => {}
                Err(e) => return Err(nats_err("remove a replayed dead letter")(e)),
            }
            found.push(info.id);
        }
        Ok((queued, found))
    }

    /// Queues journalled events for the endpoint again; returns how many.
    pub async fn replay_events(
        &self,
        endpoint: &str,
        events: &[StoredEvent],
    ) -> Result<u64, StoreError> {
        let tok = endpoint_token(endpoint);
        for e in events {
            // Each admin request is a deliberate replay: no message id, never deduplicated.
            self.publish_replay(&tok, e.seq, &e.id, e.bytes.clone(), None)
                .await?;
        }
        Ok(events.len() as u64)
    }

    /// Publishes one replay; false when the stream dropped it as a copy of one with the same
    /// `msg_id` (already queued).
    async fn publish_replay(
        &self,
        tok: &str,
        seq: u64,
        id: &str,
        payload: Bytes,
        msg_id: Option<String>,
    ) -> Result<bool, StoreError> {
        let mut publish = jetstream::message::PublishMessage::build()
            .payload(payload)
            .header(HEADER_SEQ, seq.to_string().as_str())
            .header(HEADER_ID, id);
        if let Some(msg_id) = msg_id {
            publish = publish.message_id(msg_id);
        }
        let subject = format!("{}.replay.{tok}", self.names.prefix);
        let ack = self
            .js
            .send_publish(subject, publish)
            .await
            .map_err(nats_err("queue a replay"))?;
        let ack = ack.await.map_err(nats_err("queue a replay"))?;
        Ok(!ack.duplicate)
    }

    /// Stores (or clears) the endpoint's disabled reason for every instance.
    pub async fn set_disabled(
        &self,
        endpoint: &str,
        reason: Option<String>,
    ) -> Result<(), StoreError> {
        let key = Self::disabled_key(endpoint);
        match &reason {
            Some(r) => {
                self.state.put(&key, Bytes::from(r.clone())).await?;
            }
            None => self.state.delete(&key).await?,
        }
        if let Some(q) = self.lookup(endpoint) {
            if let Ok(mut d) = q.disabled.lock() {
                *d = Some((Instant::now(), reason));
            }
        }
        Ok(())
    }

    /// The endpoint's disabled reason as stored in the shared bucket.
    pub async fn disabled(&self, endpoint: &str) -> Result<Option<String>, StoreError> {
        let entry = self.state.get(&Self::disabled_key(endpoint)).await?;
        Ok(entry.map(|e| String::from_utf8_lossy(&e.value).into_owned()))
    }

    async fn disabled_cached(
        &self,
        q: &EndpointQueue,
        endpoint: &str,
    ) -> Result<Option<String>, StoreError> {
        let cached = q.disabled.lock().ok().and_then(|d| d.clone());
        if let Some((at, reason)) = cached {
            if at.elapsed() < DISABLED_TTL {
                return Ok(reason);
            }
        }
        let reason = match self.disabled(endpoint).await {
            Ok(r) => r,
            Err(e) => {
                warn!(webhook = %endpoint, error = %e, "cannot read the endpoint's shared state");
                return Err(e);
            }
        };
        if let Ok(mut d) = q.disabled.lock() {
            *d = Some((Instant::now(), reason.clone()));
        }
        Ok(reason)
    }
}

/// One endpoint's queue on NATS, from [`Queues::queue`].
struct NatsQueue {
    queues: Arc<Queues>,
    endpoint: String,
    q: Arc<EndpointQueue>,
}

#[async_trait]
impl DeliveryQueue for NatsQueue {
    async fn due(&self, _now_ms: i64, limit: usize) -> Result<Vec<HeldDelivery>, StoreError> {
        // Retries fall due on the server (or, held here, by the table's own time).
        self.queues.due(&self.endpoint, &self.q, limit).await
    }

    async fn next_due(&self, after_ms: i64) -> Result<Option<i64>, StoreError> {
        // Other instances publish events and retries fall due on the server: poll.
        Ok(Some(after_ms.saturating_add(POLL.as_millis() as i64)))
    }

    async fn record(
        &self,
        held: HeldDelivery,
        attempt: AttemptRecord,
        next: NextStep,
    ) -> Result<(), StoreError> {
        self.queues.record(&self.q, held, attempt, next).await
    }
}
