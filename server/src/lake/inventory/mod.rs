//! S3 Inventory reports: finds the newest complete report that a destination
//! bucket holds for one source bucket, verifies its manifest, and streams the
//! objects its gzipped CSV data files list into listing pages, so a whole
//! bucket can be observed without listing it.
//!
//! AWS delivers reports to
//! `<prefix>/<source-bucket>/<config-id>/<YYYY-MM-DDTHH-MMZ>/manifest.json`
//! with `manifest.checksum` (the MD5 hex of `manifest.json`) beside it; the
//! data files the manifest names live under `<config-id>/data/`, and a
//! `hive/` directory holds symlink manifests this module ignores. CSV data
//! files are gzipped, have no header row, list their columns in the
//! manifest's `fileSchema` order and quote every field. Object keys in them
//! are URL-encoded in the `application/x-www-form-urlencoded` style (a space
//! is `+`, a `+` is `%2B`); decoding accepts `%20` for a space as well.
//!
//! Data files are decompressed and parsed on a blocking thread while an async
//! task prefetches their bytes, so no file is ever held whole in memory; each
//! file is checked against the size and MD5 the manifest gives for it.
//!
//! This file holds the entry points, [`latest_report`] (which report to
//! read) and [`read_report`] (its data files, a few at a time), and the types
//! they return. The work below them is split by layer, each file importing
//! only the ones after it:
//! - `manifest.rs`: `manifest.json` parsing and its `manifest.checksum`;
//! - `stream.rs`: one data file's download, prefetch, size and MD5 check and
//!   gzip decoding, on a blocking thread;
//! - `rows.rs`: CSV rows into listing pages: the schema's columns, key
//!   decoding and the prefix filter (not `csv.rs`, which would shadow the
//!   `csv` crate's name beside it);
//! - `time.rs`: the LastModifiedDate timestamp parser.
//!
//! `testing.rs` writes reports in AWS's layout for tests; it is compiled for
//! this crate's unit tests and under the `testing` feature only (see its
//! header for who turns that on).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{LakeError, ObjectSource, PageSink};
use crate::config::InventoryConfig;
use crate::model::UnixMs;
use manifest::{CHECKSUM, MANIFEST, MAX_CHECKSUM_BYTES, MAX_MANIFEST_BYTES, SUPPORTED_FORMAT};
use rows::{Columns, KeyFilter};

mod manifest;
mod rows;
mod stream;
mod time;

#[cfg(test)]
mod fixtures;
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod testing;

/// How many data files are parsed at once.
const FILE_CONCURRENCY: usize = 2;

/// One inventory report: where it is, when it was made and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The report directory's key prefix, ending in `/`, e.g.
    /// `inv/lake-bucket/daily/2024-10-22T00-00Z/`.
    pub dir: String,
    /// When AWS began making the report, in ms since the Unix epoch: objects
    /// changed after it may be missing from the report or stale in it.
    pub created_ms: UnixMs,
    /// The bucket the report lists.
    pub source_bucket: String,
    /// The data file format (`CSV`, `ORC` or `Parquet`).
    pub format: String,
    /// The data files' column names, in order.
    pub schema: Vec<String>,
    /// The data files, keys in the destination bucket.
    pub files: Vec<DataFile>,
}

/// One data file of a report, as the manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataFile {
    /// Its key in the destination bucket.
    pub key: String,
    /// Its size in bytes (compressed, as stored).
    pub size: u64,
    /// The MD5 hex of its bytes as stored, when the manifest gives one.
    pub md5: Option<String>,
}

/// Errors of finding and reading inventory reports.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// No report directory holds both `manifest.json` and `manifest.checksum`.
    #[error("no complete inventory report (manifest.json with manifest.checksum) under {location}")]
    NoReport {
        /// Where reports were looked for.
        location: String,
    },
    /// The manifest does not match its `manifest.checksum`.
    #[error(
        "inventory manifest {manifest} does not match its checksum: manifest.checksum says {expected}, the manifest's md5 is {actual}"
    )]
    Checksum {
        /// The manifest's key.
        manifest: String,
        /// The MD5 hex `manifest.checksum` holds.
        expected: String,
        /// The MD5 hex of the manifest as read.
        actual: String,
    },
    /// The report's data files are in a format this module cannot read.
    #[error("inventory report format {0} is not supported; configure CSV")]
    Format(String),
    /// The manifest is malformed or describes something unusable.
    #[error("inventory manifest {key}: {message}")]
    Manifest {
        /// The manifest's key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The store holding the reports failed.
    #[error(transparent)]
    Lake(#[from] LakeError),
    /// A row of a data file is malformed.
    #[error("inventory data file {file} line {line}: {message}")]
    Data {
        /// The data file's key.
        file: String,
        /// The 1-based line of the row in the decompressed file.
        line: u64,
        /// What is wrong.
        message: String,
    },
    /// A data file could not be read or decompressed.
    #[error("reading inventory data file {file}: {source}")]
    Read {
        /// The data file's key.
        file: String,
        /// The underlying error.
        source: io::Error,
    },
    /// A data file does not match the size or MD5 the manifest gives.
    #[error("inventory data file {file} {message}")]
    Integrity {
        /// The data file's key.
        file: String,
        /// What does not match.
        message: String,
    },
    /// The consumer of the pages went away before the report was read.
    #[error("inventory pages are no longer received")]
    Closed,
    /// A reader task failed unexpectedly (it panicked).
    #[error("inventory reader failed: {0}")]
    Internal(String),
}

/// The key prefix (empty or ending in `/`) under which AWS puts the reports
/// of `cfg` for `source_bucket`: `<prefix>/<source-bucket>/<config-id>/`.
pub fn reports_prefix(cfg: &InventoryConfig, source_bucket: &str) -> String {
    let prefix = cfg.prefix.trim_matches('/');
    if prefix.is_empty() {
        format!("{source_bucket}/{}/", cfg.config_id)
    } else {
        format!("{prefix}/{source_bucket}/{}/", cfg.config_id)
    }
}

/// The newest report that has both `manifest.json` and `manifest.checksum`,
/// its checksum verified. Newer directories without a checksum (AWS writes it
/// last, so the report is still being delivered) are skipped; a checksum that
/// does not match is an error, not a reason to fall back to an older report.
pub async fn latest_report(
    src: &dyn ObjectSource,
    cfg: &InventoryConfig,
    source_bucket: &str,
) -> Result<Report, InventoryError> {
    let base = reports_prefix(cfg, source_bucket);
    let mut dirs: Vec<String> = src
        .list_dirs(&base)
        .await?
        .into_iter()
        .filter(|dir| {
            dir.strip_prefix(&base)
                .is_some_and(|name| is_report_stamp(name.trim_end_matches('/')))
        })
        .collect();
    // The stamps sort as text in time order; the newest comes first.
    dirs.sort_unstable_by(|a, b| b.cmp(a));
    for dir in dirs {
        let checksum_key = format!("{dir}{CHECKSUM}");
        let manifest_key = format!("{dir}{MANIFEST}");
        let Some(checksum) = src.read(&checksum_key, MAX_CHECKSUM_BYTES).await? else {
            tracing::debug!(report = %dir, "skipping inventory report without manifest.checksum");
            continue;
        };
        let Some(manifest) = src.read(&manifest_key, MAX_MANIFEST_BYTES).await? else {
            tracing::debug!(report = %dir, "skipping inventory report without manifest.json");
            continue;
        };
        manifest::verify_checksum(&manifest_key, &checksum, &manifest)?;
        let report = manifest::parse_manifest(&manifest_key, &manifest, dir, source_bucket)?;
        tracing::debug!(
            report = %report.dir,
            created_ms = report.created_ms,
            files = report.files.len(),
            "found inventory report"
        );
        return Ok(report);
    }
    Err(InventoryError::NoReport {
        location: format!("{}{base}", describe_root(src)),
    })
}

/// `src`'s description with a `/` between it and a key prefix.
fn describe_root(src: &dyn ObjectSource) -> String {
    let mut root = src.describe();
    if !root.ends_with('/') {
        root.push('/');
    }
    root
}

/// Whether `name` has the shape `YYYY-MM-DDTHH-MMZ` of a report directory.
fn is_report_stamp(name: &str) -> bool {
    const SHAPE: &[u8] = b"dddd-dd-ddTdd-ddZ";
    name.len() == SHAPE.len()
        && name.bytes().zip(SHAPE).all(|(c, &s)| match s {
            b'd' => c.is_ascii_digit(),
            _ => c == s,
        })
}

/// Streams the objects of `report` into `pages` (pages of at most
/// [`LIST_PAGE`](super::LIST_PAGE)), keeping only keys under `lake_prefix` (stripped from each
/// key; pass the lake's key prefix verbatim, e.g. `raw/`) whose remainder
/// starts with one of `prefixes` (an empty slice keeps all), and returns how
/// many it sent. Delete markers and non-latest versions are skipped.
///
/// Data files are read in parallel (pages interleave) and checked against the
/// manifest's size and MD5 only once read whole, so on an error the pages
/// already sent must be discarded: the observation is incomplete. The first
/// error stops the other files' reads; once this returns, nothing more is
/// sent to `pages`.
pub async fn read_report(
    src: Arc<dyn ObjectSource>,
    report: &Report,
    lake_prefix: &str,
    prefixes: &[String],
    pages: PageSink,
) -> Result<u64, InventoryError> {
    let manifest_key = format!("{}{MANIFEST}", report.dir);
    if !report.format.eq_ignore_ascii_case(SUPPORTED_FORMAT) {
        return Err(InventoryError::Format(report.format.clone()));
    }
    let columns =
        Columns::from_schema(&report.schema).map_err(|message| InventoryError::Manifest {
            key: manifest_key,
            message,
        })?;
    let filter = Arc::new(KeyFilter::new(lake_prefix, prefixes));
    let mut files = report.files.iter().cloned();
    let stop = Arc::new(AtomicBool::new(false));
    let mut running = tokio::task::JoinSet::new();
    let mut sent = 0u64;
    let mut failure = None;
    loop {
        while failure.is_none() && running.len() < FILE_CONCURRENCY {
            let Some(file) = files.next() else { break };
            running.spawn(stream::read_data_file(
                Arc::clone(&src),
                file,
                columns,
                Arc::clone(&filter),
                pages.clone(),
                Arc::clone(&stop),
            ));
        }
        // Every read is joined, even after a failure, so no parser thread
        // outlives this call and still holds `pages`.
        let Some(joined) = running.join_next().await else {
            break;
        };
        match joined {
            Ok(Ok(n)) => sent += n,
            Ok(Err(e)) if failure.is_none() => {
                stop.store(true, Ordering::Relaxed);
                failure = Some(e);
            }
            Ok(Err(_)) => {} // A consequence of the first failure.
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                failure.get_or_insert(InventoryError::Internal(e.to_string()));
            }
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    tracing::debug!(report = %report.dir, objects = sent, "read inventory report");
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use md5::{Digest, Md5};
    use tokio::sync::mpsc;

    use super::fixtures::{BUCKET, T0, cfg, latest, object, read};
    use super::manifest::hex;
    use super::testing::{ChecksumMode, ReportBuilder};
    use super::*;
    use crate::lake::{LocalDir, ObjectMeta};

    #[tokio::test]
    async fn newest_complete_report_is_chosen() {
        let dir = tempfile::tempdir().unwrap();
        ReportBuilder::new(&cfg(), BUCKET, "2024-10-20T00-00Z")
            .objects_file([object("old", 1, T0)])
            .write_to(dir.path())
            .unwrap();
        let chosen = ReportBuilder::new(&cfg(), BUCKET, "2024-10-21T00-00Z")
            .created_ms(T0)
            .objects_file([object("a", 1, T0)])
            .objects_file([object("b", 2, T0)])
            .write_to(dir.path())
            .unwrap();
        // Newer, but still being delivered: no manifest.checksum yet.
        ReportBuilder::new(&cfg(), BUCKET, "2024-10-22T00-00Z")
            .checksum(ChecksumMode::Missing)
            .objects_file([object("new", 1, T0)])
            .write_to(dir.path())
            .unwrap();
        // Another source bucket's and another config's reports are elsewhere.
        ReportBuilder::new(&cfg(), "other-bucket", "2024-10-23T00-00Z")
            .write_to(dir.path())
            .unwrap();
        assert!(dir.path().join("inv/lake-bucket/daily/hive").is_dir());
        assert!(dir.path().join("inv/lake-bucket/daily/data").is_dir());

        let report = latest(dir.path()).await.unwrap();
        assert_eq!(report.dir, chosen);
        assert_eq!(report.dir, "inv/lake-bucket/daily/2024-10-21T00-00Z/");
        assert_eq!(report.created_ms, T0);
        assert_eq!(report.source_bucket, BUCKET);
        assert_eq!(report.format, "CSV");
        assert_eq!(
            report.schema,
            [
                "Bucket",
                "Key",
                "Size",
                "LastModifiedDate",
                "ETag",
                "StorageClass"
            ]
        );
        assert_eq!(report.files.len(), 2);
        for file in &report.files {
            assert!(
                file.key.starts_with("inv/lake-bucket/daily/data/"),
                "{}",
                file.key
            );
            let bytes = std::fs::read(dir.path().join(&file.key)).unwrap();
            assert_eq!(file.size, bytes.len() as u64);
            assert_eq!(
                file.md5.as_deref(),
                Some(hex(&Md5::digest(&bytes)).as_str())
            );
        }
        let (objects, _) = read(dir.path(), &report, "", &[]).await.unwrap();
        assert_eq!(objects, [object("a", 1, T0), object("b", 2, T0)]);
    }

    #[tokio::test]
    async fn missing_reports_are_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = latest(dir.path()).await.unwrap_err();
        assert!(matches!(err, InventoryError::NoReport { .. }), "{err:?}");
        assert!(err.to_string().ends_with("inv/lake-bucket/daily/"), "{err}");
        // Only incomplete reports: still none.
        ReportBuilder::new(&cfg(), BUCKET, "2024-10-22T00-00Z")
            .checksum(ChecksumMode::Missing)
            .write_to(dir.path())
            .unwrap();
        assert!(matches!(
            latest(dir.path()).await,
            Err(InventoryError::NoReport { .. })
        ));
    }

    #[tokio::test]
    async fn a_failing_file_stops_the_others_before_the_read_returns() {
        let dir = tempfile::tempdir().unwrap();
        let big = (0..50_000u64).map(|i| object(&format!("k/{i}"), i, T0));
        ReportBuilder::new(&cfg(), BUCKET, "2024-10-21T00-00Z")
            .data_file(b"not gzip".to_vec())
            .objects_file(big)
            .write_to(dir.path())
            .unwrap();
        let report = latest(dir.path()).await.unwrap();
        let src: Arc<dyn ObjectSource> = Arc::new(LocalDir::new(dir.path()));
        let (tx, mut rx) = mpsc::channel::<Vec<ObjectMeta>>(1);
        let collector = tokio::spawn(async move {
            let mut n = 0;
            while let Some(page) = rx.recv().await {
                n += page.len();
            }
            n
        });
        let err = read_report(src, &report, "", &[], tx).await.unwrap_err();
        assert!(matches!(err, InventoryError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("-0.csv.gz"), "{err}");
        // Every sender is gone once the read returned: the consumer ends.
        let received = tokio::time::timeout(std::time::Duration::from_secs(10), collector)
            .await
            .expect("a reader still held the page sink after read_report returned")
            .unwrap();
        assert!(received <= 50_000);
    }

    #[tokio::test]
    async fn a_consumer_that_goes_away_stops_the_read() {
        let dir = tempfile::tempdir().unwrap();
        let objects = (0..5_000u64).map(|i| object(&format!("k/{i}"), i, T0));
        ReportBuilder::new(&cfg(), BUCKET, "2024-10-21T00-00Z")
            .objects_file(objects)
            .write_to(dir.path())
            .unwrap();
        let report = latest(dir.path()).await.unwrap();
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let src: Arc<dyn ObjectSource> = Arc::new(LocalDir::new(dir.path()));
        let err = read_report(src, &report, "", &[], tx).await.unwrap_err();
        assert!(matches!(err, InventoryError::Closed), "{err:?}");
    }

    #[test]
    fn report_stamps_are_recognized() {
        assert!(is_report_stamp("2016-11-06T21-32Z"));
        for name in [
            "hive",
            "data",
            "2016-11-06T21:32Z",
            "2016-11-06T21-32",
            "2016-11-06",
        ] {
            assert!(!is_report_stamp(name), "{name}");
        }
        let mut c = cfg();
        assert_eq!(reports_prefix(&c, "b"), "inv/b/daily/");
        c.prefix = String::new();
        assert_eq!(reports_prefix(&c, "b"), "b/daily/");
    }
}
