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

use std::collections::HashMap;
use std::io::{self, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use md5::{Digest, Md5};
use serde::Deserialize;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use super::{ByteReader, LIST_PAGE, LakeError, ObjectMeta, ObjectSource, PageSink};
use crate::config::InventoryConfig;
use crate::model::UnixMs;

/// The largest `manifest.json` read (a manifest lists one entry per data file).
const MAX_MANIFEST_BYTES: u64 = 64 << 20;
/// The largest `manifest.checksum` read (it holds 32 hex digits).
const MAX_CHECKSUM_BYTES: u64 = 1024;
/// How many bytes of a data file are handed to the parser at a time.
const READ_CHUNK: usize = 256 << 10;
/// How many chunks are read ahead of the parser.
const PREFETCH_CHUNKS: usize = 4;
/// The CSV parser's buffer size.
const CSV_BUFFER: usize = 256 << 10;
/// How many data files are parsed at once.
const FILE_CONCURRENCY: usize = 2;
/// The only data file format this module reads.
const SUPPORTED_FORMAT: &str = "CSV";
/// The manifest's name inside a report directory.
const MANIFEST: &str = "manifest.json";
/// The checksum's name inside a report directory.
const CHECKSUM: &str = "manifest.checksum";
/// The longest key S3 stores, in bytes: a longer decoded key marks a corrupt row.
const S3_MAX_KEY_BYTES: usize = 1024;

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
        let expected = String::from_utf8_lossy(&checksum)
            .trim()
            .to_ascii_lowercase();
        let actual = hex(&Md5::digest(&manifest));
        if expected != actual {
            return Err(InventoryError::Checksum {
                manifest: manifest_key,
                expected: expected.chars().take(64).collect(),
                actual,
            });
        }
        let report = parse_manifest(&manifest_key, &manifest, dir, source_bucket)?;
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

/// The fields of `manifest.json` this module uses.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    source_bucket: String,
    file_format: String,
    #[serde(default)]
    file_schema: String,
    creation_timestamp: Timestamp,
    files: Vec<ManifestFile>,
}

/// `creationTimestamp`: AWS writes ms as a string; a number is accepted too.
#[derive(Deserialize)]
#[serde(untagged)]
enum Timestamp {
    Text(String),
    Number(i64),
}

#[derive(Deserialize)]
struct ManifestFile {
    key: String,
    size: u64,
    #[serde(rename = "MD5checksum", default)]
    md5: Option<String>,
}

fn parse_manifest(
    key: &str,
    bytes: &[u8],
    dir: String,
    source_bucket: &str,
) -> Result<Report, InventoryError> {
    let invalid = |message: String| InventoryError::Manifest {
        key: key.to_string(),
        message,
    };
    let manifest: Manifest =
        serde_json::from_slice(bytes).map_err(|e| invalid(format!("invalid JSON: {e}")))?;
    if manifest.source_bucket != source_bucket {
        return Err(invalid(format!(
            "lists bucket {:?}, not {source_bucket:?}",
            manifest.source_bucket
        )));
    }
    if !manifest.file_format.eq_ignore_ascii_case(SUPPORTED_FORMAT) {
        return Err(InventoryError::Format(manifest.file_format));
    }
    let created_ms = match manifest.creation_timestamp {
        Timestamp::Number(ms) => ms,
        Timestamp::Text(text) => text.trim().parse().map_err(|_| {
            invalid(format!(
                "creationTimestamp {text:?} is not a number of milliseconds"
            ))
        })?,
    };
    let schema: Vec<String> = manifest
        .file_schema
        .split(',')
        .map(|column| column.trim().to_string())
        .filter(|column| !column.is_empty())
        .collect();
    Columns::from_schema(&schema).map_err(invalid)?;
    let files = manifest
        .files
        .into_iter()
        .map(|file| DataFile {
            key: file.key,
            size: file.size,
            md5: file
                .md5
                .map(|m| m.trim().to_ascii_lowercase())
                .filter(|m| !m.is_empty()),
        })
        .collect();
    Ok(Report {
        dir,
        created_ms,
        source_bucket: manifest.source_bucket,
        format: manifest.file_format,
        schema,
        files,
    })
}

/// Where the columns this module reads are in a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Columns {
    count: usize,
    key: usize,
    size: usize,
    modified: usize,
    is_latest: Option<usize>,
    is_delete_marker: Option<usize>,
}

impl Columns {
    fn from_schema(schema: &[String]) -> Result<Columns, String> {
        let mut index = HashMap::new();
        for (i, column) in schema.iter().enumerate() {
            if index.insert(column.as_str(), i).is_some() {
                return Err(format!("fileSchema names column {column} twice"));
            }
        }
        let required = |name: &str| {
            index.get(name).copied().ok_or_else(|| {
                format!(
                    "fileSchema {:?} lacks the required column {name} (Key, Size and LastModifiedDate are needed)",
                    schema.join(", ")
                )
            })
        };
        Ok(Columns {
            count: schema.len(),
            key: required("Key")?,
            size: required("Size")?,
            modified: required("LastModifiedDate")?,
            is_latest: index.get("IsLatest").copied(),
            is_delete_marker: index.get("IsDeleteMarker").copied(),
        })
    }
}

/// Which keys a read keeps, and how they are shortened.
#[derive(Debug)]
struct KeyFilter {
    /// Stripped from every key; keys not under it are dropped.
    lake_prefix: Vec<u8>,
    /// Sorted, and none is a prefix of another; empty keeps everything.
    prefixes: Vec<Vec<u8>>,
}

impl KeyFilter {
    fn new(lake_prefix: &str, prefixes: &[String]) -> KeyFilter {
        let mut sorted: Vec<Vec<u8>> = prefixes.iter().map(|p| p.as_bytes().to_vec()).collect();
        sorted.sort_unstable();
        sorted.dedup();
        // Drop every prefix that a shorter kept one covers: after sorting, a
        // covering prefix comes right before the prefixes it covers.
        let mut reduced: Vec<Vec<u8>> = Vec::with_capacity(sorted.len());
        for prefix in sorted {
            if reduced.last().is_none_or(|kept| !prefix.starts_with(kept)) {
                reduced.push(prefix);
            }
        }
        // An empty prefix keeps everything, like no prefixes at all.
        if reduced.first().is_some_and(Vec::is_empty) {
            reduced.clear();
        }
        KeyFilter {
            lake_prefix: lake_prefix.as_bytes().to_vec(),
            prefixes: reduced,
        }
    }

    /// The key relative to the lake prefix, when it is kept.
    fn accept<'k>(&self, key: &'k [u8]) -> Option<&'k [u8]> {
        let relative = key.strip_prefix(self.lake_prefix.as_slice())?;
        if relative.is_empty() {
            return None; // The lake prefix itself (a "folder" marker).
        }
        if self.prefixes.is_empty() {
            return Some(relative);
        }
        // In a prefix-free sorted set, the only prefix that can cover the key
        // is the greatest one not above it.
        let after = self
            .prefixes
            .partition_point(|prefix| prefix.as_slice() <= relative);
        let candidate = self.prefixes.get(after.checked_sub(1)?)?;
        relative.starts_with(candidate).then_some(relative)
    }
}

/// Streams the objects of `report` into `pages` (pages of at most
/// [`LIST_PAGE`]), keeping only keys under `lake_prefix` (stripped from each
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
            running.spawn(read_data_file(
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

/// Reads one data file: an async task prefetches its bytes while a blocking
/// thread checks, decompresses and parses them.
async fn read_data_file(
    src: Arc<dyn ObjectSource>,
    file: DataFile,
    columns: Columns,
    filter: Arc<KeyFilter>,
    pages: PageSink,
    stop: Arc<AtomicBool>,
) -> Result<u64, InventoryError> {
    let reader = src.open(&file.key).await?;
    let (tx, rx) = mpsc::channel(PREFETCH_CHUNKS);
    let parse = tokio::task::spawn_blocking(move || {
        let input = Verifier::new(ChunkReader::new(rx), file.md5.is_some());
        parse_data_file(input, &file, columns, &filter, &pages, &stop)
    });
    let (parsed, ()) = tokio::join!(parse, prefetch(reader, tx));
    parsed.map_err(|e| InventoryError::Internal(e.to_string()))?
}

/// Reads `reader` in chunks into `chunks` until its end, an error (which is
/// passed on) or the parser going away.
async fn prefetch(mut reader: ByteReader, chunks: mpsc::Sender<io::Result<Vec<u8>>>) {
    loop {
        let mut chunk = Vec::with_capacity(READ_CHUNK);
        let mut end = false;
        while chunk.len() < READ_CHUNK {
            match reader.read_buf(&mut chunk).await {
                Ok(0) => {
                    end = true;
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = chunks.send(Err(e)).await;
                    return;
                }
            }
        }
        if !chunk.is_empty() && chunks.send(Ok(chunk)).await.is_err() {
            return; // The parser stopped.
        }
        if end {
            return;
        }
    }
}

/// A blocking reader over the chunks [`prefetch`] sends; a closed channel is
/// the end of the input (a truncated file then fails the size check).
struct ChunkReader {
    chunks: mpsc::Receiver<io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    pos: usize,
}

impl ChunkReader {
    fn new(chunks: mpsc::Receiver<io::Result<Vec<u8>>>) -> Self {
        ChunkReader {
            chunks,
            chunk: Vec::new(),
            pos: 0,
        }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            match self.chunks.blocking_recv() {
                Some(Ok(chunk)) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Counts (and optionally hashes) the bytes read through it.
struct Verifier<R> {
    inner: R,
    bytes: u64,
    md5: Option<Md5>,
}

impl<R: Read> Verifier<R> {
    fn new(inner: R, hash: bool) -> Self {
        Verifier {
            inner,
            bytes: 0,
            md5: hash.then(Md5::new),
        }
    }

    /// Reads to the end, then compares size and MD5 with `file`'s.
    fn finish(mut self, file: &DataFile) -> Result<(), InventoryError> {
        io::copy(&mut self, &mut io::sink()).map_err(|source| InventoryError::Read {
            file: file.key.clone(),
            source,
        })?;
        if self.bytes != file.size {
            return Err(InventoryError::Integrity {
                file: file.key.clone(),
                message: format!("is {} bytes, the manifest says {}", self.bytes, file.size),
            });
        }
        if let (Some(expected), Some(md5)) = (&file.md5, self.md5) {
            let actual = hex(&md5.finalize());
            if *expected != actual {
                return Err(InventoryError::Integrity {
                    file: file.key.clone(),
                    message: format!("has md5 {actual}, the manifest says {expected}"),
                });
            }
        }
        Ok(())
    }
}

impl<R: Read> Read for Verifier<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        if let Some(md5) = &mut self.md5 {
            md5.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// Decompresses and parses one data file from `input`, sending kept objects
/// to `pages`; then checks the file against the manifest. When `stop` is set
/// (another file failed) it returns at once with what it sent.
fn parse_data_file<R: Read>(
    input: Verifier<R>,
    file: &DataFile,
    columns: Columns,
    filter: &KeyFilter,
    pages: &PageSink,
    stop: &AtomicBool,
) -> Result<u64, InventoryError> {
    let mut csv = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .buffer_capacity(CSV_BUFFER)
        .from_reader(flate2::read::MultiGzDecoder::new(input));
    let sent = parse_rows(&mut csv, file, columns, filter, pages, stop)?;
    if !stop.load(Ordering::Relaxed) {
        csv.into_inner().into_inner().finish(file)?;
    }
    Ok(sent)
}

fn parse_rows<R: Read>(
    csv: &mut csv::Reader<R>,
    file: &DataFile,
    columns: Columns,
    filter: &KeyFilter,
    pages: &PageSink,
    stop: &AtomicBool,
) -> Result<u64, InventoryError> {
    let mut record = csv::ByteRecord::new();
    let mut page = Vec::with_capacity(LIST_PAGE);
    let mut scratch = Vec::new();
    let mut sent = 0u64;
    loop {
        match csv.read_byte_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => return Err(csv_error(file, e)),
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(sent);
        }
        let row_error = |message: String| InventoryError::Data {
            file: file.key.clone(),
            line: record.position().map_or(0, csv::Position::line),
            message,
        };
        if record.len() != columns.count {
            // A blank line parses as one empty field; it holds no object.
            if record.len() == 1 && record[0].is_empty() {
                continue;
            }
            return Err(row_error(format!(
                "{} fields where the schema has {}",
                record.len(),
                columns.count
            )));
        }
        let is_true =
            |column: Option<usize>| column.is_some_and(|i| record[i].eq_ignore_ascii_case(b"true"));
        let is_false = |column: Option<usize>| {
            column.is_some_and(|i| record[i].eq_ignore_ascii_case(b"false"))
        };
        if is_true(columns.is_delete_marker) || is_false(columns.is_latest) {
            continue;
        }
        let key = decode_key(&record[columns.key], &mut scratch).map_err(|reason| {
            row_error(format!("key {}: {reason}", escaped(&record[columns.key])))
        })?;
        if key.len() > S3_MAX_KEY_BYTES {
            return Err(row_error(format!(
                "key {} is {} bytes, longer than S3 allows ({S3_MAX_KEY_BYTES})",
                escaped(&record[columns.key]),
                key.len()
            )));
        }
        let Some(relative) = filter.accept(key) else {
            continue;
        };
        let key = std::str::from_utf8(relative)
            .map_err(|_| {
                row_error(format!(
                    "key {} is not UTF-8",
                    escaped(&record[columns.key])
                ))
            })?
            .to_owned();
        let size = parse_size(&record[columns.size]).ok_or_else(|| {
            row_error(format!(
                "size {} is not a number",
                escaped(&record[columns.size])
            ))
        })?;
        let modified_ms = parse_timestamp(&record[columns.modified]).ok_or_else(|| {
            row_error(format!(
                "last-modified date {} is not an ISO 8601 timestamp",
                escaped(&record[columns.modified])
            ))
        })?;
        page.push(ObjectMeta {
            key,
            size,
            modified_ms,
        });
        if page.len() >= LIST_PAGE {
            sent += send_page(pages, &mut page)?;
        }
    }
    sent += send_page(pages, &mut page)?;
    Ok(sent)
}

fn send_page(pages: &PageSink, page: &mut Vec<ObjectMeta>) -> Result<u64, InventoryError> {
    if page.is_empty() {
        return Ok(0);
    }
    let full = std::mem::replace(page, Vec::with_capacity(LIST_PAGE));
    let n = full.len() as u64;
    pages
        .blocking_send(full)
        .map_err(|_| InventoryError::Closed)?;
    Ok(n)
}

fn csv_error(file: &DataFile, error: csv::Error) -> InventoryError {
    let line = error.position().map_or(0, csv::Position::line);
    match error.into_kind() {
        csv::ErrorKind::Io(source) => InventoryError::Read {
            file: file.key.clone(),
            source,
        },
        kind => InventoryError::Data {
            file: file.key.clone(),
            line,
            message: format!("{kind:?}"),
        },
    }
}

/// A field for an error message: lossy UTF-8, debug-escaped, at most 200 chars.
fn escaped(field: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(field).chars().take(200).collect();
    format!("{text:?}")
}

/// Decodes a form-URL-encoded key (`+` and `%20` are spaces, `%XX` a byte);
/// keys without `%` or `+` are returned as they are, without copying.
fn decode_key<'a>(raw: &'a [u8], scratch: &'a mut Vec<u8>) -> Result<&'a [u8], &'static str> {
    let is_escape = |b: &u8| *b == b'%' || *b == b'+';
    let Some(first) = raw.iter().position(is_escape) else {
        return Ok(raw);
    };
    scratch.clear();
    scratch.extend_from_slice(&raw[..first]);
    let mut i = first;
    while i < raw.len() {
        match raw[i] {
            b'+' => {
                scratch.push(b' ');
                i += 1;
            }
            b'%' => {
                let byte = raw
                    .get(i + 1..i + 3)
                    .and_then(|hex| Some(hex_digit(hex[0])? << 4 | hex_digit(hex[1])?))
                    .ok_or("malformed percent-encoding")?;
                scratch.push(byte);
                i += 3;
            }
            _ => {
                // Copy the run up to the next escape at once.
                let end = raw[i..]
                    .iter()
                    .position(is_escape)
                    .map_or(raw.len(), |n| i + n);
                scratch.extend_from_slice(&raw[i..end]);
                i = end;
            }
        }
    }
    Ok(scratch)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Lowercase hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// A non-empty run of ASCII digits as a number.
fn parse_size(field: &[u8]) -> Option<u64> {
    if field.is_empty() {
        return None;
    }
    field.iter().try_fold(0u64, |n, &c| {
        if c.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(c - b'0'))
        } else {
            None
        }
    })
}

/// Parses an ISO 8601 UTC timestamp to ms since the Unix epoch. The shape AWS
/// writes, `2024-10-22T12:00:00.000Z`, is parsed by hand; anything else goes
/// through chrono's RFC 3339 parser.
fn parse_timestamp(field: &[u8]) -> Option<i64> {
    parse_utc_fast(field).or_else(|| {
        let text = std::str::from_utf8(field).ok()?;
        chrono::DateTime::parse_from_rfc3339(text)
            .ok()
            .map(|t| t.timestamp_millis())
    })
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction]Z`, or `None`.
fn parse_utc_fast(f: &[u8]) -> Option<i64> {
    if f.len() < 20 || f.last() != Some(&b'Z') {
        return None;
    }
    let digits = |range: std::ops::Range<usize>| -> Option<i64> {
        f[range].iter().try_fold(0i64, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0'))
        })
    };
    if f[4] != b'-'
        || f[7] != b'-'
        || !matches!(f[10], b'T' | b't')
        || f[13] != b':'
        || f[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut millis = 0;
    match &f[19..f.len() - 1] {
        [] => {}
        [b'.', fraction @ ..] if !fraction.is_empty() => {
            for (i, &c) in fraction.iter().enumerate() {
                if !c.is_ascii_digit() {
                    return None;
                }
                if i < 3 {
                    millis = millis * 10 + i64::from(c - b'0');
                }
            }
            for _ in fraction.len()..3 {
                millis *= 10;
            }
        }
        _ => return None,
    }
    let days = days_from_civil(year, month, day);
    Some(((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + millis)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Writes inventory reports in AWS's layout, for tests here and end-to-end
/// tests elsewhere (which may put the objects into an S3 bucket).
#[doc(hidden)]
pub mod testing {
    use std::io::Write;
    use std::path::Path;

    use flate2::Compression;
    use flate2::write::GzEncoder;
    use md5::{Digest, Md5};

    use super::{CHECKSUM, MANIFEST, hex, reports_prefix};
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
}

#[cfg(test)]
mod tests {
    use super::testing::{ChecksumMode, ReportBuilder, encode_key, format_timestamp, gzip};
    use super::*;
    use crate::lake::LocalDir;

    const BUCKET: &str = "lake-bucket";
    const T0: i64 = 1_729_598_400_000; // 2024-10-22T12:00:00Z

    fn cfg() -> InventoryConfig {
        InventoryConfig {
            bucket: "inventory-destination".to_string(),
            prefix: "inv/".to_string(),
            config_id: "daily".to_string(),
        }
    }

    fn object(key: &str, size: u64, modified_ms: i64) -> ObjectMeta {
        ObjectMeta {
            key: key.to_string(),
            size,
            modified_ms,
        }
    }

    fn row(fields: &[&str]) -> Vec<String> {
        fields.iter().map(|f| f.to_string()).collect()
    }

    /// Reads a report whole; returns the objects sorted by key and the pages' sizes.
    async fn read(
        root: &std::path::Path,
        report: &Report,
        lake_prefix: &str,
        prefixes: &[&str],
    ) -> Result<(Vec<ObjectMeta>, Vec<usize>), InventoryError> {
        let src: Arc<dyn ObjectSource> = Arc::new(LocalDir::new(root));
        let prefixes: Vec<String> = prefixes.iter().map(|p| p.to_string()).collect();
        let (tx, mut rx) = mpsc::channel(2);
        let reading = read_report(src, report, lake_prefix, &prefixes, tx);
        let collect = async {
            let mut objects = Vec::new();
            let mut sizes = Vec::new();
            while let Some(page) = rx.recv().await {
                sizes.push(page.len());
                objects.extend(page);
            }
            (objects, sizes)
        };
        let (sent, (mut objects, sizes)) = tokio::join!(reading, collect);
        assert_eq!(
            sent? as usize,
            objects.len(),
            "count returned != objects sent"
        );
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok((objects, sizes))
    }

    async fn latest(root: &std::path::Path) -> Result<Report, InventoryError> {
        latest_report(&LocalDir::new(root), &cfg(), BUCKET).await
    }

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
    async fn corrupted_checksum_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        ReportBuilder::new(&cfg(), BUCKET, "2024-10-20T00-00Z")
            .write_to(dir.path())
            .unwrap();
        ReportBuilder::new(&cfg(), BUCKET, "2024-10-21T00-00Z")
            .checksum(ChecksumMode::Corrupt)
            .objects_file([object("a", 1, T0)])
            .write_to(dir.path())
            .unwrap();
        let err = latest(dir.path()).await.unwrap_err();
        let InventoryError::Checksum {
            manifest,
            expected,
            actual,
        } = &err
        else {
            panic!("expected a checksum error, got {err:?}");
        };
        assert_eq!(
            manifest,
            "inv/lake-bucket/daily/2024-10-21T00-00Z/manifest.json"
        );
        assert_eq!(expected, "0123456789abcdef0123456789abcdef");
        let bytes = std::fs::read(dir.path().join(manifest)).unwrap();
        assert_eq!(*actual, hex(&Md5::digest(&bytes)));
        assert!(
            err.to_string().contains("does not match its checksum"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn checksum_file_with_newline_and_uppercase_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let report_dir = ReportBuilder::new(&cfg(), BUCKET, "2024-10-21T00-00Z")
            .write_to(dir.path())
            .unwrap();
        let path = dir.path().join(format!("{report_dir}manifest.checksum"));
        let checksum = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("{}\n", checksum.to_uppercase())).unwrap();
        assert_eq!(latest(dir.path()).await.unwrap().dir, report_dir);
    }

    #[tokio::test]
    async fn encoded_keys_are_decoded() {
        let dir = tempfile::tempdir().unwrap();
        let keys = [
            "nba/a b/c d.json",
            "nba/a+b.json",
            "nba/ünïcødé/日本.json",
            "nba/100%/x~y(1).json",
        ];
        let objects: Vec<_> = keys.iter().map(|k| object(k, 7, T0)).collect();
        let ts = format_timestamp(T0);
        ReportBuilder::new(&cfg(), BUCKET, "2024-10-21T00-00Z")
            .objects_file(objects.clone())
            // Keys as other encoders write them: `%20` for a space, literal `/`.
            .rows_file(&[
                row(&[BUCKET, "nfl/x%20y.json", "1", &ts, "e", "STANDARD"]),
                row(&[BUCKET, "nfl%2Fslash%2fz.json", "2", &ts, "e", "STANDARD"]),
                row(&[BUCKET, "nfl/plain.json", "3", &ts, "e", "STANDARD"]),
            ])
            .write_to(dir.path())
            .unwrap();
        assert_eq!(encode_key("nba/a b+c"), "nba%2Fa+b%2Bc");
        let report = latest(dir.path()).await.unwrap();
        let (read_objects, _) = read(dir.path(), &report, "", &[]).await.unwrap();
        let mut expected = objects;
        expected.extend([
            object("nfl/plain.json", 3, T0),
            object("nfl/slash/z.json", 2, T0),
            object("nfl/x y.json", 1, T0),
        ]);
        expected.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(read_objects, expected);
    }

    #[tokio::test]
    async fn prefixes_filter_and_lake_prefix_is_stripped() {
        let dir = tempfile::tempdir().unwrap();
        let keys = [
            "raw/nba/a.json",
            "raw/nba/b.json",
            "raw/nbax/c.json",
            "raw/nfl/d.json",
            "raw/",
            "rawx/nba/e.json",
            "other/nba/f.json",
        ];
        ReportBuilder::new(&cfg(), BUCKET, "2024-10-21T00-00Z")
            .objects_file(keys.iter().take(4).map(|k| object(k, 1, T0)))
            .objects_file(keys.iter().skip(4).map(|k| object(k, 1, T0)))
            .write_to(dir.path())
            .unwrap();
        let report = latest(dir.path()).await.unwrap();
        let keys_of = |objects: Vec<ObjectMeta>| -> Vec<String> {
            objects.into_iter().map(|o| o.key).collect()
        };

        let (all, _) = read(dir.path(), &report, "raw/", &[]).await.unwrap();
        assert_eq!(
            keys_of(all),
            ["nba/a.json", "nba/b.json", "nbax/c.json", "nfl/d.json"]
        );
        let (nba, _) = read(dir.path(), &report, "raw/", &["nba/"]).await.unwrap();
        assert_eq!(keys_of(nba), ["nba/a.json", "nba/b.json"]);
        let (some, _) = read(
            dir.path(),
            &report,
            "raw/",
            &["nfl/", "nba/b", "zzz/", "nba/b.json"],
        )
        .await
        .unwrap();
        assert_eq!(keys_of(some), ["nba/b.json", "nfl/d.json"]);
        let (covered, _) = read(dir.path(), &report, "raw/", &["nba/", "nb"])
            .await
            .unwrap();
        assert_eq!(
            keys_of(covered),
            ["nba/a.json", "nba/b.json", "nbax/c.json"]
        );
        let (whole, _) = read(dir.path(), &report, "", &["raw"]).await.unwrap();
        assert_eq!(whole.len(), 6, "{whole:?}");
        let (none, _) = read(dir.path(), &report, "missing/", &[]).await.unwrap();
        assert!(none.is_empty());
    }

    #[test]
    fn key_filter_picks_the_covering_prefix() {
        let prefixes: Vec<String> = ["b/", "a/x", "a/", "c", "", "d/e/"]
            .iter()
            .map(|p| p.to_string())
            .collect();
        // The empty prefix covers everything.
        assert!(KeyFilter::new("", &prefixes).prefixes.is_empty());
        let prefixes = &prefixes[..4];
        let filter = KeyFilter::new("p/", prefixes);
        assert_eq!(
            filter.prefixes,
            [b"a/".to_vec(), b"b/".to_vec(), b"c".to_vec()]
        );
        for (key, kept) in [
            ("p/a/x/1", Some("a/x/1")),
            ("p/a/1", Some("a/1")),
            ("p/a", None),
            ("p/b/", Some("b/")),
            ("p/bb/1", None),
            ("p/c", Some("c")),
            ("p/cat", Some("cat")),
            ("p/0", None),
            ("p/zz", None),
            ("q/a/1", None),
            ("p/", None),
        ] {
            assert_eq!(
                filter.accept(key.as_bytes()),
                kept.map(str::as_bytes),
                "{key}"
            );
        }
    }

    #[tokio::test]
    async fn versioned_reports_skip_delete_markers_and_old_versions() {
        let dir = tempfile::tempdir().unwrap();
        let ts = format_timestamp(T0);
        ReportBuilder::new(&cfg(), BUCKET, "2024-10-21T00-00Z")
            .schema("Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate")
            .rows_file(&[
                row(&[BUCKET, "a", "v2", "true", "false", "10", &ts]),
                row(&[BUCKET, "a", "v1", "false", "false", "9", &ts]),
                row(&[BUCKET, "b", "v3", "true", "true", "", &ts]),
                row(&[BUCKET, "b", "v2", "false", "false", "4", &ts]),
                row(&[BUCKET, "c", "null", "true", "false", "1", &ts]),
            ])
            .write_to(dir.path())
            .unwrap();
        let report = latest(dir.path()).await.unwrap();
        let (objects, _) = read(dir.path(), &report, "", &[]).await.unwrap();
        assert_eq!(objects, [object("a", 10, T0), object("c", 1, T0)]);
    }

    #[tokio::test]
    async fn non_csv_formats_are_refused() {
        for format in ["Parquet", "ORC"] {
            let dir = tempfile::tempdir().unwrap();
            ReportBuilder::new(&cfg(), BUCKET, "2024-10-21T00-00Z")
                .format(format)
                .schema("message s3.inventory { required binary bucket; }")
                .write_to(dir.path())
                .unwrap();
            let err = latest(dir.path()).await.unwrap_err();
            assert!(
                matches!(&err, InventoryError::Format(f) if f == format),
                "{err:?}"
            );
            assert_eq!(
                err.to_string(),
                format!("inventory report format {format} is not supported; configure CSV")
            );
        }
    }

    #[tokio::test]
    async fn a_missing_required_column_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        ReportBuilder::new(&cfg(), BUCKET, "2024-10-21T00-00Z")
            .schema("Bucket, Key, LastModifiedDate, ETag")
            .write_to(dir.path())
            .unwrap();
        let err = latest(dir.path()).await.unwrap_err();
        assert!(matches!(err, InventoryError::Manifest { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains("required column Size"), "{message}");
        assert!(
            message.contains("2024-10-21T00-00Z/manifest.json"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn a_manifest_for_another_bucket_or_malformed_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let report_dir = ReportBuilder::new(&cfg(), BUCKET, "2024-10-21T00-00Z")
            .write_to(dir.path())
            .unwrap();
        let manifest_path = dir.path().join(format!("{report_dir}manifest.json"));
        let checksum_path = dir.path().join(format!("{report_dir}manifest.checksum"));
        for (manifest, wanted) in [
            (
                r#"{"sourceBucket":"elsewhere","fileFormat":"CSV","fileSchema":"Key, Size, LastModifiedDate","creationTimestamp":"1","files":[]}"#,
                "lists bucket \"elsewhere\"",
            ),
            (
                r#"{"sourceBucket":"lake-bucket","fileFormat":"CSV","fileSchema":"Key, Size, LastModifiedDate","creationTimestamp":"soon","files":[]}"#,
                "creationTimestamp \"soon\"",
            ),
            (r#"{"sourceBucket":"lake-bucket""#, "invalid JSON"),
        ] {
            std::fs::write(&manifest_path, manifest).unwrap();
            std::fs::write(&checksum_path, hex(&Md5::digest(manifest.as_bytes()))).unwrap();
            let err = latest(dir.path()).await.unwrap_err();
            assert!(matches!(err, InventoryError::Manifest { .. }), "{err:?}");
            assert!(err.to_string().contains(wanted), "{err}");
        }
    }

    /// Writes a one-file report of `rows` in the default schema and reads it.
    async fn read_rows(rows: &[Vec<String>]) -> Result<Vec<ObjectMeta>, InventoryError> {
        let dir = tempfile::tempdir().unwrap();
        ReportBuilder::new(&cfg(), BUCKET, "2024-10-21T00-00Z")
            .rows_file(rows)
            .write_to(dir.path())
            .unwrap();
        let report = latest(dir.path()).await.unwrap();
        read(dir.path(), &report, "", &[])
            .await
            .map(|(objects, _)| objects)
    }

    #[tokio::test]
    async fn malformed_rows_are_errors_naming_file_and_line() {
        let ts = format_timestamp(T0);
        let good = row(&[BUCKET, "a", "1", &ts, "e", "STANDARD"]);
        for (bad, wanted) in [
            (
                row(&[BUCKET, "b", "12x", &ts, "e", "STANDARD"]),
                "size \"12x\" is not a number",
            ),
            (
                row(&[BUCKET, "b", "", &ts, "e", "STANDARD"]),
                "size \"\" is not a number",
            ),
            (
                row(&[BUCKET, "b", "1", "yesterday", "e", "STANDARD"]),
                "last-modified date \"yesterday\"",
            ),
            (
                row(&[BUCKET, "b", "1", &ts, "e"]),
                "5 fields where the schema has 6",
            ),
            (
                row(&[BUCKET, "b%zz", "1", &ts, "e", "STANDARD"]),
                "malformed percent-encoding",
            ),
            (
                row(&[BUCKET, "b%FF", "1", &ts, "e", "STANDARD"]),
                "is not UTF-8",
            ),
        ] {
            let err = read_rows(&[good.clone(), good.clone(), bad])
                .await
                .unwrap_err();
            let InventoryError::Data {
                file,
                line,
                message,
            } = &err
            else {
                panic!("expected a data error, got {err:?}");
            };
            assert_eq!(*line, 3, "{err}");
            assert!(file.starts_with("inv/lake-bucket/daily/data/"), "{file}");
            assert!(message.contains(wanted), "{message} lacks {wanted}");
            assert!(err.to_string().contains(&format!("{file} line 3")), "{err}");
        }
    }

    #[tokio::test]
    async fn damaged_data_files_are_errors() {
        let ts = format_timestamp(T0);
        let text = format!("\"{BUCKET}\",\"a\",\"1\",\"{ts}\",\"e\",\"STANDARD\"\n");
        let gz = gzip(text.as_bytes());

        // Not gzip at all.
        let dir = tempfile::tempdir().unwrap();
        ReportBuilder::new(&cfg(), BUCKET, "2024-10-21T00-00Z")
            .data_file(text.clone().into_bytes())
            .write_to(dir.path())
            .unwrap();
        let report = latest(dir.path()).await.unwrap();
        let err = read(dir.path(), &report, "", &[]).await.unwrap_err();
        assert!(matches!(err, InventoryError::Read { .. }), "{err:?}");

        // The manifest states another size.
        let dir = tempfile::tempdir().unwrap();
        ReportBuilder::new(&cfg(), BUCKET, "2024-10-21T00-00Z")
            .data_file(gz.clone())
            .misstate_last_size(gz.len() as u64 + 5)
            .write_to(dir.path())
            .unwrap();
        let report = latest(dir.path()).await.unwrap();
        let err = read(dir.path(), &report, "", &[]).await.unwrap_err();
        assert!(
            err.to_string().contains(&format!(
                "is {} bytes, the manifest says {}",
                gz.len(),
                gz.len() + 5
            )),
            "{err}"
        );

        // The file changed after the manifest was written: same size, other bytes.
        let dir = tempfile::tempdir().unwrap();
        ReportBuilder::new(&cfg(), BUCKET, "2024-10-21T00-00Z")
            .data_file(gz.clone())
            .write_to(dir.path())
            .unwrap();
        let report = latest(dir.path()).await.unwrap();
        let other = gzip(text.replace("\"a\"", "\"b\"").as_bytes());
        assert_eq!(other.len(), gz.len());
        std::fs::write(dir.path().join(&report.files[0].key), &other).unwrap();
        let err = read(dir.path(), &report, "", &[]).await.unwrap_err();
        assert!(matches!(err, InventoryError::Integrity { .. }), "{err:?}");
        assert!(err.to_string().contains("has md5"), "{err}");

        // A data file the manifest names is gone.
        std::fs::remove_file(dir.path().join(&report.files[0].key)).unwrap();
        let err = read(dir.path(), &report, "", &[]).await.unwrap_err();
        assert!(matches!(err, InventoryError::Lake(_)), "{err:?}");
    }

    #[tokio::test]
    async fn many_rows_are_streamed_in_pages() {
        const ROWS: u64 = 100_000;
        let dir = tempfile::tempdir().unwrap();
        let objects = (0..ROWS).map(|i| object(&format!("nba/game/{i:08}.json"), i, T0 + i as i64));
        ReportBuilder::new(&cfg(), BUCKET, "2024-10-21T00-00Z")
            .objects_file(objects)
            .write_to(dir.path())
            .unwrap();
        let report = latest(dir.path()).await.unwrap();
        // The consumer's channel holds two pages: the reader has to wait for it.
        let (objects, pages) = read(dir.path(), &report, "", &[]).await.unwrap();
        assert_eq!(objects.len() as u64, ROWS);
        assert_eq!(pages.len(), ROWS as usize / LIST_PAGE);
        assert!(pages.iter().all(|&n| n == LIST_PAGE), "{pages:?}");
        for (i, o) in objects.iter().enumerate() {
            assert_eq!(
                *o,
                object(&format!("nba/game/{i:08}.json"), i as u64, T0 + i as i64)
            );
        }
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
    fn keys_decode_form_encoding() {
        let mut scratch = Vec::new();
        for (raw, decoded) in [
            ("plain/key.json", "plain/key.json"),
            ("a+b", "a b"),
            ("a%20b", "a b"),
            ("a%2Bb", "a+b"),
            ("a%2fb%2F", "a/b/"),
            ("%C3%BC", "ü"),
            ("100%25", "100%"),
        ] {
            assert_eq!(
                decode_key(raw.as_bytes(), &mut scratch).unwrap(),
                decoded.as_bytes(),
                "{raw}"
            );
        }
        for raw in ["%", "%2", "%g0", "a%2"] {
            assert!(decode_key(raw.as_bytes(), &mut scratch).is_err(), "{raw}");
        }
        for key in ["a b+c/ü/日本~(x)*.json", "100% sure", ""] {
            let encoded = encode_key(key);
            assert!(
                encoded
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"%+-_.*".contains(&b)),
                "{encoded}"
            );
            assert_eq!(
                decode_key(encoded.as_bytes(), &mut scratch).unwrap(),
                key.as_bytes()
            );
        }
    }

    #[test]
    fn timestamps_parse_like_chrono() {
        for text in [
            "2024-10-22T12:00:00.000Z",
            "2024-10-22T12:00:00Z",
            "2024-02-29T23:59:59.999Z",
            "1970-01-01T00:00:00.000Z",
            "1969-12-31T23:59:59.5Z",
            "2000-03-01T01:02:03.123456Z",
            "2100-12-31T00:00:00.010Z",
        ] {
            let expected = chrono::DateTime::parse_from_rfc3339(text)
                .unwrap()
                .timestamp_millis();
            assert_eq!(parse_utc_fast(text.as_bytes()), Some(expected), "{text}");
        }
        assert_eq!(parse_timestamp(b"2024-10-22T12:00:00.000Z"), Some(T0));
        // Other RFC 3339 shapes go through chrono.
        assert_eq!(parse_timestamp(b"2024-10-22T14:00:00+02:00"), Some(T0));
        for bad in [
            "",
            "2024-10-22",
            "2024-13-01T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2024-10-22T24:00:00Z",
            "2024-10-22T12:00:00.Z",
            "2024-10-22T12:00:00.0x0Z",
            "2024-10-22 12:00:00",
        ] {
            assert_eq!(parse_timestamp(bad.as_bytes()), None, "{bad}");
        }
        assert_eq!(format_timestamp(T0), "2024-10-22T12:00:00.000Z");
    }

    #[test]
    fn sizes_parse_strictly() {
        assert_eq!(parse_size(b"0"), Some(0));
        assert_eq!(parse_size(b"18446744073709551615"), Some(u64::MAX));
        for bad in [&b""[..], b"-1", b"1.5", b" 1", b"18446744073709551616"] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
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
