//! Dev mode (`adce-server --dev`): the demo catalog and its scraper scripts,
//! embedded in the binary so it runs from any directory, plus the options of
//! the in-process agent. The lake and the state live under one data dir.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError, LakeConfig, LocalLake};

/// The demo catalog (`config/demo.yaml`).
pub const DEMO_CONFIG: &str = include_str!("../../config/demo.yaml");

/// The demo scrapers (`config/scrapers/`), written to `<data-dir>/scrapers/`.
pub const DEMO_SCRAPERS: [(&str, &str); 4] = [
    (
        "espn_schedule.sh",
        include_str!("../../config/scrapers/espn_schedule.sh"),
    ),
    (
        "nba_standings.sh",
        include_str!("../../config/scrapers/nba_standings.sh"),
    ),
    (
        "nba_game.sh",
        include_str!("../../config/scrapers/nba_game.sh"),
    ),
    ("bbref.sh", include_str!("../../config/scrapers/bbref.sh")),
];

fn absolute(dir: &Path) -> PathBuf {
    std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf())
}

/// The dev-mode config: `config_file`'s catalog, or the embedded demo, with
/// the state at `<data-dir>/state` and the lake at `<data-dir>/lake`.
/// Writes nothing.
pub fn config(data_dir: &Path, config_file: Option<&Path>) -> Result<Config, ConfigError> {
    let data_dir = absolute(data_dir);
    let mut config = match config_file {
        Some(path) => Config::load(path)?,
        None => Config::parse(DEMO_CONFIG, &data_dir.join("demo.yaml"))?,
    };
    if config.tls.is_some() {
        return Err(ConfigError::Invalid {
            file: config_file.map(Path::to_path_buf).unwrap_or_default(),
            position: None,
            message:
                "dev mode serves plaintext on its own listener; run without --dev to use `tls`"
                    .into(),
        });
    }
    apply_overrides(&mut config, &data_dir);
    Ok(config)
}

/// What dev mode sets whatever the config file says: the state at
/// `<data-dir>/state`, the lake at `<data-dir>/lake`, metrics on a free
/// port (the log names it, so several dev servers can run side by side).
/// A reload applies them again, so they never read as changes.
pub fn apply_overrides(config: &mut Config, data_dir: &Path) {
    config.server.state_dir = data_dir.join("state");
    config.lake = LakeConfig {
        local: Some(LocalLake {
            root: data_dir.join("lake"),
        }),
        s3: None,
    };
    config.metrics = Some(crate::config::MetricsConfig {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
    });
    config.dev_data_dir = Some(data_dir.to_path_buf());
}

/// Writes the demo scrapers to `<data-dir>/scrapers/`.
pub fn install_scrapers(data_dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = absolute(data_dir).join("scrapers");
    std::fs::create_dir_all(&dir)?;
    for (name, body) in DEMO_SCRAPERS {
        let path = dir.join(name);
        std::fs::write(&path, body)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// Options of the in-process agent talking to the server at `addr`; it
/// uses the config's first `agent` token when the config has tokens.
pub fn agent_options(
    config: &Config,
    data_dir: &Path,
    addr: SocketAddr,
    slots: u32,
) -> adce_agent::AgentOptions {
    let mut opts = adce_agent::AgentOptions::new(format!("http://{addr}"));
    opts.security.token = config
        .auth
        .tokens
        .iter()
        .find(|t| t.role == crate::config::Role::Agent)
        .map(|t| t.secret.expose().to_owned());
    opts.agent_id = Some(format!("dev-{}", adce_agent::hostname()));
    opts.slots = slots.max(1);
    opts.work_dir = absolute(data_dir).join("agent");
    opts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_config_parses_and_lives_under_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), None).unwrap();
        assert_eq!(config.server.state_dir, dir.path().join("state"));
        assert_eq!(
            config.lake.local.as_ref().map(|l| l.root.clone()),
            Some(dir.path().join("lake"))
        );
        // Nothing is written until the server starts.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        install_scrapers(dir.path()).unwrap();
        for (name, _) in DEMO_SCRAPERS {
            assert!(dir.path().join("scrapers").join(name).is_file());
        }
        assert!(
            DEMO_CONFIG.contains("{config_dir}/scrapers/"),
            "the demo's commands must find the installed scrapers"
        );
    }
}
