//! The read cache end to end: coalescing, field-order equivalence, invalidation by writes,
//! stale serving, `ids=` from per-node entries, conditional requests, bounded memory and the
//! purge API. Timing-sensitive tests use TTLs of 1 s and sleeps with generous margins.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fake_graph::Fault;
use http::{Method, StatusCode};
use tokio::io::AsyncWriteExt;

use crate::support::*;

fn q(path: &str) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    format!("{path}{sep}access_token={ADMIN_KEY}")
}

async fn admin_post(s: &Stack, path: &str, token: Option<&str>) -> Reply {
    let url = format!("{}{}", s.gw.admin_url(), path);
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    send(
        &client(),
        Method::POST,
        &url,
        &headers,
        Bytes::new(),
        &s.secrets(),
    )
    .await
}

/// Waits (bounded) until the fake has received `n` requests.
async fn wait_for_requests(s: &Stack, n: u64) {
    let until = Instant::now() + Duration::from_secs(10);
    while s.graph.stats().requests < n && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_stampede_of_300_identical_gets_makes_one_upstream_call() {
    let s = Arc::new(Stack::start().await);
    s.graph.set_latency(Duration::from_millis(300));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..300 {
        let s = s.clone();
        tasks.spawn(async move { s.get(&q("/1001?fields=id,name,fan_count")).await });
    }
    let mut replies = Vec::new();
    while let Some(r) = tasks.join_next().await {
        replies.push(r.expect("task"));
    }
    assert_eq!(
        s.graph.stats().requests,
        1,
        "one upstream call for 300 identical reads"
    );
    let first = &replies[0];
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    for r in &replies {
        assert_eq!(r.status, first.status);
        assert_eq!(r.body, first.body, "every reply carries the leader's body");
        assert_eq!(r.header("etag"), first.header("etag"));
        assert_eq!(r.header("x-fb-trace-id"), first.header("x-fb-trace-id"));
    }
    let m = s.admin_get("/metrics").await.text();
    let coalesced = metric_value(&m, "graphgate_cache_coalesced_total", &[]);
    let hits = metric_value(&m, "graphgate_cache_lookups_total", &["result=\"hit\""]);
    assert_eq!(
        coalesced + hits,
        299.0,
        "followers either waited on the fill or hit its entry"
    );
    assert!(coalesced > 0.0);
    let collapsed = replies
        .iter()
        .filter(|r| {
            r.header("cache-status")
                .is_some_and(|v| v.contains("collapsed"))
        })
        .count();
    assert_eq!(collapsed as f64, coalesced);
}

#[tokio::test]
async fn equivalent_field_orders_share_one_entry() {
    let s = Stack::start().await;
    let a = s.get(&q("/1001?fields=id,name")).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.header("x-cache"), Some("MISS"));
    assert!(
        a.header("cache-status").unwrap().contains("stored"),
        "{:?}",
        a.headers
    );
    for fields in ["name,id", "id,name,id", "%20name%20,id"] {
        let r = s.get(&q(&format!("/1001?fields={fields}"))).await;
        assert_eq!(r.header("x-cache"), Some("HIT"), "fields={fields}");
        assert_eq!(r.body, a.body);
        assert!(r
            .header("cache-status")
            .unwrap()
            .starts_with("graphgate; hit; ttl="));
        assert!(r.header("age").is_some());
    }
    // The version-less call uses the default version: the same entry.
    assert_eq!(
        s.get(&q("/v21.0/1001?fields=name,id"))
            .await
            .header("x-cache"),
        Some("HIT")
    );
    // Other fields are another entry (fields the stored reply does not hold: no projection).
    let b = s.get(&q("/1001?fields=id,about")).await;
    assert_eq!(b.header("x-cache"), Some("MISS"));
    assert_eq!(s.graph.stats().requests, 2);
    // POST + method=GET is a read and shares the entry.
    let p = s
        .post_form(
            "/1001",
            &format!("method=GET&fields=name,id&access_token={ADMIN_KEY}"),
        )
        .await;
    assert_eq!(p.header("x-cache"), Some("HIT"));
    assert_eq!(s.graph.stats().requests, 2);
    s.stop().await;
}

#[tokio::test]
async fn paging_links_in_cached_bodies_carry_each_callers_own_key() {
    let s = Stack::start().await;
    let a = s.get(&q("/1001/feed?limit=2")).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let b = s
        .get(&format!("/1001/feed?limit=2&access_token={READER_KEY}"))
        .await;
    assert_eq!(b.header("x-cache"), Some("HIT"));
    let next = b.json()["paging"]["next"].as_str().unwrap().to_string();
    assert!(
        next.contains(READER_KEY) && !next.contains(ADMIN_KEY),
        "{next}"
    );
    s.stop().await;
}

#[tokio::test]
async fn writes_invalidate_the_node_and_its_pages_feed() {
    let s = Stack::start().await;
    let feed = q("/1001/feed?fields=id,message&limit=3");
    let post = q("/1001_60?fields=message");
    let page = q("/1002?fields=name");
    let before = s.get(&feed).await;
    assert_eq!(s.get(&feed).await.header("x-cache"), Some("HIT"));
    s.get(&post).await;
    assert_eq!(s.get(&post).await.header("x-cache"), Some("HIT"));
    s.get(&page).await;

    // Editing a post drops the post and the Page's feed, not other Pages.
    let w = s
        .post_form(
            "/1001_60",
            &format!("message=edited&access_token={ADMIN_KEY}"),
        )
        .await;
    assert_eq!(w.status, StatusCode::OK, "{}", w.text());
    assert_eq!(w.header("x-cache"), Some("BYPASS"));
    let p = s.get(&post).await;
    assert_eq!(p.header("x-cache"), Some("MISS"));
    assert_eq!(p.json()["message"], "edited");
    let f = s.get(&feed).await;
    assert_eq!(f.header("x-cache"), Some("MISS"));
    assert_ne!(f.body, before.body);
    assert_eq!(s.get(&page).await.header("x-cache"), Some("HIT"));

    // A new post on the Page drops its feed.
    assert_eq!(s.get(&feed).await.header("x-cache"), Some("HIT"));
    let w = s
        .post_form(
            "/1001/feed",
            &format!("message=brand+new&access_token={ADMIN_KEY}"),
        )
        .await;
    assert_eq!(w.status, StatusCode::OK, "{}", w.text());
    let f = s.get(&feed).await;
    assert_eq!(f.header("x-cache"), Some("MISS"));
    assert_eq!(f.json()["data"][0]["message"], "brand new");

    // POST method=delete is a write too.
    assert_eq!(s.get(&feed).await.header("x-cache"), Some("HIT"));
    let id = f.json()["data"][0]["id"].as_str().unwrap().to_string();
    let d = s
        .post_form(
            &format!("/{id}"),
            &format!("method=delete&access_token={ADMIN_KEY}"),
        )
        .await;
    assert_eq!(d.status, StatusCode::OK, "{}", d.text());
    assert_eq!(s.get(&feed).await.header("x-cache"), Some("MISS"));
    let m = s.admin_get("/metrics").await.text();
    assert!(
        metric_value(
            &m,
            "graphgate_cache_invalidations_total",
            &["reason=\"write\""]
        ) >= 4.0
    );
    s.stop().await;
}

/// graphgate's upstream calls that have come back (any outcome).
async fn upstream_answers(s: &Stack) -> f64 {
    let m = s.admin_get("/metrics").await.text();
    metric_value(&m, "graphgate_upstream_duration_seconds_count", &[])
}

#[tokio::test]
async fn stale_while_revalidate_answers_at_once_and_refreshes_once() {
    // Entries live 3 s, so the renewed one is still fresh when looked at on a slow machine;
    // the upstream timeout is above the slow upstream's latency.
    let s = Stack::start_with(
        graph_config(),
        "[cache]\ndefault_ttl_s = 3\nstale_while_revalidate_s = 60\nstale_if_error_s = 60\n\
         [upstream]\ntimeout_ms = 30000\n",
    )
    .await;
    let url = q("/1001?fields=id,name");
    let first = s.get(&url).await;
    assert_eq!(first.header("x-cache"), Some("MISS"));
    assert_eq!(upstream_answers(&s).await, 1.0);
    // From now on Graph takes 8 s to answer: the refresh is still out while stale replies
    // are served, however slowly this machine serves them.
    s.graph.set_latency(Duration::from_secs(8));
    // Hits (which never go upstream) until the entry is stale.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut stale = Vec::new();
    while stale.is_empty() {
        let r = s.get(&url).await;
        match r.header("x-cache") {
            Some("HIT") => {
                assert!(Instant::now() < deadline, "the entry did not go stale");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ => stale.push(r),
        }
    }
    while stale.len() < 10 {
        stale.push(s.get(&url).await);
    }
    // All ten were answered before the refresh came back from the slow upstream: graphgate
    // has had no upstream answer since the first miss.
    assert_eq!(
        upstream_answers(&s).await,
        1.0,
        "stale replies waited for the slow upstream"
    );
    for r in &stale {
        assert_eq!(r.header("x-cache"), Some("STALE"));
        assert_eq!(r.body, first.body);
        assert!(r
            .header("cache-status")
            .unwrap()
            .contains("stale-while-revalidate"));
        assert!(r.header("age").unwrap().parse::<u64>().unwrap() >= 1);
    }
    // Exactly one refresh went upstream, with our validator, and renewed the entry: stale
    // until the 304 came back, a hit from then on.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = s.get(&url).await;
        match r.header("x-cache") {
            Some("HIT") => break,
            Some("STALE") => {
                assert!(Instant::now() < deadline, "the entry was not renewed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("x-cache {other:?} while refreshing"),
        }
    }
    let stats = s.graph.stats();
    assert_eq!(stats.requests, 2, "one background refresh");
    assert_eq!(
        stats.not_modified, 1,
        "refreshed with If-None-Match, renewed by 304"
    );
    assert_eq!(s.get(&url).await.header("x-cache"), Some("HIT"));
    assert_eq!(s.graph.stats().requests, 2);
    s.stop().await;
}

#[tokio::test]
async fn stale_if_error_covers_outages_and_throttling() {
    let s = Stack::start_with(
        graph_config(),
        // The breaker would open after these injected faults; this test is about the cache.
        "[cache]\ndefault_ttl_s = 1\nstale_while_revalidate_s = 0\nstale_if_error_s = 60\n\
         [upstream]\nbreaker_failures = 1000\n\
         [quota]\npage_window_s = 1\n",
    )
    .await;
    let url = q("/1001?fields=id,name");
    let first = s.get(&url).await;
    assert_eq!(first.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for fault in [
        Fault::Status(500),
        Fault::CloseConnection,
        Fault::GraphError {
            code: 80001,
            http_status: 400,
        },
        Fault::GraphError {
            code: 2,
            http_status: 500,
        },
    ] {
        s.graph.set_fault(fault.clone());
        let r = s.get(&url).await;
        assert_eq!(r.status, StatusCode::OK, "{fault:?}: {}", r.text());
        assert_eq!(r.header("x-cache"), Some("STALE"), "{fault:?}");
        assert_eq!(r.body, first.body);
        assert!(r.header("cache-status").unwrap().contains("stale-if-error"));
    }
    // Without a stale copy the failure reaches the client.
    s.graph.set_fault(Fault::Status(500));
    let r = s.get(&q("/1002?fields=id")).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    // Graph back and the Page's throttle pause (from the 80001 above) over: the entry is
    // revalidated. During the pause the stale entry kept being served.
    s.graph.set_fault(Fault::None);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let r = s.get(&url).await;
    assert_eq!(r.header("x-cache"), Some("MISS"));
    assert_eq!(s.get(&url).await.header("x-cache"), Some("HIT"));
    let m = s.admin_get("/metrics").await.text();
    assert_eq!(
        metric_value(
            &m,
            "graphgate_cache_stale_served_total",
            &["reason=\"error\""]
        ),
        4.0
    );
    s.stop().await;
}

#[tokio::test]
async fn errors_are_never_cached() {
    let s = Stack::start().await;
    for _ in 0..2 {
        let r = s.get(&q("/424242?fields=id")).await;
        assert!(r.status.is_client_error(), "{}", r.text());
        assert_eq!(r.header("x-cache"), Some("MISS"));
    }
    s.graph.set_fault(Fault::Status(500));
    assert_eq!(
        s.get(&q("/1001?fields=id")).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    s.graph.set_fault(Fault::None);
    let r = s.get(&q("/1001?fields=id")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-cache"), Some("MISS"));
    assert_eq!(s.graph.stats().requests, 4);
    s.stop().await;
}

#[tokio::test]
async fn ids_reads_fetch_only_the_missing_ids() {
    let s = Stack::start().await;
    s.get(&q("/1001?fields=id,name")).await;
    s.graph.clear_requests();
    let r = s.get(&q("/?ids=1001,1002&fields=name,id")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v = r.json();
    assert_eq!(v["1001"]["id"], "1001");
    assert_eq!(v["1002"]["name"], "Globex News");
    assert!(r.header("cache-status").unwrap().contains("fwd=partial"));
    let seen = s.graph.requests();
    assert_eq!(seen.len(), 1);
    let ids: Vec<&str> = seen[0]
        .query
        .iter()
        .filter(|(k, _)| k == "ids")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(ids, vec!["1002"], "only the missing id goes upstream");

    // Now both are cached per node: no upstream call, in the order asked.
    let r2 = s.get(&q("/?ids=1002,1001&fields=id,name")).await;
    assert_eq!(r2.header("x-cache"), Some("HIT"));
    assert_eq!(r2.json(), v);
    assert!(r2.text().starts_with("{\"1002\""));
    assert_eq!(
        s.get(&q("/1002?fields=name,id")).await.header("x-cache"),
        Some("HIT")
    );
    assert_eq!(s.graph.requests().len(), 1);

    // One unknown id fails the whole request, as in Graph, and nothing is cached for it.
    let bad = s.get(&q("/?ids=1001,9999999&fields=id")).await;
    assert!(bad.status.is_client_error(), "{}", bad.text());
    s.stop().await;
}

#[tokio::test]
async fn conditional_requests_and_client_directives() {
    let s = Stack::start().await;
    let url = q("/1001?fields=id,name");
    let a = s.get(&url).await;
    let etag = a.header("etag").expect("Graph sends an ETag").to_string();
    let r = s
        .request(Method::GET, &url, &[("if-none-match", &etag)], Bytes::new())
        .await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    assert_eq!(r.header("x-cache"), Some("HIT"));
    assert!(r.body.is_empty());
    assert_eq!(s.graph.stats().requests, 1);

    let r = s
        .request(
            Method::GET,
            &url,
            &[("cache-control", "no-store")],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-cache"), Some("BYPASS"));
    assert_eq!(s.graph.stats().requests, 2);

    // no-cache revalidates with Graph (our ETag; a 304 renews without a download).
    let r = s
        .request(
            Method::GET,
            &url,
            &[("cache-control", "no-cache")],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, a.body);
    assert_eq!(r.header("x-cache"), Some("MISS"));
    assert!(r
        .header("cache-status")
        .unwrap()
        .contains("fwd=request; fwd-status=304"));
    let stats = s.graph.stats();
    assert_eq!((stats.requests, stats.not_modified), (3, 1));
    assert_eq!(s.get(&url).await.header("x-cache"), Some("HIT"));
    s.stop().await;
}

#[tokio::test]
async fn ttl_rules_pick_lifetimes_and_zero_never_caches() {
    let s = Stack::start_with(
        graph_config(),
        "[[cache.rules]]\nmatch = \"/*/feed\"\nttl_s = 0\n[[cache.rules]]\nmatch = \"/{page}\"\nttl_s = 3600\n",
    )
    .await;
    for _ in 0..2 {
        let r = s.get(&q("/1001/feed?limit=1")).await;
        assert_eq!(r.header("x-cache"), Some("BYPASS"));
    }
    assert_eq!(s.graph.stats().requests, 2);
    s.get(&q("/1001?fields=id")).await;
    let r = s.get(&q("/1001?fields=id")).await;
    let status = r.header("cache-status").unwrap();
    let ttl: i64 = status.rsplit("ttl=").next().unwrap().parse().unwrap();
    assert!(ttl > 3000, "{status}");
    s.stop().await;
}

#[tokio::test]
async fn memory_stays_bounded_under_a_flood_of_distinct_keys() {
    let max = 32 * 1024;
    let s = Stack::start_with(graph_config(), &format!("[cache]\nmax_bytes = {max}\n")).await;
    for page in ["1001", "1002"] {
        for limit in 1..=40 {
            let r = s.get(&q(&format!("/{page}/feed?limit={limit}"))).await;
            assert_eq!(r.status, StatusCode::OK);
        }
    }
    let (entries, bytes) = s.gw.gateway.cache.settle();
    assert!(bytes <= max, "{bytes} bytes cached, bound {max}");
    assert!(entries > 0 && entries < 80, "{entries}");
    let m = s.admin_get("/metrics").await.text();
    assert!(metric_value(&m, "graphgate_cache_evictions_total", &["cause=\"size\""]) > 0.0);
    assert!(metric_value(&m, "graphgate_cache_bytes", &[]) <= max as f64);
    s.stop().await;
}

#[tokio::test]
async fn large_bodies_are_held_compressed_and_served_byte_for_byte() {
    // The same reads through a gateway that compresses (the default) and one that does not.
    let mut held = Vec::new();
    for extra in ["", "[cache]\ncompress = false\n"] {
        let s = Stack::start_with(graph_config(), extra).await;
        let mut bytes = 0;
        for limit in [10, 25] {
            let path = format!("/1001/feed?limit={limit}");
            let miss = s.get(&q(&path)).await;
            assert_eq!(miss.header("x-cache"), Some("MISS"), "{}", miss.text());
            assert!(miss.body.len() > 1000, "{} B", miss.body.len());
            let hit = s.get(&q(&path)).await;
            assert_eq!(hit.header("x-cache"), Some("HIT"));
            assert_eq!(hit.body, miss.body, "a hit is the miss, byte for byte");
            // The per-client key goes into the decompressed body's paging links.
            let other = s.get(&format!("{path}&access_token={READER_KEY}")).await;
            assert_eq!(other.header("x-cache"), Some("HIT"));
            let next = other.json()["paging"]["next"].as_str().unwrap().to_string();
            assert!(
                next.contains(READER_KEY) && !next.contains(ADMIN_KEY),
                "{next}"
            );
            bytes += miss.body.len();
        }
        let (entries, weight) = s.gw.gateway.cache.settle();
        assert_eq!(entries, 2);
        held.push((weight, bytes));

        // A hot entry is stored again plain: same bytes, more weight; writes still win.
        let path = q("/1001/feed?limit=25");
        let first = s.get(&path).await;
        for _ in 0..graphgate::cache::entry::HOT_HITS + 2 {
            let hit = s.get(&path).await;
            assert_eq!(hit.header("x-cache"), Some("HIT"));
            assert_eq!(hit.body, first.body);
        }
        let (entries, hot_weight) = s.gw.gateway.cache.settle();
        assert_eq!(entries, 2);
        if extra.is_empty() {
            assert!(hot_weight > weight + 1000, "{weight} -> {hot_weight}");
        } else {
            assert_eq!(hot_weight, weight, "nothing to decompress");
        }
        let w = s
            .post_form(
                "/1001/feed",
                &format!("message=new&access_token={ADMIN_KEY}"),
            )
            .await;
        assert_eq!(w.status, StatusCode::OK, "{}", w.text());
        assert_eq!(s.get(&path).await.header("x-cache"), Some("MISS"));
        s.stop().await;
    }
    let ((compressed, bytes), (plain, _)) = (held[0], held[1]);
    assert!(
        plain as usize > bytes,
        "uncompressed entries weigh their bodies and more"
    );
    assert!(
        compressed * 2 < plain,
        "compressed {compressed} B vs plain {plain} B for {bytes} B of feed"
    );
}

#[tokio::test]
async fn admin_purge_needs_the_token_and_drops_entries() {
    let s = Stack::start().await;
    for path in [
        "/1001?fields=id",
        "/1001/feed?limit=1",
        "/1002?fields=id",
        "/1002?fields=name",
    ] {
        s.get(&q(path)).await;
    }
    let r = admin_post(&s, "/admin/cache/purge?all=true", None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = admin_post(&s, "/admin/cache/purge?all=true", Some("wrong")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        s.get(&q("/1001?fields=id")).await.header("x-cache"),
        Some("HIT")
    );

    let r = admin_post(&s, "/admin/cache/purge?node=1001", Some("test-admin-token")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["purged"], 2);
    assert_eq!(
        s.get(&q("/1001?fields=id")).await.header("x-cache"),
        Some("MISS")
    );

    let r = admin_post(
        &s,
        "/admin/cache/purge?prefix=v21.0/1002?fields=name",
        Some("test-admin-token"),
    )
    .await;
    assert_eq!(r.json()["purged"], 1);
    assert_eq!(
        s.get(&q("/1002?fields=id")).await.header("x-cache"),
        Some("HIT")
    );

    let r = admin_post(&s, "/admin/cache/purge?all=true", Some("test-admin-token")).await;
    assert_eq!(r.json()["purged"], 2);
    assert_eq!(
        s.get(&q("/1002?fields=id")).await.header("x-cache"),
        Some("MISS")
    );
    let r = admin_post(&s, "/admin/cache/purge?node=", Some("test-admin-token")).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_hangs_up_does_not_fail_its_followers() {
    let s = Arc::new(Stack::start().await);
    s.graph.set_latency(Duration::from_millis(800));
    // The leader: a raw connection that sends the request and goes away.
    let mut leader = tokio::net::TcpStream::connect(s.gw.addr).await.unwrap();
    let req = format!(
        "GET {} HTTP/1.1\r\nhost: x\r\n\r\n",
        q("/1001?fields=id,about")
    );
    leader.write_all(req.as_bytes()).await.unwrap();
    wait_for_requests(&s, 1).await;
    drop(leader);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..5 {
        let s = s.clone();
        tasks.spawn(async move { s.get(&q("/1001?fields=about,id")).await });
    }
    while let Some(r) = tasks.join_next().await {
        let r = r.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.json()["id"], "1001");
    }
    assert_eq!(s.graph.stats().requests, 1);
}

fn batch_form(ops: &serde_json::Value) -> String {
    form_urlencoded::Serializer::new(String::new())
        .append_pair("batch", &ops.to_string())
        .append_pair("access_token", ADMIN_KEY)
        .finish()
}

#[tokio::test]
async fn read_batches_answer_cached_operations_locally() {
    let s = Stack::start().await;
    let single = s.get(&q("/1001?fields=id,name")).await;
    s.graph.clear_requests();
    let ops = serde_json::json!([
        {"method": "GET", "relative_url": "1001?fields=name,id"},
        {"method": "GET", "relative_url": "1002?fields=id,name"},
        {"method": "GET", "relative_url": "1001/feed?limit=1"},
    ]);
    let r = s.post_form("/", &batch_form(&ops)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(r.header("cache-status").unwrap().contains("fwd=partial"));
    let v = r.json();
    let items = v.as_array().unwrap();
    assert_eq!(items.len(), 3);
    let body = |i: usize| -> serde_json::Value {
        serde_json::from_str(items[i]["body"].as_str().unwrap()).unwrap()
    };
    assert_eq!(
        body(0),
        single.json(),
        "the cached operation carries the GET's body"
    );
    assert_eq!(body(1)["name"], "Globex News");
    let next = body(2)["paging"]["next"].as_str().unwrap().to_string();
    assert!(next.contains(ADMIN_KEY), "{next}");
    // Only the two missing operations went upstream, as one batch.
    let seen = s.graph.requests();
    assert_eq!(seen.len(), 1);
    let sent = seen[0]
        .form
        .iter()
        .find(|(k, _)| k == "batch")
        .map(|(_, v)| v.clone())
        .unwrap();
    let sent: serde_json::Value = serde_json::from_str(&sent).unwrap();
    assert_eq!(sent.as_array().unwrap().len(), 2, "{sent}");

    // Everything is cached now, also for plain GETs; the merged reply keeps request order.
    let again = s.post_form("/", &batch_form(&ops)).await;
    assert_eq!(again.header("x-cache"), Some("HIT"));
    assert_eq!(again.json().as_array().unwrap().len(), 3);
    assert_eq!(
        s.get(&q("/1002?fields=name,id")).await.header("x-cache"),
        Some("HIT")
    );
    assert_eq!(s.graph.requests().len(), 1);

    // A batch with a write goes upstream whole and invalidates.
    let write = serde_json::json!([
        {"method": "GET", "relative_url": "1002?fields=id,name"},
        {"method": "POST", "relative_url": "1002/feed", "body": "message=hello"},
    ]);
    let w = s.post_form("/", &batch_form(&write)).await;
    assert_eq!(w.status, StatusCode::OK, "{}", w.text());
    assert_eq!(w.header("x-cache"), Some("BYPASS"));
    assert_eq!(s.graph.requests().len(), 2);
    assert_eq!(
        s.get(&q("/1002?fields=name,id")).await.header("x-cache"),
        Some("MISS")
    );
    s.stop().await;
}

/// Rough figures, not a benchmark (the criterion benches measure it): key building and
/// sequential/concurrent cache hits through real sockets. Run with
/// `cargo test --release --test it cache::rough_hit_path_figures -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn rough_hit_path_figures() {
    use graphgate::cache::key;
    use graphgate::graph::request::Params;
    let params = Params::parse("fields=name,id,fan_count,about&limit=5&access_token=k").unwrap();
    let segs = vec!["1001".to_string()];
    let n = 200_000;
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(key::build("v21.0", &segs, &params, "system").unwrap());
    }
    println!(
        "key::build: {:.0} ns/op",
        t.elapsed().as_nanos() as f64 / n as f64
    );

    let s = Arc::new(Stack::start().await);
    s.graph.set_record_limit(0);
    let url = q("/1001?fields=id,name,about,fan_count");
    s.get(&url).await;
    let mut lat = Vec::new();
    for _ in 0..5000 {
        let t = Instant::now();
        let r = s.get(&url).await;
        lat.push(t.elapsed());
        assert_eq!(r.header("x-cache"), Some("HIT"));
    }
    lat.sort();
    println!(
        "sequential hits over loopback: p50 {:?} p99 {:?}",
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100]
    );
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let s = s.clone();
        let url = url.clone();
        tasks.spawn(async move {
            for _ in 0..500 {
                s.get(&url).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    println!(
        "32 concurrent clients: {:.0} hits/s",
        16_000.0 / t.elapsed().as_secs_f64()
    );
    assert_eq!(s.graph.stats().requests, 1);
}
