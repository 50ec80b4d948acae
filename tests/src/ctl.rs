//! `adcectl` as a test runs it (bounded, against one server URL), its
//! `--json` output parsed, and helpers that read status, tasks and log
//! entries out of that JSON.

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::process::{COMMAND_TIMEOUT, bin, run_bounded, text, wait_until};

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
