//! Any dialect file a user could write: `Dialect::load` must accept it or refuse it with its
//! problems, never panic (it runs at start, on every reload and in `wsbridge dialect check`);
//! a file that loads must run its own examples without panicking.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use wsbridge_adapters::dialect::Dialect;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Dialect::load("fuzz.toml", text) {
        Ok(dialect) => {
            let dialect = Arc::new(dialect);
            if let Err(failures) = dialect.check_examples() {
                // The failures render (they are what `dialect check` prints).
                for f in failures {
                    let _ = f.to_string();
                }
            }
        }
        // The error renders (it is what `dialect check` and check-config print).
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
