//! Finding 9 of issue 12, SSRF guard and DNS rebinding: the guard resolved a webhook's host
//! and checked the addresses, then the HTTP client resolved the name again to connect. A name
//! with TTL 0 could answer a public address to the check and `127.0.0.1` to the connect.
//!
//! The test runs a tiny DNS server of its own on a loopback address, port 53, that answers
//! the first A query for `rebind.wsbridge.test` with a public address and every later one with
//! `127.0.0.1`. The bridge binary runs in a private mount namespace (`unshare --mount`, as
//! root) whose `/etc/resolv.conf` names that server, so the bridge resolves through the
//! system resolver exactly as in production. A webhook receiver listens on 127.0.0.1: it must
//! never see a request, and the delivery must be dead-lettered with the guard's refusal.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use wsbridge_adapters::Provider;

use crate::common::nats::free_addr;
use crate::common::receiver::{Answer, Receiver};
use crate::common::*;

/// The name the webhook URL uses.
const NAME: &str = "rebind.wsbridge.test";
/// What the DNS server answers first: a public address (documentation range, never routed, so
/// an attempt to it fails without reaching anything).
const PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const ADMIN: &str = "admin-token";

/// A DNS server answering A queries for [`NAME`]: [`PUBLIC`] first, then `127.0.0.1`, all
/// with TTL 0. AAAA queries get an empty answer, other names NXDOMAIN.
struct RebindingDns {
    addr: SocketAddr,
    /// Every A answer given, in order.
    answers: Arc<Mutex<Vec<Ipv4Addr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RebindingDns {
    /// Binds UDP port 53 on the first free address of 127.53.0.0/24 (needs root).
    async fn start() -> RebindingDns {
        let socket = (1..=250u8)
            .find_map(|i| std::net::UdpSocket::bind(SocketAddr::from(([127, 53, 0, i], 53))).ok())
            .expect("binding UDP port 53 on 127.53.0.x (this test must run as root)");
        socket.set_nonblocking(true).expect("non-blocking socket");
        let socket = tokio::net::UdpSocket::from_std(socket).expect("tokio socket");
        let addr = socket.local_addr().expect("DNS server address");
        let answers = Arc::new(Mutex::new(Vec::new()));
        let log = answers.clone();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                if let Some(reply) = answer(&buf[..n], &log) {
                    let _ = socket.send_to(&reply, peer).await;
                }
            }
        });
        RebindingDns {
            addr,
            answers,
            task,
        }
    }

    fn answers(&self) -> Vec<Ipv4Addr> {
        self.answers.lock().expect("answers").clone()
    }
}

impl Drop for RebindingDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The reply to one query, or `None` for something that is not a query.
fn answer(query: &[u8], log: &Mutex<Vec<Ipv4Addr>>) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 || query[4..6] != [0, 1] {
        return None;
    }
    // The question: labels up to the root label, then type and class.
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*query.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let question_end = at + 4;
    let question = query.get(12..question_end)?;
    let ours = labels.join(".") == NAME;
    let address = if ours && qtype == 1 {
        let mut log = log.lock().ok()?;
        let ip = if log.is_empty() {
            PUBLIC
        } else {
            Ipv4Addr::LOCALHOST
        };
        log.push(ip);
        Some(ip)
    } else {
        None
    };
    let mut reply = Vec::with_capacity(question_end + 16);
    reply.extend_from_slice(&query[0..2]);
    // QR, the query's RD, RA; NXDOMAIN for names other than ours.
    reply.push(0x80 | (query[2] & 0x01));
    reply.push(if ours { 0x80 } else { 0x83 });
    reply.extend_from_slice(&[0, 1, 0, u8::from(address.is_some()), 0, 0, 0, 0]);
    reply.extend_from_slice(question);
    if let Some(ip) = address {
        // Name (pointer to the question), A, IN, TTL 0, 4 bytes of address.
        reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4]);
        reply.extend_from_slice(&ip.octets());
    }
    Some(reply)
}

/// The bridge binary in a private mount namespace whose resolver is `dns`; killed on drop.
struct NamespacedBridge {
    child: Child,
    addr: SocketAddr,
}

impl NamespacedBridge {
    fn spawn(dir: &std::path::Path, dns: SocketAddr, config_text: &str, addr: SocketAddr) -> Self {
        let config = dir.join("bridge.toml");
        std::fs::write(&config, config_text).expect("write config");
        let resolv = dir.join("resolv.conf");
        std::fs::write(
            &resolv,
            format!("nameserver {}\noptions timeout:1 attempts:3\n", dns.ip()),
        )
        .expect("write resolv.conf");
        // Only files and DNS, so that no NSS module (systemd-resolved, mDNS) answers instead.
        let nsswitch = dir.join("nsswitch.conf");
        std::fs::write(&nsswitch, "passwd: files\ngroup: files\nhosts: files dns\n")
            .expect("write nsswitch.conf");
        let script = r#"mount --bind "$1" /etc/resolv.conf || exit 97
if [ -e /etc/nsswitch.conf ]; then mount --bind "$2" /etc/nsswitch.conf || exit 98; fi
exec "$3" serve --config "$4""#;
        let child = Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                script,
                "sh",
            ])
            .arg(&resolv)
            .arg(&nsswitch)
            .arg(env!("CARGO_BIN_EXE_wsbridge"))
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("unshare(1) starts (util-linux; this test must run as root)");
        NamespacedBridge { child, addr }
    }

    /// GET on the admin API; `None` while the bridge does not answer. Whether the bridge
    /// still runs is checked at the call, so the request itself does not hold the bridge
    /// (a condition polled by `eventually` can make it).
    fn admin_get(&mut self, path: &str) -> impl std::future::Future<Output = Option<Value>> {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("the bridge in its mount namespace exited: {status}");
        }
        let url = format!("http://{}/v1/admin/{path}", self.addr);
        async move {
            let resp = http_client()
                .get(url)
                .bearer_auth(ADMIN)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .ok()?;
            serde_json::from_slice(&resp.bytes().await.ok()?).ok()
        }
    }
}

impl Drop for NamespacedBridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebinding_name_never_reaches_a_loopback_receiver() {
    let dns = RebindingDns::start().await;
    let receiver = Receiver::start(vec![], Answer::status(200)).await;
    let vb = start_sim(Provider::Voipbin).await;
    let addr = free_addr();
    // The query string stands for credentials in a URL: it must appear in no error.
    let url = format!(
        "http://{NAME}:{}/hook-path?key=url-secret",
        receiver.addr.port()
    );
    let blocks = [
        upstream_block("vb", &vb, FAST),
        format!(
            "[[webhooks]]\nname = \"rebind\"\nurl = \"{url}\"\n\
             secrets = [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]\n\
             retry = [\"100ms\"]\ntimeout = \"1s\"\n\n\
             [[routes]]\nname = \"all\"\nproviders = [\"voipbin\"]\nto = [\"rebind\"]\n"
        ),
    ];
    let text = config_text(&blocks).replacen(
        "[server]\nlisten = \"127.0.0.1:0\"\n",
        &format!("[server]\nlisten = \"{addr}\"\nadmin_token = \"{ADMIN}\"\n"),
        1,
    );
    let dir = temp_dir("ssrf-rebinding");
    let mut bridge = NamespacedBridge::spawn(&dir, dns.addr, &text, addr);

    // Up and subscribed.
    eventually("the bridge subscribed", DEADLINE, || {
        let upstreams = bridge.admin_get("upstreams");
        async move {
            let state = upstreams.await.and_then(|v| {
                v["upstreams"]
                    .as_array()?
                    .iter()
                    .find(|u| u["name"] == "vb")
                    .and_then(|u| u["state"].as_str().map(str::to_string))
            });
            if state.as_deref() == Some("subscribed") {
                Ok(())
            } else {
                Err(format!("state {state:?}"))
            }
        }
    })
    .await;
    wait_sim_ready(&vb, 1).await;
    assert_eq!(vb.emit(numbered_call(1)).await, 1);

    // Either the receiver is reached (the bug) or the delivery is dead-lettered after its two
    // attempts (one to the public address, which fails, one refused by the guard).
    let dead = eventually("a delivery or a dead letter", DEADLINE, || {
        let dead_letters = bridge.admin_get("webhooks/rebind/deliveries?state=dead");
        let (receiver, dns) = (&receiver, &dns);
        async move {
            if !receiver.requests().is_empty() {
                return Ok(None);
            }
            if let Some(list) = dead_letters.await {
                if list["deliveries"].as_array().is_some_and(|d| !d.is_empty()) {
                    return Ok(Some(list));
                }
            }
            Err(format!("DNS answers {:?}", dns.answers()))
        }
    })
    .await;
    assert!(
        receiver.requests().is_empty(),
        "a rebinding answer made the bridge POST to the loopback receiver (DNS answers {:?})",
        dns.answers()
    );
    let dead = dead.expect("dead-lettered");
    let answers = dns.answers();
    assert_eq!(
        answers.first(),
        Some(&PUBLIC),
        "the name was resolved through the test's DNS server"
    );
    assert!(
        answers.contains(&Ipv4Addr::LOCALHOST),
        "the rebinding answer was served: {answers:?}"
    );
    let attempts = dead["deliveries"][0]["attempts"]
        .as_array()
        .expect("attempts listed")
        .clone();
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    let errors: Vec<&str> = attempts
        .iter()
        .map(|a| a["error"].as_str().unwrap_or(""))
        .collect();
    let refusal = format!("{NAME} resolves to the internal address 127.0.0.1");
    assert!(
        errors.iter().any(|e| e.contains(&refusal)),
        "the guard's refusal is the attempt's error: {errors:?}"
    );
    for e in &errors {
        assert!(
            !e.contains("url-secret") && !e.contains("hook-path"),
            "an attempt error carries the URL: {e}"
        );
    }
}
