//! The connection to Graph: a pooled hyper client over rustls (HTTP/1.1 and HTTP/2 by ALPN),
//! request building (large GET → POST with `method=GET`), and reading replies into a
//! [`Reply`] with only the headers worth passing on.
//!
//! Every call goes through [`Upstream::send_with_policy`], the one place that decides about
//! retries ([`retry`]) and the circuit breaker ([`breaker`]):
//! - the breaker fails calls fast (503) while Graph keeps failing, and probes after a
//!   cool-down;
//! - only idempotent reads are retried, only on transient failures (connect error, connection
//!   reset before a complete reply, Graph code 1/2 or `is_transient`, HTTP 502/503 without a
//!   Graph error), with full-jitter backoff, within the retry budget and within the one
//!   deadline of `upstream.timeout_ms` for all attempts together;
//! - a call Graph refused unprocessed over HTTP/2 (REFUSED_STREAM, or above a GOAWAY's last
//!   stream id) is sent again, writes included, outside the budget (see
//!   [`Upstream::attempt_until_processed`]);
//! - timeouts are not retried (the deadline is spent), nor throttles (the quota's business),
//!   nor replies that are too large or not JSON.
//!
//! A 2xx reply whose body is not JSON is unusable for every client and SDK: it becomes a 502
//! Graph-style error rather than passing through.
//!
//! Reply bodies are read within the memory budget of [`reply_budget`]: a reply that would
//! exceed `upstream.max_buffered_reply_bytes` is abandoned and answered 503.

mod breaker;
pub mod reply_budget;
mod retry;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::{RetryConfig, UpstreamConfig};
use crate::error::ProxyError;
use crate::graph::body::FilePart;
use crate::graph::headers;
use crate::graph::request::{GraphMethod, Params};
use crate::graph::usage::{ErrorClass, GraphErrorInfo, ReplyView};
use crate::metrics::{GraphAnswer, Metrics, RetrySkip, UpstreamOutcome};
use reply_budget::{ReplyBudget, Reservation, Source};

/// A buffered reply from Graph (or from the cache, which stores the same thing).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
    /// The body's share of the reply budget: whoever hands this body (or a body made from
    /// it) to a client keeps it until that is written (see [`reply_budget::held`]).
    pub hold: Option<Arc<Reservation>>,
}

impl Reply {
    /// The reply as the usage readers (the quota scheduler) see it.
    pub fn view(&self) -> ReplyView<'_> {
        ReplyView {
            status: self.status,
            headers: &self.headers,
            body: &self.body,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.view().header(name)
    }

    /// Graph's error object, if this is an error reply.
    pub fn graph_error(&self) -> Option<GraphErrorInfo> {
        self.view().graph_error()
    }

    /// Short bounded outcome label for metrics.
    pub fn outcome(&self) -> GraphAnswer {
        if self.status.is_success() || self.status == StatusCode::NOT_MODIFIED {
            return GraphAnswer::Ok;
        }
        match self.graph_error().map(|e| e.class()) {
            Some(ErrorClass::Throttle(_)) => GraphAnswer::Throttled,
            Some(ErrorClass::Auth) => GraphAnswer::AuthError,
            Some(ErrorClass::Transient) => GraphAnswer::TransientError,
            Some(ErrorClass::Other) => GraphAnswer::GraphError,
            None if self.status.is_server_error() => GraphAnswer::Http5xx,
            None => GraphAnswer::Http4xx,
        }
    }
}

/// What to send: parameters already carry the injected token and proof.
#[derive(Debug, Clone)]
pub struct UpstreamRequest {
    pub method: GraphMethod,
    pub path: String,
    pub params: Params,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Uploaded files: the call goes as a multipart POST, `params` in parts before them.
    pub files: Vec<FilePart>,
}

type Pool = HyperClient<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Connection pools kept apart per thread (slot 0 for threads that are not workers).
const POOL_SLOTS: usize = 65;

thread_local! {
    /// This thread's pool slot, set once by a worker thread (see [`use_pool_slot`]).
    static POOL_SLOT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The calling thread's worker slot: 1 and up on a worker thread, 0 elsewhere (what other
/// per-worker state, such as `crate::stack::recall`, indexes by). Below [`WORKER_SLOTS`].
pub(crate) fn worker_slot() -> usize {
    POOL_SLOT.with(std::cell::Cell::get)
}

/// How many worker slots there are.
pub(crate) const WORKER_SLOTS: usize = POOL_SLOTS;

/// Makes the calling thread take its upstream connections from pool `slot` (workers are
/// numbered from 1; slots wrap past [`POOL_SLOTS`]).
pub fn use_pool_slot(slot: usize) {
    POOL_SLOT.with(|s| s.set(slot % POOL_SLOTS));
}

/// One pool of connections to Graph per worker thread, as nginx's workers keep theirs: a
/// call goes out on a connection that its own worker's runtime drives, so neither the request
/// nor its reply is handed to another thread (a shared pool gave a worker the other's
/// connections about half the time, each hand-over a cross-thread wake-up both ways).
struct Pools {
    connector: HttpsConnector<HttpConnector>,
    pools: Box<[std::sync::OnceLock<Pool>]>,
}

impl Pools {
    fn new(connector: HttpsConnector<HttpConnector>) -> Pools {
        Pools {
            connector,
            pools: (0..POOL_SLOTS)
                .map(|_| std::sync::OnceLock::new())
                .collect(),
        }
    }

    /// The calling thread's pool.
    fn get(&self) -> &Pool {
        let slot = worker_slot().min(self.pools.len() - 1);
        self.pools[slot].get_or_init(|| {
            HyperClient::builder(TokioExecutor::new())
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(60))
                .pool_max_idle_per_host(256)
                .build(self.connector.clone())
        })
    }
}

pub struct Upstream {
    pools: Pools,
    base: String,
    timeout: Duration,
    max_get_url_bytes: usize,
    max_response_bytes: usize,
    reply_budget: ReplyBudget,
    metrics: Arc<Metrics>,
    retry: RetryConfig,
    budget: retry::RetryBudget,
    breaker: breaker::Breaker,
}

/// An HTTP request to Graph, kept so it can be sent again.
struct Prepared {
    method: Method,
    uri: http::Uri,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Prepared {
    fn to_request(&self) -> Request<Full<Bytes>> {
        let mut r = Request::new(Full::new(self.body.clone()));
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.headers_mut() = self.headers.clone();
        r
    }
}

/// How one attempt failed, for the retry and breaker decisions.
struct Failed {
    error: ProxyError,
    /// Why this failure may be retried (a metric label), if it may.
    retry: Option<&'static str>,
    /// Does it say Graph is unhealthy (counts toward opening the breaker)?
    unhealthy: bool,
}

/// Retry reason and health of a reply Graph sent.
fn judge_reply(reply: &Reply) -> (Option<&'static str>, bool) {
    match reply.graph_error().map(|e| e.class()) {
        Some(ErrorClass::Transient) => (Some("graph_transient"), true),
        Some(_) => (None, false),
        None => match reply.status.as_u16() {
            502 => (Some("http_502"), true),
            503 => (Some("http_503"), true),
            s if s >= 500 => (None, true),
            _ => (None, false),
        },
    }
}

/// Is a successful body something clients can use? Graph answers JSON (older endpoints say
/// `text/javascript`); other content types (images) are not checked.
fn body_is_usable(reply: &Reply) -> bool {
    if !reply.status.is_success() || reply.body.is_empty() {
        return true;
    }
    let json_like = reply
        .header("content-type")
        .is_none_or(|ct| ct.contains("json") || ct.contains("javascript"));
    !json_like || serde_json::from_slice::<serde::de::IgnoredAny>(&reply.body).is_ok()
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig, metrics: Arc<Metrics>) -> Result<Upstream, ProxyError> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let tls = crate::tls::upstream_client_config(cfg.ca_file.as_deref())
            .map_err(ProxyError::Internal)?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        Ok(Upstream {
            pools: Pools::new(https),
            base: cfg.url.clone(),
            timeout: cfg.timeout,
            max_get_url_bytes: cfg.max_get_url_bytes,
            max_response_bytes: cfg.max_response_bytes,
            reply_budget: ReplyBudget::new(cfg.max_buffered_reply_bytes, metrics.clone()),
            retry: cfg.retry.clone(),
            budget: retry::RetryBudget::new(cfg.retry.budget_percent, cfg.retry.budget_min_per_s),
            breaker: breaker::Breaker::new(
                cfg.retry.breaker_failures,
                cfg.retry.breaker_cooldown,
                metrics.clone(),
            ),
            metrics,
        })
    }

    /// Builds the HTTP request (see [`build_request`]), counting large-GET rewrites.
    fn build(&self, req: UpstreamRequest) -> Result<Prepared, ProxyError> {
        let (prepared, rewritten) = build_request(&self.base, self.max_get_url_bytes, req)?;
        if rewritten {
            self.metrics.upstream.large_get_rewrites.inc();
        }
        Ok(prepared)
    }

    /// The budget every reply body held in memory is counted against, upstream replies and
    /// cached bodies alike.
    pub fn reply_budget(&self) -> &ReplyBudget {
        &self.reply_budget
    }

    /// [`Upstream::send_with_policy`] for a call that must not be repeated.
    pub async fn send(&self, req: UpstreamRequest) -> Result<Reply, ProxyError> {
        self.send_with_policy(req, false).await
    }

    /// Sends a call through the circuit breaker, retrying transient failures when
    /// `idempotent` (an effective GET, never a write or a batch). All attempts together finish
    /// within `upstream.timeout_ms`. See the module docs for what is retried.
    pub async fn send_with_policy(
        &self,
        req: UpstreamRequest,
        idempotent: bool,
    ) -> Result<Reply, ProxyError> {
        let prepared = self.build(req)?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        self.budget.deposit();
        let h = &self.metrics.upstream;
        let mut attempt: u32 = 0;
        let mut permit = match self.breaker.admit() {
            Ok(p) => p,
            Err(wait) => {
                h.breaker_rejections.inc();
                return Err(ProxyError::UpstreamUnavailable {
                    retry_after_s: wait.as_secs_f64().ceil().max(1.0) as u64,
                });
            }
        };
        loop {
            let result = self.attempt_until_processed(&prepared, deadline).await;
            let (retry_reason, healthy) = match &result {
                Ok(reply) => {
                    let (reason, unhealthy) = judge_reply(reply);
                    (reason, !unhealthy)
                }
                Err(f) => (f.retry, !f.unhealthy),
            };
            permit.record(healthy);
            let give_up = |result: Result<Reply, Failed>| result.map_err(|f| f.error);
            let Some(reason) = retry_reason else {
                return give_up(result);
            };
            if !idempotent || attempt >= self.retry.retries {
                return give_up(result);
            }
            let wait = retry::backoff(self.retry.backoff, attempt);
            // Leave the next attempt a fair share of the deadline, not just the backoff.
            if tokio::time::Instant::now() + wait + self.timeout / 10 >= deadline {
                h.retry_skipped(RetrySkip::Deadline);
                return give_up(result);
            }
            if !self.budget.try_withdraw() {
                h.retry_skipped(RetrySkip::Budget);
                return give_up(result);
            }
            tokio::time::sleep(wait).await;
            permit = match self.breaker.admit() {
                Ok(p) => p,
                Err(_) => {
                    h.retry_skipped(RetrySkip::Breaker);
                    return give_up(result);
                }
            };
            h.retries.with_label_values(&[reason]).inc();
            attempt += 1;
            tracing::debug!(attempt, reason, "retrying an idempotent read");
        }
    }

    /// [`Upstream::attempt`], sent again while Graph says it did not process the call: an
    /// HTTP/2 stream refused (`REFUSED_STREAM`) or above the last stream id of a GOAWAY (a
    /// connection being rotated). RFC 9113 §8.7 guarantees such a call had no effect, so it is
    /// sent again even when it is a write, up to [`MAX_RESENDS`] times, outside the retry
    /// budget and without counting toward the breaker: it says nothing about Graph's health.
    async fn attempt_until_processed(
        &self,
        prepared: &Prepared,
        deadline: tokio::time::Instant,
    ) -> Result<Reply, Failed> {
        let mut resends = 0;
        loop {
            match self.attempt(prepared, deadline).await {
                Err(f) if f.retry == Some(REFUSED) => {
                    if resends >= MAX_RESENDS {
                        return Err(Failed { retry: None, ..f });
                    }
                    // The first resend goes at once (to a fresh connection); a Graph that
                    // keeps refusing gets the usual jittered backoff.
                    if resends > 0 {
                        let wait = retry::backoff(self.retry.backoff, resends - 1);
                        if tokio::time::Instant::now() + wait >= deadline {
                            return Err(Failed { retry: None, ..f });
                        }
                        tokio::time::sleep(wait).await;
                    }
                    resends += 1;
                    self.metrics
                        .upstream
                        .retries
                        .with_label_values(&[REFUSED])
                        .inc();
                    tracing::debug!(resends, "Graph did not process the call; sending it again");
                }
                other => return other,
            }
        }
    }

    /// One exchange, bounded by `deadline`, counted in the upstream metrics.
    async fn attempt(
        &self,
        prepared: &Prepared,
        deadline: tokio::time::Instant,
    ) -> Result<Reply, Failed> {
        let started = Instant::now();
        let result =
            match tokio::time::timeout_at(deadline, self.exchange(prepared.to_request())).await {
                Ok(r) => r,
                Err(_) => Err(Failed {
                    error: ProxyError::UpstreamTimeout(self.timeout.as_millis() as u64),
                    retry: None,
                    unhealthy: true,
                }),
            };
        let outcome = match &result {
            Ok(reply) => UpstreamOutcome::Answered(reply.outcome()),
            Err(f) => UpstreamOutcome::Failed(f.error.rejection()),
        };
        self.metrics.upstream.observe(outcome, started.elapsed());
        result
    }

    async fn exchange(&self, req: Request<Full<Bytes>>) -> Result<Reply, Failed> {
        let resp = self.pools.get().request(req).await.map_err(|e| {
            if never_processed(&e) {
                Failed {
                    error: ProxyError::UpstreamBadResponse(describe_error(&e)),
                    retry: Some(REFUSED),
                    unhealthy: false,
                }
            } else if e.is_connect() {
                Failed {
                    error: ProxyError::UpstreamConnect(describe_error(&e)),
                    retry: Some("connect"),
                    unhealthy: true,
                }
            } else {
                // Reset or closed before a complete head.
                Failed {
                    error: ProxyError::UpstreamBadResponse(describe_error(&e)),
                    retry: Some("reset"),
                    unhealthy: true,
                }
            }
        })?;
        let (parts, body) = resp.into_parts();
        let (body, hold) = self.read_body(body, &parts.headers).await?;
        let headers = parts
            .headers
            .iter()
            .filter(|(n, _)| headers::PASSED_RESPONSE.contains(&n.as_str()))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        let reply = Reply {
            status: parts.status,
            headers,
            body,
            hold: Some(Arc::new(hold)),
        };
        if !body_is_usable(&reply) {
            return Err(Failed {
                error: ProxyError::UpstreamBadResponse(format!(
                    "HTTP {} with a body that is not valid JSON",
                    reply.status.as_u16()
                )),
                retry: None,
                unhealthy: true,
            });
        }
        Ok(reply)
    }
}

/// Builds the HTTP request for Graph at `base`, rewriting a GET whose target would be longer
/// than `max_get_url_bytes` into POST + `method=GET` with the parameters in a form body (the
/// `bool`: it was). Uploads go as multipart with the parameters in parts before the files.
fn build_request(
    base: &str,
    max_get_url_bytes: usize,
    req: UpstreamRequest,
) -> Result<(Prepared, bool), ProxyError> {
    let query = req.params.encode();
    let target_len = req.path.len() + 1 + query.len();
    let uploads = !req.files.is_empty();
    let mut rewritten = false;
    let (method, uri, body, content_type) = match req.method {
        _ if uploads => {
            let (ct, body) = crate::graph::body::encode_multipart(&req.params, &req.files);
            let ct = HeaderValue::from_str(&ct)
                .map_err(|e| ProxyError::Internal(format!("multipart content type: {e}")))?;
            (
                Method::POST,
                join_target(base, &req.path, ""),
                body,
                Some(ct),
            )
        }
        GraphMethod::Get if target_len > max_get_url_bytes => {
            rewritten = true;
            let mut params = req.params;
            params.set("method", "GET");
            (
                Method::POST,
                join_target(base, &req.path, ""),
                Bytes::from(params.encode()),
                Some(HeaderValue::from_static(
                    "application/x-www-form-urlencoded",
                )),
            )
        }
        GraphMethod::Get => (
            Method::GET,
            join_target(base, &req.path, &query),
            Bytes::new(),
            None,
        ),
        GraphMethod::Delete => (
            Method::DELETE,
            join_target(base, &req.path, &query),
            Bytes::new(),
            None,
        ),
        GraphMethod::Post => (
            Method::POST,
            join_target(base, &req.path, ""),
            Bytes::from(query),
            Some(HeaderValue::from_static(
                "application/x-www-form-urlencoded",
            )),
        ),
    };
    let uri: http::Uri = uri
        .parse()
        .map_err(|e| ProxyError::Internal(format!("cannot build upstream request: {e}")))?;
    let mut headers = http::HeaderMap::new();
    for (n, v) in req.headers {
        headers.append(n, v);
    }
    if let Some(ct) = content_type {
        headers.insert(header::CONTENT_TYPE, ct);
    }
    Ok((
        Prepared {
            method,
            uri,
            headers,
            body,
        },
        rewritten,
    ))
}

/// The HTTP request graphgate sends Graph (at `base`) for `req`: what the request-path fuzz
/// target checks against what was authorized.
pub fn http_request(
    base: &str,
    max_get_url_bytes: usize,
    req: UpstreamRequest,
) -> Result<Request<Bytes>, ProxyError> {
    let (p, _) = build_request(base, max_get_url_bytes, req)?;
    let mut r = Request::new(p.body);
    *r.method_mut() = p.method;
    *r.uri_mut() = p.uri;
    *r.headers_mut() = p.headers;
    Ok(r)
}

impl Upstream {
    /// Reads a reply body within `upstream.max_response_bytes` and the reply budget: the
    /// declared length is reserved before reading, bytes beyond it as they arrive. Either
    /// limit exceeded ends the read at once (and with it the upstream exchange).
    async fn read_body(
        &self,
        mut body: hyper::body::Incoming,
        headers: &http::HeaderMap,
    ) -> Result<(Bytes, Reservation), Failed> {
        let too_large = || Failed {
            // Graph answered; the reply is just too big for us. Not a health signal.
            error: ProxyError::UpstreamTooLarge(self.max_response_bytes),
            retry: None,
            unhealthy: false,
        };
        let over_budget = || Failed {
            // Other replies hold the memory; Graph is fine. Not retried: the budget frees
            // up only as replies are written out.
            error: ProxyError::Overloaded { retry_after_s: 1 },
            retry: None,
            unhealthy: false,
        };
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let declared = match declared {
            Some(n) if n > self.max_response_bytes as u64 => return Err(too_large()),
            Some(n) => n as usize,
            None => 0,
        };
        let mut hold = self
            .reply_budget
            .reserve(declared, Source::Upstream)
            .ok_or_else(over_budget)?;
        let mut buf = bytes::BytesMut::with_capacity(declared);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| Failed {
                error: ProxyError::UpstreamBadResponse(format!(
                    "reply body failed: {}",
                    describe_error(&e)
                )),
                retry: Some("reset"),
                unhealthy: true,
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let total = buf.len() + data.len();
            if total > self.max_response_bytes {
                return Err(too_large());
            }
            if !hold.grow_to(total, Source::Upstream) {
                return Err(over_budget());
            }
            buf.extend_from_slice(&data);
        }
        Ok((buf.freeze(), hold))
    }
}

fn join_target(base: &str, path: &str, query: &str) -> String {
    if query.is_empty() {
        format!("{base}{path}")
    } else {
        format!("{base}{path}?{query}")
    }
}

/// Retry-reason label of a call Graph refused unprocessed (see
/// [`Upstream::attempt_until_processed`]).
const REFUSED: &str = "refused";
/// How often one call is sent again after refusals.
const MAX_RESENDS: u32 = 4;

/// Did Graph say, in an HTTP/2 frame, that it never processed this request? A stream reset
/// with `REFUSED_STREAM`, or a GOAWAY whose last stream id is below this stream (h2 reports a
/// GOAWAY error only to those streams, and to requests not yet sent). Streams the server had
/// accepted fail differently (a broken pipe when the connection closes), so they are never
/// taken for unprocessed.
fn never_processed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut src = Some(e);
    while let Some(err) = src {
        if let Some(frame_error) = err.downcast_ref::<h2::Error>() {
            return frame_error.is_remote()
                && (frame_error.is_go_away()
                    || frame_error.reason() == Some(h2::Reason::REFUSED_STREAM));
        }
        src = err.source();
    }
    false
}

/// The error chain as one line. hyper's errors carry no request data, so no token can leak.
fn describe_error(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut src = e.source();
    while let Some(s) = src {
        parts.push(s.to_string());
        src = s.source();
    }
    parts.join(": ")
}
