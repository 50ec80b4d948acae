//! Reconciliation: what SHOULD exist (the catalog) against what the lake HAS,
//! every gap turned into a planned task. [`Reconciler::run`] observes the lake
//! (`observe.rs`), expands dependent sources from their parent objects
//! (`dependent.rs`), reads the queue view from the store, and feeds every
//! expected partition to the pure planner ([`plan`]) on a blocking thread,
//! streaming the planned tasks to the scheduler in chunks while planning
//! runs: neither side ever holds them all.
//!
//! Layers inside: [`observed`] (the index) and [`plan`] are pure and sit low
//! in the server's module order (the store and metrics use their types);
//! this module, `observe` and `dependent` do the I/O.

mod dependent;
pub mod live;
mod observe;
pub mod observed;
pub mod plan;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::info;

use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::lake::SharedLake;
use crate::logs::Event;
use crate::metrics::Metrics;
use crate::model::{Priority, UnixMs, now_ms};
use crate::scheduler::Handle;
use crate::store::Readers;
use dependent::ParentEntry;
use live::LiveCoverage;
pub use observe::{InventorySource, fold_pages, list_into};
use plan::{Coverage, Gap, PlannedTask, plan_catalog_into, planned_task};

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
    /// Per source (like `sources`), the first missing keys in expansion
    /// order, at most `plan::MISSING_SAMPLE`.
    pub missing: Vec<Vec<String>>,
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

/// Gathers inputs, plans and applies. Owned by the loop; one runs at a time.
#[derive(Debug)]
pub struct Reconciler {
    catalog: Arc<Catalog>,
    lake: SharedLake,
    scheduler: Handle,
    /// Where the queue is read for planning.
    readers: Arc<Readers>,
    inventory: Option<InventorySource>,
    parents: HashMap<String, ParentEntry>,
    metrics: Metrics,
    live: LiveCoverage,
}

impl Reconciler {
    /// A reconciler over `catalog` and `lake`, reading `inventory` reports
    /// when given, and the queue through `readers`.
    pub fn new(
        catalog: Arc<Catalog>,
        lake: SharedLake,
        scheduler: Handle,
        readers: Arc<Readers>,
        inventory: Option<InventorySource>,
        metrics: Metrics,
    ) -> Self {
        Reconciler {
            catalog,
            lake,
            scheduler,
            readers,
            inventory,
            parents: HashMap::new(),
            metrics,
            live: LiveCoverage::default(),
        }
    }

    /// The coverage this reconciler installs after each run, which uploads
    /// move in between.
    pub fn live(&self) -> LiveCoverage {
        self.live.clone()
    }

    /// Runs one reconcile, reporting each phase through `report`; its
    /// coverage is installed in [`Reconciler::live`].
    pub async fn run<F, Fut>(&mut self, report: &F) -> Result<ReconcileSummary>
    where
        F: Fn(ReconcileProgress) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        self.live.observing();
        let result = self.run_observed(report).await;
        if result.is_err() {
            self.live.abandon();
        }
        result
    }

    async fn run_observed<F, Fut>(&mut self, report: &F) -> Result<ReconcileSummary>
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
        if let Some(shared) = plan::shared_key(&self.catalog, today, &dependent) {
            let message = format!("config error: {shared}");
            self.scheduler.log(Event::error(message.clone()).row());
            return Err(Error::InvalidArgument(message));
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
                    chunk.push(planned_task(&catalog, &gap, today));
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
            (plan, needing, index)
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
        let (plan, needing, index) = planning
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
            missing: plan.missing,
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
        self.live.install(coverage, Some(&index));
        Ok(summary)
    }
}
