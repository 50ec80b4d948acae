//! Scrapers that fail: the exit code and the last stderr line reach the task's
//! `last_error`, its attempts and the log stream; a scraper that exits 0
//! without writing its object fails with a clear message.

use adce_tests::{
    AgentProc, ServerProc, TestDir, base_config, count, free_addr, json_text, status, task_id,
    text, wait_only_task,
};
use serde_json::Value;

/// A config with one source of one partition run by `script` with
/// `max_attempts` attempts.
fn one_task_config(listen: std::net::SocketAddr, script: &str, max_attempts: u32) -> String {
    format!(
        "{base}scrapers:
  broken:
    command: [\"{{config_dir}}/scrapers/{script}\"]
    timeout: 30s
    retry: {{max_attempts: {max_attempts}, backoff: 200ms}}
sources:
  - name: feed
    scraper: broken
    partitions:
      values: {{var: item, values: [\"x1\"]}}
    objects: [\"feed/{{item}}.json\"]
",
        base = base_config(listen)
    )
}

#[test]
fn failing_scraper_records_exit_code_and_stderr() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let config_path = dir.write_config("adce.yaml", &one_task_config(listen, "fail.sh", 2));
    let server = ServerProc::start(&config_path, listen);
    let _agent = AgentProc::start(&server.url(), "a1", 1, &[], dir.path());

    let task = wait_only_task(&server.url(), "dead");
    let last_error = task["last_error"].as_str().unwrap_or_default();
    assert!(
        last_error.contains("exit code 3"),
        "last_error: {last_error:?}"
    );
    assert!(
        last_error.contains("upstream 503"),
        "last_error: {last_error:?}"
    );
    assert_eq!(task["attempts"], 2, "{task:#}");

    let id = task_id(&task);
    let detail = server.ctl_json(&["task", &id]);
    let attempts = detail["attempts"].as_array().cloned().unwrap_or_default();
    assert_eq!(attempts.len(), 2, "{detail:#}");
    for attempt in &attempts {
        assert_eq!(attempt["exit_code"], 3, "{detail:#}");
        assert_eq!(attempt["agent_id"], "a1", "{detail:#}");
        assert_eq!(attempt["outcome"], "failed", "{detail:#}");
    }
    assert_eq!(count(&status(&server.url()), "/tasks/dead"), 1);

    // The scraper's stderr reached the server's log stream.
    let logs = server.ctl(&["logs", "--tail", "200"]);
    assert!(
        logs.status.success(),
        "adcectl logs failed: {}",
        text(&logs.stderr)
    );
    let human = text(&logs.stdout);
    assert!(
        human.contains("something broke: upstream 503"),
        "adcectl logs --tail 200 printed:\n{human}"
    );
    let json_logs = server.ctl(&["--json", "logs", "--tail", "200", "--task", &id]);
    assert!(
        json_logs.status.success(),
        "adcectl logs --json failed: {}",
        text(&json_logs.stderr)
    );
    let entries: Vec<Value> = text(&json_logs.stdout)
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("adcectl logs --json printed a bad line ({e}): {line}"))
        })
        .collect();
    let stderr_line = entries.iter().find(|entry| {
        entry["message"]
            .as_str()
            .unwrap_or_default()
            .contains("something broke: upstream 503")
    });
    let Some(stderr_line) = stderr_line else {
        panic!("no JSON log entry with the scraper's stderr line: {entries:#?}");
    };
    assert_eq!(stderr_line["stream"], "stderr", "{stderr_line:#}");
    assert_eq!(json_text(&stderr_line["task_id"]), id, "{stderr_line:#}");
}

#[test]
fn scraper_that_writes_nothing_fails_clearly() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let config_path =
        dir.write_config("adce.yaml", &one_task_config(listen, "write_nothing.sh", 1));
    let server = ServerProc::start(&config_path, listen);
    let _agent = AgentProc::start(&server.url(), "a1", 1, &[], dir.path());

    let task = wait_only_task(&server.url(), "dead");
    let last_error = task["last_error"].as_str().unwrap_or_default();
    assert!(
        last_error.contains("was not produced"),
        "last_error: {last_error:?}"
    );
    assert!(
        last_error.contains("feed/x1.json"),
        "last_error: {last_error:?}"
    );
    assert_eq!(task["attempts"], 1, "{task:#}");
    assert!(
        !dir.join("lake/feed/x1.json").exists(),
        "an object appeared from nowhere"
    );
}
