//! Hardening regression tests (issue 12): each module reproduces one finding of probing the
//! bridge as a hostile peer, over real sockets, and checks the fix. Module names say which
//! finding they cover, so `cargo test --test hardening <module>` runs one of them.

#[path = "../common/mod.rs"]
mod common;
mod ssrf_rebinding;
