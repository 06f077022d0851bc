//! The least a hyper server does per reply on this machine: graphgate's server layout (one
//! one-thread tokio runtime per worker, each accepting on its own `SO_REUSEPORT` socket,
//! hyper-util's auto builder with hyper's per-request head timer off, mimalloc) answering
//! every request with one fixed body from memory: no stack, no cache, no parsing beyond
//! hyper's.
//! benches/load/compare.sh runs it as the target "hyper floor" beside nginx's `return 200`
//! floor, so a hit's CPU splits into what hyper and tokio cost and what graphgate adds.
//!
//! ```text
//! cargo build --release --example hyper_floor
//! target/release/examples/hyper_floor 127.0.0.1:18093 body.json [workers]
//! ```
//! Serves `body.json` with `Content-Type: application/json; charset=UTF-8` (what Graph and
//! the compare script's floor send) on the address, with `workers` threads (default 2, as
//! graphgate on a 2-core machine).

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{header, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(addr), Some(body)) = (args.first(), args.get(1)) else {
        eprintln!("usage: hyper_floor ADDR BODY_FILE [WORKERS]");
        std::process::exit(2);
    };
    let addr: SocketAddr = addr.parse().expect("ADDR: host:port");
    let body = Bytes::from(std::fs::read(body)?);
    let workers: usize = args
        .get(2)
        .map_or(2, |w| w.parse().expect("WORKERS: a number"));
    graphgate::allocator::tune();

    let threads: Vec<_> = (0..workers)
        .map(|i| {
            let body = body.clone();
            std::thread::Builder::new()
                .name(format!("hyper-floor-{i}"))
                .spawn(move || serve(addr, body))
        })
        .collect::<std::io::Result<_>>()?;
    for t in threads {
        t.join().expect("worker")?;
    }
    Ok(())
}

/// One worker: accepts on its own socket and serves each connection on its own runtime.
fn serve(addr: SocketAddr, body: Bytes) -> std::io::Result<()> {
    // As graphgate's workers: the multi-threaded scheduler with one thread, which does the
    // work while this one waits.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let worker = runtime.spawn(async move {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(1024)?;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder.http1().header_read_timeout(None);
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let (builder, body) = (builder.clone(), body.clone());
            tokio::spawn(async move {
                let service = service_fn(move |_: Request<Incoming>| {
                    let reply = Response::builder()
                        .header(header::CONTENT_TYPE, "application/json; charset=UTF-8")
                        .body(Full::new(body.clone()))
                        .expect("a static reply");
                    std::future::ready(Ok::<_, Infallible>(reply))
                });
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    runtime
        .block_on(worker)
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}
