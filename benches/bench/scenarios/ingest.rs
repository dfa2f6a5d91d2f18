//! Ingest: upstreams at full speed, through the journal (wsbridge), to one consumer.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{drive_all, wind_down, Opts, WoundDown};
use crate::consumers::crowd;
use crate::pusher::Pace;
use crate::report::{closed_note, cpu_cell, yes, Row};
use crate::servers::{pushers_for, start_server, CpuUse, CpuWindow, System};
use crate::Res;

/// One system's ingest run.
struct IngestResult {
    system: System,
    /// Events received per second by the consumer.
    rate: f64,
    lost: u64,
    dup: u64,
    closed: bool,
    cpu: CpuUse,
}

/// 3 upstreams at full speed → (journal) → 1 consumer.
pub(crate) async fn scenario_ingest(o: &Opts, rows: &mut Vec<Row>) -> Res<()> {
    let dur = o.secs(10, 3);
    let name = format!(
        "ingest 3 upstreams full speed → 1 consumer, {}s",
        dur.as_secs()
    );
    let mut raw_rate = None;
    let mut results = Vec::new();
    for &system in o.systems.iter().filter(|s| **s != System::Nchan) {
        let pushers = pushers_for(system, 3).await?;
        let srv = start_server(system, &pushers, None).await?;
        let consumers = crowd(system, srv.addr, 1).await?;
        let progress = consumers.progress.clone();
        let push_stop = CancellationToken::new();
        let drivers = drive_all(&pushers, &Pace::Full, &push_stop);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let window = CpuWindow::start(&srv);
        let f0 = progress.counts[0].load(Ordering::Relaxed);
        tokio::time::sleep(dur).await;
        let cpu = window.end(&srv);
        let f1 = progress.counts[0].load(Ordering::Relaxed);
        let WoundDown { sent, seen } = wind_down(
            push_stop,
            drivers,
            &pushers,
            consumers,
            Duration::from_secs(30),
        )
        .await?;
        srv.stop();
        let rate = f1.saturating_sub(f0) as f64 / cpu.secs;
        let lost = seen.lost(&sent);
        if system == System::Raw {
            raw_rate = Some(rate);
        }
        eprintln!(
            "  ingest {}: {rate:.0} ev/s lost {lost} dup {}",
            system.name(),
            seen.dups
        );
        results.push(IngestResult {
            system,
            rate,
            lost,
            dup: seen.dups,
            closed: seen.closed,
            cpu,
        });
    }
    for IngestResult {
        system,
        rate,
        lost,
        dup,
        closed,
        cpu,
    } in results
    {
        let is_us = system == System::Wsbridge;
        // With `--nats`, the NATS backend's goal: the journal at 100k events/s.
        let nats = crate::servers::NATS.get().is_some();
        let goal_rate = if nats { 100_000.0 } else { 150_000.0 };
        rows.push(Row {
            scenario: name.clone(),
            system,
            result: format!(
                "{:.0}k ev/s{}{}",
                rate / 1000.0,
                if is_us { " journalled" } else { "" },
                closed_note(u64::from(closed))
            ),
            latency: "–".into(),
            lost: lost.to_string(),
            dup: dup.to_string(),
            cpu: cpu_cell(&cpu),
            goal: match (is_us, nats) {
                (true, false) => "≥150k ev/s, ≥0.35× raw".into(),
                (true, true) => "NATS backend: ≥100k ev/s".into(),
                _ => String::new(),
            },
            met: match (is_us, raw_rate) {
                (true, Some(r)) => format!(
                    "{} ({:.0}% of raw)",
                    yes(rate >= goal_rate && (nats || rate >= 0.35 * r)),
                    rate / r * 100.0
                ),
                (true, None) => yes(rate >= goal_rate),
                _ => String::new(),
            },
        });
    }
    if let Some(url) = crate::servers::NATS.get() {
        // What bounds the NATS backend's goal: the server and client alone, same publishes.
        let raw = crate::nats_raw::raw_journal(url, dur).await?;
        eprintln!(
            "  ingest NATS raw: {:.0} ev/s with claims, {:.0} ev/s events only",
            raw.with_claims, raw.events_only
        );
        rows.push(Row::raw_figure(format!(
            "JetStream alone: {:.0}k ev/s (claim + event), {:.0}k (event only)",
            raw.with_claims / 1000.0,
            raw.events_only / 1000.0
        )));
    }
    Ok(())
}
