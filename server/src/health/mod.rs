//! Component health: every few seconds the checker looks at the store (does
//! the scheduler answer), the lake (does it answer a probe, every 30 s), the reconciler
//! (is a reconcile overdue) and the dispatcher (does ready work wait with no
//! eligible agent), sets each component's gRPC health status, and keeps the
//! active alerts: raised and resolved ones are logged, status shows them.
//! Alerts also go to the optional webhook (`alerts.webhook`), whose client
//! lives in `webhook.rs`.

mod webhook;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{info, warn};

use crate::autoloop::LoopHandle;
use crate::config::{AlertsConfig, FailureRateRule};
use crate::lake::SharedLake;
use crate::logs::Event;
use crate::model::{UnixMs, now_ms};
use crate::scheduler::Handle;
use webhook::Webhook;

/// Health names of the server's components, beside `""` and each service.
pub const COMPONENTS: [&str; 4] = [
    "adce.store",
    "adce.lake",
    "adce.reconciler",
    "adce.dispatcher",
];

/// How often components are checked.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// How often the lake is probed (a request to S3 for an S3 lake); between
/// probes its last answer stands.
const LAKE_PROBE_EVERY_MS: i64 = 30_000;
/// A reconcile is overdue after this many reconcile intervals without one.
const OVERDUE_INTERVALS: u32 = 2;
/// ...plus this much slack.
const OVERDUE_SLACK: Duration = Duration::from_secs(60);

/// One active alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    /// The health component it affects.
    pub component: &'static str,
    /// What is wrong.
    pub message: String,
    /// Since when.
    pub since: UnixMs,
}

/// The active alerts, shared with status.
#[derive(Debug, Clone, Default)]
pub struct Alerts(Arc<Mutex<Vec<Alert>>>);

impl Alerts {
    /// The active alerts, by component.
    pub fn active(&self) -> Vec<Alert> {
        self.0.lock().map(|a| a.clone()).unwrap_or_default()
    }

    fn set(&self, alerts: Vec<Alert>) {
        if let Ok(mut guard) = self.0.lock() {
            *guard = alerts;
        }
    }
}

/// What the checks found: component → problem (absent: healthy).
pub type Findings = BTreeMap<&'static str, String>;

/// Why a reconcile is overdue, if it is.
pub fn reconcile_overdue(
    enabled: bool,
    last_reconcile: UnixMs,
    started: UnixMs,
    allowed: Duration,
    now: UnixMs,
) -> Option<String> {
    if !enabled {
        return None;
    }
    let allowed_ms = crate::model::duration_ms(allowed);
    let since = if last_reconcile > 0 {
        last_reconcile
    } else {
        started
    };
    (now - since > allowed_ms).then(|| {
        if last_reconcile > 0 {
            format!(
                "reconcile overdue: the last one finished {} ago",
                humantime::format_duration(Duration::from_secs(
                    u64::try_from((now - last_reconcile) / 1000).unwrap_or(0)
                ))
            )
        } else {
            "reconcile overdue: none has finished since the server started".into()
        }
    })
}

/// Why the failure rate is too high, if it is: `samples` are (time, done,
/// failed) totals, oldest first, covering the rule's window.
pub fn failure_rate_too_high(
    samples: &std::collections::VecDeque<(UnixMs, u64, u64)>,
    rule: &FailureRateRule,
) -> Option<String> {
    let (first, last) = (samples.front()?, samples.back()?);
    let done = last.1.saturating_sub(first.1);
    let failed = last.2.saturating_sub(first.2);
    let finished = done + failed;
    if finished < rule.min_attempts.max(1) {
        return None;
    }
    let ratio = failed as f64 / finished as f64;
    (ratio > rule.ratio).then(|| {
        format!(
            "{failed} of {finished} attempts failed in the last {} ({:.0}%, above {:.0}%)",
            humantime::format_duration(rule.window),
            ratio * 100.0,
            rule.ratio * 100.0
        )
    })
}

/// What the checker needs besides the components it asks.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// `loop.reconcile_interval`.
    pub reconcile_interval: Duration,
    /// The alert rules and webhook.
    pub rules: AlertsConfig,
}

/// Runs the checks until `stop`; sets health statuses and `alerts`.
pub async fn run(
    reporter: HealthReporter,
    scheduler: Handle,
    lake: SharedLake,
    loop_handle: LoopHandle,
    options: CheckOptions,
    alerts: Alerts,
    stop: CancellationToken,
) {
    let reconcile_interval = options.reconcile_interval;
    let rules = options.rules;
    let webhook = rules
        .webhook
        .as_deref()
        .and_then(|url| Webhook::start(url, rules.webhook_ca.clone(), stop.child_token()));
    let mut samples: std::collections::VecDeque<(UnixMs, u64, u64)> =
        std::collections::VecDeque::new();
    let (mut lake_probed_at, mut lake_problem): (UnixMs, Option<String>) = (0, None);
    let started = now_ms();
    let mut ticker = tokio::time::interval(CHECK_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut active: BTreeMap<&'static str, Alert> = BTreeMap::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now = now_ms();
        let mut findings = Findings::new();
        match scheduler.report().await {
            Ok(report) => {
                samples.push_back((now, report.stats.done_total, report.stats.failed_total));
                let window = crate::model::duration_ms(rules.failure_rate.window);
                while samples.front().is_some_and(|(t, _, _)| now - t > window) {
                    samples.pop_front();
                }
                if let Some(problem) = failure_rate_too_high(&samples, &rules.failure_rate) {
                    findings.insert("adce.dispatcher", problem);
                }
                let oldest_limit = crate::model::duration_ms(rules.oldest_ready);
                if let Some(oldest) = report.oldest_ready.filter(|t| now - t > oldest_limit) {
                    findings.insert(
                        "adce.dispatcher",
                        format!(
                            "the oldest ready task has waited {}",
                            humantime::format_duration(Duration::from_secs(
                                u64::try_from((now - oldest) / 1000).unwrap_or(0)
                            ))
                        ),
                    );
                }
                if let Some(note) = report.waiting.first() {
                    findings.insert(
                        "adce.dispatcher",
                        format!(
                            "{} ready tasks of scraper {} wait: {}",
                            note.ready, note.scraper, note.reason
                        ),
                    );
                }
            }
            Err(e) => {
                findings.insert("adce.store", format!("the scheduler does not answer: {e}"));
            }
        }
        if now - lake_probed_at >= LAKE_PROBE_EVERY_MS {
            lake_probed_at = now;
            lake_problem = lake
                .probe()
                .await
                .err()
                .map(|e| format!("lake unreachable: {e}"));
        }
        if let Some(problem) = &lake_problem {
            findings.insert("adce.lake", problem.clone());
        }
        let status = loop_handle.status();
        if let Some(problem) = reconcile_overdue(
            status.enabled,
            status.last_reconcile,
            started,
            rules
                .reconcile_overdue
                .unwrap_or(reconcile_interval * OVERDUE_INTERVALS + OVERDUE_SLACK),
            now,
        ) {
            findings.insert("adce.reconciler", problem);
        }
        for component in COMPONENTS {
            match (findings.get(component), active.get(component)) {
                (Some(problem), None) => {
                    warn!(component, problem = %problem, "alert raised");
                    scheduler.log(Event::error(format!("alert: {component}: {problem}")).row());
                    if let Some(webhook) = &webhook {
                        webhook.post(format!("adce alert: {component}: {problem}"));
                    }
                    reporter
                        .set_service_status(component, ServingStatus::NotServing)
                        .await;
                    active.insert(
                        component,
                        Alert {
                            component,
                            message: problem.clone(),
                            since: now,
                        },
                    );
                }
                (Some(problem), Some(alert)) if *problem != alert.message => {
                    if let Some(alert) = active.get_mut(component) {
                        alert.message = problem.clone();
                    }
                }
                (None, Some(_)) => {
                    info!(component, "alert resolved");
                    scheduler
                        .log(Event::info(format!("resolved: {component} is healthy again")).row());
                    if let Some(webhook) = &webhook {
                        webhook.post(format!("adce resolved: {component} is healthy again"));
                    }
                    reporter
                        .set_service_status(component, ServingStatus::Serving)
                        .await;
                    active.remove(component);
                }
                _ => {}
            }
        }
        alerts.set(active.values().cloned().collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reconcile_is_overdue_after_two_intervals_and_a_minute() {
        let hour = Duration::from_secs(3600) * OVERDUE_INTERVALS + OVERDUE_SLACK;
        let h = 3_600_000;
        assert_eq!(reconcile_overdue(true, 10 * h, 0, hour, 12 * h), None);
        let late = reconcile_overdue(true, 10 * h, 0, hour, 12 * h + 61_000);
        assert!(late.is_some_and(|m| m.contains("2h")), "two hours ago");
        assert!(reconcile_overdue(true, 0, 0, hour, 2 * h + 61_000).is_some());
        assert_eq!(reconcile_overdue(true, 0, 0, hour, h), None);
        assert_eq!(reconcile_overdue(false, 0, 0, hour, 100 * h), None);
    }

    #[test]
    fn failure_rate_counts_the_window_and_needs_enough_attempts() {
        let rule = FailureRateRule {
            ratio: 0.5,
            window: Duration::from_secs(60),
            min_attempts: 10,
        };
        let samples = |v: &[(i64, u64, u64)]| v.iter().copied().collect();
        // 6 of 10 failed: too high.
        let high = failure_rate_too_high(&samples(&[(0, 100, 50), (50, 104, 56)]), &rule);
        assert!(high.is_some_and(|m| m.starts_with("6 of 10")));
        // 5 of 10: not above the ratio.
        assert_eq!(
            failure_rate_too_high(&samples(&[(0, 0, 0), (50, 5, 5)]), &rule),
            None
        );
        // Too few attempts to judge.
        assert_eq!(
            failure_rate_too_high(&samples(&[(0, 0, 0), (50, 1, 8)]), &rule),
            None
        );
    }
}
