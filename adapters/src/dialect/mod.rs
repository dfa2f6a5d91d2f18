//! Dialect files: a provider's WebSocket API described in TOML, run by one engine.
//!
//! A dialect file says how to connect (the URL and handshake headers, from the upstream's
//! parameters), what to send after connecting (subscriptions), how to keep the connection
//! alive, which inbound frames are control frames, and how every event frame maps onto the
//! envelope. Every expression in it is jq (the jaq implementation), compiled once when the
//! file loads; a file with a bad expression, an unknown key or a missing section is refused
//! with the file, the key and the reason. The built-in providers are dialect files too
//! (`adapters/<name>.toml`, compiled into the binary), so every provider runs on this engine.
//!
//! Modules: `file` (the TOML as written), `load` (checks and compiles it into a [`Dialect`]),
//! `expr` (jq expressions and the dialect functions), `decode` (frames → events and control
//! frames), `adapter` (a dialect bound to one upstream: the [`crate::Adapter`] the supervisor
//! runs), `examples` (the file's own test cases), `builtin` (the compiled-in files).

mod adapter;
mod builtin;
mod decode;
mod examples;
mod expr;
mod file;
mod load;
mod native;
mod registry;

use std::fmt;
use std::sync::Arc;

pub use adapter::{DialectAdapter, Params};
pub use builtin::{builtin, builtin_names};
pub use examples::ExampleFailure;
pub use registry::{Registry, RegistryError};

use expr::Expr;

/// A loaded, compiled dialect file. Immutable and shared by every upstream that uses it.
#[derive(Debug)]
pub struct Dialect {
    /// Where it came from (a path, or `built-in <name>`), for messages.
    origin: String,
    /// `[dialect] name`: the `adapter` value, the envelope's `provider`, the type prefix.
    name: String,
    description: String,
    /// `[dialect] ownership`: who connects by default when instances share a journal.
    ownership: Ownership,
    /// Whether any expression reads `$url` (an upstream then needs `url`).
    uses_url: bool,
    /// SHA-256 of the file's text: a reload reconnects an upstream only when its dialect's
    /// text changed.
    fingerprint: [u8; 32],
    /// `[params]`, sorted by name.
    params: Vec<Param>,
    /// `[prepare]`: an HTTP call before every connect.
    prepare: Option<Prepare>,
    connect: Connect,
    /// `[[session]]`, in order.
    session: Vec<SessionStep>,
    subscribe: Option<Subscribe>,
    heartbeat: HeartbeatRule,
    /// `[heartbeat] interval`: the dialect's heartbeat period (an upstream's `ping_interval`
    /// overrides it).
    heartbeat_interval: Option<std::time::Duration>,
    controls: Vec<ControlRule>,
    events: Vec<EventRule>,
    examples: Vec<examples::Example>,
}

impl Dialect {
    /// Loads and compiles a dialect file; `origin` names it in messages (usually its path).
    pub fn load(origin: &str, text: &str) -> Result<Dialect, DialectError> {
        load::load(origin, text)
    }

    /// The dialect's name (`adapter = "<name>"`, the envelope's `provider`, the type prefix).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The one-line description from `[dialect]`.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Where the dialect was loaded from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The parameters an upstream of this dialect may set (besides the common keys).
    pub fn params(&self) -> impl Iterator<Item = ParamSpec<'_>> {
        self.params.iter().map(|p| ParamSpec {
            name: &p.name,
            description: &p.description,
            required: p.required,
            secret: p.secret,
            unique: p.unique,
            kind: p.kind.name(),
        })
    }

    /// `[dialect] ownership`: whether an upstream of this dialect connects from every bridge
    /// instance sharing a journal, or from one at a time under a lease (the upstream's own
    /// `ownership` key overrides it).
    pub fn ownership(&self) -> Ownership {
        self.ownership
    }

    /// `[heartbeat] interval`: how often the dialect's heartbeat goes out when the upstream
    /// sets no `ping_interval` of its own.
    pub fn heartbeat_interval(&self) -> Option<std::time::Duration> {
        self.heartbeat_interval
    }

    /// Whether the dialect's expressions read `$url`: only then must an upstream set `url`.
    pub fn uses_url(&self) -> bool {
        self.uses_url
    }

    /// Whether `other` was loaded from the same text (and origin): a reload keeps the
    /// connections of upstreams whose dialect is the same.
    pub fn same_as(&self, other: &Dialect) -> bool {
        self.fingerprint == other.fingerprint && self.origin == other.origin
    }

    /// Every problem with one upstream's parameters: an unknown key, a missing required one,
    /// a value of the wrong type, a value the parameter's `check` refuses. Each names the key;
    /// no message quotes a secret value.
    pub fn param_problems(&self, params: &Params) -> Vec<ParamProblem> {
        adapter::param_problems(self, params)
    }

    /// How many `[[examples]]` the file has.
    pub fn example_count(&self) -> usize {
        self.examples.len()
    }

    /// Runs every `[[examples]]` entry; each failure says which entry and what differs.
    pub fn check_examples(self: &Arc<Self>) -> Result<(), Vec<ExampleFailure>> {
        examples::check(self)
    }
}

fn var_names(params: &[Param]) -> Vec<String> {
    std::iter::once("$url".to_string())
        .chain(params.iter().map(|p| format!("${}", p.name)))
        .collect()
}

/// The variables of the expressions that build what the connection sends (`[connect]`,
/// `[[session]]`, `[subscribe]`, `[heartbeat]`): the parameters and `$prepared`.
fn send_var_names(params: &[Param]) -> Vec<String> {
    let mut v = var_names(params);
    v.push("$prepared".to_string());
    v
}

/// One declared parameter.
#[derive(Debug)]
struct Param {
    name: String,
    description: String,
    required: bool,
    secret: bool,
    unique: bool,
    kind: ParamKind,
    default: Option<serde_json::Value>,
    check: Option<Expr>,
}

/// What a dialect says about one of its parameters (`[params]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamSpec<'a> {
    /// The upstream key (and the jq variable `$<name>`).
    pub name: &'a str,
    /// What it is, for `wsbridge dialect list` and messages.
    pub description: &'a str,
    /// An upstream must set it.
    pub required: bool,
    /// A credential: never logged, shown or quoted in an error.
    pub secret: bool,
    /// Two upstreams of this dialect at one `url` may not share its value (a provider that
    /// keeps one connection per identity would otherwise drop one for the other, forever).
    pub unique: bool,
    /// Its JSON type: `string`, `integer`, `number`, `boolean`, `array`, `table` or `any`.
    pub kind: &'static str,
}

/// One problem with an upstream's value for a dialect parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamProblem {
    /// The upstream key at fault.
    pub key: String,
    /// Why, without the value when the parameter is secret.
    pub reason: String,
}

/// A parameter's declared JSON type (`[params] <name>.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ParamKind {
    String,
    Integer,
    Number,
    Boolean,
    Array,
    Table,
    Any,
}

impl ParamKind {
    const NAMES: [(&'static str, ParamKind); 7] = [
        ("string", ParamKind::String),
        ("integer", ParamKind::Integer),
        ("number", ParamKind::Number),
        ("boolean", ParamKind::Boolean),
        ("array", ParamKind::Array),
        ("table", ParamKind::Table),
        ("any", ParamKind::Any),
    ];

    fn parse(s: &str) -> Option<ParamKind> {
        Self::NAMES.iter().find(|(n, _)| *n == s).map(|(_, k)| *k)
    }

    fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, k)| *k == self)
            .map_or("any", |(n, _)| n)
    }

    /// The kind of a value (what a `default` implies when `type` is not written).
    fn of(v: &serde_json::Value) -> ParamKind {
        use serde_json::Value;
        match v {
            Value::Null => ParamKind::Any,
            Value::Bool(_) => ParamKind::Boolean,
            Value::Number(n) if n.is_i64() || n.is_u64() => ParamKind::Integer,
            Value::Number(_) => ParamKind::Number,
            Value::String(_) => ParamKind::String,
            Value::Array(_) => ParamKind::Array,
            Value::Object(_) => ParamKind::Table,
        }
    }

    fn accepts(self, v: &serde_json::Value) -> bool {
        use serde_json::Value;
        match (self, v) {
            (ParamKind::Any, _) => true,
            (ParamKind::Number, Value::Number(_)) => true,
            (k, v) => ParamKind::of(v) == k,
        }
    }
}

/// Who connects to an upstream when several bridge instances share a journal, by default
/// for a dialect (`[dialect] ownership`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    /// Every instance connects; the journal's deduplication removes the copies.
    All,
    /// One instance at a time, under a lease: for providers that keep one connection per
    /// identity.
    Lease,
}

/// `[prepare]`, compiled: an HTTP call before every connect whose JSON answer is
/// `$prepared` in `[connect]`, `[[session]]`, `[subscribe]` and `[heartbeat]`.
#[derive(Debug)]
struct Prepare {
    method: http::Method,
    url: Expr,
    headers: Vec<(String, Expr)>,
    /// The request body: a string as is, other values as JSON.
    body: Option<Expr>,
    /// jq on the answer: true means the credentials were refused.
    fail: Option<Expr>,
    /// Repeated this often while connected.
    refresh: Option<std::time::Duration>,
}

/// `[connect]`, compiled.
#[derive(Debug)]
struct Connect {
    url: Expr,
    headers: Vec<(String, Expr)>,
    /// Upgrade answers that mean auth_failed.
    auth_failure_status: Vec<u16>,
    /// What binary frames hold.
    binary: crate::BinaryFrames,
}

/// One `[[session]]` step, compiled.
#[derive(Debug)]
struct SessionStep {
    key: String,
    /// The frames to send when the step starts.
    send: Option<Expr>,
    /// The frame that completes the step; `None`: the step completes once sent.
    expect: Option<Expr>,
    /// A frame that means the credentials were refused.
    fail: Option<Expr>,
    /// How long the step may wait for its `expect` frame.
    timeout: std::time::Duration,
}

/// `[subscribe]`, compiled.
#[derive(Debug)]
struct Subscribe {
    each: Expr,
    /// One frame for all items (`$items`) instead of one per item (`$item`).
    batch: bool,
    frame: Expr,
    unsubscribe: Option<Expr>,
    /// The frame that acknowledges one subscription (`$item`), and how long it may take.
    ack: Option<(Expr, std::time::Duration)>,
}

/// `[heartbeat]`, compiled.
#[derive(Debug)]
enum HeartbeatRule {
    /// WebSocket protocol pings.
    Protocol,
    /// An application frame built by jq (sent as JSON).
    Frame(Expr),
    /// A fixed text frame.
    Text(String),
}

/// How a control rule recognises its frame.
#[derive(Debug)]
enum Matcher {
    /// jq on a JSON frame.
    Jq(Expr),
    /// The whole frame is exactly this text (for frames that are not JSON).
    Text(String),
}

/// What a control frame means to the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ControlKind {
    Pong,
    Greeting,
    Reply,
    AuthFailure,
    Error,
    /// The provider asks the client to move now (e.g. before a restart).
    Reconnect,
}

/// One `[[control]]` rule, compiled.
#[derive(Debug)]
struct ControlRule {
    key: String,
    matcher: Matcher,
    kind: ControlKind,
    message: Option<Expr>,
    code: Option<Expr>,
}

/// How bare numbers in `time` are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimeUnit {
    /// Unix seconds (values above 10^11 are taken as milliseconds, which some servers send).
    Seconds,
    /// Unix milliseconds.
    Millis,
}

/// One `[[events]]` rule, compiled.
#[derive(Debug)]
struct EventRule {
    key: String,
    /// `None`: the rule takes every frame that reaches it.
    matcher: Option<Expr>,
    event_type: Expr,
    subject: Option<Expr>,
    time: Option<Expr>,
    time_unit: TimeUnit,
    /// `None`: the whole frame.
    data: Option<Expr>,
    /// When `data` is a plain path of keys (`.data`), the keys: the value is moved out of the
    /// frame instead of copied.
    data_path: Option<Vec<String>>,
    id: Option<Expr>,
    /// The provider's sequence number (gap detection), and the key it counts per.
    sequence: Option<Expr>,
    sequence_key: Option<Expr>,
    /// `split`: the frame's items, each its own event (`.` the item, `$frame` the frame in
    /// the rule's other expressions).
    split: Option<Expr>,
    /// `reply`: the frame sent back to the provider once the event is journalled.
    reply: Option<Expr>,
}

/// A dialect file that cannot be used: every problem found, each with its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct DialectError {
    /// The file (or `built-in <name>`).
    pub origin: String,
    /// What is wrong, in file order where possible.
    pub problems: Vec<Problem>,
}

/// One problem in a dialect file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The key at fault (`events[2].type`, `params.token`, ...); empty when the file as a
    /// whole is (TOML syntax).
    pub key: String,
    /// Why, with jaq's message and position for an expression that does not compile.
    pub message: String,
}

impl fmt::Display for DialectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            if p.key.is_empty() {
                write!(f, "{}: {}", self.origin, p.message)?;
            } else {
                write!(f, "{}: {}: {}", self.origin, p.key, p.message)?;
            }
        }
        Ok(())
    }
}
