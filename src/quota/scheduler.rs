//! Admission: per-bucket queues in front of each [`Budget`], the app gate, and what the
//! scheduler shows (status, RateLimit headers, per-Page series).
//!
//! Fairness by construction: every bucket (Page or app) has its own queues and, while calls
//! wait, its own pump task that releases them as that bucket's budget allows. Buckets share
//! no queue and no dispatcher, so a 10,000-call backlog on one Page cannot delay another
//! Page's call. Within a bucket, waiters are FIFO, interactive clients before batch clients.
//!
//! A call that may go at once (nothing queued, the budget says yes) is admitted inline without
//! touching a task. Waiters hold a oneshot receiver; the pump charges the budget only when
//! the send succeeds, so a waiter that gave up is never charged.
//!
//! The app gate: Graph's app-level throttles (codes 4, 341, and 17 and 613, which are not
//! tied to one Page either) stop every call, whatever bucket it is charged to, until the
//! pause is over and one probe call came back unthrottled.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderName, HeaderValue};
use serde_json::{json, Value};
use tokio::sync::{oneshot, Notify};

use super::attribution::{BucketKey, Charge, NodePages};
use super::budget::{Budget, Estimate, Hold, Limits, Observation, Reason, Ticket};
use super::shared::{FleetParams, FleetTicket, SharedBudgets};
use super::table::Table;
use crate::config::{Priority, QuotaConfig, RedisConfig};
use crate::error::{rate_limit_pair, ProxyError};
use crate::graph::usage::{
    parse_app_usage_shared, parse_buc_usage_shared, ErrorClass, ReplyView, ThrottleScope, Usage,
};
use crate::metrics::{AdmissionSource, Metrics, QueueWait, QuotaRejection};
use crate::redis_conn::RedisConn;

/// Node → Page mappings remembered from usage headers.
const MAX_LEARNED_NODES: usize = 10_000;
/// The pump re-checks at least this often, so no lost wake-up can strand a waiter.
const PUMP_MAX_SLEEP: Duration = Duration::from_millis(500);
/// Rows of `/admin/pages` (busiest first; listed Pages always).
const STATUS_ROWS: usize = 500;
/// A fleet decision older than this no longer describes the bucket.
const FLEET_VIEW_TTL: Duration = Duration::from_secs(2);

const INTERACTIVE: usize = 0;
const BATCH: usize = 1;

/// What a waiter is handed when admitted.
struct Granted {
    ticket: Ticket,
    fleet: Option<FleetTicket>,
    gate_probe: bool,
}

struct Waiter {
    tx: oneshot::Sender<Granted>,
    units: u32,
    /// An earlier bucket of the same call already passed the app gate (or took its probe).
    gate_held: bool,
}

/// The fleet's view of a bucket from the last Redis decision.
#[derive(Debug, Clone, Copy)]
struct FleetView {
    at: Instant,
    usage_pct: f64,
    limit: f64,
    count: u32,
    paused_until: Option<Instant>,
    /// From a hold: when the fleet's oldest counted calls start leaving the window.
    releases_at: Option<Instant>,
}

impl FleetView {
    /// How long `needed` units would wait by the fleet's last answer, as
    /// [`Budget::predicted_wait`] reckons for one replica; `None` where the Page has no room
    /// for them (the wait then depends on which calls leave when, which only the budget
    /// models).
    fn predicted_wait(&self, limits: &Limits, needed: u32, now: Instant) -> Option<Duration> {
        if let Some(p) = self.paused_until.filter(|&p| p > now) {
            return Some(p - now);
        }
        let horizon = self.releases_at.map(|t| t.saturating_duration_since(now));
        limits.paced_wait(
            self.usage_pct,
            100.0 / self.limit.max(1e-3),
            needed,
            horizon,
        )
    }
}

struct State {
    budget: Budget,
    queues: [VecDeque<Waiter>; 2],
    /// Units of live waiters per priority (for wait estimates).
    waiting_units: [u32; 2],
    /// Live waiters (a waiter that gave up may still sit in a queue until popped).
    depth: usize,
    pump_running: bool,
    /// The pump is asking Redis about a popped waiter: new calls queue behind it.
    asking: bool,
    /// Why the head waiter waits, as last decided.
    hold: Option<Hold>,
    fleet: Option<FleetView>,
}

impl State {
    /// Takes the first live waiter, with its priority.
    fn pop_head(&mut self) -> Option<(usize, Waiter)> {
        self.head()?;
        self.queues
            .iter_mut()
            .enumerate()
            .find_map(|(p, q)| q.pop_front().map(|w| (p, w)))
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
        self.asking || self.queues.iter().any(|q| !q.is_empty())
    }

    /// Rebuilds a queue when dead entries pile up behind a live head.
    fn compact(&mut self, max_depth: usize) {
        for q in &mut self.queues {
            if q.len() > max_depth.saturating_mul(2).max(64) {
                q.retain(|w| !w.tx.is_closed());
            }
        }
    }

    fn fleet(&self, now: Instant) -> Option<FleetView> {
        self.fleet
            .filter(|f| now.saturating_duration_since(f.at) < FLEET_VIEW_TTL)
    }
}

struct Bucket {
    key: BucketKey,
    params: FleetParams,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GateProbe {
    Off,
    Due,
    InFlight,
}

#[derive(Debug)]
struct GateState {
    paused_until: Option<Instant>,
    paused_at: Option<Instant>,
    throttles: u32,
    probe: GateProbe,
}

/// Stops every call while Graph throttles the app.
struct AppGate {
    /// Fast path: false while nothing is paused or probing.
    closed: AtomicBool,
    state: Mutex<GateState>,
    opened: Notify,
    window: Duration,
    headroom_pct: f64,
}

impl AppGate {
    fn new(window: Duration, headroom_pct: f64) -> AppGate {
        AppGate {
            closed: AtomicBool::new(false),
            state: Mutex::new(GateState {
                paused_until: None,
                paused_at: None,
                throttles: 0,
                probe: GateProbe::Off,
            }),
            opened: Notify::new(),
            window,
            headroom_pct,
        }
    }

    /// `Ok(true)`: the call would be the gate's probe (take it with [`AppGate::take_probe`]).
    fn check(&self, now: Instant) -> Result<bool, Hold> {
        if !self.closed.load(Ordering::Acquire) {
            return Ok(false);
        }
        let mut g = lock(&self.state);
        if let Some(until) = g.paused_until.filter(|t| *t > now) {
            return Err(Hold {
                until,
                reason: Reason::AppPaused,
            });
        }
        match g.probe {
            GateProbe::Due => Ok(true),
            GateProbe::InFlight => Err(Hold {
                until: now + Duration::from_millis(100),
                reason: Reason::AppPaused,
            }),
            GateProbe::Off => {
                g.paused_until = None;
                self.closed.store(false, Ordering::Release);
                Ok(false)
            }
        }
    }

    fn take_probe(&self) -> bool {
        let mut g = lock(&self.state);
        if g.probe == GateProbe::Due {
            g.probe = GateProbe::InFlight;
            return true;
        }
        false
    }

    /// An app-level throttle: pause until usage has probably drained below the ceiling
    /// (the app window's headroom share of it), doubling while probes are throttled.
    fn throttle(&self, dispatched_at: Instant, was_probe: bool, now: Instant) -> Instant {
        let mut g = lock(&self.state);
        if was_probe || g.paused_at.is_none_or(|p| dispatched_at >= p) {
            g.throttles = g.throttles.saturating_add(1);
        }
        let base = self
            .window
            .mul_f64(self.headroom_pct.clamp(0.0, 50.0) / 100.0)
            .max(self.window / super::window::SLOTS);
        let pause = base
            .saturating_mul(1 << g.throttles.saturating_sub(1).min(8))
            .min(self.window);
        let until = g.paused_until.map_or(now + pause, |p| p.max(now + pause));
        g.paused_until = Some(until);
        g.paused_at = Some(now);
        g.probe = GateProbe::Due;
        self.closed.store(true, Ordering::Release);
        until
    }

    /// Another replica saw the app throttled (through Redis).
    fn mirror(&self, until: Instant, now: Instant) {
        let mut g = lock(&self.state);
        if until > now && g.paused_until.is_none_or(|p| p < until) {
            g.paused_until = Some(until);
            g.paused_at = Some(now);
            g.probe = GateProbe::Due;
            self.closed.store(true, Ordering::Release);
        }
    }

    /// The gate's probe came back without an app-level throttle.
    fn answered(&self) {
        let mut g = lock(&self.state);
        if g.probe == GateProbe::InFlight {
            g.probe = GateProbe::Off;
            g.throttles = 0;
            g.paused_until = None;
            self.closed.store(false, Ordering::Release);
            drop(g);
            self.opened.notify_waiters();
        }
    }

    fn probe_lost(&self) {
        let mut g = lock(&self.state);
        if g.probe == GateProbe::InFlight {
            g.probe = GateProbe::Due;
        }
    }

    fn paused_until(&self, now: Instant) -> Option<Instant> {
        if !self.closed.load(Ordering::Acquire) {
            return None;
        }
        lock(&self.state).paused_until.filter(|t| *t > now)
    }
}

/// Static settings derived from `[quota]`.
#[derive(Debug, Clone)]
struct Settings {
    page: Limits,
    app: Limits,
    overrides: HashMap<String, u32>,
    /// Pages listed in `[[quota.pages]]`: per-Page series always.
    listed: HashSet<String>,
    queue_timeout: Duration,
    max_queue_depth: usize,
    /// Per-Page series for this many of the busiest Pages besides the listed ones.
    top_pages: usize,
}

struct Inner {
    settings: Settings,
    /// Fleet-wide admission through Redis, when `[redis] url` is set.
    shared: Option<Arc<SharedBudgets>>,
    table: Table<Bucket>,
    gate: AppGate,
    learned: Mutex<NodePages>,
    metrics: Arc<Metrics>,
    /// Pages with per-Page series at the last scrape.
    exported: Mutex<HashSet<String>>,
}

/// The quota scheduler: attribution memory, buckets and their queues.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

struct Held {
    bucket: Arc<Bucket>,
    ticket: Ticket,
    fleet: Option<FleetTicket>,
    /// A reply was learned from (else dropping the admission tells the budget the call had
    /// no verdict).
    concluded: AtomicBool,
}

/// Permission to send one call upstream. Dropping it ends the call's in-flight slot.
pub struct Admission {
    held: Vec<Held>,
    gate_probe: bool,
    gate_concluded: AtomicBool,
    inner: Arc<Inner>,
    /// Time spent queued.
    pub waited: Duration,
}

impl Drop for Admission {
    fn drop(&mut self) {
        for h in &self.held {
            let mut st = h.bucket.lock();
            st.budget.finish(&h.ticket, Instant::now());
            drop(st);
            if !h.concluded.load(Ordering::Relaxed) {
                // The fleet learns that the call is over: it leaves the fleet's group, and a
                // probe or blind call frees its slot.
                if let (Some(f), Some(s)) = (h.fleet, self.inner.shared.clone()) {
                    let (key, params) = (h.bucket.key.clone(), h.bucket.params);
                    spawn(async move { s.finish_without_verdict(&key, f, params).await });
                }
            }
            h.bucket.wake.notify_one();
        }
        if self.gate_probe && !self.gate_concluded.load(Ordering::Relaxed) {
            self.inner.gate.probe_lost();
        }
    }
}

/// What a reply taught the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Learned {
    /// Graph answered with a throttle code; the buckets (or the app) are now paused.
    pub throttled: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Fleet bookkeeping runs beside the request; without a runtime (never on the request path)
/// it is skipped.
fn spawn(f: impl std::future::Future<Output = ()> + Send + 'static) {
    if let Ok(h) = tokio::runtime::Handle::try_current() {
        h.spawn(f);
    }
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
    /// when `redis` is given; while Redis cannot decide, each replica decides alone on its
    /// share of every budget.
    pub fn with_redis(
        cfg: &QuotaConfig,
        metrics: Arc<Metrics>,
        redis: Option<Arc<RedisConn>>,
        redis_cfg: &RedisConfig,
    ) -> Scheduler {
        let shared = redis.map(|conn| SharedBudgets::new(conn, redis_cfg.local_budget_fraction));
        Scheduler::build(cfg, metrics, shared)
    }

    fn build(
        cfg: &QuotaConfig,
        metrics: Arc<Metrics>,
        shared: Option<Arc<SharedBudgets>>,
    ) -> Scheduler {
        let page = Limits {
            guess: cfg.page_calls,
            window: cfg.page_window,
            headroom_pct: f64::from(cfg.headroom_pct),
            threshold_pct: f64::from(cfg.slowdown_threshold_pct),
            learn: cfg.learn_limits,
        };
        let settings = Settings {
            page,
            app: Limits {
                guess: cfg.app_calls,
                ..page
            },
            overrides: cfg.pages.iter().cloned().collect(),
            listed: cfg.pages.iter().map(|(id, _)| id.clone()).collect(),
            queue_timeout: cfg.queue_timeout,
            max_queue_depth: cfg.max_queue_depth,
            top_pages: cfg.metrics_top_pages,
        };
        // Listed Pages have their series from the start (0), so alerts and dashboards see
        // them before the first call.
        for p in &settings.listed {
            let m = &metrics;
            m.quota.page_paused.with_label_values(&[p]).set(0);
            m.quota.page_throttles.with_label_values(&[p]);
            m.quota.page_queue_depth.with_label_values(&[p]).set(0);
            m.quota.page_usage_ratio.with_label_values(&[p]).set(0.0);
            m.quota.page_calls_in_window.with_label_values(&[p]).set(0);
        }
        let inner = Arc::new(Inner {
            gate: AppGate::new(page.window, page.headroom_pct),
            table: Table::new(cfg.max_buckets),
            settings,
            shared,
            learned: Mutex::new(NodePages::new(MAX_LEARNED_NODES)),
            metrics: metrics.clone(),
            exported: Mutex::new(HashSet::new()),
        });
        let weak: Weak<Inner> = Arc::downgrade(&inner);
        metrics.quota.set_refresh(Box::new(move || {
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
            gate_probe: false,
            gate_concluded: AtomicBool::new(false),
            inner: self.inner.clone(),
            waited: Duration::ZERO,
        };
        let prio = match priority {
            Priority::Interactive => INTERACTIVE,
            Priority::Batch => BATCH,
        };
        let m = &self.inner.metrics;
        for (key, &units) in &charge.0 {
            let bucket = self.inner.bucket(key);
            // The app gate is passed once per call: a call spanning Pages that took the gate's
            // probe for its first bucket must not wait on that same probe for the next.
            let gate_held = !admission.held.is_empty();
            match self
                .inner
                .admit_one(&bucket, units, prio, deadline, gate_held)
                .await
            {
                Ok(g) => {
                    admission.gate_probe |= g.gate_probe;
                    admission.held.push(Held {
                        bucket,
                        ticket: g.ticket,
                        fleet: g.fleet,
                        concluded: AtomicBool::new(false),
                    });
                }
                Err(e) => {
                    for h in std::mem::take(&mut admission.held) {
                        h.bucket.lock().budget.refund(&h.ticket);
                        if let Some(f) = h.fleet {
                            self.inner.share_refund(&h.bucket, f);
                        }
                        h.bucket.wake.notify_one();
                    }
                    m.quota
                        .waited(QueueWait::Rejected, started.elapsed().as_secs_f64());
                    return Err(e);
                }
            }
        }
        admission.waited = started.elapsed();
        m.quota
            .waited(QueueWait::Admitted, admission.waited.as_secs_f64());
        for h in &admission.held {
            m.quota
                .dispatches
                .with_label_values(&[h.bucket.key.policy_name()])
                .inc();
        }
        Ok(admission)
    }

    /// Learns from a reply: usage readings, throttle codes (the charged Pages pause; an
    /// app-level code closes the app gate for every call), and which Page an opaque node id
    /// belongs to.
    pub fn learn(
        &self,
        admission: &Admission,
        reply: ReplyView<'_>,
        node: Option<&str>,
    ) -> Learned {
        let now = Instant::now();
        let inner = &self.inner;
        let graph_error = reply.graph_error();
        let success = reply.is_success();
        let answered = success || graph_error.is_some();
        let scope = match graph_error.as_ref().map(|e| e.class()) {
            Some(ErrorClass::Throttle(scope)) => Some(scope),
            _ => None,
        };
        let page_throttle = matches!(scope, Some(ThrottleScope::Page | ThrottleScope::OtherBuc));
        let app_wide = matches!(
            scope,
            Some(ThrottleScope::App | ThrottleScope::User | ThrottleScope::Custom)
        );

        let buc = reply
            .header("x-business-use-case-usage")
            .map(parse_buc_usage_shared);
        let mut per_id: HashMap<&str, (Usage, Option<f64>)> = HashMap::new();
        if let Some(buc) = &buc {
            for e in buc.iter() {
                let slot = per_id.entry(e.business_id.as_str()).or_default();
                slot.0.call_count = slot.0.call_count.max(e.usage.call_count);
                slot.0.total_time = slot.0.total_time.max(e.usage.total_time);
                slot.0.total_cputime = slot.0.total_cputime.max(e.usage.total_cputime);
                slot.1 = match (slot.1, e.regain_access_minutes) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
            }
            if let (Some(node), 1, [h]) = (node, per_id.len(), admission.held.as_slice()) {
                if let (Some(id), 1) = (per_id.keys().next(), h.ticket.units) {
                    lock(&inner.learned).learn(node, id);
                }
            }
        }
        let single_page = admission.held.len() == 1;
        let page_usage = reply
            .header("x-page-usage")
            .and_then(parse_app_usage_shared);
        let mut app_usage = reply.header("x-app-usage").and_then(parse_app_usage_shared);
        // Meta leaves the usage headers out when usage is about 0.
        let zero = success.then(Usage::default);

        for h in &admission.held {
            let (usage, regain, throttled) = match &h.bucket.key {
                BucketKey::Page(p) => match per_id.remove(p.as_str()) {
                    Some((u, r)) => (Some(u), r, page_throttle),
                    None => (
                        page_usage.filter(|_| single_page).or(zero),
                        None,
                        page_throttle,
                    ),
                },
                BucketKey::App => (app_usage.take().or(zero), None, false),
            };
            let obs = Observation {
                usage,
                regain_minutes: regain,
                throttled,
                answered,
            };
            inner.observe(&h.bucket, Some(h), &obs, now);
            if tracing::enabled!(tracing::Level::DEBUG) {
                let mut st = h.bucket.lock();
                let est = st.budget.estimate(now);
                let paused = st.budget.paused_until(now).map(|p| p - now);
                tracing::debug!(bucket = %h.bucket.key, ?obs, ticket = ?h.ticket, ?est, ?paused, "quota reading");
            }
            h.concluded.store(true, Ordering::Relaxed);
            if throttled {
                inner.count_page_throttle(&h.bucket.key);
            }
        }
        // Readings about buckets this call was not charged to.
        for (id, (usage, regain)) in per_id {
            if crate::graph::request::page_of_node(id) != Some(id) {
                continue;
            }
            let b = inner.bucket(&BucketKey::Page(id.to_string()));
            let obs = Observation {
                usage: Some(usage),
                regain_minutes: regain,
                throttled: false,
                answered,
            };
            inner.observe(&b, None, &obs, now);
        }
        if let Some(u) = app_usage {
            let b = inner.bucket(&BucketKey::App);
            let obs = Observation {
                usage: Some(u),
                answered,
                ..Observation::default()
            };
            inner.observe(&b, None, &obs, now);
        }

        if app_wide {
            let dispatched = admission
                .held
                .iter()
                .map(|h| h.ticket.at)
                .min()
                .unwrap_or(now);
            let until = inner.gate.throttle(dispatched, admission.gate_probe, now);
            admission.gate_concluded.store(true, Ordering::Relaxed);
            if let Some(s) = inner.shared.clone().filter(|s| s.is_up()) {
                let d = until.saturating_duration_since(now);
                spawn(async move { s.pause_app(d).await });
            }
        } else if answered && admission.gate_probe {
            inner.gate.answered();
            admission.gate_concluded.store(true, Ordering::Relaxed);
        }
        if let Some(scope) = scope {
            inner
                .metrics
                .quota
                .throttles
                .with_label_values(&[scope.label()])
                .inc();
            tracing::warn!(
                buckets = %admission.held.iter().map(|h| h.bucket.key.to_string()).collect::<Vec<_>>().join(","),
                scope = scope.label(),
                "Graph throttled a call; pausing {}",
                if app_wide { "every call (app-level limit)" } else { "its quota bucket" }
            );
        }
        Learned {
            throttled: scope.is_some(),
        }
    }

    /// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers) for the most
    /// constrained bucket of a charge.
    pub fn rate_limit_headers(&self, charge: &Charge) -> Vec<(HeaderName, HeaderValue)> {
        let now = Instant::now();
        let mut best: Option<(u32, u32, u64, u64, &'static str)> = None;
        for key in charge.0.keys() {
            let Some(b) = self.inner.table.get(key) else {
                continue;
            };
            let mut st = b.lock();
            let ceiling = st.budget.limits.ceiling_pct();
            let (usage, limit, _) = self.inner.shown(&mut st, now);
            let q = ((limit * ceiling / 100.0).floor() as u32).max(1);
            let paused = st.budget.paused_until(now).is_some()
                || self.inner.gate.paused_until(now).is_some();
            let r = if paused || st.queued() {
                0
            } else {
                ((ceiling - usage) * limit / 100.0).max(0.0).floor() as u32
            };
            let t = st
                .budget
                .next_release_at(now)
                .map_or(0, |at| ceil_secs(at.saturating_duration_since(now)));
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

    /// JSON status of the busiest buckets (and every listed Page): the estimate, the limit
    /// and where it comes from, and why a call waits.
    pub fn status(&self) -> Value {
        self.status_of(STATUS_ROWS)
    }

    /// [`Scheduler::status`] with at most `limit` of the busiest buckets (listed Pages
    /// always), busiest first.
    pub fn status_of(&self, limit: usize) -> Value {
        let now = Instant::now();
        let inner = &self.inner;
        let all = inner.table.snapshot();
        let total = all.len();
        let mut rows: Vec<(u32, usize, String, Arc<Bucket>)> = all
            .into_iter()
            .map(|b| {
                let (calls, depth) = {
                    let mut st = b.lock();
                    (st.budget.estimate(now).calls_in_window, st.depth)
                };
                (calls, depth, b.key.to_string(), b)
            })
            .collect();
        rows.sort_by(|a, b| (b.1, b.0).cmp(&(a.1, a.0)).then_with(|| a.2.cmp(&b.2)));
        let gate_paused = inner.gate.paused_until(now);
        let pages: Vec<Value> = rows
            .iter()
            .enumerate()
            .filter(|(i, r)| *i < limit || inner.settings.listed.contains(&r.2))
            .map(|(_, (_, _, _, b))| inner.status_row(b, gate_paused, now))
            .collect();
        json!({
            "buckets": total,
            "app_paused_until": gate_paused.map(|p| unix(p, now)),
            "decided_by": match &inner.shared {
                Some(s) if s.is_up() => "redis",
                _ => "local",
            },
            "local_share": inner.local_share(),
            "learned_nodes": lock(&inner.learned).len(),
            "pages": pages,
        })
    }

    /// The fleet-wide state Redis holds for each bucket named as in [`Scheduler::status`]
    /// (`app` or a Page id), in order. `None` without Redis or when Redis cannot answer.
    pub async fn shared_status(&self, ids: &[String]) -> Option<Vec<Value>> {
        let shared = self.inner.shared.as_ref()?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let key = if id == "app" {
                BucketKey::App
            } else {
                BucketKey::Page(id.clone())
            };
            let params = FleetParams::from(self.inner.limits_for(&key));
            let p = shared.peek(&key, params).await?;
            out.push(json!({
                "calls_in_window": p.calls_in_window,
                "usage": rounded(p.usage_pct / 100.0, 4),
                "limit": rounded(p.limit, 1),
                "paused_s": rounded(p.paused.as_secs_f64(), 3),
                "known": p.exists,
            }));
        }
        Some(out)
    }
}

fn rounded(x: f64, digits: i32) -> f64 {
    let k = 10f64.powi(digits);
    (x * k).round() / k
}

impl Inner {
    fn limits_for(&self, key: &BucketKey) -> Limits {
        match key {
            BucketKey::App => self.settings.app,
            BucketKey::Page(p) => match self.settings.overrides.get(p) {
                Some(&guess) => Limits {
                    guess,
                    ..self.settings.page
                },
                None => self.settings.page,
            },
        }
    }

    fn bucket(&self, key: &BucketKey) -> Arc<Bucket> {
        self.table.get_or_insert(
            key,
            || {
                let limits = self.limits_for(key);
                Bucket {
                    key: key.clone(),
                    params: FleetParams::from(limits),
                    state: Mutex::new(State {
                        budget: Budget::new(limits, Instant::now()),
                        queues: [VecDeque::new(), VecDeque::new()],
                        waiting_units: [0, 0],
                        depth: 0,
                        pump_running: false,
                        asking: false,
                        hold: None,
                        fleet: None,
                    }),
                    wake: Notify::new(),
                }
            },
            // Someone besides the table holds it: a call in flight, a waiter or its pump.
            |b| Arc::strong_count(b) > 1,
        )
    }

    /// The share of each budget this replica uses when it decides alone: all of it without
    /// Redis configured; with Redis configured but unreachable, `local_budget_fraction` or
    /// one over the replicas last seen alive.
    fn local_share(&self) -> f64 {
        self.shared.as_ref().map_or(1.0, |s| s.local_share())
    }

    /// A bucket's usage (percent), limit and calls in the window as headers, errors and
    /// gauges show them: the fleet's while its view is recent, else the budget's. The budget
    /// counts in this replica's share of the calls; while Redis decides (and its view of the
    /// bucket has lapsed) the Page's limit is the budget's over the share, and while this
    /// replica decides alone it is its share.
    fn shown(&self, st: &mut State, now: Instant) -> (f64, f64, u32) {
        let est = st.budget.estimate(now);
        if let Some(f) = st.fleet(now) {
            return (f.usage_pct, f.limit, f.count);
        }
        let limit = if self.shared.as_ref().is_some_and(|s| s.is_up()) {
            est.limit / st.budget.share()
        } else {
            est.limit
        };
        (est.usage_pct, limit, est.calls_in_window)
    }

    /// Decides locally for a call of `units`, the app gate included.
    fn try_local(
        &self,
        st: &mut State,
        units: u32,
        now: Instant,
        gate_held: bool,
    ) -> Result<Granted, Hold> {
        if let Some(s) = &self.shared {
            if let Some(until) = s.app_paused_until(now) {
                self.gate.mirror(until, now);
            }
        }
        let gate_probe_due = !gate_held && self.gate.check(now)?;
        let probe = st.budget.decide(units, now)?;
        let gate_probe = gate_probe_due && self.gate.take_probe();
        if gate_probe_due && !gate_probe {
            // Another call took the gate's probe between the check and now.
            return Err(Hold {
                until: now + Duration::from_millis(100),
                reason: Reason::AppPaused,
            });
        }
        Ok(Granted {
            ticket: st.budget.dispatched(units, now, probe),
            fleet: None,
            gate_probe,
        })
    }

    /// Asks Redis whether a call of `units` may go (the app gate first). `None`: Redis could
    /// not decide this once.
    async fn ask_redis(
        &self,
        bucket: &Bucket,
        shared: &SharedBudgets,
        units: u32,
        gate_held: bool,
    ) -> Option<Result<Granted, Hold>> {
        let now = Instant::now();
        if let Some(until) = shared.app_paused_until(now) {
            self.gate.mirror(until, now);
        }
        let gate_probe = match self.gate.check(now) {
            _ if gate_held => false,
            Ok(p) => p,
            Err(h) => return Some(Err(h)),
        };
        let d = shared.admit(&bucket.key, units, bucket.params).await?;
        let now = Instant::now();
        let mut st = bucket.lock();
        st.fleet = Some(FleetView {
            at: now,
            usage_pct: d.usage_pct,
            limit: d.limit,
            count: d.count,
            paused_until: (!d.paused.is_zero()).then(|| now + d.paused),
            releases_at: d.horizon.map(|h| now + h),
        });
        if !d.granted {
            let hold = Hold {
                until: now + d.wait,
                reason: d.reason,
            };
            st.hold = Some(hold);
            return Some(Err(hold));
        }
        let gate_probe = gate_probe && self.gate.take_probe();
        shared.count(AdmissionSource::Redis);
        // The local budget learns from its own calls all along, in the units it will decide
        // in if Redis goes: its share of the fleet's calls.
        st.budget.set_share(self.local_share());
        Some(Ok(Granted {
            ticket: st.budget.dispatched(units, now, false),
            fleet: Some(d.ticket),
            gate_probe,
        }))
    }

    /// Applies what a reply said to one bucket, locally and (with Redis) for the fleet.
    fn observe(&self, b: &Arc<Bucket>, held: Option<&Held>, obs: &Observation, now: Instant) {
        let group_lower = {
            let mut st = b.lock();
            let group_lower = st.budget.observe(held.map(|h| &h.ticket), obs, now);
            // The head waiter's verdict may have changed: the pump decides again.
            st.hold = None;
            if obs.throttled {
                st.fleet = None;
            }
            group_lower
        };
        b.wake.notify_one();
        if let Some(s) = self.shared.clone().filter(|s| s.is_up()) {
            // A call decided locally (Redis was away) has no fleet ticket: its reading is
            // still the fleet's, taken as of now.
            let fleet = held.and_then(|h| h.fleet);
            let rtt = held.map(|h| now.saturating_duration_since(h.ticket.at));
            let (key, params, obs) = (b.key.clone(), b.params, *obs);
            spawn(async move { s.observe(&key, fleet, rtt, &obs, group_lower, params).await });
        }
    }

    fn share_refund(&self, b: &Bucket, f: FleetTicket) {
        if let Some(s) = self.shared.clone().filter(|s| s.is_up()) {
            let (key, params) = (b.key.clone(), b.params);
            spawn(async move { s.refund(&key, f, params).await });
        }
    }

    fn count_page_throttle(&self, key: &BucketKey) {
        if let BucketKey::Page(p) = key {
            if self.settings.listed.contains(p) || lock(&self.exported).contains(p) {
                self.metrics
                    .quota
                    .page_throttles
                    .with_label_values(&[p.as_str()])
                    .inc();
            }
        }
    }

    fn throttled(
        &self,
        st: &mut State,
        key: &BucketKey,
        wait: Duration,
        queue_full: bool,
    ) -> ProxyError {
        self.metrics.quota.rejected(if queue_full {
            QuotaRejection::QueueFull
        } else {
            QuotaRejection::QueueTimeout
        });
        let limits = st.budget.limits;
        let (_, limit, _) = self.shown(st, Instant::now());
        ProxyError::Throttled {
            page: key.to_string(),
            retry_after_s: ceil_secs(wait),
            queue_full,
            policy: key.policy_name(),
            limit: ((limit * limits.ceiling_pct() / 100.0).floor() as u32).max(1),
            window_s: limits.window.as_secs().max(1),
        }
    }

    /// How long a call of `units` would wait behind `ahead` units: the estimate (the
    /// fleet's while Redis is up and has answered lately, else the budget's own), the app
    /// gate's pause and the fleet's last hold, whichever is longest. A replica's own budget
    /// sees the other replicas' calls only as usage it cannot explain, so its estimate of a
    /// shared Page runs long.
    fn predicted_wait(&self, st: &mut State, ahead: u32, units: u32, now: Instant) -> Duration {
        let redis_up = self.shared.as_ref().is_some_and(|s| s.is_up());
        let needed = ahead.saturating_add(units.max(1));
        let limits = st.budget.limits;
        let fleet_wait = st
            .fleet(now)
            .filter(|_| redis_up)
            .and_then(|f| f.predicted_wait(&limits, needed, now));
        let mut wait = match fleet_wait {
            Some(w) => w,
            None => st.budget.predicted_wait(ahead, units, now),
        };
        if let Some(p) = self.gate.paused_until(now) {
            wait = wait.max(p - now);
        }
        if redis_up {
            if let Some(h) = st.hold.filter(|h| h.until > now) {
                wait = wait.max(h.until - now);
            }
            if let Some(p) = st.fleet(now).and_then(|f| f.paused_until) {
                wait = wait.max(p.saturating_duration_since(now));
            }
        }
        wait
    }

    async fn admit_one(
        self: &Arc<Self>,
        bucket: &Arc<Bucket>,
        units: u32,
        prio: usize,
        deadline: Instant,
        gate_held: bool,
    ) -> Result<Granted, ProxyError> {
        let shared = self.shared.clone().filter(|s| s.is_up());
        let mut redis_failed = false;
        if let Some(s) = &shared {
            let free = {
                let st = bucket.lock();
                !st.queued() && st.hold.is_none_or(|h| h.until <= Instant::now())
            };
            if free {
                match self.ask_redis(bucket, s, units, gate_held).await {
                    Some(Ok(g)) => return Ok(g),
                    Some(Err(_)) => {}
                    None => redis_failed = true,
                }
            }
        }
        let rx = {
            let now = Instant::now();
            let mut st = bucket.lock();
            if shared.is_none() || redis_failed {
                st.budget.set_share(self.local_share());
                if !st.queued() {
                    match self.try_local(&mut st, units, now, gate_held) {
                        Ok(g) => {
                            if let Some(s) = &self.shared {
                                s.count(AdmissionSource::Local);
                            }
                            st.hold = None;
                            return Ok(g);
                        }
                        Err(h) => st.hold = Some(h),
                    }
                }
            }
            // Interactive calls only wait behind interactive ones; batch calls behind all.
            let ahead = match prio {
                INTERACTIVE => st.waiting_units[INTERACTIVE],
                _ => st.waiting_units[INTERACTIVE].saturating_add(st.waiting_units[BATCH]),
            };
            let wait = self.predicted_wait(&mut st, ahead, units, now);
            if now + wait > deadline {
                // Fail fast: waiting could not help, and the estimate is the honest Retry-After.
                return Err(self.throttled(&mut st, &bucket.key, wait, false));
            }
            if st.depth >= self.settings.max_queue_depth {
                return Err(self.throttled(&mut st, &bucket.key, wait, true));
            }
            let why = match st.hold {
                Some(h) if !st.queued() => h.reason.label(),
                _ => "queued_behind",
            };
            self.metrics.quota.waits.with_label_values(&[why]).inc();
            let (tx, rx) = oneshot::channel();
            st.queues[prio].push_back(Waiter {
                tx,
                units,
                gate_held,
            });
            st.waiting_units[prio] = st.waiting_units[prio].saturating_add(units);
            st.depth += 1;
            st.compact(self.settings.max_queue_depth);
            self.metrics.quota.queue_depth.inc();
            if !st.pump_running {
                st.pump_running = true;
                tokio::spawn(pump(self.clone(), bucket.clone()));
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
            Ok(Ok(g)) => Ok(g),
            _ => {
                // The pump may have admitted us just as the deadline passed.
                rx.close();
                if let Ok(g) = rx.try_recv() {
                    return Ok(g);
                }
                let now = Instant::now();
                let mut st = bucket.lock();
                let ahead = st.waiting_units[INTERACTIVE];
                let wait = self.predicted_wait(&mut st, ahead, units, now);
                Err(self.throttled(&mut st, &bucket.key, wait, false))
            }
        }
    }

    fn status_row(&self, b: &Bucket, gate_paused: Option<Instant>, now: Instant) -> Value {
        let mut st = b.lock();
        let est = st.budget.estimate(now);
        let limits = st.budget.limits;
        let reading = st.budget.reading(now).map(|r| {
            json!({
                "call_count": r.usage.call_count,
                "total_time": r.usage.total_time,
                "total_cputime": r.usage.total_cputime,
                "regain_s": r.regain.map(|d| d.as_secs()),
                "age_s": rounded(now.saturating_duration_since(r.at).as_secs_f64(), 3),
                "synthetic": r.synthetic,
            })
        });
        let fleet = st.fleet(now);
        let paused = st
            .budget
            .paused_until(now)
            .or(fleet.and_then(|f| f.paused_until));
        let hold = st.hold.filter(|_| st.depth > 0);
        let waiting = match (hold, gate_paused) {
            (_, Some(p)) if st.depth > 0 => Some(json!({
                "reason": Reason::AppPaused.label(),
                "next_check_in_s": rounded(p.saturating_duration_since(now).as_secs_f64(), 3),
            })),
            (Some(h), _) => Some(json!({
                "reason": h.reason.label(),
                "next_check_in_s": rounded(h.until.saturating_duration_since(now).as_secs_f64(), 3),
            })),
            _ => None,
        };
        let state = if gate_paused.is_some() {
            Reason::AppPaused.label()
        } else {
            match st.budget.decide(1, now) {
                Ok(true) => "probe_due",
                Ok(false) if est.usage_pct < limits.threshold_pct() => "open",
                Ok(false) => "pacing",
                Err(h) => h.reason.label(),
            }
        };
        let view = |e: &Estimate| {
            json!({
                "usage": rounded(e.usage_pct / 100.0, 4),
                "limit": rounded(e.limit, 1),
                "limit_source": e.source.label(),
                "calls_in_window": e.calls_in_window,
                "unexplained_usage": rounded(e.unexplained_pct / 100.0, 4),
            })
        };
        json!({
            "id": b.key.to_string(),
            "kind": b.key.policy_name(),
            "budget": {
                "calls": limits.guess,
                "window_s": limits.window.as_secs_f64(),
                "threshold": limits.threshold_pct() / 100.0,
                "ceiling": limits.ceiling_pct() / 100.0,
                "learn_limits": limits.learn,
            },
            "estimate": view(&est),
            "fleet": fleet.map(|f| json!({
                "usage": rounded(f.usage_pct / 100.0, 4),
                "limit": rounded(f.limit, 1),
                "calls_in_window": f.count,
            })),
            "usage": reading,
            "state": state,
            "waiting": waiting,
            "paused_until": paused.map(|p| unix(p, now)),
            "queue_depth": st.depth,
            "in_flight": st.budget.in_flight(),
        })
    }

    /// Updates the gauges that depend on time before a scrape: per-Page series for the
    /// listed Pages and the `top_pages` busiest others; series of Pages that left the top
    /// are removed, so label cardinality stays bounded.
    fn refresh_gauges(&self) {
        let now = Instant::now();
        let m = &self.metrics;
        let buckets = self.table.snapshot();
        m.quota
            .buckets
            .set(i64::try_from(buckets.len()).unwrap_or(i64::MAX));
        m.quota
            .app_paused
            .set(i64::from(self.gate.paused_until(now).is_some()));
        let mut paused = 0;
        let mut pages: Vec<(u32, &Arc<Bucket>)> = Vec::new();
        for b in &buckets {
            let mut st = b.lock();
            if st.budget.paused_until(now).is_some() {
                paused += 1;
            }
            match &b.key {
                BucketKey::App => {
                    let r = st.budget.reading(now);
                    let pcts = r.map_or([0.0; 3], |r| {
                        [
                            r.usage.call_count,
                            r.usage.total_time,
                            r.usage.total_cputime,
                        ]
                    });
                    for (k, v) in ["call_count", "total_time", "total_cputime"]
                        .iter()
                        .zip(pcts)
                    {
                        m.quota.app_usage.with_label_values(&[k]).set(v);
                    }
                }
                BucketKey::Page(_) => {
                    let calls = st.budget.estimate(now).calls_in_window;
                    pages.push((calls, b));
                }
            }
        }
        m.quota.paused_buckets.set(paused);
        // The busiest first; ties by id so the choice is stable between scrapes.
        pages.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.key.cmp(&b.1.key)));
        let mut exported = HashSet::new();
        let mut top = 0;
        for (calls, b) in pages {
            let BucketKey::Page(p) = &b.key else { continue };
            let listed = self.settings.listed.contains(p);
            if !listed && (calls == 0 || top >= self.settings.top_pages) {
                continue;
            }
            if !listed {
                top += 1;
            }
            let mut st = b.lock();
            let fleet = st.fleet(now);
            let (usage, limit, count) = self.shown(&mut st, now);
            let reading = st.budget.reading(now);
            let is_paused = st.budget.paused_until(now).is_some()
                || fleet.and_then(|f| f.paused_until).is_some();
            let label = [p.as_str()];
            m.quota
                .page_usage_ratio
                .with_label_values(&label)
                .set(usage / 100.0);
            m.quota
                .page_estimated_limit
                .with_label_values(&label)
                .set(limit);
            m.quota
                .page_calls_in_window
                .with_label_values(&label)
                .set(i64::from(count));
            m.quota
                .page_queue_depth
                .with_label_values(&label)
                .set(i64::try_from(st.depth).unwrap_or(i64::MAX));
            m.quota
                .page_paused
                .with_label_values(&label)
                .set(i64::from(is_paused));
            let pcts = reading.map_or([0.0; 3], |r| {
                [
                    r.usage.call_count,
                    r.usage.total_time,
                    r.usage.total_cputime,
                ]
            });
            for (k, v) in ["call_count", "total_time", "total_cputime"]
                .iter()
                .zip(pcts)
            {
                m.quota
                    .page_usage
                    .with_label_values(&[p.as_str(), k])
                    .set(v);
            }
            exported.insert(p.clone());
        }
        // Listed Pages not seen yet keep their zeroed series (set at start).
        let mut previous = lock(&self.exported);
        for gone in previous.difference(&exported) {
            if self.settings.listed.contains(gone) {
                continue;
            }
            m.quota.remove_page_series(gone);
        }
        *previous = exported;
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
        self.inner.metrics.quota.queue_depth.dec();
        self.bucket.wake.notify_one();
    }
}

/// Gives a granted call to its waiter; a waiter that gave up meanwhile is not charged.
fn hand_over(inner: &Inner, bucket: &Bucket, st: &mut State, w: Waiter, g: Granted) {
    if let Err(g) = w.tx.send(g) {
        st.budget.refund(&g.ticket);
        if let Some(f) = g.fleet {
            inner.share_refund(bucket, f);
        }
        if g.gate_probe {
            inner.gate.probe_lost();
        }
    }
}

/// Releases a bucket's waiters as its budget allows; exits when the queues are empty. With
/// Redis up each release is a fleet decision; otherwise (or when one Redis call fails) the
/// local budget decides, on this replica's share.
async fn pump(inner: Arc<Inner>, bucket: Arc<Bucket>) {
    let mut force_local = false;
    loop {
        let redis = inner.shared.clone().filter(|s| s.is_up() && !force_local);
        let step = {
            let now = Instant::now();
            let mut st = bucket.lock();
            let Some((units, gate_held)) = st.head().map(|w| (w.units, w.gate_held)) else {
                st.pump_running = false;
                return;
            };
            match &redis {
                Some(_) => match st.hold.filter(|h| h.until > now) {
                    Some(h) => Err(h.until),
                    None => match st.pop_head() {
                        Some((prio, waiter)) => {
                            st.asking = true;
                            Ok((prio, waiter))
                        }
                        None => continue,
                    },
                },
                None => {
                    force_local = false;
                    st.budget.set_share(inner.local_share());
                    match inner.try_local(&mut st, units, now, gate_held) {
                        Ok(g) => {
                            st.hold = None;
                            if let Some((_, w)) = st.pop_head() {
                                if let Some(s) = &inner.shared {
                                    s.count(AdmissionSource::Local);
                                }
                                hand_over(&inner, &bucket, &mut st, w, g);
                            } else {
                                st.budget.refund(&g.ticket);
                            }
                            continue;
                        }
                        Err(h) => {
                            st.hold = Some(h);
                            Err(h.until)
                        }
                    }
                }
            }
        };
        let sleep_until = match (step, &redis) {
            (Err(until), _) => until,
            (Ok((prio, waiter)), Some(s)) => {
                let decision = inner
                    .ask_redis(&bucket, s, waiter.units, waiter.gate_held)
                    .await;
                let mut st = bucket.lock();
                st.asking = false;
                match decision {
                    Some(Ok(g)) => {
                        st.hold = None;
                        hand_over(&inner, &bucket, &mut st, waiter, g);
                        continue;
                    }
                    Some(Err(h)) => {
                        st.queues[prio].push_front(waiter);
                        h.until
                    }
                    None => {
                        // Redis could not decide this once: the local budget decides next.
                        st.queues[prio].push_front(waiter);
                        force_local = true;
                        continue;
                    }
                }
            }
            (Ok((prio, waiter)), None) => {
                bucket.lock().queues[prio].push_front(waiter);
                continue;
            }
        };
        let sleep_until = sleep_until.min(Instant::now() + PUMP_MAX_SLEEP);
        tokio::select! {
            _ = tokio::time::sleep_until(sleep_until.into()) => {}
            _ = bucket.wake.notified() => {}
            _ = inner.gate.opened.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            guess: 100,
            window: Duration::from_secs(60),
            headroom_pct: 2.0,
            threshold_pct: 60.0,
            learn: false,
        }
    }

    fn view(usage_pct: f64, releases_in: Option<Duration>, now: Instant) -> FleetView {
        FleetView {
            at: now,
            usage_pct,
            limit: 100.0,
            count: 0,
            paused_until: None,
            releases_at: releases_in.map(|d| now + d),
        }
    }

    #[test]
    fn the_fleets_view_predicts_waits_from_its_own_usage_and_releases() {
        let now = Instant::now();
        let l = limits();
        // Below the threshold with room: no wait.
        let v = view(40.0, None, now);
        assert_eq!(v.predicted_wait(&l, 5, now), Some(Duration::ZERO));
        // Above it: what is left (38 calls) spread until the oldest calls leave (38 s).
        let v = view(60.0, Some(Duration::from_secs(38)), now);
        assert_eq!(v.predicted_wait(&l, 1, now), Some(Duration::from_secs(1)));
        assert_eq!(v.predicted_wait(&l, 10, now), Some(Duration::from_secs(10)));
        // Without a known release, the whole window.
        let v = view(60.0, None, now);
        let w = v.predicted_wait(&l, 1, now).expect("room left");
        assert!(
            w > Duration::from_millis(1570) && w < Duration::from_millis(1590),
            "{w:?}"
        );
        // No room for all of them: the fleet's view cannot say; the budget decides.
        assert_eq!(v.predicted_wait(&l, 40, now), None);
        // A pause is waited out whatever the usage.
        let mut v = view(99.0, None, now);
        v.paused_until = Some(now + Duration::from_secs(7));
        assert_eq!(v.predicted_wait(&l, 3, now), Some(Duration::from_secs(7)));
    }
}
