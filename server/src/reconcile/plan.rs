//! Reconciliation as a pure computation: a [`Planner`] is fed every expected
//! partition one at a time (so millions of them are never held at once),
//! compares each with what the lake HAS ([`ObservedIndex`]) and what the queue
//! already holds, and yields the gaps with reasons, the tasks they need and
//! coverage per source. `plan` is the same over a slice; [`plan_catalog`]
//! plans a whole catalog, expanding static sources lazily and probing the
//! index in batches; [`planned_task`] maps a gap to the task it needs, with
//! its priority. No I/O: `crate::reconcile` gathers the inputs and hands the
//! planned tasks to the scheduler.
//!
//! Architecture invariant: planning twice in a row with the upserts of the
//! first applied yields no upserts (reconcile never fights the queue).
//! `plan_catalog` and `plan` agree on the same inputs (property test).

use std::collections::HashMap;

use chrono::NaiveDate;

use super::observed::{ObservedIndex, ObservedObject};
use crate::catalog::{Catalog, ExpectedPartition, Generator};
pub use crate::config::Refresh;
use crate::model::{
    Encoded, GapReason, Partition, Priority, UnixMs, Value, for_each_product, nth_partition,
};

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
    /// Freshness: objects of partitions dated within `within` of today that
    /// are older than `max_age` are stale.
    pub refresh: Option<Refresh>,
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

/// Observed objects by key.
pub type Observed = ObservedIndex;

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

/// Queue entries by (source name, partition key). Partitions absent here
/// have no task, or a done one.
///
/// Kept compact for queues of millions of tasks: each entry is a 64-bit
/// keyed hash of the pair (SipHash with keys drawn per view, so no input can
/// be crafted to collide) and the entry, about 24 bytes; no strings are
/// held. Two pairs sharing a hash (odds near 1 in 10^7 for a million-task
/// view against a million-partition catalog) only make one gap wait for the
/// next reconcile.
#[derive(Debug, Clone, Default)]
pub struct QueueView {
    keys: std::collections::hash_map::RandomState,
    entries: HashMap<u64, QueueEntry>,
}

impl QueueView {
    /// An empty view.
    pub fn new() -> Self {
        QueueView::default()
    }

    fn hash(&self, source: &str, partition_key: &str) -> u64 {
        use std::hash::{BuildHasher, Hash, Hasher};
        let mut hasher = self.keys.build_hasher();
        source.hash(&mut hasher);
        partition_key.hash(&mut hasher);
        hasher.finish()
    }

    /// Records what the queue holds for `source`'s partition `partition_key`.
    pub fn insert(&mut self, source: &str, partition_key: &str, entry: QueueEntry) {
        let hash = self.hash(source, partition_key);
        self.entries.insert(hash, entry);
    }

    /// What the queue holds for `source`'s partition `partition_key`.
    pub fn get(&self, source: &str, partition_key: &str) -> Option<&QueueEntry> {
        self.entries.get(&self.hash(source, partition_key))
    }
}

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
    /// Every gap, in catalog order (empty when the gaps went to a sink,
    /// see [`Planner::with_sink`]).
    pub gaps: Vec<Gap>,
    /// How many gaps were found.
    pub gap_count: u64,
    /// Coverage per source, indexed like `sources`.
    pub coverage: Vec<Coverage>,
    /// Per source, the first [`MISSING_SAMPLE`] keys the lake does not have,
    /// in expansion order (what `adcectl coverage --missing` lists).
    pub missing: Vec<Vec<String>>,
}

/// How many missing keys a plan keeps per source.
pub const MISSING_SAMPLE: usize = 1000;

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

/// Where a planner puts the gaps it finds.
pub type GapSink<'a> = Box<dyn FnMut(Gap) + 'a>;

/// Plans one reconcile from partitions fed one at a time.
pub struct Planner<'a> {
    sources: &'a [PlanSource],
    observed: &'a ObservedIndex,
    queue: &'a QueueView,
    now: UnixMs,
    today: NaiveDate,
    plan: Plan,
    /// Gaps go here instead of into the plan, when set.
    sink: Option<GapSink<'a>>,
}

impl std::fmt::Debug for Planner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Planner")
            .field("now", &self.now)
            .field("gaps", &self.plan.gap_count)
            .finish_non_exhaustive()
    }
}

impl<'a> Planner<'a> {
    /// A planner at time `now` (ms since the Unix epoch).
    pub fn new(
        sources: &'a [PlanSource],
        observed: &'a ObservedIndex,
        queue: &'a QueueView,
        now: UnixMs,
    ) -> Self {
        let today = crate::model::utc_date(now);
        Planner {
            sources,
            observed,
            queue,
            now,
            today,
            plan: Plan {
                gaps: Vec::new(),
                gap_count: 0,
                coverage: vec![Coverage::default(); sources.len()],
                missing: vec![Vec::new(); sources.len()],
            },
            sink: None,
        }
    }

    /// A planner that hands each gap to `sink` as it is found instead of
    /// keeping it in the plan, so a reconcile of millions of gaps holds
    /// none of them.
    pub fn with_sink(
        sources: &'a [PlanSource],
        observed: &'a ObservedIndex,
        queue: &'a QueueView,
        now: UnixMs,
        sink: GapSink<'a>,
    ) -> Self {
        let mut planner = Planner::new(sources, observed, queue, now);
        planner.sink = Some(sink);
        planner
    }

    /// Whether objects of `partition` of `source` must be younger than some
    /// age, and which: the cut-off time, or `None`.
    fn stale_before(&self, source: &PlanSource, partition: &Partition) -> Option<UnixMs> {
        let refresh = source.refresh?;
        let date = partition.date()?;
        refresh.covers(date, self.today).then(|| {
            self.now
                .saturating_sub(crate::model::duration_ms(refresh.max_age))
        })
    }

    /// Compares one expected partition of `sources[source]` with the lake.
    pub fn add(&mut self, source: usize, partition: &Partition, keys: &[String]) {
        let observed: Vec<Option<ObservedObject>> =
            keys.iter().map(|k| self.observed.get(k)).collect();
        self.add_probed(source, partition, keys, &observed);
    }

    /// The index this planner compares against (for batch lookups).
    pub fn observed(&self) -> &'a ObservedIndex {
        self.observed
    }

    /// Like [`Planner::add`], with the lake's answer for each key already
    /// looked up (`observed[i]` for `keys[i]`), e.g. by
    /// [`ObservedIndex::get_many`].
    pub fn add_probed(
        &mut self,
        source: usize,
        partition: &Partition,
        keys: &[String],
        observed: &[Option<ObservedObject>],
    ) {
        debug_assert_eq!(keys.len(), observed.len());
        let Some(src) = self.sources.get(source) else {
            debug_assert!(false, "expected partition names an unknown source");
            return;
        };
        let stale_before = self.stale_before(src, partition);
        let cov = &mut self.plan.coverage[source];
        let mut reason: Option<GapReason> = None;
        let worse = |r: GapReason, reason: &mut Option<GapReason>| {
            // Missing beats too small beats stale.
            let rank = |g: GapReason| match g {
                GapReason::Missing => 3,
                GapReason::TooSmall => 2,
                GapReason::Stale => 1,
            };
            if reason.is_none_or(|cur| rank(r) > rank(cur)) {
                *reason = Some(r);
            }
        };
        let sample = &mut self.plan.missing[source];
        for (key, answer) in keys.iter().zip(observed) {
            cov.expected += 1;
            match answer {
                None => {
                    cov.missing += 1;
                    worse(GapReason::Missing, &mut reason);
                    if sample.len() < MISSING_SAMPLE {
                        sample.push(key.clone());
                    }
                }
                Some(obj) if obj.size < src.min_bytes => {
                    cov.too_small += 1;
                    worse(GapReason::TooSmall, &mut reason);
                }
                Some(obj) if stale_before.is_some_and(|cut| obj.modified_ms < cut) => {
                    cov.stale += 1;
                    worse(GapReason::Stale, &mut reason);
                }
                Some(_) => cov.present += 1,
            }
        }
        let Some(reason) = reason else { return };
        let needs_task = match self.queue.get(&src.name, &partition.key()) {
            None => true,
            Some(QueueEntry::Active | QueueEntry::Dead | QueueEntry::Cancelled) => false,
            Some(QueueEntry::Unavailable { recheck_at }) => *recheck_at <= self.now,
        };
        let gap = Gap {
            source,
            partition: partition.clone(),
            reason,
            keys: keys.to_vec(),
            needs_task,
        };
        self.plan.gap_count += 1;
        match &mut self.sink {
            Some(sink) => sink(gap),
            None => self.plan.gaps.push(gap),
        }
    }

    /// The plan.
    pub fn finish(self) -> Plan {
        self.plan
    }
}

/// Plans one reconcile over expected partitions held in a slice.
pub fn plan(
    sources: &[PlanSource],
    expected: &[Expected],
    observed: &ObservedIndex,
    queue: &QueueView,
    now: UnixMs,
) -> Plan {
    let mut planner = Planner::new(sources, observed, queue, now);
    for exp in expected {
        planner.add(exp.source, &exp.partition, &exp.keys);
    }
    planner.finish()
}

/// A key two sources would both expect, through a template they share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedKey {
    /// The source earlier in the catalog.
    pub first: String,
    /// The later one.
    pub second: String,
    /// The first such key, in the later source's order.
    pub key: String,
    /// The template both use.
    pub template: String,
}

impl std::fmt::Display for SharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sources `{}` and `{}` both expect key `{}` (object key template `{}`); sources may share a template only when their partitions are disjoint",
            self.first, self.second, self.key, self.template
        )
    }
}

/// The first key two sources would both expect through a template they
/// share, where one of them is dependent (partitions of the static pairs
/// were compared at load): dependent sources' keys come from `dependent`,
/// static ones are expanded as of `today`. `None` when all are disjoint.
pub fn shared_key(
    catalog: &Catalog,
    today: NaiveDate,
    dependent: &[(usize, Vec<ExpectedPartition>)],
) -> Option<SharedKey> {
    // Each template's users: (source, the template's index in its objects).
    let mut users: Vec<(&str, Vec<(usize, usize)>)> = Vec::new();
    for (i, source) in catalog.sources.iter().enumerate() {
        for (j, t) in source.objects.iter().enumerate() {
            match users.iter_mut().find(|(text, _)| *text == t.as_str()) {
                Some((_, list)) => list.push((i, j)),
                None => users.push((t.as_str(), vec![(i, j)])),
            }
        }
    }
    for (template, list) in users {
        let shared = list.len() > 1;
        if !shared
            || list
                .iter()
                .all(|(i, _)| catalog.sources[*i].dependency().is_none())
        {
            continue;
        }
        let mut owner: HashMap<String, usize> = HashMap::new();
        for &(i, j) in &list {
            let source = &catalog.sources[i];
            let mut keys = Vec::new();
            if source.dependency().is_some() {
                if let Some((_, parts)) = dependent.iter().find(|(d, _)| *d == i) {
                    keys.extend(parts.iter().filter_map(|e| e.keys.get(j).cloned()));
                }
            } else {
                Generator::for_each_key(&source.generators, &source.objects[j], today, |k| {
                    keys.push(k);
                    false
                });
            }
            for key in keys {
                match owner.get(&key) {
                    Some(&other) if other != i => {
                        return Some(SharedKey {
                            first: catalog.sources[other].name.clone(),
                            second: source.name.clone(),
                            key,
                            template: template.to_owned(),
                        });
                    }
                    Some(_) => {}
                    None => {
                        owner.insert(key, i);
                    }
                }
            }
        }
    }
    None
}

/// A task a plan wants to exist. Its partition and keys are encoded once,
/// here on the planning thread, so the scheduler (the single writer) only
/// writes them; it decodes them only for the few tasks it keeps in memory.
#[derive(Debug, Clone)]
pub struct PlannedTask {
    /// Its source.
    pub source: String,
    /// Its scraper.
    pub scraper: String,
    /// Its priority.
    pub priority: Priority,
    /// Why.
    pub reason: GapReason,
    /// Its partition and the keys it must produce, as stored.
    pub encoded: Encoded,
}

impl PlannedTask {
    /// The task of `source`'s `partition` (run by `scraper`), which must
    /// produce `keys`.
    pub fn new(
        source: impl Into<String>,
        scraper: impl Into<String>,
        partition: &Partition,
        priority: Priority,
        reason: GapReason,
        keys: &[String],
    ) -> Self {
        PlannedTask {
            encoded: Encoded::new(partition, keys),
            source: source.into(),
            scraper: scraper.into(),
            priority,
            reason,
        }
    }
}

/// What planning knows of each catalog source, in catalog order.
pub fn plan_sources(catalog: &Catalog) -> Vec<PlanSource> {
    catalog
        .sources
        .iter()
        .map(|s| PlanSource {
            name: s.name.clone(),
            scraper: s.scraper.clone(),
            priority: s.priority,
            min_bytes: s.min_bytes,
            refresh: s.refresh,
        })
        .collect()
}

/// Static partitions whose keys are looked up in the index together.
const PROBE_BATCH: usize = 1024;

/// Plans the whole catalog: static sources are expanded lazily, partition by
/// partition, and their keys looked up in batches; dependent sources come
/// expanded in `dependent`. Pure.
pub fn plan_catalog(
    catalog: &Catalog,
    today: NaiveDate,
    dependent: &[(usize, Vec<ExpectedPartition>)],
    observed: &ObservedIndex,
    queue: &QueueView,
    now: UnixMs,
) -> Plan {
    let mut gaps = Vec::new();
    let mut plan = plan_catalog_into(
        catalog,
        today,
        dependent,
        observed,
        queue,
        now,
        Box::new(|gap| gaps.push(gap)),
    );
    plan.gaps = gaps;
    plan
}

/// Like [`plan_catalog`], handing each gap to `sink` as it is found; the
/// plan returned holds the numbers, not the gaps.
pub fn plan_catalog_into<'a>(
    catalog: &'a Catalog,
    today: NaiveDate,
    dependent: &'a [(usize, Vec<ExpectedPartition>)],
    observed: &'a ObservedIndex,
    queue: &'a QueueView,
    now: UnixMs,
    sink: GapSink<'a>,
) -> Plan {
    let sources = plan_sources(catalog);
    let mut planner = Planner::with_sink(&sources, observed, queue, now, sink);
    for (idx, source) in catalog.sources.iter().enumerate() {
        if source.dependency().is_some() {
            continue;
        }
        let generators = Generator::value_lists(&source.generators, today);
        let mut batch = ProbeBatch::default();
        let mut number = 0u64;
        for_each_product(&generators, |partition| {
            // Templates were checked against the variables at load time.
            if let Ok(keys) = source.keys(partition) {
                batch.push(number, keys);
            }
            number += 1;
            if batch.partitions.len() >= PROBE_BATCH {
                batch.flush(&mut planner, idx, &generators);
            }
        });
        batch.flush(&mut planner, idx, &generators);
    }
    for (idx, partitions) in dependent {
        for exp in partitions {
            planner.add(*idx, &exp.partition, &exp.keys);
        }
    }
    planner.finish()
}

/// Partitions of one source waiting for a batch lookup: each is kept as its
/// number in the product (decoded back when planned), with its keys.
#[derive(Default)]
struct ProbeBatch {
    partitions: Vec<(u64, std::ops::Range<usize>)>,
    keys: Vec<String>,
    answers: Vec<Option<ObservedObject>>,
}

impl ProbeBatch {
    fn push(&mut self, number: u64, keys: Vec<String>) {
        let start = self.keys.len();
        self.keys.extend(keys);
        self.partitions.push((number, start..self.keys.len()));
    }

    fn flush(
        &mut self,
        planner: &mut Planner<'_>,
        source: usize,
        generators: &[(String, Vec<Value>)],
    ) {
        if self.partitions.is_empty() {
            return;
        }
        let refs: Vec<&str> = self.keys.iter().map(String::as_str).collect();
        planner.observed().get_many(&refs, &mut self.answers);
        for (number, range) in self.partitions.drain(..) {
            let partition = nth_partition(generators, number);
            planner.add_probed(
                source,
                &partition,
                &self.keys[range.clone()],
                &self.answers[range],
            );
        }
        self.keys.clear();
    }
}

/// The task a gap of `catalog` needs, with its priority as of `today`.
pub fn planned_task(catalog: &Catalog, gap: &Gap, today: NaiveDate) -> PlannedTask {
    let source = &catalog.sources[gap.source];
    let priority = source.priority_rules.base_for(&gap.partition, today).0;
    PlannedTask::new(
        source.name.clone(),
        source.scraper.clone(),
        &gap.partition,
        priority,
        gap.reason,
        &gap.keys,
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
                refresh: None,
            },
            PlanSource {
                name: "b".into(),
                scraper: "sb".into(),
                priority: Priority::Low,
                min_bytes: 10,
                refresh: None,
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

    /// Each source keeps its first missing keys in expansion order, only
    /// absent ones (not too small or stale), at most MISSING_SAMPLE.
    #[test]
    fn the_first_missing_keys_of_each_source_are_kept_in_order() {
        let mut exp = vec![expected(1, 1, 2)];
        exp.extend((0..MISSING_SAMPLE as u32 + 10).map(|id| expected(0, id, 1)));
        let mut observed = Observed::default();
        observed.insert("s0/1/0", obj(5));
        observed.insert("s1/1/0", obj(3)); // too small: not missing
        let plan = plan(&sources(), &exp, &observed, &QueueView::new(), 0);
        assert_eq!(plan.missing[1], ["s1/1/1"]);
        assert_eq!(plan.missing[0].len(), MISSING_SAMPLE);
        assert_eq!(plan.missing[0][..3], ["s0/0/0", "s0/2/0", "s0/3/0"]);
        assert_eq!(plan.coverage[0].missing, MISSING_SAMPLE as u64 + 9);
    }

    #[test]
    fn missing_and_too_small_objects_become_gaps_with_reasons() {
        let exp = vec![expected(0, 1, 2), expected(1, 2, 1), expected(1, 3, 1)];
        let mut observed = Observed::default();
        observed.insert("s0/1/0", obj(5));
        observed.insert("s1/2/0", obj(3)); // below min_bytes 10
        observed.insert("s1/3/0", obj(30));
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
        queue.insert("a", "id=1", QueueEntry::Active);
        queue.insert("a", "id=2", QueueEntry::Dead);
        queue.insert("a", "id=3", QueueEntry::Unavailable { recheck_at: 100 });
        queue.insert("a", "id=4", QueueEntry::Unavailable { recheck_at: 10 });
        let plan = plan(&sources(), &exp, &Observed::default(), &queue, 50);
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
            let mut observed = Observed::default();
            for (id, k, size) in present {
                for s in 0..2 {
                    observed.insert(&format!("s{s}/{id}/{k}"), obj(size));
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
                queue.insert("a", &format!("id={id}"), entry);
            }
            let now = 25;
            let first = plan(&sources, &exp, &observed, &queue, now);
            for c in &first.coverage {
                prop_assert_eq!(c.expected, c.present + c.missing + c.too_small + c.stale);
            }
            for gap in first.upserts() {
                let (source, key) = (&sources[gap.source].name, gap.partition.key());
                prop_assert!(!matches!(queue.get(source, &key), Some(QueueEntry::Active | QueueEntry::Dead | QueueEntry::Cancelled)));
                queue.insert(source, &key, QueueEntry::Active);
            }
            let second = plan(&sources, &exp, &observed, &queue, now);
            prop_assert_eq!(second.upserts().count(), 0);
            prop_assert_eq!(second.gaps.len(), first.gaps.len());
            prop_assert_eq!(&second.coverage, &first.coverage);
        }
    }

    #[test]
    fn recent_old_objects_are_stale_and_old_partitions_are_not() {
        let day = 86_400_000i64;
        let now = 20_000 * day + 12 * 3_600_000; // noon on day 20000
        let today = chrono::DateTime::from_timestamp_millis(now)
            .unwrap()
            .date_naive();
        let mut sources = sources();
        sources[0].refresh = Some(Refresh {
            within: Duration::from_secs(2 * 86_400),
            max_age: Duration::from_secs(3600),
        });
        let dated = |days_ago: i64, key: &str| Expected {
            source: 0,
            partition: Partition {
                vars: vec![(
                    "date".into(),
                    Value::Date(today - chrono::Duration::days(days_ago)),
                )],
            },
            keys: vec![key.to_string()],
        };
        let exp = vec![
            dated(0, "today-old"),
            dated(1, "yesterday-fresh"),
            dated(5, "last-week-old"),
        ];
        let mut observed = Observed::default();
        let at = |modified_ms| ObservedObject {
            size: 10,
            modified_ms,
        };
        observed.insert("today-old", at(now - 2 * 3_600_000));
        observed.insert("yesterday-fresh", at(now - 60_000));
        observed.insert("last-week-old", at(now - 3 * day));
        let plan = plan(&sources, &exp, &observed, &QueueView::new(), now);
        assert_eq!(plan.gaps.len(), 1);
        assert_eq!(plan.gaps[0].reason, GapReason::Stale);
        assert_eq!(plan.gaps[0].keys, ["today-old"]);
        assert_eq!(plan.coverage[0].stale, 1);
        assert_eq!(plan.coverage[0].present, 2);
    }
}

#[cfg(test)]
mod catalog_tests {
    use proptest::prelude::*;

    use super::*;
    use crate::config::Config;

    const CONFIG: &str = "\
version: 1
lake:
  local:
    root: lake
scrapers:
  s:
    command: [\"true\"]
sources:
  - name: games
    scraper: s
    min_bytes: 10
    partitions:
      - dates: {start: 2024-10-20, end: 2024-10-27}
      - values: {var: id, values: [\"a\", \"b\", \"c\"]}
    objects: [\"games/{date:%Y%m%d}/{id}.json\", \"games/{date:%Y%m%d}/{id}.csv\"]
  - name: seasons
    scraper: s
    partitions:
      values: {var: season, values: [\"2022\", \"2023\", \"2024\"]}
    objects: [\"seasons/{season}.json\"]
";

    proptest! {
        /// Planning a catalog lazily, in probe batches, gives the same gaps
        /// and coverage as planning its expanded partitions one by one,
        /// whatever the lake holds and the queue says.
        #[test]
        fn plan_catalog_agrees_with_plan(
            lake in prop::collection::vec(0u8..4, 75),
            queue in prop::collection::vec(0u8..6, 27),
        ) {
            let cfg = Config::parse(CONFIG, std::path::Path::new("adce.yaml")).unwrap();
            let catalog = Catalog::from_config(&cfg);
            let today = NaiveDate::from_ymd_opt(2024, 11, 1).unwrap();
            let now = 1_000_000;
            let expanded = catalog.expand(today);
            let keys: Vec<&String> = expanded.iter().flat_map(|e| &e.keys).collect();
            prop_assert_eq!(keys.len(), 3 * 8 * 2 + 3);
            // Each key: absent, too small, or present (twice as likely).
            let mut observed = ObservedIndex::default();
            for (key, what) in keys.iter().zip(&lake) {
                let size = match what {
                    0 => continue,
                    1 => 1,
                    _ => 100,
                };
                observed.insert(key, ObservedObject { size, modified_ms: 1 });
            }
            let mut view = QueueView::new();
            for (exp, what) in expanded.iter().zip(&queue) {
                let entry = match what {
                    0 => QueueEntry::Active,
                    1 => QueueEntry::Dead,
                    2 => QueueEntry::Unavailable { recheck_at: now + 1 },
                    3 => QueueEntry::Unavailable { recheck_at: now - 1 },
                    _ => continue,
                };
                view.insert(&catalog.sources[exp.source].name, &exp.partition.key(), entry);
            }
            let lazily = plan_catalog(&catalog, today, &[], &observed, &view, now);
            let expected: Vec<Expected> = expanded
                .into_iter()
                .map(|e| Expected { source: e.source, partition: e.partition, keys: e.keys })
                .collect();
            let eagerly = plan(&plan_sources(&catalog), &expected, &observed, &view, now);
            prop_assert_eq!(&lazily.gaps, &eagerly.gaps);
            prop_assert_eq!(&lazily.coverage, &eagerly.coverage);
            prop_assert_eq!(&lazily.missing, &eagerly.missing);
            prop_assert_eq!(lazily.gap_count, eagerly.gap_count);
        }
    }

    /// A dependent source may share a template with a static one until a
    /// parent lists a value the static one expects too: then the first such
    /// key is named with both sources.
    #[test]
    fn shared_templates_with_a_dependent_source_are_checked_against_its_values() {
        let cfg = Config::parse(
            "\
version: 1
lake: {local: {root: lake}}
scrapers:
  s:
    command: [\"true\"]
sources:
  - name: games
    scraper: s
    partitions:
      from_objects: {objects: \"sched.json\", var: game_id, json: /ids}
    objects: [\"g/{game_id}.json\"]
  - name: more
    scraper: s
    partitions:
      values: {var: game_id, values: [\"7\", \"8\"]}
    objects: [\"m/{game_id}.csv\", \"g/{game_id}.json\"]
",
            std::path::Path::new("adce.yaml"),
        )
        .unwrap();
        let catalog = Catalog::from_config(&cfg);
        let today = NaiveDate::from_ymd_opt(2024, 11, 1).unwrap();
        let expand = |values: &[&str]| {
            let parents = vec![(
                Partition::default(),
                values.iter().map(|v| v.to_string()).collect(),
            )];
            vec![(0, catalog.expand_dependent(0, &parents))]
        };
        assert_eq!(shared_key(&catalog, today, &expand(&["1", "2"])), None);
        assert_eq!(shared_key(&catalog, today, &[]), None);
        let shared = shared_key(&catalog, today, &expand(&["1", "8", "7"])).unwrap();
        assert_eq!(
            shared,
            SharedKey {
                first: "games".into(),
                second: "more".into(),
                key: "g/7.json".into(),
                template: "g/{game_id}.json".into(),
            }
        );
        assert!(shared.to_string().contains("both expect key `g/7.json`"));
    }
}
