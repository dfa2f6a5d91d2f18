//! The servers under test, each a separate process (wsbridge, the raw baseline, nginx with
//! nchan), and their CPU and memory as /proc shows them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::frames::{CONSUMER_TOKEN, WEBHOOK_SECRET};
use crate::pusher::Pusher;
use crate::Res;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum System {
    Wsbridge,
    Raw,
    Nchan,
}

impl System {
    pub(crate) fn name(self) -> &'static str {
        match self {
            System::Wsbridge => "wsbridge",
            System::Raw => "raw",
            System::Nchan => "nchan",
        }
    }
}

pub(crate) struct Server {
    pub(crate) system: System,
    child: Child,
    pub(crate) addr: SocketAddr,
    _dir: PathBuf,
}

fn free_port() -> Res<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn work_dir(tag: &str) -> Res<PathBuf> {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "wsbridge-bench-{}-{tag}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
    Ok(d)
}

fn log_file(dir: &Path, name: &str) -> Res<Stdio> {
    std::fs::File::create(dir.join(name))
        .map(Stdio::from)
        .map_err(|e| format!("log file: {e}"))
}

/// Spawns `cmd` (logs in `dir`) as the server of `system` listening on `port`.
fn spawn_server(system: System, mut cmd: Command, dir: PathBuf, port: u16) -> Res<Server> {
    let child = cmd
        .stdout(log_file(&dir, "stdout.log")?)
        .stderr(log_file(&dir, "stderr.log")?)
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", system.name()))?;
    Ok(Server {
        system,
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        _dir: dir,
    })
}

struct BridgeOpts<'a> {
    pub(crate) upstreams: &'a [Arc<Pusher>],
    pub(crate) webhook: Option<SocketAddr>,
    backoff_initial: &'a str,
}

/// `--nats URL`: wsbridge journals to NATS JetStream at URL instead of its embedded store.
pub(crate) static NATS: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Webhook endpoints the wsbridge server gets (`--endpoints N`; 1 by default).
pub(crate) static ENDPOINTS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// `--endpoints`, at least 1.
pub(crate) fn endpoints() -> usize {
    ENDPOINTS.get().copied().unwrap_or(1).max(1)
}

/// Consumers of the fan-out, latency and memory scenarios (`--consumers N`), overriding
/// their defaults.
pub(crate) static CONSUMERS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

fn start_wsbridge(o: &BridgeOpts) -> Res<Server> {
    let dir = work_dir("wsbridge")?;
    if let Some(&n) = crate::prefill::JOURNAL.get().filter(|n| **n > 0) {
        crate::prefill::prefill(&dir.join("wsbridge.db"), n)?;
    }
    let port = free_port()?;
    let mut cfg = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[storage]\npath = {:?}\n",
        dir.join("wsbridge.db").display().to_string()
    );
    if let Some(url) = NATS.get() {
        // A fresh prefix per server: its own streams on the shared server.
        cfg += &format!(
            "backend = \"nats\"\nurl = [{url:?}]\nprefix = \"bench{}\"\n",
            std::process::id() as u64 * 1000 + port as u64 % 1000
        );
    }
    cfg += "\n";
    for p in o.upstreams {
        cfg += &format!(
            "[[upstreams]]\nname = \"vb{}\"\nadapter = \"voipbin\"\nurl = \"{}\"\ntoken = \"bench-upstream-token\"\ntopics = [\"customer_id:abc123:call:*\"]\nbackoff_initial = \"{}\"\nbackoff_max = \"5s\"\n\n",
            p.u,
            p.url(),
            o.backoff_initial
        );
    }
    cfg += &format!("[[consumers]]\nname = \"bench\"\ntoken = \"{CONSUMER_TOKEN}\"\n\n");
    // Every load-tool consumer uses the one token: lift the per-token cap above their number.
    cfg += "[limits]\nmax_connections_per_token = 100000\n\n";
    if let Some(w) = o.webhook {
        // `--endpoints N`: N endpoints at the one receiver, each routed every event.
        let n = endpoints();
        let names: Vec<String> = (0..n)
            .map(|k| {
                if k == 0 {
                    "recv".to_string()
                } else {
                    format!("recv{k}")
                }
            })
            .collect();
        for name in &names {
            cfg += &format!(
                "[[webhooks]]\nname = \"{name}\"\nurl = \"http://{w}/hook\"\nsecrets = [\"{WEBHOOK_SECRET}\"]\nallow_private = true\nmax_in_flight = 64\n\n"
            );
        }
        cfg += &format!(
            "[[routes]]\nname = \"all\"\nto = [{}]\n",
            names
                .iter()
                .map(|n| format!("\"{n}\""))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let path = dir.join("config.toml");
    std::fs::write(&path, cfg).map_err(|e| format!("write config: {e}"))?;
    let bin =
        std::env::var("WSBRIDGE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_wsbridge").into());
    let mut cmd = Command::new(&bin);
    cmd.args(["serve", "--config"])
        .arg(&path)
        .args(["--watch-interval", "0s"])
        .env("RUST_LOG", "warn");
    spawn_server(System::Wsbridge, cmd, dir, port)
}

fn start_raw(upstreams: &[Arc<Pusher>]) -> Res<Server> {
    let dir = work_dir("raw")?;
    let port = free_port()?;
    let exe = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("raw-server")
        .arg(port.to_string())
        .args(upstreams.iter().map(|p| p.url()));
    spawn_server(System::Raw, cmd, dir, port)
}

pub(crate) const NGINX: &str = "/usr/sbin/nginx";
pub(crate) const NCHAN_MODULE: &str = "/usr/lib/nginx/modules/ngx_nchan_module.so";

pub(crate) fn nchan_available() -> bool {
    Path::new(NGINX).exists() && Path::new(NCHAN_MODULE).exists()
}

fn start_nchan() -> Res<Server> {
    let dir = work_dir("nchan")?;
    let port = free_port()?;
    let template = include_str!("../nchan.conf");
    let conf = template
        .replace("@PORT@", &port.to_string())
        .replace("@DIR@", &dir.display().to_string())
        .replace("@MODULE@", NCHAN_MODULE);
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).map_err(|e| format!("write nginx.conf: {e}"))?;
    let mut cmd = Command::new(NGINX);
    cmd.arg("-p").arg(&dir).arg("-c").arg(&path);
    spawn_server(System::Nchan, cmd, dir, port)
}

impl Server {
    async fn wait_listening(&mut self) -> Res<()> {
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!(
                    "{} exited early ({st}); logs in {}",
                    self.system.name(),
                    self._dir.display()
                ));
            }
            if TcpStream::connect(self.addr).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > end {
                return Err(format!("{} never listened", self.system.name()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The server's processes (nginx: master and workers).
    fn pids(&self) -> Vec<u32> {
        let root = self.child.id();
        let mut pids = vec![root];
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if proc_stat(pid).map(|s| s.ppid) == Some(root) {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    pub(crate) fn usage(&self) -> Usage {
        let mut u = Usage::default();
        for pid in self.pids() {
            if let Some(s) = proc_stat(pid) {
                u.cpu_ticks += s.ticks;
            }
            u.rss_kib += rss_kib(pid).unwrap_or(0);
        }
        u
    }

    /// Stops the server (SIGTERM, then SIGKILL after 10 s) and removes its work directory (a
    /// journal can be hundreds of MiB); set `BENCH_KEEP=1` to keep it.
    pub(crate) fn stop(mut self) {
        // SAFETY: plain kill(2) on our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::env::var_os("BENCH_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self._dir);
        }
    }
}

impl Drop for Server {
    /// A scenario that failed half-way must not leave its server running; its logs stay.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

struct ProcStat {
    ppid: u32,
    ticks: u64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat {
        ppid: f.get(1)?.parse().ok()?,
        ticks: f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
    })
}

pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[derive(Default, Clone, Copy)]
pub(crate) struct Usage {
    cpu_ticks: u64,
    pub(crate) rss_kib: u64,
}

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// CPU of the server and of this process (the load tool) over a window, in % of one core.
pub(crate) struct CpuWindow {
    pub(crate) t0: Instant,
    srv0: u64,
    tool0: u64,
}

impl CpuWindow {
    pub(crate) fn start(srv: &Server) -> CpuWindow {
        CpuWindow {
            t0: Instant::now(),
            srv0: srv.usage().cpu_ticks,
            tool0: proc_stat(std::process::id()).map(|s| s.ticks).unwrap_or(0),
        }
    }
    pub(crate) fn end(&self, srv: &Server) -> CpuUse {
        let secs = self.t0.elapsed().as_secs_f64();
        let tps = ticks_per_sec();
        let srv = (srv.usage().cpu_ticks - self.srv0) as f64 / tps / secs * 100.0;
        let tool = (proc_stat(std::process::id()).map(|s| s.ticks).unwrap_or(0) - self.tool0)
            as f64
            / tps
            / secs
            * 100.0;
        CpuUse {
            secs,
            server: srv,
            tool,
        }
    }
}

/// CPU over a window: its length, and the server's and the load tool's CPU in % of one core.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CpuUse {
    pub(crate) secs: f64,
    pub(crate) server: f64,
    pub(crate) tool: f64,
}

// ---------------------------------------------------------------------------------------------
// raw baseline server (this binary re-executed as `raw-server <port> <upstream urls..>`)

/// Starts the server of `system` dialling `pushers` (nchan: none; its publisher is started
/// by the scenario) and waits until it is subscribed upstream.
pub(crate) async fn start_server(
    system: System,
    pushers: &[Arc<Pusher>],
    webhook: Option<SocketAddr>,
) -> Res<Server> {
    let mut srv = match system {
        System::Wsbridge => start_wsbridge(&BridgeOpts {
            upstreams: pushers,
            webhook,
            backoff_initial: "1s",
        })?,
        System::Raw => start_raw(pushers)?,
        System::Nchan => start_nchan()?,
    };
    srv.wait_listening().await?;
    for p in pushers {
        p.wait_subscribed(1, Duration::from_secs(20)).await?;
    }
    Ok(srv)
}

/// Upstream pushers for `system`: provider servers the server dials, or, for nchan, one
/// WebSocket publisher to its `/pub` endpoint.
pub(crate) async fn pushers_for(system: System, n: usize) -> Res<Vec<Arc<Pusher>>> {
    let mut v = Vec::new();
    if system != System::Nchan {
        for u in 0..n {
            v.push(Pusher::listen(u).await?);
        }
    }
    Ok(v)
}

pub(crate) async fn nchan_publisher(srv: &Server) -> Res<Arc<Pusher>> {
    Pusher::publish_to(0, &format!("ws://{}/pub", srv.addr)).await
}
