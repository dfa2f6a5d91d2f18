//! `cargo bench -p wsbridge-adapters --bench decode`: decode time per frame on the golden
//! fixtures (`tests/fixtures`), the hand-written decoders against the dialect engine running
//! the built-in dialect files. CPU only, a few seconds; prints the median ns per frame of
//! each path, per provider and over all fixtures, and the engine/hand-written ratio.

use std::fs;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use wsbridge_adapters::dialect::{builtin, DialectAdapter, Params};
use wsbridge_adapters::{
    hashi::HashiAdapter, voicepact::VoicePactAdapter, voipbin::VoipbinAdapter, Adapter, Provider,
    Secret, UpstreamSettings,
};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");
/// Timed rounds per path; the median is reported.
const ROUNDS: usize = 31;
/// Passes over the provider's fixtures per round.
const PASSES: usize = 200;

fn settings(provider: Provider) -> UpstreamSettings {
    let (url, client_id, token) = match provider {
        Provider::VoicePact => ("ws://127.0.0.1:9101/api/v1/ws", Some("+254700000001"), None),
        Provider::Voipbin => ("ws://127.0.0.1:9102/v1.0/ws", None, Some(Secret::new("t"))),
        Provider::Hashi => ("ws://127.0.0.1:9103/", None, Some(Secret::new("t"))),
    };
    UpstreamSettings {
        url: url::Url::parse(url).expect("URL"),
        client_id: client_id.map(str::to_string),
        token,
        topics: Vec::new(),
        lobbies: Vec::new(),
    }
}

fn frames(dir: &Path, out: &mut Vec<String>) {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .expect("fixtures dir")
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            frames(&path, out);
        } else if path.to_string_lossy().ends_with(".frame.json") {
            let text = fs::read_to_string(&path).expect("fixture");
            out.push(text.trim_end_matches('\n').to_string());
        }
    }
}

/// ns per frame of one pass set ([`PASSES`] passes over `frames`).
fn round(adapter: &dyn Adapter, frames: &[String]) -> f64 {
    let start = Instant::now();
    for _ in 0..PASSES {
        for f in frames {
            let _ = black_box(adapter.decode(black_box(f)));
        }
    }
    start.elapsed().as_nanos() as f64 / (PASSES * frames.len()) as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median ns per frame of each path and median of the per-round ratios, over [`ROUNDS`]
/// rounds in which the two paths alternate (so load from elsewhere on the machine hits both).
fn time(hand: &dyn Adapter, engine: &dyn Adapter, frames: &[String]) -> (f64, f64, f64) {
    for f in frames {
        hand.decode(f).expect("fixture decodes");
        engine.decode(f).expect("fixture decodes");
    }
    let (mut h, mut e, mut r) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let a = round(hand, frames);
        let b = round(engine, frames);
        h.push(a);
        e.push(b);
        r.push(b / a);
    }
    (median(h), median(e), median(r))
}

fn main() {
    println!("decode per frame, median of {ROUNDS} alternating rounds (ns; ratio: median of the per-round ratios)");
    println!(
        "{:<10} {:>7} {:>13} {:>9} {:>7}",
        "provider", "frames", "hand-written", "engine", "ratio"
    );
    let (mut hand_total, mut engine_total, mut n_total) = (0.0, 0.0, 0usize);
    for provider in Provider::ALL {
        let mut fs = Vec::new();
        frames(&Path::new(FIXTURES).join(provider.name()), &mut fs);
        let s = settings(provider);
        let hand: Arc<dyn Adapter> = match provider {
            Provider::VoicePact => Arc::new(VoicePactAdapter::new(s.clone()).expect("builds")),
            Provider::Voipbin => Arc::new(VoipbinAdapter::new(s.clone()).expect("builds")),
            Provider::Hashi => Arc::new(HashiAdapter::new(s.clone()).expect("builds")),
        };
        let dialect = builtin(provider.name()).expect("built-in").expect("loads");
        let engine: Arc<dyn Adapter> =
            Arc::new(DialectAdapter::bind(dialect, &Params::from_settings(&s)).expect("binds"));
        let (h, e, ratio) = time(hand.as_ref(), engine.as_ref(), &fs);
        println!(
            "{:<10} {:>7} {:>13.0} {:>9.0} {:>6.2}x",
            provider.name(),
            fs.len(),
            h,
            e,
            ratio
        );
        hand_total += h * fs.len() as f64;
        engine_total += e * fs.len() as f64;
        n_total += fs.len();
    }
    let (h, e) = (hand_total / n_total as f64, engine_total / n_total as f64);
    println!(
        "{:<10} {:>7} {:>13.0} {:>9.0} {:>6.2}x (medians weighted by fixture count)",
        "all",
        n_total,
        h,
        e,
        e / h
    );
}
