//! Stage: recall. A request this worker served from the cache before, byte for byte, is
//! answered from what parse and admission made of it then, while its entry is fresh (see
//! `crate::proxy` `recall` for when a request qualifies and why the answer is the same).
//! Everything else passes on to parse.

use std::task::{Context, Poll};

use bytes::Bytes;
use tower::Service;

use super::stage::{Stage, Staged};
use super::trace::Traced;
use super::GatewayHandle;
use crate::proxy::Answer;

/// The stage: see the module docs.
#[derive(Clone)]
pub struct RecallStage<S> {
    inner: S,
    gateway: GatewayHandle,
    /// The request's bytes, built here for each request (kept to reuse its allocation).
    bytes: Vec<u8>,
}

impl<S> RecallStage<S> {
    /// This stage in front of `inner`.
    pub fn new(inner: S, gateway: GatewayHandle) -> RecallStage<S> {
        RecallStage {
            inner,
            gateway,
            bytes: Vec::new(),
        }
    }
}

impl<S: Stage<Traced<Bytes>>> Service<Traced<Bytes>> for RecallStage<S> {
    type Response = Answer;
    type Error = std::convert::Infallible;
    type Future = Staged;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut t: Traced<Bytes>) -> Staged {
        match self.gateway.recall_hit(&mut t.request, &mut self.bytes) {
            Some(answer) => Staged::now(answer),
            None => self.inner.call(t),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http::{Request, StatusCode};

    use super::*;
    use crate::metrics::Route;
    use crate::proxy::RecallKey;
    use crate::stack::testing::{admitted_request, gateway, passed_on, recorder, store, READ};

    fn get(path: &str, headers: &[(&str, &str)]) -> Request<Bytes> {
        let mut r = Request::get(path);
        for (n, v) in headers {
            r = r.header(*n, *v);
        }
        r.body(Bytes::new()).expect("request")
    }

    /// The stage answers a request it was told about (by the cache stage, after a hit)
    /// without passing it on, and only while the request's bytes, its entry's freshness and
    /// the client set are what they were.
    #[test]
    fn a_remembered_hit_is_answered_here_until_something_it_depends_on_changes() {
        let gw = gateway();
        store(&gw, READ, r#"{"id":"1001","name":"Stored"}"#);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut stage = RecallStage::new(
            recorder(seen.clone(), |t: &Traced<Bytes>| {
                t.request.extensions().get::<RecallKey>().cloned()
            }),
            gw.clone(),
        );
        let call = |stage: &mut RecallStage<_>, r: Request<Bytes>| {
            let context = Arc::new(crate::tracecontext::RequestContext::from_headers(
                r.headers(),
                None,
            ));
            stage.call(Traced {
                request: r,
                context,
            })
        };
        // Not remembered yet: passed on, with its bytes for the cache stage.
        let mut first = call(&mut stage, get(READ, &[]));
        assert!(passed_on(&first.take_now().expect("now")));
        let recall_key = seen.lock().unwrap()[0].clone().expect("a recall key");
        // What the cache stage does after serving that request from the cache.
        let mut served = get(READ, &[]);
        served.extensions_mut().insert(recall_key);
        let a = admitted_request(&gw, served);
        let cache_key = crate::cache::key::build(
            gw.version_of(&a.call),
            &a.call.path.segments,
            &a.call.params,
            &gw.tokens.identity_for(a.call.page()),
        )
        .expect("key");
        let recall = gw.recall.as_ref().expect("on by default");
        recall.remember(&a, cache_key);
        assert_eq!(recall.len(), 1);

        let answer = call(&mut stage, get(READ, &[("user-agent", "sdk")]))
            .take_now()
            .expect("now");
        assert!(!passed_on(&answer));
        let response = answer.reply.expect("a hit");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-cache"], "HIT");
        assert_eq!(answer.record.client.expect("client").name, "reader");
        assert_eq!(answer.record.route, Route::Node);
        assert_eq!(seen.lock().unwrap().len(), 1);

        // Other bytes, a directive, a header parse reads: passed on.
        for (path, headers) in [
            ("/v21.0/1001?fields=id,name&access_token=writer-key", vec![]),
            (READ, vec![("authorization", "Bearer reader-key")]),
            (READ, vec![("cache-control", "no-cache")]),
            (READ, vec![("x-graphgate-page", "1001")]),
        ] {
            let answer = call(&mut stage, get(path, &headers))
                .take_now()
                .expect("now");
            assert!(passed_on(&answer), "{path} {headers:?}");
        }
        // A reload swaps the client set (here, for the same clients): worked out again.
        gw.clients.replace(&gw.config.clients);
        let answer = call(&mut stage, get(READ, &[])).take_now().expect("now");
        assert!(passed_on(&answer));
    }
}
