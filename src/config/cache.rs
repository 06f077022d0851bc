//! `[cache]`: the in-process tier's size, freshness, and per-path TTL rules.

use std::time::Duration;

use serde::Deserialize;

use super::{invalid, ConfigError};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawCache {
    max_bytes: u64,
    default_ttl_s: u64,
    stale_while_revalidate_s: u64,
    stale_if_error_s: u64,
    compress: bool,
    project_fields: bool,
    recall_hits: bool,
    union_window_ms: u64,
    merge_window_ms: u64,
    rules: Vec<RawCacheRule>,
}

impl Default for RawCache {
    fn default() -> Self {
        RawCache {
            max_bytes: 256 * 1024 * 1024,
            default_ttl_s: 60,
            stale_while_revalidate_s: 30,
            stale_if_error_s: 600,
            compress: true,
            project_fields: true,
            recall_hits: true,
            union_window_ms: 0,
            merge_window_ms: 0,
            rules: Vec::new(),
        }
    }
}

/// A miss waits this long at most for others to join its call.
const MAX_GATHER_WINDOW_MS: u64 = 50;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCacheRule {
    #[serde(rename = "match")]
    pattern: String,
    ttl_s: u64,
}

#[derive(Debug, Clone)]
pub struct CacheRule {
    /// A path pattern such as `/*/feed` or `/{page}`: see `cache::policy`.
    pub pattern: String,
    pub ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub max_bytes: u64,
    pub default_ttl: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    /// Keep bodies LZ4-compressed in the in-process tier (`[cache] compress`, default on).
    pub compress: bool,
    /// Answer a node read for some fields from a stored reply for more of them
    /// (`[cache] project_fields`, default on).
    pub project_fields: bool,
    /// Each worker remembers what parse and admission made of the hits it served, and
    /// answers the same request bytes again from that (`[cache] recall_hits`, default on).
    pub recall_hits: bool,
    /// How long the first miss for a node gathers other misses' fields into its call
    /// (`[cache] union_window_ms`, default 0: only calls already in flight are shared).
    pub union_window: Duration,
    /// How long the first miss for a node of a Page gathers misses for other nodes of the
    /// Page into one `ids=` call (`[cache] merge_window_ms`, default 0: off).
    pub merge_window: Duration,
    pub rules: Vec<CacheRule>,
}

impl RawCache {
    pub(super) fn validate(self) -> Result<CacheConfig, ConfigError> {
        let mut rules = Vec::with_capacity(self.rules.len());
        for (i, r) in self.rules.into_iter().enumerate() {
            if !r.pattern.starts_with('/') {
                return Err(invalid(
                    &format!("cache.rules[{i}].match"),
                    "must start with `/`",
                ));
            }
            rules.push(CacheRule {
                pattern: r.pattern,
                ttl: Duration::from_secs(r.ttl_s),
            });
        }
        for (key, ms) in [
            ("cache.union_window_ms", self.union_window_ms),
            ("cache.merge_window_ms", self.merge_window_ms),
        ] {
            if ms > MAX_GATHER_WINDOW_MS {
                return Err(invalid(
                    key,
                    format!("must be at most {MAX_GATHER_WINDOW_MS}"),
                ));
            }
        }
        Ok(CacheConfig {
            max_bytes: self.max_bytes,
            default_ttl: Duration::from_secs(self.default_ttl_s),
            stale_while_revalidate: Duration::from_secs(self.stale_while_revalidate_s),
            stale_if_error: Duration::from_secs(self.stale_if_error_s),
            compress: self.compress,
            project_fields: self.project_fields,
            recall_hits: self.recall_hits,
            union_window: Duration::from_millis(self.union_window_ms),
            merge_window: Duration::from_millis(self.merge_window_ms),
            rules,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_paths() {
        let rule = |pattern: &str| RawCacheRule {
            pattern: pattern.into(),
            ttl_s: 5,
        };
        let ok = RawCache {
            rules: vec![rule("/*/feed")],
            ..RawCache::default()
        }
        .validate()
        .unwrap();
        assert_eq!(ok.rules[0].ttl, Duration::from_secs(5));
        assert_eq!(ok.default_ttl, Duration::from_secs(60));
        let err = RawCache {
            rules: vec![rule("/{page}"), rule("feed")],
            ..RawCache::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("cache.rules[1].match"), "{err}");
        let err = RawCache {
            union_window_ms: 51,
            ..RawCache::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("cache.union_window_ms"), "{err}");
        let err = RawCache {
            merge_window_ms: 51,
            ..RawCache::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("cache.merge_window_ms"), "{err}");
    }
}
