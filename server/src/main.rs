//! The `adce-server` binary: parses flags, loads and validates the config,
//! sets up logging and signals, then runs the server (and, in dev mode, an
//! in-process agent).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use adce_proto::runtime::logging::{self, LogFormat};
use adce_proto::runtime::notify;
use adce_server::config::Config;
use adce_server::dev;
use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// adce-server: keeps a data lake complete by itself.
///
/// Reconciles the catalog (what SHOULD exist) against the lake (what IS
/// there), queues a prioritized task for every gap and hands tasks to agents
/// over gRPC. `--dev` runs everything in one process on a local demo lake.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// The config file (YAML). Required unless --dev is given.
    #[arg(long, env = "ADCE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    /// Validate the config, print a summary and exit (non-zero on error).
    #[arg(long)]
    check_config: bool,

    /// Print the effective config (defaults filled in) as YAML and exit.
    #[arg(long)]
    dump_config: bool,

    /// Dev mode: server plus an in-process agent, a local lake and state under
    /// --data-dir, and the embedded demo catalog (or --config's catalog).
    #[arg(long)]
    dev: bool,

    /// Dev mode's data directory: the lake is DIR/lake, the state DIR/state.
    #[arg(
        long,
        env = "ADCE_DATA_DIR",
        value_name = "DIR",
        default_value = "adce-dev"
    )]
    data_dir: PathBuf,

    /// Address to listen on, overriding `server.listen`.
    #[arg(long, env = "ADCE_LISTEN", value_name = "ADDR")]
    listen: Option<SocketAddr>,

    /// Slots of dev mode's in-process agent.
    #[arg(long, value_name = "N", default_value_t = 4)]
    dev_slots: u32,

    /// Log output format (filter with RUST_LOG, e.g. `info,adce_server=debug`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// Loads the config the flags name; config errors are printed as-is
/// (`file:line:column: message`).
fn load_config(cli: &Cli) -> Result<Config, String> {
    let mut config = if cli.dev {
        dev::config(&cli.data_dir, cli.config.as_deref()).map_err(|e| e.to_string())?
    } else {
        let path = cli.config.as_ref().ok_or_else(|| {
            "no config: pass --config FILE (or set ADCE_CONFIG), or --dev for the embedded demo"
                .to_string()
        })?;
        Config::load(path).map_err(|e| e.to_string())?
    };
    if let Some(listen) = cli.listen {
        config.server.listen = listen;
    }
    Ok(config)
}

/// Resolves on the first SIGTERM or SIGINT; a second one exits at once.
async fn shutdown_signal() {
    wait_signal().await;
    info!("signal received: shutting down (send again to exit at once)");
    tokio::spawn(async {
        wait_signal().await;
        warn!("second signal: exiting now");
        std::process::exit(130);
    });
}

async fn wait_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot listen for SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

async fn serve(cli: Cli, config: Config) -> anyhow::Result<()> {
    // Before binding: an exposed listener without auth is never opened.
    adce_server::server::check_exposure(&config, config.server.listen)?;
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.server.listen))?;
    let addr = listener.local_addr()?;
    let agent_stop = CancellationToken::new();
    let agent = if cli.dev {
        dev::install_scrapers(&cli.data_dir).with_context(|| {
            format!(
                "cannot write the demo scrapers under {}",
                cli.data_dir.display()
            )
        })?;
        let opts = dev::agent_options(&config, &cli.data_dir, addr, cli.dev_slots);
        let stop = agent_stop.clone();
        eprintln!(
            "adce dev mode: server on {addr}, lake {}, state {}\n  try: adcectl --server http://{addr} status",
            config_lake_root(&config),
            config.server.state_dir.display()
        );
        if !config.auth.enabled() {
            eprintln!("  no auth (dev mode): anyone who can reach {addr} can control this server");
        }
        Some(tokio::spawn(async move {
            if let Err(e) = adce_agent::run(opts, stop).await {
                error!(error = %e, "in-process agent failed");
            }
        }))
    } else {
        None
    };
    // The listener is bound: tell systemd (`Type=notify`) the server is up,
    // keep its watchdog fed while the runtime runs, and say when it stops.
    notify::ready();
    // The watchdog task ends with the runtime.
    let _watchdog = notify::spawn_watchdog();
    let shutdown = async {
        shutdown_signal().await;
        notify::stopping();
    };
    let result = adce_server::run(config, listener, shutdown).await;
    agent_stop.cancel();
    if let Some(agent) = agent {
        let _ = agent.await;
    }
    result.map_err(anyhow::Error::from)
}

fn config_lake_root(config: &Config) -> String {
    config
        .lake
        .local
        .as_ref()
        .map(|l| l.root.display().to_string())
        .unwrap_or_default()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match load_config(&cli) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("adce-server: {message}");
            return ExitCode::from(2);
        }
    };
    if cli.dump_config {
        print!("{}", config.dump());
        return ExitCode::SUCCESS;
    }
    if cli.check_config {
        let catalog = adce_server::catalog::Catalog::from_config(&config);
        let today = chrono::Utc::now().date_naive();
        print!("{}", check_report(&catalog, today));
        return ExitCode::SUCCESS;
    }
    logging::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("adce-server: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(cli, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("adce-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Keys shown at each end of a source's expansion by `--check-config`.
const PREVIEW_KEYS: usize = 3;

/// What `--check-config` prints: the totals, then per source its partitions,
/// expected objects, and the first and last few keys.
fn check_report(catalog: &adce_server::catalog::Catalog, today: chrono::NaiveDate) -> String {
    use std::fmt::Write as _;
    let preview = catalog.preview(today, PREVIEW_KEYS);
    let partitions: u64 = preview.iter().map(|p| p.partitions).sum();
    let objects: u64 = preview.iter().map(|p| p.objects).sum();
    let mut out = format!(
        "config ok: {} sources, {} scrapers, {partitions} partitions, {objects} expected objects today\n",
        catalog.sources.len(),
        catalog.scrapers.len(),
    );
    for p in &preview {
        if let Some(parents) = &p.parents {
            let _ = writeln!(
                out,
                "source {}: partitions from the values in parent objects {parents} (known at reconcile)",
                p.name
            );
            continue;
        }
        let _ = writeln!(
            out,
            "source {}: {} partitions, {} expected objects",
            p.name, p.partitions, p.objects
        );
        if !p.first.is_empty() {
            let _ = writeln!(out, "  first: {}", p.first.join(", "));
        }
        if !p.last.is_empty() {
            let gap = if p.objects > (p.first.len() + p.last.len()) as u64 {
                "…, "
            } else {
                ""
            };
            let _ = writeln!(out, "  last:  {gap}{}", p.last.join(", "));
        }
    }
    out
}
