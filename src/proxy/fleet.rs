//! The fleet phase of a fill: what a replica does with Redis around its upstream call, so
//! several replicas behave as one proxy.
//!
//! Before calling Graph for a key ([`Gateway::before_fill`]): look in the Redis tier (a fresh
//! entry there is promoted into L1 and answers); otherwise take the key's fill lease, or, if
//! another replica holds it, wait for that replica's entry instead of calling Graph. After
//! the call ([`Gateway::after_fill`]): write the entry to Redis, free the lease and wake the
//! waiters. Any Redis failure along the way means "fill locally", never an error.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Gateway;
use crate::cache::entry::{Entry, Freshness};
use crate::cache::key::CacheKey;
use crate::cache::lease::{self, Lease, LeaseTry};
use crate::cache::{Fill, FillKind, FillResult, Shared};
use crate::error::ProxyError;
use crate::metrics::{CacheResult, CacheTier, LeaseWait};
use crate::upstream::reply_budget::Source;

/// Extra lease time beyond the upstream timeout (token minting, a short queue).
const LEASE_MARGIN: Duration = Duration::from_secs(1);
/// A waiter re-checks L2 and the lease at least this often, in case a notice was lost.
const POLL_MIN: Duration = Duration::from_millis(20);
const POLL_MAX: Duration = Duration::from_millis(200);

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
            if serve && self.fresh(&found) {
                self.cache.count_tier(CacheTier::L2, CacheResult::Hit);
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
        let ttl = self.config.upstream.timeout + LEASE_MARGIN;
        match lease::acquire(&sh.l2, key, ttl).await {
            LeaseTry::Acquired(l) => fleet.lease = Some(l),
            LeaseTry::Unavailable => {}
            LeaseTry::Held => match self.wait_for_fill(sh, key, ttl, epoch).await {
                Waited::Filled(fill) => return FleetStart::Served(fill),
                Waited::TookOver(l, e) => {
                    fleet.lease = Some(l);
                    fleet.epoch = Some(e);
                }
                Waited::GaveUp => {}
            },
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
                Some(entry) if serve && entry.status.is_success() && self.fresh(&entry) => {
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
    /// intervened anywhere), then the lease is freed and waiting replicas are woken.
    pub(super) async fn after_fill(
        &self,
        key: &CacheKey,
        entry: &Entry,
        stored: bool,
        fleet: FleetFill,
    ) {
        let Some(sh) = self.cache.shared() else {
            return;
        };
        if let (true, Some(epoch)) = (stored, &fleet.epoch) {
            self.cache.store_shared(key, entry, epoch).await;
        }
        if let Some(l) = fleet.lease {
            l.release().await;
            sh.bus.filled(key.id).await;
        }
    }

    fn fresh(&self, e: &Entry) -> bool {
        e.freshness(Instant::now(), Duration::ZERO, Duration::ZERO) == Freshness::Fresh
    }

    /// Puts an entry from Redis into L1 (unless a local write raced it) and makes it the
    /// fill's result, its body counted against the reply budget while it is served.
    async fn promote(
        &self,
        key: &CacheKey,
        entry: Entry,
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
            entry: Arc::new(entry),
            kind,
            pieces: None,
            hold: Some(Arc::new(hold)),
        })
    }

    /// Waits for the replica holding `key`'s lease: its entry arriving in L2 ends the wait;
    /// so does the lease coming free (it failed, or expired with its holder), in which case
    /// this replica takes it over. Bounded by the fill deadline.
    async fn wait_for_fill(
        &self,
        sh: &Shared,
        key: &CacheKey,
        lease_ttl: Duration,
        epoch: u64,
    ) -> Waited {
        let metrics = &self.metrics;
        let deadline =
            Instant::now() + self.config.upstream.timeout + self.config.quota.queue_timeout;
        let mut poll = POLL_MIN;
        loop {
            let watch = sh.bus.watch(key.id);
            let notified = watch.notify().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let Some(look) = sh.l2.lookup(key).await else {
                metrics.cache.lease_waited(LeaseWait::GaveUp);
                return Waited::GaveUp;
            };
            if let Some(found) = look.entry.filter(|e| self.fresh(e)) {
                metrics.cache.lease_waited(LeaseWait::Filled);
                self.metrics.cache.coalesced.inc();
                return Waited::Filled(self.promote(key, found, FillKind::Remote, epoch).await);
            }
            match lease::acquire(&sh.l2, key, lease_ttl).await {
                LeaseTry::Acquired(l) => {
                    metrics.cache.lease_waited(LeaseWait::TookOver);
                    return Waited::TookOver(l, look.epoch);
                }
                LeaseTry::Unavailable => {
                    metrics.cache.lease_waited(LeaseWait::GaveUp);
                    return Waited::GaveUp;
                }
                LeaseTry::Held => {}
            }
            if Instant::now() >= deadline {
                metrics.cache.lease_waited(LeaseWait::GaveUp);
                return Waited::GaveUp;
            }
            let _ = tokio::time::timeout(poll, notified).await;
            poll = (poll * 2).min(POLL_MAX);
        }
    }
}

enum Waited {
    Filled(FillResult),
    /// The lease came free; we hold it now (with the epoch read just before).
    TookOver(Lease, String),
    GaveUp,
}
