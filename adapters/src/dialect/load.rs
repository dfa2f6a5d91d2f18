//! Dialect file → [`Dialect`]: every section checked, every expression compiled, every
//! problem collected with its key before the file is refused.

use std::time::Duration;

use serde_json::Value;

use super::examples::Example;
use super::expr::Expr;
use super::file::{
    ConnectDecl, ControlDecl, DialectFile, EventDecl, ExampleDecl, HeartbeatDecl, ParamDecl,
    PrepareDecl, SessionDecl, SubscribeDecl,
};
use super::{
    send_var_names, var_names, Connect, ControlKind, ControlRule, Dialect, DialectError, EventRule,
    HeartbeatRule, Matcher, Ownership, Param, ParamKind, Prepare, Problem, SessionStep, Subscribe,
    TimeUnit,
};
use sha2::Digest;

/// Parameter names an upstream already uses for something else, or that the engine binds.
const RESERVED: [&str; 15] = [
    "name",
    "adapter",
    "url",
    "backoff_initial",
    "backoff_max",
    "ping_interval",
    "stale_after",
    "healthy_after",
    "connect_timeout",
    "ownership",
    "item",
    "items",
    "frame",
    "prepared",
    "now",
];

/// Collects problems while the file is walked.
struct Checker {
    problems: Vec<Problem>,
    /// Whether an expression compiled so far reads `$url`.
    uses_url: bool,
}

impl Checker {
    fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    /// Compiles `code` found at `key`; a failure is recorded and gives `None`.
    fn expr(&mut self, key: &str, code: &str, vars: &[String]) -> Option<Expr> {
        let vars: Vec<&str> = vars.iter().map(String::as_str).collect();
        if reads_url(code) {
            self.uses_url = true;
        }
        match Expr::compile(code, &vars) {
            Ok(e) => Some(e),
            Err(e) => {
                self.problem(key, format!("jq: {e} in {code:?}"));
                None
            }
        }
    }
}

pub(super) fn load(origin: &str, text: &str) -> Result<Dialect, DialectError> {
    let refuse = |problems| DialectError {
        origin: origin.to_string(),
        problems,
    };
    let file: DialectFile = toml::from_str(text).map_err(|e| {
        refuse(vec![Problem {
            key: String::new(),
            message: e.to_string().trim_end().to_string(),
        }])
    })?;
    let mut c = Checker {
        problems: Vec::new(),
        uses_url: false,
    };

    let (name, description, ownership) = match file.dialect {
        Some(h) => {
            if !valid_name(&h.name) {
                c.problem(
                    "dialect.name",
                    format!(
                        "{:?}: use lower-case letters, digits, '-' and '_', starting with a letter (it prefixes every event type)",
                        h.name
                    ),
                );
            }
            let ownership = match h.ownership.as_deref() {
                None | Some("all") => Ownership::All,
                Some("lease") => Ownership::Lease,
                Some(other) => {
                    c.problem(
                        "dialect.ownership",
                        format!("{other:?}: expected \"all\" or \"lease\""),
                    );
                    Ownership::All
                }
            };
            (h.name, h.description, ownership)
        }
        None => {
            c.problem("dialect", "missing section [dialect] (with `name`)");
            (String::new(), String::new(), Ownership::All)
        }
    };

    let params = params(&mut c, file.params);
    let vars = var_names(&params);
    let prepare = file.prepare.and_then(|decl| prepare(&mut c, decl, &vars));
    // What the connection sends may read `$prepared` too.
    let vars = send_var_names(&params);
    let session = each(&mut c, file.session, &vars, session_step);

    let connect = match file.connect {
        Some(decl) => connect(&mut c, decl, &vars),
        None => {
            c.problem("connect", "missing section [connect] (with `url`)");
            None
        }
    };
    let subscribe = file
        .subscribe
        .and_then(|decl| subscribe(&mut c, decl, &vars));
    let heartbeat_interval = file
        .heartbeat
        .as_ref()
        .and_then(|h| h.interval.as_deref())
        .and_then(|text| duration(&mut c, "heartbeat.interval", text, HEARTBEAT_BOUNDS));
    let heartbeat = match file.heartbeat {
        Some(decl) => heartbeat(&mut c, decl, &vars),
        None => Some(HeartbeatRule::Protocol),
    };
    let vars = var_names(&params);
    let controls = each(&mut c, file.control, &vars, control);
    let events = each(&mut c, file.events, &vars, event);
    let examples: Vec<Example> = file
        .examples
        .into_iter()
        .enumerate()
        .filter_map(|(i, decl)| example(&mut c, i, decl))
        .collect();

    match (connect, heartbeat) {
        (Some(connect), Some(heartbeat)) if c.problems.is_empty() => Ok(Dialect {
            origin: origin.to_string(),
            name,
            description,
            ownership,
            uses_url: c.uses_url,
            fingerprint: sha2::Sha256::digest(text.as_bytes()).into(),
            params,
            prepare,
            connect,
            session,
            subscribe,
            heartbeat,
            heartbeat_interval,
            controls,
            events,
            examples,
        }),
        _ => Err(refuse(c.problems)),
    }
}

/// Every entry of an array of tables (`[[session]]`, `[[control]]`, `[[events]]`) compiled by
/// `compile`, which records the problems of the entries it refuses.
fn each<D, T>(
    c: &mut Checker,
    decls: Vec<D>,
    vars: &[String],
    compile: fn(&mut Checker, usize, D, &[String]) -> Option<T>,
) -> Vec<T> {
    decls
        .into_iter()
        .enumerate()
        .filter_map(|(i, decl)| compile(c, i, decl, vars))
        .collect()
}

/// Whether jq `code` mentions the variable `$url` (a mention inside a string literal counts
/// too: then `url` is required without need, which is safe).
fn reads_url(code: &str) -> bool {
    code.match_indices("$url").any(|(i, m)| {
        !code[i + m.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

/// The range `[heartbeat] interval` may take (the same as an upstream's `ping_interval`).
const HEARTBEAT_BOUNDS: (Duration, Duration) =
    (Duration::from_millis(10), Duration::from_secs(3600));

/// A duration written like `"20s"` or `"500ms"`, within `bounds`; a problem at `key` otherwise.
fn duration(
    c: &mut Checker,
    key: &str,
    text: &str,
    (min, max): (Duration, Duration),
) -> Option<Duration> {
    match humantime::parse_duration(text) {
        Ok(d) if d >= min && d <= max => Some(d),
        Ok(_) => {
            c.problem(
                key,
                format!(
                    "{text:?}: must be between {} and {}",
                    humantime::format_duration(min),
                    humantime::format_duration(max)
                ),
            );
            None
        }
        Err(e) => {
            c.problem(
                key,
                format!("{text:?}: not a duration ({e}); write e.g. \"20s\""),
            );
            None
        }
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

fn valid_param_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn params(c: &mut Checker, decls: std::collections::BTreeMap<String, ParamDecl>) -> Vec<Param> {
    let mut out = Vec::new();
    for (name, decl) in decls {
        let key = format!("params.{name}");
        if !valid_param_name(&name) {
            c.problem(
                &key,
                "a parameter name is lower-case letters, digits and '_' (it becomes a jq variable)",
            );
            continue;
        }
        if RESERVED.contains(&name.as_str()) || name.starts_with("tls_") {
            c.problem(
                &key,
                format!("{name:?} is reserved (an upstream key or a variable the engine binds; `$url` is always available)"),
            );
            continue;
        }
        let default = match decl.default {
            Some(v) => match toml_to_json(v) {
                Ok(v) => Some(v),
                Err(e) => {
                    c.problem(format!("{key}.default"), e);
                    continue;
                }
            },
            None => None,
        };
        if decl.required && default.is_some() {
            c.problem(&key, "a required parameter has no default");
        }
        let kind = match (&decl.kind, &default) {
            (Some(k), _) => match ParamKind::parse(k) {
                Some(k) => k,
                None => {
                    c.problem(
                        format!("{key}.type"),
                        format!("{k:?}: expected \"string\", \"integer\", \"number\", \"boolean\", \"array\", \"table\" or \"any\""),
                    );
                    continue;
                }
            },
            (None, Some(d)) => ParamKind::of(d),
            (None, None) => ParamKind::String,
        };
        if let Some(d) = &default {
            if !kind.accepts(d) {
                c.problem(
                    format!("{key}.default"),
                    format!(
                        "is {}, but the parameter's type is {}",
                        crate::json_kind(d),
                        kind.name()
                    ),
                );
            }
        }
        let check = match decl.check {
            Some(code) => match c.expr(&format!("{key}.check"), &code, &[]) {
                Some(e) => Some(e),
                None => continue,
            },
            None => None,
        };
        out.push(Param {
            name,
            description: decl.description,
            required: decl.required,
            secret: decl.secret,
            unique: decl.unique,
            kind,
            default,
            check,
        });
    }
    out
}

/// The range `[prepare] refresh` may take.
const REFRESH_BOUNDS: (Duration, Duration) = (
    Duration::from_millis(10),
    Duration::from_secs(7 * 24 * 3600),
);

fn prepare(c: &mut Checker, decl: PrepareDecl, vars: &[String]) -> Option<Prepare> {
    let method = match decl.method.as_deref().unwrap_or("GET") {
        m @ ("GET" | "POST" | "PUT" | "PATCH" | "DELETE") => {
            http::Method::from_bytes(m.as_bytes()).ok()
        }
        other => {
            c.problem(
                "prepare.method",
                format!("{other:?}: expected \"GET\", \"POST\", \"PUT\", \"PATCH\" or \"DELETE\""),
            );
            None
        }
    };
    let url = c.expr("prepare.url", &decl.url, vars);
    let headers = headers(c, "prepare", decl.headers, vars);
    let body = match decl.body {
        Some(code) => Some(c.expr("prepare.body", &code, vars)?),
        None => None,
    };
    let fail = match decl.fail {
        Some(code) => Some(c.expr("prepare.fail", &code, vars)?),
        None => None,
    };
    let refresh = match decl.refresh {
        Some(text) => Some(duration(c, "prepare.refresh", &text, REFRESH_BOUNDS)?),
        None => None,
    };
    Some(Prepare {
        method: method?,
        url: url?,
        headers,
        body,
        fail,
        refresh,
    })
}

/// `<section>.headers`: each name checked, each value compiled.
fn headers(
    c: &mut Checker,
    section: &str,
    decl: std::collections::BTreeMap<String, String>,
    vars: &[String],
) -> Vec<(String, Expr)> {
    let mut out = Vec::new();
    for (name, code) in decl {
        let key = format!("{section}.headers.{name}");
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            c.problem(&key, "not a valid HTTP header name");
            continue;
        }
        if let Some(e) = c.expr(&key, &code, vars) {
            out.push((name, e));
        }
    }
    out
}

fn connect(c: &mut Checker, decl: ConnectDecl, vars: &[String]) -> Option<Connect> {
    let binary = match decl.binary.as_deref() {
        None => crate::BinaryFrames::Text,
        Some(name) => match crate::BinaryFrames::parse(name) {
            Some(m) => m,
            None => {
                c.problem(
                    "connect.binary",
                    format!("{name:?}: expected \"reject\", \"text\", \"gzip\" or \"deflate\""),
                );
                crate::BinaryFrames::Text
            }
        },
    };
    let auth_failure_status = decl.auth_failure_status.unwrap_or_else(|| vec![401, 403]);
    for status in &auth_failure_status {
        if !(400..=599).contains(status) || *status == 429 {
            c.problem(
                "connect.auth_failure_status",
                format!("{status}: expected HTTP error statuses (400-599, not 429, which asks to retry later)"),
            );
        }
    }
    let url = c.expr("connect.url", &decl.url, vars);
    let headers = headers(c, "connect", decl.headers, vars);
    Some(Connect {
        url: url?,
        headers,
        auth_failure_status,
        binary,
    })
}

/// The default (and the bounds) of a `[[session]] timeout`.
const SESSION_TIMEOUT: Duration = Duration::from_secs(10);
const SESSION_TIMEOUT_BOUNDS: (Duration, Duration) =
    (Duration::from_millis(10), Duration::from_secs(300));

fn session_step(
    c: &mut Checker,
    i: usize,
    decl: SessionDecl,
    vars: &[String],
) -> Option<SessionStep> {
    let key = format!("session[{i}]");
    if decl.send.is_none() && decl.expect.is_none() {
        c.problem(
            &key,
            "needs `send` (a frame to send), `expect` (a frame to wait for), or both",
        );
        return None;
    }
    if decl.expect.is_none() && (decl.fail.is_some() || decl.timeout.is_some()) {
        c.problem(
            &key,
            "`fail` and `timeout` belong to a step that waits (`expect`)",
        );
    }
    let mut compile = |what: &str, code: Option<String>| match code {
        None => Ok(None),
        Some(code) => c
            .expr(&format!("{key}.{what}"), &code, vars)
            .map(Some)
            .ok_or(()),
    };
    let send = compile("send", decl.send);
    let expect = compile("expect", decl.expect);
    let fail = compile("fail", decl.fail);
    let timeout = match decl.timeout {
        None => Some(SESSION_TIMEOUT),
        Some(t) => duration(c, &format!("{key}.timeout"), &t, SESSION_TIMEOUT_BOUNDS),
    };
    Some(SessionStep {
        key,
        send: send.ok()?,
        expect: expect.ok()?,
        fail: fail.ok()?,
        timeout: timeout?,
    })
}

fn subscribe(c: &mut Checker, decl: SubscribeDecl, vars: &[String]) -> Option<Subscribe> {
    let each = c.expr("subscribe.each", &decl.each, vars);
    let mut item_vars = vars.to_vec();
    item_vars.push(if decl.batch { "$items" } else { "$item" }.to_string());
    let frame = c.expr("subscribe.frame", &decl.frame, &item_vars);
    let unsubscribe = match decl.unsubscribe {
        Some(code) => Some(c.expr("subscribe.unsubscribe", &code, &item_vars)?),
        None => None,
    };
    let mut ack_vars = vars.to_vec();
    ack_vars.push("$item".to_string());
    let ack_timeout = match decl.ack_timeout.as_deref() {
        None => Some(SESSION_TIMEOUT),
        Some(t) => duration(c, "subscribe.ack_timeout", t, SESSION_TIMEOUT_BOUNDS),
    };
    let ack = match (decl.ack, ack_timeout) {
        (Some(code), Some(t)) => Some((c.expr("subscribe.ack", &code, &ack_vars)?, t)),
        (None, _) if decl.ack_timeout.is_some() => {
            c.problem(
                "subscribe.ack_timeout",
                "belongs to `ack` (the acknowledgement to wait for)",
            );
            None
        }
        _ => None,
    };
    Some(Subscribe {
        each: each?,
        batch: decl.batch,
        frame: frame?,
        unsubscribe,
        ack,
    })
}

fn heartbeat(c: &mut Checker, decl: HeartbeatDecl, vars: &[String]) -> Option<HeartbeatRule> {
    match (decl.kind.as_str(), decl.frame, decl.text) {
        ("protocol", None, None) => Some(HeartbeatRule::Protocol),
        ("protocol", _, _) => {
            c.problem(
                "heartbeat",
                "kind = \"protocol\" sends WebSocket pings; `frame` and `text` belong to kind = \"app\"",
            );
            None
        }
        ("app", Some(code), None) => c
            .expr("heartbeat.frame", &code, vars)
            .map(HeartbeatRule::Frame),
        ("app", None, Some(text)) => Some(HeartbeatRule::Text(text)),
        ("app", _, _) => {
            c.problem(
                "heartbeat",
                "kind = \"app\" needs exactly one of `frame` (jq) or `text`",
            );
            None
        }
        (other, _, _) => {
            c.problem(
                "heartbeat.kind",
                format!("{other:?}: expected \"protocol\" or \"app\""),
            );
            None
        }
    }
}

fn control(c: &mut Checker, i: usize, decl: ControlDecl, vars: &[String]) -> Option<ControlRule> {
    let key = format!("control[{i}]");
    let kind = match decl.kind.as_deref().unwrap_or("reply") {
        "pong" => ControlKind::Pong,
        "greeting" => ControlKind::Greeting,
        "reply" => ControlKind::Reply,
        "auth_failure" => ControlKind::AuthFailure,
        "error" => ControlKind::Error,
        "reconnect" => ControlKind::Reconnect,
        other => {
            c.problem(
                format!("{key}.kind"),
                format!("{other:?}: expected \"pong\", \"greeting\", \"reply\", \"auth_failure\", \"error\" or \"reconnect\""),
            );
            return None;
        }
    };
    let matcher = match (decl.matches, decl.text) {
        (Some(code), None) => Matcher::Jq(c.expr(&format!("{key}.match"), &code, vars)?),
        (None, Some(text)) => Matcher::Text(text),
        _ => {
            c.problem(
                &key,
                "needs exactly one of `match` (jq, for JSON frames) or `text` (the whole frame)",
            );
            return None;
        }
    };
    let message = match decl.message {
        Some(code) => Some(c.expr(&format!("{key}.message"), &code, vars)?),
        None => None,
    };
    let code = match decl.code {
        Some(code) => Some(c.expr(&format!("{key}.code"), &code, vars)?),
        None => None,
    };
    if !matches!(kind, ControlKind::AuthFailure | ControlKind::Error)
        && (message.is_some() || code.is_some())
    {
        c.problem(
            &key,
            "`message` and `code` belong to kind \"auth_failure\" or \"error\"",
        );
    }
    if matches!(matcher, Matcher::Text(_)) && (message.is_some() || code.is_some()) {
        c.problem(
            &key,
            "a `text` control has no JSON to read `message` or `code` from",
        );
    }
    Some(ControlRule {
        key,
        matcher,
        kind,
        message,
        code,
    })
}

fn event(c: &mut Checker, i: usize, decl: EventDecl, vars: &[String]) -> Option<EventRule> {
    let key = format!("events[{i}]");
    if decl.sequence_key.is_some() && decl.sequence.is_none() {
        c.problem(
            format!("{key}.sequence_key"),
            "belongs to `sequence` (the number whose gaps are detected)",
        );
    }
    let splits = decl.split.is_some();
    let split = match decl.split {
        Some(code) => c.expr(&format!("{key}.split"), &code, vars).map(Some),
        None => Some(None),
    };
    // In a split rule's other expressions `.` is the item and `$frame` the whole frame.
    let mut rule_vars = vars.to_vec();
    if splits {
        rule_vars.push("$frame".to_string());
    }
    let vars = rule_vars.as_slice();
    let time_unit = match decl.time_unit.as_deref() {
        None | Some("s") => TimeUnit::Seconds,
        Some("ms") => TimeUnit::Millis,
        Some(other) => {
            c.problem(
                format!("{key}.time_unit"),
                format!("{other:?}: expected \"s\" or \"ms\""),
            );
            TimeUnit::Seconds
        }
    };
    let opt = |c: &mut Checker, name: &str, code: Option<String>| -> Result<Option<Expr>, ()> {
        match code {
            Some(code) => c
                .expr(&format!("{key}.{name}"), &code, vars)
                .map(Some)
                .ok_or(()),
            None => Ok(None),
        }
    };
    let matcher = opt(c, "match", decl.matches);
    let event_type = opt(c, "type", Some(decl.event_type));
    let subject = opt(c, "subject", decl.subject);
    let time = opt(c, "time", decl.time);
    let data = opt(c, "data", decl.data);
    let id = opt(c, "id", decl.id);
    let sequence = opt(c, "sequence", decl.sequence);
    let sequence_key = opt(c, "sequence_key", decl.sequence_key);
    let reply = opt(c, "reply", decl.reply);
    let data = data.ok()?;
    let data_path = data
        .as_ref()
        .and_then(Expr::native)
        .and_then(super::native::literal_path)
        .map(|keys| keys.into_iter().map(str::to_string).collect());
    Some(EventRule {
        key: key.clone(),
        data_path,
        matcher: matcher.ok()?,
        event_type: event_type.ok()??,
        subject: subject.ok()?,
        time: time.ok()?,
        time_unit,
        data,
        id: id.ok()?,
        sequence: sequence.ok()?,
        sequence_key: sequence_key.ok()?,
        split: split?,
        reply: reply.ok()?,
    })
}

fn example(c: &mut Checker, i: usize, decl: ExampleDecl) -> Option<Example> {
    let key = format!("examples[{i}]");
    let mut params = serde_json::Map::new();
    for (name, v) in decl.params {
        match toml_to_json(v) {
            Ok(v) => {
                params.insert(name, v);
            }
            Err(e) => c.problem(format!("{key}.params.{name}"), e),
        }
    }
    let outcomes = [
        decl.event_type.is_some(),
        decl.control.is_some(),
        decl.error == Some(true),
        decl.events.is_some(),
    ];
    if outcomes.iter().filter(|o| **o).count() != 1 {
        c.problem(
            &key,
            "says what the frame decodes to with exactly one of `type` (an event), `events` (a split frame's events), `control` (its kind) or `error = true`",
        );
        return None;
    }
    let event_fields = decl.subject.is_some()
        || decl.time.is_some()
        || decl.data.is_some()
        || decl.data_json.is_some()
        || decl.id.is_some();
    let expect = if let Some(event_type) = decl.event_type {
        super::examples::Expect::Event(event_expect(
            c,
            &key,
            super::file::ExampleEventDecl {
                event_type,
                subject: decl.subject,
                time: decl.time,
                data: decl.data,
                data_json: decl.data_json,
                id: decl.id,
            },
        )?)
    } else if let Some(events) = decl.events {
        let expects: Vec<_> = events
            .into_iter()
            .enumerate()
            .filter_map(|(j, e)| event_expect(c, &format!("{key}.events[{j}]"), e))
            .collect();
        if c.problems
            .iter()
            .any(|p| p.key.starts_with(&format!("{key}.")))
        {
            return None;
        }
        super::examples::Expect::Events(expects)
    } else if let Some(kind) = decl.control {
        if !matches!(
            kind.as_str(),
            "pong" | "greeting" | "reply" | "auth_failure" | "error"
        ) {
            c.problem(
                format!("{key}.control"),
                format!("{kind:?}: expected \"pong\", \"greeting\", \"reply\", \"auth_failure\" or \"error\""),
            );
            return None;
        }
        super::examples::Expect::Control(kind)
    } else {
        super::examples::Expect::Error
    };
    if !matches!(expect, super::examples::Expect::Event(_)) && event_fields {
        c.problem(
            &key,
            "`subject`, `time`, `data` and `id` describe an event example (one with `type`)",
        );
    }
    Some(Example {
        index: i,
        description: decl.description,
        frame: decl.frame,
        params,
        expect,
    })
}

/// What one event of an example must be.
fn event_expect(
    c: &mut Checker,
    key: &str,
    decl: super::file::ExampleEventDecl,
) -> Option<super::examples::EventExpect> {
    let data = match (decl.data, decl.data_json) {
        (Some(data), None) => toml_to_json(data).map_err(|e| (format!("{key}.data"), e)),
        (None, Some(text)) => serde_json::from_str(&text)
            .map_err(|e| (format!("{key}.data_json"), format!("not JSON: {e}"))),
        _ => Err((
            key.to_string(),
            "an event example needs one of `data` or `data_json`".to_string(),
        )),
    };
    let data = match data {
        Ok(v) => v,
        Err((k, e)) => {
            c.problem(k, e);
            return None;
        }
    };
    let time = match decl.time {
        Some(t) => match chrono::DateTime::parse_from_rfc3339(&t) {
            Ok(t) => Some(t.with_timezone(&chrono::Utc)),
            Err(e) => {
                c.problem(format!("{key}.time"), format!("{t:?} is not RFC 3339: {e}"));
                return None;
            }
        },
        None => None,
    };
    Some(super::examples::EventExpect {
        event_type: decl.event_type,
        subject: decl.subject,
        time,
        data,
        id: decl.id,
    })
}

/// A TOML value as JSON (a date-time becomes its RFC 3339 text).
pub(super) fn toml_to_json(v: toml::Value) -> Result<Value, String> {
    Ok(match v {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(f) => serde_json::Number::from_f64(f)
            .map(Value::Number)
            .ok_or_else(|| format!("{f} has no JSON form"))?,
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(items) => Value::Array(
            items
                .into_iter()
                .map(toml_to_json)
                .collect::<Result<_, _>>()?,
        ),
        toml::Value::Table(t) => Value::Object(
            t.into_iter()
                .map(|(k, v)| Ok((k, toml_to_json(v)?)))
                .collect::<Result<_, String>>()?,
        ),
    })
}
