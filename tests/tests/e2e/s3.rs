//! An S3 lake on a real moto_server: a daily schedule source and a dependent
//! `games` source whose partitions are the game ids inside each schedule.
//! Two agents fill both; an independent boto3 client then reads the bucket
//! back and finds exactly the expected objects, each as its scraper wrote it.

use std::collections::BTreeSet;
use std::time::Duration;

use adce_tests::{
    AgentProc, MotoServer, ServerProc, TestDir, count, coverage_percent, free_addr, lake_complete,
    s3_config, text, wait_until,
};
use chrono::{Days, NaiveDate};
use serde_json::Value;

/// How long both sources may take to fill (three reconciles, twenty tasks).
const FILL_TIMEOUT: Duration = Duration::from_secs(40);
/// Interval between status polls.
const POLL: Duration = Duration::from_millis(250);
/// The lake bucket.
const BUCKET: &str = "adce-lake";
/// The lake's key prefix inside the bucket.
const PREFIX: &str = "lake/";
/// Days of the schedule source.
const DAYS: u64 = 5;
/// Games in each day's schedule (the schedule scraper's default).
const GAMES_PER_DAY: u64 = 3;

fn first_day() -> NaiveDate {
    NaiveDate::from_ymd_opt(2024, 10, 22).unwrap_or_default()
}

fn day(index: u64) -> NaiveDate {
    first_day()
        .checked_add_days(Days::new(index))
        .unwrap_or_default()
}

fn config(listen: std::net::SocketAddr, moto: &MotoServer) -> String {
    format!(
        "{head}scrapers:
  schedule:
    command: [\"{{config_dir}}/scrapers/schedule.sh\", \"{{date:%Y%m%d}}\"]
    timeout: 30s
    retry: {{max_attempts: 3, backoff: 200ms}}
  game:
    command: [\"{{config_dir}}/scrapers/game.sh\", \"{{game_id}}\"]
    timeout: 30s
    retry: {{max_attempts: 3, backoff: 200ms}}
sources:
  - name: schedule
    scraper: schedule
    priority: high
    partitions:
      dates: {{start: {start}, end: {end}, step: day}}
    objects: [\"nba/schedule/{{date:%Y%m%d}}.json\"]
  - name: games
    scraper: game
    priority: medium
    partitions:
      from_objects:
        objects: \"nba/schedule/{{date:%Y%m%d}}.json\"
        var: game_id
        json: \"/events/*/id\"
    objects: [\"nba/games/{{game_id}}.json\"]
",
        head = s3_config(listen, &moto.lake_yaml(BUCKET, PREFIX, None)),
        start = first_day(),
        end = day(DAYS - 1),
    )
}

/// The per-source row of `adcectl coverage --json`.
fn source_row<'a>(coverage: &'a Value, name: &str) -> &'a Value {
    coverage["sources"]
        .as_array()
        .and_then(|rows| rows.iter().find(|row| row["source"] == name))
        .unwrap_or_else(|| panic!("no coverage row for {name}: {coverage:#}"))
}

#[test]
fn s3_lake_fills_with_dependent_source() {
    let moto = MotoServer::start();
    moto.create_bucket(BUCKET);
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let config_path = dir.write_config("adce.yaml", &config(listen, &moto));

    let server = ServerProc::start_with_env(&config_path, listen, moto.aws_env());
    let _a1 = AgentProc::start(&server.url(), "a1", 2, &[], dir.path());
    let _a2 = AgentProc::start(&server.url(), "a2", 2, &[], dir.path());

    // The games appear only after the schedules land and the loop reconciles
    // again, so wait for the full count, not only for 100 %.
    let expected_total = DAYS + DAYS * GAMES_PER_DAY;
    let status = wait_until(
        "both sources complete (5 schedules and 15 games)",
        FILL_TIMEOUT,
        POLL,
        || {
            let status = server.status();
            if lake_complete(&status) && count(&status, "/coverage/expected") == expected_total {
                Ok(status)
            } else {
                Err(serde_json::json!({"coverage": status["coverage"], "tasks": status["tasks"]}))
            }
        },
    );
    assert_eq!(coverage_percent(&status), 100.0, "{status:#}");
    assert_eq!(count(&status, "/tasks/done"), expected_total, "{status:#}");
    assert_eq!(count(&status, "/tasks/dead"), 0, "{status:#}");
    assert!(
        status["lake"].as_str().unwrap_or_default().contains(BUCKET),
        "status names the S3 lake: {status:#}"
    );

    // Per-source coverage as adcectl reports it.
    let coverage = server.ctl_json(&["coverage"]);
    let schedule = source_row(&coverage, "schedule");
    assert_eq!(schedule["expected"], DAYS, "{coverage:#}");
    assert_eq!(schedule["present"], DAYS, "{coverage:#}");
    assert_eq!(schedule["missing"], 0, "{coverage:#}");
    let games = source_row(&coverage, "games");
    assert_eq!(games["expected"], DAYS * GAMES_PER_DAY, "{coverage:#}");
    assert_eq!(games["present"], DAYS * GAMES_PER_DAY, "{coverage:#}");
    assert_eq!(games["missing"], 0, "{coverage:#}");
    assert_eq!(coverage["evidence"], "listing", "{coverage:#}");

    // An independent client sees exactly the expected keys under the prefix.
    let mut expected_keys = BTreeSet::new();
    let mut game_ids = Vec::new();
    for d in 0..DAYS {
        let stamp = day(d).format("%Y%m%d").to_string();
        expected_keys.insert(format!("{PREFIX}nba/schedule/{stamp}.json"));
        for g in 1..=GAMES_PER_DAY {
            let id = format!("{stamp}{g:02}");
            expected_keys.insert(format!("{PREFIX}nba/games/{id}.json"));
            game_ids.push(id);
        }
    }
    let listed: BTreeSet<String> = moto
        .list(BUCKET, PREFIX)
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    assert_eq!(listed, expected_keys, "keys under {PREFIX} in the bucket");
    let everything = moto.list(BUCKET, "");
    assert_eq!(
        everything.len(),
        expected_keys.len(),
        "objects outside the lake prefix: {everything:?}"
    );
    assert!(
        moto.multipart_uploads(BUCKET).is_empty(),
        "dangling multipart uploads"
    );

    // Every body is what its scraper wrote: it names its own key and id.
    let objects = moto.dump(BUCKET, PREFIX);
    assert_eq!(objects.len(), expected_keys.len());
    for (key, body) in &objects {
        let lake_key = key.strip_prefix(PREFIX).unwrap_or(key);
        let json: Value = serde_json::from_slice(body)
            .unwrap_or_else(|e| panic!("{key} is not JSON ({e}): {}", text(body)));
        assert_eq!(json["key"], lake_key, "{key}: {}", text(body));
        if let Some(id) = lake_key
            .strip_prefix("nba/games/")
            .and_then(|rest| rest.strip_suffix(".json"))
        {
            assert_eq!(json["id"], id, "{key}: {}", text(body));
            assert_eq!(json["game_id"], id, "{key}: {}", text(body));
        } else {
            let stamp = lake_key
                .strip_prefix("nba/schedule/")
                .and_then(|rest| rest.strip_suffix(".json"))
                .unwrap_or_else(|| panic!("unexpected key {key}"));
            assert_eq!(json["date"], stamp, "{key}: {}", text(body));
            let ids: Vec<&str> = json["events"]
                .as_array()
                .map(|events| events.iter().filter_map(|e| e["id"].as_str()).collect())
                .unwrap_or_default();
            let want: Vec<String> = (1..=GAMES_PER_DAY)
                .map(|g| format!("{stamp}{g:02}"))
                .collect();
            assert_eq!(ids, want, "{key}: {}", text(body));
        }
    }

    // Every game task carries its parent's date and its own id.
    let tasks = adce_tests::all_tasks(&server.url(), &["--source", "games"]);
    let mut partitions: Vec<String> = tasks
        .iter()
        .map(|t| t["partition"].as_str().unwrap_or_default().to_string())
        .collect();
    partitions.sort();
    let mut want: Vec<String> = game_ids
        .iter()
        .map(|id| {
            let date = NaiveDate::parse_from_str(&id[..8], "%Y%m%d").unwrap_or_default();
            format!("date={date},game_id={id}")
        })
        .collect();
    want.sort();
    assert_eq!(partitions, want, "partitions of the games tasks");
}
