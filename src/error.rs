//! The one error type of the request path. Every failure a client can see is a variant here,
//! mapped in one place to an HTTP status, a Graph-style JSON body (so SDKs raise their usual
//! exceptions) and a short metric label.

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

use crate::metrics::Rejection;

/// Subcodes of graphgate's own errors, so callers can tell them from Meta's.
pub mod subcode {
    pub const NO_KEY: i64 = 2_446_001;
    pub const UNKNOWN_KEY: i64 = 2_446_002;
    pub const FORBIDDEN_PAGE: i64 = 2_446_003;
    pub const FORBIDDEN_WRITE: i64 = 2_446_004;
    pub const FORBIDDEN_FIELD: i64 = 2_446_005;
    pub const QUEUE_TIMEOUT: i64 = 2_446_010;
    pub const QUEUE_FULL: i64 = 2_446_011;
    pub const UPSTREAM: i64 = 2_446_020;
    pub const UPSTREAM_TOO_LARGE: i64 = 2_446_021;
    pub const BREAKER_OPEN: i64 = 2_446_022;
    pub const OVERLOADED: i64 = 2_446_030;
    pub const WEBHOOK_REFUSED: i64 = 2_446_040;
}

/// Clone: one coalesced upstream failure is handed to every waiting request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    #[error("An access token (a graphgate client key) is required to request this resource.")]
    MissingKey,
    #[error("Invalid OAuth access token - the graphgate client key is not known.")]
    UnknownKey,
    #[error("(#10) This client may not access object `{0}` through graphgate.")]
    ForbiddenPage(String),
    #[error("(#200) This client is read-only in graphgate and may not {0}.")]
    ForbiddenWrite(String),
    #[error("(#200) graphgate does not hand out Meta tokens: field `{0}` may not be requested.")]
    ForbiddenField(String),
    #[error("(#100) {0}")]
    BadRequest(String),
    #[error("(#10) The webhook request was refused: {0}.")]
    WebhookRefused(&'static str),
    #[error("(#100) Unsupported method {0}.")]
    MethodNotAllowed(String),
    #[error("(#100) {0}")]
    UnsupportedMediaType(String),
    #[error("Request body is larger than {0} bytes.")]
    BodyTooLarge(usize),
    #[error("Request headers are larger than {0} bytes.")]
    HeadersTooLarge(usize),
    #[error("The request body did not arrive within {0} ms.")]
    BodyTimeout(u64),
    #[error("The Graph API could not be reached: {0}")]
    UpstreamConnect(String),
    #[error("The Graph API did not answer within {0} ms.")]
    UpstreamTimeout(u64),
    #[error("The Graph API sent a reply graphgate cannot use: {0}")]
    UpstreamBadResponse(String),
    #[error("The Graph API reply is larger than graphgate accepts ({0} bytes).")]
    UpstreamTooLarge(usize),
    #[error("The Graph API is failing; graphgate is not sending calls for {retry_after_s} s.")]
    UpstreamUnavailable { retry_after_s: u64 },
    #[error("graphgate is overloaded; retry after {retry_after_s} s.")]
    Overloaded { retry_after_s: u64 },
    #[error("(#80001) graphgate is holding calls to `{page}` to stay within its rate limit. Retry after {retry_after_s} s.")]
    Throttled {
        page: String,
        retry_after_s: u64,
        queue_full: bool,
        /// RateLimit-Policy of the bucket: its name (`page`/`app`), calls per window, window.
        policy: &'static str,
        limit: u32,
        window_s: u64,
    },
    #[error("graphgate is shutting down.")]
    ShuttingDown,
    #[error("Not found.")]
    NotFound,
    #[error("graphgate internal error: {0}")]
    Internal(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        use ProxyError::*;
        match self {
            MissingKey | UnknownKey => StatusCode::UNAUTHORIZED,
            ForbiddenPage(_) | ForbiddenWrite(_) | ForbiddenField(_) | WebhookRefused(_) => {
                StatusCode::FORBIDDEN
            }
            BadRequest(_) => StatusCode::BAD_REQUEST,
            MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            UpstreamConnect(_) | UpstreamBadResponse(_) | UpstreamTooLarge(_) => {
                StatusCode::BAD_GATEWAY
            }
            UpstreamUnavailable { .. } | Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Throttled { .. } => StatusCode::TOO_MANY_REQUESTS,
            ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            NotFound => StatusCode::NOT_FOUND,
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// (Graph error type, code, subcode) as SDKs expect them.
    fn graph_code(&self) -> (&'static str, i64, Option<i64>) {
        use ProxyError::*;
        match self {
            MissingKey => ("OAuthException", 190, Some(subcode::NO_KEY)),
            UnknownKey => ("OAuthException", 190, Some(subcode::UNKNOWN_KEY)),
            ForbiddenPage(_) => ("OAuthException", 10, Some(subcode::FORBIDDEN_PAGE)),
            ForbiddenWrite(_) => ("OAuthException", 200, Some(subcode::FORBIDDEN_WRITE)),
            ForbiddenField(_) => ("OAuthException", 200, Some(subcode::FORBIDDEN_FIELD)),
            WebhookRefused(_) => ("OAuthException", 10, Some(subcode::WEBHOOK_REFUSED)),
            BadRequest(_)
            | MethodNotAllowed(_)
            | UnsupportedMediaType(_)
            | BodyTooLarge(_)
            | HeadersTooLarge(_)
            | BodyTimeout(_) => ("GraphMethodException", 100, None),
            UpstreamConnect(_) | UpstreamTimeout(_) | UpstreamBadResponse(_) => {
                ("GraphgateException", 2, Some(subcode::UPSTREAM))
            }
            UpstreamTooLarge(_) => ("GraphgateException", 1, Some(subcode::UPSTREAM_TOO_LARGE)),
            UpstreamUnavailable { .. } => ("GraphgateException", 2, Some(subcode::BREAKER_OPEN)),
            Overloaded { .. } => ("GraphgateException", 2, Some(subcode::OVERLOADED)),
            Throttled { queue_full, .. } => (
                "OAuthException",
                80001,
                Some(if *queue_full {
                    subcode::QUEUE_FULL
                } else {
                    subcode::QUEUE_TIMEOUT
                }),
            ),
            ShuttingDown => ("GraphgateException", 2, None),
            NotFound => ("GraphMethodException", 803, None),
            Internal(_) => ("GraphgateException", 1, None),
        }
    }

    /// Why graphgate answered with this error, bounded, for metrics and logs.
    pub fn rejection(&self) -> Rejection {
        use ProxyError::*;
        match self {
            MissingKey | UnknownKey => Rejection::Unauthorized,
            ForbiddenPage(_) | ForbiddenWrite(_) | ForbiddenField(_) | WebhookRefused(_) => {
                Rejection::Forbidden
            }
            BadRequest(_) | MethodNotAllowed(_) | UnsupportedMediaType(_) | NotFound => {
                Rejection::BadRequest
            }
            BodyTooLarge(_) | HeadersTooLarge(_) => Rejection::TooLarge,
            BodyTimeout(_) => Rejection::BodyTimeout,
            UpstreamConnect(_) => Rejection::UpstreamConnect,
            UpstreamTimeout(_) => Rejection::UpstreamTimeout,
            UpstreamBadResponse(_) => Rejection::UpstreamBadResponse,
            UpstreamTooLarge(_) => Rejection::UpstreamTooLarge,
            UpstreamUnavailable { .. } => Rejection::BreakerOpen,
            Overloaded { .. } => Rejection::Overloaded,
            Throttled { .. } => Rejection::Throttled,
            ShuttingDown => Rejection::ShuttingDown,
            Internal(_) => Rejection::Internal,
        }
    }

    /// Short, bounded label for metrics and logs: the [`Rejection`]'s.
    pub fn label(&self) -> &'static str {
        self.rejection().as_str()
    }

    /// Graph-style JSON body: `{"error":{"message","type","code","error_subcode","fbtrace_id"}}`.
    pub fn body(&self, trace_id: &str) -> Bytes {
        let (kind, code, sub) = self.graph_code();
        let mut err = json!({
            "message": self.to_string(),
            "type": kind,
            "code": code,
            "fbtrace_id": trace_id,
        });
        if let Some(sub) = sub {
            err["error_subcode"] = json!(sub);
        }
        if matches!(
            self,
            ProxyError::Throttled { .. }
                | ProxyError::UpstreamTimeout(_)
                | ProxyError::UpstreamUnavailable { .. }
                | ProxyError::Overloaded { .. }
        ) {
            err["is_transient"] = json!(true);
        }
        Bytes::from(json!({ "error": err }).to_string())
    }

    pub fn into_response(self, trace_id: &str) -> Response<Full<Bytes>> {
        let mut resp = Response::new(Full::new(self.body(trace_id)));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=UTF-8"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if matches!(self, ProxyError::MissingKey | ProxyError::UnknownKey) {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(
                    "OAuth \"graphgate\" \"invalid_token\" \"client key required\"",
                ),
            );
        }
        match &self {
            ProxyError::Throttled {
                retry_after_s,
                policy,
                limit,
                window_s,
                ..
            } => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_s));
                // draft-ietf-httpapi-ratelimit-headers: nothing left until Retry-After.
                for (name, value) in rate_limit_pair(policy, *limit, *window_s, 0, *retry_after_s) {
                    h.insert(name, value);
                }
            }
            ProxyError::UpstreamUnavailable { retry_after_s }
            | ProxyError::Overloaded { retry_after_s } => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_s));
            }
            _ => {}
        }
        resp
    }
}

/// The two IETF RateLimit headers (draft-ietf-httpapi-ratelimit-headers) for one policy: `q`
/// calls per `w` seconds, `r` left, `t` seconds until more. Here, at the bottom, because both
/// a throttled reply and the quota scheduler render them.
pub fn rate_limit_pair(
    name: &str,
    q: u32,
    w: u64,
    r: u32,
    t: u64,
) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = Vec::with_capacity(2);
    if let Some(v) = rate_limit_value(name, [(b'q', q.into()), (b'w', w)]) {
        out.push((HeaderName::from_static("ratelimit-policy"), v));
    }
    if let Some(v) = rate_limit_value(name, [(b'r', r.into()), (b't', t)]) {
        out.push((HeaderName::from_static("ratelimit"), v));
    }
    out
}

/// `"{name}";{k}={v};{k}={v}`, written straight into the value's buffer: every upstream reply
/// carries two of these, and the formatting machinery cost more than the rest of the headers.
fn rate_limit_value(name: &str, params: [(u8, u64); 2]) -> Option<HeaderValue> {
    let mut out = Vec::with_capacity(name.len() + 52);
    out.push(b'"');
    out.extend_from_slice(name.as_bytes());
    out.push(b'"');
    for (key, value) in params {
        out.extend_from_slice(&[b';', key, b'=']);
        out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }
    HeaderValue::from_maybe_shared(bytes::Bytes::from(out)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The pair reads exactly as the draft's `"name";q=..;w=..` and `"name";r=..;t=..`.
        #[test]
        fn rate_limit_pair_is_the_drafts_text(
            name in "[a-z_0-9]{1,12}",
            q in proptest::prelude::any::<u32>(),
            w in proptest::prelude::any::<u64>(),
            r in proptest::prelude::any::<u32>(),
            t in proptest::prelude::any::<u64>(),
        ) {
            let pair = rate_limit_pair(&name, q, w, r, t);
            proptest::prop_assert_eq!(pair.len(), 2);
            proptest::prop_assert_eq!(pair[0].0.as_str(), "ratelimit-policy");
            proptest::prop_assert_eq!(pair[0].1.to_str().unwrap(), format!("\"{name}\";q={q};w={w}"));
            proptest::prop_assert_eq!(pair[1].0.as_str(), "ratelimit");
            proptest::prop_assert_eq!(pair[1].1.to_str().unwrap(), format!("\"{name}\";r={r};t={t}"));
        }
    }

    #[test]
    fn body_is_graph_shaped() {
        let body = ProxyError::UnknownKey.body("gg-1");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], 190);
        assert_eq!(v["error"]["type"], "OAuthException");
        assert_eq!(v["error"]["fbtrace_id"], "gg-1");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("client key"));
    }

    #[test]
    fn throttled_has_retry_after() {
        let r = ProxyError::Throttled {
            page: "1001".into(),
            retry_after_s: 7,
            queue_full: false,
            policy: "page",
            limit: 98,
            window_s: 3600,
        }
        .into_response("t");
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "7");
        assert_eq!(r.headers()["ratelimit-policy"], "\"page\";q=98;w=3600");
        assert_eq!(r.headers()["ratelimit"], "\"page\";r=0;t=7");
        let v: serde_json::Value = serde_json::from_slice(
            &ProxyError::Throttled {
                page: "1001".into(),
                retry_after_s: 7,
                queue_full: true,
                policy: "page",
                limit: 98,
                window_s: 3600,
            }
            .body("t"),
        )
        .unwrap();
        assert_eq!(v["error"]["code"], 80001);
        assert_eq!(v["error"]["error_subcode"], subcode::QUEUE_FULL);
        assert_eq!(v["error"]["is_transient"], true);
    }
}
