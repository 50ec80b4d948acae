//! Files of a test: [`TestDir`] (a temporary directory removed at drop, or
//! kept for a failing test), writing configs and the test scrapers into it,
//! and small file helpers that panic with the path on error.

use std::fs;
use std::path::{Path, PathBuf};
use std::thread;

use tempfile::TempDir;

/// Directory of the test scraper scripts shipped with this crate.
pub fn scrapers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scrapers")
}

/// Set this environment variable to keep the directories of failing tests.
pub const KEEP_ENV: &str = "ADCE_E2E_KEEP";

/// A temporary directory removed at drop (kept when the test fails and
/// [`KEEP_ENV`] is set), with helpers to write files.
#[derive(Debug)]
pub struct TestDir {
    dir: Option<TempDir>,
    path: PathBuf,
}

impl TestDir {
    /// Creates a fresh temporary directory.
    pub fn new() -> TestDir {
        let dir = match tempfile::Builder::new().prefix("adce-e2e-").tempdir() {
            Ok(dir) => dir,
            Err(e) => panic!("cannot create a temporary directory: {e}"),
        };
        let path = dir.path().to_path_buf();
        TestDir {
            dir: Some(dir),
            path,
        }
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `path()/rel`.
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }

    /// Writes `contents` at `path()/rel` (creating parents) and returns the path.
    pub fn write(&self, rel: impl AsRef<Path>, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.join(rel);
        write_file(&path, contents.as_ref());
        path
    }

    /// Writes a config file named `name` and returns its path.
    pub fn write_config(&self, name: &str, yaml: &str) -> PathBuf {
        self.write(name, yaml)
    }

    /// Copies the test scrapers into `path()/scrapers/` (keeping their
    /// executable bit) so configs can name them as `{config_dir}/scrapers/X`.
    pub fn install_scrapers(&self) -> PathBuf {
        let target = self.join("scrapers");
        create_dir_all(&target);
        let entries = match fs::read_dir(scrapers_dir()) {
            Ok(entries) => entries,
            Err(e) => panic!("cannot list {}: {e}", scrapers_dir().display()),
        };
        for entry in entries.flatten() {
            let from = entry.path();
            if from.is_file() {
                let to = target.join(entry.file_name());
                if let Err(e) = fs::copy(&from, &to) {
                    panic!("cannot copy {} to {}: {e}", from.display(), to.display());
                }
            }
        }
        target
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if thread::panicking()
            && std::env::var_os(KEEP_ENV).is_some()
            && let Some(dir) = self.dir.take()
        {
            eprintln!("kept the test directory {}", dir.keep().display());
        }
    }
}

impl Default for TestDir {
    fn default() -> Self {
        TestDir::new()
    }
}

/// Writes a file, creating its parent directories; panics with the path on error.
pub fn write_file(path: &Path, contents: &[u8]) {
    if let Some(parent) = path.parent() {
        create_dir_all(parent);
    }
    if let Err(e) = fs::write(path, contents) {
        panic!("cannot write {}: {e}", path.display());
    }
}

/// `fs::create_dir_all` that panics with the path on error.
pub fn create_dir_all(path: &Path) {
    if let Err(e) = fs::create_dir_all(path) {
        panic!("cannot create {}: {e}", path.display());
    }
}

/// Reads a file to a string, or "" when it does not exist.
pub fn read_or_empty(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => panic!("cannot read {}: {e}", path.display()),
    }
}

/// Every regular file under `root`, as paths relative to it with `/`.
pub fn files_under(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(rel) = path.strip_prefix(root) {
                found.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    found.sort();
    found
}
