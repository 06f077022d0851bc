//! What the stages' tests share: a gateway whose upstream (port 9 on loopback) is never
//! there, requests at each stage's input, and an inner stage that records what reached it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;

use super::stage::{Stage, Staged};
use super::trace::Traced;
use super::GatewayHandle;
use crate::cache::entry::Entry;
use crate::cache::key;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::{parse_call, Admitted, Answer, Gateway, Parsed, Record};
use crate::rewrite::PreparedBody;
use crate::tracecontext::RequestContext;

const CONFIG: &str = r#"
    [upstream]
    url = "http://127.0.0.1:9"
    [credentials]
    system_user_token = "EAAB-system-token-secret"
    app_secret = "shh-app-secret"
    [[clients]]
    name = "reader"
    key = "reader-key"
    pages = ["1001"]
    [[clients]]
    name = "writer"
    key = "writer-key"
    pages = ["1001"]
    write = true
"#;

/// A node read the reader may make.
pub const READ: &str = "/v21.0/1001?fields=id,name&access_token=reader-key";

const PASSED_ON: &str = "x-test-passed-on";

pub fn gateway() -> GatewayHandle {
    let config = Config::from_toml(CONFIG, |_| None).expect("config");
    let metrics = Arc::new(Metrics::new());
    let gateway = Gateway::new(config, "http://gw.test".into(), metrics).expect("gateway");
    GatewayHandle::new(&Arc::new(gateway))
}

pub fn traced<B>(request: Request<B>) -> Traced<B> {
    let context = Arc::new(RequestContext::from_headers(request.headers(), None));
    Traced { request, context }
}

/// `request` after the parse stage.
pub fn parsed_request(request: Request<Bytes>) -> Parsed {
    let (parts, body) = request.into_parts();
    let call = parse_call(&parts.method, &parts.uri, &parts.headers, body).expect("parses");
    Parsed {
        route: call.route(),
        parts,
        call,
    }
}

/// A GET of `path` after the parse stage.
pub fn parsed(path: &str) -> Parsed {
    parsed_request(Request::get(path).body(Bytes::new()).expect("request"))
}

/// `request` after the admission stage.
pub fn admitted_request(gw: &GatewayHandle, request: Request<Bytes>) -> Admitted {
    match gw.admit_client(parsed_request(request)) {
        Ok(a) => a,
        Err(_) => panic!("admitted"),
    }
}

/// A GET of `path` with `headers` after the admission stage.
pub fn admitted(gw: &GatewayHandle, path: &str, headers: &[(&str, &str)]) -> Admitted {
    let mut req = Request::get(path);
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    admitted_request(gw, req.body(Bytes::new()).expect("request"))
}

/// Stores `body` under the key a GET of `path` looks up, as a fill would.
pub fn store(gw: &GatewayHandle, path: &str, body: &'static str) {
    let a = admitted(gw, path, &[]);
    let identity = gw.tokens.identity_for(a.call.page());
    let k = key::build(
        gw.version_of(&a.call),
        &a.call.path.segments,
        &a.call.params,
        &identity,
    )
    .expect("key");
    let body = PreparedBody::plain(Bytes::from_static(body.as_bytes()));
    let entry = Entry::new(StatusCode::OK, Vec::new(), body, Duration::from_secs(60));
    assert!(gw.cache.store(&k, &entry, gw.cache.epoch(&k)));
}

/// An inner stage that records `what` of each request reaching it and answers at once with
/// a reply [`passed_on`] recognises.
pub fn recorder<R: 'static, T: Send + 'static>(
    seen: Arc<Mutex<Vec<T>>>,
    what: fn(&R) -> T,
) -> impl Stage<R> {
    tower::service_fn(move |r: R| {
        seen.lock().expect("lock").push(what(&r));
        let mut response = Response::new(Full::new(Bytes::new()));
        response
            .headers_mut()
            .insert(PASSED_ON, HeaderValue::from_static("1"));
        Staged::now(Answer {
            reply: Ok(response),
            record: Record::of(crate::metrics::Route::Invalid, None),
        })
    })
}

/// Whether the stage passed the request on to the [`recorder`].
pub fn passed_on(answer: &Answer) -> bool {
    answer
        .reply
        .as_ref()
        .is_ok_and(|r| r.headers().contains_key(PASSED_ON))
}
