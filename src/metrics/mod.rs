//! Every metric graphgate exports, grouped by the component it describes, on one registry.
//! Each gateway instance owns its own registry, so several instances can run in one process
//! (tests, benches). Labels are bounded by construction: the values are the enums of
//! [`labels`] or fixed sets chosen in code; no token, key or raw path ever becomes a label.
//!
//! - [`server`]: requests, graphgate's own error replies, connections, load, reloads;
//! - [`upstream`]: calls to Graph, retries, the breaker, the reply budget;
//! - [`cache`]: lookups, sizes, evictions, invalidations, stale serves, fill waits;
//! - [`quota`]: the quota scheduler, app-wide and per Page;
//! - [`tokens`], [`tls`], [`redis`].

pub mod cache;
pub mod labels;
pub mod quota;
pub mod redis;
pub mod server;
pub mod tls;
pub mod tokens;
pub mod upstream;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub use labels::{
    cache_label, AdmissionSource, CacheResult, CacheTier, ConfigReload, Eviction, GraphAnswer,
    InvalidationReason, LeaseWait, Listener, QueueWait, QuotaRejection, RedisOp, Rejection,
    RequestMethod, RetrySkip, Route, StaleReason, UpstreamOutcome, WebhookOutcome,
};

/// Latency buckets in seconds, from a cache hit (~50 µs) to a slow Graph call (30 s).
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

pub struct Metrics {
    registry: Registry,
    pub server: server::ServerMetrics,
    pub upstream: upstream::UpstreamMetrics,
    pub cache: cache::CacheMetrics,
    pub quota: quota::QuotaMetrics,
    pub tokens: tokens::TokenMetrics,
    pub tls: tls::TlsMetrics,
    pub redis: redis::RedisMetrics,
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
            server: server::ServerMetrics::new(&r),
            upstream: upstream::UpstreamMetrics::new(&r),
            cache: cache::CacheMetrics::new(&r),
            quota: quota::QuotaMetrics::new(&r),
            tokens: tokens::TokenMetrics::new(&r),
            tls: tls::TlsMetrics::new(&r),
            redis: redis::RedisMetrics::new(&r),
            registry: r,
        }
    }

    /// Redis is configured: `graphgate_redis_configured` becomes 1 and `graphgate_redis_up`
    /// is exported from now on.
    pub fn redis_in_use(&self) {
        self.redis.configured.set(1);
        // Registering twice (a second link on one registry) is refused and harmless.
        let _ = self.registry.register(Box::new(self.redis.up.clone()));
    }

    /// Prometheus text exposition of everything registered.
    pub fn render(&self) -> String {
        self.quota.refresh();
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Label values of every variant, spelled out: dashboards and alerts query these.
    #[test]
    fn label_values_of_every_variant() {
        let values = |all: Vec<&'static str>| all.join(",");
        assert_eq!(
            values(Route::ALL.iter().map(|v| v.as_str()).collect()),
            "node,edge,ids,batch,root,invalid,webhook"
        );
        assert_eq!(
            values(WebhookOutcome::ALL.iter().map(|v| v.as_str()).collect()),
            "verified,handshake_refused,bad_signature,stale,replayed,malformed,ignored,purged"
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
        assert_eq!(
            values(Listener::ALL.iter().map(|v| v.as_str()).collect()),
            "public,admin"
        );
        assert_eq!(
            values(ConfigReload::ALL.iter().map(|v| v.as_str()).collect()),
            "ok,rejected"
        );
        assert_eq!(
            values(RedisOp::ALL.iter().map(|v| v.as_str()).collect()),
            "get,store,invalidate,publish,lease,admit,pause,refund,ping,subscribe,purge,observe,heartbeat,status,peek"
        );
        assert_eq!(
            values(QuotaRejection::ALL.iter().map(|v| v.as_str()).collect()),
            "queue_timeout,queue_full"
        );
        assert_eq!(
            values(AdmissionSource::ALL.iter().map(|v| v.as_str()).collect()),
            "redis,local"
        );
        assert_eq!(
            values(RetrySkip::ALL.iter().map(|v| v.as_str()).collect()),
            "budget,deadline,breaker"
        );
        assert_eq!(
            values(QueueWait::ALL.iter().map(|v| v.as_str()).collect()),
            "admitted,rejected"
        );
        assert_eq!(
            values(GraphAnswer::ALL.iter().map(|v| v.as_str()).collect()),
            "ok,throttled,auth_error,transient_error,graph_error,http_4xx,http_5xx"
        );
        assert_eq!(
            values(
                UpstreamOutcome::FAILURES
                    .iter()
                    .map(|r| UpstreamOutcome::Failed(*r).as_str())
                    .collect()
            ),
            "upstream_timeout,upstream_connect,upstream_bad_response,upstream_too_large"
        );
        assert_eq!(
            UpstreamOutcome::Answered(GraphAnswer::Http5xx).as_str(),
            "http_5xx"
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
                    m.server
                        .observe_request(route, method, 200, cache, Duration::from_millis(1));
                }
            }
        }
        // One per status class.
        for status in [101, 304, 404, 503, 999] {
            m.server.observe_request(
                Route::Node,
                RequestMethod::Get,
                status,
                Some(CacheResult::Miss),
                Duration::ZERO,
            );
        }
        m.server.observe_request(
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
            Route::ALL.len() * RequestMethod::ALL.len() * caches.len() + 4
        );
        let text = m.render();
        assert!(
            text.contains(
                "graphgate_requests_total{cache=\"none\",method=\"OTHER\",route=\"invalid\",status_class=\"2xx\"} 1"
            ),
            "{text}"
        );
        for (class, n) in [("1xx", 1), ("2xx", 1), ("3xx", 1), ("4xx", 2), ("5xx", 2)] {
            let line = format!(
                "graphgate_requests_total{{cache=\"miss\",method=\"GET\",route=\"node\",status_class=\"{class}\"}} {n}"
            );
            assert!(text.contains(&line), "{line}");
        }
    }
}
