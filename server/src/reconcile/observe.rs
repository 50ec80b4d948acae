//! Observing the lake: what it HAS, as an [`ObservedIndex`]. By listing the
//! catalog's prefixes (in parallel, pages folded into the index as they
//! come), or from the newest S3 Inventory report, patched by re-listing hot
//! sources and confirming the expected objects of recent partitions one by
//! one, so what changed since the report is seen.

use std::sync::Arc;

use chrono::NaiveDate;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::warn;

use super::Reconciler;
use super::observed::{ObservedIndex, ObservedObject};
use crate::catalog::ExpectedPartition;
use crate::config::InventoryConfig;
use crate::error::{Error, Result};
use crate::lake::inventory;
use crate::lake::{ObjectMeta, ObjectSource, PageSink, SharedLake};
use crate::logs::Event;
use crate::model::{UnixMs, Value, for_each_product};

/// How many listing pages may wait for the reconciler at once.
const PAGES_IN_FLIGHT: usize = 64;
/// Partitions dated this close to an inventory report (or after it) are
/// confirmed against the lake itself.
const REPORT_MARGIN_DAYS: i64 = 1;
/// The most objects confirmed one by one after an inventory report; beyond
/// it the recent objects are left to the next report.
const MAX_CONFIRMED: usize = 20_000;
/// Confirmations in flight at once.
const CONFIRM_CONCURRENCY: usize = 16;

/// Where S3 Inventory reports for the lake's bucket are delivered.
#[derive(Clone)]
pub struct InventorySource {
    /// The destination bucket (or a directory standing in for it).
    pub store: Arc<dyn ObjectSource>,
    /// Destination prefix and configuration id.
    pub config: InventoryConfig,
    /// The lake's bucket (the report's source bucket).
    pub source_bucket: String,
    /// The lake's key prefix inside its bucket (stripped from report keys).
    pub lake_prefix: String,
}

impl std::fmt::Debug for InventorySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InventorySource")
            .field("store", &self.store.describe())
            .field("config", &self.config)
            .finish()
    }
}

/// What was observed, and how.
pub(super) struct Observation {
    pub(super) index: ObservedIndex,
    pub(super) evidence: String,
    /// When the inventory report was made, if one was used.
    pub(super) report_ms: Option<UnixMs>,
}

impl Reconciler {
    /// Observes the lake: from the newest inventory report when one is
    /// configured and usable, by listing otherwise.
    pub(super) async fn observe(&self) -> Result<Observation> {
        let prefixes = self.catalog.prefixes();
        if let Some(inv) = &self.inventory {
            match self.observe_report(inv, &prefixes).await {
                Ok(observation) => return Ok(observation),
                Err(e) => {
                    warn!(error = %e, "inventory report unusable; listing the lake instead");
                    self.scheduler.log(
                        Event::warn(format!(
                            "inventory report unusable, listing the lake instead: {e}"
                        ))
                        .row(),
                    );
                }
            }
        }
        let mut index = ObservedIndex::default();
        list_into(&self.lake, &prefixes, &mut index).await?;
        Ok(Observation {
            index,
            evidence: "listing".into(),
            report_ms: None,
        })
    }

    async fn observe_report(
        &self,
        inv: &InventorySource,
        prefixes: &[String],
    ) -> Result<Observation> {
        let report = inventory::latest_report(inv.store.as_ref(), &inv.config, &inv.source_bucket)
            .await
            .map_err(|e| Error::Internal(e.to_string()))?;
        let (tx, rx) = mpsc::channel(PAGES_IN_FLIGHT);
        let store = inv.store.clone();
        let lake_prefix = inv.lake_prefix.clone();
        let wanted = prefixes.to_vec();
        let reading = {
            let report = report.clone();
            async move {
                inventory::read_report(store, &report, &lake_prefix, &wanted, tx)
                    .await
                    .map_err(|e| Error::Internal(e.to_string()))
            }
        };
        let mut index = ObservedIndex::default();
        let (read, ()) = tokio::join!(reading, fold_pages(rx, &mut index));
        read?;
        let created = chrono::DateTime::from_timestamp_millis(report.created_ms)
            .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
            .unwrap_or_default();
        Ok(Observation {
            index,
            evidence: format!("inventory report of {created} ({})", report.dir),
            report_ms: Some(report.created_ms),
        })
    }

    /// After an inventory report: re-lists hot sources and confirms the
    /// expected objects of partitions dated near or after the report one by
    /// one, so what changed since the report is seen. Returns how many
    /// objects were confirmed.
    pub(super) async fn confirm_recent(
        &self,
        index: &mut ObservedIndex,
        report_ms: UnixMs,
        today: NaiveDate,
        dependent: &[(usize, Vec<ExpectedPartition>)],
    ) -> Result<usize> {
        let cutoff = chrono::DateTime::from_timestamp_millis(report_ms)
            .map_or(today, |t| t.date_naive())
            - chrono::Duration::days(REPORT_MARGIN_DAYS);
        // Hot sources: list their prefixes afresh.
        let hot: Vec<String> = self
            .catalog
            .sources
            .iter()
            .filter(|s| s.hot)
            .flat_map(|s| s.objects.iter().map(|t| t.literal_prefix().to_string()))
            .collect();
        let mut confirmed = 0;
        if !hot.is_empty() {
            let stale: Vec<String> = index
                .iter()
                .filter(|(k, _)| hot.iter().any(|p| k.starts_with(p.as_str())))
                .map(|(k, _)| k.to_string())
                .collect();
            for key in &stale {
                index.remove(key);
            }
            confirmed += list_into(&self.lake, &hot, index).await?;
        }
        // Recent partitions: every expected key, confirmed by a stat.
        let mut keys = Vec::new();
        for source in &self.catalog.sources {
            if source.hot || source.dependency().is_some() {
                continue;
            }
            let generators: Vec<(String, Vec<Value>)> = source
                .generators
                .iter()
                .map(|g| {
                    let values = g
                        .values(today)
                        .into_iter()
                        .filter(|v| !matches!(v, Value::Date(d) if *d < cutoff))
                        .collect();
                    (g.var().to_string(), values)
                })
                .collect();
            if !generators
                .iter()
                .flat_map(|(_, vs)| vs)
                .any(|v| matches!(v, Value::Date(_)))
            {
                continue;
            }
            for_each_product(&generators, |p| {
                if keys.len() < MAX_CONFIRMED {
                    keys.extend(source.keys(p).unwrap_or_default());
                }
            });
        }
        for (source, partitions) in dependent {
            if self.catalog.sources[*source].hot {
                continue;
            }
            for exp in partitions {
                if exp.partition.date().is_some_and(|d| d >= cutoff) && keys.len() < MAX_CONFIRMED {
                    keys.extend(exp.keys.iter().cloned());
                }
            }
        }
        if keys.len() >= MAX_CONFIRMED {
            warn!(
                limit = MAX_CONFIRMED,
                "too many recent objects to confirm one by one; the rest wait for the next report"
            );
        }
        for chunk in keys.chunks(CONFIRM_CONCURRENCY) {
            let mut stats = JoinSet::new();
            for key in chunk {
                let lake = self.lake.clone();
                let key = key.clone();
                stats.spawn(async move {
                    let meta = lake.stat(&key).await;
                    (key, meta)
                });
            }
            while let Some(joined) = stats.join_next().await {
                let (key, meta) =
                    joined.map_err(|e| Error::Internal(format!("confirmation panicked: {e}")))?;
                match meta? {
                    Some(meta) => {
                        index.insert(
                            &key,
                            ObservedObject {
                                size: meta.size,
                                modified_ms: meta.modified_ms,
                            },
                        );
                    }
                    None => index.remove(&key),
                }
                confirmed += 1;
            }
        }
        Ok(confirmed)
    }
}

/// Lists `prefixes` in parallel into `index`; returns how many objects were listed.
pub async fn list_into(
    lake: &SharedLake,
    prefixes: &[String],
    index: &mut ObservedIndex,
) -> Result<usize> {
    let (tx, rx) = mpsc::channel(PAGES_IN_FLIGHT);
    let mut listings = JoinSet::new();
    for prefix in prefixes {
        let lake = lake.clone();
        let prefix = prefix.clone();
        let pages: PageSink = tx.clone();
        listings.spawn(async move { lake.list(&prefix, pages).await });
    }
    drop(tx);
    fold_pages(rx, index).await;
    let mut listed = 0;
    while let Some(listing) = listings.join_next().await {
        listed += listing.map_err(|e| Error::Internal(format!("lake listing panicked: {e}")))??;
    }
    Ok(usize::try_from(listed).unwrap_or(usize::MAX))
}

/// Folds listing pages into `index` until the channel closes.
pub async fn fold_pages(mut pages: mpsc::Receiver<Vec<ObjectMeta>>, index: &mut ObservedIndex) {
    while let Some(page) = pages.recv().await {
        index.insert_many(page.iter().map(|meta| {
            (
                meta.key.as_str(),
                ObservedObject {
                    size: meta.size,
                    modified_ms: meta.modified_ms,
                },
            )
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lake::LocalLake;

    async fn write(lake: &SharedLake, key: &str, bytes: &[u8]) -> ObjectMeta {
        let mut w = lake.put(key).await.unwrap();
        w.write(bytes).await.unwrap();
        w.commit().await.unwrap()
    }

    /// Listing several prefixes in parallel folds every object under them,
    /// and nothing else, into the index with its size and time; the count
    /// returned is what was listed.
    #[tokio::test]
    async fn list_into_folds_every_prefix_into_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let lake: SharedLake = Arc::new(LocalLake::open(dir.path()).unwrap());
        let a = write(&lake, "a/1.json", b"one").await;
        write(&lake, "a/2.json", b"two!").await;
        write(&lake, "b/x/3.csv", b"").await;
        write(&lake, "c/elsewhere.json", b"not listed").await;

        let mut index = ObservedIndex::default();
        let listed = list_into(&lake, &["a/".into(), "b/".into()], &mut index)
            .await
            .unwrap();
        assert_eq!(listed, 3);
        assert_eq!(index.present(), 3);
        assert_eq!(
            index.get("a/1.json"),
            Some(ObservedObject {
                size: 3,
                modified_ms: a.modified_ms
            })
        );
        assert_eq!(index.get("a/2.json").map(|o| o.size), Some(4));
        assert_eq!(index.get("b/x/3.csv").map(|o| o.size), Some(0));
        assert_eq!(index.get("c/elsewhere.json"), None);

        // A second listing into the same index replaces, not duplicates.
        write(&lake, "a/1.json", b"longer now").await;
        list_into(&lake, &["a/".into()], &mut index).await.unwrap();
        assert_eq!(index.present(), 3);
        assert_eq!(index.get("a/1.json").map(|o| o.size), Some(10));
    }

    /// Pages fold in the order they come until the channel closes; a later
    /// page's entry for a key wins.
    #[tokio::test]
    async fn fold_pages_reads_until_the_channel_closes() {
        let (tx, rx) = mpsc::channel(2);
        let meta = |key: &str, size| ObjectMeta {
            key: key.into(),
            size,
            modified_ms: 7,
        };
        let sender = tokio::spawn(async move {
            tx.send(vec![meta("k/1", 1), meta("k/2", 2)]).await.unwrap();
            tx.send(vec![]).await.unwrap();
            tx.send(vec![meta("k/1", 11)]).await.unwrap();
        });
        let mut index = ObservedIndex::default();
        fold_pages(rx, &mut index).await;
        sender.await.unwrap();
        assert_eq!(index.present(), 2);
        assert_eq!(index.get("k/1").map(|o| o.size), Some(11));
        assert_eq!(index.get("k/2").map(|o| o.size), Some(2));
    }
}
