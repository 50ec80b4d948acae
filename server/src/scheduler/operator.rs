//! What operators ask of the queue: retry terminal tasks, cancel a task,
//! stop every running task (`stop --now`), swap in a reloaded catalog, and
//! re-apply the sources' priority rules.

use std::sync::Arc;

use rusqlite::Transaction;
use tracing::info;

use super::RetrySelection;
use super::effects::{Effects, Write};
use super::state::{Active, State};
use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::logs::Event;
use crate::model::{Priority, TaskId, TaskState, UnixMs};
use crate::store;

impl State {
    /// Puts the selected terminal tasks back in the queue: the ids retried,
    /// and why the others were skipped.
    pub(super) fn retry(
        &mut self,
        tx: &Transaction<'_>,
        fx: &mut Effects,
        which: RetrySelection,
        now: UnixMs,
    ) -> Result<(Vec<TaskId>, Vec<String>)> {
        let ids = match which {
            RetrySelection::Ids(ids) => ids,
            RetrySelection::State(state, source) => {
                if !matches!(
                    state,
                    TaskState::Dead | TaskState::Cancelled | TaskState::Unavailable
                ) {
                    return Err(Error::InvalidArgument(format!(
                        "only dead, cancelled or unavailable tasks can be retried, not {state}"
                    )));
                }
                store::ids_in_state(tx, state, source.as_deref())?
            }
        };
        let (mut retried, mut skipped) = (Vec::new(), Vec::new());
        for id in ids {
            if let Some(task) = self.tasks.get(&id) {
                let state = if task.lease.is_some() {
                    TaskState::Leased
                } else {
                    TaskState::Pending
                };
                skipped.push(format!("task {id} is {state}"));
                continue;
            }
            let Some((row, before)) = store::retry_task(tx, id, now)? else {
                match store::get_task(tx, id)? {
                    Some(row) => skipped.push(format!("task {id} is {}", row.state)),
                    None => skipped.push(format!("task {id} does not exist")),
                }
                continue;
            };
            let source = self.intern(&row.source);
            let scraper = self.intern(&row.scraper);
            self.count(
                &source,
                &scraper,
                Some((before, row.priority)),
                (TaskState::Pending, row.priority),
            );
            fx.log(
                Event::info("retried by an operator")
                    .task(id)
                    .source(source.to_string())
                    .row(),
            );
            self.remember(
                Active::pending(
                    id,
                    source,
                    scraper,
                    row.partition,
                    row.expected_keys,
                    row.priority,
                    0,
                    now,
                ),
                now,
            );
            retried.push(id);
        }
        Ok((retried, skipped))
    }

    /// Cancels a pending or leased task; a leased one is killed on its
    /// agent. Its state before.
    pub(super) fn cancel(
        &mut self,
        tx: &Transaction<'_>,
        fx: &mut Effects,
        id: TaskId,
        reason: &str,
        now: UnixMs,
    ) -> Result<TaskState> {
        let Some(task) = self.tasks.get_mut(&id) else {
            return match store::get_task(tx, id)? {
                Some(row) => Err(Error::FailedPrecondition(format!(
                    "task {id} is {}; only pending or leased tasks can be cancelled",
                    row.state
                ))),
                None => Err(Error::NotFound(format!("task {id} does not exist"))),
            };
        };
        let error = if reason.is_empty() {
            "cancelled by an operator".to_string()
        } else {
            format!("cancelled by an operator: {reason}")
        };
        let previous = if task.lease.is_some() {
            TaskState::Leased
        } else {
            TaskState::Pending
        };
        let (source, scraper, priority) =
            (task.source.clone(), task.scraper.clone(), task.priority);
        let attempts = task.attempts;
        if let Some(lease) = task.lease.take() {
            fx.write(Write::EndAttempt {
                task: id,
                number: attempts,
                exit_code: None,
                outcome: "cancelled",
                error: error.clone(),
                at: now,
            });
            self.revoke_lease(fx, &lease, &error);
        }
        fx.write(Write::SetState {
            task: id,
            state: TaskState::Cancelled,
            ready_at: now,
            error: error.clone(),
            at: now,
        });
        self.count(
            &source,
            &scraper,
            Some((previous, priority)),
            (TaskState::Cancelled, priority),
        );
        self.forget(id);
        fx.log(Event::warn(error).task(id).source(source.to_string()).row());
        Ok(previous)
    }

    /// Cancels every running task on its agent and queues it again, ready
    /// now; the attempt is recorded as cancelled and does not count toward
    /// `max_attempts`. How many were stopped.
    pub(super) fn stop_running(&mut self, fx: &mut Effects, reason: &str, now: UnixMs) -> u64 {
        let leased: Vec<TaskId> = self
            .tasks
            .values()
            .filter(|t| t.lease.is_some())
            .map(|t| t.id)
            .collect();
        for &id in &leased {
            let Some(task) = self.tasks.get_mut(&id) else {
                continue;
            };
            let Some(lease) = task.lease.take() else {
                continue;
            };
            let attempts = task.attempts;
            fx.write(Write::EndAttempt {
                task: id,
                number: attempts,
                exit_code: None,
                outcome: "cancelled",
                error: reason.to_string(),
                at: now,
            });
            self.revoke_lease(fx, &lease, reason);
            self.requeue(
                fx,
                id,
                now,
                attempts.saturating_sub(1),
                reason.to_string(),
                now,
            );
        }
        if !leased.is_empty() {
            fx.log(
                Event::warn(format!(
                    "{} running tasks cancelled and queued again: {reason}",
                    leased.len()
                ))
                .row(),
            );
        }
        leased.len() as u64
    }

    /// Swaps in a reloaded catalog. Limit groups keep counting running
    /// tasks; agents' eligible scrapers are recomputed; priorities are
    /// re-applied.
    pub(super) fn reload(&mut self, fx: &mut Effects, catalog: Arc<Catalog>, now: UnixMs) {
        self.catalog = catalog.clone();
        self.limits.reload(&catalog.limits, now);
        let labels: Vec<_> = self
            .agents
            .iter()
            .map(|(id, a)| (id.clone(), a.labels.clone()))
            .collect();
        for (id, labels) in labels {
            let eligible = self.eligible_scrapers(&labels);
            if let Some(agent) = self.agents.get_mut(&id) {
                agent.eligible = eligible;
            }
        }
        self.cell.set(catalog.clone());
        let reprioritized = self.reprioritize(fx, now);
        info!(
            sources = catalog.sources.len(),
            scrapers = catalog.scrapers.len(),
            limits = catalog.limits.len(),
            "catalog reloaded"
        );
        fx.log(
            Event::info(format!(
                "config reloaded: {} sources, {} scrapers, {} limit groups; {reprioritized} queued tasks changed priority",
                catalog.sources.len(),
                catalog.scrapers.len(),
                catalog.limits.len()
            ))
            .row(),
        );
    }

    /// Re-applies the sources' priority rules to every active task (rules
    /// depend on the catalog, which a reload changes, and on today's date);
    /// queued tasks whose priority changed are re-queued. How many changed.
    pub(super) fn reprioritize(&mut self, fx: &mut Effects, now: UnixMs) -> u64 {
        let today = chrono::DateTime::from_timestamp_millis(now)
            .map_or_else(|| chrono::Utc::now().date_naive(), |t| t.date_naive());
        let changes: Vec<(TaskId, Priority)> = self
            .tasks
            .values()
            .filter_map(|task| {
                let source = self.catalog.source(&task.source)?;
                let (priority, _) = source.priority_rules.base_for(&task.partition, today);
                (priority != task.priority).then_some((task.id, priority))
            })
            .collect();
        for &(id, priority) in &changes {
            let Some(task) = self.tasks.get_mut(&id) else {
                continue;
            };
            let state = if task.lease.is_none() {
                self.queue
                    .remove(&task.scraper, task.priority, task.ready_at, id);
                self.queue
                    .insert(&task.scraper, priority, task.ready_at, id, now);
                TaskState::Pending
            } else {
                TaskState::Leased
            };
            let (source, scraper, before) =
                (task.source.clone(), task.scraper.clone(), task.priority);
            task.priority = priority;
            self.count(&source, &scraper, Some((state, before)), (state, priority));
            fx.write(Write::SetPriority {
                task: id,
                priority,
                at: now,
            });
        }
        changes.len() as u64
    }
}
