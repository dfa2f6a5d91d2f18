//! Finding 11 of issue 12: a store that cannot write stopped ingest (or held it back) while
//! `/readyz` said ready. The decision: ingest waits and the store retries with backoff, so
//! nothing read from an upstream is lost and ingest resumes by itself once the store
//! recovers; meanwhile `/readyz` is 503 with the reason, `wsbridge_store_available` is 0 and
//! `wsbridge_store_write_failures_total` counts. A shutdown while the store still fails ends
//! after the grace period with a non-zero exit.
//!
//! The failure is real, on the bridge's own database file: the bridge process's file-size
//! limit (`RLIMIT_FSIZE`) is lowered to one byte while it runs, so every write to the journal
//! fails with `EFBIG` exactly as writes to a full disk fail, whoever runs the test (root
//! included); raising the limit again is the disk being freed.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;
use wsbridge_adapters::Provider;

use crate::common::nats::{free_addr, webhook_block};
use crate::common::receiver::{Answer, Receiver};
use crate::common::*;

/// Generous: every wait ends as soon as its condition holds.
const LONG: Duration = Duration::from_secs(30);

/// The bridge binary on an embedded journal in `dir`, routing VoIPBIN events to `rx`.
struct BridgeProc {
    child: Child,
    addr: SocketAddr,
}

impl BridgeProc {
    fn spawn(dir: &Path, blocks: &[String]) -> BridgeProc {
        let addr = free_addr();
        let text = format!(
            "[server]\nlisten = \"{addr}\"\nshutdown_grace = \"2s\"\nadmin_token = \"admin-token\"\n\
             [storage]\npath = {:?}\n\n{}",
            dir.join("wsbridge.db").display().to_string(),
            blocks.concat()
        );
        let config = dir.join("bridge.toml");
        std::fs::write(&config, text).expect("write config");
        // Logs go nowhere: a log file would be subject to the same file-size limit.
        let child = Command::new(env!("CARGO_BIN_EXE_wsbridge"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("bridge starts");
        BridgeProc { child, addr }
    }

    /// Sets the soft file-size limit of the bridge process (the hard one is left alone, so
    /// raising it again needs no privilege).
    fn set_file_size_limit(&self, bytes: Option<u64>) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: prlimit reads `new` and writes `old`, both valid for the call.
        let rc = unsafe {
            libc::prlimit(
                pid,
                libc::RLIMIT_FSIZE,
                std::ptr::null(),
                &mut old as *mut libc::rlimit,
            )
        };
        assert_eq!(rc, 0, "read the bridge's file-size limit");
        let new = libc::rlimit {
            rlim_cur: bytes.unwrap_or(old.rlim_max).min(old.rlim_max),
            rlim_max: old.rlim_max,
        };
        // SAFETY: as above.
        let rc = unsafe {
            libc::prlimit(
                pid,
                libc::RLIMIT_FSIZE,
                &new as *const libc::rlimit,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(rc, 0, "set the bridge's file-size limit");
    }

    /// `GET <path>`: (status, body), `None` while it does not answer.
    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let resp = http_client()
            .get(format!("http://{}{path}", self.addr))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        let status = resp.status().as_u16();
        Some((status, resp.text().await.ok()?))
    }

    /// Waits until `/readyz` answers with `status` and a body containing `text`.
    async fn wait_ready_state(&self, status: u16, text: &str) -> String {
        eventually(
            &format!("/readyz answering {status} with {text:?}"),
            LONG,
            || async {
                match self.get("/readyz").await {
                    Some((s, body)) if s == status && body.contains(text) => Ok(body),
                    got => Err(format!("{got:?}")),
                }
            },
        )
        .await
    }

    /// The value of the metric sample `name` (no labels), if exposed.
    async fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics").await?;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// SIGTERM, then waits for the exit (failing at `limit`).
    async fn terminate(&mut self, limit: Duration) -> ExitStatus {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: signals our own child, which has not been reaped.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "SIGTERM sent");
        let child = &mut self.child;
        eventually("the bridge's exit after SIGTERM", limit, || {
            std::future::ready(child.try_wait().expect("wait"))
        })
        .await
    }
}

impl Drop for BridgeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A VoIPBIN simulator, a webhook receiver and a bridge process routing one to the other.
async fn rig(tag: &str) -> (wsbridge_adapters::sim::Simulator, Receiver, BridgeProc) {
    let vb = start_sim(Provider::Voipbin).await;
    let rx = Receiver::start(Vec::new(), Answer::status(200)).await;
    let blocks = vec![
        upstream_block("vb", &vb, FAST),
        webhook_block("crm", &rx.url(), ""),
        "[[routes]]\nname = \"r-crm\"\nproviders = [\"voipbin\"]\nto = [\"crm\"]\n".to_string(),
    ];
    let bridge = BridgeProc::spawn(&temp_dir(tag), &blocks);
    bridge.wait_ready_state(200, "ready").await;
    wait_sim_ready(&vb, 1).await;
    (vb, rx, bridge)
}

/// The `data.n` of every event the receiver got.
fn delivered(rx: &Receiver) -> BTreeSet<u64> {
    rx.requests()
        .iter()
        .filter_map(|r| serde_json::from_slice::<Value>(&r.body).ok())
        .filter_map(|v| v["data"]["n"].as_u64())
        .collect()
}

/// Journal writes fail on the real database file: `/readyz` says 503 with the reason, the
/// failures are counted, ingest waits instead of stopping, and once the file can be written
/// again every event read meanwhile is journalled and delivered, and SIGTERM exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_journal_is_not_ready_and_ingest_resumes_when_it_recovers() {
    let (vb, rx, mut bridge) = rig("storefail").await;
    for i in 0..5 {
        vb.emit(numbered_call(i)).await;
    }
    rx.wait_until(LONG, "the first events delivered", |_| {
        delivered(&rx).len() == 5
    })
    .await;

    bridge.set_file_size_limit(Some(1));
    for i in 5..10 {
        vb.emit(numbered_call(i)).await;
    }
    let why = bridge
        .wait_ready_state(503, "journal writes are failing")
        .await;
    assert!(why.contains("store"), "{why}");
    let failures = bridge
        .metric("wsbridge_store_write_failures_total")
        .await
        .unwrap_or(0.0);
    assert!(failures >= 1.0, "failed writes are counted: {failures}");
    assert_eq!(
        bridge.metric("wsbridge_store_available").await,
        Some(0.0),
        "the store shows as unavailable"
    );
    assert!(
        delivered(&rx).iter().all(|n| *n < 5),
        "nothing after the failure can be delivered before it is journalled"
    );

    bridge.set_file_size_limit(None);
    bridge.wait_ready_state(200, "ready").await;
    rx.wait_until(LONG, "every event delivered after the recovery", |_| {
        delivered(&rx).len() == 10
    })
    .await;
    assert_eq!(delivered(&rx), (0..10).collect::<BTreeSet<u64>>());
    let (_, status) = bridge.get("/v1/status").await.expect("status");
    let status: Value = serde_json::from_str(&status).expect("status JSON");
    assert_eq!(status["journal"]["head"], 10, "{status}");
    assert_eq!(status["ingest"]["rejected"], 0, "{status}");

    let exit = bridge.terminate(LONG).await;
    assert!(exit.success(), "clean exit after the recovery: {exit:?}");
}

/// SIGTERM while the journal still cannot be written: shutdown does not hang on the store's
/// retries; it ends after the grace period and exits non-zero, since events read from the
/// upstream were not journalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_the_journal_fails_exits_non_zero_after_the_grace_period() {
    let (vb, _rx, mut bridge) = rig("storefail-term").await;
    bridge.set_file_size_limit(Some(1));
    vb.emit(numbered_call(0)).await;
    bridge
        .wait_ready_state(503, "journal writes are failing")
        .await;
    let exit = bridge.terminate(LONG).await;
    assert!(
        !exit.success(),
        "events were not journalled: the exit says so ({exit:?})"
    );
}

/// The same bound on the NATS backend: NATS goes away with an event read and not journalled;
/// shutdown ends after the grace period (instead of retrying the publish for ever) and says
/// that the journal is incomplete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_while_nats_is_down_ends_after_the_grace_period_and_says_so() {
    use crate::common::nats::{nats_config, unique_prefix, NatsServer};
    let mut server = NatsServer::start("storefail-nats");
    server.wait_ready(LONG).await;
    let prefix = unique_prefix("storefail");
    let vb = start_sim(Provider::Voipbin).await;
    let cfg = nats_config(
        &[upstream_block("vb", &vb, FAST)],
        &[server.url()],
        &prefix,
        "",
    );
    let (bridge, _) = start_bridge(&cfg).await;
    wait_sim_ready(&vb, 1).await;
    server.kill();
    vb.emit(numbered_call(0)).await;
    eventually(
        "the event in ingest and the outage reported by readiness",
        LONG,
        || async {
            let stats = bridge.ingest_stats();
            if stats.received > 0 && bridge.store().unavailable().is_some() {
                Ok(())
            } else {
                Err(format!("{stats:?}"))
            }
        },
    )
    .await;
    let done = tokio::time::timeout(LONG, bridge.shutdown())
        .await
        .expect("shutdown ends while NATS is down");
    assert!(!done.journal_complete, "the lost event is reported");
}
