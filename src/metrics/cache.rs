//! The read cache: lookups by tier and result, coalesced requests, tier sizes, evictions,
//! invalidations, stale serves, and waits for another replica's fill.

use std::sync::OnceLock;

use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Registry};

use super::labels::{CacheResult, CacheTier, Eviction, InvalidationReason, LeaseWait, StaleReason};
use super::{counter, counter_vec, int_gauge_vec};

pub struct CacheMetrics {
    /// Cache lookups by tier and result (hit, miss, stale, bypass).
    pub lookups: IntCounterVec,
    /// Requests that waited on another request's identical upstream call.
    pub coalesced: IntCounter,
    /// Node reads answered from a cached reply for more fields of the same node.
    pub projected: IntCounter,
    /// Upstream calls that asked for the union of several concurrent reads' fields.
    pub union_fills: IntCounter,
    /// `ids=` calls that fetched concurrent misses for several nodes of one Page.
    pub merged_fills: IntCounter,
    /// Reads that waited for a union fill and then made a call of their own (Graph rejected
    /// the union, or its reply could not be cut down, or it was abandoned).
    pub union_fallbacks: IntCounter,
    /// Entries and weighted bytes per tier (refreshed when /metrics is read).
    pub entries: IntGaugeVec,
    pub bytes: IntGaugeVec,
    /// Entries leaving a tier, by cause (size, expired, explicit, replaced).
    pub evictions: IntCounterVec,
    /// Entries dropped by writes or admin purges.
    pub invalidations: IntCounterVec,
    /// Stale entries served, by reason (revalidate = stale-while-revalidate, error =
    /// stale-if-error).
    pub stale_served: IntCounterVec,
    /// Misses that found another replica filling the key, by outcome (filled: its entry
    /// arrived; took_over: its lease ran out and this replica called Graph; gave_up: Redis
    /// failed while waiting, so this replica called Graph).
    pub lease_waits: IntCounterVec,
    /// L1 lookup series, resolved on first use: one per request on the hit path.
    hot_l1_lookups: [OnceLock<IntCounter>; CacheResult::ALL.len()],
}

impl CacheMetrics {
    pub(super) fn new(r: &Registry) -> CacheMetrics {
        let m = CacheMetrics {
            lookups: counter_vec(
                r,
                "graphgate_cache_lookups_total",
                "Cache lookups by tier and result (hit, miss, stale, bypass).",
                &["tier", "result"],
            ),
            coalesced: counter(
                r,
                "graphgate_cache_coalesced_total",
                "Requests answered by another request's in-flight upstream call.",
            ),
            projected: counter(
                r,
                "graphgate_cache_projected_hits_total",
                "Node reads answered from a cached reply for more fields of the same node.",
            ),
            union_fills: counter(
                r,
                "graphgate_cache_union_fills_total",
                "Upstream calls that asked for the union of several concurrent node reads' fields.",
            ),
            merged_fills: counter(
                r,
                "graphgate_cache_merged_fills_total",
                "ids= calls that fetched concurrent misses for several nodes of one Page.",
            ),
            union_fallbacks: counter(
                r,
                "graphgate_cache_union_fallbacks_total",
                "Node reads that waited for a union fill, then called Graph on their own (union rejected or abandoned).",
            ),
            entries: int_gauge_vec(
                r,
                "graphgate_cache_entries",
                "Entries in the cache tier.",
                &["tier"],
            ),
            bytes: int_gauge_vec(
                r,
                "graphgate_cache_bytes",
                "Weighted size of the cache tier in bytes (bodies, headers, keys).",
                &["tier"],
            ),
            evictions: counter_vec(
                r,
                "graphgate_cache_evictions_total",
                "Entries removed from a cache tier, by cause.",
                &["tier", "cause"],
            ),
            invalidations: counter_vec(
                r,
                "graphgate_cache_invalidations_total",
                "Cache entries dropped by writes (reason=write) or the admin API (reason=purge).",
                &["reason"],
            ),
            stale_served: counter_vec(
                r,
                "graphgate_cache_stale_served_total",
                "Stale entries served, by reason (revalidate, error).",
                &["reason"],
            ),
            lease_waits: counter_vec(
                r,
                "graphgate_cache_lease_waits_total",
                "Misses that waited for another replica's fill, by outcome (filled, took_over, gave_up).",
                &["outcome"],
            ),
            hot_l1_lookups: Default::default(),
        };
        // Every series from the start, at 0: alerts on rates need them to exist.
        for result in CacheResult::ALL {
            m.lookups
                .with_label_values(&[CacheTier::L1.as_str(), result.as_str()]);
        }
        for cause in Eviction::ALL {
            m.evictions
                .with_label_values(&[CacheTier::L1.as_str(), cause.as_str()]);
        }
        for reason in InvalidationReason::ALL {
            m.invalidations.with_label_values(&[reason.as_str()]);
        }
        for reason in StaleReason::ALL {
            m.stale_served.with_label_values(&[reason.as_str()]);
        }
        m
    }

    /// Counts one cache lookup by tier and result (`graphgate_cache_lookups_total`).
    pub fn lookup(&self, tier: CacheTier, result: CacheResult) {
        match tier {
            CacheTier::L1 => self.hot_l1_lookups[result as usize]
                .get_or_init(|| {
                    self.lookups
                        .with_label_values(&[tier.as_str(), result.as_str()])
                })
                .inc(),
            CacheTier::L2 => self
                .lookups
                .with_label_values(&[tier.as_str(), result.as_str()])
                .inc(),
        }
    }

    /// Counts one entry leaving a cache tier.
    pub fn evicted(&self, tier: CacheTier, cause: Eviction) {
        self.evictions
            .with_label_values(&[tier.as_str(), cause.as_str()])
            .inc();
    }

    /// Counts `n` entries dropped on purpose.
    pub fn invalidated(&self, reason: InvalidationReason, n: u64) {
        self.invalidations
            .with_label_values(&[reason.as_str()])
            .inc_by(n);
    }

    /// Sets a tier's entry and weighted byte gauges.
    pub fn size(&self, tier: CacheTier, entries: u64, bytes: u64) {
        self.entries
            .with_label_values(&[tier.as_str()])
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
        self.bytes
            .with_label_values(&[tier.as_str()])
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Counts one stale entry served.
    pub fn served_stale(&self, reason: StaleReason) {
        self.stale_served
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// Counts one wait for another replica's fill, by how it ended.
    pub fn lease_waited(&self, outcome: LeaseWait) {
        self.lease_waits
            .with_label_values(&[outcome.as_str()])
            .inc();
    }
}
