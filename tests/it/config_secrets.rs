//! Secrets in configuration errors: a file broken around a secret-bearing key (unterminated
//! strings, wrong types, duplicate keys, bad escapes, typos, inline and dotted forms) must
//! be refused without its secret appearing anywhere: not in the error `Config::from_toml`
//! returns, not in what `graphgate check-config` prints, not in the log line of a rejected
//! SIGHUP reload. The broken files are generated, the secrets random.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use graphgate::config::Config;
use proptest::prelude::*;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_graphgate");

/// Where a secret sits: its table, its key, and how a value is made from a random secret.
#[derive(Debug, Clone, Copy)]
enum Location {
    SystemUserToken,
    AppSecret,
    AdminToken,
    ClientKey,
    ClientKeyDigest,
    RedisUrl,
    WebhookVerifyToken,
    RedisPassword,
    SentinelPassword,
}

const LOCATIONS: [Location; 9] = [
    Location::SystemUserToken,
    Location::AppSecret,
    Location::AdminToken,
    Location::ClientKey,
    Location::ClientKeyDigest,
    Location::RedisUrl,
    Location::WebhookVerifyToken,
    Location::RedisPassword,
    Location::SentinelPassword,
];

impl Location {
    fn table(self) -> &'static str {
        match self {
            Location::SystemUserToken | Location::AppSecret => "credentials",
            Location::AdminToken => "server",
            Location::ClientKey | Location::ClientKeyDigest => "clients",
            Location::RedisUrl | Location::RedisPassword | Location::SentinelPassword => "redis",
            Location::WebhookVerifyToken => "webhooks",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Location::SystemUserToken => "system_user_token",
            Location::AppSecret => "app_secret",
            Location::AdminToken => "admin_token",
            Location::ClientKey => "key",
            Location::ClientKeyDigest => "key_sha256",
            Location::RedisUrl => "url",
            Location::WebhookVerifyToken => "verify_token",
            Location::RedisPassword => "password",
            Location::SentinelPassword => "sentinel_password",
        }
    }

    /// The text a secret becomes inside this key's value (a Redis URL carries it as its
    /// password).
    fn wrap(self, secret: &str) -> String {
        match self {
            Location::RedisUrl => format!("redis://:{secret}@127.0.0.1:6379"),
            _ => secret.to_string(),
        }
    }
}

/// How the value (or the line) is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Breakage {
    UnterminatedBasic,
    UnterminatedLiteral,
    UnterminatedMultilineBasic,
    UnterminatedMultilineLiteral,
    EscapedClosingQuote,
    BadEscape,
    BadUnicodeEscape,
    NewlineInString,
    ControlCharacter,
    Unquoted,
    Integer,
    HexInteger,
    Array,
    MultilineArray,
    InlineTable,
    TrailingGarbage,
    DuplicateKey,
    MisspelledKey,
    /// Valid syntax, but another key is invalid: the validation error path.
    OtherKeyInvalid,
}

const BREAKAGES: [Breakage; 19] = [
    Breakage::UnterminatedBasic,
    Breakage::UnterminatedLiteral,
    Breakage::UnterminatedMultilineBasic,
    Breakage::UnterminatedMultilineLiteral,
    Breakage::EscapedClosingQuote,
    Breakage::BadEscape,
    Breakage::BadUnicodeEscape,
    Breakage::NewlineInString,
    Breakage::ControlCharacter,
    Breakage::Unquoted,
    Breakage::Integer,
    Breakage::HexInteger,
    Breakage::Array,
    Breakage::MultilineArray,
    Breakage::InlineTable,
    Breakage::TrailingGarbage,
    Breakage::DuplicateKey,
    Breakage::MisspelledKey,
    Breakage::OtherKeyInvalid,
];

/// How the secret's table is written.
#[derive(Debug, Clone, Copy)]
enum Form {
    /// `[table]` (or `[[clients]]`) followed by `key = value` lines.
    Table,
    /// `table.key = value` before any table header.
    Dotted,
    /// `table = { key = value }` (or `clients = [{ ... }]`).
    Inline,
}

const FORMS: [Form; 3] = [Form::Table, Form::Dotted, Form::Inline];

/// A generated configuration file and the strings that must never be shown.
struct Variant {
    text: String,
    secrets: Vec<String>,
    describe: String,
}

/// Two random secrets (the second for breakages that need another value) and a number
/// whose digits are a secret too.
#[derive(Debug, Clone)]
struct SecretSet {
    first: String,
    second: String,
    number: u64,
}

fn secret_set() -> impl Strategy<Value = SecretSet> {
    (
        "[A-Za-z0-9_-]{14,30}",
        "[A-Za-z0-9_-]{14,30}",
        100_000_000_000_000u64..999_999_999_999_999u64,
    )
        .prop_map(|(a, b, number)| SecretSet {
            first: format!("Sx{a}"),
            second: format!("Sy{b}"),
            number,
        })
}

fn random_secrets(rng: &mut fastrand::Rng) -> SecretSet {
    let word = |rng: &mut fastrand::Rng| -> String {
        (0..rng.usize(14..30))
            .map(|_| rng.alphanumeric())
            .collect::<String>()
    };
    SecretSet {
        first: format!("Sx{}", word(rng)),
        second: format!("Sy{}", word(rng)),
        number: rng.u64(100_000_000_000_000..999_999_999_999_999),
    }
}

/// The valid content of each table: ordinary keys, and the secret keys with random
/// secrets from `others` (listed among the strings never to show).
fn table_lines(table: &str, others: &SecretSet) -> Vec<String> {
    let secret = |loc: Location, s: &str| format!("{} = \"{}\"", loc.key(), loc.wrap(s));
    match table {
        "server" => vec![
            "listen = \"127.0.0.1:0\"".into(),
            "admin_listen = \"127.0.0.1:0\"".into(),
            secret(Location::AdminToken, &others.first),
        ],
        "upstream" => vec!["url = \"http://127.0.0.1:9\"".into()],
        "credentials" => vec![
            secret(Location::SystemUserToken, &others.first),
            secret(Location::AppSecret, &others.second),
        ],
        "clients" => vec![
            "name = \"svc\"".into(),
            "pages = [\"*\"]".into(),
            secret(Location::ClientKey, &others.second),
        ],
        "redis" => vec!["timeout_ms = 50".into()],
        "webhooks" => vec![
            "path = \"/webhooks\"".into(),
            secret(Location::WebhookVerifyToken, &others.first),
        ],
        _ => Vec::new(),
    }
}

fn header(table: &str) -> String {
    if table == "clients" {
        "[[clients]]".to_string()
    } else {
        format!("[{table}]")
    }
}

/// Builds the file: every table written normally except the secret's, which gets the broken
/// value in the given form; the other secret keys hold valid random secrets.
fn variant(
    at: Location,
    breakage: Breakage,
    form: Form,
    secrets: &SecretSet,
    others: &SecretSet,
) -> Variant {
    let s1 = at.wrap(&secrets.first);
    let s2 = at.wrap(&secrets.second);
    let key = at.key();
    let mut forbidden = vec![
        secrets.first.clone(),
        secrets.second.clone(),
        others.first.clone(),
        others.second.clone(),
    ];
    let value = match breakage {
        Breakage::UnterminatedBasic => format!("\"{s1}"),
        Breakage::UnterminatedLiteral => format!("'{s1}"),
        Breakage::UnterminatedMultilineBasic => format!("\"\"\"{s1}\n{s2}"),
        Breakage::UnterminatedMultilineLiteral => format!("'''{s1}\n{s2}"),
        Breakage::EscapedClosingQuote => format!("\"{s1}\\\""),
        Breakage::BadEscape => format!("\"{s1}\\q{s2}\""),
        Breakage::BadUnicodeEscape => format!("\"{s1}\\uZZZZ{s2}\""),
        Breakage::NewlineInString => format!("\"{s1}\n{s2}\""),
        Breakage::ControlCharacter => format!("\"{s1}\u{1}{s2}\""),
        Breakage::Unquoted => s1.clone(),
        Breakage::Integer => {
            forbidden.push(secrets.number.to_string());
            secrets.number.to_string()
        }
        Breakage::HexInteger => {
            forbidden.push(secrets.number.to_string());
            forbidden.push(format!("{:x}", secrets.number));
            format!("0x{:x}", secrets.number)
        }
        Breakage::Array => format!("[\"{s1}\", \"{s2}\"]"),
        Breakage::MultilineArray => format!("[\n  \"{s1}\",\n  \"{s2}\",\n]"),
        Breakage::InlineTable => format!("{{ value = \"{s1}\" }}"),
        Breakage::TrailingGarbage => format!("\"{s1}\" {s2}"),
        Breakage::DuplicateKey | Breakage::MisspelledKey | Breakage::OtherKeyInvalid => {
            format!("\"{s1}\"")
        }
    };
    // The secret's table: its ordinary lines (without the client's other credential), then
    // the broken line(s).
    let table = at.table();
    let mut own: Vec<String> = table_lines(table, others)
        .into_iter()
        .filter(|l| !l.starts_with("key =") && !l.starts_with(&format!("{key} =")))
        .collect();
    own.push(format!("{key} = {value}"));
    match breakage {
        Breakage::DuplicateKey => own.push(format!("{key} = \"{s2}\"")),
        Breakage::MisspelledKey => own.push(format!("{key}x = \"{s2}\"")),
        _ => {}
    }
    let mut tables: Vec<(&str, Vec<String>)> = ["server", "upstream", "credentials", "clients"]
        .into_iter()
        .filter(|t| *t != table)
        .map(|t| (t, table_lines(t, others)))
        .collect();
    if breakage == Breakage::OtherKeyInvalid {
        for (t, lines) in &mut tables {
            if *t == "upstream" {
                *lines = vec!["url = \"ftp://nowhere\"".into()];
            }
        }
    }
    let inline = |members: &[String]| {
        if table == "clients" {
            format!("clients = [{{ {} }}]\n", members.join(", "))
        } else {
            format!("{table} = {{ {} }}\n", members.join(", "))
        }
    };
    let broken = match form {
        Form::Table => format!("{}\n{}\n", header(table), own.join("\n")),
        // Arrays of tables have no dotted form: an inline array instead.
        Form::Dotted if table == "clients" => inline(&own),
        Form::Dotted => own.iter().map(|l| format!("{table}.{l}\n")).collect(),
        Form::Inline => inline(&own),
    };
    let others_text: Vec<String> = tables
        .iter()
        .map(|(t, lines)| format!("{}\n{}\n", header(t), lines.join("\n")))
        .collect();
    let text = match form {
        // Dotted and inline keys belong to the root table: before any header.
        Form::Dotted | Form::Inline => format!("{broken}{}", others_text.concat()),
        // The broken table first, in the middle or last: an unterminated value then runs
        // into different neighbours, or to the end of the file.
        Form::Table => {
            let at_index = (secrets.number as usize) % (others_text.len() + 1);
            let mut parts = others_text;
            parts.insert(at_index, broken);
            parts.concat()
        }
    };
    Variant {
        text,
        secrets: forbidden,
        describe: format!("{at:?} / {breakage:?} / {form:?}"),
    }
}

/// Also taken from the environment: it must not show either.
const ENV_TOKEN: &str = "Sz-token-from-the-environment-0042";

fn env_with_token(k: &str) -> Option<String> {
    (k == graphgate::config::ENV_SYSTEM_USER_TOKEN).then(|| ENV_TOKEN.to_string())
}

fn assert_hidden(output: &str, v: &Variant) {
    for s in v.secrets.iter().chain([&ENV_TOKEN.to_string()]) {
        assert!(
            !output.contains(s.as_str()),
            "{}: a secret ({s}) appears in:\n{output}\n--- file:\n{}",
            v.describe,
            v.text
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The library's error: refused, with no secret in its text (nor in its Debug form).
    #[test]
    fn config_errors_never_contain_a_secret(
        at in 0..LOCATIONS.len(),
        breakage in 0..BREAKAGES.len(),
        form in 0..FORMS.len(),
        secrets in secret_set(),
        others in secret_set(),
    ) {
        let v = variant(LOCATIONS[at], BREAKAGES[breakage], FORMS[form], &secrets, &others);
        for env in [env_with_token as fn(&str) -> Option<String>, |_: &str| None] {
            match Config::from_toml(&v.text, env) {
                Ok(c) => panic!("{}: accepted:\n{}\n{c:?}", v.describe, v.text),
                Err(e) => {
                    assert_hidden(&e.to_string(), &v);
                    assert_hidden(&format!("{e:?}"), &v);
                }
            }
        }
    }
}

/// A file per (location, breakage), forms in turn, deterministic random secrets.
fn every_variant(seed: u64) -> Vec<Variant> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out = Vec::new();
    for (i, at) in LOCATIONS.iter().enumerate() {
        for (j, breakage) in BREAKAGES.iter().enumerate() {
            let form = FORMS[(i + j) % FORMS.len()];
            let (secrets, others) = (random_secrets(&mut rng), random_secrets(&mut rng));
            out.push(variant(*at, *breakage, form, &secrets, &others));
        }
    }
    out
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "graphgate-secrets-{tag}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn check_config_prints_no_secret_of_a_broken_file() {
    let dir = temp_dir("check");
    let path = dir.join("graphgate.toml");
    for v in every_variant(fastrand::u64(..)) {
        std::fs::write(&path, &v.text).unwrap();
        let out = Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&path)
            .env_remove("GRAPHGATE_CONFIG")
            .env("GRAPHGATE_SYSTEM_USER_TOKEN", ENV_TOKEN)
            .env_remove("GRAPHGATE_APP_SECRET")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !out.status.success(),
            "{}: accepted:\n{text}\n{}",
            v.describe,
            v.text
        );
        // Still useful: it says where, or which key.
        assert!(
            text.contains("line ") || text.contains("invalid value for `"),
            "{}: {text}",
            v.describe
        );
        assert_hidden(&text, &v);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_rejected_sighup_reload_logs_no_secret_of_the_broken_file() {
    let dir = temp_dir("sighup");
    let path = dir.join("graphgate.toml");
    let good = |port: u16, admin: u16| {
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
             [upstream]\nurl = \"http://127.0.0.1:9\"\n[credentials]\nsystem_user_token = \"{SYSTEM_TOKEN}\"\n\
             [[clients]]\nname = \"svc\"\nkey = \"{ADMIN_KEY}\"\npages = [\"*\"]\n"
        )
    };
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (port, admin) = (free_port(), free_port());
    std::fs::write(&path, good(port, admin)).unwrap();
    let mut child = ChildGuard(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&path)
            .env_remove("GRAPHGATE_CONFIG")
            .env_remove("GRAPHGATE_SYSTEM_USER_TOKEN")
            .env_remove("GRAPHGATE_APP_SECRET")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let log = Arc::new(Mutex::new(String::new()));
    let mut readers = Vec::new();
    for pipe in [
        Box::new(child.0.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.0.stderr.take().unwrap()),
    ] {
        let log = log.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut l = log.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        }));
    }
    let metrics_url = format!("http://127.0.0.1:{admin}/metrics");
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", admin))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "graphgate did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rejected = || {
        let url = metrics_url.clone();
        async move {
            let m = send(
                &client(),
                http::Method::GET,
                &url,
                &[],
                bytes::Bytes::new(),
                &[],
            )
            .await
            .text();
            metric_value(
                &m,
                "graphgate_config_reloads_total",
                &["result=\"rejected\""],
            )
        }
    };
    let pid = child.0.id().to_string();
    let mut rng = fastrand::Rng::new();
    // One file per breakage, at a random location and form; the environment holds no
    // secret here, the file does.
    let variants: Vec<Variant> = BREAKAGES
        .iter()
        .map(|b| {
            let at = LOCATIONS[rng.usize(..LOCATIONS.len())];
            let form = FORMS[rng.usize(..FORMS.len())];
            let (s, o) = (random_secrets(&mut rng), random_secrets(&mut rng));
            variant(at, *b, form, &s, &o)
        })
        .collect();
    for (n, v) in variants.iter().enumerate() {
        std::fs::write(&path, &v.text).unwrap();
        let ok = Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -HUP {pid}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while rejected().await < (n + 1) as f64 {
            assert!(
                Instant::now() < deadline,
                "{}: reload not rejected",
                v.describe
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Stop it (SIGTERM: a graceful exit flushes the log) and read everything it wrote.
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let _ = child.0.wait();
    for r in readers {
        let _ = r.join();
    }
    let log = log.lock().unwrap().clone();
    let lines = log
        .lines()
        .filter(|l| l.contains("configuration reload rejected"))
        .count();
    assert_eq!(
        lines,
        variants.len(),
        "one log line per rejected reload:\n{log}"
    );
    for v in &variants {
        assert_hidden(&log, v);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A key file flattened onto one line (a PEM pasted through an environment variable) is
/// refused, on start and on reload alike, without its content in the error.
#[test]
fn a_malformed_tls_key_file_is_refused_without_its_content() {
    let dir = temp_dir("tls");
    let key = rcgen::KeyPair::generate().unwrap().serialize_pem();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap()
        .pem();
    let body: Vec<&str> = key.lines().filter(|l| !l.starts_with("-----")).collect();
    let cert_file = dir.join("srv.crt");
    std::fs::write(&cert_file, cert).unwrap();
    for (n, broken) in [
        key.replace('\n', " "),
        key.replace('\n', ""),
        key.replacen("-----\n", "----- ", 1),
        key.replace("-----END PRIVATE KEY-----", ""),
    ]
    .into_iter()
    .enumerate()
    {
        let key_file = dir.join(format!("srv{n}.key"));
        std::fs::write(&key_file, &broken).unwrap();
        let err = graphgate::tls::server_config(&graphgate::config::TlsConfig {
            cert_file: cert_file.clone(),
            key_file,
            client_ca_file: None,
        })
        .err()
        .unwrap_or_else(|| panic!("accepted: {broken}"));
        assert!(err.contains("server.tls_key_file"), "{err}");
        for chunk in &body {
            // As text, or as the byte list a Debug-printed buffer would show.
            let bytes = format!("{:?}", &chunk.as_bytes()[..12]);
            let bytes = bytes.trim_matches(['[', ']']);
            assert!(
                !err.contains(&chunk[..16]) && !err.contains(bytes),
                "key material in: {err}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
