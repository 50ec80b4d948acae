//! `adce-server` as a test starts it: the fast-timing config head tests build
//! their configs on ([`base_config`], [`s3_config`]), the gRPC health check,
//! and [`ServerProc`], the real binary started on a loopback port and waited
//! for (bounded) until it is SERVING.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitStatus, Output};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::ctl::{ctl, ctl_json, status};
use crate::process::{LOG_TAIL_LINES, Proc, READY_POLL, bin, tail_lines};

/// How long a started server may take to answer its health check with SERVING.
pub const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The head of a test config: fast timings (heartbeat 500 ms, lease TTL 3 s,
/// queue checks every 200 ms, reconcile on start and when the queue drains),
/// state in `state/` and the lake in `lake/` next to the config file. Tests
/// append their own `scrapers:` and `sources:` sections.
pub fn base_config(listen: SocketAddr) -> String {
    config_head(listen, "lake:\n  local:\n    root: lake\n")
}

/// Like [`base_config`] but with the lake on S3 (`lake` is the YAML of
/// [`MotoServer::lake_yaml`](crate::MotoServer::lake_yaml)); tests append
/// `scrapers:` and `sources:`.
pub fn s3_config(listen: SocketAddr, lake: &str) -> String {
    config_head(listen, lake)
}

/// The fast-timing head of a test config around a `lake:` section.
fn config_head(listen: SocketAddr, lake: &str) -> String {
    format!(
        "version: 1
server:
  listen: {listen}
  state_dir: state
  heartbeat_interval: 500ms
  lease_ttl: 3s
{lake}loop:
  enabled: true
  reconcile_interval: 1h
  queue_check_interval: 200ms
"
    )
}

/// Asks `grpc.health.v1.Health/Check` for `service` once; `Ok(status name)`.
pub fn health_check(addr: SocketAddr, service: &str) -> Result<String, String> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot build a runtime: {e}"))?;
    runtime.block_on(async {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5));
        let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .map_err(|status| status.to_string())?;
        let status = ServingStatus::try_from(reply.into_inner().status)
            .map_err(|e| format!("unknown serving status: {e}"))?;
        Ok(status.as_str_name().to_string())
    })
}

/// A running `adce-server`.
#[derive(Debug)]
pub struct ServerProc {
    proc: Proc,
    addr: SocketAddr,
}

impl ServerProc {
    /// Starts `adce-server --config FILE --listen ADDR` (logs in the config's
    /// directory) and waits until it is SERVING.
    pub fn start(config: &Path, listen: SocketAddr) -> ServerProc {
        ServerProc::start_with_env(config, listen, &[])
    }

    /// Like [`ServerProc::start`] with extra environment variables for the
    /// server (e.g. [`MotoServer::aws_env`](crate::MotoServer::aws_env)).
    pub fn start_with_env(config: &Path, listen: SocketAddr, envs: &[(&str, &str)]) -> ServerProc {
        let log_dir = config.parent().unwrap_or_else(|| Path::new("."));
        let args: Vec<OsString> = vec![
            "--config".into(),
            config.as_os_str().to_owned(),
            "--listen".into(),
            listen.to_string().into(),
        ];
        ServerProc::start_with_args_env(&args, listen, log_dir, envs)
    }

    /// Starts `adce-server --dev --data-dir DIR --listen ADDR` (logs in `log_dir`)
    /// and waits until it is SERVING.
    pub fn start_dev(data_dir: &Path, listen: SocketAddr, log_dir: &Path) -> ServerProc {
        let args: Vec<OsString> = vec![
            "--dev".into(),
            "--data-dir".into(),
            data_dir.as_os_str().to_owned(),
            "--listen".into(),
            listen.to_string().into(),
        ];
        ServerProc::start_with_args(&args, listen, log_dir)
    }

    /// Starts `adce-server ARGS` that listens on `listen` and waits (bounded)
    /// until the health check of `""` answers SERVING.
    pub fn start_with_args(args: &[OsString], listen: SocketAddr, log_dir: &Path) -> ServerProc {
        ServerProc::start_with_args_env(args, listen, log_dir, &[])
    }

    /// [`ServerProc::start_with_args`] with extra environment variables.
    pub fn start_with_args_env(
        args: &[OsString],
        listen: SocketAddr,
        log_dir: &Path,
        envs: &[(&str, &str)],
    ) -> ServerProc {
        let mut all_envs = vec![("RUST_LOG", "info,adce_server=debug")];
        all_envs.extend_from_slice(envs);
        let proc = Proc::spawn(
            "adce-server",
            &bin("adce-server"),
            args,
            &all_envs,
            log_dir,
            Some(log_dir),
        );
        let mut server = ServerProc { proc, addr: listen };
        server.wait_serving();
        server
    }

    fn wait_serving(&mut self) {
        let started = Instant::now();
        let max_polls = SERVER_READY_TIMEOUT.as_millis() / READY_POLL.as_millis() + 1;
        let mut last = String::new();
        for _ in 0..max_polls {
            if let Some(status) = self.proc.try_exit() {
                panic!(
                    "adce-server exited during start-up with {status}; log tail:\n{}",
                    tail_lines(&self.proc.log(), LOG_TAIL_LINES)
                );
            }
            match health_check(self.addr, "") {
                Ok(status) if status == "SERVING" => return,
                Ok(status) => last = status,
                Err(e) => last = e,
            }
            if started.elapsed() >= SERVER_READY_TIMEOUT {
                break;
            }
            thread::sleep(READY_POLL);
        }
        panic!(
            "adce-server on {} not SERVING within {SERVER_READY_TIMEOUT:?} (last: {last}); log tail:\n{}",
            self.addr,
            tail_lines(&self.proc.log(), LOG_TAIL_LINES)
        );
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The process.
    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// SIGKILL by pid.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// SIGTERM by pid and a bounded wait for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.proc.terminate()
    }

    /// Runs `adcectl --server URL ARGS`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        ctl(&self.url(), args)
    }

    /// Runs `adcectl --server URL --json ARGS` and parses stdout.
    pub fn ctl_json(&self, args: &[&str]) -> Value {
        ctl_json(&self.url(), args)
    }

    /// `adcectl status --json`.
    pub fn status(&self) -> Value {
        status(&self.url())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_config_puts_the_lake_section_in_place() {
        let listen = SocketAddr::from(([127, 0, 0, 1], 7000));
        let config = s3_config(listen, "lake:\n  s3:\n    bucket: b\n");
        assert!(
            config.contains("lease_ttl: 3s\nlake:\n  s3:\n    bucket: b\nloop:\n"),
            "{config}"
        );
        assert!(base_config(listen).contains("lake:\n  local:\n    root: lake\nloop:\n"));
    }
}
