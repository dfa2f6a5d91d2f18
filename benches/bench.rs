//! `cargo bench --bench bench -- [--quick] [--only a,b] [--systems wsbridge,raw,nchan]`
//!
//! Issue 8: wsbridge side by side with a raw tokio-tungstenite broadcast server and nchan, on
//! 127.0.0.1, in one run, printing one table. See the README's "Benchmarks" section and
//! `benches/run.sh` (installs nginx-light + libnginx-mod-nchan if missing, then runs this).
//!
//! What runs where:
//! - this process is the *load tool*: the upstream pushers (a lighter provider server speaking
//!   the VoIPBIN `event_type` dialect), the WebSocket consumers, and the keep-alive webhook
//!   receiver. Its CPU is reported beside the server's;
//! - the server under test is a separate process, so its CPU and RSS are measured on their
//!   own: the release `wsbridge serve` binary with a generated config (embedded store), this
//!   same binary re-executed as `raw-server` (dials the same upstream, forwards frames
//!   unchanged), or nginx with the nchan module (`benches/nchan.conf`).
//!
//! Every event carries `"u"` (upstream), `"n"` (sequence per upstream) and `"ts"` (send time,
//! µs since this process started) inside the provider payload, so whatever envelope wraps it,
//! a consumer measures send → receive latency and counts lost (gaps, tail) and duplicated
//! frames.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc, Notify};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

type Res<T> = Result<T, String>;

// ---------------------------------------------------------------------------------------------
// time, frames, parsing

static START: OnceLock<Instant> = OnceLock::new();

fn now_us() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// Upstream frame size (the provider's frame, before any envelope).
const FRAME_BYTES: usize = 300;
/// The consumer token configured in the generated bridge config.
const CONSUMER_TOKEN: &str = "bench-consumer-token";
const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A VoIPBIN `event_type` frame of [`FRAME_BYTES`] bytes carrying u, n and the send time.
fn frame(u: usize, n: u64, ts: u64) -> String {
    let mut s = format!(
        r#"{{"event_type":"call.status","timestamp":"2026-11-23T10:00:00Z","topic":"customer_id:abc123:call:c{u}x{n}","data":{{"id":"c{u}x{n}","status":"answered","u":{u},"n":{n},"ts":{ts},"pad":""#
    );
    let pad = FRAME_BYTES.saturating_sub(s.len() + 3);
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}}");
    s
}

fn num_at(s: &str, key: &str, from: usize) -> Option<(u64, usize)> {
    let i = s[from..].find(key)? + from + key.len();
    let digits = s[i..].bytes().take_while(u8::is_ascii_digit).count();
    Some((s[i..i + digits].parse().ok()?, i + digits))
}

/// (u, n, ts) of an event frame, whatever wraps it; None for control frames.
fn parse_event(s: &str) -> Option<(usize, u64, u64)> {
    let (u, i) = num_at(s, "\"u\":", 0)?;
    let (n, i) = num_at(s, "\"n\":", i)?;
    let (ts, _) = num_at(s, "\"ts\":", i)?;
    Some((u as usize, n, ts))
}

fn ws_config() -> WebSocketConfig {
    // Small buffers: 10,000 load-tool connections must not cost 128 KiB each.
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(16 * 1024)
}

// ---------------------------------------------------------------------------------------------
// the upstream pusher: a minimal provider server (VoIPBIN dialect) or a publisher client

/// How fast a pusher sends.
#[derive(Clone)]
enum Pace {
    /// A fixed number of events per second.
    Rate(f64),
    /// At most `ahead` events beyond the slowest consumer of `progress`.
    Window(u64, Arc<Progress>),
    /// As fast as the connection accepts (TCP backpressure).
    Full,
}

/// Per-consumer received counts, read by a windowed pusher.
#[derive(Default)]
struct Progress {
    counts: Vec<AtomicU64>,
    /// Consumers whose connection ended: ignored by `min`, so they cannot stall a pusher.
    closed: Vec<AtomicBool>,
    /// The next `n` each consumer expects from upstream 0 (its last frame's `n` + 1).
    next: Vec<AtomicU64>,
}

impl Progress {
    fn new(n: usize) -> Arc<Progress> {
        Arc::new(Progress {
            counts: (0..n).map(|_| AtomicU64::new(0)).collect(),
            closed: (0..n).map(|_| AtomicBool::new(false)).collect(),
            next: (0..n).map(|_| AtomicU64::new(0)).collect(),
        })
    }
    /// Whether every open consumer has had upstream 0's frames up to `sent`.
    fn caught_up(&self, sent: u64) -> bool {
        self.next
            .iter()
            .zip(&self.closed)
            .all(|(n, c)| c.load(Ordering::Relaxed) || n.load(Ordering::Relaxed) >= sent)
    }
    /// Frames received by the slowest open consumer.
    fn min(&self) -> u64 {
        self.counts
            .iter()
            .zip(&self.closed)
            .filter(|(_, c)| !c.load(Ordering::Relaxed))
            .map(|(n, _)| n.load(Ordering::Relaxed))
            .min()
            .unwrap_or(u64::MAX / 2)
    }
    /// Frames received by all consumers.
    fn total(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// One upstream: accepts provider connections (or dials a publisher endpoint) and pushes
/// numbered frames into them.
struct Pusher {
    u: usize,
    addr: Option<SocketAddr>,
    conns: Mutex<Vec<mpsc::Sender<Utf8Bytes>>>,
    /// Subscribe frames seen (one per (re)connection of a client).
    subscribed: AtomicUsize,
    last_subscribed: Mutex<Option<Instant>>,
    changed: Notify,
    /// Frames handed to a connection (what a lossless server must deliver).
    sent: AtomicU64,
}

impl Pusher {
    /// A provider server on an ephemeral port.
    async fn listen(u: usize) -> Res<Arc<Pusher>> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("pusher bind: {e}"))?;
        let p = Arc::new(Pusher {
            u,
            addr: listener.local_addr().ok(),
            conns: Mutex::new(Vec::new()),
            subscribed: AtomicUsize::new(0),
            last_subscribed: Mutex::new(None),
            changed: Notify::new(),
            sent: AtomicU64::new(0),
        });
        let me = p.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let me = me.clone();
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    if let Ok(ws) =
                        tokio_tungstenite::accept_async_with_config(tcp, Some(ws_config())).await
                    {
                        me.serve(ws, true).await;
                    }
                });
            }
        });
        Ok(p)
    }

    /// A publisher client of `url` (nchan's WebSocket publisher endpoint).
    async fn publish_to(u: usize, url: &str) -> Res<Arc<Pusher>> {
        let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true)
            .await
            .map_err(|e| format!("publisher connect {url}: {e}"))?;
        let p = Arc::new(Pusher {
            u,
            addr: None,
            conns: Mutex::new(Vec::new()),
            subscribed: AtomicUsize::new(0),
            last_subscribed: Mutex::new(None),
            changed: Notify::new(),
            sent: AtomicU64::new(0),
        });
        let me = p.clone();
        tokio::spawn(async move { me.serve(ws, false).await });
        Ok(p)
    }

    fn url(&self) -> String {
        match self.addr {
            Some(a) => format!("ws://{a}/v1.0/ws"),
            None => String::new(),
        }
    }

    /// Owns one connection: waits for the client's subscribe frame (server side), then
    /// writes queued frames, batching writes and flushing when the queue is empty.
    async fn serve<S>(&self, ws: tokio_tungstenite::WebSocketStream<S>, wait_subscribe: bool)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sink, mut stream) = ws.split();
        if wait_subscribe {
            loop {
                match stream.next().await {
                    Some(Ok(Message::Text(t))) if t.contains("subscribe") => break,
                    Some(Ok(_)) => continue,
                    _ => return,
                }
            }
        }
        let (tx, mut rx) = mpsc::channel::<Utf8Bytes>(1024);
        if let Ok(mut c) = self.conns.lock() {
            c.push(tx);
        }
        self.subscribed.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut t) = self.last_subscribed.lock() {
            *t = Some(Instant::now());
        }
        self.changed.notify_waiters();
        let done = CancellationToken::new();
        let reader_done = done.clone();
        // Keep reading: answers pings, notices the peer going away.
        let reader = tokio::spawn(async move {
            tokio::select! {
                _ = async { while let Some(Ok(_)) = stream.next().await {} } => {}
                _ = reader_done.cancelled() => {}
            }
            stream
        });
        while let Some(f) = rx.recv().await {
            if sink.feed(Message::Text(f)).await.is_err() {
                break;
            }
            while let Ok(f) = rx.try_recv() {
                if sink.feed(Message::Text(f)).await.is_err() {
                    break;
                }
            }
            if sink.flush().await.is_err() {
                break;
            }
        }
        // Dropped (drop_all) or broken: close the TCP connection without a close handshake,
        // after what was queued has been written.
        done.cancel();
        let _ = reader.await;
    }

    /// Drops every connection at once (what a provider restart looks like); frames already
    /// handed to a connection are still written before its socket closes.
    fn drop_all(&self) {
        if let Ok(mut c) = self.conns.lock() {
            c.clear();
        }
    }

    async fn wait_subscribed(&self, n: usize, deadline: Duration) -> Res<()> {
        let end = Instant::now() + deadline;
        while self.subscribed.load(Ordering::SeqCst) < n {
            if Instant::now() > end {
                return Err(format!(
                    "upstream {} saw {} subscription(s), wanted {n}",
                    self.u,
                    self.subscribed.load(Ordering::SeqCst)
                ));
            }
            let _ = tokio::time::timeout(Duration::from_millis(20), self.changed.notified()).await;
        }
        Ok(())
    }

    /// Sends one frame to a connection, waiting for one if there is none.
    async fn push(&self, stop: &CancellationToken) -> bool {
        let n = self.sent.load(Ordering::Relaxed);
        let text: Utf8Bytes = frame(self.u, n, now_us()).into();
        loop {
            let tx = self.conns.lock().ok().and_then(|c| c.first().cloned());
            match tx {
                Some(tx) => {
                    if tx.send(text.clone()).await.is_ok() {
                        self.sent.fetch_add(1, Ordering::Relaxed);
                        return true;
                    }
                    if let Ok(mut c) = self.conns.lock() {
                        c.retain(|t| !t.same_channel(&tx));
                    }
                }
                None => {
                    if stop.is_cancelled() {
                        return false;
                    }
                    let _ = tokio::time::timeout(Duration::from_millis(5), self.changed.notified())
                        .await;
                }
            }
        }
    }

    /// Pushes at `pace` until `stop`.
    async fn drive(self: Arc<Self>, pace: Pace, stop: CancellationToken) {
        let t0 = Instant::now();
        while !stop.is_cancelled() {
            match &pace {
                Pace::Full => {
                    for _ in 0..64 {
                        if !self.push(&stop).await {
                            return;
                        }
                    }
                }
                Pace::Rate(r) => {
                    let due = (t0.elapsed().as_secs_f64() * r) as u64;
                    while self.sent.load(Ordering::Relaxed) < due {
                        if !self.push(&stop).await {
                            return;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Pace::Window(ahead, progress) => {
                    let mut min = progress.min();
                    while self.sent.load(Ordering::Relaxed) >= min + ahead {
                        tokio::task::yield_now().await;
                        if stop.is_cancelled() {
                            return;
                        }
                        min = progress.min();
                    }
                    if !self.push(&stop).await {
                        return;
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// consumers

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum System {
    Wsbridge,
    Raw,
    Nchan,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Wsbridge => "wsbridge",
            System::Raw => "raw",
            System::Nchan => "nchan",
        }
    }
}

/// What one consumer saw.
#[derive(Default)]
struct Seen {
    frames: u64,
    gaps: u64,
    dups: u64,
    next: [u64; 3],
    lat_us: Vec<u32>,
    closed: bool,
    /// Count from the first frame seen per upstream (consumers that join a running stream).
    anchor_first: bool,
    anchored: [bool; 3],
}

impl Seen {
    fn event(&mut self, u: usize, n: u64, ts: u64, record: bool) {
        self.frames += 1;
        let u = u.min(2);
        if self.anchor_first && !self.anchored[u] {
            self.anchored[u] = true;
            self.next[u] = n;
        }
        if n == self.next[u] {
            self.next[u] = n + 1;
        } else if n > self.next[u] {
            self.gaps += n - self.next[u];
            self.next[u] = n + 1;
        } else {
            self.dups += 1;
        }
        if record {
            self.lat_us
                .push(now_us().saturating_sub(ts).min(u32::MAX as u64) as u32);
        }
    }
    /// Lost = gaps + what was sent after the last frame received.
    fn lost(&self, sent: &[u64]) -> u64 {
        self.gaps
            + sent
                .iter()
                .enumerate()
                .map(|(u, s)| s.saturating_sub(self.next[u.min(2)]))
                .sum::<u64>()
    }
}

/// Set while consumers join a stream that is already running (the memory scenario).
static ANCHOR_FIRST: AtomicBool = AtomicBool::new(false);

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn connect_consumer(system: System, addr: SocketAddr) -> Res<Ws> {
    let url = match system {
        System::Wsbridge => format!("ws://{addr}/v1/ws"),
        System::Raw => format!("ws://{addr}/"),
        System::Nchan => format!("ws://{addr}/sub"),
    };
    let mut req = url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("{url}: {e}"))?;
    if system == System::Wsbridge {
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {CONSUMER_TOKEN}")
                .parse()
                .map_err(|e| format!("{e}"))?,
        );
    }
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(ws_config()), true)
        .await
        .map_err(|e| format!("consumer connect {url}: {e}"))?;
    if system == System::Wsbridge {
        expect_op(&mut ws, "ready").await?;
        ws.send(Message::text(
            r#"{"op":"subscribe","id":"b","from":"latest"}"#,
        ))
        .await
        .map_err(|e| format!("subscribe: {e}"))?;
        expect_op(&mut ws, "subscribed").await?;
    }
    Ok(ws)
}

async fn expect_op(ws: &mut Ws, op: &str) -> Res<()> {
    let want = format!("\"op\":\"{op}\"");
    let wait = async {
        while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Text(t)) if t.contains(&want) => return Ok(()),
                Ok(Message::Text(t)) if t.contains("\"op\":\"error\"") => {
                    return Err(format!("waiting for {op}: {t}"))
                }
                Ok(_) => continue,
                Err(e) => return Err(format!("waiting for {op}: {e}")),
            }
        }
        Err(format!("closed while waiting for {op}"))
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .map_err(|_| format!("no {op} within 20 s"))?
}

/// Connects `n` consumers (at most 64 handshakes at a time) and starts reading.
async fn start_consumers(
    system: System,
    addr: SocketAddr,
    n: usize,
    progress: Arc<Progress>,
    record: Arc<AtomicBool>,
    stop: CancellationToken,
) -> Res<Vec<tokio::task::JoinHandle<Seen>>> {
    let mut handles = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        let batch = (n - i).min(64);
        let conns =
            futures_util::future::join_all((0..batch).map(|_| connect_consumer(system, addr)))
                .await;
        for ws in conns {
            let ws = ws?;
            let idx = i;
            i += 1;
            let (progress, record, stop) = (progress.clone(), record.clone(), stop.clone());
            let anchor = ANCHOR_FIRST.load(Ordering::Relaxed);
            handles.push(tokio::spawn(consume(
                ws, idx, anchor, progress, record, stop,
            )));
        }
    }
    Ok(handles)
}

async fn consume(
    mut ws: Ws,
    idx: usize,
    anchor_first: bool,
    progress: Arc<Progress>,
    record: Arc<AtomicBool>,
    stop: CancellationToken,
) -> Seen {
    let mut seen = Seen {
        anchor_first,
        ..Seen::default()
    };
    loop {
        let m = tokio::select! {
            m = ws.next() => m,
            _ = stop.cancelled() => break,
        };
        match m {
            Some(Ok(Message::Text(t))) => {
                if let Some((u, n, ts)) = parse_event(&t) {
                    seen.event(u, n, ts, record.load(Ordering::Relaxed));
                    if let Some(c) = progress.counts.get(idx) {
                        c.store(seen.frames, Ordering::Relaxed);
                    }
                    if let Some(c) = progress.next.get(idx) {
                        c.store(seen.next[0], Ordering::Relaxed);
                    }
                }
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                seen.closed = true;
                // A closed consumer must not stall a windowed publisher.
                if let Some(c) = progress.closed.get(idx) {
                    c.store(true, Ordering::Relaxed);
                }
                break;
            }
            Some(Ok(_)) => {}
        }
    }
    seen
}

// ---------------------------------------------------------------------------------------------
// webhook receiver (keep-alive HTTP/1.1, axum)

#[derive(Default)]
struct Hooks {
    deliveries: AtomicU64,
    unsigned: AtomicU64,
    inner: Mutex<HookSeen>,
    record: AtomicBool,
}

#[derive(Default)]
struct HookSeen {
    seen: [Vec<bool>; 3],
    dups: u64,
    lat_us: Vec<u32>,
}

impl Hooks {
    fn distinct(&self, u: usize) -> u64 {
        self.inner
            .lock()
            .map(|i| i.seen[u].iter().filter(|b| **b).count() as u64)
            .unwrap_or(0)
    }
}

async fn start_receiver(hooks: Arc<Hooks>) -> Res<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("receiver bind: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(
                |axum::extract::State(h): axum::extract::State<Arc<Hooks>>,
                 headers: axum::http::HeaderMap,
                 body: bytes::Bytes| async move {
                    h.deliveries.fetch_add(1, Ordering::Relaxed);
                    if !headers.contains_key("webhook-signature") {
                        h.unsigned.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some((u, n, ts)) = std::str::from_utf8(&body).ok().and_then(parse_event)
                    {
                        let record = h.record.load(Ordering::Relaxed);
                        if let Ok(mut i) = h.inner.lock() {
                            let v = &mut i.seen[u.min(2)];
                            let n = n as usize;
                            if v.len() <= n {
                                v.resize(n + 1, false);
                            }
                            if v[n] {
                                i.dups += 1;
                            } else {
                                v[n] = true;
                            }
                            if record {
                                i.lat_us.push(now_us().saturating_sub(ts) as u32);
                            }
                        }
                    }
                    axum::http::StatusCode::NO_CONTENT
                },
            ),
        )
        .with_state(hooks);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

// ---------------------------------------------------------------------------------------------
// servers under test (separate processes)

struct Server {
    system: System,
    child: Child,
    addr: SocketAddr,
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
    upstreams: &'a [Arc<Pusher>],
    webhook: Option<SocketAddr>,
    backoff_initial: &'a str,
}

fn start_wsbridge(o: &BridgeOpts) -> Res<Server> {
    let dir = work_dir("wsbridge")?;
    let port = free_port()?;
    let mut cfg = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[storage]\npath = {:?}\n\n",
        dir.join("wsbridge.db").display().to_string()
    );
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
        cfg += &format!(
            "[[webhooks]]\nname = \"recv\"\nurl = \"http://{w}/hook\"\nsecrets = [\"{WEBHOOK_SECRET}\"]\nallow_private = true\nmax_in_flight = 64\n\n[[routes]]\nname = \"all\"\nto = [\"recv\"]\n"
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

const NGINX: &str = "/usr/sbin/nginx";
const NCHAN_MODULE: &str = "/usr/lib/nginx/modules/ngx_nchan_module.so";

fn nchan_available() -> bool {
    Path::new(NGINX).exists() && Path::new(NCHAN_MODULE).exists()
}

fn start_nchan() -> Res<Server> {
    let dir = work_dir("nchan")?;
    let port = free_port()?;
    let template = include_str!("nchan.conf");
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

    fn usage(&self) -> Usage {
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
    fn stop(mut self) {
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

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[derive(Default, Clone, Copy)]
struct Usage {
    cpu_ticks: u64,
    rss_kib: u64,
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
struct CpuWindow {
    t0: Instant,
    srv0: u64,
    tool0: u64,
}

impl CpuWindow {
    fn start(srv: &Server) -> CpuWindow {
        CpuWindow {
            t0: Instant::now(),
            srv0: srv.usage().cpu_ticks,
            tool0: proc_stat(std::process::id()).map(|s| s.ticks).unwrap_or(0),
        }
    }
    fn end(&self, srv: &Server) -> (f64, f64, f64) {
        let secs = self.t0.elapsed().as_secs_f64();
        let tps = ticks_per_sec();
        let srv = (srv.usage().cpu_ticks - self.srv0) as f64 / tps / secs * 100.0;
        let tool = (proc_stat(std::process::id()).map(|s| s.ticks).unwrap_or(0) - self.tool0)
            as f64
            / tps
            / secs
            * 100.0;
        (secs, srv, tool)
    }
}

// ---------------------------------------------------------------------------------------------
// raw baseline server (this binary re-executed as `raw-server <port> <upstream urls..>`)

async fn raw_server(port: u16, upstreams: Vec<String>) -> Res<()> {
    let (tx, _) = broadcast::channel::<Utf8Bytes>(8192);
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| format!("raw bind: {e}"))?;
    for url in upstreams {
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                let req = format!("{url}?token=bench-upstream-token");
                if let Ok((mut ws, _)) =
                    tokio_tungstenite::connect_async_with_config(req, Some(ws_config()), true).await
                {
                    let _ = ws
                        .send(Message::text(
                            r#"{"type":"subscribe","topics":["customer_id:abc123:call:*"]}"#,
                        ))
                        .await;
                    while let Some(Ok(m)) = ws.next().await {
                        if let Message::Text(t) = m {
                            let _ = tx.send(t);
                            // Backpressure: stop reading the upstream while the slowest
                            // consumer is half the ring behind (else it would be dropped).
                            while tx.len() > 4096 {
                                tokio::time::sleep(Duration::from_millis(1)).await;
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
    while let Ok((tcp, _)) = listener.accept().await {
        let mut rx = tx.subscribe();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let Ok(ws) = tokio_tungstenite::accept_async_with_config(
                tcp,
                Some(
                    WebSocketConfig::default()
                        .read_buffer_size(4096)
                        .write_buffer_size(4096),
                ),
            )
            .await
            else {
                return;
            };
            let (mut sink, mut stream) = ws.split();
            tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
            loop {
                let first = match rx.recv().await {
                    Ok(t) => t,
                    Err(_) => return, // lagged or closed: drop the consumer
                };
                if sink.feed(Message::Text(first)).await.is_err() {
                    return;
                }
                loop {
                    match rx.try_recv() {
                        Ok(t) => {
                            if sink.feed(Message::Text(t)).await.is_err() {
                                return;
                            }
                        }
                        Err(broadcast::error::TryRecvError::Empty) => break,
                        Err(_) => return,
                    }
                }
                if sink.flush().await.is_err() {
                    return;
                }
            }
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// scenarios

struct Row {
    scenario: String,
    system: System,
    result: String,
    latency: String,
    lost: String,
    dup: String,
    cpu: String,
    goal: String,
    met: String,
}

struct Opts {
    quick: bool,
    systems: Vec<System>,
    /// `--hold SECS`: the memory scenario's hold instead of 60 s (10 s with --quick).
    hold: Option<u64>,
}

impl Opts {
    fn secs(&self, full: u64, quick: u64) -> Duration {
        Duration::from_secs(if self.quick { quick } else { full })
    }
}

fn pct(v: &mut [u32], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)] as f64 / 1000.0
}

/// Starts the server of `system` dialling `pushers` (nchan: none; its publisher is started
/// by the scenario) and waits until it is subscribed upstream.
async fn start_server(
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
async fn pushers_for(system: System, n: usize) -> Res<Vec<Arc<Pusher>>> {
    let mut v = Vec::new();
    if system != System::Nchan {
        for u in 0..n {
            v.push(Pusher::listen(u).await?);
        }
    }
    Ok(v)
}

async fn nchan_publisher(srv: &Server) -> Res<Arc<Pusher>> {
    Pusher::publish_to(0, &format!("ws://{}/pub", srv.addr)).await
}

/// Fan-out and latency with N consumers: one upstream, windowed or paced.
async fn run_fanout(
    o: &Opts,
    system: System,
    consumers: usize,
    pace: impl Fn(Arc<Progress>) -> Pace,
    dur: Duration,
    record_latency: bool,
) -> Res<(f64, Vec<u32>, u64, u64, u64, f64, f64)> {
    let _ = o;
    let mut pushers = pushers_for(system, 1).await?;
    let srv = start_server(system, &pushers, None).await?;
    if system == System::Nchan {
        pushers.push(nchan_publisher(&srv).await?);
    }
    let Crowd {
        progress,
        record,
        stop,
        handles,
    } = crowd(system, srv.addr, consumers).await?;
    // Warm up 1 s, then measure.
    let push_stop = CancellationToken::new();
    let driver = tokio::spawn(
        pushers[0]
            .clone()
            .drive(pace(progress.clone()), push_stop.clone()),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    record.store(record_latency, Ordering::Relaxed);
    let frames0 = progress.total();
    let cpu = CpuWindow::start(&srv);
    tokio::time::sleep(dur).await;
    let (secs, srv_cpu, tool_cpu) = cpu.end(&srv);
    let frames1 = progress.total();
    record.store(false, Ordering::Relaxed);
    push_stop.cancel();
    let _ = driver.await;
    let sent = pushers[0].sent.load(Ordering::Relaxed);
    drain(&progress, sent, Duration::from_secs(10)).await;
    stop.cancel();
    let mut lat = Vec::new();
    let (mut lost, mut dup, mut closed) = (0, 0, 0);
    for h in handles {
        let s = h.await.map_err(|e| e.to_string())?;
        lost += s.lost(&[sent]);
        dup += s.dups;
        closed += u64::from(s.closed);
        lat.extend(s.lat_us);
    }
    srv.stop();
    Ok((
        (frames1 - frames0) as f64 / secs,
        lat,
        lost,
        dup,
        closed,
        srv_cpu,
        tool_cpu,
    ))
}

/// Consumers of one scenario run: their progress, the latency switch, the stop token and
/// their tasks.
struct Crowd {
    progress: Arc<Progress>,
    record: Arc<AtomicBool>,
    stop: CancellationToken,
    handles: Vec<tokio::task::JoinHandle<Seen>>,
}

/// Connects `n` consumers of `system` at `addr`.
async fn crowd(system: System, addr: SocketAddr, n: usize) -> Res<Crowd> {
    let progress = Progress::new(n);
    let record = Arc::new(AtomicBool::new(false));
    let stop = CancellationToken::new();
    let handles = start_consumers(
        system,
        addr,
        n,
        progress.clone(),
        record.clone(),
        stop.clone(),
    )
    .await?;
    Ok(Crowd {
        progress,
        record,
        stop,
        handles,
    })
}

/// Starts a pusher for each upstream.
fn drive_all(
    pushers: &[Arc<Pusher>],
    pace: &Pace,
    stop: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    pushers
        .iter()
        .map(|p| tokio::spawn(p.clone().drive(pace.clone(), stop.clone())))
        .collect()
}

/// Stops the pushers, waits (up to `deadline`) until the consumers have what was sent, stops
/// them; returns what was sent per upstream and what the (last) consumer saw.
async fn wind_down(
    push_stop: CancellationToken,
    drivers: Vec<tokio::task::JoinHandle<()>>,
    pushers: &[Arc<Pusher>],
    crowd: (
        Arc<Progress>,
        CancellationToken,
        Vec<tokio::task::JoinHandle<Seen>>,
    ),
    deadline: Duration,
) -> Res<(Vec<u64>, Seen)> {
    let (progress, stop, handles) = crowd;
    push_stop.cancel();
    for d in drivers {
        let _ = d.await;
    }
    let sent: Vec<u64> = pushers
        .iter()
        .map(|p| p.sent.load(Ordering::Relaxed))
        .collect();
    drain(&progress, sent.iter().sum(), deadline).await;
    stop.cancel();
    let mut seen = Seen::default();
    for h in handles {
        seen = h.await.map_err(|e| e.to_string())?;
    }
    Ok((sent, seen))
}

/// Waits until every consumer has `sent` frames (or the deadline).
async fn drain(progress: &Progress, sent: u64, deadline: Duration) {
    let end = Instant::now() + deadline;
    while progress.min() < sent && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn cpu_cell(srv: f64, tool: f64) -> String {
    format!("{srv:.0}% / {tool:.0}%")
}

async fn scenario_fanout(o: &Opts, rows: &mut Vec<Row>) -> Res<()> {
    let consumers = if o.quick { 200 } else { 1000 };
    let dur = o.secs(10, 3);
    let name = format!(
        "fan-out {consumers} consumers, ≤64 ahead, {FRAME_BYTES} B, {}s",
        dur.as_secs()
    );
    for &system in &o.systems {
        let (rate, _, lost, dup, closed, s, t) =
            run_fanout(o, system, consumers, |p| Pace::Window(64, p), dur, false).await?;
        let met = system == System::Wsbridge;
        rows.push(Row {
            scenario: name.clone(),
            system,
            result: format!("{:.0}k frames/s{}", rate / 1000.0, closed_note(closed)),
            latency: "–".into(),
            lost: lost.to_string(),
            dup: dup.to_string(),
            cpu: cpu_cell(s, t),
            goal: if met {
                "≥1,000k frames/s, 0 lost".into()
            } else {
                String::new()
            },
            met: if met {
                yes(rate >= 1e6 && lost == 0)
            } else {
                String::new()
            },
        });
        eprintln!(
            "  fan-out {}: {:.0} frames/s lost {lost} dup {dup}",
            system.name(),
            rate
        );
    }
    Ok(())
}

fn closed_note(closed: u64) -> String {
    if closed > 0 {
        format!(" ({closed} closed)")
    } else {
        String::new()
    }
}

fn yes(b: bool) -> String {
    if b { "met" } else { "NOT met" }.into()
}

async fn scenario_latency(o: &Opts, rows: &mut Vec<Row>) -> Res<()> {
    let consumers = if o.quick { 200 } else { 1000 };
    let dur = o.secs(20, 4);
    let name = format!(
        "latency {consumers} consumers, 100 ev/s, {}s",
        dur.as_secs()
    );
    let mut raw_p99 = None;
    let mut results = Vec::new();
    for &system in &o.systems {
        let (rate, mut lat, lost, dup, closed, s, t) =
            run_fanout(o, system, consumers, |_| Pace::Rate(100.0), dur, true).await?;
        let (p50, p99, max) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99), pct(&mut lat, 1.0));
        if system == System::Raw {
            raw_p99 = Some(p99);
        }
        eprintln!(
            "  latency {}: p50 {p50:.2} p99 {p99:.2} max {max:.2} ms",
            system.name()
        );
        results.push((system, rate, p50, p99, max, lost, dup, closed, s, t));
    }
    for (system, rate, p50, p99, max, lost, dup, closed, s, t) in results {
        let is_us = system == System::Wsbridge;
        rows.push(Row {
            scenario: name.clone(),
            system,
            result: format!("{:.0}k frames/s{}", rate / 1000.0, closed_note(closed)),
            latency: format!("p50 {p50:.1} / p99 {p99:.1} / max {max:.1} ms"),
            lost: lost.to_string(),
            dup: dup.to_string(),
            cpu: cpu_cell(s, t),
            goal: if is_us {
                "p99 ≤ 1.5× raw".into()
            } else {
                String::new()
            },
            met: match (is_us, raw_p99) {
                (true, Some(r)) => format!("{} ({:.2}× raw)", yes(p99 <= 1.5 * r), p99 / r),
                (true, None) => "raw not run".into(),
                _ => String::new(),
            },
        });
    }
    Ok(())
}

/// 1 consumer (+ 1 webhook for wsbridge) at 10,000 events/s.
async fn scenario_latency1(o: &Opts, rows: &mut Vec<Row>) -> Res<()> {
    let dur = o.secs(10, 3);
    let name = format!(
        "latency 1 consumer + 1 webhook, 10k ev/s, {}s",
        dur.as_secs()
    );
    for &system in o.systems.iter().filter(|s| **s != System::Nchan) {
        let hooks = Arc::new(Hooks::default());
        let webhook = if system == System::Wsbridge {
            Some(start_receiver(hooks.clone()).await?)
        } else {
            None
        };
        let pushers = pushers_for(system, 1).await?;
        let srv = start_server(system, &pushers, webhook).await?;
        let Crowd {
            progress,
            record,
            stop,
            handles,
        } = crowd(system, srv.addr, 1).await?;
        let push_stop = CancellationToken::new();
        let driver = tokio::spawn(
            pushers[0]
                .clone()
                .drive(Pace::Rate(10_000.0), push_stop.clone()),
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        record.store(true, Ordering::Relaxed);
        hooks.record.store(true, Ordering::Relaxed);
        let cpu = CpuWindow::start(&srv);
        let f0 = progress.total();
        tokio::time::sleep(dur).await;
        let (secs, s, t) = cpu.end(&srv);
        let rate = progress.total().saturating_sub(f0) as f64 / secs;
        record.store(false, Ordering::Relaxed);
        hooks.record.store(false, Ordering::Relaxed);
        push_stop.cancel();
        let _ = driver.await;
        let sent = pushers[0].sent.load(Ordering::Relaxed);
        drain(&progress, sent, Duration::from_secs(10)).await;
        if webhook.is_some() {
            let end = Instant::now() + Duration::from_secs(30);
            while hooks.distinct(0) < sent && Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        stop.cancel();
        let mut seen = Seen::default();
        for h in handles {
            seen = h.await.map_err(|e| e.to_string())?;
        }
        srv.stop();
        let mut lat = std::mem::take(&mut seen.lat_us);
        let (p50, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
        let mut lost = seen.lost(&[sent]);
        let mut dup = seen.dups;
        let mut latency = format!("WS p50 {p50:.2} / p99 {p99:.2} ms");
        let mut met = String::new();
        if webhook.is_some() {
            let (hp50, hp99, hdups) = match hooks.inner.lock() {
                Ok(mut i) => {
                    let mut l = std::mem::take(&mut i.lat_us);
                    (pct(&mut l, 0.5), pct(&mut l, 0.99), i.dups)
                }
                Err(_) => (f64::NAN, f64::NAN, 0),
            };
            let hlost = sent.saturating_sub(hooks.distinct(0));
            lost += hlost;
            dup += hdups;
            latency += &format!("; hook p50 {hp50:.2} / p99 {hp99:.2} ms");
            met = yes(p99 < 5.0 && hp99 < 10.0 && lost == 0);
        }
        eprintln!(
            "  latency1 {}: {latency} lost {lost} dup {dup}",
            system.name()
        );
        rows.push(Row {
            scenario: name.clone(),
            system,
            result: format!("{:.0} ev/s", rate),
            latency,
            lost: lost.to_string(),
            dup: dup.to_string(),
            cpu: cpu_cell(s, t),
            goal: if system == System::Wsbridge {
                "p99 < 5 ms WS, < 10 ms webhook".into()
            } else {
                String::new()
            },
            met,
        });
    }
    Ok(())
}

/// 3 upstreams at full speed → (journal) → 1 consumer.
async fn scenario_ingest(o: &Opts, rows: &mut Vec<Row>) -> Res<()> {
    let dur = o.secs(10, 3);
    let name = format!(
        "ingest 3 upstreams full speed → 1 consumer, {}s",
        dur.as_secs()
    );
    let mut raw_rate = None;
    let mut results = Vec::new();
    for &system in o.systems.iter().filter(|s| **s != System::Nchan) {
        let pushers = pushers_for(system, 3).await?;
        let srv = start_server(system, &pushers, None).await?;
        let Crowd {
            progress,
            record: _,
            stop,
            handles,
        } = crowd(system, srv.addr, 1).await?;
        let push_stop = CancellationToken::new();
        let drivers = drive_all(&pushers, &Pace::Full, &push_stop);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let cpu = CpuWindow::start(&srv);
        let f0 = progress.counts[0].load(Ordering::Relaxed);
        tokio::time::sleep(dur).await;
        let (secs, s, t) = cpu.end(&srv);
        let f1 = progress.counts[0].load(Ordering::Relaxed);
        let (sent, seen) = wind_down(
            push_stop,
            drivers,
            &pushers,
            (progress, stop, handles),
            Duration::from_secs(30),
        )
        .await?;
        srv.stop();
        let rate = f1.saturating_sub(f0) as f64 / secs;
        let lost = seen.lost(&sent);
        if system == System::Raw {
            raw_rate = Some(rate);
        }
        eprintln!(
            "  ingest {}: {rate:.0} ev/s lost {lost} dup {}",
            system.name(),
            seen.dups
        );
        results.push((system, rate, lost, seen.dups, seen.closed, s, t));
    }
    for (system, rate, lost, dup, closed, s, t) in results {
        let is_us = system == System::Wsbridge;
        rows.push(Row {
            scenario: name.clone(),
            system,
            result: format!(
                "{:.0}k ev/s{}{}",
                rate / 1000.0,
                if is_us { " journalled" } else { "" },
                closed_note(u64::from(closed))
            ),
            latency: "–".into(),
            lost: lost.to_string(),
            dup: dup.to_string(),
            cpu: cpu_cell(s, t),
            goal: if is_us {
                "≥200k ev/s, ≥50% of raw".into()
            } else {
                String::new()
            },
            met: match (is_us, raw_rate) {
                (true, Some(r)) => format!(
                    "{} ({:.0}% of raw)",
                    yes(rate >= 200_000.0 && rate >= 0.5 * r),
                    rate / r * 100.0
                ),
                (true, None) => yes(rate >= 200_000.0),
                _ => String::new(),
            },
        });
    }
    Ok(())
}

/// Signed deliveries to one keep-alive receiver; the publisher stays ≤ 5,000 events ahead of
/// the receiver so the run measures delivery, not an ever-growing backlog.
async fn scenario_webhooks(o: &Opts, rows: &mut Vec<Row>) -> Res<()> {
    if !o.systems.contains(&System::Wsbridge) {
        return Ok(());
    }
    let dur = o.secs(10, 3);
    let name = format!(
        "webhooks: signed deliveries, 1 keep-alive receiver, {}s",
        dur.as_secs()
    );
    let hooks = Arc::new(Hooks::default());
    let addr = start_receiver(hooks.clone()).await?;
    let pushers = pushers_for(System::Wsbridge, 1).await?;
    let srv = start_server(System::Wsbridge, &pushers, Some(addr)).await?;
    // The window follows the receiver's count.
    let progress = Progress::new(1);
    let push_stop = CancellationToken::new();
    let driver = tokio::spawn(
        pushers[0]
            .clone()
            .drive(Pace::Window(5000, progress.clone()), push_stop.clone()),
    );
    let follow_stop = CancellationToken::new();
    let follow = {
        let (hooks, progress, stop) = (hooks.clone(), progress.clone(), follow_stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                progress.counts[0]
                    .store(hooks.deliveries.load(Ordering::Relaxed), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu = CpuWindow::start(&srv);
    let d0 = hooks.deliveries.load(Ordering::Relaxed);
    tokio::time::sleep(dur).await;
    let (secs, s, t) = cpu.end(&srv);
    let d1 = hooks.deliveries.load(Ordering::Relaxed);
    push_stop.cancel();
    let _ = driver.await;
    let sent = pushers[0].sent.load(Ordering::Relaxed);
    let end = Instant::now() + Duration::from_secs(60);
    while hooks.distinct(0) < sent && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    follow_stop.cancel();
    let _ = follow.await;
    srv.stop();
    let rate = (d1 - d0) as f64 / secs;
    let lost = sent.saturating_sub(hooks.distinct(0));
    let dup = hooks.inner.lock().map(|i| i.dups).unwrap_or(0);
    let unsigned = hooks.unsigned.load(Ordering::Relaxed);
    eprintln!("  webhooks: {rate:.0}/s lost {lost} dup {dup} unsigned {unsigned}");
    rows.push(Row {
        scenario: name,
        system: System::Wsbridge,
        result: format!(
            "{:.1}k deliveries/s{}",
            rate / 1000.0,
            if unsigned > 0 {
                format!(" ({unsigned} unsigned!)")
            } else {
                String::new()
            }
        ),
        latency: "–".into(),
        lost: lost.to_string(),
        dup: dup.to_string(),
        cpu: cpu_cell(s, t),
        goal: "≥20k deliveries/s".into(),
        met: yes(rate >= 20_000.0 && lost == 0),
    });
    Ok(())
}

/// 10,000 idle subscribed consumers: RSS per consumer, and RSS over time at 1 event/s.
async fn scenario_memory(o: &Opts, rows: &mut Vec<Row>) -> Res<()> {
    let consumers = if o.quick { 2000 } else { 10_000 };
    let hold = o.hold.map_or(o.secs(60, 10), Duration::from_secs);
    let name = format!(
        "memory {consumers} idle subscribed consumers, {}s at 1 ev/s",
        hold.as_secs()
    );
    for &system in &o.systems {
        let mut pushers = pushers_for(system, 1).await?;
        let srv = start_server(system, &pushers, None).await?;
        if system == System::Nchan {
            pushers.push(nchan_publisher(&srv).await?);
        }
        // One event through an empty server first, so lazily-built state is in the baseline.
        let push_stop = CancellationToken::new();
        let driver = tokio::spawn(pushers[0].clone().drive(Pace::Rate(1.0), push_stop.clone()));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let base = srv.usage().rss_kib;
        // Consumers join a running stream: each counts from the first frame it sees.
        ANCHOR_FIRST.store(true, Ordering::Relaxed);
        let crowd_result = crowd(system, srv.addr, consumers).await;
        ANCHOR_FIRST.store(false, Ordering::Relaxed);
        let Crowd {
            progress,
            stop,
            handles,
            ..
        } = crowd_result?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let cpu = CpuWindow::start(&srv);
        let connected = srv.usage().rss_kib;
        let mut samples = vec![connected];
        let end = Instant::now() + hold;
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_secs(1)).await;
            samples.push(srv.usage().rss_kib);
        }
        let trajectory: Vec<String> = samples
            .iter()
            .step_by(10)
            .map(|k| format!("{:.1}", *k as f64 / 1024.0))
            .collect();
        eprintln!(
            "  memory {}: RSS every 10 s (MiB): {}",
            system.name(),
            trajectory.join(" ")
        );
        let (_, s, t) = cpu.end(&srv);
        push_stop.cancel();
        let _ = driver.await;
        let sent = pushers[0].sent.load(Ordering::Relaxed);
        let end = Instant::now() + Duration::from_secs(20);
        while !progress.caught_up(sent) && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
        let (mut lost, mut dup, mut closed) = (0, 0, 0);
        for h in handles {
            let seen = h.await.map_err(|e| e.to_string())?;
            if seen.lost(&[sent]) > 0 {
                eprintln!(
                    "  memory {}: a consumer lost {}: frames {} gaps {} next {} of {sent} anchored {}",
                    system.name(),
                    seen.lost(&[sent]),
                    seen.frames,
                    seen.gaps,
                    seen.next[0],
                    seen.anchored[0]
                );
            }
            lost += seen.lost(&[sent]);
            dup += seen.dups;
            closed += u64::from(seen.closed);
        }
        srv.stop();
        // Per consumer: what the server holds at the end of the hold, over its baseline (so
        // write buffers grown by the first events are included). Flat: the last sample against
        // the first one after a warm-up of a sixth of the hold (every consumer has had events).
        let last = *samples.last().unwrap_or(&connected);
        let per = last.saturating_sub(base) as f64 / consumers as f64;
        let warm = samples.get(samples.len() / 6).copied().unwrap_or(connected);
        let lo = samples.iter().copied().min().unwrap_or(connected);
        let hi = samples.iter().copied().max().unwrap_or(connected);
        let drift = (last as f64 - warm as f64) / warm as f64 * 100.0;
        eprintln!(
            "  memory {}: base {base} KiB, connected {connected} KiB, {per:.2} KiB/consumer, end {last} KiB ({drift:+.1}%)",
            system.name()
        );
        let is_us = system == System::Wsbridge;
        rows.push(Row {
            scenario: name.clone(),
            system,
            result: format!(
                "{per:.2} KiB/consumer (RSS {:.1}→{:.1} MiB; {:.1}..{:.1} MiB held; {drift:+.1}% after warm-up){}",
                base as f64 / 1024.0,
                last as f64 / 1024.0,
                lo as f64 / 1024.0,
                hi as f64 / 1024.0,
                closed_note(closed)
            ),
            latency: "–".into(),
            lost: lost.to_string(),
            dup: dup.to_string(),
            cpu: cpu_cell(s, t),
            goal: if is_us { "≤8 KiB/consumer, RSS flat (±2%)".into() } else { String::new() },
            met: if is_us { yes(per <= 8.0 && drift.abs() <= 2.0) } else { String::new() },
        });
    }
    Ok(())
}

/// Every upstream dropped at once under load: time until all resubscribed, and loss.
async fn scenario_reconnect(o: &Opts, rows: &mut Vec<Row>) -> Res<()> {
    if !o.systems.contains(&System::Wsbridge) {
        return Ok(());
    }
    let name = "reconnect storm: 3 upstreams × 1,000 ev/s dropped at once, backoff 1 s".to_string();
    let pushers = pushers_for(System::Wsbridge, 3).await?;
    let srv = start_server(System::Wsbridge, &pushers, None).await?;
    let Crowd {
        progress,
        record: _,
        stop,
        handles,
    } = crowd(System::Wsbridge, srv.addr, 1).await?;
    let push_stop = CancellationToken::new();
    let drivers = drive_all(&pushers, &Pace::Rate(1000.0), &push_stop);
    tokio::time::sleep(o.secs(3, 1)).await;
    let cpu = CpuWindow::start(&srv);
    let dropped = Instant::now();
    for p in &pushers {
        p.drop_all();
    }
    let mut worst = Duration::ZERO;
    for p in &pushers {
        p.wait_subscribed(2, Duration::from_secs(20)).await?;
        if let Some(t) = p.last_subscribed.lock().ok().and_then(|t| *t) {
            worst = worst.max(t.saturating_duration_since(dropped));
        }
    }
    tokio::time::sleep(o.secs(3, 1)).await;
    let (_, s, t) = cpu.end(&srv);
    let (sent, seen) = wind_down(
        push_stop,
        drivers,
        &pushers,
        (progress, stop, handles),
        Duration::from_secs(10),
    )
    .await?;
    srv.stop();
    let lost = seen.lost(&sent);
    eprintln!(
        "  reconnect: all resubscribed after {worst:?}; lost {lost} dup {}",
        seen.dups
    );
    rows.push(Row {
        scenario: name,
        system: System::Wsbridge,
        result: format!("all 3 resubscribed {} ms after the drop", worst.as_millis()),
        latency: "–".into(),
        lost: lost.to_string(),
        dup: seen.dups.to_string(),
        cpu: cpu_cell(s, t),
        goal: "within the first backoff step (1 s, +100 ms for connect and subscribe), 0 lost"
            .into(),
        met: yes(worst <= Duration::from_millis(1100) && lost == 0),
    });
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// main

fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
            return r.rlim_cur;
        }
    }
    0
}

const SCENARIOS: &[&str] = &[
    "fanout",
    "latency",
    "latency1",
    "ingest",
    "webhooks",
    "memory",
    "reconnect",
];

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench bench -- [--quick] [--only {}] [--systems wsbridge,raw,nchan] [--hold SECS]",
        SCENARIOS.join(",")
    );
    std::process::exit(2)
}

/// Cheap checks of the measuring code itself, run before every bench (a wrong parser would
/// make every figure wrong).
fn self_check() {
    let f = frame(2, 12345, 678);
    assert_eq!(f.len(), FRAME_BYTES, "frame size");
    assert!(
        serde_json::from_str::<serde_json::Value>(&f).is_ok(),
        "frame is JSON"
    );
    assert_eq!(parse_event(&f), Some((2, 12345, 678)));
    let wrapped = format!(r#"{{"op":"event","seq":9,"event":{{"data":{f}}}}}"#);
    assert_eq!(parse_event(&wrapped), Some((2, 12345, 678)));
    let mut s = Seen::default();
    for n in [0, 1, 3, 3, 4] {
        s.event(0, n, 0, false);
    }
    assert_eq!((s.gaps, s.dups, s.lost(&[7])), (1, 1, 3), "loss accounting");
}

fn main() {
    START.get_or_init(Instant::now);
    self_check();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    if args.first().map(String::as_str) == Some("raw-server") {
        raise_nofile();
        let port = args
            .get(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| usage());
        if let Err(e) = rt.block_on(raw_server(port, args[2..].to_vec())) {
            eprintln!("raw-server: {e}");
            std::process::exit(1);
        }
        return;
    }
    let mut quick = false;
    let mut hold = None;
    let mut only: Vec<String> = SCENARIOS.iter().map(|s| s.to_string()).collect();
    let mut systems = vec![System::Wsbridge, System::Raw, System::Nchan];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--bench" => {} // added by `cargo bench`
            "--quick" => quick = true,
            "--hold" => {
                hold = Some(
                    it.next()
                        .and_then(|h| h.parse().ok())
                        .unwrap_or_else(|| usage()),
                )
            }
            "--only" => {
                only = it
                    .next()
                    .unwrap_or_else(|| usage())
                    .split(',')
                    .map(str::to_string)
                    .collect();
                if let Some(bad) = only.iter().find(|s| !SCENARIOS.contains(&s.as_str())) {
                    eprintln!("unknown scenario {bad:?}");
                    usage();
                }
            }
            "--systems" => {
                systems = Vec::new();
                for s in it.next().unwrap_or_else(|| usage()).split(',') {
                    systems.push(match s {
                        "wsbridge" => System::Wsbridge,
                        "raw" => System::Raw,
                        "nchan" => System::Nchan,
                        _ => usage(),
                    });
                }
            }
            _ => usage(),
        }
    }
    if systems.contains(&System::Nchan) && !nchan_available() {
        eprintln!(
            "nchan not installed ({NGINX}, {NCHAN_MODULE}); run benches/run.sh to install it. Skipping nchan."
        );
        systems.retain(|s| *s != System::Nchan);
    }
    let nofile = raise_nofile();
    let o = Opts {
        quick,
        systems,
        hold,
    };
    eprintln!(
        "open-files limit raised to {nofile}; scenarios: {}",
        only.join(",")
    );
    let mut rows = Vec::new();
    let t0 = Instant::now();
    let result: Res<()> = rt.block_on(async {
        for s in &only {
            eprintln!("scenario {s}");
            match s.as_str() {
                "fanout" => scenario_fanout(&o, &mut rows).await?,
                "latency" => scenario_latency(&o, &mut rows).await?,
                "latency1" => scenario_latency1(&o, &mut rows).await?,
                "ingest" => scenario_ingest(&o, &mut rows).await?,
                "webhooks" => scenario_webhooks(&o, &mut rows).await?,
                "memory" => scenario_memory(&o, &mut rows).await?,
                "reconnect" => scenario_reconnect(&o, &mut rows).await?,
                _ => {}
            }
        }
        Ok(())
    });
    print_table(&rows);
    eprintln!("total {:.0} s", t0.elapsed().as_secs_f64());
    if let Err(e) = result {
        eprintln!("bench failed: {e}");
        std::process::exit(1);
    }
}

fn print_table(rows: &[Row]) {
    println!("| scenario | system | result | latency | lost | dup | CPU server / load tool | goal | met |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut last = String::new();
    let mut by: HashMap<&str, usize> = HashMap::new();
    for r in rows {
        *by.entry(r.scenario.as_str()).or_default() += 1;
        let scenario = if r.scenario == last {
            ""
        } else {
            r.scenario.as_str()
        };
        last = r.scenario.clone();
        println!(
            "| {scenario} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.system.name(),
            r.result,
            r.latency,
            r.lost,
            r.dup,
            r.cpu,
            r.goal,
            r.met
        );
    }
}
