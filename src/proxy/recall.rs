//! Recalled hits. A worker remembers what parse and admission made of each cache hit it
//! served (the client, the key presented, the route, the cache key) under the request's exact
//! bytes, and answers the same bytes again from that while the entry stays fresh: no parse,
//! no key lookup, no authorization, no key digest. On by default (`[cache] recall_hits`).
//!
//! Why this is the same answer: for a request that qualifies, parse and admission read
//! nothing but the method, the URI, the `Authorization` values, the client set and settings
//! only a restart changes (the default version, the token identity, the cache rules). So a
//! request qualifies only when it is a GET without a body or a client certificate, and every
//! header it carries is one those stages do not read or one the hit path reads afresh
//! ([`IGNORED`]); its remembered bytes are its URI and its `Authorization` values, and an
//! entry counts only while the client set it was worked out from is the current one (a
//! reload swaps it). Everything else goes on to parse as before, and so does a recalled
//! request whose entry is gone, stale, or asked to revalidate.
//!
//! The remembered bytes hold client keys, so they are compared without an early exit (see
//! `crate::auth` on timing): a lookup learns nothing about other requests' bytes.

use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{header, HeaderName, Method, Request};

use super::cached::KeptHead;
use super::{Admitted, Answer, Gateway, Record, Served};
use crate::auth::{Client, PeerCertificate};
use crate::cache::key::{CacheKey, FastHash, FastMap};
use crate::metrics::Route;
use crate::upstream::{worker_slot, WORKER_SLOTS};

/// Requests a worker remembers; when full it forgets them all and starts again.
const MAX_RECALLED: usize = 4096;

/// Headers a recalled request may carry: ones parse and admission do not read for a GET
/// without a body (`Accept`, `Accept-Language` and `User-Agent` go on to Graph only when
/// the call does), ones the hit path reads for itself (`Cache-Control`, `Pragma`,
/// `If-None-Match`), ones the trace layer has already read, and `Authorization`, whose
/// values are part of the remembered bytes. A request with any other header takes the
/// whole path every time.
static IGNORED: [HeaderName; 19] = [
    header::HOST,
    header::USER_AGENT,
    header::ACCEPT,
    header::ACCEPT_ENCODING,
    header::ACCEPT_LANGUAGE,
    header::CONNECTION,
    header::CACHE_CONTROL,
    header::PRAGMA,
    header::IF_NONE_MATCH,
    header::AUTHORIZATION,
    header::VIA,
    header::FORWARDED,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("traceparent"),
    HeaderName::from_static("tracestate"),
    HeaderName::from_static("x-request-id"),
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-real-ip"),
];

/// A request's remembered bytes and the client set current before it was admitted, carried
/// in its extensions from this stage to the cache stage, which remembers the hit under them.
#[derive(Clone)]
pub struct RecallKey {
    bytes: Box<[u8]>,
    generation: u64,
}

/// What parse and admission made of a request that was then served from the cache.
struct Recalled {
    bytes: Box<[u8]>,
    /// The client set it was worked out from ([`crate::auth::ClientRegistry::generation`]).
    generation: u64,
    route: Route,
    client: Arc<Client>,
    /// The client key presented (the reply's paging links carry it).
    key: String,
    cache_key: CacheKey,
    /// What the access log names (`crate::proxy` `log_page`, `log_node`).
    page: Option<String>,
    node: Option<String>,
    /// The headers its replies start with, for the entry last served.
    head: KeptHead,
}

impl Recalled {
    /// The answer for this request, served (or failed) as the cache stage would.
    fn answer(&self, served: Result<Served, crate::error::ProxyError>) -> Answer {
        match served {
            Ok(s) => {
                let logged = tracing::enabled!(tracing::Level::INFO);
                Answer {
                    reply: Ok(s.response),
                    record: Record {
                        route: self.route,
                        client: Some(self.client.clone()),
                        cache: Some(s.cache),
                        upstream_ms: None,
                        // Copied only for a log line that is written.
                        page: logged.then(|| self.page.clone()).flatten(),
                        node: logged.then(|| self.node.clone()).flatten(),
                        queue_wait: None,
                    },
                }
            }
            Err(e) => Answer::refused(e, self.route, Some(self.client.clone())),
        }
    }
}

/// One worker's remembered requests, by a keyed hash of their bytes.
struct Memory {
    by_hash: FastMap<u64, Arc<Recalled>>,
    hasher: FastHash,
}

/// Every worker's remembered requests (one [`Memory`] per worker slot, so workers do not
/// contend for a lock).
pub struct Recall {
    workers: Box<[Mutex<Memory>]>,
}

impl Default for Recall {
    fn default() -> Self {
        Recall {
            workers: (0..WORKER_SLOTS)
                .map(|_| {
                    Mutex::new(Memory {
                        by_hash: FastMap::default(),
                        hasher: FastHash::default(),
                    })
                })
                .collect(),
        }
    }
}

impl Recall {
    fn memory(&self) -> &Mutex<Memory> {
        &self.workers[worker_slot().min(self.workers.len() - 1)]
    }

    /// What was remembered for exactly `bytes` under the client set `generation`.
    fn find(&self, bytes: &[u8], generation: u64) -> Option<Arc<Recalled>> {
        let memory = self.memory().lock().ok()?;
        let found = memory.by_hash.get(&memory.hasher.hash_one(bytes))?;
        (found.generation == generation && same_bytes(&found.bytes, bytes)).then(|| found.clone())
    }

    /// Remembers a hit that `a` was served, under the bytes the recall stage gave it.
    /// The generation is the one read before admission: a reload in between leaves an entry
    /// that is never found, never one that outlives the set it came from.
    pub(crate) fn remember(&self, a: &Admitted, cache_key: CacheKey) {
        let Some(RecallKey { bytes, generation }) = a.parts.extensions.get::<RecallKey>() else {
            return;
        };
        let recalled = Arc::new(Recalled {
            bytes: bytes.clone(),
            generation: *generation,
            route: a.route,
            client: a.client.clone(),
            key: a.key.clone(),
            cache_key,
            page: super::named_page(&a.call).map(str::to_string),
            node: a.call.path.node().map(str::to_string),
            head: KeptHead::default(),
        });
        let Ok(mut memory) = self.memory().lock() else {
            return;
        };
        if memory.by_hash.len() >= MAX_RECALLED {
            memory.by_hash.clear();
        }
        let hash = memory.hasher.hash_one(&recalled.bytes[..]);
        memory.by_hash.insert(hash, recalled);
    }

    /// How many requests the workers remember, all told.
    pub fn len(&self) -> usize {
        self.workers
            .iter()
            .map(|w| w.lock().map_or(0, |m| m.by_hash.len()))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Equal bytes, compared without stopping at the first difference.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// Writes the bytes a request is remembered by into `out` (its URI, then each
/// `Authorization` value with its length), or returns false when the request does not
/// qualify (see the module docs).
pub(crate) fn request_bytes(request: &Request<Bytes>, out: &mut Vec<u8>) -> bool {
    if request.method() != Method::GET
        || !request.body().is_empty()
        || request.extensions().get::<PeerCertificate>().is_some()
        || !request.headers().keys().all(|name| IGNORED.contains(name))
    {
        return false;
    }
    out.clear();
    let uri = request.uri();
    if let Some(scheme) = uri.scheme_str() {
        out.extend_from_slice(scheme.as_bytes());
        out.extend_from_slice(b"://");
    }
    if let Some(authority) = uri.authority() {
        out.extend_from_slice(authority.as_str().as_bytes());
    }
    let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    out.extend_from_slice(path.as_bytes());
    for value in request.headers().get_all(header::AUTHORIZATION) {
        out.push(0xff);
        out.extend_from_slice(&value.len().to_le_bytes());
        out.extend_from_slice(value.as_bytes());
    }
    true
}

impl Gateway {
    /// The answer to `request` from what this worker remembers of it, if it qualifies, was
    /// remembered under the current client set, and its entry is fresh. Otherwise `None`, and
    /// a request that qualifies carries its [`RecallKey`] on, so that the cache stage
    /// remembers it if it is served from the cache. `bytes` is scratch space.
    pub(crate) fn recall_hit(
        &self,
        request: &mut Request<Bytes>,
        bytes: &mut Vec<u8>,
    ) -> Option<Answer> {
        let recall = self.recall.as_ref()?;
        if !request_bytes(request, bytes) {
            return None;
        }
        let generation = self.clients.generation();
        if let Some(r) = recall.find(bytes, generation) {
            if let Some(served) =
                self.recalled_hit(&r.cache_key, request.headers(), &r.key, &r.head)
            {
                return Some(r.answer(served));
            }
        }
        request.extensions_mut().insert(RecallKey {
            bytes: bytes.as_slice().into(),
            generation,
        });
        None
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    const READ: &str = "/v21.0/1001?fields=id,name&access_token=reader-key";

    fn get(path: &str, headers: &[(&str, &str)]) -> Request<Bytes> {
        let mut r = Request::get(path);
        for (n, v) in headers {
            r = r.header(*n, *v);
        }
        r.body(Bytes::new()).expect("request")
    }

    fn bytes_of(request: &Request<Bytes>) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        request_bytes(request, &mut out).then_some(out)
    }

    #[test]
    fn only_bodiless_gets_with_ignorable_headers_qualify() {
        assert!(bytes_of(&get(
            READ,
            &[("user-agent", "sdk"), ("cache-control", "no-cache")]
        ))
        .is_some());
        let post = Request::post(READ).body(Bytes::new()).expect("request");
        assert!(bytes_of(&post).is_none());
        let with_body = Request::get(READ)
            .body(Bytes::from_static(b"x"))
            .expect("request");
        assert!(bytes_of(&with_body).is_none());
        for header in [
            ("x-graphgate-page", "1001"),
            ("content-type", "text/plain"),
            ("content-length", "0"),
            ("x-anything", "1"),
        ] {
            assert!(bytes_of(&get(READ, &[header])).is_none(), "{header:?}");
        }
        let mut with_cert = get(READ, &[]);
        with_cert.extensions_mut().insert(PeerCertificate {
            names: vec!["reader".into()],
        });
        assert!(bytes_of(&with_cert).is_none());
    }

    /// Different URIs or `Authorization` values never share bytes, however the values
    /// split: each value is preceded by its length, whose zero bytes no value may hold.
    #[test]
    fn the_bytes_tell_every_uri_and_authorization_apart() {
        let two = {
            let mut r = get(READ, &[]);
            r.headers_mut()
                .append(header::AUTHORIZATION, HeaderValue::from_static("a"));
            r.headers_mut()
                .append(header::AUTHORIZATION, HeaderValue::from_static("b"));
            r
        };
        let one = {
            let mut r = get(READ, &[]);
            r.headers_mut().append(
                header::AUTHORIZATION,
                HeaderValue::from_bytes(b"a\xffb").expect("value"),
            );
            r
        };
        let variants = [
            bytes_of(&get(READ, &[])),
            bytes_of(&get(
                "/v21.0/1001?fields=name,id&access_token=reader-key",
                &[],
            )),
            bytes_of(&get(READ, &[("authorization", "Bearer reader-key")])),
            bytes_of(&get(READ, &[("authorization", "Bearer writer-key")])),
            bytes_of(&two),
            bytes_of(&one),
            bytes_of(&get(&format!("http://gw.test{READ}"), &[])),
        ];
        for (i, a) in variants.iter().enumerate() {
            assert!(a.is_some());
            for b in &variants[i + 1..] {
                assert_ne!(a, b);
            }
        }
        // Headers the hit path reads afresh are not part of the bytes.
        assert_eq!(
            bytes_of(&get(
                READ,
                &[("if-none-match", "\"x\""), ("user-agent", "sdk")]
            )),
            variants[0]
        );
    }

    #[test]
    fn same_bytes_is_equality() {
        assert!(same_bytes(b"abc", b"abc"));
        assert!(!same_bytes(b"abc", b"abd"));
        assert!(!same_bytes(b"abc", b"ab"));
        assert!(same_bytes(b"", b""));
    }
}
