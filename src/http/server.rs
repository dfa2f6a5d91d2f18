//! The HTTP server's accept loop, with the limits that keep any peer (no token needed) from
//! exhausting the bridge's file descriptors: a cap on inbound connections, a header-read
//! timeout and an idle timeout for keep-alive connections.
//!
//! Each accepted connection is served by hyper (HTTP/1.1 with upgrades for `/v1/ws`, or h2c)
//! with the axum router as its service, as `axum::serve` does, plus:
//! - **cap** (`limits.max_connections`): a connection needs a slot from a semaphore; the slot
//!   travels with the socket, through a WebSocket upgrade, until the socket is closed. A
//!   connection over the cap is answered `503` and closed at once (counted), so the listener
//!   never leaves connections queued in the backlog nor spins on `EMFILE`. By default the cap
//!   is what the open-file limit leaves after a reserve for upstreams, webhooks, the store and
//!   NATS ([`connection_cap`]);
//! - **header timeout** (`limits.header_timeout`): a connection must deliver a complete
//!   request head within it, counted from the accept, and for later requests on a keep-alive
//!   connection from their first byte (slowloris);
//! - **idle timeout** (`limits.idle_timeout`): a keep-alive connection with no request in
//!   progress is closed after this long. A request in progress, including a streaming SSE
//!   response, has no timeout here, and an upgraded `/v1/ws` session has left the HTTP
//!   server: both have their own liveness (pings, slow-consumer closes).
//!
//! With `server.tls_cert` and `server.tls_key`, every connection is TLS ([`crate::tls::server`]):
//! the handshake counts as part of the first request head, so it too must finish within
//! `limits.header_timeout`; a failed handshake is counted and the connection closed.
//!
//! An `accept` error other than a peer's reset (`EMFILE`, `ENFILE`, `ENOBUFS`) is counted and
//! the listener backs off for [`ACCEPT_BACKOFF`] instead of looping hot.
//!
//! Shutdown: when the token is cancelled the listener is closed, every connection is told to
//! finish its request in progress and close, and [`serve`] returns once all have; the caller
//! bounds that wait with `server.shutdown_grace` and drops the rest by aborting the task.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::tls::server::Acceptor;

/// How long the listener pauses after an `accept` error such as `EMFILE`: the pending
/// connection stays in the backlog, and retrying at once would only fail again.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Descriptors always kept out of the inbound budget: stdio, the runtime's poller and
/// wakers, signal pipes, the listener, the store's files, a NATS connection, DNS lookups.
pub const BASE_RESERVE: u64 = 64;

/// The default cap's ceiling, whatever the open-file limit (a cap of a million connections
/// would let peers pin gigabytes of buffers).
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;

/// The smallest cap ever derived, so a bridge with a tiny open-file limit still serves
/// `/healthz` (the reserve is generous, so this rarely eats into it).
pub const MIN_DERIVED_CONNECTIONS: usize = 8;

/// The answer to a connection over the cap; written without waiting, then the socket closes.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 21\r\n\r\ntoo many connections\n";

/// The inbound connection limits in force (after deriving the cap).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// Limit on receiving a complete request head.
    pub header_timeout: Duration,
    /// Limit on a keep-alive connection with no request in progress.
    pub idle_timeout: Duration,
}

impl HttpLimits {
    /// The limits for `config`: its `[limits]` timeouts and the cap from
    /// `limits.max_connections`, bounded by the process's open-file limit (logged).
    pub fn from_config(config: &Config) -> HttpLimits {
        let open_files = open_files_limit();
        let reserve = descriptor_reserve(config);
        let max_connections = connection_cap(config.limits.max_connections, open_files, reserve);
        match (config.limits.max_connections, open_files) {
            (Some(wanted), Some(files)) if wanted > max_connections => warn!(
                limits.max_connections = wanted,
                open_files = files,
                reserve,
                using = max_connections,
                "limits.max_connections is more than the open-file limit leaves after the reserve for upstreams, webhooks and the store; using the smaller cap"
            ),
            _ => info!(
                max_connections,
                open_files = open_files.unwrap_or(0),
                reserve,
                header_timeout = ?config.limits.header_timeout,
                idle_timeout = ?config.limits.idle_timeout,
                "inbound connection limits"
            ),
        }
        HttpLimits {
            max_connections,
            header_timeout: config.limits.header_timeout,
            idle_timeout: config.limits.idle_timeout,
        }
    }
}

/// Descriptors kept free for everything but inbound connections: [`BASE_RESERVE`], four per
/// upstream (its socket, a reconnect overlapping the old one, DNS), and two per webhook
/// attempt allowed in flight (the attempt's socket and a pooled idle one).
pub fn descriptor_reserve(config: &Config) -> u64 {
    let upstreams = u64::try_from(config.upstreams.len()).unwrap_or(u64::MAX);
    let attempts = config
        .webhooks
        .iter()
        .map(|w| u64::try_from(w.max_in_flight).unwrap_or(u64::MAX))
        .fold(0u64, u64::saturating_add);
    BASE_RESERVE
        .saturating_add(upstreams.saturating_mul(4))
        .saturating_add(attempts.saturating_mul(2))
}

/// The connection cap: the configured one if the open-file limit leaves room for it after
/// `reserve`, else what it leaves (at least [`MIN_DERIVED_CONNECTIONS`]); without a configured
/// one, what the limit leaves, at most [`DEFAULT_MAX_CONNECTIONS`]. An unknown limit (not a
/// Unix system) trusts the configured cap, or uses 1024.
pub fn connection_cap(configured: Option<usize>, open_files: Option<u64>, reserve: u64) -> usize {
    let budget = open_files.map(|n| {
        usize::try_from(n.saturating_sub(reserve))
            .unwrap_or(usize::MAX)
            .max(MIN_DERIVED_CONNECTIONS)
    });
    match (configured, budget) {
        (Some(c), Some(b)) => c.min(b),
        (Some(c), None) => c,
        (None, Some(b)) => b.min(DEFAULT_MAX_CONNECTIONS),
        (None, None) => 1024,
    }
}

/// The process's soft open-file limit (`RLIMIT_NOFILE`), if the system has one.
pub fn open_files_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let (soft, _) = rlimit_nofile().ok()?;
        Some(soft)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

#[cfg(unix)]
fn rlimit_nofile() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct it is given a valid pointer to.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::useless_conversion)] // rlim_t is u64 on Linux, not everywhere
    Ok((u64::from(lim.rlim_cur), u64::from(lim.rlim_max)))
}

/// Raises the soft open-file limit to the hard limit (the default soft limit, often 1024, is
/// far below what a bridge with many consumers needs) and logs both. Returns the soft limit
/// now in force; on failure the old one stays and a warning is logged.
pub fn raise_open_files_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let (soft, hard) = match rlimit_nofile() {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, "cannot read the open-file limit (RLIMIT_NOFILE)");
                return None;
            }
        };
        if soft >= hard {
            info!(soft, hard, "open-file limit (RLIMIT_NOFILE)");
            return Some(soft);
        }
        let lim = libc::rlimit {
            rlim_cur: hard as libc::rlim_t,
            rlim_max: hard as libc::rlim_t,
        };
        // SAFETY: setrlimit reads only the struct it is given a valid pointer to.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            let e = io::Error::last_os_error();
            warn!(soft, hard, error = %e, "cannot raise the soft open-file limit to the hard limit");
            return Some(soft);
        }
        info!(
            soft = hard,
            was = soft,
            hard,
            "raised the soft open-file limit (RLIMIT_NOFILE) to the hard limit"
        );
        Some(hard)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Counters of the HTTP server, read by `/metrics`.
#[derive(Debug, Default)]
pub struct HttpStats {
    max_connections: AtomicU64,
    open: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    header_timeouts: AtomicU64,
    idle_timeouts: AtomicU64,
    accept_errors: AtomicU64,
    tls_handshake_failures: AtomicU64,
}

/// A snapshot of [`HttpStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HttpCounters {
    /// The connection cap in force.
    pub max_connections: u64,
    /// Connections open now (including upgraded `/v1/ws` sessions).
    pub open: u64,
    /// Connections accepted and served.
    pub accepted: u64,
    /// Connections answered 503 and closed because the cap was reached.
    pub refused: u64,
    /// Connections closed because a request head did not arrive in time.
    pub header_timeouts: u64,
    /// Keep-alive connections closed after being idle for the idle timeout.
    pub idle_timeouts: u64,
    /// `accept` failures (such as `EMFILE`), each followed by a back-off.
    pub accept_errors: u64,
    /// Connections closed because their TLS handshake failed (server TLS only).
    pub tls_handshake_failures: u64,
}

impl HttpStats {
    /// Counters for a server whose cap is `max_connections`.
    pub fn new(max_connections: usize) -> HttpStats {
        let stats = HttpStats::default();
        stats.max_connections.store(
            u64::try_from(max_connections).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        stats
    }

    /// The counters now.
    pub fn snapshot(&self) -> HttpCounters {
        HttpCounters {
            max_connections: self.max_connections.load(Ordering::Relaxed),
            open: self.open.load(Ordering::Relaxed),
            accepted: self.accepted.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            header_timeouts: self.header_timeouts.load(Ordering::Relaxed),
            idle_timeouts: self.idle_timeouts.load(Ordering::Relaxed),
            accept_errors: self.accept_errors.load(Ordering::Relaxed),
            tls_handshake_failures: self.tls_handshake_failures.load(Ordering::Relaxed),
        }
    }
}

/// Serves `app` on `listener` under `limits` (over TLS with `tls`) until `shutdown` is
/// cancelled, then waits for the connections still open to finish their requests.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: HttpLimits,
    stats: Arc<HttpStats>,
    shutdown: CancellationToken,
    tls: Option<Acceptor>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    let mut refusals = RateLimitedLog::default();
    let mut accept_failures = RateLimitedLog::default();
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = done {
                    if e.is_panic() {
                        warn!(error = %e, "an HTTP connection task panicked");
                    }
                }
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok(v) => v,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                    if let Some(suppressed) = accept_failures.should_log() {
                        warn!(error = %e, suppressed, backoff = ?ACCEPT_BACKOFF, "cannot accept an HTTP connection; backing off");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    }
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = refusals.should_log() {
                warn!(%peer, max_connections = limits.max_connections, suppressed,
                    "limits.max_connections reached: refusing inbound connections with 503");
            }
            refuse(stream);
            continue;
        };
        // Event frames are small and written as soon as they are ready (a batch, one flush):
        // with Nagle's algorithm the next frame waits for the peer's ACK of the last, a few
        // milliseconds at 10k events/s (the WebSocket p50 in the latency bench went from
        // ~6 ms to under 1 ms with it off). Best effort: a socket that refuses is still served.
        let _ = stream.set_nodelay(true);
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        stats.open.fetch_add(1, Ordering::Relaxed);
        let slot = Slot {
            _permit: permit,
            stats: stats.clone(),
        };
        connections.spawn(serve_connection(
            stream,
            peer,
            slot,
            Served {
                app: app.clone(),
                limits,
                stats: stats.clone(),
                shutdown: shutdown.clone(),
            },
            tls.clone(),
        ));
    }
    drop(listener);
    // Every connection task watches the token too: requests in progress finish, idle
    // connections close.
    while connections.join_next().await.is_some() {}
}

/// Errors of one incoming connection (the peer gave up before `accept`), not of the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Answers 503 if the socket takes it without waiting, then closes it.
fn refuse(stream: TcpStream) {
    let _ = stream.try_write(REFUSAL);
    drop(stream);
}

/// Logs at most once per interval, reporting how many were left out in between.
#[derive(Default)]
struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    const INTERVAL: Duration = Duration::from_secs(10);

    /// `Some(suppressed since the last line)` when a line may be logged now.
    fn should_log(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(at) if now.duration_since(at) < Self::INTERVAL => {
                self.suppressed = self.suppressed.saturating_add(1);
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// A connection's slot under the cap; freed (and the open gauge lowered) when the socket is
/// closed, which for an upgraded `/v1/ws` session is when the session ends.
struct Slot {
    _permit: OwnedSemaphorePermit,
    stats: Arc<HttpStats>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Which timeout a connection is exposed to now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for (the rest of) a request head since then.
    Head(Instant),
    /// This many requests in progress (their responses not yet fully sent): no timeout.
    Busy(usize),
    /// Keep-alive with no request in progress since then.
    Idle(Instant),
}

/// Why a connection was closed by the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expiry {
    Header,
    Idle,
}

/// One connection's phase, shared by its socket (bytes arriving), its service (requests
/// starting and their responses ending) and its watchdog (the deadlines).
#[derive(Debug)]
struct ConnState {
    phase: Mutex<Phase>,
    changed: Notify,
    /// Cleared when the HTTP server is done with the socket (closed or upgraded).
    tracking: AtomicBool,
}

impl ConnState {
    fn new() -> ConnState {
        ConnState {
            phase: Mutex::new(Phase::Head(Instant::now())),
            changed: Notify::new(),
            tracking: AtomicBool::new(true),
        }
    }

    fn update(&self, f: impl FnOnce(Phase) -> Phase) {
        let changed = match self.phase.lock() {
            Ok(mut phase) => {
                let next = f(*phase);
                let changed = next != *phase;
                *phase = next;
                changed
            }
            Err(_) => false,
        };
        if changed {
            self.changed.notify_one();
        }
    }

    /// Bytes arrived: on an idle keep-alive connection, the next request head has begun.
    fn bytes_read(&self) {
        if self.tracking.load(Ordering::Relaxed) {
            self.update(|p| match p {
                Phase::Idle(_) => Phase::Head(Instant::now()),
                other => other,
            });
        }
    }

    /// A request head is complete and the request is being handled.
    fn request_started(&self) {
        self.update(|p| match p {
            Phase::Busy(n) => Phase::Busy(n.saturating_add(1)),
            Phase::Head(_) | Phase::Idle(_) => Phase::Busy(1),
        });
    }

    /// A response was sent completely (or abandoned). Bytes of a pipelined next request
    /// already read count from now as idle time, still bounded.
    fn request_ended(&self) {
        self.update(|p| match p {
            Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
            _ => Phase::Idle(Instant::now()),
        });
    }

    /// The next deadline and what expires then; `None` while requests are in progress.
    fn deadline(&self, limits: &HttpLimits) -> Option<(Instant, Expiry)> {
        let phase = *self.phase.lock().ok()?;
        match phase {
            Phase::Head(since) => Some((since + limits.header_timeout, Expiry::Header)),
            Phase::Idle(since) => Some((since + limits.idle_timeout, Expiry::Idle)),
            Phase::Busy(_) => None,
        }
    }
}

/// The socket, reporting arriving bytes to the connection's state and holding its slot.
struct TrackedStream {
    io: TcpStream,
    state: Arc<ConnState>,
    _slot: Slot,
}

impl AsyncRead for TrackedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.bytes_read();
        }
        polled
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Marks a request in progress until its response body is done or dropped.
struct RequestGuard(Arc<ConnState>);

impl RequestGuard {
    fn start(state: &Arc<ConnState>) -> RequestGuard {
        state.request_started();
        RequestGuard(state.clone())
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

/// A response body that keeps its request counted as in progress while it is sent (an SSE
/// stream is in progress for as long as it streams).
struct GuardedBody {
    inner: Body,
    _guard: RequestGuard,
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The router as one connection's hyper service, marking its requests in progress.
#[derive(Clone)]
struct ConnService {
    app: axum::Router,
    state: Arc<ConnState>,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<GuardedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<GuardedBody>, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        // Taken before the handler runs, so that a handler dropped mid-way (the peer left)
        // also ends the request.
        let guard = RequestGuard::start(&self.state);
        let app = self.app.clone();
        Box::pin(async move {
            let response = match app.oneshot(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            Ok(response.map(|inner| GuardedBody {
                inner,
                _guard: guard,
            }))
        })
    }
}

/// What every connection is served with.
struct Served {
    app: axum::Router,
    limits: HttpLimits,
    stats: Arc<HttpStats>,
    shutdown: CancellationToken,
}

/// Serves one connection (after its TLS handshake, with `tls`) until it ends, a timeout
/// closes it, or shutdown lets it finish.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    slot: Slot,
    served: Served,
    tls: Option<Acceptor>,
) {
    let state = Arc::new(ConnState::new());
    let tracked = TrackedStream {
        io: stream,
        state: state.clone(),
        _slot: slot,
    };
    match tls {
        None => serve_io(tracked, peer, &state, served).await,
        Some(tls) => {
            // The handshake is the start of the first request head: the header timeout
            // bounds it (a peer that opens a socket and says nothing holds a slot otherwise).
            let handshake =
                tokio::time::timeout(served.limits.header_timeout, tls.acceptor().accept(tracked));
            let done = tokio::select! {
                done = handshake => done,
                _ = served.shutdown.cancelled() => return,
            };
            match done {
                Ok(Ok(stream)) => serve_io(stream, peer, &state, served).await,
                Ok(Err(e)) => {
                    served
                        .stats
                        .tls_handshake_failures
                        .fetch_add(1, Ordering::Relaxed);
                    debug!(%peer, error = %e, "TLS handshake failed; closing the connection");
                }
                Err(_) => {
                    served.stats.header_timeouts.fetch_add(1, Ordering::Relaxed);
                    debug!(%peer, "closing a connection: TLS handshake not finished within limits.header_timeout");
                }
            }
        }
    }
    // Dropping the connection closes the socket unless it was upgraded (then the session
    // owns it, and its slot); either way the HTTP server no longer watches its bytes.
    state.tracking.store(false, Ordering::Relaxed);
}

/// Serves HTTP on one connection's stream (plain, or TLS over it).
async fn serve_io<I>(io: I, peer: SocketAddr, state: &Arc<ConnState>, served: Served)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Served {
        app,
        limits,
        stats,
        shutdown,
    } = served;
    let io = TokioIo::new(io);
    let service = ConnService {
        app,
        state: state.clone(),
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // The header timeout is ours (it also covers the first request and h2c); hyper's own
    // would need a timer and restart on every keep-alive wait.
    builder.http1().header_read_timeout(None);
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        let deadline = state.deadline(&limits);
        let expire = async {
            match deadline {
                Some((at, _)) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(e) = served {
                    debug!(%peer, error = %e, "HTTP connection ended with an error");
                }
                break;
            }
            _ = state.changed.notified() => continue,
            _ = expire => {
                // The phase may have changed in the same instant; only a deadline that
                // still holds closes the connection.
                let Some((at, why)) = state.deadline(&limits) else { continue };
                if at > Instant::now() {
                    continue;
                }
                let (counter, key) = match why {
                    Expiry::Header => (&stats.header_timeouts, "limits.header_timeout"),
                    Expiry::Idle => (&stats.idle_timeouts, "limits.idle_timeout"),
                };
                counter.fetch_add(1, Ordering::Relaxed);
                debug!(%peer, limit = key, "closing an HTTP connection: {key} expired");
                break;
            }
            _ = shutdown.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> HttpLimits {
        HttpLimits {
            max_connections: 4,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_moves_between_header_busy_and_idle_deadlines() {
        let l = limits();
        let start = Instant::now();
        let s = ConnState::new();
        assert_eq!(
            s.deadline(&l),
            Some((start + l.header_timeout, Expiry::Header))
        );
        // A request in progress has no deadline, however long it takes (SSE).
        let s = Arc::new(s);
        let g1 = RequestGuard::start(&s);
        let g2 = RequestGuard::start(&s);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(s.deadline(&l), None);
        drop(g1);
        assert_eq!(
            s.deadline(&l),
            None,
            "one of two pipelined requests still runs"
        );
        s.bytes_read();
        assert_eq!(s.deadline(&l), None, "a request body arriving is not idle");
        drop(g2);
        let idle_since = Instant::now();
        assert_eq!(
            s.deadline(&l),
            Some((idle_since + l.idle_timeout, Expiry::Idle))
        );
        // The first byte of the next request starts its header deadline.
        tokio::time::advance(Duration::from_secs(5)).await;
        s.bytes_read();
        assert_eq!(
            s.deadline(&l),
            Some((Instant::now() + l.header_timeout, Expiry::Header))
        );
        // Once upgraded or closed, bytes no longer count.
        let _g = RequestGuard::start(&s);
        drop(_g);
        s.tracking.store(false, Ordering::Relaxed);
        let before = s.deadline(&l);
        tokio::time::advance(Duration::from_secs(1)).await;
        s.bytes_read();
        assert_eq!(s.deadline(&l), before);
    }

    #[tokio::test(start_paused = true)]
    async fn phase_changes_wake_the_watchdog() {
        let s = Arc::new(ConnState::new());
        let _g = RequestGuard::start(&s);
        // The change was stored as a permit: the watchdog, not yet waiting, still sees it.
        tokio::time::timeout(Duration::from_secs(1), s.changed.notified())
            .await
            .expect("notified");
    }

    #[test]
    fn the_cap_leaves_the_reserve_free() {
        // Derived: the limit minus the reserve, within [MIN, DEFAULT].
        assert_eq!(connection_cap(None, Some(256), 100), 156);
        assert_eq!(
            connection_cap(None, Some(1 << 20), 100),
            DEFAULT_MAX_CONNECTIONS
        );
        assert_eq!(connection_cap(None, Some(50), 100), MIN_DERIVED_CONNECTIONS);
        assert_eq!(connection_cap(None, None, 100), 1024);
        // Configured: honoured when the limit allows it, else bounded by what it leaves.
        assert_eq!(connection_cap(Some(20), Some(256), 100), 20);
        assert_eq!(connection_cap(Some(10_000), Some(256), 100), 156);
        assert_eq!(connection_cap(Some(10_000), None, 100), 10_000);
        assert_eq!(connection_cap(Some(5), Some(u64::MAX), u64::MAX), 5);
    }

    #[test]
    fn the_reserve_grows_with_upstreams_and_webhook_concurrency() {
        let text = r#"
            [[upstreams]]
            name = "vb"
            adapter = "voipbin"
            url = "ws://127.0.0.1:9102/v1.0/ws"
            token = "t"
            topics = ["customer_id:abc123:call:*"]
            [[webhooks]]
            name = "crm"
            url = "https://example.com/hooks"
            secrets = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]
            max_in_flight = 10
        "#;
        let c = Config::from_toml(text, |_| None, false).expect("config");
        assert_eq!(descriptor_reserve(&c), BASE_RESERVE + 4 + 20);
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_logged_at_most_once_per_interval() {
        let mut log = RateLimitedLog::default();
        assert_eq!(log.should_log(), Some(0));
        assert_eq!(log.should_log(), None);
        tokio::time::advance(RateLimitedLog::INTERVAL / 2).await;
        assert_eq!(log.should_log(), None);
        tokio::time::advance(RateLimitedLog::INTERVAL / 2).await;
        assert_eq!(log.should_log(), Some(2));
    }
}
