//! `tasks` and `task`: listing the queue with filters and paging, and one
//! task with its attempts and expected keys.

use std::collections::HashSet;
use std::process::ExitCode;

use adce_proto::v1 as pb;
use anyhow::bail;
use serde_json::Value;

use crate::client::Target;
use crate::output;

/// The most pages `--all` follows, a guard against a server whose page
/// tokens never end (1000 pages of 1000 tasks is a million tasks).
const MAX_PAGES: usize = 1_000;
/// How many of a task's log lines `task` shows.
const TASK_LOG_LINES: u32 = 50;

/// The filters and paging of `tasks`, already in wire terms.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// Only this state; unspecified matches every state.
    pub state: pb::TaskState,
    /// Only this priority; unspecified matches every priority.
    pub priority: pb::Priority,
    /// Only this source; empty matches every source.
    pub source: String,
    /// Tasks per page.
    pub limit: u32,
    /// Follow `next_page_token` to the end.
    pub all: bool,
}

/// Runs `tasks`.
pub async fn list(target: &Target, query: &Query, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = target.control().await?;
    let mut tasks = Vec::new();
    let mut total = 0;
    let mut token = String::new();
    let mut seen_tokens = HashSet::new();
    let mut waiting = Vec::new();
    for _ in 0..MAX_PAGES {
        let request = pb::ListTasksRequest {
            state: query.state as i32,
            priority: query.priority as i32,
            source: query.source.clone(),
            page_size: query.limit,
            page_token: token.clone(),
        };
        let page = target
            .call("list tasks", client.list_tasks(target.request(request)))
            .await?;
        total = page.total;
        waiting = page.waiting;
        let empty = page.tasks.is_empty();
        tasks.extend(page.tasks);
        token = page.next_page_token;
        if !query.all || token.is_empty() || empty {
            break;
        }
        if !seen_tokens.insert(token.clone()) {
            bail!(
                "the server repeated page token `{token}`; stopping after {} tasks",
                tasks.len()
            );
        }
    }
    output::print(
        json,
        || tasks.iter().map(output::task_json).collect(),
        || {
            let now = output::now_unix_ms();
            let mut text = render_list(&tasks, total, now);
            for note in &waiting {
                text.push_str(&output::waiting_line(note, now));
                text.push('\n');
            }
            text
        },
    )?;
    Ok(ExitCode::SUCCESS)
}

/// Runs `task ID`.
pub async fn show(target: &Target, id: i64, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = target.control().await?;
    let detail = target
        .call(
            "get task",
            client.get_task(target.request(pb::GetTaskRequest { id })),
        )
        .await?;
    let mut stream = target
        .call(
            "logs",
            client.logs(target.request(pb::LogsRequest {
                tail: TASK_LOG_LINES,
                task_id: id,
                ..pb::LogsRequest::default()
            })),
        )
        .await?;
    let mut lines = Vec::new();
    loop {
        match tokio::time::timeout(target.timeout, stream.message()).await {
            Ok(Ok(Some(entry))) => lines.push(entry),
            Ok(Ok(None)) => break,
            Ok(Err(status)) => bail!(target.status_message(&status)),
            Err(_) => bail!(target.timeout_message("logs")),
        }
    }
    output::print(
        json,
        || {
            let mut value = output::task_detail_json(&detail);
            value["logs"] = Value::Array(lines.iter().map(output::log_entry_json).collect());
            value
        },
        || {
            let mut text = render_detail(&detail, output::now_unix_ms());
            text.push_str(&format!("\nLOG (last {TASK_LOG_LINES} lines)\n"));
            for entry in &lines {
                text.push_str(&output::log_entry_line(entry));
                text.push('\n');
            }
            text
        },
    )?;
    Ok(ExitCode::SUCCESS)
}

/// Runs `retry`.
pub async fn retry(
    target: &Target,
    request: pb::RetryRequest,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut client = target.control().await?;
    let reply = target
        .call("retry", client.retry(target.request(request)))
        .await?;
    output::print(
        json,
        || {
            serde_json::json!({
                "retried": reply.retried,
                "skipped": reply.skipped,
            })
        },
        || {
            let ids: Vec<String> = reply.retried.iter().map(i64::to_string).collect();
            format!(
                "retried {} tasks{}\n",
                ids.len(),
                if ids.is_empty() {
                    String::new()
                } else {
                    format!(": {}", ids.join(", "))
                }
            )
        },
    )?;
    for skipped in &reply.skipped {
        eprintln!("adcectl: not retried: {skipped}");
    }
    Ok(if reply.skipped.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Runs `cancel`.
pub async fn cancel(
    target: &Target,
    id: i64,
    reason: String,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut client = target.control().await?;
    let reply = target
        .call(
            "cancel",
            client.cancel(target.request(pb::CancelRequest {
                task_id: id,
                reason,
            })),
        )
        .await?;
    let previous = reply.previous_state().name();
    output::print(
        json,
        || {
            serde_json::json!({
                "task_id": reply.task_id,
                "previous_state": previous,
            })
        },
        || format!("task {} cancelled (was {previous})\n", reply.task_id),
    )?;
    Ok(ExitCode::SUCCESS)
}

/// The tasks table and its `N of TOTAL tasks` footer.
pub fn render_list(tasks: &[pb::TaskSummary], total: u64, now_ms: i64) -> String {
    let mut t = output::table([
        "ID",
        "SOURCE",
        "PARTITION",
        "STATE",
        "PRIORITY",
        "ATTEMPTS",
        "REASON",
        "AGENT",
        "LAST ERROR",
        "UPDATED",
        "WHY THIS PRIORITY",
    ]);
    for task in tasks {
        t.add_row(vec![
            task.id.to_string(),
            task.source.clone(),
            output::partition_text(task),
            state_with_progress(task),
            output::priority_name(output::effective_priority(task)).to_owned(),
            task.attempts.to_string(),
            output::reason_name(task.reason()).to_owned(),
            task.agent_id.clone(),
            output::truncate(&task.last_error, output::LAST_ERROR_WIDTH),
            output::relative(task.updated_unix_ms, now_ms),
            output::truncate(&task.priority_reason, output::LAST_ERROR_WIDTH),
        ]);
    }
    output::align_right(&mut t, &[0, 5]);
    let mut text = output::render(&t);
    text.push_str(&format!("{} of {total} tasks\n", tasks.len()));
    text
}

/// The state, with the running attempt's progress for leased tasks
/// (`leased 40%`).
fn state_with_progress(task: &pb::TaskSummary) -> String {
    let name = task.state().name();
    if task.state() == pb::TaskState::Leased && task.progress > 0.0 {
        format!("{name} {:.0}%", task.progress * 100.0)
    } else {
        name.to_owned()
    }
}

/// One task in full: its fields, expected keys and attempts.
pub fn render_detail(detail: &pb::TaskDetail, now_ms: i64) -> String {
    let task = detail.task.clone().unwrap_or_default();
    let mut fields = output::table([format!("TASK {}", task.id), String::new()]);
    let rows = [
        ("source", task.source.clone()),
        ("partition", output::partition_text(&task)),
        ("scraper", detail.scraper.clone()),
        ("state", state_with_progress(&task)),
        (
            "priority",
            output::priority_name(task.priority()).to_owned(),
        ),
        ("reason", output::reason_name(task.reason()).to_owned()),
        ("attempts", task.attempts.to_string()),
        ("agent", task.agent_id.clone()),
        (
            "created",
            output::local_with_relative(task.created_unix_ms, now_ms),
        ),
        (
            "updated",
            output::local_with_relative(task.updated_unix_ms, now_ms),
        ),
        (
            "ready",
            output::local_with_relative(task.ready_unix_ms, now_ms),
        ),
        ("last error", task.last_error.trim().to_owned()),
    ];
    for (name, value) in rows {
        if !value.is_empty() {
            fields.add_row(vec![name.to_owned(), value]);
        }
    }
    let mut text = output::render(&fields);

    text.push_str("\nEXPECTED KEYS\n");
    if detail.expected_keys.is_empty() {
        text.push_str("none\n");
    }
    for key in &detail.expected_keys {
        text.push_str(key);
        text.push('\n');
    }

    text.push('\n');
    if detail.attempts.is_empty() {
        text.push_str("ATTEMPTS\nnone yet\n");
        return text;
    }
    let mut attempts = output::table([
        "ATTEMPT", "AGENT", "LEASE", "STARTED", "ENDED", "EXIT", "OUTCOME", "ERROR",
    ]);
    for a in &detail.attempts {
        let running = a.ended_unix_ms == 0;
        attempts.add_row(vec![
            a.number.to_string(),
            a.agent_id.clone(),
            a.lease_id.clone(),
            output::local_time(a.started_unix_ms),
            if running {
                "running".to_owned()
            } else {
                output::local_time(a.ended_unix_ms)
            },
            if running {
                String::new()
            } else {
                a.exit_code.to_string()
            },
            a.outcome.clone(),
            output::truncate(&a.error, output::LAST_ERROR_WIDTH),
        ]);
    }
    output::align_right(&mut attempts, &[0, 5]);
    text.push_str(&output::render(&attempts));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_729_598_401_000;

    fn task(id: i64) -> pb::TaskSummary {
        pb::TaskSummary {
            id,
            source: "espn_pbp".into(),
            partition_key: "date=2024-10-22".into(),
            state: pb::TaskState::Leased as i32,
            priority: pb::Priority::Critical as i32,
            attempts: 3,
            reason: pb::GapReason::Missing as i32,
            last_error: format!("upstream said no: {}", "x".repeat(100)),
            agent_id: "agent-1".into(),
            updated_unix_ms: NOW - 120_000,
            progress: 0.4,
            ..Default::default()
        }
    }

    #[test]
    fn list_has_columns_truncated_errors_and_a_footer() {
        let text = render_list(&[task(12), task(13)], 40, NOW);
        let header = text.lines().next().unwrap_or_default();
        for column in [
            "ID",
            "SOURCE",
            "PARTITION",
            "STATE",
            "PRIORITY",
            "ATTEMPTS",
            "REASON",
            "AGENT",
            "LAST ERROR",
            "UPDATED",
        ] {
            assert!(header.contains(column), "missing {column} in {header}");
        }
        assert!(text.contains("leased 40%"), "{text}");
        assert!(text.contains("critical"), "{text}");
        assert!(text.contains("2m ago"), "{text}");
        assert!(
            !text.contains(&"x".repeat(60)),
            "error not truncated:\n{text}"
        );
        assert!(text.contains('…'), "{text}");
        assert_eq!(text.lines().last(), Some("2 of 40 tasks"));
    }

    #[test]
    fn detail_lists_keys_and_attempts() {
        let detail = pb::TaskDetail {
            task: Some(task(12)),
            attempts: vec![
                pb::Attempt {
                    number: 1,
                    lease_id: "l-00aa".into(),
                    agent_id: "agent-1".into(),
                    started_unix_ms: NOW - 600_000,
                    ended_unix_ms: NOW - 500_000,
                    exit_code: 75,
                    outcome: "failed".into(),
                    error: "throttled".into(),
                },
                pb::Attempt {
                    number: 2,
                    lease_id: "l-00bb".into(),
                    agent_id: "agent-2".into(),
                    started_unix_ms: NOW - 60_000,
                    ..Default::default()
                },
            ],
            expected_keys: vec!["espn/pbp/2024-10-22.json".into()],
            scraper: "espn".into(),
        };
        let text = render_detail(&detail, NOW);
        for needle in [
            "TASK 12",
            "espn/pbp/2024-10-22.json",
            "l-00aa",
            "throttled",
            "75",
            "running",
            "scraper",
            "espn",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        let second = text
            .lines()
            .find(|l| l.contains("l-00bb"))
            .unwrap_or_default();
        assert!(second.contains("running"), "{second}");
    }

    #[test]
    fn detail_without_attempts_says_none_yet() {
        let detail = pb::TaskDetail {
            task: Some(task(1)),
            ..Default::default()
        };
        let text = render_detail(&detail, NOW);
        assert!(text.contains("none yet"), "{text}");
        assert!(text.contains("EXPECTED KEYS\nnone"), "{text}");
    }
}
