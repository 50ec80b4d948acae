//! Property tests of the scheduler's state machine against a model. Random
//! interleavings of agent connects (claiming the leases the agent still
//! runs), disconnects, results (fresh and late), the clock moving on (lease
//! expiry, retries coming due), operator retries and cancels, new plans,
//! reloads and restarts (the state reopened from the store) are driven
//! through `State::handle`, `tick` and `dispatch` with the same apply and
//! commit steps as the run loop, on a real SQLite store.
//!
//! The ready queue's windows are two tasks wide here, so most pending tasks
//! live in the store only and windows are evicted and refilled all along.
//!
//! After every step: no task is lost (the leased tasks in the store are the
//! live leases in memory; each window is a prefix of its sub-queue in the
//! store, and a window that claims its whole sub-queue holds all of it; the
//! tasks in memory agree with the store), none is leased twice,
//! no agent is over its slots, every lease ends in exactly one verdict (one
//! attempt row per lease, open exactly while it is live, and a second result
//! for it is refused), and no limit group is over its concurrency.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use rand::SeedableRng;
use rusqlite::Connection;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use super::effects::Effects;
use super::handle::Command;
use super::run::load;
use super::state::State;
use super::verdict::Outcome;
use super::{
    AdmissionLimits, AgentHello, CatalogCell, ObjectCheck, PlannedTask, RetrySelection,
    SchedulerOptions, TaskResult, ToAgent,
};
use crate::catalog::Catalog;
use crate::config::Config;
use crate::logs::LogBus;
use crate::model::{AgentId, GapReason, LeaseId, Partition, Priority, TaskId, UnixMs, Value};
use crate::store;

const CONFIG: &str = "\
version: 1
lake:
  local:
    root: lake
limits:
  site: {rate: 100/s, burst: 5, max_concurrent: 3}
scrapers:
  s:
    command: [\"true\"]
    retry: {max_attempts: 3, backoff: 1s, max_backoff: 4s}
    limits: [site]
  t:
    command: [\"true\"]
    retry: {max_attempts: 2, backoff: 1s, max_backoff: 2s}
sources:
  - name: a
    scraper: s
    partitions:
      values: {var: item, values: [\"1\"]}
    objects: [\"a/{item}.json\"]
  - name: b
    scraper: t
    partitions:
      values: {var: item, values: [\"1\"]}
    objects: [\"b/{item}.json\"]
";

const AGENTS: usize = 3;
/// Windows this small make most pending tasks live in the store only.
const SMALL_WINDOW: usize = 2;
const LEASE_TTL: Duration = Duration::from_secs(30);

/// One thing that happens to the scheduler.
#[derive(Debug, Clone)]
enum Step {
    /// Agent `n` connects with `slots`, claiming the leases it runs.
    Connect { n: usize, slots: u32 },
    /// Agent `n`'s stream ends.
    Disconnect { n: usize },
    /// Agent `n` reports the run of its `pick`-th lease ended with `outcome`
    /// (late: a lease that already ended).
    Result {
        n: usize,
        pick: usize,
        outcome: Outcome,
        missing: bool,
        late: bool,
    },
    /// Agent `n` heartbeats the leases it runs.
    Heartbeat { n: usize },
    /// The clock moves on by `ms`.
    Advance { ms: i64 },
    /// An operator retries every dead task.
    RetryDead,
    /// An operator cancels the `pick`-th task.
    Cancel { pick: usize },
    /// Reconcile plans `count` new partitions of source `a` or `b`.
    Plan { on_b: bool, count: u8 },
    /// The catalog is reloaded.
    Reload,
    /// The server restarts: the state is reopened from the store.
    Restart,
}

fn any_outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        4 => Just(Outcome::Exited(0)),
        1 => Just(Outcome::Exited(69)),
        2 => Just(Outcome::Exited(1)),
        1 => Just(Outcome::Exited(75)),
        1 => Just(Outcome::TimedOut),
        1 => Just(Outcome::SpawnFailed),
        1 => Just(Outcome::Refused),
    ]
}

fn any_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..AGENTS, 1u32..4).prop_map(|(n, slots)| Step::Connect { n, slots }),
        1 => (0..AGENTS).prop_map(|n| Step::Disconnect { n }),
        8 => (0..AGENTS, 0usize..8, any_outcome(), any::<bool>(), prop::bool::weighted(0.1))
            .prop_map(|(n, pick, outcome, missing, late)| Step::Result { n, pick, outcome, missing, late }),
        2 => (0..AGENTS).prop_map(|n| Step::Heartbeat { n }),
        3 => prop_oneof![Just(100i64), Just(2_000), Just(40_000)].prop_map(|ms| Step::Advance { ms }),
        1 => Just(Step::RetryDead),
        1 => (0usize..64).prop_map(|pick| Step::Cancel { pick }),
        2 => (any::<bool>(), 1u8..6).prop_map(|(on_b, count)| Step::Plan { on_b, count }),
        1 => Just(Step::Reload),
        1 => Just(Step::Restart),
    ]
}

/// An agent as the model sees it.
#[derive(Default)]
struct ModelAgent {
    /// Its stream, while connected.
    rx: Option<UnboundedReceiver<ToAgent>>,
    conn_id: u64,
    slots: u32,
    /// Leases it runs (it keeps running them across disconnects).
    running: Vec<(LeaseId, TaskId)>,
}

struct Harness {
    _dir: tempfile::TempDir,
    state_dir: std::path::PathBuf,
    conn: store::Writer,
    state: State,
    catalog: Arc<Catalog>,
    now: UnixMs,
    next_conn: u64,
    next_item: u64,
    agents: Vec<ModelAgent>,
    /// Every lease ever assigned, with its task.
    issued: HashMap<LeaseId, TaskId>,
    /// Leases that ended (result judged, expired, lost, cancelled).
    ended: HashSet<LeaseId>,
    /// Every task ever created.
    created: HashSet<TaskId>,
    /// Restarts so far (each seeds its lease ids apart).
    restarts: u64,
    bus: LogBus,
}

fn options() -> SchedulerOptions {
    SchedulerOptions {
        heartbeat_interval: Duration::from_secs(5),
        lease_ttl: LEASE_TTL,
        config_dir: std::path::PathBuf::from("/"),
        no_agent_after: Duration::from_secs(60),
        aging: Duration::from_secs(3600),
        metrics: crate::metrics::Metrics::new(),
    }
}

/// A state reopened from the store, with windows of `window` tasks.
fn fresh_state(
    conn: &Connection,
    catalog: &Arc<Catalog>,
    now: UnixMs,
    seed: u64,
    window: usize,
) -> State {
    let mut state = State::new(
        catalog.clone(),
        options(),
        CatalogCell::new(catalog.clone()),
        Box::new(rand::rngs::StdRng::seed_from_u64(seed)),
        now,
    );
    state.queue = super::queue::ReadyQueue::with_window(window);
    load(conn, &mut state, now).unwrap();
    state.dispatch_enabled = true;
    state
}

impl Harness {
    fn new() -> Self {
        Harness::with(CONFIG, 1_000_000)
    }

    /// A harness for the catalog of `config`, its clock at `now`.
    fn with(config: &str, now: UnixMs) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::parse(config, &dir.path().join("adce.yaml")).unwrap();
        let catalog = Arc::new(Catalog::from_config(&cfg));
        let state_dir = dir.path().join("state");
        let conn = store::Writer::open(&state_dir).unwrap();
        let state = fresh_state(&conn, &catalog, now, 1, SMALL_WINDOW);
        Harness {
            _dir: dir,
            state_dir,
            conn,
            state,
            catalog,
            now,
            next_conn: 1,
            next_item: 1,
            agents: (0..AGENTS).map(|_| ModelAgent::default()).collect(),
            issued: HashMap::new(),
            ended: HashSet::new(),
            created: HashSet::new(),
            restarts: 0,
            bus: LogBus::default(),
        }
    }

    /// Runs `cmd` (if any), a tick and a dispatch like one batch of the run
    /// loop, then reads what each agent was sent.
    fn batch(&mut self, cmd: Option<Command>) {
        let mut fx = Effects::default();
        let txn = self.conn.transaction().unwrap();
        if let Some(cmd) = cmd {
            self.state.handle(&txn, &mut fx, cmd, self.now).unwrap();
            fx.apply(&txn).unwrap();
        }
        self.state.tick(&txn, &mut fx, self.now).unwrap();
        self.state.end_batch(&txn, &mut fx, self.now, true).unwrap();
        fx.apply(&txn).unwrap();
        txn.commit().unwrap();
        fx.release(&self.bus);
        self.read_streams();
    }

    /// Sends `make`'s command with a reply channel and returns the reply.
    fn call<T>(&mut self, make: impl FnOnce(super::handle::Reply<T>) -> Command) -> T {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        self.batch(Some(make(tx)));
        rx.try_recv().expect("a reply after the commit")
    }

    fn read_streams(&mut self) {
        for agent in &mut self.agents {
            let mut messages = Vec::new();
            if let Some(rx) = agent.rx.as_mut() {
                while let Ok(message) = rx.try_recv() {
                    messages.push(message);
                }
            }
            for message in messages {
                match message {
                    ToAgent::Assign(a) => {
                        assert!(
                            self.issued.insert(a.lease.clone(), a.task_id).is_none(),
                            "lease {} issued twice",
                            a.lease
                        );
                        agent.running.push((a.lease, a.task_id));
                        assert!(
                            agent.running.len() <= agent.slots as usize,
                            "agent over its {} slots",
                            agent.slots
                        );
                    }
                    ToAgent::Cancel { lease, .. } => {
                        // The agent kills the run: it no longer runs it.
                        agent.running.retain(|(l, _)| *l != lease);
                    }
                    ToAgent::End(_) => agent.rx = None,
                    ToAgent::Welcome { .. } | ToAgent::Drain { .. } | ToAgent::Stopping(_) => {}
                }
            }
        }
    }

    fn apply(&mut self, step: &Step) {
        match *step {
            Step::Connect { n, slots } => {
                if self.agents[n].rx.is_some() {
                    return;
                }
                let (tx, rx) = unbounded_channel();
                let conn_id = self.next_conn;
                self.next_conn += 1;
                let hello = AgentHello {
                    agent_id: format!("agent-{n}"),
                    hostname: "h".into(),
                    labels: BTreeMap::new(),
                    // A reconnecting agent keeps at least the slots it fills.
                    slots: slots.max(self.agents[n].running.len() as u32),
                    version: "test".into(),
                    running_leases: self.agents[n]
                        .running
                        .iter()
                        .map(|(l, _)| l.clone())
                        .collect(),
                };
                let slots = hello.slots;
                let agent = &mut self.agents[n];
                agent.rx = Some(rx);
                agent.conn_id = conn_id;
                agent.slots = slots;
                let result = self.call(|reply| Command::Connect {
                    hello,
                    address: "127.0.0.1:1".into(),
                    conn_id,
                    tx,
                    limits: AdmissionLimits::default(),
                    reply,
                });
                if result.is_err() {
                    // Refused (its old stream is still active): it retries later.
                    self.agents[n].rx = None;
                }
                // Leases it claimed that are not live were cancelled; the
                // ones the server thought it held and it does not claim
                // ended as lost.
                self.sync_ended();
            }
            Step::Disconnect { n } => {
                if self.agents[n].rx.take().is_none() {
                    return;
                }
                let conn_id = self.agents[n].conn_id;
                self.batch(Some(Command::Disconnect {
                    agent: AgentId(format!("agent-{n}")),
                    conn_id,
                }));
            }
            Step::Result {
                n,
                pick,
                outcome,
                missing,
                late,
            } => {
                let lease = if late {
                    let ended: Vec<&LeaseId> = self.ended.iter().collect();
                    if ended.is_empty() {
                        return;
                    }
                    let mut ended: Vec<LeaseId> = ended.into_iter().cloned().collect();
                    ended.sort();
                    ended[pick % ended.len()].clone()
                } else {
                    let running = &self.agents[n].running;
                    if running.is_empty() {
                        return;
                    }
                    running[pick % running.len()].0.clone()
                };
                if !late {
                    self.agents[n].running.retain(|(l, _)| *l != lease);
                }
                let live_before = self.state.leases.contains_key(&lease);
                let check = ObjectCheck {
                    missing: if missing { vec!["k".into()] } else { vec![] },
                    too_small: vec![],
                };
                let result = self.call(|reply| Command::Complete {
                    agent: AgentId(format!("agent-{n}")),
                    result: TaskResult {
                        lease: lease.clone(),
                        outcome,
                        message: String::new(),
                    },
                    check,
                    reply,
                });
                if self.ended.contains(&lease) {
                    assert!(result.is_err(), "a second verdict for lease {lease}");
                }
                assert_eq!(
                    result.is_ok(),
                    live_before,
                    "result for {lease}: {result:?}"
                );
                if result.is_ok() {
                    self.ended.insert(lease);
                }
                self.sync_ended();
            }
            Step::Heartbeat { n } => {
                if self.agents[n].rx.is_none() {
                    return;
                }
                let running = self.agents[n]
                    .running
                    .iter()
                    .map(|(l, _)| l.clone())
                    .collect();
                self.batch(Some(Command::Heartbeat {
                    agent: AgentId(format!("agent-{n}")),
                    running,
                }));
            }
            Step::Advance { ms } => {
                self.now += ms;
                self.batch(None);
                self.sync_ended();
            }
            Step::RetryDead => {
                let result = self.call(|reply| Command::Retry {
                    which: RetrySelection::State(crate::model::TaskState::Dead, None),
                    reply,
                });
                assert!(result.is_ok(), "{result:?}");
            }
            Step::Cancel { pick } => {
                let mut ids: Vec<TaskId> = self.created.iter().copied().collect();
                if ids.is_empty() {
                    return;
                }
                ids.sort();
                let id = ids[pick % ids.len()];
                let _ = self.call(|reply| Command::Cancel {
                    id,
                    reason: "test".into(),
                    reply,
                });
                self.sync_ended();
            }
            Step::Plan { on_b, count } => {
                let (source, scraper) = if on_b { ("b", "t") } else { ("a", "s") };
                let tasks: Vec<PlannedTask> = (0..count)
                    .map(|_| {
                        let item = self.next_item.to_string();
                        self.next_item += 1;
                        PlannedTask::new(
                            source,
                            scraper,
                            &Partition {
                                vars: vec![("item".into(), Value::Str(item.clone()))],
                            },
                            Priority::Medium,
                            GapReason::Missing,
                            &[format!("{source}/{item}.json")],
                        )
                    })
                    .collect();
                let created = self.call(|reply| Command::ApplyPlan {
                    tasks,
                    observed_at: 0,
                    reply,
                });
                assert_eq!(created.unwrap(), u64::from(count));
                let ids = store::ids_in_state(&self.conn, crate::model::TaskState::Pending, None)
                    .unwrap();
                self.created.extend(ids);
            }
            Step::Reload => {
                let catalog = self.catalog.clone();
                self.call(|reply| Command::Reload { catalog, reply });
            }
            Step::Restart => {
                for agent in &mut self.agents {
                    agent.rx = None;
                }
                let conn = store::Writer::open(&self.state_dir).unwrap();
                self.conn = conn;
                self.restarts += 1;
                self.state = fresh_state(
                    &self.conn,
                    &self.catalog,
                    self.now,
                    1 + self.restarts,
                    SMALL_WINDOW,
                );
            }
        }
    }

    /// Marks every issued lease that is no longer live as ended.
    fn sync_ended(&mut self) {
        for lease in self.issued.keys() {
            if !self.state.leases.contains_key(lease) {
                self.ended.insert(lease.clone());
            }
        }
    }

    fn check(&self) {
        let rows = store::load_active(&self.conn).unwrap();
        let by_id: HashMap<TaskId, &store::TaskRow> = rows.iter().map(|r| (r.id, r)).collect();
        // Every task in memory is active in the store, as remembered.
        for (id, task) in &self.state.tasks {
            let row = by_id
                .get(id)
                .unwrap_or_else(|| panic!("task {id} in memory only"));
            assert_eq!(task.lease.is_some(), row.lease.is_some(), "task {id} state");
            assert_eq!(
                (task.priority, &*task.scraper),
                (row.priority, row.scraper.as_str())
            );
            if task.lease.is_none() {
                assert_eq!(task.ready_at, row.ready_at, "task {id} ready time");
            }
        }
        // Every window is a prefix of its sub-queue; a complete one is all
        // of it; every sub-queue with pending tasks has a window.
        let mut subqueues: BTreeMap<(String, Priority), Vec<(UnixMs, TaskId)>> = BTreeMap::new();
        for row in rows.iter().filter(|r| r.lease.is_none()) {
            subqueues
                .entry((row.scraper.clone(), row.priority))
                .or_default()
                .push((row.ready_at, row.id));
        }
        let windows = self.state.queue.windows();
        let mut in_windows = 0;
        for (scraper, priority, keys, complete) in &windows {
            let mut stored = subqueues
                .get(&(scraper.to_string(), *priority))
                .cloned()
                .unwrap_or_default();
            stored.sort();
            assert!(
                keys.len() <= stored.len() && keys[..] == stored[..keys.len()],
                "window of {scraper} {priority} is not a prefix: {keys:?} vs {stored:?}"
            );
            if *complete {
                assert_eq!(
                    keys.len(),
                    stored.len(),
                    "complete window of {scraper} {priority}"
                );
            }
            for (_, id) in keys {
                assert!(
                    self.state.tasks.contains_key(id),
                    "windowed task {id} not in memory"
                );
            }
            in_windows += keys.len();
        }
        for (scraper, priority) in subqueues.keys() {
            assert!(
                windows
                    .iter()
                    .any(|(s, p, ..)| **s == **scraper && p == priority),
                "pending tasks of {scraper} {priority} have no window"
            );
        }
        let pending_in_memory = self
            .state
            .tasks
            .values()
            .filter(|t| t.lease.is_none())
            .count();
        assert_eq!(
            in_windows, pending_in_memory,
            "pending tasks in memory are windowed"
        );
        assert_eq!(self.state.queue.in_memory(), in_windows);
        // No task lost: every task created still exists.
        for id in &self.created {
            assert!(
                store::get_task(&self.conn, *id).unwrap().is_some(),
                "task {id} lost"
            );
        }
        // None leased twice: one live lease per leased task, matching the store.
        let mut leased_tasks = HashSet::new();
        for (lease, task) in &self.state.leases {
            assert!(leased_tasks.insert(*task), "task {task} leased twice");
            let held = self.state.tasks[task].lease.as_ref().map(|l| &l.id);
            assert_eq!(held, Some(lease));
        }
        for row in &rows {
            if let Some((lease, _)) = &row.lease {
                assert_eq!(self.state.leases.get(lease), Some(&row.id));
            }
        }
        // No agent over its slots.
        for (id, agent) in &self.state.agents {
            assert!(
                agent.running.len() <= agent.slots as usize,
                "agent {id} runs {} with {} slots",
                agent.running.len(),
                agent.slots
            );
        }
        // Every lease has one attempt row, open exactly while it is live.
        let mut stmt = self
            .conn
            .prepare("SELECT lease_id, ended_at IS NULL FROM attempts")
            .unwrap();
        let attempts: Vec<(String, bool)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let mut seen = HashSet::new();
        for (lease, open) in attempts {
            assert!(
                seen.insert(lease.clone()),
                "two attempt rows for lease {lease}"
            );
            let live = self.state.leases.contains_key(&LeaseId(lease.clone()));
            assert_eq!(
                open, live,
                "lease {lease}: attempt open {open}, live {live}"
            );
        }
        // Every live lease has its row. (A run that did not count, refused
        // or stopped with `stop --now`, gives its attempt number back, and
        // the next run's row replaces its row.)
        for lease in self.state.leases.keys() {
            assert!(seen.contains(&lease.0), "lease {lease} has no attempt row");
        }
        // The maintained counts match the tasks.
        let truth = count_query(
            &self.conn,
            "SELECT state, priority, source, scraper, COUNT(*) FROM tasks GROUP BY 1, 2, 3, 4",
        );
        let stored = count_query(
            &self.conn,
            "SELECT state, priority, source, scraper, n FROM task_counts WHERE n != 0",
        );
        assert_eq!(stored, truth, "stored task counts");
        // No limit group over its concurrency.
        for group in self.state.limits.snapshot(self.now) {
            if let Some(max) = group.max_concurrent {
                assert!(
                    group.running <= max,
                    "group {} runs {} over {max}",
                    group.name,
                    group.running
                );
            }
        }
    }
}

/// Rows of (state, priority, source, scraper, n), in order.
fn count_query(conn: &Connection, sql: &str) -> Vec<(String, i64, String, String, i64)> {
    let mut stmt = conn.prepare(sql).unwrap();
    let mut rows: Vec<_> = stmt
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    rows.sort();
    rows
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(64),
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_state_machine_keeps_its_invariants(steps in prop::collection::vec(any_step(), 1..80)) {
        let mut h = Harness::new();
        h.apply(&Step::Plan { on_b: false, count: 4 });
        h.apply(&Step::Plan { on_b: true, count: 2 });
        for step in &steps {
            h.apply(step);
            h.check();
        }
    }
}

/// Every pending task in dispatch order at `now`, for an agent that may run
/// every scraper, refilling windows from the store as they run low; the
/// store is left as it was.
fn drain_order(state: &mut State, conn: &mut store::Writer, now: UnixMs) -> Vec<TaskId> {
    let names: Vec<String> = state.catalog.scrapers.keys().cloned().collect();
    let scrapers: Vec<Arc<str>> = names.iter().map(|s| state.intern(s)).collect();
    let txn = conn.transaction().unwrap();
    let mut order = Vec::new();
    loop {
        state.refill(&txn).unwrap();
        let Some(head) = state
            .queue
            .heads(scrapers.iter(), now, state.opts.aging)
            .first()
            .cloned()
        else {
            break;
        };
        state.queue.pop(&head.scraper, head.base);
        order.push(head.key.2);
    }
    txn.rollback().unwrap();
    order
}

#[test]
fn the_queue_order_after_a_restart_equals_the_order_before() {
    const TASKS: u64 = 100_000;
    const CHUNK: u64 = 5_000;
    let mut h = Harness::new();
    h.state.queue = super::queue::ReadyQueue::default();
    // Chunks planned at different times, priorities spread by a hash of the
    // item, two scrapers: every sub-queue spills far beyond its window.
    let mut planned = 0;
    while planned < TASKS {
        let tasks: Vec<PlannedTask> = (planned..planned + CHUNK)
            .map(|i| {
                let (source, scraper) = if i % 3 == 0 { ("b", "t") } else { ("a", "s") };
                PlannedTask::new(
                    source,
                    scraper,
                    &Partition {
                        vars: vec![("item".into(), Value::Str(i.to_string()))],
                    },
                    Priority::ALL[(i.wrapping_mul(2_654_435_761) % 4) as usize],
                    GapReason::Missing,
                    &[format!("{source}/{i}.json")],
                )
            })
            .collect();
        // Each chunk is planned an hour after the last, so aging reorders.
        h.now += 3_600_000;
        let created = h.call(|reply| Command::ApplyPlan {
            tasks,
            observed_at: 0,
            reply,
        });
        assert_eq!(created.unwrap(), CHUNK);
        planned += CHUNK;
    }
    let now = h.now + 1;
    assert!(
        h.state.tasks.len() < 4 * 2 * 2 * super::queue::WINDOW + 1,
        "{} tasks in memory with {TASKS} pending",
        h.state.tasks.len()
    );
    let before = drain_order(&mut h.state, &mut h.conn, now);
    assert_eq!(before.len() as u64, TASKS);
    // The order is (effective priority, ready time, id), aging included.
    let rows = store::load_active(&h.conn).unwrap();
    let mut expected: Vec<_> = rows
        .iter()
        .map(|r| {
            let (effective, _) =
                crate::priority::effective(r.priority, r.ready_at, now, h.state.opts.aging);
            (std::cmp::Reverse(effective), r.ready_at, r.id)
        })
        .collect();
    expected.sort();
    let expected: Vec<TaskId> = expected.into_iter().map(|k| k.2).collect();
    assert_eq!(before, expected);

    // A restart: a new state reopened from the store.
    let mut conn = store::Writer::open(&h.state_dir).unwrap();
    let mut restarted = fresh_state(&conn, &h.catalog, now, 99, super::queue::WINDOW);
    let after = drain_order(&mut restarted, &mut conn, now);
    assert_eq!(after, before);
}

#[test]
fn when_the_day_changes_the_sweep_moves_priorities_by_the_rules() {
    const DAY: UnixMs = 86_400_000;
    // Noon on 2024-01-10: the 9th and 10th are within a day.
    let day10 = chrono::NaiveDate::from_ymd_opt(2024, 1, 10)
        .unwrap()
        .and_hms_opt(12, 0, 0)
        .unwrap()
        .and_utc()
        .timestamp_millis();
    let mut h = Harness::with(
        "version: 1
lake:
  local:
    root: lake
scrapers:
  s:
    command: [\"true\"]
sources:
  - name: daily
    scraper: s
    priority: low
    priority_rules:
      - {within: 1d, priority: critical}
    partitions:
      dates: {start: 2024-01-01, end: 2024-01-10}
    objects: [\"daily/{date:%Y%m%d}.json\"]
",
        day10,
    );
    let date = |d: u32| chrono::NaiveDate::from_ymd_opt(2024, 1, d).unwrap();
    let rules = h.catalog.sources[0].priority_rules.clone();
    let tasks = (1..=10)
        .map(|d| {
            let partition = Partition {
                vars: vec![("date".into(), Value::Date(date(d)))],
            };
            let priority = rules.base_for(&partition, date(10)).0;
            PlannedTask::new(
                "daily",
                "s",
                &partition,
                priority,
                GapReason::Missing,
                &[format!("daily/202401{d:02}.json")],
            )
        })
        .collect();
    let created = h.call(|reply| Command::ApplyPlan {
        tasks,
        observed_at: 0,
        reply,
    });
    assert_eq!(created.unwrap(), 10);
    let critical = |conn: &Connection| -> Vec<String> {
        let mut stmt = conn
            .prepare("SELECT partition_key FROM tasks WHERE priority = 4 ORDER BY partition_key")
            .unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    };
    assert_eq!(critical(&h.conn), ["date=2024-01-09", "date=2024-01-10"]);
    // Two days on, nothing is within a day any more.
    h.now = day10 + 2 * DAY;
    h.batch(None);
    assert!(critical(&h.conn).is_empty(), "{:?}", critical(&h.conn));
    h.check();
    // The windows follow: the order is by date again, all low.
    let now = h.now;
    let order = drain_order(&mut h.state, &mut h.conn, now);
    assert_eq!(order.len(), 10);
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
}
