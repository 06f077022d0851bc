//! Profiling harness for the cache-hit path: an in-process gateway (no client sockets) in
//! front of the simulated Graph API, set up as the benches set it up (benches/common); one
//! warm-up fill, then N hits through the public tower stack (`graphgate::stack::public`:
//! load shedding, trace, gateway) on a current-thread runtime. Meant for
//! callgrind, whose instruction counts do not depend on machine load:
//!
//! ```text
//! cargo build --release --example hit_profile
//! valgrind --tool=callgrind target/release/examples/hit_profile 2000  # and 12000:
//! # instructions per hit = (Ir(12000) - Ir(2000)) / 10000
//! ```
//! A second argument sets a log filter (`info`, `warn`) for the production fmt subscriber
//! writing to a sink; without it (or with `none`) no subscriber is installed. A third
//! argument `handle` calls `stack::handle` directly: the stages without the shed and trace layers.

#[path = "../benches/common/mod.rs"]
mod common;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = args.first().map_or(10_000, |s| s.parse().expect("count"));
    let direct = args.get(2).is_some_and(|a| a == "handle");
    let _guard = args.get(1).filter(|l| *l != "none").map(|level| {
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
        let warm = graphgate::stack::handle(&gw, req()).await;
        assert_eq!(warm.status(), 200);
        let mut stack = graphgate::stack::public(&gw, None);
        let mut hits = 0;
        for _ in 0..n {
            let r = if direct {
                graphgate::stack::handle(&gw, req()).await
            } else {
                // As the server calls it: the connection's stack, always ready.
                let r = graphgate::stack::call_ready(&mut stack, req()).await;
                r.unwrap_or_else(|e| match e {})
            };
            if r.headers().get("x-cache").is_some_and(|v| v == "HIT") {
                hits += 1;
            }
        }
        assert_eq!(hits, n, "every request after the warm-up is a hit");
        graph.shutdown();
    });
}
