//! Every metric graphgate exports, defined and registered here once. Each gateway instance
//! owns its own registry, so several instances can run in one process (tests, benches).
//! Labels are bounded by construction: route classes, outcomes and status classes are fixed
//! sets; no token, key or raw path ever becomes a label.

use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Latency buckets in seconds, from a cache hit (~50 µs) to a slow Graph call (30 s).
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

pub struct Metrics {
    registry: Registry,
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

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("metric definition is valid");
    registry
        .register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

impl Metrics {
    pub fn new() -> Metrics {
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
                &["route", "cache"],
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
            cache_entries: gauge_vec(
                &r,
                "graphgate_cache_entries",
                "Entries in the cache tier.",
                &["tier"],
            ),
            cache_bytes: gauge_vec(
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
        route: &str,
        method: &str,
        status: u16,
        cache: &str,
        took: Duration,
    ) {
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.requests
            .with_label_values(&[route, method, class, cache])
            .inc();
        self.request_duration
            .with_label_values(&[route, cache])
            .observe(took.as_secs_f64());
    }

    /// Prometheus text exposition of everything registered.
    pub fn render(&self) -> String {
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
