//! What may be cached and for how long: TTL rules by path pattern, stale windows, and the
//! client's own `Cache-Control` request directives.

use std::time::Duration;

use http::{header, HeaderMap};

use crate::config::CacheConfig;

/// One segment of a rule pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    /// `*` or a `{name}` placeholder: any one segment.
    Any,
    Lit(String),
}

/// TTLs and stale windows, from `[cache]`.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Vec<(Vec<Seg>, Duration)>,
    pub default_ttl: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
}

/// What the client asked of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Directive {
    Normal,
    /// `no-cache` / `max-age=0` / `Pragma: no-cache`: go upstream, refresh the entry.
    Revalidate,
    /// `no-store`: do not read or write the cache at all.
    Bypass,
}

impl Policy {
    pub fn new(cfg: &CacheConfig) -> Policy {
        let rules = cfg
            .rules
            .iter()
            .map(|r| (parse_pattern(&r.pattern), r.ttl))
            .collect();
        Policy {
            rules,
            default_ttl: cfg.default_ttl,
            stale_while_revalidate: cfg.stale_while_revalidate,
            stale_if_error: cfg.stale_if_error,
        }
    }

    /// TTL for a path such as `/1001/feed` (no version): the first matching rule, else the
    /// default. Zero means "never cache".
    pub fn ttl_for(&self, rule_path: &str) -> Duration {
        if self.rules.is_empty() {
            return self.default_ttl;
        }
        let segs: Vec<&str> = rule_path.split('/').filter(|s| !s.is_empty()).collect();
        self.rules
            .iter()
            .find(|(pat, _)| matches(pat, &segs))
            .map(|(_, ttl)| *ttl)
            .unwrap_or(self.default_ttl)
    }

    /// How long an entry is kept past its TTL: the longer stale window.
    pub fn stale_window(&self) -> Duration {
        self.stale_while_revalidate.max(self.stale_if_error)
    }
}

fn parse_pattern(p: &str) -> Vec<Seg> {
    p.split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            if s == "*" || (s.starts_with('{') && s.ends_with('}')) {
                Seg::Any
            } else {
                Seg::Lit(s.to_string())
            }
        })
        .collect()
}

fn matches(pattern: &[Seg], segs: &[&str]) -> bool {
    pattern.len() == segs.len()
        && pattern.iter().zip(segs).all(|(p, s)| match p {
            Seg::Any => true,
            Seg::Lit(l) => l == s,
        })
}

/// Reads `Cache-Control` (and legacy `Pragma`) from the client's request.
pub fn request_directive(headers: &HeaderMap) -> Directive {
    let mut out = Directive::Normal;
    for v in headers.get_all(header::CACHE_CONTROL).iter() {
        let Ok(v) = v.to_str() else { continue };
        for d in v.split(',').map(|d| d.trim().to_ascii_lowercase()) {
            match d.as_str() {
                "no-store" => return Directive::Bypass,
                "no-cache" | "max-age=0" => out = Directive::Revalidate,
                _ => {}
            }
        }
    }
    if out == Directive::Normal
        && headers
            .get(header::PRAGMA)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("no-cache"))
    {
        out = Directive::Revalidate;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CacheRule;

    fn policy(rules: &[(&str, u64)]) -> Policy {
        Policy::new(&CacheConfig {
            max_bytes: 1 << 20,
            default_ttl: Duration::from_secs(60),
            stale_while_revalidate: Duration::from_secs(30),
            stale_if_error: Duration::from_secs(600),
            compress: true,
            project_fields: true,
            recall_hits: true,
            union_window: Duration::ZERO,
            merge_window: Duration::ZERO,
            rules: rules
                .iter()
                .map(|(p, t)| CacheRule {
                    pattern: p.to_string(),
                    ttl: Duration::from_secs(*t),
                })
                .collect(),
        })
    }

    #[test]
    fn first_matching_rule_wins_else_default() {
        let p = policy(&[
            ("/*/feed", 15),
            ("/1001", 3600),
            ("/{page}", 300),
            ("/*/insights", 0),
        ]);
        assert_eq!(p.ttl_for("/1001/feed"), Duration::from_secs(15));
        assert_eq!(p.ttl_for("/1001"), Duration::from_secs(3600));
        assert_eq!(p.ttl_for("/1002"), Duration::from_secs(300));
        assert_eq!(p.ttl_for("/1002/insights"), Duration::ZERO);
        assert_eq!(p.ttl_for("/1002/photos"), Duration::from_secs(60));
        assert_eq!(p.ttl_for("/1002/feed/x"), Duration::from_secs(60));
        assert_eq!(p.stale_window(), Duration::from_secs(600));
    }

    #[test]
    fn client_directives() {
        let mut h = HeaderMap::new();
        assert_eq!(request_directive(&h), Directive::Normal);
        h.insert(header::CACHE_CONTROL, "max-age=0".parse().unwrap());
        assert_eq!(request_directive(&h), Directive::Revalidate);
        h.insert(header::CACHE_CONTROL, "No-Cache, no-store".parse().unwrap());
        assert_eq!(request_directive(&h), Directive::Bypass);
        let mut h = HeaderMap::new();
        h.insert(header::PRAGMA, "no-cache".parse().unwrap());
        assert_eq!(request_directive(&h), Directive::Revalidate);
    }
}
