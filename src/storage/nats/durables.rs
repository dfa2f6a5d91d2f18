//! Durable consumers' saved state on NATS: one key per durable in the bucket
//! `<prefix>_durables` ([`Bucket`]), so every instance sees the same state.
//!
//! Key: `<hex(consumer)>_<hex(name)>` (lowercase hex of the UTF-8 bytes), one subject token
//! whatever characters the names hold (a consumer's or a durable's name may contain `.`,
//! `*`, `>` or spaces, which a subject cannot), never empty, and decoded back for
//! [`list`]. Its length is bounded ([`MAX_KEY_BYTES`]).
//!
//! Value, version 1: one byte `1`, then `keep_from` as 8 bytes big-endian, then the state
//! bytes as given (possibly none). A value is never empty, so the bucket's "empty value means
//! absent" convention ([`delete`]) cannot be mistaken for a durable. A value of another
//! version or too short is skipped by [`list`] with an error log (a newer bridge's durable
//! is left alone, not deleted).
//!
//! Retention and `keep_from`: the bridge does not prune the NATS journal (`storage.retention`
//! is the embedded store's); what removes events there is the journal stream's own limits
//! (`max_age`, `max_bytes`, `max_msgs`), set by the operator, and the server applies them
//! without asking the bridge. `keep_from` is therefore stored but NOT honoured on NATS: a
//! limit may remove events a durable still owes, and its next read from there gets
//! [`StoreError::NotRetained`] like any reader that fell behind the stream's limits. Size the
//! limits above the longest a durable may stay behind (`durable_ttl`).

use bytes::{BufMut, Bytes, BytesMut};
use tracing::error;

use super::state::Bucket;
use crate::storage::{DurableKey, SavedDurable, StoreError};

/// The value format written by this version.
const VERSION: u8 = 1;
/// Bytes before the state in a value: the version and `keep_from`.
const HEADER: usize = 9;
/// Longest encoded key: with the prefix it stays well within a subject's bounds (the
/// publish's control line); consumer and durable names are far shorter.
pub const MAX_KEY_BYTES: usize = 1024;
/// Tries of a delete that another instance's save keeps overtaking.
const DELETE_TRIES: usize = 16;

/// The bucket key of `key`; an error when the names are too long to make a subject of.
pub(crate) fn encode_key(key: &DurableKey) -> Result<String, StoreError> {
    let encoded = format!("{}_{}", hex::encode(&key.consumer), hex::encode(&key.name));
    if encoded.len() > MAX_KEY_BYTES {
        return Err(StoreError::Nats {
            op: "name a durable's key",
            source: format!(
                "consumer and durable name take {} bytes encoded, above {MAX_KEY_BYTES}",
                encoded.len()
            )
            .into(),
        });
    }
    Ok(encoded)
}

/// The durable a bucket key names; `None` when it is not one [`encode_key`] made.
fn decode_key(encoded: &str) -> Option<DurableKey> {
    let (consumer, name) = encoded.split_once('_')?;
    let text = |h: &str| String::from_utf8(hex::decode(h).ok()?).ok();
    Some(DurableKey {
        consumer: text(consumer)?,
        name: text(name)?,
    })
}

/// The value saved for `durable` (see the module doc).
fn encode_value(durable: &SavedDurable) -> Bytes {
    let mut v = BytesMut::with_capacity(HEADER.saturating_add(durable.state.len()));
    v.put_u8(VERSION);
    v.put_u64(durable.keep_from);
    v.put_slice(&durable.state);
    v.freeze()
}

/// `(keep_from, state)` of a saved value; `None` for a value this version cannot read.
fn decode_value(value: &Bytes) -> Option<(u64, Bytes)> {
    if value.len() < HEADER || value[0] != VERSION {
        return None;
    }
    let keep_from = u64::from_be_bytes(value[1..HEADER].try_into().ok()?);
    Some((keep_from, value.slice(HEADER..)))
}

/// Every saved durable, in key order.
pub async fn list(bucket: &Bucket) -> Result<Vec<SavedDurable>, StoreError> {
    let mut out = Vec::new();
    for (encoded, entry) in bucket.entries().await? {
        let decoded = decode_key(&encoded)
            .and_then(|key| decode_value(&entry.value).map(|(k, s)| (key, k, s)));
        match decoded {
            Some((key, keep_from, state)) => out.push(SavedDurable {
                key,
                state,
                keep_from,
            }),
            None => error!(
                key = %encoded,
                bytes = entry.value.len(),
                "a durable's saved state is unreadable (another version's?); skipped"
            ),
        }
    }
    // Hex keeps neither the names' order nor where one ends: sort by the names themselves.
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

/// Saves `durable`, replacing what was saved; returns once the stream has stored it.
pub async fn save(bucket: &Bucket, durable: &SavedDurable) -> Result<(), StoreError> {
    bucket
        .put(&encode_key(&durable.key)?, encode_value(durable))
        .await
        .map(|_| ())
}

/// Deletes `key`'s saved state; `false` when there was none. Compare-and-set on the
/// revision read, so a save another instance made meanwhile is not lost unseen: the delete
/// then reads again and deletes that.
pub async fn delete(bucket: &Bucket, key: &DurableKey) -> Result<bool, StoreError> {
    let encoded = encode_key(key)?;
    for _ in 0..DELETE_TRIES {
        let Some(entry) = bucket.get(&encoded).await? else {
            return Ok(false);
        };
        if bucket
            .update(&encoded, Bytes::new(), entry.revision)
            .await?
            .is_some()
        {
            return Ok(true);
        }
    }
    Err(StoreError::Nats {
        op: "delete a durable",
        source: format!("its state changed under each of {DELETE_TRIES} tries").into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(consumer: &str, name: &str) -> DurableKey {
        DurableKey {
            consumer: consumer.into(),
            name: name.into(),
        }
    }

    #[test]
    fn keys_are_one_subject_token_and_decode_back() {
        for k in [
            key("billing", "sync"),
            key("a.b", "*>_ x"),
            key("", ""),
            key("ü", "名前"),
        ] {
            let encoded = encode_key(&k).unwrap();
            assert!(!encoded.is_empty());
            assert!(
                encoded.chars().all(|c| c.is_ascii_hexdigit() || c == '_'),
                "{encoded}"
            );
            assert_eq!(decode_key(&encoded), Some(k));
        }
        assert_eq!(decode_key("zz_00"), None);
        assert_eq!(decode_key("6162"), None);
        assert!(encode_key(&key(&"c".repeat(600), "n")).is_err());
    }

    #[test]
    fn values_carry_keep_from_and_the_state_byte_for_byte() {
        let d = SavedDurable {
            key: key("c", "n"),
            state: Bytes::from_static(&[0, 1, 255]),
            keep_from: 0x0102_0304_0506_0708,
        };
        let v = encode_value(&d);
        assert_eq!(&v[..HEADER], &[1, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(decode_value(&v), Some((d.keep_from, d.state.clone())));
        let empty = SavedDurable {
            state: Bytes::new(),
            ..d
        };
        let v = encode_value(&empty);
        assert!(!v.is_empty(), "never the bucket's 'absent'");
        assert_eq!(decode_value(&v), Some((empty.keep_from, Bytes::new())));
        assert_eq!(
            decode_value(&Bytes::from_static(&[2, 0, 0, 0, 0, 0, 0, 0, 1])),
            None
        );
        assert_eq!(decode_value(&Bytes::from_static(&[1, 0])), None);
    }
}
