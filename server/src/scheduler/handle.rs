//! The scheduler's typed [`Handle`] and its private command inbox. Every
//! request is one method: those that need an answer await the reply, which
//! the actor sends only after the batch that decided it has committed; the
//! others are fire-and-forget.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::{
    AdmissionLimits, AgentHello, AgentSnapshot, AgentTx, LeaseInfo, ObjectCheck, OutputLine,
    PlannedTask, QueueReport, QueueStats, RetrySelection, TaskResult,
};
use crate::catalog::Catalog;
use crate::config::LogRetention;
use crate::error::{Error, Result};
use crate::limits::GroupSnapshot;
use crate::logs::LogBus;
use crate::model::{AgentId, LeaseId, TaskId, TaskState, UnixMs};
use crate::store::LogRow;

/// A reply channel.
pub(super) type Reply<T> = oneshot::Sender<T>;

/// The scheduler's closed inbox; built only by [`Handle`].
#[derive(Debug)]
pub(super) enum Command {
    /// An agent opened a Connect stream and said Hello.
    Connect {
        hello: AgentHello,
        address: String,
        conn_id: u64,
        tx: AgentTx,
        limits: AdmissionLimits,
        reply: Reply<Result<()>>,
    },
    /// An agent's stream ended.
    Disconnect { agent: AgentId, conn_id: u64 },
    /// The gateway cut an agent's stream off: it ends with `error`.
    CutOff {
        agent: AgentId,
        conn_id: u64,
        error: Error,
    },
    /// Liveness, with the leases the agent runs.
    Heartbeat {
        agent: AgentId,
        running: Vec<LeaseId>,
    },
    /// Progress of one lease.
    Progress {
        agent: AgentId,
        lease: LeaseId,
        fraction: f64,
    },
    /// Output lines of one lease.
    Output {
        agent: AgentId,
        lease: LeaseId,
        lines: Vec<OutputLine>,
    },
    /// The agent is draining.
    Draining { agent: AgentId, reason: String },
    /// Looks up a live lease held by `agent` (any agent when `None`).
    LeaseInfo {
        lease: LeaseId,
        agent: Option<AgentId>,
        reply: Reply<Result<LeaseInfo>>,
    },
    /// Records a committed upload.
    RecordUpload {
        lease: LeaseId,
        key: String,
        size: u64,
        sha256: String,
        reply: Reply<Result<()>>,
    },
    /// An agent reported a lease's result; the gateway checked the lake.
    Complete {
        agent: AgentId,
        result: TaskResult,
        check: ObjectCheck,
        reply: Reply<Result<()>>,
    },
    /// Creates or reopens tasks for planned gaps.
    ApplyPlan {
        tasks: Vec<PlannedTask>,
        observed_at: UnixMs,
        reply: Reply<Result<u64>>,
    },
    /// Turns dispatch on or off.
    SetDispatch { enabled: bool },
    /// Sets how long log entries are kept.
    SetLogRetention(LogRetention),
    /// The server is stopping: agents are told, nothing more is assigned.
    AnnounceStop { reason: String, grace: Duration },
    /// Queue numbers.
    Stats { reply: Reply<QueueStats> },
    /// Queue numbers and waiting notes.
    Report { reply: Reply<QueueReport> },
    /// Connected agents.
    Agents { reply: Reply<Vec<AgentSnapshot>> },
    /// Progress of running tasks.
    ProgressMap { reply: Reply<HashMap<TaskId, f64>> },
    /// Puts dead, cancelled or unavailable tasks back to pending.
    Retry {
        which: RetrySelection,
        reply: Reply<Result<(Vec<TaskId>, Vec<String>)>>,
    },
    /// Cancels a pending or leased task.
    Cancel {
        id: TaskId,
        reason: String,
        reply: Reply<Result<TaskState>>,
    },
    /// Swaps in a reloaded catalog.
    Reload {
        catalog: Arc<Catalog>,
        reply: Reply<()>,
    },
    /// Cancels every running task and queues it again.
    StopRunning {
        reason: String,
        reply: Reply<Result<u64>>,
    },
    /// The limit groups now.
    Limits { reply: Reply<Vec<GroupSnapshot>> },
    /// Tells one agent to drain.
    DrainAgent {
        agent: AgentId,
        reply: Reply<Result<Vec<TaskId>>>,
    },
    /// Appends a server event to the log.
    Log(LogRow),
    /// Commits and stops the actor.
    Shutdown { reply: Reply<()> },
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
    pub(super) fn new(tx: mpsc::Sender<Command>, logs: LogBus, catalog: CatalogCell) -> Self {
        Handle { tx, logs, catalog }
    }

    /// Sends a command without waiting.
    fn send(&self, cmd: Command) -> Result<()> {
        self.tx.send(cmd).map_err(|_| Error::Stopped("scheduler"))
    }

    /// Sends a command built around a reply channel and waits for the reply.
    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        self.send(make(reply))?;
        rx.await.map_err(|_| Error::Stopped("scheduler"))
    }

    /// Registers an agent that said `hello` on stream `conn_id`; its
    /// Welcome (or nothing, on refusal) goes to `tx`.
    pub async fn connect(
        &self,
        hello: AgentHello,
        address: String,
        conn_id: u64,
        tx: AgentTx,
        limits: AdmissionLimits,
    ) -> Result<()> {
        self.call(|reply| Command::Connect {
            hello,
            address,
            conn_id,
            tx,
            limits,
            reply,
        })
        .await?
    }

    /// Stream `conn_id` of `agent` ended; its leases expire unless it
    /// reconnects.
    pub fn disconnect(&self, agent: AgentId, conn_id: u64) -> Result<()> {
        self.send(Command::Disconnect { agent, conn_id })
    }

    /// Ends stream `conn_id` of `agent` from the server's side with `error`
    /// (it flooded, or sent a message above the size limit).
    pub fn cut_off(&self, agent: AgentId, conn_id: u64, error: Error) -> Result<()> {
        self.send(Command::CutOff {
            agent,
            conn_id,
            error,
        })
    }

    /// `agent` is alive and runs `running`.
    pub fn heartbeat(&self, agent: AgentId, running: Vec<LeaseId>) -> Result<()> {
        self.send(Command::Heartbeat { agent, running })
    }

    /// `agent` reports `lease` at `fraction` done.
    pub fn progress(&self, agent: AgentId, lease: LeaseId, fraction: f64) -> Result<()> {
        self.send(Command::Progress {
            agent,
            lease,
            fraction,
        })
    }

    /// Lines the scraper of `lease` printed.
    pub fn output(&self, agent: AgentId, lease: LeaseId, lines: Vec<OutputLine>) -> Result<()> {
        self.send(Command::Output {
            agent,
            lease,
            lines,
        })
    }

    /// `agent` is draining: it gets no new tasks.
    pub fn draining(&self, agent: AgentId, reason: String) -> Result<()> {
        self.send(Command::Draining { agent, reason })
    }

    /// The live lease `lease`, held by `agent` when given.
    pub async fn lease_info(&self, lease: LeaseId, agent: Option<AgentId>) -> Result<LeaseInfo> {
        self.call(|reply| Command::LeaseInfo {
            lease,
            agent,
            reply,
        })
        .await?
    }

    /// Records an upload the lake committed under `lease`.
    pub async fn record_upload(
        &self,
        lease: LeaseId,
        key: String,
        size: u64,
        sha256: String,
    ) -> Result<()> {
        self.call(|reply| Command::RecordUpload {
            lease,
            key,
            size,
            sha256,
            reply,
        })
        .await?
    }

    /// Judges the result `agent` reported, given what the lake holds.
    pub async fn complete(
        &self,
        agent: AgentId,
        result: TaskResult,
        check: ObjectCheck,
    ) -> Result<()> {
        self.call(|reply| Command::Complete {
            agent,
            result,
            check,
            reply,
        })
        .await?
    }

    /// Creates or reopens tasks for planned gaps; how many were.
    pub async fn apply_plan(&self, tasks: Vec<PlannedTask>, observed_at: UnixMs) -> Result<u64> {
        self.call(|reply| Command::ApplyPlan {
            tasks,
            observed_at,
            reply,
        })
        .await?
    }

    /// Turns dispatch on or off.
    pub fn set_dispatch(&self, enabled: bool) -> Result<()> {
        self.send(Command::SetDispatch { enabled })
    }

    /// Sets how long log entries are kept (`server.log_retention`).
    pub fn set_log_retention(&self, retention: LogRetention) -> Result<()> {
        self.send(Command::SetLogRetention(retention))
    }

    /// Tells every agent the server is stopping; nothing more is assigned.
    pub fn announce_stop(&self, reason: String, grace: Duration) -> Result<()> {
        self.send(Command::AnnounceStop { reason, grace })
    }

    /// Queue numbers.
    pub async fn stats(&self) -> Result<QueueStats> {
        self.call(|reply| Command::Stats { reply }).await
    }

    /// Queue numbers with the notes about work no agent may run.
    pub async fn report(&self) -> Result<QueueReport> {
        self.call(|reply| Command::Report { reply }).await
    }

    /// Connected agents.
    pub async fn agents(&self) -> Result<Vec<AgentSnapshot>> {
        self.call(|reply| Command::Agents { reply }).await
    }

    /// Progress of running tasks, by task.
    pub async fn progress_map(&self) -> Result<HashMap<TaskId, f64>> {
        self.call(|reply| Command::ProgressMap { reply }).await
    }

    /// Puts the selected dead, cancelled or unavailable tasks back in the
    /// queue: the ids retried, and why the others were skipped.
    pub async fn retry(&self, which: RetrySelection) -> Result<(Vec<TaskId>, Vec<String>)> {
        self.call(|reply| Command::Retry { which, reply }).await?
    }

    /// Cancels a pending or leased task; its state before.
    pub async fn cancel(&self, id: TaskId, reason: String) -> Result<TaskState> {
        self.call(|reply| Command::Cancel { id, reason, reply })
            .await?
    }

    /// Swaps in a reloaded catalog; queued and running tasks stay.
    pub async fn reload(&self, catalog: Arc<Catalog>) -> Result<()> {
        self.call(|reply| Command::Reload { catalog, reply }).await
    }

    /// Cancels every running task on its agent and queues it again; how
    /// many were stopped.
    pub async fn stop_running(&self, reason: String) -> Result<u64> {
        self.call(|reply| Command::StopRunning { reason, reply })
            .await?
    }

    /// The limit groups now.
    pub async fn limits(&self) -> Result<Vec<GroupSnapshot>> {
        self.call(|reply| Command::Limits { reply }).await
    }

    /// Tells `agent` to drain; the tasks it runs.
    pub async fn drain_agent(&self, agent: AgentId) -> Result<Vec<TaskId>> {
        self.call(|reply| Command::DrainAgent { agent, reply })
            .await?
    }

    /// Commits what is pending and stops the actor.
    pub async fn shutdown(&self) -> Result<()> {
        self.call(|reply| Command::Shutdown { reply }).await
    }

    /// Asks the actor to commit and stop, without waiting.
    pub fn stop(&self) {
        let (reply, _) = oneshot::channel();
        let _ = self.send(Command::Shutdown { reply });
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
