//! adce agent: connects to an adce server, runs the scrapers it is assigned
//! (each in its own process group, without a shell, with a clean
//! environment), forwards their output and progress, uploads what they wrote
//! through the server and reports each result.
//!
//! The binary `adce-agent` is a thin CLI over [`run`]; the server's dev mode
//! runs an agent in-process through the same function.
//!
//! Code map: `agent` is the core task (connection state
//! machine, running tasks, outbox); `connection` owns the transport and its
//! states ([`Dialer`]: TLS and the bearer token on every call); [`allow`] is
//! the host's `--allow-command` list; [`runner`] runs one task; [`output`] reads and parses scraper
//! output; [`collect`] lists output files; [`upload`] sends them;
//! [`backoff`] paces retries; [`labels`] parses `--labels`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

mod agent;
pub mod allow;
pub mod backoff;
pub mod collect;
mod connection;
mod error;
pub mod labels;
pub mod leftovers;
mod outbox;
pub mod output;
pub mod runner;
pub mod upload;

pub use adce_proto::dial::ClientSecurity;
pub use allow::AllowList;
pub use backoff::BackoffPolicy;
pub use connection::{
    CONNECT_TIMEOUT, DEFAULT_HEARTBEAT_INTERVAL, Dialer, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT,
    WELCOME_TIMEOUT,
};
pub use error::Error;
pub use labels::parse_labels;

/// Everything [`run`] needs. Its Debug output never shows the token.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The server's gRPC address, e.g. `http://127.0.0.1:7070`.
    pub server: String,
    /// The bearer token and TLS files every call to the server uses.
    pub security: ClientSecurity,
    /// The programs this host allows; empty allows every program.
    pub allow: AllowList,
    /// Stable identity; `None` means `<hostname>-<pid>`.
    pub agent_id: Option<String>,
    /// How many tasks run at once; at least 1.
    pub slots: u32,
    /// Labels advertised to the server.
    pub labels: BTreeMap<String, String>,
    /// Per-task directories (`<lease_id>/out`) are created below it.
    pub work_dir: PathBuf,
    /// Pacing of reconnect attempts.
    pub reconnect: BackoffPolicy,
}

impl AgentOptions {
    /// One slot, no labels, the default identity, a work directory
    /// `<tmp>/adce-agent-<hostname>-<pid>`, the default reconnect backoff
    /// (200 ms doubling to 5 s, ±20% jitter), no token, no TLS files and
    /// every command allowed.
    pub fn new(server: impl Into<String>) -> Self {
        Self {
            server: server.into(),
            security: ClientSecurity::default(),
            allow: AllowList::everything(),
            agent_id: None,
            slots: 1,
            labels: BTreeMap::new(),
            work_dir: default_work_dir(&default_agent_id()),
            reconnect: BackoffPolicy::default(),
        }
    }
}

/// This host's name, or `localhost` when it cannot be read.
pub fn hostname() -> String {
    hostname::get()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "localhost".to_owned())
}

/// `<hostname>-<pid>`.
pub fn default_agent_id() -> String {
    format!("{}-{}", hostname(), std::process::id())
}

/// `<tmp>/adce-agent-<agent_id>`.
pub fn default_work_dir(agent_id: &str) -> PathBuf {
    std::env::temp_dir().join(format!("adce-agent-{agent_id}"))
}

/// Runs the agent until the server drains it (every running task finished
/// and reported) or `shutdown` is cancelled (running tasks' process groups
/// are killed first). Connection failures are retried forever; invalid
/// options and a server that refuses the agent's token
/// ([`Error::TokenRefused`]) are errors.
pub async fn run(opts: AgentOptions, shutdown: CancellationToken) -> Result<(), Error> {
    run_draining(opts, CancellationToken::new(), shutdown).await
}

/// Like [`run`], and cancelling `drain` starts a drain: running tasks finish
/// and report (heartbeats continue), no new ones are taken, the server is told,
/// and `run_draining` returns once nothing is left. `shutdown` still kills
/// running tasks at once.
pub async fn run_draining(
    opts: AgentOptions,
    drain: CancellationToken,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    if opts.slots == 0 {
        return Err(Error::InvalidOptions("slots must be at least 1".into()));
    }
    let agent_id = opts.agent_id.clone().unwrap_or_else(default_agent_id);
    if agent_id.trim().is_empty() {
        return Err(Error::InvalidOptions("the agent id is empty".into()));
    }
    let dialer = Dialer::new(&opts.server, &opts.security)?;
    let dir_error = |source| Error::Dir {
        path: opts.work_dir.clone(),
        source,
    };
    let work_dir = std::path::absolute(&opts.work_dir).map_err(dir_error)?;
    tokio::fs::create_dir_all(&work_dir)
        .await
        .map_err(dir_error)?;
    // Held until the agent returns: one agent per work directory.
    let _lock = leftovers::lock(&work_dir)?;
    for leftover in leftovers::reap(&work_dir) {
        match leftover.killed {
            Some(pgid) => tracing::warn!(
                dir = %leftover.dir.display(),
                pgid,
                "killed a scraper a previous agent left running"
            ),
            None => {
                tracing::info!(dir = %leftover.dir.display(), "removed a leftover task directory")
            }
        }
    }
    tracing::info!(
        agent = %agent_id,
        server = %opts.server,
        tls = dialer.uses_tls(),
        token = opts.security.token.is_some(),
        work_dir = %work_dir.display(),
        "agent configured"
    );
    if opts.security.token.is_some() && !dialer.uses_tls() && !is_loopback(&opts.server) {
        tracing::warn!(
            server = %opts.server,
            "the token is sent without TLS: anyone on the path can read it (use https:// or --ca-file)"
        );
    }
    if opts.allow.is_restricted() {
        tracing::info!(
            allowed = %opts.allow.describe(),
            "only commands under --allow-command run on this host"
        );
    } else {
        tracing::info!("every command the server sends may run on this host (no --allow-command)");
    }
    let uploader = upload::GrpcUploader::new(dialer.connect_lazy(), agent_id.clone());
    let ctx = runner::RunnerContext {
        work_dir,
        base_env: runner::RunnerContext::inherited_env(),
        upload_retry: upload::UploadRetry::default(),
        allow: opts.allow,
    };
    let identity = agent::Identity {
        agent_id,
        hostname: hostname(),
        labels: opts.labels,
        slots: opts.slots,
    };
    agent::Agent::new(identity, dialer, opts.reconnect, ctx, uploader)
        .run(drain, shutdown)
        .await
}

/// Whether `server` names this host (a token sent there in clear text does
/// not cross a network).
fn is_loopback(server: &str) -> bool {
    let rest = server.split_once("://").map_or(server, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => authority,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_token() {
        let mut options = AgentOptions::new("http://127.0.0.1:7070");
        options.security.token = Some("s3cret-token".into());
        let shown = format!("{options:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn loopback_servers_are_recognised() {
        for server in [
            "http://127.0.0.1:7070",
            "http://localhost:7070",
            "http://[::1]:7070/",
            "127.0.0.2",
        ] {
            assert!(is_loopback(server), "{server}");
        }
        for server in [
            "http://10.0.0.1:7070",
            "http://adce.example.com",
            "http://[fe80::1]:1",
        ] {
            assert!(!is_loopback(server), "{server}");
        }
    }
}
