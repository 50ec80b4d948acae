//! The shared lake suite: every behaviour a lake backend promises is one
//! generic scenario over `&dyn Lake` (or `&dyn ObjectSource`), run against
//! the local-directory lake in a temp dir and against the S3 lake talking to a
//! real moto_server process on 127.0.0.1. The S3 tests then check what only
//! S3 can show: the prefix in the real keys, parts of a multipart upload, and
//! that no multipart upload is left open. A crashed write (a writer that is
//! neither committed, aborted nor dropped) is invisible on both, and each
//! backend cleans up its leftovers once they are old: the local lake's temp
//! file at a listing, the S3 lake's incomplete multipart upload at a sweep.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use adce_server::config;
use adce_server::lake::{
    LIST_PAGE, Lake, LakeError, LocalDir, LocalLake, ObjectMeta, ObjectSource, S3Lake, SharedLake,
    list_all, stale_temp_age,
};
use anyhow::{Context, Result, anyhow, bail, ensure};
use aws_sdk_s3::Client;
use tokio::io::AsyncReadExt;

const MIB: usize = 1024 * 1024;
/// The multipart threshold and part size of the multipart scenarios (S3's minimum part).
const PART: u64 = 5 * MIB as u64;
/// How many objects the paging scenario writes (more than two listing pages).
const MANY: usize = 2500;
/// How many writers fill the paging scenario at once.
const WRITERS: usize = 16;
/// How long moto_server may take to start answering.
const MOTO_START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a dropped writer's background abort may take to reach S3.
const DROP_ABORT_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause between two checks of a bounded wait.
const POLL: Duration = Duration::from_millis(50);

// ---------------------------------------------------------------------------
// Scenarios, shared by both backends.
// ---------------------------------------------------------------------------

/// Writes `data` to `key` in chunks of at most `chunk` bytes and commits.
async fn write(lake: &dyn Lake, key: &str, data: &[u8], chunk: usize) -> Result<ObjectMeta> {
    let mut writer = lake.put(key).await?;
    for piece in data.chunks(chunk.max(1)) {
        writer.write(piece).await?;
    }
    if data.is_empty() {
        writer.write(&[]).await?;
    }
    Ok(writer.commit().await?)
}

/// Deterministic bytes that differ at every offset (a shifted or reordered
/// part would not read back equal).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

fn keys(objects: &[ObjectMeta]) -> Vec<String> {
    let mut keys: Vec<String> = objects.iter().map(|m| m.key.clone()).collect();
    keys.sort();
    keys
}

/// Put, get, stat and list agree; keys are relative to the lake's prefix.
async fn round_trip(lake: &dyn Lake) -> Result<()> {
    let before = chrono::Utc::now().timestamp_millis();
    let meta = write(lake, "nba/schedule/20241022.json", b"{\"games\":[1]}", 4).await?;
    ensure!(
        meta.key == "nba/schedule/20241022.json",
        "commit key {}",
        meta.key
    );
    ensure!(meta.size == 13, "commit size {}", meta.size);
    write(lake, "nba/box/401584893.json", b"box", 1024).await?;
    write(lake, "empty.json", b"", 1024).await?;

    let stat = lake
        .stat("nba/schedule/20241022.json")
        .await?
        .context("stat of a written object is None")?;
    ensure!(stat.size == 13, "stat size {}", stat.size);
    // Second-resolution stores may round down: allow a second of slack.
    ensure!(
        stat.modified_ms >= before - 1000,
        "modified {} before the write began at {before}",
        stat.modified_ms
    );
    ensure!(lake.stat("nba/schedule/20241023.json").await?.is_none());
    ensure!(lake.stat("empty.json").await?.map(|m| m.size) == Some(0));

    let bytes = lake.get("nba/schedule/20241022.json", 1024).await?;
    ensure!(
        bytes.as_deref() == Some(&b"{\"games\":[1]}"[..]),
        "{bytes:?}"
    );
    ensure!(lake.get("nba/none.json", 1024).await?.is_none());
    ensure!(lake.get("empty.json", 0).await?.as_deref() == Some(&b""[..]));

    let all = list_all(lake, "").await?;
    ensure!(
        keys(&all)
            == [
                "empty.json",
                "nba/box/401584893.json",
                "nba/schedule/20241022.json"
            ],
        "listing {all:?}"
    );
    let listed = all
        .iter()
        .find(|m| m.key == "nba/box/401584893.json")
        .context("box object not listed")?;
    ensure!(listed.size == 3, "listed size {}", listed.size);
    ensure!(list_all(lake, "nope/").await?.is_empty());
    Ok(())
}

/// A listing by a partial prefix returns exactly the keys starting with it,
/// and a listing beyond one page arrives in pages of at most `LIST_PAGE`.
async fn partial_prefix_and_paging(lake: SharedLake) -> Result<()> {
    for key in [
        "nba/schedule/20241022.json",
        "nba/schedule/20241101.json",
        "nba/schedule/20231022.json",
        "nba/schedules.json",
        "nba/box/1.json",
    ] {
        write(lake.as_ref(), key, key.as_bytes(), 1024).await?;
    }
    ensure!(
        keys(&list_all(lake.as_ref(), "nba/schedule/2024").await?)
            == ["nba/schedule/20241022.json", "nba/schedule/20241101.json"]
    );
    ensure!(list_all(lake.as_ref(), "nba/schedule").await?.len() == 4);
    ensure!(list_all(lake.as_ref(), "nba/schedule/").await?.len() == 3);

    // Many small objects, written by a bounded number of concurrent writers.
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let lake = lake.clone();
        writers.spawn(async move {
            for i in (w..MANY).step_by(WRITERS) {
                write(lake.as_ref(), &format!("many/{i:05}.json"), b"{}", 1024).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = writers.join_next().await {
        done??;
    }

    let (tx, mut rx) = tokio::sync::mpsc::channel(2);
    let listing = lake.list("many/", tx);
    let collect = async {
        let mut sizes = Vec::new();
        let mut keys = Vec::new();
        while let Some(page) = rx.recv().await {
            sizes.push(page.len());
            keys.extend(page.into_iter().map(|m| m.key));
        }
        (sizes, keys)
    };
    let (sent, (sizes, mut listed)) = tokio::join!(listing, collect);
    ensure!(sent? == MANY as u64, "listing reported a different count");
    ensure!(
        sizes.iter().all(|&n| n > 0 && n <= LIST_PAGE),
        "page sizes {sizes:?}"
    );
    ensure!(
        sizes.len() >= MANY.div_ceil(LIST_PAGE),
        "{} pages for {MANY} objects",
        sizes.len()
    );
    listed.sort();
    let expected: Vec<String> = (0..MANY).map(|i| format!("many/{i:05}.json")).collect();
    ensure!(
        listed == expected,
        "the paged listing lost or repeated keys"
    );
    Ok(())
}

/// Writing a key again replaces the object whole.
async fn replace_is_whole(lake: &dyn Lake) -> Result<()> {
    write(lake, "a/b.json", b"old and rather long", 1024).await?;
    let meta = write(lake, "a/b.json", b"new", 1024).await?;
    ensure!(meta.size == 3);
    ensure!(lake.get("a/b.json", 1024).await?.as_deref() == Some(&b"new"[..]));
    ensure!(lake.stat("a/b.json").await?.map(|m| m.size) == Some(3));
    ensure!(keys(&list_all(lake, "a/").await?) == ["a/b.json"]);
    Ok(())
}

/// An aborted or dropped writer leaves the key as it was, small or past the
/// multipart threshold (`big` bytes).
async fn abort_and_drop_leave_nothing(lake: &dyn Lake, big: usize) -> Result<()> {
    write(lake, "keep.json", b"old", 1024).await?;
    let data = pattern(big, 7);
    for (key, len) in [("keep.json", 10), ("keep.json", big), ("new.json", big)] {
        let mut writer = lake.put(key).await?;
        writer.write(&data[..len]).await?;
        writer.abort().await;
    }
    for (key, len) in [("keep.json", 10), ("keep.json", big), ("dropped.json", big)] {
        let mut writer = lake.put(key).await?;
        for piece in data[..len].chunks(MIB) {
            writer.write(piece).await?;
        }
        drop(writer);
    }
    ensure!(lake.get("keep.json", 1024).await?.as_deref() == Some(&b"old"[..]));
    ensure!(lake.stat("new.json").await?.is_none());
    ensure!(lake.stat("dropped.json").await?.is_none());
    ensure!(keys(&list_all(lake, "").await?) == ["keep.json"]);
    Ok(())
}

/// The key the crash scenario's interrupted write was for.
const CRASHED_KEY: &str = "crash/partial.bin";

/// A write interrupted by a crash (`big` bytes, past the multipart threshold,
/// then neither commit, abort nor drop: as when the process is killed) is
/// invisible, and a new write of the key is whole. Its leftovers stay for
/// the caller to inspect.
async fn crashed_write_is_invisible(lake: &dyn Lake, big: usize) -> Result<()> {
    let mut writer = lake.put(CRASHED_KEY).await?;
    for piece in pattern(big, 11).chunks(MIB) {
        writer.write(piece).await?;
    }
    // A killed process runs no destructor.
    std::mem::forget(writer);
    ensure!(lake.stat(CRASHED_KEY).await?.is_none());
    ensure!(lake.get(CRASHED_KEY, big as u64).await?.is_none());
    ensure!(list_all(lake, "").await?.is_empty());
    write(lake, CRASHED_KEY, b"whole", 1024).await?;
    ensure!(lake.get(CRASHED_KEY, 1024).await?.as_deref() == Some(&b"whole"[..]));
    ensure!(keys(&list_all(lake, "").await?) == [CRASHED_KEY]);
    Ok(())
}

/// An object past the multipart threshold, written in odd-sized chunks,
/// reads back byte-identical.
async fn multipart_round_trip(lake: &dyn Lake) -> Result<()> {
    let data = pattern(12 * MIB, 42);
    let meta = write(lake, "big/object.bin", &data, 300_001).await?;
    ensure!(meta.size == data.len() as u64, "commit size {}", meta.size);
    ensure!(lake.stat("big/object.bin").await?.map(|m| m.size) == Some(meta.size));
    let back = lake
        .get("big/object.bin", 16 * MIB as u64)
        .await?
        .context("multipart object missing")?;
    ensure!(back.len() == data.len(), "read {} bytes", back.len());
    ensure!(
        back == data,
        "multipart object differs from what was written"
    );
    Ok(())
}

/// Hostile keys are refused as invalid keys (never as I/O errors, so no
/// request or path was tried) and nothing appears in the lake.
async fn hostile_keys_refused(lake: &dyn Lake) -> Result<()> {
    let long = "a".repeat(2000);
    for key in [
        "",
        "../escape",
        "/abs",
        "a//b",
        "a/./b",
        "a/",
        "a\\b",
        "a\nb",
        long.as_str(),
    ] {
        ensure!(
            matches!(lake.put(key).await, Err(LakeError::InvalidKey { .. })),
            "put {key:?} was not refused as an invalid key"
        );
        ensure!(
            matches!(lake.stat(key).await, Err(LakeError::InvalidKey { .. })),
            "stat {key:?} was not refused as an invalid key"
        );
        ensure!(
            matches!(lake.get(key, 10).await, Err(LakeError::InvalidKey { .. })),
            "get {key:?} was not refused as an invalid key"
        );
    }
    ensure!(list_all(lake, "").await?.is_empty());
    Ok(())
}

/// `get` with a limit below the object's size fails with `TooLarge`.
async fn get_above_limit_is_too_large(lake: &dyn Lake) -> Result<()> {
    write(lake, "sized.bin", &[7u8; 100], 1024).await?;
    match lake.get("sized.bin", 99).await {
        Err(LakeError::TooLarge { size, limit, .. }) => {
            ensure!(size == 100 && limit == 99, "size {size} limit {limit}");
        }
        other => bail!("get above the limit gave {other:?}"),
    }
    ensure!(lake.get("sized.bin", 100).await?.map(|b| b.len()) == Some(100));
    Ok(())
}

/// An object source reads what a lake over the same store wrote: immediate
/// subdirectories, whole reads with a limit, and streaming reads.
async fn object_source_reads(lake: &dyn Lake, source: &dyn ObjectSource) -> Result<()> {
    let stream_data = pattern(3 * MIB + 17, 3);
    write(
        lake,
        "inv/src/cfg/2024-01-02T00-00Z/manifest.json",
        b"{}",
        1024,
    )
    .await?;
    write(
        lake,
        "inv/src/cfg/2024-01-01T00-00Z/manifest.json",
        b"[]",
        1024,
    )
    .await?;
    write(lake, "inv/src/cfg/data/part-0.csv.gz", &stream_data, MIB).await?;
    write(lake, "inv/src/cfg/top.json", b"{}", 1024).await?;

    ensure!(
        source.list_dirs("inv/src/cfg/").await?
            == [
                "inv/src/cfg/2024-01-01T00-00Z/",
                "inv/src/cfg/2024-01-02T00-00Z/",
                "inv/src/cfg/data/"
            ],
        "list_dirs of the config prefix"
    );
    ensure!(source.list_dirs("").await? == ["inv/"]);
    ensure!(source.list_dirs("none/").await?.is_empty());

    let manifest = source
        .read("inv/src/cfg/2024-01-02T00-00Z/manifest.json", 10)
        .await?;
    ensure!(manifest.as_deref() == Some(&b"{}"[..]));
    ensure!(source.read("inv/src/cfg/none.json", 10).await?.is_none());
    ensure!(matches!(
        source.read("inv/src/cfg/data/part-0.csv.gz", 1024).await,
        Err(LakeError::TooLarge { .. })
    ));
    ensure!(matches!(
        source.read("../x", 10).await,
        Err(LakeError::InvalidKey { .. })
    ));

    let mut reader = source.open("inv/src/cfg/data/part-0.csv.gz").await?;
    let mut streamed = Vec::new();
    reader.read_to_end(&mut streamed).await?;
    ensure!(streamed == stream_data, "streamed bytes differ");
    ensure!(
        source.open("inv/src/cfg/none.json").await.is_err(),
        "opening a missing object succeeded"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// The local-directory backend.
// ---------------------------------------------------------------------------

fn local() -> Result<(tempfile::TempDir, LocalLake)> {
    let dir = tempfile::tempdir()?;
    let lake = LocalLake::open(dir.path().join("lake"))?;
    Ok((dir, lake))
}

#[tokio::test]
async fn local_round_trip() -> Result<()> {
    let (_dir, lake) = local()?;
    round_trip(&lake).await
}

#[tokio::test]
async fn local_partial_prefix_and_paging() -> Result<()> {
    let (_dir, lake) = local()?;
    partial_prefix_and_paging(Arc::new(lake)).await
}

#[tokio::test]
async fn local_replace_is_whole() -> Result<()> {
    let (_dir, lake) = local()?;
    replace_is_whole(&lake).await
}

#[tokio::test]
async fn local_abort_and_drop_leave_nothing() -> Result<()> {
    let (_dir, lake) = local()?;
    abort_and_drop_leave_nothing(&lake, 6 * MIB).await?;
    // No temp file is left next to the kept object.
    let names: Vec<_> = std::fs::read_dir(lake.root())?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    ensure!(names == ["keep.json"], "left in the lake root: {names:?}");
    Ok(())
}

/// The lake's temp files under `dir`.
fn temp_files(dir: &std::path::Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(".adce-tmp.")
        {
            found.push(entry.path());
        }
    }
    Ok(found)
}

#[tokio::test]
async fn local_crashed_write_is_cleaned_up_by_a_listing_once_stale() -> Result<()> {
    let max_upload_time = Duration::from_secs(3600);
    let dir = tempfile::tempdir()?;
    let lake = LocalLake::open(dir.path().join("lake"))?.with_max_upload_time(max_upload_time);
    crashed_write_is_invisible(&lake, 6 * MIB).await?;
    // The interrupted write's temp file is still there after listings: it
    // could be a live upload's.
    let crash_dir = lake.root().join("crash");
    let leftovers = temp_files(&crash_dir)?;
    ensure!(leftovers.len() == 1, "temp files: {leftovers:?}");
    let leftover = &leftovers[0];
    ensure!(std::fs::metadata(leftover)?.len() == 6 * MIB as u64);
    // Last written just inside the stale age: kept.
    let stale_age = stale_temp_age(max_upload_time);
    let set_idle = |idle: Duration| {
        std::fs::File::options()
            .write(true)
            .open(leftover)?
            .set_modified(SystemTime::now() - idle)
    };
    set_idle(stale_age - Duration::from_secs(60))?;
    ensure!(list_all(&lake, "crash/").await?.len() == 1);
    ensure!(
        leftover.exists(),
        "a temp file younger than the stale age was removed"
    );
    // Past it: the next listing of its directory removes it.
    set_idle(stale_age + Duration::from_secs(60))?;
    ensure!(list_all(&lake, "crash/").await?.len() == 1);
    ensure!(
        temp_files(&crash_dir)?.is_empty(),
        "the stale temp file was kept"
    );
    ensure!(lake.get(CRASHED_KEY, 1024).await?.as_deref() == Some(&b"whole"[..]));
    Ok(())
}

#[tokio::test]
async fn local_multipart_sized_round_trip() -> Result<()> {
    let (_dir, lake) = local()?;
    multipart_round_trip(&lake).await
}

#[tokio::test]
async fn local_hostile_keys_refused() -> Result<()> {
    let (dir, lake) = local()?;
    hostile_keys_refused(&lake).await?;
    ensure!(!dir.path().join("escape").exists());
    Ok(())
}

#[tokio::test]
async fn local_get_above_limit_is_too_large() -> Result<()> {
    let (_dir, lake) = local()?;
    get_above_limit_is_too_large(&lake).await
}

#[tokio::test]
async fn local_object_source_reads() -> Result<()> {
    let (_dir, lake) = local()?;
    let source = LocalDir::new(lake.root());
    object_source_reads(&lake, &source).await
}

// ---------------------------------------------------------------------------
// The S3 backend against moto_server.
// ---------------------------------------------------------------------------

/// A moto_server process on a free loopback port, killed by pid on drop.
struct Moto {
    child: Child,
    endpoint: String,
    client: Client,
    _logs: tempfile::TempDir,
}

impl Moto {
    /// Starts moto_server from `$ADCE_TEST_VENV` and waits until it accepts
    /// connections.
    async fn start() -> Result<Moto> {
        let venv = std::env::var_os("ADCE_TEST_VENV").ok_or_else(|| {
            anyhow!("ADCE_TEST_VENV is not set: run scripts/test.sh (it installs moto[server])")
        })?;
        let program = PathBuf::from(venv).join("bin/moto_server");
        ensure!(
            program.is_file(),
            "{} is missing: run scripts/test.sh (it installs moto[server])",
            program.display()
        );
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let logs = tempfile::tempdir()?;
        let log = std::fs::File::create(logs.path().join("moto.log"))?;
        let child = Command::new(&program)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let endpoint = format!("http://127.0.0.1:{port}");
        let client = S3Lake::with_static_credentials(
            &s3_config("probe", "", &endpoint, PART),
            "testing",
            "testing",
        )
        .client()
        .clone();
        let mut moto = Moto {
            child,
            endpoint,
            client,
            _logs: logs,
        };
        moto.wait_ready(port)?;
        Ok(moto)
    }

    fn wait_ready(&mut self, port: u16) -> Result<()> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + MOTO_START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("moto_server exited early with {status}");
            }
            if TcpStream::connect_timeout(&addr, POLL).is_ok() {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "moto_server did not answer within {MOTO_START_TIMEOUT:?}"
            );
            std::thread::sleep(POLL);
        }
    }

    /// Creates `bucket` and returns a lake on it under the prefix `raw`
    /// (no trailing slash: it is normalized) with the given multipart sizes.
    async fn lake(&self, bucket: &str, part: u64) -> Result<S3Lake> {
        self.create_bucket(bucket).await?;
        let lake = S3Lake::with_static_credentials(
            &s3_config(bucket, "raw", &self.endpoint, part),
            "testing",
            "testing",
        );
        lake.probe().await?;
        Ok(lake)
    }

    async fn create_bucket(&self, bucket: &str) -> Result<()> {
        self.client
            .create_bucket()
            .bucket(bucket)
            .send()
            .await
            .with_context(|| format!("creating bucket {bucket}"))?;
        Ok(())
    }

    /// Every key in `bucket`, as S3 stores it.
    async fn raw_keys(&self, bucket: &str) -> Result<Vec<String>> {
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(bucket)
            .into_paginator()
            .send();
        let mut keys = Vec::new();
        while let Some(page) = pages.next().await {
            keys.extend(
                page?
                    .contents()
                    .iter()
                    .filter_map(|o| o.key().map(String::from)),
            );
        }
        keys.sort();
        Ok(keys)
    }

    /// The CRC32C checksum S3 stored for an object, if any.
    async fn crc32c(&self, bucket: &str, key: &str) -> Result<Option<String>> {
        let head = self
            .client
            .head_object()
            .bucket(bucket)
            .key(key)
            .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled)
            .send()
            .await?;
        Ok(head.checksum_crc32_c().map(String::from))
    }

    /// The keys of `bucket`'s open multipart uploads, sorted.
    async fn open_uploads(&self, bucket: &str) -> Result<Vec<String>> {
        let mut keys: Vec<String> = self
            .uploads(bucket)
            .await?
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        keys.sort();
        Ok(keys)
    }

    /// `bucket`'s open multipart uploads: key and initiation time (ms since
    /// the Unix epoch) as S3 reports them.
    async fn uploads(&self, bucket: &str) -> Result<Vec<(String, i64)>> {
        let out = self
            .client
            .list_multipart_uploads()
            .bucket(bucket)
            .send()
            .await?;
        out.uploads()
            .iter()
            .map(|u| {
                let key = u.key().context("an upload without a key")?.to_string();
                let initiated = u
                    .initiated()
                    .context("an upload without an initiation time")?
                    .to_millis()?;
                Ok((key, initiated))
            })
            .collect()
    }

    /// Starts a multipart upload of `key` in `bucket` with one part, as an
    /// interrupted write by another process would leave it.
    async fn start_upload(&self, bucket: &str, key: &str) -> Result<()> {
        let upload = self
            .client
            .create_multipart_upload()
            .bucket(bucket)
            .key(key)
            .send()
            .await?;
        self.client
            .upload_part()
            .bucket(bucket)
            .key(key)
            .upload_id(upload.upload_id().context("no upload id")?)
            .part_number(1)
            .body(pattern(PART as usize, 5).into())
            .send()
            .await?;
        Ok(())
    }

    /// Waits (bounded) until `bucket` has no open multipart upload.
    async fn assert_no_open_uploads(&self, bucket: &str, wait: Duration) -> Result<()> {
        let deadline = Instant::now() + wait;
        loop {
            let open = self.open_uploads(bucket).await?;
            if open.is_empty() {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "multipart uploads left open: {open:?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn s3_config(bucket: &str, prefix: &str, endpoint: &str, part: u64) -> config::S3Lake {
    config::S3Lake {
        bucket: bucket.to_string(),
        prefix: prefix.to_string(),
        region: Some("us-east-1".to_string()),
        endpoint: Some(endpoint.to_string()),
        force_path_style: true,
        multipart_threshold: part,
        multipart_part_size: part,
        list_concurrency: 4,
        abort_incomplete_after: config::DEFAULT_ABORT_INCOMPLETE_AFTER,
        inventory: None,
    }
}

#[tokio::test]
async fn s3_round_trip() -> Result<()> {
    let moto = Moto::start().await?;
    let lake = moto.lake("round-trip", PART).await?;
    ensure!(lake.describe() == "s3://round-trip/raw/");
    round_trip(&lake).await?;
    // The lake prefix is in the real keys and only there.
    ensure!(
        moto.raw_keys("round-trip").await?
            == [
                "raw/empty.json",
                "raw/nba/box/401584893.json",
                "raw/nba/schedule/20241022.json"
            ]
    );
    // Writes carry a CRC32C checksum, which S3 verified and stored.
    ensure!(
        moto.crc32c("round-trip", "raw/nba/box/401584893.json")
            .await?
            .is_some(),
        "the object has no stored crc32c checksum"
    );
    // Another lake on the same bucket with the prefix spelled `raw/` sees the
    // same objects; one on the whole bucket sees them under `raw/`.
    let slash = S3Lake::with_static_credentials(
        &s3_config("round-trip", "raw/", &moto.endpoint, PART),
        "testing",
        "testing",
    );
    ensure!(list_all(&slash, "").await?.len() == 3);
    let whole = S3Lake::with_static_credentials(
        &s3_config("round-trip", "", &moto.endpoint, PART),
        "testing",
        "testing",
    );
    ensure!(whole.stat("raw/empty.json").await?.is_some());
    ensure!(list_all(&whole, "raw/nba/").await?.len() == 2);
    Ok(())
}

#[tokio::test]
async fn s3_partial_prefix_and_paging() -> Result<()> {
    let moto = Moto::start().await?;
    let lake = moto.lake("paging", PART).await?;
    partial_prefix_and_paging(Arc::new(lake)).await
}

#[tokio::test]
async fn s3_replace_is_whole() -> Result<()> {
    let moto = Moto::start().await?;
    let lake = moto.lake("replace", PART).await?;
    replace_is_whole(&lake).await
}

#[tokio::test]
async fn s3_abort_and_drop_leave_no_object_and_no_upload() -> Result<()> {
    let moto = Moto::start().await?;
    let lake = moto.lake("abort", PART).await?;
    abort_and_drop_leave_nothing(&lake, 6 * MIB).await?;
    // Aborts are awaited; a dropped writer's abort runs in the background.
    moto.assert_no_open_uploads("abort", DROP_ABORT_TIMEOUT)
        .await?;
    ensure!(moto.raw_keys("abort").await? == ["raw/keep.json"]);
    Ok(())
}

#[tokio::test]
async fn s3_crashed_upload_is_aborted_once_older_than_the_age() -> Result<()> {
    let moto = Moto::start().await?;
    let lake = moto.lake("crash", PART).await?;
    crashed_write_is_invisible(&lake, 6 * MIB).await?;
    // An upload outside the lake's prefix, just as old, is not the lake's.
    moto.start_upload("crash", "other/x.bin").await?;
    let ours = format!("raw/{CRASHED_KEY}");
    ensure!(moto.open_uploads("crash").await? == ["other/x.bin", ours.as_str()]);
    let initiated = moto
        .uploads("crash")
        .await?
        .into_iter()
        .find(|(key, _)| *key == ours)
        .map(|(_, initiated)| initiated)
        .context("the interrupted upload is not listed")?;
    let age = i64::try_from(config::DEFAULT_ABORT_INCOMPLETE_AFTER.as_millis())?;
    // moto reports one fixed initiation time for every upload, so the
    // sweep's clock is moved instead: exactly the age old is kept, a second
    // older is aborted.
    ensure!(lake.abort_incomplete_uploads(initiated + age).await? == 0);
    ensure!(moto.open_uploads("crash").await? == ["other/x.bin", ours.as_str()]);
    ensure!(
        lake.abort_incomplete_uploads(initiated + age + 1000)
            .await?
            == 1
    );
    ensure!(moto.open_uploads("crash").await? == ["other/x.bin"]);
    ensure!(lake.get(CRASHED_KEY, 1024).await?.as_deref() == Some(&b"whole"[..]));
    Ok(())
}

/// A new lake sweeps at its first listing, then not again within
/// `SWEEP_INTERVAL`.
#[tokio::test]
async fn s3_first_listing_sweeps_then_waits_for_the_interval() -> Result<()> {
    let moto = Moto::start().await?;
    moto.create_bucket("sweep").await?;
    // Any upload a millisecond old is stale to this lake.
    let mut cfg = s3_config("sweep", "raw", &moto.endpoint, PART);
    cfg.abort_incomplete_after = Duration::from_millis(1);
    let lake = S3Lake::with_static_credentials(&cfg, "testing", "testing");
    moto.start_upload("sweep", "raw/a.bin").await?;
    let initiated = moto.uploads("sweep").await?[0].1;
    // Past the age on S3's clock as well as on ours.
    let deadline = Instant::now() + Duration::from_secs(5);
    while chrono::Utc::now().timestamp_millis() <= initiated + 1 {
        ensure!(Instant::now() < deadline, "the clock is behind S3's");
        tokio::time::sleep(POLL).await;
    }
    ensure!(list_all(&lake, "").await?.is_empty());
    ensure!(
        moto.open_uploads("sweep").await?.is_empty(),
        "the first listing did not sweep"
    );
    moto.start_upload("sweep", "raw/b.bin").await?;
    ensure!(list_all(&lake, "").await?.is_empty());
    lake.probe().await?;
    ensure!(
        moto.open_uploads("sweep").await? == ["raw/b.bin"],
        "a second sweep ran within the interval"
    );
    Ok(())
}

#[tokio::test]
async fn s3_multipart_round_trip() -> Result<()> {
    let moto = Moto::start().await?;
    let lake = moto.lake("multipart", PART).await?;
    multipart_round_trip(&lake).await?;
    // It really was a multipart upload: 12 MiB in 5 MiB parts is 3 parts.
    let head = moto
        .client
        .head_object()
        .bucket("multipart")
        .key("raw/big/object.bin")
        .send()
        .await?;
    let etag = head.e_tag().unwrap_or_default();
    ensure!(etag.trim_matches('"').ends_with("-3"), "etag {etag}");
    ensure!(
        moto.crc32c("multipart", "raw/big/object.bin")
            .await?
            .is_some(),
        "the multipart object has no stored crc32c checksum"
    );
    moto.assert_no_open_uploads("multipart", Duration::ZERO)
        .await
}

#[tokio::test]
async fn s3_hostile_keys_refused() -> Result<()> {
    let moto = Moto::start().await?;
    let lake = moto.lake("hostile", PART).await?;
    hostile_keys_refused(&lake).await?;
    ensure!(moto.raw_keys("hostile").await?.is_empty());
    // Refused before any request: a lake whose endpoint is closed answers
    // an invalid key at once, not with a connection error.
    let closed = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let dead = S3Lake::with_static_credentials(
        &s3_config("hostile", "", &format!("http://127.0.0.1:{closed}"), PART),
        "testing",
        "testing",
    );
    ensure!(matches!(
        dead.put("../x").await,
        Err(LakeError::InvalidKey { .. })
    ));
    ensure!(matches!(
        dead.stat("/x").await,
        Err(LakeError::InvalidKey { .. })
    ));
    Ok(())
}

#[tokio::test]
async fn s3_get_above_limit_is_too_large() -> Result<()> {
    let moto = Moto::start().await?;
    let lake = moto.lake("limit", PART).await?;
    get_above_limit_is_too_large(&lake).await
}

#[tokio::test]
async fn s3_object_source_reads() -> Result<()> {
    let moto = Moto::start().await?;
    // The lake holds the lake's objects; reports live in another bucket,
    // written there by a lake without prefix and read through the first
    // lake's client.
    let lake = moto.lake("data", PART).await?;
    moto.create_bucket("reports").await?;
    let writer = S3Lake::with_static_credentials(
        &s3_config("reports", "", &moto.endpoint, PART),
        "testing",
        "testing",
    );
    let source = lake.bucket("reports");
    ensure!(source.describe() == "s3://reports/");
    object_source_reads(&writer, &source).await?;
    // The same bucket viewed under a prefix has keys relative to it.
    let under = lake.bucket("reports").with_prefix("inv/src");
    ensure!(
        under.list_dirs("cfg/").await?
            == [
                "cfg/2024-01-01T00-00Z/",
                "cfg/2024-01-02T00-00Z/",
                "cfg/data/"
            ]
    );
    ensure!(under.read("cfg/top.json", 10).await?.as_deref() == Some(&b"{}"[..]));
    ensure!(list_all(&lake, "").await?.is_empty());
    Ok(())
}

/// The variable that hands moto's endpoint to [`s3_connect_child`].
const CHILD_ENDPOINT: &str = "ADCE_TEST_S3_CHILD_ENDPOINT";

/// `S3Lake::connect` takes its credentials from the standard AWS chain. Only
/// a child process can be given AWS variables (setting them in-process is
/// unsafe), so this runs [`s3_connect_child`] in a copy of this test binary
/// with credentials in its environment and instance metadata disabled.
#[tokio::test]
async fn s3_connect_uses_the_aws_chain() -> Result<()> {
    let moto = Moto::start().await?;
    moto.create_bucket("chain").await?;
    let output = Command::new(std::env::current_exe()?)
        .args(["--exact", "s3_connect_child", "--include-ignored"])
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/nonexistent/adce/config")
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/adce/credentials",
        )
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_REGION")
        .env_remove("AWS_DEFAULT_REGION")
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("AWS_ENDPOINT_URL_S3")
        .env(CHILD_ENDPOINT, &moto.endpoint)
        .stdin(Stdio::null())
        .output()?;
    ensure!(
        output.status.success(),
        "the child failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        String::from_utf8_lossy(&output.stdout).contains("1 passed"),
        "the child ran no test"
    );
    ensure!(moto.raw_keys("chain").await? == ["raw/from-child.json"]);
    Ok(())
}

#[tokio::test]
#[ignore = "run by s3_connect_uses_the_aws_chain in a child process with AWS credentials in its environment"]
async fn s3_connect_child() -> Result<()> {
    let endpoint = std::env::var(CHILD_ENDPOINT).with_context(|| {
        format!("{CHILD_ENDPOINT} is not set: run s3_connect_uses_the_aws_chain")
    })?;
    let mut cfg = s3_config("chain", "raw", &endpoint, PART);
    // Without a region anywhere in the chain, connecting fails early.
    cfg.region = None;
    let err = S3Lake::connect(&cfg)
        .await
        .err()
        .context("connected without a region")?;
    ensure!(err.to_string().contains("no aws region"), "{err}");
    cfg.region = Some("us-east-1".to_string());
    let lake = S3Lake::connect(&cfg).await?;
    lake.probe().await?;
    write(&lake, "from-child.json", b"{}", 1024).await?;
    ensure!(lake.stat("from-child.json").await?.is_some());
    Ok(())
}
