//! Test harness: the simulated Graph API and a graphgate in front of it on free ports
//! (`graphgate::testkit`, with its standard credentials), and a plain HTTP client whose every
//! response is checked for leaked secrets.

use std::time::Duration;

use bytes::Bytes;
use fake_graph::{FakeGraph, FakeGraphConfig};
use graphgate::server::Running;
use graphgate::testkit::{self, Credentials};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

pub use graphgate::testkit::{ADMIN_KEY, APP_SECRET, READER_KEY, SYSTEM_TOKEN};

pub struct Stack {
    pub graph: FakeGraph,
    pub gw: Running,
    http: Client<HttpConnector, Full<Bytes>>,
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    /// The Graph error code of an error reply.
    pub fn error_code(&self) -> i64 {
        self.json()["error"]["code"].as_i64().unwrap_or(-1)
    }
}

pub fn graph_config() -> FakeGraphConfig {
    Credentials::standard().graph_config()
}

/// graphgate configuration for a test: free ports, the given upstream, two clients, with
/// `extra` TOML merged over it key by key (so tests can write `[upstream]\ntimeout_ms = 200`).
pub fn gateway_toml(upstream: &str, extra: &str) -> String {
    Credentials::standard()
        .gateway_toml(upstream, extra)
        .expect("extra config is TOML")
}

impl Stack {
    pub async fn start() -> Stack {
        Stack::start_with(graph_config(), "").await
    }

    pub async fn start_with(graph_cfg: FakeGraphConfig, extra: &str) -> Stack {
        let testkit::Stack { graph, gateway: gw } =
            testkit::Stack::start(&Credentials::standard(), graph_cfg, extra)
                .await
                .unwrap_or_else(|e| panic!("test stack starts: {e}"));
        Stack {
            graph,
            gw,
            http: client(),
        }
    }

    pub async fn get(&self, path_and_query: &str) -> Reply {
        self.request(Method::GET, path_and_query, &[], Bytes::new())
            .await
    }

    pub async fn post_form(&self, path: &str, form: &str) -> Reply {
        self.request(
            Method::POST,
            path,
            &[("content-type", "application/x-www-form-urlencoded")],
            Bytes::from(form.to_string()),
        )
        .await
    }

    pub async fn request(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Reply {
        let url = if path_and_query.starts_with("http") {
            path_and_query.to_string()
        } else {
            format!("{}{}", self.gw.url(), path_and_query)
        };
        send(&self.http, method, &url, headers, body, &self.secrets()).await
    }

    pub async fn admin_get(&self, path: &str) -> Reply {
        let url = format!("{}{}", self.gw.admin_url(), path);
        send(
            &self.http,
            Method::GET,
            &url,
            &[],
            Bytes::new(),
            &self.secrets(),
        )
        .await
    }

    /// Every secret that must never reach a client.
    pub fn secrets(&self) -> Vec<String> {
        secrets_of(&self.graph)
    }

    pub async fn stop(self) {
        self.gw.shutdown().await;
        self.graph.shutdown();
    }
}

/// The secrets of a test set-up against `graph`: system token, app secret, Page tokens.
pub fn secrets_of(graph: &FakeGraph) -> Vec<String> {
    vec![
        SYSTEM_TOKEN.to_string(),
        APP_SECRET.to_string(),
        graph.page_token("1001"),
        graph.page_token("1002"),
    ]
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(5))
        .build_http()
}

/// Sends a request and asserts no secret appears in the status line, headers or body:
/// every response in the suite passes through this check.
pub async fn send(
    http: &Client<HttpConnector, Full<Bytes>>,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
    secrets: &[String],
) -> Reply {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body)).expect("valid request");
    let resp = tokio::time::timeout(Duration::from_secs(20), http.request(req))
        .await
        .expect("response within 20 s")
        .expect("request succeeds at the HTTP level");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    let reply = Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    };
    assert_no_secrets(&reply, secrets);
    reply
}

pub fn assert_no_secrets(reply: &Reply, secrets: &[String]) {
    let text = String::from_utf8_lossy(&reply.body);
    for s in secrets {
        assert!(
            !text.contains(s.as_str()),
            "a secret leaked into a response body: {text}"
        );
        for (name, value) in &reply.headers {
            let v = String::from_utf8_lossy(value.as_bytes());
            assert!(
                !v.contains(s.as_str()),
                "a secret leaked into header {name}: {v}"
            );
        }
    }
}

/// Reads a counter or gauge value from Prometheus text, summing all label sets that
/// contain every `label_filter` (e.g. `outcome="ok"`).
pub fn metric_value(text: &str, name: &str, label_filter: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| label_filter.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A free loopback port (for a listener the test hands to a child process).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Kills the child process on drop (only the one the test started), so a failing test
/// leaves nothing behind.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A directory of the test's own under the system temp dir, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "graphgate-test-{tag}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }

    /// Writes through a rename, so a reader never sees half a file.
    pub fn write(&self, name: &str, text: &str) -> String {
        let p = self.0.join(name);
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, &p).expect("rename");
        p.display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `head` and then `a` forever, one byte every 50 ms (a slow-drip, slowloris head:
/// each byte arrives well within any per-read timeout), until the connection is closed.
pub fn drip_head(
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    head: &'static [u8],
) -> tokio::task::JoinHandle<()> {
    use tokio::io::AsyncWriteExt;
    tokio::spawn(async move {
        for b in head.iter().chain(std::iter::repeat(&b'a')) {
            if wr.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}
