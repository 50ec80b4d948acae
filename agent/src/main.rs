//! `adce-agent`: the command line over [`adce_agent::run`]. Parses flags
//! (each with an environment variable), sets up logging to stderr and turns
//! SIGTERM / SIGINT into a drain (finish running tasks, then exit); a second
//! signal or SIGQUIT kills the running tasks; a third exits at once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use adce_agent::{
    AgentOptions, AllowList, BackoffPolicy, default_agent_id, default_work_dir, parse_labels,
};
use adce_proto::dial::DialArgs;
use adce_proto::runtime::logging::{self, LogFormat};
use adce_proto::runtime::notify;
use anyhow::Context as _;
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Runs adce scrapers for an adce server: connects, takes assignments,
/// uploads what the scrapers write and reports each result.
#[derive(Parser)]
#[command(name = "adce-agent", version, about, long_about = None)]
struct Cli {
    /// Address of the adce server's gRPC endpoint (`https://` for TLS).
    #[arg(long, env = "ADCE_SERVER", default_value = "http://127.0.0.1:7070")]
    server: String,
    #[command(flatten)]
    dial: DialArgs,
    /// Run only programs under this absolute path prefix (repeatable; in the
    /// environment colon-separated like PATH). The program is resolved as the
    /// spawn would (PATH lookup, symlinks and `..` resolved) and matched by
    /// whole path components; a prefix naming a file allows that file.
    /// Other assignments fail without running [default: every program].
    #[arg(
        long = "allow-command",
        env = "ADCE_ALLOW_COMMAND",
        value_name = "PREFIX",
        value_delimiter = ':'
    )]
    allow_command: Vec<PathBuf>,
    /// How many tasks run at once.
    #[arg(long, env = "ADCE_SLOTS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    slots: u32,
    /// Labels advertised to the server, e.g. `region=eu,gpu=true`.
    #[arg(long, env = "ADCE_LABELS", value_parser = labels_arg)]
    labels: Option<Labels>,
    /// Stable agent id [default: <hostname>-<pid>].
    #[arg(long, env = "ADCE_AGENT_ID")]
    id: Option<String>,
    /// Directory for per-task work directories [default: <tmp>/adce-agent-<id>].
    #[arg(long, env = "ADCE_WORK_DIR")]
    work_dir: Option<PathBuf>,
    /// Log line format on stderr; filter with RUST_LOG (default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// Every flag but the token, which shows as `<redacted>`.
impl std::fmt::Debug for Cli {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cli")
            .field("server", &self.server)
            .field("dial", &self.dial)
            .field("allow_command", &self.allow_command)
            .field("slots", &self.slots)
            .field("labels", &self.labels)
            .field("id", &self.id)
            .field("work_dir", &self.work_dir)
            .field("log_format", &self.log_format)
            .finish()
    }
}

/// Parsed `--labels`.
#[derive(Debug, Clone, Default)]
struct Labels(BTreeMap<String, String>);

fn labels_arg(value: &str) -> Result<Labels, String> {
    parse_labels(value)
        .map(Labels)
        .map_err(|error| error.to_string())
}

/// The first SIGTERM / SIGINT cancels `drain` (finish running tasks, take no
/// new ones, exit); a second one, or SIGQUIT, cancels `shutdown` (kill the
/// running tasks' process groups and exit); one more exits at once.
fn watch_signals(drain: CancellationToken, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut quit = signal(SignalKind::quit()).context("cannot watch SIGQUIT")?;
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = terminate.recv() => "SIGTERM",
                _ = interrupt.recv() => "SIGINT",
                _ = quit.recv() => "SIGQUIT",
            };
            if !drain.is_cancelled() && name != "SIGQUIT" {
                tracing::info!(
                    signal = name,
                    "stopping: finishing running tasks (send again to kill them)"
                );
                notify::stopping();
                drain.cancel();
            } else if !shutdown.is_cancelled() {
                tracing::warn!(signal = name, "stopping now: killing running tasks");
                notify::stopping();
                shutdown.cancel();
            } else {
                tracing::warn!(signal = name, "exiting at once");
                std::process::exit(1);
            }
        }
    });
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let agent_id = cli.id.unwrap_or_else(default_agent_id);
    let work_dir = cli.work_dir.unwrap_or_else(|| default_work_dir(&agent_id));
    let options = AgentOptions {
        server: cli.server,
        security: cli.dial.security()?,
        allow: AllowList::new(cli.allow_command)?,
        agent_id: Some(agent_id),
        slots: cli.slots,
        labels: cli.labels.map(|labels| labels.0).unwrap_or_default(),
        work_dir,
        reconnect: BackoffPolicy::default(),
    };
    let drain = CancellationToken::new();
    let shutdown = CancellationToken::new();
    watch_signals(drain.clone(), shutdown.clone())?;
    // Started: tell systemd (`Type=notify`) and keep its watchdog fed while
    // the runtime runs; the agent reconnects to the server by itself.
    notify::ready();
    // The watchdog task ends with the runtime.
    let _watchdog = notify::spawn_watchdog();
    adce_agent::run_draining(options, drain, shutdown).await?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "agent failed");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn labels_flag_parses_and_reports_errors_clearly() {
        let cli = Cli::try_parse_from([
            "adce-agent",
            "--labels",
            "region=eu,gpu=true",
            "--slots",
            "3",
        ])
        .expect("valid flags");
        assert_eq!(cli.slots, 3);
        let labels = cli.labels.map(|labels| labels.0).unwrap_or_default();
        assert_eq!(labels.get("region").map(String::as_str), Some("eu"));
        assert_eq!(labels.len(), 2);

        let error =
            Cli::try_parse_from(["adce-agent", "--labels", "region"]).expect_err("bad label");
        assert!(
            error
                .to_string()
                .contains("invalid label `region`: expected key=value"),
            "{error}"
        );
        let error = Cli::try_parse_from(["adce-agent", "--slots", "0"]).expect_err("zero slots");
        assert!(error.to_string().contains("--slots"), "{error}");
    }

    #[test]
    fn security_and_allow_flags_parse_and_debug_hides_the_token() {
        let cli = Cli::try_parse_from([
            "adce-agent",
            "--token",
            "s3cret-token",
            "--ca-file",
            "/etc/adce/ca.pem",
            "--cert-file",
            "/etc/adce/agent.pem",
            "--key-file",
            "/etc/adce/agent.key",
            "--tls-name",
            "adce.internal",
            "--allow-command",
            "/opt/scrapers/",
            "--allow-command",
            "/usr/local/bin:/srv/bin",
        ])
        .expect("valid flags");
        assert_eq!(cli.dial.token.as_deref(), Some("s3cret-token"));
        assert_eq!(cli.dial.tls_name.as_deref(), Some("adce.internal"));
        assert_eq!(
            cli.allow_command,
            [
                PathBuf::from("/opt/scrapers/"),
                PathBuf::from("/usr/local/bin"),
                PathBuf::from("/srv/bin"),
            ]
        );
        let shown = format!("{cli:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");

        // A client certificate needs its key and the other way round.
        let error = Cli::try_parse_from(["adce-agent", "--cert-file", "/c.pem"])
            .expect_err("certificate without key");
        assert!(error.to_string().contains("--key-file"), "{error}");
    }
}
