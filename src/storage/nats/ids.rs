//! The id index: which id each event id as ingest gave it (its *base*) was last journalled
//! under, and when it was received, shared by every instance.
//!
//! JetStream's own duplicate window (`Nats-Msg-Id`) only collapses copies published within
//! it; an id published again later would be stored a second time under the same id. The rule
//! every backend follows (see [`crate::storage`]) is: a copy received within the dedup window
//! of the newest event with its base is that event; later, it is a new event with a fresh id
//! ([`renewed_id`]). To decide that on several instances at once, each base has one subject in
//! the stream `<prefix>_ids` (`<prefix>.ids.<digest of the base>`, one message kept per
//! subject) holding `{"id", "recv_ms"}` of its newest event.
//!
//! An instance *claims* a base by publishing to its subject with JetStream's
//! expected-last-subject-sequence check: 0 for a base never seen (the common case: one round
//! trip, pipelined for a whole batch), or the sequence of the record it read. Exactly one
//! claimant wins; a loser reads the winner's record and uses its id, so both publish the event
//! under the same `Nats-Msg-Id` and JetStream keeps one. The decision to drop a copy is always
//! JetStream's (by `Nats-Msg-Id`), never the index's alone, so a claimant that died before
//! publishing does not cost the event: the other instance's copy is stored. The journal
//! stream's duplicate window is twice the dedup window, so that every copy the index calls a
//! copy is still inside it whatever the instances' clock skew and publish delays.

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{nats_err, Names};
use crate::storage::{renewed_id, StoreError};

/// Most claim rounds for one base (each lost to another instance's claim) before the append
/// is failed and retried.
const MAX_ROUNDS: usize = 8;

/// The newest event of one base, as its index record holds it.
#[derive(Serialize, Deserialize)]
struct Record {
    id: String,
    recv_ms: i64,
}

/// The id index of one journal (see the module doc).
pub(crate) struct IdIndex {
    js: jetstream::Context,
    stream: stream::Stream,
    prefix: String,
    window_ms: i64,
}

impl IdIndex {
    /// Creates or opens `<prefix>_ids`.
    pub(crate) async fn open(
        js: &jetstream::Context,
        names: &Names,
        replicas: usize,
        window: std::time::Duration,
    ) -> Result<IdIndex, StoreError> {
        let stream = js
            .get_or_create_stream(stream::Config {
                name: names.ids.clone(),
                description: Some("wsbridge id index: newest event per id".into()),
                subjects: vec![format!("{}.ids.*", names.prefix)],
                storage: stream::StorageType::File,
                num_replicas: replicas,
                max_messages_per_subject: 1,
                discard: stream::DiscardPolicy::Old,
                allow_direct: true,
                ..Default::default()
            })
            .await
            .map_err(nats_err("create the id index stream"))?;
        Ok(IdIndex {
            js: js.clone(),
            stream,
            prefix: names.prefix.clone(),
            window_ms: i64::try_from(window.as_millis()).unwrap_or(i64::MAX),
        })
    }

    /// Sends the first claim of `base` (received at `recv_ms`, unix ms): it holds only if the
    /// base was never seen, which is the common case, so an append sends its events' first
    /// claims pipelined and reads the answers with [`IdIndex::first_claim_won`].
    pub(crate) async fn claim(
        &self,
        base: &str,
        recv_ms: i64,
    ) -> Result<jetstream::context::PublishAckFuture, StoreError> {
        self.send_claim(base, 0, base, recv_ms).await
    }

    /// What the answer to a first claim says: `true` when it won (the event is journalled
    /// under its base), `false` when the base has a record (decide with
    /// [`IdIndex::resolve_contested`]).
    pub(crate) fn first_claim_won(
        answer: Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
    ) -> Result<bool, StoreError> {
        match answer {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(false),
            Err(e) => Err(nats_err("claim an event id")(e)),
        }
    }

    /// The id an event is journalled under when the first claim of its base lost (the base
    /// has a record): the id of the newest event with that base when received within the
    /// dedup window of it (a copy), a fresh id when received after it (claimed again).
    /// `None` for an event received more than the window *before* the newest one (an
    /// instance that held it through a long outage): the journal already moved past it, and
    /// publishing it under the newest id would store that id twice once JetStream's window
    /// is over, so it is taken for a copy of what the other instances stored.
    pub(crate) async fn resolve_contested(
        &self,
        base: &str,
        recv_ms: i64,
    ) -> Result<Option<String>, StoreError> {
        let subject = self.subject(base);
        for _ in 0..MAX_ROUNDS {
            // From the stream leader: a replica could still miss the record just claimed.
            let (last_seq, candidate) = match self
                .stream
                .get_last_raw_message_by_subject(&subject)
                .await
            {
                Ok(message) => {
                    match serde_json::from_slice::<Record>(&message.payload) {
                        Ok(record) if recv_ms.saturating_add(self.window_ms) < record.recv_ms => {
                            return Ok(None);
                        }
                        Ok(record) if recv_ms.saturating_sub(record.recv_ms) <= self.window_ms => {
                            return Ok(Some(record.id));
                        }
                        // A return after the window (or a record that cannot be read): a new
                        // event, with an id no earlier event of this base can have.
                        _ => (message.sequence, renewed_id(base, message.sequence)),
                    }
                }
                Err(e)
                    if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
                {
                    (0, base.to_string())
                }
                Err(e) => return Err(nats_err("read an id index record")(e)),
            };
            let ack = self.send_claim(base, last_seq, &candidate, recv_ms).await?;
            match ack.await {
                Ok(_) => return Ok(Some(candidate)),
                // Another instance claimed it first: read its record.
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => continue,
                Err(e) => return Err(nats_err("claim an event id")(e)),
            }
        }
        Err(StoreError::Nats {
            op: "claim an event id",
            source: format!(
                "the id index record of one event changed {MAX_ROUNDS} times while it was claimed"
            )
            .into(),
        })
    }

    /// Sends a claim of `base` for `id` that holds only if the base's newest record is
    /// `last_seq` (0: none); returns the ack to await.
    async fn send_claim(
        &self,
        base: &str,
        last_seq: u64,
        id: &str,
        recv_ms: i64,
    ) -> Result<jetstream::context::PublishAckFuture, StoreError> {
        let record = serde_json::to_vec(&Record {
            id: id.to_string(),
            recv_ms,
        })?;
        let publish = jetstream::message::PublishMessage::build()
            .payload(Bytes::from(record))
            .expected_last_subject_sequence(last_seq);
        self.js
            .send_publish(self.subject(base), publish)
            .await
            .map_err(nats_err("claim an event id"))
    }

    /// `<prefix>.ids.<32 hex digits of SHA-256(base)>`: one subject per base, whatever
    /// characters the base has.
    fn subject(&self, base: &str) -> String {
        let digest = Sha256::digest(base.as_bytes());
        format!("{}.ids.{}", self.prefix, hex::encode(&digest[..16]))
    }
}
