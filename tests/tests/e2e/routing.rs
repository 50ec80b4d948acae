//! Label routing end to end: a scraper that `requires: {proxy: residential}`
//! is never assigned to an agent without that label — its tasks stay pending
//! with no attempt while only such an agent is connected — and runs on the
//! first agent started with `--labels proxy=residential`. Which agent ran a
//! task is read both from the server (attempts' `agent_id`) and from the
//! scraper's own journal (the agent's work dir `agent-<ID>` in its paths).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use adce_tests::{
    AgentProc, ServerProc, TestDir, all_tasks, base_config, free_addr, read_or_empty, state_of,
    task_id, wait_until,
};
use serde_json::Value;

/// Partitions per source.
const ITEMS: [&str; 3] = ["x1", "x2", "x3"];
/// How long tasks may take to be done once an eligible agent is connected.
const DONE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the residential tasks must stay untouched with only `a1` connected.
const UNTOUCHED_FOR: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(200);
/// The journal `write_expected.sh` appends to, next to the config.
const JOURNAL: &str = "journal.txt";

/// Two sources on `write_expected.sh`: `plain` (any agent) and `residential`
/// (only agents labelled `proxy=residential`).
fn config(listen: std::net::SocketAddr) -> String {
    let items: Vec<String> = ITEMS.iter().map(|i| format!("\"{i}\"")).collect();
    let items = items.join(", ");
    format!(
        "{base}scrapers:
  open:
    command: [\"{{config_dir}}/scrapers/write_expected.sh\"]
    env: {{COUNT_FILE: \"{{config_dir}}/{JOURNAL}\"}}
    timeout: 30s
    retry: {{max_attempts: 1, backoff: 100ms}}
  proxied:
    command: [\"{{config_dir}}/scrapers/write_expected.sh\"]
    env: {{COUNT_FILE: \"{{config_dir}}/{JOURNAL}\"}}
    timeout: 30s
    retry: {{max_attempts: 1, backoff: 100ms}}
    requires: {{proxy: residential}}
sources:
  - name: plain
    scraper: open
    partitions:
      values: {{var: item, values: [{items}]}}
    objects: [\"plain/{{item}}.json\"]
  - name: residential
    scraper: proxied
    partitions:
      values: {{var: item, values: [{items}]}}
    objects: [\"residential/{{item}}.json\"]
",
        // Report unroutable work quickly, so the test sees the waiting note.
        base = base_config(listen).replace(
            "  queue_check_interval: 200ms\n",
            "  queue_check_interval: 200ms\n  no_agent_after: 1s\n"
        )
    )
}

/// The tasks of `source`.
fn tasks_of(url: &str, source: &str) -> Vec<Value> {
    all_tasks(url, &["--source", source])
}

/// Waits until `source` has one task per item and all are done; returns them.
fn wait_done(url: &str, source: &str) -> Vec<Value> {
    wait_until(
        &format!("every {source} task done"),
        DONE_TIMEOUT,
        POLL,
        || {
            let tasks = tasks_of(url, source);
            if tasks.len() == ITEMS.len() && tasks.iter().all(|t| state_of(t) == "done") {
                Ok(tasks)
            } else {
                Err(tasks)
            }
        },
    )
}

/// The attempts of `adcectl task ID --json`.
fn attempts(server: &ServerProc, id: &str) -> Vec<Value> {
    server.ctl_json(&["task", id])["attempts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The agent ids of every attempt of `tasks`.
fn attempt_agents(server: &ServerProc, tasks: &[Value]) -> Vec<String> {
    tasks
        .iter()
        .flat_map(|t| attempts(server, &task_id(t)))
        .map(|a| a["agent_id"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The journal lines of keys under `prefix/`.
fn journal_lines(journal: &Path, prefix: &str) -> Vec<String> {
    read_or_empty(journal)
        .lines()
        .filter(|line| line.starts_with(&format!("{prefix}/")))
        .map(str::to_string)
        .collect()
}

/// The agent a journal line names through its work dir `agent-<ID>`.
fn journal_agent(line: &str) -> Option<&str> {
    line.split('/')
        .find_map(|part| part.strip_prefix("agent-"))
        .map(|rest| rest.split_whitespace().next().unwrap_or(rest))
}

#[test]
fn agent_without_required_label_never_receives_the_task() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let journal = dir.join(JOURNAL);
    let path = dir.write_config("adce.yaml", &config(listen));
    let server = ServerProc::start(&path, listen);
    let url = server.url();
    let _a1 = AgentProc::start(&url, "a1", 2, &[], dir.path());

    let plain = wait_done(&url, "plain");
    let plain_agents = attempt_agents(&server, &plain);
    assert_eq!(
        plain_agents,
        vec!["a1"; ITEMS.len()],
        "plain tasks ran once each on a1"
    );

    // With only the unlabelled a1 connected (and idle), the residential tasks
    // exist but nobody runs them.
    let started = Instant::now();
    let mut checks = 0;
    while started.elapsed() < UNTOUCHED_FOR {
        let residential = tasks_of(&url, "residential");
        assert_eq!(residential.len(), ITEMS.len(), "{residential:#?}");
        for task in &residential {
            assert_eq!(state_of(task), "pending", "{task:#}");
            assert_eq!(task["attempts"], 0, "{task:#}");
        }
        checks += 1;
        std::thread::sleep(POLL);
    }
    assert!(checks >= 2, "only {checks} checks in {UNTOUCHED_FOR:?}");
    let waiting = tasks_of(&url, "residential");
    assert_eq!(
        attempt_agents(&server, &waiting),
        Vec::<String>::new(),
        "residential attempts before a labelled agent came"
    );
    assert_eq!(
        journal_lines(&journal, "residential"),
        Vec::<String>::new(),
        "the residential scraper ran without a labelled agent"
    );
    assert!(!dir.join("lake/residential").exists());
    // Status and the log say why the work waits.
    let status = server.ctl_json(&["status"]);
    let notes = status["waiting"].as_array().cloned().unwrap_or_default();
    assert_eq!(notes.len(), 1, "{status:#}");
    assert_eq!(notes[0]["ready"], ITEMS.len());
    assert_eq!(notes[0]["reason"], "no agent with proxy=residential");
    let human = String::from_utf8_lossy(&server.ctl(&["tasks"]).stdout).to_string();
    assert!(
        human.contains("no agent with proxy=residential"),
        "adcectl tasks: {human}"
    );

    let _a2 = AgentProc::start(&url, "a2", 2, &[("proxy", "residential")], dir.path());
    let residential = wait_done(&url, "residential");
    let residential_agents = attempt_agents(&server, &residential);
    assert_eq!(
        residential_agents,
        vec!["a2"; ITEMS.len()],
        "residential tasks ran once each on a2 only"
    );

    // The scrapers' own journal agrees with the server.
    let lines = journal_lines(&journal, "residential");
    assert_eq!(lines.len(), ITEMS.len(), "journal: {lines:#?}");
    let ran_on: BTreeSet<Option<&str>> = lines.iter().map(|l| journal_agent(l)).collect();
    assert_eq!(ran_on, BTreeSet::from([Some("a2")]), "journal: {lines:#?}");
    let lines = journal_lines(&journal, "plain");
    assert_eq!(lines.len(), ITEMS.len(), "journal: {lines:#?}");
    let ran_on: BTreeSet<Option<&str>> = lines.iter().map(|l| journal_agent(l)).collect();
    assert_eq!(ran_on, BTreeSet::from([Some("a1")]), "journal: {lines:#?}");
    for item in ITEMS {
        assert!(dir.join(format!("lake/plain/{item}.json")).is_file());
        assert!(dir.join(format!("lake/residential/{item}.json")).is_file());
    }
}

#[test]
fn journal_agent_reads_the_work_dir() {
    assert_eq!(
        journal_agent("residential/x1.json 1 /tmp/adce-e2e-abc/agent-a2/t/7 /tmp/out"),
        Some("a2")
    );
    assert_eq!(
        journal_agent("plain/x1.json 1 /tmp/agent-a1 /o"),
        Some("a1")
    );
    assert_eq!(journal_agent("plain/x1.json 1 /tmp/w /o"), None);
}
