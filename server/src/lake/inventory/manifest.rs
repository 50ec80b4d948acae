//! An inventory report's manifest: `manifest.json` parsed into a [`Report`]
//! and checked against the MD5 hex in `manifest.checksum` beside it.
//!
//! Invariant: a [`Report`] parsed here lists the expected source bucket in
//! CSV, with a schema holding the columns [`Columns`] needs, so reading it
//! can only fail on its data files. [`super::latest_report`] parses a
//! manifest only after [`verify_checksum`] accepted it.

use md5::{Digest, Md5};
use serde::Deserialize;

use super::rows::Columns;
use super::{DataFile, InventoryError, Report};

/// The largest `manifest.json` read (a manifest lists one entry per data file).
pub(super) const MAX_MANIFEST_BYTES: u64 = 64 << 20;
/// The largest `manifest.checksum` read (it holds 32 hex digits).
pub(super) const MAX_CHECKSUM_BYTES: u64 = 1024;
/// The only data file format this module reads.
pub(super) const SUPPORTED_FORMAT: &str = "CSV";
/// The manifest's name inside a report directory.
pub(super) const MANIFEST: &str = "manifest.json";
/// The checksum's name inside a report directory.
pub(super) const CHECKSUM: &str = "manifest.checksum";

/// Checks `manifest` (the bytes of `manifest_key`) against `checksum`, the
/// bytes of `manifest.checksum`: an MD5 hex, compared without surrounding
/// whitespace and case.
pub(super) fn verify_checksum(
    manifest_key: &str,
    checksum: &[u8],
    manifest: &[u8],
) -> Result<(), InventoryError> {
    let expected = String::from_utf8_lossy(checksum)
        .trim()
        .to_ascii_lowercase();
    let actual = hex(&Md5::digest(manifest));
    if expected != actual {
        return Err(InventoryError::Checksum {
            manifest: manifest_key.to_string(),
            expected: expected.chars().take(64).collect(),
            actual,
        });
    }
    Ok(())
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

/// Parses `manifest.json` (the bytes of `key`) of the report in `dir`,
/// which must list `source_bucket` in CSV with the columns reads need.
pub(super) fn parse_manifest(
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

/// Lowercase hex of `bytes`.
pub(super) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use md5::{Digest, Md5};

    use super::super::fixtures::{BUCKET, T0, cfg, latest, object};
    use super::super::testing::{ChecksumMode, ReportBuilder};
    use super::*;

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
}
