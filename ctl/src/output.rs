//! Pure formatting shared by every command: wire enum names (task states
//! are named by `adce_proto`, as the server names them), times (local,
//! UTC and relative), truncation, tables, the JSON objects built from proto
//! messages, and the one place that writes to stdout.

use std::collections::BTreeMap;
use std::io::{self, Write};

use adce_proto::v1 as pb;
use chrono::{DateTime, Local, TimeZone, Utc};
use comfy_table::{CellAlignment, Table};
use serde_json::{Map, Value, json};

/// Every priority, highest first.
pub const PRIORITIES: [pb::Priority; 4] = [
    pb::Priority::Critical,
    pb::Priority::High,
    pb::Priority::Medium,
    pb::Priority::Low,
];

/// How many characters of a task's last error the tasks table shows.
pub const LAST_ERROR_WIDTH: usize = 60;

/// Milliseconds in one second, minute, hour and day, for relative times.
const SECOND_MS: i64 = 1_000;
const MINUTE_MS: i64 = 60 * SECOND_MS;
const HOUR_MS: i64 = 60 * MINUTE_MS;
const DAY_MS: i64 = 24 * HOUR_MS;

/// The lowercase name of a priority; empty when unspecified.
pub fn priority_name(priority: pb::Priority) -> &'static str {
    match priority {
        pb::Priority::Unspecified => "",
        pb::Priority::Low => "low",
        pb::Priority::Medium => "medium",
        pb::Priority::High => "high",
        pb::Priority::Critical => "critical",
    }
}

/// The lowercase name of a gap reason; empty when unspecified.
pub fn reason_name(reason: pb::GapReason) -> &'static str {
    match reason {
        pb::GapReason::Unspecified => "",
        pb::GapReason::Missing => "missing",
        pb::GapReason::TooSmall => "too_small",
        pb::GapReason::Stale => "stale",
    }
}

/// The lowercase name of a log level; empty when unspecified.
pub fn level_name(level: pb::LogLevel) -> &'static str {
    match level {
        pb::LogLevel::Unspecified => "",
        pb::LogLevel::Debug => "debug",
        pb::LogLevel::Info => "info",
        pb::LogLevel::Warn => "warn",
        pb::LogLevel::Error => "error",
    }
}

/// The lowercase name of a scraper output stream; empty for server events.
pub fn stream_name(stream: pb::OutputStream) -> &'static str {
    match stream {
        pb::OutputStream::Unspecified => "",
        pb::OutputStream::Stdout => "stdout",
        pb::OutputStream::Stderr => "stderr",
    }
}

/// The wall clock now, in ms since the Unix epoch.
pub fn now_unix_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// How far `unix_ms` is from `now_ms` in one coarse unit: `3m ago`, `in 5s`,
/// `just now`; `never` when `unix_ms` is 0 (the wire's "not set").
pub fn relative(unix_ms: i64, now_ms: i64) -> String {
    if unix_ms == 0 {
        return "never".to_owned();
    }
    let delta = now_ms.saturating_sub(unix_ms);
    let magnitude = delta.saturating_abs();
    if magnitude < SECOND_MS {
        return "just now".to_owned();
    }
    let amount = if magnitude < MINUTE_MS {
        format!("{}s", magnitude / SECOND_MS)
    } else if magnitude < HOUR_MS {
        format!("{}m", magnitude / MINUTE_MS)
    } else if magnitude < DAY_MS {
        format!("{}h", magnitude / HOUR_MS)
    } else {
        format!("{}d", magnitude / DAY_MS)
    };
    if delta > 0 {
        format!("{amount} ago")
    } else {
        format!("in {amount}")
    }
}

/// A timestamp as local wall-clock time (`2024-10-22 14:03:01`); `-` when 0
/// or out of range.
pub fn local_time(unix_ms: i64) -> String {
    if unix_ms == 0 {
        return "-".to_owned();
    }
    match Local.timestamp_millis_opt(unix_ms).single() {
        Some(t) => t.format("%Y-%m-%d %H:%M:%S").to_string(),
        None => "-".to_owned(),
    }
}

/// A timestamp as local time followed by its relative form
/// (`2024-10-22 14:03:01 (3m ago)`); `never` when 0.
pub fn local_with_relative(unix_ms: i64, now_ms: i64) -> String {
    if unix_ms == 0 {
        return "never".to_owned();
    }
    format!("{} ({})", local_time(unix_ms), relative(unix_ms, now_ms))
}

/// A timestamp as RFC 3339 UTC with milliseconds (`2024-10-22T12:00:01.123Z`).
pub fn utc_millis(unix_ms: i64) -> String {
    match DateTime::<Utc>::from_timestamp_millis(unix_ms) {
        Some(t) => t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        None => format!("@{unix_ms}ms"),
    }
}

/// `text` on one line (newlines and tabs become spaces) and at most `max`
/// characters, ending in `…` when cut.
pub fn truncate(text: &str, max: usize) -> String {
    let one_line: String = text
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// A percentage with one decimal (`99.5%`).
pub fn percent(value: f64) -> String {
    format!("{value:.1}%")
}

/// A task's partition for people: its canonical key, or the variables joined
/// as `name=value,...` when the server left the key empty.
pub fn partition_text(task: &pb::TaskSummary) -> String {
    if !task.partition_key.is_empty() {
        return task.partition_key.clone();
    }
    task.partition
        .iter()
        .map(|v| format!("{}={}", v.name, v.value))
        .collect::<Vec<_>>()
        .join(",")
}

/// Labels as `k=v,k=v`, sorted by key.
pub fn labels_text(labels: &std::collections::HashMap<String, String>) -> String {
    let sorted: BTreeMap<&String, &String> = labels.iter().collect();
    sorted
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// An empty table with the house look: no borders, a header row, columns
/// separated by two spaces.
pub fn table<I, S>(headers: I) -> Table
where
    I: IntoIterator<Item = S>,
    S: Into<comfy_table::Cell>,
{
    let mut t = Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    t.set_header(headers);
    for column in t.column_iter_mut() {
        column.set_padding((0, 2));
    }
    t
}

/// Right-aligns the columns at `indexes` (numbers read better that way).
pub fn align_right(t: &mut Table, indexes: &[usize]) {
    for &i in indexes {
        if let Some(column) = t.column_mut(i) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
}

/// A table rendered as text, every line without trailing spaces and ending
/// in a newline.
pub fn render(t: &Table) -> String {
    let mut out = String::new();
    for line in t.to_string().lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Writes `text` to stdout and flushes it. Errors (a closed pipe) go back to
/// the caller so the program can stop quietly.
pub fn emit(text: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// Writes one JSON document, pretty-printed, to stdout.
fn emit_json(value: &Value) -> io::Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(io::Error::other)?;
    text.push('\n');
    emit(&text)
}

/// Writes a command's answer to stdout: with `--json` (`json`) the document
/// `as_json` builds, pretty-printed; otherwise the text `as_text` renders.
/// Only the one asked for is built.
pub fn print(
    json: bool,
    as_json: impl FnOnce() -> Value,
    as_text: impl FnOnce() -> String,
) -> io::Result<()> {
    if json {
        emit_json(&as_json())
    } else {
        emit(&as_text())
    }
}

/// The loop object of `status --json`, `pause --json` and `resume --json`.
pub fn loop_json(state: &pb::LoopState) -> Value {
    json!({
        "enabled": state.enabled,
        "paused": state.paused,
        "in_cycle": state.in_cycle,
        "cycles": state.cycles,
        "last_reconcile_unix_ms": state.last_reconcile_unix_ms,
        "next_reconcile_unix_ms": state.next_reconcile_unix_ms,
        "cycle_started_unix_ms": state.cycle_started_unix_ms,
        "cycle_done": state.cycle_done,
        "cycle_failed": state.cycle_failed,
        "cycle_deadline_unix_ms": state.cycle_deadline_unix_ms,
    })
}

/// A coverage object; `source` is added by the caller for per-source rows.
pub fn coverage_json(c: &pb::CoverageSummary) -> Value {
    json!({
        "expected": c.expected,
        "present": c.present,
        "missing": c.missing,
        "too_small": c.too_small,
        "stale": c.stale,
        "percent": c.percent,
    })
}

/// Task totals per state and per (state, priority), every state and every
/// priority present, zero when the reply leaves them out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskCounts {
    /// `(state, total, [critical, high, medium, low])` in `TaskState::ALL` order.
    pub rows: Vec<(pb::TaskState, u64, [u64; 4])>,
}

impl TaskCounts {
    /// Folds the reply's per-state counts into a complete grid.
    pub fn from_reply(counts: &[pb::StateCount]) -> Self {
        let rows = pb::TaskState::ALL
            .iter()
            .map(|&state| {
                let mut total = 0;
                let mut by_priority = [0u64; 4];
                for count in counts.iter().filter(|c| c.state() == state) {
                    total += count.total;
                    for (slot, &p) in by_priority.iter_mut().zip(PRIORITIES.iter()) {
                        *slot += count
                            .by_priority
                            .get(priority_name(p))
                            .copied()
                            .unwrap_or(0);
                    }
                }
                (state, total, by_priority)
            })
            .collect();
        TaskCounts { rows }
    }

    /// `{"pending": 3, ...}` with all six states.
    pub fn totals_json(&self) -> Value {
        let mut map = Map::new();
        for (state, total, _) in &self.rows {
            map.insert(state.name().to_owned(), json!(total));
        }
        Value::Object(map)
    }

    /// `{"pending": {"critical": 0, ...}, ...}` with all six states and four priorities.
    pub fn by_priority_json(&self) -> Value {
        let mut map = Map::new();
        for (state, _, by_priority) in &self.rows {
            let mut inner = Map::new();
            for (p, n) in PRIORITIES.iter().zip(by_priority.iter()) {
                inner.insert(priority_name(*p).to_owned(), json!(n));
            }
            map.insert(state.name().to_owned(), Value::Object(inner));
        }
        Value::Object(map)
    }
}

/// An agent object; `full` adds the fields only `agents --json` carries
/// (`last_seen_unix_ms`, `connected_unix_ms`, `address`).
pub fn agent_json(a: &pb::AgentInfo, full: bool) -> Value {
    let labels: Map<String, Value> = a
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let mut object = json!({
        "id": a.id,
        "hostname": a.hostname,
        "slots": a.slots,
        "labels": labels,
        "running_tasks": a.running_tasks,
        "connected": a.connected,
        "version": a.version,
    });
    if full {
        if let Some(map) = object.as_object_mut() {
            map.insert("last_seen_unix_ms".to_owned(), json!(a.last_seen_unix_ms));
            map.insert("connected_unix_ms".to_owned(), json!(a.connected_unix_ms));
            map.insert("address".to_owned(), json!(a.address));
        }
    }
    object
}

/// The whole `status --json` object.
pub fn status_json(reply: &pb::StatusReply) -> Value {
    let counts = TaskCounts::from_reply(&reply.tasks);
    json!({
        "version": reply.version,
        "lake": reply.lake,
        "loop": loop_json(&reply.r#loop.unwrap_or_default()),
        "coverage": coverage_json(&reply.coverage.unwrap_or_default()),
        "coverage_updated_unix_ms": reply.coverage_updated_unix_ms,
        "tasks": counts.totals_json(),
        "tasks_by_priority": counts.by_priority_json(),
        "ready": reply.ready,
        "agents": reply.agents.iter().map(|a| agent_json(a, false)).collect::<Vec<_>>(),
        "waiting": reply.waiting.iter().map(waiting_json).collect::<Vec<_>>(),
        "backlog_by_source": reply
            .backlog_by_source
            .iter()
            .collect::<std::collections::BTreeMap<_, _>>(),
        "alerts": reply.alerts.iter().map(|a| json!({
            "component": a.component,
            "message": a.message,
            "since_unix_ms": a.since_unix_ms,
        })).collect::<Vec<_>>(),
    })
}

/// A waiting note as JSON.
pub fn waiting_json(n: &pb::WaitingNote) -> Value {
    json!({
        "scraper": n.scraper,
        "reason": n.reason,
        "ready": n.ready,
        "since_unix_ms": n.since_unix_ms,
    })
}

/// A waiting note as a line: `waiting: 3 ready tasks of scraper bbref: no
/// agent with proxy=residential (for 2m)`.
pub fn waiting_line(n: &pb::WaitingNote, now_ms: i64) -> String {
    let since = relative(n.since_unix_ms, now_ms);
    let since = since.trim_end_matches(" ago");
    format!(
        "waiting: {} ready tasks of scraper {}: {} (for {since})",
        n.ready, n.scraper, n.reason
    )
}

/// The priority dispatch uses now (the base priority when the server did
/// not say).
pub fn effective_priority(t: &pb::TaskSummary) -> pb::Priority {
    match t.effective_priority() {
        pb::Priority::Unspecified => t.priority(),
        p => p,
    }
}

/// A task object of `tasks --json` and `task --json`.
pub fn task_json(t: &pb::TaskSummary) -> Value {
    json!({
        "id": t.id,
        "source": t.source,
        "partition": partition_text(t),
        "state": t.state().name(),
        "priority": priority_name(t.priority()),
        "effective_priority": priority_name(effective_priority(t)),
        "priority_reason": t.priority_reason,
        "attempts": t.attempts,
        "reason": reason_name(t.reason()),
        "last_error": t.last_error,
        "agent": t.agent_id,
        "progress": t.progress,
        "created_unix_ms": t.created_unix_ms,
        "updated_unix_ms": t.updated_unix_ms,
        "ready_unix_ms": t.ready_unix_ms,
    })
}

/// An attempt object of `task --json`.
pub fn attempt_json(a: &pb::Attempt) -> Value {
    json!({
        "number": a.number,
        "lease_id": a.lease_id,
        "agent_id": a.agent_id,
        "started_unix_ms": a.started_unix_ms,
        "ended_unix_ms": a.ended_unix_ms,
        "exit_code": a.exit_code,
        "outcome": a.outcome,
        "error": a.error,
    })
}

/// The whole `task --json` object.
pub fn task_detail_json(d: &pb::TaskDetail) -> Value {
    json!({
        "task": task_json(&d.task.clone().unwrap_or_default()),
        "scraper": d.scraper,
        "expected_keys": d.expected_keys,
        "attempts": d.attempts.iter().map(attempt_json).collect::<Vec<_>>(),
    })
}

/// The whole `coverage --json` object.
pub fn coverage_reply_json(reply: &pb::CoverageReply) -> Value {
    let sources: Vec<Value> = reply
        .sources
        .iter()
        .map(|s| {
            let mut row = coverage_json(&s.coverage.unwrap_or_default());
            if let Some(map) = row.as_object_mut() {
                map.insert("source".to_owned(), json!(s.source));
                if !s.missing_keys.is_empty() {
                    map.insert("missing_keys".to_owned(), json!(s.missing_keys));
                }
            }
            row
        })
        .collect();
    json!({
        "sources": sources,
        "total": coverage_json(&reply.total.unwrap_or_default()),
        "computed_unix_ms": reply.computed_unix_ms,
        "evidence": reply.evidence,
        "updated_unix_ms": reply.updated_unix_ms,
    })
}

/// The `reconcile --json` summary object.
pub fn reconcile_summary_json(s: &pb::ReconcileSummary) -> Value {
    json!({
        "expected_objects": s.expected_objects,
        "observed_objects": s.observed_objects,
        "gaps": s.gaps,
        "tasks_created": s.tasks_created,
        "duration_ms": s.duration_ms,
        "coverage": coverage_json(&s.coverage.unwrap_or_default()),
    })
}

/// One `logs --json` line (compact, no trailing newline).
pub fn log_entry_json(e: &pb::LogEntry) -> Value {
    json!({
        "seq": e.seq,
        "unix_ms": e.unix_ms,
        "level": level_name(e.level()),
        "task_id": e.task_id,
        "agent_id": e.agent_id,
        "source": e.source,
        "stream": stream_name(e.stream()),
        "message": e.message,
    })
}

/// One human log line:
/// `2024-10-22T12:00:01.123Z INFO  [task 12 espn_pbp agent-1 stderr] message`,
/// leaving out empty parts (and the brackets when all are empty).
pub fn log_entry_line(e: &pb::LogEntry) -> String {
    let mut context = Vec::new();
    if e.task_id != 0 {
        context.push(format!("task {}", e.task_id));
    }
    if !e.source.is_empty() {
        context.push(e.source.clone());
    }
    if !e.agent_id.is_empty() {
        context.push(e.agent_id.clone());
    }
    let stream = stream_name(e.stream());
    if !stream.is_empty() {
        context.push(stream.to_owned());
    }
    let level = match level_name(e.level()) {
        "" => "-".to_owned(),
        name => name.to_ascii_uppercase(),
    };
    let mut line = format!("{} {level:<5} ", utc_millis(e.unix_ms));
    if !context.is_empty() {
        line.push('[');
        line.push_str(&context.join(" "));
        line.push_str("] ");
    }
    line.push_str(e.message.trim_end_matches(['\n', '\r']));
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_729_598_401_123;

    fn sample_task() -> pb::TaskSummary {
        pb::TaskSummary {
            id: 12,
            source: "espn_pbp".into(),
            partition: vec![pb::PartitionVar {
                name: "date".into(),
                value: "2024-10-22".into(),
            }],
            state: pb::TaskState::Leased as i32,
            priority: pb::Priority::High as i32,
            attempts: 2,
            reason: pb::GapReason::TooSmall as i32,
            last_error: "exit 1".into(),
            agent_id: "agent-1".into(),
            created_unix_ms: 1,
            updated_unix_ms: 2,
            ready_unix_ms: 3,
            partition_key: "date=2024-10-22".into(),
            progress: 0.5,
            effective_priority: pb::Priority::Critical as i32,
            priority_reason: "rule: within 3d".into(),
        }
    }

    #[test]
    fn relative_picks_one_coarse_unit_in_both_directions() {
        assert_eq!(relative(0, NOW), "never");
        assert_eq!(relative(NOW - 500, NOW), "just now");
        assert_eq!(relative(NOW - 45 * SECOND_MS, NOW), "45s ago");
        assert_eq!(relative(NOW - 3 * MINUTE_MS - 10, NOW), "3m ago");
        assert_eq!(relative(NOW - 2 * HOUR_MS, NOW), "2h ago");
        assert_eq!(relative(NOW - 5 * DAY_MS, NOW), "5d ago");
        assert_eq!(relative(NOW + 57 * MINUTE_MS, NOW), "in 57m");
        assert_eq!(relative(NOW + 5 * SECOND_MS, NOW), "in 5s");
    }

    #[test]
    fn local_with_relative_shows_both_parts_or_never() {
        assert_eq!(local_with_relative(0, NOW), "never");
        let text = local_with_relative(NOW - 3 * MINUTE_MS, NOW);
        assert!(text.ends_with(" (3m ago)"), "{text}");
        assert_eq!(text.len(), "2024-10-22 12:00:01 (3m ago)".len(), "{text}");
        assert_eq!(local_time(0), "-");
    }

    #[test]
    fn utc_millis_is_rfc3339_with_milliseconds() {
        assert_eq!(utc_millis(NOW), "2024-10-22T12:00:01.123Z");
        assert_eq!(utc_millis(0), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn truncate_keeps_short_text_and_cuts_long_text_on_char_boundaries() {
        assert_eq!(truncate("short", 60), "short");
        assert_eq!(truncate("line one\nline two", 60), "line one line two");
        let long = "é".repeat(100);
        let cut = truncate(&long, 60);
        assert_eq!(cut.chars().count(), 60);
        assert!(cut.ends_with('…'));
        assert_eq!(truncate("abcdef", 4), "abc…");
    }

    #[test]
    fn names_are_lowercase_and_empty_when_unspecified() {
        assert_eq!(priority_name(pb::Priority::Critical), "critical");
        assert_eq!(priority_name(pb::Priority::Unspecified), "");
        assert_eq!(reason_name(pb::GapReason::TooSmall), "too_small");
        assert_eq!(reason_name(pb::GapReason::Unspecified), "");
        assert_eq!(level_name(pb::LogLevel::Warn), "warn");
        assert_eq!(stream_name(pb::OutputStream::Stderr), "stderr");
    }

    #[test]
    fn task_counts_fill_every_state_and_priority() {
        let reply = vec![
            pb::StateCount {
                state: pb::TaskState::Done as i32,
                total: 400,
                by_priority: [("high".to_owned(), 100), ("low".to_owned(), 300)].into(),
            },
            pb::StateCount {
                state: pb::TaskState::Pending as i32,
                total: 2,
                by_priority: [("critical".to_owned(), 2)].into(),
            },
        ];
        let counts = TaskCounts::from_reply(&reply);
        let totals = counts.totals_json();
        assert_eq!(
            totals,
            json!({"pending": 2, "leased": 0, "done": 400, "dead": 0, "unavailable": 0, "cancelled": 0})
        );
        let by_priority = counts.by_priority_json();
        assert_eq!(
            by_priority["done"],
            json!({"critical": 0, "high": 100, "medium": 0, "low": 300})
        );
        assert_eq!(
            by_priority["cancelled"],
            json!({"critical": 0, "high": 0, "medium": 0, "low": 0})
        );
        assert_eq!(by_priority.as_object().map(|m| m.len()), Some(6));
    }

    #[test]
    fn status_json_has_the_documented_shape_even_for_an_empty_reply() {
        let value = status_json(&pb::StatusReply::default());
        let keys: Vec<&str> = value
            .as_object()
            .map(|m| m.keys().map(String::as_str).collect())
            .unwrap_or_default();
        for key in [
            "version",
            "lake",
            "loop",
            "coverage",
            "tasks",
            "tasks_by_priority",
            "ready",
            "agents",
        ] {
            assert!(keys.contains(&key), "missing {key} in {value}");
        }
        assert_eq!(value["loop"]["enabled"], json!(false));
        assert_eq!(value["loop"]["cycles"], json!(0));
        assert_eq!(value["coverage"]["too_small"], json!(0));
        assert_eq!(value["tasks"]["dead"], json!(0));
        assert_eq!(value["agents"], json!([]));
    }

    #[test]
    fn agent_json_adds_connection_fields_only_when_full() {
        let agent = pb::AgentInfo {
            id: "a1".into(),
            hostname: "h".into(),
            labels: [("zone".to_owned(), "eu".to_owned())].into(),
            slots: 2,
            running_tasks: vec![12],
            version: "0.1.0".into(),
            connected: true,
            last_seen_unix_ms: 5,
            connected_unix_ms: 4,
            address: "127.0.0.1:5000".into(),
        };
        let short = agent_json(&agent, false);
        assert_eq!(
            short,
            json!({"id": "a1", "hostname": "h", "slots": 2, "labels": {"zone": "eu"},
                   "running_tasks": [12], "connected": true, "version": "0.1.0"})
        );
        let full = agent_json(&agent, true);
        assert_eq!(full["address"], json!("127.0.0.1:5000"));
        assert_eq!(full["last_seen_unix_ms"], json!(5));
        assert_eq!(full["connected_unix_ms"], json!(4));
    }

    #[test]
    fn task_json_uses_lowercase_names_and_the_partition_key() {
        let value = task_json(&sample_task());
        assert_eq!(value["state"], json!("leased"));
        assert_eq!(value["priority"], json!("high"));
        assert_eq!(value["reason"], json!("too_small"));
        assert_eq!(value["partition"], json!("date=2024-10-22"));
        assert_eq!(value["agent"], json!("agent-1"));
        assert_eq!(value["progress"], json!(0.5));
        assert_eq!(value["effective_priority"], json!("critical"));
        assert_eq!(value["priority_reason"], json!("rule: within 3d"));
        assert_eq!(value.as_object().map(|m| m.len()), Some(15));
    }

    #[test]
    fn partition_text_falls_back_to_the_variables() {
        let mut task = sample_task();
        task.partition_key.clear();
        task.partition.push(pb::PartitionVar {
            name: "game_id".into(),
            value: "401584893".into(),
        });
        assert_eq!(partition_text(&task), "date=2024-10-22,game_id=401584893");
    }

    #[test]
    fn task_detail_json_nests_task_attempts_and_keys() {
        let detail = pb::TaskDetail {
            task: Some(sample_task()),
            attempts: vec![pb::Attempt {
                number: 1,
                lease_id: "l-1".into(),
                agent_id: "agent-1".into(),
                started_unix_ms: 10,
                ended_unix_ms: 20,
                exit_code: 75,
                outcome: "failed".into(),
                error: "throttled".into(),
            }],
            expected_keys: vec!["espn/pbp/2024-10-22.json".into()],
            scraper: "espn".into(),
        };
        let value = task_detail_json(&detail);
        assert_eq!(value["task"]["id"], json!(12));
        assert_eq!(value["scraper"], json!("espn"));
        assert_eq!(value["expected_keys"], json!(["espn/pbp/2024-10-22.json"]));
        assert_eq!(value["attempts"][0]["exit_code"], json!(75));
        assert_eq!(value["attempts"][0]["lease_id"], json!("l-1"));
    }

    #[test]
    fn coverage_reply_json_has_sources_and_total() {
        let reply = pb::CoverageReply {
            sources: vec![pb::SourceCoverage {
                source: "espn_pbp".into(),
                coverage: Some(pb::CoverageSummary {
                    expected: 10,
                    present: 9,
                    missing: 1,
                    too_small: 0,
                    percent: 90.0,
                    stale: 0,
                }),
                priority: pb::Priority::High as i32,
                missing_keys: vec!["espn/pbp/401.json".into()],
            }],
            total: None,
            computed_unix_ms: 7,
            evidence: "listing".into(),
            updated_unix_ms: 0,
        };
        let value = coverage_reply_json(&reply);
        assert_eq!(value["sources"][0]["source"], json!("espn_pbp"));
        assert_eq!(value["sources"][0]["missing"], json!(1));
        assert_eq!(
            value["sources"][0]["missing_keys"],
            json!(["espn/pbp/401.json"])
        );
        assert_eq!(value["total"]["expected"], json!(0));
        assert_eq!(value["evidence"], json!("listing"));
        assert_eq!(value["computed_unix_ms"], json!(7));
    }

    #[test]
    fn log_line_omits_empty_parts() {
        let mut entry = pb::LogEntry {
            seq: 1,
            unix_ms: NOW,
            level: pb::LogLevel::Info as i32,
            task_id: 12,
            agent_id: "agent-1".into(),
            source: "espn_pbp".into(),
            stream: pb::OutputStream::Stderr as i32,
            message: "fetching\n".into(),
        };
        assert_eq!(
            log_entry_line(&entry),
            "2024-10-22T12:00:01.123Z INFO  [task 12 espn_pbp agent-1 stderr] fetching"
        );
        entry.task_id = 0;
        entry.agent_id.clear();
        entry.source.clear();
        entry.stream = 0;
        entry.level = pb::LogLevel::Error as i32;
        assert_eq!(
            log_entry_line(&entry),
            "2024-10-22T12:00:01.123Z ERROR fetching"
        );
        let value = log_entry_json(&entry);
        assert_eq!(value["level"], json!("error"));
        assert_eq!(value["stream"], json!(""));
        assert_eq!(value["seq"], json!(1));
    }

    #[test]
    fn rendered_tables_have_no_trailing_spaces() {
        let mut t = table(["ID", "NAME"]);
        t.add_row(["1", "a"]);
        t.add_row(["22", "bbb"]);
        align_right(&mut t, &[0]);
        let text = render(&t);
        assert!(text.lines().all(|l| l == l.trim_end()), "{text:?}");
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(text.lines().next().is_some_and(|l| l.contains("ID")));
    }

    #[test]
    fn labels_are_sorted() {
        let labels = [
            ("zone".to_owned(), "eu".to_owned()),
            ("arch".to_owned(), "x86".to_owned()),
        ]
        .into();
        assert_eq!(labels_text(&labels), "arch=x86,zone=eu");
    }

    #[test]
    fn waiting_notes_read_as_one_line() {
        let note = pb::WaitingNote {
            scraper: "bbref".into(),
            reason: "no agent with proxy=residential".into(),
            ready: 3,
            since_unix_ms: 1_000_000,
        };
        assert_eq!(
            waiting_line(&note, 1_000_000 + 120_000),
            "waiting: 3 ready tasks of scraper bbref: no agent with proxy=residential (for 2m)"
        );
        assert_eq!(waiting_json(&note)["ready"], 3);
    }
}
