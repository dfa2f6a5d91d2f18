//! `docs/openapi.json`, the OpenAPI 3.1 description of the bridge's HTTP endpoints, kept true:
//! it names every route the code serves (but the consumer streams, which
//! `docs/asyncapi.yaml` describes) and no other, the bridge serves it at `/v1/openapi.json`,
//! and schemathesis (from PyPI, installed once per test run into a venv under the cargo
//! target's scratch directory; if Python or PyPI is missing the test fails, it never skips)
//! runs every operation against a live bridge with the admin token: no 5xx, every status,
//! content type, header and body as documented, malformed input refused with 4xx, other
//! methods refused with 405, and the admin operations refused (401) without the token (the
//! consumer operation, `POST /v1/durables/{name}/ack`, without a consumer token).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;
use wsbridge::bridge::Bridge;
use wsbridge_adapters::sim::Simulator;
use wsbridge_adapters::Provider;

use crate::common::examples::{blocking, run_setup};
use crate::common::*;

const ADMIN_TOKEN: &str = "openapi-admin-token-55e1";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn document() -> Value {
    let text = std::fs::read_to_string(repo().join("docs/openapi.json")).expect("document");
    serde_json::from_str(&text).expect("docs/openapi.json is JSON")
}

/// The venv's `schemathesis` command, installed from PyPI once per test run (tests running in
/// parallel wait for it).
fn schemathesis() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("schemathesis-venv");
        let python = venv.join("bin/python");
        if !python.exists() {
            run_setup(
                "creating a Python venv for schemathesis (is python3-venv installed?)",
                Command::new("python3").arg("-m").arg("venv").arg(&venv),
            );
        }
        run_setup(
            "installing schemathesis from PyPI (is PyPI reachable?)",
            Command::new(&python).args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "schemathesis>=4.0,<5",
            ]),
        );
        venv.join("bin/schemathesis")
    })
}

/// Every path the code routes (`.route("…"` in `src/http` and `src/downstream`), in the
/// document's form (`{name}`).
fn routed_paths() -> BTreeSet<String> {
    let mut paths = BTreeSet::new();
    for dir in ["src/http", "src/downstream"] {
        for entry in std::fs::read_dir(repo().join(dir)).expect("source dir") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("source");
                // `.route("…"`, also when rustfmt put the path on the next line.
                for part in text.split(".route(").skip(1) {
                    let Some(part) = part.trim_start().strip_prefix('"') else {
                        continue;
                    };
                    if let Some(end) = part.find('"') {
                        paths.insert(part[..end].to_string());
                    }
                }
            }
        }
    }
    paths
}

#[test]
fn the_document_names_every_route_and_no_other() {
    let doc = document();
    assert_eq!(doc["openapi"], "3.1.0");
    let documented: BTreeSet<String> = doc["paths"]
        .as_object()
        .expect("paths")
        .keys()
        .cloned()
        .collect();
    let mut routed = routed_paths();
    // The consumer streams are described in docs/asyncapi.yaml (tests/it/asyncapi.rs).
    for stream in ["/v1/ws", "/v1/events"] {
        assert!(routed.remove(stream), "{stream} is routed");
    }
    assert!(routed.len() >= 11, "{routed:?}");
    assert_eq!(
        documented, routed,
        "docs/openapi.json paths (left) and the routes in the code (right) differ"
    );
}

/// Whether the request path `path` is an instance of the document's `template` (each
/// `{param}` segment stands for one non-empty segment).
fn path_fits(template: &str, path: &str) -> bool {
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    t.len() == p.len()
        && t.iter().zip(&p).all(|(t, p)| {
            if t.starts_with('{') && t.ends_with('}') {
                !p.is_empty()
            } else {
                t == p
            }
        })
}

/// Subscribes durable `name` (from the start) as subscription `id`.
async fn keep_durable(ws: &mut crate::common::ws::Ws, name: &str, id: u32) {
    let op = serde_json::json!({"op": "subscribe", "id": id, "durable": name, "from": "earliest"});
    let _ = futures_util::SinkExt::send(
        ws,
        tokio_tungstenite::tungstenite::Message::text(op.to_string()),
    )
    .await;
}

/// The consumer whose durables the document's examples name.
const WORKER_TOKEN: &str = "token-openapi-worker";

/// A bridge with the admin token, a webhook whose endpoint refuses connections (so it has
/// dead letters to list), events in the journal, and durables the document's examples name.
async fn live_bridge() -> (Bridge, Simulator) {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("probe port");
    let dead_addr = probe.local_addr().expect("probe addr");
    drop(probe);
    let vb = start_sim(Provider::Voipbin).await;
    let cfg = config_with_admin(
        &[
            upstream_block("vb", &vb, FAST),
            format!(
                "[[webhooks]]\nname = \"crm\"\nurl = \"http://{dead_addr}/hooks\"\nsecrets = [\"{SECRET}\"]\nallow_private = true\nretry = [\"50ms\"]\ntimeout = \"5s\"\n"
            ),
            "[[routes]]\nname = \"calls\"\nproviders = [\"voipbin\"]\nto = [\"crm\"]\n".to_string(),
            format!("[[consumers]]\nname = \"worker\"\ntoken = \"{WORKER_TOKEN}\"\n"),
        ],
        ADMIN_TOKEN,
    );
    let (bridge, _rx) = start_bridge(&cfg).await;
    wait_sim_ready(&vb, 1).await;
    // The durables the document's examples name: `billing-sync`, and `scratch` to delete, of
    // the consumer `worker`; and `billing-sync` of the consumer `admin` (the admin token's,
    // which schemathesis sends) for the ack operation. Schemathesis deletes whichever names
    // it learnt from the list, so each is held by a connection that subscribes it again
    // (creating it anew) when it is deleted.
    for (token, name) in [
        (WORKER_TOKEN, "billing-sync"),
        (WORKER_TOKEN, "scratch"),
        (ADMIN_TOKEN, "billing-sync"),
    ] {
        let mut ws = crate::common::ws::connect(&bridge, token).await;
        crate::common::ws::recv(&mut ws).await;
        keep_durable(&mut ws, name, 0).await;
        assert_eq!(crate::common::ws::recv(&mut ws).await["op"], "subscribed");
        tokio::spawn(async move {
            use futures_util::StreamExt;
            let mut n = 0;
            while let Some(Ok(msg)) = ws.next().await {
                let text = msg.into_text().unwrap_or_default();
                let frame: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
                if frame["code"] == "unknown_durable" {
                    n += 1;
                    keep_durable(&mut ws, name, n).await;
                }
            }
        });
    }
    for i in 1..4 {
        assert_eq!(vb.emit(numbered_call(i)).await, 1);
    }
    wait_published(&bridge, 3).await;
    let store = bridge.store().clone();
    eventually("dead letters to list", DEADLINE, || async {
        let dead = store.counts("crm").await.expect("counts").dead;
        (dead == 3).then_some(()).ok_or(dead)
    })
    .await;
    (bridge, vb)
}

#[tokio::test]
async fn the_bridge_serves_the_document_and_admin_operations_need_the_token() {
    let (bridge, _vb) = live_bridge().await;
    let served: Value =
        serde_json::from_str(&get_text(&bridge, "/v1/openapi.json").await).expect("JSON");
    assert_eq!(served, document());

    let client = http_client();
    let base = format!("http://{}", bridge.local_addr());
    let paths = document()["paths"].as_object().expect("paths").clone();
    let mut admin_ops = 0;
    let mut consumer_ops = 0;
    for (path, item) in &paths {
        for (method, op) in item.as_object().expect("path item") {
            let Some(security) = op.get("security") else {
                continue;
            };
            let consumer_op = security[0].get("consumerToken").is_some();
            if consumer_op {
                consumer_ops += 1;
            } else {
                admin_ops += 1;
            }
            let url = format!(
                "{base}{}",
                path.replace("{name}", "crm")
                    .replace("{consumer}", "worker")
            );
            for token in [None, Some("wrong-token")] {
                let mut req = match method.as_str() {
                    "post" => client.post(&url).header("content-type", "application/json"),
                    "delete" => client.delete(&url),
                    _ => client.get(&url),
                };
                if let Some(t) = token {
                    req = req.bearer_auth(t);
                }
                let resp = req.body("{\"dead\": true}").send().await.expect("call");
                let status = resp.status().as_u16();
                let text = resp.text().await.expect("body");
                let body: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"));
                assert_eq!(status, 401, "{method} {path} with {token:?}: {body}");
                if consumer_op {
                    assert_eq!(body["code"], "unauthorized", "{body}");
                } else {
                    assert!(body["error"].is_string(), "{body}");
                }
            }
        }
    }
    assert_eq!((admin_ops, consumer_ops), (10, 1));

    // A webhook name that is not UTF-8 once decoded gets the documented JSON 400 (axum's
    // own answer was plain text).
    for (method, path) in [
        ("GET", "deliveries"),
        ("POST", "replay"),
        ("POST", "enable"),
    ] {
        let url = format!("{base}/v1/admin/webhooks/%FF/{path}");
        let req = match method {
            "POST" => client.post(&url).header("content-type", "application/json"),
            _ => client.get(&url),
        };
        let resp = req
            .bearer_auth(ADMIN_TOKEN)
            .body("{\"dead\": true}")
            .send()
            .await
            .expect("call");
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let text = resp.text().await.expect("body");
        assert_eq!(
            (status, content_type.as_str()),
            (400, "application/json"),
            "{method} {url}: {text}"
        );
        let body: Value = serde_json::from_str(&text).expect("JSON");
        assert!(
            body["error"].as_str().is_some_and(|e| e.contains("UTF-8")),
            "{body}"
        );
    }
    bridge.shutdown().await;
}

#[tokio::test]
async fn schemathesis_finds_every_operation_true_to_the_document() {
    let (bridge, _vb) = live_bridge().await;
    let base = format!("http://{}", bridge.local_addr());
    let report_dir = temp_dir("schemathesis");
    let har = report_dir.join("run.har");
    let har_path = har.clone();
    let (ok, report) = blocking(move || {
        let bin = schemathesis();
        let out = Command::new(bin)
            .arg("run")
            .arg(format!("{base}/v1/openapi.json"))
            .args(["--url", &base])
            .args(["--header", &format!("Authorization: Bearer {ADMIN_TOKEN}")])
            // Every check but positive_data_acceptance: a schema cannot say that from_seq
            // must not be after to_seq (nor since after until), so a schema-valid replay body
            // can still be refused, with the 400 the document lists.
            .args([
                "--checks",
                "all",
                "--exclude-checks",
                "positive_data_acceptance",
            ])
            .args(["--phases", "examples,coverage,fuzzing"])
            .args(["--max-examples", "40", "--seed", "17", "--workers", "1"])
            .args(["--request-timeout", "10"])
            .args(["--report", "har", "--report-har-path"])
            .arg(&har)
            .env("NO_COLOR", "1")
            .current_dir(&report_dir)
            .output()
            .unwrap_or_else(|e| panic!("could not start schemathesis ({bin:?}): {e}"));
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    })
    .await;
    assert!(ok, "schemathesis found problems:\n{report}");
    // Every operation ran, but the document's own (schemathesis leaves out the URL it
    // loaded the document from; the test above compares what it serves with the file).
    let doc = document();
    let operations: usize = doc["paths"]
        .as_object()
        .expect("paths")
        .values()
        .map(|item| item.as_object().map_or(0, |m| m.len()))
        .sum();
    let tested = operations - 1;
    for line in [
        format!("Selected: {tested}/{tested}"),
        format!("Tested: {tested}"),
    ] {
        assert!(report.contains(&line), "expected {line:?} in:\n{report}");
    }
    assert!(report.contains("No issues found"), "{report}");

    // And each of them was answered 2xx at least once (the document's examples name the
    // webhook `crm`), so that schemathesis checked success bodies, not only refusals.
    let har: Value = serde_json::from_str(&std::fs::read_to_string(&har_path).expect("HAR report"))
        .expect("HAR is JSON");
    let answered: Vec<(String, String, u64)> = har["log"]["entries"]
        .as_array()
        .expect("HAR entries")
        .iter()
        .map(|e| {
            let url = e["request"]["url"].as_str().unwrap_or("");
            let path = url
                .strip_prefix(&format!("http://{}", bridge.local_addr()))
                .unwrap_or(url);
            let path = path.split('?').next().unwrap_or("").to_string();
            let method = e["request"]["method"].as_str().unwrap_or("").to_lowercase();
            (method, path, e["response"]["status"].as_u64().unwrap_or(0))
        })
        .collect();
    for (template, item) in doc["paths"].as_object().expect("paths") {
        if template == "/v1/openapi.json" {
            continue;
        }
        for method in item.as_object().expect("path item").keys() {
            let succeeded = answered.iter().any(|(m, p, status)| {
                m == method && (200..300).contains(status) && path_fits(template, p)
            });
            assert!(succeeded, "{method} {template} was never answered 2xx");
        }
    }
    bridge.shutdown().await;
}
