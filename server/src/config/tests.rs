//! Tests of config loading: defaults, every error with its exact `file:line:column`,
//! the shipped demo and example configs, and the dump round trip.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

const DEMO: &str = include_str!("../../../config/demo.yaml");
const EXAMPLE: &str = include_str!("../../../config/example.yaml");

/// A small valid config; tests splice mistakes into it.
const BASE: &str = "\
version: 1
lake:
  local:
    root: lake
scrapers:
  s:
    command: [\"sh\", \"{config_dir}/s.sh\", \"{out}\"]
sources:
  - name: a
    scraper: s
    objects: [\"a/static.json\"]
";

fn parse(src: &str) -> Result<Config, ConfigError> {
    Config::parse(src, Path::new("demo.yaml"))
}

fn err(src: &str) -> String {
    match parse(src) {
        Ok(_) => panic!("config unexpectedly valid:\n{src}"),
        Err(e) => e.to_string(),
    }
}

/// The 1-based `line:column` of the first occurrence of `needle` in `src`.
fn pos_of(src: &str, needle: &str) -> String {
    pos_of_nth(src, needle, 0)
}

/// The 1-based `line:column` of the `n`th (0-based) occurrence of `needle`.
fn pos_of_nth(src: &str, needle: &str, n: usize) -> String {
    let (at, _) = src
        .match_indices(needle)
        .nth(n)
        .unwrap_or_else(|| panic!("`{needle}` occurs fewer than {} times", n + 1));
    let before = &src[..at];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    format!("{line}:{col}")
}

/// Asserts that `src` fails at `needle` (its `nth` occurrence) with every word of `words`.
#[track_caller]
fn assert_err_at(src: &str, needle: &str, nth: usize, words: &[&str]) {
    let msg = err(src);
    let prefix = format!("demo.yaml:{}: ", pos_of_nth(src, needle, nth));
    assert!(
        msg.starts_with(&prefix),
        "expected prefix `{prefix}`, got: {msg}"
    );
    for w in words {
        assert!(msg.contains(w), "expected `{w}` in: {msg}");
    }
}

fn with_source(extra_source_lines: &str) -> String {
    format!("{BASE}{extra_source_lines}")
}

#[test]
fn minimal_config_gets_every_default() {
    let cfg = parse(BASE).unwrap();
    assert_eq!(cfg.version, 1);
    assert_eq!(cfg.server.listen, DEFAULT_LISTEN);
    assert_eq!(cfg.server.state_dir, PathBuf::from("adce-state"));
    assert_eq!(cfg.server.heartbeat_interval, Duration::from_secs(5));
    assert_eq!(cfg.server.lease_ttl, Duration::from_secs(30));
    assert_eq!(cfg.server.max_upload_bytes, 5_368_709_120);
    assert_eq!(cfg.server.max_upload_time, Duration::from_secs(3600));
    assert_eq!(cfg.lake.local.as_ref().unwrap().root, PathBuf::from("lake"));
    assert!(cfg.r#loop.enabled);
    assert_eq!(cfg.r#loop.reconcile_interval, Duration::from_secs(3600));
    assert_eq!(cfg.r#loop.queue_check_interval, Duration::from_secs(10));
    assert_eq!(cfg.r#loop.dispatch_threshold, 1);
    assert_eq!(cfg.r#loop.max_cycle_runtime, Duration::from_secs(6 * 3600));
    let s = &cfg.scrapers["s"];
    assert_eq!(s.timeout, Duration::from_secs(3600));
    assert_eq!(s.retry, RetryPolicy::default());
    assert_eq!(s.retry.max_attempts, 3);
    assert_eq!(s.retry.backoff, Duration::from_secs(30));
    let a = &cfg.sources[0];
    assert_eq!(a.priority, Priority::Medium);
    assert_eq!(a.min_bytes, 1);
    assert!(a.partitions.is_empty());
    assert_eq!(cfg.config_dir, PathBuf::from("."));
}

#[test]
fn relative_paths_resolve_against_the_config_directory() {
    let cfg = Config::parse(BASE, Path::new("/etc/adce/adce.yaml")).unwrap();
    assert_eq!(cfg.server.state_dir, PathBuf::from("/etc/adce/adce-state"));
    assert_eq!(
        cfg.lake.local.unwrap().root,
        PathBuf::from("/etc/adce/lake")
    );
    assert_eq!(cfg.config_dir, PathBuf::from("/etc/adce"));
    let abs = BASE.replace("root: lake", "root: /srv/lake");
    let cfg = Config::parse(&abs, Path::new("/etc/adce/adce.yaml")).unwrap();
    assert_eq!(cfg.lake.local.unwrap().root, PathBuf::from("/srv/lake"));
}

#[test]
fn load_reads_a_real_file_and_resolves_against_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("adce.yaml");
    std::fs::write(&path, BASE).unwrap();
    let cfg = Config::load(&path).unwrap();
    assert_eq!(cfg.lake.local.unwrap().root, dir.path().join("lake"));
    assert_eq!(cfg.config_dir, dir.path());
}

#[test]
fn unreadable_file_names_the_file_and_the_os_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.yaml");
    let e = Config::load(&path).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!("{}: cannot read: ", path.display())),
        "{msg}"
    );
    assert!(msg.contains("No such file"), "{msg}");
    assert_eq!(e.position(), None);
}

#[test]
fn empty_file_is_explained() {
    assert_eq!(
        err("  \n"),
        "demo.yaml: empty config: expected a mapping starting with `version: 1`"
    );
}

#[test]
fn yaml_syntax_error_has_a_position() {
    let src = "version: 1\nlake:\n  local: {root: lake\nscrapers: {}\n";
    let msg = err(src);
    assert!(msg.starts_with("demo.yaml:4:"), "{msg}");
    assert!(msg.contains("did not find expected"), "{msg}");
    assert!(
        !msg.contains("at line 4 column"),
        "the position is not repeated: {msg}"
    );
}

#[test]
fn version_is_required_and_must_be_one() {
    let src = BASE.replace("version: 1", "version: 2");
    assert_err_at(
        &src,
        "2",
        0,
        &["unsupported config version `2`", "expected 1"],
    );
    let src = BASE.replace("version: 1\n", "");
    let msg = err(&src);
    assert!(msg.starts_with("demo.yaml:1:1: "), "{msg}");
    assert!(msg.contains("missing field `version`"), "{msg}");
}

#[test]
fn unknown_field_lists_the_expected_ones() {
    let src = with_source("  - name: b\n    sceduler: s\n    objects: [x]\n");
    assert_err_at(
        &src,
        "sceduler",
        0,
        &[
            "unknown field `sceduler`",
            "expected one of `name`, `scraper`",
        ],
    );
    let src = BASE.replace("lake:\n", "lake:\n  gcs: {bucket: b}\n");
    assert_err_at(&src, "gcs", 0, &["unknown field `gcs`", "`local`", "`s3`"]);
    let src = BASE.replace("lake:\n", "lake:\n  s3: {bucket: b}\n");
    assert_err_at(&src, "{bucket", 0, &["either `local` or `s3`, not both"]);
    let src = format!("{BASE}telemetry: {{}}\n");
    assert_err_at(&src, "telemetry", 0, &["unknown field `telemetry`"]);
}

#[test]
fn malformed_dates_name_the_value_and_the_format() {
    let src = with_source(
        "  - name: b\n    scraper: s\n    partitions:\n      dates: {start: 2024-13-40, end: today}\n    objects: [\"b/{date}\"]\n",
    );
    assert_err_at(
        &src,
        "2024-13-40",
        0,
        &["invalid date `2024-13-40`: expected YYYY-MM-DD"],
    );
    let src = with_source(
        "  - name: b\n    scraper: s\n    partitions:\n      dates: {start: 2024-10-22, end: tomorrow}\n    objects: [\"b/{date}\"]\n",
    );
    assert_err_at(
        &src,
        "tomorrow",
        0,
        &["invalid date `tomorrow`: expected YYYY-MM-DD or `today`"],
    );
}

#[test]
fn invalid_durations_rates_priorities_steps_and_seasons() {
    let src = BASE.replace(
        "version: 1\n",
        "version: 1\nserver:\n  lease_ttl: 30 parsecs\n",
    );
    assert_err_at(
        &src,
        "30 parsecs",
        0,
        &["invalid duration `30 parsecs`", "unknown time unit"],
    );

    let src = format!("{BASE}limits:\n  g: {{rate: 20/day}}\n");
    assert_err_at(&src, "20/day", 0, &["invalid rate `20/day`", "N/min"]);

    let src = with_source("  - name: b\n    scraper: s\n    priority: urgent\n    objects: [b]\n");
    assert_err_at(
        &src,
        "urgent",
        0,
        &["unknown variant `urgent`", "`critical`", "`low`"],
    );

    let src = with_source(
        "  - name: b\n    scraper: s\n    partitions:\n      dates: {start: 2024-10-22, end: today, step: fortnight}\n    objects: [\"b/{date}\"]\n",
    );
    assert_err_at(
        &src,
        "fortnight",
        0,
        &["unknown variant `fortnight`", "`week`", "`month`"],
    );

    let src = with_source(
        "  - name: b\n    scraper: s\n    partitions:\n      seasons: {start: \"2015-17\", end: current}\n    objects: [\"b/{season}\"]\n",
    );
    assert_err_at(
        &src,
        "\"2015-17\"",
        0,
        &["invalid season `2015-17`", "2015-16"],
    );

    let src = with_source(
        "  - name: b\n    scraper: s\n    partitions:\n      seasons: {start: \"2015-16\", end: \"2020\"}\n    objects: [\"b/{season}\"]\n",
    );
    assert_err_at(
        &src,
        "\"2020\"",
        0,
        &["must be written like start `2015-16`"],
    );

    let src = with_source(
        "  - name: b\n    scraper: s\n    partitions:\n      seasons: {start: \"2015-16\", end: \"2014-15\"}\n    objects: [\"b/{season}\"]\n",
    );
    assert_err_at(&src, "\"2014-15\"", 0, &["precedes start `2015-16`"]);

    let src = with_source(
        "  - name: b\n    scraper: s\n    partitions:\n      seasons: {start: \"2015\", end: current, start_month: 13}\n    objects: [\"b/{season}\"]\n",
    );
    assert_err_at(&src, "13", 0, &["invalid month `13`"]);

    let src = with_source(
        "  - name: b\n    scraper: s\n    partitions:\n      dates: {start: 2024-10-22, end: 2024-10-01}\n    objects: [\"b/{date}\"]\n",
    );
    assert_err_at(
        &src,
        "2024-10-01",
        0,
        &["end 2024-10-01 precedes start 2024-10-22"],
    );
}

#[test]
fn calendar_filters_load_and_bad_ones_are_positioned() {
    let src = with_source(
        "  - name: b\n    scraper: s\n    partitions:\n      dates: {start: 1993-11-05, end: today, windows: [\"10-20..06-20\"], weekdays: [mon, Fri], except: [2020-03-12..2020-07-29, 2021-12-25]}\n    objects: [\"b/{date}\"]\n",
    );
    let cfg = parse(&src).unwrap_or_else(|e| panic!("{e}"));
    let Generator::Dates(g) = &cfg.sources[1].partitions.0[0] else {
        panic!("a dates generator");
    };
    assert_eq!(g.windows.len(), 1);
    assert_eq!(g.weekdays.len(), 2);
    assert_eq!(g.except.len(), 2);
    // The dump writes them back as they were written.
    let dumped = serde_yaml::to_string(&cfg.sources[1]).unwrap();
    for text in [
        "10-20..06-20",
        "fri",
        "2020-03-12..2020-07-29",
        "2021-12-25",
    ] {
        assert!(dumped.contains(text), "{text} in {dumped}");
    }

    for (filter, needle, words) in [
        (
            "windows: [\"10-20..13-01\"]",
            "\"10-20..13-01\"",
            &["no such day in any year"][..],
        ),
        (
            "windows: [\"october\"]",
            "\"october\"",
            &["expected MM-DD"][..],
        ),
        (
            "weekdays: [mon, funday]",
            "funday",
            &["invalid weekday `funday`", "mon, tue"][..],
        ),
        (
            "except: [2020-07-29..2020-03-12]",
            "2020-07-29..2020-03-12",
            &["2020-03-12 precedes 2020-07-29"][..],
        ),
    ] {
        let src = with_source(&format!(
            "  - name: b\n    scraper: s\n    partitions:\n      dates: {{start: 2024-01-01, end: today, {filter}}}\n    objects: [\"b/{{date}}\"]\n"
        ));
        assert_err_at(&src, needle, 0, words);
    }

    // A fixed range the filters leave empty is refused; an open one is not.
    let src = with_source(
        "  - name: b\n    scraper: s\n    partitions:\n      dates: {start: 2024-07-01, end: 2024-07-31, windows: [\"10-20..06-20\"]}\n    objects: [\"b/{date}\"]\n",
    );
    let msg = err(&src);
    assert!(
        msg.contains("leave no date between 2024-07-01 and 2024-07-31"),
        "{msg}"
    );
    assert!(msg.starts_with("demo.yaml:"), "{msg}");
    let src = src.replace("end: 2024-07-31", "end: today");
    parse(&src).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn template_syntax_errors_are_positioned_at_the_template() {
    let src = with_source("  - name: b\n    scraper: s\n    objects: [\"b/{date\"]\n");
    assert_err_at(
        &src,
        "\"b/{date\"",
        0,
        &["invalid template `b/{date`", "unclosed `{`"],
    );

    let src = with_source(
        "  - name: b\n    scraper: s\n    partitions:\n      dates: {start: 2024-10-22, end: today}\n    objects: [\"b/{date:%Q}\"]\n",
    );
    assert_err_at(&src, "\"b/{date:%Q}\"", 0, &["invalid date format `%Q`"]);

    let src = BASE.replace("\"{out}\"]", "\"{out}\", \"{date:%H}\"]");
    assert_err_at(&src, "\"{date:%H}\"", 0, &["needs a time"]);
}

#[test]
fn object_templates_must_match_the_partitions() {
    let src = with_source(
        "  - name: b\n    scraper: s\n    partitions:\n      dates: {start: 2024-10-22, end: today}\n    objects: [\"b/{day}.json\"]\n",
    );
    assert_err_at(
        &src,
        "\"b/{day}.json\"",
        0,
        &["uses `{day}`", "source `b` do not define", "defined: date"],
    );

    let src = with_source(
        "  - name: b\n    scraper: s\n    partitions:\n      seasons: {start: \"2015-16\", end: \"2016-17\"}\n    objects: [\"b/{season:%Y}.json\"]\n",
    );
    assert_err_at(
        &src,
        "\"b/{season:%Y}.json\"",
        0,
        &["formats a date", "`season` is not a date"],
    );

    let src = with_source(
        "  - name: b\n    scraper: s\n    partitions:\n      dates: {start: 2024-10-22, end: today}\n    objects: [\"b/latest.json\"]\n",
    );
    assert_err_at(
        &src,
        "\"b/latest.json\"",
        0,
        &["does not use partition variable `date`", "share keys"],
    );

    let src = with_source("  - name: b\n    scraper: s\n    objects: [\"/abs/b.json\"]\n");
    assert_err_at(
        &src,
        "\"/abs/b.json\"",
        0,
        &["the lake refuses: it starts with `/`"],
    );
    let src = with_source("  - name: b\n    scraper: s\n    objects: [\"b/../../etc\"]\n");
    assert_err_at(&src, "\"b/../../etc\"", 0, &["`..`"]);

    let src = with_source("  - name: b\n    scraper: s\n    objects: [\"a/static.json\"]\n");
    assert_err_at(
        &src,
        "\"a/static.json\"",
        1,
        &["sources `a` and `b` both expect key `a/static.json`"],
    );
}

/// Two sources may share a key template when their partitions never meet
/// (here: the same template, disjoint season windows of the same days);
/// overlapping ones are refused at the later template, naming both sources
/// and the first key both would expect.
#[test]
fn sources_share_a_template_only_when_their_keys_are_disjoint() {
    let two = |a: &str, b: &str| {
        with_source(&format!(
            "  - name: regular\n    scraper: s\n    partitions:\n      dates: {{start: 2024-01-01, end: 2024-12-31, {a}}}\n    objects: [\"nba/{{date:%Y%m%d}}.json\"]\n  - name: summer\n    scraper: s\n    partitions:\n      dates: {{start: 2024-01-01, end: 2024-12-31, {b}}}\n    objects: [\"nba/{{date:%Y%m%d}}.json\"]\n"
        ))
    };
    let disjoint = two("windows: [\"10-20..06-20\"]", "windows: [\"06-21..10-19\"]");
    let cfg = parse(&disjoint).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.sources.len(), 3);
    // Weekdays and weekends of the same range are disjoint too.
    parse(&two(
        "weekdays: [mon, tue, wed, thu, fri]",
        "weekdays: [sat, sun]",
    ))
    .unwrap_or_else(|e| panic!("{e}"));

    let overlapping = two("windows: [\"10-20..06-20\"]", "windows: [\"06-20..10-19\"]");
    assert_err_at(
        &overlapping,
        "\"nba/{date:%Y%m%d}.json\"",
        1,
        &[
            "sources `regular` and `summer` both expect key `nba/20240620.json`",
            "partitions are disjoint",
        ],
    );

    // A dependent source's keys are known only at reconcile: it loads.
    let src = with_source(
        "  - name: games\n    scraper: s\n    partitions:\n      from_objects: {objects: \"a/static.json\", var: game_id, json: /ids}\n    objects: [\"g/{game_id}.json\"]\n  - name: more\n    scraper: s\n    partitions:\n      values: {var: game_id, values: [\"1\"]}\n    objects: [\"g/{game_id}.json\"]\n",
    );
    parse(&src).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn hostile_partition_values_are_rejected_with_position() {
    for bad in ["../x", "a;b", "a b", "..", "$(reboot)"] {
        let quoted = format!("\"{bad}\"");
        let src = with_source(&format!(
            "  - name: b\n    scraper: s\n    partitions:\n      values: {{var: id, values: [ok1, {quoted}]}}\n    objects: [\"b/{{id}}\"]\n"
        ));
        assert_err_at(
            &src,
            &quoted,
            0,
            &["invalid partition value", "[A-Za-z0-9._-]"],
        );
    }
    let long = "x".repeat(10 * 1024);
    let src = with_source(&format!(
        "  - name: b\n    scraper: s\n    partitions:\n      values: {{var: id, values: [{long}]}}\n    objects: [\"b/{{id}}\"]\n"
    ));
    let msg = err(&src);
    assert!(
        msg.starts_with(&format!("demo.yaml:{}: ", pos_of(&src, &long))),
        "{}",
        &msg[..100]
    );
    assert!(msg.len() < 300, "the message quotes an excerpt only");
}

#[test]
fn values_need_a_var_distinct_values_and_a_valid_name() {
    let src = with_source(
        "  - name: b\n    scraper: s\n    partitions:\n      values: {values: [x]}\n    objects: [\"b\"]\n",
    );
    assert_err_at(&src, "{values: [x]}", 0, &["missing field `var`"]);
    let src = with_source(
        "  - name: b\n    scraper: s\n    partitions:\n      values: {var: id, values: [x, y, x]}\n    objects: [\"b/{id}\"]\n",
    );
    assert_err_at(&src, "x]", 0, &["duplicate value `x`"]);
    let src = with_source(
        "  - name: b\n    scraper: s\n    partitions:\n      values: {var: Game-ID, values: [x]}\n    objects: [\"b/{id}\"]\n",
    );
    assert_err_at(&src, "Game-ID", 0, &["invalid variable name `Game-ID`"]);
    let src = with_source(
        "  - name: b\n    scraper: s\n    partitions:\n      values: {var: id, values: []}\n    objects: [\"b/{id}\"]\n",
    );
    assert_err_at(&src, "[]", 0, &["must not be empty"]);
}

#[test]
fn generators_need_distinct_vars_one_key_each_and_no_builtin_names() {
    let src = with_source(
        "  - name: b\n    scraper: s\n    partitions:\n      - values: {var: id, values: [x]}\n      - values: {var: id, values: [y]}\n    objects: [\"b/{id}\"]\n",
    );
    assert_err_at(&src, "id", 1, &["defines partition variable `id` twice"]);

    let src = with_source(
        "  - name: b\n    scraper: s\n    partitions:\n      values: {var: source, values: [x]}\n    objects: [\"b/{source}\"]\n",
    );
    assert_err_at(&src, "source,", 0, &["clashes with a built-in placeholder"]);

    let src = with_source(
        "  - name: b\n    scraper: s\n    partitions:\n      values: {var: id, values: [x]}\n      dates: {start: 2024-10-22, end: today}\n    objects: [\"b/{id}\"]\n",
    );
    assert_err_at(
        &src,
        "values: {var: id",
        0,
        &["exactly one key", "found `dates` after `values`", "list"],
    );

    let src = with_source(
        "  - name: b\n    scraper: s\n    partitions:\n      weeks: {start: 2024-10-22, end: today}\n    objects: [\"b\"]\n",
    );
    assert_err_at(
        &src,
        "weeks",
        0,
        &["unknown partition generator `weeks`", "`dates`"],
    );

    let src =
        with_source("  - name: b\n    scraper: s\n    partitions: []\n    objects: [\"b\"]\n");
    assert_err_at(&src, "[]", 0, &["empty list of partition generators"]);
}

#[test]
fn cross_references_point_at_the_offending_value() {
    let src = with_source("  - name: nba_pbp\n    scraper: nba_pbpp\n    objects: [x]\n");
    assert_err_at(
        &src,
        "nba_pbpp",
        0,
        &["source `nba_pbp` uses scraper `nba_pbpp`, which is not defined (defined: s)"],
    );

    let src = BASE.replace("\"{out}\"]\n", "\"{out}\"]\n    limits: [bbref]\n");
    assert_err_at(
        &src,
        "bbref",
        0,
        &["scraper `s` uses limit group `bbref`, which is not defined (defined: none)"],
    );

    let src = with_source("  - name: a\n    scraper: s\n    objects: [\"other\"]\n");
    assert_err_at(
        &src,
        "a\n    scraper: s\n    objects: [\"other\"]",
        0,
        &["duplicate source name `a`", "sources[0]", "line 9"],
    );

    let src = with_source("  - name: b\n    scraper: s\n    objects: []\n");
    assert_err_at(&src, "[]", 0, &["source `b` has no objects"]);

    let src = with_source("  - name: b\n    scraper: s\n");
    assert_err_at(&src, "name: b", 0, &["missing field `objects`"]);

    let src = with_source("  - name: \"b c\"\n    scraper: s\n    objects: [x]\n");
    assert_err_at(&src, "\"b c\"", 0, &["invalid source name `b c`"]);
}

#[test]
fn command_templates_may_use_only_variables_of_every_user_source() {
    let src = format!(
        "{}  - name: b\n    scraper: s\n    partitions:\n      dates: {{start: 2024-10-22, end: today}}\n    objects: [\"b/{{date}}\"]\n",
        BASE.replace("\"{out}\"]", "\"{out}\", \"--day={date:%Y%m%d}\"]")
    );
    assert_err_at(
        &src,
        "\"--day={date:%Y%m%d}\"",
        0,
        &[
            "scraper `s` uses `{date}` in its command",
            "source `a`",
            "does not define it",
        ],
    );

    let src = "version: 1\nlake: {local: {root: l}}\nscrapers:\n  s:\n    command: [x, \"{season:%Y}\"]\nsources:\n  - name: b\n    scraper: s\n    partitions:\n      seasons: {start: \"2015\", end: \"2016\"}\n    objects: [\"b/{season}\"]\n";
    assert_err_at(
        src,
        "\"{season:%Y}\"",
        0,
        &["formats `{season}` as a date", "not a date in source `b`"],
    );

    let src = BASE.replace("\"{out}\"]", "\"{out}\", \"{task_id:%Y}\"]");
    assert_err_at(
        &src,
        "\"{task_id:%Y}\"",
        0,
        &["`{task_id}` is not a date and takes no format"],
    );
}

#[test]
fn env_keys_and_values_are_checked() {
    let src = BASE.replace("\"{out}\"]\n", "\"{out}\"]\n    env: {OUT: \"{out}\"}\n");
    assert_err_at(
        &src,
        "\"{out}\"}",
        0,
        &["`{out}` is only available in `command`", "ADCE_OUTPUT_DIR"],
    );
    let src = BASE.replace("\"{out}\"]\n", "\"{out}\"]\n    env: {ADCE_TASK_ID: x}\n");
    assert_err_at(&src, "ADCE_TASK_ID", 0, &["reserved"]);
    let src = BASE.replace("\"{out}\"]\n", "\"{out}\"]\n    env: {\"A-B\": x}\n");
    assert_err_at(
        &src,
        "\"A-B\"",
        0,
        &["invalid environment variable name `A-B`"],
    );
    let src = BASE.replace("\"{out}\"]\n", "\"{out}\"]\n    env: {A: \"{game}\"}\n");
    assert_err_at(&src, "\"{game}\"", 0, &["uses `{game}` in its env"]);
}

#[test]
fn duplicate_map_keys_are_errors() {
    let src = BASE.replace(
        "scrapers:\n",
        "scrapers:\n  t:\n    command: [x]\n  t:\n    command: [y]\n",
    );
    assert_err_at(
        &src,
        "t:\n    command: [y]",
        0,
        &["duplicate key `t`", "scrapers"],
    );
}

#[test]
fn ranges_and_relations_between_values() {
    let src = BASE.replace(
        "version: 1\n",
        "version: 1\nserver:\n  heartbeat_interval: 30s\n  lease_ttl: 10s\n",
    );
    assert_err_at(
        &src,
        "10s",
        0,
        &["lease_ttl (10s) must be longer than heartbeat_interval (30s)"],
    );

    let src = BASE.replace(
        "version: 1\n",
        "version: 1\nloop:\n  queue_check_interval: 0s\n",
    );
    assert_err_at(
        &src,
        "0s",
        0,
        &["`queue_check_interval` must be longer than 0s"],
    );

    let src = BASE.replace("\"{out}\"]\n", "\"{out}\"]\n    retry: {multiplier: 0.5}\n");
    assert_err_at(&src, "0.5", 0, &["`multiplier` must be at least 1.0"]);
    let src = BASE.replace("\"{out}\"]\n", "\"{out}\"]\n    retry: {backoff: 2h}\n");
    assert_err_at(&src, "2h", 0, &["backoff (2h) exceeds max_backoff (1h)"]);
    let src = BASE.replace("\"{out}\"]\n", "\"{out}\"]\n    retry: {jitter: 2}\n");
    assert_err_at(&src, "2}", 0, &["`jitter` must be between 0 and 1"]);

    let src = format!("{BASE}limits:\n  g: {{burst: 3}}\n");
    assert_err_at(&src, "3}", 0, &["limit group `g` has a burst but no rate"]);
    let src = format!("{BASE}limits:\n  g: {{max_concurrent: 0}}\n");
    assert_err_at(&src, "0}", 0, &["`max_concurrent` must be at least 1"]);

    let src = BASE.replace("lake:\n  local:\n    root: lake\n", "lake: {}\n");
    assert_err_at(&src, "{}", 0, &["the lake needs `local"]);

    let src = BASE.replace(
        "command: [\"sh\", \"{config_dir}/s.sh\", \"{out}\"]",
        "command: []",
    );
    assert_err_at(&src, "[]", 0, &["scraper `s` has an empty command"]);
}

#[test]
fn byte_sizes_accept_units() {
    let src = BASE.replace(
        "version: 1\n",
        "version: 1\nserver:\n  max_upload_bytes: 512MiB\n",
    );
    assert_eq!(parse(&src).unwrap().server.max_upload_bytes, 512 << 20);
    let src = BASE.replace(
        "version: 1\n",
        "version: 1\nserver:\n  max_upload_bytes: lots\n",
    );
    assert_err_at(&src, "lots", 0, &["invalid size `lots`"]);
}

#[test]
fn upload_time_and_incomplete_upload_age_are_checked() {
    let s3 = |server: &str, s3: &str| {
        BASE.replace("version: 1\n", &format!("version: 1\nserver:\n{server}"))
            .replace(
                "lake:\n  local:\n    root: lake\n",
                &format!("lake:\n  s3:\n    bucket: b\n{s3}"),
            )
    };
    let cfg = parse(&s3("  max_upload_time: 2h\n", "")).unwrap();
    assert_eq!(cfg.server.max_upload_time, Duration::from_secs(2 * 3600));
    let s3_cfg = cfg.lake.s3.as_ref().unwrap();
    assert_eq!(
        s3_cfg.abort_incomplete_after,
        DEFAULT_ABORT_INCOMPLETE_AFTER
    );
    assert_eq!(
        DEFAULT_ABORT_INCOMPLETE_AFTER,
        Duration::from_secs(24 * 3600)
    );
    let cfg = parse(&s3(
        "  max_upload_time: 1s\n",
        "    abort_incomplete_after: 2s\n",
    ))
    .unwrap();
    assert_eq!(
        cfg.lake.s3.unwrap().abort_incomplete_after,
        Duration::from_secs(2)
    );

    let src = s3("  max_upload_time: 0s\n", "");
    assert_err_at(&src, "0s", 0, &["`max_upload_time` must be longer than 0s"]);
    let src = s3(
        "  max_upload_time: 1h\n",
        "    abort_incomplete_after: 0s\n",
    );
    assert_err_at(
        &src,
        "0s",
        0,
        &["`abort_incomplete_after` must be longer than 0s"],
    );
    let src = s3("  max_upload_time: a while\n", "");
    assert_err_at(&src, "a while", 0, &["invalid duration `a while`"]);
    // The sweep must not take uploads that may still stream: the error
    // points at the age when it is spelled out, else at the upload time.
    let src = s3(
        "  max_upload_time: 2h\n",
        "    abort_incomplete_after: 2h\n",
    );
    assert_err_at(
        &src,
        "2h",
        1,
        &["abort_incomplete_after (2h) must be longer than server.max_upload_time (2h)"],
    );
    let src = s3("  max_upload_time: 2d\n", "");
    assert_err_at(
        &src,
        "2d",
        0,
        &["abort_incomplete_after (1day) must be longer than server.max_upload_time (2days)"],
    );
}

#[test]
fn plain_scalars_keep_their_spelling() {
    let src = with_source(
        "  - name: b\n    scraper: s\n    partitions:\n      values: {var: id, values: [0022400061, 7]}\n    objects: [\"b/{id}\"]\n",
    );
    let cfg = parse(&src).unwrap();
    let Generator::Values(v) = &cfg.sources[1].partitions.0[0] else {
        panic!("values generator expected");
    };
    let values: Vec<&str> = v.values.iter().map(|v| v.as_str()).collect();
    assert_eq!(values, ["0022400061", "7"]);
}

#[test]
fn demo_config_parses_and_is_finite() {
    let cfg = parse(DEMO).unwrap();
    assert_eq!(cfg.sources.len(), 6);
    assert_eq!(cfg.r#loop.reconcile_interval, Duration::from_secs(30));
    assert_eq!(cfg.r#loop.queue_check_interval, Duration::from_secs(1));
    for s in &cfg.sources {
        for g in &s.partitions.0 {
            if let Generator::Dates(d) = g {
                assert!(
                    matches!(d.end, DateEnd::Date(_)),
                    "{}: demo dates must be fixed",
                    s.name
                );
            }
            if let Generator::Seasons(sg) = g {
                assert!(
                    matches!(sg.end, SeasonEnd::Season(_)),
                    "{}: demo seasons must be fixed",
                    s.name
                );
            }
        }
    }
    for (name, s) in &cfg.scrapers {
        assert_eq!(s.timeout, Duration::from_secs(30), "{name}");
        assert_eq!(s.retry.backoff, Duration::from_secs(2), "{name}");
    }
}

#[test]
fn example_config_parses_and_covers_every_section() {
    let cfg = parse(EXAMPLE).unwrap();
    assert_eq!(cfg.server.max_upload_bytes, 5 << 30);
    assert_eq!(cfg.limits["bbref"].rate.unwrap().to_string(), "20/min");
    assert_eq!(cfg.limits["bbref"].burst, Some(3));
    assert_eq!(cfg.scrapers["bbref"].requires["proxy"], "residential");
    let kinds: Vec<&str> = cfg
        .sources
        .iter()
        .flat_map(|s| s.partitions.0.iter().map(Generator::key))
        .collect();
    for k in ["dates", "seasons", "values", "from_objects"] {
        assert!(kinds.contains(&k), "example lacks a `{k}` generator");
    }
    assert!(
        cfg.sources.iter().any(|s| s.partitions.0.len() > 1),
        "example lacks a product"
    );
    for (what, present) in [
        ("refresh", cfg.sources.iter().any(|s| s.refresh.is_some())),
        ("hot", cfg.sources.iter().any(|s| s.hot)),
        (
            "recheck_after",
            cfg.sources
                .iter()
                .any(|s| s.recheck_after != DEFAULT_RECHECK_AFTER),
        ),
        (
            "priority_rules with within",
            cfg.sources
                .iter()
                .flat_map(|s| &s.priority_rules)
                .any(|r| r.within.is_some()),
        ),
        (
            "priority_rules with current_season",
            cfg.sources
                .iter()
                .flat_map(|s| &s.priority_rules)
                .any(|r| r.current_season),
        ),
        ("loop.aging", cfg.r#loop.aging == DEFAULT_AGING),
        ("metrics", cfg.metrics.is_some()),
    ] {
        assert!(present, "example lacks `{what}`");
    }
    let s3 = cfg.lake.s3.as_ref().expect("the example uses an S3 lake");
    assert_eq!(s3.bucket, "nba-lake");
    assert_eq!(
        s3.inventory.as_ref().map(|i| i.config_id.as_str()),
        Some("daily-csv")
    );
    let pbp = cfg
        .source("espn_pbp")
        .and_then(|s| s.partitions.dependency());
    assert_eq!(pbp.map(|f| f.var.as_str()), Some("game_id"));
}

#[test]
fn shipped_configs_are_fully_indexed() {
    // saphyr is stricter than libyaml; a shipped config it cannot read would lose
    // positions in post-parse errors.
    for (name, src) in [("demo", DEMO), ("example", EXAMPLE)] {
        let idx = PositionIndex::build(src);
        assert!(idx.is_complete(), "{name} is not fully indexed");
        let cfg = parse(src).unwrap();
        for i in 0..cfg.sources.len() {
            let p = YamlPath::root().key("sources").idx(i).key("scraper");
            assert!(idx.contains(&p), "{name}: {p} not indexed");
        }
    }
}

#[test]
fn dump_parses_back_to_an_equal_config() {
    for (origin, src) in [
        ("demo.yaml", DEMO),
        ("/etc/adce/example.yaml", EXAMPLE),
        ("base.yaml", BASE),
    ] {
        let cfg = Config::parse(src, Path::new(origin)).unwrap();
        let dumped = cfg.dump();
        let again = Config::parse(&dumped, Path::new(origin))
            .unwrap_or_else(|e| panic!("dump of {origin} does not parse: {e}\n{dumped}"));
        assert_eq!(again, cfg, "{origin}");
        assert_eq!(again.dump(), dumped, "{origin}: dump is stable");
    }
    let dumped = parse(BASE).unwrap().dump();
    for key in [
        "listen: 127.0.0.1:7070",
        "heartbeat_interval: 5s",
        "max_upload_time: 1h",
        "reconcile_interval: 1h",
        "max_attempts: 3",
        "priority: medium",
    ] {
        assert!(dumped.contains(key), "dump lacks `{key}`:\n{dumped}");
    }
}

#[test]
fn retry_delays_grow_cap_and_jitter() {
    let r = RetryPolicy::default();
    assert_eq!(r.delay(1, 0.5), Duration::from_secs(30));
    assert_eq!(r.delay(2, 0.5), Duration::from_secs(60));
    assert_eq!(r.delay(3, 0.5), Duration::from_secs(120));
    assert_eq!(r.delay(30, 0.5), Duration::from_secs(3600));
    assert_eq!(r.delay(u32::MAX, 0.5), Duration::from_secs(3600));
    assert_eq!(r.delay(1, 0.0), Duration::from_secs(27));
    assert!(r.delay(1, 1.0) <= Duration::from_secs(33));
    assert!(
        r.delay(30, 1.0) <= r.max_backoff,
        "jitter never exceeds the cap"
    );
    assert!(r.allows_another(2));
    assert!(!r.allows_another(3));
}

/// A dependent source `p` reading game ids out of source `a`-like schedule files.
fn dependent(from_objects: &str, extra: &str) -> String {
    with_source(&format!(
        "  - name: p\n    scraper: s\n    partitions:\n      from_objects: {from_objects}\n    objects: [\"pbp/{{game_id}}.json\"]\n{extra}"
    ))
}

const FROM_SCHEDULE: &str =
    "{objects: \"sched/{date:%Y%m%d}.json\", var: game_id, json: /events/*/id}";

#[test]
fn dependent_sources_parse_with_their_defaults() {
    let cfg = parse(&dependent(FROM_SCHEDULE, "")).unwrap();
    let p = &cfg.sources[1];
    let Some(fo) = p.partitions.dependency() else {
        panic!("from_objects expected");
    };
    assert_eq!(fo.var, "game_id");
    assert_eq!(fo.objects.as_str(), "sched/{date:%Y%m%d}.json");
    assert_eq!(fo.json.as_ref().map(|j| j.as_str()), Some("/events/*/id"));
    assert_eq!(fo.max_bytes, 64 << 20);
    assert_eq!(fo.pattern, None);
    let vars: Vec<(&str, VarKind)> = p.partitions.vars().collect();
    assert_eq!(vars, [("date", VarKind::Date), ("game_id", VarKind::Text)]);
    assert_eq!(p.refresh, None);
    assert_eq!(p.recheck_after, Duration::from_secs(86_400));
    assert!(!p.hot);

    let src = dependent(
        "{objects: \"lists/{list}.csv\", var: item, csv: {column: 2, header: false}, pattern: \"[a-z]+\", max_bytes: 1MiB}",
        "    hot: true\n    recheck_after: 6h\n",
    )
    .replace("pbp/{game_id}", "items/{item}");
    let cfg = parse(&src).unwrap();
    let fo = cfg.sources[1].partitions.dependency().unwrap();
    assert_eq!(
        fo.csv,
        Some(crate::extract::CsvColumn {
            column: crate::extract::Column::Index(2),
            header: false
        })
    );
    assert_eq!(fo.pattern.as_ref().map(|p| p.as_str()), Some("[a-z]+"));
    assert_eq!(fo.max_bytes, 1 << 20);
    assert!(cfg.sources[1].hot);
    assert_eq!(cfg.sources[1].recheck_after, Duration::from_secs(6 * 3600));
    let dumped = cfg.dump();
    assert_eq!(parse(&dumped).unwrap(), cfg, "{dumped}");
}

#[test]
fn from_objects_stands_alone_and_needs_one_extraction() {
    let src = with_source(
        "  - name: p\n    scraper: s\n    partitions:\n      - values: {var: v, values: [x]}\n      - from_objects: {objects: \"sched/{date}.json\", var: game_id, lines: true}\n    objects: [\"pbp/{v}/{game_id}.json\"]\n",
    );
    assert_err_at(
        &src,
        "from_objects",
        0,
        &[
            "`from_objects` must be the only generator of source `p`",
            "product",
        ],
    );

    let src = dependent("{objects: \"sched/{date}.json\", var: game_id}", "");
    assert_err_at(
        &src,
        "{objects",
        0,
        &["needs one of `json: PATH`, `csv: {column: NAME}` or `lines: true`"],
    );

    let src = dependent(
        "{objects: \"sched/{date}.json\", var: game_id, json: /a, lines: true}",
        "",
    );
    assert_err_at(
        &src,
        "lines",
        0,
        &["reads values one way: `json` and `lines` are both given"],
    );

    let src = dependent(
        "{objects: \"sched/{date}.json\", var: game_id, jsn: /a}",
        "",
    );
    assert_err_at(
        &src,
        "jsn",
        0,
        &["unknown field `jsn`", "`json`", "`csv`", "`lines`"],
    );

    let src = dependent("{objects: \"sched/{date}.json\", json: /a}", "");
    assert_err_at(&src, "{objects", 0, &["missing field `var`"]);
}

#[test]
fn parent_templates_must_match_back() {
    let src = dependent(
        "{objects: \"sched/{date}{league}.json\", var: game_id, json: /a}",
        "",
    );
    assert_err_at(
        &src,
        "\"sched/{date}{league}.json\"",
        0,
        &[
            "parent template `sched/{date}{league}.json`",
            "`{date}` and `{league}` follow each other",
        ],
    );

    let src = dependent(
        "{objects: \"sched/{date:%Y-%m}.json\", var: game_id, json: /a}",
        "",
    );
    assert_err_at(
        &src,
        "\"sched/{date:%Y-%m}.json\"",
        0,
        &["`%Y-%m` for `date` does not determine a whole date"],
    );

    let src = dependent(
        "{objects: \"sched/{source}/{date}.json\", var: game_id, json: /a}",
        "",
    );
    assert_err_at(
        &src,
        "\"sched/{source}/{date}.json\"",
        0,
        &["uses `{source}`, a built-in placeholder"],
    );

    let src = dependent(
        "{objects: \"sched/{League}/{date}.json\", var: game_id, json: /a}",
        "",
    );
    assert_err_at(
        &src,
        "\"sched/{League}/{date}.json\"",
        0,
        &["`{League}`", "not a valid partition variable name"],
    );

    let src = dependent(
        "{objects: \"sched/{game_id}.json\", var: game_id, json: /a}",
        "",
    );
    assert_err_at(
        &src,
        "game_id,",
        0,
        &["`var` `game_id` is also a variable of the parent template"],
    );

    let src = dependent(
        "{objects: \"/sched/{date}.json\", var: game_id, json: /a}",
        "",
    );
    assert_err_at(
        &src,
        "\"/sched/{date}.json\"",
        0,
        &["the lake refuses: it starts with `/`"],
    );

    let src = dependent("{objects: \"pbp/{x}.json\", var: game_id, json: /a}", "")
        .replace("[\"pbp/{game_id}.json\"]", "[\"pbp/{x}.json\"]");
    assert_err_at(
        &src,
        "\"pbp/{x}.json\", var",
        0,
        &["reads its values out of its own objects"],
    );
}

#[test]
fn extraction_settings_are_checked_with_positions() {
    let src = dependent(
        "{objects: \"sched/{date}.json\", var: game_id, json: events/*/id}",
        "",
    );
    assert_err_at(
        &src,
        "events/*/id",
        0,
        &["invalid JSON path `events/*/id`", "starts with `/`"],
    );

    let src = dependent(
        "{objects: \"sched/{date}.json\", var: game_id, json: /a, pattern: \"[0-9\"}",
        "",
    );
    assert_err_at(&src, "\"[0-9\"", 0, &["invalid pattern `[0-9`"]);

    let src = dependent(
        "{objects: \"sched/{date}.json\", var: game_id, csv: {column: game_id, header: false}}",
        "",
    );
    assert_err_at(
        &src,
        "game_id, header",
        0,
        &["column `game_id` is a name, which needs a header row"],
    );

    let src = dependent(
        "{objects: \"sched/{date}.json\", var: game_id, csv: {column: -1}}",
        "",
    );
    assert_err_at(&src, "-1", 0, &["invalid column index -1"]);

    let src = dependent(
        "{objects: \"sched/{date}.json\", var: game_id, csv: {col: 1}}",
        "",
    );
    assert_err_at(&src, "col:", 0, &["unknown field `col`", "`column`"]);

    let src = dependent(
        "{objects: \"sched/{date}.json\", var: game_id, lines: true, max_bytes: lots}",
        "",
    );
    assert_err_at(&src, "lots", 0, &["invalid size `lots`"]);

    let src = dependent(
        "{objects: \"sched/{date}.json\", var: game_id, lines: true, max_bytes: 0}",
        "",
    );
    assert_err_at(&src, "0}", 0, &["`max_bytes` must be at least 1"]);

    let src = dependent(
        "{objects: \"sched/{date}.json\", var: Game, lines: true}",
        "",
    );
    assert_err_at(&src, "Game", 0, &["invalid variable name `Game`"]);
}

#[test]
fn dependent_object_templates_need_the_value_but_not_the_parent_vars() {
    let ok = dependent(FROM_SCHEDULE, "").replace(
        "[\"pbp/{game_id}.json\"]",
        "[\"pbp/{date:%Y}/{game_id}.json\"]",
    );
    assert!(parse(&ok).is_ok());

    let src =
        dependent(FROM_SCHEDULE, "").replace("[\"pbp/{game_id}.json\"]", "[\"pbp/{date}.json\"]");
    assert_err_at(
        &src,
        "\"pbp/{date}.json\"",
        0,
        &["does not use partition variable `game_id`"],
    );

    let src = dependent(FROM_SCHEDULE, "")
        .replace("[\"pbp/{game_id}.json\"]", "[\"pbp/{game_id:%Y}.json\"]");
    assert_err_at(&src, "\"pbp/{game_id:%Y}.json\"", 0, &["formats a date"]);

    let src = dependent(FROM_SCHEDULE, "").replace(
        "[\"pbp/{game_id}.json\"]",
        "[\"pbp/{team}/{game_id}.json\"]",
    );
    assert_err_at(
        &src,
        "\"pbp/{team}/{game_id}.json\"",
        0,
        &["uses `{team}`", "defined: date, game_id"],
    );

    // Scrapers of a dependent source may use the parent's variables.
    let src = dependent(FROM_SCHEDULE, "")
        .replace(
            "scraper: s\n    partitions:\n      from_objects",
            "scraper: g\n    partitions:\n      from_objects",
        )
        .replace(
            "scrapers:\n",
            "scrapers:\n  g:\n    command: [x, \"{date:%Y%m%d}\", \"{game_id}\"]\n",
        );
    assert!(
        parse(&src).is_ok(),
        "{}",
        err(&src.replace("{game_id}\"]", "{nope}\"]"))
    );
    let bad = src.replace("\"{game_id}\"]", "\"{league}\"]");
    assert_err_at(
        &bad,
        "\"{league}\"",
        0,
        &["uses `{league}`", "source `p`", "date, game_id"],
    );
}

#[test]
fn refresh_needs_a_date_and_durations() {
    let refresh = "    refresh: {within: 3d, max_age: 1h}\n";
    let cfg = parse(&dependent(FROM_SCHEDULE, refresh)).unwrap();
    assert_eq!(
        cfg.sources[1].refresh,
        Some(Refresh {
            within: Duration::from_secs(3 * 86_400),
            max_age: Duration::from_secs(3600)
        })
    );
    let dates = with_source(&format!(
        "  - name: b\n    scraper: s\n    partitions:\n      dates: {{start: 2024-10-22, end: today}}\n    objects: [\"b/{{date}}\"]\n{refresh}"
    ));
    assert!(parse(&dates).is_ok());

    let src = with_source(&format!(
        "  - name: b\n    scraper: s\n    objects: [b]\n{refresh}"
    ));
    assert_err_at(
        &src,
        "{within",
        0,
        &[
            "`refresh` needs a date partition variable",
            "source `b` has none",
        ],
    );
    let src = dependent(
        "{objects: \"lists/{list}.txt\", var: game_id, lines: true}",
        refresh,
    );
    assert_err_at(
        &src,
        "{within",
        0,
        &["`refresh` needs a date partition variable"],
    );
    let src = with_source(&format!(
        "  - name: b\n    scraper: s\n    partitions:\n      seasons: {{start: \"2015\", end: \"2016\"}}\n    objects: [\"b/{{season}}\"]\n{refresh}"
    ));
    assert_err_at(&src, "{within", 0, &["source `b` has none"]);

    let src = dependent(FROM_SCHEDULE, "    refresh: {within: 3d, max_age: 0s}\n");
    assert_err_at(&src, "0s", 0, &["`max_age` must be longer than 0s"]);
    let src = dependent(FROM_SCHEDULE, "    refresh: {within: 3d}\n");
    assert_err_at(&src, "{within: 3d}", 0, &["missing field `max_age`"]);
    let src = dependent(
        FROM_SCHEDULE,
        "    refresh: {within: 3 fortnights, max_age: 1h}\n",
    );
    assert_err_at(
        &src,
        "3 fortnights",
        0,
        &["invalid duration `3 fortnights`"],
    );
    let src = dependent(
        FROM_SCHEDULE,
        "    refresh: {within: 3d, max_age: 1h, every: 1h}\n",
    );
    assert_err_at(&src, "every", 0, &["unknown field `every`"]);
}

#[test]
fn recheck_after_and_hot_are_checked() {
    let src = dependent(FROM_SCHEDULE, "    recheck_after: 0s\n");
    assert_err_at(&src, "0s", 0, &["`recheck_after` must be longer than 0s"]);
    let src = dependent(FROM_SCHEDULE, "    recheck_after: soon\n");
    assert_err_at(&src, "soon", 0, &["invalid duration `soon`"]);
    let src = dependent(FROM_SCHEDULE, "    hot: maybe\n");
    assert_err_at(&src, "maybe", 0, &["expected a boolean"]);
}

#[test]
fn aging_defaults_to_six_hours_and_zero_turns_it_off() {
    assert_eq!(parse(BASE).unwrap().r#loop.aging, DEFAULT_AGING);
    assert_eq!(DEFAULT_AGING, Duration::from_secs(6 * 3600));
    let with_aging = |v: &str| {
        BASE.replace(
            "version: 1\n",
            &format!("version: 1\nloop:\n  aging: {v}\n"),
        )
    };
    assert_eq!(
        parse(&with_aging("0s")).unwrap().r#loop.aging,
        Duration::ZERO
    );
    assert_eq!(
        parse(&with_aging("90m")).unwrap().r#loop.aging,
        Duration::from_secs(5400)
    );
    assert_eq!(
        parse(&with_aging("1ms")).unwrap().r#loop.aging,
        Duration::from_millis(1)
    );
    assert_err_at(
        &with_aging("500us"),
        "500us",
        0,
        &["`aging` must be 0s (off) or at least 1ms, got 500us"],
    );
    assert_err_at(&with_aging("soon"), "soon", 0, &["invalid duration `soon`"]);
    // Zero aging survives a dump.
    let cfg = parse(&with_aging("0s")).unwrap();
    assert_eq!(parse(&cfg.dump()).unwrap(), cfg);
}

/// A dated source `b` with `extra` lines appended.
fn dated(extra: &str) -> String {
    with_source(&format!(
        "  - name: b\n    scraper: s\n    priority: low\n    partitions:\n      dates: {{start: 2024-10-22, end: today}}\n    objects: [\"b/{{date}}\"]\n{extra}"
    ))
}

#[test]
fn priority_rules_parse_in_order_with_their_conditions() {
    let cfg = parse(&dated(
        "    priority_rules:\n      - {within: 3d, priority: critical}\n      - within: 30d\n        priority: high\n",
    ))
    .unwrap();
    let b = &cfg.sources[1];
    assert_eq!(b.priority, Priority::Low);
    assert_eq!(
        b.priority_rules,
        vec![
            PriorityRule {
                within: Some(Duration::from_secs(3 * 86_400)),
                current_season: false,
                priority: Priority::Critical,
            },
            PriorityRule {
                within: Some(Duration::from_secs(30 * 86_400)),
                current_season: false,
                priority: Priority::High,
            },
        ]
    );
    assert!(cfg.sources[0].priority_rules.is_empty());
    // Rules survive a dump, and a source without rules dumps none.
    let dumped = cfg.dump();
    assert_eq!(parse(&dumped).unwrap(), cfg);
    assert_eq!(dumped.matches("priority_rules").count(), 1, "{dumped}");

    let seasons = with_source(
        "  - name: b\n    scraper: s\n    partitions:\n      - values: {var: team, values: [BOS]}\n      - seasons: {start: \"2015-16\", end: current}\n    objects: [\"b/{season}/{team}\"]\n    priority_rules: [{current_season: true, priority: high}]\n",
    );
    let cfg = parse(&seasons).unwrap();
    assert_eq!(
        cfg.sources[1].priority_rules,
        vec![PriorityRule {
            within: None,
            current_season: true,
            priority: Priority::High,
        }]
    );
    // A dependent source's parent date is a date variable too.
    let dep = dependent(
        FROM_SCHEDULE,
        "    priority_rules: [{within: 1d, priority: critical}]\n",
    );
    assert_eq!(parse(&dep).unwrap().sources[1].priority_rules.len(), 1);
}

#[test]
fn priority_rules_need_one_condition_and_its_variable() {
    let src = dated(
        "    priority_rules:\n      - {within: 3d, priority: high}\n      - {priority: critical}\n",
    );
    assert_err_at(
        &src,
        "{priority: critical}",
        0,
        &[
            "priority rule 2 of source `b` has no condition",
            "`within: DURATION` (a date variable)",
            "`current_season: true` (a season variable)",
        ],
    );
    let src = dated("    priority_rules: [{current_season: false, priority: high}]\n");
    assert_err_at(
        &src,
        "{current_season",
        0,
        &["priority rule 1 of source `b` has no condition"],
    );
    let src = dated("    priority_rules: [{within: 3d, current_season: true, priority: high}]\n");
    assert_err_at(
        &src,
        "current_season",
        0,
        &["has two conditions", "write one rule for each"],
    );
    let src = dated("    priority_rules: [{current_season: true, priority: high}]\n");
    assert_err_at(
        &src,
        "true",
        0,
        &[
            "`current_season` needs a season partition variable",
            "source `b` has none",
        ],
    );
    let src = with_source(
        "  - name: b\n    scraper: s\n    partitions:\n      seasons: {start: \"2016\", end: current}\n    objects: [\"b/{season}\"]\n    priority_rules:\n      - within: 3d\n        priority: high\n",
    );
    assert_err_at(
        &src,
        "3d",
        0,
        &[
            "`within` needs a date partition variable",
            "source `b` has none",
        ],
    );
    let src = with_source(
        "  - name: b\n    scraper: s\n    objects: [b]\n    priority_rules: [{within: 3d, priority: high}]\n",
    );
    assert_err_at(&src, "3d", 0, &["`within` needs a date partition variable"]);
}

#[test]
fn priority_rule_scalars_and_fields_are_checked() {
    let src = dated("    priority_rules: [{within: 3d, priority: urgent}]\n");
    assert_err_at(&src, "urgent", 0, &["unknown variant `urgent`"]);
    let src = dated("    priority_rules: [{within: 3 fortnights, priority: high}]\n");
    assert_err_at(
        &src,
        "3 fortnights",
        0,
        &["invalid duration `3 fortnights`"],
    );
    let src = dated("    priority_rules: [{within: 3d}]\n");
    assert_err_at(&src, "{within: 3d}", 0, &["missing field `priority`"]);
    let src = dated("    priority_rules: [{within: 3d, priority: high, season: current}]\n");
    assert_err_at(&src, "season:", 0, &["unknown field `season`"]);
    let src = dated("    priority_rules: [{current_season: yes please, priority: high}]\n");
    assert_err_at(&src, "yes please", 0, &["expected a boolean"]);
    let src = dated("    priority_rules: {within: 3d, priority: high}\n");
    assert_err_at(&src, "{within", 0, &["expected a sequence"]);
}

#[test]
fn metrics_section_is_optional_and_must_not_share_the_grpc_port() {
    assert_eq!(parse(BASE).unwrap().metrics, None, "absent means off");

    let cfg = parse(&format!("{BASE}metrics: {{}}\n")).unwrap();
    assert_eq!(
        cfg.metrics.map(|m| m.listen),
        Some(DEFAULT_METRICS_LISTEN),
        "an empty section listens on the default address"
    );

    let cfg = parse(&format!("{BASE}metrics:\n  listen: 0.0.0.0:9100\n")).unwrap();
    assert_eq!(cfg.metrics.map(|m| m.listen.port()), Some(9100));
    let dumped = parse(&format!("{BASE}metrics:\n  listen: 0.0.0.0:9100\n"))
        .unwrap()
        .dump();
    assert!(
        dumped.contains("metrics:\n  listen: 0.0.0.0:9100"),
        "{dumped}"
    );

    let src = format!("{BASE}metrics:\n  listen: 127.0.0.1:7070\n");
    assert_err_at(
        &src,
        "127.0.0.1:7070",
        0,
        &["`metrics.listen` (127.0.0.1:7070) must differ from `server.listen` (127.0.0.1:7070)"],
    );
    let src = BASE.replace(
        "version: 1\n",
        "version: 1\nserver:\n  listen: 0.0.0.0:9464\n",
    ) + "metrics: {listen: 127.0.0.1:9464}\n";
    assert_err_at(
        &src,
        "127.0.0.1:9464",
        0,
        &["must differ from `server.listen`"],
    );
    let src = format!("{BASE}metrics:\n  listen: 127.0.0.1:0\n");
    assert!(parse(&src).is_ok(), "port 0 never clashes");

    let src = format!("{BASE}metrics:\n  listen: localhost\n");
    assert!(parse(&src).is_err(), "an address needs a port");
    let src = format!("{BASE}metrics:\n  port: 9464\n");
    assert!(err(&src).contains("unknown field `port`"), "{}", err(&src));
}

#[test]
fn alert_rules_and_webhook_are_checked_with_positions() {
    let src = format!("{BASE}alerts:\n  webhook: \"ftp://hooks.example/SECRET\"\n");
    assert_err_at(
        &src,
        "\"ftp",
        0,
        &["invalid webhook", "http:// or https://"],
    );
    assert!(!err(&src).contains("SECRET"), "the URL is not echoed");
    let src = format!("{BASE}alerts:\n  webhook: \"https://u:p@hooks.example/x\"\n");
    assert_err_at(&src, "\"https", 0, &["user:password@"]);
    let src = format!("{BASE}alerts:\n  webhook: \"http://127.0.0.1:9/x\"\n  webhook_ca: ca.pem\n");
    assert_err_at(&src, "webhook_ca", 0, &["needs an https:// `webhook`"]);
    let src = format!("{BASE}alerts:\n  webhook_ca: ca.pem\n");
    assert_err_at(&src, "webhook_ca", 0, &["needs an https:// `webhook`"]);
    let tls = format!(
        "{BASE}alerts:\n  webhook: \"https://hooks.slack.com/services/T/B/X\"\n  webhook_ca: certs/ca.pem\n"
    );
    let cfg = Config::parse(&tls, std::path::Path::new("/etc/adce/adce.yaml")).unwrap();
    assert_eq!(
        cfg.alerts.webhook_ca,
        Some(PathBuf::from("/etc/adce/certs/ca.pem")),
        "relative to the config file's directory"
    );
    let again = Config::parse(&cfg.dump(), std::path::Path::new("/etc/adce/adce.yaml")).unwrap();
    assert_eq!(again.alerts, cfg.alerts);
    let src = format!("{BASE}alerts:\n  failure_rate: {{ratio: 1.5}}\n");
    assert_err_at(&src, "1.5", 0, &["between 0 and 1"]);
    let ok = format!(
        "{BASE}alerts:\n  oldest_ready: 2h\n  reconcile_overdue: 3h\n  webhook: \"http://127.0.0.1:9/hook\"\n"
    );
    let cfg = Config::parse(&ok, std::path::Path::new("demo.yaml")).unwrap();
    assert_eq!(
        cfg.alerts.oldest_ready,
        std::time::Duration::from_secs(7200)
    );
    assert_eq!(
        cfg.alerts.reconcile_overdue,
        Some(std::time::Duration::from_secs(3 * 3600))
    );
    // The dump parses back to the same config.
    let again = Config::parse(&cfg.dump(), std::path::Path::new("demo.yaml")).unwrap();
    assert_eq!(again.alerts, cfg.alerts);
}
