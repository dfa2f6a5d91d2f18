//! One inbound frame → an event or a control frame, by the dialect's rules.
//!
//! Order: a `text` control that is the whole frame; else the frame must be JSON (or it is a
//! decode error); then the `[[control]]` rules, first match wins; then the `[[events]]`
//! rules, first match wins; a JSON frame no rule takes is still an event,
//! `<dialect>.unknown`, with the whole frame as `data`. An expression that fails on the frame
//! makes the frame a decode error (counted and skipped by the caller); nothing else is lost.
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
use crate::{Control, DecodeError, DecodedEvent, Inbound, Sequence};

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

/// One frame being decoded: the parsed frame and, once an expression needs it, its jaq form.
struct Frame<'s, 'f> {
    decoder: &'s Decoder,
    value: &'f Value,
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
            let mut scope = Scope::new(&self.decoder.values);
            if let Ok(v) = native::eval(n, &Cow::Borrowed(self.value), &mut scope) {
                return Ok(v);
            }
        }
        let input = self.jq.get_or_init(|| to_jaq(self.value)).clone();
        let out = expr
            .first(input, &self.decoder.vars)
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
    data: Data<'s>,
}

impl Decoder {
    /// Classifies and decodes one text frame; an event's sequence number with it when its
    /// rule has one.
    pub(crate) fn decode(&self, text: &str) -> Result<(Inbound, Option<Sequence>), DecodeError> {
        for rule in &self.dialect.controls {
            if let Matcher::Text(t) = &rule.matcher {
                if t == text {
                    return Ok((Inbound::Control(plain_control(rule.kind)), None));
                }
            }
        }
        let mut value: Value = serde_json::from_str(text)
            .map_err(|e| DecodeError::new(format!("frame is not valid JSON: {e}")))?;
        let plan = {
            let frame = Frame {
                decoder: self,
                value: &value,
                jq: OnceCell::new(),
            };
            match self.classify(&frame)? {
                Classified::Control(c) => return Ok((Inbound::Control(c), None)),
                Classified::Event(plan) => plan,
            }
        };
        let Some(plan) = plan else {
            let event = DecodedEvent {
                id: crate::event_id(&self.dialect.name, &self.host, &value),
                id_from_content: true,
                event_type: format!("{}.unknown", self.dialect.name),
                subject: None,
                time: None,
                data: value,
            };
            return Ok((Inbound::Event(event), None));
        };
        let (id, id_from_content) = match plan.provider_id {
            Some(id) => (id, false),
            None => (
                crate::event_id(&self.dialect.name, &self.host, &value),
                true,
            ),
        };
        let data = match plan.data {
            Data::Built(v) => v,
            Data::Take(keys) => {
                let mut at = Some(&mut value);
                for k in keys {
                    at = at.and_then(|v| v.get_mut(k.as_str()));
                }
                at.map(Value::take).unwrap_or(Value::Null)
            }
        };
        let event = DecodedEvent {
            id,
            id_from_content,
            event_type: plan.event_type,
            subject: plan.subject,
            time: plan.time,
            data,
        };
        Ok((Inbound::Event(event), plan.sequence))
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
                return self.event(rule, frame).map(|p| Classified::Event(Some(p)));
            }
        }
        Ok(Classified::Event(None))
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
        Ok(Plan {
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
    /// `None`: no rule took the frame.
    Event(Option<Plan<'s>>),
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
