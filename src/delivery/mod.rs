//! Outbound webhooks: signed POSTs of journalled events to configured endpoints, with
//! durable retries, dead letters and replay (README, "Webhook delivery").
//!
//! - [`config`]: `[[webhooks]]`, validated at load;
//! - [`signing`]: the Standard Webhooks signature scheme (`webhook-id`, `webhook-timestamp`,
//!   `webhook-signature`), over the exact bytes sent;
//! - [`ssrf`]: the guard against endpoints that point into the bridge's own network;
//! - `service`: the [`DeliveryService`], one dispatcher per endpoint, and what the admin API
//!   shows of each;
//! - `dispatcher`: one endpoint's loop (due deliveries from its queue, the in-flight bound,
//!   pauses);
//! - `attempt`: one HTTP attempt (request, signature, send, answer or failure);
//! - `outcome`: what an attempt's result means for the delivery (a pure rule).
//!
//! Delivery state lives in the store ([`crate::storage::Store`]), so pending and retrying
//! deliveries resume after a restart; a dispatcher takes and answers deliveries through its
//! endpoint's [`crate::storage::DeliveryQueue`], which never hands out one it holds.

pub mod config;
pub mod signing;
pub mod ssrf;

mod attempt;
mod dispatcher;
mod outcome;
mod service;

pub use config::{Mode, WebhookConfig};
pub use service::{DeliveryError, DeliveryService, EndpointCounters, EndpointView, LatencyFamily};
