//! Graceful shutdown: SIGTERM to the server lets a running scraper finish and
//! upload before the server exits 0; SIGTERM to an agent likewise finishes its
//! task, then the agent exits 0; `adcectl drain` does the same remotely.

use std::time::Duration;

use adce_tests::{
    AgentProc, ServerProc, TestDir, all_tasks, base_config, free_addr, log_entries, wait_only_task,
    wait_until,
};

const TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);

/// One task whose scraper takes `sleep` seconds; runs are journalled.
fn config(listen: std::net::SocketAddr, sleep: &str) -> String {
    format!(
        "{base}scrapers:
  slow:
    command: [\"{{config_dir}}/scrapers/write_expected.sh\"]
    env:
      SLEEP: \"{sleep}\"
      COUNT_FILE: \"{{config_dir}}/count.txt\"
sources:
  - name: feed
    scraper: slow
    partitions:
      values: {{var: item, values: [\"x1\"]}}
    objects: [\"feed/{{item}}.json\"]
",
        base = base_config(listen).replace(
            "  lease_ttl: 3s\n",
            "  lease_ttl: 3s\n  shutdown_grace: 20s\n"
        )
    )
}

/// Waits until the scraper of the only task is running on its agent (its
/// first output line reached the log), not merely assigned.
fn wait_running(url: &str) {
    wait_until("the scraper running", TIMEOUT, POLL, || {
        let started = log_entries(url, 500, &[])
            .iter()
            .any(|e| e["stream"] == "stdout");
        if started {
            Ok(())
        } else {
            Err("no output yet")
        }
    });
}

fn runs(dir: &TestDir) -> usize {
    std::fs::read_to_string(dir.path().join("count.txt"))
        .unwrap_or_default()
        .lines()
        .count()
}

#[test]
fn server_sigterm_lets_a_running_task_finish() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let path = dir.write_config("adce.yaml", &config(listen, "2"));
    let mut server = ServerProc::start(&path, listen);
    let mut agent = AgentProc::start(&server.url(), "a1", 1, &[], dir.path());
    wait_running(&server.url());

    let status = server.terminate();
    assert!(status.success(), "server exited with {status}");
    // The scraper finished and its object was uploaded before the exit.
    assert!(dir.path().join("lake/feed/x1.json").is_file());
    assert_eq!(runs(&dir), 1);
    // The agent was told the server is going away (not to drain): it stays.
    assert!(
        agent.log().contains("server is stopping"),
        "agent log:\n{}",
        agent.log()
    );

    // The next start finds the task done: nothing runs again.
    let server = ServerProc::start(&path, listen);
    wait_only_task(&server.url(), "done");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(runs(&dir), 1);
    assert!(
        agent.proc().is_running(),
        "the agent exited with the server"
    );
}

#[test]
fn agent_sigterm_finishes_its_task_then_exits() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let path = dir.write_config("adce.yaml", &config(listen, "2"));
    let server = ServerProc::start(&path, listen);
    let mut agent = AgentProc::start(&server.url(), "a1", 1, &[], dir.path());
    wait_running(&server.url());

    let status = agent.terminate();
    assert!(status.success(), "agent exited with {status}");
    wait_only_task(&server.url(), "done");
    assert!(dir.path().join("lake/feed/x1.json").is_file());
    let tasks = all_tasks(&server.url(), &[]);
    assert_eq!(tasks[0]["attempts"], 1, "{tasks:#?}");
}

#[test]
fn adcectl_drain_finishes_the_agents_task_then_it_exits() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let path = dir.write_config("adce.yaml", &config(listen, "2"));
    let server = ServerProc::start(&path, listen);
    let mut agent = AgentProc::start(&server.url(), "a1", 1, &[], dir.path());
    wait_only_task(&server.url(), "leased");

    let drained = server.ctl_json(&["drain", "a1"]);
    assert_eq!(drained["running_tasks"].as_array().map(Vec::len), Some(1));
    wait_only_task(&server.url(), "done");
    let exited = wait_until("the agent exits", TIMEOUT, POLL, || {
        agent.proc().try_exit().ok_or("still running")
    });
    assert!(exited.success(), "agent exited with {exited}");
    let unknown = server.ctl(&["drain", "nobody"]);
    assert_eq!(unknown.status.code(), Some(1));
}
