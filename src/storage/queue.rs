//! One endpoint's delivery queue, the one contract both backends keep: a delivery the queue
//! hands out is *held* for its taker until answered, and **a queue never hands out what it
//! holds**. The dispatcher therefore needs no bookkeeping of its own to avoid sending a
//! delivery twice at once, whichever backend it runs on.
//!
//! - [`DeliveryQueue::due`] hands out due deliveries as [`HeldDelivery`] handles;
//! - [`DeliveryQueue::record`] answers one with an attempt's outcome (the ack, or the nack
//!   with a retry time): the outcome is committed, then the delivery is no longer held, so it
//!   comes back (a retry) only once its outcome says it is due;
//! - dropping a handle unanswered ([`DeliveryQueue::release`]) is a nack without an attempt:
//!   the delivery is offered again at once.
//!
//! The embedded store holds in memory, per endpoint, the seqs it handed out (its rows stay
//! `pending` in the file, so a crash forgets nothing: they are sent again); the NATS store
//! holds the JetStream messages it fetched and has not answered (`nats::held`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{AttemptRecord, DueDelivery, NextStep, StoreError};

/// How an endpoint's queue is set up (from the endpoint's `[[webhooks]]` settings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueOptions {
    /// `webhooks[].ordered`: the store offers a subject's delivery (NATS: the endpoint's)
    /// only once no older one is pending.
    pub ordered: bool,
    /// How long an attempt may run before a shared store may hand the delivery to another
    /// instance (it must exceed the endpoint's timeout). Stores used by one process only
    /// ignore it.
    pub ack_wait: Duration,
    /// Most deliveries the queue holds at once (running, and answered but not yet
    /// recorded): `due` hands out no more than leaves it at this. It bounds the queue's
    /// memory whatever its caller does; the dispatcher asks for `2 × max_in_flight`, which
    /// it never reaches by itself (`max_in_flight` running plus as many being recorded).
    pub max_held: usize,
}

/// What un-holds a delivery when its handle is dropped unanswered: the queue's table of
/// held deliveries. Implemented by each backend's table; a queue that wraps another (a
/// test's) passes the inner queue's handles through untouched.
pub trait Holder: Send + Sync {
    /// `seq` is no longer held by its taker: offer it again.
    fn unhold(&self, seq: u64);
}

/// A delivery handed out by a [`DeliveryQueue`] and held for its taker: the queue hands it
/// to no one else until it is answered ([`DeliveryQueue::record`]) or dropped (released,
/// offered again). Derefs to the delivery itself.
pub struct HeldDelivery {
    delivery: DueDelivery,
    /// `None` once the queue took over answering it.
    holder: Option<Arc<dyn Holder>>,
}

impl HeldDelivery {
    /// `delivery`, held in `holder` (which the queue has already marked it held in).
    pub fn new(delivery: DueDelivery, holder: Arc<dyn Holder>) -> HeldDelivery {
        HeldDelivery {
            delivery,
            holder: Some(holder),
        }
    }

    /// The delivery, without un-holding it: the queue that answers it (in
    /// [`DeliveryQueue::record`]) un-holds it itself once its outcome is committed.
    pub fn into_delivery(mut self) -> DueDelivery {
        self.holder = None;
        std::mem::take(&mut self.delivery)
    }
}

impl std::ops::Deref for HeldDelivery {
    type Target = DueDelivery;

    fn deref(&self) -> &DueDelivery {
        &self.delivery
    }
}

impl std::fmt::Debug for HeldDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldDelivery")
            .field("seq", &self.delivery.seq)
            .field("id", &self.delivery.id)
            .field("attempts", &self.delivery.attempts)
            .field("held", &self.holder.is_some())
            .finish()
    }
}

impl Drop for HeldDelivery {
    fn drop(&mut self) {
        if let Some(holder) = self.holder.take() {
            holder.unhold(self.delivery.seq);
        }
    }
}

/// One webhook endpoint's delivery queue, from [`super::Store::delivery_queue`]. Methods are
/// async so that network-backed stores fit.
#[async_trait]
pub trait DeliveryQueue: Send + Sync + 'static {
    /// Up to `limit` deliveries due at `now_ms` (unix ms), oldest seq first, each held for
    /// the caller: never one that is held already (handed out and not yet answered). With
    /// `ordered`, only the oldest pending delivery of each subject (NATS: of the endpoint) is
    /// eligible, so a held one holds back the rest of its subject.
    async fn due(&self, now_ms: i64, limit: usize) -> Result<Vec<HeldDelivery>, StoreError>;

    /// When the earliest pending delivery due strictly after `after_ms` is due (unix ms), if
    /// any: the dispatcher's next wake-up.
    async fn next_due(&self, after_ms: i64) -> Result<Option<i64>, StoreError>;

    /// Answers a held delivery: records the attempt and applies its outcome (delivered, retry
    /// at, dead letter), then un-holds it. `Err`: the outcome is not recorded; the delivery
    /// stays pending and is handed out again (at-least-once).
    async fn record(
        &self,
        held: HeldDelivery,
        attempt: AttemptRecord,
        next: NextStep,
    ) -> Result<(), StoreError>;

    /// Hands back a delivery that was not attempted (the in-flight or rate limit was
    /// reached): offered again on the next `due`. The same as dropping the handle.
    fn release(&self, held: HeldDelivery) {
        drop(held);
    }
}
