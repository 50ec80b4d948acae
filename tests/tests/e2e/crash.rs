//! Crashes: a server SIGKILLed mid-run loses no task, and a task whose agent
//! is SIGKILLed is declared lost and runs again on another agent; the scraper
//! the killed agent left running dies when an agent starts again on its work
//! directory.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use adce_tests::{
    AgentProc, ServerProc, TestDir, all_tasks, base_config, count, coverage_percent, free_addr,
    lake_complete, read_or_empty, state_of, status, task_id, try_ctl_json, wait_until,
};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// How long a run may take to reach the point where the test kills something.
const MID_RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the queue may take to finish after the kill (lease expiry,
/// agent reconnect backoff and the remaining work included).
const FINISH_TIMEOUT: Duration = Duration::from_secs(120);
/// Interval between polls while waiting for the moment to kill.
const FAST_POLL: Duration = Duration::from_millis(100);
/// Interval between polls while waiting for the end.
const POLL: Duration = Duration::from_millis(250);
/// How long the first (orphaned) scraper run would live by itself.
const ORPHAN_SECONDS: u64 = 120;
/// How long a restarted agent may take to kill it: far less than that.
const REAP_TIMEOUT: Duration = Duration::from_secs(20);
/// Tasks of the server-kill test.
const TASKS: usize = 60;

fn id(index: usize) -> String {
    format!("g{index:03}")
}

#[test]
fn server_sigkill_loses_nothing() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let ids: Vec<String> = (0..TASKS).map(|i| format!("\"{}\"", id(i))).collect();
    let config = format!(
        "{base}scrapers:
  writer:
    command: [\"{{config_dir}}/scrapers/write_expected.sh\"]
    env:
      COUNT_FILE: \"{{config_dir}}/count.txt\"
      SLEEP: \"0.3\"
    timeout: 60s
    retry: {{max_attempts: 5, backoff: 200ms}}
sources:
  - name: games
    scraper: writer
    partitions:
      values: {{var: game, values: [{ids}]}}
    objects: [\"games/{{game}}.json\"]
",
        base = base_config(listen),
        ids = ids.join(", ")
    );
    let config_path = dir.write_config("adce.yaml", &config);

    let mut first = ServerProc::start(&config_path, listen);
    let url = first.url();
    let _a1 = AgentProc::start(&url, "a1", 2, &[], dir.path());
    let _a2 = AgentProc::start(&url, "a2", 2, &[], dir.path());

    // Kill the server while some tasks are done and others are leased.
    let before = wait_until(
        "some tasks done and some leased",
        MID_RUN_TIMEOUT,
        FAST_POLL,
        || {
            let status = first.status();
            let done = count(&status, "/tasks/done");
            let leased = count(&status, "/tasks/leased");
            if done >= 8 && leased >= 1 && done < TASKS as u64 {
                Ok(status)
            } else {
                Err(status["tasks"].clone())
            }
        },
    );
    first.kill();
    assert!(
        count(&before, "/tasks/done") < TASKS as u64,
        "the run finished before the kill: {before:#}"
    );

    let second = ServerProc::start(&config_path, listen);
    let after = wait_until(
        "every task done and coverage 100% after the restart",
        FINISH_TIMEOUT,
        POLL,
        || match try_ctl_json(&url, &["status"]) {
            Ok(status)
                if lake_complete(&status) && count(&status, "/tasks/done") >= TASKS as u64 =>
            {
                Ok(status)
            }
            Ok(status) => {
                Err(serde_json::json!({"coverage": status["coverage"], "tasks": status["tasks"]}))
            }
            Err(e) => Err(serde_json::json!(e)),
        },
    );

    assert_eq!(count(&after, "/tasks/done"), TASKS as u64, "{after:#}");
    assert_eq!(count(&after, "/tasks/dead"), 0, "{after:#}");
    assert_eq!(count(&after, "/tasks/pending"), 0, "{after:#}");
    assert_eq!(
        count(&after, "/coverage/expected"),
        TASKS as u64,
        "{after:#}"
    );
    assert_eq!(coverage_percent(&after), 100.0);
    // One task per partition: the restart did not duplicate any.
    let tasks = all_tasks(&second.url(), &[]);
    assert_eq!(tasks.len(), TASKS, "tasks after the restart");
    let not_done: Vec<_> = tasks.iter().filter(|t| state_of(t) != "done").collect();
    assert!(not_done.is_empty(), "tasks not done: {not_done:#?}");
    for i in 0..TASKS {
        let key = format!("games/{}.json", id(i));
        let content = fs::read_to_string(dir.join("lake").join(&key))
            .unwrap_or_else(|e| panic!("expected object {key} missing after the restart: {e}"));
        assert!(content.contains(&key), "{key} holds {content:?}");
    }
}

/// Whether process `pid` exists and is not a zombie.
fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let rest = &stat[stat.rfind(')')? + 1..];
            rest.split_whitespace().next().map(|state| state != "Z")
        })
        .unwrap_or(false)
}

/// Kills, at drop, the process groups of `slow.sh` runs that journaled a
/// start but no end: the first run is orphaned when its agent is SIGKILLed.
struct OrphanReaper {
    journal: PathBuf,
}

impl OrphanReaper {
    fn unfinished(journal: &Path) -> Vec<i32> {
        let text = read_or_empty(journal);
        let mut started = BTreeSet::new();
        let mut finished = BTreeSet::new();
        for line in text.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            match fields.as_slice() {
                ["start", _, pid, ..] => {
                    if let Ok(pid) = pid.parse::<i32>() {
                        started.insert(pid);
                    }
                }
                ["done", _, pid, ..] => {
                    if let Ok(pid) = pid.parse::<i32>() {
                        finished.insert(pid);
                    }
                }
                _ => {}
            }
        }
        started.difference(&finished).copied().collect()
    }
}

impl Drop for OrphanReaper {
    fn drop(&mut self) {
        for pid in OrphanReaper::unfinished(&self.journal) {
            // The agent made each scraper the leader of its own process group.
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

#[test]
fn agent_sigkill_task_runs_elsewhere() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let config = format!(
        "{base}scrapers:
  slow:
    command: [\"{{config_dir}}/scrapers/slow.sh\"]
    env:
      COUNT_FILE: \"{{config_dir}}/journal.txt\"
      SLOW_SECONDS: \"{ORPHAN_SECONDS}\"
      RETRY_SECONDS: \"1\"
    timeout: 2m
    retry: {{max_attempts: 3, backoff: 200ms}}
sources:
  - name: slowpoke
    scraper: slow
    partitions:
      values: {{var: item, values: [\"only\"]}}
    objects: [\"slow/{{item}}.txt\"]
",
        base = base_config(listen)
    );
    let config_path = dir.write_config("adce.yaml", &config);
    let journal = dir.join("journal.txt");
    let _reaper = OrphanReaper {
        journal: journal.clone(),
    };

    let server = ServerProc::start(&config_path, listen);
    let url = server.url();
    let mut agents = [
        AgentProc::start(&url, "a1", 1, &[], dir.path()),
        AgentProc::start(&url, "a2", 1, &[], dir.path()),
    ];

    // Wait until the task is leased and its scraper is running.
    let (task, holder) = wait_until(
        "the task leased and its scraper started",
        MID_RUN_TIMEOUT,
        FAST_POLL,
        || {
            let tasks = all_tasks(&url, &[]);
            let started = read_or_empty(&journal)
                .lines()
                .any(|l| l.starts_with("start "));
            match tasks.as_slice() {
                [task] if state_of(task) == "leased" && started => {
                    let agent = task["agent"].as_str().unwrap_or_default().to_string();
                    if agent.is_empty() {
                        Err(serde_json::json!(tasks))
                    } else {
                        Ok((task_id(task), agent))
                    }
                }
                _ => Err(serde_json::json!({"tasks": tasks, "scraper started": started})),
            }
        },
    );
    let Some(killed) = agents.iter().position(|a| a.id() == holder) else {
        panic!("task {task} is leased by unknown agent {holder:?}");
    };
    agents[killed].kill();
    let survivor = agents[1 - killed].id().to_string();

    let detail = wait_until(
        "the task done on the other agent",
        FINISH_TIMEOUT,
        POLL,
        || {
            let detail = server.ctl_json(&["task", &task]);
            if state_of(&detail["task"]) == "done" {
                Ok(detail)
            } else {
                Err(detail)
            }
        },
    );

    let attempts = detail["attempts"].as_array().cloned().unwrap_or_default();
    assert!(
        attempts.len() >= 2,
        "expected at least 2 attempts: {detail:#}"
    );
    let first = &attempts[0];
    assert_eq!(
        first["agent_id"],
        holder.as_str(),
        "first attempt: {detail:#}"
    );
    assert_eq!(first["outcome"], "lost", "first attempt: {detail:#}");
    let last = &attempts[attempts.len() - 1];
    assert_eq!(
        last["agent_id"],
        survivor.as_str(),
        "last attempt: {detail:#}"
    );
    assert_eq!(last["outcome"], "succeeded", "last attempt: {detail:#}");
    let lease_ids: BTreeSet<_> = attempts.iter().map(|a| a["lease_id"].to_string()).collect();
    assert_eq!(
        lease_ids.len(),
        attempts.len(),
        "every attempt has its own lease: {detail:#}"
    );

    let object = dir.join("lake/slow/only.txt");
    let content = fs::read_to_string(&object)
        .unwrap_or_else(|e| panic!("{} not in the lake: {e}", object.display()));
    assert!(content.contains("slow object slow/only.txt"), "{content:?}");

    // The killed agent's scraper still runs (nothing could kill it) until an
    // agent starts on the same work directory, which kills it first thing.
    let orphans = OrphanReaper::unfinished(&journal);
    let [orphan] = orphans.as_slice() else {
        panic!(
            "expected one orphaned scraper, journal: {}",
            read_or_empty(&journal)
        );
    };
    assert!(
        alive(*orphan),
        "the orphan {orphan} died before the restart"
    );
    let _restarted = AgentProc::start(&url, &holder, 1, &[], dir.path());
    wait_until("the orphaned scraper killed", REAP_TIMEOUT, POLL, || {
        if alive(*orphan) {
            Err(format!("{orphan} still runs"))
        } else {
            Ok(())
        }
    });
    // The loop reconciles once the queue drains and reports a full lake.
    wait_until(
        "coverage 100% after the retry",
        FINISH_TIMEOUT,
        POLL,
        || {
            let status = status(&url);
            if lake_complete(&status) {
                Ok(())
            } else {
                Err(status)
            }
        },
    );
}
