//! The Redis tier next to the in-process one: a cache hit answered from L1 vs from L2
//! (Redis on loopback), both through `Gateway::handle` in-process (no client sockets), for a
//! small node read and a feed page. Also 64 concurrent L2 hits, for throughput over the one
//! multiplexed Redis connection.
//!
//! Starts its own `redis-server` on a free port (killed at the end) and a simulated Graph.
//! Replica A fills the entries; replica B has an L1 too small to hold them, so every request
//! on B is an L1 miss answered from Redis (lookup, decode, reply) — the L2 hit path.
//!
//! Run: `cargo bench --bench redis_tier`.

use std::net::TcpListener as StdListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fake_graph::FakeGraph;
use graphgate::config::Config;
use graphgate::proxy::Gateway;
use graphgate::server::{self, Running};

mod common;

struct RedisServer(Child);

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn redis_server() -> (RedisServer, u16) {
    let port = StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server must be installed for this bench");
    let until = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < until, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    (RedisServer(child), port)
}

/// The shared bench config with an L1 of `l1_bytes` and the test's Redis.
fn config(graph: &str, redis_port: u16, l1_bytes: u64) -> Config {
    common::config(
        graph,
        &format!(
            "[cache]\nmax_bytes = {l1_bytes}\ndefault_ttl_s = 3600\n\
             [redis]\nurl = \"redis://127.0.0.1:{redis_port}\"\n"
        ),
    )
}

async fn hit(gw: &Arc<Gateway>, path: &str) -> usize {
    let resp = gw.handle(common::get(path)).await;
    assert_eq!(resp.status(), 200);
    resp.headers().len()
}

fn tiers(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (_redis, port) = redis_server();
    let (graph, a, b): (FakeGraph, Running, Running) = rt.block_on(async {
        let graph = common::fake_graph().await;
        let a = server::start(config(&graph.url(), port, 64 << 20))
            .await
            .expect("replica a");
        // Too small for any entry: every read on B is an L1 miss.
        let b = server::start(config(&graph.url(), port, 256))
            .await
            .expect("replica b");
        (graph, a, b)
    });
    let cases = [
        ("node", "/v21.0/1001?fields=id,name,about,fan_count"),
        (
            "feed25",
            "/v21.0/1001/feed?fields=id,message,created_time&limit=25",
        ),
    ];
    let (ga, gb) = (a.gateway.clone(), b.gateway.clone());
    for (_, path) in cases {
        rt.block_on(async {
            hit(&ga, path).await;
            hit(&gb, path).await;
        });
    }
    let upstream_before = graph.stats().requests;

    let mut group = c.benchmark_group("cache tier hit via Gateway::handle");
    group.throughput(Throughput::Elements(1));
    for (name, path) in cases {
        group.bench_function(format!("L1 hit {name}"), |bch| {
            bch.to_async(&rt).iter(|| hit(&ga, path))
        });
        group.bench_function(format!("L2 hit {name}"), |bch| {
            bch.to_async(&rt).iter(|| hit(&gb, path))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("64 concurrent hits");
    group.throughput(Throughput::Elements(64));
    for (tier, gw) in [("L1", ga.clone()), ("L2", gb.clone())] {
        let path = cases[0].1;
        group.bench_function(format!("{tier} node"), |bch| {
            bch.to_async(&rt).iter(|| {
                let gw = gw.clone();
                async move {
                    let mut set = tokio::task::JoinSet::new();
                    for _ in 0..64 {
                        let gw = gw.clone();
                        set.spawn(async move { hit(&gw, path).await });
                    }
                    while set.join_next().await.is_some() {}
                }
            })
        });
    }
    group.finish();
    assert_eq!(
        graph.stats().requests,
        upstream_before,
        "every measured request was a cache hit"
    );
    rt.block_on(async {
        a.shutdown().await;
        b.shutdown().await;
    });
    graph.shutdown();
}

criterion_group!(benches, tiers);
criterion_main!(benches);
