//! The simulated Graph API used by the demo, tests and benches.
//!
//! A real HTTP server (HTTP/1.1 and h2c on the same port, or TLS with HTTP/2 and HTTP/1.1 by
//! ALPN, as graph.facebook.com serves) that mimics graph.facebook.com as
//! described in `graph-api-facts.md`: tokens and `appsecret_proof`, field selection with nested
//! edges, cursor paging with absolute links that embed the caller's token, `ids=` lookups,
//! batches, writes, `method=GET` overrides, over-long GET failures, per-Page (BUC) and app
//! sliding-window rate limits with usage headers, ETags and Graph's `\/`-escaped JSON.
//! Everything is deterministic except timing, and faults can be injected at runtime.

mod encode;
mod engine;
mod fields;
mod state;
#[cfg(test)]
mod tests;
mod tls;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio_rustls::TlsAcceptor;

use engine::{etag, Call, Engine, GraphError, IdGen, Params, Verb};
use state::State;

pub use state::appsecret_proof;

/// Largest request body accepted (batches of 50 operations fit easily).
const MAX_BODY: usize = 16 * 1024 * 1024;
/// Graph's `x-fb-rev` header; constant so replies are reproducible.
const FB_REV: &str = "1019999999";
const JSON_CONTENT_TYPE: &str = "application/json; charset=UTF-8";
const CACHE_OK: &str = "private, no-cache, no-store, must-revalidate";

/// Configuration of a fake Graph server.
#[derive(Debug, Clone)]
pub struct FakeGraphConfig {
    /// Tokens accepted as the system user.
    pub system_user_tokens: Vec<String>,
    /// `Some` => `appsecret_proof` is required and verified for every token.
    pub app_secret: Option<String>,
    /// BUC limit: calls per Page per sliding window.
    pub page_calls_limit: u32,
    /// Length of the sliding window (used for the app-level window too).
    pub page_window: Duration,
    /// Platform app limit for non-Page calls per window.
    pub app_calls_limit: u32,
    /// Added before every reply; see [`FakeGraph::set_latency`].
    pub latency: Duration,
    /// GET request-targets longer than this get HTTP 500 / Graph code 1.
    pub max_get_url_bytes: usize,
    /// Base of absolute paging links.
    pub link_base: String,
    /// Version used for unversioned calls (header and links).
    pub default_version: String,
    /// Seeded Pages.
    pub pages: Vec<FakePage>,
    /// Serve TLS with this certificate chain and key (PEM), HTTP/2 or HTTP/1.1 by ALPN.
    pub tls: Option<FakeGraphTls>,
}

/// The certificate a TLS fake Graph presents.
#[derive(Clone)]
pub struct FakeGraphTls {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for FakeGraphTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FakeGraphTls { .. }")
    }
}

impl FakeGraphTls {
    fn acceptor(&self) -> std::io::Result<TlsAcceptor> {
        tls::server_config_from_pem(&self.cert_pem, &self.key_pem)
            .map(TlsAcceptor::from)
            .map_err(|e| std::io::Error::other(format!("fake graph TLS: {e}")))
    }
}

impl Default for FakeGraphConfig {
    fn default() -> Self {
        FakeGraphConfig {
            system_user_tokens: vec!["demo-system-user-token".to_string()],
            app_secret: Some("demo-app-secret".to_string()),
            page_calls_limit: 200,
            page_window: Duration::from_secs(60),
            app_calls_limit: 1000,
            latency: Duration::ZERO,
            max_get_url_bytes: 2000,
            link_base: "https://graph.facebook.com".to_string(),
            default_version: "v21.0".to_string(),
            tls: None,
            pages: vec![
                FakePage {
                    id: "1001".to_string(),
                    name: "Acme Coffee".to_string(),
                    about: "Small-batch roasts \u{2014} open 7/7".to_string(),
                    category: "Coffee Shop".to_string(),
                    fan_count: 12_345,
                    posts: 60,
                },
                FakePage {
                    id: "1002".to_string(),
                    name: "Globex News".to_string(),
                    about: "Headlines from Globex/Cypress Creek".to_string(),
                    category: "Media/News Company".to_string(),
                    fan_count: 67_890,
                    posts: 60,
                },
            ],
        }
    }
}

/// A seeded Page. Post `n` (1-based) has id `{id}_{n}` and was created `n - 1` hours after
/// 2026-01-01T00:00:00+0000.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakePage {
    pub id: String,
    pub name: String,
    pub about: String,
    pub category: String,
    pub fan_count: u64,
    /// How many posts to seed.
    pub posts: usize,
}

/// A post as currently stored (see [`FakeGraph::posts_of`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakePost {
    pub id: String,
    pub message: String,
    pub created_time: String,
}

/// A snapshot of the server's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeGraphStats {
    /// HTTP requests received.
    pub requests: u64,
    /// Graph calls charged to a quota (each `ids=` id and batch op is one call; calls failing
    /// authentication are not charged).
    pub calls: u64,
    pub calls_by_page: BTreeMap<String, u64>,
    /// Calls answered with a throttle code (for `ids=`, the ids whose quota was exceeded).
    pub throttled: u64,
    pub throttled_by_page: BTreeMap<String, u64>,
    /// Error replies: HTTP replies with status >= 400 plus failed batch operations.
    pub errors: u64,
    /// POSTs (including batch operations) carrying `method=GET`.
    pub post_method_get: u64,
    pub max_in_flight: u64,
    /// 304 replies.
    pub not_modified: u64,
    /// Connections accepted (TLS handshakes that failed included).
    pub connections: u64,
    /// Connections closed gracefully by [`Fault::GoAway`] (a GOAWAY frame on HTTP/2).
    pub goaways: u64,
    /// Requests refused unprocessed by [`Fault::RefuseStreams`].
    pub refused: u64,
}

/// One HTTP request as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub form: Vec<(String, String)>,
    /// Lower-case names; values decoded lossily.
    pub headers: Vec<(String, String)>,
    /// From the query, form body or `Authorization` header.
    pub access_token: Option<String>,
    pub appsecret_proof: Option<String>,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// Uploaded files of a multipart body.
    pub files: Vec<FakeFile>,
}

/// A file part of a multipart body, as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeFile {
    pub name: String,
    pub filename: String,
    pub data: Bytes,
}

/// One Graph call the simulated API executed: a request, an operation of a batch. What it
/// did, as Graph read it: the ground truth for "what reached Graph" in tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutedCall {
    /// `GET`, `POST` or `DELETE` after every override Graph applies.
    pub verb: &'static str,
    /// Path segments after the version (`["1001", "feed"]`).
    pub segments: Vec<String>,
    /// Ids of an `ids=` read, as Graph split them.
    pub ids: Vec<String>,
    /// The `fields` value Graph read, if any.
    pub fields: Option<String>,
    /// The token the call ran with.
    pub token: Option<String>,
    /// A root `id=` lookup.
    pub root_id: Option<String>,
    pub in_batch: bool,
    /// A batch request itself (its operations are executed calls of their own).
    pub is_batch: bool,
}

/// Global fault injection; applies to every request while set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Fault {
    #[default]
    None,
    /// A plain HTTP error with an HTML body, as a load balancer would send.
    Status(u16),
    /// A Graph error with this code and HTTP status (e.g. code 2 / 500).
    GraphError { code: i64, http_status: u16 },
    /// Never answer (until shutdown).
    Hang,
    /// HTTP 200 with truncated JSON.
    Garbage,
    /// Drop the connection without a reply.
    CloseConnection,
    /// Close every connection gracefully once it has received `after` requests: HTTP/2 gets a
    /// GOAWAY (requests the server had accepted are answered; streams above its last stream
    /// id are not processed), HTTP/1.1 a `Connection: close`. Models Graph's front ends
    /// rotating connections.
    GoAway { after: u32 },
    /// Refuse the next `n` requests unprocessed: HTTP/2 `RST_STREAM(REFUSED_STREAM)` (the
    /// connection stays up), on HTTP/1.1 the connection is dropped. Then back to `None`.
    RefuseStreams(u32),
    /// Answer with exactly this status, headers and body (hostile or broken replies).
    Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// HTTP 200 with a valid JSON object of exactly this many bytes (`{"id":…,"padding":…}`,
    /// at least 32), for tests of memory bounds. Highly compressible.
    LargeReply(usize),
}

/// Handle to a running fake Graph server. Cloning shares the server.
#[derive(Clone)]
pub struct FakeGraph {
    inner: Arc<Inner>,
    addr: SocketAddr,
}

impl std::fmt::Debug for FakeGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeGraph")
            .field("addr", &self.addr)
            .finish()
    }
}

impl FakeGraph {
    /// Binds `listen` (port 0 picks a free port), spawns the server and returns its handle.
    pub async fn start(cfg: FakeGraphConfig, listen: SocketAddr) -> std::io::Result<FakeGraph> {
        let listener = TcpListener::bind(listen).await?;
        let mut addr = listener.local_addr()?;
        if addr.ip().is_unspecified() {
            addr.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        let tls = cfg.tls.as_ref().map(FakeGraphTls::acceptor).transpose()?;
        let inner = Arc::new(Inner::new(cfg));
        tokio::spawn(accept_loop(inner.clone(), listener, tls));
        Ok(FakeGraph { inner, addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (`https://` with TLS), without a trailing slash.
    pub fn url(&self) -> String {
        let scheme = if self.inner.cfg.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    pub fn config(&self) -> &FakeGraphConfig {
        &self.inner.cfg
    }

    pub fn stats(&self) -> FakeGraphStats {
        self.inner.stats()
    }

    /// Zeroes the counters (rate-limit windows are Graph state and are kept; see
    /// [`FakeGraph::reset_limits`]).
    pub fn reset_stats(&self) {
        self.inner.requests.store(0, Ordering::Relaxed);
        self.inner.max_in_flight.store(
            self.inner.in_flight.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        for c in [
            &self.inner.connections,
            &self.inner.goaways,
            &self.inner.refused,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        self.inner.lock().counters = Default::default();
    }

    /// Forgets all rate-limit history, so every quota starts empty.
    pub fn reset_limits(&self) {
        self.inner.lock().reset_windows();
    }

    /// Models usage that graphgate's calls do not explain: `calls` calls of other apps stay
    /// in Page `page_id`'s window (counted in its usage headers and against its limit) until
    /// set again; 0 removes them.
    pub fn set_other_usage(&self, page_id: &str, calls: u64) {
        self.inner.lock().set_other_usage(page_id, calls);
    }

    /// Leaves the usage headers out of replies whose usage rounds to 0 %, as Meta does
    /// (default: always sent).
    pub fn set_omit_zero_usage(&self, omit: bool) {
        self.inner.lock().omit_zero_usage = omit;
    }

    /// Every request received, oldest first (bounded; see [`FakeGraph::set_record_limit`]).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.inner.lock().recorded.iter().cloned().collect()
    }

    /// Bounds the request log (default 10 000); 0 disables recording, e.g. for benchmarks.
    pub fn set_record_limit(&self, limit: usize) {
        let mut st = self.inner.lock();
        st.record_limit = limit;
        while st.recorded.len() > limit {
            st.recorded.pop_front();
        }
    }

    pub fn clear_requests(&self) {
        let mut st = self.inner.lock();
        st.recorded.clear();
        st.executed.clear();
    }

    /// Every call executed, oldest first (bounded like [`FakeGraph::requests`]).
    pub fn executed(&self) -> Vec<ExecutedCall> {
        self.inner.lock().executed.iter().cloned().collect()
    }

    pub fn set_latency(&self, d: Duration) {
        self.inner.set_latency(d);
    }

    pub fn set_fault(&self, f: Fault) {
        *self.inner.fault.lock().unwrap_or_else(|e| e.into_inner()) = f;
    }

    /// The Page token the fake currently hands out for `page_id` (via `fields=access_token` and
    /// `/me/accounts`); valid for that Page's calls.
    pub fn page_token(&self, page_id: &str) -> String {
        self.inner.lock().current_page_token(page_id)
    }

    /// `appsecret_proof` for `token` under the configured secret, if one is set.
    pub fn proof_for(&self, token: &str) -> Option<String> {
        self.inner
            .cfg
            .app_secret
            .as_deref()
            .map(|s| appsecret_proof(s, token))
    }

    /// Later calls with `token` get code 190, subcode 463 (expired).
    pub fn revoke_token(&self, token: &str) {
        self.inner.lock().revoke(token);
    }

    /// Undoes [`FakeGraph::revoke_token`]: `token` is accepted again (a renewed system user
    /// token, in tests of recovery).
    pub fn restore_token(&self, token: &str) {
        self.inner.lock().restore(token);
    }

    /// The posts currently stored for `page_id`, newest first.
    pub fn posts_of(&self, page_id: &str) -> Vec<FakePost> {
        let st = self.inner.lock();
        st.page(page_id)
            .map(|p| {
                p.posts
                    .iter()
                    .rev()
                    .map(|(n, post)| FakePost {
                        id: format!("{page_id}_{n}"),
                        message: post.message.clone(),
                        created_time: encode::graph_time(post.created),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Stops accepting and closes every connection, including hung requests. Idempotent.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }
}

/// Serves the fake on `listener` until `shutdown` resolves (used by `graphgate fake-graph`).
pub async fn serve(
    listener: TcpListener,
    cfg: FakeGraphConfig,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let tls = cfg.tls.as_ref().map(FakeGraphTls::acceptor).transpose()?;
    let inner = Arc::new(Inner::new(cfg));
    tokio::select! {
        () = accept_loop(inner.clone(), listener, tls) => {}
        () = shutdown => {}
    }
    inner.shutdown.send_replace(true);
    Ok(())
}

/// Shared server state behind the handle.
struct Inner {
    cfg: FakeGraphConfig,
    state: Mutex<State>,
    ids: IdGen,
    latency_nanos: AtomicU64,
    fault: Mutex<Fault>,
    requests: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    connections: AtomicU64,
    goaways: AtomicU64,
    refused: AtomicU64,
    shutdown: watch::Sender<bool>,
}

impl Inner {
    fn new(cfg: FakeGraphConfig) -> Inner {
        let inner = Inner {
            state: Mutex::new(State::new(&cfg)),
            ids: IdGen::default(),
            latency_nanos: AtomicU64::new(0),
            fault: Mutex::new(Fault::None),
            requests: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            goaways: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            shutdown: watch::Sender::new(false),
            cfg,
        };
        inner.set_latency(inner.cfg.latency);
        inner
    }

    /// The state lock. A panic while holding it cannot leave a half-applied call visible in a
    /// way that matters for a test double, so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_latency(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.latency_nanos.store(nanos, Ordering::Relaxed);
    }

    fn latency(&self) -> Duration {
        Duration::from_nanos(self.latency_nanos.load(Ordering::Relaxed))
    }

    fn stats(&self) -> FakeGraphStats {
        let requests = self.requests.load(Ordering::Relaxed);
        let max = self.max_in_flight.load(Ordering::Relaxed);
        FakeGraphStats {
            connections: self.connections.load(Ordering::Relaxed),
            goaways: self.goaways.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            ..self.lock().counters.snapshot(requests, max)
        }
    }

    /// The fault that applies to the next request, read once per request. A refusal of
    /// [`Fault::RefuseStreams`] is used up by taking it.
    fn next_fault(&self) -> Fault {
        let mut fault = self.fault.lock().unwrap_or_else(|e| e.into_inner());
        match *fault {
            Fault::RefuseStreams(0) => {
                *fault = Fault::None;
                Fault::None
            }
            Fault::RefuseStreams(n) => {
                *fault = if n == 1 {
                    Fault::None
                } else {
                    Fault::RefuseStreams(n - 1)
                };
                self.refused.fetch_add(1, Ordering::Relaxed);
                Fault::RefuseStreams(n)
            }
            ref other => other.clone(),
        }
    }

    async fn wait_shutdown(&self) {
        let mut rx = self.shutdown.subscribe();
        // Err means the sender is gone, i.e. the server is being torn down anyway.
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

/// Counts a request as in flight for as long as it lives.
struct InFlight<'a>(&'a Inner);

impl<'a> InFlight<'a> {
    fn enter(inner: &'a Inner) -> Self {
        let now = inner.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        inner.max_in_flight.fetch_max(now, Ordering::Relaxed);
        InFlight(inner)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn accept_loop(inner: Arc<Inner>, listener: TcpListener, tls: Option<TlsAcceptor>) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Usually EMFILE under load: back off briefly instead of spinning.
                    tracing::debug!(error = %e, "fake graph accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = inner.wait_shutdown() => return,
        };
        let _ = stream.set_nodelay(true);
        inner.connections.fetch_add(1, Ordering::Relaxed);
        let inner = inner.clone();
        match tls.clone() {
            None => {
                tokio::spawn(serve_connection(inner, stream));
            }
            Some(acceptor) => {
                tokio::spawn(async move {
                    match acceptor.accept(stream).await {
                        Ok(tls) => serve_connection(inner, tls).await,
                        Err(e) => tracing::debug!(error = %e, "fake graph TLS handshake failed"),
                    }
                });
            }
        }
    }
}

/// Per-connection state for [`Fault::GoAway`].
#[derive(Default)]
struct ConnState {
    requests: std::sync::atomic::AtomicU32,
    /// Signalled when the connection should close gracefully.
    go_away: Notify,
}

async fn serve_connection<I>(inner: Arc<Inner>, io: I)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn_state = Arc::new(ConnState::default());
    let svc_inner = inner.clone();
    let svc_conn = conn_state.clone();
    let svc = service_fn(move |req| handle(svc_inner.clone(), svc_conn.clone(), req));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let io = Lingering::new(io);
    let linger = io.linger.clone();
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            () = conn_state.go_away.notified(), if !closing => {
                closing = true;
                inner.goaways.fetch_add(1, Ordering::Relaxed);
                linger.store(true, Ordering::Relaxed);
                conn.as_mut().graceful_shutdown();
            }
            () = inner.wait_shutdown() => return,
        }
    }
}

/// How long a gracefully closed connection keeps draining what the client still sends.
const LINGER: Duration = Duration::from_secs(1);

/// A connection that, once closed gracefully, sends its FIN and then keeps reading (and
/// discarding) what the client still sends for up to [`LINGER`] before the socket is
/// closed, as nginx's `lingering_close` and Envoy's `delayed_close_timeout` do. Closing at
/// once would answer frames that crossed the final GOAWAY with a TCP reset, and the client
/// would see a broken pipe instead of the GOAWAY that says which streams were processed.
struct Lingering<I: AsyncRead + AsyncWrite + Unpin + Send + 'static> {
    io: Option<I>,
    /// Set when the connection starts closing gracefully; other closes stay abrupt.
    linger: Arc<AtomicBool>,
}

impl<I: AsyncRead + AsyncWrite + Unpin + Send + 'static> Lingering<I> {
    fn new(io: I) -> Self {
        Lingering {
            io: Some(io),
            linger: Arc::new(AtomicBool::new(false)),
        }
    }

    fn io(&mut self) -> Pin<&mut I> {
        Pin::new(self.io.as_mut().expect("taken only on drop"))
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin + Send + 'static> Drop for Lingering<I> {
    fn drop(&mut self) {
        let (Some(mut io), true) = (self.io.take(), self.linger.load(Ordering::Relaxed)) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = io.shutdown().await;
            let mut sink = [0u8; 4096];
            let _ = tokio::time::timeout(LINGER, async {
                while let Ok(n) = io.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
        });
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncRead for Lingering<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.io().poll_read(cx, buf)
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncWrite for Lingering<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.io().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.io().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(|io| io.is_write_vectored())
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.io().poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.io().poll_shutdown(cx)
    }
}

/// Returned by the service to make hyper end the exchange without answering: the connection
/// is dropped, or with `refuse` on HTTP/2 the stream is reset with `REFUSED_STREAM` (hyper
/// takes the reset reason from the error's source).
#[derive(Debug)]
struct DropConnection {
    refuse: Option<h2::Error>,
}

impl DropConnection {
    const CLOSE: DropConnection = DropConnection { refuse: None };

    fn refuse() -> DropConnection {
        DropConnection {
            refuse: Some(h2::Error::from(h2::Reason::REFUSED_STREAM)),
        }
    }
}

impl std::fmt::Display for DropConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.refuse {
            Some(_) => f.write_str("fake graph refused the stream"),
            None => f.write_str("fake graph dropped the connection"),
        }
    }
}

impl std::error::Error for DropConnection {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.refuse
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

type Reply = Response<Full<Bytes>>;

/// What to do with a request once it has been processed.
enum Action {
    Reply(Reply),
    Hang,
    Close,
}

async fn handle(
    inner: Arc<Inner>,
    conn: Arc<ConnState>,
    req: Request<Incoming>,
) -> Result<Reply, DropConnection> {
    let fault = inner.next_fault();
    if let Fault::RefuseStreams(_) = fault {
        return Err(DropConnection::refuse());
    }
    if let Fault::GoAway { after } = fault {
        let served = conn.requests.fetch_add(1, Ordering::Relaxed) + 1;
        if served == after.max(1) {
            conn.go_away.notify_one();
        }
    }
    inner.requests.fetch_add(1, Ordering::Relaxed);
    let _flight = InFlight::enter(&inner);
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => Some(parse_body(&parts.headers, collected.to_bytes()).await),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => None,
        // The client went away mid-body; nobody is left to answer.
        Err(_) => return Err(DropConnection::CLOSE),
    };
    let action = respond(&inner, &parts, body, fault);
    let latency = inner.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    match action {
        Action::Reply(reply) => Ok(reply),
        Action::Close => Err(DropConnection::CLOSE),
        Action::Hang => {
            inner.wait_shutdown().await;
            Err(DropConnection::CLOSE)
        }
    }
}

/// Processes one HTTP request synchronously (no awaits while the state lock is held).
fn respond(
    inner: &Inner,
    parts: &http::request::Parts,
    body: Option<(Params, Vec<FakeFile>)>,
    fault: Fault,
) -> Action {
    let mut query = Params::default();
    query.extend_urlencoded(parts.uri.query().unwrap_or("").as_bytes());
    let (form, files) = body.clone().unwrap_or_default();
    let mut params = query.clone();
    params.0.extend(form.0.iter().cloned());
    let token = params
        .get("access_token")
        .map(str::to_string)
        .or_else(|| header_token(&parts.headers));
    let proof = params.get("appsecret_proof").map(str::to_string);
    let (version, segments) = engine::split_path(parts.uri.path());
    let version_str = version
        .clone()
        .unwrap_or_else(|| inner.cfg.default_version.clone());

    let mut st = inner.lock();
    st.record(RecordedRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: query.0,
        form: form.0,
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        access_token: token.clone(),
        appsecret_proof: proof.clone(),
        version: format!("{:?}", parts.version),
        files: files.clone(),
    });

    match fault {
        Fault::None | Fault::GoAway { .. } | Fault::RefuseStreams(_) => {}
        Fault::Hang => return Action::Hang,
        Fault::CloseConnection => return Action::Close,
        Fault::Reply {
            status,
            headers,
            body,
        } => {
            let mut reply = Response::new(Full::new(Bytes::from(body)));
            *reply.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            for (name, value) in headers {
                if let (Ok(n), Ok(v)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(&value),
                ) {
                    reply.headers_mut().append(n, v);
                }
            }
            return Action::Reply(reply);
        }
        Fault::Garbage => {
            let mut reply = Response::new(Full::new(Bytes::from_static(b"{\"data\": [")));
            set_header(&mut reply, "content-type", JSON_CONTENT_TYPE);
            return Action::Reply(reply);
        }
        Fault::LargeReply(bytes) => {
            const FRAME: &str = r#"{"id":"1001","padding":""}"#;
            let mut body = String::with_capacity(bytes.max(FRAME.len()));
            body.push_str(&FRAME[..FRAME.len() - 2]);
            body.extend(std::iter::repeat_n('a', bytes.saturating_sub(FRAME.len())));
            body.push_str("\"}");
            let mut reply = Response::new(Full::new(Bytes::from(body)));
            set_header(&mut reply, "content-type", JSON_CONTENT_TYPE);
            return Action::Reply(reply);
        }
        Fault::Status(code) => {
            st.counters.errors += 1;
            return Action::Reply(html_error(code));
        }
        Fault::GraphError { code, http_status } => {
            st.counters.errors += 1;
            let e = match code {
                1 => GraphError::unknown(),
                2 => GraphError::service(),
                _ => GraphError::new(
                    400,
                    code,
                    "OAuthException",
                    format!("(#{code}) Simulated Graph error"),
                ),
            };
            let e = GraphError {
                status: http_status,
                ..e
            };
            let (trace, request_id) = inner.ids.next();
            return Action::Reply(error_reply(&e, &version_str, &trace, &request_id));
        }
    }

    let early_error = if body.is_none() {
        Some(GraphError::param("The request body is too large"))
    } else if parts.method == Method::GET
        && parts.uri.path_and_query().map_or(0, |pq| pq.as_str().len())
            > inner.cfg.max_get_url_bytes
    {
        // Graph's servers reject very long GETs; the documented fix is POST + method=GET.
        Some(GraphError::unknown())
    } else {
        None
    };
    let verb = http_verb(&parts.method, &params);
    if parts.method == Method::POST && verb == Some(Verb::Get) {
        st.counters.post_method_get += 1;
    }
    let early_error = early_error.or_else(|| {
        verb.is_none()
            .then(|| GraphError::param(format!("Unsupported HTTP method {}", parts.method)))
    });
    if let Some(e) = early_error {
        st.counters.errors += 1;
        let (trace, request_id) = inner.ids.next();
        return Action::Reply(error_reply(&e, &version_str, &trace, &request_id));
    }

    let call = Call {
        verb: verb.unwrap_or(Verb::Get),
        version,
        segments,
        params,
        token,
        proof,
        in_batch: false,
        files: files.iter().map(|f| f.name.clone()).collect(),
    };
    let outcome = Engine {
        cfg: &inner.cfg,
        st: &mut st,
        now: Instant::now(),
        ids: &inner.ids,
    }
    .execute(&call);

    let body = encode::graph_json(&outcome.body);
    let mut reply = match &outcome.error {
        Some(e) => {
            st.counters.errors += 1;
            let mut reply = error_reply(e, &version_str, &outcome.trace_id, &outcome.request_id);
            // The JS SDK's escape hatch: errors with HTTP 200 (the body still says error).
            if call.params.get("suppress_http_code") == Some("1") {
                *reply.status_mut() = StatusCode::OK;
            }
            reply
        }
        None => {
            let tag = etag(&body);
            let fresh = outcome.cacheable && if_none_match(&parts.headers, &tag);
            let mut reply = if fresh {
                st.counters.not_modified += 1;
                let mut r = Response::new(Full::new(Bytes::new()));
                *r.status_mut() = StatusCode::NOT_MODIFIED;
                r
            } else {
                Response::new(Full::new(Bytes::from(body)))
            };
            common_headers(
                &mut reply,
                &version_str,
                &outcome.trace_id,
                &outcome.request_id,
            );
            set_header(&mut reply, "cache-control", CACHE_OK);
            if outcome.cacheable {
                set_header(&mut reply, "etag", &tag);
            }
            reply
        }
    };
    for (name, value) in outcome.usage.headers() {
        set_header(&mut reply, name, &value);
    }
    Action::Reply(reply)
}

/// The verb Graph executes for an HTTP method: a POST's `method=GET|DELETE` overrides it.
fn http_verb(method: &Method, params: &Params) -> Option<Verb> {
    match *method {
        Method::GET | Method::HEAD => Some(Verb::Get),
        Method::POST => Some(engine::override_verb(params)),
        Method::DELETE => Some(Verb::Delete),
        _ => None,
    }
}

/// What Graph would execute for `req`, read the way this server reads requests but without
/// running anything: the call itself and, for a batch, each operation (dependencies taken to
/// succeed). For checks that need no server, such as the request-path fuzz target.
pub fn interpret(req: &Request<Bytes>) -> Vec<ExecutedCall> {
    let mut params = Params::default();
    params.extend_urlencoded(req.uri().query().unwrap_or("").as_bytes());
    let (form, files) =
        futures_util::FutureExt::now_or_never(parse_body(req.headers(), req.body().clone()))
            .unwrap_or_default();
    params.0.extend(form.0);
    let Some(verb) = http_verb(req.method(), &params) else {
        return Vec::new();
    };
    let (version, segments) = engine::split_path(req.uri().path());
    let call = Call {
        verb,
        version,
        segments,
        token: params
            .get("access_token")
            .map(str::to_string)
            .or_else(|| header_token(req.headers())),
        proof: params.get("appsecret_proof").map(str::to_string),
        params,
        in_batch: false,
        files: files.into_iter().map(|f| f.name).collect(),
    };
    let mut out = vec![engine::executed_call(&call)];
    if out[0].is_batch {
        if let Ok(Value::Array(ops)) =
            serde_json::from_str::<Value>(call.params.get("batch").unwrap_or(""))
        {
            out.extend(
                ops.iter()
                    .filter_map(|op| engine::decode_op(op, &call, None).ok().flatten())
                    .map(|c| engine::executed_call(&c)),
            );
        }
    }
    out
}

/// Parameters and files from the body, as Graph reads them: a JSON object, multipart parts
/// (those with a file name are uploads), anything else as url-encoded text whatever its
/// content type says (the most permissive reading, so tests see the worst case).
async fn parse_body(headers: &HeaderMap, body: Bytes) -> (Params, Vec<FakeFile>) {
    let mut out = Params::default();
    let mut files = Vec::new();
    if body.is_empty() {
        return (out, files);
    }
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let lower = content_type.to_ascii_lowercase();
    if lower.starts_with("application/json") {
        if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(&body) {
            for (k, v) in map {
                let v = match v {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                out.0.push((k, v));
            }
        }
    } else if lower.starts_with("multipart/") {
        let Ok(boundary) = multer::parse_boundary(&content_type) else {
            return (out, files);
        };
        let stream = futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(body) });
        let mut parts = multer::Multipart::new(stream, boundary);
        while let Ok(Some(field)) = parts.next_field().await {
            let name = field.name().unwrap_or_default().to_string();
            let filename = field.file_name().map(str::to_string);
            let Ok(data) = field.bytes().await else {
                break;
            };
            match filename {
                Some(filename) => files.push(FakeFile {
                    name,
                    filename,
                    data,
                }),
                None => out
                    .0
                    .push((name, String::from_utf8_lossy(&data).into_owned())),
            }
        }
    } else {
        out.extend_urlencoded(&body);
    }
    (out, files)
}

/// `Authorization: Bearer <t>` or `Authorization: OAuth <t>`.
fn header_token(headers: &HeaderMap) -> Option<String> {
    let value = headers
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("oauth"))
        .then(|| token.to_string())
        .filter(|t| !t.is_empty())
}

fn if_none_match(headers: &HeaderMap, tag: &str) -> bool {
    headers
        .get_all(http::header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == tag || t == "*")
}

fn set_header(reply: &mut Reply, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        reply.headers_mut().insert(HeaderName::from_static(name), v);
    }
}

fn common_headers(reply: &mut Reply, version: &str, trace: &str, request_id: &str) {
    set_header(reply, "content-type", JSON_CONTENT_TYPE);
    set_header(reply, "facebook-api-version", version);
    set_header(reply, "x-fb-trace-id", trace);
    set_header(reply, "x-fb-request-id", request_id);
    set_header(reply, "x-fb-rev", FB_REV);
}

fn error_reply(e: &GraphError, version: &str, trace: &str, request_id: &str) -> Reply {
    let body = encode::graph_json(&e.to_json(trace));
    let mut reply = Response::new(Full::new(Bytes::from(body)));
    *reply.status_mut() = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    common_headers(&mut reply, version, trace, request_id);
    set_header(&mut reply, "cache-control", "no-store");
    if let Some(auth) = e.www_authenticate() {
        set_header(&mut reply, "www-authenticate", &auth);
    }
    reply
}

fn html_error(code: u16) -> Reply {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
    let text =
        format!("<html><head><title>{status}</title></head><body><h1>{status}</h1></body></html>");
    let mut reply = Response::new(Full::new(Bytes::from(text)));
    *reply.status_mut() = status;
    set_header(&mut reply, "content-type", "text/html; charset=utf-8");
    reply
}
