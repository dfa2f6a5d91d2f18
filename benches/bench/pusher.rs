//! The upstream pusher: a minimal provider server (VoIPBIN dialect) or a publisher client,
//! and how fast it sends.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

use crate::frames::{frame, now_us, ws_config};
use crate::Res;

/// How fast a pusher sends.
#[derive(Clone)]
pub(crate) enum Pace {
    /// A fixed number of events per second.
    Rate(f64),
    /// At most `ahead` events beyond the slowest consumer of `progress`.
    Window(u64, Arc<Progress>),
    /// As fast as the connection accepts (TCP backpressure).
    Full,
}

/// Per-consumer received counts, read by a windowed pusher.
#[derive(Default)]
pub(crate) struct Progress {
    pub(crate) counts: Vec<AtomicU64>,
    /// Consumers whose connection ended: ignored by `min`, so they cannot stall a pusher.
    pub(crate) closed: Vec<AtomicBool>,
    /// The next `n` each consumer expects from upstream 0 (its last frame's `n` + 1).
    pub(crate) next: Vec<AtomicU64>,
}

impl Progress {
    pub(crate) fn new(n: usize) -> Arc<Progress> {
        Arc::new(Progress {
            counts: (0..n).map(|_| AtomicU64::new(0)).collect(),
            closed: (0..n).map(|_| AtomicBool::new(false)).collect(),
            next: (0..n).map(|_| AtomicU64::new(0)).collect(),
        })
    }
    /// Whether every open consumer has had upstream 0's frames up to `sent`.
    pub(crate) fn caught_up(&self, sent: u64) -> bool {
        self.next
            .iter()
            .zip(&self.closed)
            .all(|(n, c)| c.load(Ordering::Relaxed) || n.load(Ordering::Relaxed) >= sent)
    }
    /// Frames received by the slowest open consumer.
    pub(crate) fn min(&self) -> u64 {
        self.counts
            .iter()
            .zip(&self.closed)
            .filter(|(_, c)| !c.load(Ordering::Relaxed))
            .map(|(n, _)| n.load(Ordering::Relaxed))
            .min()
            .unwrap_or(u64::MAX / 2)
    }
    /// Frames received by all consumers.
    pub(crate) fn total(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// One upstream: accepts provider connections (or dials a publisher endpoint) and pushes
/// numbered frames into them.
pub(crate) struct Pusher {
    pub(crate) u: usize,
    pub(crate) addr: Option<SocketAddr>,
    pub(crate) conns: Mutex<Vec<mpsc::Sender<Utf8Bytes>>>,
    /// Subscribe frames seen (one per (re)connection of a client).
    pub(crate) subscribed: AtomicUsize,
    pub(crate) last_subscribed: Mutex<Option<Instant>>,
    changed: Notify,
    /// Frames handed to a connection (what a lossless server must deliver).
    pub(crate) sent: AtomicU64,
}

impl Pusher {
    /// Upstream `u`, listening at `addr` (`None`: a publisher client), nothing sent yet.
    fn new(u: usize, addr: Option<SocketAddr>) -> Arc<Pusher> {
        Arc::new(Pusher {
            u,
            addr,
            conns: Mutex::new(Vec::new()),
            subscribed: AtomicUsize::new(0),
            last_subscribed: Mutex::new(None),
            changed: Notify::new(),
            sent: AtomicU64::new(0),
        })
    }

    /// A provider server on an ephemeral port.
    pub(crate) async fn listen(u: usize) -> Res<Arc<Pusher>> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("pusher bind: {e}"))?;
        let p = Pusher::new(u, listener.local_addr().ok());
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
    pub(crate) async fn publish_to(u: usize, url: &str) -> Res<Arc<Pusher>> {
        let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true)
            .await
            .map_err(|e| format!("publisher connect {url}: {e}"))?;
        let p = Pusher::new(u, None);
        let me = p.clone();
        tokio::spawn(async move { me.serve(ws, false).await });
        Ok(p)
    }

    pub(crate) fn url(&self) -> String {
        match self.addr {
            Some(a) => format!("ws://{a}/v1.0/ws"),
            None => String::new(),
        }
    }

    /// Owns one connection: waits for the client's subscribe frame (server side), then
    /// writes queued frames, batching writes and flushing when the queue is empty.
    pub(crate) async fn serve<S>(
        &self,
        ws: tokio_tungstenite::WebSocketStream<S>,
        wait_subscribe: bool,
    ) where
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
    pub(crate) fn drop_all(&self) {
        if let Ok(mut c) = self.conns.lock() {
            c.clear();
        }
    }

    pub(crate) async fn wait_subscribed(&self, n: usize, deadline: Duration) -> Res<()> {
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
    pub(crate) async fn push(&self, stop: &CancellationToken) -> bool {
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
    pub(crate) async fn drive(self: Arc<Self>, pace: Pace, stop: CancellationToken) {
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
