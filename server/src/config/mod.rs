//! The server's configuration file: its types with their defaults, loading with
//! `FILE:LINE:COLUMN: message` errors, cross-reference validation, and dumping the
//! effective config back to YAML. All YAML parsing of the server lives in this module.
//!
//! Loading runs in three steps: serde_yaml deserializes the document (scalar-level
//! checks such as dates, durations, rates and templates run inside `Deserialize`
//! impls, so errors carry the scalar's position); a position index of the document
//! is built; then [`validate`] checks everything that spans several values (scraper
//! references, template variables, duplicates) and points at the offending value
//! through the index.

mod calendar;
mod dependent;
mod duration;
mod partitions;
mod position;
mod scalars;
mod security;
mod validate;
mod webhook;
mod yaml;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use calendar::{Calendar, DateSpan, MonthDay, WeekdayName, YearWindow};
pub use dependent::{FromObjectsGenerator, Refresh};
pub use duration::MAX_DURATION;
pub use partitions::{
    DEFAULT_SEASON_START_MONTH, DateEnd, DatesGenerator, Generator, Partitions, Season, SeasonEnd,
    SeasonFormat, SeasonsGenerator, Step, ValuesGenerator, VarKind,
};
pub use position::{Position, PositionIndex, Segment, YamlPath};
pub use scalars::{ByteSize, CURRENT_VERSION, PartitionValue, Rate, RatePeriod};
pub use security::{
    AuthConfig, ClientAuth, MIN_TOKEN_LEN, REDACTED, Role, Secret, TlsConfig, TokenConfig,
};
pub use webhook::WebhookTarget;

use crate::model::Priority;
use crate::template::Template;

/// The address the server listens on by default.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 7070);
/// The state directory by default, relative to the config file's directory.
pub const DEFAULT_STATE_DIR: &str = "./adce-state";
/// How often agents heartbeat by default.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// How long a lease lives without a heartbeat by default.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);
/// The largest accepted upload by default (5 GiB).
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 5 * 1024 * 1024 * 1024;
/// The longest an upload may stream by default: 5 GiB at 12 Mbit/s.
pub const DEFAULT_MAX_UPLOAD_TIME: Duration = Duration::from_secs(3600);
/// How often the loop reconciles by default.
pub const DEFAULT_RECONCILE_INTERVAL: Duration = Duration::from_secs(3600);
/// How often the loop looks at the ready queue by default.
pub const DEFAULT_QUEUE_CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// Ready tasks needed to start a dispatch cycle by default.
pub const DEFAULT_DISPATCH_THRESHOLD: u64 = 1;
/// The longest a dispatch cycle runs before reconciling again, by default.
pub const DEFAULT_MAX_CYCLE_RUNTIME: Duration = Duration::from_secs(6 * 3600);
/// A scraper run's timeout by default.
pub const DEFAULT_SCRAPER_TIMEOUT: Duration = Duration::from_secs(3600);
/// Attempts before a task is dead, by default.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// The delay before the first retry by default.
pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(30);
/// The factor between consecutive retry delays by default.
pub const DEFAULT_BACKOFF_MULTIPLIER: f64 = 2.0;
/// The longest retry delay by default.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// The relative random spread of retry delays by default.
pub const DEFAULT_JITTER: f64 = 0.1;
/// The smallest acceptable object by default: an empty object is a gap.
pub const DEFAULT_MIN_BYTES: u64 = 1;
/// How long an `unavailable` task (exit 69) waits before it is looked at again, by default.
pub const DEFAULT_RECHECK_AFTER: Duration = Duration::from_secs(24 * 3600);
/// How long a task waits ready before its priority rises one level, by default.
pub const DEFAULT_AGING: Duration = Duration::from_secs(6 * 3600);

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read: {source}", file.display())]
    Read {
        /// The file as named by the caller.
        file: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file was read but is not a valid config.
    #[error("{}", Located { file, position: *position, message })]
    Invalid {
        /// The file as named by the caller.
        file: PathBuf,
        /// Where in the file, when known.
        position: Option<Position>,
        /// What is wrong and what was expected.
        message: String,
    },
}

/// Formats `FILE:LINE:COLUMN: message`, or `FILE: message` without a position.
struct Located<'a> {
    file: &'a Path,
    position: Option<Position>,
    message: &'a str,
}

impl fmt::Display for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some(p) => write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                p.line,
                p.column,
                self.message
            ),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl ConfigError {
    /// Where in the file the problem is, when known.
    pub fn position(&self) -> Option<Position> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Invalid { position, .. } => *position,
        }
    }

    /// The message without file and position.
    pub fn message(&self) -> String {
        match self {
            ConfigError::Read { source, .. } => format!("cannot read: {source}"),
            ConfigError::Invalid { message, .. } => message.clone(),
        }
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The format version; must be 1.
    #[serde(serialize_with = "ser_version", deserialize_with = "de_version")]
    pub version: u32,
    /// The gRPC server and its state.
    #[serde(default)]
    pub server: ServerConfig,
    /// Where the data lives.
    pub lake: LakeConfig,
    /// The reconcile → dispatch → drain loop.
    #[serde(default)]
    pub r#loop: LoopConfig,
    /// The Prometheus endpoint; absent: no metrics are served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
    /// Alert rules and where alerts are sent.
    #[serde(default)]
    pub alerts: AlertsConfig,
    /// Bearer tokens and their roles; without tokens every call is allowed.
    #[serde(default)]
    pub auth: AuthConfig,
    /// TLS for the gRPC listener; absent: plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Limit groups by name (rates and concurrency shared by all agents).
    #[serde(default)]
    pub limits: BTreeMap<String, LimitGroup>,
    /// Scraper definitions by name.
    #[serde(default)]
    pub scrapers: BTreeMap<String, ScraperConfig>,
    /// The sources, in catalog order.
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    /// The directory of the config file: relative paths were resolved against it and
    /// `{config_dir}` renders to it. Not part of the YAML.
    #[serde(skip)]
    pub config_dir: PathBuf,
    /// The file the config was loaded from, when it was (`reload` reads it
    /// again). Not part of the YAML.
    #[serde(skip)]
    pub source_path: Option<PathBuf>,
    /// Dev mode's data directory, whose overrides a reload applies again.
    /// Not part of the YAML.
    #[serde(skip)]
    pub dev_data_dir: Option<PathBuf>,
}

fn ser_version<S: Serializer>(v: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u32(*v)
}

fn de_version<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    scalars::Version::deserialize(d).map(|v| v.0)
}

fn de_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    ByteSize::deserialize(d).map(|b| b.0)
}

/// `server:` the gRPC endpoint, state and agent timing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// The gRPC listen address.
    pub listen: SocketAddr,
    /// The state directory (SQLite queue); relative paths resolve against the config file's directory.
    pub state_dir: PathBuf,
    /// How often agents heartbeat.
    #[serde(with = "duration")]
    pub heartbeat_interval: Duration,
    /// How long a lease lives without a heartbeat.
    #[serde(with = "duration")]
    pub lease_ttl: Duration,
    /// The largest accepted upload, in bytes (units like `5GiB` accepted).
    #[serde(deserialize_with = "de_bytes")]
    pub max_upload_bytes: u64,
    /// The longest an upload may stream; a longer one is aborted and refused.
    /// Also how old a crashed write's leftovers must be before the lake
    /// removes them (see `LocalLake::with_max_upload_time`).
    #[serde(with = "duration")]
    pub max_upload_time: Duration,
    /// On SIGTERM, how long running tasks (their uploads included) may take to
    /// finish before the server stops anyway; their leases are recovered at
    /// the next start.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// The largest gRPC message either service accepts, in bytes (units like
    /// `4MiB` accepted); a larger one fails its call or stream.
    #[serde(deserialize_with = "de_bytes")]
    pub max_message_bytes: u64,
    /// HTTP/2 streams one client connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Agents connected at once; the next new agent is refused.
    pub max_agents: u32,
    /// The most slots one agent may announce.
    pub max_slots_per_agent: u32,
    /// How many messages an agent's Connect stream may send, per slot it
    /// announced; an agent above it is cut off.
    pub agent_messages: AgentMessageLimit,
    /// How long server events and task output are kept.
    pub log_retention: LogRetention,
}

/// `server.log_retention`: log entries (server events and task output) older
/// than `max_age`, and beyond the newest `max_rows`, are pruned every minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogRetention {
    /// Entries older than this are pruned.
    #[serde(with = "duration")]
    pub max_age: Duration,
    /// At most this many entries are kept.
    pub max_rows: u64,
}

impl Default for LogRetention {
    fn default() -> Self {
        LogRetention {
            max_age: DEFAULT_LOG_MAX_AGE,
            max_rows: DEFAULT_LOG_MAX_ROWS,
        }
    }
}

/// The default of `server.log_retention.max_age`.
pub const DEFAULT_LOG_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// The default of `server.log_retention.max_rows`.
pub const DEFAULT_LOG_MAX_ROWS: u64 = 2_000_000;

/// `server.agent_messages`: a token bucket over the messages of one agent's
/// Connect stream. Both numbers are per slot the agent announced, so an agent
/// running more tasks may send more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentMessageLimit {
    /// Messages allowed per slot, sustained, e.g. `200/s`.
    pub rate: Rate,
    /// Messages allowed per slot at once above the rate.
    pub burst: u32,
}

impl Default for AgentMessageLimit {
    fn default() -> Self {
        AgentMessageLimit {
            rate: DEFAULT_AGENT_MESSAGE_RATE,
            burst: DEFAULT_AGENT_MESSAGE_BURST,
        }
    }
}

/// The default of `server.max_message_bytes` (4 MiB, gRPC's usual limit).
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 4 * 1024 * 1024;
/// The smallest `server.max_message_bytes`: agents send uploads in chunks of
/// 256 KiB, and a chunk must fit with room to spare.
pub const MIN_MAX_MESSAGE_BYTES: u64 = 1024 * 1024;
/// The default of `server.max_concurrent_streams`.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 64;
/// The default of `server.max_agents`.
pub const DEFAULT_MAX_AGENTS: u32 = 1000;
/// The default of `server.max_slots_per_agent`.
pub const DEFAULT_MAX_SLOTS_PER_AGENT: u32 = 1024;
/// The default of `server.agent_messages.rate` (per slot).
pub const DEFAULT_AGENT_MESSAGE_RATE: Rate = Rate {
    count: 200,
    per: RatePeriod::Second,
};
/// The default of `server.agent_messages.burst` (per slot).
pub const DEFAULT_AGENT_MESSAGE_BURST: u32 = 1000;

/// `alerts:` thresholds of the health checker's rules, and an optional webhook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// A reconcile is overdue after this long without one (default: two
    /// reconcile intervals and a minute).
    #[serde(with = "duration::option", skip_serializing_if = "Option::is_none")]
    pub reconcile_overdue: Option<Duration>,
    /// Alert when a task has been ready this long without being dispatched.
    #[serde(with = "duration")]
    pub oldest_ready: Duration,
    /// Alert when failed attempts make up more than this share of finished
    /// ones in a window.
    pub failure_rate: FailureRateRule,
    /// POST a Slack-compatible `{"text": ...}` here when an alert is raised
    /// and when it is resolved (an http:// or https:// URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    /// The CA certificates (PEM) an https:// webhook's certificate must chain
    /// to, instead of the system roots; relative paths resolve against the
    /// config file's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_ca: Option<PathBuf>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            reconcile_overdue: None,
            oldest_ready: Duration::from_secs(24 * 3600),
            failure_rate: FailureRateRule::default(),
            webhook: None,
            webhook_ca: None,
        }
    }
}

/// `alerts.failure_rate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailureRateRule {
    /// The share of failed attempts (0 to 1) above which to alert.
    pub ratio: f64,
    /// Over this window.
    #[serde(with = "duration")]
    pub window: Duration,
    /// Only when at least this many attempts finished in the window.
    pub min_attempts: u64,
}

impl Default for FailureRateRule {
    fn default() -> Self {
        FailureRateRule {
            ratio: 0.5,
            window: Duration::from_secs(15 * 60),
            min_attempts: 10,
        }
    }
}

/// The default of `server.shutdown_grace`.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(60);

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: DEFAULT_LISTEN,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            lease_ttl: DEFAULT_LEASE_TTL,
            max_upload_bytes: DEFAULT_MAX_UPLOAD_BYTES,
            max_upload_time: DEFAULT_MAX_UPLOAD_TIME,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            max_agents: DEFAULT_MAX_AGENTS,
            max_slots_per_agent: DEFAULT_MAX_SLOTS_PER_AGENT,
            agent_messages: AgentMessageLimit::default(),
            log_retention: LogRetention::default(),
        }
    }
}

/// The address the metrics endpoint listens on by default.
pub const DEFAULT_METRICS_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9464);

/// `metrics:` the Prometheus endpoint (`GET /metrics`, OpenMetrics text).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// The HTTP listen address; must differ from `server.listen`.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: DEFAULT_METRICS_LISTEN,
        }
    }
}

/// `lake:` where objects live; exactly one of `local` and `s3` must be given.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LakeConfig {
    /// A local directory lake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalLake>,
    /// An S3 (or S3-compatible) bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Lake>,
}

/// The default size above which uploads to S3 use multipart.
pub const DEFAULT_MULTIPART_THRESHOLD: u64 = 64 * 1024 * 1024;
/// The default part size of S3 multipart uploads (S3's minimum is 5 MiB).
pub const DEFAULT_MULTIPART_PART_SIZE: u64 = 16 * 1024 * 1024;
/// The default number of prefixes listed at once.
pub const DEFAULT_LIST_CONCURRENCY: usize = 8;
/// The default age at which the S3 lake aborts an incomplete multipart
/// upload under its prefix (one a killed server left behind).
pub const DEFAULT_ABORT_INCOMPLETE_AFTER: Duration = Duration::from_secs(24 * 3600);

fn default_multipart_threshold() -> u64 {
    DEFAULT_MULTIPART_THRESHOLD
}

fn default_multipart_part_size() -> u64 {
    DEFAULT_MULTIPART_PART_SIZE
}

fn default_list_concurrency() -> usize {
    DEFAULT_LIST_CONCURRENCY
}

fn default_abort_incomplete_after() -> Duration {
    DEFAULT_ABORT_INCOMPLETE_AFTER
}

/// `lake.s3:` an S3 bucket (credentials come from the standard AWS chain:
/// environment, profile, web identity, instance metadata; never from here).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Lake {
    /// The bucket.
    pub bucket: String,
    /// A key prefix every object key is placed under (e.g. `raw/`); empty for
    /// the whole bucket.
    #[serde(default)]
    pub prefix: String,
    /// The region; the AWS chain's region when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// An S3-compatible endpoint URL (e.g. `http://127.0.0.1:9000`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), for S3-compatible servers.
    #[serde(default)]
    pub force_path_style: bool,
    /// Uploads larger than this use multipart (units like `64MiB` accepted).
    #[serde(default = "default_multipart_threshold", deserialize_with = "de_bytes")]
    pub multipart_threshold: u64,
    /// The part size of multipart uploads (at least 5 MiB).
    #[serde(default = "default_multipart_part_size", deserialize_with = "de_bytes")]
    pub multipart_part_size: u64,
    /// How many prefixes are listed at once.
    #[serde(default = "default_list_concurrency")]
    pub list_concurrency: usize,
    /// Incomplete multipart uploads under the prefix initiated longer ago
    /// than this are aborted (a server killed mid-upload leaves one behind);
    /// must be longer than `server.max_upload_time`.
    #[serde(default = "default_abort_incomplete_after", with = "duration")]
    pub abort_incomplete_after: Duration,
    /// S3 Inventory reports to read instead of listing the whole catalog.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory: Option<InventoryConfig>,
}

/// `lake.s3.inventory:` where S3 Inventory delivers its reports, in AWS's
/// layout `prefix/<source-bucket>/<config_id>/<YYYY-MM-DDTHH-MMZ>/manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InventoryConfig {
    /// The destination bucket of the reports.
    pub bucket: String,
    /// The destination prefix (may be empty).
    #[serde(default)]
    pub prefix: String,
    /// The inventory configuration's id.
    pub config_id: String,
}

/// `lake.local:` a directory holding one file per object key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalLake {
    /// The lake's root directory; relative paths resolve against the config file's directory.
    pub root: PathBuf,
}

/// `loop:` the automatic reconcile and dispatch loop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoopConfig {
    /// Whether the loop runs at all (reconcile can still be triggered by hand).
    pub enabled: bool,
    /// How often to reconcile.
    #[serde(with = "duration")]
    pub reconcile_interval: Duration,
    /// How often to look at the ready queue.
    #[serde(with = "duration")]
    pub queue_check_interval: Duration,
    /// Ready tasks needed to start a dispatch cycle.
    pub dispatch_threshold: u64,
    /// The longest a cycle runs before reconciling again.
    #[serde(with = "duration")]
    pub max_cycle_runtime: Duration,
    /// A task ready this long rises one priority level, and one more per further
    /// period, up to critical, so low priorities never starve; `0s` turns aging off.
    /// See [`crate::priority::effective`].
    #[serde(with = "duration")]
    pub aging: Duration,
    /// Ready tasks that no connected agent may run for this long are reported
    /// ("waiting: no agent with proxy=residential") in status, tasks and logs.
    #[serde(with = "duration")]
    pub no_agent_after: Duration,
}

/// The default of `loop.no_agent_after`.
pub const DEFAULT_NO_AGENT_AFTER: Duration = Duration::from_secs(60);

impl Default for LoopConfig {
    fn default() -> Self {
        LoopConfig {
            enabled: true,
            reconcile_interval: DEFAULT_RECONCILE_INTERVAL,
            queue_check_interval: DEFAULT_QUEUE_CHECK_INTERVAL,
            dispatch_threshold: DEFAULT_DISPATCH_THRESHOLD,
            max_cycle_runtime: DEFAULT_MAX_CYCLE_RUNTIME,
            aging: DEFAULT_AGING,
            no_agent_after: DEFAULT_NO_AGENT_AFTER,
        }
    }
}

/// One limit group: a token bucket (`rate`, `burst`) and a concurrency cap, shared by
/// every agent. All parts are optional; a missing part does not limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitGroup {
    /// Sustained starts allowed, e.g. `20/min`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
    /// Starts allowed at once above the rate (needs `rate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Runs allowed at the same time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
}

/// One scraper definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScraperConfig {
    /// argv templates; run without a shell.
    pub command: Vec<Template>,
    /// Extra environment variables; values are templates.
    #[serde(default)]
    pub env: BTreeMap<String, Template>,
    /// Kill the run after this long.
    #[serde(default = "default_timeout", with = "duration")]
    pub timeout: Duration,
    /// How failed runs are retried.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Names of the limit groups every run takes a token and a slot from.
    #[serde(default)]
    pub limits: Vec<String>,
    /// Labels an agent must have to run this scraper.
    #[serde(default)]
    pub requires: BTreeMap<String, String>,
}

fn default_timeout() -> Duration {
    DEFAULT_SCRAPER_TIMEOUT
}

/// How failed runs are retried: delays grow from `backoff` by `multiplier` up to
/// `max_backoff`, spread by ±`jitter`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Attempts in all, the first included, before a task is dead.
    pub max_attempts: u32,
    /// The delay after the first failure.
    #[serde(with = "duration")]
    pub backoff: Duration,
    /// The factor between consecutive delays (at least 1).
    pub multiplier: f64,
    /// The longest delay.
    #[serde(with = "duration")]
    pub max_backoff: Duration,
    /// The relative random spread (0 to 1) applied to each delay.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            backoff: DEFAULT_BACKOFF,
            multiplier: DEFAULT_BACKOFF_MULTIPLIER,
            max_backoff: DEFAULT_MAX_BACKOFF,
            jitter: DEFAULT_JITTER,
        }
    }
}

impl RetryPolicy {
    /// The delay before retrying after failed attempt number `attempt` (1-based).
    /// `unit` is a random sample in `[0, 1)`; 0.5 gives the delay without jitter.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let exp = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let cap = self.max_backoff.as_secs_f64();
        let base = (self.backoff.as_secs_f64() * self.multiplier.max(1.0).powi(exp)).min(cap);
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.5
        };
        let spread = self.jitter.clamp(0.0, 1.0) * (2.0 * unit - 1.0);
        let secs = (base * (1.0 + spread)).clamp(0.0, cap.max(0.0));
        Duration::try_from_secs_f64(secs).unwrap_or(self.max_backoff)
    }

    /// Whether a task that has failed `attempts` times may run again.
    pub fn allows_another(&self, attempts: u32) -> bool {
        attempts < self.max_attempts
    }
}

/// One source: its partitions, object key templates and the scraper that fills it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Unique name, `[A-Za-z0-9_.-]{1,64}`.
    #[serde(deserialize_with = "validate::de_name")]
    pub name: String,
    /// The scraper that fills it.
    pub scraper: String,
    /// How urgent its gaps are, unless a rule of `priority_rules` matches.
    #[serde(default)]
    pub priority: Priority,
    /// Rules on partition recency that override `priority`; the first matching rule
    /// wins. See [`crate::priority::PriorityRules`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub priority_rules: Vec<PriorityRule>,
    /// Free text for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// An object smaller than this is a `too_small` gap.
    #[serde(default = "default_min_bytes", deserialize_with = "de_bytes")]
    pub min_bytes: u64,
    /// The partition generators; none means a single partition without variables.
    #[serde(default, skip_serializing_if = "Partitions::is_empty")]
    pub partitions: Partitions,
    /// Object key templates, one object per template and partition.
    pub objects: Vec<Template>,
    /// Re-fetch objects of recent partitions once they are older than `max_age`
    /// (needs a date partition variable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh: Option<Refresh>,
    /// How long a task whose data did not exist yet (exit 69) waits before it is
    /// looked at again.
    #[serde(default = "default_recheck_after", with = "duration")]
    pub recheck_after: Duration,
    /// Always confirm this source by listing, even when an inventory report is used.
    #[serde(default)]
    pub hot: bool,
}

/// One entry of a source's `priority_rules`: a condition on the partition and the
/// priority its gaps get when it holds. Exactly one condition is given (checked by
/// validation, with the rule's position).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriorityRule {
    /// Holds for partitions dated today or up to this long before today (whole days
    /// count, like `refresh.within`), and for any later date. Needs a date variable.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "duration::option"
    )]
    pub within: Option<Duration>,
    /// Holds for partitions whose season is the season containing today. Needs a
    /// `seasons` generator.
    #[serde(default, skip_serializing_if = "is_false")]
    pub current_season: bool,
    /// The priority of the partition's gaps when the condition holds.
    pub priority: Priority,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn default_min_bytes() -> u64 {
    DEFAULT_MIN_BYTES
}

fn default_recheck_after() -> Duration {
    DEFAULT_RECHECK_AFTER
}

impl Config {
    /// Reads and validates the config file at `path`. Relative paths inside resolve
    /// against the file's directory (made absolute).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let src = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        let dir = std::path::absolute(path)
            .ok()
            .and_then(|p| p.parent().map(Path::to_owned))
            .unwrap_or_else(|| dir_of(path));
        let mut cfg = Config::parse_in(&src, path, &dir)?;
        cfg.source_path = Some(std::path::absolute(path).unwrap_or_else(|_| path.to_owned()));
        Ok(cfg)
    }

    /// Parses and validates `src`. `origin` names the file in messages, and relative
    /// paths resolve against its directory (left relative if `origin` is).
    pub fn parse(src: &str, origin: &Path) -> Result<Config, ConfigError> {
        Config::parse_in(src, origin, &dir_of(origin))
    }

    fn parse_in(src: &str, origin: &Path, dir: &Path) -> Result<Config, ConfigError> {
        let invalid = |position, message| ConfigError::Invalid {
            file: origin.to_owned(),
            position,
            message,
        };
        if src.trim().is_empty() {
            return Err(invalid(
                None,
                "empty config: expected a mapping starting with `version: 1`".into(),
            ));
        }
        let mut cfg: Config = yaml::from_str(src).map_err(|e| invalid(e.position, e.message))?;
        let index = PositionIndex::build(src);
        validate::check(&cfg, &index).map_err(|e| invalid(e.position, e.message))?;
        let root = YamlPath::root();
        security::check(&cfg.auth, cfg.tls.as_ref(), &index, &root)
            .map_err(|e| invalid(e.position, e.message))?;
        security::load_secrets(&mut cfg.auth, cfg.tls.as_mut(), dir, &index, &root, resolve)
            .map_err(|e| invalid(e.position, e.message))?;
        cfg.config_dir = dir.to_owned();
        cfg.server.state_dir = resolve(dir, &cfg.server.state_dir);
        if let Some(local) = &mut cfg.lake.local {
            local.root = resolve(dir, &local.root);
        }
        if let Some(ca) = &mut cfg.alerts.webhook_ca {
            *ca = resolve(dir, ca);
        }
        Ok(cfg)
    }

    /// The effective config (defaults filled, paths resolved) as YAML; parsing it with
    /// the same origin gives an equal config.
    pub fn dump(&self) -> String {
        match yaml::to_string(self) {
            Ok(s) => s,
            // Only non-UTF-8 paths can fail here; say so in a YAML comment.
            Err(e) => format!("# cannot dump the config: {e}\n"),
        }
    }

    /// The source named `name`.
    pub fn source(&self, name: &str) -> Option<&SourceConfig> {
        self.sources.iter().find(|s| s.name == name)
    }
}

/// The directory of `file`, `.` when it has none.
fn dir_of(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// `p` made relative to `dir` when relative, without `.` components.
fn resolve(dir: &Path, p: &Path) -> PathBuf {
    let joined = if p.is_absolute() {
        p.to_owned()
    } else {
        dir.join(p)
    };
    let clean: PathBuf = joined
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect();
    if clean.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        clean
    }
}

#[cfg(test)]
mod tests;
