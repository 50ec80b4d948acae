//! The scheduler: one actor that owns the queue, the leases, the connected
//! agents and the store's single write connection. Everyone else talks to it
//! through the typed, cloneable [`Handle`]; its command inbox is private.
//!
//! The actor runs on its own thread (`run.rs`). It takes every command that
//! has arrived (up to a batch limit), decides each against its in-memory
//! state, applies the store writes in one SQLite transaction, dispatches,
//! commits, and only then sends replies, assignments and log entries (group
//! commit): nothing is acknowledged or handed out before it is durable.
//!
//! Where each decision lives:
//! - `agents.rs`: admission, connect (re-attaching running leases),
//!   disconnect, cut-off, drain, the stop notice, and routing notes about
//!   work no connected agent may run;
//! - `leases.rs`: dispatch and assignment, heartbeats, expiry, revocation,
//!   and ending a lease with a verdict;
//! - `verdict.rs`: a run's typed [`Outcome`] → [`Verdict`] → next state (pure);
//! - `output.rs`: scraper output lines and their per-lease rate budget;
//! - `operator.rs`: retry, cancel, stop running tasks, reload, reprioritize;
//! - `plan.rs`: applying a reconcile plan, and the queue as planning sees it;
//! - `queue.rs`: the ready queue (pure);
//! - `effects.rs`: the store writes and messages a decision produces;
//! - `counts.rs`: task counts by state, kept as tasks move;
//! - `state.rs`: the state those share; `handle.rs`: the handle and inbox;
//!   `run.rs`: the thread, its loop and the group commit.
//!
//! The scheduler speaks domain types only: the gateway converts the wire
//! messages of agents to and from them (see `gateway/wire.rs`).
//!
//! Architecture invariant: only the scheduler writes the queue, and a task is
//! leased to at most one agent at a time; an agent never holds more leases
//! than its slots.

mod agents;
mod counts;
mod effects;
mod handle;
mod leases;
#[cfg(test)]
mod model_tests;
mod operator;
mod output;
mod plan;
mod queue;
mod run;
mod state;
pub mod verdict;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crate::catalog::ArgPiece;
use crate::error::Error;
use crate::model::{AgentId, LeaseId, Partition, Priority, TaskId, UnixMs};

pub use crate::logs::OutputStream;
pub use crate::reconcile::plan::PlannedTask;
pub use handle::{CatalogCell, Handle};
pub use run::spawn;
pub use verdict::{ObjectCheck, Outcome};

/// Where the scheduler sends messages for one agent's Connect stream.
pub type AgentTx = tokio::sync::mpsc::UnboundedSender<ToAgent>;

/// What an agent says when its Connect stream opens.
#[derive(Debug, Clone, Default)]
pub struct AgentHello {
    /// Its id, chosen by the agent.
    pub agent_id: String,
    /// Its host.
    pub hostname: String,
    /// Its labels, matched against scrapers' `requires`.
    pub labels: BTreeMap<String, String>,
    /// Tasks it may run at once.
    pub slots: u32,
    /// Its version.
    pub version: String,
    /// Leases it still runs (after a reconnect).
    pub running_leases: Vec<LeaseId>,
}

/// An agent's report that a lease's run ended.
#[derive(Debug, Clone)]
pub struct TaskResult {
    /// The lease.
    pub lease: LeaseId,
    /// How the run ended.
    pub outcome: Outcome,
    /// What the agent adds, for people.
    pub message: String,
}

/// One line a scraper printed.
#[derive(Debug, Clone)]
pub struct OutputLine {
    /// Its stream.
    pub stream: OutputStream,
    /// The text, without the newline.
    pub text: String,
    /// When the agent read it (0: unknown).
    pub unix_ms: UnixMs,
}

/// What the scheduler sends down an agent's Connect stream.
#[derive(Debug)]
pub enum ToAgent {
    /// The agent is registered.
    Welcome {
        /// Its id.
        agent_id: AgentId,
        /// How often it must heartbeat.
        heartbeat_interval: Duration,
        /// How long a lease lives without a heartbeat.
        lease_ttl: Duration,
    },
    /// Run a task.
    Assign(Box<Assignment>),
    /// Kill a lease's run.
    Cancel {
        /// The lease.
        lease: LeaseId,
        /// Why.
        reason: String,
    },
    /// Finish running tasks, take no new ones, exit.
    Drain {
        /// Why.
        reason: String,
    },
    /// The server is stopping: keep running tasks, reconnect later.
    Stopping(StopNotice),
    /// The stream ends with this error; nothing follows it.
    End(Error),
}

/// The server's notice that it is stopping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopNotice {
    /// Why, for the agents' logs.
    pub reason: String,
    /// How long the server waits for running tasks.
    pub grace: Duration,
}

/// A task handed to an agent under a fresh lease.
#[derive(Debug, Clone)]
pub struct Assignment {
    /// The task.
    pub task_id: TaskId,
    /// Its new lease.
    pub lease: LeaseId,
    /// Its source.
    pub source: String,
    /// Its scraper.
    pub scraper: String,
    /// The attempt number, from 1.
    pub attempt: u32,
    /// Its partition.
    pub partition: Partition,
    /// The scraper's argv, rendered.
    pub argv: Vec<Vec<ArgPiece>>,
    /// The environment to run it with.
    pub env: HashMap<String, String>,
    /// How long it may run.
    pub timeout: Duration,
    /// Keys it must produce.
    pub expected_keys: Vec<String>,
    /// Its priority.
    pub priority: Priority,
}

/// Timings of the scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    /// How often agents heartbeat.
    pub heartbeat_interval: Duration,
    /// How long a lease lives without a heartbeat.
    pub lease_ttl: Duration,
    /// Where `{config_dir}` in scraper commands points.
    pub config_dir: std::path::PathBuf,
    /// Ready work no connected agent may run is reported after this long.
    pub no_agent_after: Duration,
    /// A task ready this long rises one priority level (zero: no aging).
    pub aging: Duration,
    /// Where dispatches, results and throttles are counted.
    pub metrics: crate::metrics::Metrics,
}

/// Ready tasks of one scraper that no connected agent may run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitingNote {
    /// The scraper.
    pub scraper: String,
    /// Why, for a person (`no agent with proxy=residential`).
    pub reason: String,
    /// Its ready tasks.
    pub ready: u64,
    /// Since when.
    pub since: UnixMs,
}

/// What the gateway needs to know about a live lease.
#[derive(Debug, Clone)]
pub struct LeaseInfo {
    /// The agent holding it.
    pub holder: AgentId,
    /// The task.
    pub task_id: TaskId,
    /// Its source.
    pub source: String,
    /// The attempt the lease belongs to.
    pub attempt: u32,
    /// Keys the task must produce.
    pub expected_keys: Vec<String>,
    /// Objects smaller than this are invalid.
    pub min_bytes: u64,
}

/// Queue numbers the loop and status need.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueStats {
    /// Pending tasks ready now.
    pub ready: u64,
    /// Pending tasks waiting for their ready time.
    pub delayed: u64,
    /// Leased tasks.
    pub leased: u64,
    /// Whether dispatch is on.
    pub dispatching: bool,
    /// Tasks done since the server started.
    pub done_total: u64,
    /// Attempts that failed since the server started.
    pub failed_total: u64,
}

/// Queue numbers with the notes about work no agent may run.
#[derive(Debug, Clone, Default)]
pub struct QueueReport {
    /// The numbers.
    pub stats: QueueStats,
    /// Scrapers whose ready tasks have had no eligible agent for longer than
    /// `no_agent_after`.
    pub waiting: Vec<WaitingNote>,
    /// When the longest-waiting ready task became ready.
    pub oldest_ready: Option<UnixMs>,
}

/// A connected agent, for status.
#[derive(Debug, Clone)]
pub struct AgentSnapshot {
    /// Its id.
    pub id: AgentId,
    /// Its host.
    pub hostname: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its slots.
    pub slots: u32,
    /// Its version.
    pub version: String,
    /// Its peer address.
    pub address: String,
    /// When it connected.
    pub connected_at: UnixMs,
    /// When it was last heard from.
    pub last_seen: UnixMs,
    /// Tasks it runs.
    pub running: Vec<TaskId>,
}

/// Who may connect: checked when an agent says Hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Agents connected at once; a new agent beyond is refused (a reconnect
    /// of a connected agent replaces it and does not count twice).
    pub max_agents: u32,
    /// The most slots one agent may announce.
    pub max_slots: u32,
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        AdmissionLimits {
            max_agents: crate::config::DEFAULT_MAX_AGENTS,
            max_slots: crate::config::DEFAULT_MAX_SLOTS_PER_AGENT,
        }
    }
}

/// Which tasks a retry is for.
#[derive(Debug, Clone)]
pub enum RetrySelection {
    /// These tasks.
    Ids(Vec<TaskId>),
    /// Every task in this state, of this source when given.
    State(crate::model::TaskState, Option<String>),
}
