//! The systemd side of deployment: the units in `deploy/` pass
//! `systemd-analyze verify`, carry the operational settings the install notes
//! promise, and start the real binaries with flags they accept; and the real
//! `adce-server` and `adce-agent` speak the notify protocol to a socket the
//! test binds as systemd would (READY=1, WATCHDOG=1, STOPPING=1).

use std::ffi::OsString;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use adce_server::config::DEFAULT_SHUTDOWN_GRACE;
use adce_tests::{
    COMMAND_TIMEOUT, Proc, ServerProc, TERMINATE_TIMEOUT, TestDir, bin, free_addr, run_bounded,
    text, wait_until,
};
use nix::sys::signal::Signal;

/// The units this repository ships.
const UNITS: [&str; 2] = ["adce-server.service", "adce-agent.service"];
/// Where the units install the binaries; the tests swap in the built ones.
const INSTALLED_BIN_DIR: &str = "/usr/local/bin";
/// The watchdog timeout the notify tests give the binaries: pings every 200 ms.
const TEST_WATCHDOG_USEC: &str = "400000";
/// How long a notification may take to arrive.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one blocking receive waits before the deadline is checked again.
const RECV_POLL: Duration = Duration::from_millis(200);
/// The most notifications one wait reads before giving up.
const MAX_NOTIFICATIONS: usize = 10_000;
/// Interval between exit checks after SIGTERM.
const EXIT_POLL: Duration = Duration::from_millis(50);

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read_unit(name: &str) -> String {
    let path = deploy_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// `(section, key, value)` of every directive in a unit file, in order.
fn directives(unit: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
        } else if let Some((key, value)) = line.split_once('=') {
            out.push((
                section.clone(),
                key.trim().to_string(),
                value.trim().to_string(),
            ));
        } else {
            panic!("not a directive in a unit file: {line:?}");
        }
    }
    out
}

/// The one value of `key` in `[Service]`; panics when absent or repeated.
fn service_value(unit_name: &str, key: &str) -> String {
    let values: Vec<String> = directives(&read_unit(unit_name))
        .into_iter()
        .filter(|(section, k, _)| section == "Service" && k == key)
        .map(|(_, _, value)| value)
        .collect();
    match values.as_slice() {
        [value] => value.clone(),
        _ => panic!("{unit_name}: expected one [Service] {key}=, found {values:?}"),
    }
}

/// The program and arguments of a unit's `ExecStart=`.
fn exec_start(unit_name: &str) -> Vec<String> {
    service_value(unit_name, "ExecStart")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// The built binary a unit's installed path names.
fn built_binary(installed: &str) -> PathBuf {
    let name = installed
        .strip_prefix(INSTALLED_BIN_DIR)
        .and_then(|rest| rest.strip_prefix('/'))
        .unwrap_or_else(|| panic!("ExecStart {installed} is not under {INSTALLED_BIN_DIR}"));
    bin(name)
}

/// Finds `program` on PATH.
fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// A `systemd-analyze` seconds value such as `120s` or `2min`.
fn unit_seconds(value: &str) -> u64 {
    let parsed = if let Some(minutes) = value.strip_suffix("min") {
        minutes.parse::<u64>().map(|m| m * 60)
    } else {
        value.strip_suffix('s').unwrap_or(value).parse::<u64>()
    };
    parsed.unwrap_or_else(|e| panic!("not a plain seconds value {value:?}: {e}"))
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let Some(analyze) = on_path("systemd-analyze") else {
        panic!(
            "systemd-analyze not found on PATH: this test checks deploy/*.service with it; \
             install systemd (scripts/test.sh does when run as root: \
             apt-get install -y --no-install-recommends systemd)"
        );
    };
    // `verify` insists that ExecStart= names an existing executable, so check
    // copies that start the binaries this workspace built.
    let dir = TestDir::new();
    for name in UNITS {
        let unit = read_unit(name);
        let program = exec_start(name)
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("{name}: empty ExecStart"));
        let built = built_binary(&program);
        let rewritten = unit.replace(&program, &built.display().to_string());
        assert_ne!(rewritten, unit, "{name}: ExecStart not rewritten");
        dir.write(name, rewritten);
    }
    let output = run_bounded(
        Command::new(&analyze)
            .arg("verify")
            .args(UNITS.iter().map(|name| dir.join(name)))
            .current_dir(dir.path())
            .env("SYSTEMD_LOG_COLOR", "0"),
        COMMAND_TIMEOUT,
    );
    let report = format!("{}{}", text(&output.stdout), text(&output.stderr));
    assert!(
        output.status.success(),
        "systemd-analyze verify failed ({}):\n{report}",
        output.status
    );
    // Bad values and unknown keys are only warnings (exit 0): any line about
    // our units is a defect.
    let complaints: Vec<&str> = report
        .lines()
        .filter(|line| UNITS.iter().any(|name| line.contains(name)))
        .collect();
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify complains:\n{}",
        complaints.join("\n")
    );
}

#[test]
fn units_carry_the_operational_settings() {
    for name in UNITS {
        for (key, want) in [
            ("Type", "notify"),
            ("NotifyAccess", "main"),
            ("WatchdogSec", "30s"),
            ("Restart", "on-failure"),
            ("RestartSec", "5s"),
            ("User", "adce"),
            ("Group", "adce"),
            ("DynamicUser", "no"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "true"),
            ("NoNewPrivileges", "true"),
            ("PrivateTmp", "true"),
            ("KillMode", "mixed"),
            ("EnvironmentFile", "-/etc/adce/adce.env"),
        ] {
            assert_eq!(service_value(name, key), want, "{name}: {key}=");
        }
        // Secrets come from the environment file only.
        let inline: Vec<String> = directives(&read_unit(name))
            .into_iter()
            .filter(|(_, key, _)| key == "Environment")
            .map(|(_, _, value)| value)
            .collect();
        assert!(inline.is_empty(), "{name}: inline Environment= {inline:?}");
        // systemd must not kill the process before its own shutdown is over.
        let stop = unit_seconds(&service_value(name, "TimeoutStopSec"));
        assert!(
            stop > DEFAULT_SHUTDOWN_GRACE.as_secs(),
            "{name}: TimeoutStopSec={stop}s is not above the shutdown grace {DEFAULT_SHUTDOWN_GRACE:?}"
        );
    }
    let server = "adce-server.service";
    assert_eq!(service_value(server, "StateDirectory"), "adce");
    assert_eq!(service_value(server, "MemoryMax"), "2G");
    assert_eq!(
        service_value(server, "ExecReload"),
        "/bin/kill -HUP $MAINPID"
    );
    let agent = "adce-agent.service";
    assert_eq!(service_value(agent, "StateDirectory"), "adce-agent");
    assert_eq!(service_value(agent, "MemoryMax"), "4G");
    let agent_args = exec_start(agent);
    let work_dir = agent_args
        .iter()
        .position(|arg| arg == "--work-dir")
        .and_then(|i| agent_args.get(i + 1))
        .unwrap_or_else(|| panic!("{agent}: no --work-dir in {agent_args:?}"));
    assert!(
        work_dir.starts_with("/var/lib/adce-agent/"),
        "{agent}: the work dir {work_dir} is outside its StateDirectory"
    );
}

#[test]
fn exec_start_flags_are_accepted_by_the_binaries() {
    // The server's command line, with the example config in place of
    // /etc/adce/adce.yaml, passes --check-config.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/example.yaml");
    let server_args = exec_start("adce-server.service");
    let (program, args) = server_args
        .split_first()
        .unwrap_or_else(|| panic!("adce-server.service: empty ExecStart"));
    assert!(
        args.iter().any(|arg| arg == "/etc/adce/adce.yaml"),
        "{args:?}"
    );
    let args: Vec<OsString> = args
        .iter()
        .map(|arg| {
            if arg == "/etc/adce/adce.yaml" {
                example.clone().into_os_string()
            } else {
                arg.into()
            }
        })
        .collect();
    let output = run_bounded(
        Command::new(built_binary(program))
            .args(&args)
            .arg("--check-config"),
        COMMAND_TIMEOUT,
    );
    assert!(
        output.status.success() && text(&output.stdout).starts_with("config ok"),
        "adce-server {args:?} --check-config: {}\n{}{}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );

    // The agent's flags parse (clap rejects a bad flag or value before it
    // reaches --help).
    let agent_args = exec_start("adce-agent.service");
    let (program, args) = agent_args
        .split_first()
        .unwrap_or_else(|| panic!("adce-agent.service: empty ExecStart"));
    let output = run_bounded(
        Command::new(built_binary(program)).args(args).arg("--help"),
        COMMAND_TIMEOUT,
    );
    assert!(
        output.status.success(),
        "adce-agent {args:?} --help: {}\n{}",
        output.status,
        text(&output.stderr)
    );
}

/// A notify socket as systemd binds it: the process under test sends
/// datagrams of `KEY=VALUE` lines to it.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    fn bind(dir: &TestDir) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path)
            .unwrap_or_else(|e| panic!("cannot bind {}: {e}", path.display()));
        if let Err(e) = socket.set_read_timeout(Some(RECV_POLL)) {
            panic!("cannot set a read timeout: {e}");
        }
        NotifySocket { socket, path }
    }

    fn env_value(&self) -> &str {
        self.path
            .to_str()
            .unwrap_or_else(|| panic!("socket path {} is not UTF-8", self.path.display()))
    }

    /// Reads notifications until one has the line `wanted`; returns every
    /// line read, in order. Bounded by [`NOTIFY_TIMEOUT`] and
    /// [`MAX_NOTIFICATIONS`].
    fn wait_for(&self, wanted: &str, proc: &mut Proc) -> Vec<String> {
        let started = Instant::now();
        let mut seen = Vec::new();
        let mut buf = [0_u8; 4096];
        for _ in 0..MAX_NOTIFICATIONS {
            match self.socket.recv(&mut buf) {
                Ok(len) => {
                    let message = String::from_utf8_lossy(&buf[..len]).into_owned();
                    let before = seen.len();
                    seen.extend(message.lines().map(str::to_string));
                    if seen[before..].iter().any(|line| line == wanted) {
                        return seen;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("cannot receive from {}: {e}", self.path.display()),
            }
            if let Some(status) = proc.try_exit() {
                panic!("the process exited ({status}) before sending {wanted}; received {seen:?}");
            }
            if started.elapsed() >= NOTIFY_TIMEOUT {
                break;
            }
        }
        panic!("no {wanted} within {NOTIFY_TIMEOUT:?}; received {seen:?}");
    }
}

/// Waits (bounded) for `proc` to exit on its own.
fn wait_exit(proc: &mut Proc) -> ExitStatus {
    wait_until("the process to exit", TERMINATE_TIMEOUT, EXIT_POLL, || {
        proc.try_exit().ok_or("still running")
    })
}

/// The notifications of a supervised run: READY=1 first, then watchdog pings,
/// then STOPPING=1 after SIGTERM and a clean exit.
fn check_notify_lifecycle(socket: &NotifySocket, proc: &mut Proc) {
    let start = socket.wait_for("READY=1", proc);
    assert_eq!(
        start.first().map(String::as_str),
        Some("READY=1"),
        "READY=1 is the first notification: {start:?}"
    );
    socket.wait_for("WATCHDOG=1", proc);
    // The watchdog keeps being fed, not pinged once.
    socket.wait_for("WATCHDOG=1", proc);

    proc.signal(Signal::SIGTERM);
    let stop = socket.wait_for("STOPPING=1", proc);
    assert!(
        stop.iter()
            .all(|line| line == "WATCHDOG=1" || line == "STOPPING=1"),
        "unexpected notifications while stopping: {stop:?}"
    );
    let status = wait_exit(proc);
    assert_eq!(status.code(), Some(0), "exit after one SIGTERM: {status}");
}

#[test]
fn server_notifies_ready_watchdog_and_stopping() {
    let dir = TestDir::new();
    let socket = NotifySocket::bind(&dir);
    let listen = free_addr();
    let args: Vec<OsString> = vec![
        "--dev".into(),
        "--data-dir".into(),
        dir.join("dev").into_os_string(),
        "--listen".into(),
        listen.to_string().into(),
    ];
    let mut server = ServerProc::start_with_args_env(
        &args,
        listen,
        dir.path(),
        &[
            ("NOTIFY_SOCKET", socket.env_value()),
            ("WATCHDOG_USEC", TEST_WATCHDOG_USEC),
        ],
    );
    check_notify_lifecycle(&socket, server.proc());
}

#[test]
fn agent_notifies_ready_watchdog_and_stopping() {
    let dir = TestDir::new();
    let socket = NotifySocket::bind(&dir);
    // No server listens there: the agent is ready once started and keeps
    // reconnecting by itself.
    let server = format!("http://{}", free_addr());
    let work_dir = dir.join("work");
    let args: Vec<OsString> = vec![
        "--server".into(),
        server.into(),
        "--id".into(),
        "notify-agent".into(),
        "--work-dir".into(),
        work_dir.into_os_string(),
    ];
    let mut agent = Proc::spawn(
        "adce-agent",
        &bin("adce-agent"),
        &args,
        &[
            ("RUST_LOG", "info,adce_agent=debug"),
            ("NOTIFY_SOCKET", socket.env_value()),
            ("WATCHDOG_USEC", TEST_WATCHDOG_USEC),
        ],
        dir.path(),
        Some(dir.path()),
    );
    check_notify_lifecycle(&socket, &mut agent);
}

#[test]
fn without_a_watchdog_nothing_pings_it() {
    // Under systemd without WatchdogSec=, the server reports ready and
    // stopping but sends no WATCHDOG=1.
    let dir = TestDir::new();
    let socket = NotifySocket::bind(&dir);
    let listen = free_addr();
    let args: Vec<OsString> = vec![
        "--dev".into(),
        "--data-dir".into(),
        dir.join("dev").into_os_string(),
        "--listen".into(),
        listen.to_string().into(),
    ];
    let mut server = ServerProc::start_with_args_env(
        &args,
        listen,
        dir.path(),
        &[("NOTIFY_SOCKET", socket.env_value())],
    );
    socket.wait_for("READY=1", server.proc());
    server.proc().signal(Signal::SIGTERM);
    let stop = socket.wait_for("STOPPING=1", server.proc());
    assert_eq!(stop, ["STOPPING=1"], "only STOPPING=1 after READY=1");
    let status = wait_exit(server.proc());
    assert_eq!(status.code(), Some(0), "exit after one SIGTERM: {status}");
}
