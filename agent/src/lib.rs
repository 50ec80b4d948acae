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
//! states; [`runner`] runs one task; [`output`] reads and parses scraper
//! output; [`collect`] lists output files; [`upload`] sends them;
//! [`backoff`] paces retries; [`labels`] parses `--labels`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

mod agent;
pub mod backoff;
pub mod collect;
mod connection;
mod error;
pub mod labels;
mod outbox;
pub mod output;
pub mod runner;
pub mod upload;

pub use backoff::BackoffPolicy;
pub use connection::{
    CONNECT_TIMEOUT, DEFAULT_HEARTBEAT_INTERVAL, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT,
    WELCOME_TIMEOUT,
};
pub use error::Error;
pub use labels::parse_labels;

/// Everything [`run`] needs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The server's gRPC address, e.g. `http://127.0.0.1:7070`.
    pub server: String,
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
    /// `<tmp>/adce-agent-<hostname>-<pid>` and the default reconnect backoff
    /// (200 ms doubling to 5 s, ±20% jitter).
    pub fn new(server: impl Into<String>) -> Self {
        Self {
            server: server.into(),
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
/// are killed first). Connection failures are retried forever; only invalid
/// options are errors.
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
    let endpoint = connection::endpoint(&opts.server)?;
    let dir_error = |source| Error::Dir {
        path: opts.work_dir.clone(),
        source,
    };
    let work_dir = std::path::absolute(&opts.work_dir).map_err(dir_error)?;
    tokio::fs::create_dir_all(&work_dir)
        .await
        .map_err(dir_error)?;
    tracing::info!(
        agent = %agent_id,
        server = %opts.server,
        work_dir = %work_dir.display(),
        "agent configured"
    );
    let uploader = upload::GrpcUploader::new(endpoint.connect_lazy(), agent_id.clone());
    let ctx = runner::RunnerContext {
        work_dir,
        base_env: runner::RunnerContext::inherited_env(),
        upload_retry: upload::UploadRetry::default(),
    };
    let identity = agent::Identity {
        agent_id,
        hostname: hostname(),
        labels: opts.labels,
        slots: opts.slots,
    };
    agent::Agent::new(identity, endpoint, opts.reconnect, ctx, uploader)
        .run(drain, shutdown)
        .await
}
