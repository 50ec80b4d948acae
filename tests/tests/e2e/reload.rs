//! Reload while tasks run: `adcectl reload` (or SIGHUP) changes a limit
//! group's rate without a restart, every task still runs exactly once, and a
//! config with errors is refused while the running one stays.

use std::collections::HashSet;
use std::time::Duration;

use adce_tests::{
    AgentProc, ServerProc, TestDir, all_tasks, base_config, free_addr, log_entries, state_of, text,
    wait_until,
};
use nix::sys::signal::Signal;

const TASKS: usize = 24;
/// Starts before the reload, at the slow rate.
const SLOW_STARTS: usize = 4;
const TIMEOUT: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(100);

fn config(listen: std::net::SocketAddr, rate: &str) -> String {
    let items: Vec<String> = (0..TASKS).map(|i| format!("\"i{i:02}\"")).collect();
    format!(
        "{base}limits:
  upstream: {{rate: {rate}, burst: 1, max_concurrent: 4}}
scrapers:
  marked:
    command: [\"{{config_dir}}/scrapers/marks.sh\"]
    env:
      JOURNAL: \"{{config_dir}}/journal.txt\"
      SLEEP: \"0.2\"
    timeout: 30s
    limits: [upstream]
sources:
  - name: items
    scraper: marked
    partitions:
      values: {{var: item, values: [{items}]}}
    objects: [\"items/{{item}}.json\"]
",
        base = base_config(listen),
        items = items.join(", ")
    )
}

/// Start times (ms) of the server's assignments, sorted.
fn assignment_times(url: &str) -> Vec<i64> {
    let mut times: Vec<i64> = log_entries(url, 10_000, &[])
        .iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("assigned"))
        })
        .filter_map(|e| e["unix_ms"].as_i64())
        .collect();
    times.sort_unstable();
    times
}

fn mean_gap(times: &[i64]) -> f64 {
    if times.len() < 2 {
        return f64::NAN;
    }
    (times[times.len() - 1] - times[0]) as f64 / (times.len() - 1) as f64
}

#[test]
fn reload_changes_a_group_rate_while_tasks_run() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let path = dir.write_config("adce.yaml", &config(listen, "1/s"));
    let server = ServerProc::start(&path, listen);
    let url = server.url();
    let _agents: Vec<AgentProc> = ["a1", "a2"]
        .iter()
        .map(|id| AgentProc::start(&url, id, 2, &[], dir.path()))
        .collect();

    wait_until("a few slow starts", TIMEOUT, POLL, || {
        let n = assignment_times(&url).len();
        if n >= SLOW_STARTS { Ok(()) } else { Err(n) }
    });
    dir.write_config("adce.yaml", &config(listen, "50/s"));
    // Taken before the reload: a start stamped earlier surely ran at the old
    // rate (the new one may apply before adcectl returns).
    let reload_ms = chrono::Utc::now().timestamp_millis();
    let reloaded = server.ctl_json(&["reload"]);
    assert!(
        reloaded["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("reloaded")),
        "{reloaded:#}"
    );
    assert_eq!(reloaded["needs_restart"], serde_json::json!([]));

    wait_until("every task done", TIMEOUT, POLL, || {
        let tasks = all_tasks(&url, &[]);
        let done = tasks.iter().filter(|t| state_of(t) == "done").count();
        if tasks.len() == TASKS && done == TASKS {
            Ok(())
        } else {
            Err(done)
        }
    });

    // Nothing lost or duplicated: one run and one assignment per task.
    let journal = std::fs::read_to_string(dir.path().join("journal.txt")).unwrap_or_default();
    let starts: Vec<&str> = journal
        .lines()
        .filter(|l| l.starts_with("start "))
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    assert_eq!(starts.len(), TASKS, "journal: {journal}");
    assert_eq!(starts.iter().collect::<HashSet<_>>().len(), TASKS);
    let times = assignment_times(&url);
    assert_eq!(times.len(), TASKS);

    // The new rate took effect without a restart: starts before the reload
    // came about a second apart, the rest much faster.
    let (before, after): (Vec<i64>, Vec<i64>) = times.iter().partition(|t| **t < reload_ms);
    assert!(before.len() >= SLOW_STARTS, "{before:?}");
    assert!(after.len() >= TASKS / 2, "{after:?}");
    let (slow, fast) = (mean_gap(&before), mean_gap(&after));
    assert!(slow >= 800.0, "starts before the reload {slow} ms apart");
    assert!(fast <= 400.0, "starts after the reload {fast} ms apart");
}

#[test]
fn a_broken_config_is_refused_and_the_running_one_stays() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let good = config(listen, "10/s");
    let path = dir.write_config("adce.yaml", &good);
    let mut server = ServerProc::start(&path, listen);

    // adcectl reload says why, with the position.
    dir.write_config("adce.yaml", &good.replace("rate: 10/s", "rate: fast"));
    let refused = server.ctl(&["reload"]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = text(&refused.stderr);
    assert!(stderr.contains("adce.yaml:"), "{stderr}");
    assert!(stderr.contains("running config stays"), "{stderr}");

    // SIGHUP with the same file: logged, nothing changes, the server runs on.
    server.proc().signal(Signal::SIGHUP);
    wait_until("the refused reload in the log", TIMEOUT, POLL, || {
        let refusals = log_entries(&server.url(), 200, &[])
            .iter()
            .filter(|e| {
                e["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("reload refused"))
            })
            .count();
        if refusals >= 2 { Ok(()) } else { Err(refusals) }
    });
    let _agent = AgentProc::start(&server.url(), "a1", 2, &[], dir.path());
    wait_until("every task done", TIMEOUT, POLL, || {
        let tasks = all_tasks(&server.url(), &[]);
        let done = tasks.iter().filter(|t| state_of(t) == "done").count();
        if done == TASKS { Ok(()) } else { Err(done) }
    });
}
