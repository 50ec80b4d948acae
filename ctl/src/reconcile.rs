//! `reconcile`: runs a reconcile now, shows its phases on stderr as they
//! arrive and its summary on stdout.

use std::process::ExitCode;

use adce_proto::v1 as pb;
use anyhow::bail;
use tokio_stream::StreamExt;

use crate::client::Target;
use crate::output;

/// Runs `reconcile`. The timeout bounds the opening call and each wait for
/// the next event, not the whole reconcile.
pub async fn run(target: &Target, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = target.control().await?;
    let mut events = target
        .call(
            "reconcile",
            client.reconcile(tonic::Request::new(pb::ReconcileRequest {})),
        )
        .await?;
    let mut summary = None;
    loop {
        let next = match tokio::time::timeout(target.timeout, events.next()).await {
            Ok(next) => next,
            Err(_) => bail!(target.timeout_message("reconcile")),
        };
        let event = match next {
            None => break,
            Some(Ok(event)) => event,
            Some(Err(status)) => bail!("reconcile failed: {}", target.status_message(&status)),
        };
        if let Some(line) = event_line(&event) {
            eprintln!("{line}");
        }
        if event.summary.is_some() {
            summary = event.summary;
        }
    }
    let Some(summary) = summary else {
        bail!("the reconcile stream ended without a summary");
    };
    output::print(
        json,
        || output::reconcile_summary_json(&summary),
        || render_summary(&summary),
    )?;
    Ok(ExitCode::SUCCESS)
}

/// `phase: message` for one progress event; `None` when both are empty.
pub fn event_line(event: &pb::ReconcileEvent) -> Option<String> {
    match (event.phase.is_empty(), event.message.is_empty()) {
        (true, true) => None,
        (false, true) => Some(event.phase.clone()),
        (true, false) => Some(event.message.clone()),
        (false, false) => Some(format!("{}: {}", event.phase, event.message)),
    }
}

/// The summary as aligned `name  value` lines.
pub fn render_summary(s: &pb::ReconcileSummary) -> String {
    let coverage = s.coverage.unwrap_or_default();
    let mut t = output::table(["RECONCILE", ""]);
    let rows = [
        ("expected objects", s.expected_objects.to_string()),
        ("observed objects", s.observed_objects.to_string()),
        ("gaps", s.gaps.to_string()),
        ("tasks created", s.tasks_created.to_string()),
        (
            "duration",
            humantime::format_duration(std::time::Duration::from_millis(s.duration_ms)).to_string(),
        ),
        (
            "coverage",
            format!(
                "{} ({} of {} present, {} missing, {} too small, {} stale)",
                output::percent(coverage.percent),
                coverage.present,
                coverage.expected,
                coverage.missing,
                coverage.too_small,
                coverage.stale
            ),
        ),
    ];
    for (name, value) in rows {
        t.add_row(vec![name.to_owned(), value]);
    }
    output::render(&t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_lines_join_phase_and_message() {
        let event = |phase: &str, message: &str| pb::ReconcileEvent {
            phase: phase.into(),
            message: message.into(),
            summary: None,
        };
        assert_eq!(
            event_line(&event("observe", "listed 500 objects")).as_deref(),
            Some("observe: listed 500 objects")
        );
        assert_eq!(event_line(&event("done", "")).as_deref(), Some("done"));
        assert_eq!(event_line(&event("", "")), None);
    }

    #[test]
    fn summary_shows_every_number() {
        let text = render_summary(&pb::ReconcileSummary {
            expected_objects: 500,
            observed_objects: 480,
            gaps: 20,
            tasks_created: 18,
            duration_ms: 1_250,
            coverage: Some(pb::CoverageSummary {
                expected: 500,
                present: 480,
                missing: 20,
                too_small: 0,
                percent: 96.0,
                stale: 0,
            }),
        });
        let value_of = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .map(|l| l[name.len()..].trim().to_owned())
                .unwrap_or_default()
        };
        assert_eq!(value_of("expected objects"), "500");
        assert_eq!(value_of("observed objects"), "480");
        assert_eq!(value_of("gaps"), "20");
        assert_eq!(value_of("tasks created"), "18");
        assert_eq!(value_of("duration"), "1s 250ms");
        assert!(
            value_of("coverage").starts_with("96.0% (480 of 500"),
            "{text}"
        );
    }
}
