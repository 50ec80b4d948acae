//! The `AgentGateway` service: agents' Connect streams and uploads. It turns
//! stream messages into scheduler commands, checks the lake before a result
//! is judged, and streams uploads into the lake. It holds no state of its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use adce_proto::v1 as pb;
use adce_proto::v1::agent_message::Kind as In;
use sha2::{Digest, Sha256};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

use crate::error::Error;
use crate::lake::{SharedLake, validate_key};
use crate::logs::Event;
use crate::model::{AgentId, LeaseId};
use crate::scheduler::{AgentEvent, Command, Handle, ObjectCheck};

/// How long a new stream may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The gateway service.
#[derive(Debug, Clone)]
pub struct Gateway {
    scheduler: Handle,
    lake: SharedLake,
    max_upload_bytes: u64,
    next_conn: Arc<AtomicU64>,
    metrics: crate::metrics::Metrics,
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
        }
    }
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
async fn complete(scheduler: Handle, lake: SharedLake, agent: AgentId, result: pb::TaskResult) {
    let lease = LeaseId(result.lease_id.clone());
    let info = scheduler
        .call(|reply| Command::LeaseInfo {
            lease: lease.clone(),
            agent: Some(agent.clone()),
            reply,
        })
        .await
        .and_then(|r| r);
    let check = match &info {
        Ok(info) if result.outcome == pb::Outcome::Exited as i32 && result.exit_code == 0 => {
            check_objects(&lake, &info.expected_keys, info.min_bytes).await
        }
        _ => ObjectCheck::default(),
    };
    // The scheduler re-checks the lease and logs a refused result itself.
    let outcome = scheduler
        .call(|reply| Command::Complete {
            agent: agent.clone(),
            result,
            check,
            reply,
        })
        .await;
    if let Ok(Err(e)) | Err(e) = outcome {
        debug!(agent = %agent, lease = %lease, error = %e, "result not applied");
    }
}

#[tonic::async_trait]
impl pb::agent_gateway_server::AgentGateway for Gateway {
    type ConnectStream = UnboundedReceiverStream<Result<pb::ServerMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let address = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 10s"))??;
        let hello = match first.and_then(|m| m.kind) {
            Some(In::Hello(hello)) => hello,
            _ => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        let agent = AgentId(hello.agent_id.clone());
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.scheduler
            .call(|reply| Command::Connect {
                hello,
                address,
                conn_id,
                tx,
                reply,
            })
            .await??;
        let scheduler = self.scheduler.clone();
        let lake = self.lake.clone();
        tokio::spawn(async move {
            loop {
                let message = match inbound.message().await {
                    Ok(Some(message)) => message,
                    Ok(None) => break,
                    Err(status) => {
                        debug!(agent = %agent, %status, "agent stream ended with an error");
                        break;
                    }
                };
                let event = match message.kind {
                    Some(In::Heartbeat(hb)) => AgentEvent::Heartbeat(hb),
                    Some(In::Progress(p)) => AgentEvent::Progress(p),
                    Some(In::LogLines(lines)) => AgentEvent::LogLines(lines),
                    Some(In::Draining(draining)) => AgentEvent::Draining(draining),
                    Some(In::Result(result)) => {
                        tokio::spawn(complete(
                            scheduler.clone(),
                            lake.clone(),
                            agent.clone(),
                            result,
                        ));
                        continue;
                    }
                    Some(In::Hello(_)) | None => {
                        scheduler.log(
                            Event::warn("agent sent an unexpected message; ignored")
                                .agent(agent.0.clone())
                                .row(),
                        );
                        continue;
                    }
                };
                if scheduler
                    .send(Command::FromAgent {
                        agent: agent.clone(),
                        event,
                    })
                    .is_err()
                {
                    break;
                }
            }
            let _ = scheduler.send(Command::Disconnect { agent, conn_id });
        });
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }

    async fn upload(
        &self,
        request: Request<Streaming<pb::UploadChunk>>,
    ) -> Result<Response<pb::UploadReply>, Status> {
        let started = std::time::Instant::now();
        let mut stream = request.into_inner();
        let header = match stream.message().await?.and_then(|c| c.kind) {
            Some(pb::upload_chunk::Kind::Header(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first upload message must be a header",
                ));
            }
        };
        validate_key(&header.key).map_err(Error::from)?;
        if header.size > self.max_upload_bytes {
            return Err(Error::TooLarge(format!(
                "object {} is {} bytes, above the limit of {} bytes",
                header.key, header.size, self.max_upload_bytes
            ))
            .into());
        }
        let lease = LeaseId(header.lease_id.clone());
        let lease_info = |lease: LeaseId| async {
            self.scheduler
                .call(|reply| Command::LeaseInfo {
                    lease,
                    agent: None,
                    reply,
                })
                .await
                .and_then(|r| r)
        };
        let info = lease_info(lease.clone()).await?;
        if !info.expected_keys.contains(&header.key) {
            return Err(Error::InvalidArgument(format!(
                "key {} is not an expected object of task {} (expected: {})",
                header.key,
                info.task_id,
                info.expected_keys.join(", ")
            ))
            .into());
        }
        let mut writer = self.lake.put(&header.key).await.map_err(Error::from)?;
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        loop {
            let chunk = match stream.message().await {
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
        // The lease may have expired while the bytes streamed in.
        if let Err(e) = lease_info(lease.clone()).await {
            writer.abort().await;
            return Err(e.into());
        }
        let meta = writer.commit().await.map_err(Error::from)?;
        self.metrics.uploaded(meta.size, started.elapsed());
        let sha256: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        self.scheduler
            .call(|reply| Command::RecordUpload {
                lease,
                key: header.key.clone(),
                size: meta.size,
                sha256: sha256.clone(),
                reply,
            })
            .await??;
        Ok(Response::new(pb::UploadReply {
            key: header.key,
            size: meta.size,
            sha256,
        }))
    }
}
