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
//! status 3 at once instead of retrying forever.
//!
//! The Python consumer's dependency (`websockets`) is installed from PyPI into a venv under
//! the cargo target's scratch directory, the Node consumer's (`ws`) from npm: if that fails
//! the test fails (it never skips).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

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

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn scratch() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
}

fn consumers_dir(lang: &str) -> PathBuf {
    repo().join("examples/consumers").join(lang)
}

/// Runs a setup command, failing the test with its output if it does not succeed.
fn run_setup(what: &str, cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: could not start {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {cmd:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The venv's Python, with the Python consumer's dependencies installed from PyPI. Done once
/// per test run; tests running in parallel wait for it rather than install concurrently.
fn python_with_dependencies() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let venv = scratch().join("consumers-python-venv");
        let python = venv.join("bin/python");
        if !python.exists() {
            run_setup(
                "creating a Python venv for the consumer",
                Command::new("python3").arg("-m").arg("venv").arg(&venv),
            );
        }
        run_setup(
            "installing the Python consumer's dependencies from PyPI \
             (pip install -r examples/consumers/python/requirements.txt; is PyPI reachable?)",
            Command::new(&python)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "-r",
                ])
                .arg(consumers_dir("python").join("requirements.txt")),
        );
        python
    })
}

/// Installs the Node consumer's dependencies from npm, once per test run.
fn node_dependencies() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        run_setup(
            "installing the Node consumer's dependencies from npm \
             (npm install in examples/consumers/node; is the npm registry reachable?)",
            Command::new("npm")
                .args(["install", "--no-audit", "--no-fund", "--no-package-lock"])
                .current_dir(consumers_dir("node")),
        );
    });
}

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
            Lang::Python => {
                let mut cmd = Command::new(python_with_dependencies());
                cmd.arg("-u")
                    .arg(consumers_dir("python").join("consumer.py"));
                cmd
            }
            Lang::Node => {
                node_dependencies();
                let mut cmd = Command::new("node");
                cmd.arg(consumers_dir("node").join("consumer.js"));
                cmd
            }
        }
    }
}

/// A consumer child process; killed when dropped, also when the test panics.
struct ConsumerProc {
    what: String,
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
    stderr_reader: Option<thread::JoinHandle<()>>,
}

/// How a consumer run ended.
struct Finished {
    status: ExitStatus,
    stdout: Vec<String>,
    stderr: String,
}

impl ConsumerProc {
    fn start(what: String, mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: could not start {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let err_buf = Arc::new(Mutex::new(String::new()));
        let err_sink = Arc::clone(&err_buf);
        let stderr_reader = thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                if let Ok(mut buf) = err_sink.lock() {
                    buf.push_str(&String::from_utf8_lossy(&chunk[..n]));
                }
            }
        });
        Self {
            what,
            child,
            lines,
            stderr: err_buf,
            stderr_reader: Some(stderr_reader),
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn fail(&self, why: &str, stdout: &[String]) -> ! {
        panic!(
            "{}: {why}\n--- its stdout\n{}\n--- its stderr\n{}",
            self.what,
            stdout.join("\n"),
            self.stderr()
        )
    }

    /// Reads stdout until the consumer closes it, then waits for its exit; fails if either
    /// takes longer than `within` (a consumer that never exits is killed by `Drop`).
    fn finish(mut self, within: Duration) -> Finished {
        let deadline = Instant::now() + within;
        let mut stdout = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
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
            match self.child.try_wait() {
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
        if let Some(reader) = self.stderr_reader.take() {
            let _ = reader.join();
        }
        Finished {
            status,
            stdout,
            stderr: self.stderr(),
        }
    }
}

impl Drop for ConsumerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs blocking work (child processes, installs) off the async worker threads; a panic in it
/// fails the test with its own message.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => value,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("blocking task did not finish: {e}"),
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
    published: tokio::sync::broadcast::Receiver<Arc<wsbridge::ingest::Published>>,
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
