//! Hostile values inside parent objects of dependent sources: path
//! traversal, shell metacharacters, a 10 KB string, non-UTF-8 bytes, floats
//! and booleans are rejected with one warning each naming the parent object,
//! and never reach a task, a lake key, a scraper's argv or its environment;
//! the valid values next to them are filled normally.

use std::collections::BTreeSet;
use std::time::Duration;

use adce_tests::{
    AgentProc, ServerProc, TestDir, all_tasks, base_config, count, files_under, free_addr,
    lake_complete, log_entries, read_or_empty, wait_until, write_file,
};
use serde_json::{Value, json};

/// How long the valid partitions may take to fill.
const FILL_TIMEOUT: Duration = Duration::from_secs(40);
/// Interval between status polls.
const POLL: Duration = Duration::from_millis(250);
/// How many log entries to read back.
const LOG_TAIL: usize = 1000;
/// Length of the oversized value.
const LONG_LEN: usize = 10 * 1024;
/// The day of both parent objects.
const DAY: &str = "20241022";
/// The JSON parent's key.
const JSON_PARENT: &str = "hostile/20241022.json";
/// The line-per-value parent's key.
const LINES_PARENT: &str = "hostile-lines/20241022.txt";

fn config(listen: std::net::SocketAddr) -> String {
    format!(
        "{base}scrapers:
  game:
    command: [\"{{config_dir}}/scrapers/game.sh\", \"{{game_id}}\", \"{{date:%Y%m%d}}\"]
    env:
      JOURNAL: \"{{config_dir}}/journal.txt\"
    timeout: 30s
    retry: {{max_attempts: 2, backoff: 200ms}}
  box:
    command: [\"{{config_dir}}/scrapers/game.sh\", \"{{box_id}}\"]
    env:
      JOURNAL: \"{{config_dir}}/journal.txt\"
    timeout: 30s
    retry: {{max_attempts: 2, backoff: 200ms}}
sources:
  - name: games
    scraper: game
    partitions:
      from_objects:
        objects: \"hostile/{{date:%Y%m%d}}.json\"
        var: game_id
        json: \"/events/*/id\"
    objects: [\"games/{{game_id}}.json\"]
  - name: boxes
    scraper: box
    partitions:
      from_objects:
        objects: \"hostile-lines/{{date:%Y%m%d}}.txt\"
        var: box_id
        lines: true
    objects: [\"boxes/{{box_id}}.json\"]
",
        base = base_config(listen)
    )
}

#[test]
fn hostile_parent_values_never_reach_keys_or_argv() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let config_path = dir.write_config("adce.yaml", &config(listen));
    let lake = dir.join("lake");
    let journal = dir.join("journal.txt");

    // The JSON parent: two valid ids (a string and an integer) among
    // hostile ones.
    let long = "L".repeat(LONG_LEN);
    let schedule = json!({"events": [
        {"id": "401"},
        {"id": "../../etc/passwd"},
        {"id": "a;rm -rf /"},
        {"id": long},
        {"id": 402},
        {"id": 40.5},
        {"id": true},
        {"id": ".."},
        {"id": "$(touch pwned)"},
    ]});
    write_file(&lake.join(JSON_PARENT), schedule.to_string().as_bytes());
    // (excerpt in the log, how many of them) for each hostile JSON value.
    let json_hostile: Vec<String> = vec![
        "../../etc/passwd".into(),
        "a;rm -rf /".into(),
        format!("{}...", "L".repeat(77)),
        "40.5".into(),
        "true".into(),
        "..".into(),
        "$(touch pwned)".into(),
    ];
    // The lines parent: raw bytes, one of them not UTF-8.
    write_file(
        &lake.join(LINES_PARENT),
        b"403\n\xff\xfe\x80bad\n../up\nok-404\n# a comment\n\n a b \n",
    );
    let lines_hostile: Vec<String> =
        vec!["\\xff\\xfe\\x80bad".into(), "../up".into(), "a b".into()];

    let server = ServerProc::start(&config_path, listen);
    let _agent = AgentProc::start(&server.url(), "a1", 2, &[], dir.path());

    let status = wait_until(
        "the four valid partitions filled",
        FILL_TIMEOUT,
        POLL,
        || {
            let status = server.status();
            if lake_complete(&status) && count(&status, "/coverage/expected") == 4 {
                Ok(status)
            } else {
                Err(json!({"coverage": status["coverage"], "tasks": status["tasks"]}))
            }
        },
    );
    assert_eq!(count(&status, "/tasks/done"), 4, "{status:#}");
    assert_eq!(count(&status, "/tasks/dead"), 0, "{status:#}");

    // Tasks exist only for the valid values.
    let partitions: BTreeSet<String> = all_tasks(&server.url(), &[])
        .iter()
        .map(|t| t["partition"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        partitions,
        BTreeSet::from([
            "date=2024-10-22,game_id=401".to_string(),
            "date=2024-10-22,game_id=402".to_string(),
            "date=2024-10-22,box_id=403".to_string(),
            "date=2024-10-22,box_id=ok-404".to_string(),
        ]),
        "task partitions"
    );

    // The lake holds the parents and the four valid objects, nothing else.
    let files: BTreeSet<String> = files_under(&lake).into_iter().collect();
    assert_eq!(
        files,
        BTreeSet::from(
            [
                JSON_PARENT,
                LINES_PARENT,
                "games/401.json",
                "games/402.json",
                "boxes/403.json",
                "boxes/ok-404.json",
            ]
            .map(String::from)
        ),
        "lake files"
    );

    // The scraper ran once per valid value, and saw only valid values.
    let journal = read_or_empty(&journal);
    let runs: Vec<&str> = journal.lines().collect();
    assert_eq!(runs.len(), 4, "journal:\n{journal}");
    for want in [
        format!("argv=401 {DAY} "),
        format!("argv=402 {DAY} "),
        "argv=403 ".to_string(),
        "argv=ok-404 ".to_string(),
    ] {
        assert!(
            runs.iter().any(|r| r.contains(&want)),
            "no run with `{want}` in the journal:\n{journal}"
        );
    }
    assert!(
        runs.iter().any(|r| r.contains("ADCE_VAR_GAME_ID=401 ")),
        "journal:\n{journal}"
    );
    for line in &runs {
        let argv_and_vars = line
            .split_once("argv=")
            .map(|(_, rest)| rest)
            .unwrap_or(line);
        for bad in ["..", ";", "$(", "rm -rf", "passwd", "LLLLLLLL", "bad"] {
            assert!(
                !argv_and_vars.contains(bad),
                "a hostile value reached a scraper ({bad:?}): {line}"
            );
        }
    }
    for partition in &partitions {
        for bad in ["..", ";", "$(", "LLLL", "/"] {
            assert!(
                !partition.contains(bad),
                "hostile task partition {partition}"
            );
        }
    }

    // One warning per hostile value, naming its parent object.
    let entries = log_entries(&server.url(), LOG_TAIL, &[]);
    let rejected: Vec<&Value> = entries
        .iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.contains("rejected"))
        })
        .collect();
    for entry in &rejected {
        assert_eq!(entry["level"], "warn", "{entry:#}");
        let message = entry["message"].as_str().unwrap_or_default();
        assert!(
            !message.contains(&long[..200]),
            "the whole long value was logged: {} bytes",
            message.len()
        );
    }
    let messages = |parent: &str| -> Vec<String> {
        rejected
            .iter()
            .filter_map(|e| e["message"].as_str())
            .filter(|m| m.contains(parent))
            .map(String::from)
            .collect()
    };
    for (parent, hostile) in [(JSON_PARENT, &json_hostile), (LINES_PARENT, &lines_hostile)] {
        let found = messages(parent);
        assert_eq!(
            found.len(),
            hostile.len(),
            "rejection warnings naming {parent}: {found:#?}"
        );
        for value in hostile {
            let about: Vec<&String> = found
                .iter()
                .filter(|m| m.contains(&format!("value {value} ")))
                .collect();
            assert_eq!(
                about.len(),
                1,
                "warnings about {value:?} in {parent}: {found:#?}"
            );
        }
    }
    assert_eq!(
        rejected.len(),
        json_hostile.len() + lines_hostile.len(),
        "rejection warnings: {rejected:#?}"
    );
}

/// A dependent source may share a key template with a static one; when a
/// parent lists a value the static source expects too, the reconcile fails
/// with a config error naming both sources and the key, and creates nothing.
#[test]
fn a_key_shared_through_a_dependent_source_fails_the_reconcile() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let config = format!(
        "{base}scrapers:
  game:
    command: [\"{{config_dir}}/scrapers/game.sh\", \"{{game_id}}\"]
    timeout: 30s
sources:
  - name: games
    scraper: game
    partitions:
      from_objects: {{objects: \"sched/{{date:%Y%m%d}}.json\", var: game_id, json: \"/ids/*\"}}
    objects: [\"games/{{game_id}}.json\"]
  - name: extra
    scraper: game
    partitions:
      values: {{var: game_id, values: [\"7\", \"9\"]}}
    objects: [\"games/{{game_id}}.json\"]
",
        base = base_config(listen)
    );
    let config_path = dir.write_config("adce.yaml", &config);
    // Disjoint first: the parent lists 1 and 2.
    let parent = dir.join("lake/sched/20241022.json");
    write_file(&parent, br#"{"ids": ["1", "2"]}"#);
    let server = ServerProc::start(&config_path, listen);
    let ok = server.ctl(&["reconcile"]);
    assert!(ok.status.success(), "{ok:?}");

    // Now it lists 9, which `extra` expects too.
    write_file(&parent, br#"{"ids": ["1", "9"]}"#);
    let failed = server.ctl(&["reconcile"]);
    assert!(!failed.status.success(), "{failed:?}");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&failed.stdout),
        String::from_utf8_lossy(&failed.stderr)
    );
    assert!(
        said.contains("sources `games` and `extra` both expect key `games/9.json`"),
        "{said}"
    );
    wait_until("the error in the log", FILL_TIMEOUT, POLL, || {
        let entries = log_entries(&server.url(), LOG_TAIL, &[]);
        if entries
            .iter()
            .any(|e| e.to_string().contains("both expect key `games/9.json`"))
        {
            Ok(())
        } else {
            Err(entries.len())
        }
    });
    // The first reconcile's tasks stand; the failed one added none.
    let tasks = all_tasks(&server.url(), &[]);
    assert_eq!(tasks.len(), 4, "{tasks:#?}");
}
