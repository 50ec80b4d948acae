//! Connected agents: admission (id, slots, duplicates, `max_agents`),
//! connect with re-attachment of the leases an agent still runs, disconnect
//! and cut-off, heartbeats, drains, the server's stop notice, and the
//! routing notes about ready work that no connected agent may run.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use super::effects::{Effects, Write};
use super::state::{Agent, State};
use super::verdict::{Failure, Verdict};
use super::{
    AdmissionLimits, AgentHello, AgentSnapshot, AgentTx, StopNotice, ToAgent, WaitingNote,
};
use crate::error::{Error, Result};
use crate::logs::Event;
use crate::model::{AgentId, LeaseId, TaskId, TaskState, UnixMs};
use crate::store::AgentRow;

/// The longest agent id, in bytes.
const MAX_AGENT_ID_BYTES: usize = 128;

impl State {
    /// Whether an agent that said `hello` may connect: a valid id, a slot
    /// count within the cap, no live connection under the same id, and room
    /// under `max_agents` unless it is already connected (a reconnect after
    /// its earlier stream went quiet replaces that stream).
    pub(super) fn admit(
        &mut self,
        fx: &mut Effects,
        hello: &AgentHello,
        limits: AdmissionLimits,
        now: UnixMs,
    ) -> Result<()> {
        if hello.agent_id.is_empty()
            || hello.agent_id.len() > MAX_AGENT_ID_BYTES
            || hello.agent_id.chars().any(char::is_control)
        {
            return Err(Error::InvalidArgument(format!(
                "agent id must be 1 to {MAX_AGENT_ID_BYTES} printable characters"
            )));
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
            let quiet_ms = now - existing.last_seen;
            let grace_ms =
                2 * crate::model::duration_ms(self.opts.heartbeat_interval).min(i64::MAX / 2);
            if quiet_ms < grace_ms {
                let address = existing.address.clone();
                warn!(agent = %id, %address, "agent refused: its id is connected and active");
                fx.log(
                    Event::warn(format!(
                        "agent refused: id {id} is already connected from {address} and active; give each agent its own --id"
                    ))
                    .agent(id.0.clone())
                    .row(),
                );
                return Err(Error::AlreadyExists(format!(
                    "agent id {id} is already connected from {address} (active {quiet_ms} ms ago); give each agent its own --id"
                )));
            }
        }
        if !self.agents.contains_key(&id) && self.agents.len() >= limits.max_agents as usize {
            warn!(agent = %id, max_agents = limits.max_agents, "agent refused: too many agents");
            fx.log(
                Event::warn(format!(
                    "agent refused: {} agents are connected, the most server.max_agents allows",
                    self.agents.len()
                ))
                .agent(id.0.clone())
                .row(),
            );
            return Err(Error::TooLarge(format!(
                "agent {id} refused: the server already has {} connected agents (server.max_agents is {})",
                self.agents.len(),
                limits.max_agents
            )));
        }
        Ok(())
    }

    /// Registers an admitted agent: welcomes it, re-attaches the leases it
    /// still runs, cancels the ones it claims that are no longer live, and
    /// ends the ones the server thought it held but it no longer runs.
    pub(super) fn connect(
        &mut self,
        fx: &mut Effects,
        hello: AgentHello,
        address: String,
        conn_id: u64,
        agent_tx: AgentTx,
        now: UnixMs,
    ) {
        let id = AgentId(hello.agent_id);
        let eligible = self.eligible_scrapers(&hello.labels);
        let replaced = self.agents.remove(&id).is_some();
        let mut agent = Agent {
            conn_id,
            hostname: hello.hostname,
            labels: hello.labels,
            slots: hello.slots,
            version: hello.version,
            address,
            connected_at: now,
            last_seen: now,
            tx: agent_tx,
            running: BTreeSet::new(),
            eligible,
            draining: false,
        };
        fx.send(
            &agent.tx,
            ToAgent::Welcome {
                agent_id: id.clone(),
                heartbeat_interval: self.opts.heartbeat_interval,
                lease_ttl: self.opts.lease_ttl,
            },
        );
        if let Some(notice) = &self.stopping {
            fx.send(&agent.tx, ToAgent::Stopping(notice.clone()));
        }
        let claimed: BTreeSet<LeaseId> = hello.running_leases.into_iter().collect();
        let ttl = self.lease_ttl_ms();
        let mut reattached = 0;
        for lease in &claimed {
            match self.live_lease_mut(lease, Some(&id)) {
                Some(l) => {
                    l.deadline = now + ttl;
                    agent.running.insert(lease.clone());
                    reattached += 1;
                }
                None => fx.send(
                    &agent.tx,
                    ToAgent::Cancel {
                        lease: lease.clone(),
                        reason: "lease is no longer live".into(),
                    },
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
        fx.write(Write::UpsertAgent(AgentRow {
            id: id.clone(),
            hostname: agent.hostname.clone(),
            labels: agent.labels.clone(),
            slots: agent.slots,
            version: agent.version.clone(),
            address: agent.address.clone(),
            connected_at: now,
            last_seen: now,
        }));
        info!(agent = %id, slots = agent.slots, reattached, lost = lost.len(), replaced, "agent connected");
        let reattached_note = if reattached > 0 {
            format!(", re-attached {reattached} running tasks")
        } else {
            String::new()
        };
        fx.log(
            Event::info(format!(
                "agent connected from {} with {} slots{reattached_note}",
                agent.address, agent.slots,
            ))
            .agent(id.0.clone())
            .row(),
        );
        self.agents.insert(id.clone(), agent);
        for task in lost {
            self.finish_lease(
                fx,
                task,
                None,
                Verdict::failed(
                    Failure::Lost,
                    format!("agent {id} restarted and no longer runs the task"),
                ),
                now,
            );
        }
    }

    /// Stream `conn_id` of agent `id` ended; its leases stay and expire
    /// unless it reconnects. A stream that was already replaced is ignored.
    pub(super) fn disconnect(&mut self, fx: &mut Effects, id: &AgentId, conn_id: u64, now: UnixMs) {
        if self.agents.get(id).is_none_or(|a| a.conn_id != conn_id) {
            return;
        }
        let running = self.agents.remove(id).map_or(0, |a| a.running.len());
        fx.write(Write::TouchAgent {
            agent: id.clone(),
            at: now,
        });
        info!(agent = %id, running, "agent disconnected");
        fx.log(
            Event::info(format!(
                "agent disconnected with {running} running tasks (their leases expire unless it reconnects)"
            ))
            .agent(id.0.clone())
            .row(),
        );
    }

    /// Ends an agent's stream from the server's side with `error`; its
    /// leases stay and expire unless it reconnects, like a lost agent's.
    pub(super) fn cut_off(
        &mut self,
        fx: &mut Effects,
        id: &AgentId,
        conn_id: u64,
        error: Error,
        now: UnixMs,
    ) {
        let Some(agent) = self.agents.get(id).filter(|a| a.conn_id == conn_id) else {
            return;
        };
        error!(agent = %id, reason = %error, "agent cut off");
        let running = agent.running.len();
        fx.log(
            Event::error(format!(
                "agent {id} cut off: {error}; its {running} running tasks expire unless it reconnects"
            ))
            .agent(id.0.clone())
            .row(),
        );
        fx.send(&agent.tx, ToAgent::End(error));
        self.disconnect(fx, id, conn_id, now);
    }

    /// Agent `id` is alive and runs `running`: their deadlines move on.
    pub(super) fn heartbeat(
        &mut self,
        fx: &mut Effects,
        id: &AgentId,
        running: Vec<LeaseId>,
        now: UnixMs,
    ) {
        self.seen(id, now);
        let ttl = self.lease_ttl_ms();
        for lease in &running {
            if let Some(l) = self.live_lease_mut(lease, Some(id)) {
                l.deadline = now + ttl;
            }
        }
        fx.write(Write::TouchAgent {
            agent: id.clone(),
            at: now,
        });
    }

    /// Agent `id` was heard from at `now`.
    pub(super) fn seen(&mut self, id: &AgentId, now: UnixMs) {
        if let Some(agent) = self.agents.get_mut(id) {
            agent.last_seen = now;
        }
    }

    /// Agent `id` is draining: it finishes its tasks and takes no new ones.
    pub(super) fn draining(&mut self, fx: &mut Effects, id: &AgentId, reason: &str, now: UnixMs) {
        self.seen(id, now);
        let Some(agent) = self.agents.get_mut(id) else {
            return;
        };
        agent.draining = true;
        let running = agent.running.len();
        info!(agent = %id, running, %reason, "agent draining");
        fx.log(
            Event::info(format!(
                "agent draining ({reason}): finishing {running} running tasks, taking no new ones"
            ))
            .agent(id.0.clone())
            .row(),
        );
    }

    /// Tells agent `id` to drain: finish, take nothing new, exit. The tasks
    /// it runs.
    pub(super) fn drain_agent(&mut self, fx: &mut Effects, id: &AgentId) -> Result<Vec<TaskId>> {
        let Some(agent) = self.agents.get_mut(id) else {
            return Err(Error::NotFound(format!("agent {id} is not connected")));
        };
        agent.draining = true;
        fx.send(
            &agent.tx,
            ToAgent::Drain {
                reason: "drained by an operator".into(),
            },
        );
        let running: Vec<TaskId> = agent
            .running
            .iter()
            .filter_map(|l| self.leases.get(l).copied())
            .collect();
        fx.log(
            Event::info(format!(
                "agent told to drain by an operator ({} running tasks)",
                running.len()
            ))
            .agent(id.0.clone())
            .row(),
        );
        Ok(running)
    }

    /// Tells every connected agent the server is stopping, and stops
    /// assigning work for good.
    pub(super) fn announce_stop(&mut self, fx: &mut Effects, reason: String, grace: Duration) {
        let notice = StopNotice {
            reason: reason.clone(),
            grace,
        };
        for agent in self.agents.values() {
            fx.send(&agent.tx, ToAgent::Stopping(notice.clone()));
        }
        self.stopping = Some(notice);
        info!(agents = self.agents.len(), %reason, ?grace, "stop announced to agents");
        fx.log(
            Event::info(format!(
                "server stopping ({reason}): told {} agents, assigning nothing more",
                self.agents.len()
            ))
            .row(),
        );
    }

    pub(super) fn agent_snapshots(&self) -> Vec<AgentSnapshot> {
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

    /// The scrapers an agent with `labels` may run.
    pub(super) fn eligible_scrapers(&mut self, labels: &BTreeMap<String, String>) -> Vec<Arc<str>> {
        let names: Vec<String> = self
            .catalog
            .scrapers
            .iter()
            .filter(|(_, s)| s.requires.iter().all(|(k, v)| labels.get(k) == Some(v)))
            .map(|(name, _)| name.clone())
            .collect();
        names.iter().map(|n| self.intern(n)).collect()
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
    pub(super) fn waiting(&self, now: UnixMs) -> Vec<WaitingNote> {
        let after = crate::model::duration_ms(self.opts.no_agent_after);
        let mut notes: Vec<WaitingNote> = self
            .queue
            .ready_scrapers(now)
            .filter_map(|scraper| {
                let (since, _) = self.unroutable.get(scraper)?;
                (now - since >= after).then(|| WaitingNote {
                    scraper: scraper.to_string(),
                    reason: self.unroutable_reason(scraper),
                    ready: self.counts.of_scraper(TaskState::Pending, scraper),
                    since: *since,
                })
            })
            .collect();
        notes.sort_by(|a, b| a.scraper.cmp(&b.scraper));
        notes
    }

    /// Tracks scrapers whose ready tasks no connected agent may run, and logs
    /// each once it has waited `no_agent_after`.
    pub(super) fn track_unroutable(&mut self, fx: &mut Effects, now: UnixMs) {
        let stuck: Vec<Arc<str>> = self
            .queue
            .ready_scrapers(now)
            .filter(|s| !self.agents.values().any(|a| a.eligible.contains(s)))
            .cloned()
            .collect();
        self.unroutable.retain(|s, _| stuck.contains(s));
        for scraper in stuck {
            self.unroutable.entry(scraper).or_insert((now, false));
        }
        let after = crate::model::duration_ms(self.opts.no_agent_after);
        let due: Vec<Arc<str>> = self
            .unroutable
            .iter()
            .filter(|(_, (since, logged))| !logged && now - since >= after)
            .map(|(s, _)| s.clone())
            .collect();
        if due.is_empty() {
            return;
        }
        let notes = self.waiting(now);
        for scraper in due {
            if let Some(note) = notes.iter().find(|n| *n.scraper == *scraper) {
                fx.log(
                    Event::warn(format!(
                        "waiting: {} ready tasks of scraper {}: {}",
                        note.ready, note.scraper, note.reason
                    ))
                    .row(),
                );
            }
            if let Some(entry) = self.unroutable.get_mut(&scraper) {
                entry.1 = true;
            }
        }
    }
}
