//! Logging for the adce binaries: one `tracing` subscriber writing to stderr,
//! filtered by `RUST_LOG` (default `info`), as text or as JSON lines.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines are written (the binaries' `--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber: lines in `format` on stderr, ANSI colours
/// only when stderr is a terminal, the level filter from `RUST_LOG` or
/// `info` when it is unset or invalid. Panics if a global subscriber is
/// already installed, so a binary calls it once, first thing.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
