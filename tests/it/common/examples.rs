//! The example programs under `examples/` (the webhook receivers and the WebSocket consumers)
//! as the receiver and consumer tests run them, in one place: set up, started as child
//! processes, read line by line.
//!
//! Set-up: Python runs from a venv under the cargo target's scratch directory with the
//! example's `requirements.txt` installed from PyPI, Node after `npm install` from npm, Go
//! from a binary `go build` makes. The Python and Node set-ups run once per test run and set
//! (tests running in parallel wait for them rather than install concurrently); if one fails
//! the test fails, it never skips. Without a Go toolchain a Go example is skipped with a note,
//! unless `WSBRIDGE_REQUIRE_GO=1` demands it.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread;

/// One set of examples, a directory under `examples/` with one program per language. Each
/// program's entry point is named after its role (`receiver.py`, `consumer.js`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Examples {
    /// `examples/receivers`: webhook receivers that verify the bridge's signatures.
    Receivers,
    /// `examples/consumers`: WebSocket consumers of the bridge's `/v1/ws`.
    Consumers,
}

impl Examples {
    fn name(self) -> &'static str {
        match self {
            Examples::Receivers => "receivers",
            Examples::Consumers => "consumers",
        }
    }

    /// What one program of the set is, for messages, file and scratch names.
    fn role(self) -> &'static str {
        match self {
            Examples::Receivers => "receiver",
            Examples::Consumers => "consumer",
        }
    }

    /// Index into the once-per-run set-ups below.
    fn index(self) -> usize {
        match self {
            Examples::Receivers => 0,
            Examples::Consumers => 1,
        }
    }

    /// The directory of the set's program in `lang` (`python`, `node`, `go`).
    pub fn dir(self, lang: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("examples")
            .join(self.name())
            .join(lang)
    }

    /// A scratch path for this set's build products.
    fn scratch(self, what: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{}-{what}", self.name()))
    }

    /// The Python program's command line, before its own flags (`python -u <role>.py`), its
    /// dependencies installed first.
    pub fn python(self) -> Command {
        let mut cmd = Command::new(self.python_with_dependencies());
        cmd.arg("-u")
            .arg(self.dir("python").join(format!("{}.py", self.role())));
        cmd
    }

    /// The Node program's command line, before its own flags (`node <role>.js`), its
    /// dependencies installed first.
    pub fn node(self) -> Command {
        self.node_dependencies();
        let mut cmd = Command::new("node");
        cmd.arg(self.dir("node").join(format!("{}.js", self.role())));
        cmd
    }

    /// The Go program, built, as a command line before its own flags; `None` (said on stderr)
    /// when no `go` toolchain is on PATH, which fails the test instead if
    /// `WSBRIDGE_REQUIRE_GO` is set.
    pub fn go(self) -> Option<Command> {
        if !go_available() {
            assert!(
                std::env::var_os("WSBRIDGE_REQUIRE_GO").is_none(),
                "WSBRIDGE_REQUIRE_GO is set but no `go` toolchain is on PATH (apt-get install golang-go)"
            );
            eprintln!(
                "SKIPPED: no `go` on PATH, the Go {} was not tested (apt-get install golang-go)",
                self.role()
            );
            return None;
        }
        let binary = self.scratch(&format!("go-{}", self.role()));
        run_setup(
            &format!(
                "building the Go {} (go build in examples/{}/go)",
                self.role(),
                self.name()
            ),
            Command::new("go")
                .arg("build")
                .arg("-o")
                .arg(&binary)
                .arg(".")
                .current_dir(self.dir("go")),
        );
        Some(Command::new(binary))
    }

    /// The venv's Python, with the set's Python dependencies installed from PyPI. Done once
    /// per test run; tests running in parallel wait for it rather than install concurrently.
    fn python_with_dependencies(self) -> &'static Path {
        static PYTHON: [OnceLock<PathBuf>; 2] = [OnceLock::new(), OnceLock::new()];
        PYTHON[self.index()].get_or_init(|| {
            let venv = self.scratch("python-venv");
            let python = venv.join("bin/python");
            if !python.exists() {
                run_setup(
                    &format!("creating a Python venv for the {}", self.role()),
                    Command::new("python3").arg("-m").arg("venv").arg(&venv),
                );
            }
            run_setup(
                &format!(
                    "installing the Python {}'s dependencies from PyPI \
                     (pip install -r examples/{}/python/requirements.txt; is PyPI reachable?)",
                    self.role(),
                    self.name()
                ),
                Command::new(&python)
                    .args([
                        "-m",
                        "pip",
                        "install",
                        "--quiet",
                        "--disable-pip-version-check",
                        "-r",
                    ])
                    .arg(self.dir("python").join("requirements.txt")),
            );
            python
        })
    }

    /// Installs the Node program's dependencies from npm, once per test run.
    fn node_dependencies(self) {
        static INSTALLED: [OnceLock<()>; 2] = [OnceLock::new(), OnceLock::new()];
        INSTALLED[self.index()].get_or_init(|| {
            run_setup(
                &format!(
                    "installing the Node {}'s dependencies from npm \
                     (npm install in examples/{}/node; is the npm registry reachable?)",
                    self.role(),
                    self.name()
                ),
                Command::new("npm")
                    .args(["install", "--no-audit", "--no-fund", "--no-package-lock"])
                    .current_dir(self.dir("node")),
            );
        });
    }
}

fn go_available() -> bool {
    Command::new("go")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs a setup command, failing the test with its output if it does not succeed.
pub fn run_setup(what: &str, cmd: &mut Command) -> Output {
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

/// An example running as a child process: its stdout line by line on `lines`, its stderr
/// collected for failure messages. Killed when dropped, also when the test panics.
pub struct Running {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
    stderr_reader: Option<thread::JoinHandle<()>>,
}

impl Running {
    /// Starts `cmd` (`what` names it if it cannot start), stdin closed.
    pub fn start(what: &str, mut cmd: Command) -> Running {
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
        Running {
            child,
            lines,
            stderr: err_buf,
            stderr_reader: Some(stderr_reader),
        }
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits until its stderr is read to the end: for after it exited, so that
    /// [`Running::stderr`] holds all of it (the examples start no processes of their own).
    pub fn read_all_stderr(&mut self) {
        if let Some(reader) = self.stderr_reader.take() {
            let _ = reader.join();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs blocking work (child processes, their line channels, installs) off the async worker
/// threads; a panic in it fails the test with its own message.
pub async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => value,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("blocking task did not finish: {e}"),
    }
}

/// `node_modules` of a scratch npm project `name` under the cargo target's scratch directory
/// with `packages` installed from npm (`what` says what for, when it fails), once per test
/// run and project: tests running in parallel wait for the first one's install.
pub fn npm_install(name: &str, packages: &[&str], what: &str) -> PathBuf {
    static DONE: OnceLock<Mutex<std::collections::HashMap<String, PathBuf>>> = OnceLock::new();
    let mut done = DONE
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(dir) = done.get(name) {
        return dir.clone();
    }
    let modules = install(name, packages, what);
    done.insert(name.to_string(), modules.clone());
    modules
}

fn install(name: &str, packages: &[&str], what: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    // A project of its own, so npm installs here and not in a parent directory's.
    let manifest = dir.join("package.json");
    if !manifest.exists() {
        std::fs::write(&manifest, "{\"private\": true}\n").expect("package.json");
    }
    run_setup(
        what,
        Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--no-package-lock"])
            .args(packages)
            .current_dir(&dir),
    );
    dir.join("node_modules")
}

/// A child process in a process group of its own (stdin closed, stdout and stderr piped):
/// the whole group (a browser and its helpers) is killed when this is dropped, also when the
/// test panics.
pub struct Group {
    /// The child, the group's leader.
    pub child: tokio::process::Child,
    group: u32,
}

impl Group {
    /// Spawns `cmd` so; `what` names it if it cannot start.
    pub fn spawn(what: &str, cmd: &mut tokio::process::Command) -> Group {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what} failed: {e}"));
        let group = child.id().expect("a running child has a pid");
        Group { child, group }
    }

    /// Waits for the child to exit within `limit` (the test fails naming `what` otherwise),
    /// reading all of its stdout and stderr; the group is killed afterwards.
    pub async fn output(
        mut self,
        what: &str,
        limit: std::time::Duration,
    ) -> (std::process::ExitStatus, Vec<u8>, Vec<u8>) {
        use tokio::io::AsyncReadExt;
        let mut stdout = self.child.stdout.take().expect("stdout piped");
        let mut stderr = self.child.stderr.take().expect("stderr piped");
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let run = async {
            let (o, e, status) = tokio::join!(
                stdout.read_to_end(&mut out),
                stderr.read_to_end(&mut err),
                self.child.wait()
            );
            o.and(e).and(status)
        };
        let status = match tokio::time::timeout(limit, run).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => panic!("reading {what}'s output: {e}"),
            Err(_) => panic!("{what} did not finish within {limit:?}"),
        };
        (status, out, err)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.group)])
            .stderr(Stdio::null())
            .status();
    }
}
