//! What a decision produces, as data: the store [`Write`]s it needs and the
//! messages and replies it releases. The run loop applies the writes inside
//! the batch's transaction ([`Effects::apply`]) and releases everything else
//! only after the commit ([`Effects::release`]): nothing leaves the process
//! before it is durable.
//!
//! This is the seam a second store backend plugs into. Two writes are made
//! in place instead, because the store decides them with one conditional
//! statement: a plan's create-or-reopen (`plan.rs`) and an operator's retry
//! (`operator.rs`).

use std::sync::Arc;

use super::{AgentTx, ToAgent};
use crate::error::Result;
use crate::logs::LogBus;
use crate::model::{AgentId, LeaseId, Priority, TaskId, TaskState, UnixMs};
use crate::store::{self, AgentRow, AttemptEnd, CountRow, LogRow, WriteTxn};

/// One change to the store.
#[derive(Debug, Clone)]
pub(super) enum Write {
    /// A task is leased: its row and a new attempt row.
    Lease {
        task: TaskId,
        attempt: u32,
        lease: LeaseId,
        agent: AgentId,
        at: UnixMs,
    },
    /// An attempt ended.
    EndAttempt {
        task: TaskId,
        number: u32,
        exit_code: Option<i32>,
        outcome: &'static str,
        error: String,
        at: UnixMs,
    },
    /// A task moves to `state` (its lease cleared).
    SetState {
        task: TaskId,
        state: TaskState,
        ready_at: UnixMs,
        error: String,
        at: UnixMs,
    },
    /// A task's counted attempts.
    SetAttempts { task: TaskId, attempts: u32 },
    /// A task's base priority.
    SetPriority {
        task: TaskId,
        priority: Priority,
        at: UnixMs,
    },
    /// An upload the lake committed.
    Upload {
        task: TaskId,
        attempt: u32,
        lease: LeaseId,
        key: String,
        size: u64,
        sha256: String,
        at: UnixMs,
    },
    /// An agent connected.
    UpsertAgent(AgentRow),
    /// An agent was heard from.
    TouchAgent { agent: AgentId, at: UnixMs },
    /// A log entry (its sequence number is given when applied).
    Log(LogRow),
    /// Log entries older than `before` and beyond the newest `keep_rows` go.
    PruneLogs { before: UnixMs, keep_rows: u64 },
    /// Task counts that changed.
    Counts(Vec<CountRow>),
}

/// Something released after the commit, in the order decided.
enum Release {
    Send(AgentTx, ToAgent),
    Reply(Box<dyn FnOnce() + Send>),
}

/// The writes and releases of one batch.
#[derive(Default)]
pub(super) struct Effects {
    writes: Vec<Write>,
    releases: Vec<Release>,
    logs: Vec<Arc<LogRow>>,
}

impl Effects {
    /// Adds a store write.
    pub fn write(&mut self, write: Write) {
        self.writes.push(write);
    }

    /// Adds a log entry.
    pub fn log(&mut self, row: LogRow) {
        self.writes.push(Write::Log(row));
    }

    /// Replies `value` on `tx` after the commit.
    pub fn reply<T: Send + 'static>(&mut self, tx: tokio::sync::oneshot::Sender<T>, value: T) {
        self.releases.push(Release::Reply(Box::new(move || {
            let _ = tx.send(value);
        })));
    }

    /// Sends `message` down an agent's stream after the commit.
    pub fn send(&mut self, tx: &AgentTx, message: ToAgent) {
        self.releases.push(Release::Send(tx.clone(), message));
    }

    /// Applies the writes decided so far inside `tx`.
    pub fn apply(&mut self, tx: &WriteTxn<'_>) -> Result<()> {
        for write in self.writes.drain(..) {
            match write {
                Write::Lease {
                    task,
                    attempt,
                    lease,
                    agent,
                    at,
                } => store::lease_task(tx, task, attempt, &lease, &agent, at)?,
                Write::EndAttempt {
                    task,
                    number,
                    exit_code,
                    outcome,
                    error,
                    at,
                } => store::end_attempt(
                    tx,
                    &AttemptEnd {
                        task,
                        number,
                        exit_code,
                        outcome,
                        error: &error,
                    },
                    at,
                )?,
                Write::SetState {
                    task,
                    state,
                    ready_at,
                    error,
                    at,
                } => store::set_task_state(tx, task, state, ready_at, &error, at)?,
                Write::SetAttempts { task, attempts } => {
                    store::set_task_attempts(tx, task, attempts)?
                }
                Write::SetPriority { task, priority, at } => {
                    store::set_task_priority(tx, task, priority, at)?
                }
                Write::Upload {
                    task,
                    attempt,
                    lease,
                    key,
                    size,
                    sha256,
                    at,
                } => store::insert_upload(tx, task, attempt, &lease, &key, size, &sha256, at)?,
                Write::UpsertAgent(row) => store::upsert_agent(tx, &row)?,
                Write::TouchAgent { agent, at } => store::touch_agent(tx, &agent, at)?,
                Write::Log(mut row) => {
                    row.seq = store::insert_log(tx, &row)?;
                    self.logs.push(Arc::new(row));
                }
                Write::Counts(rows) => store::set_counts(tx, &rows)?,
                Write::PruneLogs { before, keep_rows } => {
                    let pruned = store::prune_logs(tx, before, keep_rows)?;
                    if pruned > 0 {
                        tracing::debug!(pruned, "old log entries pruned");
                    }
                }
            }
        }
        Ok(())
    }

    /// Publishes the committed log entries and releases the messages and
    /// replies, in order. Call only after the commit.
    pub fn release(self, bus: &LogBus) {
        debug_assert!(self.writes.is_empty(), "writes left unapplied");
        for row in self.logs {
            bus.publish(row);
        }
        for release in self.releases {
            match release {
                Release::Send(tx, message) => {
                    let _ = tx.send(message);
                }
                Release::Reply(reply) => reply(),
            }
        }
    }
}
