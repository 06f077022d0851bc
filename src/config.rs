//! Configuration: TOML as written by operators (`Raw*`, strict, unknown keys rejected) turned
//! into a validated [`Config`]. Secrets live in [`Secret`], whose `Debug` never shows them.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

pub mod effective;
pub mod env;
mod log_level;

/// A value that must never be printed: tokens, app secret, client keys, admin token.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself: call only where it is sent or compared, never to log.
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("\"\"")
        } else {
            f.write_str("\"[redacted]\"")
        }
    }
}

/// SHA-256 of a client key. Clients are looked up by it, so the configuration may hold the
/// digest instead of the key (`key_sha256`). `Debug` does not show it: a digest of a short key
/// can be brute-forced.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyDigest(pub [u8; 32]);

impl KeyDigest {
    pub fn of(key: &str) -> KeyDigest {
        use sha2::{Digest, Sha256};
        KeyDigest(Sha256::digest(key.as_bytes()).into())
    }

    pub fn from_hex(hex_digest: &str) -> Option<KeyDigest> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_digest.trim(), &mut out).ok()?;
        Some(KeyDigest(out))
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"[sha256 redacted]\"")
    }
}

/// Why a configuration was refused; the message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("invalid value for `{key}`: {why}")]
    Invalid { key: String, why: String },
}

impl ConfigError {
    /// Validation messages quote the values of ordinary keys; should one of them hold a
    /// secret after all (a token pasted into the wrong key), it is taken out.
    fn redacting(self, secrets: &[String]) -> ConfigError {
        match self {
            ConfigError::Invalid { key, why } => ConfigError::Invalid {
                key,
                why: secrets
                    .iter()
                    .filter(|s| s.len() >= 4)
                    .fold(why, |why, s| why.replace(s.as_str(), REDACTED)),
            },
            other => other,
        }
    }
}

const REDACTED: &str = "[redacted]";

/// A TOML error without the parts that may hold a secret. toml's own `Display` quotes the
/// offending line of the file (an unterminated `system_user_token = "EAAG…` is the line
/// shown), and serde's messages quote values (`invalid type: integer `…``). What is left:
/// the position, and the message with only key names and syntax tokens still quoted.
fn describe_parse_error(e: &toml::de::Error, text: &str) -> String {
    let message = redact_quoted_values(e.message().trim_end());
    match e.span() {
        Some(span) => {
            let (line, column) = line_and_column(text, span.start);
            format!(
                "TOML parse error at line {line}, column {column} (the line is not shown: it may hold a secret): {message}"
            )
        }
        None => format!("TOML parse error: {message}"),
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let mut at = offset.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1,
    )
}

/// Keeps a quoted fragment of a parser message only when it is a key name (the subject of
/// "unknown field", "duplicate key", "missing field", "in table", or an "expected one of"
/// list) or a syntax token of one or two characters; any other fragment, and every
/// double-quoted string, is a value and is replaced. Fails closed: a message shape not
/// foreseen here loses its quotes rather than shows a value.
fn redact_quoted_values(message: &str) -> String {
    const KEY_CONTEXTS: [&str; 4] = [
        "unknown field ",
        "duplicate key ",
        "missing field ",
        "in table ",
    ];
    let mut out = String::with_capacity(message.len());
    for (i, line) in message.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let mut rest = line;
        let mut in_key_list = false;
        loop {
            let Some(open) = rest.find(['`', '"']) else {
                out.push_str(rest);
                break;
            };
            let (plain, quoted) = rest.split_at(open);
            out.push_str(plain);
            in_key_list |= plain.contains("expected one of ");
            let quote = quoted.chars().next().unwrap_or('`');
            let Some(len) = closing_quote(&quoted[1..], quote) else {
                // An unbalanced quote: everything after it may be a value.
                out.push_str("(value not shown)");
                break;
            };
            let inner = &quoted[1..1 + len];
            let key_name =
                quote == '`' && (in_key_list || KEY_CONTEXTS.iter().any(|c| plain.ends_with(c)));
            if key_name || (quote == '`' && inner.chars().count() <= 2) {
                out.push_str(&quoted[..len + 2]);
            } else {
                out.push_str("(value not shown)");
            }
            rest = &quoted[len + 2..];
        }
    }
    out
}

/// Byte length of a quoted fragment's content, up to its closing `quote`; inside double
/// quotes a backslash escapes the next character (serde quotes strings Debug-style).
fn closing_quote(s: &str, quote: char) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quote == '"' => escaped = true,
            c if c == quote => return Some(i),
            _ => {}
        }
    }
    None
}

/// `scheme://user:password@host` with the user information replaced, for messages.
fn without_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://{REDACTED}@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// The user information of a URL (`user:password`), if any.
fn userinfo(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    rest[..authority_end].rfind('@').map(|at| &rest[..at])
}

fn invalid(key: &str, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        why: why.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Raw TOML shape. `deny_unknown_fields` makes a typo an error that names the key.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    server: RawServer,
    upstream: RawUpstream,
    credentials: RawCredentials,
    clients: Vec<RawClient>,
    cache: RawCache,
    redis: RawRedis,
    quota: RawQuota,
    log: RawLog,
    /// A TOML file of more `[[clients]]` (merged in by `env::Layers`).
    clients_file: Option<String>,
}

impl RawConfig {
    /// Every secret this file (or the environment) holds, as written: what no error may show.
    fn secret_values(&self, env: &impl Fn(&str) -> Option<String>) -> Vec<String> {
        let mut out: Vec<String> = [ENV_SYSTEM_USER_TOKEN, ENV_APP_SECRET]
            .into_iter()
            .filter_map(env)
            .collect();
        let secrets = [
            &self.credentials.system_user_token,
            &self.credentials.app_secret,
            &self.server.admin_token,
            &self.redis.url,
        ];
        out.extend(
            secrets
                .into_iter()
                .flatten()
                .map(|s| s.expose().to_string()),
        );
        out.extend(
            self.clients
                .iter()
                .filter_map(|c| c.key.as_ref())
                .map(|k| k.expose().to_string()),
        );
        out.extend(self.clients.iter().filter_map(|c| c.key_sha256.clone()));
        let urls = [
            Some(self.upstream.url.as_str()),
            self.server.public_url.as_deref(),
            self.redis.url.as_ref().map(Secret::expose),
        ];
        out.extend(
            urls.into_iter()
                .flatten()
                .filter_map(userinfo)
                .flat_map(|u| {
                    // `user:password`, and the password alone.
                    let password = u.split_once(':').map(|(_, p)| p.to_string());
                    std::iter::once(u.to_string()).chain(password)
                }),
        );
        out
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    listen: String,
    public_url: Option<String>,
    admin_listen: String,
    admin_token: Option<Secret>,
    header_read_timeout_ms: u64,
    max_header_bytes: usize,
    max_body_bytes: usize,
    shutdown_grace_ms: u64,
    // Hardening: connection and load limits, inbound TLS.
    max_connections: usize,
    admin_max_connections: usize,
    idle_timeout_ms: u64,
    max_in_flight: usize,
    body_read_timeout_ms: u64,
    workers: usize,
    tls_cert_file: Option<String>,
    tls_key_file: Option<String>,
    tls_client_ca_file: Option<String>,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: "127.0.0.1:8080".into(),
            public_url: None,
            admin_listen: DEFAULT_ADMIN_LISTEN.into(),
            admin_token: None,
            header_read_timeout_ms: 10_000,
            max_header_bytes: 16 * 1024,
            max_body_bytes: 1024 * 1024,
            shutdown_grace_ms: 10_000,
            max_connections: 10_000,
            admin_max_connections: 64,
            idle_timeout_ms: 60_000,
            max_in_flight: 2048,
            body_read_timeout_ms: 10_000,
            workers: 0,
            tls_cert_file: None,
            tls_key_file: None,
            tls_client_ca_file: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawUpstream {
    url: String,
    timeout_ms: u64,
    connect_timeout_ms: u64,
    max_get_url_bytes: usize,
    max_response_bytes: usize,
    max_buffered_reply_bytes: usize,
    default_version: String,
    ca_file: Option<String>,
    // Hardening: retries of idempotent reads and the circuit breaker.
    retries: u32,
    retry_budget_percent: u32,
    retry_budget_min_per_s: u32,
    retry_backoff_ms: u64,
    breaker_failures: u32,
    breaker_cooldown_ms: u64,
}

impl Default for RawUpstream {
    fn default() -> Self {
        RawUpstream {
            url: "https://graph.facebook.com".into(),
            timeout_ms: 30_000,
            connect_timeout_ms: 5_000,
            max_get_url_bytes: 2000,
            max_response_bytes: 16 * 1024 * 1024,
            max_buffered_reply_bytes: 256 * 1024 * 1024,
            default_version: "v21.0".into(),
            ca_file: None,
            retries: 2,
            retry_budget_percent: 20,
            retry_budget_min_per_s: 3,
            retry_backoff_ms: 50,
            breaker_failures: 5,
            breaker_cooldown_ms: 5_000,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawCredentials {
    system_user_token: Option<Secret>,
    app_secret: Option<Secret>,
    page_tokens: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    name: String,
    #[serde(default)]
    key: Option<Secret>,
    /// Lowercase or uppercase hex SHA-256 of the key, in place of `key`.
    #[serde(default)]
    key_sha256: Option<String>,
    /// Subject CN (or DNS SAN) of a TLS client certificate that authenticates this client.
    #[serde(default)]
    cert_subject: Option<String>,
    #[serde(default)]
    pages: Vec<String>,
    #[serde(default)]
    write: bool,
    #[serde(default)]
    priority: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawCache {
    max_bytes: u64,
    default_ttl_s: u64,
    stale_while_revalidate_s: u64,
    stale_if_error_s: u64,
    compress: bool,
    rules: Vec<RawCacheRule>,
}

impl Default for RawCache {
    fn default() -> Self {
        RawCache {
            max_bytes: 256 * 1024 * 1024,
            default_ttl_s: 60,
            stale_while_revalidate_s: 30,
            stale_if_error_s: 600,
            compress: true,
            rules: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCacheRule {
    #[serde(rename = "match")]
    pattern: String,
    ttl_s: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRedis {
    url: Option<Secret>,
    // Scale-out (issue 5): keys, tight timeouts, degraded budgets.
    key_prefix: String,
    timeout_ms: u64,
    local_budget_fraction: Option<f64>,
}

impl Default for RawRedis {
    fn default() -> Self {
        RawRedis {
            url: None,
            key_prefix: "gg:".into(),
            timeout_ms: 50,
            local_budget_fraction: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawQuota {
    page_calls: u32,
    page_window_s: u64,
    queue_timeout_ms: u64,
    max_queue_depth: usize,
    slowdown_threshold_pct: u32,
    headroom_pct: u32,
    app_calls: Option<u32>,
    learn_limits: bool,
    metrics_top_pages: usize,
    max_buckets: usize,
    pages: Vec<RawQuotaPage>,
}

impl Default for RawQuota {
    fn default() -> Self {
        RawQuota {
            page_calls: 4800,
            page_window_s: 3600,
            queue_timeout_ms: 10_000,
            max_queue_depth: 1000,
            slowdown_threshold_pct: 60,
            headroom_pct: 2,
            app_calls: None,
            learn_limits: false,
            metrics_top_pages: 50,
            max_buckets: 50_000,
            pages: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuotaPage {
    id: String,
    page_calls: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    format: Option<String>,
    level: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Validated configuration.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub credentials: Credentials,
    pub clients: Vec<ClientConfig>,
    pub cache: CacheConfig,
    pub redis: RedisConfig,
    pub quota: QuotaConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Base URL clients use to reach graphgate; paging links are rewritten to it.
    pub public_url: String,
    pub admin_listen: SocketAddr,
    pub admin_token: Option<Secret>,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_body_bytes: usize,
    pub shutdown_grace: Duration,
    /// Open client connections on the public listener; beyond it new ones are closed at once.
    pub max_connections: usize,
    /// The same for the admin listener (health checks and scrapes need few).
    pub admin_max_connections: usize,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// Requests handled at once; beyond it requests are shed with 503 + Retry-After.
    pub max_in_flight: usize,
    /// The whole request body must arrive within this time after the head (a slow body
    /// would otherwise hold an in-flight slot); 408 otherwise.
    pub body_read_timeout: Duration,
    /// Threads serving public connections, each with its own single-threaded runtime
    /// (`server.workers`; 0 in the file means one per CPU).
    pub workers: usize,
    pub tls: Option<TlsConfig>,
}

/// Inbound TLS: PEM files, read at start and on every reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert_file: std::path::PathBuf,
    pub key_file: std::path::PathBuf,
    /// Client certificates signed by this CA authenticate `[[clients]]` with `cert_subject`.
    pub client_ca_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Scheme + authority, no trailing slash, e.g. `https://graph.facebook.com`.
    pub url: String,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub max_get_url_bytes: usize,
    pub max_response_bytes: usize,
    /// Reply bodies held in memory at once, all requests together (upstream replies being
    /// read or written to clients, cached bodies decompressed or copied for one client);
    /// a reply that would exceed it is answered 503.
    pub max_buffered_reply_bytes: usize,
    pub default_version: String,
    /// Extra CAs (PEM) trusted for Graph's certificate besides the public roots: a TLS
    /// inspecting egress proxy, or the simulated Graph API in tests.
    pub ca_file: Option<std::path::PathBuf>,
    pub retry: RetryConfig,
}

/// Retries of idempotent reads and the circuit breaker in front of Graph.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// Extra attempts after the first; 0 disables retries.
    pub retries: u32,
    /// Retries may add at most this share of recent requests...
    pub budget_percent: u32,
    /// ...plus this many per second.
    pub budget_min_per_s: u32,
    /// Base of the exponential backoff; each wait is uniform in [0, base * 2^n).
    pub backoff: Duration,
    /// Consecutive failures that open the breaker; 0 disables it.
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
}

#[derive(Debug, Clone)]
pub struct Credentials {
    pub system_user_token: Secret,
    pub app_secret: Option<Secret>,
    pub page_tokens: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    #[default]
    Interactive,
    Batch,
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub name: String,
    /// SHA-256 of the client key (from `key` or `key_sha256`); `None` for a client that
    /// authenticates only by TLS client certificate.
    pub key_sha256: Option<KeyDigest>,
    /// Subject CN or DNS SAN of the client certificate that authenticates this client.
    pub cert_subject: Option<String>,
    /// Page ids this client may touch; `None` means every Page ("*").
    pub pages: Option<Vec<String>>,
    pub write: bool,
    pub priority: Priority,
}

#[derive(Debug, Clone)]
pub struct CacheRule {
    /// A path pattern such as `/*/feed` or `/{page}`: see `cache::policy`.
    pub pattern: String,
    pub ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub max_bytes: u64,
    pub default_ttl: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    /// Keep bodies LZ4-compressed in the in-process tier (`[cache] compress`, default on).
    pub compress: bool,
    pub rules: Vec<CacheRule>,
}

/// `[redis]`: with a `url`, replicas share cache entries, Page budgets, invalidations and
/// fill leases through it (see `redis_conn`); without one graphgate is a single node.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// May carry a password, hence a secret.
    pub url: Option<Secret>,
    /// Prepended to every key and channel, so several fleets (or tests) share one Redis.
    pub key_prefix: String,
    /// Every Redis command gives up after this; Redis must never slow a request down much.
    pub timeout: Duration,
    /// Share of each Page budget a replica uses on its own while Redis is unreachable;
    /// unset: one over the replicas last seen alive (heartbeats in Redis).
    pub local_budget_fraction: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct QuotaConfig {
    pub page_calls: u32,
    pub page_window: Duration,
    pub queue_timeout: Duration,
    pub max_queue_depth: usize,
    /// Estimated usage (percent) below which calls go at once; above it, what is left is
    /// spread until counted calls leave the window.
    pub slowdown_threshold_pct: u32,
    /// Percent of the limit never used: the admission ceiling is `100 − headroom_pct`.
    pub headroom_pct: u32,
    /// Starting guess of the app-level bucket per `page_window`.
    pub app_calls: u32,
    /// Whether a limit learned from usage readings may go above `page_calls`.
    pub learn_limits: bool,
    /// Per-Page metric series for this many of the busiest Pages (listed Pages always).
    pub metrics_top_pages: usize,
    /// Quota buckets kept (plus those in use by a call).
    pub max_buckets: usize,
    /// Listed Pages: their ceiling (the default when not overridden); they also get per-Page
    /// metric series.
    pub pages: Vec<(String, u32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

/// `server.admin_listen` when not set.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";

/// Environment variables that override secrets, so they need not sit in files.
pub const ENV_SYSTEM_USER_TOKEN: &str = "GRAPHGATE_SYSTEM_USER_TOKEN";
pub const ENV_APP_SECRET: &str = "GRAPHGATE_APP_SECRET";

impl Config {
    /// Parses TOML text and validates it; `env` supplies secret overrides (pass
    /// `|k| std::env::var(k).ok()` in production, a map in tests).
    pub fn from_toml(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        Config::from_layers(text, &env::Layers::none(), env)
    }

    fn from_raw(
        raw: RawConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let secrets = raw.secret_values(&env);
        Config::validate(raw, env).map_err(|e| e.redacting(&secrets))
    }

    pub fn from_file(
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml(&text, env)
    }

    fn validate(
        raw: RawConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let s = raw.server;
        let listen: SocketAddr = s
            .listen
            .parse()
            .map_err(|e| invalid("server.listen", format!("{e} (expected host:port)")))?;
        let admin_listen: SocketAddr = s
            .admin_listen
            .parse()
            .map_err(|e| invalid("server.admin_listen", format!("{e} (expected host:port)")))?;
        let public_url = match s.public_url {
            Some(u) => validate_base_url("server.public_url", &u)?,
            None if s.tls_cert_file.is_some() => format!("https://{listen}"),
            None => format!("http://{listen}"),
        };
        if s.max_header_bytes < 1024 {
            return Err(invalid("server.max_header_bytes", "must be at least 1024"));
        }
        if s.max_body_bytes == 0 {
            return Err(invalid("server.max_body_bytes", "must be positive"));
        }
        if s.header_read_timeout_ms == 0 {
            return Err(invalid("server.header_read_timeout_ms", "must be positive"));
        }
        let admin_token = s.admin_token.filter(|t| !t.is_empty());
        if s.max_connections == 0 || s.max_connections > 1_000_000 {
            return Err(invalid("server.max_connections", "must be 1..=1000000"));
        }
        if s.admin_max_connections == 0 || s.admin_max_connections > 100_000 {
            return Err(invalid(
                "server.admin_max_connections",
                "must be 1..=100000",
            ));
        }
        if s.max_in_flight == 0 || s.max_in_flight > 1_000_000 {
            return Err(invalid("server.max_in_flight", "must be 1..=1000000"));
        }
        if s.body_read_timeout_ms == 0 {
            return Err(invalid("server.body_read_timeout_ms", "must be positive"));
        }
        if s.idle_timeout_ms == 0 {
            return Err(invalid("server.idle_timeout_ms", "must be positive"));
        }
        if s.workers > 1024 {
            return Err(invalid("server.workers", "must be 0 (one per CPU) to 1024"));
        }
        let workers = match s.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let tls = match (&s.tls_cert_file, &s.tls_key_file) {
            (Some(cert), Some(key)) => Some(TlsConfig {
                cert_file: cert.into(),
                key_file: key.into(),
                client_ca_file: s.tls_client_ca_file.as_ref().map(Into::into),
            }),
            (None, None) if s.tls_client_ca_file.is_some() => {
                return Err(invalid(
                    "server.tls_client_ca_file",
                    "needs server.tls_cert_file and server.tls_key_file",
                ))
            }
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(
                    "server.tls_key_file",
                    "required with tls_cert_file",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "server.tls_cert_file",
                    "required with tls_key_file",
                ))
            }
        };

        let u = raw.upstream;
        let upstream_url = validate_base_url("upstream.url", &u.url)?;
        if u.timeout_ms == 0 {
            return Err(invalid("upstream.timeout_ms", "must be positive"));
        }
        if u.max_get_url_bytes < 64 {
            return Err(invalid("upstream.max_get_url_bytes", "must be at least 64"));
        }
        if u.retry_budget_percent > 100 {
            return Err(invalid("upstream.retry_budget_percent", "must be 0..=100"));
        }
        let max_response_bytes = u.max_response_bytes.max(1024);
        if u.max_buffered_reply_bytes < max_response_bytes {
            return Err(invalid(
                "upstream.max_buffered_reply_bytes",
                format!("must be at least upstream.max_response_bytes ({max_response_bytes}), or no reply of that size could ever be served"),
            ));
        }
        if u.retries > 10 {
            return Err(invalid("upstream.retries", "must be 0..=10"));
        }
        if !is_version(&u.default_version) {
            return Err(invalid(
                "upstream.default_version",
                format!("`{}` is not a Graph version like v21.0", u.default_version),
            ));
        }

        let c = raw.credentials;
        let system_user_token = env(ENV_SYSTEM_USER_TOKEN)
            .map(Secret::new)
            .or(c.system_user_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                invalid(
                    "credentials.system_user_token",
                    format!("required (or set {ENV_SYSTEM_USER_TOKEN})"),
                )
            })?;
        let app_secret = env(ENV_APP_SECRET)
            .map(Secret::new)
            .or(c.app_secret)
            .filter(|t| !t.is_empty());

        let mut clients = Vec::with_capacity(raw.clients.len());
        for (i, rc) in raw.clients.into_iter().enumerate() {
            let key_name = |k: &str| format!("clients[{i}].{k}");
            if rc.name.trim().is_empty() {
                return Err(invalid(&key_name("name"), "must not be empty"));
            }
            let key_sha256 = match (&rc.key, &rc.key_sha256) {
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        &key_name("key"),
                        "give either `key` or `key_sha256`, not both",
                    ))
                }
                (Some(k), None) => {
                    if k.expose().len() < 8 {
                        return Err(invalid(&key_name("key"), "must be at least 8 characters"));
                    }
                    Some(KeyDigest::of(k.expose()))
                }
                (None, Some(hex)) => Some(KeyDigest::from_hex(hex).ok_or_else(|| {
                    invalid(&key_name("key_sha256"), "must be 64 hex digits (a SHA-256)")
                })?),
                (None, None) if rc.cert_subject.is_some() => None,
                (None, None) => {
                    return Err(invalid(
                        &key_name("key"),
                        "required: `key` or `key_sha256` (or `cert_subject` for TLS client certificates)",
                    ))
                }
            };
            if let Some(d) = &key_sha256 {
                if *d == KeyDigest::of(system_user_token.expose()) {
                    return Err(invalid(
                        &key_name("key"),
                        "must differ from the system user token",
                    ));
                }
                if clients
                    .iter()
                    .any(|c: &ClientConfig| c.key_sha256.as_ref() == Some(d))
                {
                    return Err(invalid(&key_name("key"), "duplicate key"));
                }
            }
            let cert_subject = match rc.cert_subject {
                Some(cn) if cn.trim().is_empty() => {
                    return Err(invalid(&key_name("cert_subject"), "must not be empty"))
                }
                Some(cn) => {
                    if s.tls_client_ca_file.is_none() {
                        return Err(invalid(
                            &key_name("cert_subject"),
                            "needs server.tls_client_ca_file (client certificates are verified against it)",
                        ));
                    }
                    if clients
                        .iter()
                        .any(|c: &ClientConfig| c.cert_subject.as_deref() == Some(cn.as_str()))
                    {
                        return Err(invalid(&key_name("cert_subject"), "duplicate subject"));
                    }
                    Some(cn)
                }
                None => None,
            };
            let pages = if rc.pages.iter().any(|p| p == "*") {
                None
            } else {
                for p in &rc.pages {
                    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                        return Err(invalid(
                            &key_name("pages"),
                            format!("`{p}` is not a Page id or \"*\""),
                        ));
                    }
                }
                Some(rc.pages)
            };
            let priority = match rc.priority.as_deref() {
                None | Some("interactive") => Priority::Interactive,
                Some("batch") => Priority::Batch,
                Some(other) => {
                    return Err(invalid(
                        &key_name("priority"),
                        format!("`{other}` is not \"interactive\" or \"batch\""),
                    ))
                }
            };
            clients.push(ClientConfig {
                name: rc.name,
                key_sha256,
                cert_subject,
                pages,
                write: rc.write,
                priority,
            });
        }

        let ca = raw.cache;
        let mut rules = Vec::with_capacity(ca.rules.len());
        for (i, r) in ca.rules.into_iter().enumerate() {
            if !r.pattern.starts_with('/') {
                return Err(invalid(
                    &format!("cache.rules[{i}].match"),
                    "must start with `/`",
                ));
            }
            rules.push(CacheRule {
                pattern: r.pattern,
                ttl: Duration::from_secs(r.ttl_s),
            });
        }

        let q = raw.quota;
        if q.page_calls == 0 {
            return Err(invalid("quota.page_calls", "must be positive"));
        }
        if q.page_window_s == 0 {
            return Err(invalid("quota.page_window_s", "must be positive"));
        }
        for (i, p) in q.pages.iter().enumerate() {
            if p.page_calls == Some(0) {
                return Err(invalid(
                    &format!("quota.pages[{i}].page_calls"),
                    "must be positive",
                ));
            }
            if p.id.is_empty() || !p.id.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid(
                    &format!("quota.pages[{i}].id"),
                    format!("`{}` is not a Page id", p.id),
                ));
            }
        }
        if q.max_queue_depth == 0 {
            return Err(invalid("quota.max_queue_depth", "must be positive"));
        }
        if q.max_buckets == 0 {
            return Err(invalid("quota.max_buckets", "must be positive"));
        }
        if !(1..=100).contains(&q.slowdown_threshold_pct) {
            return Err(invalid("quota.slowdown_threshold_pct", "must be 1 to 100"));
        }
        if q.headroom_pct >= 50 {
            return Err(invalid("quota.headroom_pct", "must be below 50"));
        }
        if q.app_calls == Some(0) {
            return Err(invalid("quota.app_calls", "must be positive"));
        }

        let r = &raw.redis;
        if r.timeout_ms == 0 || r.timeout_ms > 10_000 {
            return Err(invalid("redis.timeout_ms", "must be 1..=10000"));
        }
        if r.local_budget_fraction
            .is_some_and(|f| !(f > 0.0 && f <= 1.0))
        {
            return Err(invalid("redis.local_budget_fraction", "must be in (0, 1]"));
        }
        if r.key_prefix.len() > 64 || r.key_prefix.contains(['{', '}', ' ']) {
            return Err(invalid(
                "redis.key_prefix",
                "at most 64 characters, without braces or spaces",
            ));
        }
        if let Some(u) = &r.url {
            let u = u.expose();
            if !(u.is_empty() || u.starts_with("redis://") || u.starts_with("unix://")) {
                return Err(invalid(
                    "redis.url",
                    "must start with redis:// or unix:// (rediss:// is not built in)",
                ));
            }
        }

        let format = match raw.log.format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(invalid(
                    "log.format",
                    format!("`{other}` is not \"text\" or \"json\""),
                ))
            }
        };

        Ok(Config {
            server: ServerConfig {
                listen,
                public_url,
                admin_listen,
                admin_token,
                header_read_timeout: Duration::from_millis(s.header_read_timeout_ms),
                max_header_bytes: s.max_header_bytes,
                max_body_bytes: s.max_body_bytes,
                shutdown_grace: Duration::from_millis(s.shutdown_grace_ms),
                max_connections: s.max_connections,
                admin_max_connections: s.admin_max_connections,
                idle_timeout: Duration::from_millis(s.idle_timeout_ms),
                max_in_flight: s.max_in_flight,
                body_read_timeout: Duration::from_millis(s.body_read_timeout_ms),
                workers,
                tls,
            },
            upstream: UpstreamConfig {
                url: upstream_url,
                timeout: Duration::from_millis(u.timeout_ms),
                connect_timeout: Duration::from_millis(u.connect_timeout_ms.max(1)),
                max_get_url_bytes: u.max_get_url_bytes,
                max_response_bytes,
                max_buffered_reply_bytes: u.max_buffered_reply_bytes,
                default_version: u.default_version,
                ca_file: u.ca_file.map(Into::into),
                retry: RetryConfig {
                    retries: u.retries,
                    budget_percent: u.retry_budget_percent,
                    budget_min_per_s: u.retry_budget_min_per_s,
                    backoff: Duration::from_millis(u.retry_backoff_ms),
                    breaker_failures: u.breaker_failures,
                    breaker_cooldown: Duration::from_millis(u.breaker_cooldown_ms.max(1)),
                },
            },
            credentials: Credentials {
                system_user_token,
                app_secret,
                page_tokens: c.page_tokens,
            },
            clients,
            cache: CacheConfig {
                max_bytes: ca.max_bytes,
                default_ttl: Duration::from_secs(ca.default_ttl_s),
                stale_while_revalidate: Duration::from_secs(ca.stale_while_revalidate_s),
                stale_if_error: Duration::from_secs(ca.stale_if_error_s),
                compress: ca.compress,
                rules,
            },
            redis: RedisConfig {
                url: raw.redis.url.filter(|u| !u.is_empty()),
                key_prefix: raw.redis.key_prefix,
                timeout: Duration::from_millis(raw.redis.timeout_ms),
                local_budget_fraction: raw.redis.local_budget_fraction,
            },
            quota: QuotaConfig {
                page_calls: q.page_calls,
                page_window: Duration::from_secs(q.page_window_s),
                queue_timeout: Duration::from_millis(q.queue_timeout_ms),
                max_queue_depth: q.max_queue_depth,
                slowdown_threshold_pct: q.slowdown_threshold_pct,
                headroom_pct: q.headroom_pct,
                app_calls: q.app_calls.unwrap_or(q.page_calls),
                learn_limits: q.learn_limits,
                metrics_top_pages: q.metrics_top_pages,
                max_buckets: q.max_buckets,
                pages: q
                    .pages
                    .into_iter()
                    .map(|p| (p.id, p.page_calls.unwrap_or(q.page_calls)))
                    .collect(),
            },
            log: LogConfig {
                format,
                level: log_level::checked(raw.log.level)?,
            },
        })
    }
}

/// `vNN.N`, the shape of a Graph API version path segment.
pub fn is_version(s: &str) -> bool {
    let Some(rest) = s.strip_prefix('v') else {
        return false;
    };
    let mut parts = rest.splitn(2, '.');
    let major = parts.next().unwrap_or("");
    let minor = parts.next().unwrap_or("");
    !major.is_empty()
        && !minor.is_empty()
        && major.bytes().all(|b| b.is_ascii_digit())
        && minor.bytes().all(|b| b.is_ascii_digit())
}

fn validate_base_url(key: &str, url: &str) -> Result<String, ConfigError> {
    let trimmed = url.trim_end_matches('/');
    // Messages show the URL without its user information (which may hold a password).
    let shown = without_userinfo(url);
    let uri: http::Uri = trimmed
        .parse()
        .map_err(|e| invalid(key, format!("`{shown}` is not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => {
            return Err(invalid(
                key,
                format!("`{shown}` must start with http:// or https://"),
            ))
        }
    }
    if uri.authority().is_none() {
        return Err(invalid(key, format!("`{shown}` has no host")));
    }
    if uri.query().is_some() {
        return Err(invalid(key, "must not have a query"));
    }
    Ok(trimmed.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    const MIN: &str = r#"
        [credentials]
        system_user_token = "EAAB-system-token-secret"
        app_secret = "shh-app-secret"
        [[clients]]
        name = "reports"
        key = "client-key-reports"
        pages = ["1001"]
    "#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_toml(MIN, no_env).unwrap();
        assert_eq!(c.upstream.url, "https://graph.facebook.com");
        assert_eq!(c.upstream.max_get_url_bytes, 2000);
        assert_eq!(c.server.public_url, "http://127.0.0.1:8080");
        assert_eq!(
            c.clients[0].pages.as_deref(),
            Some(&["1001".to_string()][..])
        );
        assert!(!c.clients[0].write);
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let c = Config::from_toml(MIN, no_env).unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("EAAB-system-token-secret"), "{dbg}");
        assert!(!dbg.contains("shh-app-secret"));
        assert!(!dbg.contains("client-key-reports"));
        assert!(dbg.contains("[redacted]"));
        let text = format!(
            "[server]\nadmin_token = \"admin-tok-secret\"\n{MIN}\n[redis]\nurl = \"redis://:redis-pw-secret@r:6379\"\n"
        );
        let env = |k: &str| (k == ENV_APP_SECRET).then(|| "app-secret-from-env".to_string());
        let dbg = format!("{:?}", Config::from_toml(&text, env).unwrap());
        for secret in ["admin-tok-secret", "redis-pw-secret", "app-secret-from-env"] {
            assert!(!dbg.contains(secret), "{dbg}");
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("[server]\nlisten_addr = \"x\"\n", no_env).unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");
    }

    #[test]
    fn invalid_value_says_which_and_why() {
        let text = format!("{MIN}\n[upstream]\nurl = \"ftp://x\"\n");
        let err = Config::from_toml(&text, no_env).unwrap_err().to_string();
        assert!(
            err.contains("upstream.url") && err.contains("http"),
            "{err}"
        );
    }

    #[test]
    fn workers_default_to_one_per_cpu() {
        let c = Config::from_toml(MIN, no_env).unwrap();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(c.server.workers, cpus);
        let text = format!("[server]\nworkers = 3\n{MIN}");
        assert_eq!(Config::from_toml(&text, no_env).unwrap().server.workers, 3);
        let text = format!("[server]\nworkers = 5000\n{MIN}");
        let err = Config::from_toml(&text, no_env).unwrap_err().to_string();
        assert!(err.contains("server.workers"), "{err}");
    }

    #[test]
    fn secrets_come_from_env() {
        let text = "[[clients]]\nname='a'\nkey='client-key-aaaa'\npages=['*']\n";
        let env = |k: &str| match k {
            ENV_SYSTEM_USER_TOKEN => Some("from-env-token".to_string()),
            ENV_APP_SECRET => Some("from-env-secret".to_string()),
            _ => None,
        };
        let c = Config::from_toml(text, env).unwrap();
        assert_eq!(c.credentials.system_user_token.expose(), "from-env-token");
        assert_eq!(
            c.credentials.app_secret.unwrap().expose(),
            "from-env-secret"
        );
        assert!(c.clients[0].pages.is_none());
    }

    #[test]
    fn missing_token_is_an_error() {
        let err = Config::from_toml("", no_env).unwrap_err().to_string();
        assert!(err.contains("credentials.system_user_token"), "{err}");
    }

    #[test]
    fn quota_keys_have_defaults_and_are_checked() {
        let c = Config::from_toml(MIN, no_env).unwrap();
        assert_eq!(c.quota.slowdown_threshold_pct, 60);
        assert_eq!(c.quota.headroom_pct, 2);
        assert!(!c.quota.learn_limits);
        assert_eq!(c.quota.metrics_top_pages, 50);
        assert_eq!(c.quota.max_buckets, 50_000);
        assert_eq!(c.quota.app_calls, 4800);
        let text = format!("{MIN}\n[quota]\npage_calls = 10\n[[quota.pages]]\nid = \"1001\"\n[[quota.pages]]\nid = \"1002\"\npage_calls = 5\n");
        let c = Config::from_toml(&text, no_env).unwrap();
        assert_eq!(
            c.quota.pages,
            [("1001".to_string(), 10), ("1002".to_string(), 5)]
        );
        assert_eq!(c.quota.app_calls, 10);
        for bad in [
            "slowdown_threshold_pct = 0",
            "headroom_pct = 50",
            "max_queue_depth = 0",
            "max_buckets = 0",
        ] {
            let text = format!("{MIN}\n[quota]\n{bad}\n");
            let err = Config::from_toml(&text, no_env).unwrap_err().to_string();
            assert!(err.contains("quota."), "{bad}: {err}");
        }
    }

    #[test]
    fn redis_keys_have_defaults_and_are_checked() {
        let c = Config::from_toml(MIN, no_env).unwrap();
        assert!(c.redis.url.is_none());
        assert_eq!(c.redis.key_prefix, "gg:");
        assert_eq!(c.redis.timeout, Duration::from_millis(50));
        assert_eq!(c.redis.local_budget_fraction, None);
        let text = format!("{MIN}\n[redis]\nurl = \"redis://:pw-secret@redis:6379\"\n");
        let c = Config::from_toml(&text, no_env).unwrap();
        assert!(!format!("{c:?}").contains("pw-secret"));
        for bad in [
            "timeout_ms = 0",
            "local_budget_fraction = 0.0",
            "local_budget_fraction = 1.5",
            "key_prefix = \"a{b}\"",
            "url = \"http://redis:6379\"",
        ] {
            let text = format!("{MIN}\n[redis]\n{bad}\n");
            let err = Config::from_toml(&text, no_env).unwrap_err().to_string();
            assert!(err.contains("redis."), "{bad}: {err}");
        }
    }

    #[test]
    fn parse_errors_keep_position_and_key_names_but_no_values() {
        let text = format!("{MIN}\n[server]\nadmin_token = \"tok-secret-value\n");
        let err = Config::from_toml(&text, no_env).unwrap_err().to_string();
        assert!(err.contains("line 11") && err.contains("column"), "{err}");
        assert!(!err.contains("tok-secret-value"), "{err}");
        for (bad, must_show) in [
            ("[server]\nadmin_token = 31337000", "integer"),
            (
                "[server]\nadmin_token = \"a\"\nadmin_token = \"tok-secret-2\"",
                "admin_token",
            ),
            (
                "[credentials]\nsystem_user_tokn = \"EAAG-secret-x\"",
                "system_user_tokn",
            ),
        ] {
            let err = Config::from_toml(bad, no_env).unwrap_err().to_string();
            assert!(err.contains(must_show), "{err}");
            for value in ["31337000", "tok-secret-2", "EAAG-secret-x"] {
                assert!(!err.contains(value), "{err}");
            }
        }
    }

    #[test]
    fn quoted_fragments_are_kept_only_for_key_names_and_syntax() {
        assert_eq!(
            redact_quoted_values("invalid type: string \"s\\\"ecret\", expected u64"),
            "invalid type: string (value not shown), expected u64"
        );
        assert_eq!(
            redact_quoted_values("invalid type: integer `12345`, expected a string"),
            "invalid type: integer (value not shown), expected a string"
        );
        let unknown = "unknown field `x`, expected one of `listen`, `public_url`";
        assert_eq!(redact_quoted_values(unknown), unknown);
        let syntax = "invalid escape sequence\nexpected `b`, `\\`, `\"`";
        assert_eq!(redact_quoted_values(syntax), syntax);
        assert_eq!(
            redact_quoted_values("odd `unbalanced secret"),
            "odd (value not shown)"
        );
    }

    #[test]
    fn validation_errors_never_show_secrets() {
        let text = format!("{MIN}\n[upstream]\nurl = \"ftp://user:url-pass-1@graph\"\n");
        let err = Config::from_toml(&text, no_env).unwrap_err().to_string();
        assert!(err.contains("upstream.url"), "{err}");
        assert!(!err.contains("url-pass-1"), "{err}");
        // A secret pasted into an ordinary key is taken out of the message quoting it.
        let text = MIN.replace("pages = [\"1001\"]", "pages = [\"client-key-reports\"]");
        let err = Config::from_toml(&text, no_env).unwrap_err().to_string();
        assert!(err.contains("clients[0].pages"), "{err}");
        assert!(!err.contains("client-key-reports"), "{err}");
    }

    #[test]
    fn versions() {
        assert!(is_version("v21.0"));
        assert!(!is_version("v21"));
        assert!(!is_version("21.0"));
        assert!(!is_version("vx.0"));
    }
}
