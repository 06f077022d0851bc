//! The simulated Graph API with graphgate in front of it, on free loopback ports: the one
//! set-up the demo, the integration tests, the benches and the examples share.
//!
//! [`Credentials`] say which tokens the simulated Graph accepts and which clients graphgate
//! knows; from them come the simulated Graph's configuration and graphgate's (TOML with the
//! caller's extra keys merged over it key by key); [`Stack`] starts both and shuts both down.
//! Compiled with the `demo` feature only: the production binary holds no simulated Graph.

use std::net::SocketAddr;

use fake_graph::{FakeGraph, FakeGraphConfig};

use crate::config::Config;
use crate::server::{self, Running};

/// The system-user token of the standard test set-up.
pub const SYSTEM_TOKEN: &str = "EAAG-test-system-user-token-0001";
/// The app secret of the standard test set-up (so every call carries `appsecret_proof`).
pub const APP_SECRET: &str = "test-app-secret-0001";
/// Client key of `admin`: read/write, every Page.
pub const ADMIN_KEY: &str = "key-admin-all-pages";
/// Client key of `reader`: read-only, Page 1001 only.
pub const READER_KEY: &str = "key-reader-1001";
/// Bearer token of the standard set-up's `/admin/*` endpoints.
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// A `[[clients]]` entry.
#[derive(Clone)]
pub struct TestClient {
    pub name: String,
    pub key: String,
    /// Page ids, or `["*"]` for every Page.
    pub pages: Vec<String>,
    pub write: bool,
}

impl TestClient {
    pub fn new(name: &str, key: &str, pages: &[&str], write: bool) -> TestClient {
        TestClient {
            name: name.to_string(),
            key: key.to_string(),
            pages: pages.iter().map(|p| p.to_string()).collect(),
            write,
        }
    }
}

/// What the simulated Graph accepts and graphgate holds: the system-user token and app
/// secret on both sides, graphgate's admin token and clients. No `Debug`: these are secrets
/// to graphgate, and tests check that secrets never show.
#[derive(Clone)]
pub struct Credentials {
    pub system_user_token: String,
    pub app_secret: String,
    pub admin_token: Option<String>,
    pub clients: Vec<TestClient>,
}

impl Credentials {
    /// The integration tests' set-up: [`SYSTEM_TOKEN`], [`APP_SECRET`], [`ADMIN_TOKEN`], and
    /// two clients, `admin` ([`ADMIN_KEY`]) and `reader` ([`READER_KEY`]).
    pub fn standard() -> Credentials {
        Credentials {
            system_user_token: SYSTEM_TOKEN.to_string(),
            app_secret: APP_SECRET.to_string(),
            admin_token: Some(ADMIN_TOKEN.to_string()),
            clients: vec![
                TestClient::new("admin", ADMIN_KEY, &["*"], true),
                TestClient::new("reader", READER_KEY, &["1001"], false),
            ],
        }
    }

    /// The simulated Graph's default configuration (Pages 1001 and 1002, Graph's limits)
    /// accepting these credentials.
    pub fn graph_config(&self) -> FakeGraphConfig {
        FakeGraphConfig {
            system_user_tokens: vec![self.system_user_token.clone()],
            app_secret: Some(self.app_secret.clone()),
            ..FakeGraphConfig::default()
        }
    }

    /// graphgate's configuration in front of `upstream`: both listeners on free loopback
    /// ports, a 3 s upstream timeout, these credentials and clients; `extra` (TOML) is
    /// merged over it key by key, so `"[upstream]\ntimeout_ms = 200"` changes one key and
    /// keeps the URL.
    pub fn gateway_toml(&self, upstream: &str, extra: &str) -> Result<String, String> {
        let mut server = toml::Table::new();
        server.insert("listen".into(), "127.0.0.1:0".into());
        server.insert("admin_listen".into(), "127.0.0.1:0".into());
        if let Some(token) = &self.admin_token {
            server.insert("admin_token".into(), token.as_str().into());
        }
        let mut upstream_table = toml::Table::new();
        upstream_table.insert("url".into(), upstream.into());
        upstream_table.insert("timeout_ms".into(), 3000.into());
        let mut credentials = toml::Table::new();
        credentials.insert(
            "system_user_token".into(),
            self.system_user_token.as_str().into(),
        );
        credentials.insert("app_secret".into(), self.app_secret.as_str().into());
        let clients: Vec<toml::Value> = self
            .clients
            .iter()
            .map(|c| {
                let mut t = toml::Table::new();
                t.insert("name".into(), c.name.as_str().into());
                t.insert("key".into(), c.key.as_str().into());
                t.insert("pages".into(), c.pages.clone().into());
                if c.write {
                    t.insert("write".into(), true.into());
                }
                toml::Value::Table(t)
            })
            .collect();
        let mut table = toml::Table::new();
        table.insert("server".into(), server.into());
        table.insert("upstream".into(), upstream_table.into());
        table.insert("credentials".into(), credentials.into());
        table.insert("clients".into(), clients.into());
        let extra: toml::Table = extra
            .parse()
            .map_err(|e| format!("extra configuration: {e}"))?;
        merge_toml(&mut table, extra);
        Ok(table.to_string())
    }

    /// [`Credentials::gateway_toml`], validated.
    pub fn gateway_config(&self, upstream: &str, extra: &str) -> Result<Config, String> {
        let text = self.gateway_toml(upstream, extra)?;
        Config::from_toml(&text, |_| None).map_err(|e| e.to_string())
    }
}

/// Merges `from` into `into`: tables key by key (recursively), any other value replaced
/// (an array of `[[clients]]` in `from` replaces the clients).
pub fn merge_toml(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge_toml(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// The simulated Graph API and a graphgate in front of it.
pub struct Stack {
    pub graph: FakeGraph,
    pub gateway: Running,
}

impl Stack {
    /// Starts the simulated Graph (`graph`) on a free loopback port and graphgate in front of
    /// it with [`Credentials::gateway_toml`]`(graph url, extra)`.
    pub async fn start(
        credentials: &Credentials,
        graph: FakeGraphConfig,
        extra: &str,
    ) -> Result<Stack, String> {
        Stack::start_on(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            credentials,
            graph,
            extra,
        )
        .await
    }

    /// [`Stack::start`] with the simulated Graph on `graph_listen`.
    pub async fn start_on(
        graph_listen: SocketAddr,
        credentials: &Credentials,
        graph: FakeGraphConfig,
        extra: &str,
    ) -> Result<Stack, String> {
        let graph = FakeGraph::start(graph, graph_listen)
            .await
            .map_err(|e| format!("cannot start the simulated Graph API on {graph_listen}: {e}"))?;
        let config = match credentials.gateway_config(&graph.url(), extra) {
            Ok(config) => config,
            Err(e) => {
                graph.shutdown();
                return Err(format!("graphgate configuration: {e}"));
            }
        };
        match server::start(config).await {
            Ok(gateway) => Ok(Stack { graph, gateway }),
            Err(e) => {
                graph.shutdown();
                // Names the address and key (`cannot listen on ... (server.listen)`).
                Err(e.to_string())
            }
        }
    }

    /// Drains graphgate, then stops the simulated Graph.
    pub async fn shutdown(self) {
        self.gateway.shutdown().await;
        self.graph.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_keys_merge_into_the_base_key_by_key() {
        let creds = Credentials::standard();
        let text = creds
            .gateway_toml(
                "http://127.0.0.1:9",
                "[upstream]\ntimeout_ms = 200\n[cache]\ndefault_ttl_s = 7\n",
            )
            .unwrap();
        let config = Config::from_toml(&text, |_| None).unwrap();
        assert_eq!(config.upstream.url, "http://127.0.0.1:9");
        assert_eq!(config.upstream.timeout.as_millis(), 200);
        assert_eq!(config.cache.default_ttl.as_secs(), 7);
        assert_eq!(config.clients.len(), 2);
        assert_eq!(config.credentials.system_user_token.expose(), SYSTEM_TOKEN);
        assert!(config.server.admin_token.is_some());
        // Clients given in `extra` replace the standard ones.
        let one = creds
            .gateway_toml(
                "http://127.0.0.1:9",
                "[[clients]]\nname = \"x\"\nkey = \"key-xxxxxxxx\"\npages = [\"*\"]\n",
            )
            .unwrap();
        let config = Config::from_toml(&one, |_| None).unwrap();
        assert_eq!(config.clients.len(), 1);
        assert_eq!(config.clients[0].name, "x");
    }

    #[test]
    fn bad_extra_toml_is_an_error_not_a_panic() {
        let err = Credentials::standard()
            .gateway_toml("http://127.0.0.1:9", "[upstream")
            .unwrap_err();
        assert!(err.contains("extra configuration"), "{err}");
    }

    #[tokio::test]
    async fn a_read_through_the_stack_reaches_the_simulated_graph_with_the_token() {
        let creds = Credentials::standard();
        let stack = Stack::start(&creds, creds.graph_config(), "")
            .await
            .unwrap();
        let addr = stack.gateway.addr;
        let reply = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut conn = std::net::TcpStream::connect(addr).unwrap();
            write!(
                conn,
                "GET /v21.0/1001?fields=name&access_token={READER_KEY} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut reply = String::new();
            conn.read_to_string(&mut reply).unwrap();
            reply
        })
        .await
        .unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.contains("Acme Coffee"), "{reply}");
        let received = stack.graph.requests();
        assert_eq!(received.len(), 1);
        assert_eq!(received[0].access_token.as_deref(), Some(SYSTEM_TOKEN));
        assert!(received[0].appsecret_proof.is_some());
        stack.shutdown().await;
    }
}
