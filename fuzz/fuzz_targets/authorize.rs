//! Request parsing, authorization and upstream-request building together: whatever bytes a
//! client sends, if graphgate authorizes the request, the HTTP request it builds for Graph,
//! read back the way the simulated Graph reads requests (`fake_graph::interpret`), does only
//! what the client may do, and carries no client key.
#![no_main]
use bytes::Bytes;
use fake_graph::interpret;
use graphgate::auth::ClientRegistry;
use graphgate::config::{ClientConfig, KeyDigest, Priority, Secret};
use graphgate::proxy::{authorize, parse_call, upstream_request};
use graphgate::tokens::Injected;
use graphgate::upstream::http_request;
use http::{HeaderMap, HeaderValue, Method, Uri};
use libfuzzer_sys::fuzz_target;

const READER_KEY: &str = "reader-key-1001";
const WRITER_KEY: &str = "writer-key-1001";
const SYSTEM: &str = "EAAGsystemtoken0001";
const CONTENT_TYPES: [&str; 8] = [
    "",
    "application/x-www-form-urlencoded",
    "application/json",
    "multipart/form-data; boundary=b",
    "text/plain",
    "Application/X-WWW-Form-Urlencoded; charset=UTF-8",
    "application/json; charset=utf-16",
    "multipart/form-data; boundary=\"b\"",
];
const METHODS: [&str; 4] = ["GET", "POST", "DELETE", "HEAD"];

fn client(name: &str, key: &str, write: bool) -> ClientConfig {
    ClientConfig {
        name: name.into(),
        key_sha256: Some(KeyDigest::of(key)),
        cert_subject: None,
        pages: Some(vec!["1001".into()]),
        write,
        priority: Priority::Interactive,
    }
}

/// Page 1001 and its posts.
fn within_1001(node: &str) -> bool {
    node == "1001"
        || node
            .strip_prefix("1001_")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
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
    let method = Method::from_bytes(METHODS[usize::from(selector & 3)].as_bytes())
        .expect("static method");
    let mut headers = HeaderMap::new();
    let ct = CONTENT_TYPES[usize::from((selector >> 2) & 7)];
    if !ct.is_empty() {
        headers.insert("content-type", HeaderValue::from_static(ct));
    }
    let key = if selector & 0x40 != 0 {
        WRITER_KEY
    } else {
        READER_KEY
    };
    if selector & 0x80 != 0 {
        headers.insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {key}")).expect("ASCII key"),
        );
    }

    let registry = ClientRegistry::new(&[
        client("reader", READER_KEY, false),
        client("writer", WRITER_KEY, true),
    ]);
    let Ok(call) = parse_call(&method, &uri, &headers, Bytes::copy_from_slice(body)) else {
        return;
    };
    let Ok((client, key)) =
        registry.authenticate(&headers, &http::Extensions::new(), call.presented_tokens())
    else {
        return;
    };
    if authorize(&registry, &client, &key, &call).is_err() {
        return;
    }
    let system = Injected {
        token: Secret::new(SYSTEM),
        proof: Some("0f".repeat(32)),
        identity: "system".into(),
    };
    let Ok(req) = upstream_request(&call, &system, &system) else {
        return;
    };
    let Ok(http) = http_request("https://graph.test", 300, req) else {
        return;
    };

    // The keys the request presented (graphgate holds only digests of the others) are nowhere
    // in what goes to Graph.
    let mut keys = vec![key.clone()];
    keys.extend(
        call.batch
            .iter()
            .flatten()
            .filter_map(|op| op.own_token().map(str::to_string)),
    );
    let mut wire = http.uri().to_string().into_bytes();
    for (n, v) in http.headers() {
        wire.extend_from_slice(n.as_str().as_bytes());
        wire.extend_from_slice(v.as_bytes());
    }
    wire.extend_from_slice(http.body());
    for k in keys.iter().filter(|k| !k.is_empty()) {
        assert!(
            !wire.windows(k.len()).any(|w| w == k.as_bytes()),
            "a client key goes upstream: {}",
            String::from_utf8_lossy(&wire)
        );
    }

    // What Graph would run is within the client's rights.
    for done in interpret(&http) {
        if !done.is_batch {
            assert!(
                client.write || done.verb == "GET",
                "{} may not {}: {done:?} from {target} {:?}",
                client.name,
                done.verb,
                String::from_utf8_lossy(body)
            );
        }
        let nodes = done
            .segments
            .first()
            .into_iter()
            .chain(&done.ids)
            .chain(&done.root_id);
        for node in nodes {
            assert!(
                within_1001(node),
                "{} reached {node}: {done:?} from {target} {:?}",
                client.name,
                String::from_utf8_lossy(body)
            );
        }
        if let Some(f) = &done.fields {
            assert!(
                !f.to_ascii_lowercase().contains("access_token"),
                "token field: {done:?}"
            );
        }
        assert_eq!(done.token.as_deref(), Some(SYSTEM), "{done:?}");
    }
});
