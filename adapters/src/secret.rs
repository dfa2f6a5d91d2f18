//! A string that must never reach a log line, a status answer or an error message.

use std::fmt;

/// A credential (upstream token, webhook secret, consumer token). `Debug` and `Display` print
/// `***`, so a stray `?settings` in a log macro cannot leak it; [`Secret::expose`] is the one
/// greppable place where the value is read.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps a credential.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The credential itself, for the wire only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` (a bearer token a client sent) is this credential. The time it
    /// takes does not depend on where the two first differ, so a client cannot find a token
    /// byte by byte by timing answers (only the length shows).
    pub fn matches(&self, presented: &str) -> bool {
        let (a, b) = (presented.as_bytes(), self.0.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn never_printed() {
        let s = super::Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "*** Secret(***)");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn matches_only_the_same_token() {
        let s = super::Secret::new("abc");
        assert!(s.matches("abc"));
        assert!(!s.matches("abd"));
        assert!(!s.matches("ab"));
        assert!(!s.matches("abcd"));
        assert!(!s.matches(""));
    }
}
