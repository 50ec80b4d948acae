//! The actor's thread: loads the queue, then loops taking every command that
//! has arrived (up to [`MAX_BATCH`]), deciding each against the state and
//! applying its writes in one transaction, ticking (expiry, delayed tasks,
//! routing notes, log pruning), dispatching, committing, and only then
//! releasing replies, assignments and log entries (group commit). The clock
//! is read here, once per command, and passed in.

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rusqlite::Connection;
use tracing::{debug, error, info};

use super::counts::Counts;
use super::effects::{Effects, Write};
use super::handle::{Command, Handle};
use super::state::{Lease, State};
use super::{CatalogCell, QueueReport, SchedulerOptions};
use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::logs::{Event, LogBus};
use crate::model::{TaskState, UnixMs, now_ms};
use crate::store;

/// How often leases are checked for expiry and delayed tasks promoted.
const TICK: Duration = Duration::from_millis(200);
/// The most commands applied in one transaction.
const MAX_BATCH: usize = 2048;
/// How often old log entries are pruned.
const LOG_PRUNE_EVERY_MS: i64 = 60_000;
/// Refill-and-dispatch rounds at the end of one batch, at most (each can
/// empty every window once).
const MAX_DISPATCH_ROUNDS: usize = 16;
/// Active tasks whose priority rules are re-applied per tick while a sweep
/// runs.
const SWEEP_PER_TICK: usize = 2_000;

/// Opens the store in `state_dir` (its one writer), loads the queue from it
/// and starts the scheduler thread.
pub fn spawn(
    state_dir: &Path,
    catalog: Arc<Catalog>,
    opts: SchedulerOptions,
    logs: LogBus,
) -> Result<(Handle, std::thread::JoinHandle<Result<()>>)> {
    let conn = store::Writer::open(state_dir)?;
    let cell = CatalogCell::new(catalog.clone());
    let now = now_ms();
    let mut state = State::new(
        catalog,
        opts,
        cell.clone(),
        Box::new(rand::rngs::StdRng::from_os_rng()),
        now,
    );
    load(&conn, &mut state, now)?;
    let (tx, rx) = mpsc::channel();
    let handle = Handle::new(tx, logs.clone(), cell);
    let thread = std::thread::Builder::new()
        .name("adce-scheduler".into())
        .spawn(move || run(conn, state, logs, rx))
        .map_err(|e| Error::Internal(format!("cannot start scheduler thread: {e}")))?;
    Ok((handle, thread))
}

/// Loads what `state` keeps of the store: the counts and the leased tasks;
/// pending tasks stay in the store until the ready queue's windows load them.
pub(super) fn load(conn: &Connection, state: &mut State, now: UnixMs) -> Result<()> {
    let counts = store::count_rows(conn)?;
    state.counts = Counts::load(counts, |name| state.intern(name));
    let unloaded: Vec<_> = state
        .counts
        .of_state(TaskState::Pending)
        .map(|((_, priority, _, scraper), _)| (scraper.clone(), *priority))
        .collect();
    for (scraper, priority) in unloaded {
        state.queue.unloaded(&scraper, priority);
    }
    let pending = state.counts.total(TaskState::Pending);
    let mut leased = 0u64;
    for mut row in store::load_leased(conn)? {
        let Some((id, agent)) = row.lease.take() else {
            continue;
        };
        let task_id = row.id;
        let mut task = state.active_from_row(row);
        // A restarted server gives every lease a fresh deadline so its
        // agent has time to reconnect and re-attach it.
        state.leases.insert(id.clone(), task_id);
        // Running tasks keep counting against their limit groups.
        let groups = state.scraper_groups(&task.scraper);
        let permit = state.limits.reattach(&groups);
        state.permits.insert(id.clone(), permit);
        task.lease = Some(Lease {
            id,
            agent,
            deadline: now + state.lease_ttl_ms(),
        });
        leased += 1;
        state.remember(task);
    }
    info!(pending, leased, "scheduler loaded the queue");
    Ok(())
}

fn run(
    mut conn: store::Writer,
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
            state.handle(&txn, &mut fx, cmd, now_ms())?;
            fx.apply(&txn)?;
        }
        if Instant::now() >= next_tick {
            state.tick(&txn, &mut fx, now_ms())?;
            next_tick = Instant::now() + TICK;
        }
        state.end_batch(&txn, &mut fx, now_ms(), stop.is_none())?;
        fx.apply(&txn)?;
        txn.commit()
            .inspect_err(|e| error!(error = %e, "store commit failed"))?;
        fx.release(&logs);
        if let Some(reply) = stop {
            let _ = reply.send(());
            return Ok(());
        }
    }
}

impl State {
    /// Decides one command at `now`. Store failures end the actor; any
    /// other error is the caller's answer.
    pub(super) fn handle(
        &mut self,
        tx: &store::WriteTxn<'_>,
        fx: &mut Effects,
        cmd: Command,
        now: UnixMs,
    ) -> Result<()> {
        /// Replies with `result` unless it is a store failure, which stops
        /// the actor.
        fn answer<T: Send + 'static>(
            fx: &mut Effects,
            reply: super::handle::Reply<Result<T>>,
            result: Result<T>,
        ) -> Result<()> {
            match result {
                Err(Error::Store(e)) => Err(Error::Store(e)),
                other => {
                    fx.reply(reply, other);
                    Ok(())
                }
            }
        }
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
                    .admit(fx, &hello, limits, now)
                    .map(|()| self.connect(fx, hello, address, conn_id, agent_tx, now));
                answer(fx, reply, result)?;
            }
            Command::Disconnect { agent, conn_id } => self.disconnect(fx, &agent, conn_id, now),
            Command::CutOff {
                agent,
                conn_id,
                error,
            } => self.cut_off(fx, &agent, conn_id, error, now),
            Command::Heartbeat { agent, running } => self.heartbeat(fx, &agent, running, now),
            Command::Progress {
                agent,
                lease,
                fraction,
            } => self.progress(&agent, &lease, fraction, now),
            Command::Output {
                agent,
                lease,
                lines,
            } => self.output(fx, &agent, &lease, lines, now),
            Command::Draining { agent, reason } => self.draining(fx, &agent, &reason, now),
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
                let result = self.record_upload(fx, lease, key, size, sha256, now);
                fx.reply(reply, result);
            }
            Command::Complete {
                agent,
                result,
                check,
                reply,
            } => {
                let result = self.complete(fx, &agent, result, &check, now);
                fx.reply(reply, result);
            }
            Command::ApplyPlan {
                tasks,
                observed_at,
                reply,
            } => {
                let created = self.apply_plan(tx, tasks, observed_at, now);
                answer(fx, reply, created)?;
            }
            Command::SetDispatch { enabled } => {
                if self.dispatch_enabled != enabled {
                    debug!(enabled, "dispatch switched");
                }
                self.dispatch_enabled = enabled;
            }
            Command::AnnounceStop { reason, grace } => self.announce_stop(fx, reason, grace),
            Command::SetLogRetention(retention) => {
                self.retention = retention;
                // Prune by the new rule at the next tick.
                self.pruned_at = 0;
            }
            Command::Stats { reply } => {
                let stats = self.stats(tx, now)?;
                fx.reply(reply, stats);
            }
            Command::Report { reply } => {
                let report = QueueReport {
                    stats: self.stats(tx, now)?,
                    waiting: self.waiting(now),
                    oldest_ready: self.queue.oldest_ready(now),
                };
                fx.reply(reply, report);
            }
            Command::Agents { reply } => {
                let agents = self.agent_snapshots();
                fx.reply(reply, agents);
            }
            Command::ProgressMap { reply } => {
                let progress = self
                    .tasks
                    .values()
                    .filter(|t| t.lease.is_some())
                    .map(|t| (t.id, t.progress))
                    .collect();
                fx.reply(reply, progress);
            }
            Command::Retry { which, reply } => {
                let result = self.retry(tx, fx, which, now);
                answer(fx, reply, result)?;
            }
            Command::Cancel { id, reason, reply } => {
                let result = self.cancel(tx, fx, id, &reason, now);
                answer(fx, reply, result)?;
            }
            Command::Reload { catalog, reply } => {
                self.reload(tx, fx, catalog, now)?;
                fx.reply(reply, ());
            }
            Command::Limits { reply } => {
                let snapshot = self.limits.snapshot(now);
                fx.reply(reply, snapshot);
            }
            Command::StopRunning { reason, reply } => {
                let stopped = self.stop_running(fx, &reason, now);
                fx.reply(reply, Ok(stopped));
            }
            Command::DrainAgent { agent, reply } => {
                let result = self.drain_agent(fx, &agent);
                fx.reply(reply, result);
            }
            Command::Log(row) => fx.log(row),
            Command::Shutdown { reply } => fx.reply(reply, ()),
        }
        Ok(())
    }

    /// The end of a batch: windows that ran low are refilled (after the
    /// batch's writes are applied, so the store is current) and ready tasks
    /// dispatched, until no window runs low while dispatching (unless the
    /// actor is stopping); then the counts the batch changed are written.
    pub(super) fn end_batch(
        &mut self,
        tx: &store::WriteTxn<'_>,
        fx: &mut Effects,
        now: UnixMs,
        dispatch: bool,
    ) -> Result<()> {
        for _ in 0..MAX_DISPATCH_ROUNDS {
            fx.apply(tx)?;
            self.refill(tx)?;
            if !dispatch || !self.dispatch(fx, now) {
                break;
            }
        }
        if let Some(counts) = self.counts.flush() {
            fx.write(counts);
        }
        Ok(())
    }

    /// Periodic work: routing notes, log pruning, expired leases, and a
    /// chunk of the priority sweep (started when the day changes).
    pub(super) fn tick(
        &mut self,
        tx: &store::WriteTxn<'_>,
        fx: &mut Effects,
        now: UnixMs,
    ) -> Result<()> {
        self.track_unroutable(fx, now);
        if now - self.pruned_at >= LOG_PRUNE_EVERY_MS {
            self.pruned_at = now;
            let max_age_ms = crate::model::duration_ms(self.retention.max_age);
            fx.write(Write::PruneLogs {
                before: now.saturating_sub(max_age_ms),
                keep_rows: self.retention.max_rows,
            });
        }
        self.expire_leases(fx, now);
        fx.apply(tx)?;
        if let Some(changed @ 1..) = self.sweep_priorities(tx, fx, now, SWEEP_PER_TICK)? {
            fx.log(
                Event::info(format!(
                    "{changed} queued tasks changed priority by their source's rules"
                ))
                .row(),
            );
        }
        Ok(())
    }
}
