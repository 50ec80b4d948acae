//! The scheduler: one actor that owns the queue, the leases, the connected
//! agents and the store's single write connection. RPC handlers and the loop
//! only send it [`Command`]s through a cloneable [`Handle`].
//!
//! The actor runs on its own thread. It takes every command that has arrived
//! (up to a batch limit), applies them to its in-memory state and to one
//! SQLite transaction, dispatches, commits, and only then sends replies,
//! assignments and log entries (group commit): nothing is acknowledged or
//! handed out before it is durable.
//!
//! Architecture invariant: only the scheduler writes the queue, and a task is
//! leased to at most one agent at a time; an agent never holds more leases
//! than its slots.

mod actor;
mod queue;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use adce_proto::v1 as pb;
use tokio::sync::{mpsc as tmpsc, oneshot};

use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::logs::LogBus;
use crate::model::{AgentId, GapReason, LeaseId, Partition, Priority, TaskId, UnixMs};
use crate::reconcile::QueueView;
use crate::store::LogRow;

pub use actor::spawn;

/// Where the scheduler sends messages for one agent's Connect stream.
pub type AgentTx = tmpsc::UnboundedSender<Result<pb::ServerMessage, tonic::Status>>;

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

/// What the gateway found in the lake for a finished lease.
#[derive(Debug, Clone, Default)]
pub struct ObjectCheck {
    /// Expected keys absent from the lake.
    pub missing: Vec<String>,
    /// Expected keys present but too small, with their size.
    pub too_small: Vec<(String, u64)>,
}

/// A task the reconciler wants to exist.
#[derive(Debug, Clone)]
pub struct PlannedTask {
    /// Its source.
    pub source: String,
    /// Its scraper.
    pub scraper: String,
    /// Its partition.
    pub partition: Partition,
    /// Its priority.
    pub priority: Priority,
    /// Why.
    pub reason: GapReason,
    /// Keys it must produce.
    pub keys: Vec<String>,
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

/// Messages from an agent's stream the scheduler handles.
#[derive(Debug)]
pub enum AgentEvent {
    /// Liveness, with the leases it runs.
    Heartbeat(pb::Heartbeat),
    /// Progress of one lease.
    Progress(pb::Progress),
    /// Output lines of one lease.
    LogLines(pb::LogLines),
    /// The agent is draining: no new tasks for it.
    Draining(pb::Draining),
}

/// The scheduler's closed inbox.
#[derive(Debug)]
pub enum Command {
    /// An agent opened a Connect stream and said Hello.
    Connect {
        /// Its Hello.
        hello: pb::Hello,
        /// Its peer address.
        address: String,
        /// Distinguishes this stream from earlier ones of the same agent.
        conn_id: u64,
        /// Its outbound stream; the Welcome is sent there.
        tx: AgentTx,
        /// The caps it must fit in.
        limits: AdmissionLimits,
        /// Ok once registered.
        reply: oneshot::Sender<Result<()>>,
    },
    /// An agent's stream ended.
    Disconnect {
        /// The agent.
        agent: AgentId,
        /// Which stream.
        conn_id: u64,
    },
    /// The gateway cut an agent's stream off (it flooded, or sent a message
    /// above the size limit): its stream ends with `status`, and its leases
    /// follow the lost-agent path (they expire unless it reconnects).
    CutOff {
        /// The agent.
        agent: AgentId,
        /// Which stream.
        conn_id: u64,
        /// What the agent's stream ends with.
        status: tonic::Status,
    },
    /// A message on an agent's stream.
    FromAgent {
        /// The agent.
        agent: AgentId,
        /// What it said.
        event: AgentEvent,
    },
    /// Looks up a live lease held by `agent` (any agent when `None`).
    LeaseInfo {
        /// The lease.
        lease: LeaseId,
        /// The agent expected to hold it.
        agent: Option<AgentId>,
        /// The lease's task, or why it is not live.
        reply: oneshot::Sender<Result<LeaseInfo>>,
    },
    /// Records a committed upload.
    RecordUpload {
        /// The lease it was made under.
        lease: LeaseId,
        /// The key.
        key: String,
        /// Bytes.
        size: u64,
        /// Hex SHA-256.
        sha256: String,
        /// Done.
        reply: oneshot::Sender<Result<()>>,
    },
    /// An agent reported a lease's result; the gateway checked the lake.
    Complete {
        /// The agent.
        agent: AgentId,
        /// The result.
        result: pb::TaskResult,
        /// What the lake holds of the expected keys.
        check: ObjectCheck,
        /// Done, or why the result was refused.
        reply: oneshot::Sender<Result<()>>,
    },
    /// Creates or reopens tasks for planned gaps.
    ApplyPlan {
        /// The tasks.
        tasks: Vec<PlannedTask>,
        /// When the lake observation the plan is based on began.
        observed_at: UnixMs,
        /// How many tasks were created or reopened.
        reply: oneshot::Sender<Result<u64>>,
    },
    /// The queue as planning sees it.
    QueueView {
        /// The view.
        reply: oneshot::Sender<Result<QueueView>>,
    },
    /// Turns dispatch on or off.
    SetDispatch {
        /// On or off.
        enabled: bool,
    },
    /// Sets how long log entries are kept (`server.log_retention`); the next
    /// tick prunes by it.
    SetLogRetention(crate::config::LogRetention),
    /// The server is stopping: tells every connected agent (`ServerStopping`)
    /// and assigns nothing from then on.
    AnnounceStop {
        /// Why, for the agents' logs.
        reason: String,
        /// How long the server waits for running tasks.
        grace: Duration,
    },
    /// Queue numbers.
    Stats {
        /// The numbers.
        reply: oneshot::Sender<QueueStats>,
    },
    /// Queue numbers and waiting notes.
    Report {
        /// The report.
        reply: oneshot::Sender<QueueReport>,
    },
    /// Connected agents.
    Agents {
        /// The agents.
        reply: oneshot::Sender<Vec<AgentSnapshot>>,
    },
    /// Progress of running tasks.
    Progress {
        /// Task id → fraction.
        reply: oneshot::Sender<std::collections::HashMap<TaskId, f64>>,
    },
    /// Puts dead, cancelled or unavailable tasks back to pending.
    Retry {
        /// Which tasks.
        which: RetrySelection,
        /// Retried ids, and why the others were skipped.
        reply: oneshot::Sender<Result<(Vec<TaskId>, Vec<String>)>>,
    },
    /// Cancels a pending or leased task.
    Cancel {
        /// The task.
        id: TaskId,
        /// Why.
        reason: String,
        /// Its state before.
        reply: oneshot::Sender<Result<crate::model::TaskState>>,
    },
    /// Swaps in a reloaded catalog: scrapers, sources and limit groups change;
    /// queued and running tasks stay.
    Reload {
        /// The new catalog.
        catalog: Arc<Catalog>,
        /// Done.
        reply: oneshot::Sender<()>,
    },
    /// Cancels every running task on its agent and puts it back in the
    /// queue (the loop was stopped with `--now`).
    StopRunning {
        /// Why, recorded on the attempts.
        reason: String,
        /// How many were stopped.
        reply: oneshot::Sender<Result<u64>>,
    },
    /// The limit groups now, for metrics and status.
    Limits {
        /// One snapshot per group.
        reply: oneshot::Sender<Vec<crate::limits::GroupSnapshot>>,
    },
    /// Tells one agent to drain: finish, take nothing new, exit.
    DrainAgent {
        /// The agent.
        agent: AgentId,
        /// The tasks it runs, or why it cannot be drained.
        reply: oneshot::Sender<Result<Vec<TaskId>>>,
    },
    /// Appends a server event to the log.
    Log(LogRow),
    /// Commits and stops the actor.
    Shutdown {
        /// Stopped.
        reply: oneshot::Sender<()>,
    },
}

/// Which tasks a retry is for.
#[derive(Debug, Clone)]
pub enum RetrySelection {
    /// These tasks.
    Ids(Vec<TaskId>),
    /// Every task in this state, of this source when given.
    State(crate::model::TaskState, Option<String>),
}

/// A cheap, cloneable handle to the scheduler.
#[derive(Debug, Clone)]
pub struct Handle {
    tx: mpsc::Sender<Command>,
    logs: LogBus,
    catalog: CatalogCell,
}

/// The catalog in force, shared: the scheduler replaces it on reload, readers
/// take the current one.
#[derive(Debug, Clone)]
pub struct CatalogCell(Arc<std::sync::RwLock<Arc<Catalog>>>);

impl CatalogCell {
    /// A cell holding `catalog`.
    pub fn new(catalog: Arc<Catalog>) -> Self {
        CatalogCell(Arc::new(std::sync::RwLock::new(catalog)))
    }

    /// The catalog in force.
    pub fn get(&self) -> Arc<Catalog> {
        match self.0.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the catalog.
    pub fn set(&self, catalog: Arc<Catalog>) {
        match self.0.write() {
            Ok(mut guard) => *guard = catalog,
            Err(poisoned) => *poisoned.into_inner() = catalog,
        }
    }
}

impl Handle {
    /// Sends a command without waiting.
    pub fn send(&self, cmd: Command) -> Result<()> {
        self.tx.send(cmd).map_err(|_| Error::Stopped("scheduler"))
    }

    /// Sends a command built around a reply channel and waits for the reply.
    pub async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        self.send(make(reply))?;
        rx.await.map_err(|_| Error::Stopped("scheduler"))
    }

    /// Appends a server event to the log (fire and forget).
    pub fn log(&self, row: LogRow) {
        let _ = self.send(Command::Log(row));
    }

    /// The log bus new entries are published on.
    pub fn logs(&self) -> &LogBus {
        &self.logs
    }

    /// The catalog in force.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.get()
    }
}
