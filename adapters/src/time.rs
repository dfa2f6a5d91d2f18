//! Provider timestamps → UTC instants.
//!
//! The providers disagree: VoicePact pushes unix seconds, in practice as a *string*
//! (`"1717171717"`), documented as a number; VoIPBIN and Hashi send RFC 3339 strings. A
//! timestamp that cannot be read is not an error: the event is still forwarded and the
//! envelope's `time` falls back to the receive time.

use chrono::{DateTime, TimeZone, Utc};
use serde_json::Value;

/// Reads a provider timestamp: unix seconds as a number or a numeric string (fractions kept
/// exactly, to the nanosecond; values above 10^11 are taken as milliseconds, which some
/// servers send), or an RFC 3339 string. `None` when absent or unreadable.
pub fn parse_provider_time(value: Option<&Value>) -> Option<DateTime<Utc>> {
    match value? {
        // serde_json prints a number as its shortest exact decimal, so the digits the provider
        // sent are read back without a detour through binary floating point.
        Value::Number(n) => from_decimal(&n.to_string()),
        Value::String(s) => {
            let s = s.trim();
            from_decimal(s).or_else(|| {
                DateTime::parse_from_rfc3339(s)
                    .ok()
                    .map(|t| t.with_timezone(&Utc))
            })
        }
        _ => None,
    }
}

/// `"1717171717"`, `"1717171717.123"`, `"1717171717123"` (ms) → an instant, exactly.
fn from_decimal(s: &str) -> Option<DateTime<Utc>> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let whole: i64 = int.parse().ok()?;
    // Nanoseconds from up to nine fraction digits (further digits are below resolution).
    let mut nanos: i64 = 0;
    for i in 0..9 {
        let digit = frac.as_bytes().get(i).map_or(0, |b| i64::from(b - b'0'));
        nanos = nanos * 10 + digit;
    }
    let (secs, nanos) = if whole > 100_000_000_000 {
        // Milliseconds: move three digits from the integer part into the fraction.
        (whole / 1000, (whole % 1000) * 1_000_000 + nanos / 1000)
    } else {
        (whole, nanos)
    };
    Utc.timestamp_opt(secs, u32::try_from(nanos).ok()?).single()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rfc(v: Value) -> Option<String> {
        parse_provider_time(Some(&v))
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
    }

    #[test]
    fn accepts_every_shape_the_providers_send() {
        assert_eq!(
            rfc(json!(1717171717)).as_deref(),
            Some("2024-05-31T16:08:37Z")
        );
        assert_eq!(
            rfc(json!("1717171717")).as_deref(),
            Some("2024-05-31T16:08:37Z")
        );
        assert_eq!(
            rfc(json!(1717171717000_i64)).as_deref(),
            Some("2024-05-31T16:08:37Z")
        );
        assert_eq!(
            rfc(json!("2024-01-15T10:30:00.000000Z")).as_deref(),
            Some("2024-01-15T10:30:00Z")
        );
        assert_eq!(
            rfc(json!("2024-01-15T12:30:00.250+02:00")).as_deref(),
            Some("2024-01-15T10:30:00.250Z")
        );
    }

    #[test]
    fn unreadable_is_none() {
        assert_eq!(rfc(json!("yesterday")), None);
        assert_eq!(rfc(json!(null)), None);
        assert_eq!(rfc(json!(-5)), None);
        assert_eq!(rfc(json!("12.3.4")), None);
        assert_eq!(rfc(json!(".5")), None);
        assert_eq!(parse_provider_time(None), None);
    }
}
