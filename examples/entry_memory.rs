//! Memory per cached entry, without sockets: stores N entries of a 1 KB body straight into
//! the in-process cache (as a fill would: body sliced from a larger read buffer, the headers
//! Graph sends: five of them are replayed) and prints RSS growth per entry. Uses the binary's allocator (mimalloc).
//! The body is compare.sh's; `GG_BODY=varied` stores a 1 KB feed of varied words, ids and
//! times instead (it compresses less), `GG_BODY_FILE=path` that file's bytes, and
//! `GG_NO_COMPRESS=1` turns `[cache] compress` off. Every entry is a read of node `1001`
//! unless `GG_NODES=distinct` gives each its own node, a 15-digit id as Graph's Page ids
//! (the node index then holds one node per entry).
//!
//! ```text
//! cargo run --release --example entry_memory -- 300000
//! ```
use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use graphgate::cache::entry::Entry;
use graphgate::cache::{key, Cache};
use graphgate::config::CacheConfig;
use graphgate::graph::request::Params;
use graphgate::metrics::Metrics;
use graphgate::rewrite::PreparedBody;
use http::{HeaderName, HeaderValue, StatusCode};

/// mimalloc (as the binary uses) plus counts of live bytes and allocations.
struct Counting;
static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);
static LIVE_ALLOCS: AtomicI64 = AtomicI64::new(0);
static BY_SIZE: [AtomicI64; 4097] = [const { AtomicI64::new(0) }; 4097];
fn by_size(n: usize, d: i64) {
    BY_SIZE[n.min(4096)].fetch_add(d, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(l.size() as i64, Ordering::Relaxed);
        LIVE_ALLOCS.fetch_add(1, Ordering::Relaxed);
        by_size(l.size(), 1);
        unsafe { mimalloc::MiMalloc.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE_BYTES.fetch_sub(l.size() as i64, Ordering::Relaxed);
        LIVE_ALLOCS.fetch_sub(1, Ordering::Relaxed);
        by_size(l.size(), -1);
        unsafe { mimalloc::MiMalloc.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new as i64 - l.size() as i64, Ordering::Relaxed);
        by_size(l.size(), -1);
        by_size(new, 1);
        unsafe { mimalloc::MiMalloc.realloc(p, l, new) }
    }
}

#[path = "../benches/common/mod.rs"]
mod common;

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map_or(300_000, |s| s.parse().expect("count"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let cfg = CacheConfig {
            max_bytes: 8 << 30,
            default_ttl: Duration::from_secs(3600),
            stale_while_revalidate: Duration::from_secs(60),
            stale_if_error: Duration::from_secs(600),
            compress: std::env::var_os("GG_NO_COMPRESS").is_none(),
            project_fields: true,
            recall_hits: true,
            union_window: Duration::ZERO,
            merge_window: Duration::ZERO,
            rules: Vec::new(),
        };
        let cache = Cache::new(&cfg, Arc::new(Metrics::new()));
        // The body compare.sh serves (1024 B of Graph-like JSON), or GG_BODY_FILE's bytes,
        // placed inside a larger read buffer as hyper hands it over.
        let body = match (std::env::var_os("GG_BODY_FILE"), std::env::var("GG_BODY")) {
            (Some(f), _) => std::fs::read(f).expect("GG_BODY_FILE"),
            (None, Ok(b)) if b == "varied" => common::varied_feed().to_vec(),
            _ => common::compare_node().to_vec(),
        };
        let body_len = body.len();
        let mut read_buffer = vec![b' '; 100];
        read_buffer.extend_from_slice(&body);
        read_buffer.resize(8192.max(body_len + 200), b' ');
        let read_buffer = Bytes::from(read_buffer);
        let headers = vec![
            (
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json; charset=UTF-8"),
            ),
            (
                HeaderName::from_static("facebook-api-version"),
                HeaderValue::from_static("v21.0"),
            ),
            (
                HeaderName::from_static("x-fb-trace-id"),
                HeaderValue::from_static("AbCdEfGhIjK"),
            ),
            (
                HeaderName::from_static("x-fb-request-id"),
                HeaderValue::from_static("A1b2C3d4E5f6G7h8I9j0K1l"),
            ),
            (
                HeaderName::from_static("x-fb-rev"),
                HeaderValue::from_static("1019734581"),
            ),
            (
                http::header::ETAG,
                HeaderValue::from_static("\"4e0e2bd1c5f6b3a0f3b8d1c2a9e7f6d5b4c3a291\""),
            ),
            (
                HeaderName::from_static("x-business-use-case-usage"),
                HeaderValue::from_static("{\"1001\":[{\"type\":\"pages\",\"call_count\":1}]}"),
            ),
        ];
        let distinct_nodes = std::env::var("GG_NODES").is_ok_and(|v| v == "distinct");
        let mut segs = vec!["1001".to_string()];
        let before = rss_kb();
        let (b0, a0) = (LIVE_BYTES.load(Ordering::Relaxed), LIVE_ALLOCS.load(Ordering::Relaxed));
        for i in 0..n {
            let q = format!("fields=id,name,about,category,fan_count,link,description&k={i}");
            let params = Params::parse(&q).expect("params");
            if distinct_nodes {
                segs[0] = format!("{}", 104_000_000_000_000u64 + i as u64);
            }
            let k = key::build("v21.0", &segs, &params, "system").expect("key");
            let e = Entry::new(
                StatusCode::OK,
                headers.clone(),
                PreparedBody::plain(read_buffer.slice(100..100 + body_len)),
                Duration::from_secs(3600),
            );
            let epoch = cache.epoch(&k);
            cache.store(&k, &e, epoch);
        }
        let (entries, weight) = cache.settle();
        let after = rss_kb();
        for (size, c) in BY_SIZE.iter().enumerate() {
            let c = c.load(Ordering::Relaxed);
            if c > entries as i64 / 2 {
                println!("  size {size}: {:.2} per entry", c as f64 / entries as f64);
            }
        }
        let (b1, a1) = (LIVE_BYTES.load(Ordering::Relaxed), LIVE_ALLOCS.load(Ordering::Relaxed));
        println!(
            "live bytes per entry {:.0}, live allocations per entry {:.1}",
            (b1 - b0) as f64 / entries as f64,
            (a1 - a0) as f64 / entries as f64
        );
        let per = (after - before) as f64 * 1024.0 / entries as f64;
        println!(
            "entries={entries} weight_per_entry={} rss_growth_per_entry={per:.0} B ({:.2}x of {body_len} B)",
            weight / entries.max(1),
            per / body_len as f64
        );
    });
}
