//! `wsbridge tail` and `wsbridge admin` as a user runs them: the built binary against a live
//! bridge on an ephemeral port (real simulator, journal file and webhook receiver), read from
//! its stdout, stderr and exit code.

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use wsbridge::bridge::Bridge;
use wsbridge_adapters::sim::Simulator;
use wsbridge_adapters::Provider;

use crate::common::examples::{blocking, Running};
use crate::common::receiver::{Answer, Receiver};
use crate::common::*;

const CONSUMER_TOKEN: &str = "cli-consumer-token-7f3a";
const ADMIN_TOKEN: &str = "cli-admin-token-91c2";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The binary with the bridge's URL and no token variables inherited from the environment.
fn wsbridge(bridge: &Bridge) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wsbridge"));
    c.env("WSBRIDGE_URL", format!("http://{}", bridge.local_addr()))
        .env_remove("WSBRIDGE_TOKEN")
        .env_remove("WSBRIDGE_ADMIN_TOKEN");
    c
}

/// Runs `cmd` to its end off the runtime.
async fn output(mut cmd: Command) -> Output {
    blocking(move || cmd.output().expect("wsbridge runs")).await
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `cmd`'s stdout, failing the test with its stderr unless it exits 0.
async fn succeeds(cmd: Command) -> (String, String) {
    let shown = format!("{cmd:?}");
    let out = output(cmd).await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    (stdout, stderr)
}

/// `cmd`'s stderr, failing the test unless it exits 1.
async fn fails(cmd: Command) -> String {
    let shown = format!("{cmd:?}");
    let out = output(cmd).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{shown}: {stderr}");
    stderr
}

/// A VoIPBIN simulator and a bridge with a consumer, the admin token and `blocks`.
async fn live_bridge(blocks: &[String]) -> (Bridge, Simulator) {
    let vb = start_sim(Provider::Voipbin).await;
    let mut all = vec![
        upstream_block("vb", &vb, FAST),
        format!("[[consumers]]\nname = \"terminal\"\ntoken = \"{CONSUMER_TOKEN}\"\n"),
    ];
    all.extend_from_slice(blocks);
    let cfg = config_with_admin(&all, ADMIN_TOKEN);
    let (bridge, _rx) = start_bridge(&cfg).await;
    wait_sim_ready(&vb, 1).await;
    (bridge, vb)
}

/// Emits calls `range` and waits until the bridge has published `total` events.
async fn emit_calls(bridge: &Bridge, vb: &Simulator, range: std::ops::Range<usize>, total: u64) {
    for i in range {
        assert_eq!(vb.emit(numbered_call(i)).await, 1);
    }
    wait_published(bridge, total).await;
}

/// The next stdout line of a running tail, within the deadline.
async fn next_line(tail: Running) -> (Running, String) {
    blocking(move || {
        let line = tail
            .lines
            .recv_timeout(DEADLINE)
            .unwrap_or_else(|e| panic!("no line from tail ({e}); stderr:\n{}", tail.stderr()));
        (tail, line)
    })
    .await
}

/// Waits for a running tail to exit; its exit code and all of its stderr.
async fn exit_of(mut tail: Running) -> (Option<i32>, String) {
    blocking(move || {
        let deadline = std::time::Instant::now() + DEADLINE;
        loop {
            if let Some(status) = tail.child.try_wait().expect("try_wait") {
                tail.read_all_stderr();
                return (status.code(), tail.stderr());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "tail did not exit within {DEADLINE:?}; stderr:\n{}",
                tail.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    })
    .await
}

/// Waits until a running tail says on stderr that it is subscribing.
async fn wait_tailing(tail: &Running) {
    eventually("tail to connect", DEADLINE, || async {
        tail.stderr().contains("tailing ").then_some(())
    })
    .await;
}

fn interrupt(tail: &Running) {
    let pid = tail.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill runs")
        .success());
}

#[tokio::test]
async fn tail_prints_readable_lines_or_envelopes_with_filters_from_a_position() {
    let (bridge, vb) = live_bridge(&[]).await;
    emit_calls(&bridge, &vb, 1..4, 3).await;

    let mut cmd = wsbridge(&bridge);
    cmd.args(["tail", "--from", "earliest", "--count", "3"])
        .env("WSBRIDGE_TOKEN", CONSUMER_TOKEN);
    let (stdout, stderr) = succeeds(cmd).await;
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    for (i, line) in lines.iter().enumerate() {
        let n = i + 1;
        assert!(line.starts_with(&format!("#{n} ")), "{line}");
        assert!(line.contains("voipbin.call.status"), "{line}");
        assert!(
            line.contains(&format!("customer_id:abc123:call:c{n}")),
            "{line}"
        );
        assert!(line.contains("2024-01-15T10:30:00"), "{line}");
    }
    assert!(stderr.contains("consumer terminal"), "{stderr}");
    assert!(!stderr.contains(CONSUMER_TOKEN), "{stderr}");

    // Filters and a seq: only call c3 matches the subject, from seq 2 on.
    let mut cmd = wsbridge(&bridge);
    cmd.args([
        "tail",
        "--json",
        "--from",
        "2",
        "--provider",
        "voipbin",
        "--type",
        "voipbin.call.*",
        "--subject",
        "customer_id:abc123:call:c3",
        "--count",
        "1",
        "--token",
        CONSUMER_TOKEN,
    ]);
    let (stdout, _) = succeeds(cmd).await;
    let envelopes: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert_eq!(envelopes.len(), 1, "{stdout}");
    assert_eq!(envelopes[0]["subject"], "customer_id:abc123:call:c3");
    assert_eq!(envelopes[0]["seq"], 3);
    assert_eq!(envelopes[0]["data"]["n"], 3);
    bridge.shutdown().await;
}

#[tokio::test]
async fn tail_follows_live_events_and_stops_cleanly_on_ctrl_c() {
    let (bridge, vb) = live_bridge(&[]).await;
    emit_calls(&bridge, &vb, 1..2, 1).await;
    // Pings every 250 ms: the bridge's pongs keep the tail going (a tail gives up after
    // twice that without an answer, so a loaded test machine needs some room).
    let mut cmd = wsbridge(&bridge);
    cmd.args(["tail", "--from", "earliest", "--keepalive", "250ms"])
        .env("WSBRIDGE_TOKEN", CONSUMER_TOKEN);
    let tail = Running::start("wsbridge tail", cmd);
    let (tail, first) = next_line(tail).await;
    assert!(first.starts_with("#1 "), "{first}");
    // The replayed event came; a new one arrives live on the same session.
    emit_calls(&bridge, &vb, 2..3, 2).await;
    let (tail, second) = next_line(tail).await;
    assert!(
        second.starts_with("#2 ") && second.contains("call:c2"),
        "{second}"
    );
    interrupt(&tail);
    let (code, stderr) = exit_of(tail).await;
    assert_eq!(code, Some(0), "Ctrl-C is a clean exit: {stderr}");
    assert!(!stderr.contains("error"), "{stderr}");
    bridge.shutdown().await;
}

#[tokio::test]
async fn tail_fails_clearly_on_refusals_and_closes() {
    let (bridge, _vb) = live_bridge(&[]).await;

    // A wrong token: refused before the upgrade, the token not echoed.
    let mut cmd = wsbridge(&bridge);
    cmd.args(["tail"])
        .env("WSBRIDGE_TOKEN", "not-a-consumer-token-5521");
    let stderr = fails(cmd).await;
    assert!(
        stderr.contains("401") && stderr.contains("consumer token"),
        "{stderr}"
    );
    assert!(!stderr.contains("not-a-consumer-token-5521"), "{stderr}");

    // A pattern the protocol refuses: the error frame's code.
    let mut cmd = wsbridge(&bridge);
    cmd.args(["tail", "--type", "a.**.b"])
        .env("WSBRIDGE_TOKEN", CONSUMER_TOKEN);
    let stderr = fails(cmd).await;
    assert!(stderr.contains("bad_pattern"), "{stderr}");

    // A position beyond the journal's head.
    let mut cmd = wsbridge(&bridge);
    cmd.args(["tail", "--from", "1000"])
        .env("WSBRIDGE_TOKEN", CONSUMER_TOKEN);
    let stderr = fails(cmd).await;
    assert!(stderr.contains("unrecoverable_position"), "{stderr}");

    // The bridge shuts down under a running tail: the close code, exit 1.
    let mut cmd = wsbridge(&bridge);
    cmd.args(["tail"]).env("WSBRIDGE_TOKEN", CONSUMER_TOKEN);
    let tail = Running::start("wsbridge tail", cmd);
    wait_tailing(&tail).await;
    bridge.shutdown().await;
    let (code, stderr) = exit_of(tail).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("closed the connection") && stderr.contains("1001"),
        "{stderr}"
    );
}

/// A peer that upgrades, says `ready` and then reads without ever answering (a bridge behind a
/// connection that went dead without a close): the tail's pings go unanswered and it exits.
#[tokio::test]
async fn tail_gives_up_on_a_bridge_that_stops_answering() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let silent = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut ws = tokio_tungstenite::accept_async(tcp).await.expect("upgrade");
        let ready = serde_json::json!({"op": "ready", "session": "s1", "consumer": "c",
                                       "epoch": "e", "head": 0});
        ws.send(Message::text(ready.to_string()))
            .await
            .expect("ready sent");
        let mut read = 0usize;
        while let Some(Ok(_)) = ws.next().await {
            read += 1;
        }
        read
    });
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsbridge"));
    cmd.args(["tail", "--keepalive", "100ms", "--url"])
        .arg(format!("http://{addr}"))
        .env("WSBRIDGE_TOKEN", CONSUMER_TOKEN);
    let stderr = fails(cmd).await;
    assert!(
        stderr.contains("no answer from the bridge for 200ms"),
        "{stderr}"
    );
    let read = tokio::time::timeout(DEADLINE, silent)
        .await
        .expect("the peer's reader ends")
        .expect("peer task");
    // The subscribe, the ping after 100 ms, and the close.
    assert!(read >= 3, "{read} frames read");
}

#[tokio::test]
async fn admin_commands_list_dead_letters_replay_with_progress_and_re_enable() {
    // An endpoint that refuses every connection: each event is dead-lettered after one retry.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("probe port");
    let addr = probe.local_addr().expect("probe addr");
    drop(probe);
    let (bridge, vb) = live_bridge(&[
        format!(
            "[[webhooks]]\nname = \"crm\"\nurl = \"http://{addr}/hooks\"\nsecrets = [\"{SECRET}\"]\nallow_private = true\nretry = [\"50ms\"]\ntimeout = \"5s\"\n"
        ),
        "[[routes]]\nname = \"calls\"\nproviders = [\"voipbin\"]\nto = [\"crm\"]\n".to_string(),
    ])
    .await;
    emit_calls(&bridge, &vb, 1..4, 3).await;
    let store = bridge.store().clone();
    eventually("three dead letters", DEADLINE, || async {
        let dead = store.counts("crm").await.expect("counts").dead;
        (dead == 3).then_some(()).ok_or(dead)
    })
    .await;
    let admin = |args: &[&str]| {
        let mut cmd = wsbridge(&bridge);
        cmd.arg("admin")
            .args(args)
            .env("WSBRIDGE_ADMIN_TOKEN", ADMIN_TOKEN);
        cmd
    };

    let (stdout, _) = succeeds(admin(&["upstreams"])).await;
    let row = stdout
        .lines()
        .find(|l| l.starts_with("vb "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        row.contains("voipbin") && row.contains("subscribed"),
        "{row}"
    );
    assert!(stdout.starts_with("NAME"), "{stdout}");

    let (stdout, _) = succeeds(admin(&["webhooks"])).await;
    let row: Vec<&str> = stdout
        .lines()
        .find(|l| l.starts_with("crm "))
        .unwrap_or_else(|| panic!("{stdout}"))
        .split_whitespace()
        .collect();
    // NAME ENABLED PENDING IN_FLIGHT DEAD ...
    assert_eq!(&row[..5], ["crm", "yes", "0", "0", "3"], "{stdout}");

    let (stdout, _) = succeeds(admin(&["dead-letters", "crm"])).await;
    let rows: Vec<&str> = stdout.lines().skip(1).collect();
    assert_eq!(rows.len(), 3, "{stdout}");
    for row in &rows {
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[2], "2", "one attempt and one retry: {row}");
        assert!(row.contains("refused") || row.contains("connect"), "{row}");
    }
    let (json_out, _) = succeeds(admin(&["dead-letters", "crm", "--json"])).await;
    let listed: Value = serde_json::from_str(&json_out).expect("JSON");
    let first_id = listed["deliveries"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["seq"] == 1))
        .and_then(|d| d["id"].as_str())
        .unwrap_or_else(|| panic!("{listed}"))
        .to_string();

    // The endpoint comes back answering 410 once: it is disabled, then re-enabled.
    let rx = Receiver::start_on(addr, vec![Answer::status(410)], Answer::status(200)).await;
    let (stdout, _) = succeeds(admin(&["replay", "crm", "--ids", &first_id])).await;
    assert_eq!(stdout.trim(), "queued 1 deliveries to crm");
    rx.wait_for(1, DEADLINE).await;
    let stdout = eventually("crm disabled by the 410", DEADLINE, || async {
        let (stdout, _) = succeeds(admin(&["webhooks"])).await;
        stdout
            .lines()
            .any(|l| l.starts_with("crm ") && l.contains(" no ("))
            .then_some(stdout.clone())
            .ok_or(stdout)
    })
    .await;
    assert!(stdout.contains("410"), "{stdout}");
    let (stdout, _) = succeeds(admin(&["enable", "crm"])).await;
    assert_eq!(stdout.trim(), "webhook crm enabled");
    let got = rx.wait_for(2, DEADLINE).await;
    assert_eq!(got[1].answered, 200);
    assert_eq!(got[1].header("webhook-id"), first_id);

    // The other two dead letters, then a seq range in chunks of one, with progress.
    let (stdout, _) = succeeds(admin(&["replay", "crm", "--dead"])).await;
    assert_eq!(stdout.trim(), "queued 2 deliveries to crm");
    rx.wait_for(4, DEADLINE).await;
    let mut cmd = admin(&[
        "replay",
        "crm",
        "--from-seq",
        "1",
        "--to-seq",
        "3",
        "--chunk",
        "1",
    ]);
    cmd.env_remove("WSBRIDGE_URL")
        .args(["--url", &format!("http://{}", bridge.local_addr())]);
    let (stdout, stderr) = succeeds(cmd).await;
    assert_eq!(stdout.trim(), "queued 3 deliveries to crm");
    let progress: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("replay crm"))
        .collect();
    assert_eq!(progress.len(), 3, "{stderr}");
    assert!(progress[0].contains("(33%)"), "{stderr}");
    assert!(progress[2].contains("(100%)"), "{stderr}");
    rx.wait_for(7, DEADLINE).await;

    // Refusals: the wrong token (never echoed), an unknown webhook, no token at all.
    let mut cmd = admin(&["webhooks"]);
    cmd.env("WSBRIDGE_ADMIN_TOKEN", "wrong-admin-token-3384");
    let stderr = fails(cmd).await;
    assert!(
        stderr.contains("401") && !stderr.contains("wrong-admin-token-3384"),
        "{stderr}"
    );
    let stderr = fails(admin(&["enable", "nope"])).await;
    assert!(
        stderr.contains("404") && stderr.contains("no webhook named"),
        "{stderr}"
    );
    let mut cmd = admin(&["upstreams"]);
    cmd.env_remove("WSBRIDGE_ADMIN_TOKEN");
    let stderr = fails(cmd).await;
    assert!(stderr.contains("WSBRIDGE_ADMIN_TOKEN"), "{stderr}");
    bridge.shutdown().await;
}
