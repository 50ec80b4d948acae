//! The agent's connection to the server as an explicit state machine:
//! `Connecting` (dial, open `AgentGateway.Connect`, send Hello, await
//! Welcome), `Connected` (a live session with its heartbeat ticker),
//! `Backoff` (waiting before the next attempt) and `Closed` (stopping). The agent core drives it and
//! decides every transition; this module owns the transport details.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use adce_proto::v1::agent_gateway_client::AgentGatewayClient;
use adce_proto::v1::{AgentMessage, Hello, ServerMessage, Welcome, agent_message, server_message};
use tokio::sync::mpsc;
use tokio::time::{Instant, Interval, Sleep};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Endpoint;

use crate::Error;

/// Longest time to establish a TCP connection to the server.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often HTTP/2 pings check an otherwise quiet connection.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a ping may go unanswered before the connection counts as dead.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the server's Welcome after Hello.
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// Heartbeat interval used when the server's Welcome does not give one.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// Lower bound of the heartbeat interval, whatever the server asks.
pub const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(50);
/// Messages queued towards the server before the agent keeps them itself.
const OUTBOUND_CAPACITY: usize = 256;

/// Builds the endpoint for `server` with keepalive and a connect timeout.
pub fn endpoint(server: &str) -> Result<Endpoint, Error> {
    let endpoint =
        Endpoint::from_shared(server.to_owned()).map_err(|source| Error::InvalidServer {
            address: server.to_owned(),
            source,
        })?;
    Ok(endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true))
}

/// A live `Connect` stream after Welcome.
pub(crate) struct Session {
    /// Messages to the server; closing it ends the request stream.
    pub(crate) outbound: mpsc::Sender<AgentMessage>,
    inbound: Streaming<ServerMessage>,
    heartbeat: Interval,
    /// The server's Welcome.
    pub(crate) welcome: Welcome,
}

impl Session {
    /// Ends the request stream and waits (bounded) for the server to end its
    /// side, so that messages already queued are delivered.
    pub(crate) async fn close(self, timeout: Duration) {
        let Session {
            outbound, inbound, ..
        } = self;
        drop(outbound);
        let mut inbound = inbound;
        let drained = tokio::time::timeout(timeout, async {
            while let Some(Ok(message)) = inbound.next().await {
                tracing::debug!(?message, "server message ignored while closing");
            }
        })
        .await;
        if drained.is_err() {
            tracing::debug!("server did not end the session in time");
        }
    }
}

/// The heartbeat interval the server asked for, bounded below.
pub(crate) fn heartbeat_interval(welcome: &Welcome) -> Duration {
    if welcome.heartbeat_interval_ms == 0 {
        DEFAULT_HEARTBEAT_INTERVAL
    } else {
        Duration::from_millis(welcome.heartbeat_interval_ms).max(MIN_HEARTBEAT_INTERVAL)
    }
}

/// Opens a session: connects, sends `hello` first on a new `Connect`
/// stream and waits for the server's Welcome.
pub(crate) async fn establish(endpoint: Endpoint, hello: Hello) -> Result<Session, Error> {
    let channel = endpoint.connect().await?;
    let (outbound, receiver) = mpsc::channel(OUTBOUND_CAPACITY);
    outbound
        .send(AgentMessage {
            kind: Some(agent_message::Kind::Hello(hello)),
        })
        .await
        .map_err(|_| Error::Protocol("session closed before hello".into()))?;
    let mut client = AgentGatewayClient::new(channel);
    let mut inbound = client
        .connect(ReceiverStream::new(receiver))
        .await?
        .into_inner();
    let first = tokio::time::timeout(WELCOME_TIMEOUT, inbound.next())
        .await
        .map_err(|_| Error::Protocol(format!("no welcome within {WELCOME_TIMEOUT:?}")))?;
    let welcome = match first {
        Some(Ok(ServerMessage {
            kind: Some(server_message::Kind::Welcome(welcome)),
        })) => welcome,
        Some(Ok(other)) => {
            return Err(Error::Protocol(format!(
                "expected welcome, got {:?}",
                other.kind
            )));
        }
        Some(Err(status)) => return Err(status.into()),
        None => {
            return Err(Error::Protocol(
                "server closed the session before welcome".into(),
            ));
        }
    };
    let period = heartbeat_interval(&welcome);
    let mut heartbeat = tokio::time::interval_at(Instant::now() + period, period);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    Ok(Session {
        outbound,
        inbound,
        heartbeat,
        welcome,
    })
}

/// A connection attempt in flight.
pub(crate) type Attempt = Pin<Box<dyn Future<Output = Result<Session, Error>> + Send>>;

/// Where the connection is.
pub(crate) enum ConnState {
    /// An attempt to open a session is running.
    Connecting(Attempt),
    /// A session is open.
    Connected(Box<Session>),
    /// Waiting before the next attempt.
    Backoff(Pin<Box<Sleep>>),
    /// Closed for good (the agent is stopping); no event ever comes.
    Closed,
}

/// What the connection has to tell the agent core.
pub(crate) enum ConnEvent {
    /// The attempt succeeded: move to `Connected`.
    Established(Box<Session>),
    /// The attempt failed: back off.
    Failed(Error),
    /// The backoff elapsed: try again.
    Retry,
    /// The server sent a message.
    Message(ServerMessage),
    /// The session ended, with the server's status when it sent one.
    Closed(Option<tonic::Status>),
    /// Time to send a heartbeat.
    HeartbeatDue,
    /// The outbound queue has room again.
    Writable,
}

impl ConnState {
    /// A fresh attempt with `hello`.
    pub(crate) fn connecting(endpoint: Endpoint, hello: Hello) -> Self {
        ConnState::Connecting(Box::pin(establish(endpoint, hello)))
    }

    /// A wait of `delay` before the next attempt.
    pub(crate) fn backoff(delay: Duration) -> Self {
        ConnState::Backoff(Box::pin(tokio::time::sleep(delay)))
    }

    /// The open session, if any.
    pub(crate) fn session(&self) -> Option<&Session> {
        match self {
            ConnState::Connected(session) => Some(session),
            _ => None,
        }
    }

    /// Waits for the next event of the current state. Cancel safe: every
    /// future it waits on lives in the state or is itself cancel safe.
    /// After `Established`, the caller must leave the `Connecting` state.
    pub(crate) async fn next_event(&mut self, want_write: bool) -> ConnEvent {
        match self {
            ConnState::Connecting(attempt) => match attempt.as_mut().await {
                Ok(session) => ConnEvent::Established(Box::new(session)),
                Err(error) => ConnEvent::Failed(error),
            },
            ConnState::Backoff(sleep) => {
                sleep.as_mut().await;
                ConnEvent::Retry
            }
            ConnState::Closed => std::future::pending().await,
            ConnState::Connected(session) => {
                tokio::select! {
                    message = session.inbound.next() => match message {
                        Some(Ok(message)) => ConnEvent::Message(message),
                        Some(Err(status)) => ConnEvent::Closed(Some(status)),
                        None => ConnEvent::Closed(None),
                    },
                    _ = session.heartbeat.tick() => ConnEvent::HeartbeatDue,
                    permit = session.outbound.reserve(), if want_write => match permit {
                        Ok(_) => ConnEvent::Writable,
                        Err(_) => ConnEvent::Closed(None),
                    },
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_interval_defaults_and_is_bounded() {
        let welcome = |ms| Welcome {
            heartbeat_interval_ms: ms,
            ..Welcome::default()
        };
        assert_eq!(heartbeat_interval(&welcome(0)), DEFAULT_HEARTBEAT_INTERVAL);
        assert_eq!(heartbeat_interval(&welcome(1)), MIN_HEARTBEAT_INTERVAL);
        assert_eq!(
            heartbeat_interval(&welcome(2500)),
            Duration::from_millis(2500)
        );
    }

    #[test]
    fn bad_server_addresses_are_rejected() {
        let error = endpoint("not a uri").expect_err("invalid");
        assert_eq!(error.to_string(), "invalid server address `not a uri`");
        assert!(endpoint("http://127.0.0.1:7070").is_ok());
    }
}
