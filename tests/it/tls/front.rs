//! A TLS terminator on 127.0.0.1, as operators put in front of a service: it accepts TLS
//! with a test certificate (and, for mutual TLS, requires a client certificate), then relays
//! the plain bytes to a backend, here a provider simulator or a webhook receiver. So the real
//! simulators and receivers are served over `wss://` and `https://` unchanged.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A running terminator; stops when dropped.
pub struct TlsFront {
    pub addr: SocketAddr,
    handshakes: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl TlsFront {
    /// Terminates TLS with `config` on an ephemeral port and relays to `backend`.
    pub async fn start(config: rustls::ServerConfig, backend: SocketAddr) -> TlsFront {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let stop = CancellationToken::new();
        let handshakes = Arc::new(AtomicU64::new(0));
        let (token, done) = (stop.clone(), handshakes.clone());
        tokio::spawn(async move {
            loop {
                let tcp = tokio::select! {
                    _ = token.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((tcp, _)) => tcp,
                        Err(_) => continue,
                    },
                };
                let (acceptor, token, done) = (acceptor.clone(), token.clone(), done.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = relay(acceptor, tcp, backend, done) => {}
                    }
                });
            }
        });
        TlsFront {
            addr,
            handshakes,
            stop,
        }
    }

    /// Handshakes that completed so far.
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::Relaxed)
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn relay(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    backend: SocketAddr,
    handshakes: Arc<AtomicU64>,
) {
    match acceptor.accept(tcp).into_fallible().await {
        Ok(mut tls) => {
            handshakes.fetch_add(1, Ordering::Relaxed);
            let Ok(mut back) = TcpStream::connect(backend).await else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut tls, &mut back).await;
        }
        // The alert has been sent. Read what the client still sends (its request, written
        // before it read the alert) until it closes, so that closing does not reset the
        // connection and destroy the alert before the client reads it.
        Err((_, mut tcp)) => {
            let _ = tcp.shutdown().await;
            let mut sink = [0u8; 4096];
            let drain = async {
                while let Ok(n) = tcp.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
        }
    }
}
