//! Running one assignment: prepares the task's output directory, checks the
//! program against the host's allowlist, spawns the scraper without a shell
//! in its own process group with a clean environment, forwards its output as
//! batched events, enforces the timeout and cancellation by killing the whole
//! group, uploads what it wrote and builds the [`TaskResult`]. Knows nothing
//! about the connection: events go into an mpsc channel and uploads through
//! an [`Uploader`].

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use adce_proto::v1::{
    Assign, LogLine, LogLines, Outcome, OutputStream, Progress, TaskResult, arg_part,
};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::allow::AllowList;
use crate::collect::collect_outputs;
use crate::output::{self, parse_progress, read_lines};
use crate::upload::{UploadRetry, Uploader, upload_all};

/// Most lines in one `LogLines` event.
pub const MAX_LINES_PER_BATCH: usize = 200;
/// Longest time a line waits before its batch is sent.
pub const LOG_FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// How long output is still read after the process exited and its group
/// was killed; a pipe held open past this (by a process that left the group)
/// is abandoned.
pub const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest `TaskResult.message`, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 1024;
/// The variable that tells the scraper where to write.
pub const OUTPUT_DIR_ENV: &str = "ADCE_OUTPUT_DIR";
/// The only variables of the agent's own environment a scraper sees.
pub const INHERITED_ENV: [&str; 3] = ["PATH", "HOME", "LANG"];
/// Lines read ahead of the forwarding loop.
const LINE_CHANNEL_CAPACITY: usize = 256;
/// Longest lease id accepted (it names a directory).
const MAX_LEASE_ID_BYTES: usize = 200;

/// One piece of an argv element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgPiece {
    /// Literal text.
    Text(String),
    /// The absolute path of the task's output directory.
    OutputDir,
}

/// A validated assignment, ready to run.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSpec {
    /// The lease; names the task's directory and every event.
    pub lease_id: String,
    /// The task id, for logs.
    pub task_id: i64,
    /// The argv elements, each a concatenation of pieces; never empty.
    pub argv: Vec<Vec<ArgPiece>>,
    /// Variables added to the child's environment.
    pub env: BTreeMap<String, String>,
    /// Kill the process group after this long.
    pub timeout: Option<Duration>,
}

impl TryFrom<Assign> for TaskSpec {
    type Error = Error;

    fn try_from(assign: Assign) -> Result<Self, Error> {
        let invalid = |reason: String| Error::InvalidAssignment(reason);
        let lease = &assign.lease_id;
        if lease.is_empty()
            || lease.len() > MAX_LEASE_ID_BYTES
            || lease == "."
            || lease == ".."
            || lease.contains(['/', '\0'])
        {
            return Err(invalid(format!(
                "lease id `{lease}` cannot name a directory"
            )));
        }
        if assign.argv.is_empty() {
            return Err(invalid("argv is empty".into()));
        }
        let mut argv = Vec::with_capacity(assign.argv.len());
        for (index, arg) in assign.argv.into_iter().enumerate() {
            let mut pieces = Vec::with_capacity(arg.parts.len());
            for part in arg.parts {
                pieces.push(match part.part {
                    Some(arg_part::Part::Text(text)) => ArgPiece::Text(text),
                    Some(arg_part::Part::OutputDir(_)) => ArgPiece::OutputDir,
                    None => return Err(invalid(format!("argv[{index}] has an empty part"))),
                });
            }
            argv.push(pieces);
        }
        if argv[0].is_empty() {
            return Err(invalid("argv[0] is empty".into()));
        }
        for (name, value) in &assign.env {
            if name.is_empty() || name.contains(['=', '\0']) || value.contains('\0') {
                return Err(invalid(format!(
                    "environment variable `{name}` is not valid"
                )));
            }
        }
        Ok(Self {
            lease_id: assign.lease_id,
            task_id: assign.task_id,
            argv,
            env: assign.env.into_iter().collect(),
            timeout: (assign.timeout_ms > 0).then(|| Duration::from_millis(assign.timeout_ms)),
        })
    }
}

/// Joins each argv element's pieces, putting `out_dir` where the output
/// directory goes.
pub fn build_argv(argv: &[Vec<ArgPiece>], out_dir: &Path) -> Vec<OsString> {
    argv.iter()
        .map(|pieces| {
            let mut arg = OsString::new();
            for piece in pieces {
                match piece {
                    ArgPiece::Text(text) => arg.push(text),
                    ArgPiece::OutputDir => arg.push(out_dir.as_os_str()),
                }
            }
            arg
        })
        .collect()
}

/// The child's whole environment: the inherited `base` variables, then the
/// task's, then [`OUTPUT_DIR_ENV`]; later ones win.
pub fn child_env(
    base: &[(String, String)],
    task: &BTreeMap<String, String>,
    out_dir: &Path,
) -> BTreeMap<OsString, OsString> {
    let mut env: BTreeMap<OsString, OsString> = base
        .iter()
        .map(|(name, value)| (name.into(), value.into()))
        .collect();
    env.extend(task.iter().map(|(name, value)| (name.into(), value.into())));
    env.insert(OUTPUT_DIR_ENV.into(), out_dir.as_os_str().to_owned());
    env
}

/// Something a running task reports before its result.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskEvent {
    /// A batch of output lines (and agent notes about the task).
    Logs(LogLines),
    /// The latest progress line.
    Progress(Progress),
}

/// What every run shares.
#[derive(Debug, Clone)]
pub struct RunnerContext {
    /// Absolute directory under which each task gets `<lease_id>/out`.
    pub work_dir: PathBuf,
    /// Variables copied into every child's environment (see
    /// [`RunnerContext::inherited_env`]).
    pub base_env: Vec<(String, String)>,
    /// How uploads are retried.
    pub upload_retry: UploadRetry,
    /// The programs this host allows (`--allow-command`).
    pub allow: AllowList,
}

impl RunnerContext {
    /// The [`INHERITED_ENV`] variables that are set in this process.
    pub fn inherited_env() -> Vec<(String, String)> {
        INHERITED_ENV
            .iter()
            .filter_map(|name| {
                std::env::var(name)
                    .ok()
                    .map(|value| ((*name).to_owned(), value))
            })
            .collect()
    }
}

/// Why the agent killed a process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KillReason {
    TimedOut,
    Cancelled,
}

/// A child's process group, killed with SIGKILL on request or when dropped
/// before it was killed (so an aborted runner leaves no orphans).
struct ProcessGroup {
    pgid: Option<Pid>,
}

impl ProcessGroup {
    fn kill(&mut self) {
        let Some(pgid) = self.pgid.take() else {
            return;
        };
        match killpg(pgid, Signal::SIGKILL) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(error) => tracing::warn!(pgid = pgid.as_raw(), %error, "cannot kill process group"),
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Collects output lines into batches and remembers what the result needs.
struct Forwarder<'a> {
    lease_id: &'a str,
    events: &'a mpsc::Sender<TaskEvent>,
    batch: Vec<LogLine>,
    progress: Option<Progress>,
    last_stderr: Option<String>,
}

impl<'a> Forwarder<'a> {
    fn new(lease_id: &'a str, events: &'a mpsc::Sender<TaskEvent>) -> Self {
        Self {
            lease_id,
            events,
            batch: Vec::new(),
            progress: None,
            last_stderr: None,
        }
    }

    fn push(&mut self, line: LogLine) {
        if line.stream == i32::from(OutputStream::Stdout) {
            if let Some((fraction, message)) = parse_progress(&line.text) {
                self.progress = Some(Progress {
                    lease_id: self.lease_id.to_owned(),
                    fraction,
                    message: message.to_owned(),
                });
            }
        } else if line.stream == i32::from(OutputStream::Stderr) && !line.text.trim().is_empty() {
            self.last_stderr = Some(bounded_message(line.text.trim()));
        }
        self.batch.push(line);
    }

    /// Adds a line written by the agent itself about this task.
    fn note(&mut self, text: String) {
        self.batch.push(output::log_line(
            OutputStream::Unspecified,
            format!("adce-agent: {text}"),
        ));
    }

    fn is_full(&self) -> bool {
        self.batch.len() >= MAX_LINES_PER_BATCH
    }

    async fn flush(&mut self) {
        // A closed channel means the agent is gone; the lines have nowhere to go.
        if !self.batch.is_empty() {
            let lines = std::mem::take(&mut self.batch);
            let _ = self
                .events
                .send(TaskEvent::Logs(LogLines {
                    lease_id: self.lease_id.to_owned(),
                    lines,
                }))
                .await;
        }
        if let Some(progress) = self.progress.take() {
            let _ = self.events.send(TaskEvent::Progress(progress)).await;
        }
    }
}

/// Cuts `text` to [`MAX_MESSAGE_BYTES`] at a character boundary.
fn bounded_message(text: &str) -> String {
    if text.len() <= MAX_MESSAGE_BYTES {
        return text.to_owned();
    }
    let mut end = MAX_MESSAGE_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{}", &text[..end], output::TRUNCATION_MARKER)
}

fn duration_ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Runs one task to its end and returns its result; never fails, every
/// problem becomes an outcome and a message. `cancel` kills the task.
pub async fn run_task<U: Uploader>(
    spec: TaskSpec,
    ctx: &RunnerContext,
    uploader: &U,
    events: &mpsc::Sender<TaskEvent>,
    cancel: &CancellationToken,
) -> TaskResult {
    let task_dir = ctx.work_dir.join(&spec.lease_id);
    let out_dir = task_dir.join("out");
    let mut result = TaskResult {
        lease_id: spec.lease_id.clone(),
        ..TaskResult::default()
    };
    match prepare_dir(&task_dir, &out_dir).await {
        Ok(()) => {
            let mut forwarder = Forwarder::new(&spec.lease_id, events);
            execute(
                &spec,
                ctx,
                uploader,
                &out_dir,
                cancel,
                &mut forwarder,
                &mut result,
            )
            .await;
            forwarder.flush().await;
        }
        Err(error) => {
            result.set_outcome(Outcome::SpawnFailed);
            result.message = bounded_message(&format!("{error}: {}", error_source(&error)));
        }
    }
    if let Err(error) = tokio::fs::remove_dir_all(&task_dir).await
        && error.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(lease = %spec.lease_id, dir = %task_dir.display(), %error, "cannot remove task directory");
    }
    tracing::info!(
        lease = %spec.lease_id,
        task = spec.task_id,
        outcome = ?result.outcome(),
        exit_code = result.exit_code,
        signal = result.signal,
        duration_ms = result.duration_ms,
        uploaded = result.uploaded_keys.len(),
        message = %result.message,
        "task finished"
    );
    result
}

fn error_source(error: &Error) -> String {
    std::error::Error::source(error)
        .map(ToString::to_string)
        .unwrap_or_default()
}

/// Creates an empty `out_dir` inside a fresh `task_dir`.
async fn prepare_dir(task_dir: &Path, out_dir: &Path) -> Result<(), Error> {
    let dir_error = |source| Error::Dir {
        path: task_dir.to_path_buf(),
        source,
    };
    match tokio::fs::remove_dir_all(task_dir).await {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(dir_error(error)),
    }
    tokio::fs::create_dir_all(out_dir).await.map_err(dir_error)
}

/// Spawns, supervises and uploads; fills `result`.
async fn execute<U: Uploader>(
    spec: &TaskSpec,
    ctx: &RunnerContext,
    uploader: &U,
    out_dir: &Path,
    cancel: &CancellationToken,
    forwarder: &mut Forwarder<'_>,
    result: &mut TaskResult,
) {
    if cancel.is_cancelled() {
        result.set_outcome(Outcome::Cancelled);
        result.message = "cancelled before start".into();
        return;
    }
    let argv = build_argv(&spec.argv, out_dir);
    let Some((program, args)) = argv.split_first() else {
        result.set_outcome(Outcome::SpawnFailed);
        result.message = "argv is empty".into();
        return;
    };
    let env = child_env(&ctx.base_env, &spec.env, out_dir);
    // Scratch files a scraper writes in its working directory are removed
    // with the task directory.
    let cwd = out_dir.parent().unwrap_or(out_dir);
    let executable = match ctx.allow.check(
        program,
        env.get(OsStr::new("PATH")).map(OsString::as_os_str),
        cwd,
    ) {
        Ok(executable) => executable,
        Err(error) => {
            tracing::warn!(lease = %spec.lease_id, task = spec.task_id, program = %program.to_string_lossy(), %error, "command refused by --allow-command");
            let message = error.to_string();
            forwarder.note(message.clone());
            result.set_outcome(Outcome::SpawnFailed);
            result.message = bounded_message(&message);
            return;
        }
    };
    // Under an allowlist the checked real path is what runs; the program
    // still sees argv[0] as the server rendered it.
    let mut command = match &executable {
        Some(path) => {
            let mut command = Command::new(path);
            command.arg0(program);
            command
        }
        None => Command::new(program),
    };
    command
        .args(args)
        .env_clear()
        .envs(env)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let started = Instant::now();
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            tracing::warn!(lease = %spec.lease_id, program = %program.to_string_lossy(), %error, "cannot start scraper");
            result.set_outcome(Outcome::SpawnFailed);
            result.message = bounded_message(&format!(
                "cannot start `{}`: {error}",
                program.to_string_lossy()
            ));
            return;
        }
    };
    let pid = child.id().and_then(|id| i32::try_from(id).ok());
    tracing::info!(lease = %spec.lease_id, task = spec.task_id, pid, program = %program.to_string_lossy(), "scraper started");
    // With `process_group(0)` the child's pid is its process group id.
    let mut group = ProcessGroup {
        pgid: pid.map(Pid::from_raw),
    };
    // If this agent is killed, the next one on the work directory kills it.
    if let (Some(pgid), Some(task_dir)) = (pid, out_dir.parent())
        && let Err(error) = crate::leftovers::record_group(task_dir, pgid)
    {
        tracing::warn!(lease = %spec.lease_id, %error, "cannot record the scraper's process group");
    }

    let (lines_tx, mut lines_rx) = mpsc::channel(LINE_CHANNEL_CAPACITY);
    let mut readers = Vec::with_capacity(2);
    if let Some(stdout) = child.stdout.take() {
        readers.push(tokio::spawn(read_lines(
            stdout,
            OutputStream::Stdout,
            lines_tx.clone(),
        )));
    }
    if let Some(stderr) = child.stderr.take() {
        readers.push(tokio::spawn(read_lines(
            stderr,
            OutputStream::Stderr,
            lines_tx,
        )));
    }

    // Far enough never to fire; used where a deadline is disabled.
    let never = started + Duration::from_secs(100 * 365 * 24 * 3600);
    let deadline = spec.timeout.map(|timeout| started + timeout);
    let mut kill_reason: Option<KillReason> = None;
    let mut exit: Option<std::io::Result<ExitStatus>> = None;
    let mut drain_deadline: Option<Instant> = None;
    let mut lines_open = true;
    let mut flush_tick = tokio::time::interval(LOG_FLUSH_INTERVAL);
    flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while exit.is_none() || lines_open {
        tokio::select! {
            waited = child.wait(), if exit.is_none() => {
                result.duration_ms = duration_ms(started.elapsed());
                exit = Some(waited);
                // Whatever the scraper left running in its group dies with it.
                group.kill();
                drain_deadline = Some(Instant::now() + OUTPUT_DRAIN_TIMEOUT);
            }
            line = lines_rx.recv(), if lines_open => match line {
                Some(line) => {
                    forwarder.push(line);
                    if forwarder.is_full() {
                        forwarder.flush().await;
                    }
                }
                None => lines_open = false,
            },
            _ = flush_tick.tick() => forwarder.flush().await,
            () = tokio::time::sleep_until(deadline.unwrap_or(never)),
                if deadline.is_some() && exit.is_none() && kill_reason.is_none() => {
                tracing::warn!(lease = %spec.lease_id, timeout_ms = spec.timeout.map(duration_ms), "scraper timed out, killing its process group");
                kill_reason = Some(KillReason::TimedOut);
                group.kill();
            }
            () = cancel.cancelled(), if exit.is_none() && kill_reason.is_none() => {
                tracing::info!(lease = %spec.lease_id, "task cancelled, killing its process group");
                kill_reason = Some(KillReason::Cancelled);
                group.kill();
            }
            () = tokio::time::sleep_until(drain_deadline.unwrap_or(never)), if drain_deadline.is_some() => {
                tracing::warn!(lease = %spec.lease_id, "output still open after the scraper exited, abandoning it");
                forwarder.note("output still open after the scraper exited; the rest is dropped".into());
                break;
            }
        }
    }
    for reader in &readers {
        reader.abort();
    }

    let status = match exit {
        Some(Ok(status)) => status,
        Some(Err(error)) => {
            // Practically impossible (the child was reaped elsewhere); report
            // it as a failed exit so the server retries the task.
            result.set_outcome(Outcome::Exited);
            result.exit_code = -1;
            result.message =
                bounded_message(&format!("lost track of the scraper process: {error}"));
            return;
        }
        None => {
            result.set_outcome(Outcome::Exited);
            result.exit_code = -1;
            result.message = "the scraper process was not waited for".into();
            return;
        }
    };
    result.signal = status.signal().unwrap_or(0);
    match (kill_reason, status.code()) {
        (Some(KillReason::TimedOut), _) => {
            result.set_outcome(Outcome::TimedOut);
            result.message = format!(
                "timed out after {} ms",
                spec.timeout.map(duration_ms).unwrap_or_default()
            );
        }
        (Some(KillReason::Cancelled), _) => {
            result.set_outcome(Outcome::Cancelled);
            result.message = "cancelled".into();
        }
        (None, None) => {
            result.set_outcome(Outcome::Signaled);
            result.message = forwarder
                .last_stderr
                .clone()
                .unwrap_or_else(|| format!("killed by signal {}", result.signal));
        }
        (None, Some(code)) => {
            result.set_outcome(Outcome::Exited);
            result.exit_code = code;
            if code == 0 {
                upload(spec, ctx, uploader, out_dir, cancel, forwarder, result).await;
            } else {
                // A failed run's files may be partial: they never reach the lake.
                result.message = forwarder.last_stderr.clone().unwrap_or_default();
            }
        }
    }
}

/// Uploads everything under `out_dir`; on failure turns `result` into
/// UPLOAD_FAILED (or CANCELLED when cancelled meanwhile).
async fn upload<U: Uploader>(
    spec: &TaskSpec,
    ctx: &RunnerContext,
    uploader: &U,
    out_dir: &Path,
    cancel: &CancellationToken,
    forwarder: &mut Forwarder<'_>,
    result: &mut TaskResult,
) {
    let walk_dir = out_dir.to_path_buf();
    let collected = match tokio::task::spawn_blocking(move || collect_outputs(&walk_dir)).await {
        Ok(Ok(collected)) => collected,
        Ok(Err(error)) => {
            result.set_outcome(Outcome::UploadFailed);
            result.message = bounded_message(&format!("{error}: {}", error_source(&error)));
            return;
        }
        Err(error) => {
            result.set_outcome(Outcome::UploadFailed);
            result.message = bounded_message(&format!("listing the output failed: {error}"));
            return;
        }
    };
    for skipped in &collected.skipped {
        tracing::info!(lease = %spec.lease_id, path = %skipped.relative, reason = skipped.reason, "output entry skipped");
        forwarder.note(format!(
            "skipped `{}`: {}",
            skipped.relative, skipped.reason
        ));
    }
    let report = tokio::select! {
        report = upload_all(uploader, &spec.lease_id, &collected.files, ctx.upload_retry) => report,
        () = cancel.cancelled() => {
            result.set_outcome(Outcome::Cancelled);
            result.message = "cancelled while uploading".into();
            return;
        }
    };
    for warning in report.warnings {
        forwarder.note(format!("upload skipped: {warning}"));
    }
    result.uploaded_keys = report.uploaded;
    if let Some((key, error)) = report.failure {
        result.set_outcome(Outcome::UploadFailed);
        result.message = bounded_message(&format!("uploading `{key}`: {error}"));
    }
}

#[cfg(test)]
mod tests {
    use adce_proto::v1::{Arg, ArgPart};

    use super::*;

    fn text(value: &str) -> ArgPart {
        ArgPart {
            part: Some(arg_part::Part::Text(value.into())),
        }
    }

    fn out() -> ArgPart {
        ArgPart {
            part: Some(arg_part::Part::OutputDir(true)),
        }
    }

    fn assign(argv: Vec<Vec<ArgPart>>) -> Assign {
        Assign {
            lease_id: "lease-1".into(),
            task_id: 7,
            argv: argv.into_iter().map(|parts| Arg { parts }).collect(),
            timeout_ms: 1500,
            ..Assign::default()
        }
    }

    #[test]
    fn argv_concatenates_parts_and_substitutes_the_output_dir() -> anyhow::Result<()> {
        let spec = TaskSpec::try_from(assign(vec![
            vec![text("scrape")],
            vec![text("--out="), out(), text("/day.json")],
            vec![out()],
            vec![],
        ]))?;
        assert_eq!(spec.timeout, Some(Duration::from_millis(1500)));
        let argv = build_argv(&spec.argv, Path::new("/w/lease-1/out"));
        let expected: Vec<OsString> = [
            "scrape",
            "--out=/w/lease-1/out/day.json",
            "/w/lease-1/out",
            "",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        assert_eq!(argv, expected);
        Ok(())
    }

    #[test]
    fn malformed_assignments_are_rejected() {
        let reject = |assign: Assign| TaskSpec::try_from(assign).expect_err("invalid").to_string();
        assert_eq!(reject(assign(vec![])), "invalid assignment: argv is empty");
        assert_eq!(
            reject(assign(vec![vec![]])),
            "invalid assignment: argv[0] is empty"
        );
        let empty_part = ArgPart { part: None };
        assert_eq!(
            reject(assign(vec![vec![text("a")], vec![empty_part]])),
            "invalid assignment: argv[1] has an empty part"
        );
        for lease in ["", ".", "..", "a/b", "x\0"] {
            let mut bad = assign(vec![vec![text("true")]]);
            bad.lease_id = lease.into();
            assert!(
                reject(bad).contains("cannot name a directory"),
                "lease {lease:?}"
            );
        }
        let mut bad = assign(vec![vec![text("true")]]);
        bad.env.insert("A=B".into(), "1".into());
        assert!(reject(bad).contains("environment variable `A=B`"));
    }

    #[test]
    fn zero_timeout_means_none() -> anyhow::Result<()> {
        let mut no_timeout = assign(vec![vec![text("true")]]);
        no_timeout.timeout_ms = 0;
        assert_eq!(TaskSpec::try_from(no_timeout)?.timeout, None);
        Ok(())
    }

    #[test]
    fn child_env_layers_base_task_and_output_dir() {
        let base = vec![
            ("PATH".to_owned(), "/bin".to_owned()),
            ("HOME".to_owned(), "/home/a".to_owned()),
        ];
        let task: BTreeMap<String, String> = [
            ("HOME".to_owned(), "/task-home".to_owned()),
            ("ADCE_OUTPUT_DIR".to_owned(), "/spoofed".to_owned()),
            ("ADCE_TASK_ID".to_owned(), "7".to_owned()),
        ]
        .into_iter()
        .collect();
        let env = child_env(&base, &task, Path::new("/w/out"));
        let get = |name: &str| env.get(&OsString::from(name)).and_then(|v| v.to_str());
        assert_eq!(env.len(), 4);
        assert_eq!(get("PATH"), Some("/bin"));
        assert_eq!(get("HOME"), Some("/task-home"));
        assert_eq!(get("ADCE_TASK_ID"), Some("7"));
        assert_eq!(get("ADCE_OUTPUT_DIR"), Some("/w/out"));
    }

    #[test]
    fn messages_are_bounded_at_a_char_boundary() {
        let long = "é".repeat(MAX_MESSAGE_BYTES);
        let bounded = bounded_message(&long);
        assert!(bounded.ends_with(output::TRUNCATION_MARKER));
        assert!(bounded.len() <= MAX_MESSAGE_BYTES + output::TRUNCATION_MARKER.len());
        assert_eq!(bounded_message("short"), "short");
    }
}
