//! The connection to the server: parsing `--server` and `--timeout`, opening
//! the channel, the per-call deadline, and turning transport errors and
//! `tonic::Status` into the one-line messages adcectl prints.

use std::future::Future;
use std::time::Duration;

use adce_proto::dial::{AuthChannel, ClientSecurity};
use adce_proto::v1::control_client::ControlClient;
use anyhow::anyhow;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Endpoint;
use tonic_health::pb::health_client::HealthClient;

/// The server adcectl talks to when neither `--server` nor `ADCE_SERVER` is set.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7070";

/// How often an idle connection is probed with an HTTP/2 ping, so `logs
/// --follow` notices a half-open connection.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);

/// How long a keepalive ping may stay unanswered before the connection is
/// considered dead.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Normalizes a `--server` value: `host:port` gains `http://`, a trailing
/// slash is dropped, and the result must be a URL tonic can dial.
pub fn parse_server(raw: &str) -> Result<String, String> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err("the server address is empty".to_owned());
    }
    let (scheme, rest) = trimmed.split_once("://").unwrap_or(("http", trimmed));
    if scheme != "http" && scheme != "https" {
        return Err(format!(
            "unsupported scheme `{scheme}` in server address `{raw}` (use http://)"
        ));
    }
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() {
        return Err(format!("no host in server address `{raw}`"));
    }
    let url = format!("{scheme}://{rest}");
    match Endpoint::from_shared(url.clone()) {
        Ok(endpoint) if endpoint.uri().host().is_some() => Ok(url),
        Ok(_) => Err(format!("no host in server address `{raw}`")),
        Err(e) => Err(format!("invalid server address `{raw}`: {e}")),
    }
}

/// Parses a `--timeout` value such as `500ms`, `10s` or `1m`.
pub fn parse_timeout(raw: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(raw.trim())
        .map_err(|e| format!("invalid duration `{raw}` (try 500ms, 10s or 1m): {e}"))?;
    if duration.is_zero() {
        return Err("the timeout must be longer than zero".to_owned());
    }
    Ok(duration)
}

/// Where to connect and how long each call may take.
#[derive(Debug, Clone)]
pub struct Target {
    /// The normalized server URL.
    pub url: String,
    /// The deadline of one unary call, or of the wait for the next message of
    /// a stream.
    pub timeout: Duration,
    /// The token and TLS files.
    pub security: ClientSecurity,
}

impl Target {
    /// Opens a channel to the server, failing with `cannot reach server at
    /// URL: ...` when nothing answers within the timeout.
    pub async fn connect(&self) -> anyhow::Result<AuthChannel> {
        let bearer = self.security.bearer()?;
        let endpoint = self
            .security
            .endpoint(&self.url)?
            .connect_timeout(self.timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| anyhow!("cannot reach server at {}: {}", self.url, error_chain(&e)))?;
        Ok(InterceptedService::new(channel, bearer))
    }

    /// A `Control` client on a fresh connection.
    pub async fn control(&self) -> anyhow::Result<ControlClient<AuthChannel>> {
        Ok(ControlClient::new(self.connect().await?))
    }

    /// A `grpc.health.v1.Health` client on a fresh connection.
    pub async fn health(&self) -> anyhow::Result<HealthClient<AuthChannel>> {
        Ok(HealthClient::new(self.connect().await?))
    }

    /// A request carrying the call's deadline in its `grpc-timeout` header.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        request
    }

    /// Runs one call under the timeout and turns a failure into adcectl's
    /// message for it.
    pub async fn call<T, F>(&self, what: &str, call: F) -> anyhow::Result<T>
    where
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(anyhow!(self.status_message(&status))),
            Err(_) => Err(anyhow!(self.timeout_message(what))),
        }
    }

    /// The message for a call that did not answer within the timeout.
    pub fn timeout_message(&self, what: &str) -> String {
        format!(
            "{what}: no answer from {} within {}",
            self.url,
            humantime::format_duration(self.timeout)
        )
    }

    /// The message for a call the server (or the transport) failed.
    pub fn status_message(&self, status: &tonic::Status) -> String {
        describe_status(&self.url, status)
    }
}

/// One line for a failed call: transport failures read as `cannot reach
/// server at URL: ...`, everything else is the server's own message (or the
/// code's description when the server gave none).
pub fn describe_status(url: &str, status: &tonic::Status) -> String {
    let message = status.message().trim();
    match status.code() {
        tonic::Code::Unavailable => {
            let detail = if message.is_empty() {
                "the server is unavailable".to_owned()
            } else {
                message.to_owned()
            };
            format!("cannot reach server at {url}: {detail}")
        }
        tonic::Code::Unauthenticated => format!(
            "the server at {url} refused the call: {} (give a token with --token, ADCE_TOKEN or --token-file)",
            if message.is_empty() {
                "no valid token"
            } else {
                message
            }
        ),
        tonic::Code::PermissionDenied if !message.is_empty() => {
            format!("permission denied: {message}")
        }
        tonic::Code::Unimplemented if message.is_empty() => {
            format!("the server at {url} does not implement this call (is it an adce server?)")
        }
        code if message.is_empty() => code.description().to_owned(),
        _ => message.to_owned(),
    }
}

/// An error and its sources joined with `: `, skipping a source whose text
/// its parent already contains.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_without_scheme_gains_http() {
        assert_eq!(
            parse_server("127.0.0.1:7070").as_deref(),
            Ok("http://127.0.0.1:7070")
        );
        assert_eq!(
            parse_server("adce.internal:9000/").as_deref(),
            Ok("http://adce.internal:9000")
        );
        assert_eq!(
            parse_server("http://[::1]:7070").as_deref(),
            Ok("http://[::1]:7070")
        );
        assert_eq!(parse_server(DEFAULT_SERVER).as_deref(), Ok(DEFAULT_SERVER));
    }

    #[test]
    fn bad_server_addresses_are_rejected() {
        assert!(parse_server("").is_err());
        assert!(parse_server("http://").is_err());
        assert!(parse_server("not a url").is_err());
        assert!(parse_server("ftp://host:21").is_err());
    }

    #[test]
    fn timeouts_accept_human_durations() {
        assert_eq!(parse_timeout("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_timeout("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_timeout("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_timeout("0s").is_err());
        assert!(parse_timeout("soon").is_err());
        assert!(parse_timeout("10").is_err());
    }

    #[test]
    fn unavailable_reads_as_unreachable_and_other_codes_keep_their_message() {
        let url = "http://127.0.0.1:1";
        let down = describe_status(url, &tonic::Status::unavailable("connection reset"));
        assert_eq!(
            down,
            "cannot reach server at http://127.0.0.1:1: connection reset"
        );
        let missing = describe_status(url, &tonic::Status::not_found("task 99 does not exist"));
        assert_eq!(missing, "task 99 does not exist");
        let bare = describe_status(url, &tonic::Status::new(tonic::Code::PermissionDenied, ""));
        assert_eq!(bare, tonic::Code::PermissionDenied.description().to_owned());
        let other = describe_status(url, &tonic::Status::unimplemented(""));
        assert!(other.contains("does not implement"), "{other}");
    }

    #[test]
    fn error_chain_joins_sources_once() {
        let inner = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let outer = anyhow::Error::new(inner).context("tcp connect error");
        let text = error_chain(outer.as_ref());
        assert_eq!(text, "tcp connect error: refused");
    }
}
