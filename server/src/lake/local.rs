//! The local-directory lake, the embedded default: objects are files under a
//! root directory. Writes go to a hidden temp file in the target directory,
//! are fsynced, then renamed over the key, so a reader never sees a partial
//! object.
//!
//! A write the process never finished (it was killed) leaves its temp file
//! behind. Listings skip temp files and remove the stale ones on the way:
//! those whose last write is older than [`stale_temp_age`] of the longest
//! allowed upload, which no live upload can be.

use std::fs::DirEntry;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use super::{
    ByteReader, LIST_PAGE, Lake, LakeError, ObjectMeta, ObjectSource, ObjectWriter, PageSink,
    validate_key,
};
use crate::config::DEFAULT_MAX_UPLOAD_TIME;
use crate::model::UnixMs;

/// File names starting with this are in-flight writes, never listed.
const TEMP_PREFIX: &str = ".adce-tmp.";
/// The most [`stale_temp_age`] adds to the longest allowed upload.
const STALE_TEMP_MARGIN: Duration = Duration::from_secs(5 * 60);

/// How long after its last write a temp file is a crashed write's leftover,
/// for uploads that may stream for at most `max_upload_time`.
///
/// The gateway aborts an upload whose stream takes longer than
/// `max_upload_time`, so a live upload's temp file is written to at least
/// that often. The margin covers what follows the last chunk without touching
/// the file's modification time: the lease check, the fsync and the rename.
/// It is capped at [`STALE_TEMP_MARGIN`], and is never more than
/// `max_upload_time` itself, so that a short limit (in tests) keeps a short
/// stale age: an upload that may stream for a second has little to fsync.
pub fn stale_temp_age(max_upload_time: Duration) -> Duration {
    max_upload_time.saturating_add(max_upload_time.min(STALE_TEMP_MARGIN))
}

/// A lake rooted at a local directory.
#[derive(Debug, Clone)]
pub struct LocalLake {
    root: PathBuf,
    /// Temp files whose last write is older than this are removed by listings.
    stale_temp_after: Duration,
    /// Bounds the file creations and renames in flight: hundreds at once in
    /// one directory only spin on its lock in the kernel.
    fs_ops: Arc<tokio::sync::Semaphore>,
}

/// File creations and renames in flight at once, per lake.
const FS_OPS_IN_FLIGHT: usize = 8;

impl LocalLake {
    /// A lake at `root`, created if missing, for uploads that stream for at
    /// most [`DEFAULT_MAX_UPLOAD_TIME`].
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, LakeError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(|source| LakeError::Io {
            op: "create root",
            key: root.display().to_string(),
            source,
        })?;
        Ok(LocalLake {
            root,
            stale_temp_after: stale_temp_age(DEFAULT_MAX_UPLOAD_TIME),
            fs_ops: Arc::new(tokio::sync::Semaphore::new(FS_OPS_IN_FLIGHT)),
        })
    }

    /// The same lake for uploads that stream for at most `max_upload_time`
    /// (`server.max_upload_time`): listings remove temp files whose last
    /// write is older than [`stale_temp_age`] of it.
    pub fn with_max_upload_time(mut self, max_upload_time: Duration) -> Self {
        self.stale_temp_after = stale_temp_age(max_upload_time);
        self
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, key: &str) -> Result<PathBuf, LakeError> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }
}

fn modified_ms(meta: &std::fs::Metadata) -> UnixMs {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, crate::model::duration_ms)
}

fn io_err<'a>(op: &'static str, key: &'a str) -> impl FnOnce(std::io::Error) -> LakeError + 'a {
    move |source| LakeError::Io {
        op,
        key: key.to_string(),
        source,
    }
}

/// A listing in progress: walks directories, sends full pages and removes
/// stale temp files on the way.
struct Walker<'a> {
    prefix: &'a str,
    page: Vec<ObjectMeta>,
    pages: &'a PageSink,
    sent: u64,
    /// Temp files last written before this are leftovers of crashed writes.
    stale_before: SystemTime,
}

impl Walker<'_> {
    /// Removes the temp file `entry` when it is stale. Never fails the
    /// listing: a file that cannot be removed is logged and left.
    fn remove_if_stale(&self, entry: &DirEntry) {
        let path = entry.path();
        // `DirEntry::metadata` does not follow symlinks: only a regular file
        // can be one of the lake's own temp files.
        let modified = match entry.metadata() {
            Ok(meta) if meta.is_file() => meta.modified(),
            Ok(_) => return,
            Err(e) => Err(e),
        };
        let modified = match modified {
            Ok(modified) => modified,
            // Its write just finished or was aborted.
            Err(e) if e.kind() == ErrorKind::NotFound => return,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot read the age of a temp file");
                return;
            }
        };
        if modified >= self.stale_before {
            return;
        }
        let idle_s = SystemTime::now()
            .duration_since(modified)
            .map_or(0, |idle| idle.as_secs());
        match std::fs::remove_file(&path) {
            Ok(()) => info!(
                path = %path.display(),
                idle_s,
                "removed the temp file of an interrupted write"
            ),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => warn!(
                path = %path.display(),
                error = %e,
                "cannot remove the temp file of an interrupted write"
            ),
        }
    }

    fn flush(&mut self) {
        if !self.page.is_empty() {
            let page = std::mem::replace(&mut self.page, Vec::with_capacity(LIST_PAGE));
            self.sent += page.len() as u64;
            // A consumer that went away ends the listing's usefulness, not its
            // correctness.
            let _ = self.pages.blocking_send(page);
        }
    }

    /// Walks `dir` (whose key prefix is `dir_key`, empty or ending in `/`)
    /// and collects every regular file whose key starts with the prefix.
    fn walk(&mut self, dir: &Path, dir_key: &str) -> Result<(), LakeError> {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("list", dir_key)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_err("list", dir_key))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue; // Not UTF-8: cannot be an object key.
            };
            if name.starts_with(TEMP_PREFIX) {
                self.remove_if_stale(&entry);
                continue;
            }
            let key = format!("{dir_key}{name}");
            let file_type = entry.file_type().map_err(io_err("list", &key))?;
            if file_type.is_dir() {
                let sub_key = format!("{key}/");
                // Descend only where keys below can still match the prefix.
                if sub_key.starts_with(self.prefix) || self.prefix.starts_with(&sub_key) {
                    self.walk(&entry.path(), &sub_key)?;
                }
            } else if file_type.is_file() && key.starts_with(self.prefix) {
                let meta = entry.metadata().map_err(io_err("list", &key))?;
                self.page.push(ObjectMeta {
                    key,
                    size: meta.len(),
                    modified_ms: modified_ms(&meta),
                });
                if self.page.len() >= LIST_PAGE {
                    self.flush();
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Lake for LocalLake {
    fn describe(&self) -> String {
        format!("local:{}", self.root.display())
    }

    async fn list(&self, prefix: &str, pages: PageSink) -> Result<u64, LakeError> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        let stale_before = SystemTime::now()
            .checked_sub(self.stale_temp_after)
            .unwrap_or(UNIX_EPOCH);
        // The walk runs on a blocking thread and hands pages over as it goes.
        tokio::task::spawn_blocking(move || {
            let dir_key = match prefix.rfind('/') {
                Some(i) => &prefix[..=i],
                None => "",
            };
            let mut walker = Walker {
                prefix: &prefix,
                page: Vec::with_capacity(LIST_PAGE),
                pages: &pages,
                sent: 0,
                stale_before,
            };
            walker.walk(&root.join(dir_key), dir_key)?;
            walker.flush();
            Ok(walker.sent)
        })
        .await
        .map_err(|e| LakeError::Io {
            op: "list",
            key: String::new(),
            source: std::io::Error::other(e),
        })?
    }

    async fn stat(&self, key: &str) -> Result<Option<ObjectMeta>, LakeError> {
        let path = self.path_of(key)?;
        match tokio::fs::metadata(&path).await {
            Ok(meta) if meta.is_file() => Ok(Some(ObjectMeta {
                key: key.to_string(),
                size: meta.len(),
                modified_ms: modified_ms(&meta),
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("stat", key)(e)),
        }
    }

    async fn get(&self, key: &str, max_bytes: u64) -> Result<Option<Vec<u8>>, LakeError> {
        let Some(meta) = self.stat(key).await? else {
            return Ok(None);
        };
        if meta.size > max_bytes {
            return Err(LakeError::TooLarge {
                key: key.to_string(),
                size: meta.size,
                limit: max_bytes,
            });
        }
        match tokio::fs::read(self.path_of(key)?).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", key)(e)),
        }
    }

    async fn put(&self, key: &str) -> Result<Box<dyn ObjectWriter>, LakeError> {
        let path = self.path_of(key)?;
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.root.clone());
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp = dir.join(format!(
            "{TEMP_PREFIX}{:016x}.{file_name}",
            rand::random::<u64>()
        ));
        let _permit = self.fs_ops.acquire().await;
        // One trip to the blocking pool for the directory and the file.
        let file = tokio::task::spawn_blocking({
            let (dir, temp, key) = (dir, temp.clone(), key.to_string());
            move || {
                std::fs::create_dir_all(&dir).map_err(io_err("create directory for", &key))?;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&temp)
                    .map_err(io_err("create", &key))
            }
        })
        .await
        .map_err(|e| io_err("create", key)(std::io::Error::other(e)))??;
        Ok(Box::new(LocalWriter {
            key: key.to_string(),
            target: path,
            temp,
            file: Some(tokio::fs::File::from_std(file)),
            size: 0,
            fs_ops: self.fs_ops.clone(),
        }))
    }

    async fn probe(&self) -> Result<(), LakeError> {
        let meta = tokio::fs::metadata(&self.root)
            .await
            .map_err(io_err("probe", ""))?;
        if meta.is_dir() {
            Ok(())
        } else {
            Err(LakeError::Io {
                op: "probe",
                key: String::new(),
                source: std::io::Error::other("lake root is not a directory"),
            })
        }
    }
}

/// A directory read as an [`ObjectSource`] (keys are relative paths).
#[derive(Debug, Clone)]
pub struct LocalDir {
    root: PathBuf,
}

impl LocalDir {
    /// The directory at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalDir { root: root.into() }
    }

    fn path_of(&self, key: &str) -> Result<PathBuf, LakeError> {
        validate_key(key.trim_end_matches('/'))?;
        Ok(self.root.join(key))
    }
}

#[async_trait]
impl ObjectSource for LocalDir {
    fn describe(&self) -> String {
        format!("local:{}", self.root.display())
    }

    async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, LakeError> {
        let dir = if prefix.is_empty() {
            self.root.clone()
        } else {
            self.path_of(prefix)?
        };
        let mut entries = match tokio::fs::read_dir(&dir).await {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("list", prefix)(e)),
        };
        let mut out = Vec::new();
        while let Some(entry) = entries.next_entry().await.map_err(io_err("list", prefix))? {
            let is_dir = entry
                .file_type()
                .await
                .map_err(io_err("list", prefix))?
                .is_dir();
            if let (true, Ok(name)) = (is_dir, entry.file_name().into_string()) {
                out.push(format!("{prefix}{name}/"));
            }
        }
        out.sort();
        Ok(out)
    }

    async fn read(&self, key: &str, max_bytes: u64) -> Result<Option<Vec<u8>>, LakeError> {
        let path = self.path_of(key)?;
        let meta = match tokio::fs::metadata(&path).await {
            Ok(meta) if meta.is_file() => meta,
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("stat", key)(e)),
        };
        if meta.len() > max_bytes {
            return Err(LakeError::TooLarge {
                key: key.to_string(),
                size: meta.len(),
                limit: max_bytes,
            });
        }
        tokio::fs::read(&path)
            .await
            .map(Some)
            .map_err(io_err("read", key))
    }

    async fn open(&self, key: &str) -> Result<ByteReader, LakeError> {
        let file = tokio::fs::File::open(self.path_of(key)?)
            .await
            .map_err(io_err("open", key))?;
        Ok(Box::pin(file))
    }
}

/// An in-flight write to a temp file next to its target.
struct LocalWriter {
    key: String,
    target: PathBuf,
    temp: PathBuf,
    file: Option<tokio::fs::File>,
    size: u64,
    fs_ops: Arc<tokio::sync::Semaphore>,
}

#[async_trait]
impl ObjectWriter for LocalWriter {
    async fn write(&mut self, chunk: &[u8]) -> Result<(), LakeError> {
        let Some(file) = self.file.as_mut() else {
            return Err(io_err("write", &self.key)(std::io::Error::other(
                "writer already finished",
            )));
        };
        file.write_all(chunk)
            .await
            .map_err(io_err("write", &self.key))?;
        self.size += chunk.len() as u64;
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<ObjectMeta, LakeError> {
        let Some(mut file) = self.file.take() else {
            return Err(io_err("commit", &self.key)(std::io::Error::other(
                "writer already finished",
            )));
        };
        let result = async {
            file.flush().await.map_err(io_err("flush", &self.key))?;
            let file = file.into_std().await;
            let key = self.key.clone();
            // Many fsyncs at once are cheaper than one after another (the
            // file system commits them together); directory changes are not.
            tokio::task::spawn_blocking(move || file.sync_all().map_err(io_err("fsync", &key)))
                .await
                .map_err(|e| io_err("fsync", &self.key)(std::io::Error::other(e)))??;
            let _permit = self.fs_ops.acquire().await;
            let (temp, target, key) = (self.temp.clone(), self.target.clone(), self.key.clone());
            tokio::task::spawn_blocking(move || {
                std::fs::rename(&temp, &target).map_err(io_err("rename", &key))?;
                let meta = std::fs::metadata(&target).map_err(io_err("stat", &key))?;
                Ok(ObjectMeta {
                    key,
                    size: meta.len(),
                    modified_ms: modified_ms(&meta),
                })
            })
            .await
            .map_err(|e| io_err("commit", &self.key)(std::io::Error::other(e)))?
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&self.temp).await;
        }
        result
    }

    async fn abort(mut self: Box<Self>) {
        self.file.take();
        let _ = tokio::fs::remove_file(&self.temp).await;
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            // Neither committed nor aborted: remove the temp file.
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lake::list_all;

    async fn write(lake: &LocalLake, key: &str, data: &[u8]) -> ObjectMeta {
        let mut w = lake.put(key).await.unwrap();
        w.write(data).await.unwrap();
        w.commit().await.unwrap()
    }

    #[tokio::test]
    async fn writes_are_atomic_and_listed_by_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let lake = LocalLake::open(dir.path()).unwrap();
        let meta = write(&lake, "nba/schedule/20241022.json", b"{}").await;
        assert_eq!(meta.size, 2);
        write(&lake, "nba/schedule/20241023.json", b"[1]").await;
        write(&lake, "nba/box/1.json", b"x").await;

        // An unfinished write is invisible.
        let mut pending = lake.put("nba/schedule/20241024.json").await.unwrap();
        pending.write(b"partial").await.unwrap();
        let mut keys: Vec<_> = list_all(&lake, "nba/schedule/2024")
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect();
        keys.sort();
        assert_eq!(
            keys,
            ["nba/schedule/20241022.json", "nba/schedule/20241023.json"]
        );
        assert!(
            lake.stat("nba/schedule/20241024.json")
                .await
                .unwrap()
                .is_none()
        );
        pending.abort().await;
        let leftovers = std::fs::read_dir(dir.path().join("nba/schedule"))
            .unwrap()
            .count();
        assert_eq!(leftovers, 2, "abort left a temp file behind");

        assert_eq!(list_all(&lake, "").await.unwrap().len(), 3);
        assert_eq!(
            lake.get("nba/box/1.json", 10).await.unwrap().as_deref(),
            Some(&b"x"[..])
        );
        assert!(lake.get("nba/box/2.json", 10).await.unwrap().is_none());
        assert!(matches!(
            lake.get("nba/schedule/20241023.json", 2).await,
            Err(LakeError::TooLarge { size: 3, .. })
        ));
        assert_eq!(list_all(&lake, "nba/box/").await.unwrap().len(), 1);
        assert!(list_all(&lake, "nope/").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn dropped_writer_leaves_nothing_and_replace_is_whole() {
        let dir = tempfile::tempdir().unwrap();
        let lake = LocalLake::open(dir.path()).unwrap();
        write(&lake, "a/b", b"old").await;
        {
            let mut w = lake.put("a/b").await.unwrap();
            w.write(b"new but dropped").await.unwrap();
        }
        assert_eq!(std::fs::read(dir.path().join("a/b")).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path().join("a")).unwrap().count(), 1);
        write(&lake, "a/b", b"newer").await;
        assert_eq!(std::fs::read(dir.path().join("a/b")).unwrap(), b"newer");
    }

    /// Creates a temp file named like the lake's own at `dir/name` whose
    /// last write was `ago` before now.
    fn temp_file_written_ago(dir: &Path, name: &str, ago: Duration) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join(name);
        let file = std::fs::File::create(&path).unwrap();
        file.set_modified(SystemTime::now() - ago).unwrap();
        path
    }

    #[test]
    fn stale_age_is_the_upload_limit_and_a_capped_margin() {
        let hour = Duration::from_secs(3600);
        assert_eq!(stale_temp_age(hour), hour + STALE_TEMP_MARGIN);
        assert_eq!(
            stale_temp_age(Duration::from_secs(1)),
            Duration::from_secs(2)
        );
        assert_eq!(stale_temp_age(Duration::MAX), Duration::MAX);
    }

    #[tokio::test]
    async fn listing_removes_stale_temp_files_and_keeps_fresh_ones() {
        let dir = tempfile::tempdir().unwrap();
        let hour = Duration::from_secs(3600);
        let lake = LocalLake::open(dir.path())
            .unwrap()
            .with_max_upload_time(hour);
        write(&lake, "nba/schedule/20241022.json", b"{}").await;
        let schedule = dir.path().join("nba/schedule");
        let margin = Duration::from_secs(60);
        let stale = temp_file_written_ago(
            &schedule,
            ".adce-tmp.00000000000000aa.20241023.json",
            stale_temp_age(hour) + margin,
        );
        let fresh = temp_file_written_ago(
            &schedule,
            ".adce-tmp.00000000000000bb.20241024.json",
            stale_temp_age(hour) - margin,
        );
        // A write in flight, and old look-alikes that are not the lake's temp
        // files: a directory, and a file without the prefix.
        let mut live = lake.put("nba/schedule/20241025.json").await.unwrap();
        live.write(b"[1]").await.unwrap();
        let old = stale_temp_age(hour) * 2;
        let not_a_file = schedule.join(".adce-tmp.dir");
        std::fs::create_dir(&not_a_file).unwrap();
        std::fs::File::open(&not_a_file)
            .unwrap()
            .set_modified(SystemTime::now() - old)
            .unwrap();
        let other = temp_file_written_ago(&schedule, ".other-tmp.json", old);
        // A stale temp file in a directory the listing does not walk.
        let elsewhere = temp_file_written_ago(
            &dir.path().join("nba/box"),
            ".adce-tmp.00000000000000cc.1.json",
            old,
        );

        let listed = list_all(&lake, "nba/schedule/").await.unwrap();
        let keys: Vec<&str> = listed.iter().map(|m| m.key.as_str()).collect();
        assert!(!keys.iter().any(|k| k.contains(TEMP_PREFIX)), "{keys:?}");
        assert!(!stale.exists(), "the stale temp file was kept");
        assert!(fresh.exists(), "a fresh temp file was removed");
        assert!(not_a_file.is_dir() && other.exists());
        assert!(
            elsewhere.exists(),
            "a directory that was not listed was cleaned"
        );
        // The live write still commits.
        live.commit().await.unwrap();
        assert_eq!(
            lake.get("nba/schedule/20241025.json", 10)
                .await
                .unwrap()
                .as_deref(),
            Some(&b"[1]"[..])
        );

        // With a shorter upload limit the same temp file is stale.
        let strict = lake.clone().with_max_upload_time(Duration::from_secs(60));
        list_all(&strict, "nba/").await.unwrap();
        assert!(!fresh.exists() && !elsewhere.exists());
    }

    #[tokio::test]
    async fn hostile_keys_are_refused_before_touching_disk() {
        let dir = tempfile::tempdir().unwrap();
        let lake = LocalLake::open(dir.path().join("lake")).unwrap();
        assert!(lake.put("../escape").await.is_err());
        assert!(lake.put("/abs").await.is_err());
        assert!(!dir.path().join("escape").exists());
    }

    #[tokio::test]
    async fn local_dir_lists_subdirectories_and_reads_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("inv/b/c/2024-01-02T00-00Z")).unwrap();
        std::fs::create_dir_all(dir.path().join("inv/b/c/2024-01-01T00-00Z")).unwrap();
        std::fs::write(dir.path().join("inv/b/c/x.json"), b"{}").unwrap();
        let src = LocalDir::new(dir.path());
        assert_eq!(
            src.list_dirs("inv/b/c/").await.unwrap(),
            ["inv/b/c/2024-01-01T00-00Z/", "inv/b/c/2024-01-02T00-00Z/"]
        );
        assert_eq!(src.list_dirs("").await.unwrap(), ["inv/"]);
        assert!(src.list_dirs("none/").await.unwrap().is_empty());
        assert_eq!(
            src.read("inv/b/c/x.json", 10).await.unwrap().as_deref(),
            Some(&b"{}"[..])
        );
        assert!(src.read("inv/b/c/y.json", 10).await.unwrap().is_none());
        assert!(src.read("inv/b/c/x.json", 1).await.is_err());
        let mut buf = String::new();
        tokio::io::AsyncReadExt::read_to_string(
            &mut src.open("inv/b/c/x.json").await.unwrap(),
            &mut buf,
        )
        .await
        .unwrap();
        assert_eq!(buf, "{}");
    }
}
