//! Segment patterns for event types, subjects and provider names; see [`Pattern`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

/// Why a pattern string is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// The pattern is the empty string.
    #[error("empty pattern (use \"*\" to match everything)")]
    Empty,
    /// The pattern starts or ends with whitespace.
    #[error("pattern {0:?} has leading or trailing whitespace")]
    Whitespace(String),
    /// `**` appears somewhere other than at the very end.
    #[error("pattern {pattern:?} has \"**\" at byte {at}; \"**\" is only allowed at the end")]
    InnerDoubleStar {
        /// The offending pattern.
        pattern: String,
        /// Byte offset of the misplaced `**`.
        at: usize,
    },
}

/// A compiled pattern for event types, subjects and provider names.
///
/// The syntax is shared by `[[routes]]`, WebSocket/SSE consumer filters and `[[consumers]]
/// allow` (README, "Consumers: the unified WebSocket endpoint"):
///
/// - a string is made of *segments* separated by any of `.`, `:` and `/`; separators in a
///   pattern are literal (`a.b` does not match `a:b`);
/// - `*` inside a segment matches zero or more characters but never a separator; it may be
///   combined with literal text (`call*`, `*_update`, `a*b*c`);
/// - a trailing `**`, or a trailing `*` that is a whole last segment (`voipbin.call.*`,
///   `customer_id:abc123:*`, or a lone `*`), matches the rest of the string, separators
///   included, and that rest may be empty (`contract/*` matches `contract/`);
///   `foo**` is `foo` followed by anything, `a*b**` is a segment matching `a*b` followed by
///   anything;
/// - a pattern without `*` is an exact match;
/// - `**` anywhere but at the very end, an empty pattern and leading or trailing whitespace
///   (which could never match a provider's names and is always a typo) are errors.
///
/// A pattern is parsed once; [`Pattern::matches`] never allocates.
#[derive(Clone)]
pub struct Pattern {
    source: Box<str>,
    kind: Kind,
}

#[derive(Clone, Debug)]
enum Kind {
    /// No wildcard at all.
    Exact,
    /// A lone `*` or `**`.
    Any,
    /// Literal prefix followed by the rest wildcard.
    Prefix(Box<str>),
    /// General case: segments with `*`, with or without a trailing rest wildcard.
    Glob {
        segments: Box<[Segment]>,
        rest: bool,
    },
}

/// One pattern segment and the separator that follows it (none for the last one).
#[derive(Clone, Debug)]
struct Segment {
    glob: Box<str>,
    sep: Option<u8>,
}

fn is_sep(b: u8) -> bool {
    matches!(b, b'.' | b':' | b'/')
}

impl Pattern {
    /// Parses and compiles `pattern`.
    pub fn parse(pattern: &str) -> Result<Pattern, PatternError> {
        if pattern.is_empty() {
            return Err(PatternError::Empty);
        }
        if pattern.trim() != pattern {
            return Err(PatternError::Whitespace(pattern.to_string()));
        }
        if let Some(at) = pattern.find("**") {
            if at + 2 != pattern.len() {
                return Err(PatternError::InnerDoubleStar {
                    pattern: pattern.to_string(),
                    at,
                });
            }
        }

        // Strip the rest wildcard, if any: a trailing `**`, or a trailing `*` that is a whole
        // last segment. `body` is what must match before it.
        let bytes = pattern.as_bytes();
        let (body, rest) = if let Some(body) = pattern.strip_suffix("**") {
            (body, true)
        } else if bytes[bytes.len() - 1] == b'*'
            && (bytes.len() == 1 || is_sep(bytes[bytes.len() - 2]))
        {
            (&pattern[..pattern.len() - 1], true)
        } else {
            (pattern, false)
        };

        let kind = if !body.contains('*') {
            match (rest, body.is_empty()) {
                (false, _) => Kind::Exact,
                (true, true) => Kind::Any,
                (true, false) => Kind::Prefix(body.into()),
            }
        } else {
            let mut segments = Vec::new();
            let mut start = 0;
            for (i, b) in body.bytes().enumerate() {
                if is_sep(b) {
                    segments.push(Segment {
                        glob: body[start..i].into(),
                        sep: Some(b),
                    });
                    start = i + 1;
                }
            }
            segments.push(Segment {
                glob: body[start..].into(),
                sep: None,
            });
            Kind::Glob {
                segments: segments.into(),
                rest,
            }
        };
        Ok(Pattern {
            source: pattern.into(),
            kind,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// True if the pattern has no wildcard (it matches only the identical string).
    pub fn is_exact(&self) -> bool {
        matches!(self.kind, Kind::Exact)
    }

    /// True if the pattern matches every string (`*` or `**`).
    pub fn matches_everything(&self) -> bool {
        matches!(self.kind, Kind::Any)
    }

    /// Whether `s` matches. Never allocates.
    pub fn matches(&self, s: &str) -> bool {
        match &self.kind {
            Kind::Exact => s == &*self.source,
            Kind::Any => true,
            Kind::Prefix(p) => s.starts_with(&**p),
            Kind::Glob { segments, rest } => match_segments(segments, *rest, s.as_bytes()),
        }
    }
}

/// Matches `s` segment by segment: each pattern segment against the string segment in the same
/// position, separators literally; the last pattern segment only needs to match a prefix of
/// its string segment when the pattern ends in the rest wildcard.
fn match_segments(segments: &[Segment], rest: bool, s: &[u8]) -> bool {
    let mut pos = 0;
    for seg in segments {
        let end = s[pos..]
            .iter()
            .position(|&b| is_sep(b))
            .map_or(s.len(), |i| pos + i);
        let text = &s[pos..end];
        match seg.sep {
            Some(sep) => {
                if end == s.len() || s[end] != sep || !glob(seg.glob.as_bytes(), text, false) {
                    return false;
                }
                pos = end + 1;
            }
            None => {
                return if rest {
                    glob(seg.glob.as_bytes(), text, true)
                } else {
                    end == s.len() && glob(seg.glob.as_bytes(), text, false)
                };
            }
        }
    }
    // Unreachable in practice: the last segment always has `sep: None`.
    false
}

/// Glob match of one separator-free segment, `*` matching any run of bytes. With `open_end`
/// the pattern only has to match a prefix of `s`.
fn glob(p: &[u8], s: &[u8], open_end: bool) -> bool {
    let (mut pi, mut si) = (0, 0);
    // Position of the last `*` seen in `p`, and where in `s` its match currently ends.
    let mut star: Option<(usize, usize)> = None;
    loop {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
            continue;
        }
        if pi == p.len() {
            if si == s.len() || open_end {
                return true;
            }
        } else if si < s.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
            continue;
        }
        // Mismatch: let the last star swallow one more byte, if there is one.
        match star {
            Some((sp, ss)) if ss < s.len() => {
                star = Some((sp, ss + 1));
                pi = sp + 1;
                si = ss + 1;
            }
            _ => return false,
        }
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Pattern").field(&self.source).finish()
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Two patterns are equal when they were written identically.
impl PartialEq for Pattern {
    fn eq(&self, other: &Pattern) -> bool {
        self.source == other.source
    }
}

impl Eq for Pattern {}

impl FromStr for Pattern {
    type Err = PatternError;

    fn from_str(s: &str) -> Result<Pattern, PatternError> {
        Pattern::parse(s)
    }
}

/// Deserialises from a string, refusing invalid patterns with the [`PatternError`] message.
impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Pattern, D::Error> {
        let s = String::deserialize(d)?;
        Pattern::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(pattern: &str, cases: &[(&str, bool)]) {
        let p = Pattern::parse(pattern).unwrap();
        for (s, want) in cases {
            assert_eq!(p.matches(s), *want, "pattern {pattern:?} against {s:?}");
        }
    }

    #[test]
    fn design_examples() {
        check(
            "voipbin.call.*",
            &[
                ("voipbin.call.status", true),
                ("voipbin.call.created", true),
                ("voipbin.call.status.extra", true),
                ("voipbin.call.", true),
                ("voipbin.call", false),
                ("voipbin.calls.status", false),
                ("voipbin.message.created", false),
                ("voipbin.call_created", false),
                ("voipbin:call:status", false),
            ],
        );
        check(
            "customer_id:abc123:*",
            &[
                ("customer_id:abc123:call:xyz789", true),
                ("customer_id:abc123:message:m1", true),
                ("customer_id:abc123", false),
                ("customer_id:abc1234:call:xyz789", false),
                ("customer_id:other:call:xyz789", false),
            ],
        );
        check(
            "contract/*",
            &[
                ("contract/C-1", true),
                ("contract/C-1/sub", true),
                ("contract", false),
                ("lobby/ABC123", false),
            ],
        );
        check(
            "hashi.lobby.*",
            &[
                ("hashi.lobby.joined", true),
                ("hashi.lobby.left", true),
                ("hashi.contract.initialized", false),
                ("hashi.lobbyist.joined", false),
            ],
        );
    }

    #[test]
    fn exact() {
        let p = Pattern::parse("voipbin.call.status").unwrap();
        assert!(p.is_exact());
        check(
            "voipbin.call.status",
            &[
                ("voipbin.call.status", true),
                ("voipbin.call.statu", false),
                ("voipbin.call.status.x", false),
                ("voipbin.call.statuses", false),
                ("", false),
            ],
        );
        check(
            "voipbin",
            &[("voipbin", true), ("voip", false), ("voipbinx", false)],
        );
    }

    #[test]
    fn everything() {
        for p in ["*", "**"] {
            assert!(Pattern::parse(p).unwrap().matches_everything());
            check(
                p,
                &[
                    ("", true),
                    ("voipbin", true),
                    ("a.b:c/d", true),
                    ("customer_id:abc123:call:xyz789", true),
                ],
            );
        }
    }

    #[test]
    fn star_within_a_segment() {
        check(
            "voipbin.call*",
            &[
                ("voipbin.call", true),
                ("voipbin.calls", true),
                ("voipbin.call_created", true),
                ("voipbin.call.status", false),
                ("voipbin.cal", false),
            ],
        );
        check(
            "voicepact.*_update",
            &[
                ("voicepact.contract_update", true),
                ("voicepact.payment_update", true),
                ("voicepact._update", true),
                ("voicepact.contract_updated", false),
                ("voicepact.a.b_update", false),
                ("hashi.contract_update", false),
            ],
        );
        check(
            "*.call.status",
            &[
                ("voipbin.call.status", true),
                (".call.status", true),
                ("a.b.call.status", false),
            ],
        );
        check(
            "hashi.*.joined",
            &[
                ("hashi.lobby.joined", true),
                ("hashi..joined", true),
                ("hashi.lobby.x.joined", false),
                ("hashi.lobby.joined.x", false),
            ],
        );
        check(
            "a*b*c",
            &[
                ("abc", true),
                ("aXbYc", true),
                ("abbbc", true),
                ("abcbc", true),
                ("acb", false),
                ("aXb.c", false),
                ("a.bc", false),
            ],
        );
        check(
            "customer_id:*:call:*",
            &[
                ("customer_id:abc123:call:xyz789", true),
                ("customer_id:abc123:call:xyz789:more", true),
                ("customer_id:abc123:message:m1", false),
                ("customer_id:a:b:call:x", false),
            ],
        );
        // Separators in the pattern are literal.
        check("a.*", &[("a.b", true), ("a:b", false), ("a/b", false)]);
    }

    #[test]
    fn double_star_at_the_end() {
        check(
            "voipbin.**",
            &[
                ("voipbin.call.status", true),
                ("voipbin.", true),
                ("voipbin", false),
                ("voicepact.x", false),
            ],
        );
        check(
            "voipbin.call**",
            &[
                ("voipbin.call", true),
                ("voipbin.calls", true),
                ("voipbin.call.status", true),
                ("voipbin.cal", false),
            ],
        );
        check(
            "voipbin.c*l**",
            &[
                ("voipbin.call", true),
                ("voipbin.cl.x", true),
                ("voipbin.callback.x.y", true),
                ("voipbin.cx.l", false),
                ("voipbin.c", false),
            ],
        );
        check(
            "*.call.*",
            &[
                ("voipbin.call.status", true),
                ("voipbin.call.a.b", true),
                ("x.y.call.status", false),
            ],
        );
    }

    #[test]
    fn trailing_star_only_spans_when_it_is_a_whole_segment() {
        // `call*` is a within-segment wildcard even at the end.
        assert!(!Pattern::parse("voipbin.call*")
            .unwrap()
            .matches("voipbin.call.status"));
        // `*` as the whole last segment spans separators.
        assert!(Pattern::parse("voipbin.*")
            .unwrap()
            .matches("voipbin.call.status"));
        assert!(Pattern::parse("lobby/*").unwrap().matches("lobby/ABC123"));
        assert!(Pattern::parse("a:*").unwrap().matches("a:b/c.d"));
    }

    #[test]
    fn errors() {
        assert_eq!(Pattern::parse(""), Err(PatternError::Empty));
        assert!(matches!(
            Pattern::parse("a.**.b"),
            Err(PatternError::InnerDoubleStar { at: 2, .. })
        ));
        assert!(matches!(
            Pattern::parse("**.b"),
            Err(PatternError::InnerDoubleStar { at: 0, .. })
        ));
        assert!(matches!(
            Pattern::parse("a***"),
            Err(PatternError::InnerDoubleStar { .. })
        ));
        assert!(matches!(
            Pattern::parse(" voipbin"),
            Err(PatternError::Whitespace(_))
        ));
        assert!(matches!(
            Pattern::parse("voipbin.*\n"),
            Err(PatternError::Whitespace(_))
        ));
        let msg = Pattern::parse("a.**.b").unwrap_err().to_string();
        assert!(msg.contains("only allowed at the end"), "{msg}");
    }

    #[test]
    fn unicode_and_odd_inputs() {
        check("lobby/*é", &[("lobby/café", true), ("lobby/cafe", false)]);
        check("ü*", &[("über", true), ("u", false)]);
        check("a..b", &[("a..b", true), ("a.b", false)]);
        check("a.*.b", &[("a..b", true)]);
    }

    /// The spec, written as naively as possible: backtracking over characters.
    fn reference(p: &[u8], pi: usize, s: &[u8]) -> bool {
        if pi == p.len() {
            return s.is_empty();
        }
        if p[pi] == b'*' {
            let rest = &p[pi..] == b"**" || (pi + 1 == p.len() && (pi == 0 || is_sep(p[pi - 1])));
            if rest {
                return true;
            }
            let run = s.iter().position(|&b| is_sep(b)).unwrap_or(s.len());
            return (0..=run).any(|k| reference(p, pi + 1, &s[k..]));
        }
        !s.is_empty() && s[0] == p[pi] && reference(p, pi + 1, &s[1..])
    }

    fn all_strings(alphabet: &[u8], max: usize) -> Vec<String> {
        let mut out = vec![String::new()];
        let mut last = vec![String::new()];
        for _ in 0..max {
            last = last
                .iter()
                .flat_map(|s| alphabet.iter().map(move |&c| format!("{s}{}", c as char)))
                .collect();
            out.extend(last.iter().cloned());
        }
        out
    }

    #[test]
    fn agrees_with_a_naive_reference_exhaustively() {
        let subjects = all_strings(b"ab.:", 5);
        let mut checked = 0;
        for pat in all_strings(b"a.:*", 5) {
            let Ok(p) = Pattern::parse(&pat) else {
                continue;
            };
            for s in &subjects {
                assert_eq!(
                    p.matches(s),
                    reference(pat.as_bytes(), 0, s.as_bytes()),
                    "pattern {pat:?} against {s:?}"
                );
                checked += 1;
            }
        }
        assert!(checked > 100_000, "{checked}");
    }

    #[test]
    fn display_and_deserialize() {
        let p: Pattern = serde_json::from_str("\"voipbin.call.*\"").unwrap();
        assert_eq!(p.to_string(), "voipbin.call.*");
        assert_eq!(p, "voipbin.call.*".parse().unwrap());
        let err = serde_json::from_str::<Pattern>("\"a.**.b\"").unwrap_err();
        assert!(err.to_string().contains("only allowed at the end"));
    }
}
