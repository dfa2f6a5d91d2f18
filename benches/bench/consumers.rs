//! The WebSocket consumers: connecting, subscribing and counting what each one saw.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::frames::{now_us, parse_event, ws_config, Mark, CONSUMER_TOKEN};
use crate::pusher::Progress;
use crate::servers::System;
use crate::Res;

/// What one consumer saw.
#[derive(Default)]
pub(crate) struct Seen {
    pub(crate) frames: u64,
    pub(crate) gaps: u64,
    pub(crate) dups: u64,
    pub(crate) next: [u64; 3],
    pub(crate) lat_us: Vec<u32>,
    pub(crate) closed: bool,
    /// Count from the first frame seen per upstream (consumers that join a running stream).
    anchor_first: bool,
    pub(crate) anchored: [bool; 3],
}

impl Seen {
    pub(crate) fn event(&mut self, u: usize, n: u64, ts: u64, record: bool) {
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
    pub(crate) fn lost(&self, sent: &[u64]) -> u64 {
        self.gaps
            + sent
                .iter()
                .enumerate()
                .map(|(u, s)| s.saturating_sub(self.next[u.min(2)]))
                .sum::<u64>()
    }
}

/// Set while consumers join a stream that is already running (the memory scenario).
pub(crate) static ANCHOR_FIRST: AtomicBool = AtomicBool::new(false);

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
                if let Some(Mark { u, n, ts }) = parse_event(&t) {
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

/// Consumers of one scenario run: their progress, the latency switch, the stop token and
/// their tasks.
pub(crate) struct Crowd {
    pub(crate) progress: Arc<Progress>,
    pub(crate) record: Arc<AtomicBool>,
    pub(crate) stop: CancellationToken,
    pub(crate) handles: Vec<tokio::task::JoinHandle<Seen>>,
}

/// Connects `n` consumers of `system` at `addr`.
pub(crate) async fn crowd(system: System, addr: SocketAddr, n: usize) -> Res<Crowd> {
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

/// Waits until every consumer has `sent` frames (or the deadline).
pub(crate) async fn drain(progress: &Progress, sent: u64, deadline: Duration) {
    let end = Instant::now() + deadline;
    while progress.min() < sent && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
