//! The status page at `/`, rendered by a real browser: headless Chromium loads the page from
//! the running bridge, the page's script polls `/v1/status`, and the DOM Chromium dumps must
//! show every upstream subscribed with its events counted. A second test serves the page next
//! to a failing `/v1/status` and expects the error banner.
//!
//! Needs Debian's `chromium` package (`apt-get install chromium`); `.ci/run` installs it.
//! The only wait that is not on a condition is Chromium's own `--virtual-time-budget`,
//! which runs the page's timers in virtual time (so the 1 s poll runs several times).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::examples::Group;
use crate::common::receiver::{Answer, Receiver};
use crate::common::*;
use serde_json::json;
use wsbridge_adapters::{voicepact, voipbin, Provider};

/// How long one Chromium run may take (a cold start on a busy 2-core machine is slow).
const BROWSER_DEADLINE: Duration = Duration::from_secs(120);

/// Debian's Chromium: `chromium` on the PATH, else `/usr/bin/chromium`; fails the test with
/// what to install when there is none.
fn chromium() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join("chromium"))
        .find(|p| p.is_file());
    let fallback = Path::new("/usr/bin/chromium");
    match on_path {
        Some(p) => p,
        None if fallback.is_file() => fallback.to_path_buf(),
        None => panic!(
            "tests/it/status_page.rs needs headless Chromium, and `chromium` is not installed: \
             install Debian's package with `apt-get install chromium` (.ci/run does this)"
        ),
    }
}

/// Removes Chromium's profile directory when dropped, also when the test panics.
struct Profile(PathBuf);

impl Drop for Profile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Loads `url` in headless Chromium, lets the page run for 5 s of virtual time, and returns
/// the DOM it dumps.
async fn dump_dom(url: &str) -> String {
    let profile = Profile(temp_dir("chromium-profile"));
    let mut cmd = tokio::process::Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
    ])
    .arg(format!("--user-data-dir={}", profile.0.display()))
    .args(["--virtual-time-budget=5000", "--dump-dom", url]);
    // The whole group (browser, renderers, GPU and crash handler) is killed when done.
    let (status, out, err) = Group::spawn("chromium (apt-get install chromium)", &mut cmd)
        .output("chromium", BROWSER_DEADLINE)
        .await;
    let dom = String::from_utf8_lossy(&out).into_owned();
    if !status.success() || !dom.contains("</html>") {
        let err = String::from_utf8_lossy(&err);
        let tail: String = err
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        panic!("chromium failed ({status}); DOM:\n{dom}\nstderr (tail):\n{tail}");
    }
    dom
}

/// The text of the element with `id` (a leaf element: its text runs up to the next tag).
fn text_of<'a>(dom: &'a str, id: &str) -> Option<&'a str> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let start = at + dom[at..].find('>')? + 1;
    let end = start + dom[start..].find('<')?;
    Some(dom[start..end].trim())
}

/// Whether the error banner carries the `hidden` attribute.
fn banner_hidden(dom: &str) -> bool {
    let at = dom
        .find("id=\"error-banner\"")
        .expect("the page has an error banner");
    let start = dom[..at].rfind('<').expect("an opening tag");
    let end = at + dom[at..].find('>').expect("a complete tag");
    dom[start..end]
        .split_whitespace()
        .any(|a| a == "hidden" || a.starts_with("hidden="))
}

/// A count as the page formats it (`1,234`).
fn count_of(dom: &str, id: &str) -> u64 {
    let text = text_of(dom, id).unwrap_or_else(|| panic!("no element #{id} in the DOM:\n{dom}"));
    text.replace(',', "")
        .parse()
        .unwrap_or_else(|_| panic!("#{id} is {text:?}, not a count"))
}

#[tokio::test]
async fn the_status_page_shows_every_upstream_subscribed_with_its_events() {
    chromium(); // fails first, naming the package, when there is no browser
    let vp = start_sim(Provider::VoicePact).await;
    let vb = start_sim(Provider::Voipbin).await;
    let hs = start_sim(Provider::Hashi).await;
    let hooks = Receiver::start(vec![], Answer::status(200)).await;
    let cfg = config(&[
        upstream_block("voicepact-main", &vp, FAST),
        upstream_block("voipbin-main", &vb, FAST),
        upstream_block("hashi-main", &hs, FAST),
        format!(
            "[[webhooks]]\nname = \"crm\"\nurl = \"{}\"\nsecrets = [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]\n\
             allow_private = true\n\n[[routes]]\nname = \"calls\"\nproviders = [\"voipbin\"]\nto = [\"crm\"]\n",
            hooks.url()
        ),
    ]);
    let (bridge, mut rx) = start_bridge(&cfg).await;
    for sim in [&vp, &vb, &hs] {
        wait_sim_ready(sim, 1).await;
    }

    // Two events per provider, each seen published before the page is loaded.
    for i in 0..2 {
        assert_eq!(
            vp.emit(voicepact::wire::payment_update(
                &format!("ctr-{i}"),
                "completed",
                250.5,
                1717171717
            ))
            .await,
            1
        );
        assert_eq!(
            vb.emit(voipbin::wire::event(
                "call.status",
                "2024-01-15T10:30:00.000000Z",
                &format!("customer_id:abc123:call:c{i}"),
                json!({"id": format!("c{i}"), "status": "ringing"}),
            ))
            .await,
            1
        );
        assert_eq!(hs.emit(numbered_lobby_join(i)).await, 1);
    }
    for provider in ["voicepact", "voipbin", "hashi"] {
        for _ in 0..2 {
            next_matching(&mut rx, provider, |p| p.envelope.provider == provider).await;
        }
    }
    hooks.wait_for(2, DEADLINE).await;

    let dom = dump_dom(&format!("http://{}/", bridge.local_addr())).await;

    assert!(
        text_of(&dom, "last-updated").is_some_and(|t| t != "never"),
        "the page never got a status answer:\n{dom}"
    );
    assert!(banner_hidden(&dom), "the error banner is showing:\n{dom}");
    for u in bridge.upstreams() {
        let name = u.name();
        assert_eq!(
            text_of(&dom, &format!("upstream-{name}-state")),
            Some("subscribed"),
            "upstream {name} in the DOM:\n{dom}"
        );
        let events = count_of(&dom, &format!("upstream-{name}-events"));
        assert!(events >= 2, "upstream {name} shows {events} events");
    }
    assert_eq!(bridge.upstreams().len(), 3);
    for provider in ["voicepact", "voipbin", "hashi"] {
        let total = count_of(&dom, &format!("provider-{provider}-events"));
        assert!(total >= 2, "provider {provider} shows {total} events");
        assert!(
            text_of(&dom, &format!("provider-{provider}-rate")).is_some(),
            "no rate for {provider}"
        );
    }
    assert!(count_of(&dom, "ingest-published") >= 6);
    assert!(count_of(&dom, "journal-head") >= 6);
    assert_ne!(text_of(&dom, "journal-epoch"), Some("–"));
    assert_eq!(text_of(&dom, "webhook-crm-enabled"), Some("enabled"));
    assert_eq!(count_of(&dom, "webhook-crm-dead"), 0);
    assert_eq!(count_of(&dom, "consumers-connected"), 0);
    bridge.shutdown().await;
}

#[tokio::test]
async fn a_failing_status_poll_shows_the_error_banner() {
    // The page from the bridge's source, next to a /v1/status that always fails.
    let app = axum::Router::new()
        .route(
            "/",
            axum::routing::get(|| async {
                axum::response::Html(include_str!("../../src/http/status_page.html"))
            }),
        )
        .route(
            "/v1/status",
            axum::routing::get(|| async { (axum::http::StatusCode::SERVICE_UNAVAILABLE, "down") }),
        );
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let dom = dump_dom(&format!("http://{addr}/")).await;
    assert!(!banner_hidden(&dom), "the error banner is hidden:\n{dom}");
    let banner = text_of(&dom, "error-banner").expect("banner");
    assert!(banner.contains("HTTP 503"), "banner says {banner:?}");
    assert_eq!(text_of(&dom, "last-updated"), Some("never"));
    server.abort();
}
