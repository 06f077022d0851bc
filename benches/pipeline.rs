//! Criterion benches for the in-process pipeline: an L1 hit through `stack::handle`
//! (with and without a log subscriber), coalescing fan-in on one cold key, and quota
//! admission. The gateway's upstream is the simulated Graph API on loopback (only fills use
//! it). See benches/README.md for what each measures and the figures on the project machine.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use graphgate::config::Priority;
use graphgate::metrics::Metrics;
use graphgate::quota::Scheduler;
use graphgate::upstream::Reply;
use http::StatusCode;
use tokio::runtime::Runtime;

fn current_thread() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

const UPSTREAM_LATENCY: Duration = Duration::from_millis(20);

const HIT_URL: &str = "/v21.0/1001?fields=id,name,about,fan_count,category";

/// The hit request as the trace layer hands it to the stages.
fn traced_hit() -> graphgate::stack::trace::Traced<http_body_util::Full<Bytes>> {
    let request = common::get(HIT_URL);
    let context = Arc::new(graphgate::tracecontext::RequestContext::from_headers(
        request.headers(),
        None,
    ));
    graphgate::stack::trace::Traced { request, context }
}

/// One L1 hit through the whole pipeline: limits, parse, authenticate, authorize, key,
/// lookup, reply headers, metrics, request log; from the second request of the same bytes
/// on, the recall stage answers it without parse, admission and key (`[cache] recall_hits`),
/// and the last bench turns that off.
fn l1_hit(c: &mut Criterion) {
    let rt = current_thread();
    let graph = rt.block_on(common::fake_graph());
    let gw = common::gateway(&graph.url());
    let warm = rt.block_on(graphgate::stack::handle(&gw, common::get(HIT_URL)));
    assert_eq!(warm.status(), StatusCode::OK);
    let hit = rt.block_on(graphgate::stack::handle(&gw, common::get(HIT_URL)));
    assert_eq!(hit.headers()["x-cache"], "HIT");

    let mut g = c.benchmark_group("L1 hit through stack::handle");
    g.throughput(Throughput::Elements(1));
    g.bench_function("no log subscriber", |b| {
        b.to_async(&rt)
            .iter(|| async { graphgate::stack::handle(&gw, common::get(HIT_URL)).await })
    });
    // As a served connection runs them: the stages built once and called for each request
    // (they are always ready).
    let mut stages = graphgate::stack::stages(graphgate::stack::GatewayHandle::new(&gw));
    g.bench_function("stages built once", |b| {
        b.to_async(&rt)
            .iter(|| graphgate::stack::call_ready(&mut stages, traced_hit()))
    });
    // The same with `[cache] recall_hits = false`: every hit parsed, admitted and keyed again
    // (the stages above recall it from the first hit on).
    let full = Arc::new(
        graphgate::proxy::Gateway::new(
            common::config(&graph.url(), "[cache]\nrecall_hits = false\n"),
            "http://graphgate.bench".into(),
            Arc::new(graphgate::metrics::Metrics::new()),
        )
        .expect("gateway builds"),
    );
    for _ in 0..2 {
        rt.block_on(graphgate::stack::handle(&full, common::get(HIT_URL)));
    }
    let mut full_stages = graphgate::stack::stages(graphgate::stack::GatewayHandle::new(&full));
    g.bench_function("stages built once, recall_hits = false", |b| {
        b.to_async(&rt)
            .iter(|| graphgate::stack::call_ready(&mut full_stages, traced_hit()))
    });
    for level in ["warn", "info"] {
        // The production subscriber (fmt, env filter) writing to a sink: `info` formats the
        // per-request line, `warn` filters it out.
        let sub = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(level))
            .with_writer(std::io::sink)
            .with_target(false)
            .finish();
        let _guard = tracing::subscriber::set_default(sub);
        g.bench_function(format!("log filter {level} (fmt to sink)"), |b| {
            b.to_async(&rt)
                .iter(|| async { graphgate::stack::handle(&gw, common::get(HIT_URL)).await })
        });
    }
    g.finish();
    graph.shutdown();
}

/// N requests for one cold key: one upstream call (20 ms simulated latency), N replies. The
/// figure is the round's total time minus the upstream latency: handing one fill to N
/// waiters and building their replies, plus one request's own overhead (parse, key, the
/// fill's upstream round trip over loopback beyond the 20 ms).
fn coalescing_fan_in(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let graph = rt.block_on(common::fake_graph());
    graph.set_latency(UPSTREAM_LATENCY);
    let gw = common::gateway(&graph.url());
    let seq = Arc::new(AtomicU64::new(0));
    let mut g = c.benchmark_group("coalescing fan-in (round time minus 20 ms upstream)");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for waiters in [1usize, 10, 100, 1000] {
        g.throughput(Throughput::Elements(waiters as u64));
        g.bench_with_input(BenchmarkId::from_parameter(waiters), &waiters, |b, &n| {
            b.to_async(&rt).iter_custom(|iters| {
                let gw = gw.clone();
                let seq = seq.clone();
                async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let key = seq.fetch_add(1, Ordering::Relaxed);
                        let url = format!("/v21.0/1001?fields=id,name&bench_key={key}");
                        let started = Instant::now();
                        let mut set = tokio::task::JoinSet::new();
                        for _ in 0..n {
                            let gw = gw.clone();
                            let req = common::get(&url);
                            set.spawn(async move {
                                let r = graphgate::stack::handle(&gw, req).await;
                                assert_eq!(r.status(), StatusCode::OK);
                            });
                        }
                        while let Some(done) = set.join_next().await {
                            done.expect("task");
                        }
                        total += started.elapsed().saturating_sub(UPSTREAM_LATENCY);
                    }
                    total
                }
            })
        });
    }
    g.finish();
    graph.shutdown();
}

/// Quota admission on the inline path (budget available, nothing queued): charge, deadline,
/// admit, drop; and the same spread over N Pages (a bucket lookup among N), and learning
/// from a reply's usage header.
fn quota_admission(c: &mut Criterion) {
    let rt = current_thread();
    let cfg = common::config("http://127.0.0.1:9", "");
    let mut g = c.benchmark_group("quota admission");
    g.throughput(Throughput::Elements(1));
    // The default table keeps 50 000 buckets: 100 000 Pages in turn evict one another. The
    // last case gives the table room for all of them.
    let cases = [
        (1usize, None),
        (100, None),
        (10_000, None),
        (100_000, None),
        (100_000, Some(200_000)),
    ];
    for (pages, max_buckets) in cases {
        let mut quota = cfg.quota.clone();
        if let Some(max) = max_buckets {
            quota.max_buckets = max;
        }
        let sched = Scheduler::new(&quota, Arc::new(Metrics::new()));
        let units: Vec<Vec<Option<String>>> = (0..pages)
            .map(|p| vec![Some(format!("{}_1", 100_000 + p))])
            .collect();
        let mut i = 0usize;
        let id = match max_buckets {
            None => pages.to_string(),
            Some(max) => format!("{pages} (max_buckets {max})"),
        };
        g.bench_function(BenchmarkId::new("admit, Pages", id), |b| {
            b.to_async(&rt).iter(|| {
                i = (i + 1) % pages;
                let u = &units[i];
                let sched = &sched;
                async move {
                    let charge = sched.charge_for(u, None);
                    let deadline = sched.deadline(None);
                    sched
                        .admit(&charge, Priority::Interactive, deadline)
                        .await
                        .expect("admitted")
                }
            })
        });
    }
    let sched = Scheduler::new(&cfg.quota, Arc::new(Metrics::new()));
    let reply = Reply {
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
    let units = vec![Some("1001_1".to_string())];
    g.bench_function("admit + learn (usage header), 1 Page", |b| {
        b.to_async(&rt).iter(|| async {
            let charge = sched.charge_for(&units, None);
            let deadline = sched.deadline(None);
            let adm = sched
                .admit(&charge, Priority::Interactive, deadline)
                .await
                .expect("admitted");
            sched.learn(&adm, reply.view(), Some("1001_1"))
        })
    });
    g.finish();
}

criterion_group!(benches, l1_hit, coalescing_fan_in, quota_admission);
criterion_main!(benches);
