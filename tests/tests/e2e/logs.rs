//! The log stream: one noisy scraper cannot drown the log (its lines are kept
//! at a bounded rate and the drop is reported), and `adcectl logs --follow`
//! survives a server restart with every line arriving once, in order.

use std::process::{Command, Stdio};
use std::time::Duration;

use adce_tests::{
    AgentProc, ServerProc, TestDir, all_tasks, base_config, bin, free_addr, log_entries, state_of,
    wait_until,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);

fn config(listen: std::net::SocketAddr, script: &str, items: &[&str]) -> String {
    let items: Vec<String> = items.iter().map(|i| format!("\"{i}\"")).collect();
    format!(
        "{base}scrapers:
  s:
    command: [\"{{config_dir}}/scrapers/{script}\"]
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

#[test]
fn a_noisy_scraper_is_kept_at_a_bounded_rate() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let path = dir.write_config("adce.yaml", &config(listen, "noisy.sh", &["n1"]));
    let server = ServerProc::start(&path, listen);
    let _agent = AgentProc::start(&server.url(), "a1", 1, &[], dir.path());
    let id = wait_until("the task done", TIMEOUT, POLL, || {
        let tasks = all_tasks(&server.url(), &[]);
        match tasks.as_slice() {
            [task] if state_of(task) == "done" => Ok(task["id"].to_string()),
            _ => Err(tasks),
        }
    });
    let entries = log_entries(&server.url(), 100_000, &["--task", &id]);
    let stdout = entries.iter().filter(|e| e["stream"] == "stdout").count();
    assert!(stdout >= 1000, "only {stdout} lines kept");
    assert!(stdout < 20_000, "all {stdout} lines kept: no bound");
    assert!(
        entries.iter().any(|e| e["message"]
            .as_str()
            .is_some_and(|m| m.contains("output lines dropped (over"))),
        "no drop reported"
    );
}

#[test]
fn follow_survives_a_server_restart_without_losing_or_repeating_lines() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let path = dir.write_config(
        "adce.yaml",
        &config(listen, "write_expected.sh", &["a", "b"]),
    );
    let mut server = ServerProc::start(&path, listen);
    let url = server.url();
    let out =
        std::fs::File::create(dir.path().join("follow.jsonl")).unwrap_or_else(|e| panic!("{e}"));
    let mut follow = Command::new(bin("adcectl"))
        .args([
            "--server", &url, "--json", "logs", "--tail", "1000", "--follow",
        ])
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start adcectl logs --follow: {e}"));
    let follow_pid = Pid::from_raw(i32::try_from(follow.id()).unwrap_or(0));

    let agent = AgentProc::start(&url, "a1", 1, &[], dir.path());
    wait_until("both tasks done", TIMEOUT, POLL, || {
        let done = all_tasks(&url, &[])
            .iter()
            .filter(|t| state_of(t) == "done")
            .count();
        if done == 2 { Ok(()) } else { Err(done) }
    });
    drop(agent);
    assert!(server.terminate().success());
    // Restarted on the same state and port: new entries get later sequence numbers.
    let server = ServerProc::start(&path, listen);
    let lines = || std::fs::read_to_string(dir.path().join("follow.jsonl")).unwrap_or_default();
    wait_until("the restart's entries followed", TIMEOUT, POLL, || {
        let started = lines().matches("started on").count();
        if started >= 2 { Ok(()) } else { Err(started) }
    });
    let _ = kill(follow_pid, Signal::SIGTERM);
    let _ = follow.wait();

    let followed: Vec<serde_json::Value> = lines()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let seqs: Vec<u64> = followed.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "out of order or repeated: {seqs:?}"
    );
    // Everything the server has, from the first followed entry on, arrived.
    let stored: Vec<u64> = log_entries(&server.url(), 100_000, &[])
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .filter(|s| *s >= seqs[0] && *s <= *seqs.last().unwrap_or(&0))
        .collect();
    assert_eq!(seqs, stored, "lines lost");
}
