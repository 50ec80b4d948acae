//! Reconciliation as a pure function: `plan(sources, expected, observed,
//! queue, now)` compares what SHOULD exist with what the lake HAS and what the
//! queue already holds, and returns the gaps, the task upserts they imply and
//! coverage per source. No I/O: the reconciler in `autoloop` gathers the inputs
//! and hands the upserts to the scheduler.
//!
//! Architecture invariant: planning twice in a row with the upserts of the
//! first applied yields no upserts (reconcile never fights the queue).

use std::collections::HashMap;

use crate::model::{GapReason, Partition, Priority, UnixMs};

/// What planning needs to know about a source.
#[derive(Debug, Clone)]
pub struct PlanSource {
    /// Its name.
    pub name: String,
    /// Its scraper.
    pub scraper: String,
    /// Its priority.
    pub priority: Priority,
    /// Objects smaller than this are gaps.
    pub min_bytes: u64,
}

/// One partition the catalog expects, with its rendered keys.
#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    /// Index into the `sources` slice.
    pub source: usize,
    /// The partition.
    pub partition: Partition,
    /// Keys it must have.
    pub keys: Vec<String>,
}

/// What the lake holds for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObservedObject {
    /// Size in bytes.
    pub size: u64,
    /// Last modification, ms since the Unix epoch.
    pub modified_ms: UnixMs,
}

/// Observed objects by key.
pub type Observed = HashMap<String, ObservedObject>;

/// What the queue holds for a partition, as far as planning cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueEntry {
    /// Pending or leased: work is already on its way.
    Active,
    /// Dead: waits for an operator's retry.
    Dead,
    /// Cancelled by an operator.
    Cancelled,
    /// The data does not exist yet; look again at `recheck_at`.
    Unavailable {
        /// When to look again.
        recheck_at: UnixMs,
    },
}

/// Queue entries by `(source name, partition key)`. Partitions absent here
/// have no task, or a done one.
pub type QueueView = HashMap<(String, String), QueueEntry>;

/// Object counts for a set of expected objects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Coverage {
    /// Objects expected.
    pub expected: u64,
    /// Present and at least `min_bytes`.
    pub present: u64,
    /// Absent.
    pub missing: u64,
    /// Present but smaller than `min_bytes`.
    pub too_small: u64,
    /// Present but stale.
    pub stale: u64,
}

impl Coverage {
    /// present / expected × 100, or 100 when nothing is expected.
    pub fn percent(&self) -> f64 {
        if self.expected == 0 {
            100.0
        } else {
            self.present as f64 * 100.0 / self.expected as f64
        }
    }

    /// Adds another coverage's counts to this one.
    pub fn add(&mut self, other: &Coverage) {
        self.expected += other.expected;
        self.present += other.present;
        self.missing += other.missing;
        self.too_small += other.too_small;
        self.stale += other.stale;
    }
}

/// A partition with at least one missing or invalid object.
#[derive(Debug, Clone, PartialEq)]
pub struct Gap {
    /// Index into `sources`.
    pub source: usize,
    /// The partition.
    pub partition: Partition,
    /// The worst reason among its objects (missing before too_small).
    pub reason: GapReason,
    /// Every expected key of the partition.
    pub keys: Vec<String>,
    /// Whether a task should be created or reopened for it.
    pub needs_task: bool,
}

/// The result of planning.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Every gap, in catalog order.
    pub gaps: Vec<Gap>,
    /// Coverage per source, indexed like `sources`.
    pub coverage: Vec<Coverage>,
}

impl Plan {
    /// Coverage of all sources together.
    pub fn total(&self) -> Coverage {
        let mut total = Coverage::default();
        for c in &self.coverage {
            total.add(c);
        }
        total
    }

    /// The gaps that need a task.
    pub fn upserts(&self) -> impl Iterator<Item = &Gap> {
        self.gaps.iter().filter(|g| g.needs_task)
    }
}

/// Plans one reconcile. See the module docs.
pub fn plan(
    sources: &[PlanSource],
    expected: &[Expected],
    observed: &Observed,
    queue: &QueueView,
    now: UnixMs,
) -> Plan {
    let mut coverage = vec![Coverage::default(); sources.len()];
    let mut gaps = Vec::new();
    for exp in expected {
        let Some(source) = sources.get(exp.source) else {
            debug_assert!(false, "expected partition names an unknown source");
            continue;
        };
        let cov = &mut coverage[exp.source];
        let mut reason: Option<GapReason> = None;
        for key in &exp.keys {
            cov.expected += 1;
            match observed.get(key) {
                None => {
                    cov.missing += 1;
                    reason = Some(GapReason::Missing);
                }
                Some(obj) if obj.size < source.min_bytes => {
                    cov.too_small += 1;
                    if reason.is_none() {
                        reason = Some(GapReason::TooSmall);
                    }
                }
                Some(_) => cov.present += 1,
            }
        }
        let Some(reason) = reason else { continue };
        let needs_task = match queue.get(&(source.name.clone(), exp.partition.key())) {
            None => true,
            Some(QueueEntry::Active | QueueEntry::Dead | QueueEntry::Cancelled) => false,
            Some(QueueEntry::Unavailable { recheck_at }) => *recheck_at <= now,
        };
        gaps.push(Gap {
            source: exp.source,
            partition: exp.partition.clone(),
            reason,
            keys: exp.keys.clone(),
            needs_task,
        });
    }
    Plan { gaps, coverage }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Value;
    use proptest::prelude::*;

    fn sources() -> Vec<PlanSource> {
        vec![
            PlanSource {
                name: "a".into(),
                scraper: "sa".into(),
                priority: Priority::High,
                min_bytes: 1,
            },
            PlanSource {
                name: "b".into(),
                scraper: "sb".into(),
                priority: Priority::Low,
                min_bytes: 10,
            },
        ]
    }

    fn expected(source: usize, id: u32, keys: u32) -> Expected {
        Expected {
            source,
            partition: Partition {
                vars: vec![("id".into(), Value::Str(id.to_string()))],
            },
            keys: (0..keys).map(|k| format!("s{source}/{id}/{k}")).collect(),
        }
    }

    fn obj(size: u64) -> ObservedObject {
        ObservedObject {
            size,
            modified_ms: 0,
        }
    }

    #[test]
    fn missing_and_too_small_objects_become_gaps_with_reasons() {
        let exp = vec![expected(0, 1, 2), expected(1, 2, 1), expected(1, 3, 1)];
        let mut observed = Observed::new();
        observed.insert("s0/1/0".into(), obj(5));
        observed.insert("s1/2/0".into(), obj(3)); // below min_bytes 10
        observed.insert("s1/3/0".into(), obj(30));
        let plan = plan(&sources(), &exp, &observed, &QueueView::new(), 0);
        let reasons: Vec<_> = plan.gaps.iter().map(|g| (g.source, g.reason)).collect();
        assert_eq!(reasons, [(0, GapReason::Missing), (1, GapReason::TooSmall)]);
        assert_eq!(
            plan.coverage[0],
            Coverage {
                expected: 2,
                present: 1,
                missing: 1,
                too_small: 0,
                stale: 0
            }
        );
        assert_eq!(plan.coverage[1].too_small, 1);
        assert_eq!(plan.total().expected, 4);
        assert_eq!(plan.total().present, 2);
        assert!((plan.total().percent() - 50.0).abs() < 1e-9);
    }

    #[test]
    fn queue_state_decides_whether_a_gap_needs_a_task() {
        let exp = vec![
            expected(0, 1, 1),
            expected(0, 2, 1),
            expected(0, 3, 1),
            expected(0, 4, 1),
            expected(0, 5, 1),
        ];
        let mut queue = QueueView::new();
        queue.insert(("a".into(), "id=1".into()), QueueEntry::Active);
        queue.insert(("a".into(), "id=2".into()), QueueEntry::Dead);
        queue.insert(
            ("a".into(), "id=3".into()),
            QueueEntry::Unavailable { recheck_at: 100 },
        );
        queue.insert(
            ("a".into(), "id=4".into()),
            QueueEntry::Unavailable { recheck_at: 10 },
        );
        let plan = plan(&sources(), &exp, &Observed::new(), &queue, 50);
        let needs: Vec<_> = plan.gaps.iter().map(|g| g.needs_task).collect();
        assert_eq!(needs, [false, false, false, true, true]);
    }

    #[test]
    fn nothing_expected_is_full_coverage() {
        assert!((Coverage::default().percent() - 100.0).abs() < 1e-9);
    }

    proptest! {
        /// Planning, then marking every upsert active, then planning again
        /// creates nothing new; and the counts always add up.
        #[test]
        fn planning_twice_is_stable(
            parts in proptest::collection::vec((0usize..2, 0u32..50, 1u32..4), 0..60),
            present in proptest::collection::vec((0u32..50, 0u32..4, 0u64..20), 0..120),
            states in proptest::collection::vec((0u32..50, 0u8..4), 0..30),
        ) {
            let sources = sources();
            let mut seen = std::collections::HashSet::new();
            let exp: Vec<Expected> = parts
                .into_iter()
                .filter(|(s, id, _)| seen.insert((*s, *id)))
                .map(|(s, id, k)| expected(s, id, k))
                .collect();
            let mut observed = Observed::new();
            for (id, k, size) in present {
                for s in 0..2 {
                    observed.insert(format!("s{s}/{id}/{k}"), obj(size));
                }
            }
            let mut queue = QueueView::new();
            for (id, st) in states {
                let entry = match st {
                    0 => QueueEntry::Active,
                    1 => QueueEntry::Dead,
                    2 => QueueEntry::Cancelled,
                    _ => QueueEntry::Unavailable { recheck_at: i64::from(id) },
                };
                queue.insert(("a".into(), format!("id={id}")), entry);
            }
            let now = 25;
            let first = plan(&sources, &exp, &observed, &queue, now);
            for c in &first.coverage {
                prop_assert_eq!(c.expected, c.present + c.missing + c.too_small + c.stale);
            }
            for gap in first.upserts() {
                let key = (sources[gap.source].name.clone(), gap.partition.key());
                prop_assert!(!matches!(queue.get(&key), Some(QueueEntry::Active | QueueEntry::Dead | QueueEntry::Cancelled)));
                queue.insert(key, QueueEntry::Active);
            }
            let second = plan(&sources, &exp, &observed, &queue, now);
            prop_assert_eq!(second.upserts().count(), 0);
            prop_assert_eq!(second.gaps.len(), first.gaps.len());
            prop_assert_eq!(&second.coverage, &first.coverage);
        }
    }
}
