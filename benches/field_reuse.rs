//! Field reuse on a realistic read trace: reads of 50 nodes with overlapping field sets
//! (`id,message`, `id,message,created_time`, `message`, …) and `ids=` reads of 5–20 of them,
//! replayed through graphgate against a fresh simulated Graph for each configuration:
//! exact-key caching (`[cache] project_fields = false`), the defaults (projection on, no
//! windows), a 2 ms `union_window_ms`, and that plus a 2 ms `merge_window_ms`; once by one
//! reader against a Graph that answers at once, once by 16 concurrent readers against a
//! Graph taking 50 ms a call. Checks that every reply body is the same in every run, and
//! reports the HTTP requests Graph received, the calls it counted against the Pages (one per
//! id of an `ids=` request), the share of each saved against exact-key caching, and the p50
//! of plain hits.
//!
//!   cargo bench --bench field_reuse            # 2 000 reads
//!   FIELD_REUSE_READS=10000 cargo bench --bench field_reuse
//!
//! Under `cargo test --all-targets` it runs a short trace as a smoke test.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
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

/// What graphgate reuses in a run.
#[derive(Clone, Copy)]
struct Mode {
    name: &'static str,
    project_fields: bool,
    union_window_ms: u64,
    merge_window_ms: u64,
}

const MODES: [Mode; 4] = [
    Mode {
        name: "exact-key caching",
        project_fields: false,
        union_window_ms: 0,
        merge_window_ms: 0,
    },
    Mode {
        name: "field reuse (defaults)",
        project_fields: true,
        union_window_ms: 0,
        merge_window_ms: 0,
    },
    Mode {
        name: "field reuse, 2 ms union window",
        project_fields: true,
        union_window_ms: 2,
        merge_window_ms: 0,
    },
    Mode {
        name: "  + 2 ms merge window",
        project_fields: true,
        union_window_ms: 2,
        merge_window_ms: 2,
    },
];

/// How the trace is sent: one read at a time against an instant Graph, or by `readers`
/// concurrent clients against a Graph that takes `latency` per call (a fleet of services).
#[derive(Clone, Copy)]
struct Load {
    readers: usize,
    latency: Duration,
}

struct Run {
    /// HTTP requests Graph received.
    upstream_requests: u64,
    /// Calls Graph counted against the Pages (one per id of an `ids=` request).
    upstream_calls: u64,
    bodies: Vec<serde_json::Value>,
    hit_latencies: Vec<Duration>,
    projected: usize,
    unions: usize,
    took: Duration,
}

/// One read's outcome.
struct Read {
    body: serde_json::Value,
    took: Duration,
    plain_hit: bool,
    projected: bool,
    union: bool,
}

async fn read(http: &Http, base: &str, path: &str) -> Read {
    let url = format!("{base}{path}&access_token={CLIENT_KEY}");
    let req = Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let sent = Instant::now();
    let resp = http.request(req).await.expect("graphgate answers");
    let status = resp.status();
    let hit = resp.headers().get("x-cache").and_then(|v| v.to_str().ok()) == Some("HIT");
    let cache_status = resp
        .headers()
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let took = sent.elapsed();
    assert_eq!(
        status,
        StatusCode::OK,
        "{path}: {}",
        String::from_utf8_lossy(&body)
    );
    let projected = cache_status.contains("projected");
    Read {
        body: serde_json::from_slice(&body).expect("a JSON reply"),
        took,
        plain_hit: hit && !projected,
        projected,
        union: cache_status.contains("detail=union"),
    }
}

async fn replay(paths: &[String], mode: Mode, load: Load) -> Run {
    let graph = FakeGraph::start(
        FakeGraphConfig {
            page_calls_limit: u32::MAX / 2,
            app_calls_limit: u32::MAX / 2,
            latency: load.latency,
            ..common::credentials().graph_config()
        },
        "127.0.0.1:0".parse().expect("addr"),
    )
    .await
    .expect("fake graph starts");
    graph.set_record_limit(0);
    let extra = format!(
        "[cache]\ndefault_ttl_s = 3600\nproject_fields = {}\nunion_window_ms = {}\nmerge_window_ms = {}\n",
        mode.project_fields, mode.union_window_ms, mode.merge_window_ms
    );
    let gw: Running = server::start(common::config(&graph.url(), &extra))
        .await
        .expect("graphgate starts");
    let http: Http = Client::builder(TokioExecutor::new()).build_http();
    let started = Instant::now();
    // Readers take the trace's reads in order from a shared cursor.
    let next = Arc::new(AtomicUsize::new(0));
    let paths: Arc<[String]> = paths.into();
    let readers: Vec<_> = (0..load.readers)
        .map(|_| {
            let (http, next, paths, base) = (http.clone(), next.clone(), paths.clone(), gw.url());
            tokio::spawn(async move {
                let mut done = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(path) = paths.get(i) else {
                        return done;
                    };
                    done.push((i, read(&http, &base, path).await));
                }
            })
        })
        .collect();
    let mut reads: Vec<Option<Read>> = (0..paths.len()).map(|_| None).collect();
    for r in readers {
        for (i, read) in r.await.expect("reader") {
            reads[i] = Some(read);
        }
    }
    let stats = graph.stats();
    let mut run = Run {
        upstream_requests: stats.requests,
        upstream_calls: stats.calls,
        bodies: Vec::with_capacity(paths.len()),
        hit_latencies: Vec::new(),
        projected: 0,
        unions: 0,
        took: started.elapsed(),
    };
    for r in reads.into_iter().map(|r| r.expect("every read done")) {
        if r.plain_hit {
            run.hit_latencies.push(r.took);
        }
        run.projected += usize::from(r.projected);
        run.unions += usize::from(r.union);
        run.bodies.push(r.body);
    }
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
    println!(
        "field reuse: {reads} reads of 50 nodes ({} field sets, ~10 % ids= of 5-20), identical bodies in every run",
        FIELD_SETS.len()
    );
    let loads = [
        (
            "one reader, Graph answering at once",
            Load {
                readers: 1,
                latency: Duration::ZERO,
            },
        ),
        (
            "16 concurrent readers, Graph taking 50 ms a call",
            Load {
                readers: 16,
                latency: Duration::from_millis(50),
            },
        ),
    ];
    rt.block_on(async {
        let mut reference: Option<Vec<serde_json::Value>> = None;
        for (what, load) in loads {
            println!("{what}:");
            let mut exact = None;
            for mode in MODES {
                let run = replay(&paths, mode, load).await;
                match &reference {
                    None => reference = Some(run.bodies.clone()),
                    Some(r) => {
                        for (i, (a, b)) in r.iter().zip(&run.bodies).enumerate() {
                            assert_eq!(a, b, "read {i} ({}) differs: {}", paths[i], mode.name);
                        }
                    }
                }
                let (requests, calls) =
                    *exact.get_or_insert((run.upstream_requests, run.upstream_calls));
                let saved = |now: u64, before: u64| 100.0 * (1.0 - now as f64 / before as f64);
                println!(
                    "  {:<32} {:>4} requests ({:>4.1} % saved), {:>5} Page calls ({:>4.1} % saved), hit p50 {:>6.1} us, {:.2} s, {} projected, {} from unions",
                    mode.name,
                    run.upstream_requests,
                    saved(run.upstream_requests, requests),
                    run.upstream_calls,
                    saved(run.upstream_calls, calls),
                    p50(run.hit_latencies),
                    run.took.as_secs_f64(),
                    run.projected,
                    run.unions,
                );
            }
        }
    });
}
