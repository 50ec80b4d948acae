//! What the lake HAS, in a form sized for millions of keys. Each observed
//! object is one record in a byte arena — key length, size, modification
//! time, key bytes — and an open-addressing table of `u64` slots (a 32-bit
//! hash tag and the record's offset) finds a key with one table read and one
//! arena read; slots whose tag differs are skipped without touching the
//! arena. About 75 bytes per object all told and no allocation per key.

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

/// An empty table slot.
const EMPTY: u64 = u64::MAX;
/// `modified_ms` of a removed record (the record stays in the arena).
const REMOVED: UnixMs = UnixMs::MIN;
/// Record layout: key length (u16), size (u64), modified (i64), key bytes.
const HEADER: usize = 2 + 8 + 8;
/// Keys looked up or inserted together by the batch operations.
const BATCH: usize = 64;

/// Observed objects by key. Inserting a key twice keeps the later metadata.
#[derive(Debug, Clone)]
pub struct ObservedIndex {
    arena: Vec<u8>,
    table: Vec<u64>,
    len: usize,
    removed: usize,
    hasher: foldhash::fast::RandomState,
}

impl Default for ObservedIndex {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    let mut buf = [0u8; 8];
    buf.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(buf)
}

impl ObservedIndex {
    /// An empty index with room for `n` objects before its table grows.
    pub fn with_capacity(n: usize) -> Self {
        ObservedIndex {
            arena: Vec::new(),
            table: vec![EMPTY; table_size_for(n)],
            len: 0,
            removed: 0,
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    /// Reserves arena room for this many bytes of keys more.
    pub fn reserve_bytes(&mut self, key_bytes: usize) {
        // Assumes keys of 24 bytes or more on average, like real object keys.
        let records = key_bytes / 24 + 1;
        self.arena.reserve(key_bytes + records * HEADER);
    }

    /// How many distinct keys it has seen (removed ones included).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many keys are present (not removed).
    pub fn present(&self) -> usize {
        self.len - self.removed
    }

    fn record_key(&self, offset: usize) -> &[u8] {
        let len = usize::from(u16::from_le_bytes([
            self.arena[offset],
            self.arena[offset + 1],
        ]));
        &self.arena[offset + HEADER..offset + HEADER + len]
    }

    fn record_object(&self, offset: usize) -> ObservedObject {
        ObservedObject {
            size: read_u64(&self.arena, offset + 2),
            modified_ms: read_u64(&self.arena, offset + 10) as i64,
        }
    }

    fn set_object(&mut self, offset: usize, object: ObservedObject) {
        self.arena[offset + 2..offset + 10].copy_from_slice(&object.size.to_le_bytes());
        self.arena[offset + 10..offset + 18].copy_from_slice(&object.modified_ms.to_le_bytes());
    }

    /// The slot holding `key`, or the empty slot where it would go.
    fn slot(&self, key: &[u8], hash: u64) -> usize {
        let mask = self.table.len() - 1;
        let tag = hash >> 32;
        let mut i = (hash as usize) & mask;
        loop {
            let slot = self.table[i];
            if slot == EMPTY
                || (slot >> 32 == tag && self.record_key((slot & 0xffff_ffff) as usize) == key)
            {
                return i;
            }
            i = (i + 1) & mask;
        }
    }

    /// Adds or updates `key` (`modified_ms` must not be `i64::MIN`). Keys
    /// longer than 65,535 bytes, or an arena past 4 GiB, are refused (false).
    pub fn insert(&mut self, key: &str, object: ObservedObject) -> bool {
        if (self.len + 1) * 2 > self.table.len() {
            self.grow();
        }
        let hash = self.hasher.hash_one(key.as_bytes());
        self.insert_hashed(key, hash, object)
    }

    /// `insert` with the key's hash already computed and room in the table.
    fn insert_hashed(&mut self, key: &str, hash: u64, object: ObservedObject) -> bool {
        let i = self.slot(key.as_bytes(), hash);
        if self.table[i] != EMPTY {
            let offset = (self.table[i] & 0xffff_ffff) as usize;
            if self.record_object(offset).modified_ms == REMOVED {
                self.removed -= 1;
            }
            self.set_object(offset, object);
            return true;
        }
        let (Ok(len), Ok(offset)) = (u16::try_from(key.len()), u32::try_from(self.arena.len()))
        else {
            return false;
        };
        if u32::try_from(self.arena.len() + HEADER + key.len()).is_err() {
            return false;
        }
        self.arena.extend_from_slice(&len.to_le_bytes());
        self.arena.extend_from_slice(&object.size.to_le_bytes());
        self.arena
            .extend_from_slice(&object.modified_ms.to_le_bytes());
        self.arena.extend_from_slice(key.as_bytes());
        self.table[i] = ((hash >> 32) << 32) | u64::from(offset);
        self.len += 1;
        true
    }

    /// The object at `key`.
    pub fn get(&self, key: &str) -> Option<ObservedObject> {
        let hash = self.hasher.hash_one(key.as_bytes());
        let slot = self.table[self.slot(key.as_bytes(), hash)];
        if slot == EMPTY {
            return None;
        }
        let object = self.record_object((slot & 0xffff_ffff) as usize);
        (object.modified_ms != REMOVED).then_some(object)
    }

    /// Hashes `keys` and reads their first table slots and records in
    /// separate passes, so the memory reads of a batch overlap instead of
    /// waiting on each other; the answers then come from cache.
    fn warm(&self, keys: &[&str], hashes: &mut Vec<u64>) {
        let mask = self.table.len() - 1;
        hashes.clear();
        hashes.extend(keys.iter().map(|k| self.hasher.hash_one(k.as_bytes())));
        let mut slots = [EMPTY; BATCH];
        for (slot, hash) in slots.iter_mut().zip(hashes.iter()) {
            *slot = self.table[(*hash as usize) & mask];
        }
        // Only records whose tag matches will be compared: read just those.
        let mut touched = 0u8;
        for (slot, hash) in slots.iter().zip(hashes.iter()) {
            if *slot != EMPTY && slot >> 32 == hash >> 32 {
                touched ^= self.arena[(slot & 0xffff_ffff) as usize];
            }
        }
        std::hint::black_box(touched);
    }

    /// Looks up many keys; answers in `out` (cleared first), in order. Faster
    /// than one `get` per key on large indexes (see `warm`).
    pub fn get_many(&self, keys: &[&str], out: &mut Vec<Option<ObservedObject>>) {
        out.clear();
        let mut hashes = Vec::with_capacity(BATCH);
        for chunk in keys.chunks(BATCH) {
            self.warm(chunk, &mut hashes);
            for (key, hash) in chunk.iter().zip(&hashes) {
                let slot = self.table[self.slot(key.as_bytes(), *hash)];
                out.push(
                    (slot != EMPTY)
                        .then(|| self.record_object((slot & 0xffff_ffff) as usize))
                        .filter(|o| o.modified_ms != REMOVED),
                );
            }
        }
    }

    /// Inserts many objects (see [`ObservedIndex::insert`]), overlapping
    /// their memory reads.
    pub fn insert_many<'k>(
        &mut self,
        objects: impl IntoIterator<Item = (&'k str, ObservedObject)>,
    ) {
        let mut hashes = Vec::with_capacity(BATCH);
        let mut batch: Vec<(&str, ObservedObject)> = Vec::with_capacity(BATCH);
        let mut keys: Vec<&str> = Vec::with_capacity(BATCH);
        let mut objects = objects.into_iter().peekable();
        while objects.peek().is_some() {
            batch.clear();
            batch.extend(objects.by_ref().take(BATCH));
            if (self.len + batch.len()) * 2 > self.table.len() {
                while (self.len + batch.len()) * 2 > self.table.len() {
                    self.grow();
                }
            }
            keys.clear();
            keys.extend(batch.iter().map(|(k, _)| *k));
            self.warm(&keys, &mut hashes);
            for ((key, object), hash) in batch.iter().zip(&hashes) {
                self.insert_hashed(key, *hash, *object);
            }
        }
    }

    /// Marks `key` as absent (a later observation found it gone).
    pub fn remove(&mut self, key: &str) {
        let hash = self.hasher.hash_one(key.as_bytes());
        let slot = self.table[self.slot(key.as_bytes(), hash)];
        if slot == EMPTY {
            return;
        }
        let offset = (slot & 0xffff_ffff) as usize;
        let object = self.record_object(offset);
        if object.modified_ms != REMOVED {
            self.set_object(
                offset,
                ObservedObject {
                    size: object.size,
                    modified_ms: REMOVED,
                },
            );
            self.removed += 1;
        }
    }

    /// Every present key with its object, in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, ObservedObject)> {
        let mut offset = 0;
        std::iter::from_fn(move || {
            while offset < self.arena.len() {
                let at = offset;
                let key = self.record_key(at);
                offset = at + HEADER + key.len();
                let object = self.record_object(at);
                if object.modified_ms != REMOVED {
                    // Keys were inserted from `&str`, so the bytes are UTF-8.
                    return Some((std::str::from_utf8(key).unwrap_or_default(), object));
                }
            }
            None
        })
    }

    /// Bytes of heap the index holds (for benchmarks and logs).
    pub fn heap_bytes(&self) -> usize {
        self.arena.capacity() + self.table.capacity() * std::mem::size_of::<u64>()
    }

    fn grow(&mut self) {
        let size = table_size_for(self.len + 1).max(self.table.len() * 2);
        let mut table = vec![EMPTY; size];
        let mask = size - 1;
        for &slot in self.table.iter().filter(|&&s| s != EMPTY) {
            let key = self.record_key((slot & 0xffff_ffff) as usize);
            let mut i = (self.hasher.hash_one(key) as usize) & mask;
            while table[i] != EMPTY {
                i = (i + 1) & mask;
            }
            table[i] = slot;
        }
        self.table = table;
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
    fn inserts_finds_updates_removes_and_grows() {
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
        index.remove("k/7");
        index.remove("absent");
        assert_eq!(index.get("k/7"), None);
        assert_eq!(index.present(), 9_999);
        assert_eq!(index.iter().count(), 9_999);
        index.insert("k/7", obj(7));
        assert_eq!(index.get("k/7"), Some(obj(7)));
        assert_eq!(index.present(), 10_000);
        assert_eq!(index.iter().next(), Some(("k/0", obj(0))));
        assert!(index.insert("", obj(1)));
        assert_eq!(index.get(""), Some(obj(1)));
        assert!(!index.insert(&"x".repeat(70_000), obj(1)));
        assert!(index.heap_bytes() > 0);
    }

    proptest! {
        /// The index answers exactly like a HashMap, removals included.
        #[test]
        fn behaves_like_a_map(ops in proptest::collection::vec(("[a-c]{0,4}", 0u64..5, proptest::bool::ANY), 0..300)) {
            let mut index = ObservedIndex::with_capacity(3);
            let mut map = std::collections::HashMap::new();
            for (key, size, remove) in &ops {
                if *remove {
                    index.remove(key);
                    map.remove(key);
                } else {
                    index.insert(key, obj(*size));
                    map.insert(key.clone(), obj(*size));
                }
            }
            prop_assert_eq!(index.present(), map.len());
            for (key, value) in &map {
                prop_assert_eq!(index.get(key), Some(*value));
            }
            prop_assert_eq!(index.iter().count(), map.len());
            prop_assert_eq!(index.get("zzz"), None);
        }
    }
}
