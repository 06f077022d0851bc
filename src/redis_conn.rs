//! The one Redis link every replica shares state through, and its health.
//!
//! Redis is an accelerator, never a dependency: every operation goes through
//! [`RedisConn::run`], which gives up after `redis.timeout_ms` and turns any failure into
//! `None`, so callers fall back to local behaviour. Connection failures (or three failures
//! in a row) mark the link *down*: from then on operations return `None` at once, without
//! touching the network, and a prober pings with backoff until Redis answers again. Each
//! change of state is logged once and shown in `graphgate_redis_up`; failures are counted
//! in `graphgate_redis_errors_total{op}`.
//!
//! Keys all start with `redis.key_prefix`; everything about one Page or one cache node sits
//! under a hash tag (`{page:1001}`, `{n:1001}`) so it lives in one Redis Cluster slot and
//! scripts may touch it together.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, RedisResult};

use crate::config::RedisConfig;
use crate::metrics::{Metrics, RedisOp};

/// Consecutive failures (timeouts, odd errors) that mark the link down.
const FAILURES_TO_DOWN: u32 = 3;
/// Prober backoff bounds while Redis is down.
const PROBE_MIN: Duration = Duration::from_millis(50);
const PROBE_MAX: Duration = Duration::from_secs(2);
/// Health check interval while up.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// A shared handle to Redis with fast failure and automatic recovery.
pub struct RedisConn {
    manager: ConnectionManager,
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    /// Random id of this replica: lets it ignore its own pub/sub messages.
    replica: u64,
    up: AtomicBool,
    probing: AtomicBool,
    failures: AtomicU32,
    metrics: Arc<Metrics>,
    /// For the prober task, which must not keep a dropped gateway's link alive.
    me: Weak<RedisConn>,
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: never printed.
        f.debug_struct("RedisConn")
            .field("prefix", &self.prefix)
            .field("up", &self.is_up())
            .finish()
    }
}

impl RedisConn {
    /// Builds the link without connecting (that happens in [`RedisConn::start`]). Fails only
    /// on an unusable URL.
    pub fn new(cfg: &RedisConfig, metrics: Arc<Metrics>) -> Result<Arc<RedisConn>, String> {
        let url = cfg.url.as_ref().ok_or("no redis.url")?;
        let client = redis::Client::open(url.expose())
            .map_err(|e| format!("redis.url is not usable: {}", e.category()))?;
        // Reconnect attempts are ours (the prober); the manager tries once per use and never
        // makes a request wait for backoff.
        let connect = (cfg.timeout * 4).max(Duration::from_millis(250));
        let mc = ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(100))
            .set_connection_timeout(Some(connect))
            .set_response_timeout(None);
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), mc)
            .map_err(|e| format!("redis connection manager: {}", e.category()))?;
        metrics.redis.up.set(0);
        metrics.redis_in_use();
        Ok(Arc::new_cyclic(|me| RedisConn {
            manager,
            client,
            prefix: cfg.key_prefix.clone(),
            timeout: cfg.timeout,
            replica: fastrand::u64(..),
            up: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            metrics,
            me: me.clone(),
        }))
    }

    /// First contact: waits (briefly) for Redis so a replica starts sharing at once, and
    /// starts the prober if Redis is not there yet. Never fails.
    pub async fn start(self: &Arc<Self>) {
        self.spawn_heartbeat();
        let wait = (self.timeout * 10).max(Duration::from_millis(500));
        let mut c = self.manager.clone();
        let cmd = redis::cmd("PING");
        let ping = tokio::time::timeout(wait, cmd.query_async::<String>(&mut c));
        match ping.await {
            Ok(Ok(_)) => self.mark_up(),
            _ => {
                tracing::warn!(
                    "Redis is not reachable at start; running on local state until it is"
                );
                self.spawn_prober();
            }
        }
    }

    /// Pings every [`HEARTBEAT`] while up, so an outage shows in `graphgate_redis_up` (and
    /// the prober starts) even when no request happens to need Redis.
    fn spawn_heartbeat(&self) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let me = self.me.clone();
        handle.spawn(async move {
            loop {
                tokio::time::sleep(HEARTBEAT).await;
                let Some(conn) = me.upgrade() else { return };
                conn.run(RedisOp::Ping, |mut c| async move {
                    redis::cmd("PING").query_async::<String>(&mut c).await
                })
                .await;
            }
        });
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn replica(&self) -> u64 {
        self.replica
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// A client for dedicated connections (pub/sub).
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// Runs one Redis operation within the timeout. `None` when the link is down or the
    /// operation failed: the caller then does what a single node would do.
    pub async fn run<T, F, Fut>(&self, op: RedisOp, f: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if !self.is_up() {
            return None;
        }
        match tokio::time::timeout(self.timeout, f(self.manager.clone())).await {
            Ok(Ok(v)) => {
                self.failures.store(0, Ordering::Relaxed);
                Some(v)
            }
            Ok(Err(e)) => {
                self.failed(op, Some(&e));
                None
            }
            Err(_) => {
                self.failed(op, None);
                None
            }
        }
    }

    /// Counts a failure and decides whether the link is down. A full Redis (OOM) is not
    /// down: reads still work, and each refused write falls back on its own.
    fn failed(&self, op: RedisOp, e: Option<&RedisError>) {
        self.metrics.redis.error(op);
        let connection_lost = e.is_some_and(|e| {
            e.is_io_error()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || e.is_unrecoverable_error()
        });
        let oom = e.and_then(|e| e.code()).is_some_and(|c| c == "OOM");
        if oom {
            tracing::debug!(op = op.as_str(), "Redis refused a write: out of memory");
            return;
        }
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if connection_lost || n >= FAILURES_TO_DOWN {
            self.mark_down(op, e);
        }
    }

    fn mark_up(&self) {
        self.failures.store(0, Ordering::Relaxed);
        if !self.up.swap(true, Ordering::AcqRel) {
            self.metrics.redis.up.set(1);
            tracing::info!("Redis reachable: sharing cache, budgets and invalidations");
        }
    }

    fn mark_down(&self, op: RedisOp, e: Option<&RedisError>) {
        if self.up.swap(false, Ordering::AcqRel) {
            self.metrics.redis.up.set(0);
            let why = e.map_or("timeout", |e| e.category());
            tracing::warn!(
                op = op.as_str(),
                why,
                "Redis unreachable: running on local state (L1 only, local budgets) until it returns"
            );
            self.spawn_prober();
        }
    }

    /// Pings with backoff until Redis answers, then marks the link up. One prober at a time.
    fn spawn_prober(&self) {
        if self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            self.probing.store(false, Ordering::Release);
            return;
        };
        let me = self.me.clone();
        let wait = (self.timeout * 4).max(Duration::from_millis(250));
        handle.spawn(async move {
            let mut delay = PROBE_MIN;
            loop {
                tokio::time::sleep(delay).await;
                let Some(conn) = me.upgrade() else { return };
                let mut c = conn.manager.clone();
                let cmd = redis::cmd("PING");
                let ping = cmd.query_async::<String>(&mut c);
                let ok = matches!(tokio::time::timeout(wait, ping).await, Ok(Ok(_)));
                if ok {
                    conn.probing.store(false, Ordering::Release);
                    conn.mark_up();
                    return;
                }
                delay = (delay * 2).min(PROBE_MAX);
            }
        });
    }
}
