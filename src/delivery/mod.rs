//! Outbound webhooks: signed POSTs of journalled events to configured endpoints, with
//! durable retries, dead letters and replay (README, "Webhook delivery").
//!
//! - [`config`]: `[[webhooks]]`, validated at load;
//! - [`signing`]: the Standard Webhooks signature scheme (`webhook-id`, `webhook-timestamp`,
//!   `webhook-signature`), over the exact bytes sent;
//! - [`ssrf`]: the guard against endpoints that point into the bridge's own network;
//! - [`worker`]: the per-endpoint dispatchers and attempts.
//!
//! Delivery state lives in the store ([`crate::storage::Store`]), so pending and retrying
//! deliveries resume after a restart.

pub mod config;
pub mod signing;
pub mod ssrf;
pub mod worker;

pub use config::{Mode, WebhookConfig};
pub use worker::{DeliveryService, EndpointView};
