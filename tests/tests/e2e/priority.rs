//! Priority rules end to end: a low-priority source whose recent partitions a
//! rule makes critical queues them as critical, and `adcectl tasks` says why.

use adce_tests::{ServerProc, TestDir, all_tasks, base_config, free_addr, wait_until};
use std::time::Duration;

#[test]
fn recent_partitions_are_queued_at_the_rule_priority() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let start = (chrono::Utc::now().date_naive() - chrono::Duration::days(6)).format("%Y-%m-%d");
    let config = format!(
        "{base}scrapers:
  s:
    command: [\"{{config_dir}}/scrapers/write_expected.sh\"]
sources:
  - name: daily
    scraper: s
    priority: low
    priority_rules:
      - {{within: 2d, priority: critical}}
    partitions:
      dates: {{start: {start}, end: today}}
    objects: [\"daily/{{date:%Y%m%d}}.json\"]
",
        base = base_config(listen)
    );
    let path = dir.write_config("adce.yaml", &config);
    // No agent: the tasks stay pending, as queued.
    let server = ServerProc::start(&path, listen);
    let tasks = wait_until(
        "7 tasks queued",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let tasks = all_tasks(&server.url(), &[]);
            if tasks.len() == 7 {
                Ok(tasks)
            } else {
                Err(tasks.len())
            }
        },
    );
    let mut critical = 0;
    for task in &tasks {
        let priority = task["priority"].as_str().unwrap_or_default();
        let reason = task["priority_reason"].as_str().unwrap_or_default();
        match priority {
            "critical" => {
                critical += 1;
                assert!(reason.starts_with("rule: within 2d"), "{task:#}");
            }
            "low" => assert!(reason.starts_with("base"), "{task:#}"),
            other => panic!("unexpected priority {other}: {task:#}"),
        }
        // Not ready long enough to age (default aging 6h).
        assert_eq!(task["effective_priority"], task["priority"], "{task:#}");
    }
    // Today, yesterday and the day before.
    assert_eq!(critical, 3, "{tasks:#?}");
    let human = String::from_utf8_lossy(&server.ctl(&["tasks"]).stdout).to_string();
    assert!(human.contains("rule: within 2d"), "{human}");
}

#[test]
fn reload_reprioritizes_queued_tasks() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let config = |priority: &str| {
        format!(
            "{base}scrapers:
  s:
    command: [\"{{config_dir}}/scrapers/write_expected.sh\"]
sources:
  - name: items
    scraper: s
    priority: {priority}
    partitions:
      values: {{var: item, values: [\"a\", \"b\", \"c\"]}}
    objects: [\"items/{{item}}.json\"]
",
            base = base_config(listen)
        )
    };
    let path = dir.write_config("adce.yaml", &config("low"));
    // No agent: the tasks stay queued.
    let server = ServerProc::start(&path, listen);
    let priorities = || -> Vec<String> {
        all_tasks(&server.url(), &[])
            .iter()
            .map(|t| t["priority"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    wait_until(
        "3 tasks queued",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let p = priorities();
            if p.len() == 3 { Ok(()) } else { Err(p) }
        },
    );
    assert_eq!(priorities(), ["low", "low", "low"]);
    dir.write_config("adce.yaml", &config("high"));
    let reloaded = server.ctl_json(&["reload"]);
    assert!(
        reloaded["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("reloaded")),
        "{reloaded:#}"
    );
    assert_eq!(priorities(), ["high", "high", "high"]);
}
