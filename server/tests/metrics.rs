//! The metrics endpoint over real HTTP on 127.0.0.1: `serve` with a fed
//! `Metrics` and a refresh closure, scraped with plain HTTP/1.1 requests over
//! a TCP stream; the body is checked line by line and parsed by Prometheus'
//! own Python parsers (OpenMetrics and the classic text format) from the test
//! venv that `scripts/test.sh` prepares.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use adce_server::auth::{AuthLayer, Policy};
use adce_server::config::Config;
use adce_server::limits::GroupSnapshot;
use adce_server::metrics::Metrics;
use adce_server::model::{Priority, TaskState};
use adce_server::reconcile::plan::Coverage;
use adce_server::transport::metrics::{CONTENT_TYPE_OPENMETRICS, serve};
use anyhow::{Context, Result, anyhow, bail, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The longest one HTTP exchange may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest `serve` may take to return after cancellation.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest the Python parser may run.
const PARSER_TIMEOUT: Duration = Duration::from_secs(60);

/// Parses stdin with both of prometheus_client's parsers and prints the
/// OpenMetrics families as JSON (the classic parser must merely accept it).
const PARSER: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families as classic
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
text = sys.stdin.read()
classic_samples = sum(len(f.samples) for f in classic(text))
families = [
    {"name": f.name, "type": f.type, "unit": f.unit,
     "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples]}
    for f in openmetrics(text)
]
json.dump({"classic_samples": classic_samples, "families": families}, sys.stdout)
"#;

/// One HTTP response.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

/// Sends `GET path` over a fresh connection and reads the whole response.
async fn get(addr: SocketAddr, path: &str) -> Result<Reply> {
    get_with(addr, path, "").await
}

/// `get` with extra header lines (each ending in `\r\n`).
async fn get_with(addr: SocketAddr, path: &str, headers: &str) -> Result<Reply> {
    tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut stream = TcpStream::connect(addr).await?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        parse_reply(&String::from_utf8(raw)?)
    })
    .await
    .context("http request timed out")?
}

fn parse_reply(raw: &str) -> Result<Reply> {
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no end of headers in {raw:?}"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Reply {
        status,
        headers,
        body: body.to_owned(),
    })
}

/// Parses `body` with Prometheus' Python parsers.
fn prometheus_parse(body: &str) -> Result<serde_json::Value> {
    let venv = std::env::var_os("ADCE_TEST_VENV")
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("ADCE_TEST_VENV is unset: run scripts/test.sh"))?;
    let mut child = Command::new(venv.join("bin/python"))
        .args(["-c", PARSER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start the venv's python: run scripts/test.sh")?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(body.as_bytes())?;
    // The parser reads stdin to its end, so the closed pipe above lets it finish.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx
        .recv_timeout(PARSER_TIMEOUT)
        .context("the prometheus parser did not finish")??;
    ensure!(
        out.status.success(),
        "prometheus' parser rejected the exposition: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The value of the sample `name` with exactly `labels` among `families`.
fn sample(parsed: &serde_json::Value, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
        .collect();
    parsed["families"]
        .as_array()?
        .iter()
        .flat_map(|f| f["samples"].as_array().into_iter().flatten())
        .find(|s| s["name"] == name && s["labels"].as_object() == Some(&want))
        .and_then(|s| s["value"].as_f64())
}

/// The type of the family `name`.
fn family_type<'a>(parsed: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    parsed["families"]
        .as_array()?
        .iter()
        .find(|f| f["name"] == name)
        .and_then(|f| f["type"].as_str())
}

fn fed_metrics() -> Metrics {
    let m = Metrics::new();
    m.task_finished("espn_pbp", "done", Some(0));
    m.task_finished("espn_pbp", "done", Some(0));
    m.task_finished("espn_pbp", "failed", Some(2));
    m.task_finished("bbref", "lost", None);
    m.dispatched("espn_pbp", "high", Duration::from_millis(20));
    m.dispatched("bbref", "low", Duration::from_secs(120));
    m.uploaded(4096, Duration::from_millis(30));
    m.reconciled(Duration::from_millis(700), 12, 9);
    m.throttled("bbref");
    m
}

#[tokio::test]
async fn serves_metrics_that_prometheus_parses_and_refreshes_before_each_scrape() -> Result<()> {
    let metrics = fed_metrics();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let refreshes = Arc::new(AtomicU64::new(0));
    let refresh = {
        let metrics = metrics.clone();
        let refreshes = Arc::clone(&refreshes);
        move || {
            let metrics = metrics.clone();
            let n = refreshes.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                // The first scrape sees two sources; later ones only one, so a
                // stale `bbref` series would show up in the second scrape.
                let mut tasks =
                    vec![(TaskState::Pending, Priority::High, "espn_pbp".to_owned(), 5)];
                let mut coverage = vec![(
                    "espn_pbp".to_owned(),
                    Coverage {
                        expected: 10,
                        present: 8,
                        missing: 1,
                        too_small: 1,
                        stale: 0,
                    },
                )];
                if n == 1 {
                    tasks.push((TaskState::Leased, Priority::Low, "bbref".to_owned(), 2));
                    coverage.push(("bbref".to_owned(), Coverage::default()));
                }
                metrics.set_tasks(&tasks);
                metrics.set_coverage(&coverage);
                metrics.set_agents(n);
                metrics.set_limit_groups(&[GroupSnapshot {
                    name: "bbref".into(),
                    rate: None,
                    effective_per_sec: Some(0.25),
                    rate_factor: 0.75,
                    burst: Some(3),
                    tokens: Some(1.0),
                    running: 1,
                    max_concurrent: Some(2),
                    recovers_at: None,
                }]);
            }
        }
    };
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve(
        listener,
        metrics,
        refresh,
        AuthLayer::open(),
        shutdown.clone(),
    ));

    let first = get(addr, "/metrics").await?;
    ensure!(
        first.status == 200,
        "status {}: {}",
        first.status,
        first.body
    );
    ensure!(
        first.headers.get("content-type").map(String::as_str) == Some(CONTENT_TYPE_OPENMETRICS),
        "content type {:?}",
        first.headers.get("content-type")
    );
    for line in [
        r#"adce_task_results_total{source="espn_pbp",outcome="done"} 2"#,
        r#"adce_scraper_exit_codes_total{source="espn_pbp",code="2"} 1"#,
        r#"adce_tasks{state="leased",priority="low",source="bbref"} 2"#,
        r#"adce_coverage_ratio{source="espn_pbp"} 0.8"#,
        "adce_agents_connected 1",
        "# EOF",
    ] {
        ensure!(
            first.body.contains(line),
            "missing `{line}` in\n{}",
            first.body
        );
    }

    let second = get(addr, "/metrics").await?;
    ensure!(second.status == 200);
    ensure!(
        second.body.contains("adce_agents_connected 2"),
        "refresh did not run before the second scrape:\n{}",
        second.body
    );
    ensure!(
        !second.body.contains(r#"adce_tasks{state="leased""#)
            && !second
                .body
                .contains(r#"adce_coverage_expected{source="bbref"}"#),
        "stale series survived the refresh:\n{}",
        second.body
    );

    let parsed = prometheus_parse(&second.body)?;
    ensure!(
        parsed["classic_samples"].as_u64().unwrap_or(0) > 0,
        "the classic text parser found no samples"
    );
    for (name, labels, want) in [
        (
            "adce_task_results_total",
            &[("source", "espn_pbp"), ("outcome", "failed")][..],
            1.0,
        ),
        (
            "adce_task_results_total",
            &[("source", "bbref"), ("outcome", "lost")][..],
            1.0,
        ),
        (
            "adce_scraper_exit_codes_total",
            &[("source", "espn_pbp"), ("code", "0")][..],
            2.0,
        ),
        (
            "adce_dispatch_total",
            &[("source", "bbref"), ("priority", "low")][..],
            1.0,
        ),
        ("adce_dispatch_wait_seconds_count", &[][..], 2.0),
        (
            "adce_dispatch_wait_seconds_bucket",
            &[("le", "0.05")][..],
            1.0,
        ),
        (
            "adce_dispatch_wait_seconds_bucket",
            &[("le", "300.0")][..],
            2.0,
        ),
        ("adce_upload_bytes_total", &[][..], 4096.0),
        ("adce_upload_seconds_count", &[][..], 1.0),
        ("adce_reconcile_seconds_count", &[][..], 1.0),
        ("adce_reconcile_gaps", &[][..], 12.0),
        ("adce_reconcile_tasks_created_total", &[][..], 9.0),
        (
            "adce_limit_group_throttled_total",
            &[("group", "bbref")][..],
            1.0,
        ),
        (
            "adce_tasks",
            &[
                ("state", "pending"),
                ("priority", "high"),
                ("source", "espn_pbp"),
            ][..],
            5.0,
        ),
        (
            "adce_coverage_expected",
            &[("source", "espn_pbp")][..],
            10.0,
        ),
        ("adce_coverage_present", &[("source", "espn_pbp")][..], 8.0),
        ("adce_coverage_missing", &[("source", "espn_pbp")][..], 1.0),
        (
            "adce_coverage_too_small",
            &[("source", "espn_pbp")][..],
            1.0,
        ),
        ("adce_coverage_stale", &[("source", "espn_pbp")][..], 0.0),
        ("adce_coverage_ratio", &[("source", "espn_pbp")][..], 0.8),
        ("adce_agents_connected", &[][..], 2.0),
        ("adce_limit_group_rate", &[("group", "bbref")][..], 0.25),
        ("adce_limit_group_running", &[("group", "bbref")][..], 1.0),
    ] {
        let got = sample(&parsed, name, labels);
        ensure!(
            got.is_some_and(|v| (v - want).abs() < 1e-9),
            "{name}{labels:?}: want {want}, got {got:?}"
        );
    }
    for (family, kind) in [
        ("adce_task_results", "counter"),
        ("adce_dispatch_wait_seconds", "histogram"),
        ("adce_tasks", "gauge"),
        ("adce_upload_bytes", "counter"),
    ] {
        ensure!(
            family_type(&parsed, family) == Some(kind),
            "family {family}: want {kind}, got {:?}",
            family_type(&parsed, family)
        );
    }

    let other = get(addr, "/other").await?;
    ensure!(other.status == 404, "GET /other: status {}", other.status);
    let root = get(addr, "/").await?;
    ensure!(root.status == 404, "GET /: status {}", root.status);
    ensure!(
        refreshes.load(Ordering::SeqCst) == 2,
        "only /metrics scrapes refresh"
    );

    shutdown.cancel();
    tokio::time::timeout(STOP_TIMEOUT, server)
        .await
        .context("serve did not stop after cancellation")??;
    if TcpStream::connect(addr).await.is_ok() {
        bail!("the metrics port still accepts connections after shutdown");
    }
    Ok(())
}

#[tokio::test]
async fn shutdown_ends_idle_keep_alive_connections() -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve(
        listener,
        Metrics::new(),
        || async {},
        AuthLayer::open(),
        shutdown.clone(),
    ));
    // A keep-alive client that has sent one request and then idles.
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = tokio::time::timeout(REQUEST_TIMEOUT, stream.read(&mut buf)).await??;
    let head = String::from_utf8_lossy(&buf[..n]);
    ensure!(head.starts_with("HTTP/1.1 200"), "first response: {head}");

    shutdown.cancel();
    tokio::time::timeout(STOP_TIMEOUT, server)
        .await
        .context("serve waited forever for an idle keep-alive connection")??;
    // The server side of the connection is closed: the client reads the end.
    let mut rest = Vec::new();
    tokio::time::timeout(REQUEST_TIMEOUT, stream.read_to_end(&mut rest))
        .await
        .context("the idle connection was not closed")??;
    Ok(())
}

/// With tokens configured, `/metrics` needs a `read` (or `admin`) token:
/// none is 401 with a Bearer challenge, an agent token is 403.
#[tokio::test]
async fn metrics_need_a_read_token_when_tokens_are_configured() -> Result<()> {
    let config = Config::parse(
        "version: 1
lake:
  local:
    root: lake
auth:
  tokens:
    - {role: read, token: metrics-read-token-0123}
    - {role: agent, token: metrics-agent-token-0123}
",
        std::path::Path::new("adce.yaml"),
    )?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve(
        listener,
        Metrics::new(),
        || async {},
        AuthLayer::new(Policy::new(&config.auth, None)),
        shutdown.clone(),
    ));
    let anonymous = get(addr, "/metrics").await?;
    ensure!(anonymous.status == 401, "no token: {}", anonymous.status);
    ensure!(
        anonymous
            .headers
            .get("www-authenticate")
            .map(String::as_str)
            == Some("Bearer"),
        "no Bearer challenge: {:?}",
        anonymous.headers
    );
    ensure!(
        !anonymous.body.contains("adce_"),
        "metrics leaked: {}",
        anonymous.body
    );
    let agent = get_with(
        addr,
        "/metrics",
        "authorization: Bearer metrics-agent-token-0123\r\n",
    )
    .await?;
    ensure!(agent.status == 403, "agent token: {}", agent.status);
    let read = get_with(
        addr,
        "/metrics",
        "authorization: Bearer metrics-read-token-0123\r\n",
    )
    .await?;
    ensure!(
        read.status == 200,
        "read token: {} {}",
        read.status,
        read.body
    );
    ensure!(read.body.contains("# EOF"), "{}", read.body);
    shutdown.cancel();
    tokio::time::timeout(STOP_TIMEOUT, server).await??;
    Ok(())
}
