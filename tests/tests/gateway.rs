//! The agent gateway in process: a real scheduler (its SQLite state in a
//! temporary directory) and the `AgentGateway` service on a loopback port,
//! driven over real gRPC by the harness's hand-made agent ([`RawAgent`]).
//! Where `e2e/confinement.rs` goes through the whole server binary, these
//! tests set the gateway's limits directly and look at the scheduler through
//! its handle: uploads confined to the lease holder and its keys, admission
//! (`max_agents`, unique ids, a reconnect after a half-open stream, the slot
//! cap), the message budget and the size limit, the stop notice, and the
//! configured log retention. They need no built binaries and no venv.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use adce_proto::v1 as pb;
use adce_proto::v1::agent_message::Kind as In;
use adce_proto::v1::server_message::Kind as Out;
use adce_server::catalog::Catalog;
use adce_server::config::{Config, LogRetention};
use adce_server::gateway::{Gateway, GatewayLimits};
use adce_server::lake::{LocalLake, SharedLake};
use adce_server::logs::{Event, LogBus};
use adce_server::metrics::Metrics;
use adce_server::model::{GapReason, Partition, Priority, Value};
use adce_server::scheduler::{AdmissionLimits, Handle, PlannedTask, SchedulerOptions};
use adce_server::store;
use adce_server::transport::apply_transport_limits;
use adce_tests::raw_agent::RawAgent;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

/// How long a test waits for one log row from the scheduler.
const WAIT: Duration = Duration::from_secs(10);

/// One scraper and one source of three items, with a local lake.
const CONFIG: &str = "\
version: 1
lake:
  local:
    root: lake
scrapers:
  s:
    command: [\"true\"]
sources:
  - name: a
    scraper: s
    partitions:
      values: {var: item, values: [\"1\", \"2\", \"3\"]}
    objects: [\"a/{item}.json\"]
";

/// A scheduler and a gateway on a loopback port, with tasks planned; both
/// stop when it is dropped.
struct Bench {
    dir: tempfile::TempDir,
    lake_root: PathBuf,
    sched: Handle,
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Drop for Bench {
    fn drop(&mut self) {
        self.stop.cancel();
        self.sched.stop();
    }
}

/// Starts a [`Bench`] whose gateway enforces `limits`, with one task of
/// source `a` per item planned and dispatch on.
async fn bench(limits: GatewayLimits, items: &[&str]) -> Bench {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::parse(CONFIG, &dir.path().join("adce.yaml")).unwrap();
    let catalog = Arc::new(Catalog::from_config(&cfg));
    let metrics = Metrics::new();
    let (sched, _thread) = adce_server::scheduler::spawn(
        &dir.path().join("state"),
        catalog,
        SchedulerOptions {
            heartbeat_interval: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(30),
            config_dir: dir.path().to_owned(),
            no_agent_after: Duration::from_secs(3600),
            aging: Duration::ZERO,
            metrics: metrics.clone(),
        },
        LogBus::default(),
    )
    .unwrap();
    let lake_root = dir.path().join("lake");
    let lake: SharedLake = Arc::new(LocalLake::open(&lake_root).unwrap());
    let gateway = Gateway::new(sched.clone(), lake, 1 << 20, metrics);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let serve = apply_transport_limits(tonic::transport::Server::builder(), &limits)
        .add_service(gateway.into_service(&limits))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), {
            let stop = stop.clone();
            async move { stop.cancelled().await }
        });
    tokio::spawn(serve);
    let tasks = items
        .iter()
        .map(|item| {
            PlannedTask::new(
                "a",
                "s",
                &Partition {
                    vars: vec![("item".into(), Value::Str(item.to_string()))],
                },
                Priority::Medium,
                GapReason::Missing,
                &[format!("a/{item}.json")],
            )
        })
        .collect();
    sched.apply_plan(tasks, 0).await.unwrap();
    sched.set_dispatch(true).unwrap();
    Bench {
        dir,
        lake_root,
        sched,
        addr,
        stop,
    }
}

impl Bench {
    /// Connects a heartbeating agent `id` with `slots` and reads its Welcome.
    async fn agent(&self, id: &str, slots: u32) -> Result<RawAgent, Status> {
        RawAgent::connect(&format!("http://{}", self.addr), id, slots).await
    }

    /// Like [`Bench::agent`], for an agent that never heartbeats.
    async fn quiet_agent(&self, id: &str, slots: u32) -> Result<RawAgent, Status> {
        RawAgent::connect_quiet(&format!("http://{}", self.addr), id, slots).await
    }

    /// The ids of the agents the scheduler knows.
    async fn agents(&self) -> BTreeSet<String> {
        self.sched
            .agents()
            .await
            .unwrap()
            .into_iter()
            .map(|a| a.id.0)
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_confined_to_the_lease_holder_and_its_keys() {
    let bench = bench(GatewayLimits::default(), &["1", "2"]).await;
    let mut x = bench.agent("x", 1).await.unwrap();
    let mut y = bench.agent("y", 1).await.unwrap();
    let (ax, ay) = (x.assign().await, y.assign().await);
    let (kx, ky) = (ax.expected_keys[0].clone(), ay.expected_keys[0].clone());
    let lx = ax.lease_id.clone();

    // Another task's key under x's own lease.
    let err = x.upload(&lx, "x", &ky, b"{}").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // x's key under x's lease, but sent by y or claiming another agent.
    let err = y.upload(&lx, "y", &kx, b"{}").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(err.message(), format!("lease {lx} is not held by agent y"));
    let err = x.upload(&lx, "", &kx, b"{}").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // Keys that would leave the lake or are not normalized.
    for key in [
        "../escape",
        "/abs",
        "a\\b",
        "a/\u{7}b",
        "a//1.json",
        "a/./1.json",
    ] {
        let err = x.upload(&lx, "x", key, b"{}").await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{key:?}: {err:?}");
    }
    let parent = bench.lake_root.parent().unwrap();
    assert!(!parent.join("escape").exists());
    assert!(
        bench.lake_root.read_dir().unwrap().next().is_none(),
        "the lake is empty"
    );

    // The holder's own key goes through.
    let reply = x.upload(&lx, "x", &kx, b"{}").await.unwrap();
    assert_eq!(reply.size, 2);
    assert!(bench.lake_root.join(&kx).is_file());
    assert!(!bench.lake_root.join(&ky).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_agents_refuses_a_new_agent_but_not_a_reconnect_and_ids_are_unique() {
    let limits = GatewayLimits {
        admission: AdmissionLimits {
            max_agents: 2,
            max_slots: 4,
        },
        ..GatewayLimits::default()
    };
    let bench = bench(limits, &[]).await;
    // `a` never heartbeats, so its stream goes half-open below.
    let _a = bench.quiet_agent("a", 1).await.unwrap();
    let _b = bench.agent("b", 4).await.unwrap();
    let err = bench.agent("c", 1).await.err().unwrap();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("server.max_agents is 2"), "{err:?}");
    // The same id again, while the first is active, is refused...
    let err = bench.agent("a", 1).await.err().unwrap();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(
        err.message().contains("give each agent its own --id"),
        "{err:?}"
    );
    // ...but once its stream has been quiet for two heartbeat intervals
    // (half-open), a reconnect replaces it and does not count twice.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let _a2 = bench.agent("a", 1).await.unwrap();
    assert_eq!(
        bench.agents().await,
        BTreeSet::from(["a".into(), "b".into()])
    );
    // The slot cap is the configured one.
    let err = bench.agent("a", 5).await.err().unwrap();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("between 1 and 4"), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_agent_is_cut_off_and_the_others_stay() {
    let limits = GatewayLimits {
        messages_per_sec_per_slot: 10.0,
        message_burst_per_slot: 20.0,
        ..GatewayLimits::default()
    };
    let bench = bench(limits, &[]).await;
    let mut rows = bench.sched.logs().subscribe();
    let mut flood = bench.agent("flood", 1).await.unwrap();
    let _calm = bench.agent("calm", 1).await.unwrap();
    let heartbeat = In::Heartbeat(pb::Heartbeat::default());
    for _ in 0..1000 {
        if !flood.send(heartbeat.clone()).await {
            break;
        }
    }
    let status = flood.closed().await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("messages a second"), "{status:?}");
    assert_eq!(bench.agents().await, BTreeSet::from(["calm".into()]));
    let cut = tokio::time::timeout(WAIT, async {
        loop {
            let row = rows.recv().await.unwrap();
            if row.level == pb::LogLevel::Error as i32 && row.agent_id == "flood" {
                return row;
            }
        }
    })
    .await
    .expect("an error event naming the agent");
    assert!(cut.message.contains("cut off"), "{}", cut.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_above_the_size_limit_ends_the_stream() {
    let limits = GatewayLimits {
        max_message_bytes: 1 << 20,
        ..GatewayLimits::default()
    };
    let bench = bench(limits, &["1"]).await;
    let mut big = bench.agent("big", 1).await.unwrap();
    let _calm = bench.agent("calm", 1).await.unwrap();
    let lines = pb::LogLines {
        lease_id: "L".into(),
        lines: vec![pb::LogLine {
            text: "x".repeat(2 << 20),
            ..Default::default()
        }],
    };
    assert!(
        big.send(In::LogLines(lines)).await,
        "the stream closed early"
    );
    let status = loop {
        match big.next().await {
            Ok(Some(Out::Assign(_))) => {}
            Ok(other) => panic!("expected the stream to fail, got {other:?}"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("size limit"), "{status:?}");
    assert_eq!(bench.agents().await, BTreeSet::from(["calm".into()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announce_stop_tells_agents_and_assigns_nothing() {
    let bench = bench(GatewayLimits::default(), &[]).await;
    let mut agent = bench.agent("a", 2).await.unwrap();
    bench
        .sched
        .announce_stop("shutting down".into(), Duration::from_secs(60))
        .unwrap();
    match agent.next().await {
        Ok(Some(Out::Stopping(stopping))) => {
            assert_eq!(stopping.reason, "shutting down");
            assert_eq!(stopping.grace_ms, 60_000);
        }
        other => panic!("expected ServerStopping, got {other:?}"),
    }
    // Work planned after the notice stays queued: the batch that queues
    // it would have assigned it before replying.
    let planned = PlannedTask::new(
        "a",
        "s",
        &Partition {
            vars: vec![("item".into(), Value::Str("1".into()))],
        },
        Priority::Medium,
        GapReason::Missing,
        &["a/1.json".into()],
    );
    let created = bench.sched.apply_plan(vec![planned], 0).await.unwrap();
    assert_eq!(created, 1);
    let stats = bench.sched.stats().await.unwrap();
    assert_eq!((stats.ready, stats.leased), (1, 0));
    // An agent connecting now hears it too.
    let mut late = bench.agent("late", 1).await.unwrap();
    assert!(matches!(late.next().await, Ok(Some(Out::Stopping(_)))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_retention_is_the_configured_one() {
    let bench = bench(GatewayLimits::default(), &[]).await;
    for i in 0..30 {
        bench.sched.log(Event::info(format!("event {i}")).row());
    }
    bench
        .sched
        .set_log_retention(LogRetention {
            max_age: Duration::from_secs(3600),
            max_rows: 5,
        })
        .unwrap();
    let readers = Arc::new(store::Readers::new(&bench.dir.path().join("state")));
    let filter = store::LogFilter::default();
    let mut kept = Vec::new();
    // The scheduler ticks every 200 ms; the first tick prunes. Until
    // every event is committed the tail may be short for other reasons,
    // so wait for the newest one too.
    for _ in 0..100 {
        let f = filter.clone();
        kept = readers
            .with(move |c| store::log_tail(c, &f, 1000))
            .await
            .unwrap();
        let newest_in = kept.last().is_some_and(|r| r.message == "event 29");
        if newest_in && kept.len() <= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let messages: Vec<&str> = kept.iter().map(|r| r.message.as_str()).collect();
    assert_eq!(
        messages,
        ["event 25", "event 26", "event 27", "event 28", "event 29"]
    );
}
