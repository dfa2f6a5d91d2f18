//! `wsbridge tail`: follows a running bridge's events over `/v1/ws` (README, "Consumers") with
//! a consumer token, one readable line per event or the envelope as a JSON line, so that an
//! operator can watch what flows without writing a client.
//!
//! The session is the documented one: read `ready`, send one `subscribe` (the filter and
//! `from` given on the command line), read `subscribed`, then print every `event`. An `error`
//! frame about the subscription (a bad pattern, an unrecoverable position) and any close by
//! the bridge (slow consumer 4001, shutdown 1001, ...) end the command with a message naming
//! the code; an `unreadable_event` is reported on stderr and the tail goes on, as the
//! subscription does. Ctrl-C closes the session normally (1000) and exits 0. The bridge does
//! not ping consumers, so the tail sends `{"op":"ping"}` every `--keepalive`: a connection
//! that went dead without a close (a lost network, a proxy dropping it) ends the tail with an
//! error instead of leaving it silent forever.

use std::future::Future;
use std::io::Write;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;
use tokio_util::either::Either;
use wsbridge_adapters::Secret;

use super::{print_line, CliError, Target};

/// How long connecting, the TLS handshake and the upgrade may take together, and how long the
/// bridge may take to answer `ready` and `subscribed`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest frame accepted from the bridge: the largest event any bridge may be configured
/// to journal (`limits.max_event_bytes` at its ceiling) plus room for the frame's own members,
/// so every event fits, while a broken peer cannot make the CLI buffer without bound.
pub const MAX_FRAME_BYTES: usize = crate::config::MAX_EVENT_BYTES + (64 << 10);

/// The longest `--keepalive` taken (an hour): beyond it a dead connection would go unnoticed
/// for longer than anyone watches a terminal.
pub const MAX_KEEPALIVE: Duration = Duration::from_secs(3600);

/// The subscription's id in the session (one per session, so any fixed id will do).
const SUBSCRIPTION: &str = "tail";

/// Where the subscription starts, as `/v1/ws` takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    /// The oldest event the journal still holds.
    Earliest,
    /// Only events from now on.
    Latest,
    /// From this seq (inclusive).
    Seq(u64),
}

impl FromStr for Position {
    type Err = String;

    fn from_str(s: &str) -> Result<Position, String> {
        match s {
            "earliest" => Ok(Position::Earliest),
            "latest" => Ok(Position::Latest),
            n => n
                .parse::<u64>()
                .map(Position::Seq)
                .map_err(|_| format!("{n:?}: expected earliest, latest or a seq (a number)")),
        }
    }
}

impl Position {
    fn to_json(self) -> Value {
        match self {
            Position::Earliest => json!("earliest"),
            Position::Latest => json!("latest"),
            Position::Seq(n) => json!(n),
        }
    }
}

/// `wsbridge tail`'s command line.
#[derive(clap::Args, Debug)]
pub struct TailArgs {
    /// The bridge's base URL (http, https, ws or wss).
    #[arg(long, env = "WSBRIDGE_URL", default_value = super::DEFAULT_URL)]
    pub url: String,
    /// A consumer token (`[[consumers]] token`); sent as a bearer header, never printed.
    #[arg(long, env = "WSBRIDGE_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Only these providers (repeatable, or comma-separated).
    #[arg(long = "provider", value_delimiter = ',')]
    pub providers: Vec<String>,
    /// Only these event types, patterns as on /v1/ws (`voipbin.call.*`; repeatable, or
    /// comma-separated).
    #[arg(long = "type", value_delimiter = ',')]
    pub types: Vec<String>,
    /// Only these subjects, patterns as on /v1/ws (repeatable, or comma-separated).
    #[arg(long = "subject", value_delimiter = ',')]
    pub subjects: Vec<String>,
    /// Where to start: earliest, latest or a seq.
    #[arg(long, default_value = "latest")]
    pub from: Position,
    /// Print each event's envelope as one JSON line instead of a readable line.
    #[arg(long)]
    pub json: bool,
    /// Exit after this many events.
    #[arg(long)]
    pub count: Option<u64>,
    /// Send `{"op":"ping"}` this often; when nothing arrives from the bridge for twice as
    /// long, the connection is taken as dead and the tail exits 1 ("0s": never; at most 1h).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub keepalive: Duration,
}

/// How a tail ended without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Ctrl-C (the session was closed normally).
    Interrupted,
    /// `--count` events were printed.
    Count,
    /// The reader of stdout went away (a closed pipe).
    OutputClosed,
}

/// Runs `wsbridge tail` until `stop` resolves (Ctrl-C), `--count` events were printed, or the
/// bridge ends the session (an error). Events go to `out`; notes (connected, unreadable
/// events) to stderr.
pub async fn run(
    args: TailArgs,
    stop: impl Future<Output = ()>,
    out: &mut impl Write,
) -> Result<Ended, CliError> {
    if args.keepalive > MAX_KEEPALIVE {
        return Err(CliError::Usage(format!(
            "--keepalive is at most {}",
            humantime::format_duration(MAX_KEEPALIVE)
        )));
    }
    let target = Target::new(&args.url, Secret::new(args.token.clone()))?;
    let url = target.endpoint(&["v1", "ws"], true)?;
    let mut ws = tokio::time::timeout(CONNECT_TIMEOUT, connect(&target, &url))
        .await
        .map_err(|_| CliError::Connect {
            url: url.to_string(),
            reason: format!("no upgrade within {CONNECT_TIMEOUT:?}"),
        })??;
    let ready = tokio::time::timeout(CONNECT_TIMEOUT, next_frame(&mut ws))
        .await
        .map_err(|_| CliError::Protocol(format!("no ready frame within {CONNECT_TIMEOUT:?}")))??;
    if ready["op"] != "ready" {
        return Err(CliError::Protocol(format!(
            "expected the ready frame first, got {ready}"
        )));
    }
    let subscribe = subscribe_frame(&args);
    ws.send(Message::text(subscribe.to_string()))
        .await
        .map_err(|e| CliError::Closed(e.to_string()))?;
    eprintln!(
        "tailing {url} (consumer {}, journal head {}); Ctrl-C stops",
        ready["consumer"].as_str().unwrap_or("?"),
        ready["head"]
    );
    tokio::pin!(stop);
    let mut printed: u64 = 0;
    if args.count == Some(0) {
        close(&mut ws).await;
        return Ok(Ended::Count);
    }
    let keepalive = (!args.keepalive.is_zero()).then_some(args.keepalive);
    let mut pings = tokio::time::interval_at(
        tokio::time::Instant::now() + keepalive.unwrap_or(MAX_KEEPALIVE),
        keepalive.unwrap_or(MAX_KEEPALIVE),
    );
    pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = tokio::time::Instant::now();
    loop {
        let frame = tokio::select! {
            () = &mut stop => {
                close(&mut ws).await;
                return Ok(Ended::Interrupted);
            }
            _ = pings.tick(), if keepalive.is_some() => {
                let silence = last_heard.elapsed();
                let limit = args.keepalive.saturating_mul(2);
                if silence >= limit {
                    close(&mut ws).await;
                    return Err(CliError::Closed(format!(
                        "no answer from the bridge for {} (a ping every --keepalive {})",
                        humantime::format_duration(limit),
                        humantime::format_duration(args.keepalive)
                    )));
                }
                ws.send(Message::text(r#"{"op":"ping"}"#))
                    .await
                    .map_err(|e| CliError::Closed(e.to_string()))?;
                continue;
            }
            frame = next_frame(&mut ws) => frame?,
        };
        last_heard = tokio::time::Instant::now();
        match frame["op"].as_str() {
            Some("event") => {
                let line = if args.json {
                    frame["event"].to_string()
                } else {
                    readable(&frame)
                };
                if !print_line(out, &line)? {
                    close(&mut ws).await;
                    return Ok(Ended::OutputClosed);
                }
                printed = printed.saturating_add(1);
                if args.count.is_some_and(|n| printed >= n) {
                    close(&mut ws).await;
                    return Ok(Ended::Count);
                }
            }
            Some("error") if frame["code"] == "unreadable_event" => {
                eprintln!(
                    "warning: the journal entry at seq {} is not an envelope (damaged storage); skipped by the bridge: {}",
                    frame["seq"],
                    frame["message"].as_str().unwrap_or("")
                );
            }
            Some("error") => {
                close(&mut ws).await;
                return Err(CliError::Protocol(format!(
                    "the bridge refused the subscription: {}: {}",
                    frame["code"].as_str().unwrap_or("?"),
                    frame["message"].as_str().unwrap_or("")
                )));
            }
            // `subscribed`, `pong` and ops added later carry nothing to print.
            _ => {}
        }
    }
}

/// The `subscribe` frame for `args`: only the filter lists that were given.
fn subscribe_frame(args: &TailArgs) -> Value {
    let mut filter = serde_json::Map::new();
    for (key, list) in [
        ("providers", &args.providers),
        ("types", &args.types),
        ("subjects", &args.subjects),
    ] {
        if !list.is_empty() {
            filter.insert(key.to_string(), json!(list));
        }
    }
    let mut frame = json!({"op": "subscribe", "id": SUBSCRIPTION, "from": args.from.to_json()});
    if !filter.is_empty() {
        frame["filter"] = Value::Object(filter);
    }
    frame
}

/// One readable line: `#seq  time  type  subject  id`, columns padded so that lines of
/// typical events align.
fn readable(frame: &Value) -> String {
    let event = &frame["event"];
    let text = |v: &Value| v.as_str().unwrap_or("-").to_string();
    let seq = format!("#{}", frame["seq"].as_u64().unwrap_or(0));
    format!(
        "{seq:<7} {}  {:<32} {:<36} {}",
        text(&event["time"]),
        text(&event["type"]),
        text(&event["subject"]),
        text(&event["id"])
    )
}

type Stream = Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;
type Ws = WebSocketStream<Stream>;

/// Opens the `/v1/ws` session (TCP, TLS for `wss://`, the upgrade with the bearer header).
async fn connect(target: &Target, url: &url::Url) -> Result<Ws, CliError> {
    let failed = |reason: String| CliError::Connect {
        url: url.to_string(),
        reason,
    };
    let host = url
        .host_str()
        .ok_or_else(|| failed("no host".to_string()))?
        .to_string();
    let port = url
        .port_or_known_default()
        .ok_or_else(|| failed("no port".to_string()))?;
    let tcp = TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| failed(e.to_string()))?;
    let stream: Stream = if url.scheme() == "wss" {
        let config = super::tls_config(&[b"http/1.1"])?;
        let name = ServerName::try_from(host.trim_matches(['[', ']']).to_string())
            .map_err(|e| failed(format!("{host:?} is not a TLS server name: {e}")))?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        Either::Right(
            connector
                .connect(name, tcp)
                .await
                .map_err(|e| failed(format!("TLS: {e}")))?,
        )
    } else {
        Either::Left(tcp)
    };
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| failed(e.to_string()))?;
    let mut bearer = http::HeaderValue::from_str(&target.bearer())
        .map_err(|_| CliError::Usage("the token is not a valid header value".to_string()))?;
    bearer.set_sensitive(true);
    request
        .headers_mut()
        .insert(http::header::AUTHORIZATION, bearer);
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(MAX_FRAME_BYTES);
    config.max_frame_size = Some(MAX_FRAME_BYTES);
    match tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let body = response
                .body()
                .as_deref()
                .map(|b| String::from_utf8_lossy(b).trim().to_string())
                .unwrap_or_default();
            let message = match status {
                401 => "the bridge refused the consumer token (set --token or WSBRIDGE_TOKEN to a [[consumers]] token)".to_string(),
                429 => "this consumer token has too many connections open (limits.max_connections_per_token)".to_string(),
                _ if body.is_empty() => "upgrade refused".to_string(),
                _ => body,
            };
            Err(CliError::Http {
                what: format!("GET {url}"),
                status,
                message,
            })
        }
        Err(e) => Err(failed(e.to_string())),
    }
}

/// The next text frame as JSON; a close, an end or a frame that is not JSON is an error.
async fn next_frame(ws: &mut Ws) -> Result<Value, CliError> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                return serde_json::from_str(text.as_str()).map_err(|e| {
                    CliError::Protocol(format!("the bridge sent a frame that is not JSON: {e}"))
                })
            }
            Some(Ok(Message::Close(frame))) => return Err(CliError::Closed(describe(frame))),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(CliError::Closed(e.to_string())),
            None => return Err(CliError::Closed("without a close frame".to_string())),
        }
    }
}

/// A close frame as a person reads it, with what to do for the codes the protocol defines.
fn describe(frame: Option<CloseFrame>) -> String {
    let Some(frame) = frame else {
        return "without a close code".to_string();
    };
    let code = u16::from(frame.code);
    let hint = match code {
        4001 => " (slow consumer: resume with --from <last seq + 1>)",
        1001 => " (the bridge is shutting down)",
        1008 => " (this consumer's configuration changed)",
        1011 => " (the bridge could not read its journal)",
        _ => "",
    };
    format!("code {code} {:?}{hint}", frame.reason.as_str())
}

/// Closes the session normally, not waiting long for the bridge's answer.
async fn close(ws: &mut Ws) {
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(Some(frame))).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: TailArgs,
    }

    #[test]
    fn positions_parse() {
        assert_eq!("earliest".parse(), Ok(Position::Earliest));
        assert_eq!("latest".parse(), Ok(Position::Latest));
        assert_eq!("42".parse(), Ok(Position::Seq(42)));
        assert!("-1".parse::<Position>().is_err());
        assert!("soon".parse::<Position>().is_err());
    }

    #[test]
    fn the_subscribe_frame_carries_only_the_filters_given() {
        let w = Wrapper::parse_from([
            "x",
            "--token",
            "t",
            "--type",
            "voipbin.call.*,hashi.*",
            "--provider",
            "voipbin",
            "--from",
            "7",
        ]);
        assert_eq!(
            subscribe_frame(&w.args),
            json!({"op": "subscribe", "id": "tail", "from": 7,
                   "filter": {"providers": ["voipbin"], "types": ["voipbin.call.*", "hashi.*"]}})
        );
        let w = Wrapper::parse_from(["x", "--token", "t"]);
        assert_eq!(
            subscribe_frame(&w.args),
            json!({"op": "subscribe", "id": "tail", "from": "latest"})
        );
    }

    #[test]
    fn readable_lines_have_seq_time_type_subject_and_id() {
        let frame = json!({"op": "event", "subscription": "tail", "seq": 42, "event": {
            "id": "ev-1", "type": "voipbin.call.status", "time": "2024-01-15T10:30:00Z",
            "subject": "customer_id:abc123:call:c1", "data": {}}});
        assert_eq!(
            readable(&frame),
            "#42     2024-01-15T10:30:00Z  voipbin.call.status              customer_id:abc123:call:c1           ev-1"
        );
        let no_subject = json!({"seq": 7, "event": {"id": "e", "type": "t", "time": "x"}});
        assert_eq!(
            readable(&no_subject),
            format!("#7      x  t{} -{} e", " ".repeat(31), " ".repeat(35))
        );
    }

    #[test]
    fn close_codes_say_what_to_do() {
        let slow = describe(Some(CloseFrame {
            code: CloseCode::from(4001),
            reason: "slow consumer".into(),
        }));
        assert!(slow.contains("4001") && slow.contains("--from"), "{slow}");
        assert_eq!(describe(None), "without a close code");
    }
}
