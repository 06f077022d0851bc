//! Meta Webhooks: the subscription handshake, and signed Page change notifications that purge
//! what they name — on the replica that got them and, through Redis, on the others. A
//! notification that is unsigned, wrongly signed, stale, replayed or unreadable purges
//! nothing. The simulated Graph's data is changed directly (as another app would), so a
//! read that shows the change proves the purge.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fake_graph::FakeGraph;
use graphgate::config::Config;
use graphgate::server::{self, Running};
use graphgate::webhooks::sign;
use http::{Method, StatusCode};

use crate::redis::RedisServer;
use crate::support::*;

const HOOKS: &str = "[webhooks]\npath = \"/webhooks\"\nverify_token = \"verify-me-0001\"\n";
const POST: &str = "/1001_60?fields=message";
const FEED: &str = "/1001/feed?fields=id,message&limit=3";
const PAGE: &str = "/1001?fields=name";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// A feed notification for a post of Page 1001, as Meta sends it.
fn post_edited(post: &str, time: u64) -> Bytes {
    Bytes::from(
        serde_json::json!({"object":"page","entry":[{"id":"1001","time":time,"changes":[
            {"field":"feed","value":{"item":"status","verb":"edited","post_id":post,
             "message":"edited elsewhere","created_time":time}}]}]})
        .to_string(),
    )
}

/// Edits a post on the simulated Graph directly, not through graphgate.
async fn edit_on_graph(graph: &FakeGraph, post: &str, message: &str) {
    let proof = graph.proof_for(SYSTEM_TOKEN).unwrap_or_default();
    let url = format!("{}/v21.0/{post}", graph.url());
    let form = format!(
        "message={}&access_token={SYSTEM_TOKEN}&appsecret_proof={proof}",
        message.replace(' ', "+")
    );
    let r = send(
        &client(),
        Method::POST,
        &url,
        &[("content-type", "application/x-www-form-urlencoded")],
        Bytes::from(form),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

async fn deliver(via: &Running, signature: Option<&str>, body: Bytes) -> Reply {
    let mut headers = vec![("content-type", "application/json")];
    if let Some(s) = signature {
        headers.push(("x-hub-signature-256", s));
    }
    send(
        &client(),
        Method::POST,
        &format!("{}/webhooks", via.url()),
        &headers,
        body,
        &[APP_SECRET.to_string(), "verify-me-0001".to_string()],
    )
    .await
}

async fn read(via: &Running, path: &str) -> Reply {
    let sep = if path.contains('?') { '&' } else { '?' };
    let r = send(
        &client(),
        Method::GET,
        &format!("{}{path}{sep}access_token={ADMIN_KEY}", via.url()),
        &[],
        Bytes::new(),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text());
    r
}

async fn all_hits(via: &Running) -> bool {
    for path in [POST, FEED, PAGE] {
        if read(via, path).await.header("x-cache") != Some("HIT") {
            return false;
        }
    }
    true
}

async fn outcome_count(via: &Running, outcome: &str) -> f64 {
    let m = send(
        &client(),
        Method::GET,
        &format!("{}/metrics", via.admin_url()),
        &[],
        Bytes::new(),
        &[],
    )
    .await
    .text();
    metric_value(
        &m,
        "graphgate_webhook_notifications_total",
        &[&format!("outcome=\"{outcome}\"")],
    )
}

#[tokio::test]
async fn the_subscription_handshake_echoes_the_challenge_only_for_the_verify_token() {
    let s = Stack::start_with(graph_config(), HOOKS).await;
    let ok = s
        .get(
            "/webhooks?hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token=verify-me-0001",
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(ok.text(), "1158201444");
    for query in [
        "hub.mode=subscribe&hub.challenge=1&hub.verify_token=verify-me-0002",
        "hub.mode=subscribe&hub.challenge=1&hub.verify_token=",
        "hub.mode=subscribe&hub.challenge=1",
        "hub.mode=unsubscribe&hub.challenge=1&hub.verify_token=verify-me-0001",
    ] {
        let r = s.get(&format!("/webhooks?{query}")).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{query}");
        assert_eq!(r.json()["error"]["code"], 10, "{}", r.text());
        assert!(!r.text().contains("verify-me"), "{}", r.text());
    }
    let r = s
        .request(Method::DELETE, "/webhooks", &[], Bytes::new())
        .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(s.graph.stats().requests, 0, "nothing went to Graph");
    assert_eq!(outcome_count(&s.gw, "verified").await, 1.0);
    assert_eq!(outcome_count(&s.gw, "handshake_refused").await, 4.0);
    // Without `[webhooks]` the path is an ordinary (unknown-key) Graph request.
    let plain = Stack::start().await;
    let r = plain
        .get("/webhooks?hub.mode=subscribe&hub.challenge=1&hub.verify_token=verify-me-0001")
        .await;
    assert_ne!(r.status, StatusCode::OK);
    plain.stop().await;
    s.stop().await;
}

#[tokio::test]
async fn only_a_signed_recent_new_notification_purges_and_it_purges_what_it_names() {
    let s = Stack::start_with(graph_config(), HOOKS).await;
    for path in [POST, FEED, PAGE] {
        read(&s.gw, path).await;
    }
    assert!(all_hits(&s.gw).await);
    edit_on_graph(&s.graph, "1001_60", "edited elsewhere").await;
    let body = post_edited("1001_60", now());
    let good = sign(APP_SECRET, &body);

    // Refused: no signature, another secret's, a signature of another body, a stale or
    // future delivery. Each is a 403 and purges nothing.
    let other_body = post_edited("1001_61", now());
    let refused: Vec<(Option<String>, Bytes)> = vec![
        (None, body.clone()),
        (Some(sign("not-the-app-secret", &body)), body.clone()),
        (Some(sign(APP_SECRET, &other_body)), body.clone()),
        (Some(good.replace("sha256=", "sha1=")), body.clone()),
        (
            Some(sign(APP_SECRET, &post_edited("1001_60", now() - 7200))),
            post_edited("1001_60", now() - 7200),
        ),
        (
            Some(sign(APP_SECRET, &post_edited("1001_60", now() + 7200))),
            post_edited("1001_60", now() + 7200),
        ),
    ];
    for (signature, body) in refused {
        let r = deliver(&s.gw, signature.as_deref(), body).await;
        assert_eq!(
            r.status,
            StatusCode::FORBIDDEN,
            "{signature:?}: {}",
            r.text()
        );
        assert_eq!(r.json()["error"]["error_subcode"], 2_446_040);
    }
    // Signed but unreadable: 400, nothing purged.
    let junk = Bytes::from_static(b"{\"object\":\"page\",\"entry\":");
    let r = deliver(&s.gw, Some(&sign(APP_SECRET, &junk)), junk).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert!(all_hits(&s.gw).await, "a refused delivery purged something");
    assert_ne!(
        read(&s.gw, POST).await.json()["message"],
        "edited elsewhere"
    );

    // The real one: the post, the Page and its edges are read again from Graph.
    let calls = s.graph.stats().requests;
    let r = deliver(&s.gw, Some(&good), body.clone()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["success"], true);
    let post = read(&s.gw, POST).await;
    assert_eq!(post.json()["message"], "edited elsewhere");
    assert_eq!(post.header("x-cache"), Some("MISS"));
    assert_eq!(read(&s.gw, FEED).await.header("x-cache"), Some("MISS"));
    assert_eq!(read(&s.gw, PAGE).await.header("x-cache"), Some("MISS"));
    assert_eq!(s.graph.stats().requests, calls + 3);
    // Another Page's entries stay.
    read(&s.gw, "/1002?fields=name").await;

    // The same delivery again (a replay, or Meta retrying): acknowledged, nothing purged.
    assert!(all_hits(&s.gw).await);
    let r = deliver(&s.gw, Some(&good), body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(all_hits(&s.gw).await, "a replayed delivery purged again");

    for (outcome, n) in [
        ("bad_signature", 4.0),
        ("stale", 2.0),
        ("malformed", 1.0),
        ("purged", 1.0),
        ("replayed", 1.0),
    ] {
        assert_eq!(outcome_count(&s.gw, outcome).await, n, "{outcome}");
    }
    s.stop().await;
}

/// A delivery to one replica purges the other's copies (in-process and Redis) within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_to_one_replica_purges_the_other_within_a_second() {
    let redis = RedisServer::start();
    let graph = FakeGraph::start(graph_config(), "127.0.0.1:0".parse().expect("address"))
        .await
        .expect("fake graph starts");
    let extra = format!(
        "{HOOKS}[redis]\nurl = \"{}\"\ntimeout_ms = 250\nkey_prefix = \"t:\"\n",
        redis.url()
    );
    let toml = gateway_toml(&graph.url(), &extra);
    let a = server::start(Config::from_toml(&toml, |_| None).expect("valid config"))
        .await
        .expect("replica a starts");
    let b = server::start(Config::from_toml(&toml, |_| None).expect("valid config"))
        .await
        .expect("replica b starts");
    for path in [POST, FEED, PAGE] {
        read(&a, path).await;
        read(&b, path).await;
    }
    assert!(all_hits(&b).await);
    edit_on_graph(&graph, "1001_60", "edited elsewhere").await;
    let body = post_edited("1001_60", now());
    let r = deliver(&a, Some(&sign(APP_SECRET, &body)), body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let delivered = Instant::now();
    let mut fresh = false;
    while delivered.elapsed() < Duration::from_secs(1) {
        if read(&b, POST).await.json()["message"] == "edited elsewhere" {
            fresh = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        fresh,
        "B still served the old post a second after the notification"
    );
    assert_ne!(read(&b, FEED).await.header("x-cache"), Some("HIT"));
    a.shutdown().await;
    b.shutdown().await;
    graph.shutdown();
}
