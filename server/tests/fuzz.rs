//! Property-based fuzz targets for every parser that takes input from outside the
//! server: the config file (arbitrary bytes, YAML-ish text, and text and tree mutations
//! of the shipped `config/demo.yaml` and `config/example.yaml`), object key templates
//! rendered with hostile partition values, `from_objects` value extraction (and the
//! dependent-source pipeline it feeds), and S3 Inventory manifests and gzipped CSV data
//! files read through a real [`LocalDir`] in a temp dir.
//!
//! Every target asserts that nothing panics or hangs, that bad input comes back as an
//! error (config parse errors with `FILE:LINE:COLUMN`), and that no unsafe value or key
//! is ever reported as fine: every key a template renders `Ok` passes
//! [`validate_key`], every extracted value is a safe partition value. Inputs that once
//! broke a parser are kept as plain `#[test]`s at the end, named after what they guard.
//!
//! The case counts are small so that the whole file runs in well under a minute in a
//! debug build on two cores. Every target honours the standard `PROPTEST_CASES`
//! variable for longer runs, e.g.
//! `PROPTEST_CASES=20000 cargo test -p adce-server --release --test fuzz`.
//! Failing inputs are not persisted to files: proptest prints the shrunk input, which
//! then belongs in a regression test here.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use adce_server::catalog::Catalog;
use adce_server::config::{Config, ConfigError, PositionIndex};
use adce_server::extract::{
    Column, CsvColumn, Extracted, Extraction, Extractor, JsonPath, MAX_EXCERPT_CHARS,
    MAX_REJECTED_KEPT, ValuePattern,
};
use adce_server::lake::inventory::testing::{ReportBuilder, encode_key, gzip};
use adce_server::lake::inventory::{InventoryError, Report, latest_report, read_report};
use adce_server::lake::{LocalDir, MAX_KEY_LEN, ObjectMeta, ObjectSource, validate_key};
use adce_server::model::is_valid_value;
use adce_server::model::{Partition, Value};
use adce_server::template::{Arg, MAX_KEY_EXCERPT, Template, TemplateError};
use chrono::NaiveDate;
use md5::{Digest, Md5};
use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::TestCaseError;

// ---------------------------------------------------------------------------
// Shared settings and strategies.
// ---------------------------------------------------------------------------

/// The proptest settings of one target: `default_cases` cases unless `PROPTEST_CASES`
/// says otherwise, and no failure files written into the source tree.
fn cases(default_cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default_cases);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Text that has broken parsers, escaped paths or confused terminals elsewhere.
const HOSTILE: &[&str] = &[
    "",
    ".",
    "..",
    "...",
    "../",
    "../../etc/passwd",
    "/",
    "/etc/passwd",
    "a//b",
    "a/./b",
    "\\",
    "..\\..\\windows",
    "\0",
    "a\0b",
    "\n",
    "\r\n",
    "\t",
    "\u{7f}",
    "\u{1b}[31m",
    "\u{85}",
    "\u{2028}",
    "\u{202e}",
    "\u{feff}",
    "%2e%2e%2f",
    "%00",
    "%",
    "%g0",
    "+",
    " ",
    "~",
    "$(id)",
    "`id`",
    ";rm -rf /",
    "{x}",
    "{{",
    "}}",
    "*",
    "?",
    "\"",
    "'",
    ",",
    "é",
    "日本",
    "\u{10ffff}",
    "0022400061",
    "2024-10-22",
    "2015-16",
    "BOS",
];

/// A hostile snippet repeated into a huge string (up to tens of kilobytes).
fn huge_text() -> BoxedStrategy<String> {
    (select(HOSTILE), 1usize..20_000)
        .prop_map(|(s, n)| {
            let unit = if s.is_empty() { "x" } else { s };
            unit.repeat(n.min(50_000 / unit.len().max(1)))
        })
        .boxed()
}

/// A candidate partition value: safe ones, hostile ones, arbitrary ones, huge ones.
fn value_text() -> BoxedStrategy<String> {
    prop_oneof![
        4 => "[A-Za-z0-9._-]{1,130}",
        4 => select(HOSTILE).prop_map(str::to_owned),
        3 => "(?s).{0,12}",
        2 => "[A-Za-z0-9._/\\\\ -]{0,12}",
        1 => huge_text(),
    ]
    .boxed()
}

/// Whether `v` is a safe partition value, written independently of the server's own
/// check: `[A-Za-z0-9._-]{1,128}`, not only dots.
fn oracle_safe(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !v.bytes().all(|b| b == b'.')
}

/// A date anywhere in chrono's range.
fn any_date() -> BoxedStrategy<NaiveDate> {
    let lo = chrono::Datelike::num_days_from_ce(&NaiveDate::MIN);
    let hi = chrono::Datelike::num_days_from_ce(&NaiveDate::MAX);
    prop_oneof![
        (lo..=hi).prop_map(|d| NaiveDate::from_num_days_from_ce_opt(d).unwrap_or_default()),
        (1i32..=9999, 1u32..=366)
            .prop_map(|(y, d)| NaiveDate::from_yo_opt(y, d).unwrap_or_default()),
    ]
    .boxed()
}

/// Applies `index` to a non-empty range of `len` positions.
fn pick(index: &Index, len: usize) -> usize {
    index.index(len.max(1))
}

// ---------------------------------------------------------------------------
// Target 1: config parsing.
// ---------------------------------------------------------------------------

/// The shipped demo catalog.
const DEMO: &str = include_str!("../../config/demo.yaml");
/// The shipped, commented production example.
const EXAMPLE: &str = include_str!("../../config/example.yaml");
/// The name configs are parsed under in messages. Absolute, as [`Config::load`] makes
/// it: relative paths in the config then resolve the same way when a dump is parsed.
const ORIGIN: &str = "/fuzz/adce.yaml";

/// Parses `src` as a config and checks what comes back: a config that dumps and parses
/// back to itself, or an error that names the file and, for a YAML syntax error, the
/// line and column inside the document.
fn check_config(src: &str) -> Result<(), TestCaseError> {
    match Config::parse(src, Path::new(ORIGIN)) {
        Ok(cfg) => {
            let dumped = cfg.dump();
            match Config::parse(&dumped, Path::new(ORIGIN)) {
                Ok(again) => prop_assert_eq!(again, cfg, "dump:\n{}", dumped),
                Err(e) => {
                    return Err(TestCaseError::fail(format!(
                        "the dump of a valid config does not parse: {e}\n{dumped}"
                    )));
                }
            }
        }
        Err(e) => check_config_error(src, &e)?,
    }
    Ok(())
}

/// Checks one config error against the text it came from.
fn check_config_error(src: &str, e: &ConfigError) -> Result<(), TestCaseError> {
    let shown = e.to_string();
    prop_assert!(
        shown.starts_with(&format!("{ORIGIN}:")),
        "no file name: {shown}"
    );
    prop_assert!(!e.message().trim().is_empty(), "empty message: {shown}");
    // A blank file is refused as empty before YAML is parsed; it has no position.
    let syntax_error =
        !src.trim().is_empty() && serde_yaml::from_str::<serde_yaml::Value>(src).is_err();
    // Known gap, reported to the config module's owner: serde_yaml gives no location
    // for a second document, so `config/yaml.rs` has none to pass on.
    let second_document = e.message().contains("more than one document");
    if syntax_error && !second_document {
        prop_assert!(
            e.position().is_some(),
            "a YAML parse error without a position: {shown}"
        );
    }
    // Past YAML parsing, a problem is located through the position index, which is
    // built by a second, stricter parser: where that parser reads the whole document,
    // every problem has a place.
    if !src.trim().is_empty() && !second_document && PositionIndex::build(src).is_complete() {
        prop_assert!(
            e.position().is_some(),
            "an error without a position in a fully indexed document: {shown}"
        );
    }
    if let Some(p) = e.position() {
        let prefix = format!("{ORIGIN}:{}:{}: ", p.line, p.column);
        prop_assert!(shown.starts_with(&prefix), "{shown} lacks {prefix}");
        // libyaml counts `\r`, `\r\n`, NEL, LS and PS as line breaks too, and reports a
        // problem found at the end of input on the line after the last one.
        let lines = yaml_lines(src) + 1;
        prop_assert!(
            p.line >= 1 && p.line <= lines,
            "line {} outside 1..={lines}: {shown}",
            p.line
        );
        prop_assert!(p.column >= 1, "column 0: {shown}");
    }
    Ok(())
}

/// How many lines libyaml sees in `src`.
fn yaml_lines(src: &str) -> usize {
    let mut lines = 1;
    let mut chars = src.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                chars.next_if_eq(&'\n');
                lines += 1;
            }
            '\n' | '\u{85}' | '\u{2028}' | '\u{2029}' => lines += 1,
            _ => {}
        }
    }
    lines
}

/// Config vocabulary, so that generated YAML reaches past the first unknown key.
const CONFIG_WORDS: &[&str] = &[
    "version",
    "server",
    "listen",
    "state_dir",
    "lake",
    "local",
    "root",
    "s3",
    "bucket",
    "prefix",
    "inventory",
    "config_id",
    "loop",
    "limits",
    "rate",
    "burst",
    "max_concurrent",
    "scrapers",
    "command",
    "env",
    "timeout",
    "retry",
    "max_attempts",
    "backoff",
    "multiplier",
    "jitter",
    "sources",
    "name",
    "scraper",
    "priority",
    "partitions",
    "dates",
    "start",
    "end",
    "step",
    "seasons",
    "values",
    "var",
    "from_objects",
    "objects",
    "json",
    "csv",
    "column",
    "lines",
    "pattern",
    "max_bytes",
    "refresh",
    "within",
    "max_age",
    "min_bytes",
    "priority_rules",
    "current_season",
    "1",
    "today",
    "current",
    "week",
    "month",
    "high",
    "critical",
    "20/min",
    "0/s",
    "5GiB",
    "99999999999TiB",
    "18446744073709551616",
    "30s",
    "0s",
    "9999999999999999d",
    "2024-02-29",
    "2023-02-29",
    "9999-12-31",
    "2015-16",
    "9998-99",
    "{date:%Y%m%d}",
    "{date:%Q}",
    "{date:%s}",
    "{game_id}",
    "x/{id}.json",
    "/events/*/id",
    "[0-9]+",
    "(a*)*",
    "127.0.0.1:0",
    ".inf",
    ".nan",
    "-1",
    "1e400",
    "~",
];

/// YAML fragments that shift structure when spliced into a document.
const YAML_FRAGMENTS: &[&str] = &[
    "&a ",
    "*a",
    "*undefined",
    "!!binary ",
    "!!str ",
    "!custom ",
    "<<: *a",
    "? ",
    "- ",
    ": ",
    "{",
    "}",
    "[",
    "]",
    "\"",
    "'",
    "|",
    ">",
    "#",
    "%YAML 1.2\n",
    "%TAG ! tag:x,2000:\n",
    "---\n",
    "...\n",
    "\t",
    "\0",
    "\u{feff}",
    "\r",
    "\n  ",
    "\n- ",
    ",",
    "@",
    "`",
];

/// A scalar for a config value or key.
fn config_scalar() -> BoxedStrategy<String> {
    prop_oneof![
        4 => select(CONFIG_WORDS).prop_map(str::to_owned),
        2 => value_text(),
        1 => select(YAML_FRAGMENTS).prop_map(str::to_owned),
        1 => "\\PC{0,20}",
    ]
    .boxed()
}

/// A YAML tree over the config vocabulary.
fn yaml_tree() -> BoxedStrategy<serde_yaml::Value> {
    use serde_yaml::Value as Y;
    let leaf = prop_oneof![
        6 => config_scalar().prop_map(Y::String),
        1 => any::<i64>().prop_map(Y::from),
        1 => any::<u64>().prop_map(Y::from),
        1 => any::<f64>().prop_map(Y::from),
        1 => any::<bool>().prop_map(Y::Bool),
        1 => Just(Y::Null),
    ];
    leaf.prop_recursive(4, 48, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Y::Sequence),
            prop::collection::vec(
                (
                    select(CONFIG_WORDS).prop_map(|k| Y::String(k.to_owned())),
                    inner
                ),
                0..5
            )
            .prop_map(|kv| Y::Mapping(kv.into_iter().collect())),
        ]
    })
    .boxed()
}

/// One step of a path into a YAML tree.
#[derive(Debug, Clone)]
enum Step {
    Key(serde_yaml::Value),
    Idx(usize),
}

/// Every node's path in `v`, the root first.
fn tree_paths(v: &serde_yaml::Value) -> Vec<Vec<Step>> {
    fn walk(v: &serde_yaml::Value, here: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
        out.push(here.clone());
        match v {
            serde_yaml::Value::Mapping(m) => {
                for (k, child) in m {
                    here.push(Step::Key(k.clone()));
                    walk(child, here, out);
                    here.pop();
                }
            }
            serde_yaml::Value::Sequence(s) => {
                for (i, child) in s.iter().enumerate() {
                    here.push(Step::Idx(i));
                    walk(child, here, out);
                    here.pop();
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

fn node_mut<'a>(v: &'a mut serde_yaml::Value, path: &[Step]) -> Option<&'a mut serde_yaml::Value> {
    let Some((first, rest)) = path.split_first() else {
        return Some(v);
    };
    let child = match (first, v) {
        (Step::Key(k), serde_yaml::Value::Mapping(m)) => m.get_mut(k)?,
        (Step::Idx(i), serde_yaml::Value::Sequence(s)) => s.get_mut(*i)?,
        _ => return None,
    };
    node_mut(child, rest)
}

/// A structural edit of a parsed config.
#[derive(Debug, Clone)]
enum TreeEdit {
    /// Replaces a node with a generated tree.
    Replace(Index, serde_yaml::Value),
    /// Removes a node from its mapping or sequence.
    Remove(Index),
    /// Adds a key to a mapping (or an element to a sequence).
    Add(Index, String, serde_yaml::Value),
    /// Copies one node over another.
    Copy(Index, Index),
}

fn tree_edit() -> BoxedStrategy<TreeEdit> {
    prop_oneof![
        3 => (any::<Index>(), yaml_tree()).prop_map(|(i, v)| TreeEdit::Replace(i, v)),
        2 => any::<Index>().prop_map(TreeEdit::Remove),
        2 => (any::<Index>(), select(CONFIG_WORDS), yaml_tree())
            .prop_map(|(i, k, v)| TreeEdit::Add(i, k.to_owned(), v)),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| TreeEdit::Copy(a, b)),
    ]
    .boxed()
}

fn apply_tree_edit(doc: &mut serde_yaml::Value, edit: &TreeEdit) {
    let paths = tree_paths(doc);
    let at = |i: &Index| paths[pick(i, paths.len())].clone();
    match edit {
        TreeEdit::Replace(i, v) => {
            if let Some(node) = node_mut(doc, &at(i)) {
                *node = v.clone();
            }
        }
        TreeEdit::Remove(i) => {
            let path = at(i);
            let Some((last, parent)) = path.split_last() else {
                return;
            };
            match (last, node_mut(doc, parent)) {
                (Step::Key(k), Some(serde_yaml::Value::Mapping(m))) => {
                    m.remove(k);
                }
                (Step::Idx(n), Some(serde_yaml::Value::Sequence(s))) if *n < s.len() => {
                    s.remove(*n);
                }
                _ => {}
            }
        }
        TreeEdit::Add(i, k, v) => match node_mut(doc, &at(i)) {
            Some(serde_yaml::Value::Mapping(m)) => {
                m.insert(serde_yaml::Value::String(k.clone()), v.clone());
            }
            Some(serde_yaml::Value::Sequence(s)) => s.push(v.clone()),
            _ => {}
        },
        TreeEdit::Copy(from, to) => {
            let Some(copy) = node_mut(doc, &at(from)).map(|n| n.clone()) else {
                return;
            };
            if let Some(node) = node_mut(doc, &at(to)) {
                *node = copy;
            }
        }
    }
}

/// A textual edit of a config file.
#[derive(Debug, Clone)]
enum TextEdit {
    /// Deletes up to `len` characters.
    Delete(Index, usize),
    /// Inserts text at a character position.
    Insert(Index, String),
    /// Replaces a whole line.
    ReplaceLine(Index, String),
    /// Replaces the word (run of non-blank characters) at a position.
    ReplaceWord(Index, String),
    /// Duplicates a line in place.
    DuplicateLine(Index),
    /// Swaps two lines.
    SwapLines(Index, Index),
    /// Sets a line's indentation.
    Reindent(Index, usize),
}

fn text_edit() -> BoxedStrategy<TextEdit> {
    let snippet = prop_oneof![
        2 => select(YAML_FRAGMENTS).prop_map(str::to_owned),
        2 => config_scalar(),
        1 => "(?s).{0,8}",
    ];
    prop_oneof![
        2 => (any::<Index>(), 1usize..40).prop_map(|(i, n)| TextEdit::Delete(i, n)),
        3 => (any::<Index>(), snippet.clone()).prop_map(|(i, s)| TextEdit::Insert(i, s)),
        1 => (any::<Index>(), snippet.clone()).prop_map(|(i, s)| TextEdit::ReplaceLine(i, s)),
        3 => (any::<Index>(), snippet).prop_map(|(i, s)| TextEdit::ReplaceWord(i, s)),
        1 => any::<Index>().prop_map(TextEdit::DuplicateLine),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| TextEdit::SwapLines(a, b)),
        1 => (any::<Index>(), 0usize..9).prop_map(|(i, n)| TextEdit::Reindent(i, n)),
    ]
    .boxed()
}

fn apply_text_edit(src: &str, edit: &TextEdit) -> String {
    let bounds: Vec<usize> = src
        .char_indices()
        .map(|(i, _)| i)
        .chain([src.len()])
        .collect();
    let at = |i: &Index| bounds[pick(i, bounds.len())];
    let mut lines: Vec<String> = src.split('\n').map(str::to_owned).collect();
    let line = |i: &Index| pick(i, lines.len());
    match edit {
        TextEdit::Delete(i, n) => {
            let start = at(i);
            let end = src[start..]
                .char_indices()
                .nth(*n)
                .map_or(src.len(), |(o, _)| start + o);
            format!("{}{}", &src[..start], &src[end..])
        }
        TextEdit::Insert(i, s) => {
            let p = at(i);
            format!("{}{s}{}", &src[..p], &src[p..])
        }
        TextEdit::ReplaceWord(i, s) => {
            let p = at(i);
            let start = src[..p]
                .rfind(|c: char| c.is_whitespace())
                .map_or(0, |o| o + src[o..].chars().next().map_or(1, char::len_utf8));
            let end = src[p..]
                .find(|c: char| c.is_whitespace())
                .map_or(src.len(), |o| p + o);
            format!("{}{s}{}", &src[..start], &src[end.max(start)..])
        }
        TextEdit::ReplaceLine(i, s) => {
            let n = line(i);
            lines[n] = s.clone();
            lines.join("\n")
        }
        TextEdit::DuplicateLine(i) => {
            let n = line(i);
            let copy = lines[n].clone();
            lines.insert(n, copy);
            lines.join("\n")
        }
        TextEdit::SwapLines(a, b) => {
            let (a, b) = (line(a), line(b));
            lines.swap(a, b);
            lines.join("\n")
        }
        TextEdit::Reindent(i, spaces) => {
            let n = line(i);
            let text = lines[n].trim_start().to_owned();
            lines[n] = format!("{}{text}", " ".repeat(*spaces));
            lines.join("\n")
        }
    }
}

/// The demo and example configs as YAML trees (aliases expanded).
static SHIPPED_TREES: LazyLock<[serde_yaml::Value; 2]> = LazyLock::new(|| {
    [DEMO, EXAMPLE].map(|src| serde_yaml::from_str(src).unwrap_or(serde_yaml::Value::Null))
});

#[test]
fn shipped_configs_parse_and_survive_the_checks() {
    for src in [DEMO, EXAMPLE] {
        Config::parse(src, Path::new(ORIGIN)).expect("a shipped config parses");
        check_config(src).expect("a shipped config round-trips");
    }
    assert!(
        SHIPPED_TREES
            .iter()
            .all(|t| matches!(t, serde_yaml::Value::Mapping(_))),
        "the shipped configs are YAML mappings"
    );
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn config_from_arbitrary_bytes_is_an_error_not_a_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
    ) {
        let text = String::from_utf8_lossy(&bytes);
        check_config(&text)?;
        let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let path = dir.path().join("adce.yaml");
        std::fs::write(&path, &bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        match Config::load(&path) {
            Ok(_) => {}
            Err(ConfigError::Read { .. }) => prop_assert!(std::str::from_utf8(&bytes).is_err()),
            Err(e) => prop_assert!(e.to_string().starts_with(&path.display().to_string()), "{e}"),
        }
    }

    #[test]
    fn config_from_yaml_ish_text_is_an_error_not_a_panic(
        text in "([a-z_]{1,10}|[ ]{1,4}|[-:{}\\[\\],&*!|>'\"#?%@`~.]|\n|[0-9]{1,4}|\t|\r){0,80}",
    ) {
        check_config(&text)?;
        check_config(&format!("version: 1\n{text}"))?;
    }

    #[test]
    fn config_from_generated_trees_is_an_error_not_a_panic(tree in yaml_tree()) {
        let text = serde_yaml::to_string(&tree).unwrap_or_default();
        check_config(&text)?;
    }
}

proptest! {
    #![proptest_config(cases(768))]

    #[test]
    fn mutated_shipped_configs_never_panic(
        example in any::<bool>(),
        edits in prop::collection::vec(text_edit(), 1..4),
    ) {
        let mut src = if example { EXAMPLE } else { DEMO }.to_owned();
        for edit in &edits {
            src = apply_text_edit(&src, edit);
        }
        check_config(&src)?;
    }

    #[test]
    fn structurally_mutated_shipped_configs_never_panic(
        example in any::<bool>(),
        edits in prop::collection::vec(tree_edit(), 1..4),
    ) {
        let mut tree = SHIPPED_TREES[usize::from(example)].clone();
        for edit in &edits {
            apply_tree_edit(&mut tree, edit);
        }
        let text = serde_yaml::to_string(&tree).unwrap_or_default();
        check_config(&text)?;
    }
}

// ---------------------------------------------------------------------------
// Target 2: key templates rendered with hostile values.
// ---------------------------------------------------------------------------

/// Placeholder names, valid and not.
const VAR_NAMES: &[&str] = &["date", "id", "season", "team", "game_id", "d", "_", "x1"];

/// A strftime-ish date format: real specifiers, time specifiers, junk and literals.
fn date_format() -> BoxedStrategy<String> {
    prop_oneof![
        3 => prop::collection::vec(
            prop_oneof![
                "%[-_0^#]?[a-zA-Z%+.:0-9]",
                "%[-_0^#]?[3-9]?[a-zA-Z]",
                select(vec!["%Y", "%m", "%d", "%j", "%y", "%F", "%b", "%-d", "%e", "%n", "%t", "%%", "/", "-", ".", " "])
                    .prop_map(str::to_owned),
                "[a-z/ .-]{1,3}",
            ],
            1..6,
        )
        .prop_map(|parts| parts.concat()),
        1 => "\\PC{0,12}",
    ]
    .boxed()
}

/// A template source: arbitrary text, or pieces that mostly parse.
fn template_source() -> BoxedStrategy<String> {
    let piece = prop_oneof![
        3 => select(VAR_NAMES).prop_map(|n| format!("{{{n}}}")),
        2 => (select(VAR_NAMES), date_format()).prop_map(|(n, f)| format!("{{{n}:{f}}}")),
        3 => "[a-z0-9/._-]{1,8}",
        1 => select(HOSTILE).prop_map(str::to_owned),
        1 => select(vec!["{{", "}}", "{", "}", "{:}", "{9}", "{a b}", "{date:}"]).prop_map(str::to_owned),
    ];
    prop_oneof![
        4 => prop::collection::vec(piece, 0..8).prop_map(|p| p.concat()),
        1 => "\\PC{0,64}",
        1 => "(?s).{0,32}",
    ]
    .boxed()
}

/// A partition value for one placeholder: a date, or hostile text.
fn partition_value() -> BoxedStrategy<Value> {
    prop_oneof![
        1 => any_date().prop_map(Value::Date),
        3 => value_text().prop_map(Value::Str),
    ]
    .boxed()
}

/// Checks every way a parsed template renders `partition`.
fn check_render(t: &Template, partition: &Partition) -> Result<(), TestCaseError> {
    let plain = t.render(&|name| partition.get(name).map(Arg::from));
    let key = t.render_partition(partition);
    match (&plain, &key) {
        (Ok(text), Ok(k)) => {
            prop_assert_eq!(text, k);
            prop_assert!(
                validate_key(k).is_ok(),
                "an unsafe key rendered as Ok: {:?}",
                k
            );
        }
        (Ok(text), Err(TemplateError::UnsafeKey { key, reason })) => {
            prop_assert!(
                validate_key(text).is_err(),
                "a safe key was refused: {text:?}"
            );
            prop_assert!(key.chars().count() <= MAX_KEY_EXCERPT && !reason.is_empty());
        }
        (Err(a), Err(b)) => prop_assert_eq!(a, b),
        _ => {
            return Err(TestCaseError::fail(format!(
                "render {plain:?} and render_partition {key:?} disagree"
            )));
        }
    }
    if let Ok(k) = &key {
        // A key the template rendered may be matched back; what comes out is safe.
        if t.check_matchable().is_ok()
            && let Some(vars) = t.match_key(k)
        {
            for (name, v) in &vars {
                if let Value::Str(s) = v {
                    prop_assert!(is_valid_value(s), "{name} = {s:?} parsed out of {k:?}");
                }
            }
            let back = t.render(&|n| {
                vars.iter()
                    .find(|(name, _)| name == n)
                    .map(|(_, v)| Arg::from(v))
            });
            prop_assert_eq!(back.as_deref(), Ok(k.as_str()));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(2048))]

    #[test]
    fn templates_parse_or_fail_and_render_only_safe_keys(
        src in template_source(),
        values in prop::collection::vec(partition_value(), VAR_NAMES.len()),
    ) {
        let Ok(t) = Template::parse(&src) else {
            return Ok(());
        };
        prop_assert_eq!(t.as_str(), src.as_str());
        let reparsed = Template::parse(t.as_str());
        prop_assert_eq!(reparsed.as_ref(), Ok(&t));
        let partition = Partition {
            vars: VAR_NAMES.iter().map(|n| (*n).to_owned()).zip(values).collect(),
        };
        check_render(&t, &partition)?;
        // With every value a safe one, only the template's own text can make a key unsafe.
        let safe = Partition {
            vars: partition
                .vars
                .iter()
                .map(|(n, v)| (n.clone(), match v {
                    Value::Str(s) if !is_valid_value(s) => Value::Str("x".into()),
                    other => other.clone(),
                }))
                .collect(),
        };
        check_render(&t, &safe)?;
    }

    #[test]
    fn hostile_values_never_escape_a_key_template(
        template in select(vec![
            "espn/schedule/{date:%Y%m%d}.json",
            "nba/{season}/{team}.csv",
            "box/{game_id}.json",
            "{id}",
            "a/{id}/b",
            "{date:%Y/%m/%d}/{id}",
            "x{id}y",
            ".{id}",
        ]),
        values in prop::collection::vec(value_text(), 4),
        date in any_date(),
    ) {
        let t = Template::parse(template).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut vars: Vec<(String, Value)> = ["season", "team", "game_id", "id"]
            .iter()
            .map(|n| (*n).to_owned())
            .zip(values.iter().cloned().map(Value::Str))
            .collect();
        vars.push(("date".to_owned(), Value::Date(date)));
        let partition = Partition { vars };
        check_render(&t, &partition)?;
        if let Ok(key) = t.render_partition(&partition) {
            prop_assert!(!key.split('/').any(|s| s == ".." || s == "." || s.is_empty()), "{key:?}");
            prop_assert!(!key.starts_with('/') && !key.contains('\\') && key.len() <= MAX_KEY_LEN);
            prop_assert!(!key.chars().any(char::is_control), "{key:?}");
        }
    }

    #[test]
    fn date_formats_render_any_date_without_panicking(
        format in date_format(),
        date in any_date(),
        text in value_text(),
    ) {
        let Ok(t) = Template::parse(&format!("d/{{day:{format}}}/x")) else {
            return Ok(());
        };
        let _ = t.render(&|_| Some(Arg::Date(date)));
        let _ = t.render(&|_| Some(Arg::Text(&text)));
        let _ = t.check_matchable();
        let partition = Partition { vars: vec![("day".to_owned(), Value::Date(date))] };
        check_render(&t, &partition)?;
    }

    #[test]
    fn matching_hostile_keys_yields_only_safe_values(
        template in template_source(),
        key in prop_oneof![value_text(), "[a-z0-9/._-]{0,40}", "\\PC{0,60}"],
    ) {
        let Ok(t) = Template::parse(&template) else {
            return Ok(());
        };
        let _ = t.check_matchable();
        if let Some(vars) = t.match_key(&key) {
            for (name, v) in &vars {
                if let Value::Str(s) = v {
                    prop_assert!(is_valid_value(s), "{name} = {s:?} parsed out of {key:?}");
                }
            }
            let back = t.render(&|n| vars.iter().find(|(name, _)| name == n).map(|(_, v)| Arg::from(v)));
            prop_assert_eq!(back.as_deref(), Ok(key.as_str()));
        }
    }
}

// ---------------------------------------------------------------------------
// Target 3: `from_objects` value extraction.
// ---------------------------------------------------------------------------

/// JSON object keys and path segments that meet each other often.
const JSON_WORDS: &[&str] = &[
    "events", "id", "games", "gameId", "0", "1", "01", "*", "~", "~0", "~1", "/", "a/b", "a~1b",
];

fn json_doc() -> BoxedStrategy<serde_json::Value> {
    use serde_json::Value as J;
    let leaf = prop_oneof![
        4 => value_text().prop_map(J::String),
        1 => any::<i64>().prop_map(J::from),
        1 => any::<u64>().prop_map(J::from),
        1 => any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(J::Null, J::Number)),
        1 => any::<bool>().prop_map(J::Bool),
        1 => Just(J::Null),
    ];
    let key = prop_oneof![
        3 => select(JSON_WORDS).prop_map(str::to_owned),
        1 => value_text(),
    ];
    leaf.prop_recursive(5, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(J::Array),
            prop::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|kv| J::Object(kv.into_iter().collect())),
        ]
    })
    .boxed()
}

fn json_path_text() -> BoxedStrategy<String> {
    prop_oneof![
        4 => prop::collection::vec(select(JSON_WORDS), 0..5)
            .prop_map(|segs| segs.iter().map(|s| format!("/{s}")).collect::<String>()),
        1 => "\\PC{0,16}",
    ]
    .boxed()
}

fn pattern_text() -> BoxedStrategy<Option<String>> {
    prop_oneof![
        3 => Just(None),
        3 => select(vec![
            "[0-9]+", ".*", "(?s).*", "[^/]*", "a|b", "\\d{9}", ".{0,200}", "(a*)*", "\\p{L}+",
            "[\\x00-\\x7f]*", "(?i)bos", "a)|(b", "", "[", "\\", "x{1000}{1000}", ".{1,128}",
        ])
        .prop_map(|p| Some(p.to_owned())),
        1 => "\\PC{0,12}".prop_map(Some),
    ]
    .boxed()
}

fn pattern_of(p: &Option<String>) -> ValuePattern {
    p.as_deref()
        .and_then(|p| p.parse().ok())
        .unwrap_or_default()
}

fn extractor(extraction: Extraction, pattern: ValuePattern) -> Extractor {
    Extractor {
        extraction,
        pattern,
        max_bytes: 1 << 20,
    }
}

/// What every extraction must hold: accepted values are distinct, safe as partition
/// values and as key segments, and match the pattern; rejections are bounded and
/// printable; a whole-object error leaves no values.
fn check_extracted(ex: &Extractor, e: &Extracted) -> Result<(), TestCaseError> {
    let mut seen = HashSet::new();
    for v in &e.values {
        prop_assert!(oracle_safe(v), "unsafe value accepted: {v:?}");
        prop_assert!(is_valid_value(v));
        prop_assert!(
            ex.pattern.is_match(v),
            "{v:?} does not match {}",
            ex.pattern
        );
        prop_assert!(validate_key(&format!("p/{v}/x.json")).is_ok(), "{v:?}");
        prop_assert!(seen.insert(v.as_str()), "duplicate {v:?}");
    }
    prop_assert!(e.rejected.len() <= MAX_REJECTED_KEPT);
    for r in &e.rejected {
        prop_assert!(r.excerpt.chars().count() <= MAX_EXCERPT_CHARS, "{r:?}");
        prop_assert!(!r.excerpt.chars().any(char::is_control), "{r:?}");
        prop_assert!(!r.reason.chars().any(char::is_control), "{r:?}");
    }
    if let Some(error) = &e.error {
        prop_assert!(e.values.is_empty() && e.duplicates == 0);
        prop_assert!(
            !error.chars().any(|c| c.is_control() && c != '\n'),
            "{error:?}"
        );
    }
    Ok(())
}

/// The values an extraction of `candidates` (in document order) must accept, and how
/// many duplicates and rejections it must count.
fn expected(candidates: &[String], pattern: &ValuePattern) -> (Vec<String>, usize, usize) {
    let mut values: Vec<String> = Vec::new();
    let (mut duplicates, mut rejected) = (0, 0);
    for c in candidates {
        if oracle_safe(c) && pattern.is_match(c) {
            if values.contains(c) {
                duplicates += 1;
            } else {
                values.push(c.clone());
            }
        } else {
            rejected += 1;
        }
    }
    (values, duplicates, rejected)
}

fn every_extraction(path: &str) -> Vec<Extraction> {
    let mut out = vec![
        Extraction::Lines,
        Extraction::Csv(CsvColumn {
            column: Column::Index(0),
            header: false,
        }),
        Extraction::Csv(CsvColumn {
            column: Column::Name("id".into()),
            header: true,
        }),
        Extraction::Csv(CsvColumn {
            column: Column::Index(3),
            header: true,
        }),
    ];
    if let Ok(p) = path.parse::<JsonPath>() {
        out.push(Extraction::Json(p));
    }
    out
}

proptest! {
    #![proptest_config(cases(1024))]

    #[test]
    fn extraction_of_arbitrary_bytes_is_sound(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..1500),
            "(?s).{0,300}".prop_map(String::into_bytes),
            "([\\[\\]{}\",:0-9a-z./ \\\\~*;$\n\r-]|\\\\u00[0-9a-f]{2}){0,200}".prop_map(String::into_bytes),
        ],
        path in json_path_text(),
        pattern in pattern_text(),
    ) {
        let pattern = pattern_of(&pattern);
        for extraction in every_extraction(&path) {
            let ex = extractor(extraction, pattern.clone());
            check_extracted(&ex, &ex.extract(&bytes))?;
        }
    }

    #[test]
    fn extraction_of_json_documents_is_sound(
        doc in json_doc(),
        path in json_path_text(),
        pattern in pattern_text(),
        cut in any::<Index>(),
    ) {
        let pattern = pattern_of(&pattern);
        let text = doc.to_string();
        let Ok(path) = path.parse::<JsonPath>() else {
            return Ok(());
        };
        let ex = extractor(Extraction::Json(path), pattern);
        let e = ex.extract(text.as_bytes());
        check_extracted(&ex, &e)?;
        prop_assert!(e.error.is_none(), "a valid document failed: {:?}", e.error);
        // A truncated document is unreadable JSON or still sound.
        let cut = pick(&cut, text.len());
        check_extracted(&ex, &ex.extract(&text.as_bytes()[..cut]))?;
    }

    #[test]
    fn json_extraction_accepts_exactly_the_safe_values(
        candidates in prop::collection::vec(value_text(), 0..40),
        pattern in pattern_text(),
    ) {
        let pattern = pattern_of(&pattern);
        let doc = serde_json::json!({"events": candidates.iter().map(|c| serde_json::json!({"id": c})).collect::<Vec<_>>()});
        let ex = extractor(Extraction::Json("/events/*/id".parse().map_err(TestCaseError::fail)?), pattern.clone());
        let e = ex.extract(doc.to_string().as_bytes());
        check_extracted(&ex, &e)?;
        let (values, duplicates, rejected) = expected(&candidates, &pattern);
        prop_assert_eq!(&e.values, &values);
        prop_assert_eq!(e.duplicates, duplicates);
        prop_assert_eq!(e.rejected_total(), rejected);
    }

    #[test]
    fn csv_extraction_accepts_exactly_the_safe_values(
        fields in prop::collection::vec(value_text(), 0..40),
        pattern in pattern_text(),
    ) {
        let pattern = pattern_of(&pattern);
        let mut w = csv::WriterBuilder::new().flexible(true).from_writer(Vec::new());
        let _ = w.write_record(["id", "pad"]);
        for f in &fields {
            let _ = w.write_record([f.as_str(), "pad"]);
        }
        let bytes = w.into_inner().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let ex = extractor(Extraction::Csv(CsvColumn { column: Column::Name("id".into()), header: true }), pattern.clone());
        let e = ex.extract(&bytes);
        check_extracted(&ex, &e)?;
        let candidates: Vec<String> = fields
            .iter()
            .map(|f| String::from_utf8_lossy(f.as_bytes().trim_ascii()).into_owned())
            .collect();
        let (values, duplicates, rejected) = expected(&candidates, &pattern);
        prop_assert_eq!(&e.values, &values);
        prop_assert_eq!(e.duplicates, duplicates);
        prop_assert_eq!(e.rejected_total(), rejected);
    }

    #[test]
    fn line_extraction_accepts_exactly_the_safe_values(
        lines in prop::collection::vec(value_text().prop_map(|l| l.replace('\n', "")), 0..40),
        pattern in pattern_text(),
    ) {
        let pattern = pattern_of(&pattern);
        let mut body = lines.join("\n").into_bytes();
        if body.starts_with(b"\xEF\xBB\xBF") {
            body.insert(0, b'\n');
        }
        let ex = extractor(Extraction::Lines, pattern.clone());
        let e = ex.extract(&body);
        check_extracted(&ex, &e)?;
        let candidates: Vec<String> = lines
            .iter()
            .map(|l| l.trim_ascii().to_owned())
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        let (values, duplicates, rejected) = expected(&candidates, &pattern);
        prop_assert_eq!(&e.values, &values);
        prop_assert_eq!(e.duplicates, duplicates);
        prop_assert_eq!(e.rejected_total(), rejected);
    }

    #[test]
    fn patterns_and_paths_parse_or_explain(text in "\\PC{0,40}") {
        match text.parse::<ValuePattern>() {
            Ok(p) => {
                prop_assert_eq!(p.as_str(), text.as_str());
                let _ = p.is_match("x");
            }
            Err(e) => prop_assert!(e.starts_with("invalid pattern") && !e.contains('\n'), "{e}"),
        }
        match text.parse::<JsonPath>() {
            Ok(p) => prop_assert_eq!(p.as_str(), text.as_str()),
            Err(e) => prop_assert!(e.starts_with("invalid JSON path"), "{e}"),
        }
    }
}

/// A config with one static parent source and three dependent ones, one per kind of
/// extraction.
const DEPENDENT_CONFIG: &str = r#"
version: 1
lake:
  local:
    root: lake
scrapers:
  s:
    command: ["sh", "{config_dir}/s.sh", "{out}"]
sources:
  - name: schedule
    scraper: s
    partitions:
      dates: {start: 2024-10-22, end: 2024-10-30}
    objects: ["espn/schedule/{date:%Y%m%d}.json"]
  - name: games
    scraper: s
    partitions:
      from_objects: {objects: "espn/schedule/{date:%Y%m%d}.json", var: game_id, json: /events/*/id}
    objects: ["espn/game/{game_id}.json", "espn/pbp/{date}/{game_id}.json"]
  - name: rows
    scraper: s
    partitions:
      from_objects: {objects: "t/{team}/{season}.csv", var: player, csv: {column: id}}
    objects: ["p/{team}/{player}.csv"]
  - name: listed
    scraper: s
    partitions:
      from_objects: {objects: "l/{date}.txt", var: item, lines: true, pattern: ".*"}
    objects: ["i/{item}"]
"#;

static DEPENDENT: LazyLock<Catalog> = LazyLock::new(|| {
    let cfg = Config::parse(DEPENDENT_CONFIG, Path::new(ORIGIN))
        .unwrap_or_else(|e| panic!("the dependent test config is valid: {e}"));
    Catalog::from_config(&cfg)
});

/// A parent key for one of the dependent sources: a real-looking one with a hostile
/// value spliced in, or anything at all.
fn parent_key() -> BoxedStrategy<String> {
    prop_oneof![
        (value_text(), value_text()).prop_map(|(a, b)| format!("t/{a}/{b}.csv")),
        value_text().prop_map(|a| format!("l/{a}.txt")),
        value_text().prop_map(|a| format!("espn/schedule/{a}.json")),
        any_date().prop_map(|d| format!("espn/schedule/{}.json", d.format("%Y%m%d"))),
        any_date().prop_map(|d| format!("l/{}.txt", d.format("%Y-%m-%d"))),
        "\\PC{0,40}",
    ]
    .boxed()
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn dependent_sources_expand_only_to_safe_keys(
        key in parent_key(),
        values in prop::collection::vec(value_text(), 0..12),
        hostile_parent in prop::collection::vec((select(VAR_NAMES), partition_value()), 0..3),
    ) {
        let catalog = &*DEPENDENT;
        let lines = values.join("\n");
        let mut rows = String::from("id\n");
        for v in &values {
            rows.push_str(&format!("\"{}\"\n", v.replace('"', "\"\"")));
        }
        let docs = [
            serde_json::json!({"events": values.iter().map(|v| serde_json::json!({"id": v})).collect::<Vec<_>>()}).to_string(),
            rows,
            lines,
        ];
        for source in catalog.dependent_sources().collect::<Vec<_>>() {
            let dep = catalog.sources[source].dependency.as_ref()
                .ok_or_else(|| TestCaseError::fail("a dependent source without its dependency"))?;
            let hostile = Partition {
                vars: hostile_parent.iter().map(|(n, v)| ((*n).to_owned(), v.clone())).collect(),
            };
            let mut parents = vec![(hostile, values.clone())];
            if let Some(parent) = dep.match_parent(&key) {
                for (name, v) in &parent.vars {
                    if let Value::Str(s) = v {
                        prop_assert!(is_valid_value(s), "{name} = {s:?} out of {key:?}");
                    }
                }
                for doc in &docs {
                    let e = dep.extract(doc.as_bytes());
                    check_extracted(dep.extractor(), &e)?;
                    parents.push((parent.clone(), e.values));
                }
                // Raw values too: expansion checks them again.
                parents.push((parent, values.clone()));
            }
            for expected in catalog.expand_dependent(source, &parents) {
                for k in &expected.keys {
                    prop_assert!(validate_key(k).is_ok(), "unsafe key {k:?}");
                }
                for (name, v) in &expected.partition.vars {
                    if let Value::Str(s) = v {
                        prop_assert!(is_valid_value(s), "{name} = {s:?}");
                    }
                }
            }
        }
    }
}

#[test]
fn the_dependent_pipeline_keeps_safe_values_and_drops_hostile_ones() {
    let catalog = &*DEPENDENT;
    let games = catalog.source_index("games").expect("source games");
    let dep = catalog.sources[games]
        .dependency
        .as_ref()
        .expect("a dependent source");
    let parent = dep
        .match_parent("espn/schedule/20241022.json")
        .expect("a parent key matches");
    let doc = br#"{"events": [{"id": "401"}, {"id": "../x"}, {"id": "a/b"}, {"id": "a\u0000b"}, {"id": 402}]}"#;
    let e = dep.extract(doc);
    assert_eq!(e.values, ["401", "402"]);
    assert_eq!(e.rejected_total(), 3);
    let raw = vec!["401".to_owned(), "..".to_owned(), "x\\y".to_owned()];
    let expanded = catalog.expand_dependent(games, &[(parent.clone(), e.values), (parent, raw)]);
    let keys: Vec<&str> = expanded
        .iter()
        .flat_map(|p| p.keys.iter().map(String::as_str))
        .collect();
    assert_eq!(
        keys,
        [
            "espn/game/401.json",
            "espn/pbp/2024-10-22/401.json",
            "espn/game/402.json",
            "espn/pbp/2024-10-22/402.json",
        ]
    );
}

// ---------------------------------------------------------------------------
// Target 4: S3 Inventory manifests and CSV data files.
// ---------------------------------------------------------------------------

/// The bucket the fuzzed reports list.
const BUCKET: &str = "lake-bucket";
/// The report directory's stamp.
const STAMP: &str = "2024-10-22T00-00Z";
/// Longer than any honest read of these tiny reports can take: a read still running
/// then is a hang.
const HANG_GUARD: Duration = Duration::from_secs(60);

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("a tokio runtime: {e}"))
});

fn inventory_cfg() -> adce_server::config::InventoryConfig {
    adce_server::config::InventoryConfig {
        bucket: "inventory-destination".into(),
        prefix: "inv/".into(),
        config_id: "daily".into(),
    }
}

/// A data file beside the report store (not inside it), listing one object named
/// [`LEAKED`]: no manifest may make a read reach it.
static SECRET: LazyLock<Vec<u8>> = LazyLock::new(|| {
    gzip(
        format!(
            "\"{BUCKET}\",\"{LEAKED}\",\"1\",\"2024-10-22T12:00:00.000Z\",\"e\",\"STANDARD\"\n"
        )
        .as_bytes(),
    )
});
/// The key of the object [`SECRET`] lists.
const LEAKED: &str = "leaked";
/// How a manifest names [`SECRET`] from inside the store.
const SECRET_KEY: &str = "../secret.csv.gz";

/// A report written into `<temp dir>/store`, with [`SECRET`] beside the store and the
/// manifest replaced when one is given (its checksum always matches, so parsing is
/// reached).
struct Written {
    dir: tempfile::TempDir,
    report_dir: String,
}

impl Written {
    fn store(&self) -> std::path::PathBuf {
        self.dir.path().join("store")
    }
}

fn write_report(builder: ReportBuilder, manifest: Option<&[u8]>) -> Result<Written, TestCaseError> {
    let fail = |e: std::io::Error| TestCaseError::fail(e.to_string());
    let dir = tempfile::tempdir().map_err(fail)?;
    let store = dir.path().join("store");
    let report_dir = builder.write_to(&store).map_err(fail)?;
    std::fs::write(dir.path().join("secret.csv.gz"), &*SECRET).map_err(fail)?;
    if let Some(bytes) = manifest {
        let root = store.join(&report_dir);
        std::fs::write(root.join("manifest.json"), bytes).map_err(fail)?;
        let md5: String = Md5::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        std::fs::write(root.join("manifest.checksum"), md5).map_err(fail)?;
    }
    Ok(Written { dir, report_dir })
}

/// Finds the newest report and reads it whole with `lake_prefix` and `prefixes`.
/// Checks that what was sent is what was counted, that every key is non-empty, and
/// that nothing outside the store was read.
fn read_all(
    w: &Written,
    lake_prefix: &str,
    prefixes: &[String],
) -> Result<Result<Vec<ObjectMeta>, InventoryError>, TestCaseError> {
    let src: Arc<dyn ObjectSource> = Arc::new(LocalDir::new(w.store()));
    let run = async {
        let report: Report = match latest_report(src.as_ref(), &inventory_cfg(), BUCKET).await {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        if report.dir != w.report_dir {
            return Err(TestCaseError::fail(format!("report dir {:?}", report.dir)));
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let reading = read_report(Arc::clone(&src), &report, lake_prefix, prefixes, tx);
        let collect = async {
            let mut objects = Vec::new();
            while let Some(page) = rx.recv().await {
                objects.extend(page);
            }
            objects
        };
        let (sent, objects) = tokio::join!(reading, collect);
        Ok(sent.map(|n| (n, objects)))
    };
    let result = RUNTIME
        .block_on(async { tokio::time::timeout(HANG_GUARD, run).await })
        .map_err(|_| TestCaseError::fail("reading the report hung"))??;
    match result {
        Err(e) => {
            prop_assert!(!e.to_string().is_empty());
            Ok(Err(e))
        }
        Ok((sent, objects)) => {
            prop_assert_eq!(sent, objects.len() as u64, "count returned != objects sent");
            for o in &objects {
                prop_assert!(!o.key.is_empty(), "an empty key was listed");
                prop_assert!(
                    o.key.len() <= MAX_KEY_LEN,
                    "a key longer than S3 allows was listed"
                );
                prop_assert!(o.key != LEAKED, "a data file outside the store was read");
            }
            Ok(Ok(objects))
        }
    }
}

/// A data file's bytes: garbage, truncated or concatenated gzip, or gzipped CSV that
/// quotes badly, encodes keys badly or holds huge fields.
fn data_file() -> BoxedStrategy<Vec<u8>> {
    let field = prop_oneof![
        3 => value_text(),
        2 => "[%+a-z0-9/]{0,12}",
        1 => select(vec!["%", "%4", "%zz", "%2", "%%", "%C3%28", "%FF", "+%2B", "2024-10-22T12:00:00.000Z", "2024-02-30T00:00:00Z", "9999-12-31T23:59:60.999999999Z", "0000-01-01T00:00:00Z", "2024-10-22T12:00:00+01:00", "18446744073709551616", "-1", "true", "false", "TRUE"]).prop_map(str::to_owned),
        1 => huge_text(),
    ]
    .boxed();
    let rows = prop::collection::vec(prop::collection::vec(field, 0..8), 0..12).boxed();
    prop_oneof![
        2 => prop::collection::vec(any::<u8>(), 0..400),
        2 => "(?s)([\",\n\r]|[a-z0-9%+ ]{1,6}){0,60}".prop_map(|t| gzip(t.as_bytes())),
        3 => rows.prop_map(|rows| {
            let mut w = csv::WriterBuilder::new()
                .flexible(true)
                .quote_style(csv::QuoteStyle::Always)
                .from_writer(Vec::new());
            for r in &rows {
                let _ = w.write_record(r);
            }
            gzip(&w.into_inner().unwrap_or_default())
        }),
        1 => ("(?s).{0,200}", any::<Index>()).prop_map(|(t, cut)| {
            let z = gzip(t.as_bytes());
            let n = pick(&cut, z.len() + 1);
            z[..n].to_vec()
        }),
        1 => ("(?s).{0,100}", "(?s).{0,100}", prop::collection::vec(any::<u8>(), 0..8))
            .prop_map(|(a, b, junk)| [gzip(a.as_bytes()), gzip(b.as_bytes()), junk].concat()),
    ]
    .boxed()
}

/// A `fileSchema`: the default, or shuffled, missing, duplicated and odd columns.
fn file_schema() -> BoxedStrategy<String> {
    prop_oneof![
        3 => Just("Bucket, Key, Size, LastModifiedDate, ETag, StorageClass".to_owned()),
        1 => Just("Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate".to_owned()),
        2 => prop::collection::vec(
            select(vec!["Bucket", "Key", "Size", "LastModifiedDate", "ETag", "IsLatest", "IsDeleteMarker", "", " ", "key", "Key "]),
            0..8,
        )
        .prop_map(|c| c.join(",")),
        1 => "\\PC{0,30}",
    ]
    .boxed()
}

/// A manifest as JSON: AWS's fields, each possibly hostile, missing or mistyped.
fn manifest_json() -> BoxedStrategy<serde_json::Value> {
    use serde_json::{Value as J, json};
    let text = prop_oneof![
        2 => value_text().prop_map(J::String),
        1 => any::<i64>().prop_map(J::from),
        1 => any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(J::Null, J::Number)),
        1 => Just(J::Null),
        1 => Just(json!([])),
        1 => Just(json!({})),
    ]
    .boxed();
    let file_key = prop_oneof![
        3 => Just(format!("inv/{BUCKET}/daily/data/{STAMP}-0.csv.gz")),
        1 => select(vec!["../../etc/passwd", "/etc/passwd", "inv/", "", "inv//x", "a\\b", "a\0b"]).prop_map(str::to_owned),
        1 => value_text(),
    ]
    .boxed();
    let size = prop_oneof![
        2 => (0u64..400).prop_map(J::from),
        1 => any::<u64>().prop_map(J::from),
        1 => any::<i64>().prop_map(J::from),
        1 => text.clone(),
    ]
    .boxed();
    let md5 = prop_oneof![
        2 => Just(J::Null),
        1 => "[0-9a-fA-F]{32}".prop_map(J::String),
        1 => text.clone(),
    ]
    .boxed();
    let file = prop_oneof![
        6 => (file_key, size, md5).prop_map(|(k, s, m)| json!({"key": k, "size": s, "MD5checksum": m})),
        1 => Just(json!({"key": SECRET_KEY, "size": SECRET.len()})),
    ]
    .boxed();
    let files = prop_oneof![
        4 => prop::collection::vec(file, 0..4).prop_map(J::Array),
        1 => text.clone(),
    ]
    .boxed();
    let bucket = prop_oneof![3 => Just(J::String(BUCKET.into())), 1 => text.clone()].boxed();
    let format = prop_oneof![
        3 => Just(J::String("CSV".into())),
        1 => select(vec!["csv", "Parquet", "ORC", "", "CSV "]).prop_map(|f| J::String(f.into())),
        1 => text.clone(),
    ]
    .boxed();
    let created = prop_oneof![
        2 => any::<i64>().prop_map(|n| J::String(n.to_string())),
        1 => any::<i64>().prop_map(J::from),
        1 => "[0-9 +-]{0,24}".prop_map(J::String),
        1 => text.clone(),
    ]
    .boxed();
    let schema = prop_oneof![4 => file_schema().prop_map(J::String), 1 => text].boxed();
    // Most manifests keep every field; a few lose one.
    let dropped = prop::option::weighted(0.2, 0usize..5);
    (bucket, format, schema, created, files, dropped)
        .prop_map(|(bucket, format, schema, created, files, dropped)| {
            let fields = [
                ("sourceBucket", bucket),
                ("fileFormat", format),
                ("fileSchema", schema),
                ("creationTimestamp", created),
                ("files", files),
            ];
            let m: serde_json::Map<String, J> = fields
                .into_iter()
                .enumerate()
                .filter(|(i, _)| Some(*i) != dropped)
                .map(|(_, (k, v))| (k.to_owned(), v))
                .collect();
            J::Object(m)
        })
        .boxed()
}

/// A manifest's bytes: generated JSON, the same with one byte changed, or garbage.
fn manifest_bytes() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        3 => manifest_json().prop_map(|m| m.to_string().into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..300),
        1 => (manifest_json(), any::<Index>(), any::<u8>()).prop_map(|(m, at, b)| {
            let mut bytes = m.to_string().into_bytes();
            let i = pick(&at, bytes.len());
            if let Some(x) = bytes.get_mut(i) {
                *x = b;
            }
            bytes
        }),
    ]
    .boxed()
}

proptest! {
    #![proptest_config(cases(400))]

    #[test]
    fn hostile_manifests_are_errors_not_panics(
        manifest in manifest_bytes(),
        data in data_file(),
    ) {
        let builder = ReportBuilder::new(&inventory_cfg(), BUCKET, STAMP).data_file(data);
        let w = write_report(builder, Some(&manifest))?;
        // `read_all` checks the counts, the keys and that nothing outside the store is read.
        let _ = read_all(&w, "", &[])?;
    }

    #[test]
    fn hostile_data_files_are_errors_not_panics(
        data in prop::collection::vec(data_file(), 1..3),
        schema in file_schema(),
        lake_prefix in select(vec!["", "raw/", "%", "a"]),
        prefixes in prop::collection::vec(select(vec!["", "a", "raw/", "x/y", "%2"]), 0..3),
    ) {
        let mut builder = ReportBuilder::new(&inventory_cfg(), BUCKET, STAMP).schema(&schema);
        for d in data {
            builder = builder.data_file(d);
        }
        let w = write_report(builder, None)?;
        let prefixes: Vec<String> = prefixes.into_iter().map(str::to_owned).collect();
        if let Ok(objects) = read_all(&w, lake_prefix, &prefixes)? {
            for o in &objects {
                prop_assert!(prefixes.iter().all(|p| p.is_empty()) || prefixes.iter().any(|p| o.key.starts_with(p.as_str())), "{o:?}");
            }
        }
    }

    #[test]
    fn any_key_round_trips_through_an_inventory_report(
        objects in prop::collection::vec(
            (
                prop_oneof![value_text(), "\\PC{1,40}", "[a-z0-9/ +%._-]{1,40}"],
                any::<u64>(),
                -62_135_596_800_000i64..253_402_300_799_999,
            ),
            0..30,
        ),
    ) {
        let metas: Vec<ObjectMeta> = objects
            .iter()
            .filter(|(k, _, _)| !k.is_empty() && k.len() <= MAX_KEY_LEN)
            .map(|(key, size, ms)| ObjectMeta { key: key.clone(), size: *size, modified_ms: *ms })
            .collect();
        for m in &metas {
            prop_assert!(!encode_key(&m.key).contains(['/', ' ', '"', ',', '\n']));
        }
        let builder = ReportBuilder::new(&inventory_cfg(), BUCKET, STAMP).objects_file(metas.clone());
        let w = write_report(builder, None)?;
        let mut read = read_all(&w, "", &[])?.map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut want = metas;
        read.sort_by(|a, b| (&a.key, a.size, a.modified_ms).cmp(&(&b.key, b.size, b.modified_ms)));
        want.sort_by(|a, b| (&a.key, a.size, a.modified_ms).cmp(&(&b.key, b.size, b.modified_ms)));
        prop_assert_eq!(read, want);
    }
}

// ---------------------------------------------------------------------------
// Regression tests: inputs the targets above once broke, and hostile cases that
// must keep failing safely.
// ---------------------------------------------------------------------------

#[test]
fn manifest_naming_a_file_outside_the_report_store_is_refused() {
    for key in [SECRET_KEY, "inv/../../secret.csv.gz", "/etc/passwd"] {
        let manifest = serde_json::json!({
            "sourceBucket": BUCKET,
            "fileFormat": "CSV",
            "fileSchema": "Bucket, Key, Size, LastModifiedDate, ETag, StorageClass",
            "creationTimestamp": "1729555200000",
            "files": [{"key": key, "size": SECRET.len()}],
        });
        let w = write_report(
            ReportBuilder::new(&inventory_cfg(), BUCKET, STAMP),
            Some(manifest.to_string().as_bytes()),
        )
        .expect("report written");
        let err = read_all(&w, "", &[])
            .expect("no hang, nothing leaked")
            .expect_err("a data file outside the store is refused");
        assert!(
            err.to_string().contains("invalid object key"),
            "{key}: {err}"
        );
    }
}

#[test]
fn rendered_keys_longer_than_the_lake_allows_are_refused() {
    let t = Template::parse(&format!("{}/{{id}}.json", "a".repeat(1000))).expect("parses");
    let partition = Partition {
        vars: vec![("id".into(), Value::Str("x".repeat(128)))],
    };
    let plain = t
        .render(&|n| partition.get(n).map(Arg::from))
        .expect("renders");
    assert!(plain.len() > MAX_KEY_LEN);
    let err = t.render_partition(&partition).unwrap_err();
    assert!(
        matches!(
            err,
            TemplateError::UnsafeKey {
                reason: "longer than 1024 bytes",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn rendered_keys_with_traversal_or_control_characters_are_refused() {
    let t = Template::parse("data/{id}.json").expect("parses");
    for hostile in ["../../etc/passwd", "a\0b", "a\nb", "..\\x", "/x", "a//b"] {
        let partition = Partition {
            vars: vec![("id".into(), Value::Str(hostile.into()))],
        };
        let err = t.render_partition(&partition).unwrap_err();
        assert!(
            matches!(err, TemplateError::UnsafeKey { .. }),
            "{hostile:?}: {err:?}"
        );
        assert!(err.to_string().starts_with("rendered object key "), "{err}");
    }
    let dots = Template::parse("{a}/{b}").expect("parses");
    let partition = Partition {
        vars: vec![
            ("a".into(), Value::Str("..".into())),
            ("b".into(), Value::Str("x".into())),
        ],
    };
    assert!(dots.render_partition(&partition).is_err());
}

#[test]
fn inventory_keys_longer_than_s3_allows_are_errors() {
    let rows = vec![
        vec![
            BUCKET.to_owned(),
            "ok".to_owned(),
            "1".to_owned(),
            "2024-10-22T12:00:00.000Z".to_owned(),
        ],
        vec![
            BUCKET.to_owned(),
            "k".repeat(50_000),
            "1".to_owned(),
            "2024-10-22T12:00:00.000Z".to_owned(),
        ],
    ];
    let builder = ReportBuilder::new(&inventory_cfg(), BUCKET, STAMP)
        .schema("Bucket, Key, Size, LastModifiedDate")
        .rows_file(&rows);
    let w = write_report(builder, None).expect("report written");
    let err = read_all(&w, "", &[])
        .expect("no hang")
        .expect_err("a 50 kB key is a corrupt row");
    let msg = err.to_string();
    assert!(
        msg.contains("line 2") && msg.contains("longer than S3 allows (1024)"),
        "{msg}"
    );
    assert!(
        msg.len() < 1024,
        "the message quotes only the start of the key: {msg}"
    );
}

#[test]
fn deeply_nested_and_alias_bomb_configs_are_errors() {
    // Deep flow nesting: libyaml's recursion limit answers, with a position.
    let deep = format!(
        "version: 1\nsources: {}{}\n",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let err = Config::parse(&deep, Path::new(ORIGIN)).unwrap_err();
    check_config_error(&deep, &err).expect("a sound error");
    assert!(err.position().is_some(), "{err}");
    // A billion laughs: every alias level multiplies by ten; no field takes the expansion.
    let mut bomb = String::from("version: 1\nsources:\n  - &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..10 {
        let p = i - 1;
        let refs = vec![format!("*a{p}"); 10].join(", ");
        bomb.push_str(&format!("  - &a{i} [{refs}]\n"));
    }
    let err = Config::parse(&bomb, Path::new(ORIGIN)).unwrap_err();
    check_config_error(&bomb, &err).expect("a sound error");
}

#[test]
fn a_second_yaml_document_is_an_error_naming_the_file() {
    let src = format!("{DEMO}\n---\nversion: 1\n");
    let err = Config::parse(&src, Path::new(ORIGIN)).unwrap_err();
    assert!(err.to_string().starts_with(ORIGIN), "{err}");
    assert!(err.message().contains("more than one document"), "{err}");
}

/// The 1-based `line:column` (in characters) where `needle` first occurs in `src`.
fn line_col(src: &str, needle: &str) -> String {
    let at = src
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} occurs"));
    let before = &src[..at];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    format!("{line}:{column}")
}

#[test]
fn byte_order_marks_inside_a_config_keep_error_positions() {
    // Inside a scalar: libyaml keeps the mark as part of the value.
    let src = DEMO.replacen("limits: [bbref]", "limits: [\u{feff}bbref]", 1);
    let err = Config::parse(&src, Path::new(ORIGIN)).unwrap_err();
    let at = line_col(&src, "\u{feff}bbref]");
    assert!(
        err.to_string().starts_with(&format!("{ORIGIN}:{at}: ")),
        "expected {at}: {err}"
    );
    assert!(err.message().contains("limit group"), "{err}");
    // At the start of a line, before a comment: libyaml skips it. An error further
    // down still points at its value.
    let src = DEMO
        .replacen("# Generous on purpose", "\u{feff}# Generous on purpose", 1)
        .replacen("scraper: nba_pbp", "scraper: nope", 1);
    let err = Config::parse(&src, Path::new(ORIGIN)).unwrap_err();
    let at = line_col(&src, "nope");
    assert!(
        err.to_string().starts_with(&format!("{ORIGIN}:{at}: ")),
        "expected {at}: {err}"
    );
}

/// Found by fuzzing: a key template that fits with short values but not with
/// the longest values a partition may hold passed validation, and expansion
/// then met keys the lake refuses. It is a config error now, with a position.
#[test]
fn key_templates_too_long_for_the_longest_values_are_config_errors() {
    let src = format!(
        "version: 1
lake:
  local:
    root: lake
scrapers:
  s:
    command: [\"true\"]
sources:
  - name: a
    scraper: s
    partitions:
      values: {{var: id, values: [\"{value}\"]}}
    objects: [\"{prefix}/{{id}}.json\"]
",
        value = "x".repeat(128),
        prefix = "a".repeat(1000)
    );
    let err = Config::parse(&src, Path::new(ORIGIN)).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("the lake's limit is 1024"), "{message}");
    assert!(message.contains(&format!("{ORIGIN}:13:")), "{message}");
}

/// Found by fuzzing: `server.shutdown_grace: 500000000000y` passed validation
/// and overflowed the clock at shutdown. Durations are capped at 100 years.
#[test]
fn durations_beyond_a_century_are_config_errors() {
    let src =
        "version: 1\nserver:\n  shutdown_grace: 500000000000y\nlake:\n  local:\n    root: lake\n";
    let err = Config::parse(src, Path::new(ORIGIN)).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("longer than 100 years"), "{message}");
    assert!(message.contains(&format!("{ORIGIN}:3:")), "{message}");
}
