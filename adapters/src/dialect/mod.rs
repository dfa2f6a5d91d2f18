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

use std::fmt;
use std::sync::Arc;

pub use adapter::{DialectAdapter, Params};
pub use builtin::{builtin, builtin_names};
pub use examples::ExampleFailure;

use expr::Expr;

/// A loaded, compiled dialect file. Immutable and shared by every upstream that uses it.
#[derive(Debug)]
pub struct Dialect {
    /// Where it came from (a path, or `built-in <name>`), for messages.
    origin: String,
    /// `[dialect] name`: the `adapter` value, the envelope's `provider`, the type prefix.
    name: String,
    description: String,
    /// `[params]`, sorted by name.
    params: Vec<Param>,
    connect: Connect,
    subscribe: Option<Subscribe>,
    heartbeat: HeartbeatRule,
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

    /// The parameters an upstream of this dialect may set (besides the common keys), with
    /// their descriptions.
    pub fn params(&self) -> impl Iterator<Item = (&str, &str)> {
        self.params
            .iter()
            .map(|p| (p.name.as_str(), p.description.as_str()))
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

/// One declared parameter.
#[derive(Debug)]
struct Param {
    name: String,
    description: String,
    required: bool,
    secret: bool,
    default: Option<serde_json::Value>,
    check: Option<Expr>,
}

/// `[connect]`, compiled.
#[derive(Debug)]
struct Connect {
    url: Expr,
    headers: Vec<(String, Expr)>,
}

/// `[subscribe]`, compiled.
#[derive(Debug)]
struct Subscribe {
    each: Expr,
    /// One frame for all items (`$items`) instead of one per item (`$item`).
    batch: bool,
    frame: Expr,
    unsubscribe: Option<Expr>,
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
