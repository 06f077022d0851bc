//! The in-process tier: a moka cache bounded in bytes. moka's sync flavour: its calls never
//! wait on I/O, and its lookups are plain calls rather than futures the request's future
//! would have to hold (and hyper move) on every hit. Each entry carries its own
//! lifetime (TTL + the longer stale window) through moka's `Expiry`, so stale copies stay
//! available for stale-while-revalidate and stale-if-error and then go away by themselves.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moka::notification::RemovalCause;
use moka::ops::compute::{CompResult, Op};
use moka::sync::Cache as Moka;
use moka::Expiry;

use super::entry::{Entry, Stored};
use super::invalidate::NodeIndex;
use super::key::{FastHash, KeyId};
use crate::metrics::{CacheTier, Eviction, Metrics};

struct EntryExpiry {
    stale_window: Duration,
}

impl EntryExpiry {
    /// What is left of the entry's lifetime: an entry from Redis, or one stored again plain,
    /// is older than its insertion.
    fn left(&self, v: &Stored, at: Instant) -> Duration {
        (v.ttl() + self.stale_window).saturating_sub(v.age(at))
    }
}

impl Expiry<KeyId, Stored> for EntryExpiry {
    fn expire_after_create(&self, _k: &KeyId, v: &Stored, at: Instant) -> Option<Duration> {
        Some(self.left(v, at))
    }

    fn expire_after_update(
        &self,
        _k: &KeyId,
        v: &Stored,
        at: Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.left(v, at))
    }
}

type Entries = Moka<KeyId, Stored, FastHash>;

pub struct L1 {
    cache: Entries,
    /// The same cache, for its own eviction listener (which asks whether a key was stored
    /// again). Emptied on drop: the listener holding the cache would otherwise keep it alive.
    for_listener: Arc<Mutex<Option<Entries>>>,
}

impl L1 {
    pub fn new(
        max_bytes: u64,
        stale_window: Duration,
        index: Arc<NodeIndex>,
        metrics: Arc<Metrics>,
    ) -> L1 {
        let for_listener: Arc<Mutex<Option<Entries>>> = Arc::default();
        let listener_cache = for_listener.clone();
        let cache = Moka::builder()
            .max_capacity(max_bytes)
            .weigher(|_k: &KeyId, v: &Stored| v.weight())
            .expire_after(EntryExpiry { stale_window })
            .eviction_listener(move |k: Arc<KeyId>, v: Stored, cause| {
                let why = match cause {
                    RemovalCause::Size => Eviction::Size,
                    RemovalCause::Expired => Eviction::Expired,
                    RemovalCause::Explicit => Eviction::Explicit,
                    RemovalCause::Replaced => Eviction::Replaced,
                };
                metrics.cache.evicted(CacheTier::L1, why);
                // A replaced entry's key is still live (the new entry is indexed).
                if cause != RemovalCause::Replaced {
                    if let Some(slot) = v.index_slot() {
                        let cache = listener_cache.lock().unwrap_or_else(|e| e.into_inner());
                        index.remove_unless(slot, *k, |k| {
                            cache.as_ref().is_some_and(|c| c.contains_key(&k))
                        });
                    }
                }
            })
            .build_with_hasher(FastHash::default());
        *for_listener.lock().unwrap_or_else(|e| e.into_inner()) = Some(cache.clone());
        L1 {
            cache,
            for_listener,
        }
    }

    pub fn get(&self, key: KeyId) -> Option<Entry> {
        self.cache.get(&key).map(|stored| stored.entry())
    }

    pub fn insert(&self, key: KeyId, entry: Stored) {
        self.cache.insert(key, entry);
    }

    /// Puts `new` in place of `current` if `current` is still the entry under `key` (not
    /// refilled, purged or evicted since it was read); true if it did.
    pub fn replace_if_current(&self, key: KeyId, current: &Entry, new: Stored) -> bool {
        let result = self.cache.entry(key).and_compute_with(|found| match found {
            Some(e) if current.is_from(e.value()) => Op::Put(new),
            _ => Op::Nop,
        });
        matches!(result, CompResult::ReplacedWith(_))
    }

    /// Removes `key`; true if an entry was there.
    pub fn remove(&self, key: KeyId) -> bool {
        self.cache.remove(&key).is_some()
    }

    /// Keys whose readable form starts with `prefix`.
    pub fn keys_with_prefix(&self, prefix: &str) -> Vec<KeyId> {
        self.cache
            .iter()
            .filter(|(_, v)| v.readable().starts_with(prefix))
            .map(|(k, _)| *k)
            .collect()
    }

    /// Drops everything; returns how many entries there were.
    pub fn clear(&self) -> usize {
        let n = self.cache.iter().count();
        self.cache.invalidate_all();
        n
    }

    /// Applies pending evictions, then reports (entries, weighted bytes).
    pub fn settle(&self) -> (u64, u64) {
        self.cache.run_pending_tasks();
        (self.cache.entry_count(), self.cache.weighted_size())
    }
}

impl Drop for L1 {
    fn drop(&mut self) {
        self.for_listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::invalidate::NodeSlot;
    use crate::rewrite::PreparedBody;
    use bytes::Bytes;
    use http::StatusCode;

    fn l1(index: Arc<NodeIndex>) -> L1 {
        L1::new(
            1 << 20,
            Duration::from_secs(60),
            index,
            Arc::new(Metrics::new()),
        )
    }

    fn entry(slot: NodeSlot) -> Stored {
        Entry::new(
            StatusCode::OK,
            Vec::new(),
            PreparedBody::plain(Bytes::from_static(b"{}")),
            Duration::from_secs(60),
        )
        .stored(false, "", Some(slot))
    }

    /// The listener's handle on the cache does not keep the cache (and every entry) alive.
    #[test]
    fn dropping_the_tier_frees_its_entries() {
        let index = Arc::new(NodeIndex::default());
        let cache = l1(index.clone());
        let e = entry(index.slot("1001", false));
        cache.insert(KeyId(1), e.clone());
        assert_eq!(e.holders(), 2);
        drop(cache);
        assert_eq!(e.holders(), 1);
    }

    /// A removal notice forgets the key, unless the key was stored again (or replaced).
    #[test]
    fn a_removed_key_leaves_the_index_and_a_replaced_one_stays() {
        let index = Arc::new(NodeIndex::default());
        let cache = l1(index.clone());
        let slot = index.slot("1001", false);
        for k in [1, 2] {
            cache.insert(KeyId(k), entry(slot));
            index.add(slot, KeyId(k));
        }
        cache.insert(KeyId(2), entry(slot));
        assert!(cache.remove(KeyId(1)));
        cache.settle();
        assert_eq!(index.take("1001", false), vec![KeyId(2)]);
    }
}
