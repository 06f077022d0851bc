//! Request id and trace: reads the client's `traceparent` and `X-Request-Id` (or makes new
//! ones, see [`RequestContext`]), resolves the client's address, runs the rest of the request
//! inside a `request` span that carries the trace and request ids (so every log line of the
//! request names them), and echoes `X-Request-Id` in the response.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response};
use tower::{Layer, Service};
use tracing::instrument::Instrumented;
use tracing::Instrument;

use crate::config::IpNet;
use crate::tracecontext::{client_addr, RequestContext, X_REQUEST_ID};

/// A request with its trace context: what the services inside the trace layer take.
pub struct Traced<B> {
    pub request: Request<B>,
    /// Shared: the respond stage and the call to Graph read it too, and a request moves
    /// through every stage (a pointer moves cheaper than the context).
    pub context: Arc<RequestContext>,
}

/// Made per connection: the TCP peer is the connection's.
#[derive(Clone)]
pub struct TraceLayer(Arc<Settings>);

struct Settings {
    /// `None` for requests that do not come over a socket.
    peer: Option<SocketAddr>,
    /// `server.trusted_proxies`: peers whose `X-Forwarded-For` is believed.
    trusted_proxies: Vec<IpNet>,
}

impl TraceLayer {
    pub fn new(peer: Option<SocketAddr>, trusted_proxies: Vec<IpNet>) -> TraceLayer {
        TraceLayer(Arc::new(Settings {
            peer,
            trusted_proxies,
        }))
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = TraceService<S>;

    fn layer(&self, inner: S) -> TraceService<S> {
        TraceService {
            inner,
            settings: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct TraceService<S> {
    inner: S,
    settings: Arc<Settings>,
}

impl<S, B, ResB> Service<Request<B>> for TraceService<S>
where
    S: Service<Traced<B>, Response = Response<ResB>>,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = TraceFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let s = &self.settings;
        let addr = s.peer.map(|peer| {
            client_addr(peer, request.headers(), |ip| {
                s.trusted_proxies.iter().any(|n| n.contains(ip))
            })
        });
        let context = Arc::new(RequestContext::from_headers(request.headers(), addr));
        let span = tracing::info_span!(
            "request",
            trace_id = context.trace.trace_id(),
            request_id = context.request_id()
        );
        #[cfg(feature = "otlp")]
        crate::otlp::adopt(&span, &context.trace);
        let request_id = context.request_id_header();
        let inner = {
            let _entered = span.enter();
            self.inner.call(Traced { request, context })
        };
        TraceFuture {
            inner: inner.instrument(span),
            request_id: Some(request_id),
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner future inside the request's span; sets `X-Request-Id` on its response.
    pub struct TraceFuture<F> {
        #[pin]
        inner: Instrumented<F>,
        request_id: Option<HeaderValue>,
    }
}

impl<F, ResB, E> Future for TraceFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
{
    type Output = Result<Response<ResB>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = match this.inner.poll(cx) {
            Poll::Ready(Ok(r)) => r,
            other => return other,
        };
        if let Some(id) = this.request_id.take() {
            response.headers_mut().insert(X_REQUEST_ID, id);
        }
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Mutex;

    use tower::{service_fn, ServiceExt};

    use super::*;
    use crate::tracecontext::TRACEPARENT;

    /// A service that answers with what it was given: the trace id and the client address.
    fn echo() -> impl Service<
        Traced<()>,
        Response = Response<String>,
        Error = Infallible,
        Future = impl Future<Output = Result<Response<String>, Infallible>>,
    > + Clone {
        service_fn(|t: Traced<()>| async move {
            let c = &t.context;
            let addr = c.client_addr.map_or("-".into(), |a| a.to_string());
            Ok(Response::new(format!("{} {addr}", c.trace.trace_id())))
        })
    }

    fn layer(peer: &str, trusted: &[&str]) -> TraceLayer {
        let trusted = trusted.iter().map(|t| t.parse().unwrap()).collect();
        TraceLayer::new(Some(peer.parse().unwrap()), trusted)
    }

    #[tokio::test]
    async fn a_valid_traceparent_and_request_id_are_kept_and_the_id_echoed() {
        let svc = layer("10.0.0.1:5000", &[]).layer(echo());
        let req = Request::builder()
            .header(
                TRACEPARENT,
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .header("x-request-id", "abc-123")
            .body(())
            .unwrap();
        let r = svc.oneshot(req).await.unwrap();
        assert_eq!(r.headers()["x-request-id"], "abc-123");
        assert_eq!(r.body(), "4bf92f3577b34da6a3ce929d0e0e4736 10.0.0.1");
    }

    #[tokio::test]
    async fn invalid_ones_are_replaced() {
        let svc = layer("10.0.0.1:5000", &[]).layer(echo());
        let req = Request::builder()
            .header(TRACEPARENT, "00-zz-00f067aa0ba902b7-01")
            .header("x-request-id", "no spaces allowed")
            .body(())
            .unwrap();
        let r = svc.oneshot(req).await.unwrap();
        let trace = r.body().split(' ').next().unwrap().to_string();
        assert_eq!(trace.len(), 32);
        assert_eq!(r.headers()["x-request-id"], trace.as_str());
    }

    #[tokio::test]
    async fn forwarded_for_counts_only_from_a_trusted_peer() {
        let req = || {
            Request::builder()
                .header("x-forwarded-for", "203.0.113.9")
                .body(())
                .unwrap()
        };
        let untrusted = layer("192.0.2.1:5000", &["10.0.0.0/8"]).layer(echo());
        let r = untrusted.oneshot(req()).await.unwrap();
        assert!(r.body().ends_with(" 192.0.2.1"), "{}", r.body());
        let trusted = layer("10.1.1.1:5000", &["10.0.0.0/8"]).layer(echo());
        let r = trusted.oneshot(req()).await.unwrap();
        assert!(r.body().ends_with(" 203.0.113.9"), "{}", r.body());
    }

    /// Every event inside the request's span is written with its trace and request ids.
    #[tokio::test]
    async fn log_lines_of_the_request_carry_its_ids() {
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let svc = layer("10.0.0.1:5000", &[]).layer(service_fn(|_: Traced<()>| async {
            tracing::info!("inside");
            Ok::<_, Infallible>(Response::new(String::new()))
        }));
        let req = Request::builder()
            .header("x-request-id", "rid-7")
            .body(())
            .unwrap();
        svc.oneshot(req).await.unwrap();
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("inside"), "{text}");
        assert!(text.contains("request_id=\"rid-7\""), "{text}");
        assert!(text.contains("trace_id=\""), "{text}");
    }
}
