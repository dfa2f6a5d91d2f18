//! The binary as a user runs it: the demo end to end, and `check-config`.

use std::process::Command;

fn wsbridge() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wsbridge"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

#[test]
fn demo_shows_every_documented_event_type_of_all_three_providers() {
    let out = wsbridge()
        .args(["demo", "--interval", "0s", "--json"])
        .output()
        .expect("demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stderr}");
    let envelopes: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not an envelope: {l}: {e}")))
        .collect();
    let types: std::collections::BTreeSet<&str> = envelopes
        .iter()
        .filter_map(|e| e["type"].as_str())
        .collect();
    for want in [
        "voicepact.contract_update",
        "voicepact.payment_update",
        "voipbin.call.created",
        "voipbin.call.status",
        "voipbin.message.received",
        "voipbin.recording.completed",
        "voipbin.call_created",
        "hashi.contract.initialized",
        "hashi.contract.payout_finalized",
        "hashi.lobby.joined",
        "hashi.lobby.deleted",
        "hashi.storage.deleted",
    ] {
        assert!(
            types.contains(want),
            "demo never showed {want}; saw {types:?}"
        );
    }
    // Every seq once, in order, and every id once: duplicates from the two VoicePact
    // connections were suppressed.
    let seqs: Vec<u64> = envelopes.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert_eq!(seqs, (1..=envelopes.len() as u64).collect::<Vec<_>>());
    let ids: std::collections::BTreeSet<&str> =
        envelopes.iter().filter_map(|e| e["id"].as_str()).collect();
    assert_eq!(ids.len(), envelopes.len());
    assert!(stderr.contains("duplicates suppressed"), "{stderr}");
}

#[test]
fn demo_prints_readable_lines() {
    let out = wsbridge()
        .args(["demo", "--interval", "0s"])
        .output()
        .expect("demo runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The event's own line (`#<seq> <type> ...`): the webhook and consumer lines that name the
    // same type may be printed before it.
    let line = stdout
        .lines()
        .find(|l| l.starts_with('#') && l.contains("voipbin.call.status"))
        .unwrap_or_else(|| panic!("no call.status event line in:\n{stdout}"));
    assert!(line.contains("customer_id:abc123:call:xyz789"), "{line}");
    assert!(line.contains("status="), "{line}");
    // Routed events reach the demo's local receiver, signed.
    let hooks: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("-> webhook crm"))
        .collect();
    assert_eq!(
        hooks.len(),
        3,
        "answered + hangup calls and the payment:\n{stdout}"
    );
    assert!(
        hooks.iter().all(|l| l.contains("signature verified")),
        "{hooks:?}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("3 of 3 routed webhooks arrived"),
        "{stderr}"
    );
}

#[test]
fn check_config_accepts_the_shipped_config() {
    let out = wsbridge()
        .args(["check-config", "config.toml"])
        .env_remove("VOIPBIN_TOKEN")
        .env_remove("HASHI_TOKEN")
        .output()
        .expect("check-config runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_config_names_every_bad_key_and_exits_non_zero() {
    let dir = std::env::temp_dir().join(format!("wsbridge-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("bad.toml");
    std::fs::write(
        &file,
        r#"
[server]
listen = "127.0.0.1:8080"
[[upstreams]]
name = "vb"
adapter = "voipbin"
url = "ws://127.0.0.1:9102/v1.0/ws"
token = "${WSBRIDGE_TEST_UNSET_TOKEN}"
topics = ["not-a-topic"]
[[upstreams]]
name = "x"
adapter = "slack"
url = "ws://h/"
"#,
    )
    .expect("write config");
    let out = wsbridge()
        .arg("check-config")
        .arg(&file)
        .env("WSBRIDGE_SERVER__LISTEN", "not-an-address")
        .env_remove("WSBRIDGE_TEST_UNSET_TOKEN")
        .output()
        .expect("check-config runs");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in [
        "server.listen",
        r#"upstreams[0] ("vb").token"#,
        r#"upstreams[1] ("x").adapter"#,
    ] {
        assert!(stderr.contains(key), "{key} not reported:\n{stderr}");
    }
    assert!(
        stderr.contains("WSBRIDGE_TEST_UNSET_TOKEN is not set"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn env_overrides_apply() {
    let out = wsbridge()
        .args(["check-config", "config.toml"])
        .env("WSBRIDGE_STORAGE__BACKEND", "sqlite")
        .output()
        .expect("check-config runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("storage.backend"));
}

#[test]
fn route_explain_shows_matches_and_reasons() {
    let dir = std::env::temp_dir().join(format!("wsbridge-explain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let frame = dir.join("frame.json");
    std::fs::write(
        &frame,
        r#"{"event_type":"call.status","timestamp":"2024-01-15T10:30:00Z","topic":"customer_id:abc123:call:x1","data":{"id":"x1","status":"answered"}}"#,
    )
    .expect("write frame");
    let out = wsbridge()
        .args(["route", "--config", "config.toml", "--explain"])
        .arg(&frame)
        .output()
        .expect("route runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("route \"calls-to-crm\": MATCH    -> crm"),
        "{stdout}"
    );
    assert!(
        stdout.contains("route \"payments-to-crm\": no match"),
        "{stdout}"
    );
    assert!(stdout.contains("/status is \"answered\""), "{stdout}");
    assert!(stdout.contains("webhooks: crm"), "{stdout}");
    // A control frame is not an event: a clear error, non-zero exit.
    std::fs::write(&frame, r#"{"type":"pong","timestamp":1}"#).expect("write frame");
    let out = wsbridge()
        .args([
            "route",
            "--config",
            "config.toml",
            "--upstream",
            "voicepact-main",
            "--explain",
        ])
        .arg(&frame)
        .output()
        .expect("route runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("control frame"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The first line of `text` that `pred` takes; panics showing `text` when none does.
fn line_with(text: &str, pred: impl Fn(&str) -> bool) -> &str {
    text.lines()
        .find(|l| pred(l))
        .unwrap_or_else(|| panic!("no such line in:\n{text}"))
}

/// Runs `cmd`, asserts it succeeded (showing its stderr if not), and returns its stdout.
fn succeeds(cmd: &mut Command) -> String {
    let out = cmd.output().expect("wsbridge runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn dialect_check_passes_the_kraken_example_file() {
    let stdout = succeeds(wsbridge().args(["dialect", "check", "examples/dialects/kraken.toml"]));
    assert!(
        stdout.contains("examples/dialects/kraken.toml: ok (dialect \"kraken\""),
        "{stdout}"
    );
}

/// A fresh directory for one CLI test's files.
fn cli_dir(tag: &str) -> std::path::PathBuf {
    crate::common::temp_dir(&format!("cli-{tag}"))
}

/// The shipped VoIPBIN dialect renamed `name`, its examples' types renamed with it.
fn voipbin_copy(name: &str) -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/adapters/voipbin.toml"
    ))
    .expect("the shipped voipbin dialect")
    .replace("name = \"voipbin\"", &format!("name = \"{name}\""))
    .replace("\"voipbin.", &format!("\"{name}."))
}

#[test]
fn dialect_check_passes_good_files_and_shows_every_failure() {
    let dir = cli_dir("dialect-check");
    let good = dir.join("myvoip.toml");
    std::fs::write(&good, voipbin_copy("myvoip")).expect("write");
    let stdout = succeeds(
        wsbridge()
            .args(["dialect", "check"])
            .arg(&good)
            .arg("adapters/hashi.toml"),
    );
    assert!(
        stdout.contains("myvoip.toml: ok (dialect \"myvoip\", 19 examples)"),
        "{stdout}"
    );
    assert!(stdout.contains("adapters/hashi.toml: ok"), "{stdout}");

    // A bad jq expression: refused with the file, the key and jq's message.
    let bad_jq = dir.join("bad-jq.toml");
    std::fs::write(
        &bad_jq,
        voipbin_copy("badjq").replacen("type = '.event_type |", "type = '.event_type | |", 1),
    )
    .expect("write");
    // A failing example: the frame says "ringing", the example "answered".
    let failing = dir.join("failing.toml");
    let text = voipbin_copy("failing");
    let wrong = text.replacen(
        "data = { \"id\" = \"c-0\", \"status\" = \"ringing\" }",
        "data = { \"id\" = \"c-0\", \"status\" = \"answered\", \"extra\" = 1 }",
        1,
    );
    assert_ne!(wrong, text, "the example changed");
    std::fs::write(&failing, wrong).expect("write");
    // An example setting a parameter the dialect does not have.
    let stray = dir.join("stray-param.toml");
    std::fs::write(
        &stray,
        "[dialect]\nname = \"stray\"\n[params]\napi_key = { required = true }\n[connect]\nurl = '$url + \"?k=\" + $api_key'\n[[events]]\ntype = '.kind'\n[[examples]]\nframe = '{\"kind\":\"a\"}'\nparams = { api_kee = \"x\" }\ntype = \"stray.a\"\ndata = { kind = \"a\" }\n",
    )
    .expect("write");
    let out = wsbridge()
        .args(["dialect", "check"])
        .arg(&good)
        .arg(&bad_jq)
        .arg(&failing)
        .arg(&stray)
        .output()
        .expect("dialect check runs");
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("myvoip.toml: ok"),
        "the good file still passes: {stdout}"
    );
    let jq_line = line_with(&stderr, |l| l.contains("bad-jq.toml"));
    assert!(
        jq_line.contains("events[0].type") && jq_line.contains("jq"),
        "{jq_line}"
    );
    assert!(
        stderr.contains("failing.toml: 1 of 19 examples fail"),
        "{stderr}"
    );
    assert!(stderr.contains("examples[0] (call.status)"), "{stderr}");
    assert!(
        stderr.contains(r#"data/status: got "ringing", expected "answered""#),
        "{stderr}"
    );
    assert!(
        stderr.contains("data/extra: missing, expected 1"),
        "{stderr}"
    );
    assert!(
        stderr.contains("stray-param.toml: examples[0]")
            && stderr.contains("params.api_kee: not a parameter of this dialect"),
        "{stderr}"
    );
}

#[test]
fn dialect_decode_prints_envelopes_and_keeps_going_after_errors() {
    use std::io::Write;
    use std::process::Stdio;
    let dir = cli_dir("dialect-decode");
    let file = dir.join("myvoip.toml");
    std::fs::write(&file, voipbin_copy("myvoip")).expect("write");
    let frames = [
        r#"{"event_type":"call.status","timestamp":"2024-01-15T10:30:00.000000Z","topic":"customer_id:abc123:call:c1","data":{"id":"c1","status":"ringing"}}"#,
        "not json at all",
        r#"{"no_type":true}"#,
        r#"{"event_type":"message.received","timestamp":"2024-01-15T10:31:00Z","data":{"id":"m1"}}"#,
    ];
    let mut child = wsbridge()
        .args(["dialect", "decode"])
        .arg(&file)
        .args([
            "--param",
            "token=t0k",
            "--param",
            "url=ws://127.0.0.1:9102/v1.0/ws",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("dialect decode starts");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(format!("{}\n", frames.join("\n")).as_bytes())
        .expect("frames written");
    drop(stdin);
    let out = child.wait_with_output().expect("dialect decode ends");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a frame failed: exit 1\n{stderr}"
    );
    let envelopes: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    assert_eq!(envelopes.len(), 2, "{stdout}");
    assert_eq!(envelopes[0]["type"], "myvoip.call.status");
    assert_eq!(envelopes[0]["provider"], "myvoip");
    assert_eq!(envelopes[0]["subject"], "customer_id:abc123:call:c1");
    assert_eq!(envelopes[0]["time"], "2024-01-15T10:30:00Z");
    assert_eq!(envelopes[0]["data"]["status"], "ringing");
    assert_eq!(envelopes[1]["type"], "myvoip.message.received");
    assert!(stderr.contains("line 2: decode error"), "{stderr}");
    assert!(stderr.contains("line 3: decode error"), "{stderr}");
    assert!(
        !stderr.contains("line 1:") && !stderr.contains("line 4:"),
        "{stderr}"
    );

    // A required parameter left out is named, and nothing is read.
    let out = wsbridge()
        .args(["dialect", "decode"])
        .arg(&file)
        .stdin(Stdio::null())
        .output()
        .expect("dialect decode runs");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("myvoip needs `token`"), "{stderr}");
}

#[test]
fn dialect_list_shows_the_built_ins_and_loaded_files() {
    let dir = cli_dir("dialect-list");
    std::fs::write(dir.join("myvoip.toml"), voipbin_copy("myvoip")).expect("write");
    let out = wsbridge()
        .args(["dialect", "list"])
        .arg(&dir)
        .output()
        .expect("dialect list runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for name in ["voicepact", "voipbin", "hashi"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(name) && l.contains(&format!("built-in {name}"))),
            "{name}: {stdout}"
        );
    }
    let mine = line_with(&stdout, |l| l.starts_with("myvoip"));
    assert!(
        mine.contains("myvoip.toml") && mine.contains("VoIPBIN real-time events"),
        "{mine}"
    );
    assert!(
        stdout.contains("token (string, required, secret)"),
        "{stdout}"
    );
}

#[test]
fn route_explain_decodes_a_raw_frame_of_a_users_dialect() {
    let dir = cli_dir("explain-user-dialect");
    std::fs::create_dir_all(dir.join("dialects")).expect("dialects dir");
    std::fs::write(dir.join("dialects/myvoip.toml"), voipbin_copy("myvoip")).expect("write");
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        r#"
[storage]
path = "j.db"
[dialects]
paths = ["dialects"]
[[upstreams]]
name = "vp"
adapter = "voicepact"
url = "ws://127.0.0.1:9101/api/v1/ws"
client_id = "+1"
[[upstreams]]
name = "mine"
adapter = "myvoip"
url = "ws://127.0.0.1:9102/v1.0/ws"
token = "t"
[[webhooks]]
name = "crm"
url = "http://127.0.0.1:9200/hooks"
secrets = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]
allow_private = true
[[routes]]
name = "mine-calls"
providers = ["myvoip"]
types = ["myvoip.call.*"]
to = ["crm"]
"#,
    )
    .expect("write config");
    let frame = dir.join("frame.json");
    std::fs::write(
        &frame,
        r#"{"event_type":"call.status","timestamp":"2024-01-15T10:30:00Z","topic":"customer_id:abc123:call:x1","data":{"id":"x1","status":"answered"}}"#,
    )
    .expect("write frame");
    let stdout = succeeds(
        wsbridge()
            .args(["route", "--config"])
            .arg(&config)
            .arg("--explain")
            .arg(&frame),
    );
    assert!(
        stdout.contains(
            "event: myvoip.call.status (subject customer_id:abc123:call:x1, provider myvoip)"
        ) && stdout.contains("decoded as upstream \"mine\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("route \"mine-calls\": MATCH    -> crm"),
        "{stdout}"
    );
}
