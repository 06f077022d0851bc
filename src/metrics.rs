//! Every metric graphgate exports, defined and registered here once. Each gateway instance
//! owns its own registry, so several instances can run in one process (tests, benches).
//! Labels are bounded by construction: route classes, outcomes and status classes are fixed
//! sets; no token, key or raw path ever becomes a label.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets in seconds, from a cache hit (~50 µs) to a slow Graph call (30 s).
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// Defines a bounded label as an enum: its variants, their label values, and `ALL` in
/// declaration order (the variant's index into per-series arrays is `self as usize`).
macro_rules! label_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $value:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The label value.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $value,)+
                }
            }
        }
    };
}

label_enum! {
    /// The route class of a request (`route` label); `Invalid` when it did not parse.
    Route {
        Node => "node",
        Edge => "edge",
        Ids => "ids",
        Batch => "batch",
        Root => "root",
        Invalid => "invalid",
    }
}

label_enum! {
    /// The method class of a request (`method` label); HEAD counts as GET.
    RequestMethod {
        Get => "GET",
        Post => "POST",
        Delete => "DELETE",
        Other => "OTHER",
    }
}

impl RequestMethod {
    pub fn of(method: &http::Method) -> RequestMethod {
        match *method {
            http::Method::GET | http::Method::HEAD => RequestMethod::Get,
            http::Method::POST => RequestMethod::Post,
            http::Method::DELETE => RequestMethod::Delete,
            _ => RequestMethod::Other,
        }
    }
}

label_enum! {
    /// What the cache did: the `result` of a cache lookup and the `cache` label of a request
    /// (`none` there for a request the cache never saw, see [`cache_label`]).
    CacheResult {
        Hit => "hit",
        Miss => "miss",
        Stale => "stale",
        Bypass => "bypass",
    }
}

/// The `cache` label of a request: its cache result, `none` for one answered before the
/// cache (an error).
pub fn cache_label(result: Option<CacheResult>) -> &'static str {
    result.map_or("none", CacheResult::as_str)
}

label_enum! {
    /// A cache tier (`tier` label): in-process L1, shared L2 (Redis).
    CacheTier {
        L1 => "l1",
        L2 => "l2",
    }
}

label_enum! {
    /// Why graphgate answered with its own error (`graphgate_rejections_total{reason}`).
    Rejection {
        Unauthorized => "unauthorized",
        Forbidden => "forbidden",
        BadRequest => "bad_request",
        TooLarge => "too_large",
        BodyTimeout => "body_timeout",
        UpstreamConnect => "upstream_connect",
        UpstreamTimeout => "upstream_timeout",
        UpstreamBadResponse => "upstream_bad_response",
        UpstreamTooLarge => "upstream_too_large",
        BreakerOpen => "breaker_open",
        Overloaded => "overloaded",
        Throttled => "throttled",
        ShuttingDown => "shutting_down",
        Internal => "internal",
    }
}

label_enum! {
    /// Why an entry left a cache tier (`graphgate_cache_evictions_total{cause}`).
    Eviction {
        Size => "size",
        Expired => "expired",
        Explicit => "explicit",
        Replaced => "replaced",
    }
}

label_enum! {
    /// Why entries were dropped on purpose (`graphgate_cache_invalidations_total{reason}`):
    /// a successful write to their node, or an admin purge.
    InvalidationReason {
        Write => "write",
        Purge => "purge",
    }
}

label_enum! {
    /// Why a stale entry was served (`graphgate_cache_stale_served_total{reason}`):
    /// stale-while-revalidate, or stale-if-error.
    StaleReason {
        Revalidate => "revalidate",
        Error => "error",
    }
}

label_enum! {
    /// How a miss that found another replica filling the key ended
    /// (`graphgate_cache_lease_waits_total{outcome}`).
    LeaseWait {
        Filled => "filled",
        TookOver => "took_over",
        GaveUp => "gave_up",
    }
}

/// Status classes of the `status` label, indexed by [`status_class`].
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Index into [`CLASSES`]; anything outside 100..=499 counts as 5xx.
fn status_class(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

/// Values of the request series' `cache` label: the results, then `none`.
const CACHE_LABELS: usize = CacheResult::ALL.len() + 1;

fn cache_index(result: Option<CacheResult>) -> usize {
    result.map_or(CacheResult::ALL.len(), |r| r as usize)
}

/// The per-request series, resolved on first use and kept: `with_label_values` hashes every
/// label value and takes the vector's lock, three times per request on the hit path. A
/// series appears in /metrics only once used, exactly as before.
struct HotSeries {
    requests: Box<[OnceLock<IntCounter>]>,
    durations: Box<[OnceLock<Histogram>]>,
    l1_lookups: [OnceLock<IntCounter>; CacheResult::ALL.len()],
}

/// Request series: every route, method, status class and cache label.
const SERIES: usize = Route::ALL.len() * RequestMethod::ALL.len() * CLASSES.len() * CACHE_LABELS;

impl HotSeries {
    fn new() -> HotSeries {
        fn cells<T>(n: usize) -> Box<[OnceLock<T>]> {
            (0..n).map(|_| OnceLock::new()).collect()
        }
        HotSeries {
            requests: cells(SERIES),
            durations: cells(SERIES),
            l1_lookups: Default::default(),
        }
    }
}

pub struct Metrics {
    registry: Registry,
    hot: HotSeries,
    /// Requests answered, by route class, method, status class and cache result.
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    /// Calls to Graph by outcome (ok, throttled, auth_error, transient_error, graph_error,
    /// http_4xx, http_5xx, upstream_timeout, upstream_connect, upstream_bad_response).
    pub upstream_requests: IntCounterVec,
    pub upstream_duration: HistogramVec,
    /// GETs sent as POST + method=GET because their URL was too long.
    pub large_get_rewrites: IntCounter,
    /// Errors graphgate itself answered, by reason.
    pub rejections: IntCounterVec,
    /// Page tokens minted from the system user token.
    pub page_tokens_minted: IntCounter,
    /// Unix time of the last code 190/102 reply for the injected token; 0 = never.
    pub token_last_invalid: IntGauge,
    /// Connections currently open on the public listener.
    pub open_connections: IntGauge,
    pub build_info: IntGaugeVec,
    /// Retries, circuit breaker, connection and load limits, config reloads, TLS.
    pub hardening: HardeningMetrics,
    /// Scale-out on Redis: link health, errors, leases, shared admissions.
    pub redis: RedisMetrics,

    // --- Quota scheduler (src/quota). Per-Page series for Pages listed in `[[quota.pages]]`
    // and the `quota.metrics_top_pages` busiest others (series of Pages that drop out of the
    // top are removed), so label cardinality is bounded by configuration. ---
    /// Calls waiting for budget, all buckets.
    pub quota_queue_depth: IntGauge,
    /// Time from arrival at the scheduler to admission or rejection, by outcome.
    pub quota_queue_wait: HistogramVec,
    /// Calls admitted upstream, by bucket kind (page, app).
    pub quota_dispatches: IntCounterVec,
    /// Calls refused by the scheduler, by reason (queue_timeout, queue_full).
    pub quota_rejections: IntCounterVec,
    /// Calls that could not go at once and queued, by why (paused, probing,
    /// awaiting_first_reading, pacing, full, app_paused, queued_behind).
    pub quota_waits: IntCounterVec,
    /// Throttled GETs put back into their queue instead of answered.
    pub quota_requeues: IntCounter,
    /// Throttle codes received from Graph, by scope (page, app, user, custom, buc).
    pub quota_throttles: IntCounterVec,
    /// Buckets currently paused after a throttle code or 100 % usage.
    pub quota_paused_buckets: IntGauge,
    /// Last X-App-Usage percentages, by metric (call_count, total_time, total_cputime).
    pub quota_app_usage: GaugeVec,
    /// Last X-Business-Use-Case-Usage percentages of a Page, by page and metric.
    pub quota_page_usage: GaugeVec,
    /// Queue depth of a Page.
    pub quota_page_queue_depth: IntGaugeVec,
    /// Estimated usage of a Page's limit, 0–1 (latest reading plus calls since).
    pub quota_page_usage_ratio: GaugeVec,
    /// Estimated limit of a Page, calls per window.
    pub quota_page_estimated_limit: GaugeVec,
    /// Calls graphgate sent for a Page in the current window.
    pub quota_page_calls_in_window: IntGaugeVec,
    /// Quota buckets held (bounded by `quota.max_buckets` plus those in use).
    pub quota_buckets: IntGauge,
    /// 1 while Graph's app-level throttle holds every call.
    pub quota_app_paused: IntGauge,
    /// Refreshes the time-dependent quota gauges just before a scrape.
    quota_refresh: OnceLock<Box<dyn Fn() + Send + Sync>>,

    // --- Observability (issue 6): per-Page throttle state for alerting, listed Pages only. ---
    /// 1 while a Page is paused (throttle code or 100 % usage).
    pub quota_page_paused: IntGaugeVec,
    /// Throttle codes Graph returned for calls charged to a Page with per-Page series.
    pub quota_page_throttles: IntCounterVec,

    // --- Read cache (issue 3) ---
    /// Cache lookups by tier and result (hit, miss, stale, bypass).
    pub cache_lookups: IntCounterVec,
    /// Requests that waited on another request's identical upstream call.
    pub cache_coalesced: IntCounter,
    /// Entries and weighted bytes per tier (refreshed when /metrics is read).
    pub cache_entries: IntGaugeVec,
    pub cache_bytes: IntGaugeVec,
    /// Entries leaving a tier, by cause (size, expired, explicit, replaced).
    pub cache_evictions: IntCounterVec,
    /// Entries dropped by writes or admin purges.
    pub cache_invalidations: IntCounterVec,
    /// Stale entries served, by reason (revalidate = stale-while-revalidate, error =
    /// stale-if-error).
    pub cache_stale_served: IntCounterVec,
}

/// The hardening metrics, one block so they stay together.
pub struct HardeningMetrics {
    /// Upstream attempts repeated, by reason (connect, reset, graph_transient, http_502,
    /// http_503).
    pub retries: IntCounterVec,
    /// Retries that were due but not made, by reason (budget, deadline, breaker).
    pub retries_skipped: IntCounterVec,
    /// 0 closed, 1 half-open (probing), 2 open.
    pub breaker_state: IntGauge,
    pub breaker_opened: IntCounter,
    /// Calls failed fast because the breaker was open.
    pub breaker_rejections: IntCounter,
    /// Connections closed at once because `server.max_connections` (public listener) or
    /// `server.admin_max_connections` (admin listener) were open, by listener.
    pub connections_refused: IntCounterVec,
    /// Connections closed after `server.idle_timeout_ms` without a request, by listener.
    pub connections_idle_closed: IntCounterVec,
    /// Connections closed because no request head arrived within
    /// `server.header_read_timeout_ms` of accepting them, by listener.
    pub connections_head_timeout: IntCounterVec,
    /// Bytes of reply bodies held in memory now (see `upstream.max_buffered_reply_bytes`).
    pub buffered_reply_bytes: IntGauge,
    /// Replies answered 503 because buffering them would exceed
    /// `upstream.max_buffered_reply_bytes`, by source (upstream, cache).
    pub reply_budget_rejections: IntCounterVec,
    pub requests_in_flight: IntGauge,
    /// Requests answered 503 because `server.max_in_flight` were being handled.
    pub load_shed: IntCounter,
    /// Configuration reloads by result (ok, rejected).
    pub config_reloads: IntCounterVec,
    pub tls_handshake_failures: IntCounter,
    /// notAfter of the inbound TLS leaf certificate (Unix time), by listener; no series
    /// without inbound TLS.
    pub tls_cert_expiry: IntGaugeVec,
    /// 1 while Graph accepts the injected token of each kind (`system`, `page`), 0 after a
    /// 190/102 until the next call with that kind of token succeeds: the alertable state.
    pub token_valid: IntGaugeVec,
}

impl HardeningMetrics {
    fn new(r: &Registry) -> HardeningMetrics {
        let m = HardeningMetrics {
            retries: counter_vec(
                r,
                "graphgate_upstream_retries_total",
                "Upstream attempts repeated: idempotent reads by failure, and any call Graph refused unprocessed over HTTP/2 (reason refused).",
                &["reason"],
            ),
            retries_skipped: counter_vec(
                r,
                "graphgate_upstream_retries_skipped_total",
                "Retries not made (retry budget spent, deadline near, breaker open), by reason.",
                &["reason"],
            ),
            breaker_state: gauge(
                r,
                "graphgate_upstream_breaker_state",
                "Circuit breaker in front of Graph: 0 closed, 1 half-open, 2 open.",
            ),
            breaker_opened: counter(
                r,
                "graphgate_upstream_breaker_opened_total",
                "Times the circuit breaker opened.",
            ),
            breaker_rejections: counter(
                r,
                "graphgate_upstream_breaker_rejections_total",
                "Calls failed fast with 503 because the circuit breaker was open.",
            ),
            connections_refused: counter_vec(
                r,
                "graphgate_connections_refused_total",
                "Connections closed at once because server.max_connections (public) or server.admin_max_connections (admin) were open, by listener.",
                &["listener"],
            ),
            connections_idle_closed: counter_vec(
                r,
                "graphgate_connections_idle_closed_total",
                "Connections closed after server.idle_timeout_ms without a request, by listener.",
                &["listener"],
            ),
            connections_head_timeout: counter_vec(
                r,
                "graphgate_connections_head_timeout_total",
                "Connections closed because no request head arrived within server.header_read_timeout_ms of connecting, by listener.",
                &["listener"],
            ),
            buffered_reply_bytes: gauge(
                r,
                "graphgate_buffered_reply_bytes",
                "Bytes of reply bodies held in memory for clients now (bounded by upstream.max_buffered_reply_bytes).",
            ),
            reply_budget_rejections: counter_vec(
                r,
                "graphgate_reply_budget_rejections_total",
                "Replies answered 503 because buffering them would exceed upstream.max_buffered_reply_bytes, by source (upstream, cache).",
                &["source"],
            ),
            requests_in_flight: gauge(
                r,
                "graphgate_requests_in_flight",
                "Requests being handled on the public listener.",
            ),
            load_shed: counter(
                r,
                "graphgate_load_shed_total",
                "Requests answered 503 because server.max_in_flight requests were in flight.",
            ),
            config_reloads: counter_vec(
                r,
                "graphgate_config_reloads_total",
                "Configuration reloads (SIGHUP), by result.",
                &["result"],
            ),
            tls_handshake_failures: counter(
                r,
                "graphgate_tls_handshake_failures_total",
                "Inbound TLS handshakes that failed or timed out.",
            ),
            tls_cert_expiry: int_gauge_vec(
                r,
                "graphgate_tls_cert_expiry_timestamp_seconds",
                "Expiry (notAfter) of the inbound TLS leaf certificate in use, as Unix time; absent without inbound TLS.",
                &["listener"],
            ),
            token_valid: {
                let g = int_gauge_vec(
                    r,
                    "graphgate_token_valid",
                    "1 while Graph accepts the injected token of this kind (system, page); 0 after code 190/102 until a call with it succeeds.",
                    &["token"],
                );
                g.with_label_values(&["system"]).set(1);
                g.with_label_values(&["page"]).set(1);
                g
            },
        };
        // Every series from the start, at 0: alerts on rates need them to exist.
        for listener in ["public", "admin"] {
            m.connections_refused.with_label_values(&[listener]);
            m.connections_idle_closed.with_label_values(&[listener]);
            m.connections_head_timeout.with_label_values(&[listener]);
        }
        for source in ["upstream", "cache"] {
            m.reply_budget_rejections.with_label_values(&[source]);
        }
        m
    }
}

/// The Redis scale-out metrics (issue 5), one block so they stay together. Every label is a
/// fixed set chosen in code.
pub struct RedisMetrics {
    /// 1 while Redis answers, 0 while graphgate runs on local state only. Registered only
    /// once Redis is configured ([`Metrics::redis_in_use`]): an install without Redis must
    /// not show it as down.
    pub up: IntGauge,
    /// 1 when `[redis] url` is set, else 0; dashboards and alerts tell "down" from "not used"
    /// by it.
    pub configured: IntGauge,
    /// Failed Redis operations, by op (get, store, invalidate, publish, lease, admit, pause,
    /// refund, ping, subscribe, purge).
    pub errors: IntCounterVec,
    /// Invalidations received from other replicas and applied to the local tier.
    pub invalidations_received: IntCounter,
    /// Misses that found another replica filling the key, by outcome (filled: its entry
    /// arrived; took_over: its lease ran out and this replica called Graph; gave_up: Redis
    /// failed while waiting, so this replica called Graph).
    pub lease_waits: IntCounterVec,
    /// Quota admission decisions by where they were made (redis, local).
    pub admissions: IntCounterVec,
}

impl RedisMetrics {
    fn new(r: &Registry) -> RedisMetrics {
        RedisMetrics {
            up: IntGauge::new(
                "graphgate_redis_up",
                "1 while Redis answers; 0 while running on local state (L1 only, local budgets). Exported only when Redis is configured.",
            )
            .expect("metric definition is valid"),
            configured: gauge(
                r,
                "graphgate_redis_configured",
                "1 when Redis is configured ([redis] url), else 0.",
            ),
            errors: counter_vec(
                r,
                "graphgate_redis_errors_total",
                "Redis operations that failed or timed out, by operation.",
                &["op"],
            ),
            invalidations_received: counter(
                r,
                "graphgate_redis_invalidations_received_total",
                "Invalidation messages from other replicas applied to the local cache tier.",
            ),
            lease_waits: counter_vec(
                r,
                "graphgate_cache_lease_waits_total",
                "Misses that waited for another replica's fill, by outcome (filled, took_over, gave_up).",
                &["outcome"],
            ),
            admissions: counter_vec(
                r,
                "graphgate_quota_admission_decisions_total",
                "Quota admission decisions, by where they were made (redis, local).",
                &["source"],
            ),
        }
    }
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).expect("metric definition is valid");
    registry
        .register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

fn int_gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("metric definition is valid");
    registry
        .register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric definition is valid");
    registry
        .register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn histogram_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
        labels,
    )
    .expect("metric definition is valid");
    registry
        .register(Box::new(h.clone()))
        .expect("metric registered once");
    h
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("metric definition is valid");
    registry
        .register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("metric definition is valid");
    registry
        .register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

impl Metrics {
    pub fn new() -> Metrics {
        let m = Metrics::unset();
        m.preinit();
        m
    }

    fn unset() -> Metrics {
        let r = Registry::new();
        let build_info = IntGaugeVec::new(
            Opts::new("graphgate_build_info", "Build information; always 1."),
            &["version"],
        )
        .expect("metric definition is valid");
        r.register(Box::new(build_info.clone()))
            .expect("metric registered once");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::new(
                std::process::id() as i32,
                "graphgate",
            );
            // A second instance in the same process would register the same process
            // families; that is harmless to skip.
            let _ = r.register(Box::new(pc));
        }
        Metrics {
            requests: counter_vec(
                &r,
                "graphgate_requests_total",
                "Requests answered by graphgate.",
                &["route", "method", "status_class", "cache"],
            ),
            request_duration: histogram_vec(
                &r,
                "graphgate_request_duration_seconds",
                "Time from request head to response head.",
                &["route", "method", "status_class", "cache"],
            ),
            upstream_requests: counter_vec(
                &r,
                "graphgate_upstream_requests_total",
                "HTTP requests sent to the Graph API, by outcome.",
                &["outcome"],
            ),
            upstream_duration: histogram_vec(
                &r,
                "graphgate_upstream_duration_seconds",
                "Duration of Graph API requests, including reading the body.",
                &["outcome"],
            ),
            large_get_rewrites: counter(
                &r,
                "graphgate_large_get_rewrites_total",
                "GET requests sent upstream as POST with method=GET because the URL was too long.",
            ),
            rejections: counter_vec(
                &r,
                "graphgate_rejections_total",
                "Requests graphgate answered with its own error, by reason.",
                &["reason"],
            ),
            page_tokens_minted: counter(
                &r,
                "graphgate_page_tokens_minted_total",
                "Page access tokens obtained with the system user token.",
            ),
            token_last_invalid: gauge(
                &r,
                "graphgate_token_last_invalid_timestamp_seconds",
                "Unix time Graph last rejected an injected token (code 190/102); 0 if never.",
            ),
            open_connections: gauge(
                &r,
                "graphgate_open_connections",
                "Client connections currently open.",
            ),
            cache_lookups: counter_vec(
                &r,
                "graphgate_cache_lookups_total",
                "Cache lookups by tier and result (hit, miss, stale, bypass).",
                &["tier", "result"],
            ),
            cache_coalesced: counter(
                &r,
                "graphgate_cache_coalesced_total",
                "Requests answered by another request's in-flight upstream call.",
            ),
            cache_entries: int_gauge_vec(
                &r,
                "graphgate_cache_entries",
                "Entries in the cache tier.",
                &["tier"],
            ),
            cache_bytes: int_gauge_vec(
                &r,
                "graphgate_cache_bytes",
                "Weighted size of the cache tier in bytes (bodies, headers, keys).",
                &["tier"],
            ),
            cache_evictions: counter_vec(
                &r,
                "graphgate_cache_evictions_total",
                "Entries removed from a cache tier, by cause.",
                &["tier", "cause"],
            ),
            cache_invalidations: counter_vec(
                &r,
                "graphgate_cache_invalidations_total",
                "Cache entries dropped by writes (reason=write) or the admin API (reason=purge).",
                &["reason"],
            ),
            cache_stale_served: counter_vec(
                &r,
                "graphgate_cache_stale_served_total",
                "Stale entries served, by reason (revalidate, error).",
                &["reason"],
            ),
            build_info,
            hardening: HardeningMetrics::new(&r),
            redis: RedisMetrics::new(&r),
            quota_queue_depth: gauge(&r, "graphgate_quota_queue_depth", "Calls waiting for quota budget."),
            quota_queue_wait: histogram_vec(
                &r,
                "graphgate_quota_queue_wait_seconds",
                "Time calls spent waiting for quota budget, by outcome (admitted, rejected).",
                &["outcome"],
            ),
            quota_dispatches: counter_vec(
                &r,
                "graphgate_quota_dispatches_total",
                "Calls admitted upstream by the quota scheduler, by bucket kind.",
                &["bucket"],
            ),
            quota_rejections: counter_vec(
                &r,
                "graphgate_quota_rejections_total",
                "Calls refused with 429 by the quota scheduler, by reason.",
                &["reason"],
            ),
            quota_waits: counter_vec(
                &r,
                "graphgate_quota_waits_total",
                "Calls that queued for quota instead of going at once, by why.",
                &["reason"],
            ),
            quota_requeues: counter(
                &r,
                "graphgate_quota_requeues_total",
                "Throttled GETs re-queued instead of answered.",
            ),
            quota_throttles: counter_vec(
                &r,
                "graphgate_quota_throttles_total",
                "Throttle error codes received from Graph, by scope.",
                &["scope"],
            ),
            quota_paused_buckets: gauge(
                &r,
                "graphgate_quota_paused_buckets",
                "Quota buckets (Pages, app) currently paused.",
            ),
            quota_app_usage: gauge_vec(
                &r,
                "graphgate_quota_app_usage_percent",
                "Last X-App-Usage reading.",
                &["metric"],
            ),
            quota_page_usage: gauge_vec(
                &r,
                "graphgate_quota_page_usage_percent",
                "Last X-Business-Use-Case-Usage reading of a Page (listed and busiest Pages).",
                &["page", "metric"],
            ),
            quota_page_queue_depth: int_gauge_vec(
                &r,
                "graphgate_quota_page_queue_depth",
                "Calls waiting for budget, per Page (listed and busiest Pages).",
                &["page"],
            ),
            quota_page_usage_ratio: gauge_vec(
                &r,
                "graphgate_quota_page_usage_ratio",
                "Estimated usage of the Page's limit, 0-1: latest reading plus calls sent since (listed and busiest Pages).",
                &["page"],
            ),
            quota_page_estimated_limit: gauge_vec(
                &r,
                "graphgate_quota_page_estimated_limit",
                "Estimated limit of the Page, calls per window (page_calls unless readings show otherwise).",
                &["page"],
            ),
            quota_page_calls_in_window: int_gauge_vec(
                &r,
                "graphgate_quota_page_calls_in_window",
                "Calls sent for the Page in the current window (the fleet's with Redis).",
                &["page"],
            ),
            quota_buckets: gauge(
                &r,
                "graphgate_quota_buckets",
                "Quota buckets held (bounded by quota.max_buckets plus those in use).",
            ),
            quota_app_paused: gauge(
                &r,
                "graphgate_quota_app_paused",
                "1 while Graph's app-level throttle holds every call.",
            ),
            quota_refresh: OnceLock::new(),
            quota_page_paused: int_gauge_vec(
                &r,
                "graphgate_quota_page_paused",
                "1 while the Page is paused after a throttle code or 100 % usage (listed and busiest Pages).",
                &["page"],
            ),
            quota_page_throttles: counter_vec(
                &r,
                "graphgate_quota_page_throttles_total",
                "Throttle codes Graph returned for calls charged to the Page (listed and busiest Pages).",
                &["page"],
            ),
            hot: HotSeries::new(),
            registry: r,
        }
    }

    pub fn observe_upstream(&self, outcome: &str, took: Duration) {
        self.upstream_requests.with_label_values(&[outcome]).inc();
        self.upstream_duration
            .with_label_values(&[outcome])
            .observe(took.as_secs_f64());
    }

    pub fn observe_request(
        &self,
        route: Route,
        method: RequestMethod,
        status: u16,
        cache: Option<CacheResult>,
        took: Duration,
    ) {
        let class = status_class(status);
        let i = ((route as usize * RequestMethod::ALL.len() + method as usize) * CLASSES.len()
            + class)
            * CACHE_LABELS
            + cache_index(cache);
        let labels = || {
            [
                route.as_str(),
                method.as_str(),
                CLASSES[class],
                cache_label(cache),
            ]
        };
        self.hot.requests[i]
            .get_or_init(|| self.requests.with_label_values(&labels()))
            .inc();
        self.hot.durations[i]
            .get_or_init(|| self.request_duration.with_label_values(&labels()))
            .observe(took.as_secs_f64());
    }

    /// Counts one cache lookup by tier and result (`graphgate_cache_lookups_total`).
    pub fn cache_lookup(&self, tier: CacheTier, result: CacheResult) {
        match tier {
            CacheTier::L1 => self.hot.l1_lookups[result as usize]
                .get_or_init(|| {
                    self.cache_lookups
                        .with_label_values(&[tier.as_str(), result.as_str()])
                })
                .inc(),
            CacheTier::L2 => self
                .cache_lookups
                .with_label_values(&[tier.as_str(), result.as_str()])
                .inc(),
        }
    }

    /// Counts one entry leaving a cache tier.
    pub fn cache_evicted(&self, tier: CacheTier, cause: Eviction) {
        self.cache_evictions
            .with_label_values(&[tier.as_str(), cause.as_str()])
            .inc();
    }

    /// Counts `n` entries dropped on purpose.
    pub fn cache_invalidated(&self, reason: InvalidationReason, n: u64) {
        self.cache_invalidations
            .with_label_values(&[reason.as_str()])
            .inc_by(n);
    }

    /// Sets a tier's entry and weighted byte gauges.
    pub fn cache_size(&self, tier: CacheTier, entries: u64, bytes: u64) {
        self.cache_entries
            .with_label_values(&[tier.as_str()])
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
        self.cache_bytes
            .with_label_values(&[tier.as_str()])
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Counts one stale entry served.
    pub fn stale_served(&self, reason: StaleReason) {
        self.cache_stale_served
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// Counts one wait for another replica's fill, by how it ended.
    pub fn lease_waited(&self, outcome: LeaseWait) {
        self.redis
            .lease_waits
            .with_label_values(&[outcome.as_str()])
            .inc();
    }

    /// Counts one request graphgate answered with its own error.
    pub fn reject(&self, reason: Rejection) {
        self.rejections.with_label_values(&[reason.as_str()]).inc();
    }

    /// Creates the series of every known label value of the sparse counters at 0, so
    /// Prometheus sees the first event as an increase and dashboards show 0, not "no data".
    /// Per-route request series are left out (their label combinations multiply).
    fn preinit(&self) {
        const UPSTREAM_OUTCOMES: &[&str] = &[
            "ok",
            "throttled",
            "auth_error",
            "transient_error",
            "graph_error",
            "http_4xx",
            "http_5xx",
            "upstream_timeout",
            "upstream_connect",
            "upstream_bad_response",
            "upstream_too_large",
        ];
        let touch = |c: &IntCounterVec, values: &[&[&str]]| {
            for v in values {
                c.with_label_values(v);
            }
        };
        for o in UPSTREAM_OUTCOMES {
            self.upstream_requests.with_label_values(&[o]);
        }
        for r in Rejection::ALL {
            self.rejections.with_label_values(&[r.as_str()]);
        }
        for result in CacheResult::ALL {
            self.cache_lookups
                .with_label_values(&[CacheTier::L1.as_str(), result.as_str()]);
        }
        for cause in Eviction::ALL {
            self.cache_evictions
                .with_label_values(&[CacheTier::L1.as_str(), cause.as_str()]);
        }
        for reason in InvalidationReason::ALL {
            self.cache_invalidations
                .with_label_values(&[reason.as_str()]);
        }
        for reason in StaleReason::ALL {
            self.cache_stale_served
                .with_label_values(&[reason.as_str()]);
        }
        touch(
            &self.quota_rejections,
            &[&["queue_timeout"], &["queue_full"]],
        );
        touch(&self.quota_dispatches, &[&["page"], &["app"]]);
        for reason in [
            "paused",
            "probing",
            "awaiting_first_reading",
            "pacing",
            "full",
            "app_paused",
            "queued_behind",
        ] {
            self.quota_waits.with_label_values(&[reason]);
        }
        for scope in ["app", "user", "page", "custom", "buc"] {
            self.quota_throttles.with_label_values(&[scope]);
        }
        let h = &self.hardening;
        for reason in [
            "connect",
            "reset",
            "graph_transient",
            "http_502",
            "http_503",
            "refused",
        ] {
            h.retries.with_label_values(&[reason]);
        }
        touch(
            &h.retries_skipped,
            &[&["budget"], &["deadline"], &["breaker"]],
        );
        touch(&h.config_reloads, &[&["ok"], &["rejected"]]);
    }

    /// Redis is configured: `graphgate_redis_configured` becomes 1 and `graphgate_redis_up`
    /// is exported from now on.
    pub fn redis_in_use(&self) {
        self.redis.configured.set(1);
        // Registering twice (a second link on one registry) is refused and harmless.
        let _ = self.registry.register(Box::new(self.redis.up.clone()));
    }

    /// Drops every per-Page quota series of `page` (it left the busiest Pages).
    pub fn remove_page_series(&self, page: &str) {
        let _ = self.quota_page_usage_ratio.remove_label_values(&[page]);
        let _ = self.quota_page_estimated_limit.remove_label_values(&[page]);
        let _ = self.quota_page_calls_in_window.remove_label_values(&[page]);
        let _ = self.quota_page_queue_depth.remove_label_values(&[page]);
        let _ = self.quota_page_paused.remove_label_values(&[page]);
        let _ = self.quota_page_throttles.remove_label_values(&[page]);
        for metric in ["call_count", "total_time", "total_cputime"] {
            let _ = self.quota_page_usage.remove_label_values(&[page, metric]);
        }
    }

    /// Installs the quota scheduler's gauge refresh (once per registry).
    pub fn set_quota_refresh(&self, f: Box<dyn Fn() + Send + Sync>) {
        let _ = self.quota_refresh.set(f);
    }

    /// Prometheus text exposition of everything registered.
    pub fn render(&self) -> String {
        if let Some(refresh) = self.quota_refresh.get() {
            refresh();
        }
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Label values of every variant, spelled out: dashboards and alerts query these.
    #[test]
    fn label_values_of_every_variant() {
        let values = |all: Vec<&'static str>| all.join(",");
        assert_eq!(
            values(Route::ALL.iter().map(|v| v.as_str()).collect()),
            "node,edge,ids,batch,root,invalid"
        );
        assert_eq!(
            values(RequestMethod::ALL.iter().map(|v| v.as_str()).collect()),
            "GET,POST,DELETE,OTHER"
        );
        assert_eq!(
            values(CacheResult::ALL.iter().map(|v| v.as_str()).collect()),
            "hit,miss,stale,bypass"
        );
        assert_eq!(cache_label(None), "none");
        assert_eq!(cache_label(Some(CacheResult::Stale)), "stale");
        assert_eq!(
            values(CacheTier::ALL.iter().map(|v| v.as_str()).collect()),
            "l1,l2"
        );
        assert_eq!(
            values(Rejection::ALL.iter().map(|v| v.as_str()).collect()),
            "unauthorized,forbidden,bad_request,too_large,body_timeout,upstream_connect,\
             upstream_timeout,upstream_bad_response,upstream_too_large,breaker_open,overloaded,\
             throttled,shutting_down,internal"
        );
        assert_eq!(
            values(Eviction::ALL.iter().map(|v| v.as_str()).collect()),
            "size,expired,explicit,replaced"
        );
        assert_eq!(
            values(InvalidationReason::ALL.iter().map(|v| v.as_str()).collect()),
            "write,purge"
        );
        assert_eq!(
            values(StaleReason::ALL.iter().map(|v| v.as_str()).collect()),
            "revalidate,error"
        );
        assert_eq!(
            values(LeaseWait::ALL.iter().map(|v| v.as_str()).collect()),
            "filled,took_over,gave_up"
        );
    }

    #[test]
    fn a_variant_indexes_all_at_its_own_place() {
        for (i, v) in Route::ALL.iter().enumerate() {
            assert_eq!(*v as usize, i);
        }
        for (i, v) in RequestMethod::ALL.iter().enumerate() {
            assert_eq!(*v as usize, i);
        }
        for (i, v) in CacheResult::ALL.iter().enumerate() {
            assert_eq!(*v as usize, i);
        }
        assert_eq!(cache_index(None), CACHE_LABELS - 1);
    }

    #[test]
    fn methods_and_statuses_fall_into_their_classes() {
        assert_eq!(RequestMethod::of(&http::Method::HEAD), RequestMethod::Get);
        assert_eq!(RequestMethod::of(&http::Method::PUT), RequestMethod::Other);
        let class = |s| CLASSES[status_class(s)];
        assert_eq!(
            [
                class(101),
                class(200),
                class(304),
                class(429),
                class(503),
                class(999)
            ],
            ["1xx", "2xx", "3xx", "4xx", "5xx", "5xx"]
        );
    }

    /// Every combination of the request series' labels lands on its own series, rendered
    /// with the right label values.
    #[test]
    fn request_series_are_one_per_label_combination() {
        let m = Metrics::new();
        let caches: Vec<Option<CacheResult>> = CacheResult::ALL
            .iter()
            .copied()
            .map(Some)
            .chain([None])
            .collect();
        for &route in Route::ALL {
            for &method in RequestMethod::ALL {
                for &cache in &caches {
                    m.observe_request(route, method, 200, cache, Duration::from_millis(1));
                }
            }
        }
        m.observe_request(
            Route::Node,
            RequestMethod::Get,
            404,
            Some(CacheResult::Miss),
            Duration::ZERO,
        );
        let families = m.registry().gather();
        let requests = families
            .iter()
            .find(|f| f.name() == "graphgate_requests_total")
            .expect("requests family");
        assert_eq!(
            requests.get_metric().len(),
            Route::ALL.len() * RequestMethod::ALL.len() * caches.len() + 1
        );
        let text = m.render();
        assert!(
            text.contains(
                "graphgate_requests_total{cache=\"none\",method=\"OTHER\",route=\"invalid\",status_class=\"2xx\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains(
            "graphgate_requests_total{cache=\"miss\",method=\"GET\",route=\"node\",status_class=\"4xx\"} 1"
        ));
    }
}
