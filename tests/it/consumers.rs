//! The example WebSocket consumers (examples/consumers/*) against the real bridge: a simulated
//! VoIPBIN feed, the bridge's unified endpoint `/v1/ws` (README, "Consumers: the unified
//! WebSocket endpoint"), and each consumer run as a child process whose stdout is parsed per
//! its README's contract (`READY <epoch> <head>`, `EVENT <seq> <type> <subject> <id>`).
//!
//! What is checked: a first run from `earliest` prints exactly the journalled events, in
//! order, and saves its cursor; a second run with the same state file resumes from it, with
//! no gap and no duplicate; a cursor from another store (another epoch) is refused by the
//! bridge with `unrecoverable_position` and the consumer re-syncs from `earliest` (or exits
//! with status 4 when told to); a token the bridge refuses makes the consumer exit with
//! status 3 at once instead of retrying forever; with `--durable` (the bridge keeps the
//! cursor) a second run gets exactly what the first did not acknowledge, and the Python and
//! the Node consumer on one durable share its events, each once.
//!
//! The Python consumer's dependency (`websockets`) is installed from PyPI into a venv under
//! the cargo target's scratch directory, the Node consumer's (`ws`) from npm: if that fails
//! the test fails (it never skips).

use std::path::Path;
use std::process::{Command, ExitStatus};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::common::examples::{blocking, Examples, Running};
use crate::common::*;
use serde_json::{json, Value};
use wsbridge::bridge::Bridge;
use wsbridge_adapters::sim::Simulator;
use wsbridge_adapters::Provider;

const TOKEN: &str = "token-example-consumer";
const EVENT_TYPE: &str = "voipbin.call.status";
/// How long one consumer run may take, interpreter start-up included.
const RUN_DEADLINE: Duration = Duration::from_secs(30);
/// How long a consumer that closed its stdout may take to exit.
const EXIT_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug)]
enum Lang {
    Python,
    Node,
}

impl Lang {
    fn name(self) -> &'static str {
        match self {
            Lang::Python => "python",
            Lang::Node => "node",
        }
    }

    /// The consumer's command line (dependencies installed first), before its own flags.
    fn command(self) -> Command {
        match self {
            Lang::Python => Examples::Consumers.python(),
            Lang::Node => Examples::Consumers.node(),
        }
    }
}

/// A consumer child process; killed when dropped, also when the test panics.
struct ConsumerProc {
    what: String,
    run: Running,
}

/// How a consumer run ended.
struct Finished {
    status: ExitStatus,
    stdout: Vec<String>,
    stderr: String,
}

impl ConsumerProc {
    fn start(what: String, cmd: Command) -> Self {
        let run = Running::start(&what, cmd);
        Self { what, run }
    }

    fn fail(&self, why: &str, stdout: &[String]) -> ! {
        panic!(
            "{}: {why}\n--- its stdout\n{}\n--- its stderr\n{}",
            self.what,
            stdout.join("\n"),
            self.run.stderr()
        )
    }

    /// Reads stdout until the consumer closes it, then waits for its exit; fails if either
    /// takes longer than `within` (a consumer that never exits is killed by `Drop`).
    fn finish(mut self, within: Duration) -> Finished {
        let deadline = Instant::now() + within;
        let mut stdout = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.run.lines.recv_timeout(left) {
                Ok(line) => stdout.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    self.fail(&format!("still running after {within:?}"), &stdout)
                }
            }
        }
        // Its stdout is closed, so it is exiting: wait for that, within a deadline.
        let exit_deadline = Instant::now() + EXIT_DEADLINE;
        let status = loop {
            match self.run.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < exit_deadline => {
                    thread::sleep(Duration::from_millis(10))
                }
                Ok(None) => self.fail(
                    &format!("closed its stdout but did not exit within {EXIT_DEADLINE:?}"),
                    &stdout,
                ),
                Err(e) => self.fail(&format!("wait failed: {e}"), &stdout),
            }
        };
        // It exited, so its stderr is closed too (it starts no processes of its own).
        self.run.read_all_stderr();
        Finished {
            status,
            stdout,
            stderr: self.run.stderr(),
        }
    }
}

/// Runs the consumer with `args` to its exit (within [`RUN_DEADLINE`]).
async fn run_consumer(lang: Lang, what: &str, args: Vec<String>) -> Finished {
    let what = format!("{} consumer ({what})", lang.name());
    blocking(move || {
        let mut cmd = lang.command();
        cmd.args(&args);
        ConsumerProc::start(what, cmd).finish(RUN_DEADLINE)
    })
    .await
}

fn describe(run: &Finished) -> String {
    format!(
        "exit {}\n--- stdout\n{}\n--- stderr\n{}",
        run.status,
        run.stdout.join("\n"),
        run.stderr
    )
}

struct Setup {
    bridge: Bridge,
    vb: Simulator,
    published: tokio::sync::broadcast::Receiver<Arc<wsbridge::envelope::Published>>,
}

async fn setup() -> Setup {
    let vb = start_sim(Provider::Voipbin).await;
    let cfg = config(&[
        upstream_block("vb", &vb, FAST),
        format!("[[consumers]]\nname = \"example\"\ntoken = \"{TOKEN}\"\n"),
    ]);
    let (bridge, published) = start_bridge(&cfg).await;
    wait_sim_ready(&vb, 1).await;
    Setup {
        bridge,
        vb,
        published,
    }
}

/// Emits calls `range` and returns the `EVENT` line the contract prints for each, from what
/// the bridge journalled (seq, type, subject, id), once all are stored.
async fn emit(s: &mut Setup, range: std::ops::Range<usize>) -> Vec<String> {
    let mut lines = Vec::new();
    for i in range {
        assert_eq!(
            s.vb.emit(numbered_call(i)).await,
            1,
            "call {i} reached no bridge"
        );
        let p = next_matching(&mut s.published, &format!("call c{i} published"), |p| {
            p.envelope.data["n"] == json!(i)
        })
        .await;
        let e = &p.envelope;
        assert_eq!(e.event_type, EVENT_TYPE);
        lines.push(format!(
            "EVENT {} {} {} {}",
            e.seq.expect("a published event has a seq"),
            e.event_type,
            e.subject.as_deref().expect("a VoIPBIN call has a subject"),
            e.id
        ));
    }
    lines
}

fn seqs(lines: &[String]) -> Vec<u64> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("EVENT "))
        .map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            assert_eq!(fields.len(), 4, "an EVENT line has five fields: {l:?}");
            fields[0].parse().expect("a numeric seq")
        })
        .collect()
}

fn read_cursor(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("state file {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("state file is not JSON ({e}): {text}"))
}

/// Five events, a run from `earliest` that stops after five, five more, and a second run
/// that resumes from the state file: seqs 1..5 then 6..10, each printed exactly once.
async fn reads_and_resumes_from_its_state_file(lang: Lang) {
    let mut s = setup().await;
    let epoch = s.bridge.store().position().await.expect("position").epoch;
    let dir = temp_dir(&format!("consumer-{}", lang.name()));
    let state = dir.join("cursor.json");
    // `--from earliest` in both runs: in the second, the cursor in the state file must win.
    let args = vec![
        "--url".to_string(),
        format!("ws://{}/v1/ws", s.bridge.local_addr()),
        "--token".into(),
        TOKEN.into(),
        "--from".into(),
        "earliest".into(),
        "--max-events".into(),
        "5".into(),
        "--state-file".into(),
        state.display().to_string(),
    ];

    let first_events = emit(&mut s, 1..6).await;
    assert_eq!(seqs(&first_events), vec![1, 2, 3, 4, 5]);
    let first = run_consumer(lang, "first run", args.clone()).await;
    assert!(first.status.success(), "first run: {}", describe(&first));
    let mut expected = vec![format!("READY {epoch} 5")];
    expected.extend(first_events.iter().cloned());
    assert_eq!(
        first.stdout,
        expected,
        "first run: one READY, then seqs 1..5 as journalled\n{}",
        describe(&first)
    );
    assert_eq!(
        read_cursor(&state),
        json!({"epoch": epoch, "last_seq": 5}),
        "cursor after the first run\n{}",
        describe(&first)
    );

    // Five more while no consumer runs; the second run resumes from the cursor.
    let second_events = emit(&mut s, 6..11).await;
    assert_eq!(seqs(&second_events), vec![6, 7, 8, 9, 10]);
    let second = run_consumer(lang, "resumed run", args).await;
    assert!(
        second.status.success(),
        "resumed run: {}",
        describe(&second)
    );
    let mut expected = vec![format!("READY {epoch} 10")];
    expected.extend(second_events.iter().cloned());
    assert_eq!(
        second.stdout,
        expected,
        "resumed run: one READY, then seqs 6..10, no gap and no duplicate\n{}",
        describe(&second)
    );
    assert_eq!(
        read_cursor(&state),
        json!({"epoch": epoch, "last_seq": 10}),
        "cursor after the resumed run\n{}",
        describe(&second)
    );

    // Together: every seq once, in order.
    let mut all = seqs(&first.stdout);
    all.extend(seqs(&second.stdout));
    assert_eq!(all, (1..=10).collect::<Vec<u64>>());
    s.bridge.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A state file from another store (another epoch): the bridge answers
/// `unrecoverable_position`, the consumer warns and re-syncs from `earliest` on the same
/// connection (the default), or exits with status 4 with `--on-unrecoverable exit`.
async fn re_syncs_when_its_cursor_is_from_another_store(lang: Lang) {
    let mut s = setup().await;
    let epoch = s.bridge.store().position().await.expect("position").epoch;
    let journalled = emit(&mut s, 1..6).await;
    let dir = temp_dir(&format!("consumer-resync-{}", lang.name()));
    let state = dir.join("cursor.json");
    let foreign = json!({"epoch": "another-store", "last_seq": 3});
    let args = |extra: &[&str]| {
        let mut args = vec![
            "--url".to_string(),
            format!("ws://{}/v1/ws", s.bridge.local_addr()),
            "--token".into(),
            TOKEN.into(),
            "--max-events".into(),
            "5".into(),
            "--state-file".into(),
            state.display().to_string(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    };

    std::fs::write(&state, foreign.to_string()).expect("write the state file");
    let exit = run_consumer(
        lang,
        "foreign cursor, --on-unrecoverable exit",
        args(&["--on-unrecoverable", "exit"]),
    )
    .await;
    assert_eq!(exit.status.code(), Some(4), "{}", describe(&exit));
    assert_eq!(
        exit.stdout,
        vec![format!("READY {epoch} 5")],
        "{}",
        describe(&exit)
    );
    assert!(
        exit.stderr.contains("unrecoverable_position"),
        "the refusal is explained on stderr\n{}",
        describe(&exit)
    );

    std::fs::write(&state, foreign.to_string()).expect("write the state file");
    let resync = run_consumer(lang, "foreign cursor, re-sync", args(&[])).await;
    assert!(resync.status.success(), "{}", describe(&resync));
    let mut expected = vec![format!("READY {epoch} 5")];
    expected.extend(journalled);
    assert_eq!(
        resync.stdout,
        expected,
        "re-synced from earliest on the same connection\n{}",
        describe(&resync)
    );
    assert_eq!(
        read_cursor(&state),
        json!({"epoch": epoch, "last_seq": 5}),
        "the cursor now belongs to this store\n{}",
        describe(&resync)
    );
    s.bridge.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A token the bridge does not know: HTTP 401 on the upgrade, exit status 3 at once (with
/// the token in the header and in the query), nothing on stdout.
async fn exits_3_on_a_refused_token(lang: Lang) {
    let s = setup().await;
    let url = format!("ws://{}/v1/ws", s.bridge.local_addr());
    for in_query in [false, true] {
        let mut args = vec![
            "--url".to_string(),
            url.clone(),
            "--token".into(),
            "not-a-known-token".into(),
            "--max-events".into(),
            "1".into(),
        ];
        if in_query {
            args.push("--token-in-query".into());
        }
        let what = if in_query {
            "refused token in the query"
        } else {
            "refused token in the header"
        };
        // A consumer that retried would still be running at the deadline and fail there.
        let run = run_consumer(lang, what, args).await;
        assert_eq!(run.status.code(), Some(3), "{what}: {}", describe(&run));
        assert!(
            run.stdout.is_empty(),
            "{what}: nothing on stdout\n{}",
            describe(&run)
        );
        assert!(
            run.stderr.contains("401"),
            "{what}: the refusal is explained on stderr\n{}",
            describe(&run)
        );
    }
    s.bridge.shutdown().await;
}

/// The seq and the delivery (1 unless the line says `delivery=N`) of each EVENT line of a
/// durable run.
fn durable_seqs(lines: &[String]) -> Vec<(u64, u64)> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("EVENT "))
        .map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            let delivery = match fields.len() {
                4 => 1,
                5 => fields[4]
                    .strip_prefix("delivery=")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("a sixth field is delivery=N: {l:?}")),
                _ => panic!("an EVENT line has five or six fields: {l:?}"),
            };
            (fields[0].parse().expect("a numeric seq"), delivery)
        })
        .collect()
}

/// `--durable`: the bridge keeps the cursor. A run that stops after five of eight events has
/// acked those five; the next run (with no state file) gets the other three, and nothing
/// else: every event once in all, none lost. Events the first run was sent but did not handle
/// come again marked `delivery=2`.
async fn durable_run_resumes_where_the_acks_left_it(lang: Lang) {
    let mut s = setup().await;
    let journalled = emit(&mut s, 1..9).await;
    let args = |max: &str| {
        vec![
            "--url".to_string(),
            format!("ws://{}/v1/ws", s.bridge.local_addr()),
            "--token".into(),
            TOKEN.into(),
            "--durable".into(),
            "example-worker".into(),
            "--from".into(),
            "earliest".into(),
            "--max-events".into(),
            max.into(),
        ]
    };
    let first = run_consumer(lang, "durable, first run", args("5")).await;
    assert!(first.status.success(), "{}", describe(&first));
    let got = durable_seqs(&first.stdout);
    assert_eq!(
        got,
        vec![(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)],
        "{}",
        describe(&first)
    );
    let second = run_consumer(lang, "durable, second run", args("3")).await;
    assert!(second.status.success(), "{}", describe(&second));
    let got = durable_seqs(&second.stdout);
    assert_eq!(
        got.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
        vec![6, 7, 8],
        "exactly the unacknowledged ones, in order\n{}",
        describe(&second)
    );
    assert!(
        got.iter().all(|(_, d)| (1..=2).contains(d)),
        "{}",
        describe(&second)
    );
    // The lines are the journalled events' (the delivery field aside).
    for line in &second.stdout {
        if let Some(rest) = line.strip_prefix("EVENT ") {
            let plain = rest.split(" delivery=").next().unwrap_or(rest);
            assert!(
                journalled.contains(&format!("EVENT {plain}")),
                "{line}\n{}",
                describe(&second)
            );
        }
    }
    // Both runs acked all they handled: the durable owes nothing.
    let head = s.bridge.store().position().await.expect("position").head;
    let info = s.bridge.hub().durables.list(head);
    assert_eq!(info.len(), 1, "{info:?}");
    eventually("the durable's floor at seq 8", DEADLINE, || async {
        let d = &s.bridge.hub().durables.list(head)[0];
        (d.acked == 8 && d.pending == 0)
            .then_some(())
            .ok_or(format!("acked {} pending {}", d.acked, d.pending))
    })
    .await;
    s.bridge.shutdown().await;
}

/// The Python and the Node consumer on one durable share its events: each event printed by
/// one of them, once, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_node_consumers_share_one_durable() {
    let mut s = setup().await;
    let args = vec![
        "--url".to_string(),
        format!("ws://{}/v1/ws", s.bridge.local_addr()),
        "--token".into(),
        TOKEN.into(),
        "--durable".into(),
        "shared-worker".into(),
    ];
    let (python, node) = blocking(move || {
        let start = |lang: Lang| {
            let mut cmd = lang.command();
            cmd.args(&args);
            ConsumerProc::start(format!("{} consumer (shared durable)", lang.name()), cmd)
        };
        (start(Lang::Python), start(Lang::Node))
    })
    .await;
    // Both attached before the events come, so that both can get some.
    let head = s.bridge.store().position().await.expect("position").head;
    eventually("two connections on the durable", RUN_DEADLINE, || async {
        let list = s.bridge.hub().durables.list(head);
        let n = list.first().map_or(0, |d| d.connections);
        (n == 2).then_some(()).ok_or(format!("{n} connections"))
    })
    .await;
    let journalled = emit(&mut s, 1..21).await;
    let lines = blocking(move || {
        let deadline = Instant::now() + RUN_DEADLINE;
        let mut lines: Vec<(&'static str, String)> = Vec::new();
        let events =
            |l: &[(&str, String)]| l.iter().filter(|(_, l)| l.starts_with("EVENT ")).count();
        while events(&lines) < 20 {
            let mut got = false;
            for (who, run) in [("python", &python), ("node", &node)] {
                if let Ok(line) = run.run.lines.try_recv() {
                    lines.push((who, line));
                    got = true;
                }
            }
            if !got {
                if Instant::now() > deadline {
                    node.fail(
                        &format!(
                            "20 events not printed in time; python's stderr:\n{}\nlines: {lines:?}",
                            python.run.stderr()
                        ),
                        &[],
                    );
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
        lines
    })
    .await;
    let mut printed: Vec<String> = lines
        .iter()
        .filter(|(_, l)| l.starts_with("EVENT "))
        .map(|(_, l)| l.clone())
        .collect();
    printed.sort_by_key(|l| seqs(std::slice::from_ref(l)));
    assert_eq!(printed, journalled, "each event once, none lost: {lines:?}");
    for who in ["python", "node"] {
        assert!(
            lines
                .iter()
                .any(|(w, l)| *w == who && l.starts_with("EVENT ")),
            "{who} got none of the events (shared round-robin): {lines:?}"
        );
    }
    s.bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_consumer_durable_run_resumes_where_the_acks_left_it() {
    durable_run_resumes_where_the_acks_left_it(Lang::Python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_consumer_durable_run_resumes_where_the_acks_left_it() {
    durable_run_resumes_where_the_acks_left_it(Lang::Node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_consumer_reads_and_resumes_from_its_state_file() {
    reads_and_resumes_from_its_state_file(Lang::Python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_consumer_re_syncs_when_its_cursor_is_from_another_store() {
    re_syncs_when_its_cursor_is_from_another_store(Lang::Python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_consumer_exits_3_on_a_refused_token() {
    exits_3_on_a_refused_token(Lang::Python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_consumer_reads_and_resumes_from_its_state_file() {
    reads_and_resumes_from_its_state_file(Lang::Node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_consumer_re_syncs_when_its_cursor_is_from_another_store() {
    re_syncs_when_its_cursor_is_from_another_store(Lang::Node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_consumer_exits_3_on_a_refused_token() {
    exits_3_on_a_refused_token(Lang::Node).await;
}
