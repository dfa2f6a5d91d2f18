//! A small key-value bucket on a JetStream stream, for state every instance must see: which
//! endpoints are disabled, who holds each upstream lease, the durable consumers' state.
//!
//! Why not the client's KV API: it asks the server for its account info first, which this
//! client version cannot parse from the 2.9 servers we run against; the bucket below uses only
//! stream operations that every JetStream server has. Each key is one subject holding its last
//! value (`max_msgs_per_subject = 1`); an empty value means "absent"; the message's stream
//! sequence is the key's revision, and compare-and-set uses `Nats-Expected-Last-Subject-
//! Sequence`, so two instances racing for a lease cannot both win. With a `max_age`, a value
//! that is not rewritten in time disappears (the lease TTL).

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt;

use super::nats_err;
use crate::storage::StoreError;

/// Longest wait for the next key while listing a bucket.
const LIST_TIMEOUT: Duration = Duration::from_secs(5);

/// One bucket.
pub struct Bucket {
    js: jetstream::Context,
    stream: stream::Stream,
    subject_prefix: String,
}

/// A key's value and revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The value (never empty).
    pub value: Bytes,
    /// The revision to pass to [`Bucket::update`].
    pub revision: u64,
}

impl Bucket {
    /// Creates or opens the bucket `name` with subjects `<subject_prefix>.<key>`; values older
    /// than `max_age` (if given) vanish.
    pub async fn open(
        js: &jetstream::Context,
        name: &str,
        subject_prefix: &str,
        replicas: usize,
        max_age: Option<Duration>,
    ) -> Result<Bucket, StoreError> {
        let stream = js
            .get_or_create_stream(stream::Config {
                name: name.to_string(),
                subjects: vec![format!("{subject_prefix}.>")],
                storage: stream::StorageType::File,
                num_replicas: replicas,
                max_messages_per_subject: 1,
                max_age: max_age.unwrap_or_default(),
                discard: stream::DiscardPolicy::Old,
                allow_direct: true,
                ..Default::default()
            })
            .await
            .map_err(nats_err("create a state bucket"))?;
        Ok(Bucket {
            js: js.clone(),
            stream,
            subject_prefix: subject_prefix.to_string(),
        })
    }

    fn subject(&self, key: &str) -> String {
        format!("{}.{key}", self.subject_prefix)
    }

    /// The key's value, if it has one; `Err` only when NATS cannot answer.
    pub async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        Ok(self
            .raw(key)
            .await?
            .and_then(|(value, revision)| (!value.is_empty()).then_some(Entry { value, revision })))
    }

    /// The last message of the key, empty or not.
    async fn raw(&self, key: &str) -> Result<Option<(Bytes, u64)>, StoreError> {
        match self
            .stream
            .get_last_raw_message_by_subject(&self.subject(key))
            .await
        {
            Ok(m) => Ok(Some((m.payload, m.sequence))),
            Err(e) if matches!(e.kind(), stream::LastRawMessageErrorKind::NoMessageFound) => {
                Ok(None)
            }
            Err(e) => Err(nats_err("read shared state")(e)),
        }
    }

    /// Every key that has a value, in key order: read through an ephemeral ordered consumer
    /// that delivers the last message of each key (the stream holds only that one anyway),
    /// until the server says nothing is pending. A key rewritten while the listing runs may
    /// come twice; its newest value (or absence) wins. The caller bounds how many keys there
    /// are (e.g. `max_durables` per consumer).
    pub async fn entries(&self) -> Result<BTreeMap<String, Entry>, StoreError> {
        let consumer = self
            .stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: format!("{}.>", self.subject_prefix),
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .map_err(nats_err("list shared state"))?;
        let mut pending = consumer.cached_info().num_pending;
        let mut out = BTreeMap::new();
        if pending == 0 {
            return Ok(out);
        }
        let mut messages = consumer
            .messages()
            .await
            .map_err(nats_err("list shared state"))?;
        let prefix = format!("{}.", self.subject_prefix);
        while pending > 0 {
            let message = match tokio::time::timeout(LIST_TIMEOUT, messages.next()).await {
                Ok(Some(m)) => m.map_err(nats_err("list shared state"))?,
                Ok(None) | Err(_) => {
                    return Err(StoreError::Nats {
                        op: "list shared state",
                        source: format!(
                            "the listing stopped with {pending} keys still to come (no answer from NATS)"
                        )
                        .into(),
                    })
                }
            };
            let info = message.info().map_err(|source| StoreError::Nats {
                op: "read message info",
                source,
            })?;
            pending = info.pending;
            let revision = info.stream_sequence;
            let Some(key) = message.subject.as_str().strip_prefix(&prefix) else {
                continue;
            };
            // Messages come in stream order: a later one of a key is its newer value.
            if message.payload.is_empty() {
                out.remove(key);
            } else {
                out.insert(
                    key.to_string(),
                    Entry {
                        value: message.payload.clone(),
                        revision,
                    },
                );
            }
        }
        Ok(out)
    }

    /// Sets the key, whatever it held.
    pub async fn put(&self, key: &str, value: Bytes) -> Result<u64, StoreError> {
        let ack = self
            .js
            .publish(self.subject(key), value)
            .await
            .map_err(nats_err("write shared state"))?
            .await
            .map_err(nats_err("write shared state"))?;
        Ok(ack.sequence)
    }

    /// Clears the key.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.put(key, Bytes::new()).await.map(|_| ())
    }

    /// Sets the key only if it has no value; `None` if it has one (someone else won).
    pub async fn create(&self, key: &str, value: Bytes) -> Result<Option<u64>, StoreError> {
        let expected = match self.raw(key).await? {
            None => 0,
            Some((v, _)) if !v.is_empty() => return Ok(None),
            Some((_, rev)) => rev,
        };
        self.set_if(key, value, expected).await
    }

    /// Sets the key only if its revision is still `revision`; `None` if it changed.
    pub async fn update(
        &self,
        key: &str,
        value: Bytes,
        revision: u64,
    ) -> Result<Option<u64>, StoreError> {
        self.set_if(key, value, revision).await
    }

    async fn set_if(
        &self,
        key: &str,
        value: Bytes,
        expected: u64,
    ) -> Result<Option<u64>, StoreError> {
        let publish = PublishMessage::build()
            .payload(value)
            .expected_last_subject_sequence(expected);
        let ack = self
            .js
            .send_publish(self.subject(key), publish)
            .await
            .map_err(nats_err("write shared state"))?;
        match ack.await {
            Ok(a) => Ok(Some(a.sequence)),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(None),
            Err(e) => Err(nats_err("write shared state")(e)),
        }
    }
}
