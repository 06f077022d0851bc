//! `[redis]`: with a `url`, replicas share cache entries, Page budgets, invalidations and
//! fill leases through it (see `redis_conn`); without one graphgate is a single node.

use std::time::Duration;

use serde::Deserialize;

use super::{invalid, ConfigError, Secret};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRedis {
    pub(super) url: Option<Secret>,
    // Scale-out: keys, tight timeouts, degraded budgets.
    key_prefix: String,
    timeout_ms: u64,
    local_budget_fraction: Option<f64>,
}

impl Default for RawRedis {
    fn default() -> Self {
        RawRedis {
            url: None,
            key_prefix: "gg:".into(),
            timeout_ms: 50,
            local_budget_fraction: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// May carry a password, hence a secret.
    pub url: Option<Secret>,
    /// Prepended to every key and channel, so several fleets (or tests) share one Redis.
    pub key_prefix: String,
    /// Every Redis command gives up after this; Redis must never slow a request down much.
    pub timeout: Duration,
    /// Share of each Page budget a replica uses on its own while Redis is unreachable;
    /// unset: one over the replicas last seen alive (heartbeats in Redis).
    pub local_budget_fraction: Option<f64>,
}

impl RawRedis {
    pub(super) fn validate(self) -> Result<RedisConfig, ConfigError> {
        if self.timeout_ms == 0 || self.timeout_ms > 10_000 {
            return Err(invalid("redis.timeout_ms", "must be 1..=10000"));
        }
        if self
            .local_budget_fraction
            .is_some_and(|f| !(f > 0.0 && f <= 1.0))
        {
            return Err(invalid("redis.local_budget_fraction", "must be in (0, 1]"));
        }
        if self.key_prefix.len() > 64 || self.key_prefix.contains(['{', '}', ' ']) {
            return Err(invalid(
                "redis.key_prefix",
                "at most 64 characters, without braces or spaces",
            ));
        }
        if let Some(u) = &self.url {
            let u = u.expose();
            if !(u.is_empty() || u.starts_with("redis://") || u.starts_with("unix://")) {
                return Err(invalid(
                    "redis.url",
                    "must start with redis:// or unix:// (rediss:// is not built in)",
                ));
            }
        }
        Ok(RedisConfig {
            url: self.url.filter(|u| !u.is_empty()),
            key_prefix: self.key_prefix,
            timeout: Duration::from_millis(self.timeout_ms),
            local_budget_fraction: self.local_budget_fraction,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{no_env, MIN};
    use crate::config::Config;

    use super::*;

    #[test]
    fn redis_keys_have_defaults_and_are_checked() {
        let c = Config::from_toml(MIN, no_env).unwrap();
        assert!(c.redis.url.is_none());
        assert_eq!(c.redis.key_prefix, "gg:");
        assert_eq!(c.redis.timeout, Duration::from_millis(50));
        assert_eq!(c.redis.local_budget_fraction, None);
        let text = format!("{MIN}\n[redis]\nurl = \"redis://:pw-secret@redis:6379\"\n");
        let c = Config::from_toml(&text, no_env).unwrap();
        assert!(!format!("{c:?}").contains("pw-secret"));
        for bad in [
            "timeout_ms = 0",
            "local_budget_fraction = 0.0",
            "local_budget_fraction = 1.5",
            "key_prefix = \"a{b}\"",
            "url = \"http://redis:6379\"",
        ] {
            let text = format!("{MIN}\n[redis]\n{bad}\n");
            let err = Config::from_toml(&text, no_env).unwrap_err().to_string();
            assert!(err.contains("redis."), "{bad}: {err}");
        }
    }

    #[test]
    fn an_empty_url_means_no_redis() {
        let r = RawRedis {
            url: Some(Secret::new("")),
            ..RawRedis::default()
        }
        .validate()
        .unwrap();
        assert!(r.url.is_none());
    }
}
