//! One inbound frame → an event or a control frame, by the dialect's rules.
//!
//! Order: a `text` control that is the whole frame; else the frame must be JSON (or it is a
//! decode error); then the `[[control]]` rules, first match wins; then the `[[events]]`
//! rules, first match wins; a JSON frame no rule takes is still an event,
//! `<dialect>.unknown`, with the whole frame as `data`. An expression that fails on the frame
//! makes the frame a decode error (counted and skipped by the caller); nothing else is lost.
//! A rule with `split` makes each output of its `split` expression an event of its own, in
//! order (`.` the item, `$frame` the frame); a rule's `reply` is evaluated with the event.
//!
//! The frame is parsed once. Expressions inside the fast lane (`native.rs`) read it in place;
//! the others get it converted to jaq's values, once per frame and only when one needs it.
//! `data` that is a plain path (`.`, `.data`) is moved out of the frame, not copied.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::sync::Arc;

use jaq_json::Val;
use serde_json::Value;

use super::expr::{from_jaq, to_jaq, Expr};
use super::native::{self, Scope};
use super::{ControlKind, ControlRule, Dialect, EventRule, Matcher, TimeUnit};
use crate::{Control, DecodeError, Decoded, DecodedEvent, FrameEvent, Inbound, Sequence};

/// A dialect with one upstream's parameter values: decodes that upstream's frames.
#[derive(Debug)]
pub(crate) struct Decoder {
    pub(crate) dialect: Arc<Dialect>,
    /// The values of `$url` and the parameters, in the order the expressions were compiled
    /// for, as jaq values ...
    pub(crate) vars: Vec<Val>,
    /// ... and as JSON values, for the fast lane.
    pub(crate) values: Vec<Value>,
    /// `host[:port]` of the connect URL: part of every content-derived event id.
    pub(crate) host: String,
    /// Secret parameter values, hidden from every message.
    pub(crate) secrets: Vec<String>,
}

/// One frame (or one item of a `split` frame) being decoded: the parsed value, the variable
/// values its expressions see, and, once an expression needs it, its jaq form.
struct Frame<'s, 'f> {
    decoder: &'s Decoder,
    value: &'f Value,
    /// The variables as jaq values (a split item's add `$frame`) ...
    vars: &'f [Val],
    /// ... and as JSON values, for the fast lane.
    values: &'f [Value],
    jq: OnceCell<Val>,
}

impl<'s: 'f, 'f> Frame<'s, 'f> {
    /// The first output of `expr` on the frame (`None` for none); a failure is the frame's
    /// decode error, named after the rule and key.
    fn first(
        &self,
        key: &str,
        what: &str,
        expr: &'s Expr,
    ) -> Result<Option<Cow<'f, Value>>, DecodeError> {
        if let Some(n) = expr.native() {
            let mut scope = Scope::new(self.values);
            if let Ok(v) = native::eval(n, &Cow::Borrowed(self.value), &mut scope) {
                return Ok(v);
            }
        }
        let input = self.jq.get_or_init(|| to_jaq(self.value)).clone();
        let out = expr
            .first(input, self.vars)
            .map_err(|e| self.decoder.error(key, what, &e.0))?;
        match out {
            None => Ok(None),
            Some(v) => from_jaq(&v)
                .map(|v| Some(Cow::Owned(v)))
                .map_err(|e| self.decoder.error(key, what, &e.0)),
        }
    }

    /// Whether `expr`'s first output is true in jq's sense.
    fn holds(&self, key: &str, expr: &'s Expr) -> Result<bool, DecodeError> {
        Ok(self
            .first(key, "match", expr)?
            .is_some_and(|v| !matches!(*v, Value::Null | Value::Bool(false))))
    }

    /// A string, a number as its JSON text, or nothing (null, no output, `""`).
    fn text(&self, key: &str, what: &str, expr: &'s Expr) -> Result<Option<String>, DecodeError> {
        match self.first(key, what, expr)?.as_deref() {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok((!s.is_empty()).then(|| s.clone())),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(other) => Err(self.decoder.error(
                key,
                what,
                &format!("gave {}, not a string", crate::json_kind(other)),
            )),
        }
    }
}

/// Where an event's `data` comes from once its other fields are known.
enum Data<'s> {
    /// Moved out of the frame at these keys (`[]`: the whole frame).
    Take(&'s [String]),
    /// Built by the expression.
    Built(Value),
}

/// An event with everything but its id and `data`, which need the frame by value.
struct Plan<'s> {
    event_type: String,
    subject: Option<String>,
    time: Option<chrono::DateTime<chrono::Utc>>,
    provider_id: Option<String>,
    sequence: Option<Sequence>,
    reply: Option<String>,
    data: Data<'s>,
}

impl Plan<'_> {
    /// The event, `data` moved out of (or built from) `value`; `content_id` gives the id
    /// when the provider's is absent.
    fn into_event(
        self,
        value: &mut Value,
        content_id: impl FnOnce(&Value) -> String,
    ) -> FrameEvent {
        let (id, id_from_content) = match self.provider_id {
            Some(id) => (id, false),
            None => (content_id(value), true),
        };
        let data = match self.data {
            Data::Built(v) => v,
            Data::Take(keys) => {
                let mut at = Some(value);
                for k in keys {
                    at = at.and_then(|v| v.get_mut(k.as_str()));
                }
                at.map(Value::take).unwrap_or(Value::Null)
            }
        };
        FrameEvent {
            event: DecodedEvent {
                id,
                id_from_content,
                event_type: self.event_type,
                subject: self.subject,
                time: self.time,
                data,
            },
            sequence: self.sequence,
            reply: self.reply,
        }
    }
}

impl Decoder {
    /// Classifies and decodes one text frame; an event's sequence number with it when its
    /// rule has one. A `split` frame gives its first item (none: the frame is taken as a
    /// `reply` control frame); [`Decoder::decode_frame`] gives them all.
    pub(crate) fn decode(&self, text: &str) -> Result<(Inbound, Option<Sequence>), DecodeError> {
        Ok(match self.decode_frame(text, usize::MAX)? {
            Decoded::Control(c) => (Inbound::Control(c), None),
            Decoded::Events(events) => match events.into_iter().next() {
                Some(e) => (Inbound::Event(e.event), e.sequence),
                None => (Inbound::Control(Control::Reply), None),
            },
        })
    }

    /// Classifies and decodes one text frame into a control frame or its events (a `split`
    /// rule's items, at most `max_events` of them: more is a decode error).
    pub(crate) fn decode_frame(
        &self,
        text: &str,
        max_events: usize,
    ) -> Result<Decoded, DecodeError> {
        for rule in &self.dialect.controls {
            if let Matcher::Text(t) = &rule.matcher {
                if t == text {
                    return Ok(Decoded::Control(plain_control(rule.kind)));
                }
            }
        }
        let mut value: Value = serde_json::from_str(text)
            .map_err(|e| DecodeError::new(format!("frame is not valid JSON: {e}")))?;
        let (rule, items) = {
            let frame = Frame {
                decoder: self,
                value: &value,
                vars: &self.vars,
                values: &self.values,
                jq: OnceCell::new(),
            };
            match self.classify(&frame)? {
                Classified::Control(c) => return Ok(Decoded::Control(c)),
                Classified::Unknown => (None, None),
                Classified::Event(rule) => match &rule.split {
                    Some(split) => (
                        Some(rule),
                        Some(self.items(rule, split, &frame, max_events)?),
                    ),
                    None => {
                        let plan = self.event(rule, &frame)?;
                        drop(frame);
                        let event = plan.into_event(&mut value, |v| self.content_id(v));
                        return Ok(Decoded::Events(vec![event]));
                    }
                },
            }
        };
        match (rule, items) {
            (Some(rule), Some(items)) => self.split(rule, value, items).map(Decoded::Events),
            _ => Ok(Decoded::Events(vec![FrameEvent {
                event: DecodedEvent {
                    id: self.content_id(&value),
                    id_from_content: true,
                    event_type: format!("{}.unknown", self.dialect.name),
                    subject: None,
                    time: None,
                    data: value,
                },
                sequence: None,
                reply: None,
            }])),
        }
    }

    /// The digest id of a frame's content (see `crate::event_id`).
    fn content_id(&self, value: &Value) -> String {
        crate::event_id(&self.dialect.name, &self.host, value)
    }

    /// A split rule's items on `frame`, at most `max_events`.
    fn items<'s: 'f, 'f>(
        &'s self,
        rule: &'s EventRule,
        split: &'s Expr,
        frame: &Frame<'s, 'f>,
        max_events: usize,
    ) -> Result<Vec<Value>, DecodeError> {
        let input = frame.jq.get_or_init(|| to_jaq(frame.value)).clone();
        let items = split
            .first_n(input, frame.vars, max_events.saturating_add(1))
            .map_err(|e| self.error(&rule.key, "split", &e.0))?;
        if items.len() > max_events {
            return Err(self.error(
                &rule.key,
                "split",
                &format!("gave more than limits.max_split_events ({max_events}) items"),
            ));
        }
        items
            .iter()
            .map(|v| from_jaq(v).map_err(|e| self.error(&rule.key, "split", &e.0)))
            .collect()
    }

    /// One event per item of a split frame, in order: in the rule's expressions `.` is the
    /// item and `$frame` the frame; without the provider's id, an item's id is derived from
    /// the frame's content id and the item's position.
    fn split(
        &self,
        rule: &EventRule,
        frame: Value,
        items: Vec<Value>,
    ) -> Result<Vec<FrameEvent>, DecodeError> {
        let frame_id = self.content_id(&frame);
        let mut vars = self.vars.clone();
        vars.push(to_jaq(&frame));
        let mut values = self.values.clone();
        values.push(frame);
        let mut out = Vec::with_capacity(items.len());
        for (i, mut item) in items.into_iter().enumerate() {
            let plan = {
                let f = Frame {
                    decoder: self,
                    value: &item,
                    vars: &vars,
                    values: &values,
                    jq: OnceCell::new(),
                };
                self.event(rule, &f)?
            };
            let index = u64::try_from(i).unwrap_or(u64::MAX);
            out.push(plan.into_event(&mut item, |_| crate::derived_id("split", &frame_id, index)));
        }
        Ok(out)
    }

    fn classify<'s: 'f, 'f>(
        &'s self,
        frame: &Frame<'s, 'f>,
    ) -> Result<Classified<'s>, DecodeError> {
        for rule in &self.dialect.controls {
            let Matcher::Jq(m) = &rule.matcher else {
                continue;
            };
            if frame.holds(&rule.key, m)? {
                return self.control(rule, frame).map(Classified::Control);
            }
        }
        for rule in &self.dialect.events {
            let taken = match &rule.matcher {
                None => true,
                Some(m) => frame.holds(&rule.key, m)?,
            };
            if taken {
                return Ok(Classified::Event(rule));
            }
        }
        Ok(Classified::Unknown)
    }

    fn error(&self, key: &str, what: &str, message: &str) -> DecodeError {
        DecodeError::new(format!(
            "{key}.{what}: {}",
            super::adapter::redact(&self.secrets, message)
        ))
    }

    fn control<'s: 'f, 'f>(
        &'s self,
        rule: &'s ControlRule,
        frame: &Frame<'s, 'f>,
    ) -> Result<Control, DecodeError> {
        let text_of = |what: &str, e: &'s Option<Expr>| -> Result<Option<String>, DecodeError> {
            Ok(match e {
                None => None,
                Some(e) => match frame.first(&rule.key, what, e)?.as_deref() {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(other) => Some(other.to_string()),
                },
            })
        };
        Ok(match rule.kind {
            ControlKind::AuthFailure => Control::AuthFailed {
                message: text_of("message", &rule.message)?
                    .unwrap_or_else(|| "(no message)".to_string()),
            },
            ControlKind::Error => Control::Error {
                code: text_of("code", &rule.code)?,
                message: text_of("message", &rule.message)?
                    .unwrap_or_else(|| "(no message)".to_string()),
            },
            kind => plain_control(kind),
        })
    }

    fn event<'s: 'f, 'f>(
        &'s self,
        rule: &'s EventRule,
        frame: &Frame<'s, 'f>,
    ) -> Result<Plan<'s>, DecodeError> {
        let key = rule.key.as_str();
        let event_type = match frame.first(key, "type", &rule.event_type)?.as_deref() {
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(self.error(
                    key,
                    "type",
                    &format!("gave {}, not a string", crate::json_kind(other)),
                ))
            }
            None => return Err(self.error(key, "type", "gave no output")),
        };
        let subject = match &rule.subject {
            Some(e) => frame.text(key, "subject", e)?,
            None => None,
        };
        let time = match &rule.time {
            Some(e) => frame
                .first(key, "time", e)?
                .and_then(|v| provider_time(&v, rule.time_unit)),
            None => None,
        };
        let provider_id = match &rule.id {
            Some(e) => frame.text(key, "id", e)?,
            None => None,
        };
        let sequence = match &rule.sequence {
            None => None,
            Some(e) => {
                let number = match frame.first(key, "sequence", e)?.as_deref() {
                    None | Some(Value::Null) => None,
                    Some(Value::Number(n)) => n.as_u64(),
                    Some(Value::String(s)) => s.trim().parse().ok(),
                    Some(_) => None,
                }
                .ok_or_else(|| self.error(key, "sequence", "gave no whole number >= 0"))?;
                let key = match &rule.sequence_key {
                    Some(k) => frame.text(key, "sequence_key", k)?.unwrap_or_default(),
                    None => String::new(),
                };
                Some(Sequence { key, number })
            }
        };
        let data = match &rule.data {
            None => Data::Take(&[]),
            Some(e) => match frame.first(key, "data", e)? {
                None => return Err(self.error(key, "data", "gave no output")),
                Some(Cow::Owned(v)) => Data::Built(v),
                Some(Cow::Borrowed(v)) => match &rule.data_path {
                    Some(keys) => Data::Take(keys),
                    None => Data::Built(v.clone()),
                },
            },
        };
        let reply = match &rule.reply {
            None => None,
            Some(e) => match frame.first(key, "reply", e)?.as_deref() {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(other) => Some(other.to_string()),
            },
        };
        Ok(Plan {
            reply,
            event_type: format!("{}.{event_type}", self.dialect.name),
            subject,
            time,
            provider_id,
            sequence,
            data,
        })
    }
}

enum Classified<'s> {
    Control(Control),
    /// The event rule that took the frame.
    Event(&'s EventRule),
    /// No rule took the frame.
    Unknown,
}

fn plain_control(kind: ControlKind) -> Control {
    match kind {
        ControlKind::Pong => Control::Pong,
        ControlKind::Greeting => Control::Connected,
        ControlKind::Reply => Control::Reply,
        ControlKind::Reconnect => Control::Reconnect,
        ControlKind::AuthFailure => Control::AuthFailed {
            message: "(no message)".to_string(),
        },
        ControlKind::Error => Control::Error {
            code: None,
            message: "(no message)".to_string(),
        },
    }
}

/// The instant a `time` value names, `None` when it names none (the receive time is used).
fn provider_time(v: &Value, unit: TimeUnit) -> Option<chrono::DateTime<chrono::Utc>> {
    match unit {
        TimeUnit::Seconds => crate::parse_provider_time(Some(v)),
        TimeUnit::Millis => {
            let ms: i64 = match v {
                Value::Number(n) => n.as_i64()?,
                Value::String(s) => s.trim().parse().ok()?,
                _ => return None,
            };
            chrono::DateTime::from_timestamp_millis(ms)
        }
    }
}
