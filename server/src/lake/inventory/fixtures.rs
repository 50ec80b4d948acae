//! Shared helpers of this folder's unit tests: the inventory config and
//! bucket they use, and reading a report written with
//! [`super::testing::ReportBuilder`] whole from a [`LocalDir`] in a temp dir.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::{InventoryError, Report, latest_report, read_report};
use crate::config::InventoryConfig;
use crate::lake::{LocalDir, ObjectMeta, ObjectSource};

pub(super) const BUCKET: &str = "lake-bucket";
pub(super) const T0: i64 = 1_729_598_400_000; // 2024-10-22T12:00:00Z

pub(super) fn cfg() -> InventoryConfig {
    InventoryConfig {
        bucket: "inventory-destination".to_string(),
        prefix: "inv/".to_string(),
        config_id: "daily".to_string(),
    }
}

pub(super) fn object(key: &str, size: u64, modified_ms: i64) -> ObjectMeta {
    ObjectMeta {
        key: key.to_string(),
        size,
        modified_ms,
    }
}

pub(super) fn row(fields: &[&str]) -> Vec<String> {
    fields.iter().map(|f| f.to_string()).collect()
}

/// Reads a report whole; returns the objects sorted by key and the pages' sizes.
pub(super) async fn read(
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

pub(super) async fn latest(root: &std::path::Path) -> Result<Report, InventoryError> {
    latest_report(&LocalDir::new(root), &cfg(), BUCKET).await
}
