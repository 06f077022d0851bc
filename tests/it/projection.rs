//! Field subsets from stored supersets: a node read for fields F is answered from a fresh
//! stored reply of the same node whose fields provably hold F, with exactly what Graph
//! returns for F; anything that cannot be proven (a missing field, different modifiers,
//! another version or parameter) goes to Graph.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};

use crate::support::*;

fn q(path: &str) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    format!("{path}{sep}access_token={ADMIN_KEY}")
}

/// What Graph itself returns for `path` (through graphgate, past the cache).
async fn from_graph(s: &Stack, path: &str) -> serde_json::Value {
    let r = s
        .request(
            Method::GET,
            &q(path),
            &[("cache-control", "no-store")],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()
}

async fn projected_hits(s: &Stack) -> f64 {
    let m = s.admin_get("/metrics").await.text();
    metric_value(&m, "graphgate_cache_projected_hits_total", &[])
}

#[tokio::test]
async fn a_read_for_fewer_fields_is_cut_from_a_stored_superset_as_graph_would_answer_it() {
    let s = Stack::start().await;
    let wide = s
        .get(&q("/v21.0/1001?fields=id,name,fan_count,about"))
        .await;
    assert_eq!(wide.header("x-cache"), Some("MISS"));
    let calls = s.graph.stats().requests;

    let narrow = s.get(&q("/v21.0/1001?fields=name,id")).await;
    assert_eq!(narrow.status, StatusCode::OK, "{}", narrow.text());
    assert_eq!(narrow.header("x-cache"), Some("HIT"));
    let status = narrow.header("cache-status").unwrap_or_default();
    assert!(status.contains("detail=projected"), "{status}");
    assert_eq!(s.graph.stats().requests, calls, "no call to Graph");
    // Exactly Graph's answer for these fields (member order aside).
    assert_eq!(
        narrow.json(),
        from_graph(&s, "/v21.0/1001?fields=name,id").await
    );
    // The cut-down reply is now an entry of its own: a plain hit.
    let again = s.get(&q("/v21.0/1001?fields=id,name")).await;
    let status = again.header("cache-status").unwrap_or_default();
    assert!(
        status.starts_with("graphgate; hit") && !status.contains("projected"),
        "{status}"
    );
    assert_eq!(projected_hits(&s).await, 1.0);
    s.stop().await;
}

#[tokio::test]
async fn what_a_stored_reply_cannot_prove_goes_to_graph() {
    let s = Stack::start().await;
    s.get(&q("/v21.0/1001?fields=id,name")).await;
    s.get(&q("/v21.0/1001?fields=feed.limit(2){message}")).await;
    let cases = [
        // A field the stored reply was not asked for.
        "/v21.0/1001?fields=name,about",
        // The same edge with other modifiers.
        "/v21.0/1001?fields=feed.limit(1){message}",
        // Another version, another parameter: another base.
        "/v20.0/1001?fields=name,id",
        "/v21.0/1001?fields=name,id&locale=fr_FR",
        // An alias is another member name.
        "/v21.0/1001?fields=name.as(title),id",
    ];
    for path in cases {
        let before = s.graph.stats().requests;
        let r = s.get(&q(path)).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text());
        assert_eq!(r.header("x-cache"), Some("MISS"), "{path}");
        assert_eq!(s.graph.stats().requests, before + 1, "{path}");
        assert_eq!(r.json(), from_graph(&s, path).await, "{path}");
    }
    assert_eq!(projected_hits(&s).await, 0.0);
    s.stop().await;
}

#[tokio::test]
async fn id_is_returned_as_graph_returns_it_and_a_write_drops_the_cut_copy() {
    let s = Stack::start().await;
    s.get(&q("/v21.0/1001?fields=id,name,about,fan_count"))
        .await;
    // Whether Graph adds `id` unasked is not known yet: to Graph.
    let r = s.get(&q("/v21.0/1001?fields=name")).await;
    assert_eq!(r.header("x-cache"), Some("MISS"));
    // Now it is (this Graph does not): projected without `id`, as Graph answers.
    let r = s.get(&q("/v21.0/1001?fields=about,fan_count")).await;
    assert_eq!(r.header("x-cache"), Some("HIT"), "{:?}", r.headers);
    assert_eq!(
        r.json(),
        from_graph(&s, "/v21.0/1001?fields=about,fan_count").await
    );
    assert!(r.json().get("id").is_none(), "{}", r.text());

    // A write to the node drops the superset and the cut copy alike.
    let w = s.post_form(&q("/v21.0/1001"), "about=Changed").await;
    assert_eq!(w.status, StatusCode::OK, "{}", w.text());
    let r = s.get(&q("/v21.0/1001?fields=about,fan_count")).await;
    assert_eq!(r.header("x-cache"), Some("MISS"));
    s.stop().await;
}

#[tokio::test]
async fn project_fields_off_keeps_exact_key_caching() {
    let s = Stack::start_with(graph_config(), "[cache]\nproject_fields = false\n").await;
    s.get(&q("/v21.0/1001?fields=id,name,fan_count")).await;
    let r = s.get(&q("/v21.0/1001?fields=name,id")).await;
    assert_eq!(r.header("x-cache"), Some("MISS"));
    assert_eq!(s.graph.stats().requests, 2);
    assert_eq!(projected_hits(&s).await, 0.0);
    // Nothing would read the projection index: stored replies are not noted in it.
    assert!(s.gw.gateway.cache.projections.is_empty());
    s.stop().await;
}

// Union fills: concurrent misses for one node with different fields share one call.

async fn counter(s: &Stack, name: &str) -> f64 {
    let m = s.admin_get("/metrics").await.text();
    metric_value(&m, name, &[])
}

/// The `fields` of each call Graph received for `node`.
fn fields_sent(s: &Stack, node: &str) -> Vec<String> {
    s.graph
        .requests()
        .iter()
        .filter(|r| r.path.ends_with(&format!("/{node}")))
        .map(|r| {
            r.query
                .iter()
                .chain(&r.form)
                .find(|(k, _)| k == "fields")
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        })
        .collect()
}

/// Teaches graphgate that this Graph does not add `id` to replies that did not ask for it
/// (until it knows, no cut that leaves `id` out is made).
async fn learn_id_habit(s: &Stack) {
    let r = s.get(&q("/v21.0/1002?fields=name")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

#[tokio::test]
async fn a_miss_covered_by_a_call_in_flight_waits_for_it() {
    let s = Stack::start().await;
    learn_id_habit(&s).await;
    s.graph.set_latency(std::time::Duration::from_millis(1500));
    let wide = get_in_background(&s, "/v21.0/1001?fields=id,name,about");
    // Once Graph has the wide call, a read for some of its fields joins it.
    wait_until_graph_has(&s, "1001").await;
    let narrow = s.get(&q("/v21.0/1001?fields=about")).await;
    assert_eq!(narrow.status, StatusCode::OK, "{}", narrow.text());
    let status = narrow.header("cache-status").unwrap_or_default();
    assert!(
        status.contains("detail=union") && status.contains("collapsed"),
        "{status}"
    );
    let wide = wide.await.unwrap();
    assert_eq!(wide.status, StatusCode::OK);
    assert_eq!(fields_sent(&s, "1001").len(), 1, "one call to Graph");
    s.graph.set_latency(std::time::Duration::ZERO);
    assert_eq!(
        narrow.json(),
        from_graph(&s, "/v21.0/1001?fields=about").await
    );
    assert_eq!(counter(&s, "graphgate_cache_coalesced_total").await, 1.0);
    s.stop().await;
}

/// Sends a GET of `path` (the client key appended) in a task of its own.
fn get_in_background(s: &Stack, path: &str) -> tokio::task::JoinHandle<Reply> {
    let http = client();
    let url = format!("{}{}", s.gw.url(), q(path));
    let secrets = s.secrets();
    tokio::spawn(async move { send(&http, Method::GET, &url, &[], Bytes::new(), &secrets).await })
}

/// Waits until Graph has received a call for `node`.
async fn wait_until_graph_has(s: &Stack, node: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while fields_sent(s, node).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no call for {node} reached Graph"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Sends reads of `paths` at once; returns the replies in order.
async fn paths_at_once(s: &Stack, paths: &[String]) -> Vec<Reply> {
    let handles: Vec<_> = paths.iter().map(|p| get_in_background(s, p)).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("request task"));
    }
    out
}

/// Sends `fields` reads of `node` at once; returns the replies in order.
async fn at_once(s: &Stack, node: &str, fields: &[&str]) -> Vec<Reply> {
    let paths: Vec<String> = fields
        .iter()
        .map(|f| format!("/v21.0/{node}?fields={f}"))
        .collect();
    paths_at_once(s, &paths).await
}

#[tokio::test]
async fn misses_within_the_window_are_one_call_for_the_union_and_each_gets_its_fields() {
    let s = Stack::start_with(graph_config(), "[cache]\nunion_window_ms = 50\n").await;
    learn_id_habit(&s).await;
    let wanted = ["id,message", "created_time", "message,created_time"];
    // Arrival within 50 ms is up to the scheduler: a round whose reads did not meet is
    // still checked for correct replies, and another node is tried.
    let mut unioned = false;
    for n in 1..=5 {
        let node = format!("1001_{n}");
        let replies = at_once(&s, &node, &wanted).await;
        for (f, r) in wanted.iter().zip(&replies) {
            assert_eq!(r.status, StatusCode::OK, "{f}: {}", r.text());
            assert_eq!(
                r.json(),
                from_graph(&s, &format!("/v21.0/{node}?fields={f}")).await,
                "{f}"
            );
        }
        let sent: Vec<String> = fields_sent(&s, &node)
            .into_iter()
            .filter(|f| !f.is_empty())
            .collect();
        // The replies compared above went past the cache: count only the reads' own calls.
        let own = sent.len() - wanted.len();
        if own == 1 {
            assert_eq!(
                sent[0], "created_time,id,message",
                "the union, in canonical form"
            );
            for r in &replies {
                let status = r.header("cache-status").unwrap_or_default();
                assert!(status.starts_with("graphgate; fwd=miss"), "{status}");
            }
            let unions = replies
                .iter()
                .filter(|r| {
                    r.header("cache-status")
                        .is_some_and(|v| v.contains("detail=union"))
                })
                .count();
            assert!(unions >= 2, "at least two callers were cut from the union");
            unioned = true;
            break;
        }
    }
    assert!(unioned, "no round of concurrent misses shared a call");
    assert!(counter(&s, "graphgate_cache_union_fills_total").await >= 1.0);
    // The union's reply is stored: a later subset is a projected hit.
    let r = s.get(&q("/v21.0/1001_1?fields=message")).await;
    assert_eq!(r.header("x-cache"), Some("HIT"), "{:?}", r.headers);
    s.stop().await;
}

#[tokio::test]
async fn a_union_graph_rejects_sends_each_caller_to_graph_alone() {
    let s = Stack::start_with(graph_config(), "[cache]\nunion_window_ms = 50\n").await;
    learn_id_habit(&s).await;
    let mut unioned = false;
    for n in 1..=5 {
        let node = format!("1001_{n}");
        let fallbacks = counter(&s, "graphgate_cache_union_fallbacks_total").await;
        let replies = at_once(&s, &node, &["id,message", "no_such_field"]).await;
        // Whether or not the two met, the good read gets its fields and the bad one Graph's
        // error for its own field.
        assert_eq!(replies[0].status, StatusCode::OK, "{}", replies[0].text());
        assert_eq!(
            replies[0].json(),
            from_graph(&s, &format!("/v21.0/{node}?fields=id,message")).await
        );
        assert_eq!(replies[1].status, StatusCode::BAD_REQUEST);
        assert_eq!(replies[1].error_code(), 100, "{}", replies[1].text());
        assert!(
            replies[1].text().contains("no_such_field"),
            "{}",
            replies[1].text()
        );
        if counter(&s, "graphgate_cache_union_fallbacks_total").await >= fallbacks + 2.0 {
            let sent = fields_sent(&s, &node);
            assert!(
                sent.iter().any(|f| f == "id,message,no_such_field"),
                "{sent:?}"
            );
            unioned = true;
            break;
        }
    }
    assert!(unioned, "no round of concurrent misses shared a call");
    s.stop().await;
}

#[tokio::test]
async fn without_a_window_concurrent_different_fields_each_make_their_own_call() {
    let s = Stack::start().await;
    learn_id_habit(&s).await;
    let replies = at_once(&s, "1001_1", &["id,message", "created_time"]).await;
    for r in &replies {
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    let sent = fields_sent(&s, "1001_1");
    assert!(
        sent.iter()
            .all(|f| f == "id,message" || f == "created_time"),
        "{sent:?}"
    );
    assert_eq!(counter(&s, "graphgate_cache_union_fills_total").await, 0.0);
    s.stop().await;
}

#[tokio::test]
async fn ids_members_are_cut_from_stored_supersets() {
    let s = Stack::start().await;
    learn_id_habit(&s).await;
    let wide = s
        .get(&q(
            "/v21.0/?ids=1001_1,1001_2&fields=id,message,created_time",
        ))
        .await;
    assert_eq!(wide.status, StatusCode::OK, "{}", wide.text());
    let calls = s.graph.stats().requests;
    let projected = projected_hits(&s).await;
    let narrow = s.get(&q("/v21.0/?ids=1001_2,1001_1&fields=message")).await;
    assert_eq!(narrow.status, StatusCode::OK, "{}", narrow.text());
    assert_eq!(
        narrow.header("x-cache"),
        Some("HIT"),
        "{:?}",
        narrow.headers
    );
    assert_eq!(s.graph.stats().requests, calls, "no call to Graph");
    assert_eq!(projected_hits(&s).await, projected + 2.0);
    assert_eq!(
        narrow.json(),
        from_graph(&s, "/v21.0/?ids=1001_2,1001_1&fields=message").await
    );
    // A member the stored replies cannot prove goes to Graph with the rest cut locally.
    let mixed = s
        .get(&q("/v21.0/?ids=1001_1,1001_3&fields=id,message"))
        .await;
    assert_eq!(mixed.status, StatusCode::OK, "{}", mixed.text());
    let status = mixed.header("cache-status").unwrap_or_default();
    assert!(status.contains("fwd=partial"), "{status}");
    let sent = s.graph.requests();
    let last = sent.last().expect("a call");
    let ids = last
        .query
        .iter()
        .find(|(k, _)| k == "ids")
        .map(|(_, v)| v.as_str());
    assert_eq!(ids, Some("1001_3"), "only the unproven member is fetched");
    assert_eq!(
        mixed.json(),
        from_graph(&s, "/v21.0/?ids=1001_1,1001_3&fields=id,message").await
    );
    s.stop().await;
}

// Merged node reads: concurrent misses for nodes of one Page in one `ids=` call.

#[tokio::test]
async fn misses_for_nodes_of_one_page_within_the_window_are_one_ids_call() {
    let s = Stack::start_with(graph_config(), "[cache]\nmerge_window_ms = 50\n").await;
    let mut merged = false;
    for round in 0..5 {
        let nodes: Vec<String> = (1..=4).map(|n| format!("1001_{}", round * 4 + n)).collect();
        let paths: Vec<String> = nodes
            .iter()
            .map(|n| format!("/v21.0/{n}?fields=id,message"))
            .collect();
        let before = s.graph.stats();
        let replies = paths_at_once(&s, &paths).await;
        let after = s.graph.stats();
        for (p, r) in paths.iter().zip(&replies) {
            assert_eq!(r.status, StatusCode::OK, "{p}: {}", r.text());
            assert_eq!(r.header("x-cache"), Some("MISS"), "{p}");
        }
        // Graph counts one call per id however they came.
        assert_eq!(after.calls - before.calls, 4, "{:?}", s.graph.requests());
        for (p, r) in paths.iter().zip(&replies) {
            assert_eq!(r.json(), from_graph(&s, p).await, "{p}");
        }
        if after.requests - before.requests < 4 {
            let ids_call = s
                .graph
                .requests()
                .into_iter()
                .find(|r| {
                    r.query
                        .iter()
                        .any(|(k, v)| k == "ids" && v.contains(&nodes[0]))
                })
                .or_else(|| {
                    s.graph.requests().into_iter().find(|r| {
                        r.query
                            .iter()
                            .any(|(k, v)| k == "ids" && v.contains(&nodes[1]))
                    })
                });
            assert!(ids_call.is_some(), "an ids= call carried the merged nodes");
            merged = true;
            // Each member was stored under its node's own key.
            for p in &paths {
                assert_eq!(s.get(&q(p)).await.header("x-cache"), Some("HIT"), "{p}");
            }
            break;
        }
    }
    assert!(merged, "no round of concurrent misses was merged");
    assert!(counter(&s, "graphgate_cache_merged_fills_total").await >= 1.0);
    s.stop().await;
}

#[tokio::test]
async fn a_merged_call_graph_rejects_sends_each_read_to_graph_alone() {
    let s = Stack::start_with(graph_config(), "[cache]\nmerge_window_ms = 50\n").await;
    let mut merged = false;
    for round in 0..5 {
        let good = format!("/v21.0/1001_{}?fields=id,message", round + 1);
        let bad = format!("/v21.0/1001_{}?fields=id,message", 9000 + round);
        let merges = counter(&s, "graphgate_cache_merged_fills_total").await;
        let replies = paths_at_once(&s, &[good.clone(), bad.clone()]).await;
        assert_eq!(replies[0].status, StatusCode::OK, "{}", replies[0].text());
        assert_eq!(replies[0].json(), from_graph(&s, &good).await);
        let direct = s
            .request(
                Method::GET,
                &q(&bad),
                &[("cache-control", "no-store")],
                Bytes::new(),
            )
            .await;
        assert_eq!(replies[1].status, direct.status, "{}", replies[1].text());
        // Graph's own error for the bad node (its trace id aside).
        assert_eq!(
            replies[1].json()["error"]["message"],
            direct.json()["error"]["message"]
        );
        assert_eq!(replies[1].error_code(), direct.error_code());
        if counter(&s, "graphgate_cache_merged_fills_total").await > merges {
            merged = true;
            break;
        }
    }
    assert!(merged, "no round of concurrent misses was merged");
    s.stop().await;
}

#[tokio::test]
async fn an_ids_member_waits_for_a_node_read_in_flight_that_covers_it() {
    let s = Stack::start().await;
    learn_id_habit(&s).await;
    s.graph.set_latency(std::time::Duration::from_millis(1500));
    let single = get_in_background(&s, "/v21.0/1001_1?fields=id,message,created_time");
    wait_until_graph_has(&s, "1001_1").await;
    let ids = s
        .get(&q("/v21.0/?ids=1001_1,1001_2&fields=id,message"))
        .await;
    assert_eq!(ids.status, StatusCode::OK, "{}", ids.text());
    assert_eq!(single.await.unwrap().status, StatusCode::OK);
    let sent: Vec<String> = s
        .graph
        .requests()
        .iter()
        .filter_map(|r| {
            r.query
                .iter()
                .find(|(k, _)| k == "ids")
                .map(|(_, v)| v.clone())
        })
        .collect();
    assert_eq!(sent, ["1001_2"], "only the member no call was fetching");
    s.graph.set_latency(std::time::Duration::ZERO);
    assert_eq!(
        ids.json(),
        from_graph(&s, "/v21.0/?ids=1001_1,1001_2&fields=id,message").await
    );
    s.stop().await;
}

#[tokio::test]
async fn a_leader_whose_client_hangs_up_still_fills_for_the_reads_that_joined_it() {
    let s = Stack::start().await;
    learn_id_habit(&s).await;
    let node = "1001_7";
    let before = s.graph.stats().requests;
    s.graph.set_latency(Duration::from_millis(800));
    // The leader: a raw connection, so the test can hang it up mid-call.
    let mut leader = tokio::net::TcpStream::connect(s.gw.addr).await.unwrap();
    let head = format!(
        "GET {} HTTP/1.1\r\nhost: x\r\n\r\n",
        q(&format!("/v21.0/{node}?fields=id,message"))
    );
    tokio::io::AsyncWriteExt::write_all(&mut leader, head.as_bytes())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.graph.stats().requests == before {
        assert!(
            Instant::now() < deadline,
            "the leader's call never reached Graph"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A read for fewer fields joins the call in flight.
    let url = format!(
        "{}{}",
        s.gw.url(),
        q(&format!("/v21.0/{node}?fields=message"))
    );
    let secrets = s.secrets();
    let joiner = tokio::spawn(async move {
        send(&client(), Method::GET, &url, &[], Bytes::new(), &secrets).await
    });
    while counter(&s, "graphgate_cache_coalesced_total").await < 1.0 {
        assert!(Instant::now() < deadline, "the second read never joined");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(leader);
    let r = joiner.await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    s.graph.set_latency(Duration::ZERO);
    assert_eq!(
        r.json(),
        from_graph(&s, &format!("/v21.0/{node}?fields=message")).await
    );
    // One call for both (the comparison above went past the cache), and its reply is stored.
    assert_eq!(fields_sent(&s, node), ["id,message", "message"]);
    let r = s.get(&q(&format!("/v21.0/{node}?fields=id,message"))).await;
    assert_eq!(r.header("x-cache"), Some("HIT"), "{:?}", r.headers);
    s.stop().await;
}
