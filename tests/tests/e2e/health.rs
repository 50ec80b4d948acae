//! Component health seen by a real gRPC health client (Python
//! grpcio-health-checking): `adce.dispatcher` goes NOT_SERVING while ready
//! work has no agent to run it, and back to SERVING when one connects;
//! `adcectl health` says why and exits 1 meanwhile. Alert webhooks, over
//! http:// and https:// (verified against a test CA), get one alert and one
//! resolution; one whose certificate chains to another CA gets nothing.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use adce_tests::pki::TestPki;
use adce_tests::{
    AgentProc, ServerProc, TestDir, base_config, free_addr, free_port, read_or_empty, text,
    venv_tool, wait_until,
};

const PY_CHECK: &str = r#"
import sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
with grpc.insecure_channel(sys.argv[1]) as channel:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=sys.argv[2]), timeout=10)
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
"#;

fn status(addr: &str, service: &str) -> String {
    let out = Command::new(venv_tool("python"))
        .args(["-c", PY_CHECK, addr, service])
        .output()
        .unwrap_or_else(|e| panic!("cannot run the health client: {e}"));
    assert!(
        out.status.success(),
        "health client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn dispatcher_health_follows_agents() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let config = format!(
        "{base}scrapers:
  s:
    command: [\"{{config_dir}}/scrapers/write_expected.sh\"]
sources:
  - name: items
    scraper: s
    partitions:
      values: {{var: item, values: [\"a\", \"b\"]}}
    objects: [\"items/{{item}}.json\"]
",
        base = base_config(listen).replace(
            "  queue_check_interval: 200ms\n",
            "  queue_check_interval: 200ms\n  no_agent_after: 1s\n"
        )
    );
    let path = dir.write_config("adce.yaml", &config);
    let server = ServerProc::start(&path, listen);
    let addr = listen.to_string();
    let timeout = Duration::from_secs(30);
    let poll = Duration::from_millis(300);

    // Backlog and no agent: the dispatcher is not serving, and says why.
    wait_until("adce.dispatcher NOT_SERVING", timeout, poll, || {
        let s = status(&addr, "adce.dispatcher");
        if s == "NOT_SERVING" { Ok(()) } else { Err(s) }
    });
    assert_eq!(status(&addr, "adce.store"), "SERVING");
    assert_eq!(status(&addr, ""), "SERVING");
    let health = server.ctl(&["health"]);
    assert_eq!(health.status.code(), Some(1));
    let text = String::from_utf8_lossy(&health.stdout).to_string();
    assert!(text.contains("adce.dispatcher: 2 ready tasks"), "{text}");
    assert!(text.contains("no agent connected"), "{text}");
    let alerts = server.ctl_json(&["status"])["alerts"].clone();
    assert_eq!(alerts[0]["component"], "adce.dispatcher", "{alerts:#}");

    // An agent connects and runs the work: serving again.
    let _agent = AgentProc::start(&server.url(), "a1", 1, &[], dir.path());
    wait_until("adce.dispatcher SERVING", timeout, poll, || {
        let s = status(&addr, "adce.dispatcher");
        if s == "SERVING" { Ok(()) } else { Err(s) }
    });
    assert!(server.ctl(&["health"]).status.success());
}

/// A webhook receiver: appends each POST body as one line to a file
/// (`argv[2]`); with a certificate and key (`argv[3]`, `argv[4]`) it speaks
/// HTTPS only. A client that refuses the handshake raises an `ssl.SSLError`
/// (an `OSError`) in `accept`, which `socketserver` drops: nothing is written.
const PY_RECEIVER: &str = r#"
import sys, ssl, http.server
out = open(sys.argv[2], "a")
class Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        out.write(self.path + " " + body.replace("\n", " ") + "\n")
        out.flush()
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Hook)
if len(sys.argv) > 4:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(sys.argv[3], sys.argv[4])
    server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#;

/// Kills the receiver by its pid when the test ends.
struct Receiver(std::process::Child);

impl Receiver {
    /// Starts a receiver on `port` writing to `out`, over HTTPS with the
    /// server certificate of `tls` when given.
    fn start(port: u16, out: &Path, tls: Option<&TestPki>) -> Receiver {
        let mut command = Command::new(venv_tool("python"));
        command
            .args(["-c", PY_RECEIVER, &port.to_string()])
            .arg(out);
        if let Some(pki) = tls {
            command.arg(&pki.server_cert).arg(&pki.server_key);
        }
        Receiver(
            command
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start the webhook receiver: {e}")),
        )
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A config with one source of one ready task and `alerts` (YAML lines
/// under `alerts:`); with no agent the dispatcher alerts after a second.
fn webhook_config(listen: SocketAddr, alerts: &str) -> String {
    format!(
        "{base}alerts:
{alerts}scrapers:
  s:
    command: [\"{{config_dir}}/scrapers/write_expected.sh\"]
sources:
  - name: items
    scraper: s
    partitions:
      values: {{var: item, values: [\"a\"]}}
    objects: [\"items/{{item}}.json\"]
",
        base = base_config(listen).replace(
            "  queue_check_interval: 200ms\n",
            "  queue_check_interval: 200ms\n  no_agent_after: 1s\n"
        )
    )
}

/// The outage (ready work, no agent) and its fix (an agent runs the work):
/// the receiver writing to `received` gets exactly one alert and one
/// resolution, each Slack-shaped JSON posted to `path`.
fn one_alert_and_one_resolution(
    dir: &TestDir,
    listen: SocketAddr,
    alerts: &str,
    received: &Path,
    path: &str,
) {
    let config_path = dir.write_config("adce.yaml", &webhook_config(listen, alerts));
    let server = ServerProc::start(&config_path, listen);
    let hooks = || std::fs::read_to_string(received).unwrap_or_default();
    let timeout = Duration::from_secs(30);
    let poll = Duration::from_millis(200);
    wait_until("the alert posted", timeout, poll, || {
        let h = hooks();
        if h.contains("adce alert: adce.dispatcher") {
            Ok(())
        } else {
            Err(h)
        }
    });
    let _agent = AgentProc::start(&server.url(), "a1", 1, &[], dir.path());
    wait_until("the resolution posted", timeout, poll, || {
        let h = hooks();
        if h.contains("adce resolved: adce.dispatcher") {
            Ok(())
        } else {
            Err(h)
        }
    });
    // Three more check intervals: nothing is posted twice.
    std::thread::sleep(Duration::from_secs(3));
    let all = hooks();
    let lines: Vec<&str> = all.lines().collect();
    assert_eq!(lines.len(), 2, "{all}");
    for line in &lines {
        let Some(body) = line.strip_prefix(path).and_then(|l| l.strip_prefix(' ')) else {
            panic!("not posted to {path}: {line}");
        };
        let body: serde_json::Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(body["text"].is_string(), "not Slack-shaped: {line}");
    }
}

#[test]
fn a_webhook_gets_one_alert_and_one_resolution() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let hook = free_addr();
    let received = dir.join("hooks.txt");
    let _receiver = Receiver::start(hook.port(), &received, None);
    let alerts = format!("  webhook: \"http://{hook}/hook\"\n");
    one_alert_and_one_resolution(&dir, free_addr(), &alerts, &received, "/hook");
}

#[test]
fn an_https_webhook_gets_one_alert_and_one_resolution() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let pki = TestPki::generate(&dir.join("pki")).unwrap_or_else(|e| panic!("test PKI: {e}"));
    let port = free_port();
    let received = dir.join("hooks.txt");
    let _receiver = Receiver::start(port, &received, Some(&pki));
    // `localhost` as written: SNI and the certificate's DNS name are checked.
    let alerts = format!(
        "  webhook: \"https://localhost:{port}/hook\"\n  webhook_ca: \"{}\"\n",
        pki.ca.display()
    );
    one_alert_and_one_resolution(&dir, free_addr(), &alerts, &received, "/hook");
}

#[test]
fn an_https_webhook_with_a_certificate_from_another_ca_gets_nothing() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let pki = TestPki::generate(&dir.join("pki")).unwrap_or_else(|e| panic!("test PKI: {e}"));
    let port = free_port();
    let received = dir.join("hooks.txt");
    let _receiver = Receiver::start(port, &received, Some(&pki));
    // The path stands for a Slack webhook's secret: it must not be logged.
    let secret = "T000/B000/not-for-the-log";
    let listen = free_addr();
    let config = webhook_config(
        listen,
        &format!(
            "  webhook: \"https://localhost:{port}/services/{secret}\"\n  webhook_ca: \"{}\"\n",
            pki.other_ca.display()
        ),
    );
    let path = dir.write_config("adce.yaml", &config);
    let server = ServerProc::start(&path, listen);
    let failure = wait_until(
        "the webhook failure logged",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let log = server.log();
            match log.lines().find(|l| l.contains("webhook failed")) {
                Some(line) => Ok(line.to_string()),
                None => Err(adce_tests::tail_lines(&log, 5)),
            }
        },
    );
    assert!(
        failure.contains(&format!("https://localhost:{port}")),
        "the log names the target: {failure}"
    );
    assert!(
        failure.contains("certificate") || failure.contains("UnknownIssuer"),
        "refused for its certificate: {failure}"
    );
    let log = server.log();
    assert!(
        !log.contains(secret),
        "the webhook path leaked into the log:\n{log}"
    );
    // The failing webhook held nothing up: the alert is raised and reported.
    let health = server.ctl(&["health"]);
    assert_eq!(health.status.code(), Some(1), "{}", text(&health.stdout));
    assert!(text(&health.stdout).contains("adce.dispatcher"));
    // The handshake was refused, so no request ever reached the receiver.
    assert_eq!(read_or_empty(&received), "", "the receiver got a request");
}
