//! Upstream leases (`ownership = "lease"`): one bridge instance at a time holds an upstream's
//! connection; another takes over within about `storage.lease_ttl` when the holder dies.
//!
//! The lease is a key `upstream.<name>` in the bucket `<prefix>_leases`, whose values expire
//! after the TTL. The holder rewrites it every TTL/3, each time only if nobody else changed it
//! (compare-and-set on the revision). A standby instance tries to create the key every TTL/5;
//! creation succeeds only when the key is absent, so at most one instance wins. A holder that
//! cannot renew for 2/3 of the TTL (NATS unreachable, or a renewal left unanswered) gives the
//! upstream up before its lease can expire and be taken, so two instances never knowingly hold
//! one upstream: the 2/3 are counted from when the last successful write was *sent* (its
//! expiry on the server starts later), and a hanging renewal is cut off at that point. On shutdown
//! (or when a reload removes the upstream) the holder first lets its supervisor close and drain
//! the connection, renewing the lease meanwhile, and only then deletes its lease, so the
//! standby, which takes over at its next try, connects after the drain: what the provider sent
//! to the old holder is journalled by it, and the two never hold the upstream at once.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::state::Bucket;
use super::NatsStore;
use crate::storage::StoreError;

/// The leases of one bridge instance.
pub struct Leases {
    bucket: Arc<Bucket>,
    ttl: Duration,
    /// Identifies this instance in the lease values (for operators reading the bucket).
    instance: String,
}

impl Leases {
    /// Opens (or creates) the lease bucket.
    pub async fn open(store: &NatsStore) -> Result<Leases, StoreError> {
        let names = store.names();
        let bucket = Bucket::open(
            store.jetstream(),
            &names.leases,
            &format!("{}.leases", names.prefix),
            store.replicas(),
            Some(store.lease_ttl()),
        )
        .await?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        Ok(Leases {
            bucket: Arc::new(bucket),
            ttl: store.lease_ttl(),
            instance: format!("pid{}-{nanos:08x}", std::process::id()),
        })
    }

    /// Starts keeping the lease of `upstream`: the returned flag is true while this instance
    /// holds it. When `stop` is cancelled the keeper stops acquiring, keeps renewing a held
    /// lease until every receiver of the flag is dropped (the supervisor has drained its
    /// connection and ended), and then releases the lease.
    pub fn keep(&self, upstream: &str, stop: CancellationToken) -> watch::Receiver<bool> {
        self.keep_key(
            format!("upstream.{}", super::token(upstream)),
            "upstream",
            upstream,
            stop,
        )
    }

    /// Starts keeping the lease of the durable subscription `key`, as [`Leases::keep`] does
    /// for an upstream: one instance at a time serves a durable (its pump and its
    /// connections), so two instances never hand out its events at once.
    pub fn keep_durable(
        &self,
        key: &crate::storage::DurableKey,
        stop: CancellationToken,
    ) -> Result<watch::Receiver<bool>, StoreError> {
        let token = super::durables::encode_key(key)?;
        let what = format!("{}/{}", key.consumer, key.name);
        Ok(self.keep_key(format!("durable.{token}"), "durable", &what, stop))
    }

    /// Keeps the lease under `key` for the `kind` (`upstream`, `durable`) named `name` (for
    /// logs).
    fn keep_key(
        &self,
        key: String,
        kind: &'static str,
        name: &str,
        stop: CancellationToken,
    ) -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(false);
        let bucket = self.bucket.clone();
        let value = Bytes::from(self.instance.clone());
        let ttl = self.ttl;
        let name = name.to_string();
        tokio::spawn(async move {
            // The revision and when the write that produced it was sent: the server's expiry
            // of that write is at least a TTL after this instant.
            let mut held: Option<(u64, Instant)> = None;
            let mut renew_failed = false;
            let mut stopping = false;
            loop {
                if stopping && held.is_none() {
                    // Not holding: nothing to hand over; never acquire while stopping.
                    break;
                }
                let mut wait = if held.is_none() {
                    ttl / 5
                } else if renew_failed {
                    // Try again soon: the lease must be renewed before the give-up point.
                    ttl / 10
                } else {
                    ttl / 3
                };
                held = match held {
                    None => {
                        let sent = Instant::now();
                        // A create answered after the give-up point would hand over a lease
                        // that may already be expiring: treat it as not acquired (it then
                        // expires unused).
                        match tokio::time::timeout(ttl * 2 / 3, bucket.create(&key, value.clone()))
                            .await
                        {
                            Ok(Ok(Some(rev))) => {
                                info!(kind, name = %name, "lease acquired");
                                let _ = tx.send(true);
                                renew_failed = false;
                                Some((rev, sent))
                            }
                            Ok(Ok(None)) => None,
                            Ok(Err(e)) => {
                                warn!(kind, name = %name, error = %e, "cannot try the lease");
                                None
                            }
                            Err(_) => {
                                warn!(kind, name = %name, "no answer from NATS to the lease");
                                None
                            }
                        }
                    }
                    Some((rev, renewed)) => {
                        // Past this point the lease may expire and be taken by another
                        // instance: stop holding by then even if the renewal hangs.
                        let give_up = renewed + ttl * 2 / 3;
                        let sent = Instant::now();
                        match tokio::time::timeout_at(
                            give_up,
                            bucket.update(&key, value.clone(), rev),
                        )
                        .await
                        {
                            Ok(Ok(Some(rev))) => {
                                renew_failed = false;
                                Some((rev, sent))
                            }
                            Ok(Ok(None)) => {
                                warn!(kind, name = %name, "lease taken by another instance");
                                let _ = tx.send(false);
                                None
                            }
                            Ok(Err(e)) if Instant::now() < give_up => {
                                warn!(kind, name = %name, error = %e, "cannot renew the lease; retrying");
                                renew_failed = true;
                                Some((rev, renewed))
                            }
                            Ok(Err(e)) => {
                                warn!(kind, name = %name, error = %e, "cannot renew the lease; giving it up");
                                let _ = tx.send(false);
                                None
                            }
                            Err(_) => {
                                warn!(kind, name = %name, "no answer from NATS to the lease renewal; giving it up");
                                let _ = tx.send(false);
                                None
                            }
                        }
                    }
                };
                if let Some((_, renewed)) = held {
                    // Never sleep past the give-up point.
                    wait =
                        wait.min((renewed + ttl * 2 / 3).saturating_duration_since(Instant::now()));
                }
                tokio::select! {
                    _ = stop.cancelled(), if !stopping => {
                        stopping = true;
                        // The supervisor sees the same token and is draining; wait for it,
                        // renewing meanwhile.
                        let _ = tx.send(false);
                        continue;
                    }
                    // Every receiver gone: the supervisor has ended (after its drain).
                    _ = tx.closed() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            let _ = tx.send(false);
            if let Some((rev, _)) = held {
                // Hand over at once instead of letting the lease run out.
                let _ = bucket.update(&key, Bytes::new(), rev).await;
            }
        });
        rx
    }
}
