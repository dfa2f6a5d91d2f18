//! TLS end to end (issue 18): a CA and certificates generated per test (rcgen), real TLS
//! servers on 127.0.0.1 in front of the real provider simulators and webhook receivers, and
//! the real bridge. Covers trust through `tls_ca`, the refusal (and its reason in
//! `/v1/status`, the admin API and the metrics) without it, mutual TLS, expired and
//! wrong-name certificates, `tls_server_name`, the machine's trust store, the NATS store, the
//! config checks, and the bridge serving HTTPS itself.

mod config;
mod front;
mod machine_store;
mod nats_store;
mod pki;
mod server;
mod upstream;
mod webhook;

use std::path::Path;

use serde_json::Value;
use wsbridge::bridge::Bridge;
use wsbridge_adapters::sim::Simulator;

/// The admin token of the bridges these tests start.
pub const ADMIN: &str = "tls-admin-token";

/// A webhook signing secret.
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// `sim`'s URL with its scheme and address replaced: `wss://{host}:{port}` plus its path.
pub fn wss_url(sim: &Simulator, host: &str, port: u16) -> String {
    let plain = format!("ws://{}", sim.local_addr());
    sim.base_url()
        .replacen(&plain, &format!("wss://{host}:{port}"), 1)
}

/// An `[[upstreams]]` block for `sim` reached at `url`, with `extra` lines.
pub fn upstream_at(name: &str, sim: &Simulator, url: &str, extra: &str) -> String {
    crate::common::upstream_block(name, sim, &format!("{}{extra}", crate::common::FAST)).replacen(
        &sim.base_url(),
        url,
        1,
    )
}

/// A `[[webhooks]]` block (loopback allowed, quick retries) with `extra` lines.
pub fn webhook_block(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[[webhooks]]\nname = \"{name}\"\nurl = \"{url}\"\nsecrets = [\"{SECRET}\"]\nallow_private = true\nretry = [\"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\"]\ntimeout = \"5s\"\n{extra}\n"
    )
}

/// A route of every VoIPBIN event to `to`.
pub fn route_block(to: &[&str]) -> String {
    let to: Vec<String> = to.iter().map(|t| format!("{t:?}")).collect();
    format!(
        "[[routes]]\nname = \"calls\"\nproviders = [\"voipbin\"]\nto = [{}]\n",
        to.join(", ")
    )
}

/// Config text from blocks (journal in a fresh directory), with the admin API on.
pub fn config_text(blocks: &[String]) -> String {
    crate::common::config_text(blocks).replacen(
        "[server]\n",
        &format!("[server]\nadmin_token = \"{ADMIN}\"\n"),
        1,
    )
}

/// Loads config text as the bridge does (its files read now).
pub fn parse(text: &str) -> wsbridge::config::Config {
    wsbridge::config::Config::from_toml(text, |_| None, false)
        .unwrap_or_else(|e| panic!("test config: {e}\n{text}"))
}

/// A config from blocks, with the admin API on.
pub fn config(blocks: &[String]) -> wsbridge::config::Config {
    parse(&config_text(blocks))
}

/// Polls `path` (for at most the common deadline) until `pred` holds.
pub async fn wait_json(
    bridge: &Bridge,
    path: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    crate::common::eventually(
        &format!("{what} in {path}"),
        crate::common::DEADLINE,
        || async {
            let v = get_json(bridge, path).await;
            if pred(&v) {
                Ok(v)
            } else {
                Err(v)
            }
        },
    )
    .await
}

/// Whether the metrics text has the series `name{..labels..}` (labels in any order) with a
/// value of at least 1.
pub fn has_series(metrics: &str, name: &str, labels: &[(&str, &str)]) -> bool {
    metrics.lines().any(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('{'))
            .is_some_and(|rest| {
                labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
                    && rest
                        .rsplit(' ')
                        .next()
                        .and_then(|n| n.parse::<f64>().ok())
                        .is_some_and(|n| n >= 1.0)
            })
    })
}

/// GET `path` from the bridge (with the admin token) as JSON.
pub async fn get_json(bridge: &Bridge, path: &str) -> Value {
    crate::common::http_client()
        .get(format!("http://{}{path}", bridge.local_addr()))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("request")
        .bytes()
        .await
        .map(|b| serde_json::from_slice(&b).expect("JSON"))
        .expect("body")
}

pub use crate::common::metrics_text as metrics;

/// The entry called `name` in `list`.
pub fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .and_then(|l| l.iter().find(|e| e["name"] == name))
        .unwrap_or_else(|| panic!("no {name:?} in {list}"))
}

/// A fresh directory for a test's certificate files.
pub fn cert_dir(tag: &str) -> std::path::PathBuf {
    crate::common::temp_dir(&format!("tls-{tag}"))
}

/// TOML for a path value.
pub fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// `tls_cert` and `tls_key` lines for a certificate and its key.
pub fn cert_lines((cert, key): &(std::path::PathBuf, std::path::PathBuf)) -> String {
    format!(
        "tls_cert = {}\ntls_key = {}\n",
        toml_path(cert),
        toml_path(key)
    )
}

/// Config `text` with the bridge serving TLS with `files` (certificate, key).
pub fn serving_tls(text: &str, files: &(std::path::PathBuf, std::path::PathBuf)) -> String {
    text.replacen("[server]\n", &format!("[server]\n{}", cert_lines(files)), 1)
}
