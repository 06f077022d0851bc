//! Running graphgate the way an SRE does, with the real binary: configuration from a file,
//! the environment and `--set` flags; `check-config` output; start-up failures and
//! warnings; log colours; the `healthcheck` subcommand; and inbound TLS certificates that
//! reload when their files change, with their expiry as a metric.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_graphgate");

/// The binary with none of the caller's GRAPHGATE_* variables (or RUST_LOG).
fn graphgate(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args).env_remove("RUST_LOG");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("GRAPHGATE_") {
            c.env_remove(k);
        }
    }
    c
}

fn text_of(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

const SECRETS: [&str; 4] = [
    "EAAB-layers-system-token",
    "layers-admin-token-secret",
    "layers-client-key-secret",
    "layers-file-client-key",
];

#[test]
fn check_config_prints_the_effective_configuration_as_toml_with_every_layer() {
    let dir = TempDir::new("check");
    let clients = dir.write(
        "clients.toml",
        &format!(
            "[[clients]]\nname = \"from-file\"\nkey = \"{}\"\npages = [\"*\"]\n",
            SECRETS[3]
        ),
    );
    let config = dir.write(
        "graphgate.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:1000\"\n[quota]\npage_calls = 10\n\
             [[clients]]\nname = \"reports\"\nkey = \"{}\"\npages = [\"1001\"]\n",
            SECRETS[2]
        ),
    );
    let out = graphgate(&[
        "check-config",
        "--config",
        &config,
        "--set",
        "quota.page_calls=30",
    ])
    .env("GRAPHGATE_SYSTEM_USER_TOKEN", SECRETS[0])
    .env("GRAPHGATE_SERVER__LISTEN", "127.0.0.1:2000")
    .env("GRAPHGATE_QUOTA__PAGE_CALLS", "20")
    .env("GRAPHGATE_SERVER__ADMIN_TOKEN", SECRETS[1])
    .env(
        "GRAPHGATE_CACHE__RULES",
        "[{ match = \"/*/feed\", ttl_s = 5 }]",
    )
    .env("GRAPHGATE_CLIENTS_FILE", &clients)
    .output()
    .unwrap();
    let text = text_of(&out);
    assert!(out.status.success(), "{text}");
    for s in SECRETS {
        assert!(!text.contains(s), "check-config printed a secret: {text}");
    }
    // stdout is a TOML document: the effective configuration.
    let doc: toml::Table = String::from_utf8_lossy(&out.stdout)
        .parse()
        .unwrap_or_else(|e| panic!("not TOML ({e}): {text}"));
    assert_eq!(doc["server"]["listen"].as_str(), Some("127.0.0.1:2000"));
    assert_eq!(doc["server"]["admin_token"].as_str(), Some("[redacted]"));
    assert_eq!(doc["quota"]["page_calls"].as_integer(), Some(30));
    assert_eq!(doc["cache"]["rules"][0]["ttl_s"].as_integer(), Some(5));
    assert_eq!(
        doc["credentials"]["system_user_token"].as_str(),
        Some("[redacted]")
    );
    let names: Vec<&str> = doc["clients"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["reports", "from-file"]);
    assert!(!text.contains("Config {"), "a Debug dump: {text}");
}

#[test]
fn bad_overrides_and_unknown_log_levels_stop_check_config_and_serve() {
    let dir = TempDir::new("bad");
    let ok = dir.write(
        "ok.toml",
        "[credentials]\nsystem_user_token = \"EAAB-x-token\"\n",
    );
    let verbose = dir.write(
        "verbose.toml",
        "[credentials]\nsystem_user_token = \"EAAB-x-token\"\n[log]\nlevel = \"verbose\"\n",
    );
    /// (config file, environment, what the error must name)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 4] = [
        (
            &ok,
            &[("GRAPHGATE_SERVER__LISTN", "x")],
            "GRAPHGATE_SERVER__LISTN",
        ),
        (
            &ok,
            &[("GRAPHGATE_SERVR__LISTEN", "x")],
            "GRAPHGATE_SERVR__LISTEN",
        ),
        (
            &ok,
            &[("GRAPHGATE_QUOTA__PAGE_CALLS", "many")],
            "GRAPHGATE_QUOTA__PAGE_CALLS",
        ),
        (&verbose, &[], "log.level"),
    ];
    for (config, env, named) in cases {
        for command in ["check-config", "serve"] {
            let mut c = graphgate(&[
                command,
                "--config",
                config,
                "--set",
                "server.listen=127.0.0.1:0",
            ]);
            c.args(["--set", "server.admin_listen=127.0.0.1:0"]);
            for (k, v) in env {
                c.env(k, v);
            }
            let out = c.stdin(Stdio::null()).output().unwrap();
            let text = text_of(&out);
            assert!(!out.status.success(), "{command} {env:?} accepted: {text}");
            assert!(text.contains(named), "{command}: {named} not named: {text}");
        }
    }
    // The same level from the environment, and a flag naming an unknown key.
    let out = graphgate(&["check-config", "--config", &ok])
        .env("GRAPHGATE_LOG__LEVEL", "verbose")
        .output()
        .unwrap();
    assert!(!out.status.success() && text_of(&out).contains("log.level"));
    let out = graphgate(&["check-config", "--config", &ok, "--set", "server.lisen=1"])
        .output()
        .unwrap();
    assert!(
        text_of(&out).contains("--set server.lisen"),
        "{}",
        text_of(&out)
    );
}

#[test]
fn a_port_clash_names_the_address_and_the_key() {
    let dir = TempDir::new("clash");
    let config = dir.write(
        "c.toml",
        "[credentials]\nsystem_user_token = \"EAAB-x-token\"\n",
    );
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for (key, other) in [
        ("server.listen", "server.admin_listen"),
        ("server.admin_listen", "server.listen"),
    ] {
        let out = graphgate(&["serve", "--config", &config])
            .args(["--set", &format!("{key}={addr}")])
            .args(["--set", &format!("{other}=127.0.0.1:0")])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains(&addr) && err.contains(key), "{key}: {err}");
    }
}

/// A `graphgate serve` whose output lines are collected; killed on drop.
struct Serve {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serve {
    fn start(mut cmd: Command) -> Serve {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let streams: [Box<dyn std::io::Read + Send>; 2] = [
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        for stream in streams {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        Serve { child, lines }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The `graphgate listening` line (text format), waiting up to 20 s.
    fn listening(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(l) = self
                .lines()
                .into_iter()
                .find(|l| l.contains("graphgate listening"))
            {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "not listening: {:?}",
                self.lines()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The value of `name=` in a text log line.
fn field(line: &str, name: &str) -> String {
    let at = line
        .find(&format!("{name}="))
        .unwrap_or_else(|| panic!("{name} in {line}"));
    line[at + name.len() + 1..]
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn serve_warns_without_clients_or_admin_token_and_text_logs_carry_no_colour() {
    let dir = TempDir::new("warn");
    let bare = dir.write(
        "bare.toml",
        "[credentials]\nsystem_user_token = \"EAAB-x-token\"\n",
    );
    let mut cmd = graphgate(&["serve", "--config", &bare]);
    cmd.env("GRAPHGATE_SERVER__LISTEN", "127.0.0.1:0")
        .env("GRAPHGATE_SERVER__ADMIN_LISTEN", "127.0.0.1:0");
    let s = Serve::start(cmd);
    s.listening();
    let lines = s.lines();
    let warned = |what: &str| lines.iter().any(|l| l.contains("WARN") && l.contains(what));
    assert!(warned("[[clients]]"), "{lines:?}");
    assert!(warned("admin_token"), "{lines:?}");
    // stdout is a pipe here, so no escape sequences, in any line.
    assert!(lines.iter().all(|l| !l.contains('\u{1b}')), "{lines:?}");
    drop(s);

    let full = dir.write(
        "full.toml",
        "[server]\nadmin_token = \"layers-admin-token-secret\"\n\
         [credentials]\nsystem_user_token = \"EAAB-x-token\"\n\
         [[clients]]\nname = \"a\"\nkey = \"layers-client-key-secret\"\npages = [\"*\"]\n",
    );
    let mut cmd = graphgate(&["serve", "--config", &full]);
    cmd.args([
        "--set",
        "server.listen=127.0.0.1:0",
        "--set",
        "server.admin_listen=127.0.0.1:0",
    ]);
    let s = Serve::start(cmd);
    s.listening();
    let lines = s.lines();
    assert!(!lines.iter().any(|l| l.contains("WARN")), "{lines:?}");
}

#[test]
fn healthcheck_follows_readiness_of_the_admin_listener() {
    let dir = TempDir::new("health");
    let config = dir.write(
        "c.toml",
        "[credentials]\nsystem_user_token = \"EAAB-x-token\"\n",
    );
    let mut cmd = graphgate(&["serve", "--config", &config]);
    cmd.args([
        "--set",
        "server.listen=127.0.0.1:0",
        "--set",
        "server.admin_listen=127.0.0.1:0",
    ]);
    let s = Serve::start(cmd);
    let admin = field(&s.listening(), "admin_addr");
    let port = admin.rsplit(':').next().unwrap().to_string();
    let check = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = graphgate(&["healthcheck"]);
        c.args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let out = check(&["--url", &format!("http://{admin}/readyz")], &[]);
    assert!(out.status.success(), "{}", text_of(&out));
    // From the configuration, as in the container: 0.0.0.0 is checked through loopback, and
    // the tokens need not be there.
    let empty = dir.write("empty.toml", "");
    let out = check(
        &["--config", &empty],
        &[("GRAPHGATE_SERVER__ADMIN_LISTEN", &format!("0.0.0.0:{port}"))],
    );
    assert!(out.status.success(), "{}", text_of(&out));
    assert!(text_of(&out).contains("/readyz"), "{}", text_of(&out));
    // Not ready: an endpoint that is not /readyz answers 404, and a closed port.
    let out = check(&["--url", &format!("http://{admin}/nothing")], &[]);
    assert!(!out.status.success());
    drop(s);
    let out = check(&["--url", &format!("http://{admin}/readyz")], &[]);
    assert!(!out.status.success(), "{}", text_of(&out));
}

// -------------------------------------------------------------------------------------------
// Inbound TLS: reload on file change, expiry metric.

struct Pki {
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "layers test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        Pki {
            ca: rcgen::CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    /// A server certificate for localhost valid until the start of `year`; (cert, key) PEM.
    fn server_cert(&self, year: i32) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.not_after = rcgen::date_time_ymd(year, 1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Unix time of 1 January of `year` 00:00 UTC.
fn new_year(year: i64) -> f64 {
    // Days from 1970 to `year`, leap years included (valid 1901..2099).
    let days = (year - 1970) * 365 + (year - 1969) / 4;
    (days * 86_400) as f64
}

fn tls_client(ca_pem: &str) -> https::Client {
    https::Client::new(ca_pem)
}

/// A minimal HTTPS GET client on hyper-rustls trusting one CA.
mod https {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use std::sync::Arc;

    pub struct Client(
        hyper_util::client::legacy::Client<
            hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
            Full<Bytes>,
        >,
    );

    impl Client {
        pub fn new(ca_pem: &str) -> Client {
            use rustls::pki_types::pem::PemObject;
            use rustls::pki_types::CertificateDer;
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
                roots.add(c.unwrap()).unwrap();
            }
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(config)
                .https_only()
                .enable_http1()
                .build();
            Client(
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .pool_max_idle_per_host(0)
                    .build(https),
            )
        }

        /// The status, or the error (a handshake refused because the CA is not trusted).
        pub async fn get(&self, url: &str) -> Result<u16, String> {
            let req = http::Request::get(url)
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp =
                tokio::time::timeout(std::time::Duration::from_secs(10), self.0.request(req))
                    .await
                    .map_err(|_| "timeout".to_string())?
                    .map_err(|e| format!("{e:?}"))?;
            let status = resp.status().as_u16();
            let _ = resp.into_body().collect().await;
            Ok(status)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_certificates_reload_when_their_files_change_and_their_expiry_is_a_metric() {
    // Without TLS there is no expiry series (an absent certificate must not look expired).
    let plain = Stack::start().await;
    let m = plain.admin_get("/metrics").await.text();
    assert!(
        !m.contains("graphgate_tls_cert_expiry_timestamp_seconds{"),
        "{m}"
    );
    plain.stop().await;

    let (old_ca, new_ca) = (Pki::new(), Pki::new());
    let dir = TempDir::new("tls");
    let (cert, key) = old_ca.server_cert(2040);
    let cert_file = dir.write("tls.crt", &cert);
    let key_file = dir.write("tls.key", &key);
    let extra =
        format!("[server]\ntls_cert_file = \"{cert_file}\"\ntls_key_file = \"{key_file}\"\n");
    let s = Stack::start_with(graph_config(), &extra).await;
    let expiry = || async {
        metric_value(
            &s.admin_get("/metrics").await.text(),
            "graphgate_tls_cert_expiry_timestamp_seconds",
            &["listener=\"public\""],
        )
    };
    assert_eq!(expiry().await, new_year(2040));
    let url = format!(
        "https://localhost:{}/v21.0/1001?fields=id&access_token={ADMIN_KEY}",
        s.gw.addr.port()
    );
    assert_eq!(tls_client(&old_ca.ca.pem()).get(&url).await, Ok(200));
    assert!(tls_client(&new_ca.ca.pem()).get(&url).await.is_err());

    // A half-written pair (new certificate, key not yet replaced) keeps the old one in use.
    let (cert, key) = new_ca.server_cert(2041);
    dir.write("tls.crt", &cert);
    tokio::time::sleep(graphgate::tls::FILE_CHECK_INTERVAL * 2).await;
    assert_eq!(tls_client(&old_ca.ca.pem()).get(&url).await, Ok(200));
    assert_eq!(expiry().await, new_year(2040));
    // The key arrives: the new certificate is served without a SIGHUP.
    dir.write("tls.key", &key);
    let deadline = Instant::now() + graphgate::tls::FILE_CHECK_INTERVAL * 5;
    while expiry().await != new_year(2041) {
        assert!(Instant::now() < deadline, "certificate files not reloaded");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(tls_client(&new_ca.ca.pem()).get(&url).await, Ok(200));
    assert!(tls_client(&old_ca.ca.pem()).get(&url).await.is_err());
    s.stop().await;
}

#[tokio::test]
async fn redis_metrics_say_not_configured_rather_than_down() {
    let s = Stack::start().await;
    let m = s.admin_get("/metrics").await.text();
    assert!(!m.contains("\ngraphgate_redis_up "), "{m}");
    assert_eq!(metric_value(&m, "graphgate_redis_configured", &[]), 0.0);
    s.stop().await;
}
