//! Latency with one consumer (and, for wsbridge, one webhook) at 10,000 events/s.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{Opts, Percentiles};
use crate::consumers::{crowd, drain, Crowd, Seen};
use crate::pusher::Pace;
use crate::receiver::{start_receiver, Hooks};
use crate::report::{cpu_cell, yes, Row};
use crate::servers::{pushers_for, start_server, CpuWindow, System};
use crate::Res;

/// 1 consumer (+ 1 webhook for wsbridge) at 10,000 events/s.
pub(crate) async fn scenario_latency1(o: &Opts, rows: &mut Vec<Row>) -> Res<()> {
    let dur = o.secs(10, 3);
    let name = format!(
        "latency 1 consumer + 1 webhook, 10k ev/s, {}s",
        dur.as_secs()
    );
    for &system in o.systems.iter().filter(|s| **s != System::Nchan) {
        let hooks = Arc::new(Hooks::default());
        let webhook = if system == System::Wsbridge {
            Some(start_receiver(hooks.clone()).await?)
        } else {
            None
        };
        let pushers = pushers_for(system, 1).await?;
        let srv = start_server(system, &pushers, webhook).await?;
        let Crowd {
            progress,
            record,
            stop,
            handles,
        } = crowd(system, srv.addr, 1).await?;
        let push_stop = CancellationToken::new();
        let driver = tokio::spawn(
            pushers[0]
                .clone()
                .drive(Pace::Rate(10_000.0), push_stop.clone()),
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        record.store(true, Ordering::Relaxed);
        hooks.record.store(true, Ordering::Relaxed);
        let window = CpuWindow::start(&srv);
        let f0 = progress.total();
        tokio::time::sleep(dur).await;
        let cpu = window.end(&srv);
        let rate = progress.total().saturating_sub(f0) as f64 / cpu.secs;
        record.store(false, Ordering::Relaxed);
        hooks.record.store(false, Ordering::Relaxed);
        push_stop.cancel();
        let _ = driver.await;
        let sent = pushers[0].sent.load(Ordering::Relaxed);
        drain(&progress, sent, Duration::from_secs(10)).await;
        if webhook.is_some() {
            let end = Instant::now() + Duration::from_secs(30);
            while hooks.distinct(0) < sent && Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        stop.cancel();
        let mut seen = Seen::default();
        for h in handles {
            seen = h.await.map_err(|e| e.to_string())?;
        }
        srv.stop();
        let mut lat = std::mem::take(&mut seen.lat_us);
        let ws = Percentiles::of(&mut lat);
        let mut lost = seen.lost(&[sent]);
        let mut dup = seen.dups;
        let mut latency = format!("WS p50 {:.2} / p99 {:.2} ms", ws.p50, ws.p99);
        let mut met = String::new();
        if webhook.is_some() {
            let (hook, hdups) = match hooks.inner.lock() {
                Ok(mut i) => (Percentiles::of(&mut std::mem::take(&mut i.lat_us)), i.dups),
                Err(_) => (Percentiles::of(&mut []), 0),
            };
            let hlost = sent.saturating_sub(hooks.distinct(0));
            lost += hlost;
            dup += hdups;
            latency += &format!("; hook p50 {:.2} / p99 {:.2} ms", hook.p50, hook.p99);
            met = yes(ws.p99 < 5.0 && hook.p99 < 10.0 && lost == 0);
        }
        eprintln!(
            "  latency1 {}: {latency} lost {lost} dup {dup}",
            system.name()
        );
        rows.push(Row {
            scenario: name.clone(),
            system,
            result: format!("{:.0} ev/s", rate),
            latency,
            lost: lost.to_string(),
            dup: dup.to_string(),
            cpu: cpu_cell(&cpu),
            goal: if system == System::Wsbridge {
                "p99 < 5 ms WS, < 10 ms webhook".into()
            } else {
                String::new()
            },
            met,
        });
    }
    Ok(())
}
