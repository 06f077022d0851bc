//! The gateway: the innermost service of the public stack (`crate::stack`), in stages that
//! hand each other a fuller exchange ([`Gateway::handle_in`]):
//! parse (draining, limits, body, [`Call`]) → authenticate and authorize → cache
//! read-through (lookup, coalesced fill; see [`cached`]) → upstream (choose token, quota,
//! send, learn, invalidate after writes, prepare body: paging links, scrubbing) → respond,
//! then the request metric and the access log line.
//! Every failure is a [`ProxyError`] answered in Graph's error shape.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full, Limited};

mod cached;
mod fleet;
mod members;
mod webhook;

use crate::auth::{self, Client, ClientRegistry};
use crate::cache::Cache;
use crate::config::Config;
use crate::error::ProxyError;
use crate::graph::fields::Fields;
use crate::graph::request::{parse_ids, BatchOp, GraphMethod, Params};
use crate::graph::usage::ErrorClass;
use crate::metrics::{cache_label, CacheResult, Metrics, RequestMethod, Route};
use crate::quota::{self, Scheduler};
use crate::redis_conn::RedisConn;
use crate::rewrite;
use crate::tokens::{Injected, Tokens};
use crate::tracecontext::RequestContext;
use crate::upstream::{Reply, Upstream, UpstreamRequest};
use crate::webhooks::Webhooks;
use cached::ReadStart;

pub use crate::graph::call::{parse_call, Call, CallStats};

/// Requests being handled now (`server.max_in_flight` is measured against it). One shared
/// counter, two atomic operations per request: a semaphore permit plus a separate gauge were
/// six, on cache lines both workers write.
#[derive(Debug, Default)]
pub struct InFlight(AtomicUsize);

impl InFlight {
    /// Counts a request in if fewer than `max` are being handled; `None` means shed it. The
    /// guard counts it out however the request ends, also when the client goes away
    /// mid-request.
    pub fn admit<T: AsRef<InFlight>>(owner: T, max: usize) -> Option<Counted<T>> {
        let before = owner.as_ref().0.fetch_add(1, Ordering::AcqRel);
        let counted = Counted(owner);
        (before < max).then_some(counted)
    }

    pub fn current(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

impl AsRef<InFlight> for InFlight {
    fn as_ref(&self) -> &InFlight {
        self
    }
}

/// One request counted in by [`InFlight::admit`]; counts it out when dropped. Generic over
/// what owns the counter, so a future can hold it without a reference into the gateway.
pub struct Counted<T: AsRef<InFlight>>(T);

impl<T: AsRef<InFlight>> Drop for Counted<T> {
    fn drop(&mut self) {
        self.0.as_ref().0.fetch_sub(1, Ordering::AcqRel);
    }
}

const X_FB_TRACE_ID: HeaderName = HeaderName::from_static("x-fb-trace-id");
pub const X_GRAPHGATE_TRACE_ID: HeaderName = HeaderName::from_static("x-graphgate-trace-id");
/// Longest User-Agent written to the request log line.
const MAX_LOGGED_USER_AGENT: usize = 256;

/// Shared state of one running gateway: configuration and the handles every request uses.
pub struct Gateway {
    pub config: Arc<Config>,
    /// Base URL clients reach graphgate at; paging links point here.
    public_url: String,
    pub clients: ClientRegistry,
    pub tokens: Tokens,
    pub upstream: Upstream,
    /// Per-Page quota: every call that goes upstream is admitted here first.
    pub quota: Scheduler,
    pub metrics: Arc<Metrics>,
    pub cache: Cache,
    /// The Meta Webhooks endpoint, when configured.
    webhooks: Option<Webhooks>,
    draining: AtomicBool,
    /// Requests being handled (see the public stack's load shedding).
    in_flight: Arc<InFlight>,
}

/// A refused request: the error, the route label, and the client once it is known.
type Failure = (ProxyError, Route, Option<Arc<Client>>);

/// How far a request got without waiting: answered (or refused), or the rest to await.
/// Not boxed when answered: that is the hit path, and a box would allocate on every hit.
#[allow(clippy::large_enum_variant)]
enum Step {
    Now(Result<Outcome, Failure>),
    Later(Pin<Box<dyn Future<Output = Result<Outcome, Failure>> + Send>>),
}

/// A request after the parse stage: its head (the cache stage reads its conditional and
/// cache-control headers) and the parsed call.
struct Parsed {
    parts: http::request::Parts,
    call: Call,
    route: Route,
}

/// A request after authentication and authorization: who sent it, with which key.
struct Admitted {
    parts: http::request::Parts,
    call: Call,
    route: Route,
    client: Arc<Client>,
    /// The client key presented; paging links in the reply carry it.
    key: String,
}

impl Admitted {
    fn reject(&self, e: ProxyError) -> Failure {
        (e, self.route, Some(self.client.clone()))
    }

    fn outcome(
        self,
        response: Response<Full<Bytes>>,
        cache: CacheResult,
        upstream_ms: Option<u128>,
    ) -> Outcome {
        Outcome {
            response,
            route: self.route,
            cache: Some(cache),
            client: Some(self.client),
            upstream_ms,
            page: log_page(&self.call),
            node: log_node(&self.call),
            queue_wait: self.call.stats.queue_wait(),
        }
    }
}

/// What the handler produced, with the labels the request log and metrics need.
struct Outcome {
    response: Response<Full<Bytes>>,
    route: Route,
    /// `None` when the cache never saw the request (an error).
    cache: Option<CacheResult>,
    client: Option<Arc<Client>>,
    upstream_ms: Option<u128>,
    /// The Page charged upstream, else the Page the call names (logs only).
    page: Option<String>,
    /// The node of the call's path (logs only).
    node: Option<String>,
    /// Time waited for quota budget (logs only).
    queue_wait: Option<Duration>,
}

impl Gateway {
    pub fn new(
        config: Config,
        public_url: String,
        metrics: Arc<Metrics>,
    ) -> Result<Gateway, ProxyError> {
        let upstream = Upstream::new(&config.upstream, metrics.clone())?;
        // Scale-out: with `[redis] url`, cache, budgets and invalidations are shared.
        let redis = if config.redis.is_configured() {
            Some(RedisConn::new(&config.redis, metrics.clone()).map_err(ProxyError::Internal)?)
        } else {
            None
        };
        let mut cache = Cache::new(&config.cache, metrics.clone());
        if let Some(conn) = &redis {
            cache = cache.with_redis(conn.clone());
        }
        let webhooks = config.webhooks.as_ref().map(|w| {
            metrics.server.webhooks_served();
            Webhooks::new(w, config.credentials.app_secret.clone().unwrap_or_default())
        });
        Ok(Gateway {
            clients: ClientRegistry::new(&config.clients),
            webhooks,
            tokens: Tokens::new(&config.credentials, metrics.clone()),
            upstream,
            quota: Scheduler::with_redis(&config.quota, metrics.clone(), redis, &config.redis),
            public_url,
            cache,
            metrics,
            draining: AtomicBool::new(false),
            in_flight: Arc::default(),
            config: Arc::new(config),
        })
    }

    pub fn public_url(&self) -> &str {
        &self.public_url
    }

    /// Marks the gateway as shutting down: /readyz fails so load balancers stop sending.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// The counter `server.max_in_flight` is measured against (the public stack's load
    /// shedding counts requests in and out of it).
    pub fn in_flight_counter(&self) -> &Arc<InFlight> {
        &self.in_flight
    }

    /// Requests being handled now (the `graphgate_requests_in_flight` gauge, set when
    /// /metrics is read).
    pub fn in_flight(&self) -> usize {
        self.in_flight.current()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Answers one request that came without a socket (benches, in-process use): a new
    /// trace, no client address.
    pub async fn handle<B>(self: &Arc<Self>, req: Request<B>) -> Response<Full<Bytes>>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let context = RequestContext::from_headers(req.headers(), None);
        self.handle_in(req, context).await
    }

    /// Answers one client request within its trace: the innermost service of the public
    /// stack. Never fails: errors become Graph-style replies. Records the request metric and
    /// writes the access log line.
    ///
    /// A request without a body goes through the stages as far as they need no waiting
    /// before this returns (a cache hit is answered here); only what waits (reading a body,
    /// a miss, an upstream call) is a boxed future. The future returned stays small: every
    /// layer of the stack moves it.
    pub fn handle_in<B>(
        self: &Arc<Self>,
        req: Request<B>,
        context: RequestContext,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send + '_
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let started = Instant::now();
        let method = RequestMethod::of(req.method());
        let record = RequestRecord::capture(&req);
        let step = if self.is_webhook(req.uri().path()) {
            let gw = self.clone();
            Step::Later(Box::pin(async move { gw.webhook(req).await }))
        } else {
            self.process_now(req, &context)
        };
        async move {
            let result = match step {
                Step::Now(result) => result,
                Step::Later(rest) => rest.await,
            };
            self.respond(result, &context, method, record, started)
        }
    }

    /// The reply to a request whatever came of it, after the request metric and the access
    /// log line.
    fn respond(
        &self,
        result: Result<Outcome, Failure>,
        context: &RequestContext,
        method_label: RequestMethod,
        record: Option<RequestRecord>,
        started: Instant,
    ) -> Response<Full<Bytes>> {
        let outcome = match result {
            Ok(o) => o,
            Err((e, route, client)) => {
                self.metrics.server.reject(e.rejection());
                Outcome {
                    response: e.into_response(context.trace.trace_id()),
                    route,
                    cache: None,
                    client,
                    upstream_ms: None,
                    page: None,
                    node: None,
                    queue_wait: None,
                }
            }
        };
        let status = outcome.response.status();
        let took = started.elapsed();
        self.metrics.server.observe_request(
            outcome.route,
            method_label,
            status.as_u16(),
            outcome.cache,
            took,
        );
        // Only bounded labels, ids, numbers and checked client values: no key, token or query
        // string is a field, so nothing secret can reach the log (redacted by construction).
        // The macro evaluates the fields only when the line is on.
        tracing::info!(
            trace_id = context.trace.trace_id(),
            request_id = context.request_id(),
            method = method_label.as_str(),
            path = record.as_ref().map_or("-", |r| r.path.as_str()),
            route = outcome.route.as_str(),
            node = outcome.node.as_deref().unwrap_or("-"),
            status = status.as_u16(),
            cache = cache_label(outcome.cache),
            page = outcome.page.as_deref().unwrap_or("-"),
            client = outcome.client.as_ref().map(|c| c.name.as_str()).unwrap_or("-"),
            bytes = hyper::body::Body::size_hint(outcome.response.body()).exact().unwrap_or(0),
            client_addr = %context
                .client_addr
                .map_or_else(|| "-".to_string(), |a| a.to_string()),
            user_agent = record.as_ref().map_or("-", |r| r.user_agent.as_str()),
            upstream_ms = outcome.upstream_ms.map(|m| m as i64).unwrap_or(-1),
            queue_ms = outcome
                .queue_wait
                .map(|d| d.as_secs_f64() * 1000.0)
                .unwrap_or(-1.0),
            total_us = took.as_micros() as u64,
            fbtrace_id = outcome
                .response
                .headers()
                .get(X_FB_TRACE_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or(""),
            "request"
        );
        let mut response = outcome.response;
        response
            .headers_mut()
            .insert(X_GRAPHGATE_TRACE_ID, context.trace.trace_id_header());
        response
    }

    /// The stages, as far as they go without waiting: a request without a body is parsed,
    /// admitted and looked up in the cache here. What has to wait is boxed with the request
    /// moved in.
    fn process_now<B>(self: &Arc<Self>, req: Request<B>, context: &RequestContext) -> Step
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if !hyper::body::Body::is_end_stream(req.body()) {
            return Step::Later(Box::pin(self.clone().process(req, context.clone())));
        }
        let admitted = self
            .check_head(&req)
            .and_then(|()| self.parse_parts(req.into_parts().0, Bytes::new(), context))
            .and_then(|parsed| self.admit_client(parsed));
        let a = match admitted {
            Ok(a) => a,
            Err(failure) => return Step::Now(Err(failure)),
        };
        let version = self.version_of(&a.call);
        match self.start_read(&a.call, version, &a.parts.headers, &a.key) {
            Err(e) => Step::Now(Err(a.reject(e))),
            Ok(ReadStart::Served(s)) => {
                Step::Now(Ok(a.outcome(s.response, s.cache, s.upstream_ms)))
            }
            Ok(start) => Step::Later(Box::pin(self.clone().after_lookup(a, start))),
        }
    }

    /// The gateway's stages for a request with a body, in order; each hands the next a
    /// fuller exchange or refuses the request: limits and body → parse → authenticate and
    /// authorize → cache read-through → upstream.
    async fn process<B>(
        self: Arc<Self>,
        req: Request<B>,
        context: RequestContext,
    ) -> Result<Outcome, Failure>
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.check_head(&req)?;
        let (parts, body) = req.into_parts();
        let body = self
            .read_body_within(body, &parts.headers, self.config.server.body_read_timeout)
            .await
            .map_err(|e| (e, Route::Invalid, None))?;
        let parsed = self.parse_parts(parts, body, &context)?;
        let a = self.admit_client(parsed)?;
        let version = self.version_of(&a.call);
        let start = self
            .start_read(&a.call, version, &a.parts.headers, &a.key)
            .map_err(|e| a.reject(e))?;
        if let ReadStart::Served(s) = start {
            return Ok(a.outcome(s.response, s.cache, s.upstream_ms));
        }
        self.after_lookup(a, start).await
    }

    /// Stages after the in-process lookup: the rest of a cacheable read (ends here), else
    /// upstream uncached.
    async fn after_lookup(
        self: Arc<Self>,
        a: Admitted,
        start: ReadStart,
    ) -> Result<Outcome, Failure> {
        if let ReadStart::Pending(pending) = start {
            let version = self.version_of(&a.call);
            let served = self
                .finish_read(&a.call, version, &a.parts.headers, &a.key, pending)
                .await
                .map_err(|e| a.reject(e))?;
            return Ok(a.outcome(served.response, served.cache, served.upstream_ms));
        }
        self.upstream(a).await
    }

    /// Stage: limits on the request head (and refusing new work while draining).
    fn check_head<B>(&self, req: &Request<B>) -> Result<(), Failure> {
        let fail = |e: ProxyError| (e, Route::Invalid, None);
        if self.is_draining() {
            return Err(fail(ProxyError::ShuttingDown));
        }
        check_header_size(req, self.config.server.max_header_bytes).map_err(fail)
    }

    /// Stage: parsing the head and body into a [`Call`] that carries the request's trace for
    /// the upstream request.
    fn parse_parts(
        &self,
        parts: http::request::Parts,
        body: Bytes,
        context: &RequestContext,
    ) -> Result<Parsed, Failure> {
        let mut call = parse_call(&parts.method, &parts.uri, &parts.headers, body)
            .map_err(|e| (e, Route::Invalid, None))?;
        call.trace = Some(context.clone());
        Ok(Parsed {
            route: call.route(),
            parts,
            call,
        })
    }

    /// Stage: authenticate the client and authorize everything the call asks for.
    fn admit_client(&self, parsed: Parsed) -> Result<Admitted, Failure> {
        let Parsed {
            parts,
            mut call,
            route,
        } = parsed;
        let (client, key) = self
            .clients
            .authenticate(&parts.headers, &parts.extensions, call.presented_tokens())
            .map_err(|e| (e, route, None))?;
        if let Err(e) = authorize(&self.clients, &client, &key, &call) {
            return Err((e, route, Some(client)));
        }
        call.quota_hints
            .bind_to(client.priority, |page| client.may_touch(page));
        Ok(Admitted {
            parts,
            call,
            route,
            client,
            key,
        })
    }

    /// Stage: choose the token and send upstream (within the quota), make cached reads of a
    /// written node stale, prepare the body for this client and answer.
    async fn upstream(self: &Arc<Self>, a: Admitted) -> Result<Outcome, Failure> {
        let call = &a.call;
        let upstream_started = Instant::now();
        let reply = Box::pin(self.forward(call, self.version_of(call), true))
            .await
            .map_err(|e| a.reject(e))?;
        let upstream_ms = upstream_started.elapsed().as_millis();
        if reply.status.is_success() {
            Box::pin(self.invalidate_after_write(call)).await;
        }
        let prepared = rewrite::prepare(
            reply.body.clone(),
            call.batch.is_some(),
            &self.public_url,
            &self.tokens.secrets(),
        )
        .map_err(|e| a.reject(e))?;
        // The reply's share of the budget stays with the body until it is written.
        let body = crate::upstream::reply_budget::held(
            rewrite::finalize(&prepared, a.key.as_str()),
            reply.hold.iter().cloned().collect(),
        );
        let mut response = build_response(&reply, body);
        let cache = cached::mark_uncached(&mut response, call);
        Ok(a.outcome(response, cache, Some(upstream_ms)))
    }

    /// The Graph version a call goes to: its path's, else `upstream.default_version`.
    fn version_of<'a>(&'a self, call: &'a Call) -> &'a str {
        call.path
            .version
            .as_deref()
            .unwrap_or(&self.config.upstream.default_version)
    }

    /// Reads a request body, bounded in size (`server.max_body_bytes`, 413) and time
    /// (`server.body_read_timeout_ms`, 408).
    async fn read_body_within<B>(
        &self,
        body: B,
        headers: &HeaderMap,
        within: Duration,
    ) -> Result<Bytes, ProxyError>
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        tokio::time::timeout(
            within,
            read_body(body, headers, self.config.server.max_body_bytes),
        )
        .await
        .map_err(|_| {
            ProxyError::BodyTimeout(u64::try_from(within.as_millis()).unwrap_or(u64::MAX))
        })?
    }

    /// Sends the call upstream with the injected token, within the quota.
    ///
    /// Every attempt is admitted by the quota scheduler first and its reply taught back to it.
    /// A GET that Graph throttles is re-queued (its Page is now paused) while its deadline
    /// allows; writes are never re-sent. A Page token Graph rejects (190) is minted again and
    /// the call retried once: a rejected call was not executed.
    ///
    /// `requeue_throttled` is false when the caller has a stale copy to serve instead: a
    /// throttled Page then answers at once rather than after waiting out the pause.
    async fn forward(
        &self,
        call: &Call,
        version: &str,
        requeue_throttled: bool,
    ) -> Result<Reply, ProxyError> {
        let charge = self
            .quota
            .charge_for(&quota::call_units(call), call.quota_hints.page.as_deref());
        if let Some(quota::BucketKey::Page(p)) = charge.single() {
            call.stats.set_charged_page(p);
        }
        let deadline = self.quota.deadline(call.quota_hints.max_wait);
        let may_requeue = call.method == GraphMethod::Get && call.batch.is_none();
        let mut token_retried = false;
        let mut requeues = 0;
        loop {
            let injected = self
                .tokens
                .for_page(call.page(), version, &self.upstream)
                .await?;
            let request = upstream_request(call, &injected, self.tokens.system())?;
            let admission = self
                .quota
                .admit(&charge, call.quota_hints.priority, deadline)
                .await?;
            call.stats.add_queue_wait(admission.waited);
            let reply = self.upstream.send_with_policy(request, may_requeue).await?;
            let learned = self.quota.learn(&admission, reply.view(), call.path.node());
            drop(admission);
            if learned.throttled && may_requeue && requeue_throttled && requeues < MAX_REQUEUES {
                requeues += 1;
                self.metrics.quota.requeues.inc();
                continue;
            }
            let graph_error = reply.graph_error();
            // A reply that is not an auth error shows Graph accepted the token; 5xx without a
            // Graph error says nothing about it.
            match &graph_error {
                Some(e) => self
                    .tokens
                    .observe(&injected.identity, e.class() != ErrorClass::Auth),
                None if reply.status.is_success() || reply.status.is_redirection() => {
                    self.tokens.observe(&injected.identity, true)
                }
                None => {}
            }
            if let Some(err) = graph_error {
                if err.class() == ErrorClass::Auth {
                    tracing::debug!(
                        token = %injected.identity,
                        code = err.code,
                        subcode = err.subcode.unwrap_or(0),
                        "Graph rejected the injected token"
                    );
                    if &*injected.identity != "system" && !token_retried {
                        token_retried = true;
                        self.tokens.forget(&injected.identity);
                        continue;
                    }
                }
            }
            let mut reply = reply;
            reply.headers = rewrite::scrub_headers(reply.headers, &self.tokens.secrets());
            reply.headers.extend(self.quota.rate_limit_headers(&charge));
            return Ok(reply);
        }
    }
}

/// Checks everything the call asks Graph to do: its method, the node of its path, every id
/// it names (`ids=`, a root `id=`), every field it selects, and for a batch every operation
/// the same way (with the operation's own key, looked up in `clients`, when it has one).
/// One forbidden part rejects the whole call before anything goes upstream. `key` is the
/// client key the call presented: it may not appear anywhere else in the call (a key pasted
/// into a post would be published on the Page).
pub fn authorize(
    clients: &ClientRegistry,
    client: &Client,
    key: &str,
    call: &Call,
) -> Result<(), ProxyError> {
    check_key_stays(key, call)?;
    check_fields(&call.params)?;
    let Some(ops) = &call.batch else {
        let targets = targets(&call.params, &call.ids);
        return auth::authorize(client, call.method, call.path.node(), &targets);
    };
    if call.method != GraphMethod::Post
        || call.path.node().is_some()
        || !call.ids.is_empty()
        || call.params.contains("id")
    {
        return Err(ProxyError::BadRequest(
            "A batch is a POST to the root path `/` without ids.".into(),
        ));
    }
    for op in ops {
        let op_client;
        let who = match op.own_token() {
            Some(k) => {
                op_client = clients.lookup(k)?;
                &op_client
            }
            None => client,
        };
        let op_params = op.all_params();
        check_fields(&op_params)?;
        if op_params.contains("batch") {
            return Err(ProxyError::BadRequest(
                "Batch operations cannot hold a batch.".into(),
            ));
        }
        let ids = parse_ids(&op_params)?;
        let targets = targets(&op_params, &ids);
        auth::authorize(who, op.method, op.path.node(), &targets)?;
    }
    Ok(())
}

/// The upstream form of a call, built only from what was parsed and checked: client key out,
/// `injected` token and proof in; batch operations with their own key get `system` instead.
pub fn upstream_request(
    call: &Call,
    injected: &Injected,
    system: &Injected,
) -> Result<UpstreamRequest, ProxyError> {
    let mut params = call.params.clone();
    injected.apply(&mut params);
    let method = match (call.method, call.http_method) {
        (GraphMethod::Get, _) => {
            params.remove("method");
            GraphMethod::Get
        }
        (_, GraphMethod::Delete) => GraphMethod::Delete,
        _ => GraphMethod::Post,
    };
    if let Some(ops) = &call.batch {
        params.set("batch", upstream_batch(ops, system)?);
    }
    let mut headers = call.forwarded.clone();
    if let Some(trace) = &call.trace {
        headers.extend(trace.upstream_headers());
    }
    Ok(UpstreamRequest {
        method,
        path: call.path.to_upstream_path(),
        params,
        headers,
        files: call.files.clone(),
    })
}

/// Batch operations rebuilt from their checked parts; those with their own key (a client key)
/// get the system token and its proof in its place.
fn upstream_batch(ops: &[BatchOp], system: &Injected) -> Result<String, ProxyError> {
    let mut token = Params::new();
    system.apply(&mut token);
    let out: Vec<serde_json::Value> = ops
        .iter()
        .map(|op| op.to_upstream(op.own_token().map(|_| &token)))
        .collect();
    serde_json::to_string(&out).map_err(|e| ProxyError::Internal(e.to_string()))
}

/// The presented key (and an operation's own key) appears only as a key: not in the path,
/// another parameter, a batch operation, a forwarded header or an uploaded file (a key pasted
/// into a post would be published on the Page).
fn check_key_stays(key: &str, call: &Call) -> Result<(), ProxyError> {
    let ops = call.batch.as_deref().unwrap_or_default();
    let keys: Vec<&str> = std::iter::once(key)
        .chain(ops.iter().filter_map(BatchOp::own_token))
        .filter(|k| k.len() >= 8)
        .collect();
    if keys.is_empty() {
        return Ok(());
    }
    let holds = |v: &[u8]| keys.iter().any(|k| contains(v, k.as_bytes()));
    let in_path = call
        .path
        .segments
        .iter()
        .chain(ops.iter().flat_map(|op| &op.path.segments))
        .any(|s| holds(s.as_bytes()));
    let in_headers = call.forwarded.iter().any(|(_, v)| holds(v.as_bytes()))
        || call
            .trace
            .as_ref()
            .is_some_and(|t| holds(t.request_id().as_bytes()));
    let in_params = call
        .params
        .iter()
        .any(|(k, v)| holds(k.as_bytes()) || (k != "batch" && holds(v.as_bytes())));
    let in_ops = ops.iter().any(|op| {
        op.query
            .iter()
            .chain(op.body.iter())
            .any(|(k, v)| holds(k.as_bytes()) || holds(v.as_bytes()))
            || op.extra.values().any(|v| holds(v.to_string().as_bytes()))
    });
    let in_files = call.files.iter().any(|f| {
        holds(f.name.as_bytes())
            || holds(f.filename.as_bytes())
            || f.content_type.as_ref().is_some_and(|c| holds(c.as_bytes()))
            || holds(&f.data)
    });
    if in_path || in_headers || in_params || in_ops || in_files {
        return Err(ProxyError::BadRequest(
            "The request carries a client key outside `access_token`.".into(),
        ));
    }
    Ok(())
}

/// Whether `needle` occurs in `hay`. Short values (nearly every parameter) are scanned from
/// the needle's first byte; building a full searcher costs more than they do.
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    match needle.first() {
        None => true,
        Some(_) if hay.len() < needle.len() => false,
        Some(_) if hay.len() > 4096 => memchr::memmem::find(hay, needle).is_some(),
        Some(&first) => memchr::memchr_iter(first, hay).any(|at| hay[at..].starts_with(needle)),
    }
}

/// The ids a call names besides its path's node: `ids=`, and `id=` (Graph's root lookup,
/// `/?id=...`). Each is checked like a node.
fn targets<'a>(params: &Params, ids: &'a [String]) -> std::borrow::Cow<'a, [String]> {
    match params.get("id") {
        None => std::borrow::Cow::Borrowed(ids),
        Some(id) => {
            let mut out = ids.to_vec();
            out.push(id.to_string());
            std::borrow::Cow::Owned(out)
        }
    }
}

/// The Page a request log line names: the one charged upstream, else the one the call names.
/// `None` when the line will not be written (no copy of the id per hit for nothing).
fn log_page(call: &Call) -> Option<String> {
    if !tracing::enabled!(tracing::Level::INFO) {
        return None;
    }
    call.stats
        .charged_page()
        .or(call.quota_hints.page.as_deref())
        .or_else(|| call.page())
        .map(str::to_string)
}

/// The node a request log line names. `None` when the line will not be written.
fn log_node(call: &Call) -> Option<String> {
    if !tracing::enabled!(tracing::Level::INFO) {
        return None;
    }
    call.path.node().map(str::to_string)
}

/// What the access log line needs from the request before it is taken apart: its path
/// without anything that could be a secret, and the bounded User-Agent. Captured only when
/// the line will be written.
struct RequestRecord {
    path: String,
    user_agent: String,
}

impl RequestRecord {
    fn capture<B>(req: &Request<B>) -> Option<RequestRecord> {
        if !tracing::enabled!(tracing::Level::INFO) {
            return None;
        }
        let user_agent = req
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map_or("-", |ua| {
                let mut end = ua.len().min(MAX_LOGGED_USER_AGENT);
                while !ua.is_char_boundary(end) {
                    end -= 1;
                }
                &ua[..end]
            })
            .to_string();
        Some(RequestRecord {
            path: loggable_path(req.uri().path()),
            user_agent,
        })
    }
}

/// The request path for the log: no query string, and every segment that is not a Graph
/// version, id or edge name written as `-` (a key pasted into a path is never logged).
fn loggable_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len().min(128));
    for segment in path.split('/').filter(|s| !s.is_empty()).take(16) {
        out.push('/');
        let b = segment.as_bytes();
        let version = b.len() <= 8
            && b.first() == Some(&b'v')
            && b[1..].iter().all(|c| c.is_ascii_digit() || *c == b'.');
        let id = b.len() <= 64 && b.iter().all(|c| c.is_ascii_digit() || *c == b'_');
        let account =
            b.len() <= 64 && b.starts_with(b"act_") && b[4..].iter().all(|c| c.is_ascii_digit());
        let edge = b.len() <= 40 && b.iter().all(|c| c.is_ascii_lowercase() || *c == b'_');
        if version || id || account || edge {
            out.push_str(segment);
        } else {
            out.push('-');
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// Re-queues of one throttled GET; each waits out a pause, so the deadline ends it sooner.
const MAX_REQUEUES: u32 = 8;

/// Graph parameters must not ask for a token: graphgate never hands Meta tokens out, so a
/// `fields` value that names `access_token` anywhere (a field at any depth, a modifier's
/// argument such as `.fields(access_token)`, an alias) is refused rather than silently
/// scrubbed. Checked on the text, once as given and once percent-decoded again, so no
/// spelling of the tree can hide it. Malformed `fields` are refused here too.
fn check_fields(params: &Params) -> Result<(), ProxyError> {
    for raw in params.get_all("fields") {
        let decoded_again = raw
            .contains('%')
            .then(|| percent_encoding::percent_decode_str(raw).decode_utf8().ok())
            .flatten();
        if names_token(raw) || decoded_again.is_some_and(|d| names_token(&d)) {
            return Err(ProxyError::ForbiddenField("access_token".into()));
        }
        // A flat list of names (the usual case) needs no tree to be valid.
        if crate::graph::fields::for_each_simple_name(raw, |_| {}).is_some() {
            continue;
        }
        Fields::parse(raw).map_err(|e| ProxyError::BadRequest(format!("Invalid fields: {e}.")))?;
    }
    Ok(())
}

/// Whether `text` holds `access_token` in any ASCII case. Found from its `_`, so a list of
/// plain names costs one `memchr` pass.
fn names_token(text: &str) -> bool {
    const NEEDLE: &[u8] = b"access_token";
    const UNDERSCORE_AT: usize = 6;
    let b = text.as_bytes();
    memchr::memchr_iter(b'_', b).any(|at| {
        at >= UNDERSCORE_AT
            && b.get(at - UNDERSCORE_AT..at - UNDERSCORE_AT + NEEDLE.len())
                .is_some_and(|w| w.eq_ignore_ascii_case(NEEDLE))
    })
}

/// Total size of the request head as the client sent it (approximately: names, values,
/// separators, request line).
fn check_header_size<B>(req: &Request<B>, max: usize) -> Result<(), ProxyError> {
    // The request-target's length from its parts: formatting the URI to measure it was a
    // per-request allocation.
    let uri = req.uri();
    let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(1, |pq| pq.as_str().len());
    let head: usize = req
        .headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + target
        + 16;
    if head > max {
        return Err(ProxyError::HeadersTooLarge(max));
    }
    Ok(())
}

async fn read_body<B>(body: B, headers: &HeaderMap, max: usize) -> Result<Bytes, ProxyError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(ProxyError::BodyTooLarge(max));
    }
    match Limited::new(body, max).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ProxyError::BodyTooLarge(max)),
        Err(e) => Err(ProxyError::BadRequest(format!(
            "Could not read the request body: {e}"
        ))),
    }
}

fn build_response(reply: &Reply, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = reply.status;
    // Sized once for the replayed headers plus those graphgate adds (no regrowth).
    *response.headers_mut() = HeaderMap::with_capacity(reply.headers.len() + 6);
    let h = response.headers_mut();
    for (n, v) in &reply.headers {
        h.append(n.clone(), v.clone());
    }
    if !h.contains_key(header::CONTENT_TYPE) {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=UTF-8"),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::loggable_path;

    #[test]
    fn logged_paths_hold_no_query_and_nothing_that_could_be_a_key() {
        for (path, logged) in [
            ("/v21.0/1001/feed", "/v21.0/1001/feed"),
            ("/", "/"),
            ("/me/accounts", "/me/accounts"),
            ("/v21.0/act_123/insights", "/v21.0/act_123/insights"),
            ("/v21.0/1001_2002/comments", "/v21.0/1001_2002/comments"),
            ("/v21.0/EAABsecretToken123", "/v21.0/-"),
            ("/v21.0/key-reader-1001/feed", "/v21.0/-/feed"),
            ("/v21.0/3f2a9c0d1e/feed", "/v21.0/-/feed"),
            ("/v21.0/%41bc", "/v21.0/-"),
        ] {
            assert_eq!(loggable_path(path), logged, "{path}");
        }
    }
}

/// The stages without sockets: a gateway whose upstream (port 9 on loopback) is never
/// called, driven one request at a time.
#[cfg(test)]
mod stage_tests {
    use http::StatusCode;
    use http_body_util::BodyExt;

    use super::cached::PendingRead;
    use super::*;
    use crate::cache::entry::Entry;
    use crate::cache::key;
    use crate::rewrite::PreparedBody;

    const CONFIG: &str = r#"
        [upstream]
        url = "http://127.0.0.1:9"
        [credentials]
        system_user_token = "EAAB-system-token-secret"
        app_secret = "shh-app-secret"
        [[clients]]
        name = "reader"
        key = "reader-key"
        pages = ["1001"]
    "#;
    const READ: &str = "/v21.0/1001?fields=id,name&access_token=reader-key";

    fn gateway() -> Arc<Gateway> {
        let config = Config::from_toml(CONFIG, |_| None).expect("config");
        let metrics = Arc::new(Metrics::new());
        Arc::new(Gateway::new(config, "http://gw.test".into(), metrics).expect("gateway"))
    }

    fn get(path: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
        let mut req = Request::get(path);
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        req.body(Full::new(Bytes::new())).expect("request")
    }

    /// The parse and admission stages for `req`.
    fn admit(gw: &Arc<Gateway>, req: Request<Full<Bytes>>) -> Result<Admitted, Failure> {
        let context = RequestContext::from_headers(req.headers(), None);
        gw.check_head(&req)?;
        let parsed = gw.parse_parts(req.into_parts().0, Bytes::new(), &context)?;
        gw.admit_client(parsed)
    }

    fn status_of(result: Result<Admitted, Failure>) -> StatusCode {
        match result {
            Ok(_) => StatusCode::OK,
            Err((e, _, _)) => e.status(),
        }
    }

    /// Stores `body` under the key `READ` looks up, as a fill would.
    fn store(gw: &Arc<Gateway>, body: &'static str) {
        let a = admit(gw, get(READ, &[])).expect("admitted");
        let identity = gw.tokens.identity_for(a.call.page());
        let k = key::build(
            gw.version_of(&a.call),
            &a.call.path.segments,
            &a.call.params,
            &identity,
        )
        .expect("key");
        let body = PreparedBody::plain(Bytes::from_static(body.as_bytes()));
        let entry = Entry::new(StatusCode::OK, Vec::new(), body, Duration::from_secs(60));
        assert!(gw.cache.store(&k, &entry, gw.cache.epoch(&k)));
    }

    #[tokio::test]
    async fn admission_refuses_unknown_keys_other_pages_and_token_fields() {
        let gw = gateway();
        assert_eq!(status_of(admit(&gw, get(READ, &[]))), StatusCode::OK);
        for (path, status) in [
            ("/v21.0/1001?fields=id", StatusCode::UNAUTHORIZED),
            ("/v21.0/1001?access_token=nope", StatusCode::UNAUTHORIZED),
            ("/v21.0/1002?access_token=reader-key", StatusCode::FORBIDDEN),
            (
                "/v21.0/1001?fields=name.as(x),access_token&access_token=reader-key",
                StatusCode::FORBIDDEN,
            ),
            (
                "/v21.0/1001?fields=id&fields=name&access_token=reader-key",
                StatusCode::BAD_REQUEST,
            ),
        ] {
            assert_eq!(status_of(admit(&gw, get(path, &[]))), status, "{path}");
        }
    }

    #[tokio::test]
    async fn the_read_stage_answers_a_stored_entry_at_once_and_leaves_the_rest_pending() {
        let gw = gateway();
        let start = |headers: &[(&str, &str)]| {
            let a = admit(&gw, get(READ, headers)).expect("admitted");
            gw.start_read(&a.call, gw.version_of(&a.call), &a.parts.headers, &a.key)
                .expect("read starts")
        };
        assert!(matches!(
            start(&[]),
            ReadStart::Pending(PendingRead::Node(_))
        ));
        store(&gw, r#"{"id":"1001","name":"Stored"}"#);
        let ReadStart::Served(served) = start(&[]) else {
            panic!("a stored entry is served at once");
        };
        assert_eq!(served.response.status(), StatusCode::OK);
        assert_eq!(served.response.headers()["x-cache"], "HIT");
        // The client's directives still count.
        assert!(matches!(
            start(&[("cache-control", "no-store")]),
            ReadStart::Uncached
        ));
        assert!(matches!(
            start(&[("cache-control", "no-cache")]),
            ReadStart::Pending(PendingRead::Node(_))
        ));
    }

    #[tokio::test]
    async fn a_hit_is_answered_whole_without_the_upstream() {
        let gw = gateway();
        store(&gw, r#"{"id":"1001","name":"Stored"}"#);
        let req = get(READ, &[]);
        let context = RequestContext::from_headers(req.headers(), None);
        let response = gw.handle_in(req, context).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-cache"], "HIT");
        assert!(response.headers().contains_key("x-graphgate-trace-id"));
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(&body[..], br#"{"id":"1001","name":"Stored"}"#);
        // A miss goes to the upstream, which is not there: Graph-style 502, not a panic.
        let req = get("/v21.0/1001?fields=about&access_token=reader-key", &[]);
        let context = RequestContext::from_headers(req.headers(), None);
        let response = gw.handle_in(req, context).await;
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    }
}
