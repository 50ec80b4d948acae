//! Leases: dispatch (the best ready task an agent may run whose limit groups
//! admit a start), assignment under a fresh lease, lookups for the gateway,
//! uploads and progress under a live lease, expiry, revocation, and ending a
//! lease with a [`Verdict`] that moves its task on.

use std::time::Duration;

use tracing::warn;

use super::effects::{Effects, Write};
use super::state::{Active, Lease, State};
use super::verdict::{self, EXIT_TEMPFAIL, Failure, Next, ObjectCheck, Verdict};
use super::{Assignment, LeaseInfo, SchedulerOptions, TaskResult, ToAgent};
use crate::catalog::{Catalog, RenderContext};
use crate::error::{Error, Result};
use crate::limits::Permit;
use crate::logs::Event;
use crate::model::{AgentId, LeaseId, TaskId, TaskState, UnixMs};

impl State {
    /// The task of lease `lease` when the lease is live and, if `agent` is
    /// given, held by it.
    fn live_task_mut(&mut self, lease: &LeaseId, agent: Option<&AgentId>) -> Option<&mut Active> {
        let id = *self.leases.get(lease)?;
        self.tasks.get_mut(&id).filter(|t| {
            t.lease
                .as_ref()
                .is_some_and(|l| agent.is_none_or(|a| &l.agent == a))
        })
    }

    /// The lease `lease` when it is live and, if `agent` is given, held by it.
    pub(super) fn live_lease_mut(
        &mut self,
        lease: &LeaseId,
        agent: Option<&AgentId>,
    ) -> Option<&mut Lease> {
        self.live_task_mut(lease, agent)?.lease.as_mut()
    }

    /// What the gateway needs to know about the live lease `lease`, held by
    /// `agent` when given.
    pub(super) fn lease_info(&self, lease: &LeaseId, agent: Option<&AgentId>) -> Result<LeaseInfo> {
        let not_live = || {
            Error::FailedPrecondition(format!(
                "lease {lease} is not live (it expired, finished or was reassigned)"
            ))
        };
        let task_id = *self.leases.get(lease).ok_or_else(not_live)?;
        let task = self.tasks.get(&task_id).ok_or_else(not_live)?;
        let held = task.lease.as_ref().ok_or_else(not_live)?;
        if agent.is_some_and(|a| &held.agent != a) {
            return Err(Error::FailedPrecondition(format!(
                "lease {lease} is held by another agent"
            )));
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

    /// Records an upload the lake committed under the live lease `lease`.
    pub(super) fn record_upload(
        &mut self,
        fx: &mut Effects,
        lease: LeaseId,
        key: String,
        size: u64,
        sha256: String,
        now: UnixMs,
    ) -> Result<()> {
        let info = self.lease_info(&lease, None)?;
        fx.log(
            Event::debug(format!("uploaded {key} ({size} bytes)"))
                .task(info.task_id)
                .agent(info.holder.0)
                .source(info.source)
                .row(),
        );
        fx.write(Write::Upload {
            task: info.task_id,
            attempt: info.attempt,
            lease,
            key,
            size,
            sha256,
            at: now,
        });
        Ok(())
    }

    /// Progress of a lease `agent` holds.
    pub(super) fn progress(
        &mut self,
        agent: &AgentId,
        lease: &LeaseId,
        fraction: f64,
        now: UnixMs,
    ) {
        self.seen(agent, now);
        if let Some(task) = self.live_task_mut(lease, Some(agent)) {
            task.progress = fraction.clamp(0.0, 1.0);
        }
    }

    /// Judges the result `agent` reported for one of its leases and moves
    /// the task on; a result for a lease it does not hold is refused.
    pub(super) fn complete(
        &mut self,
        fx: &mut Effects,
        agent: &AgentId,
        result: TaskResult,
        check: &ObjectCheck,
        now: UnixMs,
    ) -> Result<()> {
        let info = match self.lease_info(&result.lease, Some(agent)) {
            Ok(info) => info,
            Err(e) => {
                warn!(agent = %agent, lease = %result.lease, "late result refused");
                fx.log(
                    Event::warn(format!("result for lease {} refused: {e}", result.lease))
                        .agent(agent.0.clone())
                        .row(),
                );
                return Err(e);
            }
        };
        let verdict = verdict::judge(result.outcome, &result.message, check, info.min_bytes);
        self.finish_lease(fx, info.task_id, result.outcome.exit_code(), verdict, now);
        Ok(())
    }

    /// Ends the live lease of task `id` with `verdict` and moves the task on.
    pub(super) fn finish_lease(
        &mut self,
        fx: &mut Effects,
        id: TaskId,
        exit_code: Option<i32>,
        verdict: Verdict,
        now: UnixMs,
    ) {
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        let Some(lease) = task.lease.take() else {
            return;
        };
        task.progress = 0.0;
        let (source, scraper, attempt) = (task.source.clone(), task.scraper.clone(), task.attempts);
        self.leases.remove(&lease.id);
        if let Some(agent) = self.agents.get_mut(&lease.agent) {
            agent.running.remove(&lease.id);
        }
        let event = |e: Event| {
            e.task(id)
                .agent(lease.agent.0.clone())
                .source(source.to_string())
        };
        if let Some(dropped) = self.end_line_budget(&lease.id) {
            fx.log(event(Self::dropped_lines_event(dropped)).row());
        }
        if let Some(permit) = self.permits.remove(&lease.id) {
            if verdict.never_started() {
                // The program never started: its start does not count.
                self.limits.refund(permit, now);
            } else {
                self.limits.release(&permit);
            }
        }
        if exit_code == Some(EXIT_TEMPFAIL) {
            let groups = self.scraper_groups(&scraper);
            self.limits.throttled(&groups, now);
            for group in &groups {
                self.opts.metrics.throttled(group);
            }
        }
        fx.write(Write::EndAttempt {
            task: id,
            number: attempt,
            exit_code,
            outcome: verdict.attempt_outcome(),
            error: verdict.error().to_string(),
            at: now,
        });
        match &verdict {
            Verdict::Done => self.done_total += 1,
            Verdict::Failed { .. } => self.failed_total += 1,
            Verdict::Unavailable | Verdict::Refused(_) => {}
        }
        self.opts
            .metrics
            .task_finished(&source, verdict.metric_outcome(), exit_code);
        let source_config = self.catalog.source(&source);
        let recheck_after =
            source_config.map_or(crate::config::DEFAULT_RECHECK_AFTER, |s| s.recheck_after);
        let unit = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let retry = self.catalog.scrapers.get(&*scraper).map(|s| &s.retry);
        let next = verdict::next(&verdict, attempt, retry, recheck_after, now, unit);
        let error = verdict.error().to_string();
        match next {
            Next::Done => {
                self.set_final(fx, id, TaskState::Done, now, String::new(), now);
                fx.log(event(Event::info(format!("task done (attempt {attempt})"))).row());
            }
            Next::Unavailable { recheck_at } => {
                self.set_final(
                    fx,
                    id,
                    TaskState::Unavailable,
                    recheck_at,
                    "the data does not exist yet (exit 69)".into(),
                    now,
                );
                fx.log(event(Event::info("data not available yet; checking again later")).row());
            }
            Next::Dead => {
                self.set_final(fx, id, TaskState::Dead, now, error.clone(), now);
                fx.log(
                    event(Event::error(format!(
                        "task dead after {attempt} attempts: {error}"
                    )))
                    .row(),
                );
            }
            Next::Requeue { ready_at, attempts } => {
                self.requeue(fx, id, ready_at, attempts, error.clone(), now);
                let e = match verdict {
                    Verdict::Refused(_) => Event::info(format!("{error}; queued again")),
                    _ => Event::warn(format!(
                        "attempt {attempt} failed: {error}; retrying in {}",
                        humantime::format_duration(Duration::from_millis(
                            u64::try_from(ready_at - now).unwrap_or(0) / 1000 * 1000
                        ))
                    )),
                };
                fx.log(event(e).row());
            }
        }
    }

    /// Moves a task whose lease ended out of the active states and drops it
    /// from memory.
    fn set_final(
        &mut self,
        fx: &mut Effects,
        id: TaskId,
        state: TaskState,
        ready_at: UnixMs,
        error: String,
        now: UnixMs,
    ) {
        fx.write(Write::SetState {
            task: id,
            state,
            ready_at,
            error,
            at: now,
        });
        self.count_lease_end(id, state);
        self.forget(id);
    }

    /// Counts task `id`, whose lease ended, moving from leased to `to`.
    fn count_lease_end(&mut self, id: TaskId, to: TaskState) {
        if let Some(task) = self.tasks.get(&id) {
            let (source, scraper, priority) =
                (task.source.clone(), task.scraper.clone(), task.priority);
            self.count(
                &source,
                &scraper,
                Some((TaskState::Leased, priority)),
                (to, priority),
            );
        }
    }

    /// Puts a task whose lease ended back in the queue, ready at `ready_at`
    /// with `attempts` counted.
    pub(super) fn requeue(
        &mut self,
        fx: &mut Effects,
        id: TaskId,
        ready_at: UnixMs,
        attempts: u32,
        error: String,
        now: UnixMs,
    ) {
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        debug_assert!(task.lease.is_none(), "a requeued task holds no lease");
        if task.attempts != attempts {
            task.attempts = attempts;
            fx.write(Write::SetAttempts { task: id, attempts });
        }
        task.ready_at = ready_at;
        task.progress = 0.0;
        fx.write(Write::SetState {
            task: id,
            state: TaskState::Pending,
            ready_at,
            error,
            at: now,
        });
        let (scraper, priority) = (task.scraper.clone(), task.priority);
        self.count_lease_end(id, TaskState::Pending);
        self.enqueue(&scraper, priority, ready_at, id);
    }

    /// Ends a live lease from the server's side: forgets it, frees its limit
    /// group slot and tells its agent to kill the process group. The caller
    /// has taken it off its task and decides what becomes of the task.
    pub(super) fn revoke_lease(&mut self, fx: &mut Effects, lease: &Lease, reason: &str) {
        self.leases.remove(&lease.id);
        self.line_budgets.remove(&lease.id);
        if let Some(permit) = self.permits.remove(&lease.id) {
            self.limits.release(&permit);
        }
        if let Some(agent) = self.agents.get_mut(&lease.agent) {
            agent.running.remove(&lease.id);
            fx.send(
                &agent.tx,
                ToAgent::Cancel {
                    lease: lease.id.clone(),
                    reason: reason.to_string(),
                },
            );
        }
    }

    /// Ends every lease whose deadline passed: its agent stopped heartbeating.
    pub(super) fn expire_leases(&mut self, fx: &mut Effects, now: UnixMs) {
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
            // An agent still connected may yet run it: it must stop, so the
            // slot it holds is free for the work it is given next.
            let lease = self.tasks[&id].lease.as_ref().map(|l| l.id.clone());
            if let (Some(connected), Some(lease)) = (self.agents.get(&agent), lease) {
                fx.send(
                    &connected.tx,
                    ToAgent::Cancel {
                        lease,
                        reason: "lease expired: no heartbeat for it".into(),
                    },
                );
            }
            self.finish_lease(
                fx,
                id,
                None,
                Verdict::failed(
                    Failure::Lost,
                    format!("lease expired: agent {agent} stopped heartbeating"),
                ),
                now,
            );
        }
    }

    /// Hands ready tasks to agents with free slots, round robin, each the
    /// best task it may run whose limit groups admit a start now. Whether a
    /// window ran low while tasks were assigned: after a refill from the
    /// store, more may be assignable.
    pub(super) fn dispatch(&mut self, fx: &mut Effects, now: UnixMs) -> bool {
        if !self.dispatch_enabled || self.stopping.is_some() || self.agents.is_empty() {
            return false;
        }
        let mut assigned_any = false;
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
                let chosen = heads.into_iter().find_map(|head| {
                    let groups = self.scraper_groups(&head.scraper);
                    self.limits
                        .try_acquire(&groups, now)
                        .map(|permit| (head, permit))
                });
                let Some((head, permit)) = chosen else {
                    continue;
                };
                self.queue.pop(&head.scraper, head.base);
                self.assign(fx, agent_id, head.key.2, permit, now);
                assigned = true;
            }
            self.rr = self.rr.wrapping_add(1);
            assigned_any |= assigned;
            if !assigned || !self.queue.any_ready(now) {
                return assigned_any && !self.queue.refills().is_empty();
            }
        }
    }

    /// Loads the store's next pending tasks into every window that ran low.
    /// The batch's writes must be applied first, so the store is current.
    pub(super) fn refill(&mut self, conn: &rusqlite::Connection) -> crate::error::Result<()> {
        let window = self.queue.window();
        for refill in self.queue.refills() {
            let rows = crate::store::pending_after(
                conn,
                &refill.scraper,
                refill.priority,
                refill.after,
                window,
            )?;
            let keys: Vec<(UnixMs, TaskId)> = rows.iter().map(|r| (r.ready_at, r.id)).collect();
            for row in rows {
                if !self.tasks.contains_key(&row.id) {
                    let task = self.active_from_row(row);
                    self.tasks.insert(task.id, task);
                }
            }
            self.queue.refilled(&refill, &keys, keys.len() < window);
        }
        Ok(())
    }

    /// Leases task `id` to `agent_id` under a fresh lease and sends the
    /// assignment; a task that cannot be rendered fails at once.
    fn assign(
        &mut self,
        fx: &mut Effects,
        agent_id: &AgentId,
        id: TaskId,
        permit: Permit,
        now: UnixMs,
    ) {
        let ttl = self.lease_ttl_ms();
        let lease = LeaseId::from_random(self.rng.next_u64());
        let Some(task) = self.tasks.get_mut(&id) else {
            self.limits.refund(permit, now);
            return;
        };
        let attempt = task.attempts + 1;
        task.attempts = attempt;
        let (source, scraper, priority) =
            (task.source.clone(), task.scraper.clone(), task.priority);
        task.lease = Some(Lease {
            id: lease.clone(),
            agent: agent_id.clone(),
            deadline: now + ttl,
        });
        fx.write(Write::Lease {
            task: id,
            attempt,
            lease: lease.clone(),
            agent: agent_id.clone(),
            at: now,
        });
        self.leases.insert(lease.clone(), id);
        self.count(
            &source,
            &scraper,
            Some((TaskState::Pending, priority)),
            (TaskState::Leased, priority),
        );
        let task = &self.tasks[&id];
        let assignment = build_assignment(&self.catalog, &self.opts, task, &lease, attempt);
        let (source, ready_at, priority) = (task.source.to_string(), task.ready_at, task.priority);
        if let Some(agent) = self.agents.get_mut(agent_id) {
            agent.running.insert(lease.clone());
        }
        match assignment {
            Ok(assignment) => {
                self.permits.insert(lease.clone(), permit);
                let waited = Duration::from_millis(u64::try_from(now - ready_at).unwrap_or(0));
                self.opts
                    .metrics
                    .dispatched(&source, priority.as_str(), waited);
                if let Some(agent) = self.agents.get(agent_id) {
                    fx.send(&agent.tx, ToAgent::Assign(Box::new(assignment)));
                }
                fx.log(
                    Event::debug(format!("assigned (attempt {attempt}, lease {lease})"))
                        .task(id)
                        .agent(agent_id.0.clone())
                        .source(source)
                        .row(),
                );
            }
            Err(error) => {
                // The lease never starts: its start does not count against
                // the groups.
                self.limits.refund(permit, now);
                self.finish_lease(fx, id, None, Verdict::failed(Failure::Failed, error), now);
            }
        }
    }
}

/// The assignment of `task`'s new lease, rendered from its scraper.
fn build_assignment(
    catalog: &Catalog,
    opts: &SchedulerOptions,
    task: &Active,
    lease: &LeaseId,
    attempt: u32,
) -> Result<Assignment, String> {
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
    let mut env: std::collections::HashMap<String, String> =
        scraper.render_env(&ctx).into_iter().collect();
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
    Ok(Assignment {
        task_id: task.id,
        lease: lease.clone(),
        source: task.source.to_string(),
        scraper: task.scraper.to_string(),
        attempt,
        partition: task.partition.clone(),
        argv: scraper.render_argv(&ctx),
        env,
        timeout: scraper.timeout,
        expected_keys: task.keys.clone(),
        priority: task.priority,
    })
}
