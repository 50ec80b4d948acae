//! Benchmark: dispatch through the real `adce-server` (release build) to fake
//! agents that speak the `AgentGateway` protocol over loopback gRPC.
//!
//! `cargo build --release --bins` first, then
//! `cargo run --release -p adce-tests --bin bench_dispatch -- [flags]`.
//! The server runs on 127.0.0.1 with a generated config in a temporary
//! directory (local lake and state dir there, no auth). Its scraper command is
//! never run: `--agents A` fake agents with `--slots S` slots each answer every
//! Assign themselves, keeping all their slots busy at once.
//!
//! Throughput mode (the default) queues exactly `--tasks N` tasks and measures:
//! - tasks completed, the wall time from the first Assign to the server having
//!   judged the last result, and tasks per second;
//! - assign latency (p50, p99, max): the time from an agent sending a Result
//!   (which frees a slot) to that agent receiving its next Assign;
//! - the server's resident memory (VmRSS, VmHWM) at the end, and again after a
//!   restart, idle, with the N tasks stored.
//!
//! With `--mode results` an agent answers each Assign at once with exit 69
//! (data unavailable: the task leaves the queue, nothing is uploaded); with
//! `--mode upload` it uploads ~20 bytes to each expected key through
//! `AgentGateway.Upload`, then answers exit 0.
//!
//! Backlog mode (`--backlog M`) queues M LOW tasks plus one CRITICAL task and
//! measures the first reconcile (server start until all M+1 tasks are
//! queued), the server's memory and state dir size then, the restart time
//! (SIGTERM, start again, until gRPC health says SERVING), and the CRITICAL
//! assign latency in the backlog: one agent with 4 slots answers LOW tasks with
//! exit 69 and the CRITICAL task with exit 1 (it goes dead); the benchmark then
//! retries the CRITICAL task `--retries K` times through `Control.Retry` and
//! measures from each Retry reply to the agent receiving that task's Assign.
//!
//! Prints figures; no assertions on time (see BENCHMARKS.md). Every wait is
//! bounded, and every process started is stopped by its pid, also on error.

use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use adce_proto::v1 as pb;
use adce_proto::v1::agent_gateway_client::AgentGatewayClient;
use adce_proto::v1::control_client::ControlClient;
use adce_proto::v1::server_message::Kind as Out;
use adce_tests::{Proc, free_addr, tail_lines};
use anyhow::{Context, bail};
use clap::Parser;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// How long the server may take to answer its health check with SERVING.
const SERVING_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the health check is polled while the server starts.
const SERVING_POLL: Duration = Duration::from_millis(10);
/// How long the first reconcile may take to queue every task.
const QUEUED_TIMEOUT: Duration = Duration::from_secs(900);
/// How often the server log is read while waiting for the reconcile.
const LOG_POLL: Duration = Duration::from_millis(100);
/// How long the fake agents may take to complete every task.
const RUN_TIMEOUT: Duration = Duration::from_secs(3600);
/// How often progress is looked at while the agents work.
const PROGRESS_POLL: Duration = Duration::from_millis(10);
/// How often Status is polled until the server has judged every result.
const STATUS_POLL: Duration = Duration::from_millis(50);
/// How long the server may take to judge the last results once they are sent.
const JUDGED_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the server idles with the tasks stored before memory is read.
const IDLE: Duration = Duration::from_secs(3);
/// How long the server may take after a restart to finish its first reconcile.
const RECONCILED_TIMEOUT: Duration = Duration::from_secs(900);
/// How long the agent waits for the CRITICAL task's first Assign after a
/// restart (the server reconciles the whole backlog again first).
const FIRST_CRITICAL_TIMEOUT: Duration = Duration::from_secs(900);
/// How long one retried CRITICAL task may take to reach the agent.
const CRITICAL_ASSIGN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the CRITICAL task may take to become dead after its result.
const DEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a fake agent waits for the server's Welcome.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a gRPC connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The shortest heartbeat interval a fake agent uses, whatever Welcome says.
const MIN_HEARTBEAT: Duration = Duration::from_millis(100);
/// Messages a fake agent may have queued towards the server.
const OUTBOUND_CAPACITY: usize = 8192;
/// Partition values per date; more tasks than this are dates × values.
const VALUES_PER_DATE: u64 = 1000;
/// What the fake agents upload to every expected key (21 bytes).
const BODY: &[u8] = b"{\"bench\":\"dispatch\"}\n";
/// The source of the one CRITICAL task in backlog mode.
const CRITICAL_SOURCE: &str = "urgent";
/// Exit code "data unavailable": the task leaves the queue without an upload.
const EXIT_UNAVAILABLE: i32 = 69;
/// Exit code of a failed run: with `max_attempts: 1` the task goes dead.
const EXIT_FAILED: i32 = 1;
/// Slots of the one agent in backlog mode.
const BACKLOG_SLOTS: u32 = 4;

/// Dispatch benchmark of adce-server with fake agents over loopback gRPC.
#[derive(Debug, Parser)]
#[command(name = "bench_dispatch")]
struct Args {
    /// What the fake agents do with each Assign.
    #[arg(long, value_enum, default_value_t = Mode::Upload)]
    mode: Mode,
    /// Fake agents connected at once.
    #[arg(long, default_value_t = 4)]
    agents: u32,
    /// Slots per fake agent (tasks each runs at once).
    #[arg(long, default_value_t = 256)]
    slots: u32,
    /// Tasks queued and completed (throughput mode).
    #[arg(long, default_value_t = 20_000)]
    tasks: u64,
    /// Backlog mode: queue this many LOW tasks plus one CRITICAL task and
    /// measure reconcile, restart and CRITICAL assign latency instead.
    #[arg(long, value_name = "M")]
    backlog: Option<u64>,
    /// Backlog mode: how many times the CRITICAL task is retried and timed.
    #[arg(long, value_name = "K", default_value_t = 200)]
    retries: u32,
    /// The adce-server binary (default: the release build next to this
    /// benchmark's target directory).
    #[arg(long, value_name = "PATH")]
    server_bin: Option<PathBuf>,
    /// Keep the temporary directory (config, state, lake, server logs) and
    /// print its path.
    #[arg(long)]
    keep: bool,
}

/// What a fake agent does with each Assign in throughput mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    /// Answer at once with exit 69 (data unavailable); nothing is uploaded.
    Results,
    /// Upload ~20 bytes to each expected key, then answer exit 0.
    Upload,
}

/// How fake agents answer Assigns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    /// Throughput mode, as `--mode` says.
    Throughput(Mode),
    /// Backlog mode: exit 69 for LOW tasks, exit 1 for the CRITICAL one.
    Backlog,
}

/// A fake agent's answer to one Assign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// Report an exit with this code at once.
    Exit(i32),
    /// Upload every expected key, then report exit 0.
    Upload,
}

impl Policy {
    fn answer(self, assign: &pb::Assign) -> Answer {
        match self {
            Policy::Throughput(Mode::Results) => Answer::Exit(EXIT_UNAVAILABLE),
            Policy::Throughput(Mode::Upload) => Answer::Upload,
            Policy::Backlog if assign.source == CRITICAL_SOURCE => Answer::Exit(EXIT_FAILED),
            Policy::Backlog => Answer::Exit(EXIT_UNAVAILABLE),
        }
    }
}

/// The release `adce-server`: `target/release/adce-server` beside this
/// benchmark's own profile directory, whichever profile the benchmark was
/// built with (unlike the harness's `bin`, which follows the caller's profile).
fn release_server_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let profile_dir = exe
        .parent()
        .context("this executable has no directory")?
        .to_path_buf();
    let target = profile_dir.parent().unwrap_or(&profile_dir);
    let path = target.join("release").join("adce-server");
    if !path.is_file() {
        bail!(
            "{} not found: build it first with `cargo build --release --bins`, or pass --server-bin",
            path.display()
        );
    }
    Ok(path)
}

/// Resident memory of a live process, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, Default)]
struct Memory {
    /// `VmRSS`, in KiB.
    rss_kib: u64,
    /// `VmHWM` (peak resident), in KiB.
    hwm_kib: u64,
}

impl Memory {
    fn of(pid: u32) -> Memory {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        Memory {
            rss_kib: field("VmRSS:"),
            hwm_kib: field("VmHWM:"),
        }
    }
}

impl std::fmt::Display for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VmRSS {:.1} MiB, VmHWM {:.1} MiB",
            self.rss_kib as f64 / 1024.0,
            self.hwm_kib as f64 / 1024.0
        )
    }
}

/// Total size of the regular files under `dir`, in bytes.
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(next) = stack.pop() {
        let Ok(entries) = fs::read_dir(&next) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.metadata() {
                Ok(meta) if meta.is_dir() => stack.push(entry.path()),
                Ok(meta) => total += meta.len(),
                Err(_) => {}
            }
        }
    }
    total
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// The nearest-rank percentile `p` (0..=1) of sorted durations.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// `p50 X ms, p99 Y ms, max Z ms (n samples)`.
fn latency_summary(samples: &mut [Duration]) -> String {
    samples.sort_unstable();
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
        ms(percentile(samples, 0.50)),
        ms(percentile(samples, 0.99)),
        ms(samples.last().copied().unwrap_or_default()),
        samples.len()
    )
}

/// YAML for sources named `name` (and `name_rest` when needed) whose
/// partitions give exactly `count` tasks: up to [`VALUES_PER_DATE`] values,
/// times as many dates as fill whole days, plus a values-only source for the
/// remainder.
fn sources_yaml(name: &str, scraper: &str, priority: &str, count: u64) -> String {
    let per_date = count.clamp(1, VALUES_PER_DATE);
    let days = count / per_date;
    let rest = count % per_date;
    let values = |prefix: &str, n: u64| {
        (0..n)
            .map(|i| format!("{prefix}{i:04}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut yaml = String::new();
    if days > 0 {
        let start = chrono::NaiveDate::from_ymd_opt(2000, 1, 1).unwrap_or_default();
        let end = start + chrono::Duration::days(i64::try_from(days).unwrap_or(i64::MAX) - 1);
        yaml.push_str(&format!(
            "  - name: {name}\n    scraper: {scraper}\n    priority: {priority}\n    partitions:\n      \
             - dates: {{start: {}, end: {}}}\n      - values: {{var: id, values: [{}]}}\n    \
             objects: [\"{name}/{{date:%Y%m%d}}/{{id}}.json\"]\n",
            start.format("%Y-%m-%d"),
            end.format("%Y-%m-%d"),
            values("g", per_date)
        ));
    }
    if rest > 0 {
        yaml.push_str(&format!(
            "  - name: {name}_rest\n    scraper: {scraper}\n    priority: {priority}\n    partitions:\n      \
             values: {{var: id, values: [{}]}}\n    objects: [\"{name}_rest/{{id}}.json\"]\n",
            values("r", rest)
        ));
    }
    yaml
}

/// The config head: loopback listener, state and lake in the config's
/// directory, a loop that reconciles at start and dispatches at once, and
/// agent limits generous enough for fake agents that answer at once.
fn config_head(listen: SocketAddr, agents: u32, slots: u32) -> String {
    format!(
        "version: 1
server:
  listen: {listen}
  state_dir: state
  heartbeat_interval: 1s
  lease_ttl: 30s
  shutdown_grace: 2s
  max_agents: {max_agents}
  max_slots_per_agent: {slots}
  max_concurrent_streams: {streams}
  agent_messages: {{rate: 100000/s, burst: 1000000}}
lake:
  local:
    root: lake
loop:
  enabled: true
  reconcile_interval: 1h
  queue_check_interval: 50ms
  dispatch_threshold: 1
",
        max_agents = agents + 1,
        // The Connect stream and one upload per slot share a connection.
        streams = slots * 2 + 16,
    )
}

fn throughput_config(listen: SocketAddr, args: &Args) -> String {
    let mut yaml = config_head(listen, args.agents, args.slots);
    yaml.push_str("scrapers:\n  noop:\n    command: [\"true\"]\n    retry: {max_attempts: 1}\n");
    yaml.push_str("sources:\n");
    yaml.push_str(&sources_yaml("bench", "noop", "medium", args.tasks));
    yaml
}

fn backlog_config(listen: SocketAddr, low: u64) -> String {
    let mut yaml = config_head(listen, 1, BACKLOG_SLOTS);
    yaml.push_str(
        "scrapers:\n  low:\n    command: [\"true\"]\n    retry: {max_attempts: 1}\n  \
         urgent:\n    command: [\"true\"]\n    retry: {max_attempts: 1}\n",
    );
    yaml.push_str("sources:\n");
    yaml.push_str(&sources_yaml("backlog", "low", "low", low));
    yaml.push_str(&format!(
        "  - name: {CRITICAL_SOURCE}\n    scraper: urgent\n    priority: critical\n    partitions:\n      \
         values: {{var: id, values: [now]}}\n    objects: [\"{CRITICAL_SOURCE}/{{id}}.json\"]\n"
    ));
    yaml
}

/// The benchmark's temporary directory: removed at the end unless `--keep`.
struct WorkDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    keep: bool,
}

impl WorkDir {
    fn new(prefix: &str, keep: bool) -> anyhow::Result<WorkDir> {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
        let path = dir.path().to_path_buf();
        Ok(WorkDir {
            dir: Some(dir),
            path,
            keep,
        })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.keep
            && let Some(dir) = self.dir.take()
        {
            eprintln!("kept the benchmark directory {}", dir.keep().display());
        }
    }
}

/// One run of the real `adce-server` (a harness [`Proc`], killed by its pid
/// at drop).
struct Server {
    proc: Proc,
    addr: SocketAddr,
    spawned: Instant,
}

impl Server {
    /// Starts `PROGRAM --config CONFIG`; its log is `<config dir>/<name>.log`.
    fn spawn(program: &Path, config: &Path, addr: SocketAddr, name: &str) -> Server {
        let dir = config.parent().unwrap_or_else(|| Path::new("."));
        let args: Vec<OsString> = vec![
            "--config".into(),
            config.as_os_str().to_owned(),
            "--listen".into(),
            addr.to_string().into(),
        ];
        let spawned = Instant::now();
        let proc = Proc::spawn(
            name,
            program,
            &args,
            &[("RUST_LOG", "info")],
            dir,
            Some(dir),
        );
        Server {
            proc,
            addr,
            spawned,
        }
    }

    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    fn memory(&self) -> Memory {
        Memory::of(self.pid())
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Fails with the log tail when the server has exited.
    fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.proc.try_exit() {
            bail!(
                "adce-server exited with {status}; log tail:\n{}",
                tail_lines(&self.proc.log(), 40)
            );
        }
        Ok(())
    }

    /// Polls gRPC health `""` until SERVING; returns the time since spawn.
    async fn wait_serving(&mut self) -> anyhow::Result<Duration> {
        let deadline = Instant::now() + SERVING_TIMEOUT;
        let mut last = String::new();
        while Instant::now() < deadline {
            self.check_running()?;
            match health(self.addr).await {
                Ok(status) if status == "SERVING" => return Ok(self.spawned.elapsed()),
                Ok(status) => last = status,
                Err(e) => last = e,
            }
            tokio::time::sleep(SERVING_POLL).await;
        }
        bail!("adce-server not SERVING within {SERVING_TIMEOUT:?} (last: {last})")
    }

    /// Waits until the server logs its first "reconciled" line; returns the
    /// `created=` count and the time since spawn.
    async fn wait_reconciled(&mut self, timeout: Duration) -> anyhow::Result<(u64, Duration)> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            self.check_running()?;
            let log = self.proc.log();
            if let Some(created) = reconciled_created(&log) {
                return Ok((created, self.spawned.elapsed()));
            }
            tokio::time::sleep(LOG_POLL).await;
        }
        bail!("adce-server logged no reconcile within {timeout:?}")
    }

    /// SIGTERM by pid and a bounded wait; returns the time it took to exit.
    fn terminate(&mut self) -> Duration {
        let started = Instant::now();
        let status = self.proc.terminate();
        if !status.success() {
            eprintln!("adce-server exited with {status} after SIGTERM");
        }
        started.elapsed()
    }
}

/// The `created=` count of the first "reconciled" line of a server log.
fn reconciled_created(log: &str) -> Option<u64> {
    log.lines()
        .filter(|line| line.contains(" reconciled "))
        .find_map(|line| {
            line.split_whitespace()
                .find_map(|word| word.strip_prefix("created="))
                .and_then(|n| n.parse().ok())
        })
}

/// One gRPC health check of `""`: the serving status's name.
async fn health(addr: SocketAddr) -> Result<String, String> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|status| status.to_string())?;
    let status = ServingStatus::try_from(reply.into_inner().status).map_err(|e| e.to_string())?;
    Ok(status.as_str_name().to_string())
}

async fn channel(url: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(url.to_string())?
        .connect_timeout(CONNECT_TIMEOUT)
        .connect()
        .await
        .with_context(|| format!("cannot connect to {url}"))
}

/// Task counts per state from `Control.Status`.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    pending: u64,
    leased: u64,
    done: u64,
    dead: u64,
    unavailable: u64,
    last_reconcile_ms: i64,
}

async fn counts(control: &mut ControlClient<Channel>) -> anyhow::Result<Counts> {
    let reply = control.status(pb::StatusRequest {}).await?.into_inner();
    let mut counts = Counts {
        last_reconcile_ms: reply.r#loop.map_or(0, |l| l.last_reconcile_unix_ms),
        ..Counts::default()
    };
    for state in reply.tasks {
        match pb::TaskState::try_from(state.state) {
            Ok(pb::TaskState::Pending) => counts.pending = state.total,
            Ok(pb::TaskState::Leased) => counts.leased = state.total,
            Ok(pb::TaskState::Done) => counts.done = state.total,
            Ok(pb::TaskState::Dead) => counts.dead = state.total,
            Ok(pb::TaskState::Unavailable) => counts.unavailable = state.total,
            _ => {}
        }
    }
    Ok(counts)
}

/// What one fake agent saw.
#[derive(Debug, Default)]
struct AgentReport {
    assigns: u64,
    results: u64,
    upload_failures: u64,
    first_assign: Option<Instant>,
    last_result: Option<Instant>,
    /// From a Result sent (a slot freed) to the agent's next Assign.
    latencies: Vec<Duration>,
    /// Why the session ended before the benchmark stopped it, if it did.
    ended: Option<String>,
}

/// A fake agent: one Connect stream, heartbeats at the interval Welcome
/// gives, and an answer to every Assign as its [`Policy`] says; uploads run
/// concurrently over one shared channel.
struct FakeAgent {
    id: String,
    slots: u32,
    policy: Policy,
    channel: Channel,
    /// Results sent by every agent together.
    completed: Arc<AtomicU64>,
    /// Told `(task id, when)` of every Assign of the CRITICAL source.
    critical: Option<mpsc::UnboundedSender<(i64, Instant)>>,
}

/// The live state of one fake agent's session.
struct Session {
    outbound: mpsc::Sender<pb::AgentMessage>,
    running: HashSet<String>,
    /// Slots never filled yet: the first Assigns fill these, not slots that
    /// Results freed, so they have no latency.
    unfilled: u32,
    /// When each Result not yet followed by an Assign was sent, oldest first.
    freed: VecDeque<Instant>,
    report: AgentReport,
    completed: Arc<AtomicU64>,
}

impl Session {
    async fn send(&self, kind: pb::agent_message::Kind) -> anyhow::Result<()> {
        self.outbound
            .send(pb::AgentMessage { kind: Some(kind) })
            .await
            .map_err(|_| anyhow::anyhow!("the Connect stream is closed"))
    }

    /// Sends a lease's result; it frees a slot.
    async fn finish(&mut self, result: pb::TaskResult) -> anyhow::Result<()> {
        if !self.running.remove(&result.lease_id) {
            return Ok(());
        }
        if result.outcome == pb::Outcome::UploadFailed as i32 {
            self.report.upload_failures += 1;
        }
        let now = Instant::now();
        self.freed.push_back(now);
        self.report.results += 1;
        self.report.last_result = Some(now);
        self.send(pb::agent_message::Kind::Result(result)).await?;
        self.completed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn exited(lease_id: &str, code: i32, uploaded_keys: Vec<String>) -> pb::TaskResult {
    pb::TaskResult {
        lease_id: lease_id.to_string(),
        outcome: pb::Outcome::Exited as i32,
        exit_code: code,
        uploaded_keys,
        ..pb::TaskResult::default()
    }
}

/// Uploads [`BODY`] to every expected key of `assign`, then reports exit 0
/// (or UPLOAD_FAILED) on `done`.
async fn upload_all(
    mut client: AgentGatewayClient<Channel>,
    agent_id: String,
    assign: pb::Assign,
    done: mpsc::UnboundedSender<pb::TaskResult>,
) {
    let started = Instant::now();
    let mut uploaded = Vec::with_capacity(assign.expected_keys.len());
    let mut failure = None;
    for key in &assign.expected_keys {
        let chunks = vec![
            pb::UploadChunk {
                kind: Some(pb::upload_chunk::Kind::Header(pb::UploadHeader {
                    lease_id: assign.lease_id.clone(),
                    key: key.clone(),
                    size: BODY.len() as u64,
                    agent_id: agent_id.clone(),
                })),
            },
            pb::UploadChunk {
                kind: Some(pb::upload_chunk::Kind::Data(BODY.to_vec())),
            },
        ];
        match client.upload(tokio_stream::iter(chunks)).await {
            Ok(_) => uploaded.push(key.clone()),
            Err(status) => {
                failure = Some(format!("upload of {key} failed: {status}"));
                break;
            }
        }
    }
    let mut result = exited(&assign.lease_id, 0, uploaded);
    result.duration_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
    if let Some(message) = failure {
        result.outcome = pb::Outcome::UploadFailed as i32;
        result.message = message;
    }
    let _ = done.send(result);
}

impl FakeAgent {
    /// Runs the session until `stop` changes or the server ends it.
    async fn run(self, mut stop: watch::Receiver<bool>) -> anyhow::Result<AgentReport> {
        let (outbound, receiver) = mpsc::channel(OUTBOUND_CAPACITY);
        let hello = pb::Hello {
            agent_id: self.id.clone(),
            hostname: "bench".into(),
            labels: Default::default(),
            slots: self.slots,
            version: env!("CARGO_PKG_VERSION").into(),
            running_leases: Vec::new(),
        };
        outbound
            .send(pb::AgentMessage {
                kind: Some(pb::agent_message::Kind::Hello(hello)),
            })
            .await
            .map_err(|_| anyhow::anyhow!("the Connect stream closed before Hello"))?;
        let mut client = AgentGatewayClient::new(self.channel.clone());
        let mut inbound = client
            .connect(ReceiverStream::new(receiver))
            .await
            .with_context(|| format!("agent {}: Connect failed", self.id))?
            .into_inner();
        let first = tokio::time::timeout(WELCOME_TIMEOUT, inbound.message())
            .await
            .with_context(|| format!("agent {}: no Welcome", self.id))??;
        let welcome = match first.and_then(|m| m.kind) {
            Some(Out::Welcome(welcome)) => welcome,
            other => bail!("agent {}: expected Welcome, got {other:?}", self.id),
        };
        let period = Duration::from_millis(welcome.heartbeat_interval_ms).max(MIN_HEARTBEAT);
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let uploader = AgentGatewayClient::new(self.channel.clone());
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        let mut session = Session {
            outbound,
            running: HashSet::new(),
            unfilled: self.slots,
            freed: VecDeque::new(),
            report: AgentReport::default(),
            completed: self.completed.clone(),
        };
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                message = inbound.message() => {
                    let kind = match message {
                        Ok(Some(message)) => message.kind,
                        Ok(None) => {
                            session.report.ended = Some("the server closed the stream".into());
                            break;
                        }
                        Err(status) => {
                            session.report.ended = Some(format!("stream error: {status}"));
                            break;
                        }
                    };
                    match kind {
                        Some(Out::Assign(assign)) => {
                            let now = Instant::now();
                            session.report.first_assign.get_or_insert(now);
                            session.report.assigns += 1;
                            if session.unfilled > 0 {
                                session.unfilled -= 1;
                            } else if let Some(freed_at) = session.freed.pop_front() {
                                session.report.latencies.push(now - freed_at);
                            }
                            if let Some(critical) = &self.critical
                                && assign.source == CRITICAL_SOURCE
                            {
                                let _ = critical.send((assign.task_id, now));
                            }
                            session.running.insert(assign.lease_id.clone());
                            match self.policy.answer(&assign) {
                                Answer::Exit(code) => {
                                    session.finish(exited(&assign.lease_id, code, Vec::new())).await?;
                                }
                                Answer::Upload => {
                                    tokio::spawn(upload_all(
                                        uploader.clone(),
                                        self.id.clone(),
                                        assign,
                                        done_tx.clone(),
                                    ));
                                }
                            }
                        }
                        Some(Out::Cancel(cancel)) => {
                            let result = pb::TaskResult {
                                lease_id: cancel.lease_id,
                                outcome: pb::Outcome::Cancelled as i32,
                                ..pb::TaskResult::default()
                            };
                            session.finish(result).await?;
                        }
                        Some(Out::Drain(_)) => {
                            session.report.ended = Some("the server asked to drain".into());
                            break;
                        }
                        Some(Out::Stopping(_)) => {
                            session.report.ended = Some("the server is stopping".into());
                            break;
                        }
                        Some(Out::Welcome(_)) | None => {}
                    }
                }
                Some(result) = done_rx.recv() => session.finish(result).await?,
                _ = heartbeat.tick() => {
                    let running = session.running.iter().cloned().collect();
                    session
                        .send(pb::agent_message::Kind::Heartbeat(pb::Heartbeat {
                            running_leases: running,
                        }))
                        .await?;
                }
            }
        }
        Ok(session.report)
    }
}

/// Fake agents running as tokio tasks, stopped together.
struct Agents {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<AgentReport>>>,
    completed: Arc<AtomicU64>,
}

impl Agents {
    async fn start(
        url: &str,
        count: u32,
        slots: u32,
        policy: Policy,
        critical: Option<mpsc::UnboundedSender<(i64, Instant)>>,
    ) -> anyhow::Result<Agents> {
        let (stop, stopped) = watch::channel(false);
        let completed = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for i in 0..count {
            let agent = FakeAgent {
                id: format!("bench-{i}"),
                slots,
                policy,
                channel: channel(url).await?,
                completed: completed.clone(),
                critical: critical.clone(),
            };
            tasks.push(tokio::spawn(agent.run(stopped.clone())));
        }
        Ok(Agents {
            stop,
            tasks,
            completed,
        })
    }

    fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }

    /// Whether an agent's session has ended on its own.
    fn any_ended(&self) -> bool {
        self.tasks.iter().any(tokio::task::JoinHandle::is_finished)
    }

    /// Stops every agent and gathers their reports.
    async fn stop(self) -> anyhow::Result<Vec<AgentReport>> {
        let _ = self.stop.send(true);
        let mut reports = Vec::new();
        for task in self.tasks {
            reports.push(task.await.context("a fake agent panicked")??);
        }
        Ok(reports)
    }
}

/// Prints the memory of a server run after it idled for [`IDLE`].
async fn idle_memory(server: &Server, what: &str) {
    tokio::time::sleep(IDLE).await;
    println!(
        "server RSS idle {:.0} s {what}: {}",
        IDLE.as_secs_f64(),
        server.memory()
    );
}

/// Waits until Status shows a reconcile finished after the server started.
async fn wait_loop_reconciled(server: &mut Server) -> anyhow::Result<Duration> {
    let mut control = ControlClient::new(channel(&server.url()).await?);
    let deadline = Instant::now() + RECONCILED_TIMEOUT;
    while Instant::now() < deadline {
        server.check_running()?;
        if counts(&mut control).await?.last_reconcile_ms > 0 {
            return Ok(server.spawned.elapsed());
        }
        tokio::time::sleep(LOG_POLL).await;
    }
    bail!("no reconcile within {RECONCILED_TIMEOUT:?} of the restart")
}

async fn throughput(args: &Args, program: &Path, mode: Mode) -> anyhow::Result<()> {
    let dir = WorkDir::new("adce-bench-dispatch-", args.keep)?;
    let addr = free_addr();
    let config = dir.path.join("config.yaml");
    fs::write(&config, throughput_config(addr, args))?;
    let n = args.tasks;
    println!(
        "dispatch benchmark: mode {mode:?}, {} agents x {} slots, {n} tasks, server {}",
        args.agents,
        args.slots,
        program.display()
    );

    let mut server = Server::spawn(program, &config, addr, "server-1");
    let serving = server.wait_serving().await?;
    let (created, reconciled) = server.wait_reconciled(QUEUED_TIMEOUT).await?;
    let mut control = ControlClient::new(channel(&server.url()).await?);
    let queued = counts(&mut control).await?;
    println!(
        "server SERVING after {:.3} s; first reconcile queued {created} tasks after {:.3} s ({} pending)",
        serving.as_secs_f64(),
        reconciled.as_secs_f64(),
        queued.pending
    );
    if queued.pending != n {
        bail!(
            "expected {n} pending tasks, Status shows {}",
            queued.pending
        );
    }

    let agents = Agents::start(
        &server.url(),
        args.agents,
        args.slots,
        Policy::Throughput(mode),
        None,
    )
    .await?;
    let deadline = Instant::now() + RUN_TIMEOUT;
    while agents.completed() < n {
        if Instant::now() >= deadline {
            bail!(
                "only {} of {n} tasks completed within {RUN_TIMEOUT:?}",
                agents.completed()
            );
        }
        if agents.any_ended() {
            break;
        }
        server.check_running()?;
        tokio::time::sleep(PROGRESS_POLL).await;
    }
    let judged_deadline = Instant::now() + JUDGED_TIMEOUT;
    let mut finished = counts(&mut control).await?;
    while finished.done + finished.unavailable + finished.dead < n
        && Instant::now() < judged_deadline
    {
        tokio::time::sleep(STATUS_POLL).await;
        finished = counts(&mut control).await?;
    }
    let judged_at = Instant::now();
    let end_memory = server.memory();
    let reports = agents.stop().await?;

    for (i, report) in reports.iter().enumerate() {
        if let Some(why) = &report.ended {
            eprintln!("agent bench-{i} ended early: {why}");
        }
    }
    let first_assign = reports
        .iter()
        .filter_map(|r| r.first_assign)
        .min()
        .context("no agent received an Assign")?;
    let last_result = reports
        .iter()
        .filter_map(|r| r.last_result)
        .max()
        .unwrap_or(first_assign);
    let results: u64 = reports.iter().map(|r| r.results).sum();
    let assigns: u64 = reports.iter().map(|r| r.assigns).sum();
    let upload_failures: u64 = reports.iter().map(|r| r.upload_failures).sum();
    let mut latencies: Vec<Duration> = reports
        .iter()
        .flat_map(|r| r.latencies.iter().copied())
        .collect();
    let completed = finished.done + finished.unavailable;
    let wall = judged_at - first_assign;
    println!(
        "tasks completed: {completed} of {n} (done {}, unavailable {}, dead {}, pending {}, leased {}); \
         {assigns} Assigns, {results} Results, {upload_failures} upload failures",
        finished.done, finished.unavailable, finished.dead, finished.pending, finished.leased
    );
    println!(
        "wall time, first Assign to the server having judged the last result: {:.3} s \
         (last Result sent at {:.3} s)",
        wall.as_secs_f64(),
        (last_result - first_assign).as_secs_f64()
    );
    println!(
        "throughput: {:.0} tasks/s",
        completed as f64 / wall.as_secs_f64()
    );
    println!(
        "assign latency (an agent sending a Result, which frees a slot, to that agent receiving its next Assign): {}",
        latency_summary(&mut latencies)
    );
    println!("server RSS at the end of the run: {end_memory}");
    idle_memory(&server, &format!("after the run, {n} tasks stored")).await;

    let stopped_in = server.terminate();
    let mut restarted = Server::spawn(program, &config, addr, "server-2");
    let serving_again = restarted.wait_serving().await?;
    let reconciled_again = wait_loop_reconciled(&mut restarted).await?;
    println!(
        "restart: exited {:.3} s after SIGTERM; SERVING {:.3} s after spawn; first reconcile done after {:.3} s",
        stopped_in.as_secs_f64(),
        serving_again.as_secs_f64(),
        reconciled_again.as_secs_f64()
    );
    idle_memory(&restarted, &format!("after a restart, {n} tasks stored")).await;
    println!(
        "state dir: {:.1} MiB",
        mib(dir_bytes(&dir.path.join("state")))
    );
    restarted.terminate();
    Ok(())
}

async fn backlog(args: &Args, program: &Path, low: u64) -> anyhow::Result<()> {
    let dir = WorkDir::new("adce-bench-backlog-", args.keep)?;
    let addr = free_addr();
    let config = dir.path.join("config.yaml");
    fs::write(&config, backlog_config(addr, low))?;
    let all = low + 1;
    println!(
        "backlog benchmark: {low} LOW tasks + 1 CRITICAL, 1 agent x {BACKLOG_SLOTS} slots, \
         {} retries, server {}",
        args.retries,
        program.display()
    );

    let mut server = Server::spawn(program, &config, addr, "server-1");
    let serving = server.wait_serving().await?;
    let (created, reconciled) = server.wait_reconciled(QUEUED_TIMEOUT).await?;
    let memory = server.memory();
    let mut control = ControlClient::new(channel(&server.url()).await?);
    let queued = counts(&mut control).await?;
    println!(
        "first reconcile: {created} tasks queued {:.3} s after spawn (SERVING after {:.3} s; Status: {} pending)",
        reconciled.as_secs_f64(),
        serving.as_secs_f64(),
        queued.pending
    );
    if queued.pending != all {
        bail!(
            "expected {all} pending tasks, Status shows {}",
            queued.pending
        );
    }
    println!("server RSS right after the first reconcile: {memory}");
    println!(
        "state dir: {:.1} MiB",
        mib(dir_bytes(&dir.path.join("state")))
    );

    let stopped_in = server.terminate();
    let mut restarted = Server::spawn(program, &config, addr, "server-2");
    let serving_again = restarted.wait_serving().await?;
    println!(
        "restart: exited {:.3} s after SIGTERM; SERVING {:.3} s after spawn ({})",
        stopped_in.as_secs_f64(),
        serving_again.as_secs_f64(),
        restarted.memory()
    );

    let (critical_tx, mut critical_rx) = mpsc::unbounded_channel();
    let agents = Agents::start(
        &restarted.url(),
        1,
        BACKLOG_SLOTS,
        Policy::Backlog,
        Some(critical_tx),
    )
    .await?;
    let (task_id, first_at) = tokio::time::timeout(FIRST_CRITICAL_TIMEOUT, critical_rx.recv())
        .await
        .context("the CRITICAL task was never assigned")?
        .context("the agent stopped")?;
    println!(
        "CRITICAL task {task_id} first assigned {:.3} s after the restart's spawn \
         (after the restart's reconcile of the stored backlog)",
        (first_at - restarted.spawned).as_secs_f64()
    );
    let mut control = ControlClient::new(channel(&restarted.url()).await?);
    let mut from_reply = Vec::new();
    let mut from_request = Vec::new();
    let mut before_reply = 0;
    for _ in 0..args.retries {
        // The result of the last run makes the task dead shortly after the
        // Assign; Retry skips it until then.
        let retry_deadline = Instant::now() + DEAD_TIMEOUT;
        let (requested, replied) = loop {
            let requested = Instant::now();
            let reply = control
                .retry(pb::RetryRequest {
                    task_ids: vec![task_id],
                    ..pb::RetryRequest::default()
                })
                .await?
                .into_inner();
            let replied = Instant::now();
            if reply.retried.contains(&task_id) {
                break (requested, replied);
            }
            if Instant::now() >= retry_deadline {
                bail!(
                    "task {task_id} was not retried within {DEAD_TIMEOUT:?}: {:?}",
                    reply.skipped
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let (id, assigned) = tokio::time::timeout(CRITICAL_ASSIGN_TIMEOUT, critical_rx.recv())
            .await
            .context("the retried CRITICAL task was not assigned in time")?
            .context("the agent stopped")?;
        if id != task_id {
            bail!("expected an Assign of task {task_id}, got {id}");
        }
        if assigned < replied {
            before_reply += 1;
        }
        from_reply.push(assigned.saturating_duration_since(replied));
        from_request.push(assigned - requested);
    }
    let reports = agents.stop().await?;
    let remaining = counts(&mut control).await?;
    let mut low_latencies: Vec<Duration> = reports
        .iter()
        .flat_map(|r| r.latencies.iter().copied())
        .collect();
    let results: u64 = reports.iter().map(|r| r.results).sum();
    let session = reports
        .iter()
        .filter_map(|r| Some(r.last_result? - r.first_assign?))
        .max()
        .unwrap_or_default();
    println!(
        "CRITICAL assign latency in a {low} LOW backlog (Retry reply to the agent receiving the Assign): {}",
        latency_summary(&mut from_reply)
    );
    println!(
        "  the same from the Retry request sent: {}; {before_reply} Assigns arrived before the Retry reply",
        latency_summary(&mut from_request)
    );
    println!(
        "the agent sent {results} Results in {:.3} s ({:.0}/s, the CRITICAL ones included); \
         then {} tasks pending, {} unavailable",
        session.as_secs_f64(),
        results as f64 / session.as_secs_f64().max(f64::EPSILON),
        remaining.pending,
        remaining.unavailable
    );
    println!(
        "assign latency over the whole agent session (a Result sent to the next Assign): {}",
        latency_summary(&mut low_latencies)
    );
    println!("server RSS at the end: {}", restarted.memory());
    restarted.terminate();
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.tasks == 0 || args.agents == 0 || args.slots == 0 || args.backlog == Some(0) {
        bail!("--tasks, --agents, --slots and --backlog must be at least 1");
    }
    if cfg!(debug_assertions) {
        eprintln!(
            "warning: this benchmark is a debug build, so the fake agents are slow; \
             use `cargo run --release -p adce-tests --bin bench_dispatch`"
        );
    }
    let program = match &args.server_bin {
        Some(path) => path.clone(),
        None => release_server_bin()?,
    };
    match args.backlog {
        Some(low) => backlog(&args, &program, low).await,
        None => throughput(&args, &program, args.mode).await,
    }
}
