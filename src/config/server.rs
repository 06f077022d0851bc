//! `[server]`: the public and admin listeners, their limits, inbound TLS.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{invalid, validate_base_url, ConfigError, Secret, DEFAULT_ADMIN_LISTEN};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawServer {
    pub(super) listen: String,
    pub(super) public_url: Option<String>,
    pub(super) admin_listen: String,
    pub(super) admin_token: Option<Secret>,
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
    worker_slice_us: u64,
    tls_cert_file: Option<String>,
    tls_key_file: Option<String>,
    tls_client_ca_file: Option<String>,
    trusted_proxies: Vec<String>,
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
            worker_slice_us: 100,
            tls_cert_file: None,
            tls_key_file: None,
            tls_client_ca_file: None,
            trusted_proxies: Vec::new(),
        }
    }
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
    /// The scheduler time slice the workers ask for (`server.worker_slice_us`; `None`: the
    /// kernel's default); why, in the server's `slice` module.
    pub worker_slice: Option<Duration>,
    pub tls: Option<TlsConfig>,
    /// Peers whose `X-Forwarded-For` names the client (`server.trusted_proxies`).
    pub trusted_proxies: Vec<IpNet>,
}

/// An address block (`10.0.0.0/8`, `2001:db8::/32`) or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for IpNet {
    type Err = String;

    fn from_str(text: &str) -> Result<IpNet, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("`{text}` is not an address or CIDR block"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{text}`: the prefix length must be 0..={max}"))?,
        };
        Ok(IpNet { addr, prefix })
    }
}

/// `10.0.0.0/8`; a single address without its prefix length.
impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let full = if self.addr.is_ipv4() { 32 } else { 128 };
        if self.prefix == full {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.prefix)
        }
    }
}

impl IpNet {
    /// Whether `ip` is in the block (an IPv4-mapped IPv6 peer counts as its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let bits = |a: IpAddr| match a {
            IpAddr::V4(a) => (u128::from(u32::from(a)) << 96, 32),
            IpAddr::V6(a) => (u128::from(a), 128),
        };
        let ((net, net_len), (other, other_len)) = (bits(self.addr), bits(ip));
        if net_len != other_len {
            return false;
        }
        let mask = u128::MAX
            .checked_shl(128 - u32::from(self.prefix))
            .unwrap_or(0);
        net & mask == other & mask
    }
}

/// Inbound TLS: PEM files, read at start and on every reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Client certificates signed by this CA authenticate `[[clients]]` with `cert_subject`.
    pub client_ca_file: Option<PathBuf>,
}

impl ServerConfig {
    /// Whether `ip` is one of `server.trusted_proxies`.
    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|n| n.contains(ip))
    }

    /// Whether client certificates are verified (against `server.tls_client_ca_file`), so
    /// `[[clients]]` may name a `cert_subject`.
    pub(super) fn verifies_client_certificates(&self) -> bool {
        self.tls
            .as_ref()
            .is_some_and(|t| t.client_ca_file.is_some())
    }
}

impl RawServer {
    pub(super) fn validate(self) -> Result<ServerConfig, ConfigError> {
        let s = self;
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
        let worker_slice = match s.worker_slice_us {
            0 => None,
            us @ 100..=100_000 => Some(Duration::from_micros(us)),
            _ => {
                return Err(invalid(
                    "server.worker_slice_us",
                    "must be 0 (the kernel's default) or 100 to 100000",
                ))
            }
        };
        let workers = match s.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let tls = match (s.tls_cert_file, s.tls_key_file) {
            (Some(cert), Some(key)) => Some(TlsConfig {
                cert_file: cert.into(),
                key_file: key.into(),
                client_ca_file: s.tls_client_ca_file.map(Into::into),
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
        let trusted_proxies = s
            .trusted_proxies
            .iter()
            .map(|t| t.parse().map_err(|e| invalid("server.trusted_proxies", e)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ServerConfig {
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
            worker_slice,
            tls,
            trusted_proxies,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{no_env, MIN};
    use super::*;
    use crate::config::Config;

    #[test]
    fn worker_slice_defaults_to_100_us_and_0_leaves_the_kernel_default() {
        let c = Config::from_toml(MIN, no_env).unwrap();
        assert_eq!(c.server.worker_slice, Some(Duration::from_micros(100)));
        let text = format!("[server]\nworker_slice_us = 0\n{MIN}");
        assert_eq!(
            Config::from_toml(&text, no_env)
                .unwrap()
                .server
                .worker_slice,
            None
        );
        for bad in [1, 99, 100_001] {
            let text = format!("[server]\nworker_slice_us = {bad}\n{MIN}");
            let err = Config::from_toml(&text, no_env).unwrap_err().to_string();
            assert!(err.contains("server.worker_slice_us"), "{err}");
        }
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
    fn trusted_proxies_are_addresses_or_blocks() {
        let text = format!(
            "[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"192.168.1.5\", \"2001:db8::/32\"]\n{MIN}"
        );
        let s = Config::from_toml(&text, no_env).unwrap().server;
        for (ip, trusted) in [
            ("10.1.2.3", true),
            ("11.0.0.1", false),
            ("192.168.1.5", true),
            ("192.168.1.6", false),
            ("::ffff:10.9.9.9", true),
            ("2001:db8:1::1", true),
            ("2001:db9::1", false),
        ] {
            assert_eq!(s.is_trusted_proxy(ip.parse().unwrap()), trusted, "{ip}");
        }
        assert!(!RawServer::default()
            .validate()
            .unwrap()
            .is_trusted_proxy("127.0.0.1".parse().unwrap()));
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        for bad in ["10.0.0.0/33", "not-an-ip", "10.0.0.0/x", "::/129"] {
            let text = format!("[server]\ntrusted_proxies = [\"{bad}\"]\n{MIN}");
            let err = Config::from_toml(&text, no_env).unwrap_err().to_string();
            assert!(err.contains("server.trusted_proxies"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_section_validates_on_its_own() {
        let s = RawServer::default().validate().unwrap();
        assert_eq!(s.public_url, "http://127.0.0.1:8080");
        assert_eq!(s.admin_listen.to_string(), DEFAULT_ADMIN_LISTEN);
        assert!(s.tls.is_none() && !s.verifies_client_certificates());
        let tls = RawServer {
            tls_cert_file: Some("c.pem".into()),
            tls_key_file: Some("k.pem".into()),
            tls_client_ca_file: Some("ca.pem".into()),
            ..RawServer::default()
        }
        .validate()
        .unwrap();
        assert_eq!(tls.public_url, "https://127.0.0.1:8080");
        assert!(tls.verifies_client_certificates());
        let err = RawServer {
            tls_client_ca_file: Some("ca.pem".into()),
            ..RawServer::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("server.tls_client_ca_file"), "{err}");
    }
}
