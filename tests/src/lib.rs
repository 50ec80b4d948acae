//! Harness for the adce end-to-end tests: it finds the built binaries, makes
//! temporary directories and configs, starts `adce-server` and `adce-agent`
//! as real processes on loopback ports (and always stops them by pid), runs
//! `adcectl` and parses its `--json` output, and polls with bounded waits.
//! For S3 lakes it starts `moto_server` from the project venv and drives an
//! independent boto3 client (`tests/py/s3.py`) against it. [`raw_agent`] is a
//! hand-made agent for tests that need to misbehave where the real one never
//! does.
//!
//! Architecture invariant: every process the harness starts is owned by a
//! value whose `Drop` kills it by its own pid, and every wait is bounded in
//! both count and time.

pub mod pki;
pub mod raw_agent;

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
use serde_json::Value;
use tempfile::TempDir;

/// How long a started server may take to answer its health check with SERVING.
pub const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `terminate()` waits for a process to exit after SIGTERM.
pub const TERMINATE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one `adcectl` (or other short-lived tool) run may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How many trailing log lines a failing test prints per process.
pub const LOG_TAIL_LINES: usize = 80;
/// Interval between health probes while a server starts.
const READY_POLL: Duration = Duration::from_millis(100);
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

/// Directory of the test scraper scripts shipped with this crate.
pub fn scrapers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scrapers")
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

/// The head of a test config: fast timings (heartbeat 500 ms, lease TTL 3 s,
/// queue checks every 200 ms, reconcile on start and when the queue drains),
/// state in `state/` and the lake in `lake/` next to the config file. Tests
/// append their own `scrapers:` and `sources:` sections.
pub fn base_config(listen: SocketAddr) -> String {
    config_head(listen, "lake:\n  local:\n    root: lake\n")
}

/// Like [`base_config`] but with the lake on S3 (`lake` is the YAML of
/// [`MotoServer::lake_yaml`]); tests append `scrapers:` and `sources:`.
pub fn s3_config(listen: SocketAddr, lake: &str) -> String {
    config_head(listen, lake)
}

/// The fast-timing head of a test config around a `lake:` section.
fn config_head(listen: SocketAddr, lake: &str) -> String {
    format!(
        "version: 1
server:
  listen: {listen}
  state_dir: state
  heartbeat_interval: 500ms
  lease_ttl: 3s
{lake}loop:
  enabled: true
  reconcile_interval: 1h
  queue_check_interval: 200ms
"
    )
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

/// Asks `grpc.health.v1.Health/Check` for `service` once; `Ok(status name)`.
pub fn health_check(addr: SocketAddr, service: &str) -> Result<String, String> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot build a runtime: {e}"))?;
    runtime.block_on(async {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5));
        let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .map_err(|status| status.to_string())?;
        let status = ServingStatus::try_from(reply.into_inner().status)
            .map_err(|e| format!("unknown serving status: {e}"))?;
        Ok(status.as_str_name().to_string())
    })
}

/// A running `adce-server`.
#[derive(Debug)]
pub struct ServerProc {
    proc: Proc,
    addr: SocketAddr,
}

impl ServerProc {
    /// Starts `adce-server --config FILE --listen ADDR` (logs in the config's
    /// directory) and waits until it is SERVING.
    pub fn start(config: &Path, listen: SocketAddr) -> ServerProc {
        let log_dir = config.parent().unwrap_or_else(|| Path::new("."));
        let args: Vec<OsString> = vec![
            "--config".into(),
            config.as_os_str().to_owned(),
            "--listen".into(),
            listen.to_string().into(),
        ];
        ServerProc::start_with_args(&args, listen, log_dir)
    }

    /// Like [`ServerProc::start`] with extra environment variables for the
    /// server (e.g. [`MotoServer::aws_env`]).
    pub fn start_with_env(config: &Path, listen: SocketAddr, envs: &[(&str, &str)]) -> ServerProc {
        let log_dir = config.parent().unwrap_or_else(|| Path::new("."));
        let args: Vec<OsString> = vec![
            "--config".into(),
            config.as_os_str().to_owned(),
            "--listen".into(),
            listen.to_string().into(),
        ];
        ServerProc::start_with_args_env(&args, listen, log_dir, envs)
    }

    /// Starts `adce-server --dev --data-dir DIR --listen ADDR` (logs in `log_dir`)
    /// and waits until it is SERVING.
    pub fn start_dev(data_dir: &Path, listen: SocketAddr, log_dir: &Path) -> ServerProc {
        let args: Vec<OsString> = vec![
            "--dev".into(),
            "--data-dir".into(),
            data_dir.as_os_str().to_owned(),
            "--listen".into(),
            listen.to_string().into(),
        ];
        ServerProc::start_with_args(&args, listen, log_dir)
    }

    /// Starts `adce-server ARGS` that listens on `listen` and waits (bounded)
    /// until the health check of `""` answers SERVING.
    pub fn start_with_args(args: &[OsString], listen: SocketAddr, log_dir: &Path) -> ServerProc {
        ServerProc::start_with_args_env(args, listen, log_dir, &[])
    }

    /// [`ServerProc::start_with_args`] with extra environment variables.
    pub fn start_with_args_env(
        args: &[OsString],
        listen: SocketAddr,
        log_dir: &Path,
        envs: &[(&str, &str)],
    ) -> ServerProc {
        let mut all_envs = vec![("RUST_LOG", "info,adce_server=debug")];
        all_envs.extend_from_slice(envs);
        let proc = Proc::spawn(
            "adce-server",
            &bin("adce-server"),
            args,
            &all_envs,
            log_dir,
            Some(log_dir),
        );
        let mut server = ServerProc { proc, addr: listen };
        server.wait_serving();
        server
    }

    fn wait_serving(&mut self) {
        let started = Instant::now();
        let max_polls = SERVER_READY_TIMEOUT.as_millis() / READY_POLL.as_millis() + 1;
        let mut last = String::new();
        for _ in 0..max_polls {
            if let Some(status) = self.proc.try_exit() {
                panic!(
                    "adce-server exited during start-up with {status}; log tail:\n{}",
                    tail_lines(&self.proc.log(), LOG_TAIL_LINES)
                );
            }
            match health_check(self.addr, "") {
                Ok(status) if status == "SERVING" => return,
                Ok(status) => last = status,
                Err(e) => last = e,
            }
            if started.elapsed() >= SERVER_READY_TIMEOUT {
                break;
            }
            thread::sleep(READY_POLL);
        }
        panic!(
            "adce-server on {} not SERVING within {SERVER_READY_TIMEOUT:?} (last: {last}); log tail:\n{}",
            self.addr,
            tail_lines(&self.proc.log(), LOG_TAIL_LINES)
        );
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The process.
    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// Everything the server logged so far.
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

    /// Runs `adcectl --server URL ARGS`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        ctl(&self.url(), args)
    }

    /// Runs `adcectl --server URL --json ARGS` and parses stdout.
    pub fn ctl_json(&self, args: &[&str]) -> Value {
        ctl_json(&self.url(), args)
    }

    /// `adcectl status --json`.
    pub fn status(&self) -> Value {
        status(&self.url())
    }
}

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

/// Runs `adcectl --server URL ARGS` (bounded by [`COMMAND_TIMEOUT`]).
pub fn ctl(url: &str, args: &[&str]) -> Output {
    let mut command = Command::new(bin("adcectl"));
    command
        .arg("--server")
        .arg(url)
        .args(args)
        .env_remove("ADCE_SERVER");
    run_bounded(&mut command, COMMAND_TIMEOUT)
}

/// Runs `adcectl --server URL --json ARGS` and parses stdout as one JSON
/// value; panics with stderr when it fails.
pub fn ctl_json(url: &str, args: &[&str]) -> Value {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let output = ctl(url, &full);
    if !output.status.success() {
        panic!(
            "adcectl --json {} failed with {}:\nstderr: {}\nstdout: {}",
            args.join(" "),
            output.status,
            text(&output.stderr),
            text(&output.stdout)
        );
    }
    match serde_json::from_slice(&output.stdout) {
        Ok(value) => value,
        Err(e) => panic!(
            "adcectl --json {} printed invalid JSON ({e}):\n{}",
            args.join(" "),
            text(&output.stdout)
        ),
    }
}

/// Like [`ctl_json`] but returns the failure instead of panicking, for
/// polling a server that may be restarting.
pub fn try_ctl_json(url: &str, args: &[&str]) -> Result<Value, String> {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let output = ctl(url, &full);
    if !output.status.success() {
        return Err(format!(
            "adcectl exited with {}: {}",
            output.status,
            text(&output.stderr).trim()
        ));
    }
    serde_json::from_slice(&output.stdout).map_err(|e| format!("invalid JSON ({e})"))
}

/// `adcectl status --json`.
pub fn status(url: &str) -> Value {
    ctl_json(url, &["status"])
}

/// `coverage.percent` of a status object (NaN when absent, so comparisons fail).
pub fn coverage_percent(status: &Value) -> f64 {
    status["coverage"]["percent"].as_f64().unwrap_or(f64::NAN)
}

/// A non-negative integer at a JSON pointer (e.g. `/tasks/done`), 0 when absent.
pub fn count(value: &Value, pointer: &str) -> u64 {
    value.pointer(pointer).and_then(Value::as_u64).unwrap_or(0)
}

/// Whether a status shows a full lake and an idle queue: coverage 100 %,
/// nothing missing, nothing pending or leased.
pub fn lake_complete(status: &Value) -> bool {
    coverage_percent(status) >= 100.0
        && count(status, "/coverage/missing") == 0
        && count(status, "/coverage/too_small") == 0
        && count(status, "/tasks/pending") == 0
        && count(status, "/tasks/leased") == 0
}

/// The tasks of `adcectl tasks --all --json [EXTRA]`.
pub fn all_tasks(url: &str, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["tasks", "--all"];
    args.extend_from_slice(extra);
    match ctl_json(url, &args) {
        Value::Array(tasks) => tasks,
        other => panic!("adcectl tasks --json did not print an array: {other}"),
    }
}

/// A JSON string or number as text ("" for anything else).
pub fn json_text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Number(number) => number.to_string(),
        _ => String::new(),
    }
}

/// A task's id from a task JSON object (a number, or a string), as text.
pub fn task_id(task: &Value) -> String {
    let id = json_text(&task["id"]);
    if id.is_empty() {
        panic!("task without an id: {task}");
    }
    id
}

/// The `task` object of `adcectl task ID --json`, or a tasks list entry,
/// state as a string ("" when absent).
pub fn state_of(task: &Value) -> &str {
    task["state"].as_str().unwrap_or_default()
}

/// How long [`wait_only_task`] waits.
pub const TASK_STATE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often [`wait_only_task`] looks.
const TASK_STATE_POLL: Duration = Duration::from_millis(100);

/// Waits (bounded) until the server at `url` has exactly one task and it is
/// in `state`; returns it.
pub fn wait_only_task(url: &str, state: &str) -> Value {
    wait_until(
        &format!("the task {state}"),
        TASK_STATE_TIMEOUT,
        TASK_STATE_POLL,
        || {
            let tasks = all_tasks(url, &[]);
            match tasks.as_slice() {
                [task] if state_of(task) == state => Ok(task.clone()),
                _ => Err(tasks),
            }
        },
    )
}

/// How many of the server's tasks are in `state`.
pub fn count_state(url: &str, state: &str) -> usize {
    all_tasks(url, &[])
        .iter()
        .filter(|t| state_of(t) == state)
        .count()
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

/// Every entry of `adcectl logs --json --tail N [EXTRA]`, one JSON object per line.
pub fn log_entries(url: &str, tail: usize, extra: &[&str]) -> Vec<Value> {
    let tail = tail.to_string();
    let mut args = vec!["--json", "logs", "--tail", tail.as_str()];
    args.extend_from_slice(extra);
    let output = ctl(url, &args);
    if !output.status.success() {
        panic!(
            "adcectl logs --json failed with {}: {}",
            output.status,
            text(&output.stderr)
        );
    }
    text(&output.stdout)
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("adcectl logs --json printed a bad line ({e}): {line}"))
        })
        .collect()
}

/// How long a started moto_server may take to answer HTTP.
pub const MOTO_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How many ports a moto_server start tries (a free port can be taken by
/// another test between picking and binding it).
const MOTO_START_ATTEMPTS: usize = 3;
/// How long one HTTP probe of moto_server may take.
const MOTO_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// The S3 client helper run with the venv's python.
const S3_SCRIPT: &str = "py/s3.py";
/// The exit code of `s3.py get` for a missing object.
const S3_MISSING_EXIT: i32 = 4;

/// The AWS environment moto, boto3 and `adce-server` get in the tests: static
/// test credentials, region `us-east-1`, and no instance-metadata lookups.
pub const AWS_TEST_ENV: [(&str, &str); 5] = [
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_DEFAULT_REGION", "us-east-1"),
    ("AWS_REGION", "us-east-1"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

/// A running `moto_server` (the S3-compatible server from the project venv)
/// on a loopback port, with an independent boto3 client (`tests/py/s3.py`)
/// to look at and change its buckets. Killed by its pid at drop.
#[derive(Debug)]
pub struct MotoServer {
    proc: Proc,
    port: u16,
    dir: TestDir,
}

impl MotoServer {
    /// Starts `$ADCE_TEST_VENV/bin/moto_server -H 127.0.0.1 -p PORT` on a
    /// free port and waits (bounded) until it answers HTTP.
    pub fn start() -> MotoServer {
        let dir = TestDir::new();
        let program = venv_tool("moto_server");
        let mut failures = Vec::new();
        for attempt in 0..MOTO_START_ATTEMPTS {
            let port = free_port();
            let args: Vec<OsString> = vec![
                "-H".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string().into(),
            ];
            let mut proc = Proc::spawn(
                &format!("moto-{attempt}"),
                &program,
                &args,
                &AWS_TEST_ENV,
                dir.path(),
                Some(dir.path()),
            );
            match wait_http(&mut proc, port) {
                Ok(()) => return MotoServer { proc, port, dir },
                Err(e) => {
                    proc.kill();
                    failures.push(format!("port {port}: {e}"));
                }
            }
        }
        panic!("moto_server did not start: {failures:#?}");
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The environment `adce-server` needs to reach this moto (for
    /// [`ServerProc::start_with_env`]).
    pub fn aws_env(&self) -> &'static [(&'static str, &'static str)] {
        &AWS_TEST_ENV
    }

    /// The process.
    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// The `lake:` section of a config for bucket `bucket` under `prefix` on
    /// this moto, reading S3 Inventory reports per `inventory` when given.
    pub fn lake_yaml(
        &self,
        bucket: &str,
        prefix: &str,
        inventory: Option<&adce_server::config::InventoryConfig>,
    ) -> String {
        let mut yaml = format!(
            "lake:
  s3:
    bucket: {bucket}
    prefix: \"{prefix}\"
    region: us-east-1
    endpoint: \"{endpoint}\"
    force_path_style: true
",
            endpoint = self.endpoint()
        );
        if let Some(inv) = inventory {
            yaml.push_str(&format!(
                "    inventory: {{bucket: {}, prefix: \"{}\", config_id: {}}}\n",
                inv.bucket, inv.prefix, inv.config_id
            ));
        }
        yaml
    }

    /// Runs `python tests/py/s3.py ENDPOINT ARGS` (bounded) with the test
    /// credentials.
    pub fn s3(&self, args: &[&str]) -> Output {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(S3_SCRIPT);
        let mut command = Command::new(venv_tool("python"));
        command.arg(script).arg(self.endpoint()).args(args);
        for (key, value) in AWS_TEST_ENV {
            command.env(key, value);
        }
        run_bounded(&mut command, COMMAND_TIMEOUT)
    }

    /// Like [`MotoServer::s3`] but panics with stderr when it fails; stdout.
    pub fn s3_ok(&self, args: &[&str]) -> Vec<u8> {
        let output = self.s3(args);
        if !output.status.success() {
            panic!(
                "s3.py {} failed with {}:\n{}",
                args.join(" "),
                output.status,
                text(&output.stderr)
            );
        }
        output.stdout
    }

    /// Creates a bucket.
    pub fn create_bucket(&self, name: &str) {
        self.s3_ok(&["create-bucket", name]);
    }

    /// `(key, size)` of every object under `prefix`, sorted by key.
    pub fn list(&self, bucket: &str, prefix: &str) -> Vec<(String, u64)> {
        let stdout = self.s3_ok(&["list", bucket, prefix]);
        let listed: Value = serde_json::from_slice(&stdout)
            .unwrap_or_else(|e| panic!("s3.py list printed invalid JSON ({e}): {}", text(&stdout)));
        let mut out: Vec<(String, u64)> = listed
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|o| (json_text(&o["key"]), o["size"].as_u64().unwrap_or(u64::MAX)))
            .collect();
        out.sort();
        out
    }

    /// Every object under `prefix` with its bytes, read back one by one.
    pub fn dump(&self, bucket: &str, prefix: &str) -> std::collections::BTreeMap<String, Vec<u8>> {
        let stdout = self.s3_ok(&["dump", bucket, prefix]);
        let dumped: Value = serde_json::from_slice(&stdout)
            .unwrap_or_else(|e| panic!("s3.py dump printed invalid JSON ({e}): {}", text(&stdout)));
        let Value::Object(objects) = dumped else {
            panic!("s3.py dump did not print an object: {}", text(&stdout));
        };
        objects
            .into_iter()
            .map(|(key, o)| {
                let body = decode_hex(o["body_hex"].as_str().unwrap_or_default())
                    .unwrap_or_else(|| panic!("s3.py dump gave bad hex for {key}"));
                (key, body)
            })
            .collect()
    }

    /// An object's bytes, or `None` when it does not exist.
    pub fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let output = self.s3(&["get", bucket, key]);
        match output.status.code() {
            Some(0) => Some(output.stdout),
            Some(S3_MISSING_EXIT) => None,
            _ => panic!(
                "s3.py get {bucket} {key} failed with {}:\n{}",
                output.status,
                text(&output.stderr)
            ),
        }
    }

    /// Writes an object.
    pub fn put(&self, bucket: &str, key: &str, bytes: &[u8]) {
        let file = match tempfile::NamedTempFile::new_in(self.dir.path()) {
            Ok(file) => file,
            Err(e) => panic!("cannot create a temporary file for {key}: {e}"),
        };
        write_file(file.path(), bytes);
        self.s3_ok(&["put", bucket, key, &file.path().to_string_lossy()]);
    }

    /// Deletes objects.
    pub fn delete(&self, bucket: &str, keys: &[&str]) {
        let mut args = vec!["delete", bucket];
        args.extend_from_slice(keys);
        self.s3_ok(&args);
    }

    /// Uploads every file under `dir`, keyed by its path relative to `dir`;
    /// returns how many.
    pub fn upload_dir(&self, bucket: &str, dir: &Path) -> u64 {
        let stdout = self.s3_ok(&["upload-dir", bucket, &dir.to_string_lossy()]);
        text(&stdout)
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("s3.py upload-dir printed {:?} ({e})", text(&stdout)))
    }

    /// Writes an S3 Inventory report into `bucket` (through a local
    /// directory and [`MotoServer::upload_dir`]); returns its directory's key
    /// prefix.
    pub fn upload_report(
        &self,
        bucket: &str,
        report: adce_server::lake::inventory::testing::ReportBuilder,
    ) -> String {
        let staging = match tempfile::Builder::new()
            .prefix("report-")
            .tempdir_in(self.dir.path())
        {
            Ok(dir) => dir,
            Err(e) => panic!("cannot create a staging directory: {e}"),
        };
        let dir = match report.write_to(staging.path()) {
            Ok(dir) => dir,
            Err(e) => panic!("cannot write the inventory report: {e}"),
        };
        let uploaded = self.upload_dir(bucket, staging.path());
        assert!(uploaded > 0, "the inventory report had no files");
        dir
    }

    /// Keys of the multipart uploads started and neither completed nor aborted.
    pub fn multipart_uploads(&self, bucket: &str) -> Vec<String> {
        let stdout = self.s3_ok(&["multipart-uploads", bucket]);
        let keys: Value = serde_json::from_slice(&stdout).unwrap_or_else(|e| {
            panic!(
                "s3.py multipart-uploads printed invalid JSON ({e}): {}",
                text(&stdout)
            )
        });
        keys.as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(json_text)
            .collect()
    }
}

/// Waits (bounded) until something on `127.0.0.1:port` answers an HTTP
/// request, failing early when `proc` exits.
fn wait_http(proc: &mut Proc, port: u16) -> Result<(), String> {
    use std::io::Write;
    use std::net::TcpStream;

    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let started = Instant::now();
    let max_polls = MOTO_READY_TIMEOUT.as_millis() / READY_POLL.as_millis() + 1;
    let mut last = String::from("no probe yet");
    for _ in 0..max_polls {
        if let Some(status) = proc.try_exit() {
            return Err(format!(
                "exited with {status}; log tail:\n{}",
                tail_lines(&proc.log(), LOG_TAIL_LINES)
            ));
        }
        let probe = TcpStream::connect_timeout(&addr, MOTO_PROBE_TIMEOUT).and_then(|mut stream| {
            stream.set_read_timeout(Some(MOTO_PROBE_TIMEOUT))?;
            stream.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
            let mut head = [0_u8; 8];
            stream.read_exact(&mut head)?;
            Ok(head)
        });
        match probe {
            Ok(head) if head.starts_with(b"HTTP/1.") => return Ok(()),
            Ok(head) => last = format!("unexpected answer {:?}", text(&head)),
            Err(e) => last = e.to_string(),
        }
        if started.elapsed() >= MOTO_READY_TIMEOUT {
            break;
        }
        thread::sleep(READY_POLL);
    }
    Err(format!(
        "no HTTP answer within {MOTO_READY_TIMEOUT:?} (last: {last})"
    ))
}

/// Bytes from lowercase or uppercase hex; `None` for anything else.
pub fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if hex.len() % 2 != 0 {
        return None;
    }
    hex.as_bytes()
        .chunks(2)
        .map(|pair| {
            let digits = std::str::from_utf8(pair).ok()?;
            u8::from_str_radix(digits, 16).ok()
        })
        .collect()
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
    fn lake_complete_needs_full_coverage_and_idle_queue() {
        let done = serde_json::json!({
            "coverage": {"percent": 100.0, "missing": 0, "too_small": 0},
            "tasks": {"pending": 0, "leased": 0, "done": 3}
        });
        assert!(lake_complete(&done));
        assert_eq!(coverage_percent(&done), 100.0);
        let leased = serde_json::json!({
            "coverage": {"percent": 100.0, "missing": 0, "too_small": 0},
            "tasks": {"pending": 0, "leased": 1}
        });
        assert!(!lake_complete(&leased));
        let partial = serde_json::json!({
            "coverage": {"percent": 99.5, "missing": 1},
            "tasks": {"pending": 0, "leased": 0}
        });
        assert!(!lake_complete(&partial));
        assert!(coverage_percent(&serde_json::json!({})).is_nan());
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
    fn decode_hex_round_trips_and_refuses_garbage() {
        assert_eq!(decode_hex("00ff7F"), Some(vec![0, 255, 127]));
        assert_eq!(decode_hex(""), Some(Vec::new()));
        assert_eq!(decode_hex("abc"), None);
        assert_eq!(decode_hex("zz"), None);
    }

    #[test]
    fn s3_config_puts_the_lake_section_in_place() {
        let listen = SocketAddr::from(([127, 0, 0, 1], 7000));
        let config = s3_config(listen, "lake:\n  s3:\n    bucket: b\n");
        assert!(
            config.contains("lease_ttl: 3s\nlake:\n  s3:\n    bucket: b\nloop:\n"),
            "{config}"
        );
        assert!(base_config(listen).contains("lake:\n  local:\n    root: lake\nloop:\n"));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail_lines("a", 5), "a");
    }
}
