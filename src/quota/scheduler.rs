//! Admission: per-bucket queues in front of each [`Budget`].
//!
//! Fairness by construction: every bucket (Page or app) has its own queues and, while calls
//! wait, its own pump task that releases them as that bucket's budget allows. Buckets share
//! no queue and no dispatcher, so a 10,000-call backlog on one Page cannot delay another
//! Page's call; the tokio scheduler interleaves the pumps. Within a bucket, waiters are FIFO,
//! interactive clients before batch clients.
//!
//! A call that can go at once (nothing queued, budget available) is admitted inline without
//! touching a task. Waiters hold a oneshot receiver; the pump charges the budget only when the
//! send succeeds, so a waiter that gave up is never charged.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderName, HeaderValue};
use serde_json::{json, Value};
use tokio::sync::{oneshot, Notify};

use super::attribution::{BucketKey, Charge, NodePages};
use super::budget::{Budget, Limits};
use super::shared::{Decision, SharedBudgets};
use crate::config::{Priority, QuotaConfig, RedisConfig};
use crate::error::ProxyError;
use crate::graph::usage::{parse_app_usage, parse_buc_usage, ErrorClass, ThrottleScope, Usage};
use crate::metrics::Metrics;
use crate::redis_conn::RedisConn;
use crate::upstream::Reply;

/// Beyond this many buckets, idle ones are forgotten (they hold nothing worth keeping).
const MAX_BUCKETS: usize = 50_000;
/// Node → Page mappings remembered from usage headers.
const MAX_LEARNED_NODES: usize = 10_000;
/// The pump re-checks at least this often, so no lost wake-up can strand a waiter.
const PUMP_MAX_SLEEP: Duration = Duration::from_millis(500);

/// See [`State::in_flight_cap`].
const ASSUMED_MAX_PCT_PER_CALL: f64 = 10.0;

const INTERACTIVE: usize = 0;
const BATCH: usize = 1;

struct Waiter {
    tx: oneshot::Sender<()>,
    units: u32,
}

struct State {
    budget: Budget,
    queues: [VecDeque<Waiter>; 2],
    /// Units of live waiters per priority (for wait estimates).
    waiting_units: [u32; 2],
    /// Live waiters (a waiter that gave up may still sit in a queue until popped).
    depth: usize,
    in_flight: u32,
    pump_running: bool,
    /// The bucket's configured limits; with Redis configured but unable to decide, the
    /// local budget runs at `redis.local_budget_fraction` of them (see [`State::set_mode`]).
    full_limits: Limits,
}

impl State {
    /// Limits for the decision about to be made: the full budget when Redis decides (the
    /// local budget then only mirrors the fleet), a fraction when this replica decides alone
    /// while sharing is configured, so replicas cut off from Redis together stay near one
    /// budget.
    fn set_mode(&mut self, local_fraction: Option<f64>) {
        self.budget.limits = match local_fraction {
            None => self.full_limits,
            Some(f) => Limits {
                calls: ((f64::from(self.full_limits.calls) * f).floor() as u32).max(1),
                ..self.full_limits
            },
        };
    }

    /// Takes the first live waiter, with its priority.
    fn pop_head(&mut self) -> Option<(usize, Waiter)> {
        self.head()?;
        self.queues
            .iter_mut()
            .enumerate()
            .find_map(|(p, q)| q.pop_front().map(|w| (p, w)))
    }

    /// How many calls may be in flight: usage readings only arrive with replies, so calls
    /// already in flight are calls sent blind. One at a time until the first reading (a new
    /// or resumed bucket probes before it bursts) and above the slowdown threshold; below
    /// it, as many as fit under the threshold if each call moved usage by
    /// [`ASSUMED_MAX_PCT_PER_CALL`] points. Real Page budgets move far less per call, so this
    /// is conservative, and it bounds the overshoot when `page_calls` is set far too high.
    fn in_flight_cap(&self, now: Instant) -> u32 {
        let Some(r) = self.budget.reading(now) else {
            return 1;
        };
        let threshold = self.budget.limits.slowdown_threshold_pct.min(100.0);
        if r.max_pct >= threshold {
            return 1;
        }
        (((threshold - r.max_pct) / ASSUMED_MAX_PCT_PER_CALL).floor() as u32).max(1)
    }

    fn head(&mut self) -> Option<&Waiter> {
        for q in &mut self.queues {
            while q.front().is_some_and(|w| w.tx.is_closed()) {
                q.pop_front();
            }
        }
        self.queues.iter().find_map(|q| q.front())
    }

    fn queued(&self) -> bool {
        self.queues.iter().any(|q| !q.is_empty())
    }

    /// Rebuilds a queue when dead entries pile up behind a live head.
    fn compact(&mut self, max_depth: usize) {
        for q in &mut self.queues {
            if q.len() > max_depth.saturating_mul(2).max(64) {
                q.retain(|w| !w.tx.is_closed());
            }
        }
    }
}

struct Bucket {
    key: BucketKey,
    state: Mutex<State>,
    wake: Notify,
}

impl Bucket {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state inconsistent in a way that
        // matters more than refusing all later calls would.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Static settings derived from `[quota]`.
#[derive(Debug, Clone)]
struct Settings {
    page: Limits,
    app: Limits,
    overrides: HashMap<String, u32>,
    /// Pages with their own metric series (bounded opt-in: those in `[[quota.pages]]`).
    tracked: HashSet<String>,
    queue_timeout: Duration,
    max_queue_depth: usize,
}

struct Inner {
    settings: Settings,
    /// Fleet-wide admission through Redis, when `[redis] url` is set.
    shared: Option<Arc<SharedBudgets>>,
    buckets: Mutex<HashMap<BucketKey, Arc<Bucket>>>,
    learned: Mutex<NodePages>,
    metrics: Arc<Metrics>,
}

/// The quota scheduler: attribution memory, buckets and their queues.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

/// Permission to send one call upstream. Dropping it ends the call's in-flight slot.
pub struct Admission {
    held: Vec<(Arc<Bucket>, u32)>,
    /// Time spent queued.
    pub waited: Duration,
}

impl Drop for Admission {
    fn drop(&mut self) {
        for (b, _) in &self.held {
            let mut st = b.lock();
            st.in_flight = st.in_flight.saturating_sub(1);
            drop(st);
            b.wake.notify_one();
        }
    }
}

/// What a reply taught the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Learned {
    /// Graph answered with a throttle code; the charged buckets are now paused.
    pub throttled: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix(at: Instant, now: Instant) -> u64 {
    let wall = SystemTime::now() + at.saturating_duration_since(now);
    wall.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn ceil_secs(d: Duration) -> u64 {
    (d.as_secs_f64().ceil() as u64).max(1)
}

impl Scheduler {
    pub fn new(cfg: &QuotaConfig, metrics: Arc<Metrics>) -> Scheduler {
        Scheduler::build(cfg, metrics, None)
    }

    /// A scheduler whose admission decisions are made in Redis (shared by every replica)
    /// when `redis` is given, with local budgets at `local_budget_fraction` as the fallback.
    pub fn with_redis(
        cfg: &QuotaConfig,
        metrics: Arc<Metrics>,
        redis: Option<Arc<RedisConn>>,
        redis_cfg: &RedisConfig,
    ) -> Scheduler {
        let shared =
            redis.map(|conn| Arc::new(SharedBudgets::new(conn, redis_cfg.local_budget_fraction)));
        Scheduler::build(cfg, metrics, shared)
    }

    fn build(
        cfg: &QuotaConfig,
        metrics: Arc<Metrics>,
        shared: Option<Arc<SharedBudgets>>,
    ) -> Scheduler {
        let page = Limits {
            calls: cfg.page_calls,
            window: cfg.page_window,
            headroom: f64::from(cfg.headroom_pct) / 100.0,
            slowdown_threshold_pct: f64::from(cfg.slowdown_threshold_pct),
            throttle_backoff: cfg.throttle_backoff,
        };
        let settings = Settings {
            page,
            app: Limits {
                calls: cfg.app_calls,
                ..page
            },
            overrides: cfg.pages.iter().cloned().collect(),
            tracked: cfg.pages.iter().map(|(id, _)| id.clone()).collect(),
            queue_timeout: cfg.queue_timeout,
            max_queue_depth: cfg.max_queue_depth,
        };
        // Listed Pages have their series from the start (0), so alerts and dashboards see
        // them before the first call.
        for page in &settings.tracked {
            metrics.quota_page_paused.with_label_values(&[page]).set(0);
            metrics.quota_page_throttles.with_label_values(&[page]);
            metrics
                .quota_page_queue_depth
                .with_label_values(&[page])
                .set(0);
        }
        let inner = Arc::new(Inner {
            settings,
            shared,
            buckets: Mutex::new(HashMap::new()),
            learned: Mutex::new(NodePages::new(MAX_LEARNED_NODES)),
            metrics: metrics.clone(),
        });
        let weak: Weak<Inner> = Arc::downgrade(&inner);
        metrics.set_quota_refresh(Box::new(move || {
            if let Some(inner) = weak.upgrade() {
                inner.refresh_gauges();
            }
        }));
        Scheduler { inner }
    }

    /// The latest a call may wait: `quota.queue_timeout`, or the client's shorter wish.
    pub fn deadline(&self, max_wait: Option<Duration>) -> Instant {
        let wait = match max_wait {
            Some(w) => w.min(self.inner.settings.queue_timeout),
            None => self.inner.settings.queue_timeout,
        };
        Instant::now() + wait
    }

    /// Charges each call unit to its bucket (see [`super::attribution`]).
    pub fn charge_for(&self, units: &[Option<String>], page_header: Option<&str>) -> Charge {
        super::attribution::charge(units, page_header, &lock(&self.inner.learned))
    }

    /// Waits until every bucket of `charge` admits the call, or fails with
    /// [`ProxyError::Throttled`] when the deadline cannot be met or a queue is full.
    /// Buckets are taken in key order; units taken before a failure are given back.
    pub async fn admit(
        &self,
        charge: &Charge,
        priority: Priority,
        deadline: Instant,
    ) -> Result<Admission, ProxyError> {
        let started = Instant::now();
        let mut admission = Admission {
            held: Vec::with_capacity(charge.0.len()),
            waited: Duration::ZERO,
        };
        let prio = match priority {
            Priority::Interactive => INTERACTIVE,
            Priority::Batch => BATCH,
        };
        let m = &self.inner.metrics;
        for (key, &units) in &charge.0 {
            let bucket = self.inner.bucket(key);
            match self.inner.admit_one(&bucket, units, prio, deadline).await {
                Ok(()) => admission.held.push((bucket, units)),
                Err(e) => {
                    let now = Instant::now();
                    for (b, u) in &admission.held {
                        let interval = {
                            let mut st = b.lock();
                            st.budget.refund(*u, now);
                            st.budget.interval(now)
                        };
                        self.inner.share_refund(&b.key, *u, interval);
                    }
                    m.quota_queue_wait
                        .with_label_values(&["rejected"])
                        .observe(started.elapsed().as_secs_f64());
                    return Err(e);
                }
            }
        }
        admission.waited = started.elapsed();
        m.quota_queue_wait
            .with_label_values(&["admitted"])
            .observe(admission.waited.as_secs_f64());
        for (b, _) in &admission.held {
            m.quota_dispatches
                .with_label_values(&[b.key.policy_name()])
                .inc();
        }
        Ok(admission)
    }

    /// Learns from a reply: usage headers adjust rates (and pause at 100 %), throttle codes
    /// pause the buckets the call was charged to (and the app bucket for app-level codes),
    /// and a single-node call teaches which Page an opaque node id belongs to.
    pub fn learn(&self, admission: &Admission, reply: &Reply, node: Option<&str>) -> Learned {
        let now = Instant::now();
        let inner = &self.inner;
        let mut regain: HashMap<String, Option<f64>> = HashMap::new();
        if let Some(h) = reply.header("x-business-use-case-usage") {
            let mut per_id: HashMap<String, (Usage, Option<f64>)> = HashMap::new();
            for e in parse_buc_usage(h) {
                let slot = per_id.entry(e.business_id).or_default();
                slot.0.call_count = slot.0.call_count.max(e.usage.call_count);
                slot.0.total_time = slot.0.total_time.max(e.usage.total_time);
                slot.0.total_cputime = slot.0.total_cputime.max(e.usage.total_cputime);
                slot.1 = match (slot.1, e.regain_access_minutes) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
            }
            if let (Some(node), 1, [(_, 1)]) =
                (node, per_id.len(), admission.units_per_bucket().as_slice())
            {
                if let Some(id) = per_id.keys().next() {
                    lock(&inner.learned).learn(node, id);
                }
            }
            for (id, (usage, mins)) in per_id {
                if crate::graph::request::page_of_node(&id) != Some(id.as_str()) {
                    continue;
                }
                let b = inner.bucket(&BucketKey::Page(id.clone()));
                inner.observe(&b, now, |bu| bu.observe_usage(usage, mins, now));
                b.wake.notify_one();
                regain.insert(id, mins);
            }
        }
        if let Some(u) = reply.header("x-page-usage").and_then(parse_app_usage) {
            if let [(b, _)] = admission.held.as_slice() {
                if matches!(b.key, BucketKey::Page(_)) {
                    inner.observe(b, now, |bu| bu.observe_usage(u, None, now));
                }
            }
        }
        if let Some(u) = reply.header("x-app-usage").and_then(parse_app_usage) {
            let b = inner.bucket(&BucketKey::App);
            inner.observe(&b, now, |bu| bu.observe_usage(u, None, now));
            b.wake.notify_one();
        }
        let class = reply.graph_error().map(|e| e.class());
        let throttled = matches!(class, Some(ErrorClass::Throttle(_)));
        for (b, _) in &admission.held {
            if throttled {
                let mins = match &b.key {
                    BucketKey::Page(p) => {
                        if inner.settings.tracked.contains(p) {
                            inner
                                .metrics
                                .quota_page_throttles
                                .with_label_values(&[p.as_str()])
                                .inc();
                        }
                        regain.get(p).copied().flatten()
                    }
                    BucketKey::App => None,
                };
                inner.observe(b, now, |bu| bu.observe_throttle(mins, now));
            } else {
                b.lock().budget.observe_ok();
            }
        }
        if let Some(ErrorClass::Throttle(scope)) = class {
            inner
                .metrics
                .quota_throttles
                .with_label_values(&[scope.label()])
                .inc();
            let app_held = admission.held.iter().any(|(b, _)| b.key == BucketKey::App);
            if scope == ThrottleScope::App && !app_held {
                let app = inner.bucket(&BucketKey::App);
                inner.observe(&app, now, |bu| bu.observe_throttle(None, now));
            }
            tracing::warn!(
                buckets = %admission.held.iter().map(|(b, _)| b.key.to_string()).collect::<Vec<_>>().join(","),
                scope = scope.label(),
                "Graph throttled a call; pausing its quota bucket"
            );
        }
        Learned { throttled }
    }

    /// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers) for the most
    /// constrained bucket of a charge.
    pub fn rate_limit_headers(&self, charge: &Charge) -> Vec<(HeaderName, HeaderValue)> {
        let now = Instant::now();
        let mut best: Option<(u32, u32, u64, u64, &'static str)> = None;
        for key in charge.0.keys() {
            let b = self.inner.bucket(key);
            let st = b.lock();
            let q = st.budget.effective_calls(now);
            let r = if st.budget.paused_until(now).is_some() || st.queued() {
                0
            } else {
                q.saturating_sub(st.budget.committed_units(now))
            };
            let t = st.budget.drained_at(now).saturating_duration_since(now);
            let t = if t.is_zero() { 0 } else { ceil_secs(t) };
            let w = st.budget.limits.window.as_secs().max(1);
            if best.is_none_or(|(br, ..)| r < br) {
                best = Some((r, q, w, t, key.policy_name()));
            }
        }
        let Some((r, q, w, t, name)) = best else {
            return Vec::new();
        };
        rate_limit_pair(name, q, w, r, t)
    }

    /// JSON status of every known bucket, busiest first.
    pub fn status(&self) -> Value {
        let now = Instant::now();
        let buckets: Vec<Arc<Bucket>> = lock(&self.inner.buckets).values().cloned().collect();
        let mut rows: Vec<(usize, String, Value)> = buckets
            .iter()
            .map(|b| {
                let st = b.lock();
                let budget = &st.budget;
                let usage = budget.reading(now).map(|r| {
                    json!({
                        "call_count": r.call_count,
                        "total_time": r.total_time,
                        "total_cputime": r.total_cputime,
                        "age_s": now.saturating_duration_since(r.at).as_secs_f64(),
                    })
                });
                let row = json!({
                    "id": b.key.to_string(),
                    "kind": b.key.policy_name(),
                    "budget": {
                        "calls": budget.limits.calls,
                        "window_s": budget.limits.window.as_secs_f64(),
                    },
                    "rate_factor": budget.factor(now),
                    "effective_calls_per_window": budget.effective_calls(now),
                    "usage": usage,
                    "paused_until": budget.paused_until(now).map(|p| unix(p, now)),
                    "queue_depth": st.depth,
                    "in_flight": st.in_flight,
                });
                (st.depth, b.key.to_string(), row)
            })
            .collect();
        rows.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        json!({
            "learned_nodes": lock(&self.inner.learned).len(),
            "pages": rows.into_iter().map(|r| r.2).collect::<Vec<_>>(),
        })
    }
}

impl Admission {
    fn units_per_bucket(&self) -> Vec<(&BucketKey, u32)> {
        self.held.iter().map(|(b, u)| (&b.key, *u)).collect()
    }
}

/// The two IETF RateLimit headers for one policy.
pub fn rate_limit_pair(
    name: &str,
    q: u32,
    w: u64,
    r: u32,
    t: u64,
) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = Vec::with_capacity(2);
    if let Ok(v) = HeaderValue::from_str(&format!("\"{name}\";q={q};w={w}")) {
        out.push((HeaderName::from_static("ratelimit-policy"), v));
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{name}\";r={r};t={t}")) {
        out.push((HeaderName::from_static("ratelimit"), v));
    }
    out
}

impl Inner {
    /// Applies a lesson to a bucket's budget; a pause it starts (or lengthens) is written to
    /// Redis so every replica honours it.
    fn observe(&self, b: &Bucket, now: Instant, f: impl FnOnce(&mut Budget)) {
        let mut st = b.lock();
        let before = st.budget.paused_until(now);
        f(&mut st.budget);
        let after = st.budget.paused_until(now);
        drop(st);
        if let (Some(until), Some(shared)) = (after.filter(|a| Some(*a) != before), &self.shared) {
            let (shared, key) = (shared.clone(), b.key.clone());
            let d = until.saturating_duration_since(now);
            tokio::spawn(async move { shared.pause(&key, d).await });
        }
    }

    /// Gives units back in Redis too (a multi-bucket call that failed part-way).
    fn share_refund(&self, key: &BucketKey, units: u32, interval: Duration) {
        if let Some(shared) = self.shared.clone().filter(|s| s.is_up()) {
            let key = key.clone();
            tokio::spawn(async move { shared.refund(&key, units, interval).await });
        }
    }

    /// The fraction the local budget runs at for this decision: `None` (full budget) without
    /// Redis configured; with it, the configured fraction (Redis could not decide).
    fn local_fraction(&self) -> Option<f64> {
        self.shared.as_ref().map(|s| s.local_fraction)
    }

    fn limits_for(&self, key: &BucketKey) -> Limits {
        match key {
            BucketKey::App => self.settings.app,
            BucketKey::Page(p) => match self.settings.overrides.get(p) {
                Some(&calls) => Limits {
                    calls,
                    ..self.settings.page
                },
                None => self.settings.page,
            },
        }
    }

    fn bucket(&self, key: &BucketKey) -> Arc<Bucket> {
        let mut map = lock(&self.buckets);
        if let Some(b) = map.get(key) {
            return b.clone();
        }
        if map.len() >= MAX_BUCKETS {
            let now = Instant::now();
            map.retain(|_, b| {
                Arc::strong_count(b) > 1 || {
                    let st = b.lock();
                    !(st.budget.is_idle(now) && !st.queued() && st.in_flight == 0)
                }
            });
        }
        let b = Arc::new(Bucket {
            key: key.clone(),
            state: Mutex::new(State {
                budget: Budget::new(self.limits_for(key)),
                queues: [VecDeque::new(), VecDeque::new()],
                waiting_units: [0, 0],
                depth: 0,
                in_flight: 0,
                pump_running: false,
                full_limits: self.limits_for(key),
            }),
            wake: Notify::new(),
        });
        map.insert(key.clone(), b.clone());
        b
    }

    fn throttled(
        &self,
        key: &BucketKey,
        limits: &Limits,
        q: u32,
        wait: Duration,
        queue_full: bool,
    ) -> ProxyError {
        let reason = if queue_full {
            "queue_full"
        } else {
            "queue_timeout"
        };
        self.metrics
            .quota_rejections
            .with_label_values(&[reason])
            .inc();
        ProxyError::Throttled {
            page: key.to_string(),
            retry_after_s: ceil_secs(wait),
            queue_full,
            policy: key.policy_name(),
            limit: q,
            window_s: limits.window.as_secs().max(1),
        }
    }

    async fn admit_one(
        self: &Arc<Self>,
        bucket: &Arc<Bucket>,
        units: u32,
        prio: usize,
        deadline: Instant,
    ) -> Result<(), ProxyError> {
        // With Redis deciding, every call goes through the pump: one admission at a time per
        // bucket keeps the order fair and Redis round trips out of the lock.
        let redis_decides = self.shared.as_ref().is_some_and(|s| s.is_up());
        let rx = {
            let now = Instant::now();
            let mut st = bucket.lock();
            if !redis_decides {
                st.set_mode(self.local_fraction());
            }
            if !redis_decides
                && !st.queued()
                && st.in_flight < st.in_flight_cap(now)
                && st.budget.try_admit(units, now).is_ok()
            {
                st.in_flight += 1;
                if let Some(s) = &self.shared {
                    s.count("local");
                }
                return Ok(());
            }
            // Interactive calls only wait behind interactive ones; batch calls behind all.
            let ahead = match prio {
                INTERACTIVE => st.waiting_units[INTERACTIVE],
                _ => st.waiting_units[INTERACTIVE].saturating_add(st.waiting_units[BATCH]),
            };
            let wait = st.budget.predicted_wait(ahead, units, now);
            let limits = st.budget.limits;
            let q = st.budget.effective_calls(now);
            if now + wait > deadline {
                // Fail fast: waiting could not help, and the estimate is the honest Retry-After.
                return Err(self.throttled(&bucket.key, &limits, q, wait, false));
            }
            if st.depth >= self.settings.max_queue_depth {
                return Err(self.throttled(&bucket.key, &limits, q, wait, true));
            }
            let (tx, rx) = oneshot::channel();
            st.queues[prio].push_back(Waiter { tx, units });
            st.waiting_units[prio] = st.waiting_units[prio].saturating_add(units);
            st.depth += 1;
            st.compact(self.settings.max_queue_depth);
            self.metrics.quota_queue_depth.inc();
            if !st.pump_running {
                st.pump_running = true;
                tokio::spawn(pump(bucket.clone(), self.shared.clone()));
            }
            rx
        };
        bucket.wake.notify_one();
        let _leave = Leave {
            inner: self,
            bucket,
            prio,
            units,
        };
        let mut rx = rx;
        match tokio::time::timeout_at(deadline.into(), &mut rx).await {
            Ok(Ok(())) => Ok(()),
            _ => {
                // The pump may have admitted us just as the deadline passed.
                rx.close();
                if rx.try_recv().is_ok() {
                    return Ok(());
                }
                let now = Instant::now();
                let st = bucket.lock();
                let wait = st
                    .budget
                    .predicted_wait(st.waiting_units[INTERACTIVE], units, now);
                let (limits, q) = (st.budget.limits, st.budget.effective_calls(now));
                drop(st);
                Err(self.throttled(&bucket.key, &limits, q, wait, false))
            }
        }
    }

    /// Updates the gauges that depend on time (paused buckets, usage) before a scrape.
    fn refresh_gauges(&self) {
        let now = Instant::now();
        let buckets: Vec<Arc<Bucket>> = lock(&self.buckets).values().cloned().collect();
        let mut paused = 0;
        let m = &self.metrics;
        for b in buckets {
            let st = b.lock();
            let is_paused = st.budget.paused_until(now).is_some();
            if is_paused {
                paused += 1;
            }
            let reading = st.budget.reading(now);
            let pcts = |r: Option<super::budget::Reading>| {
                r.map_or([0.0; 3], |r| [r.call_count, r.total_time, r.total_cputime])
            };
            match &b.key {
                BucketKey::App => {
                    for (k, v) in ["call_count", "total_time", "total_cputime"]
                        .iter()
                        .zip(pcts(reading))
                    {
                        m.quota_app_usage.with_label_values(&[k]).set(v);
                    }
                }
                BucketKey::Page(p) if self.settings.tracked.contains(p) => {
                    for (k, v) in ["call_count", "total_time", "total_cputime"]
                        .iter()
                        .zip(pcts(reading))
                    {
                        m.quota_page_usage
                            .with_label_values(&[p.as_str(), k])
                            .set(v);
                    }
                    m.quota_page_queue_depth
                        .with_label_values(&[p])
                        .set(st.depth as i64);
                    m.quota_page_rate_factor
                        .with_label_values(&[p])
                        .set(st.budget.factor(now));
                    m.quota_page_paused
                        .with_label_values(&[p])
                        .set(i64::from(is_paused));
                }
                BucketKey::Page(_) => {}
            }
        }
        m.quota_paused_buckets.set(paused);
    }
}

/// A waiter leaving its queue (admitted or not): keeps depth counts right and lets the pump
/// look at the next head.
struct Leave<'a> {
    inner: &'a Inner,
    bucket: &'a Bucket,
    prio: usize,
    units: u32,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        let mut st = self.bucket.lock();
        st.depth = st.depth.saturating_sub(1);
        st.waiting_units[self.prio] = st.waiting_units[self.prio].saturating_sub(self.units);
        drop(st);
        self.inner.metrics.quota_queue_depth.dec();
        self.bucket.wake.notify_one();
    }
}

/// What the pump does next.
enum Step {
    Sleep(Instant),
    /// Ask Redis about this waiter (popped; put back at the front if it must wait).
    AskRedis {
        prio: usize,
        waiter: Waiter,
        interval: Duration,
        tolerance: Duration,
    },
}

/// Releases a bucket's waiters as its budget allows; exits when the queues are empty. With
/// Redis up, each release is a shared decision ([`SharedBudgets::admit`]); otherwise (or
/// when one Redis call fails) the local budget decides, at the configured fraction when
/// sharing is configured.
async fn pump(bucket: Arc<Bucket>, shared: Option<Arc<SharedBudgets>>) {
    let fraction = shared.as_ref().map(|s| s.local_fraction);
    let mut force_local = false;
    loop {
        let step = {
            let now = Instant::now();
            let mut st = bucket.lock();
            let Some(units) = st.head().map(|w| w.units) else {
                st.pump_running = false;
                return;
            };
            let remote = shared.as_ref().is_some_and(|s| s.is_up()) && !force_local;
            st.set_mode(if remote { None } else { fraction });
            if st.in_flight >= st.in_flight_cap(now) {
                // Woken when a call in flight finishes.
                Step::Sleep(now + PUMP_MAX_SLEEP)
            } else if let Some(p) = st.budget.paused_until(now).filter(|_| remote) {
                // A pause already known (from Redis or learned here): no need to ask.
                Step::Sleep(p.min(now + PUMP_MAX_SLEEP))
            } else if remote {
                let interval = st.budget.interval(now);
                let tolerance = interval * st.budget.limits.burst();
                match st.pop_head() {
                    Some((prio, waiter)) => Step::AskRedis {
                        prio,
                        waiter,
                        interval,
                        tolerance,
                    },
                    None => continue,
                }
            } else {
                force_local = false;
                match st.budget.earliest(units, now) {
                    at if at <= now => {
                        let Some((_, w)) = st.pop_head() else {
                            continue;
                        };
                        if w.tx.send(()).is_ok() {
                            // Cannot fail: `earliest` said now.
                            let _ = st.budget.try_admit(w.units, now);
                            st.in_flight += 1;
                            if let Some(s) = &shared {
                                s.count("local");
                            }
                        }
                        continue;
                    }
                    at => Step::Sleep(at.min(now + PUMP_MAX_SLEEP)),
                }
            }
        };
        let sleep_until = match step {
            Step::Sleep(at) => at,
            Step::AskRedis {
                prio,
                waiter,
                interval,
                tolerance,
            } => {
                let Some(s) = &shared else { continue };
                let decision = s
                    .admit(&bucket.key, waiter.units, interval, tolerance)
                    .await;
                let now = Instant::now();
                let mut st = bucket.lock();
                match decision {
                    Some(Decision::Granted { ahead }) => {
                        st.budget.mirror_shared(ahead, Duration::ZERO, now);
                        if waiter.tx.send(()).is_ok() {
                            st.in_flight += 1;
                            s.count("redis");
                        } else {
                            // The waiter gave up while Redis decided: give the units back.
                            let (s, key, units) = (s.clone(), bucket.key.clone(), waiter.units);
                            tokio::spawn(async move { s.refund(&key, units, interval).await });
                        }
                        continue;
                    }
                    Some(Decision::Wait {
                        wait,
                        ahead,
                        paused,
                    }) => {
                        st.budget.mirror_shared(ahead, paused, now);
                        st.queues[prio].push_front(waiter);
                        now + wait.min(PUMP_MAX_SLEEP)
                    }
                    None => {
                        // Redis could not decide this once: the local budget decides next.
                        st.queues[prio].push_front(waiter);
                        force_local = true;
                        continue;
                    }
                }
            }
        };
        tokio::select! {
            _ = tokio::time::sleep_until(sleep_until.into()) => {}
            _ = bucket.wake.notified() => {}
        }
    }
}
