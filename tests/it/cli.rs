//! The `graphgate` binary: check-config, the shipped config file, and the demo.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::ChildGuard;

const BIN: &str = env!("CARGO_BIN_EXE_graphgate");

fn temp_config(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("graphgate-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("graphgate.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_config_validates_and_never_prints_secrets() {
    let path = temp_config(
        "ok",
        r#"
[credentials]
system_user_token = "EAAB-very-secret-system-token"
app_secret = "very-secret-app-secret"
[[clients]]
name = "reports"
key = "very-secret-client-key"
pages = ["1001"]
"#,
    );
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .env_remove("GRAPHGATE_SYSTEM_USER_TOKEN")
        .env_remove("GRAPHGATE_APP_SECRET")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("reports"), "{text}");
    for secret in [
        "EAAB-very-secret-system-token",
        "very-secret-app-secret",
        "very-secret-client-key",
    ] {
        assert!(
            !text.contains(secret),
            "check-config printed a secret: {text}"
        );
    }
}

/// A build without the `otlp` feature cannot export spans: it says so instead of starting
/// without the export the configuration asks for.
#[cfg(not(feature = "otlp"))]
#[test]
fn check_config_refuses_an_otlp_endpoint_without_the_feature() {
    let path = temp_config(
        "otlp",
        r#"
[credentials]
system_user_token = "EAAB-otlp-system-token"
app_secret = "otlp-app-secret"
[log]
otlp_endpoint = "http://127.0.0.1:4318"
"#,
    );
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .env_remove("GRAPHGATE_SYSTEM_USER_TOKEN")
        .env_remove("GRAPHGATE_APP_SECRET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("log.otlp_endpoint"), "{err}");
    assert!(
        err.contains("this graphgate was built without the otlp feature"),
        "{err}"
    );
}

#[test]
fn check_config_names_the_bad_key() {
    let path = temp_config("bad", "[upstream]\nurll = \"x\"\n");
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("urll"), "{err}");
}

#[test]
fn shipped_config_file_parses_with_secrets_from_env() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/graphgate.toml");
    let out = Command::new(BIN)
        .args(["check-config", "--config", path])
        .env("GRAPHGATE_SYSTEM_USER_TOKEN", "EAAB-token-from-env-123")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("EAAB-token-from-env-123"));
}

#[test]
fn demo_starts_and_answers_through_the_simulated_graph() {
    let mut child = ChildGuard(
        Command::new(BIN)
            .args([
                "demo",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    // Keep reading the demo's stdout until it exits, so its prints never hit a closed pipe.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.trim().strip_prefix("graphgate:") {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
            }
        }
    });
    let base = rx.recv_timeout(Duration::from_secs(20)).ok();
    let base = base.expect("demo printed its address");
    let addr = base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    use std::io::{Read, Write};
    write!(
        stream,
        "GET /v21.0/1001?fields=id,name&access_token=demo-client-key HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("\"id\":\"1001\""), "{reply}");
}

/// A printed curl line, as far as the demo uses curl: `-s`, `-i`, `-X METHOD`,
/// `-H 'Name: value'`, `-d name=value`, one quoted or bare URL, then an optional
/// `| grep -i -E '^(a|b):'` and a `# claim`.
#[derive(Debug)]
struct CurlLine {
    method: String,
    url: String,
    headers: Vec<String>,
    form: Vec<String>,
    include_headers: bool,
    /// Line prefixes the grep keeps (empty: no grep), lower case with `-i`.
    grep: Vec<String>,
    grep_ignores_case: bool,
    claim: String,
}

fn shell_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote = None;
    let mut in_word = false;
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

fn parse_curl(line: &str) -> CurlLine {
    let (command, claim) = line.split_once("    # ").expect("every line has a # claim");
    let (curl, grep) = match command.split_once(" | grep ") {
        Some((c, g)) => (c, Some(g)),
        None => (command, None),
    };
    let words = shell_words(curl);
    assert_eq!(words[0], "curl", "{line}");
    let mut out = CurlLine {
        method: String::new(),
        url: String::new(),
        headers: Vec::new(),
        form: Vec::new(),
        include_headers: false,
        grep: Vec::new(),
        grep_ignores_case: false,
        claim: claim.trim().to_string(),
    };
    let mut it = words.into_iter().skip(1);
    while let Some(w) = it.next() {
        match w.as_str() {
            "-s" => {}
            "-i" => out.include_headers = true,
            "-X" => out.method = it.next().unwrap(),
            "-H" => out.headers.push(it.next().unwrap()),
            "-d" => out.form.push(it.next().unwrap()),
            url if url.starts_with("http://") => out.url = url.to_string(),
            other => panic!("curl option {other} not understood: {line}"),
        }
    }
    if out.method.is_empty() {
        out.method = if out.form.is_empty() { "GET" } else { "POST" }.to_string();
    }
    if let Some(g) = grep {
        let words = shell_words(g);
        let pattern = words.last().unwrap();
        out.grep_ignores_case = words.iter().any(|w| w == "-i");
        let inner = pattern.trim_start_matches('^').trim_start_matches('(');
        let (alternatives, suffix) = inner.split_once(')').unwrap_or((inner, ""));
        out.grep = alternatives
            .split('|')
            .map(|a| format!("{a}{suffix}"))
            .map(|a| {
                if out.grep_ignores_case {
                    a.to_ascii_lowercase()
                } else {
                    a
                }
            })
            .collect();
    }
    out
}

/// Sends the request as curl would and returns (status, what curl prints).
fn run_curl(c: &CurlLine) -> (u16, String) {
    use std::io::{Read, Write};
    let rest = c.url.strip_prefix("http://").unwrap();
    let (authority, path) = rest.split_at(rest.find('/').unwrap());
    let body = c.form.join("&");
    let mut head = format!(
        "{} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n",
        c.method
    );
    for h in &c.headers {
        head.push_str(&format!("{h}\r\n"));
    }
    if !c.form.is_empty() {
        head.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    let mut conn = std::net::TcpStream::connect(authority).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(conn, "{head}\r\n{body}").unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    let printed = if c.include_headers {
        format!("{}\n\n{body}", head.replace("\r\n", "\n"))
    } else {
        body.to_string()
    };
    (status, printed)
}

#[test]
fn every_line_the_demo_prints_does_what_it_says() {
    let mut child = ChildGuard(
        Command::new(BIN)
            .args([
                "demo",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let mut base = String::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the demo prints its lines");
        if let Some(rest) = line.trim().strip_prefix("graphgate:") {
            base = rest.split_whitespace().next().unwrap().to_string();
        }
        if line.trim_start().starts_with("curl ") {
            lines.push(parse_curl(line.trim()));
        }
        if line.contains("Ctrl-C stops it") {
            break;
        }
    }
    assert!(lines.len() >= 8, "{lines:?}");
    // The cache-hit line first (it hits because the demo warmed the entry up, not because
    // of the plain read printed above it), then the others in the order printed (a write to
    // Page 1001 invalidates its cached reads, as it should).
    let hit_first = lines
        .iter()
        .position(|c| c.claim.contains("X-Cache: HIT"))
        .expect("a cache-hit line");
    let order = std::iter::once(hit_first).chain((0..lines.len()).filter(|&i| i != hit_first));
    let mut checked = std::collections::BTreeSet::new();
    for c in order.map(|i| &lines[i]) {
        let (status, printed) = run_curl(c);
        let shown: Vec<&str> = if c.grep.is_empty() {
            printed.lines().collect()
        } else {
            printed
                .lines()
                .filter(|l| {
                    let l = if c.grep_ignores_case {
                        l.to_ascii_lowercase()
                    } else {
                        l.to_string()
                    };
                    c.grep.iter().any(|p| l.starts_with(p.as_str()))
                })
                .collect()
        };
        assert!(!shown.is_empty(), "{c:?} shows nothing:\n{printed}");
        let shown = shown.join("\n");
        let json = || serde_json::from_str::<serde_json::Value>(&printed).unwrap_or_default();
        let claim = c.claim.as_str();
        if claim.contains("X-Cache: HIT") {
            assert!(
                shown.to_ascii_lowercase().contains("x-cache: hit"),
                "{claim}: {shown}"
            );
        } else if claim.contains("paging.next") {
            let next = json()["paging"]["next"].as_str().unwrap_or("").to_string();
            assert!(next.starts_with(&base), "{claim}: {printed}");
        } else if claim.contains("quota headers") {
            let lower = shown.to_ascii_lowercase();
            assert!(
                lower.contains("ratelimit:") && lower.contains("ratelimit-policy:"),
                "{claim}: {shown}"
            );
        } else if claim.contains("a write") {
            assert!(
                json()["id"]
                    .as_str()
                    .is_some_and(|id| id.starts_with("1001_")),
                "{printed}"
            );
        } else if claim.starts_with("403") {
            assert_eq!(status, 403, "{printed}");
        } else if claim.contains("quota state") {
            assert_eq!(status, 200, "{printed}");
            assert!(
                c.url.ends_with("/admin/pages") && json()["pages"].is_array(),
                "{printed}"
            );
        } else if claim.contains("request counters") {
            assert!(shown.starts_with("graphgate_requests_total"), "{shown}");
        } else if claim.contains("Page read") {
            assert_eq!(
                (status, json()["id"].as_str()),
                (200, Some("1001")),
                "{printed}"
            );
        } else {
            panic!("no check for the demo line claiming {claim:?}");
        }
        assert!(checked.insert(claim.to_string()), "two lines claim {claim}");
    }
}
