//! `wsbridge dialect list | check | decode`: the tools for writing a dialect file.
//!
//! A team adding a provider writes its dialect file from the provider's API doc, then
//! `check`s it (every expression compiles, every `[[examples]]` entry decodes to what it
//! says; a failing example shows what differs, path by path) and `decode`s real frames with
//! it (frames on stdin, envelopes on stdout, exactly as the bridge would stamp them) before
//! pointing an upstream at it. `list` shows what an upstream's `adapter` may name.

use std::io::{BufRead, Read, Write};
use std::path::Path;
use std::sync::Arc;

use chrono::Utc;
use serde_json::Value;
use wsbridge_adapters::dialect::{builtin, Dialect, DialectError, Params, Registry};
use wsbridge_adapters::{Adapter, AdapterError, Decoded};

use crate::config::LimitsConfig;
use crate::envelope::Envelope;

/// The base URL a decoded frame is taken to come from unless `--param url=…` says otherwise
/// (its host goes into content-derived ids).
pub const DECODE_URL: &str = "ws://example.invalid/";

/// The envelope `source` of decoded frames.
pub const DECODE_SOURCE: &str = "wsbridge://dialect-decode";

/// Why a dialect tool could not run.
#[derive(Debug, thiserror::Error)]
pub enum DialectToolError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a usable dialect (every problem with its key).
    #[error("{0}")]
    Load(#[from] DialectError),
    /// A `--param` is malformed.
    #[error("--param {arg:?}: {reason}")]
    Param {
        /// The argument as given (a value is never shown: it may be a secret).
        arg: String,
        /// Why.
        reason: String,
    },
    /// The parameters do not fit the dialect.
    #[error("{0}")]
    Bind(#[from] AdapterError),
}

/// Every dialect of `registry`, one per line: name, where it comes from, description, and its
/// parameters.
pub fn list(registry: &Registry) -> String {
    let all = registry.all();
    let width = all.iter().map(|d| d.name().len()).max().unwrap_or(0);
    let mut out = String::new();
    for d in &all {
        out.push_str(&format!(
            "{:<width$}  {}  {}\n",
            d.name(),
            d.origin(),
            d.description()
        ));
        let params: Vec<String> = d
            .params()
            .map(|p| {
                let mut flags = vec![p.kind];
                if p.required {
                    flags.push("required");
                }
                if p.secret {
                    flags.push("secret");
                }
                if p.unique {
                    flags.push("unique");
                }
                format!("{} ({})", p.name, flags.join(", "))
            })
            .collect();
        if !params.is_empty() {
            out.push_str(&format!("{:<width$}  params: {}\n", "", params.join("; ")));
        }
    }
    out
}

/// The dialect `file`: a dialect file, or the name of a built-in dialect.
pub fn resolve(file: &str) -> Result<Arc<Dialect>, DialectToolError> {
    let path = Path::new(file);
    if !path.exists() {
        if let Some(d) = builtin(file) {
            return Ok(d?);
        }
    }
    let text = std::fs::read_to_string(path).map_err(|source| DialectToolError::Read {
        path: file.to_string(),
        source,
    })?;
    Ok(Arc::new(Dialect::load(file, &text)?))
}

/// What `check` found in one file.
#[derive(Debug)]
pub struct FileCheck {
    /// Whether it compiled and every example passed.
    pub ok: bool,
    /// The report: `FILE: ok (N examples)`, or every problem and every failing example with
    /// its differences.
    pub report: String,
}

/// Compiles `file` and runs its examples.
pub fn check(file: &str) -> FileCheck {
    let dialect = match resolve(file) {
        Ok(d) => d,
        Err(e) => {
            return FileCheck {
                ok: false,
                report: format!("{e}\n"),
            }
        }
    };
    match dialect.check_examples() {
        Ok(()) => FileCheck {
            ok: true,
            report: format!(
                "{file}: ok (dialect {:?}, {} examples)\n",
                dialect.name(),
                dialect.example_count()
            ),
        },
        Err(failures) => {
            let mut report = format!(
                "{file}: {} of {} examples fail\n",
                failures.len(),
                dialect.example_count()
            );
            for f in failures {
                report.push_str(&format!("{file}: {f}"));
            }
            FileCheck { ok: false, report }
        }
    }
}

/// `--param k=v` arguments as the dialect's parameters: `url` (default [`DECODE_URL`]), a
/// `string` parameter's value as written, any other's as JSON (`topics=["a","b"]`, `n=3`).
pub fn params(dialect: &Dialect, args: &[String]) -> Result<Params, DialectToolError> {
    let bad = |arg: &str, reason: &str| DialectToolError::Param {
        arg: arg.split('=').next().unwrap_or("").to_string(),
        reason: reason.to_string(),
    };
    let mut url = None;
    let mut values = Vec::new();
    for arg in args {
        let (key, value) = arg
            .split_once('=')
            .ok_or_else(|| bad(arg, "expected KEY=VALUE"))?;
        if key == "url" {
            url = Some(url::Url::parse(value).map_err(|e| bad(arg, &format!("not a URL: {e}")))?);
            continue;
        }
        let kind = dialect.params().find(|p| p.name == key).map(|p| p.kind);
        let value = match kind {
            Some("string") | None => Value::String(value.to_string()),
            Some(kind) => serde_json::from_str(value)
                .map_err(|e| bad(arg, &format!("a {kind} parameter's value is JSON: {e}")))?,
        };
        values.push((key.to_string(), value));
    }
    let url = match url {
        Some(u) => u,
        None => url::Url::parse(DECODE_URL).map_err(|e| bad("url", &e.to_string()))?,
    };
    let mut p = Params::new(&url);
    for (k, v) in values {
        p.set(&k, v);
    }
    Ok(p)
}

/// How a `decode` run went.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DecodeSummary {
    /// Frames decoded into envelopes.
    pub events: u64,
    /// Control frames (reported on the error stream, not printed as envelopes).
    pub controls: u64,
    /// Frames that did not decode (and lines too long to be a frame).
    pub errors: u64,
}

/// Decodes every line of `input` (one frame per line; empty lines skipped) with `adapter`:
/// each event's envelope as one JSON line on `out`, each control frame and decode error as a
/// line on `err` (`line N: …`); a bad frame never stops the run. Frames are held to the
/// bridge's default `[limits]` (frame size, nesting depth).
pub fn decode(
    adapter: &dyn Adapter,
    mut input: impl BufRead,
    mut out: impl Write,
    mut err: impl Write,
) -> std::io::Result<DecodeSummary> {
    let limits = LimitsConfig::default();
    let max_line = limits.max_upstream_frame_bytes();
    let max_line_u64 = u64::try_from(max_line).unwrap_or(u64::MAX);
    let mut summary = DecodeSummary::default();
    let mut buf = Vec::new();
    let mut line_no = 0u64;
    loop {
        buf.clear();
        let n =
            Read::take(&mut input, max_line_u64.saturating_add(1)).read_until(b'\n', &mut buf)?;
        if n == 0 {
            break;
        }
        line_no = line_no.saturating_add(1);
        if buf.len() > max_line && buf.last() != Some(&b'\n') {
            // Skip the rest of the line without holding it.
            let mut rest = Vec::new();
            loop {
                rest.clear();
                let m = Read::take(&mut input, 64 * 1024).read_until(b'\n', &mut rest)?;
                if m == 0 || rest.last() == Some(&b'\n') {
                    break;
                }
            }
            summary.errors = summary.errors.saturating_add(1);
            writeln!(
                err,
                "line {line_no}: longer than {max_line} bytes (limits.max_event_bytes); skipped"
            )?;
            continue;
        }
        let text = String::from_utf8_lossy(&buf);
        let frame = text.trim_end_matches(['\n', '\r']);
        if frame.trim().is_empty() {
            continue;
        }
        let decoded = wsbridge_adapters::check_depth(frame, limits.max_depth)
            .and_then(|()| adapter.decode_frame(frame, limits.max_split_events));
        match decoded {
            Ok(Decoded::Events(events)) => {
                for e in events {
                    let envelope =
                        Envelope::new(e.event, DECODE_SOURCE, adapter.provider(), Utc::now());
                    let json = serde_json::to_string(&envelope).map_err(std::io::Error::other)?;
                    writeln!(out, "{json}")?;
                    summary.events = summary.events.saturating_add(1);
                }
            }
            Ok(Decoded::Control(c)) => {
                writeln!(err, "line {line_no}: a control frame: {c:?}")?;
                summary.controls = summary.controls.saturating_add(1);
            }
            Err(e) => {
                writeln!(err, "line {line_no}: decode error: {e}")?;
                summary.errors = summary.errors.saturating_add(1);
            }
        }
    }
    out.flush()?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_keeps_going_after_a_bad_frame() {
        let d = resolve("voipbin").expect("built in");
        let p = params(&d, &["token=t".to_string()]).expect("params");
        let a = wsbridge_adapters::build_adapter(d, &p).expect("binds");
        let input = "{\"event_type\":\"call.status\",\"timestamp\":\"2024-01-15T10:30:00Z\",\"data\":{\"id\":\"x\"}}\n\nnot json\n{\"event_type\":\"call.hangup\",\"data\":{}}\n";
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let s = decode(a.as_ref(), input.as_bytes(), &mut out, &mut err).expect("runs");
        assert_eq!(
            s,
            DecodeSummary {
                events: 2,
                controls: 0,
                errors: 1
            }
        );
        let out = String::from_utf8(out).expect("utf-8");
        let types: Vec<String> = out
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).expect("an envelope per line");
                v["type"].as_str().unwrap_or("").to_string()
            })
            .collect();
        assert_eq!(types, ["voipbin.call.status", "voipbin.call.hangup"]);
        let err = String::from_utf8(err).expect("utf-8");
        assert!(err.starts_with("line 3: decode error"), "{err}");
    }

    #[test]
    fn decode_prints_every_event_of_a_split_frame() {
        let text = "[dialect]\nname = \"batch\"\n[connect]\nurl = '$url'\n[[events]]\nsplit = '.items[]'\ntype = '.k'\n";
        let d = Arc::new(Dialect::load("batch.toml", text).expect("loads"));
        let p = Params::new(&url::Url::parse("ws://127.0.0.1:1/").expect("URL"));
        let a = wsbridge_adapters::build_adapter(d, &p).expect("binds");
        let input = "{\"items\":[{\"k\":\"a\"},{\"k\":\"b\"},{\"k\":\"c\"}]}\n{\"items\":[]}\n";
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let s = decode(a.as_ref(), input.as_bytes(), &mut out, &mut err).expect("runs");
        assert_eq!(s.events, 3);
        assert_eq!(s.errors, 0);
        let types: Vec<String> = String::from_utf8(out)
            .expect("utf-8")
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).expect("an envelope per line");
                v["type"].as_str().unwrap_or("").to_string()
            })
            .collect();
        assert_eq!(types, ["batch.a", "batch.b", "batch.c"]);
    }

    #[test]
    fn params_take_strings_as_written_and_other_types_as_json() {
        let d = resolve("voipbin").expect("built in");
        let p = params(
            &d,
            &[
                "token=123".to_string(),
                "topics=[\"customer_id:a:call:*\"]".to_string(),
            ],
        )
        .expect("params");
        assert_eq!(p.get("token"), Some(&Value::String("123".to_string())));
        assert!(p.get("topics").is_some_and(Value::is_array));
        let e = params(&d, &["topics=a".to_string()]).expect_err("not JSON");
        assert!(e.to_string().contains("--param \"topics\""), "{e}");
        assert!(params(&d, &["token".to_string()]).is_err());
    }
}
