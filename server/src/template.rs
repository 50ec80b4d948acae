//! String templates with `{name}` and `{name:FORMAT}` placeholders: object key
//! templates, scraper argv and env values.
//!
//! Syntax: literal text, `{name}` placeholders (`name` is `[A-Za-z_][A-Za-z0-9_]*`),
//! `{name:FORMAT}` where FORMAT is a chrono strftime format applied to a date value,
//! and `{{` / `}}` for literal braces. Everything that can be wrong with a template
//! (unclosed braces, bad names, a format chrono rejects or that needs a time of day)
//! is rejected by [`Template::parse`], so rendering a parsed template can only fail
//! for a missing variable or a format applied to a value that is not a date.

use std::fmt::{self, Write as _};

use chrono::NaiveDate;
use chrono::format::{Item, StrftimeItems};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::model::{Partition, Value};

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
}

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

    /// Renders the template with a partition's variables.
    pub fn render_partition(&self, partition: &Partition) -> Result<String, TemplateError> {
        self.render(&|name| partition.get(name).map(Arg::from))
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
