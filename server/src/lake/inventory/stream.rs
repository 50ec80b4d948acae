//! Streaming one data file of a report: an async task prefetches its bytes
//! in chunks from the [`ObjectSource`] while a blocking thread counts and
//! hashes them, decompresses the gzip members and hands the CSV reader to
//! [`parse_rows`].
//!
//! Invariants: no data file is ever held whole in memory (at most
//! [`PREFETCH_CHUNKS`] chunks of [`READ_CHUNK`] bytes wait for the parser);
//! a file counts as read only once every byte passed the size and MD5 the
//! manifest gives, so pages it sent before a failure must be discarded.

use std::io::{self, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use md5::{Digest, Md5};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use super::manifest::hex;
use super::rows::{Columns, KeyFilter, parse_rows};
use super::{DataFile, InventoryError};
use crate::lake::{ByteReader, ObjectSource, PageSink};

/// How many bytes of a data file are handed to the parser at a time.
const READ_CHUNK: usize = 256 << 10;
/// How many chunks are read ahead of the parser.
const PREFETCH_CHUNKS: usize = 4;
/// The CSV parser's buffer size.
const CSV_BUFFER: usize = 256 << 10;

/// Reads one data file: an async task prefetches its bytes while a blocking
/// thread checks, decompresses and parses them.
pub(super) async fn read_data_file(
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

#[cfg(test)]
mod tests {
    use super::super::fixtures::{BUCKET, T0, cfg, latest, object, read};
    use super::super::testing::{ReportBuilder, format_timestamp, gzip};
    use super::*;
    use crate::lake::LIST_PAGE;

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
}
