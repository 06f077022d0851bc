//! Profiling harness for the cache-hit path: an in-process gateway (no client sockets) in
//! front of the simulated Graph API, set up as the benches set it up (benches/common); one
//! warm-up fill, then N hits through `Gateway::handle` on a current-thread runtime. Meant for
//! callgrind, whose instruction counts do not depend on machine load:
//!
//! ```text
//! cargo build --release --example hit_profile
//! valgrind --tool=callgrind target/release/examples/hit_profile 2000  # and 12000:
//! # instructions per hit = (Ir(12000) - Ir(2000)) / 10000
//! ```
//! A second argument sets a log filter (`info`, `warn`) for the production fmt subscriber
//! writing to a sink; without it no subscriber is installed.

#[path = "../benches/common/mod.rs"]
mod common;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = args.first().map_or(10_000, |s| s.parse().expect("count"));
    let _guard = args.get(1).map(|level| {
        let sub = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(level))
            .with_writer(std::io::sink)
            .with_target(false)
            .finish();
        tracing::subscriber::set_default(sub)
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let graph = common::fake_graph().await;
        let gw = common::gateway(&graph.url());
        let req = || common::get("/v21.0/1001?fields=id,name,about,fan_count,category");
        let warm = gw.handle(req()).await;
        assert_eq!(warm.status(), 200);
        let mut hits = 0;
        for _ in 0..n {
            let r = gw.handle(req()).await;
            if r.headers().get("x-cache").is_some_and(|v| v == "HIT") {
                hits += 1;
            }
        }
        assert_eq!(hits, n, "every request after the warm-up is a hit");
        graph.shutdown();
    });
}
