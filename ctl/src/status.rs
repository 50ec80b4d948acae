//! `status`, `pause` and `resume`: the loop, coverage, task counts and
//! agents at a glance, and steering the loop.

use std::process::ExitCode;

use adce_proto::v1 as pb;

use crate::client::Target;
use crate::output::{self, TaskCounts};

/// Runs `status`.
pub async fn status(target: &Target, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = target.control().await?;
    let reply = target
        .call(
            "status",
            client.status(target.request(pb::StatusRequest {})),
        )
        .await?;
    output::print(
        json,
        || output::status_json(&reply),
        || render_status(&reply, output::now_unix_ms()),
    )?;
    Ok(ExitCode::SUCCESS)
}

/// Runs `pause` (`pause == true`) or `resume`.
pub async fn set_paused(target: &Target, pause: bool, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = target.control().await?;
    let reply = if pause {
        target
            .call("pause", client.pause(target.request(pb::PauseRequest {})))
            .await?
    } else {
        target
            .call(
                "resume",
                client.resume(target.request(pb::ResumeRequest {})),
            )
            .await?
    };
    print_loop(&reply.r#loop.unwrap_or_default(), json)?;
    Ok(ExitCode::SUCCESS)
}

/// Prints the loop state a steering command leaves behind.
fn print_loop(state: &pb::LoopState, json: bool) -> std::io::Result<()> {
    output::print(
        json,
        || output::loop_json(state),
        || render_loop(state, output::now_unix_ms()),
    )
}

/// One phrase for the loop: `disabled`, `paused`, `running, idle` or
/// `running, in cycle since 14:00:01 (3m ago)`.
pub fn loop_phrase(state: &pb::LoopState, now_ms: i64) -> String {
    if !state.enabled {
        return "disabled".to_owned();
    }
    let mode = if state.paused { "paused" } else { "running" };
    if state.in_cycle {
        let since = if state.cycle_started_unix_ms == 0 {
            String::new()
        } else {
            format!(
                " since {}",
                output::local_with_relative(state.cycle_started_unix_ms, now_ms)
            )
        };
        format!("{mode}, in cycle{since}")
    } else {
        format!("{mode}, idle")
    }
}

/// The loop section as `key  value` lines.
pub fn render_loop(state: &pb::LoopState, now_ms: i64) -> String {
    let mut t = output::table(["LOOP", ""]);
    t.add_row(vec!["state".to_owned(), loop_phrase(state, now_ms)]);
    t.add_row(vec!["cycles".to_owned(), state.cycles.to_string()]);
    t.add_row(vec![
        "last reconcile".to_owned(),
        output::local_with_relative(state.last_reconcile_unix_ms, now_ms),
    ]);
    t.add_row(vec![
        "next reconcile".to_owned(),
        output::local_with_relative(state.next_reconcile_unix_ms, now_ms),
    ]);
    if state.in_cycle {
        let left = (state.cycle_deadline_unix_ms - now_ms).max(0);
        t.add_row(vec![
            "this cycle".to_owned(),
            format!(
                "{} done, {} failed, {} left of max_cycle_runtime",
                state.cycle_done,
                state.cycle_failed,
                output::relative(now_ms - left, now_ms).trim_end_matches(" ago")
            ),
        ]);
    }
    output::render(&t)
}

/// Runs `start`, `stop [--now]` or `restart`.
pub async fn control_loop(
    target: &Target,
    action: LoopAction,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut client = target.control().await?;
    let reply = match action {
        LoopAction::Start => {
            target
                .call("start", client.start(target.request(pb::StartRequest {})))
                .await?
        }
        LoopAction::Stop { now } => {
            target
                .call("stop", client.stop(target.request(pb::StopRequest { now })))
                .await?
        }
        LoopAction::Restart => {
            target
                .call(
                    "restart",
                    client.restart(target.request(pb::RestartRequest {})),
                )
                .await?
        }
    };
    print_loop(&reply.r#loop.unwrap_or_default(), json)?;
    Ok(ExitCode::SUCCESS)
}

/// What `start`, `stop` and `restart` ask of the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopAction {
    /// Start (resume) handing out work.
    Start,
    /// Stop handing out work; `now` also cancels running tasks.
    Stop {
        /// Cancel running tasks too.
        now: bool,
    },
    /// Stop, reconcile, start.
    Restart,
}

/// The whole human status: server and loop, coverage, tasks, agents.
pub fn render_status(reply: &pb::StatusReply, now_ms: i64) -> String {
    let state = reply.r#loop.unwrap_or_default();
    let coverage = reply.coverage.unwrap_or_default();

    let mut head = output::table(["SERVER", ""]);
    head.add_row(vec!["version".to_owned(), reply.version.clone()]);
    head.add_row(vec!["lake".to_owned(), reply.lake.clone()]);
    let mut text = output::render(&head);
    text.push('\n');
    text.push_str(&render_loop(&state, now_ms));

    let mut cov = output::table([
        "COVERAGE",
        "EXPECTED",
        "PRESENT",
        "MISSING",
        "TOO SMALL",
        "STALE",
        "%",
    ]);
    cov.add_row(vec![
        "all sources".to_owned(),
        coverage.expected.to_string(),
        coverage.present.to_string(),
        coverage.missing.to_string(),
        coverage.too_small.to_string(),
        coverage.stale.to_string(),
        output::percent(coverage.percent),
    ]);
    output::align_right(&mut cov, &[1, 2, 3, 4, 5, 6]);
    text.push('\n');
    text.push_str(&output::render(&cov));
    if reply.coverage_updated_unix_ms > 0 {
        text.push_str(&format!(
            "coverage of the last reconcile, moved by uploads since (last {})\n",
            output::local_with_relative(reply.coverage_updated_unix_ms, now_ms)
        ));
    }

    let counts = TaskCounts::from_reply(&reply.tasks);
    let mut tasks = output::table(["TASKS", "TOTAL", "CRITICAL", "HIGH", "MEDIUM", "LOW"]);
    for (state, total, by_priority) in &counts.rows {
        let mut row = vec![state.name().to_owned(), total.to_string()];
        row.extend(by_priority.iter().map(u64::to_string));
        tasks.add_row(row);
    }
    tasks.add_row(vec![
        "ready now".to_owned(),
        reply.ready.to_string(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
    ]);
    output::align_right(&mut tasks, &[1, 2, 3, 4, 5]);
    text.push('\n');
    text.push_str(&output::render(&tasks));

    text.push('\n');
    if reply.agents.is_empty() {
        text.push_str("AGENTS\nnone connected\n");
    } else {
        let mut agents = output::table(["AGENTS", "HOST", "SLOTS", "RUNNING"]);
        for a in &reply.agents {
            agents.add_row(vec![
                a.id.clone(),
                a.hostname.clone(),
                a.slots.to_string(),
                a.running_tasks.len().to_string(),
            ]);
        }
        output::align_right(&mut agents, &[2, 3]);
        text.push_str(&output::render(&agents));
    }
    if !reply.backlog_by_source.is_empty() {
        let mut backlog: Vec<_> = reply.backlog_by_source.iter().collect();
        backlog.sort();
        let mut t = output::table(["BACKLOG", "PENDING"]);
        for (source, pending) in backlog {
            t.add_row(vec![source.clone(), pending.to_string()]);
        }
        output::align_right(&mut t, &[1]);
        text.push('\n');
        text.push_str(&output::render(&t));
    }
    if !reply.alerts.is_empty() {
        text.push_str("\nALERTS\n");
        for alert in &reply.alerts {
            text.push_str(&format!(
                "{}: {} (since {})\n",
                alert.component,
                alert.message,
                output::relative(alert.since_unix_ms, now_ms)
            ));
        }
    }
    if !reply.waiting.is_empty() {
        text.push_str("\nWAITING\n");
        for note in &reply.waiting {
            text.push_str(&output::waiting_line(note, now_ms));
            text.push('\n');
        }
    }
    text
}

/// Runs `reload`.
pub async fn reload(target: &Target, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = target.control().await?;
    let reply = target
        .call(
            "reload",
            client.reload(target.request(pb::ReloadRequest {})),
        )
        .await?;
    output::print(
        json,
        || {
            serde_json::json!({
                "message": reply.message,
                "needs_restart": reply.needs_restart,
            })
        },
        || format!("{}\n", reply.message),
    )?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_729_598_401_000;

    fn reply() -> pb::StatusReply {
        pb::StatusReply {
            version: "0.1.0".into(),
            r#loop: Some(pb::LoopState {
                enabled: true,
                paused: false,
                in_cycle: false,
                last_reconcile_unix_ms: NOW - 180_000,
                next_reconcile_unix_ms: NOW + 3_420_000,
                cycle_started_unix_ms: 0,
                cycle_done: 0,
                cycle_failed: 0,
                cycle_deadline_unix_ms: 0,
                cycles: 2,
            }),
            coverage: Some(pb::CoverageSummary {
                expected: 500,
                present: 499,
                missing: 1,
                too_small: 0,
                percent: 99.8,
                stale: 0,
            }),
            tasks: vec![pb::StateCount {
                state: pb::TaskState::Done as i32,
                total: 400,
                by_priority: [("high".to_owned(), 400)].into(),
            }],
            agents: vec![pb::AgentInfo {
                id: "agent-1".into(),
                hostname: "box".into(),
                slots: 2,
                running_tasks: vec![12, 13],
                connected: true,
                ..Default::default()
            }],
            ready: 7,
            lake: "local:/x".into(),
            waiting: Vec::new(),
            backlog_by_source: Default::default(),
            coverage_updated_unix_ms: NOW - 10_000,
            alerts: Vec::new(),
        }
    }

    #[test]
    fn status_says_when_uploads_moved_the_coverage() {
        let text = render_status(&reply(), NOW);
        assert!(
            text.contains("coverage of the last reconcile, moved by uploads since (last ")
                && text.contains("(10s ago))"),
            "{text}"
        );
        let mut confirmed = reply();
        confirmed.coverage_updated_unix_ms = 0;
        assert!(!render_status(&confirmed, NOW).contains("moved by uploads"));
    }

    #[test]
    fn loop_phrase_names_each_mode() {
        let mut state = pb::LoopState {
            enabled: true,
            ..Default::default()
        };
        assert_eq!(loop_phrase(&state, NOW), "running, idle");
        state.paused = true;
        assert_eq!(loop_phrase(&state, NOW), "paused, idle");
        state.paused = false;
        state.in_cycle = true;
        state.cycle_started_unix_ms = NOW - 120_000;
        let phrase = loop_phrase(&state, NOW);
        assert!(phrase.starts_with("running, in cycle since "), "{phrase}");
        assert!(phrase.ends_with("(2m ago)"), "{phrase}");
        state.enabled = false;
        assert_eq!(loop_phrase(&state, NOW), "disabled");
    }

    #[test]
    fn status_shows_every_section_with_its_numbers() {
        let text = render_status(&reply(), NOW);
        for needle in [
            "local:/x",
            "running, idle",
            "(3m ago)",
            "(in 57m)",
            "99.8%",
            "unavailable",
            "cancelled",
            "ready now",
            "agent-1",
            "box",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        let done = text
            .lines()
            .find(|l| l.starts_with("done"))
            .unwrap_or_default();
        let numbers: Vec<&str> = done.split_whitespace().collect();
        assert_eq!(numbers, ["done", "400", "0", "400", "0", "0"], "{done}");
        let agent = text
            .lines()
            .find(|l| l.starts_with("agent-1"))
            .unwrap_or_default();
        assert_eq!(
            agent.split_whitespace().collect::<Vec<_>>(),
            ["agent-1", "box", "2", "2"]
        );
    }

    #[test]
    fn status_without_agents_says_so() {
        let mut r = reply();
        r.agents.clear();
        assert!(render_status(&r, NOW).contains("none connected"));
    }
}
