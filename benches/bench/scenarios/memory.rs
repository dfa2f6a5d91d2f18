//! Memory of many idle subscribed consumers, and whether it stays flat.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::Opts;
use crate::consumers::{crowd, Crowd, ANCHOR_FIRST};
use crate::pusher::Pace;
use crate::report::{closed_note, cpu_cell, in_table_order, raw_first, yes, Row};
use crate::servers::{nchan_publisher, pushers_for, start_server, CpuWindow, System};
use crate::Res;

/// 10,000 idle subscribed consumers: RSS per consumer, and RSS over time at 1 event/s.
pub(crate) async fn scenario_memory(o: &Opts, rows: &mut Vec<Row>) -> Res<()> {
    let consumers = crate::servers::CONSUMERS
        .get()
        .copied()
        .unwrap_or(if o.quick { 2000 } else { 10_000 });
    let hold = o.hold.map_or(o.secs(60, 10), Duration::from_secs);
    let name = format!(
        "memory {consumers} idle subscribed consumers, {}s at 1 ev/s",
        hold.as_secs()
    );
    let mut raw_per = None;
    let mut ours = Vec::new();
    for system in raw_first(&o.systems) {
        let mut pushers = pushers_for(system, 1).await?;
        let srv = start_server(system, &pushers, None).await?;
        if system == System::Nchan {
            pushers.push(nchan_publisher(&srv).await?);
        }
        // One event through an empty server first, so lazily-built state is in the baseline.
        let push_stop = CancellationToken::new();
        let driver = tokio::spawn(pushers[0].clone().drive(Pace::Rate(1.0), push_stop.clone()));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let base = srv.usage().rss_kib;
        // Consumers join a running stream: each counts from the first frame it sees.
        ANCHOR_FIRST.store(true, Ordering::Relaxed);
        let crowd_result = crowd(system, srv.addr, consumers).await;
        ANCHOR_FIRST.store(false, Ordering::Relaxed);
        let Crowd {
            progress,
            stop,
            handles,
            ..
        } = crowd_result?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let window = CpuWindow::start(&srv);
        let connected = srv.usage().rss_kib;
        let mut samples = vec![connected];
        let end = Instant::now() + hold;
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_secs(1)).await;
            samples.push(srv.usage().rss_kib);
        }
        let trajectory: Vec<String> = samples
            .iter()
            .step_by(10)
            .map(|k| format!("{:.1}", *k as f64 / 1024.0))
            .collect();
        eprintln!(
            "  memory {}: RSS every 10 s (MiB): {}",
            system.name(),
            trajectory.join(" ")
        );
        let cpu = window.end(&srv);
        push_stop.cancel();
        let _ = driver.await;
        let sent = pushers[0].sent.load(Ordering::Relaxed);
        let end = Instant::now() + Duration::from_secs(20);
        while !progress.caught_up(sent) && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
        let (mut lost, mut dup, mut closed) = (0, 0, 0);
        for h in handles {
            let seen = h.await.map_err(|e| e.to_string())?;
            if seen.lost(&[sent]) > 0 {
                eprintln!(
                    "  memory {}: a consumer lost {}: frames {} gaps {} next {} of {sent} anchored {}",
                    system.name(),
                    seen.lost(&[sent]),
                    seen.frames,
                    seen.gaps,
                    seen.next[0],
                    seen.anchored[0]
                );
            }
            lost += seen.lost(&[sent]);
            dup += seen.dups;
            closed += u64::from(seen.closed);
        }
        srv.stop();
        // Per consumer: what the server holds at the end of the hold, over its baseline (so
        // write buffers grown by the first events are included). Flat: the last sample against
        // the first one after a warm-up of a sixth of the hold (every consumer has had events).
        let last = *samples.last().unwrap_or(&connected);
        let per = last.saturating_sub(base) as f64 / consumers as f64;
        let warm = samples.get(samples.len() / 6).copied().unwrap_or(connected);
        let lo = samples.iter().copied().min().unwrap_or(connected);
        let hi = samples.iter().copied().max().unwrap_or(connected);
        let drift = (last as f64 - warm as f64) / warm as f64 * 100.0;
        eprintln!(
            "  memory {}: base {base} KiB, connected {connected} KiB, {per:.2} KiB/consumer, end {last} KiB ({drift:+.1}%)",
            system.name()
        );
        let is_us = system == System::Wsbridge;
        if system == System::Raw {
            raw_per = Some(per);
        }
        ours.push(Row {
            scenario: name.clone(),
            system,
            result: format!(
                "{per:.2} KiB/consumer (RSS {:.1}→{:.1} MiB; {:.1}..{:.1} MiB held; {drift:+.1}% after warm-up){}",
                base as f64 / 1024.0,
                last as f64 / 1024.0,
                lo as f64 / 1024.0,
                hi as f64 / 1024.0,
                closed_note(closed)
            ),
            latency: "–".into(),
            lost: lost.to_string(),
            dup: dup.to_string(),
            cpu: cpu_cell(&cpu),
            goal: if is_us { "≤ raw + 1 KiB/consumer, RSS flat (±2%)".into() } else { String::new() },
            met: match (is_us, raw_per) {
                (true, Some(r)) => format!(
                    "{} ({:+.2} KiB vs raw)",
                    yes(per <= r + 1.0 && drift.abs() <= 2.0),
                    per - r
                ),
                (true, None) => "raw not run".into(),
                (false, _) => String::new(),
            },
        });
    }
    rows.extend(in_table_order(&o.systems, ours));
    Ok(())
}
