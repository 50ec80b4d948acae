//! How the server's services meet the network: the gRPC listener (accepted
//! sockets with TCP_NODELAY, TLS from `tls:`, HTTP/2 keepalive, the stream
//! cap and message-size limits of `server:`, the auth layer in front of every
//! service, health and reflection beside `AgentGateway` and `Control`), and
//! [`metrics`], the `/metrics` HTTP endpoint.
//!
//! Architecture invariant: every service is added behind the auth layer
//! here, so no call reaches a service without passing it.

pub mod metrics;

use std::future::Future;
use std::time::Duration;

use adce_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

use crate::auth::AuthLayer;
use crate::config::{ClientAuth, TlsConfig};
use crate::control::ControlService;
use crate::error::{Error, Result};
use crate::gateway::{Gateway, GatewayLimits, MAX_ENCODE_BYTES};

/// HTTP/2 keepalive pings detect half-open agent connections.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a client may take to finish its TLS handshake; a connection
/// that never does is closed instead of held.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the gRPC listener serves, beside reflection.
#[derive(Debug)]
pub struct Services {
    /// The reporter whose statuses `grpc.health.v1.Health` serves.
    pub health: HealthReporter,
    /// `AgentGateway`.
    pub gateway: Gateway,
    /// `Control`.
    pub control: ControlService,
}

/// The connections `listener` accepts, with TCP_NODELAY set on each.
///
/// Tonic sets nodelay only on sockets it accepts itself (`serve`); a caller's
/// listener would otherwise keep Nagle's algorithm on, and every small reply
/// (an upload's, a result's ack) would wait for the peer's delayed ACK: about
/// 40 ms a round trip, measured as ~170 ms per uploaded task.
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// The `Control` service with the message-size limits applied.
pub fn control_service(
    control: ControlService,
    limits: &GatewayLimits,
) -> pb::control_server::ControlServer<ControlService> {
    pb::control_server::ControlServer::new(control)
        .max_decoding_message_size(limits.max_message_bytes)
        .max_encoding_message_size(MAX_ENCODE_BYTES.max(limits.max_message_bytes))
}

/// The transport settings of the limits: at most `max_concurrent_streams`
/// HTTP/2 streams per client connection.
pub fn apply_transport_limits<L>(
    builder: tonic::transport::Server<L>,
    limits: &GatewayLimits,
) -> tonic::transport::Server<L> {
    builder.max_concurrent_streams(limits.max_concurrent_streams)
}

/// The server side of `tls:`: its identity, and the CA client certificates
/// must chain to.
fn server_tls(tls: &TlsConfig) -> Result<ServerTlsConfig> {
    let read = |what: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| {
            Error::InvalidArgument(format!("tls: cannot read {what} {}: {e}", path.display()))
        })
    };
    let mut server = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            read("certificate", &tls.cert)?,
            read("key", &tls.key)?,
        ))
        .timeout(TLS_HANDSHAKE_TIMEOUT);
    if let Some(ca) = &tls.client_ca {
        server = server
            .client_ca_root(Certificate::from_pem(read("client CA", ca)?))
            .client_auth_optional(tls.client_auth() != ClientAuth::All);
    }
    Ok(server)
}

/// Reflection of every service served (v1 and v1alpha, for older grpcurl).
fn reflection() -> Result<(
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
)> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let failed = |e: tonic_reflection::server::Error| Error::Internal(format!("reflection: {e}"));
    Ok((
        builder().build_v1().map_err(failed)?,
        builder().build_v1alpha().map_err(failed)?,
    ))
}

/// The gRPC server for `services` on `listener`, behind `auth`, with TLS when
/// `tls` is set, until `stop` is cancelled. Errors in the settings (an
/// unreadable certificate) come before anything is served; the future runs
/// the transport.
pub fn serve_grpc(
    services: Services,
    tls: Option<&TlsConfig>,
    limits: &GatewayLimits,
    auth: AuthLayer,
    listener: TcpListener,
    stop: CancellationToken,
) -> Result<impl Future<Output = std::result::Result<(), tonic::transport::Error>> + Send + 'static>
{
    let (reflection_v1, reflection_v1alpha) = reflection()?;
    let mut builder = apply_transport_limits(Server::builder(), limits);
    if let Some(tls) = tls {
        builder = builder
            .tls_config(server_tls(tls)?)
            .map_err(|e| Error::InvalidArgument(format!("tls: {e}")))?;
    }
    let health = HealthServer::new(HealthService::from_health_reporter(services.health));
    Ok(builder
        .layer(auth)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(services.gateway.into_service(limits))
        .add_service(control_service(services.control, limits))
        .serve_with_incoming_shutdown(incoming(listener), async move {
            stop.cancelled().await;
        }))
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    use super::*;

    #[tokio::test]
    async fn accepted_connections_have_nodelay_on() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut accepted = incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let stream = tokio::time::timeout(Duration::from_secs(10), accepted.next())
            .await
            .expect("a connection within 10 s")
            .expect("the listener is open")
            .unwrap();
        assert!(stream.nodelay().unwrap(), "TCP_NODELAY must be set");
    }
}
