//! Signed webhook deliveries to one keep-alive receiver.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::frames::WEBHOOK_SECRET;

use super::Opts;
use crate::pusher::{Pace, Progress};
use crate::receiver::{start_receiver, Hooks};
use crate::report::{cpu_cell, yes, Row};
use crate::servers::{pushers_for, start_server, CpuWindow, System};
use crate::Res;

/// Signed deliveries to one keep-alive receiver; the publisher stays ≤ 5,000 events ahead of
/// the receiver (of the deliveries to every endpoint) so the run measures delivery, not an
/// ever-growing backlog.
pub(crate) async fn scenario_webhooks(o: &Opts, rows: &mut Vec<Row>) -> Res<()> {
    if !o.systems.contains(&System::Wsbridge) {
        return Ok(());
    }
    // The raw baseline runs beside it when `raw` is among the systems.
    let dur = o.secs(10, 3);
    let endpoints = crate::servers::endpoints();
    let name = format!(
        "webhooks: signed deliveries, {endpoints} endpoint{} at 1 keep-alive receiver, {}s",
        if endpoints == 1 {
            ""
        } else {
            "s (every event to each)"
        },
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
                // Every event goes to each endpoint: the window counts events delivered
                // everywhere, so the backlog stays bounded however many endpoints there are.
                let delivered = hooks.deliveries.load(Ordering::Relaxed) / endpoints as u64;
                progress.counts[0].store(delivered, Ordering::Relaxed);
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
    // With N endpoints every event arrives N times: only copies beyond that are duplicates.
    let dup = hooks
        .inner
        .lock()
        .map(|i| i.dups)
        .unwrap_or(0)
        .saturating_sub((endpoints as u64 - 1).saturating_mul(hooks.distinct(0)));
    let unsigned = hooks.unsigned.load(Ordering::Relaxed);
    eprintln!("  webhooks: {rate:.0}/s lost {lost} dup {dup} unsigned {unsigned}");
    let raw = if o.systems.contains(&System::Raw) {
        let raw = raw_posts(dur).await?;
        eprintln!("  webhooks raw: {:.0}/s", raw.rate);
        Some(raw)
    } else {
        None
    };
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
        goal: "≥30k deliveries/s, ≥0.5× raw".into(),
        met: match &raw {
            Some(r) => format!(
                "{} ({:.2}× raw)",
                yes(rate >= 30_000.0 && rate >= 0.5 * r.rate && lost == 0),
                rate / r.rate
            ),
            None => yes(rate >= 30_000.0 && lost == 0),
        },
    });
    if let Some(r) = raw {
        rows.push(Row::raw_figure(format!(
            "{:.1}k posts/s (pre-signed, no store)",
            r.rate / 1000.0
        )));
    }
    Ok(())
}

/// The raw webhook baseline's figure.
struct RawPosts {
    rate: f64,
}

/// The raw baseline: the HTTP client wsbridge uses (reqwest, one keep-alive pool) posting one
/// pre-signed body in a loop from as many tasks as wsbridge's `max_in_flight` (64), to a
/// receiver of its own, with no journal and no delivery bookkeeping.
async fn raw_posts(dur: Duration) -> Res<RawPosts> {
    const IN_FLIGHT: usize = 64;
    let hooks = Arc::new(Hooks::default());
    let addr = start_receiver(hooks.clone()).await?;
    let url = format!("http://{addr}/hook");
    let body = bytes::Bytes::from(crate::frames::frame(0, 0, 0));
    let signer = wsbridge::delivery::signing::Signer::from_secrets([WEBHOOK_SECRET])
        .map_err(|e| format!("signer: {e}"))?;
    let (id, ts) = ("msg_raw_baseline", chrono::Utc::now().timestamp());
    let signature = signer.sign(id, ts, &body);
    wsbridge::install_crypto_provider();
    let client = reqwest::Client::new();
    let stop = CancellationToken::new();
    let mut tasks = Vec::with_capacity(IN_FLIGHT);
    for _ in 0..IN_FLIGHT {
        let (client, url, body, signature, stop) = (
            client.clone(),
            url.clone(),
            body.clone(),
            signature.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let sent = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("webhook-id", id)
                    .header("webhook-timestamp", ts.to_string())
                    .header("webhook-signature", signature.as_str())
                    .body(body.clone())
                    .send()
                    .await;
                if sent.is_err() {
                    break;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let d0 = hooks.deliveries.load(Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(dur).await;
    let d1 = hooks.deliveries.load(Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    Ok(RawPosts {
        rate: (d1 - d0) as f64 / secs,
    })
}
