//! Every byte string a store could hand back as a journalled event, read the way the readers
//! read it: as stored (the embedded store's replay, webhook binary mode) and with the NATS
//! store's `"seq"` appended to the stored object (`storage::nats::with_seq`, the NATS replay
//! and live tail). Reading must never panic; an envelope that reads serialises again and
//! reads back the same (a replay re-sends what was read), and the NATS form carries the seq
//! it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use wsbridge::envelope::Envelope;
use wsbridge::storage::nats::with_seq;

/// Whether `v` holds a float: serde_json's default float parsing is best-effort, so a float
/// may come back one ulp off after a round trip; only the rest is compared exactly then.
fn has_float(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.is_f64(),
        Value::Array(a) => a.iter().any(has_float),
        Value::Object(o) => o.values().any(has_float),
        _ => false,
    }
}

fn round_trip(read: &Envelope) {
    let bytes = read
        .to_bytes()
        .expect("an envelope that was read serialises");
    let back: Envelope =
        serde_json::from_slice(&bytes).expect("an envelope that was read reads back");
    if has_float(&read.data) {
        let mut a = back.clone();
        let mut b = read.clone();
        a.data = Value::Null;
        b.data = Value::Null;
        assert_eq!(a, b);
    } else {
        assert_eq!(&back, read);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(read) = serde_json::from_slice::<Envelope>(data) {
        round_trip(&read);
    }
    // The seq comes from the input too, so large and small ones are both tried.
    let seq = data
        .iter()
        .take(8)
        .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
    let nats = with_seq(data, seq);
    if let Ok(read) = serde_json::from_slice::<Envelope>(&nats) {
        assert_eq!(read.seq, Some(seq), "the NATS form carries the stream seq");
        round_trip(&read);
    }
});
