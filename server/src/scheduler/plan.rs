//! Applying a reconcile plan: planned tasks become pending tasks (created,
//! or reopened when the store allows). Reconcile never fights the queue: a
//! partition with an active task gets no second one (the store refuses it).

use super::PlannedTask;
use super::state::{Active, State};
use crate::error::{Error, Result};
use crate::model::{TaskState, UnixMs};
use crate::store::{self, NewTask, WriteTxn};

impl State {
    /// Creates or reopens a task for each planned gap whose partition has no
    /// active task; how many were.
    pub(super) fn apply_plan(
        &mut self,
        tx: &WriteTxn<'_>,
        tasks: Vec<PlannedTask>,
        observed_at: UnixMs,
        now: UnixMs,
    ) -> Result<u64> {
        let mut created = 0;
        for planned in tasks {
            let source = self.intern(&planned.source);
            let new = NewTask {
                source: &planned.source,
                scraper: &planned.scraper,
                priority: planned.priority,
                reason: planned.reason,
                encoded: &planned.encoded,
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
            // Decoded only when it lands in its window's memory.
            let encoded = &planned.encoded;
            self.enqueue_with(&scraper, planned.priority, now, id, || {
                let partition = store::partition_from_json(&encoded.partition_json)?;
                let keys = serde_json::from_str(&encoded.keys_json)
                    .map_err(|e| Error::Internal(format!("corrupt keys of task {id}: {e}")))?;
                Ok(Active::pending(
                    id,
                    source.clone(),
                    scraper.clone(),
                    partition,
                    keys,
                    planned.priority,
                    0,
                    now,
                ))
            });
            created += 1;
        }
        Ok(created)
    }
}
