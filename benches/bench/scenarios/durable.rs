//! Durable subscriptions (issue 16): upstreams at full speed through the journal, read once by
//! one plain subscription and once by one durable shared by 4 connections that ack every
//! batch they handled (`seqs`), each run on a fresh server; events processed per second, the
//! durable's against the plain one's (goal ≥ 0.5×). Then one of the 4 connections stops
//! acking, fills its `max_unacked`, and closes: how long until the others have every event
//! it held (the redelivery latency after a connection drops).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::{drive_all, Opts};
use crate::consumers::crowd;
use crate::frames::{parse_event, ws_config, CONSUMER_TOKEN};
use crate::pusher::Pace;
use crate::report::{closed_note, cpu_cell, yes, Row};
use crate::servers::{pushers_for, start_server, CpuUse, CpuWindow, System};
use crate::Res;

/// Connections on the durable.
const WORKERS: usize = 4;
/// Each connection's `max_unacked`.
const MAX_UNACKED: usize = 256;
/// Acks are sent after this many events, or when no frame is waiting.
const ACK_BATCH: usize = 64;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// What the durable's workers share.
#[derive(Default)]
struct Shared {
    /// Events handled and acked, all workers.
    processed: AtomicU64,
    /// Redeliveries seen (delivery ≥ 2).
    redelivered: AtomicU64,
    /// Worker 0 stops acking (and records what it holds) once set.
    hold: AtomicBool,
    /// The seqs worker 0 holds unacked.
    held: Mutex<Vec<u64>>,
    /// Worker 0 holds `MAX_UNACKED` events.
    full: Notify,
    /// When another worker got each redelivered seq.
    again: Mutex<HashMap<u64, Instant>>,
    /// (upstream, n) of every event handled, per worker, for loss and duplicate counts.
    marks: Mutex<Vec<(usize, u64)>>,
    /// When worker 0 closed its connection (the drop whose redelivery is measured).
    closed: Mutex<Option<Instant>>,
}

/// `"key":<number>` in a frame.
fn number_after(frame: &str, key: &str) -> Option<u64> {
    let at = frame.find(key)? + key.len();
    let digits: String = frame[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

async fn connect_durable(addr: SocketAddr) -> Res<Ws> {
    let mut req = format!("ws://{addr}/v1/ws")
        .into_client_request()
        .map_err(|e| e.to_string())?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {CONSUMER_TOKEN}")
            .parse()
            .map_err(|e| format!("{e}"))?,
    );
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(ws_config()), true)
        .await
        .map_err(|e| format!("durable connect: {e}"))?;
    let sub = format!(
        r#"{{"op":"subscribe","id":"d","durable":"bench","from":"latest","max_unacked":{MAX_UNACKED}}}"#
    );
    ws.send(Message::text(sub))
        .await
        .map_err(|e| format!("subscribe: {e}"))?;
    let wait = async {
        while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Text(t)) if t.contains(r#""op":"subscribed""#) => return Ok(()),
                Ok(Message::Text(t)) if t.contains(r#""op":"error""#) => {
                    return Err(format!("durable subscribe: {t}"))
                }
                Ok(_) => continue,
                Err(e) => return Err(format!("durable subscribe: {e}")),
            }
        }
        Err("closed before subscribed".to_string())
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .map_err(|_| "no subscribed within 20 s".to_string())??;
    Ok(ws)
}

async fn send_acks(ws: &mut Ws, seqs: &mut Vec<u64>) -> bool {
    if seqs.is_empty() {
        return true;
    }
    let list = seqs
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    seqs.clear();
    ws.send(Message::text(format!(
        r#"{{"op":"ack","id":"d","seqs":[{list}]}}"#
    )))
    .await
    .is_ok()
}

/// One connection on the durable: handles every event (records it), acks per batch; worker 0
/// stops acking once `hold` is set and closes when it holds its `max_unacked`.
async fn worker(mut ws: Ws, idx: usize, shared: Arc<Shared>, stop: CancellationToken) {
    let mut acks = Vec::with_capacity(ACK_BATCH);
    let mut marks = Vec::new();
    loop {
        let m = match ws.next().now_or_never() {
            Some(m) => m,
            None => {
                if !send_acks(&mut ws, &mut acks).await {
                    break;
                }
                tokio::select! {
                    m = ws.next() => m,
                    _ = stop.cancelled() => break,
                }
            }
        };
        let Some(Ok(Message::Text(t))) = m else {
            match m {
                Some(Ok(_)) => continue,
                _ => break,
            }
        };
        let (Some(seq), Some(delivery)) = (
            number_after(&t, r#""seq":"#),
            number_after(&t, r#""delivery":"#),
        ) else {
            continue;
        };
        if let Some(mark) = parse_event(&t) {
            marks.push((mark.u, mark.n));
        }
        if delivery >= 2 {
            shared.redelivered.fetch_add(1, Ordering::Relaxed);
            if idx != 0 {
                shared
                    .again
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(seq, Instant::now());
            }
        }
        if idx == 0 && shared.hold.load(Ordering::Relaxed) {
            let mut held = shared.held.lock().unwrap_or_else(|p| p.into_inner());
            held.push(seq);
            if held.len() >= MAX_UNACKED {
                shared.full.notify_one();
            }
            continue;
        }
        acks.push(seq);
        shared.processed.fetch_add(1, Ordering::Relaxed);
        if acks.len() >= ACK_BATCH && !send_acks(&mut ws, &mut acks).await {
            break;
        }
    }
    drop(ws);
    if idx == 0 {
        *shared.closed.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }
    shared
        .marks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend(marks);
}

/// One run's figures.
struct DurableRun {
    rate: f64,
    lost: u64,
    dup: u64,
    cpu: CpuUse,
    /// Redelivery after a connection drops: (first, last) of the held events, ms.
    redelivery_ms: Option<(f64, f64)>,
    /// The (plain) consumer was closed during the run.
    closed: bool,
}

async fn plain_run(dur: Duration) -> Res<DurableRun> {
    let pushers = pushers_for(System::Wsbridge, 3).await?;
    let srv = start_server(System::Wsbridge, &pushers, None).await?;
    let consumers = crowd(System::Wsbridge, srv.addr, 1).await?;
    let progress = consumers.progress.clone();
    let push_stop = CancellationToken::new();
    let drivers = drive_all(&pushers, &Pace::Full, &push_stop);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let window = CpuWindow::start(&srv);
    let f0 = progress.counts[0].load(Ordering::Relaxed);
    tokio::time::sleep(dur).await;
    let cpu = window.end(&srv);
    let f1 = progress.counts[0].load(Ordering::Relaxed);
    push_stop.cancel();
    for d in drivers {
        let _ = d.await;
    }
    consumers.stop.cancel();
    // A plain consumer more than the ring behind is closed (4001): say so in its row.
    let mut closed = false;
    for h in consumers.handles {
        closed |= h.await.map(|seen| seen.closed).unwrap_or(false);
    }
    srv.stop();
    Ok(DurableRun {
        rate: f1.saturating_sub(f0) as f64 / cpu.secs,
        lost: 0,
        dup: 0,
        cpu,
        redelivery_ms: None,
        closed,
    })
}

async fn durable_run(dur: Duration) -> Res<DurableRun> {
    let pushers = pushers_for(System::Wsbridge, 3).await?;
    let srv = start_server(System::Wsbridge, &pushers, None).await?;
    let shared = Arc::new(Shared::default());
    let stop = CancellationToken::new();
    // Worker 0 is closed on its own (the drop whose redelivery is measured).
    let drop0 = stop.child_token();
    let mut handles = Vec::new();
    for idx in 0..WORKERS {
        let ws = connect_durable(srv.addr).await?;
        let own = if idx == 0 {
            drop0.clone()
        } else {
            stop.clone()
        };
        handles.push(tokio::spawn(worker(ws, idx, shared.clone(), own)));
    }
    let push_stop = CancellationToken::new();
    let drivers = drive_all(&pushers, &Pace::Full, &push_stop);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let window = CpuWindow::start(&srv);
    let p0 = shared.processed.load(Ordering::Relaxed);
    tokio::time::sleep(dur).await;
    let cpu = window.end(&srv);
    let p1 = shared.processed.load(Ordering::Relaxed);

    // Worker 0 stops acking; once it holds its max_unacked, it is closed.
    shared.hold.store(true, Ordering::Relaxed);
    let full = tokio::time::timeout(Duration::from_secs(20), shared.full.notified()).await;
    let mut handles = handles.into_iter();
    let first = handles.next();
    let redelivery_ms = match (full, first) {
        (Ok(()), Some(h0)) => {
            // The worker returns and its socket is dropped (closed without a goodbye); the
            // clock starts when it dropped it.
            let cancelled = Instant::now();
            drop0.cancel();
            let _ = h0.await;
            let dropped = shared
                .closed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .unwrap_or(cancelled);
            let held: Vec<u64> = shared
                .held
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let deadline = dropped + Duration::from_secs(30);
            loop {
                let again = shared
                    .again
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                if held.iter().all(|s| again.contains_key(s)) {
                    let times: Vec<f64> = held
                        .iter()
                        .filter_map(|s| again.get(s))
                        .map(|t| t.saturating_duration_since(dropped).as_secs_f64() * 1000.0)
                        .collect();
                    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
                    let max = times.iter().copied().fold(0.0, f64::max);
                    break Some((min, max));
                }
                if Instant::now() > deadline {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        _ => None,
    };
    push_stop.cancel();
    for d in drivers {
        let _ = d.await;
    }
    let sent: Vec<u64> = pushers
        .iter()
        .map(|p| p.sent.load(Ordering::Relaxed))
        .collect();
    // Let the others catch up with what was sent (held events count once another worker
    // acked them), then stop.
    let want: u64 = sent.iter().sum();
    let end = Instant::now() + Duration::from_secs(30);
    while shared.processed.load(Ordering::Relaxed) < want && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    for h in handles {
        let _ = h.await;
    }
    srv.stop();
    let (seen, dup) = counts(&shared);
    Ok(DurableRun {
        rate: p1.saturating_sub(p0) as f64 / cpu.secs,
        lost: want.saturating_sub(seen),
        dup,
        cpu,
        redelivery_ms,
        closed: false,
    })
}

/// Distinct events handled, and duplicates beyond the redeliveries the drop caused.
fn counts(shared: &Shared) -> (u64, u64) {
    let marks = shared.marks.lock().unwrap_or_else(|p| p.into_inner());
    let mut set = std::collections::HashSet::with_capacity(marks.len());
    let mut dup = 0u64;
    for m in marks.iter() {
        if !set.insert(*m) {
            dup += 1;
        }
    }
    let expected_dups = shared.redelivered.load(Ordering::Relaxed);
    (set.len() as u64, dup.saturating_sub(expected_dups))
}

/// Plain subscription vs a durable on 4 connections, and the redelivery after a drop.
pub(crate) async fn scenario_durable(o: &Opts, rows: &mut Vec<Row>) -> Res<()> {
    if !o.systems.contains(&System::Wsbridge) {
        return Ok(());
    }
    let dur = o.secs(10, 3);
    let plain = plain_run(dur).await?;
    eprintln!("  plain subscription: {:.0} ev/s", plain.rate);
    let durable = durable_run(dur).await?;
    eprintln!(
        "  durable, {WORKERS} connections: {:.0} ev/s lost {} dup {} redelivery {:?} ms",
        durable.rate, durable.lost, durable.dup, durable.redelivery_ms
    );
    let name = format!(
        "durable: 3 upstreams full speed, {WORKERS} connections acking per batch of ≤{ACK_BATCH}, vs 1 plain subscription, {}s",
        dur.as_secs()
    );
    rows.push(Row {
        scenario: name.clone(),
        system: System::Wsbridge,
        result: format!(
            "plain {:.0}k ev/s{}",
            plain.rate / 1000.0,
            closed_note(u64::from(plain.closed))
        ),
        latency: "–".into(),
        lost: plain.lost.to_string(),
        dup: plain.dup.to_string(),
        cpu: cpu_cell(&plain.cpu),
        goal: String::new(),
        met: String::new(),
    });
    let ratio = durable.rate / plain.rate.max(1.0);
    rows.push(Row {
        scenario: name,
        system: System::Wsbridge,
        result: format!(
            "durable {:.0}k ev/s processed ({ratio:.2}× plain)",
            durable.rate / 1000.0
        ),
        latency: match durable.redelivery_ms {
            Some((first, last)) => {
                format!(
                    "redelivery after a drop: first {first:.1} ms, all {MAX_UNACKED} {last:.1} ms"
                )
            }
            None => "redelivery: not measured (timed out)".into(),
        },
        lost: durable.lost.to_string(),
        dup: durable.dup.to_string(),
        cpu: cpu_cell(&durable.cpu),
        goal: "≥0.5× plain".into(),
        met: yes(ratio >= 0.5 && durable.lost == 0),
    });
    Ok(())
}
