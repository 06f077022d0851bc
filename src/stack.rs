//! The public request path, as one stack of tower layers read top to bottom: each layer
//! wraps everything below it. Built once per connection (see [`public`]), so the handles a
//! request clones are that connection's own.
//!
//! 1. [`shed`]: load shedding. At most `server.max_in_flight` requests at once; one more gets
//!    503 at once.
//! 2. [`trace`]: request id and trace. The client's `traceparent` / `X-Request-Id` or new
//!    ones, the client's address, a `request` span around the rest, `X-Request-Id` echoed.
//! 3. The gateway ([`Gateway::handle_in`]): draining, limits, parse, authenticate,
//!    authorize, cache read-through, quota admission and upstream, respond; then the request
//!    metric and the access log line.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tower::{service_fn, Service, ServiceBuilder};

use crate::proxy::Gateway;

pub mod shed;
pub mod trace;

use shed::ShedLayer;
use trace::{TraceLayer, Traced};

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
    // A handle of the connection's own: cloning it per request touches a count no other
    // worker writes (the gateway's own count would be a cache line every worker writes).
    let handle = Arc::new(gateway.clone());
    ServiceBuilder::new()
        .layer(ShedLayer::new(
            gateway.in_flight_counter().clone(),
            server.max_in_flight,
            gateway.metrics.clone(),
        ))
        .layer(TraceLayer::new(peer, server.trusted_proxies.clone()))
        .service(service_fn(move |t: Traced<B>| {
            let gateway = handle.clone();
            async move { Ok(gateway.handle_in(t.request, t.context).await) }
        }))
}
