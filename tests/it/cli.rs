//! The `graphgate` binary: check-config, the shipped config file, and the demo.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

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

/// Kills the child on drop so a failing test leaves no process behind.
struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn demo_starts_and_answers_through_the_simulated_graph() {
    let mut child = Child(
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
