//! A client request as graphgate models it: the parsed [`Call`] (method, path, parameters,
//! `ids=`, batch), the client's quota [`Hints`] and the per-call facts recorded for the
//! request log. Everything above reads this model; it depends on nothing above it.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::Priority;
use crate::error::ProxyError;
use crate::graph::body::{self, FilePart};
use crate::graph::headers;
use crate::graph::request::{
    canonical_ids, effective_method, page_of_node, parse_batch, parse_ids, BatchOp, GraphMethod,
    GraphPath, Params,
};
use crate::metrics::Route;
use crate::tracecontext::RequestContext;

/// A client request, parsed. Clone: a cache fill takes its own copy into its task.
#[derive(Debug, Clone)]
pub struct Call {
    /// The method Graph will execute (after `method=`).
    pub method: GraphMethod,
    pub(crate) http_method: GraphMethod,
    pub path: GraphPath,
    /// Query and body parameters together, one value per name (see
    /// [`Params::collapse_duplicates`]), without the client's key: what is checked here is
    /// what goes upstream.
    pub params: Params,
    /// The `access_token` parameters, query first, then body (taken out of `params`): the
    /// client keys presented, for authentication.
    pub(crate) presented_tokens: Params,
    /// Uploaded files of a multipart body, forwarded as they came.
    pub files: Vec<FilePart>,
    /// The ids of an `ids=` read, checked; `params` holds exactly these.
    pub ids: Vec<String>,
    pub batch: Option<Vec<BatchOp>>,
    /// The client's request headers that go on to Graph ([`headers::FORWARDED_REQUEST`]).
    pub(crate) forwarded: Vec<(HeaderName, HeaderValue)>,
    /// `X-Graphgate-Page` / `X-Graphgate-Max-Wait-Ms`.
    pub quota_hints: Hints,
    /// The trace and request id passed on to Graph (`traceparent`, `X-Request-Id`); set
    /// after parsing, added to the upstream request only when it is built.
    pub trace: Option<Arc<RequestContext>>,
    /// What the upstream phase learned for the request log; shared with a fill's copy.
    pub stats: Arc<CallStats>,
}

/// What the upstream phase learns about a call, for the request's record: shared by the
/// call and the copy a fill runs with (the fill may run in a task of its own).
#[derive(Debug, Default)]
pub struct CallStats {
    /// Time waited for quota budget; `None` if the call never reached the scheduler.
    queue_wait: Mutex<Option<Duration>>,
    /// The Page the scheduler charged, when the call went to exactly one Page.
    charged_page: OnceLock<String>,
}

impl CallStats {
    /// Time waited for quota budget, if the call reached the scheduler.
    pub fn queue_wait(&self) -> Option<Duration> {
        *self.queue_wait.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn charged_page(&self) -> Option<&str> {
        self.charged_page.get().map(String::as_str)
    }

    /// Records the Page the scheduler charged; the first one set stays.
    pub fn set_charged_page(&self, page: &str) {
        let _ = self.charged_page.set(page.to_string());
    }

    /// Adds time waited for quota budget (each attempt of a call is admitted).
    pub fn add_queue_wait(&self, waited: Duration) {
        let mut total = self.queue_wait.lock().unwrap_or_else(|e| e.into_inner());
        *total = Some(total.unwrap_or_default().saturating_add(waited));
    }
}

impl Call {
    /// The client keys the request presented (`access_token` in the query or body).
    pub fn presented_tokens(&self) -> &Params {
        &self.presented_tokens
    }

    /// The route class, for metrics and logs.
    pub fn route(&self) -> Route {
        if self.batch.is_some() {
            Route::Batch
        } else if !self.ids.is_empty() {
            Route::Ids
        } else if self.path.edge().is_some() {
            Route::Edge
        } else if self.path.node().is_some() {
            Route::Node
        } else {
            Route::Root
        }
    }

    /// The Page this call is charged to and may use a Page token for, when it is one Page.
    pub fn page(&self) -> Option<&str> {
        if self.batch.is_some() || !self.ids.is_empty() {
            return None;
        }
        self.path.node().and_then(page_of_node)
    }
}

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
    pub fn from_headers(map: &HeaderMap) -> Hints {
        // Looked up by `HeaderName` constants: a `&str` name is parsed on every lookup.
        const PAGE: http::HeaderName = http::HeaderName::from_static(headers::PAGE);
        const MAX_WAIT: http::HeaderName = http::HeaderName::from_static(headers::MAX_WAIT);
        let text =
            |name: http::HeaderName| map.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
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
    pub fn bind_to(&mut self, priority: Priority, may_touch: impl Fn(&str) -> bool) {
        if self.page.as_deref().is_some_and(|p| !may_touch(p)) {
            self.page = None;
        }
        self.priority = priority;
    }
}

/// Parses method, path, query and body into a [`Call`]: every parameter of the query and the
/// body (url-encoded, multipart or JSON; see [`body::parse`]), one value per name.
pub fn parse_call(
    method: &http::Method,
    uri: &http::Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Call, ProxyError> {
    let http_method = GraphMethod::from_http(method)?;
    let path = GraphPath::parse(uri.path())?;
    let mut params = Params::parse(uri.query().unwrap_or(""))?;
    let body = body::parse(method, headers, body)?;
    params.extend(body.params);
    params.collapse_duplicates()?;
    let method = effective_method(http_method, &params)?;
    if !body.files.is_empty() && method != GraphMethod::Post {
        return Err(ProxyError::BadRequest(
            "Files can only be uploaded with a POST.".into(),
        ));
    }
    let presented_tokens = params.take("access_token");
    params.remove("appsecret_proof");
    let ids = parse_ids(&params)?;
    if !ids.is_empty() {
        params.set("ids", canonical_ids(&ids));
    }
    let batch = match params.get("batch") {
        Some(b) => Some(parse_batch(b)?),
        None => None,
    };
    let forwarded = headers
        .iter()
        .filter(|(n, _)| headers::FORWARDED_REQUEST.contains(&n.as_str()))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    Ok(Call {
        method,
        http_method,
        path,
        params,
        presented_tokens,
        files: body.files,
        ids,
        batch,
        forwarded,
        quota_hints: Hints::from_headers(headers),
        stats: Arc::default(),
        trace: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_are_read_leniently() {
        let mut h = HeaderMap::new();
        h.insert(headers::PAGE, "1001".parse().unwrap());
        h.insert(headers::MAX_WAIT, " 250 ".parse().unwrap());
        assert_eq!(
            Hints::from_headers(&h),
            Hints {
                page: Some("1001".into()),
                max_wait: Some(Duration::from_millis(250)),
                priority: Priority::Interactive,
            }
        );
        h.insert(headers::PAGE, "me".parse().unwrap());
        h.insert(headers::MAX_WAIT, "soon".parse().unwrap());
        assert_eq!(Hints::from_headers(&h), Hints::default());
    }

    #[test]
    fn binding_keeps_only_a_page_the_client_may_touch_and_takes_its_priority() {
        let mut h = Hints {
            page: Some("1001".into()),
            ..Hints::default()
        };
        h.bind_to(Priority::Batch, |p| p == "1001");
        assert_eq!(h.page.as_deref(), Some("1001"));
        assert_eq!(h.priority, Priority::Batch);
        h.bind_to(Priority::Interactive, |p| p == "2002");
        assert_eq!(h.page, None);
        assert_eq!(h.priority, Priority::Interactive);
    }
}
