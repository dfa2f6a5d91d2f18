//! The example webhook receivers (examples/receivers/*) against signatures made by
//! `wsbridge::delivery::signing`: proof that what the bridge signs verifies with the Standard
//! Webhooks libraries (`standardwebhooks` from PyPI and npm) and with a Go standard-library
//! implementation, and that bad deliveries are refused (README, "Signatures (Standard Webhooks)").
//!
//! Each receiver runs as a child process on an ephemeral port; the test POSTs over a plain
//! TCP socket and checks both the HTTP status and the JSON line the receiver prints. The
//! Python and Node dependencies are installed from their registries: if that fails the test
//! fails (it never skips). The Go receiver needs a Go toolchain; without one its test says so
//! and passes, unless `WSBRIDGE_REQUIRE_GO=1` demands it.
//!
//! The Python and Node receivers also run against the real bridge: a simulated VoIPBIN feed,
//! the bridge delivering to them (structured and binary mode) while it signs with a secret
//! being rotated in as well as the current one, which is the only secret the receivers know.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::common::examples::{blocking, Examples, Running};
use crate::common::*;
use base64::Engine as _;
use serde_json::{json, Value};
use wsbridge::delivery::signing::{Signer, HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP};
use wsbridge_adapters::{voipbin, Provider};

/// How long a receiver may take to start (an interpreter, a freshly built binary).
const START_DEADLINE: Duration = Duration::from_secs(60);
/// How long one request may take, answer and printed line included.
const REQUEST_DEADLINE: Duration = Duration::from_secs(15);
/// How long the bridge may take to deliver every emitted event to a receiver.
const BRIDGE_DEADLINE: Duration = Duration::from_secs(30);

fn secret(byte: u8, len: usize) -> String {
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(vec![byte; len])
    )
}

fn unix_now() -> i64 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    i64::try_from(secs).expect("seconds fit i64")
}

/// A receiver child process; killed when dropped, also when the test panics.
struct ReceiverProc {
    name: &'static str,
    run: Running,
    port: u16,
}

impl ReceiverProc {
    /// Starts `cmd` (which must print `LISTENING <port>` first) and waits until it listens.
    fn start(name: &'static str, cmd: Command) -> Self {
        let mut proc = Self {
            name,
            run: Running::start(name, cmd),
            port: 0,
        };
        let first = proc.next_line(START_DEADLINE);
        proc.port = first
            .strip_prefix("LISTENING ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| proc.fail(&format!("expected `LISTENING <port>`, got {first:?}")));
        proc
    }

    fn fail(&self, why: &str) -> ! {
        panic!(
            "{} receiver: {why}\n--- its stderr\n{}",
            self.name,
            self.run.stderr()
        )
    }

    fn next_line(&mut self, within: Duration) -> String {
        match self.run.lines.recv_timeout(within) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => self.fail(&format!("printed nothing in {within:?}")),
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.run.child.try_wait().ok().flatten();
                self.fail(&format!("closed its stdout (exit status {status:?})"))
            }
        }
    }

    /// Reads the lines of `n` deliveries made by the bridge: each must verify (`"ok": true`),
    /// be a first delivery, carry a new id and `event_type`. Returns the ids in arrival order.
    fn expect_verified(&mut self, n: usize, event_type: &str) -> Vec<String> {
        let deadline = Instant::now() + BRIDGE_DEADLINE;
        let mut ids: Vec<String> = Vec::new();
        while ids.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.run.lines.recv_timeout(left) {
                Ok(line) => line,
                Err(RecvTimeoutError::Timeout) => self.fail(&format!(
                    "printed {} of {n} deliveries from the bridge within {BRIDGE_DEADLINE:?}: {ids:?}",
                    ids.len()
                )),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.run.child.try_wait().ok().flatten();
                    self.fail(&format!(
                        "closed its stdout (exit status {status:?}) after {} of {n} deliveries",
                        ids.len()
                    ))
                }
            };
            let value: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
                self.fail(&format!("printed a line that is not JSON ({e}): {line}"))
            });
            let check = |cond: bool, detail: &str| {
                if !cond {
                    self.fail(&format!(
                        "bridge delivery {}: {detail}; printed {line}",
                        ids.len() + 1
                    ));
                }
            };
            check(
                value["ok"] == json!(true),
                "the bridge's signature did not verify",
            );
            check(value["duplicate"] == json!(false), "flagged as a duplicate");
            check(
                value["type"] == json!(event_type),
                &format!("expected type {event_type}"),
            );
            let id = value["id"].as_str().unwrap_or_default().to_owned();
            check(!id.is_empty(), "no webhook-id");
            check(!ids.contains(&id), "an id already delivered");
            ids.push(id);
        }
        ids
    }

    /// Stops the receiver and returns every line it printed that was not read yet.
    fn finish(&mut self) -> Vec<String> {
        let _ = self.run.child.kill();
        let _ = self.run.child.wait();
        let deadline = Instant::now() + REQUEST_DEADLINE;
        let mut rest = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.run.lines.recv_timeout(left) {
                Ok(line) => rest.push(line),
                Err(RecvTimeoutError::Disconnected) => return rest,
                Err(RecvTimeoutError::Timeout) => {
                    self.fail("its stdout stayed open after it was killed")
                }
            }
        }
    }

    /// POSTs one delivery and returns the HTTP status and the JSON line it printed.
    fn deliver(&mut self, headers: &[(String, String)], body: &[u8]) -> (u16, Value) {
        let status = match http_post(self.port, headers, body) {
            Ok(status) => status,
            Err(e) => self.fail(&format!("POST failed: {e}")),
        };
        let line = self.next_line(REQUEST_DEADLINE);
        let value = serde_json::from_str(&line).unwrap_or_else(|e| {
            self.fail(&format!("printed a line that is not JSON ({e}): {line}"))
        });
        (status, value)
    }
}

/// A minimal HTTP/1.1 POST over a plain socket; returns the status code.
fn http_post(port: u16, headers: &[(String, String)], body: &[u8]) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(REQUEST_DEADLINE))?;
    stream.set_write_timeout(Some(REQUEST_DEADLINE))?;
    let mut request = format!(
        "POST /hooks HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()?;
    // The server closes the connection after its answer (`connection: close`).
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let head = String::from_utf8_lossy(&response);
    let status_line = head.lines().next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    match (parts.next(), parts.next().and_then(|s| s.parse().ok())) {
        (Some(version), Some(status)) if version.starts_with("HTTP/1.") => Ok(status),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not an HTTP response: {status_line:?}"),
        )),
    }
}

/// Secrets of the scenario. The receiver is started with `--secret DECOY --secret KNOWN`.
struct Secrets {
    /// Unrelated to anything the bridge signs with: exercises the repeatable `--secret`.
    decoy: String,
    /// The endpoint's current secret, known to the receiver.
    known: String,
    /// A secret being rotated in: listed first by the bridge, unknown to the receiver.
    rotated_in: String,
}

fn secrets() -> Secrets {
    Secrets {
        decoy: secret(0x22, 24),
        known: secret(0x11, 32),
        rotated_in: secret(0x33, 32),
    }
}

/// A structured-mode envelope (README, "The canonical envelope (contract)") serialised once;
/// these bytes are signed and sent.
fn envelope(id: &str, status: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "specversion": "1.0",
        "id": id,
        "source": "wsbridge://voipbin-main",
        "type": "voipbin.call.status",
        "subject": "customer_id:abc123:call:xyz789",
        "time": "2024-06-01T12:00:00Z",
        "datacontenttype": "application/json",
        "data": {"call_id": "xyz789", "status": status, "caller": "José Ñúñez ☎"},
        "provider": "voipbin",
        "recvtime": "2024-06-01T12:00:00.123456Z",
        "seq": 42
    }))
    .expect("envelope serialises")
}

fn signed_headers(
    signer: &Signer,
    id: &str,
    timestamp: i64,
    body: &[u8],
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    let mut headers = vec![
        (HEADER_ID.to_owned(), id.to_owned()),
        (HEADER_TIMESTAMP.to_owned(), timestamp.to_string()),
        (
            HEADER_SIGNATURE.to_owned(),
            signer.sign(id, timestamp, body),
        ),
    ];
    headers.extend(
        extra
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned())),
    );
    headers
}

const STRUCTURED: &[(&str, &str)] = &[("content-type", "application/cloudevents+json")];

fn assert_line(rcv: &ReceiverProc, what: &str, line: &Value, ok: bool, id: &str, dup: bool) {
    let check = |cond: bool, detail: &str| {
        if !cond {
            rcv.fail(&format!("{what}: {detail}; printed {line}"));
        }
    };
    check(line["ok"] == json!(ok), &format!("expected ok = {ok}"));
    check(line["id"] == json!(id), &format!("expected id = {id}"));
    check(
        line["duplicate"] == json!(dup),
        &format!("expected duplicate = {dup}"),
    );
    if ok {
        check(line["error"].is_null(), "expected no error");
    } else {
        check(
            line["error"].as_str().is_some_and(|e| !e.is_empty()),
            "expected an error message",
        );
    }
}

/// The contract every example receiver must honour.
fn exercise(rcv: &mut ReceiverProc) {
    let s = secrets();
    let current = Signer::from_secrets([&s.known]).expect("valid secret");
    let rotating = Signer::from_secrets([&s.rotated_in, &s.known]).expect("valid secrets");
    let unknown = Signer::from_secrets([&s.rotated_in]).expect("valid secret");
    let tag = rcv.name;

    // 1. A correctly signed structured envelope verifies.
    let id1 = format!("evt-{tag}-1");
    let body = envelope(&id1, "answered");
    let now = unix_now();
    let (status, line) = rcv.deliver(
        &signed_headers(&current, &id1, now, &body, STRUCTURED),
        &body,
    );
    assert_line(rcv, "signed envelope", &line, true, &id1, false);
    assert_eq!(status, 204, "{tag}: signed envelope: {line}");
    assert_eq!(line["type"], "voipbin.call.status", "{tag}: {line}");

    // 2. Rotation: both secrets sign, the receiver knows only the second one.
    let id2 = format!("evt-{tag}-2");
    let body = envelope(&id2, "ringing");
    let headers = signed_headers(&rotating, &id2, unix_now(), &body, STRUCTURED);
    assert_eq!(headers[2].1.split(' ').count(), 2, "two signatures");
    let (status, line) = rcv.deliver(&headers, &body);
    assert_line(rcv, "rotated secrets", &line, true, &id2, false);
    assert_eq!(status, 204, "{tag}: rotated secrets: {line}");

    // 3. Binary mode: the body is `data`, the type comes from `ce-type`.
    let id3 = format!("evt-{tag}-3");
    let data =
        br#"{"type":"payment_update","contract_id":"c-1","amount":12.5,"timestamp":"1717171717"}"#;
    let binary = [
        ("content-type", "application/json"),
        ("ce-specversion", "1.0"),
        ("ce-id", id3.as_str()),
        ("ce-source", "wsbridge://voicepact-main"),
        ("ce-type", "voicepact.payment_update"),
    ];
    let (status, line) = rcv.deliver(
        &signed_headers(&current, &id3, unix_now(), data, &binary),
        data,
    );
    assert_line(rcv, "binary mode", &line, true, &id3, false);
    assert_eq!(status, 204, "{tag}: binary mode: {line}");
    assert_eq!(line["type"], "voicepact.payment_update", "{tag}: {line}");

    // 4. A tampered body is refused.
    let id4 = format!("evt-{tag}-4");
    let signed_body = envelope(&id4, "answered");
    let headers = signed_headers(&current, &id4, unix_now(), &signed_body, STRUCTURED);
    let tampered = envelope(&id4, "hangup");
    let (status, line) = rcv.deliver(&headers, &tampered);
    assert_line(rcv, "tampered body", &line, false, &id4, false);
    assert_eq!(status, 400, "{tag}: tampered body: {line}");

    // 5. A correctly signed but 10-minute-old delivery is refused (replay protection).
    let id5 = format!("evt-{tag}-5");
    let body = envelope(&id5, "answered");
    let stale = unix_now() - 600;
    let (status, line) = rcv.deliver(
        &signed_headers(&current, &id5, stale, &body, STRUCTURED),
        &body,
    );
    assert_line(rcv, "stale timestamp", &line, false, &id5, false);
    assert_eq!(status, 400, "{tag}: stale timestamp: {line}");
    let err = line["error"].as_str().unwrap_or_default().to_lowercase();
    assert!(
        err.contains("too old"),
        "{tag}: stale timestamp error: {line}"
    );

    // 6. Signed only with a secret the receiver does not know: refused.
    let id6 = format!("evt-{tag}-6");
    let body = envelope(&id6, "answered");
    let (status, line) = rcv.deliver(
        &signed_headers(&unknown, &id6, unix_now(), &body, STRUCTURED),
        &body,
    );
    assert_line(rcv, "unknown secret", &line, false, &id6, false);
    assert_eq!(status, 400, "{tag}: unknown secret: {line}");

    // 7. A retry of delivery 1 (same id, new attempt time) is acknowledged and flagged.
    let body = envelope(&id1, "answered");
    let (status, line) = rcv.deliver(
        &signed_headers(&current, &id1, unix_now(), &body, STRUCTURED),
        &body,
    );
    assert_line(rcv, "repeated id", &line, true, &id1, true);
    assert_eq!(status, 204, "{tag}: repeated id: {line}");

    // 8. A refused attempt does not consume its id: the genuine delivery of 4 is not a duplicate.
    let (status, line) = rcv.deliver(
        &signed_headers(&current, &id4, unix_now(), &signed_body, STRUCTURED),
        &signed_body,
    );
    assert_line(rcv, "genuine after tampered", &line, true, &id4, false);
    assert_eq!(status, 204, "{tag}: genuine after tampered: {line}");
}

/// `--port 0` and one `--secret` per secret; the environment's WEBHOOK_SECRET is ignored.
fn listen_args(cmd: &mut Command, secrets: &[&str]) {
    cmd.args(["--port", "0"]);
    for secret in secrets {
        cmd.args(["--secret", secret]);
    }
    cmd.env_remove("WEBHOOK_SECRET");
}

/// The direct tests' receivers know the decoy and the current secret.
fn secret_args(cmd: &mut Command) {
    let s = secrets();
    listen_args(cmd, &[&s.decoy, &s.known]);
}

/// The Python receiver (dependencies installed first), listening, knowing `secrets`.
fn python_receiver(secrets: &[&str]) -> ReceiverProc {
    let mut cmd = Examples::Receivers.python();
    listen_args(&mut cmd, secrets);
    ReceiverProc::start("python", cmd)
}

/// The Node receiver (dependencies installed first), listening, knowing `secrets`.
fn node_receiver(secrets: &[&str]) -> ReceiverProc {
    let mut cmd = Examples::Receivers.node();
    listen_args(&mut cmd, secrets);
    ReceiverProc::start("node", cmd)
}

#[test]
fn python_receiver_verifies_with_standardwebhooks_from_pypi() {
    let s = secrets();
    let mut rcv = python_receiver(&[&s.decoy, &s.known]);
    exercise(&mut rcv);
}

#[test]
fn node_receiver_verifies_with_standardwebhooks_from_npm() {
    let s = secrets();
    let mut rcv = node_receiver(&[&s.decoy, &s.known]);
    exercise(&mut rcv);
}

#[test]
fn go_receiver_verifies_with_the_standard_library() {
    let Some(mut cmd) = Examples::Receivers.go() else {
        return;
    };
    secret_args(&mut cmd);
    let mut rcv = ReceiverProc::start("go", cmd);
    exercise(&mut rcv);
}

/// A bridge endpoint signing with `secrets` (the first is the one being rotated in).
fn bridge_webhook(name: &str, url: &str, mode: &str, secrets: &[&str]) -> String {
    let secrets: Vec<String> = secrets.iter().map(|s| format!("{s:?}")).collect();
    format!(
        "[[webhooks]]\nname = \"{name}\"\nurl = \"{url}\"\nsecrets = [{}]\n\
         allow_private = true\nretry = [\"100ms\", \"100ms\"]\nmode = \"{mode}\"\n\n",
        secrets.join(", ")
    )
}

fn call_status(call: &str, status: &str) -> Value {
    voipbin::wire::event(
        "call.status",
        "2024-01-15T10:30:00.000000Z",
        &format!("customer_id:abc123:call:{call}"),
        json!({"id": call, "status": status}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_node_receivers_verify_what_the_bridge_delivers_during_a_rotation() {
    const EVENTS: usize = 5;
    const EVENT_TYPE: &str = "voipbin.call.status";
    let s = secrets();
    // The receivers know only the current secret; the bridge signs with both.
    let (known_py, known_node) = (s.known.clone(), s.known.clone());
    let (mut py, mut node) = tokio::join!(
        blocking(move || python_receiver(&[&known_py])),
        blocking(move || node_receiver(&[&known_node])),
    );
    // Records the raw requests: shows the bridge really sent one signature per secret.
    let probe = crate::common::receiver::Receiver::start(
        vec![],
        crate::common::receiver::Answer::status(204),
    )
    .await;

    let rotation = [s.rotated_in.as_str(), s.known.as_str()];
    let endpoints = ["py", "node-bin", "probe"];
    let vb = start_sim(Provider::Voipbin).await;
    let blocks = vec![
        upstream_block("vb", &vb, FAST),
        bridge_webhook(
            "py",
            &format!("http://127.0.0.1:{}/hooks", py.port),
            "structured",
            &rotation,
        ),
        bridge_webhook(
            "node-bin",
            &format!("http://127.0.0.1:{}/hooks", node.port),
            "binary",
            &rotation,
        ),
        bridge_webhook("probe", &probe.url(), "structured", &rotation),
        format!(
            "[[routes]]\nname = \"all\"\nproviders = [\"voipbin\"]\nto = [{}]\n",
            endpoints.map(|e| format!("{e:?}")).join(", ")
        ),
    ];
    let text = config_text(&blocks);
    let cfg = wsbridge::config::Config::from_toml(&text, |_| None, false)
        .unwrap_or_else(|e| panic!("bridge config: {e}\n{text}"));
    let (bridge, _published) = start_bridge(&cfg).await;
    wait_sim_ready(&vb, 1).await;

    let statuses = ["ringing", "answered", "hold", "unhold", "hangup"];
    for (n, status) in statuses.iter().enumerate().take(EVENTS) {
        let event = call_status(&format!("x{}", n + 1), status);
        assert_eq!(
            vb.emit(event).await,
            1,
            "event {} reached no bridge connection",
            n + 1
        );
    }

    let (mut py, py_ids) = blocking(move || {
        let ids = py.expect_verified(EVENTS, EVENT_TYPE);
        (py, ids)
    })
    .await;
    let (mut node, node_ids) = blocking(move || {
        let ids = node.expect_verified(EVENTS, EVENT_TYPE);
        (node, ids)
    })
    .await;

    let known = Signer::from_secrets([&s.known]).expect("valid secret");
    let probed = probe.wait_for(EVENTS, BRIDGE_DEADLINE).await;
    for r in &probed {
        let signature = r.header(HEADER_SIGNATURE);
        let entries: Vec<&str> = signature.split(' ').collect();
        assert!(
            entries.len() == 2 && entries.iter().all(|e| e.starts_with("v1,")),
            "expected two space-separated `v1,` signatures during the rotation, got {signature:?}"
        );
        known
            .verify(
                r.header(HEADER_ID),
                r.header(HEADER_TIMESTAMP),
                signature,
                &r.body,
            )
            .unwrap_or_else(|e| panic!("probe: signature does not verify: {e:?}"));
    }

    // Every endpoint got the same events: the webhook-id is the event's id.
    let probe_ids: BTreeSet<String> = probed
        .iter()
        .map(|r| r.header(HEADER_ID).to_owned())
        .collect();
    let py_set: BTreeSet<String> = py_ids.iter().cloned().collect();
    let node_set: BTreeSet<String> = node_ids.iter().cloned().collect();
    assert_eq!(py_set, node_set, "python and node got different events");
    assert_eq!(
        py_set, probe_ids,
        "python and the probe got different events"
    );

    // Nothing left to deliver: no retry can still be on its way when the receivers stop.
    let store = bridge.store().clone();
    eventually("no delivery pending", DEADLINE, || async {
        let mut pending = Vec::new();
        for name in endpoints {
            let counts = store.counts(name).await.expect("delivery counts");
            assert_eq!(counts.dead, 0, "{name}: a delivery was dead-lettered");
            if counts.pending > 0 {
                pending.push(format!("{name}: {} pending", counts.pending));
            }
        }
        if pending.is_empty() {
            Ok(())
        } else {
            Err(pending.join(", "))
        }
    })
    .await;
    bridge.shutdown().await;

    // Each receiver printed exactly one line per event: no extra (retried) delivery.
    let (py, node) = blocking(move || (py.finish(), node.finish())).await;
    assert!(py.is_empty(), "python receiver printed more lines: {py:?}");
    assert!(
        node.is_empty(),
        "node receiver printed more lines: {node:?}"
    );
    assert_eq!(probe.requests().len(), EVENTS, "probe got extra requests");
}
