//! adcectl: the command line for watching and steering an adce server. This
//! file owns the command-line interface (clap) and dispatch to the command
//! modules, and maps their outcome to exit codes: 0 ok, 1 the server answered
//! with an error or could not be reached (or `health` found something not
//! serving), 2 usage errors.

mod agents;
mod client;
mod coverage;
mod health;
mod logs;
mod output;
mod reconcile;
mod status;
mod tasks;

use std::io;
use std::process::ExitCode;
use std::time::Duration;

use adce_proto::v1 as pb;
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Parser, Subcommand, ValueEnum};

use adce_proto::dial::DialArgs;

use crate::client::Target;

/// Watch and steer an adce server: its reconcile loop, task queue, agents,
/// coverage and logs.
///
/// Data goes to stdout, diagnostics to stderr. Exit codes: 0 ok; 1 the server
/// answered with an error, could not be reached, or (for `health`) something
/// checked is not serving; 2 usage errors.
#[derive(Debug, Parser)]
#[command(name = "adcectl", version, propagate_version = true)]
struct Cli {
    /// The server's address: `http://host:port`, or `host:port`.
    #[arg(
        long,
        global = true,
        env = "ADCE_SERVER",
        default_value = client::DEFAULT_SERVER,
        value_parser = client::parse_server,
        value_name = "URL"
    )]
    server: String,

    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,

    /// How long each call may take, e.g. `500ms`, `10s`, `1m`; for streams,
    /// how long to wait for the next message.
    #[arg(
        long,
        global = true,
        default_value = "10s",
        value_parser = client::parse_timeout,
        value_name = "DURATION"
    )]
    timeout: Duration,

    /// The token (a `read` token for the read commands, `admin` for
    /// changes) and the TLS files.
    #[command(flatten)]
    dial: DialArgs,

    #[command(subcommand)]
    command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Show the loop state, lake, coverage, task counts and connected agents.
    Status,

    /// List tasks, newest first, with optional filters.
    Tasks {
        /// Only tasks in this state.
        #[arg(long, value_parser = state_arg())]
        state: Option<pb::TaskState>,
        /// Only tasks of this priority.
        #[arg(long, value_enum)]
        priority: Option<PriorityArg>,
        /// Only tasks of this source.
        #[arg(long, value_name = "NAME")]
        source: Option<String>,
        /// At most this many tasks (per page with --all).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
        /// Fetch every page instead of only the first.
        #[arg(long)]
        all: bool,
    },

    /// Show one task with its attempts and expected object keys.
    Task {
        /// The task's id.
        id: i64,
    },

    /// List connected agents and the ones seen recently.
    Agents,

    /// Show expected, present and missing objects per source, from the last reconcile.
    Coverage {
        /// Only this source.
        #[arg(long, value_name = "NAME")]
        source: Option<String>,
        /// Also list the missing keys (as of the last reconcile), in
        /// expansion order.
        #[arg(long)]
        missing: bool,
        /// With --missing: at most this many keys per source (the server
        /// keeps the first 1000 of each reconcile).
        #[arg(long, value_name = "N", default_value_t = 100, requires = "missing")]
        limit: u32,
    },

    /// Check the server's health (the standard gRPC health service).
    ///
    /// Without names, checks the whole server (""), both gRPC services and the
    /// components adce.store, adce.lake, adce.reconciler and adce.dispatcher.
    /// Exits 1 when any checked name that exists is not SERVING; names the
    /// server does not know show as `unknown`.
    Health {
        /// Service or component names to check instead of the defaults.
        #[arg(value_name = "SERVICE")]
        services: Vec<String>,
    },

    /// Print server events and scraper output, optionally following new entries.
    ///
    /// With --follow, a dropped connection or a server restart is survived:
    /// adcectl reconnects with backoff and resumes after the last entry it
    /// printed, so no line is lost or printed twice. Ctrl-C stops it.
    Logs {
        /// Print the last N matching entries first.
        #[arg(long, default_value_t = 100, value_name = "N")]
        tail: u32,
        /// Keep streaming new entries until interrupted.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Only entries after this sequence number (instead of --tail).
        #[arg(long, value_name = "SEQ")]
        since: Option<u64>,
        /// Only entries about this task.
        #[arg(long, value_name = "ID")]
        task: Option<i64>,
        /// Only entries about this agent.
        #[arg(long, value_name = "AGENT")]
        agent: Option<String>,
        /// Only entries about this source.
        #[arg(long, value_name = "NAME")]
        source: Option<String>,
        /// Only entries at this level or above.
        #[arg(long, value_enum)]
        level: Option<LevelArg>,
    },

    /// Run a reconcile now: phases to stderr as they happen, the summary to stdout.
    Reconcile,

    /// Stop handing out new work; running tasks finish (the same as `stop`).
    /// Prints the loop state.
    Pause,

    /// Resume handing out work (the same as `start`). Prints the loop state.
    Resume,

    /// Start (resume) the autonomous loop. Prints the loop state.
    Start,

    /// Stop the autonomous loop: no new work is handed out; running tasks
    /// finish, or with --now are cancelled and queued again.
    Stop {
        /// Also cancel running tasks (they go back to the queue).
        #[arg(long)]
        now: bool,
    },

    /// Restart the autonomous loop: stop handing out work, reconcile, start.
    Restart,

    /// Put dead, cancelled or unavailable tasks back in the queue, ready now,
    /// with their attempts reset.
    ///
    /// Name task ids, or select by state (and source), e.g.
    /// `adcectl retry --source bbref --state dead`. Exits 1 when a named task
    /// could not be retried (each is listed on stderr with why).
    Retry {
        /// Ids of the tasks to retry.
        #[arg(
            value_name = "ID",
            required_unless_present = "state",
            conflicts_with = "state"
        )]
        ids: Vec<i64>,
        /// Retry every task in this state (dead, cancelled or unavailable).
        #[arg(long, value_parser = state_arg())]
        state: Option<pb::TaskState>,
        /// With --state: only tasks of this source.
        #[arg(long, value_name = "NAME", requires = "state")]
        source: Option<String>,
    },

    /// Re-read the server's config file and apply sources, scrapers, limit
    /// groups and priorities without a restart (same as SIGHUP to the server).
    /// Queued and running tasks stay; a config with errors is refused and the
    /// running one stays.
    Reload,

    /// Tell an agent to drain: it finishes its running tasks, takes no new
    /// ones, and exits.
    Drain {
        /// The agent's id.
        #[arg(value_name = "AGENT")]
        agent: String,
    },

    /// Cancel a pending or running task; a running one is killed on its agent.
    /// A cancelled task waits until it is retried.
    Cancel {
        /// The task's id.
        #[arg(value_name = "ID")]
        id: i64,
        /// Why, recorded as the task's last error.
        #[arg(long, default_value = "", value_name = "TEXT")]
        reason: String,
    },
}

/// A task state on the command line: one of the server's state names
/// (`pb::TaskState::name`), each shown in `--help` with what it means.
fn state_arg() -> impl TypedValueParser<Value = pb::TaskState> {
    let names =
        pb::TaskState::ALL.map(|state| PossibleValue::new(state.name()).help(state_help(state)));
    // The parser accepts only the names above, so the lookup cannot miss.
    PossibleValuesParser::new(names).map(|name| pb::TaskState::from_name(&name).unwrap_or_default())
}

/// What a task state means, for `--help`.
fn state_help(state: pb::TaskState) -> &'static str {
    match state {
        pb::TaskState::Unspecified => "",
        pb::TaskState::Pending => "Waiting for its ready time and an agent",
        pb::TaskState::Leased => "Held by an agent under a lease",
        pb::TaskState::Done => "Every expected object is present",
        pb::TaskState::Dead => "Failed too many times",
        pb::TaskState::Unavailable => "The data does not exist yet",
        pb::TaskState::Cancelled => "Cancelled by an operator",
    }
}

/// A priority on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PriorityArg {
    /// Data that must land now.
    Critical,
    /// Recent data people wait for.
    High,
    /// The default.
    Medium,
    /// Backfill that can wait.
    Low,
}

impl From<PriorityArg> for pb::Priority {
    fn from(p: PriorityArg) -> Self {
        match p {
            PriorityArg::Critical => pb::Priority::Critical,
            PriorityArg::High => pb::Priority::High,
            PriorityArg::Medium => pb::Priority::Medium,
            PriorityArg::Low => pb::Priority::Low,
        }
    }
}

/// A log level on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LevelArg {
    /// Everything.
    Debug,
    /// Normal operation and scraper stdout.
    Info,
    /// Recoverable trouble and scraper stderr.
    Warn,
    /// Failures that need attention.
    Error,
}

impl From<LevelArg> for pb::LogLevel {
    fn from(l: LevelArg) -> Self {
        match l {
            LevelArg::Debug => pb::LogLevel::Debug,
            LevelArg::Info => pb::LogLevel::Info,
            LevelArg::Warn => pb::LogLevel::Warn,
            LevelArg::Error => pb::LogLevel::Error,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("adcectl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("adcectl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether the error is stdout closing under us (`adcectl logs -f | head`),
/// which is a normal way for a reader to stop.
fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// Runs the chosen command.
async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let security = cli.dial.security()?;
    let target = Target {
        url: cli.server,
        timeout: cli.timeout,
        security,
    };
    let json = cli.json;
    match cli.command {
        Command::Status => status::status(&target, json).await,
        Command::Tasks {
            state,
            priority,
            source,
            limit,
            all,
        } => {
            let query = tasks::Query {
                state: state.unwrap_or_default(),
                priority: priority.map(Into::into).unwrap_or_default(),
                source: source.unwrap_or_default(),
                limit,
                all,
            };
            tasks::list(&target, &query, json).await
        }
        Command::Task { id } => tasks::show(&target, id, json).await,
        Command::Agents => agents::list(&target, json).await,
        Command::Coverage {
            source,
            missing,
            limit,
        } => {
            let missing = missing.then_some(limit);
            coverage::show(
                &target,
                source.as_deref().unwrap_or_default(),
                missing,
                json,
            )
            .await
        }
        Command::Health { services } => health::check(&target, &services, json).await,
        Command::Logs {
            tail,
            follow,
            since,
            task,
            agent,
            source,
            level,
        } => {
            let filter = logs::Filter {
                tail,
                follow,
                since,
                task_id: task.unwrap_or_default(),
                agent_id: agent.unwrap_or_default(),
                source: source.unwrap_or_default(),
                min_level: level.map(Into::into).unwrap_or_default(),
            };
            logs::run(&target, &filter, json).await
        }
        Command::Reconcile => reconcile::run(&target, json).await,
        Command::Pause => status::set_paused(&target, true, json).await,
        Command::Resume => status::set_paused(&target, false, json).await,
        Command::Start => status::control_loop(&target, status::LoopAction::Start, json).await,
        Command::Stop { now } => {
            status::control_loop(&target, status::LoopAction::Stop { now }, json).await
        }
        Command::Restart => status::control_loop(&target, status::LoopAction::Restart, json).await,
        Command::Retry { ids, state, source } => {
            let request = pb::RetryRequest {
                task_ids: ids,
                source: source.unwrap_or_default(),
                state: state.unwrap_or_default() as i32,
            };
            tasks::retry(&target, request, json).await
        }
        Command::Cancel { id, reason } => tasks::cancel(&target, id, reason, json).await,
        Command::Reload => status::reload(&target, json).await,
        Command::Drain { agent } => agents::drain(&target, agent, json).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_work_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "adcectl",
            "tasks",
            "--state",
            "dead",
            "--json",
            "--server",
            "localhost:9",
            "--timeout",
            "500ms",
        ]);
        let cli = match cli {
            Ok(cli) => cli,
            Err(e) => panic!("{e}"),
        };
        assert!(cli.json);
        assert_eq!(cli.server, "http://localhost:9");
        assert_eq!(cli.timeout, Duration::from_millis(500));
        match cli.command {
            Command::Tasks { state, limit, .. } => {
                assert_eq!(state, Some(pb::TaskState::Dead));
                assert_eq!(limit, 50);
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for argv in [
            vec!["adcectl", "tasks", "--state", "sleeping"],
            vec!["adcectl", "tasks", "--priority", "urgent"],
            vec!["adcectl", "tasks", "--limit", "0"],
            vec!["adcectl", "logs", "--level", "trace"],
            vec!["adcectl", "--timeout", "soon", "status"],
            vec!["adcectl", "task", "twelve"],
        ] {
            let result = Cli::try_parse_from(&argv);
            assert!(result.is_err(), "{argv:?} parsed");
        }
    }

    #[test]
    fn state_flags_take_the_server_state_names() {
        for state in pb::TaskState::ALL {
            let cli = Cli::try_parse_from(["adcectl", "tasks", "--state", state.name()]);
            match cli.map(|cli| cli.command) {
                Ok(Command::Tasks { state: parsed, .. }) => assert_eq!(parsed, Some(state)),
                other => panic!("--state {} parsed as {other:?}", state.name()),
            }
        }
    }

    #[test]
    fn cli_values_map_to_wire_enums() {
        assert_eq!(pb::Priority::from(PriorityArg::Low), pb::Priority::Low);
        assert_eq!(pb::LogLevel::from(LevelArg::Warn), pb::LogLevel::Warn);
    }
}
