//! Peak memory of the graphgate binary while many large replies are in flight: the simulated
//! Graph API (in a child process, so its own buffers are not counted) answers every call with
//! a `SIZE_MB` MiB JSON body; `CLIENTS` clients each send one uncached read at once and start
//! reading only after every reply has had time to arrive, so all of them are buffered
//! together. Prints graphgate's peak RSS (VmHWM) and how many clients got 200 and 503, for
//! the given `upstream.max_buffered_reply_bytes` (`BUDGET_MB`; a huge value means no bound).
//!
//! ```text
//! cargo build --release --bin graphgate --example reply_memory
//! target/release/examples/reply_memory 64 15 256     # CLIENTS SIZE_MB BUDGET_MB
//! target/release/examples/reply_memory 64 15 100000  # no effective bound
//! ```
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fake_graph::{FakeGraph, FakeGraphConfig, Fault};

const TOKEN: &str = "EAAG-reply-memory-system-token";
const KEY: &str = "reply-memory-client-key";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("graph") {
        let size: usize = args[2].parse().expect("size in bytes");
        return run_graph(size);
    }
    let clients: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(64);
    let size_mb: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(15);
    let budget_mb: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(256);
    let bin = std::env::var("GG_BIN").unwrap_or_else(|_| "target/release/graphgate".into());

    // The simulated Graph API in a child process; it prints its URL.
    let mut graph = Command::new(std::env::current_exe().unwrap())
        .args(["graph", &(size_mb << 20).to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(graph.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let graph_url = line.trim().to_string();

    let port = free_port();
    let admin = free_port();
    let dir = std::env::temp_dir().join(format!("gg-reply-memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("graphgate.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
             [upstream]\nurl = \"{graph_url}\"\ntimeout_ms = 60000\nretries = 0\n\
             max_buffered_reply_bytes = {}\n\
             [credentials]\nsystem_user_token = \"{TOKEN}\"\n\
             [[clients]]\nname = \"m\"\nkey = \"{KEY}\"\npages = [\"*\"]\n[log]\nlevel = \"warn\"\n\
             [quota]\npage_calls = 100000000\npage_window_s = 1\n",
            budget_mb << 20
        ),
    )
    .unwrap();
    let mut gw = Command::new(&bin)
        .args(["serve", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "graphgate did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let rss_idle = vm_kb(gw.id(), "VmRSS");

    let started = Instant::now();
    let conns: Vec<TcpStream> = (0..clients)
        .map(|i| {
            let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
            write!(
                c,
                "GET /v21.0/1001?fields=id&n={i}&access_token={KEY} HTTP/1.1\r\nHost: x\r\n\
                 Cache-Control: no-store\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            c
        })
        .collect();
    // Let every reply arrive (and be buffered) before anyone reads.
    std::thread::sleep(Duration::from_secs(5));
    let readers: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = c.read_to_end(&mut buf);
                buf.get(9..12)
                    .and_then(|s| std::str::from_utf8(s).ok())
                    .unwrap_or("---")
                    .to_string()
            })
        })
        .collect();
    let statuses: Vec<String> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    let took = started.elapsed();
    let peak = vm_kb(gw.id(), "VmHWM");
    let count = |s: &str| statuses.iter().filter(|x| *x == s).count();
    if std::env::var("GG_DEBUG").is_ok() {
        eprintln!("{statuses:?}");
    }
    println!(
        "clients={clients} reply={size_mb} MiB budget={budget_mb} MiB: peak RSS {:.0} MiB \
         (idle {:.0} MiB); 200: {}, 503: {}, other: {}; {:.1} s",
        peak as f64 / 1024.0,
        rss_idle as f64 / 1024.0,
        count("200"),
        count("503"),
        clients - count("200") - count("503"),
        took.as_secs_f64()
    );
    let _ = gw.kill();
    let _ = gw.wait();
    let _ = graph.kill();
    let _ = graph.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

fn run_graph(size: usize) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let cfg = FakeGraphConfig {
            system_user_tokens: vec![TOKEN.to_string()],
            app_secret: None,
            ..FakeGraphConfig::default()
        };
        let g = FakeGraph::start(cfg, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        g.set_record_limit(0);
        g.set_fault(Fault::LargeReply(size));
        println!("{}", g.url());
        std::io::stdout().flush().unwrap();
        std::future::pending::<()>().await;
    });
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `Vm*` line of /proc/PID/status, in kB.
fn vm_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
