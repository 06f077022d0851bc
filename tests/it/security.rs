//! Security and reliability: token hygiene over every feature with the real binary
//! at debug log level, the system token's 190 as an alertable state, and slow request bodies.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fake_graph::FakeGraph;
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_graphgate");
const ADMIN_TOKEN: &str = "test-admin-token";

// ---------------------------------------------------------------------------------------------
// 190 on the system token: an alertable state that recovers
// ---------------------------------------------------------------------------------------------

fn token_valid(metrics: &str, kind: &str) -> f64 {
    metric_value(
        metrics,
        "graphgate_token_valid",
        &[&format!("token=\"{kind}\"")],
    )
}

#[tokio::test]
async fn a_revoked_system_token_is_an_alertable_state_that_recovers() {
    let s = Stack::start_with(graph_config(), "[cache]\ndefault_ttl_s = 0\n").await;
    let m = s.admin_get("/metrics").await.text();
    assert_eq!(token_valid(&m, "system"), 1.0, "valid before any call");
    assert_eq!(
        metric_value(&m, "graphgate_token_last_invalid_timestamp_seconds", &[]),
        0.0
    );

    s.graph.revoke_token(SYSTEM_TOKEN);
    for _ in 0..3 {
        let r = s
            .get(&format!("/1001?fields=id&access_token={ADMIN_KEY}"))
            .await;
        assert_eq!(r.error_code(), 190, "{}", r.text());
    }
    let m = s.admin_get("/metrics").await.text();
    assert_eq!(token_valid(&m, "system"), 0.0, "{m}");
    assert!(metric_value(&m, "graphgate_token_last_invalid_timestamp_seconds", &[]) > 0.0);
    assert_eq!(token_valid(&m, "page"), 1.0, "Page tokens are not in use");

    // A renewed token (here: Graph accepts it again) clears the state on the next success.
    s.graph.restore_token(SYSTEM_TOKEN);
    let r = s
        .get(&format!("/1001?fields=id&access_token={ADMIN_KEY}"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let m = s.admin_get("/metrics").await.text();
    assert_eq!(token_valid(&m, "system"), 1.0, "{m}");
    s.stop().await;
}

#[tokio::test]
async fn a_revoked_system_token_also_fails_page_token_minting_visibly() {
    let s = Stack::start_with(graph_config(), "[credentials]\npage_tokens = true\n").await;
    s.graph.revoke_token(SYSTEM_TOKEN);
    let r = s
        .get(&format!("/1001?fields=id&access_token={ADMIN_KEY}"))
        .await;
    assert!(!r.status.is_success(), "{}", r.text());
    let m = s.admin_get("/metrics").await.text();
    assert_eq!(token_valid(&m, "system"), 0.0, "{m}");
    s.graph.restore_token(SYSTEM_TOKEN);
    let r = s
        .get(&format!("/1001?fields=id&access_token={ADMIN_KEY}"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let m = s.admin_get("/metrics").await.text();
    assert_eq!(token_valid(&m, "system"), 1.0, "{m}");
    assert_eq!(token_valid(&m, "page"), 1.0, "{m}");
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Slow request bodies
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_slow_request_body_gets_408_and_frees_its_in_flight_slot() {
    let s = Stack::start_with(
        graph_config(),
        "[server]\nmax_in_flight = 1\nbody_read_timeout_ms = 300\nheader_read_timeout_ms = 5000\n",
    )
    .await;
    let addr = s.gw.addr;
    let started = Instant::now();
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(
        format!(
            "POST /v21.0/1001/feed HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: 1000\r\n\r\naccess_token={ADMIN_KEY}&message="
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // Keep dripping a byte now and then: the body never completes.
    let drip = tokio::spawn(async move {
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            tokio::select! {
                n = slow.read(&mut buf) => match n {
                    Ok(0) | Err(_) => break,
                    Ok(k) => {
                        reply.extend_from_slice(&buf[..k]);
                        if reply.windows(4).any(|w| w == b"\r\n\r\n") { break; }
                    }
                },
                _ = tokio::time::sleep(Duration::from_millis(50)) => {
                    if slow.write_all(b"x").await.is_err() { break; }
                }
            }
        }
        String::from_utf8_lossy(&reply).into_owned()
    });
    let reply = tokio::time::timeout(Duration::from_secs(5), drip)
        .await
        .expect("answered, not held")
        .unwrap();
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // The one in-flight slot is free again.
    let r = s
        .get(&format!("/1001?fields=id&access_token={ADMIN_KEY}"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let m = s.admin_get("/metrics").await.text();
    assert_eq!(
        metric_value(
            &m,
            "graphgate_rejections_total",
            &["reason=\"body_timeout\""]
        ),
        1.0
    );
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Token hygiene: the real binary, every feature, logs at debug
// ---------------------------------------------------------------------------------------------

/// The `graphgate serve` child with its stdout and stderr lines collected.
struct Served {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Removes ANSI colour sequences (`ESC [ ... m`) from a log line.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn spawn_serve(config: &std::path::Path) -> Served {
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .env_remove("RUST_LOG")
        .env_remove("GRAPHGATE_SYSTEM_USER_TOKEN")
        .env_remove("GRAPHGATE_APP_SECRET")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("graphgate starts");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let out = child.stdout.take().unwrap();
    let err = child.stderr.take().unwrap();
    for stream in [
        Box::new(out) as Box<dyn std::io::Read + Send>,
        Box::new(err) as Box<dyn std::io::Read + Send>,
    ] {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(strip_ansi(&line));
            }
        });
    }
    Served { child, lines }
}

/// `key=value` (value up to the next space) from a log line.
fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    Some(line[at..].split_whitespace().next()?.trim_matches('"'))
}

impl Served {
    fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        let until = Instant::now() + timeout;
        loop {
            if let Some(l) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return l.clone();
            }
            assert!(
                Instant::now() < until,
                "no log line with {needle:?}: {:#?}",
                self.lines.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn count(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }
}

struct Hygiene {
    base: String,
    admin: String,
    http: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<Bytes>,
    >,
    graph: FakeGraph,
    /// Every reply to a client, for the final grep.
    seen: Vec<String>,
    /// Admin listener replies and check-config output: no client key may appear there either.
    admin_seen: Vec<String>,
}

impl Hygiene {
    /// Meta secrets known now (Page tokens change when revoked).
    fn meta_secrets(&self) -> Vec<String> {
        vec![
            SYSTEM_TOKEN.into(),
            APP_SECRET.into(),
            self.graph.page_token("1001"),
            self.graph.page_token("1002"),
        ]
    }

    async fn call(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Reply {
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        };
        let r = send(
            &self.http,
            method,
            &url,
            headers,
            Bytes::from(body.to_string()),
            &self.meta_secrets(),
        )
        .await;
        self.seen.push(format!("{:?}\n{}", r.headers, r.text()));
        r
    }

    async fn get(&mut self, path: &str) -> Reply {
        self.call(Method::GET, path, &[], "").await
    }

    async fn form(&mut self, path: &str, body: &str) -> Reply {
        self.call(
            Method::POST,
            path,
            &[("content-type", "application/x-www-form-urlencoded")],
            body,
        )
        .await
    }

    async fn admin(&mut self, method: Method, path: &str) -> Reply {
        let url = format!("{}{path}", self.admin);
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let r = send(
            &self.http,
            method,
            &url,
            &[("authorization", auth.as_str())],
            Bytes::new(),
            &self.meta_secrets(),
        )
        .await;
        self.admin_seen.push(r.text());
        r
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_feature_leaks_a_token_secret_or_key_into_responses_logs_metrics_or_admin_output() {
    let graph = FakeGraph::start(graph_config(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(format!("graphgate-hygiene-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config_path = dir.join("graphgate.toml");
    let toml = gateway_toml(
        &graph.url(),
        &format!(
            r#"
[server]
admin_token = "{ADMIN_TOKEN}"
[credentials]
page_tokens = true
[cache]
default_ttl_s = 1
stale_while_revalidate_s = 60
stale_if_error_s = 60
[quota]
page_calls = 1000
page_window_s = 2
queue_timeout_ms = 300
[[quota.pages]]
id = "1002"
page_calls = 2
[log]
level = "debug"
"#
        ),
    );
    std::fs::write(&config_path, &toml).unwrap();
    let served = spawn_serve(&config_path);
    let listening = served.wait_for("graphgate listening", Duration::from_secs(20));
    let addr = log_field(&listening, "addr").expect("addr in the listening line");
    let admin_addr = log_field(&listening, "admin_addr").expect("admin_addr");
    let mut h = Hygiene {
        base: format!("http://{addr}"),
        admin: format!("http://{admin_addr}"),
        http: client(),
        graph,
        seen: Vec::new(),
        admin_seen: Vec::new(),
    };
    let k = ADMIN_KEY;

    // Reads, cache miss then hit, conditional request.
    let r = h
        .get(&format!("/v21.0/1001?fields=id,name&access_token={k}"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let etag = r.header("etag").map(str::to_string);
    let r = h
        .get(&format!("/v21.0/1001?fields=name,id&access_token={k}"))
        .await;
    assert_eq!(r.header("x-cache"), Some("HIT"));
    if let Some(etag) = etag {
        let url = format!("/v21.0/1001?fields=id,name&access_token={k}");
        h.call(Method::GET, &url, &[("if-none-match", etag.as_str())], "")
            .await;
    }
    // Key in the Authorization header instead of the query.
    let bearer = format!("Bearer {k}");
    let r = h
        .call(
            Method::GET,
            "/v21.0/1001?fields=about",
            &[("authorization", bearer.as_str())],
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    // Paging: follow next links through graphgate.
    let mut url = format!("/v21.0/1001/feed?limit=5&access_token={k}");
    for _ in 0..3 {
        let r = h.get(&url).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let next = r.json()["paging"]["next"].as_str().unwrap().to_string();
        assert!(next.starts_with(&h.base), "{next}");
        url = next;
    }
    // Nested edge paging, ids=, batch (with an operation carrying its own key).
    h.get(&format!(
        "/v21.0/1001?fields=feed.limit(2){{message}}&access_token={k}"
    ))
    .await;
    let r = h
        .get(&format!(
            "/v21.0/?ids=1001,1001_3&fields=id&access_token={k}"
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let batch = format!(
        r#"[{{"method":"GET","relative_url":"v21.0/1001?fields=id,name"}},{{"method":"GET","relative_url":"v21.0/1001/feed?limit=2&access_token={k}"}},{{"method":"POST","relative_url":"v21.0/1001/feed","body":"message=from+batch"}}]"#
    );
    let body: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("access_token", k)
        .append_pair("batch", &batch)
        .finish();
    let r = h.form("/v21.0/", &body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    // Writes: form, JSON body, delete.
    let r = h
        .form(
            "/v21.0/1001/feed",
            &format!("message=hello&access_token={k}"),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let post_id = r.json()["id"].as_str().unwrap().to_string();
    let json = format!(r#"{{"message":"edited","access_token":"{k}"}}"#);
    h.call(
        Method::POST,
        &format!("/v21.0/{post_id}"),
        &[("content-type", "application/json")],
        &json,
    )
    .await;
    h.call(
        Method::DELETE,
        &format!("/v21.0/{post_id}?access_token={k}"),
        &[],
        "",
    )
    .await;

    // A GET too long for Graph: sent as POST + method=GET.
    let long_fields = (0..300)
        .map(|i| format!("f{i}"))
        .collect::<Vec<_>>()
        .join(",");
    let r = h
        .get(&format!(
            "/v21.0/1001?fields=id,{long_fields}&access_token={k}"
        ))
        .await;
    assert!(
        r.status.is_success() || r.status.is_client_error(),
        "{}",
        r.text()
    );

    // Errors: unknown node, bad fields, token field, foreign Page, read-only write, unknown
    // key, no key, bad method.
    h.get(&format!("/v21.0/999999?access_token={k}")).await;
    h.get(&format!("/v21.0/1001?fields=a{{{{b&access_token={k}"))
        .await;
    let r = h
        .get(&format!("/v21.0/1001?fields=access_token&access_token={k}"))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    h.get(&format!("/v21.0/1002?access_token={READER_KEY}"))
        .await;
    h.form(
        "/v21.0/1001/feed",
        &format!("message=x&access_token={READER_KEY}"),
    )
    .await;
    h.get("/v21.0/1001?access_token=not-a-key-0000").await;
    h.get("/v21.0/1001").await;
    h.call(
        Method::PUT,
        &format!("/v21.0/1001?access_token={k}"),
        &[],
        "",
    )
    .await;

    // Throttling: Page 1002 allows 2 calls per 2 s and callers wait at most 300 ms, so
    // back-to-back distinct reads get 429.
    let mut throttled = false;
    for i in 0..3 {
        let r = h
            .get(&format!("/v21.0/1002?fields=id&limit={i}&access_token={k}"))
            .await;
        throttled |= r.status == StatusCode::TOO_MANY_REQUESTS;
    }
    assert!(throttled, "Page 1002 was never throttled");

    // Bodies graphgate reads part by part or refuses, each carrying a key: a multipart
    // upload, a text/plain body, a JSON body with a key twice, a batch hiding a write.
    let mp = format!(
        "--b\r\nContent-Disposition: form-data; name=\"access_token\"\r\n\r\n{k}\r\n--b\r\nContent-Disposition: form-data; name=\"source\"; filename=\"a.png\"\r\n\r\nPNG\r\n--b--\r\n"
    );
    let r = h
        .call(
            Method::POST,
            "/v21.0/1001/photos",
            &[("content-type", "multipart/form-data; boundary=b")],
            &mp,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = h
        .call(
            Method::POST,
            "/v21.0/1001/feed",
            &[("content-type", "text/plain")],
            &format!("message=x&access_token={k}"),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{}", r.text());
    let r = h
        .call(
            Method::POST,
            "/v21.0/1001/feed",
            &[("content-type", "application/json")],
            &format!(r#"{{"access_token":"{k}","message":"a","message":"b"}}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    let disguised =
        r#"[{"method":"POST","relative_url":"1001/feed?method=GET","body":"message=x"}]"#;
    let body: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("access_token", READER_KEY)
        .append_pair("batch", disguised)
        .finish();
    let r = h.form("/v21.0/", &body).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());

    // Stale serving: past the 1 s TTL (the writes above invalidated earlier entries).
    h.get(&format!("/v21.0/1001?fields=category&access_token={k}"))
        .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = h
        .get(&format!("/v21.0/1001?fields=category&access_token={k}"))
        .await;
    assert_eq!(r.header("x-cache"), Some("STALE"), "{:?}", r.headers);

    // Page token revoked: re-minted. System token revoked: 190s, then renewed.
    let old = h.graph.page_token("1001");
    h.graph.revoke_token(&old);
    let r = h
        .get(&format!("/v21.0/1001?fields=fan_count&access_token={k}"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    h.graph.revoke_token(SYSTEM_TOKEN);
    for i in 0..3 {
        h.get(&format!("/v21.0/me?fields=id&x={i}&access_token={k}"))
            .await;
    }
    h.graph.restore_token(SYSTEM_TOKEN);
    h.get(&format!("/v21.0/me?fields=id&x=ok&access_token={k}"))
        .await;

    // Admin: pages, metrics, purge, health; an unauthenticated admin call.
    let pages = h.admin(Method::GET, "/admin/pages").await;
    assert_eq!(pages.status, StatusCode::OK, "{}", pages.text());
    h.admin(Method::POST, "/admin/cache/purge?node=1001").await;
    h.admin(Method::GET, "/healthz").await;
    let unauth = send(
        &h.http,
        Method::GET,
        &format!("{}/admin/pages", h.admin),
        &[],
        Bytes::new(),
        &h.meta_secrets(),
    )
    .await;
    h.admin_seen.push(unauth.text());
    let metrics = h.admin(Method::GET, "/metrics").await.text();
    assert_eq!(token_valid(&metrics, "system"), 1.0, "recovered");

    // Reload (SIGHUP) with the same file, then check-config on it.
    let pid = served.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    served.wait_for("configuration reloaded", Duration::from_secs(10));
    let check = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&config_path)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(check.status.success());
    h.admin_seen
        .push(String::from_utf8_lossy(&check.stdout).into_owned());
    h.admin_seen
        .push(String::from_utf8_lossy(&check.stderr).into_owned());

    // Graceful stop, so every log line is flushed.
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let mut served = served;
    let until = Instant::now() + Duration::from_secs(15);
    while served.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < until, "graphgate did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));

    // The state change was logged once each way, not once per failing call.
    assert_eq!(served.count("Graph rejects the system token"), 1);
    assert_eq!(served.count("Graph accepts the system token again"), 1);
    assert!(served.count("DEBUG") > 0, "debug logging was on");

    // Every Meta credential Graph ever received (system token, every Page token minted,
    // their proofs), the app secret, and the client keys.
    let mut forbidden: Vec<String> = h.meta_secrets();
    for req in h.graph.requests() {
        forbidden.extend(req.access_token.clone());
        forbidden.extend(req.appsecret_proof.clone());
    }
    forbidden.push(old);
    forbidden.sort();
    forbidden.dedup();
    let logs = served.lines.lock().unwrap().join("\n");
    let output = format!("{logs}\n{}", h.admin_seen.join("\n"));
    for secret in &forbidden {
        assert!(
            !output.contains(secret.as_str()),
            "a Meta credential appeared in logs, metrics or admin output: {secret}"
        );
        for shown in &h.seen {
            assert!(
                !shown.contains(secret.as_str()),
                "in a reply: {secret}\n{shown}"
            );
        }
    }
    for key in [ADMIN_KEY, READER_KEY, "not-a-key-0000", ADMIN_TOKEN] {
        let at = logs
            .find(key)
            .map(|i| &logs[i.saturating_sub(300)..(i + 100).min(logs.len())]);
        assert!(
            at.is_none(),
            "a client key appeared in the logs: {key}: {at:?}"
        );
        for shown in &h.admin_seen {
            assert!(
                !shown.contains(key),
                "a client key in admin output: {key}\n{shown}"
            );
        }
    }
    assert!(logs.lines().count() > 50, "too few log lines: {logs}");
    h.graph.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
