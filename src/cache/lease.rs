//! The fleet-wide [`FillLock`]: one replica at a time calls Graph for a key.
//!
//! A replica that misses takes a short lease (`SET key token NX PX`), the token being random
//! per fill. While it holds it, other replicas missing the same key wait for its entry
//! (woken by the bus's "filled" message, or by polling L2) instead of calling Graph. The
//! lease expires on its own if its holder dies; the next waiter then takes it over. Release
//! deletes the lease only if it still holds our token, so a holder that outlived its lease
//! never frees a successor's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::Script;

use super::entry::Entry;
use super::fill_lock::{FillLock, Locked, ReadOutcome, WaitError};
use super::key::{CacheKey, KeyId};
use super::Shared;
use crate::metrics::RedisOp;
use crate::redis_conn::RedisConn;

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// A reader re-checks L2 and the lease at least this often, in case a notice was lost.
const POLL_MIN: Duration = Duration::from_millis(20);
const POLL_MAX: Duration = Duration::from_millis(200);

/// The fill lock across replicas: leases in Redis, entries through the Redis tier.
pub struct FleetLock<'a> {
    shared: &'a Shared,
    /// How long a lease lives unless released: its holder's upstream call and a margin.
    ttl: Duration,
}

/// A held lease: the fleet's write permit. Dropped unreleased (the fill failed), it is
/// released in a spawned task, so the readers take over without waiting for it to expire.
#[derive(Debug)]
pub struct Lease {
    conn: Arc<RedisConn>,
    id: KeyId,
    key: String,
    token: String,
    released: bool,
    /// After a takeover: the node's epoch in Redis read just before it. The fill's shared
    /// store must match this one (a write may have moved it during the wait).
    pub epoch: Option<String>,
}

/// Waits for the replica holding a key's lease.
pub struct LeaseReader(CacheKey);

impl<'a> FleetLock<'a> {
    pub fn new(shared: &'a Shared, ttl: Duration) -> Self {
        FleetLock { shared, ttl }
    }

    /// One `SET NX PX` with a new token: `Read(())` when another replica holds the lease.
    async fn acquire(&self, key: &CacheKey) -> Locked<Lease, ()> {
        let l2 = &self.shared.l2;
        let conn = l2.conn().clone();
        let lkey = l2.lease_key(key);
        let token = format!("{:016x}{:016x}", conn.replica(), fastrand::u64(..));
        let px = u64::try_from(self.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let (k, t) = (lkey.clone(), token.clone());
        let got: Option<Option<String>> = conn
            .run(RedisOp::Lease, |mut c| async move {
                redis::cmd("SET")
                    .arg(k)
                    .arg(t)
                    .arg("NX")
                    .arg("PX")
                    .arg(px)
                    .query_async(&mut c)
                    .await
            })
            .await;
        match got {
            None => Locked::Unavailable,
            Some(None) => Locked::Read(()),
            Some(Some(_)) => Locked::Write(Lease {
                conn,
                id: key.id,
                key: lkey,
                token,
                released: false,
                epoch: None,
            }),
        }
    }
}

impl FillLock for FleetLock<'_> {
    type Key = CacheKey;
    /// The writer's entry, found fresh in the Redis tier.
    type Value = Arc<Entry>;
    type Permit = Lease;
    type Reader = LeaseReader;

    async fn lock(&self, key: &CacheKey) -> Locked<Lease, LeaseReader> {
        match self.acquire(key).await {
            Locked::Write(lease) => Locked::Write(lease),
            Locked::Read(()) => Locked::Read(LeaseReader(key.clone())),
            Locked::Unavailable => Locked::Unavailable,
        }
    }

    /// Polls L2 and the lease, woken early by the bus: the writer's entry ends the wait, and
    /// so does the lease coming free (its holder failed, or died and it expired), which this
    /// replica then takes over. Gives up at the deadline or when Redis stops answering.
    async fn wait(
        &self,
        reader: LeaseReader,
        deadline: Duration,
    ) -> ReadOutcome<Arc<Entry>, Lease> {
        let LeaseReader(key) = reader;
        let (l2, bus) = (&self.shared.l2, &self.shared.bus);
        let until = Instant::now() + deadline;
        let mut poll = POLL_MIN;
        loop {
            let watch = bus.watch(key.id);
            let notified = watch.notify().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let Some(look) = l2.lookup(&key).await else {
                return ReadOutcome::GaveUp(WaitError::Unavailable);
            };
            if let Some(found) = look.entry.filter(Entry::is_fresh) {
                return ReadOutcome::Done(Arc::new(found));
            }
            match self.acquire(&key).await {
                Locked::Write(mut lease) => {
                    lease.epoch = Some(look.epoch);
                    return ReadOutcome::TookOver(lease);
                }
                Locked::Unavailable => return ReadOutcome::GaveUp(WaitError::Unavailable),
                Locked::Read(()) => {}
            }
            if Instant::now() >= until {
                return ReadOutcome::GaveUp(WaitError::TimedOut);
            }
            let _ = tokio::time::timeout(poll, notified).await;
            poll = (poll * 2).min(POLL_MAX);
        }
    }

    /// The entry reaches the readers through the Redis tier (stored there first, when it
    /// may be): this frees the lease and wakes them to look.
    async fn release(&self, mut permit: Lease, _entry: Arc<Entry>) {
        permit.released = true;
        release(&permit.conn, &permit.key, &permit.token).await;
        self.shared.bus.filled(permit.id).await;
    }
}

async fn release(conn: &RedisConn, key: &str, token: &str) {
    let script = Script::new(RELEASE);
    let (k, t) = (key.to_string(), token.to_string());
    conn.run(RedisOp::Lease, |mut c| async move {
        script.key(k).arg(t).invoke_async::<i64>(&mut c).await
    })
    .await;
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        // A fill that ended early (error, panic): free the key for the waiters now rather
        // than when the lease expires.
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            let (conn, key, token) = (
                self.conn.clone(),
                std::mem::take(&mut self.key),
                std::mem::take(&mut self.token),
            );
            h.spawn(async move { release(&conn, &key, &token).await });
        }
    }
}
