//! Runs the built `adcectl` against a scripted stand-in for adce-server: the
//! real `Control` and `grpc.health.v1.Health` services over loopback gRPC,
//! answering with fixed data. It pins what adcectl sends (filters, paging,
//! resume points) and prints (the JSON shapes scripts rely on), and proves
//! `logs --follow` survives a server restart without losing or repeating a
//! line. End-to-end tests against the real server live in the workspace's
//! `tests/` crate.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use adce_proto::v1 as pb;
use adce_proto::v1::control_server::{Control, ControlServer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::{mpsc as tmpsc, oneshot, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;

/// The stub's idea of "now" (2024-10-22T12:00:01Z), for fixed timestamps.
const T0: i64 = 1_729_598_401_000;

/// How long a test waits for adcectl to print what it expects.
const WAIT: Duration = Duration::from_secs(30);

/// Which life of the stub server is answering: the first one breaks every
/// followed log stream when told to; the second one serves the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    First,
    Second,
}

/// What the stub remembers and how the test steers it.
#[derive(Clone)]
struct Shared {
    /// Every `ListTasks` request, in order.
    list_requests: Arc<Mutex<Vec<pb::ListTasksRequest>>>,
    /// Every `Logs` request with the life that served it.
    logs_requests: Arc<Mutex<Vec<(Life, pb::LogsRequest)>>>,
    /// Set to true to break the first life's followed log streams.
    break_streams: watch::Sender<bool>,
}

impl Shared {
    fn new() -> Self {
        Shared {
            list_requests: Arc::default(),
            logs_requests: Arc::default(),
            break_streams: watch::channel(false).0,
        }
    }
}

struct Stub {
    life: Life,
    shared: Shared,
}

fn log_entry(seq: u64) -> pb::LogEntry {
    pb::LogEntry {
        seq,
        unix_ms: T0 + seq as i64 * 1_000,
        level: pb::LogLevel::Info as i32,
        task_id: 12,
        agent_id: "agent-1".into(),
        source: "espn_pbp".into(),
        stream: pb::OutputStream::Stdout as i32,
        message: format!("line {seq}"),
    }
}

fn loop_state(paused: bool) -> pb::LoopState {
    pb::LoopState {
        enabled: true,
        paused,
        in_cycle: false,
        last_reconcile_unix_ms: T0 - 180_000,
        next_reconcile_unix_ms: T0 + 3_420_000,
        cycle_started_unix_ms: 0,
        cycle_done: 0,
        cycle_failed: 0,
        cycle_deadline_unix_ms: 0,
        cycles: 2,
    }
}

fn task_summary(id: i64) -> pb::TaskSummary {
    pb::TaskSummary {
        id,
        source: "espn_pbp".into(),
        partition: vec![pb::PartitionVar {
            name: "date".into(),
            value: format!("2024-10-{id:02}"),
        }],
        state: pb::TaskState::Dead as i32,
        priority: pb::Priority::High as i32,
        attempts: 3,
        reason: pb::GapReason::Missing as i32,
        last_error: "exit 1: upstream returned 500".into(),
        agent_id: String::new(),
        created_unix_ms: T0 - 86_400_000,
        updated_unix_ms: T0 - 60_000,
        ready_unix_ms: T0,
        partition_key: format!("date=2024-10-{id:02}"),
        progress: 0.0,
        effective_priority: pb::Priority::High as i32,
        priority_reason: "base".into(),
    }
}

fn coverage(expected: u64, present: u64) -> pb::CoverageSummary {
    pb::CoverageSummary {
        expected,
        present,
        missing: expected - present,
        too_small: 0,
        percent: present as f64 * 100.0 / expected as f64,
        stale: 0,
    }
}

#[tonic::async_trait]
impl Control for Stub {
    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        Ok(Response::new(pb::StatusReply {
            version: "0.1.0".into(),
            r#loop: Some(loop_state(false)),
            coverage: Some(coverage(500, 500)),
            tasks: vec![pb::StateCount {
                state: pb::TaskState::Done as i32,
                total: 400,
                by_priority: [("high".to_owned(), 100), ("low".to_owned(), 300)].into(),
            }],
            agents: vec![pb::AgentInfo {
                id: "a1".into(),
                hostname: "h".into(),
                labels: Default::default(),
                slots: 2,
                running_tasks: vec![12],
                version: "0.1.0".into(),
                connected: true,
                last_seen_unix_ms: T0,
                connected_unix_ms: T0 - 1_000,
                address: "127.0.0.1:50000".into(),
            }],
            ready: 0,
            lake: "local:/x".into(),
            waiting: Vec::new(),
            backlog_by_source: Default::default(),
            alerts: Vec::new(),
            coverage_updated_unix_ms: 0,
        }))
    }

    async fn list_tasks(
        &self,
        request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksReply>, Status> {
        let request = request.into_inner();
        self.shared
            .list_requests
            .lock()
            .map_err(|_| Status::internal("poisoned"))?
            .push(request.clone());
        // Five tasks, newest (highest id) first; the token is the offset.
        let all: Vec<i64> = (1..=5).rev().collect();
        let offset: usize = if request.page_token.is_empty() {
            0
        } else {
            request
                .page_token
                .parse()
                .map_err(|_| Status::invalid_argument("bad page token"))?
        };
        let size = request.page_size.max(1) as usize;
        let page: Vec<pb::TaskSummary> = all
            .iter()
            .skip(offset)
            .take(size)
            .map(|&id| task_summary(id))
            .collect();
        let next = offset + page.len();
        Ok(Response::new(pb::ListTasksReply {
            tasks: page,
            next_page_token: if next < all.len() {
                next.to_string()
            } else {
                String::new()
            },
            total: all.len() as u64,
            waiting: Vec::new(),
        }))
    }

    async fn get_task(
        &self,
        request: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::TaskDetail>, Status> {
        let id = request.into_inner().id;
        if id != 3 {
            return Err(Status::not_found(format!("task {id} does not exist")));
        }
        Ok(Response::new(pb::TaskDetail {
            task: Some(task_summary(3)),
            attempts: vec![pb::Attempt {
                number: 1,
                lease_id: "l-0000000000000001".into(),
                agent_id: "a1".into(),
                started_unix_ms: T0 - 120_000,
                ended_unix_ms: T0 - 60_000,
                exit_code: 1,
                outcome: "failed".into(),
                error: "upstream returned 500".into(),
            }],
            expected_keys: vec!["espn/pbp/2024-10-03.json".into()],
            scraper: "espn".into(),
        }))
    }

    async fn list_agents(
        &self,
        _request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsReply>, Status> {
        Ok(Response::new(pb::ListAgentsReply {
            agents: vec![pb::AgentInfo {
                id: "a1".into(),
                hostname: "h".into(),
                labels: [("zone".to_owned(), "eu".to_owned())].into(),
                slots: 2,
                running_tasks: vec![12],
                version: "0.1.0".into(),
                connected: true,
                last_seen_unix_ms: T0,
                connected_unix_ms: T0 - 1_000,
                address: "127.0.0.1:50000".into(),
            }],
        }))
    }

    async fn coverage(
        &self,
        request: Request<pb::CoverageRequest>,
    ) -> Result<Response<pb::CoverageReply>, Status> {
        let request = request.into_inner();
        let source = request.source;
        if !source.is_empty() && source != "espn_pbp" {
            return Err(Status::not_found(format!("no source named {source}")));
        }
        // Like the server: the first `limit` (0: 100) of the 50 missing keys.
        let limit = match request.limit {
            0 => 100,
            n => n as usize,
        };
        let missing_keys = if request.missing {
            (0..50)
                .map(|i| format!("espn/pbp/4017{i:02}.json"))
                .take(limit)
                .collect()
        } else {
            Vec::new()
        };
        Ok(Response::new(pb::CoverageReply {
            sources: vec![pb::SourceCoverage {
                source: "espn_pbp".into(),
                coverage: Some(coverage(200, 150)),
                priority: pb::Priority::High as i32,
                missing_keys,
            }],
            total: Some(coverage(200, 150)),
            computed_unix_ms: T0,
            evidence: "listing".into(),
            updated_unix_ms: 0,
        }))
    }

    type ReconcileStream = ReceiverStream<Result<pb::ReconcileEvent, Status>>;

    async fn reconcile(
        &self,
        _request: Request<pb::ReconcileRequest>,
    ) -> Result<Response<Self::ReconcileStream>, Status> {
        let event = |phase: &str, message: &str| pb::ReconcileEvent {
            phase: phase.into(),
            message: message.into(),
            summary: None,
        };
        let mut done = event("done", "18 tasks created");
        done.summary = Some(pb::ReconcileSummary {
            expected_objects: 200,
            observed_objects: 150,
            gaps: 50,
            tasks_created: 18,
            duration_ms: 1_250,
            coverage: Some(coverage(200, 150)),
        });
        let events = [
            event("expand", "200 expected objects"),
            event("observe", "150 objects listed"),
            done,
        ];
        let (tx, rx) = tmpsc::channel(events.len());
        for e in events {
            tx.send(Ok(e))
                .await
                .map_err(|_| Status::internal("closed"))?;
        }
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type LogsStream = ReceiverStream<Result<pb::LogEntry, Status>>;

    async fn logs(
        &self,
        request: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let request = request.into_inner();
        self.shared
            .logs_requests
            .lock()
            .map_err(|_| Status::internal("poisoned"))?
            .push((self.life, request.clone()));
        let (tx, rx) = tmpsc::channel(16);
        let life = self.life;
        let mut broken = self.shared.break_streams.subscribe();
        tokio::spawn(async move {
            let seqs: Vec<u64> = match life {
                Life::First => vec![1, 2, 3],
                // Entry 3 again, although the server contract says
                // "greater than since_seq": adcectl must not print it twice.
                Life::Second => vec![3, 4, 5],
            };
            for seq in seqs {
                if tx.send(Ok(log_entry(seq))).await.is_err() {
                    return;
                }
            }
            if !request.follow {
                return;
            }
            match life {
                Life::First => {
                    let _ = broken.wait_for(|b| *b).await;
                    let _ = tx.send(Err(Status::unavailable("server restarting"))).await;
                }
                Life::Second => tx.closed().await,
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn pause(
        &self,
        _request: Request<pb::PauseRequest>,
    ) -> Result<Response<pb::LoopReply>, Status> {
        Ok(Response::new(pb::LoopReply {
            r#loop: Some(loop_state(true)),
        }))
    }

    async fn resume(
        &self,
        _request: Request<pb::ResumeRequest>,
    ) -> Result<Response<pb::LoopReply>, Status> {
        Ok(Response::new(pb::LoopReply {
            r#loop: Some(loop_state(false)),
        }))
    }

    // Retry and cancel are tested against the real server end to end.
    async fn retry(
        &self,
        _request: Request<pb::RetryRequest>,
    ) -> Result<Response<pb::RetryReply>, Status> {
        Err(Status::unimplemented("not part of the stand-in"))
    }

    async fn cancel(
        &self,
        _request: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelReply>, Status> {
        Err(Status::unimplemented("not part of the stand-in"))
    }

    async fn reload(
        &self,
        _request: Request<pb::ReloadRequest>,
    ) -> Result<Response<pb::ReloadReply>, Status> {
        Err(Status::unimplemented("not part of the stand-in"))
    }

    async fn drain_agent(
        &self,
        _request: Request<pb::DrainAgentRequest>,
    ) -> Result<Response<pb::DrainAgentReply>, Status> {
        Err(Status::unimplemented("not part of the stand-in"))
    }

    async fn start(
        &self,
        _request: Request<pb::StartRequest>,
    ) -> Result<Response<pb::LoopReply>, Status> {
        Err(Status::unimplemented("not part of the stand-in"))
    }

    async fn stop(
        &self,
        _request: Request<pb::StopRequest>,
    ) -> Result<Response<pb::LoopReply>, Status> {
        Err(Status::unimplemented("not part of the stand-in"))
    }

    async fn restart(
        &self,
        _request: Request<pb::RestartRequest>,
    ) -> Result<Response<pb::LoopReply>, Status> {
        Err(Status::unimplemented("not part of the stand-in"))
    }
}

/// A running stub server; dropping it does not stop it, [`Server::stop`] does.
struct Server {
    address: SocketAddr,
    stop: oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Serves `Control` and `Health` on `listener` until stopped.
    fn start(rt: &Runtime, listener: TcpListener, life: Life, shared: &Shared) -> Server {
        let address = match listener.local_addr() {
            Ok(address) => address,
            Err(e) => panic!("no local address: {e}"),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let stub = Stub {
            life,
            shared: shared.clone(),
        };
        let done = rt.spawn(async move {
            let (reporter, health) = tonic_health::server::health_reporter();
            reporter.set_serving::<ControlServer<Stub>>().await;
            reporter
                .set_service_status("adce.store", ServingStatus::Serving)
                .await;
            reporter
                .set_service_status("adce.lake", ServingStatus::NotServing)
                .await;
            let result = tonic::transport::Server::builder()
                .add_service(health)
                .add_service(ControlServer::new(stub))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = result {
                eprintln!("stub server failed: {e}");
            }
        });
        Server {
            address,
            stop,
            done,
        }
    }

    /// Stops accepting, waits (bounded) for open calls to finish.
    fn stop(self, rt: &Runtime) {
        let _ = self.stop.send(());
        let finished = rt.block_on(async { tokio::time::timeout(WAIT, self.done).await });
        assert!(finished.is_ok(), "the stub server did not stop");
    }
}

fn runtime() -> Runtime {
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("cannot build a runtime: {e}"),
    }
}

fn bind(rt: &Runtime, address: &str) -> TcpListener {
    match rt.block_on(TcpListener::bind(address)) {
        Ok(listener) => listener,
        Err(e) => panic!("cannot bind {address}: {e}"),
    }
}

/// Binds `address` again after a server there stopped. The port may stay
/// busy for a moment (its connections closing, or another test's listener
/// on port 0 handed the same port and already gone), so this tries again
/// for up to [`REBIND_FOR`].
fn rebind(rt: &Runtime, address: &str) -> TcpListener {
    let deadline = Instant::now() + REBIND_FOR;
    loop {
        match rt.block_on(TcpListener::bind(address)) {
            Ok(listener) => return listener,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("cannot bind {address} again: {e}"),
        }
    }
}

/// How long [`rebind`] tries.
const REBIND_FOR: Duration = Duration::from_secs(10);

/// A stub server on a fresh loopback port, with its runtime.
fn serve() -> (Runtime, Server, Shared) {
    let rt = runtime();
    let shared = Shared::new();
    let listener = bind(&rt, "127.0.0.1:0");
    let server = Server::start(&rt, listener, Life::First, &shared);
    (rt, server, shared)
}

/// Runs adcectl against `address` with `args` and waits for it.
fn adcectl(address: SocketAddr, args: &[&str]) -> Output {
    let server = address.to_string();
    match Command::new(env!("CARGO_BIN_EXE_adcectl"))
        .args(["--server", server.as_str(), "--timeout", "5s"])
        .args(args)
        .env_remove("ADCE_SERVER")
        .output()
    {
        Ok(output) => output,
        Err(e) => panic!("cannot run adcectl {args:?}: {e}"),
    }
}

fn json_of(output: &Output) -> Value {
    match serde_json::from_slice(&output.stdout) {
        Ok(value) => value,
        Err(e) => panic!("stdout is not JSON ({e}): {output:?}"),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn status_json_has_exactly_the_documented_shape() {
    let (rt, server, _) = serve();
    let output = adcectl(server.address, &["--json", "status"]);
    assert!(output.status.success(), "{output:?}");
    let zero = json!({"critical": 0, "high": 0, "medium": 0, "low": 0});
    assert_eq!(
        json_of(&output),
        json!({
            "version": "0.1.0",
            "lake": "local:/x",
            "loop": {"enabled": true, "paused": false, "in_cycle": false, "cycles": 2,
                     "last_reconcile_unix_ms": T0 - 180_000,
                     "next_reconcile_unix_ms": T0 + 3_420_000,
                     "cycle_started_unix_ms": 0, "cycle_done": 0, "cycle_failed": 0,
                     "cycle_deadline_unix_ms": 0},
            "coverage": {"expected": 500, "present": 500, "missing": 0, "too_small": 0,
                         "stale": 0, "percent": 100.0}, "coverage_updated_unix_ms": 0,
            "tasks": {"pending": 0, "leased": 0, "done": 400, "dead": 0,
                      "unavailable": 0, "cancelled": 0},
            "tasks_by_priority": {
                "pending": zero, "leased": zero,
                "done": {"critical": 0, "high": 100, "medium": 0, "low": 300},
                "dead": zero, "unavailable": zero, "cancelled": zero
            },
            "ready": 0,
            "agents": [{"id": "a1", "hostname": "h", "slots": 2, "labels": {},
                        "running_tasks": [12], "connected": true, "version": "0.1.0"}],
            "waiting": [],
            "backlog_by_source": {},
            "alerts": []
        })
    );

    let human = adcectl(server.address, &["status"]);
    assert!(human.status.success(), "{human:?}");
    let stdout = text(&human.stdout);
    for needle in ["local:/x", "running, idle", "ready now", "a1", "100.0%"] {
        assert!(stdout.contains(needle), "missing {needle:?}:\n{stdout}");
    }
    server.stop(&rt);
}

#[test]
fn tasks_pass_filters_and_follow_pages_with_all() {
    let (rt, server, shared) = serve();
    let ids = |output: &Output| -> Vec<i64> {
        json_of(output)
            .as_array()
            .map(|a| a.iter().filter_map(|t| t["id"].as_i64()).collect())
            .unwrap_or_default()
    };

    let first_page = adcectl(server.address, &["--json", "tasks", "--limit", "2"]);
    assert!(first_page.status.success(), "{first_page:?}");
    assert_eq!(ids(&first_page), [5, 4]);

    let every_page = adcectl(
        server.address,
        &["tasks", "--json", "--limit", "2", "--all"],
    );
    assert!(every_page.status.success(), "{every_page:?}");
    assert_eq!(ids(&every_page), [5, 4, 3, 2, 1]);
    let third = &json_of(&every_page)[2];
    assert_eq!(
        third,
        &json!({"id": 3, "source": "espn_pbp", "partition": "date=2024-10-03",
                "state": "dead", "priority": "high", "effective_priority": "high",
                "priority_reason": "base", "attempts": 3, "reason": "missing",
                "last_error": "exit 1: upstream returned 500", "agent": "", "progress": 0.0,
                "created_unix_ms": T0 - 86_400_000, "updated_unix_ms": T0 - 60_000,
                "ready_unix_ms": T0})
    );

    let filtered = adcectl(
        server.address,
        &[
            "tasks",
            "--state",
            "dead",
            "--priority",
            "high",
            "--source",
            "espn_pbp",
        ],
    );
    assert!(filtered.status.success(), "{filtered:?}");
    let table = text(&filtered.stdout);
    assert!(
        table.lines().next().is_some_and(|l| l.starts_with("ID")),
        "{table}"
    );
    assert_eq!(table.lines().last(), Some("5 of 5 tasks"), "{table}");

    let requests = shared
        .list_requests
        .lock()
        .map(|r| r.clone())
        .unwrap_or_default();
    let tokens: Vec<&str> = requests.iter().map(|r| r.page_token.as_str()).collect();
    assert_eq!(tokens, ["", "", "2", "4", ""]);
    assert!(requests[..4].iter().all(|r| r.page_size == 2));
    let last = &requests[4];
    assert_eq!(last.state, pb::TaskState::Dead as i32);
    assert_eq!(last.priority, pb::Priority::High as i32);
    assert_eq!(last.source, "espn_pbp");
    assert_eq!(last.page_size, 50);
    server.stop(&rt);
}

#[test]
fn task_detail_and_its_not_found_error() {
    let (rt, server, _) = serve();
    let found = adcectl(server.address, &["--json", "task", "3"]);
    assert!(found.status.success(), "{found:?}");
    let detail = json_of(&found);
    assert_eq!(detail["task"]["id"], json!(3));
    assert_eq!(detail["scraper"], json!("espn"));
    assert_eq!(detail["expected_keys"], json!(["espn/pbp/2024-10-03.json"]));
    assert_eq!(
        detail["attempts"],
        json!([{"number": 1, "lease_id": "l-0000000000000001", "agent_id": "a1",
                "started_unix_ms": T0 - 120_000, "ended_unix_ms": T0 - 60_000,
                "exit_code": 1, "outcome": "failed", "error": "upstream returned 500"}])
    );

    let missing = adcectl(server.address, &["task", "99"]);
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");
    assert_eq!(text(&missing.stderr), "adcectl: task 99 does not exist\n");
    assert!(missing.stdout.is_empty());
    server.stop(&rt);
}

/// `coverage --missing` lists the keys the last reconcile did not find, at
/// most `--limit`, saying how many of how many; `--json` carries them as
/// `missing_keys`; `--limit` alone is a usage error.
#[test]
fn coverage_missing_lists_the_keys() {
    let (rt, server, _) = serve();
    let out = adcectl(
        server.address,
        &[
            "coverage",
            "--source",
            "espn_pbp",
            "--missing",
            "--limit",
            "3",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let stdout = text(&out.stdout);
    let (table, keys) = stdout
        .split_once("\n\n")
        .expect("a blank line before the keys");
    assert!(table.starts_with("SOURCE"), "{stdout}");
    assert_eq!(
        keys,
        "espn_pbp: missing keys (3 of 50):\n  espn/pbp/401700.json\n  espn/pbp/401701.json\n  espn/pbp/401702.json\n"
    );

    let all = adcectl(server.address, &["coverage", "--missing"]);
    assert!(all.status.success(), "{all:?}");
    assert!(
        text(&all.stdout).contains("espn_pbp: missing keys (50):\n  espn/pbp/401700.json\n"),
        "{}",
        text(&all.stdout)
    );

    let json = adcectl(
        server.address,
        &["--json", "coverage", "--missing", "--limit", "2"],
    );
    assert!(json.status.success(), "{json:?}");
    assert_eq!(
        json_of(&json)["sources"][0]["missing_keys"],
        json!(["espn/pbp/401700.json", "espn/pbp/401701.json"])
    );
    // Without --missing no keys travel.
    let plain = adcectl(server.address, &["--json", "coverage"]);
    assert!(json_of(&plain)["sources"][0].get("missing_keys").is_none());

    let usage = adcectl(server.address, &["coverage", "--limit", "3"]);
    assert_eq!(usage.status.code(), Some(2), "{usage:?}");
    assert!(
        text(&usage.stderr).contains("--missing"),
        "{}",
        text(&usage.stderr)
    );
    server.stop(&rt);
}

#[test]
fn agents_and_coverage_json() {
    let (rt, server, _) = serve();
    let agents = adcectl(server.address, &["--json", "agents"]);
    assert!(agents.status.success(), "{agents:?}");
    assert_eq!(
        json_of(&agents),
        json!([{"id": "a1", "hostname": "h", "slots": 2, "labels": {"zone": "eu"},
                "running_tasks": [12], "connected": true, "version": "0.1.0",
                "last_seen_unix_ms": T0, "connected_unix_ms": T0 - 1_000,
                "address": "127.0.0.1:50000"}])
    );

    let cov = adcectl(
        server.address,
        &["--json", "coverage", "--source", "espn_pbp"],
    );
    assert!(cov.status.success(), "{cov:?}");
    let numbers = json!({"expected": 200, "present": 150, "missing": 50, "too_small": 0,
                         "stale": 0, "percent": 75.0});
    let mut row = numbers.clone();
    if let Some(map) = row.as_object_mut() {
        map.insert("source".into(), json!("espn_pbp"));
    }
    assert_eq!(
        json_of(&cov),
        json!({"sources": [row], "total": numbers, "computed_unix_ms": T0,
               "evidence": "listing", "updated_unix_ms": 0})
    );

    let unknown = adcectl(server.address, &["coverage", "--source", "nope"]);
    assert_eq!(unknown.status.code(), Some(1), "{unknown:?}");
    assert_eq!(text(&unknown.stderr), "adcectl: no source named nope\n");
    server.stop(&rt);
}

#[test]
fn health_fails_only_on_names_that_exist_and_do_not_serve() {
    let (rt, server, _) = serve();
    let all = adcectl(server.address, &["--json", "health"]);
    assert_eq!(all.status.code(), Some(1), "{all:?}");
    assert_eq!(
        json_of(&all),
        json!({"": "SERVING", "adce.v1.Control": "SERVING",
               "adce.v1.AgentGateway": "SERVICE_UNKNOWN", "adce.store": "SERVING",
               "adce.lake": "NOT_SERVING", "adce.reconciler": "SERVICE_UNKNOWN",
               "adce.dispatcher": "SERVICE_UNKNOWN"})
    );

    let some = adcectl(server.address, &["health", "", "adce.store", "adce.other"]);
    assert!(some.status.success(), "{some:?}");
    let lines: Vec<Vec<String>> = text(&some.stdout)
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect();
    assert_eq!(
        lines,
        [
            vec!["NAME", "STATUS"],
            vec!["\"\"", "SERVING"],
            vec!["adce.store", "SERVING"],
            vec!["adce.other", "unknown"],
        ]
    );
    server.stop(&rt);
}

#[test]
fn reconcile_streams_phases_to_stderr_and_the_summary_to_stdout() {
    let (rt, server, _) = serve();
    let output = adcectl(server.address, &["--json", "reconcile"]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        text(&output.stderr),
        "expand: 200 expected objects\nobserve: 150 objects listed\ndone: 18 tasks created\n"
    );
    assert_eq!(
        json_of(&output),
        json!({"expected_objects": 200, "observed_objects": 150, "gaps": 50,
               "tasks_created": 18, "duration_ms": 1_250,
               "coverage": {"expected": 200, "present": 150, "missing": 50,
                            "too_small": 0, "stale": 0, "percent": 75.0}})
    );
    server.stop(&rt);
}

#[test]
fn pause_and_resume_print_the_loop() {
    let (rt, server, _) = serve();
    let paused = adcectl(server.address, &["--json", "pause"]);
    assert!(paused.status.success(), "{paused:?}");
    assert_eq!(json_of(&paused)["paused"], json!(true));
    assert_eq!(json_of(&paused)["cycles"], json!(2));
    let resumed = adcectl(server.address, &["resume"]);
    assert!(resumed.status.success(), "{resumed:?}");
    assert!(
        text(&resumed.stdout).contains("running, idle"),
        "{resumed:?}"
    );
    server.stop(&rt);
}

#[test]
fn logs_without_follow_end_when_the_server_closes_the_stream() {
    let (rt, server, shared) = serve();
    let output = adcectl(
        server.address,
        &["logs", "--tail", "3", "--task", "12", "--level", "warn"],
    );
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        text(&output.stdout),
        "2024-10-22T12:00:02.000Z INFO  [task 12 espn_pbp agent-1 stdout] line 1\n\
         2024-10-22T12:00:03.000Z INFO  [task 12 espn_pbp agent-1 stdout] line 2\n\
         2024-10-22T12:00:04.000Z INFO  [task 12 espn_pbp agent-1 stdout] line 3\n"
    );
    let json_lines = adcectl(server.address, &["--json", "logs"]);
    assert!(json_lines.status.success(), "{json_lines:?}");
    let first: Value = match text(&json_lines.stdout)
        .lines()
        .next()
        .map(serde_json::from_str)
    {
        Some(Ok(value)) => value,
        other => panic!("no JSON line: {other:?}"),
    };
    assert_eq!(
        first,
        json!({"seq": 1, "unix_ms": T0 + 1_000, "level": "info", "task_id": 12,
               "agent_id": "agent-1", "source": "espn_pbp", "stream": "stdout",
               "message": "line 1"})
    );
    let requests = shared
        .logs_requests
        .lock()
        .map(|r| r.clone())
        .unwrap_or_default();
    let (_, first_request) = &requests[0];
    assert_eq!(first_request.tail, 3);
    assert!(!first_request.follow);
    assert_eq!(first_request.task_id, 12);
    assert_eq!(first_request.min_level, pb::LogLevel::Warn as i32);
    assert_eq!(requests[1].1.tail, 100);
    server.stop(&rt);
}

/// A child process that is killed if the test fails before stopping it.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Forwards each line of `pipe` to a channel from a thread.
fn lines_of<R: Read + Send + 'static>(pipe: R) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            match line {
                Ok(line) => {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    rx
}

/// Receives lines until `count` have arrived or [`WAIT`] passes.
fn take_lines(rx: &mpsc::Receiver<String>, count: usize) -> Vec<String> {
    let deadline = Instant::now() + WAIT;
    let mut lines = Vec::new();
    while lines.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(_) => break,
        }
    }
    lines
}

fn seq_of(line: &str) -> Option<u64> {
    serde_json::from_str::<Value>(line).ok()?["seq"].as_u64()
}

#[test]
fn logs_follow_survives_a_server_restart_without_losing_or_repeating_lines() {
    let (rt, first, shared) = serve();
    let address = first.address;
    let server = address.to_string();
    let spawned = Command::new(env!("CARGO_BIN_EXE_adcectl"))
        .args([
            "--server",
            server.as_str(),
            "--json",
            "logs",
            "-f",
            "--tail",
            "10",
        ])
        .env_remove("ADCE_SERVER")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut guard = ChildGuard(Some(match spawned {
        Ok(child) => child,
        Err(e) => panic!("cannot start adcectl: {e}"),
    }));
    let (stdout, stderr) = match guard.0.as_mut() {
        Some(child) => (child.stdout.take(), child.stderr.take()),
        None => (None, None),
    };
    let (Some(stdout), Some(stderr)) = (stdout, stderr) else {
        panic!("adcectl's pipes are missing");
    };
    let out = lines_of(stdout);
    let err = lines_of(stderr);

    let before: Vec<Option<u64>> = take_lines(&out, 3).iter().map(|l| seq_of(l)).collect();
    assert_eq!(before, [Some(1), Some(2), Some(3)]);

    // The server goes away: its stream breaks, then it stops listening.
    shared.break_streams.send_replace(true);
    first.stop(&rt);
    let notice = take_lines(&err, 1);
    assert!(
        notice.first().is_some_and(|l| l.contains("reconnecting")),
        "no reconnect notice: {notice:?}"
    );

    // It comes back on the same address.
    let listener = rebind(&rt, &address.to_string());
    let second = Server::start(&rt, listener, Life::Second, &shared);

    let after: Vec<Option<u64>> = take_lines(&out, 2).iter().map(|l| seq_of(l)).collect();
    assert_eq!(after, [Some(4), Some(5)], "lines lost or repeated");

    let Some(mut child) = guard.0.take() else {
        panic!("adcectl is gone");
    };
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    if let Err(e) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM) {
        let _ = child.kill();
        panic!("cannot send SIGTERM: {e}");
    }
    let deadline = Instant::now() + WAIT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("adcectl did not stop on SIGTERM");
            }
        }
    };
    assert!(status.success(), "SIGTERM should exit 0, got {status}");
    // The pipe is closed now; collect whatever the reader still holds.
    let mut rest = Vec::new();
    while let Ok(line) = out.recv_timeout(WAIT) {
        rest.push(line);
    }
    assert!(rest.is_empty(), "more lines after 5: {rest:?}");

    let requests = shared
        .logs_requests
        .lock()
        .map(|r| r.clone())
        .unwrap_or_default();
    let (first_life, first_request) = &requests[0];
    assert_eq!(*first_life, Life::First);
    assert_eq!((first_request.tail, first_request.since_seq), (10, 0));
    assert!(first_request.follow);
    let (last_life, resumed) = &requests[requests.len() - 1];
    assert_eq!(*last_life, Life::Second);
    assert_eq!((resumed.tail, resumed.since_seq), (0, 3));
    assert!(resumed.follow);
    second.stop(&rt);
}
