//! The webhook receiver (keep-alive HTTP/1.1, axum): counts signed deliveries and their
//! latency.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;

use crate::frames::{now_us, parse_event, Mark};
use crate::Res;

#[derive(Default)]
pub(crate) struct Hooks {
    pub(crate) deliveries: AtomicU64,
    pub(crate) unsigned: AtomicU64,
    pub(crate) inner: Mutex<HookSeen>,
    pub(crate) record: AtomicBool,
}

#[derive(Default)]
pub(crate) struct HookSeen {
    pub(crate) seen: [Vec<bool>; 3],
    pub(crate) dups: u64,
    pub(crate) lat_us: Vec<u32>,
}

impl Hooks {
    pub(crate) fn distinct(&self, u: usize) -> u64 {
        self.inner
            .lock()
            .map(|i| i.seen[u].iter().filter(|b| **b).count() as u64)
            .unwrap_or(0)
    }
}

pub(crate) async fn start_receiver(hooks: Arc<Hooks>) -> Res<SocketAddr> {
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
                    if let Some(Mark { u, n, ts }) =
                        std::str::from_utf8(&body).ok().and_then(parse_event)
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
