//! Metrics end to end: `/metrics` of a real server, scraped over HTTP and
//! parsed by Prometheus' own OpenMetrics parser (the Python client), counts
//! exactly the tasks that ran.

use std::process::Command;
use std::time::Duration;

use adce_tests::{
    AgentProc, ServerProc, TestDir, all_tasks, base_config, free_addr, state_of, venv_tool,
    wait_until,
};

/// Scrapes `url` and prints one `name{labels} value` line per sample, as the
/// OpenMetrics parser read them.
const SCRAPE: &str = r#"
import sys, urllib.request
from prometheus_client.openmetrics.parser import text_string_to_metric_families
body = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode()
for family in text_string_to_metric_families(body):
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        print(f"{s.name}{{{labels}}} {s.value}")
"#;

fn sample(samples: &str, name_and_labels: &str) -> f64 {
    samples
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels).map(str::trim))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name_and_labels} in:\n{samples}"))
}

#[test]
fn metrics_count_the_tasks_that_ran() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let metrics = free_addr();
    let config = format!(
        "{base}metrics:
  listen: {metrics}
scrapers:
  s:
    command: [\"{{config_dir}}/scrapers/write_expected.sh\"]
sources:
  - name: items
    scraper: s
    partitions:
      values: {{var: item, values: [\"a\", \"b\", \"c\", \"d\", \"e\"]}}
    objects: [\"items/{{item}}.json\"]
",
        base = base_config(listen)
    );
    let path = dir.write_config("adce.yaml", &config);
    let server = ServerProc::start(&path, listen);
    let _agent = AgentProc::start(&server.url(), "a1", 2, &[], dir.path());
    wait_until(
        "5 tasks done",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || {
            let done = all_tasks(&server.url(), &[])
                .iter()
                .filter(|t| state_of(t) == "done")
                .count();
            if done == 5 { Ok(()) } else { Err(done) }
        },
    );
    let out = Command::new(venv_tool("python"))
        .args(["-c", SCRAPE, &format!("http://{metrics}/metrics")])
        .output()
        .unwrap_or_else(|e| panic!("cannot run the scrape: {e}"));
    assert!(
        out.status.success(),
        "scrape failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        sample(
            &samples,
            "adce_task_results_total{outcome=done,source=items}"
        ),
        5.0
    );
    assert_eq!(
        sample(
            &samples,
            "adce_dispatch_total{priority=medium,source=items}"
        ),
        5.0
    );
    assert_eq!(
        sample(
            &samples,
            "adce_tasks{priority=medium,source=items,state=done}"
        ),
        5.0
    );
    assert_eq!(sample(&samples, "adce_agents_connected{}"), 1.0);
    assert!(sample(&samples, "adce_upload_bytes_total{}") > 0.0);
}
