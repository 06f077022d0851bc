//! Calls to Graph: outcomes and durations, retries, the circuit breaker, and the reply
//! budget (bytes of reply bodies held in memory).

use std::time::Duration;

use prometheus::{HistogramVec, IntCounter, IntCounterVec, IntGauge, Registry};

use super::labels::{GraphAnswer, RetrySkip, UpstreamOutcome};
use super::{counter, counter_vec, gauge, histogram_vec};

pub struct UpstreamMetrics {
    /// Calls to Graph by outcome (ok, throttled, auth_error, transient_error, graph_error,
    /// http_4xx, http_5xx, upstream_timeout, upstream_connect, upstream_bad_response).
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    /// GETs sent as POST + method=GET because their URL was too long.
    pub large_get_rewrites: IntCounter,
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
    /// Bytes of reply bodies held in memory now (see `upstream.max_buffered_reply_bytes`).
    pub buffered_reply_bytes: IntGauge,
    /// Replies answered 503 because buffering them would exceed
    /// `upstream.max_buffered_reply_bytes`, by source (upstream, cache).
    pub reply_budget_rejections: IntCounterVec,
}

impl UpstreamMetrics {
    pub(super) fn new(r: &Registry) -> UpstreamMetrics {
        let m = UpstreamMetrics {
            requests: counter_vec(
                r,
                "graphgate_upstream_requests_total",
                "HTTP requests sent to the Graph API, by outcome.",
                &["outcome"],
            ),
            duration: histogram_vec(
                r,
                "graphgate_upstream_duration_seconds",
                "Duration of Graph API requests, including reading the body.",
                &["outcome"],
            ),
            large_get_rewrites: counter(
                r,
                "graphgate_large_get_rewrites_total",
                "GET requests sent upstream as POST with method=GET because the URL was too long.",
            ),
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
        };
        // Every series from the start, at 0: alerts on rates need them to exist.
        let outcomes = GraphAnswer::ALL
            .iter()
            .map(|a| UpstreamOutcome::Answered(*a))
            .chain(
                UpstreamOutcome::FAILURES
                    .iter()
                    .map(|r| UpstreamOutcome::Failed(*r)),
            );
        for outcome in outcomes {
            m.requests.with_label_values(&[outcome.as_str()]);
        }
        for reason in [
            "connect",
            "reset",
            "graph_transient",
            "http_502",
            "http_503",
            "refused",
        ] {
            m.retries.with_label_values(&[reason]);
        }
        for reason in RetrySkip::ALL {
            m.retries_skipped.with_label_values(&[reason.as_str()]);
        }
        for source in ["upstream", "cache"] {
            m.reply_budget_rejections.with_label_values(&[source]);
        }
        m
    }

    /// Counts one retry that was due but not made.
    pub fn retry_skipped(&self, why: RetrySkip) {
        self.retries_skipped
            .with_label_values(&[why.as_str()])
            .inc();
    }

    /// Counts one call to Graph by outcome, with its duration.
    pub fn observe(&self, outcome: UpstreamOutcome, took: Duration) {
        let outcome = outcome.as_str();
        self.requests.with_label_values(&[outcome]).inc();
        self.duration
            .with_label_values(&[outcome])
            .observe(took.as_secs_f64());
    }
}
