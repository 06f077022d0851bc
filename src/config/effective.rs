//! The effective configuration as TOML, for `graphgate check-config`: every key with the
//! value in force after defaults, the environment and flags, in the file's own key names,
//! so it can be compared with (or pasted into) a file. Secrets are replaced by
//! `"[redacted]"`; a Redis URL keeps its host but loses its user information.

use std::time::Duration;

use toml::{Table, Value};

use super::{
    without_userinfo, Config, HostPort, LogFormat, Priority, RedisTopology, Secret, REDACTED,
};

fn ms(d: Duration) -> Value {
    Value::Integer(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn secs(d: Duration) -> Value {
    Value::Integer(i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn int(n: impl TryInto<i64>) -> Value {
    Value::Integer(n.try_into().unwrap_or(i64::MAX))
}

fn string(s: impl Into<String>) -> Value {
    Value::String(s.into())
}

fn redacted() -> Value {
    string(REDACTED)
}

/// Builds a table from `(key, value)` pairs, leaving out the `None`s (unset optional keys).
fn table<const N: usize>(entries: [(&str, Option<Value>); N]) -> Value {
    Value::Table(
        entries
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_string(), v?)))
            .collect::<Table>(),
    )
}

fn path(p: &Option<std::path::PathBuf>) -> Option<Value> {
    p.as_ref().map(|p| string(p.display().to_string()))
}

fn host_list(hosts: &[HostPort]) -> Value {
    Value::Array(hosts.iter().map(|h| string(h.to_string())).collect())
}

fn secret(s: &Option<Secret>) -> Option<Value> {
    s.as_ref().map(|_| redacted())
}

/// The effective configuration as a TOML document.
pub fn to_toml(c: &Config) -> String {
    let s = &c.server;
    let tls = s.tls.as_ref();
    let server = table([
        ("listen", Some(string(s.listen.to_string()))),
        ("public_url", Some(string(&s.public_url))),
        ("admin_listen", Some(string(s.admin_listen.to_string()))),
        ("admin_token", secret(&s.admin_token)),
        ("header_read_timeout_ms", Some(ms(s.header_read_timeout))),
        ("max_header_bytes", Some(int(s.max_header_bytes))),
        ("max_body_bytes", Some(int(s.max_body_bytes))),
        ("shutdown_grace_ms", Some(ms(s.shutdown_grace))),
        ("max_connections", Some(int(s.max_connections))),
        ("admin_max_connections", Some(int(s.admin_max_connections))),
        ("idle_timeout_ms", Some(ms(s.idle_timeout))),
        ("max_in_flight", Some(int(s.max_in_flight))),
        ("body_read_timeout_ms", Some(ms(s.body_read_timeout))),
        ("workers", Some(int(s.workers))),
        (
            "worker_slice_us",
            Some(int(s.worker_slice.map_or(0, |d| d.as_micros()))),
        ),
        ("tls_cert_file", path(&tls.map(|t| t.cert_file.clone()))),
        ("tls_key_file", path(&tls.map(|t| t.key_file.clone()))),
        (
            "tls_client_ca_file",
            path(&tls.and_then(|t| t.client_ca_file.clone())),
        ),
        (
            "trusted_proxies",
            Some(Value::Array(
                s.trusted_proxies
                    .iter()
                    .map(|n| string(n.to_string()))
                    .collect(),
            )),
        ),
    ]);
    let u = &c.upstream;
    let upstream = table([
        ("url", Some(string(without_userinfo(&u.url)))),
        ("timeout_ms", Some(ms(u.timeout))),
        ("connect_timeout_ms", Some(ms(u.connect_timeout))),
        ("max_get_url_bytes", Some(int(u.max_get_url_bytes))),
        ("max_response_bytes", Some(int(u.max_response_bytes))),
        (
            "max_buffered_reply_bytes",
            Some(int(u.max_buffered_reply_bytes)),
        ),
        ("default_version", Some(string(&u.default_version))),
        ("ca_file", path(&u.ca_file)),
        ("retries", Some(int(u.retry.retries))),
        ("retry_budget_percent", Some(int(u.retry.budget_percent))),
        (
            "retry_budget_min_per_s",
            Some(int(u.retry.budget_min_per_s)),
        ),
        ("retry_backoff_ms", Some(ms(u.retry.backoff))),
        ("breaker_failures", Some(int(u.retry.breaker_failures))),
        ("breaker_cooldown_ms", Some(ms(u.retry.breaker_cooldown))),
    ]);
    let cr = &c.credentials;
    let credentials = table([
        ("system_user_token", Some(redacted())),
        ("app_secret", secret(&cr.app_secret)),
        ("page_tokens", Some(Value::Boolean(cr.page_tokens))),
    ]);
    let clients = Value::Array(
        c.clients
            .iter()
            .map(|cl| {
                let pages = match &cl.pages {
                    None => vec![string("*")],
                    Some(p) => p.iter().map(string).collect(),
                };
                let priority = match cl.priority {
                    Priority::Interactive => "interactive",
                    Priority::Batch => "batch",
                };
                table([
                    ("name", Some(string(&cl.name))),
                    ("key", cl.key_sha256.map(|_| redacted())),
                    ("cert_subject", cl.cert_subject.as_ref().map(string)),
                    ("pages", Some(Value::Array(pages))),
                    ("write", Some(Value::Boolean(cl.write))),
                    ("priority", Some(string(priority))),
                ])
            })
            .collect(),
    );
    let ca = &c.cache;
    let rules = ca
        .rules
        .iter()
        .map(|r| {
            table([
                ("match", Some(string(&r.pattern))),
                ("ttl_s", Some(secs(r.ttl))),
            ])
        })
        .collect();
    let cache = table([
        ("max_bytes", Some(int(ca.max_bytes))),
        ("default_ttl_s", Some(secs(ca.default_ttl))),
        (
            "stale_while_revalidate_s",
            Some(secs(ca.stale_while_revalidate)),
        ),
        ("stale_if_error_s", Some(secs(ca.stale_if_error))),
        ("compress", Some(Value::Boolean(ca.compress))),
        ("project_fields", Some(Value::Boolean(ca.project_fields))),
        ("recall_hits", Some(Value::Boolean(ca.recall_hits))),
        (
            "union_window_ms",
            Some(int(ca.union_window.as_millis() as u64)),
        ),
        (
            "merge_window_ms",
            Some(int(ca.merge_window.as_millis() as u64)),
        ),
        ("rules", Some(Value::Array(rules))),
    ]);
    let r = &c.redis;
    let redis = table([
        (
            "url",
            r.url.as_ref().map(|u| string(without_userinfo(u.expose()))),
        ),
        (
            "cluster_nodes",
            match (&r.url, &r.topology) {
                (None, Some(RedisTopology::Cluster(nodes))) => Some(host_list(nodes)),
                _ => None,
            },
        ),
        (
            "sentinels",
            match (&r.url, &r.topology) {
                (None, Some(RedisTopology::Sentinel { sentinels, .. })) => {
                    Some(host_list(sentinels))
                }
                _ => None,
            },
        ),
        (
            "master_name",
            match &r.topology {
                Some(RedisTopology::Sentinel { master_name, .. }) => Some(string(master_name)),
                _ => None,
            },
        ),
        ("username", r.username.as_ref().map(string)),
        ("password", secret(&r.password)),
        ("sentinel_password", secret(&r.sentinel_password)),
        ("tls", Some(Value::Boolean(r.tls.is_some()))),
        (
            "ca_file",
            path(&r.tls.as_ref().and_then(|t| t.ca_file.clone())),
        ),
        (
            "cert_file",
            path(&r.tls.as_ref().and_then(|t| t.cert_file.clone())),
        ),
        (
            "key_file",
            path(&r.tls.as_ref().and_then(|t| t.key_file.clone())),
        ),
        ("key_prefix", Some(string(&r.key_prefix))),
        ("timeout_ms", Some(ms(r.timeout))),
        (
            "local_budget_fraction",
            r.local_budget_fraction.map(Value::Float),
        ),
    ]);
    let q = &c.quota;
    let pages = q
        .pages
        .iter()
        .map(|(id, calls)| table([("id", Some(string(id))), ("page_calls", Some(int(*calls)))]))
        .collect();
    let quota = table([
        ("page_calls", Some(int(q.page_calls))),
        ("page_window_s", Some(secs(q.page_window))),
        ("headroom_pct", Some(int(q.headroom_pct))),
        (
            "slowdown_threshold_pct",
            Some(int(q.slowdown_threshold_pct)),
        ),
        ("app_calls", Some(int(q.app_calls))),
        ("learn_limits", Some(Value::Boolean(q.learn_limits))),
        ("metrics_top_pages", Some(int(q.metrics_top_pages))),
        ("max_buckets", Some(int(q.max_buckets))),
        ("queue_timeout_ms", Some(ms(q.queue_timeout))),
        ("max_queue_depth", Some(int(q.max_queue_depth))),
        ("pages", Some(Value::Array(pages))),
    ]);
    let format = match c.log.format {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    };
    let log = table([
        ("format", Some(string(format))),
        ("level", Some(string(&c.log.level))),
        ("otlp_endpoint", c.log.otlp_endpoint.as_deref().map(string)),
        ("otlp_service_name", Some(string(&c.log.otlp_service_name))),
    ]);
    let webhooks = c.webhooks.as_ref().map(|w| {
        table([
            ("path", Some(string(&w.path))),
            ("verify_token", Some(redacted())),
            ("max_age_s", Some(secs(w.max_age))),
        ])
    });
    let Value::Table(doc) = table([
        ("server", Some(server)),
        ("upstream", Some(upstream)),
        ("credentials", Some(credentials)),
        ("clients", Some(clients)),
        ("cache", Some(cache)),
        ("redis", Some(redis)),
        ("quota", Some(quota)),
        ("log", Some(log)),
        ("webhooks", webhooks),
    ]) else {
        return String::new();
    };
    toml::to_string_pretty(&doc).unwrap_or_else(|e| format!("# cannot print as TOML: {e}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key the documented file shows (set or commented out), as `section.key`.
    fn documented_keys() -> std::collections::BTreeSet<String> {
        let text = include_str!("../../config/graphgate.toml");
        let mut section = String::new();
        let mut out = std::collections::BTreeSet::new();
        for line in text.lines() {
            let l = line.trim_start_matches('#').trim();
            let header = l.trim_start_matches('[').trim_end_matches(']');
            if l.starts_with('[')
                && l.ends_with(']')
                && header
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'.')
            {
                section = header.to_string();
            } else if let Some((key, _)) = l.split_once(" = ") {
                if !key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                    out.insert(
                        format!("{section}.{key}")
                            .trim_start_matches('.')
                            .to_string(),
                    );
                }
            }
        }
        out
    }

    /// `section.key` of every key row in docs/configuration.md (`## [section]` headings, rows
    /// starting with a backquoted key).
    fn reference_keys() -> std::collections::BTreeSet<String> {
        let text = include_str!("../../docs/configuration.md");
        let mut section = String::new();
        let mut out = std::collections::BTreeSet::new();
        for line in text.lines() {
            if let Some(h) = line.strip_prefix("## ") {
                section = h.trim_matches(|c| c == '[' || c == ']').to_string();
                if !section
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'.')
                {
                    section.clear();
                }
            } else if let Some(rest) = line.strip_prefix("| `") {
                if let Some((key, _)) = rest.split_once('`') {
                    out.insert(
                        format!("{section}.{key}")
                            .trim_start_matches('.')
                            .to_string(),
                    );
                }
            }
        }
        out
    }

    #[test]
    fn the_configuration_reference_lists_every_key_of_the_example_file() {
        assert_eq!(reference_keys(), documented_keys());
    }

    fn printed_keys(doc: &Table, prefix: &str, out: &mut std::collections::BTreeSet<String>) {
        for (k, v) in doc {
            let name = format!("{prefix}{k}");
            match v {
                Value::Table(t) => printed_keys(t, &format!("{name}."), out),
                Value::Array(a) if a.first().is_some_and(Value::is_table) => {
                    for item in a {
                        if let Value::Table(t) = item {
                            printed_keys(t, &format!("{name}."), out);
                        }
                    }
                }
                _ => {
                    out.insert(name);
                }
            }
        }
    }

    const FULL: &str = r#"
        [server]
        admin_token = "admin-token-secret"
        tls_cert_file = "/c.pem"
        tls_key_file = "/k.pem"
        tls_client_ca_file = "/ca.pem"
        trusted_proxies = ["10.0.0.0/8", "192.168.1.5"]
        [upstream]
        ca_file = "/egress.pem"
        [credentials]
        system_user_token = "EAAB-system-token-secret"
        app_secret = "app-secret-secret"
        [[clients]]
        name = "reports"
        key = "client-key-secret"
        cert_subject = "svc"
        pages = ["1001"]
        [[cache.rules]]
        match = "/*/feed"
        ttl_s = 15
        [redis]
        url = "rediss://:redis-password-secret@redis:6379"
        username = "gateway"
        password = "redis-password-key-secret"
        ca_file = "/redis-ca.pem"
        cert_file = "/redis-client.pem"
        key_file = "/redis-client-key.pem"
        local_budget_fraction = 0.5
        [quota]
        app_calls = 100
        [[quota.pages]]
        id = "1001"
        page_calls = 50
        [webhooks]
        path = "/webhooks"
        verify_token = "verify-token-secret"
    "#;

    #[test]
    fn prints_every_documented_key_and_no_secret() {
        // Only a build with the `otlp` feature takes an OTLP endpoint.
        let full = if cfg!(feature = "otlp") {
            format!("{FULL}\n[log]\notlp_endpoint = \"http://collector:4318\"\n")
        } else {
            FULL.to_string()
        };
        let c = Config::from_toml(&full, |_| None).unwrap();
        let text = to_toml(&c);
        let doc: Table = text.parse().unwrap_or_else(|e| panic!("{e}\n{text}"));
        let mut printed = std::collections::BTreeSet::new();
        printed_keys(&doc, "", &mut printed);
        // `key_sha256` is the other spelling of a client's key; `clients_file` is merged in.
        let mut documented = documented_keys();
        documented.remove("clients.key_sha256");
        documented.remove("clients_file");
        if !cfg!(feature = "otlp") {
            documented.remove("log.otlp_endpoint");
        }
        // The other ways to name Redis than a URL (checked below).
        for k in [
            "cluster_nodes",
            "sentinels",
            "master_name",
            "sentinel_password",
        ] {
            documented.remove(&format!("redis.{k}"));
        }
        assert_eq!(printed, documented, "{text}");
        for s in [
            "admin-token-secret",
            "EAAB-system-token-secret",
            "app-secret-secret",
            "client-key-secret",
            "redis-password-secret",
            "verify-token-secret",
            "redis-password-key-secret",
        ] {
            assert!(!text.contains(s), "{text}");
        }
        assert_eq!(
            doc["redis"]["url"].as_str(),
            Some("rediss://[redacted]@redis:6379")
        );
        assert_eq!(doc["redis"]["tls"].as_bool(), Some(true));

        let sentinel = FULL.replace(
            "url = \"rediss://:redis-password-secret@redis:6379\"",
            "sentinels = [\"s1:26379\", \"[::1]:26380\"]\nmaster_name = \"mymaster\"\ntls = true\n\
             sentinel_password = \"sentinel-password-secret\"",
        );
        let text = to_toml(&Config::from_toml(&sentinel, |_| None).unwrap());
        assert!(!text.contains("sentinel-password-secret"), "{text}");
        let doc: Table = text.parse().unwrap_or_else(|e| panic!("{e}\n{text}"));
        let r = &doc["redis"];
        assert!(r.get("url").is_none(), "{text}");
        assert_eq!(r["sentinels"][1].as_str(), Some("[::1]:26380"));
        assert_eq!(r["master_name"].as_str(), Some("mymaster"));
        assert_eq!(r["sentinel_password"].as_str(), Some(REDACTED));
        let cluster = FULL.replace(
            "url = \"rediss://:redis-password-secret@redis:6379\"",
            "cluster_nodes = [\"n1:7000\", \"n2:7001\"]\ntls = true",
        );
        let text = to_toml(&Config::from_toml(&cluster, |_| None).unwrap());
        let doc: Table = text.parse().unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(doc["redis"]["cluster_nodes"][1].as_str(), Some("n2:7001"));
        assert_eq!(
            doc["quota"]["pages"][0]["page_calls"].as_integer(),
            Some(50)
        );
        assert_eq!(doc["clients"][0]["pages"][0].as_str(), Some("1001"));
    }
}
