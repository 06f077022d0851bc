//! Which headers cross graphgate, in one place: what a client may send on to Graph, what
//! Graph may send back to a client, what a cache entry keeps, and graphgate's own request
//! headers. Names are lowercase, as `http::HeaderName` stores them.

/// Request headers from the client that may reach Graph. Credentials, cookies and
/// Accept-Encoding (replies must stay readable for paging rewrite) are not among them.
pub const FORWARDED_REQUEST: &[&str] =
    &["accept", "accept-language", "user-agent", "if-none-match"];

/// Headers from Graph that clients may see. Everything else (hop-by-hop, cookies, lengths,
/// `x-fb-debug`: an opaque blob graphgate cannot check for tokens) is dropped; hyper
/// recomputes framing.
pub const PASSED_RESPONSE: &[&str] = &[
    "content-type",
    "facebook-api-version",
    "x-fb-trace-id",
    "x-fb-request-id",
    "x-fb-rev",
    "etag",
    "www-authenticate",
    "x-app-usage",
    "x-page-usage",
    "x-business-use-case-usage",
    "x-ad-account-usage",
    "x-fb-ads-insights-throttle",
    "location",
    "last-modified",
];

/// Headers kept in a stored cache entry: a subset of [`PASSED_RESPONSE`]. Per-call headers
/// such as usage reports are not replayed: they describe a call that happened long ago and
/// would mislead SDKs that pace themselves by them. A stored entry refers to them by their
/// index here.
pub static STORED: [http::HeaderName; 7] = [
    http::HeaderName::from_static("content-type"),
    http::HeaderName::from_static("facebook-api-version"),
    http::HeaderName::from_static("x-fb-trace-id"),
    http::HeaderName::from_static("x-fb-request-id"),
    http::HeaderName::from_static("x-fb-rev"),
    http::HeaderName::from_static("etag"),
    http::HeaderName::from_static("last-modified"),
];

/// Headers an `ids=` member's own entry keeps from the `ids=` reply it was cut from: only
/// what describes the content (the reply's ETag and trace ids are the whole reply's).
pub const MEMBER_STORED: &[&str] = &["content-type", "facebook-api-version"];

/// The [`MEMBER_STORED`] headers among `headers`: what an entry cut from another reply
/// (an `ids=` member, a projection, a union's part) keeps of that reply's headers.
pub fn member_stored(
    headers: impl IntoIterator<Item = (http::HeaderName, http::HeaderValue)>,
) -> Vec<(http::HeaderName, http::HeaderValue)> {
    headers
        .into_iter()
        .filter(|(n, _)| MEMBER_STORED.contains(&n.as_str()))
        .collect()
}

/// Response headers graphgate adds that describe the quota at answer time (the IETF
/// RateLimit pair); a cache must not replay them.
pub const RATE_LIMIT: &[&str] = &["ratelimit", "ratelimit-policy"];

/// Client header naming the Page a call should be charged to.
pub const PAGE: &str = "x-graphgate-page";
/// Client header capping how long a call may wait for quota budget, in milliseconds.
pub const MAX_WAIT: &str = "x-graphgate-max-wait-ms";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_valid_lowercase_header_names() {
        for name in FORWARDED_REQUEST
            .iter()
            .chain(PASSED_RESPONSE)
            .chain(MEMBER_STORED)
            .chain(RATE_LIMIT)
            .chain([&PAGE, &MAX_WAIT])
        {
            let parsed = http::HeaderName::from_static(name);
            assert_eq!(parsed.as_str(), *name);
        }
    }

    #[test]
    fn stored_headers_are_ones_clients_may_see_and_never_per_call_ones() {
        let stored: Vec<&str> = STORED.iter().map(|n| n.as_str()).collect();
        for name in &stored {
            assert!(PASSED_RESPONSE.contains(name), "{name}");
        }
        for name in MEMBER_STORED {
            assert!(stored.contains(name), "{name}");
        }
        for per_call in ["x-app-usage", "x-page-usage", "x-business-use-case-usage"]
            .iter()
            .chain(RATE_LIMIT)
        {
            assert!(!stored.contains(per_call), "{per_call}");
        }
    }
}
