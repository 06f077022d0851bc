//! The core proxy: keys, permissions, token injection, large GETs, paging links, limits,
//! upstream failures, HTTP/2, admin endpoints and graceful shutdown.

use std::time::Duration;

use bytes::Bytes;
use graphgate::tokens::appsecret_proof;
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;
use graphgate::server::slice;
use graphgate::testkit::{self, Credentials};

#[tokio::test]
async fn reads_go_upstream_with_the_system_token_and_proof_never_the_key() {
    let s = Stack::start().await;
    let r = s
        .get(&format!(
            "/v21.0/1001?fields=id,name&access_token={ADMIN_KEY}"
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["id"], "1001");
    assert!(r.json()["name"].is_string());
    // Graph's headers pass through.
    assert!(r.header("facebook-api-version").is_some());
    assert!(r.header("x-fb-trace-id").is_some());
    assert!(r.header("etag").is_some());

    let seen = s.graph.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].access_token.as_deref(), Some(SYSTEM_TOKEN));
    assert_eq!(
        seen[0].appsecret_proof.as_deref(),
        Some(appsecret_proof(APP_SECRET, SYSTEM_TOKEN).as_str())
    );
    let upstream_text = format!("{:?}", seen[0]);
    assert!(
        !upstream_text.contains(ADMIN_KEY),
        "client key went upstream: {upstream_text}"
    );
    s.stop().await;
}

#[tokio::test]
async fn the_key_is_accepted_wherever_sdks_put_a_token() {
    let s = Stack::start().await;
    for scheme in ["Bearer", "OAuth"] {
        let auth = format!("{scheme} {READER_KEY}");
        let r = s
            .request(
                Method::GET,
                "/1001?fields=id",
                &[("authorization", &auth)],
                Bytes::new(),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{scheme}: {}", r.text());
    }
    // In a form body, as POST with method=GET (a read, allowed for a read-only client).
    let r = s
        .post_form(
            "/1001",
            &format!("method=GET&fields=id,name&access_token={READER_KEY}"),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["id"], "1001");
    // The same key twice (paging link + SDK) is fine.
    let r = s
        .request(
            Method::GET,
            &format!("/1001?access_token={READER_KEY}"),
            &[("authorization", &format!("Bearer {READER_KEY}"))],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    for seen in s.graph.requests() {
        assert_eq!(seen.access_token.as_deref(), Some(SYSTEM_TOKEN));
        assert!(!format!("{seen:?}").contains(READER_KEY));
    }
    s.stop().await;
}

#[tokio::test]
async fn missing_or_unknown_keys_get_401_and_nothing_goes_upstream() {
    let s = Stack::start().await;
    let r = s.get("/1001?fields=id").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.error_code(), 190);
    assert_eq!(r.json()["error"]["type"], "OAuthException");
    assert!(r.header("www-authenticate").is_some());

    let r = s.get("/1001?fields=id&access_token=not-a-key").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.error_code(), 190);

    // The system token itself is not a client key.
    let r = s.get(&format!("/1001?access_token={SYSTEM_TOKEN}")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // Two different keys.
    let r = s
        .request(
            Method::GET,
            &format!("/1001?access_token={READER_KEY}"),
            &[("authorization", &format!("Bearer {ADMIN_KEY}"))],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(s.graph.stats().requests, 0);
    s.stop().await;
}

#[tokio::test]
async fn pages_and_writes_are_checked_before_anything_goes_upstream() {
    let s = Stack::start().await;
    // Another Page, a post of another Page, ids= with one foreign id, /me.
    for path in [
        format!("/1002?access_token={READER_KEY}"),
        format!("/1002_3?access_token={READER_KEY}"),
        format!("/?ids=1001,1002&access_token={READER_KEY}"),
        format!("/me/accounts?access_token={READER_KEY}"),
    ] {
        let r = s.get(&path).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}: {}", r.text());
        assert_eq!(r.error_code(), 10);
    }
    // Writes by a read-only client, in every spelling.
    let attempts: Vec<(Method, String, String)> = vec![
        (
            Method::POST,
            "/1001/feed".into(),
            format!("message=hi&access_token={READER_KEY}"),
        ),
        (
            Method::DELETE,
            format!("/1001_1?access_token={READER_KEY}"),
            String::new(),
        ),
        (
            Method::POST,
            "/1001_1".into(),
            format!("method=delete&access_token={READER_KEY}"),
        ),
        (
            Method::GET,
            format!("/1001/feed?method=post&message=x&access_token={READER_KEY}"),
            String::new(),
        ),
    ];
    for (method, path, body) in attempts {
        let r = s
            .request(
                method.clone(),
                &path,
                &[("content-type", "application/x-www-form-urlencoded")],
                Bytes::from(body),
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::FORBIDDEN,
            "{method} {path}: {}",
            r.text()
        );
        assert_eq!(r.error_code(), 200);
    }
    assert_eq!(s.graph.stats().requests, 0);
    s.stop().await;
}

#[tokio::test]
async fn writes_by_a_writer_reach_graph() {
    let s = Stack::start().await;
    let r = s
        .post_form(
            "/v21.0/1001/feed",
            &format!("message=hello+world&access_token={ADMIN_KEY}"),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("1001_"));
    let r = s
        .get(&format!("/{id}?fields=message&access_token={ADMIN_KEY}"))
        .await;
    assert_eq!(r.json()["message"], "hello world");
    let r = s
        .request(
            Method::DELETE,
            &format!("/{id}?access_token={ADMIN_KEY}"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["success"], true);
    s.stop().await;
}

#[tokio::test]
async fn batches_are_checked_per_operation_and_tokens_replaced_in_each() {
    let s = Stack::start().await;
    let forbidden = r#"[{"method":"GET","relative_url":"1001?fields=id"},{"method":"GET","relative_url":"1002?fields=id"}]"#;
    let form = format!("batch={}&access_token={READER_KEY}", urlencode(forbidden));
    let r = s.post_form("/", &form).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    let write_op = r#"[{"method":"POST","relative_url":"1001/feed","body":"message=x"}]"#;
    let r = s
        .post_form(
            "/",
            &format!("batch={}&access_token={READER_KEY}", urlencode(write_op)),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    assert_eq!(s.graph.stats().requests, 0, "nothing went upstream");

    // An allowed batch, one op carrying its own token (the client key), one a feed page.
    let ops = format!(
        r#"[{{"method":"GET","relative_url":"1001?fields=id,name&access_token={READER_KEY}"}},{{"method":"GET","relative_url":"v21.0/1001/feed?limit=2"}}]"#
    );
    let r = s
        .post_form(
            "/",
            &format!("batch={}&access_token={READER_KEY}", urlencode(&ops)),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let arr = r.json();
    assert_eq!(arr.as_array().unwrap().len(), 2);
    assert_eq!(arr[0]["code"], 200);
    let inner: serde_json::Value = serde_json::from_str(arr[1]["body"].as_str().unwrap()).unwrap();
    let next = inner["paging"]["next"].as_str().unwrap();
    assert!(
        next.starts_with(&s.gw.url()),
        "batch paging link rewritten: {next}"
    );
    assert!(next.contains(READER_KEY));
    let seen = s.graph.requests();
    let last = seen.last().unwrap();
    let batch_text = last
        .form
        .iter()
        .find(|(k, _)| k == "batch")
        .unwrap()
        .1
        .clone();
    assert!(
        !batch_text.contains(READER_KEY),
        "client key inside upstream batch: {batch_text}"
    );
    assert!(batch_text.contains(SYSTEM_TOKEN));
    assert!(batch_text.contains(&appsecret_proof(APP_SECRET, SYSTEM_TOKEN)));
    s.stop().await;
}

#[tokio::test]
async fn oversized_headers_and_bodies_get_graph_style_errors() {
    let s = Stack::start().await;
    let big = "x".repeat(20 * 1024);
    let r = s
        .request(
            Method::GET,
            &format!("/1001?access_token={ADMIN_KEY}"),
            &[("x-big", &big)],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(r.error_code(), 100);

    let body = format!(
        "message={}&access_token={ADMIN_KEY}",
        "y".repeat(2 * 1024 * 1024)
    );
    let r = s.post_form("/1001/feed", &body).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.error_code(), 100);
    assert_eq!(s.graph.stats().requests, 0);
    s.stop().await;
}

#[tokio::test]
async fn malformed_input_gets_400_and_nothing_goes_upstream() {
    let s = Stack::start().await;
    for path in [
        format!("/1001?fields=id%FF&access_token={ADMIN_KEY}"),
        format!("/1001//feed?access_token={ADMIN_KEY}"),
        format!("/1001/..?access_token={ADMIN_KEY}"),
        format!("/1001?fields=feed%7Bid&access_token={ADMIN_KEY}"),
        format!("/1001?method=PATCH&access_token={ADMIN_KEY}"),
        format!("/?ids=1001,%3Cx%3E&access_token={ADMIN_KEY}"),
    ] {
        let r = s.get(&path).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.text());
        assert_eq!(r.error_code(), 100, "{path}");
    }
    let r = s
        .request(
            Method::POST,
            "/1001/feed",
            &[("content-type", "application/json")],
            Bytes::from(format!(
                "{{\"message\": \"x\", \"access_token\": \"{ADMIN_KEY}\""
            )),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    let r = s
        .post_form("/", &format!("batch=not-json&access_token={ADMIN_KEY}"))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = s
        .request(
            Method::PUT,
            &format!("/1001?access_token={ADMIN_KEY}"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(s.graph.stats().requests, 0);
    s.stop().await;
}

#[tokio::test]
async fn tokens_are_never_handed_out() {
    let s = Stack::start().await;
    for path in [
        format!("/1001?fields=access_token&access_token={ADMIN_KEY}"),
        format!("/me?fields=accounts%7Baccess_token%7D&access_token={ADMIN_KEY}"),
    ] {
        let r = s.get(&path).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}: {}", r.text());
    }
    // /me/accounts returns Page tokens from Graph: they are removed from the reply.
    let r = s
        .get(&format!("/me/accounts?access_token={ADMIN_KEY}"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(!r.text().contains("access_token\""), "{}", r.text());
    assert!(r.json()["data"].as_array().is_some_and(|d| !d.is_empty()));
    s.stop().await;
}

#[tokio::test]
async fn long_gets_are_sent_as_post_with_method_get() {
    let s = Stack::start().await;
    // A long but valid field list: repeated fields canonicalise away in Graph's eyes but
    // make the URL exceed 2000 bytes.
    let fields = vec!["id,name,about,category,fan_count,link"; 80].join(",");
    let r = s
        .get(&format!(
            "/v21.0/1001?fields={fields}&access_token={ADMIN_KEY}"
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["id"], "1001");
    let seen = s.graph.requests();
    assert_eq!(seen[0].method, "POST");
    assert!(seen[0]
        .form
        .iter()
        .any(|(k, v)| k == "method" && v == "GET"));
    assert_eq!(s.graph.stats().post_method_get, 1);
    let m = s.admin_get("/metrics").await.text();
    assert_eq!(
        metric_value(&m, "graphgate_large_get_rewrites_total", &[]),
        1.0
    );
    s.stop().await;
}

#[tokio::test]
async fn paging_links_lead_back_through_graphgate_with_the_clients_key() {
    let s = Stack::start().await;
    let mut url = format!("/v21.0/1001/feed?limit=7&access_token={READER_KEY}");
    let mut seen_ids = std::collections::HashSet::new();
    let mut pages = 0;
    loop {
        let r = s.get(&url).await;
        assert_eq!(r.status, StatusCode::OK, "{url}: {}", r.text());
        let v = r.json();
        for post in v["data"].as_array().unwrap() {
            assert!(
                seen_ids.insert(post["id"].as_str().unwrap().to_string()),
                "duplicate post"
            );
        }
        pages += 1;
        let Some(next) = v["paging"]["next"].as_str() else {
            break;
        };
        assert!(
            next.starts_with(&s.gw.url()),
            "next link points at graphgate: {next}"
        );
        assert!(
            next.contains(&format!("access_token={READER_KEY}")),
            "{next}"
        );
        assert!(!next.contains("appsecret_proof"), "{next}");
        if let Some(prev) = v["paging"]["previous"].as_str() {
            assert!(prev.starts_with(&s.gw.url()), "{prev}");
        }
        url = next.to_string();
        assert!(pages < 50, "paging does not end");
    }
    let total = s.graph.posts_of("1001").len();
    assert_eq!(seen_ids.len(), total, "followed every page");
    assert!(pages > 1);

    // Nested edges and ids= replies carry rewritten links too.
    let r = s
        .get(&format!(
            "/1001?fields=feed.limit(2)%7Bid%7D&access_token={READER_KEY}"
        ))
        .await;
    let next = r.json()["feed"]["paging"]["next"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(next.starts_with(&s.gw.url()), "{next}");
    s.stop().await;
}

#[tokio::test]
async fn upstream_unreachable_is_502_and_timeout_is_504() {
    // A port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let graph = fake_graph::FakeGraph::start(graph_config(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let config =
        graphgate::config::Config::from_toml(&gateway_toml(&dead_url, ""), |_| None).unwrap();
    let gw = graphgate::server::start(config).await.unwrap();
    let http = client();
    let secrets = vec![SYSTEM_TOKEN.to_string(), APP_SECRET.to_string()];
    let r = send(
        &http,
        Method::GET,
        &format!("{}/1001?access_token={ADMIN_KEY}", gw.url()),
        &[],
        Bytes::new(),
        &secrets,
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("could not be reached"));
    gw.shutdown().await;
    graph.shutdown();

    let s = Stack::start_with(graph_config(), "[upstream]\ntimeout_ms = 300\n").await;
    s.graph.set_latency(Duration::from_millis(1500));
    let r = s.get(&format!("/1001?access_token={ADMIN_KEY}")).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.text());
    assert_eq!(r.json()["error"]["is_transient"], true);
    s.graph.set_latency(Duration::ZERO);
    s.stop().await;
}

#[tokio::test]
async fn upstream_garbage_is_502() {
    let s = Stack::start().await;
    s.graph.set_fault(fake_graph::Fault::CloseConnection);
    let r = s.get(&format!("/1001?access_token={ADMIN_KEY}")).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    s.graph.set_fault(fake_graph::Fault::None);
    let r = s.get(&format!("/1001?access_token={ADMIN_KEY}")).await;
    assert_eq!(r.status, StatusCode::OK);
    s.stop().await;
}

#[tokio::test]
async fn http2_cleartext_clients_work() {
    let s = Stack::start().await;
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<Bytes>>();
    let r = send(
        &h2,
        Method::GET,
        &format!("{}/1001?access_token={ADMIN_KEY}", s.gw.url()),
        &[],
        Bytes::new(),
        &s.secrets(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    s.stop().await;
}

#[tokio::test]
async fn page_tokens_are_minted_used_and_reminted_after_190() {
    let s = Stack::start_with(graph_config(), "[credentials]\npage_tokens = true\n").await;
    let r = s
        .get(&format!("/1001?fields=id,name&access_token={ADMIN_KEY}"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let page_token = s.graph.page_token("1001");
    let seen = s.graph.requests();
    // One mint (system token), then the call with the Page token and its own proof.
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].access_token.as_deref(), Some(SYSTEM_TOKEN));
    assert_eq!(seen[1].access_token.as_deref(), Some(page_token.as_str()));
    assert_eq!(
        seen[1].appsecret_proof.as_deref(),
        Some(appsecret_proof(APP_SECRET, &page_token).as_str())
    );
    // Reused (fields the first reply does not hold, so the read goes to Graph).
    s.get(&format!("/1001?fields=id,about&access_token={ADMIN_KEY}"))
        .await;
    assert_eq!(s.graph.requests().len(), 3);
    // Revoked: the call is retried once with a freshly minted token and succeeds.
    s.graph.revoke_token(&page_token);
    let r = s
        .get(&format!("/1001?fields=fan_count&access_token={ADMIN_KEY}"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let m = s.admin_get("/metrics").await.text();
    assert!(metric_value(&m, "graphgate_page_tokens_minted_total", &[]) >= 2.0);
    assert!(metric_value(&m, "graphgate_token_last_invalid_timestamp_seconds", &[]) > 0.0);
    s.stop().await;
}

#[tokio::test]
async fn admin_listener_serves_health_readiness_and_metrics() {
    let s = Stack::start().await;
    assert_eq!(s.admin_get("/healthz").await.status, StatusCode::OK);
    assert_eq!(s.admin_get("/readyz").await.status, StatusCode::OK);
    s.get(&format!("/1001?access_token={ADMIN_KEY}")).await;
    s.get("/1001").await;
    let m = s.admin_get("/metrics").await;
    assert_eq!(m.status, StatusCode::OK);
    let text = m.text();
    assert_eq!(
        metric_value(&text, "graphgate_requests_total", &["status_class=\"2xx\""]),
        1.0
    );
    assert_eq!(
        metric_value(
            &text,
            "graphgate_rejections_total",
            &["reason=\"unauthorized\""]
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &text,
            "graphgate_upstream_requests_total",
            &["outcome=\"ok\""]
        ),
        1.0
    );
    assert!(text.contains("graphgate_build_info"));
    assert!(!text.contains(ADMIN_KEY));
    assert_eq!(
        s.admin_get("/admin/anything").await.status,
        StatusCode::UNAUTHORIZED
    );
    s.stop().await;
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests() {
    let s = Stack::start().await;
    s.graph.set_latency(Duration::from_millis(600));
    let url = format!("{}/1001?access_token={ADMIN_KEY}", s.gw.url());
    let secrets = s.secrets();
    let in_flight = tokio::spawn(async move {
        send(&client(), Method::GET, &url, &[], Bytes::new(), &secrets).await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let addr = s.gw.addr;
    let admin = s.gw.admin_url();
    let Stack { graph, gw, .. } = s;
    let stopping = tokio::spawn(gw.shutdown());
    tokio::time::sleep(Duration::from_millis(100)).await;
    // No new connections once draining.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    let _ = admin;
    let r = in_flight.await.unwrap();
    assert_eq!(
        r.status,
        StatusCode::OK,
        "in-flight request completed: {}",
        r.text()
    );
    stopping.await.unwrap();
    graph.shutdown();
}

/// With several workers, connections opened one after another are all served, and the
/// public address can be neither taken by a second graphgate nor shared with another
/// program (no `SO_REUSEPORT` sharing by accident).
#[tokio::test]
async fn new_connections_are_all_served_and_a_held_port_is_refused() {
    let s = Stack::start_with(graph_config(), "[server]\nworkers = 3\n").await;
    for i in 0..24 {
        let mut conn = tokio::net::TcpStream::connect(s.gw.addr).await.unwrap();
        let head = format!(
            "GET /v21.0/1001?fields=id&n={i}&access_token={ADMIN_KEY} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        let mut reply = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut reply))
            .await
            .expect("reply within 10 s")
            .unwrap();
        let reply = String::from_utf8_lossy(&reply);
        assert!(reply.starts_with("HTTP/1.1 200"), "connection {i}: {reply}");
    }

    let second = format!("[server]\nlisten = \"{}\"\nworkers = 3\n", s.gw.addr);
    let err = testkit::Stack::start(&Credentials::standard(), graph_config(), &second)
        .await
        .err()
        .expect("a second graphgate on the same address does not start");
    assert!(
        err.contains("cannot listen on") && err.contains("server.listen"),
        "{err}"
    );

    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let held = format!("[server]\nlisten = \"{}\"\n", other.local_addr().unwrap());
    let err = testkit::Stack::start(&Credentials::standard(), graph_config(), &held)
        .await
        .err()
        .expect("graphgate does not start on a port another program listens on");
    assert!(err.contains("cannot listen on"), "{err}");
    s.stop().await;
}

/// The slices Linux gives this process's threads named `graphgate-worke…`.
fn worker_slices() -> Vec<Duration> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|comm| comm.starts_with("graphgate-worke"))
        })
        .filter_map(|task| task.file_name().to_string_lossy().parse().ok())
        .filter_map(|tid| slice::of_thread(tid).ok())
        .collect()
}

/// Each worker thread runs with the scheduler slice `server.worker_slice_us` asks for, on
/// kernels that keep a custom slice (6.12 and later; older ones ignore it and serve as
/// before).
#[tokio::test]
async fn workers_run_with_the_configured_scheduler_slice() {
    // 250 µs: no other test's workers (default 100 µs) are counted.
    let s = Stack::start_with(
        graph_config(),
        "[server]\nworkers = 2\nworker_slice_us = 250\n",
    )
    .await;
    let reply = s
        .get(&format!("/v21.0/1001?fields=id&access_token={ADMIN_KEY}"))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    if slice::kernel_keeps_custom_slices() {
        let slices = worker_slices();
        let ours = slices
            .iter()
            .filter(|&&d| d == Duration::from_micros(250))
            .count();
        assert_eq!(ours, 2, "worker slices: {slices:?}");
    }
    s.stop().await;
}

#[tokio::test]
async fn slow_headers_are_cut_off() {
    let s = Stack::start_with(graph_config(), "[server]\nheader_read_timeout_ms = 300\n").await;
    let mut conn = tokio::net::TcpStream::connect(s.gw.addr).await.unwrap();
    conn.write_all(b"GET /1001 HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "connection closed by the header read timeout");
    s.stop().await;
}

fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
