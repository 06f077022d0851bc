//! Scale-out on Redis: two graphgate replicas, one simulated Graph API and a real
//! `redis-server` that each test starts on its own free port (never the machine's Redis on
//! 6379, never a mock) and kills at the end. The replicas share cache entries, Page budgets,
//! invalidations and fill leases; killing Redis degrades them to local behaviour without a
//! client ever seeing an error, and restarting it restores sharing.

use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fake_graph::{FakeGraph, FakeGraphConfig};
use graphgate::config::Config;
use graphgate::server::{self, Running};
use http::{Method, StatusCode};
use tokio::task::JoinSet;

use crate::support::*;

/// A `redis-server` owned by one test: its own port and directory, no persistence.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = StdListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let dir = std::env::temp_dir().join(format!(
            "graphgate-redis-{}-{port}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut r = RedisServer {
            port,
            dir,
            child: None,
        };
        r.restart();
        r
    }

    /// Starts (again) on the same port and waits until it accepts connections.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed to run these tests (.ci/run installs it)");
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < until, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL: no goodbye to the clients, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Two replicas in front of one fake Graph, sharing one Redis.
pub struct Fleet {
    pub graph: FakeGraph,
    pub a: Running,
    pub b: Running,
    pub http: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<Bytes>,
    >,
}

/// A timeout generous enough for a loaded 2-core machine running debug builds (the default
/// is 50 ms); the degradation test still sees Redis vanish at once (connections drop).
fn redis_toml(redis: &RedisServer, extra: &str) -> String {
    format!(
        "[redis]\nurl = \"{}\"\ntimeout_ms = 250\nkey_prefix = \"t:\"\n{extra}",
        redis.url()
    )
}

impl Fleet {
    async fn start(redis: &RedisServer, graph_cfg: FakeGraphConfig, extra: &str) -> Fleet {
        Fleet::start_with(&redis_toml(redis, extra), graph_cfg).await
    }

    /// Two replicas with this `[redis]` section (and whatever else `toml` sets).
    pub async fn start_with(toml: &str, graph_cfg: FakeGraphConfig) -> Fleet {
        let graph = FakeGraph::start(graph_cfg, "127.0.0.1:0".parse().unwrap())
            .await
            .expect("fake graph starts");
        let toml = gateway_toml(&graph.url(), toml);
        let a = server::start(Config::from_toml(&toml, |_| None).expect("valid config"))
            .await
            .expect("replica a starts");
        let b = server::start(Config::from_toml(&toml, |_| None).expect("valid config"))
            .await
            .expect("replica b starts");
        Fleet {
            graph,
            a,
            b,
            http: client(),
        }
    }

    fn secrets(&self) -> Vec<String> {
        secrets_of(&self.graph)
    }

    pub async fn get(&self, via: &Running, path: &str) -> Reply {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = format!("{}{path}{sep}access_token={ADMIN_KEY}", via.url());
        send(
            &self.http,
            Method::GET,
            &url,
            &[],
            Bytes::new(),
            &self.secrets(),
        )
        .await
    }

    /// The `n`th distinct read of Page 1001, through A for an even `n` and B for an odd one.
    pub async fn get_distinct(&self, n: u32) -> Reply {
        let via = if n.is_multiple_of(2) {
            &self.a
        } else {
            &self.b
        };
        let path =
            crate::quota::distinct("1001", n).replace(&format!("&access_token={ADMIN_KEY}"), "");
        self.get(via, &path).await
    }

    pub async fn post(&self, via: &Running, path: &str, form: &str) -> Reply {
        let url = format!("{}{path}", via.url());
        send(
            &self.http,
            Method::POST,
            &url,
            &[("content-type", "application/x-www-form-urlencoded")],
            Bytes::from(format!("{form}&access_token={ADMIN_KEY}")),
            &self.secrets(),
        )
        .await
    }

    pub async fn metrics(&self, via: &Running) -> String {
        let url = format!("{}/metrics", via.admin_url());
        send(&self.http, Method::GET, &url, &[], Bytes::new(), &[])
            .await
            .text()
    }

    pub async fn stop(self) {
        self.a.shutdown().await;
        self.b.shutdown().await;
        self.graph.shutdown();
    }
}

pub async fn wait_until_redis_up(f: &Fleet, via: &Running, within: Duration) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if metric_value(&f.metrics(via).await, "graphgate_redis_up", &[]) == 1.0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn a_read_through_one_replica_is_a_hit_on_the_other() {
    let redis = RedisServer::start();
    let f = Fleet::start(&redis, graph_config(), "").await;
    let path = "/1001?fields=id,name,fan_count";
    let first = f.get(&f.a, path).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    assert_eq!(first.header("x-cache"), Some("MISS"));

    let second = f.get(&f.b, path).await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.header("x-cache"), Some("HIT"));
    let cs = second.header("cache-status").unwrap_or_default();
    assert!(
        cs.starts_with("graphgate; hit;") && cs.contains("detail=l2"),
        "{cs}"
    );
    assert_eq!(second.body, first.body);
    assert_eq!(second.header("etag"), first.header("etag"));
    assert!(second.header("age").is_some());
    assert_eq!(
        f.graph.stats().requests,
        1,
        "one upstream call for the fleet"
    );

    // Promoted into B's L1: the next read does not even ask Redis.
    let third = f.get(&f.b, path).await;
    assert_eq!(third.header("x-cache"), Some("HIT"));
    assert!(!third
        .header("cache-status")
        .unwrap_or_default()
        .contains("l2"));
    let mb = f.metrics(&f.b).await;
    assert_eq!(
        metric_value(
            &mb,
            "graphgate_cache_lookups_total",
            &["tier=\"l2\"", "result=\"hit\""]
        ),
        1.0
    );
    assert_eq!(metric_value(&mb, "graphgate_redis_up", &[]), 1.0);
    assert_eq!(metric_value(&mb, "graphgate_redis_configured", &[]), 1.0);
    assert_eq!(metric_value(&mb, "graphgate_redis_errors_total", &[]), 0.0);
    f.stop().await;
}

#[tokio::test]
async fn no_meta_token_or_client_key_reaches_redis() {
    let redis = RedisServer::start();
    // Bodies stored plain, so a token in one would show in the dump below (compression
    // changes how a body is stored, not what it holds).
    let f = Fleet::start(&redis, graph_config(), "[cache]\ncompress = false\n").await;
    // A feed page with paging links (which carried the token upstream) and a Page read with
    // a Page token injected.
    assert_eq!(
        f.get(&f.a, "/1001/feed?fields=id,message&limit=2")
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        f.get(&f.a, "/1001?fields=id,name").await.status,
        StatusCode::OK
    );
    let out = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "--no-raw", "KEYS", "*"])
        .output();
    let Ok(out) = out else {
        panic!("redis-cli comes with redis-server and is needed to inspect the keyspace");
    };
    let keys = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(keys.contains(":c:"), "entries were stored: {keys}");
    let mut dump = keys.clone();
    for k in keys.lines() {
        let k = k.split_once(") ").map_or(k, |(_, k)| k).trim_matches('"');
        let v = Command::new("redis-cli")
            .args(["-p", &redis.port.to_string(), "GET", k])
            .output()
            .expect("redis-cli");
        dump.push_str(&String::from_utf8_lossy(&v.stdout));
    }
    for secret in f.secrets().iter().chain([&ADMIN_KEY.to_string()]) {
        assert!(!dump.contains(secret.as_str()), "a secret reached Redis");
    }
    f.stop().await;
}

#[tokio::test]
async fn a_flood_through_both_replicas_stays_within_one_page_budget() {
    const LIMIT: u32 = 10;
    let redis = RedisServer::start();
    // Graph allows a little more than page_calls (one call is 10 % of it, beyond what the
    // headroom absorbs): this test is about the replicas keeping to one budget.
    let graph = FakeGraphConfig {
        page_calls_limit: LIMIT + 2,
        page_window: Duration::from_secs(2),
        ..graph_config()
    };
    let f = Arc::new(
        Fleet::start(
            &redis,
            graph,
            "[quota]\npage_calls = 10\npage_window_s = 2\nqueue_timeout_ms = 4000\n",
        )
        .await,
    );
    let started = Instant::now();
    let mut set = JoinSet::new();
    for n in 1..=30u32 {
        let f = f.clone();
        set.spawn(async move {
            let via = if n % 2 == 0 { &f.a } else { &f.b };
            f.get(via, &format!("/v21.0/1001_{n}?fields=id")).await
        });
    }
    let mut ok = 0;
    while let Some(r) = set.join_next().await {
        let r = r.expect("request task");
        match r.status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert!(r.header("retry-after").is_some());
                assert_eq!(r.error_code(), 80001);
            }
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    let took = started.elapsed();
    let stats = f.graph.stats();
    assert_eq!(
        stats.throttled, 0,
        "no call over the Page's limit: {stats:?}"
    );
    assert!(ok >= LIMIT, "only {ok} of 30 went through");
    let (ma, mb) = (f.metrics(&f.a).await, f.metrics(&f.b).await);
    let dispatched =
        |m: &str| metric_value(m, "graphgate_quota_dispatches_total", &["bucket=\"page\""]);
    let (da, db) = (dispatched(&ma), dispatched(&mb));
    assert!(da > 0.0 && db > 0.0, "both replicas dispatched: {da} {db}");
    // Two independent replicas would each have used the full budget.
    let budget = f64::from(LIMIT) * (took.as_secs_f64() / 2.0 + 1.0);
    assert!(
        da + db <= budget,
        "{da} + {db} dispatches in {took:?} exceed {budget}"
    );
    assert_eq!(
        (da + db) as u64,
        stats.calls,
        "every dispatch reached Graph"
    );
    for m in [&ma, &mb] {
        assert!(
            metric_value(
                m,
                "graphgate_quota_admission_decisions_total",
                &["source=\"redis\""]
            ) > 0.0
        );
    }
    if let Ok(f) = Arc::try_unwrap(f) {
        f.stop().await;
    }
}

#[tokio::test]
async fn a_pause_learned_by_one_replica_holds_the_other() {
    let redis = RedisServer::start();
    let f = Fleet::start(&redis, graph_config(), "[quota]\nqueue_timeout_ms = 300\n").await;
    // Graph throttles A's call (80001, no regain time): A pauses Page 1001 for 5 s.
    f.graph.set_fault(fake_graph::Fault::GraphError {
        code: 80001,
        http_status: 400,
    });
    let r = f.get(&f.a, "/1001_1?fields=id").await;
    assert_ne!(r.status, StatusCode::OK);
    f.graph.set_fault(fake_graph::Fault::None);
    let before = f.graph.stats().requests;
    // B never saw a throttle, yet refuses to send for the paused Page (429 within its
    // 300 ms deadline) instead of calling Graph.
    let until = Instant::now() + Duration::from_secs(1);
    let mut held = false;
    while Instant::now() < until && !held {
        let r = f.get(&f.b, "/1001_2?fields=id").await;
        held = r.status == StatusCode::TOO_MANY_REQUESTS;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(held, "B did not honour A's pause");
    assert_eq!(f.graph.stats().requests, before, "B sent nothing upstream");
    // Another Page is not affected.
    assert_eq!(
        f.get(&f.b, "/1002_1?fields=id").await.status,
        StatusCode::OK
    );
    f.stop().await;
}

#[tokio::test]
async fn a_write_through_one_replica_is_seen_by_the_other_within_a_second() {
    let redis = RedisServer::start();
    let f = Fleet::start(&redis, graph_config(), "").await;
    let post = "/1001_60?fields=message";
    let feed = "/1001/feed?fields=id,message&limit=3";
    for path in [post, feed] {
        f.get(&f.a, path).await;
        // B holds its own copy in L1 (promoted from L2).
        f.get(&f.b, path).await;
        assert_eq!(f.get(&f.b, path).await.header("x-cache"), Some("HIT"));
    }
    let w = f.post(&f.a, "/1001_60", "message=edited+via+A").await;
    assert_eq!(w.status, StatusCode::OK, "{}", w.text());
    let written = Instant::now();
    let mut fresh = false;
    while written.elapsed() < Duration::from_secs(1) {
        let p = f.get(&f.b, post).await;
        if p.json()["message"] == "edited via A" {
            fresh = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        fresh,
        "B still served the old post a second after the write"
    );
    // The Page's feed was dropped on B too (a post edit invalidates its Page's edges).
    let fb = f.get(&f.b, feed).await;
    assert_ne!(fb.header("x-cache"), Some("HIT"), "{:?}", fb.headers);

    // A new post via B; A's feed follows.
    f.get(&f.a, feed).await;
    let w = f.post(&f.b, "/1001/feed", "message=posted+via+B").await;
    assert_eq!(w.status, StatusCode::OK, "{}", w.text());
    let written = Instant::now();
    let mut seen = false;
    while written.elapsed() < Duration::from_secs(1) {
        if f.get(&f.a, feed).await.json()["data"][0]["message"] == "posted via B" {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen, "A did not see B's new post within a second");
    let ma = f.metrics(&f.a).await;
    assert!(metric_value(&ma, "graphgate_redis_invalidations_received_total", &[]) >= 1.0);

    // An admin purge on A empties B's L1 as well.
    f.get(&f.b, "/1002?fields=name").await;
    let url = format!("{}/admin/cache/purge?all=true", f.a.admin_url());
    let r = send(
        &f.http,
        Method::POST,
        &url,
        &[("authorization", "Bearer test-admin-token")],
        Bytes::new(),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let until = Instant::now() + Duration::from_secs(1);
    let mut purged = false;
    while Instant::now() < until && !purged {
        purged = f.get(&f.b, "/1002?fields=name").await.header("x-cache") == Some("MISS");
        if !purged {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(purged, "B kept an entry A's purge-all dropped");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_miss_on_both_replicas_makes_one_upstream_call() {
    let redis = RedisServer::start();
    let f = Arc::new(Fleet::start(&redis, graph_config(), "").await);
    f.graph.set_latency(Duration::from_millis(300));
    let mut set = JoinSet::new();
    for i in 0..100 {
        let f = f.clone();
        set.spawn(async move {
            let via = if i % 2 == 0 { &f.a } else { &f.b };
            f.get(via, "/1002?fields=id,name,about").await
        });
    }
    let mut replies = Vec::new();
    while let Some(r) = set.join_next().await {
        replies.push(r.expect("request task"));
    }
    assert_eq!(
        f.graph.stats().requests,
        1,
        "one Graph call for 100 reads on 2 replicas"
    );
    for r in &replies {
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.body, replies[0].body);
    }
    // One replica filled; the other waited on its lease and got the entry through Redis.
    let mut waited = 0.0;
    for via in [&f.a, &f.b] {
        let m = f.metrics(via).await;
        waited += metric_value(
            &m,
            "graphgate_cache_lease_waits_total",
            &["outcome=\"filled\""],
        );
    }
    assert_eq!(waited, 1.0);
    let remote = replies
        .iter()
        .filter(|r| {
            r.header("cache-status")
                .is_some_and(|v| v.contains("detail=l2"))
        })
        .count();
    assert!(
        remote >= 1,
        "the other replica's requests were answered from Redis"
    );
    if let Ok(f) = Arc::try_unwrap(f) {
        f.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_redis_mid_flood_loses_nothing_and_a_restart_restores_sharing() {
    let mut redis = RedisServer::start();
    let graph = FakeGraphConfig {
        page_calls_limit: 100_000,
        ..graph_config()
    };
    let f = Arc::new(
        Fleet::start(
            &redis,
            graph,
            "[quota]\npage_calls = 100000\npage_window_s = 60\nqueue_timeout_ms = 5000\n",
        )
        .await,
    );
    f.graph.set_latency(Duration::from_millis(20));
    let mut set = JoinSet::new();
    for i in 0..240u32 {
        let f = f.clone();
        set.spawn(async move {
            // Spread over ~1.2 s: Redis dies in the middle.
            tokio::time::sleep(Duration::from_millis(u64::from(i) * 5)).await;
            let via = if i % 2 == 0 { &f.a } else { &f.b };
            // Repeated keys (shared hits, coalescing) and distinct ones (budget admissions).
            let path = if i % 3 == 0 {
                format!("/1001_{}?fields=id,message", i % 7 + 1)
            } else {
                format!("/1002_{}?fields=id", i % 60 + 1)
            };
            f.get(via, &path).await
        });
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    redis.kill();
    let mut count = 0;
    while let Some(r) = set.join_next().await {
        let r = r.expect("request task");
        assert!(
            r.status == StatusCode::OK || r.status == StatusCode::TOO_MANY_REQUESTS,
            "{}: {}",
            r.status,
            r.text()
        );
        count += 1;
    }
    assert_eq!(count, 240, "every request was answered");
    for via in [&f.a, &f.b] {
        // A replica that needed Redis noticed at once; an idle one at its next heartbeat.
        let until = Instant::now() + Duration::from_secs(3);
        while metric_value(&f.metrics(via).await, "graphgate_redis_up", &[]) != 0.0 {
            assert!(Instant::now() < until, "redis_up stayed 1 after Redis died");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let m = f.metrics(via).await;
        assert_eq!(
            metric_value(&m, "graphgate_requests_total", &["status_class=\"5xx\""]),
            0.0
        );
    }
    // Alone, each replica still serves (L1, local budget).
    assert_eq!(
        f.get(&f.a, "/1002?fields=id,fan_count").await.status,
        StatusCode::OK
    );

    redis.restart();
    assert!(wait_until_redis_up(&f, &f.a, Duration::from_secs(10)).await);
    assert!(wait_until_redis_up(&f, &f.b, Duration::from_secs(10)).await);
    let before = f.graph.stats().requests;
    let path = "/1001?fields=id,about,category";
    assert_eq!(f.get(&f.a, path).await.header("x-cache"), Some("MISS"));
    let b = f.get(&f.b, path).await;
    assert_eq!(b.header("x-cache"), Some("HIT"), "{:?}", b.headers);
    assert_eq!(f.graph.stats().requests, before + 1, "sharing is back");
    // Invalidations flow again once the subscriber is back.
    let mut seen = false;
    let until = Instant::now() + Duration::from_secs(5);
    while !seen && Instant::now() < until {
        let w = f.post(&f.a, "/1001", "about=after+restart").await;
        assert_eq!(w.status, StatusCode::OK, "{}", w.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
        seen = f.get(&f.b, path).await.json()["about"] == "after restart";
    }
    assert!(seen, "B did not see A's write after Redis came back");
    if let Ok(f) = Arc::try_unwrap(f) {
        f.stop().await;
    }
}

#[tokio::test]
async fn without_redis_at_start_a_replica_serves_and_joins_when_redis_appears() {
    let mut redis = RedisServer::start();
    redis.kill();
    let f = Fleet::start(&redis, graph_config(), "").await;
    let r = f.get(&f.a, "/1001?fields=id").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        metric_value(&f.metrics(&f.a).await, "graphgate_redis_up", &[]),
        0.0
    );
    redis.restart();
    assert!(wait_until_redis_up(&f, &f.a, Duration::from_secs(10)).await);
    assert!(wait_until_redis_up(&f, &f.b, Duration::from_secs(10)).await);
    f.get(&f.a, "/1002?fields=id").await;
    assert_eq!(
        f.get(&f.b, "/1002?fields=id").await.header("x-cache"),
        Some("HIT")
    );
    f.stop().await;
}

#[tokio::test]
async fn a_full_redis_costs_sharing_never_a_reply() {
    let redis = RedisServer::start();
    let f = Fleet::start(&redis, graph_config(), "").await;
    // Every write is now refused with OOM (reads still work).
    let out = Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "CONFIG",
            "SET",
            "maxmemory",
            "1",
        ])
        .output()
        .expect("redis-cli");
    assert!(out.status.success());
    for via in [&f.a, &f.b, &f.a, &f.b] {
        let r = f.get(via, "/1001_5?fields=id,message").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    let r = f.post(&f.a, "/1001_5", "message=still+fine").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let ma = f.metrics(&f.a).await;
    // Still "up": a full Redis is not an outage, each refused write falls back on its own.
    assert_eq!(metric_value(&ma, "graphgate_redis_up", &[]), 1.0);
    assert!(metric_value(&ma, "graphgate_redis_errors_total", &["op=\"lease\""]) >= 1.0);
    assert!(
        metric_value(
            &ma,
            "graphgate_quota_admission_decisions_total",
            &["source=\"local\""]
        ) >= 1.0
    );
    assert_eq!(
        metric_value(&ma, "graphgate_requests_total", &["status_class=\"5xx\""]),
        0.0
    );
    f.stop().await;
}

/// The window of the simulated Graph in the fleet's flood tests.
const FLOOD_WINDOW: Duration = Duration::from_secs(2);

/// Two replicas sharing a Redis in front of a Graph that takes 100 calls per
/// [`FLOOD_WINDOW`] on Page 1001, with `page_calls` as given, and distinct reads of that
/// Page sent through them in turn at 150 a second for `windows` windows: the Redis, the
/// replicas, and the load's replies to await.
async fn flood_two_replicas(
    page_calls: u32,
    windows: u32,
) -> (RedisServer, Arc<Fleet>, tokio::task::JoinHandle<Vec<Reply>>) {
    let redis = RedisServer::start();
    let graph = FakeGraphConfig {
        page_calls_limit: 100,
        page_window: FLOOD_WINDOW,
        ..graph_config()
    };
    let quota = format!(
        "[quota]\npage_calls = {page_calls}\npage_window_s = {}\nqueue_timeout_ms = 3000\n",
        FLOOD_WINDOW.as_secs()
    );
    let f = Arc::new(Fleet::start(&redis, graph, &quota).await);
    let load = {
        let f = f.clone();
        tokio::spawn(crate::quota::drive(
            150.0,
            FLOOD_WINDOW * windows,
            move |n| {
                let f = f.clone();
                async move { f.get_distinct(n).await }
            },
        ))
    };
    (redis, f, load)
}

/// Three times the budget through two replicas for four windows: together they keep to
/// one budget (nothing throttled) and use nearly all of it, as one replica would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_under_overload_share_one_budget_and_use_nearly_all_of_it() {
    const LIMIT: u32 = 100;
    let window = FLOOD_WINDOW;
    let (_redis, f, load) = flood_two_replicas(LIMIT, 4).await;
    let per_window = crate::quota::answered_per_window(&f.graph, window, 4).await;
    for r in load.await.expect("load") {
        assert!(
            r.status == StatusCode::OK || r.status == StatusCode::TOO_MANY_REQUESTS,
            "{}: {}",
            r.status,
            r.text()
        );
    }
    let stats = f.graph.stats();
    assert_eq!(stats.throttled, 0, "{stats:?}");
    for n in &per_window[1..] {
        assert!(*n as f64 >= 0.9 * f64::from(LIMIT), "{per_window:?}");
    }
    let (ma, mb) = (f.metrics(&f.a).await, f.metrics(&f.b).await);
    for m in [&ma, &mb] {
        let redis_decided = metric_value(
            m,
            "graphgate_quota_admission_decisions_total",
            &["source=\"redis\""],
        );
        assert!(redis_decided > 20.0, "{redis_decided}");
    }
    if let Ok(f) = Arc::try_unwrap(f) {
        f.stop().await;
    }
}

/// The same backlog as `quota::a_backlog_meeting_page_calls_ten_times_too_high_…`, through
/// both replicas: the fleet holds it until all of the window's first calls are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_through_two_replicas_meeting_page_calls_far_too_high_is_not_throttled() {
    backlog_through_two_replicas(0, 30).await;
}

/// The same on a Page other apps use (20 of its 100 calls): the fleet's groups bound the
/// limit by how far they moved the usage, and the limit stays down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_through_two_replicas_on_a_page_other_apps_use_is_not_throttled() {
    backlog_through_two_replicas(20, 15).await;
}

/// 300 calls at once through both replicas to a Page that takes 100 per 10 s (`others` of
/// them other apps'), with `page_calls` ten times too high: at most 2 throttled, at least
/// `answered` answered within the 1.5 s deadline.
async fn backlog_through_two_replicas(others: u64, answered: usize) {
    const LIMIT: u32 = 100;
    let redis = RedisServer::start();
    let graph = FakeGraphConfig {
        page_calls_limit: LIMIT,
        page_window: Duration::from_secs(10),
        latency: Duration::from_millis(20),
        ..graph_config()
    };
    let f = Arc::new(Fleet::start(&redis, graph, crate::quota::BACKLOG_TOML).await);
    f.graph.set_other_usage("1001", others);
    let mut set = tokio::task::JoinSet::new();
    for n in 0..300u32 {
        let f = f.clone();
        set.spawn(async move { f.get_distinct(n).await });
    }
    let mut replies = Vec::new();
    while let Some(r) = set.join_next().await {
        replies.push(r.expect("request task"));
    }
    let (ok, _) = crate::quota::assert_ok_or_429(&replies);
    let stats = f.graph.stats();
    assert!(stats.throttled <= 2, "{stats:?}");
    assert!(ok >= answered, "{ok} answered, {stats:?}");
    if let Ok(f) = Arc::try_unwrap(f) {
        f.stop().await;
    }
}

/// The fleet's state in Redis learns from whole groups of calls too: bursts through both
/// replicas while other apps use a few percent of the Page all go at once (the readings of a
/// burst in flight once lowered the fleet's limit to a few dozen calls and held the Page).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_through_two_replicas_while_other_apps_use_the_page_all_go_at_once() {
    let redis = RedisServer::start();
    let graph = FakeGraphConfig {
        page_calls_limit: 4800,
        page_window: Duration::from_secs(3600),
        latency: Duration::from_millis(50),
        ..graph_config()
    };
    let f = Arc::new(Fleet::start(&redis, graph, "").await);
    f.graph.set_omit_zero_usage(true);
    let first = f.get(&f.a, "/1001_1?fields=id&n=0").await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    f.graph.set_other_usage("1001", 240);
    for round in 1..=3u32 {
        let mut set = JoinSet::new();
        for k in 0..200u32 {
            let f = f.clone();
            set.spawn(async move {
                let via = if k % 2 == 0 { &f.a } else { &f.b };
                f.get(
                    via,
                    &format!("/1001_{}?fields=id&n={}", k % 60 + 1, round * 1000 + k),
                )
                .await
            });
        }
        let mut replies = Vec::new();
        while let Some(r) = set.join_next().await {
            replies.push(r.expect("request task"));
        }
        let (ok, limited) = crate::quota::assert_ok_or_429(&replies);
        assert_eq!((ok, limited), (200, 0), "burst {round}");
    }
    assert_eq!(f.graph.stats().throttled, 0);
    if let Ok(f) = Arc::try_unwrap(f) {
        f.stop().await;
    }
}

/// The fleet's state follows its own groups of calls in flight together, whichever replica
/// sent them, so it learns as much from a burst as one replica would (each replica's group
/// counts only its own calls, which proves half as much). Driven on the shared budgets
/// directly, with no replica passing a group bound of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleets_own_groups_of_calls_bound_the_limit() {
    use graphgate::graph::usage::Usage;
    use graphgate::metrics::Metrics;
    use graphgate::quota::budget::{Limits, Observation};
    use graphgate::quota::shared::{FleetParams, SharedBudgets};
    use graphgate::quota::BucketKey;
    use graphgate::redis_conn::RedisConn;

    let redis = RedisServer::start();
    let toml = gateway_toml("http://127.0.0.1:9", &redis_toml(&redis, ""));
    let cfg = Config::from_toml(&toml, |_| None).expect("valid config");
    let conn = RedisConn::new(&cfg.redis, Arc::new(Metrics::new())).expect("redis link");
    conn.start().await;
    let fleet = SharedBudgets::new(conn, None);
    let limits = Limits {
        guess: 4800,
        window: Duration::from_secs(3600),
        headroom_pct: 2.0,
        threshold_pct: 60.0,
        learn: false,
    };
    let params = FleetParams::from(limits);
    let reply = |pct: f64| Observation {
        usage: Some(Usage {
            call_count: pct,
            ..Usage::default()
        }),
        answered: true,
        ..Observation::default()
    };
    let rtt = Some(Duration::from_millis(50));
    // Sends `n` calls together and answers each at the usage Meta shows once they all
    // arrived: `pct(calls of ours so far)`.
    let burst = |key: BucketKey, n: u32, pct: fn(u32) -> f64, sent: u32, params: FleetParams| {
        let fleet = fleet.clone();
        async move {
            let mut tickets = Vec::new();
            for _ in 0..n {
                let d = fleet.admit(&key, 1, params).await.expect("Redis decides");
                assert!(d.granted, "{d:?}");
                tickets.push(d.ticket);
            }
            for t in tickets {
                let obs = reply(pct(sent + n));
                fleet.observe(&key, Some(t), rtt, &obs, None, params).await;
            }
        }
    };
    let limit = |key: BucketKey, params: FleetParams| {
        let fleet = fleet.clone();
        async move { fleet.peek(&key, params).await.expect("Redis answers").limit }
    };

    // A Page whose true limit is 100: twenty calls in flight together, all answered at 20 %,
    // prove a limit above 100·20/21 (a single reading proves nothing: Meta may have answered
    // it before counting the others); 20 % says at most 100·20/19.5 with nobody else on the
    // Page. The bounds agree, so the guess (4800) comes down.
    let alone = BucketKey::Page("2001".into());
    burst(
        alone.clone(),
        20,
        |ours| f64::from(ours * 100 / 100),
        0,
        params,
    )
    .await;
    let learned = limit(alone, params).await;
    assert!((95.0..=96.0).contains(&learned), "{learned}");

    // A Page with a limit of 4800 where other apps have used 240 calls (5 %): ten calls at
    // 5 % look like a Page of ~200 with nobody else on it, but the next ten, still at 5 %,
    // prove a limit above 100·20/6 = 333: other apps use the Page, and the guess stands.
    let shared_page = BucketKey::Page("2002".into());
    let busy = |ours: u32| f64::from((240 + ours) * 100 / 4800);
    burst(shared_page.clone(), 10, busy, 0, params).await;
    burst(shared_page.clone(), 10, busy, 10, params).await;
    let kept = limit(shared_page, params).await;
    assert_eq!(kept, 4800.0);

    // A Page whose true limit is 400, where other apps keep 80 calls (20 %); no slowdown
    // below 98 %, so both groups go at once. Forty calls at 30 % look like a limit of about
    // 130 with nobody else on the Page; the next 36, at 39 %, prove a limit above
    // 100·76/40 = 190, far above the first upper bound, so the upper bounds go. But from the
    // reading in force when they started (30 %, at most 40 of ours) they moved the usage 9
    // points (less than 10.5 with rounding): the limit is above 100·36/10.5 = 343, and the
    // guess, more than twice that, is far too high. The limit stays down.
    let eager = FleetParams::from(Limits {
        threshold_pct: 98.0,
        ..limits
    });
    let crowded = BucketKey::Page("2003".into());
    let crowded_usage = |ours: u32| f64::from((80 + ours) * 100 / 400);
    burst(crowded.clone(), 40, crowded_usage, 0, eager).await;
    burst(crowded.clone(), 36, crowded_usage, 40, eager).await;
    let lowered = limit(crowded, eager).await;
    assert!((340.0..=400.0).contains(&lowered), "{lowered}");
}

/// With `learn_limits`, a limit learned from the readings of both replicas' calls is the
/// fleet's: page_calls ten times too low does not hold the fleet back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_learns_a_limit_above_page_calls_with_learn_limits() {
    const LIMIT: u32 = 60;
    // Long windows, as the single-replica overload tests: on a loaded machine a 2 s window
    // is shifted by a large part of itself.
    let window = crate::quota::LONG_WINDOW;
    let redis = RedisServer::start();
    let graph = FakeGraphConfig {
        page_calls_limit: LIMIT,
        page_window: window,
        ..graph_config()
    };
    let f = Arc::new(
        Fleet::start(
            &redis,
            graph,
            &crate::quota::long_window_toml("page_calls = 6\nlearn_limits = true\n"),
        )
        .await,
    );
    let load = {
        let f = f.clone();
        // Three times the limit, for three windows.
        tokio::spawn(crate::quota::drive(18.0, window * 3, move |n| {
            let f = f.clone();
            async move { f.get_distinct(n).await }
        }))
    };
    let per_window = crate::quota::answered_per_window(&f.graph, window, 3).await;
    load.await.expect("load");
    assert_eq!(f.graph.stats().throttled, 0);
    for n in &per_window[1..] {
        assert!(*n as f64 >= 0.8 * f64::from(LIMIT), "{per_window:?}");
    }
    if let Ok(f) = Arc::try_unwrap(f) {
        f.stop().await;
    }
}

async fn pages_status(f: &Fleet, via: &Running) -> serde_json::Value {
    let url = format!("{}/admin/pages", via.admin_url());
    let r = send(
        &f.http,
        Method::GET,
        &url,
        &[("authorization", "Bearer test-admin-token")],
        Bytes::new(),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()
}

/// Cut off from Redis, a replica decides alone on its share of each budget, and the share
/// comes from the replicas it last saw alive (heartbeats in Redis), not a fixed fraction.
#[tokio::test]
async fn cut_off_from_redis_each_replica_uses_its_share_from_the_live_replica_count() {
    let mut redis = RedisServer::start();
    let graph = FakeGraphConfig {
        page_calls_limit: 1000,
        ..graph_config()
    };
    let f = Fleet::start(
        &redis,
        graph,
        "[quota]\npage_calls = 10\npage_window_s = 60\nqueue_timeout_ms = 200\n",
    )
    .await;
    let until = Instant::now() + Duration::from_secs(5);
    while pages_status(&f, &f.a).await["local_share"] != 0.5 {
        assert!(Instant::now() < until, "replica A never saw two replicas");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    redis.kill();
    let until = Instant::now() + Duration::from_secs(3);
    while metric_value(&f.metrics(&f.a).await, "graphgate_redis_up", &[]) != 0.0 {
        assert!(Instant::now() < until, "redis_up stayed 1");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = pages_status(&f, &f.a).await;
    assert_eq!(status["decided_by"], "local");
    assert_eq!(status["local_share"], 0.5);
    // page_calls 10 per minute: replica A alone counts its calls against its half, so 3
    // calls are 60 % (the threshold), and it never goes beyond 5.
    let mut ok = 0;
    for n in 0..12 {
        let r = f
            .get(&f.a, &format!("/1001_{}?fields=id&n={n}", n + 1))
            .await;
        match r.status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {}
            other => panic!("{other}: {}", r.text()),
        }
    }
    assert!((3..=5).contains(&ok), "{ok}");
    let status = pages_status(&f, &f.a).await;
    let row = status["pages"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["id"] == "1001"))
        .cloned()
        .unwrap_or_default();
    let usage = row["estimate"]["usage"].as_f64().unwrap_or(0.0);
    assert!(usage >= 0.2 * ok as f64 - 1e-9, "{row}");
    f.stop().await;
}

/// An app-level throttle (code 4) seen by one replica closes every replica's app gate: the
/// other holds its Page calls instead of sending them into the throttle.
#[tokio::test]
async fn an_app_throttle_seen_by_one_replica_holds_every_call_of_the_other() {
    let redis = RedisServer::start();
    let f = Fleet::start(&redis, graph_config(), "[quota]\nqueue_timeout_ms = 300\n").await;
    f.graph.set_fault(fake_graph::Fault::GraphError {
        code: 4,
        http_status: 403,
    });
    let r = f.get(&f.a, "/1001_1?fields=id").await;
    assert_ne!(r.status, StatusCode::OK);
    f.graph.set_fault(fake_graph::Fault::None);
    let before = f.graph.stats().requests;
    // B learns the pause at its next fleet tick, then holds Page calls (429 within its
    // 300 ms deadline) instead of calling Graph.
    let until = Instant::now() + Duration::from_secs(2);
    let mut held = false;
    while Instant::now() < until && !held {
        tokio::time::sleep(Duration::from_millis(300)).await;
        held = f.get(&f.b, "/1002_2?fields=id").await.status == StatusCode::TOO_MANY_REQUESTS;
    }
    assert!(held, "B did not honour A's app throttle");
    let sent = f.graph.stats().requests - before;
    assert!(
        sent <= 1,
        "{sent} of B's calls reached Graph during the app pause"
    );
    assert_eq!(
        metric_value(&f.metrics(&f.b).await, "graphgate_quota_app_paused", &[]),
        1.0
    );
    f.stop().await;
}

/// `ids=` and batch reads are answered member by member from the Redis tier too: members one
/// replica fetched are hits on the other, and the members an `ids=` or batch call fetched
/// serve single reads fleet-wide.
#[tokio::test]
async fn ids_and_batch_members_are_shared_through_redis() {
    let redis = RedisServer::start();
    let f = Fleet::start(&redis, graph_config(), "").await;
    let ids = "/?ids=1001,1002&fields=id,name";
    let first = f.get(&f.a, ids).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    assert_eq!(f.graph.stats().requests, 1);
    // B has nothing in-process: both members come from Redis.
    let second = f.get(&f.b, ids).await;
    assert_eq!(second.status, StatusCode::OK, "{}", second.text());
    assert_eq!(
        second.header("x-cache"),
        Some("HIT"),
        "{:?}",
        second.headers
    );
    assert_eq!(second.json(), first.json());
    // A member fetched by an ids= call serves a single read on the other replica.
    let single = f.get(&f.b, "/1002?fields=id,name").await;
    assert_eq!(single.header("x-cache"), Some("HIT"));
    assert_eq!(single.json(), first.json()["1002"]);
    assert_eq!(
        f.graph.stats().requests,
        1,
        "one upstream call for the fleet"
    );

    // A read-only batch on A, then the same operations on B: answered from Redis.
    let batch = serde_json::json!([
        {"method": "GET", "relative_url": "1001_7?fields=id,message"},
        {"method": "GET", "relative_url": "1002_8?fields=id,message"},
    ])
    .to_string();
    let form = format!(
        "batch={}",
        percent_encoding::utf8_percent_encode(&batch, percent_encoding::NON_ALPHANUMERIC)
    );
    let a = f.post(&f.a, "/", &form).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(f.graph.stats().requests, 2);
    let b = f.post(&f.b, "/", &form).await;
    assert_eq!(b.status, StatusCode::OK, "{}", b.text());
    assert_eq!(b.header("x-cache"), Some("HIT"), "{:?}", b.headers);
    // The same operations' answers (per-call headers such as usage are not replayed).
    let answers = |r: &Reply| -> Vec<(serde_json::Value, serde_json::Value)> {
        r.json()
            .as_array()
            .expect("a batch reply is an array")
            .iter()
            .map(|op| (op["code"].clone(), op["body"].clone()))
            .collect()
    };
    assert_eq!(answers(&b), answers(&a));
    assert_eq!(
        f.graph.stats().requests,
        2,
        "the batch was answered from Redis"
    );
    let mb = f.metrics(&f.b).await;
    assert!(
        metric_value(
            &mb,
            "graphgate_cache_lookups_total",
            &["tier=\"l2\"", "result=\"hit\""]
        ) >= 4.0,
        "{mb}"
    );
    f.stop().await;
}

/// A replica that sent few of the fleet's calls must not judge the Page by its own count: its
/// readings show the other replica's calls as usage it cannot explain. Above the slowdown
/// threshold the fleet paces calls a second or two apart; a call on the quiet replica waits
/// for its turn and goes, rather than being turned away with a wait only the quiet replica's
/// own view predicts (its oldest call leaving the window, a minute away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_replica_waits_as_long_as_the_fleet_says() {
    let redis = RedisServer::start();
    let graph = FakeGraphConfig {
        page_calls_limit: 100,
        page_window: Duration::from_secs(60),
        ..graph_config()
    };
    let f = Fleet::start(
        &redis,
        graph,
        "[quota]\npage_calls = 100\npage_window_s = 60\n",
    )
    .await;
    for n in 0..59 {
        let r = f
            .get(&f.b, &format!("/1001_{}?fields=id&n={n}", n % 7 + 1))
            .await;
        assert_eq!(r.status, StatusCode::OK, "call {n} via b: {}", r.text());
    }
    // The fleet is just under the threshold: the first call through a goes at once, the
    // second one waits for the fleet's pacing (the Page has ~38 calls of room left).
    for n in 0..2 {
        let r = f
            .get(&f.a, &format!("/1001_{}?fields=id&n=a{n}", n + 1))
            .await;
        assert_eq!(r.status, StatusCode::OK, "call {n} via a: {}", r.text());
    }
    assert_eq!(f.graph.stats().throttled, 0);
    f.stop().await;
}

/// Redis dies in the middle of a flood with `page_calls` ten times too high: each replica
/// goes on alone with its half, learning its limit from its own calls, and keeps using the
/// Page without sending a flood into Meta's throttle. (The simulated steward's test,
/// `replicas_deciding_alone_under_overload_…`, shows the flood this guards against.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_redis_in_a_flood_with_page_calls_far_too_high_does_not_throttle_the_page() {
    const LIMIT: u32 = 100;
    const WINDOWS: u32 = 7;
    let window = FLOOD_WINDOW;
    let (mut redis, f, load) = flood_two_replicas(LIMIT * 10, WINDOWS).await;
    // (answered, throttled) per window; Redis dies at the end of the third.
    let start = tokio::time::Instant::now();
    let mut per_window = Vec::new();
    let mut before = f.graph.stats();
    for k in 1..=WINDOWS {
        tokio::time::sleep_until(start + window * k).await;
        if k == 3 {
            redis.kill();
        }
        let now = f.graph.stats();
        let throttled = now.throttled - before.throttled;
        per_window.push((now.calls - before.calls - throttled, throttled));
        before = now;
    }
    crate::quota::assert_ok_or_429(&load.await.expect("load"));
    let alone = &per_window[3..];
    let throttled: u64 = alone.iter().map(|w| w.1).sum();
    assert!(throttled <= 2 * alone.len() as u64, "{per_window:?}");
    for (answered, _) in &per_window[1..] {
        assert!(*answered as f64 >= 0.9 * f64::from(LIMIT), "{per_window:?}");
    }
    for via in [&f.a, &f.b] {
        let m = f.metrics(via).await;
        for source in ["redis", "local"] {
            let decided = metric_value(
                &m,
                "graphgate_quota_admission_decisions_total",
                &[&format!("source=\"{source}\"")],
            );
            assert!(decided > 20.0, "{source}: {decided}");
        }
    }
    if let Ok(f) = Arc::try_unwrap(f) {
        f.stop().await;
    }
}
