//! Dev mode: `adce-server --dev` fills the embedded demo lake by itself,
//! refills a deleted object after `adcectl reconcile`, and exits 0 on SIGTERM.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use adce_tests::{ServerProc, TestDir, count, files_under, free_addr, lake_complete, wait_until};

/// How long the demo lake may take to fill.
const FILL_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a deleted object may take to come back.
const REFILL_TIMEOUT: Duration = Duration::from_secs(60);
/// Interval between polls.
const POLL: Duration = Duration::from_millis(500);

#[test]
fn dev_mode_fills_demo_lake() {
    let dir = TestDir::new();
    let data_dir = dir.join("dev");
    let listen = free_addr();
    let mut server = ServerProc::start_dev(&data_dir, listen, dir.path());

    let status = wait_until("the demo lake at 100%", FILL_TIMEOUT, POLL, || {
        let status = server.status();
        if lake_complete(&status) {
            Ok(status)
        } else {
            Err(serde_json::json!({"coverage": status["coverage"], "tasks": status["tasks"]}))
        }
    });
    let expected = count(&status, "/coverage/expected");
    assert!(expected >= 100, "the demo catalog is tiny: {status:#}");
    assert_eq!(count(&status, "/tasks/dead"), 0, "{status:#}");

    // The status names the lake as `local:<root>`; it lives in the data dir.
    let lake = status["lake"]
        .as_str()
        .and_then(|l| l.strip_prefix("local:"))
        .map(PathBuf::from)
        .unwrap_or_else(|| data_dir.join("lake"));
    assert!(
        lake.starts_with(&data_dir),
        "lake {} outside the data dir",
        lake.display()
    );
    let files = files_under(&lake);
    assert_eq!(files.len() as u64, expected, "files in {}", lake.display());

    let victim = lake.join(&files[files.len() / 2]);
    let before =
        fs::read(&victim).unwrap_or_else(|e| panic!("cannot read {}: {e}", victim.display()));
    assert!(!before.is_empty());
    fs::remove_file(&victim).unwrap_or_else(|e| panic!("cannot delete {}: {e}", victim.display()));

    let summary = server.ctl_json(&["reconcile"]);
    assert_eq!(
        count(&summary, "/expected_objects"),
        expected,
        "{summary:#}"
    );
    wait_until(
        "the deleted object back in the lake",
        REFILL_TIMEOUT,
        POLL,
        || match fs::metadata(&victim) {
            Ok(meta) if meta.len() > 0 => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );

    // Dev mode runs without auth, and says so at start.
    assert!(
        server.log().contains("no auth (dev mode)"),
        "the dev server did not say it runs without auth"
    );
    let exit = server.terminate();
    assert_eq!(
        exit.code(),
        Some(0),
        "adce-server --dev after SIGTERM: {exit}"
    );
}

/// With `--config` naming tokens, dev mode's in-process agent uses the
/// config's agent token, and adcectl needs one too.
#[test]
fn dev_mode_with_tokens_gives_its_agent_the_agent_token() {
    const ADMIN: &str = "dev-admin-token-0123456789";
    let dir = TestDir::new();
    dir.install_scrapers();
    let data_dir = dir.join("dev");
    let listen = free_addr();
    let config = dir.write_config(
        "adce.yaml",
        &format!(
            "{}auth:
  tokens:
    - {{role: admin, token: {ADMIN}}}
    - {{role: agent, token: dev-agent-token-0123456789}}
scrapers:
  writer:
    command: [\"{{config_dir}}/scrapers/write_expected.sh\"]
sources:
  - name: feed
    scraper: writer
    partitions:
      values: {{var: item, values: [\"x1\", \"x2\"]}}
    objects: [\"feed/{{item}}.json\"]
",
            adce_tests::base_config(listen)
        ),
    );
    let args: Vec<std::ffi::OsString> = vec![
        "--dev".into(),
        "--data-dir".into(),
        data_dir.clone().into_os_string(),
        "--config".into(),
        config.into_os_string(),
        "--listen".into(),
        listen.to_string().into(),
    ];
    let mut server = ServerProc::start_with_args(&args, listen, dir.path());
    assert!(
        !server.ctl(&["status"]).status.success(),
        "status without a token"
    );
    wait_until("both objects in the dev lake", FILL_TIMEOUT, POLL, || {
        let files = files_under(&data_dir.join("lake"));
        if files.len() == 2 { Ok(()) } else { Err(files) }
    });
    assert!(server.ctl(&["--token", ADMIN, "status"]).status.success());
    // A reload keeps dev mode's own state and lake: nothing needs a restart.
    let reloaded = server.ctl_json(&["--token", ADMIN, "reload"]);
    assert_eq!(
        reloaded["needs_restart"],
        serde_json::json!([]),
        "{reloaded:#}"
    );
    assert!(!server.log().contains("no auth (dev mode)"));
    assert_eq!(server.terminate().code(), Some(0));
}
