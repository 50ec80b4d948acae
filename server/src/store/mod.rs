//! The durable state store: SQLite in WAL mode under `state_dir`. Owns the
//! schema and every SQL statement. Writes go through the scheduler's single
//! write connection (one transaction per batch); reads use their own
//! connections from a small pool so they never wait on the writer.
//!
//! The files: this one opens the connections (the [`Writer`] and the
//! [`WriteTxn`] it hands out, the [`Readers`] pool) and holds the row types
//! reads and writes share; `schema.rs` the ordered migrations; `read.rs`
//! every query; `write.rs` every statement that changes the database. How
//! partitions and keys are encoded is the model's (`crate::model::Encoded`),
//! since the planner encodes them below this layer.
//!
//! Invariants:
//! - The scheduler actor is the only writer: every write function takes a
//!   [`WriteTxn`], which only a [`Writer`] hands out, and only
//!   `scheduler::spawn` opens the `Writer` ([`Writer::open`]). Readers open
//!   the file read-only.
//! - `PRAGMA user_version` is how many of `schema::MIGRATIONS` a state has
//!   applied; a state from a newer adce is refused, never written.
//! - `task_counts` holds the counts of the task table by (state, priority,
//!   source, scraper); it is written in the same transactions as the tasks
//!   (the scheduler keeps it), and reads never count the task table.
//! - The partial index `tasks_ready` is the on-disk order of the ready queue
//!   (scraper, base priority, ready time, id).

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OpenFlags, Transaction};

use crate::error::{Error, Result};
use crate::model::{AgentId, GapReason, LeaseId, Partition, Priority, TaskId, TaskState, UnixMs};

mod read;
mod schema;
mod write;

pub use crate::model::{Encoded, partition_from_json, partition_to_json};
#[cfg(test)]
pub use read::load_active;
pub use read::{
    AttemptRow, LogFilter, TaskFilter, active_after, attempts, backlog_by_source, count_rows,
    delayed_count, get_task, ids_in_state, list_tasks, load_leased, log_tail, logs_after,
    pending_after, queue_view, recent_agents, task_counts, task_counts_by_source,
};
pub use write::{
    AttemptEnd, NewTask, Reopened, end_attempt, insert_log, insert_upload, lease_task, prune_logs,
    retry_task, set_counts, set_task_attempts, set_task_priority, set_task_state, touch_agent,
    upsert_agent, upsert_task,
};

/// The store's file name inside `state_dir`.
pub const DB_FILE: &str = "adce.db";

/// The write connection's page cache, in KiB.
const WRITER_CACHE_KIB: i64 = 32 * 1024;

/// How many idle read connections are kept.
const READ_POOL_SIZE: usize = 4;

/// How many prepared statements a connection keeps: every statement of the
/// write path, so none is parsed again per call.
const STATEMENT_CACHE: usize = 64;

/// Runs `sql` with `params` through the connection's statement cache.
fn exec(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(())
}

/// The store's one write connection. The scheduler actor is the only
/// writer of the store: every function that changes the database takes a
/// [`WriteTxn`], and only a `Writer` hands one out.
///
/// It reads like any connection between transactions (loading the queue at
/// start); reads inside a transaction go through the [`WriteTxn`].
#[derive(Debug)]
pub struct Writer {
    conn: Connection,
}

impl Writer {
    /// Opens (creating if needed) the write connection and brings the schema
    /// up to date.
    ///
    /// Only `scheduler::spawn` calls this (and tests): whoever holds the
    /// `Writer` is the store's one writer, and a tidy test keeps it so.
    pub fn open(state_dir: &Path) -> Result<Writer> {
        std::fs::create_dir_all(state_dir).map_err(|e| {
            Error::Internal(format!(
                "cannot create state dir {}: {e}",
                state_dir.display()
            ))
        })?;
        let path = state_dir.join(DB_FILE);
        let mut conn = Connection::open(&path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // NORMAL in WAL mode survives a process crash (SIGKILL); only an OS crash
        // or power loss can lose the last transactions.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // The writer's page cache holds the hot parts of the task indexes (a
        // million-task queue's inserts otherwise re-read index pages).
        // Checkpoints keep SQLite's default size: a larger one stalls the
        // writer (and every reply behind it) for its whole fsync.
        conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)?;
        configure(&conn)?;
        schema::migrate(&mut conn, &path)?;
        Ok(Writer { conn })
    }

    /// Begins a transaction (the scheduler's one per batch). Dropped without
    /// [`WriteTxn::commit`], it rolls back.
    pub fn transaction(&mut self) -> Result<WriteTxn<'_>> {
        Ok(WriteTxn(self.conn.transaction()?))
    }
}

impl Deref for Writer {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        &self.conn
    }
}

/// A transaction on the [`Writer`]: what every write function takes. It
/// reads like a connection too (window refills and the priority sweep read
/// the store in the batch's transaction).
#[derive(Debug)]
pub struct WriteTxn<'w>(Transaction<'w>);

impl WriteTxn<'_> {
    /// Commits everything written in it.
    pub fn commit(self) -> rusqlite::Result<()> {
        self.0.commit()
    }

    /// Undoes everything written in it (dropping it does too).
    pub fn rollback(self) -> rusqlite::Result<()> {
        self.0.rollback()
    }
}

impl Deref for WriteTxn<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        &self.0
    }
}

/// A small pool of read-only connections.
#[derive(Debug)]
pub struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl Readers {
    /// Readers of the store in `state_dir` (the writer must have created it).
    pub fn new(state_dir: &Path) -> Self {
        Readers {
            path: state_dir.join(DB_FILE),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Runs `f` with a read connection on a blocking thread.
    pub async fn with<T, F>(self: &std::sync::Arc<Self>, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let conn = match this.idle.lock().ok().and_then(|mut idle| idle.pop()) {
                Some(conn) => conn,
                None => {
                    let conn = Connection::open_with_flags(
                        &this.path,
                        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                    )?;
                    configure(&conn)?;
                    conn
                }
            };
            let out = f(&conn);
            if let Ok(mut idle) = this.idle.lock() {
                if idle.len() < READ_POOL_SIZE {
                    idle.push(conn);
                }
            }
            out
        })
        .await
        .map_err(|e| Error::Internal(format!("store reader panicked: {e}")))?
    }
}

/// A task row as the scheduler needs it to rebuild its in-memory queue.
#[derive(Debug, Clone)]
pub struct TaskRow {
    /// Its id.
    pub id: TaskId,
    /// Its source.
    pub source: String,
    /// Its partition.
    pub partition: Partition,
    /// Its scraper.
    pub scraper: String,
    /// Its state.
    pub state: TaskState,
    /// Its priority.
    pub priority: Priority,
    /// Why it exists.
    pub reason: GapReason,
    /// Attempts started.
    pub attempts: u32,
    /// When it is ready (pending) or rechecked (unavailable).
    pub ready_at: UnixMs,
    /// Its lease, when leased.
    pub lease: Option<(LeaseId, AgentId)>,
    /// The last error.
    pub last_error: String,
    /// Keys it must produce.
    pub expected_keys: Vec<String>,
    /// When it was created.
    pub created_at: UnixMs,
    /// When it last changed.
    pub updated_at: UnixMs,
    /// When it last reached a terminal state.
    pub finished_at: Option<UnixMs>,
}

const TASK_COLUMNS: &str = "id, source, partition_json, scraper, state, priority, reason, attempts, \
     ready_at, lease_id, agent_id, last_error, expected_keys, created_at, updated_at, finished_at";

fn task_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<TaskRow>> {
    let partition_json: String = row.get(2)?;
    let state: String = row.get(4)?;
    let reason: String = row.get(6)?;
    let lease_id: Option<String> = row.get(9)?;
    let agent_id: Option<String> = row.get(10)?;
    let keys_json: String = row.get(12)?;
    let build = || -> Result<TaskRow> {
        Ok(TaskRow {
            id: TaskId(row.get(0)?),
            source: row.get(1)?,
            partition: partition_from_json(&partition_json)?,
            scraper: row.get(3)?,
            state: TaskState::parse(&state)
                .ok_or_else(|| Error::Internal(format!("corrupt task state {state:?}")))?,
            priority: Priority::from_i64(row.get(5)?),
            reason: GapReason::parse(&reason).unwrap_or(GapReason::Missing),
            attempts: row.get(7)?,
            ready_at: row.get(8)?,
            lease: lease_id
                .zip(agent_id)
                .map(|(l, a)| (LeaseId(l), AgentId(a))),
            last_error: row.get(11)?,
            expected_keys: serde_json::from_str(&keys_json)
                .map_err(|e| Error::Internal(format!("corrupt expected keys: {e}")))?,
            created_at: row.get(13)?,
            updated_at: row.get(14)?,
            finished_at: row.get(15)?,
        })
    };
    Ok(build())
}

fn collect_tasks(
    rows: impl Iterator<Item = rusqlite::Result<Result<TaskRow>>>,
) -> Result<Vec<TaskRow>> {
    let mut out = Vec::new();
    for row in rows {
        out.push(row??);
    }
    Ok(out)
}

/// An agent as stored.
#[derive(Debug, Clone)]
pub struct AgentRow {
    /// Its id.
    pub id: AgentId,
    /// Its host.
    pub hostname: String,
    /// Its labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Its slots.
    pub slots: u32,
    /// Its version.
    pub version: String,
    /// Its peer address.
    pub address: String,
    /// When it last connected.
    pub connected_at: UnixMs,
    /// When it was last heard from.
    pub last_seen: UnixMs,
}

/// One log entry as stored.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogRow {
    /// Sequence number; 0 until inserted.
    pub seq: u64,
    /// When.
    pub at: UnixMs,
    /// `adce_proto::v1::LogLevel` as i32.
    pub level: i32,
    /// Task, or 0.
    pub task_id: i64,
    /// Agent, or empty.
    pub agent_id: String,
    /// Source, or empty.
    pub source: String,
    /// `adce_proto::v1::OutputStream` as i32.
    pub stream: i32,
    /// The text.
    pub message: String,
}

/// One row of the task counts: a (state, priority, source, scraper) and how
/// many tasks it has.
pub type CountRow = (TaskState, Priority, String, String, u64);
