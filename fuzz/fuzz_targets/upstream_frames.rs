//! Every byte string a provider could send, through each adapter's `decode`: it must return
//! an event, a control frame or a decode error, never panic; an event must make an envelope
//! that serialises (what ingest does next).
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsbridge::envelope::Envelope;
use wsbridge_adapters::dialect::{builtin, Params};
use wsbridge_adapters::{build_adapter, Inbound};

/// Parameters with `url` and the one parameter `key` = `value`.
fn params(url: &str, key: &str, value: &str) -> Params {
    let mut p = Params::new(&url::Url::parse(url).expect("a fixed, valid URL"));
    p.set(key, serde_json::Value::String(value.to_string()));
    p
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let adapters = [
        (
            "voicepact",
            params(
                "ws://127.0.0.1:9101/api/v1/ws",
                "client_id",
                "+254700000001",
            ),
        ),
        (
            "voipbin",
            params("ws://127.0.0.1:9102/v1.0/ws", "token", "fuzz-token"),
        ),
        (
            "hashi",
            params("ws://127.0.0.1:9103/", "token", "fuzz-token"),
        ),
    ];
    for (name, params) in adapters {
        let dialect = builtin(name).expect("built in").expect("loads");
        let adapter = build_adapter(dialect, &params).expect("valid parameters");
        if let Ok(Inbound::Event(decoded)) = adapter.decode(text) {
            let envelope = Envelope::new(
                decoded,
                "wsbridge://fuzz",
                adapter.provider(),
                chrono::Utc::now(),
            );
            serde_json::to_vec(&envelope).expect("an envelope always serialises");
        }
    }
});
