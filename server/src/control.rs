//! The `Control` service adcectl talks to. Reads come from store read
//! connections and from snapshots the scheduler and the loop publish; changes
//! go through their handles. Conversions from domain rows to wire messages
//! live here.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use adce_proto::v1 as pb;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::autoloop::{LoopHandle, LoopStatus};
use crate::catalog::Catalog;
use crate::error::Error;
use crate::health::Alerts;
use crate::logs;
use crate::model::{Priority, TaskId, TaskState, now_ms};
use crate::reconcile::plan::Coverage;
use crate::reconcile::{ReconcileProgress, ReconcileSummary};
use crate::reload::Reloader;
use crate::scheduler::{AgentSnapshot, Handle, RetrySelection, WaitingNote};
use crate::store::{self, LogFilter, Readers, TaskFilter, TaskRow};

/// Missing keys listed per source when a coverage request gives no limit.
const DEFAULT_MISSING_LIMIT: usize = 100;
/// The default and largest page of ListTasks.
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;
/// Log rows read from the store per query while catching up.
const LOG_BATCH: u32 = 1000;
/// Disconnected agents seen within this long are listed.
const RECENT_AGENTS_MS: i64 = 24 * 3600 * 1000;

/// The control service: cheap handles to the components it reads and steers.
#[derive(Debug, Clone)]
pub struct ControlService {
    /// The scheduler (queue, agents, catalog).
    pub scheduler: Handle,
    /// Read connections to the store.
    pub readers: Arc<Readers>,
    /// The autonomous loop.
    pub loop_handle: LoopHandle,
    /// The lake's description for status.
    pub lake: String,
    /// Config reloads.
    pub reloader: Reloader,
    /// `loop.aging`, to explain effective priorities.
    pub aging: Duration,
    /// The active health alerts.
    pub alerts: Alerts,
    /// Ends followed log streams at shutdown.
    pub shutdown: CancellationToken,
}

fn coverage_pb(c: &Coverage) -> pb::CoverageSummary {
    pb::CoverageSummary {
        expected: c.expected,
        present: c.present,
        missing: c.missing,
        too_small: c.too_small,
        percent: c.percent(),
        stale: c.stale,
    }
}

fn loop_pb(s: &LoopStatus) -> pb::LoopState {
    pb::LoopState {
        enabled: s.enabled,
        paused: s.paused,
        in_cycle: s.in_cycle,
        last_reconcile_unix_ms: s.last_reconcile,
        next_reconcile_unix_ms: s.next_reconcile,
        cycle_started_unix_ms: s.cycle_started,
        cycles: s.cycles,
        cycle_done: s.cycle_done,
        cycle_failed: s.cycle_failed,
        cycle_deadline_unix_ms: s.cycle_deadline,
    }
}

fn agent_pb(a: &AgentSnapshot) -> pb::AgentInfo {
    pb::AgentInfo {
        id: a.id.0.clone(),
        hostname: a.hostname.clone(),
        labels: a.labels.clone().into_iter().collect(),
        slots: a.slots,
        running_tasks: a.running.iter().map(|t| t.0).collect(),
        version: a.version.clone(),
        connected: true,
        last_seen_unix_ms: a.last_seen,
        connected_unix_ms: a.connected_at,
        address: a.address.clone(),
    }
}

/// The effective priority of a task and why it has it.
fn explain_priority(row: &TaskRow, catalog: &Catalog, aging: Duration) -> (Priority, String) {
    let today = chrono::Utc::now().date_naive();
    let rule = catalog
        .source(&row.source)
        .map(|s| s.priority_rules.base_for(&row.partition, today))
        .filter(|(priority, _)| *priority == row.priority)
        .map_or_else(
            || "set when queued".to_string(),
            |(_, reason)| reason.to_string(),
        );
    if row.state != TaskState::Pending {
        return (row.priority, rule);
    }
    let (effective, explanation) =
        crate::priority::effective(row.priority, row.ready_at, now_ms(), aging);
    (effective, format!("{rule}; {explanation}"))
}

fn task_pb(
    row: &TaskRow,
    progress: &HashMap<TaskId, f64>,
    catalog: &Catalog,
    aging: Duration,
) -> pb::TaskSummary {
    let (effective, reason) = explain_priority(row, catalog, aging);
    pb::TaskSummary {
        effective_priority: pb::Priority::from(effective) as i32,
        priority_reason: reason,
        id: row.id.0,
        source: row.source.clone(),
        partition: row.partition.to_pb(),
        state: pb::TaskState::from(row.state) as i32,
        priority: pb::Priority::from(row.priority) as i32,
        attempts: row.attempts,
        reason: pb::GapReason::from(row.reason) as i32,
        last_error: row.last_error.clone(),
        agent_id: row
            .lease
            .as_ref()
            .map(|(_, a)| a.0.clone())
            .unwrap_or_default(),
        created_unix_ms: row.created_at,
        updated_unix_ms: row.updated_at,
        ready_unix_ms: row.ready_at,
        partition_key: row.partition.key(),
        progress: progress.get(&row.id).copied().unwrap_or(0.0),
    }
}

fn waiting_pb(n: &WaitingNote) -> pb::WaitingNote {
    pb::WaitingNote {
        scraper: n.scraper.clone(),
        reason: n.reason.clone(),
        ready: n.ready,
        since_unix_ms: n.since,
    }
}

fn summary_pb(s: &ReconcileSummary) -> pb::ReconcileSummary {
    pb::ReconcileSummary {
        expected_objects: s.expected_objects,
        observed_objects: s.observed_objects,
        gaps: s.gaps,
        tasks_created: s.tasks_created,
        duration_ms: u64::try_from(s.duration.as_millis()).unwrap_or(u64::MAX),
        coverage: Some(coverage_pb(&s.coverage)),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl pb::control_server::Control for ControlService {
    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        let counts = self.readers.with(store::task_counts).await?;
        let backlog = self.readers.with(store::backlog_by_source).await?;
        let report = self.scheduler.report().await?;
        let agents = self.scheduler.agents().await?;
        let tasks = TaskState::ALL
            .into_iter()
            .map(|state| {
                let mut by_priority = HashMap::new();
                for p in Priority::ALL {
                    by_priority.insert(p.as_str().to_string(), 0);
                }
                let mut total = 0;
                for (s, p, n) in &counts {
                    if *s == state {
                        total += n;
                        *by_priority.entry(p.as_str().to_string()).or_default() += n;
                    }
                }
                pb::StateCount {
                    state: pb::TaskState::from(state) as i32,
                    total,
                    by_priority,
                }
            })
            .collect();
        let (coverage, coverage_updated_unix_ms) = self.loop_handle.coverage_with_update();
        Ok(Response::new(pb::StatusReply {
            version: env!("CARGO_PKG_VERSION").into(),
            r#loop: Some(loop_pb(&self.loop_handle.status())),
            coverage: Some(coverage_pb(&coverage.total)),
            coverage_updated_unix_ms,
            tasks,
            agents: agents.iter().map(agent_pb).collect(),
            ready: report.stats.ready,
            lake: self.lake.clone(),
            waiting: report.waiting.iter().map(waiting_pb).collect(),
            backlog_by_source: backlog.into_iter().collect(),
            alerts: self
                .alerts
                .active()
                .into_iter()
                .map(|a| pb::Alert {
                    component: a.component.into(),
                    message: a.message,
                    since_unix_ms: a.since,
                })
                .collect(),
        }))
    }

    async fn list_tasks(
        &self,
        request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksReply>, Status> {
        let req = request.into_inner();
        let before_id = if req.page_token.is_empty() {
            None
        } else {
            Some(req.page_token.parse::<i64>().map_err(|_| {
                Status::invalid_argument(format!("invalid page token {:?}", req.page_token))
            })?)
        };
        let limit = match req.page_size {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let filter = TaskFilter {
            state: TaskState::from_pb(req.state()),
            priority: Priority::from_pb(req.priority()),
            source: (!req.source.is_empty()).then_some(req.source),
            before_id,
            limit,
        };
        let (rows, total) = self
            .readers
            .with(move |conn| store::list_tasks(conn, &filter))
            .await?;
        let progress = self.scheduler.progress_map().await?;
        let catalog = self.scheduler.catalog();
        let next_page_token = if rows.len() == limit as usize {
            rows.last().map(|r| r.id.0.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        let report = self.scheduler.report().await?;
        Ok(Response::new(pb::ListTasksReply {
            tasks: rows
                .iter()
                .map(|r| task_pb(r, &progress, &catalog, self.aging))
                .collect(),
            next_page_token,
            total,
            waiting: report.waiting.iter().map(waiting_pb).collect(),
        }))
    }

    async fn get_task(
        &self,
        request: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::TaskDetail>, Status> {
        let id = TaskId(request.into_inner().id);
        let (row, attempts) = self
            .readers
            .with(move |conn| {
                let row = store::get_task(conn, id)?
                    .ok_or_else(|| Error::NotFound(format!("task {id} does not exist")))?;
                Ok((row, store::attempts(conn, id)?))
            })
            .await?;
        let progress = self.scheduler.progress_map().await?;
        Ok(Response::new(pb::TaskDetail {
            task: Some(task_pb(
                &row,
                &progress,
                &self.scheduler.catalog(),
                self.aging,
            )),
            attempts: attempts
                .into_iter()
                .map(|a| pb::Attempt {
                    number: a.number,
                    lease_id: a.lease_id,
                    agent_id: a.agent_id,
                    started_unix_ms: a.started_at,
                    ended_unix_ms: a.ended_at.unwrap_or(0),
                    exit_code: a.exit_code.unwrap_or(0),
                    outcome: a.outcome,
                    error: a.error,
                })
                .collect(),
            expected_keys: row.expected_keys.clone(),
            scraper: row.scraper.clone(),
        }))
    }

    async fn list_agents(
        &self,
        _request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsReply>, Status> {
        let connected = self.scheduler.agents().await?;
        let since = now_ms() - RECENT_AGENTS_MS;
        let recent = self
            .readers
            .with(move |conn| store::recent_agents(conn, since))
            .await?;
        let ids: HashSet<_> = connected.iter().map(|a| a.id.clone()).collect();
        let mut agents: Vec<pb::AgentInfo> = connected.iter().map(agent_pb).collect();
        agents.extend(
            recent
                .into_iter()
                .filter(|a| !ids.contains(&a.id))
                .map(|a| pb::AgentInfo {
                    id: a.id.0,
                    hostname: a.hostname,
                    labels: a.labels.into_iter().collect(),
                    slots: a.slots,
                    running_tasks: Vec::new(),
                    version: a.version,
                    connected: false,
                    last_seen_unix_ms: a.last_seen,
                    connected_unix_ms: a.connected_at,
                    address: a.address,
                }),
        );
        Ok(Response::new(pb::ListAgentsReply { agents }))
    }

    async fn coverage(
        &self,
        request: Request<pb::CoverageRequest>,
    ) -> Result<Response<pb::CoverageReply>, Status> {
        let request = request.into_inner();
        let only = request.source;
        let limit = match request.limit {
            0 => DEFAULT_MISSING_LIMIT,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        if !only.is_empty() && self.scheduler.catalog().source(&only).is_none() {
            return Err(Status::not_found(format!(
                "source {only} is not in the catalog"
            )));
        }
        let (report, updated_unix_ms) = self.loop_handle.coverage_with_update();
        let mut total = Coverage::default();
        let sources = report
            .sources
            .iter()
            .enumerate()
            .filter(|(_, (name, _, _))| only.is_empty() || *name == only)
            .map(|(i, (name, priority, c))| {
                total.add(c);
                let missing_keys = match report.missing.get(i) {
                    Some(keys) if request.missing => keys.iter().take(limit).cloned().collect(),
                    _ => Vec::new(),
                };
                pb::SourceCoverage {
                    source: name.clone(),
                    coverage: Some(coverage_pb(c)),
                    priority: pb::Priority::from(*priority) as i32,
                    missing_keys,
                }
            })
            .collect();
        Ok(Response::new(pb::CoverageReply {
            sources,
            total: Some(coverage_pb(&total)),
            computed_unix_ms: report.computed_at,
            evidence: report.evidence.clone(),
            updated_unix_ms,
        }))
    }

    type ReconcileStream = BoxStream<pb::ReconcileEvent>;

    async fn reconcile(
        &self,
        _request: Request<pb::ReconcileRequest>,
    ) -> Result<Response<Self::ReconcileStream>, Status> {
        let mut progress = self.loop_handle.reconcile().await?;
        let stream = async_stream(move |tx| async move {
            while let Some(event) = progress.recv().await {
                let (message, last) = match event {
                    ReconcileProgress::Phase(phase, message) => (
                        Ok(pb::ReconcileEvent {
                            phase: phase.into(),
                            message,
                            summary: None,
                        }),
                        false,
                    ),
                    ReconcileProgress::Done(summary) => (
                        Ok(pb::ReconcileEvent {
                            phase: "done".into(),
                            message: format!(
                                "{} tasks queued, coverage {:.1}%",
                                summary.tasks_created,
                                summary.coverage.percent()
                            ),
                            summary: Some(summary_pb(&summary)),
                        }),
                        true,
                    ),
                    ReconcileProgress::Failed(e) => (
                        Err(Status::internal(format!("reconcile failed: {e}"))),
                        true,
                    ),
                };
                if tx.send(message).await.is_err() || last {
                    break;
                }
            }
        });
        Ok(Response::new(stream))
    }

    type LogsStream = BoxStream<pb::LogEntry>;

    async fn logs(
        &self,
        request: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let req = request.into_inner();
        let filter = LogFilter {
            task_id: req.task_id,
            agent_id: req.agent_id.clone(),
            source: req.source.clone(),
            min_level: req.min_level,
        };
        // Subscribe before reading the store so nothing falls in between.
        let mut live = self.scheduler.logs().subscribe();
        let readers = self.readers.clone();
        let shutdown = self.shutdown.clone();
        let stream = async_stream(move |tx| async move {
            let mut last = req.since_seq;
            if last == 0 && req.tail > 0 {
                let f = filter.clone();
                let tail = req.tail;
                match readers.with(move |c| store::log_tail(c, &f, tail)).await {
                    Ok(rows) => {
                        for row in rows {
                            last = row.seq;
                            if tx.send(Ok(logs::to_pb(&row))).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                }
            }
            if last == 0 {
                // No resume point and no matching tail: only what comes next.
                last = readers
                    .with(|c| store::log_tail(c, &LogFilter::default(), 1))
                    .await
                    .ok()
                    .and_then(|rows| rows.last().map(|r| r.seq))
                    .unwrap_or(0);
            }
            // Catch up from the store (resume, or rows committed meanwhile).
            loop {
                let f = filter.clone();
                let since = last;
                let rows = match readers
                    .with(move |c| store::logs_after(c, &f, since, LOG_BATCH))
                    .await
                {
                    Ok(rows) => rows,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                let n = rows.len();
                for row in rows {
                    last = row.seq;
                    if tx.send(Ok(logs::to_pb(&row))).await.is_err() {
                        return;
                    }
                }
                if n < LOG_BATCH as usize {
                    break;
                }
            }
            if !req.follow {
                return;
            }
            loop {
                let row = tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tx.closed() => return,
                    row = live.recv() => row,
                };
                match row {
                    Ok(row) => {
                        if row.seq <= last || !filter.matches(&row) {
                            continue;
                        }
                        last = row.seq;
                        if tx.send(Ok(logs::to_pb(&row))).await.is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        // Fell behind the bus: read what was missed from the store.
                        let f = filter.clone();
                        let since = last;
                        if let Ok(rows) = readers
                            .with(move |c| store::logs_after(c, &f, since, u32::MAX))
                            .await
                        {
                            for row in rows {
                                last = row.seq;
                                if tx.send(Ok(logs::to_pb(&row))).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn pause(
        &self,
        _request: Request<pb::PauseRequest>,
    ) -> Result<Response<pb::LoopReply>, Status> {
        let status = self.loop_handle.pause();
        Ok(Response::new(pb::LoopReply {
            r#loop: Some(loop_pb(&status)),
        }))
    }

    async fn resume(
        &self,
        _request: Request<pb::ResumeRequest>,
    ) -> Result<Response<pb::LoopReply>, Status> {
        let status = self.loop_handle.resume();
        Ok(Response::new(pb::LoopReply {
            r#loop: Some(loop_pb(&status)),
        }))
    }

    async fn start(
        &self,
        _request: Request<pb::StartRequest>,
    ) -> Result<Response<pb::LoopReply>, Status> {
        let status = self.loop_handle.resume();
        Ok(Response::new(pb::LoopReply {
            r#loop: Some(loop_pb(&status)),
        }))
    }

    async fn stop(
        &self,
        request: Request<pb::StopRequest>,
    ) -> Result<Response<pb::LoopReply>, Status> {
        let status = self.loop_handle.stop(request.into_inner().now).await?;
        Ok(Response::new(pb::LoopReply {
            r#loop: Some(loop_pb(&status)),
        }))
    }

    async fn restart(
        &self,
        _request: Request<pb::RestartRequest>,
    ) -> Result<Response<pb::LoopReply>, Status> {
        let status = self.loop_handle.restart().await?;
        Ok(Response::new(pb::LoopReply {
            r#loop: Some(loop_pb(&status)),
        }))
    }

    async fn retry(
        &self,
        request: Request<pb::RetryRequest>,
    ) -> Result<Response<pb::RetryReply>, Status> {
        let req = request.into_inner();
        let which = if !req.task_ids.is_empty() {
            if req.task_ids.len() > MAX_RETRY_IDS {
                return Err(Status::invalid_argument(format!(
                    "at most {MAX_RETRY_IDS} task ids per retry"
                )));
            }
            RetrySelection::Ids(req.task_ids.iter().map(|id| TaskId(*id)).collect())
        } else {
            let state = TaskState::from_pb(req.state()).ok_or_else(|| {
                Status::invalid_argument("name task ids, or a state (dead, cancelled, unavailable)")
            })?;
            if !req.source.is_empty() && self.scheduler.catalog().source(&req.source).is_none() {
                return Err(Status::not_found(format!(
                    "source {} is not in the catalog",
                    req.source
                )));
            }
            RetrySelection::State(state, (!req.source.is_empty()).then_some(req.source))
        };
        let (retried, skipped) = self.scheduler.retry(which).await?;
        Ok(Response::new(pb::RetryReply {
            retried: retried.iter().map(|id| id.0).collect(),
            skipped,
        }))
    }

    async fn reload(
        &self,
        _request: Request<pb::ReloadRequest>,
    ) -> Result<Response<pb::ReloadReply>, Status> {
        let outcome = self.reloader.reload().await?;
        Ok(Response::new(pb::ReloadReply {
            message: outcome.message,
            needs_restart: outcome.needs_restart,
        }))
    }

    async fn drain_agent(
        &self,
        request: Request<pb::DrainAgentRequest>,
    ) -> Result<Response<pb::DrainAgentReply>, Status> {
        let agent_id = request.into_inner().agent_id;
        let running = self
            .scheduler
            .drain_agent(crate::model::AgentId(agent_id.clone()))
            .await?;
        Ok(Response::new(pb::DrainAgentReply {
            agent_id,
            running_tasks: running.iter().map(|t| t.0).collect(),
        }))
    }

    async fn cancel(
        &self,
        request: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelReply>, Status> {
        let req = request.into_inner();
        let reason: String = req.reason.chars().take(500).collect();
        let previous = self.scheduler.cancel(TaskId(req.task_id), reason).await?;
        Ok(Response::new(pb::CancelReply {
            task_id: req.task_id,
            previous_state: pb::TaskState::from(previous) as i32,
        }))
    }
}

/// The most task ids one retry request may name.
const MAX_RETRY_IDS: usize = 10_000;

/// A response stream fed by a task that sends into a bounded channel; the
/// task stops when the client goes away.
fn async_stream<T, F, Fut>(produce: F) -> BoxStream<T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(produce(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
