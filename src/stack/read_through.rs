//! Stage: cache read-through. A cacheable read is looked up in the in-process cache here and
//! a hit answered at once, without waiting or allocating a future; a miss (or stale entry,
//! `ids=` and batch members) waits for its fill, coalesced with identical and covering
//! reads, through the Redis tier when there is one (`crate::proxy` `cached`, `members`,
//! `fleet`). Everything else (writes, `no-store`, uncacheable routes) passes on upstream.

use std::task::{Context, Poll};

use tower::Service;

use super::stage::{Stage, Staged};
use super::GatewayHandle;
use crate::proxy::{Admitted, Answer, ReadStart};

#[derive(Clone)]
pub struct ReadThrough<S> {
    inner: S,
    gateway: GatewayHandle,
}

impl<S> ReadThrough<S> {
    /// This stage in front of `inner`.
    pub fn new(inner: S, gateway: GatewayHandle) -> ReadThrough<S> {
        ReadThrough { inner, gateway }
    }
}

impl<S: Stage<Admitted>> Service<Admitted> for ReadThrough<S> {
    type Response = Answer;
    type Error = std::convert::Infallible;
    type Future = Staged;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, a: Admitted) -> Staged {
        let gw = &self.gateway;
        let version = gw.version_of(&a.call);
        match gw.start_read(&a.call, version, &a.parts.headers, &a.key) {
            Err(e) => Staged::now(a.reject(e)),
            Ok(ReadStart::Hit(s, key)) => {
                if let Some(recall) = &gw.recall {
                    recall.remember(&a, key);
                }
                Staged::now(a.answer(s.response, s.cache, s.upstream_ms))
            }
            Ok(ReadStart::Served(s)) => Staged::now(a.answer(s.response, s.cache, s.upstream_ms)),
            Ok(ReadStart::Uncached) => self.inner.call(a),
            Ok(pending) => Staged::later(gw.owned().after_lookup(a, pending)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http::{Request, StatusCode};
    use tower::ServiceExt;

    use super::*;
    use crate::stack::testing::{
        admitted, admitted_request, gateway, passed_on, recorder, store, READ,
    };

    #[tokio::test]
    async fn a_stored_entry_is_answered_at_once_and_uncacheable_calls_pass_on() {
        let gw = gateway();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let read = ReadThrough::new(
            recorder(seen.clone(), |a: &Admitted| a.call.method),
            gw.clone(),
        );
        let call = |path: &str, headers: &[(&str, &str)]| {
            let mut stage = read.clone();
            let a = admitted(&gw, path, headers);
            stage.call(a)
        };

        // A miss waits for its fill (which this test never polls).
        assert!(matches!(call(READ, &[]), Staged::Later(_)));
        store(&gw, READ, r#"{"id":"1001","name":"Stored"}"#);
        let mut hit = call(READ, &[]);
        let answer = hit.take_now().expect("a stored entry is answered at once");
        let response = answer.reply.expect("hit");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-cache"], "HIT");
        // The client's directives still count: no-cache revalidates, no-store passes on.
        assert!(matches!(
            call(READ, &[("cache-control", "no-cache")]),
            Staged::Later(_)
        ));
        let answer = call(READ, &[("cache-control", "no-store")])
            .take_now()
            .expect("passed on at once");
        assert!(passed_on(&answer));
        assert_eq!(seen.lock().unwrap().len(), 1);
        // A write is never looked up.
        let answer = read
            .clone()
            .oneshot(admitted_request(
                &gw,
                Request::post("/v21.0/1001/feed?message=hi&access_token=writer-key")
                    .body(Bytes::new())
                    .unwrap(),
            ))
            .await
            .unwrap();
        assert!(passed_on(&answer));
        assert_eq!(seen.lock().unwrap().len(), 2);
    }
}
