//! The public request path, as one stack of tower layers read top to bottom: each layer
//! wraps everything below it. Built once per connection (see [`public`]), so the handles a
//! request clones are that connection's own.
//!
//! 1. [`shed`]: load shedding. At most `server.max_in_flight` requests at once; one more gets
//!    503 at once.
//! 2. [`trace`]: request id and trace. The client's `traceparent` / `X-Request-Id` or new
//!    ones, the client's address, a `request` span around the rest, `X-Request-Id` echoed.
//! 3. [`respond`]: the reply (errors in Graph's shape), the request metric and the access
//!    log line, from the request's record.
//! 4. [`webhook`]: the Meta Webhooks endpoint, when configured; every other request goes on.
//! 5. [`limits`]: draining, head size, the body read within its size and time limits.
//! 6. [`recall`]: a request this worker served from the cache before, byte for byte, is
//!    answered from what parse and admission made of it then, while its entry is fresh.
//! 7. [`parse`]: the request as Graph reads it (a `Call`).
//! 8. [`admit`]: authenticate the client, authorize everything the call asks for.
//! 9. [`read_through`]: cache lookup (a hit is answered here), coalesced fills for misses.
//! 10. [`upstream`]: token, per-Page quota admission, the call to Graph with retry and
//!     breaker, learning from usage headers, invalidation after writes.
//!
//! Stages 4–10 answer with a [`stage::Staged`]: a hit is answered without allocating a
//! future; what has to wait is boxed once. The state they share is the gateway
//! ([`crate::proxy::Gateway`]): configuration, clients, tokens, cache, quota, upstream.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Waker};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tower::{Service, ServiceBuilder, ServiceExt};

use crate::proxy::Gateway;
use crate::tracecontext::RequestContext;

pub mod admit;
pub mod limits;
pub mod parse;
pub mod read_through;
pub mod recall;
pub mod respond;
pub mod shed;
pub mod stage;
#[cfg(test)]
mod testing;
pub mod trace;
pub mod upstream;
pub mod webhook;

use admit::Admit;
use limits::Limits;
use parse::Parse;
use read_through::ReadThrough;
use recall::RecallStage;
use respond::Respond;
use shed::ShedLayer;
use trace::{TraceLayer, Traced};
use webhook::WebhookRoute;

/// The gateway as the stages hold it: a handle of the connection's own, so cloning the
/// stack per request touches a count no other worker writes (the gateway's own count would
/// be a cache line every worker writes).
#[derive(Clone)]
#[allow(clippy::redundant_allocation)]
pub struct GatewayHandle(Arc<Arc<Gateway>>);

impl GatewayHandle {
    pub fn new(gateway: &Arc<Gateway>) -> GatewayHandle {
        GatewayHandle(Arc::new(gateway.clone()))
    }

    /// The gateway itself, for a future that outlives the stage's call.
    pub fn owned(&self) -> Arc<Gateway> {
        (*self.0).clone()
    }
}

impl std::ops::Deref for GatewayHandle {
    type Target = Arc<Gateway>;

    fn deref(&self) -> &Arc<Gateway> {
        &self.0
    }
}

/// The public listener's stack for one connection from `peer` (`None`: in-process use).
pub fn public<B>(
    gateway: &Arc<Gateway>,
    peer: Option<SocketAddr>,
) -> impl Service<
    Request<B>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
> + Clone
       + Send
       + 'static
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let server = &gateway.config.server;
    ServiceBuilder::new()
        .layer(ShedLayer::new(
            gateway.in_flight_counter().clone(),
            server.max_in_flight,
            gateway.metrics.clone(),
        ))
        .layer(TraceLayer::new(peer, server.trusted_proxies.clone()))
        .service(stages(GatewayHandle::new(gateway)))
}

/// The stages below the trace layer: from a traced request to its reply.
pub fn stages<B>(
    gateway: GatewayHandle,
) -> impl Service<
    Traced<B>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = respond::RespondFuture,
> + Clone
       + Send
       + 'static
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    ServiceBuilder::new()
        .layer_fn(|inner| Respond::new(inner, gateway.clone()))
        .layer_fn(|inner| WebhookRoute::new(inner, gateway.clone()))
        .layer_fn(|inner| Limits::new(inner, gateway.clone()))
        .layer_fn(|inner| RecallStage::new(inner, gateway.clone()))
        .layer_fn(Parse::new)
        .layer_fn(|inner| Admit::new(inner, gateway.clone()))
        .layer_fn(|inner| ReadThrough::new(inner, gateway.clone()))
        .service(upstream::Upstream::new(gateway.clone()))
}

/// Answers one request that came without a socket (benches, in-process use): a new trace,
/// no client address, through the same stages as a served request.
pub async fn handle<B>(gateway: &Arc<Gateway>, request: Request<B>) -> Response<Full<Bytes>>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let context = Arc::new(RequestContext::from_headers(request.headers(), None));
    match stages(GatewayHandle::new(gateway))
        .oneshot(Traced { request, context })
        .await
    {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// Calls a stack built here without waiting for readiness. No stage holds a request back in
/// `poll_ready` (load shedding answers 503 in `call`; a test below keeps it so), so readiness
/// is asked once with a no-op waker instead of through `oneshot`, whose state would move the
/// request and the stack once more. What a served connection does for each request.
pub fn call_ready<S: Service<R>, R>(stack: &mut S, request: R) -> S::Future {
    let ready = stack.poll_ready(&mut Context::from_waker(Waker::noop()));
    debug_assert!(ready.is_ready());
    stack.call(request)
}

#[cfg(test)]
mod tests {
    use http::StatusCode;
    use http_body_util::BodyExt;

    use super::testing::{gateway, store, READ};
    use super::*;

    fn get(path: &str) -> Request<Full<Bytes>> {
        Request::get(path)
            .body(Full::new(Bytes::new()))
            .expect("request")
    }

    #[tokio::test]
    async fn a_hit_goes_through_every_stage_without_the_upstream() {
        let gw = gateway();
        store(&gw, READ, r#"{"id":"1001","name":"Stored"}"#);
        let response = handle(&gw, get(READ)).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-cache"], "HIT");
        assert!(response.headers().contains_key("x-graphgate-trace-id"));
        let body = response.into_body().collect().await.expect("body");
        assert_eq!(&body.to_bytes()[..], br#"{"id":"1001","name":"Stored"}"#);
        // A miss goes to the upstream, which is not there: Graph-style 502, not a panic.
        let response = handle(&gw, get("/v21.0/1001?fields=about&access_token=reader-key")).await;
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    }

    /// The server calls the stack without waiting for readiness (see `server.rs`): no stage
    /// may hold a request back in `poll_ready`, even with the in-flight limit reached (a
    /// request beyond it is answered 503 in `call`).
    #[tokio::test]
    async fn the_public_stack_is_ready_at_once_even_when_full() {
        let gw = gateway();
        let full: Vec<_> = (0..gw.config.server.max_in_flight)
            .map_while(|_| {
                crate::proxy::InFlight::admit(gw.in_flight_counter().clone(), usize::MAX)
            })
            .collect();
        let mut stack = public::<Full<Bytes>>(&gw, None);
        let ready = stack.poll_ready(&mut Context::from_waker(Waker::noop()));
        assert!(matches!(ready, std::task::Poll::Ready(Ok(()))));
        let response = stack.call(get(READ)).await.unwrap_or_else(|e| match e {});
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        drop(full);
    }

    /// Every layer above the stages moves their future: it holds a finished reply or one
    /// box, never the request's state.
    #[test]
    fn the_future_the_outer_layers_move_is_a_reply_or_a_box() {
        let reply = std::mem::size_of::<Response<Full<Bytes>>>();
        assert!(std::mem::size_of::<respond::RespondFuture>() <= reply + 16);
    }
}
