//! The per-Page quota steward: calls that must go to Graph are admitted here first, so Meta
//! never has to throttle them, and while a Page has room they go at once.
//!
//! - [`attribution`]: which bucket (a Page, or the app) each call unit is charged to;
//! - [`window`]: the sliding-window count of dispatched calls (a ring of sub-buckets);
//! - [`budget`]: one bucket's estimate (latest usage reading plus calls since, learned
//!   limit) and admission rule, pause and probe, with an injected clock;
//! - [`table`]: the bounded bucket table (sharded, O(1) insert and eviction);
//! - [`scheduler`]: per-bucket queues (interactive before batch), deadlines, the app gate,
//!   learning from replies, status, RateLimit headers and per-Page series;
//! - [`shared`]: with Redis, the same state and decision for the whole fleet.
//!
//! Cache hits never reach the scheduler: only `Gateway::forward` calls it.

pub mod attribution;
pub mod budget;
pub mod scheduler;
pub mod shared;
pub mod table;
pub mod window;

use std::time::Duration;

use http::HeaderMap;

use crate::auth::Client;
use crate::config::Priority;

pub use attribution::{call_units, BucketKey, Charge};
pub use scheduler::{rate_limit_pair, Admission, Learned, Scheduler};

/// Client header naming the Page a call should be charged to.
pub const PAGE_HEADER: &str = "x-graphgate-page";
/// Client header capping how long a call may wait for budget, in milliseconds.
pub const MAX_WAIT_HEADER: &str = "x-graphgate-max-wait-ms";
/// Response headers that describe the quota at answer time; a cache must not replay them.
pub const RESPONSE_HEADERS: &[&str] = &["ratelimit", "ratelimit-policy"];

/// What the client asked of the scheduler through headers. Unreadable values are ignored:
/// they are hints, and a wrong one must not fail the call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hints {
    /// A Page id (digits only); honoured only if the client may touch it.
    pub page: Option<String>,
    pub max_wait: Option<Duration>,
    /// The authenticated client's priority (set by [`Hints::bind_to`]).
    pub priority: Priority,
}

impl Hints {
    pub fn from_headers(headers: &HeaderMap) -> Hints {
        // Looked up by `HeaderName` constants: a `&str` name is parsed on every lookup.
        const PAGE: http::HeaderName = http::HeaderName::from_static(PAGE_HEADER);
        const MAX_WAIT: http::HeaderName = http::HeaderName::from_static(MAX_WAIT_HEADER);
        let text = |name: http::HeaderName| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        };
        Hints {
            page: text(PAGE)
                .filter(|p| !p.is_empty() && p.len() <= 64 && p.bytes().all(|b| b.is_ascii_digit()))
                .map(str::to_string),
            max_wait: text(MAX_WAIT)
                .and_then(|v| v.parse::<u64>().ok())
                .map(Duration::from_millis),
            priority: Priority::default(),
        }
    }

    /// Applies what only the authenticated client decides: a Page header naming a Page the
    /// client may not touch is ignored, and the client's priority is taken. Done once after
    /// authentication, so fills running for coalesced callers carry it with the call.
    pub fn bind_to(&mut self, client: &Client) {
        if self.page.as_deref().is_some_and(|p| !client.may_touch(p)) {
            self.page = None;
        }
        self.priority = client.priority;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_are_read_leniently() {
        let mut h = HeaderMap::new();
        h.insert(PAGE_HEADER, "1001".parse().unwrap());
        h.insert(MAX_WAIT_HEADER, " 250 ".parse().unwrap());
        assert_eq!(
            Hints::from_headers(&h),
            Hints {
                page: Some("1001".into()),
                max_wait: Some(Duration::from_millis(250)),
                priority: Priority::Interactive,
            }
        );
        h.insert(PAGE_HEADER, "me".parse().unwrap());
        h.insert(MAX_WAIT_HEADER, "soon".parse().unwrap());
        assert_eq!(Hints::from_headers(&h), Hints::default());
    }
}
