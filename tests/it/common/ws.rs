//! Consumer clients for tests: `/v1/ws` (connect with a consumer token, read JSON frames) and
//! SSE (`/v1/events`, read `id:`/`data:` pairs).

use futures_util::StreamExt;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wsbridge::bridge::Bridge;

/// A client connection to `/v1/ws`.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The upgrade request for the bridge's `/v1/ws` with `Authorization: Bearer <token>`.
pub fn request(bridge: &Bridge, token: &str) -> Request {
    let mut req = format!("ws://{}/v1/ws", bridge.local_addr())
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    req
}

/// Connects to the bridge's `/v1/ws` with `Authorization: Bearer <token>`.
pub async fn connect(bridge: &Bridge, token: &str) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(request(bridge, token))
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

/// Reads SSE `id:`/`data:` pairs from a raw HTTP/1.1 response until `n` events.
pub async fn sse_events(
    bridge: &Bridge,
    token: &str,
    query: &str,
    last_event_id: Option<u64>,
    n: usize,
) -> Vec<(u64, Value)> {
    let mut stream = TcpStream::connect(bridge.local_addr())
        .await
        .expect("connect");
    let mut head = format!("GET /v1/events?{query} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nAccept: text/event-stream\r\n");
    if let Some(id) = last_event_id {
        head.push_str(&format!("Last-Event-ID: {id}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.expect("request");
    let mut lines = BufReader::new(stream).lines();
    let first = tokio::time::timeout(super::DEADLINE, lines.next_line())
        .await
        .expect("status line")
        .expect("read")
        .expect("line");
    assert!(first.contains("200"), "{first}");
    let mut out = Vec::new();
    let mut id = None;
    while out.len() < n {
        let line = tokio::time::timeout(super::DEADLINE, lines.next_line())
            .await
            .expect("an SSE line in time")
            .expect("read")
            .expect("open");
        // Chunked transfer encoding interleaves chunk sizes; SSE fields are recognisable.
        if let Some(v) = line
            .strip_prefix("id: ")
            .or_else(|| line.strip_prefix("id:"))
        {
            id = v.trim().parse::<u64>().ok();
        } else if let Some(v) = line
            .strip_prefix("data: ")
            .or_else(|| line.strip_prefix("data:"))
        {
            let envelope: Value = serde_json::from_str(v).expect("envelope JSON");
            out.push((id.take().expect("id before data"), envelope));
        }
    }
    out
}

/// Connects with `token`, reads `ready`, subscribes `id` from `from` and reads `subscribed`.
pub async fn subscribe_from(bridge: &Bridge, token: &str, id: &str, from: Value) -> Ws {
    use futures_util::SinkExt;
    let mut ws = connect(bridge, token).await;
    assert_eq!(recv(&mut ws).await["op"], "ready");
    ws.send(Message::text(
        serde_json::json!({"op": "subscribe", "id": id, "from": from}).to_string(),
    ))
    .await
    .expect("subscribe sent");
    let ack = recv(&mut ws).await;
    assert_eq!(ack["op"], "subscribed", "{ack}");
    ws
}
