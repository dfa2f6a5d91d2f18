//! The raw baseline server: this binary re-executed as `raw-server <port> <upstream urls..>`
//! (dials the same upstreams, forwards every frame unchanged to every consumer).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::frames::ws_config;
use crate::Res;

pub(crate) async fn raw_server(port: u16, upstreams: Vec<String>) -> Res<()> {
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
