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
use crate::model::{AgentId, LeaseId, now_ms, validate_key};
use crate::reconcile::live::LiveCoverage;
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
    /// Coverage moved by each committed upload, when the server keeps one.
    live: Option<LiveCoverage>,
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
            live: None,
        }
    }

    /// The same gateway moving `live` coverage with every committed upload
    /// (it looks at the object it replaces first: one stat per upload).
    pub fn with_live_coverage(mut self, live: LiveCoverage) -> Self {
        self.live = Some(live);
        self
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
        // What the upload replaces, for live coverage (a failed stat counts
        // as absent: the next reconcile corrects the figures anyway).
        let prior = match &self.live {
            Some(_) => self
                .lake
                .stat(&header.key)
                .await
                .ok()
                .flatten()
                .map(|m| m.size),
            None => None,
        };
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
        if let Some(live) = &self.live {
            live.uploaded(
                &info.source,
                &header.key,
                prior,
                meta.size,
                info.min_bytes,
                now_ms(),
            );
        }
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
    // The pure parts are tested here; the gateway over real gRPC, driven by
    // a hand-made agent, is tested in `tests/tests/gateway.rs` (adce-tests).

    use std::path::Path;

    use super::*;
    use crate::config::Config;

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
}
