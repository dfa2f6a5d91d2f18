//! Signed webhook deliveries to one keep-alive receiver.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::Opts;
use crate::pusher::{Pace, Progress};
use crate::receiver::{start_receiver, Hooks};
use crate::report::{cpu_cell, yes, Row};
use crate::servers::{pushers_for, start_server, CpuWindow, System};
use crate::Res;

/// Signed deliveries to one keep-alive receiver; the publisher stays ≤ 5,000 events ahead of
/// the receiver so the run measures delivery, not an ever-growing backlog.
pub(crate) async fn scenario_webhooks(o: &Opts, rows: &mut Vec<Row>) -> Res<()> {
    if !o.systems.contains(&System::Wsbridge) {
        return Ok(());
    }
    let dur = o.secs(10, 3);
    let name = format!(
        "webhooks: signed deliveries, 1 keep-alive receiver, {}s",
        dur.as_secs()
    );
    let hooks = Arc::new(Hooks::default());
    let addr = start_receiver(hooks.clone()).await?;
    let pushers = pushers_for(System::Wsbridge, 1).await?;
    let srv = start_server(System::Wsbridge, &pushers, Some(addr)).await?;
    // The window follows the receiver's count.
    let progress = Progress::new(1);
    let push_stop = CancellationToken::new();
    let driver = tokio::spawn(
        pushers[0]
            .clone()
            .drive(Pace::Window(5000, progress.clone()), push_stop.clone()),
    );
    let follow_stop = CancellationToken::new();
    let follow = {
        let (hooks, progress, stop) = (hooks.clone(), progress.clone(), follow_stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                progress.counts[0]
                    .store(hooks.deliveries.load(Ordering::Relaxed), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let window = CpuWindow::start(&srv);
    let d0 = hooks.deliveries.load(Ordering::Relaxed);
    tokio::time::sleep(dur).await;
    let cpu = window.end(&srv);
    let d1 = hooks.deliveries.load(Ordering::Relaxed);
    push_stop.cancel();
    let _ = driver.await;
    let sent = pushers[0].sent.load(Ordering::Relaxed);
    let end = Instant::now() + Duration::from_secs(60);
    while hooks.distinct(0) < sent && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    follow_stop.cancel();
    let _ = follow.await;
    srv.stop();
    let rate = (d1 - d0) as f64 / cpu.secs;
    let lost = sent.saturating_sub(hooks.distinct(0));
    let dup = hooks.inner.lock().map(|i| i.dups).unwrap_or(0);
    let unsigned = hooks.unsigned.load(Ordering::Relaxed);
    eprintln!("  webhooks: {rate:.0}/s lost {lost} dup {dup} unsigned {unsigned}");
    rows.push(Row {
        scenario: name,
        system: System::Wsbridge,
        result: format!(
            "{:.1}k deliveries/s{}",
            rate / 1000.0,
            if unsigned > 0 {
                format!(" ({unsigned} unsigned!)")
            } else {
                String::new()
            }
        ),
        latency: "–".into(),
        lost: lost.to_string(),
        dup: dup.to_string(),
        cpu: cpu_cell(&cpu),
        goal: "≥20k deliveries/s".into(),
        met: yes(rate >= 20_000.0 && lost == 0),
    });
    Ok(())
}
