//! The runner against real subprocesses (`sh`, `printf`, `sleep`): exit codes,
//! output forwarding, progress, the clean environment, timeouts and
//! cancellation that kill whole process groups, spawn failures, the
//! `--allow-command` list, and the collection and upload of output files
//! (through a recording uploader).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use adce_agent::backoff::BackoffPolicy;
use adce_agent::output::{MAX_LINE_BYTES, TRUNCATION_MARKER};
use adce_agent::runner::{ArgPiece, RunnerContext, TaskEvent, TaskSpec, run_task};
use adce_agent::upload::{UploadReceipt, UploadRetry, Uploader};
use adce_agent::{AllowList, Error};
use adce_proto::v1::{LogLine, Outcome, OutputStream, Progress, TaskResult};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Upper bound for any single task in these tests.
const TEST_DEADLINE: Duration = Duration::from_secs(20);

/// Records uploads (key and content); refuses or fails chosen keys.
#[derive(Default)]
struct Recorder {
    uploads: Mutex<Vec<(String, Vec<u8>)>>,
    refuse: HashSet<String>,
    fail: HashSet<String>,
}

impl Recorder {
    fn uploads(&self) -> Vec<(String, Vec<u8>)> {
        self.uploads.lock().map(|u| u.clone()).unwrap_or_default()
    }
}

impl Uploader for Recorder {
    async fn upload(&self, lease_id: &str, key: &str, path: &Path) -> Result<UploadReceipt, Error> {
        assert_eq!(lease_id, "lease-1");
        if self.refuse.contains(key) {
            return Err(Error::UploadRefused {
                key: key.to_owned(),
                message: "not an expected key".into(),
            });
        }
        if self.fail.contains(key) {
            return Err(Error::UploadFailed("Internal: disk full".into()));
        }
        let content = std::fs::read(path).map_err(|e| Error::UploadFailed(e.to_string()))?;
        let size = content.len() as u64;
        if let Ok(mut uploads) = self.uploads.lock() {
            uploads.push((key.to_owned(), content));
        }
        Ok(UploadReceipt {
            key: key.to_owned(),
            size,
            sha256: String::new(),
        })
    }
}

/// What one run produced.
struct Run {
    result: TaskResult,
    lines: Vec<LogLine>,
    progress: Vec<Progress>,
}

impl Run {
    fn texts(&self, stream: OutputStream) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|line| line.stream == i32::from(stream))
            .map(|line| line.text.as_str())
            .collect()
    }
}

fn text(value: &str) -> Vec<ArgPiece> {
    vec![ArgPiece::Text(value.to_owned())]
}

fn sh(script: &str) -> Vec<Vec<ArgPiece>> {
    vec![text("sh"), text("-c"), text(script)]
}

fn spec(argv: Vec<Vec<ArgPiece>>) -> TaskSpec {
    TaskSpec {
        lease_id: "lease-1".into(),
        task_id: 1,
        argv,
        env: BTreeMap::new(),
        timeout: None,
    }
}

fn context(work_dir: &Path) -> RunnerContext {
    RunnerContext {
        work_dir: work_dir.to_path_buf(),
        base_env: RunnerContext::inherited_env(),
        upload_retry: UploadRetry {
            backoff: BackoffPolicy {
                initial: Duration::from_millis(1),
                max: Duration::from_millis(5),
                jitter: 0.0,
            },
            attempts: 2,
        },
        allow: AllowList::everything(),
    }
}

async fn run_with(
    spec: TaskSpec,
    work_dir: &Path,
    uploader: &Recorder,
    cancel: &CancellationToken,
) -> anyhow::Result<Run> {
    run_in(spec, &context(work_dir), uploader, cancel).await
}

async fn run_in(
    spec: TaskSpec,
    ctx: &RunnerContext,
    uploader: &Recorder,
    cancel: &CancellationToken,
) -> anyhow::Result<Run> {
    let (events, mut receiver) = mpsc::channel(4096);
    let result = tokio::time::timeout(
        TEST_DEADLINE,
        run_task(spec, ctx, uploader, &events, cancel),
    )
    .await?;
    drop(events);
    let mut lines = Vec::new();
    let mut progress = Vec::new();
    while let Some(event) = receiver.recv().await {
        match event {
            TaskEvent::Logs(batch) => {
                assert_eq!(batch.lease_id, "lease-1");
                lines.extend(batch.lines);
            }
            TaskEvent::Progress(report) => progress.push(report),
        }
    }
    Ok(Run {
        result,
        lines,
        progress,
    })
}

async fn run(spec: TaskSpec) -> anyhow::Result<(Run, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let run = run_with(
        spec,
        dir.path(),
        &Recorder::default(),
        &CancellationToken::new(),
    )
    .await?;
    Ok((run, dir))
}

/// Whether `pid` is gone (or a zombie nobody reaps, which runs no code).
fn process_is_dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

/// Polls (bounded) until `pid` is dead.
async fn wait_dead(pid: i32) -> bool {
    for _ in 0..100 {
        if process_is_dead(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn first_pid(run: &Run) -> anyhow::Result<i32> {
    let line = run
        .texts(OutputStream::Stdout)
        .first()
        .copied()
        .ok_or_else(|| anyhow::anyhow!("no pid printed"))?;
    Ok(line.trim().parse()?)
}

#[tokio::test]
async fn exit_codes_and_last_stderr_line_are_reported() -> anyhow::Result<()> {
    let (ok, _dir) = run(spec(sh("exit 0"))).await?;
    assert_eq!(ok.result.outcome(), Outcome::Exited);
    assert_eq!(ok.result.exit_code, 0);
    assert_eq!(ok.result.message, "");

    let (failed, dir) = run(spec(sh(
        "echo first >&2; echo 'rate limited' >&2; echo >&2; exit 3",
    )))
    .await?;
    assert_eq!(failed.result.outcome(), Outcome::Exited);
    assert_eq!(failed.result.exit_code, 3);
    assert_eq!(failed.result.message, "rate limited");
    assert_eq!(failed.result.lease_id, "lease-1");
    // The task directory is gone afterwards.
    assert!(!dir.path().join("lease-1").exists());
    Ok(())
}

#[tokio::test]
async fn a_process_killed_by_a_foreign_signal_is_signaled() -> anyhow::Result<()> {
    let (killed, _dir) = run(spec(sh("kill -9 $$"))).await?;
    assert_eq!(killed.result.outcome(), Outcome::Signaled);
    assert_eq!(killed.result.signal, 9);
    assert_eq!(killed.result.message, "killed by signal 9");
    Ok(())
}

#[tokio::test]
async fn stdout_stderr_and_progress_are_forwarded() -> anyhow::Result<()> {
    let script = "echo out1; echo err1 >&2; echo '::progress:: 0.5 half way'; \
                  echo '::progress:: lots'; printf 'no newline'";
    let (run, _dir) = run(spec(sh(script))).await?;
    assert_eq!(run.result.outcome(), Outcome::Exited);
    assert_eq!(
        run.texts(OutputStream::Stdout),
        [
            "out1",
            "::progress:: 0.5 half way",
            "::progress:: lots",
            "no newline"
        ]
    );
    assert_eq!(run.texts(OutputStream::Stderr), ["err1"]);
    assert!(run.lines.iter().all(|line| line.unix_ms > 0));
    assert_eq!(run.progress.len(), 1);
    assert_eq!(run.progress[0].fraction, 0.5);
    assert_eq!(run.progress[0].message, "half way");
    assert_eq!(run.progress[0].lease_id, "lease-1");
    Ok(())
}

#[tokio::test]
async fn long_lines_are_truncated_with_a_marker() -> anyhow::Result<()> {
    let script = format!("printf '%0{}d\\nafter\\n' 0", MAX_LINE_BYTES * 3);
    let (run, _dir) = run(spec(sh(&script))).await?;
    let stdout = run.texts(OutputStream::Stdout);
    assert_eq!(stdout.len(), 2);
    assert_eq!(
        stdout[0],
        format!("{}{TRUNCATION_MARKER}", "0".repeat(MAX_LINE_BYTES))
    );
    assert_eq!(stdout[1], "after");
    Ok(())
}

#[tokio::test]
async fn many_lines_arrive_complete_and_in_order_in_bounded_batches() -> anyhow::Result<()> {
    let (run, _dir) = run(spec(sh(
        "i=0; while [ $i -lt 1000 ]; do echo line$i; i=$((i+1)); done",
    )))
    .await?;
    let stdout = run.texts(OutputStream::Stdout);
    assert_eq!(stdout.len(), 1000);
    assert_eq!(stdout[0], "line0");
    assert_eq!(stdout[999], "line999");
    Ok(())
}

#[tokio::test]
async fn child_environment_is_clean() -> anyhow::Result<()> {
    // A variable of this test process that is not one of PATH, HOME, LANG
    // (cargo sets several for every test binary).
    let leaked: Vec<String> = std::env::vars()
        .map(|(name, _)| name)
        .filter(|name| !["PATH", "HOME", "LANG"].contains(&name.as_str()))
        .collect();
    assert!(!leaked.is_empty(), "the test needs a variable to look for");

    let mut task = spec(vec![text("env")]);
    task.env.insert("ADCE_TASK_ID".into(), "42".into());
    task.env.insert("SCRAPER_MODE".into(), "fast".into());
    let dir = tempfile::tempdir()?;
    let run = run_with(
        task,
        dir.path(),
        &Recorder::default(),
        &CancellationToken::new(),
    )
    .await?;
    assert_eq!(run.result.outcome(), Outcome::Exited);
    let env: BTreeMap<&str, &str> = run
        .texts(OutputStream::Stdout)
        .into_iter()
        .filter_map(|line| line.split_once('='))
        .collect();
    let out_dir = dir.path().join("lease-1").join("out");
    assert_eq!(env.get("ADCE_OUTPUT_DIR").copied(), out_dir.to_str());
    assert_eq!(env.get("ADCE_TASK_ID").copied(), Some("42"));
    assert_eq!(env.get("SCRAPER_MODE").copied(), Some("fast"));
    assert_eq!(
        env.get("PATH").copied(),
        std::env::var("PATH").ok().as_deref()
    );
    for name in &leaked {
        assert!(
            !env.contains_key(name.as_str()),
            "{name} leaked into the child"
        );
    }
    // Nothing beyond the inherited three, the task's two and the output dir.
    let allowed = [
        "PATH",
        "HOME",
        "LANG",
        "ADCE_TASK_ID",
        "SCRAPER_MODE",
        "ADCE_OUTPUT_DIR",
    ];
    assert!(env.keys().all(|name| allowed.contains(name)), "{env:?}");
    Ok(())
}

#[tokio::test]
async fn timeout_kills_the_whole_process_group() -> anyhow::Result<()> {
    let mut task = spec(sh("sleep 1000 & echo $!; sleep 1000"));
    task.timeout = Some(Duration::from_millis(500));
    let (run, _dir) = run(task).await?;
    assert_eq!(run.result.outcome(), Outcome::TimedOut);
    assert_eq!(run.result.signal, 9);
    assert_eq!(run.result.message, "timed out after 500 ms");
    assert!(run.result.uploaded_keys.is_empty());
    let grandchild = first_pid(&run)?;
    assert!(
        wait_dead(grandchild).await,
        "grandchild {grandchild} survived the timeout"
    );
    Ok(())
}

#[tokio::test]
async fn cancel_kills_the_whole_process_group() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        trigger.cancel();
    });
    let task = spec(sh("sleep 1000 & echo $!; sleep 1000"));
    let run = run_with(task, dir.path(), &Recorder::default(), &cancel).await?;
    canceller.await?;
    assert_eq!(run.result.outcome(), Outcome::Cancelled);
    let grandchild = first_pid(&run)?;
    assert!(
        wait_dead(grandchild).await,
        "grandchild {grandchild} survived the cancel"
    );
    assert!(!dir.path().join("lease-1").exists());
    Ok(())
}

#[tokio::test]
async fn leftover_background_processes_die_when_the_scraper_exits() -> anyhow::Result<()> {
    // The scraper exits at once but leaves a child holding its stdout open.
    let (run, _dir) = run(spec(sh("sleep 1000 & echo $!"))).await?;
    assert_eq!(run.result.outcome(), Outcome::Exited);
    assert_eq!(run.result.exit_code, 0);
    let straggler = first_pid(&run)?;
    assert!(
        wait_dead(straggler).await,
        "background process {straggler} survived"
    );
    Ok(())
}

#[tokio::test]
async fn missing_or_non_executable_programs_fail_to_spawn() -> anyhow::Result<()> {
    let (missing, _dir) = run(spec(vec![text("/nonexistent/adce-scraper")])).await?;
    assert_eq!(missing.result.outcome(), Outcome::SpawnFailed);
    assert!(
        missing
            .result
            .message
            .contains("cannot start `/nonexistent/adce-scraper`")
            && missing.result.message.contains("No such file"),
        "{}",
        missing.result.message
    );

    let bin = tempfile::tempdir()?;
    let script = bin.path().join("not-executable.sh");
    std::fs::write(&script, "#!/bin/sh\nexit 0\n")?;
    let path = script
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-utf8 temp path"))?;
    let (denied, _dir) = run(spec(vec![text(path)])).await?;
    assert_eq!(denied.result.outcome(), Outcome::SpawnFailed);
    assert!(
        denied.result.message.contains("Permission denied"),
        "{}",
        denied.result.message
    );
    Ok(())
}

#[tokio::test]
async fn output_files_are_collected_recursively_and_symlinks_skipped() -> anyhow::Result<()> {
    let script = r#"mkdir -p "$ADCE_OUTPUT_DIR/season/2024" &&
        printf 'games' > "$ADCE_OUTPUT_DIR/season/2024/games.csv" &&
        printf 'top' > "$1/top.json" &&
        ln -s /etc/hostname "$ADCE_OUTPUT_DIR/link.json""#;
    // `{out}` is passed as `$1` to check argv substitution too.
    let argv = vec![
        text("sh"),
        text("-c"),
        text(script),
        text("scraper"),
        vec![ArgPiece::OutputDir],
    ];
    let dir = tempfile::tempdir()?;
    let recorder = Recorder::default();
    let run = run_with(spec(argv), dir.path(), &recorder, &CancellationToken::new()).await?;
    assert_eq!(
        run.result.outcome(),
        Outcome::Exited,
        "{}",
        run.result.message
    );
    assert_eq!(
        run.result.uploaded_keys,
        ["season/2024/games.csv", "top.json"]
    );
    assert_eq!(
        recorder.uploads(),
        [
            ("season/2024/games.csv".to_owned(), b"games".to_vec()),
            ("top.json".to_owned(), b"top".to_vec())
        ]
    );
    let notes = run.texts(OutputStream::Unspecified);
    assert_eq!(
        notes,
        ["adce-agent: skipped `link.json`: symbolic links are not uploaded"]
    );
    assert!(!dir.path().join("lease-1").exists());
    Ok(())
}

#[tokio::test]
async fn refused_keys_are_noted_and_failed_uploads_fail_the_task() -> anyhow::Result<()> {
    let script = r#"printf a > "$ADCE_OUTPUT_DIR/a" && printf b > "$ADCE_OUTPUT_DIR/b""#;
    let dir = tempfile::tempdir()?;

    let refusing = Recorder {
        refuse: HashSet::from(["a".to_owned()]),
        ..Recorder::default()
    };
    let run = run_with(
        spec(sh(script)),
        dir.path(),
        &refusing,
        &CancellationToken::new(),
    )
    .await?;
    assert_eq!(run.result.outcome(), Outcome::Exited);
    assert_eq!(run.result.uploaded_keys, ["b"]);
    assert_eq!(
        run.texts(OutputStream::Unspecified),
        ["adce-agent: upload skipped: server refused key `a`: not an expected key"]
    );

    let failing = Recorder {
        fail: HashSet::from(["b".to_owned()]),
        ..Recorder::default()
    };
    let run = run_with(
        spec(sh(script)),
        dir.path(),
        &failing,
        &CancellationToken::new(),
    )
    .await?;
    assert_eq!(run.result.outcome(), Outcome::UploadFailed);
    assert_eq!(run.result.exit_code, 0);
    assert_eq!(run.result.uploaded_keys, ["a"]);
    assert_eq!(
        run.result.message,
        "uploading `b`: upload failed: Internal: disk full"
    );
    Ok(())
}

#[tokio::test]
async fn a_failed_run_uploads_nothing_and_runs_in_its_task_dir() -> anyhow::Result<()> {
    let script = r#"printf partial > "$ADCE_OUTPUT_DIR/a"; pwd; echo broke >&2; exit 3"#;
    let dir = tempfile::tempdir()?;
    let recorder = Recorder::default();
    let run = run_with(
        spec(sh(script)),
        dir.path(),
        &recorder,
        &CancellationToken::new(),
    )
    .await?;
    assert_eq!(run.result.outcome(), Outcome::Exited);
    assert_eq!(run.result.exit_code, 3);
    assert_eq!(run.result.message, "broke");
    assert!(run.result.uploaded_keys.is_empty());
    assert!(recorder.uploads().is_empty(), "a failed run uploaded files");
    let cwd = run.texts(OutputStream::Stdout);
    assert_eq!(cwd.len(), 1);
    assert!(cwd[0].ends_with("/lease-1"), "scraper ran in {}", cwd[0]);
    Ok(())
}

/// Writes an executable shell script that records its `$0` in `marker`.
fn marking_script(path: &Path, marker: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(
        path,
        format!("#!/bin/sh\nprintf '%s' \"$0\" > '{}'\n", marker.display()),
    )?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn path_text(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .ok_or_else(|| anyhow::anyhow!("non-utf8 temp path {}", path.display()))
}

#[tokio::test]
async fn the_allowlist_runs_only_programs_under_its_prefixes() -> anyhow::Result<()> {
    let root_dir = tempfile::tempdir()?;
    let root = std::fs::canonicalize(root_dir.path())?;
    let marker = root.join("ran");
    let allowed = root.join("scrapers/ok.sh");
    let outside = root.join("scrapers-evil/x.sh");
    marking_script(&allowed, &marker)?;
    marking_script(&outside, &marker)?;
    std::os::unix::fs::symlink(&allowed, root.join("scrapers-evil/to-ok.sh"))?;
    let work = tempfile::tempdir()?;
    let mut ctx = context(work.path());
    ctx.allow = AllowList::new([root.join("scrapers/")])?;
    let recorder = Recorder::default();
    let cancel = CancellationToken::new();

    // Outside the prefix, directly or through `..`: refused, nothing runs.
    let dotdot = root.join("scrapers/../scrapers-evil/x.sh");
    for program in [&outside, &dotdot] {
        let run = run_in(
            spec(vec![text(path_text(program)?)]),
            &ctx,
            &recorder,
            &cancel,
        )
        .await?;
        assert_eq!(run.result.outcome(), Outcome::SpawnFailed, "{program:?}");
        assert_eq!(
            run.result.message,
            format!(
                "command {} is not allowed on this host (--allow-command {})",
                outside.display(),
                root.join("scrapers").display()
            )
        );
        assert!(!marker.exists(), "{program:?} ran");
        // The refusal is in the task's log too.
        assert!(
            run.texts(OutputStream::Unspecified)
                .iter()
                .any(|line| line.contains("is not allowed on this host")),
            "{:?}",
            run.lines
        );
    }
    // A bare name is looked up in PATH, and `sh` is not under the prefix.
    let run = run_in(spec(sh("exit 0")), &ctx, &recorder, &cancel).await?;
    assert_eq!(run.result.outcome(), Outcome::SpawnFailed);
    assert!(
        run.result.message.contains("is not allowed on this host"),
        "{}",
        run.result.message
    );

    // Inside, even through a link from outside: it runs, and what runs is
    // the checked real file (a script's `$0` is the path the kernel ran).
    let via_link = root.join("scrapers-evil/to-ok.sh");
    let run = run_in(
        spec(vec![text(path_text(&via_link)?)]),
        &ctx,
        &recorder,
        &cancel,
    )
    .await?;
    assert_eq!(
        run.result.outcome(),
        Outcome::Exited,
        "{}",
        run.result.message
    );
    assert_eq!(run.result.exit_code, 0);
    assert_eq!(std::fs::read_to_string(&marker)?, path_text(&allowed)?);
    Ok(())
}
