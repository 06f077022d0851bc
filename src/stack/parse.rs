//! Stage: parse. The request (head and read body) becomes a [`Call`](crate::proxy::Call):
//! path, parameters, fields, batch, files, as Graph would read them; the call carries the
//! request's trace for the upstream request. Malformed requests get Graph's 400 here.

use std::task::{Context, Poll};

use bytes::Bytes;
use tower::Service;

use super::stage::{Stage, Staged};
use super::trace::Traced;
use crate::metrics::Route;
use crate::proxy::{parse_call, Answer, Parsed};

#[derive(Clone)]
pub struct Parse<S> {
    inner: S,
}

impl<S> Parse<S> {
    /// This stage in front of `inner`; it needs nothing but the request.
    pub fn new(inner: S) -> Parse<S> {
        Parse { inner }
    }
}

impl<S: Stage<Parsed>> Service<Traced<Bytes>> for Parse<S> {
    type Response = Answer;
    type Error = std::convert::Infallible;
    type Future = Staged;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, t: Traced<Bytes>) -> Staged {
        let (parts, body) = t.request.into_parts();
        match parse_call(&parts.method, &parts.uri, &parts.headers, body) {
            Ok(mut call) => {
                call.trace = Some(t.context);
                self.inner.call(Parsed {
                    route: call.route(),
                    parts,
                    call,
                })
            }
            Err(e) => Staged::now(Answer::refused(e, Route::Invalid, None)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http::{Request, StatusCode};
    use tower::ServiceExt;

    use super::*;
    use crate::stack::testing::{passed_on, recorder, traced};

    #[tokio::test]
    async fn a_request_becomes_a_call_with_its_trace_and_malformed_ones_are_refused() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let parse = Parse::new(recorder(seen.clone(), |p: &Parsed| {
            (
                p.call.path.node().map(str::to_string),
                p.route,
                p.call.trace.is_some(),
            )
        }));
        let answer = parse
            .clone()
            .oneshot(traced(
                Request::get("/v21.0/1001?fields=id,name")
                    .body(Bytes::new())
                    .unwrap(),
            ))
            .await
            .unwrap();
        assert!(passed_on(&answer));
        let (node, route, has_trace) = seen.lock().unwrap()[0].clone();
        assert_eq!(node.as_deref(), Some("1001"));
        assert_eq!(route, Route::Node);
        assert!(has_trace, "the call carries the request's trace");

        for bad in [
            "/v21.0/1001?fields=id&fields=name",
            "/v21.0/?ids=1001,1002&ids=1003",
        ] {
            let answer = parse
                .clone()
                .oneshot(traced(Request::get(bad).body(Bytes::new()).unwrap()))
                .await
                .unwrap();
            assert!(!passed_on(&answer), "{bad}");
        }
        let answer = parse
            .oneshot(traced(
                Request::post("/v21.0/1001/feed")
                    .header("content-type", "application/x-unknown")
                    .body(Bytes::from_static(b"x"))
                    .unwrap(),
            ))
            .await
            .unwrap();
        assert_eq!(
            answer.reply.unwrap_err().status(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        assert_eq!(
            seen.lock().unwrap().len(),
            1,
            "only the good request passed on"
        );
    }
}
