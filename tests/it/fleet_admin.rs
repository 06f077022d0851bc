//! The fleet's admin view: `/admin/pages?scope=fleet` and `/admin/cache` read every live
//! replica's status record from a real redis-server, with a row per replica; without Redis
//! (or with Redis down) they answer with this replica's view alone.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fake_graph::FakeGraph;
use graphgate::server::Running;
use graphgate::testkit::ADMIN_TOKEN;
use http::{Method, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use serde_json::Value;

use crate::redis::{wait_until_redis_up, Fleet, RedisServer};
use crate::support::*;

fn fleet_toml(redis: &RedisServer) -> String {
    format!(
        "[redis]\nurl = \"{}\"\ntimeout_ms = 250\nkey_prefix = \"t:\"\n",
        redis.url()
    )
}

/// What an admin call needs besides the replica: a client and the secrets to look for.
struct Admin {
    http: Client<HttpConnector, Full<Bytes>>,
    secrets: Vec<String>,
}

impl Admin {
    fn of(graph: &FakeGraph) -> Admin {
        Admin {
            http: client(),
            secrets: secrets_of(graph),
        }
    }

    async fn call(&self, via: &Running, path: &str, token: Option<&str>) -> Reply {
        let url = format!("{}{path}", via.admin_url());
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("authorization", a.as_str())).collect();
        send(
            &self.http,
            Method::GET,
            &url,
            &headers,
            Bytes::new(),
            &self.secrets,
        )
        .await
    }
}

async fn admin(f: &Admin, via: &Running, path: &str) -> Value {
    let r = f.call(via, path, Some(ADMIN_TOKEN)).await;
    assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text());
    r.json()
}

fn replica_ids(view: &Value) -> BTreeSet<String> {
    view["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(|r| r["replica"].as_str().expect("replica id").to_string())
        .collect()
}

fn page<'a>(view: &'a Value, id: &str) -> Option<&'a Value> {
    view["pages"].as_array()?.iter().find(|p| p["id"] == id)
}

/// Polls `path` on `via` until `done` holds (records are published every second).
async fn admin_until(
    f: &Admin,
    via: &Running,
    path: &str,
    within: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let until = Instant::now() + within;
    loop {
        let v = admin(f, via, path).await;
        if done(&v) || Instant::now() > until {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Traffic through both replicas; each one's fleet view lists both, each with its own row
/// for the Page, and the fleet's shared count of the Page's calls.
#[tokio::test]
async fn the_fleet_view_from_either_replica_shows_both_replicas_and_the_shared_page_counts() {
    let redis = RedisServer::start();
    let f = Fleet::start_with(&fleet_toml(&redis), graph_config()).await;
    let adm = Admin::of(&f.graph);
    assert!(wait_until_redis_up(&f, &f.a, Duration::from_secs(10)).await);
    assert!(wait_until_redis_up(&f, &f.b, Duration::from_secs(10)).await);
    // Distinct nodes: every call a miss that goes to Graph, charged to Page 1001.
    for (via, n) in [(&f.a, 1), (&f.a, 2), (&f.a, 3), (&f.b, 4), (&f.b, 5)] {
        let r = f.get(via, &format!("/v21.0/1001_{n}?fields=id")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    let stats = f.graph.stats();
    assert_eq!(stats.calls_by_page.get("1001"), Some(&5), "{stats:?}");

    let id_of = |v: Value| v["replica"].as_str().expect("replica id").to_string();
    let a_id = id_of(admin(&adm, &f.a, "/admin/cache").await);
    let b_id = id_of(admin(&adm, &f.b, "/admin/cache").await);
    assert_ne!(a_id, b_id);
    let both: BTreeSet<String> = [a_id.clone(), b_id.clone()].into();

    for via in [&f.a, &f.b] {
        let view = admin_until(
            &adm,
            via,
            "/admin/pages?scope=fleet",
            Duration::from_secs(15),
            |v| {
                replica_ids(v) == both
                    && page(v, "1001")
                        .is_some_and(|p| p["replicas"].as_array().is_some_and(|r| r.len() == 2))
            },
        )
        .await;
        assert_eq!(view["fleet"], true, "{view}");
        assert!(view.get("explanation").is_none(), "{view}");
        assert_eq!(replica_ids(&view), both, "{view}");
        let p = page(&view, "1001").unwrap_or_else(|| panic!("Page 1001 listed: {view}"));
        assert_eq!(
            p["shared"]["calls_in_window"], 5,
            "the fleet's count from Redis: {view}"
        );
        assert_eq!(p["shared"]["known"], true, "{view}");
        let rows = p["replicas"].as_array().expect("rows");
        let calls = |id: &str| {
            rows.iter()
                .find(|r| r["replica"] == id)
                .and_then(|r| r["calls_in_window"].as_u64())
                .unwrap_or_else(|| panic!("a row for {id}: {view}"))
        };
        assert_eq!(calls(&a_id), 3, "a sent 3: {view}");
        assert_eq!(calls(&b_id), 2, "b sent 2: {view}");
        for r in view["replicas"].as_array().expect("replicas") {
            assert!(
                r["public_url"]
                    .as_str()
                    .is_some_and(|u| u.starts_with("http://")),
                "{view}"
            );
            assert!(r["pid"].as_u64().is_some() && r["started_at"].as_u64().is_some());
            assert_eq!(r["version"], env!("CARGO_PKG_VERSION"));
        }
    }

    // One read through a, then twice through b: b's row shows its own in-process hit.
    for via in [&f.a, &f.b, &f.b] {
        assert_eq!(
            f.get(via, "/v21.0/1001?fields=id,name").await.status,
            StatusCode::OK
        );
    }
    let cache = admin_until(&adm, &f.a, "/admin/cache", Duration::from_secs(15), |v| {
        v["replicas"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["replica"] == b_id && r["hits"] != 0))
    })
    .await;
    assert_eq!(cache["fleet"], true, "{cache}");
    assert_eq!(replica_ids(&cache), both, "{cache}");
    assert!(
        cache["cache"]["misses"].as_u64().unwrap_or(0) >= 4,
        "{cache}"
    );
    let row = |id: &str| {
        cache["replicas"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["replica"] == id))
            .cloned()
            .unwrap_or_else(|| panic!("a row for {id}: {cache}"))
    };
    assert!(row(&b_id)["hits"].as_u64().unwrap_or(0) >= 1, "{cache}");
    assert!(
        row(&b_id)["shared_hits"].as_u64().unwrap_or(0) >= 1,
        "{cache}"
    );
    assert!(row(&a_id)["entries"].as_u64().unwrap_or(0) >= 1, "{cache}");
    assert!(row(&a_id)["max_bytes"].as_u64().unwrap_or(0) > 0, "{cache}");
    f.stop().await;
}

/// A record expires with the heartbeat's TTL, and a replica that stops leaves the view.
#[tokio::test]
async fn a_stopped_replica_leaves_the_fleet_view() {
    let redis = RedisServer::start();
    let Fleet { graph, a, b, .. } = Fleet::start_with(&fleet_toml(&redis), graph_config()).await;
    let adm = Admin::of(&graph);
    let b_id = admin(&adm, &b, "/admin/cache").await["replica"]
        .as_str()
        .expect("replica id")
        .to_string();
    let view = admin_until(&adm, &a, "/admin/cache", Duration::from_secs(15), |v| {
        replica_ids(v).len() == 2
    })
    .await;
    assert_eq!(replica_ids(&view).len(), 2, "{view}");
    let key = format!("t:{{fleet}}:status:{b_id}");
    let out = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "PTTL", &key])
        .output()
        .expect("redis-cli comes with redis-server");
    let pttl: i64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(-3);
    assert!(
        pttl > 0 && pttl <= 3000,
        "the record expires with the heartbeat: {pttl}"
    );

    // A replica that vanished without a goodbye (a crash): its record outlives it by at
    // most the TTL, then the view drops it, even while the heartbeat set still names it.
    let ghost = serde_json::json!({
        "v": 1, "replica": "00000000deadbeef", "host": "gone", "pid": 1,
        "public_url": "http://10.0.0.9:8080", "started_at": 1, "version": "0.0.0",
        "cache": {"entries": 0, "bytes": 0, "max_bytes": 0, "hits": 0, "misses": 0,
                  "stale": 0, "shared_hits": 0, "shared_misses": 0},
        "pages": [],
    });
    let cli = |args: &[&str]| {
        let out = Command::new("redis-cli")
            .args(["-p", &redis.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        assert!(out.status.success());
    };
    cli(&[
        "ZADD",
        "t:{fleet}:replicas",
        "9000000000000",
        "00000000deadbeef",
    ]);
    cli(&[
        "SET",
        "t:{fleet}:status:00000000deadbeef",
        &ghost.to_string(),
        "PX",
        "4000",
    ]);
    let with_ghost = |v: &Value| replica_ids(v).contains("00000000deadbeef");
    let seen = admin(&adm, &a, "/admin/cache").await;
    let gone = admin_until(&adm, &a, "/admin/cache", Duration::from_secs(15), |v| {
        !with_ghost(v)
    })
    .await;
    assert!(with_ghost(&seen), "{seen}");
    assert!(!with_ghost(&gone), "{gone}");

    b.shutdown().await;
    let view = admin_until(
        &adm,
        &a,
        "/admin/pages?scope=fleet",
        Duration::from_secs(15),
        |v| replica_ids(v).len() == 1,
    )
    .await;
    assert!(!replica_ids(&view).contains(&b_id), "{view}");
    assert_eq!(view["fleet"], true, "{view}");
    a.shutdown().await;
    graph.shutdown();
}

/// With Redis down, both views still answer: this replica's rows and why.
#[tokio::test]
async fn with_redis_down_the_views_are_local_and_say_why() {
    let mut redis = RedisServer::start();
    let f = Fleet::start_with(&fleet_toml(&redis), graph_config()).await;
    let adm = Admin::of(&f.graph);
    assert!(wait_until_redis_up(&f, &f.a, Duration::from_secs(10)).await);
    assert_eq!(
        f.get(&f.a, "/v21.0/1001_1?fields=id").await.status,
        StatusCode::OK
    );
    redis.kill();
    for path in ["/admin/pages?scope=fleet", "/admin/cache"] {
        let view = admin_until(&adm, &f.a, path, Duration::from_secs(15), |v| {
            v["fleet"] == false
        })
        .await;
        assert_eq!(view["fleet"], false, "{view}");
        assert!(
            view["explanation"]
                .as_str()
                .is_some_and(|e| e.contains("Redis")),
            "{view}"
        );
        assert_eq!(replica_ids(&view).len(), 1, "{view}");
    }
    f.stop().await;
}

/// Without Redis: the local view in the same shape, a single row, `"fleet": false`; the
/// admin token is required and an unknown scope is refused.
#[tokio::test]
async fn without_redis_the_views_are_local_and_need_the_admin_token() {
    let s = Stack::start().await;
    let adm = Admin::of(&s.graph);
    assert_eq!(
        s.get(&format!("/v21.0/1001_1?fields=id&access_token={ADMIN_KEY}"))
            .await
            .status,
        StatusCode::OK
    );
    let pages = admin(&adm, &s.gw, "/admin/pages?scope=fleet").await;
    assert_eq!(pages["fleet"], false, "{pages}");
    assert!(pages.get("explanation").is_none(), "{pages}");
    assert_eq!(replica_ids(&pages).len(), 1, "{pages}");
    let p = page(&pages, "1001").unwrap_or_else(|| panic!("Page 1001 listed: {pages}"));
    assert!(p["shared"].is_null(), "{pages}");
    assert_eq!(p["replicas"][0]["calls_in_window"], 1, "{pages}");
    let cache = admin(&adm, &s.gw, "/admin/cache").await;
    assert_eq!(cache["fleet"], false, "{cache}");
    assert_eq!(replica_ids(&cache).len(), 1, "{cache}");
    assert_eq!(cache["cache"]["misses"], 1, "{cache}");
    // The local view stays the default.
    let local = admin(&adm, &s.gw, "/admin/pages").await;
    assert!(
        local.get("fleet").is_none() && local["buckets"].is_u64(),
        "{local}"
    );

    for path in ["/admin/pages?scope=fleet", "/admin/cache", "/admin/pages"] {
        for token in [None, Some("wrong")] {
            let r = adm.call(&s.gw, path, token).await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path}");
            assert_eq!(r.error_code(), 190);
        }
    }
    let r = adm
        .call(&s.gw, "/admin/pages?scope=galaxy", Some(ADMIN_TOKEN))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert_eq!(r.error_code(), 100);
    s.stop().await;
}
