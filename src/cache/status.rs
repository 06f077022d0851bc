//! What the cache did for one request, as a type: rendered once as the RFC 9211
//! `Cache-Status` header value ([`CacheStatus::header_value`]), as `X-Cache`, and as the
//! metrics' cache label ([`CacheStatus::result`]), so the three cannot disagree.

use bytes::Bytes;
use http::HeaderValue;

use crate::metrics::CacheResult;

/// The cache's name in `Cache-Status` (RFC 9211 §2: the first list member names the cache).
const CACHE_NAME: &str = "graphgate";

/// Why the request went forward to Graph: RFC 9211's `fwd` parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    /// Nothing stored for it.
    Miss,
    /// A stored entry was too old to serve.
    Stale,
    /// The client asked for a fresh answer (`Cache-Control: no-cache`, `max-age=0`).
    Request,
    /// Some members of an `ids=` or batch read were stored, the rest were fetched.
    Partial,
    /// Not cacheable by configuration or by the client (`no-store`, a TTL of 0).
    Bypass,
    /// Not cacheable by its method: a write, or a batch with writes.
    Method,
}

impl Forward {
    fn as_str(self) -> &'static str {
        match self {
            Forward::Miss => "miss",
            Forward::Stale => "stale",
            Forward::Request => "request",
            Forward::Partial => "partial",
            Forward::Bypass => "bypass",
            Forward::Method => "method",
        }
    }
}

/// An `ids=` or batch read answered member by member: how many of `total` were stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Members {
    pub kind: MemberKind,
    pub hits: usize,
    pub total: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberKind {
    Ids,
    Batch,
}

/// What the cache did for a request that reached it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// A fresh stored entry, `ttl` seconds left.
    Hit { ttl: i64 },
    /// An entry past its TTL (`ttl` < 0) but within stale-while-revalidate, served while
    /// one refresh runs.
    StaleWhileRevalidate { ttl: i64 },
    /// Graph failed with `fwd_status` (or graphgate's own status for a transport failure)
    /// and a stale entry within stale-if-error answered instead.
    StaleIfError {
        fwd: Forward,
        fwd_status: u16,
        ttl: i64,
        collapsed: bool,
    },
    /// An entry from the shared tier (Redis), read for this request or, `collapsed`, for a
    /// fill this request joined (another replica's included).
    SharedHit { ttl: i64, collapsed: bool },
    /// A fresh stored reply for more fields of the same node, cut down to the fields asked
    /// for (`ttl` seconds left on it).
    Projected { ttl: i64 },
    /// Graph answered with `fwd_status` (304 when a stale entry was revalidated); `stored`
    /// when the reply (or the renewed entry) was stored; `collapsed` when this request
    /// waited for another request's call.
    Forwarded {
        fwd: Forward,
        fwd_status: u16,
        stored: bool,
        collapsed: bool,
    },
    /// A miss answered from one upstream call for the union of several concurrent misses'
    /// fields of the node, cut down to this request's fields; `collapsed` when another
    /// request led the call.
    UnionFetched {
        fwd_status: u16,
        stored: bool,
        collapsed: bool,
    },
    /// An `ids=` or batch read answered entirely from stored members.
    MembersHit(Members),
    /// An `ids=` or batch read whose missing members were fetched (with `fwd_status`) and
    /// stored.
    MembersFetched {
        fwd: Forward,
        fwd_status: u16,
        members: Members,
        collapsed: bool,
    },
    /// Not cacheable: went to Graph without looking at the cache.
    Uncached(Forward),
}

impl CacheStatus {
    /// The metrics' cache label.
    pub fn result(self) -> CacheResult {
        match self {
            CacheStatus::Hit { .. }
            | CacheStatus::SharedHit { .. }
            | CacheStatus::Projected { .. }
            | CacheStatus::MembersHit(_) => CacheResult::Hit,
            CacheStatus::StaleWhileRevalidate { .. } | CacheStatus::StaleIfError { .. } => {
                CacheResult::Stale
            }
            CacheStatus::Forwarded { .. }
            | CacheStatus::UnionFetched { .. }
            | CacheStatus::MembersFetched { .. } => CacheResult::Miss,
            CacheStatus::Uncached(_) => CacheResult::Bypass,
        }
    }

    /// The `X-Cache` header value.
    pub fn x_cache(self) -> HeaderValue {
        HeaderValue::from_static(match self.result() {
            CacheResult::Hit => "HIT",
            CacheResult::Stale => "STALE",
            CacheResult::Miss => "MISS",
            CacheResult::Bypass => "BYPASS",
        })
    }

    /// The `Cache-Status` member, e.g. `graphgate; hit; ttl=42` or
    /// `graphgate; fwd=miss; fwd-status=200; stored`. Parameters come in one order: `hit`,
    /// `fwd`, `fwd-status`, `ttl`, `stored`, `detail`, `collapsed`.
    pub fn render(self) -> String {
        // Written by hand: `format!` was ~700 instructions of a ~30 k-instruction hit.
        let mut p = Params(String::with_capacity(64));
        p.0.push_str(CACHE_NAME);
        match self {
            CacheStatus::Hit { ttl } => {
                p.flag("hit");
                p.int("ttl", ttl);
            }
            CacheStatus::StaleWhileRevalidate { ttl } => {
                p.flag("hit");
                p.int("ttl", ttl);
                p.token("detail", "stale-while-revalidate");
            }
            CacheStatus::StaleIfError {
                fwd,
                fwd_status,
                ttl,
                collapsed,
            } => {
                p.token("fwd", fwd.as_str());
                p.int("fwd-status", fwd_status.into());
                p.int("ttl", ttl);
                p.token("detail", "stale-if-error");
                p.flag_if("collapsed", collapsed);
            }
            CacheStatus::Projected { ttl } => {
                p.flag("hit");
                p.int("ttl", ttl);
                p.token("detail", "projected");
            }
            CacheStatus::SharedHit { ttl, collapsed } => {
                p.flag("hit");
                p.int("ttl", ttl);
                p.token("detail", "l2");
                p.flag_if("collapsed", collapsed);
            }
            CacheStatus::Forwarded {
                fwd,
                fwd_status,
                stored,
                collapsed,
            } => {
                p.token("fwd", fwd.as_str());
                p.int("fwd-status", fwd_status.into());
                p.flag_if("stored", stored);
                p.flag_if("collapsed", collapsed);
            }
            CacheStatus::UnionFetched {
                fwd_status,
                stored,
                collapsed,
            } => {
                p.token("fwd", Forward::Miss.as_str());
                p.int("fwd-status", fwd_status.into());
                p.flag_if("stored", stored);
                p.token("detail", "union");
                p.flag_if("collapsed", collapsed);
            }
            CacheStatus::MembersHit(members) => {
                p.flag("hit");
                p.members(members);
            }
            CacheStatus::MembersFetched {
                fwd,
                fwd_status,
                members,
                collapsed,
            } => {
                p.token("fwd", fwd.as_str());
                p.int("fwd-status", fwd_status.into());
                p.flag("stored");
                p.members(members);
                p.flag_if("collapsed", collapsed);
            }
            CacheStatus::Uncached(fwd) => p.token("fwd", fwd.as_str()),
        }
        p.0
    }

    /// [`CacheStatus::render`] as a header value, taking the string's buffer as it is.
    pub fn header_value(self) -> HeaderValue {
        match self {
            // The constant ones without an allocation.
            CacheStatus::Uncached(Forward::Method) => {
                HeaderValue::from_static("graphgate; fwd=method")
            }
            CacheStatus::Uncached(Forward::Bypass) => {
                HeaderValue::from_static("graphgate; fwd=bypass")
            }
            // Only ASCII digits, letters, `;`, `=`, `-`, `"`, `/` and spaces are written:
            // always a valid value.
            _ => HeaderValue::from_maybe_shared(Bytes::from(self.render()))
                .unwrap_or_else(|_| HeaderValue::from_static(CACHE_NAME)),
        }
    }
}

/// Structured-field parameters (RFC 8941 §3.1.2) appended to a list member.
struct Params(String);

impl Params {
    /// A boolean parameter that is true: the bare key.
    fn flag(&mut self, key: &str) {
        self.0.push_str("; ");
        self.0.push_str(key);
    }

    fn flag_if(&mut self, key: &str, on: bool) {
        if on {
            self.flag(key);
        }
    }

    /// `key=value` for a token value (starts with a letter, no spaces).
    fn token(&mut self, key: &str, value: &str) {
        self.flag(key);
        self.0.push('=');
        self.0.push_str(value);
    }

    fn int(&mut self, key: &str, value: i64) {
        self.flag(key);
        self.0.push('=');
        push_decimal(&mut self.0, value);
    }

    /// `detail="ids 2/3"`: a string value (it holds a space).
    fn members(&mut self, m: Members) {
        self.flag("detail");
        self.0.push_str(match m.kind {
            MemberKind::Ids => "=\"ids ",
            MemberKind::Batch => "=\"batch ",
        });
        push_decimal(&mut self.0, m.hits as i64);
        self.0.push('/');
        push_decimal(&mut self.0, m.total as i64);
        self.0.push('"');
    }
}

/// Appends `v` in decimal.
fn push_decimal(out: &mut String, v: i64) {
    out.push_str(itoa::Buffer::new().format(v));
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDS: Members = Members {
        kind: MemberKind::Ids,
        hits: 2,
        total: 3,
    };
    const BATCH: Members = Members {
        kind: MemberKind::Batch,
        hits: 0,
        total: 4,
    };

    /// Every variant with what it renders, its label and its X-Cache (the wire format
    /// clients and dashboards already read).
    fn every_variant() -> Vec<(CacheStatus, &'static str, CacheResult, &'static str)> {
        use CacheStatus::*;
        vec![
            (
                Hit { ttl: 42 },
                "graphgate; hit; ttl=42",
                CacheResult::Hit,
                "HIT",
            ),
            (
                Projected { ttl: 12 },
                "graphgate; hit; ttl=12; detail=projected",
                CacheResult::Hit,
                "HIT",
            ),
            (
                UnionFetched {
                    fwd_status: 200,
                    stored: true,
                    collapsed: true,
                },
                "graphgate; fwd=miss; fwd-status=200; stored; detail=union; collapsed",
                CacheResult::Miss,
                "MISS",
            ),
            (
                StaleWhileRevalidate { ttl: -3 },
                "graphgate; hit; ttl=-3; detail=stale-while-revalidate",
                CacheResult::Stale,
                "STALE",
            ),
            (
                StaleIfError {
                    fwd: Forward::Stale,
                    fwd_status: 503,
                    ttl: -20,
                    collapsed: false,
                },
                "graphgate; fwd=stale; fwd-status=503; ttl=-20; detail=stale-if-error",
                CacheResult::Stale,
                "STALE",
            ),
            (
                StaleIfError {
                    fwd: Forward::Request,
                    fwd_status: 504,
                    ttl: -1,
                    collapsed: true,
                },
                "graphgate; fwd=request; fwd-status=504; ttl=-1; detail=stale-if-error; collapsed",
                CacheResult::Stale,
                "STALE",
            ),
            (
                SharedHit {
                    ttl: 30,
                    collapsed: false,
                },
                "graphgate; hit; ttl=30; detail=l2",
                CacheResult::Hit,
                "HIT",
            ),
            (
                SharedHit {
                    ttl: 0,
                    collapsed: true,
                },
                "graphgate; hit; ttl=0; detail=l2; collapsed",
                CacheResult::Hit,
                "HIT",
            ),
            (
                Forwarded {
                    fwd: Forward::Miss,
                    fwd_status: 200,
                    stored: true,
                    collapsed: false,
                },
                "graphgate; fwd=miss; fwd-status=200; stored",
                CacheResult::Miss,
                "MISS",
            ),
            (
                Forwarded {
                    fwd: Forward::Stale,
                    fwd_status: 304,
                    stored: true,
                    collapsed: true,
                },
                "graphgate; fwd=stale; fwd-status=304; stored; collapsed",
                CacheResult::Miss,
                "MISS",
            ),
            (
                Forwarded {
                    fwd: Forward::Miss,
                    fwd_status: 400,
                    stored: false,
                    collapsed: false,
                },
                "graphgate; fwd=miss; fwd-status=400",
                CacheResult::Miss,
                "MISS",
            ),
            (
                MembersHit(IDS),
                "graphgate; hit; detail=\"ids 2/3\"",
                CacheResult::Hit,
                "HIT",
            ),
            (
                MembersHit(BATCH),
                "graphgate; hit; detail=\"batch 0/4\"",
                CacheResult::Hit,
                "HIT",
            ),
            (
                MembersFetched {
                    fwd: Forward::Partial,
                    fwd_status: 200,
                    members: IDS,
                    collapsed: true,
                },
                "graphgate; fwd=partial; fwd-status=200; stored; detail=\"ids 2/3\"; collapsed",
                CacheResult::Miss,
                "MISS",
            ),
            (
                MembersFetched {
                    fwd: Forward::Miss,
                    fwd_status: 200,
                    members: BATCH,
                    collapsed: false,
                },
                "graphgate; fwd=miss; fwd-status=200; stored; detail=\"batch 0/4\"",
                CacheResult::Miss,
                "MISS",
            ),
            (
                Uncached(Forward::Method),
                "graphgate; fwd=method",
                CacheResult::Bypass,
                "BYPASS",
            ),
            (
                Uncached(Forward::Bypass),
                "graphgate; fwd=bypass",
                CacheResult::Bypass,
                "BYPASS",
            ),
        ]
    }

    #[test]
    fn every_status_renders_its_cache_status_label_and_x_cache() {
        for (status, rendered, result, x_cache) in every_variant() {
            assert_eq!(status.render(), rendered, "{status:?}");
            assert_eq!(status.header_value(), rendered, "{status:?}");
            assert_eq!(status.result(), result, "{status:?}");
            assert_eq!(status.x_cache(), x_cache, "{status:?}");
        }
    }

    #[test]
    fn every_fwd_value_is_one_rfc_9211_defines() {
        for fwd in [
            Forward::Miss,
            Forward::Stale,
            Forward::Request,
            Forward::Partial,
            Forward::Bypass,
            Forward::Method,
        ] {
            assert!(
                [
                    "bypass",
                    "method",
                    "uri-miss",
                    "vary-miss",
                    "miss",
                    "request",
                    "stale",
                    "partial"
                ]
                .contains(&fwd.as_str()),
                "{fwd:?}"
            );
            let value = CacheStatus::Uncached(fwd).render();
            assert_eq!(value, format!("graphgate; fwd={}", fwd.as_str()));
        }
    }

    /// Checks one RFC 9211 list member against RFC 8941's grammar: a token naming the cache,
    /// then `; key[=bare-item]` parameters with lowercase keys, the ones RFC 9211 defines
    /// having the types it gives them.
    fn assert_sf_member(value: &str) {
        let mut parts = value.split("; ");
        assert_eq!(parts.next(), Some(CACHE_NAME), "{value}");
        let mut seen = Vec::new();
        for param in parts {
            let (key, item) = param
                .split_once('=')
                .map_or((param, None), |(k, v)| (k, Some(v)));
            assert!(
                key.starts_with(|c: char| c.is_ascii_lowercase())
                    && key.chars().all(|c| c.is_ascii_lowercase()
                        || c.is_ascii_digit()
                        || "_-.*".contains(c)),
                "key {key:?} in {value}"
            );
            assert!(!seen.contains(&key), "{key} twice in {value}");
            seen.push(key);
            let integer = |v: &str| {
                let digits = v.strip_prefix('-').unwrap_or(v);
                !digits.is_empty()
                    && digits.len() <= 15
                    && digits.bytes().all(|b| b.is_ascii_digit())
            };
            let token = |v: &str| {
                v.starts_with(|c: char| c.is_ascii_alphabetic() || c == '*')
                    && v.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~:/".contains(c))
            };
            let string = |v: &str| {
                v.len() >= 2
                    && v.starts_with('"')
                    && v.ends_with('"')
                    && v[1..v.len() - 1]
                        .chars()
                        .all(|c| (' '..='~').contains(&c) && c != '"' && c != '\\')
            };
            match (key, item) {
                ("hit" | "stored" | "collapsed", None) => {}
                ("fwd", Some(v)) => assert!(token(v), "{value}"),
                ("fwd-status" | "ttl", Some(v)) => assert!(integer(v), "{value}"),
                ("detail", Some(v)) => assert!(token(v) || string(v), "{value}"),
                _ => panic!("parameter {param:?} is not RFC 9211's in {value}"),
            }
        }
        assert!(
            seen.contains(&"hit") != seen.contains(&"fwd"),
            "exactly one of hit and fwd: {value}"
        );
    }

    #[test]
    fn every_status_is_an_rfc_9211_list_member() {
        for (status, ..) in every_variant() {
            assert_sf_member(&status.render());
        }
    }

    #[test]
    fn extreme_numbers_render_as_integers() {
        let s = CacheStatus::Hit { ttl: i64::MIN }.render();
        assert_eq!(s, format!("graphgate; hit; ttl={}", i64::MIN));
        for v in [0i64, 7, -7, 10, 59, 3600, -86_400, i64::MAX] {
            let mut out = String::new();
            push_decimal(&mut out, v);
            assert_eq!(out, v.to_string());
        }
    }
}
