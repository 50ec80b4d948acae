//! The `AgentGateway` service: agents' Connect streams and uploads. It turns
//! stream messages into scheduler commands, checks the lake before a result
//! is judged, and streams uploads into the lake. It holds no state of its own.
//!
//! It is also where agents are confined and limited: an upload is accepted
//! only from the agent holding its lease and only for that lease's expected
//! keys; an agent's Connect stream is cut off when it sends faster than its
//! message budget or a message above the size limit; and [`GatewayLimits`]
//! carries the server's message-size, stream and agent caps into the tonic
//! service ([`Gateway::into_service`]) and `crate::transport`.
//!
//! Wire messages become the scheduler's domain types (and back) in `wire.rs`.
//!
//! Architecture invariant: an object reaches the lake only through an upload
//! whose lease is live, held by the uploading agent, and expects that key.

mod wire;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use adce_proto::v1 as pb;
use adce_proto::v1::agent_message::Kind as In;
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{debug, warn};

use crate::auth::Caller;
use crate::config::ServerConfig;
use crate::error::Error;
use crate::lake::{LakeError, SharedLake};
use crate::logs::Event;
use crate::model::{AgentId, LeaseId, validate_key};
use crate::scheduler::{AdmissionLimits, Handle, LeaseInfo, ObjectCheck, TaskResult};

/// How long a new stream may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest message the services send: generous, replies are the
/// server's own (large task pages and log batches included).
pub const MAX_ENCODE_BYTES: usize = 256 * 1024 * 1024;
/// The longest valid agent id (the scheduler refuses longer ones at Hello).
const MAX_AGENT_ID_CHARS: usize = 128;
/// A refusal names at most this many of a task's expected keys.
const KEYS_IN_MESSAGE: usize = 3;

/// The server's caps on what clients send, from the `server:` config
/// section. Applied by [`Gateway::into_service`] and by `crate::transport`
/// to the `Control` service and the HTTP/2 transport.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GatewayLimits {
    /// The largest message either service decodes.
    pub max_message_bytes: usize,
    /// HTTP/2 streams per client connection.
    pub max_concurrent_streams: u32,
    /// Agents connected at once, and slots per agent.
    pub admission: AdmissionLimits,
    /// Messages per second one agent stream may send sustained, per slot.
    pub messages_per_sec_per_slot: f64,
    /// Messages one agent stream may send at once above the rate, per slot.
    pub message_burst_per_slot: f64,
    /// The longest an upload may stream before it is aborted.
    pub max_upload_time: Duration,
}

impl GatewayLimits {
    /// The limits a `server:` section sets.
    pub fn from_config(server: &ServerConfig) -> Self {
        let rate = server.agent_messages.rate;
        GatewayLimits {
            max_message_bytes: usize::try_from(server.max_message_bytes).unwrap_or(usize::MAX),
            max_concurrent_streams: server.max_concurrent_streams,
            admission: AdmissionLimits {
                max_agents: server.max_agents,
                max_slots: server.max_slots_per_agent,
            },
            messages_per_sec_per_slot: f64::from(rate.count) / rate.per.duration().as_secs_f64(),
            message_burst_per_slot: f64::from(server.agent_messages.burst),
            max_upload_time: server.max_upload_time,
        }
    }
}

impl Default for GatewayLimits {
    fn default() -> Self {
        GatewayLimits::from_config(&ServerConfig::default())
    }
}

/// A token bucket over one agent stream's messages.
#[derive(Debug, Clone)]
struct MessageBucket {
    tokens: f64,
    burst: f64,
    per_sec: f64,
    at: Instant,
}

impl MessageBucket {
    /// A full bucket of `burst` tokens refilled at `per_sec`.
    fn new(per_sec: f64, burst: f64, now: Instant) -> Self {
        MessageBucket {
            tokens: burst,
            burst,
            per_sec,
            at: now,
        }
    }

    /// Takes a token for one message; false when the stream is over budget.
    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The gateway service.
#[derive(Debug, Clone)]
pub struct Gateway {
    scheduler: Handle,
    lake: SharedLake,
    max_upload_bytes: u64,
    next_conn: Arc<AtomicU64>,
    metrics: crate::metrics::Metrics,
    limits: GatewayLimits,
}

impl Gateway {
    /// A gateway in front of `scheduler` writing to `lake`.
    pub fn new(
        scheduler: Handle,
        lake: SharedLake,
        max_upload_bytes: u64,
        metrics: crate::metrics::Metrics,
    ) -> Self {
        Gateway {
            scheduler,
            lake,
            max_upload_bytes,
            next_conn: Arc::new(AtomicU64::new(1)),
            metrics,
            limits: GatewayLimits::default(),
        }
    }

    /// The same gateway enforcing `limits` (admission and message budget).
    pub fn with_limits(mut self, limits: GatewayLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The tonic service of this gateway, enforcing `limits`: admission,
    /// message budget and the message-size limit.
    pub fn into_service(
        self,
        limits: &GatewayLimits,
    ) -> pb::agent_gateway_server::AgentGatewayServer<Gateway> {
        let max_message_bytes = limits.max_message_bytes;
        pb::agent_gateway_server::AgentGatewayServer::new(self.with_limits(*limits))
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(MAX_ENCODE_BYTES.max(max_message_bytes))
    }
}

/// Lists at most [`KEYS_IN_MESSAGE`] keys, saying how many more there are.
fn key_list(keys: &[String]) -> String {
    let shown = keys
        .iter()
        .take(KEYS_IN_MESSAGE)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    match keys.len().saturating_sub(KEYS_IN_MESSAGE) {
        0 => shown,
        more => format!("{shown} and {more} more"),
    }
}

/// The agent id an upload claims, cut to the length a valid id may have (it
/// comes from the network and is echoed in refusals and logs).
fn claimed_agent(header: &pb::UploadHeader) -> String {
    header.agent_id.chars().take(MAX_AGENT_ID_CHARS).collect()
}

/// Whether `header` may upload under the live lease `info`: the uploading
/// agent must hold the lease and the key must be one of its expected keys.
fn confine(header: &pb::UploadHeader, info: &LeaseInfo) -> Result<(), Status> {
    if info.holder.0 != header.agent_id {
        return Err(Status::permission_denied(format!(
            "lease {} is not held by agent {}",
            header.lease_id,
            claimed_agent(header)
        )));
    }
    if !info.expected_keys.contains(&header.key) {
        return Err(Status::permission_denied(format!(
            "key {} is not an expected object of task {} (expected: {})",
            header.key,
            info.task_id,
            key_list(&info.expected_keys)
        )));
    }
    Ok(())
}

impl std::fmt::Debug for dyn crate::lake::Lake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Checks which expected objects of a finished lease the lake holds.
async fn check_objects(lake: &SharedLake, keys: &[String], min_bytes: u64) -> ObjectCheck {
    let mut check = ObjectCheck::default();
    for key in keys {
        match lake.stat(key).await {
            Ok(Some(meta)) if meta.size < min_bytes => {
                check.too_small.push((key.clone(), meta.size))
            }
            Ok(Some(_)) => {}
            Ok(None) => check.missing.push(key.clone()),
            Err(e) => {
                warn!(key, error = %e, "cannot stat expected object");
                check.missing.push(key.clone());
            }
        }
    }
    check
}

/// Judges a result: looks up the lease, checks the lake, hands it to the scheduler.
async fn complete(scheduler: Handle, lake: SharedLake, agent: AgentId, result: TaskResult) {
    let lease = result.lease.clone();
    // Only a clean exit is checked against the lake (and needs the lease's
    // keys); the scheduler checks the lease itself either way.
    let check = if result.outcome.claims_success() {
        match scheduler
            .lease_info(lease.clone(), Some(agent.clone()))
            .await
        {
            Ok(info) => check_objects(&lake, &info.expected_keys, info.min_bytes).await,
            Err(_) => ObjectCheck::default(),
        }
    } else {
        ObjectCheck::default()
    };
    // The scheduler re-checks the lease and logs a refused result itself.
    if let Err(e) = scheduler.complete(agent.clone(), result, check).await {
        debug!(agent = %agent, lease = %lease, error = %e, "result not applied");
    }
}

/// The stream of a Connect call: the scheduler's messages on the wire.
type ConnectStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::ServerMessage, Status>> + Send + 'static>,
>;

#[tonic::async_trait]
impl pb::agent_gateway_server::AgentGateway for Gateway {
    type ConnectStream = ConnectStream;

    async fn connect(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let address = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let caller = request.extensions().get::<Caller>().cloned();
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 10s"))??;
        let hello = match first.and_then(|m| m.kind) {
            Some(In::Hello(hello)) => hello,
            _ => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        Caller::may_act_as(caller.as_ref(), &hello.agent_id)?;
        let agent = AgentId(hello.agent_id.clone());
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        // The message budget grows with the work the agent may run.
        let slots = f64::from(hello.slots.max(1));
        let (per_sec, burst) = (
            self.limits.messages_per_sec_per_slot * slots,
            self.limits.message_burst_per_slot * slots,
        );
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.scheduler
            .connect(hello.into(), address, conn_id, tx, self.limits.admission)
            .await?;
        let scheduler = self.scheduler.clone();
        let lake = self.lake.clone();
        tokio::spawn(async move {
            let mut bucket = MessageBucket::new(per_sec, burst, Instant::now());
            let cut_off = |message: String| {
                let _ = scheduler.cut_off(agent.clone(), conn_id, Error::TooLarge(message));
            };
            loop {
                let message = match inbound.message().await {
                    Ok(Some(message)) => message,
                    Ok(None) => break,
                    // Tonic refuses a message above the decoding limit with
                    // OUT_OF_RANGE; the stream cannot go on after it.
                    Err(status) if status.code() == Code::OutOfRange => {
                        cut_off(format!(
                            "message above the size limit (server.max_message_bytes): {}",
                            status.message()
                        ));
                        return;
                    }
                    Err(status) => {
                        debug!(agent = %agent, %status, "agent stream ended with an error");
                        break;
                    }
                };
                if !bucket.take(Instant::now()) {
                    cut_off(format!(
                        "more than {per_sec:.0} messages a second (burst {burst:.0}; server.agent_messages per slot)"
                    ));
                    return;
                }
                let agent_id = agent.clone();
                let sent = match message.kind {
                    Some(In::Heartbeat(hb)) => scheduler.heartbeat(
                        agent_id,
                        hb.running_leases.into_iter().map(LeaseId).collect(),
                    ),
                    Some(In::Progress(p)) => {
                        scheduler.progress(agent_id, LeaseId(p.lease_id), p.fraction)
                    }
                    Some(In::LogLines(lines)) => {
                        let (lease, lines) = wire::output_lines(lines);
                        scheduler.output(agent_id, lease, lines)
                    }
                    Some(In::Draining(draining)) => scheduler.draining(agent_id, draining.reason),
                    Some(In::Result(result)) => {
                        tokio::spawn(complete(
                            scheduler.clone(),
                            lake.clone(),
                            agent_id,
                            result.into(),
                        ));
                        Ok(())
                    }
                    Some(In::Hello(_)) | None => {
                        scheduler.log(
                            Event::warn("agent sent an unexpected message; ignored")
                                .agent(agent.0.clone())
                                .row(),
                        );
                        Ok(())
                    }
                };
                if sent.is_err() {
                    break;
                }
            }
            let _ = scheduler.disconnect(agent, conn_id);
        });
        Ok(Response::new(Box::pin(
            UnboundedReceiverStream::new(rx).map(wire::server_message),
        )))
    }

    async fn upload(
        &self,
        request: Request<Streaming<pb::UploadChunk>>,
    ) -> Result<Response<pb::UploadReply>, Status> {
        let started = std::time::Instant::now();
        let caller = request.extensions().get::<Caller>().cloned();
        let mut stream = request.into_inner();
        let header = match stream.message().await?.and_then(|c| c.kind) {
            Some(pb::upload_chunk::Kind::Header(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first upload message must be a header",
                ));
            }
        };
        Caller::may_act_as(caller.as_ref(), &header.agent_id)?;
        validate_key(&header.key).map_err(|e| Error::from(LakeError::from(e)))?;
        if header.size > self.max_upload_bytes {
            return Err(Error::TooLarge(format!(
                "object {} is {} bytes, above the limit of {} bytes",
                header.key, header.size, self.max_upload_bytes
            ))
            .into());
        }
        let lease = LeaseId(header.lease_id.clone());
        let lease_info = |lease: LeaseId| self.scheduler.lease_info(lease, None);
        let info = lease_info(lease.clone()).await?;
        if let Err(status) = confine(&header, &info) {
            warn!(
                agent = ?claimed_agent(&header),
                lease = %lease,
                key = %header.key,
                reason = status.message(),
                "upload refused"
            );
            return Err(status);
        }
        let mut writer = self.lake.put(&header.key).await.map_err(Error::from)?;
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        let max_time = self.limits.max_upload_time;
        loop {
            // The whole stream, header included, gets `max_upload_time`.
            let left = max_time.saturating_sub(started.elapsed());
            let next = match tokio::time::timeout(left, stream.message()).await {
                Ok(next) if !left.is_zero() => next,
                _ => {
                    writer.abort().await;
                    warn!(key = %header.key, limit = ?max_time, "upload too slow; aborted");
                    return Err(Status::deadline_exceeded(format!(
                        "upload of {} took longer than server.max_upload_time ({})",
                        header.key,
                        humantime::format_duration(max_time)
                    )));
                }
            };
            let chunk = match next {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(status) => {
                    writer.abort().await;
                    return Err(status);
                }
            };
            match chunk.kind {
                Some(pb::upload_chunk::Kind::Data(bytes)) => {
                    size += bytes.len() as u64;
                    if size > header.size {
                        writer.abort().await;
                        return Err(Status::invalid_argument(format!(
                            "upload of {} is longer than the {} bytes its header announced",
                            header.key, header.size
                        )));
                    }
                    hasher.update(&bytes);
                    if let Err(e) = writer.write(&bytes).await {
                        writer.abort().await;
                        return Err(Error::from(e).into());
                    }
                }
                Some(pb::upload_chunk::Kind::Header(_)) => {
                    writer.abort().await;
                    return Err(Status::invalid_argument(
                        "an upload carries exactly one header",
                    ));
                }
                None => {}
            }
        }
        if size != header.size {
            writer.abort().await;
            return Err(Status::invalid_argument(format!(
                "upload of {} ended after {size} bytes, its header announced {}",
                header.key, header.size
            )));
        }
        // The lease may have expired (or passed to another agent) while the
        // bytes streamed in.
        let still = match lease_info(lease.clone()).await {
            Ok(info) => confine(&header, &info),
            Err(e) => Err(e.into()),
        };
        if let Err(status) = still {
            writer.abort().await;
            return Err(status);
        }
        let meta = writer.commit().await.map_err(Error::from)?;
        self.metrics.uploaded(meta.size, started.elapsed());
        let sha256: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        self.scheduler
            .record_upload(lease, header.key.clone(), meta.size, sha256.clone())
            .await?;
        Ok(Response::new(pb::UploadReply {
            key: header.key,
            size: meta.size,
            sha256,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::net::SocketAddr;
    use std::path::Path;

    use adce_proto::v1::agent_gateway_client::AgentGatewayClient;
    use adce_proto::v1::server_message::Kind as Out;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
    use tokio_util::sync::CancellationToken;
    use tonic::transport::Channel;

    use super::*;
    use crate::catalog::Catalog;
    use crate::config::Config;
    use crate::lake::LocalLake;
    use crate::logs::LogBus;
    use crate::model::{GapReason, Partition, Priority, Value};
    use crate::scheduler::{PlannedTask, SchedulerOptions};

    /// How long a test waits for one message from the server.
    const WAIT: Duration = Duration::from_secs(10);

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

    #[test]
    fn the_bucket_allows_its_burst_then_its_rate() {
        let start = Instant::now();
        let mut bucket = MessageBucket::new(10.0, 5.0, start);
        assert!((0..5).all(|_| bucket.take(start)));
        assert!(
            !bucket.take(start),
            "the sixth message at once is over budget"
        );
        // A tenth of a second refills one token at 10/s, never more than the burst.
        assert!(bucket.take(start + Duration::from_millis(100)));
        assert!(!bucket.take(start + Duration::from_millis(100)));
        let later = start + Duration::from_secs(60);
        assert!((0..5).all(|_| bucket.take(later)));
        assert!(!bucket.take(later));
    }

    #[test]
    fn refusals_list_a_few_expected_keys_only() {
        let keys: Vec<String> = (0..500).map(|i| format!("k/{i}.json")).collect();
        assert_eq!(key_list(&keys), "k/0.json, k/1.json, k/2.json and 497 more");
        assert_eq!(key_list(&keys[..2]), "k/0.json, k/1.json");
    }

    fn info(holder: &str, keys: &[&str]) -> LeaseInfo {
        LeaseInfo {
            holder: AgentId(holder.into()),
            task_id: crate::model::TaskId(7),
            source: "a".into(),
            attempt: 1,
            expected_keys: keys.iter().map(|k| k.to_string()).collect(),
            min_bytes: 1,
        }
    }

    fn header(agent: &str, key: &str) -> pb::UploadHeader {
        pb::UploadHeader {
            lease_id: "L1".into(),
            key: key.into(),
            size: 1,
            agent_id: agent.into(),
        }
    }

    #[test]
    fn confine_wants_the_holder_and_an_expected_key() {
        let lease = info("x", &["a/1.json"]);
        assert!(confine(&header("x", "a/1.json"), &lease).is_ok());
        let other_agent = confine(&header("y", "a/1.json"), &lease).unwrap_err();
        assert_eq!(other_agent.code(), Code::PermissionDenied);
        assert_eq!(other_agent.message(), "lease L1 is not held by agent y");
        let no_agent = confine(&header("", "a/1.json"), &lease).unwrap_err();
        assert_eq!(no_agent.code(), Code::PermissionDenied);
        let other_key = confine(&header("x", "a/2.json"), &lease).unwrap_err();
        assert_eq!(other_key.code(), Code::PermissionDenied);
        assert!(
            other_key
                .message()
                .contains("a/2.json is not an expected object of task 7")
        );
    }

    #[test]
    fn limits_come_from_the_server_section() {
        let defaults = GatewayLimits::default();
        assert_eq!(defaults.max_message_bytes, 4 << 20);
        assert_eq!(defaults.max_concurrent_streams, 64);
        assert_eq!(defaults.admission.max_agents, 1000);
        assert_eq!(defaults.admission.max_slots, 1024);
        assert_eq!(defaults.messages_per_sec_per_slot, 200.0);
        assert_eq!(defaults.message_burst_per_slot, 1000.0);

        let src = CONFIG.replace(
            "version: 1\n",
            "version: 1\nserver:\n  max_message_bytes: 2MiB\n  max_concurrent_streams: 8\n  \
             max_agents: 2\n  max_slots_per_agent: 16\n  agent_messages: {rate: 30/min, burst: 7}\n",
        );
        let cfg = Config::parse(&src, Path::new("t.yaml")).unwrap();
        let limits = GatewayLimits::from_config(&cfg.server);
        assert_eq!(limits.max_message_bytes, 2 << 20);
        assert_eq!(limits.max_concurrent_streams, 8);
        assert_eq!(
            limits.admission,
            AdmissionLimits {
                max_agents: 2,
                max_slots: 16
            }
        );
        assert_eq!(limits.messages_per_sec_per_slot, 0.5);
        assert_eq!(limits.message_burst_per_slot, 7.0);
        // The dump parses back to the same limits.
        let again = Config::parse(&cfg.dump(), Path::new("t.yaml")).unwrap();
        assert_eq!(again.server, cfg.server);
    }

    #[test]
    fn limits_out_of_range_are_config_errors() {
        for (line, expected) in [
            (
                "max_message_bytes: 64KiB",
                "t.yaml:3:22: `max_message_bytes` must be at least 1MiB",
            ),
            (
                "max_concurrent_streams: 1",
                "t.yaml:3:27: `max_concurrent_streams` must be at least 2",
            ),
            (
                "max_agents: 0",
                "t.yaml:3:15: `max_agents` must be at least 1",
            ),
            (
                "max_slots_per_agent: 0",
                "t.yaml:3:24: `max_slots_per_agent` must be at least 1",
            ),
            (
                "agent_messages: {rate: 10/s, burst: 0}",
                "t.yaml:3:39: `burst` must be at least 1",
            ),
            ("agent_messages: {rate: 0/s}", "invalid rate `0/s`"),
            (
                "log_retention: {max_rows: 0}",
                "t.yaml:3:29: `max_rows` must be at least 1",
            ),
            (
                "log_retention: {max_age: 0s}",
                "t.yaml:3:28: `max_age` must be longer than 0s",
            ),
            ("max_agents: -1", "t.yaml:3:"),
        ] {
            let src = CONFIG.replace("version: 1\n", &format!("version: 1\nserver:\n  {line}\n"));
            let err = Config::parse(&src, Path::new("t.yaml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{line}: {err}");
        }
    }

    /// A scheduler and a gateway on a loopback port, with tasks planned.
    struct Bench {
        dir: tempfile::TempDir,
        lake_root: std::path::PathBuf,
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

    async fn bench(limits: GatewayLimits, items: &[&str]) -> Bench {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::parse(CONFIG, &dir.path().join("adce.yaml")).unwrap();
        let catalog = Arc::new(Catalog::from_config(&cfg));
        let metrics = crate::metrics::Metrics::new();
        let (sched, _thread) = crate::scheduler::spawn(
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
        let serve =
            crate::transport::apply_transport_limits(tonic::transport::Server::builder(), &limits)
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

    /// A hand-driven agent: a Connect stream and an upload client.
    struct TestAgent {
        id: String,
        tx: mpsc::Sender<pb::AgentMessage>,
        rx: Streaming<pb::ServerMessage>,
        client: AgentGatewayClient<Channel>,
    }

    impl Bench {
        async fn channel(&self) -> Channel {
            tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
                .unwrap()
                .connect()
                .await
                .unwrap()
        }

        /// Connects as agent `id` with `slots` and reads its Welcome.
        async fn agent(&self, id: &str, slots: u32) -> Result<TestAgent, Status> {
            let mut client = AgentGatewayClient::new(self.channel().await);
            let (tx, out) = mpsc::channel(64);
            tx.send(pb::AgentMessage {
                kind: Some(In::Hello(pb::Hello {
                    agent_id: id.into(),
                    hostname: "test".into(),
                    slots,
                    ..Default::default()
                })),
            })
            .await
            .unwrap();
            let mut rx = client.connect(ReceiverStream::new(out)).await?.into_inner();
            match next(&mut rx).await? {
                Some(Out::Welcome(_)) => {}
                other => panic!("expected a Welcome, got {other:?}"),
            }
            Ok(TestAgent {
                id: id.into(),
                tx,
                rx,
                client,
            })
        }

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

    /// The next message on an agent's stream (bounded wait).
    async fn next(rx: &mut Streaming<pb::ServerMessage>) -> Result<Option<Out>, Status> {
        match tokio::time::timeout(WAIT, rx.message()).await {
            Ok(message) => Ok(message?.and_then(|m| m.kind)),
            Err(_) => panic!("no message from the server within {WAIT:?}"),
        }
    }

    impl TestAgent {
        async fn assign(&mut self) -> pb::Assign {
            match next(&mut self.rx).await {
                Ok(Some(Out::Assign(assign))) => assign,
                other => panic!("expected an Assign, got {other:?}"),
            }
        }

        /// Uploads `bytes` as `key` under `lease`, claiming to be `agent`.
        async fn upload(
            &mut self,
            lease: &str,
            agent: &str,
            key: &str,
            bytes: &[u8],
        ) -> Result<pb::UploadReply, Status> {
            let chunks = vec![
                pb::UploadChunk {
                    kind: Some(pb::upload_chunk::Kind::Header(pb::UploadHeader {
                        lease_id: lease.into(),
                        key: key.into(),
                        size: bytes.len() as u64,
                        agent_id: agent.into(),
                    })),
                },
                pb::UploadChunk {
                    kind: Some(pb::upload_chunk::Kind::Data(bytes.to_vec())),
                },
            ];
            self.client
                .upload(tokio_stream::iter(chunks))
                .await
                .map(Response::into_inner)
        }

        /// Reads the stream until it ends; its final status.
        async fn end(&mut self) -> Status {
            for _ in 0..10_000 {
                match next(&mut self.rx).await {
                    Ok(Some(_)) => {}
                    Ok(None) => return Status::ok("ended"),
                    Err(status) => return status,
                }
            }
            panic!("the stream of {} did not end", self.id);
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
        let _a = bench.agent("a", 1).await.unwrap();
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
        let heartbeat = pb::AgentMessage {
            kind: Some(In::Heartbeat(pb::Heartbeat::default())),
        };
        for _ in 0..1000 {
            if flood.tx.send(heartbeat.clone()).await.is_err() {
                break;
            }
        }
        let status = flood.end().await;
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
        big.tx
            .send(pb::AgentMessage {
                kind: Some(In::LogLines(lines)),
            })
            .await
            .unwrap();
        let status = loop {
            match next(&mut big.rx).await {
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
        match next(&mut agent.rx).await {
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
        assert!(matches!(
            next(&mut late.rx).await,
            Ok(Some(Out::Stopping(_)))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn log_retention_is_the_configured_one() {
        let bench = bench(GatewayLimits::default(), &[]).await;
        for i in 0..30 {
            bench.sched.log(Event::info(format!("event {i}")).row());
        }
        bench
            .sched
            .set_log_retention(crate::config::LogRetention {
                max_age: Duration::from_secs(3600),
                max_rows: 5,
            })
            .unwrap();
        let readers = Arc::new(crate::store::Readers::new(&bench.dir.path().join("state")));
        let filter = crate::store::LogFilter::default();
        let mut kept = Vec::new();
        // The scheduler ticks every 200 ms; the first tick prunes. Until
        // every event is committed the tail may be short for other reasons,
        // so wait for the newest one too.
        for _ in 0..100 {
            let f = filter.clone();
            kept = readers
                .with(move |c| crate::store::log_tail(c, &f, 1000))
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
}
