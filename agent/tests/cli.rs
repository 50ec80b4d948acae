//! The real `adce-agent` binary: flag errors exit non-zero with a clear
//! message, and SIGTERM / SIGINT stop a running agent with exit code 0.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BINARY: &str = env!("CARGO_BIN_EXE_adce-agent");
/// Longest wait for the binary to start or stop.
const WAIT: Duration = Duration::from_secs(15);

/// Nothing listens on port 1: the agent keeps retrying to connect.
const NO_SERVER: &str = "http://127.0.0.1:1";

fn agent(work_dir: &std::path::Path, server: &str) -> Command {
    let mut command = Command::new(BINARY);
    command
        .args(["--server", server, "--id", "cli-test"])
        .arg("--work-dir")
        .arg(work_dir)
        .env_remove("ADCE_SERVER")
        .env_remove("ADCE_LABELS")
        .env_remove("ADCE_SLOTS")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Reads stderr until a line containing `needle`; returns the lines read.
async fn wait_for_log(child: &mut Child, needle: &str) -> anyhow::Result<Vec<String>> {
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow!("stderr not piped"))?;
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await? {
            let found = line.contains(needle);
            seen.push(line);
            if found {
                return Ok(());
            }
        }
        Err(anyhow!("stderr ended before `{needle}`: {seen:?}"))
    })
    .await
    .context("timed out waiting for a log line")??;
    // Keep draining stderr so the agent never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(seen)
}

async fn stops_cleanly_on(signal: Signal) -> anyhow::Result<()> {
    let work_dir = tempfile::tempdir()?;
    let mut child = agent(work_dir.path(), NO_SERVER)
        .arg("--log-format")
        .arg("json")
        .spawn()?;
    let lines = wait_for_log(&mut child, "agent starting").await?;
    // JSON log lines on stderr.
    let last = lines.last().ok_or_else(|| anyhow!("no log line"))?;
    assert!(
        last.starts_with('{') && last.contains("\"agent\":\"cli-test\""),
        "{last}"
    );
    let pid = child.id().ok_or_else(|| anyhow!("no pid"))?;
    kill(Pid::from_raw(i32::try_from(pid)?), signal)?;
    let status = tokio::time::timeout(WAIT, child.wait()).await??;
    assert!(status.success(), "exit status {status:?} after {signal}");
    Ok(())
}

#[tokio::test]
async fn sigterm_stops_the_agent_with_exit_code_zero() -> anyhow::Result<()> {
    stops_cleanly_on(Signal::SIGTERM).await
}

#[tokio::test]
async fn sigint_stops_the_agent_with_exit_code_zero() -> anyhow::Result<()> {
    stops_cleanly_on(Signal::SIGINT).await
}

#[tokio::test]
async fn bad_flags_fail_with_a_clear_message() -> anyhow::Result<()> {
    let work_dir = tempfile::tempdir()?;
    let output = agent(work_dir.path(), NO_SERVER)
        .args(["--labels", "region=eu,oops"])
        .stderr(Stdio::piped())
        .output()
        .await?;
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("invalid label `oops`: expected key=value"),
        "{stderr}"
    );

    let output = agent(work_dir.path(), "not a uri").output().await?;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("invalid server address `not a uri`"),
        "{stderr}"
    );
    Ok(())
}
