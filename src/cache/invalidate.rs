//! Which entries belong to which node, so a write can drop exactly those, and per-node
//! epochs so a fill that raced a write does not store what the write made stale.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::key::KeyId;

/// Epoch buckets: nodes hash into these. A collision only costs a skipped store.
const EPOCH_BUCKETS: usize = 1024;

/// A key as the index holds it: its two halves, so a member is 16 bytes with no padding
/// (a `u128` is aligned to 16; there is one member per cached entry).
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

/// The keys under one node. Most nodes have one cached entry, which needs no set (an
/// allocation of ~100 bytes) of its own.
#[derive(Debug)]
enum Members {
    One(Slot),
    /// Boxed so that a node with one key takes 24 bytes, not a set's 48.
    #[allow(clippy::box_collection)]
    Many(Box<HashSet<Slot>>),
}

impl Members {
    fn insert(&mut self, key: Slot) {
        match self {
            Members::One(one) if *one == key => {}
            Members::One(one) => *self = Members::Many(Box::new(HashSet::from([*one, key]))),
            Members::Many(set) => {
                set.insert(key);
            }
        }
    }

    fn contains(&self, key: &Slot) -> bool {
        match self {
            Members::One(one) => one == key,
            Members::Many(set) => set.contains(key),
        }
    }

    /// Removes `key`; true when no key is left.
    fn remove(&mut self, key: &Slot) -> bool {
        match self {
            Members::One(one) => one == key,
            Members::Many(set) => {
                set.remove(key);
                set.is_empty()
            }
        }
    }

    fn drain_into(self, out: &mut Vec<KeyId>) {
        match self {
            Members::One(one) => out.push(one.into()),
            Members::Many(set) => out.extend(set.into_iter().map(KeyId::from)),
        }
    }
}

/// Where an entry's key sits in the [`NodeIndex`]: a keyed hash of its node, and whether the
/// entry is one of the node's edges (`/PAGEID/feed`: a write to a post drops only its Page's
/// edges). 8 bytes in each cached entry, where the node's id would take 16 and an allocation
/// per node. Two nodes whose hashes collide (about 2^-62 a pair, and unpredictable: the key is
/// random per process) share their keys, so a write to one also drops the other's entries:
/// a refill, never a stale read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeSlot(NonZeroU64);

/// Secondary index node → keys of live entries, plus write epochs.
pub struct NodeIndex {
    by_node: Mutex<HashMap<NodeSlot, Members>>,
    /// Hashes node ids into [`NodeSlot`]s.
    hasher: RandomState,
    epochs: Box<[AtomicU64]>,
}

impl Default for NodeIndex {
    fn default() -> Self {
        NodeIndex {
            by_node: Mutex::new(HashMap::new()),
            hasher: RandomState::new(),
            epochs: (0..EPOCH_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl NodeIndex {
    /// The map lock; a panic while holding it cannot leave it inconsistent in a way that
    /// matters more than a missed invalidation, so poisoning is ignored.
    fn map(&self) -> MutexGuard<'_, HashMap<NodeSlot, Members>> {
        self.by_node.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The slot of `node`'s own entries, or of its edges'.
    pub fn slot(&self, node: &str, edge: bool) -> NodeSlot {
        // Bit 0 says edge; bit 1 is set so the value is never zero.
        let h = self.hasher.hash_one(node) & !3 | 2 | u64::from(edge);
        NodeSlot(NonZeroU64::new(h).unwrap_or(NonZeroU64::MIN))
    }

    /// Indexes `key` in `slot`. Call it after the entry is in the cache (see
    /// [`NodeIndex::remove_unless`]).
    pub fn add(&self, slot: NodeSlot, key: KeyId) {
        self.map()
            .entry(slot)
            .and_modify(|members| members.insert(key.into()))
            .or_insert(Members::One(key.into()));
    }

    /// Forgets `key` in `slot` unless `still_cached(key)`: an eviction notice can arrive
    /// after the same key was stored again, and that newer entry must stay indexed. Checked
    /// under the index lock, and [`NodeIndex::add`] runs after the cache insert, so either
    /// the check sees the newer entry or its `add` comes after this removal.
    pub fn remove_unless(
        &self,
        slot: NodeSlot,
        key: KeyId,
        still_cached: impl FnOnce(KeyId) -> bool,
    ) {
        let mut map = self.map();
        if let Some(keys) = map.get_mut(&slot) {
            let member = Slot::from(key);
            if keys.contains(&member) && !still_cached(key) && keys.remove(&member) {
                map.remove(&slot);
            }
        }
    }

    /// Takes the keys of `node` (only its edges when `edges_only`) out of the index.
    pub fn take(&self, node: &str, edges_only: bool) -> Vec<KeyId> {
        let mut map = self.map();
        let mut taken: Vec<KeyId> = Vec::new();
        let sides: &[bool] = if edges_only { &[true] } else { &[true, false] };
        for &edge in sides {
            if let Some(keys) = map.remove(&self.slot(node, edge)) {
                keys.drain_into(&mut taken);
            }
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

    /// One member per cached entry: 16 bytes, not the 32 a `u128` key and a word of
    /// state would take; a node with one entry takes 32 bytes in the map and nothing else.
    #[test]
    fn an_index_member_is_16_bytes_and_a_node_32() {
        assert_eq!(std::mem::size_of::<Slot>(), 16);
        assert_eq!(std::mem::size_of::<(NodeSlot, Members)>(), 32);
        assert_eq!(std::mem::size_of::<Option<NodeSlot>>(), 8);
    }

    #[test]
    fn index_keeps_edges_apart_and_keys_still_cached() {
        let idx = NodeIndex::default();
        let (own, edge) = (idx.slot("1001", false), idx.slot("1001", true));
        assert_ne!(own, edge);
        assert_eq!(own, idx.slot("1001", false));
        assert_ne!(own, idx.slot("1002", false));
        idx.add(own, KeyId(1));
        idx.add(edge, KeyId(2));
        // A late notice about a key stored again does not drop it; otherwise it goes.
        idx.remove_unless(own, KeyId(1), |_| true);
        idx.remove_unless(own, KeyId(2), |_| false);
        assert_eq!(idx.take("1001", true), vec![KeyId(2)]);
        assert_eq!(idx.take("1001", false), vec![KeyId(1)]);
        assert!(idx.take("1001", false).is_empty());
        // Keys keep both halves.
        let big = KeyId(u128::MAX - 7);
        idx.add(edge, big);
        idx.add(own, KeyId(3));
        idx.remove_unless(own, KeyId(3), |_| false);
        assert_eq!(idx.take("1001", false), vec![big]);
        let e = idx.epoch("1001");
        idx.bump("1001");
        assert_ne!(idx.epoch("1001"), e);
    }

    /// Members grow from one to a set and shrink back out of the map as keys go.
    #[test]
    fn a_node_goes_from_one_key_to_many_and_out() {
        let idx = NodeIndex::default();
        let own = idx.slot("1001", false);
        idx.add(own, KeyId(1));
        idx.add(own, KeyId(1));
        idx.remove_unless(own, KeyId(2), |_| false);
        assert_eq!(idx.take("1001", false), vec![KeyId(1)]);
        for k in 1..=3 {
            idx.add(own, KeyId(k));
        }
        for k in 1..=3 {
            idx.remove_unless(own, KeyId(k), |_| false);
        }
        assert!(idx.map().is_empty());
        idx.add(own, KeyId(4));
        idx.remove_unless(own, KeyId(4), |_| false);
        assert!(idx.map().is_empty());
    }
}
