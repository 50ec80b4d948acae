//! `health`: asks the standard `grpc.health.v1.Health` service about the
//! server, its gRPC services and its components.

use std::process::ExitCode;

use serde_json::{Map, Value};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::client::Target;
use crate::output;

/// What `health` checks when no names are given: the whole server, both
/// services and every component the server reports.
pub const DEFAULT_NAMES: [&str; 7] = [
    "",
    "adce.v1.Control",
    "adce.v1.AgentGateway",
    "adce.store",
    "adce.lake",
    "adce.reconciler",
    "adce.dispatcher",
];

/// The answer for one checked name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The server reported this status.
    Reported(ServingStatus),
    /// The server does not know the name (gRPC `NOT_FOUND`).
    NotFound,
}

impl Check {
    /// The name in `--json` output: the proto enum's name, and
    /// `SERVICE_UNKNOWN` for a name the server does not know.
    pub fn json_name(self) -> &'static str {
        match self {
            Check::Reported(status) => status.as_str_name(),
            Check::NotFound => ServingStatus::ServiceUnknown.as_str_name(),
        }
    }

    /// The name in human output: like JSON, but `unknown` for a name the
    /// server does not know.
    pub fn human_name(self) -> &'static str {
        match self {
            Check::Reported(status) => status.as_str_name(),
            Check::NotFound => "unknown",
        }
    }

    /// Whether this answer makes `health` fail: anything that exists and is
    /// not serving.
    pub fn is_failure(self) -> bool {
        match self {
            Check::Reported(status) => status != ServingStatus::Serving,
            Check::NotFound => false,
        }
    }
}

/// Runs `health`.
pub async fn check(target: &Target, names: &[String], json: bool) -> anyhow::Result<ExitCode> {
    let names: Vec<String> = if names.is_empty() {
        DEFAULT_NAMES.iter().map(|s| (*s).to_owned()).collect()
    } else {
        names.to_vec()
    };
    let mut client = target.health().await?;
    let mut results = Vec::with_capacity(names.len());
    for name in names {
        let request = target.request(HealthCheckRequest {
            service: name.clone(),
        });
        let call = client.check(request);
        let answer = match tokio::time::timeout(target.timeout, call).await {
            Ok(Ok(response)) => Check::Reported(reported(response.get_ref())),
            Ok(Err(status)) if status.code() == tonic::Code::NotFound => Check::NotFound,
            Ok(Err(status)) => anyhow::bail!(
                "health check of {}: {}",
                display_name(&name),
                target.status_message(&status)
            ),
            Err(_) => anyhow::bail!(
                target.timeout_message(&format!("health check of {}", display_name(&name)))
            ),
        };
        results.push((name, answer));
    }
    let failed = results.iter().any(|(_, check)| check.is_failure());
    // Why, for people: the server's active alerts.
    let alerts = if failed && !json {
        alert_lines(target).await
    } else {
        String::new()
    };
    output::print(
        json,
        || results_json(&results),
        || render(&results) + &alerts,
    )?;
    if failed {
        Ok(ExitCode::FAILURE)
    } else {
        Ok(ExitCode::SUCCESS)
    }
}

/// The server's active alerts as `component: message` lines; best effort,
/// empty when the status call fails.
async fn alert_lines(target: &Target) -> String {
    let mut text = String::new();
    if let Ok(mut control) = target.control().await {
        if let Ok(Ok(status)) = tokio::time::timeout(
            target.timeout,
            control.status(target.request(adce_proto::v1::StatusRequest {})),
        )
        .await
        {
            for alert in &status.get_ref().alerts {
                text.push_str(&format!("{}: {}\n", alert.component, alert.message));
            }
        }
    }
    text
}

/// The status in a check response; an out-of-range number reads as `UNKNOWN`.
fn reported(response: &HealthCheckResponse) -> ServingStatus {
    ServingStatus::try_from(response.status).unwrap_or(ServingStatus::Unknown)
}

/// A name as shown to people: the empty name is the whole server.
fn display_name(name: &str) -> &str {
    if name.is_empty() { "\"\"" } else { name }
}

/// `{"": "SERVING", "adce.store": "SERVING", ...}`.
pub fn results_json(results: &[(String, Check)]) -> Value {
    let map: Map<String, Value> = results
        .iter()
        .map(|(name, check)| (name.clone(), Value::String(check.json_name().to_owned())))
        .collect();
    Value::Object(map)
}

/// `NAME STATUS` lines, aligned.
pub fn render(results: &[(String, Check)]) -> String {
    let mut t = output::table(["NAME", "STATUS"]);
    for (name, check) in results {
        t.add_row(vec![
            display_name(name).to_owned(),
            check.human_name().to_owned(),
        ]);
    }
    output::render(&t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_existing_names_that_do_not_serve_fail() {
        assert!(!Check::Reported(ServingStatus::Serving).is_failure());
        assert!(Check::Reported(ServingStatus::NotServing).is_failure());
        assert!(Check::Reported(ServingStatus::Unknown).is_failure());
        assert!(!Check::NotFound.is_failure());
    }

    #[test]
    fn names_in_json_and_for_people() {
        let results = vec![
            ("".to_owned(), Check::Reported(ServingStatus::Serving)),
            (
                "adce.lake".to_owned(),
                Check::Reported(ServingStatus::NotServing),
            ),
            ("adce.nothing".to_owned(), Check::NotFound),
        ];
        assert_eq!(
            results_json(&results),
            serde_json::json!({"": "SERVING", "adce.lake": "NOT_SERVING", "adce.nothing": "SERVICE_UNKNOWN"})
        );
        let text = render(&results);
        let lines: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(lines[1], ["\"\"", "SERVING"]);
        assert_eq!(lines[2], ["adce.lake", "NOT_SERVING"]);
        assert_eq!(lines[3], ["adce.nothing", "unknown"]);
    }
}
