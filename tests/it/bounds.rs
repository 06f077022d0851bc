//! Resource bounds, end to end through real sockets: connections that send nothing are
//! closed at the header-read timeout on both listeners; the admin listener has a connection
//! cap and an idle timeout; /readyz answers 503 through a SIGTERM drain; reply bodies held
//! in memory stay within `upstream.max_buffered_reply_bytes`, and beyond it requests get a
//! Graph-style 503 at once.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// Connects, writes `opening` and waits (at most `within`) for the server to close the
/// connection. Returns what the server sent, or `None` if it was still open.
async fn closed_within(addr: SocketAddr, opening: &[u8], within: Duration) -> Option<Vec<u8>> {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    if !opening.is_empty() {
        conn.write_all(opening).await.unwrap();
    }
    let mut buf = Vec::new();
    match tokio::time::timeout(within, conn.read_to_end(&mut buf)).await {
        Ok(_) => Some(buf),
        Err(_) => None,
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`); the raw reply, or
/// `None` if the connection was closed without one or nothing came within 10 s.
async fn raw_request(addr: SocketAddr, head: &str) -> Option<String> {
    let mut conn = TcpStream::connect(addr).await.ok()?;
    conn.write_all(head.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    (!buf.is_empty()).then(|| String::from_utf8_lossy(&buf).into_owned())
}

fn get_head(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
}

/// The HTTP/2 client preface and an empty SETTINGS frame: a prior-knowledge h2c client
/// that then opens no stream.
fn h2_preface_and_settings() -> Vec<u8> {
    let mut v = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    v.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
    v
}

// ---------------------------------------------------------------------------------------------
// Connections that send nothing; the admin listener's limits
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_connection_that_sends_no_request_is_closed_at_the_header_read_timeout_on_both_listeners()
{
    // The idle timeout is long: only the header-read timeout can close these in time.
    let s = Stack::start_with(
        graph_config(),
        "[server]\nheader_read_timeout_ms = 300\nidle_timeout_ms = 120000\n",
    )
    .await;
    let openings: [(&str, Vec<u8>); 4] = [
        ("nothing", Vec::new()),
        ("part of the HTTP/2 preface", b"PRI * HTTP/2.0\r\n".to_vec()),
        ("HTTP/2 preface, no stream", h2_preface_and_settings()),
        (
            "part of an HTTP/1 head",
            b"GET /healthz HTTP/1.1\r\n".to_vec(),
        ),
    ];
    for (listener, addr) in [("public", s.gw.addr), ("admin", s.gw.admin_addr)] {
        for (what, opening) in &openings {
            let sent = closed_within(addr, opening, Duration::from_secs(10)).await;
            let sent = sent.unwrap_or_else(|| panic!("{listener}: {what}: still open after 10 s"));
            assert!(
                !sent.starts_with(b"HTTP/1.1 2"),
                "{listener}: {what}: answered {}",
                String::from_utf8_lossy(&sent)
            );
        }
    }
    let m = s.admin_get("/metrics").await.text();
    for listener in ["public", "admin"] {
        let filter = format!("listener=\"{listener}\"");
        let closed = metric_value(&m, "graphgate_connections_head_timeout_total", &[&filter]);
        assert_eq!(closed, 4.0, "{listener}\n{m}");
    }
    // A connection that asks in time is served as usual.
    let r = raw_request(
        s.gw.addr,
        &get_head(&format!("/1001?fields=id&access_token={ADMIN_KEY}")),
    )
    .await
    .expect("a reply");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    s.stop().await;
}

#[tokio::test]
async fn an_http1_head_after_the_first_is_due_within_the_header_read_timeout_but_http2_idles_on() {
    let s = Stack::start_with(
        graph_config(),
        "[server]\nheader_read_timeout_ms = 300\nidle_timeout_ms = 120000\n",
    )
    .await;
    let idle_closed = |m: &str| {
        metric_value(
            m,
            "graphgate_connections_idle_closed_total",
            &["listener=\"public\""],
        )
    };
    // HTTP/2 (h2c): a connection between requests is idle, which may last idle_timeout_ms.
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    for _ in 0..2 {
        let r = send(
            &h2,
            http::Method::GET,
            &format!("{}/1001?fields=id&access_token={ADMIN_KEY}", s.gw.url()),
            &[],
            bytes::Bytes::new(),
            &s.secrets(),
        )
        .await;
        assert_eq!(r.status, http::StatusCode::OK, "{}", r.text());
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    let m = s.admin_get("/metrics").await.text();
    assert_eq!(
        idle_closed(&m),
        0.0,
        "the HTTP/2 connection was closed\n{m}"
    );
    drop(h2);

    // HTTP/1 keep-alive: one request, then the next head dripped a byte every 50 ms. The
    // first is answered; the connection closes, though bytes keep coming and the idle
    // timeout is two minutes away.
    let conn = TcpStream::connect(s.gw.addr).await.unwrap();
    let (mut rd, mut wr) = conn.into_split();
    let first = format!("GET /1002?fields=id&access_token={ADMIN_KEY} HTTP/1.1\r\nHost: x\r\n\r\n");
    wr.write_all(first.as_bytes()).await.unwrap();
    let drip = drip_head(wr, b"GET /1003?fields=id HTTP/1.1\r\nHost: x\r\nX-Pad: ");
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut buf)).await;
    drip.abort();
    assert!(
        read.is_ok(),
        "the connection with a late second head is still open"
    );
    let replies = String::from_utf8_lossy(&buf);
    assert!(replies.starts_with("HTTP/1.1 200"), "{replies}");
    assert_eq!(replies.matches("HTTP/1.1 ").count(), 1, "{replies}");
    assert!(
        s.graph.requests().iter().all(|r| !r.path.contains("1003")),
        "the late head reached Graph"
    );
    let m = s.admin_get("/metrics").await.text();
    assert_eq!(idle_closed(&m), 1.0, "{m}");
    s.stop().await;
}

#[tokio::test]
async fn the_admin_listener_has_a_connection_cap_and_an_idle_timeout() {
    let s = Stack::start_with(
        graph_config(),
        "[server]\nadmin_max_connections = 2\nidle_timeout_ms = 300\nheader_read_timeout_ms = 30000\n",
    )
    .await;
    let admin = s.gw.admin_addr;
    // Two silent connections fill the admin listener (the head timeout is long).
    let held = [
        TcpStream::connect(admin).await.unwrap(),
        TcpStream::connect(admin).await.unwrap(),
    ];
    // A third is closed at once, unanswered.
    let sent = closed_within(
        admin,
        get_head("/healthz").as_bytes(),
        Duration::from_secs(5),
    )
    .await
    .expect("the third admin connection is closed promptly");
    assert!(sent.is_empty(), "{}", String::from_utf8_lossy(&sent));
    // The public listener is not affected.
    let r = raw_request(
        s.gw.addr,
        &get_head(&format!("/1001?fields=id&access_token={ADMIN_KEY}")),
    )
    .await
    .expect("a reply");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    drop(held);
    // Once they are gone the admin listener answers again.
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        if let Some(r) = raw_request(admin, &get_head("/metrics")).await {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "the admin listener did not recover"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        metric_value(
            &metrics,
            "graphgate_connections_refused_total",
            &["listener=\"admin\""]
        ) >= 1.0,
        "{metrics}"
    );
    // A keep-alive admin connection is closed once idle, like a public one.
    let mut conn = TcpStream::connect(admin).await.unwrap();
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the idle admin connection was not closed");
    assert!(
        buf.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    let m = s.admin_get("/metrics").await.text();
    assert!(
        metric_value(
            &m,
            "graphgate_connections_idle_closed_total",
            &["listener=\"admin\""]
        ) >= 1.0
    );
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Draining after SIGTERM
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn after_sigterm_readyz_answers_503_on_new_connections_until_exit() {
    let graph = fake_graph::FakeGraph::start(graph_config(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (port, admin_port) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!(
        "graphgate-drain-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("graphgate.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n\
             shutdown_grace_ms = 20000\n[upstream]\nurl = \"{}\"\ntimeout_ms = 20000\n\
             [credentials]\nsystem_user_token = \"{SYSTEM_TOKEN}\"\napp_secret = \"{APP_SECRET}\"\n\
             [[clients]]\nname = \"svc\"\nkey = \"{ADMIN_KEY}\"\npages = [\"*\"]\n",
            graph.url()
        ),
    )
    .unwrap();
    let child = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_graphgate"))
            .args(["serve", "--config"])
            .arg(&path)
            .env_remove("GRAPHGATE_CONFIG")
            .env_remove("GRAPHGATE_SYSTEM_USER_TOKEN")
            .env_remove("GRAPHGATE_APP_SECRET")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id().to_string();
    let public: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while raw_request(admin, &get_head("/readyz")).await.is_none() {
        assert!(Instant::now() < deadline, "graphgate did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(raw_request(admin, &get_head("/readyz"))
        .await
        .unwrap()
        .starts_with("HTTP/1.1 200"));

    // A slow request keeps the drain going while /readyz is probed. Its connection is a
    // plain socket, so whether its reply has arrived can be asked without waiting.
    graph.set_latency(Duration::from_secs(5));
    let slow_head = get_head(&format!("/1001?fields=id&access_token={ADMIN_KEY}"));
    let mut slow = std::net::TcpStream::connect(public).unwrap();
    std::io::Write::write_all(&mut slow, slow_head.as_bytes()).unwrap();
    slow.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while graph.stats().requests == 0 {
        assert!(
            Instant::now() < deadline,
            "the slow request did not reach Graph"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    // Every new connection to /readyz is answered 503 while the request drains; none hangs
    // or is refused. Only once the slow reply has been sent may graphgate be gone (a
    // loopback reply is in our socket before graphgate can close its listener).
    let answered = |slow: &std::net::TcpStream| match slow.peek(&mut [0u8; 1]) {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(e) => panic!("the slow connection failed: {e}"),
    };
    let mut draining = 0;
    let mut healthy_while_draining = false;
    while !answered(&slow) {
        match raw_request(admin, &get_head("/readyz")).await {
            Some(r) if r.starts_with("HTTP/1.1 503") => draining += 1,
            Some(r) if r.starts_with("HTTP/1.1 200") && draining == 0 => {
                // The signal may not have been handled yet.
            }
            None if answered(&slow) => break,
            other => panic!("during the drain /readyz answered {other:?}"),
        }
        if draining > 0 && !healthy_while_draining {
            let r = raw_request(admin, &get_head("/healthz")).await;
            healthy_while_draining = r.is_some_and(|r| r.starts_with("HTTP/1.1 200"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(draining >= 3, "only {draining} answers during the drain");
    assert!(healthy_while_draining, "/healthz stays up during the drain");
    slow.set_nonblocking(false).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reply = Vec::new();
    std::io::Read::read_to_end(&mut slow, &mut reply).expect("the in-flight request was answered");
    let slow = String::from_utf8_lossy(&reply);
    assert!(slow.starts_with("HTTP/1.1 200"), "{slow}");
    // Then it exits, and connections are refused rather than left hanging.
    let mut child = child;
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "graphgate did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(TcpStream::connect(admin).await.is_err());
    graph.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// The reply budget
// ---------------------------------------------------------------------------------------------

const MIB: usize = 1024 * 1024;

/// A client that sends a request and then reads nothing until told: the reply stays in
/// graphgate's memory (its receive buffer is pinned small, so the kernel takes little of it).
struct SlowReader(TcpStream);

impl SlowReader {
    async fn send(addr: SocketAddr, path: &str, headers: &str) -> SlowReader {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(64 * 1024).unwrap();
        let mut conn = socket.connect(addr).await.unwrap();
        let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n");
        conn.write_all(head.as_bytes()).await.unwrap();
        SlowReader(conn)
    }

    /// Reads the whole reply: (status, head, body).
    async fn read(mut self) -> (u16, String, Vec<u8>) {
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(180), self.0.read_to_end(&mut buf))
            .await
            .expect("the reply within 180 s")
            .expect("read");
        let split = buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no head in {}", String::from_utf8_lossy(&buf)));
        let head = String::from_utf8_lossy(&buf[..split]).into_owned();
        let status = head
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line: {head}"));
        (status, head, buf[split + 4..].to_vec())
    }
}

async fn metrics_text(s: &Stack) -> String {
    s.admin_get("/metrics").await.text()
}

/// Polls the metrics until `done` holds (within 120 s: six 15 MiB replies keep a loaded
/// machine busy); returns the last text.
async fn metrics_until(s: &Stack, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let m = metrics_text(s).await;
        if done(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "{what}:\n{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn buffered(m: &str) -> f64 {
    metric_value(m, "graphgate_buffered_reply_bytes", &[])
}

fn budget_rejections(m: &str, source: &str) -> f64 {
    let filter = format!("source=\"{source}\"");
    metric_value(m, "graphgate_reply_budget_rejections_total", &[&filter])
}

/// Checks a 503 from the budget: Graph-style, transient, with Retry-After.
fn assert_budget_refusal(head: &str, body: &[u8]) {
    let v: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)));
    assert_eq!(v["error"]["type"], "GraphgateException", "{v}");
    assert_eq!(v["error"]["code"], 2, "{v}");
    assert_eq!(v["error"]["is_transient"], true, "{v}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
}

/// 15 MiB replies, a 40 MiB budget: two fit, the rest is refused.
const BIG_REPLY: usize = 15 * MIB;
/// The upstream and header-read timeouts are long: producing, reading and compressing six
/// 15 MiB replies at once keeps a loaded machine busy for seconds, and these tests are about
/// the budget, not the timeouts.
const BUDGET_TOML: &str = "[upstream]\nmax_response_bytes = 16777216\n\
     max_buffered_reply_bytes = 41943040\ntimeout_ms = 120000\n\
     [server]\nheader_read_timeout_ms = 60000\n";

// Two workers: while one is busy with a 15 MiB body, the other still answers the
// metrics polls (one thread starved them past the client's 20 s on a loaded machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_replies_beyond_the_reply_budget_are_refused_with_503_and_the_memory_is_given_back(
) {
    let s = Stack::start_with(graph_config(), BUDGET_TOML).await;
    s.graph.set_fault(fake_graph::Fault::LargeReply(BIG_REPLY));
    // Distinct uncached reads, each a 15 MiB reply, none read by its client yet.
    let mut clients = Vec::new();
    for i in 0..6 {
        let path = format!("/v21.0/1001?fields=id&n={i}&access_token={ADMIN_KEY}");
        clients.push(SlowReader::send(s.gw.addr, &path, "Cache-Control: no-store\r\n").await);
    }
    let m = metrics_until(&s, "four replies refused", |m| {
        budget_rejections(m, "upstream") >= 4.0
    })
    .await;
    assert_eq!(budget_rejections(&m, "upstream"), 4.0, "{m}");
    let held = buffered(&m);
    assert!(
        held >= (2 * BIG_REPLY) as f64 && held <= (40 * MIB) as f64,
        "{held} bytes held\n{m}"
    );
    assert_eq!(s.graph.stats().requests, 6);
    // Small replies still fit beside the two held ones.
    s.graph.set_fault(fake_graph::Fault::None);
    let r = s
        .request(
            http::Method::GET,
            &format!("/v21.0/1002?fields=id,name&access_token={ADMIN_KEY}"),
            &[("cache-control", "no-store")],
            bytes::Bytes::new(),
        )
        .await;
    assert_eq!(r.status, http::StatusCode::OK, "{}", r.text());
    // Every client gets its answer once it reads: two whole replies, four refusals.
    let mut whole = 0;
    for c in clients {
        let (status, head, body) = c.read().await;
        match status {
            200 => {
                assert_eq!(body.len(), BIG_REPLY, "{head}");
                whole += 1;
            }
            503 => assert_budget_refusal(&head, &body),
            other => panic!("status {other}: {head}\n{}", String::from_utf8_lossy(&body)),
        }
    }
    assert_eq!(whole, 2);
    let m = metrics_until(&s, "the budget given back", |m| buffered(m) == 0.0).await;
    assert_eq!(
        metric_value(&m, "graphgate_requests_total", &["status_class=\"5xx\""]),
        4.0,
        "{m}"
    );
    s.stop().await;
}

// Two workers: while one is busy with a 15 MiB body, the other still answers the
// metrics polls (one thread starved them past the client's 20 s on a loaded machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_bodies_decompressed_for_each_client_count_against_the_reply_budget() {
    let s = Stack::start_with(graph_config(), BUDGET_TOML).await;
    s.graph.set_fault(fake_graph::Fault::LargeReply(BIG_REPLY));
    let path = format!("/v21.0/1001?fields=id&access_token={ADMIN_KEY}");
    // Six clients at once, one upstream call: a shared body is counted once, so all fit.
    // The upstream is slow enough that all six ask before it answers, however slowly they
    // connect.
    s.graph.set_latency(Duration::from_secs(3));
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(SlowReader::send(s.gw.addr, &path, "").await);
    }
    for c in clients {
        let (status, head, body) = c.read().await;
        assert_eq!(status, 200, "{head}");
        assert_eq!(body.len(), BIG_REPLY);
    }
    assert_eq!(s.graph.stats().requests, 1, "the misses were coalesced");
    s.graph.set_latency(Duration::ZERO);
    s.graph.set_fault(fake_graph::Fault::None);
    metrics_until(&s, "the fill given back", |m| buffered(m) == 0.0).await;
    // Now cached (compressed): every hit decompresses its own 15 MiB copy.
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(SlowReader::send(s.gw.addr, &path, "").await);
    }
    let m = metrics_until(&s, "four hits refused", |m| {
        budget_rejections(m, "cache") >= 4.0
    })
    .await;
    assert_eq!(budget_rejections(&m, "cache"), 4.0, "{m}");
    assert!(buffered(&m) <= (40 * MIB) as f64, "{m}");
    let mut whole = 0;
    for c in clients {
        let (status, head, body) = c.read().await;
        match status {
            200 => {
                assert!(head.contains("x-cache: HIT"), "{head}");
                assert_eq!(body.len(), BIG_REPLY);
                whole += 1;
            }
            503 => assert_budget_refusal(&head, &body),
            other => panic!("status {other}: {head}\n{}", String::from_utf8_lossy(&body)),
        }
    }
    assert_eq!(whole, 2);
    assert_eq!(s.graph.stats().requests, 1, "hits never went upstream");
    metrics_until(&s, "the budget given back", |m| buffered(m) == 0.0).await;
    s.stop().await;
}

/// A scripted upstream that answers every request with a chunked (length-less) 200 of
/// `len` bytes of JSON, sent 256 KiB at a time.
async fn chunked_upstream(len: usize) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => head.extend_from_slice(&buf[..k]),
                    }
                }
                let mut body = br#"{"id":"1001","padding":""#.to_vec();
                body.resize(len - 2, b'a');
                body.extend_from_slice(b"\"}");
                let start = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
                if stream.write_all(start.as_bytes()).await.is_err() {
                    return;
                }
                for chunk in body.chunks(256 * 1024) {
                    let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
                    framed.extend_from_slice(chunk);
                    framed.extend_from_slice(b"\r\n");
                    if stream.write_all(&framed).await.is_err() {
                        return;
                    }
                }
                let _ = stream.write_all(b"0\r\n\r\n").await;
            });
        }
    });
    url
}

#[tokio::test]
async fn a_reply_without_a_length_is_counted_as_its_bytes_arrive() {
    // 6 MiB replies of unknown length, an 8 MiB budget: two cannot both be held.
    let upstream = chunked_upstream(6 * MIB).await;
    let gw = graphgate::server::start(
        graphgate::config::Config::from_toml(
            &gateway_toml(
                &upstream,
                "[upstream]\nmax_response_bytes = 8388608\nmax_buffered_reply_bytes = 8388608\nretries = 0\n",
            ),
            |_| None,
        )
        .unwrap(),
    )
    .await
    .unwrap();
    let mut clients = Vec::new();
    for i in 0..2 {
        let path = format!("/v21.0/1001?fields=id&n={i}&access_token={ADMIN_KEY}");
        clients.push(SlowReader::send(gw.addr, &path, "Cache-Control: no-store\r\n").await);
    }
    let mut statuses = Vec::new();
    for c in clients {
        let (status, head, body) = c.read().await;
        match status {
            200 => assert_eq!(body.len(), 6 * MIB),
            503 => assert_budget_refusal(&head, &body),
            other => panic!("status {other}: {head}\n{}", String::from_utf8_lossy(&body)),
        }
        statuses.push(status);
    }
    // Whichever came second (or both, if they grew in step) was refused part-way.
    assert!(statuses.contains(&503), "{statuses:?}");
    let m = send(
        &client(),
        http::Method::GET,
        &format!("{}/metrics", gw.admin_url()),
        &[],
        bytes::Bytes::new(),
        &[],
    )
    .await
    .text();
    assert!(budget_rejections(&m, "upstream") >= 1.0, "{m}");
    gw.shutdown().await;
}

/// A body refused as too large before it was read: the client still gets its Graph-style
/// 413, and the rest of its upload is drained rather than answered with a reset (a lingering
/// close, as nginx's), so it does not fail on a broken pipe before reading the reply. Both
/// orders: the reply while the upload is under way, and the reply before its first byte.
#[tokio::test]
async fn an_oversized_upload_gets_its_413_and_can_finish_sending() {
    let s = Stack::start().await;
    for sent_before_reply in [0.5, 0.0] {
        let reply = refused_upload(&s, sent_before_reply).await;
        assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
        assert!(reply.contains("\"code\":100"), "{reply}");
    }
    assert_eq!(s.graph.stats().requests, 0);
    s.stop().await;
}

/// Sends a 3 MB form upload, the given share of its body before reading the reply and the
/// rest after it; returns everything read until graphgate closed the connection.
async fn refused_upload(s: &Stack, sent_before_reply: f64) -> String {
    let body_len = 3 * 1024 * 1024;
    let mut conn = TcpStream::connect(s.gw.addr).await.unwrap();
    let head = format!(
        "POST /1001/feed HTTP/1.1\r\nHost: x\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {body_len}\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b'y'; 64 * 1024];
    let chunks = body_len / chunk.len();
    let before = (chunks as f64 * sent_before_reply) as usize;
    for _ in 0..before {
        conn.write_all(&chunk).await.unwrap();
    }
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&reply).contains("\"code\":100") {
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
            .await
            .expect("the 413 within 10 s")
            .expect("the reply reads without a reset");
        assert!(n > 0, "closed before the whole reply: {reply:?}");
        reply.extend_from_slice(&buf[..n]);
    }
    // The rest of the upload, after the reply: a socket closed outright answers it with a
    // reset, and a write fails; a lingering one takes it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in before..chunks {
        conn.write_all(&chunk)
            .await
            .expect("the upload is drained, not reset");
    }
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut reply))
        .await
        .expect("graphgate closes the connection")
        .expect("the end reads without a reset");
    String::from_utf8_lossy(&reply).into_owned()
}
