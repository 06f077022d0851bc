//! Hardening: upstream faults, retries, the circuit breaker; connection, idle and in-flight
//! limits; pathological input; client keys as digests; config reload (library and SIGHUP);
//! inbound TLS with client certificates. Each test fails without the protection it names.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fake_graph::Fault;
use graphgate::config::Config;
use graphgate::server::{self, Running};
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A scripted upstream on a free port: each connection's request head is read, then
/// `script(n, stream)` runs with the 0-based connection number. Returns the base URL and the
/// connection counter.
async fn scripted_upstream<F, Fut>(script: F) -> (String, Arc<AtomicUsize>)
where
    F: Fn(usize, TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    let script = Arc::new(script);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let script = script.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => head.extend_from_slice(&buf[..k]),
                    }
                }
                script(n, stream).await;
            });
        }
    });
    (url, count)
}

fn json_ok() -> String {
    let body = r#"{"id":"1001","name":"Acme"}"#;
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json; charset=UTF-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

async fn gateway_for(upstream: &str, extra: &str) -> Running {
    let config = Config::from_toml(&gateway_toml(upstream, extra), |_| None).unwrap();
    server::start(config).await.unwrap()
}

async fn get_via(gw: &Running, path: &str) -> Reply {
    send(
        &client(),
        Method::GET,
        &format!("{}{path}", gw.url()),
        &[],
        Bytes::new(),
        &[SYSTEM_TOKEN.to_string(), APP_SECRET.to_string()],
    )
    .await
}

async fn metrics_of(gw: &Running) -> String {
    get_via_url(&format!("{}/metrics", gw.admin_url()))
        .await
        .text()
}

async fn get_via_url(url: &str) -> Reply {
    send(&client(), Method::GET, url, &[], Bytes::new(), &[]).await
}

fn assert_graphgate_error(r: &Reply, status: StatusCode) {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(
        r.json()["error"]["type"],
        "GraphgateException",
        "{}",
        r.text()
    );
}

const FAST_RETRIES: &str = "[upstream]\nretry_backoff_ms = 1\n";

// ---------------------------------------------------------------------------------------------
// Upstream faults, retries, breaker
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_read_that_meets_a_transient_503_is_retried_and_succeeds() {
    let (url, conns) = scripted_upstream(|n, mut s| async move {
        let reply = if n == 0 {
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/html\r\ncontent-length: 5\r\nconnection: close\r\n\r\noops!".to_string()
        } else {
            json_ok()
        };
        let _ = s.write_all(reply.as_bytes()).await;
    })
    .await;
    let gw = gateway_for(&url, FAST_RETRIES).await;
    let r = get_via(&gw, &format!("/1001?access_token={ADMIN_KEY}")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["id"], "1001");
    assert_eq!(conns.load(Ordering::SeqCst), 2);
    let m = metrics_of(&gw).await;
    assert_eq!(
        metric_value(
            &m,
            "graphgate_upstream_retries_total",
            &["reason=\"http_503\""]
        ),
        1.0
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn only_idempotent_reads_are_retried_never_writes_or_batches() {
    let s = Stack::start_with(
        graph_config(),
        "[upstream]\nretry_backoff_ms = 1\nbreaker_failures = 0\nretry_budget_min_per_s = 100\n",
    )
    .await;
    s.graph.set_fault(Fault::GraphError {
        code: 2,
        http_status: 500,
    });
    // A read: first attempt plus `retries` (2) more.
    let r = s.get(&format!("/1001?access_token={ADMIN_KEY}")).await;
    assert_eq!(r.error_code(), 2, "{}", r.text());
    assert_eq!(s.graph.stats().requests, 3);
    // A read sent as POST + method=GET is still a read.
    s.graph.reset_stats();
    let r = s
        .post_form("/1001", &format!("method=GET&access_token={ADMIN_KEY}"))
        .await;
    assert_eq!(r.error_code(), 2);
    assert_eq!(s.graph.stats().requests, 3);
    // A write: exactly once.
    s.graph.reset_stats();
    let r = s
        .post_form(
            "/1001/feed",
            &format!("message=hi&access_token={ADMIN_KEY}"),
        )
        .await;
    assert_eq!(r.error_code(), 2);
    assert_eq!(s.graph.stats().requests, 1);
    // A batch, even of reads only: exactly once.
    s.graph.reset_stats();
    let batch = urlencode(r#"[{"method":"GET","relative_url":"1001?fields=id"}]"#);
    let r = s
        .post_form("/", &format!("batch={batch}&access_token={ADMIN_KEY}"))
        .await;
    assert_eq!(r.error_code(), 2);
    assert_eq!(s.graph.stats().requests, 1);
    // A DELETE: exactly once.
    s.graph.reset_stats();
    s.request(
        Method::DELETE,
        &format!("/1001_1?access_token={ADMIN_KEY}"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(s.graph.stats().requests, 1);
    s.stop().await;
}

#[tokio::test]
async fn the_retry_budget_caps_retries() {
    let s = Stack::start_with(
        graph_config(),
        "[upstream]\nretry_backoff_ms = 1\nbreaker_failures = 0\nretry_budget_percent = 0\nretry_budget_min_per_s = 0\n",
    )
    .await;
    s.graph.set_fault(Fault::Status(503));
    // The reserve allows a burst of 10 retries, then nothing: 20 failing reads cost at most
    // 20 + 10 upstream calls, not 60.
    for _ in 0..20 {
        let r = s.get(&format!("/1001?access_token={ADMIN_KEY}")).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    let calls = s.graph.stats().requests;
    assert!(calls <= 30, "{calls} upstream calls");
    let m = s.admin_get("/metrics").await.text();
    assert!(
        metric_value(
            &m,
            "graphgate_upstream_retries_skipped_total",
            &["reason=\"budget\""]
        ) >= 10.0,
        "{m}"
    );
    s.stop().await;
}

#[tokio::test]
async fn connect_refused_is_retried_then_502() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let gw = gateway_for(&dead_url, FAST_RETRIES).await;
    let r = get_via(&gw, &format!("/1001?access_token={ADMIN_KEY}")).await;
    assert_graphgate_error(&r, StatusCode::BAD_GATEWAY);
    let m = metrics_of(&gw).await;
    assert_eq!(
        metric_value(
            &m,
            "graphgate_upstream_retries_total",
            &["reason=\"connect\""]
        ),
        2.0
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_reply_reset_mid_body_is_502_after_retries() {
    let (url, conns) = scripted_upstream(|_, mut s| async move {
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"data\":[1,2,")
            .await;
        drop(s);
    })
    .await;
    let gw = gateway_for(&url, FAST_RETRIES).await;
    let r = get_via(&gw, &format!("/1001?access_token={ADMIN_KEY}")).await;
    assert_graphgate_error(&r, StatusCode::BAD_GATEWAY);
    assert_eq!(conns.load(Ordering::SeqCst), 3, "first attempt + 2 retries");
    gw.shutdown().await;
}

#[tokio::test]
async fn slow_headers_and_slow_bodies_time_out_with_504_and_are_not_retried() {
    for body_started in [false, true] {
        let (url, conns) = scripted_upstream(move |_, mut s| async move {
            if body_started {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"id\":")
                    .await;
            }
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
        .await;
        let gw = gateway_for(&url, "[upstream]\ntimeout_ms = 400\nretry_backoff_ms = 1\n").await;
        let started = Instant::now();
        let r = get_via(&gw, &format!("/1001?access_token={ADMIN_KEY}")).await;
        assert_graphgate_error(&r, StatusCode::GATEWAY_TIMEOUT);
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(
            conns.load(Ordering::SeqCst),
            1,
            "body_started={body_started}"
        );
        gw.shutdown().await;
    }
}

#[tokio::test]
async fn invalid_json_in_a_200_is_a_502_graph_style_error() {
    let s = Stack::start().await;
    s.graph.set_fault(Fault::Garbage);
    let r = s.get(&format!("/1001?access_token={ADMIN_KEY}")).await;
    assert_graphgate_error(&r, StatusCode::BAD_GATEWAY);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));
    assert_eq!(s.graph.stats().requests, 1, "not retried");
    s.stop().await;
}

#[tokio::test]
async fn replies_over_max_response_bytes_are_502_and_not_retried() {
    let s = Stack::start_with(graph_config(), "[upstream]\nmax_response_bytes = 2048\n").await;
    let r = s
        .get(&format!(
            "/1001/feed?limit=50&fields=id,message,created_time&access_token={ADMIN_KEY}"
        ))
        .await;
    assert_graphgate_error(&r, StatusCode::BAD_GATEWAY);
    assert_eq!(r.json()["error"]["error_subcode"], 2_446_021);
    assert_eq!(s.graph.stats().requests, 1);
    // Small replies still pass.
    let r = s
        .get(&format!("/1001?fields=id&access_token={ADMIN_KEY}"))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    s.stop().await;
}

#[tokio::test]
async fn the_breaker_opens_fails_fast_and_closes_after_a_good_probe() {
    let s = Stack::start_with(
        graph_config(),
        "[upstream]\nretries = 0\nbreaker_failures = 3\nbreaker_cooldown_ms = 500\n",
    )
    .await;
    s.graph.set_fault(Fault::Status(502));
    for _ in 0..3 {
        let r = s.get(&format!("/1001?access_token={ADMIN_KEY}")).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    }
    // Open: failed fast, nothing sent.
    for _ in 0..5 {
        let r = s.get(&format!("/1001?access_token={ADMIN_KEY}")).await;
        assert_graphgate_error(&r, StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.header("retry-after").is_some());
        assert_eq!(r.json()["error"]["is_transient"], true);
    }
    assert_eq!(s.graph.stats().requests, 3);
    let m = s.admin_get("/metrics").await.text();
    assert_eq!(
        metric_value(&m, "graphgate_upstream_breaker_state", &[]),
        2.0
    );
    assert_eq!(
        metric_value(&m, "graphgate_upstream_breaker_rejections_total", &[]),
        5.0
    );
    // Graph recovers; after the cool-down one probe goes through and closes the breaker.
    s.graph.set_fault(Fault::None);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let r = s.get(&format!("/1001?access_token={ADMIN_KEY}")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = s.get(&format!("/1001?access_token={ADMIN_KEY}")).await;
    assert_eq!(r.status, StatusCode::OK);
    let m = s.admin_get("/metrics").await.text();
    assert_eq!(
        metric_value(&m, "graphgate_upstream_breaker_state", &[]),
        0.0
    );
    assert_eq!(
        metric_value(&m, "graphgate_upstream_breaker_opened_total", &[]),
        1.0
    );
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Load and abuse
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_slow_drip_request_head_is_cut_off() {
    let s = Stack::start_with(graph_config(), "[server]\nheader_read_timeout_ms = 500\n").await;
    let conn = TcpStream::connect(s.gw.addr).await.unwrap();
    let (mut rd, wr) = conn.into_split();
    let drip = drip_head(
        wr,
        b"GET /1001?access_token=x HTTP/1.1\r\nHost: x\r\nX-Pad: ",
    );
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "the server closed the connection of a slow-drip head"
    );
    drip.abort();
    assert_eq!(s.graph.stats().requests, 0);
    s.stop().await;
}

#[tokio::test]
async fn connections_beyond_max_connections_are_closed_at_once() {
    let s = Stack::start_with(graph_config(), "[server]\nmax_connections = 2\n").await;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(TcpStream::connect(s.gw.addr).await.unwrap());
    }
    // Wait until the server has accepted both.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = s.admin_get("/metrics").await.text();
        if metric_value(&m, "graphgate_open_connections", &[]) >= 2.0 {
            break;
        }
        assert!(Instant::now() < deadline, "connections not accepted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut third = TcpStream::connect(s.gw.addr).await.unwrap();
    let _ = third
        .write_all(b"GET /1001 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the third connection was closed promptly");
    assert!(buf.is_empty(), "and got no reply");
    // A held connection is still served.
    let mut first = held.remove(0);
    first
        .write_all(
            format!("GET /1001?access_token={ADMIN_KEY} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), first.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        buf.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    let m = s.admin_get("/metrics").await.text();
    assert!(metric_value(&m, "graphgate_connections_refused_total", &[]) >= 1.0);
    // Once a slot frees up, new connections are served again. Until the server has seen the
    // held connections close, a new one may still be refused (closed without a reply), so
    // each try is a raw connection whose refusal is not an error.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut conn = TcpStream::connect(s.gw.addr).await.unwrap();
        let _ = conn
            .write_all(
                format!("GET /1001?access_token={ADMIN_KEY} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut buf)).await;
        if buf.starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no connection served after the held ones closed: {}",
            String::from_utf8_lossy(&buf)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.stop().await;
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let s = Stack::start_with(
        graph_config(),
        "[server]\nidle_timeout_ms = 300\nheader_read_timeout_ms = 30000\n",
    )
    .await;
    let mut conn = TcpStream::connect(s.gw.addr).await.unwrap();
    conn.write_all(
        format!("GET /1001?access_token={ADMIN_KEY} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    // Keep-alive: the server answers and then keeps the connection until it idles out.
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the idle connection was closed");
    assert!(
        buf.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    let m = s.admin_get("/metrics").await.text();
    assert!(metric_value(&m, "graphgate_connections_idle_closed_total", &[]) >= 1.0);
    s.stop().await;
}

#[tokio::test]
async fn a_flood_beyond_max_in_flight_is_shed_fast_with_503() {
    let s = Stack::start_with(
        graph_config(),
        "[server]\nmax_in_flight = 2\n[upstream]\ntimeout_ms = 20000\n",
    )
    .await;
    s.graph.set_latency(Duration::from_secs(3));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let url = format!("{}/1001?access_token={ADMIN_KEY}", s.gw.url());
        let secrets = s.secrets();
        tasks.push(tokio::spawn(async move {
            let r = send(&client(), Method::GET, &url, &[], Bytes::new(), &secrets).await;
            (r, started.elapsed())
        }));
    }
    let (mut ok, mut shed) = (0, 0);
    for t in tasks {
        let (r, took) = t.await.unwrap();
        match r.status {
            StatusCode::OK => ok += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                shed += 1;
                assert_graphgate_error(&r, StatusCode::SERVICE_UNAVAILABLE);
                assert_eq!(r.header("retry-after"), Some("1"));
                // Answered at once, not after the upstream latency.
                assert!(took < Duration::from_millis(2500), "shed after {took:?}");
            }
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    assert_eq!((ok, shed), (2, 8));
    assert!(s.graph.stats().max_in_flight <= 2);
    let m = s.admin_get("/metrics").await.text();
    assert_eq!(metric_value(&m, "graphgate_load_shed_total", &[]), 8.0);
    s.graph.set_latency(Duration::ZERO);
    s.stop().await;
}

#[tokio::test]
async fn a_request_whose_client_hangs_up_frees_its_in_flight_slot() {
    let s = Stack::start_with(
        graph_config(),
        "[server]\nmax_in_flight = 1\n[upstream]\ntimeout_ms = 20000\n",
    )
    .await;
    s.graph.set_latency(Duration::from_secs(3));
    let mut gone = TcpStream::connect(s.gw.addr).await.unwrap();
    let req = format!("GET /1001?fields=id&access_token={ADMIN_KEY} HTTP/1.1\r\nhost: x\r\n\r\n");
    gone.write_all(req.as_bytes()).await.unwrap();
    // Holding the only slot: another request is shed.
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.gw.gateway.in_flight() == 0 {
        assert!(Instant::now() < deadline, "the request never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let url = format!("{}/1002?fields=id&access_token={ADMIN_KEY}", s.gw.url());
    let secrets = s.secrets();
    let other = || async { send(&client(), Method::GET, &url, &[], Bytes::new(), &secrets).await };
    assert_eq!(other().await.status, StatusCode::SERVICE_UNAVAILABLE);
    // The client hangs up: its request is dropped and counted out, long before Graph answers.
    drop(gone);
    while s.gw.gateway.in_flight() != 0 {
        assert!(Instant::now() < deadline, "the slot was never freed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let m = s.admin_get("/metrics").await.text();
    assert_eq!(metric_value(&m, "graphgate_requests_in_flight", &[]), 0.0);
    s.graph.set_latency(Duration::ZERO);
    let r = other().await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    s.stop().await;
}

#[tokio::test]
async fn pathological_fields_are_refused_quickly_and_never_sent() {
    let s = Stack::start().await;
    let long = "a,".repeat(50_001);
    let deep = format!("{}x{}", "a{".repeat(20_000), "}".repeat(20_000));
    let unbalanced = "a{".repeat(40_000);
    for fields in [long, deep, unbalanced] {
        let started = Instant::now();
        let r = s
            .post_form(
                "/1001",
                &format!("method=GET&fields={fields}&access_token={ADMIN_KEY}"),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
        assert_eq!(r.error_code(), 100);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    assert_eq!(s.graph.stats().requests, 0);
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Token hygiene: key digests, reload
// ---------------------------------------------------------------------------------------------

fn sha256_hex(s: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(s.as_bytes()))
}

#[tokio::test]
async fn clients_can_be_configured_by_the_sha256_of_their_key() {
    let hashed = "key-only-its-digest-is-configured";
    let extra = format!(
        "[[clients]]\nname = \"hashed\"\nkey_sha256 = \"{}\"\npages = [\"1001\"]\n",
        sha256_hex(hashed).to_uppercase()
    );
    let s = Stack::start_with(graph_config(), &extra).await;
    let r = s
        .get(&format!("/1001?fields=id&access_token={hashed}"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let digest = sha256_hex(hashed);
    let r = s
        .get(&format!("/1001?fields=id&access_token={digest}"))
        .await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "the digest itself is not a key"
    );
    s.stop().await;
}

#[test]
fn a_client_needs_exactly_one_of_key_and_key_sha256() {
    let base = gateway_toml("http://127.0.0.1:1", "");
    let both = format!(
        "{base}\n[[clients]]\nname = \"x\"\nkey = \"abcdefghij\"\nkey_sha256 = \"{}\"\n",
        sha256_hex("abcdefghij")
    );
    let err = Config::from_toml(&both, |_| None).unwrap_err().to_string();
    assert!(err.contains("not both"), "{err}");
    let neither = format!("{base}\n[[clients]]\nname = \"x\"\n");
    let err = Config::from_toml(&neither, |_| None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("clients[2].key"), "{err}");
    let bad = format!("{base}\n[[clients]]\nname = \"x\"\nkey_sha256 = \"abc\"\n");
    let err = Config::from_toml(&bad, |_| None).unwrap_err().to_string();
    assert!(err.contains("key_sha256"), "{err}");
    let dup = format!(
        "{base}\n[[clients]]\nname = \"x\"\nkey_sha256 = \"{}\"\n",
        sha256_hex(READER_KEY)
    );
    let err = Config::from_toml(&dup, |_| None).unwrap_err().to_string();
    assert!(err.contains("duplicate"), "{err}");
    // The digest never shows in Debug output.
    let ok = format!(
        "{base}\n[[clients]]\nname = \"x\"\nkey_sha256 = \"{}\"\n",
        sha256_hex("abcdefghij")
    );
    let c = Config::from_toml(&ok, |_| None).unwrap();
    let dbg = format!("{c:?}");
    assert!(!dbg.contains(&sha256_hex("abcdefghij")), "{dbg}");
    assert!(!dbg.contains(READER_KEY));
}

#[tokio::test]
async fn reload_rotates_keys_and_a_rejected_reload_keeps_the_running_config() {
    let s = Stack::start().await;
    let rotated = "key-reader-1001-rotated";
    let new_clients = format!(
        "[[clients]]\nname = \"reader\"\nkey = \"{rotated}\"\npages = [\"1001\"]\n[[clients]]\nname = \"admin\"\nkey_sha256 = \"{}\"\npages = [\"*\"]\nwrite = true\n",
        sha256_hex(ADMIN_KEY)
    );
    let config = Config::from_toml(&gateway_toml(&s.graph.url(), &new_clients), |_| None).unwrap();
    s.gw.reload(config).expect("reload accepted");
    let r = s
        .get(&format!("/1001?fields=id&access_token={READER_KEY}"))
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "the old key is gone");
    let r = s
        .get(&format!("/1001?fields=id&access_token={rotated}"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = s
        .get(&format!("/1002?fields=id&access_token={rotated}"))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "permissions come along");
    let r = s
        .get(&format!("/1002?fields=id&access_token={ADMIN_KEY}"))
        .await;
    assert_eq!(r.status, StatusCode::OK);

    // Turning TLS on needs a restart: refused, and the running clients stay.
    let dir = TempDir::new("reload");
    let tls = TestPki::new();
    let (cert, key) = tls.server_files(&dir, "srv");
    let with_tls =
        format!("{new_clients}\n[server]\ntls_cert_file = \"{cert}\"\ntls_key_file = \"{key}\"\n");
    let config = Config::from_toml(&gateway_toml(&s.graph.url(), &with_tls), |_| None).unwrap();
    let err = s.gw.reload(config).unwrap_err();
    assert!(err.contains("restart"), "{err}");
    s.gw.reject_reload("config file did not parse");
    let r = s
        .get(&format!("/1001?fields=id&access_token={rotated}"))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let m = s.admin_get("/metrics").await.text();
    assert_eq!(
        metric_value(&m, "graphgate_config_reloads_total", &["result=\"ok\""]),
        1.0
    );
    assert_eq!(
        metric_value(
            &m,
            "graphgate_config_reloads_total",
            &["result=\"rejected\""]
        ),
        2.0
    );
    s.stop().await;
}

#[tokio::test]
async fn sighup_reloads_the_configuration_of_a_running_graphgate() {
    let graph = fake_graph::FakeGraph::start(graph_config(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let dir = TempDir::new("sighup");
    let (port, admin_port) = (free_port(), free_port());
    let config_with = |key: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n\
             [upstream]\nurl = \"{}\"\n[credentials]\nsystem_user_token = \"{SYSTEM_TOKEN}\"\n\
             app_secret = \"{APP_SECRET}\"\n[[clients]]\nname = \"svc\"\nkey = \"{key}\"\npages = [\"*\"]\n",
            graph.url()
        )
    };
    let path = dir.write("graphgate.toml", &config_with("key-before-rotation"));
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_graphgate"))
        .args(["serve", "--config", &path])
        .env_remove("GRAPHGATE_CONFIG")
        .env_remove("GRAPHGATE_SYSTEM_USER_TOKEN")
        .env_remove("GRAPHGATE_APP_SECRET")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let _guard = ChildGuard(child);
    let base = format!("http://127.0.0.1:{port}");
    let metrics_url = format!("http://127.0.0.1:{admin_port}/metrics");
    let status_of = |key: &'static str| {
        let url = format!("{base}/1001?fields=id&access_token={key}");
        async move { get_via_url(&url).await.status }
    };
    // Wait until it serves.
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", admin_port)).await.is_err() {
        assert!(Instant::now() < deadline, "graphgate did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status_of("key-before-rotation").await, StatusCode::OK);

    let hup = || {
        let ok = std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -HUP {pid}");
    };
    let wait_metric = |result: &'static str| {
        let url = metrics_url.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let m = get_via_url(&url).await.text();
                let filter = format!("result=\"{result}\"");
                if metric_value(&m, "graphgate_config_reloads_total", &[&filter]) >= 1.0 {
                    return;
                }
                assert!(Instant::now() < deadline, "no {result} reload counted");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };

    // Rotate the key.
    dir.write("graphgate.toml", &config_with("key-after-rotation"));
    hup();
    wait_metric("ok").await;
    assert_eq!(status_of("key-after-rotation").await, StatusCode::OK);
    assert_eq!(
        status_of("key-before-rotation").await,
        StatusCode::UNAUTHORIZED
    );

    // A broken file is rejected; the process keeps serving with the rotated key.
    dir.write("graphgate.toml", "[server]\nlisten = \"not an address\"\n");
    hup();
    wait_metric("rejected").await;
    assert_eq!(status_of("key-after-rotation").await, StatusCode::OK);
    graph.shutdown();
}

// ---------------------------------------------------------------------------------------------
// Inbound TLS
// ---------------------------------------------------------------------------------------------

/// A test CA that issues server and client certificates.
struct TestPki {
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestPki {
    fn new() -> TestPki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "graphgate test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        TestPki {
            ca: rcgen::CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    fn issue(&self, cn: &str, sans: &[&str], client: bool) -> (String, String) {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(sans).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes a server certificate for 127.0.0.1/localhost and its key; returns the paths.
    fn server_files(&self, dir: &TempDir, tag: &str) -> (String, String) {
        let (cert, key) = self.issue("graphgate", &["localhost", "127.0.0.1"], false);
        (
            dir.write(&format!("{tag}.crt"), &cert),
            dir.write(&format!("{tag}.key"), &key),
        )
    }
}

type TlsClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<Bytes>,
>;

/// An HTTPS client trusting `ca_pem`, optionally presenting a client certificate.
fn tls_client(ca_pem: &str, identity: Option<&(String, String)>, http2_only: bool) -> TlsClient {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    // ALPN offers exactly one protocol, so the test sees the server honour each.
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only();
    let https = if http2_only {
        https.enable_http2().build()
    } else {
        https.enable_http1().build()
    };
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(http2_only)
        .build(https)
}

async fn tls_get(
    client: &TlsClient,
    url: &str,
) -> Result<(StatusCode, http::Version, String), String> {
    use http_body_util::BodyExt;
    let req = http::Request::get(url)
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| format!("{e:?}"))?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((
        parts.status,
        parts.version,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

#[tokio::test]
async fn tls_serves_http1_and_http2_and_maps_client_certificates_to_clients() {
    let pki = TestPki::new();
    let dir = TempDir::new("tls");
    let (cert, key) = pki.server_files(&dir, "srv");
    let ca = dir.write("ca.pem", &pki.ca_pem());
    let extra = format!(
        "[server]\ntls_cert_file = \"{cert}\"\ntls_key_file = \"{key}\"\ntls_client_ca_file = \"{ca}\"\n\
         [[clients]]\nname = \"admin\"\nkey = \"{ADMIN_KEY}\"\npages = [\"*\"]\n\
         [[clients]]\nname = \"by-cert\"\ncert_subject = \"svc-reports\"\npages = [\"1001\"]\n"
    );
    let s = Stack::start_with(graph_config(), &extra).await;
    assert!(s.gw.url().starts_with("https://"), "{}", s.gw.url());
    let url = |path: &str| format!("https://localhost:{}{path}", s.gw.addr.port());

    // HTTP/1.1 and HTTP/2 by ALPN, authenticated by key.
    for (h2, version) in [
        (false, http::Version::HTTP_11),
        (true, http::Version::HTTP_2),
    ] {
        let c = tls_client(&pki.ca_pem(), None, h2);
        let (status, v, body) = tls_get(
            &c,
            &url(&format!("/1001?fields=id&access_token={ADMIN_KEY}")),
        )
        .await
        .unwrap();
        assert_eq!((status, v), (StatusCode::OK, version), "{body}");
        // Paging links point at the https URL.
        let (_, _, body) = tls_get(
            &c,
            &url(&format!("/1001/feed?limit=1&access_token={ADMIN_KEY}")),
        )
        .await
        .unwrap();
        assert!(
            body.contains(&format!("https:\\/\\/127.0.0.1:{}", s.gw.addr.port()))
                || body.contains(&format!("https://127.0.0.1:{}", s.gw.addr.port())),
            "{body}"
        );
    }

    // A client certificate with CN svc-reports is the `by-cert` client: no key needed, and
    // its permissions apply.
    let identity = pki.issue("svc-reports", &[], true);
    let c = tls_client(&pki.ca_pem(), Some(&identity), false);
    let (status, _, body) = tls_get(&c, &url("/1001?fields=id")).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _, _) = tls_get(&c, &url("/1002?fields=id")).await.unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    // A verified certificate no client claims, and no certificate at all: 401.
    let stranger = pki.issue("svc-unknown", &[], true);
    let c = tls_client(&pki.ca_pem(), Some(&stranger), false);
    let (status, _, _) = tls_get(&c, &url("/1001?fields=id")).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let c = tls_client(&pki.ca_pem(), None, false);
    let (status, _, _) = tls_get(&c, &url("/1001?fields=id")).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // A certificate from another CA fails the handshake.
    let other = TestPki::new();
    let forged = other.issue("svc-reports", &[], true);
    let c = tls_client(&pki.ca_pem(), Some(&forged), false);
    assert!(tls_get(&c, &url("/1001?fields=id")).await.is_err());
    // Plain HTTP to the TLS port gets nowhere.
    let plain = get_raw_http(s.gw.addr).await;
    assert!(!plain.starts_with("HTTP/1.1 200"), "{plain}");
    s.stop().await;
}

async fn get_raw_http(addr: std::net::SocketAddr) -> String {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let _ = conn
        .write_all(
            format!("GET /1001?access_token={ADMIN_KEY} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        )
        .await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test]
async fn tls_certificates_are_reloaded_with_the_configuration() {
    let old_ca = TestPki::new();
    let new_ca = TestPki::new();
    let dir = TempDir::new("tls-reload");
    let (cert, key) = old_ca.server_files(&dir, "srv");
    let extra = format!("[server]\ntls_cert_file = \"{cert}\"\ntls_key_file = \"{key}\"\n");
    let s = Stack::start_with(graph_config(), &extra).await;
    let url = format!(
        "https://localhost:{}/1001?fields=id&access_token={ADMIN_KEY}",
        s.gw.addr.port()
    );
    let trusts_new = tls_client(&new_ca.ca_pem(), None, false);
    assert!(
        tls_get(&trusts_new, &url).await.is_err(),
        "old certificate served"
    );

    // Same paths, new contents; a broken key file is refused and the old certificate stays.
    let (new_cert, new_key) = new_ca.issue("graphgate", &["localhost"], false);
    dir.write("srv.crt", &new_cert);
    dir.write(
        "srv.key",
        "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n",
    );
    let toml = gateway_toml(&s.graph.url(), &extra);
    let err =
        s.gw.reload(Config::from_toml(&toml, |_| None).unwrap())
            .unwrap_err();
    assert!(err.contains("tls_key_file"), "{err}");
    let trusts_old = tls_client(&old_ca.ca_pem(), None, false);
    let (status, _, _) = tls_get(&trusts_old, &url).await.unwrap();
    assert_eq!(status, StatusCode::OK);

    dir.write("srv.key", &new_key);
    s.gw.reload(Config::from_toml(&toml, |_| None).unwrap())
        .unwrap();
    let trusts_new = tls_client(&new_ca.ca_pem(), None, false);
    let (status, _, _) = tls_get(&trusts_new, &url).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    s.stop().await;
}

#[test]
fn tls_settings_are_validated() {
    let half = gateway_toml(
        "http://127.0.0.1:1",
        "[server]\ntls_cert_file = \"/x.crt\"\n",
    );
    let err = Config::from_toml(&half, |_| None).unwrap_err().to_string();
    assert!(err.contains("tls_key_file"), "{err}");
    let base = gateway_toml("http://127.0.0.1:1", "");
    let cert_client = format!("{base}\n[[clients]]\nname = \"c\"\ncert_subject = \"svc\"\n");
    let err = Config::from_toml(&cert_client, |_| None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tls_client_ca_file"), "{err}");
}

fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

// ---------------------------------------------------------------------------------------------
// Graph over TLS and HTTP/2: upstream.ca_file, refused streams, GOAWAY
// ---------------------------------------------------------------------------------------------

/// A simulated Graph API serving TLS (HTTP/2 or HTTP/1.1 by ALPN) with a certificate from
/// `pki`, with quotas too large to matter.
async fn tls_graph(pki: &TestPki) -> fake_graph::FakeGraph {
    let (cert_pem, key_pem) = pki.issue("graph", &["localhost", "127.0.0.1"], false);
    let cfg = fake_graph::FakeGraphConfig {
        tls: Some(fake_graph::FakeGraphTls { cert_pem, key_pem }),
        page_calls_limit: 1_000_000,
        app_calls_limit: 1_000_000,
        ..graph_config()
    };
    fake_graph::FakeGraph::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// graphgate in front of `upstream`, trusting the test CA through `upstream.ca_file` (read
/// at start-up, so its directory may go once graphgate runs). `extra` continues `[upstream]`.
async fn gateway_trusting(upstream: &str, pki: &TestPki, extra: &str) -> Running {
    let dir = TempDir::new("upstream-ca");
    let ca = dir.write("graph-ca.pem", &pki.ca_pem());
    let toml = gateway_toml(upstream, &format!("[upstream]\nca_file = {ca:?}\n{extra}"));
    server::start(Config::from_toml(&toml, |_| None).unwrap())
        .await
        .unwrap()
}

async fn write_via(gw: &Running, graph: &fake_graph::FakeGraph, message: &str) -> Reply {
    send(
        &client(),
        Method::POST,
        &format!("{}/1001/feed", gw.url()),
        &[("content-type", "application/x-www-form-urlencoded")],
        Bytes::from(format!("message={message}&access_token={ADMIN_KEY}")),
        &secrets_of(graph),
    )
    .await
}

/// How many posts on Page 1001 carry `message`: how often a write was applied.
fn times_applied(graph: &fake_graph::FakeGraph, message: &str) -> usize {
    graph
        .posts_of("1001")
        .iter()
        .filter(|p| p.message == message)
        .count()
}

#[tokio::test]
async fn graph_over_tls_is_spoken_to_in_http2_with_the_ca_of_upstream_ca_file() {
    let pki = TestPki::new();
    let graph = tls_graph(&pki).await;
    assert!(graph.url().starts_with("https://127.0.0.1:"));
    // One worker: with two, each worker's calls go on a connection of its own.
    let gw = gateway_trusting(&graph.url(), &pki, "[server]\nworkers = 1").await;
    for _ in 0..3 {
        let r = get_via(
            &gw,
            &format!("/1001_1?fields=message&access_token={ADMIN_KEY}"),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    let r = write_via(&gw, &graph, "over-h2").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let seen = graph.requests();
    assert_eq!(
        seen.len(),
        2,
        "one read (then cached) and one write: {seen:?}"
    );
    assert!(seen.iter().all(|r| r.version == "HTTP/2.0"), "{seen:?}");
    // One pooled HTTP/2 connection carries both calls.
    assert_eq!(graph.stats().connections, 1);
    gw.shutdown().await;
    graph.shutdown();
}

/// Each worker keeps its own pool of upstream connections, as nginx's workers do: a call goes
/// out on a connection its own thread drives. Reads on new client connections are dealt to
/// the two workers in turn, so one after another they open one HTTP/2 connection per worker.
#[tokio::test]
async fn each_worker_calls_graph_on_connections_of_its_own() {
    let pki = TestPki::new();
    let graph = tls_graph(&pki).await;
    let gw = gateway_trusting(&graph.url(), &pki, "[server]\nworkers = 2").await;
    for i in 1..=6 {
        let r = get_via(
            &gw,
            &format!("/1001_{i}?fields=id&access_token={ADMIN_KEY}"),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    assert_eq!(graph.requests().len(), 6);
    assert_eq!(graph.stats().connections, 2);
    gw.shutdown().await;
    graph.shutdown();
}

#[tokio::test]
async fn an_untrusted_graph_certificate_is_a_502_and_a_bad_ca_file_stops_start_up() {
    let pki = TestPki::new();
    let graph = tls_graph(&pki).await;
    // Without ca_file the test CA is not trusted: nothing reaches Graph.
    let gw = gateway_for(&graph.url(), "[upstream]\nretries = 0\n").await;
    let r = get_via(&gw, &format!("/1001?access_token={ADMIN_KEY}")).await;
    assert_graphgate_error(&r, StatusCode::BAD_GATEWAY);
    assert_eq!(graph.stats().requests, 0);
    gw.shutdown().await;

    let dir = TempDir::new("bad-ca");
    for (name, text) in [("empty.pem", ""), ("junk.pem", "not a certificate\n")] {
        let path = dir.write(name, text);
        let toml = gateway_toml(&graph.url(), &format!("[upstream]\nca_file = {path:?}\n"));
        let err = server::start(Config::from_toml(&toml, |_| None).unwrap())
            .await
            .err()
            .expect("an unusable ca_file stops start-up");
        assert!(err.to_string().contains("upstream.ca_file"), "{err}");
    }
    let missing = dir.0.join("missing.pem").display().to_string();
    let toml = gateway_toml(
        &graph.url(),
        &format!("[upstream]\nca_file = {missing:?}\n"),
    );
    assert!(server::start(Config::from_toml(&toml, |_| None).unwrap())
        .await
        .is_err());
    graph.shutdown();
}

#[tokio::test]
async fn a_stream_graph_refuses_is_sent_again_even_for_a_write_and_runs_once() {
    let pki = TestPki::new();
    let graph = tls_graph(&pki).await;
    // Retries of ordinary failures are off: only the refusal rule can send the write again.
    let gw = gateway_trusting(&graph.url(), &pki, "retries = 0\nretry_backoff_ms = 1\n").await;
    graph.set_fault(Fault::RefuseStreams(2));
    let r = write_via(&gw, &graph, "refused-twice").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        times_applied(&graph, "refused-twice"),
        1,
        "the write ran exactly once"
    );
    assert_eq!(graph.stats().refused, 2);
    let m = metrics_of(&gw).await;
    assert_eq!(
        metric_value(
            &m,
            "graphgate_upstream_retries_total",
            &["reason=\"refused\""]
        ),
        2.0
    );

    // A Graph that keeps refusing: the call is given up after 1 + 4 attempts, with a 502.
    graph.set_fault(Fault::RefuseStreams(100));
    let r = write_via(&gw, &graph, "always-refused").await;
    assert_graphgate_error(&r, StatusCode::BAD_GATEWAY);
    assert_eq!(graph.stats().refused, 2 + 5);
    assert_eq!(times_applied(&graph, "always-refused"), 0);
    graph.set_fault(Fault::None);
    gw.shutdown().await;
    graph.shutdown();
}

#[tokio::test]
async fn graph_rotating_http2_connections_with_goaway_loses_no_call_and_repeats_no_write() {
    let pki = TestPki::new();
    let graph = tls_graph(&pki).await;
    // Generous deadline: this checks that nothing is lost, not speed, on a loaded machine.
    // No pacing by graphgate's own Page quota either.
    let extra = "timeout_ms = 15000\n[quota]\npage_calls = 1000000\npage_window_s = 1\n";
    let gw = Arc::new(gateway_trusting(&graph.url(), &pki, extra).await);
    // Every connection is closed with a GOAWAY after its third request.
    graph.set_fault(Fault::GoAway { after: 3 });
    const CLIENTS: usize = 12;
    const CALLS: usize = 10;
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let gw = gw.clone();
        let graph = graph.clone();
        tasks.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            for i in 0..CALLS {
                let n = c * CALLS + i;
                let r = if i.is_multiple_of(4) {
                    write_via(&gw, &graph, &format!("goaway-{n}")).await
                } else {
                    // Distinct keys, so every read goes to Graph.
                    let fields = ["message", "created_time"][n / 60];
                    let path = format!(
                        "/1001_{}?fields={fields}&access_token={ADMIN_KEY}",
                        1 + n % 60
                    );
                    get_via(&gw, &path).await
                };
                if r.status != StatusCode::OK {
                    failures.push(format!("call {n}: {} {}", r.status, r.text()));
                }
            }
            failures
        }));
    }
    let mut failures = Vec::new();
    for t in tasks {
        failures.extend(t.await.unwrap());
    }
    assert!(failures.is_empty(), "lost calls: {failures:#?}");
    for n in (0..CLIENTS * CALLS).filter(|n| (n % CALLS).is_multiple_of(4)) {
        let message = format!("goaway-{n}");
        assert_eq!(times_applied(&graph, &message), 1, "{message}");
    }
    let stats = graph.stats();
    assert!(stats.goaways >= 5, "Graph rotated connections: {stats:?}");
    assert!(graph.requests().iter().all(|r| r.version == "HTTP/2.0"));
    graph.set_fault(Fault::None);
    match Arc::try_unwrap(gw) {
        Ok(gw) => gw.shutdown().await,
        Err(_) => unreachable!("all tasks have finished"),
    }
    graph.shutdown();
}

/// A front for `graph` on its own port: its first connection speaks TLS + HTTP/2 itself and,
/// as soon as the first request's HEADERS frame arrives, answers with a GOAWAY whose last
/// stream id is 0 (nothing processed) and closes; every later connection is passed through
/// to `graph` byte for byte. Returns the front's URL and its connection counter.
async fn goaway_first_front(
    pki: &TestPki,
    graph: &fake_graph::FakeGraph,
) -> (String, Arc<AtomicUsize>) {
    let (cert, key) = pki.issue("front", &["127.0.0.1"], false);
    let acceptor = tokio_rustls::TlsAcceptor::from(
        graphgate::tls::server_config_from_pem(&cert, &key).unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let graph_addr = graph.addr();
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            if counter.fetch_add(1, Ordering::SeqCst) > 0 {
                tokio::spawn(async move {
                    if let Ok(mut upstream) = TcpStream::connect(graph_addr).await {
                        let _ = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await;
                    }
                });
                continue;
            }
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                // Client preface, then frames (9-byte header: length, type, flags, stream)
                // until a HEADERS frame (type 1).
                let mut preface = [0u8; 24];
                if tls.read_exact(&mut preface).await.is_err() {
                    return;
                }
                loop {
                    let mut head = [0u8; 9];
                    if tls.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    let len = usize::from(head[0]) << 16
                        | usize::from(head[1]) << 8
                        | usize::from(head[2]);
                    let mut payload = vec![0u8; len];
                    if tls.read_exact(&mut payload).await.is_err() {
                        return;
                    }
                    if head[3] == 1 {
                        break;
                    }
                }
                // Empty SETTINGS, then GOAWAY(last_stream_id = 0, NO_ERROR).
                let mut frames = vec![0, 0, 0, 4, 0, 0, 0, 0, 0];
                frames.extend_from_slice(&[0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
                let _ = tls.write_all(&frames).await;
                let _ = tls.flush().await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (url, count)
}

#[tokio::test]
async fn a_call_above_the_last_stream_id_of_a_goaway_is_sent_again_even_for_a_write() {
    let pki = TestPki::new();
    let graph = tls_graph(&pki).await;
    let (front, conns) = goaway_first_front(&pki, &graph).await;
    // Retries of ordinary failures are off: only the refusal rule can send the write again.
    let gw = gateway_trusting(&front, &pki, "retries = 0\n").await;
    let r = write_via(&gw, &graph, "after-goaway").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        conns.load(Ordering::SeqCst),
        2,
        "the write went out again on a new connection"
    );
    assert_eq!(times_applied(&graph, "after-goaway"), 1);
    let m = metrics_of(&gw).await;
    assert_eq!(
        metric_value(
            &m,
            "graphgate_upstream_retries_total",
            &["reason=\"refused\""]
        ),
        1.0
    );
    gw.shutdown().await;
    graph.shutdown();
}
