//! Component health: every few seconds the checker looks at the store (does
//! the scheduler answer), the lake (does it answer a probe), the reconciler
//! (is a reconcile overdue) and the dispatcher (does ready work wait with no
//! eligible agent), sets each component's gRPC health status, and keeps the
//! active alerts: raised and resolved ones are logged, status shows them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{info, warn};

use crate::autoloop::LoopHandle;
use crate::lake::SharedLake;
use crate::logs::Event;
use crate::model::{UnixMs, now_ms};
use crate::scheduler::{Command, Handle};

/// How often components are checked.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);
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
    interval: Duration,
    now: UnixMs,
) -> Option<String> {
    if !enabled {
        return None;
    }
    let allowed = interval * OVERDUE_INTERVALS + OVERDUE_SLACK;
    let allowed_ms = i64::try_from(allowed.as_millis()).unwrap_or(i64::MAX);
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

/// Runs the checks until `stop`; sets health statuses and `alerts`.
pub async fn run(
    reporter: HealthReporter,
    scheduler: Handle,
    lake: SharedLake,
    loop_handle: LoopHandle,
    reconcile_interval: Duration,
    alerts: Alerts,
    stop: CancellationToken,
) {
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
        match scheduler.call(|reply| Command::Report { reply }).await {
            Ok(report) => {
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
        if let Err(e) = lake.probe().await {
            findings.insert("adce.lake", format!("lake unreachable: {e}"));
        }
        let status = loop_handle.status();
        if let Some(problem) = reconcile_overdue(
            status.enabled,
            status.last_reconcile,
            started,
            reconcile_interval,
            now,
        ) {
            findings.insert("adce.reconciler", problem);
        }
        for component in crate::server::COMPONENTS {
            match (findings.get(component), active.get(component)) {
                (Some(problem), None) => {
                    warn!(component, problem = %problem, "alert raised");
                    scheduler.log(Event::error(format!("alert: {component}: {problem}")).row());
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
        let hour = Duration::from_secs(3600);
        let h = 3_600_000;
        assert_eq!(reconcile_overdue(true, 10 * h, 0, hour, 12 * h), None);
        let late = reconcile_overdue(true, 10 * h, 0, hour, 12 * h + 61_000);
        assert!(late.is_some_and(|m| m.contains("2h")), "two hours ago");
        assert!(reconcile_overdue(true, 0, 0, hour, 2 * h + 61_000).is_some());
        assert_eq!(reconcile_overdue(true, 0, 0, hour, h), None);
        assert_eq!(reconcile_overdue(false, 0, 0, hour, 100 * h), None);
    }
}
