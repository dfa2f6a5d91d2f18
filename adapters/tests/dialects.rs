//! Dialect files: the shipped ones load and pass their own examples; broken files are refused
//! with the file, the key and the reason; and the engine's rules hold on a small dialect of
//! our own (text controls, unknown frames, run-time failures, provider ids, secrets).

use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::json;
use wsbridge_adapters::dialect::{builtin, builtin_names, Dialect, DialectAdapter, Params};
use wsbridge_adapters::{
    Adapter, AdapterError, Control, Decoded, FrameEvent, Greeting, Heartbeat, Inbound,
    PrepareRefused,
};

fn shipped(name: &str) -> Arc<Dialect> {
    builtin(name)
        .unwrap_or_else(|| panic!("{name} is built in"))
        .unwrap_or_else(|e| panic!("{name} loads:\n{e}"))
}

#[test]
fn every_example_of_every_shipped_dialect_passes() {
    let names: Vec<&str> = builtin_names().collect();
    assert_eq!(names, ["voicepact", "voipbin", "hashi"]);
    for name in names {
        let d = shipped(name);
        assert_eq!(d.name(), name);
        assert!(
            d.example_count() >= 5,
            "{name}: {} examples",
            d.example_count()
        );
        if let Err(failures) = d.check_examples() {
            let report: Vec<String> = failures.iter().map(ToString::to_string).collect();
            panic!(
                "{name}: {} examples fail:\n{}",
                failures.len(),
                report.join("\n")
            );
        }
    }
}

/// The event types each provider's doc names; each needs an example in its dialect file.
#[test]
fn every_documented_event_type_has_an_example() {
    use wsbridge_adapters::hashi::wire::{CONTRACT_EVENTS, LOBBY_EVENTS, STORAGE_EVENTS};
    use wsbridge_adapters::voicepact::wire::{CONTRACT_UPDATE, PAYMENT_UPDATE};
    let hashi_types: Vec<&str> = CONTRACT_EVENTS
        .iter()
        .chain(&LOBBY_EVENTS)
        .chain(&STORAGE_EVENTS)
        .copied()
        .collect();
    let documented: [(&str, &[&str]); 3] = [
        ("voicepact", &[CONTRACT_UPDATE, PAYMENT_UPDATE]),
        (
            "voipbin",
            &[
                "call.status",
                "call.created",
                "message.received",
                "message.sent",
                "message.delivery",
                "activeflow.updated",
                "activeflow.completed",
                "conference.joined",
                "conference.left",
                "queue.joined",
                "queue.connected",
                "agent.status",
                "recording.completed",
                "call.ended",
                "call.assigned",
                "call_created",
            ],
        ),
        ("hashi", &hashi_types),
    ];
    for (name, types) in documented {
        let text = std::fs::read_to_string(format!("{}/{name}.toml", env!("CARGO_MANIFEST_DIR")))
            .expect("the shipped file reads");
        let table: toml::Table = text.parse().expect("TOML");
        let example_types: BTreeSet<String> = table["examples"]
            .as_array()
            .expect("examples")
            .iter()
            .filter_map(|e| e.get("type").and_then(|t| t.as_str()).map(str::to_string))
            .collect();
        for t in types {
            assert!(
                example_types.contains(&format!("{name}.{t}")),
                "{name}: no example of {t}"
            );
        }
    }
}

fn refused(text: &str) -> String {
    match Dialect::load("test/broken.toml", text) {
        Ok(_) => panic!("loaded:\n{text}"),
        Err(e) => e.to_string(),
    }
}

const MINIMAL: &str = r#"
[dialect]
name = "demo"
[connect]
url = '$url'
"#;

#[test]
fn a_bad_expression_names_the_file_the_key_and_jaqs_message() {
    let e = refused(&format!(
        "{MINIMAL}\n[[events]]\nmatch = '.kind == \"a\"'\ntype = '.kind | nosuch_fn(1)'\n"
    ));
    assert!(
        e.starts_with("test/broken.toml: events[0].type: jq: "),
        "{e}"
    );
    assert!(e.contains("nosuch_fn"), "{e}");
    assert!(e.contains("at offset 8"), "{e}");
    let e = refused(&format!("{MINIMAL}\n[[control]]\nmatch = '.type == '\n"));
    assert!(e.contains("control[0].match: jq: expected"), "{e}");
    let e = refused(&format!("{MINIMAL}\n[[events]]\ntype = '$nope'\n"));
    assert!(
        e.contains("events[0].type: jq: undefined variable `$nope`"),
        "{e}"
    );
    // `$item` exists only where a subscription frame is built.
    let e = refused(&format!("{MINIMAL}\n[[events]]\ntype = '$item'\n"));
    assert!(e.contains("undefined variable `$item`"), "{e}");
    // Every problem is reported, not only the first.
    let e = refused(&format!(
        "{MINIMAL}\n[[events]]\ntype = '(('\n[[events]]\ntype = '.a' \nsubject = ')'\n"
    ));
    assert!(
        e.contains("events[0].type") && e.contains("events[1].subject"),
        "{e}"
    );
}

#[test]
fn unknown_keys_and_missing_sections_are_refused() {
    let e = refused(&format!(
        "{MINIMAL}\n[[events]]\ntype = '.a'\ncolour = 'blue'\n"
    ));
    assert!(e.contains("unknown field `colour`"), "{e}");
    let e = refused(&format!("{MINIMAL}\nextra = 1\n"));
    assert!(e.contains("unknown field `extra`"), "{e}");
    let e = refused("[connect]\nurl = '$url'\n");
    assert!(e.contains("dialect: missing section [dialect]"), "{e}");
    let e = refused("[dialect]\nname = \"demo\"\n");
    assert!(e.contains("connect: missing section [connect]"), "{e}");
    let e = refused("[dialect]\nname = \"Demo Dialect\"\n[connect]\nurl = '$url'\n");
    assert!(e.contains("dialect.name"), "{e}");
    let e = refused(&format!("{MINIMAL}\n[params]\nurl = {{}}\n"));
    assert!(e.contains("params.url") && e.contains("reserved"), "{e}");
    let e = refused(&format!(
        "{MINIMAL}\n[[control]]\nmatch = 'true'\nkind = \"later\"\n"
    ));
    assert!(e.contains("control[0].kind"), "{e}");
    let e = refused(&format!("{MINIMAL}\n[heartbeat]\nkind = \"app\"\n"));
    assert!(e.contains("heartbeat"), "{e}");
    let e = refused(&format!("{MINIMAL}\n[[examples]]\nframe = '{{}}'\n"));
    assert!(e.contains("examples[0]"), "{e}");
    let e = refused("[dialect\nname = 1");
    assert!(e.starts_with("test/broken.toml: "), "{e}");
}

#[test]
fn prepare_is_checked_at_load_and_its_answer_feeds_the_connect_request() {
    let e = refused(&format!(
        "{MINIMAL}\n[prepare]\nmethod = \"TRACE\"\nurl = '\"http://x/\"'\nrefresh = \"1ms\"\n"
    ));
    assert!(
        e.contains("prepare.method") && e.contains("prepare.refresh"),
        "{e}"
    );
    let text = r#"
[dialect]
name = "prep"
[params]
key = { required = true, secret = true }
[prepare]
method = "POST"
url = '"https://api.example.invalid/open"'
headers = { authorization = '"Bearer " + $key' }
fail = '.ok | not'
[connect]
url = '$prepared.url'
"#;
    let d = Arc::new(Dialect::load("prep.toml", text).expect("loads"));
    assert!(!d.uses_url());
    let mut p = Params::without_url();
    p.set("key", json!("k-secret"));
    let a = DialectAdapter::bind(d, &p).expect("binds before any answer");
    let req = a
        .prepare_request()
        .expect("a prepare call")
        .expect("builds");
    assert_eq!(req.method(), http::Method::POST);
    assert_eq!(req.headers()["authorization"], "Bearer k-secret");
    // Before an answer there is no URL to dial; a refused answer keeps it so.
    assert!(a.connect_request().is_err());
    assert!(matches!(
        a.prepared(200, br#"{"ok":false}"#),
        Err(PrepareRefused::Auth(_))
    ));
    assert!(matches!(
        a.prepared(403, b"{}"),
        Err(PrepareRefused::Auth(_))
    ));
    assert!(matches!(
        a.prepared(502, b"{}"),
        Err(PrepareRefused::Failed(_))
    ));
    assert!(matches!(
        a.prepared(200, b"<html>"),
        Err(PrepareRefused::Failed(_))
    ));
    assert!(a.connect_request().is_err());
    a.prepared(
        200,
        br#"{"ok":true,"url":"wss://ws.example.invalid/link?t=1"}"#,
    )
    .expect("taken");
    let req = a.connect_request().expect("the answer's URL");
    assert_eq!(req.uri(), "wss://ws.example.invalid/link?t=1");
}

/// A dialect exercising the engine's rules.
const DEMO: &str = r##"
[dialect]
name = "demo"
description = "a test provider"

[params]
api_key = { required = true, secret = true }
channels = { default = [], check = '.[] | select(startswith("#") | not) | error("\(.): a channel starts with #")' }

[connect]
url = '$url + "?key=" + ($api_key | @uri)'
headers = { "x-client" = '"wsbridge"', "authorization" = '"Bearer " + $api_key' }

[subscribe]
each = '$channels[]'
frame = '{op: "join", channel: $item}'
unsubscribe = '{op: "leave", channel: $item}'

[heartbeat]
kind = "app"
text = "ping"

[[control]]
text = "pong"
kind = "pong"

[[control]]
match = '.op == "hello"'
kind = "greeting"

[[control]]
match = '.op == "denied"'
kind = "auth_failure"
message = '.why'

[[events]]
match = '.op == "event"'
type = '.kind'
subject = '.channel'
time = '.ts'
time_unit = "ms"
data = '.body'
id = '.event_id'

[[events]]
match = '.op == "broken"'
type = '.kind | ascii_downcase'
"##;

fn demo(params: &[(&str, serde_json::Value)]) -> Result<DialectAdapter, AdapterError> {
    let d = Arc::new(Dialect::load("demo.toml", DEMO).expect("demo loads"));
    let mut p = Params::new(&url::Url::parse("ws://127.0.0.1:9/stream").expect("URL"));
    for (k, v) in params {
        p.set(k, v.clone());
    }
    DialectAdapter::bind(d, &p)
}

#[test]
fn parameters_are_checked_when_binding() {
    let err = demo(&[]).map(|_| ()).expect_err("api_key is required");
    assert!(
        matches!(&err, AdapterError::Missing { key, .. } if key == "api_key"),
        "{err}"
    );
    let err = demo(&[("api_key", json!("k")), ("channels", json!(["#a", "b"]))])
        .map(|_| ())
        .expect_err("a channel without #");
    assert!(
        matches!(&err, AdapterError::Invalid { key, .. } if key == "channels"),
        "{err}"
    );
    assert!(
        err.to_string().contains("b: a channel starts with #"),
        "{err}"
    );
}

#[test]
fn a_bound_dialect_connects_subscribes_and_keeps_secrets_out_of_sight() {
    // A dialect that is not built in runs an upstream like a built-in one.
    let a = demo(&[
        ("api_key", json!("s3cr&t")),
        ("channels", json!(["#a", "#b"])),
    ])
    .expect("binds");
    assert_eq!(a.provider(), "demo");
    let req = a.connect_request().expect("request");
    assert_eq!(
        req.uri().to_string(),
        "ws://127.0.0.1:9/stream?key=s3cr%26t"
    );
    assert_eq!(req.headers()["x-client"], "wsbridge");
    assert_eq!(req.headers()["authorization"], "Bearer s3cr&t");
    assert!(!a.display_url().contains("s3cr"), "{}", a.display_url());
    assert_eq!(a.greeting(), Greeting::AwaitConnected);
    assert_eq!(a.subscriptions(), ["#a", "#b"]);
    assert_eq!(
        a.subscribe_frames(&["#b".to_string()]),
        [r##"{"op":"join","channel":"#b"}"##]
    );
    assert_eq!(a.heartbeat(0), Heartbeat::Text("ping".to_string()));
    assert!(!format!("{a:?}").contains("s3cr"));
}

#[test]
fn every_parameter_problem_names_its_key_and_never_a_secret() {
    let d = Arc::new(Dialect::load("demo.toml", DEMO).expect("demo loads"));
    let problems = |params: &[(&str, serde_json::Value)], url: bool| {
        let mut p = if url {
            Params::new(&url::Url::parse("ws://127.0.0.1:9/").expect("URL"))
        } else {
            Params::without_url()
        };
        for (k, v) in params {
            p.set(k, v.clone());
        }
        d.param_problems(&p)
            .into_iter()
            .map(|p| (p.key, p.reason))
            .collect::<Vec<_>>()
    };
    assert_eq!(problems(&[("api_key", json!("k"))], true), []);
    let all = problems(
        &[("api_kee", json!("s3cr3t-typo")), ("channels", json!("#a"))],
        false,
    );
    let keys: Vec<&str> = all.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["api_kee", "url", "api_key", "channels"], "{all:?}");
    assert!(
        all[0].1.contains("not a parameter of the demo dialect"),
        "{all:?}"
    );
    assert!(all[2].1.contains("needs `api_key`"), "{all:?}");
    assert!(all[3].1.contains("is string, expected array"), "{all:?}");
    // A secret of the wrong type is described by its type, never quoted.
    let wrong = problems(&[("api_key", json!(["s3cr3t"]))], true);
    assert_eq!(wrong.len(), 1, "{wrong:?}");
    assert!(!wrong[0].1.contains("s3cr3t"), "{wrong:?}");
    // A failed check names the key, with the check's message.
    let checked = problems(&[("api_key", json!("k")), ("channels", json!(["b"]))], true);
    assert_eq!(checked[0].0, "channels");
    assert!(
        checked[0].1.contains("a channel starts with #"),
        "{checked:?}"
    );
}

#[test]
fn url_is_needed_only_by_a_dialect_that_reads_it() {
    let without = r#"
[dialect]
name = "fixed"
[params]
host = { default = "127.0.0.1:9" }
port_offset = { type = "integer", default = 0 }
[connect]
url = '"ws://" + $host + "/feed"'
"#;
    let d = Arc::new(Dialect::load("fixed.toml", without).expect("loads"));
    assert!(!d.uses_url());
    let a = DialectAdapter::bind(d.clone(), &Params::without_url()).expect("binds without url");
    assert_eq!(
        a.connect_request().expect("request").uri(),
        "ws://127.0.0.1:9/feed"
    );
    let mut p = Params::without_url();
    p.set("port_offset", json!("1"));
    let e = DialectAdapter::bind(d, &p)
        .map(|_| ())
        .expect_err("wrong type");
    assert!(
        matches!(&e, AdapterError::Invalid { key, .. } if key == "port_offset"),
        "{e}"
    );
    let demo = Arc::new(Dialect::load("demo.toml", DEMO).expect("demo loads"));
    assert!(demo.uses_url());
    let mut p = Params::without_url();
    p.set("api_key", json!("k"));
    let e = DialectAdapter::bind(demo, &p)
        .map(|_| ())
        .expect_err("url needed");
    assert!(
        matches!(&e, AdapterError::Invalid { key, .. } if key == "url"),
        "{e}"
    );
}

#[test]
fn a_param_type_or_ownership_the_engine_does_not_know_is_refused() {
    let e = Dialect::load(
        "x.toml",
        "[dialect]\nname = \"x\"\nownership = \"some\"\n[params]\na = { type = \"text\" }\nb = { type = \"integer\", default = \"1\" }\n[connect]\nurl = '$url'\n",
    )
    .expect_err("refused")
    .to_string();
    for key in ["dialect.ownership", "params.a.type", "params.b.default"] {
        assert!(e.contains(key), "{key}: {e}");
    }
}

#[test]
fn the_shipped_dialects_connect_like_the_contract_says() {
    let bind = |name: &str, params: &[(&str, serde_json::Value)]| {
        let mut p = Params::new(&url::Url::parse("ws://127.0.0.1:9102/v1.0/ws").expect("URL"));
        for (k, v) in params {
            p.set(k, v.clone());
        }
        DialectAdapter::bind(shipped(name), &p)
    };
    let vb = bind(
        "voipbin",
        &[
            ("token", json!("tok en&x")),
            ("topics", json!(["customer_id:abc123:call:*"])),
        ],
    )
    .expect("binds");
    let req = vb.connect_request().expect("request");
    let query: Vec<(String, String)> = url::Url::parse(&req.uri().to_string())
        .expect("URL")
        .query_pairs()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
    assert_eq!(query, [("token".to_string(), "tok en&x".to_string())]);
    assert_eq!(vb.display_url(), "ws://127.0.0.1:9102/v1.0/ws?token=***");
    assert_eq!(vb.greeting(), Greeting::Upgrade);
    assert_eq!(vb.heartbeat(0), Heartbeat::Protocol);
    assert_eq!(
        vb.subscribe_frames(vb.subscriptions()),
        [r#"{"type":"subscribe","topics":["customer_id:abc123:call:*"]}"#]
    );
    assert!(vb.subscribe_frames(&[]).is_empty());
    let err = bind(
        "voipbin",
        &[
            ("token", json!("t")),
            ("topics", json!(["customer_id:abc123"])),
        ],
    )
    .map(|_| ())
    .expect_err("a topic needs 4 segments");
    assert!(
        matches!(&err, AdapterError::Invalid { key, .. } if key == "topics"),
        "{err}"
    );
    let err = bind("voipbin", &[])
        .map(|_| ())
        .expect_err("token is required");
    assert!(
        matches!(&err, AdapterError::Missing { key, .. } if key == "token"),
        "{err}"
    );

    let hs = bind(
        "hashi",
        &[("token", json!("t")), ("lobbies", json!(["A", "B"]))],
    )
    .expect("binds");
    assert_eq!(hs.greeting(), Greeting::AwaitConnected);
    assert_eq!(
        hs.unsubscribe_frames(&["B".to_string()]),
        [r#"{"type":"unsubscribe","data":{"lobbyId":"B"}}"#]
    );
    assert_eq!(
        hs.heartbeat(0),
        Heartbeat::Text(r#"{"type":"ping"}"#.to_string())
    );
    let err = bind("hashi", &[("token", json!("t")), ("lobbies", json!([""]))])
        .map(|_| ())
        .expect_err("an empty lobby");
    assert!(
        matches!(&err, AdapterError::Invalid { key, .. } if key == "lobbies"),
        "{err}"
    );

    let vp = bind("voicepact", &[("client_id", json!("+254700000001"))]).expect("binds");
    let req = vp.connect_request().expect("request");
    assert_eq!(req.uri().path(), "/v1.0/ws/%2B254700000001");
    match vp.heartbeat(0) {
        Heartbeat::Text(t) => {
            let v: serde_json::Value = serde_json::from_str(&t).expect("JSON");
            assert_eq!(v["type"], "ping");
            assert!(v["timestamp"].is_i64(), "{t}");
        }
        other => panic!("{other:?}"),
    }
}

/// The demo's decoder, through the examples machinery (a dialect of one's own cannot run an
/// upstream before config support lands, but its examples run).
#[test]
fn engine_rules_hold_on_a_dialect_of_our_own() {
    let text = format!(
        r##"{DEMO}
[[examples]]
description = "a declared text control"
frame = 'pong'
control = "pong"

[[examples]]
frame = '{{"op":"hello"}}'
control = "greeting"

[[examples]]
frame = '{{"op":"denied","why":"bad key"}}'
control = "auth_failure"

[[examples]]
description = "millisecond time, the provider's id, data from a member"
frame = '{{"op":"event","kind":"trade","channel":"#a","ts":1717171717250,"event_id":"e-1","body":{{"p":1.50,"q":null}}}}'
type = "demo.trade"
subject = "#a"
time = "2024-05-31T16:08:37.250Z"
data_json = '{{"p":1.50,"q":null}}'
id = "e-1"

[[examples]]
description = "no rule takes it: still an event"
frame = '{{"op":"other","x":[1,2]}}'
type = "demo.unknown"
data = {{ op = "other", x = [1, 2] }}

[[examples]]
description = "an expression failing on this frame is this frame's decode error"
frame = '{{"op":"broken","kind":5}}'
error = true

[[examples]]
description = "not JSON and no text control"
frame = 'ping?'
error = true

[[examples]]
frame = '{{"op":"broken","kind":"OK"}}'
type = "demo.ok"
data = {{ op = "broken", kind = "OK" }}
"##
    );
    let d = Arc::new(Dialect::load("demo.toml", &text).expect("loads"));
    if let Err(f) = d.check_examples() {
        panic!(
            "{}",
            f.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    // A failing example says what differs.
    let wrong = format!(
        "{DEMO}\n[[examples]]\nframe = '{{\"op\":\"event\",\"kind\":\"a\",\"body\":1}}'\ntype = \"demo.b\"\ndata = 2\n"
    );
    let d = Arc::new(Dialect::load("demo.toml", &wrong).expect("loads"));
    let failures = d.check_examples().expect_err("the example is wrong");
    let report = failures[0].to_string();
    assert!(
        report.contains(r#"type: got "demo.a", expected "demo.b""#),
        "{report}"
    );
    assert!(report.contains("data: got 1, expected 2"), "{report}");
}

#[test]
fn controls_carry_the_providers_message() {
    let d = shipped("hashi");
    let hs = DialectAdapter::bind(d, &{
        let mut p = Params::new(&url::Url::parse("ws://127.0.0.1:9103/").expect("URL"));
        p.set("token", json!("t"));
        p
    })
    .expect("binds");
    assert_eq!(
        hs.decode(
            r#"{"type":"error","data":{"message":"Authentication failed","code":"AUTH_ERROR"}}"#
        ),
        Ok(Inbound::Control(Control::AuthFailed {
            message: "Authentication failed".into()
        }))
    );
    assert_eq!(
        hs.decode(r#"{"type":"error","data":{"code":"RATE"}}"#),
        Ok(Inbound::Control(Control::Error {
            code: Some("RATE".into()),
            message: "(no message)".into()
        }))
    );
    // A frame whose rule fails is an error for that frame only.
    let err = hs
        .decode(r#"{"type":"lobby:event","data":{"lobbyId":"x"}}"#)
        .expect_err("no data.type");
    assert!(err.reason.contains("events[0].type"), "{err}");
    assert!(matches!(
        hs.decode(r#"{"type":"pong"}"#),
        Ok(Inbound::Control(Control::Pong))
    ));
}

#[test]
fn text_controls_a_reconnect_request_and_the_heartbeat_interval() {
    let d = Arc::new(
        Dialect::load(
            "test/beat.toml",
            &format!(
                "{MINIMAL}\n[heartbeat]\nkind = \"app\"\ntext = \"ping\"\ninterval = \"250ms\"\n\
                 [[control]]\ntext = \"pong\"\nkind = \"pong\"\n\
                 [[control]]\nmatch = '.op == \"moving\"'\nkind = \"reconnect\"\n\
                 [[events]]\ntype = '.kind'\n"
            ),
        )
        .expect("loads"),
    );
    assert_eq!(
        d.heartbeat_interval(),
        Some(std::time::Duration::from_millis(250))
    );
    let a = DialectAdapter::bind(
        d,
        &Params::new(&url::Url::parse("ws://127.0.0.1:9/").expect("URL")),
    )
    .expect("binds");
    assert_eq!(a.heartbeat(0), Heartbeat::Text("ping".into()));
    assert_eq!(
        a.heartbeat_interval(),
        Some(std::time::Duration::from_millis(250))
    );
    assert_eq!(a.decode("pong"), Ok(Inbound::Control(Control::Pong)));
    assert_eq!(
        a.decode(r#"{"op":"moving"}"#),
        Ok(Inbound::Control(Control::Reconnect))
    );
    // Text that is no declared control and not JSON stays a decode error.
    assert!(a.decode("PONG").is_err());
}

/// The rules of a dialect whose `batch` frames carry several events, acknowledged per
/// event (after [`MINIMAL`]'s header: see [`split_text`]).
const SPLIT: &str = r#"
[[events]]
match = '.op == "batch"'
split = '.items[]'
type = '.kind'
subject = '$frame.channel + "/" + (.n | tostring)'
id = '.uid'
data = '.'
reply = '{ack: $frame.batch, n: .n}'
[[events]]
type = '.kind'
reply = '"ok " + .kind'

[[examples]]
description = "a batch of two"
frame = '{"op":"batch","channel":"c","batch":7,"items":[{"kind":"a","n":1},{"kind":"b","n":2,"uid":"u-2"}]}'
events = [
  { type = "demo.a", subject = "c/1", data = { kind = "a", n = 1 } },
  { type = "demo.b", subject = "c/2", data = { kind = "b", n = 2, uid = "u-2" }, id = "u-2" },
]

[[examples]]
description = "an empty batch carries no events"
frame = '{"op":"batch","channel":"c","batch":8,"items":[]}'
events = []
"#;

/// [`SPLIT`] as a whole file.
fn split_text() -> String {
    format!("{MINIMAL}{SPLIT}")
}

fn split_adapter() -> DialectAdapter {
    let d = Arc::new(Dialect::load("demo.toml", &split_text()).expect("loads"));
    d.check_examples().expect("its examples pass");
    let p = Params::new(&url::Url::parse("ws://127.0.0.1:9/s").expect("URL"));
    DialectAdapter::bind(d, &p).expect("binds")
}

fn events_of(a: &DialectAdapter, frame: &serde_json::Value, max: usize) -> Vec<FrameEvent> {
    match a.decode_frame(&frame.to_string(), max) {
        Ok(Decoded::Events(e)) => e,
        other => panic!("events expected, got {other:?}"),
    }
}

#[test]
fn a_split_frame_is_one_event_per_item_in_order_with_its_own_id_and_reply() {
    let a = split_adapter();
    let frame = json!({"op": "batch", "channel": "c", "batch": 7, "items": [
        {"kind": "a", "n": 1}, {"kind": "b", "n": 2, "uid": "u-2"}, {"kind": "a", "n": 3}]});
    let events = events_of(&a, &frame, 10);
    let kinds: Vec<&str> = events.iter().map(|e| e.event.event_type.as_str()).collect();
    assert_eq!(kinds, ["demo.a", "demo.b", "demo.a"]);
    let subjects: Vec<_> = events.iter().map(|e| e.event.subject.clone()).collect();
    assert_eq!(
        subjects,
        [Some("c/1".into()), Some("c/2".into()), Some("c/3".into())]
    );
    // The provider's id where the item has one; else the frame's digest and the index.
    let frame_id = wsbridge_adapters::event_id("demo", "127.0.0.1:9", &frame);
    assert_eq!(
        events[0].event.id,
        wsbridge_adapters::derived_id("split", &frame_id, 0)
    );
    assert!(events[0].event.id_from_content);
    assert_eq!(events[1].event.id, "u-2");
    assert!(!events[1].event.id_from_content);
    assert_eq!(
        events[2].event.id,
        wsbridge_adapters::derived_id("split", &frame_id, 2)
    );
    assert_eq!(events[2].event.data, json!({"kind": "a", "n": 3}));
    // `reply` per item, with `$frame`.
    let replies: Vec<_> = events.iter().map(|e| e.reply.clone()).collect();
    assert_eq!(
        replies,
        [
            Some(r#"{"ack":7,"n":1}"#.to_string()),
            Some(r#"{"ack":7,"n":2}"#.to_string()),
            Some(r#"{"ack":7,"n":3}"#.to_string()),
        ]
    );
    // The same items in another frame are other events.
    let other =
        json!({"op": "batch", "channel": "c", "batch": 8, "items": [{"kind": "a", "n": 1}]});
    assert_ne!(events_of(&a, &other, 10)[0].event.id, events[0].event.id);
    // A frame the split rule does not take keeps its content id; a string reply is sent as is.
    let plain = json!({"kind": "z"});
    let one = events_of(&a, &plain, 10);
    assert_eq!(one.len(), 1);
    assert_eq!(
        one[0].event.id,
        wsbridge_adapters::event_id("demo", "127.0.0.1:9", &plain)
    );
    assert_eq!(one[0].reply.as_deref(), Some("ok z"));
}

#[test]
fn a_split_frame_over_the_limit_is_a_decode_error() {
    let a = split_adapter();
    let frame = json!({"op": "batch", "channel": "c", "batch": 1, "items": [
        {"kind": "a", "n": 1}, {"kind": "a", "n": 2}, {"kind": "a", "n": 3}]});
    assert_eq!(events_of(&a, &frame, 3).len(), 3);
    let e = a
        .decode_frame(&frame.to_string(), 2)
        .expect_err("over the limit");
    assert!(e.reason.contains("events[0].split"), "{e}");
    assert!(e.reason.contains("limits.max_split_events (2)"), "{e}");
}

#[test]
fn split_examples_are_checked_item_by_item() {
    let broken = split_text().replace(
        "{ type = \"demo.b\", subject = \"c/2\"",
        "{ type = \"demo.x\", subject = \"c/2\"",
    );
    let d = Arc::new(Dialect::load("demo.toml", &broken).expect("loads"));
    let failures = d.check_examples().expect_err("one fails");
    assert_eq!(failures.len(), 1);
    let shown = failures[0].to_string();
    assert!(
        shown.contains("events[1].type: got \"demo.b\", expected \"demo.x\""),
        "{shown}"
    );
    let e = refused(&format!(
        "{MINIMAL}\n[[examples]]\nframe = '{{}}'\ntype = \"demo.a\"\nevents = []\n"
    ));
    assert!(
        e.contains("examples[0]") && e.contains("exactly one"),
        "{e}"
    );
}
