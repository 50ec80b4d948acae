//! The schema and its versions: `MIGRATIONS` in order, each applied once;
//! `PRAGMA user_version` is how many a state directory has applied.
//!
//! Invariants: a migration, once released, never changes (states in the
//! field have applied it); a schema change is a new migration at the end.
//! Migrating runs in one transaction, so a state is at one version or the
//! next, never between. A state from a newer adce (a higher version) is
//! refused before anything is written to it.

use std::path::Path;

use rusqlite::Connection;

use crate::error::{Error, Result};

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
pub(super) fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use rusqlite::params;

    use super::*;
    use crate::model::{AgentId, LeaseId, Priority, TaskId, TaskState, Value};
    use crate::store::{
        DB_FILE, LogFilter, TaskFilter, Writer, attempts, get_task, list_tasks, load_leased,
        log_tail, pending_after, recent_agents, task_counts,
    };

    /// A version 2 state from a real run (`tests/fixtures/state-v2.sql`
    /// says how it was made).
    const STATE_V2: &str = include_str!("../../tests/fixtures/state-v2.sql");

    /// A state directory written by the version 2 schema opens, through the
    /// normal open path, with every task, count, attempt, lease and log entry
    /// it had. A schema change must add a migration (never edit a released
    /// one) and keep this fixture loading: the fixture is never regenerated
    /// to follow the schema, it is what states in the field look like.
    #[test]
    fn a_version_2_state_opens_with_every_task() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            conn.execute_batch(STATE_V2).unwrap();
            let version: i64 = conn
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .unwrap();
            assert_eq!(version, 2, "the fixture is a version 2 state");
        }
        let conn = Writer::open(dir.path()).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);

        // Every task, in its state, with its attempts.
        let (rows, total) = list_tasks(
            &conn,
            &TaskFilter {
                limit: 100,
                ..TaskFilter::default()
            },
        )
        .unwrap();
        let mut tasks: Vec<(i64, &str, TaskState, u32)> = rows
            .iter()
            .map(|r| (r.id.0, r.source.as_str(), r.state, r.attempts))
            .collect();
        tasks.sort();
        use TaskState::{Dead, Done, Leased, Pending};
        assert_eq!(
            tasks,
            [
                (1, "boxscore", Done, 1),
                (2, "boxscore", Done, 1),
                (3, "boxscore", Done, 1),
                (4, "flaky", Dead, 2),
                (5, "slow", Leased, 1),
                (6, "daily", Done, 1),
                (7, "daily", Pending, 0),
                (8, "daily", Pending, 0),
                (9, "daily", Pending, 0),
                (10, "daily", Pending, 0),
            ]
        );
        assert_eq!(total, 10);

        // The counts status reads, as the scheduler kept them.
        let mut counts = task_counts(&conn).unwrap();
        counts.sort();
        assert_eq!(
            counts,
            [
                (Pending, Priority::Low, 4),
                (Leased, Priority::Critical, 1),
                (Done, Priority::Low, 1),
                (Done, Priority::High, 3),
                (Dead, Priority::Medium, 1),
            ]
        );

        // Partitions and keys decode; the dead task's attempts and error
        // are there; the leased task keeps its lease for re-attaching.
        let day = get_task(&conn, TaskId(6)).unwrap().unwrap();
        assert_eq!(
            day.partition.vars,
            [(
                "date".to_string(),
                Value::Date(chrono::NaiveDate::from_ymd_opt(2024, 10, 22).unwrap())
            )]
        );
        assert_eq!(day.expected_keys, ["days/2024-10-22.json"]);
        let dead = get_task(&conn, TaskId(4)).unwrap().unwrap();
        assert!(
            dead.last_error.contains("exit code 1"),
            "{}",
            dead.last_error
        );
        let tries = attempts(&conn, TaskId(4)).unwrap();
        assert_eq!(
            tries
                .iter()
                .map(|a| (a.number, a.exit_code, a.outcome.as_str()))
                .collect::<Vec<_>>(),
            [(1, Some(1), "failed"), (2, Some(1), "failed")]
        );
        let leased = load_leased(&conn).unwrap();
        assert_eq!(leased.len(), 1);
        assert_eq!(
            leased[0].lease,
            Some((
                LeaseId("l-c776b9bf4c41ca8d".into()),
                AgentId("dev-vm".into())
            ))
        );

        // The ready queue refills from the pending tasks in order.
        let pending = pending_after(&conn, "trickles", Priority::Low, None, 10).unwrap();
        assert_eq!(
            pending.iter().map(|r| r.id.0).collect::<Vec<_>>(),
            [7, 8, 9, 10]
        );

        // The agent and the log entries.
        let agents = recent_agents(&conn, 0).unwrap();
        assert_eq!(agents.len(), 1);
        assert_eq!(agents[0].id, AgentId("dev-vm".into()));
        let logs = log_tail(&conn, &LogFilter::default(), 100).unwrap();
        assert_eq!(logs.len(), 24);
        assert_eq!(logs[23].seq, 24);
        assert!(
            logs[23].message.starts_with("task dead after 2 attempts"),
            "{}",
            logs[23].message
        );
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
        let conn = Writer::open(dir.path()).unwrap();
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
        let conn = Writer::open(dir.path()).unwrap();
        assert_eq!(task_counts(&conn).unwrap().len(), 2);
    }

    #[test]
    fn a_state_from_a_newer_adce_is_refused_naming_both_versions() {
        let dir = tempfile::tempdir().unwrap();
        drop(Writer::open(dir.path()).unwrap());
        let newer = MIGRATIONS.len() as i64 + 1;
        Connection::open(dir.path().join(DB_FILE))
            .unwrap()
            .pragma_update(None, "user_version", newer)
            .unwrap();
        let err = Writer::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(&format!("schema version {newer}"))
                && err.contains(&format!("versions up to {}", MIGRATIONS.len())),
            "{err}"
        );
    }
}
