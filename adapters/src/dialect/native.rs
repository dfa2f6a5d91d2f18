//! A fast lane for the jq expressions a dialect runs on every frame.
//!
//! Running jaq on a frame costs a conversion of the whole frame into jaq's values and, per
//! expression, jaq's general machinery. Most rule expressions are small: a path (`.data`,
//! `.data.timestamp?`), a comparison with a literal (`.type == "pong"`), `has("k")`, a type
//! test, string interpolation, `select`, `if`. This module evaluates that subset directly on
//! the parsed `serde_json` frame, borrowing instead of copying.
//!
//! It is a lane, not a second interpreter: it answers only on the happy path, and hands
//! everything else back to jaq, which stays the reference. An expression outside the subset
//! is never evaluated here; an error (a missing `data`, an `error(..)`, indexing a string),
//! a number comparison or addition, or anything whose jq result it is not certain of, gives
//! [`Defer`], and the caller runs jaq on the frame instead, so messages and results are
//! jaq's own. A test runs every expression of the shipped dialects both ways on every golden
//! fixture and on unusual frames and compares.

use std::borrow::Cow;
use std::sync::LazyLock;

use jaq_core::load::lex::StrPart;
use jaq_core::load::parse::{BinaryOp, Pattern, Term};
use jaq_core::ops::{Cmp, Math};
use jaq_core::path::{Opt, Part};
use serde_json::Value;

/// "Ask jaq": the fast lane has no certain answer for this input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Defer;

type V<'a> = Cow<'a, Value>;
/// One output, no output (`empty`), or [`Defer`].
type Out<'a> = Result<Option<V<'a>>, Defer>;

/// An expression of the subset, compiled.
#[derive(Debug)]
pub(crate) enum Node {
    Id,
    Lit(Value),
    Path(Box<Node>, Vec<(Node, Opt)>),
    Str(Vec<Piece>),
    /// A global variable, by its position in the variable list.
    Global(usize),
    /// A local variable bound by `as`, by name.
    Local(String),
    Pipe(Box<Node>, Box<Node>),
    Bind(Box<Node>, String, Box<Node>),
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
    Alt(Box<Node>, Box<Node>),
    Eq(Box<Node>, Box<Node>, bool),
    Add(Box<Node>, Box<Node>),
    If(Vec<(Node, Node)>, Option<Box<Node>>),
    Try(Box<Node>),
    Type,
    /// `strings`, `numbers`, ...: the input if it has this type.
    OfType(&'static str),
    Not,
    Empty,
    Select(Box<Node>),
    Has(Box<Node>),
    EndsWith(Box<Node>),
    StartsWith(Box<Node>),
    /// `ltrimstr(s)` (`true`) or `rtrimstr(s)` (`false`).
    Trim(Box<Node>, bool),
    /// `error(..)`: always deferred, so the message is jaq's.
    Error,
}

/// A piece of a string literal or interpolation.
#[derive(Debug)]
pub(crate) enum Piece {
    Text(String),
    Hole(Node),
}

/// The names jq's `type` gives, as values to borrow.
static TYPE_NAMES: LazyLock<[Value; 6]> = LazyLock::new(|| {
    ["null", "boolean", "number", "string", "array", "object"].map(|s| Value::String(s.into()))
});
static TRUE: Value = Value::Bool(true);
static FALSE: Value = Value::Bool(false);
static NULL: Value = Value::Null;

fn type_index(v: &Value) -> usize {
    match v {
        Value::Null => 0,
        Value::Bool(_) => 1,
        Value::Number(_) => 2,
        Value::String(_) => 3,
        Value::Array(_) => 4,
        Value::Object(_) => 5,
    }
}

fn boolean<'a>(b: bool) -> V<'a> {
    Cow::Borrowed(if b { &TRUE } else { &FALSE })
}

fn truthy(v: &Value) -> bool {
    !matches!(v, Value::Null | Value::Bool(false))
}

/// Compiles `code` into the fast lane's subset; `None` when any part of it is outside.
/// `globals` are the variable names (with `$`) the expression is compiled with.
pub(crate) fn compile(code: &str, globals: &[&str]) -> Option<Node> {
    let term = jaq_core::load::parse(code, |p| p.term())?;
    let mut locals = Vec::new();
    node(&term, globals, &mut locals)
}

fn node<'s>(t: &Term<&'s str>, globals: &[&str], locals: &mut Vec<&'s str>) -> Option<Node> {
    let sub = |t: &Term<&'s str>, locals: &mut Vec<&'s str>| node(t, globals, locals).map(Box::new);
    Some(match t {
        Term::Id => Node::Id,
        Term::Num(n) => Node::Lit(Value::from(n.parse::<i64>().ok()?)),
        Term::Str(None, parts) => {
            let mut pieces = Vec::new();
            for p in parts {
                match p {
                    StrPart::Str(s) => pieces.push(Piece::Text((*s).to_string())),
                    StrPart::Char(c) => pieces.push(Piece::Text(c.to_string())),
                    StrPart::Term(t) => pieces.push(Piece::Hole(node(t, globals, locals)?)),
                }
            }
            match pieces.as_slice() {
                [] => Node::Lit(Value::String(String::new())),
                _ if pieces.iter().all(|p| matches!(p, Piece::Text(_))) => {
                    Node::Lit(Value::String(
                        pieces
                            .iter()
                            .map(|p| match p {
                                Piece::Text(t) => t.as_str(),
                                Piece::Hole(_) => "",
                            })
                            .collect(),
                    ))
                }
                _ => Node::Str(pieces),
            }
        }
        Term::Path(head, path) => {
            let head = sub(head, locals)?;
            let mut parts = Vec::new();
            for (part, opt) in &path.0 {
                match part {
                    Part::Index(i) => parts.push((node(i, globals, locals)?, *opt)),
                    Part::Range(..) => return None,
                }
            }
            Node::Path(head, parts)
        }
        Term::Var(name) => match locals.iter().rposition(|l| l == name) {
            Some(_) => Node::Local((*name).to_string()),
            None => Node::Global(globals.iter().position(|g| g == name)?),
        },
        Term::BinOp(l, op, r) => match op {
            BinaryOp::Pipe(None) => Node::Pipe(sub(l, locals)?, sub(r, locals)?),
            BinaryOp::Pipe(Some(Pattern::Var(x))) => {
                let l = sub(l, locals)?;
                locals.push(x);
                let r = sub(r, locals);
                locals.pop();
                Node::Bind(l, (*x).to_string(), r?)
            }
            BinaryOp::And => Node::And(sub(l, locals)?, sub(r, locals)?),
            BinaryOp::Or => Node::Or(sub(l, locals)?, sub(r, locals)?),
            BinaryOp::Alt => Node::Alt(sub(l, locals)?, sub(r, locals)?),
            BinaryOp::Cmp(Cmp::Eq) => Node::Eq(sub(l, locals)?, sub(r, locals)?, false),
            BinaryOp::Cmp(Cmp::Ne) => Node::Eq(sub(l, locals)?, sub(r, locals)?, true),
            BinaryOp::Math(Math::Add) => Node::Add(sub(l, locals)?, sub(r, locals)?),
            _ => return None,
        },
        Term::IfThenElse(branches, otherwise) => {
            let mut out = Vec::new();
            for (c, then) in branches {
                out.push((node(c, globals, locals)?, node(then, globals, locals)?));
            }
            let otherwise = match otherwise {
                Some(e) => Some(sub(e, locals)?),
                None => None,
            };
            Node::If(out, otherwise)
        }
        Term::TryCatch(f, None) => Node::Try(sub(f, locals)?),
        Term::Call(name, args) => match (*name, args.as_slice()) {
            ("true", []) => Node::Lit(Value::Bool(true)),
            ("false", []) => Node::Lit(Value::Bool(false)),
            ("null", []) => Node::Lit(Value::Null),
            ("empty", []) => Node::Empty,
            ("type", []) => Node::Type,
            ("not", []) => Node::Not,
            ("nulls", []) => Node::OfType("null"),
            ("booleans", []) => Node::OfType("boolean"),
            ("numbers", []) => Node::OfType("number"),
            ("strings", []) => Node::OfType("string"),
            ("arrays", []) => Node::OfType("array"),
            ("objects", []) => Node::OfType("object"),
            ("select", [f]) => Node::Select(sub(f, locals)?),
            ("has", [k]) => Node::Has(sub(k, locals)?),
            ("endswith", [s]) => Node::EndsWith(sub(s, locals)?),
            ("startswith", [s]) => Node::StartsWith(sub(s, locals)?),
            ("ltrimstr", [s]) => Node::Trim(sub(s, locals)?, true),
            ("rtrimstr", [s]) => Node::Trim(sub(s, locals)?, false),
            ("error", [_]) => Node::Error,
            _ => return None,
        },
        _ => return None,
    })
}

/// Evaluation state: the global values and the `as` bindings in scope.
pub(crate) struct Scope<'a> {
    globals: &'a [Value],
    locals: Vec<(&'a str, V<'a>)>,
}

impl<'a> Scope<'a> {
    pub(crate) fn new(globals: &'a [Value]) -> Self {
        Scope {
            globals,
            locals: Vec::new(),
        }
    }
}

/// The first output of `n` on `input`, `None` for none, or [`Defer`].
pub(crate) fn eval<'a>(n: &'a Node, input: &V<'a>, scope: &mut Scope<'a>) -> Out<'a> {
    match n {
        Node::Id => Ok(Some(input.clone())),
        Node::Lit(v) => Ok(Some(Cow::Borrowed(v))),
        Node::Global(i) => scope
            .globals
            .get(*i)
            .map(|v| Some(Cow::Borrowed(v)))
            .ok_or(Defer),
        Node::Local(name) => scope
            .locals
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| Some(v.clone()))
            .ok_or(Defer),
        Node::Path(head, parts) => {
            let Some(mut v) = eval(head, input, scope)? else {
                return Ok(None);
            };
            for (index, opt) in parts {
                // Index expressions see the path's own input, as in jq.
                let Some(i) = eval(index, input, scope)? else {
                    return Ok(None);
                };
                // A failed access (which `?` would turn into no output) is jaq's to answer.
                let _ = opt;
                v = index_into(v, &i).ok_or(Defer)?;
            }
            Ok(Some(v))
        }
        Node::Str(pieces) => {
            let mut out = String::new();
            for p in pieces {
                match p {
                    Piece::Text(t) => out.push_str(t),
                    Piece::Hole(h) => match eval(h, input, scope)?.as_deref() {
                        None => return Ok(None),
                        Some(Value::String(s)) => out.push_str(s),
                        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => {
                            out.push_str(&n.to_string())
                        }
                        Some(Value::Bool(b)) => out.push_str(if *b { "true" } else { "false" }),
                        Some(Value::Null) => out.push_str("null"),
                        Some(_) => return Err(Defer),
                    },
                }
            }
            Ok(Some(Cow::Owned(Value::String(out))))
        }
        Node::Pipe(l, r) => match eval(l, input, scope)? {
            None => Ok(None),
            Some(v) => eval(r, &v, scope),
        },
        Node::Bind(l, name, r) => {
            let Some(v) = eval(l, input, scope)? else {
                return Ok(None);
            };
            scope.locals.push((name.as_str(), v));
            let out = eval(r, input, scope);
            scope.locals.pop();
            out
        }
        Node::And(l, r) => match eval(l, input, scope)? {
            None => Ok(None),
            Some(v) if !truthy(&v) => Ok(Some(boolean(false))),
            Some(_) => Ok(eval(r, input, scope)?.map(|v| boolean(truthy(&v)))),
        },
        Node::Or(l, r) => match eval(l, input, scope)? {
            None => Ok(None),
            Some(v) if truthy(&v) => Ok(Some(boolean(true))),
            Some(_) => Ok(eval(r, input, scope)?.map(|v| boolean(truthy(&v)))),
        },
        Node::Alt(l, r) => match eval(l, input, scope)? {
            Some(v) if truthy(&v) => Ok(Some(v)),
            _ => eval(r, input, scope),
        },
        Node::Eq(l, r, negate) => {
            let Some(a) = eval(l, input, scope)? else {
                return Ok(None);
            };
            let Some(b) = eval(r, input, scope)? else {
                return Ok(None);
            };
            Ok(Some(boolean(equal(&a, &b)? != *negate)))
        }
        Node::Add(l, r) => {
            let Some(a) = eval(l, input, scope)? else {
                return Ok(None);
            };
            let Some(b) = eval(r, input, scope)? else {
                return Ok(None);
            };
            match (a.as_ref(), b.as_ref()) {
                (Value::Null, _) => Ok(Some(b)),
                (_, Value::Null) => Ok(Some(a)),
                (Value::String(x), Value::String(y)) => {
                    Ok(Some(Cow::Owned(Value::String(format!("{x}{y}")))))
                }
                _ => Err(Defer),
            }
        }
        Node::If(branches, otherwise) => {
            for (c, then) in branches {
                match eval(c, input, scope)? {
                    None => return Ok(None),
                    Some(v) if truthy(&v) => return eval(then, input, scope),
                    Some(_) => {}
                }
            }
            match otherwise {
                Some(e) => eval(e, input, scope),
                None => Ok(Some(input.clone())),
            }
        }
        Node::Try(f) => eval(f, input, scope),
        Node::Type => Ok(Some(Cow::Borrowed(&TYPE_NAMES[type_index(input)]))),
        Node::OfType(t) => {
            let names = ["null", "boolean", "number", "string", "array", "object"];
            Ok((names[type_index(input)] == *t).then(|| input.clone()))
        }
        Node::Not => Ok(Some(boolean(!truthy(input)))),
        Node::Empty => Ok(None),
        Node::Select(f) => match eval(f, input, scope)? {
            Some(v) if truthy(&v) => Ok(Some(input.clone())),
            _ => Ok(None),
        },
        Node::Has(k) => {
            let Some(k) = eval(k, input, scope)? else {
                return Ok(None);
            };
            match (input.as_ref(), k.as_ref()) {
                (Value::Object(m), Value::String(k)) => Ok(Some(boolean(m.contains_key(k)))),
                _ => Err(Defer),
            }
        }
        Node::EndsWith(s) | Node::StartsWith(s) => {
            let Some(s) = eval(s, input, scope)? else {
                return Ok(None);
            };
            match (input.as_ref(), s.as_ref()) {
                (Value::String(x), Value::String(y)) => {
                    Ok(Some(boolean(if matches!(n, Node::EndsWith(_)) {
                        x.ends_with(y.as_str())
                    } else {
                        x.starts_with(y.as_str())
                    })))
                }
                _ => Err(Defer),
            }
        }
        Node::Trim(s, left) => {
            let Some(s) = eval(s, input, scope)? else {
                return Ok(None);
            };
            match (input.as_ref(), s.as_ref()) {
                (Value::String(x), Value::String(fix)) => {
                    let cut = if *left {
                        x.strip_prefix(fix.as_str())
                    } else {
                        x.strip_suffix(fix.as_str())
                    };
                    Ok(Some(match cut {
                        Some(rest) => Cow::Owned(Value::String(rest.to_string())),
                        None => input.clone(),
                    }))
                }
                _ => Err(Defer),
            }
        }
        Node::Error => Err(Defer),
    }
}

/// `v[i]` for an object member or array element; `None` where jq would fail.
fn index_into<'a>(v: V<'a>, i: &Value) -> Option<V<'a>> {
    let pick = |v: &'a Value| -> Option<&'a Value> {
        match (v, i) {
            (Value::Object(m), Value::String(k)) => Some(m.get(k).unwrap_or(&NULL)),
            (Value::Null, Value::String(_) | Value::Number(_)) => Some(&NULL),
            (Value::Array(a), Value::Number(n)) => {
                let idx = n.as_i64()?;
                let len = i64::try_from(a.len()).ok()?;
                let idx = if idx < 0 { idx.checked_add(len)? } else { idx };
                Some(
                    usize::try_from(idx)
                        .ok()
                        .and_then(|u| a.get(u))
                        .unwrap_or(&NULL),
                )
            }
            _ => None,
        }
    };
    match v {
        Cow::Borrowed(v) => pick(v).map(Cow::Borrowed),
        Cow::Owned(v) => {
            // Values built here (strings, booleans) have no members; an owned object or
            // array only arises from a variable, which is rare: clone the member.
            let picked = match (&v, i) {
                (Value::Object(m), Value::String(k)) => m.get(k).cloned().unwrap_or(Value::Null),
                (Value::Null, Value::String(_) | Value::Number(_)) => Value::Null,
                _ => return None,
            };
            Some(Cow::Owned(picked))
        }
    }
}

/// jq's `==` where it is certain without number arithmetic; numbers other than two
/// integers, and arrays or objects on both sides, defer.
fn equal(a: &Value, b: &Value) -> Result<bool, Defer> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => Ok(x == y),
            _ => Err(Defer),
        },
        (Value::Array(_) | Value::Object(_), Value::Array(_) | Value::Object(_)) => Err(Defer),
        (Value::String(x), Value::String(y)) => Ok(x == y),
        (Value::Bool(x), Value::Bool(y)) => Ok(x == y),
        (Value::Null, Value::Null) => Ok(true),
        _ => Ok(false),
    }
}

/// When `n` is a plain path of literal keys from the input (`.`, `.data`, `.a.b`), the keys.
pub(crate) fn literal_path(n: &Node) -> Option<Vec<&str>> {
    match n {
        Node::Id => Some(Vec::new()),
        Node::Path(head, parts) if matches!(**head, Node::Id) => parts
            .iter()
            .map(|(i, opt)| match (i, opt) {
                (Node::Lit(Value::String(k)), Opt::Essential) => Some(k.as_str()),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialect::expr::{from_jaq, to_jaq, Expr};

    /// Expressions of the subset beyond those the shipped dialects use.
    const EXTRA: &[&str] = &[
        ".",
        ".a.b?",
        ".[0]",
        ".data[-1]",
        r#".["type"] != "x""#,
        r#"has("data") and (.data | type) == "object""#,
        r#".x // "default""#,
        r#".type as $t | "\($t):\(.n)""#,
        r#"if .n == 1 then "one" elif .n == 2 then "two" else "many" end"#,
        r#"if .a then .a end"#,
        r#"(.type | strings | startswith("con")) or false"#,
        r#".type | ltrimstr("lobby:")"#,
        r#".missing | not"#,
        r#"select(.n == 1) | .type"#,
        r#".a + .b"#,
        r#"null + .type"#,
        r#".n | numbers"#,
        r#"[.a] | length"#,
    ];

    fn corpus() -> Vec<Value> {
        let mut out = Vec::new();
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");
        for provider in ["voicepact", "voipbin", "hashi"] {
            let dir = std::path::Path::new(root).join(provider);
            for entry in std::fs::read_dir(&dir).expect("fixtures") {
                let path = entry.expect("entry").path();
                if path.to_string_lossy().ends_with(".frame.json") {
                    let text = std::fs::read_to_string(&path).expect("reads");
                    out.push(serde_json::from_str(&text).expect("JSON"));
                }
            }
        }
        for text in [
            r#"{"type":"pong"}"#,
            r#"{"type":"error","data":"boom"}"#,
            r#"{"type":"error","data":{"code":5}}"#,
            r#"{"type":"lobby:event","data":{"type":"","lobbyId":12}}"#,
            r#"{"type":"x:event","data":[1,2]}"#,
            r#"{"type":7,"n":1,"a":"s","b":"t"}"#,
            r#"{"event_type":"","data":null,"n":2,"a":{"b":1}}"#,
            r#"{"contract_id":4.5,"n":1.0,"a":[1]}"#,
            r#"{"data":{"timestamp":1717171717}}"#,
            "[1,2,3]",
            "\"text\"",
            "null",
            "3",
        ] {
            out.push(serde_json::from_str(text).expect("JSON"));
        }
        out
    }

    fn expressions() -> Vec<String> {
        let mut out: Vec<String> = EXTRA.iter().map(|s| s.to_string()).collect();
        for name in ["voicepact", "voipbin", "hashi"] {
            let text =
                std::fs::read_to_string(format!("{}/{name}.toml", env!("CARGO_MANIFEST_DIR")))
                    .expect("shipped file");
            let table: toml::Table = text.parse().expect("TOML");
            for section in ["control", "events"] {
                for rule in table
                    .get(section)
                    .and_then(|v| v.as_array())
                    .into_iter()
                    .flatten()
                {
                    for key in [
                        "match", "type", "subject", "time", "data", "message", "code",
                    ] {
                        if let Some(code) = rule.get(key).and_then(|v| v.as_str()) {
                            out.push(code.to_string());
                        }
                    }
                }
            }
        }
        out
    }

    /// Wherever the fast lane answers, jaq gives the same first output.
    #[test]
    fn the_fast_lane_agrees_with_jaq() {
        let globals = [Value::String("ws://h/".into())];
        let jq_globals: Vec<jaq_json::Val> = globals.iter().map(to_jaq).collect();
        let mut answered = 0;
        for code in expressions() {
            let expr = Expr::compile(&code, &["$url"]).expect("compiles");
            let Some(node) = expr.native() else { continue };
            for frame in corpus() {
                let mut scope = Scope::new(&globals);
                let Ok(fast) = eval(node, &Cow::Borrowed(&frame), &mut scope) else {
                    continue;
                };
                answered += 1;
                let slow = expr.first(to_jaq(&frame), &jq_globals).unwrap_or_else(|e| {
                    panic!("{code} on {frame}: fast lane answered, jaq failed: {e}")
                });
                let slow = slow.map(|v| from_jaq(&v).expect("JSON"));
                assert_eq!(fast.as_deref(), slow.as_ref(), "{code} on {frame}");
                if let (Some(a), Some(b)) = (fast.as_deref(), slow.as_ref()) {
                    assert_eq!(a.to_string(), b.to_string(), "{code} on {frame}: bytes");
                }
            }
        }
        assert!(
            answered > 1000,
            "the fast lane answered only {answered} times"
        );
    }

    /// The rules of the shipped dialects run in the fast lane on their frames (no expression
    /// of theirs is outside the subset).
    #[test]
    fn shipped_rule_expressions_are_in_the_fast_lane() {
        for code in expressions().iter().skip(EXTRA.len()) {
            assert!(
                compile(code, &["$url"]).is_some(),
                "not in the fast lane: {code}"
            );
        }
        // And things outside it are recognised as such.
        for code in [
            ".[]",
            "1.5",
            "map(.)",
            r#"@uri "\(.a)""#,
            ".a, .b",
            "def f: .; f",
        ] {
            assert!(compile(code, &[]).is_none(), "{code}");
        }
    }

    #[test]
    fn plain_paths_are_recognised() {
        let keys = |c: &str| {
            compile(c, &[])
                .as_ref()
                .and_then(literal_path)
                .map(|k| k.join("/"))
        };
        assert_eq!(keys("."), Some(String::new()));
        assert_eq!(keys(".data"), Some("data".to_string()));
        assert_eq!(keys(r#".a["b"]"#), Some("a/b".to_string()));
        assert_eq!(keys(".a?"), None);
        assert_eq!(keys(".a | .b"), None);
    }
}
