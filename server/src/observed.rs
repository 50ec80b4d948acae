//! What the lake HAS, in a form sized for millions of keys: every observed
//! key's bytes live in one arena, each object is a fixed 24-byte entry, and an
//! open-addressing table of `u32` indices finds a key by its hash. About 70
//! bytes per object all told, against ~100+ for a `HashMap<String, _>`, and no
//! allocation per key.

use std::hash::BuildHasher;

use crate::model::UnixMs;

/// What the lake holds for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObservedObject {
    /// Size in bytes.
    pub size: u64,
    /// Last modification, ms since the Unix epoch.
    pub modified_ms: UnixMs,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    offset: u32,
    len: u32,
    size: u64,
    modified_ms: UnixMs,
}

/// An empty slot in the table.
const EMPTY: u32 = u32::MAX;
/// `modified_ms` of a removed entry (the key stays in the arena).
const REMOVED: UnixMs = UnixMs::MIN;

/// Observed objects by key. Inserting a key twice keeps the later metadata.
#[derive(Debug, Clone)]
pub struct ObservedIndex {
    arena: Vec<u8>,
    entries: Vec<Entry>,
    table: Vec<u32>,
    hasher: foldhash::fast::RandomState,
}

impl Default for ObservedIndex {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl ObservedIndex {
    /// An empty index with room for `n` objects before it grows.
    pub fn with_capacity(n: usize) -> Self {
        ObservedIndex {
            arena: Vec::new(),
            entries: Vec::with_capacity(n),
            table: vec![EMPTY; table_size_for(n)],
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    /// How many distinct keys it holds (removed ones included until
    /// re-inserted; see [`ObservedIndex::present`]).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// How many keys are present (not removed).
    pub fn present(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| e.modified_ms != REMOVED)
            .count()
    }

    /// Marks `key` as absent (a later observation found it gone).
    pub fn remove(&mut self, key: &str) {
        if self.entries.is_empty() {
            return;
        }
        let idx = self.table[self.slot(key.as_bytes())];
        if idx != EMPTY {
            self.entries[idx as usize].modified_ms = REMOVED;
        }
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn key_of(&self, e: &Entry) -> &[u8] {
        &self.arena[e.offset as usize..e.offset as usize + e.len as usize]
    }

    /// The slot holding `key`, or the empty slot where it would go.
    fn slot(&self, key: &[u8]) -> usize {
        let mask = self.table.len() - 1;
        let mut i = (self.hasher.hash_one(key) as usize) & mask;
        loop {
            let idx = self.table[i];
            if idx == EMPTY || self.key_of(&self.entries[idx as usize]) == key {
                return i;
            }
            i = (i + 1) & mask;
        }
    }

    /// Adds or updates `key` (`modified_ms` must not be `i64::MIN`). Keys longer than `u32::MAX` bytes or an arena
    /// beyond 4 GiB are refused (returns false).
    pub fn insert(&mut self, key: &str, object: ObservedObject) -> bool {
        if (self.entries.len() + 1) * 2 > self.table.len() {
            self.grow();
        }
        let slot = self.slot(key.as_bytes());
        if self.table[slot] != EMPTY {
            let e = &mut self.entries[self.table[slot] as usize];
            e.size = object.size;
            e.modified_ms = object.modified_ms;
            return true;
        }
        let (Ok(offset), Ok(len), Ok(idx)) = (
            u32::try_from(self.arena.len()),
            u32::try_from(key.len()),
            u32::try_from(self.entries.len()),
        ) else {
            return false;
        };
        if idx == EMPTY || offset.checked_add(len).is_none() {
            return false;
        }
        self.arena.extend_from_slice(key.as_bytes());
        self.entries.push(Entry {
            offset,
            len,
            size: object.size,
            modified_ms: object.modified_ms,
        });
        self.table[slot] = idx;
        true
    }

    /// The object at `key`.
    pub fn get(&self, key: &str) -> Option<ObservedObject> {
        if self.entries.is_empty() {
            return None;
        }
        let idx = self.table[self.slot(key.as_bytes())];
        if idx == EMPTY {
            return None;
        }
        let e = &self.entries[idx as usize];
        (e.modified_ms != REMOVED).then_some(ObservedObject {
            size: e.size,
            modified_ms: e.modified_ms,
        })
    }

    /// Every present key with its object, in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, ObservedObject)> {
        self.entries
            .iter()
            .filter(|e| e.modified_ms != REMOVED)
            .map(|e| {
                // Keys were inserted from `&str`, so the bytes are UTF-8.
                let key = std::str::from_utf8(self.key_of(e)).unwrap_or_default();
                (
                    key,
                    ObservedObject {
                        size: e.size,
                        modified_ms: e.modified_ms,
                    },
                )
            })
    }

    /// Bytes of heap the index holds (for benchmarks and logs).
    pub fn heap_bytes(&self) -> usize {
        self.arena.capacity()
            + self.entries.capacity() * std::mem::size_of::<Entry>()
            + self.table.capacity() * std::mem::size_of::<u32>()
    }

    fn grow(&mut self) {
        let size = table_size_for(self.entries.len() + 1).max(self.table.len() * 2);
        self.table = vec![EMPTY; size];
        let mask = size - 1;
        for (idx, e) in self.entries.iter().enumerate() {
            let key = &self.arena[e.offset as usize..e.offset as usize + e.len as usize];
            let mut i = (self.hasher.hash_one(key) as usize) & mask;
            while self.table[i] != EMPTY {
                i = (i + 1) & mask;
            }
            // `insert` never lets the index reach `EMPTY`.
            self.table[i] = idx as u32;
        }
    }
}

/// A power of two at least twice `n` (load factor ≤ 1/2), at least 16.
fn table_size_for(n: usize) -> usize {
    (n.saturating_mul(2)).next_power_of_two().max(16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn obj(size: u64) -> ObservedObject {
        ObservedObject {
            size,
            modified_ms: size as i64 * 10,
        }
    }

    #[test]
    fn inserts_finds_updates_and_grows() {
        let mut index = ObservedIndex::default();
        assert!(index.get("a").is_none());
        for i in 0..10_000u64 {
            assert!(index.insert(&format!("k/{i}"), obj(i)));
        }
        assert_eq!(index.len(), 10_000);
        assert_eq!(index.get("k/1234"), Some(obj(1234)));
        assert_eq!(index.get("k/10000"), None);
        assert_eq!(index.get("k/"), None);
        index.insert("k/5", obj(99));
        assert_eq!(index.len(), 10_000);
        assert_eq!(index.get("k/5"), Some(obj(99)));
        assert_eq!(index.iter().count(), 10_000);
        index.remove("k/7");
        index.remove("absent");
        assert_eq!(index.get("k/7"), None);
        assert_eq!(index.present(), 9_999);
        assert_eq!(index.iter().count(), 9_999);
        index.insert("k/7", obj(7));
        assert_eq!(index.get("k/7"), Some(obj(7)));
        assert!(index.heap_bytes() > 0);
    }

    proptest! {
        /// The index answers exactly like a HashMap.
        #[test]
        fn behaves_like_a_map(ops in proptest::collection::vec(("[a-c]{0,4}", 0u64..5), 0..300)) {
            let mut index = ObservedIndex::with_capacity(3);
            let mut map = std::collections::HashMap::new();
            for (key, size) in &ops {
                index.insert(key, obj(*size));
                map.insert(key.clone(), obj(*size));
            }
            prop_assert_eq!(index.len(), map.len());
            for (key, value) in &map {
                prop_assert_eq!(index.get(key), Some(*value));
            }
            prop_assert_eq!(index.get("zzz"), None);
        }
    }
}
