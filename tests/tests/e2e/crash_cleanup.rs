//! Cleaning up after a crash: a server SIGKILLed in the middle of an object
//! write leaves the write's leftovers behind (the local lake's temp file, the
//! S3 lake's incomplete multipart upload), and the restarted server, with a
//! short `server.max_upload_time` and `lake.s3.abort_incomplete_after`,
//! removes them once they are that old: at a listing (local) or at its sweep
//! (S3). The restarted server also ends an upload that stalls past
//! `max_upload_time` with DEADLINE_EXCEEDED, leaving nothing behind.
//!
//! The writes come from a hand-made agent that announces a large object,
//! streams part of it and then sends nothing more, so the server is mid-write
//! when it is killed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use adce_tests::raw_agent::{self, RawAgent};
use adce_tests::{
    MotoServer, ServerProc, TestDir, base_config, ctl, files_under, free_addr, s3_config, text,
    wait_until,
};
use tonic::Code;

const MIB: usize = 1024 * 1024;
/// The size the uploads announce.
const ANNOUNCED: u64 = 8 * MIB as u64;
/// What they send before they stop: past the S3 lake's multipart threshold
/// and part size (both 5 MiB here), so a part is uploaded and the upload
/// really is a multipart one.
const SENT: usize = 6 * MIB;
/// The size of one data message.
const CHUNK: usize = 256 * 1024;
/// The restarted server's `server.max_upload_time`.
const MAX_UPLOAD_TIME: &str = "2s";
/// The restarted server's `lake.s3.abort_incomplete_after` (longer than
/// `MAX_UPLOAD_TIME`, as validation requires).
const ABORT_INCOMPLETE_AFTER: &str = "3s";
/// How old the interrupted upload must be before the restart so that the
/// restarted server's sweep sees it as stale on any S3's clock.
const ABORT_AGE: Duration = Duration::from_secs(3);
/// How long the server may take to be mid-write after the upload began.
const MID_WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the cleanup may take after the restart (the local lake's stale
/// age is twice `MAX_UPLOAD_TIME` after the last write).
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(250);
const BUCKET: &str = "crash-lake";
const PREFIX: &str = "raw";
/// The one expected object.
const KEY: &str = "feed/big.json";

/// The lake a scenario runs against.
enum LakeKind {
    Local,
    S3(MotoServer),
}

impl LakeKind {
    /// The server config: one task whose object is [`KEY`] (its scraper is
    /// never run: the hand-made agent takes the lease), with the restart's
    /// short limits when `short` is set.
    fn config(&self, listen: SocketAddr, short: bool) -> String {
        let head = match self {
            LakeKind::Local => base_config(listen),
            LakeKind::S3(moto) => {
                let mut lake = moto.lake_yaml(BUCKET, PREFIX, None);
                lake.push_str("    multipart_threshold: 5MiB\n    multipart_part_size: 5MiB\n");
                if short {
                    lake.push_str(&format!(
                        "    abort_incomplete_after: {ABORT_INCOMPLETE_AFTER}\n"
                    ));
                }
                s3_config(listen, &lake)
            }
        };
        let head = if short {
            head.replace(
                "  lease_ttl: 3s\n",
                &format!("  lease_ttl: 3s\n  max_upload_time: {MAX_UPLOAD_TIME}\n"),
            )
        } else {
            head
        };
        format!(
            "{head}scrapers:
  held:
    command: [\"{{config_dir}}/scrapers/hold.sh\"]
    env:
      HOLD: \"{{config_dir}}/hold\"
sources:
  - name: feed
    scraper: held
    partitions:
      values: {{var: item, values: [big]}}
    objects: [\"feed/{{item}}.json\"]
"
        )
    }

    /// What an interrupted write of [`KEY`] left in the lake (temp files in
    /// the key's directory, or open multipart uploads), with sizes where
    /// known.
    fn leftovers(&self, lake_dir: &Path) -> Vec<(String, u64)> {
        match self {
            LakeKind::Local => temp_files(&lake_dir.join("feed"))
                .into_iter()
                .map(|path| {
                    let size = std::fs::metadata(&path).map_or(0, |m| m.len());
                    (path.display().to_string(), size)
                })
                .collect(),
            LakeKind::S3(moto) => moto
                .multipart_uploads(BUCKET)
                .into_iter()
                .map(|key| (key, 0))
                .collect(),
        }
    }

    /// Starts the server on `config` (with moto's credentials for S3).
    fn start_server(&self, config: &Path, listen: SocketAddr) -> ServerProc {
        match self {
            LakeKind::Local => ServerProc::start(config, listen),
            LakeKind::S3(moto) => ServerProc::start_with_env(config, listen, moto.aws_env()),
        }
    }

    /// Whether the object [`KEY`] exists.
    fn has_object(&self, lake_dir: &Path) -> bool {
        match self {
            LakeKind::Local => lake_dir.join(KEY).exists(),
            LakeKind::S3(moto) => !moto.list(BUCKET, PREFIX).is_empty(),
        }
    }
}

/// The lake's temp files in `dir`.
fn temp_files(dir: &Path) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|name| name.starts_with(".adce-tmp."))
        .map(|name| dir.join(name))
        .collect()
}

/// Connects a hand-made agent as `id`, takes the task's lease, announces
/// [`ANNOUNCED`] bytes of [`KEY`] and sends [`SENT`] of them; the upload
/// stays open.
fn start_partial_upload(
    rt: &tokio::runtime::Runtime,
    url: &str,
    id: &str,
) -> (RawAgent, adce_tests::raw_agent::OpenUpload) {
    rt.block_on(async {
        let mut agent = RawAgent::connect(url, id, 1)
            .await
            .unwrap_or_else(|status| panic!("{id} was refused: {status:?}"));
        let assign = agent.assign().await;
        assert_eq!(assign.expected_keys, [KEY]);
        let upload = agent
            .start_upload(&assign.lease_id, id, KEY, ANNOUNCED)
            .await;
        let data = vec![b'x'; SENT];
        for piece in data.chunks(CHUNK) {
            // A refusal shows in the upload's answer.
            if !upload.send(piece.to_vec()).await {
                break;
            }
        }
        (agent, upload)
    })
}

/// The scenario: a write interrupted by SIGKILL, its leftovers, the restart,
/// their cleanup, then an upload that stalls past the new `max_upload_time`.
fn killed_mid_write_then_cleaned_up(kind: &LakeKind, dir: &TestDir) {
    let listen = free_addr();
    let lake_dir = dir.join("lake");
    let rt = raw_agent::runtime();
    let path = dir.write_config("adce.yaml", &kind.config(listen, false));
    let mut first = kind.start_server(&path, listen);
    let url = first.url();

    let (agent, upload) = start_partial_upload(&rt, &url, "raw-1");
    let mid_write = Instant::now();
    let leftovers = wait_until("the server mid-write", MID_WRITE_TIMEOUT, POLL, || {
        let found = kind.leftovers(&lake_dir);
        let written = match kind {
            LakeKind::Local => found.iter().any(|(_, size)| *size == SENT as u64),
            LakeKind::S3(_) => found
                .iter()
                .any(|(key, _)| *key == format!("{PREFIX}/{KEY}")),
        };
        if written { Ok(found) } else { Err(found) }
    });
    first.kill();
    drop((upload, agent));
    assert!(!first.proc().is_running());
    assert_eq!(
        kind.leftovers(&lake_dir),
        leftovers,
        "a killed server cannot clean up"
    );
    assert!(
        !kind.has_object(&lake_dir),
        "a partial object became visible"
    );

    // The restarted server sees the leftovers once they are older than its
    // limits: wait that long (bounded) so that any clock agrees.
    wait_until(
        "the interrupted upload to age",
        CLEANUP_TIMEOUT,
        POLL,
        || {
            if mid_write.elapsed() > ABORT_AGE {
                Ok(())
            } else {
                Err(mid_write.elapsed())
            }
        },
    );
    let path = dir.write_config("adce.yaml", &kind.config(listen, true));
    let second = kind.start_server(&path, listen);
    wait_until(
        "the leftovers cleaned up after a reconcile",
        CLEANUP_TIMEOUT,
        POLL,
        || {
            let reconciled = ctl(&url, &["reconcile"]);
            let left = kind.leftovers(&lake_dir);
            if reconciled.status.success() && left.is_empty() {
                Ok(())
            } else {
                Err((text(&reconciled.stderr), left))
            }
        },
    );
    let logged = second.log();
    let removal = match kind {
        LakeKind::Local => "removed the temp file of an interrupted write",
        LakeKind::S3(_) => "aborted an incomplete multipart upload left by an interrupted write",
    };
    assert!(logged.contains(removal), "no `{removal}` in the server log");

    // An upload that stalls is ended at `max_upload_time` and leaves nothing.
    let (_agent, upload) = start_partial_upload(&rt, &url, "raw-2");
    let stalled = Instant::now();
    let refused = rt.block_on(upload.stall());
    let status = refused
        .err()
        .unwrap_or_else(|| panic!("a stalled upload was accepted"));
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(
        status.message(),
        format!("upload of {KEY} took longer than server.max_upload_time ({MAX_UPLOAD_TIME})")
    );
    assert!(
        stalled.elapsed() < CLEANUP_TIMEOUT,
        "the stalled upload was ended late"
    );
    assert_eq!(
        kind.leftovers(&lake_dir),
        Vec::new(),
        "the abort left something"
    );
    assert!(!kind.has_object(&lake_dir));
    if let LakeKind::S3(_) = kind {
        // It was a multipart upload when it was aborted: both servers
        // started one (the log file is shared by the two runs).
        let started = second.log().matches("multipart upload started").count();
        assert_eq!(started, 2, "multipart uploads started");
    }
}

/// Both lakes, one after the other: the local lake's temp file is removed
/// by a listing, the S3 lake's incomplete multipart upload is aborted.
#[test]
fn leftovers_of_a_write_killed_by_sigkill_are_cleaned_up() {
    let local = TestDir::new();
    local.install_scrapers();
    killed_mid_write_then_cleaned_up(&LakeKind::Local, &local);

    let s3 = TestDir::new();
    s3.install_scrapers();
    let moto = MotoServer::start();
    moto.create_bucket(BUCKET);
    killed_mid_write_then_cleaned_up(&LakeKind::S3(moto), &s3);
}
