//! The in-process tier: a moka cache bounded in bytes. moka's sync flavour: its calls never
//! wait on I/O, and its lookups are plain calls rather than futures the request's future
//! would have to hold (and hyper move) on every hit. Each entry carries its own
//! lifetime (TTL + the longer stale window) through moka's `Expiry`, so stale copies stay
//! available for stale-while-revalidate and stale-if-error and then go away by themselves.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::notification::RemovalCause;
use moka::ops::compute::{CompResult, Op};
use moka::sync::Cache as Moka;
use moka::Expiry;

use super::entry::Entry;
use super::invalidate::NodeIndex;
use super::key::KeyId;
use crate::metrics::{CacheTier, Eviction, Metrics};

struct EntryExpiry {
    stale_window: Duration,
}

impl EntryExpiry {
    /// What is left of the entry's lifetime: an entry from Redis, or one stored again plain,
    /// is older than its insertion.
    fn left(&self, v: &Entry, at: Instant) -> Duration {
        (v.ttl() + self.stale_window).saturating_sub(v.age(at))
    }
}

impl Expiry<KeyId, Arc<Entry>> for EntryExpiry {
    fn expire_after_create(&self, _k: &KeyId, v: &Arc<Entry>, at: Instant) -> Option<Duration> {
        Some(self.left(v, at))
    }

    fn expire_after_update(
        &self,
        _k: &KeyId,
        v: &Arc<Entry>,
        at: Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.left(v, at))
    }
}

pub struct L1 {
    cache: Moka<KeyId, Arc<Entry>>,
}

impl L1 {
    pub fn new(
        max_bytes: u64,
        stale_window: Duration,
        index: Arc<NodeIndex>,
        metrics: Arc<Metrics>,
    ) -> L1 {
        let cache = Moka::builder()
            .max_capacity(max_bytes)
            .weigher(|_k: &KeyId, v: &Arc<Entry>| v.weight())
            .expire_after(EntryExpiry { stale_window })
            .eviction_listener(move |k: Arc<KeyId>, v: Arc<Entry>, cause| {
                let why = match cause {
                    RemovalCause::Size => Eviction::Size,
                    RemovalCause::Expired => Eviction::Expired,
                    RemovalCause::Explicit => Eviction::Explicit,
                    RemovalCause::Replaced => Eviction::Replaced,
                };
                metrics.cache.evicted(CacheTier::L1, why);
                // A replaced entry's key is still live (indexed under the new generation).
                if cause != RemovalCause::Replaced {
                    if let Some(node) = &v.node {
                        index.remove(node, *k, v.generation);
                    }
                }
            })
            .build();
        L1 { cache }
    }

    pub fn get(&self, key: KeyId) -> Option<Arc<Entry>> {
        self.cache.get(&key)
    }

    pub fn insert(&self, key: KeyId, entry: Arc<Entry>) {
        self.cache.insert(key, entry);
    }

    /// Puts `new` in place of `current` if `current` is still the entry under `key` (not
    /// refilled, purged or evicted since it was read); true if it did.
    pub fn replace_if_current(&self, key: KeyId, current: &Arc<Entry>, new: Arc<Entry>) -> bool {
        let result = self.cache.entry(key).and_compute_with(|found| match found {
            Some(e) if Arc::ptr_eq(e.value(), current) => Op::Put(new),
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
