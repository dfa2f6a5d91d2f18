//! Routing: which webhooks receive which events, decided by configuration, not code.
//!
//! Operators change where events go by editing `[[routes]]` in `config.toml` (README,
//! "Configuration reference"); nothing here knows about particular providers or receivers. The
//! same matching vocabulary serves WebSocket/SSE consumer filters and `[[consumers]] allow`
//! (README, "Consumers: the unified WebSocket endpoint") through [`Filter`], so an operator
//! learns it once.
//!
//! Rules are compiled once, when the config is loaded (or reloaded): patterns are parsed,
//! JSON pointers split, names checked, and every problem is reported at once with its key
//! ([`RouteIssue`]). Matching then runs for every event and does not allocate beyond the list
//! of targets it returns.
//!
//! Semantics of one route:
//! - `providers`, `types` and `subjects` are lists of [`Pattern`]s matched against the
//!   envelope's `provider`, `type` and `subject`; `where` is a list of [`Predicate`]s on
//!   `data` (JSON pointers; README "How each dialect maps" says what `data` holds per provider);
//! - every matcher is optional, and all the matchers given must hold (AND); within one list
//!   any element may match (OR), except `where`, whose predicates must all hold;
//! - providers are matched with patterns too, so `"*"` and exact names (`"voipbin"`) both work;
//! - an event without a subject never matches a non-empty `subjects` list;
//! - a route with no matchers at all matches every event (a catch-all);
//! - an event goes to the union of the `to` lists of all matching routes, each webhook once,
//!   in the order of first appearance in the config.

mod pattern;
mod predicate;

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::envelope::Envelope;

pub use pattern::{Pattern, PatternError};
pub use predicate::{CompiledPredicate, Predicate};

/// One problem found while compiling routes or a filter: the key and why it is refused.
///
/// Keys follow the config's notation: `routes[2].types[0]`, `routes[0].where[1]`; a
/// [`Filter`] compiled on its own reports keys relative to the filter (`types[0]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteIssue {
    /// Where the problem is, e.g. `routes[2].types[0]`.
    pub key: String,
    /// What is wrong, in words an operator can act on.
    pub reason: String,
}

impl fmt::Display for RouteIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

fn issue(key: String, reason: impl Into<String>) -> RouteIssue {
    RouteIssue {
        key,
        reason: reason.into(),
    }
}

/// The matchers shared by routes, consumer filters and `allow`, as written in config or in a
/// `subscribe` frame: `{ providers?, types?, subjects? }`, each a list of patterns.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Patterns for the envelope's `provider`; empty = any provider.
    #[serde(default)]
    pub providers: Vec<String>,
    /// Patterns for the envelope's `type`; empty = any type.
    #[serde(default)]
    pub types: Vec<String>,
    /// Patterns for the envelope's `subject`; empty = any subject (or none).
    #[serde(default)]
    pub subjects: Vec<String>,
}

/// Compiled `providers` / `types` / `subjects` matchers. Each list is optional (empty = no
/// restriction); all non-empty lists must hold; within a list any pattern may match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    providers: Box<[Pattern]>,
    types: Box<[Pattern]>,
    subjects: Box<[Pattern]>,
}

impl Filter {
    /// Compiles the three pattern lists, reporting every bad pattern with a key relative to
    /// the filter (`providers[0]`, `subjects[2]`).
    pub fn compile<S: AsRef<str>>(
        providers: &[S],
        types: &[S],
        subjects: &[S],
    ) -> Result<Filter, Vec<RouteIssue>> {
        let mut issues = Vec::new();
        let filter = Filter::compile_into("", providers, types, subjects, &mut issues);
        if issues.is_empty() {
            Ok(filter)
        } else {
            Err(issues)
        }
    }

    /// Compiles a [`FilterConfig`] (a `subscribe` filter, a consumer's `allow`).
    pub fn from_config(config: &FilterConfig) -> Result<Filter, Vec<RouteIssue>> {
        Filter::compile(&config.providers, &config.types, &config.subjects)
    }

    fn compile_into<S: AsRef<str>>(
        prefix: &str,
        providers: &[S],
        types: &[S],
        subjects: &[S],
        issues: &mut Vec<RouteIssue>,
    ) -> Filter {
        let mut list = |name: &str, patterns: &[S]| -> Box<[Pattern]> {
            patterns
                .iter()
                .enumerate()
                .filter_map(|(i, p)| match Pattern::parse(p.as_ref()) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        issues.push(issue(format!("{prefix}{name}[{i}]"), e.to_string()));
                        None
                    }
                })
                .collect()
        };
        Filter {
            providers: list("providers", providers),
            types: list("types", types),
            subjects: list("subjects", subjects),
        }
    }

    /// True if the filter has no matcher at all, so it matches every event.
    pub fn is_empty(&self) -> bool {
        self.providers.is_empty() && self.types.is_empty() && self.subjects.is_empty()
    }

    /// Whether the envelope passes every non-empty matcher. Never allocates.
    pub fn matches(&self, env: &Envelope) -> bool {
        any_matches(&self.providers, Some(&env.provider))
            && any_matches(&self.types, Some(&env.event_type))
            && any_matches(&self.subjects, env.subject.as_deref())
    }

    /// One sentence per non-empty matcher saying why it held or failed, and whether all held.
    fn explain(&self, env: &Envelope, reasons: &mut Vec<String>) -> bool {
        let mut all = true;
        for (name, patterns, value) in [
            ("providers", &self.providers, Some(env.provider.as_str())),
            ("types", &self.types, Some(env.event_type.as_str())),
            ("subjects", &self.subjects, env.subject.as_deref()),
        ] {
            if patterns.is_empty() {
                continue;
            }
            let (held, why) = explain_list(name, patterns, value);
            all &= held;
            reasons.push(why);
        }
        all
    }
}

/// Empty list: holds. Otherwise the value must exist and match one pattern.
fn any_matches(patterns: &[Pattern], value: Option<&str>) -> bool {
    patterns.is_empty() || value.is_some_and(|v| patterns.iter().any(|p| p.matches(v)))
}

fn explain_list(name: &str, patterns: &[Pattern], value: Option<&str>) -> (bool, String) {
    let list = || {
        let quoted: Vec<String> = patterns
            .iter()
            .map(|p| format!("{:?}", p.as_str()))
            .collect();
        format!("[{}]", quoted.join(", "))
    };
    match value {
        None => (
            false,
            format!(
                "{name}: the event has no {}, so it matches none of {}",
                singular(name),
                list()
            ),
        ),
        Some(v) => match patterns.iter().find(|p| p.matches(v)) {
            Some(p) => (true, format!("{name}: {v:?} matches {:?}", p.as_str())),
            None => (false, format!("{name}: {v:?} matches none of {}", list())),
        },
    }
}

fn singular(name: &str) -> &str {
    name.strip_suffix('s').unwrap_or(name)
}

/// One `[[routes]]` entry as written in config (README, "Configuration reference"). Validated
/// by [`Router::compile`].
///
/// Every field defaults, so that a missing `name` or `to` is reported by `compile` together
/// with every other problem instead of stopping deserialisation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Unique, non-empty route name (used in logs and [`Router::explain`]).
    #[serde(default)]
    pub name: String,
    /// Provider patterns (`"voipbin"`, `"*"`); empty = any provider.
    #[serde(default)]
    pub providers: Vec<String>,
    /// Event type patterns (`"voipbin.call.*"`); empty = any type.
    #[serde(default)]
    pub types: Vec<String>,
    /// Subject patterns (`"customer_id:abc123:*"`); empty = any subject, or none.
    #[serde(default)]
    pub subjects: Vec<String>,
    /// Conditions on `data`, all of which must hold (config key `where`).
    #[serde(default, rename = "where")]
    pub predicates: Vec<Predicate>,
    /// Webhook names that receive the matching events; at least one.
    #[serde(default)]
    pub to: Vec<String>,
}

/// A compiled route: a filter, predicates and targets.
#[derive(Clone, Debug)]
struct Route {
    name: Box<str>,
    filter: Filter,
    predicates: Box<[CompiledPredicate]>,
    to: Box<[Arc<str>]>,
}

impl Route {
    fn matches(&self, env: &Envelope) -> bool {
        self.filter.matches(env) && self.predicates.iter().all(|p| p.matches(&env.data))
    }
}

/// Why one route did or did not match an event (see [`Router::explain`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteExplanation {
    /// The route's name.
    pub route: String,
    /// Whether every matcher held, so the event goes to the route's targets.
    pub matched: bool,
    /// One sentence per matcher given, in the order providers, types, subjects, where[0..],
    /// e.g. `types: "voipbin.call.status" matches "voipbin.call.*"`.
    pub reasons: Vec<String>,
}

/// All routes, compiled; answers "which webhooks get this event?".
#[derive(Clone, Debug, Default)]
pub struct Router {
    routes: Box<[Route]>,
    /// Every target of every route, once each, in first-appearance order.
    webhooks: Box<[Arc<str>]>,
}

impl Router {
    /// Compiles `[[routes]]`, collecting every problem: bad patterns and predicates, empty or
    /// duplicate route names, an empty `to`, empty or repeated webhook names in `to`. Whether
    /// the webhooks exist is the config's check, via [`Router::webhook_names`].
    pub fn compile(routes: &[RouteConfig]) -> Result<Router, Vec<RouteIssue>> {
        let mut issues = Vec::new();
        let mut compiled = Vec::with_capacity(routes.len());
        let mut webhooks: Vec<Arc<str>> = Vec::new();
        for (i, rc) in routes.iter().enumerate() {
            let key = format!("routes[{i}]");
            if rc.name.trim().is_empty() {
                issues.push(issue(
                    format!("{key}.name"),
                    "a route needs a non-empty name",
                ));
            } else if let Some(j) = routes[..i].iter().position(|r| r.name == rc.name) {
                issues.push(issue(
                    format!("{key}.name"),
                    format!("duplicate route name {:?} (also routes[{j}])", rc.name),
                ));
            }
            let filter = Filter::compile_into(
                &format!("{key}."),
                &rc.providers,
                &rc.types,
                &rc.subjects,
                &mut issues,
            );
            let predicates: Box<[CompiledPredicate]> = rc
                .predicates
                .iter()
                .enumerate()
                .filter_map(|(j, p)| match p.compile() {
                    Ok(p) => Some(p),
                    Err(reason) => {
                        issues.push(issue(format!("{key}.where[{j}]"), reason));
                        None
                    }
                })
                .collect();
            if rc.to.is_empty() {
                issues.push(issue(
                    format!("{key}.to"),
                    "a route needs at least one webhook name in `to`",
                ));
            }
            let mut to: Vec<Arc<str>> = Vec::with_capacity(rc.to.len());
            for (j, name) in rc.to.iter().enumerate() {
                if name.trim().is_empty() {
                    issues.push(issue(format!("{key}.to[{j}]"), "empty webhook name"));
                } else if to.iter().any(|t| **t == **name) {
                    issues.push(issue(
                        format!("{key}.to[{j}]"),
                        format!("webhook {name:?} is listed twice"),
                    ));
                } else {
                    // Share one allocation per webhook name across routes.
                    let shared = match webhooks.iter().find(|w| ***w == **name) {
                        Some(w) => Arc::clone(w),
                        None => {
                            let w: Arc<str> = name.as_str().into();
                            webhooks.push(Arc::clone(&w));
                            w
                        }
                    };
                    to.push(shared);
                }
            }
            compiled.push(Route {
                name: rc.name.as_str().into(),
                filter,
                predicates,
                to: to.into(),
            });
        }
        if issues.is_empty() {
            Ok(Router {
                routes: compiled.into(),
                webhooks: webhooks.into(),
            })
        } else {
            Err(issues)
        }
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// True when there are no routes (no event goes to any webhook).
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The route names, in config order.
    pub fn route_names(&self) -> impl Iterator<Item = &str> + '_ {
        self.routes.iter().map(|r| &*r.name)
    }

    /// The webhooks that receive `env`: the union of the `to` lists of every matching route,
    /// each name once, in first-appearance order. Allocates only the returned vector (and not
    /// even that when nothing matches).
    pub fn targets(&self, env: &Envelope) -> Vec<Arc<str>> {
        let mut out: Vec<Arc<str>> = Vec::new();
        for route in self.routes.iter().filter(|r| r.matches(env)) {
            for t in route.to.iter() {
                // Names are interned at compile time, so pointer equality is name equality.
                if !out.iter().any(|o| Arc::ptr_eq(o, t)) {
                    out.push(Arc::clone(t));
                }
            }
        }
        out
    }

    /// For every route, in config order: whether it matches `env` and why, matcher by matcher
    /// (every matcher is evaluated, even after one has failed). For operators and the admin
    /// API, not the hot path.
    pub fn explain(&self, env: &Envelope) -> Vec<RouteExplanation> {
        self.routes
            .iter()
            .map(|route| {
                let mut reasons = Vec::new();
                let mut matched = route.filter.explain(env, &mut reasons);
                for (i, p) in route.predicates.iter().enumerate() {
                    let (held, why) = p.explain(&env.data);
                    matched &= held;
                    reasons.push(format!("where[{i}]: {why}"));
                }
                if reasons.is_empty() {
                    reasons.push("no matchers: the route matches every event".to_string());
                }
                RouteExplanation {
                    route: route.name.to_string(),
                    matched,
                    reasons,
                }
            })
            .collect()
    }

    /// Every webhook named in any route's `to`, once each, in first-appearance order, so that
    /// config validation can check that each exists.
    pub fn webhook_names(&self) -> impl Iterator<Item = &str> + '_ {
        self.webhooks.iter().map(|w| &**w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn env(provider: &str, event_type: &str, subject: Option<&str>, data: Value) -> Envelope {
        Envelope {
            specversion: "1.0".into(),
            id: format!("{provider}-{event_type}"),
            source: format!("wsbridge://{provider}-main"),
            event_type: event_type.into(),
            subject: subject.map(Into::into),
            time: "2024-01-15T10:30:01Z".into(),
            datacontenttype: "application/json".into(),
            data,
            provider: provider.into(),
            recvtime: "2024-01-15T10:30:01.123456Z".into(),
            gap: None,
            seq: Some(42),
        }
    }

    /// A VoIPBIN call status as the envelope carries it: `data` is the frame's `data` member
    /// (README, "How each dialect maps"), so routes read `/status`, not `/data/status`.
    fn voipbin_call(status: &str) -> Envelope {
        env(
            "voipbin",
            "voipbin.call.status",
            Some("customer_id:abc123:call:xyz789"),
            json!({"id": "xyz789", "status": status, "direction": "incoming",
                   "source": {"type": "tel", "target": "+15551230000"}}),
        )
    }

    fn voipbin_legacy() -> Envelope {
        env(
            "voipbin",
            "voipbin.call_created",
            None,
            json!({"id": "xyz789", "status": "dialing"}),
        )
    }

    fn voicepact_payment(amount: f64) -> Envelope {
        env(
            "voicepact",
            "voicepact.payment_update",
            Some("contract/C-1"),
            json!({"type": "payment_update", "contract_id": "C-1", "status": "completed",
                   "amount": amount, "timestamp": "1717171717"}),
        )
    }

    fn voicepact_contract(status: &str) -> Envelope {
        env(
            "voicepact",
            "voicepact.contract_update",
            Some("contract/C-1"),
            json!({"type": "contract_update", "contract_id": "C-1", "status": status,
                   "timestamp": 1717171717}),
        )
    }

    fn hashi_lobby(count: u64) -> Envelope {
        env(
            "hashi",
            "hashi.lobby.joined",
            Some("lobby/ABC123"),
            json!({"type": "lobby.joined", "lobbyId": "ABC123", "timestamp": "2024-01-15T10:30:00Z",
                   "payload": {"participantCount": count, "user": {"id": "u1"}}}),
        )
    }

    fn hashi_contract() -> Envelope {
        env(
            "hashi",
            "hashi.contract.initialized",
            Some("contract/K9"),
            json!({"type": "contract.initialized", "contractId": "K9", "payload": {}}),
        )
    }

    fn routes(v: Value) -> Vec<RouteConfig> {
        serde_json::from_value(v).unwrap()
    }

    fn router(v: Value) -> Router {
        Router::compile(&routes(v)).unwrap()
    }

    fn names(ts: Vec<Arc<str>>) -> Vec<String> {
        ts.iter().map(|t| t.to_string()).collect()
    }

    #[test]
    fn design_route_from_toml() {
        let text = r#"
            [[routes]]
            name = "calls-to-crm"
            providers = ["voipbin"]
            types = ["voipbin.call.*"]
            subjects = ["customer_id:abc123:*"]
            where = [{ path = "/status", in = ["answered", "hangup"] }]
            to = ["crm"]
        "#;
        use figment::providers::{Format, Toml};
        #[derive(Deserialize)]
        struct File {
            routes: Vec<RouteConfig>,
        }
        let file: File = figment::Figment::from(Toml::string(text))
            .extract()
            .unwrap();
        let r = Router::compile(&file.routes).unwrap();
        assert_eq!(names(r.targets(&voipbin_call("answered"))), ["crm"]);
        assert_eq!(names(r.targets(&voipbin_call("hangup"))), ["crm"]);
        assert!(r.targets(&voipbin_call("ringing")).is_empty());
        assert!(r.targets(&voipbin_legacy()).is_empty());
        assert!(r.targets(&voicepact_contract("answered")).is_empty());
        assert!(r.targets(&hashi_lobby(2)).is_empty());
        let mut other_customer = voipbin_call("answered");
        other_customer.subject = Some("customer_id:zzz:call:xyz789".into());
        assert!(r.targets(&other_customer).is_empty());
    }

    #[test]
    fn route_matching_table() {
        let cases: Vec<(Value, Envelope, bool)> = vec![
            // catch-all
            (json!({}), hashi_contract(), true),
            (json!({}), voipbin_legacy(), true),
            // providers: exact and pattern
            (
                json!({"providers": ["voicepact"]}),
                voicepact_payment(10.0),
                true,
            ),
            (json!({"providers": ["voicepact"]}), hashi_lobby(1), false),
            (
                json!({"providers": ["voicepact", "hashi"]}),
                hashi_lobby(1),
                true,
            ),
            (json!({"providers": ["*"]}), voipbin_legacy(), true),
            (json!({"providers": ["voi*"]}), voicepact_payment(1.0), true),
            (json!({"providers": ["voi*"]}), voipbin_legacy(), true),
            (json!({"providers": ["voi*"]}), hashi_lobby(1), false),
            // types
            (
                json!({"types": ["voicepact.*_update"]}),
                voicepact_payment(1.0),
                true,
            ),
            (
                json!({"types": ["voicepact.contract_update"]}),
                voicepact_payment(1.0),
                false,
            ),
            (json!({"types": ["hashi.lobby.*"]}), hashi_lobby(1), true),
            (json!({"types": ["hashi.lobby.*"]}), hashi_contract(), false),
            (json!({"types": ["hashi.*"]}), hashi_contract(), true),
            (
                json!({"types": ["voipbin.call.*"]}),
                voipbin_legacy(),
                false,
            ),
            (json!({"types": ["voipbin.call*"]}), voipbin_legacy(), true),
            // subjects, including the no-subject rule
            (
                json!({"subjects": ["contract/*"]}),
                voicepact_payment(1.0),
                true,
            ),
            (json!({"subjects": ["contract/*"]}), hashi_contract(), true),
            (json!({"subjects": ["contract/*"]}), hashi_lobby(1), false),
            (json!({"subjects": ["**"]}), voipbin_legacy(), false),
            (json!({"subjects": ["*"]}), voipbin_legacy(), false),
            (json!({"subjects": ["*"]}), hashi_lobby(1), true),
            (
                json!({"subjects": ["customer_id:*:call:*"]}),
                voipbin_call("x"),
                true,
            ),
            // where, per provider's data layout
            (
                json!({"where": [{"path": "/status", "eq": "completed"}]}),
                voicepact_payment(1.0),
                true,
            ),
            (
                json!({"where": [{"path": "/amount", "eq": 1500}]}),
                voicepact_payment(1500.0),
                true,
            ),
            (
                json!({"where": [{"path": "/amount", "eq": 1500}]}),
                voicepact_payment(1500.5),
                false,
            ),
            (
                json!({"where": [{"path": "/payload/participantCount", "eq": 2}]}),
                hashi_lobby(2),
                true,
            ),
            (
                json!({"where": [{"path": "/payload/participantCount", "eq": 2}]}),
                hashi_lobby(3),
                false,
            ),
            (
                json!({"where": [{"path": "/payload/user", "eq": {"id": "u1"}}]}),
                hashi_lobby(3),
                true,
            ),
            (
                json!({"where": [{"path": "/source/target", "prefix": "+1555"}]}),
                voipbin_call("x"),
                true,
            ),
            (
                json!({"where": [{"path": "/source/target", "prefix": "+254"}]}),
                voipbin_call("x"),
                false,
            ),
            (
                json!({"where": [{"path": "/timestamp", "prefix": "17"}]}),
                voicepact_contract("a"),
                false,
            ),
            (
                json!({"where": [{"path": "/timestamp", "prefix": "17"}]}),
                voicepact_payment(1.0),
                true,
            ),
            (
                json!({"where": [{"path": "/amount", "exists": true}]}),
                voicepact_contract("a"),
                false,
            ),
            (
                json!({"where": [{"path": "/amount", "exists": false}]}),
                voicepact_contract("a"),
                true,
            ),
            // all predicates must hold
            (
                json!({"where": [{"path": "/status", "eq": "signed"}, {"path": "/contract_id", "eq": "C-1"}]}),
                voicepact_contract("signed"),
                true,
            ),
            (
                json!({"where": [{"path": "/status", "eq": "signed"}, {"path": "/contract_id", "eq": "C-2"}]}),
                voicepact_contract("signed"),
                false,
            ),
            // all matchers must hold
            (
                json!({"providers": ["hashi"], "types": ["hashi.lobby.*"], "subjects": ["lobby/ABC*"],
                       "where": [{"path": "/lobbyId", "eq": "ABC123"}]}),
                hashi_lobby(1),
                true,
            ),
            (
                json!({"providers": ["hashi"], "types": ["hashi.lobby.*"], "subjects": ["lobby/XYZ*"]}),
                hashi_lobby(1),
                false,
            ),
            (
                json!({"providers": ["voicepact"], "types": ["hashi.lobby.*"]}),
                hashi_lobby(1),
                false,
            ),
        ];
        for (i, (mut matchers, env, want)) in cases.into_iter().enumerate() {
            matchers["name"] = json!(format!("r{i}"));
            matchers["to"] = json!(["hook"]);
            let r = router(json!([matchers]));
            let got = !r.targets(&env).is_empty();
            assert_eq!(
                got, want,
                "case {i}: {matchers} vs {} {:?}",
                env.event_type, env.subject
            );
            // explain agrees with targets
            assert_eq!(r.explain(&env)[0].matched, want, "case {i} explain");
        }
    }

    #[test]
    fn targets_are_deduplicated_in_first_appearance_order() {
        let r = router(json!([
            {"name": "all-voipbin", "providers": ["voipbin"], "to": ["audit", "crm"]},
            {"name": "calls", "types": ["voipbin.call.*"], "to": ["crm", "pager"]},
            {"name": "hashi", "providers": ["hashi"], "to": ["lobby-bot"]},
            {"name": "everything", "to": ["archive", "audit"]},
        ]));
        assert_eq!(
            names(r.targets(&voipbin_call("answered"))),
            ["audit", "crm", "pager", "archive"]
        );
        assert_eq!(
            names(r.targets(&voipbin_legacy())),
            ["audit", "crm", "archive"]
        );
        assert_eq!(
            names(r.targets(&hashi_lobby(1))),
            ["lobby-bot", "archive", "audit"]
        );
        assert_eq!(
            names(r.targets(&voicepact_payment(1.0))),
            ["archive", "audit"]
        );
        assert_eq!(
            r.webhook_names().collect::<Vec<_>>(),
            ["audit", "crm", "pager", "lobby-bot", "archive"]
        );
        assert_eq!(r.len(), 4);
        assert_eq!(
            r.route_names().collect::<Vec<_>>(),
            ["all-voipbin", "calls", "hashi", "everything"]
        );
    }

    #[test]
    fn default_router_routes_nothing() {
        let r = Router::default();
        assert!(r.is_empty());
        assert!(r.targets(&voipbin_call("answered")).is_empty());
        assert!(r.explain(&voipbin_call("answered")).is_empty());
        assert_eq!(r.webhook_names().count(), 0);
        assert!(Router::compile(&[]).unwrap().is_empty());
    }

    #[test]
    fn compile_collects_every_issue_with_its_key() {
        let issues = Router::compile(&routes(json!([
            {"name": "ok", "types": ["voipbin.call.*"], "to": ["crm"]},
            {"name": "", "types": ["a.**.b", "fine.*"], "subjects": [""], "to": []},
            {"name": "ok", "providers": [" voipbin"], "to": ["crm", "crm", ""],
             "where": [{"path": "status", "eq": 1}, {"path": "/a"}, {"path": "/b", "eq": 1, "in": [1]},
                       {"path": "/ok", "exists": true}, {"path": "/c", "in": []}]},
        ])))
        .unwrap_err();
        let keys: Vec<&str> = issues.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "routes[1].name",
                "routes[1].types[0]",
                "routes[1].subjects[0]",
                "routes[1].to",
                "routes[2].name",
                "routes[2].providers[0]",
                "routes[2].where[0]",
                "routes[2].where[1]",
                "routes[2].where[2]",
                "routes[2].where[4]",
                "routes[2].to[1]",
                "routes[2].to[2]",
            ]
        );
        let text: Vec<String> = issues.iter().map(ToString::to_string).collect();
        assert!(
            text[4].contains("duplicate route name \"ok\" (also routes[0])"),
            "{}",
            text[4]
        );
        assert!(text[1].contains("only allowed at the end"), "{}", text[1]);
        assert!(text[6].contains("start with \"/\""), "{}", text[6]);
        assert!(text[10].contains("listed twice"), "{}", text[10]);
    }

    #[test]
    fn unknown_route_keys_are_refused() {
        let err =
            serde_json::from_value::<RouteConfig>(json!({"name": "x", "to": ["a"], "type": ["t"]}))
                .unwrap_err();
        assert!(err.to_string().contains("unknown field `type`"), "{err}");
    }

    #[test]
    fn explain_says_why() {
        let r = router(json!([
            {"name": "calls-to-crm", "providers": ["voipbin"], "types": ["voipbin.call.*"],
             "subjects": ["customer_id:abc123:*"],
             "where": [{"path": "/status", "in": ["answered", "hangup"]}], "to": ["crm"]},
            {"name": "contracts", "providers": ["voicepact", "hashi"], "subjects": ["contract/*"],
             "to": ["legal"]},
            {"name": "catch-all", "to": ["archive"]},
        ]));
        let ex = r.explain(&voipbin_call("ringing"));
        assert_eq!(
            ex[0],
            RouteExplanation {
                route: "calls-to-crm".into(),
                matched: false,
                reasons: vec![
                    r#"providers: "voipbin" matches "voipbin""#.into(),
                    r#"types: "voipbin.call.status" matches "voipbin.call.*""#.into(),
                    r#"subjects: "customer_id:abc123:call:xyz789" matches "customer_id:abc123:*""#
                        .into(),
                    r#"where[0]: /status is "ringing", not in ["answered","hangup"]"#.into(),
                ],
            }
        );
        assert_eq!(
            ex[1],
            RouteExplanation {
                route: "contracts".into(),
                matched: false,
                reasons: vec![
                    r#"providers: "voipbin" matches none of ["voicepact", "hashi"]"#.into(),
                    r#"subjects: "customer_id:abc123:call:xyz789" matches none of ["contract/*"]"#
                        .into(),
                ],
            }
        );
        assert_eq!(
            ex[2],
            RouteExplanation {
                route: "catch-all".into(),
                matched: true,
                reasons: vec!["no matchers: the route matches every event".into()],
            }
        );
        let ex = r.explain(&voipbin_legacy());
        assert_eq!(
            ex[0].reasons[1..3],
            [
                r#"types: "voipbin.call_created" matches none of ["voipbin.call.*"]"#.to_string(),
                r#"subjects: the event has no subject, so it matches none of ["customer_id:abc123:*"]"#
                    .to_string(),
            ]
        );
        assert!(r.explain(&hashi_contract())[1].matched);
        assert!(r.explain(&voipbin_call("answered"))[0].matched);
    }

    #[test]
    fn filter_on_its_own() {
        let f =
            Filter::from_config(&serde_json::from_value(json!({"providers": ["hashi"]})).unwrap())
                .unwrap();
        assert!(f.matches(&hashi_lobby(1)));
        assert!(!f.matches(&voipbin_legacy()));
        assert!(Filter::default().is_empty());
        assert!(Filter::default().matches(&voipbin_legacy()));
        let errs = Filter::compile(&["ok"], &["a.**.b"], &[""]).unwrap_err();
        let keys: Vec<&str> = errs.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(keys, ["types[0]", "subjects[0]"]);
        assert!(serde_json::from_value::<FilterConfig>(json!({"topics": []})).is_err());
    }
}
