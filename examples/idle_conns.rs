//! Holds N keep-alive connections open and idle: the "connections held by other clients"
//! of the connection scale curve in benches/load/compare.sh (`IDLE_CONNS`).
//!
//! Opens N connections (at most 256 connecting at once), sends one GET on each and reads
//! its reply's first bytes, so every connection is a served HTTP/1.1 keep-alive connection;
//! then prints `ready N` and keeps them open until it gets SIGINT.
//!
//! ```text
//! cargo run --release --example idle_conns -- URL N
//! ```

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(url), Some(n)) = (args.first(), args.get(1)) else {
        eprintln!("usage: idle_conns URL N");
        std::process::exit(2);
    };
    let n: usize = n.parse().expect("N is a number");
    let rest = url
        .strip_prefix("http://")
        .expect("idle_conns speaks plain http:// only");
    let (host, path) = match rest.find('/') {
        Some(i) => (rest[..i].to_string(), rest[i..].to_string()),
        None => (rest.to_string(), "/".to_string()),
    };
    let request = Arc::new(format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: idle_conns\r\n\r\n"
    ));
    let connecting = Arc::new(Semaphore::new(256));
    let mut opening = Vec::with_capacity(n);
    for _ in 0..n {
        let (host, request, connecting) = (host.clone(), request.clone(), connecting.clone());
        opening.push(tokio::spawn(async move {
            let _permit = connecting.acquire_owned().await.ok()?;
            let mut s = TcpStream::connect(&host).await.ok()?;
            s.write_all(request.as_bytes()).await.ok()?;
            let mut first = [0u8; 512];
            let got = s.read(&mut first).await.ok()?;
            first[..got].starts_with(b"HTTP/1.1 200").then_some(s)
        }));
    }
    let mut held = Vec::with_capacity(n);
    for o in opening {
        if let Ok(Some(s)) = o.await {
            held.push(s);
        }
    }
    println!("ready {}", held.len());
    let _ = tokio::signal::ctrl_c().await;
    drop(held);
}
