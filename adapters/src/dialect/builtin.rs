//! The dialect files compiled into the binary: the built-in providers.
//!
//! Each is `adapters/<name>.toml` in the source tree, compiled on first use and then shared.
//! The test suite loads all of them and runs their examples, so a broken file never ships.

use std::sync::{Arc, OnceLock};

use super::{Dialect, DialectError};

/// Name and text of every built-in dialect, in the order `wsbridge dialect list` shows them.
const SOURCES: [(&str, &str); 3] = [
    ("voicepact", include_str!("../../voicepact.toml")),
    ("voipbin", include_str!("../../voipbin.toml")),
    ("hashi", include_str!("../../hashi.toml")),
];

type Compiled = Result<Arc<Dialect>, DialectError>;

fn compiled() -> &'static [Compiled] {
    static ALL: OnceLock<Vec<Compiled>> = OnceLock::new();
    ALL.get_or_init(|| {
        SOURCES
            .iter()
            .map(|(name, text)| {
                let d = Dialect::load(&format!("built-in {name}"), text)?;
                if d.name() != *name {
                    return Err(DialectError {
                        origin: format!("built-in {name}"),
                        problems: vec![super::Problem {
                            key: "dialect.name".to_string(),
                            message: format!("is {:?}, expected {name:?}", d.name()),
                        }],
                    });
                }
                Ok(Arc::new(d))
            })
            .collect()
    })
}

/// The names of the built-in dialects.
pub fn builtin_names() -> impl Iterator<Item = &'static str> {
    SOURCES.iter().map(|(name, _)| *name)
}

/// The built-in dialect `name`, compiled; `None` when there is no such built-in, an error when
/// the shipped file does not load (a defect the test suite catches).
pub fn builtin(name: &str) -> Option<Result<Arc<Dialect>, DialectError>> {
    let i = SOURCES.iter().position(|(n, _)| *n == name)?;
    compiled().get(i).cloned()
}
