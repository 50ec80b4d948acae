//! Who may call what: a tower layer in front of every gRPC service that
//! checks the `authorization: Bearer` token against `auth.tokens` and the
//! role the called method needs, and that agents came with a client
//! certificate when `tls.client_auth` asks for one.
//!
//! Roles: the `AgentGateway` needs `agent`; `Control` reads need `read` or
//! `admin`, changes need `admin`; health and reflection are open unless the
//! config closes them (then any valid token may call them); the HTTP
//! `/metrics` endpoint needs `read` unless `auth.open_metrics`. No token or an
//! unknown one → UNAUTHENTICATED; a valid token of the wrong role →
//! PERMISSION_DENIED. Tokens are compared as SHA-256 digests in constant time
//! and never logged: logs name a token by its configured `name`.

use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::Status;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tracing::{debug, info};

use crate::config::{AuthConfig, ClientAuth, Role, TlsConfig};
use crate::metrics::METRICS_PATH;

/// The caller of a request, as established by the auth layer (in the
/// request's extensions when auth is on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's configured name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// The only agent id the token may act as, when it is bound to one.
    pub agent_id: Option<String>,
}

impl Caller {
    /// Refuses `agent_id` when the caller's token is bound to another agent.
    pub fn may_act_as(caller: Option<&Caller>, agent_id: &str) -> Result<(), Status> {
        match caller.and_then(|c| c.agent_id.as_deref().map(|bound| (c, bound))) {
            Some((caller, bound)) if bound != agent_id => Err(Status::permission_denied(format!(
                "token `{}` belongs to agent {bound}, not to agent {agent_id}",
                caller.name
            ))),
            _ => Ok(()),
        }
    }
}

/// What a gRPC method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Nothing: anyone may call it.
    Open,
    /// Any valid token.
    AnyToken,
    /// A token of one of these roles.
    Role(&'static [Role]),
}

const AGENT: &[Role] = &[Role::Agent];
const READ: &[Role] = &[Role::Read, Role::Admin];
const ADMIN: &[Role] = &[Role::Admin];

/// `Control` methods that only read.
const CONTROL_READS: [&str; 6] = [
    "Status",
    "ListTasks",
    "GetTask",
    "ListAgents",
    "Coverage",
    "Logs",
];

struct Entry {
    name: String,
    role: Role,
    agent_id: Option<String>,
    digest: [u8; 32],
}

/// The rules the layer applies; built once from the config.
pub struct Policy {
    entries: Vec<Entry>,
    open_health: bool,
    open_reflection: bool,
    open_metrics: bool,
    agents_need_cert: bool,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("tokens", &self.entries.len())
            .field("open_health", &self.open_health)
            .field("open_reflection", &self.open_reflection)
            .field("agents_need_cert", &self.agents_need_cert)
            .finish()
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

impl Policy {
    /// The policy of `auth` and `tls`.
    pub fn new(auth: &AuthConfig, tls: Option<&TlsConfig>) -> Policy {
        Policy {
            entries: auth
                .named_tokens()
                .map(|(name, t)| Entry {
                    name,
                    role: t.role,
                    agent_id: t.agent_id.clone(),
                    digest: digest(t.secret.expose().as_bytes()),
                })
                .collect(),
            open_health: auth.open_health,
            open_reflection: auth.open_reflection,
            open_metrics: auth.open_metrics,
            agents_need_cert: tls.is_some_and(|t| t.client_auth() == ClientAuth::Agents),
        }
    }

    /// Whether any token is configured (otherwise only certificates are checked).
    pub fn tokens_required(&self) -> bool {
        !self.entries.is_empty()
    }

    fn need(&self, path: &str) -> Need {
        if path == METRICS_PATH {
            return if self.open_metrics {
                Need::Open
            } else {
                Need::Role(READ)
            };
        }
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or((path, ""));
        match service {
            "grpc.health.v1.Health" if self.open_health => Need::Open,
            "grpc.health.v1.Health" => Need::AnyToken,
            s if s.starts_with("grpc.reflection.") && self.open_reflection => Need::Open,
            s if s.starts_with("grpc.reflection.") => Need::AnyToken,
            "adce.v1.AgentGateway" => Need::Role(AGENT),
            "adce.v1.Control" if CONTROL_READS.contains(&method) => Need::Role(READ),
            // Every other method, known or not, is a change.
            _ => Need::Role(ADMIN),
        }
    }

    /// The entry whose token is `presented`; every entry is compared, in
    /// constant time, whatever matches.
    fn find(&self, presented: &[u8]) -> Option<&Entry> {
        let presented = digest(presented);
        let mut found = None;
        for entry in &self.entries {
            if bool::from(entry.digest.ct_eq(&presented)) {
                found = Some(entry);
            }
        }
        found
    }

    /// Decides one request: the caller when it may go on, the status to
    /// answer otherwise.
    fn check<B>(&self, request: &http::Request<B>) -> Result<Option<Caller>, Status> {
        let path = request.uri().path();
        let need = self.need(path);
        if self.agents_need_cert && path.starts_with("/adce.v1.AgentGateway/") {
            let has_cert = request
                .extensions()
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(TlsConnectInfo::peer_certs)
                .is_some_and(|certs| !certs.is_empty());
            if !has_cert {
                return Err(Status::unauthenticated(
                    "agents must present a client certificate signed by the server's client CA",
                ));
            }
        }
        if need == Need::Open || !self.tokens_required() {
            return Ok(None);
        }
        let header = request.headers().get(http::header::AUTHORIZATION);
        let Some(header) = header else {
            return Err(Status::unauthenticated(
                "this call needs a token: pass --token, ADCE_TOKEN or --token-file",
            ));
        };
        let token = header.as_bytes().strip_prefix(b"Bearer ").ok_or_else(|| {
            Status::unauthenticated("the authorization header must be `Bearer <token>`")
        })?;
        let Some(entry) = self.find(token) else {
            return Err(Status::unauthenticated("the token is not valid"));
        };
        match need {
            Need::Role(roles) if !roles.contains(&entry.role) => {
                Err(Status::permission_denied(format!(
                    "token `{}` has role {}; {path} needs {}",
                    entry.name,
                    entry.role,
                    roles
                        .iter()
                        .map(|r| r.as_str())
                        .collect::<Vec<_>>()
                        .join(" or ")
                )))
            }
            _ => {
                if need == Need::Role(ADMIN) {
                    info!(token = %entry.name, method = %path, "admin call");
                }
                Ok(Some(Caller {
                    name: entry.name.clone(),
                    role: entry.role,
                    agent_id: entry.agent_id.clone(),
                }))
            }
        }
    }
}

/// The tower layer that applies a [`Policy`]; clones share the policy, and
/// [`AuthLayer::replace`] swaps it for every connection (config reload).
#[derive(Debug, Clone)]
pub struct AuthLayer {
    policy: Arc<RwLock<Arc<Policy>>>,
}

impl AuthLayer {
    /// A layer that lets every call through (no tokens configured).
    pub fn open() -> AuthLayer {
        AuthLayer::new(Policy::new(&AuthConfig::default(), None))
    }

    /// A layer applying `policy`.
    pub fn new(policy: Policy) -> AuthLayer {
        AuthLayer {
            policy: Arc::new(RwLock::new(Arc::new(policy))),
        }
    }

    /// Applies `policy` to every call from now on.
    pub fn replace(&self, policy: Policy) {
        let mut current = self.policy.write().unwrap_or_else(PoisonError::into_inner);
        *current = Arc::new(policy);
    }

    /// Decides one request outside the gRPC services (the metrics endpoint).
    pub fn check<B>(&self, request: &http::Request<B>) -> Result<Option<Caller>, Status> {
        self.current().check(request)
    }

    fn current(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around the routes.
#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    layer: AuthLayer,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for Auth<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        match self.layer.current().check(&request) {
            Ok(caller) => {
                if let Some(caller) = caller {
                    request.extensions_mut().insert(caller);
                }
                Box::pin(self.inner.call(request))
            }
            Err(status) => {
                let peer = request
                    .extensions()
                    .get::<TlsConnectInfo<TcpConnectInfo>>()
                    .and_then(|i| i.get_ref().remote_addr())
                    .or_else(|| {
                        request
                            .extensions()
                            .get::<TcpConnectInfo>()
                            .and_then(TcpConnectInfo::remote_addr)
                    });
                debug!(method = %request.uri().path(), ?peer, code = ?status.code(), reason = status.message(), "call refused");
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Secret, TokenConfig};

    fn token(role: Role, secret: &str) -> TokenConfig {
        let yaml = format!("role: {role}\ntoken: {secret}\n");
        let mut t: TokenConfig = serde_yaml::from_str(&yaml).expect("token yaml");
        t.secret = serde_yaml::from_str::<Secret>(secret).expect("secret");
        t
    }

    fn policy() -> Policy {
        let auth = AuthConfig {
            tokens: vec![
                token(Role::Admin, "admin-token-0123456789"),
                token(Role::Read, "read-token-0123456789"),
                token(Role::Agent, "agent-token-0123456789"),
            ],
            ..AuthConfig::default()
        };
        Policy::new(&auth, None)
    }

    fn call(path: &str, bearer: Option<&str>) -> Result<Option<Caller>, tonic::Code> {
        let mut builder = http::Request::builder().uri(format!("http://x{path}"));
        if let Some(token) = bearer {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        let request = builder.body(()).expect("request");
        policy().check(&request).map_err(|s| s.code())
    }

    #[test]
    fn missing_or_unknown_tokens_are_unauthenticated() {
        assert_eq!(
            call("/adce.v1.Control/Status", None),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            call("/adce.v1.Control/Status", Some("nope-0123456789abcdef")),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            call("/adce.v1.AgentGateway/Connect", Some("")),
            Err(tonic::Code::Unauthenticated)
        );
    }

    #[test]
    fn roles_gate_methods() {
        let read = Some("read-token-0123456789");
        let admin = Some("admin-token-0123456789");
        let agent = Some("agent-token-0123456789");
        assert!(call("/adce.v1.Control/Status", read).is_ok());
        assert!(call("/adce.v1.Control/Logs", read).is_ok());
        assert_eq!(
            call("/adce.v1.Control/Retry", read),
            Err(tonic::Code::PermissionDenied)
        );
        assert_eq!(
            call("/adce.v1.Control/Reconcile", read),
            Err(tonic::Code::PermissionDenied)
        );
        assert!(call("/adce.v1.Control/Retry", admin).is_ok());
        assert!(call("/adce.v1.Control/Status", admin).is_ok());
        assert_eq!(
            call("/adce.v1.AgentGateway/Connect", admin),
            Err(tonic::Code::PermissionDenied)
        );
        assert!(call("/adce.v1.AgentGateway/Upload", agent).is_ok());
        assert_eq!(
            call("/adce.v1.Control/Status", agent),
            Err(tonic::Code::PermissionDenied)
        );
        // An unknown method is treated as a change.
        assert_eq!(
            call("/adce.v1.Control/Whatever", read),
            Err(tonic::Code::PermissionDenied)
        );
    }

    #[test]
    fn health_and_reflection_are_open_by_default() {
        assert!(call("/grpc.health.v1.Health/Check", None).is_ok());
        assert!(
            call(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                None
            )
            .is_ok()
        );
        let mut auth = AuthConfig {
            tokens: vec![token(Role::Read, "read-token-0123456789")],
            ..AuthConfig::default()
        };
        auth.open_health = false;
        let closed = Policy::new(&auth, None);
        let request = http::Request::builder()
            .uri("http://x/grpc.health.v1.Health/Check")
            .body(())
            .expect("request");
        assert_eq!(
            closed.check(&request).map_err(|s| s.code()),
            Err(tonic::Code::Unauthenticated)
        );
    }

    #[test]
    fn metrics_need_a_read_token_unless_opened() {
        assert_eq!(call("/metrics", None), Err(tonic::Code::Unauthenticated));
        assert!(call("/metrics", Some("read-token-0123456789")).is_ok());
        assert_eq!(
            call("/metrics", Some("agent-token-0123456789")),
            Err(tonic::Code::PermissionDenied)
        );
        let auth = AuthConfig {
            tokens: vec![token(Role::Read, "read-token-0123456789")],
            open_metrics: true,
            ..AuthConfig::default()
        };
        let request = http::Request::builder()
            .uri("http://x/metrics")
            .body(())
            .expect("request");
        assert_eq!(
            Policy::new(&auth, None)
                .check(&request)
                .map_err(|s| s.code()),
            Ok(None)
        );
    }

    #[test]
    fn a_bound_token_acts_only_as_its_agent() {
        let bound = Caller {
            name: "host-a".into(),
            role: Role::Agent,
            agent_id: Some("a".into()),
        };
        assert!(Caller::may_act_as(Some(&bound), "a").is_ok());
        assert_eq!(
            Caller::may_act_as(Some(&bound), "b").map_err(|s| s.code()),
            Err(tonic::Code::PermissionDenied)
        );
        let shared = Caller {
            agent_id: None,
            ..bound
        };
        assert!(Caller::may_act_as(Some(&shared), "b").is_ok());
        assert!(Caller::may_act_as(None, "b").is_ok());
    }

    #[test]
    fn the_refusal_never_echoes_the_token() {
        let request = http::Request::builder()
            .uri("http://x/adce.v1.Control/Status")
            .header("authorization", "Bearer wrong-secret-value-xyz")
            .body(())
            .expect("request");
        let status = policy().check(&request).expect_err("refused");
        assert!(!status.message().contains("wrong-secret"));
    }
}
