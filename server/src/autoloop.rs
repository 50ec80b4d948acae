//! The autonomous loop. It reconciles at start and every
//! `reconcile_interval`; it starts a dispatch cycle when the ready backlog
//! reaches `dispatch_threshold`, ends it when the queue drains (or
//! `max_cycle_runtime` passes) and reconciles again to confirm. Pause and
//! resume take effect at once. Reconciles run one at a time, here.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::logs::Event;
use crate::model::{UnixMs, now_ms};
use crate::reconcile::Reconciler;
use crate::reconcile::live::LiveCoverage;
pub use crate::reconcile::{CoverageReport, ReconcileProgress, ReconcileSummary};
use crate::scheduler::Handle;

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
    /// Tasks done in the current cycle.
    pub cycle_done: u64,
    /// Attempts failed in the current cycle.
    pub cycle_failed: u64,
    /// When the current cycle reaches `max_cycle_runtime` (0: no cycle).
    pub cycle_deadline: UnixMs,
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
    coverage: LiveCoverage,
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

    /// Coverage: the last reconcile's, moved by the uploads since.
    pub fn coverage(&self) -> Arc<CoverageReport> {
        self.coverage.snapshot().0
    }

    /// The live coverage itself, for the gateway to move.
    pub fn live_coverage(&self) -> LiveCoverage {
        self.coverage.clone()
    }

    /// The coverage and when an upload last moved it since the last
    /// reconcile (0: none did), read together.
    pub fn coverage_with_update(&self) -> (Arc<CoverageReport>, UnixMs) {
        self.coverage.snapshot()
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
        let _ = self.scheduler.set_dispatch(false);
        self.status_tx.send_modify(|s| s.paused = true);
        self.scheduler
            .log(Event::info("loop paused: no new work is handed out").row());
        self.status()
    }

    /// Stops the loop: no new work; with `now`, running tasks are cancelled
    /// and queued again.
    pub async fn stop(&self, now: bool) -> Result<LoopStatus> {
        let status = self.pause();
        if now {
            self.scheduler
                .stop_running("the loop was stopped with --now".into())
                .await?;
        }
        Ok(status)
    }

    /// Restarts the loop: stops handing out work, reconciles, starts again.
    pub async fn restart(&self) -> Result<LoopStatus> {
        self.pause();
        let mut progress = self.reconcile().await?;
        while let Some(event) = progress.recv().await {
            match event {
                ReconcileProgress::Done(_) => break,
                ReconcileProgress::Failed(e) => {
                    return Err(Error::Internal(format!(
                        "restart: reconcile failed, the loop stays stopped: {e}"
                    )));
                }
                ReconcileProgress::Phase(..) => {}
            }
        }
        self.scheduler.log(Event::info("loop restarted").row());
        Ok(self.resume())
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
    reconciler: Reconciler,
    scheduler: Handle,
    shutdown: CancellationToken,
) -> (LoopHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(16);
    let (status_tx, status) = watch::channel(LoopStatus {
        enabled: opts.enabled,
        ..LoopStatus::default()
    });
    let coverage = reconciler.live();
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
        reconciler,
        scheduler,
        status: status_tx,
        paused,
        cycle_started: None,
        cycle_base: (0, 0),
    };
    let join = tokio::spawn(task.run(rx, shutdown));
    (handle, join)
}

struct Loop {
    opts: LoopOptions,
    reconciler: Reconciler,
    scheduler: Handle,
    status: Arc<watch::Sender<LoopStatus>>,
    paused: Arc<AtomicBool>,
    cycle_started: Option<Instant>,
    /// Done and failed totals when the current cycle started.
    cycle_base: (u64, u64),
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
        let _ = self.scheduler.set_dispatch(false);
    }

    fn set_dispatch(&self, enabled: bool) {
        let _ = self.scheduler.set_dispatch(enabled);
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
        let Ok(stats) = self.scheduler.stats().await else {
            return;
        };
        match self.cycle_started {
            None => {
                if stats.ready >= self.opts.dispatch_threshold.max(1) {
                    self.cycle_started = Some(Instant::now());
                    self.cycle_base = (stats.done_total, stats.failed_total);
                    self.set_dispatch(true);
                    let deadline = now_ms()
                        + i64::try_from(self.opts.max_cycle_runtime.as_millis())
                            .unwrap_or(i64::MAX);
                    self.status.send_modify(|s| {
                        s.in_cycle = true;
                        s.cycle_started = now_ms();
                        s.cycle_done = 0;
                        s.cycle_failed = 0;
                        s.cycle_deadline = deadline;
                    });
                    info!(ready = stats.ready, "cycle started");
                    self.scheduler.log(
                        Event::info(format!("cycle started with {} ready tasks", stats.ready))
                            .row(),
                    );
                }
            }
            Some(started) => {
                let (done_base, failed_base) = self.cycle_base;
                self.status.send_modify(|s| {
                    s.cycle_done = stats.done_total.saturating_sub(done_base);
                    s.cycle_failed = stats.failed_total.saturating_sub(failed_base);
                });
                let drained = stats.ready == 0 && stats.leased == 0;
                let overtime = started.elapsed() >= self.opts.max_cycle_runtime;
                if !drained && !overtime {
                    // Still cycling (and not paused): dispatch stays on, also
                    // after a resume.
                    self.set_dispatch(true);
                }
                if drained || overtime {
                    self.set_dispatch(false);
                    self.cycle_started = None;
                    self.status.send_modify(|s| {
                        s.in_cycle = false;
                        s.cycle_started = 0;
                        s.cycle_deadline = 0;
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
        let result = self.reconciler.run(&report).await;
        let now = now_ms();
        let next = now + i64::try_from(self.opts.reconcile_interval.as_millis()).unwrap_or(0);
        match result {
            Ok(summary) => {
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
