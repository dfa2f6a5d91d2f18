//! jq expressions: compiled once when a dialect file loads, run per frame.
//!
//! The jaq implementation of jq runs them, with its standard library and the functions a
//! provider's handshake needs (see [`funs`]). Values cross between the bridge's
//! `serde_json` values and jaq's values here, in both directions, without changing them: an
//! object keeps its member order and a number keeps the digits it arrived with, so `data`
//! taken out of a frame by an expression is byte for byte what the provider sent.

use std::fmt;

use jaq_core::load::{Arena, File, Loader};
use jaq_core::native::{bome, v, Fun};
use jaq_core::{data::JustLut, Ctx, Vars};
use jaq_json::{Num, Rc, Val};
use serde_json::Value;

/// jaq's data kind for every dialect expression: plain values, no inputs.
type Data = JustLut<Val>;

/// Longest run-time error message kept (jq messages quote values; a frame can be large).
const MAX_MESSAGE: usize = 200;

/// A compiled jq expression, with the variables it was compiled for.
pub(crate) struct Expr {
    filter: jaq_core::Filter<Data>,
    /// The same expression in the fast lane, when it is inside its subset.
    native: Option<super::native::Node>,
    /// The expression as written, for messages.
    source: String,
}

impl fmt::Debug for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Expr({:?})", self.source)
    }
}

/// Why an expression did not compile: jaq's message and, where jaq gives one, the byte offset
/// in the expression it points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CompileError {
    /// jaq's message.
    pub message: String,
    /// Byte offset in the expression.
    pub offset: Option<usize>,
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.offset {
            Some(at) => write!(f, "{} (at offset {at})", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Why an expression failed on a value at run time (an `error(..)` of the expression, a type
/// error, `halt`). The message is bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EvalError(pub String);

impl fmt::Display for EvalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Expr {
    /// Compiles `code` with the global variables `vars` (names with their `$`); the values
    /// are given in the same order to every run.
    pub(crate) fn compile(code: &str, vars: &[&str]) -> Result<Expr, CompileError> {
        let defs = jaq_core::defs()
            .chain(jaq_std::defs())
            .chain(jaq_json::defs());
        let loader = Loader::new(defs);
        let arena = Arena::default();
        let modules = loader
            .load(&arena, File { code, path: () })
            .map_err(|errs| load_error(code, errs))?;
        let filter = jaq_core::Compiler::default()
            .with_funs(all_funs())
            .with_global_vars(vars.iter().copied())
            .compile(modules)
            .map_err(|errs| compile_error(code, errs))?;
        Ok(Expr {
            filter,
            native: super::native::compile(code, vars),
            source: code.to_string(),
        })
    }

    /// The fast-lane form, when the expression is inside its subset.
    pub(crate) fn native(&self) -> Option<&super::native::Node> {
        self.native.as_ref()
    }

    /// The first output, `None` when there is none; an error in the first output fails.
    pub(crate) fn first(&self, input: Val, vars: &[Val]) -> Result<Option<Val>, EvalError> {
        let ctx = Ctx::<Data>::new(&self.filter.lut, Vars::new(vars.iter().cloned()));
        match self.filter.id.run((ctx, input)).next() {
            None => Ok(None),
            Some(Ok(v)) => Ok(Some(v)),
            Some(Err(e)) => Err(exn_message(e)),
        }
    }

    /// The first `n` outputs at most, in order (the rest are never computed); the first
    /// error fails.
    pub(crate) fn first_n(
        &self,
        input: Val,
        vars: &[Val],
        n: usize,
    ) -> Result<Vec<Val>, EvalError> {
        let ctx = Ctx::<Data>::new(&self.filter.lut, Vars::new(vars.iter().cloned()));
        self.filter
            .id
            .run((ctx, input))
            .take(n)
            .map(|r| r.map_err(exn_message))
            .collect()
    }

    /// Every output, in order; the first error fails.
    pub(crate) fn all(&self, input: Val, vars: &[Val]) -> Result<Vec<Val>, EvalError> {
        let ctx = Ctx::<Data>::new(&self.filter.lut, Vars::new(vars.iter().cloned()));
        self.filter
            .id
            .run((ctx, input))
            .map(|r| r.map_err(exn_message))
            .collect()
    }
}

fn exn_message(e: jaq_core::Exn<'_, Val>) -> EvalError {
    let text = match e.get_err() {
        Ok(err) => match err.into_val() {
            // `error("text")`: the text itself, without JSON quotes.
            Val::TStr(b) => String::from_utf8_lossy(&b).into_owned(),
            other => other.to_string(),
        },
        Err(exn) => match exn.get_halt() {
            Ok(code) => format!("the expression halted (code {code}); halt is not allowed here"),
            Err(_) => "the expression stopped with an unexpected control flow".to_string(),
        },
    };
    EvalError(bounded(text))
}

/// Cuts `text` to [`MAX_MESSAGE`] bytes on a character boundary.
fn bounded(mut text: String) -> String {
    if text.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// Offset of `part` in `whole` when `part` is a slice of it.
fn offset_in(whole: &str, part: &str) -> Option<usize> {
    let (w, p) = (whole.as_ptr() as usize, part.as_ptr() as usize);
    (p >= w && p + part.len() <= w + whole.len()).then(|| p - w)
}

fn near(part: &str) -> String {
    let shown: String = part.chars().take(20).collect();
    if shown.is_empty() {
        "the end".to_string()
    } else {
        format!("{shown:?}")
    }
}

fn load_error(code: &str, errs: jaq_core::load::Errors<&str, ()>) -> CompileError {
    use jaq_core::load::Error;
    let first = errs.into_iter().map(|(_file, e)| e).next();
    match first {
        Some(Error::Lex(es)) => match es.into_iter().next() {
            Some((expect, found)) => expected(code, expect.as_str(), found),
            None => unknown_error(),
        },
        Some(Error::Parse(es)) => match es.into_iter().next() {
            Some((expect, found)) => expected(code, expect.as_str(), found),
            None => unknown_error(),
        },
        Some(Error::Io(es)) => CompileError {
            message: es
                .into_iter()
                .next()
                .map(|(path, why)| format!("cannot load module {path:?}: {why}"))
                .unwrap_or_else(|| "cannot load a module".to_string()),
            offset: None,
        },
        None => unknown_error(),
    }
}

/// "expected X, found Y" at the offset of what was found.
fn expected(code: &str, what: &str, found: &str) -> CompileError {
    CompileError {
        message: format!("expected {what}, found {}", near(found)),
        offset: offset_in(code, found),
    }
}

fn compile_error(code: &str, errs: jaq_core::compile::Errors<&str, ()>) -> CompileError {
    let first = errs.into_iter().flat_map(|(_file, es)| es).next();
    match first {
        Some((name, undefined)) => {
            let what = match undefined {
                jaq_core::compile::Undefined::Filter(arity) => {
                    format!("undefined filter `{name}/{arity}`")
                }
                other => format!("undefined {} `{name}`", other.as_str()),
            };
            CompileError {
                message: what,
                offset: offset_in(code, name),
            }
        }
        None => unknown_error(),
    }
}

fn unknown_error() -> CompileError {
    CompileError {
        message: "the expression does not compile".to_string(),
        offset: None,
    }
}

/// jq's core and standard library, jaq's JSON functions, and the dialect functions.
fn all_funs() -> impl Iterator<Item = Fun<Data>> {
    jaq_core::funs()
        .chain(jaq_std::funs())
        .chain(jaq_json::funs())
        .chain(funs())
}

/// The functions a provider's handshake needs beyond jq's standard library (which already has
/// `now`, `@base64`, `@base64d` and `@uri`):
/// - `hmac_sha256(key; msg)`: HMAC-SHA256, lower-case hex;
/// - `hmac_sha256_b64(key; msg)`: the same, standard base64;
/// - `sha256`: SHA-256 of the input string, lower-case hex;
/// - `uuid4`: a random UUID (version 4), e.g. for a request id.
fn funs() -> impl Iterator<Item = Fun<Data>> {
    let natives: [jaq_core::native::Filter<jaq_core::RunPtr<Data>>; 4] = [
        ("hmac_sha256", v(2), |mut cv| {
            let msg = cv.0.pop_var();
            let key = cv.0.pop_var();
            bome(hmac(&key, &msg).map(|d| Val::from(hex::encode(d))))
        }),
        ("hmac_sha256_b64", v(2), |mut cv| {
            use base64::Engine;
            let msg = cv.0.pop_var();
            let key = cv.0.pop_var();
            bome(
                hmac(&key, &msg)
                    .map(|d| Val::from(base64::engine::general_purpose::STANDARD.encode(d))),
            )
        }),
        ("sha256", v(0), |cv| {
            use sha2::Digest;
            bome(
                bytes_of(&cv.1, "sha256", "its input")
                    .map(|b| Val::from(hex::encode(sha2::Sha256::digest(b)))),
            )
        }),
        ("uuid4", v(0), |_| bome(Ok(Val::from(uuid4())))),
    ];
    natives.into_iter().map(jaq_core::native::run::<Data>)
}

fn bytes_of<'v>(v: &'v Val, fun: &str, what: &str) -> Result<&'v [u8], jaq_json::Error> {
    match v {
        Val::TStr(b) | Val::BStr(b) => Ok(b),
        _ => Err(jaq_core::Error::str(format!(
            "{fun}: {what} must be a string"
        ))),
    }
}

fn hmac(key: &Val, msg: &Val) -> Result<Vec<u8>, jaq_json::Error> {
    use hmac::{Hmac, KeyInit, Mac};
    let key = bytes_of(key, "hmac_sha256", "the key")?;
    let msg = bytes_of(msg, "hmac_sha256", "the message")?;
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key)
        .map_err(|e| jaq_core::Error::str(format!("hmac_sha256: {e}")))?;
    mac.update(msg);
    Ok(mac.finalize().into_bytes().to_vec())
}

/// A random version 4 UUID in its hyphenated lower-case form.
fn uuid4() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A `serde_json` value as a jaq value. Integers stay integers; any other number keeps the
/// text `serde_json` prints for it, so it comes back unchanged.
pub(crate) fn to_jaq(v: &Value) -> Val {
    match v {
        Value::Null => Val::Null,
        Value::Bool(b) => Val::Bool(*b),
        Value::Number(n) => Val::Num(if let Some(i) = n.as_i64() {
            Num::from_integral(i)
        } else if let Some(u) = n.as_u64() {
            Num::from_integral(u)
        } else {
            Num::Dec(Rc::new(n.to_string()))
        }),
        Value::String(s) => Val::from(s.clone()),
        Value::Array(items) => items.iter().map(to_jaq).collect(),
        Value::Object(map) => Val::obj(
            map.iter()
                .map(|(k, v)| (Val::from(k.clone()), to_jaq(v)))
                .collect(),
        ),
    }
}

/// A jaq value as a `serde_json` value; fails on what JSON cannot hold (an object key that is
/// not a string). Byte strings become text (invalid UTF-8 replaced); numbers JSON cannot
/// represent (NaN, infinities) become `null`, as jq prints them.
pub(crate) fn from_jaq(v: &Val) -> Result<Value, EvalError> {
    Ok(match v {
        Val::Null => Value::Null,
        Val::Bool(b) => Value::Bool(*b),
        Val::Num(n) => number(n),
        Val::TStr(b) | Val::BStr(b) => Value::String(String::from_utf8_lossy(b).into_owned()),
        Val::Arr(items) => Value::Array(items.iter().map(from_jaq).collect::<Result<_, _>>()?),
        Val::Obj(map) => {
            let mut out = serde_json::Map::with_capacity(map.len());
            for (k, v) in map.iter() {
                let key = match k {
                    Val::TStr(b) | Val::BStr(b) => String::from_utf8_lossy(b).into_owned(),
                    other => {
                        return Err(EvalError(bounded(format!(
                            "an object key is not a string: {other}"
                        ))))
                    }
                };
                out.insert(key, from_jaq(v)?);
            }
            Value::Object(out)
        }
    })
}

fn number(n: &Num) -> Value {
    match n {
        Num::Int(i) => Value::from(*i as i64),
        Num::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        Num::BigInt(_) | Num::Dec(_) => n
            .to_string()
            .parse::<serde_json::Number>()
            .map_or(Value::Null, Value::Number),
    }
}

/// The text of a string value, `None` for any other value.
pub(crate) fn as_text(v: &Val) -> Option<String> {
    match v {
        Val::TStr(b) | Val::BStr(b) => Some(String::from_utf8_lossy(b).into_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(code: &str, input: Value) -> Result<Vec<Value>, EvalError> {
        let e = Expr::compile(code, &[]).expect("compiles");
        e.all(to_jaq(&input), &[])?
            .iter()
            .map(from_jaq)
            .collect::<Result<_, _>>()
    }

    #[test]
    fn values_cross_unchanged() {
        let text = r#"{"z":1,"a":[250.5,1e-7,18446744073709551615,-3,"s",null,true],"m":{"y":{},"b":1.0}}"#;
        let v: Value = serde_json::from_str(text).unwrap();
        let back = from_jaq(&to_jaq(&v)).unwrap();
        assert_eq!(
            serde_json::to_string(&back).unwrap(),
            serde_json::to_string(&v).unwrap()
        );
        // And through an expression that rebuilds nothing.
        let out = run(".m", v.clone()).unwrap();
        assert_eq!(
            serde_json::to_string(&out[0]).unwrap(),
            r#"{"y":{},"b":1.0}"#
        );
    }

    #[test]
    fn numbers_print_as_serde_json_prints_them() {
        let v: Value = serde_json::from_str(r#"{"a":250.5,"b":42}"#).unwrap();
        assert_eq!(run(r#""\(.a)/\(.b)""#, v).unwrap(), vec![json!("250.5/42")]);
    }

    #[test]
    fn variables_bind_in_order() {
        let e = Expr::compile(r#"$a + "-" + $b"#, &["$a", "$b"]).unwrap();
        let out = e
            .first(
                Val::Null,
                &[Val::from("x".to_string()), Val::from("y".to_string())],
            )
            .unwrap()
            .unwrap();
        assert_eq!(as_text(&out).as_deref(), Some("x-y"));
    }

    #[test]
    fn compile_errors_carry_message_and_offset() {
        let e = Expr::compile(".a | nosuchfn(1)", &[]).unwrap_err();
        assert!(e.message.contains("nosuchfn"), "{e}");
        assert_eq!(e.offset, Some(5), "{e}");
        let e = Expr::compile(".a | (", &[]).unwrap_err();
        assert!(e.message.starts_with("expected"), "{e}");
        let e = Expr::compile("$nope", &["$yes"]).unwrap_err();
        assert!(e.message.contains("variable"), "{e}");
        assert_eq!(e.offset, Some(0), "{e}");
        let e = Expr::compile(r#""\ux""#, &[]).unwrap_err();
        assert!(e.offset.is_some(), "{e}");
    }

    #[test]
    fn runtime_errors_are_messages_and_halt_does_not_exit() {
        let e = run(r#"error("no `type`")"#, json!({})).unwrap_err();
        assert_eq!(e.0, "no `type`");
        let e = run(".a.b", json!({"a": "str"})).unwrap_err();
        assert!(e.0.contains("cannot index"), "{e}");
        let e = run("halt", json!(null)).unwrap_err();
        assert!(e.0.contains("halt"), "{e}");
        let long = "x".repeat(1000);
        let e = run("error(.)", json!(long)).unwrap_err();
        assert!(e.0.len() <= MAX_MESSAGE + '…'.len_utf8(), "{}", e.0.len());
    }

    #[test]
    fn dialect_functions() {
        // RFC 4231 test case 2.
        assert_eq!(
            run(
                r#"hmac_sha256("Jefe"; "what do ya want for nothing?")"#,
                json!(null)
            )
            .unwrap(),
            vec![json!(
                "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
            )]
        );
        assert_eq!(
            run(
                r#"hmac_sha256_b64("Jefe"; "what do ya want for nothing?")"#,
                json!(null)
            )
            .unwrap(),
            vec![json!("W9zBRr9gdU5qBCQmCJV1x1oAPwidJzmDnexYuWTsOEM=")]
        );
        assert_eq!(
            run("sha256", json!("abc")).unwrap(),
            vec![json!(
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
            )]
        );
        assert!(run("sha256", json!(1)).is_err());
        assert!(run(r#"hmac_sha256(1; "m")"#, json!(null)).is_err());
        let ids = run("[uuid4, uuid4]", json!(null)).unwrap();
        let (a, b) = (ids[0][0].as_str().unwrap(), ids[0][1].as_str().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"), "{a}");
        let now = run("now", json!(null)).unwrap();
        let secs = now[0].as_f64().unwrap();
        let wall = chrono::Utc::now().timestamp() as f64;
        assert!((secs - wall).abs() < 60.0, "{secs} vs {wall}");
        assert_eq!(
            run("@base64 | ., @base64d", json!("hi")).unwrap(),
            vec![json!("aGk="), json!("hi")]
        );
        assert_eq!(
            run("@uri", json!("a b&+")).unwrap(),
            vec![json!("a%20b%26%2B")]
        );
    }
}
