//! Confinement and limits of the agent gateway, driven by a hand-made agent
//! (a raw `AgentGateway` client) against the real `adce-server`: uploads only
//! from the lease holder and only of the lease's expected keys, keys that
//! would leave the lake refused, results and log lines for leases an agent
//! does not hold dropped, a message above the size limit and a message flood
//! each cutting only the offending agent off (its task follows the lost-agent
//! path while a real agent keeps working), and `server.max_agents`.

use std::time::{Duration, Instant};

use adce_proto::v1 as pb;
use adce_proto::v1::agent_message::Kind as In;
use adce_tests::raw_agent::{self, CLOSE_TIMEOUT, MESSAGE_TIMEOUT, RawAgent};
use adce_tests::{
    AgentProc, ServerProc, TestDir, all_tasks, base_config, ctl_json, files_under, free_addr,
    log_entries, state_of, task_id, wait_until,
};
use serde_json::Value;
use tonic::Code;
use tonic::transport::Channel;

/// How long work may take to finish after the hostile part.
const DONE_TIMEOUT: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(200);
/// The flood: at most this many messages, for at most this long.
const FLOOD_MESSAGES: usize = 100_000;
const FLOOD_FOR: Duration = Duration::from_secs(10);
/// One log line of 100 MB.
const HUGE_LINE_BYTES: usize = 100 * 1024 * 1024;

/// A config with one task per item; its scraper waits while `hold` exists
/// next to the config, then writes its expected keys. `server` lines are
/// added to the `server:` section.
fn config(listen: std::net::SocketAddr, server: &str, items: &[&str]) -> String {
    let items: Vec<String> = items.iter().map(|i| format!("\"{i}\"")).collect();
    format!(
        "{base}scrapers:
  held:
    command: [\"{{config_dir}}/scrapers/hold.sh\"]
    env:
      HOLD: \"{{config_dir}}/hold\"
    timeout: 2m
    retry: {{max_attempts: 5, backoff: 200ms}}
sources:
  - name: feed
    scraper: held
    partitions:
      values: {{var: item, values: [{items}]}}
    objects: [\"feed/{{item}}.json\"]
",
        base =
            base_config(listen).replace("  lease_ttl: 3s\n", &format!("  lease_ttl: 3s\n{server}")),
        items = items.join(", ")
    )
}

/// The connected agents' ids.
fn connected(url: &str) -> Vec<String> {
    let mut ids: Vec<String> = match ctl_json(url, &["agents"]) {
        Value::Array(agents) => agents
            .iter()
            .filter(|a| a["connected"].as_bool().unwrap_or(true))
            .filter_map(|a| a["id"].as_str().map(str::to_owned))
            .collect(),
        other => panic!("adcectl agents --json did not print an array: {other}"),
    };
    ids.sort();
    ids
}

/// Messages of the server's log entries.
fn messages(url: &str) -> Vec<String> {
    log_entries(url, 100_000, &[])
        .iter()
        .filter_map(|e| e["message"].as_str().map(str::to_owned))
        .collect()
}

/// Waits until `n` tasks exist, all leased.
fn wait_leased(url: &str, n: usize) {
    wait_until("the tasks leased", MESSAGE_TIMEOUT, POLL, || {
        let tasks = all_tasks(url, &[]);
        let leased = tasks.iter().filter(|t| state_of(t) == "leased").count();
        if tasks.len() == n && leased == n {
            Ok(())
        } else {
            Err(tasks)
        }
    });
}

#[test]
fn uploads_only_from_the_holder_and_only_its_expected_keys() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let path = dir.write_config("adce.yaml", &config(listen, "", &["1", "2"]));
    let server = ServerProc::start(&path, listen);
    let url = server.url();
    let rt = raw_agent::runtime();
    let mut x = rt.block_on(RawAgent::connect(&url, "raw-x", 1)).unwrap();
    let mut y = rt.block_on(RawAgent::connect(&url, "raw-y", 1)).unwrap();
    let (ax, ay) = (rt.block_on(x.assign()), rt.block_on(y.assign()));
    let (kx, ky) = (ax.expected_keys[0].clone(), ay.expected_keys[0].clone());
    let (lx, ly) = (ax.lease_id.clone(), ay.lease_id.clone());
    let lake = dir.join("lake");

    // (a) A key of another task, under the agent's own live lease.
    let err = rt.block_on(x.upload(&lx, "raw-x", &ky, b"{}")).unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("not an expected object"), "{err:?}");
    // (b) Keys that leave the lake or are not normalized.
    for key in [
        "../escape",
        "/abs",
        "a\\b",
        "feed/\u{1b}1.json",
        "feed//1.json",
    ] {
        let err = rt.block_on(x.upload(&lx, "raw-x", key, b"{}")).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{key:?}: {err:?}");
    }
    // (c) The right key and lease from an agent that does not hold it, and
    // the holder's lease claimed by another agent id.
    let err = rt.block_on(y.upload(&lx, "raw-y", &kx, b"{}")).unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(
        err.message(),
        format!("lease {lx} is not held by agent raw-y")
    );
    let err = rt.block_on(x.upload(&ly, "raw-x", &ky, b"{}")).unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = rt
        .block_on(x.upload(&lx, "someone-else", &kx, b"{}"))
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    assert_eq!(
        files_under(&lake),
        Vec::<String>::new(),
        "nothing reached the lake"
    );
    assert!(!dir.join("escape").exists() && !dir.join("abs").exists());
    let refused = messages(&url);
    assert!(
        !refused.iter().any(|m| m.starts_with("uploaded")),
        "{refused:?}"
    );

    // The holder's own key under its lease is accepted: the refusals above
    // were the rules, not a broken upload path.
    let reply = rt.block_on(x.upload(&lx, "raw-x", &kx, b"{}")).unwrap();
    assert_eq!(reply.size, 2);
    assert_eq!(files_under(&lake), vec![kx.clone()]);
}

#[test]
fn results_and_log_lines_for_a_lease_not_held_are_dropped() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let path = dir.write_config("adce.yaml", &config(listen, "", &["1", "2"]));
    let server = ServerProc::start(&path, listen);
    let url = server.url();
    let rt = raw_agent::runtime();
    let mut x = rt.block_on(RawAgent::connect(&url, "raw-x", 1)).unwrap();
    let mut y = rt.block_on(RawAgent::connect(&url, "raw-y", 1)).unwrap();
    let (ax, ay) = (rt.block_on(x.assign()), rt.block_on(y.assign()));
    wait_leased(&url, 2);

    // y writes into x's live lease: a log line and a successful result.
    let line = |lease: &str, text: &str| {
        In::LogLines(pb::LogLines {
            lease_id: lease.to_string(),
            lines: vec![pb::LogLine {
                stream: pb::OutputStream::Stdout as i32,
                text: text.to_string(),
                unix_ms: 0,
            }],
        })
    };
    assert!(rt.block_on(y.send(line(&ax.lease_id, "forged-line-for-x"))));
    assert!(rt.block_on(y.send(In::Result(pb::TaskResult {
        lease_id: ax.lease_id.clone(),
        outcome: pb::Outcome::Exited as i32,
        exit_code: 0,
        message: "forged".into(),
        ..Default::default()
    }))));
    // Then a line of its own lease: once that one is stored, the forged one
    // (earlier on the same stream) was handled.
    assert!(rt.block_on(y.send(line(&ay.lease_id, "own-line-of-y"))));
    let logged = wait_until(
        "y's own line and the refused result",
        MESSAGE_TIMEOUT,
        POLL,
        || {
            let messages = messages(&url);
            let own = messages.iter().any(|m| m == "own-line-of-y");
            let refused = messages
                .iter()
                .any(|m| m.starts_with(&format!("result for lease {} refused", ax.lease_id)));
            if own && refused {
                Ok(messages)
            } else {
                Err(messages)
            }
        },
    );
    assert!(
        !logged.iter().any(|m| m.contains("forged-line-for-x")),
        "a line for a lease y does not hold was stored: {logged:?}"
    );
    // x's task is still leased to x: the forged result changed nothing.
    let tasks = all_tasks(&url, &[]);
    let x_task = tasks
        .iter()
        .find(|t| task_id(t) == ax.task_id.to_string())
        .unwrap_or_else(|| panic!("task {} missing: {tasks:?}", ax.task_id));
    assert_eq!(state_of(x_task), "leased", "{x_task:#}");
    assert_eq!(x_task["attempts"], 1, "{x_task:#}");
    // The holder's own line is stored (the rule, not a broken log path).
    assert!(rt.block_on(x.send(line(&ax.lease_id, "own-line-of-x"))));
    wait_until("x's own line", MESSAGE_TIMEOUT, POLL, || {
        let messages = messages(&url);
        if messages.iter().any(|m| m == "own-line-of-x") {
            Ok(())
        } else {
            Err(messages)
        }
    });
}

/// A server with two tasks, a hand-made agent holding one and a real agent
/// running the other (held by the `hold` file); `attack` misbehaves on the
/// hand-made agent's stream. Then the hand-made agent must be cut off with
/// one of `codes` and an error naming it, the real agent must stay
/// connected, and both tasks must end done: the real one's, and the
/// hand-made one's after its lease was lost.
fn only_the_offender_is_cut_off(
    attack: impl FnOnce(&tokio::runtime::Runtime, &RawAgent, &pb::Assign),
    codes: &[Code],
) {
    let dir = TestDir::new();
    dir.install_scrapers();
    let hold = dir.write("hold", "");
    let listen = free_addr();
    let path = dir.write_config("adce.yaml", &config(listen, "", &["1", "2"]));
    let server = ServerProc::start(&path, listen);
    let url = server.url();
    let rt = raw_agent::runtime();
    let mut raw = rt.block_on(RawAgent::connect(&url, "raw", 1)).unwrap();
    let assign = rt.block_on(raw.assign());
    let _good = AgentProc::start(&url, "good", 1, &[], dir.path());
    wait_leased(&url, 2);

    attack(&rt, &raw, &assign);
    let status = rt.block_on(raw.closed());
    assert!(
        codes.contains(&status.code()),
        "expected one of {codes:?}, got {status:?}"
    );
    assert_eq!(connected(&url), vec!["good".to_string()]);
    let cut = log_entries(&url, 100_000, &[]).into_iter().find(|e| {
        e["level"] == "error"
            && e["agent_id"] == "raw"
            && e["message"].as_str().is_some_and(|m| m.contains("cut off"))
    });
    assert!(
        cut.is_some(),
        "no error event naming the agent: {:?}",
        messages(&url)
    );

    // The real agent finishes its task, then the lost lease's task too.
    if let Err(e) = std::fs::remove_file(&hold) {
        panic!("cannot remove {}: {e}", hold.display());
    }
    wait_until("both tasks done", DONE_TIMEOUT, POLL, || {
        let tasks = all_tasks(&url, &[]);
        let done = tasks.iter().filter(|t| state_of(t) == "done").count();
        if tasks.len() == 2 && done == 2 {
            Ok(())
        } else {
            Err(tasks)
        }
    });
    let detail = ctl_json(&url, &["task", &assign.task_id.to_string()]);
    let attempts = detail["attempts"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        attempts.first().map(|a| &a["agent_id"]),
        Some(&Value::from("raw")),
        "{detail:#}"
    );
    assert_eq!(
        attempts.first().map(|a| &a["outcome"]),
        Some(&Value::from("lost")),
        "{detail:#}"
    );
    assert_eq!(
        attempts.last().map(|a| &a["agent_id"]),
        Some(&Value::from("good")),
        "{detail:#}"
    );
    assert!(
        dir.join(format!("lake/{}", assign.expected_keys[0]))
            .is_file()
    );
}

#[test]
fn a_100mb_log_line_ends_only_the_senders_stream() {
    only_the_offender_is_cut_off(
        |rt, raw, assign| {
            let huge = In::LogLines(pb::LogLines {
                lease_id: assign.lease_id.clone(),
                lines: vec![pb::LogLine {
                    stream: pb::OutputStream::Stdout as i32,
                    text: "x".repeat(HUGE_LINE_BYTES),
                    unix_ms: 0,
                }],
            });
            // The send may fail once the server has closed the stream.
            let _ = rt.block_on(raw.send(huge));
        },
        &[Code::ResourceExhausted],
    );
}

#[test]
fn a_flooding_agent_is_cut_off_and_the_others_keep_working() {
    only_the_offender_is_cut_off(
        |rt, raw, assign| {
            let beat = In::Heartbeat(pb::Heartbeat {
                running_leases: vec![assign.lease_id.clone()],
            });
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..FLOOD_MESSAGES {
                    if started.elapsed() > FLOOD_FOR || !raw.send(beat.clone()).await {
                        break;
                    }
                }
            });
        },
        &[Code::ResourceExhausted],
    );
}

#[test]
fn max_agents_refuses_the_next_new_agent() {
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let path = dir.write_config("adce.yaml", &config(listen, "  max_agents: 2\n", &["1"]));
    let server = ServerProc::start(&path, listen);
    let url = server.url();
    let rt = raw_agent::runtime();
    let a = rt.block_on(RawAgent::connect(&url, "raw-a", 1)).unwrap();
    let _b = rt.block_on(RawAgent::connect(&url, "raw-b", 1)).unwrap();
    let refused = rt.block_on(RawAgent::connect(&url, "raw-c", 1));
    let err = refused
        .err()
        .unwrap_or_else(|| panic!("a third agent was admitted"));
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("max_agents"), "{err:?}");
    // A second process under a live agent's id is refused, not swapped in.
    let duplicate = rt.block_on(RawAgent::connect(&url, "raw-b", 1));
    let err = duplicate
        .err()
        .unwrap_or_else(|| panic!("a duplicate of a live agent id was admitted"));
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    // An agent that leaves frees its place.
    drop(a);
    let _a_again = wait_until("raw-a admitted again", CLOSE_TIMEOUT, POLL, || {
        rt.block_on(RawAgent::connect(&url, "raw-a", 1))
            .map_err(|status| status.to_string())
    });
    assert_eq!(
        connected(&url),
        vec!["raw-a".to_string(), "raw-b".to_string()]
    );
    let refusal = messages(&url);
    assert!(
        refusal.iter().any(|m| m.starts_with("agent refused")),
        "{refusal:?}"
    );
}

/// `server.max_concurrent_streams` bounds the streams of one connection: with
/// a limit of 2, two open `Logs --follow` streams leave a third call on the
/// same connection waiting, while a fresh connection is served at once, and
/// the waiting call goes through when a stream ends.
#[test]
fn one_connection_gets_at_most_max_concurrent_streams() {
    const STUCK_FOR: Duration = Duration::from_secs(2);
    let dir = TestDir::new();
    dir.install_scrapers();
    let listen = free_addr();
    let path = dir.write_config(
        "adce.yaml",
        &config(listen, "  max_concurrent_streams: 2\n", &["x1"]),
    );
    let server = ServerProc::start(&path, listen);
    let url = server.url();
    raw_agent::runtime().block_on(async {
        let connect = || async {
            let channel = Channel::from_shared(url.clone())
                .unwrap_or_else(|e| panic!("bad url: {e}"))
                .connect()
                .await
                .unwrap_or_else(|e| panic!("cannot connect: {e}"));
            pb::control_client::ControlClient::new(channel)
        };
        let follow = pb::LogsRequest {
            tail: 1,
            follow: true,
            ..pb::LogsRequest::default()
        };
        let mut shared = connect().await;
        let first = shared
            .logs(follow.clone())
            .await
            .unwrap_or_else(|s| panic!("first stream: {s}"))
            .into_inner();
        let second = shared
            .logs(follow.clone())
            .await
            .unwrap_or_else(|s| panic!("second stream: {s}"))
            .into_inner();
        let mut third_call = shared.clone();
        let third = tokio::spawn(async move { third_call.status(pb::StatusRequest {}).await });
        tokio::time::sleep(STUCK_FOR).await;
        assert!(
            !third.is_finished(),
            "a third stream on a connection limited to two was served at once"
        );
        // Another connection is not held up by the first one's streams.
        let other = tokio::time::timeout(
            MESSAGE_TIMEOUT,
            connect().await.status(pb::StatusRequest {}),
        )
        .await
        .unwrap_or_else(|_| panic!("a fresh connection was not served"));
        assert!(other.is_ok(), "fresh connection: {other:?}");
        // A stream ends: the waiting call goes through.
        drop(first);
        let answered = tokio::time::timeout(MESSAGE_TIMEOUT, third)
            .await
            .unwrap_or_else(|_| panic!("the waiting call never went through"));
        assert!(
            matches!(answered, Ok(Ok(_))),
            "the waiting call failed: {answered:?}"
        );
        drop(second);
    });
}
