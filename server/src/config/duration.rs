//! Durations in config as humantime strings (`500ms`, `30s`, `5m`, `1h`, `1d`), with
//! humantime's own explanation in errors (humantime-serde only says "expected a duration").

use std::time::Duration;

use serde::{Deserializer, Serializer};

use super::scalars::{excerpt, from_text};

struct Parsed(Duration);

/// The longest duration a config may name (100 years): longer ones are
/// mistakes, and adding them to a clock would overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

impl std::str::FromStr for Parsed {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let d = humantime::parse_duration(s.trim()).map_err(|e| {
            format!(
                "invalid duration `{}`: {e} (e.g. 500ms, 30s, 5m, 1h, 1d)",
                excerpt(s)
            )
        })?;
        if d > MAX_DURATION {
            return Err(format!(
                "duration `{}` is longer than 100 years",
                excerpt(s)
            ));
        }
        Ok(Parsed(d))
    }
}

/// Serializes a duration as a humantime string (`1h 30m`).
pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

/// Deserializes a humantime string.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    from_text::<D, Parsed>(d, "a duration like 30s, 5m or 1h").map(|p| p.0)
}

/// Serde for an optional duration field (`#[serde(default, with = "duration::option")]`):
/// absent is `None`, a humantime string is `Some`.
pub mod option {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    /// Serializes `Some` as a humantime string and `None` as null.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    /// Deserializes a present humantime string as `Some`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::deserialize(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_explains() {
        let p: Parsed = "1h 30m".parse().unwrap();
        assert_eq!(p.0, Duration::from_secs(5400));
        let err = "30 parsecs".parse::<Parsed>().err().unwrap();
        assert!(
            err.starts_with("invalid duration `30 parsecs`: unknown time unit"),
            "{err}"
        );
        let err = "500000000000y".parse::<Parsed>().err().unwrap();
        assert!(err.contains("longer than 100 years"), "{err}");
        assert!("100y".parse::<Parsed>().is_ok());
    }
}
