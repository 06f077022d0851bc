//! The quota scheduler. Per-Page series exist for Pages listed in `[[quota.pages]]` and the
//! `quota.metrics_top_pages` busiest others (series of Pages that drop out of the top are
//! removed), so label cardinality is bounded by configuration.

use std::sync::OnceLock;

use prometheus::{
    GaugeVec, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry,
};

use super::labels::{AdmissionSource, QueueWait, QuotaRejection};
use super::{counter, counter_vec, gauge, gauge_vec, histogram_vec, int_gauge_vec};

pub struct QuotaMetrics {
    /// Calls waiting for budget, all buckets.
    pub queue_depth: IntGauge,
    /// Time from arrival at the scheduler to admission or rejection, by outcome.
    pub queue_wait: HistogramVec,
    /// Calls admitted upstream, by bucket kind (page, app).
    pub dispatches: IntCounterVec,
    /// Calls refused by the scheduler, by reason (queue_timeout, queue_full).
    pub rejections: IntCounterVec,
    /// Calls that could not go at once and queued, by why (paused, probing,
    /// awaiting_first_reading, pacing, full, app_paused, queued_behind).
    pub waits: IntCounterVec,
    /// Throttled GETs put back into their queue instead of answered.
    pub requeues: IntCounter,
    /// Throttle codes received from Graph, by scope (page, app, user, custom, buc).
    pub throttles: IntCounterVec,
    /// Buckets currently paused after a throttle code or 100 % usage.
    pub paused_buckets: IntGauge,
    /// Quota buckets held (bounded by `quota.max_buckets` plus those in use).
    pub buckets: IntGauge,
    /// 1 while Graph's app-level throttle holds every call.
    pub app_paused: IntGauge,
    /// Last X-App-Usage percentages, by metric (call_count, total_time, total_cputime).
    pub app_usage: GaugeVec,
    /// Last X-Business-Use-Case-Usage percentages of a Page, by page and metric.
    pub page_usage: GaugeVec,
    /// Queue depth of a Page.
    pub page_queue_depth: IntGaugeVec,
    /// Estimated usage of a Page's limit, 0–1 (latest reading plus calls since).
    pub page_usage_ratio: GaugeVec,
    /// Estimated limit of a Page, calls per window.
    pub page_estimated_limit: GaugeVec,
    /// Calls graphgate sent for a Page in the current window.
    pub page_calls_in_window: IntGaugeVec,
    /// 1 while a Page is paused (throttle code or 100 % usage).
    pub page_paused: IntGaugeVec,
    /// Throttle codes Graph returned for calls charged to a Page with per-Page series.
    pub page_throttles: IntCounterVec,
    /// Quota admission decisions by where they were made (redis, local).
    pub admissions: IntCounterVec,
    /// Refreshes the time-dependent quota gauges just before a scrape.
    refresh: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl QuotaMetrics {
    pub(super) fn new(r: &Registry) -> QuotaMetrics {
        let m = QuotaMetrics {
            queue_depth: gauge(r, "graphgate_quota_queue_depth", "Calls waiting for quota budget."),
            queue_wait: histogram_vec(
                r,
                "graphgate_quota_queue_wait_seconds",
                "Time calls spent waiting for quota budget, by outcome (admitted, rejected).",
                &["outcome"],
            ),
            dispatches: counter_vec(
                r,
                "graphgate_quota_dispatches_total",
                "Calls admitted upstream by the quota scheduler, by bucket kind.",
                &["bucket"],
            ),
            rejections: counter_vec(
                r,
                "graphgate_quota_rejections_total",
                "Calls refused with 429 by the quota scheduler, by reason.",
                &["reason"],
            ),
            waits: counter_vec(
                r,
                "graphgate_quota_waits_total",
                "Calls that queued for quota instead of going at once, by why.",
                &["reason"],
            ),
            requeues: counter(
                r,
                "graphgate_quota_requeues_total",
                "Throttled GETs re-queued instead of answered.",
            ),
            throttles: counter_vec(
                r,
                "graphgate_quota_throttles_total",
                "Throttle error codes received from Graph, by scope.",
                &["scope"],
            ),
            paused_buckets: gauge(
                r,
                "graphgate_quota_paused_buckets",
                "Quota buckets (Pages, app) currently paused.",
            ),
            buckets: gauge(
                r,
                "graphgate_quota_buckets",
                "Quota buckets held (bounded by quota.max_buckets plus those in use).",
            ),
            app_paused: gauge(
                r,
                "graphgate_quota_app_paused",
                "1 while Graph's app-level throttle holds every call.",
            ),
            app_usage: gauge_vec(
                r,
                "graphgate_quota_app_usage_percent",
                "Last X-App-Usage reading.",
                &["metric"],
            ),
            page_usage: gauge_vec(
                r,
                "graphgate_quota_page_usage_percent",
                "Last X-Business-Use-Case-Usage reading of a Page (listed and busiest Pages).",
                &["page", "metric"],
            ),
            page_queue_depth: int_gauge_vec(
                r,
                "graphgate_quota_page_queue_depth",
                "Calls waiting for budget, per Page (listed and busiest Pages).",
                &["page"],
            ),
            page_usage_ratio: gauge_vec(
                r,
                "graphgate_quota_page_usage_ratio",
                "Estimated usage of the Page's limit, 0-1: latest reading plus calls sent since (listed and busiest Pages).",
                &["page"],
            ),
            page_estimated_limit: gauge_vec(
                r,
                "graphgate_quota_page_estimated_limit",
                "Estimated limit of the Page, calls per window (page_calls unless readings show otherwise).",
                &["page"],
            ),
            page_calls_in_window: int_gauge_vec(
                r,
                "graphgate_quota_page_calls_in_window",
                "Calls sent for the Page in the current window (the fleet's with Redis).",
                &["page"],
            ),
            page_paused: int_gauge_vec(
                r,
                "graphgate_quota_page_paused",
                "1 while the Page is paused after a throttle code or 100 % usage (listed and busiest Pages).",
                &["page"],
            ),
            page_throttles: counter_vec(
                r,
                "graphgate_quota_page_throttles_total",
                "Throttle codes Graph returned for calls charged to the Page (listed and busiest Pages).",
                &["page"],
            ),
            admissions: counter_vec(
                r,
                "graphgate_quota_admission_decisions_total",
                "Quota admission decisions, by where they were made (redis, local).",
                &["source"],
            ),
            refresh: OnceLock::new(),
        };
        // Every series from the start, at 0: alerts on rates need them to exist.
        for reason in QuotaRejection::ALL {
            m.rejections.with_label_values(&[reason.as_str()]);
        }
        for kind in ["page", "app"] {
            m.dispatches.with_label_values(&[kind]);
        }
        for reason in [
            "paused",
            "probing",
            "awaiting_first_reading",
            "pacing",
            "full",
            "app_paused",
            "queued_behind",
        ] {
            m.waits.with_label_values(&[reason]);
        }
        for scope in ["app", "user", "page", "custom", "buc"] {
            m.throttles.with_label_values(&[scope]);
        }
        m
    }

    /// Records how long a call waited at the scheduler, by how the wait ended.
    pub fn waited(&self, outcome: QueueWait, seconds: f64) {
        self.queue_wait
            .with_label_values(&[outcome.as_str()])
            .observe(seconds);
    }

    /// Counts one call the scheduler refused.
    pub fn rejected(&self, reason: QuotaRejection) {
        self.rejections.with_label_values(&[reason.as_str()]).inc();
    }

    /// Counts one admission decision by where it was made.
    pub fn decided(&self, source: AdmissionSource) {
        self.admissions.with_label_values(&[source.as_str()]).inc();
    }

    /// Drops every per-Page quota series of `page` (it left the busiest Pages).
    pub fn remove_page_series(&self, page: &str) {
        let _ = self.page_usage_ratio.remove_label_values(&[page]);
        let _ = self.page_estimated_limit.remove_label_values(&[page]);
        let _ = self.page_calls_in_window.remove_label_values(&[page]);
        let _ = self.page_queue_depth.remove_label_values(&[page]);
        let _ = self.page_paused.remove_label_values(&[page]);
        let _ = self.page_throttles.remove_label_values(&[page]);
        for metric in ["call_count", "total_time", "total_cputime"] {
            let _ = self.page_usage.remove_label_values(&[page, metric]);
        }
    }

    /// Installs the quota scheduler's gauge refresh (once per registry).
    pub fn set_refresh(&self, f: Box<dyn Fn() + Send + Sync>) {
        let _ = self.refresh.set(f);
    }

    /// Runs the installed refresh, if any: before every scrape.
    pub(super) fn refresh(&self) {
        if let Some(refresh) = self.refresh.get() {
            refresh();
        }
    }
}
