//! The connection to Graph: a pooled hyper client over rustls (HTTP/1.1 and HTTP/2 by ALPN),
//! request building (large GET → POST with `method=GET`), and reading replies into a
//! [`Reply`] with only the headers worth passing on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::UpstreamConfig;
use crate::error::ProxyError;
use crate::graph::request::{GraphMethod, Params};
use crate::graph::usage::{ErrorClass, GraphErrorInfo};
use crate::metrics::Metrics;

/// Headers from Graph that clients may see. Everything else (hop-by-hop, cookies, lengths)
/// is dropped; hyper recomputes framing.
const PASSED_RESPONSE_HEADERS: &[&str] = &[
    "content-type",
    "facebook-api-version",
    "x-fb-trace-id",
    "x-fb-request-id",
    "x-fb-rev",
    "x-fb-debug",
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

/// Request headers from the client that may reach Graph. Credentials, cookies and
/// Accept-Encoding (replies must stay readable for paging rewrite) are not among them.
pub const FORWARDED_REQUEST_HEADERS: &[&str] =
    &["accept", "accept-language", "user-agent", "if-none-match"];

/// A buffered reply from Graph (or from the cache, which stores the same thing).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.as_str() == name)
            .and_then(|(_, v)| v.to_str().ok())
    }

    /// Graph's error object, if this is an error reply.
    pub fn graph_error(&self) -> Option<GraphErrorInfo> {
        if self.status.is_success() || self.status == StatusCode::NOT_MODIFIED {
            return None;
        }
        GraphErrorInfo::from_body(&self.body)
    }

    /// Short bounded outcome label for metrics.
    pub fn outcome(&self) -> &'static str {
        if self.status.is_success() || self.status == StatusCode::NOT_MODIFIED {
            return "ok";
        }
        match self.graph_error().map(|e| e.class()) {
            Some(ErrorClass::Throttle(_)) => "throttled",
            Some(ErrorClass::Auth) => "auth_error",
            Some(ErrorClass::Transient) => "transient_error",
            Some(ErrorClass::Other) => "graph_error",
            None if self.status.is_server_error() => "http_5xx",
            None => "http_4xx",
        }
    }
}

/// What to send: parameters already carry the injected token and proof.
#[derive(Debug, Clone)]
pub struct UpstreamRequest {
    pub method: GraphMethod,
    pub path: String,
    pub params: Params,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// A body graphgate does not rewrite (JSON, multipart), sent as is with its content type;
    /// `params` then go into the query string.
    pub opaque_body: Option<(HeaderValue, Bytes)>,
}

pub struct Upstream {
    client: HyperClient<HttpsConnector<HttpConnector>, Full<Bytes>>,
    base: String,
    timeout: Duration,
    max_get_url_bytes: usize,
    max_response_bytes: usize,
    metrics: Arc<Metrics>,
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig, metrics: Arc<Metrics>) -> Result<Upstream, ProxyError> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = HyperClient::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(https);
        Ok(Upstream {
            client,
            base: cfg.url.clone(),
            timeout: cfg.timeout,
            max_get_url_bytes: cfg.max_get_url_bytes,
            max_response_bytes: cfg.max_response_bytes,
            metrics,
        })
    }

    /// Builds the HTTP request, rewriting a GET whose target would be too long into
    /// POST + `method=GET` with the parameters in a form body.
    fn build(&self, req: UpstreamRequest) -> Result<Request<Full<Bytes>>, ProxyError> {
        let query = req.params.encode();
        let target_len = req.path.len() + 1 + query.len();
        let (method, uri, body, content_type) = match (req.method, req.opaque_body) {
            (_, Some((ct, body))) => (
                Method::POST,
                join_target(&self.base, &req.path, &query),
                body,
                Some(ct),
            ),
            (GraphMethod::Get, None) if target_len > self.max_get_url_bytes => {
                self.metrics.large_get_rewrites.inc();
                let mut params = req.params;
                params.set("method", "GET");
                (
                    Method::POST,
                    join_target(&self.base, &req.path, ""),
                    Bytes::from(params.encode()),
                    Some(HeaderValue::from_static(
                        "application/x-www-form-urlencoded",
                    )),
                )
            }
            (GraphMethod::Get, None) => (
                Method::GET,
                join_target(&self.base, &req.path, &query),
                Bytes::new(),
                None,
            ),
            (GraphMethod::Delete, None) => (
                Method::DELETE,
                join_target(&self.base, &req.path, &query),
                Bytes::new(),
                None,
            ),
            (GraphMethod::Post, None) => (
                Method::POST,
                join_target(&self.base, &req.path, ""),
                Bytes::from(query),
                Some(HeaderValue::from_static(
                    "application/x-www-form-urlencoded",
                )),
            ),
        };
        let mut builder = Request::builder().method(method).uri(uri);
        if let Some(h) = builder.headers_mut() {
            for (n, v) in req.headers {
                h.append(n, v);
            }
            if let Some(ct) = content_type {
                h.insert(header::CONTENT_TYPE, ct);
            }
        }
        builder
            .body(Full::new(body))
            .map_err(|e| ProxyError::Internal(format!("cannot build upstream request: {e}")))
    }

    /// Sends one request and buffers the reply (bounded by `max_response_bytes`), all within
    /// the upstream timeout.
    pub async fn send(&self, req: UpstreamRequest) -> Result<Reply, ProxyError> {
        let http_req = self.build(req)?;
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, self.exchange(http_req)).await;
        let result = match result {
            Ok(r) => r,
            Err(_) => Err(ProxyError::UpstreamTimeout(self.timeout.as_millis() as u64)),
        };
        let outcome = match &result {
            Ok(reply) => reply.outcome(),
            Err(e) => e.label(),
        };
        self.metrics.observe_upstream(outcome, started.elapsed());
        result
    }

    async fn exchange(&self, req: Request<Full<Bytes>>) -> Result<Reply, ProxyError> {
        let resp = self.client.request(req).await.map_err(|e| {
            if e.is_connect() {
                ProxyError::UpstreamConnect(describe_error(&e))
            } else {
                ProxyError::UpstreamBadResponse(describe_error(&e))
            }
        })?;
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, self.max_response_bytes)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    ProxyError::UpstreamBadResponse(format!(
                        "reply larger than {} bytes",
                        self.max_response_bytes
                    ))
                } else {
                    ProxyError::UpstreamBadResponse(format!("reply body failed: {e}"))
                }
            })?
            .to_bytes();
        let headers = parts
            .headers
            .iter()
            .filter(|(n, _)| PASSED_RESPONSE_HEADERS.contains(&n.as_str()))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        Ok(Reply {
            status: parts.status,
            headers,
            body,
        })
    }
}

fn join_target(base: &str, path: &str, query: &str) -> String {
    if query.is_empty() {
        format!("{base}{path}")
    } else {
        format!("{base}{path}?{query}")
    }
}

/// The error chain as one line. hyper's errors carry no request data, so no token can leak.
fn describe_error(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut src = e.source();
    while let Some(s) = src {
        parts.push(s.to_string());
        src = s.source();
    }
    parts.join(": ")
}
