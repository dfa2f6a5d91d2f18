//! Every text a `/v1/ws` client could send, through the check a connection runs before acting
//! on a frame (JSON, op, subscription id, filter patterns, start position): it must accept the
//! frame as one of the three ops or answer an `error` frame that is itself valid JSON with a
//! code and a message, never panic (a panic would end the consumer's connection task).
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsbridge::downstream::ws::check_client_frame;

fuzz_target!(|data: &[u8]| {
    // Text frames are UTF-8 (the WebSocket layer refuses others before the parser).
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match check_client_frame(text) {
        Ok(op) => assert!(matches!(op, "ping" | "unsubscribe" | "subscribe"), "{op}"),
        Err(frame) => {
            let v: serde_json::Value =
                serde_json::from_str(&frame).expect("an error frame is JSON");
            assert_eq!(v["op"], "error", "{frame}");
            assert!(
                v["code"].is_string() && v["message"].is_string(),
                "an error frame has a code and a message: {frame}"
            );
        }
    }
});
