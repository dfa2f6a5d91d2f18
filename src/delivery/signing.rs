//! Webhook signatures per the Standard Webhooks spec (an external contract: README,
//! "Signatures (Standard Webhooks)").
//!
//! Why this module exists: receivers must be able to check, with nothing but the off-the-shelf
//! `standardwebhooks` libraries (PyPI, npm, Go, Java, Ruby, PHP, C#), that a POST really comes
//! from this bridge and was not altered or replayed much later. The contract is:
//!
//! - headers `webhook-id` (the envelope id, the same on every retry), `webhook-timestamp`
//!   (unix seconds of this attempt) and `webhook-signature`;
//! - the signature is `v1,` followed by base64(HMAC-SHA256(key, `"<id>.<timestamp>.<body>"`));
//! - secrets are written `whsec_<base64 key>`; the key is the *decoded* bytes;
//! - during secret rotation every configured secret signs, and the header carries the
//!   signatures separated by single spaces, so a receiver that knows any one of them accepts.
//!
//! Invariant: the signature is computed over the exact body bytes that go on the wire. The
//! caller serialises once and passes those bytes both here and to the HTTP client; never
//! re-serialise a `serde_json::Value` after signing (key order, whitespace or number formatting
//! would change and every receiver would reject the delivery).
//!
//! Secrets never leave this module in readable form: [`SigningKey`]'s `Debug` prints
//! `SigningKey(***)`, and [`SecretError`] describes what is wrong without quoting the secret.
//! [`Signer::verify`] exists for tests and our own tooling; it follows the libraries'
//! rules (5-minute tolerance both ways, any `v1` entry may match, constant-time comparison).

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, STANDARD_PAD_INDIFFERENT};
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Prefix of a Standard Webhooks secret: `whsec_<base64 key>`.
pub const SECRET_PREFIX: &str = "whsec_";

/// Header carrying the message id (the envelope id; identical on every retry).
pub const HEADER_ID: &str = "webhook-id";

/// Header carrying the unix time, in seconds, of this delivery attempt.
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";

/// Header carrying one or more space-separated `v1,<base64 signature>` entries.
pub const HEADER_SIGNATURE: &str = "webhook-signature";

/// How far a timestamp may lie in the past or the future and still verify: 5 minutes, the
/// default of the Standard Webhooks libraries.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(5 * 60);

/// Why a webhook secret (or a list of them) was refused.
///
/// Messages never contain the secret or any character of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// The secret, after the optional `whsec_` prefix, is empty, or decodes to no bytes.
    #[error("webhook secret is empty (expected `whsec_` followed by a base64 key)")]
    Empty,
    /// The secret is not base64 (standard alphabet `A-Z a-z 0-9 + /`, optional `=` padding).
    #[error(
        "webhook secret is not valid base64 ({detail}); expected `whsec_` followed by a \
         base64 key (standard alphabet, as the Standard Webhooks libraries expect)"
    )]
    NotBase64 {
        /// What the decoder objected to, without quoting the secret.
        detail: String,
    },
    /// An endpoint was given no secret at all, so nothing could sign.
    #[error("no webhook secret given; at least one is required to sign")]
    NoSecrets,
    /// One entry of a list of secrets is invalid.
    #[error("secrets[{index}]: {reason}")]
    InList {
        /// Position of the bad secret in the list (0-based).
        index: usize,
        /// What is wrong with it.
        reason: Box<SecretError>,
    },
}

/// Why [`Signer::verify`] rejected a message. The variants mirror the libraries' errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// `webhook-id`, `webhook-timestamp` or `webhook-signature` is empty or missing.
    #[error("missing required header {0}")]
    MissingHeader(&'static str),
    /// `webhook-timestamp` is not an integer number of seconds.
    #[error("invalid webhook-timestamp (not unix seconds)")]
    InvalidTimestamp,
    /// The timestamp is older than the tolerance allows (a replay or a very late retry).
    #[error("message timestamp too old ({timestamp}, now {now})")]
    TimestampTooOld {
        /// The message's timestamp.
        timestamp: i64,
        /// The verifier's clock.
        now: i64,
    },
    /// The timestamp is further in the future than the tolerance allows.
    #[error("message timestamp too new ({timestamp}, now {now})")]
    TimestampTooNew {
        /// The message's timestamp.
        timestamp: i64,
        /// The verifier's clock.
        now: i64,
    },
    /// No `v1` entry of the header matches any known key.
    #[error("no matching signature found")]
    NoMatchingSignature,
}

/// One HMAC-SHA256 key, parsed from a `whsec_<base64>` secret.
///
/// The raw key is not kept: only the keyed HMAC state, which is cloned for each message. Its
/// `Debug` output is `SigningKey(***)`.
#[derive(Clone)]
pub struct SigningKey {
    mac: HmacSha256,
}

impl SigningKey {
    /// Parses a secret as the Standard Webhooks libraries do: an optional `whsec_` prefix, then
    /// base64 (standard alphabet; padding optional, like the Python library). Surrounding
    /// whitespace (a trailing newline from a file or an environment variable) is ignored.
    ///
    /// Refuses an empty key and anything that is not base64, e.g. a raw password or a
    /// URL-safe (`-`, `_`) encoding that the receivers' libraries would decode differently.
    pub fn parse(secret: &str) -> Result<Self, SecretError> {
        let secret = secret.trim();
        let encoded = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
        if encoded.is_empty() {
            return Err(SecretError::Empty);
        }
        let key = STANDARD_PAD_INDIFFERENT
            .decode(encoded)
            .map_err(|e| SecretError::NotBase64 {
                detail: describe_decode_error(&e),
            })?;
        Self::from_bytes(&key)
    }

    /// Builds a key from raw bytes (what `whsec_` secrets decode to). Refuses an empty key.
    pub fn from_bytes(key: &[u8]) -> Result<Self, SecretError> {
        if key.is_empty() {
            return Err(SecretError::Empty);
        }
        // HMAC accepts keys of any length; the error branch is unreachable in practice but is
        // reported rather than unwrapped.
        let mac = HmacSha256::new_from_slice(key).map_err(|_| SecretError::Empty)?;
        Ok(Self { mac })
    }

    /// The keyed MAC over `"<id>.<timestamp>.<body>"`, ready to finalize or verify.
    fn mac_for(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
        let mut mac = self.mac.clone();
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// Appends `v1,<base64 signature>` for this key to `out`.
    fn sign_into(&self, msg_id: &str, timestamp: i64, body: &[u8], out: &mut String) {
        let tag = self
            .mac_for(msg_id, timestamp, body)
            .finalize()
            .into_bytes();
        out.push_str("v1,");
        STANDARD.encode_string(tag.as_slice(), out);
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(***)")
    }
}

impl FromStr for SigningKey {
    type Err = SecretError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Signs (and verifies) messages with an endpoint's secrets.
///
/// Built from the endpoint's `secrets` list: the first is the current secret; during rotation
/// every listed secret signs, so the header holds one `v1,<sig>` entry per secret, in list
/// order, and receivers holding either the old or the new secret accept the message.
#[derive(Clone, Debug)]
pub struct Signer {
    keys: Vec<SigningKey>,
}

impl Signer {
    /// A signer over already parsed keys. Refuses an empty list.
    pub fn new(keys: Vec<SigningKey>) -> Result<Self, SecretError> {
        if keys.is_empty() {
            return Err(SecretError::NoSecrets);
        }
        Ok(Self { keys })
    }

    /// Parses an endpoint's `secrets` list (`whsec_<base64>` each). The error names the
    /// position of the first bad secret (never its value); an empty list is refused.
    pub fn from_secrets<I, S>(secrets: I) -> Result<Self, SecretError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let keys = secrets
            .into_iter()
            .enumerate()
            .map(|(index, s)| {
                SigningKey::parse(s.as_ref()).map_err(|reason| SecretError::InList {
                    index,
                    reason: Box::new(reason),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(keys)
    }

    /// How many secrets sign (more than one during a rotation).
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// The full `webhook-signature` header value for one delivery attempt: one
    /// `v1,<base64(HMAC-SHA256(key, "<id>.<timestamp>.<body>"))>` per secret, separated by
    /// single spaces.
    ///
    /// `body` must be the exact bytes sent as the HTTP body; `timestamp` the value sent in
    /// `webhook-timestamp` (unix seconds of this attempt).
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        // "v1," + 44 base64 characters + a separating space, per key.
        let mut out = String::with_capacity(self.keys.len() * 48);
        for (i, key) in self.keys.iter().enumerate() {
            if i > 0 {
                out.push(' ');
            }
            key.sign_into(msg_id, timestamp, body, &mut out);
        }
        out
    }

    /// Verifies a received message as the Standard Webhooks libraries do, against the current
    /// clock and [`DEFAULT_TOLERANCE`]. See [`Signer::verify_at`].
    pub fn verify(
        &self,
        msg_id: &str,
        timestamp: &str,
        signature_header: &str,
        body: &[u8],
    ) -> Result<(), VerifyError> {
        self.verify_at(
            msg_id,
            timestamp,
            signature_header,
            body,
            unix_now(),
            DEFAULT_TOLERANCE,
        )
    }

    /// Verifies a received message given the raw header values, the verifier's clock `now`
    /// (unix seconds) and the allowed clock distance `tolerance`.
    ///
    /// Accepts when the timestamp is within `now ± tolerance` and any `v1,<sig>` entry of the
    /// space-separated `signature_header` equals the signature of any of this signer's keys
    /// (compared in constant time). Entries of other versions and malformed entries are
    /// skipped, as the libraries do.
    pub fn verify_at(
        &self,
        msg_id: &str,
        timestamp: &str,
        signature_header: &str,
        body: &[u8],
        now: i64,
        tolerance: Duration,
    ) -> Result<(), VerifyError> {
        if msg_id.is_empty() {
            return Err(VerifyError::MissingHeader(HEADER_ID));
        }
        let timestamp = timestamp.trim();
        if timestamp.is_empty() {
            return Err(VerifyError::MissingHeader(HEADER_TIMESTAMP));
        }
        if signature_header.trim().is_empty() {
            return Err(VerifyError::MissingHeader(HEADER_SIGNATURE));
        }
        let ts: i64 = timestamp
            .parse()
            .map_err(|_| VerifyError::InvalidTimestamp)?;
        let tolerance = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
        if ts < now.saturating_sub(tolerance) {
            return Err(VerifyError::TimestampTooOld { timestamp: ts, now });
        }
        if ts > now.saturating_add(tolerance) {
            return Err(VerifyError::TimestampTooNew { timestamp: ts, now });
        }

        let candidates: Vec<Vec<u8>> = signature_header
            .split(' ')
            .filter_map(|entry| entry.split_once(','))
            .filter(|(version, _)| *version == "v1")
            .filter_map(|(_, sig)| STANDARD.decode(sig).ok())
            .collect();
        for key in &self.keys {
            let mac = key.mac_for(msg_id, ts, body);
            // `verify_slice` compares in constant time (and rejects wrong lengths).
            if candidates
                .iter()
                .any(|sig| mac.clone().verify_slice(sig).is_ok())
            {
                return Ok(());
            }
        }
        Err(VerifyError::NoMatchingSignature)
    }
}

/// Current unix time in seconds (0 if the clock is before 1970).
fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A description of a base64 error that does not quote the offending (secret) character.
fn describe_decode_error(e: &base64::DecodeError) -> String {
    match e {
        base64::DecodeError::InvalidByte(offset, _) => {
            format!("character at position {offset} is not in the base64 alphabet")
        }
        base64::DecodeError::InvalidLength(_) => "wrong length".to_owned(),
        base64::DecodeError::InvalidLastSymbol { offset, .. } => {
            format!("last symbol at position {offset} has stray bits")
        }
        base64::DecodeError::InvalidPadding => "wrong padding".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector of the Standard Webhooks libraries' own test suites: matching it means
    /// the off-the-shelf verifiers accept what we sign.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const MSG_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TIMESTAMP: i64 = 1614265330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const EXPECTED: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn signer(secrets: &[&str]) -> Signer {
        Signer::from_secrets(secrets).expect("test secrets are valid")
    }

    fn other_secret() -> String {
        format!("{SECRET_PREFIX}{}", STANDARD.encode([7u8; 32]))
    }

    #[test]
    fn signs_the_spec_test_vector_exactly() {
        assert_eq!(signer(&[SECRET]).sign(MSG_ID, TIMESTAMP, BODY), EXPECTED);
    }

    #[test]
    fn verifies_the_spec_test_vector() {
        let s = signer(&[SECRET]);
        s.verify_at(
            MSG_ID,
            &TIMESTAMP.to_string(),
            EXPECTED,
            BODY,
            TIMESTAMP,
            DEFAULT_TOLERANCE,
        )
        .expect("the test vector verifies");
    }

    #[test]
    fn accepts_the_secret_without_prefix_and_with_surrounding_whitespace() {
        let bare = SECRET.strip_prefix(SECRET_PREFIX).expect("prefixed");
        assert_eq!(signer(&[bare]).sign(MSG_ID, TIMESTAMP, BODY), EXPECTED);
        let padded_line = format!("  {SECRET}\n");
        assert_eq!(
            signer(&[padded_line.as_str()]).sign(MSG_ID, TIMESTAMP, BODY),
            EXPECTED
        );
    }

    #[test]
    fn rotation_signs_with_every_secret_and_each_verifies_alone() {
        let other = other_secret();
        let both = signer(&[other.as_str(), SECRET]);
        assert_eq!(both.key_count(), 2);
        let header = both.sign(MSG_ID, TIMESTAMP, BODY);
        let entries: Vec<&str> = header.split(' ').collect();
        assert_eq!(entries.len(), 2, "{header}");
        assert!(entries.iter().all(|e| e.starts_with("v1,")), "{header}");
        // The second entry is the test vector's signature: list order is kept.
        assert_eq!(entries[1], EXPECTED);
        assert_ne!(entries[0], EXPECTED);

        let ts = TIMESTAMP.to_string();
        for only in [other.as_str(), SECRET] {
            signer(&[only])
                .verify_at(MSG_ID, &ts, &header, BODY, TIMESTAMP, DEFAULT_TOLERANCE)
                .unwrap_or_else(|e| panic!("a receiver knowing one secret must accept: {e}"));
        }
        // And each entry alone verifies against its own secret.
        signer(&[other.as_str()])
            .verify_at(MSG_ID, &ts, entries[0], BODY, TIMESTAMP, DEFAULT_TOLERANCE)
            .expect("first entry verifies with the first secret");
        assert_eq!(
            signer(&[other.as_str()]).verify_at(
                MSG_ID,
                &ts,
                entries[1],
                BODY,
                TIMESTAMP,
                DEFAULT_TOLERANCE
            ),
            Err(VerifyError::NoMatchingSignature)
        );
    }

    #[test]
    fn tampered_body_id_or_timestamp_fail() {
        let s = signer(&[SECRET]);
        let ts = TIMESTAMP.to_string();
        let check = |id: &str, ts: &str, body: &[u8]| {
            s.verify_at(id, ts, EXPECTED, body, TIMESTAMP, DEFAULT_TOLERANCE)
        };
        assert_eq!(
            check(MSG_ID, &ts, br#"{"test": 2432232315}"#),
            Err(VerifyError::NoMatchingSignature)
        );
        // Whitespace matters: the exact bytes are signed, not the JSON value.
        assert_eq!(
            check(MSG_ID, &ts, br#"{"test":2432232314}"#),
            Err(VerifyError::NoMatchingSignature)
        );
        assert_eq!(
            check("msg_other", &ts, BODY),
            Err(VerifyError::NoMatchingSignature)
        );
        assert_eq!(
            check(MSG_ID, &(TIMESTAMP + 1).to_string(), BODY),
            Err(VerifyError::NoMatchingSignature)
        );
    }

    #[test]
    fn stale_and_future_timestamps_fail_even_when_correctly_signed() {
        let s = signer(&[SECRET]);
        let ts = TIMESTAMP.to_string();
        let ten_minutes = 600;
        assert_eq!(
            s.verify_at(
                MSG_ID,
                &ts,
                EXPECTED,
                BODY,
                TIMESTAMP + ten_minutes,
                DEFAULT_TOLERANCE
            ),
            Err(VerifyError::TimestampTooOld {
                timestamp: TIMESTAMP,
                now: TIMESTAMP + ten_minutes
            })
        );
        assert_eq!(
            s.verify_at(
                MSG_ID,
                &ts,
                EXPECTED,
                BODY,
                TIMESTAMP - ten_minutes,
                DEFAULT_TOLERANCE
            ),
            Err(VerifyError::TimestampTooNew {
                timestamp: TIMESTAMP,
                now: TIMESTAMP - ten_minutes
            })
        );
        // The window's edges are inclusive, as in the libraries.
        for now in [TIMESTAMP - 300, TIMESTAMP + 300] {
            s.verify_at(MSG_ID, &ts, EXPECTED, BODY, now, DEFAULT_TOLERANCE)
                .expect("within tolerance");
        }
        // Against the real clock, a 2021 timestamp is stale.
        assert!(matches!(
            s.verify(MSG_ID, &ts, EXPECTED, BODY),
            Err(VerifyError::TimestampTooOld { .. })
        ));
    }

    #[test]
    fn verify_against_the_clock_accepts_a_fresh_signature() {
        let s = signer(&[SECRET]);
        let now = unix_now();
        let header = s.sign(MSG_ID, now, BODY);
        s.verify(MSG_ID, &now.to_string(), &header, BODY)
            .expect("fresh signature verifies");
    }

    #[test]
    fn malformed_headers_are_rejected_not_panicked_on() {
        let s = signer(&[SECRET]);
        let ts = TIMESTAMP.to_string();
        let v = |id: &str, ts: &str, sig: &str| {
            s.verify_at(id, ts, sig, BODY, TIMESTAMP, DEFAULT_TOLERANCE)
        };
        assert_eq!(
            v("", &ts, EXPECTED),
            Err(VerifyError::MissingHeader(HEADER_ID))
        );
        assert_eq!(
            v(MSG_ID, "", EXPECTED),
            Err(VerifyError::MissingHeader(HEADER_TIMESTAMP))
        );
        assert_eq!(
            v(MSG_ID, &ts, " "),
            Err(VerifyError::MissingHeader(HEADER_SIGNATURE))
        );
        assert_eq!(
            v(MSG_ID, "yesterday", EXPECTED),
            Err(VerifyError::InvalidTimestamp)
        );
        for junk in [
            "v1",
            "v1,",
            "v1,not base64!",
            "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            "v1,AAAA",
            "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        ] {
            assert_eq!(
                v(MSG_ID, &ts, junk),
                Err(VerifyError::NoMatchingSignature),
                "{junk}"
            );
        }
        // Junk entries beside a good one do not hide it.
        let mixed = format!("v2,xyz garbage {EXPECTED}");
        v(MSG_ID, &ts, &mixed).expect("the v1 entry matches");
    }

    #[test]
    fn bad_secrets_are_refused_with_a_clear_error_that_does_not_quote_them() {
        for bad in [
            "",
            "whsec_",
            "   ",
            "whsec_not base64!",
            "hunter2 hunter2",
            "whsec_a",
        ] {
            let err = SigningKey::parse(bad).expect_err(bad);
            assert!(
                matches!(err, SecretError::Empty | SecretError::NotBase64 { .. }),
                "{bad:?}: {err:?}"
            );
        }
        // URL-safe base64 is not what the libraries decode.
        let err = SigningKey::parse("whsec_ab-_").expect_err("url-safe");
        let msg = err.to_string();
        assert!(msg.contains("not valid base64"), "{msg}");
        assert!(
            msg.contains("whsec_"),
            "the message says what is expected: {msg}"
        );
        assert!(
            !msg.contains("ab-_"),
            "the message must not quote the secret: {msg}"
        );

        assert_eq!(
            Signer::from_secrets(Vec::<String>::new()).expect_err("empty list"),
            SecretError::NoSecrets
        );
        let err = Signer::from_secrets([SECRET, "whsec_%%%%"]).expect_err("second is bad");
        assert!(
            matches!(err, SecretError::InList { index: 1, .. }),
            "{err:?}"
        );
        assert!(err.to_string().starts_with("secrets[1]: "), "{err}");
        assert_eq!(
            "whsec_".parse::<SigningKey>().expect_err("empty"),
            SecretError::Empty
        );
    }

    #[test]
    fn debug_never_prints_the_key() {
        let key = SigningKey::parse(SECRET).expect("valid");
        assert_eq!(format!("{key:?}"), "SigningKey(***)");
        let s = signer(&[SECRET, SECRET]);
        let dbg = format!("{s:?} {s:#?}");
        assert!(!dbg.contains("MfKQ9r8G"), "{dbg}");
        assert!(dbg.contains("SigningKey(***)"), "{dbg}");
    }
}
