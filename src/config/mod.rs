//! Configuration: TOML as written by operators (`Raw*`, strict, unknown keys rejected) turned
//! into a validated [`Config`], one module per section (`server`, `upstream`, `credentials`,
//! `clients`, `cache`, `redis`, `quota`, `log`), each validating itself. Here: the whole,
//! the error type, and secrets, which live in [`Secret`], whose `Debug` never shows them.
//! `env` layers the environment and `--set` flags over the file; `effective` prints the
//! result back as TOML.

use std::fmt;
use std::path::Path;

use serde::Deserialize;

mod cache;
mod clients;
mod credentials;
pub mod effective;
pub mod env;
mod log;
mod log_level;
mod quota;
mod redis;
mod server;
mod upstream;
mod webhooks;

pub use cache::{CacheConfig, CacheRule};
pub use clients::{ClientConfig, Priority};
pub use credentials::{Credentials, ENV_APP_SECRET, ENV_SYSTEM_USER_TOKEN};
pub use log::{LogConfig, LogFormat};
pub use quota::QuotaConfig;
pub use redis::{HostPort, RedisConfig, RedisTls, RedisTopology};
pub use server::{IpNet, ServerConfig, TlsConfig};
pub use upstream::{RetryConfig, UpstreamConfig};
pub use webhooks::WebhooksConfig;

use cache::RawCache;
use clients::RawClient;
use credentials::RawCredentials;
use log::RawLog;
use quota::RawQuota;
use redis::RawRedis;
use server::RawServer;
use upstream::RawUpstream;
use webhooks::RawWebhooks;

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
// The file as written: one raw section per key, `deny_unknown_fields` everywhere so a typo is
// an error that names the key. Each section validates itself into its config type.
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
    webhooks: RawWebhooks,
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
            &self.webhooks.verify_token,
            &self.redis.password,
            &self.redis.sentinel_password,
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
    /// The Meta Webhooks endpoint, when `[webhooks] path` is set.
    pub webhooks: Option<WebhooksConfig>,
}

/// `server.admin_listen` when not set.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";

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

    /// Section by section, in file order, so the first error reported is the first in the
    /// file; clients are checked against the credentials and the server's TLS.
    fn validate(
        raw: RawConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let server = raw.server.validate()?;
        let upstream = raw.upstream.validate()?;
        let credentials = raw.credentials.validate(&env)?;
        let clients = clients::validate(raw.clients, &credentials, &server)?;
        let cache = raw.cache.validate()?;
        let quota = raw.quota.validate()?;
        let redis = raw.redis.validate()?;
        let log = raw.log.validate()?;
        let webhooks = raw.webhooks.validate(credentials.app_secret.as_ref())?;
        Ok(Config {
            server,
            upstream,
            credentials,
            clients,
            cache,
            redis,
            quota,
            log,
            webhooks,
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

    /// No environment variables (the section tests use it too).
    pub(crate) fn no_env(_: &str) -> Option<String> {
        None
    }

    /// A smallest valid configuration: a token, an app secret, one client.
    pub(crate) const MIN: &str = r#"
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
