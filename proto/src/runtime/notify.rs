//! The systemd notify protocol (`sd_notify(3)`) for the `Type=notify` units of
//! `adce-server` and `adce-agent`: tells the service manager when the process
//! is ready, reloading (the server) or stopping, and pings its watchdog. A
//! thin layer over the `sd-notify` crate. Only the binaries call it, so the
//! in-process agent of the server's dev mode never notifies.
//!
//! Everything here is a no-op when the process is not supervised
//! (`NOTIFY_SOCKET` unset), and a failed send is logged, never fatal: a
//! missing notification must not take the process down with it. Scrapers do
//! not inherit the socket: the agent's runner starts them with a clean
//! environment.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// The variable through which the service manager names its notify socket.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

/// The shortest period between watchdog pings, whatever the manager asks for.
pub const MIN_WATCHDOG_PING: Duration = Duration::from_millis(10);

/// Whether a service manager listens for notifications (`NOTIFY_SOCKET` set).
pub fn supervised() -> bool {
    std::env::var_os(NOTIFY_SOCKET_ENV).is_some_and(|socket| !socket.is_empty())
}

/// `READY=1`: start-up is done. Returns whether a notification was sent.
pub fn ready() -> bool {
    send("ready", &[NotifyState::Ready])
}

/// `RELOADING=1` with the `MONOTONIC_USEC` that systemd 253 and newer
/// require: a reload has begun. The caller must send [`ready`] when it ends.
/// Returns whether a notification was sent.
pub fn reloading() -> bool {
    if !supervised() {
        return false;
    }
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send("reloading", &[NotifyState::Reloading, now]),
        Err(error) => {
            warn!(%error, "cannot read the monotonic clock for the reload notification");
            false
        }
    }
}

/// `STOPPING=1`: shutdown has begun. Returns whether a notification was sent.
pub fn stopping() -> bool {
    send("stopping", &[NotifyState::Stopping])
}

/// `WATCHDOG=1`: one keep-alive ping. Returns whether a notification was sent.
pub fn watchdog() -> bool {
    send("watchdog", &[NotifyState::Watchdog])
}

/// The watchdog timeout the manager set for this process (`WATCHDOG_USEC`,
/// when `WATCHDOG_PID` is unset or names this process), or `None` when there
/// is no watchdog.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|timeout| !timeout.is_zero())
}

/// How often to ping a watchdog whose timeout is `timeout`: half of it, so
/// one late ping does not trip it, and never more often than
/// [`MIN_WATCHDOG_PING`]. `None` for a zero timeout (no watchdog).
pub fn ping_period(timeout: Duration) -> Option<Duration> {
    if timeout.is_zero() {
        return None;
    }
    Some((timeout / 2).max(MIN_WATCHDOG_PING))
}

/// Spawns a task on the current runtime that pings the watchdog every
/// [`ping_period`] of [`watchdog_interval`] for as long as the runtime runs;
/// `None` (nothing spawned) when there is no watchdog. Must be called from
/// within a tokio runtime.
pub fn spawn_watchdog() -> Option<JoinHandle<()>> {
    let timeout = watchdog_interval()?;
    let period = ping_period(timeout)?;
    debug!(?timeout, ?period, "pinging the systemd watchdog");
    Some(tokio::spawn(async move {
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            watchdog();
        }
    }))
}

/// Sends `states` when supervised; logs a failure. True when sent.
fn send(what: &'static str, states: &[NotifyState<'_>]) -> bool {
    if !supervised() {
        return false;
    }
    match sd_notify::notify(states) {
        Ok(()) => true,
        Err(error) => {
            warn!(notification = what, %error, "cannot notify systemd");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_notify_socket_nothing_is_sent() {
        // The variable cannot be removed safely in a threaded test process,
        // so this only checks the unsupervised case, which is how tests run;
        // the supervised one is covered end to end by tests/tests/deploy.rs.
        if supervised() {
            eprintln!("skipped: the test process itself runs under a service manager");
            return;
        }
        assert!(!ready());
        assert!(!reloading());
        assert!(!stopping());
        assert!(!watchdog());
    }

    #[test]
    fn watchdog_pings_at_half_the_timeout() {
        assert_eq!(
            ping_period(Duration::from_secs(30)),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            ping_period(Duration::from_micros(1)),
            Some(MIN_WATCHDOG_PING)
        );
        assert_eq!(ping_period(Duration::ZERO), None);
    }

    #[tokio::test]
    async fn no_watchdog_task_without_watchdog_usec() {
        if std::env::var_os("WATCHDOG_USEC").is_some() {
            eprintln!("skipped: the test process itself has a watchdog");
            return;
        }
        assert_eq!(watchdog_interval(), None);
        assert!(spawn_watchdog().is_none());
    }
}
