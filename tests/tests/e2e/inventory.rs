//! S3 Inventory reports on a real moto_server: the server observes the lake
//! from the newest report (trusting it for partitions older than the report)
//! and confirms recent partitions against the bucket itself; a report whose
//! manifest does not match its checksum is refused, logged, and the lake is
//! listed instead.

use std::collections::BTreeSet;
use std::time::Duration;

use adce_server::config::InventoryConfig;
use adce_server::lake::ObjectMeta;
use adce_server::lake::inventory::testing::{ChecksumMode, ReportBuilder};
use adce_tests::{
    MotoServer, ServerProc, TestDir, all_tasks, count, free_addr, log_entries, s3_config,
    wait_until,
};
use chrono::{Days, NaiveDate, Utc};
use serde_json::Value;

/// How long the first reconcile may take to publish coverage.
const RECONCILE_TIMEOUT: Duration = Duration::from_secs(30);
/// Interval between polls.
const POLL: Duration = Duration::from_millis(200);
/// The lake bucket.
const BUCKET: &str = "adce-lake";
/// The lake's key prefix inside the bucket.
const PREFIX: &str = "lake/";
/// The bucket S3 Inventory delivers reports to.
const REPORT_BUCKET: &str = "adce-inventory";
/// Days of the `daily` source before today (it ends today).
const DAYS_BEFORE_TODAY: u64 = 9;
/// The old day whose object is deleted after the report was made.
const DELETED_DAYS_AGO: u64 = 5;
/// How many log entries to read back.
const LOG_TAIL: usize = 500;

fn inventory_config() -> InventoryConfig {
    InventoryConfig {
        bucket: REPORT_BUCKET.to_string(),
        prefix: "inv".to_string(),
        config_id: "daily".to_string(),
    }
}

fn days_ago(today: NaiveDate, n: u64) -> NaiveDate {
    today.checked_sub_days(Days::new(n)).unwrap_or(today)
}

/// The lake key of a day's object (without the bucket prefix).
fn key(date: NaiveDate) -> String {
    format!("daily/{}.json", date.format("%Y%m%d"))
}

fn config(listen: std::net::SocketAddr, moto: &MotoServer, today: NaiveDate) -> String {
    let inventory = inventory_config();
    format!(
        "{head}scrapers:
  writer:
    command: [\"{{config_dir}}/scrapers/write_expected.sh\"]
    timeout: 30s
sources:
  - name: daily
    scraper: writer
    partitions:
      dates: {{start: {start}, end: today, step: day}}
    objects: [\"daily/{{date:%Y%m%d}}.json\"]
",
        head = s3_config(listen, &moto.lake_yaml(BUCKET, PREFIX, Some(&inventory))),
        start = days_ago(today, DAYS_BEFORE_TODAY),
    )
}

/// What a scenario observed after the server's first reconcile.
struct Observed {
    coverage: Value,
    /// Partition texts of every task (`date=YYYY-MM-DD`).
    queued: BTreeSet<String>,
    /// Messages of every server log entry.
    logs: Vec<String>,
}

/// Seeds the lake with every day but the last two, writes a report of that
/// (stamped yesterday 00:00 UTC) with `checksum`, then deletes one old
/// object and adds today's; starts the server with the inventory configured
/// and no agents, and returns what the first reconcile found.
fn scenario(checksum: ChecksumMode) -> (Observed, NaiveDate) {
    let today = Utc::now().date_naive();
    let moto = MotoServer::start();
    moto.create_bucket(BUCKET);
    moto.create_bucket(REPORT_BUCKET);

    // Days today-9 ..= today-2 are in the lake; the report lists them.
    let report_day = days_ago(today, 1);
    let report_ms = report_day
        .and_hms_opt(0, 0, 0)
        .map(|t| t.and_utc().timestamp_millis())
        .unwrap_or_default();
    let mut listed = Vec::new();
    for n in 2..=DAYS_BEFORE_TODAY {
        let date = days_ago(today, n);
        let body = format!("{{\"seeded\": \"{date}\"}}\n");
        moto.put(BUCKET, &format!("{PREFIX}{}", key(date)), body.as_bytes());
        listed.push(ObjectMeta {
            key: format!("{PREFIX}{}", key(date)),
            size: body.len() as u64,
            modified_ms: report_ms - 3_600_000,
        });
    }
    let stamp = format!("{}T00-00Z", report_day.format("%Y-%m-%d"));
    let report = ReportBuilder::new(&inventory_config(), BUCKET, &stamp)
        .objects_file(listed)
        .checksum(checksum);
    let report_dir = moto.upload_report(REPORT_BUCKET, report);
    assert!(
        report_dir.starts_with(&format!("inv/{BUCKET}/daily/{stamp}")),
        "report written at {report_dir}"
    );

    // After the report: an old object goes, today's arrives.
    let deleted = days_ago(today, DELETED_DAYS_AGO);
    moto.delete(BUCKET, &[&format!("{PREFIX}{}", key(deleted))]);
    moto.put(
        BUCKET,
        &format!("{PREFIX}{}", key(today)),
        b"{\"added\": \"after the report\"}\n",
    );

    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let config_path = dir.write_config("adce.yaml", &config(listen, &moto, today));
    let server = ServerProc::start_with_env(&config_path, listen, moto.aws_env());

    let coverage = wait_until("the first reconcile", RECONCILE_TIMEOUT, POLL, || {
        let coverage = server.ctl_json(&["coverage"]);
        if count(&coverage, "/computed_unix_ms") > 0 {
            Ok(coverage)
        } else {
            Err(coverage)
        }
    });
    let queued: BTreeSet<String> = all_tasks(&server.url(), &[])
        .iter()
        .map(|t| t["partition"].as_str().unwrap_or_default().to_string())
        .collect();
    // Reconciling again from the same evidence changes nothing.
    let again = server.ctl_json(&["reconcile"]);
    assert_eq!(count(&again, "/tasks_created"), 0, "{again:#}");
    assert_eq!(
        again["coverage"], coverage["total"],
        "a second reconcile saw something else"
    );
    let logs = log_entries(&server.url(), LOG_TAIL, &[])
        .iter()
        .map(|e| e["message"].as_str().unwrap_or_default().to_string())
        .collect();
    (
        Observed {
            coverage,
            queued,
            logs,
        },
        today,
    )
}

fn partition(date: NaiveDate) -> String {
    format!("date={date}")
}

#[test]
fn inventory_report_is_used_and_patched() {
    let (seen, today) = scenario(ChecksumMode::Valid);
    let coverage = &seen.coverage;
    let evidence = coverage["evidence"].as_str().unwrap_or_default();
    assert!(
        evidence.contains("inventory"),
        "the evidence names the inventory report: {coverage:#}"
    );

    // Old partitions are taken from the report: the object deleted after it
    // is still counted present and not queued.
    let deleted = days_ago(today, DELETED_DAYS_AGO);
    assert!(
        !seen.queued.contains(&partition(deleted)),
        "the deleted old object was queued although the report lists it: {:?}",
        seen.queued
    );
    // Recent partitions are confirmed against the bucket: today's object
    // (added after the report) is present, yesterday's (in neither) is
    // missing and queued. Nothing else is queued.
    assert_eq!(
        seen.queued,
        BTreeSet::from([partition(days_ago(today, 1))]),
        "queued partitions"
    );
    let total = DAYS_BEFORE_TODAY + 1;
    assert_eq!(count(coverage, "/total/expected"), total, "{coverage:#}");
    assert_eq!(count(coverage, "/total/present"), total - 1, "{coverage:#}");
    assert_eq!(count(coverage, "/total/missing"), 1, "{coverage:#}");
    assert!(
        !seen
            .logs
            .iter()
            .any(|m| m.contains("inventory report unusable")),
        "a valid report was refused: {:#?}",
        seen.logs
    );
}

#[test]
fn corrupted_inventory_checksum_falls_back_to_listing() {
    let (seen, today) = scenario(ChecksumMode::Corrupt);
    let coverage = &seen.coverage;
    assert_eq!(coverage["evidence"], "listing", "{coverage:#}");

    // Listing sees the truth: the deleted old object and yesterday's are
    // missing and queued, nothing else.
    assert_eq!(
        seen.queued,
        BTreeSet::from([
            partition(days_ago(today, DELETED_DAYS_AGO)),
            partition(days_ago(today, 1)),
        ]),
        "queued partitions"
    );
    let total = DAYS_BEFORE_TODAY + 1;
    assert_eq!(count(coverage, "/total/expected"), total, "{coverage:#}");
    assert_eq!(count(coverage, "/total/present"), total - 2, "{coverage:#}");

    // The refusal is in the server's log stream, naming the report and why.
    let refusal = seen.logs.iter().find(|m| {
        let lower = m.to_lowercase();
        lower.contains("inventory") && lower.contains("checksum")
    });
    assert!(
        refusal.is_some_and(|m| m.contains("manifest")),
        "no log entry about the inventory report's checksum: {:#?}",
        seen.logs
    );
}
