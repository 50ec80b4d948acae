//! Dependent sources: their partitions come from values inside parent
//! objects (`from_objects`). Each parent object is read once per version:
//! the extracted values are cached by key, size and modification time, and
//! parents that vanished are forgotten. Unreadable parents and rejected
//! values are logged with the parent's key and yield no values.

use std::sync::Arc;

use tracing::warn;

use super::Reconciler;
use super::observed::{ObservedIndex, ObservedObject};
use crate::catalog::{ExpectedPartition, FromObjects};
use crate::logs::Event;
use crate::model::{Partition, UnixMs};

/// Values extracted from one version of a parent object.
#[derive(Debug, Clone)]
pub(super) struct ParentEntry {
    size: u64,
    modified_ms: UnixMs,
    values: Arc<Vec<String>>,
}

impl Reconciler {
    /// Partitions of every dependent source, from the values inside their
    /// parent objects. Unreadable parents and rejected values are logged.
    pub(super) async fn expand_dependent(
        &mut self,
        index: &ObservedIndex,
    ) -> Vec<(usize, Vec<ExpectedPartition>)> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (idx, source) in self.catalog.sources.iter().enumerate() {
            let Some(dep) = source.dependency() else {
                continue;
            };
            let prefix = dep.template().literal_prefix();
            let mut matches: Vec<(String, ObservedObject, Partition)> = index
                .iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .filter_map(|(k, o)| dep.match_parent(k).map(|p| (k.to_string(), o, p)))
                .collect();
            matches.sort_by(|a, b| a.0.cmp(&b.0));
            let mut parents = Vec::with_capacity(matches.len());
            for (key, object, parent_vars) in matches {
                seen.insert(key.clone());
                let cached = self
                    .parents
                    .get(&key)
                    .filter(|e| e.size == object.size && e.modified_ms == object.modified_ms)
                    .map(|e| e.values.clone());
                let values = match cached {
                    Some(values) => values,
                    None => {
                        let values = Arc::new(self.read_parent(&source.name, &key, dep).await);
                        self.parents.insert(
                            key.clone(),
                            ParentEntry {
                                size: object.size,
                                modified_ms: object.modified_ms,
                                values: values.clone(),
                            },
                        );
                        values
                    }
                };
                parents.push((parent_vars, values.as_ref().clone()));
            }
            out.push((idx, self.catalog.expand_dependent(idx, &parents)));
        }
        // Forget parents that are gone.
        self.parents.retain(|k, _| seen.contains(k));
        out
    }

    /// Reads one parent object and extracts its values; problems are logged
    /// with the parent's key and yield no values.
    async fn read_parent(&self, source: &str, key: &str, dep: &FromObjects) -> Vec<String> {
        let bytes = match self.lake.get(key, dep.max_bytes()).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Vec::new(),
            Err(e) => {
                self.scheduler.log(
                    Event::warn(format!("parent object {key} unreadable: {e}"))
                        .source(source)
                        .row(),
                );
                return Vec::new();
            }
        };
        let extracted = dep.extract(&bytes);
        if let Some(error) = &extracted.error {
            self.scheduler.log(
                Event::warn(format!("parent object {key}: {error}"))
                    .source(source)
                    .row(),
            );
        }
        for rejected in &extracted.rejected {
            warn!(source, parent = key, value = %rejected.excerpt, reason = %rejected.reason, "value rejected");
            self.scheduler.log(
                Event::warn(format!(
                    "value {} in parent object {key} rejected: {}",
                    rejected.excerpt, rejected.reason
                ))
                .source(source)
                .row(),
            );
        }
        extracted.values
    }
}
