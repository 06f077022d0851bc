//! `[upstream]`: where Graph is, how long to wait for it, how much of its replies to hold,
//! and how reads are retried.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{invalid, is_version, validate_base_url, ConfigError};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawUpstream {
    pub(super) url: String,
    timeout_ms: u64,
    connect_timeout_ms: u64,
    max_get_url_bytes: usize,
    max_response_bytes: usize,
    max_buffered_reply_bytes: usize,
    default_version: String,
    ca_file: Option<String>,
    // Hardening: retries of idempotent reads and the circuit breaker.
    retries: u32,
    retry_budget_percent: u32,
    retry_budget_min_per_s: u32,
    retry_backoff_ms: u64,
    breaker_failures: u32,
    breaker_cooldown_ms: u64,
}

impl Default for RawUpstream {
    fn default() -> Self {
        RawUpstream {
            url: "https://graph.facebook.com".into(),
            timeout_ms: 30_000,
            connect_timeout_ms: 5_000,
            max_get_url_bytes: 2000,
            max_response_bytes: 16 * 1024 * 1024,
            max_buffered_reply_bytes: 256 * 1024 * 1024,
            default_version: "v21.0".into(),
            ca_file: None,
            retries: 2,
            retry_budget_percent: 20,
            retry_budget_min_per_s: 3,
            retry_backoff_ms: 50,
            breaker_failures: 5,
            breaker_cooldown_ms: 5_000,
        }
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Scheme + authority, no trailing slash, e.g. `https://graph.facebook.com`.
    pub url: String,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub max_get_url_bytes: usize,
    pub max_response_bytes: usize,
    /// Reply bodies held in memory at once, all requests together (upstream replies being
    /// read or written to clients, cached bodies decompressed or copied for one client);
    /// a reply that would exceed it is answered 503.
    pub max_buffered_reply_bytes: usize,
    pub default_version: String,
    /// Extra CAs (PEM) trusted for Graph's certificate besides the public roots: a TLS
    /// inspecting egress proxy, or the simulated Graph API in tests.
    pub ca_file: Option<PathBuf>,
    pub retry: RetryConfig,
}

/// Retries of idempotent reads and the circuit breaker in front of Graph.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// Extra attempts after the first; 0 disables retries.
    pub retries: u32,
    /// Retries may add at most this share of recent requests...
    pub budget_percent: u32,
    /// ...plus this many per second.
    pub budget_min_per_s: u32,
    /// Base of the exponential backoff; each wait is uniform in [0, base * 2^n).
    pub backoff: Duration,
    /// Consecutive failures that open the breaker; 0 disables it.
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
}

impl RawUpstream {
    pub(super) fn validate(self) -> Result<UpstreamConfig, ConfigError> {
        let u = self;
        let url = validate_base_url("upstream.url", &u.url)?;
        if u.timeout_ms == 0 {
            return Err(invalid("upstream.timeout_ms", "must be positive"));
        }
        if u.max_get_url_bytes < 64 {
            return Err(invalid("upstream.max_get_url_bytes", "must be at least 64"));
        }
        if u.retry_budget_percent > 100 {
            return Err(invalid("upstream.retry_budget_percent", "must be 0..=100"));
        }
        let max_response_bytes = u.max_response_bytes.max(1024);
        if u.max_buffered_reply_bytes < max_response_bytes {
            return Err(invalid(
                "upstream.max_buffered_reply_bytes",
                format!("must be at least upstream.max_response_bytes ({max_response_bytes}), or no reply of that size could ever be served"),
            ));
        }
        if u.retries > 10 {
            return Err(invalid("upstream.retries", "must be 0..=10"));
        }
        if !is_version(&u.default_version) {
            return Err(invalid(
                "upstream.default_version",
                format!("`{}` is not a Graph version like v21.0", u.default_version),
            ));
        }
        Ok(UpstreamConfig {
            url,
            timeout: Duration::from_millis(u.timeout_ms),
            connect_timeout: Duration::from_millis(u.connect_timeout_ms.max(1)),
            max_get_url_bytes: u.max_get_url_bytes,
            max_response_bytes,
            max_buffered_reply_bytes: u.max_buffered_reply_bytes,
            default_version: u.default_version,
            ca_file: u.ca_file.map(Into::into),
            retry: RetryConfig {
                retries: u.retries,
                budget_percent: u.retry_budget_percent,
                budget_min_per_s: u.retry_budget_min_per_s,
                backoff: Duration::from_millis(u.retry_backoff_ms),
                breaker_failures: u.breaker_failures,
                breaker_cooldown: Duration::from_millis(u.breaker_cooldown_ms.max(1)),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_validates_on_its_own() {
        let u = RawUpstream::default().validate().unwrap();
        assert_eq!(u.url, "https://graph.facebook.com");
        assert_eq!(u.max_get_url_bytes, 2000);
        assert_eq!(u.retry.retries, 2);
        let small = RawUpstream {
            max_response_bytes: 10,
            ..RawUpstream::default()
        }
        .validate()
        .unwrap();
        assert_eq!(small.max_response_bytes, 1024, "raised to the floor");
        let err = RawUpstream {
            max_response_bytes: 4096,
            max_buffered_reply_bytes: 2048,
            ..RawUpstream::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("upstream.max_buffered_reply_bytes"), "{err}");
        assert!(err.contains("(4096)"), "{err}");
    }
}
