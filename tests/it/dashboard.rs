//! The Grafana dashboard works outside the bundled Grafana: the data source is a variable
//! (no hard-coded uid), every query is filtered by the job and instance variables, rate
//! windows follow Grafana's `$__rate_interval`, every panel has a unit, and the breaker state
//! is a state timeline. (tests/it/observability.rs runs every query against a real
//! Prometheus.)

use serde_json::Value;

fn dashboard() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/dashboards/graphgate.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Each `graphgate_*` selector of an expression with its matchers (`""` when it has none).
fn selectors(expr: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("graphgate_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = tail[..end].to_string();
        let after = &tail[end..];
        let matchers = match after.strip_prefix('{') {
            Some(m) => m[..m.find('}').unwrap_or(m.len())].to_string(),
            None => String::new(),
        };
        out.push((name, matchers));
        rest = &tail[end..];
    }
    out
}

#[test]
fn dashboard_is_portable_across_grafanas_and_fleets() {
    let d = dashboard();
    let vars = d["templating"]["list"].as_array().expect("variables");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("${name}"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    for name in ["job", "instance"] {
        let v = var(name);
        assert_eq!(v["type"], "query");
        assert_eq!(v["datasource"]["uid"], "${datasource}");
        assert_eq!(v["includeAll"], true);
        assert_eq!(v["multi"], true);
    }
    assert!(var("instance")["query"]["query"]
        .as_str()
        .unwrap()
        .contains("$job"));
    // No uid other than the variable anywhere.
    let text = d.to_string();
    let uids: Vec<&str> = text
        .match_indices("\"uid\":\"")
        .map(|(i, _)| &text[i + 7..i + 20])
        .collect();
    for u in uids {
        assert!(
            u.starts_with("${datasource}") || u.starts_with("graphgate\""),
            "hard-coded uid {u}"
        );
    }
    let mut state_timeline = false;
    for p in d["panels"].as_array().unwrap() {
        if p["type"] == "row" {
            continue;
        }
        let title = p["title"].as_str().unwrap();
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        assert!(
            p["fieldConfig"]["defaults"]["unit"]
                .as_str()
                .is_some_and(|u| !u.is_empty()),
            "{title}: unit"
        );
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
            let found = selectors(expr);
            assert!(!found.is_empty(), "{title}: {expr}");
            for (name, m) in found {
                assert!(
                    m.contains("job=~\"$job\"") && m.contains("instance=~\"$instance\""),
                    "{title}: {name} not filtered by $job and $instance: {expr}"
                );
            }
            // Range windows are Grafana's, never fixed.
            for (i, _) in expr.match_indices('[') {
                let window = &expr[i..i + expr[i..].find(']').unwrap() + 1];
                assert!(
                    window == "[$__rate_interval]" || window == "[$__range]",
                    "{title}: fixed window {window} in {expr}"
                );
            }
        }
        if p["type"] == "state-timeline" {
            let expr = p["targets"][0]["expr"].as_str().unwrap();
            state_timeline |= expr.contains("graphgate_upstream_breaker_state");
            let mappings = p["fieldConfig"]["defaults"]["mappings"][0]["options"].to_string();
            for state in ["closed", "half-open", "open"] {
                assert!(
                    mappings.contains(&format!("\"{state}\"")),
                    "{title}: {mappings}"
                );
            }
        }
    }
    assert!(state_timeline, "no state timeline for the breaker state");
    // The Redis panel tells "not configured" from "down".
    let redis = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["title"] == "Redis state per replica")
        .unwrap();
    let expr = redis["targets"][0]["expr"].as_str().unwrap();
    assert!(expr.contains("graphgate_redis_configured"), "{expr}");
}
