//! Production Redis set-ups, end to end: Redis over TLS with a client certificate, a
//! three-primary Redis Cluster and a primary with a replica under Sentinel (with a forced
//! failover in the middle of traffic). Each test starts its own servers on free loopback
//! ports in a temporary directory, and kills them (by pid, when its guards drop). Each shows
//! the same three things across two graphgate replicas: shared hits, one shared Page budget
//! (nothing throttled at Graph's true limit) and invalidation.

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fake_graph::FakeGraphConfig;
use http::{Method, StatusCode};
use tokio::task::JoinSet;

use crate::redis::{wait_until_redis_up, Fleet};
use crate::support::*;

/// A directory for one test's servers; removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "graphgate-{tag}-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Scratch(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("write file");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A server process this test started; killed (SIGKILL, by its pid) when dropped.
struct Proc(Option<Child>);

impl Proc {
    fn spawn(program: &str, args: &[String]) -> Proc {
        let child = Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{program} must be installed (scripts/test installs it): {e}")
            });
        Proc(Some(child))
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn bindable(port: u16) -> bool {
    StdListener::bind(("127.0.0.1", port)).is_ok()
}

/// A free port whose cluster bus port (port + 10000) is free too.
fn free_cluster_port(taken: &[u16]) -> u16 {
    loop {
        let p = fastrand::u16(20_000..50_000);
        if !taken.contains(&p) && bindable(p) && bindable(p + 10_000) {
            return p;
        }
    }
}

fn wait_for_port(port: u16, what: &str) {
    let until = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < until, "{what} did not start on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `redis-cli -p PORT args…`, its standard output.
fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli is installed with redis-server");
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn base_args(port: u16, dir: &Path) -> Vec<String> {
    [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        &dir.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Budget settings every fleet here runs with: Page budgets of 10 calls per 2 s, which the
/// flood in [`shares_hits_budgets_and_invalidations`] exceeds threefold.
const LIMIT: u32 = 10;
const QUOTA: &str = "[quota]\npage_calls = 10\npage_window_s = 2\nqueue_timeout_ms = 6000\n";

fn graph_cfg() -> FakeGraphConfig {
    FakeGraphConfig {
        // A little above page_calls: the replicas must keep to one budget between them.
        page_calls_limit: LIMIT + 2,
        page_window: Duration::from_secs(2),
        ..graph_config()
    }
}

/// The three things a fleet shares through Redis, whatever its topology: a flood through
/// both replicas keeps to one Page budget (Graph throttles nothing), a read through one is a
/// hit on the other, and a write through one is seen by the other.
async fn shares_hits_budgets_and_invalidations(f: &Arc<Fleet>, page: &str, node: &str) {
    let started = Instant::now();
    let mut set = JoinSet::new();
    for n in 1..=30u32 {
        let f = f.clone();
        let path = format!("/v21.0/{page}_{n}?fields=id");
        set.spawn(async move {
            let via = if n % 2 == 0 { &f.a } else { &f.b };
            f.get(via, &path).await
        });
    }
    let mut ok = 0;
    while let Some(r) = set.join_next().await {
        let r = r.expect("request task");
        match r.status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => assert_eq!(r.error_code(), 80001),
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    let took = started.elapsed();
    let stats = f.graph.stats();
    assert_eq!(stats.throttled, 0, "no call over the limit: {stats:?}");
    assert!(ok >= LIMIT, "only {ok} of 30 went through");
    let dispatched =
        |m: &str| metric_value(m, "graphgate_quota_dispatches_total", &["bucket=\"page\""]);
    let (ma, mb) = (f.metrics(&f.a).await, f.metrics(&f.b).await);
    let (da, db) = (dispatched(&ma), dispatched(&mb));
    assert!(da > 0.0 && db > 0.0, "both replicas dispatched: {da} {db}");
    let budget = f64::from(LIMIT) * (took.as_secs_f64() / 2.0 + 1.0);
    assert!(da + db <= budget, "{da} + {db} in {took:?} exceed {budget}");
    for m in [&ma, &mb] {
        assert!(
            metric_value(
                m,
                "graphgate_quota_admission_decisions_total",
                &["source=\"redis\""]
            ) > 0.0,
            "budgets were decided in Redis"
        );
    }

    // A shared hit.
    let path = format!("/{node}?fields=id,name,about");
    let first = f.get(&f.a, &path).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    assert_eq!(first.header("x-cache"), Some("MISS"));
    let second = f.get(&f.b, &path).await;
    assert_eq!(
        second.header("x-cache"),
        Some("HIT"),
        "{:?}",
        second.headers
    );
    let cs = second.header("cache-status").unwrap_or_default();
    assert!(cs.contains("detail=l2"), "{cs}");
    assert_eq!(second.body, first.body);

    // B now holds it in L1; a write through A reaches it.
    assert_eq!(f.get(&f.b, &path).await.header("x-cache"), Some("HIT"));
    let about = format!("edited {}", fastrand::u32(..));
    let w = f
        .post(
            &f.a,
            &format!("/{node}"),
            &format!("about={}", about.replace(' ', "+")),
        )
        .await;
    assert_eq!(w.status, StatusCode::OK, "{}", w.text());
    let until = Instant::now() + Duration::from_secs(5);
    let mut seen = false;
    while !seen && Instant::now() < until {
        seen = f.get(&f.b, &path).await.json()["about"] == about.as_str();
        if !seen {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!(seen, "B did not see A's write");
    for via in [&f.a, &f.b] {
        let m = f.metrics(via).await;
        assert_eq!(
            metric_value(&m, "graphgate_requests_total", &["status_class=\"5xx\""]),
            0.0
        );
    }
}

async fn stop(f: Arc<Fleet>) {
    if let Ok(f) = Arc::try_unwrap(f) {
        f.stop().await;
    }
}

/// A test CA, a server certificate for 127.0.0.1 and a client certificate, as files.
struct Pki {
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
}

fn pki(dir: &Scratch) -> Pki {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "graphgate redis test CA");
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca =
        rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
    let issue = |cn: &str, client: bool| {
        let mut p = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca).unwrap();
        (
            dir.write(&format!("{cn}.crt"), &cert.pem()),
            dir.write(&format!("{cn}.key"), &key.serialize_pem()),
        )
    };
    Pki {
        server: issue("redis", false),
        client: issue("graphgate", true),
        ca: dir.write("ca.crt", &ca.pem()),
    }
}

/// Redis with TLS only (no plain port), requiring a client certificate from the test CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_with_a_client_certificate_two_replicas_share_hits_budgets_and_invalidations() {
    let dir = Scratch::new("redis-tls");
    let certs = pki(&dir);
    let port = free_port();
    let mut args = base_args(0, &dir.0);
    args.extend(
        [
            "--tls-port".to_string(),
            port.to_string(),
            "--tls-cert-file".into(),
            certs.server.0.display().to_string(),
            "--tls-key-file".into(),
            certs.server.1.display().to_string(),
            "--tls-ca-cert-file".into(),
            certs.ca.display().to_string(),
            "--tls-auth-clients".into(),
            "yes".into(),
        ]
        .into_iter(),
    );
    let _redis = Proc::spawn("redis-server", &args);
    wait_for_port(port, "redis-server --tls-port");
    let section = format!(
        "[redis]\nurl = \"rediss://127.0.0.1:{port}\"\nca_file = \"{}\"\ncert_file = \"{}\"\n\
         key_file = \"{}\"\ntimeout_ms = 500\nkey_prefix = \"tls:\"\n{QUOTA}",
        certs.ca.display(),
        certs.client.0.display(),
        certs.client.1.display(),
    );
    let f = Arc::new(Fleet::start_with(&section, graph_cfg()).await);
    assert!(wait_until_redis_up(&f, &f.a, Duration::from_secs(15)).await);
    assert!(wait_until_redis_up(&f, &f.b, Duration::from_secs(15)).await);
    shares_hits_budgets_and_invalidations(&f, "1001", "1002").await;
    stop(f).await;

    // A replica trusting another CA refuses the server's certificate: it never shares, and
    // still serves on its own.
    let other_dir = Scratch::new("redis-tls-other");
    let other = pki(&other_dir);
    let section = section.replace(
        &format!("ca_file = \"{}\"", certs.ca.display()),
        &format!("ca_file = \"{}\"", other.ca.display()),
    );
    let f = Arc::new(Fleet::start_with(&section, graph_cfg()).await);
    assert!(!wait_until_redis_up(&f, &f.a, Duration::from_secs(2)).await);
    let r = f.get(&f.a, "/1002?fields=id").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    stop(f).await;
}

/// Three primaries, no replicas, every slot assigned.
struct Cluster {
    ports: Vec<u16>,
    _nodes: Vec<Proc>,
    _dir: Scratch,
}

fn start_cluster() -> Cluster {
    let dir = Scratch::new("redis-cluster");
    let mut ports = Vec::new();
    for _ in 0..3 {
        ports.push(free_cluster_port(&ports));
    }
    let mut nodes = Vec::new();
    for &p in &ports {
        let mut args = base_args(p, &dir.0);
        args.extend([
            "--cluster-enabled".to_string(),
            "yes".into(),
            "--cluster-config-file".into(),
            dir.0.join(format!("nodes-{p}.conf")).display().to_string(),
            "--cluster-node-timeout".into(),
            "5000".into(),
        ]);
        nodes.push(Proc::spawn("redis-server", &args));
    }
    for &p in &ports {
        wait_for_port(p, "redis-server --cluster-enabled");
    }
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let out = Command::new("redis-cli")
        .arg("--cluster")
        .arg("create")
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("redis-cli --cluster (package redis-tools) is installed");
    assert!(
        out.status.success(),
        "cluster create: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let until = Instant::now() + Duration::from_secs(60);
    while !ports
        .iter()
        .all(|&p| cli(p, &["CLUSTER", "INFO"]).contains("cluster_state:ok"))
    {
        assert!(Instant::now() < until, "the cluster never became ok");
        std::thread::sleep(Duration::from_millis(100));
    }
    Cluster {
        ports,
        _nodes: nodes,
        _dir: dir,
    }
}

/// A three-primary Redis Cluster: keys spread over the primaries, every script stays in one
/// slot, and invalidations published on one node reach subscribers on the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_two_replicas_share_hits_budgets_and_invalidations() {
    let cluster = start_cluster();
    let nodes: Vec<String> = cluster
        .ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let section = format!(
        "[redis]\nurl = \"redis+cluster://{}\"\ntimeout_ms = 500\nkey_prefix = \"cl:\"\n{QUOTA}",
        nodes.join(",")
    );
    let f = Arc::new(Fleet::start_with(&section, graph_cfg()).await);
    assert!(wait_until_redis_up(&f, &f.a, Duration::from_secs(20)).await);
    assert!(wait_until_redis_up(&f, &f.b, Duration::from_secs(20)).await);
    shares_hits_budgets_and_invalidations(&f, "1001", "1002").await;
    // The same with the nodes given as a list, on another Page and node.
    let holding: Vec<u64> = cluster
        .ports
        .iter()
        .map(|&p| cli(p, &["DBSIZE"]).trim().parse().unwrap_or(0))
        .collect();
    assert!(
        holding.iter().filter(|n| **n > 0).count() >= 2,
        "keys spread over the primaries: {holding:?}"
    );
    for via in [&f.a, &f.b] {
        let m = f.metrics(via).await;
        assert_eq!(
            metric_value(&m, "graphgate_redis_errors_total", &[]),
            0.0,
            "no Redis command failed (CROSSSLOT, MOVED, …)"
        );
    }
    // An admin purge of everything on A empties every primary (and B's own tier): B's next
    // read goes to Graph rather than finding the entry in Redis.
    let path = "/1002?fields=name";
    f.get(&f.a, path).await;
    assert_eq!(f.get(&f.b, path).await.header("x-cache"), Some("HIT"));
    let url = format!("{}/admin/cache/purge?all=true", f.a.admin_url());
    let auth = [("authorization", "Bearer test-admin-token")];
    let r = send(&f.http, Method::POST, &url, &auth, Bytes::new(), &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let until = Instant::now() + Duration::from_secs(5);
    let mut purged = false;
    while !purged && Instant::now() < until {
        purged = f.get(&f.b, path).await.header("x-cache") == Some("MISS");
        if !purged {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!(purged, "an entry survived the purge: {}", r.text());
    let left: u64 = cluster
        .ports
        .iter()
        .map(|&p| {
            cli(p, &["--scan", "--pattern", "cl:{n:*}:c:*"])
                .lines()
                .count() as u64
        })
        .sum();
    assert!(
        left <= 1,
        "entries left in the cluster after a purge: {left}"
    );
    stop(f).await;

    let list = format!(
        "[redis]\ncluster_nodes = [{}]\ntimeout_ms = 500\nkey_prefix = \"cl2:\"\n{QUOTA}",
        nodes
            .iter()
            .map(|n| format!("\"{n}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let f = Arc::new(Fleet::start_with(&list, graph_cfg()).await);
    assert!(wait_until_redis_up(&f, &f.a, Duration::from_secs(20)).await);
    assert!(wait_until_redis_up(&f, &f.b, Duration::from_secs(20)).await);
    let path = "/1001?fields=id,fan_count";
    assert_eq!(f.get(&f.a, path).await.header("x-cache"), Some("MISS"));
    assert_eq!(f.get(&f.b, path).await.header("x-cache"), Some("HIT"));
    stop(f).await;
}

/// A primary, its replica and one Sentinel (quorum 1) watching them.
struct Sentinel {
    primary: u16,
    replica: u16,
    sentinel: u16,
    _procs: Vec<Proc>,
    _dir: Scratch,
}

fn start_sentinel() -> Sentinel {
    let dir = Scratch::new("redis-sentinel");
    let (primary, replica, sentinel) = (free_port(), free_port(), free_port());
    let mut procs = vec![Proc::spawn("redis-server", &base_args(primary, &dir.0))];
    wait_for_port(primary, "redis primary");
    let mut args = base_args(replica, &dir.0);
    args.extend([
        "--replicaof".to_string(),
        "127.0.0.1".into(),
        primary.to_string(),
        "--dbfilename".into(),
        "replica.rdb".into(),
    ]);
    procs.push(Proc::spawn("redis-server", &args));
    wait_for_port(replica, "redis replica");
    let conf = dir.write(
        "sentinel.conf",
        &format!(
            "port {sentinel}\nbind 127.0.0.1\ndir {}\n\
             sentinel monitor mymaster 127.0.0.1 {primary} 1\n\
             sentinel down-after-milliseconds mymaster 3000\n\
             sentinel failover-timeout mymaster 10000\n\
             sentinel parallel-syncs mymaster 1\n",
            dir.0.display()
        ),
    );
    // `redis-server --sentinel` is what the redis-sentinel command runs.
    procs.push(Proc::spawn(
        "redis-server",
        &[conf.display().to_string(), "--sentinel".to_string()],
    ));
    wait_for_port(sentinel, "redis sentinel");
    // Wait until the replica is in sync and the Sentinel knows it: a failover needs both.
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let info = cli(replica, &["INFO", "replication"]);
        let known = cli(sentinel, &["SENTINEL", "REPLICAS", "mymaster"]);
        if info.contains("master_link_status:up") && known.contains(&replica.to_string()) {
            break;
        }
        assert!(
            Instant::now() < until,
            "replica or sentinel never ready: {known}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    Sentinel {
        primary,
        replica,
        sentinel,
        _procs: procs,
        _dir: dir,
    }
}

/// Sentinel: a forced failover in the middle of traffic costs no request (replicas serve
/// from their own tier while no primary answers) and sharing resumes on the new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_sentinel_a_failover_mid_traffic_loses_no_request_and_sharing_resumes() {
    let s = start_sentinel();
    let section = format!(
        "[redis]\nurl = \"redis+sentinel://127.0.0.1:{}/mymaster\"\ntimeout_ms = 500\n\
         key_prefix = \"se:\"\n{QUOTA}",
        s.sentinel
    );
    let f = Arc::new(Fleet::start_with(&section, graph_cfg()).await);
    assert!(wait_until_redis_up(&f, &f.a, Duration::from_secs(20)).await);
    assert!(wait_until_redis_up(&f, &f.b, Duration::from_secs(20)).await);
    // Warm a few reads through both replicas, within the Page budget.
    let paths: Vec<String> = (1..=4)
        .map(|n| format!("/1002_{n}?fields=id,message"))
        .collect();
    for p in &paths {
        assert_eq!(f.get(&f.a, p).await.status, StatusCode::OK);
        assert_eq!(f.get(&f.b, p).await.status, StatusCode::OK);
    }
    let mut set = JoinSet::new();
    for i in 0..200u32 {
        let f = f.clone();
        let path = paths[i as usize % paths.len()].clone();
        set.spawn(async move {
            // Spread over ~4 s: the failover happens in the middle.
            tokio::time::sleep(Duration::from_millis(u64::from(i) * 20)).await;
            let via = if i % 2 == 0 { &f.a } else { &f.b };
            f.get(via, &path).await
        });
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let r = cli(s.sentinel, &["SENTINEL", "FAILOVER", "mymaster"]);
        if r.trim() == "OK" {
            break;
        }
        assert!(Instant::now() < until, "SENTINEL FAILOVER refused: {r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut answered = 0;
    while let Some(r) = set.join_next().await {
        let r = r.expect("request task");
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        answered += 1;
    }
    assert_eq!(answered, 200, "every read was answered");
    // The replica is the primary now.
    let until = Instant::now() + Duration::from_secs(60);
    while !cli(
        s.sentinel,
        &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"],
    )
    .contains(&s.replica.to_string())
    {
        assert!(Instant::now() < until, "the failover never completed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let until = Instant::now() + Duration::from_secs(60);
    while !cli(s.replica, &["ROLE"]).starts_with("master") {
        assert!(
            Instant::now() < until,
            "the new primary never took the role"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Each replica finds the new primary (a write to the old one fails READONLY, or its
    // connections were closed by the Sentinel); wait until both share through it.
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let node = format!("/1001?fields=id,fan_count&probe={}", fastrand::u32(..));
        let a = f.get(&f.a, &node).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        let b = f.get(&f.b, &node).await;
        if b.header("cache-status")
            .is_some_and(|c| c.contains("detail=l2"))
            && cli(s.replica, &["DBSIZE"]).trim() != "0"
        {
            break;
        }
        assert!(
            Instant::now() < until,
            "sharing never resumed after the failover"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    shares_hits_budgets_and_invalidations(&f, "1001", "1002").await;
    assert_ne!(s.primary, s.replica);
    stop(f).await;
}
