//! A Kraken Spot WebSocket API v2 test server, written from Kraken's public documentation
//! (facts only, each with its page), not from `examples/dialects/kraken.toml`:
//!
//! - https://docs.kraken.com/api/docs/websocket-v2/status: "a status will be automatically
//!   generated on successful websocket connection": `{"channel":"status","type":"update",
//!   "data":[{"api_version":"v2","connection_id":..,"system":"online","version":..}]}`.
//! - https://docs.kraken.com/api/docs/websocket-v2/ping: `{"method":"ping","req_id":..}` is
//!   answered by `{"method":"pong","req_id":..,"time_in":..,"time_out":..}` (`req_id` echoed
//!   when given).
//! - https://docs.kraken.com/api/docs/websocket-v2/heartbeat: `{"channel":"heartbeat"}`
//!   "approximately once every second in the absence of any other channel updates", generated
//!   once a channel is subscribed (here the period is the test's choice, and a heartbeat goes
//!   out on every tick, other traffic or not).
//! - https://docs.kraken.com/api/docs/websocket-v2/trade, .../ticker, .../book: `{"method":
//!   "subscribe","params":{"channel":..,"symbol":[..],"snapshot":..,"depth":..}}`; "a separate
//!   acknowledgement response for each symbol in the subscription list": `{"method":
//!   "subscribe","result":{"channel":..,"symbol":..,"snapshot":..},"success":true,
//!   "time_in":..,"time_out":..}` (`depth` in a book ack), or `success: false` with `error`.
//!   Channel frames: `{"channel":"trade"|"ticker"|"book","type":"snapshot"|"update",
//!   "data":[..]}`; the trade snapshot "reflects the most recent 50 trades"; a book snapshot
//!   item is `{"symbol":..,"bids":[{"price":..,"qty":..}..],"asks":[..]}` (the page's example,
//!   abridged here to two levels a side).
//!
//! Which symbols exist is the test's choice (the doc lists none); an unknown one or an
//! unknown channel gets a `success: false` acknowledgement.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

/// What a test asks one connection to do.
enum Out {
    /// Send this frame.
    Frame(String),
    /// Close the connection (as a server restart would).
    Close,
}

/// One open connection, as the server sees it.
struct Conn {
    /// (channel, symbol) pairs acknowledged on it.
    subs: BTreeSet<(String, String)>,
    tx: mpsc::Sender<Out>,
    open: bool,
}

#[derive(Default)]
struct State {
    conns: Vec<Conn>,
    /// Trades sent per symbol, newest last (for the snapshot of a new subscription).
    trades: Vec<Value>,
    /// Every request frame received, in order (over all connections).
    requests: Vec<Value>,
    pings: u64,
    heartbeats: u64,
    refused: u64,
}

/// The running server: its URL, and what tests use to drive and observe it.
pub struct KrakenSim {
    url: String,
    state: Arc<Mutex<State>>,
    changed: watch::Sender<u64>,
}

/// The RFC 3339 text of now, in the doc's microsecond form (`2023-09-24T14:10:23.799685Z`).
fn now_text() -> String {
    chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

impl KrakenSim {
    /// Starts on an ephemeral port; `symbols` exist, heartbeats go out every `heartbeat`.
    pub async fn start(symbols: &[&str], heartbeat: Duration) -> KrakenSim {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("ws://{}/v2", listener.local_addr().expect("addr"));
        let state: Arc<Mutex<State>> = Arc::default();
        let (changed, _) = watch::channel(0u64);
        let sim = KrakenSim {
            url,
            state: state.clone(),
            changed: changed.clone(),
        };
        let symbols: Arc<BTreeSet<String>> =
            Arc::new(symbols.iter().map(|s| s.to_string()).collect());
        let ids = Arc::new(AtomicU64::new(13834774380200032777));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else {
                    continue;
                };
                let (tx, rx) = mpsc::channel(256);
                let n = {
                    let mut s = state.lock().expect("lock");
                    s.conns.push(Conn {
                        subs: BTreeSet::new(),
                        tx,
                        open: true,
                    });
                    s.conns.len() - 1
                };
                changed.send_modify(|v| *v += 1);
                let connection_id = ids.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(serve(
                    ws,
                    rx,
                    n,
                    connection_id,
                    state.clone(),
                    changed.clone(),
                    symbols.clone(),
                    heartbeat,
                ));
            }
        });
        sim
    }

    /// The URL to configure (`ws://127.0.0.1:<port>/v2`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.lock().expect("lock").conns.len()
    }

    /// Pings answered, heartbeats sent and subscriptions refused so far.
    pub fn counts(&self) -> (u64, u64, u64) {
        let s = self.state.lock().expect("lock");
        (s.pings, s.heartbeats, s.refused)
    }

    /// Every request frame received so far.
    pub fn requests(&self) -> Vec<Value> {
        self.state.lock().expect("lock").requests.clone()
    }

    /// Waits until connection `n` has acknowledged `subs` (channel, symbol) subscriptions.
    pub async fn wait_subscribed(&self, n: usize, subs: usize, limit: Duration) {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let now = {
                let s = self.state.lock().expect("lock");
                s.conns
                    .get(n)
                    .map(|c| (c.open, c.subs.len()))
                    .unwrap_or((false, 0))
            };
            if now.0 && now.1 >= subs {
                return;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                panic!("connection {n} never had {subs} subscriptions (open, subs: {now:?})");
            }
        }
    }

    /// Sends `frame` on every open connection subscribed to `channel` for `symbol`; how many.
    async fn send_to(&self, channel: &str, symbol: &str, frame: Value) -> usize {
        let txs: Vec<mpsc::Sender<Out>> = {
            let s = self.state.lock().expect("lock");
            s.conns
                .iter()
                .filter(|c| c.open && c.subs.contains(&(channel.to_string(), symbol.to_string())))
                .map(|c| c.tx.clone())
                .collect()
        };
        let text = frame.to_string();
        let mut sent = 0;
        for tx in txs {
            if tx.send(Out::Frame(text.clone())).await.is_ok() {
                sent += 1;
            }
        }
        sent
    }

    /// Trades `ids` of `symbol` in one `trade` update frame ("multiple trades may be batched
    /// in a single message"); how many connections it reached.
    pub async fn trades(&self, symbol: &str, ids: &[u64]) -> usize {
        let data: Vec<Value> = ids.iter().map(|&id| trade(symbol, id)).collect();
        self.state
            .lock()
            .expect("lock")
            .trades
            .extend(data.iter().cloned());
        let frame = json!({"channel": "trade", "type": "update", "data": data});
        self.send_to("trade", symbol, frame).await
    }

    /// One `ticker` update of `symbol` with `last` as the last traded price.
    pub async fn ticker(&self, symbol: &str, last: f64) -> usize {
        let frame = json!({"channel": "ticker", "type": "update", "data": [ticker(symbol, last)]});
        self.send_to("ticker", symbol, frame).await
    }

    /// Closes every open connection, as a server restart would.
    pub async fn drop_all(&self) {
        let txs: Vec<mpsc::Sender<Out>> = {
            let s = self.state.lock().expect("lock");
            s.conns
                .iter()
                .filter(|c| c.open)
                .map(|c| c.tx.clone())
                .collect()
        };
        for tx in txs {
            let _ = tx.send(Out::Close).await;
        }
    }
}

/// A trade item as the trade page shows one.
pub fn trade(symbol: &str, id: u64) -> Value {
    json!({
        "symbol": symbol,
        "side": if id.is_multiple_of(2) { "buy" } else { "sell" },
        "price": 0.5147,
        "qty": 100.0 + id as f64,
        "ord_type": "limit",
        "trade_id": id,
        "timestamp": "2023-09-25T07:48:36.925533Z",
    })
}

/// A ticker item as the ticker page shows one.
pub fn ticker(symbol: &str, last: f64) -> Value {
    json!({
        "symbol": symbol, "bid": last - 0.0001, "bid_qty": 740.0, "ask": last + 0.0001,
        "ask_qty": 1361.44813783, "last": last, "volume": 997038.98383185, "vwap": 0.10148,
        "low": 0.09979, "high": 0.10285, "change": -0.00017, "change_pct": -0.17,
        "timestamp": "2023-09-25T09:04:31.742648Z",
    })
}

/// One connection: the status greeting, then pongs, acks (with snapshots) and heartbeats.
#[allow(clippy::too_many_arguments)]
async fn serve(
    mut ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    mut rx: mpsc::Receiver<Out>,
    n: usize,
    connection_id: u64,
    state: Arc<Mutex<State>>,
    changed: watch::Sender<u64>,
    symbols: Arc<BTreeSet<String>>,
    heartbeat: Duration,
) {
    let status = json!({
        "channel": "status",
        "data": [{"api_version": "v2", "connection_id": connection_id, "system": "online", "version": "2.0.0"}],
        "type": "update",
    });
    let mut beat = tokio::time::interval(heartbeat);
    if ws.send(Message::text(status.to_string())).await.is_ok() {
        loop {
            tokio::select! {
                msg = ws.next() => {
                    let text = match msg {
                        Some(Ok(Message::Text(t))) => t.as_str().to_string(),
                        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                        Some(Ok(_)) => continue,
                    };
                    let time_in = now_text();
                    let Ok(req) = serde_json::from_str::<Value>(&text) else { continue };
                    let answers = answer(&req, &time_in, n, &state, &symbols);
                    changed.send_modify(|v| *v += 1);
                    let mut failed = false;
                    for a in answers {
                        if ws.send(Message::text(a)).await.is_err() {
                            failed = true;
                            break;
                        }
                    }
                    if failed { break; }
                }
                out = rx.recv() => match out {
                    Some(Out::Frame(f)) => {
                        if ws.send(Message::text(f)).await.is_err() { break; }
                    }
                    Some(Out::Close) | None => {
                        let _ = ws.close(None).await;
                        break;
                    }
                },
                _ = beat.tick() => {
                    let subscribed = state.lock().expect("lock").conns.get(n).is_some_and(|c| !c.subs.is_empty());
                    if subscribed {
                        if ws.send(Message::text(json!({"channel": "heartbeat"}).to_string())).await.is_err() {
                            break;
                        }
                        state.lock().expect("lock").heartbeats += 1;
                    }
                }
            }
        }
    }
    if let Some(c) = state.lock().expect("lock").conns.get_mut(n) {
        c.open = false;
    }
    changed.send_modify(|v| *v += 1);
}

/// The frames that answer one client request.
fn answer(
    req: &Value,
    time_in: &str,
    n: usize,
    state: &Mutex<State>,
    symbols: &BTreeSet<String>,
) -> Vec<String> {
    state.lock().expect("lock").requests.push(req.clone());
    match req["method"].as_str() {
        Some("ping") => {
            state.lock().expect("lock").pings += 1;
            let mut pong = json!({"method": "pong", "time_in": time_in, "time_out": now_text()});
            if let Some(id) = req.get("req_id") {
                pong["req_id"] = id.clone();
            }
            vec![pong.to_string()]
        }
        Some("subscribe") => {
            let params = &req["params"];
            let channel = params["channel"].as_str().unwrap_or("");
            let snapshot = params["snapshot"].as_bool().unwrap_or(true);
            let wanted: Vec<String> = params["symbol"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            let mut out = Vec::new();
            for symbol in wanted {
                if !["trade", "ticker", "book"].contains(&channel) || !symbols.contains(&symbol) {
                    state.lock().expect("lock").refused += 1;
                    out.push(
                        json!({"method": "subscribe", "success": false,
                            "error": format!("{channel} {symbol}: not available"),
                            "time_in": time_in, "time_out": now_text()})
                        .to_string(),
                    );
                    continue;
                }
                let mut result =
                    json!({"channel": channel, "snapshot": snapshot, "symbol": symbol});
                if channel == "book" {
                    result["depth"] = params.get("depth").cloned().unwrap_or(json!(10));
                }
                out.push(
                    json!({"method": "subscribe", "result": result, "success": true,
                        "time_in": time_in, "time_out": now_text()})
                    .to_string(),
                );
                let recent: Vec<Value> = {
                    let mut s = state.lock().expect("lock");
                    if let Some(c) = s.conns.get_mut(n) {
                        c.subs.insert((channel.to_string(), symbol.clone()));
                    }
                    s.trades
                        .iter()
                        .filter(|t| t["symbol"] == symbol.as_str())
                        .cloned()
                        .collect()
                };
                // The book snapshot (the book page's example, two levels a side).
                if snapshot && channel == "book" {
                    out.push(
                        json!({"channel": "book", "type": "snapshot", "data": [{
                            "symbol": symbol,
                            "bids": [{"price": 0.5666, "qty": 4831.75496356}, {"price": 0.5665, "qty": 6658.22734739}],
                            "asks": [{"price": 0.5668, "qty": 4410.79769741}, {"price": 0.5669, "qty": 4655.40412487}],
                        }]})
                        .to_string(),
                    );
                }
                // The trade snapshot: the most recent 50 trades of the symbol.
                if snapshot && channel == "trade" && !recent.is_empty() {
                    let from = recent.len().saturating_sub(50);
                    out.push(
                        json!({"channel": "trade", "type": "snapshot", "data": recent[from..]})
                            .to_string(),
                    );
                }
            }
            out
        }
        _ => Vec::new(),
    }
}
