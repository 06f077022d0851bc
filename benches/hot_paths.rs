//! Criterion benches for the per-request hot paths that need no sockets: request parsing,
//! fields canonicalisation, cache key building, paging-link rewrite of a 100 KB feed page,
//! encoding an upstream query, usage-header parsing, storing/reading a cached body
//! LZ4-compressed, and storing/reading an entry in the in-process tier.
//! See benches/README.md for what each measures and the figures on the project machine.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use graphgate::cache::entry::Entry;
use graphgate::cache::key::{self, KeyId};
use graphgate::cache::projection::ProjectionIndex;
use graphgate::graph::fields::{canonicalize, Fields};
use graphgate::graph::request::Params;
use graphgate::graph::usage::{
    parse_app_usage, parse_app_usage_shared, parse_buc_usage, parse_buc_usage_shared,
};
use graphgate::proxy::parse_call;
use graphgate::rewrite;
use std::hint::black_box;

mod common;

fn request_parsing(c: &mut Criterion) {
    let uri: http::Uri = "/v21.0/1001?fields=name,id,about,fan_count,feed.limit(5){message,created_time}&access_token=key-reader-1001"
        .parse()
        .expect("valid uri");
    let mut headers = http::HeaderMap::new();
    headers.insert(
        "user-agent",
        "facebook-python-business-sdk".parse().expect("ascii"),
    );
    c.bench_function("parse_call GET node with fields", |b| {
        b.iter(|| {
            parse_call(&http::Method::GET, black_box(&uri), &headers, Bytes::new()).expect("parses")
        })
    });
    let fields = "name,id,about,fan_count,feed.limit(5){message,created_time,comments.limit(3){from,message}},id";
    c.bench_function("fields canonicalise (nested, 9 fields)", |b| {
        b.iter(|| canonicalize(black_box(fields)).expect("valid"))
    });
    // What a miss normalizes (up to three times: the fill's key, the union gathering, the
    // served reply's check): a flat list, as most reads send, and a nested one.
    let flat = Fields::parse("id,name,about,category,fan_count").expect("valid");
    c.bench_function("fields normalize (flat, 5 names)", |b| {
        b.iter(|| black_box(&flat).normalized())
    });
    let nested = Fields::parse(fields).expect("valid");
    c.bench_function("fields normalize (nested, 9 fields)", |b| {
        b.iter(|| black_box(&nested).normalized())
    });
    // The cache key of a parsed call: filter, canonicalise `fields`, sort, serialise, SHA-256.
    let params = Params::parse(
        "fields=name,id,about,fan_count,feed.limit(5){message,created_time}&limit=5&access_token=k",
    )
    .expect("params");
    let segs = vec!["1001".to_string()];
    c.bench_function(
        "cache key build (node, 5 fields + nested edge, 1 param)",
        |b| {
            b.iter(|| {
                key::build("v21.0", black_box(&segs), black_box(&params), "system").expect("key")
            })
        },
    );
    let simple = Params::parse("fields=id,name&access_token=k").expect("params");
    c.bench_function("cache key build (node, fields=id,name)", |b| {
        b.iter(|| key::build("v21.0", black_box(&segs), black_box(&simple), "system").expect("key"))
    });
}

/// A feed page like Graph's: 100 posts, ~100 KB, escaped slashes, a token-bearing next link.
fn feed_page() -> Bytes {
    let posts: Vec<String> = (0..100)
        .map(|i| {
            format!(
                r#"{{"id":"1001_{i}","message":"{}","created_time":"2026-01-01T00:00:00+0000","permalink_url":"https:\/\/www.facebook.com\/1001\/posts\/{i}"}}"#,
                "lorem ipsum dolor sit amet ".repeat(36)
            )
        })
        .collect();
    Bytes::from(format!(
        r#"{{"data":[{}],"paging":{{"cursors":{{"before":"QVFIUm","after":"QVFIUn"}},"next":"https:\/\/graph.facebook.com\/v21.0\/1001\/feed?access_token=EAAGsystemtoken123&appsecret_proof=abcdef&limit=100&after=QVFIUn"}}}}"#,
        posts.join(",")
    ))
}

fn paging_rewrite(c: &mut Criterion) {
    let body = feed_page();
    let secrets = rewrite::Secrets::new(["EAAGsystemtoken123", "app-secret-xyz"]);
    let mut g = c.benchmark_group("paging rewrite");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("prepare 100 KB feed page", |b| {
        b.iter_batched(
            || body.clone(),
            |body| rewrite::prepare(body, false, "http://graphgate.internal:8080", &secrets),
            BatchSize::SmallInput,
        )
    });
    let prepared = rewrite::prepare(
        body.clone(),
        false,
        "http://graphgate.internal:8080",
        &secrets,
    )
    .expect("the feed page prepares");
    g.bench_function("finalize (insert client key)", |b| {
        b.iter(|| rewrite::finalize(black_box(&prepared), "key-reader-1001"))
    });
    let plain = Bytes::from(r#"{"id":"1001","name":"Acme Coffee","fan_count":12345}"#);
    g.bench_function("prepare small node reply (no paging)", |b| {
        b.iter(|| rewrite::prepare(black_box(plain.clone()), false, "http://g", &secrets))
    });
    g.finish();
}

fn cached_bodies(c: &mut Criterion) {
    let mut g = c.benchmark_group("cached body");
    for (name, body) in [
        ("1 KB node", common::compare_node()),
        ("varied feed", common::varied_feed()),
    ] {
        let entry = Entry::new(
            http::StatusCode::OK,
            Vec::new(),
            rewrite::PreparedBody::plain(body.clone()),
            std::time::Duration::from_secs(60),
        );
        // A readable key of the usual length: it is packed with the body.
        let readable = "system|v21.0/1001/feed?fields=id,message,created_time&limit=25";
        let stored = entry.for_storage(true, readable);
        let size = stored.body().map(|b| b.bytes.len()).unwrap_or(0);
        println!(
            "{name}: {} B, stored {} B (compressed: {})",
            body.len(),
            stored.weight() as usize - readable.len() - (entry.weight() as usize - body.len()),
            stored.is_compressed()
        );
        assert_eq!(size, body.len());
        g.bench_function(format!("store {name} (compress)"), |b| {
            b.iter(|| black_box(&entry).for_storage(true, readable))
        });
        g.bench_function(format!("read {name} (decompress)"), |b| {
            b.iter(|| black_box(&stored).body())
        });
    }
    g.finish();
}

/// The in-process tier's store and read of one entry (200 B body, below compression, and
/// the five headers Graph's replies carry that are replayed): a fill's store, a hit's read of
/// body and headers.
fn in_process_tier(c: &mut Criterion) {
    let gw = common::gateway("http://127.0.0.1:9");
    let key = common::key_for(&gw, "/v21.0/1001?fields=id,name");
    let mut entry = common::entry(Bytes::from(vec![b'x'; 200]));
    for (name, value) in [
        ("facebook-api-version", "v21.0"),
        ("x-fb-trace-id", "AbCdEfGhIjK"),
        ("x-fb-request-id", "A1b2C3d4E5f6G7h8I9j0K1l"),
        ("x-fb-rev", "1019734581"),
        ("etag", "\"4e0e2bd1c5f6b3a0f3b8d1c2a9e7f6d5b4c3a291\""),
    ] {
        let mut headers = entry.headers.to_vec();
        headers.push((
            http::HeaderName::from_static(name),
            http::HeaderValue::from_static(value),
        ));
        entry.headers = headers.into();
    }
    let mut g = c.benchmark_group("in-process tier");
    g.bench_function("store an entry (200 B, 5 headers)", |b| {
        b.iter(|| {
            gw.cache
                .store(&key, black_box(&entry), gw.cache.epoch(&key))
        })
    });
    assert!(gw.cache.store(&key, &entry, gw.cache.epoch(&key)));
    g.bench_function("read an entry (body and headers)", |b| {
        b.iter(|| {
            let e = gw.cache.get(black_box(&key)).expect("stored");
            let body = e.body().expect("plain");
            (body.bytes.len(), e.headers.iter().count())
        })
    });
    g.finish();
}

fn usage_headers(c: &mut Criterion) {
    let buc = r#"{"1001":[{"type":"pages","call_count":12,"total_cputime":3,"total_time":4,"estimated_time_to_regain_access":0}],"1002":[{"type":"pages","call_count":80,"total_cputime":40,"total_time":41,"estimated_time_to_regain_access":0}]}"#;
    let app = r#"{"call_count":28,"total_time":25,"total_cputime":25}"#;
    c.bench_function("parse X-Business-Use-Case-Usage (2 Pages)", |b| {
        b.iter(|| parse_buc_usage(black_box(buc)))
    });
    c.bench_function("parse X-App-Usage", |b| {
        b.iter(|| parse_app_usage(black_box(app)))
    });
    // What learning from a reply does: the worker's last parse is reused for the same bytes.
    let other = buc.replace("\"call_count\":12", "\"call_count\":13");
    c.bench_function(
        "parse X-Business-Use-Case-Usage, remembered, same as the last",
        |b| b.iter(|| parse_buc_usage_shared(black_box(buc))),
    );
    c.bench_function(
        "parse X-Business-Use-Case-Usage, remembered, another each time",
        |b| {
            let mut flip = false;
            b.iter(|| {
                flip = !flip;
                parse_buc_usage_shared(black_box(if flip { buc } else { &other }))
            })
        },
    );
    c.bench_function("parse X-App-Usage, remembered, same as the last", |b| {
        b.iter(|| parse_app_usage_shared(black_box(app)))
    });
}

/// The query of an upstream read as it is sent: the fields, the injected system-user token
/// and appsecret_proof (a miss encodes it once).
fn upstream_query(c: &mut Criterion) {
    let params = Params::parse(&format!(
        "fields=id,name,about,fan_count&limit=25&access_token={}&appsecret_proof={}",
        "EAAB".repeat(48),
        "3f".repeat(32)
    ))
    .expect("valid query");
    c.bench_function("upstream query encode (fields, token, proof)", |b| {
        b.iter(|| black_box(&params).encode())
    });
}

/// The projection index on a miss: every stored node reply is recorded under its base (the
/// read without `fields`), and a read whose key misses asks which stored reply covers it.
/// Measured full, as a long-running replica's index is: every record of a new base evicts one.
fn projection_index(c: &mut Criterion) {
    let index = ProjectionIndex::default();
    let fields = Fields::parse("id,name,about,category,fan_count").expect("valid");
    let want = Fields::parse("id,name").expect("valid");
    let mut n: u128 = 0;
    let mut next = || {
        n += 1;
        // Keys are digests: spread the bits as a digest would.
        KeyId(n.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835))
    };
    for _ in 0..300_000 {
        let base = next();
        index.record(base, fields.clone(), next());
    }
    let mut g = c.benchmark_group("projection index");
    g.bench_function("record a new base (index full)", |b| {
        b.iter_batched(
            || (next(), next()),
            |(base, key)| index.record(base, fields.clone(), key),
            BatchSize::SmallInput,
        )
    });
    let known = next();
    index.record(known, fields.clone(), next());
    g.bench_function("covering, base known", |b| {
        b.iter(|| index.covering(black_box(known), &want))
    });
    g.bench_function("covering, base unknown", |b| {
        b.iter_batched(
            &mut next,
            |base| index.covering(base, &want),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(
    benches,
    request_parsing,
    upstream_query,
    paging_rewrite,
    cached_bodies,
    in_process_tier,
    usage_headers,
    projection_index
);
criterion_main!(benches);
