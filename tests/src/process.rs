//! Processes of the harness: where the built binaries and the venv's tools
//! are, free loopback ports, [`Proc`] (a child process with its log file,
//! stopped by its own pid and killed at drop), short-lived commands run to
//! their end under a time bound, and bounded polling ([`wait_until`]).
//! [`Proc`] and the waits here are where the harness's invariant (see the
//! crate docs) is kept: processes stopped by their own pid, waits bounded in
//! both count and time.

use std::ffi::OsString;
use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::files::{create_dir_all, read_or_empty};

/// How long `terminate()` waits for a process to exit after SIGTERM.
pub const TERMINATE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one `adcectl` (or other short-lived tool) run may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How many trailing log lines a failing test prints per process.
pub const LOG_TAIL_LINES: usize = 80;
/// Interval between probes while a server (or moto) starts.
pub(crate) const READY_POLL: Duration = Duration::from_millis(100);
/// Interval between exit checks of a child process.
const EXIT_POLL: Duration = Duration::from_millis(20);

/// The environment variable `scripts/test.sh` sets to the project venv that
/// holds `grpcurl` and the Python gRPC health client.
pub const VENV_ENV: &str = "ADCE_TEST_VENV";

/// Path of a binary of this workspace built into the same target profile as
/// the running test: the test executable lives in `target/<profile>/deps/`,
/// the binaries in `target/<profile>/`.
pub fn bin(name: &str) -> PathBuf {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => panic!("cannot find the test executable: {e}"),
    };
    let deps = exe.parent().unwrap_or_else(|| Path::new("."));
    let profile_dir = if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().unwrap_or(deps)
    } else {
        deps
    };
    let path = profile_dir.join(name);
    if !path.is_file() {
        panic!(
            "binary {name} not found at {}: run scripts/test.sh (it builds the binaries first)",
            path.display()
        );
    }
    path
}

/// The project venv from [`VENV_ENV`]; panics with a clear message when the
/// tests were not started through `scripts/test.sh`.
pub fn venv() -> PathBuf {
    match std::env::var_os(VENV_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => panic!(
            "{VENV_ENV} is not set: this test needs grpcurl and python from the project venv; \
             run scripts/test.sh (it installs them into .venv and sets {VENV_ENV})"
        ),
    }
}

/// A tool inside the project venv's `bin/`, which must exist.
pub fn venv_tool(name: &str) -> PathBuf {
    let path = venv().join("bin").join(name);
    if !path.exists() {
        panic!(
            "{} not found: run scripts/test.sh (it installs the test tools into the venv)",
            path.display()
        );
    }
    path
}

/// A loopback port that was free a moment ago: bind `127.0.0.1:0`, read the
/// port, drop the listener.
pub fn free_port() -> u16 {
    let listener = match TcpListener::bind("127.0.0.1:0") {
        Ok(listener) => listener,
        Err(e) => panic!("cannot bind a loopback port: {e}"),
    };
    match listener.local_addr() {
        Ok(addr) => addr.port(),
        Err(e) => panic!("listener has no local address: {e}"),
    }
}

/// A loopback address on a [`free_port`].
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// The last `n` lines of a text.
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

/// Polls `check` every `poll` until it returns `Ok`, for at most `timeout`
/// (and at most `timeout / poll + 1` times). `Err` carries what was observed;
/// on timeout the panic names `what` and the last observation.
pub fn wait_until<T, O: Debug>(
    what: &str,
    timeout: Duration,
    poll: Duration,
    mut check: impl FnMut() -> Result<T, O>,
) -> T {
    let started = Instant::now();
    let max_polls = timeout.as_millis() / poll.as_millis().max(1) + 1;
    let mut last = None;
    for _ in 0..max_polls {
        match check() {
            Ok(value) => return value,
            Err(observed) => last = Some(observed),
        }
        if started.elapsed() >= timeout {
            break;
        }
        thread::sleep(poll);
    }
    panic!(
        "timed out after {:.1}s waiting for {what}; last observed: {last:#?}",
        started.elapsed().as_secs_f64()
    );
}

/// Runs a command to its end with stdin closed and stdout/stderr captured,
/// killing it (by its pid) if it outlives `timeout`.
pub fn run_bounded(command: &mut Command, timeout: Duration) -> Output {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => panic!("cannot run {command:?}: {e}"),
    };
    let stdout = child.stdout.take().map(read_in_thread);
    let stderr = child.stderr.take().map(read_in_thread);
    let status = match wait_with_timeout(&mut child, timeout) {
        Some(status) => status,
        None => {
            // `Child::kill` signals the child's own pid.
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} did not finish within {timeout:?}");
        }
    };
    let join = |handle: Option<thread::JoinHandle<Vec<u8>>>| {
        handle
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default()
    };
    Output {
        status,
        stdout: join(stdout),
        stderr: join(stderr),
    }
}

fn read_in_thread(mut reader: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = reader.read_to_end(&mut buf);
        buf
    })
}

/// Waits for `child` to exit for at most `timeout`; `None` when it is still running.
pub fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let started = Instant::now();
    let max_polls = timeout.as_millis() / EXIT_POLL.as_millis() + 1;
    for _ in 0..max_polls {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(e) => panic!("cannot wait for pid {}: {e}", child.id()),
        }
        if started.elapsed() >= timeout {
            return None;
        }
        thread::sleep(EXIT_POLL);
    }
    None
}

/// Lossy UTF-8 of captured output.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A running child process of the harness with its log file. Stopped by pid
/// only; killed at drop if still running, printing its log tail when the test
/// is failing.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `program args` with `envs`, stdout and stderr appended to
    /// `log_dir/<name>.log`, in `cwd` if given.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[OsString],
        envs: &[(&str, &str)],
        log_dir: &Path,
        cwd: Option<&Path>,
    ) -> Proc {
        create_dir_all(log_dir);
        let log = log_dir.join(format!("{name}.log"));
        let open = || match OpenOptions::new().create(true).append(true).open(&log) {
            Ok(file) => file,
            Err(e) => panic!("cannot open log {}: {e}", log.display()),
        };
        let out: File = open();
        let err: File = open();
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (key, value) in envs {
            command.env(key, value);
        }
        if let Some(cwd) = cwd {
            command.current_dir(cwd);
        }
        let child = match command.spawn() {
            Ok(child) => child,
            Err(e) => panic!("cannot start {}: {e}", program.display()),
        };
        Proc {
            name: name.to_string(),
            child,
            log,
            exited: None,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log file (stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the process has logged so far.
    pub fn log(&self) -> String {
        read_or_empty(&self.log)
    }

    /// The exit status if the process has ended.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            match self.child.try_wait() {
                Ok(status) => self.exited = status,
                Err(e) => panic!("cannot check {} (pid {}): {e}", self.name, self.pid()),
            }
        }
        self.exited
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        self.try_exit().is_none()
    }

    /// SIGKILL by pid, then reap.
    pub fn kill(&mut self) {
        if self.try_exit().is_some() {
            return;
        }
        // `Child::kill` sends SIGKILL to this child's own pid.
        let _ = self.child.kill();
        match self.child.wait() {
            Ok(status) => self.exited = Some(status),
            Err(e) => panic!("cannot reap {} (pid {}): {e}", self.name, self.pid()),
        }
    }

    /// SIGTERM by pid and wait (bounded) for the exit; panics with the log if
    /// it does not exit in time.
    pub fn terminate(&mut self) -> ExitStatus {
        if let Some(status) = self.try_exit() {
            return status;
        }
        self.signal(Signal::SIGTERM);
        match wait_with_timeout(&mut self.child, TERMINATE_TIMEOUT) {
            Some(status) => {
                self.exited = Some(status);
                status
            }
            None => panic!(
                "{} (pid {}) did not exit within {TERMINATE_TIMEOUT:?} of SIGTERM; log tail:\n{}",
                self.name,
                self.pid(),
                tail_lines(&self.log(), LOG_TAIL_LINES)
            ),
        }
    }

    /// Sends `signal` to this process's pid.
    pub fn signal(&self, signal: Signal) {
        let pid = match i32::try_from(self.pid()) {
            Ok(pid) => Pid::from_raw(pid),
            Err(e) => panic!("pid {} out of range: {e}", self.pid()),
        };
        if let Err(e) = kill(pid, signal) {
            panic!("cannot send {signal} to {} (pid {pid}): {e}", self.name);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let was_running = self.try_exit_quiet();
        if was_running {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            eprintln!(
                "----- {} (pid {}) log {} (last {LOG_TAIL_LINES} lines) -----\n{}\n----- end of {} log -----",
                self.name,
                self.child.id(),
                self.log.display(),
                tail_lines(&self.log(), LOG_TAIL_LINES),
                self.name
            );
        }
    }
}

impl Proc {
    /// Like [`Proc::try_exit`] but never panics; true when still running.
    fn try_exit_quiet(&mut self) -> bool {
        if self.exited.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.exited = Some(status);
                false
            }
            Ok(None) => true,
            Err(_) => false,
        }
    }
}

/// The peak resident set size (`VmHWM`) of the live process `pid`, in KiB;
/// `None` when it cannot be read (the process is gone).
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_returns_the_first_ok() {
        let mut calls = 0;
        let got = wait_until(
            "the third call",
            Duration::from_secs(5),
            Duration::from_millis(1),
            || {
                calls += 1;
                if calls >= 3 { Ok(calls) } else { Err(calls) }
            },
        );
        assert_eq!(got, 3);
    }

    #[test]
    fn wait_until_panics_with_the_last_observation() {
        let outcome = std::panic::catch_unwind(|| {
            wait_until(
                "never",
                Duration::from_millis(30),
                Duration::from_millis(5),
                || Err::<(), _>("still 7"),
            )
        });
        let payload = match outcome {
            Ok(()) => panic!("wait_until returned for a check that never passes"),
            Err(payload) => payload,
        };
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        assert!(message.contains("never"), "{message}");
        assert!(message.contains("still 7"), "{message}");
    }

    #[test]
    fn run_bounded_captures_output_and_status() {
        let output = run_bounded(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 4"]),
            Duration::from_secs(10),
        );
        assert_eq!(output.status.code(), Some(4));
        assert_eq!(text(&output.stdout), "out\n");
        assert_eq!(text(&output.stderr), "err\n");
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail_lines("a", 5), "a");
    }
}
