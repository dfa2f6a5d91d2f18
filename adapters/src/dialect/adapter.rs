//! A dialect bound to one upstream's parameters: the [`Adapter`] the supervisor runs.
//!
//! Binding checks the parameters against `[params]` (required, default, `check`), evaluates
//! the connect URL once (its host goes into content-derived event ids, its redacted form into
//! logs and the status API) and the subscription items (shown in the status API), and tries
//! every frame the connection will send, so a parameter the dialect cannot use is refused
//! before the upstream starts, with its key.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use jaq_json::Val;
use serde_json::Value;
use tracing::warn;

use super::decode::Decoder;
use super::expr::{as_text, from_jaq, to_jaq, Expr};
use super::{ControlKind, Dialect, HeartbeatRule, ParamProblem};
use crate::{
    id_host, upgrade_request, Adapter, AdapterError, DecodeError, Greeting, Heartbeat, Inbound,
};

/// One upstream's parameter values for a dialect: `url` (when set) and the keys its
/// `[params]` declare. `Debug` shows the names only: values may be credentials.
#[derive(Clone, Default, PartialEq)]
pub struct Params {
    url: Option<String>,
    values: BTreeMap<String, Value>,
}

impl fmt::Debug for Params {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Params")
            .field("keys", &self.values.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Params {
    /// Parameters with the upstream's base URL (`$url`) and no other values yet.
    pub fn new(url: &url::Url) -> Self {
        Params {
            url: Some(url.as_str().to_string()),
            values: BTreeMap::new(),
        }
    }

    /// Parameters of an upstream without `url` (its dialect builds the URL from other
    /// parameters; `$url` is null).
    pub fn without_url() -> Self {
        Params::default()
    }

    /// Sets one parameter.
    pub fn set(&mut self, name: &str, value: Value) {
        self.values.insert(name.to_string(), value);
    }

    /// The value set for `name`, if any (not the dialect's default).
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.values.get(name)
    }

    /// Whether `url` is set.
    pub fn has_url(&self) -> bool {
        self.url.is_some()
    }
}

/// A dialect bound to one upstream.
pub struct DialectAdapter {
    bound: Bound,
}

/// Everything of a bound dialect but the provider it runs as.
struct Bound {
    decoder: Decoder,
    display_url: String,
    greeting: Greeting,
    /// The subscription items as shown (strings as they are, other values as JSON).
    subscriptions: Vec<String>,
    /// The same items as jq values, for `$item` / `$items`.
    items: Vec<Val>,
    /// `$prepared`: the last `[prepare]` answer (`null` before the first).
    prepared: std::sync::RwLock<Val>,
}

impl fmt::Debug for DialectAdapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DialectAdapter")
            .field("dialect", &self.bound.decoder.dialect.name)
            .field("url", &self.bound.display_url)
            .finish_non_exhaustive()
    }
}

impl DialectAdapter {
    /// Binds `dialect` to one upstream's `params`.
    pub fn bind(dialect: Arc<Dialect>, params: &Params) -> Result<Self, AdapterError> {
        Ok(DialectAdapter {
            bound: Bound::new(dialect, params)?,
        })
    }

    /// Checks `params` against `dialect` as [`DialectAdapter::bind`] does (every key, the
    /// connect URL, every frame the connection would send), without binding.
    pub fn check(dialect: Arc<Dialect>, params: &Params) -> Result<(), AdapterError> {
        Bound::new(dialect, params).map(|_| ())
    }

    /// The dialect this adapter runs.
    pub fn dialect(&self) -> &Arc<Dialect> {
        &self.bound.decoder.dialect
    }
}

impl Bound {
    fn new(dialect: Arc<Dialect>, params: &Params) -> Result<Self, AdapterError> {
        let (decoder, url) = decoder(dialect, params)?;
        let prepares = decoder.dialect.prepare.is_some();
        let greeting = if decoder
            .dialect
            .controls
            .iter()
            .any(|c| c.kind == ControlKind::Greeting)
        {
            Greeting::AwaitConnected
        } else {
            Greeting::Upgrade
        };
        let mut b = Bound {
            display_url: String::new(),
            greeting,
            subscriptions: Vec::new(),
            items: Vec::new(),
            prepared: std::sync::RwLock::new(Val::Null),
            decoder,
        };
        b.display_url = match &url {
            Some(url) => b.redact_url(url),
            None => "(the URL [prepare] answers)".to_string(),
        };
        b.items = b.subscription_items()?;
        b.subscriptions = b.items.iter().map(shown).collect();
        // Every frame this upstream will send, tried once now (with `[prepare]`, they depend
        // on its answer: they are built, and can fail, on every connect).
        if !prepares {
            b.connect_request()?;
            b.frames_for(false, &b.items)?;
            b.frames_for(true, &b.items)?;
            if let HeartbeatRule::Frame(e) = &b.decoder.dialect.heartbeat {
                b.send_frames(e, None)
                    .map_err(|reason| invalid("heartbeat.frame", reason))?;
            }
        }
        Ok(b)
    }

    /// The values of the send expressions' variables: the parameters and `$prepared`.
    fn vars(&self) -> Vec<Val> {
        let prepared = self.prepared.read().map_or(Val::Null, |p| p.clone());
        let mut v = self.decoder.vars.clone();
        v.push(prepared);
        v
    }

    fn connect_url(&self) -> Result<url::Url, AdapterError> {
        connect_url(&self.decoder, &self.vars())
    }

    fn subscription_items(&self) -> Result<Vec<Val>, AdapterError> {
        let Some(sub) = &self.decoder.dialect.subscribe else {
            return Ok(Vec::new());
        };
        sub.each
            .all(Val::Null, &self.vars())
            .map_err(|e| invalid("subscribe", self.redact(&format!("[subscribe] each: {e}"))))
    }

    /// The frames that (un)subscribe `items`.
    fn frames_for(&self, unsubscribe: bool, items: &[Val]) -> Result<Vec<String>, AdapterError> {
        let Some(sub) = &self.decoder.dialect.subscribe else {
            return Ok(Vec::new());
        };
        let (expr, key) = if unsubscribe {
            match &sub.unsubscribe {
                Some(e) => (e, "subscribe.unsubscribe"),
                None => return Ok(Vec::new()),
            }
        } else {
            (&sub.frame, "subscribe.frame")
        };
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        if sub.batch {
            let all: Val = items.iter().cloned().collect();
            out.extend(
                self.send_frames(expr, Some(all))
                    .map_err(|r| invalid(key, r))?,
            );
        } else {
            for item in items {
                out.extend(
                    self.send_frames(expr, Some(item.clone()))
                        .map_err(|r| invalid(key, r))?,
                );
            }
        }
        Ok(out)
    }

    /// Every output of a frame expression as the text to send: a string as it is, any other
    /// value as JSON. `extra` is the value of `$item` / `$items`.
    fn send_frames(&self, expr: &Expr, extra: Option<Val>) -> Result<Vec<String>, String> {
        let mut vars = self.vars();
        vars.extend(extra);
        let outputs = expr.all(Val::Null, &vars).map_err(|e| self.redact(&e.0))?;
        outputs
            .iter()
            .map(|v| match as_text(v) {
                Some(text) => Ok(text),
                None => from_jaq(v)
                    .map(|j| j.to_string())
                    .map_err(|e| self.redact(&e.0)),
            })
            .collect()
    }

    /// The subscription items named by `subs` (as shown), as jq values.
    fn items_named(&self, subs: &[String]) -> Vec<Val> {
        subs.iter()
            .map(|s| {
                self.subscriptions
                    .iter()
                    .position(|shown| shown == s)
                    .and_then(|i| self.items.get(i).cloned())
                    .unwrap_or_else(|| Val::from(s.clone()))
            })
            .collect()
    }

    fn redact(&self, text: &str) -> String {
        redact(&self.decoder.secrets, text)
    }

    /// The URL for logs: every query value and path segment that holds a secret, and any
    /// password, replaced by `***`.
    fn redact_url(&self, url: &url::Url) -> String {
        let secret_in = |v: &str| {
            self.decoder
                .secrets
                .iter()
                .any(|s| !s.is_empty() && v.contains(s.as_str()))
        };
        let mut u = url.clone();
        if url.query().is_some() {
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(k, v)| {
                    let v = if secret_in(&v) {
                        "***".to_string()
                    } else {
                        v.into_owned()
                    };
                    (k.into_owned(), v)
                })
                .collect();
            u.query_pairs_mut().clear().extend_pairs(pairs);
        }
        if let Some(segments) = url.path_segments() {
            let segments: Vec<String> = segments.map(percent_decode).collect();
            if segments.iter().any(|s| secret_in(s)) {
                if let Ok(mut out) = u.path_segments_mut() {
                    out.clear().extend(segments.iter().map(|s| {
                        if secret_in(s) {
                            "***"
                        } else {
                            s.as_str()
                        }
                    }));
                }
            }
        }
        if u.password().is_some() {
            let _ = u.set_password(Some("***"));
        }
        u.to_string().replace("%2A%2A%2A", "***")
    }
}

/// Every problem with `params` for `dialect` (see [`Dialect::param_problems`]).
pub(super) fn param_problems(dialect: &Dialect, params: &Params) -> Vec<ParamProblem> {
    let mut out = Vec::new();
    let mut problem = |key: &str, reason: String| {
        out.push(ParamProblem {
            key: key.to_string(),
            reason,
        })
    };
    for name in params.values.keys() {
        if !dialect.params.iter().any(|p| &p.name == name) {
            let known: Vec<&str> = dialect.params.iter().map(|p| p.name.as_str()).collect();
            problem(
                name,
                format!(
                    "not a parameter of the {} dialect (it takes {})",
                    dialect.name,
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            );
        }
    }
    if dialect.uses_url && params.url.is_none() {
        problem(
            "url",
            format!(
                "the {} dialect builds its connect URL from `url`; set it",
                dialect.name
            ),
        );
    }
    let mut secrets = Vec::new();
    for p in dialect.params.iter().filter(|p| p.secret) {
        if let Some(v) = params.values.get(&p.name) {
            collect_strings(v, &mut secrets);
        }
    }
    for p in &dialect.params {
        let Some(value) = params.values.get(&p.name) else {
            if p.required {
                problem(
                    &p.name,
                    format!("the {} dialect needs `{}`", dialect.name, p.name),
                );
            }
            continue;
        };
        if !p.kind.accepts(value) {
            problem(
                &p.name,
                format!("is {}, expected {}", crate::json_kind(value), p.kind.name()),
            );
            continue;
        }
        if let Some(check) = &p.check {
            if let Err(reason) = check_param(check, &to_jaq(value), &secrets) {
                problem(&p.name, reason);
            }
        }
    }
    out
}

/// The decoder for `dialect` with `params` checked and bound, and the connect URL (`None`
/// when it depends on the `[prepare]` answer).
pub(crate) fn decoder(
    dialect: Arc<Dialect>,
    params: &Params,
) -> Result<(Decoder, Option<url::Url>), AdapterError> {
    if let Some(p) = param_problems(&dialect, params).into_iter().next() {
        let required = dialect
            .params
            .iter()
            .any(|d| d.name == p.key && d.required && !params.values.contains_key(&p.key));
        return Err(if required {
            AdapterError::Missing {
                provider: dialect.name.clone(),
                key: p.key,
            }
        } else {
            AdapterError::Invalid {
                key: p.key,
                reason: p.reason,
            }
        });
    }
    let mut values = vec![params.url.clone().map_or(Value::Null, Value::String)];
    let mut secrets = Vec::new();
    for p in &dialect.params {
        let value = match params.values.get(&p.name).or(p.default.as_ref()) {
            Some(v) => v.clone(),
            None => Value::Null,
        };
        if p.secret {
            collect_strings(&value, &mut secrets);
        }
        values.push(value);
    }
    let mut decoder = Decoder {
        vars: values.iter().map(to_jaq).collect(),
        values,
        host: String::new(),
        secrets,
        dialect,
    };
    // The URL as it is before any `[prepare]` answer (`$prepared` null): with `[prepare]`,
    // one that needs the answer is known only when connecting (content ids then omit the
    // host).
    let mut vars = decoder.vars.clone();
    vars.push(Val::Null);
    let url = match connect_url(&decoder, &vars) {
        Ok(url) => Some(url),
        Err(_) if decoder.dialect.prepare.is_some() => None,
        Err(e) => return Err(e),
    };
    decoder.host = url.as_ref().map(id_host).unwrap_or_default();
    Ok((decoder, url))
}

/// Evaluates `[connect] url` with the send expressions' variables `vars`.
fn connect_url(d: &Decoder, vars: &[Val]) -> Result<url::Url, AdapterError> {
    let v = d
        .dialect
        .connect
        .url
        .first(Val::Null, vars)
        .map_err(|err| invalid("url", redact(&d.secrets, &format!("[connect] url: {err}"))))?;
    let text = v
        .as_ref()
        .and_then(as_text)
        .ok_or_else(|| invalid("url", "[connect] url gave no string".to_string()))?;
    url::Url::parse(&text).map_err(|err| {
        invalid(
            "url",
            redact(
                &d.secrets,
                &format!("[connect] url gave {text:?}, not a URL: {err}"),
            ),
        )
    })
}

/// `text` with every secret value (as written, form-encoded or percent-encoded) replaced by
/// `***`.
pub(super) fn redact(secrets: &[String], text: &str) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        for form in [
            s.clone(),
            url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>(),
            percent_encode_all(s),
        ] {
            out = out.replace(&form, "***");
        }
    }
    out
}

fn invalid(key: &str, reason: String) -> AdapterError {
    AdapterError::Invalid {
        key: key.to_string(),
        reason,
    }
}

/// Runs a parameter's `check`: an error it raises, or a `false` output, refuses the value.
fn check_param(check: &Expr, value: &Val, secrets: &[String]) -> Result<(), String> {
    let outputs = check
        .all(value.clone(), &[])
        .map_err(|e| redact(secrets, &e.0))?;
    if outputs.iter().any(|v| matches!(v, Val::Bool(false))) {
        return Err("refused by the dialect's check".to_string());
    }
    Ok(())
}

fn collect_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|i| collect_strings(i, out)),
        Value::Object(m) => m.values().for_each(|i| collect_strings(i, out)),
        _ => {}
    }
}

/// Every byte outside `A-Za-z0-9-_.~` percent-encoded (what jq's `@uri` writes).
fn percent_encode_all(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `%XX` sequences decoded (invalid UTF-8 replaced); anything else kept.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// jq truthiness: everything but `false` and `null`.
fn truthy(v: &Val) -> bool {
    !matches!(v, Val::Null | Val::Bool(false))
}

/// A subscription item as shown in the status API.
fn shown(v: &Val) -> String {
    as_text(v).unwrap_or_else(|| v.to_string())
}

impl Bound {
    fn connect_request(&self) -> Result<http::Request<()>, AdapterError> {
        let url = self.connect_url()?;
        let mut req = upgrade_request(&url)?;
        for (name, e) in &self.decoder.dialect.connect.headers {
            let key = format!("connect.headers.{name}");
            let value = e
                .first(Val::Null, &self.vars())
                .map_err(|err| invalid(&key, self.redact(&err.0)))?
                .as_ref()
                .and_then(as_text)
                .ok_or_else(|| invalid(&key, "gave no string".to_string()))?;
            let value = http::HeaderValue::from_str(&value)
                .map_err(|_| invalid(&key, "not a valid header value".to_string()))?;
            let name = http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| invalid(&key, "not a valid header name".to_string()))?;
            req.headers_mut().insert(name, value);
        }
        Ok(req)
    }

    fn prepare_request(&self) -> Option<Result<http::Request<Vec<u8>>, AdapterError>> {
        let p = self.decoder.dialect.prepare.as_ref()?;
        Some(self.build_prepare(p))
    }

    fn build_prepare(&self, p: &super::Prepare) -> Result<http::Request<Vec<u8>>, AdapterError> {
        let vars = &self.decoder.vars;
        let text = |key: &str, e: &Expr| -> Result<String, AdapterError> {
            e.first(Val::Null, vars)
                .map_err(|err| invalid(key, self.redact(&err.0)))?
                .as_ref()
                .and_then(as_text)
                .ok_or_else(|| invalid(key, "gave no string".to_string()))
        };
        let url = text("prepare.url", &p.url)?;
        let url = url::Url::parse(&url).map_err(|e| {
            invalid(
                "prepare.url",
                self.redact(&format!("gave {url:?}, not a URL: {e}")),
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid(
                "prepare.url",
                format!("{}: not an http(s) URL", self.redact_url(&url)),
            ));
        }
        let mut req = http::Request::builder()
            .method(p.method.clone())
            .uri(url.as_str());
        for (name, e) in &p.headers {
            let key = format!("prepare.headers.{name}");
            let value = http::HeaderValue::from_str(&text(&key, e)?)
                .map_err(|_| invalid(&key, "not a valid header value".to_string()))?;
            req = req.header(name.as_str(), value);
        }
        let body = match &p.body {
            None => Vec::new(),
            Some(e) => {
                let v = e
                    .first(Val::Null, vars)
                    .map_err(|err| invalid("prepare.body", self.redact(&err.0)))?
                    .unwrap_or(Val::Null);
                match as_text(&v) {
                    Some(t) => t.into_bytes(),
                    None => {
                        req = req.header(http::header::CONTENT_TYPE, "application/json");
                        from_jaq(&v)
                            .map_err(|err| invalid("prepare.body", self.redact(&err.0)))?
                            .to_string()
                            .into_bytes()
                    }
                }
            }
        };
        req.body(body)
            .map_err(|e| invalid("prepare", self.redact(&e.to_string())))
    }

    fn prepared(&self, status: u16, body: &[u8]) -> Result<(), crate::PrepareRefused> {
        use crate::PrepareRefused;
        if status == 401 || status == 403 {
            return Err(PrepareRefused::Auth(format!(
                "[prepare] answered HTTP {status}"
            )));
        }
        if !(200..300).contains(&status) {
            return Err(PrepareRefused::Failed(format!(
                "[prepare] answered HTTP {status}"
            )));
        }
        let answer: Value = serde_json::from_slice(body)
            .map_err(|e| PrepareRefused::Failed(format!("[prepare] answer is not JSON: {e}")))?;
        let answer = to_jaq(&answer);
        if let Some(fail) = self
            .decoder
            .dialect
            .prepare
            .as_ref()
            .and_then(|p| p.fail.as_ref())
        {
            match fail.first(answer.clone(), &self.decoder.vars) {
                Ok(Some(v)) if truthy(&v) => {
                    return Err(PrepareRefused::Auth(
                        "[prepare] fail: the answer refuses the credentials".to_string(),
                    ))
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(PrepareRefused::Failed(format!(
                        "[prepare] fail: {}",
                        self.redact(&e.0)
                    )))
                }
            }
        }
        if let Ok(mut p) = self.prepared.write() {
            *p = answer;
        }
        Ok(())
    }

    fn subscribe_frames(&self, subs: &[String]) -> Vec<String> {
        self.frames_for(false, &self.items_named(subs))
            .unwrap_or_else(|e| {
                warn!(dialect = %self.decoder.dialect.name, error = %e, "cannot build the subscribe frames");
                Vec::new()
            })
    }

    fn unsubscribe_frames(&self, subs: &[String]) -> Vec<String> {
        self.frames_for(true, &self.items_named(subs))
            .unwrap_or_else(|e| {
                warn!(dialect = %self.decoder.dialect.name, error = %e, "cannot build the unsubscribe frames");
                Vec::new()
            })
    }

    fn heartbeat(&self, _now_unix: i64) -> Heartbeat {
        match &self.decoder.dialect.heartbeat {
            HeartbeatRule::Protocol => Heartbeat::Protocol,
            HeartbeatRule::Text(t) => Heartbeat::Text(t.clone()),
            HeartbeatRule::Frame(e) => match self.send_frames(e, None) {
                Ok(frames) => match frames.into_iter().next() {
                    Some(frame) => Heartbeat::Text(frame),
                    None => {
                        warn!(dialect = %self.decoder.dialect.name, "heartbeat.frame gave no frame; sending a protocol ping");
                        Heartbeat::Protocol
                    }
                },
                Err(e) => {
                    warn!(dialect = %self.decoder.dialect.name, error = %e, "heartbeat.frame failed; sending a protocol ping");
                    Heartbeat::Protocol
                }
            },
        }
    }
}

impl Adapter for DialectAdapter {
    fn provider(&self) -> &str {
        &self.bound.decoder.dialect.name
    }

    fn connect_request(&self) -> Result<http::Request<()>, AdapterError> {
        self.bound.connect_request()
    }

    fn display_url(&self) -> String {
        self.bound.display_url.clone()
    }

    fn prepare_request(&self) -> Option<Result<http::Request<Vec<u8>>, AdapterError>> {
        self.bound.prepare_request()
    }

    fn prepared(&self, status: u16, body: &[u8]) -> Result<(), crate::PrepareRefused> {
        self.bound.prepared(status, body)
    }

    fn prepare_refresh(&self) -> Option<std::time::Duration> {
        self.bound.decoder.dialect.prepare.as_ref()?.refresh
    }

    fn greeting(&self) -> Greeting {
        self.bound.greeting
    }

    fn subscriptions(&self) -> &[String] {
        &self.bound.subscriptions
    }

    fn subscribe_frames(&self, subs: &[String]) -> Vec<String> {
        self.bound.subscribe_frames(subs)
    }

    fn unsubscribe_frames(&self, subs: &[String]) -> Vec<String> {
        self.bound.unsubscribe_frames(subs)
    }

    fn heartbeat(&self, now_unix: i64) -> Heartbeat {
        self.bound.heartbeat(now_unix)
    }

    fn session_steps(&self) -> usize {
        self.bound.decoder.dialect.session.len()
    }

    fn session_send(&self, step: usize) -> Result<Vec<String>, AdapterError> {
        let Some(s) = self.bound.decoder.dialect.session.get(step) else {
            return Ok(Vec::new());
        };
        match &s.send {
            None => Ok(Vec::new()),
            Some(e) => self
                .bound
                .send_frames(e, None)
                .map_err(|r| invalid(&format!("{}.send", s.key), r)),
        }
    }

    fn session_check(&self, step: usize, text: &str) -> crate::StepCheck {
        let Some(s) = self.bound.decoder.dialect.session.get(step) else {
            return crate::StepCheck::Other;
        };
        let Ok(frame) = serde_json::from_str::<Value>(text) else {
            return crate::StepCheck::Other;
        };
        let frame = to_jaq(&frame);
        let vars = self.bound.vars();
        let holds = |e: &Option<Expr>| {
            e.as_ref()
                .is_some_and(|e| matches!(e.first(frame.clone(), &vars), Ok(Some(v)) if truthy(&v)))
        };
        if holds(&s.fail) {
            crate::StepCheck::Failed(format!(
                "{}: the provider refused the step (its `fail` frame)",
                s.key
            ))
        } else if s.expect.is_none() || holds(&s.expect) {
            crate::StepCheck::Done
        } else {
            crate::StepCheck::Other
        }
    }

    fn session_timeout(&self, step: usize) -> Option<std::time::Duration> {
        let s = self.bound.decoder.dialect.session.get(step)?;
        s.expect.as_ref().map(|_| s.timeout)
    }

    fn ack_timeout(&self) -> Option<std::time::Duration> {
        let sub = self.bound.decoder.dialect.subscribe.as_ref()?;
        sub.ack.as_ref().map(|(_, t)| *t)
    }

    fn subscribe_acked(&self, text: &str, pending: &[String]) -> Vec<usize> {
        let Some((ack, _)) = self
            .bound
            .decoder
            .dialect
            .subscribe
            .as_ref()
            .and_then(|s| s.ack.as_ref())
        else {
            return Vec::new();
        };
        let Ok(frame) = serde_json::from_str::<Value>(text) else {
            return Vec::new();
        };
        let frame = to_jaq(&frame);
        let items = self.bound.items_named(pending);
        let mut vars = self.bound.vars();
        vars.push(Val::Null);
        let last = vars.len() - 1;
        let mut out = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            vars[last] = item;
            if matches!(ack.first(frame.clone(), &vars), Ok(Some(v)) if truthy(&v)) {
                out.push(i);
            }
        }
        out
    }

    fn binary_frames(&self) -> crate::BinaryFrames {
        self.bound.decoder.dialect.connect.binary
    }

    fn auth_failure_statuses(&self) -> &[u16] {
        &self.bound.decoder.dialect.connect.auth_failure_status
    }

    fn heartbeat_interval(&self) -> Option<std::time::Duration> {
        self.bound.decoder.dialect.heartbeat_interval
    }

    fn decode(&self, text: &str) -> Result<Inbound, DecodeError> {
        self.bound.decoder.decode(text).map(|(i, _)| i)
    }

    fn decode_frame(&self, text: &str, max_events: usize) -> Result<crate::Decoded, DecodeError> {
        self.bound.decoder.decode_frame(text, max_events)
    }
}
