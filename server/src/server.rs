//! Assembles and runs the server: store, scheduler, loop, gRPC services
//! (gateway, control, health, reflection) on a listener the caller binds, until
//! the caller's shutdown future completes. Shutdown order: health goes
//! NOT_SERVING, the loop stops, the scheduler commits and stops (ending
//! agents' streams: agents keep their running tasks and reconnect), then the
//! transport closes.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::auth::{AuthLayer, Policy};
use crate::autoloop::{self, LoopOptions};
use crate::catalog::Catalog;
use crate::config::{Config, LakeConfig, MAX_DURATION};
use crate::control::ControlService;
use crate::error::{Error, Result};
use crate::gateway::{Gateway, GatewayLimits};
use crate::health::{Alerts, COMPONENTS};
use crate::lake::{LocalLake, S3Lake, SharedLake};
use crate::logs::{Event, LogBus};
use crate::metrics::Metrics;
use crate::reconcile::{InventorySource, Reconciler};
use crate::reload::Reloader;
use crate::scheduler::{self, SchedulerOptions};
use crate::store::{self, Readers};
use crate::transport::{self, Services};

/// How long the transport may take to close once everything else stopped.
const TRANSPORT_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Opens the lake the config names, and the place its S3 Inventory reports
/// are delivered when the config names one. A local lake removes the temp
/// files of writes a crash interrupted once they are older than
/// `server.max_upload_time` allows; an S3 lake aborts incomplete multipart
/// uploads after `lake.s3.abort_incomplete_after`.
pub async fn open_lake(config: &Config) -> Result<(SharedLake, Option<InventorySource>)> {
    match &config.lake {
        LakeConfig {
            local: Some(local), ..
        } => {
            let lake =
                LocalLake::open(&local.root)?.with_max_upload_time(config.server.max_upload_time);
            Ok((Arc::new(lake), None))
        }
        LakeConfig { s3: Some(s3), .. } => {
            let lake = S3Lake::connect(s3).await?;
            let inventory = s3.inventory.as_ref().map(|inv| InventorySource {
                store: Arc::new(lake.bucket(&inv.bucket)),
                config: inv.clone(),
                source_bucket: lake.bucket_name().to_string(),
                lake_prefix: lake.prefix().to_string(),
            });
            Ok((Arc::new(lake), inventory))
        }
        _ => Err(Error::InvalidArgument(
            "the config names no usable lake backend".into(),
        )),
    }
}

/// Refuses to serve an exposed (non-loopback) address without tokens, unless
/// the config says so explicitly: anyone who reaches the listener could make
/// the agents run programs.
pub fn check_exposure(config: &Config, addr: std::net::SocketAddr) -> Result<()> {
    if config.auth.enabled() || addr.ip().is_loopback() || config.auth.allow_unauthenticated {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "refusing to serve on {addr} without auth: anyone who reaches it could run programs on \
         the agents; add `auth.tokens`, listen on 127.0.0.1, or set `auth.allow_unauthenticated: true`"
    )))
}

/// Says at start how the listener is protected.
fn log_protection(config: &Config) {
    let transport = if config.tls.is_some() {
        "tls"
    } else {
        "plaintext"
    };
    if config.auth.enabled() {
        info!(
            tokens = config.auth.tokens.len(),
            transport, "calls need a bearer token"
        );
    } else {
        warn!(
            transport,
            "no auth: every client that reaches the listener may control this server"
        );
    }
}

/// How often shutdown looks whether running tasks have finished.
const SHUTDOWN_POLL: Duration = Duration::from_millis(200);

/// Waits until no task is leased, or `grace` has passed.
async fn wait_for_leases(sched: &crate::scheduler::Handle, grace: Duration) {
    let now = tokio::time::Instant::now();
    let deadline = now.checked_add(grace).unwrap_or(now + MAX_DURATION);
    let mut told = false;
    loop {
        let leased = match sched.stats().await {
            Ok(stats) => stats.leased,
            Err(_) => return,
        };
        if leased == 0 {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(
                leased,
                "shutdown grace over with tasks still running; their leases are recovered at the next start"
            );
            return;
        }
        if !told {
            info!(
                leased,
                ?grace,
                "waiting for running tasks to finish before stopping"
            );
            told = true;
        }
        tokio::time::sleep(SHUTDOWN_POLL).await;
    }
}

/// Reloads the config on every SIGHUP until `stop` is cancelled; a reload
/// that fails is logged and changes nothing.
async fn reload_on_sighup(reloader: Reloader, stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGHUP; reload with adcectl reload");
            return;
        }
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            received = hangups.recv() => {
                if received.is_none() {
                    return;
                }
                info!("SIGHUP: reloading the config");
                adce_proto::runtime::notify::reloading();
                if let Err(e) = reloader.reload().await {
                    warn!(error = %e, "reload failed");
                }
                adce_proto::runtime::notify::ready();
            }
        }
    }
}

/// Runs the server on `listener` until `shutdown` completes or a component
/// fails. Everything is stopped and durable when it returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    if let Ok(addr) = listener.local_addr() {
        check_exposure(&config, addr)?;
    }
    log_protection(&config);
    let catalog = Arc::new(Catalog::from_config(&config));
    let (lake, inventory) = open_lake(&config).await?;
    let lake_name = lake.describe();
    let state_dir = config.server.state_dir.clone();
    let readers = Arc::new(Readers::new(&state_dir));
    let logs = LogBus::default();
    let metrics = Metrics::new();
    // Bound before anything runs, so a taken port fails the start.
    let metrics_listener = match &config.metrics {
        Some(m) => Some(TcpListener::bind(m.listen).await.map_err(|e| {
            Error::Internal(format!("cannot listen for metrics on {}: {e}", m.listen))
        })?),
        None => None,
    };
    let (sched, sched_thread) = scheduler::spawn(
        &state_dir,
        catalog.clone(),
        SchedulerOptions {
            heartbeat_interval: config.server.heartbeat_interval,
            lease_ttl: config.server.lease_ttl,
            config_dir: config.config_dir.clone(),
            no_agent_after: config.r#loop.no_agent_after,
            aging: config.r#loop.aging,
            metrics: metrics.clone(),
        },
        logs,
    )?;

    let limits = GatewayLimits::from_config(&config.server);
    let _ = sched.set_log_retention(config.server.log_retention);

    let token = CancellationToken::new();
    // A failed scheduler (store failure) stops the whole server.
    let sched_failed = {
        let token = token.clone();
        tokio::task::spawn_blocking(move || {
            let result = sched_thread
                .join()
                .unwrap_or_else(|_| Err(Error::Internal("scheduler panicked".into())));
            if let Err(e) = &result {
                error!(error = %e, "scheduler stopped; shutting down");
            }
            token.cancel();
            result
        })
    };

    let health = tonic_health::server::HealthReporter::new();
    for name in ["", "adce.v1.Control", "adce.v1.AgentGateway"]
        .into_iter()
        .chain(COMPONENTS)
    {
        health
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    if let Err(e) = lake.probe().await {
        // The health checker reports it (adce.lake) from its first round on.
        warn!(error = %e, "lake is not reachable");
    }

    let loop_token = token.child_token();
    let reconciler = Reconciler::new(
        catalog.clone(),
        lake.clone(),
        sched.clone(),
        readers.clone(),
        inventory,
        metrics.clone(),
    );
    let (loop_handle, loop_join) = autoloop::spawn(
        LoopOptions {
            enabled: config.r#loop.enabled,
            reconcile_interval: config.r#loop.reconcile_interval,
            queue_check_interval: config.r#loop.queue_check_interval,
            dispatch_threshold: config.r#loop.dispatch_threshold,
            max_cycle_runtime: config.r#loop.max_cycle_runtime,
        },
        reconciler,
        sched.clone(),
        loop_token.clone(),
    );

    let auth = AuthLayer::new(Policy::new(&config.auth, config.tls.as_ref()));
    let reloader = Reloader::new(&config, sched.clone(), auth.clone());
    tokio::spawn(reload_on_sighup(reloader.clone(), token.clone()));
    let gateway = Gateway::new(
        sched.clone(),
        lake.clone(),
        config.server.max_upload_bytes,
        metrics.clone(),
    )
    .with_live_coverage(loop_handle.live_coverage());
    if let Some(listener) = metrics_listener {
        info!(addr = ?listener.local_addr().ok(), "metrics served at /metrics");
        let refresh = {
            let (metrics, sched, readers, loop_handle) = (
                metrics.clone(),
                sched.clone(),
                readers.clone(),
                loop_handle.clone(),
            );
            move || {
                let (metrics, sched, readers, loop_handle) = (
                    metrics.clone(),
                    sched.clone(),
                    readers.clone(),
                    loop_handle.clone(),
                );
                async move {
                    if let Ok(counts) = readers.with(store::task_counts_by_source).await {
                        metrics.set_tasks(&counts);
                    }
                    let coverage: Vec<_> = loop_handle
                        .coverage()
                        .sources
                        .iter()
                        .map(|(name, _, c)| (name.clone(), *c))
                        .collect();
                    metrics.set_coverage(&coverage);
                    if let Ok(agents) = sched.agents().await {
                        metrics.set_agents(agents.len() as u64);
                    }
                    if let Ok(groups) = sched.limits().await {
                        metrics.set_limit_groups(&groups);
                    }
                }
            }
        };
        tokio::spawn(transport::metrics::serve(
            listener,
            metrics.clone(),
            refresh,
            auth.clone(),
            token.child_token(),
        ));
    }
    let alerts = Alerts::default();
    tokio::spawn(crate::health::run(
        health.clone(),
        sched.clone(),
        lake.clone(),
        loop_handle.clone(),
        crate::health::CheckOptions {
            reconcile_interval: config.r#loop.reconcile_interval,
            rules: config.alerts.clone(),
        },
        alerts.clone(),
        token.child_token(),
    ));
    let control = ControlService {
        scheduler: sched.clone(),
        readers,
        loop_handle,
        lake: lake_name.clone(),
        reloader,
        aging: config.r#loop.aging,
        alerts,
        shutdown: token.clone(),
    };
    let addr = listener.local_addr().ok();
    info!(?addr, lake = %lake_name, state_dir = %state_dir.display(), sources = catalog.sources.len(), "adce-server serving");
    sched.log(
        Event::info(format!(
            "server {} started on {} (lake {lake_name})",
            env!("CARGO_PKG_VERSION"),
            addr.map(|a| a.to_string()).unwrap_or_default()
        ))
        .row(),
    );

    // The caller's shutdown, or a failed component, starts the stop sequence.
    let grace = config.server.shutdown_grace;
    let stopping = {
        let token = token.clone();
        let health = health.clone();
        let sched = sched.clone();
        async move {
            tokio::select! {
                () = shutdown => info!("shutdown requested"),
                () = token.cancelled() => {}
            }
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            loop_token.cancel();
            let _ = loop_join.await;
            // No new work; running tasks may finish and upload for a while.
            // Agents are told, so they keep their tasks and reconnect later.
            let _ = sched.announce_stop("server shutting down".into(), grace);
            wait_for_leases(&sched, grace).await;
            sched.log(Event::info("server shutting down").row());
            // Committing and stopping the scheduler ends every agent stream.
            let _ = sched.shutdown().await;
            token.cancel();
        }
    };
    let services = Services {
        health: health.clone(),
        gateway,
        control,
    };
    let serve = transport::serve_grpc(
        services,
        config.tls.as_ref(),
        &limits,
        auth,
        listener,
        token.clone(),
    )?;
    let stop_task = tokio::spawn(stopping);
    let serve_task = tokio::spawn(serve);
    token.cancelled().await;
    let _ = stop_task.await;
    match tokio::time::timeout(TRANSPORT_CLOSE_GRACE, serve_task).await {
        Ok(Ok(Err(e))) => warn!(error = %e, "transport ended with an error"),
        Err(_) => warn!("transport did not close in time; stopping anyway"),
        _ => {}
    }
    let sched_result = sched_failed
        .await
        .map_err(|e| Error::Internal(format!("scheduler watcher: {e}")))?;
    info!("adce-server stopped");
    sched_result
}
