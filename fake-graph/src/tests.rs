//! Socket-level tests of the fake Graph server: every test talks HTTP over real TCP.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

const SYS: &str = "demo-system-user-token";
/// Generous bound so a loaded 2-core machine never turns a slow reply into a hang.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

async fn start(cfg: FakeGraphConfig) -> FakeGraph {
    FakeGraph::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

async fn start_default() -> FakeGraph {
    start(FakeGraphConfig::default()).await
}

/// `access_token=..&appsecret_proof=..` for `token`.
fn creds(fg: &FakeGraph, token: &str) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    q.append_pair("access_token", token);
    if let Some(p) = fg.proof_for(token) {
        q.append_pair("appsecret_proof", &p);
    }
    q.finish()
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("bad json {e}: {}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn code(&self) -> i64 {
        self.json()["error"]["code"].as_i64().unwrap_or(0)
    }
}

/// Sends raw bytes on a fresh connection and reads until the server closes it. `None` means
/// the connection closed without any reply.
async fn raw(fg: &FakeGraph, request: &[u8]) -> Option<Resp> {
    let mut s = TcpStream::connect(fg.addr()).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(IO_TIMEOUT, s.read_to_end(&mut buf))
        .await
        .expect("reply timed out")
        .ok()?;
    if buf.is_empty() {
        return None;
    }
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8(buf[..split].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some(Resp {
        status,
        headers,
        body: buf[split + 4..].to_vec(),
    })
}

async fn request(fg: &FakeGraph, method: &str, target: &str, extra: &str, body: &str) -> Resp {
    let req = format!(
        "{method} {target} HTTP/1.1\r\nHost: graph.test\r\nConnection: close\r\n{extra}\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    raw(fg, req.as_bytes()).await.expect("no reply")
}

async fn get(fg: &FakeGraph, target: &str) -> Resp {
    request(fg, "GET", target, "", "").await
}

async fn post(fg: &FakeGraph, target: &str, body: &str) -> Resp {
    request(fg, "POST", target, "", body).await
}

/// Turns an absolute paging link into a request-target on the fake.
fn local(link: &str) -> String {
    link.strip_prefix("https://graph.facebook.com")
        .unwrap_or_else(|| panic!("link not at link_base: {link}"))
        .to_string()
}

#[tokio::test]
async fn field_selection_and_headers() {
    let fg = start_default().await;
    let c = creds(&fg, SYS);

    let r = get(&fg, &format!("/v21.0/1001?{c}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"id": "1001", "name": "Acme Coffee"}));
    assert_eq!(r.header("facebook-api-version"), Some("v21.0"));
    assert_eq!(
        r.header("content-type"),
        Some("application/json; charset=UTF-8")
    );
    assert_eq!(
        r.header("cache-control"),
        Some("private, no-cache, no-store, must-revalidate")
    );
    assert!(r
        .header("etag")
        .is_some_and(|t| t.starts_with('"') && t.ends_with('"')));
    for h in [
        "x-fb-trace-id",
        "x-fb-request-id",
        "x-fb-rev",
        "x-business-use-case-usage",
    ] {
        assert!(r.header(h).is_some(), "missing {h}");
    }

    let r = get(
        &fg,
        &format!("/v19.0/1002?fields=id,fan_count,category,link&{c}"),
    )
    .await;
    assert_eq!(r.header("facebook-api-version"), Some("v19.0"));
    assert_eq!(
        r.json(),
        json!({"id": "1002", "fan_count": 67890, "category": "Media/News Company",
               "link": "https://www.facebook.com/1002"})
    );

    let r = get(
        &fg,
        &format!("/1001?fields=feed.limit(2){{id,message}},posts.limit(3)&{c}"),
    )
    .await;
    let v = r.json();
    assert_eq!(v["feed"]["data"].as_array().unwrap().len(), 2);
    assert_eq!(
        v["feed"]["data"][0],
        json!({"id": "1001_60", "message": fg.posts_of("1001")[0].message})
    );
    assert!(v["feed"]["paging"]["next"]
        .as_str()
        .unwrap()
        .contains("/v21.0/1001/feed?"));
    assert_eq!(v["posts"]["data"].as_array().unwrap().len(), 3);
    assert_eq!(
        v["posts"]["data"][2]["created_time"],
        "2026-01-03T09:00:00+0000"
    );

    let r = get(&fg, &format!("/1001?fields=id,nope&{c}")).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.code(), 100);
    assert_eq!(
        r.json()["error"]["message"],
        "(#100) Tried accessing nonexisting field (nope) on node type (Page)"
    );
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert!(r.json()["error"]["fbtrace_id"].is_string());

    let r = get(&fg, &format!("/1001?fields=feed{{id&{c}")).await;
    assert_eq!(r.code(), 100);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Syntax error"));

    // Page tokens: via the field (system user only) and usable for that Page only.
    let r = get(&fg, &format!("/1001?fields=access_token&{c}")).await;
    let page_token = fg.page_token("1001");
    assert_eq!(r.json()["access_token"], page_token.as_str());
    let pc = creds(&fg, &page_token);
    assert_eq!(get(&fg, &format!("/me?{pc}")).await.json()["id"], "1001");
    assert_eq!(
        get(&fg, &format!("/1001_3?fields=id&{pc}")).await.json()["id"],
        "1001_3"
    );
    assert_eq!(get(&fg, &format!("/1002?{pc}")).await.status, 400);
    assert_eq!(
        get(&fg, &format!("/1001?fields=access_token&{pc}"))
            .await
            .code(),
        10
    );

    // /me and /me/accounts (which hands out Page tokens, as real Graph does).
    let r = get(&fg, &format!("/me?{c}")).await;
    assert_eq!(
        r.json(),
        json!({"id": "9000", "name": "graphgate system user"})
    );
    assert!(r.header("x-app-usage").is_some());
    let r = get(&fg, &format!("/me/accounts?{c}")).await;
    assert_eq!(
        r.json()["data"][1]["access_token"],
        fg.page_token("1002").as_str()
    );

    // Unknown nodes and edges.
    let r = get(&fg, &format!("/nosuch?{c}")).await;
    assert_eq!((r.status, r.code()), (400, 100));
    assert_eq!(r.json()["error"]["error_subcode"], 33);
    assert_eq!(r.json()["error"]["type"], "GraphMethodException");
    let r = get(&fg, &format!("/1001/photos?{c}")).await;
    assert_eq!(r.code(), 2500);
    let r = get(&fg, &format!("/1001/photos?suppress_http_code=1&{c}")).await;
    assert_eq!((r.status, r.code()), (200, 2500));
    let r = get(&fg, &format!("/1001?debug=all&{c}")).await;
    assert!(r.json()["__debug__"]["messages"].is_array());
    fg.shutdown();
}

#[tokio::test]
async fn paging_follows_absolute_next_links() {
    let fg = start_default().await;
    let c = creds(&fg, SYS);
    let mut target = format!("/1001/feed?limit=7&{c}");
    let mut ids = Vec::new();
    let mut pages = 0;
    let mut second_page_prev = None;
    loop {
        let v = get(&fg, &target).await.json();
        pages += 1;
        for item in v["data"].as_array().unwrap() {
            ids.push(item["id"].as_str().unwrap().to_string());
            assert!(item["created_time"].is_string() && item["message"].is_string());
        }
        if pages == 2 {
            second_page_prev = v["paging"]["previous"].as_str().map(str::to_string);
        }
        match v["paging"]["next"].as_str() {
            Some(next) => {
                assert!(next.starts_with("https://graph.facebook.com/v21.0/1001/feed?"));
                assert!(next.contains(&format!("access_token={SYS}")));
                assert!(next.contains("appsecret_proof="));
                target = local(next);
            }
            None => break,
        }
    }
    assert_eq!(pages, 9);
    let expected: Vec<String> = (1..=60).rev().map(|n| format!("1001_{n}")).collect();
    assert_eq!(ids, expected);

    // `previous` from page 2 leads back to page 1.
    let prev = get(&fg, &local(&second_page_prev.unwrap())).await.json();
    assert_eq!(prev["data"][0]["id"], "1001_60");
    assert_eq!(prev["data"].as_array().unwrap().len(), 7);
    assert!(prev["paging"].get("previous").is_none());

    // Limits are clamped, validated and survive absurd values.
    let v = get(
        &fg,
        &format!("/1001/posts?limit=999999999999999999999999&{c}"),
    )
    .await
    .json();
    assert_eq!(v["data"].as_array().unwrap().len(), 60);
    assert!(v["paging"].get("next").is_none());
    assert_eq!(
        get(&fg, &format!("/1001/posts?limit=abc&{c}")).await.code(),
        100
    );
    assert_eq!(
        get(&fg, &format!("/1001/posts?after=%%%&{c}")).await.code(),
        100
    );
    fg.shutdown();
}

#[tokio::test]
async fn json_escapes_slashes_in_raw_bytes() {
    let fg = start_default().await;
    let c = creds(&fg, SYS);
    let r = get(&fg, &format!("/1001/feed?limit=2&{c}")).await;
    let text = r.text();
    assert!(
        text.contains(r"https:\/\/graph.facebook.com\/v21.0\/1001\/feed?"),
        "{text}"
    );
    assert!(!text.contains("https://"), "{text}");
    let r = get(&fg, &format!("/1001?fields=about&{c}")).await;
    assert!(r.text().contains(r"\u2014 open 7\/7"), "{}", r.text());
    assert_eq!(r.json()["about"], "Small-batch roasts \u{2014} open 7/7");
    fg.shutdown();
}

#[tokio::test]
async fn token_and_proof_errors() {
    let fg = start_default().await;

    let r = get(&fg, "/1001").await;
    assert_eq!((r.status, r.code()), (400, 104));
    assert!(r
        .header("www-authenticate")
        .unwrap()
        .starts_with("OAuth \"Facebook Platform\""));

    let r = get(&fg, &format!("/1001?{}", creds(&fg, "bogus"))).await;
    assert_eq!((r.status, r.code()), (400, 190));
    assert_eq!(r.json()["error"]["type"], "OAuthException");
    assert!(r
        .header("www-authenticate")
        .unwrap()
        .contains("\"invalid_token\""));

    let r = get(&fg, &format!("/1001?access_token={SYS}")).await;
    assert_eq!(r.code(), 100);
    assert_eq!(
        r.json()["error"]["message"],
        "API calls from the server require an appsecret_proof argument"
    );
    let r = get(
        &fg,
        &format!("/1001?access_token={SYS}&appsecret_proof=abcd"),
    )
    .await;
    assert_eq!(
        r.json()["error"]["message"],
        "Invalid appsecret_proof provided in the API argument"
    );
    // Nothing that failed authentication was charged.
    assert_eq!(fg.stats().calls, 0);

    // Bearer / OAuth headers are accepted.
    let proof = fg.proof_for(SYS).unwrap();
    for scheme in ["Bearer", "OAuth"] {
        let r = request(
            &fg,
            "GET",
            &format!("/1001?appsecret_proof={proof}"),
            &format!("Authorization: {scheme} {SYS}\r\n"),
            "",
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(
        fg.requests().last().unwrap().access_token.as_deref(),
        Some(SYS)
    );

    // Revoked tokens are "expired".
    let pt = fg.page_token("1002");
    assert_eq!(
        get(&fg, &format!("/1002?{}", creds(&fg, &pt))).await.status,
        200
    );
    fg.revoke_token(&pt);
    let r = get(&fg, &format!("/1002?{}", creds(&fg, &pt))).await;
    assert_eq!(
        (r.code(), r.json()["error"]["error_subcode"].as_i64()),
        (190, Some(463))
    );

    // Without a configured secret no proof is needed.
    let open = start(FakeGraphConfig {
        app_secret: None,
        ..Default::default()
    })
    .await;
    assert_eq!(
        get(&open, &format!("/1001?access_token={SYS}"))
            .await
            .status,
        200
    );
    fg.shutdown();
    open.shutdown();
}

#[tokio::test]
async fn ids_lookup_counts_per_id() {
    let fg = start_default().await;
    let c = creds(&fg, SYS);
    let r = get(&fg, &format!("/v21.0/?ids=1001,1002,1001_5&fields=id&{c}")).await;
    assert_eq!(
        r.json(),
        json!({"1001": {"id": "1001"}, "1002": {"id": "1002"}, "1001_5": {"id": "1001_5"}})
    );
    let usage: Value =
        serde_json::from_str(r.header("x-business-use-case-usage").unwrap()).unwrap();
    assert!(usage["1001"][0]["call_count"].is_u64() && usage["1002"][0]["type"] == "pages");
    let s = fg.stats();
    assert_eq!(
        (s.calls, s.calls_by_page["1001"], s.calls_by_page["1002"]),
        (3, 2, 1)
    );

    // Edge form.
    let v = get(&fg, &format!("/posts?ids=1001,1002&limit=1&{c}"))
        .await
        .json();
    assert_eq!(v["1002"]["data"][0]["id"], "1002_60");

    let r = get(&fg, &format!("/?ids=1001,ghost&{c}")).await;
    assert_eq!(r.code(), 803);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("ghost"));
    let many: Vec<String> = (0..51).map(|i| format!("1001_{i}")).collect();
    assert_eq!(
        get(&fg, &format!("/?ids={}&{c}", many.join(",")))
            .await
            .code(),
        100
    );
    fg.shutdown();
}

#[tokio::test]
async fn batch_runs_ops_in_order_and_counts_each() {
    let fg = start_default().await;
    let c = creds(&fg, SYS);
    let pt = fg.page_token("1002");
    let batch = json!([
        {"method": "GET", "relative_url": "1001?fields=id,name"},
        {"method": "GET", "relative_url": format!("v21.0/1002/feed?limit=2&{}", creds(&fg, &pt))},
        {"method": "POST", "relative_url": "1001/feed", "body": "message=hello%20batch"},
        {"method": "GET", "relative_url": "ghost"},
        {"method": "GET", "relative_url": "me", "name": "who"},
        {"method": "GET", "relative_url": "{result=who:$.id}?fields=name", "depends_on": "who"},
        {"method": "GET", "relative_url": "ghost", "name": "bad"},
        {"method": "GET", "relative_url": "1001", "depends_on": "bad"},
        {"method": "GET", "relative_url": format!("1001?access_token={pt}")},
    ]);
    let body = {
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.append_pair("batch", &batch.to_string());
        q.finish()
    };
    let r = post(&fg, &format!("/?{c}"), &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let ops = v.as_array().unwrap();
    assert_eq!(ops.len(), 9);
    let body_of =
        |i: usize| -> Value { serde_json::from_str(ops[i]["body"].as_str().unwrap()).unwrap() };
    assert_eq!(ops[0]["code"], 200);
    assert_eq!(body_of(0), json!({"id": "1001", "name": "Acme Coffee"}));
    assert!(ops[0]["headers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h["name"] == "Content-Type"));
    assert_eq!(body_of(1)["data"][0]["id"], "1002_60");
    // The op's own token shows up in its paging links, and the raw body string is \/-escaped.
    assert!(body_of(1)["paging"]["next"].as_str().unwrap().contains(&pt));
    assert!(ops[1]["body"]
        .as_str()
        .unwrap()
        .contains(r"\/v21.0\/1002\/feed"));
    assert_eq!(body_of(2), json!({"id": "1001_61"}));
    assert_eq!(
        (
            ops[3]["code"].as_i64(),
            body_of(3)["error"]["code"].as_i64()
        ),
        (Some(400), Some(100))
    );
    assert!(ops[4].is_null(), "named op omitted on success");
    assert_eq!(body_of(5), json!({"name": "graphgate system user"}));
    assert_eq!(ops[6]["code"], 400);
    assert!(ops[7].is_null(), "dependent of a failed op does not run");
    // An op token without its own proof is rejected.
    assert_eq!(body_of(8)["error"]["code"], 100);
    assert!(r.header("x-business-use-case-usage").is_some());

    let s = fg.stats();
    // Ops 0 and 2 hit 1001, op 1 hits 1002; 3, 4, 5, 6 are app-level; 7 never ran; 8 failed auth.
    assert_eq!(s.calls_by_page.get("1001"), Some(&2));
    assert_eq!(s.calls_by_page.get("1002"), Some(&1));
    assert_eq!(s.calls, 7);
    assert_eq!(fg.posts_of("1001")[0].message, "hello batch");

    // include_headers=false, limits and malformed input.
    let small = json!([{"method": "GET", "relative_url": "1001"}]).to_string();
    let r = post(
        &fg,
        "/",
        &format!("{c}&include_headers=false&batch={small}"),
    )
    .await;
    assert!(r.json()[0].get("headers").is_none());
    let too_many: Vec<Value> = (0..51).map(|_| json!({"relative_url": "me"})).collect();
    let body = format!("{c}&batch={}", Value::Array(too_many));
    assert_eq!(post(&fg, "/", &body).await.code(), 100);
    assert_eq!(
        post(&fg, "/", &format!("{c}&batch=%5B%7Bnot json"))
            .await
            .code(),
        100
    );
    assert_eq!(
        post(&fg, "/", &format!("{c}&batch=[1,\"x\",{{}}]"))
            .await
            .status,
        200
    );
    assert_eq!(post(&fg, "/", &format!("batch={small}")).await.code(), 104);
    fg.shutdown();
}

#[tokio::test]
async fn writes_and_method_overrides() {
    let fg = start_default().await;
    let c = creds(&fg, SYS);
    let r = post(
        &fg,
        "/v21.0/1001/feed",
        &format!("message=Fresh%20beans%20%2F%20today&{c}"),
    )
    .await;
    assert_eq!(r.json(), json!({"id": "1001_61"}));
    assert!(r.header("etag").is_none(), "no ETag on writes");
    assert_eq!(fg.posts_of("1001")[0].message, "Fresh beans / today");
    assert_eq!(post(&fg, "/1001/feed", &c).await.code(), 100);

    let r = post(&fg, "/1001_61", &format!("message=edited&{c}")).await;
    assert_eq!(r.json(), json!({"success": true}));
    assert_eq!(
        get(&fg, &format!("/1001_61?fields=message&{c}"))
            .await
            .json()["message"],
        "edited"
    );

    let r = request(&fg, "DELETE", &format!("/1001_61?{c}"), "", "").await;
    assert_eq!(r.json(), json!({"success": true}));
    let r = get(&fg, &format!("/1001_61?{c}")).await;
    assert_eq!(r.json()["error"]["error_subcode"], 33);
    let r = post(&fg, "/1001_60", &format!("method=delete&{c}")).await;
    assert_eq!(r.json(), json!({"success": true}));
    assert_eq!(fg.posts_of("1001").len(), 59);
    assert_eq!(fg.posts_of("1001")[0].id, "1001_59");

    // POST + method=GET is a read, with the parameters in the body.
    let r = post(&fg, "/1002", &format!("fields=id,name&method=GET&{c}")).await;
    assert_eq!(r.json(), json!({"id": "1002", "name": "Globex News"}));
    assert_eq!(fg.stats().post_method_get, 1);
    fg.shutdown();
}

#[tokio::test]
async fn long_get_fails_but_post_method_get_works() {
    let fg = start_default().await;
    let c = creds(&fg, SYS);
    let fields = vec!["name"; 500].join(",");
    let r = get(&fg, &format!("/1001?fields=id,{fields}&{c}")).await;
    assert_eq!(r.status, 500);
    assert_eq!(r.json()["error"]["code"], 1);
    assert_eq!(
        r.json()["error"]["message"],
        "An unknown error has occurred."
    );
    let r = post(&fg, "/1001", &format!("method=GET&fields=id,{fields}&{c}")).await;
    assert_eq!(r.json(), json!({"id": "1001", "name": "Acme Coffee"}));
    // Just under the limit is fine.
    let base = format!("/1001?{c}&fields=id");
    let pad = 2000 - base.len();
    let r = get(&fg, &format!("{base}{}", ",id".repeat(pad / 3))).await;
    assert_eq!(r.status, 200);
    fg.shutdown();
}

fn throttle_cfg() -> FakeGraphConfig {
    FakeGraphConfig {
        page_calls_limit: 5,
        page_window: Duration::from_secs(2),
        app_calls_limit: 2,
        ..Default::default()
    }
}

fn buc(r: &Resp, page: &str) -> Value {
    let v: Value = serde_json::from_str(r.header("x-business-use-case-usage").unwrap()).unwrap();
    v[page][0].clone()
}

#[tokio::test]
async fn page_throttling_and_usage_headers() {
    let fg = start(throttle_cfg()).await;
    let c = creds(&fg, SYS);
    for i in 1..=5u64 {
        let r = get(&fg, &format!("/1001?{c}")).await;
        assert_eq!(r.status, 200);
        assert_eq!(buc(&r, "1001")["call_count"].as_u64(), Some(i * 20));
    }
    let r = get(&fg, &format!("/1001/feed?{c}")).await;
    assert_eq!(r.status, 403);
    let e = &r.json()["error"];
    assert_eq!(e["code"], 80001);
    assert_eq!(e["is_transient"], true);
    assert!(e["message"].as_str().unwrap().starts_with(
        "(#80001) There have been too many calls to this Page account. Wait a bit and try again."
    ));
    let u = buc(&r, "1001");
    assert!(u["call_count"].as_u64().unwrap() >= 100);
    assert_eq!(u["type"], "pages");
    assert_eq!(u["estimated_time_to_regain_access"], 0);

    // Posts count against their Page; the other Page is unaffected.
    assert_eq!(get(&fg, &format!("/1001_3?{c}")).await.code(), 80001);
    let r = get(&fg, &format!("/1002?{c}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(buc(&r, "1002")["call_count"], 20);

    let s = fg.stats();
    assert_eq!(s.calls_by_page["1001"], 7);
    assert_eq!(s.throttled_by_page["1001"], 2);
    assert_eq!(s.throttled, 2);
    assert!(!s.throttled_by_page.contains_key("1002"));

    // App-level limit for non-Page calls: code 4.
    assert_eq!(get(&fg, &format!("/me?{c}")).await.status, 200);
    assert_eq!(get(&fg, &format!("/me?{c}")).await.status, 200);
    let r = get(&fg, &format!("/me?{c}")).await;
    assert_eq!((r.status, r.code()), (403, 4));
    assert_eq!(r.json()["error"]["is_transient"], true);
    let app: Value = serde_json::from_str(r.header("x-app-usage").unwrap()).unwrap();
    assert_eq!(app["call_count"], 150);
    fg.shutdown();
}

#[tokio::test]
async fn other_apps_usage_counts_and_zero_usage_can_be_left_out() {
    let fg = start(FakeGraphConfig {
        page_calls_limit: 10,
        ..Default::default()
    })
    .await;
    let c = creds(&fg, SYS);
    fg.set_other_usage("1001", 8);
    let r = get(&fg, &format!("/1001?{c}")).await;
    assert_eq!(buc(&r, "1001")["call_count"], 90);
    get(&fg, &format!("/1001_1?{c}")).await;
    // 8 others + 3 of ours: over the limit of 10.
    assert_eq!(get(&fg, &format!("/1001_2?{c}")).await.code(), 80001);
    // Page 1002 is not affected; cleared, 1001 counts only our calls again.
    assert_eq!(
        buc(&get(&fg, &format!("/1002?{c}")).await, "1002")["call_count"],
        10
    );
    fg.set_other_usage("1001", 0);
    assert_eq!(
        buc(&get(&fg, &format!("/1001?{c}")).await, "1001")["call_count"],
        40
    );
    fg.shutdown();

    // Meta's headers are absent near 0 % when asked so.
    let fg = start(FakeGraphConfig {
        page_calls_limit: 1000,
        ..Default::default()
    })
    .await;
    fg.set_omit_zero_usage(true);
    let r = get(&fg, &format!("/1001?{c}")).await;
    assert_eq!(r.status, 200);
    assert!(r.header("x-business-use-case-usage").is_none());
    for n in 1..10 {
        get(&fg, &format!("/1001_{n}?{c}")).await;
    }
    assert_eq!(
        buc(&get(&fg, &format!("/1001?{c}")).await, "1001")["call_count"],
        1
    );
    fg.shutdown();
}

#[tokio::test]
async fn sliding_window_expires() {
    let fg = start(FakeGraphConfig {
        page_calls_limit: 2,
        page_window: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let c = creds(&fg, SYS);
    // Three calls in one request: they share one instant, so the third is certainly over.
    let r = get(&fg, &format!("/?ids=1001,1001_1,1001_2&{c}")).await;
    assert_eq!(r.code(), 80001);
    assert_eq!(fg.stats().throttled_by_page["1001"], 1);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let r = get(&fg, &format!("/1001?{c}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(buc(&r, "1001")["call_count"], 50);
    fg.shutdown();
}

#[tokio::test]
async fn etag_and_not_modified() {
    let fg = start_default().await;
    let c = creds(&fg, SYS);
    let target = format!("/1001?fields=id,name,about&{c}");
    let r = get(&fg, &target).await;
    let tag = r.header("etag").unwrap().to_string();
    assert_eq!(
        get(&fg, &target).await.header("etag"),
        Some(tag.as_str()),
        "deterministic"
    );
    let r = request(
        &fg,
        "GET",
        &target,
        &format!("If-None-Match: {tag}\r\n"),
        "",
    )
    .await;
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    let r = request(&fg, "GET", &target, "If-None-Match: \"other\"\r\n", "").await;
    assert_eq!(r.status, 200);
    let s = fg.stats();
    assert_eq!((s.not_modified, s.calls), (1, 4));
    fg.shutdown();
}

#[tokio::test]
async fn h2c_prior_knowledge() {
    use http_body_util::BodyExt;
    use hyper_util::client::legacy::Client;

    let fg = start_default().await;
    let client: Client<_, http_body_util::Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let uri: http::Uri = format!("{}/v21.0/me?{}", fg.url(), creds(&fg, SYS))
        .parse()
        .unwrap();
    let resp = tokio::time::timeout(IO_TIMEOUT, client.get(uri))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-fb-trace-id"));
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["id"], "9000");
    fg.shutdown();
}

#[tokio::test]
async fn faults_and_shutdown() {
    let fg = start_default().await;
    let target = format!("/1001?{}", creds(&fg, SYS));

    fg.set_fault(Fault::Status(502));
    let r = get(&fg, &target).await;
    assert_eq!(r.status, 502);
    assert!(r.header("content-type").unwrap().starts_with("text/html"));

    fg.set_fault(Fault::GraphError {
        code: 2,
        http_status: 500,
    });
    let r = get(&fg, &target).await;
    assert_eq!((r.status, r.code()), (500, 2));
    assert_eq!(r.json()["error"]["is_transient"], true);

    fg.set_fault(Fault::Garbage);
    let r = get(&fg, &target).await;
    assert_eq!(r.status, 200);
    assert!(serde_json::from_slice::<Value>(&r.body).is_err());

    fg.set_fault(Fault::CloseConnection);
    let req = format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(raw(&fg, req.as_bytes()).await.is_none());

    fg.set_fault(Fault::None);
    assert_eq!(get(&fg, &target).await.status, 200);
    assert_eq!(fg.stats().errors, 2);

    // A hung request stays open until shutdown, which then closes it.
    fg.set_fault(Fault::Hang);
    let mut s = TcpStream::connect(fg.addr()).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(150), s.read(&mut buf))
            .await
            .is_err()
    );
    fg.shutdown();
    fg.shutdown();
    let n = tokio::time::timeout(IO_TIMEOUT, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        TcpStream::connect(fg.addr()).await.is_err() || {
            // The listener may linger a moment; a fresh connection must at least get no reply.
            raw(&fg, req.as_bytes()).await.is_none()
        }
    );
}

#[tokio::test]
async fn latency_and_in_flight() {
    let fg = start_default().await;
    fg.set_latency(Duration::from_millis(200));
    let target = format!("/me?{}", creds(&fg, SYS));
    let started = std::time::Instant::now();
    let (a, b, c) = tokio::join!(get(&fg, &target), get(&fg, &target), get(&fg, &target));
    assert!([a.status, b.status, c.status].iter().all(|s| *s == 200));
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(fg.stats().max_in_flight >= 2);
    fg.reset_stats();
    assert_eq!(fg.stats(), FakeGraphStats::default());
    fg.shutdown();
}

#[tokio::test]
async fn hostile_input_never_panics() {
    let fg = start_default().await;
    let c = creds(&fg, SYS);
    let nasty = [
        format!("/1001?fields=%FF%FE%00&{c}"),
        format!("/%FF%C0/%%/x?{c}"),
        format!("/1001?fields={}&{c}", "%7B".repeat(300)),
        format!("/1001?fields=feed.after(!!!)&{c}"),
        format!("/?ids=,,,&{c}"),
        "/?access_token=%FF&appsecret_proof=%00".to_string(),
        format!("/1001_99999999999999999999999?{c}"),
        format!("/1001_-1/feed/x/y?{c}"),
    ];
    for target in &nasty {
        let r = get(&fg, target).await;
        assert!(r.status >= 400, "{target}: {}", r.status);
        r.json();
    }
    let r = get(
        &fg,
        &format!("/1001?fields=feed.limit(99999999999999999999999)&{c}"),
    )
    .await;
    assert_eq!(r.json()["feed"]["data"].as_array().map(Vec::len), Some(60));
    // Raw non-UTF-8 bytes and junk bodies.
    let mut req =
        b"POST /1001 HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 5\r\n\r\n"
            .to_vec();
    req.extend_from_slice(b"\xff\xfe=\x80&");
    assert!(raw(&fg, &req).await.is_some());
    let r = request(
        &fg,
        "POST",
        "/",
        "",
        &format!("{c}&batch=[{{\"relative_url\":7}}]"),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = request(&fg, "PATCH", &format!("/1001?{c}"), "", "").await;
    assert_eq!(r.code(), 100);
    assert_eq!(get(&fg, &format!("/1001?{c}")).await.status, 200);
    fg.shutdown();
}

#[tokio::test]
async fn serve_runs_until_shutdown_future() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, FakeGraphConfig::default(), async {
        let _ = rx.await;
    }));
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /me HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(IO_TIMEOUT, s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 400"));
    tx.send(()).unwrap();
    tokio::time::timeout(IO_TIMEOUT, server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn records_requests() {
    let fg = start_default().await;
    let c = creds(&fg, SYS);
    post(&fg, "/v21.0/1001/feed?x=1", &format!("message=hi&{c}")).await;
    let reqs = fg.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(
        (r.method.as_str(), r.path.as_str()),
        ("POST", "/v21.0/1001/feed")
    );
    assert_eq!(r.query, vec![("x".to_string(), "1".to_string())]);
    assert!(r.form.contains(&("message".to_string(), "hi".to_string())));
    assert_eq!(r.access_token.as_deref(), Some(SYS));
    assert_eq!(r.appsecret_proof, fg.proof_for(SYS));
    assert!(r
        .headers
        .iter()
        .any(|(k, v)| k == "host" && v == "graph.test"));
    fg.set_record_limit(0);
    get(&fg, "/me").await;
    assert!(fg.requests().is_empty());
    fg.shutdown();
}

/// Rough throughput check: `cargo test --release -p fake-graph -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput_smoke() {
    use http_body_util::BodyExt;
    use hyper_util::client::legacy::Client;

    let fg = start(FakeGraphConfig {
        page_calls_limit: u32::MAX,
        app_calls_limit: u32::MAX,
        ..Default::default()
    })
    .await;
    fg.set_record_limit(0);
    let client: Client<_, http_body_util::Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let uri: http::Uri = format!("{}/1001/feed?limit=10&{}", fg.url(), creds(&fg, SYS))
        .parse()
        .unwrap();
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (client, uri) = (client.clone(), uri.clone());
            tokio::spawn(async move {
                for _ in 0..2000 {
                    let resp = client.get(uri.clone()).await.unwrap();
                    assert_eq!(resp.status(), 200);
                    resp.into_body().collect().await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    println!("{:.0} req/s", 16_000.0 / secs);
    fg.shutdown();
}

mod fuzz {
    use super::super::engine::{split_path, Call, Engine, IdGen, Params, Verb};
    use super::super::state::State;
    use super::*;
    use proptest::prelude::*;

    /// Fragments that tend to reach interesting code paths when glued together.
    const PIECES: &[&str] = &[
        "/",
        "v21.0",
        "1001",
        "1002",
        "me",
        "_",
        "7",
        "feed",
        "posts",
        "accounts",
        "?",
        "&",
        "=",
        "ids",
        "fields",
        "limit",
        "after",
        "before",
        "batch",
        "method",
        "GET",
        "delete",
        "id",
        "name",
        "{",
        "}",
        "(",
        ")",
        ".",
        ",",
        "%",
        "%FF",
        "%7B",
        "9999999999999999999999",
        "access_token",
        "demo-system-user-token",
        "[",
        "]",
        "\"",
        ":",
        "relative_url",
        "{result=",
        "$.id",
        "é",
        " ",
        "-1",
        "message",
    ];

    fn text() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(PIECES), 0..40).prop_map(|v| v.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        /// Any path/query/verb is answered with valid JSON and a sane status, never a panic.
        #[test]
        fn engine_never_panics(path in text(), query in text(), verb in 0..3u8, raw in any::<Vec<u8>>()) {
            let cfg = FakeGraphConfig { app_secret: None, ..Default::default() };
            let mut st = State::new(&cfg);
            let ids = IdGen::default();
            let (version, segments) = split_path(&path);
            let mut params = Params::default();
            params.extend_urlencoded(query.as_bytes());
            params.extend_urlencoded(&raw);
            let batch = format!("[{{\"method\":\"GET\",\"relative_url\":\"{}\"}}]", query.replace('"', ""));
            params.0.push(("batch".into(), batch));
            let call = Call {
                verb: [Verb::Get, Verb::Post, Verb::Delete][usize::from(verb)],
                version,
                segments,
                params,
                token: Some(SYS.to_string()),
                proof: None,
                in_batch: false,
                files: Vec::new(),
            };
            let out = Engine { cfg: &cfg, st: &mut st, now: std::time::Instant::now(), ids: &ids }.execute(&call);
            prop_assert!(out.status == 200 || (400..600).contains(&out.status));
            let bytes = super::super::encode::graph_json(&out.body);
            prop_assert!(serde_json::from_slice::<Value>(&bytes).is_ok());
        }

        #[test]
        fn fields_parser_never_panics(s in text()) {
            if let Ok(sel) = super::super::fields::parse(&s) {
                // Re-serialising a parsed selection parses to the same thing.
                let again = super::super::fields::parse(&super::super::fields::to_text(&sel));
                prop_assert_eq!(again, Ok(sel));
            }
        }
    }
}

/// A connection closed gracefully (`Fault::GoAway`) sends its FIN and then drains what the
/// client still sends, as production servers' lingering close does: bytes that cross the
/// close are read and dropped, not answered with a TCP reset (which would make a client's
/// pending HTTP/2 write fail with a broken pipe before it reads the GOAWAY).
#[tokio::test]
async fn a_gracefully_closed_connection_drains_late_bytes_instead_of_resetting() {
    let fg = start_default().await;
    fg.set_fault(Fault::GoAway { after: 1 });
    let mut s = TcpStream::connect(fg.addr()).await.unwrap();
    let request = format!(
        "GET /v21.0/1001?{} HTTP/1.1\r\nhost: graph\r\n\r\n",
        creds(&fg, SYS)
    );
    s.write_all(request.as_bytes()).await.unwrap();
    // The reply, then the server's FIN.
    let mut reply = Vec::new();
    tokio::time::timeout(IO_TIMEOUT, s.read_to_end(&mut reply))
        .await
        .expect("the server closes after its reply")
        .expect("the reply reads without a reset");
    assert!(reply.starts_with(b"HTTP/1.1 200"), "{reply:?}");
    // Late bytes. A socket closed outright would answer the first write with a reset and the
    // second would fail; a draining one takes both.
    s.write_all(b"late bytes after the close").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b"more late bytes").await.expect("no reset");
    assert_eq!(fg.stats().goaways, 1);
    fg.shutdown();
}
