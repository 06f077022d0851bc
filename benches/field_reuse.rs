//! Field reuse on a realistic read trace: reads of 50 nodes with overlapping field sets
//! (`id,message`, `id,message,created_time`, `message`, …) and `ids=` reads of 5–20 of them,
//! replayed through graphgate twice against a fresh simulated Graph each time: with
//! `[cache] project_fields` on and off. Reports the upstream calls each run made, checks that
//! every reply body is the same in both runs, and the p50 of cache hits in each.
//!
//!   cargo bench --bench field_reuse            # 2 000 reads
//!   FIELD_REUSE_READS=10000 cargo bench --bench field_reuse
//!
//! Under `cargo test --all-targets` it runs a short trace as a smoke test.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::CLIENT_KEY;
use fake_graph::{FakeGraph, FakeGraphConfig};
use graphgate::server::{self, Running};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

type Http = Client<HttpConnector, Full<Bytes>>;

/// The 50 nodes: 25 posts of each of two Pages.
fn nodes() -> Vec<String> {
    (1..=25)
        .map(|n| format!("1001_{n}"))
        .chain((1..=25).map(|n| format!("1002_{n}")))
        .collect()
}

/// Field sets services ask posts for, wide and narrow, in the proportions of a mixed fleet.
const FIELD_SETS: &[&str] = &[
    "id,message,created_time",
    "id,message",
    "message",
    "created_time,id",
    "id",
    "message,created_time",
];

/// The trace: `n` read paths, the same for both runs (seeded).
fn trace(n: usize) -> Vec<String> {
    let mut rng = fastrand::Rng::with_seed(20261205);
    let nodes = nodes();
    (0..n)
        .map(|_| {
            let fields = FIELD_SETS[rng.usize(..FIELD_SETS.len())];
            if rng.u8(..10) == 0 {
                let count = rng.usize(5..=20);
                let mut ids: Vec<&str> = Vec::with_capacity(count);
                while ids.len() < count {
                    let id = nodes[rng.usize(..nodes.len())].as_str();
                    if !ids.contains(&id) {
                        ids.push(id);
                    }
                }
                format!("/v21.0/?ids={}&fields={fields}", ids.join(","))
            } else {
                let node = &nodes[rng.usize(..nodes.len())];
                format!("/v21.0/{node}?fields={fields}")
            }
        })
        .collect()
}

struct Run {
    upstream_calls: u64,
    bodies: Vec<serde_json::Value>,
    hit_latencies: Vec<Duration>,
    projected: usize,
    took: Duration,
}

async fn replay(paths: &[String], project_fields: bool) -> Run {
    let graph = FakeGraph::start(
        FakeGraphConfig {
            page_calls_limit: u32::MAX / 2,
            app_calls_limit: u32::MAX / 2,
            ..common::credentials().graph_config()
        },
        "127.0.0.1:0".parse().expect("addr"),
    )
    .await
    .expect("fake graph starts");
    graph.set_record_limit(0);
    let extra = format!("[cache]\ndefault_ttl_s = 3600\nproject_fields = {project_fields}\n");
    let gw: Running = server::start(common::config(&graph.url(), &extra))
        .await
        .expect("graphgate starts");
    let http: Http = Client::builder(TokioExecutor::new()).build_http();
    let mut run = Run {
        upstream_calls: 0,
        bodies: Vec::with_capacity(paths.len()),
        hit_latencies: Vec::new(),
        projected: 0,
        took: Duration::ZERO,
    };
    let started = Instant::now();
    for path in paths {
        let url = format!("{}{path}&access_token={CLIENT_KEY}", gw.url());
        let req = Request::get(url)
            .body(Full::new(Bytes::new()))
            .expect("request");
        let sent = Instant::now();
        let resp = http.request(req).await.expect("graphgate answers");
        let status = resp.status();
        let hit = resp.headers().get("x-cache").and_then(|v| v.to_str().ok()) == Some("HIT");
        let projected = resp
            .headers()
            .get("cache-status")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("projected"));
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let took = sent.elapsed();
        assert_eq!(
            status,
            StatusCode::OK,
            "{path}: {}",
            String::from_utf8_lossy(&body)
        );
        if hit && !projected {
            run.hit_latencies.push(took);
        }
        run.projected += usize::from(projected);
        run.bodies
            .push(serde_json::from_slice(&body).expect("a JSON reply"));
    }
    run.took = started.elapsed();
    run.upstream_calls = graph.stats().requests;
    gw.shutdown().await;
    graph.shutdown();
    run
}

fn p50(mut v: Vec<Duration>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e6
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let reads: usize = std::env::var("FIELD_REUSE_READS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if bench { 2000 } else { 200 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let paths = trace(reads);
    rt.block_on(async {
        let exact = replay(&paths, false).await;
        let reuse = replay(&paths, true).await;
        for (i, (a, b)) in exact.bodies.iter().zip(&reuse.bodies).enumerate() {
            assert_eq!(a, b, "read {i} ({}) differs between the runs", paths[i]);
        }
        let saved = 1.0 - reuse.upstream_calls as f64 / exact.upstream_calls as f64;
        println!(
            "field reuse: {reads} reads of 50 nodes ({} field sets, ~10 % ids= of 5-20), identical bodies in both runs",
            FIELD_SETS.len()
        );
        println!(
            "  exact-key caching:  {:>5} upstream calls, hit p50 {:>7.1} us, {:.2} s",
            exact.upstream_calls,
            p50(exact.hit_latencies),
            exact.took.as_secs_f64()
        );
        println!(
            "  with field reuse:   {:>5} upstream calls, hit p50 {:>7.1} us, {:.2} s ({} projected)",
            reuse.upstream_calls,
            p50(reuse.hit_latencies),
            reuse.took.as_secs_f64(),
            reuse.projected
        );
        println!("  upstream calls saved: {:.1} %", saved * 100.0);
    });
}
