//! End-to-end load over real loopback sockets: the bench starts the simulated Graph API and
//! graphgate (`server::start`, in-memory cache) and drives graphgate with a fixed number of
//! concurrent HTTP/1.1 keep-alive clients. Three mixes, each reported as requests/s
//! (criterion `Throughput::Elements`, one element = one client request):
//! - hit-heavy: 99 % of requests read one of 16 warm keys, 1 % a new key (miss);
//! - miss-heavy: every request a new key (one upstream call each);
//! - cold-key fan-in: rounds of `CONCURRENCY` simultaneous requests for one new key (one
//!   upstream call per round, 5 ms simulated upstream latency).
//!
//! Client and servers share the machine's cores, so the figure is a floor for graphgate's
//! own capacity. See benches/README.md for the figures on the project machine.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

const CONCURRENCY: u64 = 32;

type Http = Client<HttpConnector, Full<Bytes>>;

async fn fetch(http: &Http, url: String) -> StatusCode {
    let req = Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = http.request(req).await.expect("graphgate answers");
    let status = resp.status();
    let _ = resp.into_body().collect().await.expect("body");
    status
}

#[derive(Clone, Copy)]
enum Mix {
    HitHeavy,
    MissHeavy,
    FanIn,
}

impl Mix {
    fn name(self) -> &'static str {
        match self {
            Mix::HitHeavy => "hit-heavy (99% hits)",
            Mix::MissHeavy => "miss-heavy (all misses)",
            Mix::FanIn => "cold-key fan-in (32 per key)",
        }
    }
}

fn load(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (graph, gw) = rt.block_on(async {
        let graph = common::fake_graph().await;
        let gw = graphgate::server::start(common::config(&graph.url(), ""))
            .await
            .expect("graphgate starts");
        (graph, gw)
    });
    let base = format!("{}/v21.0", gw.url());
    let key = common::CLIENT_KEY;
    let http: Http = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(CONCURRENCY as usize * 2)
        .build_http();
    // Warm the 16 hit keys.
    rt.block_on(async {
        for i in 0..16 {
            let s = fetch(
                &http,
                format!("{base}/1001_{}?fields=id,message&access_token={key}", i + 1),
            )
            .await;
            assert_eq!(s, StatusCode::OK);
        }
    });
    let seq = Arc::new(AtomicU64::new(0));
    let mut g = c.benchmark_group("load over loopback (32 connections)");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(1));
    for mix in [Mix::HitHeavy, Mix::MissHeavy, Mix::FanIn] {
        if matches!(mix, Mix::FanIn) {
            graph.set_latency(Duration::from_millis(5));
        }
        g.bench_function(BenchmarkId::from_parameter(mix.name()), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let http = http.clone();
                let base = base.clone();
                let seq = seq.clone();
                async move {
                    let started = Instant::now();
                    match mix {
                        Mix::HitHeavy | Mix::MissHeavy => {
                            let next = Arc::new(AtomicU64::new(0));
                            let mut set = tokio::task::JoinSet::new();
                            for _ in 0..CONCURRENCY.min(iters) {
                                let (http, base, seq, next) =
                                    (http.clone(), base.clone(), seq.clone(), next.clone());
                                set.spawn(async move {
                                    while next.fetch_add(1, Ordering::Relaxed) < iters {
                                        let n = seq.fetch_add(1, Ordering::Relaxed);
                                        let url = if matches!(mix, Mix::HitHeavy) && n % 100 != 0 {
                                            format!("{base}/1001_{}?fields=id,message&access_token={key}", n % 16 + 1)
                                        } else {
                                            format!("{base}/1001_{}?fields=id,message&k={n}&access_token={key}", n % 60 + 1)
                                        };
                                        assert_eq!(fetch(&http, url).await, StatusCode::OK);
                                    }
                                });
                            }
                            while set.join_next().await.is_some() {}
                        }
                        Mix::FanIn => {
                            let rounds = iters.div_ceil(CONCURRENCY);
                            for _ in 0..rounds {
                                let n = seq.fetch_add(1, Ordering::Relaxed);
                                let url = format!("{base}/1001?fields=id,name&k={n}&access_token={key}");
                                let mut set = tokio::task::JoinSet::new();
                                for _ in 0..CONCURRENCY {
                                    let (http, url) = (http.clone(), url.clone());
                                    set.spawn(async move { fetch(&http, url).await });
                                }
                                while let Some(s) = set.join_next().await {
                                    assert_eq!(s.expect("task"), StatusCode::OK);
                                }
                            }
                        }
                    }
                    // Fan-in runs whole rounds: scale back to the iterations asked for.
                    let took = started.elapsed();
                    if matches!(mix, Mix::FanIn) {
                        let done = iters.div_ceil(CONCURRENCY) * CONCURRENCY;
                        took.mul_f64(iters as f64 / done as f64)
                    } else {
                        took
                    }
                }
            })
        });
    }
    g.finish();
    rt.block_on(async {
        gw.shutdown().await;
    });
    graph.shutdown();
}

criterion_group!(benches, load);
criterion_main!(benches);
