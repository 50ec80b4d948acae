//! The autonomous loop and the reconciler. The loop reconciles at start and
//! every `reconcile_interval`; it starts a dispatch cycle when the ready
//! backlog reaches `dispatch_threshold`, ends it when the queue drains (or
//! `max_cycle_runtime` passes) and reconciles again to confirm. Pause and
//! resume take effect at once. `reconcile` gathers the plan's inputs (catalog
//! expansion, lake listing, queue view), runs the pure `plan` and hands the
//! resulting tasks to the scheduler.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::lake::SharedLake;
use crate::logs::Event;
use crate::model::{Priority, UnixMs, now_ms};
use crate::reconcile::{self, Coverage, Expected, Observed, ObservedObject, PlanSource};
use crate::scheduler::{Command, Handle, PlannedTask};

/// How many listing pages may wait for the reconciler at once.
const LISTING_PAGES_IN_FLIGHT: usize = 64;

/// The loop's settings (config `loop`).
#[derive(Debug, Clone)]
pub struct LoopOptions {
    /// Whether the loop runs at all; when off, dispatch is continuous and
    /// reconciles happen only on request.
    pub enabled: bool,
    /// How often to reconcile.
    pub reconcile_interval: Duration,
    /// How often to look at the queue.
    pub queue_check_interval: Duration,
    /// Ready tasks needed to start a cycle.
    pub dispatch_threshold: u64,
    /// A cycle ends (and reconciles) after this long even if work remains.
    pub max_cycle_runtime: Duration,
}

/// The loop's state, for status.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoopStatus {
    /// Whether the loop runs.
    pub enabled: bool,
    /// Paused by an operator.
    pub paused: bool,
    /// A cycle is dispatching.
    pub in_cycle: bool,
    /// When the last reconcile finished (0: never).
    pub last_reconcile: UnixMs,
    /// When the next periodic reconcile is due (0: none).
    pub next_reconcile: UnixMs,
    /// When the current cycle started (0: none).
    pub cycle_started: UnixMs,
    /// Cycles completed.
    pub cycles: u64,
}

/// Coverage per source from the last reconcile.
#[derive(Debug, Clone, Default)]
pub struct CoverageReport {
    /// `(source, priority, coverage)` in catalog order.
    pub sources: Vec<(String, Priority, Coverage)>,
    /// All sources.
    pub total: Coverage,
    /// When computed (0: never).
    pub computed_at: UnixMs,
    /// Where the evidence came from.
    pub evidence: String,
}

/// What one reconcile found and did.
#[derive(Debug, Clone, Default)]
pub struct ReconcileSummary {
    /// Objects expected.
    pub expected_objects: u64,
    /// Objects listed under the catalog's prefixes.
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

/// A reconcile progress event: `(phase, message)`, and the summary at the end.
#[derive(Debug, Clone)]
pub enum ReconcileProgress {
    /// A phase finished.
    Phase(&'static str, String),
    /// The reconcile finished.
    Done(ReconcileSummary),
    /// The reconcile failed.
    Failed(String),
}

enum LoopCommand {
    Reconcile(mpsc::Sender<ReconcileProgress>),
}

/// A cheap, cloneable handle to the loop.
#[derive(Debug, Clone)]
pub struct LoopHandle {
    tx: mpsc::Sender<LoopCommand>,
    status: watch::Receiver<LoopStatus>,
    status_tx: Arc<watch::Sender<LoopStatus>>,
    coverage: watch::Receiver<Arc<CoverageReport>>,
    paused: Arc<AtomicBool>,
    scheduler: Handle,
}

impl std::fmt::Debug for LoopCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoopCommand::Reconcile")
    }
}

impl LoopHandle {
    /// The loop's state now.
    pub fn status(&self) -> LoopStatus {
        self.status.borrow().clone()
    }

    /// Coverage from the last reconcile.
    pub fn coverage(&self) -> Arc<CoverageReport> {
        self.coverage.borrow().clone()
    }

    /// Runs a reconcile (after any that is running) and streams its progress.
    pub async fn reconcile(&self) -> Result<mpsc::Receiver<ReconcileProgress>> {
        let (tx, rx) = mpsc::channel(16);
        self.tx
            .send(LoopCommand::Reconcile(tx))
            .await
            .map_err(|_| Error::Stopped("loop"))?;
        Ok(rx)
    }

    /// Stops handing out new work; running tasks finish.
    pub fn pause(&self) -> LoopStatus {
        self.paused.store(true, Ordering::SeqCst);
        let _ = self.scheduler.send(Command::SetDispatch { enabled: false });
        self.status_tx.send_modify(|s| s.paused = true);
        self.scheduler
            .log(Event::info("loop paused: no new work is handed out").row());
        self.status()
    }

    /// Resumes handing out work at the next queue check.
    pub fn resume(&self) -> LoopStatus {
        self.paused.store(false, Ordering::SeqCst);
        self.status_tx.send_modify(|s| s.paused = false);
        self.scheduler.log(Event::info("loop resumed").row());
        self.status()
    }
}

/// Starts the loop; it stops when `shutdown` is cancelled.
pub fn spawn(
    opts: LoopOptions,
    catalog: Arc<Catalog>,
    lake: SharedLake,
    scheduler: Handle,
    evidence: String,
    shutdown: CancellationToken,
) -> (LoopHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(16);
    let (status_tx, status) = watch::channel(LoopStatus {
        enabled: opts.enabled,
        ..LoopStatus::default()
    });
    let (coverage_tx, coverage) = watch::channel(Arc::new(CoverageReport::default()));
    let status_tx = Arc::new(status_tx);
    let paused = Arc::new(AtomicBool::new(false));
    let handle = LoopHandle {
        tx,
        status,
        status_tx: status_tx.clone(),
        coverage,
        paused: paused.clone(),
        scheduler: scheduler.clone(),
    };
    let task = Loop {
        opts,
        catalog,
        lake,
        scheduler,
        evidence,
        status: status_tx,
        coverage: coverage_tx,
        paused,
        cycle_started: None,
    };
    let join = tokio::spawn(task.run(rx, shutdown));
    (handle, join)
}

struct Loop {
    opts: LoopOptions,
    catalog: Arc<Catalog>,
    lake: SharedLake,
    scheduler: Handle,
    evidence: String,
    status: Arc<watch::Sender<LoopStatus>>,
    coverage: watch::Sender<Arc<CoverageReport>>,
    paused: Arc<AtomicBool>,
    cycle_started: Option<Instant>,
}

impl Loop {
    async fn run(mut self, mut rx: mpsc::Receiver<LoopCommand>, shutdown: CancellationToken) {
        if self.opts.enabled {
            self.reconcile(None).await;
        }
        let start = tokio::time::Instant::now();
        let mut reconcile_tick = tokio::time::interval_at(
            start + self.opts.reconcile_interval,
            self.opts.reconcile_interval,
        );
        reconcile_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut check_tick = tokio::time::interval(self.opts.queue_check_interval);
        check_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                cmd = rx.recv() => match cmd {
                    Some(LoopCommand::Reconcile(progress)) => self.reconcile(Some(progress)).await,
                    None => break,
                },
                _ = reconcile_tick.tick(), if self.opts.enabled => self.reconcile(None).await,
                _ = check_tick.tick() => self.check_queue().await,
            }
        }
        let _ = self.scheduler.send(Command::SetDispatch { enabled: false });
    }

    fn set_dispatch(&self, enabled: bool) {
        let _ = self.scheduler.send(Command::SetDispatch { enabled });
    }

    async fn check_queue(&mut self) {
        if self.paused.load(Ordering::SeqCst) {
            self.set_dispatch(false);
            return;
        }
        if !self.opts.enabled {
            self.set_dispatch(true);
            return;
        }
        let Ok(stats) = self.scheduler.call(|reply| Command::Stats { reply }).await else {
            return;
        };
        match self.cycle_started {
            None => {
                if stats.ready >= self.opts.dispatch_threshold.max(1) {
                    self.cycle_started = Some(Instant::now());
                    self.set_dispatch(true);
                    self.status.send_modify(|s| {
                        s.in_cycle = true;
                        s.cycle_started = now_ms();
                    });
                    info!(ready = stats.ready, "cycle started");
                    self.scheduler.log(
                        Event::info(format!("cycle started with {} ready tasks", stats.ready))
                            .row(),
                    );
                }
            }
            Some(started) => {
                let drained = stats.ready == 0 && stats.leased == 0;
                let overtime = started.elapsed() >= self.opts.max_cycle_runtime;
                if drained || overtime {
                    self.set_dispatch(false);
                    self.cycle_started = None;
                    self.status.send_modify(|s| {
                        s.in_cycle = false;
                        s.cycle_started = 0;
                        s.cycles += 1;
                    });
                    let message = if drained {
                        format!(
                            "cycle drained after {}; reconciling to confirm",
                            humantime::format_duration(Duration::from_secs(
                                started.elapsed().as_secs()
                            ))
                        )
                    } else {
                        format!(
                            "cycle reached max_cycle_runtime with {} ready and {} running; reconciling",
                            stats.ready, stats.leased
                        )
                    };
                    info!("{message}");
                    self.scheduler.log(Event::info(message).row());
                    self.reconcile(None).await;
                }
            }
        }
    }

    async fn reconcile(&mut self, progress: Option<mpsc::Sender<ReconcileProgress>>) {
        let report = |event: ReconcileProgress| {
            let progress = progress.clone();
            async move {
                if let Some(p) = progress {
                    let _ = p.send(event).await;
                }
            }
        };
        let result = reconcile(
            &self.catalog,
            &self.lake,
            &self.scheduler,
            &self.evidence,
            &report,
        )
        .await;
        let now = now_ms();
        let next = now + i64::try_from(self.opts.reconcile_interval.as_millis()).unwrap_or(0);
        match result {
            Ok((summary, coverage)) => {
                self.coverage.send_replace(Arc::new(coverage));
                self.status.send_modify(|s| {
                    s.last_reconcile = now;
                    s.next_reconcile = if self.opts.enabled { next } else { 0 };
                });
                report(ReconcileProgress::Done(summary)).await;
            }
            Err(e) => {
                warn!(error = %e, "reconcile failed");
                self.scheduler
                    .log(Event::error(format!("reconcile failed: {e}")).row());
                report(ReconcileProgress::Failed(e.to_string())).await;
            }
        }
    }
}

/// Runs one reconcile: expand, observe, plan, apply.
async fn reconcile<F, Fut>(
    catalog: &Arc<Catalog>,
    lake: &SharedLake,
    scheduler: &Handle,
    evidence: &str,
    report: &F,
) -> Result<(ReconcileSummary, CoverageReport)>
where
    F: Fn(ReconcileProgress) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let started = Instant::now();
    let today = chrono::Utc::now().date_naive();
    let expand_catalog = catalog.clone();
    let expected: Vec<Expected> = tokio::task::spawn_blocking(move || {
        expand_catalog
            .expand(today)
            .into_iter()
            .map(|e| Expected {
                source: e.source,
                partition: e.partition,
                keys: e.keys,
            })
            .collect()
    })
    .await
    .map_err(|e| Error::Internal(format!("catalog expansion panicked: {e}")))?;
    let expected_objects: u64 = expected.iter().map(|e| e.keys.len() as u64).sum();
    report(ReconcileProgress::Phase(
        "expand",
        format!(
            "{} partitions, {expected_objects} objects expected",
            expected.len()
        ),
    ))
    .await;

    let observed_at = now_ms();
    let mut observed = Observed::new();
    let (pages_tx, mut pages) = mpsc::channel(LISTING_PAGES_IN_FLIGHT);
    let mut listings = JoinSet::new();
    for prefix in catalog.prefixes() {
        let lake = lake.clone();
        let pages_tx = pages_tx.clone();
        listings.spawn(async move { lake.list(&prefix, pages_tx).await });
    }
    drop(pages_tx);
    // Pages are folded in as they arrive; the channel closes when every
    // listing has finished.
    while let Some(page) = pages.recv().await {
        for meta in page {
            observed.insert(
                meta.key,
                ObservedObject {
                    size: meta.size,
                    modified_ms: meta.modified_ms,
                },
            );
        }
    }
    while let Some(listing) = listings.join_next().await {
        listing.map_err(|e| Error::Internal(format!("lake listing panicked: {e}")))??;
    }
    let observed_objects = observed.len() as u64;
    report(ReconcileProgress::Phase(
        "observe",
        format!("{observed_objects} objects listed in the lake"),
    ))
    .await;

    let view = scheduler
        .call(|reply| Command::QueueView { reply })
        .await??;
    let sources: Vec<PlanSource> = catalog
        .sources
        .iter()
        .map(|s| PlanSource {
            name: s.name.clone(),
            scraper: s.scraper.clone(),
            priority: s.priority,
            min_bytes: s.min_bytes,
        })
        .collect();
    let (plan, sources) = tokio::task::spawn_blocking(move || {
        let plan = reconcile::plan(&sources, &expected, &observed, &view, now_ms());
        (plan, sources)
    })
    .await
    .map_err(|e| Error::Internal(format!("planning panicked: {e}")))?;
    let tasks: Vec<PlannedTask> = plan
        .upserts()
        .map(|gap| {
            let source = &sources[gap.source];
            PlannedTask {
                source: source.name.clone(),
                scraper: source.scraper.clone(),
                partition: gap.partition.clone(),
                priority: source.priority,
                reason: gap.reason,
                keys: gap.keys.clone(),
            }
        })
        .collect();
    report(ReconcileProgress::Phase(
        "plan",
        format!(
            "{} partitions with gaps, {} need a task",
            plan.gaps.len(),
            tasks.len()
        ),
    ))
    .await;

    let created = scheduler
        .call(|reply| Command::ApplyPlan {
            tasks,
            observed_at,
            reply,
        })
        .await??;
    report(ReconcileProgress::Phase(
        "apply",
        format!("{created} tasks created or reopened"),
    ))
    .await;

    let total = plan.total();
    let mut per_source: HashMap<usize, Coverage> = HashMap::new();
    for (i, c) in plan.coverage.iter().enumerate() {
        per_source.insert(i, *c);
    }
    let coverage = CoverageReport {
        sources: sources
            .iter()
            .enumerate()
            .map(|(i, s)| {
                (
                    s.name.clone(),
                    s.priority,
                    per_source.get(&i).copied().unwrap_or_default(),
                )
            })
            .collect(),
        total,
        computed_at: now_ms(),
        evidence: evidence.to_string(),
    };
    let summary = ReconcileSummary {
        expected_objects,
        observed_objects,
        gaps: plan.gaps.len() as u64,
        tasks_created: created,
        duration: started.elapsed(),
        coverage: total,
    };
    info!(
        expected = expected_objects,
        observed = observed_objects,
        gaps = summary.gaps,
        created,
        percent = total.percent(),
        "reconciled"
    );
    scheduler.log(
        Event::info(format!(
            "reconciled: {expected_objects} expected, {} present ({:.1}%), {} gaps, {created} tasks queued",
            total.present,
            total.percent(),
            summary.gaps
        ))
        .row(),
    );
    Ok((summary, coverage))
}
