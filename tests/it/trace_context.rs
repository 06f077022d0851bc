//! Following a request across services: W3C `traceparent` and `X-Request-Id` from the client
//! to Graph and back, the trace id in graphgate's own error bodies, and the access log line
//! (its fields, the client address behind trusted proxies only, no secret in it).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fake_graph::FakeGraph;
use http::{Method, StatusCode};
use serde_json::Value;

use crate::support::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// The header `name` of the last request the simulated Graph received.
fn upstream_header(graph: &FakeGraph, name: &str) -> Option<String> {
    let seen = graph.requests();
    let last = seen.last()?;
    last.headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.clone())
}

/// `(trace id, parent id, flags)` of a well-formed version-00 `traceparent`.
fn parts(traceparent: &str) -> (String, String, String) {
    let p: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(p.len(), 4, "{traceparent}");
    assert_eq!(p[0], "00");
    assert_eq!(p[1].len(), 32);
    assert_eq!(p[2].len(), 16);
    (p[1].into(), p[2].into(), p[3].into())
}

#[tokio::test]
async fn a_client_trace_reaches_graph_with_graphgate_as_parent_and_names_the_reply() {
    let s = Stack::start().await;
    let path = format!("/v21.0/1001?fields=id,name&access_token={ADMIN_KEY}");
    let r = s
        .request(
            Method::GET,
            &path,
            &[
                ("traceparent", TRACEPARENT),
                ("tracestate", "vendor=abc"),
                ("x-request-id", "order-42"),
            ],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header("x-graphgate-trace-id"), Some(TRACE));
    assert_eq!(r.header("x-request-id"), Some("order-42"));
    let sent = upstream_header(&s.graph, "traceparent").expect("traceparent upstream");
    let (trace, parent, flags) = parts(&sent);
    assert_eq!(trace, TRACE, "same trace upstream");
    assert_ne!(
        parent, "00f067aa0ba902b7",
        "graphgate's own span is the parent"
    );
    assert_ne!(parent, "0000000000000000");
    assert_eq!(flags, "01", "the sampled flag is kept");
    assert_eq!(
        upstream_header(&s.graph, "tracestate").as_deref(),
        Some("vendor=abc")
    );
    assert_eq!(
        upstream_header(&s.graph, "x-request-id").as_deref(),
        Some("order-42")
    );

    // graphgate's own error bodies carry the client's trace id.
    let denied = s
        .request(
            Method::GET,
            "/v21.0/1001?access_token=not-a-key",
            &[("traceparent", TRACEPARENT)],
            Bytes::new(),
        )
        .await;
    assert_eq!(denied.status, StatusCode::UNAUTHORIZED);
    assert_eq!(denied.json()["error"]["fbtrace_id"], TRACE);
    assert_eq!(denied.header("x-graphgate-trace-id"), Some(TRACE));
    assert_eq!(denied.header("x-request-id"), Some(TRACE));
    s.stop().await;
}

#[tokio::test]
async fn a_bad_traceparent_or_request_id_is_replaced_by_new_ones() {
    let s = Stack::start().await;
    let long_id = "a".repeat(129);
    let bad_ids: [&str; 3] = ["has space", "semi;colon", &long_id];
    for (i, (traceparent, request_id)) in [
        (
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            bad_ids[0],
        ),
        (
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            bad_ids[1],
        ),
        ("garbage", bad_ids[2]),
    ]
    .into_iter()
    .enumerate()
    {
        let path = format!("/v21.0/1001?fields=id,about&limit={i}&access_token={ADMIN_KEY}");
        let r = s
            .request(
                Method::GET,
                &path,
                &[("traceparent", traceparent), ("x-request-id", request_id)],
                Bytes::new(),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let trace = r.header("x-graphgate-trace-id").unwrap().to_string();
        assert_eq!(trace.len(), 32, "a W3C trace id: {trace}");
        assert_ne!(trace, TRACE, "a new trace");
        let sent = upstream_header(&s.graph, "traceparent").expect("traceparent upstream");
        let (upstream_trace, _, flags) = parts(&sent);
        assert_eq!(upstream_trace, trace, "the new trace goes upstream");
        assert_eq!(flags, "00");
        // The replaced request id is the trace id, echoed and passed on.
        assert_eq!(r.header("x-request-id"), Some(trace.as_str()));
        assert_eq!(
            upstream_header(&s.graph, "x-request-id").as_deref(),
            Some(trace.as_str())
        );
    }
    // Without any, each request starts its own trace.
    let a = s
        .get(&format!("/v21.0/1002?access_token={ADMIN_KEY}"))
        .await;
    let b = s
        .get(&format!("/v21.0/1002?access_token={ADMIN_KEY}"))
        .await;
    assert_ne!(
        a.header("x-graphgate-trace-id"),
        b.header("x-graphgate-trace-id")
    );
    assert_eq!(b.header("x-cache"), Some("HIT"));
    s.stop().await;
}

const BIN: &str = env!("CARGO_BIN_EXE_graphgate");

/// graphgate as a process with JSON logs at `level`, its log lines collected; killed (by its
/// pid) on drop.
struct Logged {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    base: String,
    dir: std::path::PathBuf,
}

impl Logged {
    async fn start(graph: &FakeGraph, tag: &str, extra: &str) -> Logged {
        Logged::start_at(graph, tag, "debug", extra).await
    }

    /// With `log.level` = `level` (which must let `graphgate listening` through).
    async fn start_at(graph: &FakeGraph, tag: &str, level: &str, extra: &str) -> Logged {
        let toml = gateway_toml(
            &graph.url(),
            &format!("[log]\nformat = \"json\"\nlevel = \"{level}\"\n{extra}"),
        );
        let dir = std::env::temp_dir().join(format!(
            "graphgate-tracing-{tag}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("graphgate.toml");
        std::fs::write(&path, toml).unwrap();
        let mut child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&path)
            .env_remove("RUST_LOG")
            .env_remove("GRAPHGATE_SYSTEM_USER_TOKEN")
            .env_remove("GRAPHGATE_APP_SECRET")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        let mut logged = Logged {
            child,
            lines,
            base: String::new(),
            dir,
        };
        let listening = logged
            .wait_for(|v| v["fields"]["message"] == "graphgate listening")
            .await;
        logged.base = format!("http://{}", listening["fields"]["addr"].as_str().unwrap());
        logged
    }

    fn find(&self, pred: &dyn Fn(&Value) -> bool) -> Option<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| pred(v))
    }

    async fn wait_for(&self, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(v) = self.find(&pred) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "no such log line: {:?}",
                self.lines.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The access log line of the request whose reply this is.
    async fn access_line(&self, reply: &Reply) -> Value {
        let trace = reply.header("x-graphgate-trace-id").unwrap().to_string();
        self.wait_for(move |v| {
            v["fields"]["message"] == "request" && v["fields"]["trace_id"] == trace.as_str()
        })
        .await
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)], secrets: &[String]) -> Reply {
        let url = format!("{}{path}", self.base);
        send(&client(), Method::GET, &url, headers, Bytes::new(), secrets).await
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn access_log_lines_carry_the_fields_and_the_trace_in_every_line() {
    let graph = FakeGraph::start(graph_config(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let secrets = secrets_of(&graph);
    let gw = Logged::start(&graph, "fields", "").await;
    let path = format!("/v21.0/1001/feed?fields=id,message&access_token={ADMIN_KEY}");
    let r = gw
        .get(
            &path,
            &[
                ("traceparent", TRACEPARENT),
                ("x-request-id", "order-7"),
                ("user-agent", "test-agent/1.0"),
                ("x-forwarded-for", "203.0.113.9"),
            ],
            &secrets,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let line = gw.access_line(&r).await;
    let f = &line["fields"];
    assert_eq!(f["trace_id"], TRACE);
    assert_eq!(f["request_id"], "order-7");
    assert_eq!(f["method"], "GET");
    assert_eq!(f["path"], "/v21.0/1001/feed", "no query string: {f}");
    assert_eq!(f["node"], "1001");
    assert_eq!(f["page"], "1001");
    assert_eq!(f["client"], "admin");
    assert_eq!(f["status"], 200);
    assert_eq!(f["cache"], "miss");
    assert_eq!(f["bytes"].as_u64(), Some(r.body.len() as u64), "{f}");
    assert!(f["total_us"].as_u64().is_some(), "{f}");
    assert!(f["upstream_ms"].as_i64().unwrap() >= 0, "{f}");
    assert!(f["queue_ms"].as_f64().unwrap() >= 0.0, "{f}");
    // The peer is not a trusted proxy: its X-Forwarded-For is not believed.
    assert_eq!(f["client_addr"], "127.0.0.1");
    assert_eq!(f["user_agent"], "test-agent/1.0");
    // The request's span names the trace on every line inside it.
    assert_eq!(line["span"]["trace_id"], TRACE, "{line}");
    assert_eq!(line["span"]["request_id"], "order-7", "{line}");

    // A key pasted into the path is not logged; a long User-Agent is cut.
    let long_agent = format!("agent-{}", "x".repeat(1000));
    let r = gw
        .get(
            &format!("/v21.0/{ADMIN_KEY}/feed"),
            &[("user-agent", long_agent.as_str())],
            &secrets,
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let line = gw.access_line(&r).await;
    assert_eq!(line["fields"]["path"], "/v21.0/-/feed");
    assert_eq!(
        line["fields"]["user_agent"].as_str().unwrap().len(),
        256,
        "{line}"
    );
    drop(gw);
    graph.shutdown();
}

#[tokio::test]
async fn forwarded_for_names_the_client_only_behind_a_trusted_proxy() {
    let graph = FakeGraph::start(graph_config(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let secrets = secrets_of(&graph);
    let gw = Logged::start(
        &graph,
        "xff",
        "[server]\ntrusted_proxies = [\"127.0.0.0/8\", \"10.0.0.0/8\"]\n",
    )
    .await;
    let path = format!("/v21.0/1001?access_token={ADMIN_KEY}");
    // Right-most untrusted address; what is left of it could be anyone's.
    let r = gw
        .get(
            &path,
            &[("x-forwarded-for", "6.6.6.6, 203.0.113.9, 10.1.2.3")],
            &secrets,
        )
        .await;
    assert_eq!(
        gw.access_line(&r).await["fields"]["client_addr"],
        "203.0.113.9"
    );
    let r = gw.get(&path, &[], &secrets).await;
    assert_eq!(
        gw.access_line(&r).await["fields"]["client_addr"],
        "127.0.0.1"
    );
    drop(gw);
    graph.shutdown();
}

/// OpenTelemetry export (the `otlp` feature): the request span reaches a collector over
/// OTLP/HTTP with the request's W3C ids, and a collector that is down costs requests nothing.
#[cfg(feature = "otlp")]
mod otlp {
    use std::net::SocketAddr;

    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    use super::*;

    /// A tiny OTLP/HTTP collector on a free loopback port: records the body of every
    /// `POST /v1/traces` and answers 200 (an empty protobuf reply).
    struct Collector {
        addr: SocketAddr,
        bodies: Arc<Mutex<Vec<Bytes>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Collector {
        async fn start() -> Collector {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let bodies = Arc::new(Mutex::new(Vec::new()));
            let seen = bodies.clone();
            let task = tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let seen = seen.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                            let seen = seen.clone();
                            async move {
                                let ok = req.method() == Method::POST
                                    && req.uri().path() == "/v1/traces";
                                let body = req.into_body().collect().await?.to_bytes();
                                let status = if ok {
                                    seen.lock().unwrap().push(body);
                                    StatusCode::OK
                                } else {
                                    StatusCode::NOT_FOUND
                                };
                                let reply = http::Response::builder()
                                    .status(status)
                                    .header("content-type", "application/x-protobuf")
                                    .body(Full::new(Bytes::new()))
                                    .expect("a static reply");
                                Ok::<_, hyper::Error>(reply)
                            }
                        });
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
            Collector { addr, bodies, task }
        }

        /// Waits (up to 30 s: spans are sent in batches) for an export that contains all of
        /// `needles`, and returns it.
        async fn export_with(&self, needles: &[&[u8]]) -> Bytes {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let found = self
                    .bodies
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|b| needles.iter().all(|n| contains(b, n)))
                    .cloned();
                if let Some(body) = found {
                    return body;
                }
                assert!(
                    Instant::now() < deadline,
                    "no export with the request's ids; {} exports received",
                    self.bodies.lock().unwrap().len()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    impl Drop for Collector {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[tokio::test]
    async fn otlp_export_carries_the_request_span_with_the_client_trace_and_graphs_parent() {
        let collector = Collector::start().await;
        let graph = FakeGraph::start(graph_config(), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let secrets = secrets_of(&graph);
        let extra = format!(
            "otlp_endpoint = \"http://{}\"\notlp_service_name = \"gateway-under-test\"\n",
            collector.addr
        );
        // The log level leaves out the request's lines; the export does not depend on it.
        let gw = Logged::start_at(&graph, "otlp", "warn,graphgate::server=info", &extra).await;
        let path = format!("/v21.0/1001?fields=id,name&access_token={ADMIN_KEY}");
        let r = gw
            .get(&path, &[("traceparent", TRACEPARENT)], &secrets)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        // graphgate's span is the parent-id Graph was given.
        let sent = upstream_header(&graph, "traceparent").expect("traceparent upstream");
        let (_, graphgate_span, _) = parts(&sent);
        let trace = hex::decode(TRACE).unwrap();
        let client_span = hex::decode("00f067aa0ba902b7").unwrap();
        let own_span = hex::decode(&graphgate_span).unwrap();
        // The protobuf holds the ids as raw bytes: the client's trace, the client's span as
        // the parent, graphgate's span as the one Graph saw, and the service name.
        let body = collector
            .export_with(&[&trace, &client_span, &own_span, b"gateway-under-test"])
            .await;
        assert!(contains(&body, b"request"), "the span is named `request`");
        // The access log line travels as an event of the span.
        assert!(
            contains(&body, b"client_addr"),
            "the access log line is a span event"
        );
        assert!(
            gw.find(&|v| v["fields"]["message"] == "request").is_none(),
            "no access log line at level warn"
        );

        // Without a traceparent the exported trace is the new one graphgate logs and names.
        let r = gw.get(&path, &[], &secrets).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let new_trace = hex::decode(r.header("x-graphgate-trace-id").unwrap()).unwrap();
        assert_ne!(new_trace, trace);
        collector.export_with(&[&new_trace]).await;
        graph.shutdown();
    }

    #[tokio::test]
    async fn otlp_collector_down_costs_requests_nothing() {
        // A port that was free a moment ago: nothing listens there.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let graph = FakeGraph::start(graph_config(), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let secrets = secrets_of(&graph);
        let extra = format!("otlp_endpoint = \"http://{closed}\"\n");
        let gw = Logged::start(&graph, "otlp-down", &extra).await;
        for node in ["1001", "1002", "1001"] {
            let path = format!("/v21.0/{node}?fields=id,name&access_token={ADMIN_KEY}");
            let r = gw
                .get(&path, &[("traceparent", TRACEPARENT)], &secrets)
                .await;
            assert_eq!(r.status, StatusCode::OK, "{node}: {}", r.text());
            gw.access_line(&r).await;
        }
        // Still serving once the first batch has failed to go out.
        tokio::time::sleep(Duration::from_secs(6)).await;
        let path = format!("/v21.0/1002?fields=id,name&access_token={ADMIN_KEY}");
        let r = gw.get(&path, &[], &secrets).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        graph.shutdown();
    }
}
