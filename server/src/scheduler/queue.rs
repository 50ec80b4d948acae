//! The in-memory ready queue: pending tasks indexed per scraper and, within a
//! scraper, per base priority, each ordered by (ready time, id); plus the
//! delayed set of pending tasks whose ready time is still ahead. A scraper
//! fixes both the labels a task requires and its limit groups, so picking a
//! task for an agent looks only at the heads of the scrapers it is eligible
//! for: O(scrapers), not O(tasks).
//!
//! Aging (a task rises one priority level per `aging` period it has been
//! ready) needs no re-keying: within one base priority the oldest task has
//! aged the most, so each sub-queue's head is its best task at any moment,
//! and a scraper's best task is the best of its four heads by (effective
//! priority, ready time, id).

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crate::model::{Priority, TaskId, UnixMs};

/// Dispatch order of ready tasks: higher effective priority first, then older
/// ready time, then lower id.
pub type ReadyKey = (Reverse<Priority>, UnixMs, TaskId);

/// One scraper's ready tasks, one ordered set per base priority (index
/// `Priority::as_i64() - 1`).
type Levels = [BTreeSet<(UnixMs, TaskId)>; 4];

fn level(priority: Priority) -> usize {
    usize::try_from(priority.as_i64() - 1).unwrap_or(0).min(3)
}

/// A ready task at the head of a scraper, as dispatch sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Its order key, with the effective priority.
    pub key: ReadyKey,
    /// The scraper it is queued under.
    pub scraper: Arc<str>,
    /// Its base priority (the sub-queue it sits in).
    pub base: Priority,
}

/// Pending tasks by scraper.
#[derive(Debug, Default)]
pub struct ReadyQueue {
    ready: HashMap<Arc<str>, Levels>,
    delayed: BTreeSet<(UnixMs, TaskId)>,
    scraper_of_delayed: HashMap<TaskId, (Arc<str>, Priority)>,
    ready_len: usize,
}

impl ReadyQueue {
    /// Adds a pending task with base `priority`; it is ready at `ready_at`.
    pub fn insert(
        &mut self,
        scraper: &Arc<str>,
        priority: Priority,
        ready_at: UnixMs,
        id: TaskId,
        now: UnixMs,
    ) {
        if ready_at <= now {
            if self.ready.entry(scraper.clone()).or_default()[level(priority)]
                .insert((ready_at, id))
            {
                self.ready_len += 1;
            }
        } else {
            self.delayed.insert((ready_at, id));
            self.scraper_of_delayed
                .insert(id, (scraper.clone(), priority));
        }
    }

    /// Removes a task wherever it is.
    pub fn remove(&mut self, scraper: &str, priority: Priority, ready_at: UnixMs, id: TaskId) {
        if let Some(levels) = self.ready.get_mut(scraper) {
            if levels[level(priority)].remove(&(ready_at, id)) {
                self.ready_len -= 1;
            }
        }
        if self.scraper_of_delayed.remove(&id).is_some() {
            self.delayed.remove(&(ready_at, id));
        }
    }

    /// Moves every delayed task whose time has come into the ready sets.
    pub fn promote(&mut self, now: UnixMs) {
        while let Some(&(ready_at, id)) = self.delayed.first() {
            if ready_at > now {
                break;
            }
            self.delayed.pop_first();
            if let Some((scraper, priority)) = self.scraper_of_delayed.remove(&id) {
                self.insert(&scraper, priority, ready_at, id, now);
            }
        }
    }

    /// The best ready task of each of `scrapers` at `now` with `aging`, best first.
    pub fn heads<'a>(
        &self,
        scrapers: impl IntoIterator<Item = &'a Arc<str>>,
        now: UnixMs,
        aging: Duration,
    ) -> Vec<Head> {
        let mut heads: Vec<Head> = scrapers
            .into_iter()
            .filter_map(|s| {
                let levels = self.ready.get(s)?;
                Priority::ALL
                    .into_iter()
                    .filter_map(|base| {
                        let &(ready_at, id) = levels[level(base)].first()?;
                        let (effective, _) = crate::priority::effective(base, ready_at, now, aging);
                        Some(Head {
                            key: (Reverse(effective), ready_at, id),
                            scraper: s.clone(),
                            base,
                        })
                    })
                    .min_by_key(|h| h.key)
            })
            .collect();
        heads.sort_by_key(|h| h.key);
        heads
    }

    /// Removes and returns the head of `scraper`'s sub-queue of base `priority`.
    pub fn pop(&mut self, scraper: &str, priority: Priority) -> Option<(UnixMs, TaskId)> {
        let head = self.ready.get_mut(scraper)?[level(priority)].pop_first()?;
        self.ready_len -= 1;
        Some(head)
    }

    /// Ready tasks per scraper (scrapers with none may be listed with 0).
    pub fn ready_by_scraper(&self) -> impl Iterator<Item = (&Arc<str>, usize)> {
        self.ready
            .iter()
            .map(|(s, levels)| (s, levels.iter().map(BTreeSet::len).sum()))
    }

    /// When the longest-waiting ready task became ready.
    pub fn oldest_ready(&self) -> Option<UnixMs> {
        self.ready
            .values()
            .flat_map(|levels| levels.iter().filter_map(|l| l.first().map(|(t, _)| *t)))
            .min()
    }

    /// Tasks ready now.
    pub fn ready_len(&self) -> usize {
        self.ready_len
    }

    /// Tasks waiting for their ready time.
    pub fn delayed_len(&self) -> usize {
        self.delayed.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NO_AGING: Duration = Duration::ZERO;

    #[test]
    fn heads_prefer_priority_then_age_then_id() {
        let a: Arc<str> = "a".into();
        let b: Arc<str> = "b".into();
        let mut q = ReadyQueue::default();
        q.insert(&a, Priority::Low, 1, TaskId(1), 100);
        q.insert(&a, Priority::High, 50, TaskId(2), 100);
        q.insert(&b, Priority::High, 40, TaskId(3), 100);
        q.insert(&b, Priority::Critical, 500, TaskId(4), 100); // delayed
        assert_eq!(q.ready_len(), 3);
        assert_eq!(q.delayed_len(), 1);
        let heads = q.heads([&a, &b], 100, NO_AGING);
        assert_eq!((heads[0].key.2, &*heads[0].scraper), (TaskId(3), "b"));
        assert_eq!(heads.len(), 2);
        // An agent eligible only for `a` gets a's best.
        assert_eq!(q.heads([&a], 100, NO_AGING)[0].key.2, TaskId(2));
        q.promote(500);
        let head = q.heads([&a, &b], 500, NO_AGING)[0].clone();
        assert_eq!(head.key.2, TaskId(4));
        assert_eq!(q.pop(&head.scraper, head.base), Some((500, TaskId(4))));
        q.remove("a", Priority::High, 50, TaskId(2));
        assert_eq!(q.heads([&a], 500, NO_AGING)[0].key.2, TaskId(1));
        assert_eq!(q.ready_len(), 2);
    }

    #[test]
    fn an_old_low_task_outranks_a_new_medium_one_after_aging() {
        let s: Arc<str> = "s".into();
        let hour = 3_600_000;
        let aging = Duration::from_secs(3600);
        let mut q = ReadyQueue::default();
        q.insert(&s, Priority::Low, 0, TaskId(1), 10 * hour);
        q.insert(&s, Priority::Medium, 10 * hour, TaskId(2), 10 * hour);
        // Without aging the medium task is first; after 2h ready the low one
        // is high.
        assert_eq!(q.heads([&s], 10 * hour, NO_AGING)[0].key.2, TaskId(2));
        let head = q.heads([&s], 10 * hour, aging)[0].clone();
        assert_eq!(head.key.2, TaskId(1));
        assert_eq!(head.base, Priority::Low);
        assert!(head.key.0.0 > Priority::Medium);
    }

    proptest! {
        /// Without aging, taking the best head until empty yields priority
        /// order, then ready time, then id.
        #[test]
        fn pops_in_dispatch_order(items in proptest::collection::vec((0u8..4, 0i64..100), 1..200)) {
            let s: Arc<str> = "s".into();
            let mut q = ReadyQueue::default();
            for (i, (p, t)) in items.iter().enumerate() {
                let priority = Priority::ALL[*p as usize];
                q.insert(&s, priority, *t, TaskId(i as i64), 1000);
            }
            let mut prev: Option<ReadyKey> = None;
            let mut n = 0;
            while let Some(head) = q.heads([&s], 1000, NO_AGING).first().cloned() {
                q.pop(&head.scraper, head.base);
                if let Some(p) = prev {
                    prop_assert!(p < head.key);
                }
                prev = Some(head.key);
                n += 1;
            }
            prop_assert_eq!(n, items.len());
            prop_assert_eq!(q.ready_len(), 0);
        }

        /// With aging, the head of a scraper is the best of all its tasks by
        /// (effective priority, ready time, id).
        #[test]
        fn head_is_the_best_effective_task(
            items in proptest::collection::vec((0u8..4, 0i64..10_000), 1..100),
            now in 10_000i64..40_000,
        ) {
            let s: Arc<str> = "s".into();
            let aging = Duration::from_millis(3_000);
            let mut q = ReadyQueue::default();
            let mut best: Option<ReadyKey> = None;
            for (i, (p, t)) in items.iter().enumerate() {
                let priority = Priority::ALL[*p as usize];
                q.insert(&s, priority, *t, TaskId(i as i64), now);
                let (effective, _) = crate::priority::effective(priority, *t, now, aging);
                let key = (Reverse(effective), *t, TaskId(i as i64));
                best = Some(best.map_or(key, |b| b.min(key)));
            }
            prop_assert_eq!(Some(q.heads([&s], now, aging)[0].key), best);
        }
    }
}
