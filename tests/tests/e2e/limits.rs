//! Limit groups across agents: a group's rate and burst bound how many tasks
//! the server starts in any window, and its `max_concurrent` bounds how many
//! run at once — measured by the scrapers themselves, on three agents.

use std::time::Duration;

use adce_tests::{
    AgentProc, ServerProc, TestDir, all_tasks, base_config, free_addr, log_entries, state_of,
    wait_until,
};

/// Tasks in the group.
const TASKS: usize = 60;
/// The group: 5 starts a second, bursts of 5, at most 3 at once.
const RATE_PER_SEC: usize = 5;
const BURST: usize = 5;
const MAX_CONCURRENT: usize = 3;
/// How long the whole run may take (60 tasks at 5/s need about 11 s).
const DONE_TIMEOUT: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(250);

fn config(listen: std::net::SocketAddr) -> String {
    let items: Vec<String> = (0..TASKS).map(|i| format!("\"i{i:03}\"")).collect();
    format!(
        "{base}limits:
  upstream: {{rate: {RATE_PER_SEC}/s, burst: {BURST}, max_concurrent: {MAX_CONCURRENT}}}
scrapers:
  marked:
    command: [\"{{config_dir}}/scrapers/marks.sh\"]
    env:
      JOURNAL: \"{{config_dir}}/journal.txt\"
      SLEEP: \"0.3\"
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

/// The most events of `times` (ms, sorted) inside any window of `window` ms.
fn max_in_window(times: &[i64], window: i64) -> usize {
    let mut most = 0;
    let mut start = 0;
    for (end, t) in times.iter().enumerate() {
        while times[start] <= t - window {
            start += 1;
        }
        most = most.max(end + 1 - start);
    }
    most
}

#[test]
fn limit_group_bounds_starts_and_concurrency_across_agents() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let config_path = dir.write_config("adce.yaml", &config(listen));
    let server = ServerProc::start(&config_path, listen);
    let url = server.url();
    let _agents: Vec<AgentProc> = ["a1", "a2", "a3"]
        .iter()
        .map(|id| AgentProc::start(&url, id, 3, &[], dir.path()))
        .collect();

    wait_until("every task done", DONE_TIMEOUT, POLL, || {
        let tasks = all_tasks(&url, &[]);
        let done = tasks.iter().filter(|t| state_of(t) == "done").count();
        if tasks.len() == TASKS && done == TASKS {
            Ok(())
        } else {
            Err(format!("{done} of {} done", tasks.len()))
        }
    });

    // Server-side dispatch times: one "assigned" event per start.
    let mut starts: Vec<i64> = log_entries(&url, 10_000, &[])
        .iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("assigned"))
        })
        .filter_map(|e| e["unix_ms"].as_i64())
        .collect();
    starts.sort_unstable();
    assert_eq!(starts.len(), TASKS, "one start per task, no retries");
    let busiest = max_in_window(&starts, 1000);
    assert!(
        busiest <= BURST + RATE_PER_SEC,
        "{busiest} starts in one second, more than burst {BURST} + rate {RATE_PER_SEC}"
    );
    // The bucket really paced the starts: 60 starts at 5/s after a burst of 5
    // cannot fit in less than 11 s.
    let span = starts[TASKS - 1] - starts[0];
    let floor = ((TASKS - BURST) / RATE_PER_SEC) as i64 * 1000 - 500;
    assert!(span >= floor, "starts spanned only {span} ms");

    // Concurrency as the scrapers saw it.
    let journal = std::fs::read_to_string(dir.path().join("journal.txt")).unwrap_or_default();
    let mut events: Vec<(i64, i32)> = journal
        .lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let kind = parts.next()?;
            let ns: i64 = parts.next()?.parse().ok()?;
            Some((ns, if kind == "start" { 1 } else { -1 }))
        })
        .collect();
    assert_eq!(events.len(), TASKS * 2, "journal: {journal}");
    // Ends sort before starts at the same instant.
    events.sort_unstable();
    let mut running = 0;
    let mut most = 0;
    for (_, delta) in events {
        running += delta;
        most = most.max(running);
    }
    assert!(
        most as usize <= MAX_CONCURRENT,
        "{most} ran at once, more than max_concurrent {MAX_CONCURRENT}"
    );
}

#[test]
fn max_in_window_counts_half_open_windows() {
    assert_eq!(max_in_window(&[0, 100, 999, 1000, 1001], 1000), 4);
    assert_eq!(max_in_window(&[0, 2000, 4000], 1000), 1);
    assert_eq!(max_in_window(&[5, 5, 5], 1), 3);
}

#[test]
fn a_start_that_never_happens_gives_its_token_back() {
    let dir = TestDir::new();
    let listen = free_addr();
    // One start an hour; the program does not exist, so no start happens.
    let config = format!(
        "{base}limits:
  hourly: {{rate: 1/h, burst: 1}}
scrapers:
  missing:
    command: [\"{{config_dir}}/scrapers/does-not-exist\"]
    retry: {{max_attempts: 1}}
    limits: [hourly]
sources:
  - name: items
    scraper: missing
    partitions:
      values: {{var: item, values: [\"a\", \"b\", \"c\"]}}
    objects: [\"items/{{item}}.json\"]
",
        base = base_config(listen)
    );
    let path = dir.write_config("adce.yaml", &config);
    let server = ServerProc::start(&path, listen);
    let _agent = AgentProc::start(&server.url(), "a1", 1, &[], dir.path());
    let tasks = wait_until("every task dead", Duration::from_secs(30), POLL, || {
        let tasks = all_tasks(&server.url(), &[]);
        let dead = tasks.iter().filter(|t| state_of(t) == "dead").count();
        if tasks.len() == 3 && dead == 3 {
            Ok(tasks)
        } else {
            Err(dead)
        }
    });
    for task in &tasks {
        assert!(
            task["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("cannot start the scraper")),
            "{task:#}"
        );
    }
}
