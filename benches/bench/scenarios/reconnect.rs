//! A reconnect storm: every upstream dropped at once under load.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{drive_all, wind_down, Opts, WoundDown};
use crate::consumers::crowd;
use crate::pusher::Pace;
use crate::report::{cpu_cell, yes, Row};
use crate::servers::{pushers_for, start_server, CpuWindow, System};
use crate::Res;

/// Every upstream dropped at once under load: time until all resubscribed, and loss.
pub(crate) async fn scenario_reconnect(o: &Opts, rows: &mut Vec<Row>) -> Res<()> {
    if !o.systems.contains(&System::Wsbridge) {
        return Ok(());
    }
    let name = "reconnect storm: 3 upstreams × 1,000 ev/s dropped at once, backoff 1 s".to_string();
    let pushers = pushers_for(System::Wsbridge, 3).await?;
    let srv = start_server(System::Wsbridge, &pushers, None).await?;
    let consumers = crowd(System::Wsbridge, srv.addr, 1).await?;
    let push_stop = CancellationToken::new();
    let drivers = drive_all(&pushers, &Pace::Rate(1000.0), &push_stop);
    tokio::time::sleep(o.secs(3, 1)).await;
    let window = CpuWindow::start(&srv);
    let dropped = Instant::now();
    for p in &pushers {
        p.drop_all();
    }
    let mut worst = Duration::ZERO;
    for p in &pushers {
        p.wait_subscribed(2, Duration::from_secs(20)).await?;
        if let Some(t) = p.last_subscribed.lock().ok().and_then(|t| *t) {
            worst = worst.max(t.saturating_duration_since(dropped));
        }
    }
    tokio::time::sleep(o.secs(3, 1)).await;
    let cpu = window.end(&srv);
    let WoundDown { sent, seen } = wind_down(
        push_stop,
        drivers,
        &pushers,
        consumers,
        Duration::from_secs(10),
    )
    .await?;
    srv.stop();
    let lost = seen.lost(&sent);
    eprintln!(
        "  reconnect: all resubscribed after {worst:?}; lost {lost} dup {}",
        seen.dups
    );
    rows.push(Row {
        scenario: name,
        system: System::Wsbridge,
        result: format!("all 3 resubscribed {} ms after the drop", worst.as_millis()),
        latency: "–".into(),
        lost: lost.to_string(),
        dup: seen.dups.to_string(),
        cpu: cpu_cell(&cpu),
        goal: "within the first backoff step (1 s, +100 ms for connect and subscribe), 0 lost"
            .into(),
        met: yes(worst <= Duration::from_millis(1100) && lost == 0),
    });
    Ok(())
}
