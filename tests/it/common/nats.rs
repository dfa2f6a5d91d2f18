//! NATS plumbing for tests: a unique prefix per test (so runs against the shared server on
//! 4222 never collide), config builders for the nats backend, NATS servers and clusters of
//! the test's own on loopback ports (never the shared one), and cleanup.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use wsbridge::config::Config;

/// The shared JetStream server of this machine. Tests never stop it.
pub const SHARED_NATS: &str = "nats://127.0.0.1:4222";

/// A prefix no other test or run uses.
pub fn unique_prefix(tag: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("t{}_{n}_{nanos:x}_{tag}", std::process::id())
}

/// A `[storage]` block for the nats backend.
pub fn nats_storage(urls: &[String], prefix: &str, extra: &str) -> String {
    let list = urls
        .iter()
        .map(|u| format!("{u:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!("[storage]\nbackend = \"nats\"\nurl = [{list}]\nprefix = \"{prefix}\"\n{extra}\n")
}

/// Config text for a bridge on an ephemeral port with the nats backend.
pub fn nats_config_text(blocks: &[String], urls: &[String], prefix: &str, extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\nadmin_token = \"admin-token\"\n{}\n{}",
        nats_storage(urls, prefix, extra),
        blocks.concat()
    )
}

/// A validated config (see [`nats_config_text`]).
pub fn nats_config(blocks: &[String], urls: &[String], prefix: &str, extra: &str) -> Config {
    let text = nats_config_text(blocks, urls, prefix, extra);
    Config::from_toml(&text, |_| None, false).unwrap_or_else(|e| panic!("test config: {e}\n{text}"))
}

/// A `[[webhooks]]` block for a receiver at `url`, fast retries unless `extra` sets `retry`,
/// and a short timeout (which also shortens the consumer's ack wait: a delivery lost in a
/// NATS failover comes back sooner).
pub fn webhook_block(name: &str, url: &str, extra: &str) -> String {
    let retry = if extra.contains("retry") {
        ""
    } else {
        "retry = [\"100ms\", \"200ms\", \"400ms\"]\n"
    };
    format!(
        "[[webhooks]]\nname = \"{name}\"\nurl = \"{url}\"\nsecrets = [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]\n\
         allow_private = true\ntimeout = \"3s\"\n{retry}{extra}\n"
    )
}

/// Changes the journal stream of `prefix` on the shared server the way an operator could
/// (`change` edits its config), to see how the bridge copes with the stream's limits.
pub async fn update_events_stream(
    prefix: &str,
    change: impl FnOnce(&mut async_nats::jetstream::stream::Config),
) {
    let client = async_nats::connect(SHARED_NATS).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let mut stream = js
        .get_stream(format!("{prefix}_events"))
        .await
        .expect("journal stream");
    let mut config = stream.info().await.expect("stream info").config.clone();
    change(&mut config);
    js.update_stream(config)
        .await
        .expect("update the journal stream");
}

/// Deletes every stream and bucket of `prefix` (best effort).
pub async fn cleanup(url: &str, prefix: &str) {
    let Ok(client) = async_nats::connect(url).await else {
        return;
    };
    let js = async_nats::jetstream::new(client);
    for s in [
        "events", "dlq", "replay", "state", "leases", "ids", "durables",
    ] {
        let _ = js.delete_stream(format!("{prefix}_{s}")).await;
    }
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
    probe.local_addr().expect("addr").port()
}

/// A NATS server of the test's own: its own port and store directory; killed when dropped.
pub struct NatsServer {
    /// Client port.
    pub port: u16,
    /// Cluster port (when part of a cluster).
    pub cluster_port: Option<u16>,
    routes: Vec<u16>,
    name: String,
    dir: PathBuf,
    /// A config file passed with `-c` (settings with no command-line flag, e.g. `max_payload`).
    config: Option<PathBuf>,
    child: Option<Child>,
}

impl NatsServer {
    /// A standalone JetStream server.
    pub fn start(tag: &str) -> NatsServer {
        NatsServer::start_with_config(tag, None)
    }

    /// A standalone JetStream server that also reads `config` (nats-server config syntax),
    /// for settings that have no command-line flag, such as `max_payload`.
    pub fn start_with_config(tag: &str, config: Option<&str>) -> NatsServer {
        let dir = super::temp_dir(tag);
        let config = config.map(|text| {
            let path = dir.join("nats-server.conf");
            std::fs::write(&path, text).expect("write nats-server config");
            path
        });
        let mut s = NatsServer {
            port: free_port(),
            cluster_port: None,
            routes: Vec::new(),
            name: format!("{tag}-0"),
            dir,
            config,
            child: None,
        };
        s.spawn();
        s
    }

    /// `n` JetStream servers clustered over loopback.
    pub fn cluster(tag: &str, n: usize) -> Vec<NatsServer> {
        let cluster_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut out: Vec<NatsServer> = (0..n)
            .map(|i| NatsServer {
                port: free_port(),
                cluster_port: Some(cluster_ports[i]),
                routes: cluster_ports.clone(),
                name: format!("{tag}-{i}"),
                dir: super::temp_dir(&format!("{tag}-{i}")),
                config: None,
                child: None,
            })
            .collect();
        for s in &mut out {
            s.spawn();
        }
        out
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(nats_server_binary());
        cmd.args([
            "-a",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-js",
            "-sd",
        ])
        .arg(&self.dir)
        .args(["-n", &self.name])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if let Some(config) = &self.config {
            cmd.arg("-c").arg(config);
        }
        if let Some(cp) = self.cluster_port {
            let routes = self
                .routes
                .iter()
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(",");
            cmd.args([
                "--cluster_name",
                "wsbt",
                "--cluster",
                &format!("nats://127.0.0.1:{cp}"),
                "--routes",
                &routes,
            ]);
        }
        self.child = Some(cmd.spawn().expect("nats-server starts"));
    }

    /// Kills the server (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open but nothing is answered, as with a
    /// server that hangs. [`NatsServer::resume`] undoes it.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let status = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status()
                .expect("kill runs");
            assert!(status.success(), "kill {sig} failed");
        }
    }

    /// Starts it again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Waits until the server answers JetStream requests.
    pub async fn wait_ready(&self, limit: Duration) {
        wait_jetstream(&self.url(), limit).await;
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until `url` answers a JetStream account-info request.
pub async fn wait_jetstream(url: &str, limit: Duration) {
    super::eventually(&format!("JetStream ready at {url}"), limit, || async {
        let client = tokio::time::timeout(Duration::from_secs(1), async_nats::connect(url))
            .await
            .ok()?
            .ok()?;
        // JetStream answers its INFO request once it is up (and has a meta leader).
        let reply = tokio::time::timeout(
            Duration::from_secs(1),
            client.request("$JS.API.INFO", "".into()),
        )
        .await
        .ok()?
        .ok()?;
        (!String::from_utf8_lossy(&reply.payload).contains("\"error\"")).then_some(())
    })
    .await;
}

fn nats_server_binary() -> String {
    std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".to_string())
}

/// A bridge binary (`wsbridge serve`) on a config file; SIGKILLed when dropped.
pub struct BridgeProcess {
    child: Option<Child>,
    /// Where it listens.
    pub addr: std::net::SocketAddr,
}

impl BridgeProcess {
    /// Writes `config_text` (whose `[server]` must listen on `addr`) into `dir` and starts
    /// the binary on it.
    pub fn spawn(
        dir: &std::path::Path,
        tag: &str,
        addr: std::net::SocketAddr,
        config_text: &str,
    ) -> BridgeProcess {
        let path = dir.join(format!("{tag}.toml"));
        std::fs::write(&path, config_text).expect("write config");
        let child = Command::new(env!("CARGO_BIN_EXE_wsbridge"))
            .args(["serve", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("bridge starts");
        BridgeProcess {
            child: Some(child),
            addr,
        }
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// GET on its admin API (token `admin-token`); `None` while it does not answer.
    pub async fn admin_get(&self, path: &str) -> Option<serde_json::Value> {
        let resp = super::http_client()
            .get(format!("http://{}/v1/admin/{path}", self.addr))
            .bearer_auth("admin-token")
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        serde_json::from_slice(&resp.bytes().await.ok()?).ok()
    }

    /// The state of its upstream `name`, if it answers.
    pub async fn upstream_state(&self, name: &str) -> Option<String> {
        let v = self.admin_get("upstreams").await?;
        v["upstreams"]
            .as_array()?
            .iter()
            .find(|u| u["name"] == name)
            .and_then(|u| u["state"].as_str().map(str::to_string))
    }
}

impl Drop for BridgeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A config text listening on `addr` with the nats backend (see [`nats_config_text`]).
pub fn nats_config_on(
    addr: std::net::SocketAddr,
    blocks: &[String],
    urls: &[String],
    prefix: &str,
    extra: &str,
) -> String {
    nats_config_text(blocks, urls, prefix, extra).replacen("127.0.0.1:0", &addr.to_string(), 1)
}

/// A free loopback address.
pub fn free_addr() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], free_port()))
}
