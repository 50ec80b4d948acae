//! What the `adce-server` and `adce-agent` binaries share at start-up and
//! under systemd: the logging setup ([`logging`]) and the systemd notify
//! protocol ([`notify`]). Behind the `runtime` feature, so adcectl does not
//! pull in `sd-notify` or `tracing-subscriber`.

pub mod logging;
pub mod notify;
