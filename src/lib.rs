//! graphgate: a drop-in gateway in front of Meta's Graph API.
//!
//! A request flows through [`proxy::Gateway::handle`]: limits, parsing ([`graph`]), client
//! keys ([`auth`]), token injection ([`tokens`]), the upstream client ([`upstream`]) and
//! reply preparation ([`rewrite`]). [`server`] runs it on sockets, [`admin`] serves health and
//! metrics, [`fake_graph`] simulates Graph for the demo, tests and benches.
pub mod admin;
pub mod auth;
pub mod cache;
pub mod config;
pub mod error;
pub mod fake_graph;
pub mod graph;
pub mod metrics;
pub mod proxy;
pub mod quota;
pub mod redis_conn;
pub mod rewrite;
pub mod server;
pub mod tls;
pub mod tokens;
pub mod upstream;
