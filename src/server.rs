//! Sockets: the public listener (HTTP/1.1 and h2c through hyper-util's auto builder, or TLS
//! with HTTP/2 and HTTP/1.1 by ALPN) and the admin listener, header-read timeout and head-size
//! limits, and graceful shutdown that stops accepting public connections, fails /readyz
//! (the admin listener keeps answering through the drain), and drains in-flight requests up
//! to a deadline.
//!
//! Protection against load and abuse lives here:
//! - `server.max_connections` (`server.admin_max_connections` on the admin listener): a
//!   connection beyond it is closed as soon as it is accepted;
//! - on both listeners, a connection's first request head must arrive within
//!   `header_read_timeout_ms` of accepting it, or it is closed (one that sends nothing, a
//!   partial HTTP/2 preface, an HTTP/2 connection that opens no stream); later HTTP/1 heads
//!   must also arrive within that time (slowloris), and TLS handshakes within the same time;
//! - `server.idle_timeout_ms`: a connection with no request in flight for that long is closed
//!   gracefully (HTTP/2 gets a GOAWAY), on both listeners;
//! - `server.max_in_flight`: requests beyond it are not queued but answered at once with 503,
//!   `Retry-After` and a Graph-style error (load shedding, the first layer of
//!   [`crate::stack::public`], which every public request goes through).
//!
//! Public connections are served by `server.workers` threads, each with its own
//! single-threaded runtime and its own listening socket on `server.listen`, keeping their
//! connection counts even (see [`Workers`]); the admin listener and background tasks stay
//! on the runtime that called [`start`].
//!
//! [`Running::reload`] applies a new configuration without a restart (clients, TLS
//! certificates); see its docs for what needs a restart.

mod linger;
mod on_wake;
pub mod slice;

use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::admin;
use crate::auth::PeerCertificate;
use crate::config::{Config, ServerConfig};
use crate::metrics::{ConfigReload, Listener, Metrics};
use crate::proxy::Gateway;
use crate::stack;
use crate::tls;
use on_wake::OnWake;

/// A running graphgate: both listeners bound, serving until [`Running::shutdown`].
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    tls: Option<Arc<tls::Reloadable>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    /// `http://127.0.0.1:PORT` (`https://` with TLS) of the public listener.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }

    /// Stops accepting, drains in-flight requests (bounded by `server.shutdown_grace`) and
    /// returns when done.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Serves until `signal` resolves, then shuts down gracefully.
    pub async fn run_until(self, signal: impl Future<Output = ()>) {
        signal.await;
        tracing::info!("shutting down: draining in-flight requests");
        self.shutdown().await;
    }

    /// Applies a new (already validated) configuration without a restart, or refuses it and
    /// keeps the current one. Reloaded: `[[clients]]` (keys, digests, certificate subjects,
    /// Pages, write permission) and the TLS certificate, key and client CA files (read again
    /// even if their paths did not change). Everything else (listeners, limits, upstream,
    /// credentials, cache, quota, log, webhooks) needs a restart: changes there are logged and ignored.
    /// Turning TLS on or off is refused. Counted in `graphgate_config_reloads_total{result}`.
    pub fn reload(&self, config: Config) -> Result<(), String> {
        match self.apply(config) {
            Ok(ignored) => {
                self.gateway.metrics.server.reloaded(ConfigReload::Ok);
                if !ignored.is_empty() {
                    tracing::warn!(
                        sections = ?ignored,
                        "configuration reloaded; changes in these sections need a restart and were ignored"
                    );
                }
                tracing::info!("configuration reloaded");
                Ok(())
            }
            Err(why) => {
                self.reject_reload(&why);
                Err(why)
            }
        }
    }

    /// Records a reload that failed before [`Running::reload`] (e.g. the file did not parse):
    /// the running configuration stays.
    pub fn reject_reload(&self, why: &str) {
        self.gateway.metrics.server.reloaded(ConfigReload::Rejected);
        tracing::error!(
            reason = why,
            "configuration reload rejected; keeping the running configuration"
        );
    }

    /// Validates everything that can fail first, then swaps. Returns the sections whose
    /// changes were ignored.
    fn apply(&self, config: Config) -> Result<Vec<&'static str>, String> {
        let new_tls = match (&self.tls, &config.server.tls) {
            (Some(_), Some(t)) => Some(tls::server_config(t)?),
            (None, None) => None,
            _ => return Err("turning TLS on or off needs a restart".into()),
        };
        let ignored = needs_restart(&self.gateway.config, &config);
        if let (Some(current), Some(new), Some(files)) = (&self.tls, new_tls, &config.server.tls) {
            current.replace(new, files);
        }
        self.gateway.clients.replace(&config.clients);
        Ok(ignored)
    }
}

/// Sections that differ between two configurations but are not reloadable.
fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    fn differs(a: &impl std::fmt::Debug, b: &impl std::fmt::Debug) -> bool {
        format!("{a:?}") != format!("{b:?}")
    }
    let expose = |s: &Option<crate::config::Secret>| s.as_ref().map(|s| s.expose().to_string());
    let mut out = Vec::new();
    let mut old_server = old.server.clone();
    old_server.tls = new.server.tls.clone();
    if differs(&old_server, &new.server)
        || expose(&old.server.admin_token) != expose(&new.server.admin_token)
    {
        out.push("server");
    }
    if differs(&old.upstream, &new.upstream) {
        out.push("upstream");
    }
    let (a, b) = (&old.credentials, &new.credentials);
    if a.system_user_token.expose() != b.system_user_token.expose()
        || expose(&a.app_secret) != expose(&b.app_secret)
        || a.page_tokens != b.page_tokens
    {
        out.push("credentials");
    }
    if differs(&old.cache, &new.cache) {
        out.push("cache");
    }
    if expose(&old.redis.url) != expose(&new.redis.url) || differs(&old.redis, &new.redis) {
        out.push("redis");
    }
    if differs(&old.quota, &new.quota) {
        out.push("quota");
    }
    if differs(&old.log, &new.log) {
        out.push("log");
    }
    let token = |w: &Option<crate::config::WebhooksConfig>| {
        w.as_ref().map(|w| w.verify_token.expose().to_string())
    };
    if differs(&old.webhooks, &new.webhooks) || token(&old.webhooks) != token(&new.webhooks) {
        out.push("webhooks");
    }
    out
}

/// Binds both listeners and starts serving. A `server.listen` port of 0 picks a free port;
/// without an explicit `public_url` the bound address is used.
pub async fn start(config: Config) -> io::Result<Running> {
    let listeners = bind_public(config.server.listen, config.server.workers.max(1))?;
    let admin_listener = bind(config.server.admin_listen, "server.admin_listen").await?;
    let addr = listeners[0].local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let tls = match &config.server.tls {
        Some(t) => Some(Arc::new(
            tls::Reloadable::load(t).map_err(io::Error::other)?,
        )),
        None => None,
    };
    let public_url = if config.server.listen.port() == 0 && config.server.public_url.ends_with(":0")
    {
        let scheme = if tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{addr}")
    } else {
        config.server.public_url.clone()
    };
    let server_cfg = config.server.clone();
    let metrics = Arc::new(Metrics::new());
    let gateway = Arc::new(
        Gateway::new(config, public_url, metrics).map_err(|e| io::Error::other(e.to_string()))?,
    );
    gateway.start_fleet().await;
    admin::fleet::spawn_publisher(&gateway);
    if let Some(t) = &tls {
        t.watch_files(gateway.metrics.clone());
    }
    let (stop, stop_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        builder: builder(&server_cfg),
        gateway: gateway.clone(),
        connections: Arc::new(Semaphore::new(server_cfg.max_connections)),
        admin_connections: Arc::new(Semaphore::new(server_cfg.admin_max_connections)),
        tls: tls.clone(),
        stop: stop_rx,
        cfg: server_cfg,
    });
    let workers = Workers::start(listeners, &shared)?;
    let task = tokio::spawn(serve(admin_listener, shared, workers));
    tracing::info!(%addr, %admin_addr, public_url = gateway.public_url(), "graphgate listening");
    Ok(Running {
        addr,
        admin_addr,
        gateway,
        tls,
        stop,
        task,
    })
}

/// The public listening sockets, one per worker, all on `addr` with `SO_REUSEPORT` (nginx's
/// `reuseport`): the kernel spreads new connections over them and each worker accepts its
/// own. The address is first bound once without `SO_REUSEPORT`, so a port that another
/// process (or another graphgate) holds is refused rather than shared. Port 0 picks a free
/// port for all of them.
fn bind_public(addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let named = |e| cannot_listen(addr, "server.listen", e);
    let socket = |reuse_port: bool| -> io::Result<tokio::net::TcpSocket> {
        let s = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        s.set_reuseaddr(true)?;
        s.set_reuseport(reuse_port)?;
        Ok(s)
    };
    let mut bound = addr;
    if addr.port() != 0 {
        // Dropped at once: it never listened, so the port is free again.
        socket(false)?.bind(addr).map_err(named)?;
    }
    let mut listeners = Vec::with_capacity(count);
    for _ in 0..count {
        let s = socket(true)?;
        s.bind(bound).map_err(named)?;
        let listener = s.listen(1024).map_err(named)?.into_std()?;
        bound = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Binds `addr` (the admin listener).
async fn bind(addr: SocketAddr, key: &str) -> io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| cannot_listen(addr, key, e))
}

/// A bind error that names the address and the key it came from (a port clash is the usual
/// start-up failure, and "address in use" alone does not say which).
fn cannot_listen(addr: SocketAddr, key: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("cannot listen on {addr} ({key}): {e}"))
}

fn builder(cfg: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    // hyper refuses heads beyond its buffer with a bare 431; heads between our limit and
    // that get a Graph-style 431 from the proxy.
    // Head deadlines are kept by [`Limits`] for the whole connection: hyper's own would arm
    // and disarm a timer for every request head.
    b.http1()
        .header_read_timeout(None)
        .max_buf_size((cfg.max_header_bytes * 2).max(16 * 1024));
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size((cfg.max_header_bytes * 2) as u32)
        .max_concurrent_streams(256);
    b
}

/// What every connection task of the public listener needs.
struct Shared {
    builder: auto::Builder<TokioExecutor>,
    gateway: Arc<Gateway>,
    cfg: ServerConfig,
    /// One permit per open public connection (`server.max_connections`).
    connections: Arc<Semaphore>,
    /// One permit per open admin connection (`server.admin_max_connections`).
    admin_connections: Arc<Semaphore>,
    tls: Option<Arc<tls::Reloadable>>,
    stop: watch::Receiver<bool>,
}

/// Threads that serve public connections, each running a one-thread tokio runtime (see
/// [`worker_runtime`]), like nginx's worker processes: a connection lives on one thread from
/// accept to close, so reading a request, answering it from the cache and writing the reply
/// never hands work to another thread (on the hit path one runtime shared by all cores, with
/// its wake-ups and task stealing, cost more CPU than the request itself). Tasks a request spawns (cache fills, HTTP/2
/// streams) run on its worker, and each worker has its own pool of upstream connections.
///
/// Each worker accepts on its own listening socket (see [`bind_public`]) and keeps what it
/// accepts, unless another worker holds fewer connections: then it hands the connection to
/// the least loaded one (see [`Dealer`]).
///
/// A worker stops accepting when the server stops (its listener closes); the threads end when
/// the [`Workers`] value is dropped (after the drain in [`serve`], or when the runtime that
/// owns `serve` goes away), and their runtimes drop what is still running.
struct Workers {
    /// Dropping it closes the channel every worker thread waits on.
    _exit: watch::Sender<()>,
    /// Closes when every worker has closed its listener.
    listening: tokio::sync::mpsc::Receiver<()>,
}

impl Workers {
    fn start(listeners: Vec<std::net::TcpListener>, shared: &Arc<Shared>) -> io::Result<Workers> {
        let (exit, exit_rx) = watch::channel(());
        let (listening_tx, listening) = tokio::sync::mpsc::channel(1);
        let mut runtimes = Vec::with_capacity(listeners.len());
        for i in 0..listeners.len() {
            runtimes.push(worker_runtime(i, shared.cfg.worker_slice)?);
        }
        let dealer = Arc::new(Dealer {
            handles: runtimes.iter().map(|r| r.handle().clone()).collect(),
            open: runtimes.iter().map(|_| AtomicUsize::new(0)).collect(),
        });
        for (i, (runtime, listener)) in runtimes.into_iter().zip(listeners).enumerate() {
            let listener = {
                let _on_worker = runtime.enter();
                TcpListener::from_std(listener)?
            };
            let (shared, dealer) = (shared.clone(), dealer.clone());
            let listening = listening_tx.clone();
            let mut exit_rx = exit_rx.clone();
            // This thread only waits: the runtime's own thread does the work.
            std::thread::Builder::new()
                .name(format!("graphgate-wait-{i}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        // Err only if the accept loop panicked: stop waiting all the same.
                        let _ = tokio::spawn(accept(i, listener, shared, dealer)).await;
                        drop(listening);
                        // Err: the sender is gone, i.e. the server has stopped.
                        while exit_rx.changed().await.is_ok() {}
                    });
                })?;
        }
        Ok(Workers {
            _exit: exit,
            listening,
        })
    }

    /// Returns once every worker has closed its listener (after the stop signal).
    async fn stopped_accepting(&mut self) {
        while self.listening.recv().await.is_some() {}
    }
}

/// Worker `i`'s runtime: tokio's multi-threaded scheduler with a single thread, so the
/// worker stays one thread (no work stealing, nothing handed between cores) yet has that
/// scheduler's LIFO slot: a task woken by the running task runs next. A miss is three tasks
/// in a chain (the client's connection, the fill it spawns, the upstream connection that
/// writes the call); with the current-thread scheduler's plain FIFO queue a burst of misses
/// ran each stage for every request before the next stage of any, so no call left for Graph
/// until the whole burst had been read. In `benches/quota_load.rs` the pooled burst's added
/// latency fell by about a third, for 2 % more CPU a hit and more kernel time a miss
/// (benches/README.md).
fn worker_runtime(i: usize, slice: Option<Duration>) -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(format!("graphgate-worker-{i}"))
        .on_thread_start(move || {
            crate::upstream::use_pool_slot(i + 1);
            if let Some(slice) = slice {
                if let Err(e) = slice::request_for_this_thread(slice) {
                    tracing::warn!(worker = i, error = %e, "server.worker_slice_us not applied");
                }
            }
        })
        .enable_all()
        .build()
}

/// Keeps the workers' connection counts within one of each other. The kernel spreads new
/// connections over the workers' sockets by a hash of their addresses, which leaves a few
/// long-lived connections unevenly spread (12 % fewer hits with 64); handing every
/// connection to a worker instead costs a wake-up and a second registration each. Here a
/// worker keeps a connection it accepted while no other worker holds fewer (with two
/// workers and connections arriving at random, three in four stay).
struct Dealer {
    handles: Vec<tokio::runtime::Handle>,
    /// Open connections per worker.
    open: Vec<AtomicUsize>,
}

impl Dealer {
    /// The worker for a connection that worker `here` accepted.
    fn pick(&self, here: usize) -> usize {
        let count = |i: usize| self.open[i].load(Ordering::Relaxed);
        let least = (0..self.open.len())
            .min_by_key(|&i| count(i))
            .unwrap_or(here);
        if count(least) < count(here) {
            least
        } else {
            here
        }
    }
}

/// Counts a connection against its worker for as long as it is open.
struct Dealt(Arc<Dealer>, usize);

impl Dealt {
    fn new(dealer: &Arc<Dealer>, worker: usize) -> Dealt {
        dealer.open[worker].fetch_add(1, Ordering::Relaxed);
        Dealt(dealer.clone(), worker)
    }
}

impl Drop for Dealt {
    fn drop(&mut self) {
        self.0.open[self.1].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Worker `here`'s accept loop, until the server stops. Returning drops (closes) the
/// listener.
async fn accept(here: usize, listener: TcpListener, shared: Arc<Shared>, dealer: Arc<Dealer>) {
    let mut stop = shared.stop.clone();
    if *stop.borrow_and_update() {
        return;
    }
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else {
                    // Out of fds or similar: back off briefly instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
                    // At the connection limit: close at once rather than let it wait unserved.
                    shared.gateway.metrics.server.refused(Listener::Public);
                    drop(stream);
                    continue;
                };
                let to = dealer.pick(here);
                let dealt = Dealt::new(&dealer, to);
                let shared = shared.clone();
                if to == here {
                    tokio::spawn(async move {
                        let _dealt = dealt;
                        serve_public(shared, stream, peer, permit).await;
                    });
                    continue;
                }
                // The socket moves to the other worker's event loop.
                let Ok(stream) = stream.into_std() else {
                    continue;
                };
                dealer.handles[to].spawn(async move {
                    let _dealt = dealt;
                    if let Ok(stream) = TcpStream::from_std(stream) {
                        serve_public(shared, stream, peer, permit).await;
                    }
                });
            }
            _ = stop.changed() => break,
        }
    }
}

async fn serve(admin_listener: TcpListener, shared: Arc<Shared>, mut workers: Workers) {
    let gateway = shared.gateway.clone();
    let cfg = shared.cfg.clone();
    let mut stop = shared.stop.clone();
    // Admin connections outlive the public stop: /readyz answers 503 through the drain.
    let (admin_stop, admin_stop_rx) = watch::channel(false);
    loop {
        tokio::select! {
            accepted = admin_listener.accept() => accept_admin(&shared, accepted, &admin_stop_rx).await,
            // The workers close their listeners on the same signal.
            _ = stop.changed() => break,
        }
    }
    workers.stopped_accepting().await;
    gateway.set_draining();
    // Every open public connection holds a permit: having them all back means all closed.
    let all = u32::try_from(cfg.max_connections).unwrap_or(u32::MAX);
    let drained = shared.connections.acquire_many(all);
    let deadline = tokio::time::sleep(cfg.shutdown_grace);
    tokio::pin!(drained, deadline);
    loop {
        tokio::select! {
            _ = &mut drained => {
                tracing::info!("all connections drained");
                break;
            }
            _ = &mut deadline => {
                tracing::warn!(grace_ms = cfg.shutdown_grace.as_millis() as u64, "shutdown deadline reached with requests still in flight");
                break;
            }
            // Load balancers probing /readyz during the drain get their 503.
            accepted = admin_listener.accept() => accept_admin(&shared, accepted, &admin_stop_rx).await,
        }
    }
    drop(admin_listener);
    let _ = admin_stop.send(true);
    let all = u32::try_from(cfg.admin_max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(
        Duration::from_millis(100),
        shared.admin_connections.acquire_many(all),
    )
    .await;
}

/// Serves one admin connection (on the accepting runtime: the admin listener sees little
/// traffic), within `server.admin_max_connections` and the same header-read and idle
/// timeouts as the public listener.
async fn accept_admin(
    shared: &Arc<Shared>,
    accepted: io::Result<(TcpStream, SocketAddr)>,
    stop: &watch::Receiver<bool>,
) {
    let Ok((stream, _)) = accepted else {
        tokio::time::sleep(Duration::from_millis(10)).await;
        return;
    };
    let metrics = &shared.gateway.metrics.server;
    let Ok(permit) = shared.admin_connections.clone().try_acquire_owned() else {
        metrics.refused(Listener::Admin);
        return;
    };
    let first_head_by = tokio::time::Instant::now() + shared.cfg.header_read_timeout;
    let shared = shared.clone();
    let stop = stop.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let activity = Activity::new(shared.gateway.clone());
        let service = {
            let activity = activity.clone();
            service_fn(move |req: Request<Incoming>| {
                let busy = activity.enter(req.version());
                async move {
                    Ok::<Response<Full<Bytes>>, Infallible>(admin::handle(&busy.0.ctx, req).await)
                }
            })
        };
        let conn = shared
            .builder
            .serve_connection(TokioIo::new(stream), service);
        let limits = Limits {
            listener: Listener::Admin,
            first_head_by,
            idle: shared.cfg.idle_timeout,
            head: shared.cfg.header_read_timeout,
            stop,
            metrics: &shared.gateway.metrics,
        };
        limits.watch(conn, &activity).await;
    });
}

/// Counts an open public connection for as long as it lives.
struct OpenConnection(Arc<Metrics>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.server.open_connections.dec();
    }
}

/// One public connection: TLS handshake (bounded by the header read timeout) if configured,
/// then HTTP. The first request head is due within the header read timeout of accepting.
async fn serve_public(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
) {
    let first_head_by = tokio::time::Instant::now() + shared.cfg.header_read_timeout;
    let _ = stream.set_nodelay(true);
    let stream = linger::Lingering::new(stream);
    let metrics = shared.gateway.metrics.clone();
    metrics.server.open_connections.inc();
    let _open = OpenConnection(metrics.clone());
    match &shared.tls {
        None => serve_http(&shared, TokioIo::new(stream), peer, None, first_head_by).await,
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
            let handshake =
                tokio::time::timeout(shared.cfg.header_read_timeout, acceptor.accept(stream));
            match handshake.await {
                Ok(Ok(stream)) => {
                    let cert = tls::peer_certificate(stream.get_ref().1);
                    serve_http(&shared, TokioIo::new(stream), peer, cert, first_head_by).await;
                }
                Ok(Err(e)) => {
                    metrics.tls.handshake_failures.inc();
                    tracing::debug!(error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    metrics.tls.handshake_failures.inc();
                    tracing::debug!("TLS handshake timed out");
                }
            }
        }
    }
}

/// When a connection last finished a request, how many it is handling now, and whether it
/// ever sent one; and what its requests need (`ctx`: the server state). Cloned per request,
/// but only ever touched by the connection's own thread (the server-wide `Arc<Shared>` is
/// cloned once per connection rather than per request: its count is a cache line every
/// worker writes).
struct Activity<T> {
    ctx: T,
    opened: Instant,
    busy: AtomicUsize,
    /// Milliseconds after `opened` that the last request finished.
    last_ms: AtomicU64,
    /// A request head has arrived.
    started: AtomicBool,
    /// The first request came over HTTP/2 (whose streams have no head deadline after it).
    http2: AtomicBool,
}

/// Marks a connection busy while a request is handled.
struct Busy<T>(Arc<Activity<T>>);

impl<T> Activity<T> {
    fn new(ctx: T) -> Arc<Self> {
        Arc::new(Activity {
            ctx,
            opened: Instant::now(),
            busy: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            started: AtomicBool::new(false),
            http2: AtomicBool::new(false),
        })
    }

    /// Marks a request of `version` in flight until the returned guard drops.
    fn enter(self: &Arc<Self>, version: http::Version) -> Busy<T> {
        self.busy.fetch_add(1, Ordering::SeqCst);
        if !self.started.load(Ordering::Relaxed) {
            self.http2
                .store(version == http::Version::HTTP_2, Ordering::SeqCst);
            self.started.store(true, Ordering::SeqCst);
        }
        Busy(self.clone())
    }

    /// How long the connection may go without a request in flight: `idle`, and for HTTP/1
    /// no longer than `head` either (the next head is due within the header read timeout
    /// of the last reply, as the first is of accepting).
    fn idle_limit(&self, idle: Duration, head: Duration) -> Duration {
        if !self.started() || self.http2.load(Ordering::SeqCst) {
            idle
        } else {
            idle.min(head)
        }
    }

    fn started(&self) -> bool {
        self.started.load(Ordering::SeqCst)
    }

    /// When the connection becomes idle-expired if nothing happens before.
    fn deadline(&self, idle: Duration) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        if self.busy.load(Ordering::SeqCst) > 0 {
            return now + idle;
        }
        let last = self.opened + Duration::from_millis(self.last_ms.load(Ordering::SeqCst));
        tokio::time::Instant::from_std(last + idle).max(now)
    }

    fn is_idle_for(&self, idle: Duration) -> bool {
        self.busy.load(Ordering::SeqCst) == 0
            && self
                .opened
                .elapsed()
                .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::SeqCst)))
                >= idle
    }
}

pin_project_lite::pin_project! {
    /// A request's reply, with its connection marked busy until the reply is done.
    struct WhileBusy<F, T> {
        #[pin]
        reply: F,
        _busy: Busy<T>,
    }
}

impl<F: Future, T> Future for WhileBusy<F, T> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().reply.poll(cx)
    }
}

impl<T> Drop for Busy<T> {
    fn drop(&mut self) {
        let ms = u64::try_from(self.0.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.last_ms.store(ms, Ordering::SeqCst);
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a connection on either listener is held to.
struct Limits<'a> {
    /// `public` or `admin`, for the metrics.
    listener: Listener,
    /// The first request head must have arrived by then. hyper's own header read timeout
    /// does not cover a connection that sends nothing: the auto builder first waits for
    /// bytes to tell HTTP/1 from HTTP/2, with no timer; nor HTTP/2 at all.
    first_head_by: tokio::time::Instant,
    idle: Duration,
    /// `server.header_read_timeout_ms`: on HTTP/1, the longest wait for each later head.
    head: Duration,
    stop: watch::Receiver<bool>,
    metrics: &'a Metrics,
}

impl Limits<'_> {
    /// Drives `conn` until the client closes it, no first request head arrives in time
    /// (closed at once: nothing was asked, nothing is lost), it idles out (for HTTP/1 also:
    /// its next head is not in by the header read timeout), or `stop` is set (both of which
    /// close it gracefully: in-flight requests finish).
    async fn watch<C: GracefulConnection, T>(mut self, conn: C, activity: &Activity<T>) {
        tokio::pin!(conn);
        let mut closing = *self.stop.borrow();
        if closing {
            conn.as_mut().graceful_shutdown();
        }
        let h = &self.metrics.server;
        loop {
            // Woken by the shorter of the two limits; the check uses the connection's own.
            let idle_at = activity.deadline(self.idle.min(self.head));
            let stop = &mut self.stop;
            let deadlines = OnWake::new(async {
                tokio::select! {
                    _ = stop.changed(), if !closing => Deadline::Stop,
                    _ = tokio::time::sleep_until(self.first_head_by), if !activity.started() => {
                        Deadline::FirstHead
                    }
                    _ = tokio::time::sleep_until(idle_at), if !closing => Deadline::Idle,
                    else => std::future::pending().await,
                }
            });
            // The connection first: most wake-ups are its reads and writes.
            let deadline = tokio::select! {
                biased;
                _ = conn.as_mut() => break,
                deadline = deadlines => deadline,
            };
            match deadline {
                Deadline::Stop => {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                Deadline::FirstHead => {
                    if !activity.started() {
                        h.head_timed_out(self.listener);
                        break;
                    }
                }
                Deadline::Idle => {
                    if activity.is_idle_for(activity.idle_limit(self.idle, self.head)) {
                        h.idle_closed(self.listener);
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    }
                }
            }
        }
    }
}

/// Which of a connection's deadlines came first ([`Limits::watch`]).
enum Deadline {
    Stop,
    FirstHead,
    Idle,
}

/// Serves HTTP on one public connection, within [`Limits`]: every request through the
/// public stack ([`stack::public`]).
async fn serve_http<I>(
    shared: &Arc<Shared>,
    io: TokioIo<I>,
    peer: SocketAddr,
    cert: Option<PeerCertificate>,
    first_head_by: tokio::time::Instant,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Activity::new(());
    let stack = stack::public::<Incoming>(&shared.gateway, Some(peer));
    // The connection's stack, taken for each call and put back once `call` returns: hyper
    // calls a connection's service from that connection's task, one request (or HTTP/2
    // stream) after another, so the stages' handles are not cloned per request.
    let idle = Cell::new(Some(stack.clone()));
    let service = {
        let activity = activity.clone();
        service_fn(move |mut req: Request<Incoming>| {
            if let Some(c) = &cert {
                req.extensions_mut().insert(c.clone());
            }
            let busy = activity.enter(req.version());
            let mut stack = idle.take().unwrap_or_else(|| stack.clone());
            let reply = stack::call_ready(&mut stack, req);
            idle.set(Some(stack));
            WhileBusy { reply, _busy: busy }
        })
    };
    let conn = shared.builder.serve_connection(io, service);
    let limits = Limits {
        listener: Listener::Public,
        first_head_by,
        idle: shared.cfg.idle_timeout,
        head: shared.cfg.header_read_timeout,
        stop: shared.stop.clone(),
        metrics: &shared.gateway.metrics,
    };
    limits.watch(conn, &activity).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dealer(open: &[usize]) -> Arc<Dealer> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        Arc::new(Dealer {
            handles: open.iter().map(|_| runtime.handle().clone()).collect(),
            open: open.iter().map(|&n| AtomicUsize::new(n)).collect(),
        })
    }

    #[test]
    fn a_connection_stays_unless_another_worker_holds_fewer() {
        assert_eq!(dealer(&[3, 3]).pick(0), 0);
        assert_eq!(dealer(&[3, 4]).pick(0), 0);
        assert_eq!(dealer(&[4, 3]).pick(0), 1);
        assert_eq!(dealer(&[5, 2, 4]).pick(2), 1);
    }

    /// Connections arriving at any worker, in any order, leave the counts within one of each
    /// other; and a closed connection gives its count back.
    #[test]
    fn counts_stay_within_one() {
        let d = dealer(&[0, 0, 0]);
        let mut held = Vec::new();
        for arrival in [0, 0, 0, 0, 1, 0, 2, 2, 2, 0, 0, 1, 0, 0] {
            held.push(Dealt::new(&d, d.pick(arrival)));
            let counts: Vec<usize> = d.open.iter().map(|c| c.load(Ordering::Relaxed)).collect();
            let (lo, hi) = (counts.iter().min(), counts.iter().max());
            assert!(hi.zip(lo).is_some_and(|(h, l)| h - l <= 1), "{counts:?}");
        }
        drop(held);
        assert!(d.open.iter().all(|c| c.load(Ordering::Relaxed) == 0));
    }
}
