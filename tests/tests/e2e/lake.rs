//! Filling a lake: a 500-object catalog with a fifth of it already present,
//! one server and two agents; every missing object is produced exactly once
//! and nothing that was there is touched.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::time::{Duration, SystemTime};

use adce_tests::{
    AgentProc, ServerProc, TestDir, all_tasks, base_config, count, coverage_percent, free_addr,
    lake_complete, read_or_empty, task_id, wait_until, write_file,
};
use chrono::{Days, NaiveDate};

/// How long the whole catalog may take to fill.
const FILL_TIMEOUT: Duration = Duration::from_secs(120);
/// Interval between status polls.
const POLL: Duration = Duration::from_millis(250);
/// Ids of the `ids` source.
const ID_COUNT: usize = 300;
/// Days of the `days` source (two objects each).
const DAY_COUNT: usize = 100;
/// Ids whose object is in the lake before the server starts.
const PRESENT_IDS: usize = 60;
/// Days whose two objects are in the lake before the server starts.
const PRESENT_DAYS: usize = 20;

fn first_day() -> NaiveDate {
    NaiveDate::from_ymd_opt(2024, 1, 1).unwrap_or_default()
}

fn day(index: usize) -> NaiveDate {
    first_day()
        .checked_add_days(Days::new(index as u64))
        .unwrap_or_default()
}

fn id(index: usize) -> String {
    format!("id{index:04}")
}

fn id_key(index: usize) -> String {
    format!("ids/{}.json", id(index))
}

fn day_keys(index: usize) -> [String; 2] {
    let stamp = day(index).format("%Y%m%d");
    [
        format!("days/{stamp}/a.json"),
        format!("days/{stamp}/b.json"),
    ]
}

fn config(listen: std::net::SocketAddr) -> String {
    let ids: Vec<String> = (0..ID_COUNT).map(|i| format!("\"{}\"", id(i))).collect();
    format!(
        "{base}scrapers:
  writer:
    command: [\"{{config_dir}}/scrapers/write_expected.sh\"]
    env:
      COUNT_FILE: \"{{config_dir}}/count.txt\"
    timeout: 60s
    retry: {{max_attempts: 3, backoff: 200ms}}
sources:
  - name: ids
    scraper: writer
    priority: high
    partitions:
      values:
        var: id
        values: [{ids}]
    objects: [\"ids/{{id}}.json\"]
  - name: days
    scraper: writer
    priority: medium
    partitions:
      dates: {{start: {start}, end: {end}, step: day}}
    objects:
      - \"days/{{date:%Y%m%d}}/a.json\"
      - \"days/{{date:%Y%m%d}}/b.json\"
",
        base = base_config(listen),
        ids = ids.join(", "),
        start = first_day(),
        end = day(DAY_COUNT - 1),
    )
}

#[test]
fn fills_lake_exactly_once() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let config_path = dir.write_config("adce.yaml", &config(listen));
    let lake = dir.join("lake");

    // Whole partitions are pre-written: 60 ids and 20 days (40 objects), a
    // fifth of the 500 objects, each with content no scraper writes and an
    // old mtime.
    let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    let mut present: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut missing: BTreeSet<String> = BTreeSet::new();
    let mut gap_partitions = 0_u64;
    for i in 0..ID_COUNT {
        if i < PRESENT_IDS {
            present.insert(
                id_key(i),
                format!("pre-existing {i} from the old system\n").into_bytes(),
            );
        } else {
            missing.insert(id_key(i));
            gap_partitions += 1;
        }
    }
    for i in 0..DAY_COUNT {
        // Every fifth day is present: spread across the range.
        if i % (DAY_COUNT / PRESENT_DAYS) == 0 {
            for key in day_keys(i) {
                present.insert(key.clone(), format!("pre-existing {key}\n").into_bytes());
            }
        } else {
            missing.extend(day_keys(i));
            gap_partitions += 1;
        }
    }
    let catalog_size = present.len() + missing.len();
    assert_eq!(catalog_size, 500);
    assert_eq!(present.len(), 100);
    for (key, content) in &present {
        let path = lake.join(key);
        write_file(&path, content);
        let file = File::options()
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        file.set_modified(old)
            .unwrap_or_else(|e| panic!("cannot set the mtime of {}: {e}", path.display()));
    }

    let server = ServerProc::start(&config_path, listen);

    // Before any agent runs, the first reconcile's missing keys are listed
    // in expansion order, as many as asked.
    let first = wait_until("the first reconcile", FILL_TIMEOUT, POLL, || {
        let coverage =
            server.ctl_json(&["coverage", "--source", "ids", "--missing", "--limit", "5"]);
        if coverage["computed_unix_ms"].as_i64().unwrap_or(0) > 0 {
            Ok(coverage)
        } else {
            Err(coverage)
        }
    });
    let want: Vec<String> = (PRESENT_IDS..PRESENT_IDS + 5).map(id_key).collect();
    assert_eq!(
        first["sources"][0]["missing_keys"],
        serde_json::json!(want),
        "{first:#}"
    );
    assert_eq!(
        count(&first, "/sources/0/missing"),
        (ID_COUNT - PRESENT_IDS) as u64
    );
    let days = server.ctl_json(&["coverage", "--source", "days", "--missing"]);
    let keys = days["sources"][0]["missing_keys"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let expected: Vec<String> = missing
        .iter()
        .filter(|k| k.starts_with("days/"))
        .take(100)
        .cloned()
        .collect();
    assert_eq!(keys.len(), 100, "{days:#}");
    assert_eq!(serde_json::json!(keys), serde_json::json!(expected));

    let _a1 = AgentProc::start(&server.url(), "a1", 2, &[("zone", "one")], dir.path());
    let _a2 = AgentProc::start(&server.url(), "a2", 2, &[], dir.path());

    let status = wait_until(
        "coverage 100% with no pending or leased task",
        FILL_TIMEOUT,
        POLL,
        || {
            let status = server.status();
            if lake_complete(&status) {
                Ok(status)
            } else {
                Err(serde_json::json!({"coverage": status["coverage"], "tasks": status["tasks"]}))
            }
        },
    );

    // Coverage and task counts as the server reports them.
    assert_eq!(
        count(&status, "/coverage/expected"),
        catalog_size as u64,
        "{status:#}"
    );
    assert_eq!(
        count(&status, "/coverage/present"),
        catalog_size as u64,
        "{status:#}"
    );
    assert_eq!(count(&status, "/coverage/missing"), 0, "{status:#}");
    assert_eq!(coverage_percent(&status), 100.0);
    assert_eq!(count(&status, "/tasks/done"), gap_partitions, "{status:#}");
    assert_eq!(count(&status, "/tasks/dead"), 0, "{status:#}");

    // Every missing object was produced exactly once, and nothing else.
    let journal = read_or_empty(&dir.join("count.txt"));
    let mut runs: BTreeMap<&str, u32> = BTreeMap::new();
    let mut agents_seen: BTreeSet<&str> = BTreeSet::new();
    for line in journal.lines() {
        let mut fields = line.split(' ');
        let key = fields.next().unwrap_or_default();
        *runs.entry(key).or_default() += 1;
        for agent in ["agent-a1", "agent-a2"] {
            if line.contains(agent) {
                agents_seen.insert(agent);
            }
        }
    }
    let twice: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "objects produced more than once: {twice:?}"
    );
    let unexpected: Vec<_> = runs.keys().filter(|k| !missing.contains(**k)).collect();
    assert!(
        unexpected.is_empty(),
        "produced objects that were not missing: {unexpected:?}"
    );
    let never: Vec<_> = missing
        .iter()
        .filter(|k| !runs.contains_key(k.as_str()))
        .collect();
    assert!(
        never.is_empty(),
        "missing objects never produced: {never:?}"
    );

    // The lake holds every expected object; the old ones are untouched.
    for key in &missing {
        let path = lake.join(key);
        let content = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("expected object {key} is not in the lake: {e}"));
        assert!(content.contains(key.as_str()), "{key} holds {content:?}");
    }
    for (key, content) in &present {
        let path = lake.join(key);
        let now = fs::read(&path).unwrap_or_else(|e| panic!("pre-existing {key} vanished: {e}"));
        assert_eq!(&now, content, "pre-existing {key} was rewritten");
        let mtime = fs::metadata(&path)
            .and_then(|m| m.modified())
            .unwrap_or_else(|e| panic!("no mtime for {key}: {e}"));
        assert_eq!(mtime, old, "pre-existing {key} was touched");
    }

    // Both agents ran tasks: the journal lines carry each run's work dir,
    // and the attempts the server recorded name both agents.
    assert_eq!(
        agents_seen,
        BTreeSet::from(["agent-a1", "agent-a2"]),
        "the scrapers did not run on both agents"
    );
    let tasks = all_tasks(&server.url(), &["--state", "done"]);
    assert_eq!(tasks.len() as u64, gap_partitions, "done tasks listed");
    // Look at attempts until both agents have shown up (usually a handful).
    let mut attempt_agents = BTreeSet::new();
    for task in &tasks {
        let id = task_id(task);
        let detail = server.ctl_json(&["task", &id]);
        let attempts = detail["attempts"].as_array().cloned().unwrap_or_default();
        let Some(last) = attempts.last() else {
            panic!("done task {id} has no attempts: {detail:#}");
        };
        assert_eq!(last["outcome"], "succeeded", "task {id}: {detail:#}");
        if let Some(agent) = last["agent_id"].as_str() {
            attempt_agents.insert(agent.to_string());
        }
        if attempt_agents.len() == 2 {
            break;
        }
    }
    assert_eq!(
        attempt_agents,
        BTreeSet::from(["a1".to_string(), "a2".to_string()]),
        "agents in the recorded attempts"
    );
}
