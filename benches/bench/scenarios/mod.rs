//! The scenarios, each adding rows to the report, and what they share.

mod durable;
mod fanout;
mod ingest;
mod latency1;
mod memory;
mod reconnect;
mod webhooks;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::consumers::{drain, Crowd, Seen};
use crate::pusher::{Pace, Pusher};
use crate::servers::System;
use crate::Res;

pub(crate) use durable::scenario_durable;
pub(crate) use fanout::{scenario_fanout, scenario_latency};
pub(crate) use ingest::scenario_ingest;
pub(crate) use latency1::scenario_latency1;
pub(crate) use memory::scenario_memory;
pub(crate) use reconnect::scenario_reconnect;
pub(crate) use webhooks::scenario_webhooks;

/// The command line's choices.
pub(crate) struct Opts {
    pub(crate) quick: bool,
    pub(crate) systems: Vec<System>,
    /// `--hold SECS`: the memory scenario's hold instead of 60 s (10 s with --quick).
    pub(crate) hold: Option<u64>,
}

impl Opts {
    pub(crate) fn secs(&self, full: u64, quick: u64) -> Duration {
        Duration::from_secs(if self.quick { quick } else { full })
    }
}

/// Latency percentiles in ms.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Percentiles {
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
}

impl Percentiles {
    /// The percentiles of latencies in µs (sorts them; NaN when there are none).
    pub(crate) fn of(lat_us: &mut [u32]) -> Percentiles {
        Percentiles {
            p50: pct(lat_us, 0.5),
            p99: pct(lat_us, 0.99),
            max: pct(lat_us, 1.0),
        }
    }
}

/// The `p` quantile (0..=1) of latencies in µs, in ms.
fn pct(v: &mut [u32], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)] as f64 / 1000.0
}

/// Starts a pusher for each upstream.
pub(crate) fn drive_all(
    pushers: &[Arc<Pusher>],
    pace: &Pace,
    stop: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    pushers
        .iter()
        .map(|p| tokio::spawn(p.clone().drive(pace.clone(), stop.clone())))
        .collect()
}

/// What was sent and seen once a run is wound down.
pub(crate) struct WoundDown {
    /// Frames sent per upstream.
    pub(crate) sent: Vec<u64>,
    /// What the (last) consumer saw.
    pub(crate) seen: Seen,
}

/// Stops the pushers, waits (up to `deadline`) until the consumers of `crowd` have what was
/// sent, stops them.
pub(crate) async fn wind_down(
    push_stop: CancellationToken,
    drivers: Vec<tokio::task::JoinHandle<()>>,
    pushers: &[Arc<Pusher>],
    crowd: Crowd,
    deadline: Duration,
) -> Res<WoundDown> {
    let Crowd {
        progress,
        stop,
        handles,
        ..
    } = crowd;
    push_stop.cancel();
    for d in drivers {
        let _ = d.await;
    }
    let sent: Vec<u64> = pushers
        .iter()
        .map(|p| p.sent.load(Ordering::Relaxed))
        .collect();
    drain(&progress, sent.iter().sum(), deadline).await;
    stop.cancel();
    let mut seen = Seen::default();
    for h in handles {
        seen = h.await.map_err(|e| e.to_string())?;
    }
    Ok(WoundDown { sent, seen })
}
