//! Every query: task listings and lookups, the scheduler's loads and window
//! refills, the queue view planning reads, counts, agents and logs.
//!
//! Invariant: nothing here changes the database; every function takes a
//! plain `&Connection` (a reader's, or the writer's inside its transaction).
//! Counts come from `task_counts`, never from counting the task table.

use rusqlite::{Connection, params};

use super::{LogRow, TASK_COLUMNS, TaskRow, collect_tasks, task_from_row};
use crate::error::Result;
use crate::model::{AgentId, Priority, TaskId, TaskState, UnixMs};
use crate::store::{AgentRow, CountRow};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Writer, insert_log};

    #[test]
    fn logs_tail_and_resume_by_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Writer::open(dir.path()).unwrap();
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
}
