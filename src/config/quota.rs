//! `[quota]`: the per-Page budget graphgate keeps calls within, and how it queues.

use std::time::Duration;

use serde::Deserialize;

use super::{invalid, ConfigError};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawQuota {
    page_calls: u32,
    page_window_s: u64,
    queue_timeout_ms: u64,
    max_queue_depth: usize,
    slowdown_threshold_pct: u32,
    headroom_pct: u32,
    app_calls: Option<u32>,
    learn_limits: bool,
    metrics_top_pages: usize,
    max_buckets: usize,
    pages: Vec<RawQuotaPage>,
}

impl Default for RawQuota {
    fn default() -> Self {
        RawQuota {
            page_calls: 4800,
            page_window_s: 3600,
            queue_timeout_ms: 10_000,
            max_queue_depth: 1000,
            slowdown_threshold_pct: 60,
            headroom_pct: 2,
            app_calls: None,
            learn_limits: false,
            metrics_top_pages: 50,
            max_buckets: 50_000,
            pages: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuotaPage {
    id: String,
    page_calls: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct QuotaConfig {
    pub page_calls: u32,
    pub page_window: Duration,
    pub queue_timeout: Duration,
    pub max_queue_depth: usize,
    /// Estimated usage (percent) below which calls go at once; above it, what is left is
    /// spread until counted calls leave the window.
    pub slowdown_threshold_pct: u32,
    /// Percent of the limit never used: the admission ceiling is `100 − headroom_pct`.
    pub headroom_pct: u32,
    /// Starting guess of the app-level bucket per `page_window`.
    pub app_calls: u32,
    /// Whether a limit learned from usage readings may go above `page_calls`.
    pub learn_limits: bool,
    /// Per-Page metric series for this many of the busiest Pages (listed Pages always).
    pub metrics_top_pages: usize,
    /// Quota buckets kept (plus those in use by a call).
    pub max_buckets: usize,
    /// Listed Pages: their ceiling (the default when not overridden); they also get per-Page
    /// metric series.
    pub pages: Vec<(String, u32)>,
}

impl RawQuota {
    pub(super) fn validate(self) -> Result<QuotaConfig, ConfigError> {
        let q = self;
        if q.page_calls == 0 {
            return Err(invalid("quota.page_calls", "must be positive"));
        }
        if q.page_window_s == 0 {
            return Err(invalid("quota.page_window_s", "must be positive"));
        }
        for (i, p) in q.pages.iter().enumerate() {
            if p.page_calls == Some(0) {
                return Err(invalid(
                    &format!("quota.pages[{i}].page_calls"),
                    "must be positive",
                ));
            }
            if p.id.is_empty() || !p.id.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid(
                    &format!("quota.pages[{i}].id"),
                    format!("`{}` is not a Page id", p.id),
                ));
            }
        }
        if q.max_queue_depth == 0 {
            return Err(invalid("quota.max_queue_depth", "must be positive"));
        }
        if q.max_buckets == 0 {
            return Err(invalid("quota.max_buckets", "must be positive"));
        }
        if !(1..=100).contains(&q.slowdown_threshold_pct) {
            return Err(invalid("quota.slowdown_threshold_pct", "must be 1 to 100"));
        }
        if q.headroom_pct >= 50 {
            return Err(invalid("quota.headroom_pct", "must be below 50"));
        }
        if q.app_calls == Some(0) {
            return Err(invalid("quota.app_calls", "must be positive"));
        }
        Ok(QuotaConfig {
            page_calls: q.page_calls,
            page_window: Duration::from_secs(q.page_window_s),
            queue_timeout: Duration::from_millis(q.queue_timeout_ms),
            max_queue_depth: q.max_queue_depth,
            slowdown_threshold_pct: q.slowdown_threshold_pct,
            headroom_pct: q.headroom_pct,
            app_calls: q.app_calls.unwrap_or(q.page_calls),
            learn_limits: q.learn_limits,
            metrics_top_pages: q.metrics_top_pages,
            max_buckets: q.max_buckets,
            pages: q
                .pages
                .into_iter()
                .map(|p| (p.id, p.page_calls.unwrap_or(q.page_calls)))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{no_env, MIN};
    use crate::config::Config;

    use super::*;

    #[test]
    fn quota_keys_have_defaults_and_are_checked() {
        let c = Config::from_toml(MIN, no_env).unwrap();
        assert_eq!(c.quota.slowdown_threshold_pct, 60);
        assert_eq!(c.quota.headroom_pct, 2);
        assert!(!c.quota.learn_limits);
        assert_eq!(c.quota.metrics_top_pages, 50);
        assert_eq!(c.quota.max_buckets, 50_000);
        assert_eq!(c.quota.app_calls, 4800);
        let text = format!("{MIN}\n[quota]\npage_calls = 10\n[[quota.pages]]\nid = \"1001\"\n[[quota.pages]]\nid = \"1002\"\npage_calls = 5\n");
        let c = Config::from_toml(&text, no_env).unwrap();
        assert_eq!(
            c.quota.pages,
            [("1001".to_string(), 10), ("1002".to_string(), 5)]
        );
        assert_eq!(c.quota.app_calls, 10);
        for bad in [
            "slowdown_threshold_pct = 0",
            "headroom_pct = 50",
            "max_queue_depth = 0",
            "max_buckets = 0",
        ] {
            let text = format!("{MIN}\n[quota]\n{bad}\n");
            let err = Config::from_toml(&text, no_env).unwrap_err().to_string();
            assert!(err.contains("quota."), "{bad}: {err}");
        }
    }

    #[test]
    fn listed_pages_are_page_ids() {
        let page = |id: &str| RawQuotaPage {
            id: id.into(),
            page_calls: None,
        };
        let err = RawQuota {
            pages: vec![page("1001"), page("me")],
            ..RawQuota::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("quota.pages[1].id"), "{err}");
    }
}
