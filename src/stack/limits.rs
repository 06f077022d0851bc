//! Stage: limits. Refuses new work while draining and request heads over
//! `server.max_header_bytes`; reads the body within `server.max_body_bytes` (413) and
//! `server.body_read_timeout_ms` (408). A request without a body passes on in place.

use std::task::{Context, Poll};

use bytes::Bytes;
use http::Request;
use tower::Service;

use super::stage::{Stage, Staged};
use super::trace::Traced;
use super::GatewayHandle;
use crate::metrics::Route;
use crate::proxy::Answer;

#[derive(Clone)]
pub struct Limits<S> {
    inner: S,
    gateway: GatewayHandle,
}

impl<S> Limits<S> {
    /// This stage in front of `inner`.
    pub fn new(inner: S, gateway: GatewayHandle) -> Limits<S> {
        Limits { inner, gateway }
    }
}

impl<S, B> Service<Traced<B>> for Limits<S>
where
    S: Stage<Traced<Bytes>>,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Answer;
    type Error = std::convert::Infallible;
    type Future = Staged;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, t: Traced<B>) -> Staged {
        let Traced { request, context } = t;
        if let Err(e) = self.gateway.check_head(&request) {
            return Staged::now(Answer::refused(e, Route::Invalid, None));
        }
        let (parts, body) = request.into_parts();
        if hyper::body::Body::is_end_stream(&body) {
            let request = Request::from_parts(parts, Bytes::new());
            return self.inner.call(Traced { request, context });
        }
        let gateway = self.gateway.clone();
        let mut inner = self.inner.clone();
        Staged::later(async move {
            let within = gateway.config.server.body_read_timeout;
            match gateway.read_body_within(body, &parts.headers, within).await {
                Ok(body) => {
                    let request = Request::from_parts(parts, body);
                    match inner.call(Traced { request, context }).await {
                        Ok(answer) => answer,
                        Err(never) => match never {},
                    }
                }
                Err(e) => Answer::refused(e, Route::Invalid, None),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http::StatusCode;
    use http_body_util::Full;
    use tower::ServiceExt;

    use super::*;
    use crate::stack::testing::{gateway, passed_on, recorder, traced};

    #[tokio::test]
    async fn heads_over_the_limit_and_draining_are_refused_and_bodies_read_whole() {
        let gw = gateway();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let limits = Limits::new(
            recorder(seen.clone(), |t: &Traced<Bytes>| t.request.body().clone()),
            gw.clone(),
        );

        let big = "x".repeat(64 * 1024);
        let answer = limits
            .clone()
            .oneshot(traced(
                Request::get("/v21.0/1001")
                    .header("x-big", big)
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            ))
            .await
            .unwrap();
        assert_eq!(
            answer.reply.unwrap_err().status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );

        let answer = limits
            .clone()
            .oneshot(traced(
                Request::post("/v21.0/1001/feed")
                    .body(Full::new(Bytes::from_static(b"message=hi")))
                    .unwrap(),
            ))
            .await
            .unwrap();
        assert!(passed_on(&answer));
        assert_eq!(
            seen.lock().unwrap().as_slice(),
            [Bytes::from_static(b"message=hi")]
        );

        gw.set_draining();
        let answer = limits
            .oneshot(traced(
                Request::get("/v21.0/1001")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            ))
            .await
            .unwrap();
        assert_eq!(
            answer.reply.unwrap_err().status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(seen.lock().unwrap().len(), 1, "nothing more passed on");
    }
}
