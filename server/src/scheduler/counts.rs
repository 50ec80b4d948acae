//! Task counts by (state, priority, source, scraper), kept by the scheduler
//! as it moves tasks, so status, metrics and listings never count the task
//! table. Loaded from the store's `task_counts` at start; the keys a batch
//! changed are written back in that batch's transaction ([`Counts::flush`]),
//! so the stored counts always match the stored tasks.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::effects::Write;
use crate::model::{Priority, TaskState};
use crate::store::CountRow;

/// A bucket of tasks: state, base priority, source, scraper.
pub(super) type CountKey = (TaskState, Priority, Arc<str>, Arc<str>);

/// The counts, with the keys changed since the last flush.
#[derive(Debug, Default)]
pub(super) struct Counts {
    n: HashMap<CountKey, u64>,
    dirty: HashSet<CountKey>,
}

impl Counts {
    /// Counts as stored.
    pub fn load(rows: Vec<CountRow>, mut intern: impl FnMut(&str) -> Arc<str>) -> Self {
        let n = rows
            .into_iter()
            .map(|(state, priority, source, scraper, n)| {
                ((state, priority, intern(&source), intern(&scraper)), n)
            })
            .collect();
        Counts {
            n,
            dirty: HashSet::new(),
        }
    }

    /// A task left `from` (none: it is new) for `to`.
    pub fn moved(&mut self, from: Option<CountKey>, to: CountKey) {
        if from.as_ref() == Some(&to) {
            return;
        }
        if let Some(from) = from {
            let n = self.n.entry(from.clone()).or_default();
            debug_assert!(*n > 0, "count of {from:?} below zero");
            *n = n.saturating_sub(1);
            self.dirty.insert(from);
        }
        *self.n.entry(to.clone()).or_default() += 1;
        self.dirty.insert(to);
    }

    /// Tasks in `state` with `scraper`.
    pub fn of_scraper(&self, state: TaskState, scraper: &str) -> u64 {
        self.of_state(state)
            .filter(|((.., sc), _)| &**sc == scraper)
            .map(|(_, n)| n)
            .sum()
    }

    /// Tasks in `state`.
    pub fn total(&self, state: TaskState) -> u64 {
        self.of_state(state).map(|(_, n)| n).sum()
    }

    /// The non-zero counts of `state`.
    pub fn of_state(&self, state: TaskState) -> impl Iterator<Item = (&CountKey, u64)> {
        self.n
            .iter()
            .filter(move |((s, ..), n)| *s == state && **n > 0)
            .map(|(k, n)| (k, *n))
    }

    /// The write that stores the counts changed since the last flush.
    pub fn flush(&mut self) -> Option<Write> {
        if self.dirty.is_empty() {
            return None;
        }
        let rows = self
            .dirty
            .drain()
            .map(|key| {
                let n = self.n.get(&key).copied().unwrap_or(0);
                let (state, priority, source, scraper) = key;
                (state, priority, source.to_string(), scraper.to_string(), n)
            })
            .collect();
        Some(Write::Counts(rows))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_shift_one_task_and_flush_only_what_changed() {
        let s: Arc<str> = "s".into();
        let key = |state| (state, Priority::Low, s.clone(), s.clone());
        let mut counts = Counts::default();
        counts.moved(None, key(TaskState::Pending));
        counts.moved(None, key(TaskState::Pending));
        counts.moved(Some(key(TaskState::Pending)), key(TaskState::Leased));
        assert_eq!(counts.total(TaskState::Pending), 1);
        assert_eq!(counts.of_scraper(TaskState::Leased, "s"), 1);
        let Some(Write::Counts(mut rows)) = counts.flush() else {
            panic!("a flush after moves writes counts");
        };
        rows.sort_by_key(|r| r.0);
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].0, rows[0].4), (TaskState::Pending, 1));
        assert_eq!((rows[1].0, rows[1].4), (TaskState::Leased, 1));
        assert!(counts.flush().is_none(), "nothing changed since");
    }
}
