//! A `/v1/ws` client for tests: connect with a consumer token, read JSON frames.

use futures_util::StreamExt;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wsbridge::bridge::Bridge;

/// A client connection to `/v1/ws`.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Connects to the bridge's `/v1/ws` with `Authorization: Bearer <token>`.
pub async fn connect(bridge: &Bridge, token: &str) -> Ws {
    let mut req = format!("ws://{}/v1/ws", bridge.local_addr())
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    let (ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("connect");
    ws
}

/// The next text frame as JSON (skipping protocol frames), within the deadline.
pub async fn recv(ws: &mut Ws) -> Value {
    loop {
        match tokio::time::timeout(super::DEADLINE, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                return serde_json::from_str(t.as_str()).expect("JSON frame")
            }
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}
