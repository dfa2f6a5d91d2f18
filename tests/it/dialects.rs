//! Users' dialect files (`[dialects] paths`): a provider by configuration alone, run against
//! real sockets. A copy of the VoIPBIN dialect under another name delivers events end to end
//! through `/v1/ws`; a test provider records the handshake headers a dialect sends; every
//! kind of parameter problem is refused naming the upstream and the key; and a reload of a
//! changed dialect reconnects only the upstreams that use it, while a broken one is refused
//! and the running one keeps going.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures_util::SinkExt;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::Message;
use wsbridge::config::Config;
use wsbridge_adapters::sim::{self, Simulator};
use wsbridge_adapters::Provider;

use crate::common::ws::{connect, recv};
use crate::common::*;

const CONSUMER_TOKEN: &str = "dialect-consumer-token";

/// The shipped VoIPBIN dialect renamed `name`, its examples' types renamed with it.
fn voipbin_copy(name: &str) -> String {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/adapters/voipbin.toml"
    ))
    .expect("the shipped voipbin dialect");
    text.replace("name = \"voipbin\"", &format!("name = \"{name}\""))
        .replace("\"voipbin.", &format!("\"{name}."))
}

fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("replace");
}

/// An upstream of the user dialect `adapter` on a VoIPBIN simulator.
fn voipbin_like(name: &str, adapter: &str, sim: &Simulator) -> String {
    format!(
        "[[upstreams]]\nname = \"{name}\"\nadapter = \"{adapter}\"\nurl = \"{}\"\ntoken = \"{}\"\ntopics = [\"customer_id:abc123:call:*\"]\n{FAST}\n",
        sim.base_url(),
        sim::DEFAULT_VOIPBIN_TOKEN
    )
}

/// A config whose `[dialects] paths` is `dialects`, with a consumer, written to `dir`.
fn config_file(dir: &Path, dialects: &Path, upstreams: &[String]) -> PathBuf {
    let path = dir.join("config.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\npath = {:?}\n[dialects]\npaths = [{:?}]\n\n[[consumers]]\nname = \"c\"\ntoken = \"{CONSUMER_TOKEN}\"\n\n{}",
        dir.join("j.db").display().to_string(),
        dialects.display().to_string(),
        upstreams.concat()
    );
    write(&path, &text);
    path
}

#[tokio::test]
async fn a_users_dialect_file_delivers_events_end_to_end_through_v1_ws() {
    let vb = start_sim(Provider::Voipbin).await;
    let dir = temp_dir("user-dialect");
    let dialects = dir.join("dialects");
    std::fs::create_dir_all(&dialects).expect("dialects dir");
    write(&dialects.join("myvoip.toml"), &voipbin_copy("myvoip"));
    let path = config_file(&dir, &dialects, &[voipbin_like("mine", "myvoip", &vb)]);
    let config = Config::load(&path).expect("valid config");
    assert_eq!(config.registry.files(), [dialects.join("myvoip.toml")]);
    let (bridge, _rx) = start_bridge(&config).await;
    wait_sim_ready(&vb, 1).await;

    let mut ws = connect(&bridge, CONSUMER_TOKEN).await;
    recv(&mut ws).await;
    ws.send(Message::text(
        json!({"op": "subscribe", "id": "s", "filter": {"providers": ["myvoip"]}}).to_string(),
    ))
    .await
    .expect("send");
    assert_eq!(recv(&mut ws).await["op"], "subscribed");
    assert_eq!(vb.emit(numbered_call(7)).await, 1);
    let frame = recv(&mut ws).await;
    let event = &frame["event"];
    assert_eq!(event["type"], "myvoip.call.status", "{frame}");
    assert_eq!(event["provider"], "myvoip", "{frame}");
    assert_eq!(event["source"], "wsbridge://mine", "{frame}");
    assert_eq!(event["subject"], "customer_id:abc123:call:c7", "{frame}");
    assert_eq!(event["data"]["n"], 7, "{frame}");

    // The status API names the provider by its dialect, and never shows the token.
    let status = http_client()
        .get(format!("http://{}/v1/status", bridge.local_addr()))
        .send()
        .await
        .expect("GET /v1/status")
        .text()
        .await
        .expect("body");
    assert!(status.contains("\"myvoip\""), "{status}");
    assert!(!status.contains(sim::DEFAULT_VOIPBIN_TOKEN), "{status}");
    bridge.shutdown().await;
}

/// Asserts that `text` is refused with a problem at `key` in the upstream named `item`,
/// whose reason contains `why`, and that no problem quotes `secret`.
fn assert_refused(text: &str, key: &str, item: &str, why: &str, secret: &str) {
    let err = Config::from_toml(text, |_| None, false).expect_err("refused");
    let shown = err.to_string();
    assert!(
        err.0
            .iter()
            .any(|i| i.key == key && i.item.as_deref() == Some(item) && i.reason.contains(why)),
        "{key} ({item}) with {why:?} not in:\n{shown}"
    );
    assert!(!shown.contains(secret), "a secret is quoted:\n{shown}");
}

#[test]
fn every_parameter_problem_is_refused_naming_the_upstream_and_the_key() {
    let dir = temp_dir("param-errors");
    let file = dir.join("demo.toml");
    write(
        &file,
        r##"
[dialect]
name = "demo"
[params]
api_key = { required = true, secret = true, check = 'if startswith("k-") then true else error("an api key starts with k-") end' }
channels = { type = "array", default = [] }
[connect]
url = '$url + "?key=" + ($api_key | @uri)'
"##,
    );
    let head = format!(
        "[storage]\npath = {:?}\n[dialects]\npaths = [{:?}]\n[[upstreams]]\nname = \"up-one\"\nadapter = \"demo\"\n",
        dir.join("j.db").display().to_string(),
        file.display().to_string()
    );
    let good = format!("{head}url = \"ws://127.0.0.1:9/\"\napi_key = \"k-s3cr3t\"\n");
    Config::from_toml(&good, |_| None, false).expect("the good config loads");
    let secret = "k-s3cr3t";
    // An unknown key.
    assert_refused(
        &format!("{good}api_kee = \"x\"\n"),
        "upstreams[0].api_kee",
        "up-one",
        "not a parameter of the demo dialect",
        secret,
    );
    // A missing required key.
    assert_refused(
        &format!("{head}url = \"ws://127.0.0.1:9/\"\n"),
        "upstreams[0].api_key",
        "up-one",
        "needs `api_key`",
        secret,
    );
    // The wrong type (a secret's value is never quoted).
    assert_refused(
        &format!("{good}channels = \"#a\"\n"),
        "upstreams[0].channels",
        "up-one",
        "is string, expected array",
        secret,
    );
    assert_refused(
        &format!("{head}url = \"ws://127.0.0.1:9/\"\napi_key = [\"{secret}\"]\n"),
        "upstreams[0].api_key",
        "up-one",
        "is array, expected string",
        secret,
    );
    // A failed check.
    assert_refused(
        &format!("{head}url = \"ws://127.0.0.1:9/\"\napi_key = \"s3cr3t\"\n"),
        "upstreams[0].api_key",
        "up-one",
        "an api key starts with k-",
        "s3cr3t",
    );
    // `url`, read by this dialect's connect URL.
    assert_refused(
        &format!("{head}api_key = \"{secret}\"\n"),
        "upstreams[0].url",
        "up-one",
        "builds its connect URL from `url`",
        secret,
    );
    // An adapter nobody loaded.
    assert_refused(
        &good.replace("adapter = \"demo\"", "adapter = \"dmeo\""),
        "upstreams[0].adapter",
        "up-one",
        "unknown adapter \"dmeo\"",
        secret,
    );
    // A unique parameter shared by two upstreams at one url (VoicePact's client_id).
    let twins = format!(
        "[storage]\npath = {:?}\n{}{}",
        dir.join("j.db").display().to_string(),
        "[[upstreams]]\nname = \"vp-a\"\nadapter = \"voicepact\"\nurl = \"ws://127.0.0.1:9101/api/v1/ws\"\nclient_id = \"+1\"\n",
        "[[upstreams]]\nname = \"vp-b\"\nadapter = \"voicepact\"\nurl = \"ws://127.0.0.1:9101/api/v1/ws/\"\nclient_id = \"+1\"\n",
    );
    assert_refused(
        &twins,
        "upstreams[1].client_id",
        "vp-b",
        "already used by upstreams[0]",
        secret,
    );
}

#[test]
fn a_users_dialect_may_not_take_a_built_in_name_nor_fail_to_load() {
    let dir = temp_dir("dialect-names");
    let file = dir.join("voipbin.toml");
    write(&file, &voipbin_copy("voipbin"));
    let text = format!(
        "[storage]\npath = {:?}\n[dialects]\npaths = [{:?}]\n[[upstreams]]\nname = \"vp\"\nadapter = \"voicepact\"\nurl = \"ws://127.0.0.1:9101/api/v1/ws\"\nclient_id = \"+1\"\n",
        dir.join("j.db").display().to_string(),
        dir.display().to_string()
    );
    let err = Config::from_toml(&text, |_| None, false).expect_err("refused");
    let issue = err
        .0
        .iter()
        .find(|i| i.key == "dialects.paths[0]")
        .unwrap_or_else(|| panic!("no dialects.paths[0] problem: {err}"));
    assert!(
        issue.reason.contains("voipbin.toml")
            && issue.reason.contains("dialect.name")
            && issue.reason.contains("name of a built-in dialect"),
        "{err}"
    );
    write(
        &file,
        "[dialect]\nname = \"broken\"\n[connect]\nurl = '$url +'\n",
    );
    let err = Config::from_toml(&text, |_| None, false).expect_err("refused");
    let shown = err.to_string();
    assert!(
        shown.contains("dialects.paths[0]")
            && shown.contains("voipbin.toml")
            && shown.contains("connect.url")
            && shown.contains("jq"),
        "{shown}"
    );
}

/// One upgrade request's headers, names lower-case.
type Headers = Vec<(String, String)>;
/// Every upgrade request's headers, in arrival order.
type Seen = Arc<Mutex<Vec<Headers>>>;

/// A test provider on a real socket: records each upgrade request's headers, then sends one
/// event frame.
async fn header_recorder() -> (String, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("ws://{}/feed", listener.local_addr().expect("addr"));
    let seen: Seen = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                // The callback's type is tungstenite's, large error variant included.
                #[allow(clippy::result_large_err)]
                let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
                    let headers = req
                        .headers()
                        .iter()
                        .map(|(k, v)| {
                            (k.as_str().to_string(), v.to_str().unwrap_or("").to_string())
                        })
                        .collect();
                    record.lock().expect("lock").push(headers);
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else {
                    return;
                };
                let frame = json!({"kind": "hello.world", "n": 1}).to_string();
                if ws.send(Message::text(frame)).await.is_err() {
                    return;
                }
                use futures_util::StreamExt;
                while let Some(Ok(_)) = ws.next().await {}
            });
        }
    });
    (url, seen)
}

#[tokio::test]
async fn connect_headers_of_a_dialect_reach_the_provider() {
    let (url, seen) = header_recorder().await;
    let dir = temp_dir("headers");
    let file = dir.join("hdr.toml");
    write(
        &file,
        r#"
[dialect]
name = "hdr"
[params]
api_key = { required = true, secret = true }
[connect]
url = '$url'
headers = { "x-api-key" = '$api_key', "x-client" = '"wsbridge/" + ("1" | tostring)' }
[[events]]
type = '.kind'
"#,
    );
    let path = config_file(
        &dir,
        &file,
        &[format!(
            "[[upstreams]]\nname = \"hdr-up\"\nadapter = \"hdr\"\nurl = \"{url}\"\napi_key = \"hdr-s3cr3t\"\n{FAST}\n"
        )],
    );
    let config = Config::load(&path).expect("valid config");
    let (bridge, mut rx) = start_bridge(&config).await;
    let event = next_matching(&mut rx, "the hdr event", |p| {
        p.envelope.event_type == "hdr.hello.world"
    })
    .await;
    assert_eq!(event.envelope.provider, "hdr");
    let first = seen
        .lock()
        .expect("lock")
        .first()
        .cloned()
        .expect("an upgrade");
    let get = |name: &str| {
        first
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no {name} header in {first:?}"))
    };
    assert_eq!(get("x-api-key"), "hdr-s3cr3t");
    assert_eq!(get("x-client"), "wsbridge/1");
    // The upgrade itself is intact.
    assert_eq!(get("upgrade").to_ascii_lowercase(), "websocket");
    bridge.shutdown().await;
}

/// The ids of the simulator's open connections, and how many it ever accepted.
fn connections(sim: &Simulator) -> (Vec<u64>, u64) {
    let s = sim.snapshot();
    (s.connections.iter().map(|c| c.id).collect(), s.accepted)
}

#[tokio::test]
async fn reloading_a_changed_dialect_reconnects_only_its_upstreams_and_a_broken_one_is_refused() {
    let mine_sim = start_sim(Provider::Voipbin).await;
    let builtin_sim = start_sim(Provider::Voipbin).await;
    let dir = temp_dir("dialect-reload");
    let dialects = dir.join("dialects");
    std::fs::create_dir_all(&dialects).expect("dialects dir");
    let file = dialects.join("myvoip.toml");
    write(&file, &voipbin_copy("myvoip"));
    let path = config_file(
        &dir,
        &dialects,
        &[
            voipbin_like("mine", "myvoip", &mine_sim),
            upstream_block("vb", &builtin_sim, FAST),
        ],
    );
    let config = Config::load(&path).expect("valid config");
    let (bridge, mut rx) = start_bridge(&config).await;
    wait_sim_ready(&mine_sim, 1).await;
    wait_sim_ready(&builtin_sim, 1).await;
    let (mine_before, mine_accepted) = connections(&mine_sim);
    let builtin_before = connections(&builtin_sim);

    // A changed dialect: its event types get a "v2." prefix.
    let v2 = voipbin_copy("myvoip").replacen(
        "type = '.event_type |",
        "type = '\"v2.\" + .event_type |",
        1,
    );
    assert_ne!(v2, voipbin_copy("myvoip"), "the dialect changed");
    write(&file, &v2);
    let report = wsbridge::reload::reload_file(&bridge, &path)
        .await
        .expect("the changed dialect is valid");
    assert!(
        report
            .applied
            .iter()
            .any(|c| c == "upstream mine: reconnecting with its changed dialect"),
        "{report:?}"
    );
    assert!(
        !report.applied.iter().any(|c| c.contains("upstream vb")),
        "{report:?}"
    );
    let after = mine_sim
        .wait_until(DEADLINE, |s| {
            s.accepted > mine_accepted
                && !s.connections.is_empty()
                && s.connections.iter().all(|c| !mine_before.contains(&c.id))
                && s.connections.iter().all(|c| !c.subscriptions.is_empty())
        })
        .await
        .unwrap_or_else(|s| panic!("mine never reconnected: {s:?}"));
    assert_eq!(after.connections.len(), 1, "{after:?}");
    assert_eq!(
        connections(&builtin_sim),
        builtin_before,
        "the built-in upstream kept its connection"
    );
    for u in bridge.upstreams() {
        wait_subscribed(&u).await;
    }
    assert_eq!(mine_sim.emit(numbered_call(1)).await, 1);
    next_matching(&mut rx, "an event of the changed dialect", |p| {
        p.envelope.event_type == "myvoip.v2.call.status"
    })
    .await;

    // A broken dialect: refused with the file and the key; the running one stays.
    let mine_running = connections(&mine_sim);
    write(
        &file,
        &v2.replacen("type = '\"v2.\" +", "type = '\"v3.\" + +", 1),
    );
    let err = match wsbridge::reload::reload_file(&bridge, &path).await {
        Err(wsbridge::reload::ReloadError::Invalid(e)) => e,
        other => panic!("expected an invalid config, got {other:?}"),
    };
    let shown = err.to_string();
    assert!(
        shown.contains("dialects.paths[0]")
            && shown.contains("myvoip.toml")
            && shown.contains("events[0].type"),
        "{shown}"
    );
    assert_eq!(connections(&mine_sim), mine_running, "no reconnect");
    assert_eq!(connections(&builtin_sim), builtin_before, "no reconnect");
    assert_eq!(mine_sim.emit(numbered_call(2)).await, 1);
    let e = next_matching(&mut rx, "an event after the refused reload", |p| {
        p.envelope.subject.as_deref() == Some("customer_id:abc123:call:c2")
    })
    .await;
    assert_eq!(e.envelope.event_type, "myvoip.v2.call.status");
    bridge.shutdown().await;
}
