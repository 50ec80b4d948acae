//! Config errors: `adce-server` refuses a bad config with `FILE:LINE:COLUMN`
//! and a word saying what is wrong, both with `--check-config` and when asked
//! to start, and writes nothing into its state directory.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use adce_tests::{COMMAND_TIMEOUT, TestDir, bin, free_addr, run_bounded, text};

/// A valid config, one line per entry; `{STATE}` is replaced by the state dir.
const GOOD: &[&str] = &[
    "version: 1",
    "server:",
    "  state_dir: {STATE}",
    "lake:",
    "  local:",
    "    root: lake",
    "scrapers:",
    "  fetch:",
    "    command: [\"/bin/true\", \"{date:%Y%m%d}\"]",
    "    timeout: 10s",
    "sources:",
    "  - name: daily",
    "    scraper: fetch",
    "    description: a daily feed",
    "    priority: high",
    "    partitions:",
    "      dates: {start: 2024-01-01, end: 2024-01-10}",
    "    objects: [\"daily/{date:%Y%m%d}.json\"]",
];

/// One broken variant of [`GOOD`]: the line replaced, its new text, the text
/// in the new line where the error's column must point, and the words the
/// error must contain.
struct Case {
    name: &'static str,
    replace: &'static str,
    with: &'static str,
    at: &'static str,
    words: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        name: "yaml syntax error",
        replace: "    description: a daily feed",
        with: "    description: a daily: feed",
        at: ": feed",
        words: &["mapping values"],
    },
    Case {
        name: "unknown field",
        replace: "    priority: high",
        with: "    priorty: high",
        at: "priorty",
        words: &["unknown field", "priorty"],
    },
    Case {
        name: "malformed date",
        replace: "      dates: {start: 2024-01-01, end: 2024-01-10}",
        with: "      dates: {start: 2024-13-45, end: 2024-01-10}",
        at: "2024-13-45",
        words: &["date", "2024-13-45"],
    },
    Case {
        name: "undefined scraper",
        replace: "    scraper: fetch",
        with: "    scraper: fecth",
        at: "fecth",
        words: &["scraper", "fecth", "not defined"],
    },
];

/// Renders the config lines with the state dir filled in.
fn render(lines: &[String], state: &Path) -> String {
    let mut text = lines
        .iter()
        .map(|l| l.replace("{STATE}", &state.display().to_string()))
        .collect::<Vec<_>>()
        .join("\n");
    text.push('\n');
    text
}

fn server(args: &[&str], config: &Path) -> Output {
    let mut command = Command::new(bin("adce-server"));
    command
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("ADCE_CONFIG")
        .env_remove("ADCE_LISTEN")
        .env("RUST_LOG", "info");
    run_bounded(&mut command, COMMAND_TIMEOUT)
}

/// The `LINE:COLUMN` after `file:` in `stderr`, if any.
fn position_after(stderr: &str, file: &str) -> Option<(usize, usize)> {
    let start = stderr.find(&format!("{file}:"))? + file.len() + 1;
    let mut parts = stderr[start..].splitn(3, ':');
    let line = parts.next()?.parse().ok()?;
    let column = parts.next()?.parse().ok()?;
    Some((line, column))
}

fn state_is_empty(state: &Path) -> bool {
    match fs::read_dir(state) {
        Ok(mut entries) => entries.next().is_none(),
        Err(_) => !state.exists(),
    }
}

#[test]
fn bad_config_is_refused_with_position() {
    let dir = TestDir::new();
    let state = dir.join("state");
    let good: Vec<String> = GOOD.iter().map(|l| l.to_string()).collect();

    // The good config passes the check and the check writes nothing.
    let good_path = dir.write_config("good.yaml", &render(&good, &state));
    let output = server(&["--check-config"], &good_path);
    assert_eq!(
        output.status.code(),
        Some(0),
        "stderr: {}",
        text(&output.stderr)
    );
    assert!(
        text(&output.stdout).contains("config ok"),
        "stdout: {}",
        text(&output.stdout)
    );
    assert!(
        state_is_empty(&state),
        "--check-config wrote into the state dir"
    );

    let mut failures = Vec::new();
    for case in CASES {
        let Some(index) = good.iter().position(|l| l == case.replace) else {
            panic!(
                "case {}: line {:?} not in the good config",
                case.name, case.replace
            );
        };
        let mut lines = good.clone();
        lines[index] = case.with.to_string();
        let line = index + 1;
        let Some(column) = case.with.find(case.at).map(|c| c + 1) else {
            panic!("case {}: {:?} not in {:?}", case.name, case.at, case.with);
        };
        let path = dir.write_config("bad.yaml", &render(&lines, &state));
        let listen = free_addr().to_string();
        for args in [vec!["--check-config"], vec!["--listen", listen.as_str()]] {
            let output = server(&args, &path);
            let stderr = text(&output.stderr);
            let what = format!("{} with {args:?}", case.name);
            if output.status.success() {
                failures.push(format!("{what}: exit 0, stderr: {stderr}"));
                continue;
            }
            if output.status.code() != Some(2) {
                failures.push(format!(
                    "{what}: exit {} (want 2), stderr: {stderr}",
                    output.status
                ));
            }
            if !stderr.starts_with("adce-server: ") {
                failures.push(format!(
                    "{what}: stderr does not start with `adce-server: `: {stderr}"
                ));
            }
            match position_after(&stderr, "bad.yaml") {
                Some(got) if got == (line, column) => {}
                Some((got_line, got_column)) => failures.push(format!(
                    "{what}: position {got_line}:{got_column}, want {line}:{column}; stderr: {stderr}"
                )),
                None => failures.push(format!("{what}: no bad.yaml:LINE:COL in stderr: {stderr}")),
            }
            for word in case.words {
                if !stderr.contains(word) {
                    failures.push(format!("{what}: stderr lacks {word:?}: {stderr}"));
                }
            }
            if !state_is_empty(&state) {
                failures.push(format!(
                    "{what}: the state dir {} was written",
                    state.display()
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "config errors not as specified:\n{}",
        failures.join("\n")
    );
}

/// `--check-config` previews what each source expects before anything runs:
/// totals, then per source its counts and the first and last keys, and for
/// a dependent source where its partitions come from. The whole output is
/// compared (the ranges are fixed, so it does not depend on the day).
#[test]
fn check_config_previews_every_source() {
    let dir = TestDir::new();
    let config = dir.write_config(
        "preview.yaml",
        &format!(
            "version: 1
server:
  state_dir: {state}
lake:
  local:
    root: lake
scrapers:
  fetch:
    command: [\"/bin/true\"]
sources:
  - name: regular
    scraper: fetch
    partitions:
      dates: {{start: 2024-06-01, end: 2024-10-31, windows: [\"10-20..06-20\"], except: [2024-06-10..2024-06-19]}}
    objects: [\"nba/{{date:%Y%m%d}}.json\"]
  - name: summer
    scraper: fetch
    partitions:
      dates: {{start: 2024-06-01, end: 2024-10-31, windows: [\"07-05..07-20\"], weekdays: [sat, sun]}}
    objects: [\"nba/{{date:%Y%m%d}}.json\"]
  - name: teams
    scraper: fetch
    partitions:
      - seasons: {{start: \"2023-24\", end: \"2024-25\"}}
      - values: {{var: team, values: [BOS, LAL]}}
    objects: [\"teams/{{season}}/{{team}}.json\", \"teams/{{season}}/{{team}}.csv\"]
  - name: games
    scraper: fetch
    partitions:
      from_objects: {{objects: \"nba/{{date:%Y%m%d}}.json\", var: game_id, json: /games/*/id}}
    objects: [\"games/{{game_id}}.json\"]
",
            state = dir.join("state").display()
        ),
    );
    let output = server(&["--check-config"], &config);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let want = "\
config ok: 4 sources, 1 scrapers, 31 partitions, 35 expected objects today
source regular: 22 partitions, 22 expected objects
  first: nba/20240601.json, nba/20240602.json, nba/20240603.json
  last:  …, nba/20241029.json, nba/20241030.json, nba/20241031.json
source summer: 5 partitions, 5 expected objects
  first: nba/20240706.json, nba/20240707.json, nba/20240713.json
  last:  nba/20240714.json, nba/20240720.json
source teams: 4 partitions, 8 expected objects
  first: teams/2023-24/BOS.json, teams/2023-24/BOS.csv, teams/2023-24/LAL.json
  last:  …, teams/2024-25/BOS.csv, teams/2024-25/LAL.json, teams/2024-25/LAL.csv
source games: partitions from the values in parent objects nba/{date:%Y%m%d}.json (known at reconcile)
";
    assert_eq!(text(&output.stdout), want);
}
