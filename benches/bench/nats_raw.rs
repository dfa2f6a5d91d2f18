//! The NATS backend's raw baseline: the JetStream publishes the backend makes per event, by
//! the same client, with nothing of the bridge around them (no upstreams, decoding, routing,
//! live feed nor consumer). Two figures: the backend's write pattern (an id claim with an
//! expected subject sequence of 0 into a one-record-per-subject stream, then the event with
//! its `Nats-Msg-Id`, each in appends of [`APPEND`] with every publish of a stage pipelined),
//! and the event publishes alone (what the server takes without the dedup claims). Their
//! streams are the backend's (file storage, direct gets), under a prefix of their own, and
//! are deleted afterwards.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage, stream};
use bytes::Bytes;

use crate::Res;

/// Events per append: the ingest batch the bridge journals at full speed.
const APPEND: usize = 512;

/// Events journalled per second by the raw loops.
pub(crate) struct RawJournal {
    /// An id claim and the event per event: the backend's publishes.
    pub(crate) with_claims: f64,
    /// The event publish alone.
    pub(crate) events_only: f64,
}

/// Runs both loops for `dur` each against the server at `url`.
pub(crate) async fn raw_journal(url: &str, dur: Duration) -> Res<RawJournal> {
    let client = async_nats::connect(url)
        .await
        .map_err(|e| format!("nats connect {url}: {e}"))?;
    let js = jetstream::new(client);
    let prefix = format!("benchraw{}", std::process::id());
    let streams = [format!("{prefix}_ids"), format!("{prefix}_events")];
    js.create_stream(stream::Config {
        name: streams[0].clone(),
        subjects: vec![format!("{prefix}.ids.*")],
        storage: stream::StorageType::File,
        max_messages_per_subject: 1,
        allow_direct: true,
        ..Default::default()
    })
    .await
    .map_err(|e| format!("create the raw ids stream: {e}"))?;
    js.create_stream(stream::Config {
        name: streams[1].clone(),
        subjects: vec![format!("{prefix}.events.>")],
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(240),
        allow_direct: true,
        ..Default::default()
    })
    .await
    .map_err(|e| format!("create the raw events stream: {e}"))?;
    let body = Bytes::from(crate::frames::frame(0, 0, 0));
    let with_claims = run(&js, &prefix, &body, true, dur).await;
    let events_only = run(&js, &prefix, &body, false, dur).await;
    for name in &streams {
        let _ = js.delete_stream(name).await;
    }
    Ok(RawJournal {
        with_claims: with_claims?,
        events_only: events_only?,
    })
}

/// Appends of [`APPEND`] events for `dur`: the claims pipelined and awaited, then the events
/// pipelined and awaited (as the backend's append does); events per second.
async fn run(
    js: &jetstream::Context,
    prefix: &str,
    body: &Bytes,
    claims: bool,
    dur: Duration,
) -> Res<f64> {
    let tag = if claims { "c" } else { "e" };
    let t0 = Instant::now();
    let mut n: u64 = 0;
    let mut acks: Vec<PublishAckFuture> = Vec::with_capacity(APPEND);
    while t0.elapsed() < dur {
        if claims {
            for k in n..n + APPEND as u64 {
                let record = format!("{{\"id\":\"raw-{k}\",\"recv_ms\":0}}");
                let claim = PublishMessage::build()
                    .payload(Bytes::from(record))
                    .expected_last_subject_sequence(0);
                acks.push(
                    js.send_publish(format!("{prefix}.ids.{k:032x}"), claim)
                        .await
                        .map_err(|e| format!("raw claim: {e}"))?,
                );
            }
            await_all(&mut acks).await?;
        }
        for k in n..n + APPEND as u64 {
            let event = PublishMessage::build()
                .payload(body.clone())
                .message_id(format!("raw-{tag}-{k}"));
            acks.push(
                js.send_publish(format!("{prefix}.events.x"), event)
                    .await
                    .map_err(|e| format!("raw publish: {e}"))?,
            );
        }
        await_all(&mut acks).await?;
        n += APPEND as u64;
    }
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

/// Waits for every ack in `acks` (emptying it); the first refusal is the run's error.
async fn await_all(acks: &mut Vec<PublishAckFuture>) -> Res<()> {
    for ack in acks.drain(..) {
        ack.await.map_err(|e| format!("raw publish refused: {e}"))?;
    }
    Ok(())
}
