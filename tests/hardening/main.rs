//! Hardening regression tests (issue 12): each module reproduces one finding of probing the
//! bridge as a hostile peer, over real sockets, and checks the fix. Module names say which
//! finding they cover, so `cargo test --test hardening <module>` runs one of them.

#[path = "../common/mod.rs"]
mod common;

mod config_errors;
mod connection_limits;
mod dedup_window;
mod duration_bounds;
mod event_size;
mod metrics_lint;
mod nats_long_subject;
mod nesting_depth;
mod replay_memory;
mod shutdown_drain;
mod ssrf_rebinding;
mod store_failure;
mod subscription_reuse;
