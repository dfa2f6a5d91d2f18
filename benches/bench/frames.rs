//! Time, the upstream frame and its parsing: what every scenario sends and measures.

use std::sync::OnceLock;
use std::time::Instant;

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

// ---------------------------------------------------------------------------------------------
// time, frames, parsing

pub(crate) static START: OnceLock<Instant> = OnceLock::new();

pub(crate) fn now_us() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// Upstream frame size (the provider's frame, before any envelope).
pub(crate) const FRAME_BYTES: usize = 300;
/// The consumer token configured in the generated bridge config.
pub(crate) const CONSUMER_TOKEN: &str = "bench-consumer-token";
pub(crate) const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A VoIPBIN `event_type` frame of [`FRAME_BYTES`] bytes carrying u, n and the send time.
pub(crate) fn frame(u: usize, n: u64, ts: u64) -> String {
    let mut s = format!(
        r#"{{"event_type":"call.status","timestamp":"2026-11-23T10:00:00Z","topic":"customer_id:abc123:call:c{u}x{n}","data":{{"id":"c{u}x{n}","status":"answered","u":{u},"n":{n},"ts":{ts},"pad":""#
    );
    let pad = FRAME_BYTES.saturating_sub(s.len() + 3);
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}}");
    s
}

fn num_at(s: &str, key: &str, from: usize) -> Option<(u64, usize)> {
    let i = s[from..].find(key)? + from + key.len();
    let digits = s[i..].bytes().take_while(u8::is_ascii_digit).count();
    Some((s[i..i + digits].parse().ok()?, i + digits))
}

/// What an event frame carries for measuring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Mark {
    /// The upstream.
    pub(crate) u: usize,
    /// Its sequence number on that upstream.
    pub(crate) n: u64,
    /// Its send time (µs since this process started).
    pub(crate) ts: u64,
}

/// The [`Mark`] of an event frame, whatever wraps it; None for control frames.
pub(crate) fn parse_event(s: &str) -> Option<Mark> {
    let (u, i) = num_at(s, "\"u\":", 0)?;
    let (n, i) = num_at(s, "\"n\":", i)?;
    let (ts, _) = num_at(s, "\"ts\":", i)?;
    Some(Mark {
        u: u as usize,
        n,
        ts,
    })
}

pub(crate) fn ws_config() -> WebSocketConfig {
    // Small buffers: 10,000 load-tool connections must not cost 128 KiB each.
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(16 * 1024)
}
