//! Shared set-up for the socket-using benches: the simulated Graph API with limits out of the
//! way (no request log, no rate limits that a bench could hit) and a graphgate config in
//! front of it with a quota far above what a bench sends.
#![allow(dead_code)]

use std::sync::Arc;

use std::time::Duration;

use bytes::Bytes;
use fake_graph::FakeGraph;
use graphgate::cache::entry::Entry;
use graphgate::cache::key::{self, CacheKey};
use graphgate::config::Config;
use graphgate::metrics::Metrics;
use graphgate::proxy::{parse_call, Gateway};
use graphgate::rewrite::PreparedBody;
use graphgate::testkit::{Credentials, TestClient};
use http::Request;
use http_body_util::Full;

pub const SYSTEM_TOKEN: &str = "bench-system-user-token";
pub const APP_SECRET: &str = "bench-app-secret";
pub const CLIENT_KEY: &str = "bench-client-key";

/// One client with every Page and write access.
pub fn credentials() -> Credentials {
    Credentials {
        system_user_token: SYSTEM_TOKEN.to_string(),
        app_secret: APP_SECRET.to_string(),
        admin_token: None,
        clients: vec![TestClient::new("bench", CLIENT_KEY, &["*"], true)],
    }
}

/// Starts the simulated Graph API on a free loopback port, recording nothing and with rate
/// limits no bench reaches.
pub async fn fake_graph() -> FakeGraph {
    let cfg = fake_graph::FakeGraphConfig {
        page_calls_limit: u32::MAX / 2,
        app_calls_limit: u32::MAX / 2,
        ..credentials().graph_config()
    };
    let g = FakeGraph::start(cfg, "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("fake graph starts");
    g.set_record_limit(0);
    g
}

/// The limits and quota of every bench: far above what a bench sends.
const BENCH_TOML: &str = r#"
[server]
max_in_flight = 100000
max_connections = 100000
[upstream]
timeout_ms = 10000
[quota]
page_calls = 1000000000
app_calls = 1000000000
page_window_s = 1
max_queue_depth = 100000
"#;

/// graphgate configuration in front of `upstream`: free ports, one client with every Page,
/// a quota budget no bench reaches, `extra` (TOML) merged over it.
pub fn config(upstream: &str, extra: &str) -> Config {
    let mut table: toml::Table = BENCH_TOML.parse().expect("bench TOML");
    let extra: toml::Table = extra.parse().expect("extra TOML");
    graphgate::testkit::merge_toml(&mut table, extra);
    credentials()
        .gateway_config(upstream, &table.to_string())
        .expect("bench config is valid")
}

/// An in-process gateway (no listener) in front of `upstream`.
pub fn gateway(upstream: &str) -> Arc<Gateway> {
    Arc::new(
        Gateway::new(
            config(upstream, ""),
            "http://graphgate.bench".into(),
            Arc::new(Metrics::new()),
        )
        .expect("gateway builds"),
    )
}

/// A client GET of `path_and_query` (the client key is appended).
pub fn get(path_and_query: &str) -> Request<Full<Bytes>> {
    let sep = if path_and_query.contains('?') {
        '&'
    } else {
        '?'
    };
    Request::get(format!("{path_and_query}{sep}access_token={CLIENT_KEY}"))
        .header("user-agent", "facebook-python-business-sdk/21.0")
        .header("accept", "*/*")
        .body(Full::new(Bytes::new()))
        .expect("valid request")
}

/// The 1 KB node compare.sh serves: Graph-like JSON whose description repeats one sentence,
/// padded to 1 024 bytes (the issue's "1 KB entries").
pub fn compare_node() -> Bytes {
    let desc =
        "Small-batch roasts, single origins and seasonal blends; open seven days. ".repeat(11);
    let mut body = format!(
        r#"{{"id":"1001","name":"Acme Coffee","about":"Small-batch roasts - open 7/7","category":"Coffee Shop","fan_count":12345,"link":"https://www.facebook.com/1001","description":"{desc}"#
    );
    while body.len() < 1022 {
        body.push('.');
    }
    body.push_str("\"}");
    Bytes::from(body)
}

/// About 1 KB of feed with varied words, ids and times: compresses less than compare.sh's node.
pub fn varied_feed() -> Bytes {
    const WORDS: &[&str] = &[
        "opening", "weekend", "roast", "Ethiopia", "limited", "batch", "thanks", "everyone",
        "market", "Saturday", "new", "menu", "oat", "latte", "pastry", "team", "hiring", "barista",
        "closed", "holiday", "order", "online", "pickup", "winter", "blend",
    ];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let posts: Vec<String> = (0..5)
        .map(|_| {
            let msg: Vec<&str> = (0..18).map(|_| WORDS[next() as usize % WORDS.len()]).collect();
            format!(
                r#"{{"id":"1001_{}","message":"{}","created_time":"2026-{:02}-{:02}T{:02}:{:02}:00+0000"}}"#,
                next() % 10_000_000_000,
                msg.join(" "),
                next() % 12 + 1,
                next() % 28 + 1,
                next() % 24,
                next() % 60
            )
        })
        .collect();
    Bytes::from(format!(r#"{{"data":[{}]}}"#, posts.join(",")))
}

/// The cache key a GET of `path` (with a version) looks up on `gw`, for benches that store
/// entries directly instead of filling them through Graph.
pub fn key_for(gw: &Gateway, path: &str) -> CacheKey {
    let uri: http::Uri = path.parse().expect("uri");
    let call = parse_call(
        &http::Method::GET,
        &uri,
        &http::HeaderMap::new(),
        Bytes::new(),
    )
    .expect("parses");
    let identity = gw.tokens.identity_for(call.page());
    let version = call.path.version.as_deref().expect("versioned");
    key::build(version, &call.path.segments, &call.params, &identity).expect("key")
}

/// A 200 reply of `body` with Graph's content type, fresh for an hour.
pub fn entry(body: Bytes) -> Entry {
    Entry::new(
        http::StatusCode::OK,
        vec![(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json; charset=UTF-8"),
        )],
        PreparedBody::plain(body),
        Duration::from_secs(3600),
    )
}
