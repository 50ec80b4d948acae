//! `adce_agent::run` against a scripted `AgentGateway` served over real gRPC
//! on 127.0.0.1: Hello / Welcome / heartbeats, an assignment that uploads a
//! file, the slot limit, Cancel and Drain, late assignments refused while
//! draining and closing, a result produced while the server is unreachable
//! (queued, then delivered after the next Welcome), shutdown killing running
//! process groups, the bearer token on every call (a refused token stops the
//! agent) and TLS with client certificates made by rcgen.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use adce_agent::{AgentOptions, BackoffPolicy, ClientSecurity};
use adce_proto::v1::agent_gateway_client::AgentGatewayClient;
use adce_proto::v1::agent_gateway_server::{AgentGateway, AgentGatewayServer};
use adce_proto::v1::{
    AgentMessage, Arg, ArgPart, Assign, Cancel, Drain, Hello, Outcome, ServerMessage, TaskResult,
    UploadChunk, UploadReply, Welcome, agent_message, arg_part, server_message, upload_chunk,
};
use anyhow::{Context as _, anyhow};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

/// Heartbeat interval the scripted server asks for.
const HEARTBEAT_MS: u64 = 100;
/// Longest wait for anything the agent should do.
const WAIT: Duration = Duration::from_secs(15);

type Outbound = mpsc::UnboundedSender<Result<ServerMessage, Status>>;

/// Certificates for one TLS test, made with rcgen: a CA, a server
/// certificate for 127.0.0.1 and a client certificate signed by it, and an
/// unrelated CA. The agent reads the files, the server the PEM text.
struct TestPki {
    ca_pem: String,
    server_cert: String,
    server_key: String,
    ca_file: PathBuf,
    client_cert_file: PathBuf,
    client_key_file: PathBuf,
    other_ca_file: PathBuf,
}

impl TestPki {
    fn generate(dir: &Path) -> anyhow::Result<Self> {
        fn ca(name: &str) -> anyhow::Result<(CertificateParams, KeyPair, String)> {
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let key = KeyPair::generate()?;
            let pem = params.self_signed(&key)?.pem();
            Ok((params, key, pem))
        }
        fn leaf(
            usage: ExtendedKeyUsagePurpose,
            issuer: &Issuer<'_, &KeyPair>,
        ) -> anyhow::Result<(String, String)> {
            let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
            params
                .subject_alt_names
                .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, issuer)?;
            Ok((cert.pem(), key.serialize_pem()))
        }
        let (ca_params, ca_key, ca_pem) = ca("session test CA")?;
        let issuer = Issuer::from_params(&ca_params, &ca_key);
        let (server_cert, server_key) = leaf(ExtendedKeyUsagePurpose::ServerAuth, &issuer)?;
        let (client_cert, client_key) = leaf(ExtendedKeyUsagePurpose::ClientAuth, &issuer)?;
        let (_, _, other_ca_pem) = ca("unrelated CA")?;
        let pki = Self {
            ca_pem,
            server_cert,
            server_key,
            ca_file: dir.join("ca.pem"),
            client_cert_file: dir.join("client.pem"),
            client_key_file: dir.join("client.key"),
            other_ca_file: dir.join("other-ca.pem"),
        };
        std::fs::write(&pki.ca_file, &pki.ca_pem)?;
        std::fs::write(&pki.client_cert_file, client_cert)?;
        std::fs::write(&pki.client_key_file, client_key)?;
        std::fs::write(&pki.other_ca_file, other_ca_pem)?;
        Ok(pki)
    }
}

/// What the scripted server saw.
#[derive(Debug)]
enum Seen {
    Message(usize, AgentMessage),
    SessionEnded(usize),
}

#[derive(Default)]
struct Shared {
    sessions: Mutex<Vec<Option<Outbound>>>,
    refuse_connects: AtomicBool,
    uploads: Mutex<HashMap<(String, String), Vec<u8>>>,
}

struct Gateway {
    shared: Arc<Shared>,
    seen: mpsc::UnboundedSender<Seen>,
}

#[tonic::async_trait]
impl AgentGateway for Gateway {
    type ConnectStream = UnboundedReceiverStream<Result<ServerMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        if self.shared.refuse_connects.load(Ordering::SeqCst) {
            return Err(Status::unavailable("not accepting agents"));
        }
        let mut inbound = request.into_inner();
        let hello = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("no hello"))?;
        let (outbound, receiver) = mpsc::unbounded_channel();
        let welcome = ServerMessage {
            kind: Some(server_message::Kind::Welcome(Welcome {
                agent_id: "registered".into(),
                heartbeat_interval_ms: HEARTBEAT_MS,
                lease_ttl_ms: 10 * HEARTBEAT_MS,
                server_version: "test".into(),
            })),
        };
        outbound
            .send(Ok(welcome))
            .map_err(|_| Status::internal("closed"))?;
        let index = {
            let mut sessions = self
                .shared
                .sessions
                .lock()
                .map_err(|_| Status::internal("lock"))?;
            sessions.push(Some(outbound));
            sessions.len() - 1
        };
        let _ = self.seen.send(Seen::Message(index, hello));
        let seen = self.seen.clone();
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                let _ = seen.send(Seen::Message(index, message));
            }
            // The agent ended its side: end ours too.
            if let Ok(mut sessions) = shared.sessions.lock() {
                sessions[index] = None;
            }
            let _ = seen.send(Seen::SessionEnded(index));
        });
        Ok(Response::new(UnboundedReceiverStream::new(receiver)))
    }

    async fn upload(
        &self,
        request: Request<Streaming<UploadChunk>>,
    ) -> Result<Response<UploadReply>, Status> {
        let mut chunks = request.into_inner();
        let Some(UploadChunk {
            kind: Some(upload_chunk::Kind::Header(header)),
        }) = chunks.message().await?
        else {
            return Err(Status::invalid_argument("header first"));
        };
        if !header.key.ends_with(".json") {
            return Err(Status::invalid_argument("not an expected key"));
        }
        let mut data = Vec::new();
        while let Some(chunk) = chunks.message().await? {
            match chunk.kind {
                Some(upload_chunk::Kind::Data(bytes)) => data.extend(bytes),
                _ => return Err(Status::invalid_argument("data expected")),
            }
        }
        if data.len() as u64 != header.size {
            return Err(Status::invalid_argument("size mismatch"));
        }
        let size = header.size;
        self.shared
            .uploads
            .lock()
            .map_err(|_| Status::internal("lock"))?
            .insert((header.lease_id, header.key.clone()), data);
        Ok(Response::new(UploadReply {
            key: header.key,
            size,
            sha256: String::new(),
        }))
    }
}

/// The scripted server and what it saw.
struct Server {
    address: String,
    /// The CA that signed the server's certificate, when it serves TLS.
    tls: Option<TestPki>,
    shared: Arc<Shared>,
    seen: mpsc::UnboundedReceiver<Seen>,
    stop: CancellationToken,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Server {
    async fn start() -> anyhow::Result<Self> {
        Self::start_with(None, None).await
    }

    /// A server that requires `token` on every call, if given, and serves
    /// TLS requiring a client certificate signed by `pki`'s CA, if given.
    async fn start_with(token: Option<&str>, pki: Option<TestPki>) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let scheme = if pki.is_some() { "https" } else { "http" };
        let address = format!("{scheme}://{}", listener.local_addr()?);
        let shared = Arc::new(Shared::default());
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let gateway = Gateway {
            shared: Arc::clone(&shared),
            seen: seen_tx,
        };
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let expected = token.map(|token| format!("Bearer {token}"));
        let check = move |request: Request<()>| -> Result<Request<()>, Status> {
            let Some(expected) = &expected else {
                return Ok(request);
            };
            match request.metadata().get("authorization") {
                None => Err(Status::unauthenticated("missing bearer token")),
                Some(value) if value.as_bytes() == expected.as_bytes() => Ok(request),
                Some(_) => Err(Status::permission_denied("token not accepted")),
            }
        };
        let mut builder = tonic::transport::Server::builder();
        if let Some(pki) = &pki {
            builder = builder.tls_config(
                ServerTlsConfig::new()
                    .identity(Identity::from_pem(&pki.server_cert, &pki.server_key))
                    .client_ca_root(Certificate::from_pem(&pki.ca_pem)),
            )?;
        }
        let task = tokio::spawn(
            builder
                .add_service(AgentGatewayServer::with_interceptor(gateway, check))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                    stopped.cancelled().await;
                }),
        );
        Ok(Self {
            address,
            tls: pki,
            shared,
            seen,
            stop,
            task,
        })
    }

    fn send(&self, session: usize, kind: server_message::Kind) -> anyhow::Result<()> {
        let sessions = self.shared.sessions.lock().map_err(|_| anyhow!("lock"))?;
        let outbound = sessions
            .get(session)
            .and_then(Option::as_ref)
            .ok_or_else(|| anyhow!("session {session} is not open"))?;
        outbound
            .send(Ok(ServerMessage { kind: Some(kind) }))
            .map_err(|_| anyhow!("session {session} closed"))
    }

    /// Ends a session from the server's side with an error status.
    fn break_session(&self, session: usize) -> anyhow::Result<()> {
        let mut sessions = self.shared.sessions.lock().map_err(|_| anyhow!("lock"))?;
        let outbound = sessions
            .get_mut(session)
            .and_then(Option::take)
            .ok_or_else(|| anyhow!("session {session} is not open"))?;
        let _ = outbound.send(Err(Status::unavailable("server going away")));
        Ok(())
    }

    /// Waits for the next agent message matching `pick`, returning it and
    /// every agent message seen before it.
    async fn wait_for<T>(
        &mut self,
        mut pick: impl FnMut(usize, &AgentMessage) -> Option<T>,
    ) -> anyhow::Result<(T, Vec<(usize, AgentMessage)>)> {
        let mut before = Vec::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let seen = tokio::time::timeout_at(deadline, self.seen.recv())
                .await
                .context("timed out waiting for the agent")?
                .ok_or_else(|| anyhow!("server channel closed"))?;
            if let Seen::Message(session, message) = seen {
                if let Some(found) = pick(session, &message) {
                    return Ok((found, before));
                }
                before.push((session, message));
            }
        }
    }

    /// Waits until the agent has ended its side of `session`.
    async fn wait_session_ended(&mut self, session: usize) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let seen = tokio::time::timeout_at(deadline, self.seen.recv())
                .await
                .context("timed out waiting for the session to end")?
                .ok_or_else(|| anyhow!("server channel closed"))?;
            if matches!(seen, Seen::SessionEnded(ended) if ended == session) {
                return Ok(());
            }
        }
    }

    async fn wait_for_hello(&mut self) -> anyhow::Result<(usize, Hello)> {
        Ok(self
            .wait_for(|session, message| match &message.kind {
                Some(agent_message::Kind::Hello(hello)) => Some((session, hello.clone())),
                _ => None,
            })
            .await?
            .0)
    }

    async fn wait_for_result(
        &mut self,
        lease: &str,
    ) -> anyhow::Result<(TaskResult, Vec<(usize, AgentMessage)>)> {
        self.wait_for(|_, message| match &message.kind {
            Some(agent_message::Kind::Result(result)) if result.lease_id == lease => {
                Some(result.clone())
            }
            _ => None,
        })
        .await
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.task).await???;
        Ok(())
    }
}

fn sh(lease: &str, script: &str) -> server_message::Kind {
    let text = |value: &str| Arg {
        parts: vec![ArgPart {
            part: Some(arg_part::Part::Text(value.into())),
        }],
    };
    server_message::Kind::Assign(Assign {
        task_id: 1,
        lease_id: lease.into(),
        source: "demo".into(),
        scraper: "sh".into(),
        attempt: 1,
        argv: vec![text("sh"), text("-c"), text(script)],
        env: HashMap::from([("ADCE_SOURCE".to_owned(), "demo".to_owned())]),
        timeout_ms: 60_000,
        ..Assign::default()
    })
}

fn options(server: &Server, work_dir: &std::path::Path) -> AgentOptions {
    let mut options = AgentOptions::new(server.address.clone());
    options.agent_id = Some("test-agent".into());
    options.labels = BTreeMap::from([("region".to_owned(), "test".to_owned())]);
    options.work_dir = work_dir.to_path_buf();
    options.reconnect = BackoffPolicy {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
        jitter: 0.2,
    };
    options
}

fn start_agent(
    options: AgentOptions,
) -> (CancellationToken, JoinHandle<Result<(), adce_agent::Error>>) {
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(adce_agent::run(options, shutdown.clone()));
    (shutdown, agent)
}

async fn finish(agent: JoinHandle<Result<(), adce_agent::Error>>) -> anyhow::Result<()> {
    tokio::time::timeout(WAIT, agent)
        .await
        .context("agent did not stop")???;
    Ok(())
}

#[tokio::test]
async fn runs_assignments_uploads_enforces_slots_cancels_and_drains() -> anyhow::Result<()> {
    let mut server = Server::start().await?;
    let work_dir = tempfile::tempdir()?;
    let (_shutdown, agent) = start_agent(options(&server, work_dir.path()));

    let (session, hello) = server.wait_for_hello().await?;
    assert_eq!(hello.agent_id, "test-agent");
    assert_eq!(hello.slots, 1);
    assert_eq!(hello.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(hello.labels.get("region").map(String::as_str), Some("test"));
    assert!(hello.running_leases.is_empty());
    assert!(!hello.hostname.is_empty());

    // A task that reports progress, writes one accepted and one refused file
    // and runs long enough for a heartbeat to name it.
    let script = r#"echo "::progress:: 0.5 half"; echo working >&2;
        printf '{"ok":true}' > "$ADCE_OUTPUT_DIR/day.json";
        printf 'junk' > "$ADCE_OUTPUT_DIR/extra.txt"; sleep 0.4"#;
    server.send(session, sh("L1", script))?;
    let (result, before) = server.wait_for_result("L1").await?;
    assert_eq!(result.outcome(), Outcome::Exited, "{}", result.message);
    assert_eq!(result.exit_code, 0);
    assert_eq!(result.uploaded_keys, ["day.json"]);
    assert!(result.duration_ms >= 400, "duration {}", result.duration_ms);
    let kinds: Vec<&agent_message::Kind> =
        before.iter().filter_map(|(_, m)| m.kind.as_ref()).collect();
    assert!(kinds.iter().any(|kind| matches!(kind,
        agent_message::Kind::Heartbeat(beat) if beat.running_leases == ["L1"])));
    assert!(kinds.iter().any(|kind| matches!(kind,
        agent_message::Kind::Progress(progress) if progress.lease_id == "L1" && progress.fraction == 0.5)));
    let log_texts: Vec<&str> = kinds
        .iter()
        .filter_map(|kind| match kind {
            agent_message::Kind::LogLines(lines) => Some(lines),
            _ => None,
        })
        .flat_map(|lines| lines.lines.iter().map(|line| line.text.as_str()))
        .collect();
    assert!(log_texts.contains(&"working"), "{log_texts:?}");
    assert!(
        log_texts.contains(
            &"adce-agent: upload skipped: server refused key `extra.txt`: not an expected key"
        ),
        "{log_texts:?}"
    );
    let uploads = server
        .shared
        .uploads
        .lock()
        .map_err(|_| anyhow!("lock"))?
        .clone();
    assert_eq!(
        uploads
            .get(&("L1".to_owned(), "day.json".to_owned()))
            .map(Vec::as_slice),
        Some(&br#"{"ok":true}"#[..])
    );
    assert!(!work_dir.path().join("L1").exists());

    // One slot: a second assignment while one runs is refused at once (and
    // counts as a failed attempt: the server should not have sent it).
    server.send(session, sh("L2", "sleep 1000"))?;
    server.send(session, sh("L3", "exit 0"))?;
    let (refused, _) = server.wait_for_result("L3").await?;
    assert_eq!(refused.outcome(), Outcome::SpawnFailed);
    assert_eq!(
        refused.message,
        "agent already runs 1 tasks, its slot limit"
    );

    server.send(
        session,
        server_message::Kind::Cancel(Cancel {
            lease_id: "L2".into(),
            reason: "operator".into(),
        }),
    )?;
    let (cancelled, _) = server.wait_for_result("L2").await?;
    assert_eq!(cancelled.outcome(), Outcome::Cancelled);

    // Drain: a task still running is finished and reported, then run returns.
    server.send(session, sh("L4", "sleep 0.3; exit 5"))?;
    server.send(
        session,
        server_message::Kind::Drain(Drain {
            reason: "maintenance".into(),
        }),
    )?;
    server.send(session, sh("L5", "exit 0"))?;
    let (late, _) = server.wait_for_result("L5").await?;
    assert_eq!(late.outcome(), Outcome::Refused);
    assert_eq!(late.message, "agent is draining");
    assert!(!work_dir.path().join("L5").exists());
    let (drained, _) = server.wait_for_result("L4").await?;
    assert_eq!(drained.outcome(), Outcome::Exited);
    assert_eq!(drained.exit_code, 5);
    finish(agent).await?;
    // The agent closed its stream rather than just vanishing.
    server.wait_session_ended(session).await?;
    server.stop().await
}

#[tokio::test]
async fn a_result_produced_while_disconnected_is_delivered_after_reconnecting() -> anyhow::Result<()>
{
    let mut server = Server::start().await?;
    let work_dir = tempfile::tempdir()?;
    let (shutdown, agent) = start_agent(options(&server, work_dir.path()));
    let (first, _) = server.wait_for_hello().await?;

    // The task outlives the session; the server then refuses new sessions
    // until the task has finished, so its result has to wait in the agent.
    server.send(first, sh("L1", "sleep 0.5; echo done; exit 3"))?;
    server
        .wait_for(|_, message| match &message.kind {
            Some(agent_message::Kind::Heartbeat(beat)) if beat.running_leases == ["L1"] => Some(()),
            _ => None,
        })
        .await?;
    server.shared.refuse_connects.store(true, Ordering::SeqCst);
    server.break_session(first)?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.shared.refuse_connects.store(false, Ordering::SeqCst);

    let (second, hello) = server.wait_for_hello().await?;
    assert_ne!(second, first);
    // The finished-but-unreported lease is still held by the agent.
    assert_eq!(hello.running_leases, ["L1"]);
    let (result, _) = server.wait_for_result("L1").await?;
    assert_eq!(result.outcome(), Outcome::Exited);
    assert_eq!(result.exit_code, 3);

    shutdown.cancel();
    finish(agent).await?;
    server.stop().await
}

#[tokio::test]
async fn shutdown_kills_running_tasks_and_reports_them() -> anyhow::Result<()> {
    let mut server = Server::start().await?;
    let work_dir = tempfile::tempdir()?;
    let (shutdown, agent) = start_agent(options(&server, work_dir.path()));
    let (session, _) = server.wait_for_hello().await?;

    server.send(session, sh("L1", "sleep 1000 & echo $!; sleep 1000"))?;
    let (pid, _) = server
        .wait_for(|_, message| match &message.kind {
            Some(agent_message::Kind::LogLines(lines)) => lines
                .lines
                .first()
                .and_then(|line| line.text.trim().parse::<i32>().ok()),
            _ => None,
        })
        .await?;
    shutdown.cancel();
    let (result, _) = server.wait_for_result("L1").await?;
    assert_eq!(result.outcome(), Outcome::Cancelled);
    finish(agent).await?;

    let mut dead = false;
    for _ in 0..100 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"));
        if stat.map_or(true, |stat| {
            stat.rsplit_once(") ")
                .is_some_and(|(_, s)| s.starts_with('Z'))
        }) {
            dead = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(dead, "grandchild {pid} survived the agent's shutdown");
    assert!(!work_dir.path().join("L1").exists());
    server.stop().await
}

#[tokio::test]
async fn invalid_options_are_errors() {
    let mut options = AgentOptions::new("http://127.0.0.1:1");
    options.slots = 0;
    let error = adce_agent::run(options, CancellationToken::new())
        .await
        .expect_err("zero slots");
    assert_eq!(
        error.to_string(),
        "invalid agent options: slots must be at least 1"
    );

    let error = adce_agent::run(AgentOptions::new("not a uri"), CancellationToken::new())
        .await
        .expect_err("bad address");
    assert!(
        error
            .to_string()
            .starts_with(r#"invalid server address "not a uri""#),
        "{error}"
    );
}

#[tokio::test]
async fn an_assignment_that_crosses_the_drain_is_refused_while_closing() -> anyhow::Result<()> {
    let mut server = Server::start().await?;
    let work_dir = tempfile::tempdir()?;
    let drain = CancellationToken::new();
    let agent = tokio::spawn(adce_agent::run_draining(
        options(&server, work_dir.path()),
        drain.clone(),
        CancellationToken::new(),
    ));
    let (session, _) = server.wait_for_hello().await?;
    // A heartbeat: the agent has the Welcome and its session is open.
    server
        .wait_for(|_, message| match &message.kind {
            Some(agent_message::Kind::Heartbeat(_)) => Some(()),
            _ => None,
        })
        .await?;

    // Idle, the agent is drained as soon as it said so, and closes; an
    // assignment the server sent before it read the Draining message still
    // gets an answer instead of waiting for its lease to expire.
    drain.cancel();
    server
        .wait_for(|_, message| match &message.kind {
            Some(agent_message::Kind::Draining(_)) => Some(()),
            _ => None,
        })
        .await?;
    server.send(session, sh("LATE", "touch \"$ADCE_OUTPUT_DIR/ran\""))?;
    let (late, _) = server.wait_for_result("LATE").await?;
    assert_eq!(late.outcome(), Outcome::Refused);
    assert_eq!(late.message, "agent is draining");
    assert_eq!(late.exit_code, 0);
    finish(agent).await?;
    server.wait_session_ended(session).await?;
    assert!(!work_dir.path().join("LATE").exists());
    server.stop().await
}

/// A task that writes one accepted object.
fn writes_day_json(lease: &str) -> server_message::Kind {
    sh(
        lease,
        r#"printf '{"ok":true}' > "$ADCE_OUTPUT_DIR/day.json""#,
    )
}

#[tokio::test]
async fn the_token_goes_with_every_call_and_a_refused_token_stops_the_agent() -> anyhow::Result<()>
{
    let mut server = Server::start_with(Some("good-token"), None).await?;
    let work_dir = tempfile::tempdir()?;
    let mut opts = options(&server, work_dir.path());
    opts.security.token = Some("good-token".into());
    let (shutdown, agent) = start_agent(opts.clone());
    let (session, _) = server.wait_for_hello().await?;
    server.send(session, writes_day_json("L1"))?;
    let (result, _) = server.wait_for_result("L1").await?;
    // The upload is a separate call: it carried the token too.
    assert_eq!(result.outcome(), Outcome::Exited, "{}", result.message);
    assert_eq!(result.uploaded_keys, ["day.json"]);
    shutdown.cancel();
    finish(agent).await?;

    // A wrong or missing token is not retried: the agent stops with an error.
    for (token, code) in [
        (Some("bad-token"), tonic::Code::PermissionDenied),
        (None, tonic::Code::Unauthenticated),
    ] {
        opts.security.token = token.map(str::to_owned);
        let error = tokio::time::timeout(
            WAIT,
            adce_agent::run(opts.clone(), CancellationToken::new()),
        )
        .await
        .context("the agent kept retrying a refused token")?
        .expect_err("a refused token is an error");
        assert!(
            matches!(&error, adce_agent::Error::TokenRefused { code: refused, .. } if *refused == code),
            "{error:?}"
        );
        assert!(
            error
                .to_string()
                .starts_with("the server refused the agent's token: "),
            "{error}"
        );
    }
    server.stop().await
}

#[tokio::test]
async fn tls_with_a_client_certificate_carries_sessions_and_uploads() -> anyhow::Result<()> {
    let pki_dir = tempfile::tempdir()?;
    let pki = TestPki::generate(pki_dir.path())?;
    let mut server = Server::start_with(Some("good-token"), Some(pki)).await?;
    let pki = server.tls.as_ref().ok_or_else(|| anyhow!("no TLS"))?;
    assert!(server.address.starts_with("https://"));
    let trusted = ClientSecurity {
        token: Some("good-token".into()),
        ca_file: Some(pki.ca_file.clone()),
        cert_file: Some(pki.client_cert_file.clone()),
        key_file: Some(pki.client_key_file.clone()),
        tls_name: None,
    };
    let without_cert = ClientSecurity {
        cert_file: None,
        key_file: None,
        ..trusted.clone()
    };
    let other_ca = ClientSecurity {
        ca_file: Some(pki.other_ca_file.clone()),
        ..trusted.clone()
    };
    let work_dir = tempfile::tempdir()?;
    let mut opts = options(&server, work_dir.path());
    opts.security = trusted;
    let (shutdown, agent) = start_agent(opts.clone());
    let (session, _) = server.wait_for_hello().await?;
    server.send(session, writes_day_json("L1"))?;
    let (result, _) = server.wait_for_result("L1").await?;
    assert_eq!(result.outcome(), Outcome::Exited, "{}", result.message);
    assert_eq!(result.uploaded_keys, ["day.json"]);
    shutdown.cancel();
    finish(agent).await?;

    // Without a client certificate, or trusting another CA, no call gets
    // through.
    for security in [without_cert, other_ca] {
        let dialer = adce_agent::Dialer::new(&server.address, &security)?;
        let attempt = async {
            let channel = dialer.connect().await?;
            let (tx, rx) = mpsc::channel::<AgentMessage>(1);
            drop(tx);
            AgentGatewayClient::new(channel)
                .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?;
            anyhow::Ok(())
        };
        let outcome = tokio::time::timeout(WAIT, attempt).await?;
        let error = outcome
            .err()
            .ok_or_else(|| anyhow!("{security:?} got through"))?;
        let chain = format!("{error:#}");
        assert!(
            chain.contains("CertificateRequired") || chain.contains("UnknownIssuer"),
            "{chain}"
        );
    }

    // An agent without a client certificate keeps retrying (a handshake
    // failure may be a rotation in progress) and never gets a session.
    opts.security.cert_file = None;
    opts.security.key_file = None;
    let (shutdown, agent) = start_agent(opts);
    let hello = tokio::time::timeout(Duration::from_secs(1), server.wait_for_hello()).await;
    assert!(
        hello.is_err(),
        "a session without a client certificate: {hello:?}"
    );
    assert!(!agent.is_finished(), "the agent gave up on a TLS failure");
    shutdown.cancel();
    finish(agent).await?;
    server.stop().await
}
