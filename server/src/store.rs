//! The durable state store: SQLite in WAL mode under `state_dir`. Owns the
//! schema and every SQL statement. Writes go through the scheduler's single
//! write connection (one transaction per batch); reads use their own
//! connections from a small pool so they never wait on the writer.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OpenFlags, OptionalExtension, Transaction, params};

use crate::error::{Error, Result};
use crate::model::{
    AgentId, GapReason, LeaseId, Partition, Priority, TaskId, TaskState, UnixMs, Value,
};

/// The store's file name inside `state_dir`.
pub const DB_FILE: &str = "adce.db";

/// The write connection's page cache, in KiB.
const WRITER_CACHE_KIB: i64 = 32 * 1024;

/// How many idle read connections are kept.
const READ_POOL_SIZE: usize = 4;

/// The first schema (states before versioning carry user_version 0 and
/// this schema, so it is written to apply to them unchanged).
const SCHEMA_V1: &str = r#"
CREATE TABLE IF NOT EXISTS tasks (
    id             INTEGER PRIMARY KEY,
    source         TEXT    NOT NULL,
    partition_key  TEXT    NOT NULL,
    partition_json TEXT    NOT NULL,
    scraper        TEXT    NOT NULL,
    state          TEXT    NOT NULL,
    priority       INTEGER NOT NULL,
    reason         TEXT    NOT NULL,
    attempts       INTEGER NOT NULL DEFAULT 0,
    ready_at       INTEGER NOT NULL,
    lease_id       TEXT,
    agent_id       TEXT,
    last_error     TEXT    NOT NULL DEFAULT '',
    expected_keys  TEXT    NOT NULL,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    finished_at    INTEGER,
    UNIQUE (source, partition_key)
);
CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks (state, priority);
CREATE TABLE IF NOT EXISTS attempts (
    task_id    INTEGER NOT NULL,
    number     INTEGER NOT NULL,
    lease_id   TEXT    NOT NULL,
    agent_id   TEXT    NOT NULL,
    started_at INTEGER NOT NULL,
    ended_at   INTEGER,
    exit_code  INTEGER,
    outcome    TEXT    NOT NULL DEFAULT '',
    error      TEXT    NOT NULL DEFAULT '',
    PRIMARY KEY (task_id, number)
);
CREATE TABLE IF NOT EXISTS uploads (
    id         INTEGER PRIMARY KEY,
    task_id    INTEGER NOT NULL,
    attempt    INTEGER NOT NULL,
    lease_id   TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    size       INTEGER NOT NULL,
    sha256     TEXT    NOT NULL,
    at         INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS agents (
    id           TEXT PRIMARY KEY,
    hostname     TEXT    NOT NULL,
    labels_json  TEXT    NOT NULL,
    slots        INTEGER NOT NULL,
    version      TEXT    NOT NULL,
    address      TEXT    NOT NULL,
    connected_at INTEGER NOT NULL,
    last_seen    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS logs (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    at       INTEGER NOT NULL,
    level    INTEGER NOT NULL,
    task_id  INTEGER NOT NULL DEFAULT 0,
    agent_id TEXT    NOT NULL DEFAULT '',
    source   TEXT    NOT NULL DEFAULT '',
    stream   INTEGER NOT NULL DEFAULT 0,
    message  TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_by_task ON logs (task_id, seq);
"#;

/// Version 2: task counts by (state, priority, source, scraper), kept by the
/// scheduler in the same transactions as the tasks, so status never counts
/// the task table; and the index the ready queue is refilled from.
const SCHEMA_V2: &str = r#"
CREATE TABLE task_counts (
    state    TEXT    NOT NULL,
    priority INTEGER NOT NULL,
    source   TEXT    NOT NULL,
    scraper  TEXT    NOT NULL,
    n        INTEGER NOT NULL,
    PRIMARY KEY (state, priority, source, scraper)
) WITHOUT ROWID;
INSERT INTO task_counts (state, priority, source, scraper, n)
    SELECT state, priority, source, scraper, COUNT(*) FROM tasks
    GROUP BY state, priority, source, scraper;
CREATE INDEX tasks_ready ON tasks (scraper, priority, ready_at, id) WHERE state = 'pending';
"#;

/// Every schema version in order; `PRAGMA user_version` is how many of them
/// a state directory has applied.
const MIGRATIONS: &[&str] = &[SCHEMA_V1, SCHEMA_V2];

/// Brings the schema up to date in one transaction, or refuses a state
/// directory written by a newer adce.
fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(Error::FailedPrecondition(format!(
            "the state in {} has schema version {version}, written by a newer adce; this adce \
             knows versions up to {known}: run the newer adce, or point server.state_dir elsewhere",
            path.display()
        )));
    }
    if version == known {
        return Ok(());
    }
    let tx = conn.transaction()?;
    for (n, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(migration)?;
        tracing::info!(version = n + 1, "state schema migrated");
    }
    tx.pragma_update(None, "user_version", known)?;
    tx.commit()?;
    Ok(())
}

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

/// Opens (creating if needed) the write connection and brings the schema up to date.
pub fn open_writer(state_dir: &Path) -> Result<Connection> {
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
    migrate(&mut conn, &path)?;
    Ok(conn)
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
pub fn partition_from_json(s: &str) -> Result<Partition> {
    let vars: Vec<[String; 3]> = serde_json::from_str(s)
        .map_err(|e| Error::Internal(format!("corrupt partition {s:?}: {e}")))?;
    let mut out = Partition::default();
    for [name, value, kind] in vars {
        let value = if kind == "date" {
            Value::Date(
                chrono::NaiveDate::parse_from_str(&value, "%Y-%m-%d")
                    .map_err(|e| Error::Internal(format!("corrupt date {value:?}: {e}")))?,
            )
        } else {
            Value::Str(value)
        };
        out.vars.push((name, value));
    }
    Ok(out)
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

/// Every pending or leased task (tests compare them with the scheduler's memory).
#[cfg(test)]
pub fn load_active(conn: &Connection) -> Result<Vec<TaskRow>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {TASK_COLUMNS} FROM tasks WHERE state IN ('pending', 'leased')"
    ))?;
    let rows = stmt.query_map([], task_from_row)?;
    collect_tasks(rows)
}

/// Every leased task, to re-arm the live leases at start.
pub fn load_leased(conn: &Connection) -> Result<Vec<TaskRow>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {TASK_COLUMNS} FROM tasks WHERE state = 'leased'"
    ))?;
    let rows = stmt.query_map([], task_from_row)?;
    collect_tasks(rows)
}

/// Up to `limit` pending tasks of `scraper` at base `priority` after the
/// dispatch key `after` (ready time, id; from the start when `None`), in
/// that order: how the ready queue refills its window (index `tasks_ready`).
pub fn pending_after(
    conn: &Connection,
    scraper: &str,
    priority: Priority,
    after: Option<(UnixMs, TaskId)>,
    limit: usize,
) -> Result<Vec<TaskRow>> {
    let (ready_at, id) = after.unwrap_or((i64::MIN, TaskId(i64::MIN)));
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {TASK_COLUMNS} FROM tasks INDEXED BY tasks_ready \
         WHERE state = 'pending' AND scraper = ?1 AND priority = ?2 \
           AND (ready_at, id) > (?3, ?4) \
         ORDER BY ready_at, id LIMIT ?5"
    ))?;
    let rows = stmt.query_map(
        params![
            scraper,
            priority.as_i64(),
            ready_at,
            id.0,
            i64::try_from(limit).unwrap_or(i64::MAX)
        ],
        task_from_row,
    )?;
    collect_tasks(rows)
}

/// Pending tasks of `scraper` at base `priority` not ready before `now`.
pub fn delayed_count(
    conn: &Connection,
    scraper: &str,
    priority: Priority,
    now: UnixMs,
) -> Result<u64> {
    let n: i64 = conn
        .prepare_cached(
            "SELECT COUNT(*) FROM tasks INDEXED BY tasks_ready \
             WHERE state = 'pending' AND scraper = ?1 AND priority = ?2 AND ready_at > ?3",
        )?
        .query_row(params![scraper, priority.as_i64(), now], |row| row.get(0))?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Up to `limit` pending or leased tasks with ids above `after`, by id: how
/// priority rules are re-applied to the whole queue a chunk at a time.
pub fn active_after(conn: &Connection, after: TaskId, limit: usize) -> Result<Vec<TaskRow>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {TASK_COLUMNS} FROM tasks WHERE id > ?1 AND state IN ('pending', 'leased') \
         ORDER BY id LIMIT ?2"
    ))?;
    let rows = stmt.query_map(
        params![after.0, i64::try_from(limit).unwrap_or(i64::MAX)],
        task_from_row,
    )?;
    collect_tasks(rows)
}

/// The queue as planning sees it: every task that blocks planning a new one
/// for its partition (active, dead, cancelled, unavailable).
pub fn queue_view(conn: &Connection) -> Result<crate::reconcile::plan::QueueView> {
    use crate::reconcile::plan::QueueEntry;
    let mut stmt = conn.prepare(
        "SELECT source, partition_key, state, ready_at FROM tasks WHERE state != 'done'",
    )?;
    let mut rows = stmt.query([])?;
    let mut view = crate::reconcile::plan::QueueView::new();
    while let Some(row) = rows.next()? {
        let state: String = row.get(2)?;
        let entry = match TaskState::parse(&state) {
            Some(TaskState::Pending | TaskState::Leased) => QueueEntry::Active,
            Some(TaskState::Dead) => QueueEntry::Dead,
            Some(TaskState::Cancelled) => QueueEntry::Cancelled,
            Some(TaskState::Unavailable) => QueueEntry::Unavailable {
                recheck_at: row.get(3)?,
            },
            Some(TaskState::Done) | None => continue,
        };
        let (source, key): (String, String) = (row.get(0)?, row.get(1)?);
        view.insert(&source, &key, entry);
    }
    Ok(view)
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

/// A task the plan wants to exist.
#[derive(Debug, Clone)]
pub struct NewTask<'a> {
    /// Its source.
    pub source: &'a str,
    /// Its scraper.
    pub scraper: &'a str,
    /// Its priority.
    pub priority: Priority,
    /// Why.
    pub reason: GapReason,
    /// Its partition and expected keys, encoded.
    pub encoded: &'a Encoded,
}

/// Where an existing task was before a plan reopened it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reopened {
    /// Its state.
    pub state: TaskState,
    /// Its priority.
    pub priority: Priority,
    /// Its scraper.
    pub scraper: String,
}

/// The task of `source`'s partition `partition_key`, if any.
fn task_of_partition(
    tx: &Transaction<'_>,
    source: &str,
    partition_key: &str,
) -> Result<Option<Reopened>> {
    let row: Option<(String, i64, String)> = tx
        .prepare_cached(
            "SELECT state, priority, scraper FROM tasks WHERE source = ?1 AND partition_key = ?2",
        )?
        .query_row(params![source, partition_key], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .optional()?;
    Ok(row.and_then(|(state, priority, scraper)| {
        Some(Reopened {
            state: TaskState::parse(&state)?,
            priority: Priority::from_i64(priority),
            scraper,
        })
    }))
}

/// Creates the task, or reopens an existing one for the same partition when
/// that one is done and finished before `observed_at` (or is unavailable and
/// due for its recheck). Returns the id of the now-pending task and what it
/// was before (`None`: new), or `None` when the existing task must be left
/// alone.
pub fn upsert_task(
    tx: &Transaction<'_>,
    task: &NewTask<'_>,
    now: UnixMs,
    observed_at: UnixMs,
) -> Result<Option<(TaskId, Option<Reopened>)>> {
    let Encoded {
        partition_key,
        partition_json,
        keys_json: keys,
    } = task.encoded;
    // A new partition (the common case, and every one of a first reconcile)
    // costs one statement. (No RETURNING: SQLite gathers returned rows in a
    // temporary table per execution, which costs more than the insert.)
    let inserted = exec(
        tx,
        "INSERT INTO tasks (source, partition_key, partition_json, scraper, state, priority, \
             reason, attempts, ready_at, last_error, expected_keys, created_at, updated_at) \
         VALUES (?1, ?2, ?3, ?4, 'pending', ?5, ?6, 0, ?7, '', ?8, ?7, ?7) \
         ON CONFLICT (source, partition_key) DO NOTHING",
        params![
            task.source,
            partition_key,
            partition_json,
            task.scraper,
            task.priority.as_i64(),
            task.reason.as_str(),
            now,
            keys,
        ],
    )?;
    if inserted == 1 {
        return Ok(Some((TaskId(tx.last_insert_rowid()), None)));
    }
    let Some(before) = task_of_partition(tx, task.source, partition_key)? else {
        return Ok(None);
    };
    if before.state.is_active() {
        return Ok(None);
    }
    let id = tx
        .prepare_cached(
            "UPDATE tasks SET state = 'pending', priority = ?3, reason = ?4, scraper = ?5, \
                 attempts = 0, ready_at = ?6, lease_id = NULL, agent_id = NULL, \
                 last_error = '', expected_keys = ?7, updated_at = ?6, finished_at = NULL \
             WHERE source = ?1 AND partition_key = ?2 \
               AND ((state = 'done' AND finished_at < ?8) \
                 OR (state = 'unavailable' AND ready_at <= ?6)) \
             RETURNING id",
        )?
        .query_row(
            params![
                task.source,
                partition_key,
                task.priority.as_i64(),
                task.reason.as_str(),
                task.scraper,
                now,
                keys,
                observed_at,
            ],
            |row| row.get(0),
        )
        .optional()?;
    Ok(id.map(|id| (TaskId(id), Some(before))))
}

/// Records a new lease and its attempt row.
pub fn lease_task(
    tx: &Transaction<'_>,
    id: TaskId,
    attempt: u32,
    lease: &LeaseId,
    agent: &AgentId,
    now: UnixMs,
) -> Result<()> {
    exec(
        tx,
        "UPDATE tasks SET state = 'leased', attempts = ?2, lease_id = ?3, agent_id = ?4, \
             updated_at = ?5 WHERE id = ?1",
        params![id.0, attempt, lease.0, agent.0, now],
    )?;
    exec(
        tx,
        "INSERT OR REPLACE INTO attempts (task_id, number, lease_id, agent_id, started_at) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![id.0, attempt, lease.0, agent.0, now],
    )?;
    Ok(())
}

/// How an attempt ended, for its row.
#[derive(Debug, Clone)]
pub struct AttemptEnd<'a> {
    /// The task.
    pub task: TaskId,
    /// The attempt number.
    pub number: u32,
    /// Exit code, if the process exited.
    pub exit_code: Option<i32>,
    /// `succeeded`, `failed`, `timed_out`, `cancelled`, `lost`, `unavailable`, ...
    pub outcome: &'a str,
    /// What went wrong.
    pub error: &'a str,
}

/// Closes an attempt row.
pub fn end_attempt(tx: &Transaction<'_>, end: &AttemptEnd<'_>, now: UnixMs) -> Result<()> {
    exec(
        tx,
        "UPDATE attempts SET ended_at = ?3, exit_code = ?4, outcome = ?5, error = ?6 \
         WHERE task_id = ?1 AND number = ?2",
        params![
            end.task.0,
            end.number,
            now,
            end.exit_code,
            end.outcome,
            end.error
        ],
    )?;
    Ok(())
}

/// Moves a task to `state`, clearing its lease; terminal states set `finished_at`.
pub fn set_task_state(
    tx: &Transaction<'_>,
    id: TaskId,
    state: TaskState,
    ready_at: UnixMs,
    last_error: &str,
    now: UnixMs,
) -> Result<()> {
    let finished = (!state.is_active()).then_some(now);
    exec(
        tx,
        "UPDATE tasks SET state = ?2, ready_at = ?3, last_error = ?4, lease_id = NULL, \
             agent_id = NULL, updated_at = ?5, finished_at = ?6 WHERE id = ?1",
        params![id.0, state.as_str(), ready_at, last_error, now, finished],
    )?;
    Ok(())
}

/// Puts a dead, cancelled or unavailable task back to pending, ready at
/// `now`, attempts reset. Returns the task as it is now with the state it
/// had, or `None` when it is in another state (or does not exist).
pub fn retry_task(
    tx: &Transaction<'_>,
    id: TaskId,
    now: UnixMs,
) -> Result<Option<(TaskRow, TaskState)>> {
    let Some(before) = get_task(tx, id)?.map(|row| row.state) else {
        return Ok(None);
    };
    let changed = exec(
        tx,
        "UPDATE tasks SET state = 'pending', attempts = 0, ready_at = ?2, last_error = '', \
             lease_id = NULL, agent_id = NULL, updated_at = ?2, finished_at = NULL \
         WHERE id = ?1 AND state IN ('dead', 'cancelled', 'unavailable')",
        params![id.0, now],
    )?;
    if changed == 0 {
        return Ok(None);
    }
    Ok(get_task(tx, id)?.map(|row| (row, before)))
}

/// Ids of the tasks in `state`, of `source` when given, oldest first.
pub fn ids_in_state(
    conn: &Connection,
    state: TaskState,
    source: Option<&str>,
) -> Result<Vec<TaskId>> {
    let mut stmt = conn.prepare(
        "SELECT id FROM tasks WHERE state = ?1 AND (?2 IS NULL OR source = ?2) ORDER BY id",
    )?;
    let rows = stmt.query_map(params![state.as_str(), source], |row| row.get(0))?;
    Ok(rows
        .collect::<rusqlite::Result<Vec<i64>>>()?
        .into_iter()
        .map(TaskId)
        .collect())
}

/// Changes a task's priority (its rules say otherwise now).
pub fn set_task_priority(
    tx: &Transaction<'_>,
    id: TaskId,
    priority: Priority,
    now: UnixMs,
) -> Result<()> {
    exec(
        tx,
        "UPDATE tasks SET priority = ?2, updated_at = ?3 WHERE id = ?1",
        params![id.0, priority.as_i64(), now],
    )?;
    Ok(())
}

/// Sets a task's attempt count (an operator-cancelled attempt is not counted).
pub fn set_task_attempts(tx: &Transaction<'_>, id: TaskId, attempts: u32) -> Result<()> {
    exec(
        tx,
        "UPDATE tasks SET attempts = ?2 WHERE id = ?1",
        params![id.0, attempts],
    )?;
    Ok(())
}

/// Task counts per (state, priority, source), for metrics.
pub fn task_counts_by_source(conn: &Connection) -> Result<Vec<(TaskState, Priority, String, u64)>> {
    let mut out: std::collections::BTreeMap<(TaskState, Priority, String), u64> =
        std::collections::BTreeMap::new();
    for (state, priority, source, _, n) in count_rows(conn)? {
        *out.entry((state, priority, source)).or_default() += n;
    }
    Ok(out
        .into_iter()
        .map(|((state, priority, source), n)| (state, priority, source, n))
        .collect())
}

/// Pending tasks per source.
pub fn backlog_by_source(conn: &Connection) -> Result<Vec<(String, u64)>> {
    let mut out: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for (state, _, source, _, n) in count_rows(conn)? {
        if state == TaskState::Pending {
            *out.entry(source).or_default() += n;
        }
    }
    Ok(out.into_iter().collect())
}

/// Records an upload.
#[allow(clippy::too_many_arguments)]
pub fn insert_upload(
    tx: &Transaction<'_>,
    task: TaskId,
    attempt: u32,
    lease: &LeaseId,
    key: &str,
    size: u64,
    sha256: &str,
    now: UnixMs,
) -> Result<()> {
    exec(
        tx,
        "INSERT INTO uploads (task_id, attempt, lease_id, key, size, sha256, at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            task.0,
            attempt,
            lease.0,
            key,
            i64::try_from(size).unwrap_or(i64::MAX),
            sha256,
            now
        ],
    )?;
    Ok(())
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

/// Inserts or updates an agent.
pub fn upsert_agent(tx: &Transaction<'_>, agent: &AgentRow) -> Result<()> {
    let labels = serde_json::to_string(&agent.labels).unwrap_or_else(|_| "{}".into());
    exec(
        tx,
        "INSERT INTO agents (id, hostname, labels_json, slots, version, address, connected_at, \
             last_seen) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
         ON CONFLICT (id) DO UPDATE SET hostname = excluded.hostname, \
             labels_json = excluded.labels_json, slots = excluded.slots, \
             version = excluded.version, address = excluded.address, \
             connected_at = excluded.connected_at, last_seen = excluded.last_seen",
        params![
            agent.id.0,
            agent.hostname,
            labels,
            agent.slots,
            agent.version,
            agent.address,
            agent.connected_at,
            agent.last_seen
        ],
    )?;
    Ok(())
}

/// Updates an agent's last-seen time.
pub fn touch_agent(tx: &Transaction<'_>, id: &AgentId, now: UnixMs) -> Result<()> {
    exec(
        tx,
        "UPDATE agents SET last_seen = ?2 WHERE id = ?1",
        params![id.0, now],
    )?;
    Ok(())
}

/// Agents seen since `since`, most recent first.
pub fn recent_agents(conn: &Connection, since: UnixMs) -> Result<Vec<AgentRow>> {
    let mut stmt = conn.prepare(
        "SELECT id, hostname, labels_json, slots, version, address, connected_at, last_seen \
         FROM agents WHERE last_seen >= ?1 ORDER BY last_seen DESC",
    )?;
    let rows = stmt.query_map([since], |row| {
        let labels: String = row.get(2)?;
        Ok(AgentRow {
            id: AgentId(row.get(0)?),
            hostname: row.get(1)?,
            labels: serde_json::from_str(&labels).unwrap_or_default(),
            slots: row.get(3)?,
            version: row.get(4)?,
            address: row.get(5)?,
            connected_at: row.get(6)?,
            last_seen: row.get(7)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
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

/// Inserts a log entry and returns its sequence number.
pub fn insert_log(tx: &Transaction<'_>, row: &LogRow) -> Result<u64> {
    exec(
        tx,
        "INSERT INTO logs (at, level, task_id, agent_id, source, stream, message) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            row.at,
            row.level,
            row.task_id,
            row.agent_id,
            row.source,
            row.stream,
            row.message
        ],
    )?;
    Ok(u64::try_from(tx.last_insert_rowid()).unwrap_or(0))
}

/// Deletes log entries older than `before` and all but the newest
/// `keep_rows`; returns how many were deleted. Sequence numbers are never
/// reused (AUTOINCREMENT), so followers resuming after a pruned entry still
/// get what comes next.
pub fn prune_logs(tx: &Transaction<'_>, before: UnixMs, keep_rows: u64) -> Result<u64> {
    let by_age = exec(tx, "DELETE FROM logs WHERE at < ?1", params![before])?;
    let keep = i64::try_from(keep_rows).unwrap_or(i64::MAX);
    let by_size = exec(
        tx,
        "DELETE FROM logs WHERE seq <= (SELECT MAX(seq) FROM logs) - ?1",
        params![keep],
    )?;
    Ok((by_age + by_size) as u64)
}

/// Which log entries to read.
#[derive(Debug, Clone, Default)]
pub struct LogFilter {
    /// Only this task (0: any).
    pub task_id: i64,
    /// Only this agent (empty: any).
    pub agent_id: String,
    /// Only this source (empty: any).
    pub source: String,
    /// Only this level or above (0: any).
    pub min_level: i32,
}

impl LogFilter {
    /// Whether `row` passes the filter.
    pub fn matches(&self, row: &LogRow) -> bool {
        (self.task_id == 0 || row.task_id == self.task_id)
            && (self.agent_id.is_empty() || row.agent_id == self.agent_id)
            && (self.source.is_empty() || row.source == self.source)
            && row.level >= self.min_level
    }

    fn where_clause(&self) -> (String, Vec<rusqlite::types::Value>) {
        use rusqlite::types::Value as V;
        let mut sql = String::from("1 = 1");
        let mut args = Vec::new();
        if self.task_id != 0 {
            sql.push_str(" AND task_id = ?");
            args.push(V::Integer(self.task_id));
        }
        if !self.agent_id.is_empty() {
            sql.push_str(" AND agent_id = ?");
            args.push(V::Text(self.agent_id.clone()));
        }
        if !self.source.is_empty() {
            sql.push_str(" AND source = ?");
            args.push(V::Text(self.source.clone()));
        }
        if self.min_level != 0 {
            sql.push_str(" AND level >= ?");
            args.push(V::Integer(i64::from(self.min_level)));
        }
        (sql, args)
    }
}

fn log_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<LogRow> {
    Ok(LogRow {
        seq: row.get::<_, i64>(0)?.try_into().unwrap_or(0),
        at: row.get(1)?,
        level: row.get(2)?,
        task_id: row.get(3)?,
        agent_id: row.get(4)?,
        source: row.get(5)?,
        stream: row.get(6)?,
        message: row.get(7)?,
    })
}

const LOG_COLUMNS: &str = "seq, at, level, task_id, agent_id, source, stream, message";

/// The last `n` matching entries, oldest first.
pub fn log_tail(conn: &Connection, filter: &LogFilter, n: u32) -> Result<Vec<LogRow>> {
    let (clause, mut args) = filter.where_clause();
    args.push(rusqlite::types::Value::Integer(i64::from(n)));
    let mut stmt = conn.prepare(&format!(
        "SELECT {LOG_COLUMNS} FROM logs WHERE {clause} ORDER BY seq DESC LIMIT ?"
    ))?;
    let mut rows: Vec<LogRow> = stmt
        .query_map(rusqlite::params_from_iter(args), log_from_row)?
        .collect::<rusqlite::Result<_>>()?;
    rows.reverse();
    Ok(rows)
}

/// Up to `limit` matching entries after `since`, oldest first.
pub fn logs_after(
    conn: &Connection,
    filter: &LogFilter,
    since: u64,
    limit: u32,
) -> Result<Vec<LogRow>> {
    let (clause, mut args) = filter.where_clause();
    args.push(rusqlite::types::Value::Integer(
        i64::try_from(since).unwrap_or(i64::MAX),
    ));
    args.push(rusqlite::types::Value::Integer(i64::from(limit)));
    let mut stmt = conn.prepare(&format!(
        "SELECT {LOG_COLUMNS} FROM logs WHERE {clause} AND seq > ? ORDER BY seq ASC LIMIT ?"
    ))?;
    let rows = stmt
        .query_map(rusqlite::params_from_iter(args), log_from_row)?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

/// Filters and paging for task listings.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    /// Only this state.
    pub state: Option<TaskState>,
    /// Only this priority.
    pub priority: Option<Priority>,
    /// Only this source.
    pub source: Option<String>,
    /// Only ids below this (the page token).
    pub before_id: Option<i64>,
    /// Page size.
    pub limit: u32,
}

/// A page of tasks, newest first, and the total matching the filter.
pub fn list_tasks(conn: &Connection, filter: &TaskFilter) -> Result<(Vec<TaskRow>, u64)> {
    use rusqlite::types::Value as V;
    let mut clause = String::from("1 = 1");
    let mut args: Vec<V> = Vec::new();
    if let Some(state) = filter.state {
        clause.push_str(" AND state = ?");
        args.push(V::Text(state.as_str().into()));
    }
    if let Some(priority) = filter.priority {
        clause.push_str(" AND priority = ?");
        args.push(V::Integer(priority.as_i64()));
    }
    if let Some(source) = &filter.source {
        clause.push_str(" AND source = ?");
        args.push(V::Text(source.clone()));
    }
    // The total comes from the maintained counts, which have the same columns.
    let total: i64 = conn.query_row(
        &format!("SELECT COALESCE(SUM(n), 0) FROM task_counts WHERE {clause}"),
        rusqlite::params_from_iter(args.iter()),
        |row| row.get(0),
    )?;
    if let Some(before) = filter.before_id {
        clause.push_str(" AND id < ?");
        args.push(V::Integer(before));
    }
    args.push(V::Integer(i64::from(filter.limit)));
    let mut stmt = conn.prepare(&format!(
        "SELECT {TASK_COLUMNS} FROM tasks WHERE {clause} ORDER BY id DESC LIMIT ?"
    ))?;
    let rows = stmt.query_map(rusqlite::params_from_iter(args), task_from_row)?;
    Ok((collect_tasks(rows)?, total.try_into().unwrap_or(0)))
}

/// One task by id.
pub fn get_task(conn: &Connection, id: TaskId) -> Result<Option<TaskRow>> {
    let mut stmt = conn.prepare(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?1"))?;
    let mut rows = stmt.query_map([id.0], task_from_row)?;
    match rows.next() {
        Some(row) => Ok(Some(row??)),
        None => Ok(None),
    }
}

/// An attempt as stored.
#[derive(Debug, Clone)]
pub struct AttemptRow {
    /// Attempt number.
    pub number: u32,
    /// Its lease.
    pub lease_id: String,
    /// Its agent.
    pub agent_id: String,
    /// Start.
    pub started_at: UnixMs,
    /// End, if ended.
    pub ended_at: Option<UnixMs>,
    /// Exit code, if exited.
    pub exit_code: Option<i32>,
    /// How it ended.
    pub outcome: String,
    /// What went wrong.
    pub error: String,
}

/// Every attempt of a task, oldest first.
pub fn attempts(conn: &Connection, id: TaskId) -> Result<Vec<AttemptRow>> {
    let mut stmt = conn.prepare(
        "SELECT number, lease_id, agent_id, started_at, ended_at, exit_code, outcome, error \
         FROM attempts WHERE task_id = ?1 ORDER BY number",
    )?;
    let rows = stmt.query_map([id.0], |row| {
        Ok(AttemptRow {
            number: row.get(0)?,
            lease_id: row.get(1)?,
            agent_id: row.get(2)?,
            started_at: row.get(3)?,
            ended_at: row.get(4)?,
            exit_code: row.get(5)?,
            outcome: row.get(6)?,
            error: row.get(7)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Task counts per (state, priority).
pub fn task_counts(conn: &Connection) -> Result<Vec<(TaskState, Priority, u64)>> {
    Ok(task_counts_by_source(conn)?
        .into_iter()
        .fold(
            std::collections::BTreeMap::<(TaskState, Priority), u64>::new(),
            |mut acc, (state, priority, _, n)| {
                *acc.entry((state, priority)).or_default() += n;
                acc
            },
        )
        .into_iter()
        .map(|((state, priority), n)| (state, priority, n))
        .collect())
}

/// One row of the task counts: a (state, priority, source, scraper) and how
/// many tasks it has.
pub type CountRow = (TaskState, Priority, String, String, u64);

/// Every non-zero task count.
pub fn count_rows(conn: &Connection) -> Result<Vec<CountRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT state, priority, source, scraper, n FROM task_counts WHERE n != 0",
    )?;
    let rows = stmt.query_map([], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, i64>(1)?,
            row.get::<_, String>(2)?,
            row.get::<_, String>(3)?,
            row.get::<_, i64>(4)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (state, priority, source, scraper, n) = row?;
        if let Some(state) = TaskState::parse(&state) {
            out.push((
                state,
                Priority::from_i64(priority),
                source,
                scraper,
                u64::try_from(n).unwrap_or(0),
            ));
        }
    }
    Ok(out)
}

/// Sets the counts of the given (state, priority, source, scraper) keys.
pub fn set_counts(tx: &Transaction<'_>, counts: &[CountRow]) -> Result<()> {
    for (state, priority, source, scraper, n) in counts {
        exec(
            tx,
            "INSERT INTO task_counts (state, priority, source, scraper, n) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO UPDATE SET n = excluded.n",
            params![
                state.as_str(),
                priority.as_i64(),
                source,
                scraper,
                i64::try_from(*n).unwrap_or(i64::MAX)
            ],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Value;

    fn partition(id: &str) -> Partition {
        Partition {
            vars: vec![("game_id".into(), Value::Str(id.into()))],
        }
    }

    #[test]
    fn upsert_creates_once_and_reopens_only_old_done_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open_writer(dir.path()).unwrap();
        let p = partition("1");
        let keys = vec!["k/1".to_string()];
        let encoded = Encoded::new(&p, &keys);
        let task = NewTask {
            source: "s",
            scraper: "sc",
            priority: Priority::High,
            reason: GapReason::Missing,
            encoded: &encoded,
        };
        let tx = conn.transaction().unwrap();
        let (id, before) = upsert_task(&tx, &task, 100, 100).unwrap().unwrap();
        assert_eq!(before, None);
        // A second upsert while pending changes nothing.
        assert_eq!(upsert_task(&tx, &task, 101, 101).unwrap(), None);
        set_task_state(&tx, id, TaskState::Done, 0, "", 200).unwrap();
        // Finished after the observation began: not reopened.
        assert_eq!(upsert_task(&tx, &task, 300, 150).unwrap(), None);
        // Finished before it: reopened under the same id.
        assert_eq!(
            upsert_task(&tx, &task, 300, 250).unwrap(),
            Some((
                id,
                Some(Reopened {
                    state: TaskState::Done,
                    priority: Priority::High,
                    scraper: "sc".into()
                })
            ))
        );
        set_task_state(&tx, id, TaskState::Dead, 0, "boom", 400).unwrap();
        assert_eq!(upsert_task(&tx, &task, 500, 500).unwrap(), None);
        tx.commit().unwrap();

        let row = get_task(&conn, id).unwrap().unwrap();
        assert_eq!(row.state, TaskState::Dead);
        assert_eq!(row.last_error, "boom");
        assert_eq!(row.partition, p);
        assert_eq!(row.expected_keys, keys);
    }

    #[test]
    fn an_unversioned_state_is_migrated_and_its_tasks_counted() {
        let dir = tempfile::tempdir().unwrap();
        // A state written before versioning: the first schema, version 0.
        {
            let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            conn.execute_batch(SCHEMA_V1).unwrap();
            for (i, state) in ["pending", "pending", "done"].iter().enumerate() {
                conn.execute(
                    "INSERT INTO tasks (source, partition_key, partition_json, scraper, state, \
                         priority, reason, ready_at, expected_keys, created_at, updated_at) \
                     VALUES ('s', ?1, '{}', 'sc', ?2, 2, 'missing', 0, '[]', 0, 0)",
                    params![i.to_string(), state],
                )
                .unwrap();
            }
        }
        let conn = open_writer(dir.path()).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        let mut counts = task_counts(&conn).unwrap();
        counts.sort();
        assert_eq!(
            counts,
            [
                (TaskState::Pending, Priority::from_i64(2), 2),
                (TaskState::Done, Priority::from_i64(2), 1)
            ]
        );
        drop(conn);
        // Opening again changes nothing.
        let conn = open_writer(dir.path()).unwrap();
        assert_eq!(task_counts(&conn).unwrap().len(), 2);
    }

    #[test]
    fn a_state_from_a_newer_adce_is_refused_naming_both_versions() {
        let dir = tempfile::tempdir().unwrap();
        drop(open_writer(dir.path()).unwrap());
        let newer = MIGRATIONS.len() as i64 + 1;
        Connection::open(dir.path().join(DB_FILE))
            .unwrap()
            .pragma_update(None, "user_version", newer)
            .unwrap();
        let err = open_writer(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(&format!("schema version {newer}"))
                && err.contains(&format!("versions up to {}", MIGRATIONS.len())),
            "{err}"
        );
    }

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

    #[test]
    fn logs_tail_and_resume_by_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open_writer(dir.path()).unwrap();
        let tx = conn.transaction().unwrap();
        for i in 0..10 {
            insert_log(
                &tx,
                &LogRow {
                    seq: 0,
                    at: i,
                    level: 2,
                    task_id: i % 2,
                    agent_id: String::new(),
                    source: String::new(),
                    stream: 0,
                    message: format!("m{i}"),
                },
            )
            .unwrap();
        }
        tx.commit().unwrap();
        let all = LogFilter::default();
        let tail = log_tail(&conn, &all, 3).unwrap();
        assert_eq!(
            tail.iter().map(|r| r.message.as_str()).collect::<Vec<_>>(),
            ["m7", "m8", "m9"]
        );
        let after = logs_after(&conn, &all, tail[0].seq, 100).unwrap();
        assert_eq!(after.len(), 2);
        let odd = LogFilter {
            task_id: 1,
            ..LogFilter::default()
        };
        assert_eq!(logs_after(&conn, &odd, 0, 100).unwrap().len(), 5);
    }

    #[test]
    fn pruning_keeps_the_newest_rows_and_drops_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open_writer(dir.path()).unwrap();
        let tx = conn.transaction().unwrap();
        for i in 0..100 {
            insert_log(
                &tx,
                &LogRow {
                    at: i * 10,
                    message: format!("m{i}"),
                    ..LogRow::default()
                },
            )
            .unwrap();
        }
        // Older than at=200 (20 rows) go, then all but the newest 50.
        assert_eq!(prune_logs(&tx, 200, 50).unwrap(), 50);
        tx.commit().unwrap();
        let left = logs_after(&conn, &LogFilter::default(), 0, 1000).unwrap();
        assert_eq!(left.len(), 50);
        assert_eq!(left[0].message, "m50");
        // Sequence numbers go on after the pruned ones.
        let tx = conn.transaction().unwrap();
        let seq = insert_log(&tx, &LogRow::default()).unwrap();
        assert_eq!(seq, 101);
    }
}
