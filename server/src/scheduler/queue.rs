//! The in-memory ready queue: pending tasks indexed per scraper, ordered by
//! (priority, ready time, id), plus the delayed set of pending tasks whose
//! ready time is still ahead. A scraper fixes both the labels a task requires
//! and its limit groups, so picking a task for an agent looks only at the
//! head of each scraper it is eligible for: O(scrapers), not O(tasks).

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::model::{Priority, TaskId, UnixMs};

/// Dispatch order of ready tasks: higher priority first, then older ready
/// time, then lower id.
pub type ReadyKey = (Reverse<Priority>, UnixMs, TaskId);

/// Pending tasks by scraper.
#[derive(Debug, Default)]
pub struct ReadyQueue {
    ready: HashMap<Arc<str>, BTreeSet<ReadyKey>>,
    delayed: BTreeSet<(UnixMs, TaskId)>,
    scraper_of_delayed: HashMap<TaskId, (Arc<str>, Priority)>,
    ready_len: usize,
}

impl ReadyQueue {
    /// Adds a pending task; it is ready at `ready_at`.
    pub fn insert(
        &mut self,
        scraper: &Arc<str>,
        priority: Priority,
        ready_at: UnixMs,
        id: TaskId,
        now: UnixMs,
    ) {
        if ready_at <= now {
            if self.ready.entry(scraper.clone()).or_default().insert((
                Reverse(priority),
                ready_at,
                id,
            )) {
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
        if let Some(set) = self.ready.get_mut(scraper) {
            if set.remove(&(Reverse(priority), ready_at, id)) {
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

    /// The head of each of `scrapers`' ready sets, best first.
    pub fn heads<'a>(
        &self,
        scrapers: impl IntoIterator<Item = &'a Arc<str>>,
    ) -> Vec<(ReadyKey, Arc<str>)> {
        let mut heads: Vec<(ReadyKey, Arc<str>)> = scrapers
            .into_iter()
            .filter_map(|s| {
                self.ready
                    .get(s)
                    .and_then(|set| set.first())
                    .map(|k| (*k, s.clone()))
            })
            .collect();
        heads.sort_by_key(|(k, _)| *k);
        heads
    }

    /// Removes and returns the head of `scraper`'s ready set.
    pub fn pop(&mut self, scraper: &str) -> Option<ReadyKey> {
        let key = self.ready.get_mut(scraper)?.pop_first()?;
        self.ready_len -= 1;
        Some(key)
    }

    /// Ready tasks per scraper (scrapers with none may be listed with 0).
    pub fn ready_by_scraper(&self) -> impl Iterator<Item = (&Arc<str>, usize)> {
        self.ready.iter().map(|(s, set)| (s, set.len()))
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
        let (key, scraper) = q.heads([&a, &b])[0].clone();
        assert_eq!((key.2, &*scraper), (TaskId(3), "b"));
        // An agent eligible only for `a` gets a's best.
        assert_eq!(q.heads([&a])[0].0.2, TaskId(2));
        assert_eq!(q.heads([&a, &b]).len(), 2);
        q.promote(500);
        assert_eq!(q.heads([&a, &b])[0].0.2, TaskId(4));
        assert_eq!(q.pop("b").unwrap().2, TaskId(4));
        q.remove("a", Priority::High, 50, TaskId(2));
        assert_eq!(q.heads([&a])[0].0.2, TaskId(1));
        assert_eq!(q.ready_len(), 2);
    }

    proptest! {
        /// Popping everything yields priority order, then ready time, then id.
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
            while let Some(key) = q.pop("s") {
                if let Some(p) = prev {
                    prop_assert!(p.0 >= key.0 || p.0.0 > key.0.0);
                    prop_assert!(p < key);
                }
                prev = Some(key);
                n += 1;
            }
            prop_assert_eq!(n, items.len());
            prop_assert_eq!(q.ready_len(), 0);
        }
    }
}
