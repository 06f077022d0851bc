//! Fill leases: one replica at a time calls Graph for a key.
//!
//! A replica that misses takes a short lease (`SET key token NX PX`), the token being random
//! per fill. While it holds it, other replicas missing the same key wait for its entry
//! (woken by the bus's "filled" message, or by polling L2) instead of calling Graph. The
//! lease expires on its own if its holder dies; the next waiter then takes it over. Release
//! deletes the lease only if it still holds our token, so a holder that outlived its lease
//! never frees a successor's.

use std::sync::Arc;
use std::time::Duration;

use redis::Script;

use super::key::CacheKey;
use super::l2::L2;
use crate::metrics::RedisOp;
use crate::redis_conn::RedisConn;

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// The outcome of asking for a lease.
#[derive(Debug)]
pub enum LeaseTry {
    /// This replica fills the key.
    Acquired(Lease),
    /// Another replica is filling it.
    Held,
    /// Redis did not answer: fill locally.
    Unavailable,
}

/// A held lease. Released when dropped (in a spawned task), or explicitly.
#[derive(Debug)]
pub struct Lease {
    conn: Arc<RedisConn>,
    key: String,
    token: String,
    released: bool,
}

pub async fn acquire(l2: &L2, key: &CacheKey, ttl: Duration) -> LeaseTry {
    let conn = l2.conn().clone();
    let lkey = l2.lease_key(key);
    let token = format!("{:016x}{:016x}", conn.replica(), fastrand::u64(..));
    let px = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
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
        None => LeaseTry::Unavailable,
        Some(None) => LeaseTry::Held,
        Some(Some(_)) => LeaseTry::Acquired(Lease {
            conn,
            key: lkey,
            token,
            released: false,
        }),
    }
}

impl Lease {
    pub async fn release(mut self) {
        self.released = true;
        release(&self.conn, &self.key, &self.token).await;
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
