//! `[redis]`: with a `url` (or `cluster_nodes`, or `sentinels`), replicas share cache entries,
//! Page budgets, invalidations and fill leases through it (see `redis_conn`); without one
//! graphgate is a single node.
//!
//! Three topologies: one server (`redis://`, `rediss://`, `unix://`), a Redis Cluster
//! (`redis+cluster://h1:p1,h2:p2` or `cluster_nodes`) and a primary watched by Sentinel
//! (`redis+sentinel://h1:p1,h2:p2/mymaster` or `sentinels` + `master_name`). TLS with a
//! `rediss` scheme or `tls = true`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{invalid, ConfigError, Secret};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRedis {
    pub(super) url: Option<Secret>,
    cluster_nodes: Vec<String>,
    sentinels: Vec<String>,
    master_name: Option<String>,
    username: Option<String>,
    pub(super) password: Option<Secret>,
    pub(super) sentinel_password: Option<Secret>,
    tls: bool,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    // Scale-out: keys, tight timeouts, degraded budgets.
    key_prefix: String,
    timeout_ms: u64,
    local_budget_fraction: Option<f64>,
}

impl Default for RawRedis {
    fn default() -> Self {
        RawRedis {
            url: None,
            cluster_nodes: Vec::new(),
            sentinels: Vec::new(),
            master_name: None,
            username: None,
            password: None,
            sentinel_password: None,
            tls: false,
            ca_file: None,
            cert_file: None,
            key_file: None,
            key_prefix: "gg:".into(),
            timeout_ms: 50,
            local_budget_fraction: None,
        }
    }
}

/// A `host:port` of a Cluster node or a Sentinel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Where Redis is and how it is laid out.
#[derive(Debug, Clone)]
pub enum RedisTopology {
    /// One server: a `redis://`, `rediss://` or `unix://` URL (it may carry a password).
    Single(Secret),
    /// A Redis Cluster, reached through any of these nodes.
    Cluster(Vec<HostPort>),
    /// The primary these Sentinels elect for `master_name`.
    Sentinel {
        sentinels: Vec<HostPort>,
        master_name: String,
    },
}

/// TLS towards Redis: the public roots plus `ca_file`, and a client certificate if given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// As written (may carry a password, hence a secret); `None` with `cluster_nodes` or
    /// `sentinels`.
    pub url: Option<Secret>,
    /// `None`: Redis is not configured, graphgate is a single node.
    pub topology: Option<RedisTopology>,
    /// TLS to Redis (and to the Sentinels): a `rediss` scheme or `tls = true`.
    pub tls: Option<RedisTls>,
    /// Credentials for the Redis servers (Cluster nodes, the Sentinel-elected primary); from
    /// the keys, else from the URL.
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// The Sentinels' own password (`requirepass` in sentinel.conf), if any.
    pub sentinel_password: Option<Secret>,
    /// Prepended to every key and channel, so several fleets (or tests) share one Redis.
    pub key_prefix: String,
    /// Every Redis command gives up after this; Redis must never slow a request down much.
    pub timeout: Duration,
    /// Share of each Page budget a replica uses on its own while Redis is unreachable;
    /// unset: one over the replicas last seen alive (heartbeats in Redis).
    pub local_budget_fraction: Option<f64>,
}

impl RedisConfig {
    pub fn is_configured(&self) -> bool {
        self.topology.is_some()
    }
}

/// `host:port` or `[v6]:port`.
fn host_port(s: &str) -> Option<HostPort> {
    let (host, port) = s.trim().rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .map_or(Some(host), |h| h.strip_suffix(']'))?;
    let port = port.parse::<u16>().ok().filter(|p| *p > 0)?;
    if host.is_empty() || host.contains(['/', '@', ' ', ',', '[', ']']) {
        return None;
    }
    Some(HostPort {
        host: host.to_string(),
        port,
    })
}

fn host_ports(key: &str, list: &[String]) -> Result<Vec<HostPort>, ConfigError> {
    if list.is_empty() || list.len() > 64 {
        return Err(invalid(key, "needs 1 to 64 host:port entries"));
    }
    list.iter()
        .map(|s| host_port(s).ok_or_else(|| invalid(key, "entries are host:port")))
        .collect()
}

fn decoded(s: &str) -> Option<String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
        .filter(|s| !s.is_empty())
}

/// A `redis+cluster://` or `redis+sentinel://` URL taken apart: credentials, the hosts, the
/// path (the Sentinel master name).
struct MultiUrl {
    username: Option<String>,
    password: Option<String>,
    hosts: Vec<HostPort>,
    path: String,
}

fn multi_url(rest: &str) -> Option<MultiUrl> {
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (username, password) = match userinfo.map(|u| u.split_once(':').unwrap_or((u, ""))) {
        Some((u, p)) => (decoded(u), decoded(p)),
        None => (None, None),
    };
    let hosts = hosts
        .split(',')
        .map(host_port)
        .collect::<Option<Vec<_>>>()?;
    if hosts.is_empty() || path.contains(['?', '#']) {
        return None;
    }
    Some(MultiUrl {
        username,
        password,
        hosts,
        path: path.to_string(),
    })
}

fn master_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl RawRedis {
    pub(super) fn validate(self) -> Result<RedisConfig, ConfigError> {
        if self.timeout_ms == 0 || self.timeout_ms > 10_000 {
            return Err(invalid("redis.timeout_ms", "must be 1..=10000"));
        }
        if self
            .local_budget_fraction
            .is_some_and(|f| !(f > 0.0 && f <= 1.0))
        {
            return Err(invalid("redis.local_budget_fraction", "must be in (0, 1]"));
        }
        if self.key_prefix.len() > 64 || self.key_prefix.contains(['{', '}', ' ']) {
            return Err(invalid(
                "redis.key_prefix",
                "at most 64 characters, without braces or spaces",
            ));
        }
        let url = self.url.filter(|u| !u.is_empty());
        let given = [
            url.is_some(),
            !self.cluster_nodes.is_empty(),
            !self.sentinels.is_empty(),
        ];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err(invalid(
                "redis.url",
                "give one of url, cluster_nodes and sentinels",
            ));
        }
        let mut tls = self.tls;
        let mut username = self.username.filter(|u| !u.is_empty());
        let mut password = self.password.filter(|p| !p.is_empty());
        let mut master_name = self.master_name.filter(|m| !m.is_empty());
        let topology = if let Some(u) = &url {
            let u = u.expose();
            let (scheme, rest) = u.split_once("://").unwrap_or(("", ""));
            match scheme {
                "redis" | "unix" if tls => {
                    return Err(invalid("redis.tls", "use a rediss:// URL for TLS"));
                }
                "redis" | "unix" => Some(RedisTopology::Single(Secret::new(u))),
                "rediss" => {
                    tls = true;
                    Some(RedisTopology::Single(Secret::new(u)))
                }
                "redis+cluster" | "rediss+cluster" | "redis+sentinel" | "rediss+sentinel" => {
                    tls |= scheme.starts_with("rediss");
                    let m = multi_url(rest).ok_or_else(|| {
                        invalid(
                            "redis.url",
                            "expected scheme://[user:password@]host:port,host:port[/master]",
                        )
                    })?;
                    username = username.or(m.username);
                    password = password.or(m.password.map(Secret::new));
                    if scheme.ends_with("cluster") {
                        if !m.path.is_empty() {
                            return Err(invalid("redis.url", "a cluster URL has no path"));
                        }
                        Some(RedisTopology::Cluster(m.hosts))
                    } else {
                        if !m.path.is_empty() {
                            if master_name.as_ref().is_some_and(|n| *n != m.path) {
                                return Err(invalid(
                                    "redis.master_name",
                                    "differs from the master name in redis.url",
                                ));
                            }
                            master_name = Some(m.path);
                        }
                        let name = master_name.clone().ok_or_else(|| {
                            invalid("redis.master_name", "a Sentinel URL needs a master name")
                        })?;
                        Some(RedisTopology::Sentinel {
                            sentinels: m.hosts,
                            master_name: name,
                        })
                    }
                }
                _ => {
                    return Err(invalid(
                        "redis.url",
                        "must start with redis://, rediss://, unix://, redis+cluster://, \
                         rediss+cluster://, redis+sentinel:// or rediss+sentinel://",
                    ))
                }
            }
        } else if !self.cluster_nodes.is_empty() {
            Some(RedisTopology::Cluster(host_ports(
                "redis.cluster_nodes",
                &self.cluster_nodes,
            )?))
        } else if !self.sentinels.is_empty() {
            let sentinels = host_ports("redis.sentinels", &self.sentinels)?;
            let master_name = master_name
                .clone()
                .ok_or_else(|| invalid("redis.master_name", "needed with redis.sentinels"))?;
            Some(RedisTopology::Sentinel {
                sentinels,
                master_name,
            })
        } else {
            None
        };
        match &topology {
            Some(RedisTopology::Sentinel { master_name, .. }) if !master_name_ok(master_name) => {
                return Err(invalid(
                    "redis.master_name",
                    "letters, digits, '-', '_' and '.' only",
                ));
            }
            Some(RedisTopology::Sentinel { .. }) => {}
            _ if master_name.is_some() => {
                return Err(invalid("redis.master_name", "only with Sentinel"));
            }
            _ if self.sentinel_password.is_some() => {
                return Err(invalid("redis.sentinel_password", "only with Sentinel"));
            }
            _ => {}
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(invalid(
                "redis.cert_file",
                "cert_file and key_file go together",
            ));
        }
        let files = self.ca_file.is_some() || self.cert_file.is_some();
        if files && !tls {
            return Err(invalid(
                "redis.ca_file",
                "needs TLS: a rediss scheme or tls = true",
            ));
        }
        Ok(RedisConfig {
            url,
            tls: tls.then_some(RedisTls {
                ca_file: self.ca_file,
                cert_file: self.cert_file,
                key_file: self.key_file,
            }),
            topology,
            username,
            password,
            sentinel_password: self.sentinel_password.filter(|p| !p.is_empty()),
            key_prefix: self.key_prefix,
            timeout: Duration::from_millis(self.timeout_ms),
            local_budget_fraction: self.local_budget_fraction,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{no_env, MIN};
    use crate::config::Config;

    use super::*;

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
            "url = \"rediss+cluster://\"",
            "url = \"redis+cluster://a:1,b\"",
            "url = \"redis+cluster://a:1/x\"",
            "url = \"redis+sentinel://a:1\"",
            "url = \"redis+sentinel://a:1/bad name\"",
            "url = \"redis://a:1\"\ncluster_nodes = [\"a:1\"]",
            "cluster_nodes = [\"nohost\"]",
            "sentinels = [\"s:26379\"]",
            "master_name = \"m\"",
            "url = \"redis://a:1\"\nsentinel_password = \"x\"",
            "url = \"redis://a:1\"\nca_file = \"/ca.pem\"",
            "url = \"rediss://a:1\"\ncert_file = \"/c.pem\"",
            "url = \"unix:///r.sock\"\ntls = true",
            "url = \"redis://a:1\"\ntls = true",
        ] {
            let text = format!("{MIN}\n[redis]\n{bad}\n");
            let err = Config::from_toml(&text, no_env).unwrap_err().to_string();
            assert!(err.contains("redis."), "{bad}: {err}");
        }
    }

    #[test]
    fn topologies_and_tls_from_urls_or_keys() {
        let parse = |body: &str| {
            Config::from_toml(&format!("{MIN}\n[redis]\n{body}\n"), no_env)
                .unwrap()
                .redis
        };
        let r = parse("url = \"rediss://:pw-secret@r:6380\"\nca_file = \"/ca.pem\"");
        assert!(matches!(r.topology, Some(RedisTopology::Single(_))));
        let tls = r.tls.expect("tls");
        assert_eq!(
            tls.ca_file.as_deref(),
            Some(std::path::Path::new("/ca.pem"))
        );

        let r = parse("url = \"redis+cluster://u:p%40ss@h1:7000,[::1]:7001\"");
        let Some(RedisTopology::Cluster(nodes)) = &r.topology else {
            panic!("{r:?}")
        };
        assert_eq!(nodes[1].to_string(), "[::1]:7001");
        assert_eq!(r.username.as_deref(), Some("u"));
        assert_eq!(r.password.as_ref().map(Secret::expose), Some("p@ss"));
        assert!(r.tls.is_none());
        assert!(!format!("{r:?}").contains("p@ss"));

        let r = parse("cluster_nodes = [\"h1:7000\"]\ntls = true\npassword = \"k\"");
        assert!(matches!(r.topology, Some(RedisTopology::Cluster(ref n)) if n.len() == 1));
        assert!(r.tls.is_some());

        let r = parse("url = \"rediss+sentinel://s1:26379,s2:26379/mymaster\"");
        let Some(RedisTopology::Sentinel {
            sentinels,
            master_name,
        }) = &r.topology
        else {
            panic!("{r:?}")
        };
        assert_eq!((sentinels.len(), master_name.as_str()), (2, "mymaster"));
        assert!(r.tls.is_some());

        let r =
            parse("sentinels = [\"s1:26379\"]\nmaster_name = \"m1\"\nsentinel_password = \"sp\"");
        assert!(matches!(r.topology, Some(RedisTopology::Sentinel { .. })));
        assert_eq!(r.sentinel_password.as_ref().map(Secret::expose), Some("sp"));
    }

    #[test]
    fn an_empty_url_means_no_redis() {
        let r = RawRedis {
            url: Some(Secret::new("")),
            ..RawRedis::default()
        }
        .validate()
        .unwrap();
        assert!(r.url.is_none());
        assert!(!r.is_configured());
    }
}
