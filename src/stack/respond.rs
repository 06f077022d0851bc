//! Stage: respond. Turns what the stages below answered into the client's reply (an error
//! becomes Graph's error shape), sets `X-Graphgate-Trace-Id`, and writes the request's
//! record: the request metric and the access log line. A request answered without waiting (a
//! hit, a refusal) is finished in place; only one that waits carries its state in the future.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderName, Request, Response};
use http_body_util::Full;
use tower::Service;

use super::stage::{Stage, Staged};
use super::trace::Traced;
use super::GatewayHandle;
use crate::metrics::{cache_label, Metrics, RequestMethod};
use crate::proxy::Answer;
use crate::tracecontext::RequestContext;

const X_FB_TRACE_ID: HeaderName = HeaderName::from_static("x-fb-trace-id");
pub const X_GRAPHGATE_TRACE_ID: HeaderName = HeaderName::from_static("x-graphgate-trace-id");
/// Longest User-Agent written to the request log line.
const MAX_LOGGED_USER_AGENT: usize = 256;

#[derive(Clone)]
pub struct Respond<S> {
    inner: S,
    gateway: GatewayHandle,
}

impl<S> Respond<S> {
    /// This stage in front of `inner`.
    pub fn new(inner: S, gateway: GatewayHandle) -> Respond<S> {
        Respond { inner, gateway }
    }
}

/// What finishing a request needs besides its answer.
struct Finish {
    context: Arc<RequestContext>,
    method: RequestMethod,
    line: Option<RequestLine>,
    started: Instant,
}

impl<S, B> Service<Traced<B>> for Respond<S>
where
    S: Stage<Traced<B>>,
{
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = RespondFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, t: Traced<B>) -> RespondFuture {
        let finish = Finish {
            started: Instant::now(),
            method: RequestMethod::of(t.request.method()),
            line: RequestLine::capture(&t.request),
            context: t.context.clone(),
        };
        let mut staged = self.inner.call(t);
        match staged.take_now() {
            Some(answer) => RespondFuture(Replying::Now(Some(
                finish.reply(&self.gateway.metrics, answer),
            ))),
            None => RespondFuture(Replying::Later(Box::new((
                staged,
                self.gateway.clone(),
                finish,
            )))),
        }
    }
}

/// The reply, now or once the stages below have answered.
pub struct RespondFuture(Replying);

enum Replying {
    Now(Option<Response<Full<Bytes>>>),
    /// Boxed: the request already waits (and allocated) below; the hit path stays small.
    Later(Box<(Staged, GatewayHandle, Finish)>),
}

impl Future for RespondFuture {
    type Output = Result<Response<Full<Bytes>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().0 {
            Replying::Now(response) => match response.take() {
                Some(r) => Poll::Ready(Ok(r)),
                None => Poll::Pending,
            },
            Replying::Later(state) => {
                let (staged, gateway, finish) = &mut **state;
                let Poll::Ready(Ok(answer)) = Pin::new(staged).poll(cx) else {
                    return Poll::Pending;
                };
                Poll::Ready(Ok(finish.reply(&gateway.metrics, answer)))
            }
        }
    }
}

impl Finish {
    /// The reply to a request whatever came of it, after the request metric and the access
    /// log line.
    fn reply(&self, metrics: &Metrics, answer: Answer) -> Response<Full<Bytes>> {
        let Answer { reply, record } = answer;
        let context = &self.context;
        let mut response = match reply {
            Ok(response) => response,
            Err(e) => {
                metrics.server.reject(e.rejection());
                e.into_response(context.trace.trace_id())
            }
        };
        let status = response.status();
        let took = self.started.elapsed();
        metrics.server.observe_request(
            record.route,
            self.method,
            status.as_u16(),
            record.cache,
            took,
        );
        let line = self.line.as_ref();
        // Only bounded labels, ids, numbers and checked client values: no key, token or query
        // string is a field, so nothing secret can reach the log (redacted by construction).
        // The macro evaluates the fields only when the line is on.
        tracing::info!(
            trace_id = context.trace.trace_id(),
            request_id = context.request_id(),
            method = self.method.as_str(),
            path = line.map_or("-", |l| l.path.as_str()),
            route = record.route.as_str(),
            node = record.node.as_deref().unwrap_or("-"),
            status = status.as_u16(),
            cache = cache_label(record.cache),
            page = record.page.as_deref().unwrap_or("-"),
            client = record.client.as_ref().map(|c| c.name.as_str()).unwrap_or("-"),
            bytes = hyper::body::Body::size_hint(response.body()).exact().unwrap_or(0),
            client_addr = %context
                .client_addr
                .map_or_else(|| "-".to_string(), |a| a.to_string()),
            user_agent = line.map_or("-", |l| l.user_agent.as_str()),
            upstream_ms = record.upstream_ms.map_or(-1, |m| i64::try_from(m).unwrap_or(i64::MAX)),
            queue_ms = record
                .queue_wait
                .map(|d| d.as_secs_f64() * 1000.0)
                .unwrap_or(-1.0),
            total_us = took.as_micros() as u64,
            fbtrace_id = response
                .headers()
                .get(X_FB_TRACE_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or(""),
            "request"
        );
        response
            .headers_mut()
            .insert(X_GRAPHGATE_TRACE_ID, context.trace.trace_id_header());
        response
    }
}

/// What the access log line needs from the request before it is taken apart: its path
/// without anything that could be a secret, and the bounded User-Agent. Captured only when
/// the line will be written.
struct RequestLine {
    path: String,
    user_agent: String,
}

impl RequestLine {
    fn capture<B>(req: &Request<B>) -> Option<RequestLine> {
        if !tracing::enabled!(tracing::Level::INFO) {
            return None;
        }
        let user_agent = req
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map_or("-", |ua| {
                let mut end = ua.len().min(MAX_LOGGED_USER_AGENT);
                while !ua.is_char_boundary(end) {
                    end -= 1;
                }
                &ua[..end]
            })
            .to_string();
        Some(RequestLine {
            path: loggable_path(req.uri().path()),
            user_agent,
        })
    }
}

/// The request path for the log: no query string, and every segment that is not a Graph
/// version, id or edge name written as `-` (a key pasted into a path is never logged).
fn loggable_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len().min(128));
    for segment in path.split('/').filter(|s| !s.is_empty()).take(16) {
        out.push('/');
        let b = segment.as_bytes();
        let version = b.len() <= 8
            && b.first() == Some(&b'v')
            && b[1..].iter().all(|c| c.is_ascii_digit() || *c == b'.');
        let id = b.len() <= 64 && b.iter().all(|c| c.is_ascii_digit() || *c == b'_');
        let account =
            b.len() <= 64 && b.starts_with(b"act_") && b[4..].iter().all(|c| c.is_ascii_digit());
        let edge = b.len() <= 40 && b.iter().all(|c| c.is_ascii_lowercase() || *c == b'_');
        if version || id || account || edge {
            out.push_str(segment);
        } else {
            out.push('-');
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http::StatusCode;
    use tower::ServiceExt;

    use super::*;
    use crate::error::ProxyError;
    use crate::metrics::Route;
    use crate::stack::testing::{gateway, traced};

    #[test]
    fn logged_paths_hold_no_query_and_nothing_that_could_be_a_key() {
        for (path, logged) in [
            ("/v21.0/1001/feed", "/v21.0/1001/feed"),
            ("/", "/"),
            ("/me/accounts", "/me/accounts"),
            ("/v21.0/act_123/insights", "/v21.0/act_123/insights"),
            ("/v21.0/1001_2002/comments", "/v21.0/1001_2002/comments"),
            ("/v21.0/EAABsecretToken123", "/v21.0/-"),
            ("/v21.0/key-reader-1001/feed", "/v21.0/-/feed"),
            ("/v21.0/3f2a9c0d1e/feed", "/v21.0/-/feed"),
            ("/v21.0/%41bc", "/v21.0/-"),
        ] {
            assert_eq!(loggable_path(path), logged, "{path}");
        }
    }

    /// Answers with what it is told: at once or after a yield.
    fn answering(later: bool) -> impl Stage<Traced<Full<Bytes>>> {
        tower::service_fn(move |_: Traced<Full<Bytes>>| {
            let answer = Answer::refused(ProxyError::NotFound, Route::Invalid, None);
            if later {
                Staged::later(async move {
                    tokio::task::yield_now().await;
                    answer
                })
            } else {
                Staged::now(answer)
            }
        })
    }

    #[tokio::test]
    async fn answers_now_and_later_become_graph_errors_with_the_trace_and_are_counted() {
        let gw = gateway();
        let seen = Arc::new(Mutex::new(Vec::new()));
        for later in [false, true] {
            let respond = Respond::new(answering(later), gw.clone());
            let response = respond
                .oneshot(traced(
                    Request::get("/nowhere")
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                ))
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::NOT_FOUND);
            let trace = response.headers()[X_GRAPHGATE_TRACE_ID].clone();
            seen.lock().unwrap().push(trace);
        }
        let text = gw.metrics.render();
        assert!(
            text.lines()
                .any(|l| l.starts_with("graphgate_requests_total{")
                    && l.contains("route=\"invalid\"")
                    && l.ends_with(" 2")),
            "both requests counted:\n{text}"
        );
        let seen = seen.lock().unwrap();
        assert_ne!(seen[0], seen[1], "each request its own trace");
    }
}
