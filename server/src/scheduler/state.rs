//! The scheduler's in-memory state, shared by the decision modules (each adds
//! its own `impl State` block): the tasks in memory (every leased task and
//! the pending ones in the ready queue's windows; the rest of the queue stays
//! in the store), live leases, connected agents, limit groups and counts.
//! Only the run loop owns it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use rand::RngCore;

use super::counts::Counts;
use super::output::LineBudget;
use super::queue::ReadyQueue;
use super::{AgentTx, CatalogCell, QueueStats, SchedulerOptions, StopNotice};
use crate::catalog::Catalog;
use crate::limits::{LimitGroups, Permit};
use crate::model::{AgentId, LeaseId, Partition, Priority, TaskId, TaskState, UnixMs};
use crate::store::TaskRow;

/// A leased task, or a pending one in the ready queue's window.
#[derive(Debug)]
pub(super) struct Active {
    pub id: TaskId,
    pub source: Arc<str>,
    pub scraper: Arc<str>,
    pub partition: Partition,
    pub keys: Vec<String>,
    pub priority: Priority,
    pub attempts: u32,
    pub ready_at: UnixMs,
    pub lease: Option<Lease>,
    pub progress: f64,
}

impl Active {
    /// A pending task, not yet leased.
    #[allow(clippy::too_many_arguments)]
    pub fn pending(
        id: TaskId,
        source: Arc<str>,
        scraper: Arc<str>,
        partition: Partition,
        keys: Vec<String>,
        priority: Priority,
        attempts: u32,
        ready_at: UnixMs,
    ) -> Self {
        Active {
            id,
            source,
            scraper,
            partition,
            keys,
            priority,
            attempts,
            ready_at,
            lease: None,
            progress: 0.0,
        }
    }
}

/// A live lease.
#[derive(Debug, Clone)]
pub(super) struct Lease {
    pub id: LeaseId,
    pub agent: AgentId,
    pub deadline: UnixMs,
}

/// A connected agent.
#[derive(Debug)]
pub(super) struct Agent {
    pub conn_id: u64,
    pub hostname: String,
    pub labels: BTreeMap<String, String>,
    pub slots: u32,
    pub version: String,
    pub address: String,
    pub connected_at: UnixMs,
    pub last_seen: UnixMs,
    pub tx: AgentTx,
    pub running: BTreeSet<LeaseId>,
    pub eligible: Vec<Arc<str>>,
    /// Finishing its tasks; gets no new ones.
    pub draining: bool,
}

pub(super) struct State {
    pub catalog: Arc<Catalog>,
    pub opts: SchedulerOptions,
    pub tasks: HashMap<TaskId, Active>,
    pub leases: HashMap<LeaseId, TaskId>,
    pub queue: ReadyQueue,
    pub agents: BTreeMap<AgentId, Agent>,
    pub names: HashMap<String, Arc<str>>,
    pub dispatch_enabled: bool,
    pub rr: usize,
    pub limits: LimitGroups,
    pub permits: HashMap<LeaseId, Permit>,
    /// Scrapers with ready tasks and no eligible connected agent: since when,
    /// and whether that was logged.
    pub unroutable: HashMap<Arc<str>, (UnixMs, bool)>,
    /// Where readers find the catalog in force.
    pub cell: CatalogCell,
    /// Tasks done and attempts failed since start, for cycle numbers.
    pub done_total: u64,
    pub failed_total: u64,
    /// Output budget per running lease.
    pub line_budgets: HashMap<LeaseId, LineBudget>,
    /// When log entries were last pruned.
    pub pruned_at: UnixMs,
    /// How long log entries are kept.
    pub retention: crate::config::LogRetention,
    /// The server announced its stop, with this notice: nothing is assigned
    /// any more, and agents that connect from now on get the notice too.
    pub stopping: Option<StopNotice>,
    /// Lease ids and retry jitter.
    pub rng: Box<dyn RngCore + Send>,
    /// Tasks by state, priority, source and scraper.
    pub counts: Counts,
    /// The priority sweep in progress, if any.
    pub sweep: Option<super::operator::Sweep>,
    /// The day the last priority sweep finished for.
    pub swept_day: Option<chrono::NaiveDate>,
}

impl State {
    /// An empty state for `catalog`.
    pub fn new(
        catalog: Arc<Catalog>,
        opts: SchedulerOptions,
        cell: CatalogCell,
        rng: Box<dyn RngCore + Send>,
        now: UnixMs,
    ) -> Self {
        State {
            limits: LimitGroups::new(&catalog.limits, now),
            catalog,
            opts,
            tasks: HashMap::new(),
            leases: HashMap::new(),
            queue: ReadyQueue::default(),
            agents: BTreeMap::new(),
            names: HashMap::new(),
            dispatch_enabled: false,
            rr: 0,
            permits: HashMap::new(),
            unroutable: HashMap::new(),
            cell,
            done_total: 0,
            failed_total: 0,
            line_budgets: HashMap::new(),
            pruned_at: 0,
            retention: crate::config::LogRetention::default(),
            stopping: None,
            rng,
            counts: Counts::default(),
            sweep: None,
            swept_day: None,
        }
    }

    /// The one shared copy of a source or scraper name.
    pub fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(interned) = self.names.get(name) {
            return interned.clone();
        }
        let interned: Arc<str> = Arc::from(name);
        self.names.insert(name.to_string(), interned.clone());
        interned
    }

    /// The in-memory record of a task as stored, its lease left out.
    pub fn active_from_row(&mut self, row: TaskRow) -> Active {
        let source = self.intern(&row.source);
        let scraper = self.intern(&row.scraper);
        Active::pending(
            row.id,
            source,
            scraper,
            row.partition,
            row.expected_keys,
            row.priority,
            row.attempts,
            row.ready_at,
        )
    }

    /// The limit groups a scraper belongs to.
    pub fn scraper_groups(&self, scraper: &str) -> Vec<String> {
        self.catalog
            .scrapers
            .get(scraper)
            .map(|s| s.limits.clone())
            .unwrap_or_default()
    }

    pub fn lease_ttl_ms(&self) -> i64 {
        crate::model::duration_ms(self.opts.lease_ttl)
    }

    /// Counts a task of `source` and `scraper` moving from `from` (none:
    /// new) to `to`, each a (state, base priority).
    pub fn count(
        &mut self,
        source: &Arc<str>,
        scraper: &Arc<str>,
        from: Option<(TaskState, Priority)>,
        to: (TaskState, Priority),
    ) {
        self.counts.moved(
            from.map(|(state, priority)| (state, priority, source.clone(), scraper.clone())),
            (to.0, to.1, source.clone(), scraper.clone()),
        );
    }

    /// Takes an active task into account: a leased one is kept in memory; a
    /// pending one is queued, and kept in memory only when it lands in its
    /// window.
    pub fn remember(&mut self, task: Active) {
        if task.lease.is_some() {
            self.tasks.insert(task.id, task);
            return;
        }
        let (scraper, priority, ready_at, id) =
            (task.scraper.clone(), task.priority, task.ready_at, task.id);
        self.tasks.insert(id, task);
        self.enqueue(&scraper, priority, ready_at, id);
    }

    /// Queues the pending task `id` (in memory); it stays in memory only when
    /// it lands in its window, and tasks its window evicts leave memory.
    pub fn enqueue(
        &mut self,
        scraper: &Arc<str>,
        priority: Priority,
        ready_at: UnixMs,
        id: TaskId,
    ) {
        let placed = self.queue.insert(scraper, priority, ready_at, id);
        if !placed.kept {
            self.tasks.remove(&id);
        }
        for evicted in placed.evicted {
            self.tasks.remove(&evicted);
        }
    }

    /// Queues the new pending task `id`; `make` builds its record only when
    /// it lands in its window. When it cannot be built, the window ends
    /// before the task, which stays in the store for a refill to load.
    pub fn enqueue_with(
        &mut self,
        scraper: &Arc<str>,
        priority: Priority,
        ready_at: UnixMs,
        id: TaskId,
        make: impl FnOnce() -> crate::error::Result<Active>,
    ) {
        let placed = self.queue.insert(scraper, priority, ready_at, id);
        for evicted in placed.evicted {
            self.tasks.remove(&evicted);
        }
        if !placed.kept {
            return;
        }
        match make() {
            Ok(task) => {
                self.tasks.insert(id, task);
            }
            Err(e) => {
                tracing::error!(task = %id, error = %e, "cannot decode a planned task; the store's copy is loaded later");
                for evicted in self.queue.truncate_from(scraper, priority, (ready_at, id)) {
                    self.tasks.remove(&evicted);
                }
            }
        }
    }

    /// Drops a task that left the pending state from memory and the queue.
    pub fn forget(&mut self, id: TaskId) {
        if let Some(task) = self.tasks.remove(&id) {
            self.queue
                .remove(&task.scraper, task.priority, task.ready_at, id);
        }
    }

    /// Queue numbers at `now`: pending and leased from the counts; pending
    /// tasks not ready yet from the store's index, per sub-queue.
    pub fn stats(
        &self,
        conn: &rusqlite::Connection,
        now: UnixMs,
    ) -> crate::error::Result<QueueStats> {
        let mut pending: HashMap<(Arc<str>, Priority), u64> = HashMap::new();
        for ((_, priority, _, scraper), n) in self.counts.of_state(TaskState::Pending) {
            *pending.entry((scraper.clone(), *priority)).or_default() += n;
        }
        let mut delayed = 0;
        for ((scraper, priority), n) in &pending {
            if *n > 0 {
                delayed += crate::store::delayed_count(conn, scraper, *priority, now)?;
            }
        }
        let pending: u64 = pending.values().sum();
        Ok(QueueStats {
            ready: pending.saturating_sub(delayed),
            delayed,
            leased: self.leases.len() as u64,
            dispatching: self.dispatch_enabled,
            done_total: self.done_total,
            failed_total: self.failed_total,
        })
    }
}
