//! The reconciler: gathers what planning needs and applies the result.
//! Observes the lake (a listing of the catalog's prefixes, or the newest S3
//! Inventory report patched by confirming recent and hot objects), reads the
//! parent objects of dependent sources (cached by size and modification time),
//! feeds every expected partition to the pure [`Planner`] without holding them
//! all, and hands the tasks to the scheduler.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::catalog::{Catalog, ExpectedPartition};
use crate::config::InventoryConfig;
use crate::error::{Error, Result};
use crate::lake::inventory;
use crate::lake::{ObjectSource, PageSink, SharedLake};
use crate::logs::Event;
use crate::model::{Partition, Priority, UnixMs, Value, now_ms};
use crate::observed::{ObservedIndex, ObservedObject};
use crate::reconcile::{
    Coverage, Gap, GapSink, Plan, PlanSource, Planner, QueueView, for_each_product, nth_partition,
};
use crate::scheduler::{Handle, PlannedTask};

/// How many listing pages may wait for the reconciler at once.
const PAGES_IN_FLIGHT: usize = 64;
/// Partitions dated this close to an inventory report (or after it) are
/// confirmed against the lake itself.
const REPORT_MARGIN_DAYS: i64 = 1;
/// The most objects confirmed one by one after an inventory report; beyond
/// it the recent objects are left to the next report.
const MAX_CONFIRMED: usize = 20_000;
/// Confirmations in flight at once.
const CONFIRM_CONCURRENCY: usize = 16;
/// Planned tasks handed to the scheduler in one command: small enough that
/// the scheduler dispatches between chunks, large enough to batch the store.
const APPLY_CHUNK: usize = 2_000;
/// Chunks planned ahead of the scheduler at most.
const APPLY_CHUNKS_IN_FLIGHT: usize = 2;

/// Coverage per source from the last reconcile.
#[derive(Debug, Clone, Default)]
pub struct CoverageReport {
    /// `(source, priority, coverage)` in catalog order.
    pub sources: Vec<(String, Priority, Coverage)>,
    /// All sources.
    pub total: Coverage,
    /// When computed (0: never).
    pub computed_at: UnixMs,
    /// Where the evidence came from (`listing`, or `inventory report …`).
    pub evidence: String,
}

/// What one reconcile found and did.
#[derive(Debug, Clone, Default)]
pub struct ReconcileSummary {
    /// Objects expected.
    pub expected_objects: u64,
    /// Objects observed under the catalog's prefixes.
    pub observed_objects: u64,
    /// Partitions with a gap.
    pub gaps: u64,
    /// Tasks created or reopened.
    pub tasks_created: u64,
    /// How long it took.
    pub duration: Duration,
    /// Coverage after it.
    pub coverage: Coverage,
}

/// A reconcile progress event.
#[derive(Debug, Clone)]
pub enum ReconcileProgress {
    /// A phase finished: `(phase, message)`.
    Phase(&'static str, String),
    /// The reconcile finished.
    Done(ReconcileSummary),
    /// The reconcile failed.
    Failed(String),
}

/// Where S3 Inventory reports for the lake's bucket are delivered.
#[derive(Clone)]
pub struct InventorySource {
    /// The destination bucket (or a directory standing in for it).
    pub store: Arc<dyn ObjectSource>,
    /// Destination prefix and configuration id.
    pub config: InventoryConfig,
    /// The lake's bucket (the report's source bucket).
    pub source_bucket: String,
    /// The lake's key prefix inside its bucket (stripped from report keys).
    pub lake_prefix: String,
}

impl std::fmt::Debug for InventorySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InventorySource")
            .field("store", &self.store.describe())
            .field("config", &self.config)
            .finish()
    }
}

/// Values extracted from one version of a parent object.
#[derive(Debug, Clone)]
struct ParentEntry {
    size: u64,
    modified_ms: UnixMs,
    values: Arc<Vec<String>>,
}

/// Gathers inputs, plans and applies. Owned by the loop; one runs at a time.
#[derive(Debug)]
pub struct Reconciler {
    catalog: Arc<Catalog>,
    lake: SharedLake,
    scheduler: Handle,
    /// Where the queue is read for planning.
    readers: Arc<crate::store::Readers>,
    inventory: Option<InventorySource>,
    parents: HashMap<String, ParentEntry>,
    metrics: crate::metrics::Metrics,
}

/// What was observed, and how.
struct Observation {
    index: ObservedIndex,
    evidence: String,
    /// When the inventory report was made, if one was used.
    report_ms: Option<UnixMs>,
}

impl Reconciler {
    /// A reconciler over `catalog` and `lake`, reading `inventory` reports
    /// when given, and the queue through `readers`.
    pub fn new(
        catalog: Arc<Catalog>,
        lake: SharedLake,
        scheduler: Handle,
        readers: Arc<crate::store::Readers>,
        inventory: Option<InventorySource>,
        metrics: crate::metrics::Metrics,
    ) -> Self {
        Reconciler {
            catalog,
            lake,
            scheduler,
            readers,
            inventory,
            parents: HashMap::new(),
            metrics,
        }
    }

    /// Runs one reconcile, reporting each phase through `report`.
    pub async fn run<F, Fut>(&mut self, report: &F) -> Result<(ReconcileSummary, CoverageReport)>
    where
        F: Fn(ReconcileProgress) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let started = Instant::now();
        let now = now_ms();
        let today = chrono::Utc::now().date_naive();
        let observed_at = now;
        // A reload may have replaced the catalog since the last run.
        self.catalog = self.scheduler.catalog();

        let mut observation = self.observe().await?;
        report(ReconcileProgress::Phase(
            "observe",
            format!(
                "{} objects from {}",
                observation.index.present(),
                observation.evidence
            ),
        ))
        .await;

        let dependent = self.expand_dependent(&observation.index).await;
        if let Some(report_ms) = observation.report_ms {
            let confirmed = self
                .confirm_recent(&mut observation.index, report_ms, today, &dependent)
                .await?;
            report(ReconcileProgress::Phase(
                "confirm",
                format!("{confirmed} recent or hot objects confirmed against the lake"),
            ))
            .await;
        }
        let dependent_partitions: usize = dependent.iter().map(|(_, d)| d.len()).sum();
        report(ReconcileProgress::Phase(
            "expand",
            format!(
                "{} sources, {dependent_partitions} partitions from parent objects",
                self.catalog.sources.len()
            ),
        ))
        .await;

        // Committed state is enough: applying the plan re-checks each
        // partition against the store.
        let view = self.readers.with(crate::store::queue_view).await?;
        let catalog = self.catalog.clone();
        let index = observation.index;
        let observed_objects = index.present() as u64;
        // Planning streams the gaps that need a task to the scheduler in
        // chunks as it finds them: neither side ever holds them all, and
        // the scheduler keeps dispatching between chunks.
        let (chunks, mut planned) = mpsc::channel::<Vec<PlannedTask>>(APPLY_CHUNKS_IN_FLIGHT);
        let planning = tokio::task::spawn_blocking(move || {
            let mut chunk = Vec::with_capacity(APPLY_CHUNK);
            let mut needing = 0u64;
            let plan = plan_catalog_into(
                &catalog,
                today,
                &dependent,
                &index,
                &view,
                now,
                Box::new(|gap: Gap| {
                    if !gap.needs_task {
                        return;
                    }
                    needing += 1;
                    chunk.push(planned_task(&catalog, gap, today));
                    if chunk.len() >= APPLY_CHUNK {
                        // A closed channel means the apply side gave up; the
                        // plan's numbers are still wanted.
                        let _ = chunks.blocking_send(std::mem::take(&mut chunk));
                    }
                }),
            );
            if !chunk.is_empty() {
                let _ = chunks.blocking_send(chunk);
            }
            (plan, needing)
        });
        let mut created = 0;
        let mut applied = Ok(());
        while let Some(chunk) = planned.recv().await {
            match self.scheduler.apply_plan(chunk, observed_at).await {
                Ok(n) => created += n,
                Err(e) => {
                    applied = Err(e);
                    break;
                }
            }
        }
        drop(planned);
        let (plan, needing) = planning
            .await
            .map_err(|e| Error::Internal(format!("planning panicked: {e}")))?;
        applied?;
        let total = plan.total();
        report(ReconcileProgress::Phase(
            "plan",
            format!(
                "{} expected objects, {} partitions with gaps, {needing} need a task",
                total.expected, plan.gap_count,
            ),
        ))
        .await;
        report(ReconcileProgress::Phase(
            "apply",
            format!("{created} tasks created or reopened"),
        ))
        .await;

        let coverage = CoverageReport {
            sources: self
                .catalog
                .sources
                .iter()
                .zip(&plan.coverage)
                .map(|(s, c)| (s.name.clone(), s.priority, *c))
                .collect(),
            total,
            computed_at: now_ms(),
            evidence: observation.evidence,
        };
        let summary = ReconcileSummary {
            expected_objects: total.expected,
            observed_objects,
            gaps: plan.gap_count,
            tasks_created: created,
            duration: started.elapsed(),
            coverage: total,
        };
        self.metrics
            .reconciled(summary.duration, summary.gaps, summary.tasks_created);
        info!(
            expected = total.expected,
            observed = observed_objects,
            gaps = summary.gaps,
            created,
            percent = total.percent(),
            evidence = %coverage.evidence,
            "reconciled"
        );
        self.scheduler.log(
            Event::info(format!(
                "reconciled: {} expected, {} present ({:.1}%), {} gaps, {created} tasks queued (evidence: {})",
                total.expected,
                total.present,
                total.percent(),
                summary.gaps,
                coverage.evidence
            ))
            .row(),
        );
        Ok((summary, coverage))
    }

    /// Observes the lake: from the newest inventory report when one is
    /// configured and usable, by listing otherwise.
    async fn observe(&self) -> Result<Observation> {
        let prefixes = self.catalog.prefixes();
        if let Some(inv) = &self.inventory {
            match self.observe_report(inv, &prefixes).await {
                Ok(observation) => return Ok(observation),
                Err(e) => {
                    warn!(error = %e, "inventory report unusable; listing the lake instead");
                    self.scheduler.log(
                        Event::warn(format!(
                            "inventory report unusable, listing the lake instead: {e}"
                        ))
                        .row(),
                    );
                }
            }
        }
        let mut index = ObservedIndex::default();
        list_into(&self.lake, &prefixes, &mut index).await?;
        Ok(Observation {
            index,
            evidence: "listing".into(),
            report_ms: None,
        })
    }

    async fn observe_report(
        &self,
        inv: &InventorySource,
        prefixes: &[String],
    ) -> Result<Observation> {
        let report = inventory::latest_report(inv.store.as_ref(), &inv.config, &inv.source_bucket)
            .await
            .map_err(|e| Error::Internal(e.to_string()))?;
        let (tx, rx) = mpsc::channel(PAGES_IN_FLIGHT);
        let store = inv.store.clone();
        let lake_prefix = inv.lake_prefix.clone();
        let wanted = prefixes.to_vec();
        let reading = {
            let report = report.clone();
            async move {
                inventory::read_report(store, &report, &lake_prefix, &wanted, tx)
                    .await
                    .map_err(|e| Error::Internal(e.to_string()))
            }
        };
        let mut index = ObservedIndex::default();
        let (read, ()) = tokio::join!(reading, fold_pages(rx, &mut index));
        read?;
        let created = chrono::DateTime::from_timestamp_millis(report.created_ms)
            .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
            .unwrap_or_default();
        Ok(Observation {
            index,
            evidence: format!("inventory report of {created} ({})", report.dir),
            report_ms: Some(report.created_ms),
        })
    }

    /// After an inventory report: re-lists hot sources and confirms the
    /// expected objects of partitions dated near or after the report one by
    /// one, so what changed since the report is seen. Returns how many
    /// objects were confirmed.
    async fn confirm_recent(
        &self,
        index: &mut ObservedIndex,
        report_ms: UnixMs,
        today: NaiveDate,
        dependent: &[(usize, Vec<ExpectedPartition>)],
    ) -> Result<usize> {
        let cutoff = chrono::DateTime::from_timestamp_millis(report_ms)
            .map_or(today, |t| t.date_naive())
            - chrono::Duration::days(REPORT_MARGIN_DAYS);
        // Hot sources: list their prefixes afresh.
        let hot: Vec<String> = self
            .catalog
            .sources
            .iter()
            .filter(|s| s.hot)
            .flat_map(|s| s.objects.iter().map(|t| t.literal_prefix().to_string()))
            .collect();
        let mut confirmed = 0;
        if !hot.is_empty() {
            let stale: Vec<String> = index
                .iter()
                .filter(|(k, _)| hot.iter().any(|p| k.starts_with(p.as_str())))
                .map(|(k, _)| k.to_string())
                .collect();
            for key in &stale {
                index.remove(key);
            }
            confirmed += list_into(&self.lake, &hot, index).await?;
        }
        // Recent partitions: every expected key, confirmed by a stat.
        let mut keys = Vec::new();
        for source in &self.catalog.sources {
            if source.hot || source.dependency().is_some() {
                continue;
            }
            let generators: Vec<(String, Vec<Value>)> = source
                .generators
                .iter()
                .map(|g| {
                    let values = g
                        .values(today)
                        .into_iter()
                        .filter(|v| !matches!(v, Value::Date(d) if *d < cutoff))
                        .collect();
                    (g.var().to_string(), values)
                })
                .collect();
            if !generators
                .iter()
                .flat_map(|(_, vs)| vs)
                .any(|v| matches!(v, Value::Date(_)))
            {
                continue;
            }
            for_each_product(&generators, |p| {
                if keys.len() < MAX_CONFIRMED {
                    keys.extend(source.keys(p).unwrap_or_default());
                }
            });
        }
        for (source, partitions) in dependent {
            if self.catalog.sources[*source].hot {
                continue;
            }
            for exp in partitions {
                if exp.partition.date().is_some_and(|d| d >= cutoff) && keys.len() < MAX_CONFIRMED {
                    keys.extend(exp.keys.iter().cloned());
                }
            }
        }
        if keys.len() >= MAX_CONFIRMED {
            warn!(
                limit = MAX_CONFIRMED,
                "too many recent objects to confirm one by one; the rest wait for the next report"
            );
        }
        for chunk in keys.chunks(CONFIRM_CONCURRENCY) {
            let mut stats = JoinSet::new();
            for key in chunk {
                let lake = self.lake.clone();
                let key = key.clone();
                stats.spawn(async move {
                    let meta = lake.stat(&key).await;
                    (key, meta)
                });
            }
            while let Some(joined) = stats.join_next().await {
                let (key, meta) =
                    joined.map_err(|e| Error::Internal(format!("confirmation panicked: {e}")))?;
                match meta? {
                    Some(meta) => {
                        index.insert(
                            &key,
                            ObservedObject {
                                size: meta.size,
                                modified_ms: meta.modified_ms,
                            },
                        );
                    }
                    None => index.remove(&key),
                }
                confirmed += 1;
            }
        }
        Ok(confirmed)
    }

    /// Partitions of every dependent source, from the values inside their
    /// parent objects. Unreadable parents and rejected values are logged.
    async fn expand_dependent(
        &mut self,
        index: &ObservedIndex,
    ) -> Vec<(usize, Vec<ExpectedPartition>)> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (idx, source) in self.catalog.sources.iter().enumerate() {
            let Some(dep) = source.dependency() else {
                continue;
            };
            let prefix = dep.template().literal_prefix();
            let mut matches: Vec<(String, ObservedObject, Partition)> = index
                .iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .filter_map(|(k, o)| dep.match_parent(k).map(|p| (k.to_string(), o, p)))
                .collect();
            matches.sort_by(|a, b| a.0.cmp(&b.0));
            let mut parents = Vec::with_capacity(matches.len());
            for (key, object, parent_vars) in matches {
                seen.insert(key.clone());
                let cached = self
                    .parents
                    .get(&key)
                    .filter(|e| e.size == object.size && e.modified_ms == object.modified_ms)
                    .map(|e| e.values.clone());
                let values = match cached {
                    Some(values) => values,
                    None => {
                        let values = Arc::new(self.read_parent(&source.name, &key, dep).await);
                        self.parents.insert(
                            key.clone(),
                            ParentEntry {
                                size: object.size,
                                modified_ms: object.modified_ms,
                                values: values.clone(),
                            },
                        );
                        values
                    }
                };
                parents.push((parent_vars, values.as_ref().clone()));
            }
            out.push((idx, self.catalog.expand_dependent(idx, &parents)));
        }
        // Forget parents that are gone.
        self.parents.retain(|k, _| seen.contains(k));
        out
    }

    /// Reads one parent object and extracts its values; problems are logged
    /// with the parent's key and yield no values.
    async fn read_parent(
        &self,
        source: &str,
        key: &str,
        dep: &crate::catalog::FromObjects,
    ) -> Vec<String> {
        let bytes = match self.lake.get(key, dep.max_bytes()).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Vec::new(),
            Err(e) => {
                self.scheduler.log(
                    Event::warn(format!("parent object {key} unreadable: {e}"))
                        .source(source)
                        .row(),
                );
                return Vec::new();
            }
        };
        let extracted = dep.extract(&bytes);
        if let Some(error) = &extracted.error {
            self.scheduler.log(
                Event::warn(format!("parent object {key}: {error}"))
                    .source(source)
                    .row(),
            );
        }
        for rejected in &extracted.rejected {
            warn!(source, parent = key, value = %rejected.excerpt, reason = %rejected.reason, "value rejected");
            self.scheduler.log(
                Event::warn(format!(
                    "value {} in parent object {key} rejected: {}",
                    rejected.excerpt, rejected.reason
                ))
                .source(source)
                .row(),
            );
        }
        extracted.values
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
        let generators: Vec<(String, Vec<Value>)> = source
            .generators
            .iter()
            .map(|g| (g.var().to_string(), g.values(today)))
            .collect();
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
fn planned_task(catalog: &Catalog, gap: Gap, today: NaiveDate) -> PlannedTask {
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

/// Lists `prefixes` in parallel into `index`; returns how many objects were listed.
pub async fn list_into(
    lake: &SharedLake,
    prefixes: &[String],
    index: &mut ObservedIndex,
) -> Result<usize> {
    let (tx, rx) = mpsc::channel(PAGES_IN_FLIGHT);
    let mut listings = JoinSet::new();
    for prefix in prefixes {
        let lake = lake.clone();
        let prefix = prefix.clone();
        let pages: PageSink = tx.clone();
        listings.spawn(async move { lake.list(&prefix, pages).await });
    }
    drop(tx);
    fold_pages(rx, index).await;
    let mut listed = 0;
    while let Some(listing) = listings.join_next().await {
        listed += listing.map_err(|e| Error::Internal(format!("lake listing panicked: {e}")))??;
    }
    Ok(usize::try_from(listed).unwrap_or(usize::MAX))
}

/// Folds listing pages into `index` until the channel closes.
pub async fn fold_pages(
    mut pages: mpsc::Receiver<Vec<crate::lake::ObjectMeta>>,
    index: &mut ObservedIndex,
) {
    while let Some(page) = pages.recv().await {
        index.insert_many(page.iter().map(|meta| {
            (
                meta.key.as_str(),
                ObservedObject {
                    size: meta.size,
                    modified_ms: meta.modified_ms,
                },
            )
        }));
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::config::Config;
    use crate::reconcile::{Expected, QueueEntry, plan};

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
            prop_assert_eq!(lazily.gap_count, eagerly.gap_count);
        }
    }
}
