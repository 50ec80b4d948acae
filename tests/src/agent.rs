//! `adce-agent` as a test starts it: [`AgentProc`], the real binary connected
//! to a test server, with its own work directory and log.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use crate::files::create_dir_all;
use crate::process::{Proc, bin};

/// A running `adce-agent`.
#[derive(Debug)]
pub struct AgentProc {
    proc: Proc,
    id: String,
    work_dir: PathBuf,
}

impl AgentProc {
    /// Starts `adce-agent --server URL --id ID --slots N [--labels k=v,..]
    /// --work-dir <test_dir>/agent-ID`, with that directory as its working
    /// directory and its log in `test_dir/agent-ID.log`.
    pub fn start(
        server_url: &str,
        id: &str,
        slots: u32,
        labels: &[(&str, &str)],
        test_dir: &Path,
    ) -> AgentProc {
        let mut args: Vec<OsString> = vec!["--slots".into(), slots.to_string().into()];
        if !labels.is_empty() {
            let joined: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            args.push("--labels".into());
            args.push(joined.join(",").into());
        }
        AgentProc::start_with_args_env(server_url, id, &args, &[], test_dir)
    }

    /// The agent id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The agent's `--work-dir` (also its working directory).
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// The process.
    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// Everything the agent logged so far.
    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// SIGKILL by pid.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// SIGTERM by pid and a bounded wait for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.proc.terminate()
    }
}

impl AgentProc {
    /// Starts `adce-agent --server URL --id ID --work-dir <test_dir>/agent-ID
    /// EXTRA_ARGS` (e.g. `--allow-command DIR`; one slot unless they say
    /// `--slots`), like [`AgentProc::start`].
    pub fn start_with_args(
        server_url: &str,
        id: &str,
        extra_args: &[OsString],
        test_dir: &Path,
    ) -> AgentProc {
        AgentProc::start_with_args_env(server_url, id, extra_args, &[], test_dir)
    }

    /// [`AgentProc::start_with_args`] with extra environment variables for
    /// the agent (e.g. `ADCE_TOKEN`).
    pub fn start_with_args_env(
        server_url: &str,
        id: &str,
        extra_args: &[OsString],
        envs: &[(&str, &str)],
        test_dir: &Path,
    ) -> AgentProc {
        let work_dir = test_dir.join(format!("agent-{id}"));
        create_dir_all(&work_dir);
        let mut args: Vec<OsString> = vec![
            "--server".into(),
            server_url.into(),
            "--id".into(),
            id.into(),
            "--work-dir".into(),
            work_dir.as_os_str().to_owned(),
        ];
        args.extend_from_slice(extra_args);
        let mut all_envs = vec![("RUST_LOG", "info,adce_agent=debug")];
        all_envs.extend_from_slice(envs);
        let proc = Proc::spawn(
            &format!("agent-{id}"),
            &bin("adce-agent"),
            &args,
            &all_envs,
            test_dir,
            Some(&work_dir),
        );
        AgentProc {
            proc,
            id: id.to_string(),
            work_dir,
        }
    }
}
