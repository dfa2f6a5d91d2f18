//! Any config text an operator could write: `Config::from_toml` must accept it or refuse it
//! with its problems, never panic (it runs at start and on every reload).
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsbridge::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env = |name: &str| (name == "TOKEN").then(|| "fuzz-token".to_string());
    if let Err(e) = Config::from_toml(text, env, false) {
        // The error renders (it is what check-config prints).
        let _ = e.to_string();
    }
});
