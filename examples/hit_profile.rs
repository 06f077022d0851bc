//! Profiling harness for the cache-hit path: an in-process gateway (no client sockets) in
//! front of the simulated Graph API; one warm-up fill, then N hits through
//! `Gateway::handle` on a current-thread runtime. Meant for callgrind, whose instruction
//! counts do not depend on machine load:
//!
//! ```text
//! cargo build --release --example hit_profile
//! valgrind --tool=callgrind target/release/examples/hit_profile 2000  # and 12000:
//! # instructions per hit = (Ir(12000) - Ir(2000)) / 10000
//! ```
//! A second argument sets a log filter (`info`, `warn`) for the production fmt subscriber
//! writing to a sink; without it no subscriber is installed.

use std::sync::Arc;

use bytes::Bytes;
use graphgate::config::Config;
use graphgate::fake_graph::{FakeGraph, FakeGraphConfig};
use graphgate::metrics::Metrics;
use graphgate::proxy::Gateway;
use http::Request;
use http_body_util::Full;

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
        let graph = FakeGraph::start(
            FakeGraphConfig {
                system_user_tokens: vec!["prof-token".into()],
                app_secret: Some("prof-secret".into()),
                ..FakeGraphConfig::default()
            },
            "127.0.0.1:0".parse().expect("addr"),
        )
        .await
        .expect("fake graph");
        graph.set_record_limit(0);
        let toml = format!(
            r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[upstream]
url = "{}"
[credentials]
system_user_token = "prof-token"
app_secret = "prof-secret"
[[clients]]
name = "prof"
key = "prof-client-key"
pages = ["*"]
"#,
            graph.url()
        );
        let config = Config::from_toml(&toml, |_| None).expect("config");
        let gw = Arc::new(
            Gateway::new(config, "http://gg".into(), Arc::new(Metrics::new())).expect("gateway"),
        );
        let req = || {
            Request::get(
                "/v21.0/1001?fields=id,name,about,fan_count,category&access_token=prof-client-key",
            )
            .header("user-agent", "facebook-python-business-sdk/21.0")
            .header("accept", "*/*")
            .body(Full::new(Bytes::new()))
            .expect("request")
        };
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
