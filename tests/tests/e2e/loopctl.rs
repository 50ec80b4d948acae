//! Loop controls end to end: nothing is assigned while the loop is stopped
//! and the backlog drains after `start`; `stop --now` cancels running tasks
//! back into the queue; `restart` reconciles and resumes.

use std::time::Duration;

use adce_tests::{
    AgentProc, ServerProc, TestDir, all_tasks, base_config, count_state, free_addr, log_entries,
    state_of, wait_until,
};

const TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);

fn config(listen: std::net::SocketAddr, script: &str, items: usize, env: &str) -> String {
    let items: Vec<String> = (0..items).map(|i| format!("\"i{i:02}\"")).collect();
    format!(
        "{base}scrapers:
  s:
    command: [\"{{config_dir}}/scrapers/{script}\"]
    env: {env}
sources:
  - name: items
    scraper: s
    partitions:
      values: {{var: item, values: [{items}]}}
    objects: [\"items/{{item}}.json\"]
",
        base = base_config(listen),
        items = items.join(", ")
    )
}

fn assigned_after(url: &str, since_ms: i64) -> usize {
    log_entries(url, 10_000, &[])
        .iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("assigned"))
                && e["unix_ms"].as_i64().is_some_and(|t| t > since_ms)
        })
        .count()
}

#[test]
fn nothing_is_assigned_while_stopped_and_the_backlog_drains_after_start() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let path = dir.write_config(
        "adce.yaml",
        &config(listen, "write_expected.sh", 20, "{SLEEP: \"0.2\"}"),
    );
    let server = ServerProc::start(&path, listen);
    let url = server.url();
    let _agent = AgentProc::start(&url, "a1", 1, &[], dir.path());
    wait_until("a few tasks done", TIMEOUT, POLL, || {
        let done = count_state(&url, "done");
        if done >= 3 { Ok(()) } else { Err(done) }
    });

    let stopped = server.ctl_json(&["stop"]);
    assert_eq!(stopped["paused"], true, "{stopped:#}");
    let stop_ms = chrono::Utc::now().timestamp_millis();
    // The running task may finish; nothing new starts.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(assigned_after(&url, stop_ms), 0);
    let pending = count_state(&url, "pending");
    assert!(pending > 0, "nothing left to hold back");
    assert_eq!(count_state(&url, "leased"), 0);
    assert_eq!(server.ctl_json(&["status"])["loop"]["paused"], true);

    let started = server.ctl_json(&["start"]);
    assert_eq!(started["paused"], false, "{started:#}");
    wait_until("the backlog drained", TIMEOUT, POLL, || {
        let done = count_state(&url, "done");
        if done == 20 { Ok(()) } else { Err(done) }
    });
    assert!(assigned_after(&url, stop_ms) >= pending);
}

#[test]
fn stop_now_cancels_running_tasks_back_into_the_queue() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let hold = dir.path().join("hold");
    std::fs::write(&hold, b"hold").unwrap_or_default();
    let path = dir.write_config(
        "adce.yaml",
        &config(listen, "hold.sh", 1, "{HOLD: \"{config_dir}/hold\"}"),
    );
    let server = ServerProc::start(&path, listen);
    let url = server.url();
    let _agent = AgentProc::start(&url, "a1", 1, &[], dir.path());
    wait_until("the task running", TIMEOUT, POLL, || {
        let leased = count_state(&url, "leased");
        if leased == 1 { Ok(()) } else { Err(leased) }
    });

    server.ctl_json(&["stop", "--now"]);
    let tasks = all_tasks(&url, &[]);
    assert_eq!(state_of(&tasks[0]), "pending", "{tasks:#?}");
    assert_eq!(tasks[0]["attempts"], 0, "a stopped attempt does not count");
    let id = tasks[0]["id"].to_string();
    let detail = server.ctl_json(&["task", &id]);
    assert_eq!(detail["attempts"][0]["outcome"], "cancelled", "{detail:#}");

    std::fs::remove_file(&hold).unwrap_or_default();
    server.ctl_json(&["start"]);
    wait_until("the task done", TIMEOUT, POLL, || {
        let done = count_state(&url, "done");
        if done == 1 { Ok(()) } else { Err(done) }
    });
    assert!(dir.path().join("lake/items/i00.json").is_file());
}

#[test]
fn restart_reconciles_and_resumes() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let path = dir.write_config("adce.yaml", &config(listen, "write_expected.sh", 3, "{}"));
    let server = ServerProc::start(&path, listen);
    let url = server.url();
    let _agent = AgentProc::start(&url, "a1", 1, &[], dir.path());
    wait_until("every task done", TIMEOUT, POLL, || {
        let done = count_state(&url, "done");
        if done == 3 { Ok(()) } else { Err(done) }
    });
    let file = dir.path().join("lake/items/i01.json");
    std::fs::remove_file(&file).unwrap_or_default();
    let restarted = server.ctl_json(&["restart"]);
    assert_eq!(restarted["paused"], false, "{restarted:#}");
    wait_until("the deleted object back", TIMEOUT, POLL, || {
        if file.is_file() {
            Ok(())
        } else {
            Err("missing")
        }
    });
}
