//! The real `adce-agent` binary: flag errors exit non-zero with a clear
//! message, the token never reaches the log (even at trace level) while the
//! allowlist does, and SIGTERM / SIGINT stop a running agent with exit code 0.

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
        .env_remove("ADCE_TOKEN")
        .env_remove("ADCE_TOKEN_FILE")
        .env_remove("ADCE_ALLOW_COMMAND")
        .env_remove("ADCE_CA_FILE")
        .env_remove("ADCE_CERT_FILE")
        .env_remove("ADCE_KEY_FILE")
        .env_remove("ADCE_TLS_NAME")
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
        stderr.contains(r#"invalid server address \"not a uri\""#),
        "{stderr}"
    );

    let output = agent(work_dir.path(), NO_SERVER)
        .args(["--allow-command", "relative/dir"])
        .output()
        .await?;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--allow-command relative/dir: the prefix must be an absolute path"),
        "{stderr}"
    );

    let missing = work_dir.path().join("no-such-token");
    let output = agent(work_dir.path(), NO_SERVER)
        .arg("--token-file")
        .arg(&missing)
        .output()
        .await?;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot read token file"), "{stderr}");
    Ok(())
}

#[tokio::test]
async fn the_token_is_never_logged_and_the_allowlist_is() -> anyhow::Result<()> {
    let work_dir = tempfile::tempdir()?;
    let mut child = agent(work_dir.path(), NO_SERVER)
        .env("ADCE_TOKEN", "s3cret-token-value")
        .env("ADCE_ALLOW_COMMAND", "/opt/scrapers:/usr/local/bin")
        .env("RUST_LOG", "trace")
        .spawn()?;
    let lines = wait_for_log(&mut child, "cannot connect to the server").await?;
    let pid = child.id().ok_or_else(|| anyhow!("no pid"))?;
    kill(Pid::from_raw(i32::try_from(pid)?), Signal::SIGTERM)?;
    let status = tokio::time::timeout(WAIT, child.wait()).await??;
    assert!(status.success(), "exit status {status:?}");
    let all = lines.join("\n");
    assert!(!all.contains("s3cret"), "{all}");

    // `--help` names the variable but never shows its value.
    let help = agent(work_dir.path(), NO_SERVER)
        .env("ADCE_TOKEN", "s3cret-token-value")
        .arg("--help")
        .stdout(Stdio::piped())
        .output()
        .await?;
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("[env: ADCE_TOKEN]"), "{help}");
    assert!(!help.contains("s3cret"), "{help}");
    assert!(
        all.contains("only commands under --allow-command run on this host")
            && all.contains("/opt/scrapers, /usr/local/bin"),
        "{all}"
    );
    Ok(())
}
