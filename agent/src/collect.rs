//! Finding what a scraper wrote: walks a task's output directory and lists
//! every regular file with its object key, skipping symlinks and special
//! files. Synchronous; callers run it on a blocking thread.

use std::path::{Path, PathBuf};

use crate::Error;

/// One file to upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputFile {
    /// The object key: the path relative to the output directory with `/`
    /// separators.
    pub key: String,
    /// The file's absolute path.
    pub path: PathBuf,
}

/// An entry that is not uploaded, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The path relative to the output directory, for display.
    pub relative: String,
    /// Why it is skipped.
    pub reason: &'static str,
}

/// The result of walking an output directory.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Collected {
    /// Regular files, sorted by key.
    pub files: Vec<OutputFile>,
    /// Entries left out, in walk order.
    pub skipped: Vec<Skipped>,
}

/// Walks `out_dir` recursively without following symlinks.
pub fn collect_outputs(out_dir: &Path) -> Result<Collected, Error> {
    let mut collected = Collected::default();
    // Each pending directory with its key prefix (empty or ending in `/`).
    let mut pending = vec![(out_dir.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = pending.pop() {
        let dir_error = |source| Error::Dir {
            path: dir.clone(),
            source,
        };
        for entry in std::fs::read_dir(&dir).map_err(dir_error)? {
            let entry = entry.map_err(dir_error)?;
            let file_type = entry.file_type().map_err(dir_error)?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                collected.skipped.push(Skipped {
                    relative: format!("{prefix}{}", name.to_string_lossy()),
                    reason: "the name is not valid UTF-8",
                });
                continue;
            };
            let relative = format!("{prefix}{name}");
            if file_type.is_symlink() {
                collected.skipped.push(Skipped {
                    relative,
                    reason: "symbolic links are not uploaded",
                });
            } else if file_type.is_dir() {
                pending.push((entry.path(), format!("{relative}/")));
            } else if file_type.is_file() {
                collected.files.push(OutputFile {
                    key: relative,
                    path: entry.path(),
                });
            } else {
                collected.skipped.push(Skipped {
                    relative,
                    reason: "not a regular file",
                });
            }
        }
    }
    collected.files.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(collected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_nested_regular_files_and_skips_symlinks_and_sockets() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let out = dir.path();
        std::fs::create_dir_all(out.join("season/2024/deep"))?;
        std::fs::create_dir(out.join("empty"))?;
        std::fs::write(out.join("top.json"), b"{}")?;
        std::fs::write(out.join("season/2024/games.csv"), b"a,b")?;
        std::fs::write(out.join("season/2024/deep/x.bin"), b"x")?;
        std::os::unix::fs::symlink(out.join("top.json"), out.join("link.json"))?;
        std::os::unix::fs::symlink(out.join("season"), out.join("linkdir"))?;
        // A bound unix socket is a special file that is neither file nor dir.
        let _socket = std::os::unix::net::UnixListener::bind(out.join("sock"))?;

        let collected = collect_outputs(out)?;
        let keys: Vec<&str> = collected.files.iter().map(|f| f.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "season/2024/deep/x.bin",
                "season/2024/games.csv",
                "top.json"
            ]
        );
        assert_eq!(collected.files[1].path, out.join("season/2024/games.csv"));

        let mut skipped: Vec<(&str, &str)> = collected
            .skipped
            .iter()
            .map(|s| (s.relative.as_str(), s.reason))
            .collect();
        skipped.sort_unstable();
        assert_eq!(
            skipped,
            [
                ("link.json", "symbolic links are not uploaded"),
                ("linkdir", "symbolic links are not uploaded"),
                ("sock", "not a regular file"),
            ]
        );
        Ok(())
    }

    #[test]
    fn missing_directory_is_an_error() {
        let err = collect_outputs(Path::new("/nonexistent/adce/out")).expect_err("missing dir");
        assert!(err.to_string().contains("/nonexistent/adce/out"));
    }
}
