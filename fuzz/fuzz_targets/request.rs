//! Query/body parsing: `Params::parse` (round-trips through `encode`), `parse_batch`,
//! `GraphPath::parse`, and `proxy::parse_call` on arbitrary method, target, content type and
//! body. Nothing may panic; a parsed call's upstream path parses again.
#![no_main]
use bytes::Bytes;
use graphgate::graph::request::{parse_batch, GraphPath, Params};
use graphgate::proxy::parse_call;
use http::{HeaderMap, HeaderValue, Method, Uri};
use libfuzzer_sys::fuzz_target;

const CONTENT_TYPES: [&str; 5] = [
    "",
    "application/x-www-form-urlencoded",
    "application/json",
    "multipart/form-data; boundary=x",
    "text/plain",
];
const METHODS: [&str; 5] = ["GET", "POST", "DELETE", "HEAD", "PUT"];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);

    // Parameters: parse ∘ encode is the identity on what parses.
    if let Ok(p) = Params::parse(&text) {
        let again = Params::parse(&p.encode()).expect("encoded params parse");
        assert_eq!(again, p, "params round trip for {text:?}");
    }
    let _ = parse_batch(&text);
    if let Ok(path) = GraphPath::parse(&text) {
        let up = path.to_upstream_path();
        let again = GraphPath::parse(&up).expect("upstream path parses");
        assert_eq!(again.segments, path.segments);
    }

    // A whole request: target | body, split at the first NUL.
    let (target, body) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let Ok(target) = std::str::from_utf8(target) else {
        return;
    };
    let target = if target.starts_with('/') {
        target.to_string()
    } else {
        format!("/{target}")
    };
    let Ok(uri) = target.parse::<Uri>() else {
        return;
    };
    let method = Method::from_bytes(METHODS[usize::from(selector) % METHODS.len()].as_bytes())
        .expect("static method");
    let mut headers = HeaderMap::new();
    let ct = CONTENT_TYPES[usize::from(selector >> 3) % CONTENT_TYPES.len()];
    if !ct.is_empty() {
        headers.insert("content-type", HeaderValue::from_static(ct));
    }
    if selector & 0x80 != 0 {
        headers.insert("x-graphgate-max-wait-ms", HeaderValue::from_static("5"));
        headers.insert("x-graphgate-page", HeaderValue::from_static("1001"));
    }
    if let Ok(call) = parse_call(&method, &uri, &headers, Bytes::copy_from_slice(body)) {
        let _ = call.route();
        let _ = call.page();
        assert!(
            call.params.get("access_token").is_none(),
            "key left in params"
        );
        let up = call.path.to_upstream_path();
        GraphPath::parse(&up).expect("upstream path parses");
    }
});
