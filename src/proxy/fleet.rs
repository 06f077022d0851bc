//! The fleet phase of a fill: what a replica does with Redis around its upstream call, so
//! several replicas behave as one proxy.
//!
//! Before calling Graph for a key ([`Gateway::before_fill`]): look in the Redis tier (a fresh
//! entry there is promoted into L1 and answers); otherwise take the key's fleet fill lock
//! ([`FleetLock`]), or, if another replica holds it, wait for that replica's entry instead
//! of calling Graph. After the call ([`Gateway::after_fill`]): write the entry to Redis and
//! release the lock, which wakes the waiters. Any Redis failure along the way means "fill
//! locally", never an error.

use std::sync::Arc;
use std::time::Duration;

use super::Gateway;
use crate::cache::entry::Entry;
use crate::cache::fill_lock::{FillLock, Locked, ReadOutcome};
use crate::cache::key::CacheKey;
use crate::cache::lease::{FleetLock, Lease};
use crate::cache::{Fill, FillKind, FillResult, Shared};
use crate::error::ProxyError;
use crate::metrics::{CacheResult, CacheTier, LeaseWait};
use crate::upstream::reply_budget::Source;

/// Extra lease time beyond the upstream timeout (token minting, a short queue).
const LEASE_MARGIN: Duration = Duration::from_secs(1);

/// How a fill starts.
pub(super) enum FleetStart {
    /// Answered from the shared tier (or another replica's fill): no upstream call. An
    /// error when the reply budget had no room for the entry.
    Served(FillResult),
    /// Call Graph; then hand this to [`Gateway::after_fill`].
    Fetch(FleetFill),
}

/// What a fill that goes upstream carries for the Redis side.
#[derive(Debug, Default)]
pub(super) struct FleetFill {
    /// The node's epoch in Redis when we looked: the shared store is refused if a write on
    /// any replica moved it. `None`: Redis did not answer, so no shared store.
    epoch: Option<String>,
    lease: Option<Lease>,
}

impl Gateway {
    /// Starts what runs beside the requests when Redis is configured: the first contact
    /// with Redis (briefly awaited, so a replica shares from its first request) and the task
    /// that applies other replicas' invalidations to L1. Call once, after wrapping in `Arc`.
    pub async fn start_fleet(self: &Arc<Self>) {
        let Some(sh) = self.cache.shared() else {
            return;
        };
        sh.l2.conn().start().await;
        let mut rx = sh.bus.subscribe();
        let gw = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(inv) = rx.recv().await {
                let Some(gw) = gw.upgrade() else { return };
                gw.cache.apply_remote(inv);
            }
        });
    }

    /// Before a fill's upstream call: see module docs. `serve` is false when the client
    /// asked to revalidate (the shared entry must not answer, but its epoch is still read).
    /// A stale shared entry becomes the fill's `stale` copy when it has none (for
    /// `If-None-Match` and stale-if-error).
    pub(super) async fn before_fill(
        &self,
        key: &CacheKey,
        serve: bool,
        stale: &mut Option<Arc<Entry>>,
        epoch: u64,
    ) -> FleetStart {
        let Some(sh) = self.cache.shared() else {
            return FleetStart::Fetch(FleetFill::default());
        };
        let Some(look) = sh.l2.lookup(key).await else {
            return FleetStart::Fetch(FleetFill::default());
        };
        let mut fleet = FleetFill {
            epoch: Some(look.epoch),
            lease: None,
        };
        if let Some(found) = look.entry {
            if serve && found.is_fresh() {
                self.cache.count_tier(CacheTier::L2, CacheResult::Hit);
                let found = Arc::new(found);
                return FleetStart::Served(self.promote(key, found, FillKind::L2Hit, epoch).await);
            }
            self.cache.count_tier(CacheTier::L2, CacheResult::Stale);
            if stale.is_none() {
                *stale = Some(Arc::new(found));
            }
        } else {
            self.cache.count_tier(CacheTier::L2, CacheResult::Miss);
        }
        if !serve {
            return FleetStart::Fetch(fleet);
        }
        let lock = self.fleet_lock(sh);
        let reader = match lock.lock(key).await {
            Locked::Write(lease) => {
                fleet.lease = Some(lease);
                return FleetStart::Fetch(fleet);
            }
            Locked::Read(reader) => reader,
            Locked::Unavailable => return FleetStart::Fetch(fleet),
        };
        let deadline = self.config.upstream.timeout + self.config.quota.queue_timeout;
        let outcome = lock.wait(reader, deadline).await;
        self.metrics.cache.lease_waited(match &outcome {
            ReadOutcome::Done(_) => LeaseWait::Filled,
            ReadOutcome::TookOver(_) => LeaseWait::TookOver,
            ReadOutcome::GaveUp(_) => LeaseWait::GaveUp,
        });
        match outcome {
            ReadOutcome::Done(found) => {
                self.metrics.cache.coalesced.inc();
                return FleetStart::Served(self.promote(key, found, FillKind::Remote, epoch).await);
            }
            ReadOutcome::TookOver(lease) => {
                fleet.epoch = lease.epoch.clone();
                fleet.lease = Some(lease);
            }
            // Redis stopped answering or the holder is too slow: fill locally.
            ReadOutcome::GaveUp(_) => {}
        }
        FleetStart::Fetch(fleet)
    }

    /// Members of an `ids=` or batch read that missed the in-process tier, looked up in the
    /// Redis tier at once: with `serve`, a fresh entry is promoted into L1 and returned. Each
    /// comes with its node's Redis epoch (what a later store of that member must match).
    /// Without Redis, or while it is down: nothing found, no epochs.
    pub(super) async fn shared_members(
        &self,
        keys: &[&CacheKey],
        serve: bool,
    ) -> Vec<(Option<Arc<Entry>>, Option<String>)> {
        let Some(sh) = self.cache.shared() else {
            return vec![(None, None); keys.len()];
        };
        let epochs: Vec<u64> = keys.iter().map(|k| self.cache.epoch(k)).collect();
        let looks = futures_util::future::join_all(keys.iter().map(|k| sh.l2.lookup(k))).await;
        let mut out = Vec::with_capacity(keys.len());
        for ((key, epoch), look) in keys.iter().zip(epochs).zip(looks) {
            let Some(look) = look else {
                out.push((None, None));
                continue;
            };
            match look.entry {
                Some(entry) if serve && entry.status.is_success() && entry.is_fresh() => {
                    self.cache.count_tier(CacheTier::L2, CacheResult::Hit);
                    self.cache.store(key, &entry, epoch);
                    out.push((Some(Arc::new(entry)), Some(look.epoch)));
                }
                found => {
                    // Counted as a single read's lookup is: an entry too old is stale.
                    let result = if found.is_some() {
                        CacheResult::Stale
                    } else {
                        CacheResult::Miss
                    };
                    self.cache.count_tier(CacheTier::L2, result);
                    out.push((None, Some(look.epoch)));
                }
            }
        }
        out
    }

    /// After a fill's upstream call: the entry goes to Redis (if it went into L1 and no write
    /// intervened anywhere), then the lock is released and waiting replicas are woken.
    pub(super) async fn after_fill(
        &self,
        key: &CacheKey,
        entry: &Arc<Entry>,
        stored: bool,
        fleet: FleetFill,
    ) {
        let Some(sh) = self.cache.shared() else {
            return;
        };
        if let (true, Some(epoch)) = (stored, &fleet.epoch) {
            self.cache.store_shared(key, entry, epoch).await;
        }
        if let Some(lease) = fleet.lease {
            self.fleet_lock(sh).release(lease, entry.clone()).await;
        }
    }

    /// The fleet's fill lock, its leases outliving an upstream call by a margin.
    fn fleet_lock<'a>(&self, sh: &'a Shared) -> FleetLock<'a> {
        FleetLock::new(sh, self.config.upstream.timeout + LEASE_MARGIN)
    }

    /// Puts an entry from Redis into L1 (unless a local write raced it) and makes it the
    /// fill's result, its body counted against the reply budget while it is served.
    async fn promote(
        &self,
        key: &CacheKey,
        entry: Arc<Entry>,
        kind: FillKind,
        epoch: u64,
    ) -> FillResult {
        self.cache.store(key, &entry, epoch);
        let hold = self
            .upstream
            .reply_budget()
            .reserve(entry.body_len(), Source::Cache)
            .ok_or(ProxyError::Overloaded { retry_after_s: 1 })?;
        Ok(Fill {
            entry,
            kind,
            pieces: None,
            hold: Some(Arc::new(hold)),
        })
    }
}
