//! The request path and the listeners: requests by route, method, status class and cache
//! result; graphgate's own error replies; connections, in-flight requests, load shedding and
//! configuration reloads.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, Registry};

use super::labels::{
    cache_label, CacheResult, ConfigReload, Listener, Rejection, RequestMethod, Route,
    WebhookOutcome,
};
use super::{counter, counter_vec, gauge, histogram_vec};

/// Status classes of the `status_class` label, indexed by [`status_class`].
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

/// Request series: every route, method, status class and cache label.
const SERIES: usize = Route::ALL.len() * RequestMethod::ALL.len() * CLASSES.len() * CACHE_LABELS;

pub struct ServerMetrics {
    /// Requests answered, by route class, method, status class and cache result.
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    /// Errors graphgate itself answered, by reason.
    pub rejections: IntCounterVec,
    /// Requests to the Meta Webhooks endpoint (handshakes and deliveries), by outcome.
    pub webhook_notifications: IntCounterVec,
    /// Connections currently open on the public listener.
    pub open_connections: IntGauge,
    pub requests_in_flight: IntGauge,
    /// Requests answered 503 because `server.max_in_flight` were being handled.
    pub load_shed: IntCounter,
    /// Connections closed at once because `server.max_connections` (public listener) or
    /// `server.admin_max_connections` (admin listener) were open, by listener.
    pub connections_refused: IntCounterVec,
    /// Connections closed after `server.idle_timeout_ms` without a request, or on HTTP/1
    /// when the next head did not arrive within `server.header_read_timeout_ms` of the last
    /// reply, by listener.
    pub connections_idle_closed: IntCounterVec,
    /// Connections closed because no request head arrived within
    /// `server.header_read_timeout_ms` of accepting them, by listener.
    pub connections_head_timeout: IntCounterVec,
    /// Configuration reloads by result (ok, rejected).
    pub config_reloads: IntCounterVec,
    /// The per-request series, resolved on first use and kept: `with_label_values` hashes
    /// every label value and takes the vector's lock, twice per request on the hit path. A
    /// series appears in /metrics only once used.
    hot_requests: Box<[OnceLock<IntCounter>]>,
    hot_durations: Box<[OnceLock<Histogram>]>,
}

impl ServerMetrics {
    pub(super) fn new(r: &Registry) -> ServerMetrics {
        fn cells<T>(n: usize) -> Box<[OnceLock<T>]> {
            (0..n).map(|_| OnceLock::new()).collect()
        }
        let m = ServerMetrics {
            requests: counter_vec(
                r,
                "graphgate_requests_total",
                "Requests answered by graphgate.",
                &["route", "method", "status_class", "cache"],
            ),
            request_duration: histogram_vec(
                r,
                "graphgate_request_duration_seconds",
                "Time from request head to response head.",
                &["route", "method", "status_class", "cache"],
            ),
            rejections: counter_vec(
                r,
                "graphgate_rejections_total",
                "Requests graphgate answered with its own error, by reason.",
                &["reason"],
            ),
            webhook_notifications: counter_vec(
                r,
                "graphgate_webhook_notifications_total",
                "Requests to the Meta Webhooks endpoint (handshakes and deliveries), by outcome.",
                &["outcome"],
            ),
            open_connections: gauge(
                r,
                "graphgate_open_connections",
                "Client connections currently open.",
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
            connections_refused: counter_vec(
                r,
                "graphgate_connections_refused_total",
                "Connections closed at once because server.max_connections (public) or server.admin_max_connections (admin) were open, by listener.",
                &["listener"],
            ),
            connections_idle_closed: counter_vec(
                r,
                "graphgate_connections_idle_closed_total",
                "Connections closed after server.idle_timeout_ms without a request (HTTP/1: or server.header_read_timeout_ms after the last reply without the next head), by listener.",
                &["listener"],
            ),
            connections_head_timeout: counter_vec(
                r,
                "graphgate_connections_head_timeout_total",
                "Connections closed because no request head arrived within server.header_read_timeout_ms of connecting, by listener.",
                &["listener"],
            ),
            config_reloads: counter_vec(
                r,
                "graphgate_config_reloads_total",
                "Configuration reloads (SIGHUP), by result.",
                &["result"],
            ),
            hot_requests: cells(SERIES),
            hot_durations: cells(SERIES),
        };
        // Every series from the start, at 0: alerts on rates need them to exist.
        for r in Rejection::ALL {
            m.rejections.with_label_values(&[r.as_str()]);
        }
        for listener in Listener::ALL {
            let listener = listener.as_str();
            m.connections_refused.with_label_values(&[listener]);
            m.connections_idle_closed.with_label_values(&[listener]);
            m.connections_head_timeout.with_label_values(&[listener]);
        }
        for result in ConfigReload::ALL {
            m.config_reloads.with_label_values(&[result.as_str()]);
        }
        m
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
        self.hot_requests[i]
            .get_or_init(|| self.requests.with_label_values(&labels()))
            .inc();
        self.hot_durations[i]
            .get_or_init(|| self.request_duration.with_label_values(&labels()))
            .observe(took.as_secs_f64());
    }

    /// Counts one configuration reload by how it ended.
    pub fn reloaded(&self, result: ConfigReload) {
        self.config_reloads
            .with_label_values(&[result.as_str()])
            .inc();
    }

    /// Counts one connection closed at once because the listener had its maximum open.
    pub fn refused(&self, listener: Listener) {
        self.connections_refused
            .with_label_values(&[listener.as_str()])
            .inc();
    }

    /// Counts one connection closed for sending no request head in time.
    pub fn head_timed_out(&self, listener: Listener) {
        self.connections_head_timeout
            .with_label_values(&[listener.as_str()])
            .inc();
    }

    /// Counts one connection closed after idling.
    pub fn idle_closed(&self, listener: Listener) {
        self.connections_idle_closed
            .with_label_values(&[listener.as_str()])
            .inc();
    }

    /// Counts one request graphgate answered with its own error.
    pub fn reject(&self, reason: Rejection) {
        self.rejections.with_label_values(&[reason.as_str()]).inc();
    }

    /// Creates the webhook series at 0, on installs that serve the endpoint.
    pub fn webhooks_served(&self) {
        for o in WebhookOutcome::ALL {
            self.webhook_notifications.with_label_values(&[o.as_str()]);
        }
    }

    pub fn webhook(&self, outcome: WebhookOutcome) {
        self.webhook_notifications
            .with_label_values(&[outcome.as_str()])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn the_cache_label_none_comes_after_every_result() {
        assert_eq!(cache_index(None), CACHE_LABELS - 1);
        for r in CacheResult::ALL {
            assert!(cache_index(Some(*r)) < CACHE_LABELS - 1);
        }
    }
}
