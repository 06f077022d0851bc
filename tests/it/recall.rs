//! Recalled hits (`[cache] recall_hits`): a worker answers a request it served from the
//! cache before, byte for byte, without parsing or admitting it again. Whatever clients
//! send, a graphgate that recalls answers as one that does not: the property test sends the
//! same generated request sequences to both and compares the replies. The named tests pin
//! a reload that removes a client and a write that invalidates a recalled entry.

use std::time::Duration;

use bytes::Bytes;
use fake_graph::FakeGraphConfig;
use graphgate::testkit::{Credentials, TestClient};
use http::{Method, StatusCode};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};

use crate::support::*;

/// Entries outlive the test (a TTL running out between the two stacks' requests would make
/// them differ for a reason that is not recall); Graph's and graphgate's limits stay out of
/// the way.
const EXTRA: &str = "[quota]\npage_calls = 10000000\n[cache]\ndefault_ttl_s = 3600\n";

fn graph() -> FakeGraphConfig {
    FakeGraphConfig {
        page_calls_limit: 1_000_000,
        app_calls_limit: 1_000_000,
        ..graph_config()
    }
}

/// One request of a generated sequence.
#[derive(Debug, Clone)]
struct Shape {
    method: Method,
    node: &'static str,
    fields: Option<&'static str>,
    /// Keys in the query, in order (none, one, or a repeated parameter).
    query_keys: Vec<&'static str>,
    /// `Authorization` values, in order.
    authorization: Vec<String>,
    headers: Vec<(&'static str, &'static str)>,
    body: bool,
}

fn key() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        5 => Just(READER_KEY),
        3 => Just(ADMIN_KEY),
        1 => Just("key-nobody-knows"),
        1 => Just(""),
    ]
}

fn shape() -> impl Strategy<Value = Shape> {
    let method =
        prop_oneof![8 => Just(Method::GET), 1 => Just(Method::POST), 1 => Just(Method::HEAD)];
    let node = prop_oneof![Just("1001"), Just("1002"), Just("1001_60"), Just("me")];
    let fields = prop_oneof![
        Just(None),
        Just(Some("id,name")),
        Just(Some("name,id")),
        Just(Some("id")),
        Just(Some("id,access_token")),
    ];
    let one_authorization = || {
        (
            prop_oneof![Just("Bearer"), Just("OAuth"), Just("bearer"), Just("Basic")],
            key(),
        )
            .prop_map(|(scheme, k)| format!("{scheme} {k}"))
    };
    let authorization = prop_oneof![
        6 => Just(Vec::new()),
        3 => prop::collection::vec(one_authorization(), 1..2),
        1 => prop::collection::vec(one_authorization(), 2..3),
    ];
    let query_keys = prop_oneof![
        6 => prop::collection::vec(key(), 1..2),
        2 => Just(Vec::new()),
        1 => prop::collection::vec(key(), 2..3),
    ];
    let header = prop_oneof![
        Just(("cache-control", "no-cache")),
        Just(("cache-control", "max-age=60")),
        Just(("pragma", "no-cache")),
        Just(("x-graphgate-page", "1002")),
        Just(("user-agent", "sdk/1.0")),
        Just(("accept-language", "fr_FR")),
        Just(("if-none-match", "\"nothing\"")),
        Just(("content-type", "text/plain")),
        Just(("x-other", "1")),
    ];
    (
        method,
        node,
        fields,
        query_keys,
        authorization,
        prop_oneof![
            5 => Just(Vec::new()),
            3 => prop::collection::vec(header.clone(), 1..2),
            1 => prop::collection::vec(header, 2..3),
        ],
        prop::bool::weighted(0.1),
    )
        .prop_map(
            |(method, node, fields, query_keys, authorization, headers, body)| Shape {
                method,
                node,
                fields,
                query_keys,
                authorization,
                headers,
                body,
            },
        )
}

/// A few shapes and a sequence that repeats them, so that hits (and recalls) happen.
fn sequence() -> impl Strategy<Value = Vec<Shape>> {
    prop::collection::vec(shape(), 1..5).prop_flat_map(|shapes| {
        let n = shapes.len();
        prop::collection::vec(0..n, 2..12)
            .prop_map(move |picks| picks.into_iter().map(|i| shapes[i].clone()).collect())
    })
}

fn target(shape: &Shape) -> String {
    let mut query: Vec<String> = Vec::new();
    if let Some(f) = shape.fields {
        query.push(format!("fields={f}"));
    }
    for k in &shape.query_keys {
        query.push(format!("access_token={k}"));
    }
    format!("/v21.0/{}?{}", shape.node, query.join("&"))
}

/// What a client can tell of a reply, without what differs between two graphgates for
/// reasons other than recall (trace ids, dates, ages, seconds of TTL left, usage headers
/// of the calls each one's own simulated Graph counted).
fn seen(reply: &Reply) -> (StatusCode, Option<String>, Option<String>, String) {
    let cache_status = reply
        .header("cache-status")
        .map(|v| v.split("; ttl=").next().unwrap_or(v).to_string());
    let body = match serde_json::from_slice::<serde_json::Value>(&reply.body) {
        Ok(mut json) => {
            if let Some(error) = json.get_mut("error").and_then(|e| e.as_object_mut()) {
                error.remove("fbtrace_id");
            }
            json.to_string()
        }
        Err(_) => reply.text(),
    };
    (
        reply.status,
        reply.header("x-cache").map(str::to_string),
        cache_status,
        body,
    )
}

async fn send(s: &Stack, shape: &Shape) -> Reply {
    let mut headers: Vec<(&str, &str)> = shape.headers.clone();
    for a in &shape.authorization {
        headers.push(("authorization", a.as_str()));
    }
    let body = if shape.body {
        Bytes::from_static(b"fields=id")
    } else {
        Bytes::new()
    };
    s.request(shape.method.clone(), &target(shape), &headers, body)
        .await
}

/// Generated request sequences get the same replies from a graphgate that recalls hits as
/// from one that does not, and the one that recalls did remember some.
#[test]
fn recalling_hits_changes_no_reply_to_any_generated_request_sequence() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (recalls, plain) = rt.block_on(async {
        (
            Stack::start_with(graph(), EXTRA).await,
            Stack::start_with(graph(), &format!("{EXTRA}recall_hits = false\n")).await,
        )
    });
    assert!(plain.gw.gateway.recall.is_none());
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let hits = std::cell::Cell::new(0usize);
    let result = runner.run(&sequence(), |requests| {
        for shape in &requests {
            let (a, b) = rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(20), async {
                    (send(&recalls, shape).await, send(&plain, shape).await)
                })
                .await
                .expect("answered")
            });
            prop_assert_eq!(seen(&a), seen(&b), "{:?} {}", shape, target(shape));
            if a.header("x-cache") == Some("HIT") {
                hits.set(hits.get() + 1);
            }
        }
        Ok(())
    });
    let remembered = recalls.gw.gateway.recall.as_ref().map_or(0, |r| r.len());
    rt.block_on(async {
        recalls.stop().await;
        plain.stop().await;
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    eprintln!("hits: {}; requests remembered: {remembered}", hits.get());
    assert!(hits.get() > 0 && remembered > 0);
}

/// A reload that removes a client ends its recalled hits at once; one that brings it back
/// lets it read again.
#[tokio::test]
async fn a_reload_that_removes_a_client_ends_its_recalled_hits() {
    let s = Stack::start_with(graph(), EXTRA).await;
    let read = format!("/v21.0/1001?fields=id,name&access_token={READER_KEY}");
    assert_eq!(s.get(&read).await.header("x-cache"), Some("MISS"));
    for _ in 0..3 {
        let r = s.get(&read).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header("x-cache"), Some("HIT"));
    }
    assert!(s.gw.gateway.recall.as_ref().is_some_and(|r| !r.is_empty()));

    let config = |clients: Vec<TestClient>| {
        Credentials {
            clients,
            ..Credentials::standard()
        }
        .gateway_config(&s.graph.url(), EXTRA)
        .expect("config")
    };
    let admin = || TestClient::new("admin", ADMIN_KEY, &["*"], true);
    let reader = || TestClient::new("reader", READER_KEY, &["1001"], false);
    s.gw.reload(config(vec![admin()])).expect("reloads");
    for _ in 0..3 {
        let r = s.get(&read).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    }
    // Restricted to another Page: refused for this one.
    s.gw.reload(config(vec![
        admin(),
        TestClient::new("reader", READER_KEY, &["1002"], false),
    ]))
    .expect("reloads");
    assert_eq!(s.get(&read).await.status, StatusCode::FORBIDDEN);
    s.gw.reload(config(vec![admin(), reader()]))
        .expect("reloads");
    let r = s.get(&read).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-cache"), Some("HIT"));
    s.stop().await;
}

/// Writes `message=edited` to post 1001_60 (which empties its cached reads).
async fn edit_post(s: &Stack) {
    let w = s
        .post_form(
            "/v21.0/1001_60",
            &format!("message=edited&access_token={ADMIN_KEY}"),
        )
        .await;
    assert_eq!(w.status, StatusCode::OK, "{}", w.text());
}

/// A write to the node makes its recalled entry stale: the next read goes to Graph and sees
/// the write.
#[tokio::test]
async fn a_write_ends_the_recalled_hits_of_its_node() {
    let s = Stack::start_with(graph(), EXTRA).await;
    let read = format!("/v21.0/1001_60?fields=message&access_token={READER_KEY}");
    s.get(&read).await;
    for _ in 0..3 {
        assert_eq!(s.get(&read).await.header("x-cache"), Some("HIT"));
    }
    edit_post(&s).await;
    let r = s.get(&read).await;
    assert_eq!(r.header("x-cache"), Some("MISS"));
    assert_eq!(r.json()["message"], "edited");
    assert_eq!(s.get(&read).await.header("x-cache"), Some("HIT"));
    s.stop().await;
}

/// A recalled hit replays the headers of the entry it is served from, also when another
/// request for the same cache key has replaced the entry since the hit was remembered.
#[tokio::test]
async fn a_recalled_hit_replays_the_headers_of_the_entry_served() {
    let s = Stack::start_with(graph(), EXTRA).await;
    let read = format!("/v21.0/1001_60?fields=message&access_token={READER_KEY}");
    let bearer = format!("Bearer {READER_KEY}");
    let same_key = [("authorization", bearer.as_str())];
    let replayed = |r: &Reply| -> Vec<Option<String>> {
        [
            "x-fb-trace-id",
            "etag",
            "facebook-api-version",
            "content-type",
        ]
        .iter()
        .map(|n| r.header(n).map(str::to_string))
        .collect()
    };
    let first = s.get(&read).await;
    assert_eq!(first.header("x-cache"), Some("MISS"));
    assert!(first.header("x-fb-trace-id").is_some() && first.header("etag").is_some());
    for _ in 0..3 {
        let r = s.get(&read).await;
        assert_eq!(r.header("x-cache"), Some("HIT"));
        assert_eq!(replayed(&r), replayed(&first));
    }
    assert!(s.gw.gateway.recall.as_ref().is_some_and(|r| !r.is_empty()));
    // The same read under other request bytes replaces the entry: the write empties it,
    // this read fills it again from a new reply.
    edit_post(&s).await;
    let refilled = s
        .request(
            Method::GET,
            "/v21.0/1001_60?fields=message",
            &same_key,
            Bytes::new(),
        )
        .await;
    assert_eq!(refilled.header("x-cache"), Some("MISS"));
    assert_ne!(
        refilled.header("x-fb-trace-id"),
        first.header("x-fb-trace-id")
    );
    assert_ne!(refilled.header("etag"), first.header("etag"));
    for _ in 0..3 {
        let r = s.get(&read).await;
        assert_eq!(r.header("x-cache"), Some("HIT"));
        assert_eq!(r.json()["message"], "edited");
        assert_eq!(replayed(&r), replayed(&refilled));
    }
    s.stop().await;
}

/// A recalled hit tells the entry's age and remaining TTL as of the moment it is served,
/// each header once, also after a run of hits that could reuse the last reply's head.
#[tokio::test]
async fn a_recalled_hit_tells_its_age_and_ttl_when_it_is_served() {
    let s = Stack::start_with(graph(), EXTRA).await;
    let read = format!("/v21.0/1001?fields=id,name&access_token={READER_KEY}");
    let timing = |r: &Reply| -> (u64, u64) {
        assert_eq!(r.header("x-cache"), Some("HIT"));
        for name in ["age", "cache-status", "x-cache"] {
            assert_eq!(r.headers.get_all(name).iter().count(), 1, "{name}");
        }
        let age = r.header("age").and_then(|a| a.parse().ok()).expect("age");
        let status = r.header("cache-status").expect("cache-status");
        let ttl = status
            .split("; ")
            .find_map(|p| p.strip_prefix("ttl="))
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("no ttl in {status}"));
        (age, ttl)
    };
    assert_eq!(s.get(&read).await.header("x-cache"), Some("MISS"));
    let mut before = (0, 0);
    for _ in 0..4 {
        before = timing(&s.get(&read).await);
    }
    assert!(s.gw.gateway.recall.as_ref().is_some_and(|r| !r.is_empty()));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let after = timing(&s.get(&read).await);
    assert!(after.0 >= before.0 + 2, "age {before:?} then {after:?}");
    assert!(after.1 + 2 <= before.1, "ttl {before:?} then {after:?}");
    assert!((3599..=3600).contains(&(after.0 + after.1)), "{after:?}");
    s.stop().await;
}
