//! Fires N requests at once, each on its own fresh connection, and prints latency
//! percentiles: the "500 concurrent cold requests for one key" client of
//! benches/load/compare.sh (wrk cannot start exactly N requests together).
//!
//! All N connections are opened first; then every request is written at the same moment
//! (behind a barrier) and the clock for each starts just before its write. Requests carry
//! `Connection: close` and a reply is read to EOF.
//!
//! A `{i}` in the URL becomes the request's number (0..N) and a `{j}` its number modulo 60
//! plus one (the simulated Graph's nodes of a Page are `{page}_1` to `{page}_60`), so the N
//! requests are for N different keys: the "distinct reads at once" client.
//!
//! ```text
//! cargo run --release --example burst -- URL [N=500] [TIMEOUT_S=30]
//! ```
//! Output (one line, for scripts): `n=500 ok=500 p50_ms=201.3 p90_ms=... p99_ms=... max_ms=... min_ms=... p10_ms=...`

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Barrier;

fn parse_url(url: &str) -> (String, String) {
    let rest = url
        .strip_prefix("http://")
        .expect("burst speaks plain http:// only");
    match rest.find('/') {
        Some(i) => (rest[..i].to_string(), rest[i..].to_string()),
        None => (rest.to_string(), "/".to_string()),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(url) = args.first() else {
        eprintln!("usage: burst URL [N=500] [TIMEOUT_S=30]");
        std::process::exit(2);
    };
    let n: usize = args
        .get(1)
        .map_or(500, |s| s.parse().expect("N is a number"));
    let timeout = Duration::from_secs(args.get(2).map_or(30, |s| s.parse().expect("seconds")));
    let (host, path) = parse_url(url);
    let request = |i: usize| {
        let path = path
            .replace("{i}", &i.to_string())
            .replace("{j}", &(i % 60 + 1).to_string());
        format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: graphgate-burst\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        )
    };
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        let s = TcpStream::connect(&host).await.expect("connect");
        s.set_nodelay(true).ok();
        streams.push(s);
    }
    let barrier = Arc::new(Barrier::new(n));
    let mut tasks = Vec::with_capacity(n);
    for (i, mut s) in streams.into_iter().enumerate() {
        let (barrier, request) = (barrier.clone(), request(i));
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let started = Instant::now();
            let io = async {
                s.write_all(request.as_bytes()).await?;
                let mut buf = Vec::with_capacity(4096);
                s.read_to_end(&mut buf).await?;
                Ok::<_, std::io::Error>(buf)
            };
            match tokio::time::timeout(timeout, io).await {
                Ok(Ok(buf)) => {
                    let ok = buf.starts_with(b"HTTP/1.1 200") || buf.starts_with(b"HTTP/1.0 200");
                    (started.elapsed(), ok)
                }
                _ => (started.elapsed(), false),
            }
        }));
    }
    let mut lat = Vec::with_capacity(n);
    let mut ok = 0;
    for t in tasks {
        let (d, good) = t.await.expect("task");
        if good {
            ok += 1;
        }
        lat.push(d);
    }
    lat.sort();
    let pct = |p: f64| {
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i].as_secs_f64() * 1000.0
    };
    println!(
        "n={n} ok={ok} p50_ms={:.1} p90_ms={:.1} p99_ms={:.1} max_ms={:.1} min_ms={:.1} p10_ms={:.1}",
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(1.0),
        pct(0.0),
        pct(0.10)
    );
}
