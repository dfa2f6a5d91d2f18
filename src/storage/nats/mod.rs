//! The NATS JetStream store: several bridge instances share one journal and one set of
//! webhook delivery queues (README, "Scale-out on NATS JetStream").
//!
//! What lives where (every name starts with `storage.prefix`, so deployments and test runs
//! sharing one NATS account never see each other):
//! - the journal is the stream `<prefix>_events`, subjects `<prefix>.events.<provider>.<type…>`
//!   (file storage, `storage.replicas`); a subject is at most [`MAX_SUBJECT_BYTES`] long, an
//!   over-long token or type tail replaced by a hash (see [`Names::event_subject`]). Each envelope is published with `Nats-Msg-Id` = the
//!   event id, so the copies two instances publish of one upstream frame are stored once (the
//!   stream's duplicate window). The envelope's `seq` is the stream sequence; the epoch is the
//!   stream's name and creation time, so a recreated stream is a new epoch;
//! - webhook deliveries are durable pull consumers on the journal, one per endpoint, shared by
//!   every instance (see [`delivery`]); dead letters go to `<prefix>_dlq`, admin replays to
//!   `<prefix>_replay`; endpoint state (disabled by a 410) is in the bucket `<prefix>_state` ([`state`]);
//! - upstream leases are in the bucket `<prefix>_leases` (see [`lease`]);
//! - durable consumers' saved state is in the bucket `<prefix>_durables`, created when a
//!   durable is first used (see [`durables`]).
//!
//! Serialise once: the envelope is serialised once, without its `seq` (which only the stream
//! can assign), and published. Whoever reads it back (the live tail, a resume, a webhook
//! dispatcher) appends `"seq":N` to those bytes ([`with_seq`]), which yields exactly the bytes
//! the embedded store produces for the same envelope, since `seq` is its last field.
//!
//! Outages: a failed publish is retried with the same `Nats-Msg-Id` (so a publish that did
//! land is not stored twice) until NATS answers; meanwhile ingest waits, its bounded queue
//! fills and the upstream readers stop reading (backpressure). Nothing an upstream sent after
//! the bridge read it is dropped. The bridge only starts when the server's `max_payload`
//! covers `limits.max_event_bytes` plus [`HEADER_RESERVE`] ([`NatsStore::check_max_payload`]),
//! and ingest refuses larger envelopes, so every event that reaches the journal fits. An event
//! NATS still refuses for good (headers beyond the reserve, or the stream refuses that message
//! with a 4xx error such as its `max_msg_size`) could never be stored by a retry, so it is
//! dropped with an error log and counted (`journal_rejected`) instead of wedging ingest on
//! every instance.

pub mod delivery;
pub mod durables;
mod held;
mod ids;
pub mod lease;
pub mod state;
pub mod tail;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::future::join_all;
use futures_util::StreamExt;
use tracing::{error, info, warn};

use super::{
    Appended, DeliveryCounts, DeliveryInfo, DeliveryQueue, DeliveryState, DurableKey,
    JournalPosition, NewEvent, QueueOptions, ReplaySelection, SavedDurable, Store, StoreError,
    StoredEvent,
};
use crate::storage::config::StorageConfig;

/// Header carrying the webhook endpoints an event was routed to at ingest.
pub const HEADER_TARGETS: &str = "Wsbridge-Targets";
/// Room a journal message needs beyond its envelope: NATS counts headers (`Nats-Msg-Id`, the
/// event id; [`HEADER_TARGETS`], the routed endpoints) in `max_payload`. The server's
/// `max_payload` must cover `limits.max_event_bytes` plus this.
pub const HEADER_RESERVE: usize = 8 * 1024;
/// Longest wait for a journal reader to be created, and how many tries.
const READER_CREATE_TIMEOUT: Duration = Duration::from_secs(2);
const READER_CREATE_TRIES: u32 = 4;
/// Longest wait for one message while paging through the journal.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest journal subject. A subject travels in the publish's control line, which
/// nats-server caps (`max_control_line`, 4096 bytes by default) and answers by dropping the
/// connection: a subject built from an upstream's event type must stay far below that.
pub const MAX_SUBJECT_BYTES: usize = 256;
/// Events of an append whose id claims are awaited together before they are published (see
/// [`NatsStore::claim_and_publish`]).
const CHUNK: usize = 128;

/// Builds the `StoreError` of a failed NATS operation.
pub(crate) fn nats_err<E>(op: &'static str) -> impl FnOnce(E) -> StoreError
where
    E: std::error::Error + Send + Sync + 'static,
{
    move |e| StoreError::Nats {
        op,
        source: Box::new(e),
    }
}

/// Every stream, bucket and subject name derived from `storage.prefix`.
#[derive(Clone, Debug)]
pub struct Names {
    /// The prefix itself.
    pub prefix: String,
    /// The journal stream.
    pub events: String,
    /// The dead-letter stream.
    pub dlq: String,
    /// The admin-replay stream.
    pub replay: String,
    /// The endpoint-state KV bucket.
    pub state: String,
    /// The upstream-lease KV bucket.
    pub leases: String,
    /// The id index stream (see [`ids`]).
    pub ids: String,
    /// The durable consumers' KV bucket (see [`durables`]).
    pub durables: String,
}

impl Names {
    /// The names for `prefix` (already validated: letters, digits, '-' and '_').
    pub fn new(prefix: &str) -> Names {
        Names {
            prefix: prefix.to_string(),
            events: format!("{prefix}_events"),
            dlq: format!("{prefix}_dlq"),
            replay: format!("{prefix}_replay"),
            state: format!("{prefix}_state"),
            leases: format!("{prefix}_leases"),
            ids: format!("{prefix}_ids"),
            durables: format!("{prefix}_durables"),
        }
    }

    /// `<prefix>.events.<provider>.<type…>`, each token sanitised ([`subject_token`]); the
    /// provider's name is not repeated when the type starts with it (`voipbin.call.status`).
    ///
    /// The type comes from an upstream, so its length is not ours to choose: the subject is
    /// bounded to [`MAX_SUBJECT_BYTES`]. Type tokens are kept while they fit with room for one
    /// hash token; the rest of the type (its raw text) is then replaced by that hash. The
    /// envelope keeps the full type: the subject only places the message in the stream, and
    /// every reader filters on `<prefix>.events.>`.
    pub fn event_subject(&self, provider: &str, event_type: &str) -> String {
        let rest = event_type
            .strip_prefix(provider)
            .and_then(|r| r.strip_prefix('.'))
            .unwrap_or(event_type);
        let mut s = format!("{}.events.{}", self.prefix, subject_token(provider));
        let mut remaining = rest;
        loop {
            let (part, tail) = match remaining.split_once('.') {
                Some((part, tail)) => (part, Some(tail)),
                None => (remaining, None),
            };
            let t = subject_token(part);
            // The last token only has to fit itself; any other one must leave room for the
            // hash of what may follow it.
            let room = match tail {
                Some(_) => 1 + t.len() + 1 + HASH_TOKEN_BYTES,
                None => 1 + t.len(),
            };
            if s.len().saturating_add(room) > MAX_SUBJECT_BYTES {
                s.push('.');
                s.push_str(&hash_token(remaining));
                return s;
            }
            s.push('.');
            s.push_str(&t);
            match tail {
                Some(tail) => remaining = tail,
                None => return s,
            }
        }
    }

    /// Every journal subject.
    pub fn events_filter(&self) -> String {
        format!("{}.events.>", self.prefix)
    }
}

/// A NATS subject token or stream-safe name: letters, digits, '-' and '_' kept, anything else
/// replaced by '_', never empty.
pub fn token(raw: &str) -> String {
    let t: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if t.is_empty() {
        "_".to_string()
    } else {
        t
    }
}

/// Longest subject token kept as it is; a longer one is replaced by [`hash_token`].
pub const MAX_TOKEN_BYTES: usize = 64;
/// Length of a [`hash_token`].
const HASH_TOKEN_BYTES: usize = 18;

/// One token of a journal subject: [`token`]'s characters (no space, `.`, `*`, `>` or control
/// character; never empty), and at most [`MAX_TOKEN_BYTES`] long: a longer one is replaced by
/// the hash of its raw text, so distinct long tokens stay distinct.
pub fn subject_token(raw: &str) -> String {
    let t = token(raw);
    if t.len() > MAX_TOKEN_BYTES {
        hash_token(raw)
    } else {
        t
    }
}

/// `h_` and the first 8 bytes of the SHA-256 of `raw`, in hex: a short subject token that
/// stands for `raw` (the same on every instance and every version).
fn hash_token(raw: &str) -> String {
    use sha2::{Digest, Sha256};
    use std::fmt::Write;
    let digest = Sha256::digest(raw.as_bytes());
    let mut out = String::with_capacity(HASH_TOKEN_BYTES);
    out.push_str("h_");
    for b in digest.iter().take(8) {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// How the journal's bytes get their seq (shared with the embedded backend).
pub use crate::envelope::with_seq;

/// The journal and delivery queues on NATS JetStream.
pub struct NatsStore {
    client: async_nats::Client,
    js: jetstream::Context,
    names: Names,
    events: stream::Stream,
    replicas: usize,
    lease_ttl: Duration,
    /// False while publishes fail (an outage): readiness and metrics show it.
    journal_ok: AtomicBool,
    /// Publish rounds that failed and were retried.
    write_failures: AtomicU64,
    queues: Arc<delivery::Queues>,
    ids: ids::IdIndex,
    /// The durable consumers' bucket, opened on first use.
    durables: tokio::sync::OnceCell<state::Bucket>,
}

impl NatsStore {
    /// Connects (every configured URL is a seed; the client also learns the cluster's other
    /// servers), then creates or opens the streams and buckets.
    pub async fn connect(config: &StorageConfig) -> Result<Arc<NatsStore>, StoreError> {
        let mut options = async_nats::ConnectOptions::new()
            .name("wsbridge")
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis(50u64.saturating_mul(1 << attempts.min(6)))
                    .min(Duration::from_secs(2))
            })
            .require_tls(config.tls_required);
        if let Some(path) = &config.credentials {
            options = options
                .credentials_file(path)
                .await
                .map_err(|source| StoreError::Io {
                    path: path.clone(),
                    source,
                })?;
        }
        if let Some(token) = &config.token {
            options = options.token(token.expose().to_string());
        }
        // The bridge's one trust policy (src/tls): the machine's store plus `tls_ca`, and
        // the client certificate, as read at load.
        let tls = config
            .tls
            .client_config("NATS")
            .map_err(nats_err("set up TLS"))?;
        options = options.tls_client_config(tls);
        let urls: Vec<async_nats::ServerAddr> = config
            .url
            .iter()
            .map(|u| u.parse::<async_nats::ServerAddr>())
            .collect::<Result<_, _>>()
            .map_err(nats_err("parse server URL"))?;
        let client = options.connect(urls).await.map_err(nats_err("connect"))?;
        let js = jetstream::new(client.clone());
        let names = Names::new(&config.prefix);
        let events = js
            .get_or_create_stream(stream::Config {
                name: names.events.clone(),
                description: Some("wsbridge journal".into()),
                subjects: vec![names.events_filter()],
                storage: stream::StorageType::File,
                num_replicas: config.replicas,
                // Wider than the dedup window: see [`ids`].
                duplicate_window: config.dedup_window.saturating_mul(2),
                allow_direct: true,
                ..Default::default()
            })
            .await
            .map_err(nats_err("create the journal stream"))?;
        let queues = delivery::Queues::open(&js, &names, config.replicas).await?;
        let ids = ids::IdIndex::open(&js, &names, config.replicas, config.dedup_window).await?;
        info!(stream = %names.events, replicas = config.replicas, "NATS journal open");
        Ok(Arc::new(NatsStore {
            client,
            js,
            names,
            events,
            replicas: config.replicas,
            lease_ttl: config.lease_ttl,
            journal_ok: AtomicBool::new(true),
            write_failures: AtomicU64::new(0),
            queues: Arc::new(queues),
            ids,
            durables: tokio::sync::OnceCell::new(),
        }))
    }

    /// Checks that the server takes every event the bridge accepts: its `max_payload` must
    /// cover `limits.max_event_bytes` plus [`HEADER_RESERVE`]. Otherwise an event could pass
    /// ingest and then be refused by the journal, so the bridge refuses to start, saying
    /// which two settings disagree.
    pub fn check_max_payload(&self, max_event_bytes: usize) -> Result<(), StoreError> {
        let max_payload = self.client.max_payload();
        let needed = max_event_bytes.saturating_add(HEADER_RESERVE);
        if max_payload < needed {
            error!(
                max_payload,
                max_event_bytes,
                needed,
                "NATS max_payload below limits.max_event_bytes plus headers"
            );
            return Err(StoreError::Nats {
                op: "accept events of limits.max_event_bytes",
                source: format!(
                    "the server's max_payload is {max_payload} bytes, below limits.max_event_bytes \
                     ({max_event_bytes}) plus {HEADER_RESERVE} bytes for message headers: raise \
                     max_payload in the NATS server's config to at least {needed}, or lower \
                     limits.max_event_bytes"
                )
                .into(),
            });
        }
        Ok(())
    }

    /// Whether the client is connected to a NATS server now.
    pub fn connected(&self) -> bool {
        matches!(
            self.client.connection_state(),
            async_nats::connection::State::Connected
        )
    }

    /// The names in use.
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// The JetStream context (for leases and the live tail).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// The configured replica count.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// The configured lease TTL.
    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    /// Counts and reports a failed round of an append, then waits `backoff` (doubling it, up
    /// to a second) before the caller tries again.
    async fn failed_round(&self, e: StoreError, backoff: &mut Duration) {
        self.write_failures.fetch_add(1, Ordering::Relaxed);
        if self.journal_ok.swap(false, Ordering::Relaxed) {
            warn!(error = %e, "journal publish failed; retrying until NATS answers (upstream reads are held back meanwhile)");
        }
        tokio::time::sleep(*backoff).await;
        *backoff = (*backoff * 2).min(Duration::from_secs(1));
    }

    /// One round of an append: claims the ids of the events not claimed yet (see [`ids`]),
    /// publishes what is claimed and not yet in `done`, in order, then waits for every ack.
    /// Fills `done` with every outcome it got; returns the first failure that a retry may
    /// cure, if any.
    ///
    /// Every first claim is sent at once (most bases are new: their answers come back in
    /// one round trip), and the events are published a chunk ([`CHUNK`]) at a time as soon
    /// as the chunk's claims are answered: the server answers the next chunk's claims while
    /// this one's events travel, instead of the whole batch waiting for the slowest claim.
    /// An event is published only once its id is decided, and in the batch's order.
    ///
    /// A refusal no retry can cure (larger than the server's `max_payload`, or refused by the
    /// stream for this message alone, such as its `max_msg_size`) is that event's
    /// [`Appended::Rejected`]: retrying it would hold back every event behind it (the ingest
    /// queue fills, upstreams stall) on every instance that reads the same upstream.
    async fn claim_and_publish(
        &self,
        prepared: &mut [Prepared],
        done: &mut [Option<Appended>],
    ) -> Result<(), StoreError> {
        let mut claims = Vec::with_capacity(prepared.len());
        for (i, p) in prepared.iter().enumerate() {
            if !p.claimed && done[i].is_none() {
                claims.push((i, self.ids.claim(&p.base, p.recv_ms).await?));
            }
        }
        let mut claims = claims.into_iter().peekable();
        let mut acks = Vec::with_capacity(prepared.len());
        let mut failed = None;
        let mut start = 0;
        while start < prepared.len() && failed.is_none() {
            let end = start.saturating_add(CHUNK).min(prepared.len());
            let mut chunk = Vec::new();
            while let Some(claim) = claims.next_if(|(i, _)| *i < end) {
                chunk.push(claim);
            }
            let answers = join_all(
                chunk
                    .into_iter()
                    .map(|(i, ack)| async move { (i, ack.await) }),
            )
            .await;
            let mut contested = Vec::new();
            for (i, answer) in answers {
                match ids::IdIndex::first_claim_won(answer) {
                    Ok(true) => prepared[i].claimed = true,
                    Ok(false) => contested.push(i),
                    Err(e) => {
                        failed.get_or_insert(e);
                    }
                }
            }
            let settled = join_all(contested.iter().map(|&i| {
                self.ids
                    .resolve_contested(&prepared[i].base, prepared[i].recv_ms)
            }))
            .await;
            for (i, id) in contested.into_iter().zip(settled) {
                match id {
                    // Already journalled by another instance (or an earlier round).
                    Ok(None) => {
                        prepared[i].claimed = true;
                        done[i] = Some(Appended::Duplicate);
                    }
                    Ok(Some(id)) => {
                        prepared[i].claimed = true;
                        if let Err(e) = prepared[i].renew(id) {
                            error!(event_id = %prepared[i].base, error = %e, "event cannot be serialised under its renewed id; rejected (not journalled)");
                            done[i] = Some(Appended::Rejected);
                        }
                    }
                    Err(e) => {
                        failed.get_or_insert(e);
                    }
                }
            }
            // After a failed claim nothing more is published this round: the events keep
            // their order.
            if failed.is_some() {
                break;
            }
            for (i, p) in prepared.iter().enumerate().take(end).skip(start) {
                if !p.claimed || done[i].is_some() {
                    continue;
                }
                match self.send_event(p).await {
                    Ok(Some(ack)) => acks.push((i, ack)),
                    Ok(None) => done[i] = Some(Appended::Rejected),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            start = end;
        }
        // Every ack sent for is awaited, so that one failure does not make the events after
        // it look like duplicates when they are published again; all at once, so that an
        // outage costs one ack timeout, not one per event.
        let acks = join_all(
            acks.into_iter()
                .map(|(i, ack)| async move { (i, ack.await) }),
        )
        .await;
        for (i, ack) in acks {
            let p = &mut prepared[i];
            let ack = match ack {
                Ok(ack) => ack,
                Err(e) => {
                    if let Some(refusal) = refused_for_good(&e) {
                        error!(
                            event_id = %p.id,
                            subject = %p.subject,
                            size = p.payload.len(),
                            error = %refusal,
                            "the journal stream refused this event; rejected (not journalled)"
                        );
                        done[i] = Some(Appended::Rejected);
                    } else if failed.is_none() {
                        failed = Some(nats_err("journal publish ack")(e));
                    }
                    continue;
                }
            };
            if ack.duplicate {
                done[i] = Some(Appended::Duplicate);
                continue;
            }
            // Each event's outcome is produced once, so its envelope is still here.
            let Some(mut envelope) = p.envelope.take() else {
                continue;
            };
            envelope.seq = Some(ack.sequence);
            done[i] = Some(Appended::Stored {
                seq: ack.sequence,
                bytes: with_seq(&p.payload, ack.sequence),
                envelope: Box::new(envelope),
            });
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Sends one event's publish; returns its ack to await, or `None` when the client refuses
    /// it for good before sending (larger than the server's `max_payload`).
    async fn send_event(
        &self,
        p: &Prepared,
    ) -> Result<Option<jetstream::context::PublishAckFuture>, StoreError> {
        let mut publish = jetstream::message::PublishMessage::build()
            .payload(p.payload.clone())
            .message_id(&p.id);
        if !p.targets.is_empty() {
            publish = publish.header(HEADER_TARGETS, p.targets.as_str());
        }
        match self.js.send_publish(p.subject.clone(), publish).await {
            Ok(ack) => Ok(Some(ack)),
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::MaxPayloadExceeded => {
                error!(
                    event_id = %p.id,
                    size = p.payload.len(),
                    max_payload = self.client.max_payload(),
                    "event larger than the NATS server's max_payload; rejected (not journalled)"
                );
                Ok(None)
            }
            Err(e) => Err(nats_err("publish to the journal")(e)),
        }
    }

    /// An ephemeral ordered consumer on the whole journal, starting where `start` says.
    async fn journal_reader(
        &self,
        start: consumer::DeliverPolicy,
    ) -> Result<consumer::Consumer<consumer::pull::OrderedConfig>, StoreError> {
        // In a cluster that just lost a node, a reader placed on the dead node is never
        // created: give each try a short limit and try again (the server then places it on a
        // live one).
        let mut tries = 0;
        loop {
            tries += 1;
            let created = tokio::time::timeout(
                READER_CREATE_TIMEOUT,
                self.events.create_consumer(consumer::pull::OrderedConfig {
                    filter_subject: self.names.events_filter(),
                    deliver_policy: start,
                    ..Default::default()
                }),
            )
            .await;
            match created {
                Ok(Ok(c)) => return Ok(c),
                Ok(Err(e)) if tries >= READER_CREATE_TRIES => {
                    return Err(nats_err("open a journal reader")(e))
                }
                Err(_) if tries >= READER_CREATE_TRIES => {
                    return Err(StoreError::Nats {
                        op: "open a journal reader",
                        source: "no answer from NATS".into(),
                    })
                }
                _ => continue,
            }
        }
    }

    /// The durable consumers' bucket, created or opened on first use (a deployment without
    /// durable consumers has no such stream).
    async fn durables_bucket(&self) -> Result<&state::Bucket, StoreError> {
        self.durables
            .get_or_try_init(|| async {
                state::Bucket::open(
                    &self.js,
                    &self.names.durables,
                    &format!("{}.durables", self.names.prefix),
                    self.replicas,
                    None,
                )
                .await
            })
            .await
    }

    /// Reads up to `limit` journal messages from `from` (inclusive) through `last`, stopping
    /// before the message that would take the bytes read past `max_bytes` (the first message
    /// is kept whatever its size).
    async fn read_range(
        &self,
        from: u64,
        last: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let consumer = self
            .journal_reader(consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from,
            })
            .await?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(nats_err("read the journal"))?;
        let mut out = Vec::with_capacity(limit.min(1024));
        let mut bytes = 0usize;
        while out.len() < limit {
            let next = match tokio::time::timeout(READ_TIMEOUT, messages.next()).await {
                Ok(Some(m)) => m.map_err(nats_err("read the journal"))?,
                Ok(None) | Err(_) => break,
            };
            let seq = next
                .info()
                .map(|i| i.stream_sequence)
                .map_err(|e| StoreError::Nats {
                    op: "read message info",
                    source: e,
                })?;
            bytes = bytes.saturating_add(next.message.payload.len());
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(StoredEvent {
                seq,
                id: header(&next.message, "Nats-Msg-Id").unwrap_or_default(),
                bytes: with_seq(&next.message.payload, seq),
            });
            if seq >= last {
                break;
            }
        }
        Ok(out)
    }

    /// Every journalled event from `from` on (in pages), for admin replays that select by
    /// content; `visit` returns false to stop.
    async fn scan(
        &self,
        mut from: u64,
        mut visit: impl FnMut(&StoredEvent) -> bool,
    ) -> Result<(), StoreError> {
        loop {
            let page = match self.read_from(from, 1024).await {
                Ok(page) => page,
                // Removed by the stream's limits: what is left is all there is to scan.
                Err(StoreError::NotRetained { first, .. }) => {
                    from = first;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let Some(last) = page.last() else {
                return Ok(());
            };
            from = last.seq + 1;
            for e in &page {
                if !visit(e) {
                    return Ok(());
                }
            }
        }
    }
}

/// A header's value as a string.
pub(crate) fn header(message: &async_nats::Message, name: &str) -> Option<String> {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str().to_string())
}

/// The server's refusal of one publish when no retry can cure it: a JetStream API error in
/// the 4xx class (the request itself is wrong, e.g. `10054`, larger than the stream's
/// `max_msg_size`). Timeouts, lost connections, "no responders" and 5xx errors (a stream
/// without a leader, storage trouble) may pass and are `None`.
fn refused_for_good(e: &jetstream::context::PublishError) -> Option<&jetstream::Error> {
    use std::error::Error as _;
    if e.kind() != jetstream::context::PublishErrorKind::Other {
        return None;
    }
    let api = e.source()?.downcast_ref::<jetstream::Error>()?;
    (api.error_code() == jetstream::ErrorCode(10054) || (400..500).contains(&api.code()))
        .then_some(api)
}

/// One event on its way to the journal.
struct Prepared {
    subject: String,
    /// The event id as ingest gave it: its key in the id index.
    base: String,
    /// The id it is published under: `base`, or a renewed id once the index said so.
    id: String,
    /// When the bridge received it (unix ms): the id index decides by it.
    recv_ms: i64,
    /// Whether the id index has decided its id (or that it is a copy).
    claimed: bool,
    targets: String,
    payload: Bytes,
    /// Until its outcome is known.
    envelope: Option<crate::envelope::Envelope>,
}

impl Prepared {
    fn new(names: &Names, n: NewEvent, now_ms: i64) -> Prepared {
        let mut envelope = n.envelope;
        envelope.seq = None;
        Prepared {
            subject: names.event_subject(&envelope.provider, &envelope.event_type),
            base: envelope.id.clone(),
            id: envelope.id.clone(),
            recv_ms: envelope.received_ms().unwrap_or(now_ms),
            claimed: false,
            targets: n
                .targets
                .iter()
                .map(|t| t.as_ref())
                .collect::<Vec<_>>()
                .join(","),
            // Ingest serialised the envelope; only one stored under a renewed id is
            // serialised again, with that id.
            payload: n.unsequenced,
            envelope: Some(envelope),
        }
    }

    /// Journals it under `id`, which the id index gave it.
    fn renew(&mut self, id: String) -> Result<(), StoreError> {
        if id == self.id {
            return Ok(());
        }
        if let Some(envelope) = self.envelope.as_mut() {
            envelope.id.clone_from(&id);
            self.payload = envelope.to_unsequenced()?;
        }
        self.id = id;
        Ok(())
    }
}

#[async_trait]
impl Store for NatsStore {
    async fn append(&self, batch: Vec<NewEvent>) -> Result<Vec<Appended>, StoreError> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut prepared: Vec<Prepared> = batch
            .into_iter()
            .map(|n| Prepared::new(&self.names, n, now_ms))
            .collect();
        let mut done: Vec<Option<Appended>> = vec![None; prepared.len()];
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.claim_and_publish(&mut prepared, &mut done).await {
                Ok(()) => break,
                Err(e) => self.failed_round(e, &mut backoff).await,
            }
        }
        if !self.journal_ok.swap(true, Ordering::Relaxed) {
            info!("journal publishes succeed again");
        }
        Ok(done
            .into_iter()
            .map(|d| d.unwrap_or(Appended::Duplicate))
            .collect())
    }

    async fn read_from(&self, from: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        self.read_page(from, limit, usize::MAX).await
    }

    async fn read_page(
        &self,
        from: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let info = self
            .events
            .get_info()
            .await
            .map_err(nats_err("read the journal's state"))?;
        let last = info.state.last_sequence;
        let first = info.state.first_sequence;
        // A new stream starts at 0 or 1; a first sequence above 1 means stream limits removed
        // the messages before it. Reading on from there would skip them silently: the reader
        // is told instead (a downstream resume turns it into `unrecoverable_position`).
        if first > 1 && from < first {
            return Err(StoreError::NotRetained { from, first });
        }
        let from = from.max(1);
        if limit == 0 || from > last || info.state.messages == 0 {
            return Ok(Vec::new());
        }
        self.read_range(from, last, limit, max_bytes).await
    }

    async fn position(&self) -> Result<JournalPosition, StoreError> {
        let info = self
            .events
            .get_info()
            .await
            .map_err(nats_err("read the journal's state"))?;
        let head = info.state.last_sequence;
        Ok(JournalPosition {
            epoch: format!(
                "{}@{}",
                info.config.name,
                info.created.unix_timestamp_nanos()
            ),
            head,
            first: if info.state.messages == 0 {
                head + 1
            } else {
                info.state.first_sequence
            },
        })
    }

    async fn delivery_queue(
        &self,
        endpoint: &str,
        options: QueueOptions,
    ) -> Result<Arc<dyn DeliveryQueue>, StoreError> {
        delivery::Queues::queue(&self.queues, endpoint, options).await
    }

    async fn deliveries(
        &self,
        endpoint: &str,
        state: DeliveryState,
        limit: usize,
    ) -> Result<Vec<DeliveryInfo>, StoreError> {
        match state {
            DeliveryState::Dead => self.queues.dead(endpoint, limit).await,
            DeliveryState::Pending => Ok(self.queues.pending(endpoint, limit)),
        }
    }

    async fn counts(&self, endpoint: &str) -> Result<DeliveryCounts, StoreError> {
        self.queues.counts(endpoint).await
    }

    async fn replay(&self, endpoint: &str, selection: ReplaySelection) -> Result<u64, StoreError> {
        let mut queued = 0;
        match selection {
            ReplaySelection::Dead => {
                return Ok(self.queues.replay_dead(endpoint, None).await?.0);
            }
            ReplaySelection::Ids(ids) => {
                let (n, found) = self.queues.replay_dead(endpoint, Some(&ids)).await?;
                queued += n;
                let mut wanted = ids;
                // Ids found among the dead letters are done; the rest come from the journal.
                wanted.retain(|id| !found.contains(id));
                if wanted.is_empty() {
                    return Ok(queued);
                }
                let mut hits = Vec::new();
                self.scan(1, |e| {
                    if wanted.contains(&e.id) {
                        hits.push(e.clone());
                    }
                    hits.len() < wanted.len()
                })
                .await?;
                queued += self.queues.replay_events(endpoint, &hits).await?;
            }
            ReplaySelection::Seqs { from, to } => {
                let mut hits = Vec::new();
                self.scan(from, |e| {
                    if e.seq <= to {
                        hits.push(e.clone());
                    }
                    e.seq < to
                })
                .await?;
                queued += self.queues.replay_events(endpoint, &hits).await?;
            }
            ReplaySelection::Received { since_ms, until_ms } => {
                #[derive(serde::Deserialize)]
                struct Recv {
                    recvtime: String,
                }
                let mut hits = Vec::new();
                self.scan(1, |e| {
                    let at = serde_json::from_slice::<Recv>(&e.bytes)
                        .ok()
                        .and_then(|r| chrono::DateTime::parse_from_rfc3339(&r.recvtime).ok())
                        .map(|t| t.timestamp_millis());
                    if at.is_some_and(|t| t >= since_ms && t <= until_ms) {
                        hits.push(e.clone());
                    }
                    true
                })
                .await?;
                queued += self.queues.replay_events(endpoint, &hits).await?;
            }
        }
        Ok(queued)
    }

    async fn set_disabled(&self, endpoint: &str, reason: Option<String>) -> Result<(), StoreError> {
        self.queues.set_disabled(endpoint, reason).await
    }

    /// See [`durables`] for the bucket, its keys and values, and how `keep_from` relates to
    /// the journal stream's limits (it cannot hold them back).
    async fn durables(&self) -> Result<Vec<SavedDurable>, StoreError> {
        durables::list(self.durables_bucket().await?).await
    }

    async fn save_durable(&self, durable: SavedDurable) -> Result<(), StoreError> {
        durables::save(self.durables_bucket().await?, &durable).await
    }

    async fn delete_durable(&self, key: &DurableKey) -> Result<bool, StoreError> {
        durables::delete(self.durables_bucket().await?, key).await
    }

    /// The journal's own timestamps: JetStream stamps each message when it stores it, a
    /// moment after the bridge received the event (its `recvtime`), so a seek lands on the
    /// first event *stored* at or after `at_ms`; with the bridge's and the server's clocks in
    /// step that includes every event received at or after it.
    async fn seq_at(&self, at_ms: i64) -> Result<u64, StoreError> {
        let info = self
            .events
            .get_info()
            .await
            .map_err(nats_err("read the journal's state"))?;
        // Read before the seek: an event stored meanwhile gets a later seq, so head + 1 never
        // skips it.
        let after_head = info.state.last_sequence.saturating_add(1);
        if info.state.messages == 0 {
            return Ok(after_head);
        }
        // JetStream times are nanoseconds in an i64 on some clients: keep within them.
        let at_ms = at_ms.clamp(0, i64::MAX / 1_000_000);
        let Ok(start_time) = async_nats::datetime::from_nanos(i128::from(at_ms) * 1_000_000) else {
            return Ok(after_head);
        };
        let reader = self
            .journal_reader(consumer::DeliverPolicy::ByStartTime { start_time })
            .await?;
        // The server positions the consumer: nothing pending means no message at or after.
        if reader.cached_info().num_pending == 0 {
            return Ok(after_head);
        }
        let mut messages = reader
            .messages()
            .await
            .map_err(nats_err("seek the journal by time"))?;
        match tokio::time::timeout(READ_TIMEOUT, messages.next()).await {
            Ok(Some(m)) => m
                .map_err(nats_err("seek the journal by time"))?
                .info()
                .map(|i| i.stream_sequence)
                .map_err(|e| StoreError::Nats {
                    op: "read message info",
                    source: e,
                }),
            // Never head + 1 on silence: a seek would then skip everything retained.
            Ok(None) | Err(_) => Err(StoreError::Nats {
                op: "seek the journal by time",
                source: "no answer from NATS".into(),
            }),
        }
    }

    async fn disabled(&self, endpoint: &str) -> Result<Option<String>, StoreError> {
        self.queues.disabled(endpoint).await
    }

    fn shared(&self) -> bool {
        true
    }

    fn unavailable(&self) -> Option<String> {
        if !NatsStore::connected(self) {
            Some("NATS is disconnected".to_string())
        } else if !self.journal_ok.load(Ordering::Relaxed) {
            Some("journal publishes to NATS are failing".to_string())
        } else {
            None
        }
    }

    fn connected(&self) -> Option<bool> {
        Some(NatsStore::connected(self))
    }

    fn write_failures(&self) -> Option<u64> {
        Some(self.write_failures.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_is_appended_as_the_last_member() {}

    #[test]
    fn subjects_are_sanitised_and_do_not_repeat_the_provider() {
        let n = Names::new("t1");
        assert_eq!(
            n.event_subject("voipbin", "voipbin.call.status"),
            "t1.events.voipbin.call.status"
        );
        assert_eq!(
            n.event_subject("hashi", "hashi.lobby:x.*"),
            "t1.events.hashi.lobby_x._"
        );
        assert_eq!(n.event_subject("x", "x."), "t1.events.x._");
        assert_eq!(
            n.event_subject("hashi", "a b.>.\u{7}\n..c"),
            "t1.events.hashi.a_b._.__._.c"
        );
    }

    #[test]
    fn long_tokens_are_hashed_and_subjects_stay_bounded() {
        let n = Names::new(&"p".repeat(64));
        let long = "t".repeat(5000);
        let s = n.event_subject("voicepact", &format!("voicepact.{long}"));
        assert!(s.len() <= MAX_SUBJECT_BYTES, "{}", s.len());
        assert_eq!(
            s,
            format!("{}.events.voicepact.{}", "p".repeat(64), hash_token(&long))
        );
        // Distinct long types get distinct subjects; the same type always the same one.
        let other = n.event_subject("voicepact", &format!("voicepact.{long}x"));
        assert_ne!(s, other);
        assert_eq!(
            s,
            n.event_subject("voicepact", &format!("voicepact.{long}"))
        );
        // Many short tokens: kept while they fit, the rest hashed.
        let dotted = vec!["abcdefgh"; 2000].join(".");
        let s = n.event_subject("hashi", &dotted);
        assert!(s.len() <= MAX_SUBJECT_BYTES, "{}", s.len());
        assert!(s.contains(".abcdefgh.abcdefgh."), "{s}");
        assert!(
            s.rsplit('.').next().is_some_and(|t| t.starts_with("h_")),
            "{s}"
        );
        // A token of exactly the limit is kept.
        let edge = "e".repeat(MAX_TOKEN_BYTES);
        assert_eq!(
            n.event_subject("x", &edge),
            format!("{}.events.x.{edge}", "p".repeat(64))
        );
        for s in [&n.event_subject("x", &long), &n.event_subject("x", &dotted)] {
            assert!(
                s.split('.')
                    .all(|t| !t.is_empty() && t.len() <= MAX_TOKEN_BYTES),
                "{s}"
            );
        }
    }
}
