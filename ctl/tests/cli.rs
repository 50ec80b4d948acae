//! Runs the built `adcectl` binary for what needs no server: every
//! subcommand's help, usage errors (exit 2) and an unreachable server
//! (exit 1 with a clear message).

use std::net::TcpListener;
use std::process::{Command, Output};

/// Runs adcectl with `args` and no `ADCE_SERVER` from the caller's environment.
fn adcectl(args: &[&str]) -> Output {
    match Command::new(env!("CARGO_BIN_EXE_adcectl"))
        .args(args)
        .env_remove("ADCE_SERVER")
        .output()
    {
        Ok(output) => output,
        Err(e) => panic!("cannot run adcectl {args:?}: {e}"),
    }
}

/// A loopback address where nothing listens: a port the kernel just handed
/// out, closed again.
fn closed_address() -> String {
    let listener = match TcpListener::bind("127.0.0.1:0") {
        Ok(listener) => listener,
        Err(e) => panic!("cannot bind a loopback port: {e}"),
    };
    let address = match listener.local_addr() {
        Ok(address) => address,
        Err(e) => panic!("no local address: {e}"),
    };
    drop(listener);
    address.to_string()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn every_subcommand_documents_its_flags() {
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--help"],
            &[
                "--server",
                "--json",
                "--timeout",
                "ADCE_SERVER",
                "status",
                "tasks",
                "task",
                "agents",
                "coverage",
                "health",
                "logs",
                "reconcile",
                "pause",
                "resume",
            ],
        ),
        (&["status", "--help"], &["--server", "--json", "--timeout"]),
        (
            &["tasks", "--help"],
            &[
                "--state",
                "--priority",
                "--source",
                "--limit",
                "--all",
                "pending",
                "unavailable",
                "critical",
                "[default: 50]",
            ],
        ),
        (&["task", "--help"], &["<ID>", "attempts"]),
        (&["agents", "--help"], &["--json"]),
        (&["coverage", "--help"], &["--source"]),
        (
            &["health", "--help"],
            &["[SERVICE]", "SERVING", "adce.store"],
        ),
        (
            &["logs", "--help"],
            &[
                "--tail",
                "--follow",
                "-f",
                "--since",
                "--task",
                "--agent",
                "--source",
                "--level",
                "warn",
                "[default: 100]",
            ],
        ),
        (&["reconcile", "--help"], &["stderr", "stdout"]),
        (&["pause", "--help"], &["loop state"]),
        (&["resume", "--help"], &["loop state"]),
    ];
    for (args, needles) in cases {
        let output = adcectl(args);
        assert!(output.status.success(), "{args:?} failed: {output:?}");
        let help = text(&output.stdout);
        for needle in *needles {
            assert!(
                help.contains(needle),
                "`adcectl {}` does not mention {needle}:\n{help}",
                args.join(" ")
            );
        }
    }
}

#[test]
fn every_flag_in_help_has_a_description() {
    // A flag line without text after it would mean a missing doc comment.
    for sub in [
        "status",
        "tasks",
        "task",
        "agents",
        "coverage",
        "health",
        "logs",
        "reconcile",
        "pause",
        "resume",
    ] {
        let output = adcectl(&[sub, "-h"]);
        let help = text(&output.stdout);
        for line in help.lines().filter(|l| l.trim_start().starts_with('-')) {
            let flag_and_doc: Vec<&str> = line.trim().splitn(2, "  ").collect();
            assert!(
                flag_and_doc.len() == 2 && !flag_and_doc[1].trim().is_empty(),
                "undocumented flag in `adcectl {sub} -h`: {line:?}"
            );
        }
    }
}

#[test]
fn usage_errors_exit_2_and_list_the_choices() {
    let output = adcectl(&["tasks", "--priority", "urgent"]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = text(&output.stderr);
    assert!(stderr.contains("critical, high, medium, low"), "{stderr}");
    assert!(output.stdout.is_empty());

    let output = adcectl(&["--timeout", "soon", "status"]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(text(&output.stderr).contains("500ms"), "{output:?}");

    let output = adcectl(&["--server", "ftp://x:1", "status"]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");

    let output = adcectl(&["frobnicate"]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
}

#[test]
fn an_unreachable_server_exits_1_with_a_clear_message() {
    let address = closed_address();
    let url = format!("http://{address}");
    // Both spellings of the address, and every command that talks to the server.
    let commands: &[&[&str]] = &[
        &["status"],
        &["--json", "status"],
        &["tasks"],
        &["task", "1"],
        &["agents"],
        &["coverage"],
        &["health"],
        &["logs"],
        &["logs", "--follow"],
        &["reconcile"],
        &["pause"],
        &["resume"],
    ];
    for (i, command) in commands.iter().enumerate() {
        let server = if i % 2 == 0 {
            address.as_str()
        } else {
            url.as_str()
        };
        let mut args = vec!["--server", server, "--timeout", "2s"];
        args.extend_from_slice(command);
        let output = adcectl(&args);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {output:?}");
        let stderr = text(&output.stderr);
        let expected = format!("adcectl: cannot reach server at {url}: ");
        assert!(
            stderr.starts_with(&expected),
            "{args:?}: stderr {stderr:?} does not start with {expected:?}"
        );
        assert!(
            stderr.contains("refused"),
            "{args:?}: the cause is missing: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(output.stdout.is_empty(), "{args:?}: {output:?}");
    }
}

#[test]
fn the_server_can_come_from_the_environment() {
    let address = closed_address();
    let output = match Command::new(env!("CARGO_BIN_EXE_adcectl"))
        .args(["--timeout", "2s", "status"])
        .env("ADCE_SERVER", &address)
        .output()
    {
        Ok(output) => output,
        Err(e) => panic!("cannot run adcectl: {e}"),
    };
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot reach server at http://{address}")),
        "{stderr}"
    );
}
