//! Live coverage: while slow tasks run, `adcectl status` shows `present`
//! growing with every committed upload, before any new reconcile; the next
//! reconcile replaces the live figures with what it observes, and they agree.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use adce_tests::{AgentProc, ServerProc, TestDir, base_config, count, free_addr, wait_until};

/// Partitions of the source.
const TASKS: usize = 200;
/// How long the whole source may take to fill.
const FILL_TIMEOUT: Duration = Duration::from_secs(120);
/// Interval between status polls.
const POLL: Duration = Duration::from_millis(100);

#[test]
fn coverage_moves_with_uploads_between_reconciles() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let ids: Vec<String> = (0..TASKS).map(|i| format!("\"{i:03}\"")).collect();
    let config = format!(
        "{base}scrapers:
  slow:
    command: [\"{{config_dir}}/scrapers/write_expected.sh\"]
    env:
      SLEEP: \"0.1\"
    timeout: 60s
sources:
  - name: items
    scraper: slow
    partitions:
      values: {{var: id, values: [{ids}]}}
    objects: [\"items/{{id}}.json\"]
",
        base = base_config(listen),
        ids = ids.join(", "),
    );
    let config_path = dir.write_config("adce.yaml", &config);
    let server = ServerProc::start(&config_path, listen);

    // The first reconcile finds nothing.
    let first = wait_until("the first reconcile", FILL_TIMEOUT, POLL, || {
        let status = server.status();
        if count(&status, "/loop/last_reconcile_unix_ms") > 0 {
            Ok(status)
        } else {
            Err(status)
        }
    });
    assert_eq!(
        count(&first, "/coverage/missing"),
        TASKS as u64,
        "{first:#}"
    );
    assert_eq!(count(&first, "/coverage/present"), 0);
    let reconciled_at = count(&first, "/loop/last_reconcile_unix_ms");

    let _agent = AgentProc::start(&server.url(), "a1", 4, &[], dir.path());

    // Poll while the tasks run: every distinct `present` seen, all before
    // another reconcile (the interval is an hour).
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + FILL_TIMEOUT;
    let last = loop {
        let status = server.status();
        assert_eq!(
            count(&status, "/loop/last_reconcile_unix_ms"),
            reconciled_at,
            "no reconcile ran meanwhile: {status:#}"
        );
        let present = count(&status, "/coverage/present");
        assert_eq!(
            present + count(&status, "/coverage/missing"),
            TASKS as u64,
            "{status:#}"
        );
        seen.insert(present);
        if present == TASKS as u64 {
            break status;
        }
        assert!(Instant::now() < deadline, "not filled in time: {status:#}");
        std::thread::sleep(POLL);
    };
    let increases = seen.len() - 1;
    assert!(
        increases >= 3,
        "present rose only {increases} times while tasks ran: {seen:?}"
    );
    assert!(count(&last, "/coverage_updated_unix_ms") >= reconciled_at);

    // The next reconcile observes the same: every object present, and the
    // figures are its own again (not moved by any upload since).
    let _ = server.ctl_json(&["reconcile"]);
    let after = wait_until("the second reconcile", FILL_TIMEOUT, POLL, || {
        let status = server.status();
        if count(&status, "/loop/last_reconcile_unix_ms") > reconciled_at {
            Ok(status)
        } else {
            Err(status)
        }
    });
    assert_eq!(
        count(&after, "/coverage/present"),
        TASKS as u64,
        "{after:#}"
    );
    assert_eq!(count(&after, "/coverage/missing"), 0);
    assert_eq!(count(&after, "/coverage_updated_unix_ms"), 0, "{after:#}");
    let lake: usize = std::fs::read_dir(dir.join("lake/items"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(lake, TASKS);
}
