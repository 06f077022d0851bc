//! End-to-end tests: graphgate and the simulated Graph API on real loopback sockets.
//! One test binary (faster to build and link); each module covers one capability.
mod support;

mod alert_rules;
mod authorization;
mod bounds;
mod cache;
mod cli;
mod config_layers;
mod config_secrets;
mod core;
mod dashboard;
mod deploy;
mod fleet_admin;
mod hardening;
mod layering;
mod observability;
mod projection;
mod quota;
mod recall;
mod redis;
mod redis_topologies;
mod security;
mod trace_context;
mod webhooks;
