//! Finding 10: durations are bounded at validation, naming the key, so that no configured
//! duration can overflow an `Instant` (a supervisor that panicked while `/v1/status` still
//! said `subscribed`) or the retry jitter (a panicked attempt that leaked its in-flight
//! slot). Behind the bounds, the clock arithmetic is checked anyway: a config built in code,
//! which skips validation, with the same enormous values keeps the bridge working.
//!
//! A supervisor or dispatcher task that dies is shown `failed`, counted and restarted. After
//! these fixes no input makes a real task die, so the wrapper is unit-tested in
//! `src/supervise.rs` (a task that panics, paused clock), and here a real supervisor against
//! the VoIPBIN simulator is given an adapter that panics on its first connection attempt, and
//! a real dispatcher a store (the embedded one) whose first `due` query panics.

use std::time::Duration;

use serde_json::Value;
use wsbridge::upstream::UpstreamState;
use wsbridge_adapters::{
    Adapter, AdapterError, DecodeError, Greeting, Heartbeat, Inbound, Provider,
};

use super::config_errors::check_config;
use crate::common::receiver::{Answer, Receiver};
use crate::common::*;

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
dedup_window = "0s"
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
        "storage.dedup_window: ",
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

/// `/v1/status` of a running bridge.
async fn status(addr: std::net::SocketAddr) -> Value {
    http_client()
        .get(format!("http://{addr}/v1/status"))
        .send()
        .await
        .expect("GET /v1/status")
        .text()
        .await
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .expect("status JSON")
}

/// About 500 billion years: what `ping_interval = "500000000000y"` parses to.
const ENORMOUS: Duration = Duration::from_secs(500_000_000_000 * 31_557_600);

#[tokio::test]
async fn an_unvalidated_enormous_ping_interval_does_not_kill_the_supervisor() {
    let vb = start_sim(Provider::Voipbin).await;
    let mut cfg = config(&[upstream_block("vb", &vb, FAST)]);
    cfg.upstreams[0].ping_interval = Some(ENORMOUS);
    let (bridge, mut rx) = start_bridge(&cfg).await;
    wait_sim_ready(&vb, 1).await;
    assert_eq!(vb.emit(numbered_call(1)).await, 1);
    next_matching(&mut rx, "the event read by the supervisor", |p| {
        p.envelope.data["n"] == 1
    })
    .await;
    let v = status(bridge.local_addr()).await;
    assert_eq!(v["upstreams"][0]["state"], "subscribed", "{v}");
    assert_eq!(v["upstreams"][0]["counters"]["task_restarts"], 0, "{v}");
    bridge.shutdown().await;
}

#[tokio::test]
async fn an_unvalidated_enormous_retry_step_does_not_leak_an_in_flight_slot() {
    let vb = start_sim(Provider::Voipbin).await;
    let rx = Receiver::start(vec![], Answer::status(500)).await;
    let hook = format!(
        "[[webhooks]]\nname = \"crm\"\nurl = \"{}\"\nsecrets = [\"{SECRET}\"]\nallow_private = true\nmax_in_flight = 1\n\n\
         [[routes]]\nname = \"all\"\nto = [\"crm\"]\n",
        rx.url()
    );
    let mut cfg = config(&[upstream_block("vb", &vb, FAST), hook]);
    // Scaled by the jitter, this overflowed a `Duration` (a panic in the attempt task, which
    // never gave back the endpoint's only in-flight slot).
    cfg.webhooks[0].retry = vec![Duration::from_secs(u64::MAX)];
    let (bridge, _events) = start_bridge(&cfg).await;
    wait_sim_ready(&vb, 1).await;
    for i in 0..5 {
        assert_eq!(vb.emit(numbered_call(i)).await, 1);
    }
    // Each event gets its attempt (then waits for its far-off retry): no slot was lost.
    rx.wait_for(5, DEADLINE).await;
    let v = status(bridge.local_addr()).await;
    let hook = &v["webhooks"][0];
    assert_eq!(hook["dispatcher"], "running", "{v}");
    assert_eq!(hook["dispatcher_restarts"], 0, "{v}");
    assert_eq!(hook["failed_attempts"], 5, "{v}");
    bridge.shutdown().await;
}

/// The VoIPBIN adapter, except that its first connection attempt panics (a bug in the
/// supervisor's path that kills its task).
struct PanicsOnce {
    inner: std::sync::Arc<dyn Adapter>,
    armed: std::sync::atomic::AtomicBool,
}

impl Adapter for PanicsOnce {
    fn provider(&self) -> &str {
        self.inner.provider()
    }
    fn connect_request(&self) -> Result<http::Request<()>, AdapterError> {
        if self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            panic!("injected supervisor bug");
        }
        self.inner.connect_request()
    }
    fn display_url(&self) -> String {
        self.inner.display_url()
    }
    fn greeting(&self) -> Greeting {
        self.inner.greeting()
    }
    fn subscriptions(&self) -> &[String] {
        self.inner.subscriptions()
    }
    fn subscribe_frames(&self, subs: &[String]) -> Vec<String> {
        self.inner.subscribe_frames(subs)
    }
    fn unsubscribe_frames(&self, subs: &[String]) -> Vec<String> {
        self.inner.unsubscribe_frames(subs)
    }
    fn heartbeat(&self, now_unix: i64) -> Heartbeat {
        self.inner.heartbeat(now_unix)
    }
    fn decode(&self, text: &str) -> Result<Inbound, DecodeError> {
        self.inner.decode(text)
    }
}

#[tokio::test]
async fn a_supervisor_task_that_panics_is_shown_failed_then_restarted() {
    let vb = start_sim(Provider::Voipbin).await;
    let cfg = config(&[upstream_block("vb", &vb, FAST)]);
    let u = &cfg.upstreams[0];
    let inner = u.build_adapter().expect("adapter");
    let adapter = std::sync::Arc::new(PanicsOnce {
        inner,
        armed: std::sync::atomic::AtomicBool::new(true),
    });
    let (ingest, mut events) = tokio::sync::mpsc::channel(16);
    let stop = tokio_util::sync::CancellationToken::new();
    let limits = wsbridge::upstream::FrameLimits::new(&cfg.limits, cfg.storage.dedup_window);
    let handle = wsbridge::upstream::spawn(
        u,
        limits,
        adapter,
        ingest,
        stop.clone(),
        cfg.server.shutdown_grace,
    );

    let failed = wait_status(&handle, "failed", |s| s.state == UpstreamState::Failed).await;
    let why = failed.last_error.unwrap_or_default();
    assert!(why.contains("injected supervisor bug"), "{why}");
    assert_eq!(
        handle.counters().task_restarts,
        0,
        "shown failed before the restart"
    );

    // Restarted after the backoff: it connects, subscribes and reads events again.
    wait_subscribed(&handle).await;
    assert_eq!(handle.counters().task_restarts, 1);
    wait_sim_ready(&vb, 1).await;
    assert_eq!(vb.emit(numbered_call(7)).await, 1);
    let got = tokio::time::timeout(DEADLINE, events.recv())
        .await
        .expect("an event within the deadline")
        .expect("ingest open");
    assert_eq!(got.envelope.data["n"], 7);
    handle.stop().await;
    assert_eq!(handle.status().state, UpstreamState::Stopped);
}

/// The embedded store, except that the first `due` query of its queues panics (a bug in the
/// dispatcher's path that kills its task).
struct PanicsOnFirstDue {
    inner: std::sync::Arc<wsbridge::storage::embedded::EmbeddedStore>,
    armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// An endpoint's queue of [`PanicsOnFirstDue`].
struct PanickingQueue {
    inner: std::sync::Arc<dyn wsbridge::storage::DeliveryQueue>,
    armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

mod delegate {
    use wsbridge::storage::*;

    #[async_trait::async_trait]
    impl Store for super::PanicsOnFirstDue {
        async fn append(&self, batch: Vec<NewEvent>) -> Result<Vec<Appended>, StoreError> {
            self.inner.append(batch).await
        }
        async fn read_from(&self, from: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
            self.inner.read_from(from, limit).await
        }
        async fn position(&self) -> Result<JournalPosition, StoreError> {
            self.inner.position().await
        }
        async fn delivery_queue(
            &self,
            endpoint: &str,
            options: QueueOptions,
        ) -> Result<std::sync::Arc<dyn DeliveryQueue>, StoreError> {
            Ok(std::sync::Arc::new(super::PanickingQueue {
                inner: self.inner.delivery_queue(endpoint, options).await?,
                armed: self.armed.clone(),
            }))
        }
        async fn deliveries(
            &self,
            endpoint: &str,
            state: DeliveryState,
            limit: usize,
        ) -> Result<Vec<DeliveryInfo>, StoreError> {
            self.inner.deliveries(endpoint, state, limit).await
        }
        async fn counts(&self, endpoint: &str) -> Result<DeliveryCounts, StoreError> {
            self.inner.counts(endpoint).await
        }
        async fn replay(
            &self,
            endpoint: &str,
            selection: ReplaySelection,
        ) -> Result<u64, StoreError> {
            self.inner.replay(endpoint, selection).await
        }
        async fn set_disabled(
            &self,
            endpoint: &str,
            reason: Option<String>,
        ) -> Result<(), StoreError> {
            self.inner.set_disabled(endpoint, reason).await
        }
        async fn disabled(&self, endpoint: &str) -> Result<Option<String>, StoreError> {
            self.inner.disabled(endpoint).await
        }
    }

    #[async_trait::async_trait]
    impl DeliveryQueue for super::PanickingQueue {
        async fn due(&self, now_ms: i64, limit: usize) -> Result<Vec<HeldDelivery>, StoreError> {
            if self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
                panic!("injected dispatcher bug");
            }
            self.inner.due(now_ms, limit).await
        }
        async fn next_due(&self, after_ms: i64) -> Result<Option<i64>, StoreError> {
            self.inner.next_due(after_ms).await
        }
        async fn record(
            &self,
            held: HeldDelivery,
            attempt: AttemptRecord,
            next: NextStep,
        ) -> Result<(), StoreError> {
            self.inner.record(held, attempt, next).await
        }
    }
}

#[tokio::test]
async fn a_webhook_dispatcher_that_panics_is_shown_failed_then_restarted() {
    use wsbridge::delivery::DeliveryService;
    use wsbridge::storage::{NewEvent, Store};

    wsbridge::install_crypto_provider();
    let receiver = Receiver::start(vec![], Answer::status(200)).await;
    let hook = format!(
        "[[webhooks]]\nname = \"crm\"\nurl = \"{}\"\nsecrets = [\"{SECRET}\"]\nallow_private = true\n",
        receiver.url()
    );
    let cfg = config(&[upstream(""), hook]);
    let inner = wsbridge::storage::embedded::EmbeddedStore::open(
        &temp_dir("dispatcher-panics").join("wsbridge.db"),
        wsbridge::storage::config::Durability::Normal,
    )
    .expect("store opens");
    let adapter = cfg.upstreams[0].build_adapter().expect("adapter");
    let Ok(Inbound::Event(decoded)) = adapter.decode(&numbered_call(3).to_string()) else {
        panic!("the frame decodes as an event");
    };
    let envelope = wsbridge::envelope::Envelope::new(
        decoded,
        "wsbridge://vb-main",
        "voipbin",
        chrono::Utc::now(),
    );
    inner
        .append(vec![NewEvent::new(
            envelope,
            vec![std::sync::Arc::from("crm")],
        )
        .expect("an envelope serialises")])
        .await
        .expect("journalled with a delivery to crm");
    let store = std::sync::Arc::new(PanicsOnFirstDue {
        inner,
        armed: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
    });
    let shutdown = tokio_util::sync::CancellationToken::new();
    let service = DeliveryService::start(&cfg.webhooks, store, shutdown.clone())
        .await
        .expect("delivery starts");

    let view = eventually("the dispatcher shown failed", DEADLINE, || async {
        let view = service.views().remove(0);
        if view.dispatcher == "failed" {
            Ok(view)
        } else {
            Err(format!("{view:?}"))
        }
    })
    .await;
    let why = view.dispatcher_error.unwrap_or_default();
    assert!(why.contains("injected dispatcher bug"), "{why}");
    assert_eq!(view.counters.dispatcher_restarts, 0);

    // Restarted after the backoff, it delivers what was pending.
    let got = receiver.wait_for(1, DEADLINE).await;
    assert!(!got[0].header("webhook-id").is_empty());
    let view = service.views().remove(0);
    assert_eq!(view.dispatcher, "running", "{view:?}");
    assert_eq!(view.counters.dispatcher_restarts, 1);
    shutdown.cancel();
    service.join(Duration::from_secs(1)).await;
}
