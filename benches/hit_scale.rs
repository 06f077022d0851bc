//! Scale curve: one L1 hit through the stages (`stack::handle`, no log subscriber) while the
//! in-process cache holds 10 k, 1 M and 5 M entries, each hit on a random one of them. The
//! entries are stored directly under the keys the reads look up (filling 5 M through Graph
//! would take the bench's whole budget), with a 200 B body and an hour of TTL; the cache's
//! byte budget is raised so none is evicted. One thread: the time per hit is also its CPU.
//!
//! `cargo bench --bench hit_scale` (env `SCALE_ENTRIES`, comma-separated, to pick the sizes;
//! 5 M entries take about 6 GB of memory and a minute to store). Figures in benches/README.md.

mod common;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use graphgate::metrics::Metrics;
use graphgate::proxy::Gateway;

const BODY: &str = r#"{"id":"1001_0000000","message":"A post of a Page with a short message that says what happened today, and a link to read more about it on the web.","created_time":"2026-12-05T09:00:00+0000"}"#;

/// The read of post `i` of Page 1001.
fn path(i: usize) -> String {
    format!("/v21.0/1001_{i:07}?fields=id,message,created_time")
}

/// Stores post `i`'s entry under the key a read of [`path`] looks up.
fn store(gw: &Gateway, i: usize, body: &Bytes) {
    let k = common::key_for(gw, &path(i));
    let entry = common::entry(body.clone());
    assert!(gw.cache.store(&k, &entry, gw.cache.epoch(&k)), "stored");
}

fn sizes() -> Vec<usize> {
    std::env::var("SCALE_ENTRIES")
        .ok()
        .map(|s| {
            s.split(',')
                .map(|n| n.trim().parse().expect("SCALE_ENTRIES: numbers"))
                .collect()
        })
        .unwrap_or_else(|| {
            // `cargo test` runs each bench once, unoptimised, to check that it works: one
            // small size is enough there.
            if std::env::args().any(|a| a == "--bench") {
                vec![10_000, 1_000_000, 5_000_000]
            } else {
                vec![10_000]
            }
        })
}

fn hit_vs_entries(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let graph = rt.block_on(common::fake_graph());
    let body = Bytes::from_static(BODY.as_bytes());
    let mut g = c.benchmark_group("L1 hit vs entries held");
    g.throughput(Throughput::Elements(1));
    for n in sizes() {
        let config = common::config(&graph.url(), "[cache]\nmax_bytes = 34359738368\n");
        let metrics = Arc::new(Metrics::new());
        let gw =
            Arc::new(Gateway::new(config, "http://graphgate.bench".into(), metrics).expect("gw"));
        let started = Instant::now();
        for i in 0..n {
            store(&gw, i, &body);
        }
        eprintln!(
            "stored {n} entries in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let probe = rt.block_on(graphgate::stack::handle(&gw, common::get(&path(n - 1))));
        assert_eq!(probe.headers()["x-cache"], "HIT", "the last entry is held");
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.to_async(&rt).iter(|| {
                let request = common::get(&path(fastrand::usize(..n)));
                let gw = &gw;
                async move {
                    let r = graphgate::stack::handle(gw, request).await;
                    debug_assert_eq!(r.headers()["x-cache"], "HIT");
                    r
                }
            })
        });
        drop(gw);
    }
    g.finish();
    graph.shutdown();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = hit_vs_entries
}
criterion_main!(benches);
