//! The `graphgate` command: serve, check-config, healthcheck; with the `demo` feature (the
//! default; the container image is built without it) also demo and fake-graph.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use graphgate::config::env::Layers;
use graphgate::config::{effective, Config, LogConfig, LogFormat};
use graphgate::server;

#[derive(Parser)]
#[command(
    name = "graphgate",
    version,
    about = "A caching, quota-aware gateway in front of Meta's Graph API"
)]
struct Cli {
    /// Configuration file (else $GRAPHGATE_CONFIG, else config/graphgate.toml, else defaults).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Sets a configuration key over the file and the environment (repeatable), e.g.
    /// `--set server.listen=0.0.0.0:8080`. Environment: GRAPHGATE_<SECTION>__<KEY>=VALUE.
    #[arg(long = "set", global = true, value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Run the simulated Graph API and graphgate in front of it, and print curl lines to try.
    #[cfg(feature = "demo")]
    Demo {
        /// Address for graphgate.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Address for the admin listener (/metrics, /healthz).
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_listen: SocketAddr,
        /// Address for the simulated Graph API (port 0 = any free port).
        #[arg(long, default_value = "127.0.0.1:0")]
        graph_listen: SocketAddr,
    },
    /// Validate the configuration (file, environment, --set) and print the effective
    /// configuration as TOML, secrets redacted.
    CheckConfig,
    /// Exit 0 if the admin listener's /readyz answers 200 (for container health checks;
    /// the address comes from the configuration unless --url is given).
    Healthcheck {
        /// URL to check instead, e.g. http://127.0.0.1:9090/readyz.
        #[arg(long)]
        url: Option<String>,
    },
    /// Run only the simulated Graph API.
    #[cfg(feature = "demo")]
    FakeGraph {
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        /// Added latency per reply, in milliseconds.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Calls per Page per window before code 80001.
        #[arg(long)]
        page_calls: Option<u32>,
        /// Length of the Page rate window, in seconds.
        #[arg(long)]
        page_window_s: Option<u64>,
        /// Serve TLS (HTTP/2 and HTTP/1.1 by ALPN) with this PEM certificate chain...
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<std::path::PathBuf>,
        /// ...and this PEM private key.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<std::path::PathBuf>,
    },
}

fn env(key: &str) -> Option<String> {
    std::env::var(key).ok()
}

/// Finds the configuration: --config, $GRAPHGATE_CONFIG, config/graphgate.toml, defaults;
/// then the GRAPHGATE_<SECTION>__<KEY> variables and the `--set` flags on top of it.
fn load_config(explicit: Option<&Path>, flags: &[String]) -> Result<Config, String> {
    let path = explicit
        .map(Path::to_path_buf)
        .or_else(|| env("GRAPHGATE_CONFIG").map(PathBuf::from))
        .or_else(|| {
            let p = PathBuf::from("config/graphgate.toml");
            p.exists().then_some(p)
        });
    let layers = Layers::from_process_env(flags).map_err(|e| e.to_string())?;
    match path {
        Some(p) => {
            let text = std::fs::read_to_string(&p)
                .map_err(|e| format!("cannot read {}: {e}", p.display()))?;
            Config::from_layers(&text, &layers, env).map_err(|e| format!("{}: {e}", p.display()))
        }
        None => Config::from_layers("", &layers, env).map_err(|e| e.to_string()),
    }
}

/// `server.admin_listen` from the file and the layers on top, without requiring the rest of
/// the configuration (the tokens) to be present: a health check runs beside the server, not
/// necessarily with its whole environment.
fn admin_listen(explicit: Option<&Path>, flags: &[String]) -> Result<SocketAddr, String> {
    let path = explicit
        .map(Path::to_path_buf)
        .or_else(|| env("GRAPHGATE_CONFIG").map(PathBuf::from))
        .or_else(|| {
            let p = PathBuf::from("config/graphgate.toml");
            p.exists().then_some(p)
        });
    let text = match &path {
        Some(p) => {
            std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?
        }
        None => String::new(),
    };
    let layers = Layers::from_process_env(flags).map_err(|e| e.to_string())?;
    let value = graphgate::config::env::layered_value(&text, &layers, "server.admin_listen")
        .map_err(|e| e.to_string())?;
    let addr = value
        .as_ref()
        .and_then(toml::Value::as_str)
        .unwrap_or(graphgate::config::DEFAULT_ADMIN_LISTEN);
    addr.parse()
        .map_err(|e| format!("server.admin_listen `{addr}`: {e}"))
}

/// What an operator should hear about at start: a configuration that runs but cannot do
/// what a gateway is for.
fn startup_warnings(config: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    if config.clients.is_empty() {
        out.push("no [[clients]] configured: every request will be refused with 401");
    }
    if config.server.admin_token.is_none() {
        out.push("no server.admin_token configured: /admin/* endpoints are disabled");
    }
    out
}

/// Logs go to stdout through a writer thread: request threads format a line and hand it over
/// instead of taking the stdout lock and making a write system call per request (the
/// request log is one line per request). Lines are batched into 8 KB writes while they come
/// fast; none are dropped (a full queue of 128 k lines makes loggers wait). Hold the guard
/// until exit: dropping it flushes what is queued.
///
/// With the `otlp` feature and `log.otlp_endpoint` set, the request spans are also exported
/// to an OpenTelemetry collector (see `graphgate::otlp`).
fn init_logging(config: &LogConfig) -> Result<Logging, String> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("graphgate-log")
        .finish(std::io::BufWriter::new(std::io::stdout()));
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.level));
    #[cfg(feature = "otlp")]
    if let Some(endpoint) = &config.otlp_endpoint {
        use tracing_subscriber::Layer;
        let (exporter, spans) = graphgate::otlp::start(endpoint, &config.otlp_service_name)?;
        // The log level filters the log lines only: graphgate's spans (and the events in
        // them) at info and above are exported whatever it is.
        let exported = tracing_subscriber::filter::Targets::new()
            .with_target("graphgate", tracing::Level::INFO);
        let _ = tracing_subscriber::registry()
            .with(fmt_layer(config.format, writer).with_filter(filter))
            .with(spans.with_filter(exported))
            .try_init();
        return Ok(Logging {
            _guard: guard,
            exporter: Some(exporter),
        });
    }
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt_layer(config.format, writer))
        .try_init();
    Ok(Logging {
        _guard: guard,
        #[cfg(feature = "otlp")]
        exporter: None,
    })
}

/// Log lines as text or JSON, to `writer`.
fn fmt_layer<S>(
    format: LogFormat,
    writer: tracing_appender::non_blocking::NonBlocking,
) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    use tracing_subscriber::Layer;
    // Colour codes only for a person at a terminal, never into files or log collectors.
    use std::io::IsTerminal;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(std::io::stdout().is_terminal())
        .with_target(false);
    match format {
        LogFormat::Json => fmt.json().boxed(),
        LogFormat::Text => fmt.boxed(),
    }
}

/// Text logs at `info`, no export: for the demo and the simulated Graph.
#[cfg(feature = "demo")]
fn plain_log() -> LogConfig {
    LogConfig {
        format: LogFormat::Text,
        level: "info".into(),
        otlp_endpoint: None,
        otlp_service_name: "graphgate".into(),
    }
}

/// What keeps logging (and span export) running until exit.
struct Logging {
    _guard: tracing_appender::non_blocking::WorkerGuard,
    #[cfg(feature = "otlp")]
    exporter: Option<graphgate::otlp::Exporter>,
}

impl Logging {
    /// Sends the spans still queued for export; log lines are flushed when this drops.
    async fn finish(self) {
        #[cfg(feature = "otlp")]
        if let Some(exporter) = self.exporter {
            exporter.shutdown().await;
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// mimalloc instead of glibc malloc: per-thread free lists cut allocator time on the hit
/// path, and far less fragmentation keeps RSS close to the cached bytes (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    graphgate::allocator::tune();
    let cli = Cli::parse();
    let (config, flags) = (cli.config.as_deref(), cli.set.as_slice());
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(config, flags).await,
        Command::CheckConfig => check_config(config, flags),
        Command::Healthcheck { url } => healthcheck(config, flags, url),
        #[cfg(feature = "demo")]
        Command::Demo {
            listen,
            admin_listen,
            graph_listen,
        } => demo(listen, admin_listen, graph_listen).await,
        #[cfg(feature = "demo")]
        Command::FakeGraph {
            listen,
            latency_ms,
            page_calls,
            page_window_s,
            tls_cert,
            tls_key,
        } => {
            let tls = tls_cert.zip(tls_key);
            run_fake_graph(listen, latency_ms, page_calls, page_window_s, tls).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("graphgate: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config_path: Option<&Path>, flags: &[String]) -> Result<(), String> {
    let config = load_config(config_path, flags)?;
    let log = init_logging(&config.log)?;
    for warning in startup_warnings(&config) {
        tracing::warn!("{warning}");
    }
    // Installed before listening, so a SIGHUP can never hit the default action (exit).
    let mut reloads = reload_signal()?;
    let running = server::start(config).await.map_err(|e| e.to_string())?;
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            () = reloads.next() => {
                tracing::info!("SIGHUP: reloading the configuration");
                match load_config(config_path, flags) {
                    // `reload` logs and counts either way.
                    Ok(config) => { let _ = running.reload(config); }
                    Err(why) => running.reject_reload(&why),
                }
            }
        }
    }
    tracing::info!("shutting down: draining in-flight requests");
    running.shutdown().await;
    log.finish().await;
    Ok(())
}

/// SIGHUP, as a stream of reload requests (never fires on platforms without it).
struct ReloadSignal {
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
}

impl ReloadSignal {
    async fn next(&mut self) {
        #[cfg(unix)]
        {
            if self.hup.recv().await.is_some() {
                return;
            }
        }
        std::future::pending::<()>().await
    }
}

fn reload_signal() -> Result<ReloadSignal, String> {
    Ok(ReloadSignal {
        #[cfg(unix)]
        hup: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| format!("cannot handle SIGHUP: {e}"))?,
    })
}

fn check_config(config_path: Option<&Path>, flags: &[String]) -> Result<(), String> {
    let config = load_config(config_path, flags)?;
    for warning in startup_warnings(&config) {
        eprintln!("warning: {warning}");
    }
    println!(
        "# The configuration is valid. Effective values (file, environment, --set; secrets redacted):\n\n{}",
        effective::to_toml(&config)
    );
    Ok(())
}

/// A plain HTTP/1.1 GET of the admin listener's /readyz, so the container image needs no
/// curl. 0.0.0.0 and [::] (listen on every address) are reached through loopback.
fn healthcheck(
    config_path: Option<&Path>,
    flags: &[String],
    url: Option<String>,
) -> Result<(), String> {
    use std::io::{Read, Write};
    let (addr, path) = match url {
        Some(u) => {
            let rest = u
                .strip_prefix("http://")
                .ok_or("--url must start with http://")?;
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let path = if path.is_empty() { "/" } else { path };
            let addr = std::net::ToSocketAddrs::to_socket_addrs(authority)
                .map_err(|e| format!("{authority}: {e}"))?
                .next()
                .ok_or_else(|| format!("{authority}: no address"))?;
            (addr, path.to_string())
        }
        None => {
            let mut addr = admin_listen(config_path, flags)?;
            if addr.ip().is_unspecified() {
                addr.set_ip(match addr {
                    SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            (addr, "/readyz".to_string())
        }
    };
    let timeout = std::time::Duration::from_secs(3);
    let mut conn =
        std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    conn.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    conn.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("{addr}: {e}"))?;
    let mut head = [0u8; 64];
    let n = conn.read(&mut head).map_err(|e| format!("{addr}: {e}"))?;
    let status_line = String::from_utf8_lossy(&head[..n]);
    let status_line = status_line.lines().next().unwrap_or("");
    if status_line.starts_with("HTTP/1.1 200") || status_line.starts_with("HTTP/1.0 200") {
        println!("http://{addr}{path}: {status_line}");
        Ok(())
    } else {
        Err(format!("http://{addr}{path}: {status_line}"))
    }
}

#[cfg(feature = "demo")]
async fn run_fake_graph(
    listen: SocketAddr,
    latency_ms: u64,
    page_calls: Option<u32>,
    page_window_s: Option<u64>,
    tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
) -> Result<(), String> {
    let _log = init_logging(&plain_log())?;
    let tls = match tls {
        Some((cert, key)) => {
            let read = |p: &std::path::Path| {
                std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))
            };
            Some(fake_graph::FakeGraphTls {
                cert_pem: read(&cert)?,
                key_pem: read(&key)?,
            })
        }
        None => None,
    };
    let mut cfg = fake_graph::FakeGraphConfig {
        latency: std::time::Duration::from_millis(latency_ms),
        tls,
        ..fake_graph::FakeGraphConfig::default()
    };
    if let Some(n) = page_calls {
        cfg.page_calls_limit = n;
    }
    if let Some(s) = page_window_s {
        cfg.page_window = std::time::Duration::from_secs(s);
    }
    let graph = fake_graph::FakeGraph::start(cfg, listen)
        .await
        .map_err(|e| e.to_string())?;
    graph.set_record_limit(0);
    eprintln!("simulated Graph API on {}", graph.url());
    shutdown_signal().await;
    graph.shutdown();
    // One line for scripts that count upstream calls (benches/load/compare.sh).
    let st = graph.stats();
    eprintln!(
        "simulated Graph API stopped: requests={} calls={} throttled={}",
        st.requests, st.calls, st.throttled
    );
    Ok(())
}

/// The demo's client keys (the README and docker-compose.yml use them too).
#[cfg(feature = "demo")]
const DEMO_KEY: &str = "demo-client-key";
#[cfg(feature = "demo")]
const DEMO_READER_KEY: &str = "demo-reader-key";
/// Bearer token of the demo's /admin/* endpoints.
#[cfg(feature = "demo")]
const DEMO_ADMIN_TOKEN: &str = "demo-admin-token";

/// One GET through graphgate (HTTP/1.1, connection closed after), so a printed line that
/// claims a cache hit finds the entry there.
#[cfg(feature = "demo")]
async fn warm_up(addr: SocketAddr, path_and_query: &str) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("warm-up: {e}"))?;
    let head =
        format!("GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    conn.write_all(head.as_bytes())
        .await
        .map_err(|e| format!("warm-up: {e}"))?;
    let mut reply = Vec::new();
    let read = conn.read_to_end(&mut reply);
    tokio::time::timeout(std::time::Duration::from_secs(10), read)
        .await
        .map_err(|_| "warm-up: no reply within 10 s".to_string())?
        .map_err(|e| format!("warm-up: {e}"))?;
    if reply.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(format!(
            "warm-up: {}",
            String::from_utf8_lossy(&reply).lines().next().unwrap_or("")
        ))
    }
}

#[cfg(feature = "demo")]
async fn demo(
    listen: SocketAddr,
    admin_listen: SocketAddr,
    graph_listen: SocketAddr,
) -> Result<(), String> {
    use graphgate::testkit::{Credentials, Stack, TestClient};
    let _log = init_logging(&plain_log())?;
    // The simulated Graph's own defaults (Pages 1001 and 1002, its built-in token and app
    // secret), which docker-compose.yml's replicas are configured with as well.
    let graph_cfg = fake_graph::FakeGraphConfig::default();
    let credentials = Credentials {
        system_user_token: graph_cfg
            .system_user_tokens
            .first()
            .cloned()
            .unwrap_or_default(),
        app_secret: graph_cfg.app_secret.clone().unwrap_or_default(),
        admin_token: Some(DEMO_ADMIN_TOKEN.to_string()),
        clients: vec![
            TestClient::new("demo", DEMO_KEY, &["*"], true),
            TestClient::new("reader", DEMO_READER_KEY, &["1001"], false),
        ],
    };
    let extra = format!(
        r#"
[server]
listen = "{listen}"
admin_listen = "{admin_listen}"
[cache]
# Long enough that the printed cache-hit line still hits when tried a while later.
default_ttl_s = 3600
[upstream]
timeout_ms = 5000
"#
    );
    let Stack {
        graph,
        gateway: running,
    } = Stack::start_on(graph_listen, &credentials, graph_cfg, &extra).await?;
    let base = running.url();
    let read = format!("/v21.0/1001?fields=id,name,fan_count&access_token={DEMO_KEY}");
    warm_up(running.addr, &read).await?;
    let admin = running.admin_url();
    // Every line does what its comment says (tests/it/cli.rs runs each one and checks).
    println!(
        r#"
graphgate demo is running.
  graphgate:          {base}      (client keys: {DEMO_KEY} = read/write all Pages, {DEMO_READER_KEY} = read Page 1001)
  admin:              {admin}      (/metrics, /healthz, /readyz; /admin/* with Authorization: Bearer {DEMO_ADMIN_TOKEN})
  simulated Graph:    {graph}      (the upstream; graphgate injects its token)

Try:
  curl -s '{base}{read}'    # a Page read through graphgate
  curl -s -i '{base}{read}' | grep -i -E '^(x-cache|cache-status|age):'    # X-Cache: HIT (the demo read it once already)
  curl -s '{base}/v21.0/1001/feed?limit=2&access_token={DEMO_KEY}'    # paging.next points back at graphgate
  curl -s -i -H 'Cache-Control: no-store' '{base}/v21.0/1001/feed?limit=2&access_token={DEMO_KEY}' | grep -i -E '^(ratelimit|ratelimit-policy|x-business-use-case-usage):'    # quota headers of a call that went to Graph
  curl -s -X POST '{base}/v21.0/1001/feed' -d message=hello -d access_token={DEMO_KEY}    # a write: the new post's id
  curl -s '{base}/v21.0/1002?access_token={DEMO_READER_KEY}'    # 403: not this client's Page
  curl -s -H 'Authorization: Bearer {DEMO_ADMIN_TOKEN}' '{admin}/admin/pages'    # quota state of every Page seen
  curl -s '{admin}/metrics' | grep -E '^graphgate_requests_total'    # request counters

Ctrl-C stops it."#,
        graph = graph.url(),
    );
    running.run_until(shutdown_signal()).await;
    graph.shutdown();
    Ok(())
}
