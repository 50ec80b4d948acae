//! What operators ask of the queue: retry terminal tasks, cancel a task,
//! stop every running task (`stop --now`), swap in a reloaded catalog, and
//! re-apply the sources' priority rules.

use std::sync::Arc;

use tracing::info;

use super::RetrySelection;
use super::effects::{Effects, Write};
use super::state::State;
use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::logs::Event;
use crate::model::{Priority, TaskId, TaskState, UnixMs, utc_date};
use crate::store::{self, TaskRow, WriteTxn};

impl State {
    /// Puts the selected terminal tasks back in the queue: the ids retried,
    /// and why the others were skipped.
    pub(super) fn retry(
        &mut self,
        tx: &WriteTxn<'_>,
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
            let task = self.active_from_row(row);
            let (source, scraper, priority) =
                (task.source.clone(), task.scraper.clone(), task.priority);
            self.count(
                &source,
                &scraper,
                Some((before, priority)),
                (TaskState::Pending, priority),
            );
            fx.log(
                Event::info("retried by an operator")
                    .task(id)
                    .source(source.to_string())
                    .row(),
            );
            self.remember(task);
            retried.push(id);
        }
        Ok((retried, skipped))
    }

    /// Cancels a pending or leased task; a leased one is killed on its
    /// agent. Its state before.
    pub(super) fn cancel(
        &mut self,
        tx: &WriteTxn<'_>,
        fx: &mut Effects,
        id: TaskId,
        reason: &str,
        now: UnixMs,
    ) -> Result<TaskState> {
        let error = if reason.is_empty() {
            "cancelled by an operator".to_string()
        } else {
            format!("cancelled by an operator: {reason}")
        };
        let (source, scraper, priority, previous) = match self.tasks.get_mut(&id) {
            Some(task) => {
                let previous = if task.lease.is_some() {
                    TaskState::Leased
                } else {
                    TaskState::Pending
                };
                let found = (task.source.clone(), task.scraper.clone(), task.priority);
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
                (found.0, found.1, found.2, previous)
            }
            // A pending task beyond its window lives in the store only.
            None => match store::get_task(tx, id)? {
                Some(row) if row.state == TaskState::Pending => (
                    self.intern(&row.source),
                    self.intern(&row.scraper),
                    row.priority,
                    TaskState::Pending,
                ),
                Some(row) => {
                    return Err(Error::FailedPrecondition(format!(
                        "task {id} is {}; only pending or leased tasks can be cancelled",
                        row.state
                    )));
                }
                None => return Err(Error::NotFound(format!("task {id} does not exist"))),
            },
        };
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
    /// tasks; agents' eligible scrapers are recomputed; priority rules are
    /// re-applied to every active task.
    pub(super) fn reload(
        &mut self,
        tx: &WriteTxn<'_>,
        fx: &mut Effects,
        catalog: Arc<Catalog>,
        now: UnixMs,
    ) -> Result<()> {
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
        // The rules changed: a sweep from the start, whole, now.
        self.sweep = Some(Sweep::new(utc_date(now)));
        let reprioritized = self
            .sweep_priorities(tx, fx, now, usize::MAX)?
            .unwrap_or_default();
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
        Ok(())
    }

    /// Re-applies the sources' priority rules to up to `budget` active
    /// tasks, continuing the sweep in progress; a sweep starts when the day
    /// changes and some source's rules depend on the date. Returns how many
    /// tasks changed once a sweep finishes within the budget, `None` while
    /// one goes on or none runs.
    pub(super) fn sweep_priorities(
        &mut self,
        tx: &WriteTxn<'_>,
        fx: &mut Effects,
        now: UnixMs,
        budget: usize,
    ) -> Result<Option<u64>> {
        let day = utc_date(now);
        if self.sweep.is_none() && self.swept_day != Some(day) {
            if self
                .catalog
                .sources
                .iter()
                .any(|s| s.priority_rules.depends_on_date())
            {
                self.sweep = Some(Sweep::new(day));
            } else {
                self.swept_day = Some(day);
            }
        }
        let Some(mut sweep) = self.sweep.take() else {
            return Ok(None);
        };
        let mut left = budget;
        loop {
            let chunk = left.min(SWEEP_CHUNK);
            let rows = store::active_after(tx, sweep.after, chunk)?;
            left -= rows.len();
            for row in &rows {
                sweep.after = row.id;
                let Some(source) = self.catalog.source(&row.source) else {
                    continue;
                };
                let (priority, _) = source.priority_rules.base_for(&row.partition, sweep.day);
                if priority != row.priority {
                    self.reprioritize(fx, row, priority, now);
                    sweep.changed += 1;
                }
            }
            if rows.len() < chunk {
                self.swept_day = Some(sweep.day);
                return Ok(Some(sweep.changed));
            }
            if left == 0 {
                self.sweep = Some(sweep);
                return Ok(None);
            }
        }
    }

    /// Moves the active task `row` (as stored) to base `priority`.
    fn reprioritize(&mut self, fx: &mut Effects, row: &TaskRow, priority: Priority, now: UnixMs) {
        let source = self.intern(&row.source);
        let scraper = self.intern(&row.scraper);
        let state = if row.lease.is_some() {
            TaskState::Leased
        } else {
            TaskState::Pending
        };
        match self.tasks.get_mut(&row.id) {
            Some(task) if task.lease.is_some() => task.priority = priority,
            Some(task) => {
                let (old, ready_at) = (task.priority, task.ready_at);
                task.priority = priority;
                self.queue.remove(&scraper, old, ready_at, row.id);
                self.enqueue(&scraper, priority, ready_at, row.id);
            }
            // Pending in the store only: it may belong in its new window.
            None if state == TaskState::Pending => {
                let mut task = self.active_from_row(row.clone());
                task.priority = priority;
                self.remember(task);
            }
            None => {}
        }
        self.count(
            &source,
            &scraper,
            Some((state, row.priority)),
            (state, priority),
        );
        fx.write(Write::SetPriority {
            task: row.id,
            priority,
            at: now,
        });
    }
}

/// Rows read at a time by a priority sweep.
const SWEEP_CHUNK: usize = 1_000;

/// A priority sweep in progress: every active task, by id, against the
/// rules as of `day`.
#[derive(Debug, Clone)]
pub(super) struct Sweep {
    after: TaskId,
    day: chrono::NaiveDate,
    changed: u64,
}

impl Sweep {
    fn new(day: chrono::NaiveDate) -> Self {
        Sweep {
            after: TaskId(i64::MIN),
            day,
            changed: 0,
        }
    }
}
