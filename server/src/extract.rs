//! Value extraction for dependent (`from_objects`) sources: reads the values a source
//! partitions by out of one parent object — a JSON document by a wildcard pointer, a
//! CSV column, or one value per line — and checks every candidate before it can become
//! part of an object key or an argv element.
//!
//! Pure: bytes in, [`Extracted`] out; no I/O, and no input makes it panic. Every
//! accepted value matches the source's pattern (anchored, default
//! [`DEFAULT_PATTERN`]) *and* the rule every partition value obeys
//! ([`crate::model::is_valid_value`]: `[A-Za-z0-9._-]{1,128}`, not only dots): a
//! pattern can narrow what is accepted, never widen it.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use regex::{Regex, RegexBuilder};

use crate::model::{MAX_VALUE_LEN, is_valid_value};

/// The pattern values must match when the source gives none.
pub const DEFAULT_PATTERN: &str = "[A-Za-z0-9._-]{1,128}";
/// The largest parent object read by default (64 MiB); larger ones are skipped.
pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Rejections kept per parent object; further ones are only counted.
pub const MAX_REJECTED_KEPT: usize = 100;
/// The longest excerpt of a rejected value, in characters.
pub const MAX_EXCERPT_CHARS: usize = 80;
/// The most compiled size a pattern may have.
const PATTERN_SIZE_LIMIT: usize = 1 << 20;

/// A JSON-pointer-like path (RFC 6901 syntax) in which a `*` segment stands for every
/// element of an array or every member of an object: `/events/*/id`. A numeric segment
/// indexes an array. The empty path is the whole document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPath {
    text: String,
    segments: Vec<PathSegment>,
}

/// One step of a [`JsonPath`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum PathSegment {
    /// An object member by name, or an array element by canonical index.
    Member(String),
    /// Every array element or object member, in document order.
    Any,
}

impl JsonPath {
    /// The path as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for JsonPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for JsonPath {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("invalid JSON path `{}`: {why}", excerpt(s.as_bytes()));
        if s.is_empty() {
            return Ok(JsonPath {
                text: String::new(),
                segments: Vec::new(),
            });
        }
        let Some(rest) = s.strip_prefix('/') else {
            return Err(bad("it starts with `/` (e.g. /events/*/id)"));
        };
        let mut segments = Vec::new();
        for raw in rest.split('/') {
            if raw.is_empty() {
                return Err(bad("empty segment (`//` or a trailing `/`)"));
            }
            if raw == "*" {
                segments.push(PathSegment::Any);
                continue;
            }
            let mut name = String::with_capacity(raw.len());
            let mut chars = raw.chars();
            while let Some(c) = chars.next() {
                if c != '~' {
                    name.push(c);
                    continue;
                }
                match chars.next() {
                    Some('0') => name.push('~'),
                    Some('1') => name.push('/'),
                    _ => return Err(bad("`~` must be followed by 0 (for `~`) or 1 (for `/`)")),
                }
            }
            segments.push(PathSegment::Member(name));
        }
        Ok(JsonPath {
            text: s.to_owned(),
            segments,
        })
    }
}

/// Which CSV column holds the values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Column {
    /// The column with this name in the header row.
    Name(String),
    /// The column at this 0-based index.
    Index(usize),
}

/// `csv: {column, header}`: the values are one column of a CSV file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvColumn {
    /// The column.
    pub column: Column,
    /// Whether the first row is a header (default true); a column name needs one.
    pub header: bool,
}

/// An anchored regular expression every value must match as a whole.
#[derive(Clone)]
pub struct ValuePattern {
    text: String,
    regex: Regex,
}

impl ValuePattern {
    /// The pattern as written (without the anchors adce adds).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `value` matches the whole pattern.
    pub fn is_match(&self, value: &str) -> bool {
        self.regex.is_match(value)
    }
}

impl Default for ValuePattern {
    fn default() -> Self {
        // A constant pattern that a test compiles: this cannot fail.
        DEFAULT_PATTERN
            .parse()
            .expect("the default pattern compiles")
    }
}

impl PartialEq for ValuePattern {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for ValuePattern {}

impl fmt::Debug for ValuePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ValuePattern").field(&self.text).finish()
    }
}

impl fmt::Display for ValuePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for ValuePattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: String| format!("invalid pattern `{}`: {why}", excerpt(s.as_bytes()));
        if s.is_empty() {
            return Err(bad("it must not be empty".into()));
        }
        let build = |p: &str| {
            RegexBuilder::new(p)
                .size_limit(PATTERN_SIZE_LIMIT)
                .build()
                .map_err(|e| bad(regex_problem(&e)))
        };
        // Compiled alone first, so that a pattern like `a)|(b` cannot escape the anchors.
        build(s)?;
        let regex = build(&format!(r"\A(?:{s})\z"))?;
        Ok(ValuePattern {
            text: s.to_owned(),
            regex,
        })
    }
}

/// The one-line gist of a regex error (syntax errors span several lines with a caret).
fn regex_problem(e: &regex::Error) -> String {
    match e {
        regex::Error::Syntax(msg) => msg
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix("error: "))
            .unwrap_or("syntax error")
            .to_owned(),
        regex::Error::CompiledTooBig(limit) => {
            format!("it compiles to more than {limit} bytes")
        }
        _ => e.to_string(),
    }
}

/// How values are read out of a parent object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extraction {
    /// String and integer values at a JSON path.
    Json(JsonPath),
    /// One CSV column.
    Csv(CsvColumn),
    /// One value per line; lines are trimmed, empty lines and `#` comments skipped.
    Lines,
}

/// Everything needed to read one dependent source's values out of a parent object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extractor {
    /// Where the values are.
    pub extraction: Extraction,
    /// What every value must match.
    pub pattern: ValuePattern,
    /// Larger parents are not read.
    pub max_bytes: u64,
}

/// The values of one parent object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extracted {
    /// Accepted values, distinct, in document order.
    pub values: Vec<String>,
    /// The first [`MAX_REJECTED_KEPT`] rejected candidates, in document order.
    pub rejected: Vec<Rejected>,
    /// Rejected candidates beyond those kept in `rejected`.
    pub rejected_omitted: usize,
    /// Accepted values seen again after their first occurrence (dropped).
    pub duplicates: usize,
    /// Why the whole object could not be read (too large, not UTF-8, invalid JSON,
    /// missing CSV column); `values` is empty then.
    pub error: Option<String>,
}

impl Extracted {
    /// Every rejected candidate, kept or only counted.
    pub fn rejected_total(&self) -> usize {
        self.rejected.len() + self.rejected_omitted
    }
}

/// A candidate value that was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The candidate, escaped (`\xNN` for bytes that are not UTF-8, `\n`, `\u{..}`),
    /// at most [`MAX_EXCERPT_CHARS`] characters.
    pub excerpt: String,
    /// Why, for people: `contains `/`, outside [A-Za-z0-9._-]`.
    pub reason: String,
}

impl Extractor {
    /// Reads the values out of one parent object's bytes. Never panics.
    pub fn extract(&self, bytes: &[u8]) -> Extracted {
        let mut c = Collector {
            extractor: self,
            seen: HashSet::new(),
            out: Extracted::default(),
        };
        let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        let result = if len > self.max_bytes {
            Err(format!(
                "the object has {len} bytes, more than max_bytes ({})",
                self.max_bytes
            ))
        } else {
            let body = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
            match &self.extraction {
                Extraction::Json(path) => json(path, body, &mut c),
                Extraction::Csv(col) => csv_column(col, body, &mut c),
                Extraction::Lines => {
                    lines(body, &mut c);
                    Ok(())
                }
            }
        };
        let mut out = c.out;
        if let Err(e) = result {
            out.values.clear();
            out.duplicates = 0;
            out.error = Some(e);
        }
        out
    }

    /// Checks one candidate: the safe-value rule first, then the pattern. Returns the
    /// value, or why it is rejected.
    pub fn check<'a>(&self, raw: &'a [u8]) -> Result<&'a str, String> {
        if raw.is_empty() {
            return Err("empty".into());
        }
        if raw.len() > MAX_VALUE_LEN {
            return Err(format!(
                "{} bytes long, more than {MAX_VALUE_LEN}",
                raw.len()
            ));
        }
        let Ok(s) = std::str::from_utf8(raw) else {
            return Err("not valid UTF-8".into());
        };
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            let shown = match c {
                ' ' => "a space".to_owned(),
                '`' => "a backtick".to_owned(),
                _ => format!("`{}`", c.escape_default()),
            };
            return Err(format!("contains {shown}, outside [A-Za-z0-9._-]"));
        }
        if s.bytes().all(|b| b == b'.') {
            return Err("only dots (a path component, not a value)".into());
        }
        if !self.pattern.is_match(s) {
            return Err(format!(
                "does not match pattern `{}`",
                excerpt(self.pattern.as_str().as_bytes())
            ));
        }
        debug_assert!(is_valid_value(s));
        Ok(s)
    }
}

/// Accumulates the candidates of one object.
struct Collector<'e> {
    extractor: &'e Extractor,
    seen: HashSet<String>,
    out: Extracted,
}

impl Collector<'_> {
    fn candidate(&mut self, raw: &[u8]) {
        match self.extractor.check(raw) {
            Ok(value) => {
                if self.seen.contains(value) {
                    self.out.duplicates += 1;
                } else {
                    self.seen.insert(value.to_owned());
                    self.out.values.push(value.to_owned());
                }
            }
            Err(reason) => self.reject(excerpt(raw), reason),
        }
    }

    fn reject(&mut self, excerpt: String, reason: String) {
        if self.out.rejected.len() < MAX_REJECTED_KEPT {
            self.out.rejected.push(Rejected { excerpt, reason });
        } else {
            self.out.rejected_omitted += 1;
        }
    }
}

/// Values at `path` in a JSON document.
fn json(path: &JsonPath, bytes: &[u8], c: &mut Collector<'_>) -> Result<(), String> {
    use serde_json::Value as J;
    let text = std::str::from_utf8(bytes)
        .map_err(|e| format!("not valid UTF-8 (at byte {})", e.valid_up_to()))?;
    // serde_json limits nesting depth, so hostile documents cannot exhaust the stack.
    let root: J = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let mut nodes: Vec<&J> = vec![&root];
    for segment in &path.segments {
        let mut next = Vec::new();
        for node in nodes {
            match (segment, node) {
                (PathSegment::Any, J::Array(items)) => next.extend(items.iter()),
                (PathSegment::Any, J::Object(members)) => next.extend(members.values()),
                (PathSegment::Member(name), J::Object(members)) => next.extend(members.get(name)),
                (PathSegment::Member(name), J::Array(items)) => {
                    if let Some(i) = array_index(name) {
                        next.extend(items.get(i));
                    }
                }
                _ => {}
            }
        }
        nodes = next;
    }
    for node in nodes {
        match node {
            J::String(s) => c.candidate(s.as_bytes()),
            J::Number(n) => match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => c.candidate(u.to_string().as_bytes()),
                (None, Some(i)) => c.candidate(i.to_string().as_bytes()),
                (None, None) => c.reject(
                    excerpt(n.to_string().as_bytes()),
                    "a JSON number that is not an integer".into(),
                ),
            },
            J::Bool(b) => c.reject(
                b.to_string(),
                "a JSON boolean, not a string or integer".into(),
            ),
            J::Null => c.reject("null".into(), "a JSON null, not a string or integer".into()),
            J::Array(items) => c.reject(
                format!("[{} elements]", items.len()),
                "a JSON array, not a string or integer".into(),
            ),
            J::Object(members) => c.reject(
                format!("{{{} members}}", members.len()),
                "a JSON object, not a string or integer".into(),
            ),
        }
    }
    Ok(())
}

/// A canonical array index (`0`, `17`; not `01` or `+1`).
fn array_index(s: &str) -> Option<usize> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    canonical.then(|| s.parse().ok()).flatten()
}

/// Values of one CSV column; fields are trimmed of surrounding ASCII whitespace.
fn csv_column(col: &CsvColumn, bytes: &[u8], c: &mut Collector<'_>) -> Result<(), String> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(bytes);
    let mut records = reader.byte_records();
    let index = match (&col.column, col.header) {
        (Column::Index(i), false) => *i,
        (Column::Name(_), false) => return Err("a column name needs a header row".into()),
        (column, true) => {
            let header = match records.next() {
                None => return Ok(()),
                Some(Err(e)) => return Err(format!("not valid CSV: {e}")),
                Some(Ok(h)) => h,
            };
            match column {
                Column::Index(i) => *i,
                Column::Name(name) => header
                    .iter()
                    .position(|h| h.trim_ascii() == name.as_bytes())
                    .ok_or_else(|| {
                        let names: Vec<String> = header
                            .iter()
                            .take(20)
                            .map(|h| excerpt(h.trim_ascii()))
                            .collect();
                        format!(
                            "no column `{}` in the header (columns: {})",
                            excerpt(name.as_bytes()),
                            names.join(", ")
                        )
                    })?,
            }
        }
    };
    for record in records {
        let record = record.map_err(|e| format!("not valid CSV: {e}"))?;
        match record.get(index) {
            Some(field) => c.candidate(field.trim_ascii()),
            None => {
                let line = record.position().map_or(0, csv::Position::line);
                let row: Vec<&[u8]> = record.iter().collect();
                c.reject(
                    excerpt(&row.join(&b","[..])),
                    format!(
                        "the row on line {line} has {} fields, no column {index}",
                        record.len()
                    ),
                );
            }
        }
    }
    Ok(())
}

/// One value per line, trimmed; empty lines and lines starting with `#` are skipped.
fn lines(bytes: &[u8], c: &mut Collector<'_>) {
    for line in bytes.split(|&b| b == b'\n') {
        let line = line.trim_ascii();
        if line.is_empty() || line.starts_with(b"#") {
            continue;
        }
        c.candidate(line);
    }
}

/// `raw` escaped for messages and cut to at most [`MAX_EXCERPT_CHARS`] characters
/// (ending in `...` when cut): printable ASCII as is, `\\` doubled, other characters as
/// Rust escapes, bytes that are not UTF-8 as `\xNN`.
pub fn excerpt(raw: &[u8]) -> String {
    const ELLIPSIS: &str = "...";
    let mut out = String::new();
    // The longest prefix, at a piece boundary, that leaves room for the ellipsis.
    let mut cut = 0;
    let mut push = |piece: &str, out: &mut String| -> bool {
        out.push_str(piece);
        if out.len() <= MAX_EXCERPT_CHARS - ELLIPSIS.len() {
            cut = out.len();
        }
        if out.len() > MAX_EXCERPT_CHARS {
            out.truncate(cut);
            out.push_str(ELLIPSIS);
            return false;
        }
        true
    };
    for chunk in raw.utf8_chunks() {
        for ch in chunk.valid().chars() {
            let piece = match ch {
                '\\' => "\\\\".to_owned(),
                c if c == ' ' || c.is_ascii_graphic() => c.to_string(),
                c => c.escape_default().to_string(),
            };
            if !push(&piece, &mut out) {
                return out;
            }
        }
        for b in chunk.invalid() {
            if !push(&format!("\\x{b:02x}"), &mut out) {
                return out;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn extractor(extraction: Extraction) -> Extractor {
        Extractor {
            extraction,
            pattern: ValuePattern::default(),
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }

    fn json_at(path: &str) -> Extractor {
        extractor(Extraction::Json(path.parse().unwrap()))
    }

    fn csv_by(column: Column, header: bool) -> Extractor {
        extractor(Extraction::Csv(CsvColumn { column, header }))
    }

    fn reasons(e: &Extracted) -> Vec<(&str, &str)> {
        e.rejected
            .iter()
            .map(|r| (r.excerpt.as_str(), r.reason.as_str()))
            .collect()
    }

    #[test]
    fn json_wildcards_walk_arrays_and_objects_in_order() {
        let doc = br#"{"events": [{"id": "401584893"}, {"id": 401584894}, {"name": "x"}, {"id": "401584895"}]}"#;
        let e = json_at("/events/*/id").extract(doc);
        assert_eq!(e.values, ["401584893", "401584894", "401584895"]);
        assert!(e.rejected.is_empty() && e.error.is_none(), "{e:?}");

        let nested = br#"{"data": [{"games": [{"gameId": "0022400061"}, {"gameId": "0022400062"}]}, {"games": []}, {"games": [{"gameId": "0022400063"}]}]}"#;
        let e = json_at("/data/*/games/*/gameId").extract(nested);
        assert_eq!(e.values, ["0022400061", "0022400062", "0022400063"]);

        let by_member = br#"{"byDay": {"d1": {"id": "a1"}, "d2": {"id": "b2"}}}"#;
        let e = json_at("/byDay/*/id").extract(by_member);
        let mut values = e.values.clone();
        values.sort();
        assert_eq!(values, ["a1", "b2"]);

        let indexed = br#"{"events": [{"id": "first"}, {"id": "second"}]}"#;
        assert_eq!(json_at("/events/1/id").extract(indexed).values, ["second"]);
        assert!(json_at("/events/01/id").extract(indexed).values.is_empty());
        assert_eq!(json_at("").extract(br#""solo""#).values, ["solo"]);
        assert_eq!(
            json_at("/a~1b/c~0d")
                .extract(br#"{"a/b": {"c~d": "x"}}"#)
                .values,
            ["x"]
        );
    }

    #[test]
    fn json_integers_become_decimal_text_and_other_kinds_are_rejected() {
        let doc =
            br#"{"v": [7, -3, 18446744073709551615, 1.5, 1e3, true, null, [1], {"a": 1}, "ok"]}"#;
        let e = json_at("/v/*").extract(doc);
        assert_eq!(e.values, ["7", "-3", "18446744073709551615", "ok"]);
        let r = reasons(&e);
        assert_eq!(r.len(), 6, "{r:?}");
        assert_eq!(r[0], ("1.5", "a JSON number that is not an integer"));
        assert_eq!(r[1].1, "a JSON number that is not an integer");
        assert_eq!(r[2], ("true", "a JSON boolean, not a string or integer"));
        assert_eq!(r[3], ("null", "a JSON null, not a string or integer"));
        assert_eq!(
            r[4],
            ("[1 elements]", "a JSON array, not a string or integer")
        );
        assert_eq!(
            r[5],
            ("{1 members}", "a JSON object, not a string or integer")
        );
    }

    #[test]
    fn hostile_values_are_rejected_each_with_a_reason() {
        let long = "x".repeat(10 * 1024);
        let doc = serde_json::json!({"ids": [
            "../../etc/passwd", "a;rm -rf /", long, "", "...", ".", "$(id)", "a b",
            "é", "a\nb", "ok-1", "`x`"
        ]});
        let e = json_at("/ids/*").extract(doc.to_string().as_bytes());
        assert_eq!(e.values, ["ok-1"]);
        let r = reasons(&e);
        assert_eq!(
            r,
            [
                ("../../etc/passwd", "contains `/`, outside [A-Za-z0-9._-]"),
                ("a;rm -rf /", "contains `;`, outside [A-Za-z0-9._-]"),
                (
                    format!("{}...", "x".repeat(77)).as_str(),
                    "10240 bytes long, more than 128"
                ),
                ("", "empty"),
                ("...", "only dots (a path component, not a value)"),
                (".", "only dots (a path component, not a value)"),
                ("$(id)", "contains `$`, outside [A-Za-z0-9._-]"),
                ("a b", "contains a space, outside [A-Za-z0-9._-]"),
                ("\\u{e9}", "contains `\\u{e9}`, outside [A-Za-z0-9._-]"),
                ("a\\nb", "contains `\\n`, outside [A-Za-z0-9._-]"),
                ("`x`", "contains a backtick, outside [A-Za-z0-9._-]"),
            ]
        );
        for r in &e.rejected {
            assert!(r.excerpt.chars().count() <= MAX_EXCERPT_CHARS, "{r:?}");
        }
    }

    #[test]
    fn a_pattern_narrows_but_never_widens() {
        let mut ex = json_at("/*");
        ex.pattern = "[0-9]{9}".parse().unwrap();
        let e = ex.extract(br#"["401584893", "40158489", "4015848931", "abc", "401584893x"]"#);
        assert_eq!(e.values, ["401584893"]);
        assert_eq!(e.rejected_total(), 4);
        assert_eq!(e.rejected[0].reason, "does not match pattern `[0-9]{9}`");

        // Even a pattern that accepts anything keeps hostile values out.
        ex.pattern = ".*".parse().unwrap();
        let e = ex.extract(br#"["../x", "a;b", "", "..", "fine"]"#);
        assert_eq!(e.values, ["fine"]);
        assert_eq!(e.rejected.len(), 4);

        // Anchors cannot be escaped by unbalanced groups.
        assert!("a)|(b".parse::<ValuePattern>().is_err());
        let p: ValuePattern = "a|b".parse().unwrap();
        assert!(p.is_match("a") && p.is_match("b"));
        assert!(!p.is_match("ab") && !p.is_match("xa"));
        let err = "[0-9".parse::<ValuePattern>().unwrap_err();
        assert!(err.starts_with("invalid pattern `[0-9`: "), "{err}");
        assert!(!err.contains('\n'), "{err}");
        assert!("".parse::<ValuePattern>().is_err());
        assert_eq!(ValuePattern::default().as_str(), DEFAULT_PATTERN);
        assert!(ValuePattern::default().is_match(&"x".repeat(128)));
        assert!(!ValuePattern::default().is_match(&"x".repeat(129)));
    }

    #[test]
    fn duplicates_are_counted_and_dropped_keeping_first_order() {
        let e = json_at("/*").extract(br#"["b", "a", "b", 5, "5", "a"]"#);
        assert_eq!(e.values, ["b", "a", "5"]);
        assert_eq!(e.duplicates, 3);
    }

    #[test]
    fn unreadable_json_is_an_error_for_the_whole_object() {
        let e = json_at("/*").extract(b"[\"ok\", \"\xff\xfe\"]");
        assert_eq!(e.error.as_deref(), Some("not valid UTF-8 (at byte 8)"));
        assert!(e.values.is_empty());
        let e = json_at("/*").extract(br#"["ok", "#);
        assert!(
            e.error.as_deref().unwrap().starts_with("not valid JSON: "),
            "{e:?}"
        );
        assert!(e.values.is_empty());
        let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
        let e = json_at("/*").extract(deep.as_bytes());
        assert!(
            e.error.is_some(),
            "deep nesting is refused, not a stack overflow"
        );
        // A byte order mark is not part of the document.
        assert_eq!(json_at("/*").extract(b"\xEF\xBB\xBF[\"a\"]").values, ["a"]);
    }

    #[test]
    fn objects_over_max_bytes_are_not_read() {
        let mut ex = extractor(Extraction::Lines);
        ex.max_bytes = 10;
        let e = ex.extract(b"a\nb\nc\nd\ne\nf\n");
        assert_eq!(
            e.error.as_deref(),
            Some("the object has 12 bytes, more than max_bytes (10)")
        );
        assert!(e.values.is_empty());
        assert_eq!(ex.extract(b"a\nb\n").values, ["a", "b"]);
    }

    #[test]
    fn huge_inputs_keep_bounded_rejections() {
        let mut doc = Vec::new();
        for i in 0..10_000 {
            doc.extend_from_slice(format!("bad;{i}\n").as_bytes());
        }
        doc.extend_from_slice(b"good\n");
        let e = extractor(Extraction::Lines).extract(&doc);
        assert_eq!(e.values, ["good"]);
        assert_eq!(e.rejected.len(), MAX_REJECTED_KEPT);
        assert_eq!(e.rejected_omitted, 10_000 - MAX_REJECTED_KEPT);
        assert_eq!(e.rejected_total(), 10_000);
    }

    #[test]
    fn csv_by_header_name_and_by_index() {
        let doc = b"date,game_id,home\n2024-10-22, 0022400061 ,BOS\n\n2024-10-22,\"0022400062\",LAL\n2024-10-23,a;b,NYK\n2024-10-24\n";
        let e = csv_by(Column::Name("game_id".into()), true).extract(doc);
        assert_eq!(e.values, ["0022400061", "0022400062"]);
        assert_eq!(
            reasons(&e),
            [
                ("a;b", "contains `;`, outside [A-Za-z0-9._-]"),
                ("2024-10-24", "the row on line 6 has 1 fields, no column 1")
            ]
        );
        let e = csv_by(Column::Index(2), true).extract(doc);
        assert_eq!(e.values, ["BOS", "LAL", "NYK"]);
        let e = csv_by(Column::Index(0), false).extract(b"401\n402\n401\n");
        assert_eq!(e.values, ["401", "402"]);
        assert_eq!(e.duplicates, 1);
        // A byte order mark before the header does not hide the first column's name.
        let e = csv_by(Column::Name("id".into()), true).extract(b"\xEF\xBB\xBFid,x\n7,8\n");
        assert_eq!(e.values, ["7"]);
        // Bytes that are not UTF-8 reject one field, not the file.
        let e = csv_by(Column::Index(0), false).extract(b"ok\n\xff\xfe\n");
        assert_eq!(e.values, ["ok"]);
        assert_eq!(reasons(&e), [("\\xff\\xfe", "not valid UTF-8")]);
    }

    #[test]
    fn csv_without_the_named_column_is_an_error() {
        let e = csv_by(Column::Name("game_id".into()), true).extract(b"date,id\n1,2\n");
        assert_eq!(
            e.error.as_deref(),
            Some("no column `game_id` in the header (columns: date, id)")
        );
        let e = csv_by(Column::Name("game_id".into()), false).extract(b"1\n");
        assert_eq!(e.error.as_deref(), Some("a column name needs a header row"));
        let e = csv_by(Column::Name("game_id".into()), true).extract(b"");
        assert!(e.error.is_none() && e.values.is_empty());
    }

    #[test]
    fn lines_are_trimmed_and_skip_blanks_and_comments() {
        let e = extractor(Extraction::Lines).extract(
            b"# game ids\n401584893\r\n\n   \n  401584894  \n#401584895\nbad value\n\xc3\x28\n",
        );
        assert_eq!(e.values, ["401584893", "401584894"]);
        assert_eq!(
            reasons(&e),
            [
                ("bad value", "contains a space, outside [A-Za-z0-9._-]"),
                ("\\xc3(", "not valid UTF-8"),
            ]
        );
    }

    #[test]
    fn json_paths_parse_or_explain() {
        assert!("/events/*/id".parse::<JsonPath>().is_ok());
        for (bad, why) in [
            ("events/*/id", "starts with `/`"),
            ("/events//id", "empty segment"),
            ("/events/", "empty segment"),
            ("/a~2", "`~` must be followed by 0"),
        ] {
            let err = bad.parse::<JsonPath>().unwrap_err();
            assert!(
                err.starts_with(&format!("invalid JSON path `{bad}`")),
                "{err}"
            );
            assert!(err.contains(why), "{err}");
        }
    }

    #[test]
    fn excerpts_escape_and_stay_short() {
        assert_eq!(excerpt(b"plain text"), "plain text");
        assert_eq!(excerpt(b"a\\b\t\x00\xff"), "a\\\\b\\t\\u{0}\\xff");
        let long = excerpt(&[0xff; 100]);
        assert!(long.ends_with("..."), "{long}");
        assert!(long.chars().count() <= MAX_EXCERPT_CHARS, "{long}");
        assert!(long.starts_with("\\xff\\xff"), "{long}");
        assert!(
            !long.trim_end_matches("...").ends_with('\\'),
            "escapes are never cut: {long}"
        );
        assert_eq!(
            excerpt(&[b'x'; 80]).len(),
            80,
            "exactly the limit is not cut"
        );
    }

    fn every_extractor() -> Vec<Extractor> {
        vec![
            json_at("/*"),
            json_at("/events/*/id"),
            json_at("/*/*/*"),
            csv_by(Column::Name("id".into()), true),
            csv_by(Column::Index(1), false),
            extractor(Extraction::Lines),
        ]
    }

    fn assert_sound(e: &Extracted) -> Result<(), TestCaseError> {
        let mut seen = HashSet::new();
        for v in &e.values {
            prop_assert!(is_valid_value(v), "{v:?}");
            prop_assert!(seen.insert(v), "duplicate {v:?}");
        }
        prop_assert!(e.rejected.len() <= MAX_REJECTED_KEPT);
        for r in &e.rejected {
            prop_assert!(r.excerpt.chars().count() <= MAX_EXCERPT_CHARS);
        }
        if e.error.is_some() {
            prop_assert!(e.values.is_empty());
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn extract_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            for ex in every_extractor() {
                assert_sound(&ex.extract(&bytes))?;
            }
        }

        #[test]
        fn extract_never_panics_on_json_like_text(text in r#"[\[\]{}":,0-9a-z./ \\~*;$-]{0,300}"#) {
            for ex in every_extractor() {
                assert_sound(&ex.extract(text.as_bytes()))?;
            }
        }

        #[test]
        fn excerpt_is_bounded_for_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let e = excerpt(&bytes);
            prop_assert!(e.chars().count() <= MAX_EXCERPT_CHARS);
            prop_assert!(e.is_ascii());
        }
    }
}
