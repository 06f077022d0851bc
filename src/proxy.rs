//! The gateway: the state every request uses (configuration, clients, tokens, cache, quota,
//! upstream) and the work of the stages the public stack (`crate::stack`) runs in order:
//! limits, authenticate and authorize ([`Gateway::admit_client`]), cache read-through
//! ([`cached`]: lookup, coalesced fill), upstream ([`Gateway::upstream`]: choose token, quota,
//! send, learn, invalidate after writes, prepare body: paging links, scrubbing). What the
//! stages hand each other is in [`exchange`]. Every failure is a [`ProxyError`] answered in
//! Graph's error shape.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full, Limited};

mod cached;
mod exchange;
mod fleet;
mod members;
mod recall;
mod webhook;

use crate::auth::{self, Client, ClientRegistry};
use crate::cache::Cache;
use crate::config::Config;
use crate::error::ProxyError;
use crate::graph::fields::Fields;
use crate::graph::request::{parse_ids, BatchOp, GraphMethod, Params};
use crate::graph::usage::ErrorClass;
use crate::metrics::Metrics;
use crate::quota::{self, Scheduler};
use crate::redis_conn::RedisConn;
use crate::rewrite;
use crate::tokens::{Injected, Tokens};
use crate::upstream::{Reply, Upstream, UpstreamRequest};
use crate::webhooks::Webhooks;
pub(crate) use cached::{ReadStart, Served};
pub use exchange::{Admitted, Answer, Parsed, Record};
pub use recall::{Recall, RecallKey};

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
    /// What parse and admission made of the hits each worker served (`[cache] recall_hits`).
    pub recall: Option<Recall>,
    /// The Meta Webhooks endpoint, when configured.
    webhooks: Option<Webhooks>,
    draining: AtomicBool,
    /// Requests being handled (see the public stack's load shedding).
    in_flight: Arc<InFlight>,
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
            recall: config.cache.recall_hits.then(Recall::default),
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

    /// Stage: the rest of a read the in-process lookup could not answer (ends here), else
    /// the call goes upstream uncached.
    pub(crate) async fn after_lookup(self: Arc<Self>, a: Admitted, start: ReadStart) -> Answer {
        match start {
            ReadStart::Pending(pending) => {
                let version = self.version_of(&a.call);
                match self
                    .finish_read(&a.call, version, &a.parts.headers, &a.key, pending)
                    .await
                {
                    Ok(s) => a.answer(s.response, s.cache, s.upstream_ms),
                    Err(e) => a.reject(e),
                }
            }
            ReadStart::Served(s) | ReadStart::Hit(s, _) => {
                a.answer(s.response, s.cache, s.upstream_ms)
            }
            ReadStart::Uncached => self.upstream(a).await,
        }
    }

    /// Stage: limits on the request head (and refusing new work while draining).
    pub(crate) fn check_head<B>(&self, req: &Request<B>) -> Result<(), ProxyError> {
        if self.is_draining() {
            return Err(ProxyError::ShuttingDown);
        }
        check_header_size(req, self.config.server.max_header_bytes)
    }

    /// Stage: authenticate the client and authorize everything the call asks for. A refusal
    /// is the request's answer, returned as it is (no box on a path every request takes).
    #[allow(clippy::result_large_err)]
    pub(crate) fn admit_client(&self, parsed: Parsed) -> Result<Admitted, Answer> {
        let Parsed {
            parts,
            mut call,
            route,
        } = parsed;
        let (client, key) = self
            .clients
            .authenticate(&parts.headers, &parts.extensions, call.presented_tokens())
            .map_err(|e| Answer::refused(e, route, None))?;
        if let Err(e) = authorize(&self.clients, &client, &key, &call) {
            return Err(Answer::refused(e, route, Some(client)));
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
    pub(crate) async fn upstream(self: Arc<Self>, a: Admitted) -> Answer {
        let call = &a.call;
        let upstream_started = Instant::now();
        let reply = match Box::pin(self.forward(call, self.version_of(call), true)).await {
            Ok(reply) => reply,
            Err(e) => return a.reject(e),
        };
        let upstream_ms = upstream_started.elapsed().as_millis();
        if reply.status.is_success() {
            Box::pin(self.invalidate_after_write(call)).await;
        }
        let prepared = match rewrite::prepare(
            reply.body.clone(),
            call.batch.is_some(),
            &self.public_url,
            &self.tokens.secrets(),
        ) {
            Ok(p) => p,
            Err(e) => return a.reject(e),
        };
        // The reply's share of the budget stays with the body until it is written.
        let body = crate::upstream::reply_budget::held(
            rewrite::finalize(&prepared, a.key.as_str()),
            reply.hold.iter().cloned().collect(),
        );
        let mut response = build_response(&reply, body);
        let cache = cached::mark_uncached(&mut response, call);
        a.answer(response, cache, Some(upstream_ms))
    }

    /// The Graph version a call goes to: its path's, else `upstream.default_version`.
    pub(crate) fn version_of<'a>(&'a self, call: &'a Call) -> &'a str {
        call.path
            .version
            .as_deref()
            .unwrap_or(&self.config.upstream.default_version)
    }

    /// Reads a request body, bounded in size (`server.max_body_bytes`, 413) and time
    /// (`server.body_read_timeout_ms`, 408).
    pub(crate) async fn read_body_within<B>(
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
    // Room for the token and its proof.
    let mut params = call.params.cloned_with_room(2);
    injected.apply(&mut params);
    // Graph executes exactly the method that was checked: a read goes as a GET, a write as a
    // POST (carrying `method=DELETE` for a delete that came by another HTTP method), and only
    // a delete that came as an HTTP DELETE goes as one. An HTTP DELETE saying `method=POST`
    // is a POST.
    let method = match call.method {
        GraphMethod::Get => {
            params.remove("method");
            GraphMethod::Get
        }
        GraphMethod::Delete if call.http_method == GraphMethod::Delete => GraphMethod::Delete,
        GraphMethod::Delete | GraphMethod::Post => GraphMethod::Post,
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
            .is_some_and(|t| holds(t.request_id_bytes()));
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
pub(crate) fn log_page(call: &Call) -> Option<String> {
    if !tracing::enabled!(tracing::Level::INFO) {
        return None;
    }
    named_page(call).map(str::to_string)
}

/// The Page a request log line names, whether or not the line is written.
pub(crate) fn named_page(call: &Call) -> Option<&str> {
    call.stats
        .charged_page()
        .or(call.quota_hints.page.as_deref())
        .or_else(|| call.page())
}

/// The node a request log line names. `None` when the line will not be written.
pub(crate) fn log_node(call: &Call) -> Option<String> {
    if !tracing::enabled!(tracing::Level::INFO) {
        return None;
    }
    call.path.node().map(str::to_string)
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
pub(crate) fn check_header_size<B>(req: &Request<B>, max: usize) -> Result<(), ProxyError> {
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
