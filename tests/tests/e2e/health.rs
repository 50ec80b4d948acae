//! Component health seen by a real gRPC health client (Python
//! grpcio-health-checking): `adce.dispatcher` goes NOT_SERVING while ready
//! work has no agent to run it, and back to SERVING when one connects;
//! `adcectl health` says why and exits 1 meanwhile.

use std::process::Command;
use std::time::Duration;

use adce_tests::{AgentProc, ServerProc, TestDir, base_config, free_addr, venv_tool, wait_until};

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

/// A webhook receiver: appends each POST body as one line to a file.
const PY_RECEIVER: &str = r#"
import sys, http.server
out = open(sys.argv[2], "a")
class Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        out.write(body.replace("\n", " ") + "\n")
        out.flush()
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Hook).serve_forever()
"#;

/// Kills the receiver by its pid when the test ends.
struct Receiver(std::process::Child);

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_webhook_gets_one_alert_and_one_resolution() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let hook = free_addr();
    let received = dir.path().join("hooks.txt");
    let _receiver = Receiver(
        Command::new(venv_tool("python"))
            .args(["-c", PY_RECEIVER, &hook.port().to_string()])
            .arg(&received)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the webhook receiver: {e}")),
    );
    let config = format!(
        "{base}alerts:
  webhook: \"http://{hook}/hook\"
scrapers:
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
    );
    let path = dir.write_config("adce.yaml", &config);
    let server = ServerProc::start(&path, listen);
    let hooks = || std::fs::read_to_string(&received).unwrap_or_default();
    let timeout = Duration::from_secs(30);
    let poll = Duration::from_millis(200);
    // The outage: ready work, no agent.
    wait_until("the alert posted", timeout, poll, || {
        let h = hooks();
        if h.contains("adce alert: adce.dispatcher") {
            Ok(())
        } else {
            Err(h)
        }
    });
    // The fix: an agent connects and runs the work.
    let _agent = AgentProc::start(&server.url(), "a1", 1, &[], dir.path());
    wait_until("the resolution posted", timeout, poll, || {
        let h = hooks();
        if h.contains("adce resolved: adce.dispatcher") {
            Ok(())
        } else {
            Err(h)
        }
    });
    std::thread::sleep(Duration::from_secs(3));
    let all = hooks();
    let lines: Vec<&str> = all.lines().collect();
    assert_eq!(lines.len(), 2, "{all}");
    for line in &lines {
        let body: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(body["text"].is_string(), "not Slack-shaped: {line}");
    }
}
