//! The dialect file as written: TOML read into plain structs, every table closed (an unknown
//! key is refused by name). Nothing here is compiled or checked beyond the TOML types; the
//! loader in `load.rs` does that and names the key of every problem.

use std::collections::BTreeMap;

use serde::Deserialize;

/// A whole dialect file. Sections are optional here so the loader can name a missing one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DialectFile {
    pub dialect: Option<Header>,
    #[serde(default)]
    pub params: BTreeMap<String, ParamDecl>,
    pub prepare: Option<PrepareDecl>,
    pub connect: Option<ConnectDecl>,
    #[serde(default)]
    pub session: Vec<SessionDecl>,
    pub subscribe: Option<SubscribeDecl>,
    pub heartbeat: Option<HeartbeatDecl>,
    #[serde(default)]
    pub control: Vec<ControlDecl>,
    #[serde(default)]
    pub events: Vec<EventDecl>,
    #[serde(default)]
    pub examples: Vec<ExampleDecl>,
}

/// `[dialect]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Header {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Who connects when several bridge instances share a journal: "all" or "lease".
    pub ownership: Option<String>,
}

/// One entry of `[params]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ParamDecl {
    #[serde(default)]
    pub required: bool,
    #[serde(default)]
    pub secret: bool,
    /// Two upstreams of this dialect at one `url` may not share the value.
    #[serde(default)]
    pub unique: bool,
    /// "string", "integer", "number", "boolean", "array", "table" or "any".
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub default: Option<toml::Value>,
    /// jq on the value: true, or an `error("why")`.
    pub check: Option<String>,
    #[serde(default)]
    pub description: String,
}

/// `[prepare]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PrepareDecl {
    pub method: Option<String>,
    pub url: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub body: Option<String>,
    pub fail: Option<String>,
    pub refresh: Option<String>,
}

/// `[connect]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConnectDecl {
    pub url: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub auth_failure_status: Option<Vec<u16>>,
    pub binary: Option<String>,
}

/// One `[[session]]` step.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SessionDecl {
    pub send: Option<String>,
    pub expect: Option<String>,
    pub fail: Option<String>,
    pub timeout: Option<String>,
}

/// `[subscribe]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SubscribeDecl {
    pub each: String,
    #[serde(default)]
    pub batch: bool,
    pub frame: String,
    pub unsubscribe: Option<String>,
    pub ack: Option<String>,
    pub ack_timeout: Option<String>,
}

/// `[heartbeat]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HeartbeatDecl {
    pub kind: String,
    pub frame: Option<String>,
    pub text: Option<String>,
    pub interval: Option<String>,
}

/// One `[[control]]` rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ControlDecl {
    #[serde(rename = "match")]
    pub matches: Option<String>,
    pub text: Option<String>,
    pub kind: Option<String>,
    pub message: Option<String>,
    pub code: Option<String>,
}

/// One `[[events]]` rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventDecl {
    #[serde(rename = "match")]
    pub matches: Option<String>,
    #[serde(rename = "type")]
    pub event_type: String,
    pub subject: Option<String>,
    pub time: Option<String>,
    pub time_unit: Option<String>,
    pub data: Option<String>,
    pub id: Option<String>,
    pub sequence: Option<String>,
    pub sequence_key: Option<String>,
    pub reply: Option<String>,
    pub split: Option<String>,
}

/// One `[[examples]]` entry: a frame and what it must decode to.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExampleDecl {
    pub frame: String,
    #[serde(default)]
    pub params: BTreeMap<String, toml::Value>,
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    pub subject: Option<String>,
    pub time: Option<String>,
    pub data: Option<toml::Value>,
    /// `data` as JSON text, for what TOML cannot write (`null`).
    pub data_json: Option<String>,
    pub id: Option<String>,
    pub control: Option<String>,
    pub error: Option<bool>,
    /// A frame that carries several events (a `split` rule): each, in order.
    pub events: Option<Vec<ExampleEventDecl>>,
    #[serde(default)]
    pub description: String,
}

/// One event of an `[[examples]] events` list.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExampleEventDecl {
    #[serde(rename = "type")]
    pub event_type: String,
    pub subject: Option<String>,
    pub time: Option<String>,
    pub data: Option<toml::Value>,
    pub data_json: Option<String>,
    pub id: Option<String>,
}
