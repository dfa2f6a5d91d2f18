//! Every integration test of the bridge, in one binary so that CI links it once. Each module
//! is one area, over real sockets, real simulators, the real journal file, real NATS and
//! real Chromium; `cargo test --test it <module>::` runs one area (for example
//! `cargo test --test it hardening::dedup_window`).

mod common;

mod asyncapi;
mod cli;
mod cli_remote;
mod console;
mod consumers;
mod crash;
mod delivery;
mod dialect_caps;
mod dialects;
mod downstream;
mod durable;
mod durable_sse;
mod golden;
mod hardening;
mod kraken;
mod nats;
mod openapi;
mod ops;
mod receivers;
mod reload;
mod status_page;
mod storage_file;
mod tls;
mod traces;
mod upstream;
