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
use crate::config::{Priority, QuotaConfig};
use crate::error::ProxyError;
use crate::graph::usage::{parse_app_usage, parse_buc_usage, ErrorClass, ThrottleScope, Usage};
use crate::metrics::Metrics;
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
}

impl State {
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
                        b.lock().budget.refund(*u, now);
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
                b.lock().budget.observe_usage(usage, mins, now);
                b.wake.notify_one();
                regain.insert(id, mins);
            }
        }
        if let Some(u) = reply.header("x-page-usage").and_then(parse_app_usage) {
            if let [(b, _)] = admission.held.as_slice() {
                if matches!(b.key, BucketKey::Page(_)) {
                    b.lock().budget.observe_usage(u, None, now);
                }
            }
        }
        if let Some(u) = reply.header("x-app-usage").and_then(parse_app_usage) {
            let b = inner.bucket(&BucketKey::App);
            b.lock().budget.observe_usage(u, None, now);
            b.wake.notify_one();
        }
        let class = reply.graph_error().map(|e| e.class());
        let throttled = matches!(class, Some(ErrorClass::Throttle(_)));
        for (b, _) in &admission.held {
            let mut st = b.lock();
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
                st.budget.observe_throttle(mins, now);
            } else {
                st.budget.observe_ok();
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
                inner
                    .bucket(&BucketKey::App)
                    .lock()
                    .budget
                    .observe_throttle(None, now);
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
        let rx = {
            let now = Instant::now();
            let mut st = bucket.lock();
            if !st.queued()
                && st.in_flight < st.in_flight_cap(now)
                && st.budget.try_admit(units, now).is_ok()
            {
                st.in_flight += 1;
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
                tokio::spawn(pump(bucket.clone()));
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

/// Releases a bucket's waiters as its budget allows; exits when the queues are empty.
async fn pump(bucket: Arc<Bucket>) {
    loop {
        let sleep_until = {
            let now = Instant::now();
            let mut st = bucket.lock();
            let Some(units) = st.head().map(|w| w.units) else {
                st.pump_running = false;
                return;
            };
            if st.in_flight >= st.in_flight_cap(now) {
                // Woken when a call in flight finishes.
                now + PUMP_MAX_SLEEP
            } else {
                match st.budget.earliest(units, now) {
                    at if at <= now => {
                        let Some(w) = st.queues.iter_mut().find_map(|q| q.pop_front()) else {
                            continue;
                        };
                        if w.tx.send(()).is_ok() {
                            // Cannot fail: `earliest` said now.
                            let _ = st.budget.try_admit(w.units, now);
                            st.in_flight += 1;
                        }
                        continue;
                    }
                    at => at.min(now + PUMP_MAX_SLEEP),
                }
            }
        };
        tokio::select! {
            _ = tokio::time::sleep_until(sleep_until.into()) => {}
            _ = bucket.wake.notified() => {}
        }
    }
}
