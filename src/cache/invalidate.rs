//! Which entries belong to which node, so a write can drop exactly those, and per-node
//! epochs so a fill that raced a write does not store what the write made stale.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::key::KeyId;

/// Epoch buckets: nodes hash into these. A collision only costs a skipped store.
const EPOCH_BUCKETS: usize = 1024;

/// A key as the index holds it: its two halves, so a slot is 24 bytes (a `u128` would be
/// aligned to 16 and pad the slot to 32; there is one slot per cached entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Slot(u64, u64);

impl From<KeyId> for Slot {
    fn from(k: KeyId) -> Slot {
        Slot((k.0 >> 64) as u64, k.0 as u64)
    }
}

impl From<Slot> for KeyId {
    fn from(s: Slot) -> KeyId {
        KeyId(u128::from(s.0) << 64 | u128::from(s.1))
    }
}

/// An indexed entry's store generation and whether it is an edge's, in one word.
#[derive(Debug, Clone, Copy)]
struct Member(u64);

impl Member {
    fn new(generation: u64, has_edge: bool) -> Member {
        Member(generation << 1 | u64::from(has_edge))
    }

    /// The generation as given, less its top bit (2^63 stores do not wrap).
    fn generation(self) -> u64 {
        self.0 >> 1
    }

    fn has_edge(self) -> bool {
        self.0 & 1 == 1
    }
}

type Members = HashMap<Slot, Member>;

/// Secondary index node → keys of live entries, plus write epochs.
pub struct NodeIndex {
    by_node: Mutex<HashMap<Arc<str>, Members>>,
    epochs: Box<[AtomicU64]>,
}

impl Default for NodeIndex {
    fn default() -> Self {
        NodeIndex {
            by_node: Mutex::new(HashMap::new()),
            epochs: (0..EPOCH_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl NodeIndex {
    /// The map lock; a panic while holding it cannot leave it inconsistent in a way that
    /// matters more than a missed invalidation, so poisoning is ignored.
    fn map(&self) -> MutexGuard<'_, HashMap<Arc<str>, Members>> {
        self.by_node.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The index's own copy of `node` when it has one, so the many entries of one node
    /// share a single allocation for its id.
    pub fn intern(&self, node: &Arc<str>) -> Arc<str> {
        match self.map().get_key_value(&**node) {
            Some((k, _)) => k.clone(),
            None => node.clone(),
        }
    }

    pub fn add(&self, node: &Arc<str>, key: KeyId, generation: u64, has_edge: bool) {
        self.map()
            .entry(node.clone())
            .or_default()
            .insert(key.into(), Member::new(generation, has_edge));
    }

    /// Forgets `key` under `node` if it still refers to the entry of `generation` (a newer
    /// entry under the same key stays indexed).
    pub fn remove(&self, node: &str, key: KeyId, generation: u64) {
        let mut map = self.map();
        if let Some(keys) = map.get_mut(node) {
            let slot = Slot::from(key);
            let same = Member::new(generation, false).generation();
            if keys.get(&slot).is_some_and(|m| m.generation() == same) {
                keys.remove(&slot);
            }
            if keys.is_empty() {
                map.remove(node);
            }
        }
    }

    /// Takes the keys of `node` (only its edges when `edges_only`) out of the index.
    pub fn take(&self, node: &str, edges_only: bool) -> Vec<KeyId> {
        let mut map = self.map();
        let Some(keys) = map.get_mut(node) else {
            return Vec::new();
        };
        let taken: Vec<KeyId> = keys
            .iter()
            .filter(|(_, m)| !edges_only || m.has_edge())
            .map(|(k, _)| KeyId::from(*k))
            .collect();
        for k in &taken {
            keys.remove(&Slot::from(*k));
        }
        if keys.is_empty() {
            map.remove(node);
        }
        taken
    }

    pub fn clear(&self) {
        self.map().clear();
    }

    fn bucket(&self, node: &str) -> &AtomicU64 {
        // FNV-1a: cheap, stable, good enough to spread node ids.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in node.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        &self.epochs[(h % EPOCH_BUCKETS as u64) as usize]
    }

    /// Write epoch of `node`: read before a fill, compared before storing.
    pub fn epoch(&self, node: &str) -> u64 {
        self.bucket(node).load(Ordering::Acquire)
    }

    pub fn bump(&self, node: &str) {
        self.bucket(node).fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One slot per cached entry: 24 bytes, not the 32 a `u128` key would pad it to.
    #[test]
    fn an_index_slot_is_24_bytes() {
        assert_eq!(std::mem::size_of::<(Slot, Member)>(), 24);
    }

    #[test]
    fn index_tracks_generations_and_edges() {
        let idx = NodeIndex::default();
        let n: Arc<str> = Arc::from("1001");
        idx.add(&n, KeyId(1), 1, false);
        idx.add(&n, KeyId(2), 2, true);
        // A late notice about an older generation does not drop the live entry.
        idx.add(&n, KeyId(1), 3, false);
        idx.remove("1001", KeyId(1), 1);
        assert_eq!(idx.take("1001", true), vec![KeyId(2)]);
        assert_eq!(idx.take("1001", false), vec![KeyId(1)]);
        assert!(idx.take("1001", false).is_empty());
        // Keys keep both halves; generations beyond 32 bits are told apart.
        let big = KeyId(u128::MAX - 7);
        idx.add(&n, big, 1 << 40, true);
        idx.remove("1001", big, 1 << 41);
        assert_eq!(idx.take("1001", true), vec![big]);
        let e = idx.epoch("1001");
        idx.bump("1001");
        assert_ne!(idx.epoch("1001"), e);
    }
}
