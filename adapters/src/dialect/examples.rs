//! `[[examples]]`: a dialect file's own test cases, a frame and what it must decode to.
//!
//! Each example is decoded with its `params` (missing required ones get the placeholder
//! `"example"`, or `1`, `true`, `[]`, `{}` by their type; `url` defaults to `ws://example.invalid/`), exactly as an upstream would
//! decode it, and compared with what the entry says; `wsbridge`'s test suite runs every
//! example of every shipped dialect.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::adapter::{decoder, Params};
use super::{Dialect, ParamKind};
use crate::{Control, Decoded, DecodedEvent};

/// The URL examples are decoded as if received from, unless they set `params.url`.
const EXAMPLE_URL: &str = "ws://example.invalid/";

/// One `[[examples]]` entry, checked at load.
#[derive(Debug)]
pub(crate) struct Example {
    pub index: usize,
    pub description: String,
    pub frame: String,
    pub params: serde_json::Map<String, Value>,
    pub expect: Expect,
}

/// What an example's frame must decode to.
#[derive(Debug)]
pub(crate) enum Expect {
    Event(EventExpect),
    /// The events of a `split` frame, in order.
    Events(Vec<EventExpect>),
    /// A control frame of this kind (`pong`, `greeting`, ...).
    Control(String),
    /// A decode error.
    Error,
}

/// What one event of an example must be.
#[derive(Debug)]
pub(crate) struct EventExpect {
    pub event_type: String,
    pub subject: Option<String>,
    pub time: Option<DateTime<Utc>>,
    pub data: Value,
    /// Checked only when the example gives it.
    pub id: Option<String>,
}

/// Most events an example's frame may decode to (a `split` frame's items).
const MAX_EXAMPLE_EVENTS: usize = crate::DEFAULT_MAX_SPLIT_EVENTS;

/// An example that does not decode to what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExampleFailure {
    /// Its position among the file's `[[examples]]`.
    pub index: usize,
    /// Its `description`, if any.
    pub description: String,
    /// The frame.
    pub frame: String,
    /// Each difference on its own line (`type: got "a", expected "b"`).
    pub differences: Vec<String>,
}

impl fmt::Display for ExampleFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "examples[{}]", self.index)?;
        if !self.description.is_empty() {
            write!(f, " ({})", self.description)?;
        }
        writeln!(f, ": {}", self.frame)?;
        for d in &self.differences {
            writeln!(f, "  {d}")?;
        }
        Ok(())
    }
}

pub(crate) fn check(dialect: &Arc<Dialect>) -> Result<(), Vec<ExampleFailure>> {
    let failures: Vec<ExampleFailure> = dialect
        .examples
        .iter()
        .filter_map(|ex| {
            let differences = run(dialect, ex);
            (!differences.is_empty()).then(|| ExampleFailure {
                index: ex.index,
                description: ex.description.clone(),
                frame: ex.frame.clone(),
                differences,
            })
        })
        .collect();
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures)
    }
}

fn run(dialect: &Arc<Dialect>, ex: &Example) -> Vec<String> {
    let url = ex
        .params
        .get("url")
        .and_then(Value::as_str)
        .unwrap_or(EXAMPLE_URL);
    let url = match url::Url::parse(url) {
        Ok(u) => u,
        Err(e) => return vec![format!("params.url: {e}")],
    };
    let mut params = Params::new(&url);
    let mut diffs = Vec::new();
    for name in ex.params.keys() {
        if name != "url" && !dialect.params.iter().any(|p| &p.name == name) {
            diffs.push(format!("params.{name}: not a parameter of this dialect"));
        }
    }
    for p in &dialect.params {
        match ex.params.get(&p.name) {
            Some(v) => params.set(&p.name, v.clone()),
            None if p.required => params.set(&p.name, placeholder(p.kind)),
            None => {}
        }
    }
    if !diffs.is_empty() {
        return diffs;
    }
    let decoder = match decoder(Arc::clone(dialect), &params) {
        Ok((d, _)) => d,
        Err(e) => return vec![format!("the example's params do not bind: {e}")],
    };
    let got = decoder.decode_frame(&ex.frame, MAX_EXAMPLE_EVENTS);
    match (&ex.expect, got) {
        (Expect::Event(want), Ok(Decoded::Events(events))) if events.len() == 1 => {
            compare("", &events[0].event, want, &mut diffs);
        }
        (Expect::Events(want), Ok(Decoded::Events(events))) => {
            if events.len() != want.len() {
                diffs.push(format!(
                    "events: got {} events, expected {}",
                    events.len(),
                    want.len()
                ));
            }
            for (i, (got, want)) in events.iter().zip(want).enumerate() {
                compare(&format!("events[{i}]."), &got.event, want, &mut diffs);
            }
        }
        (Expect::Control(kind), Ok(Decoded::Control(c))) => {
            if control_kind(&c) != kind {
                diffs.push(format!("control: got {c:?}, expected {kind:?}"));
            }
        }
        (Expect::Error, Err(_)) => {}
        (_, got) => diffs.push(format!(
            "got {}, expected {}",
            outcome(&got),
            expected(&ex.expect)
        )),
    }
    diffs
}

/// Each difference between an event and what the example says it is, `at` before each key.
fn compare(at: &str, e: &DecodedEvent, want: &EventExpect, diffs: &mut Vec<String>) {
    let EventExpect {
        event_type,
        subject,
        time,
        data,
        id,
    } = want;
    if &e.event_type != event_type {
        diffs.push(format!(
            "{at}type: got {:?}, expected {event_type:?}",
            e.event_type
        ));
    }
    if &e.subject != subject {
        diffs.push(format!(
            "{at}subject: got {:?}, expected {subject:?}",
            e.subject
        ));
    }
    if &e.time != time {
        diffs.push(format!(
            "{at}time: got {}, expected {}",
            show_time(e.time),
            show_time(*time)
        ));
    }
    if &e.data != data {
        diff_json(&format!("{at}data"), &e.data, data, diffs);
    }
    if let Some(id) = id {
        if &e.id != id {
            diffs.push(format!("{at}id: got {:?}, expected {id:?}", e.id));
        }
    }
}

/// Most differences listed for one example's `data` (the rest are summed up in one line).
const MAX_DATA_DIFFERENCES: usize = 20;

/// One line per place where `got` and `expected` differ: `data/a/0: got 1, expected 2`, a
/// member only one side has as `missing` / `unexpected`.
fn diff_json(path: &str, got: &Value, expected: &Value, out: &mut Vec<String>) {
    let start = out.len();
    walk(path, got, expected, out);
    let n = out.len().saturating_sub(start);
    if n > MAX_DATA_DIFFERENCES {
        out.truncate(start.saturating_add(MAX_DATA_DIFFERENCES));
        out.push(format!(
            "... and {} more differences in {path}",
            n - MAX_DATA_DIFFERENCES
        ));
    }
}

fn walk(path: &str, got: &Value, expected: &Value, out: &mut Vec<String>) {
    match (got, expected) {
        (Value::Object(g), Value::Object(e)) => {
            for (k, ev) in e {
                let at = format!("{path}/{k}");
                match g.get(k) {
                    Some(gv) => walk(&at, gv, ev, out),
                    None => out.push(format!("{at}: missing, expected {ev}")),
                }
            }
            for (k, gv) in g {
                if !e.contains_key(k) {
                    out.push(format!("{path}/{k}: unexpected {gv}"));
                }
            }
        }
        (Value::Array(g), Value::Array(e)) if g.len() == e.len() => {
            for (i, (gv, ev)) in g.iter().zip(e).enumerate() {
                walk(&format!("{path}/{i}"), gv, ev, out);
            }
        }
        (g, e) if g != e => out.push(format!("{path}: got {g}, expected {e}")),
        _ => {}
    }
}

/// The value a required parameter the example does not set gets: `"example"`, or the
/// simplest value of its type.
fn placeholder(kind: ParamKind) -> Value {
    match kind {
        ParamKind::String | ParamKind::Any => Value::String("example".to_string()),
        ParamKind::Integer | ParamKind::Number => Value::from(1),
        ParamKind::Boolean => Value::Bool(true),
        ParamKind::Array => Value::Array(Vec::new()),
        ParamKind::Table => Value::Object(serde_json::Map::new()),
    }
}

fn show_time(t: Option<DateTime<Utc>>) -> String {
    t.map_or_else(
        || "none (the receive time)".to_string(),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
    )
}

fn control_kind(c: &Control) -> &'static str {
    match c {
        Control::Pong => "pong",
        Control::Connected => "greeting",
        Control::Reply => "reply",
        Control::AuthFailed { .. } => "auth_failure",
        Control::Error { .. } => "error",
        Control::Reconnect => "reconnect",
    }
}

fn outcome(got: &Result<Decoded, crate::DecodeError>) -> String {
    match got {
        Ok(Decoded::Events(events)) => match events.as_slice() {
            [one] => format!("an event {:?}", one.event.event_type),
            many => format!("{} events", many.len()),
        },
        Ok(Decoded::Control(c)) => format!("a control frame {:?}", control_kind(c)),
        Err(e) => format!("a decode error ({e})"),
    }
}

fn expected(e: &Expect) -> String {
    match e {
        Expect::Event(e) => format!("an event {:?}", e.event_type),
        Expect::Events(events) => format!("{} events", events.len()),
        Expect::Control(k) => format!("a control frame {k:?}"),
        Expect::Error => "a decode error".to_string(),
    }
}
