//! The quota steward under load, measured side by side with direct calls in one run, over
//! loopback sockets: the simulated Graph API (50 ms latency, a rolling per-Page limit) and
//! graphgate started by the bench, and for the fleet runs two replicas sharing a
//! `redis-server` the bench starts on a free port.
//!
//! - low usage with the default `[quota]`: 200 sequential distinct GETs and a 200-call burst,
//!   each through graphgate and directly to the simulated Graph; added p50 and 429s;
//! - three times the budget on one Page for four windows, with `page_calls` right, ten times
//!   too high, ten times too low with `learn_limits`, and ten times too high on a Page other
//!   apps use a fifth of: calls answered per window as a share of the true budget (of what
//!   the other apps leave), and calls Graph throttled;
//! - the same through two replicas sharing Redis;
//! - a quiet Page's latency (p50, p99) alone and while another Page floods.
//!
//! `cargo bench --bench quota_load` runs it all (about five minutes) and prints a report;
//! under `cargo test` (no `--bench` argument) it runs a short smoke version. See
//! benches/README.md for the figures on the project machine. `QUOTA_UPSTREAM=tls` serves the
//! simulated Graph over TLS (HTTP/2 by ALPN, as graph.facebook.com), for graphgate and for
//! the direct calls alike; the calls to graphgate stay plain HTTP/1.1.

mod common;

/// The allocator the graphgate binary runs with (tuned in `main` as there), so the figures
/// are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::TcpListener as StdListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{CLIENT_KEY, SYSTEM_TOKEN};
use fake_graph::{FakeGraph, FakeGraphConfig};
use graphgate::server::{self, Running};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinSet;

const LATENCY: Duration = Duration::from_millis(50);

type Http = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The bench's own CA and the simulated Graph's certificate, with `QUOTA_UPSTREAM=tls`.
struct UpstreamTls {
    ca_pem: String,
    ca_file: std::path::PathBuf,
    cert_pem: String,
    key_pem: String,
}

fn upstream_tls() -> Option<&'static UpstreamTls> {
    static TLS: std::sync::OnceLock<Option<UpstreamTls>> = std::sync::OnceLock::new();
    TLS.get_or_init(|| {
        if std::env::var("QUOTA_UPSTREAM").ok()? != "tls" {
            return None;
        }
        // Asked for TLS: a failure here stops the bench rather than measuring plain HTTP.
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let ca = rcgen::CertifiedIssuer::self_signed(ca, ca_key).expect("CA");
        let mut leaf =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("leaf params");
        leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let cert = leaf.signed_by(&key, &ca).expect("leaf certificate");
        let ca_file =
            std::env::temp_dir().join(format!("quota-load-ca-{}.pem", std::process::id()));
        std::fs::write(&ca_file, ca.pem()).expect("CA file");
        Some(UpstreamTls {
            ca_pem: ca.pem(),
            ca_file,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    })
    .as_ref()
}

/// The bench's client: plain HTTP, and HTTPS (HTTP/2 or HTTP/1.1 by ALPN) trusting the
/// bench's CA for direct calls to a TLS Graph.
fn http() -> Http {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    if let Some(tls) = upstream_tls() {
        for c in CertificateDer::pem_slice_iter(tls.ca_pem.as_bytes()) {
            roots.add(c.expect("CA pem")).expect("CA cert");
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .build();
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(512)
        .build(connector)
}

/// GET `url`: status and time to the whole body.
async fn get(http: &Http, url: &str) -> (StatusCode, Duration) {
    let started = Instant::now();
    let req = Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("request");
    match http.request(req).await {
        Ok(resp) => {
            let status = resp.status();
            let _ = resp.into_body().collect().await;
            (status, started.elapsed())
        }
        Err(_) => (StatusCode::BAD_GATEWAY, started.elapsed()),
    }
}

async fn fake_graph(limit: u32, window: Duration) -> FakeGraph {
    let cfg = FakeGraphConfig {
        page_calls_limit: limit,
        page_window: window,
        app_calls_limit: u32::MAX / 2,
        latency: LATENCY,
        tls: upstream_tls().map(|t| fake_graph::FakeGraphTls {
            cert_pem: t.cert_pem.clone(),
            key_pem: t.key_pem.clone(),
        }),
        ..common::credentials().graph_config()
    };
    let g = FakeGraph::start(cfg, "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("fake graph starts");
    g.set_record_limit(0);
    // As Meta: no usage headers near 0 %.
    g.set_omit_zero_usage(true);
    g
}

/// graphgate in front of `graph`, `quota` as the whole `[quota]` table (empty: defaults).
async fn gateway(graph: &FakeGraph, quota: &str, redis: Option<&str>) -> Running {
    let redis = redis.map_or(String::new(), |url| {
        format!("[redis]\nurl = \"{url}\"\ntimeout_ms = 250\nkey_prefix = \"bench:\"\n")
    });
    let ca_file = upstream_tls().map_or(String::new(), |t| {
        format!("ca_file = \"{}\"", t.ca_file.display())
    });
    // QUOTA_WORKER_SLICE_US overrides `server.worker_slice_us`, to compare within one build.
    let slice = std::env::var("QUOTA_WORKER_SLICE_US")
        .map_or(String::new(), |us| format!("worker_slice_us = {us}"));
    // Not common::config: the quota here is the bench's subject, defaults unless given.
    let extra = format!(
        r#"
[server]
max_in_flight = 100000
max_connections = 100000
{slice}
[upstream]
timeout_ms = 10000
{ca_file}
[quota]
{quota}
{redis}
"#
    );
    let config = common::credentials()
        .gateway_config(&graph.url(), &extra)
        .expect("bench config is valid");
    server::start(config).await.expect("graphgate starts")
}

/// A read no cache can fold into another.
fn through(gw: &Running, page: &str, n: u64) -> String {
    format!(
        "{}/v21.0/{page}_{}?fields=id&n={n}&access_token={CLIENT_KEY}",
        gw.url(),
        n % 60 + 1
    )
}

fn direct(graph: &FakeGraph, page: &str, n: u64) -> String {
    let proof = graph.proof_for(SYSTEM_TOKEN).unwrap_or_default();
    format!(
        "{}/v21.0/{page}_{}?fields=id&n={n}&access_token={SYSTEM_TOKEN}&appsecret_proof={proof}",
        graph.url(),
        n % 60 + 1
    )
}

async fn get_text(http: &Http, url: &str) -> String {
    let req = Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("request");
    match http.request(req).await {
        Ok(resp) => resp
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// The sum of the samples of every series in a Prometheus text page that starts `prefix`.
fn metric_sum(page: &str, prefix: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i.min(samples.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Latencies of `n` calls made one after another, alternating graphgate and direct.
async fn sequential(http: &Http, gw: &Running, graph: &FakeGraph, n: u64) -> [Vec<Duration>; 2] {
    let (mut via, mut dir) = (Vec::new(), Vec::new());
    let mut limited = 0;
    for i in 0..n {
        let (s, d) = get(http, &through(gw, "1001", 10_000 + i)).await;
        limited += u32::from(s == StatusCode::TOO_MANY_REQUESTS);
        assert!(
            s == StatusCode::OK || s == StatusCode::TOO_MANY_REQUESTS,
            "{s}"
        );
        via.push(d);
        let (s, d) = get(http, &direct(graph, "1001", 20_000 + i)).await;
        assert_eq!(s, StatusCode::OK);
        dir.push(d);
    }
    println!("    429 through graphgate: {limited}");
    [via, dir]
}

/// CPU time and time spent waiting to run (ns, /proc/self/task/*/schedstat) of this
/// process's threads since they started, summed by role: graphgate's workers, and everything
/// else (the bench's runtime, which runs the client and the simulated Graph, and its main
/// thread). Empty where that is not readable.
fn thread_times() -> std::collections::BTreeMap<&'static str, (u64, u64)> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("schedstat")),
        ) else {
            continue;
        };
        let role = if comm.starts_with("graphgate-") {
            "graphgate"
        } else {
            "client and Graph"
        };
        let mut f = stat
            .split_whitespace()
            .map(|v| v.parse::<u64>().unwrap_or(0));
        let e = out.entry(role).or_insert((0, 0));
        e.0 += f.next().unwrap_or(0);
        e.1 += f.next().unwrap_or(0);
    }
    out
}

/// CPU and wait per call of each role since `before` (a [`thread_times`] reading).
fn thread_use(before: &std::collections::BTreeMap<&'static str, (u64, u64)>, calls: u64) -> String {
    let per_call = |ns: u64| ns as f64 / 1e3 / calls as f64;
    thread_times()
        .iter()
        .filter_map(|(role, (cpu, wait))| {
            let (c0, w0) = before.get(role).copied().unwrap_or_default();
            let cpu = cpu.saturating_sub(c0);
            (cpu > 0).then(|| {
                format!(
                    "{role} {:.1} µs CPU ({:.1} µs waiting to run)",
                    per_call(cpu),
                    per_call(wait.saturating_sub(w0))
                )
            })
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Latencies of `n` calls sent at once (each from the burst's start).
async fn burst(http: &Http, urls: Vec<String>) -> (Vec<Duration>, u32) {
    let mut set = JoinSet::new();
    for url in urls {
        let http = http.clone();
        set.spawn(async move { get(&http, &url).await });
    }
    let (mut out, mut limited) = (Vec::new(), 0);
    while let Some(r) = set.join_next().await {
        let (s, d) = r.expect("task");
        limited += u32::from(s == StatusCode::TOO_MANY_REQUESTS);
        out.push(d);
    }
    (out, limited)
}

async fn low_usage(quick: bool) {
    let n: u64 = if quick { 20 } else { 200 };
    println!("== low usage, default [quota] (4800 calls / 3600 s), Graph at 4800 / 3600 s, {} ms latency", LATENCY.as_millis());
    let graph = fake_graph(4800, Duration::from_secs(3600)).await;
    let gw = gateway(&graph, "", None).await;
    let http = http();
    // Warm connections on both paths.
    for i in 0..4 {
        get(&http, &through(&gw, "1002", i)).await;
        get(&http, &direct(&graph, "1002", i)).await;
    }
    let t0 = thread_times();
    let [mut via, mut dir] = sequential(&http, &gw, &graph, n).await;
    println!(
        "    sequential {n}, per pair of calls (one through, one direct): {}",
        thread_use(&t0, n)
    );
    let (pv, pd) = (percentile(&mut via, 0.5), percentile(&mut dir, 0.5));
    println!(
        "    sequential {n}: p50 through {:.2} ms, direct {:.2} ms, added {:.2} ms",
        ms(pv),
        ms(pd),
        ms(pv) - ms(pd)
    );
    // Bursts at low usage (the sequential calls are in the window). The first opens `n`
    // new connections on each path (two hops through graphgate, one direct); the others
    // find them in the pools, as a service with keep-alive connections would. One burst on
    // two shared cores moves by several ms, so the pooled burst is sent POOLED_ROUNDS times,
    // alternating which path goes first, and the median of the added p50s is the figure.
    // Every round adds 2n calls to Page 1001's usage (graphgate's and the direct ones, which
    // it counts as another app's): 1 600 of 4 800 after the last, under the 60 % threshold.
    const POOLED_ROUNDS: u64 = 3;
    let mut pooled_added = Vec::new();
    for round in 0..=POOLED_ROUNDS {
        let label = if round == 0 {
            "new connections".to_string()
        } else {
            format!("pooled connections, round {round}")
        };
        let via_urls = (0..n)
            .map(|i| through(&gw, "1001", 30_000 + round * 1000 + i))
            .collect();
        let dir_urls = (0..n)
            .map(|i| direct(&graph, "1001", 40_000 + round * 1000 + i))
            .collect();
        let connections_before = graph.stats().connections;
        let (mut uses, t0) = (Vec::new(), thread_times());
        let ((mut via, limited), (mut dir, _)) = if round % 2 == 0 {
            let via = burst(&http, via_urls).await;
            uses.push(format!("through: {}", thread_use(&t0, n)));
            let t1 = thread_times();
            let dir = burst(&http, dir_urls).await;
            uses.push(format!("direct: {}", thread_use(&t1, n)));
            (via, dir)
        } else {
            let dir = burst(&http, dir_urls).await;
            uses.push(format!("direct: {}", thread_use(&t0, n)));
            let t1 = thread_times();
            let via = burst(&http, via_urls).await;
            uses.push(format!("through: {}", thread_use(&t1, n)));
            (via, dir)
        };
        println!("    burst of {n}, {label}, per call: {}", uses.join("; "));
        let (pv, pd) = (percentile(&mut via, 0.5), percentile(&mut dir, 0.5));
        println!(
            "    burst of {n}, {label}: p10/p90/max through {:.2}/{:.2}/{:.2} ms, direct {:.2}/{:.2}/{:.2} ms",
            ms(percentile(&mut via, 0.1)),
            ms(percentile(&mut via, 0.9)),
            ms(percentile(&mut via, 1.0)),
            ms(percentile(&mut dir, 0.1)),
            ms(percentile(&mut dir, 0.9)),
            ms(percentile(&mut dir, 1.0)),
        );
        println!(
            "    burst of {n}, {label}: p50 through {:.2} ms, direct {:.2} ms, added {:.2} ms; 429 through graphgate: {limited}; new connections to Graph (both paths): {}",
            ms(pv),
            ms(pd),
            ms(pv) - ms(pd),
            graph.stats().connections - connections_before
        );
        if round > 0 {
            pooled_added.push(ms(pv) - ms(pd));
        }
    }
    let rounds: Vec<String> = pooled_added.iter().map(|a| format!("{a:.2}")).collect();
    pooled_added.sort_by(f64::total_cmp);
    println!(
        "    burst of {n}, pooled connections: median added {:.2} ms over {POOLED_ROUNDS} rounds ({} ms)",
        pooled_added[pooled_added.len() / 2],
        rounds.join(" / ")
    );
    let m = get_text(&http, &format!("{}/metrics", gw.admin_url())).await;
    let metric = |prefix: &str| metric_sum(&m, prefix);
    let waits = metric("graphgate_quota_waits_total{");
    let in_admission = metric("graphgate_quota_queue_wait_seconds_sum{outcome=\"admitted\"}")
        / metric("graphgate_quota_queue_wait_seconds_count{outcome=\"admitted\"}").max(1.0);
    println!(
        "    calls that queued for quota: {waits}; mean time in quota admission: {:.1} µs; most calls at Graph at once: {}",
        in_admission * 1e6,
        graph.stats().max_in_flight
    );
    gw.shutdown().await;
    graph.shutdown();
}

/// Answered and throttled calls in each of `windows` windows while `via` (round-robin)
/// receives three times the budget.
async fn overload(
    graph: &FakeGraph,
    via: &[&Running],
    limit: u32,
    window: Duration,
    windows: u32,
) -> (Vec<u64>, Vec<u64>) {
    let rate = 3.0 * f64::from(limit) / window.as_secs_f64();
    let http = http();
    let urls: Vec<String> = (0..(rate * window.as_secs_f64() * f64::from(windows)) as u64)
        .map(|n| through(via[(n % via.len() as u64) as usize], "1001", 100_000 + n))
        .collect();
    let load = tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        let mut set = JoinSet::new();
        for (n, url) in urls.into_iter().enumerate() {
            tokio::time::sleep_until(started + Duration::from_secs_f64(n as f64 / rate)).await;
            let http = http.clone();
            set.spawn(async move { get(&http, &url).await.0 });
        }
        let mut limited = 0u64;
        while let Some(s) = set.join_next().await {
            limited += u64::from(s.expect("task") == StatusCode::TOO_MANY_REQUESTS);
        }
        limited
    });
    let start = tokio::time::Instant::now();
    let (mut answered, mut throttled) = (Vec::new(), Vec::new());
    // Page 1001's calls only (the quiet-Page run reads Page 1002 meanwhile).
    let page = |g: &FakeGraph| {
        let s = g.stats();
        let calls = s.calls_by_page.get("1001").copied().unwrap_or(0);
        let thr = s.throttled_by_page.get("1001").copied().unwrap_or(0);
        (calls - thr, thr)
    };
    let mut before = page(graph);
    for k in 1..=windows {
        tokio::time::sleep_until(start + window * k).await;
        let now = page(graph);
        answered.push(now.0 - before.0);
        throttled.push(now.1 - before.1);
        before = now;
    }
    let limited = load.await.expect("load");
    println!("    429 from graphgate: {limited}");
    (answered, throttled)
}

fn report(label: &str, limit: u32, answered: &[u64], throttled: &[u64]) {
    let share = |a: u64| 100.0 * a as f64 / f64::from(limit);
    let shares: Vec<String> = answered
        .iter()
        .map(|a| format!("{:.1}%", share(*a)))
        .collect();
    let after_first = answered.iter().skip(1).min().copied().unwrap_or(0);
    let first_three: u64 = answered.iter().take(3).sum();
    println!(
        "    {label}: answered per window {answered:?} of {limit} = [{}]; lowest after the first {:.1}%; first 3 windows {:.1}%; throttled per window {throttled:?}",
        shares.join(", "),
        share(after_first),
        share(first_three) / 3.0,
    );
}

/// One case: (label, page_calls, learn_limits, calls of other apps always in the Page's
/// window).
fn cases(limit: u32) -> [(&'static str, u32, bool, u32); 4] {
    [
        ("page_calls right", limit, false, 0),
        ("page_calls 10x too high", limit * 10, false, 0),
        ("page_calls 10x too low, learn_limits", limit / 10, true, 0),
        (
            "page_calls 10x too high, other apps using 20 %",
            limit * 10,
            false,
            limit / 5,
        ),
    ]
}

async fn overloads(redis: Option<&RedisServer>, limit: u32, window: Duration, windows: u32) {
    for (label, page_calls, learn, others) in cases(limit) {
        let graph = fake_graph(limit, window).await;
        graph.set_other_usage("1001", u64::from(others));
        let quota = format!(
            "page_calls = {page_calls}\npage_window_s = {}\nqueue_timeout_ms = 3000\nmax_queue_depth = 100000\nlearn_limits = {learn}\n",
            window.as_secs()
        );
        let url = redis.map(RedisServer::url);
        let a = gateway(&graph, &quota, url.as_deref()).await;
        let b = match &url {
            Some(u) => Some(gateway(&graph, &quota, Some(u)).await),
            None => None,
        };
        let via: Vec<&Running> = std::iter::once(&a).chain(b.as_ref()).collect();
        let (answered, throttled) = overload(&graph, &via, limit, window, windows).await;
        // With other apps on the Page, the share of what they leave.
        report(label, limit - others, &answered, &throttled);
        if redis.is_some() {
            // Admissions a replica decided alone (Redis slow or unreachable) share the budget
            // by a fraction, not by the fleet's count: the first suspect of a throttle.
            let (mut by_redis, mut alone) = (0.0, 0.0);
            let http = http();
            for r in &via {
                let m = get_text(&http, &format!("{}/metrics", r.admin_url())).await;
                let series = "graphgate_quota_admission_decisions_total{source=";
                by_redis += metric_sum(&m, &format!("{series}\"redis\"}}"));
                alone += metric_sum(&m, &format!("{series}\"local\"}}"));
            }
            println!("    {label}: admissions decided by Redis {by_redis}, without it {alone}");
        }
        a.shutdown().await;
        if let Some(b) = b {
            b.shutdown().await;
        }
        graph.shutdown();
        if let Some(r) = redis {
            r.flush();
        }
    }
}

async fn quiet_page(limit: u32, window: Duration) {
    println!("== a quiet Page (1002) while Page 1001 floods at 3x its budget");
    let graph = fake_graph(limit, window).await;
    let quota = format!(
        "page_calls = {limit}\npage_window_s = {}\nqueue_timeout_ms = 3000\nmax_queue_depth = 100000\n",
        window.as_secs()
    );
    let gw = gateway(&graph, &quota, None).await;
    let http = http();
    let quiet = |from: u64| {
        let (http, urls) = (
            http.clone(),
            (0..100)
                .map(|i| through(&gw, "1002", from + i))
                .collect::<Vec<_>>(),
        );
        async move {
            let mut out = Vec::new();
            for u in urls {
                let (s, d) = get(&http, &u).await;
                assert_eq!(s, StatusCode::OK);
                out.push(d);
            }
            out
        }
    };
    let mut alone = quiet(0).await;
    let via = [&gw];
    let flood = overload(&graph, &via, limit, window, 1);
    let during = async {
        tokio::time::sleep(window / 4).await;
        quiet(1000).await
    };
    let ((answered, throttled), mut during) = tokio::join!(flood, during);
    report("flooding Page 1001", limit, &answered, &throttled);
    println!(
        "    Page 1002 alone: p50 {:.2} ms, p99 {:.2} ms; during the flood: p50 {:.2} ms, p99 {:.2} ms",
        ms(percentile(&mut alone, 0.5)),
        ms(percentile(&mut alone, 0.99)),
        ms(percentile(&mut during, 0.5)),
        ms(percentile(&mut during, 0.99)),
    );
    gw.shutdown().await;
    graph.shutdown();
}

/// A `redis-server` on a free port, no persistence, killed when dropped.
struct RedisServer {
    port: u16,
    child: Child,
}

impl RedisServer {
    fn start() -> Option<RedisServer> {
        let port = StdListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .ok()?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(RedisServer { port, child })
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the next case from an empty Redis.
    fn flush(&self) {
        let _ = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "FLUSHALL"])
            .stdout(Stdio::null())
            .status();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn main() {
    graphgate::allocator::tune();
    // `cargo bench` passes `--bench`; `cargo test --all-targets` does not: a smoke run then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // QUOTA_LOAD=low,overload,fleet,quiet picks parts (default: all).
    let parts = std::env::var("QUOTA_LOAD").unwrap_or_else(|_| "low,overload,fleet,quiet".into());
    let part = |p: &str| parts.split(',').any(|x| x.trim() == p);
    rt.block_on(async {
        if part("low") {
            low_usage(quick).await;
        }
        if quick {
            return;
        }
        let (limit, window, windows) = (400, Duration::from_secs(10), 4);
        if part("overload") {
            println!(
                "== 3x overload on one Page, Graph at {limit} / {} s, {windows} windows, one replica",
                window.as_secs()
            );
            overloads(None, limit, window, windows).await;
        }
        if part("fleet") {
            match RedisServer::start() {
                Some(redis) => {
                    println!("== the same through two replicas sharing Redis");
                    overloads(Some(&redis), limit, window, windows).await;
                }
                None => println!("== two replicas: skipped (redis-server not found)"),
            }
        }
        if part("quiet") {
            quiet_page(limit, window).await;
        }
    });
    if let Some(tls) = upstream_tls() {
        let _ = std::fs::remove_file(&tls.ca_file);
    }
}
