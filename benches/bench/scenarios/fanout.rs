//! Fan-out and latency with many consumers of one upstream.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Opts, Percentiles};
use crate::consumers::{crowd, drain, Crowd};
use crate::frames::FRAME_BYTES;
use crate::pusher::{Pace, Progress};
use crate::report::{closed_note, cpu_cell, in_table_order, raw_first, yes, Row};
use crate::servers::{nchan_publisher, pushers_for, start_server, CpuUse, CpuWindow, System};
use crate::Res;

/// What one fan-out run measured.
struct FanoutRun {
    /// Frames received per second, all consumers together.
    rate: f64,
    /// Send → receive latencies (µs) recorded during the measured window.
    lat_us: Vec<u32>,
    /// Frames lost, all consumers together.
    lost: u64,
    /// Frames received twice, all consumers together.
    dup: u64,
    /// Consumers whose connection ended.
    closed: u64,
    /// CPU over the measured window.
    cpu: CpuUse,
}

impl FanoutRun {
    /// The report's result cell.
    fn result(&self) -> String {
        format!(
            "{:.0}k frames/s{}",
            self.rate / 1000.0,
            closed_note(self.closed)
        )
    }
}

/// Fan-out and latency with N consumers: one upstream, windowed or paced.
async fn run_fanout(
    o: &Opts,
    system: System,
    consumers: usize,
    pace: impl Fn(Arc<Progress>) -> Pace,
    dur: Duration,
    record_latency: bool,
) -> Res<FanoutRun> {
    let _ = o;
    let mut pushers = pushers_for(system, 1).await?;
    let srv = start_server(system, &pushers, None).await?;
    if system == System::Nchan {
        pushers.push(nchan_publisher(&srv).await?);
    }
    let Crowd {
        progress,
        record,
        stop,
        handles,
    } = crowd(system, srv.addr, consumers).await?;
    // Warm up 1 s, then measure.
    let push_stop = CancellationToken::new();
    let driver = tokio::spawn(
        pushers[0]
            .clone()
            .drive(pace(progress.clone()), push_stop.clone()),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    record.store(record_latency, Ordering::Relaxed);
    let frames0 = progress.total();
    let window = CpuWindow::start(&srv);
    tokio::time::sleep(dur).await;
    let cpu = window.end(&srv);
    let frames1 = progress.total();
    record.store(false, Ordering::Relaxed);
    push_stop.cancel();
    let _ = driver.await;
    let sent = pushers[0].sent.load(Ordering::Relaxed);
    drain(&progress, sent, Duration::from_secs(10)).await;
    stop.cancel();
    let mut lat_us = Vec::new();
    let (mut lost, mut dup, mut closed) = (0, 0, 0);
    for h in handles {
        let s = h.await.map_err(|e| e.to_string())?;
        lost += s.lost(&[sent]);
        dup += s.dups;
        closed += u64::from(s.closed);
        lat_us.extend(s.lat_us);
    }
    srv.stop();
    Ok(FanoutRun {
        rate: (frames1 - frames0) as f64 / cpu.secs,
        lat_us,
        lost,
        dup,
        closed,
        cpu,
    })
}

/// Fan-out with a window of 64 frames ahead of the slowest consumer.
pub(crate) async fn scenario_fanout(o: &Opts, rows: &mut Vec<Row>) -> Res<()> {
    let consumers = crate::servers::CONSUMERS
        .get()
        .copied()
        .unwrap_or(if o.quick { 200 } else { 1000 });
    let dur = o.secs(10, 3);
    let name = format!(
        "fan-out {consumers} consumers, ≤64 ahead, {FRAME_BYTES} B, {}s",
        dur.as_secs()
    );
    let mut raw_rate = None;
    let mut ours = Vec::new();
    for system in raw_first(&o.systems) {
        let run = run_fanout(o, system, consumers, |p| Pace::Window(64, p), dur, false).await?;
        if system == System::Raw {
            raw_rate = Some(run.rate);
        }
        let met = system == System::Wsbridge;
        ours.push(Row {
            scenario: name.clone(),
            system,
            result: run.result(),
            latency: "–".into(),
            lost: run.lost.to_string(),
            dup: run.dup.to_string(),
            cpu: cpu_cell(&run.cpu),
            goal: if met {
                "≥0.6× raw frames/s, 0 lost".into()
            } else {
                String::new()
            },
            met: match (met, raw_rate) {
                (true, Some(r)) => format!(
                    "{} ({:.2}× raw)",
                    yes(run.rate >= 0.6 * r && run.lost == 0),
                    run.rate / r
                ),
                (true, None) => "raw not run".into(),
                (false, _) => String::new(),
            },
        });
        eprintln!(
            "  fan-out {}: {:.0} frames/s lost {} dup {}",
            system.name(),
            run.rate,
            run.lost,
            run.dup
        );
    }
    rows.extend(in_table_order(&o.systems, ours));
    Ok(())
}

/// One system's latency run: the fan-out figures and the latency percentiles.
struct LatencyResult {
    system: System,
    run: FanoutRun,
    lat: Percentiles,
}

/// Latency with many consumers at 100 events/s, against the raw baseline's p99.
pub(crate) async fn scenario_latency(o: &Opts, rows: &mut Vec<Row>) -> Res<()> {
    let consumers = crate::servers::CONSUMERS
        .get()
        .copied()
        .unwrap_or(if o.quick { 200 } else { 1000 });
    let dur = o.secs(20, 4);
    let name = format!(
        "latency {consumers} consumers, 100 ev/s, {}s",
        dur.as_secs()
    );
    let mut raw_p99 = None;
    let mut results = Vec::new();
    for &system in &o.systems {
        let mut run = run_fanout(o, system, consumers, |_| Pace::Rate(100.0), dur, true).await?;
        let lat = Percentiles::of(&mut run.lat_us);
        if system == System::Raw {
            raw_p99 = Some(lat.p99);
        }
        eprintln!(
            "  latency {}: p50 {:.2} p99 {:.2} max {:.2} ms",
            system.name(),
            lat.p50,
            lat.p99,
            lat.max
        );
        results.push(LatencyResult { system, run, lat });
    }
    for LatencyResult { system, run, lat } in results {
        let is_us = system == System::Wsbridge;
        rows.push(Row {
            scenario: name.clone(),
            system,
            result: run.result(),
            latency: format!(
                "p50 {:.1} / p99 {:.1} / max {:.1} ms",
                lat.p50, lat.p99, lat.max
            ),
            lost: run.lost.to_string(),
            dup: run.dup.to_string(),
            cpu: cpu_cell(&run.cpu),
            goal: if is_us {
                "p99 ≤ 1.5× raw".into()
            } else {
                String::new()
            },
            met: match (is_us, raw_p99) {
                (true, Some(r)) => {
                    format!("{} ({:.2}× raw)", yes(lat.p99 <= 1.5 * r), lat.p99 / r)
                }
                (true, None) => "raw not run".into(),
                _ => String::new(),
            },
        });
    }
    Ok(())
}
