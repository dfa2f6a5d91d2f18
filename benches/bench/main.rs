//! `cargo bench --bench bench -- [--quick] [--only a,b] [--systems wsbridge,raw,nchan]`
//!
//! Issue 8: wsbridge side by side with a raw tokio-tungstenite broadcast server and nchan, on
//! 127.0.0.1, in one run, printing one table. See the README's "Benchmarks" section and
//! `benches/run.sh` (installs nginx-light + libnginx-mod-nchan if missing, then runs this).
//!
//! What runs where:
//! - this process is the *load tool*: the upstream pushers (a lighter provider server speaking
//!   the VoIPBIN `event_type` dialect), the WebSocket consumers, and the keep-alive webhook
//!   receiver. Its CPU is reported beside the server's;
//! - the server under test is a separate process, so its CPU and RSS are measured on their
//!   own: the release `wsbridge serve` binary with a generated config (embedded store), this
//!   same binary re-executed as `raw-server` (dials the same upstream, forwards frames
//!   unchanged), or nginx with the nchan module (`benches/nchan.conf`).
//!
//! Every event carries `"u"` (upstream), `"n"` (sequence per upstream) and `"ts"` (send time,
//! µs since this process started) inside the provider payload, so whatever envelope wraps it,
//! a consumer measures send → receive latency and counts lost (gaps, tail) and duplicated
//! frames.

mod consumers;
mod frames;
mod nats_raw;
mod prefill;
mod pusher;
mod raw;
mod receiver;
mod report;
mod scenarios;
mod servers;

use std::time::Instant;

use consumers::Seen;
use frames::{frame, parse_event, Mark, FRAME_BYTES, START};
use raw::raw_server;
use report::print_table;
use scenarios::{
    scenario_durable, scenario_fanout, scenario_ingest, scenario_latency, scenario_latency1,
    scenario_memory, scenario_reconnect, scenario_webhooks, Opts,
};
use servers::{nchan_available, System, NCHAN_MODULE, NGINX};

/// What a bench step returns: a failure is a message for the operator.
pub(crate) type Res<T> = Result<T, String>;

fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
            return r.rlim_cur;
        }
    }
    0
}

const SCENARIOS: &[&str] = &[
    "fanout",
    "latency",
    "latency1",
    "ingest",
    "webhooks",
    "memory",
    "reconnect",
    "durable",
];

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench bench -- [--quick] [--only {}] [--systems wsbridge,raw,nchan] [--hold SECS] [--journal N] [--consumers N] [--endpoints N] [--nats URL]",
        SCENARIOS.join(",")
    );
    std::process::exit(2)
}

/// Cheap checks of the measuring code itself, run before every bench (a wrong parser would
/// make every figure wrong).
fn self_check() {
    let f = frame(2, 12345, 678);
    assert_eq!(f.len(), FRAME_BYTES, "frame size");
    assert!(
        serde_json::from_str::<serde_json::Value>(&f).is_ok(),
        "frame is JSON"
    );
    let mark = Some(Mark {
        u: 2,
        n: 12345,
        ts: 678,
    });
    assert_eq!(parse_event(&f), mark);
    let wrapped = format!(r#"{{"op":"event","seq":9,"event":{{"data":{f}}}}}"#);
    assert_eq!(parse_event(&wrapped), mark);
    let mut s = Seen::default();
    for n in [0, 1, 3, 3, 4] {
        s.event(0, n, 0, false);
    }
    assert_eq!((s.gaps, s.dups, s.lost(&[7])), (1, 1, 3), "loss accounting");
}

fn main() {
    START.get_or_init(Instant::now);
    self_check();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    if args.first().map(String::as_str) == Some("raw-server") {
        raise_nofile();
        let port = args
            .get(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| usage());
        if let Err(e) = rt.block_on(raw_server(port, args[2..].to_vec())) {
            eprintln!("raw-server: {e}");
            std::process::exit(1);
        }
        return;
    }
    let mut quick = false;
    let mut hold = None;
    let mut only: Vec<String> = SCENARIOS.iter().map(|s| s.to_string()).collect();
    let mut systems = vec![System::Wsbridge, System::Raw, System::Nchan];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--bench" => {} // added by `cargo bench`
            "--quick" => quick = true,
            "--hold" => {
                hold = Some(
                    it.next()
                        .and_then(|h| h.parse().ok())
                        .unwrap_or_else(|| usage()),
                )
            }
            "--journal" => {
                let n: u64 = it
                    .next()
                    .and_then(|h| h.parse().ok())
                    .unwrap_or_else(|| usage());
                let _ = prefill::JOURNAL.set(n);
            }
            "--nats" => {
                let _ = servers::NATS.set(it.next().cloned().unwrap_or_else(|| usage()));
            }
            "--consumers" | "--endpoints" => {
                let n: usize = it
                    .next()
                    .and_then(|h| h.parse().ok())
                    .filter(|n| *n > 0)
                    .unwrap_or_else(|| usage());
                let _ = if a == "--consumers" {
                    servers::CONSUMERS.set(n)
                } else {
                    servers::ENDPOINTS.set(n)
                };
            }
            "--only" => {
                only = it
                    .next()
                    .unwrap_or_else(|| usage())
                    .split(',')
                    .map(str::to_string)
                    .collect();
                if let Some(bad) = only.iter().find(|s| !SCENARIOS.contains(&s.as_str())) {
                    eprintln!("unknown scenario {bad:?}");
                    usage();
                }
            }
            "--systems" => {
                systems = Vec::new();
                for s in it.next().unwrap_or_else(|| usage()).split(',') {
                    systems.push(match s {
                        "wsbridge" => System::Wsbridge,
                        "raw" => System::Raw,
                        "nchan" => System::Nchan,
                        _ => usage(),
                    });
                }
            }
            _ => usage(),
        }
    }
    if systems.contains(&System::Nchan) && !nchan_available() {
        eprintln!(
            "nchan not installed ({NGINX}, {NCHAN_MODULE}); run benches/run.sh to install it. Skipping nchan."
        );
        systems.retain(|s| *s != System::Nchan);
    }
    let nofile = raise_nofile();
    let o = Opts {
        quick,
        systems,
        hold,
    };
    eprintln!(
        "open-files limit raised to {nofile}; scenarios: {}",
        only.join(",")
    );
    let mut rows = Vec::new();
    let t0 = Instant::now();
    let result: Res<()> = rt.block_on(async {
        for s in &only {
            eprintln!("scenario {s}");
            match s.as_str() {
                "fanout" => scenario_fanout(&o, &mut rows).await?,
                "latency" => scenario_latency(&o, &mut rows).await?,
                "latency1" => scenario_latency1(&o, &mut rows).await?,
                "ingest" => scenario_ingest(&o, &mut rows).await?,
                "webhooks" => scenario_webhooks(&o, &mut rows).await?,
                "memory" => scenario_memory(&o, &mut rows).await?,
                "reconnect" => scenario_reconnect(&o, &mut rows).await?,
                "durable" => scenario_durable(&o, &mut rows).await?,
                _ => {}
            }
        }
        Ok(())
    });
    print_table(&rows);
    eprintln!("total {:.0} s", t0.elapsed().as_secs_f64());
    if let Err(e) = result {
        eprintln!("bench failed: {e}");
        std::process::exit(1);
    }
}
