//! The bucket table: bounded, sharded, O(1) insert and eviction.
//!
//! A client may name any number of distinct Pages (a `pages = ["*"]` key reading 200,000 node
//! ids), so the table holds at most `capacity` buckets plus those a live call is using. It is
//! split into shards, each behind its own lock, so creating a bucket never blocks lookups of
//! other Pages for long. Eviction is CLOCK (second chance): a bucket touched since the hand
//! last passed gets another round, one nobody uses is dropped whatever it remembers (a paused
//! bucket too: it must not escape the cap), one in use is skipped. Each step either clears a
//! mark or skips a bucket in use, so an insert costs O(1) amortized and never scans the map.

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};

use super::attribution::BucketKey;
use crate::cache::key::{FastHash, FastMap};

const SHARDS: usize = 16;
/// Candidates one insert looks at before giving up on evicting (all of them in use).
const MAX_STEPS: usize = 64;

struct Slot<V> {
    value: Arc<V>,
    touched: bool,
}

struct Shard<V> {
    map: FastMap<BucketKey, Slot<V>>,
    /// The clock: every key once, the hand at the front.
    clock: VecDeque<BucketKey>,
}

pub struct Table<V> {
    shards: Box<[Mutex<Shard<V>>]>,
    per_shard: usize,
    hasher: FastHash,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<V> Table<V> {
    /// A table for about `capacity` entries (at least one per shard).
    pub fn new(capacity: usize) -> Table<V> {
        Table {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        map: FastMap::default(),
                        clock: VecDeque::new(),
                    })
                })
                .collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
            hasher: FastHash::default(),
        }
    }

    fn shard(&self, key: &BucketKey) -> &Mutex<Shard<V>> {
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        &self.shards[i]
    }

    /// The entry for `key`, created with `make` if missing. `in_use` tells whether an entry
    /// may not be evicted (it is only asked with the shard locked; it must not block).
    pub fn get_or_insert(
        &self,
        key: &BucketKey,
        make: impl FnOnce() -> V,
        in_use: impl Fn(&Arc<V>) -> bool,
    ) -> Arc<V> {
        let mut shard = lock(self.shard(key));
        if let Some(slot) = shard.map.get_mut(key) {
            slot.touched = true;
            return slot.value.clone();
        }
        // Over the cap (buckets in use were skipped earlier): evict two to get back under.
        let excess = shard
            .map
            .len()
            .saturating_sub(self.per_shard.saturating_sub(1));
        // The hand passes each entry at most once per insert, so a mark it clears is a
        // second chance kept until the next insert, not one taken back on the same turn.
        let mut steps = MAX_STEPS.min(shard.clock.len());
        for _ in 0..excess.min(2) {
            if !shard.evict_one(&in_use, &mut steps) {
                break;
            }
        }
        let value = Arc::new(make());
        shard.map.insert(
            key.clone(),
            Slot {
                value: value.clone(),
                touched: false,
            },
        );
        shard.clock.push_back(key.clone());
        value
    }

    pub fn get(&self, key: &BucketKey) -> Option<Arc<V>> {
        lock(self.shard(key)).map.get(key).map(|s| s.value.clone())
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).map.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every entry, one shard at a time (no lock is held while the caller looks at them).
    pub fn snapshot(&self) -> Vec<Arc<V>> {
        let mut out = Vec::new();
        for s in self.shards.iter() {
            out.extend(lock(s).map.values().map(|slot| slot.value.clone()));
        }
        out
    }
}

impl<V> Shard<V> {
    /// Moves the hand until one entry is evicted; false if none could be within `steps`
    /// (which counts down).
    fn evict_one(&mut self, in_use: &impl Fn(&Arc<V>) -> bool, steps: &mut usize) -> bool {
        while *steps > 0 {
            *steps -= 1;
            let Some(key) = self.clock.pop_front() else {
                return false;
            };
            let Some(slot) = self.map.get_mut(&key) else {
                continue;
            };
            if slot.touched {
                slot.touched = false;
                self.clock.push_back(key);
                continue;
            }
            if in_use(&slot.value) {
                self.clock.push_back(key);
                continue;
            }
            self.map.remove(&key);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(n: u32) -> BucketKey {
        BucketKey::Page(n.to_string())
    }

    #[test]
    fn a_flood_of_distinct_keys_stays_within_the_capacity() {
        let t: Table<u32> = Table::new(1000);
        // Every entry "remembers" something (as a paused bucket would): still evicted.
        for n in 0..200_000 {
            t.get_or_insert(&page(n), || n, |_| false);
        }
        assert!(t.len() <= 1000 + SHARDS, "{}", t.len());
        // The newest are there.
        assert_eq!(t.get(&page(199_999)).as_deref(), Some(&199_999));
    }

    #[test]
    fn entries_in_use_are_kept_and_recently_used_ones_get_a_second_chance() {
        let t: Table<u32> = Table::new(SHARDS * 4);
        let held: Vec<Arc<u32>> = (0..8)
            .map(|n| t.get_or_insert(&page(n), || n, |v| Arc::strong_count(v) > 1))
            .collect();
        let hot = page(1000);
        t.get_or_insert(&hot, || 1000, |v| Arc::strong_count(v) > 1);
        for n in 10..10_000 {
            t.get_or_insert(&hot, || 0, |_| true);
            t.get_or_insert(&page(n), || n, |v| Arc::strong_count(v) > 1);
        }
        for (n, v) in held.iter().enumerate() {
            assert_eq!(t.get(&page(n as u32)).as_deref(), Some(&**v), "held {n}");
        }
        assert_eq!(t.get(&hot).as_deref(), Some(&1000));
        assert!(t.len() <= SHARDS * 4 + 8 + SHARDS, "{}", t.len());
    }

    #[test]
    fn a_recently_used_entry_survives_in_a_shard_of_entries_in_use() {
        let t: Table<u32> = Table::new(SHARDS * 4);
        let hot = page(1000);
        let same_shard = |k: &BucketKey| std::ptr::eq(t.shard(k), t.shard(&hot));
        // Three entries in use fill hot's shard (four per shard) with hot.
        let held: Vec<Arc<u32>> = (0..)
            .filter(|&n| same_shard(&page(n)))
            .take(3)
            .map(|n| t.get_or_insert(&page(n), || n, |v| Arc::strong_count(v) > 1))
            .collect();
        t.get_or_insert(&hot, || 1000, |v| Arc::strong_count(v) > 1);
        for n in (2000..).filter(|&n| same_shard(&page(n))).take(50) {
            t.get_or_insert(&hot, || 0, |_| true);
            t.get_or_insert(&page(n), || n, |v| Arc::strong_count(v) > 1);
        }
        assert_eq!(t.get(&hot).as_deref(), Some(&1000));
        for v in &held {
            assert_eq!(t.get(&page(**v)).as_deref(), Some(&**v));
        }
    }

    #[test]
    fn an_insert_looks_at_a_bounded_number_of_entries() {
        // All entries in use: inserts go over the cap rather than scanning the whole shard.
        let t: Table<u32> = Table::new(SHARDS);
        let steps = std::cell::Cell::new(0usize);
        for n in 0..5_000 {
            t.get_or_insert(
                &page(n),
                || n,
                |_| {
                    steps.set(steps.get() + 1);
                    true
                },
            );
        }
        assert!(steps.get() <= 5_000 * 2 * MAX_STEPS, "{}", steps.get());
    }
}
