//! Shared test plumbing: simulators on ephemeral ports, a bridge config pointing at them, and
//! waits with deadlines (tests never sleep for a fixed time).

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use wsbridge::bridge::Bridge;
use wsbridge::config::Config;
use wsbridge::envelope::Published;
use wsbridge::upstream::{UpstreamHandle, UpstreamState, UpstreamStatus};
use wsbridge_adapters::sim::{self, SimOptions, Simulator};
use wsbridge_adapters::Provider;

/// How long any single wait in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Timings that make reconnects quick in tests.
pub const FAST: &str = "backoff_initial = \"50ms\"\nbackoff_max = \"400ms\"\nping_interval = \"100ms\"\nstale_after = \"1s\"\n";

/// A VoIPBIN `call.status` frame numbered `i` (id, subject and `data.n` all carry it), the
/// event most tests stream.
pub fn numbered_call(i: usize) -> serde_json::Value {
    wsbridge_adapters::voipbin::wire::event(
        "call.status",
        "2024-01-15T10:30:00.000000Z",
        &format!("customer_id:abc123:call:c{i}"),
        serde_json::json!({"id": format!("c{i}"), "status": "ringing", "n": i}),
    )
}

/// A Hashi `lobby.joined` frame in lobby `ABC123` numbered `n` (in its payload, so each is a
/// distinct event).
pub fn numbered_lobby_join(n: u64) -> serde_json::Value {
    wsbridge_adapters::hashi::wire::event(
        "lobby",
        "lobby.joined",
        serde_json::json!({"lobbyId": "ABC123", "timestamp": "2024-01-15T10:30:00.000Z", "payload": {"n": n}}),
    )
}

/// The repository's root (to read documents and scripts from it).
pub fn repo() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// An HTTP client for talking to a bridge; installs rustls' crypto first, since a test process
/// that only spawns the binary has not started a bridge that would have done it.
pub fn http_client() -> reqwest::Client {
    wsbridge::install_crypto_provider();
    reqwest::Client::new()
}

/// Starts one simulator of `provider` on an ephemeral port.
pub async fn start_sim(provider: Provider) -> Simulator {
    Simulator::start(provider, SimOptions::for_provider(provider))
        .await
        .expect("simulator starts")
}

/// A `[[upstreams]]` block for `sim`, with `extra` lines appended.
pub fn upstream_block(name: &str, sim: &Simulator, extra: &str) -> String {
    let specific = match sim.provider() {
        Provider::VoicePact => "client_id = \"+254700000001\"\n".to_string(),
        Provider::Voipbin => format!(
            "token = \"{}\"\ntopics = [\"customer_id:abc123:call:*\"]\n",
            sim::DEFAULT_VOIPBIN_TOKEN
        ),
        Provider::Hashi => format!(
            "token = \"{}\"\nlobbies = [\"ABC123\"]\n",
            sim::DEFAULT_HASHI_TOKEN
        ),
    };
    format!(
        "[[upstreams]]\nname = \"{name}\"\nadapter = \"{}\"\nurl = \"{}\"\n{specific}{extra}\n",
        sim.provider().name(),
        sim.base_url()
    )
}

/// A fresh, empty directory for one test's files (under the system temp dir).
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("wsbridge-test-{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Config text from blocks, with the journal in a fresh temp directory.
pub fn config_text(blocks: &[String]) -> String {
    let db = temp_dir("journal").join("wsbridge.db");
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\npath = {:?}\n\n{}",
        db.display().to_string(),
        blocks.concat()
    )
}

/// A config from blocks, with its journal in a fresh temp directory.
pub fn config(blocks: &[String]) -> Config {
    let text = config_text(blocks);
    Config::from_toml(&text, |_| None, false).unwrap_or_else(|e| panic!("test config: {e}\n{text}"))
}

/// A config from blocks with `server.admin_token` set to `token` (the admin API on), its
/// journal in a fresh temp directory.
pub fn config_with_admin(blocks: &[String], token: &str) -> Config {
    let text = config_text(blocks).replacen(
        "[server]\n",
        &format!("[server]\nadmin_token = \"{token}\"\n"),
        1,
    );
    Config::from_toml(&text, |_| None, false).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// Waits until the upstream's status satisfies `pred`.
pub async fn wait_status(
    u: &UpstreamHandle,
    what: &str,
    pred: impl Fn(&UpstreamStatus) -> bool,
) -> UpstreamStatus {
    let mut rx = u.watch_status();
    let got = match tokio::time::timeout(DEADLINE, rx.wait_for(|s| pred(s))).await {
        Ok(Ok(s)) => s.clone(),
        _ => panic!(
            "upstream {} never got {what}; status now {:?}",
            u.name(),
            u.status()
        ),
    };
    got
}

/// Waits until the simulator has `connections` open connections that carry subscriptions
/// (or, for VoicePact, which has none, just `connections` open ones). VoIPBIN and Hashi do
/// not acknowledge subscriptions, so "subscribed" on our side does not yet mean the server
/// has read the frame; emitting before this could reach nobody.
pub async fn wait_sim_ready(sim: &Simulator, connections: usize) {
    sim.wait_subscribed(connections, DEADLINE)
        .await
        .unwrap_or_else(|s| {
            panic!(
                "{:?} simulator never saw {connections} subscribed connection(s): {s:?}",
                sim.provider()
            )
        });
}

/// Waits until the upstream is subscribed.
pub async fn wait_subscribed(u: &UpstreamHandle) -> UpstreamStatus {
    wait_status(u, "subscribed", |s| s.state == UpstreamState::Subscribed).await
}

/// Receives published events until one satisfies `pred`, failing at the deadline.
pub async fn next_matching(
    rx: &mut broadcast::Receiver<Arc<Published>>,
    what: &str,
    pred: impl Fn(&Published) -> bool,
) -> Arc<Published> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(p)) if pred(&p) => return p,
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => panic!("waiting for {what}: {e}"),
            Err(_) => panic!("no {what} within {DEADLINE:?}"),
        }
    }
}

/// Starts a bridge and waits until every upstream is subscribed.
pub async fn start_bridge(config: &Config) -> (Bridge, broadcast::Receiver<Arc<Published>>) {
    // The receiver is taken before any upstream starts: a provider that sends at once (on
    // subscribe) cannot publish before the test listens.
    let (bridge, rx) = Bridge::start_watched(config).await.expect("bridge starts");
    for u in bridge.upstreams() {
        wait_subscribed(&u).await;
    }
    (bridge, rx)
}

/// Waits (deadline 60 s) until ingest has published `n` events: for tests that first fill
/// the journal with thousands of events.
pub async fn wait_published(bridge: &Bridge, n: u64) {
    eventually(
        &format!("{n} events published"),
        Duration::from_secs(60),
        || async {
            let stats = bridge.ingest_stats();
            if stats.published >= n {
                Ok(())
            } else {
                Err(format!("{stats:?}"))
            }
        },
    )
    .await;
}

/// Overwrites the journalled body at `seq` in the embedded store's file at `path` with bytes
/// that are not an envelope, as a disk or a bad restore would: the consumer must be told
/// (`unreadable_event`), never meet a silent gap.
pub async fn damage_journal_entry(path: std::path::PathBuf, seq: u64) {
    examples::blocking(move || {
        let db = rusqlite::Connection::open(&path).expect("open the journal");
        db.busy_timeout(DEADLINE).expect("busy timeout");
        let n = db
            .execute(
                "UPDATE events SET body = ?1 WHERE seq = ?2",
                rusqlite::params![b"{\"not\":\"an envelope\"".to_vec(), seq as i64],
            )
            .expect("update");
        assert_eq!(n, 1, "one journal entry at seq {seq}");
    })
    .await
}

/// How often [`eventually`] asks again: often enough that a wait ends soon after its
/// condition holds, seldom enough that waiting does not take a core from what it waits for.
const POLL: Duration = Duration::from_millis(10);

/// What a condition polled by [`eventually`] answers. `Some(v)` or `Ok(v)` ends the wait
/// with `v`; `None` asks again, and so does `Err(seen)`, whose last `seen` (the state the test
/// is waiting to change) the failure message shows.
pub trait Polled {
    /// What the wait returns once the condition holds.
    type Value;
    /// `Ok` when the condition holds; otherwise what was seen, if the condition says.
    fn ready(self) -> Result<Self::Value, Option<String>>;
}

impl<T> Polled for Option<T> {
    type Value = T;
    fn ready(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

impl<T, E: std::fmt::Display> Polled for Result<T, E> {
    type Value = T;
    fn ready(self) -> Result<T, Option<String>> {
        self.map_err(|seen| Some(seen.to_string()))
    }
}

/// Polls `condition` every 10 ms until it holds, and returns what it answered then; panics
/// with `what` (the state waited for) and `limit` if it still does not hold at the deadline.
/// The one way tests wait for state they cannot be told about: they never sleep a fixed
/// time, and never spin (a spinning wait takes the core the bridge needs on a small machine).
pub async fn eventually<F, Fut>(
    what: &str,
    limit: Duration,
    mut condition: F,
) -> <Fut::Output as Polled>::Value
where
    F: FnMut() -> Fut,
    Fut: std::future::Future,
    Fut::Output: Polled,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let seen = match condition().await.ready() {
            Ok(value) => return value,
            Err(seen) => seen,
        };
        if tokio::time::Instant::now() >= deadline {
            match seen {
                Some(seen) => panic!("waited {limit:?} for {what}; last seen: {seen}"),
                None => panic!("waited {limit:?} for {what}"),
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

pub mod examples;
pub mod nats;
pub mod receiver;
pub mod ws;

/// The bridge's `/metrics` text (the Prometheus text format).
pub async fn metrics_text(bridge: &Bridge) -> String {
    get_text(bridge, "/metrics").await
}

/// The body of the bridge's answer to `GET path`.
pub async fn get_text(bridge: &Bridge, path: &str) -> String {
    http_client()
        .get(format!("http://{}{path}", bridge.local_addr()))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
        .text()
        .await
        .unwrap_or_else(|e| panic!("body of GET {path}: {e}"))
}

/// Every event id in the journal file `db`, in `seq` order, read straight from SQLite (for
/// tests that stop the bridge process and look at what it left).
pub fn journal_ids(db: &std::path::Path) -> Vec<String> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open journal");
    let mut stmt = conn
        .prepare("SELECT id FROM events ORDER BY seq")
        .expect("query");
    let ids = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .expect("rows")
        .collect::<Result<Vec<_>, _>>()
        .expect("ids");
    ids
}

/// A child process of the test (a `wsbridge` binary), killed and reaped when the test ends,
/// however it ends.
pub struct Process(pub std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Process {
    /// `wsbridge serve --config <config>` with `RUST_LOG` at `log` and stdout discarded; the
    /// caller decides stderr and spawns it (directly, or under a wrapper such as `prlimit`).
    pub fn serve_command(config: &std::path::Path, log: &str) -> std::process::Command {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_wsbridge"));
        c.args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", log)
            .stdout(std::process::Stdio::null());
        c
    }

    /// Sends SIGTERM (the orderly stop an init system sends).
    pub fn terminate(&self) {
        let pid = self.0.id().to_string();
        assert!(std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill runs")
            .success());
    }

    /// Waits off the runtime, at most [`DEADLINE`], for the process to exit; its exit code
    /// (`None` if a signal ended it) and the process, for the caller to keep.
    pub async fn exit_code(mut self) -> (Option<i32>, Process) {
        let waited = tokio::task::spawn_blocking(move || {
            let status = self.0.wait();
            (status, self)
        });
        let (status, process) = tokio::time::timeout(DEADLINE, waited)
            .await
            .expect("exits in time")
            .expect("waited");
        (status.expect("exit status").code(), process)
    }
}
