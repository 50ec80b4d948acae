//! The ready queue: pending tasks per scraper and, within a scraper, per base
//! priority, each ordered by (ready time, id). Only a bounded window of each
//! such sub-queue is in memory; the rest stays in the store, which keeps the
//! same order in its `tasks_ready` index, and the window is refilled from it.
//! A scraper fixes both the labels a task requires and its limit groups, so
//! picking a task for an agent looks only at the heads of the scrapers it is
//! eligible for: O(scrapers), not O(tasks), in time and in memory.
//!
//! Invariants (property-tested below):
//! - a window is a prefix of its sub-queue: it holds exactly the sub-queue's
//!   pending tasks whose key is at most its frontier (all of them when the
//!   frontier is `Complete`), so its first entry is the sub-queue's head;
//! - a window holds at most twice [`WINDOW`] tasks; inserting beyond that
//!   evicts its tail back to the store (the caller drops those from memory);
//! - every task the caller makes pending goes through [`ReadyQueue::insert`],
//!   which keeps it in memory exactly when the prefix rule says so.
//!
//! Tasks not yet ready (a retry's backoff) sit in their window like the
//! others: a sub-queue is ordered by ready time, so when its head is not
//! ready, nothing in it is.
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

/// Tasks loaded into a window at a time; a window holds at most twice as
/// many, and is refilled when it holds fewer than a quarter.
pub const WINDOW: usize = 256;

/// Dispatch order of ready tasks: higher effective priority first, then older
/// ready time, then lower id.
pub type ReadyKey = (Reverse<Priority>, UnixMs, TaskId);

/// A task's place within its sub-queue.
pub type Key = (UnixMs, TaskId);

fn level(priority: Priority) -> usize {
    usize::try_from(priority.as_i64() - 1).unwrap_or(0).min(3)
}

/// How much of a sub-queue its window holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frontier {
    /// All of it.
    Complete,
    /// The tasks up to this key (none yet when `None`); the store has more.
    After(Option<Key>),
}

/// One sub-queue's window.
#[derive(Debug)]
struct Level {
    window: BTreeSet<Key>,
    frontier: Frontier,
}

impl Default for Level {
    fn default() -> Self {
        Level {
            window: BTreeSet::new(),
            frontier: Frontier::Complete,
        }
    }
}

impl Level {
    /// Whether a task with `key` belongs in the window.
    fn holds(&self, key: Key) -> bool {
        match self.frontier {
            Frontier::Complete => true,
            Frontier::After(None) => false,
            Frontier::After(Some(last)) => key <= last,
        }
    }
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

/// A sub-queue whose window wants more tasks from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refill {
    /// Its scraper.
    pub scraper: Arc<str>,
    /// Its base priority.
    pub priority: Priority,
    /// Load tasks after this key (from the start when `None`).
    pub after: Option<Key>,
}

/// Where an inserted task went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// Whether it is in its window (else only in the store: it comes after
    /// the window's frontier).
    pub kept: bool,
    /// Other tasks evicted from the window back to the store to make room.
    pub evicted: Vec<TaskId>,
}

/// Pending tasks by scraper and base priority.
#[derive(Debug)]
pub struct ReadyQueue {
    levels: HashMap<Arc<str>, [Level; 4]>,
    in_memory: usize,
    /// Tasks loaded at a time.
    window: usize,
}

impl Default for ReadyQueue {
    fn default() -> Self {
        ReadyQueue::with_window(WINDOW)
    }
}

impl ReadyQueue {
    /// A queue whose windows load `window` tasks at a time.
    pub fn with_window(window: usize) -> Self {
        ReadyQueue {
            levels: HashMap::new(),
            in_memory: 0,
            window: window.max(1),
        }
    }

    /// Tasks loaded into a window at a time.
    pub fn window(&self) -> usize {
        self.window
    }

    fn max_window(&self) -> usize {
        2 * self.window
    }

    fn low_water(&self) -> usize {
        (self.window / 4).max(1)
    }

    fn level_mut(&mut self, scraper: &Arc<str>, priority: Priority) -> &mut Level {
        &mut self.levels.entry(scraper.clone()).or_default()[level(priority)]
    }

    /// Notes that the store holds pending tasks of `scraper` at `priority`
    /// that are not loaded yet (at start).
    pub fn unloaded(&mut self, scraper: &Arc<str>, priority: Priority) {
        let level = self.level_mut(scraper, priority);
        if level.frontier == Frontier::Complete && level.window.is_empty() {
            level.frontier = Frontier::After(None);
        }
    }

    /// Adds a pending task with base `priority`, ready at `ready_at`.
    pub fn insert(
        &mut self,
        scraper: &Arc<str>,
        priority: Priority,
        ready_at: UnixMs,
        id: TaskId,
    ) -> Placed {
        let key = (ready_at, id);
        let (window, max_window) = (self.window, self.max_window());
        let level = self.level_mut(scraper, priority);
        if !level.holds(key) {
            return Placed {
                kept: false,
                evicted: Vec::new(),
            };
        }
        let inserted = level.window.insert(key);
        let mut evicted = Vec::new();
        if level.window.len() > max_window {
            while level.window.len() > window {
                if let Some((_, id)) = level.window.pop_last() {
                    evicted.push(id);
                }
            }
            level.frontier = Frontier::After(level.window.last().copied());
        }
        self.in_memory = self.in_memory + usize::from(inserted) - evicted.len();
        let kept = !evicted.contains(&id);
        evicted.retain(|e| *e != id);
        Placed { kept, evicted }
    }

    /// Removes a task from its window, if it is there; whether it was.
    pub fn remove(
        &mut self,
        scraper: &str,
        priority: Priority,
        ready_at: UnixMs,
        id: TaskId,
    ) -> bool {
        let removed = self
            .levels
            .get_mut(scraper)
            .is_some_and(|levels| levels[level(priority)].window.remove(&(ready_at, id)));
        if removed {
            self.in_memory -= 1;
        }
        removed
    }

    /// Shortens a window to the tasks before `key`: the rest go back to the
    /// store (their ids are returned) and the window is refilled from there.
    pub fn truncate_from(
        &mut self,
        scraper: &Arc<str>,
        priority: Priority,
        key: Key,
    ) -> Vec<TaskId> {
        let level = self.level_mut(scraper, priority);
        let evicted: Vec<TaskId> = level
            .window
            .split_off(&key)
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        level.frontier = Frontier::After(level.window.last().copied());
        self.in_memory -= evicted.len();
        evicted
    }

    /// The sub-queues whose window is low and whose store has more.
    pub fn refills(&self) -> Vec<Refill> {
        let mut out = Vec::new();
        for (scraper, levels) in &self.levels {
            for priority in Priority::ALL {
                let level = &levels[level(priority)];
                if let Frontier::After(after) = level.frontier {
                    if level.window.len() < self.low_water() {
                        out.push(Refill {
                            scraper: scraper.clone(),
                            priority,
                            after,
                        });
                    }
                }
            }
        }
        out
    }

    /// Adds `loaded`, the store's next tasks of a sub-queue after
    /// `refill.after` in order; `complete` when the store has no more.
    pub fn refilled(&mut self, refill: &Refill, loaded: &[Key], complete: bool) {
        let level = self.level_mut(&refill.scraper, refill.priority);
        if level.frontier != Frontier::After(refill.after) {
            // Something moved the frontier since the refill was asked for.
            return;
        }
        let mut added = 0;
        for key in loaded {
            debug_assert!(refill.after.is_none_or(|a| *key > a), "refill out of order");
            added += usize::from(level.window.insert(*key));
        }
        level.frontier = if complete {
            Frontier::Complete
        } else {
            Frontier::After(loaded.last().copied().or(refill.after))
        };
        self.in_memory += added;
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
                let levels = self.levels.get(s)?;
                Priority::ALL
                    .into_iter()
                    .filter_map(|base| {
                        let &(ready_at, id) = levels[level(base)].window.first()?;
                        if ready_at > now {
                            return None;
                        }
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
    pub fn pop(&mut self, scraper: &str, priority: Priority) -> Option<Key> {
        let head = self.levels.get_mut(scraper)?[level(priority)]
            .window
            .pop_first()?;
        self.in_memory -= 1;
        Some(head)
    }

    /// Scrapers with a task ready at `now`.
    pub fn ready_scrapers(&self, now: UnixMs) -> impl Iterator<Item = &Arc<str>> {
        self.levels.iter().filter_map(move |(s, levels)| {
            levels
                .iter()
                .any(|l| l.window.first().is_some_and(|(t, _)| *t <= now))
                .then_some(s)
        })
    }

    /// Whether any task is ready at `now`.
    pub fn any_ready(&self, now: UnixMs) -> bool {
        self.ready_scrapers(now).next().is_some()
    }

    /// When the longest-waiting ready task became ready.
    pub fn oldest_ready(&self, now: UnixMs) -> Option<UnixMs> {
        self.levels
            .values()
            .flat_map(|levels| {
                levels
                    .iter()
                    .filter_map(|l| l.window.first().map(|(t, _)| *t))
            })
            .filter(|t| *t <= now)
            .min()
    }

    /// Tasks in memory.
    #[cfg(test)]
    pub fn in_memory(&self) -> usize {
        self.in_memory
    }

    /// Every window: its scraper, base priority, keys, and whether it holds
    /// its whole sub-queue.
    #[cfg(test)]
    pub fn windows(&self) -> Vec<(Arc<str>, Priority, Vec<Key>, bool)> {
        let mut out = Vec::new();
        for (scraper, levels) in &self.levels {
            for priority in Priority::ALL {
                let level = &levels[level(priority)];
                out.push((
                    scraper.clone(),
                    priority,
                    level.window.iter().copied().collect(),
                    level.frontier == Frontier::Complete,
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NO_AGING: Duration = Duration::ZERO;
    const MAX_WINDOW: usize = 2 * WINDOW;
    const LOW_WATER: usize = WINDOW / 4;

    #[test]
    fn heads_prefer_priority_then_age_then_id() {
        let a: Arc<str> = "a".into();
        let b: Arc<str> = "b".into();
        let mut q = ReadyQueue::default();
        q.insert(&a, Priority::Low, 1, TaskId(1));
        q.insert(&a, Priority::High, 50, TaskId(2));
        q.insert(&b, Priority::High, 40, TaskId(3));
        q.insert(&b, Priority::Critical, 500, TaskId(4)); // not ready yet
        assert_eq!(q.in_memory(), 4);
        let heads = q.heads([&a, &b], 100, NO_AGING);
        assert_eq!((heads[0].key.2, &*heads[0].scraper), (TaskId(3), "b"));
        assert_eq!(heads.len(), 2);
        // An agent eligible only for `a` gets a's best.
        assert_eq!(q.heads([&a], 100, NO_AGING)[0].key.2, TaskId(2));
        let head = q.heads([&a, &b], 500, NO_AGING)[0].clone();
        assert_eq!(head.key.2, TaskId(4));
        assert_eq!(q.pop(&head.scraper, head.base), Some((500, TaskId(4))));
        assert!(q.remove("a", Priority::High, 50, TaskId(2)));
        assert_eq!(q.heads([&a], 500, NO_AGING)[0].key.2, TaskId(1));
        assert_eq!(q.in_memory(), 2);
        assert_eq!(q.oldest_ready(500), Some(1));
    }

    #[test]
    fn an_old_low_task_outranks_a_new_medium_one_after_aging() {
        let s: Arc<str> = "s".into();
        let hour = 3_600_000;
        let aging = Duration::from_secs(3600);
        let mut q = ReadyQueue::default();
        q.insert(&s, Priority::Low, 0, TaskId(1));
        q.insert(&s, Priority::Medium, 10 * hour, TaskId(2));
        // Without aging the medium task is first; after 2h ready the low one
        // is high.
        assert_eq!(q.heads([&s], 10 * hour, NO_AGING)[0].key.2, TaskId(2));
        let head = q.heads([&s], 10 * hour, aging)[0].clone();
        assert_eq!(head.key.2, TaskId(1));
        assert_eq!(head.base, Priority::Low);
        assert!(head.key.0.0 > Priority::Medium);
    }

    #[test]
    fn a_full_window_evicts_its_tail_and_refills_in_order() {
        let s: Arc<str> = "s".into();
        let mut q = ReadyQueue::default();
        let mut evicted = Vec::new();
        for i in 0..MAX_WINDOW as i64 {
            let placed = q.insert(&s, Priority::Low, i, TaskId(i));
            assert!(placed.kept && placed.evicted.is_empty());
        }
        // One more than fits: the tail goes, the new task with it.
        let placed = q.insert(
            &s,
            Priority::Low,
            MAX_WINDOW as i64,
            TaskId(MAX_WINDOW as i64),
        );
        assert!(!placed.kept);
        evicted.extend(placed.evicted);
        assert_eq!(evicted.len(), MAX_WINDOW - WINDOW);
        assert_eq!(q.in_memory(), WINDOW);
        // Beyond the frontier now: only in the store.
        assert!(!q.insert(&s, Priority::Low, 10_000, TaskId(10_000)).kept);
        // Before it: kept.
        assert!(q.insert(&s, Priority::Low, -1, TaskId(-1)).kept);
        while q.in_memory() >= LOW_WATER {
            q.pop(&s, Priority::Low);
        }
        let refills = q.refills();
        assert_eq!(refills.len(), 1);
        assert_eq!(
            refills[0].after,
            Some((WINDOW as i64 - 1, TaskId(WINDOW as i64 - 1)))
        );
        q.refilled(&refills[0], &[(WINDOW as i64, TaskId(WINDOW as i64))], true);
        assert!(q.refills().is_empty(), "complete after a short refill");
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
                q.insert(&s, priority, *t, TaskId(i as i64));
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
            prop_assert_eq!(q.in_memory(), 0);
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
                q.insert(&s, priority, *t, TaskId(i as i64));
                let (effective, _) = crate::priority::effective(priority, *t, now, aging);
                let key = (Reverse(effective), *t, TaskId(i as i64));
                best = Some(best.map_or(key, |b| b.min(key)));
            }
            prop_assert_eq!(Some(q.heads([&s], now, aging)[0].key), best);
        }

        /// With a store behind it (a sorted list standing in), a window
        /// under any mix of inserts, pops and refills always holds a prefix
        /// of its sub-queue, so popping yields the sub-queue in order.
        #[test]
        fn windows_stay_prefixes_of_the_store(
            ops in proptest::collection::vec((0u8..3, 0i64..500), 1..500),
            window in 1usize..12,
        ) {
            let s: Arc<str> = "s".into();
            let mut q = ReadyQueue::with_window(window);
            let mut store: BTreeSet<Key> = BTreeSet::new();
            let mut next_id = 0;
            let mut popped = Vec::new();
            for (op, t) in ops {
                match op {
                    0 | 1 => {
                        next_id += 1;
                        let key = (t, TaskId(next_id));
                        store.insert(key);
                        let _ = q.insert(&s, Priority::Low, key.0, key.1);
                    }
                    _ => {
                        for refill in q.refills() {
                            let loaded: Vec<Key> = store
                                .iter()
                                .filter(|k| refill.after.is_none_or(|a| **k > a))
                                .take(window)
                                .copied()
                                .collect();
                            let complete = loaded.len() < window;
                            q.refilled(&refill, &loaded, complete);
                        }
                        if let Some(key) = q.pop(&s, Priority::Low) {
                            // The head is the smallest key the store has.
                            prop_assert_eq!(Some(&key), store.first());
                            store.remove(&key);
                            popped.push(key);
                        } else {
                            prop_assert!(store.is_empty() || !q.refills().is_empty());
                        }
                    }
                }
                prop_assert!(q.in_memory() <= 2 * window);
            }
        }
    }
}
