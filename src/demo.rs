//! `wsbridge demo` and `wsbridge simulate`: the simulators, a scripted stream of every event
//! type the providers document, and (for the demo) the bridge with a consumer that prints
//! each canonical envelope as it flows.
//!
//! The demo is the newcomer's first contact, so it is self-contained (ephemeral ports, no
//! environment needed), ends by itself once every scripted event has come through, and its
//! summary shows the bridge's work: per-upstream counters and the duplicates it suppressed
//! (both VoicePact connections receive each broadcast `payment_update`, which is one event).

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use chrono::Utc;
use serde_json::Value;
use tokio::sync::{broadcast, mpsc};
use wsbridge_adapters::sim::{self, Simulator};
use wsbridge_adapters::{hashi, voicepact, voipbin, Provider};

use crate::bridge::Bridge;
use crate::config::Config;
use crate::delivery::signing::Signer;
use crate::envelope::Published;
use crate::upstream::UpstreamState;

/// The two VoicePact parties of the scripted contract (one connection each).
pub const DEMO_PARTIES: [&str; 2] = ["+254700000001", "+254700000002"];
/// The scripted VoicePact contract.
pub const DEMO_CONTRACT: &str = "ctr-1001";
/// The scripted Hashi lobby.
pub const DEMO_LOBBY: &str = "ABC123";
/// The demo webhook's signing secret (the Standard Webhooks spec's example secret).
pub const DEMO_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The demo consumer's token on `/v1/ws`.
pub const DEMO_CONSUMER_TOKEN: &str = "demo-dashboard-token";
/// What the demo consumer subscribes to: the Hashi lobby's comings and goings.
const DEMO_CONSUMER_TYPES: &str = "hashi.lobby.*";

/// Connects a consumer to the bridge's `/v1/ws`, subscribes to [`DEMO_CONSUMER_TYPES`], and
/// forwards each event frame's `(seq, type)`; returns once subscribed.
async fn start_consumer(
    addr: std::net::SocketAddr,
) -> anyhow::Result<mpsc::Receiver<(u64, String)>> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let url = format!("ws://{addr}/v1/ws?token={DEMO_CONSUMER_TOKEN}");
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .context("demo consumer connecting to /v1/ws")?;
    let subscribe = serde_json::json!({"op": "subscribe", "id": "lobby", "filter": {"types": [DEMO_CONSUMER_TYPES]}});
    ws.send(Message::text(subscribe.to_string()))
        .await
        .context("demo consumer subscribing")?;
    // Wait for the acknowledgement so no event is published before the subscription exists.
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.as_str().contains(r#""op":"subscribed""#) => break,
            Some(Ok(_)) => continue,
            other => anyhow::bail!("demo consumer: no subscription acknowledgement ({other:?})"),
        }
    }
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(async move {
        while let Some(Ok(msg)) = ws.next().await {
            let Message::Text(t) = msg else { continue };
            let Ok(frame) = serde_json::from_str::<Value>(t.as_str()) else {
                continue;
            };
            if frame["op"] == "event" {
                let seq = frame["seq"].as_u64().unwrap_or(0);
                let kind = frame["event"]["type"].as_str().unwrap_or("").to_string();
                if tx.send((seq, kind)).await.is_err() {
                    break;
                }
            }
        }
    });
    Ok(rx)
}

fn print_consumed(seq: u64, kind: &str, json: bool) {
    let line = format!(
        "      => /v1/ws consumer \"dashboard\" (types {DEMO_CONSUMER_TYPES})  got #{seq} {kind}"
    );
    if json {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
}

/// One webhook request as the demo's receiver saw it.
#[derive(Debug)]
struct WebhookSeen {
    id: String,
    event_type: String,
    verified: Result<(), String>,
}

/// A local webhook receiver that checks every signature the way a consumer would (with the
/// endpoint's secret) and reports each request; answers 204 if it verifies, 400 if not.
async fn start_receiver(bind: &str) -> anyhow::Result<(String, mpsc::Receiver<WebhookSeen>)> {
    use axum::http::{HeaderMap, StatusCode};
    let (tx, rx) = mpsc::channel(1024);
    let signer = Signer::from_secrets([DEMO_SECRET]).context("demo secret")?;
    let app = axum::Router::new().route(
        "/hooks",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let tx = tx.clone();
            let signer = signer.clone();
            async move {
                let h = |n: &str| {
                    headers
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string()
                };
                let verified = signer
                    .verify(
                        &h("webhook-id"),
                        &h("webhook-timestamp"),
                        &h("webhook-signature"),
                        &body,
                    )
                    .map_err(|e| e.to_string());
                let event_type = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v.get("type").and_then(Value::as_str).map(str::to_string))
                    .unwrap_or_default();
                let status = if verified.is_ok() {
                    StatusCode::NO_CONTENT
                } else {
                    StatusCode::BAD_REQUEST
                };
                let _ = tx
                    .send(WebhookSeen {
                        id: h("webhook-id"),
                        event_type,
                        verified,
                    })
                    .await;
                status
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .with_context(|| format!("webhook receiver on {bind}"))?;
    let addr = listener.local_addr().context("demo receiver address")?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((format!("http://{addr}/hooks"), rx))
}

fn print_webhook(hook: &WebhookSeen, json: bool) {
    let verdict = match &hook.verified {
        Ok(()) => "signature verified".to_string(),
        Err(e) => format!("SIGNATURE REJECTED: {e}"),
    };
    let line = format!(
        "      -> webhook crm   {:<30} webhook-id {}  {verdict}",
        hook.event_type,
        hook.id.get(..12).unwrap_or(&hook.id),
    );
    // In --json mode stdout carries envelopes only.
    if json {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
}

/// Options of `wsbridge demo`.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Print raw envelopes (one JSON per line) instead of the readable lines.
    pub json: bool,
    /// Pause between two scripted events, so a person can follow.
    pub interval: Duration,
    /// How many times the script is played.
    pub rounds: u32,
}

/// One scripted event: which simulator emits which frame.
#[derive(Clone, Debug)]
pub struct ScriptedEvent {
    /// The simulator that emits it.
    pub provider: Provider,
    /// The provider frame.
    pub frame: Value,
}

/// Every documented event type of every provider, interleaved so the three providers take
/// turns. `round` makes each round's frames (and so their ids) distinct.
pub fn script(round: u32) -> Vec<ScriptedEvent> {
    let now = Utc::now();
    let unix = now.timestamp() + i64::from(round);
    let iso = (now + chrono::Duration::seconds(i64::from(round)))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let lists = [
        (Provider::VoicePact, voicepact::wire::samples(unix)),
        (Provider::Voipbin, voipbin::wire::samples(&iso)),
        (Provider::Hashi, hashi::wire::samples(DEMO_LOBBY, &iso)),
    ];
    let longest = lists.iter().map(|(_, l)| l.len()).max().unwrap_or(0);
    let mut out = Vec::new();
    for i in 0..longest {
        for (provider, list) in &lists {
            if let Some(frame) = list.get(i) {
                out.push(ScriptedEvent {
                    provider: *provider,
                    frame: frame.clone(),
                });
            }
        }
    }
    out
}

/// The demo's bridge config: both VoicePact parties, VoIPBIN on every resource of customer
/// `abc123`, Hashi in the demo lobby, the journal in the embedded database file `db`, and
/// two routes to the local receiver at `hook_url`: answered/hung-up calls, and payments.
pub fn demo_config(sims: &[Simulator; 3], db: &Path, hook_url: &str) -> anyhow::Result<Config> {
    let [vp, vb, hs] = sims;
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[storage]\nbackend = \"embedded\"\npath = {:?}\n",
        db.display().to_string()
    );
    for (i, party) in DEMO_PARTIES.iter().enumerate() {
        let role = if i == 0 { "buyer" } else { "seller" };
        let _ = write!(
            text,
            "\n[[upstreams]]\nname = \"voicepact-{role}\"\nadapter = \"voicepact\"\nurl = \"{}\"\nclient_id = \"{party}\"\n",
            vp.base_url()
        );
    }
    let _ = write!(
        text,
        "\n[[upstreams]]\nname = \"voipbin-main\"\nadapter = \"voipbin\"\nurl = \"{}\"\ntoken = \"{}\"\ntopics = [\"customer_id:abc123:*:*\"]\n",
        vb.base_url(),
        sim::DEFAULT_VOIPBIN_TOKEN
    );
    let _ = write!(
        text,
        "\n[[upstreams]]\nname = \"hashi-main\"\nadapter = \"hashi\"\nurl = \"{}\"\ntoken = \"{}\"\nlobbies = [\"{DEMO_LOBBY}\"]\n",
        hs.base_url(),
        sim::DEFAULT_HASHI_TOKEN
    );
    let _ = write!(
        text,
        r#"
[[webhooks]]
name = "crm"
url = "{hook_url}"
secrets = ["{DEMO_SECRET}"]
allow_private = true
retry = ["200ms", "1s"]

[[routes]]
name = "finished-calls-to-crm"
types = ["voipbin.call.*"]
where = [{{ path = "/status", in = ["answered", "hangup"] }}]
to = ["crm"]

[[routes]]
name = "payments-to-crm"
types = ["voicepact.payment_update"]
to = ["crm"]

[[consumers]]
name = "dashboard"
token = "{DEMO_CONSUMER_TOKEN}"
allow = {{ providers = ["voipbin", "hashi"] }}
"#
    );
    Config::from_toml(&text, |_| None, false).map_err(|e| anyhow::anyhow!("demo config: {e}"))
}

/// Plays the script `rounds` times on the simulators; returns how many emitted frames reached
/// at least one connection (the number of distinct events the bridge should publish).
pub async fn play(sims: &[Simulator; 3], rounds: u32, interval: Duration) -> usize {
    let mut reached = 0;
    for round in 0..rounds {
        reached += play_round(sims, round, interval).await;
    }
    reached
}

/// Plays one round of the script; returns how many frames reached a connection.
async fn play_round(sims: &[Simulator; 3], round: u32, interval: Duration) -> usize {
    let mut reached = 0;
    for item in script(round) {
        let sim = match item.provider {
            Provider::VoicePact => &sims[0],
            Provider::Voipbin => &sims[1],
            Provider::Hashi => &sims[2],
        };
        if sim.emit(item.frame).await > 0 {
            reached += 1;
        }
        if !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
    }
    reached
}

/// Starts the three simulators (ephemeral ports or the default ones) with the demo's
/// VoicePact parties registered.
pub async fn start_simulators(ephemeral: bool) -> anyhow::Result<[Simulator; 3]> {
    let sims = sim::start_all(ephemeral)
        .await
        .context("starting the provider simulators")?;
    sims[0].set_contract_parties(DEMO_CONTRACT, &DEMO_PARTIES);
    Ok(sims)
}

/// Runs the demo to completion.
pub async fn run(options: DemoOptions) -> anyhow::Result<()> {
    let sims = start_simulators(true).await?;
    // A fresh journal per run, removed afterwards: the demo leaves nothing behind.
    let dir = std::env::temp_dir().join(format!("wsbridge-demo-{}", std::process::id()));
    let result = run_with(&sims, &dir, &options).await;
    for s in &sims {
        s.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_with(sims: &[Simulator; 3], dir: &Path, options: &DemoOptions) -> anyhow::Result<()> {
    let (hook_url, mut hooks) = start_receiver("127.0.0.1:0").await?;
    let config = demo_config(sims, &dir.join("demo.db"), &hook_url)?;
    let bridge = Bridge::start(&config)
        .await
        .context("starting the bridge")?;
    let mut events = bridge.subscribe();

    eprintln!("wsbridge demo: simulators of VoicePact, VoIPBIN and Hashi are up; the bridge is connecting...");
    wait_all_subscribed(&bridge, Duration::from_secs(10)).await?;
    // VoIPBIN and Hashi do not acknowledge subscriptions: wait until the simulators have
    // read them, or the first scripted events could reach nobody.
    for (sim, connections) in sims.iter().zip([DEMO_PARTIES.len(), 1, 1]) {
        sim.wait_subscribed(connections, Duration::from_secs(10))
            .await
            .map_err(|s| {
                anyhow::anyhow!(
                    "the {} simulator never saw the bridge subscribe: {s:?}",
                    sim.provider()
                )
            })?;
    }
    for u in bridge.upstreams() {
        eprintln!(
            "  {:<18} {:<9} {}",
            u.name(),
            u.status().state.as_str(),
            u.adapter().display_url()
        );
    }
    eprintln!(
        "  status page http://{addr}/   metrics http://{addr}/metrics",
        addr = bridge.local_addr()
    );
    eprintln!(
        "Playing every documented event type ({} round(s)); each line is one canonical envelope:\n",
        options.rounds
    );

    // Subscribed before the first scripted event, so it misses nothing.
    let mut consumer = start_consumer(bridge.local_addr()).await?;
    let (total_tx, mut total_rx) = tokio::sync::oneshot::channel();
    {
        let sims = sims.clone();
        let options = options.clone();
        tokio::spawn(async move {
            let _ = total_tx.send(play(&sims, options.rounds, options.interval).await);
        });
    }
    let mut printed = 0usize;
    let mut expected: Option<usize> = None;
    // Each published event the routes send to the demo receiver must arrive there, signed.
    let mut webhooks_due = 0usize;
    let mut webhooks_seen = 0usize;
    let consumer_filter =
        crate::routing::Filter::compile(&[""; 0], &[DEMO_CONSUMER_TYPES], &[""; 0])
            .map_err(|e| anyhow::anyhow!("demo consumer filter: {e:?}"))?;
    let mut consumed_due = 0usize;
    let mut consumed = 0usize;
    while expected.is_none_or(|want| printed < want)
        || webhooks_seen < webhooks_due
        || consumed < consumed_due
    {
        tokio::select! {
            total = &mut total_rx, if expected.is_none() => {
                expected = Some(total.context("the script player failed")?);
            }
            Some(hook) = hooks.recv() => {
                webhooks_seen += 1;
                print_webhook(&hook, options.json);
            }
            Some((seq, kind)) = consumer.recv() => {
                consumed += 1;
                print_consumed(seq, &kind, options.json);
            }
            got = tokio::time::timeout(Duration::from_secs(5), events.recv()) => match got {
                Ok(Ok(p)) => {
                    webhooks_due += config.router.targets(&p.envelope).len();
                    if consumer_filter.matches(&p.envelope) {
                        consumed_due += 1;
                    }
                    print_event(&p, options.json);
                    printed += 1;
                }
                Ok(Err(broadcast::error::RecvError::Lagged(n))) => eprintln!("(the printer fell behind and skipped {n} events)"),
                Ok(Err(broadcast::error::RecvError::Closed)) => break,
                // Quiet for 5 s after the script ended: whatever is missing is not coming.
                Err(_) if expected.is_some() => break,
                Err(_) => {}
            }
        }
    }

    let ingest = bridge.ingest_stats();
    eprintln!(
        "\nSummary: {printed} events published, {} duplicates suppressed; {webhooks_seen} of {webhooks_due} routed webhooks arrived with a valid signature; the /v1/ws consumer got {consumed} of {consumed_due} matching events.",
        ingest.duplicates
    );
    for u in bridge.upstreams() {
        let c = u.counters();
        eprintln!(
            "  {:<18} frames {:>3}  events {:>3}  decode errors {}  reconnects {}",
            u.name(),
            c.frames,
            c.events,
            c.decode_errors,
            c.reconnects
        );
    }
    bridge.shutdown().await;
    if let Some(want) = expected {
        if printed < want {
            bail!("only {printed} of {want} scripted events came through");
        }
    }
    if webhooks_seen < webhooks_due {
        bail!("only {webhooks_seen} of {webhooks_due} routed webhooks arrived");
    }
    if consumed < consumed_due {
        bail!("the /v1/ws consumer got only {consumed} of {consumed_due} events");
    }
    Ok(())
}

/// Waits (on status changes, not by polling) until every upstream is subscribed.
pub async fn wait_all_subscribed(bridge: &Bridge, limit: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    for u in bridge.upstreams() {
        let mut rx = u.watch_status();
        let waited = tokio::time::timeout_at(
            deadline,
            rx.wait_for(|s| s.state == UpstreamState::Subscribed),
        )
        .await;
        if !matches!(waited, Ok(Ok(_))) {
            let s = u.status();
            bail!(
                "upstream {} is {} ({})",
                u.name(),
                s.state.as_str(),
                s.last_error.unwrap_or_default()
            );
        }
    }
    Ok(())
}

fn print_event(p: &Arc<Published>, json: bool) {
    if json {
        println!("{}", String::from_utf8_lossy(&p.bytes));
        return;
    }
    let e = &p.envelope;
    println!(
        "#{:<4} {:<32} {:<34} {}  [{}]",
        e.seq.unwrap_or(0),
        e.event_type,
        e.subject.as_deref().unwrap_or("-"),
        summary(&e.data),
        e.source.trim_start_matches("wsbridge://"),
    );
}

/// A few telling fields of `data`, e.g. `status=answered amount=250.5`.
fn summary(data: &Value) -> String {
    const KEYS: [&str; 6] = [
        "status",
        "amount",
        "participantCount",
        "text",
        "current_action",
        "duration",
    ];
    let mut out = String::new();
    let payload = data.get("payload");
    for key in KEYS {
        let v = data.get(key).or_else(|| payload.and_then(|p| p.get(key)));
        if let Some(v) = v {
            let shown = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let _ = write!(out, "{key}={shown} ");
        }
    }
    out.trim_end().to_string()
}

/// `wsbridge simulate`: the three simulators on their default ports (the ones `config.toml`
/// points at), replaying the script every `interval` × script length until Ctrl-C, and a
/// webhook receiver on 127.0.0.1:9200 (config.toml's `crm`) that checks each signature.
pub async fn simulate(interval: Duration) -> anyhow::Result<()> {
    let sims = start_simulators(false).await?;
    for s in &sims {
        eprintln!("{:<9} simulator on {}", s.provider().name(), s.base_url());
    }
    let (hook_url, mut hooks) = start_receiver("127.0.0.1:9200").await?;
    eprintln!("webhook receiver on {hook_url}");
    tokio::spawn(async move {
        while let Some(hook) = hooks.recv().await {
            print_webhook(&hook, false);
        }
    });
    eprintln!("Playing the scripted stream in a loop; Ctrl-C stops.");
    let mut round = 0u32;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = async {
                play_round(&sims, round, interval).await;
            } => { round = round.wrapping_add(1); }
        }
    }
    for s in &sims {
        s.shutdown().await;
    }
    Ok(())
}
