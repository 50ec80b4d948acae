//! Partition generators as written in a source's `partitions:`: `dates`, `seasons`,
//! `values` and `from_objects`, one generator or a list of them (their cartesian
//! product; `from_objects` stands alone), with their YAML forms. Expansion into
//! partitions lives in the catalog.

use std::fmt;
use std::str::FromStr;

use chrono::{Datelike, Days, Months, NaiveDate};
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::calendar::{Calendar, DateSpan, WeekdayName, YearWindow};
use super::dependent::FromObjectsGenerator;
use super::scalars::{PartitionValue, excerpt, from_text as text, is_valid_var};
use crate::model::{Value, for_each_product};
use crate::template::{Template, parse_iso_date};

/// A source's partition generators; several form their cartesian product in order
/// (the first varies slowest). None means one partition without variables.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Partitions(pub Vec<Generator>);

/// The kind of value a partition variable holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarKind {
    /// A date: templates may format it.
    Date,
    /// Text (a season label or a listed value).
    Text,
}

/// One partition generator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Generator {
    /// Consecutive dates.
    Dates(DatesGenerator),
    /// Consecutive sports seasons.
    Seasons(SeasonsGenerator),
    /// A fixed list of values.
    Values(ValuesGenerator),
    /// Values read out of other lake objects (a dependent source).
    FromObjects(FromObjectsGenerator),
}

impl Generator {
    /// The variable the generator defines itself (for `from_objects`, its `var`; the
    /// parent's variables come with it, see [`Generator::vars`]).
    pub fn var(&self) -> &str {
        match self {
            Generator::Dates(g) => &g.var,
            Generator::Seasons(g) => &g.var,
            Generator::Values(g) => &g.var,
            Generator::FromObjects(g) => &g.var,
        }
    }

    /// The kind of the variable's values.
    pub fn kind(&self) -> VarKind {
        match self {
            Generator::Dates(_) => VarKind::Date,
            Generator::Seasons(_) | Generator::Values(_) | Generator::FromObjects(_) => {
                VarKind::Text
            }
        }
    }

    /// Every variable the generator contributes to a partition, in order: its own, or
    /// for `from_objects` the parent key's variables followed by its own.
    pub fn vars(&self) -> Vec<(&str, VarKind)> {
        match self {
            Generator::FromObjects(g) => {
                let mut vars = g.parent_vars();
                vars.push((&g.var, VarKind::Text));
                vars
            }
            _ => vec![(self.var(), self.kind())],
        }
    }

    /// The generator's key in YAML (`dates`, `seasons`, `values`, `from_objects`).
    pub fn key(&self) -> &'static str {
        match self {
            Generator::Dates(_) => "dates",
            Generator::Seasons(_) => "seasons",
            Generator::Values(_) => "values",
            Generator::FromObjects(_) => "from_objects",
        }
    }
}

impl Generator {
    /// The generator's values as of `today`, in order.
    pub fn values(&self, today: NaiveDate) -> Vec<Value> {
        match self {
            Generator::Dates(g) => g.dates(today).into_iter().map(Value::Date).collect(),
            Generator::Seasons(g) => {
                let end = match g.end {
                    SeasonEnd::Season(s) => s,
                    SeasonEnd::Current => Season::containing(today, g.start_month, g.start.format),
                };
                let mut out = Vec::new();
                let mut cur = Some(g.start);
                while let Some(s) = cur.filter(|s| s.year <= end.year) {
                    out.push(Value::Str(s.label()));
                    cur = s.next();
                }
                out
            }
            Generator::Values(g) => g
                .values
                .iter()
                .map(|v| Value::Str(v.as_str().to_owned()))
                .collect(),
            // Dependent values come from parent objects, not from the calendar.
            Generator::FromObjects(_) => Vec::new(),
        }
    }

    /// Each generator's variable with its values as of `today`: the lists
    /// whose product (`model::for_each_product`) are the partitions.
    pub fn value_lists(generators: &[Generator], today: NaiveDate) -> Vec<(String, Vec<Value>)> {
        generators
            .iter()
            .map(|g| (g.var().to_owned(), g.values(today)))
            .collect()
    }

    /// Hands `f` the key `template` renders for each partition of
    /// `generators` as of `today`, in order, until `f` returns true.
    pub fn for_each_key(
        generators: &[Generator],
        template: &Template,
        today: NaiveDate,
        mut f: impl FnMut(String) -> bool,
    ) {
        let mut stop = false;
        for_each_product(&Generator::value_lists(generators, today), |p| {
            if !stop && let Ok(key) = template.render_partition(p) {
                stop = f(key);
            }
        });
    }
}

/// `dates: {var, start, end, step, windows, weekdays, except}`: every `step`
/// from `start` to `end`, inclusive, that the calendar filters admit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatesGenerator {
    /// The variable name; default `date`.
    #[serde(default = "default_date_var", deserialize_with = "var_name")]
    pub var: String,
    /// The first date.
    #[serde(with = "iso_date")]
    pub start: NaiveDate,
    /// The last date (inclusive) or `today`.
    pub end: DateEnd,
    /// The distance between dates; default a day.
    #[serde(default)]
    pub step: Step,
    /// Month-day ranges within each year (`10-20..06-20`); none: all year.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<YearWindow>,
    /// Days of the week (`mon` … `sun`); none: every day.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weekdays: Vec<WeekdayName>,
    /// Dates and inclusive date ranges left out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<DateSpan>,
}

impl DatesGenerator {
    /// Its dates as of `today`, in order: every `step` from `start` to the
    /// end, then the calendar filters.
    pub fn dates(&self, today: NaiveDate) -> Vec<NaiveDate> {
        let calendar = self.calendar();
        let mut out = date_range(self.start, self.end.resolve(today), self.step);
        out.retain(|d| calendar.admits(*d));
        out
    }

    /// The calendar filters, applied after `step`.
    pub fn calendar(&self) -> Calendar<'_> {
        Calendar {
            windows: &self.windows,
            weekdays: &self.weekdays,
            except: &self.except,
        }
    }
}

fn default_date_var() -> String {
    "date".into()
}

/// Dates from `start` to `end` inclusive by `step`; month steps add whole months to
/// `start`, so the day of month is kept where it exists and clamped where it does not.
fn date_range(start: NaiveDate, end: NaiveDate, step: Step) -> Vec<NaiveDate> {
    let mut out = Vec::new();
    let mut n: u32 = 0;
    loop {
        let next = match step {
            Step::Day => start.checked_add_days(Days::new(u64::from(n))),
            Step::Week => start.checked_add_days(Days::new(7 * u64::from(n))),
            Step::Month => start.checked_add_months(Months::new(n)),
        };
        match next {
            Some(d) if d <= end => out.push(d),
            _ => break,
        }
        match n.checked_add(1) {
            Some(m) => n = m,
            None => break,
        }
    }
    out
}

/// The end of a date range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DateEnd {
    /// A fixed date.
    Date(NaiveDate),
    /// The day of expansion.
    Today,
}

impl DateEnd {
    /// The concrete end date on `today`.
    pub fn resolve(self, today: NaiveDate) -> NaiveDate {
        match self {
            DateEnd::Date(d) => d,
            DateEnd::Today => today,
        }
    }
}

impl FromStr for DateEnd {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "today" {
            return Ok(DateEnd::Today);
        }
        parse_iso_date(s).map(DateEnd::Date).ok_or_else(|| {
            format!(
                "invalid date `{}`: expected YYYY-MM-DD or `today`",
                excerpt(s)
            )
        })
    }
}

impl Serialize for DateEnd {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            DateEnd::Today => s.serialize_str("today"),
            DateEnd::Date(d) => s.collect_str(&d.format("%Y-%m-%d")),
        }
    }
}

impl<'de> Deserialize<'de> for DateEnd {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        text(d, "a date (YYYY-MM-DD) or `today`")
    }
}

/// Serde for a strict `YYYY-MM-DD` date.
mod iso_date {
    use super::*;

    pub fn serialize<S: Serializer>(d: &NaiveDate, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&d.format("%Y-%m-%d"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<NaiveDate, D::Error> {
        struct IsoDate(NaiveDate);
        impl FromStr for IsoDate {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                parse_iso_date(s)
                    .map(IsoDate)
                    .ok_or_else(|| format!("invalid date `{}`: expected YYYY-MM-DD", excerpt(s)))
            }
        }
        text::<D, IsoDate>(d, "a date (YYYY-MM-DD)").map(|d| d.0)
    }
}

/// The distance between two dates of a `dates` generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Step {
    /// One day.
    #[default]
    Day,
    /// Seven days.
    Week,
    /// One calendar month; the start's day of month is kept, clamped to short months.
    Month,
}

/// `seasons: {var, start, end, start_month}`: every season from `start` to `end`, inclusive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeasonsGenerator {
    /// The variable name; default `season`.
    #[serde(default = "default_season_var", deserialize_with = "var_name")]
    pub var: String,
    /// The first season; its spelling fixes the format (`2015-16` or `2016`).
    pub start: Season,
    /// The last season (inclusive) or `current`.
    pub end: SeasonEnd,
    /// The month (1-12) in which a season starts; default 10 (October).
    #[serde(default = "default_start_month", deserialize_with = "month")]
    pub start_month: u32,
}

fn default_season_var() -> String {
    "season".into()
}

/// The month NBA seasons start in.
pub const DEFAULT_SEASON_START_MONTH: u32 = 10;

fn default_start_month() -> u32 {
    DEFAULT_SEASON_START_MONTH
}

/// How a season is spelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeasonFormat {
    /// `2015-16`: the year it starts and the last two digits of the next.
    Split,
    /// `2016`: the year it ends (the year it runs in when seasons start in January).
    Single,
}

/// One season, by the year its label starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Season {
    /// The label's first year (`2015` for `2015-16`, `2016` for `2016`).
    pub year: i32,
    /// The spelling.
    pub format: SeasonFormat,
}

/// Seasons are written with four-digit years.
const SEASON_YEARS: std::ops::RangeInclusive<i32> = 1000..=9998;

impl Season {
    /// The season's label, e.g. `2015-16`.
    pub fn label(&self) -> String {
        match self.format {
            SeasonFormat::Split => format!("{}-{:02}", self.year, (self.year + 1) % 100),
            SeasonFormat::Single => self.year.to_string(),
        }
    }

    /// The following season, if it can still be written with four-digit years.
    pub fn next(&self) -> Option<Season> {
        let year = self.year + 1;
        SEASON_YEARS.contains(&year).then_some(Season {
            year,
            format: self.format,
        })
    }

    /// The season containing `today`, for seasons starting in `start_month`.
    pub fn containing(today: NaiveDate, start_month: u32, format: SeasonFormat) -> Season {
        let start_year = if today.month() >= start_month {
            today.year()
        } else {
            today.year() - 1
        };
        let year = match format {
            SeasonFormat::Split => start_year,
            SeasonFormat::Single if start_month <= 1 => start_year,
            SeasonFormat::Single => start_year + 1,
        };
        Season { year, format }
    }
}

impl FromStr for Season {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("invalid season `{}`: {why}", excerpt(s));
        let year_of = |t: &str| -> Option<i32> {
            (t.len() == 4 && t.bytes().all(|b| b.is_ascii_digit()))
                .then(|| t.parse().ok())
                .flatten()
                .filter(|y| SEASON_YEARS.contains(y))
        };
        if let Some((first, second)) = s.split_once('-') {
            let year = year_of(first)
                .filter(|_| second.len() == 2 && second.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| bad("expected YYYY-YY (e.g. 2015-16) or YYYY (e.g. 2016)"))?;
            let expected = format!("{:02}", (year + 1) % 100);
            if second != expected {
                return Err(bad(&format!(
                    "the second year must follow the first ({year}-{expected})"
                )));
            }
            return Ok(Season {
                year,
                format: SeasonFormat::Split,
            });
        }
        year_of(s)
            .map(|year| Season {
                year,
                format: SeasonFormat::Single,
            })
            .ok_or_else(|| bad("expected YYYY-YY (e.g. 2015-16) or YYYY (e.g. 2016)"))
    }
}

impl fmt::Display for Season {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

impl Serialize for Season {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.label())
    }
}

impl<'de> Deserialize<'de> for Season {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        text(d, "a season (YYYY-YY or YYYY)")
    }
}

/// The end of a season range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeasonEnd {
    /// A fixed season.
    Season(Season),
    /// The season containing the day of expansion.
    Current,
}

impl FromStr for SeasonEnd {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "current" {
            return Ok(SeasonEnd::Current);
        }
        s.parse()
            .map(SeasonEnd::Season)
            .map_err(|e: String| format!("{e}, or `current`"))
    }
}

impl Serialize for SeasonEnd {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            SeasonEnd::Current => s.serialize_str("current"),
            SeasonEnd::Season(season) => season.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for SeasonEnd {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        text(d, "a season (YYYY-YY or YYYY) or `current`")
    }
}

/// `values: {var, values}`: one partition per listed value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValuesGenerator {
    /// The variable name (required).
    #[serde(deserialize_with = "var_name")]
    pub var: String,
    /// The values, in order.
    pub values: Vec<PartitionValue>,
}

pub(super) fn var_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct Var(String);
    impl FromStr for Var {
        type Err = String;
        fn from_str(s: &str) -> Result<Self, String> {
            if is_valid_var(s) {
                Ok(Var(s.to_owned()))
            } else {
                Err(format!(
                    "invalid variable name `{}`: expected [a-z][a-z0-9_]{{0,63}}",
                    excerpt(s)
                ))
            }
        }
    }
    text::<D, Var>(d, "a variable name").map(|v| v.0)
}

fn month<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    struct Month(u32);
    impl FromStr for Month {
        type Err = String;
        fn from_str(s: &str) -> Result<Self, String> {
            match s.parse::<u32>() {
                Ok(m @ 1..=12) => Ok(Month(m)),
                _ => Err(format!("invalid month `{}`: expected 1 to 12", excerpt(s))),
            }
        }
    }
    text::<D, Month>(d, "a month (1-12)").map(|m| m.0)
}

/// The key naming a generator inside its one-key map.
#[derive(Debug, Clone, Copy)]
enum GeneratorKind {
    Dates,
    Seasons,
    Values,
    FromObjects,
}

impl FromStr for GeneratorKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "dates" => Ok(GeneratorKind::Dates),
            "seasons" => Ok(GeneratorKind::Seasons),
            "values" => Ok(GeneratorKind::Values),
            "from_objects" => Ok(GeneratorKind::FromObjects),
            _ => Err(format!(
                "unknown partition generator `{}`, expected one of `dates`, `seasons`, `values`, `from_objects`",
                excerpt(s)
            )),
        }
    }
}

impl<'de> Deserialize<'de> for GeneratorKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        text(d, "a partition generator")
    }
}

/// Reads one generator from a one-key map (`dates: {...}`).
fn read_generator<'de, A: MapAccess<'de>>(mut map: A) -> Result<Generator, A::Error> {
    let Some(kind) = map.next_key::<GeneratorKind>()? else {
        return Err(de::Error::custom(
            "empty partition generator: expected one of `dates`, `seasons`, `values`, `from_objects`",
        ));
    };
    let generator = match kind {
        GeneratorKind::Dates => Generator::Dates(map.next_value()?),
        GeneratorKind::Seasons => Generator::Seasons(map.next_value()?),
        GeneratorKind::Values => Generator::Values(map.next_value()?),
        GeneratorKind::FromObjects => Generator::FromObjects(map.next_value()?),
    };
    if let Some(other) = map.next_key::<String>()? {
        return Err(de::Error::custom(format_args!(
            "a partition generator has exactly one key, found `{}` after `{}`; write a list of generators for a product",
            excerpt(&other),
            generator.key()
        )));
    }
    Ok(generator)
}

impl<'de> Deserialize<'de> for Generator {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Generator;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a partition generator (`dates`, `seasons`, `values` or `from_objects`)",
                )
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Generator, A::Error> {
                read_generator(map)
            }
        }
        d.deserialize_map(V)
    }
}

impl Serialize for Generator {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(1))?;
        match self {
            Generator::Dates(g) => map.serialize_entry("dates", g)?,
            Generator::Seasons(g) => map.serialize_entry("seasons", g)?,
            Generator::Values(g) => map.serialize_entry("values", g)?,
            Generator::FromObjects(g) => map.serialize_entry("from_objects", g)?,
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Partitions {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Partitions;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a partition generator or a list of generators")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Partitions, A::Error> {
                Ok(Partitions(vec![read_generator(map)?]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Partitions, A::Error> {
                let mut gens = Vec::new();
                while let Some(g) = seq.next_element::<Generator>()? {
                    gens.push(g);
                }
                if gens.is_empty() {
                    return Err(de::Error::custom(
                        "empty list of partition generators: omit `partitions` for a source without partitions",
                    ));
                }
                Ok(Partitions(gens))
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Partitions {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => one.serialize(s),
            many => {
                let mut seq = s.serialize_seq(Some(many.len()))?;
                for g in many {
                    seq.serialize_element(g)?;
                }
                seq.end()
            }
        }
    }
}

impl Partitions {
    /// Whether there are no generators (one partition without variables).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The variables and their kinds, in declaration order (a `from_objects`
    /// generator's parent variables first, then its own).
    pub fn vars(&self) -> impl Iterator<Item = (&str, VarKind)> {
        self.0.iter().flat_map(Generator::vars)
    }

    /// The `from_objects` generator of a dependent source.
    pub fn dependency(&self) -> Option<&FromObjectsGenerator> {
        self.0.iter().find_map(|g| match g {
            Generator::FromObjects(f) => Some(f),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(y: i32, m: u32, day: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, day).unwrap()
    }

    #[test]
    fn seasons_parse_in_both_formats() {
        let s: Season = "2015-16".parse().unwrap();
        assert_eq!(
            s,
            Season {
                year: 2015,
                format: SeasonFormat::Split
            }
        );
        assert_eq!(s.label(), "2015-16");
        assert_eq!("1999-00".parse::<Season>().unwrap().label(), "1999-00");
        assert_eq!(
            "2016".parse::<Season>().unwrap().format,
            SeasonFormat::Single
        );
        for bad in [
            "2015-17",
            "2015-6",
            "15-16",
            "2015/16",
            "20156",
            "",
            "2015-16-17",
            "abcd",
        ] {
            let err = bad.parse::<Season>().unwrap_err();
            assert!(err.starts_with("invalid season"), "{bad}: {err}");
        }
        assert!("2015-17".parse::<Season>().unwrap_err().contains("2015-16"));
        assert_eq!("current".parse::<SeasonEnd>().unwrap(), SeasonEnd::Current);
    }

    #[test]
    fn current_season_respects_start_month_and_format() {
        let split = SeasonFormat::Split;
        let single = SeasonFormat::Single;
        assert_eq!(
            Season::containing(d(2024, 10, 1), 10, split).label(),
            "2024-25"
        );
        assert_eq!(
            Season::containing(d(2024, 9, 30), 10, split).label(),
            "2023-24"
        );
        assert_eq!(
            Season::containing(d(2025, 2, 1), 10, split).label(),
            "2024-25"
        );
        assert_eq!(
            Season::containing(d(2025, 2, 1), 10, single).label(),
            "2025"
        );
        assert_eq!(
            Season::containing(d(2024, 11, 1), 10, single).label(),
            "2025"
        );
        assert_eq!(
            Season::containing(d(2024, 11, 1), 1, single).label(),
            "2024"
        );
        assert_eq!(Season::containing(d(2024, 1, 1), 1, single).label(), "2024");
    }

    #[test]
    fn dates_and_ends_parse() {
        assert_eq!("today".parse::<DateEnd>().unwrap(), DateEnd::Today);
        assert_eq!(
            "2024-10-22".parse::<DateEnd>().unwrap(),
            DateEnd::Date(d(2024, 10, 22))
        );
        let err = "2024-13-40".parse::<DateEnd>().unwrap_err();
        assert_eq!(
            err,
            "invalid date `2024-13-40`: expected YYYY-MM-DD or `today`"
        );
    }
}
