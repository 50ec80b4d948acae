//! The systemd notify protocol (`sd_notify(3)`) for the `adce-agent` binary's
//! `Type=notify` unit: ready, stopping and watchdog pings over the `sd-notify`
//! crate. A module of the binary, not of the library, so the in-process agent
//! of the server's dev mode never notifies; the server has its own copy
//! (`adce_server::notify`) because the agent must not depend on the server.
//!
//! Every call is a no-op when `NOTIFY_SOCKET` is unset, and a failed send is
//! logged, never fatal. Scrapers do not inherit the socket: the runner starts
//! them with a clean environment.

use std::time::Duration;

use sd_notify::NotifyState;

/// The variable through which the service manager names its notify socket.
const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

/// The shortest period between watchdog pings, whatever the manager asks for.
const MIN_WATCHDOG_PING: Duration = Duration::from_millis(10);

/// `READY=1`: the agent has started. True when a notification was sent.
pub fn ready() -> bool {
    send("ready", &[NotifyState::Ready])
}

/// `STOPPING=1`: shutdown has begun. True when a notification was sent.
pub fn stopping() -> bool {
    send("stopping", &[NotifyState::Stopping])
}

/// Spawns a task that sends `WATCHDOG=1` every half of the manager's
/// watchdog timeout (`WATCHDOG_USEC`) while the runtime runs; false (nothing
/// spawned) without a watchdog. Must be called from within a tokio runtime.
pub fn spawn_watchdog() -> bool {
    let Some(period) = sd_notify::watchdog_enabled().and_then(ping_period) else {
        return false;
    };
    tracing::debug!(?period, "pinging the systemd watchdog");
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            send("watchdog", &[NotifyState::Watchdog]);
        }
    });
    true
}

/// Half of a watchdog `timeout`, at least [`MIN_WATCHDOG_PING`]; `None` for
/// a zero timeout (no watchdog).
fn ping_period(timeout: Duration) -> Option<Duration> {
    (!timeout.is_zero()).then(|| (timeout / 2).max(MIN_WATCHDOG_PING))
}

/// Sends `states` when supervised; logs a failure. True when sent.
fn send(what: &'static str, states: &[NotifyState<'_>]) -> bool {
    if std::env::var_os(NOTIFY_SOCKET_ENV).is_none_or(|socket| socket.is_empty()) {
        return false;
    }
    match sd_notify::notify(states) {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(notification = what, %error, "cannot notify systemd");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn without_notify_socket_nothing_is_sent() {
        // Tests run unsupervised; the supervised case is covered end to end
        // by tests/tests/deploy.rs.
        if std::env::var_os(NOTIFY_SOCKET_ENV).is_some() {
            eprintln!("skipped: the test process itself runs under a service manager");
            return;
        }
        assert!(!ready());
        assert!(!stopping());
    }
}
