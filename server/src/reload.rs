//! Config reload (SIGHUP and `Control.Reload`): re-reads the config file the
//! server was started with and applies what can change while running —
//! sources, scrapers, limit groups, priorities — through the scheduler, which
//! keeps every queued and running task — and the auth tokens (token files and
//! variables are read again). Changes to `server`, `lake`, `loop` and `tls`
//! need a restart and are reported, not applied. A config that does not
//! load leaves the running one untouched.

use std::path::PathBuf;
use std::sync::Arc;

use tracing::{info, warn};

use crate::auth::{AuthLayer, Policy};
use crate::catalog::Catalog;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::logs::Event;
use crate::scheduler::Handle;

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadOutcome {
    /// A line for a person.
    pub message: String,
    /// Sections that changed but need a restart.
    pub needs_restart: Vec<String>,
}

/// Reloads the config; cheap to clone, one reload at a time.
#[derive(Debug, Clone)]
pub struct Reloader {
    path: Option<PathBuf>,
    running: Arc<Config>,
    scheduler: Handle,
    auth: AuthLayer,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl Reloader {
    /// A reloader for a server started with `running` (its `source_path` is
    /// the file re-read; none for an embedded config), whose calls pass `auth`.
    pub fn new(running: &Config, scheduler: Handle, auth: AuthLayer) -> Self {
        Reloader {
            path: running.source_path.clone(),
            running: Arc::new(running.clone()),
            scheduler,
            auth,
            lock: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// Re-reads the config file and applies it.
    pub async fn reload(&self) -> Result<ReloadOutcome> {
        let _one_at_a_time = self.lock.lock().await;
        let path = self.path.clone().ok_or_else(|| {
            Error::FailedPrecondition(
                "this server runs an embedded config (dev mode without --config): nothing to reload"
                    .into(),
            )
        })?;
        let file = path.clone();
        let loaded = tokio::task::spawn_blocking(move || Config::load(&file))
            .await
            .map_err(|e| Error::Internal(format!("config loading panicked: {e}")))?;
        let mut config = match loaded {
            Ok(config) => config,
            Err(e) => {
                let message = format!("reload refused, the running config stays: {e}");
                warn!("{message}");
                self.scheduler.log(Event::error(message.clone()).row());
                return Err(Error::InvalidArgument(message));
            }
        };
        // `--listen` may have overridden the file's address at start, and
        // dev mode its state, lake and metrics.
        config.server.listen = self.running.server.listen;
        if let Some(data_dir) = &self.running.dev_data_dir {
            crate::dev::apply_overrides(&mut config, data_dir);
        }
        let mut needs_restart = Vec::new();
        if config.server != self.running.server {
            needs_restart.push("server".to_string());
        }
        if config.lake != self.running.lake {
            needs_restart.push("lake".to_string());
        }
        if config.r#loop != self.running.r#loop {
            needs_restart.push("loop".to_string());
        }
        if config.tls != self.running.tls {
            needs_restart.push("tls".to_string());
        }
        let catalog = Arc::new(Catalog::from_config(&config));
        let summary = format!(
            "{} sources, {} scrapers, {} limit groups",
            catalog.sources.len(),
            catalog.scrapers.len(),
            catalog.limits.len()
        );
        self.scheduler.reload(catalog).await?;
        // Certificates stay as started (a restart applies them); tokens apply now.
        self.auth
            .replace(Policy::new(&config.auth, self.running.tls.as_ref()));
        let mut message = format!("reloaded {}: {summary}", path.display());
        if !needs_restart.is_empty() {
            message.push_str(&format!(
                "; changes to {} take effect after a restart",
                needs_restart.join(", ")
            ));
            self.scheduler.log(Event::warn(message.clone()).row());
        }
        info!(path = %path.display(), ?needs_restart, "config reloaded");
        Ok(ReloadOutcome {
            message,
            needs_restart,
        })
    }
}
