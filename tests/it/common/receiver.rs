//! A real HTTP webhook receiver for tests: answers from a script, records every request.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::watch;
use tokio::time::Instant;

/// One scripted answer.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<&'static str>,
    pub delay: Duration,
}

impl Answer {
    pub fn status(status: u16) -> Self {
        Answer {
            status,
            retry_after: None,
            delay: Duration::ZERO,
        }
    }
}

/// One request as received.
#[derive(Clone, Debug)]
pub struct Received {
    pub at: Instant,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub answered: u16,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

struct Inner {
    script: Mutex<VecDeque<Answer>>,
    default: Answer,
    log: Mutex<Vec<Received>>,
    changed: watch::Sender<usize>,
}

/// The receiver: `url()` to configure, `wait_for(n)` to wait for requests.
#[derive(Clone)]
pub struct Receiver {
    inner: Arc<Inner>,
    pub addr: SocketAddr,
    stop: Arc<tokio_util::sync::CancellationToken>,
}

impl Receiver {
    /// Starts on an ephemeral port (or `addr`), answering from `script`, then `default`.
    pub async fn start_on(addr: SocketAddr, script: Vec<Answer>, default: Answer) -> Receiver {
        let (changed, _) = watch::channel(0);
        let inner = Arc::new(Inner {
            script: Mutex::new(script.into()),
            default,
            log: Mutex::new(Vec::new()),
            changed,
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("receiver binds");
        let addr = listener.local_addr().expect("receiver address");
        let stop = Arc::new(tokio_util::sync::CancellationToken::new());
        let token = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { token.cancelled().await })
                .await;
        });
        Receiver { inner, addr, stop }
    }

    pub async fn start(script: Vec<Answer>, default: Answer) -> Receiver {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), script, default).await
    }

    pub fn url(&self) -> String {
        format!("http://{}/hooks", self.addr)
    }

    pub fn requests(&self) -> Vec<Received> {
        self.inner.log.lock().expect("log").clone()
    }

    /// Waits until at least `n` requests have been answered.
    pub async fn wait_for(&self, n: usize, limit: Duration) -> Vec<Received> {
        let mut rx = self.inner.changed.subscribe();
        let got = tokio::time::timeout(limit, rx.wait_for(|c| *c >= n)).await;
        if got.is_err() {
            panic!(
                "receiver got {} of {n} requests within {limit:?}",
                self.requests().len()
            );
        }
        self.requests()
    }

    /// Waits until `pred` holds for the requests so far.
    pub async fn wait_until(
        &self,
        limit: Duration,
        what: &str,
        pred: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let mut rx = self.inner.changed.subscribe();
        let deadline = Instant::now() + limit;
        loop {
            let now = self.requests();
            if pred(&now) {
                return now;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                panic!(
                    "receiver: {what} not seen within {limit:?}; {} requests",
                    now.len()
                );
            }
        }
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

async fn handle(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    let answer = inner
        .script
        .lock()
        .expect("script")
        .pop_front()
        .unwrap_or_else(|| inner.default.clone());
    if !answer.delay.is_zero() {
        tokio::time::sleep(answer.delay).await;
    }
    {
        let mut log = inner.log.lock().expect("log");
        log.push(Received {
            at: Instant::now(),
            headers,
            body,
            answered: answer.status,
        });
        inner.changed.send_replace(log.len());
    }
    let status = StatusCode::from_u16(answer.status).expect("valid status");
    match answer.retry_after {
        Some(v) => (status, [("retry-after", v)]).into_response(),
        None => status.into_response(),
    }
}
