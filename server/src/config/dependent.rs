//! The YAML forms of dependent sources (`partitions: {from_objects: {...}}`) and of
//! per-source freshness (`refresh: {within, max_age}`). Reading values out of parent
//! objects lives in [`crate::extract`]; this module only gives its types their YAML
//! spelling, validating scalars inside `Deserialize` so errors carry positions.

use std::fmt;
use std::time::Duration;

use chrono::NaiveDate;
use serde::de::{self, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::duration;
use super::partitions::{VarKind, var_name};
use super::scalars::from_text;
use crate::extract::{Column, CsvColumn, DEFAULT_MAX_BYTES, Extraction, JsonPath, ValuePattern};
use crate::template::Template;

/// `from_objects: {objects, var, json | csv | lines, pattern, max_bytes}`: one partition
/// per value read out of each parent object (e.g. every game id in each daily
/// schedule). A dependent partition's variables are the parent key's variables, in
/// order of first use in `objects`, followed by `var`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FromObjectsGenerator {
    /// The parent key template; its variables are parsed back out of parent keys.
    pub objects: Template,
    /// The variable the extracted values become.
    #[serde(deserialize_with = "var_name")]
    pub var: String,
    /// Values at this JSON path (`/events/*/id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json: Option<JsonPath>,
    /// Values in this CSV column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csv: Option<CsvColumn>,
    /// One value per line.
    #[serde(default, skip_serializing_if = "is_false")]
    pub lines: bool,
    /// What every value must match (anchored); default `[A-Za-z0-9._-]{1,128}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<ValuePattern>,
    /// Larger parent objects are skipped with an error (default 64MiB).
    #[serde(default = "default_max_bytes", deserialize_with = "super::de_bytes")]
    pub max_bytes: u64,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn default_max_bytes() -> u64 {
    DEFAULT_MAX_BYTES
}

impl FromObjectsGenerator {
    /// The extraction, if exactly one of `json`, `csv` and `lines` is given.
    pub fn extraction(&self) -> Option<Extraction> {
        match (&self.json, &self.csv, self.lines) {
            (Some(path), None, false) => Some(Extraction::Json(path.clone())),
            (None, Some(col), false) => Some(Extraction::Csv(col.clone())),
            (None, None, true) => Some(Extraction::Lines),
            _ => None,
        }
    }

    /// The names of the extraction keys given, in YAML order.
    pub(super) fn extraction_keys(&self) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if self.json.is_some() {
            keys.push("json");
        }
        if self.csv.is_some() {
            keys.push("csv");
        }
        if self.lines {
            keys.push("lines");
        }
        keys
    }

    /// The parent template's variables in order of first use, with their kinds (see
    /// [`Template::is_date_var`]).
    pub fn parent_vars(&self) -> Vec<(&str, VarKind)> {
        self.objects
            .vars()
            .map(|v| {
                let kind = if self.objects.is_date_var(v) {
                    VarKind::Date
                } else {
                    VarKind::Text
                };
                (v, kind)
            })
            .collect()
    }
}

/// `refresh: {within, max_age}`: objects of partitions dated within `within` of today
/// that are older than `max_age` are `stale` gaps (today's games keep updating).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refresh {
    /// How far back from today partitions are refreshed (`3d`: today and the three
    /// days before; `0s`: today only). Partitions dated after today always are.
    #[serde(with = "duration")]
    pub within: Duration,
    /// How old an object of such a partition may get before it is fetched again.
    #[serde(with = "duration")]
    pub max_age: Duration,
}

/// Seconds in a day, the unit partition dates differ by.
const DAY_SECS: u64 = 86_400;

impl Refresh {
    /// Whether a partition dated `date` is refreshed on `today`: its age in whole days
    /// is at most `within`.
    pub fn covers(&self, date: NaiveDate, today: NaiveDate) -> bool {
        let days = today.signed_duration_since(date).num_days();
        match u64::try_from(days) {
            // Dated after today.
            Err(_) => true,
            Ok(days) => Duration::from_secs(days.saturating_mul(DAY_SECS)) <= self.within,
        }
    }
}

impl Serialize for JsonPath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for JsonPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d, "a JSON path like /events/*/id")
    }
}

impl Serialize for ValuePattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ValuePattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d, "a regular expression")
    }
}

/// `csv: {column, header}` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CsvForm {
    column: Column,
    #[serde(default = "yes")]
    header: bool,
}

fn yes() -> bool {
    true
}

impl<'de> Deserialize<'de> for CsvColumn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let form = CsvForm::deserialize(d)?;
        Ok(CsvColumn {
            column: form.column,
            header: form.header,
        })
    }
}

impl Serialize for CsvColumn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(2))?;
        map.serialize_entry("column", &self.column)?;
        map.serialize_entry("header", &self.header)?;
        map.end()
    }
}

impl Serialize for Column {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Column::Name(n) => s.serialize_str(n),
            Column::Index(i) => s.serialize_u64(u64::try_from(*i).unwrap_or(u64::MAX)),
        }
    }
}

impl<'de> Deserialize<'de> for Column {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Column;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a column name or a 0-based column index")
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<Column, E> {
                if s.trim().is_empty() {
                    return Err(E::custom("a column name must not be empty"));
                }
                Ok(Column::Name(s.to_owned()))
            }

            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Column, E> {
                usize::try_from(n)
                    .map(Column::Index)
                    .map_err(|_| E::custom(format_args!("column index {n} is too large")))
            }

            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Column, E> {
                u64::try_from(n)
                    .map_err(|_| {
                        E::custom(format_args!("invalid column index {n}: expected 0 or more"))
                    })
                    .and_then(|n| self.visit_u64(n))
            }
        }
        d.deserialize_any(V)
    }
}
