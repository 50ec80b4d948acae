//! The agent's connection to the server as an explicit state machine:
//! `Connecting` (dial, open `AgentGateway.Connect`, send Hello, await
//! Welcome), `Connected` (a live session with its heartbeat ticker),
//! `Backoff` (waiting before the next attempt) and `Closed` (stopping). The agent core drives it and
//! decides every transition; this module owns the transport details.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use adce_proto::dial::{AuthChannel, Bearer, ClientSecurity};
use adce_proto::v1::agent_gateway_client::AgentGatewayClient;
use adce_proto::v1::{AgentMessage, Hello, ServerMessage, Welcome, agent_message, server_message};
use tokio::sync::mpsc;
use tokio::time::{Instant, Interval, Sleep};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::service::interceptor::InterceptedService;
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

/// How the agent reaches the server: the endpoint (TLS settings from
/// [`ClientSecurity`], keepalive, connect timeout) and the bearer token that
/// every call — the `Connect` stream and each upload — carries. Its Debug
/// never shows the token.
#[derive(Debug, Clone)]
pub struct Dialer {
    endpoint: Endpoint,
    bearer: Bearer,
    tls: bool,
}

impl Dialer {
    /// The dialer for `server` with `security`'s token and TLS files (read
    /// now, so a missing file is an error at start).
    pub fn new(server: &str, security: &ClientSecurity) -> Result<Self, Error> {
        let endpoint = security
            .endpoint(server)?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        Ok(Self {
            endpoint,
            bearer: security.bearer()?,
            tls: security.uses_tls(server),
        })
    }

    /// Whether calls go over TLS.
    pub fn uses_tls(&self) -> bool {
        self.tls
    }

    /// Connects now.
    pub async fn connect(&self) -> Result<AuthChannel, Error> {
        let channel = self.endpoint.connect().await?;
        Ok(InterceptedService::new(channel, self.bearer.clone()))
    }

    /// A channel that connects on first use and reconnects by itself.
    pub fn connect_lazy(&self) -> AuthChannel {
        InterceptedService::new(self.endpoint.connect_lazy(), self.bearer.clone())
    }
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
    /// Closes the session in two steps. First, while the request stream is
    /// still open — until `linger_until`, and in any case for every server
    /// message already received — each server message goes to `answer`, and
    /// the reply it returns (e.g. a refusal of a late assignment) is sent.
    /// Then the request stream ends and the server's remaining messages are
    /// read (bounded by `timeout`) so that what was queued is delivered.
    pub(crate) async fn close(
        self,
        linger_until: Instant,
        timeout: Duration,
        mut answer: impl FnMut(&ServerMessage) -> Option<AgentMessage>,
    ) {
        let Session {
            outbound, inbound, ..
        } = self;
        let mut inbound = inbound;
        // A server that never stops sending cannot hold the agent here.
        let give_up = linger_until.max(Instant::now()) + timeout;
        // `timeout_at` polls the stream before its deadline, so messages
        // that already arrived are answered even when the deadline passed.
        while let Ok(next) = tokio::time::timeout_at(linger_until, inbound.next()).await {
            if Instant::now() >= give_up {
                break;
            }
            let Some(Ok(message)) = next else {
                // The server ended the session: nothing more can be sent.
                return;
            };
            if let Some(reply) = answer(&message) {
                match tokio::time::timeout(timeout, outbound.send(reply)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return,
                    Err(_) => {
                        tracing::warn!("outbound queue stayed full while closing, reply dropped")
                    }
                }
            }
        }
        drop(outbound);
        let drained = tokio::time::timeout(timeout, async {
            while let Some(Ok(message)) = inbound.next().await {
                match &message.kind {
                    Some(server_message::Kind::Assign(assign)) => tracing::warn!(
                        lease = %assign.lease_id,
                        task = assign.task_id,
                        "assignment arrived after the agent ended its stream; the server re-queues it when its lease expires"
                    ),
                    _ => tracing::debug!(?message, "server message ignored while closing"),
                }
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
pub(crate) async fn establish(dialer: Dialer, hello: Hello) -> Result<Session, Error> {
    let channel = dialer.connect().await?;
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
    pub(crate) fn connecting(dialer: Dialer, hello: Hello) -> Self {
        ConnState::Connecting(Box::pin(establish(dialer, hello)))
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
        let security = ClientSecurity::default();
        let error = Dialer::new("not a uri", &security).expect_err("invalid");
        assert!(
            error
                .to_string()
                .starts_with("invalid server address \"not a uri\""),
            "{error}"
        );
        assert!(Dialer::new("http://127.0.0.1:7070", &security).is_ok());
    }

    #[test]
    fn tls_follows_the_security_settings_and_debug_hides_the_token() -> Result<(), Error> {
        let security = ClientSecurity {
            token: Some("s3cret-token".into()),
            ..ClientSecurity::default()
        };
        let plain = Dialer::new("http://127.0.0.1:7070", &security)?;
        assert!(!plain.uses_tls());
        assert!(!format!("{plain:?}").contains("s3cret"));
        let tls = Dialer::new("https://127.0.0.1:7070", &security)?;
        assert!(tls.uses_tls());
        Ok(())
    }
}
