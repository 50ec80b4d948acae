//! Small validated config values with their YAML forms: the config version, rates
//! (`20/min`), byte sizes (`5GiB`) and partition values. Each validates inside its
//! `Deserialize` impl, so serde_yaml attaches the position of the offending scalar.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::model::{MAX_VALUE_LEN, is_valid_value};

/// Deserializes a scalar through its raw text and `FromStr` (YAML plain scalars keep
/// their exact spelling, e.g. leading zeros). The parse runs inside serde_yaml's scalar
/// handling, so its error carries the scalar's position.
pub(crate) fn from_text<'de, D, T>(deserializer: D, expecting: &'static str) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr<Err = String>,
{
    struct V<T>(&'static str, std::marker::PhantomData<T>);
    impl<T: FromStr<Err = String>> Visitor<'_> for V<T> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }

        fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
            s.parse().map_err(E::custom)
        }
    }
    deserializer.deserialize_str(V(expecting, std::marker::PhantomData))
}

/// Shortens hostile input for messages.
pub(crate) fn excerpt(s: &str) -> String {
    const MAX: usize = 40;
    if s.chars().count() <= MAX {
        s.to_owned()
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head}...")
    }
}

/// The config format version; only 1 exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version(pub u32);

/// The only config version this build reads.
pub const CURRENT_VERSION: u32 = 1;

impl FromStr for Version {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().parse::<u32>() {
            Ok(CURRENT_VERSION) => Ok(Version(CURRENT_VERSION)),
            _ => Err(format!(
                "unsupported config version `{}`: expected {CURRENT_VERSION}",
                excerpt(s)
            )),
        }
    }
}

impl Default for Version {
    fn default() -> Self {
        Version(CURRENT_VERSION)
    }
}

impl Serialize for Version {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.0)
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d, "the config version (1)")
    }
}

/// A rate: `count` events per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Events allowed per period; at least 1.
    pub count: u32,
    /// The period.
    pub per: RatePeriod,
}

/// The period of a [`Rate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RatePeriod {
    /// Per second (`/s`, `/sec`).
    Second,
    /// Per minute (`/min`).
    Minute,
    /// Per hour (`/h`).
    Hour,
}

impl RatePeriod {
    /// The period's length.
    pub fn duration(self) -> Duration {
        match self {
            RatePeriod::Second => Duration::from_secs(1),
            RatePeriod::Minute => Duration::from_secs(60),
            RatePeriod::Hour => Duration::from_secs(3600),
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            RatePeriod::Second => "s",
            RatePeriod::Minute => "min",
            RatePeriod::Hour => "h",
        }
    }
}

impl Rate {
    /// The average time between two events.
    pub fn interval(&self) -> Duration {
        self.per.duration() / self.count.max(1)
    }
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid rate `{}`: expected N/s, N/sec, N/min or N/h (N >= 1)",
                excerpt(s)
            )
        };
        let (n, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        let per = match unit.trim() {
            "s" | "sec" => RatePeriod::Second,
            "min" => RatePeriod::Minute,
            "h" => RatePeriod::Hour,
            _ => return Err(bad()),
        };
        if count == 0 {
            return Err(bad());
        }
        Ok(Rate { count, per })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, self.per.suffix())
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d, "a rate like 20/min")
    }
}

/// A byte count, written as an integer or with a unit (`512MiB`, `5GB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid size `{}`: expected bytes as an integer or with a unit (B, KB, KiB, MB, MiB, GB, GiB, TB, TiB)",
                excerpt(s)
            )
        };
        let t = s.trim().replace('_', "");
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| bad())?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" => 1_000,
            "KiB" => 1 << 10,
            "MB" => 1_000_000,
            "MiB" => 1 << 20,
            "GB" => 1_000_000_000,
            "GiB" => 1 << 30,
            "TB" => 1_000_000_000_000,
            "TiB" => 1 << 40,
            _ => return Err(bad()),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(bad)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d, "a byte size")
    }
}

/// One value of a `values` generator: `[A-Za-z0-9._-]{1,128}`, and not `.` or `..`,
/// so that it is safe inside object keys, paths and argv.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PartitionValue(String);

impl PartitionValue {
    /// The value.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for PartitionValue {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if is_valid_value(s) {
            Ok(PartitionValue(s.to_owned()))
        } else {
            Err(format!(
                "invalid partition value `{}`: expected [A-Za-z0-9._-]{{1,{MAX_VALUE_LEN}}}, not only dots",
                excerpt(s)
            ))
        }
    }
}

impl fmt::Display for PartitionValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for PartitionValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for PartitionValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d, "a partition value")
    }
}

/// Whether `s` is a valid name for a source, scraper or limit group: `[A-Za-z0-9_.-]{1,64}`.
pub fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Whether `s` is a valid partition variable name: `[a-z][a-z0-9_]{0,63}` (lower case,
/// so that `ADCE_VAR_<NAME>` is unambiguous).
pub fn is_valid_var(s: &str) -> bool {
    let mut bytes = s.bytes();
    s.len() <= 64
        && matches!(bytes.next(), Some(b) if b.is_ascii_lowercase())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_display() {
        let r: Rate = "20/min".parse().unwrap();
        assert_eq!(
            r,
            Rate {
                count: 20,
                per: RatePeriod::Minute
            }
        );
        assert_eq!(r.to_string(), "20/min");
        assert_eq!(r.interval(), Duration::from_secs(3));
        assert_eq!("5/sec".parse::<Rate>().unwrap().to_string(), "5/s");
        assert_eq!("1/h".parse::<Rate>().unwrap().per, RatePeriod::Hour);
        for bad in ["0/s", "20", "20/day", "-1/s", "x/min", "20/ min/", ""] {
            let err = bad.parse::<Rate>().unwrap_err();
            assert!(err.starts_with("invalid rate"), "{bad}: {err}");
        }
    }

    #[test]
    fn byte_sizes_accept_integers_and_units() {
        assert_eq!("5368709120".parse::<ByteSize>().unwrap(), ByteSize(5 << 30));
        assert_eq!("5GiB".parse::<ByteSize>().unwrap(), ByteSize(5 << 30));
        assert_eq!("1_000 KB".parse::<ByteSize>().unwrap(), ByteSize(1_000_000));
        assert!("99999999999TiB".parse::<ByteSize>().is_err());
        assert!("5 GiBs".parse::<ByteSize>().is_err());
        assert!("".parse::<ByteSize>().is_err());
    }

    #[test]
    fn partition_values_reject_hostile_input() {
        assert!("0022400061".parse::<PartitionValue>().is_ok());
        assert!("a.b_c-D".parse::<PartitionValue>().is_ok());
        let long = "x".repeat(10 * 1024);
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "a;b",
            "a b",
            "$(id)",
            "é",
            "a\nb",
            long.as_str(),
        ] {
            let err = bad.parse::<PartitionValue>().unwrap_err();
            assert!(err.starts_with("invalid partition value"), "{bad}: {err}");
            assert!(err.len() < 200, "message stays short: {err}");
        }
        assert!("x".repeat(MAX_VALUE_LEN).parse::<PartitionValue>().is_ok());
        assert!(
            "x".repeat(MAX_VALUE_LEN + 1)
                .parse::<PartitionValue>()
                .is_err()
        );
    }

    #[test]
    fn names_and_vars() {
        assert!(is_valid_name("espn_schedule.v2-b"));
        assert!(!is_valid_name("a b"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name(&"a".repeat(65)));
        assert!(is_valid_var("game_id"));
        assert!(!is_valid_var("Game"));
        assert!(!is_valid_var("1x"));
        assert!(!is_valid_var("a-b"));
    }

    #[test]
    fn version_must_be_one() {
        assert_eq!("1".parse::<Version>().unwrap(), Version(1));
        let err = "2".parse::<Version>().unwrap_err();
        assert_eq!(err, "unsupported config version `2`: expected 1");
    }
}
