//! The Redis tier next to the in-process one: a cache hit answered from L1 vs from L2
//! (Redis on loopback), both through `stack::handle` in-process (no client sockets), for a
//! small node read and a feed page. Also 64 concurrent L2 hits, for throughput over the one
//! multiplexed Redis connection.
//!
//! Starts its own `redis-server` on a free port (killed at the end) and a simulated Graph.
//! Replica A fills the entries; replica B has an L1 too small to hold them, so every request
//! on B is an L1 miss answered from Redis (lookup, decode, reply) — the L2 hit path.
//!
//! Shared-tier values are stored as L1 holds them: LZ4-compressed with `[cache] compress`
//! (the default), plain without. A second pair of replicas runs with `compress = false` under
//! another key prefix, so L2 hits are measured both ways, and the bytes per entry in Redis
//! (`STRLEN` of the stored values) are printed for each case.
//!
//! The scale curve by reply size: L1 and L2 hits for replies of 1 KB, 10 KB and 100 KB (a
//! feed page of varied posts, put into Redis and replica A's L1 directly).
//!
//! Run: `cargo bench --bench redis_tier`.

use std::net::TcpListener as StdListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
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

/// The shared bench config with an L1 of `l1_bytes`, compression on or off, and the
/// bench's Redis (keys under `prefix`).
fn config(graph: &str, redis_port: u16, l1_bytes: u64, compress: bool, prefix: &str) -> Config {
    common::config(
        graph,
        &format!(
            "[cache]\nmax_bytes = {l1_bytes}\ndefault_ttl_s = 3600\ncompress = {compress}\n\
             [redis]\nurl = \"redis://127.0.0.1:{redis_port}\"\nkey_prefix = \"{prefix}\"\n"
        ),
    )
}

/// `redis-cli -p PORT args…`, its output.
fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli comes with redis-server");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Bytes of each stored entry under `prefix`, smallest first.
fn entry_sizes(port: u16, prefix: &str) -> Vec<usize> {
    let keys = cli(
        port,
        &["--scan", "--pattern", &format!("{prefix}{{n:*}}:c:*")],
    );
    let mut sizes: Vec<usize> = keys
        .lines()
        .filter_map(|k| cli(port, &["STRLEN", k.trim()]).trim().parse().ok())
        .collect();
    sizes.sort_unstable();
    sizes
}

async fn hit(gw: &Arc<Gateway>, path: &str) -> usize {
    let resp = graphgate::stack::handle(gw, common::get(path)).await;
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
    let (graph, a, b, pa, pb): (FakeGraph, Running, Running, Running, Running) =
        rt.block_on(async {
            let graph = common::fake_graph().await;
            let start = |l1, compress, prefix| {
                server::start(config(&graph.url(), port, l1, compress, prefix))
            };
            let a = start(64 << 20, true, "z:").await.expect("replica a");
            // Too small for any entry: every read on B is an L1 miss.
            let b = start(256, true, "z:").await.expect("replica b");
            // The same pair storing bodies plain.
            let pa = start(64 << 20, false, "p:").await.expect("replica pa");
            let pb = start(256, false, "p:").await.expect("replica pb");
            (graph, a, b, pa, pb)
        });
    let cases = [
        ("node", "/v21.0/1001?fields=id,name,about,fan_count"),
        (
            "feed25",
            "/v21.0/1001/feed?fields=id,message,created_time&limit=25",
        ),
    ];
    let (ga, gb) = (a.gateway.clone(), b.gateway.clone());
    let (gpa, gpb) = (pa.gateway.clone(), pb.gateway.clone());
    for (_, path) in cases {
        rt.block_on(async {
            hit(&ga, path).await;
            hit(&gb, path).await;
            hit(&gpa, path).await;
            hit(&gpb, path).await;
        });
    }
    let upstream_before = graph.stats().requests;
    // One entry per case under each prefix: the smaller is the node, the larger the feed.
    let (lz4, plain) = (entry_sizes(port, "z:"), entry_sizes(port, "p:"));
    for (i, (name, _)) in cases.iter().enumerate() {
        if let (Some(z), Some(p)) = (lz4.get(i), plain.get(i)) {
            println!("bytes per entry in Redis, {name}: plain {p}, lz4 {z}");
        }
    }

    let mut group = c.benchmark_group("cache tier hit via stack::handle");
    group.throughput(Throughput::Elements(1));
    for (name, path) in cases {
        group.bench_function(format!("L1 hit {name}"), |bch| {
            bch.to_async(&rt).iter(|| hit(&ga, path))
        });
        group.bench_function(format!("L2 hit {name}"), |bch| {
            bch.to_async(&rt).iter(|| hit(&gb, path))
        });
        group.bench_function(format!("L2 hit {name} plain"), |bch| {
            bch.to_async(&rt).iter(|| hit(&gpb, path))
        });
    }
    group.finish();
    // The L2 cases must have been answered from Redis, not from an L1 after all.
    for (name, gw) in [("lz4", &gb), ("plain", &gpb)] {
        let hits = gw
            .metrics
            .render()
            .lines()
            .find(|l| {
                l.starts_with("graphgate_cache_lookups_total")
                    && l.contains("tier=\"l2\"")
                    && l.contains("result=\"hit\"")
            })
            .map(str::to_string)
            .unwrap_or_default();
        println!("L2 lookups answered from Redis on the {name} replica: {hits}");
    }

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
    value_sizes(c, &rt, &ga, &gb);
    assert_eq!(
        graph.stats().requests,
        upstream_before,
        "every measured request was a cache hit"
    );
    rt.block_on(async {
        for r in [a, b, pa, pb] {
            r.shutdown().await;
        }
    });
    graph.shutdown();
}

/// A Graph-like feed page of at least `bytes` bytes: posts with varied ids, words and times,
/// so it compresses about as real replies do.
fn feed_of(bytes: usize) -> String {
    const WORDS: &[&str] = &[
        "coffee", "roast", "today", "opening", "weekend", "new", "menu", "thanks", "everyone",
        "visit", "our", "shop", "beans", "from", "Ethiopia", "and", "Colombia", "morning",
        "special", "price", "join", "us", "for", "tasting", "at", "the", "market", "on",
        "Saturday", "link", "below", "photos", "team", "harvest", "season",
    ];
    let mut rng = fastrand::Rng::with_seed(7);
    let mut out = String::from(r#"{"data":["#);
    let mut i = 0;
    while out.len() < bytes {
        if i > 0 {
            out.push(',');
        }
        let words: Vec<&str> = (0..rng.usize(8..40))
            .map(|_| WORDS[rng.usize(..WORDS.len())])
            .collect();
        out.push_str(&format!(
            r#"{{"id":"1001_{}","message":"{}","created_time":"2026-12-{:02}T{:02}:{:02}:00+0000"}}"#,
            rng.u64(10_000_000..99_999_999),
            words.join(" "),
            rng.u8(1..29),
            rng.u8(0..24),
            rng.u8(0..60)
        ));
        i += 1;
    }
    out.push_str("]}");
    out
}

/// Puts `body` under the key a read of `path` looks up: in Redis (through replica `a`) and
/// in `a`'s L1.
async fn put(a: &Arc<Gateway>, path: &str, body: String) {
    let k = common::key_for(a, path);
    let entry = common::entry(Bytes::from(body));
    let shared = a.cache.shared().expect("replica a has Redis");
    let look = shared.l2.lookup(&k).await.expect("Redis answers");
    assert!(
        a.cache.store_shared(&k, &entry, &look.epoch).await,
        "in Redis"
    );
    assert!(a.cache.store(&k, &entry, a.cache.epoch(&k)), "in L1");
}

/// The scale curve of the Redis tier: an L2 hit (on `b`, whose L1 holds nothing) and an L1
/// hit (on `a`) as the reply grows from 1 KB to 100 KB.
fn value_sizes(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    a: &Arc<Gateway>,
    b: &Arc<Gateway>,
) {
    let sizes = [1_000, 10_000, 100_000];
    let path = |size: usize| format!("/v21.0/1001_{size}/comments?fields=id,message,created_time");
    rt.block_on(async {
        for size in sizes {
            put(a, &path(size), feed_of(size)).await;
            let resp = graphgate::stack::handle(b, common::get(&path(size))).await;
            assert_eq!(resp.status(), 200);
            assert!(
                resp.headers()["cache-status"]
                    .to_str()
                    .is_ok_and(|s| s.contains("hit")),
                "{size} B: answered from Redis"
            );
        }
    });
    let mut group = c.benchmark_group("hit by reply size");
    group.throughput(Throughput::Elements(1));
    for size in sizes {
        let p = path(size);
        group.bench_function(format!("L1 {size} B"), |bch| {
            bch.to_async(rt).iter(|| hit(a, &p))
        });
        group.bench_function(format!("L2 {size} B"), |bch| {
            bch.to_async(rt).iter(|| hit(b, &p))
        });
    }
    group.finish();
}

criterion_group!(benches, tiers);
criterion_main!(benches);
