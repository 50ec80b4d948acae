//! String templates with `{name}` and `{name:FORMAT}` placeholders: object key
//! templates, scraper argv and env values.
//!
//! Syntax: literal text, `{name}` placeholders (`name` is `[A-Za-z_][A-Za-z0-9_]*`),
//! `{name:FORMAT}` where FORMAT is a chrono strftime format applied to a date value,
//! and `{{` / `}}` for literal braces. Everything that can be wrong with a template
//! (unclosed braces, bad names, a format chrono rejects or that needs a time of day)
//! is rejected by [`Template::parse`], so rendering a parsed template can only fail
//! for a missing variable or a format applied to a value that is not a date; rendering
//! an object key ([`Template::render_partition`]) also fails for a key the lake would
//! refuse, whatever the values hold.
//!
//! Templates also match backwards ([`Template::match_key`]): a key rendered from a
//! template is split into its variables again, which is how dependent sources find the
//! variables of the parent objects they read. [`Template::check_matchable`] says whether
//! a template can be matched at all.

use std::fmt::{self, Write as _};

use chrono::NaiveDate;
use chrono::format::{Item, StrftimeItems};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::model::{MAX_VALUE_LEN, Partition, Value, is_valid_value, validate_key};

/// Why a template could not be parsed or rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// A `{` without its closing `}`.
    #[error("unclosed `{{` at character {at}")]
    Unclosed {
        /// 0-based character offset of the `{`.
        at: usize,
    },
    /// A single `}` that closes nothing.
    #[error("unmatched `}}` at character {at} (write `}}}}` for a literal brace)")]
    UnmatchedClose {
        /// 0-based character offset of the `}`.
        at: usize,
    },
    /// A placeholder name that is not an identifier.
    #[error("invalid placeholder name `{name}` at character {at}: expected [A-Za-z_][A-Za-z0-9_]*")]
    InvalidName {
        /// The name as written.
        name: String,
        /// 0-based character offset of the placeholder's `{`.
        at: usize,
    },
    /// A strftime format chrono cannot parse (for example `%Q`).
    #[error("invalid date format `{format}` for `{name}`: unknown or incomplete specifier")]
    InvalidFormat {
        /// The placeholder's variable.
        name: String,
        /// The format as written.
        format: String,
    },
    /// A strftime format that needs more than a date (a time of day or an offset).
    #[error(
        "date format `{format}` for `{name}` needs a time or time zone; only date specifiers are allowed"
    )]
    FormatNeedsTime {
        /// The placeholder's variable.
        name: String,
        /// The format as written.
        format: String,
    },
    /// `{name:}` with an empty format.
    #[error("empty date format for `{name}`")]
    EmptyFormat {
        /// The placeholder's variable.
        name: String,
    },
    /// Rendering found no value for a placeholder.
    #[error("no value for `{{{name}}}`")]
    MissingVar {
        /// The placeholder's variable.
        name: String,
    },
    /// Two placeholders follow each other without literal text between them, so a key
    /// cannot be split back into their values.
    #[error(
        "`{{{first}}}` and `{{{second}}}` follow each other without literal text between them, so keys cannot be split back into their values"
    )]
    Adjacent {
        /// The first placeholder's variable.
        first: String,
        /// The second placeholder's variable.
        second: String,
    },
    /// No occurrence of a date variable determines a whole date, so keys cannot be
    /// parsed back into dates.
    #[error(
        "date format `{format}` for `{name}` does not determine a whole date, so keys cannot be parsed back (use a year with a month and day or a day of the year, e.g. %Y%m%d)"
    )]
    Unmatchable {
        /// The date variable.
        name: String,
        /// Its first format.
        format: String,
    },
    /// Rendering found a format on a value that is not a date.
    #[error("`{{{name}:{format}}}` formats a date, but `{name}` is `{value}`, not a date")]
    NotADate {
        /// The placeholder's variable.
        name: String,
        /// The format as written.
        format: String,
        /// The value found.
        value: String,
    },
    /// A rendered object key that the lake would refuse (see
    /// [`crate::model::validate_key`]), e.g. one with a `..` segment or too long.
    #[error("rendered object key {key:?} is not a safe key: {reason}")]
    UnsafeKey {
        /// The key as rendered, cut to [`MAX_KEY_EXCERPT`] characters.
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// The most characters of an unsafe rendered key that an error keeps.
pub const MAX_KEY_EXCERPT: usize = 200;

/// A value a placeholder can render.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arg<'a> {
    /// A date: rendered `YYYY-MM-DD`, or with the placeholder's format.
    Date(NaiveDate),
    /// Text, rendered as is. A format applies only if the text is a `YYYY-MM-DD` date.
    Text(&'a str),
}

impl<'a> From<&'a Value> for Arg<'a> {
    fn from(v: &'a Value) -> Self {
        match v {
            Value::Date(d) => Arg::Date(*d),
            Value::Str(s) => Arg::Text(s),
        }
    }
}

/// One `{name}` or `{name:FORMAT}` placeholder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placeholder {
    name: String,
    format: Option<DateFormat>,
}

/// A validated strftime format for dates.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DateFormat {
    text: String,
    items: Vec<Item<'static>>,
}

impl Placeholder {
    /// The variable's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The strftime format, if any.
    pub fn format(&self) -> Option<&str> {
        self.format.as_ref().map(|f| f.text.as_str())
    }

    /// Appends the rendering of `arg` to `out`.
    pub fn render_into(&self, arg: Arg<'_>, out: &mut String) -> Result<(), TemplateError> {
        let Some(format) = &self.format else {
            match arg {
                Arg::Date(d) => push_date(out, d, DEFAULT_DATE_FORMAT),
                Arg::Text(s) => out.push_str(s),
            }
            return Ok(());
        };
        let date = match arg {
            Arg::Date(d) => Some(d),
            Arg::Text(s) => parse_iso_date(s),
        };
        let Some(date) = date else {
            let value = match arg {
                Arg::Text(s) => s.chars().take(64).collect(),
                Arg::Date(d) => d.to_string(),
            };
            return Err(TemplateError::NotADate {
                name: self.name.clone(),
                format: format.text.clone(),
                value,
            });
        };
        // Formats are checked against a sample date at parse time, so this write cannot fail.
        if write!(out, "{}", date.format_with_items(format.items.iter())).is_err() {
            return Err(TemplateError::FormatNeedsTime {
                name: self.name.clone(),
                format: format.text.clone(),
            });
        }
        Ok(())
    }
}

/// How a date renders without a format.
const DEFAULT_DATE_FORMAT: &str = "%Y-%m-%d";

/// The variable that matches as a date even without a format (the default variable of
/// a `dates` generator).
pub const DATE_VAR: &str = "date";

/// The longest text a date placeholder captures when matching a key.
const MAX_DATE_CAPTURE: usize = 64;

/// The most splits [`Template::match_key`] tries for one key before giving up; ordinary
/// keys need a handful, only adversarial ones come close.
const MAX_MATCH_STEPS: usize = 10_000;

/// Dates a format must round-trip to count as determining a whole date.
const ROUND_TRIP_PROBES: [(i32, u32, u32); 3] = [(2001, 2, 3), (1999, 12, 31), (2024, 10, 9)];

fn push_date(out: &mut String, d: NaiveDate, fmt: &str) {
    // `%Y-%m-%d` needs nothing but a date, so formatting cannot fail.
    let _ = write!(out, "{}", d.format(fmt));
}

/// Parses a strict `YYYY-MM-DD` date.
pub(crate) fn parse_iso_date(s: &str) -> Option<NaiveDate> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = s.get(r)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let year = i32::try_from(digits(0..4)?).ok()?;
    NaiveDate::from_ymd_opt(year, digits(5..7)?, digits(8..10)?)
}

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Literal text (braces already unescaped).
    Text(String),
    /// A placeholder.
    Var(Placeholder),
}

/// A parsed template; it keeps its source text for display and serialization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    pieces: Vec<Piece>,
}

impl Template {
    /// Parses `source`, validating placeholder names and date formats.
    pub fn parse(source: &str) -> Result<Template, TemplateError> {
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut chars = source.chars().enumerate().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, n)| n) == Some('{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek().map(|&(_, n)| n) == Some('}') => {
                    chars.next();
                    text.push('}');
                }
                '}' => return Err(TemplateError::UnmatchedClose { at }),
                '{' => {
                    let mut inner = String::new();
                    let mut closed = false;
                    for (_, n) in chars.by_ref() {
                        match n {
                            '}' => {
                                closed = true;
                                break;
                            }
                            '{' => return Err(TemplateError::Unclosed { at }),
                            _ => inner.push(n),
                        }
                    }
                    if !closed {
                        return Err(TemplateError::Unclosed { at });
                    }
                    if !text.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut text)));
                    }
                    pieces.push(Piece::Var(parse_placeholder(&inner, at)?));
                }
                _ => text.push(c),
            }
        }
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        Ok(Template {
            source: source.to_owned(),
            pieces,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The parsed pieces, in order.
    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// The placeholders, in order (a variable used twice appears twice).
    pub fn placeholders(&self) -> impl Iterator<Item = &Placeholder> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Var(v) => Some(v),
            Piece::Text(_) => None,
        })
    }

    /// The variable names the template uses, in order of first use.
    pub fn vars(&self) -> impl Iterator<Item = &str> {
        let mut seen: Vec<&str> = Vec::new();
        self.placeholders().filter_map(move |p| {
            if seen.contains(&p.name.as_str()) {
                None
            } else {
                seen.push(&p.name);
                Some(p.name.as_str())
            }
        })
    }

    /// The literal text before the first placeholder (the whole text if there is none):
    /// the prefix under which every rendering of the template lies.
    pub fn literal_prefix(&self) -> &str {
        match self.pieces.first() {
            Some(Piece::Text(t)) => t,
            _ => "",
        }
    }

    /// Renders the template, asking `lookup` for each placeholder's value.
    pub fn render<'v>(
        &self,
        lookup: &dyn Fn(&str) -> Option<Arg<'v>>,
    ) -> Result<String, TemplateError> {
        let mut out = String::with_capacity(self.source.len() + 16);
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Var(p) => {
                    let arg = lookup(&p.name).ok_or_else(|| TemplateError::MissingVar {
                        name: p.name.clone(),
                    })?;
                    p.render_into(arg, &mut out)?;
                }
            }
        }
        Ok(out)
    }

    /// Renders an object key with a partition's variables. The key is checked with
    /// [`crate::model::validate_key`], so a key the lake would refuse (a `..` or empty
    /// segment, a leading `/`, a backslash, a control character, more than
    /// [`crate::model::MAX_KEY_LEN`] bytes) is an [`TemplateError::UnsafeKey`], never an
    /// `Ok`, whatever the partition's values hold.
    pub fn render_partition(&self, partition: &Partition) -> Result<String, TemplateError> {
        let key = self.render(&|name| partition.get(name).map(Arg::from))?;
        if let Err(e) = validate_key(&key) {
            return Err(TemplateError::UnsafeKey {
                key: key.chars().take(MAX_KEY_EXCERPT).collect(),
                reason: e.reason,
            });
        }
        Ok(key)
    }

    /// Whether variable `name` holds a date when keys are matched: it has a format in
    /// some placeholder, or it is named `date` (and then, unformatted, is `YYYY-MM-DD`).
    pub fn is_date_var(&self, name: &str) -> bool {
        name == DATE_VAR
            || self
                .placeholders()
                .any(|p| p.name == name && p.format.is_some())
    }

    /// Checks that keys rendered from this template can be split back into their
    /// variables: a literal separates every two placeholders, and every date variable
    /// has an occurrence whose format determines a whole date.
    pub fn check_matchable(&self) -> Result<(), TemplateError> {
        for pair in self.pieces.windows(2) {
            if let [Piece::Var(a), Piece::Var(b)] = pair {
                return Err(TemplateError::Adjacent {
                    first: a.name.clone(),
                    second: b.name.clone(),
                });
            }
        }
        for name in self.vars().filter(|n| self.is_date_var(n)) {
            let occurrences: Vec<&Placeholder> =
                self.placeholders().filter(|p| p.name == name).collect();
            if !occurrences.iter().any(|p| p.determines_date()) {
                let format = occurrences
                    .iter()
                    .find_map(|p| p.format().map(str::to_owned))
                    .unwrap_or_default();
                return Err(TemplateError::Unmatchable {
                    name: name.to_owned(),
                    format,
                });
            }
        }
        Ok(())
    }

    /// Splits `key` into the template's variables, in order of first use: the inverse of
    /// rendering. Text variables match `[A-Za-z0-9._-]{1,128}` (not only dots); date
    /// variables (see [`Template::is_date_var`]) match text their format parses into a
    /// date and renders back exactly. `None` when the key does not match, when it
    /// matches in more than one way (`{a}.{b}` against `x.y.z`), or when the template
    /// fails [`Template::check_matchable`].
    pub fn match_key(&self, key: &str) -> Option<Vec<(String, Value)>> {
        // Most keys of a listing fail on the literal ends; they cost no allocation.
        if !key.starts_with(self.literal_prefix()) {
            return None;
        }
        if let Some(Piece::Text(last)) = self.pieces.last()
            && !key.ends_with(last.as_str())
        {
            return None;
        }
        if self
            .pieces
            .windows(2)
            .any(|w| matches!(w, [Piece::Var(_), Piece::Var(_)]))
        {
            return None;
        }
        let names: Vec<&str> = self.vars().collect();
        let mut m = Matcher {
            template: self,
            key,
            date: self
                .pieces
                .iter()
                .map(|p| matches!(p, Piece::Var(v) if self.is_date_var(&v.name)))
                .collect(),
            names,
            captures: Vec::with_capacity(self.pieces.len()),
            found: None,
            ambiguous: false,
            steps: 0,
        };
        m.search(0, 0);
        if m.ambiguous || m.steps > MAX_MATCH_STEPS {
            return None;
        }
        m.found
    }
}

impl Placeholder {
    /// Whether a capture of this placeholder alone yields a whole date: unformatted
    /// (`YYYY-MM-DD`), or a format that round-trips sample dates.
    fn determines_date(&self) -> bool {
        let Some(format) = &self.format else {
            return true;
        };
        ROUND_TRIP_PROBES.iter().all(|&(y, m, d)| {
            let Some(date) = NaiveDate::from_ymd_opt(y, m, d) else {
                return false;
            };
            let mut text = String::new();
            if write!(text, "{}", date.format_with_items(format.items.iter())).is_err() {
                return false;
            }
            NaiveDate::parse_from_str(&text, &format.text) == Ok(date)
        })
    }

    /// The date a capture of this placeholder denotes, if it parses.
    fn parse_date(&self, text: &str) -> Option<NaiveDate> {
        match &self.format {
            None => parse_iso_date(text),
            Some(f) => NaiveDate::parse_from_str(text, &f.text).ok(),
        }
    }
}

/// Whether `b` may appear in a text variable's value.
fn is_value_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

/// A backtracking split of one key along a template's pieces.
struct Matcher<'t, 'k> {
    template: &'t Template,
    key: &'k str,
    /// Per piece: whether it is a date placeholder.
    date: Vec<bool>,
    /// The variables in order of first use.
    names: Vec<&'t str>,
    /// Per placeholder so far: the byte range of its capture.
    captures: Vec<(usize, usize)>,
    found: Option<Vec<(String, Value)>>,
    ambiguous: bool,
    steps: usize,
}

impl Matcher<'_, '_> {
    fn done(&self) -> bool {
        self.ambiguous || self.steps > MAX_MATCH_STEPS
    }

    /// Matches pieces `i..` against `key[pos..]`.
    fn search(&mut self, i: usize, pos: usize) {
        self.steps += 1;
        if self.done() {
            return;
        }
        let pieces = &self.template.pieces;
        let Some(piece) = pieces.get(i) else {
            if pos == self.key.len() {
                self.complete();
            }
            return;
        };
        let rest = &self.key[pos..];
        match piece {
            Piece::Text(t) => {
                if rest.starts_with(t.as_str()) {
                    self.search(i + 1, pos + t.len());
                }
            }
            Piece::Var(_) => {
                let is_date = self.date[i];
                let max = if is_date {
                    MAX_DATE_CAPTURE
                } else {
                    // A text value ends at the first byte it may not contain.
                    MAX_VALUE_LEN.min(
                        rest.bytes()
                            .position(|b| !is_value_byte(b))
                            .unwrap_or(rest.len()),
                    )
                };
                let limit = pos + max.min(rest.len());
                match pieces.get(i + 1) {
                    None => {
                        if limit == self.key.len() && limit > pos {
                            self.capture(i, pos, limit);
                        }
                    }
                    Some(Piece::Text(lit)) => {
                        // Every occurrence of the next literal ends a candidate capture.
                        let mut from = pos + rest.chars().next().map_or(1, char::len_utf8);
                        while from <= limit && !self.done() {
                            let Some(off) = self.key.get(from..).and_then(|r| r.find(lit.as_str()))
                            else {
                                break;
                            };
                            let end = from + off;
                            if end > limit {
                                break;
                            }
                            self.capture(i, pos, end);
                            from = end + self.key[end..].chars().next().map_or(1, char::len_utf8);
                        }
                    }
                    // Adjacent placeholders are refused before the search starts.
                    Some(Piece::Var(_)) => {}
                }
            }
        }
    }

    fn capture(&mut self, i: usize, start: usize, end: usize) {
        self.captures.push((start, end));
        self.search(i + 1, end);
        self.captures.pop();
    }

    /// Turns the captures of one complete split into variables, checks that they render
    /// back to the key, and records them (a second, different result is ambiguous).
    fn complete(&mut self) {
        let placeholders: Vec<&Placeholder> = self.template.placeholders().collect();
        let mut vars: Vec<(String, Value)> = Vec::with_capacity(self.names.len());
        for name in &self.names {
            let mut value = None;
            for (p, &(start, end)) in placeholders.iter().zip(&self.captures) {
                if p.name != *name {
                    continue;
                }
                let text = &self.key[start..end];
                if self.template.is_date_var(name) {
                    if let Some(d) = p.parse_date(text) {
                        value = Some(Value::Date(d));
                        break;
                    }
                } else {
                    if is_valid_value(text) {
                        value = Some(Value::Str(text.to_owned()));
                    }
                    break;
                }
            }
            let Some(value) = value else {
                return;
            };
            vars.push(((*name).to_owned(), value));
        }
        let rendered = self.template.render(&|n| {
            vars.iter()
                .find(|(name, _)| name == n)
                .map(|(_, v)| Arg::from(v))
        });
        if rendered.as_deref() != Ok(self.key) {
            return;
        }
        match &self.found {
            None => self.found = Some(vars),
            Some(first) if *first == vars => {}
            Some(_) => self.ambiguous = true,
        }
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl std::str::FromStr for Template {
    type Err = TemplateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Template::parse(s)
    }
}

/// Whether `name` is a valid placeholder name.
pub fn is_ident(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A date that exercises every field, used to check that a format needs only a date.
const SAMPLE_DATE: (i32, u32, u32) = (2001, 2, 3);

fn parse_placeholder(inner: &str, at: usize) -> Result<Placeholder, TemplateError> {
    let (name, format) = match inner.split_once(':') {
        Some((n, f)) => (n, Some(f)),
        None => (inner, None),
    };
    if !is_ident(name) {
        return Err(TemplateError::InvalidName {
            name: name.chars().take(64).collect(),
            at,
        });
    }
    let format = match format {
        None => None,
        Some("") => {
            return Err(TemplateError::EmptyFormat {
                name: name.to_owned(),
            });
        }
        Some(text) => {
            let items = StrftimeItems::new(text).parse_to_owned().map_err(|_| {
                TemplateError::InvalidFormat {
                    name: name.to_owned(),
                    format: text.to_owned(),
                }
            })?;
            let (y, m, d) = SAMPLE_DATE;
            let sample = NaiveDate::from_ymd_opt(y, m, d).unwrap_or_default();
            let mut probe = String::new();
            if write!(probe, "{}", sample.format_with_items(items.iter())).is_err() {
                return Err(TemplateError::FormatNeedsTime {
                    name: name.to_owned(),
                    format: text.to_owned(),
                });
            }
            Some(DateFormat {
                text: text.to_owned(),
                items,
            })
        }
    };
    Ok(Placeholder {
        name: name.to_owned(),
        format,
    })
}

impl Serialize for Template {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for Template {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Template;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a template string")
            }

            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Template, E> {
                Template::parse(s).map_err(|e| {
                    E::custom(format_args!(
                        "invalid template `{}`: {e}",
                        s.chars().take(200).collect::<String>()
                    ))
                })
            }
        }
        deserializer.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn date(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap()
    }

    #[test]
    fn parses_text_vars_formats_and_escapes() {
        let t = Template::parse("a{{b}}/{date:%Y%m%d}/{id}.json").unwrap();
        assert_eq!(t.literal_prefix(), "a{b}/");
        assert_eq!(t.vars().collect::<Vec<_>>(), ["date", "id"]);
        let p: Vec<_> = t.placeholders().map(|p| (p.name(), p.format())).collect();
        assert_eq!(p, [("date", Some("%Y%m%d")), ("id", None)]);
        let d = date(2024, 10, 22);
        let out = t
            .render(&|n| match n {
                "date" => Some(Arg::Date(d)),
                "id" => Some(Arg::Text("0022400061")),
                _ => None,
            })
            .unwrap();
        assert_eq!(out, "a{b}/20241022/0022400061.json");
        assert_eq!(t.as_str(), "a{{b}}/{date:%Y%m%d}/{id}.json");
    }

    #[test]
    fn literal_prefix_is_whole_text_without_placeholders_and_empty_when_leading() {
        assert_eq!(
            Template::parse("static/teams.json")
                .unwrap()
                .literal_prefix(),
            "static/teams.json"
        );
        assert_eq!(Template::parse("{id}/x").unwrap().literal_prefix(), "");
        assert_eq!(Template::parse("").unwrap().literal_prefix(), "");
    }

    #[test]
    fn vars_are_deduplicated_in_order_of_first_use() {
        let t = Template::parse("{b}{a}{b:%Y}{a}").unwrap();
        assert_eq!(t.vars().collect::<Vec<_>>(), ["b", "a"]);
        assert_eq!(t.placeholders().count(), 4);
    }

    #[test]
    fn date_without_format_renders_iso() {
        let t = Template::parse("{date}").unwrap();
        let d = date(2025, 1, 5);
        assert_eq!(t.render(&|_| Some(Arg::Date(d))).unwrap(), "2025-01-05");
    }

    #[test]
    fn format_applies_to_iso_text_but_not_other_text() {
        let t = Template::parse("{d:%d/%m/%Y}").unwrap();
        assert_eq!(
            t.render(&|_| Some(Arg::Text("2025-01-05"))).unwrap(),
            "05/01/2025"
        );
        let err = t.render(&|_| Some(Arg::Text("2015-16"))).unwrap_err();
        assert!(matches!(err, TemplateError::NotADate { .. }), "{err}");
        assert!(err.to_string().contains("not a date"), "{err}");
    }

    #[test]
    fn missing_var_is_an_error() {
        let t = Template::parse("x/{season}").unwrap();
        let err = t.render(&|_| None).unwrap_err();
        assert_eq!(
            err,
            TemplateError::MissingVar {
                name: "season".into()
            }
        );
        assert_eq!(err.to_string(), "no value for `{season}`");
    }

    #[test]
    fn syntax_errors_are_reported_with_offsets() {
        assert_eq!(
            Template::parse("ab{date").unwrap_err(),
            TemplateError::Unclosed { at: 2 }
        );
        assert_eq!(
            Template::parse("a{b{c}}").unwrap_err(),
            TemplateError::Unclosed { at: 1 }
        );
        assert_eq!(
            Template::parse("a}b").unwrap_err(),
            TemplateError::UnmatchedClose { at: 1 }
        );
        assert!(matches!(
            Template::parse("{}").unwrap_err(),
            TemplateError::InvalidName { at: 0, .. }
        ));
        assert!(matches!(
            Template::parse("x{9a}").unwrap_err(),
            TemplateError::InvalidName { at: 1, .. }
        ));
        assert!(matches!(
            Template::parse("{a-b}").unwrap_err(),
            TemplateError::InvalidName { .. }
        ));
        assert_eq!(
            Template::parse("{d:}").unwrap_err(),
            TemplateError::EmptyFormat { name: "d".into() }
        );
        let msg = Template::parse("{a").unwrap_err().to_string();
        assert_eq!(msg, "unclosed `{` at character 0");
        let msg = Template::parse("a}").unwrap_err().to_string();
        assert!(msg.starts_with("unmatched `}` at character 1"), "{msg}");
    }

    #[test]
    fn unknown_and_time_specifiers_are_rejected_at_parse() {
        let err = Template::parse("{date:%Q}").unwrap_err();
        assert!(
            matches!(err, TemplateError::InvalidFormat { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("%Q"), "{err}");
        assert!(matches!(
            Template::parse("{date:%Y%}").unwrap_err(),
            TemplateError::InvalidFormat { .. }
        ));
        for f in ["%H", "%M:%S", "%s", "%z", "%Z", "%c", "%+", "%T", "%.3f"] {
            let err = Template::parse(&format!("{{date:{f}}}")).unwrap_err();
            assert!(
                matches!(err, TemplateError::FormatNeedsTime { .. }),
                "{f}: {err:?}"
            );
        }
        for f in ["%Y", "%y%m%d", "%b %-d, %Y", "%A %j %U", "%F", "%%"] {
            let t = Template::parse(&format!("{{date:{f}}}")).unwrap();
            assert!(
                t.render(&|_| Some(Arg::Date(date(2024, 2, 29)))).is_ok(),
                "{f}"
            );
        }
    }

    #[test]
    fn serde_round_trips_the_source_text() {
        let t: Template = serde_yaml::from_str("\"a/{d:%Y}/{{x}}\"").unwrap();
        assert_eq!(t.as_str(), "a/{d:%Y}/{{x}}");
        assert_eq!(serde_yaml::to_string(&t).unwrap().trim(), "a/{d:%Y}/{{x}}");
    }

    #[test]
    fn strict_iso_dates_only() {
        assert_eq!(parse_iso_date("2024-02-29"), Some(date(2024, 2, 29)));
        for bad in [
            "2023-02-29",
            "2024-2-29",
            "2024-13-01",
            "20240229",
            "+024-01-01",
            "2024-01-0１",
        ] {
            assert_eq!(parse_iso_date(bad), None, "{bad}");
        }
    }

    fn matched(t: &str, key: &str) -> Option<Vec<(String, Value)>> {
        let t = Template::parse(t).unwrap();
        t.check_matchable().unwrap();
        t.match_key(key)
    }

    fn text(name: &str, v: &str) -> (String, Value) {
        (name.to_owned(), Value::Str(v.to_owned()))
    }

    fn day(name: &str, y: i32, m: u32, d: u32) -> (String, Value) {
        (name.to_owned(), Value::Date(date(y, m, d)))
    }

    #[test]
    fn keys_match_back_into_dates_and_values() {
        assert_eq!(
            matched(
                "espn/schedule/{date:%Y%m%d}.json",
                "espn/schedule/20241022.json"
            ),
            Some(vec![day("date", 2024, 10, 22)])
        );
        assert_eq!(
            matched("s/{date}/x", "s/2024-02-29/x"),
            Some(vec![day("date", 2024, 2, 29)])
        );
        assert_eq!(
            matched(
                "nba/{season}/{team}/{day:%Y/%m/%d}.json",
                "nba/2024-25/BOS/2024/10/22.json"
            ),
            Some(vec![
                text("season", "2024-25"),
                text("team", "BOS"),
                day("day", 2024, 10, 22)
            ])
        );
        assert_eq!(
            matched("box/{game_id}.json", "box/0022400061.json"),
            Some(vec![text("game_id", "0022400061")])
        );
        // A value may contain the literal that follows it, as long as only one split works.
        assert_eq!(
            matched("v/{id}.csv", "v/a.b.csv"),
            Some(vec![text("id", "a.b")])
        );
        assert_eq!(
            matched("{season}-{team}.csv", "2015-16-BOS.csv"),
            None,
            "`2015` + `16-BOS` and `2015-16` + `BOS` both render the key"
        );
        // A partial format is checked against the full one.
        let t = "a/{date:%Y}/{date:%Y%m%d}.json";
        assert_eq!(
            matched(t, "a/2024/20241022.json"),
            Some(vec![day("date", 2024, 10, 22)])
        );
        assert_eq!(matched(t, "a/2023/20241022.json"), None);
        assert_eq!(
            matched("d/{date:%b %-d, %Y}", "d/Oct 2, 2024"),
            Some(vec![day("date", 2024, 10, 2)])
        );
    }

    #[test]
    fn keys_that_do_not_fit_do_not_match() {
        let t = "espn/schedule/{date:%Y%m%d}.json";
        for key in [
            "espn/schedule/20241022.csv",
            "espn/scheduled/20241022.json",
            "espn/schedule/20241322.json",
            "espn/schedule/2024102.json",
            "espn/schedule/+20241022.json",
            "espn/schedule/020241022.json",
            "espn/schedule/.json",
            "espn/schedule/20241022.json.tmp",
            "",
        ] {
            assert_eq!(matched(t, key), None, "{key}");
        }
        assert_eq!(matched("s/{date}", "s/2024-1-02"), None);
        let t = "x/{id}.json";
        let long = format!("x/{}.json", "a".repeat(129));
        for key in [
            "x/.json",
            "x/...json",
            "x/a;b.json",
            "x/a/b.json",
            "x/é.json",
            "x/a b.json",
            long.as_str(),
        ] {
            assert_eq!(matched(t, key), None, "{key}");
        }
        assert!(matched(t, &format!("x/{}.json", "a".repeat(128))).is_some());
        assert_eq!(matched("{a}.{b}.json", "x.y.z.json"), None, "ambiguous");
        assert_eq!(
            matched("{a}.{b}.json", "x.y.json"),
            Some(vec![text("a", "x"), text("b", "y")])
        );
    }

    #[test]
    fn templates_that_cannot_match_back_are_refused() {
        let err = Template::parse("a/{x}{y}.json")
            .unwrap()
            .check_matchable()
            .unwrap_err();
        assert_eq!(
            err,
            TemplateError::Adjacent {
                first: "x".into(),
                second: "y".into()
            }
        );
        assert!(err.to_string().contains("without literal text"), "{err}");
        assert_eq!(Template::parse("a/{x}{y}").unwrap().match_key("a/bc"), None);
        for t in ["{date:%Y}", "{date:%Y-%m}", "{day:%d}.json", "{d:%m%d}"] {
            let err = Template::parse(t).unwrap().check_matchable().unwrap_err();
            assert!(
                matches!(err, TemplateError::Unmatchable { .. }),
                "{t}: {err:?}"
            );
        }
        for t in [
            "{date:%Y-%j}",
            "{d:%y%m%d}",
            "{date}",
            "{x}/{y}",
            "static",
            "{date:%F}",
        ] {
            assert_eq!(Template::parse(t).unwrap().check_matchable(), Ok(()), "{t}");
        }
        let t = Template::parse("{date}/{day:%Y%m%d}/{id}").unwrap();
        assert!(t.is_date_var("date") && t.is_date_var("day") && !t.is_date_var("id"));
    }

    #[test]
    fn adversarial_keys_end_quickly() {
        let t = Template::parse("{a}-{b}-{c}-{d}-{e}.json").unwrap();
        assert_eq!(t.match_key("x-x-x-x-x.json").map(|v| v.len()), Some(5));
        let key = format!("{}.json", vec!["x"; 600].join("-"));
        assert_eq!(t.match_key(&key), None);
        let key = format!("{}.json", vec!["x"; 60].join("-"));
        assert_eq!(t.match_key(&key), None, "ambiguous");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn rendered_keys_match_back(
            y in 1900i32..2100,
            doy in 1u32..366,
            id in "[A-Za-z0-9_-][A-Za-z0-9._-]{0,20}",
            fmt in prop::sample::select(vec!["%Y%m%d", "%Y-%m-%d", "%Y/%m/%d", "%d.%m.%Y", "%Y-%j", "%y%m%d"]),
        ) {
            let d = NaiveDate::from_yo_opt(y, doy).unwrap_or_default();
            let t = Template::parse(&format!("p/{{date:{fmt}}}/{{id}}.json")).unwrap();
            t.check_matchable().unwrap();
            let key = t
                .render(&|n| if n == "date" { Some(Arg::Date(d)) } else { Some(Arg::Text(&id)) })
                .unwrap();
            let expected = vec![
                ("date".to_owned(), Value::Date(d)),
                ("id".to_owned(), Value::Str(id.clone())),
            ];
            // `%y` parses 70-99 as 19xx and 00-69 as 20xx; other years are not the key's date.
            if fmt != "%y%m%d" || (1970..=2069).contains(&y) {
                prop_assert_eq!(t.match_key(&key), Some(expected));
            }
        }

        #[test]
        fn matching_arbitrary_keys_never_panics(key in "\\PC{0,80}") {
            for t in ["{a}.{b}", "x/{date:%Y%m%d}/{id}.json", "{date}", "{a}-{b}-{c}"] {
                let t = Template::parse(t).unwrap();
                if let Some(vars) = t.match_key(&key) {
                    let rendered = t.render(&|n| vars.iter().find(|(k, _)| k == n).map(|(_, v)| Arg::from(v)));
                    prop_assert_eq!(rendered.as_deref(), Ok(key.as_str()));
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn parsing_and_rendering_never_panic(
            src in "[{}a-z:%_./YmdHQ0-9-]{0,40}",
            text in "\\PC{0,40}",
            y in 1i32..9999,
            doy in 1u32..366,
        ) {
            if let Ok(t) = Template::parse(&src) {
                let d = NaiveDate::from_yo_opt(y, doy).unwrap_or_default();
                let _ = t.render(&|n| if n.len() % 2 == 0 { Some(Arg::Date(d)) } else { Some(Arg::Text(&text)) });
                let _ = t.render(&|_| Some(Arg::Text(&text)));
                let _ = t.render(&|_| None);
                let _ = t.literal_prefix();
                prop_assert!(t.vars().count() <= t.placeholders().count());
                let reparsed = Template::parse(t.as_str());
                prop_assert_eq!(reparsed, Ok(t.clone()));
            }
        }

        #[test]
        fn arbitrary_strings_never_panic_the_parser(src in "\\PC{0,64}") {
            let _ = Template::parse(&src);
        }

        #[test]
        fn escaped_text_renders_back_to_itself(text in "[^{}]{0,20}(\\{\\{|\\}\\}|[^{}]){0,20}") {
            let t = Template::parse(&text).unwrap();
            prop_assert_eq!(t.render(&|_| None).unwrap(), text.replace("{{", "{").replace("}}", "}"));
        }
    }
}
