//! Load shedding: at most `server.max_in_flight` requests are handled at once. One beyond
//! that is answered at once with 503, `Retry-After` and a Graph-style error, never queued
//! (a queue would only add latency to requests the clients are about to give up on).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use tower::{Layer, Service};

use crate::error::ProxyError;
use crate::metrics::{Metrics, Rejection};
use crate::proxy::{Counted, InFlight};

/// Sheds requests beyond `max` being handled at once, counted in the gateway's [`InFlight`]
/// (which is what the `graphgate_requests_in_flight` gauge reads).
#[derive(Clone)]
pub struct ShedLayer(Arc<Shed>);

struct Shed {
    in_flight: Arc<InFlight>,
    max: usize,
    metrics: Arc<Metrics>,
}

impl ShedLayer {
    /// Made per connection: the handle a request's guard clones is this connection's alone.
    pub fn new(in_flight: Arc<InFlight>, max: usize, metrics: Arc<Metrics>) -> ShedLayer {
        ShedLayer(Arc::new(Shed {
            in_flight,
            max,
            metrics,
        }))
    }
}

impl AsRef<InFlight> for ShedLayer {
    fn as_ref(&self) -> &InFlight {
        &self.0.in_flight
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = ShedService<S>;

    fn layer(&self, inner: S) -> ShedService<S> {
        ShedService {
            inner,
            shed: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ShedService<S> {
    inner: S,
    shed: ShedLayer,
}

impl<S, R> Service<R> for ShedService<S>
where
    S: Service<R, Response = Response<Full<Bytes>>>,
{
    type Response = Response<Full<Bytes>>;
    type Error = S::Error;
    type Future = ShedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        match InFlight::admit(self.shed.clone(), self.shed.0.max) {
            Some(counted) => ShedFuture::Admitted {
                inner: self.inner.call(req),
                _counted: counted,
            },
            None => {
                let m = &self.shed.0.metrics;
                m.server.load_shed.inc();
                m.server.reject(Rejection::Overloaded);
                let response = ProxyError::Overloaded { retry_after_s: 1 }.into_response("gg-shed");
                ShedFuture::Shed {
                    response: Some(response),
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner service's future with the request counted in, or the 503 of a shed one.
    #[project = ShedProj]
    pub enum ShedFuture<F> {
        Admitted { #[pin] inner: F, _counted: Counted<ShedLayer> },
        Shed { response: Option<Response<Full<Bytes>>> },
    }
}

impl<F, E> Future for ShedFuture<F>
where
    F: Future<Output = Result<Response<Full<Bytes>>, E>>,
{
    type Output = Result<Response<Full<Bytes>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ShedProj::Admitted { inner, .. } => inner.poll(cx),
            ShedProj::Shed { response } => match response.take() {
                Some(r) => Poll::Ready(Ok(r)),
                None => Poll::Pending,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tokio::sync::oneshot;
    use tower::{service_fn, ServiceBuilder, ServiceExt};

    use super::*;

    fn ok() -> Response<Full<Bytes>> {
        Response::new(Full::new(Bytes::from_static(b"ok")))
    }

    #[tokio::test]
    async fn requests_beyond_the_limit_get_503_at_once_and_the_count_returns_to_zero() {
        let in_flight = Arc::new(InFlight::default());
        let metrics = Arc::new(Metrics::new());
        let layer = ShedLayer::new(in_flight.clone(), 1, metrics.clone());
        // The inner service answers when the test says so: the first request stays in flight.
        let svc = ServiceBuilder::new().layer(layer).service(service_fn(
            |release: oneshot::Receiver<()>| async move {
                let _ = release.await;
                Ok::<_, Infallible>(ok())
            },
        ));
        let (release, held) = oneshot::channel();
        let first = tokio::spawn(svc.clone().oneshot(held));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while in_flight.current() == 0 {
            assert!(std::time::Instant::now() < deadline, "first never counted");
            tokio::task::yield_now().await;
        }
        let (_never, rx) = oneshot::channel();
        let shed = svc.clone().oneshot(rx).await.unwrap();
        assert_eq!(shed.status(), 503);
        assert_eq!(shed.headers()["retry-after"], "1");
        assert_eq!(metrics.server.load_shed.get(), 1);
        assert_eq!(
            metrics
                .server
                .rejections
                .with_label_values(&[Rejection::Overloaded.as_str()])
                .get(),
            1
        );
        assert_eq!(in_flight.current(), 1, "a shed request is not counted");
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap().unwrap().status(), 200);
        assert_eq!(in_flight.current(), 0);
        let (tx, rx) = oneshot::channel();
        tx.send(()).unwrap();
        assert_eq!(svc.oneshot(rx).await.unwrap().status(), 200);
    }

    #[tokio::test]
    async fn a_request_dropped_mid_way_is_counted_out() {
        let in_flight = Arc::new(InFlight::default());
        let layer = ShedLayer::new(in_flight.clone(), 4, Arc::new(Metrics::new()));
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(service_fn(|(): ()| {
                std::future::pending::<Result<Response<Full<Bytes>>, Infallible>>()
            }));
        let mut fut = Box::pin(svc.oneshot(()));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(in_flight.current(), 1);
        drop(fut);
        assert_eq!(in_flight.current(), 0);
    }
}
