//! Hot reload: on SIGHUP, or when the config file changes, load it again and apply it to the
//! running bridge without dropping what did not change (see [`Bridge::reload`]).
//!
//! A new config that does not validate is refused as a whole: each problem is logged with
//! its key and reason, and the running config stays in force. Changes are detected by
//! polling the file's modification time, size and content hash (editors replace files in
//! several ways; a poll sees them all, and costs one `stat` per interval).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use tracing::{error, info, warn};

use crate::bridge::{Bridge, ReloadReport};
use crate::config::Config;

/// Why a reload did not apply.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new config is invalid; the running one is kept.
    #[error(transparent)]
    Invalid(#[from] crate::config::ConfigError),
    /// Applying it failed (e.g. a webhook client could not be built); nothing was swapped
    /// for the part that failed.
    #[error(transparent)]
    Apply(#[from] crate::bridge::BridgeError),
}

/// Loads `path` and applies it; logs the outcome either way.
pub async fn reload_file(bridge: &Bridge, path: &Path) -> Result<ReloadReport, ReloadError> {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            for issue in &e.0 {
                error!(config = %path.display(), key = %issue.key, item = issue.item.as_deref().unwrap_or(""), reason = %issue.reason, "reload refused: invalid config");
            }
            warn!(config = %path.display(), problems = e.0.len(), "the running config is kept");
            return Err(e.into());
        }
    };
    match bridge.reload(config).await {
        Ok(report) => {
            for change in &report.applied {
                info!(config = %path.display(), change = %change, "reload applied");
            }
            for key in &report.needs_restart {
                warn!(config = %path.display(), key = %key, "changed, but only takes effect after a restart");
            }
            if report.applied.is_empty() && report.needs_restart.is_empty() {
                info!(config = %path.display(), "reload: nothing changed");
            }
            Ok(report)
        }
        Err(e) => {
            error!(config = %path.display(), error = %e, "reload failed; the running config is kept");
            Err(e.into())
        }
    }
}

/// Notices changes to the config file, and to the dialect files and folders it names,
/// between polls.
#[derive(Debug)]
pub struct FileWatch {
    path: PathBuf,
    seen: Option<Stamp>,
    /// `[dialects] paths` of the config in force: a changed dialect file reloads too.
    also: Vec<PathBuf>,
    also_seen: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    hash: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::hash::{Hash, Hasher};
    let meta = std::fs::metadata(path).ok()?;
    let bytes = std::fs::read(path).ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    Some(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        hash: h.finish(),
    })
}

/// One hash over what `paths` hold: each file's content, each folder's `*.toml` files (names
/// and contents). A missing path hashes as missing.
fn stamp_all(paths: &[PathBuf]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in paths {
        p.hash(&mut h);
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .map(|entries| {
                    entries
                        .filter_map(Result::ok)
                        .map(|e| e.path())
                        .filter(|f| f.extension().is_some_and(|e| e == "toml"))
                        .collect()
                })
                .unwrap_or_default();
            files.sort();
            for f in files {
                f.hash(&mut h);
                stamp(&f).map(|s| s.hash).hash(&mut h);
            }
        } else {
            stamp(p).map(|s| s.hash).hash(&mut h);
        }
    }
    h.finish()
}

impl FileWatch {
    /// Starts watching `path` as it is now.
    pub fn new(path: &Path) -> FileWatch {
        FileWatch {
            path: path.to_path_buf(),
            seen: stamp(path),
            also: Vec::new(),
            also_seen: stamp_all(&[]),
        }
    }

    /// Also watches `paths` (the config's `[dialects] paths`), as they are now.
    pub fn watch_also(&mut self, paths: &[PathBuf]) {
        self.also = paths.to_vec();
        self.also_seen = stamp_all(&self.also);
    }

    /// True once per change of the file's content (a missing file is not a change: editors
    /// delete and recreate), or of what the other watched paths hold.
    pub fn changed(&mut self) -> bool {
        let also = stamp_all(&self.also);
        let also_changed = also != self.also_seen;
        self.also_seen = also;
        let config_changed = match stamp(&self.path) {
            Some(now) if Some(&now) != self.seen.as_ref() => {
                let content_changed = self
                    .seen
                    .as_ref()
                    .is_none_or(|s| s.hash != now.hash || s.len != now.len);
                self.seen = Some(now);
                content_changed
            }
            _ => false,
        };
        config_changed || also_changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_content_changes_once() {
        let dir = std::env::temp_dir().join(format!("wsbridge-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(&f, "a = 1").unwrap();
        let mut w = FileWatch::new(&f);
        assert!(!w.changed());
        std::fs::write(&f, "a = 22").unwrap();
        assert!(w.changed());
        assert!(!w.changed(), "reported once");
        std::fs::remove_file(&f).unwrap();
        assert!(!w.changed(), "a missing file is not a change");
        // A dialect folder: a changed or added file is a change.
        let dialects = dir.join("dialects");
        std::fs::create_dir_all(&dialects).unwrap();
        std::fs::write(dialects.join("a.toml"), "x").unwrap();
        w.watch_also(std::slice::from_ref(&dialects));
        assert!(!w.changed());
        std::fs::write(dialects.join("a.toml"), "y").unwrap();
        assert!(w.changed());
        assert!(!w.changed(), "reported once");
        std::fs::write(dialects.join("b.toml"), "z").unwrap();
        assert!(w.changed());
        std::fs::write(dialects.join("notes.txt"), "z").unwrap();
        assert!(!w.changed(), "only *.toml files count");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
