//! The per-Page quota scheduler against the simulated Graph API, which enforces a small
//! rolling-window limit per Page (10 calls per 2 s here) and answers 80001 beyond it.
//! Assertions are about outcomes (nothing throttled, 200 or 429), never tight timings.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fake_graph::FakeGraphConfig;
use http::{Method, StatusCode};
use tokio::task::JoinSet;

use crate::support::*;

const LIMIT: u32 = 10;
const WINDOW: Duration = Duration::from_secs(2);

fn limited_graph() -> FakeGraphConfig {
    FakeGraphConfig {
        page_calls_limit: LIMIT,
        page_window: WINDOW,
        ..graph_config()
    }
}

async fn stack(quota_toml: &str) -> Arc<Stack> {
    Arc::new(Stack::start_with(limited_graph(), quota_toml).await)
}

async fn stop(s: Arc<Stack>) {
    if let Ok(s) = Arc::try_unwrap(s) {
        s.stop().await;
    }
}

/// GETs of distinct posts of `page` (so no cache can fold them), all at once.
async fn flood(
    s: &Arc<Stack>,
    page: &str,
    posts: std::ops::Range<u32>,
    headers: &[(&'static str, String)],
) -> Vec<Reply> {
    let mut set = JoinSet::new();
    for (i, n) in posts.enumerate() {
        let s = s.clone();
        let headers = headers.to_vec();
        let path = format!("/v21.0/{page}_{n}?fields=id&access_token={ADMIN_KEY}");
        set.spawn(async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            (i, s.request(Method::GET, &path, &h, Bytes::new()).await)
        });
    }
    let mut out: Vec<(usize, Reply)> = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.expect("request task"));
    }
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, r)| r).collect()
}

/// A 429 from graphgate: Retry-After, RateLimit headers, a Graph-style throttling body.
fn assert_graphgate_429(r: &Reply) -> u64 {
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text());
    let retry_after: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("429 without a numeric Retry-After: {:?}", r.headers));
    assert!(retry_after >= 1, "{retry_after}");
    let policy = r
        .header("ratelimit-policy")
        .expect("RateLimit-Policy on 429");
    assert!(policy.starts_with("\"page\";q="), "{policy}");
    assert_eq!(
        r.header("ratelimit"),
        Some(format!("\"page\";r=0;t={retry_after}").as_str())
    );
    let v = r.json();
    assert_eq!(v["error"]["code"], 80001);
    assert_eq!(v["error"]["is_transient"], true);
    let sub = v["error"]["error_subcode"].as_i64().unwrap_or(0);
    assert!(sub == 2_446_010 || sub == 2_446_011, "{sub}");
    retry_after
}

#[tokio::test]
async fn a_flood_at_the_true_limit_is_queued_and_nothing_is_throttled() {
    let s = stack(
        "[quota]\npage_calls = 10\npage_window_s = 2\nqueue_timeout_ms = 4000\nthrottle_backoff_ms = 500\n",
    )
    .await;
    let replies = flood(&s, "1001", 1..31, &[]).await;
    let ok = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    for r in &replies {
        if r.status != StatusCode::OK {
            assert_graphgate_429(r);
        }
    }
    let stats = s.graph.stats();
    assert_eq!(stats.throttled, 0, "{stats:?}");
    // At least one window's worth went through; the rest waited or were told when to retry.
    assert!(ok >= LIMIT as usize, "only {ok} of 30 succeeded");
    assert!(
        ok < 30,
        "a 3x flood cannot all fit in 4 s of a 10-per-2-s budget"
    );
    // Successful replies carry the RateLimit headers too.
    let first_ok = replies.iter().find(|r| r.status == StatusCode::OK).unwrap();
    assert!(first_ok.header("ratelimit-policy").is_some());
    assert!(first_ok.header("ratelimit").is_some());
    let m = s.admin_get("/metrics").await.text();
    assert!(
        metric_value(&m, "graphgate_quota_dispatches_total", &["bucket=\"page\""]) >= ok as f64
    );
    assert_eq!(
        metric_value(&m, "graphgate_quota_rejections_total", &[]) as usize,
        30 - ok
    );
    stop(s).await;
}

#[tokio::test]
async fn a_ceiling_far_too_high_is_corrected_by_the_usage_headers() {
    // graphgate believes in 1000 calls per 2 s; Graph allows 10. The usage headers (and any
    // 80001) pause the Page; queued GETs go out once the window has room again.
    let s = stack(
        "[quota]\npage_calls = 1000\npage_window_s = 2\nqueue_timeout_ms = 15000\nthrottle_backoff_ms = 2000\n",
    )
    .await;
    let replies = flood(&s, "1001", 1..26, &[]).await;
    let ok = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    for r in &replies {
        if r.status != StatusCode::OK {
            assert_graphgate_429(r);
        }
    }
    let stats = s.graph.stats();
    assert!(
        stats.throttled <= 3,
        "too many throttled calls got through: {stats:?}"
    );
    // More than one window's worth succeeded, so queued GETs went out after a pause.
    assert!(
        ok > 2 * LIMIT as usize,
        "only {ok} of 25 succeeded: {stats:?}"
    );
    stop(s).await;
}

#[tokio::test]
async fn a_throttle_code_pauses_the_page_and_the_get_is_retried_after_the_pause() {
    let s = stack(
        "[quota]\npage_calls = 1000\npage_window_s = 2\nqueue_timeout_ms = 10000\nthrottle_backoff_ms = 1000\n",
    )
    .await;
    // Another app uses up the Page's budget behind graphgate's back.
    let proof = s.graph.proof_for(SYSTEM_TOKEN).unwrap_or_default();
    for n in 1..=LIMIT {
        let url = format!(
            "{}/v21.0/1001_{n}?fields=id&access_token={SYSTEM_TOKEN}&appsecret_proof={proof}",
            s.graph.url()
        );
        let r = send(&client(), Method::GET, &url, &[], Bytes::new(), &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    let started = Instant::now();
    let r = s
        .get(&format!(
            "/v21.0/1001_20?fields=id&access_token={ADMIN_KEY}"
        ))
        .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "the GET was handed back throttled: {}",
        r.text()
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "it must have waited out a pause"
    );
    let stats = s.graph.stats();
    let throttled = stats.throttled_by_page.get("1001").copied().unwrap_or(0);
    assert!((1..=3).contains(&throttled), "{stats:?}");
    let m = s.admin_get("/metrics").await.text();
    assert!(metric_value(&m, "graphgate_quota_requeues_total", &[]) >= 1.0);
    assert!(metric_value(&m, "graphgate_quota_throttles_total", &["scope=\"page\""]) >= 1.0);
    stop(s).await;
}

#[tokio::test]
async fn writes_that_are_throttled_are_not_resent() {
    let s =
        stack("[quota]\npage_calls = 1000\npage_window_s = 2\nthrottle_backoff_ms = 1000\n").await;
    let proof = s.graph.proof_for(SYSTEM_TOKEN).unwrap_or_default();
    for n in 1..=LIMIT {
        let url = format!(
            "{}/v21.0/1001_{n}?fields=id&access_token={SYSTEM_TOKEN}&appsecret_proof={proof}",
            s.graph.url()
        );
        send(&client(), Method::GET, &url, &[], Bytes::new(), &[]).await;
    }
    let before = s.graph.stats().calls;
    let r = s
        .post_form(
            "/v21.0/1001/feed",
            &format!("message=hi&access_token={ADMIN_KEY}"),
        )
        .await;
    // Graph's own throttle reply, once: the client decides whether to write again.
    assert_eq!(r.error_code(), 80001, "{}", r.text());
    assert_eq!(s.graph.stats().calls, before + 1);
    stop(s).await;
}

#[tokio::test]
async fn a_backlogged_page_does_not_delay_another_page() {
    let s = stack("[quota]\npage_calls = 10\npage_window_s = 2\nqueue_timeout_ms = 8000\n").await;
    let backlog = {
        let s = s.clone();
        tokio::spawn(async move { flood(&s, "1001", 1..41, &[]).await })
    };
    // Let the backlog build up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = admin_pages(&s).await;
    let depth_1001 = page_row(&status, "1001")["queue_depth"]
        .as_u64()
        .unwrap_or(0);
    assert!(depth_1001 > 0, "{status}");

    let started = Instant::now();
    let quiet = flood(&s, "1002", 1..4, &[]).await;
    let took = started.elapsed();
    for r in &quiet {
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    // Three calls at ~5 per second: well under a second on their own budget; a shared queue
    // would have put them behind 1001's backlog (seconds).
    assert!(
        took < Duration::from_millis(1500),
        "Page 1002 waited {took:?}"
    );
    let still_queued = page_row(&admin_pages(&s).await, "1001")["queue_depth"]
        .as_u64()
        .unwrap_or(0);
    assert!(still_queued > 0, "the backlog should still be there");

    let replies = backlog.await.expect("backlog task");
    for r in &replies {
        if r.status != StatusCode::OK {
            assert_graphgate_429(r);
        }
    }
    assert_eq!(s.graph.stats().throttled, 0);
    stop(s).await;
}

#[tokio::test]
async fn the_deadline_header_and_max_queue_depth_give_429_with_retry_after() {
    // 2 calls per 2 s: one call per ~second, so queued calls stay queued for a while.
    let s = stack("[quota]\npage_calls = 2\npage_window_s = 2\nqueue_timeout_ms = 10000\nmax_queue_depth = 3\n")
        .await;
    let r = s
        .get(&format!("/1001_1?fields=id&access_token={ADMIN_KEY}"))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    // The next slot is about a second away: a client that waits at most 50 ms is told so.
    let r = s
        .request(
            Method::GET,
            &format!("/1001_2?fields=id&access_token={ADMIN_KEY}"),
            &[("x-graphgate-max-wait-ms", "50")],
            Bytes::new(),
        )
        .await;
    let retry_after = assert_graphgate_429(&r);
    assert!(retry_after <= 2, "{retry_after}");
    assert_eq!(r.json()["error"]["error_subcode"], 2_446_010);

    // Fill the queue (3 waiters), then one more is refused at once as queue_full.
    let waiting = {
        let s = s.clone();
        tokio::spawn(async move { flood(&s, "1001", 3..6, &[]).await })
    };
    let mut depth = 0;
    for _ in 0..50 {
        depth = page_row(&admin_pages(&s).await, "1001")["queue_depth"]
            .as_u64()
            .unwrap_or(0);
        if depth == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(depth, 3);
    let started = Instant::now();
    let r = s
        .get(&format!("/1001_7?fields=id&access_token={ADMIN_KEY}"))
        .await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "queue_full is immediate"
    );
    let retry_after = assert_graphgate_429(&r);
    assert_eq!(r.json()["error"]["error_subcode"], 2_446_011);
    // Three calls ahead at ~1 per second.
    assert!((2..=6).contains(&retry_after), "{retry_after}");
    for r in waiting.await.expect("waiters") {
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    let m = s.admin_get("/metrics").await.text();
    assert_eq!(
        metric_value(
            &m,
            "graphgate_quota_rejections_total",
            &["reason=\"queue_full\""]
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &m,
            "graphgate_quota_rejections_total",
            &["reason=\"queue_timeout\""]
        ),
        1.0
    );
    assert_eq!(s.graph.stats().throttled, 0);
    stop(s).await;
}

#[tokio::test]
async fn interactive_calls_overtake_queued_batch_calls_of_the_same_page() {
    let extra = format!(
        "[quota]\npage_calls = 2\npage_window_s = 2\n[[clients]]\nname = \"admin\"\nkey = \"{ADMIN_KEY}\"\npages = [\"*\"]\nwrite = true\n\
         [[clients]]\nname = \"reader\"\nkey = \"{READER_KEY}\"\npages = [\"1001\"]\npriority = \"batch\"\n"
    );
    let s = stack(&extra).await;
    // Take the free slot, then queue two batch calls.
    s.get(&format!("/1001_1?fields=id&access_token={READER_KEY}"))
        .await;
    let batch = {
        let s = s.clone();
        tokio::spawn(async move {
            let mut set = JoinSet::new();
            for n in [2, 3] {
                let s = s.clone();
                set.spawn(async move {
                    s.get(&format!("/1001_{n}?fields=id&access_token={READER_KEY}"))
                        .await;
                    Instant::now()
                });
            }
            let mut done = Vec::new();
            while let Some(t) = set.join_next().await {
                done.push(t.expect("batch call"));
            }
            done
        })
    };
    for _ in 0..50 {
        if page_row(&admin_pages(&s).await, "1001")["queue_depth"].as_u64() == Some(2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = s
        .get(&format!("/1001_4?fields=id&access_token={ADMIN_KEY}"))
        .await;
    let interactive_done = Instant::now();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let batch_done = batch.await.expect("batch task");
    assert!(
        batch_done.iter().all(|t| *t > interactive_done),
        "the interactive call went after a batch call"
    );
    stop(s).await;
}

#[tokio::test]
async fn admin_pages_lists_budgets_and_needs_the_admin_token() {
    let s = stack("[quota]\npage_calls = 10\npage_window_s = 2\n[[quota.pages]]\nid = \"1002\"\npage_calls = 4\n").await;
    s.get(&format!("/1001_1?fields=id&access_token={ADMIN_KEY}"))
        .await;
    s.get(&format!("/1002?fields=id&access_token={ADMIN_KEY}"))
        .await;
    let url = format!("{}/admin/pages", s.gw.admin_url());
    assert_eq!(
        s.request(Method::GET, &url, &[], Bytes::new()).await.status,
        StatusCode::UNAUTHORIZED
    );
    let status = admin_pages(&s).await;
    let p1 = page_row(&status, "1001");
    assert_eq!(p1["budget"]["calls"], 10);
    assert_eq!(p1["budget"]["window_s"], 2.0);
    assert_eq!(p1["usage"]["call_count"], 10.0, "{status}");
    assert!(p1["paused_until"].is_null());
    assert_eq!(page_row(&status, "1002")["budget"]["calls"], 4);
    // Listed Pages have their own metric series; others do not.
    let m = s.admin_get("/metrics").await.text();
    assert_eq!(
        metric_value(
            &m,
            "graphgate_quota_page_usage_percent",
            &["page=\"1002\"", "metric=\"call_count\""]
        ),
        10.0
    );
    assert!(!m.contains("page=\"1001\""));
    stop(s).await;
}

#[tokio::test]
async fn the_page_header_is_honoured_only_for_pages_the_client_may_touch() {
    let s = stack("[quota]\npage_calls = 10\npage_window_s = 2\n").await;
    // A reader of 1001 cannot charge 1001's post to 1002: the header is ignored.
    let r = s
        .request(
            Method::GET,
            &format!("/1001_1?fields=id&access_token={READER_KEY}"),
            &[("x-graphgate-page", "1002")],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let status = admin_pages(&s).await;
    assert!(page_row(&status, "1001").is_object(), "{status}");
    assert!(page_row(&status, "1002").is_null(), "{status}");
    // /me is not a Page; the header charges it to 1002 for an unrestricted client.
    let r = s
        .request(
            Method::GET,
            &format!("/me?fields=id&access_token={ADMIN_KEY}"),
            &[("x-graphgate-page", "1002")],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header("ratelimit-policy"), Some("\"page\";q=9;w=2"));
    let status = admin_pages(&s).await;
    assert!(page_row(&status, "1002").is_object(), "{status}");
    stop(s).await;
}

async fn admin_pages(s: &Stack) -> serde_json::Value {
    let url = format!("{}/admin/pages", s.gw.admin_url());
    let r = s
        .request(
            Method::GET,
            &url,
            &[("authorization", "Bearer test-admin-token")],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()
}

fn page_row<'a>(status: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    status["pages"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["id"] == id))
        .unwrap_or(&serde_json::Value::Null)
}

/// Load report (not a pass/fail test): utilisation of the static budget under overload, and
/// the scheduler's cost per admitted call. Run with
/// `cargo test --release --test it quota::load_report -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn load_report() {
    // (true limit per 2 s, page_calls, slowdown threshold)
    for (true_limit, page_calls, threshold) in [(100, 70, 75), (100, 100, 100), (100, 100, 75)] {
        let graph = FakeGraphConfig {
            page_calls_limit: true_limit,
            page_window: WINDOW,
            ..graph_config()
        };
        let toml = format!(
            "[quota]\npage_calls = {page_calls}\npage_window_s = 2\nqueue_timeout_ms = 1000\n\
             max_queue_depth = 10000\nslowdown_threshold_pct = {threshold}\nthrottle_backoff_ms = 2000\n"
        );
        let s = Arc::new(Stack::start_with(graph, &toml).await);
        let run = Duration::from_secs(8);
        let started = Instant::now();
        let mut set = JoinSet::new();
        for w in 0..32u32 {
            let s = s.clone();
            set.spawn(async move {
                let mut n = w;
                while started.elapsed() < run {
                    let post = n % 60 + 1;
                    // A distinct key per request: repeated reads would be cache hits and
                    // never reach the scheduler.
                    s.get(&format!(
                        "/1001_{post}?fields=id&n={n}&access_token={ADMIN_KEY}"
                    ))
                    .await;
                    n += 32;
                }
            });
        }
        // Steady state only: from the end of the first window to the end of the run.
        tokio::time::sleep_until((started + WINDOW).into()).await;
        let ok = |st: &fake_graph::FakeGraphStats| st.calls - st.throttled;
        let (s1, t1) = (s.graph.stats(), Instant::now());
        tokio::time::sleep_until((started + run).into()).await;
        let (s2, t2) = (s.graph.stats(), Instant::now());
        while set.join_next().await.is_some() {}
        let span = (t2 - t1).as_secs_f64();
        let calls = ok(&s2) - ok(&s1);
        let budget = f64::from(page_calls) * span / WINDOW.as_secs_f64();
        println!(
            "true limit {true_limit}/2s, page_calls {page_calls}/2s, threshold {threshold}%: \
             {calls} calls in {span:.1} s of steady state = {:.1}% of the static budget, {} throttled in the whole run",
            100.0 * calls as f64 / budget,
            s.graph.stats().throttled
        );
        stop(s).await;
    }

    // Admission overhead: the inline path (budget available, nothing queued) plus learning.
    let cfg = graphgate::config::Config::from_toml(
        &gateway_toml(
            "http://127.0.0.1:9",
            "[quota]\npage_calls = 1000000000\npage_window_s = 1\n",
        ),
        |_| None,
    )
    .expect("config");
    let sched =
        graphgate::quota::Scheduler::new(&cfg.quota, Arc::new(graphgate::metrics::Metrics::new()));
    let reply = graphgate::upstream::Reply {
        status: StatusCode::OK,
        headers: vec![(
            http::HeaderName::from_static("x-business-use-case-usage"),
            http::HeaderValue::from_static(
                r#"{"1001":[{"type":"pages","call_count":5,"total_cputime":1,"total_time":1,"estimated_time_to_regain_access":0}]}"#,
            ),
        )],
        body: Bytes::from_static(b"{}"),
        hold: None,
    };
    let n = 200_000;
    let units = vec![Some("1001_1".to_string())];
    let t = Instant::now();
    for _ in 0..n {
        let charge = sched.charge_for(&units, None);
        let deadline = sched.deadline(None);
        let adm = sched
            .admit(&charge, graphgate::config::Priority::Interactive, deadline)
            .await
            .expect("admitted");
        sched.learn(&adm, &reply, Some("1001_1"));
    }
    println!(
        "admission + learning: {:.0} ns per call",
        t.elapsed().as_nanos() as f64 / f64::from(n)
    );
}
