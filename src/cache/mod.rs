//! The read cache: keys ([`key`]), TTL rules and client directives ([`policy`]), entries and
//! their freshness ([`entry`]), the in-process tier ([`l1`]), who fills a missed key
//! ([`fill_lock`]; in process: [`coalesce`]), node index and write epochs ([`invalidate`]),
//! `ids=` reassembly ([`ids`]) and batch reads from per-operation entries ([`batch`]); what
//! the cache did for a request, as `Cache-Status`, `X-Cache` and metric label ([`status`]).
//! The request-path glue that calls Graph lives in `proxy::cached`.
//!
//! With `[redis] url`, the shared pieces join in: the Redis tier ([`l2`]), the fill lock
//! across replicas ([`lease`]) and the invalidation bus ([`bus`]).

pub mod batch;
pub mod bus;
pub mod coalesce;
pub mod entry;
pub mod fill_lock;
pub mod gather;
pub mod ids;
pub mod invalidate;
pub mod key;
pub mod l1;
pub mod l2;
pub mod lease;
pub mod merge;
pub mod policy;
pub mod projection;
pub mod reply_headers;
pub mod status;
pub mod union;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::CacheConfig;
use crate::error::ProxyError;
use crate::graph::request::page_of_node;
use crate::metrics::{CacheResult, CacheTier, InvalidationReason, Metrics};
use crate::redis_conn::RedisConn;
use crate::rewrite::PreparedBody;
use crate::upstream::reply_budget::Reservation;

use bus::{Bus, Invalidation};
use coalesce::Coalescer;
use entry::{Entry, ReplyHeaders};
use invalidate::NodeIndex;
use key::{CacheKey, KeyId};
use l1::L1;
use l2::L2;
use policy::Policy;

/// How a fill ended, which decides the reply's cache headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillKind {
    /// A 2xx reply, now in the cache.
    Stored,
    /// A 2xx reply not stored (a write to the node raced it, or it is too large).
    Fetched,
    /// Graph answered 304 to our If-None-Match: the stale entry was renewed.
    Revalidated,
    /// Found fresh in the Redis tier (and promoted into L1): no upstream call.
    L2Hit,
    /// Another replica held the fill lease; its entry arrived through the Redis tier.
    Remote,
    /// Graph failed or throttled; a stale copy stands in. Holds the status we would have sent.
    StaleOnError(u16),
    /// An error reply from Graph, handed on and never stored.
    Passed,
}

/// The result of one fill, shared by the leader and every follower.
#[derive(Debug, Clone)]
pub struct Fill {
    pub entry: Arc<Entry>,
    pub kind: FillKind,
    /// For an `ids=` fill: each returned node's prepared body, by id.
    pub pieces: Option<Arc<Vec<(String, PreparedBody)>>>,
    /// The fetched body's share of the reply budget, kept by every reply made from it.
    pub hold: Option<Arc<Reservation>>,
}

pub type FillResult = Result<Fill, ProxyError>;

/// The cache of one gateway.
pub struct Cache {
    pub policy: Policy,
    l1: L1,
    index: Arc<NodeIndex>,
    pub flights: Coalescer<FillResult>,
    /// Bumped by purge-all; part of every node's epoch.
    global_epoch: AtomicU64,
    max_bytes: u64,
    /// Store bodies compressed in L1 (`[cache] compress`).
    compress: bool,
    /// Answer field subsets from stored supersets (`[cache] project_fields`).
    pub project_fields: bool,
    metrics: Arc<Metrics>,
    /// The Redis tier and bus, when `[redis] url` is set.
    shared: Option<Shared>,
    /// Stored node replies by the fields they hold, for answering subsets.
    pub projections: projection::ProjectionIndex,
    /// Concurrent misses for one node gathered into one upstream call for their fields.
    pub unions: union::Unions,
    /// How long the first miss for a node waits for others to join its call
    /// (`[cache] union_window_ms`; zero: only calls already in flight are joined).
    pub union_window: Duration,
    /// Concurrent misses for nodes of one Page gathered into one `ids=` call.
    pub merges: merge::Merges,
    /// How long the first miss waits for others (`[cache] merge_window_ms`; zero: off).
    pub merge_window: Duration,
}

/// What replicas share through Redis.
pub struct Shared {
    pub l2: L2,
    pub bus: Bus,
}

impl Cache {
    pub fn new(cfg: &CacheConfig, metrics: Arc<Metrics>) -> Cache {
        let policy = Policy::new(cfg);
        let index = Arc::new(NodeIndex::default());
        let l1 = L1::new(
            cfg.max_bytes,
            policy.stale_window(),
            index.clone(),
            metrics.clone(),
        );
        Cache {
            policy,
            l1,
            index,
            flights: Coalescer::default(),
            global_epoch: AtomicU64::new(0),
            max_bytes: cfg.max_bytes,
            compress: cfg.compress,
            project_fields: cfg.project_fields,
            metrics,
            shared: None,
            projections: projection::ProjectionIndex::default(),
            unions: union::Unions::new(!cfg.union_window.is_zero()),
            union_window: cfg.union_window,
            merges: merge::Merges::new(true),
            merge_window: cfg.merge_window,
        }
    }

    /// Adds the Redis tier and the invalidation bus.
    pub fn with_redis(mut self, conn: Arc<RedisConn>) -> Cache {
        self.shared = Some(Shared {
            l2: L2::new(conn.clone()),
            bus: Bus::new(conn),
        });
        self
    }

    pub fn shared(&self) -> Option<&Shared> {
        self.shared.as_ref()
    }

    /// Counts one lookup in `tier`.
    pub fn count_tier(&self, tier: CacheTier, result: CacheResult) {
        self.metrics.cache.lookup(tier, result);
    }

    /// Writes `entry` to the Redis tier unless a write to its node (on any replica) moved the
    /// node's epoch since `l2_epoch` was read.
    pub async fn store_shared(&self, key: &CacheKey, entry: &Entry, l2_epoch: &str) -> bool {
        let Some(sh) = &self.shared else {
            return false;
        };
        // Compressed as in L1 (the value format records it): less to move and to hold.
        let stored = entry.for_storage(self.compress, &key.readable);
        if u64::from(stored.weight()) > self.max_bytes {
            return false;
        }
        sh.l2
            .store(key, &stored, l2_epoch, self.policy.stale_window())
            .await
    }

    /// Applies an invalidation another replica published, to L1 only (the sender already
    /// dealt with Redis).
    pub fn apply_remote(&self, inv: Invalidation) -> usize {
        self.metrics.redis.invalidations_received.inc();
        match inv {
            Invalidation::Write(node) => self.invalidate_local(&node),
            Invalidation::Node(node) => self.purge_node_local(&node),
            Invalidation::Prefix(p) => self.purge_prefix_local(&p),
            Invalidation::All => self.purge_all_local(),
        }
    }

    /// Deletes the Redis entries of `node` (and, for a post, its Page's edges) and tells
    /// the other replicas. Redis trouble only costs sharing: TTLs remain the backstop.
    async fn share_invalidation(&self, node: &str, edges_of_page: bool, inv: Invalidation) {
        let Some(sh) = &self.shared else {
            return;
        };
        sh.l2.invalidate_node(node, false).await;
        if edges_of_page && node.contains('_') {
            if let Some(page) = page_of_node(node) {
                sh.l2.invalidate_node(page, true).await;
            }
        }
        sh.bus.invalidate(inv).await;
    }

    pub fn get(&self, key: &CacheKey) -> Option<Entry> {
        self.l1.get(key.id)
    }

    /// The entry stored under a key's digest (the projection index keeps digests).
    pub fn get_id(&self, id: KeyId) -> Option<Entry> {
        self.l1.get(id)
    }

    /// Counts one lookup in the in-process tier (L1).
    pub fn count(&self, result: CacheResult) {
        // Through the metrics' resolved-series cache: a hash lookup per request otherwise.
        self.metrics.cache.lookup(CacheTier::L1, result);
    }

    /// Write epoch of the key's node, read before a fill starts.
    pub fn epoch(&self, key: &CacheKey) -> u64 {
        let node = key
            .node
            .as_deref()
            .map(|n| self.index.epoch(n))
            .unwrap_or(0);
        node.wrapping_add(self.global_epoch.load(Ordering::Acquire))
    }

    /// Stores `entry` under `key` unless a write to its node (or a purge) happened since
    /// `epoch`. Returns whether it is in the cache.
    pub fn store(&self, key: &CacheKey, entry: &Entry, epoch: u64) -> bool {
        // A stored entry carries its whole key, or purges by prefix would miss it (its length
        // field says up to 4 GiB, far beyond any request let in).
        if self.epoch(key) != epoch || !ReplyHeaders::packs_readable(&key.readable) {
            return false;
        }
        let slot = key
            .node
            .as_deref()
            .map(|n| self.index.slot(n, key.has_edge));
        let stored = entry.stored(self.compress, &key.readable, slot);
        if u64::from(stored.weight()) > self.max_bytes {
            return false;
        }
        self.l1.insert(key.id, stored);
        if let Some(slot) = slot {
            self.index.add(slot, key.id);
        }
        // A write that bumped the epoch after our first check may have swept the index
        // before we were in it: undo, rather than keep what it made stale.
        if self.epoch(key) != epoch {
            self.l1.remove(key.id);
            return false;
        }
        true
    }

    /// Stores a hot compressed entry again with its body plain (see [`entry::HOT_HITS`]), in
    /// place of the very entry that was read. A write to its node meanwhile wins: as in
    /// [`Cache::store`], the epoch is checked again after the swap.
    pub fn store_plain(&self, key: &CacheKey, hot: &Entry) {
        let epoch = self.epoch(key);
        let Ok(plain) = hot.decompressed() else {
            return;
        };
        let plain = plain.stored(false, hot.readable(), hot.index_slot);
        if self.l1.replace_if_current(key.id, hot, plain) && self.epoch(key) != epoch {
            self.l1.remove(key.id);
        }
    }

    /// After a successful write to `node`: drop its entries and, for a post
    /// (`PAGEID_POSTID`), its Page's edges (`/PAGEID/feed`). Returns entries dropped.
    pub async fn invalidate_after_write(&self, node: &str) -> usize {
        let n = self.invalidate_local(node);
        self.share_invalidation(node, true, Invalidation::Write(node.to_string()))
            .await;
        n
    }

    fn invalidate_local(&self, node: &str) -> usize {
        let mut keys = self.take_node(node, false);
        if node.contains('_') {
            if let Some(page) = page_of_node(node) {
                keys.extend(self.take_node(page, true));
            }
        }
        self.drop_keys(keys, InvalidationReason::Write)
    }

    /// Admin purge of everything cached for `node` (itself and its edges).
    pub async fn purge_node(&self, node: &str) -> usize {
        let n = self.purge_node_local(node);
        self.share_invalidation(node, false, Invalidation::Node(node.to_string()))
            .await;
        n
    }

    fn purge_node_local(&self, node: &str) -> usize {
        let keys = self.take_node(node, false);
        self.drop_keys(keys, InvalidationReason::Purge)
    }

    /// Admin purge of every entry whose readable key starts with `prefix`.
    pub async fn purge_prefix(&self, prefix: &str) -> usize {
        let n = self.purge_prefix_local(prefix);
        if let Some(sh) = &self.shared {
            let l2 = sh.l2.purge(prefix).await;
            tracing::info!(l2_deleted = l2, "cache purge by prefix in the Redis tier");
            sh.bus
                .invalidate(Invalidation::Prefix(prefix.to_string()))
                .await;
        }
        n
    }

    fn purge_prefix_local(&self, prefix: &str) -> usize {
        self.global_epoch.fetch_add(1, Ordering::AcqRel);
        let keys = self.l1.keys_with_prefix(prefix);
        self.drop_keys(keys, InvalidationReason::Purge)
    }

    pub async fn purge_all(&self) -> usize {
        let n = self.purge_all_local();
        if let Some(sh) = &self.shared {
            let l2 = sh.l2.purge("").await;
            tracing::info!(
                l2_deleted = l2,
                "cache purge of everything in the Redis tier"
            );
            sh.bus.invalidate(Invalidation::All).await;
        }
        n
    }

    fn purge_all_local(&self) -> usize {
        self.global_epoch.fetch_add(1, Ordering::AcqRel);
        let n = self.l1.clear();
        self.index.clear();
        self.metrics
            .cache
            .invalidated(InvalidationReason::Purge, n as u64);
        n
    }

    fn take_node(&self, node: &str, edges_only: bool) -> Vec<KeyId> {
        self.index.bump(node);
        self.index.take(node, edges_only)
    }

    fn drop_keys(&self, keys: Vec<KeyId>, reason: InvalidationReason) -> usize {
        let mut n = 0;
        for k in keys {
            if self.l1.remove(k) {
                n += 1;
            }
        }
        self.metrics.cache.invalidated(reason, n as u64);
        n
    }

    /// Runs moka's pending maintenance (evictions, listeners) and refreshes the entry and
    /// byte gauges. Returns (entries, bytes).
    pub fn settle(&self) -> (u64, u64) {
        let (entries, bytes) = self.l1.settle();
        self.metrics.cache.size(CacheTier::L1, entries, bytes);
        (entries, bytes)
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }
}
