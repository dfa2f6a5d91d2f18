//! Finding 13: a config error names the item (`webhooks[1] ("lan-hook").url: …`), not only
//! its index, for upstreams, webhooks, routes and consumers, and the index is the entry's
//! position in the file even when an earlier entry could not be parsed at all.

use std::process::Command;

/// Runs `wsbridge check-config` on `text`; returns (exit code, stderr).
pub fn check_config(tag: &str, text: &str) -> (Option<i32>, String) {
    let file = crate::common::temp_dir(tag).join("wsbridge.toml");
    std::fs::write(&file, text).expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_wsbridge"))
        .arg("check-config")
        .arg(&file)
        .output()
        .expect("check-config runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[test]
fn check_config_names_each_bad_item_by_index_and_name() {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"

[[upstreams]]
name = "vb-main"
adapter = "voipbin"
url = "ws://127.0.0.1:9102/v1.0/ws"
token = "t0k"
topics = ["customer_id:abc123:call:*"]

[[upstreams]]
name = "vb-lan"
adapter = "voipbin"
url = "ws://127.0.0.1:9103/v1.0/ws"
token = "t0k"
topics = ["not-a-topic"]

# Fails to parse as a whole (not an http URL): the next entry keeps its own index.
[[webhooks]]
name = "crm"
url = "ftp://crm.example/hook"
secrets = ["{SECRET}"]

[[webhooks]]
name = "lan-hook"
url = "http://192.168.1.10/hook"
secrets = ["{SECRET}"]

[[routes]]
name = "calls"
to = ["nowhere"]

[[consumers]]
name = "dash"
token = "short"
"#
    );
    let (code, stderr) = check_config("config-errors", &text);
    assert_eq!(code, Some(1), "{stderr}");
    for want in [
        r#"upstreams[1] ("vb-lan").topics: "#,
        r#"webhooks[0] ("crm").url: "#,
        r#"webhooks[1] ("lan-hook").url: "#,
        r#"routes[0] ("calls").to[0]: "#,
        r#"consumers[0] ("dash").token: "#,
    ] {
        assert!(stderr.contains(want), "{want} not reported:\n{stderr}");
    }
    assert!(
        !stderr.contains(r#"webhooks[0] ("lan-hook")"#),
        "lan-hook reported under the wrong index:\n{stderr}"
    );
    assert!(!stderr.contains(SECRET), "a secret leaked:\n{stderr}");
}

#[test]
fn an_entry_without_a_usable_name_is_named_by_its_index_only() {
    let text = r#"
[[upstreams]]
name = 7
adapter = "voipbin"
url = "ws://127.0.0.1:9102/v1.0/ws"
"#;
    let (code, stderr) = check_config("config-errors-noname", text);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("upstreams[0].name: "), "{stderr}");
}
