//! Every byte string a provider could send, through each adapter's `decode`: it must return
//! an event, a control frame or a decode error, never panic; an event must make an envelope
//! that serialises (what ingest does next).
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsbridge::envelope::Envelope;
use wsbridge_adapters::{build_adapter, Inbound, Provider, Secret, UpstreamSettings};

fn settings(url: &str) -> UpstreamSettings {
    UpstreamSettings {
        url: url::Url::parse(url).expect("a fixed, valid URL"),
        client_id: Some("+254700000001".into()),
        token: Some(Secret::new("fuzz-token")),
        topics: vec!["customer_id:abc123:call:*".into()],
        lobbies: vec!["ABC123".into()],
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let adapters = [
        (Provider::VoicePact, "ws://127.0.0.1:9101/api/v1/ws"),
        (Provider::Voipbin, "ws://127.0.0.1:9102/v1.0/ws"),
        (Provider::Hashi, "ws://127.0.0.1:9103/"),
    ];
    for (provider, url) in adapters {
        let adapter = build_adapter(provider, settings(url)).expect("valid settings");
        if let Ok(Inbound::Event(decoded)) = adapter.decode(text) {
            let envelope = Envelope::new(decoded, "wsbridge://fuzz", provider, chrono::Utc::now());
            serde_json::to_vec(&envelope).expect("an envelope always serialises");
        }
    }
});
