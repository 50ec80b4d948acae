//! CSV rows of a data file into listing pages: where the schema puts the
//! columns read ([`Columns`]), which keys are kept and how they are
//! shortened ([`KeyFilter`]), the form-URL decoding of keys, and the parse
//! of each row into an [`ObjectMeta`] sent to the [`PageSink`] in pages of
//! [`LIST_PAGE`].
//!
//! Invariants: every malformed row is an error naming the data file and the
//! row's line, never skipped; delete markers and non-latest versions are
//! skipped; a decoded key longer than S3 allows, or not UTF-8, is an error.

use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};

use super::time::parse_timestamp;
use super::{DataFile, InventoryError};
use crate::lake::{LIST_PAGE, ObjectMeta, PageSink};

/// The longest key S3 stores, in bytes: a longer decoded key marks a corrupt row.
const S3_MAX_KEY_BYTES: usize = 1024;

/// Where the columns this module reads are in a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Columns {
    count: usize,
    key: usize,
    size: usize,
    modified: usize,
    is_latest: Option<usize>,
    is_delete_marker: Option<usize>,
}

impl Columns {
    pub(super) fn from_schema(schema: &[String]) -> Result<Columns, String> {
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
pub(super) struct KeyFilter {
    /// Stripped from every key; keys not under it are dropped.
    lake_prefix: Vec<u8>,
    /// Sorted, and none is a prefix of another; empty keeps everything.
    prefixes: Vec<Vec<u8>>,
}

impl KeyFilter {
    pub(super) fn new(lake_prefix: &str, prefixes: &[String]) -> KeyFilter {
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

/// Parses the rows of `csv` (one data file, `file`) into pages sent to
/// `pages`, keeping what `filter` keeps; returns how many objects it sent.
/// When `stop` is set (another file failed) it returns at once.
pub(super) fn parse_rows<R: Read>(
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

#[cfg(test)]
mod tests {
    use super::super::fixtures::{BUCKET, T0, cfg, latest, object, read, row};
    use super::super::testing::{ReportBuilder, encode_key, format_timestamp};
    use super::*;

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
    fn sizes_parse_strictly() {
        assert_eq!(parse_size(b"0"), Some(0));
        assert_eq!(parse_size(b"18446744073709551615"), Some(u64::MAX));
        for bad in [&b""[..], b"-1", b"1.5", b" 1", b"18446744073709551616"] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
    }
}
