//! `cargo bench -p wsbridge-adapters --bench decode`: decode time per frame on the golden
//! fixtures (`tests/fixtures`), the dialect engine running the built-in dialect files. CPU
//! only, a few seconds; prints the median ns per frame per provider and over all fixtures.
//! (Before the hand-written decoders were removed this bench ran both side by side; the
//! figures are in the README, "Benchmarks".)

use std::fs;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use wsbridge_adapters::dialect::{builtin, Params};
use wsbridge_adapters::{build_adapter, Adapter, Provider};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");
/// Timed rounds per path; the median is reported.
const ROUNDS: usize = 31;
/// Passes over the provider's fixtures per round.
const PASSES: usize = 200;

fn params(provider: Provider) -> Params {
    let (url, key, value) = match provider {
        Provider::VoicePact => (
            "ws://127.0.0.1:9101/api/v1/ws",
            "client_id",
            "+254700000001",
        ),
        Provider::Voipbin => ("ws://127.0.0.1:9102/v1.0/ws", "token", "t"),
        Provider::Hashi => ("ws://127.0.0.1:9103/", "token", "t"),
    };
    let mut p = Params::new(&url::Url::parse(url).expect("URL"));
    p.set(key, serde_json::Value::String(value.to_string()));
    p
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

/// Median ns per frame over [`ROUNDS`] rounds.
fn time(adapter: &dyn Adapter, frames: &[String]) -> f64 {
    for f in frames {
        adapter.decode(f).expect("fixture decodes");
    }
    let mut v: Vec<f64> = (0..ROUNDS).map(|_| round(adapter, frames)).collect();
    v.sort_by(f64::total_cmp);
    v[ROUNDS / 2]
}

fn main() {
    println!("decode per frame on the dialect engine, median of {ROUNDS} rounds (ns)");
    println!("{:<10} {:>7} {:>9}", "provider", "frames", "engine");
    let (mut total, mut n_total) = (0.0, 0usize);
    for provider in Provider::ALL {
        let mut fs = Vec::new();
        frames(&Path::new(FIXTURES).join(provider.name()), &mut fs);
        let adapter: Arc<dyn Adapter> = build_adapter(
            builtin(provider.name()).expect("built-in").expect("loads"),
            &params(provider),
        )
        .expect("builds");
        let t = time(adapter.as_ref(), &fs);
        println!("{:<10} {:>7} {:>9.0}", provider.name(), fs.len(), t);
        total += t * fs.len() as f64;
        n_total += fs.len();
    }
    println!(
        "{:<10} {:>7} {:>9.0}",
        "all",
        n_total,
        total / n_total as f64
    );
}
