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
