//! The per-Page quota steward against the simulated Graph API, which enforces a rolling-window
//! limit per Page (short windows here: 2 s; 10 s where calls are counted per window under
//! sustained overload) and answers 80001 beyond it. Assertions are about outcomes counted by
//! the simulated Graph (calls answered, calls throttled) and by graphgate's own counters,
//! never tight timings.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fake_graph::{FakeGraph, FakeGraphConfig, Fault};
use http::{Method, StatusCode};
use tokio::task::JoinSet;

use crate::support::*;

const WINDOW: Duration = Duration::from_secs(2);
/// The window of the tests that count calls answered per window under sustained overload:
/// long enough that what a loaded machine shifts (calls sent late, a window measured late,
/// calls leaving graphgate's count half a long round trip late) is a small part of it, at a
/// request rate such a machine keeps up with.
pub const LONG_WINDOW: Duration = Duration::from_secs(10);
/// The settings of those tests: `quota` keys, a 6 s queue deadline, an upstream
/// timeout (not what they are about) well above what a loaded machine takes to answer, and
/// within the test client's 20 s.
pub fn long_window_toml(quota: &str) -> String {
    format!(
        "[quota]\n{quota}page_window_s = 10\nqueue_timeout_ms = 6000\n\
         [upstream]\ntimeout_ms = 10000\n"
    )
}

/// A simulated Graph allowing `limit` calls per Page per `window`.
fn graph(limit: u32, window: Duration) -> FakeGraphConfig {
    FakeGraphConfig {
        page_calls_limit: limit,
        page_window: window,
        ..graph_config()
    }
}

async fn stack(graph: FakeGraphConfig, quota_toml: &str) -> Arc<Stack> {
    Arc::new(Stack::start_with(graph, quota_toml).await)
}

async fn stop(s: Arc<Stack>) {
    if let Ok(s) = Arc::try_unwrap(s) {
        s.stop().await;
    }
}

/// A GET of one of `page`'s posts no cache can fold into another (`n` makes it distinct).
pub fn distinct(page: &str, n: u32) -> String {
    format!(
        "/v21.0/{page}_{}?fields=id&n={n}&access_token={ADMIN_KEY}",
        n % 60 + 1
    )
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

/// Sends `send(n)` for n = 0, 1, … at `per_second` for `run`, each in its own task, and
/// collects the replies. Overload is demand above the limit, not a one-off burst.
pub async fn drive<F, Fut>(per_second: f64, run: Duration, send: F) -> Vec<Reply>
where
    F: Fn(u32) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
{
    let send = Arc::new(send);
    let started = tokio::time::Instant::now();
    let mut set = JoinSet::new();
    let mut n = 0u32;
    loop {
        let at = started + Duration::from_secs_f64(f64::from(n) / per_second);
        if at - started >= run {
            break;
        }
        tokio::time::sleep_until(at).await;
        let send = send.clone();
        set.spawn(async move { send(n).await });
        n += 1;
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.expect("request task"));
    }
    out
}

/// Distinct reads of Page 1001 at `per_second` for `windows` long windows: the calls the
/// simulated Graph answered in each window, and the load's replies to await.
async fn flood_page_1001(
    s: &Arc<Stack>,
    per_second: f64,
    windows: u32,
) -> (Vec<u64>, tokio::task::JoinHandle<Vec<Reply>>) {
    let load = {
        let s = s.clone();
        tokio::spawn(drive(per_second, LONG_WINDOW * windows, move |n| {
            let s = s.clone();
            async move { s.get(&distinct("1001", n)).await }
        }))
    };
    let per_window = answered_per_window(&s.graph, LONG_WINDOW, windows).await;
    (per_window, load)
}

/// Calls the simulated Graph answered without a throttle code.
fn answered(g: &FakeGraph) -> u64 {
    let s = g.stats();
    s.calls - s.throttled
}

/// Calls answered in each of `windows` consecutive windows of `window` from now, while the
/// caller's load runs.
pub async fn answered_per_window(g: &FakeGraph, window: Duration, windows: u32) -> Vec<u64> {
    let start = tokio::time::Instant::now();
    let mut out = Vec::new();
    let mut before = answered(g);
    for k in 1..=windows {
        tokio::time::sleep_until(start + window * k).await;
        let now = answered(g);
        out.push(now - before);
        before = now;
    }
    out
}

/// Every reply is a success or graphgate's own 429 (Retry-After, RateLimit headers).
pub fn assert_ok_or_429(replies: &[Reply]) -> (usize, usize) {
    let mut ok = 0;
    let mut limited = 0;
    for r in replies {
        match r.status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert_graphgate_429(r);
                limited += 1;
            }
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    (ok, limited)
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
    assert!(
        policy.starts_with("\"page\";q=") || policy.starts_with("\"app\";q="),
        "{policy}"
    );
    let ratelimit = r.header("ratelimit").unwrap_or_default();
    assert!(
        ratelimit.ends_with(&format!(";r=0;t={retry_after}")),
        "{ratelimit}"
    );
    let v = r.json();
    assert_eq!(v["error"]["code"], 80001);
    assert_eq!(v["error"]["is_transient"], true);
    let sub = v["error"]["error_subcode"].as_i64().unwrap_or(0);
    assert!(sub == 2_446_010 || sub == 2_446_011, "{sub}");
    retry_after
}

async fn metrics(s: &Stack) -> String {
    s.admin_get("/metrics").await.text()
}

/// Calls that had to queue for quota, whatever the reason.
fn waits(m: &str) -> f64 {
    metric_value(m, "graphgate_quota_waits_total", &[])
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

/// Meta's Page budget as the default config assumes it (4800 per hour), Meta's habit of
/// leaving the usage headers out near 0 %, and a Graph that takes `latency` to answer.
async fn default_stack(latency: Duration) -> Arc<Stack> {
    let s = stack(
        FakeGraphConfig {
            latency,
            ..graph(4800, Duration::from_secs(3600))
        },
        "",
    )
    .await;
    s.graph.set_omit_zero_usage(true);
    s
}

#[tokio::test]
async fn sequential_distinct_gets_at_low_usage_go_at_once_with_the_default_config() {
    let s = default_stack(Duration::ZERO).await;
    for n in 0..200 {
        let r = s.get(&distinct("1001", n)).await;
        assert_eq!(r.status, StatusCode::OK, "call {n}: {}", r.text());
    }
    assert_eq!(s.graph.stats().calls, 200);
    let m = metrics(&s).await;
    assert_eq!(waits(&m), 0.0, "a call queued at ~4 % usage");
    assert_eq!(
        metric_value(&m, "graphgate_quota_rejections_total", &[]),
        0.0
    );
    let row = page_row(&admin_pages(&s).await, "1001").clone();
    assert_eq!(row["state"], "open", "{row}");
    assert_eq!(row["estimate"]["calls_in_window"], 200);
    assert_eq!(row["estimate"]["limit"], 4800.0);
    stop(s).await;
}

/// `n` distinct GETs of Page 1001 at once (numbers from `first`): how many were answered 200
/// and how many got graphgate's 429.
async fn burst_of(s: &Arc<Stack>, first: u32, n: u32) -> (usize, usize) {
    let mut set = JoinSet::new();
    for k in first..first + n {
        let s = s.clone();
        set.spawn(async move { s.get(&distinct("1001", k)).await });
    }
    let mut replies = Vec::new();
    while let Some(r) = set.join_next().await {
        replies.push(r.expect("request task"));
    }
    assert_ok_or_429(&replies)
}

#[tokio::test]
async fn two_hundred_concurrent_gets_at_one_percent_usage_are_all_sent_at_once() {
    let s = default_stack(Duration::from_millis(50)).await;
    // 1 % of the Page's budget used (the reading arrives with the last of these).
    for n in 0..48 {
        assert_eq!(s.get(&distinct("1001", n)).await.status, StatusCode::OK);
    }
    s.graph.reset_stats();
    assert_eq!(burst_of(&s, 100, 200).await, (200, 0));
    let stats = s.graph.stats();
    assert_eq!(stats.calls, 200);
    // Not capped to a handful in flight: most of the burst was at Graph together.
    assert!(stats.max_in_flight >= 100, "{stats:?}");
    assert_eq!(waits(&metrics(&s).await), 0.0);
    stop(s).await;
}

#[tokio::test]
async fn bursts_while_other_apps_use_a_few_percent_of_the_page_all_go_at_once() {
    let s = default_stack(Duration::from_millis(50)).await;
    assert_eq!(s.get(&distinct("1001", 0)).await.status, StatusCode::OK);
    // Other apps take 5 % of the Page after our first call. Each burst's readings show more
    // usage than its own calls; none of them may lower the limit to a few dozen calls (which
    // held the Page for the rest of the hour).
    s.graph.set_other_usage("1001", 240);
    for round in 0..3 {
        let (ok, limited) = burst_of(&s, 1000 * (round + 1), 200).await;
        assert_eq!((ok, limited), (200, 0), "burst {round}");
    }
    let row = page_row(&admin_pages(&s).await, "1001").clone();
    assert_eq!(row["state"], "open", "{row}");
    stop(s).await;
}

#[tokio::test]
async fn a_page_other_apps_already_use_is_paced_only_until_a_burst_settles_the_limit() {
    let s = default_stack(Duration::from_millis(50)).await;
    // Other apps hold 5 % before our first call, whose reading alone looks like a limit of
    // about twenty calls: the next bursts are paced until their readings tell the two apart.
    s.graph.set_other_usage("1001", 240);
    assert_eq!(s.get(&distinct("1001", 0)).await.status, StatusCode::OK);
    let mut paced = 0;
    for round in 1.. {
        let (ok, limited) = burst_of(&s, 1000 * round, 200).await;
        assert!(ok >= 1, "burst {round}: nothing went");
        if limited == 0 {
            break;
        }
        paced += 1;
        assert!(paced <= 3, "burst {round}: {limited} of 200 still refused");
    }
    assert_eq!(burst_of(&s, 9000, 200).await, (200, 0));
    assert_eq!(s.graph.stats().throttled, 0);
    stop(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_calls_equal_to_the_true_limit_use_nearly_all_of_it_under_overload_without_throttles()
{
    // One call is 1 % of the limit, within the 2 % headroom.
    const LIMIT: u32 = 100;
    let s = stack(
        graph(LIMIT, LONG_WINDOW),
        &long_window_toml("page_calls = 100\n"),
    )
    .await;
    // Three times the budget, for four windows.
    let (per_window, load) = flood_page_1001(&s, 30.0, 4).await;
    let replies = load.await.expect("load");
    let (ok, limited) = assert_ok_or_429(&replies);
    let stats = s.graph.stats();
    assert_eq!(stats.throttled, 0, "{stats:?}");
    assert!(limited > 0, "3x overload must be refused in part");
    for n in &per_window[1..] {
        assert!(
            *n as f64 >= 0.9 * f64::from(LIMIT),
            "answered per window {per_window:?} (ok {ok}, 429 {limited})"
        );
    }
    let m = metrics(&s).await;
    assert!(metric_value(&m, "graphgate_quota_waits_total", &["reason=\"pacing\""]) > 0.0);
    stop(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_calls_ten_times_too_high_are_lowered_by_the_readings_without_a_fixed_backoff() {
    // 100 calls per 10 s: one call is 1 % of the limit, within the 2 % headroom.
    const LIMIT: u32 = 100;
    let s = stack(
        graph(LIMIT, LONG_WINDOW),
        &long_window_toml("page_calls = 1000\n"),
    )
    .await;
    // Three times the budget, for three windows.
    let (per_window, load) = flood_page_1001(&s, 30.0, 3).await;
    let row = page_row(&admin_pages(&s).await, "1001").clone();
    let replies = load.await.expect("load");
    assert_ok_or_429(&replies);
    let stats = s.graph.stats();
    assert!(stats.throttled <= 6, "{stats:?}");
    let used: u64 = per_window.iter().sum();
    assert!(
        used as f64 >= 0.8 * f64::from(3 * LIMIT),
        "{per_window:?} {stats:?}"
    );
    assert_eq!(
        row["estimate"]["limit_source"], "lowered_by_readings",
        "{row}"
    );
    let limit = row["estimate"]["limit"].as_f64().unwrap_or(0.0);
    assert!(limit <= f64::from(LIMIT) + 1.0, "{row}");
    stop(s).await;
}

/// The settings of the backlog tests: `page_calls` ten times too high, a short queue deadline
/// (the backlog is many windows long; the tests are about its first moments).
pub const BACKLOG_TOML: &str = "[quota]\npage_calls = 1000\npage_window_s = 10\n\
                                queue_timeout_ms = 1500\n[upstream]\ntimeout_ms = 10000\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_meeting_page_calls_ten_times_too_high_is_not_sent_into_a_throttle() {
    // Three windows' worth of calls wait when the Page's window opens. The first calls go
    // blind; their replies come back a few ms apart, and the first counts only its own call:
    // letting the backlog go on it would send most of `page_calls` to a Page that takes a
    // tenth. The rest wait until all of the first calls are back.
    backlog_meeting_page_calls_ten_times_too_high(0, 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_on_a_page_other_apps_use_is_not_sent_into_a_throttle() {
    // Other apps keep 20 of the Page's 100 calls. Their usage makes the first groups' lower
    // bounds exceed the upper bounds, which assume nobody else uses the Page, and those are
    // dropped; the limit used to go back to `page_calls` and the backlog went (142 of 300
    // throttled). How far the first groups moved the usage keeps the limit down.
    backlog_meeting_page_calls_ten_times_too_high(20, 15).await;
}

/// 300 calls at once to a Page that takes 100 per 10 s (`others` of them other apps'),
/// with `page_calls` ten times too high: at most 2 throttled, at least `answered` answered
/// within the 1.5 s deadline.
async fn backlog_meeting_page_calls_ten_times_too_high(others: u64, answered: usize) {
    const LIMIT: u32 = 100;
    let graph = FakeGraphConfig {
        latency: Duration::from_millis(20),
        ..graph(LIMIT, LONG_WINDOW)
    };
    let s = stack(graph, BACKLOG_TOML).await;
    s.graph.set_other_usage("1001", others);
    let (ok, _) = burst_of(&s, 0, 300).await;
    let stats = s.graph.stats();
    assert!(stats.throttled <= 2, "{stats:?}");
    assert!(ok >= answered, "{ok} answered, {stats:?}");
    stop(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_calls_ten_times_too_low_with_learn_limits_learn_the_limit() {
    const LIMIT: u32 = 60;
    let s = stack(
        graph(LIMIT, LONG_WINDOW),
        &long_window_toml("page_calls = 6\nlearn_limits = true\n"),
    )
    .await;
    // Three times the limit, for three windows.
    let (per_window, load) = flood_page_1001(&s, 18.0, 3).await;
    let row = page_row(&admin_pages(&s).await, "1001").clone();
    let replies = load.await.expect("load");
    assert_ok_or_429(&replies);
    assert_eq!(s.graph.stats().throttled, 0);
    for n in &per_window[1..] {
        assert!(*n as f64 >= 0.8 * f64::from(LIMIT), "{per_window:?}");
    }
    assert_eq!(row["estimate"]["limit_source"], "learned", "{row}");
    assert!(row["estimate"]["limit"].as_f64().unwrap_or(0.0) >= 0.8 * f64::from(LIMIT));
    stop(s).await;
}

#[tokio::test]
async fn without_learn_limits_page_calls_stays_the_ceiling() {
    let s = stack(
        graph(60, WINDOW),
        "[quota]\npage_calls = 6\npage_window_s = 2\nqueue_timeout_ms = 1000\n",
    )
    .await;
    let replies = flood(&s, "1001", 1..31, &[]).await;
    let (ok, _) = assert_ok_or_429(&replies);
    // 6 per 2 s: within the 1 s deadline only the first window's worth.
    assert!((1..=6).contains(&ok), "{ok}");
    assert_eq!(s.graph.stats().calls, ok as u64);
    stop(s).await;
}

#[tokio::test]
async fn usage_of_other_apps_on_the_page_counts_as_consumed() {
    // A window far longer than the 1.5 s deadline: on a loaded machine the flood could
    // otherwise straddle two of Graph's windows, and the second has room again.
    let s = stack(
        graph(20, LONG_WINDOW),
        "[quota]\npage_calls = 20\npage_window_s = 10\nqueue_timeout_ms = 1500\n",
    )
    .await;
    // Other apps hold 15 of the Page's 20 calls.
    s.graph.set_other_usage("1001", 15);
    let replies = flood(&s, "1001", 1..21, &[]).await;
    let (ok, _) = assert_ok_or_429(&replies);
    let stats = s.graph.stats();
    assert!(stats.throttled <= 1, "{stats:?}");
    assert!((1..=5).contains(&ok), "{ok}");
    stop(s).await;
}

#[tokio::test]
async fn a_throttle_code_pauses_the_page_and_the_get_is_retried_after_the_pause() {
    const LIMIT: u32 = 10;
    let s = stack(
        graph(LIMIT, WINDOW),
        "[quota]\npage_calls = 1000\npage_window_s = 2\nqueue_timeout_ms = 10000\n",
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
    let m = metrics(&s).await;
    assert!(metric_value(&m, "graphgate_quota_requeues_total", &[]) >= 1.0);
    assert!(metric_value(&m, "graphgate_quota_throttles_total", &["scope=\"page\""]) >= 1.0);
    stop(s).await;
}

#[tokio::test]
async fn writes_that_are_throttled_are_not_resent() {
    const LIMIT: u32 = 10;
    let s = stack(
        graph(LIMIT, WINDOW),
        "[quota]\npage_calls = 1000\npage_window_s = 2\n",
    )
    .await;
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
    // Graph allows a little more than page_calls: where one call is 10 % of the limit, the
    // headroom cannot absorb a call counted a moment late, and this test is about fairness.
    let s = stack(
        graph(12, WINDOW),
        "[quota]\npage_calls = 10\npage_window_s = 2\nqueue_timeout_ms = 8000\n",
    )
    .await;
    let backlog = {
        let s = s.clone();
        tokio::spawn(async move { flood(&s, "1001", 1..41, &[]).await })
    };
    // Let the backlog build up.
    let mut depth_1001 = 0;
    for _ in 0..100 {
        depth_1001 = page_row(&admin_pages(&s).await, "1001")["queue_depth"]
            .as_u64()
            .unwrap_or(0);
        if depth_1001 > 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(depth_1001 > 10, "no backlog on 1001");

    let started = Instant::now();
    let quiet = flood(&s, "1002", 1..4, &[]).await;
    let took = started.elapsed();
    for r in &quiet {
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    // On its own budget Page 1002's three calls go at once; a shared queue would have put
    // them behind 1001's backlog (seconds).
    assert!(
        took < Duration::from_millis(1500),
        "Page 1002 waited {took:?}"
    );
    let still_queued = page_row(&admin_pages(&s).await, "1001")["queue_depth"]
        .as_u64()
        .unwrap_or(0);
    assert!(still_queued > 0, "the backlog should still be there");

    let replies = backlog.await.expect("backlog task");
    assert_ok_or_429(&replies);
    assert_eq!(s.graph.stats().throttled, 0);
    stop(s).await;
}

#[tokio::test]
async fn the_deadline_header_and_max_queue_depth_give_429_with_retry_after() {
    // 2 calls per 2 s: once both are out, the next fits only when they leave the window.
    let s = stack(
        graph(10, WINDOW),
        "[quota]\npage_calls = 2\npage_window_s = 2\nqueue_timeout_ms = 10000\nmax_queue_depth = 3\n",
    )
    .await;
    for n in 1..=2 {
        let r = s
            .get(&format!("/1001_{n}?fields=id&access_token={ADMIN_KEY}"))
            .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    // The next slot is about 2 s away: a client that waits at most 50 ms is told so.
    let r = s
        .request(
            Method::GET,
            &format!("/1001_3?fields=id&access_token={ADMIN_KEY}"),
            &[("x-graphgate-max-wait-ms", "50")],
            Bytes::new(),
        )
        .await;
    let retry_after = assert_graphgate_429(&r);
    assert!(retry_after <= 3, "{retry_after}");
    assert_eq!(r.json()["error"]["error_subcode"], 2_446_010);

    // Fill the queue (3 waiters), then one more is refused at once as queue_full.
    let waiting = {
        let s = s.clone();
        tokio::spawn(async move { flood(&s, "1001", 4..7, &[]).await })
    };
    let mut depth = 0;
    for _ in 0..100 {
        depth = page_row(&admin_pages(&s).await, "1001")["queue_depth"]
            .as_u64()
            .unwrap_or(0);
        if depth == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(depth, 3);
    let status = admin_pages(&s).await;
    let row = page_row(&status, "1001");
    assert_eq!(row["waiting"]["reason"], "full", "{row}");
    let r = s
        .get(&format!("/1001_8?fields=id&access_token={ADMIN_KEY}"))
        .await;
    let retry_after = assert_graphgate_429(&r);
    assert_eq!(r.json()["error"]["error_subcode"], 2_446_011);
    // Three calls ahead at 2 per 2 s.
    assert!((2..=8).contains(&retry_after), "{retry_after}");
    for r in waiting.await.expect("waiters") {
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    let m = metrics(&s).await;
    let rejected = |reason: &str| {
        metric_value(
            &m,
            "graphgate_quota_rejections_total",
            &[&format!("reason=\"{reason}\"")],
        )
    };
    assert_eq!(rejected("queue_full"), 1.0);
    assert_eq!(rejected("queue_timeout"), 1.0);
    assert_eq!(s.graph.stats().throttled, 0);
    stop(s).await;
}

#[tokio::test]
async fn interactive_calls_overtake_queued_batch_calls_of_the_same_page() {
    // One worker, so one pool of upstream connections: the call admitted first also reaches
    // Graph first (with a pool per worker, the other worker might first have to connect).
    let extra = format!(
        "[server]\nworkers = 1\n[quota]\npage_calls = 2\npage_window_s = 2\n[[clients]]\nname = \"admin\"\nkey = \"{ADMIN_KEY}\"\npages = [\"*\"]\nwrite = true\n\
         [[clients]]\nname = \"reader\"\nkey = \"{READER_KEY}\"\npages = [\"1001\"]\npriority = \"batch\"\n"
    );
    let s = stack(graph(10, WINDOW), &extra).await;
    // Take both slots, then queue two batch calls.
    for n in [1, 2] {
        s.get(&format!("/1001_{n}?fields=id&access_token={READER_KEY}"))
            .await;
    }
    let batch = {
        let s = s.clone();
        tokio::spawn(async move {
            let mut set = JoinSet::new();
            for n in [3, 4] {
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
    for _ in 0..100 {
        if page_row(&admin_pages(&s).await, "1001")["queue_depth"].as_u64() == Some(2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = s
        .get(&format!("/1001_5?fields=id&access_token={ADMIN_KEY}"))
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
async fn admin_pages_shows_the_estimate_and_needs_the_admin_token() {
    let s = stack(
        graph(10, WINDOW),
        "[quota]\npage_calls = 10\npage_window_s = 2\n[[quota.pages]]\nid = \"1002\"\npage_calls = 4\n",
    )
    .await;
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
    assert_eq!(p1["budget"]["threshold"], 0.6);
    assert_eq!(p1["usage"]["call_count"], 10.0, "{status}");
    assert_eq!(p1["estimate"]["calls_in_window"], 1);
    assert_eq!(p1["estimate"]["usage"], 0.1);
    assert_eq!(p1["estimate"]["limit"], 10.0);
    assert_eq!(p1["estimate"]["limit_source"], "page_calls");
    assert_eq!(p1["state"], "open");
    assert!(p1["waiting"].is_null());
    assert!(p1["paused_until"].is_null());
    assert_eq!(page_row(&status, "1002")["budget"]["calls"], 4);
    assert_eq!(status["buckets"], 2);
    // Listed Pages and the busiest others have their own series, by default.
    let m = metrics(&s).await;
    let series = |page: &str, name: &str| metric_value(&m, name, &[&format!("page=\"{page}\"")]);
    assert_eq!(
        metric_value(
            &m,
            "graphgate_quota_page_usage_percent",
            &["page=\"1002\"", "metric=\"call_count\""]
        ),
        10.0
    );
    assert_eq!(series("1001", "graphgate_quota_page_usage_ratio"), 0.1);
    assert_eq!(series("1001", "graphgate_quota_page_estimated_limit"), 10.0);
    assert_eq!(series("1001", "graphgate_quota_page_calls_in_window"), 1.0);
    assert_eq!(series("1001", "graphgate_quota_page_paused"), 0.0);
    assert_eq!(metric_value(&m, "graphgate_quota_buckets", &[]), 2.0);
    stop(s).await;
}

#[tokio::test]
async fn per_page_series_cover_the_busiest_pages_and_drop_those_that_leave_the_top() {
    let s = stack(
        graph(100, WINDOW),
        "[quota]\npage_calls = 100\npage_window_s = 2\nmetrics_top_pages = 2\n[[quota.pages]]\nid = \"1002\"\n",
    )
    .await;
    // Unknown Pages still cost a call each: 2001 busiest, then 2002, 2003; 1002 is listed.
    for (page, calls) in [("2001", 4), ("2002", 3), ("2003", 1)] {
        for n in 0..calls {
            s.get(&format!("/{page}?fields=id&n={n}&access_token={ADMIN_KEY}"))
                .await;
        }
    }
    let m = metrics(&s).await;
    let has = |m: &str, page: &str| {
        m.lines().any(|l| {
            l.starts_with("graphgate_quota_page_calls_in_window")
                && l.contains(&format!("page=\"{page}\""))
        })
    };
    assert!(has(&m, "2001") && has(&m, "2002") && has(&m, "1002"), "{m}");
    assert!(!has(&m, "2003"));
    // Once the window is over, the top is empty: only the listed Page keeps its series.
    tokio::time::sleep(WINDOW + Duration::from_millis(200)).await;
    let m = metrics(&s).await;
    assert!(has(&m, "1002"));
    assert!(!has(&m, "2001") && !has(&m, "2002"), "{m}");
    stop(s).await;
}

#[tokio::test]
async fn the_page_header_is_honoured_only_for_pages_the_client_may_touch() {
    let s = stack(
        graph(10, WINDOW),
        "[quota]\npage_calls = 10\npage_window_s = 2\n",
    )
    .await;
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

/// A key for every Page reads 2,000 distinct node ids while Graph throttles the app (code
/// 4): the bucket table stays within `max_buckets`, the app-level throttle holds every call
/// (Page-attributed ones too) so almost nothing more reaches Graph, and once Graph recovers
/// one probe reopens the gate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_distinct_ids_under_an_app_throttle_stays_bounded_and_stops_at_the_gate() {
    const WORKERS: u32 = 16;
    let s = stack(
        graph(1_000_000, Duration::from_secs(10)),
        "[quota]\npage_calls = 100000\npage_window_s = 10\nmax_buckets = 200\nqueue_timeout_ms = 300\n",
    )
    .await;
    s.graph.set_fault(Fault::GraphError {
        code: 4,
        http_status: 403,
    });
    let next = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut set = JoinSet::new();
    for _ in 0..WORKERS {
        let (s, next) = (s.clone(), next.clone());
        set.spawn(async move {
            let mut statuses = Vec::new();
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= 2000 {
                    return statuses;
                }
                let r = s
                    .get(&format!(
                        "/{}?fields=id&access_token={ADMIN_KEY}",
                        3_000_000 + n
                    ))
                    .await;
                statuses.push((r.status, r.error_code()));
            }
        });
    }
    let mut held = 0;
    while let Some(r) = set.join_next().await {
        for (status, code) in r.expect("worker") {
            match (status, code) {
                (StatusCode::TOO_MANY_REQUESTS, 80001) => held += 1,
                // Graph's own answer for the calls that were already out.
                (StatusCode::FORBIDDEN, 4) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    let sent = s.graph.stats().requests;
    // Only the calls in flight when the first code 4 came back, plus one probe per pause.
    assert!(sent <= u64::from(WORKERS) + 8, "{sent} calls reached Graph");
    assert!(held >= 1900, "{held}");
    let m = metrics(&s).await;
    let buckets = metric_value(&m, "graphgate_quota_buckets", &[]);
    assert!(buckets <= 200.0 + f64::from(WORKERS) + 16.0, "{buckets}");
    assert_eq!(metric_value(&m, "graphgate_quota_app_paused", &[]), 1.0);
    assert!(
        metric_value(
            &m,
            "graphgate_quota_waits_total",
            &["reason=\"app_paused\""]
        ) >= 1.0
    );
    let status = admin_pages(&s).await;
    assert!(
        status["app_paused_until"].is_u64(),
        "{}",
        status["app_paused_until"]
    );

    // Graph recovers: after the pause one probe goes, then calls flow again. The probe is a
    // call charged to two Pages: it passes the gate once, not once per Page.
    s.graph.set_fault(Fault::None);
    let mut ok = false;
    let until = Instant::now() + Duration::from_secs(10);
    while !ok && Instant::now() < until {
        let r = s
            .get(&format!(
                "/?ids=1001,1002&fields=id&access_token={ADMIN_KEY}"
            ))
            .await;
        ok = r.status == StatusCode::OK;
        if !ok {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(ok, "the gate never reopened");
    assert_eq!(
        s.get(&format!("/1002?fields=id&access_token={ADMIN_KEY}"))
            .await
            .status,
        StatusCode::OK
    );
    stop(s).await;
}
