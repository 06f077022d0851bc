//! The alert rules against promtool: every alert has a unit test that makes it fire, and an
//! idle install without Redis (every series a real `graphgate serve` exports, as scraped)
//! fires none of them. The committed unit test of GraphgateRedisDown uses exactly the Redis
//! series such an install exports.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_graphgate");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml(rel: &str) -> Value {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(repo().join(rel))
        .output()
        .expect("python3 with PyYAML (scripts/test installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn alert_names() -> Vec<String> {
    yaml("deploy/prometheus/alerts.yml")["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .filter_map(|r| r["alert"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn every_alert_has_a_promtool_unit_test_that_fires_it() {
    let tests = yaml("deploy/prometheus/alerts_test.yml");
    let mut fired = BTreeSet::new();
    for t in tests["tests"].as_array().unwrap() {
        for a in t["alert_rule_test"].as_array().into_iter().flatten() {
            if a["exp_alerts"].as_array().is_some_and(|e| !e.is_empty()) {
                fired.insert(a["alertname"].as_str().unwrap().to_string());
            }
        }
    }
    for name in alert_names() {
        assert!(fired.contains(&name), "no promtool test makes {name} fire");
    }
}

/// `graphgate serve` with nothing but a token (no Redis, no TLS, no clients): its /metrics
/// text once it listens.
fn scrape_a_fresh_install() -> String {
    let mut child = Command::new(BIN)
        .args(["serve", "--config", "/dev/null"])
        .args([
            "--set",
            "server.listen=127.0.0.1:0",
            "--set",
            "server.admin_listen=127.0.0.1:0",
        ])
        .env("GRAPHGATE_SYSTEM_USER_TOKEN", "EAAB-fresh-install-token")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(at) = line.find("admin_addr=") {
                let addr = line[at + 11..]
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_string();
                let _ = tx.send(addr);
            }
        }
    });
    let admin = rx.recv_timeout(Duration::from_secs(20));
    let text = admin.map(|addr| {
        let mut conn = std::net::TcpStream::connect(&addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        write!(
            conn,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut reply = String::new();
        conn.read_to_string(&mut reply).unwrap();
        reply
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default()
    });
    let _ = child.kill();
    let _ = child.wait();
    text.expect("graphgate listening")
}

/// The (series, value) lines of Prometheus text, comments dropped.
fn series(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (s, v) = l.rsplit_once(' ')?;
            Some((s.to_string(), v.to_string()))
        })
        .collect()
}

/// A series with `job` and `instance` added, as Prometheus stores a scrape.
fn with_target(series: &str, instance: &str) -> String {
    let target = format!("job=\"graphgate\", instance=\"{instance}\"");
    match series.split_once('{') {
        Some((name, rest)) => format!("{name}{{{target}, {rest}"),
        None => format!("{series}{{{target}}}"),
    }
}

#[test]
fn an_idle_install_without_redis_fires_no_alert_and_the_redis_test_uses_its_series() {
    let text = scrape_a_fresh_install();
    let scraped = series(&text);
    let names: BTreeSet<&str> = scraped
        .iter()
        .map(|(s, _)| s.split('{').next().unwrap())
        .collect();
    assert!(names.contains("graphgate_redis_configured"), "{text}");
    assert!(
        !names.contains("graphgate_redis_up"),
        "graphgate_redis_up without Redis: {text}"
    );

    // The committed GraphgateRedisDown test's no-Redis replica (gg1) has exactly the Redis
    // series of this scrape.
    let tests = yaml("deploy/prometheus/alerts_test.yml");
    let committed: BTreeSet<String> = tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| {
            t["alert_rule_test"]
                .as_array()
                .is_some_and(|a| a.iter().any(|a| a["alertname"] == "GraphgateRedisDown"))
        })
        .flat_map(|t| t["input_series"].as_array().unwrap().clone())
        .filter_map(|s| s["series"].as_str().map(str::to_string))
        .filter(|s| s.contains("instance=\"gg1:9090\""))
        .collect();
    let scraped_redis: BTreeSet<String> = scraped
        .iter()
        .filter(|(s, _)| s.contains("redis"))
        .map(|(s, _)| with_target(s, "gg1:9090"))
        .collect();
    assert_eq!(
        committed, scraped_redis,
        "alerts_test.yml no-Redis series vs a real scrape"
    );

    // Every series of the scrape, unchanged for an hour, plus the `up` Prometheus adds: no
    // alert fires at any point.
    let dir = std::env::temp_dir().join(format!("graphgate-idle-alerts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut input = String::from(
        "  - series: 'up{job=\"graphgate\", instance=\"gg1:9090\"}'\n    values: 1x60\n",
    );
    for (s, v) in &scraped {
        let s = with_target(s, "gg1:9090").replace('\'', "''");
        input.push_str(&format!("  - series: '{s}'\n    values: '{v}x60'\n"));
    }
    let mut checks = String::new();
    for eval in ["5m", "30m", "59m"] {
        for name in alert_names() {
            checks.push_str(&format!(
                "  - eval_time: {eval}\n    alertname: {name}\n    exp_alerts: []\n"
            ));
        }
    }
    let file = dir.join("idle_test.yml");
    std::fs::write(
        &file,
        format!(
            "rule_files:\n- {}\nevaluation_interval: 1m\ntests:\n- interval: 1m\n  input_series:\n{input}  alert_rule_test:\n{checks}",
            repo().join("deploy/prometheus/alerts.yml").display()
        ),
    )
    .unwrap();
    let started = Instant::now();
    let out = Command::new("promtool")
        .args(["test", "rules"])
        .arg(&file)
        .output()
        .expect("promtool (scripts/test installs the Debian package prometheus)");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.contains("SUCCESS"),
        "{report}"
    );
    eprintln!(
        "{} series of an idle install, {} alerts: none fires ({:?})",
        scraped.len(),
        alert_names().len(),
        started.elapsed()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
