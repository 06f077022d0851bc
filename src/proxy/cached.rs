//! The cache phase of the pipeline: lookup → (hit | stale + background refresh | coalesced
//! fill) → reply with `X-Cache`, `Cache-Status` (RFC 9211) and `Age`; and invalidation after
//! writes. The fill runs in its own task through [`Gateway::forward`], so a client that hangs
//! up never cancels a fill others are waiting for.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::Full;

use super::fleet::FleetStart;
use super::{Call, Gateway};
use crate::cache::coalesce::Flight;
use crate::cache::entry::{Entry, Freshness, ReplyHeaders, DEFAULT_CONTENT_TYPE};
use crate::cache::fill_lock::{FillLock, Locked, ReadOutcome, WaitError};
use crate::cache::gather::{Lead, Part};
use crate::cache::key::{self, CacheKey};
use crate::cache::policy::{request_directive, Directive};
use crate::cache::status::{CacheStatus, Forward};
use crate::cache::union::{self, UnionResult};
use crate::cache::{batch, merge, projection, Fill, FillKind, FillResult};
use crate::error::ProxyError;
use crate::graph::fields::Fields;
use crate::graph::headers;
use crate::graph::request::{page_of_node, GraphMethod};
use crate::graph::usage::ErrorClass;
use crate::metrics::{CacheResult, StaleReason};
use crate::rewrite::{self, PreparedBody};
use crate::upstream::reply_budget::{self, ReplyBudget, Reservation, Source};
use crate::upstream::Reply;

const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
/// Extra time a waiter gives a fill beyond the upstream timeout (token minting, queuing).
const FILL_MARGIN: Duration = Duration::from_secs(1);

/// Where a read stands after [`Gateway::start_read`].
pub(crate) enum ReadStart {
    /// A fresh entry in the in-process cache answered it; the key it was stored under.
    Hit(Served, CacheKey),
    /// Answered from the in-process cache (an entry served stale while one refresh runs).
    Served(Served),
    /// Not cacheable: the call goes upstream uncached.
    Uncached,
    /// The rest needs waiting: [`Gateway::finish_read`].
    Pending(PendingRead),
}

/// A read that [`Gateway::start_read`] could not answer at once.
pub(crate) enum PendingRead {
    /// A read-only batch, answered operation by operation.
    Batch(Directive),
    /// `GET /?ids=…`, answered node by node.
    Ids(Directive),
    /// A node read that missed (or found an entry past its TTL) in-process.
    Node(NodeRead),
}

/// What the in-process lookup of a node read learned.
pub(crate) struct NodeRead {
    key: CacheKey,
    ttl: Duration,
    found: Option<Arc<Entry>>,
    directive: Directive,
    identity: Arc<str>,
    now: Instant,
}

/// A reply produced by the cache phase.
pub(crate) struct Served {
    pub response: Response<Full<Bytes>>,
    /// The request metric's and log's cache label.
    pub cache: CacheResult,
    pub upstream_ms: Option<u128>,
}

/// Values the reply builder needs about the calling client, and the budget its reply body
/// is counted against.
pub(super) struct Caller<'a> {
    key: &'a str,
    if_none_match: Option<&'a HeaderValue>,
    budget: &'a ReplyBudget,
}

/// Where the writer of a fill runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Writer {
    /// In a task of its own: the caller is a request, and a client that hangs up must not
    /// cancel a fill other requests wait for.
    Spawned,
    /// In the caller, already a task of its own (a union or merge fill): no second task.
    Here,
}

/// Where the body a reply is built from comes from, for the reply budget.
pub(super) enum Origin {
    /// A cached entry, shared by every reader.
    Cached,
    /// Fetched for this request (or the fill it joined): its reservation comes along.
    Fetched(Option<Arc<Reservation>>),
    /// Assembled for this request alone (`ids=`, batch).
    Assembled,
}

impl Gateway {
    /// The part of a read that needs no waiting: whether the call is cacheable at all, and
    /// the in-process lookup, which answers hits (and stale entries while one refresh runs)
    /// at once. Everything that may wait is left to [`Gateway::finish_read`], which the
    /// caller boxes: the request future stays the size the hit path needs (it is moved
    /// through every layer of the stack, and each move copies it).
    pub(crate) fn start_read(
        self: &Arc<Self>,
        call: &Call,
        version: &str,
        headers: &HeaderMap,
        client_key: &str,
    ) -> Result<ReadStart, ProxyError> {
        let batch_read = call.batch.as_deref().is_some_and(batch::cacheable);
        if (call.method != GraphMethod::Get && !batch_read) || !call.files.is_empty() {
            return Ok(ReadStart::Uncached);
        }
        let directive = request_directive(headers);
        if directive == Directive::Bypass {
            self.cache.count(CacheResult::Bypass);
            return Ok(ReadStart::Uncached);
        }
        if batch_read {
            return Ok(ReadStart::Pending(PendingRead::Batch(directive)));
        }
        if call.batch.is_some() {
            return Ok(ReadStart::Uncached);
        }
        if !call.ids.is_empty() {
            if call.path.segments.is_empty() {
                return Ok(ReadStart::Pending(PendingRead::Ids(directive)));
            }
            // `/{edge}?ids=` spans nodes in a way invalidation cannot follow: not cached.
            return Ok(ReadStart::Uncached);
        }
        if call.path.segments.is_empty() {
            return Ok(ReadStart::Uncached);
        }
        let identity = self.tokens.identity_for(call.page());
        let key = key::build(version, &call.path.segments, &call.params, &identity)
            .map_err(|e| ProxyError::BadRequest(format!("Invalid fields: {e}.")))?;
        let ttl = self.cache.policy.ttl_for(&key.rule_path);
        if ttl.is_zero() {
            self.cache.count(CacheResult::Bypass);
            return Ok(ReadStart::Uncached);
        }
        let found = self.cache.get(&key);
        let now = Instant::now();
        if directive == Directive::Normal {
            if let Some(e) = &found {
                let caller = self.caller(headers, client_key);
                match e.freshness(
                    now,
                    self.cache.policy.stale_while_revalidate,
                    self.cache.policy.stale_if_error,
                ) {
                    Freshness::Fresh => {
                        let served = self.fresh_reply(&key, e, &caller, now, None)?;
                        return Ok(ReadStart::Hit(served, key));
                    }
                    Freshness::StaleRevalidate => {
                        self.cache.count(CacheResult::Stale);
                        self.metrics.cache.served_stale(StaleReason::Revalidate);
                        // One refresh: if one is already running for this key, join nothing.
                        if let Locked::Write(permit) = self.cache.flights.lock_now(key.id) {
                            let job = Job {
                                key: key.clone(),
                                ttl,
                                stale: Some(Arc::new(e.clone())),
                                shared: true,
                                projection: None,
                            };
                            self.spawn_fill(permit, call.clone(), version, job);
                        }
                        let status = CacheStatus::StaleWhileRevalidate {
                            ttl: e.ttl_left_s(now),
                        };
                        return Ok(ReadStart::Served(Served {
                            response: reply_from(e, &caller, status, Some(now), Origin::Cached)?,
                            cache: status.result(),
                            upstream_ms: None,
                        }));
                    }
                    Freshness::StaleIfError | Freshness::Expired => {}
                }
            }
        }
        Ok(ReadStart::Pending(PendingRead::Node(NodeRead {
            key,
            ttl,
            found: found.map(Arc::new),
            directive,
            identity,
            now,
        })))
    }

    /// What the reply builder needs about the client sending `headers` with `client_key`.
    fn caller<'a>(&'a self, headers: &'a HeaderMap, client_key: &'a str) -> Caller<'a> {
        Caller {
            key: client_key,
            if_none_match: headers.get(header::IF_NONE_MATCH),
            budget: self.upstream.reply_budget(),
        }
    }

    /// A fresh entry's reply, counted as a hit; the entry moves to the fast shard when it
    /// became hot.
    fn fresh_reply(
        &self,
        key: &CacheKey,
        e: &Entry,
        caller: &Caller,
        now: Instant,
        kept: Option<&KeptHead>,
    ) -> Result<Served, ProxyError> {
        self.cache.count(CacheResult::Hit);
        let status = CacheStatus::Hit {
            ttl: e.ttl_left_s(now),
        };
        let response = reply_with(e, kept, caller, status, Some(now), Origin::Cached)?;
        if e.became_hot() {
            self.cache.store_plain(key, e);
        }
        Ok(Served {
            response,
            cache: status.result(),
            upstream_ms: None,
        })
    }

    /// The hit [`Gateway::start_read`] would answer for a read whose cache key is already
    /// known (`crate::stack::recall`): the fresh entry under `key`, unless the request's
    /// cache directives ask for more. `None`: take the whole read path.
    pub(crate) fn recalled_hit(
        &self,
        key: &CacheKey,
        headers: &HeaderMap,
        client_key: &str,
        kept: &KeptHead,
    ) -> Option<Result<Served, ProxyError>> {
        if request_directive(headers) != Directive::Normal {
            return None;
        }
        let e = self.cache.get(key)?;
        let now = Instant::now();
        let fresh = e.freshness(
            now,
            self.cache.policy.stale_while_revalidate,
            self.cache.policy.stale_if_error,
        );
        if !matches!(fresh, Freshness::Fresh) {
            return None;
        }
        let caller = self.caller(headers, client_key);
        Some(self.fresh_reply(key, &e, &caller, now, Some(kept)))
    }

    /// The rest of a read [`Gateway::start_read`] could not answer: member reads (`ids=`,
    /// batch), a cut from a stored superset, or a fill (joined, gathered or led).
    pub(super) async fn finish_read(
        self: &Arc<Self>,
        call: &Call,
        version: &str,
        headers: &HeaderMap,
        client_key: &str,
        pending: PendingRead,
    ) -> Result<Served, ProxyError> {
        let caller = self.caller(headers, client_key);
        let NodeRead {
            key,
            ttl,
            found,
            directive,
            identity,
            now,
        } = match pending {
            PendingRead::Batch(directive) => {
                return self.batch_read(call, version, directive, &caller).await
            }
            PendingRead::Ids(directive) => {
                return self.ids_read(call, version, directive, &caller).await
            }
            PendingRead::Node(node) => node,
        };
        // A node read for some fields: a stored reply for more fields of the node may hold
        // it, or a call for the node in flight (or gathering fields) may be joined.
        let projection = (directive == Directive::Normal && self.cache.project_fields)
            .then(|| projectable(call))
            .flatten()
            .and_then(|want| {
                key::base_of(version, &call.path.segments, &call.params, &identity)
                    .map(|base| (want, base))
            });
        if let Some((want, base)) = &projection {
            if let Some(served) = self.projected_read(&key, want, *base, &caller, now)? {
                return Ok(served);
            }
        }
        self.cache.count(CacheResult::Miss);
        if let (Some((want, base)), None) = (projection, &found) {
            return self
                .union_read(call, version, key, ttl, want, base, &caller)
                .await;
        }
        let fwd = if directive == Directive::Revalidate {
            Forward::Request
        } else if found.is_some() {
            Forward::Stale
        } else {
            Forward::Miss
        };
        let started = Instant::now();
        let job = Job {
            key,
            ttl,
            stale: found,
            shared: directive == Directive::Normal,
            projection: None,
        };
        let (fill, collapsed) = self
            .fill_coalesced(call.clone(), version, job, Writer::Spawned)
            .await?;
        let upstream_ms = Some(started.elapsed().as_millis());
        self.served_from_fill(&fill, &caller, fwd, collapsed, upstream_ms)
    }

    /// A miss for some fields of a node: joins a call for the node that is gathering fields
    /// or in flight with fields covering these, or leads one (see [`crate::cache::union`]),
    /// and answers with this request's fields cut from the union's reply. Falls back to a
    /// call of its own when the union's call was abandoned, Graph rejected it with a client
    /// error (one caller's field may be what it rejected) or its reply cannot be cut down.
    #[allow(clippy::too_many_arguments)]
    async fn union_read(
        self: &Arc<Self>,
        call: &Call,
        version: &str,
        key: CacheKey,
        ttl: Duration,
        want: Fields,
        base: key::KeyId,
        caller: &Caller<'_>,
    ) -> Result<Served, ProxyError> {
        let started = Instant::now();
        let epoch = self.cache.epoch(&key);
        let own = want.normalized();
        let max_url = self.config.upstream.max_get_url_bytes;
        let fits = |u: &Fields| union_fits(call, u, max_url);
        let (waiter, collapsed) = match union::join(&self.cache.unions, base, &own, fits) {
            Part::Lead(lead, waiter) => {
                let node = NodeKeys {
                    key: key.clone(),
                    base,
                    fields: own.clone(),
                };
                self.spawn_union_fill(lead, call.clone(), version, node, ttl);
                (waiter, false)
            }
            Part::Joined(waiter) => {
                self.metrics.cache.coalesced.inc();
                (waiter, true)
            }
            Part::Alone => return self.fill_alone(call, version, key, ttl, caller).await,
        };
        let (union, fill) = match waiter
            .wait(self.fill_deadline() + self.cache.union_window)
            .await
        {
            Ok(result) => result?,
            Err(e @ WaitError::TimedOut) => return Err(self.fill_wait_failed(e)),
            Err(WaitError::Abandoned | WaitError::Unavailable) => {
                self.metrics.cache.union_fallbacks.inc();
                return self.fill_alone(call, version, key, ttl, caller).await;
            }
        };
        let upstream_ms = Some(started.elapsed().as_millis());
        if union == own {
            return self.served_from_fill(&fill, caller, Forward::Miss, collapsed, upstream_ms);
        }
        let status = fill.entry.status;
        if status.is_client_error() {
            self.metrics.cache.union_fallbacks.inc();
            return self.fill_alone(call, version, key, ttl, caller).await;
        }
        if !status.is_success() {
            // Graph or the path to it failed: every caller gets the same answer.
            return self.served_from_fill(&fill, caller, Forward::Miss, collapsed, upstream_ms);
        }
        let body = fill.entry.body()?;
        let id_habit = &self.cache.projections.id_habit;
        let Some(cut) = projection::project(&body, &union, &want, id_habit) else {
            self.metrics.cache.union_fallbacks.inc();
            return self.fill_alone(call, version, key, ttl, caller).await;
        };
        let kept = headers::member_stored(fill.entry.headers.iter());
        let mut entry = Entry::new(status, kept, cut, ttl);
        entry.stored_at = fill.entry.stored_at;
        let storable = matches!(
            fill.kind,
            FillKind::Stored | FillKind::L2Hit | FillKind::Remote
        );
        let stored = storable && self.cache.store(&key, &entry, epoch);
        let now = Instant::now();
        let status = CacheStatus::UnionFetched {
            fwd_status: status.as_u16(),
            stored,
            collapsed,
        };
        Ok(Served {
            response: reply_from(
                &entry,
                caller,
                status,
                stored.then_some(now),
                Origin::Fetched(fill.hold.clone()),
            )?,
            cache: status.result(),
            upstream_ms,
        })
    }

    /// Runs a union fill in its own task once the gathering window has passed, so a caller
    /// that hangs up cancels nothing.
    fn spawn_union_fill(
        self: &Arc<Self>,
        lead: Lead<Fields, UnionResult>,
        call: Call,
        version: &str,
        node: NodeKeys,
        ttl: Duration,
    ) {
        let gw = self.clone();
        let version = version.to_string();
        let window = self.cache.union_window;
        // Boxed: a task's future is moved a few times on the way into the runtime, and this
        // one is kilobytes.
        tokio::spawn(Box::pin(async move {
            if !window.is_zero() {
                tokio::time::sleep(window).await;
            }
            let fields = lead.close();
            let result = gw.union_fill(call, &version, node, ttl, &fields).await;
            lead.complete(result.map(|fill| (fields, fill)));
        }));
    }

    /// The upstream call for a union of fields: the leader's own call (under its own `key`)
    /// when no one else's fields were added, else the same read for the union (counted as a
    /// union fill, and stored under its own key, so later subsets are projected from it).
    async fn union_fill(
        self: &Arc<Self>,
        mut call: Call,
        version: &str,
        node: NodeKeys,
        ttl: Duration,
        fields: &Fields,
    ) -> FillResult {
        let (key, asked) = if node.fields == *fields {
            (node.key, node.fields)
        } else {
            call.params.set("fields", fields.canonical());
            self.metrics.cache.union_fills.inc();
            let identity = self.tokens.identity_for(call.page());
            let key = key::build(version, &call.path.segments, &call.params, &identity)
                .map_err(|e| ProxyError::BadRequest(format!("Invalid fields: {e}.")))?;
            (key, fields.clone())
        };
        let job = Job {
            key,
            ttl,
            stale: None,
            shared: true,
            projection: Some((node.base, asked)),
        };
        self.fill_node(call, version, job).await
    }

    /// The fill of a node read that missed: merged with concurrent misses for other nodes of
    /// the same Page into one `ids=` call (`[cache] merge_window_ms`), else on its own.
    async fn fill_node(self: &Arc<Self>, call: Call, version: &str, job: Job) -> FillResult {
        let window = self.cache.merge_window;
        let node = call.path.node().filter(|_| call.path.segments.len() == 1);
        let page = node.and_then(page_of_node);
        // Merged calls go with the system token: reads that would use a Page token are not.
        let identity = self.tokens.identity_for(None);
        let (Some(node), Some(page), false, true) = (
            node,
            page,
            window.is_zero(),
            self.tokens.identity_for(call.page()) == identity,
        ) else {
            return self
                .fill_coalesced(call, version, job, Writer::Here)
                .await
                .map(|(f, _)| f);
        };
        let node = node.to_string();
        let group = key::build(version, &[page.to_string()], &call.params, &identity)
            .map_err(|e| ProxyError::BadRequest(format!("Invalid fields: {e}.")))?
            .id;
        let waiter = match merge::join(&self.cache.merges, group, &node) {
            Part::Lead(lead, waiter) => {
                let gw = self.clone();
                let (call, version, job) = (call.clone(), version.to_string(), job.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(window).await;
                    let nodes = lead.close();
                    let result = if nodes.len() == 1 {
                        let fill = gw.fill_coalesced(call, &version, job, Writer::Here).await;
                        fill.map(|(f, _)| Arc::new(vec![(nodes[0].clone(), f)]))
                    } else {
                        gw.merged_fill(call, &version, nodes, job.ttl).await
                    };
                    lead.complete(result);
                });
                waiter
            }
            Part::Joined(waiter) => waiter,
            Part::Alone => {
                return self
                    .fill_coalesced(call, version, job, Writer::Here)
                    .await
                    .map(|(f, _)| f)
            }
        };
        let fills = match waiter.wait(self.fill_deadline() + window).await {
            Ok(result) => result?,
            Err(e @ WaitError::TimedOut) => return Err(self.fill_wait_failed(e)),
            Err(WaitError::Abandoned | WaitError::Unavailable) => Arc::default(),
        };
        match fills.iter().find(|(n, _)| *n == node) {
            Some((_, fill)) => Ok(fill.clone()),
            // Graph rejected the merged call (one bad id fails it all) or left this node out.
            None => self
                .fill_coalesced(call, version, job, Writer::Here)
                .await
                .map(|(f, _)| f),
        }
    }

    /// One `ids=` call for the nodes of a merge (after the shared tier, with Redis); each
    /// member is stored under its node's key as a single read's reply would be.
    async fn merged_fill(
        self: &Arc<Self>,
        call: Call,
        version: &str,
        nodes: Vec<String>,
        ttl: Duration,
    ) -> Result<Arc<Vec<(String, Fill)>>, ProxyError> {
        let identity = self.tokens.identity_for(None);
        let members = nodes
            .iter()
            .map(|n| {
                self.member(
                    version,
                    std::slice::from_ref(n),
                    &call.params,
                    &identity,
                    true,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let keys: Vec<&CacheKey> = members.iter().map(|m| &m.key).collect();
        let shared = self.shared_members(&keys, true).await;
        let mut fills = Vec::with_capacity(nodes.len());
        let mut fetch = Vec::new();
        for ((node, member), (entry, l2_epoch)) in nodes.iter().zip(members).zip(shared) {
            match entry {
                Some(entry) => fills.push((
                    node.clone(),
                    Fill {
                        entry,
                        kind: FillKind::L2Hit,
                        pieces: None,
                        hold: None,
                    },
                )),
                None => fetch.push((node.clone(), member, l2_epoch)),
            }
        }
        if fetch.is_empty() {
            return Ok(Arc::new(fills));
        }
        self.metrics.cache.merged_fills.inc();
        let ids: Vec<String> = fetch.iter().map(|(n, _, _)| n.clone()).collect();
        let mut sub = call;
        sub.path.segments.clear();
        sub.params.set("ids", ids.join(","));
        sub.ids = ids;
        let nodes = fetch
            .iter()
            .map(|(_, m, e)| (m.clone(), e.clone()))
            .collect();
        let fill = self.fill_ids(sub, version, nodes).await?;
        let (Some(pieces), true) = (&fill.pieces, fill.entry.status.is_success()) else {
            return Ok(Arc::new(fills));
        };
        let kept = headers::member_stored(fill.entry.headers.iter());
        for (node, _, _) in fetch {
            if let Some((_, body)) = pieces.iter().find(|(id, _)| *id == node) {
                let entry = Entry::new(StatusCode::OK, kept.clone(), body.clone(), ttl);
                fills.push((
                    node,
                    Fill {
                        entry: Arc::new(entry),
                        kind: FillKind::Stored,
                        pieces: None,
                        hold: fill.hold.clone(),
                    },
                ));
            }
        }
        Ok(Arc::new(fills))
    }

    /// A miss filled by a call of its own (coalesced only with identical reads).
    async fn fill_alone(
        self: &Arc<Self>,
        call: &Call,
        version: &str,
        key: CacheKey,
        ttl: Duration,
        caller: &Caller<'_>,
    ) -> Result<Served, ProxyError> {
        let started = Instant::now();
        let job = Job {
            key,
            ttl,
            stale: None,
            shared: true,
            projection: None,
        };
        let (fill, collapsed) = self
            .fill_coalesced(call.clone(), version, job, Writer::Spawned)
            .await?;
        let upstream_ms = Some(started.elapsed().as_millis());
        self.served_from_fill(&fill, caller, Forward::Miss, collapsed, upstream_ms)
    }

    /// Joins (or leads) the fill for `key` and waits for it within the fill deadline.
    async fn fill_coalesced(
        self: &Arc<Self>,
        call: Call,
        version: &str,
        job: Job,
        writer: Writer,
    ) -> Result<(Fill, bool), ProxyError> {
        let gw = self.clone();
        let version = version.to_string();
        self.coalesced(job.key.id, writer, move || async move {
            gw.fill(call, &version, job).await
        })
        .await
    }

    /// Takes `id`'s in-process fill lock. The writer runs `fill` as `writer` says and waits
    /// for it like the readers do, within the fill deadline. Returns the fill and whether
    /// another request wrote it.
    pub(super) async fn coalesced<F>(
        &self,
        id: key::KeyId,
        writer: Writer,
        fill: impl FnOnce() -> F,
    ) -> Result<(Fill, bool), ProxyError>
    where
        F: Future<Output = FillResult> + Send + 'static,
    {
        let flights = &self.cache.flights;
        let (reader, collapsed) = match flights.lock(&id).await {
            Locked::Write(permit) if writer == Writer::Here => {
                let reader = permit.reader();
                let value = Box::pin(fill()).await;
                flights.release(permit, value).await;
                (reader, false)
            }
            Locked::Write(permit) => {
                let reader = permit.reader();
                let (flights, fill) = (flights.clone(), fill());
                // Boxed, as in `spawn_union_fill`: a fill's future is kilobytes.
                tokio::spawn(Box::pin(async move {
                    flights.release(permit, fill.await).await
                }));
                (reader, false)
            }
            Locked::Read(reader) => {
                self.metrics.cache.coalesced.inc();
                (reader, true)
            }
            // Never in process (there is no store to lose); what it means: fill unlocked.
            // Boxed: inline, the fill's whole state would be part of every caller's future.
            Locked::Unavailable => return Box::pin(fill()).await.map(|f| (f, false)),
        };
        match flights.wait(reader, self.fill_deadline()).await {
            ReadOutcome::Done(result) => result.map(|f| (f, collapsed)),
            ReadOutcome::GaveUp(e) => Err(self.fill_wait_failed(e)),
            // Never in process: a flight dropped unreleased leaves its readers abandoned.
            ReadOutcome::TookOver(_) => Err(self.fill_wait_failed(WaitError::Abandoned)),
        }
    }

    /// The error for a request whose fill did not answer in time or at all.
    pub(super) fn fill_wait_failed(&self, e: WaitError) -> ProxyError {
        match e {
            WaitError::TimedOut => {
                ProxyError::UpstreamTimeout(self.fill_deadline().as_millis() as u64)
            }
            // Unavailable: only the fleet lock's readers see it, and they fill instead.
            WaitError::Abandoned | WaitError::Unavailable => {
                ProxyError::Internal("the upstream call for this read was abandoned".into())
            }
        }
    }

    /// How long any request waits for a fill: its own deadline, whoever leads. A fill may
    /// wait for quota budget before its upstream call, so the queue deadline counts too.
    pub(super) fn fill_deadline(&self) -> Duration {
        self.config.upstream.timeout + self.config.quota.queue_timeout + FILL_MARGIN
    }

    fn spawn_fill(
        self: &Arc<Self>,
        permit: Flight<FillResult>,
        call: Call,
        version: &str,
        job: Job,
    ) {
        let gw = self.clone();
        let version = version.to_string();
        tokio::spawn(async move {
            let result = gw.fill(call, &version, job).await;
            gw.cache.flights.release(permit, result).await;
        });
    }

    /// One upstream call for `key`: stores a 2xx reply, renews the stale entry on a 304,
    /// serves the stale entry when Graph fails or throttles, hands anything else on unstored.
    /// With Redis, the shared tier and the other replicas' fills come first (see
    /// [`super::fleet`]).
    async fn fill(&self, mut call: Call, version: &str, job: Job) -> FillResult {
        let Job {
            key,
            ttl,
            mut stale,
            shared,
            projection,
        } = job;
        let key = &key;
        let epoch = self.cache.epoch(key);
        let fleet = match self.before_fill(key, shared, &mut stale, epoch).await {
            FleetStart::Served(fill) => return fill,
            FleetStart::Fetch(f) => f,
        };
        // The client's own validator is answered from our entry; upstream we validate ours.
        call.forwarded.retain(|(n, _)| *n != header::IF_NONE_MATCH);
        if let Some(tag) = stale.as_ref().and_then(|e| e.etag()) {
            call.forwarded.push((header::IF_NONE_MATCH, tag));
        }
        let sie = self.cache.policy.stale_if_error;
        let fallback = |why: u16| {
            stale
                .as_ref()
                .filter(|e| e.usable_on_error(Instant::now(), sie))
                .map(|e| Fill {
                    entry: e.clone(),
                    kind: FillKind::StaleOnError(why),
                    pieces: None,
                    hold: None,
                })
        };
        let reply = match self.forward(&call, version, stale.is_none()).await {
            Ok(r) => r,
            Err(e) => {
                if error_allows_stale(&e) {
                    if let Some(f) = fallback(e.status().as_u16()) {
                        return Ok(f);
                    }
                }
                return Err(e);
            }
        };
        if reply.status == StatusCode::NOT_MODIFIED {
            if let Some(old) = &stale {
                let renewed = Arc::new(old.renewed(ttl));
                let stored = self.cache.store(key, &renewed, epoch);
                self.after_fill(key, &renewed, stored, fleet).await;
                return Ok(Fill {
                    entry: renewed,
                    kind: FillKind::Revalidated,
                    pieces: None,
                    hold: None,
                });
            }
        }
        if !reply.status.is_success() && reply_allows_stale(&reply) {
            if let Some(f) = fallback(reply.status.as_u16()) {
                return Ok(f);
            }
        }
        let prepared = rewrite::prepare(
            reply.body.clone(),
            false,
            &self.public_url,
            &self.tokens.secrets(),
        )?;
        let entry = Arc::new(Entry::new(reply.status, reply.headers, prepared, ttl));
        let kind = if !entry.status.is_success() {
            FillKind::Passed
        } else if self.cache.store(key, &entry, epoch) {
            self.note_projectable(&call, version, key, projection, &entry);
            FillKind::Stored
        } else {
            FillKind::Fetched
        };
        self.after_fill(key, &entry, kind == FillKind::Stored, fleet)
            .await;
        Ok(Fill {
            entry,
            kind,
            pieces: None,
            hold: reply.hold,
        })
    }

    /// Notes a stored node reply in the projection index, and learns from it whether Graph
    /// adds `id` to replies that did not ask for it. Nothing reads either with
    /// `project_fields` off.
    fn note_projectable(
        &self,
        call: &Call,
        version: &str,
        key: &CacheKey,
        projection: Option<(key::KeyId, Fields)>,
        entry: &Entry,
    ) {
        if !self.cache.project_fields {
            return;
        }
        let (base, fields) = match projection {
            Some((base, fields)) => (Some(base), fields),
            None => {
                let Some(fields) = projectable(call) else {
                    return;
                };
                (None, fields)
            }
        };
        self.cache
            .projections
            .id_habit
            .learn_from_entry(&fields, entry);
        let base = base.or_else(|| {
            let identity = self.tokens.identity_for(call.page());
            key::base_of(version, &call.path.segments, &call.params, &identity)
        });
        if let Some(base) = base {
            self.cache.projections.record(base, fields, key.id);
        }
    }

    /// Answers a node read from a fresh stored reply for more fields of the same node (same
    /// version, other parameters and token identity: `base`), and stores the cut-down reply
    /// under the read's own key so the next one is a plain hit. `None` when no stored reply
    /// provably holds it, or a write to the node came in between.
    fn projected_read(
        &self,
        key: &CacheKey,
        want: &Fields,
        base: key::KeyId,
        caller: &Caller<'_>,
        now: Instant,
    ) -> Result<Option<Served>, ProxyError> {
        let Some(entry) = self.project_stored(key, want, base, now)? else {
            return Ok(None);
        };
        self.cache.count(CacheResult::Hit);
        let status = CacheStatus::Projected {
            ttl: entry.ttl_left_s(now),
        };
        Ok(Some(Served {
            response: reply_from(&entry, caller, status, Some(now), Origin::Cached)?,
            cache: status.result(),
            upstream_ms: None,
        }))
    }

    /// Cuts the reply for `want` from a fresh stored reply of the node (`base`) that holds it,
    /// and stores it under `key` (counted as projected). `None` when none does, or a write
    /// to the node came in between.
    pub(super) fn project_stored(
        &self,
        key: &CacheKey,
        want: &Fields,
        base: key::KeyId,
        now: Instant,
    ) -> Result<Option<Arc<Entry>>, ProxyError> {
        let epoch = self.cache.epoch(key);
        for (have, id) in self.cache.projections.covering(base, want) {
            let Some(stored) = self.cache.get_id(id) else {
                continue;
            };
            let policy = &self.cache.policy;
            let fresh = stored.freshness(now, policy.stale_while_revalidate, policy.stale_if_error)
                == Freshness::Fresh;
            if !fresh || !stored.status.is_success() {
                continue;
            }
            let body = stored.body()?;
            let projections = &self.cache.projections;
            let Some(cut) = projection::project(&body, &have, want, &projections.id_habit) else {
                continue;
            };
            // Only what describes the content: the stored reply's ETag is for its own bytes.
            let kept = headers::member_stored(stored.headers.iter());
            let mut entry = Entry::new(stored.status, kept, cut, stored.ttl());
            entry.stored_at = stored.stored_at;
            if !self.cache.store(key, &entry, epoch) {
                return Ok(None);
            }
            self.metrics.cache.projected.inc();
            return Ok(Some(Arc::new(entry)));
        }
        Ok(None)
    }

    /// The reply for one waiter of a fill.
    fn served_from_fill(
        &self,
        fill: &Fill,
        caller: &Caller<'_>,
        fwd: Forward,
        collapsed: bool,
        upstream_ms: Option<u128>,
    ) -> Result<Served, ProxyError> {
        let now = Instant::now();
        let ttl = fill.entry.ttl_left_s(now);
        let fwd_status = fill.entry.status.as_u16();
        let (status, age) = match fill.kind {
            FillKind::StaleOnError(why) => {
                self.metrics.cache.served_stale(StaleReason::Error);
                let status = CacheStatus::StaleIfError {
                    fwd,
                    fwd_status: why,
                    ttl,
                    collapsed,
                };
                (status, Some(now))
            }
            FillKind::L2Hit => (CacheStatus::SharedHit { ttl, collapsed }, Some(now)),
            // Another replica's fill: this request waited for it.
            FillKind::Remote => (
                CacheStatus::SharedHit {
                    ttl,
                    collapsed: true,
                },
                Some(now),
            ),
            FillKind::Revalidated => (
                CacheStatus::Forwarded {
                    fwd,
                    fwd_status: 304,
                    stored: true,
                    collapsed,
                },
                Some(now),
            ),
            FillKind::Stored => (
                CacheStatus::Forwarded {
                    fwd,
                    fwd_status,
                    stored: true,
                    collapsed,
                },
                Some(now),
            ),
            FillKind::Fetched | FillKind::Passed => (
                CacheStatus::Forwarded {
                    fwd,
                    fwd_status,
                    stored: false,
                    collapsed,
                },
                None,
            ),
        };
        Ok(Served {
            response: reply_from(
                &fill.entry,
                caller,
                status,
                age,
                Origin::Fetched(fill.hold.clone()),
            )?,
            cache: status.result(),
            upstream_ms,
        })
    }

    /// After a successful write: drop what it made stale (its node; a post's Page edges).
    pub(super) async fn invalidate_after_write(&self, call: &Call) {
        if let Some(ops) = &call.batch {
            for op in ops.iter().filter(|op| op.method.is_write()) {
                if let Some(node) = op.path.node() {
                    self.cache.invalidate_after_write(node).await;
                }
            }
        } else if call.method.is_write() {
            if let Some(node) = call.path.node() {
                self.cache.invalidate_after_write(node).await;
            }
        }
    }
}

/// What a single-key fill needs to know: the key, its TTL, the stale copy (if any), and
/// whether an entry from the shared tier may answer (not when the client asked to
/// revalidate).
#[derive(Clone)]
pub(super) struct Job {
    pub key: CacheKey,
    pub ttl: Duration,
    pub stale: Option<Arc<Entry>>,
    pub shared: bool,
    /// The node read's key without its fields ([`key::base_of`]) and the fields it asks
    /// Graph for, when the read already has them: the fill notes its reply under them for
    /// projection without building the key or parsing the fields again.
    pub projection: Option<(key::KeyId, Fields)>,
}

/// A node read's own key, its key without fields, and its fields (normalized).
struct NodeKeys {
    key: CacheKey,
    base: key::KeyId,
    fields: Fields,
}

/// A reply merged from several sources (`ids=`, batch) has no single ETag.
pub(super) fn assembled_entry(headers: ReplyHeaders, body: PreparedBody) -> Entry {
    let headers: Vec<_> = headers.iter().filter(|(n, _)| *n != header::ETAG).collect();
    Entry::new(StatusCode::OK, headers, body, Duration::ZERO)
}

/// Transport-level failures worth hiding behind a stale copy.
fn error_allows_stale(e: &ProxyError) -> bool {
    matches!(
        e,
        ProxyError::UpstreamConnect(_)
            | ProxyError::UpstreamTimeout(_)
            | ProxyError::UpstreamBadResponse(_)
            | ProxyError::Throttled { .. }
    )
}

/// Graph replies worth hiding behind a stale copy: 5xx, transient codes 1/2, throttling.
fn reply_allows_stale(reply: &Reply) -> bool {
    if reply.status.is_server_error() {
        return true;
    }
    matches!(
        reply.graph_error().map(|e| e.class()),
        Some(ErrorClass::Transient | ErrorClass::Throttle(_))
    )
}

/// Builds the client's reply from an entry: 304 when the client's validator matches, else
/// the body finalized for this client (a shared `Bytes` unless it carries the
/// key marker). `age_at` adds `Age`.
///
/// A body made for this client alone (decompressed, the key filled in, assembled) is
/// counted against the reply budget until written, as is a fetched body; 503 when it does
/// not fit. A plain cached body costs nothing more to serve: it is shared.
pub(super) fn reply_from(
    entry: &Entry,
    caller: &Caller<'_>,
    status: CacheStatus,
    age_at: Option<Instant>,
    origin: Origin,
) -> Result<Response<Full<Bytes>>, ProxyError> {
    reply_with(entry, None, caller, status, age_at, origin)
}

/// [`reply_from`], its headers started from `kept` when given.
fn reply_with(
    entry: &Entry,
    kept: Option<&KeptHead>,
    caller: &Caller<'_>,
    status: CacheStatus,
    age_at: Option<Instant>,
    origin: Origin,
) -> Result<Response<Full<Bytes>>, ProxyError> {
    let not_modified =
        entry.status.is_success() && entry.matches_if_none_match(caller.if_none_match);
    let body = if not_modified {
        Bytes::new()
    } else {
        let (mut holds, own_copy) = match origin {
            Origin::Cached => (Vec::new(), false),
            Origin::Fetched(hold) => (hold.into_iter().collect(), false),
            Origin::Assembled => (Vec::new(), true),
        };
        if own_copy || entry.is_compressed() || entry.has_key_marker() {
            let own = caller
                .budget
                .reserve(entry.body_len(), Source::Cache)
                .ok_or(ProxyError::Overloaded { retry_after_s: 1 })?;
            holds.push(Arc::new(own));
        }
        reply_budget::held(rewrite::finalize(&entry.body()?, caller.key), holds)
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = if not_modified {
        StatusCode::NOT_MODIFIED
    } else {
        entry.status
    };
    let age = age_at.map(|at| entry.age(at).as_secs());
    *response.headers_mut() = match kept {
        Some(kept) => kept.head_for(entry, status, age),
        None => {
            let mut h = entry_head(entry);
            mark_cached(&mut h, status, age);
            h
        }
    };
    Ok(response)
}

/// Adds what the cache did (`X-Cache`, `Cache-Status`) and the entry's `Age` in seconds.
fn mark_cached(h: &mut HeaderMap, status: CacheStatus, age: Option<u64>) {
    h.insert(X_CACHE, status.x_cache());
    h.insert(CACHE_STATUS, status.header_value());
    if let Some(age) = age {
        h.insert(header::AGE, HeaderValue::from(age));
    }
}

/// The headers every reply made from `entry` starts with: its stored headers and a
/// Content-Type. Sized once for the ones added after it (X-Cache, Cache-Status, Age, the
/// trace and request ids): growing the map was ~2k instructions a hit.
fn entry_head(entry: &Entry) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(entry.headers.len() + 6);
    for (n, v) in entry.headers.iter() {
        h.append(n, v);
    }
    if !h.contains_key(header::CONTENT_TYPE) {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(DEFAULT_CONTENT_TYPE),
        );
    }
    h
}

/// The headers a recalled request's last reply was sent with ([`entry_head`] and
/// [`mark_cached`]), kept with the packed headers, cache status and age they were made
/// from. Building them hashes every name into a new map and renders the status and age,
/// about a sixth of a recalled hit's instructions; the kept map is cloned while all three
/// stay the same (the status and age change once a second), and only the status and age are
/// written again when those change. Its values are copies: it holds no entry's buffer.
#[derive(Default)]
pub(crate) struct KeptHead(std::sync::Mutex<Option<Kept>>);

/// A kept reply head and what it was made from.
struct Kept {
    packed: Box<[u8]>,
    status: CacheStatus,
    age: Option<u64>,
    head: HeaderMap,
}

impl KeptHead {
    fn head_for(&self, entry: &Entry, status: CacheStatus, age: Option<u64>) -> HeaderMap {
        let (Some(packed), Ok(mut kept)) = (entry.headers.packed_bytes(), self.0.lock()) else {
            let mut head = entry_head(entry);
            mark_cached(&mut head, status, age);
            return head;
        };
        if let Some(k) = kept.as_mut().filter(|k| *k.packed == *packed) {
            if k.status != status || k.age != age {
                if k.age.is_some() && age.is_none() {
                    k.head.remove(header::AGE);
                }
                mark_cached(&mut k.head, status, age);
                (k.status, k.age) = (status, age);
            }
            return k.head.clone();
        }
        let mut head = entry_head(entry);
        mark_cached(&mut head, status, age);
        let mut own = HeaderMap::with_capacity(head.capacity());
        for (n, v) in &head {
            match HeaderValue::from_maybe_shared(Bytes::copy_from_slice(v.as_bytes())) {
                Ok(v) => own.append(n.clone(), v),
                Err(_) => return head,
            };
        }
        *kept = Some(Kept {
            packed: packed.into(),
            status,
            age,
            head: own,
        });
        head
    }
}

/// Marks a reply that did not involve the cache (writes, batches, `no-store`, TTL 0).
/// Returns the request's cache label.
pub(super) fn mark_uncached(response: &mut Response<Full<Bytes>>, call: &Call) -> CacheResult {
    let status = CacheStatus::Uncached(if call.method.is_write() || call.batch.is_some() {
        Forward::Method
    } else {
        Forward::Bypass
    });
    let h = response.headers_mut();
    h.insert(X_CACHE, status.x_cache());
    h.insert(CACHE_STATUS, status.header_value());
    status.result()
}

/// The fields of a node read's parameters (an `ids=` read's without `ids`), normalized;
/// `None` without `fields`.
pub(super) fn member_fields(node_params: &crate::graph::request::Params) -> Option<Fields> {
    let fields = Fields::parse(node_params.get("fields")?).ok()?;
    (!fields.is_empty()).then(|| fields.normalized())
}

/// Room a GET URL needs besides the path and parameters: the base URL, the access token and
/// `appsecret_proof`.
const URL_ROOM_FOR_CREDENTIALS: usize = 600;

/// Whether the read with its fields replaced by `union` stays a GET of at most `max_url`
/// bytes (Graph is asked for a union only as a plain GET).
fn union_fits(call: &Call, union: &Fields, max_url: usize) -> bool {
    let mut params = call.params.clone();
    params.set("fields", union.canonical());
    call.path.to_upstream_path().len() + params.encode().len() + URL_ROOM_FOR_CREDENTIALS <= max_url
}

/// The fields of a node read (`GET /{node}?fields=…`): what a stored reply can be projected
/// onto. `None` for edges, `ids=`, batches and reads without `fields`.
fn projectable(call: &Call) -> Option<Fields> {
    if call.path.segments.len() != 1 || !call.ids.is_empty() || call.batch.is_some() {
        return None;
    }
    let fields = Fields::parse(call.params.get("fields")?).ok()?;
    (!fields.is_empty()).then_some(fields)
}
