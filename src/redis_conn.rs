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
//!
//! Three topologies, one [`Link`] type for the callers: one server (a connection manager),
//! a Redis Cluster (the cluster connection routes each key to its slot's primary) and a
//! primary elected by Sentinel (a connection manager to whichever primary the Sentinels name;
//! when it stops answering, or answers as a replica, the prober asks the Sentinels again).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, PubSub};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    Client, ClientTlsConfig, Cmd, ConnectionAddr, IntoConnectionInfo, Pipeline, RedisError,
    RedisFuture, RedisResult, TlsCertificates, TlsMode, Value,
};

use crate::config::{HostPort, RedisConfig, RedisTopology};
use crate::metrics::{Metrics, RedisOp};

/// Consecutive failures (timeouts, odd errors) that mark the link down.
const FAILURES_TO_DOWN: u32 = 3;
/// Prober backoff bounds while Redis is down.
const PROBE_MIN: Duration = Duration::from_millis(50);
const PROBE_MAX: Duration = Duration::from_secs(2);
/// Health check interval while up.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// A connection to Redis, whatever its topology: what every operation runs on. Cheap to
/// clone; clones share the underlying connection.
#[derive(Clone)]
pub enum Link {
    /// One server, or the primary Sentinel names.
    Single(ConnectionManager),
    /// A Redis Cluster: each command goes to its key's slot.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Link::Single(c) => c.req_packed_command(cmd),
            Link::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Link::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Link::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Link::Single(c) => c.get_db(),
            Link::Cluster(c) => c.get_db(),
        }
    }
}

/// How to (re)connect, per topology.
enum Target {
    Single,
    /// The cluster client, and one plain client per configured node for pub/sub (a
    /// cluster delivers every `PUBLISH` to every node, so subscribing to any one suffices).
    Cluster {
        client: ClusterClient,
        nodes: Vec<Client>,
    },
    /// Asks the Sentinels for the current primary.
    Sentinel(tokio::sync::Mutex<SentinelClient>),
}

/// A shared handle to Redis with fast failure and automatic recovery.
pub struct RedisConn {
    target: Target,
    /// The connection in use; `None` until a Cluster or Sentinel is first reached.
    link: ArcSwapOption<Link>,
    /// The server pub/sub connects to (one server, or the primary Sentinel named last).
    pubsub_client: ArcSwapOption<Client>,
    manager_config: ConnectionManagerConfig,
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
    /// on an unusable configuration (URL, certificate files).
    pub fn new(cfg: &RedisConfig, metrics: Arc<Metrics>) -> Result<Arc<RedisConn>, String> {
        let topology = cfg.topology.as_ref().ok_or("no redis.url")?;
        let certs = certificates(cfg)?;
        // Reconnect attempts are ours (the prober); the manager tries once per use and never
        // makes a request wait for backoff.
        let connect = (cfg.timeout * 4).max(Duration::from_millis(250));
        let manager_config = ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(100))
            .set_connection_timeout(Some(connect))
            .set_response_timeout(None);
        let (target, link, pubsub_client) = match topology {
            RedisTopology::Single(url) => {
                let client = single_client(url.expose(), cfg, certs.as_ref())
                    .map_err(|e| format!("redis.url is not usable: {}", e.category()))?;
                let manager =
                    ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())
                        .map_err(|e| format!("redis connection manager: {}", e.category()))?;
                (
                    Target::Single,
                    Some(Arc::new(Link::Single(manager))),
                    Some(Arc::new(client)),
                )
            }
            RedisTopology::Cluster(nodes) => {
                let urls: Vec<String> = nodes.iter().map(|n| node_url(n, cfg)).collect();
                let mut b = ClusterClientBuilder::new(urls.iter().map(String::as_str))
                    .retries(1)
                    .connection_timeout(connect)
                    .response_timeout(connect);
                if let Some(u) = &cfg.username {
                    b = b.username(u);
                }
                if let Some(p) = &cfg.password {
                    b = b.password(p.expose());
                }
                if let Some(c) = &certs {
                    b = b.tls(TlsMode::Secure).certs(c.clone());
                }
                let client = b
                    .build()
                    .map_err(|e| format!("redis cluster nodes are not usable: {}", e.category()))?;
                let nodes = urls
                    .iter()
                    .map(|u| single_client(u, cfg, certs.as_ref()))
                    .collect::<RedisResult<Vec<_>>>()
                    .map_err(|e| format!("redis cluster nodes are not usable: {}", e.category()))?;
                (Target::Cluster { client, nodes }, None, None)
            }
            RedisTopology::Sentinel {
                sentinels,
                master_name,
            } => {
                let addrs = sentinels.iter().map(|s| match &cfg.tls {
                    Some(_) => ConnectionAddr::TcpTls {
                        host: s.host.clone(),
                        port: s.port,
                        insecure: false,
                        tls_params: None,
                    },
                    None => ConnectionAddr::Tcp(s.host.clone(), s.port),
                });
                let mut b =
                    SentinelClientBuilder::new(addrs, master_name, SentinelServerType::Master)
                        .map_err(|e| format!("redis sentinels are not usable: {}", e.category()))?;
                if let Some(u) = &cfg.username {
                    b = b.set_client_to_redis_username(u);
                }
                if let Some(p) = &cfg.password {
                    b = b.set_client_to_redis_password(p.expose());
                }
                if let Some(p) = &cfg.sentinel_password {
                    b = b.set_client_to_sentinel_password(p.expose());
                }
                if cfg.tls.is_some() {
                    b = b
                        .set_client_to_redis_tls_mode(TlsMode::Secure)
                        .set_client_to_sentinel_tls_mode(TlsMode::Secure);
                }
                if let Some(c) = &certs {
                    b = b
                        .set_client_to_redis_certificates(c.clone())
                        .set_client_to_sentinel_certificates(c.clone());
                }
                let client = b
                    .build()
                    .map_err(|e| format!("redis sentinels are not usable: {}", e.category()))?;
                (
                    Target::Sentinel(tokio::sync::Mutex::new(client)),
                    None,
                    None,
                )
            }
        };
        metrics.redis.up.set(0);
        metrics.redis_in_use();
        Ok(Arc::new_cyclic(|me| RedisConn {
            target,
            link: ArcSwapOption::new(link),
            pubsub_client: ArcSwapOption::new(pubsub_client),
            manager_config,
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

    /// (Re)establishes the link where the topology needs it: a Cluster's first contact, and
    /// for Sentinel every time (the primary may have changed).
    async fn connect(&self) -> RedisResult<()> {
        match &self.target {
            Target::Single => Ok(()),
            Target::Cluster { client, .. } => {
                if self.link.load().is_none() {
                    let c = client.get_async_connection().await?;
                    self.link.store(Some(Arc::new(Link::Cluster(c))));
                }
                Ok(())
            }
            Target::Sentinel(sentinel) => {
                let client = sentinel.lock().await.async_get_client().await?;
                let same = self.pubsub_client.load().as_ref().is_some_and(|c| {
                    c.get_connection_info().addr() == client.get_connection_info().addr()
                });
                if !same || self.link.load().is_none() {
                    let manager = ConnectionManager::new_lazy_with_config(
                        client.clone(),
                        self.manager_config.clone(),
                    )?;
                    self.link.store(Some(Arc::new(Link::Single(manager))));
                    self.pubsub_client.store(Some(Arc::new(client)));
                    tracing::info!("Redis primary named by Sentinel connected");
                }
                Ok(())
            }
        }
    }

    /// Connects (where needed) and pings once; true when Redis answered.
    async fn reach(&self, wait: Duration) -> bool {
        let attempt = async {
            self.connect().await?;
            let Some(link) = self.link.load_full() else {
                return Ok(false);
            };
            let mut c = (*link).clone();
            redis::cmd("PING").query_async::<String>(&mut c).await?;
            Ok::<_, RedisError>(true)
        };
        matches!(tokio::time::timeout(wait, attempt).await, Ok(Ok(true)))
    }

    /// The keyspaces a `SCAN` must walk: `[None]` (the one server) or, on a Cluster, each
    /// primary by address. `None` when Redis is unavailable.
    pub async fn keyspaces(&self) -> Option<Vec<Option<(String, u16)>>> {
        let link = self.link.load_full()?;
        if !matches!(*link, Link::Cluster(_)) {
            return Some(vec![None]);
        }
        let nodes: String = self
            .run(RedisOp::Purge, |mut c| async move {
                redis::cmd("CLUSTER").arg("NODES").query_async(&mut c).await
            })
            .await?;
        Some(cluster_primaries(&nodes).into_iter().map(Some).collect())
    }

    /// One `SCAN` step (`MATCH pattern`) in one keyspace of [`RedisConn::keyspaces`].
    pub async fn scan(
        &self,
        keyspace: Option<&(String, u16)>,
        cursor: u64,
        pattern: &str,
    ) -> Option<(u64, Vec<String>)> {
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(500);
        let route = keyspace.map(|(host, port)| {
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                host: host.clone(),
                port: *port,
            })
        });
        self.run(RedisOp::Purge, |c| async move {
            match (c, route) {
                (Link::Cluster(mut c), Some(route)) => {
                    let v = c.route_command(scan, route).await?;
                    Ok(redis::from_redis_value(v)?)
                }
                (mut c, _) => scan.query_async(&mut c).await,
            }
        })
        .await
    }

    /// A dedicated pub/sub connection (invalidations, fill notices), on whichever server
    /// this topology delivers every message to.
    pub async fn pubsub(&self) -> RedisResult<PubSub> {
        if let Target::Cluster { nodes, .. } = &self.target {
            let mut last = None;
            // Start at a random node so replicas spread over the cluster.
            let start = fastrand::usize(..nodes.len().max(1));
            for i in 0..nodes.len() {
                match nodes[(start + i) % nodes.len()].get_async_pubsub().await {
                    Ok(ps) => return Ok(ps),
                    Err(e) => last = Some(e),
                }
            }
            return Err(last.unwrap_or_else(|| {
                RedisError::from((redis::ErrorKind::InvalidClientConfig, "no cluster nodes"))
            }));
        }
        match self.pubsub_client.load_full() {
            Some(c) => c.get_async_pubsub().await,
            None => Err(RedisError::from((
                redis::ErrorKind::Io,
                "no Redis primary known yet",
            ))),
        }
    }

    /// First contact: waits (briefly) for Redis so a replica starts sharing at once, and
    /// starts the prober if Redis is not there yet. Never fails.
    pub async fn start(self: &Arc<Self>) {
        self.spawn_heartbeat();
        let wait = (self.timeout * 10).max(Duration::from_millis(500));
        match self.reach(wait).await {
            true => self.mark_up(),
            false => {
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

    /// Runs one Redis operation within the timeout. `None` when the link is down or the
    /// operation failed: the caller then does what a single node would do.
    pub async fn run<T, F, Fut>(&self, op: RedisOp, f: F) -> Option<T>
    where
        F: FnOnce(Link) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if !self.is_up() {
            return None;
        }
        let link = self.link.load_full()?;
        match tokio::time::timeout(self.timeout, f((*link).clone())).await {
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
        // READONLY: the server became a replica (a Sentinel failover); the prober asks the
        // Sentinels for the new primary.
        let connection_lost = e.is_some_and(|e| {
            e.is_io_error()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || e.is_unrecoverable_error()
                || e.code() == Some("READONLY")
                || e.code() == Some("MASTERDOWN")
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
                if conn.reach(wait).await {
                    conn.probing.store(false, Ordering::Release);
                    conn.mark_up();
                    return;
                }
                delay = (delay * 2).min(PROBE_MAX);
            }
        });
    }
}

/// The `rediss://host:port` (or `redis://`) URL of a Cluster node.
fn node_url(n: &HostPort, cfg: &RedisConfig) -> String {
    let scheme = if cfg.tls.is_some() { "rediss" } else { "redis" };
    format!("{scheme}://{n}")
}

/// A client for one server, with the configured credentials and certificates.
fn single_client(
    url: &str,
    cfg: &RedisConfig,
    certs: Option<&TlsCertificates>,
) -> RedisResult<Client> {
    let mut info = url.into_connection_info()?;
    let mut settings = info.redis_settings().clone();
    if let Some(u) = &cfg.username {
        settings = settings.set_username(u);
    }
    if let Some(p) = &cfg.password {
        settings = settings.set_password(p.expose());
    }
    info = info.set_redis_settings(settings);
    match certs {
        Some(c) => Client::build_with_tls(info, c.clone()),
        None => Client::open(info),
    }
}

/// The CA and client certificate files, read once at start. `None` without them: the
/// public roots then decide (or no TLS at all).
fn certificates(cfg: &RedisConfig) -> Result<Option<TlsCertificates>, String> {
    let Some(tls) = &cfg.tls else {
        return Ok(None);
    };
    let read = |key: &str, p: &std::path::Path| {
        std::fs::read(p).map_err(|e| format!("redis.{key} {}: {e}", p.display()))
    };
    let root_cert = tls
        .ca_file
        .as_deref()
        .map(|p| read("ca_file", p))
        .transpose()?;
    let client_tls = match (&tls.cert_file, &tls.key_file) {
        (Some(c), Some(k)) => Some(ClientTlsConfig {
            client_cert: read("cert_file", c)?,
            client_key: read("key_file", k)?,
        }),
        _ => None,
    };
    if root_cert.is_none() && client_tls.is_none() {
        return Ok(None);
    }
    Ok(Some(TlsCertificates {
        client_tls,
        root_cert,
    }))
}

/// The primaries' addresses in a `CLUSTER NODES` reply (`id host:port@bus flags …`).
fn cluster_primaries(nodes: &str) -> Vec<(String, u16)> {
    nodes
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let addr = f.nth(1)?;
            let flags = f.next()?;
            if !flags.split(',').any(|x| x == "master") || flags.contains("fail") {
                return None;
            }
            let addr = addr.split('@').next()?;
            let (host, port) = addr.rsplit_once(':')?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            Some((host.to_string(), port.parse().ok().filter(|p| *p > 0)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_primaries_are_read_from_cluster_nodes() {
        let nodes = "\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7001@17001 master - 0 1 2 connected 5461-10922
c3 127.0.0.1:7002@17002 slave b2 0 1 2 connected
d4 127.0.0.1:7003@17003 master,fail - 0 1 3 disconnected
e5 :0@0 master,noaddr - 0 1 4 disconnected
";
        assert_eq!(
            cluster_primaries(nodes),
            vec![
                ("127.0.0.1".to_string(), 7000),
                ("127.0.0.1".to_string(), 7001)
            ]
        );
    }
}
