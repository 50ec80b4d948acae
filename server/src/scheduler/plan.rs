//! Applying a reconcile plan: planned tasks become pending tasks (created,
//! or reopened when the store allows), and the queue as planning sees it.
//! Reconcile never fights the queue: a partition with an active task gets no
//! second one.

use rusqlite::Transaction;

use super::PlannedTask;
use super::effects::Effects;
use super::state::{Active, State};
use crate::error::Result;
use crate::logs::Event;
use crate::model::{TaskState, UnixMs};
use crate::reconcile::{QueueEntry, QueueView};
use crate::store::{self, NewTask};

impl State {
    /// Creates or reopens a task for each planned gap whose partition has no
    /// active task; how many were.
    pub(super) fn apply_plan(
        &mut self,
        tx: &Transaction<'_>,
        fx: &mut Effects,
        tasks: &[PlannedTask],
        observed_at: UnixMs,
        now: UnixMs,
    ) -> Result<u64> {
        let mut created = 0;
        for planned in tasks {
            let source = self.intern(&planned.source);
            if self
                .by_partition
                .contains_key(&(source.clone(), planned.partition.key()))
            {
                continue;
            }
            let new = NewTask {
                source: &planned.source,
                partition: &planned.partition,
                scraper: &planned.scraper,
                priority: planned.priority,
                reason: planned.reason,
                expected_keys: &planned.keys,
            };
            let Some((id, before)) = store::upsert_task(tx, &new, now, observed_at)? else {
                continue;
            };
            let scraper = self.intern(&planned.scraper);
            match before {
                Some(before) => {
                    let old_scraper = self.intern(&before.scraper);
                    self.counts.moved(
                        Some((before.state, before.priority, source.clone(), old_scraper)),
                        (
                            TaskState::Pending,
                            planned.priority,
                            source.clone(),
                            scraper.clone(),
                        ),
                    );
                }
                None => self.count(
                    &source,
                    &scraper,
                    None,
                    (TaskState::Pending, planned.priority),
                ),
            }
            self.remember(
                Active::pending(
                    id,
                    source,
                    scraper,
                    planned.partition.clone(),
                    planned.keys.clone(),
                    planned.priority,
                    0,
                    now,
                ),
                now,
            );
            created += 1;
        }
        if created > 0 {
            fx.log(Event::info(format!("reconcile queued {created} tasks")).row());
        }
        // Rules on recency move as days pass: re-apply them to what is queued.
        let reprioritized = self.reprioritize(fx, now);
        if reprioritized > 0 {
            fx.log(
                Event::info(format!(
                    "{reprioritized} queued tasks changed priority by their source's rules"
                ))
                .row(),
            );
        }
        Ok(created)
    }

    /// The queue as planning sees it: active partitions, and the terminal
    /// ones that block a new task.
    pub(super) fn queue_view(&self, tx: &Transaction<'_>) -> Result<QueueView> {
        let mut view = QueueView::with_capacity(self.by_partition.len());
        for (source, key) in self.by_partition.keys() {
            view.insert((source.to_string(), key.clone()), QueueEntry::Active);
        }
        for (source, key, state, ready_at) in store::blocking_terminal(tx)? {
            let entry = match state {
                TaskState::Dead => QueueEntry::Dead,
                TaskState::Cancelled => QueueEntry::Cancelled,
                TaskState::Unavailable => QueueEntry::Unavailable {
                    recheck_at: ready_at,
                },
                TaskState::Pending | TaskState::Leased | TaskState::Done => continue,
            };
            view.insert((source, key), entry);
        }
        Ok(view)
    }
}
