//! A hand-made agent for end-to-end tests: a raw `AgentGateway` client whose
//! Connect stream and uploads the test writes message by message, so a test
//! can do what the real agent never does (upload another lease's key, flood
//! the stream, stop an upload half-way), and so a test can drive a gateway
//! message by message ([`RawAgent::next`]). It heartbeats the leases it was
//! assigned in the background, at the harness configs' heartbeat interval,
//! unless it connected quiet ([`RawAgent::connect_quiet`]).
//!
//! This is the one fake agent of the tests that check behaviour; the dispatch
//! benchmark (`src/bin/bench_dispatch.rs`) has its own, built for throughput.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use adce_proto::v1 as pb;
use adce_proto::v1::agent_gateway_client::AgentGatewayClient;
use adce_proto::v1::agent_message::Kind as In;
use adce_proto::v1::server_message::Kind as Out;
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

/// How long one message from the server may take to arrive.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the server may take to end a stream it refused.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);
/// The agent heartbeats this often (the harness configs' interval).
const HEARTBEAT: Duration = Duration::from_millis(500);
/// It heartbeats at most this many times (ten minutes' worth).
const MAX_HEARTBEATS: u32 = 1200;
/// Messages the agent may have queued for sending, on its Connect stream and
/// on each upload.
const OUTBOX: usize = 1024;

/// A hand-driven agent: a Connect stream whose messages the test writes, an
/// upload client, and (unless quiet) a background heartbeat for the leases
/// it was assigned.
pub struct RawAgent {
    id: String,
    tx: mpsc::Sender<pb::AgentMessage>,
    rx: Streaming<pb::ServerMessage>,
    client: AgentGatewayClient<Channel>,
    leases: Arc<Mutex<Vec<String>>>,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for RawAgent {
    fn drop(&mut self) {
        if let Some(heartbeat) = &self.heartbeat {
            heartbeat.abort();
        }
    }
}

impl std::fmt::Debug for RawAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawAgent").field("id", &self.id).finish()
    }
}

impl RawAgent {
    /// Connects as `id` with `slots` and reads the Welcome; the refusal when
    /// the server refuses the agent. It heartbeats from then on.
    pub async fn connect(url: &str, id: &str, slots: u32) -> Result<RawAgent, Status> {
        RawAgent::connect_with(url, id, slots, true).await
    }

    /// Like [`RawAgent::connect`], but the agent never heartbeats: its stream
    /// stays quiet unless the test sends, as a half-open connection's does.
    pub async fn connect_quiet(url: &str, id: &str, slots: u32) -> Result<RawAgent, Status> {
        RawAgent::connect_with(url, id, slots, false).await
    }

    async fn connect_with(
        url: &str,
        id: &str,
        slots: u32,
        heartbeats: bool,
    ) -> Result<RawAgent, Status> {
        let channel = tonic::transport::Endpoint::from_shared(url.to_string())
            .map_err(|e| Status::invalid_argument(e.to_string()))?
            .connect()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let mut client = AgentGatewayClient::new(channel);
        let (tx, outbox) = mpsc::channel(OUTBOX);
        let hello = pb::AgentMessage {
            kind: Some(In::Hello(pb::Hello {
                agent_id: id.to_string(),
                hostname: "raw-test-client".into(),
                slots,
                version: "test".into(),
                ..Default::default()
            })),
        };
        if tx.send(hello).await.is_err() {
            return Err(Status::internal("the outbox closed before Hello"));
        }
        let mut rx = client
            .connect(tokio_stream::wrappers::ReceiverStream::new(outbox))
            .await?
            .into_inner();
        match tokio::time::timeout(MESSAGE_TIMEOUT, rx.message()).await {
            Ok(Ok(Some(pb::ServerMessage {
                kind: Some(Out::Welcome(_)),
            }))) => {}
            Ok(Err(status)) => return Err(status),
            Ok(other) => panic!("{id}: expected a Welcome, got {other:?}"),
            Err(_) => panic!("{id}: no Welcome within {MESSAGE_TIMEOUT:?}"),
        }
        let leases = Arc::new(Mutex::new(Vec::new()));
        let heartbeat = heartbeats.then(|| {
            let (tx, leases) = (tx.clone(), leases.clone());
            tokio::spawn(async move {
                for _ in 0..MAX_HEARTBEATS {
                    tokio::time::sleep(HEARTBEAT).await;
                    let running_leases = leases.lock().map(|l| l.clone()).unwrap_or_default();
                    let beat = pb::AgentMessage {
                        kind: Some(In::Heartbeat(pb::Heartbeat { running_leases })),
                    };
                    if tx.send(beat).await.is_err() {
                        return;
                    }
                }
            })
        });
        Ok(RawAgent {
            id: id.to_string(),
            tx,
            rx,
            client,
            leases,
            heartbeat,
        })
    }

    /// The agent id it connected with.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The next message from the server (waited for at most
    /// [`MESSAGE_TIMEOUT`]); `None` once the stream ended, the status when it
    /// failed. An Assign's lease is heartbeated from then on.
    pub async fn next(&mut self) -> Result<Option<Out>, Status> {
        let message = match tokio::time::timeout(MESSAGE_TIMEOUT, self.rx.message()).await {
            Ok(message) => message?,
            Err(_) => panic!("{}: no message within {MESSAGE_TIMEOUT:?}", self.id),
        };
        let Some(message) = message else {
            return Ok(None);
        };
        let Some(kind) = message.kind else {
            panic!("{}: the server sent a message without a kind", self.id);
        };
        if let Out::Assign(assign) = &kind
            && let Ok(mut leases) = self.leases.lock()
        {
            leases.push(assign.lease_id.clone());
        }
        Ok(Some(kind))
    }

    /// Waits for the next Assign, passing over other messages, and
    /// heartbeats its lease from then on.
    pub async fn assign(&mut self) -> pb::Assign {
        for _ in 0..100 {
            match self.next().await {
                Ok(Some(Out::Assign(assign))) => return assign,
                Ok(Some(_)) => {}
                other => panic!("{}: stream ended before an Assign: {other:?}", self.id),
            }
        }
        panic!("{}: 100 messages and no Assign", self.id);
    }

    /// Sends one message on the Connect stream; false once it is closed.
    pub async fn send(&self, kind: In) -> bool {
        self.tx
            .send(pb::AgentMessage { kind: Some(kind) })
            .await
            .is_ok()
    }

    /// Uploads `bytes` as `key` under `lease`, claiming to be agent `agent`.
    pub async fn upload(
        &mut self,
        lease: &str,
        agent: &str,
        key: &str,
        bytes: &[u8],
    ) -> Result<pb::UploadReply, Status> {
        let upload = self
            .start_upload(lease, agent, key, bytes.len() as u64)
            .await;
        upload.send(bytes.to_vec()).await;
        upload.finish().await
    }

    /// Starts uploading `key` under `lease` as agent `agent`, announcing
    /// `size` bytes; the test sends the data with [`OpenUpload::send`].
    pub async fn start_upload(&self, lease: &str, agent: &str, key: &str, size: u64) -> OpenUpload {
        let (tx, chunks) = mpsc::channel(OUTBOX);
        let header = pb::UploadChunk {
            kind: Some(pb::upload_chunk::Kind::Header(pb::UploadHeader {
                lease_id: lease.to_string(),
                key: key.to_string(),
                size,
                agent_id: agent.to_string(),
            })),
        };
        // The channel is empty: the header always fits.
        let _ = tx.try_send(header);
        let mut client = self.client.clone();
        let reply = tokio::spawn(async move {
            client
                .upload(tokio_stream::wrappers::ReceiverStream::new(chunks))
                .await
                .map(tonic::Response::into_inner)
        });
        OpenUpload { tx, reply }
    }

    /// Reads the Connect stream until the server ends it; its final status
    /// (OK when it simply ended).
    pub async fn closed(&mut self) -> Status {
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        for _ in 0..100_000 {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.message()).await {
                Ok(Ok(Some(_))) => {}
                Ok(Ok(None)) => return Status::ok("stream ended"),
                Ok(Err(status)) => return status,
                Err(_) => break,
            }
        }
        panic!("{}: the server did not end the stream", self.id);
    }
}

/// An upload whose data the test sends piece by piece; the stream stays open
/// until [`OpenUpload::finish`] (or until the value is dropped).
#[derive(Debug)]
pub struct OpenUpload {
    tx: mpsc::Sender<pb::UploadChunk>,
    reply: tokio::task::JoinHandle<Result<pb::UploadReply, Status>>,
}

impl OpenUpload {
    /// Sends `data` as the next chunk; false once the server ended the upload.
    pub async fn send(&self, data: Vec<u8>) -> bool {
        let chunk = pb::UploadChunk {
            kind: Some(pb::upload_chunk::Kind::Data(data)),
        };
        self.tx.send(chunk).await.is_ok()
    }

    /// Ends the stream and waits (bounded) for the server's answer.
    pub async fn finish(self) -> Result<pb::UploadReply, Status> {
        let OpenUpload { tx, reply } = self;
        drop(tx);
        answer(reply).await
    }

    /// Waits (bounded) for the server's answer while sending nothing more
    /// and keeping the stream open, as a stalled agent does.
    pub async fn stall(self) -> Result<pb::UploadReply, Status> {
        let OpenUpload { tx, reply } = self;
        let answered = answer(reply).await;
        drop(tx);
        answered
    }
}

/// The upload call's result, waited for at most [`MESSAGE_TIMEOUT`].
async fn answer(
    reply: tokio::task::JoinHandle<Result<pb::UploadReply, Status>>,
) -> Result<pb::UploadReply, Status> {
    match tokio::time::timeout(MESSAGE_TIMEOUT, reply).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => panic!("the upload task failed: {e}"),
        Err(_) => panic!("no answer to the upload within {MESSAGE_TIMEOUT:?}"),
    }
}

/// A runtime for tests that drive a [`RawAgent`] from synchronous code.
pub fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => panic!("cannot build a runtime: {e}"),
    }
}
