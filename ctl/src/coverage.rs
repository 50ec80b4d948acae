//! `coverage`: expected, present and missing objects per source from the
//! server's last reconcile; with `--missing`, the missing keys themselves.

use std::process::ExitCode;

use adce_proto::v1 as pb;

use crate::client::Target;
use crate::output;

/// Runs `coverage`; `missing` asks for up to that many missing keys per source.
pub async fn show(
    target: &Target,
    source: &str,
    missing: Option<u32>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut client = target.control().await?;
    let request = pb::CoverageRequest {
        source: source.to_owned(),
        missing: missing.is_some(),
        limit: missing.unwrap_or_default(),
    };
    let reply = target
        .call("coverage", client.coverage(target.request(request)))
        .await?;
    output::print(
        json,
        || output::coverage_reply_json(&reply),
        || {
            let mut text = render(&reply, output::now_unix_ms());
            if missing.is_some() {
                text.push_str(&render_missing(&reply));
            }
            text
        },
    )?;
    Ok(ExitCode::SUCCESS)
}

/// The per-source table, a TOTAL row, and where the numbers came from.
pub fn render(reply: &pb::CoverageReply, now_ms: i64) -> String {
    let mut t = output::table([
        "SOURCE",
        "EXPECTED",
        "PRESENT",
        "MISSING",
        "TOO SMALL",
        "STALE",
        "%",
    ]);
    let mut add = |name: &str, c: &pb::CoverageSummary| {
        t.add_row(vec![
            name.to_owned(),
            c.expected.to_string(),
            c.present.to_string(),
            c.missing.to_string(),
            c.too_small.to_string(),
            c.stale.to_string(),
            output::percent(c.percent),
        ]);
    };
    for s in &reply.sources {
        add(&s.source, &s.coverage.unwrap_or_default());
    }
    add("TOTAL", &reply.total.unwrap_or_default());
    output::align_right(&mut t, &[1, 2, 3, 4, 5, 6]);
    let mut text = output::render(&t);
    if reply.computed_unix_ms == 0 {
        text.push_str("no reconcile has finished yet\n");
    } else {
        let evidence = if reply.evidence.is_empty() {
            String::new()
        } else {
            format!(" from {}", reply.evidence)
        };
        text.push_str(&format!(
            "computed {}{evidence}\n",
            output::local_with_relative(reply.computed_unix_ms, now_ms)
        ));
        if reply.updated_unix_ms > 0 {
            text.push_str(&format!(
                "moved by uploads since, last {}\n",
                output::local_with_relative(reply.updated_unix_ms, now_ms)
            ));
        }
    }
    text
}

/// Per source, its missing keys one per line under a heading that says how
/// many of how many are shown.
pub fn render_missing(reply: &pb::CoverageReply) -> String {
    let mut text = String::new();
    for s in &reply.sources {
        let all = s.coverage.unwrap_or_default().missing;
        let shown = s.missing_keys.len();
        text.push('\n');
        if all == 0 {
            text.push_str(&format!("{}: nothing missing\n", s.source));
            continue;
        }
        let of = if shown as u64 == all {
            format!("{all}")
        } else {
            format!("{shown} of {all}")
        };
        text.push_str(&format!("{}: missing keys ({of}):\n", s.source));
        for key in &s.missing_keys {
            text.push_str(&format!("  {key}\n"));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_729_598_401_000;

    fn summary(expected: u64, present: u64) -> pb::CoverageSummary {
        pb::CoverageSummary {
            expected,
            present,
            missing: expected - present,
            too_small: 0,
            percent: present as f64 * 100.0 / expected as f64,
            stale: 0,
        }
    }

    #[test]
    fn table_has_a_row_per_source_then_total() {
        let reply = pb::CoverageReply {
            sources: vec![
                pb::SourceCoverage {
                    source: "espn_pbp".into(),
                    coverage: Some(summary(200, 150)),
                    priority: pb::Priority::High as i32,
                    missing_keys: Vec::new(),
                },
                pb::SourceCoverage {
                    source: "nba_schedule".into(),
                    coverage: Some(summary(50, 50)),
                    priority: pb::Priority::Medium as i32,
                    missing_keys: Vec::new(),
                },
            ],
            total: Some(summary(250, 200)),
            computed_unix_ms: NOW - 60_000,
            evidence: "listing".into(),
            updated_unix_ms: NOW - 30_000,
        };
        let text = render(&reply, NOW);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("SOURCE"), "{text}");
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            ["espn_pbp", "200", "150", "50", "0", "0", "75.0%"]
        );
        assert!(lines[2].starts_with("nba_schedule"), "{text}");
        assert_eq!(
            lines[3].split_whitespace().collect::<Vec<_>>(),
            ["TOTAL", "250", "200", "50", "0", "0", "80.0%"]
        );
        assert!(lines[4].contains("(1m ago) from listing"), "{text}");
        assert!(
            lines[5].starts_with("moved by uploads since, last ")
                && lines[5].ends_with("(30s ago)"),
            "{text}"
        );
        let mut confirmed = reply.clone();
        confirmed.updated_unix_ms = 0;
        assert!(!render(&confirmed, NOW).contains("moved by uploads"));
    }

    #[test]
    fn before_the_first_reconcile_it_says_so() {
        let text = render(&pb::CoverageReply::default(), NOW);
        assert!(text.contains("no reconcile has finished yet"), "{text}");
    }
}
