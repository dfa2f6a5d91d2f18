//! Finding 10: durations are bounded at validation, naming the key, so that no configured
//! duration can overflow an `Instant` (a supervisor that panicked while `/v1/status` still
//! said `subscribed`) or the retry jitter (a panicked attempt that leaked its in-flight
//! slot). The supervision of upstream and dispatcher tasks (shown `failed`, counted,
//! restarted) is tested in `src/supervise.rs` with a task that panics, since after these
//! bounds no configuration makes a real task die.

use super::config_errors::check_config;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn upstream(extra: &str) -> String {
    format!(
        r#"
[[upstreams]]
name = "vb-main"
adapter = "voipbin"
url = "ws://127.0.0.1:9102/v1.0/ws"
token = "t0k"
topics = ["customer_id:abc123:call:*"]
{extra}
"#
    )
}

#[test]
fn check_config_refuses_an_enormous_ping_interval_naming_the_key() {
    let (code, stderr) = check_config(
        "durations-ping",
        &upstream("ping_interval = \"500000000000y\""),
    );
    assert_eq!(code, Some(1), "accepted:\n{stderr}");
    assert!(
        stderr.contains(r#"upstreams[0] ("vb-main").ping_interval: "#),
        "{stderr}"
    );
}

#[test]
fn check_config_bounds_every_duration_key() {
    let text = format!(
        r#"
[server]
shutdown_grace = "30d"

[storage]
retention = "400000y"
lease_ttl = "90d"
duplicate_window = "0s"
{}
[[webhooks]]
name = "crm"
url = "http://127.0.0.1:9/hook"
allow_private = true
secrets = ["{SECRET}"]
retry = ["5s", "0s", "100000000y"]
timeout = "0s"
"#,
        upstream(
            "backoff_initial = \"0s\"\nbackoff_max = \"90d\"\nping_interval = \"1ms\"\nstale_after = \"3y\"\nhealthy_after = \"10y\"\nconnect_timeout = \"1000000000y\""
        )
    );
    let (code, stderr) = check_config("durations-all", &text);
    assert_eq!(code, Some(1), "accepted:\n{stderr}");
    for key in [
        "server.shutdown_grace: ",
        "storage.retention: ",
        "storage.lease_ttl: ",
        "storage.duplicate_window: ",
        r#"upstreams[0] ("vb-main").backoff_initial: "#,
        r#"upstreams[0] ("vb-main").backoff_max: "#,
        r#"upstreams[0] ("vb-main").ping_interval: "#,
        r#"upstreams[0] ("vb-main").stale_after: "#,
        r#"upstreams[0] ("vb-main").healthy_after: "#,
        r#"upstreams[0] ("vb-main").connect_timeout: "#,
        r#"webhooks[0] ("crm").retry[1]: "#,
        r#"webhooks[0] ("crm").retry[2]: "#,
        r#"webhooks[0] ("crm").timeout: "#,
    ] {
        assert!(stderr.contains(key), "{key} not refused:\n{stderr}");
    }
    assert!(
        !stderr.contains("retry[0]"),
        "a sane step was refused:\n{stderr}"
    );
}
