//! Route and subscription patterns come from config and from consumers' `subscribe` frames:
//! parsing any string must not panic, and a parsed pattern must match any string without
//! panicking (the matcher runs for every event).
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsbridge::routing::Pattern;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The input is "pattern\nsubject": both halves from the fuzzer.
    let (pattern, subject) = text.split_once('\n').unwrap_or((text, ""));
    if let Ok(p) = Pattern::parse(pattern) {
        let _ = p.matches(subject);
        let _ = p.matches(pattern);
        assert!(
            !p.is_exact() || p.matches(p.as_str()),
            "an exact pattern matches itself"
        );
    }
});
