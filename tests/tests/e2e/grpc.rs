//! The standard gRPC tooling works against the server: reflection for
//! `grpcurl list` and health checks from grpcurl and from Python's
//! grpcio-health-checking client (both from the venv of `scripts/test.sh`).

use std::process::Command;

use adce_tests::{
    COMMAND_TIMEOUT, ServerProc, TestDir, base_config, free_addr, run_bounded, text, venv_tool,
};

/// Asks the health service with the Python client; prints the status name.
const PY_HEALTH: &str = r#"
import sys
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

with grpc.insecure_channel(sys.argv[1]) as channel:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in sys.argv[2:]:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        print(repr(service), health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
"#;

#[test]
fn reflection_and_health() {
    let grpcurl = venv_tool("grpcurl");
    let python = venv_tool("python");
    let dir = TestDir::new();
    let listen = free_addr();
    let config = format!(
        "{base}scrapers:
  noop:
    command: [\"/bin/true\"]
sources:
  - name: one
    scraper: noop
    partitions:
      values: {{var: item, values: [\"a\"]}}
    objects: [\"one/{{item}}.json\"]
",
        base = base_config(listen)
    );
    let config_path = dir.write_config("adce.yaml", &config);
    let server = ServerProc::start(&config_path, listen);
    let addr = server.addr().to_string();

    let list = run_bounded(
        Command::new(&grpcurl).args(["-plaintext", &addr, "list"]),
        COMMAND_TIMEOUT,
    );
    let services = text(&list.stdout);
    assert!(
        list.status.success(),
        "grpcurl list failed: {}",
        text(&list.stderr)
    );
    let names: Vec<&str> = services.lines().map(str::trim).collect();
    for service in [
        "adce.v1.AgentGateway",
        "adce.v1.Control",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.contains(&service),
            "grpcurl list lacks {service}:\n{services}"
        );
    }

    // Reflection describes the services fully enough to call them.
    let describe = run_bounded(
        Command::new(&grpcurl).args(["-plaintext", &addr, "describe", "adce.v1.Control"]),
        COMMAND_TIMEOUT,
    );
    let described = text(&describe.stdout);
    assert!(
        describe.status.success(),
        "grpcurl describe failed: {}",
        text(&describe.stderr)
    );
    assert!(described.contains("rpc Status"), "{described}");
    let call = run_bounded(
        Command::new(&grpcurl).args(["-plaintext", "-d", "{}", &addr, "adce.v1.Control/Status"]),
        COMMAND_TIMEOUT,
    );
    assert!(
        call.status.success(),
        "grpcurl Control/Status failed: {}",
        text(&call.stderr)
    );
    assert!(
        text(&call.stdout).trim_start().starts_with('{'),
        "{}",
        text(&call.stdout)
    );

    let check = run_bounded(
        Command::new(&grpcurl).args([
            "-plaintext",
            "-d",
            r#"{"service":""}"#,
            &addr,
            "grpc.health.v1.Health/Check",
        ]),
        COMMAND_TIMEOUT,
    );
    assert!(
        check.status.success(),
        "grpcurl Health/Check failed: {}",
        text(&check.stderr)
    );
    assert!(
        text(&check.stdout).contains("\"SERVING\""),
        "{}",
        text(&check.stdout)
    );

    let py = run_bounded(
        Command::new(&python).args(["-c", PY_HEALTH, &addr, "", "adce.v1.Control"]),
        COMMAND_TIMEOUT,
    );
    let py_out = text(&py.stdout);
    assert!(
        py.status.success(),
        "python health check failed: {}",
        text(&py.stderr)
    );
    assert!(py_out.contains("'' SERVING"), "{py_out}");
    assert!(py_out.contains("'adce.v1.Control' SERVING"), "{py_out}");
}
