//! Every statement that changes the database: tasks (a plan's
//! create-or-reopen, leases, attempts, state, priority, retry), uploads,
//! agents, logs and their pruning, and the task counts.
//!
//! Invariants: every function takes the [`WriteTxn`] of the scheduler's
//! batch (only the scheduler holds the `Writer` that hands one out); the only decisions made here are the ones one conditional
//! statement makes (a plan's create-or-reopen, an operator's retry), so
//! the scheduler's memory can follow them from what they return.

use rusqlite::{OptionalExtension, params};

use super::{AgentRow, CountRow, Encoded, LogRow, TaskRow, WriteTxn, exec, get_task};
use crate::error::Result;
use crate::model::{AgentId, GapReason, LeaseId, Priority, TaskId, TaskState, UnixMs};

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
    tx: &WriteTxn<'_>,
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
    tx: &WriteTxn<'_>,
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
    tx: &WriteTxn<'_>,
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
pub fn end_attempt(tx: &WriteTxn<'_>, end: &AttemptEnd<'_>, now: UnixMs) -> Result<()> {
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
    tx: &WriteTxn<'_>,
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
    tx: &WriteTxn<'_>,
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

/// Changes a task's priority (its rules say otherwise now).
pub fn set_task_priority(
    tx: &WriteTxn<'_>,
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
pub fn set_task_attempts(tx: &WriteTxn<'_>, id: TaskId, attempts: u32) -> Result<()> {
    exec(
        tx,
        "UPDATE tasks SET attempts = ?2 WHERE id = ?1",
        params![id.0, attempts],
    )?;
    Ok(())
}

/// Records an upload.
#[allow(clippy::too_many_arguments)]
pub fn insert_upload(
    tx: &WriteTxn<'_>,
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

/// Inserts or updates an agent.
pub fn upsert_agent(tx: &WriteTxn<'_>, agent: &AgentRow) -> Result<()> {
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
pub fn touch_agent(tx: &WriteTxn<'_>, id: &AgentId, now: UnixMs) -> Result<()> {
    exec(
        tx,
        "UPDATE agents SET last_seen = ?2 WHERE id = ?1",
        params![id.0, now],
    )?;
    Ok(())
}

/// Inserts a log entry and returns its sequence number.
pub fn insert_log(tx: &WriteTxn<'_>, row: &LogRow) -> Result<u64> {
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
pub fn prune_logs(tx: &WriteTxn<'_>, before: UnixMs, keep_rows: u64) -> Result<u64> {
    let by_age = exec(tx, "DELETE FROM logs WHERE at < ?1", params![before])?;
    let keep = i64::try_from(keep_rows).unwrap_or(i64::MAX);
    let by_size = exec(
        tx,
        "DELETE FROM logs WHERE seq <= (SELECT MAX(seq) FROM logs) - ?1",
        params![keep],
    )?;
    Ok((by_age + by_size) as u64)
}

/// Sets the counts of the given (state, priority, source, scraper) keys.
pub fn set_counts(tx: &WriteTxn<'_>, counts: &[CountRow]) -> Result<()> {
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
    use crate::model::{Partition, Value};
    use crate::store::{LogFilter, Writer, logs_after};

    fn partition(id: &str) -> Partition {
        Partition {
            vars: vec![("game_id".into(), Value::Str(id.into()))],
        }
    }

    #[test]
    fn upsert_creates_once_and_reopens_only_old_done_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Writer::open(dir.path()).unwrap();
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
    fn pruning_keeps_the_newest_rows_and_drops_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Writer::open(dir.path()).unwrap();
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
