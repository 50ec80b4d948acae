//! `agents`: the connected agents and the ones seen recently.

use std::process::ExitCode;

use adce_proto::v1 as pb;

use crate::client::Target;
use crate::output;

/// Runs `agents`.
pub async fn list(target: &Target, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = target.control().await?;
    let reply = target
        .call(
            "list agents",
            client.list_agents(target.request(pb::ListAgentsRequest {})),
        )
        .await?;
    output::print(
        json,
        || {
            reply
                .agents
                .iter()
                .map(|a| output::agent_json(a, true))
                .collect()
        },
        || render(&reply.agents, output::now_unix_ms()),
    )?;
    Ok(ExitCode::SUCCESS)
}

/// The agents table.
pub fn render(agents: &[pb::AgentInfo], now_ms: i64) -> String {
    if agents.is_empty() {
        return "no agents\n".to_owned();
    }
    let mut t = output::table([
        "ID",
        "HOST",
        "LABELS",
        "SLOTS",
        "RUNNING",
        "CONNECTED",
        "LAST SEEN",
        "ADDRESS",
    ]);
    for a in agents {
        t.add_row(vec![
            a.id.clone(),
            a.hostname.clone(),
            output::labels_text(&a.labels),
            a.slots.to_string(),
            a.running_tasks.len().to_string(),
            if a.connected { "yes" } else { "no" }.to_owned(),
            output::relative(a.last_seen_unix_ms, now_ms),
            a.address.clone(),
        ]);
    }
    output::align_right(&mut t, &[3, 4]);
    output::render(&t)
}

/// Runs `drain`.
pub async fn drain(target: &Target, agent: String, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = target.control().await?;
    let reply = target
        .call(
            "drain agent",
            client.drain_agent(target.request(pb::DrainAgentRequest { agent_id: agent })),
        )
        .await?;
    output::print(
        json,
        || {
            serde_json::json!({
                "agent_id": reply.agent_id,
                "running_tasks": reply.running_tasks,
            })
        },
        || {
            format!(
                "agent {} is draining: it finishes {} running tasks, then exits\n",
                reply.agent_id,
                reply.running_tasks.len()
            )
        },
    )?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_729_598_401_000;

    #[test]
    fn table_shows_labels_counts_and_connection() {
        let agents = [
            pb::AgentInfo {
                id: "agent-1".into(),
                hostname: "box".into(),
                labels: [
                    ("zone".to_owned(), "eu".to_owned()),
                    ("gpu".to_owned(), "no".to_owned()),
                ]
                .into(),
                slots: 4,
                running_tasks: vec![1, 2, 3],
                connected: true,
                last_seen_unix_ms: NOW - 2_000,
                address: "10.0.0.5:51234".into(),
                ..Default::default()
            },
            pb::AgentInfo {
                id: "agent-2".into(),
                hostname: "old".into(),
                slots: 1,
                last_seen_unix_ms: NOW - 3_600_000,
                ..Default::default()
            },
        ];
        let text = render(&agents, NOW);
        let first = text
            .lines()
            .find(|l| l.starts_with("agent-1"))
            .unwrap_or_default();
        assert_eq!(
            first.split_whitespace().collect::<Vec<_>>(),
            [
                "agent-1",
                "box",
                "gpu=no,zone=eu",
                "4",
                "3",
                "yes",
                "2s",
                "ago",
                "10.0.0.5:51234"
            ]
        );
        let second = text
            .lines()
            .find(|l| l.starts_with("agent-2"))
            .unwrap_or_default();
        assert!(
            second.contains("no") && second.contains("1h ago"),
            "{second}"
        );
        assert_eq!(render(&[], NOW), "no agents\n");
    }
}
