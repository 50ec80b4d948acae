//! What a killed agent leaves in its work directory, and the lock that keeps
//! two agents off one work directory. An agent that is SIGKILLed cannot kill
//! its scrapers (they run in their own process groups, and a parent-death
//! signal would need unsafe code), so each runner records its scraper's
//! process group in the task directory; the next agent on the same work
//! directory kills the groups still running there and removes the task
//! directories before it connects, so a task is never scraped twice at once
//! by the same host.
//!
//! A recorded group is killed only when a process of that group still has
//! its working directory inside the task directory, so a process group id the
//! kernel has since reused for something else is left alone.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::error::Error;

/// The file in a task directory that holds its scraper's process group id.
pub const PGID_FILE: &str = "pgid";
/// The lock file in the work directory, held for the agent's whole life.
pub const LOCK_FILE: &str = ".adce-agent.lock";
/// Task directories are named after their lease, which starts with this.
const LEASE_DIR_PREFIX: &str = "l-";

/// The exclusive lock on a work directory; released when dropped (or when
/// the process ends, however it ends).
#[derive(Debug)]
pub struct WorkDirLock {
    _lock: Flock<File>,
}

/// Takes the work directory's lock, failing at once when another agent
/// holds it.
pub fn lock(work_dir: &Path) -> Result<WorkDirLock, Error> {
    let path = work_dir.join(LOCK_FILE);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| Error::Dir {
            path: path.clone(),
            source,
        })?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(WorkDirLock { _lock: lock }),
        Err((_, errno)) if errno == nix::errno::Errno::EWOULDBLOCK => {
            Err(Error::WorkDirInUse(work_dir.to_path_buf()))
        }
        Err((_, errno)) => Err(Error::Dir {
            path,
            source: std::io::Error::from(errno),
        }),
    }
}

/// Records that the scraper of `task_dir` runs in process group `pgid`.
pub fn record_group(task_dir: &Path, pgid: i32) -> std::io::Result<()> {
    std::fs::write(task_dir.join(PGID_FILE), pgid.to_string())
}

/// What [`reap`] found in one leftover task directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    /// The task directory (removed).
    pub dir: PathBuf,
    /// The process group killed, when one was still running.
    pub killed: Option<i32>,
}

/// Kills the scraper groups a previous agent left running in `work_dir`
/// and removes its task directories. Call with the lock held.
pub fn reap(work_dir: &Path) -> Vec<Leftover> {
    let Ok(entries) = std::fs::read_dir(work_dir) else {
        return Vec::new();
    };
    let mut reaped = Vec::new();
    for entry in entries.flatten() {
        let is_task_dir = entry.file_type().is_ok_and(|t| t.is_dir())
            && entry
                .file_name()
                .to_str()
                .is_some_and(|name| name.starts_with(LEASE_DIR_PREFIX));
        if !is_task_dir {
            continue;
        }
        let dir = entry.path();
        let killed = std::fs::read_to_string(dir.join(PGID_FILE))
            .ok()
            .and_then(|text| text.trim().parse::<i32>().ok())
            .filter(|pgid| *pgid > 1 && group_runs_in(*pgid, &dir))
            .filter(|pgid| killpg(Pid::from_raw(*pgid), Signal::SIGKILL).is_ok());
        if let Err(error) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), %error, "cannot remove a leftover task directory");
        }
        reaped.push(Leftover { dir, killed });
    }
    reaped
}

/// Whether some process of group `pgid` has its working directory in `dir`.
fn group_runs_in(pgid: i32, dir: &Path) -> bool {
    let Ok(dir) = dir.canonicalize() else {
        return false;
    };
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|entry| {
        let path = entry.path();
        let in_group = std::fs::read_to_string(path.join("stat"))
            .ok()
            .and_then(|stat| process_group(&stat))
            == Some(pgid);
        in_group && std::fs::read_link(path.join("cwd")).is_ok_and(|cwd| cwd.starts_with(&dir))
    })
}

/// The process group field of a `/proc/PID/stat` line. The command name
/// (field 2) is in parentheses and may hold spaces and parentheses itself,
/// so the fields are counted after its last `)`.
fn process_group(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // State, parent pid, process group.
    rest.split_whitespace().nth(2)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_group_is_read_after_the_command_name() {
        assert_eq!(
            process_group("4242 (sh) S 1 4242 4242 0 -1 4194304"),
            Some(4242)
        );
        assert_eq!(process_group("77 (odd ) name) (x) R 5 70 70 0"), Some(70));
        assert_eq!(process_group("garbage"), None);
    }

    #[test]
    fn a_second_lock_on_the_same_work_dir_is_refused() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let first = lock(dir.path())?;
        assert!(matches!(lock(dir.path()), Err(Error::WorkDirInUse(_))));
        drop(first);
        let _again = lock(dir.path())?;
        Ok(())
    }

    #[test]
    fn a_recorded_group_of_another_directory_is_not_killed() -> anyhow::Result<()> {
        let work = tempfile::tempdir()?;
        let task = work.path().join("l-0123");
        std::fs::create_dir_all(&task)?;
        // This test process's own group runs elsewhere: it must survive.
        let own = nix::unistd::getpgrp().as_raw();
        record_group(&task, own)?;
        let reaped = reap(work.path());
        assert_eq!(
            reaped,
            vec![Leftover {
                dir: task.clone(),
                killed: None
            }]
        );
        assert!(!task.exists());
        Ok(())
    }
}
