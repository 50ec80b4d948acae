//! The host owner's command allowlist (`--allow-command PREFIX`): which
//! programs this agent may start, whatever the server sends.
//!
//! With prefixes given, a task's program (argv[0]) is resolved the way a
//! spawn would find it — a name without `/` is looked up in the scraper's
//! `PATH`, a path with `/` is taken relative to the task's working directory
//! — and then canonicalized: symlinks and `..` are resolved, so the check is
//! on the real file that would run. It runs only when that real path starts
//! with one of the (equally canonicalized) prefixes, compared path component
//! by path component: `/opt/scrapers` allows `/opt/scrapers/x` but not
//! `/opt/scrapers-evil/x`, and a prefix naming a file allows exactly that
//! file. The runner then starts the resolved path (with argv[0] as given), so
//! what was checked is what runs. Without prefixes everything is allowed.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path, PathBuf};

use crate::Error;

/// The programs an agent may start; empty means every program.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    /// Absolute prefixes without `.` or `..` components, as given.
    prefixes: Vec<PathBuf>,
}

impl AllowList {
    /// Allows every program (no `--allow-command`).
    pub fn everything() -> Self {
        Self::default()
    }

    /// Allows only programs under `prefixes`. Each must be absolute and
    /// free of `..`; an empty list allows everything.
    pub fn new(prefixes: impl IntoIterator<Item = PathBuf>) -> Result<Self, Error> {
        let mut checked = Vec::new();
        for prefix in prefixes {
            let invalid = |reason: &str| {
                Error::InvalidOptions(format!("--allow-command {}: {reason}", prefix.display()))
            };
            if !prefix.is_absolute() {
                return Err(invalid("the prefix must be an absolute path"));
            }
            if prefix.components().any(|c| c == Component::ParentDir) {
                return Err(invalid("the prefix must not contain `..`"));
            }
            // `components` drops `.` and repeated or trailing slashes.
            let normal: PathBuf = prefix.components().collect();
            if !checked.contains(&normal) {
                checked.push(normal);
            }
        }
        Ok(Self { prefixes: checked })
    }

    /// Whether only some programs are allowed.
    pub fn is_restricted(&self) -> bool {
        !self.prefixes.is_empty()
    }

    /// The prefixes, as given (normalized).
    pub fn prefixes(&self) -> &[PathBuf] {
        &self.prefixes
    }

    /// The prefixes for messages: `/a, /b`.
    pub fn describe(&self) -> String {
        self.prefixes
            .iter()
            .map(|prefix| prefix.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Decides whether `program` may run. `path_var` is the `PATH` the child
    /// would get and `cwd` its working directory.
    ///
    /// Returns `None` when everything is allowed (spawn `program` as given),
    /// the canonical path to spawn when it is allowed, and
    /// [`Error::CommandNotAllowed`] otherwise.
    pub fn check(
        &self,
        program: &OsStr,
        path_var: Option<&OsStr>,
        cwd: &Path,
    ) -> Result<Option<PathBuf>, Error> {
        if !self.is_restricted() {
            return Ok(None);
        }
        let refuse = |shown: String, reason: Option<String>| Error::CommandNotAllowed {
            program: shown,
            reason,
            allowed: self.describe(),
        };
        let resolved = resolve(program, path_var, cwd).map_err(|reason| {
            refuse(
                format!("`{}`", program.to_string_lossy()),
                Some(reason.to_string()),
            )
        })?;
        let allowed = self
            .prefixes
            .iter()
            .any(|prefix| resolved.starts_with(canonical_prefix(prefix)));
        if allowed {
            Ok(Some(resolved))
        } else {
            Err(refuse(resolved.display().to_string(), None))
        }
    }
}

/// A prefix with its symlinks resolved, when it exists; as given otherwise
/// (nothing under a missing directory can resolve into it anyway).
fn canonical_prefix(prefix: &Path) -> PathBuf {
    std::fs::canonicalize(prefix).unwrap_or_else(|_| prefix.to_path_buf())
}

/// Why a program cannot be resolved.
#[derive(Debug, thiserror::Error)]
enum Unresolved {
    #[error("not found in PATH")]
    NotInPath,
    #[error("cannot resolve {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The real file a spawn of `program` would execute: looked up in
/// `path_var` when it has no `/` (absolute `PATH` entries only, the first
/// executable regular file wins, as `execvp` does), otherwise relative to
/// `cwd`; then canonicalized.
fn resolve(program: &OsStr, path_var: Option<&OsStr>, cwd: &Path) -> Result<PathBuf, Unresolved> {
    let candidate = if program.as_bytes().contains(&b'/') {
        // An absolute program replaces `cwd` entirely.
        cwd.join(program)
    } else {
        path_var
            .into_iter()
            .flat_map(std::env::split_paths)
            .filter(|dir| dir.is_absolute())
            .map(|dir| dir.join(program))
            .find(|path| is_executable_file(path))
            .ok_or(Unresolved::NotInPath)?
    };
    std::fs::canonicalize(&candidate).map_err(|source| Unresolved::Io {
        path: candidate,
        source,
    })
}

fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path)
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn executable(path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, "#!/bin/sh\n")?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
        Ok(())
    }

    #[test]
    fn prefixes_must_be_absolute_without_dotdot_and_are_normalized() -> anyhow::Result<()> {
        let error = AllowList::new([PathBuf::from("scrapers")]).expect_err("relative");
        assert_eq!(
            error.to_string(),
            "invalid agent options: --allow-command scrapers: the prefix must be an absolute path"
        );
        let error = AllowList::new([PathBuf::from("/opt/../usr")]).expect_err("dotdot");
        assert!(
            error.to_string().contains("must not contain `..`"),
            "{error}"
        );
        let list = AllowList::new([
            PathBuf::from("/opt/scrapers/"),
            PathBuf::from("/opt/./scrapers"),
            PathBuf::from("/usr/bin"),
        ])?;
        assert_eq!(list.describe(), "/opt/scrapers, /usr/bin");
        assert!(list.is_restricted());
        assert!(!AllowList::everything().is_restricted());
        assert!(!AllowList::new(Vec::new())?.is_restricted());
        Ok(())
    }

    #[test]
    fn everything_is_allowed_without_prefixes() -> anyhow::Result<()> {
        let checked =
            AllowList::everything().check(OsStr::new("anything"), None, Path::new("/"))?;
        assert_eq!(checked, None);
        Ok(())
    }

    #[test]
    fn prefixes_match_whole_path_components() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let root = std::fs::canonicalize(dir.path())?;
        executable(&root.join("scrapers/ok.sh"))?;
        executable(&root.join("scrapers-evil/x.sh"))?;
        executable(&root.join("bin/one.sh"))?;
        executable(&root.join("bin/two.sh"))?;
        let list = AllowList::new([root.join("scrapers/"), root.join("bin/one.sh")])?;
        let check = |program: PathBuf| list.check(program.as_os_str(), None, Path::new("/"));

        assert_eq!(
            check(root.join("scrapers/ok.sh"))?,
            Some(root.join("scrapers/ok.sh"))
        );
        // A prefix naming a file allows exactly that file.
        assert_eq!(
            check(root.join("bin/one.sh"))?,
            Some(root.join("bin/one.sh"))
        );
        for refused in [root.join("scrapers-evil/x.sh"), root.join("bin/two.sh")] {
            let error = check(refused.clone()).expect_err("outside the prefixes");
            assert_eq!(
                error.to_string(),
                format!(
                    "command {} is not allowed on this host (--allow-command {}, {})",
                    refused.display(),
                    root.join("scrapers").display(),
                    root.join("bin/one.sh").display()
                )
            );
        }
        Ok(())
    }

    #[test]
    fn dotdot_and_symlinks_resolve_to_the_real_file() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let root = std::fs::canonicalize(dir.path())?;
        executable(&root.join("scrapers/ok.sh"))?;
        executable(&root.join("outside/evil.sh"))?;
        symlink(root.join("outside/evil.sh"), root.join("scrapers/link.sh"))?;
        symlink(root.join("outside"), root.join("scrapers/linkdir"))?;
        symlink(root.join("scrapers/ok.sh"), root.join("outside/to-ok.sh"))?;
        let list = AllowList::new([root.join("scrapers")])?;
        let check = |program: PathBuf| list.check(program.as_os_str(), None, Path::new("/"));

        let escapes = [
            root.join("scrapers/../outside/evil.sh"),
            root.join("scrapers/link.sh"),
            root.join("scrapers/linkdir/evil.sh"),
        ];
        for program in escapes {
            let error = check(program.clone()).expect_err("escapes the prefix");
            assert!(
                error.to_string().starts_with(&format!(
                    "command {} is not allowed",
                    root.join("outside/evil.sh").display()
                )),
                "{program:?}: {error}"
            );
        }
        // A link from outside to an allowed file runs the allowed file.
        assert_eq!(
            check(root.join("outside/to-ok.sh"))?,
            Some(root.join("scrapers/ok.sh"))
        );
        Ok(())
    }

    #[test]
    fn bare_names_are_found_in_path_and_relative_paths_in_cwd() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let root = std::fs::canonicalize(dir.path())?;
        executable(&root.join("first/tool"))?;
        executable(&root.join("second/tool"))?;
        std::fs::write(root.join("plain"), "not executable")?;
        let list = AllowList::new([root.join("second")])?;
        let path_var = std::env::join_paths([
            PathBuf::from("relative"),
            root.join("missing"),
            root.join("first"),
            root.join("second"),
        ])?;
        // The first executable in PATH is what would run, and it is outside.
        let error = list
            .check(OsStr::new("tool"), Some(&path_var), Path::new("/"))
            .expect_err("first match is outside");
        assert!(
            error.to_string().starts_with(&format!(
                "command {} is not allowed",
                root.join("first/tool").display()
            )),
            "{error}"
        );
        let only_second = std::env::join_paths([root.join("second")])?;
        assert_eq!(
            list.check(OsStr::new("tool"), Some(&only_second), Path::new("/"))?,
            Some(root.join("second/tool"))
        );
        let error = list
            .check(OsStr::new("nowhere"), Some(&path_var), Path::new("/"))
            .expect_err("not found");
        assert_eq!(
            error.to_string(),
            format!(
                "command `nowhere` is not allowed on this host: not found in PATH (--allow-command {})",
                root.join("second").display()
            )
        );
        assert!(
            list.check(OsStr::new("tool"), None, Path::new("/"))
                .is_err()
        );
        // A relative path with a slash is taken from the working directory.
        assert_eq!(
            list.check(OsStr::new("./tool"), None, &root.join("second"))?,
            Some(root.join("second/tool"))
        );
        Ok(())
    }
}
