//! How partitions and expected keys are stored: a partition as JSON
//! `[[name, value, "date"|"str"], ...]` beside its key (`var=value,...`), the
//! keys as a JSON array. [`Encoded`] is built by the planner, off the
//! scheduler's thread, so the single writer only writes; the store decodes.
//!
//! Invariant: `partition_from_json(partition_to_json(p)) == p`.

use super::{Partition, Value};

/// A stored partition that does not decode: the state was damaged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CorruptPartition(String);

/// A partition as stored: `[[name, value, "date"|"str"], ...]`.
pub fn partition_to_json(p: &Partition) -> String {
    let vars: Vec<[String; 3]> = p
        .vars
        .iter()
        .map(|(name, value)| {
            let kind = match value {
                Value::Date(_) => "date",
                Value::Str(_) => "str",
            };
            [name.clone(), value.to_string(), kind.to_string()]
        })
        .collect();
    serde_json::to_string(&vars).unwrap_or_else(|_| "[]".into())
}

/// The inverse of [`partition_to_json`].
pub fn partition_from_json(s: &str) -> Result<Partition, CorruptPartition> {
    let vars: Vec<[String; 3]> = serde_json::from_str(s)
        .map_err(|e| CorruptPartition(format!("corrupt partition {s:?}: {e}")))?;
    let mut out = Partition::default();
    for [name, value, kind] in vars {
        let value = if kind == "date" {
            Value::Date(
                chrono::NaiveDate::parse_from_str(&value, "%Y-%m-%d")
                    .map_err(|e| CorruptPartition(format!("corrupt date {value:?}: {e}")))?,
            )
        } else {
            Value::Str(value)
        };
        out.vars.push((name, value));
    }
    Ok(out)
}

/// A task's partition and keys as stored, encoded once: by the planner's
/// thread, so the single writer only writes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// The partition's key (`var=value,...`).
    pub partition_key: String,
    /// The partition as stored.
    pub partition_json: String,
    /// The expected keys as stored.
    pub keys_json: String,
}

impl Encoded {
    /// The stored form of `partition` and `keys`.
    pub fn new(partition: &Partition, keys: &[String]) -> Self {
        Encoded {
            partition_key: partition.key(),
            partition_json: partition_to_json(partition),
            keys_json: serde_json::to_string(keys).unwrap_or_else(|_| "[]".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_json_round_trips_dates() {
        let p = Partition {
            vars: vec![
                (
                    "date".into(),
                    Value::Date(chrono::NaiveDate::from_ymd_opt(2025, 1, 31).unwrap()),
                ),
                ("x".into(), Value::Str("a\"b".into())),
            ],
        };
        assert_eq!(partition_from_json(&partition_to_json(&p)).unwrap(), p);
    }
}
