//! The scheduler actor's state and its command handling. See the module docs
//! of `scheduler` for the batching and commit discipline.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use adce_proto::v1 as pb;
use pb::server_message::Kind as Out;
use rusqlite::{Connection, Transaction};
use tracing::{debug, error, info, warn};

use super::queue::ReadyQueue;
use super::{
    AdmissionLimits, AgentEvent, AgentSnapshot, AgentTx, CatalogCell, Command, Handle, LeaseInfo,
    ObjectCheck, PlannedTask, QueueReport, QueueStats, RetrySelection, SchedulerOptions,
    WaitingNote,
};
use crate::catalog::{ArgPiece, Catalog, RenderContext};
use crate::error::{Error, Result};
use crate::limits::{LimitGroups, Permit};
use crate::logs::{Event, LogBus};
use crate::model::{AgentId, LeaseId, Partition, Priority, TaskId, TaskState, UnixMs, now_ms};
use crate::reconcile::{QueueEntry, QueueView};
use crate::store::{self, AttemptEnd, LogRow, NewTask};

/// How often leases are checked for expiry and delayed tasks promoted.
const TICK: Duration = Duration::from_millis(200);
/// The most commands applied in one transaction.
const MAX_BATCH: usize = 2048;
/// The exit code for data that does not exist yet (EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: i32 = 69;
/// The exit code for a transient failure or throttling (EX_TEMPFAIL).
const EXIT_TEMPFAIL: i32 = 75;
/// At most this many log lines are kept from one LogLines message.
const MAX_LINES_PER_MESSAGE: usize = 1000;
/// Log lines longer than this are cut.
const MAX_LINE_BYTES: usize = 8 * 1024;
/// One task's output is kept at this many lines a second on average...
const LINES_PER_SECOND: f64 = 200.0;
/// ...with bursts of this many; lines beyond are dropped and counted.
const LINE_BURST: f64 = 2000.0;
/// How often old log entries are pruned.
const LOG_PRUNE_EVERY_MS: i64 = 60_000;

/// A lease's output budget: tokens refill at `LINES_PER_SECOND`.
#[derive(Debug, Clone, Copy)]
struct LineBudget {
    tokens: f64,
    at: UnixMs,
    dropped: u64,
    reported_at: UnixMs,
}

/// A pending or leased task.
#[derive(Debug)]
struct Active {
    id: TaskId,
    source: Arc<str>,
    scraper: Arc<str>,
    partition: Partition,
    keys: Vec<String>,
    priority: Priority,
    attempts: u32,
    ready_at: UnixMs,
    lease: Option<Lease>,
    progress: f64,
}

#[derive(Debug, Clone)]
struct Lease {
    id: LeaseId,
    agent: AgentId,
    deadline: UnixMs,
}

/// A connected agent.
#[derive(Debug)]
struct Agent {
    conn_id: u64,
    hostname: String,
    labels: BTreeMap<String, String>,
    slots: u32,
    version: String,
    address: String,
    connected_at: UnixMs,
    last_seen: UnixMs,
    tx: AgentTx,
    running: BTreeSet<LeaseId>,
    eligible: Vec<Arc<str>>,
    /// Finishing its tasks; gets no new ones.
    draining: bool,
}

/// What a finished lease means for its task.
#[derive(Debug)]
enum Verdict {
    Done,
    Unavailable,
    /// The agent did not start the task; the attempt does not count.
    Refused(String),
    Failed {
        outcome: &'static str,
        error: String,
    },
}

/// Work to do after the batch's transaction has committed, in order.
#[derive(Default)]
struct Effects {
    after: Vec<Box<dyn FnOnce() + Send>>,
    logs: Vec<Arc<LogRow>>,
}

impl Effects {
    fn then(&mut self, f: impl FnOnce() + Send + 'static) {
        self.after.push(Box::new(f));
    }

    fn reply<T: Send + 'static>(&mut self, tx: tokio::sync::oneshot::Sender<T>, value: T) {
        self.then(move || {
            let _ = tx.send(value);
        });
    }

    fn send(&mut self, tx: &AgentTx, kind: Out) {
        let tx = tx.clone();
        self.then(move || {
            let _ = tx.send(Ok(pb::ServerMessage { kind: Some(kind) }));
        });
    }

    /// Ends an agent's stream with `status` (nothing sent after it arrives).
    fn fail(&mut self, tx: &AgentTx, status: tonic::Status) {
        let tx = tx.clone();
        self.then(move || {
            let _ = tx.send(Err(status));
        });
    }
}

struct State {
    catalog: Arc<Catalog>,
    opts: SchedulerOptions,
    tasks: HashMap<TaskId, Active>,
    by_partition: HashMap<(Arc<str>, String), TaskId>,
    leases: HashMap<LeaseId, TaskId>,
    queue: ReadyQueue,
    agents: BTreeMap<AgentId, Agent>,
    names: HashMap<String, Arc<str>>,
    dispatch_enabled: bool,
    rr: usize,
    limits: LimitGroups,
    permits: HashMap<LeaseId, Permit>,
    /// Scrapers with ready tasks and no eligible connected agent: since when,
    /// and whether that was logged.
    unroutable: HashMap<Arc<str>, (UnixMs, bool)>,
    /// Where readers find the catalog in force.
    cell: Option<CatalogCell>,
    /// Tasks done and attempts failed since start, for cycle numbers.
    done_total: u64,
    failed_total: u64,
    /// Output budget per running lease.
    line_budgets: HashMap<LeaseId, LineBudget>,
    /// When log entries were last pruned.
    pruned_at: UnixMs,
    /// How long log entries are kept.
    retention: crate::config::LogRetention,
    /// The server announced its stop, with this notice: nothing is assigned
    /// any more, and agents that connect from now on get the notice too.
    stopping: Option<pb::ServerStopping>,
}

/// Loads the queue from the store and starts the scheduler thread.
pub fn spawn(
    conn: Connection,
    catalog: Arc<Catalog>,
    opts: SchedulerOptions,
    logs: LogBus,
) -> Result<(Handle, std::thread::JoinHandle<Result<()>>)> {
    let mut state = State {
        catalog: catalog.clone(),
        opts,
        tasks: HashMap::new(),
        by_partition: HashMap::new(),
        leases: HashMap::new(),
        queue: ReadyQueue::default(),
        agents: BTreeMap::new(),
        names: HashMap::new(),
        dispatch_enabled: false,
        rr: 0,
        limits: LimitGroups::new(&catalog.limits, now_ms()),
        permits: HashMap::new(),
        unroutable: HashMap::new(),
        cell: None,
        done_total: 0,
        failed_total: 0,
        line_budgets: HashMap::new(),
        pruned_at: 0,
        retention: crate::config::LogRetention::default(),
        stopping: None,
    };
    let now = now_ms();
    let rows = store::load_active(&conn)?;
    let (mut pending, mut leased) = (0u64, 0u64);
    for row in rows {
        let source = state.intern(&row.source);
        let scraper = state.intern(&row.scraper);
        // A restarted server gives every lease a fresh deadline so its agent
        // has time to reconnect and re-attach it.
        let lease = row.lease.map(|(id, agent)| Lease {
            id,
            agent,
            deadline: now + state.lease_ttl_ms(),
        });
        match &lease {
            Some(l) => {
                state.leases.insert(l.id.clone(), row.id);
                // Running tasks keep counting against their limit groups.
                let groups = state.scraper_groups(&scraper);
                let permit = state.limits.reattach(&groups);
                state.permits.insert(l.id.clone(), permit);
                leased += 1;
            }
            None => {
                state
                    .queue
                    .insert(&scraper, row.priority, row.ready_at, row.id, now);
                pending += 1;
            }
        }
        state
            .by_partition
            .insert((source.clone(), row.partition.key()), row.id);
        state.tasks.insert(
            row.id,
            Active {
                id: row.id,
                source,
                scraper,
                partition: row.partition,
                keys: row.expected_keys,
                priority: row.priority,
                attempts: row.attempts,
                ready_at: row.ready_at,
                lease,
                progress: 0.0,
            },
        );
    }
    info!(pending, leased, "scheduler loaded the queue");
    let (tx, rx) = mpsc::channel();
    let cell = CatalogCell::new(catalog);
    state.cell = Some(cell.clone());
    let handle = Handle {
        tx,
        logs: logs.clone(),
        catalog: cell,
    };
    let thread = std::thread::Builder::new()
        .name("adce-scheduler".into())
        .spawn(move || run(conn, state, logs, rx))
        .map_err(|e| Error::Internal(format!("cannot start scheduler thread: {e}")))?;
    Ok((handle, thread))
}

fn run(
    mut conn: Connection,
    mut state: State,
    logs: LogBus,
    rx: mpsc::Receiver<Command>,
) -> Result<()> {
    let mut next_tick = Instant::now();
    loop {
        let wait = next_tick.saturating_duration_since(Instant::now());
        let mut batch = Vec::new();
        match rx.recv_timeout(wait) {
            Ok(cmd) => batch.push(cmd),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        let mut fx = Effects::default();
        let mut stop = None;
        let txn = conn.transaction()?;
        for cmd in batch {
            if let Command::Shutdown { reply } = cmd {
                stop = Some(reply);
                continue;
            }
            state.handle(&txn, &mut fx, cmd)?;
        }
        if Instant::now() >= next_tick {
            state.tick(&txn, &mut fx)?;
            next_tick = Instant::now() + TICK;
        }
        if stop.is_none() {
            state.dispatch(&txn, &mut fx)?;
        }
        txn.commit()
            .inspect_err(|e| error!(error = %e, "store commit failed"))?;
        for row in fx.logs {
            logs.publish(row);
        }
        for f in fx.after {
            f();
        }
        if let Some(reply) = stop {
            let _ = reply.send(());
            return Ok(());
        }
    }
}

impl State {
    fn intern(&mut self, name: &str) -> Arc<str> {
        self.names
            .entry(name.to_string())
            .or_insert_with(|| Arc::from(name))
            .clone()
    }

    /// The limit groups a scraper belongs to.
    fn scraper_groups(&self, scraper: &str) -> Vec<String> {
        self.catalog
            .scrapers
            .get(scraper)
            .map(|s| s.limits.clone())
            .unwrap_or_default()
    }

    fn lease_ttl_ms(&self) -> i64 {
        i64::try_from(self.opts.lease_ttl.as_millis()).unwrap_or(i64::MAX)
    }

    fn log(&self, tx: &Transaction<'_>, fx: &mut Effects, row: LogRow) -> Result<()> {
        let mut row = row;
        row.seq = store::insert_log(tx, &row)?;
        fx.logs.push(Arc::new(row));
        Ok(())
    }

    fn handle(&mut self, tx: &Transaction<'_>, fx: &mut Effects, cmd: Command) -> Result<()> {
        match cmd {
            Command::Connect {
                hello,
                address,
                conn_id,
                tx: agent_tx,
                limits,
                reply,
            } => {
                let result = self
                    .admit(tx, fx, &hello, limits)
                    .and_then(|()| self.connect(tx, fx, hello, address, conn_id, agent_tx));
                match result {
                    Ok(()) => fx.reply(reply, Ok(())),
                    Err(Error::Store(e)) => return Err(Error::Store(e)),
                    Err(e) => fx.reply(reply, Err(e)),
                }
            }
            Command::Disconnect { agent, conn_id } => self.disconnect(tx, fx, &agent, conn_id)?,
            Command::CutOff {
                agent,
                conn_id,
                status,
            } => self.cut_off(tx, fx, &agent, conn_id, status)?,
            Command::FromAgent { agent, event } => self.on_agent_event(tx, fx, &agent, event)?,
            Command::LeaseInfo {
                lease,
                agent,
                reply,
            } => {
                let info = self.lease_info(&lease, agent.as_ref());
                fx.reply(reply, info);
            }
            Command::RecordUpload {
                lease,
                key,
                size,
                sha256,
                reply,
            } => {
                let result = match self.lease_info(&lease, None) {
                    Ok(info) => {
                        store::insert_upload(
                            tx,
                            info.task_id,
                            info.attempt,
                            &lease,
                            &key,
                            size,
                            &sha256,
                            now_ms(),
                        )?;
                        let agent = self.tasks[&info.task_id]
                            .lease
                            .as_ref()
                            .map(|l| l.agent.0.clone())
                            .unwrap_or_default();
                        self.log(
                            tx,
                            fx,
                            Event::new(
                                pb::LogLevel::Debug,
                                format!("uploaded {key} ({size} bytes)"),
                            )
                            .task(info.task_id)
                            .agent(agent)
                            .source(info.source)
                            .row(),
                        )?;
                        Ok(())
                    }
                    Err(e) => Err(e),
                };
                fx.reply(reply, result);
            }
            Command::Complete {
                agent,
                result,
                check,
                reply,
            } => {
                let outcome = self.complete(tx, fx, &agent, result, check);
                match outcome {
                    Err(Error::Store(e)) => return Err(Error::Store(e)),
                    other => fx.reply(reply, other),
                }
            }
            Command::ApplyPlan {
                tasks,
                observed_at,
                reply,
            } => {
                let created = self.apply_plan(tx, fx, &tasks, observed_at)?;
                fx.reply(reply, Ok(created));
            }
            Command::QueueView { reply } => {
                let view = self.queue_view(tx);
                match view {
                    Err(Error::Store(e)) => return Err(Error::Store(e)),
                    other => fx.reply(reply, other),
                }
            }
            Command::SetDispatch { enabled } => {
                if self.dispatch_enabled != enabled {
                    debug!(enabled, "dispatch switched");
                }
                self.dispatch_enabled = enabled;
            }
            Command::AnnounceStop { reason, grace } => self.announce_stop(tx, fx, reason, grace)?,
            Command::SetLogRetention(retention) => {
                self.retention = retention;
                // Prune by the new rule at the next tick.
                self.pruned_at = 0;
            }
            Command::Stats { reply } => {
                let stats = self.stats();
                fx.reply(reply, stats);
            }
            Command::Report { reply } => {
                let report = QueueReport {
                    stats: self.stats(),
                    waiting: self.waiting(now_ms()),
                    oldest_ready: self.queue.oldest_ready(),
                };
                fx.reply(reply, report);
            }
            Command::Agents { reply } => {
                let agents = self.agent_snapshots();
                fx.reply(reply, agents);
            }
            Command::Progress { reply } => {
                let progress = self
                    .tasks
                    .values()
                    .filter(|t| t.lease.is_some())
                    .map(|t| (t.id, t.progress))
                    .collect();
                fx.reply(reply, progress);
            }
            Command::Retry { which, reply } => {
                let result = self.retry(tx, fx, which);
                match result {
                    Err(Error::Store(e)) => return Err(Error::Store(e)),
                    other => fx.reply(reply, other),
                }
            }
            Command::Cancel { id, reason, reply } => {
                let result = self.cancel(tx, fx, id, &reason);
                match result {
                    Err(Error::Store(e)) => return Err(Error::Store(e)),
                    other => fx.reply(reply, other),
                }
            }
            Command::Reload { catalog, reply } => {
                self.reload(tx, fx, catalog)?;
                fx.reply(reply, ());
            }
            Command::Limits { reply } => {
                let snapshot = self.limits.snapshot(now_ms());
                fx.reply(reply, snapshot);
            }
            Command::StopRunning { reason, reply } => {
                let stopped = self.stop_running(tx, fx, &reason)?;
                fx.reply(reply, Ok(stopped));
            }
            Command::DrainAgent { agent, reply } => {
                let result = match self.agents.get_mut(&agent) {
                    Some(a) => {
                        a.draining = true;
                        fx.send(
                            &a.tx,
                            Out::Drain(pb::Drain {
                                reason: "drained by an operator".into(),
                            }),
                        );
                        let running: Vec<TaskId> = a
                            .running
                            .iter()
                            .filter_map(|l| self.leases.get(l).copied())
                            .collect();
                        self.log(
                            tx,
                            fx,
                            Event::info(format!(
                                "agent told to drain by an operator ({} running tasks)",
                                running.len()
                            ))
                            .agent(agent.0.clone())
                            .row(),
                        )?;
                        Ok(running)
                    }
                    None => Err(Error::NotFound(format!("agent {agent} is not connected"))),
                };
                fx.reply(reply, result);
            }
            Command::Log(row) => self.log(tx, fx, row)?,
            Command::Shutdown { reply } => fx.reply(reply, ()),
        }
        Ok(())
    }

    fn stats(&self) -> QueueStats {
        QueueStats {
            ready: self.queue.ready_len() as u64,
            delayed: self.queue.delayed_len() as u64,
            leased: self.leases.len() as u64,
            dispatching: self.dispatch_enabled,
            done_total: self.done_total,
            failed_total: self.failed_total,
        }
    }

    /// Why no connected agent may run `scraper`'s tasks.
    fn unroutable_reason(&self, scraper: &str) -> String {
        if self.agents.is_empty() {
            return "no agent connected".into();
        }
        let requires = self
            .catalog
            .scrapers
            .get(scraper)
            .map(|s| {
                s.requires
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        if requires.is_empty() {
            "no connected agent runs this scraper".into()
        } else {
            format!("no agent with {requires}")
        }
    }

    /// Scrapers whose ready tasks have had no eligible agent for longer than
    /// `no_agent_after`.
    fn waiting(&self, now: UnixMs) -> Vec<WaitingNote> {
        let after = i64::try_from(self.opts.no_agent_after.as_millis()).unwrap_or(i64::MAX);
        let mut notes: Vec<WaitingNote> = self
            .queue
            .ready_by_scraper()
            .filter(|(_, ready)| *ready > 0)
            .filter_map(|(scraper, ready)| {
                let (since, _) = self.unroutable.get(scraper)?;
                (now - since >= after).then(|| WaitingNote {
                    scraper: scraper.to_string(),
                    reason: self.unroutable_reason(scraper),
                    ready: ready as u64,
                    since: *since,
                })
            })
            .collect();
        notes.sort_by(|a, b| a.scraper.cmp(&b.scraper));
        notes
    }

    /// Tracks scrapers whose ready tasks no connected agent may run, and logs
    /// each once it has waited `no_agent_after`.
    fn track_unroutable(
        &mut self,
        tx: &Transaction<'_>,
        fx: &mut Effects,
        now: UnixMs,
    ) -> Result<()> {
        let stuck: Vec<Arc<str>> = self
            .queue
            .ready_by_scraper()
            .filter(|(_, ready)| *ready > 0)
            .map(|(s, _)| s.clone())
            .filter(|s| !self.agents.values().any(|a| a.eligible.contains(s)))
            .collect();
        self.unroutable.retain(|s, _| stuck.contains(s));
        for scraper in stuck {
            self.unroutable.entry(scraper).or_insert((now, false));
        }
        let after = i64::try_from(self.opts.no_agent_after.as_millis()).unwrap_or(i64::MAX);
        let due: Vec<Arc<str>> = self
            .unroutable
            .iter()
            .filter(|(_, (since, logged))| !logged && now - since >= after)
            .map(|(s, _)| s.clone())
            .collect();
        for scraper in due {
            let note = self
                .waiting(now)
                .into_iter()
                .find(|n| *n.scraper == *scraper);
            if let Some(note) = note {
                self.log(
                    tx,
                    fx,
                    Event::warn(format!(
                        "waiting: {} ready tasks of scraper {}: {}",
                        note.ready, note.scraper, note.reason
                    ))
                    .row(),
                )?;
            }
            if let Some(entry) = self.unroutable.get_mut(&scraper) {
                entry.1 = true;
            }
        }
        Ok(())
    }

    fn agent_snapshots(&self) -> Vec<AgentSnapshot> {
        self.agents
            .iter()
            .map(|(id, a)| AgentSnapshot {
                id: id.clone(),
                hostname: a.hostname.clone(),
                labels: a.labels.clone(),
                slots: a.slots,
                version: a.version.clone(),
                address: a.address.clone(),
                connected_at: a.connected_at,
                last_seen: a.last_seen,
                running: a
                    .running
                    .iter()
                    .filter_map(|l| self.leases.get(l).copied())
                    .collect(),
            })
            .collect()
    }

    /// Whether an agent that said `hello` may connect: a valid id, a slot
    /// count within the cap, no live connection under the same id, and room
    /// under `max_agents` unless it is already connected (a reconnect after
    /// its earlier stream went quiet replaces that stream).
    fn admit(
        &mut self,
        tx: &Transaction<'_>,
        fx: &mut Effects,
        hello: &pb::Hello,
        limits: AdmissionLimits,
    ) -> Result<()> {
        if hello.agent_id.is_empty()
            || hello.agent_id.len() > 128
            || hello.agent_id.chars().any(char::is_control)
        {
            return Err(Error::InvalidArgument(
                "agent id must be 1 to 128 printable characters".into(),
            ));
        }
        if hello.slots == 0 || hello.slots > limits.max_slots {
            return Err(Error::InvalidArgument(format!(
                "slots must be between 1 and {} (server.max_slots_per_agent), got {}",
                limits.max_slots, hello.slots
            )));
        }
        let id = AgentId(hello.agent_id.clone());
        // A second process with the same id must not take over a live one
        // (they would push each other off in turn); a reconnect after the
        // old stream went quiet (half-open) replaces it.
        if let Some(existing) = self.agents.get(&id) {
            let quiet_ms = now_ms() - existing.last_seen;
            let grace_ms =
                2 * i64::try_from(self.opts.heartbeat_interval.as_millis()).unwrap_or(i64::MAX / 2);
            if quiet_ms < grace_ms {
                let address = existing.address.clone();
                warn!(agent = %id, %address, "agent refused: its id is connected and active");
                self.log(
                    tx,
                    fx,
                    Event::warn(format!(
                        "agent refused: id {id} is already connected from {address} and active; give each agent its own --id"
                    ))
                    .agent(id.0.clone())
                    .row(),
                )?;
                return Err(Error::AlreadyExists(format!(
                    "agent id {id} is already connected from {address} (active {quiet_ms} ms ago); give each agent its own --id"
                )));
            }
        }
        if !self.agents.contains_key(&id) && self.agents.len() >= limits.max_agents as usize {
            warn!(agent = %id, max_agents = limits.max_agents, "agent refused: too many agents");
            self.log(
                tx,
                fx,
                Event::warn(format!(
                    "agent refused: {} agents are connected, the most server.max_agents allows",
                    self.agents.len()
                ))
                .agent(id.0.clone())
                .row(),
            )?;
            return Err(Error::TooLarge(format!(
                "agent {id} refused: the server already has {} connected agents (server.max_agents is {})",
                self.agents.len(),
                limits.max_agents
            )));
        }
        Ok(())
    }

    fn connect(
        &mut self,
        tx: &Transaction<'_>,
        fx: &mut Effects,
        hello: pb::Hello,
        address: String,
        conn_id: u64,
        agent_tx: AgentTx,
    ) -> Result<()> {
        let now = now_ms();
        let id = AgentId(hello.agent_id.clone());
        let labels: BTreeMap<String, String> = hello.labels.clone().into_iter().collect();
        let eligible = self.eligible_scrapers(&labels);
        let replaced = self.agents.remove(&id).is_some();
        let mut agent = Agent {
            conn_id,
            hostname: hello.hostname.clone(),
            labels: hello.labels.clone().into_iter().collect(),
            slots: hello.slots,
            version: hello.version.clone(),
            address: address.clone(),
            connected_at: now,
            last_seen: now,
            tx: agent_tx,
            running: BTreeSet::new(),
            eligible,
            draining: false,
        };
        fx.send(
            &agent.tx,
            Out::Welcome(pb::Welcome {
                agent_id: id.0.clone(),
                heartbeat_interval_ms: u64::try_from(self.opts.heartbeat_interval.as_millis())
                    .unwrap_or(u64::MAX),
                lease_ttl_ms: u64::try_from(self.opts.lease_ttl.as_millis()).unwrap_or(u64::MAX),
                server_version: env!("CARGO_PKG_VERSION").into(),
            }),
        );
        if let Some(notice) = &self.stopping {
            fx.send(&agent.tx, Out::Stopping(notice.clone()));
        }
        // Re-attach the leases the agent still runs; cancel the ones that are
        // no longer live.
        let claimed: BTreeSet<LeaseId> = hello
            .running_leases
            .iter()
            .map(|l| LeaseId(l.clone()))
            .collect();
        let mut reattached = 0;
        for lease in &claimed {
            let live = self
                .leases
                .get(lease)
                .and_then(|task| self.tasks.get_mut(task))
                .and_then(|t| t.lease.as_mut())
                .filter(|l| l.agent == id);
            match live {
                Some(l) => {
                    l.deadline = now + i64::try_from(self.opts.lease_ttl.as_millis()).unwrap_or(0);
                    agent.running.insert(lease.clone());
                    reattached += 1;
                }
                None => fx.send(
                    &agent.tx,
                    Out::Cancel(pb::Cancel {
                        lease_id: lease.0.clone(),
                        reason: "lease is no longer live".into(),
                    }),
                ),
            }
        }
        // Leases the server thinks this agent holds but it does not run were
        // lost with its previous process.
        let lost: Vec<TaskId> = self
            .tasks
            .values()
            .filter(|t| {
                t.lease
                    .as_ref()
                    .is_some_and(|l| l.agent == id && !claimed.contains(&l.id))
            })
            .map(|t| t.id)
            .collect();
        store::upsert_agent(
            tx,
            &store::AgentRow {
                id: id.clone(),
                hostname: agent.hostname.clone(),
                labels: agent.labels.clone(),
                slots: agent.slots,
                version: agent.version.clone(),
                address,
                connected_at: now,
                last_seen: now,
            },
        )?;
        info!(agent = %id, slots = agent.slots, reattached, lost = lost.len(), replaced, "agent connected");
        self.log(
            tx,
            fx,
            Event::info(format!(
                "agent connected from {} with {} slots{}",
                agent.address,
                agent.slots,
                if reattached > 0 {
                    format!(", re-attached {reattached} running tasks")
                } else {
                    String::new()
                }
            ))
            .agent(id.0.clone())
            .row(),
        )?;
        self.agents.insert(id.clone(), agent);
        for task in lost {
            self.finish_lease(
                tx,
                fx,
                task,
                None,
                Verdict::Failed {
                    outcome: "lost",
                    error: format!("agent {id} restarted and no longer runs the task"),
                },
            )?;
        }
        Ok(())
    }

    fn disconnect(
        &mut self,
        tx: &Transaction<'_>,
        fx: &mut Effects,
        id: &AgentId,
        conn_id: u64,
    ) -> Result<()> {
        if self.agents.get(id).is_none_or(|a| a.conn_id != conn_id) {
            return Ok(());
        }
        let agent = self.agents.remove(id);
        let running = agent.map_or(0, |a| a.running.len());
        let now = now_ms();
        store::touch_agent(tx, id, now)?;
        info!(agent = %id, running, "agent disconnected");
        self.log(
            tx,
            fx,
            Event::info(format!(
                "agent disconnected with {running} running tasks (their leases expire unless it reconnects)"
            ))
            .agent(id.0.clone())
            .row(),
        )
    }

    /// Ends an agent's stream from the server's side with `status`; its
    /// leases stay and expire unless it reconnects, like a lost agent's.
    fn cut_off(
        &mut self,
        tx: &Transaction<'_>,
        fx: &mut Effects,
        id: &AgentId,
        conn_id: u64,
        status: tonic::Status,
    ) -> Result<()> {
        let Some(agent) = self.agents.get(id).filter(|a| a.conn_id == conn_id) else {
            return Ok(());
        };
        error!(agent = %id, code = ?status.code(), reason = status.message(), "agent cut off");
        fx.fail(&agent.tx, status.clone());
        let running = agent.running.len();
        self.log(
            tx,
            fx,
            Event::error(format!(
                "agent {id} cut off: {}; its {running} running tasks expire unless it reconnects",
                status.message()
            ))
            .agent(id.0.clone())
            .row(),
        )?;
        self.disconnect(tx, fx, id, conn_id)
    }

    /// Tells every connected agent the server is stopping, and stops
    /// assigning work for good.
    fn announce_stop(
        &mut self,
        tx: &Transaction<'_>,
        fx: &mut Effects,
        reason: String,
        grace: Duration,
    ) -> Result<()> {
        let notice = pb::ServerStopping {
            reason: reason.clone(),
            grace_ms: u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
        };
        for agent in self.agents.values() {
            fx.send(&agent.tx, Out::Stopping(notice.clone()));
        }
        self.stopping = Some(notice);
        info!(agents = self.agents.len(), %reason, ?grace, "stop announced to agents");
        self.log(
            tx,
            fx,
            Event::info(format!(
                "server stopping ({reason}): told {} agents, assigning nothing more",
                self.agents.len()
            ))
            .row(),
        )
    }

    fn on_agent_event(
        &mut self,
        tx: &Transaction<'_>,
        fx: &mut Effects,
        id: &AgentId,
        event: AgentEvent,
    ) -> Result<()> {
        let now = now_ms();
        let ttl = self.lease_ttl_ms();
        if let Some(agent) = self.agents.get_mut(id) {
            agent.last_seen = now;
        }
        match event {
            AgentEvent::Heartbeat(hb) => {
                for lease in hb.running_leases {
                    let lease = LeaseId(lease);
                    if let Some(l) = self
                        .leases
                        .get(&lease)
                        .and_then(|t| self.tasks.get_mut(t))
                        .and_then(|t| t.lease.as_mut())
                        .filter(|l| &l.agent == id)
                    {
                        l.deadline = now + ttl;
                    }
                }
                store::touch_agent(tx, id, now)?;
            }
            AgentEvent::Progress(p) => {
                if let Ok(info) = self.lease_info(&LeaseId(p.lease_id), Some(id)) {
                    if let Some(task) = self.tasks.get_mut(&info.task_id) {
                        task.progress = p.fraction.clamp(0.0, 1.0);
                    }
                }
            }
            AgentEvent::Draining(draining) => {
                let running = match self.agents.get_mut(id) {
                    Some(agent) => {
                        agent.draining = true;
                        agent.running.len()
                    }
                    None => return Ok(()),
                };
                info!(agent = %id, running, reason = %draining.reason, "agent draining");
                self.log(
                    tx,
                    fx,
                    Event::info(format!(
                        "agent draining ({}): finishing {running} running tasks, taking no new ones",
                        draining.reason
                    ))
                    .agent(id.0.clone())
                    .row(),
                )?;
            }
            AgentEvent::LogLines(lines) => {
                let info = match self.lease_info(&LeaseId(lines.lease_id.clone()), Some(id)) {
                    Ok(info) => info,
                    Err(e) => {
                        debug!(agent = %id, error = %e, "log lines for a lease that is not live dropped");
                        return Ok(());
                    }
                };
                let lease = LeaseId(lines.lease_id.clone());
                let budget = self.line_budgets.entry(lease).or_insert(LineBudget {
                    tokens: LINE_BURST,
                    at: now,
                    dropped: 0,
                    reported_at: now,
                });
                let elapsed = (now - budget.at).max(0) as f64 / 1000.0;
                budget.tokens = (budget.tokens + elapsed * LINES_PER_SECOND).min(LINE_BURST);
                budget.at = now;
                let wanted = lines.lines.len().min(MAX_LINES_PER_MESSAGE);
                let allowed = wanted.min(budget.tokens.max(0.0) as usize);
                budget.tokens -= allowed as f64;
                budget.dropped += (wanted - allowed) as u64;
                let over_rate = if budget.dropped > 0 && now - budget.reported_at >= 1000 {
                    budget.reported_at = now;
                    std::mem::take(&mut budget.dropped)
                } else {
                    0
                };
                let dropped = lines.lines.len().saturating_sub(MAX_LINES_PER_MESSAGE);
                for line in lines.lines.into_iter().take(allowed) {
                    let stream = pb::OutputStream::try_from(line.stream)
                        .unwrap_or(pb::OutputStream::Unspecified);
                    let level = if stream == pb::OutputStream::Stderr {
                        pb::LogLevel::Warn
                    } else {
                        pb::LogLevel::Info
                    };
                    let mut text = line.text;
                    if text.len() > MAX_LINE_BYTES {
                        let mut cut = MAX_LINE_BYTES;
                        while !text.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        text.truncate(cut);
                        text.push_str(" … [truncated]");
                    }
                    let row = LogRow {
                        seq: 0,
                        at: if line.unix_ms > 0 { line.unix_ms } else { now },
                        level: level as i32,
                        task_id: info.task_id.0,
                        agent_id: id.0.clone(),
                        source: info.source.clone(),
                        stream: stream as i32,
                        message: text,
                    };
                    self.log(tx, fx, row)?;
                }
                if over_rate > 0 {
                    self.log(
                        tx,
                        fx,
                        Event::warn(format!(
                            "{over_rate} output lines dropped (over {LINES_PER_SECOND} lines a second)"
                        ))
                        .task(info.task_id)
                        .agent(id.0.clone())
                        .source(info.source.clone())
                        .row(),
                    )?;
                }
                if dropped > 0 {
                    self.log(
                        tx,
                        fx,
                        Event::warn(format!(
                            "{dropped} output lines dropped (too many in one batch)"
                        ))
                        .task(info.task_id)
                        .agent(id.0.clone())
                        .source(info.source)
                        .row(),
                    )?;
                }
            }
        }
        Ok(())
    }

    fn lease_info(&self, lease: &LeaseId, agent: Option<&AgentId>) -> Result<LeaseInfo> {
        let not_live = || {
            Error::FailedPrecondition(format!(
                "lease {lease} is not live (it expired, finished or was reassigned)"
            ))
        };
        let task_id = *self.leases.get(lease).ok_or_else(not_live)?;
        let task = self.tasks.get(&task_id).ok_or_else(not_live)?;
        let held = task.lease.as_ref().ok_or_else(not_live)?;
        if let Some(agent) = agent {
            if &held.agent != agent {
                return Err(Error::FailedPrecondition(format!(
                    "lease {lease} is held by another agent"
                )));
            }
        }
        let min_bytes = self.catalog.source(&task.source).map_or(1, |s| s.min_bytes);
        Ok(LeaseInfo {
            holder: held.agent.clone(),
            task_id,
            source: task.source.to_string(),
            attempt: task.attempts,
            expected_keys: task.keys.clone(),
            min_bytes,
        })
    }

    fn complete(
        &mut self,
        tx: &Transaction<'_>,
        fx: &mut Effects,
        agent: &AgentId,
        result: pb::TaskResult,
        check: ObjectCheck,
    ) -> Result<()> {
        let lease = LeaseId(result.lease_id.clone());
        let info = match self.lease_info(&lease, Some(agent)) {
            Ok(info) => info,
            Err(e) => {
                warn!(agent = %agent, lease = %lease, "late result refused");
                self.log(
                    tx,
                    fx,
                    Event::warn(format!("result for lease {lease} refused: {e}"))
                        .agent(agent.0.clone())
                        .row(),
                )?;
                return Err(e);
            }
        };
        let outcome = pb::Outcome::try_from(result.outcome).unwrap_or(pb::Outcome::Unspecified);
        let message = result.message.trim();
        let with_message = |prefix: String| {
            if message.is_empty() {
                prefix
            } else {
                format!("{prefix}: {message}")
            }
        };
        let verdict = match outcome {
            pb::Outcome::Exited if result.exit_code == 0 => {
                if let Some(key) = check.missing.first() {
                    Verdict::Failed {
                        outcome: "failed",
                        error: format!(
                            "expected object {key} was not produced (the scraper exited 0{})",
                            if check.missing.len() > 1 {
                                format!("; {} objects missing in all", check.missing.len())
                            } else {
                                String::new()
                            }
                        ),
                    }
                } else if let Some((key, size)) = check.too_small.first() {
                    Verdict::Failed {
                        outcome: "failed",
                        error: format!(
                            "object {key} is {size} bytes, below min_bytes {}",
                            info.min_bytes
                        ),
                    }
                } else {
                    Verdict::Done
                }
            }
            pb::Outcome::Exited if result.exit_code == EXIT_UNAVAILABLE => Verdict::Unavailable,
            pb::Outcome::Exited => Verdict::Failed {
                outcome: "failed",
                error: with_message(format!("exit code {}", result.exit_code)),
            },
            pb::Outcome::TimedOut => Verdict::Failed {
                outcome: "timed_out",
                error: with_message("timed out".into()),
            },
            pb::Outcome::Cancelled => Verdict::Failed {
                outcome: "cancelled",
                error: with_message("cancelled on the agent".into()),
            },
            pb::Outcome::SpawnFailed => Verdict::Failed {
                outcome: "spawn_failed",
                error: with_message("cannot start the scraper".into()),
            },
            pb::Outcome::UploadFailed => Verdict::Failed {
                outcome: "upload_failed",
                error: with_message("upload failed".into()),
            },
            pb::Outcome::Signaled => Verdict::Failed {
                outcome: "signaled",
                error: with_message(format!("killed by signal {}", result.signal)),
            },
            pb::Outcome::Refused => Verdict::Refused(with_message("refused by the agent".into())),
            pb::Outcome::Unspecified => Verdict::Failed {
                outcome: "failed",
                error: "the agent reported no outcome".into(),
            },
        };
        let exit_code = matches!(outcome, pb::Outcome::Exited | pb::Outcome::UploadFailed)
            .then_some(result.exit_code);
        self.finish_lease(tx, fx, info.task_id, exit_code, verdict)
    }

    /// Ends the live lease of `id` with `verdict` and moves the task on.
    fn finish_lease(
        &mut self,
        tx: &Transaction<'_>,
        fx: &mut Effects,
        id: TaskId,
        exit_code: Option<i32>,
        verdict: Verdict,
    ) -> Result<()> {
        let now = now_ms();
        let Some(task) = self.tasks.get_mut(&id) else {
            return Ok(());
        };
        let Some(lease) = task.lease.take() else {
            return Ok(());
        };
        task.progress = 0.0;
        let scraper_name = task.scraper.clone();
        let source_name = task.source.clone();
        self.leases.remove(&lease.id);
        if let Some(budget) = self.line_budgets.remove(&lease.id) {
            if budget.dropped > 0 {
                self.log(
                    tx,
                    fx,
                    Event::warn(format!(
                        "{} output lines dropped (over {LINES_PER_SECOND} lines a second)",
                        budget.dropped
                    ))
                    .task(id)
                    .agent(lease.agent.0.clone())
                    .source(source_name.to_string())
                    .row(),
                )?;
            }
        }
        if let Some(permit) = self.permits.remove(&lease.id) {
            if matches!(
                verdict,
                Verdict::Refused(_)
                    | Verdict::Failed {
                        outcome: "spawn_failed",
                        ..
                    }
            ) {
                // The program never started: its start does not count.
                self.limits.refund(permit, now);
            } else {
                self.limits.release(&permit);
            }
        }
        if exit_code == Some(EXIT_TEMPFAIL) {
            let groups = self.scraper_groups(&scraper_name);
            self.limits.throttled(&groups, now);
            for group in &groups {
                self.opts.metrics.throttled(group);
            }
        }
        let Some(task) = self.tasks.get_mut(&id) else {
            return Ok(());
        };
        if let Some(agent) = self.agents.get_mut(&lease.agent) {
            agent.running.remove(&lease.id);
        }
        let attempt = task.attempts;
        let source = task.source.clone();
        let scraper = task.scraper.clone();
        let event_base = |e: Event| {
            e.task(id)
                .agent(lease.agent.0.clone())
                .source(source.to_string())
        };
        let (outcome, error) = match &verdict {
            Verdict::Done => ("succeeded", ""),
            Verdict::Unavailable => ("unavailable", ""),
            Verdict::Refused(error) => ("refused", error.as_str()),
            Verdict::Failed { outcome, error } => (*outcome, error.as_str()),
        };
        store::end_attempt(
            tx,
            &AttemptEnd {
                task: id,
                number: attempt,
                exit_code,
                outcome,
                error,
            },
            now,
        )?;
        match &verdict {
            Verdict::Done => self.done_total += 1,
            Verdict::Failed { .. } => self.failed_total += 1,
            Verdict::Unavailable | Verdict::Refused(_) => {}
        }
        let outcome_word = match &verdict {
            Verdict::Done => "done",
            Verdict::Unavailable => "unavailable",
            Verdict::Refused(_) => "refused",
            Verdict::Failed { outcome, .. } => outcome,
        };
        self.opts
            .metrics
            .task_finished(&source, outcome_word, exit_code);
        match verdict {
            Verdict::Done => {
                store::set_task_state(tx, id, TaskState::Done, now, "", now)?;
                self.forget(id);
                self.log(
                    tx,
                    fx,
                    event_base(Event::info(format!("task done (attempt {attempt})"))).row(),
                )?;
            }
            Verdict::Unavailable => {
                let recheck_after_ms = self.catalog.source(&source).map_or(
                    i64::try_from(crate::config::DEFAULT_RECHECK_AFTER.as_millis())
                        .unwrap_or(i64::MAX),
                    |s| i64::try_from(s.recheck_after.as_millis()).unwrap_or(i64::MAX),
                );
                store::set_task_state(
                    tx,
                    id,
                    TaskState::Unavailable,
                    now + recheck_after_ms,
                    "the data does not exist yet (exit 69)",
                    now,
                )?;
                self.forget(id);
                self.log(
                    tx,
                    fx,
                    event_base(Event::info(
                        "data not available yet; checking again later".to_string(),
                    ))
                    .row(),
                )?;
            }
            Verdict::Refused(error) => {
                // Nothing ran: the attempt does not count and the task is
                // offered again at once.
                let attempts = attempt.saturating_sub(1);
                store::set_task_state(tx, id, TaskState::Pending, now, &error, now)?;
                store::set_task_attempts(tx, id, attempts)?;
                if let Some(task) = self.tasks.get_mut(&id) {
                    task.attempts = attempts;
                    task.ready_at = now;
                    let (scraper, priority) = (task.scraper.clone(), task.priority);
                    self.queue.insert(&scraper, priority, now, id, now);
                }
                self.log(
                    tx,
                    fx,
                    event_base(Event::info(format!("{error}; queued again"))).row(),
                )?;
            }
            Verdict::Failed { outcome, error } => {
                let retry = self
                    .catalog
                    .scrapers
                    .get(&*scraper)
                    .map(|s| s.retry.clone());
                let max_attempts = retry.as_ref().map_or(3, |r| r.max_attempts.max(1));
                if attempt >= max_attempts {
                    store::set_task_state(tx, id, TaskState::Dead, now, &error, now)?;
                    self.forget(id);
                    self.log(
                        tx,
                        fx,
                        event_base(Event::error(format!(
                            "task dead after {attempt} attempts: {error}"
                        )))
                        .row(),
                    )?;
                } else {
                    let delay = retry.as_ref().map_or(30_000, |r| {
                        backoff_ms(
                            r.backoff,
                            r.multiplier,
                            r.max_backoff,
                            r.jitter,
                            attempt,
                            rand::random::<f64>(),
                        )
                    });
                    // A lost lease is not the task's fault: run it again at once.
                    let ready_at = if outcome == "lost" { now } else { now + delay };
                    store::set_task_state(tx, id, TaskState::Pending, ready_at, &error, now)?;
                    if let Some(task) = self.tasks.get_mut(&id) {
                        task.ready_at = ready_at;
                        let (scraper, priority) = (task.scraper.clone(), task.priority);
                        self.queue.insert(&scraper, priority, ready_at, id, now);
                    }
                    self.log(
                        tx,
                        fx,
                        event_base(Event::warn(format!(
                            "attempt {attempt} failed: {error}; retrying in {}",
                            humantime::format_duration(Duration::from_millis(
                                u64::try_from(ready_at - now).unwrap_or(0) / 1000 * 1000
                            ))
                        )))
                        .row(),
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Re-applies the sources' priority rules to every active task (rules
    /// depend on the catalog, which a reload changes, and on today's date);
    /// queued tasks whose priority changed are re-queued. Returns how many
    /// changed.
    fn reprioritize(&mut self, tx: &Transaction<'_>, now: UnixMs) -> Result<u64> {
        let today = chrono::DateTime::from_timestamp_millis(now)
            .map_or_else(|| chrono::Utc::now().date_naive(), |t| t.date_naive());
        let changes: Vec<(TaskId, Priority)> = self
            .tasks
            .values()
            .filter_map(|task| {
                let source = self.catalog.source(&task.source)?;
                let (priority, _) = source.priority_rules.base_for(&task.partition, today);
                (priority != task.priority).then_some((task.id, priority))
            })
            .collect();
        for (id, priority) in &changes {
            let Some(task) = self.tasks.get_mut(id) else {
                continue;
            };
            if task.lease.is_none() {
                self.queue
                    .remove(&task.scraper, task.priority, task.ready_at, *id);
                self.queue
                    .insert(&task.scraper, *priority, task.ready_at, *id, now);
            }
            task.priority = *priority;
            store::set_task_priority(tx, *id, *priority, now)?;
        }
        Ok(changes.len() as u64)
    }

    /// The scrapers an agent with `labels` may run.
    fn eligible_scrapers(&mut self, labels: &BTreeMap<String, String>) -> Vec<Arc<str>> {
        let names: Vec<String> = self
            .catalog
            .scrapers
            .iter()
            .filter(|(_, s)| s.requires.iter().all(|(k, v)| labels.get(k) == Some(v)))
            .map(|(name, _)| name.clone())
            .collect();
        names.iter().map(|n| self.intern(n)).collect()
    }

    /// Swaps in a reloaded catalog. Limit groups keep counting running
    /// tasks; agents' eligible scrapers are recomputed.
    fn reload(
        &mut self,
        tx: &Transaction<'_>,
        fx: &mut Effects,
        catalog: Arc<Catalog>,
    ) -> Result<()> {
        self.catalog = catalog.clone();
        self.limits.reload(&catalog.limits, now_ms());
        let ids: Vec<AgentId> = self.agents.keys().cloned().collect();
        for id in ids {
            let labels = self.agents[&id].labels.clone();
            let eligible = self.eligible_scrapers(&labels);
            if let Some(agent) = self.agents.get_mut(&id) {
                agent.eligible = eligible;
            }
        }
        if let Some(cell) = &self.cell {
            cell.set(catalog.clone());
        }
        let reprioritized = self.reprioritize(tx, now_ms())?;
        info!(
            sources = catalog.sources.len(),
            scrapers = catalog.scrapers.len(),
            limits = catalog.limits.len(),
            "catalog reloaded"
        );
        self.log(
            tx,
            fx,
            Event::info(format!(
                "config reloaded: {} sources, {} scrapers, {} limit groups; {reprioritized} queued tasks changed priority",
                catalog.sources.len(),
                catalog.scrapers.len(),
                catalog.limits.len()
            ))
            .row(),
        )
    }

    /// Puts the selected terminal tasks back in the queue.
    fn retry(
        &mut self,
        tx: &Transaction<'_>,
        fx: &mut Effects,
        which: RetrySelection,
    ) -> Result<(Vec<TaskId>, Vec<String>)> {
        let ids = match which {
            RetrySelection::Ids(ids) => ids,
            RetrySelection::State(state, source) => {
                if !matches!(
                    state,
                    TaskState::Dead | TaskState::Cancelled | TaskState::Unavailable
                ) {
                    return Err(Error::InvalidArgument(format!(
                        "only dead, cancelled or unavailable tasks can be retried, not {state}"
                    )));
                }
                store::ids_in_state(tx, state, source.as_deref())?
            }
        };
        let now = now_ms();
        let (mut retried, mut skipped) = (Vec::new(), Vec::new());
        for id in ids {
            if let Some(task) = self.tasks.get(&id) {
                let state = if task.lease.is_some() {
                    "leased"
                } else {
                    "pending"
                };
                skipped.push(format!("task {id} is {state}"));
                continue;
            }
            let Some(row) = store::retry_task(tx, id, now)? else {
                match store::get_task(tx, id)? {
                    Some(row) => skipped.push(format!("task {id} is {}", row.state)),
                    None => skipped.push(format!("task {id} does not exist")),
                }
                continue;
            };
            let source = self.intern(&row.source);
            let scraper = self.intern(&row.scraper);
            self.queue.insert(&scraper, row.priority, now, id, now);
            self.by_partition
                .insert((source.clone(), row.partition.key()), id);
            self.log(
                tx,
                fx,
                Event::info("retried by an operator")
                    .task(id)
                    .source(source.to_string())
                    .row(),
            )?;
            self.tasks.insert(
                id,
                Active {
                    id,
                    source,
                    scraper,
                    partition: row.partition,
                    keys: row.expected_keys,
                    priority: row.priority,
                    attempts: 0,
                    ready_at: now,
                    lease: None,
                    progress: 0.0,
                },
            );
            retried.push(id);
        }
        Ok((retried, skipped))
    }

    /// Ends a live lease from the server's side: forgets it, frees its limit
    /// group slot and tells its agent to kill the process group. The caller
    /// has taken it off its task and decides what becomes of the task.
    fn revoke_lease(&mut self, fx: &mut Effects, lease: &Lease, reason: &str) {
        self.leases.remove(&lease.id);
        self.line_budgets.remove(&lease.id);
        if let Some(permit) = self.permits.remove(&lease.id) {
            self.limits.release(&permit);
        }
        if let Some(agent) = self.agents.get_mut(&lease.agent) {
            agent.running.remove(&lease.id);
            fx.send(
                &agent.tx,
                Out::Cancel(pb::Cancel {
                    lease_id: lease.id.0.clone(),
                    reason: reason.to_string(),
                }),
            );
        }
    }

    /// Cancels every running task on its agent and queues it again, ready
    /// now; the attempt is recorded as cancelled and does not count toward
    /// `max_attempts`.
    fn stop_running(
        &mut self,
        tx: &Transaction<'_>,
        fx: &mut Effects,
        reason: &str,
    ) -> Result<u64> {
        let now = now_ms();
        let leased: Vec<TaskId> = self
            .tasks
            .values()
            .filter(|t| t.lease.is_some())
            .map(|t| t.id)
            .collect();
        for id in &leased {
            let Some(task) = self.tasks.get_mut(id) else {
                continue;
            };
            let Some(lease) = task.lease.take() else {
                continue;
            };
            store::end_attempt(
                tx,
                &AttemptEnd {
                    task: *id,
                    number: task.attempts,
                    exit_code: None,
                    outcome: "cancelled",
                    error: reason,
                },
                now,
            )?;
            task.attempts = task.attempts.saturating_sub(1);
            task.ready_at = now;
            task.progress = 0.0;
            let (scraper, priority, attempts) =
                (task.scraper.clone(), task.priority, task.attempts);
            self.revoke_lease(fx, &lease, reason);
            store::set_task_state(tx, *id, TaskState::Pending, now, reason, now)?;
            store::set_task_attempts(tx, *id, attempts)?;
            self.queue.insert(&scraper, priority, now, *id, now);
        }
        if !leased.is_empty() {
            self.log(
                tx,
                fx,
                Event::warn(format!(
                    "{} running tasks cancelled and queued again: {reason}",
                    leased.len()
                ))
                .row(),
            )?;
        }
        Ok(leased.len() as u64)
    }

    /// Cancels a pending or leased task; a leased one is killed on its agent.
    fn cancel(
        &mut self,
        tx: &Transaction<'_>,
        fx: &mut Effects,
        id: TaskId,
        reason: &str,
    ) -> Result<TaskState> {
        let Some(task) = self.tasks.get_mut(&id) else {
            return match store::get_task(tx, id)? {
                Some(row) => Err(Error::FailedPrecondition(format!(
                    "task {id} is {}; only pending or leased tasks can be cancelled",
                    row.state
                ))),
                None => Err(Error::NotFound(format!("task {id} does not exist"))),
            };
        };
        let now = now_ms();
        let error = if reason.is_empty() {
            "cancelled by an operator".to_string()
        } else {
            format!("cancelled by an operator: {reason}")
        };
        let previous = if task.lease.is_some() {
            TaskState::Leased
        } else {
            TaskState::Pending
        };
        let source = task.source.to_string();
        let (lease, attempts) = (task.lease.take(), task.attempts);
        if let Some(lease) = lease {
            store::end_attempt(
                tx,
                &AttemptEnd {
                    task: id,
                    number: attempts,
                    exit_code: None,
                    outcome: "cancelled",
                    error: &error,
                },
                now,
            )?;
            self.revoke_lease(fx, &lease, &error);
        }
        store::set_task_state(tx, id, TaskState::Cancelled, now, &error, now)?;
        self.forget(id);
        self.log(tx, fx, Event::warn(error).task(id).source(source).row())?;
        Ok(previous)
    }

    /// Drops a task that left the active states from memory.
    fn forget(&mut self, id: TaskId) {
        if let Some(task) = self.tasks.remove(&id) {
            self.queue
                .remove(&task.scraper, task.priority, task.ready_at, id);
            self.by_partition
                .remove(&(task.source.clone(), task.partition.key()));
        }
    }

    fn apply_plan(
        &mut self,
        tx: &Transaction<'_>,
        fx: &mut Effects,
        tasks: &[PlannedTask],
        observed_at: UnixMs,
    ) -> Result<u64> {
        let now = now_ms();
        let mut created = 0;
        for planned in tasks {
            let source = self.intern(&planned.source);
            let key = (source.clone(), planned.partition.key());
            if self.by_partition.contains_key(&key) {
                continue;
            }
            let new = NewTask {
                source: &planned.source,
                partition: &planned.partition,
                scraper: &planned.scraper,
                priority: planned.priority,
                reason: planned.reason,
                expected_keys: &planned.keys,
            };
            let Some(id) = store::upsert_task(tx, &new, now, observed_at)? else {
                continue;
            };
            let scraper = self.intern(&planned.scraper);
            self.queue.insert(&scraper, planned.priority, now, id, now);
            self.by_partition.insert(key, id);
            self.tasks.insert(
                id,
                Active {
                    id,
                    source,
                    scraper,
                    partition: planned.partition.clone(),
                    keys: planned.keys.clone(),
                    priority: planned.priority,
                    attempts: 0,
                    ready_at: now,
                    lease: None,
                    progress: 0.0,
                },
            );
            created += 1;
        }
        if created > 0 {
            self.log(
                tx,
                fx,
                Event::info(format!("reconcile queued {created} tasks")).row(),
            )?;
        }
        // Rules on recency move as days pass: re-apply them to what is queued.
        let reprioritized = self.reprioritize(tx, now)?;
        if reprioritized > 0 {
            self.log(
                tx,
                fx,
                Event::info(format!(
                    "{reprioritized} queued tasks changed priority by their source's rules"
                ))
                .row(),
            )?;
        }
        Ok(created)
    }

    fn queue_view(&self, tx: &Transaction<'_>) -> Result<QueueView> {
        let mut view = QueueView::with_capacity(self.by_partition.len());
        for (source, key) in self.by_partition.keys() {
            view.insert((source.to_string(), key.clone()), QueueEntry::Active);
        }
        for (source, key, state, ready_at) in store::blocking_terminal(tx)? {
            let entry = match state {
                TaskState::Dead => QueueEntry::Dead,
                TaskState::Cancelled => QueueEntry::Cancelled,
                TaskState::Unavailable => QueueEntry::Unavailable {
                    recheck_at: ready_at,
                },
                TaskState::Pending | TaskState::Leased | TaskState::Done => continue,
            };
            view.insert((source, key), entry);
        }
        Ok(view)
    }

    fn tick(&mut self, tx: &Transaction<'_>, fx: &mut Effects) -> Result<()> {
        let now = now_ms();
        self.queue.promote(now);
        self.track_unroutable(tx, fx, now)?;
        if now - self.pruned_at >= LOG_PRUNE_EVERY_MS {
            self.pruned_at = now;
            let max_age_ms = i64::try_from(self.retention.max_age.as_millis()).unwrap_or(i64::MAX);
            let pruned =
                store::prune_logs(tx, now.saturating_sub(max_age_ms), self.retention.max_rows)?;
            if pruned > 0 {
                debug!(pruned, "old log entries pruned");
            }
        }
        let expired: Vec<(TaskId, AgentId)> = self
            .tasks
            .values()
            .filter_map(|t| {
                t.lease
                    .as_ref()
                    .filter(|l| l.deadline < now)
                    .map(|l| (t.id, l.agent.clone()))
            })
            .collect();
        for (id, agent) in expired {
            warn!(task = %id, agent = %agent, "lease expired");
            self.finish_lease(
                tx,
                fx,
                id,
                None,
                Verdict::Failed {
                    outcome: "lost",
                    error: format!("lease expired: agent {agent} stopped heartbeating"),
                },
            )?;
        }
        Ok(())
    }

    fn dispatch(&mut self, tx: &Transaction<'_>, fx: &mut Effects) -> Result<()> {
        if !self.dispatch_enabled
            || self.stopping.is_some()
            || self.queue.ready_len() == 0
            || self.agents.is_empty()
        {
            return Ok(());
        }
        let now = now_ms();
        let ids: Vec<AgentId> = self.agents.keys().cloned().collect();
        loop {
            let mut assigned = false;
            for i in 0..ids.len() {
                let agent_id = &ids[(self.rr + i) % ids.len()];
                let Some(agent) = self.agents.get(agent_id) else {
                    continue;
                };
                if agent.draining || agent.running.len() >= agent.slots as usize {
                    continue;
                }
                // The best ready task among the scrapers this agent may run
                // whose limit groups admit one more start now.
                let heads = self
                    .queue
                    .heads(agent.eligible.iter(), now, self.opts.aging);
                let mut chosen = None;
                for head in heads {
                    let groups = self.scraper_groups(&head.scraper);
                    if let Some(permit) = self.limits.try_acquire(&groups, now) {
                        chosen = Some((head, permit));
                        break;
                    }
                }
                let Some((head, permit)) = chosen else {
                    continue;
                };
                self.queue.pop(&head.scraper, head.base);
                self.assign(tx, fx, agent_id, head.key.2, permit)?;
                assigned = true;
            }
            self.rr = self.rr.wrapping_add(1);
            if !assigned || self.queue.ready_len() == 0 {
                return Ok(());
            }
        }
    }

    fn assign(
        &mut self,
        tx: &Transaction<'_>,
        fx: &mut Effects,
        agent_id: &AgentId,
        id: TaskId,
        permit: Permit,
    ) -> Result<()> {
        let now = now_ms();
        let ttl = self.lease_ttl_ms();
        let Some(task) = self.tasks.get_mut(&id) else {
            self.limits.refund(permit, now);
            return Ok(());
        };
        let attempt = task.attempts + 1;
        let lease = LeaseId::generate();
        store::lease_task(tx, id, attempt, &lease, agent_id, now)?;
        task.attempts = attempt;
        task.lease = Some(Lease {
            id: lease.clone(),
            agent: agent_id.clone(),
            deadline: now + ttl,
        });
        self.leases.insert(lease.clone(), id);
        let task = &self.tasks[&id];
        let assign = build_assign(&self.catalog, &self.opts, task, &lease, attempt);
        if assign.is_err() {
            // The lease never starts: its start does not count against the groups.
            self.limits.refund(permit, now);
        } else {
            self.permits.insert(lease.clone(), permit);
        }
        let source = task.source.to_string();
        let (ready_at, priority) = (task.ready_at, task.priority);
        let Some(agent) = self.agents.get_mut(agent_id) else {
            return Ok(());
        };
        agent.running.insert(lease.clone());
        match assign {
            Ok(assign) => {
                let waited = Duration::from_millis(u64::try_from(now - ready_at).unwrap_or(0));
                self.opts
                    .metrics
                    .dispatched(&source, priority.as_str(), waited);
                fx.send(&agent.tx, Out::Assign(assign));
                self.log(
                    tx,
                    fx,
                    Event::new(
                        pb::LogLevel::Debug,
                        format!("assigned (attempt {attempt}, lease {lease})"),
                    )
                    .task(id)
                    .agent(agent_id.0.clone())
                    .source(source)
                    .row(),
                )
            }
            Err(error) => self.finish_lease(
                tx,
                fx,
                id,
                None,
                Verdict::Failed {
                    outcome: "failed",
                    error,
                },
            ),
        }
    }
}

/// Builds the Assign message for a task's new lease.
fn build_assign(
    catalog: &Catalog,
    opts: &SchedulerOptions,
    task: &Active,
    lease: &LeaseId,
    attempt: u32,
) -> Result<pb::Assign, String> {
    let scraper = catalog
        .scrapers
        .get(&*task.scraper)
        .ok_or_else(|| format!("scraper {} is no longer in the catalog", task.scraper))?;
    let ctx = RenderContext {
        partition: &task.partition,
        task_id: task.id.0,
        attempt,
        source: &task.source,
        config_dir: &opts.config_dir,
    };
    let argv = scraper
        .render_argv(&ctx)
        .into_iter()
        .map(|pieces| pb::Arg {
            parts: pieces
                .into_iter()
                .map(|piece| pb::ArgPart {
                    part: Some(match piece {
                        ArgPiece::Text(text) => pb::arg_part::Part::Text(text),
                        ArgPiece::OutputDir => pb::arg_part::Part::OutputDir(true),
                    }),
                })
                .collect(),
        })
        .collect();
    let mut env: HashMap<String, String> = scraper.render_env(&ctx).into_iter().collect();
    env.insert("ADCE_TASK_ID".into(), task.id.to_string());
    env.insert("ADCE_ATTEMPT".into(), attempt.to_string());
    env.insert("ADCE_SOURCE".into(), task.source.to_string());
    env.insert("ADCE_EXPECTED_KEYS".into(), task.keys.join("\n"));
    for (name, value) in &task.partition.vars {
        env.insert(
            format!("ADCE_VAR_{}", name.to_ascii_uppercase()),
            value.to_string(),
        );
    }
    Ok(pb::Assign {
        task_id: task.id.0,
        lease_id: lease.0.clone(),
        source: task.source.to_string(),
        scraper: task.scraper.to_string(),
        attempt,
        partition: task.partition.to_pb(),
        argv,
        env,
        timeout_ms: u64::try_from(scraper.timeout.as_millis()).unwrap_or(u64::MAX),
        expected_keys: task.keys.clone(),
        priority: pb::Priority::from(task.priority) as i32,
    })
}

/// The delay before retry number `attempt` (1-based count of failures so
/// far): `backoff × multiplier^(attempt-1)`, capped at `max_backoff`, scaled
/// by a jitter factor in `[1 - jitter, 1 + jitter]` chosen by `unit` in [0, 1).
pub fn backoff_ms(
    backoff: Duration,
    multiplier: f64,
    max_backoff: Duration,
    jitter: f64,
    attempt: u32,
    unit: f64,
) -> i64 {
    let exp = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
    let base = backoff.as_millis() as f64 * multiplier.max(1.0).powi(exp);
    let capped = base.min(max_backoff.as_millis() as f64);
    let jitter = jitter.clamp(0.0, 1.0);
    let factor = 1.0 - jitter + 2.0 * jitter * unit.clamp(0.0, 1.0);
    (capped * factor).round() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters_within_bounds() {
        let b = Duration::from_secs(1);
        let max = Duration::from_secs(10);
        assert_eq!(backoff_ms(b, 2.0, max, 0.0, 1, 0.5), 1000);
        assert_eq!(backoff_ms(b, 2.0, max, 0.0, 2, 0.5), 2000);
        assert_eq!(backoff_ms(b, 2.0, max, 0.0, 3, 0.5), 4000);
        assert_eq!(backoff_ms(b, 2.0, max, 0.0, 10, 0.5), 10_000);
        assert_eq!(backoff_ms(b, 2.0, max, 0.1, 1, 0.0), 900);
        assert_eq!(backoff_ms(b, 2.0, max, 0.1, 1, 1.0), 1100);
        assert_eq!(backoff_ms(b, 2.0, max, 0.0, u32::MAX, 0.5), 10_000);
    }
}
