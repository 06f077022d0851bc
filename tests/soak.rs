//! Soak: a bounded run at a high request rate through real loopback sockets
//! against the simulated Graph API, with a mix of cache hits, misses over an ever-growing key
//! space (so the cache must evict), stale serves, paging, `ids=`, writes and a throttled Page.
//!
//! Asserts: every reply is 200 or, for the throttled Page only, graphgate's 429; the cache
//! stays within `cache.max_bytes`; and the process's resident memory stops growing once warm.
//!
//! Its own test binary, so the RSS it reads (`/proc/self/status`) is not shared with other
//! tests. One process holds the client, graphgate and the simulated Graph, so RSS also counts
//! the client's and the fake's buffers, and the allocator keeps freed pages: the memory bound is
//! therefore checked as *growth between the warm point and the end*, with a generous margin.
//! Length: `GRAPHGATE_SOAK_SECS` (default 30, at most 60).

#[allow(dead_code, unused_imports)]
#[path = "it/support.rs"]
mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use support::*;

const CACHE_MAX_BYTES: u64 = 256 * 1024;
const WORKERS: usize = 32;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

#[derive(Default)]
struct Tally {
    by_kind_status: BTreeMap<(&'static str, u16), u64>,
    cache: BTreeMap<String, u64>,
    unexpected: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_mixed_traffic_no_errors_and_bounded_memory() {
    let secs: u64 = std::env::var("GRAPHGATE_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30)
        .clamp(5, 60);
    let mut graph_cfg = graph_config();
    graph_cfg.page_calls_limit = 1_000_000;
    graph_cfg.app_calls_limit = 1_000_000;
    // Writes go to their own Page, so their invalidations do not empty the hot set.
    let mut writable = graph_cfg.pages[0].clone();
    writable.id = "1003".into();
    graph_cfg.pages.push(writable);
    let s = Arc::new(
        Stack::start_with(
            graph_cfg,
            &format!(
                r#"
[server]
max_in_flight = 4096
[cache]
max_bytes = {CACHE_MAX_BYTES}
default_ttl_s = 2
stale_while_revalidate_s = 30
stale_if_error_s = 30
[quota]
page_calls = 1000000
page_window_s = 10
queue_timeout_ms = 200
[[quota.pages]]
id = "1002"
page_calls = 20
[log]
level = "warn"
"#
            ),
        )
        .await,
    );
    s.graph.set_record_limit(16);
    let http = client();
    let seq = Arc::new(AtomicU64::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let warm_at = started + Duration::from_secs(secs / 3);
    let rss_warm = Arc::new(AtomicU64::new(0));
    let base = s.gw.url();

    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (http, seq, tally, base, rss_warm) = (
            http.clone(),
            seq.clone(),
            tally.clone(),
            base.clone(),
            rss_warm.clone(),
        );
        workers.push(tokio::spawn(async move {
            let k = ADMIN_KEY;
            while Instant::now() < deadline {
                if Instant::now() >= warm_at && rss_warm.load(Ordering::SeqCst) == 0 {
                    rss_warm.store(rss_bytes(), Ordering::SeqCst);
                }
                let n = seq.fetch_add(1, Ordering::Relaxed);
                // Hot keys (hits, stale), an unbounded key space (misses, evictions), paging,
                // ids=, writes, and a Page with a tiny budget (429s).
                let (kind, method, target, body): (&str, Method, String, &str) = match n % 20 {
                    0..=7 => (
                        "hot",
                        Method::GET,
                        format!(
                            "/v21.0/1001?fields=id,name&limit={}&access_token={k}",
                            n % 16
                        ),
                        "",
                    ),
                    8..=11 => (
                        "cold",
                        Method::GET,
                        format!("/v21.0/1001/feed?limit=25&soak={n}&access_token={k}"),
                        "",
                    ),
                    12 | 13 => (
                        "feed",
                        Method::GET,
                        format!(
                            "/v21.0/{}/feed?limit={}&access_token={k}",
                            if n % 2 == 0 { "1001" } else { "1003" },
                            1 + n % 5
                        ),
                        "",
                    ),
                    14 => (
                        "ids",
                        Method::GET,
                        format!(
                            "/v21.0/?ids=1001,1001_{}&fields=id&access_token={k}",
                            1 + n % 50
                        ),
                        "",
                    ),
                    15 | 16 => (
                        "write",
                        Method::POST,
                        format!("/v21.0/1003_{}?access_token={k}", 1 + n % 50),
                        "message=soak",
                    ),
                    _ => (
                        "throttled",
                        Method::GET,
                        format!("/v21.0/1002?fields=id&soak={n}&access_token={k}"),
                        "",
                    ),
                };
                let req = Request::builder()
                    .method(method)
                    .uri(format!("{base}{target}"))
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(Full::new(Bytes::from_static(body.as_bytes())))
                    .unwrap();
                let result = tokio::time::timeout(Duration::from_secs(10), http.request(req)).await;
                match result {
                    Ok(Ok(resp)) => {
                        let status = resp.status();
                        let cache = resp
                            .headers()
                            .get("x-cache")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_string();
                        let body = resp.into_body().collect().await.map(|b| b.to_bytes());
                        let mut t = tally.lock().unwrap();
                        *t.by_kind_status.entry((kind, status.as_u16())).or_default() += 1;
                        *t.cache.entry(cache).or_default() += 1;
                        let ok = status == StatusCode::OK
                            || (kind == "throttled" && status == StatusCode::TOO_MANY_REQUESTS);
                        if !ok || body.is_err() {
                            if t.unexpected.len() < 20 {
                                let text = body
                                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                                    .unwrap_or_default();
                                t.unexpected
                                    .push(format!("worker {w} {kind} {status}: {text}"));
                            } else {
                                t.unexpected.push(String::new());
                            }
                        }
                    }
                    Ok(Err(e)) => tally
                        .lock()
                        .unwrap()
                        .unexpected
                        .push(format!("{kind}: transport error {e}")),
                    Err(_) => tally
                        .lock()
                        .unwrap()
                        .unexpected
                        .push(format!("{kind}: no reply in 10 s")),
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let elapsed = started.elapsed();
    let rss_end = rss_bytes();
    let rss_warm = rss_warm.load(Ordering::SeqCst);
    let metrics = s.admin_get("/metrics").await.text();
    let cache_bytes = metric_value(&metrics, "graphgate_cache_bytes", &[]);
    let evictions = metric_value(
        &metrics,
        "graphgate_cache_evictions_total",
        &["cause=\"size\""],
    );
    let t = std::mem::take(&mut *tally.lock().unwrap());
    let total: u64 = t.by_kind_status.values().sum();
    let count =
        |kind: &str, status: u16| t.by_kind_status.get(&(kind, status)).copied().unwrap_or(0);
    let throttled: u64 = count("throttled", 429);
    eprintln!(
        "soak: {total} requests in {:.1} s ({:.0}/s); by kind/status {:?}; cache {:?}; \
         RSS warm {} MiB, end {} MiB; cache {} bytes of {CACHE_MAX_BYTES}, {evictions} size evictions",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        t.by_kind_status,
        t.cache,
        rss_warm >> 20,
        rss_end >> 20,
        cache_bytes,
    );
    assert!(
        t.unexpected.is_empty(),
        "{} unexpected replies, first: {:#?}",
        t.unexpected.len(),
        &t.unexpected[..t.unexpected.len().min(20)]
    );
    // The mix really happened.
    assert!(total > 1000, "too few requests: {total}");
    assert!(
        t.cache.get("HIT").copied().unwrap_or(0) > 0,
        "{:?}",
        t.cache
    );
    assert!(
        t.cache.get("MISS").copied().unwrap_or(0) > 0,
        "{:?}",
        t.cache
    );
    assert!(count("write", 200) > 0);
    assert!(throttled > 0, "the small Page was never throttled");
    assert!(evictions > 0.0, "the key space never outgrew the cache");
    // Memory: the cache holds its bound, and the process stops growing once warm. Margin:
    // the cache bound itself plus 48 MiB for allocator retention, connection buffers, the
    // fake's and the client's state.
    assert!(
        cache_bytes <= CACHE_MAX_BYTES as f64,
        "cache {cache_bytes} > {CACHE_MAX_BYTES}"
    );
    if rss_warm > 0 && rss_end > 0 {
        let growth = rss_end.saturating_sub(rss_warm);
        assert!(
            growth < CACHE_MAX_BYTES + 48 * 1024 * 1024,
            "RSS grew {} MiB after warm-up (warm {} MiB, end {} MiB)",
            growth >> 20,
            rss_warm >> 20,
            rss_end >> 20
        );
    }
    drop(t);
    stop(s).await;
}

async fn stop(s: Arc<Stack>) {
    if let Ok(s) = Arc::try_unwrap(s) {
        s.stop().await;
    }
}
