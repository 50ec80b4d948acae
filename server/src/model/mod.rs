//! Domain types shared across the server: ids, priorities, task states, gap
//! reasons and partitions, with their one conversion to and from wire types;
//! the rules for object keys (`key.rs`) and partition values (`value.rs`), and
//! the stored form of partitions and keys (`encode.rs`).
//!
//! The lowest layer of the server: it imports no other module of the crate.

mod encode;
mod key;
mod product;
mod value;

pub use encode::{CorruptPartition, Encoded, partition_from_json, partition_to_json};
pub use key::{InvalidKey, MAX_KEY_LEN, validate_key};
pub use product::{for_each_product, nth_partition};
pub use value::{
    MAX_VALUE_LEN, SPECIAL_VARS, VAR_ATTEMPT, VAR_CONFIG_DIR, VAR_OUT, VAR_SOURCE, VAR_TASK_ID,
    is_valid_value,
};

use std::fmt;

use adce_proto::v1 as pb;
use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

/// A task's id: the SQLite rowid of its row in `tasks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskId(pub i64);

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A lease's id: random, fresh for every assignment.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub String);

impl LeaseId {
    /// The lease id made of the random number `n` (`l-` and 16 hex digits).
    pub fn from_random(n: u64) -> Self {
        LeaseId(format!("l-{n:016x}"))
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An agent's id, chosen by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentId(pub String);

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How urgently a task should run; the derived order is LOW < MEDIUM < HIGH < CRITICAL.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Backfill that can wait.
    Low,
    /// The default.
    #[default]
    Medium,
    /// Recent data people wait for.
    High,
    /// Must land now.
    Critical,
}

impl Priority {
    /// Every priority, highest first.
    pub const ALL: [Priority; 4] = [
        Priority::Critical,
        Priority::High,
        Priority::Medium,
        Priority::Low,
    ];

    /// The lowercase name used in config, the store and adcectl.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Medium => "medium",
            Priority::High => "high",
            Priority::Critical => "critical",
        }
    }

    /// Parses the lowercase name.
    pub fn parse(s: &str) -> Option<Self> {
        Priority::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// The priority as stored in SQLite (1 = low … 4 = critical).
    pub fn as_i64(self) -> i64 {
        match self {
            Priority::Low => 1,
            Priority::Medium => 2,
            Priority::High => 3,
            Priority::Critical => 4,
        }
    }

    /// The inverse of [`Priority::as_i64`]; unknown numbers read as medium.
    pub fn from_i64(n: i64) -> Self {
        match n {
            1 => Priority::Low,
            3 => Priority::High,
            4 => Priority::Critical,
            _ => Priority::Medium,
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Priority> for pb::Priority {
    fn from(p: Priority) -> Self {
        match p {
            Priority::Low => pb::Priority::Low,
            Priority::Medium => pb::Priority::Medium,
            Priority::High => pb::Priority::High,
            Priority::Critical => pb::Priority::Critical,
        }
    }
}

impl Priority {
    /// The domain priority of a wire priority; `None` for unspecified.
    pub fn from_pb(p: pb::Priority) -> Option<Self> {
        match p {
            pb::Priority::Unspecified => None,
            pb::Priority::Low => Some(Priority::Low),
            pb::Priority::Medium => Some(Priority::Medium),
            pb::Priority::High => Some(Priority::High),
            pb::Priority::Critical => Some(Priority::Critical),
        }
    }
}

/// Where a task is in its life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TaskState {
    /// Waiting for its ready time and an agent.
    Pending,
    /// Held by an agent under a lease.
    Leased,
    /// Every expected object is present.
    Done,
    /// Failed `max_attempts` times.
    Dead,
    /// The data does not exist yet.
    Unavailable,
    /// Cancelled by an operator.
    Cancelled,
}

impl TaskState {
    /// Every state, in life-cycle order.
    pub const ALL: [TaskState; 6] = [
        TaskState::Pending,
        TaskState::Leased,
        TaskState::Done,
        TaskState::Dead,
        TaskState::Unavailable,
        TaskState::Cancelled,
    ];

    /// The lowercase name used in the store and adcectl: the wire state's
    /// name (`adce_proto`), so both spell it the same way.
    pub fn as_str(self) -> &'static str {
        pb::TaskState::from(self).name()
    }

    /// Parses the lowercase name.
    pub fn parse(s: &str) -> Option<Self> {
        pb::TaskState::from_name(s).and_then(TaskState::from_pb)
    }

    /// Whether the task still has work ahead of it (pending or leased).
    pub fn is_active(self) -> bool {
        matches!(self, TaskState::Pending | TaskState::Leased)
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<TaskState> for pb::TaskState {
    fn from(s: TaskState) -> Self {
        match s {
            TaskState::Pending => pb::TaskState::Pending,
            TaskState::Leased => pb::TaskState::Leased,
            TaskState::Done => pb::TaskState::Done,
            TaskState::Dead => pb::TaskState::Dead,
            TaskState::Unavailable => pb::TaskState::Unavailable,
            TaskState::Cancelled => pb::TaskState::Cancelled,
        }
    }
}

impl TaskState {
    /// The domain state of a wire state; `None` for unspecified.
    pub fn from_pb(s: pb::TaskState) -> Option<Self> {
        match s {
            pb::TaskState::Unspecified => None,
            pb::TaskState::Pending => Some(TaskState::Pending),
            pb::TaskState::Leased => Some(TaskState::Leased),
            pb::TaskState::Done => Some(TaskState::Done),
            pb::TaskState::Dead => Some(TaskState::Dead),
            pb::TaskState::Unavailable => Some(TaskState::Unavailable),
            pb::TaskState::Cancelled => Some(TaskState::Cancelled),
        }
    }
}

/// Why a partition is a gap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GapReason {
    /// An expected object is absent.
    Missing,
    /// An expected object is smaller than `min_bytes`.
    TooSmall,
    /// An expected object is older than the source's freshness allows.
    Stale,
}

impl GapReason {
    /// The lowercase name used in the store and adcectl.
    pub fn as_str(self) -> &'static str {
        match self {
            GapReason::Missing => "missing",
            GapReason::TooSmall => "too_small",
            GapReason::Stale => "stale",
        }
    }

    /// Parses the lowercase name.
    pub fn parse(s: &str) -> Option<Self> {
        [GapReason::Missing, GapReason::TooSmall, GapReason::Stale]
            .into_iter()
            .find(|r| r.as_str() == s)
    }
}

impl fmt::Display for GapReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<GapReason> for pb::GapReason {
    fn from(r: GapReason) -> Self {
        match r {
            GapReason::Missing => pb::GapReason::Missing,
            GapReason::TooSmall => pb::GapReason::TooSmall,
            GapReason::Stale => pb::GapReason::Stale,
        }
    }
}

/// The value of one partition variable.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Value {
    /// A calendar date; templates may format it (`{date:%Y%m%d}`).
    Date(NaiveDate),
    /// Any other value (season, game id, ...), already validated.
    Str(String),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Date(d) => write!(f, "{}", d.format("%Y-%m-%d")),
            Value::Str(s) => f.write_str(s),
        }
    }
}

/// One partition: named variable values, in the order the source declares them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Partition {
    /// `(name, value)` pairs; names are unique.
    pub vars: Vec<(String, Value)>,
}

impl Partition {
    /// The value of variable `name`.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.vars.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// The value of its first date variable, if it has one.
    pub fn date(&self) -> Option<NaiveDate> {
        self.vars.iter().find_map(|(_, v)| match v {
            Value::Date(d) => Some(*d),
            Value::Str(_) => None,
        })
    }

    /// The canonical key (`name=value,name=value`), unique per partition of a source.
    pub fn key(&self) -> String {
        let mut out = String::new();
        for (i, (name, value)) in self.vars.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(name);
            out.push('=');
            out.push_str(&value.to_string());
        }
        out
    }

    /// The partition as wire variables.
    pub fn to_pb(&self) -> Vec<pb::PartitionVar> {
        self.vars
            .iter()
            .map(|(name, value)| pb::PartitionVar {
                name: name.clone(),
                value: value.to_string(),
            })
            .collect()
    }
}

/// Milliseconds since the Unix epoch, the time unit of the store and the wire.
pub type UnixMs = i64;

/// The current time in milliseconds since the Unix epoch.
pub fn now_ms() -> UnixMs {
    chrono::Utc::now().timestamp_millis()
}

/// `d` in milliseconds, saturating at `i64::MAX`.
pub fn duration_ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The UTC date of `ms` (the earliest date when out of range).
pub fn utc_date(ms: UnixMs) -> NaiveDate {
    chrono::DateTime::from_timestamp_millis(ms).map_or(NaiveDate::MIN, |t| t.date_naive())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_key_is_canonical_and_ordered() {
        let p = Partition {
            vars: vec![
                (
                    "date".into(),
                    Value::Date(NaiveDate::from_ymd_opt(2024, 10, 22).unwrap()),
                ),
                ("game_id".into(), Value::Str("401584893".into())),
            ],
        };
        assert_eq!(p.key(), "date=2024-10-22,game_id=401584893");
        assert_eq!(p.get("game_id"), Some(&Value::Str("401584893".into())));
    }

    #[test]
    fn priority_orders_and_round_trips() {
        assert!(Priority::Critical > Priority::High);
        assert!(Priority::High > Priority::Medium);
        assert!(Priority::Medium > Priority::Low);
        for p in Priority::ALL {
            assert_eq!(Priority::parse(p.as_str()), Some(p));
            assert_eq!(Priority::from_i64(p.as_i64()), p);
        }
        for s in TaskState::ALL {
            assert_eq!(TaskState::parse(s.as_str()), Some(s));
        }
    }
}
