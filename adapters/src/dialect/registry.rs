//! The dialects an upstream may name: the built-in ones and the users' files
//! (`[dialects] paths`, each a file or a folder of `*.toml`), loaded at start and on reload.
//!
//! A user's file may not take a built-in's name (an upstream's `adapter = "voipbin"` must
//! always mean the shipped dialect), nor the name of another loaded file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{builtin, builtin_names, Dialect};

/// Most files one folder in `[dialects] paths` may hold (a typo pointing at a large folder
/// must not load thousands of files).
pub const MAX_FILES_PER_FOLDER: usize = 1000;

/// Largest dialect file read (a dialect is a few kilobytes of TOML).
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// The dialects by name: built-ins first, then the loaded files.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    user: BTreeMap<String, Arc<Dialect>>,
    /// Every file loaded, in load order (a reload watches them).
    files: Vec<PathBuf>,
}

/// Why one entry of `[dialects] paths` could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RegistryError {
    /// The position of the entry in `paths`.
    pub index: usize,
    /// What is wrong: the file, and for a file that does not load each problem with its key.
    pub message: String,
}

impl Registry {
    /// Loads every file of `paths` (a file, or a folder whose `*.toml` files are loaded in
    /// name order); every problem is reported, each with the entry it came from.
    pub fn load(paths: &[PathBuf]) -> Result<Registry, Vec<RegistryError>> {
        let mut reg = Registry::default();
        let mut errors = Vec::new();
        let mut origins: BTreeMap<String, PathBuf> = BTreeMap::new();
        for (index, path) in paths.iter().enumerate() {
            let mut fail = |message: String| errors.push(RegistryError { index, message });
            let files = match files_of(path) {
                Ok(f) => f,
                Err(message) => {
                    fail(message);
                    continue;
                }
            };
            for file in files {
                let dialect = match read(&file) {
                    Ok(d) => d,
                    Err(message) => {
                        fail(message);
                        continue;
                    }
                };
                let name = dialect.name().to_string();
                if builtin_names().any(|b| b == name) {
                    fail(format!(
                        "{}: dialect.name: {name:?} is the name of a built-in dialect; a file may not replace it (choose another name)",
                        file.display()
                    ));
                    continue;
                }
                if let Some(first) = origins.get(&name) {
                    fail(format!(
                        "{}: dialect.name: {name:?} is already the name of {}",
                        file.display(),
                        first.display()
                    ));
                    continue;
                }
                origins.insert(name.clone(), file.clone());
                reg.files.push(file);
                reg.user.insert(name, Arc::new(dialect));
            }
        }
        if errors.is_empty() {
            Ok(reg)
        } else {
            Err(errors)
        }
    }

    /// The dialect called `name`: a built-in or a loaded file.
    pub fn get(&self, name: &str) -> Option<Arc<Dialect>> {
        match builtin(name) {
            Some(Ok(d)) => Some(d),
            Some(Err(_)) => None,
            None => self.user.get(name).cloned(),
        }
    }

    /// Every dialect: the built-ins (in their order), then the loaded files by name. A
    /// built-in that does not load (a defect the test suite catches) is left out.
    pub fn all(&self) -> Vec<Arc<Dialect>> {
        builtin_names()
            .filter_map(|n| builtin(n).and_then(Result::ok))
            .chain(self.user.values().cloned())
            .collect()
    }

    /// The names an upstream may use, for messages.
    pub fn names(&self) -> Vec<String> {
        self.all().iter().map(|d| d.name().to_string()).collect()
    }

    /// The files loaded, in load order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

/// The files an entry names: itself, or a folder's `*.toml` files in name order.
fn files_of(path: &Path) -> Result<Vec<PathBuf>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    let entries = std::fs::read_dir(path).map_err(|e| format!("{}: {e}", path.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", path.display()))?;
        let p = entry.path();
        if p.extension().is_some_and(|e| e == "toml") && p.is_file() {
            if files.len() >= MAX_FILES_PER_FOLDER {
                return Err(format!(
                    "{}: more than {MAX_FILES_PER_FOLDER} *.toml files",
                    path.display()
                ));
            }
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// Reads and loads one dialect file.
fn read(file: &Path) -> Result<Dialect, String> {
    let meta = std::fs::metadata(file).map_err(|e| format!("{}: {e}", file.display()))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!(
            "{}: larger than {MAX_FILE_BYTES} bytes; not a dialect file",
            file.display()
        ));
    }
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    Dialect::load(&file.display().to_string(), &text).map_err(|e| e.to_string())
}
