//! Observability and deployment, checked with the real tools:
//! - `promtool` accepts deploy/prometheus/prometheus.yml and alerts.yml, and the alert unit
//!   tests in alerts_test.yml pass;
//! - the Grafana dashboard, the provisioning files and docker-compose.yml are well formed
//!   (YAML parsed by PyYAML, since `docker compose` cannot run here);
//! - a real Prometheus scrapes a graphgate driven through hits, misses, coalescing, queueing,
//!   a throttled Page, 429s and a rejected token, and every PromQL expression of the
//!   dashboard and of the alert rules returns data; the throttling alert fires for the
//!   throttled Page;
//! - the binary's JSON request log carries the documented fields and no secret, at debug level.
//!
//! Needs `promtool` and `prometheus` (Debian package `prometheus`) and python3 with PyYAML;
//! `.ci/run` installs them when missing.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fake_graph::{FakeGraph, FakeGraphConfig};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tokio::task::JoinSet;

use crate::support::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Parses a YAML file with PyYAML into JSON.
fn yaml(rel: &str) -> Value {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(repo().join(rel))
        .output()
        .expect("python3 runs (with PyYAML; .ci/run installs it)");
    assert!(
        out.status.success(),
        "{rel} is not valid YAML: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("python printed JSON")
}

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {cmd} ({e}); install the Debian package `prometheus`")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn promtool_accepts_the_prometheus_config_and_the_alert_rules() {
    for args in [
        &["check", "config", "deploy/prometheus/prometheus.yml"][..],
        &["check", "rules", "deploy/prometheus/alerts.yml"][..],
        &["test", "rules", "deploy/prometheus/alerts_test.yml"][..],
    ] {
        let (ok, text) = run("promtool", args);
        assert!(ok, "promtool {}:\n{text}", args.join(" "));
        assert!(text.contains("SUCCESS"), "{text}");
    }
}

/// Every alert rule of deploy/prometheus/alerts.yml: (name, expr, labels, annotations).
fn alert_rules() -> Vec<Value> {
    let doc = yaml("deploy/prometheus/alerts.yml");
    doc["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").clone())
        .collect()
}

#[test]
fn every_alert_has_a_severity_summary_description_and_runbook() {
    let rules = alert_rules();
    let names: Vec<&str> = rules.iter().filter_map(|r| r["alert"].as_str()).collect();
    for wanted in [
        "GraphgatePageThrottled",
        "GraphgatePagePaused",
        "GraphgateQueueWaitHigh",
        "GraphgateHigh429Rate",
        "GraphgateUpstreamErrorRate",
        "GraphgateTokenInvalid",
        "GraphgateRedisDown",
        "GraphgateCacheHitRatioCollapse",
    ] {
        assert!(names.contains(&wanted), "no alert {wanted} in {names:?}");
    }
    for r in &rules {
        let name = r["alert"].as_str().expect("only alerting rules");
        assert!(
            ["warning", "critical"].contains(&r["labels"]["severity"].as_str().unwrap_or("")),
            "{name}: severity"
        );
        for a in ["summary", "description", "runbook"] {
            let text = r["annotations"][a].as_str().unwrap_or("");
            assert!(
                text.len() >= 20,
                "{name}: annotation {a} missing or too short"
            );
        }
    }
}

/// A dashboard expression as Grafana sends it: the rate interval and range, and the job
/// and instance variables at "All".
fn as_grafana_sends(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__range", "5m")
        .replace("$job", ".*")
        .replace("$instance", ".*")
}

/// Every (panel title, expr) of the dashboard, variables substituted.
fn dashboard_queries(dash: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        if p["type"] == "row" {
            continue;
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                p["title"].as_str().unwrap_or("").to_string(),
                as_grafana_sends(t["expr"].as_str().unwrap_or("")),
            ));
        }
    }
    out
}

#[test]
fn dashboard_panels_each_have_a_datasource_a_query_and_a_unit() {
    let dash: Value =
        serde_json::from_str(&read("deploy/grafana/dashboards/graphgate.json")).expect("JSON");
    assert_eq!(dash["uid"], "graphgate");
    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = std::collections::HashSet::new();
    let mut titles = Vec::new();
    for p in panels {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "duplicate panel id {id}");
        assert!(p["gridPos"]["w"].as_u64().is_some(), "panel {id} gridPos");
        // Rows only group panels: no query of their own.
        if p["type"] == "row" {
            continue;
        }
        let title = p["title"].as_str().unwrap_or("");
        assert!(!title.is_empty(), "panel {id} has no title");
        assert!(
            p["description"].as_str().is_some_and(|d| d.len() > 20),
            "{title}: description"
        );
        assert_eq!(p["datasource"]["type"], "prometheus", "{title}: datasource");
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "{title}: datasource"
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no target");
        for t in targets {
            assert!(
                t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                "{title}: target without expr"
            );
            assert!(t["refId"].as_str().is_some(), "{title}: refId");
        }
        assert!(
            p["fieldConfig"]["defaults"]["unit"]
                .as_str()
                .is_some_and(|u| !u.is_empty()),
            "{title}: fieldConfig.defaults.unit"
        );
        titles.push(title.to_string());
    }
    assert!(titles.len() >= 20, "{titles:?}");
    // docs/observability.md describes every panel by its exact title.
    let doc = read("docs/observability.md");
    for t in &titles {
        assert!(
            doc.contains(&format!("**{t}**")),
            "docs/observability.md does not describe panel {t:?}"
        );
    }
    // The provisioning points Grafana at the dashboard and the datasource uid it uses.
    let ds = yaml("deploy/grafana/provisioning/datasources/prometheus.yml");
    assert_eq!(ds["datasources"][0]["uid"], "prometheus");
    assert_eq!(ds["datasources"][0]["url"], "http://prometheus:9090");
    let prov = yaml("deploy/grafana/provisioning/dashboards/graphgate.yml");
    assert_eq!(
        prov["providers"][0]["options"]["path"],
        "/var/lib/grafana/dashboards"
    );
}

#[test]
fn compose_stack_dockerfile_and_replica_configs_are_well_formed() {
    let compose = yaml("docker-compose.yml");
    let services = compose["services"].as_object().expect("services");
    for s in [
        "fake-graph",
        "graphgate-1",
        "graphgate-2",
        "redis",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains_key(s), "service {s} missing");
    }
    let prom = yaml("deploy/prometheus/prometheus.yml");
    let targets: Vec<&str> = prom["scrape_configs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["job_name"] == "graphgate")
        .expect("graphgate job")["static_configs"][0]["targets"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for (n, service) in ["graphgate-1", "graphgate-2"].iter().enumerate() {
        let s = &services[*service];
        assert_eq!(
            s["build"], ".",
            "{service} is built from the repo Dockerfile"
        );
        assert!(
            s["healthcheck"]["test"]
                .as_array()
                .is_some_and(|t| t.iter().any(|a| a.as_str().unwrap_or("") == "healthcheck")),
            "{service}: healthcheck with `graphgate healthcheck` (/readyz)"
        );
        // Its config file exists, is a valid graphgate config, and matches what Prometheus
        // scrapes (the admin listener) and where Redis is.
        let mount = s["volumes"][0].as_str().expect("config mount");
        let host = mount.split(':').next().unwrap().trim_start_matches("./");
        assert_eq!(host, format!("deploy/graphgate/replica-{}.toml", n + 1));
        let text = read(host);
        let cfg = graphgate::config::Config::from_toml(&text, |_| None)
            .unwrap_or_else(|e| panic!("{host}: {e}"));
        let raw: toml::Table = text.parse().unwrap();
        assert_eq!(raw["redis"]["url"].as_str(), Some("redis://redis:6379"));
        assert_eq!(
            raw["upstream"]["url"].as_str(),
            Some("http://fake-graph:8081")
        );
        let port = cfg.server.admin_listen.port();
        assert!(
            targets.contains(&format!("{service}:{port}").as_str()),
            "Prometheus does not scrape {service}:{port}: {targets:?}"
        );
    }
    let cmd = services["fake-graph"]["command"].to_string();
    assert!(
        cmd.contains("fake-graph") && cmd.contains("0.0.0.0:8081"),
        "{cmd}"
    );
    // The production image has no simulated Graph; its service builds the image with the
    // `demo` feature, through the Dockerfile's FEATURES argument, under a tag of its own.
    let build = &services["fake-graph"]["build"];
    assert_eq!(build["context"], ".", "{build}");
    assert_eq!(build["args"]["FEATURES"], "demo", "{build}");
    assert_ne!(
        services["fake-graph"]["image"], services["graphgate-1"]["image"],
        "the demo image must not take the production image's tag"
    );
    assert!(
        read("Dockerfile").contains("--features \"$FEATURES\""),
        "the Dockerfile's build does not take FEATURES"
    );
    let prom_volumes = services["prometheus"]["volumes"].to_string();
    assert!(
        prom_volumes.contains("./deploy/prometheus:/etc/prometheus"),
        "{prom_volumes}"
    );
    let grafana_volumes = services["grafana"]["volumes"].to_string();
    assert!(grafana_volumes.contains("./deploy/grafana/provisioning:/etc/grafana/provisioning"));
    assert!(grafana_volumes.contains("./deploy/grafana/dashboards:/var/lib/grafana/dashboards"));
    for dir in [
        "deploy/prometheus",
        "deploy/grafana/provisioning",
        "deploy/grafana/dashboards",
    ] {
        assert!(repo().join(dir).is_dir(), "{dir}");
    }

    // The Dockerfile's rules and its build stage are checked in tests/it/deploy.rs.
    let docker = read("Dockerfile");
    for needle in ["EXPOSE 8080 9090", "HEALTHCHECK"] {
        assert!(docker.contains(needle), "Dockerfile lacks {needle:?}");
    }
}

// ---------------------------------------------------------------------------------------
// A real Prometheus.

/// A Prometheus process started for one test; killed (by its pid) and its data removed on drop.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    url: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Prometheus {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let dir = std::env::temp_dir().join(format!("graphgate-{name}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Starts Prometheus scraping `target` (host:port of graphgate's admin listener) every
/// second, with the repo's alert rules evaluated every second.
fn start_prometheus(target: &str) -> Prometheus {
    let dir = temp_dir("prometheus");
    let rules = repo().join("deploy/prometheus/alerts.yml");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {rules}\n\
         scrape_configs:\n  - job_name: graphgate\n    static_configs:\n      - targets: ['{target}']\n",
        rules = rules.display()
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let port = free_port();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("prometheus runs (Debian package `prometheus`; .ci/run installs it)");
    Prometheus {
        child,
        dir,
        url: format!("http://127.0.0.1:{port}"),
    }
}

/// GET that reports failures instead of panicking (for polling).
async fn try_get(url: &str) -> Option<(StatusCode, Bytes)> {
    let req = Request::get(url).body(Full::new(Bytes::new())).ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(5), client().request(req))
        .await
        .ok()?
        .ok()?;
    let status = resp.status();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, body))
}

/// Runs an instant query; returns (result type, results) or the error Prometheus gave.
async fn query(prom: &Prometheus, expr: &str) -> Result<(String, Vec<Value>), String> {
    let q: String = form_urlencoded::byte_serialize(expr.as_bytes()).collect();
    let (status, body) = try_get(&format!("{}/api/v1/query?query={q}", prom.url))
        .await
        .ok_or("no answer from prometheus")?;
    let v: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    if status != StatusCode::OK || v["status"] != "success" {
        return Err(format!("{status}: {v}"));
    }
    let kind = v["data"]["resultType"].as_str().unwrap_or("").to_string();
    let result = match &v["data"]["result"] {
        Value::Array(a) => a.clone(),
        // A scalar or string: one value.
        other => vec![other.clone()],
    };
    Ok((kind, result))
}

/// The operands of an alert expression's top-level comparisons and set operators (`and`,
/// `or`, `unless`), without number literals: `A > 0.05 and B > 1` gives `[A, B]`. Those are
/// the signals an alert watches; each must return data even when the alert does not fire.
fn signals(expr: &str) -> Vec<String> {
    let bytes = expr.as_bytes();
    let mut parts = Vec::new();
    let (mut depth, mut start, mut i) = (0i32, 0usize, 0usize);
    let mut in_str: Option<u8> = None;
    while i < bytes.len() {
        let c = bytes[i];
        if let Some(q) = in_str {
            if c == b'\\' {
                i += 1;
            } else if c == q {
                in_str = None;
            }
            i += 1;
            continue;
        }
        match c {
            b'"' | b'\'' | b'`' => in_str = Some(c),
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            _ if depth == 0 => {
                let rest = &expr[i..];
                let op_len = ["==", "!=", ">=", "<=", ">", "<"]
                    .iter()
                    .find(|op| rest.starts_with(**op))
                    .map(|op| op.len())
                    .or_else(|| {
                        ["and", "or", "unless"]
                            .iter()
                            .find(|w| {
                                rest.starts_with(**w)
                                    && i > 0
                                    && bytes[i - 1].is_ascii_whitespace()
                                    && rest
                                        .as_bytes()
                                        .get(w.len())
                                        .is_some_and(|b| b.is_ascii_whitespace())
                            })
                            .map(|w| w.len())
                    });
                if let Some(n) = op_len {
                    parts.push(expr[start..i].to_string());
                    i += n;
                    start = i;
                    continue;
                }
            }
            _ => {}
        }
        i += 1;
    }
    parts.push(expr[start..].to_string());
    parts
        .into_iter()
        .map(|p| {
            let p = p.trim();
            p.strip_prefix("bool ").unwrap_or(p).trim().to_string()
        })
        .filter(|p| !p.is_empty() && p.parse::<f64>().is_err())
        .collect()
}

#[test]
fn alert_signals_are_the_operands_of_comparisons() {
    assert_eq!(
        signals("sum by (page) (increase(x{a=~\"b|c\"}[10m])) > 0"),
        vec!["sum by (page) (increase(x{a=~\"b|c\"}[10m]))"]
    );
    assert_eq!(
        signals("(a / b) < (0.5 * c) and sum(rate(d[10m])) > 1"),
        vec!["(a / b)", "(0.5 * c)", "sum(rate(d[10m]))"]
    );
    assert_eq!(
        signals("(max by (instance) (r) or on (instance) (-1 * b)) == 0"),
        vec!["(max by (instance) (r) or on (instance) (-1 * b))"]
    );
    assert_eq!(signals("m > (time() - 900)"), vec!["m", "(time() - 900)"]);
}

/// GETs of distinct posts of `page`, all at once.
async fn flood(s: &Arc<Stack>, page: &str, posts: std::ops::RangeInclusive<u32>) -> Vec<Reply> {
    let mut set = JoinSet::new();
    for n in posts {
        let s = s.clone();
        let path = format!("/v21.0/{page}_{n}?fields=id&access_token={ADMIN_KEY}");
        set.spawn(async move { s.get(&path).await });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.expect("request task"));
    }
    out
}

/// The graphgate of the end-to-end test: Page 1001 has a small budget (queueing), Page 1002
/// runs into the simulated Graph's limit (throttled, paused for the whole test), Page tokens
/// are on (so a revoked one gives a 190), feeds expire after 1 s (stale, evictions), and GETs
/// over 600 bytes are rewritten.
const E2E_TOML: &str = r#"
[upstream]
max_get_url_bytes = 600
[credentials]
page_tokens = true
[cache]
stale_while_revalidate_s = 1
stale_if_error_s = 1
[[cache.rules]]
match = "/*/feed"
ttl_s = 1
[quota]
page_calls = 1000
page_window_s = 2
queue_timeout_ms = 3000
[[quota.pages]]
id = "1001"
page_calls = 6
[[quota.pages]]
id = "1002"
"#;

/// Drives every kind of traffic the dashboard and alerts watch.
async fn drive_traffic(s: &Arc<Stack>) {
    let get = |path: String| {
        let s = s.clone();
        async move { s.get(&path).await }
    };
    // Misses, then hits.
    let r = get(format!(
        "/v21.0/1001?fields=id,name&access_token={ADMIN_KEY}"
    ))
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    for _ in 0..5 {
        let r = get(format!(
            "/v21.0/1001?fields=id,name&access_token={ADMIN_KEY}"
        ))
        .await;
        assert_eq!(r.header("x-cache"), Some("HIT"));
    }
    // Coalescing: identical concurrent misses (the simulated Graph answers after 1 s here, so
    // they overlap however slowly they are sent).
    s.graph.set_latency(Duration::from_secs(1));
    let mut set = JoinSet::new();
    for _ in 0..8 {
        set.spawn(get(format!(
            "/v21.0/1001?fields=about&access_token={ADMIN_KEY}"
        )));
    }
    while let Some(r) = set.join_next().await {
        assert_eq!(r.unwrap().status, StatusCode::OK);
    }
    s.graph.set_latency(Duration::from_millis(50));
    // Queueing: more distinct misses on Page 1001 than its budget of 6 per 2 s allows at once.
    let replies = flood(s, "1001", 1..=8).await;
    assert!(replies.iter().any(|r| r.status == StatusCode::OK));
    // A feed that goes stale after 1 s (served stale, refreshed, then expired and evicted).
    // It is stale for only 1 s more: a slow machine that looks too late gets a miss and
    // tries again.
    let feed = format!("/v21.0/1001/feed?limit=2&access_token={ADMIN_KEY}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        get(feed.clone()).await;
        tokio::time::sleep(Duration::from_millis(1300)).await;
        let r = get(feed.clone()).await;
        match r.header("x-cache") {
            Some("STALE") => break,
            Some("MISS") if Instant::now() < deadline => continue,
            _ => panic!("the feed was not served stale: {:?}", r.headers),
        }
    }
    // A write (invalidation), a large GET (rewritten), a non-Page call (app usage), a
    // request without a key.
    let r = s
        .post_form(
            "/v21.0/1001/feed",
            &format!("message=hi&access_token={ADMIN_KEY}"),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let long_fields = vec!["id,name,about,category,fan_count"; 25].join(",");
    get(format!(
        "/v21.0/1001?fields={long_fields}&access_token={ADMIN_KEY}"
    ))
    .await;
    get(format!("/v21.0/me?fields=id&access_token={ADMIN_KEY}")).await;
    assert_eq!(
        get("/v21.0/1001".into()).await.status,
        StatusCode::UNAUTHORIZED
    );
    // A Page token Graph rejects (190): minted again, the call retried. (A field the long
    // read above did not ask for, so the read is not cut from its stored reply.)
    s.graph.revoke_token(&s.graph.page_token("1001"));
    let r = get(format!("/v21.0/1001?fields=link&access_token={ADMIN_KEY}")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // Page 1002: other apps use up its quota behind graphgate's back (all 10 calls per 2 s
    // on the simulated Graph, for the rest of the test), so graphgate's next calls are
    // throttled (80001) and the Page stays paused, each probe throttled again; what is left
    // waits out its 3 s queue deadline and gets 429.
    let r = get(format!("/v21.0/1002?fields=id&access_token={ADMIN_KEY}")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    s.graph.set_other_usage("1002", 10);
    let replies = flood(s, "1002", 11..=18).await;
    assert!(
        replies
            .iter()
            .any(|r| r.status == StatusCode::TOO_MANY_REQUESTS),
        "no 429 for the throttled Page"
    );
    // A caller that will not wait gets 429 at once.
    let r = s
        .request(
            Method::GET,
            &format!("/v21.0/1002_40?fields=id&access_token={ADMIN_KEY}"),
            &[("x-graphgate-max-wait-ms", "1")],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text());
    assert!(
        s.graph
            .stats()
            .throttled_by_page
            .get("1002")
            .copied()
            .unwrap_or(0)
            >= 1
    );
}

/// Polls `check` until it returns `Ok` or `deadline` passes; returns the last error.
async fn eventually<F, Fut>(deadline: Instant, mut check: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    loop {
        match check().await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

async fn non_empty(prom: &Prometheus, expr: &str) -> Result<(), String> {
    match query(prom, expr).await? {
        (_, r) if r.is_empty() => Err("empty result".into()),
        _ => Ok(()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_graphgate_and_every_dashboard_and_alert_query_returns_data() {
    let started = Instant::now();
    let graph = FakeGraphConfig {
        page_calls_limit: 10,
        page_window: Duration::from_secs(2),
        latency: Duration::from_millis(50),
        ..graph_config()
    };
    let s = Arc::new(Stack::start_with(graph, E2E_TOML).await);
    let target = s.gw.admin_url().trim_start_matches("http://").to_string();
    let prom = start_prometheus(&target);

    // Prometheus is up and has scraped graphgate once (the counters' starting zeros).
    let ready = eventually(Instant::now() + Duration::from_secs(20), || {
        non_empty(&prom, "up{job=\"graphgate\"} == 1")
    })
    .await;
    assert!(
        ready.is_ok(),
        "Prometheus never scraped graphgate: {ready:?}\n{}",
        prom.log()
    );

    drive_traffic(&s).await;

    // Every dashboard expression and every alert signal returns data.
    let dash: Value =
        serde_json::from_str(&read("deploy/grafana/dashboards/graphgate.json")).unwrap();
    let mut exprs: Vec<(String, String)> = dashboard_queries(&dash)
        .into_iter()
        .map(|(title, e)| (format!("panel {title:?}"), e))
        .collect();
    let rules = alert_rules();
    for r in &rules {
        let name = r["alert"].as_str().unwrap().to_string();
        let expr = r["expr"].as_str().unwrap().to_string();
        // Inbound TLS is off here, so there is no certificate expiry series; the metric is
        // checked in config_layers, the rule by promtool (alerts_test.yml).
        if name == "GraphgateTlsCertExpiringSoon" {
            continue;
        }
        for sig in signals(&expr) {
            exprs.push((format!("alert {name} signal"), sig));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut failures = Vec::new();
    for (what, expr) in &exprs {
        if let Err(e) = eventually(deadline, || non_empty(&prom, expr)).await {
            failures.push(format!("{what}: {expr}\n    -> {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} expressions returned no data:\n{}",
        failures.len(),
        exprs.len(),
        failures.join("\n")
    );

    eprintln!(
        "{} dashboard and alert expressions returned data",
        exprs.len()
    );

    // The traffic really reached Prometheus: each kind of event was counted (not just the
    // series pre-created at 0).
    for expr in [
        "sum(graphgate_cache_lookups_total{result=\"hit\"}) > 0",
        "sum(graphgate_cache_lookups_total{result=\"miss\"}) > 0",
        "sum(graphgate_cache_lookups_total{result=\"stale\"}) > 0",
        "sum(graphgate_cache_coalesced_total) > 0",
        "sum(graphgate_cache_invalidations_total{reason=\"write\"}) > 0",
        "sum(graphgate_quota_queue_wait_seconds_sum{outcome=\"admitted\"}) > 0",
        "sum(graphgate_quota_rejections_total) > 0",
        "sum(graphgate_quota_page_throttles_total{page=\"1002\"}) > 0",
        "sum(graphgate_upstream_requests_total{outcome=\"throttled\"}) > 0",
        "sum(graphgate_upstream_requests_total{outcome=\"auth_error\"}) > 0",
        "sum(graphgate_large_get_rewrites_total) > 0",
        "sum(graphgate_page_tokens_minted_total) > 0",
        "sum(graphgate_rejections_total{reason=\"unauthorized\"}) > 0",
        "max(max_over_time(graphgate_quota_page_usage_percent[5m])) > 0",
        "count(graphgate_quota_app_usage_percent) > 0",
    ] {
        let r = eventually(Instant::now() + Duration::from_secs(5), || {
            non_empty(&prom, expr)
        })
        .await;
        assert!(r.is_ok(), "{expr}: {r:?}");
    }

    // Every alert expression as written is valid PromQL for Prometheus.
    for r in &rules {
        let expr = r["expr"].as_str().unwrap();
        if let Err(e) = query(&prom, expr).await {
            panic!("alert {}: {e}", r["alert"]);
        }
    }

    // The throttling alerts' expressions return the throttled Page, and Prometheus' own rule
    // evaluation has them pending or firing for it; so is the token alert.
    let throttled = rules
        .iter()
        .find(|r| r["alert"] == "GraphgatePageThrottled")
        .unwrap()["expr"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, series) = query(&prom, &throttled).await.unwrap();
    assert!(
        series.iter().any(|s| s["metric"]["page"] == "1002"),
        "GraphgatePageThrottled does not return Page 1002: {series:?}"
    );
    // The Page is paused only until its probe comes back throttled again: callers keep
    // coming (each waits for the pause to end and is the next probe), so it stays paused
    // while the alerts are checked, however late that is.
    let keep_paused = {
        let s = s.clone();
        tokio::spawn(async move {
            for n in 0u32.. {
                s.get(&format!(
                    "/v21.0/1002_{}?fields=id&access_token={ADMIN_KEY}",
                    41 + n % 20
                ))
                .await;
            }
        })
    };
    let alerts_deadline = Instant::now() + Duration::from_secs(30);
    for (alert, page) in [
        ("GraphgatePageThrottled", Some("1002")),
        ("GraphgatePagePaused", Some("1002")),
        ("GraphgateTokenInvalid", None),
    ] {
        let found = eventually(alerts_deadline, || async {
            let (_, body) = try_get(&format!("{}/api/v1/alerts", prom.url))
                .await
                .ok_or("no answer")?;
            let v: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
            let hit = v["data"]["alerts"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|a| {
                    a["labels"]["alertname"] == alert
                        && page.is_none_or(|p| a["labels"]["page"] == p)
                        && (a["state"] == "firing" || a["state"] == "pending")
                });
            if hit {
                Ok(())
            } else {
                Err(format!("{alert} not active: {v}"))
            }
        })
        .await;
        assert!(found.is_ok(), "{found:?}");
    }
    keep_paused.abort();
    let _ = keep_paused.await;

    // Every rule evaluates without error.
    let (_, body) = try_get(&format!("{}/api/v1/rules", prom.url))
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    let evaluated: Vec<&Value> = v["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert_eq!(evaluated.len(), rules.len());
    for r in evaluated {
        assert_eq!(
            r["health"], "ok",
            "rule {} failed: {}",
            r["name"], r["lastError"]
        );
    }

    // Process metrics are exported under the graphgate_ prefix.
    let m = s.admin_get("/metrics").await.text();
    for family in [
        "graphgate_process_cpu_seconds_total",
        "graphgate_process_resident_memory_bytes",
        "graphgate_process_open_fds",
    ] {
        assert!(m.contains(family), "{family} missing");
    }
    drop(prom);
    if let Ok(s) = Arc::try_unwrap(s) {
        s.stop().await;
    }
    // A bound against a run that hangs, not a performance figure: generous for a loaded
    // machine.
    assert!(
        started.elapsed() < Duration::from_secs(180),
        "took {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// Structured logs from the real binary.

const BIN: &str = env!("CARGO_BIN_EXE_graphgate");

/// Kills the child (by its pid) on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_request_logs_carry_the_fields_and_no_secret_even_at_debug() {
    let graph = FakeGraph::start(graph_config(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let toml = gateway_toml(
        &graph.url(),
        "[credentials]\npage_tokens = true\n[log]\nformat = \"json\"\nlevel = \"debug\"\n",
    );
    let dir = temp_dir("jsonlog");
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
    let child = Killed(child);
    let find = |pred: &dyn Fn(&Value) -> bool| -> Option<Value> {
        lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| pred(v))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let listening = loop {
        if let Some(v) = find(&|v| v["fields"]["message"] == "graphgate listening") {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "no listening line: {:?}",
            lines.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let base = format!("http://{}", listening["fields"]["addr"].as_str().unwrap());
    let http = client();
    let secrets = vec![
        SYSTEM_TOKEN.to_string(),
        APP_SECRET.to_string(),
        ADMIN_KEY.to_string(),
        READER_KEY.to_string(),
        graph.page_token("1001"),
    ];
    let get = |path: &str, headers: &'static [(&'static str, &'static str)]| {
        let url = format!("{base}{path}");
        let http = http.clone();
        async move { send(&http, Method::GET, &url, headers, Bytes::new(), &[]).await }
    };
    let miss = get(
        &format!("/v21.0/1001?fields=id,name&access_token={ADMIN_KEY}"),
        &[],
    )
    .await;
    assert_eq!(miss.status, StatusCode::OK, "{}", miss.text());
    let hit = get(
        &format!("/v21.0/1001?fields=id,name&access_token={ADMIN_KEY}"),
        &[],
    )
    .await;
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    // The same bytes again on the same connection: recalled (`[cache] recall_hits`).
    let recalled = get(
        &format!("/v21.0/1001?fields=id,name&access_token={ADMIN_KEY}"),
        &[],
    )
    .await;
    assert_eq!(recalled.header("x-cache"), Some("HIT"));
    // The key in a header instead of the query; a revoked Page token (190, re-minted).
    graph.revoke_token(&graph.page_token("1001"));
    let revoked = get(
        "/v21.0/1001?fields=about",
        &[("authorization", "Bearer key-reader-1001")],
    )
    .await;
    assert_eq!(revoked.status, StatusCode::OK, "{}", revoked.text());
    let unknown = get("/v21.0/1001?access_token=not-a-key", &[]).await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    // Keys where the access line's path, request id and user agent come from.
    let key_in_path = get(
        &format!("/v21.0/{ADMIN_KEY}/feed?access_token={READER_KEY}"),
        &[("x-request-id", "rid-1"), ("user-agent", "sdk/1.0")],
    )
    .await;
    assert!(
        key_in_path.status.is_client_error(),
        "{}",
        key_in_path.text()
    );
    let secrets = [secrets, vec![graph.page_token("1001")]].concat();

    let trace_of = |r: &Reply| r.header("x-graphgate-trace-id").unwrap().to_string();
    let line_for = |trace: String| {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(v) = find(&|v| {
                v["fields"]["message"] == "request" && v["fields"]["trace_id"] == trace.as_str()
            }) {
                return v;
            }
            assert!(Instant::now() < deadline, "no request line for {trace}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let miss_line = line_for(trace_of(&miss));
    let f = &miss_line["fields"];
    assert_eq!(miss_line["level"], "INFO");
    for field in [
        "trace_id",
        "method",
        "route",
        "status",
        "cache",
        "page",
        "client",
        "upstream_ms",
        "queue_ms",
        "total_us",
        "fbtrace_id",
        "request_id",
        "path",
        "node",
        "bytes",
        "client_addr",
        "user_agent",
    ] {
        assert!(!f[field].is_null(), "field {field} missing: {miss_line}");
    }
    assert_eq!(f["method"], "GET");
    assert_eq!(f["route"], "node");
    assert_eq!(f["status"], 200);
    assert_eq!(f["cache"], "miss");
    assert_eq!(f["page"], "1001");
    assert_eq!(f["client"], "admin");
    assert!(f["upstream_ms"].as_i64().unwrap() >= 0, "{f}");
    assert!(f["queue_ms"].as_f64().unwrap() >= 0.0, "{f}");
    assert!(!f["fbtrace_id"].as_str().unwrap().is_empty(), "{f}");
    let hit_line = line_for(trace_of(&hit));
    assert_eq!(hit_line["fields"]["cache"], "hit");
    assert_eq!(hit_line["fields"]["page"], "1001");
    assert_eq!(hit_line["fields"]["upstream_ms"], -1);
    assert_eq!(hit_line["fields"]["queue_ms"], -1.0);
    let recalled_line = line_for(trace_of(&recalled));
    for (field, value) in [("cache", "hit"), ("page", "1001"), ("node", "1001")] {
        assert_eq!(recalled_line["fields"][field], value, "{recalled_line}");
    }
    let revoked_line = line_for(trace_of(&revoked));
    assert_eq!(revoked_line["fields"]["client"], "reader");
    assert_eq!(f["path"], "/v21.0/1001");
    assert_eq!(f["node"], "1001");
    assert_eq!(f["client_addr"], "127.0.0.1");
    assert_eq!(f["request_id"], miss_line["span"]["request_id"]);
    let key_line = line_for(trace_of(&key_in_path));
    assert_eq!(key_line["fields"]["path"], "/v21.0/-/feed");
    assert_eq!(key_line["fields"]["request_id"], "rid-1");
    assert_eq!(key_line["fields"]["user_agent"], "sdk/1.0");
    let unknown_line = line_for(trace_of(&unknown));
    assert_eq!(unknown_line["fields"]["status"], 401);
    assert_eq!(unknown_line["fields"]["client"], "-");
    // The 190 was logged (a warning naming the token kind, not the token).
    assert!(
        find(&|v| v["level"] == "WARN"
            && v.to_string().contains("190") | v.to_string().contains("token"))
        .is_some(),
        "no warning about the rejected token"
    );

    drop(child);
    std::thread::sleep(Duration::from_millis(100));
    let all = lines.lock().unwrap().clone();
    assert!(
        all.iter().any(|l| l.contains("\"level\":\"DEBUG\"")),
        "debug level is on"
    );
    for line in &all {
        assert!(
            serde_json::from_str::<Value>(line).is_ok(),
            "not a JSON line: {line}"
        );
        for s in &secrets {
            assert!(!line.contains(s.as_str()), "a secret is in the log: {line}");
        }
        assert!(
            !line.contains("not-a-key"),
            "a presented key is in the log: {line}"
        );
    }
    graph.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
