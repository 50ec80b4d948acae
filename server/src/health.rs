//! Component health: every few seconds the checker looks at the store (does
//! the scheduler answer), the lake (does it answer a probe, every 30 s), the reconciler
//! (is a reconcile overdue) and the dispatcher (does ready work wait with no
//! eligible agent), sets each component's gRPC health status, and keeps the
//! active alerts: raised and resolved ones are logged, status shows them.
//! Alerts also go to the optional webhook (`alerts.webhook`, http:// or
//! https:// verified by rustls): a task of its own posts them in order, so a
//! slow or failing endpoint never holds up the checks.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{info, warn};

use crate::autoloop::LoopHandle;
use crate::config::{AlertsConfig, FailureRateRule};
use crate::lake::SharedLake;
use crate::logs::Event;
use crate::model::{UnixMs, now_ms};
use crate::scheduler::Handle;

/// How often components are checked.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// How often the lake is probed (a request to S3 for an S3 lake); between
/// probes its last answer stands.
const LAKE_PROBE_EVERY_MS: i64 = 30_000;
/// A reconcile is overdue after this many reconcile intervals without one.
const OVERDUE_INTERVALS: u32 = 2;
/// ...plus this much slack.
const OVERDUE_SLACK: Duration = Duration::from_secs(60);

/// One active alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    /// The health component it affects.
    pub component: &'static str,
    /// What is wrong.
    pub message: String,
    /// Since when.
    pub since: UnixMs,
}

/// The active alerts, shared with status.
#[derive(Debug, Clone, Default)]
pub struct Alerts(Arc<Mutex<Vec<Alert>>>);

impl Alerts {
    /// The active alerts, by component.
    pub fn active(&self) -> Vec<Alert> {
        self.0.lock().map(|a| a.clone()).unwrap_or_default()
    }

    fn set(&self, alerts: Vec<Alert>) {
        if let Ok(mut guard) = self.0.lock() {
            *guard = alerts;
        }
    }
}

/// What the checks found: component → problem (absent: healthy).
pub type Findings = BTreeMap<&'static str, String>;

/// Why a reconcile is overdue, if it is.
pub fn reconcile_overdue(
    enabled: bool,
    last_reconcile: UnixMs,
    started: UnixMs,
    allowed: Duration,
    now: UnixMs,
) -> Option<String> {
    if !enabled {
        return None;
    }
    let allowed_ms = crate::model::duration_ms(allowed);
    let since = if last_reconcile > 0 {
        last_reconcile
    } else {
        started
    };
    (now - since > allowed_ms).then(|| {
        if last_reconcile > 0 {
            format!(
                "reconcile overdue: the last one finished {} ago",
                humantime::format_duration(Duration::from_secs(
                    u64::try_from((now - last_reconcile) / 1000).unwrap_or(0)
                ))
            )
        } else {
            "reconcile overdue: none has finished since the server started".into()
        }
    })
}

/// Why the failure rate is too high, if it is: `samples` are (time, done,
/// failed) totals, oldest first, covering the rule's window.
pub fn failure_rate_too_high(
    samples: &std::collections::VecDeque<(UnixMs, u64, u64)>,
    rule: &FailureRateRule,
) -> Option<String> {
    let (first, last) = (samples.front()?, samples.back()?);
    let done = last.1.saturating_sub(first.1);
    let failed = last.2.saturating_sub(first.2);
    let finished = done + failed;
    if finished < rule.min_attempts.max(1) {
        return None;
    }
    let ratio = failed as f64 / finished as f64;
    (ratio > rule.ratio).then(|| {
        format!(
            "{failed} of {finished} attempts failed in the last {} ({:.0}%, above {:.0}%)",
            humantime::format_duration(rule.window),
            ratio * 100.0,
            rule.ratio * 100.0
        )
    })
}

/// What the checker needs besides the components it asks.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// `loop.reconcile_interval`.
    pub reconcile_interval: Duration,
    /// The alert rules and webhook.
    pub rules: AlertsConfig,
}

/// How long one webhook call may take (connect, TLS handshake, request and
/// the answer's status line).
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// How many messages may wait for the webhook; more are dropped and logged.
const WEBHOOK_BACKLOG: usize = 64;
/// The longest status line read from a webhook's answer.
const MAX_STATUS_LINE: usize = 1024;

/// Where a webhook posts: `alerts.webhook` parsed once. Config validation
/// uses the same parse, so a config that loads names a target that posts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookTarget {
    /// https:// (TLS) rather than http://.
    tls: bool,
    /// The host name or IP address to connect to and verify, without brackets.
    host: String,
    /// The port, explicit or the scheme's default.
    port: u16,
    /// The `Host` header: host and port as written.
    authority: String,
    /// Path and query, with whatever secret they carry.
    path: String,
}

impl WebhookTarget {
    /// Parses an http:// or https:// URL. Errors never repeat the URL, whose
    /// path is a secret for Slack-style webhooks.
    pub fn parse(url: &str) -> Result<WebhookTarget, String> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| format!("not a URL ({e}): expected an http:// or https:// URL"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            Some(other) => {
                return Err(format!(
                    "scheme `{other}` is not supported: expected an http:// or https:// URL"
                ));
            }
            None => return Err("expected an http:// or https:// URL".into()),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| "the URL has no host".to_string())?;
        if authority.as_str().contains('@') {
            return Err(
                "the URL must not carry `user:password@` (put the token in the path)".into(),
            );
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err("the URL has no host".into());
        }
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let path = uri
            .path_and_query()
            .map(|p| p.as_str())
            .filter(|p| !p.is_empty())
            .unwrap_or("/")
            .to_owned();
        Ok(WebhookTarget {
            tls,
            host,
            port,
            authority: authority.as_str().to_owned(),
            path,
        })
    }

    /// Whether the target is https://.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// `scheme://host[:port]`, safe to log: no path, no query.
    pub fn redacted(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.authority)
    }

    /// The HTTP/1.1 request that posts `text` as Slack-compatible JSON.
    fn request(&self, text: &str) -> String {
        let body = serde_json::json!({ "text": text }).to_string();
        format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n{body}",
            path = self.path,
            host = self.authority,
            len = body.len(),
        )
    }
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
struct Webhook {
    inbox: tokio::sync::mpsc::Sender<String>,
    /// The target as it may be logged.
    redacted: String,
}

impl Webhook {
    /// Starts the task that posts to `url` until `stop`, one message at a
    /// time in the order given. `None` (logged) when `url` does not parse,
    /// which config validation already rules out.
    fn start(
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
    fn post(&self, text: String) {
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
    let transport = if target.tls {
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
    let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port)).await?;
    let request = target.request(text);
    match transport {
        Transport::Tls(connector) => {
            let name = rustls::pki_types::ServerName::try_from(target.host.clone())
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

/// Runs the checks until `stop`; sets health statuses and `alerts`.
pub async fn run(
    reporter: HealthReporter,
    scheduler: Handle,
    lake: SharedLake,
    loop_handle: LoopHandle,
    options: CheckOptions,
    alerts: Alerts,
    stop: CancellationToken,
) {
    let reconcile_interval = options.reconcile_interval;
    let rules = options.rules;
    let webhook = rules
        .webhook
        .as_deref()
        .and_then(|url| Webhook::start(url, rules.webhook_ca.clone(), stop.child_token()));
    let mut samples: std::collections::VecDeque<(UnixMs, u64, u64)> =
        std::collections::VecDeque::new();
    let (mut lake_probed_at, mut lake_problem): (UnixMs, Option<String>) = (0, None);
    let started = now_ms();
    let mut ticker = tokio::time::interval(CHECK_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut active: BTreeMap<&'static str, Alert> = BTreeMap::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now = now_ms();
        let mut findings = Findings::new();
        match scheduler.report().await {
            Ok(report) => {
                samples.push_back((now, report.stats.done_total, report.stats.failed_total));
                let window = crate::model::duration_ms(rules.failure_rate.window);
                while samples.front().is_some_and(|(t, _, _)| now - t > window) {
                    samples.pop_front();
                }
                if let Some(problem) = failure_rate_too_high(&samples, &rules.failure_rate) {
                    findings.insert("adce.dispatcher", problem);
                }
                let oldest_limit = crate::model::duration_ms(rules.oldest_ready);
                if let Some(oldest) = report.oldest_ready.filter(|t| now - t > oldest_limit) {
                    findings.insert(
                        "adce.dispatcher",
                        format!(
                            "the oldest ready task has waited {}",
                            humantime::format_duration(Duration::from_secs(
                                u64::try_from((now - oldest) / 1000).unwrap_or(0)
                            ))
                        ),
                    );
                }
                if let Some(note) = report.waiting.first() {
                    findings.insert(
                        "adce.dispatcher",
                        format!(
                            "{} ready tasks of scraper {} wait: {}",
                            note.ready, note.scraper, note.reason
                        ),
                    );
                }
            }
            Err(e) => {
                findings.insert("adce.store", format!("the scheduler does not answer: {e}"));
            }
        }
        if now - lake_probed_at >= LAKE_PROBE_EVERY_MS {
            lake_probed_at = now;
            lake_problem = lake
                .probe()
                .await
                .err()
                .map(|e| format!("lake unreachable: {e}"));
        }
        if let Some(problem) = &lake_problem {
            findings.insert("adce.lake", problem.clone());
        }
        let status = loop_handle.status();
        if let Some(problem) = reconcile_overdue(
            status.enabled,
            status.last_reconcile,
            started,
            rules
                .reconcile_overdue
                .unwrap_or(reconcile_interval * OVERDUE_INTERVALS + OVERDUE_SLACK),
            now,
        ) {
            findings.insert("adce.reconciler", problem);
        }
        for component in crate::server::COMPONENTS {
            match (findings.get(component), active.get(component)) {
                (Some(problem), None) => {
                    warn!(component, problem = %problem, "alert raised");
                    scheduler.log(Event::error(format!("alert: {component}: {problem}")).row());
                    if let Some(webhook) = &webhook {
                        webhook.post(format!("adce alert: {component}: {problem}"));
                    }
                    reporter
                        .set_service_status(component, ServingStatus::NotServing)
                        .await;
                    active.insert(
                        component,
                        Alert {
                            component,
                            message: problem.clone(),
                            since: now,
                        },
                    );
                }
                (Some(problem), Some(alert)) if *problem != alert.message => {
                    if let Some(alert) = active.get_mut(component) {
                        alert.message = problem.clone();
                    }
                }
                (None, Some(_)) => {
                    info!(component, "alert resolved");
                    scheduler
                        .log(Event::info(format!("resolved: {component} is healthy again")).row());
                    if let Some(webhook) = &webhook {
                        webhook.post(format!("adce resolved: {component} is healthy again"));
                    }
                    reporter
                        .set_service_status(component, ServingStatus::Serving)
                        .await;
                    active.remove(component);
                }
                _ => {}
            }
        }
        alerts.set(active.values().cloned().collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reconcile_is_overdue_after_two_intervals_and_a_minute() {
        let hour = Duration::from_secs(3600) * OVERDUE_INTERVALS + OVERDUE_SLACK;
        let h = 3_600_000;
        assert_eq!(reconcile_overdue(true, 10 * h, 0, hour, 12 * h), None);
        let late = reconcile_overdue(true, 10 * h, 0, hour, 12 * h + 61_000);
        assert!(late.is_some_and(|m| m.contains("2h")), "two hours ago");
        assert!(reconcile_overdue(true, 0, 0, hour, 2 * h + 61_000).is_some());
        assert_eq!(reconcile_overdue(true, 0, 0, hour, h), None);
        assert_eq!(reconcile_overdue(false, 0, 0, hour, 100 * h), None);
    }

    #[test]
    fn webhook_urls_parse_with_default_ports_and_redact_their_path() {
        let slack = WebhookTarget::parse("https://hooks.slack.com/services/T0/B0/SECRET?x=1")
            .expect("a Slack URL parses");
        assert!(slack.is_tls());
        assert_eq!((slack.host.as_str(), slack.port), ("hooks.slack.com", 443));
        assert_eq!(slack.path, "/services/T0/B0/SECRET?x=1");
        assert_eq!(slack.redacted(), "https://hooks.slack.com");
        let request = slack.request("adce alert: x");
        assert!(request.starts_with("POST /services/T0/B0/SECRET?x=1 HTTP/1.1\r\n"));
        assert!(request.contains("\r\nHost: hooks.slack.com\r\n"));
        assert!(request.ends_with("{\"text\":\"adce alert: x\"}"));

        let local = WebhookTarget::parse("http://127.0.0.1:8080").expect("no path is fine");
        assert!(!local.is_tls());
        assert_eq!((local.port, local.path.as_str()), (8080, "/"));
        assert_eq!(local.redacted(), "http://127.0.0.1:8080");
        let v6 = WebhookTarget::parse("https://[::1]:8443/hook").expect("IPv6 literal");
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 8443));
        assert_eq!(
            WebhookTarget::parse("http://example.com/").map(|t| t.port),
            Ok(80)
        );
    }

    #[test]
    fn webhook_urls_other_than_http_and_https_are_refused_without_echoing_them() {
        for (url, words) in [
            ("ftp://hooks.example/SECRET", "scheme `ftp`"),
            ("hooks.example/SECRET", "http:// or https://"),
            ("/SECRET", "http:// or https://"),
            ("https://user:SECRET@hooks.example/x", "user:password@"),
            ("https:///SECRET", "not a URL"),
            ("", "not a URL"),
        ] {
            let err = WebhookTarget::parse(url).expect_err(url);
            assert!(err.contains(words), "{url}: {err}");
            assert!(
                !err.contains("SECRET"),
                "{url}: the error repeats the URL: {err}"
            );
        }
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

    #[test]
    fn failure_rate_counts_the_window_and_needs_enough_attempts() {
        let rule = FailureRateRule {
            ratio: 0.5,
            window: Duration::from_secs(60),
            min_attempts: 10,
        };
        let samples = |v: &[(i64, u64, u64)]| v.iter().copied().collect();
        // 6 of 10 failed: too high.
        let high = failure_rate_too_high(&samples(&[(0, 100, 50), (50, 104, 56)]), &rule);
        assert!(high.is_some_and(|m| m.starts_with("6 of 10")));
        // 5 of 10: not above the ratio.
        assert_eq!(
            failure_rate_too_high(&samples(&[(0, 0, 0), (50, 5, 5)]), &rule),
            None
        );
        // Too few attempts to judge.
        assert_eq!(
            failure_rate_too_high(&samples(&[(0, 0, 0), (50, 1, 8)]), &rule),
            None
        );
    }
}
