//! Sockets: the public listener (HTTP/1.1 and h2c through hyper-util's auto builder) and the
//! admin listener, header-read timeout and head-size limits, and graceful shutdown that
//! stops accepting, fails /readyz, and drains in-flight requests up to a deadline.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin;
use crate::config::{Config, ServerConfig};
use crate::metrics::Metrics;
use crate::proxy::Gateway;

/// A running graphgate: both listeners bound, serving until [`Running::shutdown`].
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    /// `http://127.0.0.1:PORT` of the public listener.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
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
}

/// Binds both listeners and starts serving. A `server.listen` port of 0 picks a free port;
/// without an explicit `public_url` the bound address is used.
pub async fn start(config: Config) -> io::Result<Running> {
    let listener = TcpListener::bind(config.server.listen).await?;
    let admin_listener = TcpListener::bind(config.server.admin_listen).await?;
    let addr = listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let public_url = if config.server.listen.port() == 0 && config.server.public_url.ends_with(":0")
    {
        format!("http://{addr}")
    } else {
        config.server.public_url.clone()
    };
    let server_cfg = config.server.clone();
    let metrics = Arc::new(Metrics::new());
    let gateway = Arc::new(
        Gateway::new(config, public_url, metrics).map_err(|e| io::Error::other(e.to_string()))?,
    );
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(serve(
        listener,
        admin_listener,
        gateway.clone(),
        server_cfg,
        stop_rx,
    ));
    tracing::info!(%addr, %admin_addr, public_url = gateway.public_url(), "graphgate listening");
    Ok(Running {
        addr,
        admin_addr,
        gateway,
        stop,
        task,
    })
}

fn builder(cfg: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    // hyper refuses heads beyond its buffer with a bare 431; heads between our limit and
    // that get a Graph-style 431 from the proxy.
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .max_buf_size((cfg.max_header_bytes * 2).max(16 * 1024));
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size((cfg.max_header_bytes * 2) as u32)
        .max_concurrent_streams(256);
    b
}

async fn serve(
    listener: TcpListener,
    admin_listener: TcpListener,
    gateway: Arc<Gateway>,
    cfg: ServerConfig,
    mut stop: watch::Receiver<bool>,
) {
    let builder = builder(&cfg);
    let graceful = GracefulShutdown::new();
    let admin_graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of fds or similar: back off briefly instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let gw = gateway.clone();
                let service = service_fn(move |req: Request<Incoming>| {
                    let gw = gw.clone();
                    async move { Ok::<_, Infallible>(gw.handle(req).await) }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let conn = graceful.watch(conn);
                let metrics = gateway.metrics.clone();
                metrics.open_connections.inc();
                tokio::spawn(async move {
                    let _ = conn.await;
                    metrics.open_connections.dec();
                });
            }
            accepted = admin_listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let gw = gateway.clone();
                let service = service_fn(move |req: Request<Incoming>| {
                    let gw = gw.clone();
                    async move { Ok::<Response<Full<Bytes>>, Infallible>(admin::handle(&gw, req).await) }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let conn = admin_graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    gateway.set_draining();
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections drained"),
        _ = tokio::time::sleep(cfg.shutdown_grace) => {
            tracing::warn!(grace_ms = cfg.shutdown_grace.as_millis() as u64, "shutdown deadline reached with requests still in flight");
        }
    }
    drop(admin_listener);
    let _ = tokio::time::timeout(
        std::time::Duration::from_millis(100),
        admin_graceful.shutdown(),
    )
    .await;
}
