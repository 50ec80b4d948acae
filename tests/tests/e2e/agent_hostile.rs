//! The agent against hostile assignments and scrapers, with the real
//! `adce-server` and `adce-agent`: a command outside `--allow-command` (also
//! through `..`, and next to the allowed directory) never runs and fails its
//! task with a clear message; a command inside runs and never sees the
//! agent's token; a 100 MB stdout line reaches the server truncated while the
//! agent stays small and alive; expected keys that are symlinks to
//! /etc/passwd or through a directory link to /etc are never uploaded.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use adce_tests::{
    AgentProc, ServerProc, TestDir, all_tasks, base_config, files_under, free_addr, log_entries,
    peak_rss_kib, state_of, task_id, wait_only_task, wait_until,
};
use serde_json::Value;

/// How long the tasks of one test may take to settle.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(200);
/// The agent's peak memory must stay below this while it reads a 100 MB
/// line (it keeps 8 KiB of a line; its usual peak is a few tens of MiB).
const AGENT_PEAK_RSS_LIMIT_KIB: u64 = 64 * 1024;
/// Enough log entries to hold everything one task logged.
const LOG_TAIL: usize = 500;

/// A scraper `NAME` running `command` (a YAML flow list) with `env` (YAML
/// flow map), one attempt only.
fn scraper(name: &str, command: &str, env: &str) -> String {
    format!(
        "  {name}:
    command: {command}
    env: {env}
    timeout: 2m
    retry: {{max_attempts: 1, backoff: 200ms}}
"
    )
}

/// A source `NAME` of one partition (`item: x1`) run by `scraper` with the
/// given object templates (a YAML flow list).
fn source(name: &str, scraper: &str, objects: &str) -> String {
    format!(
        "  - name: {name}
    scraper: {scraper}
    partitions:
      values: {{var: item, values: [\"x1\"]}}
    objects: {objects}
"
    )
}

fn config(listen: std::net::SocketAddr, scrapers: &[String], sources: &[String]) -> String {
    format!(
        "{base}scrapers:\n{scrapers}sources:\n{sources}",
        base = base_config(listen),
        scrapers = scrapers.concat(),
        sources = sources.concat()
    )
}

fn canonical(path: &Path) -> PathBuf {
    fs::canonicalize(path).unwrap_or_else(|e| panic!("cannot resolve {}: {e}", path.display()))
}

fn allow(path: &Path) -> Vec<OsString> {
    vec!["--allow-command".into(), path.as_os_str().to_owned()]
}

/// Waits until every task is in a final state; returns them.
fn settled_tasks(url: &str, count: usize) -> Vec<Value> {
    wait_until("every task settled", SETTLE_TIMEOUT, POLL, || {
        let tasks = all_tasks(url, &[]);
        let settled = tasks.len() == count
            && tasks
                .iter()
                .all(|task| matches!(state_of(task), "done" | "dead"));
        if settled { Ok(tasks) } else { Err(tasks) }
    })
}

/// The task of `source` among `tasks`.
fn task_of<'a>(tasks: &'a [Value], source: &str) -> &'a Value {
    tasks
        .iter()
        .find(|task| task["source"] == source)
        .unwrap_or_else(|| panic!("no task of {source}: {tasks:#?}"))
}

/// The messages the server logged for task `id`.
fn task_log(url: &str, id: &str) -> Vec<String> {
    log_entries(url, LOG_TAIL, &["--task", id])
        .iter()
        .map(|entry| entry["message"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn a_command_outside_the_allowlist_never_runs() {
    let dir = TestDir::new();
    let allowed = dir.install_scrapers();
    // A directory whose name merely starts with the allowed one.
    let evil = dir.join("scrapers-evil");
    adce_tests::create_dir_all(&evil);
    fs::copy(
        allowed.join("mark_and_write.sh"),
        evil.join("mark_and_write.sh"),
    )
    .unwrap_or_else(|e| panic!("cannot copy the scraper: {e}"));
    let listen = free_addr();
    let config_path = dir.write_config(
        "adce.yaml",
        &config(
            listen,
            &[
                scraper(
                    "beside",
                    "[\"{config_dir}/scrapers-evil/mark_and_write.sh\"]",
                    "{MARKER: \"{config_dir}/ran-beside\"}",
                ),
                scraper(
                    "dotdot",
                    "[\"{config_dir}/scrapers/../scrapers-evil/mark_and_write.sh\"]",
                    "{MARKER: \"{config_dir}/ran-dotdot\"}",
                ),
                scraper(
                    "shell",
                    "[\"sh\", \"-c\", \"echo ran > {config_dir}/ran-shell\"]",
                    "{}",
                ),
            ],
            &[
                source("beside", "beside", "[\"beside/{item}.json\"]"),
                source("dotdot", "dotdot", "[\"dotdot/{item}.json\"]"),
                source("shell", "shell", "[\"shell/{item}.json\"]"),
            ],
        ),
    );
    let server = ServerProc::start(&config_path, listen);
    let mut agent = AgentProc::start_with_args(&server.url(), "a1", &allow(&allowed), dir.path());

    let tasks = settled_tasks(&server.url(), 3);
    let evil_script = canonical(&evil.join("mark_and_write.sh"));
    let allowed_text = allowed.display().to_string();
    for (source, program) in [
        ("beside", evil_script.display().to_string()),
        ("dotdot", evil_script.display().to_string()),
        ("shell", String::new()),
    ] {
        let task = task_of(&tasks, source);
        assert_eq!(state_of(task), "dead", "{task:#}");
        let last_error = task["last_error"].as_str().unwrap_or_default();
        assert!(
            last_error.contains(&format!("command {program}"))
                && last_error.contains(&format!(
                    "is not allowed on this host (--allow-command {allowed_text})"
                )),
            "{source}: last_error {last_error:?}"
        );
    }
    // Nothing ran: no scraper left its marker, nothing reached the lake.
    for marker in ["ran-beside", "ran-dotdot", "ran-shell"] {
        assert!(
            !dir.join(marker).exists(),
            "{marker} exists: the command ran"
        );
    }
    assert_eq!(files_under(&dir.join("lake")), Vec::<String>::new());
    assert!(agent.proc().is_running(), "the agent died");
    let log = agent.log();
    assert!(
        log.contains("only commands under --allow-command run on this host"),
        "{log}"
    );
}

#[test]
fn a_command_inside_the_allowlist_runs_without_the_agents_token() {
    let dir = TestDir::new();
    let allowed = dir.install_scrapers();
    let listen = free_addr();
    let config_path = dir.write_config(
        "adce.yaml",
        &config(
            listen,
            &[scraper(
                "marker",
                "[\"{config_dir}/scrapers/mark_and_write.sh\"]",
                "{MARKER: \"{config_dir}/ran\", ENV_DUMP: \"{config_dir}/scraper-env.txt\"}",
            )],
            &[source("feed", "marker", "[\"feed/{item}.json\"]")],
        ),
    );
    let server = ServerProc::start(&config_path, listen);
    // The prefix with a trailing slash; the token from the environment (a
    // server without auth ignores it).
    let mut prefix = allowed.as_os_str().to_owned();
    prefix.push("/");
    let token = "agent-env-token-0123456789";
    let agent = AgentProc::start_with_args_env(
        &server.url(),
        "a1",
        &["--allow-command".into(), prefix],
        &[("ADCE_TOKEN", token)],
        dir.path(),
    );

    let task = wait_only_task(&server.url(), "done");
    assert!(dir.join("ran").exists(), "{task:#}");
    assert_eq!(files_under(&dir.join("lake")), ["feed/x1.json"]);
    let env = fs::read_to_string(dir.join("scraper-env.txt"))
        .unwrap_or_else(|e| panic!("the scraper wrote no environment dump: {e}"));
    assert!(env.contains("ADCE_OUTPUT_DIR="), "{env}");
    assert!(!env.contains("ADCE_TOKEN"), "{env}");
    assert!(!env.contains(token), "{env}");
    // Nor does the agent log it.
    assert!(!agent.log().contains(token));
}

#[test]
fn a_100_mb_output_line_is_truncated_and_the_agent_stays_small() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let config_path = dir.write_config(
        "adce.yaml",
        &config(
            listen,
            &[scraper(
                "huge",
                "[\"{config_dir}/scrapers/huge_line.sh\"]",
                "{HUGE_BYTES: \"104857600\"}",
            )],
            &[source("feed", "huge", "[\"feed/{item}.json\"]")],
        ),
    );
    let server = ServerProc::start(&config_path, listen);
    let mut agent = AgentProc::start_with_args(&server.url(), "a1", &[], dir.path());

    let task = wait_only_task(&server.url(), "done");
    assert_eq!(files_under(&dir.join("lake")), ["feed/x1.json"]);
    let id = task_id(&task);
    let messages = wait_until("the task's log lines", SETTLE_TIMEOUT, POLL, || {
        let messages = task_log(&server.url(), &id);
        if messages.iter().any(|m| m == "after the huge line") {
            Ok(messages)
        } else {
            Err(messages)
        }
    });
    let huge: Vec<&String> = messages.iter().filter(|m| m.starts_with("aaaa")).collect();
    let [line] = huge.as_slice() else {
        panic!("expected one stored line of the huge output: {messages:#?}");
    };
    assert!(
        line.len() < 16 * 1024 && line.ends_with("[truncated]"),
        "the stored line is {} bytes and ends {:?}",
        line.len(),
        &line[line.len().saturating_sub(40)..]
    );
    assert!(agent.proc().is_running(), "the agent died");
    let peak = peak_rss_kib(agent.proc().pid()).unwrap_or(u64::MAX);
    assert!(
        peak < AGENT_PEAK_RSS_LIMIT_KIB,
        "the agent's peak RSS was {peak} KiB reading a 100 MB line"
    );
}

#[test]
fn symlinks_out_of_the_output_dir_are_never_uploaded() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let config_path = dir.write_config(
        "adce.yaml",
        &config(
            listen,
            &[scraper(
                "links",
                "[\"{config_dir}/scrapers/symlinks.sh\"]",
                "{}",
            )],
            // The first key is a link to /etc/passwd, the second a path
            // under a link to /etc.
            &[source(
                "feed",
                "links",
                "[\"feed/{item}.json\", \"sys/{item}/passwd\"]",
            )],
        ),
    );
    let server = ServerProc::start(&config_path, listen);
    let mut agent = AgentProc::start_with_args(&server.url(), "a1", &[], dir.path());

    let task = wait_only_task(&server.url(), "dead");
    let last_error = task["last_error"].as_str().unwrap_or_default();
    assert!(
        last_error.contains("expected object") && last_error.contains("was not produced"),
        "last_error: {last_error:?}"
    );
    assert_eq!(files_under(&dir.join("lake")), Vec::<String>::new());
    let passwd = fs::read("/etc/passwd").unwrap_or_default();
    for file in files_under(dir.path()) {
        if file.starts_with("agent-") || file.starts_with("scrapers/") {
            continue;
        }
        let bytes = fs::read(dir.join(&file)).unwrap_or_default();
        assert!(
            passwd.is_empty() || bytes != passwd,
            "{file} holds a copy of /etc/passwd"
        );
    }
    // The agent said why it left both out.
    let messages = task_log(&server.url(), &task_id(&task));
    for skipped in ["feed/x1.json", "sys/x1"] {
        assert!(
            messages.iter().any(|m| m.contains(&format!(
                "skipped `{skipped}`: symbolic links are not uploaded"
            ))),
            "{skipped}: {messages:#?}"
        );
    }
    assert!(agent.proc().is_running(), "the agent died");
}
