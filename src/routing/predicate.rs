//! `where` predicates: conditions on the envelope's `data`, addressed by JSON pointer.
//!
//! Config form ([`Predicate`]): `{ path = "/status", eq = "answered" }`, `{ path, in = [..] }`,
//! `{ path, exists = true | false }` or `{ path, prefix = "str" }`, exactly one operator each.
//! `path` is an RFC 6901 JSON pointer into `data` (empty = `data` itself), with the same
//! meaning as [`serde_json::Value::pointer`]; what `data` holds per provider is part of the
//! envelope contract (README, "How each dialect maps").
//!
//! Semantics:
//! - `eq` / `in`: the value at `path` equals the operand (one of the operands); numbers
//!   compare by value (`100` equals `100.0`), everything else structurally with no type
//!   coercion (`"200"` is not `200`); an absent path never matches;
//! - `exists = true`: `path` resolves (to anything, `null` included); `false`: it does not;
//! - `prefix`: the value at `path` is a string starting with the operand; absent paths and
//!   non-strings never match.
//!
//! [`Predicate::compile`] checks the operator count and the pointer syntax once and splits
//! the pointer into unescaped tokens, so evaluation walks `data` without allocating.

use std::fmt::Write as _;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// One `where` condition as written in config. Validate with [`Predicate::compile`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Predicate {
    /// JSON pointer into the envelope's `data`: empty, or starting with `/`.
    pub path: String,
    /// Operator: the value equals this.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub eq: Option<Value>,
    /// Operator: the value equals one of these.
    #[serde(default, rename = "in", skip_serializing_if = "Option::is_none")]
    pub one_of: Option<Vec<Value>>,
    /// Operator: the path resolves (`true`) or does not (`false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exists: Option<bool>,
    /// Operator: the value is a string starting with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

/// Makes `eq = null` (possible from JSON, not TOML) an operand rather than "no operator".
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// A validated predicate, ready to evaluate.
#[derive(Clone, Debug)]
pub struct CompiledPredicate {
    path: Box<str>,
    tokens: Box<[Token]>,
    op: Op,
}

/// One pointer reference token, unescaped, with its array index parsed up front.
#[derive(Clone, Debug)]
struct Token {
    key: Box<str>,
    index: Option<usize>,
}

#[derive(Clone, Debug)]
enum Op {
    Eq(Value),
    In(Box<[Value]>),
    Exists(bool),
    Prefix(Box<str>),
}

impl Predicate {
    /// Validates the predicate: exactly one operator, a well-formed pointer, a non-empty
    /// `in` list. The error is a sentence naming the problem.
    pub fn compile(&self) -> Result<CompiledPredicate, String> {
        let tokens = parse_pointer(&self.path)?;
        let mut ops = Vec::with_capacity(1);
        if let Some(v) = &self.eq {
            ops.push(("eq", Op::Eq(v.clone())));
        }
        if let Some(vs) = &self.one_of {
            ops.push(("in", Op::In(vs.clone().into())));
        }
        if let Some(b) = self.exists {
            ops.push(("exists", Op::Exists(b)));
        }
        if let Some(p) = &self.prefix {
            ops.push(("prefix", Op::Prefix(p.as_str().into())));
        }
        if ops.len() != 1 {
            let names: Vec<&str> = ops.iter().map(|(n, _)| *n).collect();
            return Err(if names.is_empty() {
                "no operator: give exactly one of eq, in, exists, prefix".to_string()
            } else {
                format!(
                    "{} operators ({}): give exactly one of eq, in, exists, prefix",
                    names.len(),
                    names.join(", ")
                )
            });
        }
        let Some((_, op)) = ops.pop() else {
            return Err("no operator".to_string());
        };
        if let Op::In(vs) = &op {
            if vs.is_empty() {
                return Err("`in` is empty, so the predicate could never hold".to_string());
            }
        }
        Ok(CompiledPredicate {
            path: self.path.as_str().into(),
            tokens,
            op,
        })
    }
}

/// Splits an RFC 6901 pointer into unescaped tokens, refusing malformed ones.
fn parse_pointer(path: &str) -> Result<Box<[Token]>, String> {
    if path.is_empty() {
        return Ok(Box::new([]));
    }
    let Some(body) = path.strip_prefix('/') else {
        return Err(format!(
            "path {path:?} is not a JSON pointer: it must be empty or start with \"/\" (e.g. \"/status\")"
        ));
    };
    let mut tokens = Vec::new();
    for raw in body.split('/') {
        let mut key = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c == '~' {
                match chars.next() {
                    Some('0') => key.push('~'),
                    Some('1') => key.push('/'),
                    _ => {
                        return Err(format!(
                            "path {path:?}: \"~\" must be followed by 0 or 1 (\"~0\" is \"~\", \"~1\" is \"/\")"
                        ))
                    }
                }
            } else {
                key.push(c);
            }
        }
        let index = array_index(&key);
        tokens.push(Token {
            key: key.into(),
            index,
        });
    }
    Ok(tokens.into())
}

/// RFC 6901 array index: `0` or digits without a leading zero.
fn array_index(s: &str) -> Option<usize> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

impl CompiledPredicate {
    /// The pointer as written.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The value `path` points at in `data`, if any.
    pub fn resolve<'a>(&self, data: &'a Value) -> Option<&'a Value> {
        self.tokens.iter().try_fold(data, |v, t| match v {
            Value::Object(map) => map.get(&*t.key),
            Value::Array(list) => t.index.and_then(|i| list.get(i)),
            _ => None,
        })
    }

    /// Whether the predicate holds for `data`. Never allocates.
    pub fn matches(&self, data: &Value) -> bool {
        let found = self.resolve(data);
        match (&self.op, found) {
            (Op::Exists(want), found) => found.is_some() == *want,
            (_, None) => false,
            (Op::Eq(want), Some(v)) => json_eq(v, want),
            (Op::In(wants), Some(v)) => wants.iter().any(|w| json_eq(v, w)),
            (Op::Prefix(p), Some(v)) => v.as_str().is_some_and(|s| s.starts_with(&**p)),
        }
    }

    /// Whether the predicate holds, and a sentence saying why, e.g.
    /// `/status is "ringing", not in ["answered","hangup"]`.
    pub fn explain(&self, data: &Value) -> (bool, String) {
        let held = self.matches(data);
        let path = if self.path.is_empty() {
            "data"
        } else {
            &self.path
        };
        let found = self.resolve(data);
        let mut s = String::new();
        match found {
            Some(v) => {
                let _ = write!(s, "{path} is {}", short(v));
            }
            None => {
                let _ = write!(s, "{path} is absent");
            }
        }
        let _ = match (&self.op, found) {
            (Op::Exists(true), _) if held => write!(s, ", as required (exists = true)"),
            (Op::Exists(true), _) => write!(s, ", but must exist"),
            (Op::Exists(false), _) if held => write!(s, ", as required (exists = false)"),
            (Op::Exists(false), _) => write!(s, ", but must be absent"),
            (Op::Eq(w), None) => write!(s, ", so not equal to {}", short(w)),
            (Op::Eq(w), Some(_)) if held => write!(s, ", equal to {}", short(w)),
            (Op::Eq(w), Some(_)) => write!(s, ", not equal to {}", short(w)),
            (Op::In(ws), None) => write!(s, ", so not in {}", short_list(ws)),
            (Op::In(ws), Some(_)) if held => write!(s, ", in {}", short_list(ws)),
            (Op::In(ws), Some(_)) => write!(s, ", not in {}", short_list(ws)),
            (Op::Prefix(p), None) => write!(s, ", so has no prefix {p:?}"),
            (Op::Prefix(p), Some(_)) if held => write!(s, ", starts with {p:?}"),
            (Op::Prefix(p), Some(v)) if v.is_string() => write!(s, ", does not start with {p:?}"),
            (Op::Prefix(p), Some(_)) => write!(s, ", not a string, so has no prefix {p:?}"),
        };
        (held, s)
    }
}

/// JSON equality with numbers compared by value (`1` == `1.0`), recursively.
pub(crate) fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let int = |n: &serde_json::Number| {
                n.as_i64()
                    .map(i128::from)
                    .or_else(|| n.as_u64().map(i128::from))
            };
            match (int(x), int(y)) {
                (Some(i), Some(j)) => i == j,
                _ => match (x.as_f64(), y.as_f64()) {
                    (Some(f), Some(g)) => f == g,
                    _ => false,
                },
            }
        }
        (Value::Array(xs), Value::Array(ys)) => {
            xs.len() == ys.len() && xs.iter().zip(ys).all(|(x, y)| json_eq(x, y))
        }
        (Value::Object(xs), Value::Object(ys)) => {
            xs.len() == ys.len()
                && xs
                    .iter()
                    .all(|(k, x)| ys.get(k).is_some_and(|y| json_eq(x, y)))
        }
        _ => a == b,
    }
}

const SHORT_MAX: usize = 80;

/// Compact JSON, cut to a readable length (only used when explaining).
fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() <= SHORT_MAX {
        return s;
    }
    let mut end = SHORT_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn short_list(vs: &[Value]) -> String {
    short(&Value::Array(vs.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pred(v: Value) -> CompiledPredicate {
        serde_json::from_value::<Predicate>(v)
            .unwrap()
            .compile()
            .unwrap()
    }

    fn compile_err(v: Value) -> String {
        serde_json::from_value::<Predicate>(v)
            .unwrap()
            .compile()
            .unwrap_err()
    }

    #[test]
    fn eq_on_strings_numbers_and_objects() {
        let data = json!({
            "status": "answered",
            "amount": 1500.0,
            "count": 3,
            "big": u64::MAX,
            "neg": -2,
            "payload": {"participantCount": 2, "host": {"id": "u1"}},
            "tags": ["a", "b"],
            "none": null,
        });
        let cases = [
            (json!({"path": "/status", "eq": "answered"}), true),
            (json!({"path": "/status", "eq": "hangup"}), false),
            (json!({"path": "/amount", "eq": 1500}), true),
            (json!({"path": "/amount", "eq": 1500.0}), true),
            (json!({"path": "/amount", "eq": 1500.5}), false),
            (json!({"path": "/amount", "eq": "1500"}), false),
            (json!({"path": "/count", "eq": 3}), true),
            (json!({"path": "/count", "eq": 3.0}), true),
            (json!({"path": "/count", "eq": "3"}), false),
            (json!({"path": "/big", "eq": u64::MAX}), true),
            (json!({"path": "/big", "eq": -1}), false),
            (json!({"path": "/neg", "eq": -2}), true),
            (json!({"path": "/payload/participantCount", "eq": 2}), true),
            (json!({"path": "/payload/host", "eq": {"id": "u1"}}), true),
            (
                json!({"path": "/payload", "eq": {"host": {"id": "u1"}, "participantCount": 2.0}}),
                true,
            ),
            (json!({"path": "/payload/host", "eq": {"id": "u2"}}), false),
            (
                json!({"path": "/payload/host", "eq": {"id": "u1", "x": 1}}),
                false,
            ),
            (json!({"path": "/tags", "eq": ["a", "b"]}), true),
            (json!({"path": "/tags", "eq": ["b", "a"]}), false),
            (json!({"path": "/tags/1", "eq": "b"}), true),
            (json!({"path": "/none", "eq": null}), true),
            (json!({"path": "/missing", "eq": null}), false),
            (json!({"path": "/missing", "eq": "x"}), false),
            (json!({"path": "/status/deeper", "eq": "x"}), false),
        ];
        for (p, want) in cases {
            assert_eq!(pred(p.clone()).matches(&data), want, "{p}");
        }
    }

    #[test]
    fn in_exists_prefix() {
        let data = json!({"status": "ringing", "n": 5, "none": null, "list": [10, 20]});
        let cases = [
            (
                json!({"path": "/status", "in": ["answered", "hangup"]}),
                false,
            ),
            (
                json!({"path": "/status", "in": ["ringing", "hangup"]}),
                true,
            ),
            (json!({"path": "/n", "in": [1, 5.0]}), true),
            (json!({"path": "/missing", "in": ["x"]}), false),
            (json!({"path": "/status", "exists": true}), true),
            (json!({"path": "/status", "exists": false}), false),
            (json!({"path": "/missing", "exists": true}), false),
            (json!({"path": "/missing", "exists": false}), true),
            (json!({"path": "/none", "exists": true}), true),
            (json!({"path": "/list/1", "exists": true}), true),
            (json!({"path": "/list/2", "exists": true}), false),
            (json!({"path": "/list/01", "exists": true}), false),
            (json!({"path": "", "exists": true}), true),
            (json!({"path": "/status", "prefix": "ring"}), true),
            (json!({"path": "/status", "prefix": ""}), true),
            (json!({"path": "/status", "prefix": "answer"}), false),
            (json!({"path": "/n", "prefix": "5"}), false),
            (json!({"path": "/none", "prefix": ""}), false),
            (json!({"path": "/list", "prefix": ""}), false),
            (json!({"path": "/missing", "prefix": ""}), false),
        ];
        for (p, want) in cases {
            assert_eq!(pred(p.clone()).matches(&data), want, "{p}");
        }
    }

    #[test]
    fn pointer_agrees_with_serde_json() {
        let data = json!({
            "a/b": 1, "m~n": 2, "": 3, "list": [{"x": 1}], "0": "zero", " ": 7,
            "nested": {"a": {"b": [1, [2, 3]]}}
        });
        for path in [
            "",
            "/a~1b",
            "/m~0n",
            "/",
            "/list/0/x",
            "/list/1",
            "/list/-",
            "/0",
            "/ ",
            "/nested/a/b/1/0",
            "/nested/a/b/01",
            "/nested/x",
            "/list/0/x/y",
        ] {
            let p = pred(json!({"path": path, "exists": true}));
            assert_eq!(p.resolve(&data), data.pointer(path), "{path}");
        }
    }

    #[test]
    fn compile_errors() {
        assert!(
            compile_err(json!({"path": "status", "eq": 1})).contains("must be empty or start with")
        );
        assert!(compile_err(json!({"path": "/a~2", "eq": 1})).contains("~"));
        assert!(compile_err(json!({"path": "/a~", "eq": 1})).contains("~"));
        assert!(compile_err(json!({"path": "/a"})).contains("no operator"));
        let two = compile_err(json!({"path": "/a", "eq": 1, "prefix": "x"}));
        assert!(two.contains("2 operators (eq, prefix)"), "{two}");
        assert!(compile_err(json!({"path": "/a", "in": []})).contains("empty"));
        // `eq = null` is an operator, not a missing one.
        let p = serde_json::from_value::<Predicate>(json!({"path": "/a", "eq": null})).unwrap();
        assert_eq!(p.eq, Some(Value::Null));
        // Unknown keys are refused by serde.
        assert!(serde_json::from_value::<Predicate>(json!({"path": "/a", "ne": 1})).is_err());
    }

    #[test]
    fn explanations() {
        let data = json!({"status": "ringing", "n": 5});
        let cases = [
            (
                json!({"path": "/status", "in": ["answered", "hangup"]}),
                false,
                r#"/status is "ringing", not in ["answered","hangup"]"#,
            ),
            (
                json!({"path": "/status", "in": ["ringing"]}),
                true,
                r#"/status is "ringing", in ["ringing"]"#,
            ),
            (
                json!({"path": "/status", "eq": "ringing"}),
                true,
                r#"/status is "ringing", equal to "ringing""#,
            ),
            (
                json!({"path": "/x", "eq": 1}),
                false,
                "/x is absent, so not equal to 1",
            ),
            (
                json!({"path": "/x", "exists": true}),
                false,
                "/x is absent, but must exist",
            ),
            (
                json!({"path": "/n", "exists": false}),
                false,
                "/n is 5, but must be absent",
            ),
            (
                json!({"path": "/n", "prefix": "5"}),
                false,
                r#"/n is 5, not a string, so has no prefix "5""#,
            ),
            (
                json!({"path": "/status", "prefix": "ans"}),
                false,
                r#"/status is "ringing", does not start with "ans""#,
            ),
        ];
        for (p, held, text) in cases {
            assert_eq!(pred(p).explain(&data), (held, text.to_string()));
        }
        let long = json!({"s": "x".repeat(500)});
        let (_, text) = pred(json!({"path": "/s", "exists": true})).explain(&long);
        assert!(text.len() < 150 && text.contains('…'), "{text}");
    }
}
