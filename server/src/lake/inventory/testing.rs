//! Writes inventory reports in AWS's layout, for tests here and end-to-end
//! tests elsewhere (which may put the objects into an S3 bucket).
//!
//! Compiled only for this crate's unit tests and under the `testing` cargo
//! feature (off by default), so a `cargo build --release -p adce-server`
//! library does not carry it. Its users get the feature from their
//! manifests, not from flags:
//! - adce-server's integration tests (`tests/fuzz.rs`) through a
//!   dev-dependency of adce-server on itself with `features = ["testing"]`;
//!   cargo applies a dev-dependency's features only when it builds tests,
//!   benches or examples, so `cargo build --release -p adce-server` leaves
//!   the feature off, while `cargo test -p adce-server` and
//!   `cargo test --workspace` both build and run the fuzz targets;
//! - adce-tests (its harness, the inventory end-to-end tests and
//!   `bench_reconcile`) through its dependency on adce-server. Cargo unifies
//!   features over the packages a build selects, so any build that selects
//!   adce-tests as well (every one without `-p`) compiles this module in;
//!   the server binary never calls it and links none of it.
//!
//! The alternatives were worse: `required-features` on the fuzz target would
//! skip it silently in a plain `cargo test -p adce-server`, and moving the
//! builder into adce-tests would leave the unit tests beside the parser
//! without it (they are compiled as another copy of this crate, whose
//! `InventoryConfig` and `ObjectMeta` are not adce-tests' types).

use std::io::Write;
use std::path::Path;

use flate2::Compression;
use flate2::write::GzEncoder;
use md5::{Digest, Md5};

use super::manifest::{CHECKSUM, MANIFEST, hex};
use super::reports_prefix;
use crate::config::InventoryConfig;
use crate::lake::ObjectMeta;

/// The schema [`ReportBuilder::objects_file`] writes.
pub const DEFAULT_SCHEMA: &str = "Bucket, Key, Size, LastModifiedDate, ETag, StorageClass";

/// URL-encodes a key the way S3 Inventory does (form encoding: space as
/// `+`; everything but ASCII letters, digits and `-_.*` as `%XX`, `/` too).
pub fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for &b in key.as_bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => {
                out.push(char::from(b));
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `ms` as AWS writes LastModifiedDate: `2024-10-22T12:00:00.000Z`.
pub fn format_timestamp(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

/// Gzips `data`.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    // Writing to a Vec cannot fail.
    let _ = gz.write_all(data);
    gz.finish().unwrap_or_default()
}

/// How `manifest.checksum` is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumMode {
    /// The manifest's true MD5.
    Valid,
    /// No checksum file: a report still being delivered.
    Missing,
    /// A wrong MD5.
    Corrupt,
}

/// One report under construction; [`ReportBuilder::build`] yields its
/// objects, [`ReportBuilder::write_to`] writes them under a directory.
#[derive(Debug, Clone)]
pub struct ReportBuilder {
    base: String,
    source_bucket: String,
    stamp: String,
    created_ms: i64,
    format: String,
    schema: String,
    checksum: ChecksumMode,
    files: Vec<(String, Vec<u8>)>,
    manifest_sizes: Vec<Option<u64>>,
}

impl ReportBuilder {
    /// A CSV report in the default schema for `source_bucket`, in the
    /// directory `stamp` (`YYYY-MM-DDTHH-MMZ`), created at the stamp's time.
    pub fn new(cfg: &InventoryConfig, source_bucket: &str, stamp: &str) -> Self {
        let created_ms = chrono::NaiveDateTime::parse_from_str(stamp, "%Y-%m-%dT%H-%MZ")
            .map(|t| t.and_utc().timestamp_millis())
            .unwrap_or(0);
        ReportBuilder {
            base: reports_prefix(cfg, source_bucket),
            source_bucket: source_bucket.to_string(),
            stamp: stamp.to_string(),
            created_ms,
            format: "CSV".to_string(),
            schema: DEFAULT_SCHEMA.to_string(),
            checksum: ChecksumMode::Valid,
            files: Vec::new(),
            manifest_sizes: Vec::new(),
        }
    }

    /// Sets `creationTimestamp`.
    pub fn created_ms(mut self, ms: i64) -> Self {
        self.created_ms = ms;
        self
    }

    /// Sets `fileFormat` (e.g. `Parquet`).
    pub fn format(mut self, format: &str) -> Self {
        self.format = format.to_string();
        self
    }

    /// Sets `fileSchema` (comma-separated column names).
    pub fn schema(mut self, schema: &str) -> Self {
        self.schema = schema.to_string();
        self
    }

    /// Sets how `manifest.checksum` is written.
    pub fn checksum(mut self, mode: ChecksumMode) -> Self {
        self.checksum = mode;
        self
    }

    /// Adds a data file listing `objects` (full keys in the source
    /// bucket) in [`DEFAULT_SCHEMA`], keys encoded as S3 does.
    pub fn objects_file<I>(self, objects: I) -> Self
    where
        I: IntoIterator<Item = ObjectMeta>,
    {
        let mut csv = csv::WriterBuilder::new()
            .has_headers(false)
            .quote_style(csv::QuoteStyle::Always)
            .from_writer(GzEncoder::new(Vec::new(), Compression::default()));
        for object in objects {
            let size = object.size.to_string();
            let fields = [
                self.source_bucket.as_str(),
                &encode_key(&object.key),
                &size,
                &format_timestamp(object.modified_ms),
                "d41d8cd98f00b204e9800998ecf8427e",
                "STANDARD",
            ];
            // Writing to a Vec cannot fail.
            let _ = csv.write_record(fields);
        }
        let gz = csv
            .into_inner()
            .ok()
            .and_then(|gz| gz.finish().ok())
            .unwrap_or_default();
        self.data_file(gz)
    }

    /// Adds a data file of `rows`, each field written verbatim and quoted.
    pub fn rows_file(self, rows: &[Vec<String>]) -> Self {
        let mut csv = csv::WriterBuilder::new()
            .has_headers(false)
            .flexible(true)
            .quote_style(csv::QuoteStyle::Always)
            .from_writer(Vec::new());
        for row in rows {
            let _ = csv.write_record(row);
        }
        let text = csv.into_inner().unwrap_or_default();
        self.data_file(gzip(&text))
    }

    /// Adds a data file with exactly these (gzipped) bytes.
    pub fn data_file(mut self, bytes: Vec<u8>) -> Self {
        let key = format!(
            "{}data/{}-{}.csv.gz",
            self.base,
            self.stamp,
            self.files.len()
        );
        self.files.push((key, bytes));
        self.manifest_sizes.push(None);
        self
    }

    /// Makes the manifest give `size` for the last data file added.
    pub fn misstate_last_size(mut self, size: u64) -> Self {
        if let Some(last) = self.manifest_sizes.last_mut() {
            *last = Some(size);
        }
        self
    }

    /// The report directory's key prefix.
    pub fn dir(&self) -> String {
        format!("{}{}/", self.base, self.stamp)
    }

    /// Every object of the report as (key, bytes), in delivery order:
    /// data files, the manifest, its checksum (unless missing) and the
    /// hive symlink file.
    pub fn build(self) -> Vec<(String, Vec<u8>)> {
        let dir = self.dir();
        let files: Vec<serde_json::Value> = self
            .files
            .iter()
            .zip(&self.manifest_sizes)
            .map(|((key, bytes), size)| {
                serde_json::json!({
                    "key": key,
                    "size": size.unwrap_or(bytes.len() as u64),
                    "MD5checksum": hex(&Md5::digest(bytes)),
                })
            })
            .collect();
        let manifest = serde_json::json!({
            "sourceBucket": self.source_bucket,
            "destinationBucket": "arn:aws:s3:::inventory-destination",
            "version": "2016-11-30",
            "creationTimestamp": self.created_ms.to_string(),
            "fileFormat": self.format,
            "fileSchema": self.schema,
            "files": files,
        });
        let manifest = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
        let hive_stamp = self
            .stamp
            .replace('T', "-")
            .trim_end_matches('Z')
            .to_string();
        let symlinks: String = self
            .files
            .iter()
            .map(|(key, _)| format!("s3://inventory-destination/{key}\n"))
            .collect();
        // Data files first and the checksum last, in the order AWS
        // delivers them, so a reader racing an upload sees a report
        // without a checksum rather than one without its files.
        let mut objects = self.files;
        objects.push((format!("{dir}{MANIFEST}"), manifest.clone()));
        match self.checksum {
            ChecksumMode::Valid => objects.push((
                format!("{dir}{CHECKSUM}"),
                hex(&Md5::digest(&manifest)).into_bytes(),
            )),
            ChecksumMode::Corrupt => objects.push((
                format!("{dir}{CHECKSUM}"),
                b"0123456789abcdef0123456789abcdef".to_vec(),
            )),
            ChecksumMode::Missing => {}
        }
        objects.push((
            format!("{}hive/dt={hive_stamp}/symlink.txt", self.base),
            symlinks.into_bytes(),
        ));
        objects
    }

    /// Writes the report's objects as files under `root` and returns the
    /// report directory's key prefix.
    pub fn write_to(self, root: &Path) -> std::io::Result<String> {
        let dir = self.dir();
        for (key, bytes) in self.build() {
            let path = root.join(&key);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, bytes)?;
        }
        Ok(dir)
    }
}
