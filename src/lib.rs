//! graphgate: a drop-in gateway in front of Meta's Graph API.
//!
//! A request flows through the tower stack of [`stack::public`], one layer per stage: load
//! shedding, trace and request id, respond, limits, parsing ([`graph`]), client keys
//! ([`auth`]), cache read-through ([`cache`]), then upstream: token injection ([`tokens`]),
//! quota ([`quota`]), the upstream client ([`upstream`]) and reply preparation ([`rewrite`]);
//! the stages share the state of [`proxy::Gateway`]. [`server`] runs it on sockets, [`admin`] serves health and
//! metrics. With the `demo` feature, `testkit` starts the simulated Graph API (the
//! `fake-graph` crate) with graphgate in front of it, for the demo, tests and benches.
pub mod admin;
pub mod allocator;
pub mod auth;
pub mod cache;
pub mod config;
pub mod error;
pub mod graph;
pub mod metrics;
#[cfg(feature = "otlp")]
pub mod otlp;
pub mod proxy;
pub mod quota;
pub mod redis_conn;
pub mod rewrite;
pub mod server;
pub mod stack;
#[cfg(feature = "demo")]
pub mod testkit;
pub mod tls;
pub mod tokens;
pub mod tracecontext;
pub mod upstream;
pub mod webhooks;
