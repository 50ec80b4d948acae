//! Retries and operator controls end to end: a flaky scraper ends done after
//! its third attempt; one that always fails ends dead after `max_attempts` with
//! growing gaps between attempts; data that does not exist yet (exit 69) is not
//! run again before `recheck_after`; `adcectl retry` puts dead tasks back and
//! `adcectl cancel` kills a running one.

use std::time::Duration;

use adce_tests::{
    AgentProc, ServerProc, TestDir, all_tasks, base_config, free_addr, log_entries, state_of,
    task_id, wait_only_task, wait_until,
};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(200);

/// One source of one partition run by `script` with the given retry policy and
/// extra scraper/source settings.
fn config(
    listen: std::net::SocketAddr,
    script: &str,
    retry: &str,
    env: &str,
    source_extra: &str,
) -> String {
    format!(
        "{base}scrapers:
  s:
    command: [\"{{config_dir}}/scrapers/{script}\"]
    timeout: 60s
    retry: {retry}
    env: {env}
sources:
  - name: feed
    scraper: s
{source_extra}    partitions:
      values: {{var: item, values: [\"x1\"]}}
    objects: [\"feed/{{item}}.json\"]
",
        base = base_config(listen)
    )
}

fn attempts(server: &ServerProc, id: &str) -> Vec<Value> {
    server.ctl_json(&["task", id])["attempts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn flaky_scraper_is_done_after_its_third_attempt() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let path = dir.write_config(
        "adce.yaml",
        &config(
            listen,
            "flaky.sh",
            "{max_attempts: 5, backoff: 100ms}",
            "{}",
            "",
        ),
    );
    let server = ServerProc::start(&path, listen);
    let _agent = AgentProc::start(&server.url(), "a1", 1, &[], dir.path());
    let task = wait_only_task(&server.url(), "done");
    let outcomes: Vec<String> = attempts(&server, &task_id(&task))
        .iter()
        .map(|a| a["outcome"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(outcomes, ["failed", "failed", "succeeded"]);
    assert!(dir.path().join("lake/feed/x1.json").is_file());
}

#[test]
fn failing_scraper_dies_after_max_attempts_with_growing_backoff() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let path = dir.write_config(
        "adce.yaml",
        &config(
            listen,
            "fail.sh",
            "{max_attempts: 4, backoff: 300ms, multiplier: 2.0, jitter: 0}",
            "{}",
            "",
        ),
    );
    let server = ServerProc::start(&path, listen);
    let _agent = AgentProc::start(&server.url(), "a1", 1, &[], dir.path());
    let task = wait_only_task(&server.url(), "dead");
    let list = attempts(&server, &task_id(&task));
    assert_eq!(list.len(), 4, "{list:#?}");
    let starts: Vec<i64> = list
        .iter()
        .filter_map(|a| a["started_unix_ms"].as_i64())
        .collect();
    let gaps: Vec<i64> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    // Backoffs of 300, 600 and 1200 ms after each failure.
    for (gap, backoff) in gaps.iter().zip([300, 600, 1200]) {
        assert!(*gap >= backoff, "gaps {gaps:?}");
    }
    assert!(gaps[2] > gaps[0], "gaps do not grow: {gaps:?}");
    assert!(
        task["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("exit code 3")),
        "{task:#}"
    );
}

#[test]
fn unavailable_data_waits_for_its_recheck_time() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let journal = dir.path().join("journal.txt");
    let path = dir.write_config(
        "adce.yaml",
        &config(
            listen,
            "unavailable.sh",
            "{max_attempts: 5, backoff: 100ms}",
            "{JOURNAL: \"{config_dir}/journal.txt\"}",
            "    recheck_after: 1h\n",
        ),
    );
    let server = ServerProc::start(&path, listen);
    let _agent = AgentProc::start(&server.url(), "a1", 1, &[], dir.path());
    let task = wait_only_task(&server.url(), "unavailable");
    // Neither the loop nor a reconcile asked for by hand runs it again
    // before its recheck time.
    let reconciled = server.ctl(&["reconcile"]);
    assert!(reconciled.status.success());
    std::thread::sleep(Duration::from_secs(2));
    let runs = std::fs::read_to_string(&journal).unwrap_or_default();
    assert_eq!(runs.lines().count(), 1, "journal: {runs}");
    let now = all_tasks(&server.url(), &[]);
    assert_eq!(now.len(), 1);
    assert_eq!(state_of(&now[0]), "unavailable");
    assert_eq!(now[0]["attempts"], 1);
    let ready = now[0]["ready_unix_ms"].as_i64().unwrap_or(0);
    let updated = task["updated_unix_ms"].as_i64().unwrap_or(0);
    assert!(
        ready - updated >= 3_500_000,
        "recheck in {} ms",
        ready - updated
    );
}

#[test]
fn operators_retry_dead_tasks_by_source_and_state() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let path = dir.write_config(
        "adce.yaml",
        &config(
            listen,
            "gate.sh",
            "{max_attempts: 1, backoff: 100ms}",
            "{GATE: \"{config_dir}/gate\"}",
            "",
        ),
    );
    let server = ServerProc::start(&path, listen);
    let _agent = AgentProc::start(&server.url(), "a1", 1, &[], dir.path());
    let task = wait_only_task(&server.url(), "dead");
    let id = task_id(&task);

    // Retrying a task that is not dead/cancelled/unavailable is refused.
    let missing = server.ctl(&["retry", "999999"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("999999"));

    std::fs::write(dir.path().join("gate"), b"open").unwrap_or_default();
    let retried = server.ctl_json(&["retry", "--source", "feed", "--state", "dead"]);
    assert_eq!(
        retried["retried"],
        serde_json::json!([id.parse::<i64>().unwrap_or(0)])
    );
    let done = wait_only_task(&server.url(), "done");
    assert_eq!(done["attempts"], 1, "attempts reset by the retry: {done:#}");
    let detail = server.ctl_json(&["task", &id]);
    let logs = detail["logs"].as_array().cloned().unwrap_or_default();
    assert!(
        logs.iter().any(|l| l["message"] == "gate closed"),
        "task logs: {logs:#?}"
    );
    assert!(
        logs.iter()
            .any(|l| l["message"] == "retried by an operator"),
        "task logs: {logs:#?}"
    );
}

#[test]
fn cancel_kills_a_running_task() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let path = dir.write_config(
        "adce.yaml",
        &config(
            listen,
            "write_expected.sh",
            "{max_attempts: 3, backoff: 100ms}",
            "{SLEEP: \"30\"}",
            "",
        ),
    );
    let server = ServerProc::start(&path, listen);
    let _agent = AgentProc::start(&server.url(), "a1", 1, &[], dir.path());
    let task = wait_only_task(&server.url(), "leased");
    let id = task_id(&task);
    let cancelled = server.ctl_json(&["cancel", &id, "--reason", "wrong day"]);
    assert_eq!(cancelled["previous_state"], "leased");
    let task = wait_only_task(&server.url(), "cancelled");
    assert!(
        task["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("wrong day")),
        "{task:#}"
    );
    let list = attempts(&server, &id);
    assert_eq!(
        list.last().map(|a| a["outcome"].clone()),
        Some("cancelled".into())
    );
    // The agent killed the scraper at once and reported it; the report comes
    // after the lease ended, so the server refuses it as late.
    let lease = list
        .last()
        .and_then(|a| a["lease_id"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(!lease.is_empty(), "{list:#?}");
    wait_until("the agent's report of the kill", TIMEOUT, POLL, || {
        let entries = log_entries(&server.url(), 500, &[]);
        let refused = entries.iter().any(|e| {
            e["message"].as_str().is_some_and(|m| {
                m.starts_with(&format!("result for lease {lease}")) && m.contains("refused")
            })
        });
        if refused { Ok(()) } else { Err(entries) }
    });
    assert!(!dir.path().join("lake/feed/x1.json").exists());
    assert_eq!(state_of(&all_tasks(&server.url(), &[])[0]), "cancelled");
    // Cancelling again is refused with a clear message.
    let again = server.ctl(&["cancel", &id]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("cancelled"));
}
