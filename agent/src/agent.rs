//! The agent core: one task that owns the connection state machine, the
//! running tasks and the outbox. It turns server messages into runner tasks
//! and cancellations, forwards runner events and results (queueing them
//! while disconnected), heartbeats, refuses (OUTCOME_REFUSED) assignments
//! that arrive while it drains or closes, and decides when `run` returns
//! (drain finished, shutdown, or the server refused the agent's token).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use adce_proto::v1::{
    AgentMessage, Assign, Draining, Heartbeat, Hello, Outcome, ServerMessage, TaskResult,
    agent_message, server_message,
};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::Error;
use crate::backoff::BackoffPolicy;
use crate::connection::{ConnEvent, ConnState, Dialer};
use crate::outbox::{MAX_CHATTER_BYTES, Outbox};
use crate::runner::{RunnerContext, TaskEvent, TaskSpec, run_task};
use crate::upload::GrpcUploader;

/// Events runners may queue before they wait for the core.
const EVENT_CHANNEL_CAPACITY: usize = 1024;
/// How long shutdown waits for killed tasks to wind down.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long a closing session waits for the server to end the stream.
pub const SESSION_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long after telling the server it drains the agent keeps its session
/// open, so that an assignment that crossed the Draining message can still
/// be answered with OUTCOME_REFUSED (instead of waiting on the server for
/// its lease to expire). Only an agent that drains within this time of
/// asking to waits for it.
pub const DRAIN_LINGER: Duration = Duration::from_millis(500);
/// The message of OUTCOME_REFUSED results.
pub const REFUSED_MESSAGE: &str = "agent is draining";

/// Who the agent is, as told in Hello.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub(crate) agent_id: String,
    pub(crate) hostname: String,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) slots: u32,
}

/// A task the agent runs.
struct Running {
    cancel: CancellationToken,
    task_id: i64,
}

/// Why the main loop woke up.
enum Wake {
    Shutdown,
    Drain,
    Joined(Option<Result<(tokio::task::Id, TaskResult), JoinError>>),
    Event(Option<TaskEvent>),
    Conn(ConnEvent),
}

/// The agent core's state; see the module doc.
pub(crate) struct Agent {
    identity: Identity,
    dialer: Dialer,
    reconnect: BackoffPolicy,
    ctx: Arc<RunnerContext>,
    uploader: Arc<GrpcUploader>,
    events_tx: mpsc::Sender<TaskEvent>,
    events_rx: mpsc::Receiver<TaskEvent>,
    running: HashMap<String, Running>,
    joins: JoinSet<TaskResult>,
    join_leases: HashMap<tokio::task::Id, String>,
    outbox: Outbox,
    draining: bool,
    /// When the agent told the server it drains (it keeps the session open
    /// until [`DRAIN_LINGER`] after that).
    draining_sent: Option<Instant>,
    conn: ConnState,
    failures: u32,
}

impl Agent {
    pub(crate) fn new(
        identity: Identity,
        dialer: Dialer,
        reconnect: BackoffPolicy,
        ctx: RunnerContext,
        uploader: GrpcUploader,
    ) -> Self {
        let (events_tx, events_rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        let hello = hello(&identity, Vec::new());
        let conn = ConnState::connecting(dialer.clone(), hello);
        Self {
            identity,
            dialer,
            reconnect,
            ctx: Arc::new(ctx),
            uploader: Arc::new(uploader),
            events_tx,
            events_rx,
            running: HashMap::new(),
            joins: JoinSet::new(),
            join_leases: HashMap::new(),
            outbox: Outbox::new(MAX_CHATTER_BYTES),
            draining: false,
            draining_sent: None,
            conn,
            failures: 0,
        }
    }

    /// Runs until drained (the server's Drain, or `drain` cancelled) or
    /// `shutdown` is cancelled; fails when the server refuses the agent's
    /// token (running tasks are killed first).
    pub(crate) async fn run(
        mut self,
        drain: CancellationToken,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        tracing::info!(agent = %self.identity.agent_id, slots = self.identity.slots, "agent starting");
        loop {
            if self.drained() {
                tracing::info!(agent = %self.identity.agent_id, "drained, stopping");
                self.close_session().await;
                return Ok(());
            }
            let want_write = self.conn.session().is_some() && !self.outbox.is_empty();
            let wake = tokio::select! {
                () = shutdown.cancelled() => Wake::Shutdown,
                () = drain.cancelled(), if !self.draining => Wake::Drain,
                joined = self.joins.join_next_with_id(), if !self.joins.is_empty() => Wake::Joined(joined),
                event = self.events_rx.recv() => Wake::Event(event),
                event = self.conn.next_event(want_write) => Wake::Conn(event),
            };
            match wake {
                Wake::Shutdown => return self.shutdown().await,
                Wake::Drain => {
                    tracing::info!(
                        agent = %self.identity.agent_id,
                        running = self.running.len(),
                        "draining: finishing running tasks, taking no new ones"
                    );
                    self.draining = true;
                    self.draining_sent = Some(Instant::now());
                    self.outbox.push(AgentMessage {
                        kind: Some(agent_message::Kind::Draining(Draining {
                            reason: "agent is stopping".into(),
                        })),
                    });
                }
                Wake::Joined(Some(joined)) => self.task_joined(joined),
                Wake::Joined(None) | Wake::Event(None) => {}
                Wake::Event(Some(event)) => self.outbox.push(event_message(event)),
                Wake::Conn(event) => {
                    if let Some(fatal) = self.on_conn_event(event) {
                        return self.fail(fatal).await;
                    }
                }
            }
            self.flush();
        }
    }

    /// Drain was asked, nothing runs and every result has been handed over
    /// (leftover chatter is only waited for while connected).
    fn drained(&self) -> bool {
        self.draining
            && self.running.is_empty()
            && !self.outbox.has_results()
            && (self.outbox.is_empty() || self.conn.session().is_none())
    }

    /// Leases the agent still holds: running, or finished with the result
    /// not yet handed to the server.
    fn held_leases(&self) -> Vec<String> {
        let mut leases: Vec<String> = self
            .running
            .keys()
            .map(String::as_str)
            .chain(self.outbox.result_leases())
            .map(str::to_owned)
            .collect();
        leases.sort_unstable();
        leases.dedup();
        leases
    }

    /// Acts on a connection event; returns the error that ends the agent
    /// when the server refused its token.
    fn on_conn_event(&mut self, event: ConnEvent) -> Option<Error> {
        match event {
            ConnEvent::Established(session) => {
                tracing::info!(
                    agent = %self.identity.agent_id,
                    registered_as = %session.welcome.agent_id,
                    server_version = %session.welcome.server_version,
                    heartbeat_interval_ms = session.welcome.heartbeat_interval_ms,
                    lease_ttl_ms = session.welcome.lease_ttl_ms,
                    "connected"
                );
                self.failures = 0;
                self.conn = ConnState::Connected(session);
            }
            ConnEvent::Failed(error) => {
                if let Some(fatal) = error.token_refused() {
                    return Some(fatal);
                }
                let delay = self.reconnect.delay(self.failures);
                self.failures = self.failures.saturating_add(1);
                let chain = error_chain(&error);
                let retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
                if self.dialer.uses_tls() && is_tls_failure(&chain) {
                    tracing::warn!(
                        agent = %self.identity.agent_id,
                        error = %chain,
                        attempt = self.failures,
                        retry_in_ms,
                        "TLS handshake with the server failed: check --ca-file, --cert-file, --key-file and --tls-name"
                    );
                } else {
                    tracing::warn!(
                        agent = %self.identity.agent_id,
                        error = %chain,
                        attempt = self.failures,
                        retry_in_ms,
                        "cannot connect to the server"
                    );
                }
                self.conn = ConnState::backoff(delay);
            }
            ConnEvent::Retry => {
                let hello = hello(&self.identity, self.held_leases());
                self.conn = ConnState::connecting(self.dialer.clone(), hello);
            }
            ConnEvent::Message(message) => self.on_server_message(message),
            ConnEvent::Closed(status) => {
                if let Some(fatal) = status
                    .as_ref()
                    .and_then(|status| Error::Status(status.clone()).token_refused())
                {
                    return Some(fatal);
                }
                self.session_lost(status);
            }
            ConnEvent::HeartbeatDue => self.heartbeat(),
            ConnEvent::Writable => {}
        }
        None
    }

    /// The session broke: keep recent results for the next one and back off.
    fn session_lost(&mut self, status: Option<tonic::Status>) {
        let delay = self.reconnect.delay(self.failures);
        self.failures = self.failures.saturating_add(1);
        match status {
            Some(status) => tracing::warn!(
                agent = %self.identity.agent_id,
                code = ?status.code(),
                message = status.message(),
                retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                "session with the server broke"
            ),
            None => tracing::warn!(
                agent = %self.identity.agent_id,
                retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                "server closed the session"
            ),
        }
        self.outbox.session_lost(Instant::now());
        self.conn = ConnState::backoff(delay);
    }

    fn heartbeat(&mut self) {
        let Some(session) = self.conn.session() else {
            return;
        };
        let message = AgentMessage {
            kind: Some(agent_message::Kind::Heartbeat(Heartbeat {
                running_leases: self.running.keys().cloned().collect(),
            })),
        };
        match session.outbound.try_send(message) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                tracing::debug!("outbound queue full, heartbeat skipped");
            }
            Err(TrySendError::Closed(_)) => self.session_lost(None),
        }
    }

    fn on_server_message(&mut self, message: ServerMessage) {
        match message.kind {
            Some(server_message::Kind::Assign(assign)) => self.assign(assign),
            Some(server_message::Kind::Cancel(cancel)) => {
                match self.running.get(&cancel.lease_id) {
                    Some(running) => {
                        tracing::info!(lease = %cancel.lease_id, task = running.task_id, reason = %cancel.reason, "cancel requested");
                        running.cancel.cancel();
                    }
                    None => {
                        tracing::debug!(lease = %cancel.lease_id, reason = %cancel.reason, "cancel for a lease not running here");
                    }
                }
            }
            Some(server_message::Kind::Drain(drain)) => {
                tracing::info!(
                    agent = %self.identity.agent_id,
                    reason = %drain.reason,
                    running = self.running.len(),
                    "drain requested: finishing running tasks, taking no new ones"
                );
                self.draining = true;
            }
            Some(server_message::Kind::Welcome(welcome)) => {
                tracing::debug!(registered_as = %welcome.agent_id, "repeated welcome ignored");
            }
            Some(server_message::Kind::Stopping(stopping)) => {
                tracing::info!(
                    reason = %stopping.reason,
                    grace_ms = stopping.grace_ms,
                    running = self.running.len(),
                    "server is stopping: finishing running tasks, reconnecting afterwards"
                );
            }
            None => tracing::warn!("empty server message ignored"),
        }
    }

    /// Starts a runner for `assign`, or reports at once why it cannot run.
    fn assign(&mut self, assign: Assign) {
        let lease_id = assign.lease_id.clone();
        if self.running.contains_key(&lease_id) {
            tracing::warn!(lease = %lease_id, "assignment for a lease already running ignored");
            return;
        }
        if self.draining {
            tracing::info!(lease = %lease_id, task = assign.task_id, "assignment refused: the agent is draining");
            self.outbox.push(result_message(refused(lease_id)));
            return;
        }
        let refusal = if self.running.len() >= self.identity.slots as usize {
            Some(format!(
                "agent already runs {} tasks, its slot limit",
                self.identity.slots
            ))
        } else {
            None
        };
        let spec = match refusal {
            Some(reason) => Err(reason),
            None => TaskSpec::try_from(assign).map_err(|error| error.to_string()),
        };
        let spec = match spec {
            Ok(spec) => spec,
            Err(message) => {
                tracing::warn!(lease = %lease_id, %message, "assignment refused");
                self.outbox.push(result_message(TaskResult {
                    lease_id,
                    outcome: Outcome::SpawnFailed.into(),
                    message,
                    ..TaskResult::default()
                }));
                return;
            }
        };
        let task_id = spec.task_id;
        tracing::info!(lease = %lease_id, task = task_id, "task assigned");
        let cancel = CancellationToken::new();
        let span = tracing::info_span!("task", agent = %self.identity.agent_id, lease = %lease_id, task = task_id);
        let ctx = Arc::clone(&self.ctx);
        let uploader = Arc::clone(&self.uploader);
        let events = self.events_tx.clone();
        let token = cancel.clone();
        let handle = self.joins.spawn(
            async move { run_task(spec, &ctx, uploader.as_ref(), &events, &token).await }
                .instrument(span),
        );
        self.join_leases.insert(handle.id(), lease_id.clone());
        self.running.insert(lease_id, Running { cancel, task_id });
    }

    /// A runner ended: forward what it said before, then its result.
    fn task_joined(&mut self, joined: Result<(tokio::task::Id, TaskResult), JoinError>) {
        // Every event a runner sent happened before it returned, so draining
        // the channel now keeps logs ahead of the result.
        while let Ok(event) = self.events_rx.try_recv() {
            self.outbox.push(event_message(event));
        }
        let result = match joined {
            Ok((id, result)) => {
                self.join_leases.remove(&id);
                result
            }
            Err(error) => {
                let Some(lease_id) = self.join_leases.remove(&error.id()) else {
                    tracing::error!(%error, "unknown runner ended");
                    return;
                };
                tracing::error!(lease = %lease_id, %error, "runner failed");
                TaskResult {
                    lease_id,
                    outcome: Outcome::Exited.into(),
                    exit_code: -1,
                    message: format!("the agent's runner failed: {error}"),
                    ..TaskResult::default()
                }
            }
        };
        self.running.remove(&result.lease_id);
        self.outbox.push(result_message(result));
    }

    /// Hands queued messages to the session while it has room.
    fn flush(&mut self) {
        let now = Instant::now();
        self.outbox.prune_sent(now);
        let dropped = self.outbox.take_dropped();
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "log and progress messages dropped while the server was unreachable"
            );
        }
        let Some(session) = self.conn.session() else {
            return;
        };
        let mut lost = false;
        while let Some(message) = self.outbox.pop() {
            let sent_result = match &message.kind {
                Some(agent_message::Kind::Result(result)) => Some(result.clone()),
                _ => None,
            };
            match session.outbound.try_send(message) {
                Ok(()) => {
                    if let Some(result) = sent_result {
                        self.outbox.mark_sent(result, now);
                    }
                }
                Err(TrySendError::Full(message)) => {
                    self.outbox.unpop(message);
                    break;
                }
                Err(TrySendError::Closed(message)) => {
                    self.outbox.unpop(message);
                    lost = true;
                    break;
                }
            }
        }
        if lost {
            self.session_lost(None);
        }
    }

    /// Closes the session, if any, letting queued messages go out. Until
    /// [`DRAIN_LINGER`] after the agent said it drains, and for every
    /// assignment already received, the session stays open so that each
    /// assignment the agent will not run is answered with OUTCOME_REFUSED.
    async fn close_session(&mut self) {
        let conn = std::mem::replace(&mut self.conn, ConnState::Closed);
        if let ConnState::Connected(session) = conn {
            let linger_until = self
                .draining_sent
                .map_or_else(Instant::now, |sent| sent + DRAIN_LINGER);
            (*session)
                .close(linger_until, SESSION_CLOSE_TIMEOUT, |message| {
                    match &message.kind {
                        Some(server_message::Kind::Assign(assign)) => {
                            tracing::info!(lease = %assign.lease_id, task = assign.task_id, "assignment refused while closing: the agent is draining");
                            Some(result_message(refused(assign.lease_id.clone())))
                        }
                        _ => {
                            tracing::debug!(?message, "server message ignored while closing");
                            None
                        }
                    }
                })
                .await;
        }
    }

    /// The server refused the agent's token: kill every task, report what
    /// can still be reported, and fail with `error`.
    async fn fail(mut self, error: Error) -> Result<(), Error> {
        tracing::error!(
            agent = %self.identity.agent_id,
            %error,
            running = self.running.len(),
            "stopping: the server refused the agent's token"
        );
        self.stop_tasks().await;
        Err(error)
    }

    /// Kills every task, reports what can still be reported, and returns.
    async fn shutdown(mut self) -> Result<(), Error> {
        tracing::info!(
            agent = %self.identity.agent_id,
            running = self.running.len(),
            "shutting down: killing running tasks"
        );
        self.stop_tasks().await;
        Ok(())
    }

    /// Kills every task, waits (bounded) for their results and hands what it
    /// can to the server before closing the session.
    async fn stop_tasks(&mut self) {
        for running in self.running.values() {
            running.cancel.cancel();
        }
        let grace = tokio::time::sleep(SHUTDOWN_GRACE);
        tokio::pin!(grace);
        while !self.joins.is_empty() {
            tokio::select! {
                joined = self.joins.join_next_with_id() => {
                    if let Some(joined) = joined {
                        self.task_joined(joined);
                    }
                }
                Some(event) = self.events_rx.recv() => self.outbox.push(event_message(event)),
                () = &mut grace => {
                    tracing::warn!(running = self.joins.len(), "tasks did not stop in time, aborting them");
                    // Aborting drops each runner, whose process-group guard
                    // kills what is left.
                    self.joins.shutdown().await;
                    break;
                }
            }
        }
        self.flush();
        self.close_session().await;
        if self.outbox.has_results() {
            tracing::warn!(
                unsent = self.outbox.result_leases().count(),
                "results not delivered before shutdown"
            );
        }
    }
}

/// The answer to an assignment the agent does not start because it drains:
/// nothing ran, and the server re-queues the task without counting an
/// attempt.
fn refused(lease_id: String) -> TaskResult {
    TaskResult {
        lease_id,
        outcome: Outcome::Refused.into(),
        message: REFUSED_MESSAGE.to_owned(),
        ..TaskResult::default()
    }
}

/// Whether a failed connection attempt failed in its TLS handshake
/// (certificate not trusted, wrong name, client certificate refused), going
/// by the error chain's words: rustls' errors reach the agent only as text
/// inside transport errors (or inside an `Unknown` status when the server
/// rejected the client certificate after the handshake looked done).
fn is_tls_failure(chain: &str) -> bool {
    let chain = chain.to_ascii_lowercase();
    ["certificate", "tls", "handshake", "alert"]
        .iter()
        .any(|word| chain.contains(word))
}

fn hello(identity: &Identity, running_leases: Vec<String>) -> Hello {
    Hello {
        agent_id: identity.agent_id.clone(),
        hostname: identity.hostname.clone(),
        labels: identity
            .labels
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect(),
        slots: identity.slots,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        running_leases,
    }
}

fn event_message(event: TaskEvent) -> AgentMessage {
    let kind = match event {
        TaskEvent::Logs(lines) => agent_message::Kind::LogLines(lines),
        TaskEvent::Progress(progress) => agent_message::Kind::Progress(progress),
    };
    AgentMessage { kind: Some(kind) }
}

fn result_message(result: TaskResult) -> AgentMessage {
    AgentMessage {
        kind: Some(agent_message::Kind::Result(result)),
    }
}

/// The error and its sources, joined for one log field.
fn error_chain(error: &Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_failures_are_recognised_by_their_chain() {
        assert!(is_tls_failure(
            "server returned Unknown: transport error: received fatal alert: CertificateRequired"
        ));
        assert!(is_tls_failure(
            "cannot reach the server: invalid peer certificate: UnknownIssuer"
        ));
        assert!(!is_tls_failure(
            "cannot reach the server: tcp connect error: Connection refused (os error 111)"
        ));
    }

    #[test]
    fn a_refusal_says_the_agent_drains_and_counts_no_attempt() {
        let result = refused("L1".into());
        assert_eq!(result.outcome(), Outcome::Refused);
        assert_eq!(result.message, REFUSED_MESSAGE);
        assert_eq!(result.lease_id, "L1");
    }
}
