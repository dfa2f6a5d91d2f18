//! Logging setup, and the names of log fields every component shares.
//!
//! Human-readable lines by default, one JSON object per line with `--log-format json`.
//! `RUST_LOG` overrides the default filter (`info`). Components log with structured fields
//! (`upstream = %name`, ...), so a grep or a log pipeline finds everything about one
//! connection; credentials are [`wsbridge_adapters::Secret`]s and print as `***`.

use std::str::FromStr;

use tracing_subscriber::EnvFilter;

/// The two log formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Compact human-readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "human" | "text" => Ok(LogFormat::Human),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format {other:?}; use \"human\" or \"json\""
            )),
        }
    }
}

/// Installs the global subscriber, writing to stderr (stdout is the demo's output).
/// `default_filter` applies when `RUST_LOG` is unset.
pub fn init(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    // A second init (tests, an embedding program) keeps the first subscriber.
    let _ = match format {
        LogFormat::Human => builder.compact().try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
