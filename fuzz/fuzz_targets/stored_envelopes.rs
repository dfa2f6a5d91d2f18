//! Every byte string the journal could hold, read back the way resume, SSE, the NATS tail
//! and binary-mode webhooks read it: reading must return an envelope or an error (which the
//! readers report to the consumer), never panic. And the decode-time depth limit must hold
//! its promise: a frame within `limits.max_depth` (at most 100) wrapped in an envelope, as
//! VoicePact's whole frame is, is always read back whole.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsbridge::envelope::{read_stored, Envelope, StoredEnvelope};
use wsbridge::storage::nats::with_seq;

fuzz_target!(|data: &[u8]| {
    // Arbitrary journal bytes, as stored and as the NATS store hands them out.
    if let Ok(stored) = StoredEnvelope::parse(data) {
        let _ = stored.into_envelope();
    }
    let _ = read_stored(&with_seq(data, 7));

    // A frame that passes the depth check, journalled inside an envelope.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if wsbridge_adapters::check_depth(text, 100).is_err() {
        return;
    }
    let Ok(payload) = serde_json::from_str::<serde_json::Value>(text) else {
        return;
    };
    let envelope = Envelope {
        specversion: "1.0".into(),
        id: "fuzz".into(),
        source: "wsbridge://fuzz".into(),
        event_type: "voicepact.fuzz".into(),
        subject: None,
        time: "2024-01-15T10:30:00Z".into(),
        datacontenttype: "application/json".into(),
        data: payload,
        provider: "voicepact".into(),
        recvtime: "2024-01-15T10:30:00.000000Z".into(),
        gap: None,
        seq: Some(1),
    };
    let bytes = envelope.to_bytes().expect("an envelope always serialises");
    // Read whole (the promise); compared by attributes, since serde_json's float parsing is
    // not exactly round-trip (8.820000000000002e86 reads back ...01e86).
    let full: Envelope = serde_json::from_slice(&bytes).expect("within max_depth: read whole");
    assert_eq!((full.id.as_str(), full.seq), ("fuzz", Some(1)));
    let stored = StoredEnvelope::parse(&bytes).expect("read back");
    assert_eq!(
        stored.data.get().as_bytes(),
        serde_json::to_vec(&envelope.data).expect("data serialises").as_slice(),
        "binary-mode bodies are the journalled data, byte for byte"
    );
});
