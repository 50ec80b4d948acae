//! The alert webhook's client: a task of its own posts each alert, in order,
//! as Slack-compatible JSON over HTTP/1.1 to an http:// target or an https://
//! one verified by rustls (the configured CA or the system's roots), so a slow
//! or failing endpoint never holds up the health checks.
//!
//! Invariant: only the target's scheme and host are logged, never its path.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::WebhookTarget;

/// How long one webhook call may take (connect, TLS handshake, request and
/// the answer's status line).
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// How many messages may wait for the webhook; more are dropped and logged.
const WEBHOOK_BACKLOG: usize = 64;
/// The longest status line read from a webhook's answer.
const MAX_STATUS_LINE: usize = 1024;

/// The HTTP/1.1 request that posts `text` as Slack-compatible JSON.
fn request(target: &WebhookTarget, text: &str) -> String {
    let body = serde_json::json!({ "text": text }).to_string();
    format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n{body}",
        path = target.path_and_query(),
        host = target.authority(),
        len = body.len(),
    )
}

/// How the webhook task reaches its target.
enum Transport {
    /// http://: plain TCP.
    Plain,
    /// https://: TLS verified against the configured roots, with SNI and
    /// hostname checks (rustls does both).
    Tls(tokio_rustls::TlsConnector),
    /// https:// whose TLS setup failed (e.g. an unreadable `webhook_ca`):
    /// every post fails with this reason.
    Broken(String),
}

/// The TLS client for an https:// webhook: the certificates of `ca` (PEM)
/// as the only roots when given, else the system's roots. Reads files:
/// call off the async threads.
fn tls_connector(ca: Option<&std::path::Path>) -> std::io::Result<tokio_rustls::TlsConnector> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let other = std::io::Error::other;
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let unreadable = |e: rustls::pki_types::pem::Error| {
                other(format!("webhook_ca {}: {e}", path.display()))
            };
            for cert in CertificateDer::pem_file_iter(path).map_err(unreadable)? {
                roots
                    .add(cert.map_err(unreadable)?)
                    .map_err(|e| other(format!("webhook_ca {}: {e}", path.display())))?;
            }
            if roots.is_empty() {
                return Err(other(format!(
                    "webhook_ca {}: no PEM certificate in the file",
                    path.display()
                )));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _unparsable) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map_or_else(|| "none installed".to_string(), ToString::to_string);
                return Err(other(format!("no system root certificates: {why}")));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The sending side of the webhook task: the health checks hand it messages
/// and never wait for the endpoint.
#[derive(Debug, Clone)]
pub struct Webhook {
    inbox: tokio::sync::mpsc::Sender<String>,
    /// The target as it may be logged.
    redacted: String,
}

impl Webhook {
    /// Starts the task that posts to `url` until `stop`, one message at a
    /// time in the order given. `None` (logged) when `url` does not parse,
    /// which config validation already rules out.
    pub fn start(
        url: &str,
        ca: Option<std::path::PathBuf>,
        stop: CancellationToken,
    ) -> Option<Webhook> {
        let target = match WebhookTarget::parse(url) {
            Ok(target) => target,
            Err(e) => {
                warn!(error = %e, "invalid webhook: alerts will not be posted");
                return None;
            }
        };
        let (inbox, rx) = tokio::sync::mpsc::channel(WEBHOOK_BACKLOG);
        let redacted = target.redacted();
        tokio::spawn(deliver(target, ca, rx, stop));
        Some(Webhook { inbox, redacted })
    }

    /// Queues `text`; when the endpoint is so slow that the backlog is
    /// full, the message is dropped and logged.
    pub fn post(&self, text: String) {
        if let Err(e) = self.inbox.try_send(text) {
            let reason = match e {
                tokio::sync::mpsc::error::TrySendError::Full(_) => "backlog full",
                tokio::sync::mpsc::error::TrySendError::Closed(_) => "webhook task stopped",
            };
            warn!(url = %self.redacted, reason, "webhook failed: message dropped");
        }
    }
}

/// The webhook task: sets up TLS once, then posts each message; a failure
/// is logged (with the target's scheme and host only) and the next message
/// is tried anyway.
async fn deliver(
    target: WebhookTarget,
    ca: Option<std::path::PathBuf>,
    mut inbox: tokio::sync::mpsc::Receiver<String>,
    stop: CancellationToken,
) {
    let url = target.redacted();
    let transport = if target.is_tls() {
        match tokio::task::spawn_blocking(move || tls_connector(ca.as_deref())).await {
            Ok(Ok(connector)) => Transport::Tls(connector),
            Ok(Err(e)) => {
                warn!(url = %url, error = %e, "webhook TLS setup failed: alerts will not be posted");
                Transport::Broken(format!("TLS setup failed: {e}"))
            }
            Err(e) => Transport::Broken(format!("TLS setup failed: {e}")),
        }
    } else {
        Transport::Plain
    };
    loop {
        let text = tokio::select! {
            () = stop.cancelled() => return,
            text = inbox.recv() => match text {
                Some(text) => text,
                None => return,
            },
        };
        let result = tokio::select! {
            () = stop.cancelled() => return,
            result = tokio::time::timeout(WEBHOOK_TIMEOUT, post(&target, &transport, &text)) => {
                result.unwrap_or_else(|_| Err(std::io::Error::other("timed out")))
            }
        };
        match result {
            Ok(()) => info!(url = %url, "webhook posted"),
            Err(e) => warn!(url = %url, error = %e, "webhook failed"),
        }
    }
}

/// One POST of `text` to `target`, unbounded in time (the caller bounds it).
async fn post(target: &WebhookTarget, transport: &Transport, text: &str) -> std::io::Result<()> {
    if let Transport::Broken(why) = transport {
        return Err(std::io::Error::other(why.clone()));
    }
    let tcp = tokio::net::TcpStream::connect((target.host(), target.port())).await?;
    let request = request(target, text);
    match transport {
        Transport::Tls(connector) => {
            let name = rustls::pki_types::ServerName::try_from(target.host().to_owned())
                .map_err(|e| std::io::Error::other(format!("invalid TLS server name: {e}")))?;
            let stream = connector.connect(name, tcp).await?;
            exchange(stream, &request).await
        }
        Transport::Plain | Transport::Broken(_) => exchange(tcp, &request).await,
    }
}

/// Writes `request` and checks that the answer's status is 2xx.
async fn exchange<S>(mut stream: S, request: &str) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(request.as_bytes()).await?;
    stream.flush().await?;
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < MAX_STATUS_LINE {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let status_line = text.lines().next().unwrap_or_default();
    if is_success(status_line) {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("answered {status_line:?}")))
    }
}

/// Whether an HTTP/1.x status line says 2xx.
fn is_success(status_line: &str) -> bool {
    let mut parts = status_line.split_ascii_whitespace();
    parts.next().is_some_and(|v| v.starts_with("HTTP/1."))
        && parts
            .next()
            .is_some_and(|code| code.len() == 3 && code.starts_with('2'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_posts_slack_json_to_the_path_with_the_host_header() {
        let slack = WebhookTarget::parse("https://hooks.slack.com/services/T0/B0/SECRET?x=1")
            .expect("a Slack URL parses");
        let request = request(&slack, "adce alert: x");
        assert!(request.starts_with("POST /services/T0/B0/SECRET?x=1 HTTP/1.1\r\n"));
        assert!(request.contains("\r\nHost: hooks.slack.com\r\n"));
        assert!(request.ends_with("{\"text\":\"adce alert: x\"}"));
    }

    #[test]
    fn only_2xx_status_lines_are_success() {
        assert!(is_success("HTTP/1.1 200 OK"));
        assert!(is_success("HTTP/1.0 204 No Content"));
        assert!(!is_success("HTTP/1.1 302 Found"));
        assert!(!is_success("HTTP/1.1 500 Internal Server Error"));
        assert!(!is_success("HTTP/1.1 2000 odd"));
        assert!(!is_success("SSH-2.0-OpenSSH"));
        assert!(!is_success(""));
    }

    #[test]
    fn a_webhook_ca_without_certificates_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let err = tls_connector(Some(&empty))
            .err()
            .expect("no certificate in it");
        assert!(err.to_string().contains("empty.pem"), "{err}");
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
        let missing = dir.path().join("missing.pem");
        let err = tls_connector(Some(&missing)).err().expect("no such file");
        assert!(err.to_string().contains("missing.pem"), "{err}");
    }
}
