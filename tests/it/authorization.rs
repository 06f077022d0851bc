//! Authorization holds for every request shape: whatever a client sends (any body type,
//! repeated parameters, casing and percent-encodings, batch operations, field modifiers), the
//! simulated Graph's own log of what it executed shows nothing the client may not do. The
//! property test generates the shapes; the named tests pin the cases that once got through.

use std::time::Duration;

use bytes::Bytes;
use fake_graph::{ExecutedCall, FakeGraph, FakeGraphConfig, Fault};
use http::{Method, StatusCode};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};

use crate::support::*;

/// A graphgate whose quota and the simulated Graph's limits stay out of the way: these tests
/// are about what reaches Graph, not when.
async fn stack() -> Stack {
    let graph = FakeGraphConfig {
        page_calls_limit: 1_000_000,
        app_calls_limit: 1_000_000,
        ..graph_config()
    };
    Stack::start_with(graph, "[quota]\npage_calls = 10000000\n").await
}

/// Page 1001 and its posts: all the read-only test client may touch.
fn reader_may_touch(node: &str) -> bool {
    node == "1001"
        || node
            .strip_prefix("1001_")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Everything Graph executed since the log was last cleared is something the read-only
/// client limited to Page 1001 may do, and no client key reached Graph.
fn assert_within_reader_rights(graph: &FakeGraph, what: &str) {
    for call in graph.executed() {
        let ExecutedCall {
            verb,
            segments,
            ids,
            fields,
            token,
            root_id,
            is_batch,
            ..
        } = &call;
        // A batch is a POST; what it does is in its operations, logged one by one.
        if !is_batch {
            assert_eq!(*verb, "GET", "a write reached Graph for {what}: {call:?}");
        }
        let nodes = segments.first().into_iter().chain(ids).chain(root_id);
        for node in nodes {
            assert!(
                reader_may_touch(node),
                "Graph read `{node}` for {what}: {call:?}"
            );
        }
        if let Some(f) = fields {
            assert!(
                !f.to_ascii_lowercase().contains("access_token"),
                "a token field reached Graph for {what}: {call:?}"
            );
        }
        assert_eq!(
            token.as_deref(),
            Some(SYSTEM_TOKEN),
            "Graph ran a call with another token for {what}: {call:?}"
        );
    }
    assert_no_client_key_upstream(graph, what);
}

/// No request Graph received carries a client key: not in the query, body, files or headers.
fn assert_no_client_key_upstream(graph: &FakeGraph, what: &str) {
    for req in graph.requests() {
        let mut texts: Vec<String> = Vec::new();
        for (k, v) in req.query.iter().chain(&req.form).chain(&req.headers) {
            texts.push(format!("{k}={v}"));
        }
        for f in &req.files {
            texts.push(String::from_utf8_lossy(&f.data).into_owned());
        }
        for t in texts {
            for key in [READER_KEY, ADMIN_KEY] {
                assert!(
                    !t.contains(key),
                    "a client key reached Graph for {what}: {t}"
                );
            }
        }
    }
}

fn form(pairs: &[(&str, &str)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Bytes) {
    let boundary = "xYzZY-test-boundary";
    let mut out = Vec::new();
    for (name, filename, data) in parts {
        out.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match filename {
            Some(f) => out.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: image/png\r\n\r\n").as_bytes(),
            ),
            None => out.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (
        format!("multipart/form-data; boundary={boundary}"),
        Bytes::from(out),
    )
}

// ---------------------------------------------------------------------------------------------
// The cases that once got through
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn bodies_graphgate_does_not_read_are_refused_and_nothing_goes_upstream() {
    let s = stack().await;
    let r = READER_KEY;
    let text = [("content-type", "text/plain")];
    let cases: Vec<(Method, String, String)> = vec![
        (
            Method::GET,
            format!("/v21.0/1001?access_token={r}"),
            "method=GET&fields=id,access_token.as(tok)".into(),
        ),
        (
            Method::POST,
            format!("/v21.0/1001/feed?access_token={r}"),
            "message=pwned".into(),
        ),
        (
            Method::POST,
            format!("/v21.0/?access_token={r}"),
            form(&[("batch", r#"[{"method":"GET","relative_url":"1002"}]"#)]),
        ),
    ];
    for (method, url, body) in cases {
        s.graph.clear_requests();
        let reply = s
            .request(method.clone(), &url, &text, Bytes::from(body.clone()))
            .await;
        assert!(
            matches!(
                reply.status,
                StatusCode::UNSUPPORTED_MEDIA_TYPE | StatusCode::BAD_REQUEST
            ),
            "{method} {url} {body}: {} {}",
            reply.status,
            reply.text()
        );
        assert_eq!(reply.error_code(), 100, "{}", reply.text());
        assert!(
            s.graph.requests().is_empty(),
            "{method} {url} went upstream"
        );
    }
    // A body on a GET is refused whatever its type: Graph reads none there.
    let reply = s
        .request(
            Method::GET,
            &format!("/v21.0/1001?access_token={r}"),
            &[("content-type", "application/x-www-form-urlencoded")],
            Bytes::from_static(b"ids=1002"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert!(s.graph.requests().is_empty());
    s.stop().await;
}

#[tokio::test]
async fn multipart_bodies_are_read_part_by_part_and_files_go_upstream_as_they_came() {
    let s = stack().await;
    let posts_before = s.graph.posts_of("1001").len();

    // The read-only client: a multipart write is a write, refused.
    let (ct, body) = multipart(&[
        ("access_token", None, READER_KEY.as_bytes()),
        ("message", None, b"pwned"),
    ]);
    let reply = s
        .request(
            Method::POST,
            "/v21.0/1001/feed",
            &[("content-type", ct.as_str())],
            body,
        )
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    assert_eq!(s.graph.posts_of("1001").len(), posts_before);
    assert!(s.graph.requests().is_empty());

    // A multipart read from the reader: `method=GET` in a part is read and checked.
    let (ct, body) = multipart(&[
        ("access_token", None, READER_KEY.as_bytes()),
        ("method", None, b"GET"),
        ("ids", None, b"1001,1002"),
    ]);
    let reply = s
        .request(
            Method::POST,
            "/v21.0/",
            &[("content-type", ct.as_str())],
            body,
        )
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    assert!(s.graph.requests().is_empty());

    // The read/write client uploads a photo: the key part becomes the injected token, the
    // file reaches Graph byte for byte.
    let picture: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
    let (ct, body) = multipart(&[
        ("access_token", None, ADMIN_KEY.as_bytes()),
        ("caption", None, b"our new roast"),
        ("source", Some("roast.png"), &picture),
    ]);
    let reply = s
        .request(
            Method::POST,
            "/v21.0/1001/photos",
            &[("content-type", ct.as_str())],
            body,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let sent = s.graph.requests();
    assert_eq!(sent.len(), 1, "{sent:?}");
    let file = &sent[0].files[0];
    assert_eq!(
        (file.name.as_str(), file.filename.as_str()),
        ("source", "roast.png")
    );
    assert_eq!(&file.data[..], &picture[..]);
    assert_eq!(sent[0].access_token.as_deref(), Some(SYSTEM_TOKEN));
    assert!(sent[0]
        .form
        .contains(&("caption".into(), "our new roast".into())));
    assert_no_client_key_upstream(&s.graph, "a photo upload");
    assert_eq!(s.graph.posts_of("1001").len(), posts_before + 1);
    s.stop().await;
}

#[tokio::test]
async fn repeated_parameters_that_disagree_are_refused_and_agreeing_ones_collapse() {
    let s = stack().await;
    let r = READER_KEY;
    let no_store = [("cache-control", "no-store")];
    for url in [
        format!("/?ids=1001&ids=1002&access_token={r}"),
        format!("/v21.0/?ids=1002&IDS=1001&access_token={r}"),
        format!("/v21.0/?ids=1001&%69ds=1002&access_token={r}"),
        format!("/v21.0/1001?fields=id&fields=access_token&access_token={r}"),
        format!("/v21.0/1001?method=GET&method=POST&access_token={r}"),
    ] {
        s.graph.clear_requests();
        let reply = s.request(Method::GET, &url, &no_store, Bytes::new()).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{url}: {}",
            reply.text()
        );
        assert!(s.graph.requests().is_empty(), "{url}");
    }
    // Query plus form body.
    let reply = s
        .request(
            Method::POST,
            &format!("/v21.0/?ids=1001&method=GET&access_token={r}"),
            &[("content-type", "application/x-www-form-urlencoded")],
            Bytes::from_static(b"ids=1002"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    // An `ids` on an edge path is checked like any other.
    let reply = s
        .get(&format!("/v21.0/1001/feed?ids=1002&access_token={r}"))
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    // Inside a batch operation: URL plus body.
    let batch = r#"[{"method":"GET","relative_url":"?ids=1001","body":"ids=1002"}]"#;
    let reply = s
        .post_form("/v21.0/", &form(&[("access_token", r), ("batch", batch)]))
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    // The same key in a JSON operation twice.
    let batch = r#"[{"method":"GET","relative_url":"1001","relative_url":"1002"}]"#;
    let reply = s
        .post_form("/v21.0/", &form(&[("access_token", r), ("batch", batch)]))
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert!(s.graph.requests().is_empty());

    // Identical copies collapse to one, and the call works.
    let reply = s
        .request(
            Method::GET,
            &format!(
                "/v21.0/?ids=1001&ids=1001&fields=id&fields=id&access_token={r}&access_token={r}"
            ),
            &no_store,
            Bytes::new(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let sent = s.graph.requests();
    assert_eq!(sent.len(), 1);
    let ids: Vec<_> = sent[0].query.iter().filter(|(k, _)| k == "ids").collect();
    assert_eq!(ids, [&("ids".to_string(), "1001".to_string())]);
    assert_within_reader_rights(&s.graph, "collapsed copies");
    s.stop().await;
}

#[tokio::test]
async fn a_batch_operation_is_a_write_if_any_spelling_of_its_method_is_one() {
    let s = stack().await;
    let posts_before = s.graph.posts_of("1001").len();
    for op in [
        r#"{"method":"POST","relative_url":"1001/feed?method=GET","body":"message=pwned"}"#,
        r#"{"method":"GET","relative_url":"1001/feed?method=post","body":"message=pwned"}"#,
        r#"{"method":"get","relative_url":"1001/feed","body":"message=pwned&method=POST"}"#,
        r#"{"relative_url":"1001_3?method=DELETE"}"#,
    ] {
        let batch = format!("[{op}]");
        let reply = s
            .post_form(
                "/v21.0/",
                &form(&[("access_token", READER_KEY), ("batch", &batch)]),
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{op}: {}",
            reply.text()
        );
    }
    assert!(s.graph.requests().is_empty());
    assert_eq!(s.graph.posts_of("1001").len(), posts_before);
    s.stop().await;
}

/// Every pairing of HTTP method and `method=` (in any spelling) runs in Graph as the method
/// graphgate checked: `method=` when given, the HTTP method otherwise. An HTTP DELETE saying
/// `method=POST` once went to Graph as a DELETE after being checked as a POST.
#[tokio::test]
async fn every_pairing_of_http_method_and_method_parameter_runs_in_graph_as_checked() {
    let s = stack().await;
    let no_store = [("cache-control", "no-store")];
    for http in [Method::GET, Method::POST, Method::DELETE] {
        for (name, value) in [
            ("", ""),
            ("method", "GET"),
            ("method", "post"),
            ("%6Dethod", "Delete"),
            ("method", "DELETE"),
        ] {
            let checked = if name.is_empty() {
                http.as_str().to_string()
            } else {
                value.to_ascii_uppercase()
            };
            let extra = if name.is_empty() {
                String::new()
            } else {
                format!("&{name}={value}")
            };
            let path = format!("/v21.0/1001_1?message=hi{extra}&access_token={ADMIN_KEY}");
            s.graph.clear_requests();
            let reply = s
                .request(http.clone(), &path, &no_store, Bytes::new())
                .await;
            let verbs: Vec<&str> = s.graph.executed().iter().map(|c| c.verb).collect();
            assert_eq!(verbs, [checked.as_str()], "{http} {path}: {}", reply.text());
        }
    }
    s.stop().await;
}

/// A batch of reads sent as an HTTP DELETE with `method=POST` (in any spelling) is a batch of
/// reads in Graph too: a read-only key gets its answers and Graph deletes nothing.
#[tokio::test]
async fn a_batch_sent_as_an_http_delete_runs_as_the_batch_of_reads_it_was_checked_as() {
    let s = stack().await;
    let batch = r#"[{"relative_url":"1001","body":"ids=1001"}]"#;
    for method_name in ["method", "%6Dethod"] {
        s.graph.clear_requests();
        let path = format!(
            "/?batch={}&{method_name}=POST&access_token={READER_KEY}",
            form_urlencoded::byte_serialize(batch.as_bytes()).collect::<String>()
        );
        let reply = s.request(Method::DELETE, &path, &[], Bytes::new()).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text());
        let executed = s.graph.executed();
        assert!(executed.iter().any(|c| c.is_batch), "{executed:?}");
        assert!(executed.iter().any(|c| c.in_batch), "{executed:?}");
        assert_within_reader_rights(&s.graph, &path);
    }
    s.stop().await;
}

#[tokio::test]
async fn token_fields_are_refused_however_they_are_spelled() {
    let s = stack().await;
    for fields in [
        "x.fields(access_token.as(t))",
        "feed.fields(id,access_token)",
        "feed{message,ACCESS_TOKEN}",
        "id.as(access_token)",
        "feed.limit(2){comments{access_token}}",
        "acc%65ss_token",
    ] {
        let enc: String = form_urlencoded::byte_serialize(fields.as_bytes()).collect();
        let reply = s
            .get(&format!(
                "/v21.0/1001?fields={enc}&access_token={ADMIN_KEY}"
            ))
            .await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{fields}: {}",
            reply.text()
        );
        let batch = format!(r#"[{{"relative_url":"1001?fields={enc}"}}]"#);
        let reply = s
            .post_form(
                "/v21.0/",
                &form(&[("access_token", ADMIN_KEY), ("batch", &batch)]),
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{fields}: {}",
            reply.text()
        );
    }
    assert!(s.graph.requests().is_empty());
    s.stop().await;
}

#[tokio::test]
async fn root_lookups_and_batches_with_ids_are_checked_like_nodes() {
    let s = stack().await;
    let r = READER_KEY;
    let reply = s.get(&format!("/v21.0/?id=1002&access_token={r}")).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    let reply = s.get(&format!("/v21.0/?id=1001&access_token={r}")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["id"], "1001");
    let batch = r#"[{"relative_url":"1001"}]"#;
    let reply = s
        .post_form(
            "/v21.0/",
            &form(&[("access_token", r), ("ids", "1002"), ("batch", batch)]),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert_within_reader_rights(&s.graph, "root lookups");
    s.stop().await;
}

/// A post whose text holds something that looks like graphgate's key marker is served to
/// another client with the text as written, never with that client's key in it.
#[tokio::test]
async fn text_planted_in_graph_data_is_never_filled_with_a_key() {
    let s = stack().await;
    for planted in [
        "hi __graphgate_client_key__",
        "hi __gg0123456789abcdef__",
        "hi __gg",
    ] {
        let reply = s
            .post_form(
                "/v21.0/1001/feed",
                &form(&[("message", planted), ("access_token", ADMIN_KEY)]),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let feed = s
            .get(&format!(
                "/v21.0/1001/feed?limit=2&fields=message&access_token={READER_KEY}"
            ))
            .await;
        assert_eq!(feed.status, StatusCode::OK, "{}", feed.text());
        let mut v = feed.json();
        assert_eq!(v["data"][0]["message"], planted, "{v}");
        // The caller's key is in the paging link, and nowhere else.
        let next = v["paging"]["next"].as_str().unwrap_or_default().to_string();
        assert!(next.contains(READER_KEY), "{next}");
        v["paging"] = serde_json::Value::Null;
        assert!(!v.to_string().contains(READER_KEY), "{v}");
        // Served again from the cache, to a different client.
        let again = s
            .get(&format!(
                "/v21.0/1001/feed?limit=2&fields=message&access_token={ADMIN_KEY}"
            ))
            .await;
        assert_eq!(again.json()["data"][0]["message"], planted);
        assert!(!again.text().contains(READER_KEY));
    }
    s.stop().await;
}

#[tokio::test]
async fn tokens_in_reply_headers_are_scrubbed_and_unreadable_replies_fail_closed() {
    let s = stack().await;
    let page_token = s.graph.page_token("1001");
    s.graph.set_fault(Fault::Reply {
        status: 302,
        headers: vec![
            (
                "location".into(),
                format!("https://scontent.example/p.jpg?access_token={SYSTEM_TOKEN}&oh=1"),
            ),
            (
                "www-authenticate".into(),
                format!(
                    "OAuth \"Facebook Platform\" \"invalid_token\" \"{SYSTEM_TOKEN} {page_token}\""
                ),
            ),
            ("x-fb-debug".into(), format!("debug {page_token}")),
            ("x-fb-trace-id".into(), format!("trace {page_token}")),
        ],
        body: String::new(),
    });
    // `send` (support) fails the test if any secret is in the status, headers or body.
    let reply = s
        .request(
            Method::GET,
            &format!("/v21.0/1001/picture?access_token={ADMIN_KEY}"),
            &[("cache-control", "no-store")],
            Bytes::new(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::FOUND);
    assert_eq!(
        reply.header("location"),
        Some("https://scontent.example/p.jpg?oh=1")
    );
    assert!(reply.header("www-authenticate").is_some());
    assert!(
        reply.header("x-fb-debug").is_none(),
        "an unreadable blob is dropped"
    );

    // JSON nested deeper than the parser reads, holding a token and a paging link.
    let deep = format!(
        r#"{}{{"access_token":"{page_token}","paging":{{"next":"https://graph.facebook.com/1001/feed?access_token={SYSTEM_TOKEN}"}}}}{}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    s.graph.set_fault(Fault::Reply {
        status: 400,
        headers: vec![("content-type".into(), "application/json".into())],
        body: deep,
    });
    let reply = s
        .request(
            Method::GET,
            &format!("/v21.0/1001?fields=id&access_token={ADMIN_KEY}"),
            &[("cache-control", "no-store")],
            Bytes::new(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    assert!(reply.json()["error"]["message"].is_string());
    s.graph.set_fault(Fault::None);
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Generated shapes
// ---------------------------------------------------------------------------------------------

/// Where one parameter goes.
#[derive(Debug, Clone, Copy)]
enum Place {
    Query,
    Body,
}

/// How the body is encoded and labelled.
#[derive(Debug, Clone, Copy)]
enum Encoding {
    Form,
    FormUpperCaseType,
    Json,
    Multipart,
    TextPlain,
    Unlabelled,
    FormLabelledJson,
    JsonLabelledForm,
    FormWithCharsetLatin1,
}

#[derive(Debug, Clone)]
struct Param {
    /// The name as written on the wire (may be a case or encoding variant).
    name: String,
    value: String,
    place: Place,
}

#[derive(Debug, Clone)]
struct Shape {
    method: Method,
    path: String,
    params: Vec<Param>,
    encoding: Encoding,
    file_part: Option<String>,
    key_in_header: bool,
    /// Keep body parameters in a body even on GET and DELETE (else they move to the query).
    body_on_any_method: bool,
}

/// Spellings of a parameter name: as is, other cases, percent-encoded letters, and the
/// characters PHP-style servers fold into `_` or arrays.
fn name_variant(base: &'static str) -> impl Strategy<Value = String> {
    prop_oneof![
        16 => Just(base.to_string()),
        1 => Just(base.to_ascii_uppercase()),
        1 => Just({
            let mut c = base.chars();
            c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
        }),
        1 => Just(format!("%{:02X}{}", base.as_bytes()[0], &base[1..])),
        1 => Just(base.replacen('_', ".", 1)),
        1 => Just(base.replacen('_', " ", 1)),
        1 => Just(format!("{base}[]")),
        1 => Just(format!("{base}[0]")),
    ]
}

fn node() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        3 => Just("1001"),
        2 => Just("1001_3"),
        1 => Just("1002"),
        1 => Just("1002_3"),
        1 => Just("me"),
        1 => Just("%31%30%30%32"),
    ]
}

fn method_value() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("GET"),
        Just("get"),
        Just("POST"),
        Just("post"),
        Just("DELETE"),
        Just("Delete")
    ]
}

fn ids_value() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("1001"),
        Just("1002"),
        Just("1001,1002"),
        Just("1002,1001"),
        Just(" 1002"),
        Just("1001,,1002"),
        Just("1001_3,1002_3"),
    ]
}

fn fields_value() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        3 => Just("id,name"),
        1 => Just("access_token"),
        1 => Just("id,Access_Token"),
        1 => Just("feed.fields(access_token.as(t))"),
        1 => Just("feed{message,access_token}"),
        1 => Just("id.as(access_token)"),
        1 => Just("feed.limit(1){message}"),
        1 => Just("acc%65ss_token"),
    ]
}

/// One batch operation written by hand, so keys can repeat.
fn batch_op() -> impl Strategy<Value = String> {
    (
        prop::option::weighted(0.4, method_value()),
        node(),
        prop::option::of(Just("feed")),
        prop::collection::vec(
            prop_oneof![
                (name_variant("ids"), ids_value().prop_map(str::to_string)),
                (
                    name_variant("method"),
                    method_value().prop_map(str::to_string)
                ),
                (
                    name_variant("fields"),
                    fields_value().prop_map(str::to_string)
                ),
                (Just("message".to_string()), Just("pwned".to_string())),
                (name_variant("access_token"), Just(READER_KEY.to_string())),
            ],
            0..3,
        ),
        prop::collection::vec(
            prop_oneof![
                (name_variant("ids"), ids_value().prop_map(str::to_string)),
                (
                    name_variant("method"),
                    method_value().prop_map(str::to_string)
                ),
                (Just("message".to_string()), Just("pwned".to_string())),
            ],
            0..3,
        ),
        prop::bool::weighted(0.15),
    )
        .prop_map(|(method, node, edge, query, body, repeat_key)| {
            // `node` stands for the root path now and then: `?ids=` operations.
            let (node, edge) = if node == "me" {
                ("", None)
            } else {
                (node, edge)
            };
            let enc = |pairs: &[(String, String)]| {
                pairs
                    .iter()
                    .map(|(k, v)| {
                        let v: String = form_urlencoded::byte_serialize(v.as_bytes()).collect();
                        format!("{k}={v}")
                    })
                    .collect::<Vec<_>>()
                    .join("&")
            };
            let mut url = format!(
                "{node}{}",
                edge.map(|e| format!("/{e}")).unwrap_or_default()
            );
            if !query.is_empty() {
                url = format!("{url}?{}", enc(&query));
            }
            let mut members = Vec::new();
            if let Some(m) = method {
                members.push(format!(r#""method":"{m}""#));
            }
            members.push(format!(
                r#""relative_url":{}"#,
                serde_json::Value::from(url)
            ));
            if !body.is_empty() {
                members.push(format!(r#""body":{}"#, serde_json::Value::from(enc(&body))));
            }
            if repeat_key {
                members.push(r#""relative_url":"1002""#.to_string());
            }
            format!("{{{}}}", members.join(","))
        })
}

/// A batch from the read-only client: a POST to the root with a `batch` and little else.
fn batch_shape() -> impl Strategy<Value = Shape> {
    (
        batch_value(),
        prop_oneof![
            4 => Just(Encoding::Form),
            1 => Just(Encoding::Json),
            1 => Just(Encoding::Multipart),
        ],
        prop::collection::vec((param(), Just(Place::Query), Just(0u8)), 0..2),
    )
        .prop_map(|(batch, encoding, extra)| {
            let mut params = vec![Param {
                name: "batch".into(),
                value: batch,
                place: Place::Body,
            }];
            params.extend(extra.into_iter().map(|((name, value), place, _)| Param {
                name,
                value,
                place,
            }));
            Shape {
                method: Method::POST,
                path: "/v21.0/".into(),
                params,
                encoding,
                file_part: None,
                key_in_header: false,
                body_on_any_method: false,
            }
        })
}

/// One thing an attacker changes in an otherwise allowed request.
#[derive(Debug, Clone, Copy)]
enum Twist {
    /// A second `ids` naming the other Page, in the query or the body.
    SecondIds(Place),
    /// `ids` spelled another way (case, percent-encoding) naming the other Page.
    IdsSpelling(&'static str),
    /// A root `id=` lookup of the other Page.
    RootId,
    /// A token field, however spelled.
    TokenField(&'static str),
    /// A batch operation that writes behind a `method=GET`.
    DisguisedWrite,
    /// A batch operation with `ids` in its URL and other `ids` in its body.
    SplitIds,
    /// A batch operation with a key twice.
    RepeatedKey,
    /// `method` twice with different values.
    MethodTwice,
}

fn twist() -> impl Strategy<Value = Twist> {
    prop_oneof![
        prop_oneof![Just(Place::Query), Just(Place::Body)].prop_map(Twist::SecondIds),
        prop::sample::select(vec!["IDS", "Ids", "%69ds", "ids[]", "ids.", "i%64s"])
            .prop_map(Twist::IdsSpelling),
        Just(Twist::RootId),
        prop::sample::select(vec![
            "id,access_token",
            "id.as(access_token)",
            "feed.fields(access_token.as(t))",
            "feed{ACCESS_TOKEN}",
            "acc%65ss_token",
        ])
        .prop_map(Twist::TokenField),
        Just(Twist::DisguisedWrite),
        Just(Twist::SplitIds),
        Just(Twist::RepeatedKey),
        Just(Twist::MethodTwice),
    ]
}

/// An allowed read from the read-only client (an `ids=` read, a batch, a POST with
/// `method=GET`) with one or two twists, in any encoding: the shapes closest to an exploit.
fn twisted_shape() -> impl Strategy<Value = Shape> {
    (
        0..3usize,
        prop::collection::vec(twist(), 1..3),
        prop_oneof![
            4 => Just(Encoding::Form),
            1 => Just(Encoding::Json),
            1 => Just(Encoding::Multipart),
            1 => Just(Encoding::Unlabelled),
            1 => Just(Encoding::TextPlain),
        ],
        any::<bool>(),
    )
        .prop_map(|(base, twists, encoding, twist_first)| {
            let p = |name: &str, value: &str, place| Param {
                name: name.into(),
                value: value.into(),
                place,
            };
            let mut ops = vec![r#"{"relative_url":"1001?fields=id"}"#.to_string()];
            let (method, path, mut params) = match base {
                0 => (
                    Method::GET,
                    "/v21.0/",
                    vec![p("ids", "1001", Place::Query), p("fields", "id", Place::Query)],
                ),
                1 => (Method::POST, "/v21.0/", vec![]),
                _ => (
                    Method::POST,
                    "/v21.0/1001",
                    vec![p("method", "GET", Place::Body), p("fields", "id", Place::Body)],
                ),
            };
            let body_or_query = if method == Method::POST {
                Place::Body
            } else {
                Place::Query
            };
            let mut extra = Vec::new();
            for t in twists {
                match t {
                    Twist::SecondIds(place) => {
                        let place = if method == Method::POST { place } else { Place::Query };
                        extra.push(p("ids", "1002", place));
                    }
                    Twist::IdsSpelling(name) => extra.push(p(name, "1002", Place::Query)),
                    Twist::RootId => extra.push(p("id", "1002", body_or_query)),
                    Twist::TokenField(f) => extra.push(p("fields", f, body_or_query)),
                    Twist::DisguisedWrite => ops.push(
                        r#"{"method":"POST","relative_url":"1001/feed?method=GET","body":"message=pwned"}"#.into(),
                    ),
                    Twist::SplitIds => ops.push(
                        r#"{"method":"GET","relative_url":"?ids=1001&fields=id","body":"ids=1002"}"#.into(),
                    ),
                    Twist::RepeatedKey => ops
                        .push(r#"{"relative_url":"1001?fields=id","relative_url":"1002?fields=id"}"#.into()),
                    Twist::MethodTwice => {
                        extra.push(p("method", "GET", body_or_query));
                        extra.push(p("method", "POST", body_or_query));
                    }
                }
            }
            if base == 1 {
                params.push(p("batch", &format!("[{}]", ops.join(",")), Place::Body));
            }
            // The twist before or after the value it contradicts: parsers differ on which
            // copy wins.
            if twist_first {
                extra.extend(params);
                params = extra;
            } else {
                params.extend(extra);
            }
            Shape {
                method,
                path: path.into(),
                params,
                encoding,
                file_part: None,
                key_in_header: false,
                body_on_any_method: false,
            }
        })
}

fn batch_value() -> impl Strategy<Value = String> {
    prop::collection::vec(batch_op(), 1..3).prop_map(|ops| format!("[{}]", ops.join(",")))
}

fn param() -> impl Strategy<Value = (String, String)> {
    prop_oneof![
        3 => (name_variant("ids"), ids_value().prop_map(str::to_string)),
        1 => (name_variant("id"), prop_oneof![Just("1002"), Just("1001")].prop_map(str::to_string)),
        3 => (name_variant("fields"), fields_value().prop_map(str::to_string)),
        2 => (name_variant("method"), method_value().prop_map(str::to_string)),
        2 => (name_variant("batch"), batch_value()),
        1 => (Just("message".to_string()), Just("pwned".to_string())),
        1 => (Just("limit".to_string()), Just("2".to_string())),
        1 => (name_variant("access_token"), Just(READER_KEY.to_string())),
        1 => (name_variant("access_token"), Just(ADMIN_KEY.to_string())),
    ]
}

fn placed() -> impl Strategy<Value = Vec<Param>> {
    prop::collection::vec(
        (
            param(),
            prop_oneof![Just(Place::Query), Just(Place::Body)],
            prop_oneof![6 => Just(0u8), 2 => Just(1u8), 2 => Just(2u8)],
        ),
        0..4,
    )
    .prop_map(|items| {
        let mut out = Vec::new();
        for ((name, value), place, copies) in items {
            // Each parameter once, or repeated: the same value in the other place, or a
            // different one (the Page the client may not read).
            out.push(Param {
                name: name.clone(),
                value: value.clone(),
                place,
            });
            let other = match place {
                Place::Query => Place::Body,
                Place::Body => Place::Query,
            };
            match copies {
                1 => out.push(Param {
                    name,
                    value,
                    place: other,
                }),
                2 => out.push(Param {
                    name,
                    value: value.replace("1001", "1002"),
                    place,
                }),
                _ => {}
            }
        }
        out
    })
}

fn shape() -> impl Strategy<Value = Shape> {
    (
        prop_oneof![4 => Just(Method::GET), 4 => Just(Method::POST), 1 => Just(Method::DELETE)],
        prop::option::of(node()),
        prop::option::of(Just("feed")),
        any::<bool>(),
        placed(),
        prop_oneof![
            6 => Just(Encoding::Form),
            1 => Just(Encoding::FormUpperCaseType),
            1 => Just(Encoding::Json),
            1 => Just(Encoding::Multipart),
            1 => Just(Encoding::TextPlain),
            1 => Just(Encoding::Unlabelled),
            1 => Just(Encoding::FormLabelledJson),
            1 => Just(Encoding::JsonLabelledForm),
            1 => Just(Encoding::FormWithCharsetLatin1),
        ],
        prop::option::weighted(
            0.2,
            prop_oneof![
                Just("source".to_string()),
                Just("access_token".to_string()),
                Just("ids".to_string()),
            ],
        ),
        any::<bool>(),
        prop::bool::weighted(0.1),
    )
        .prop_map(
            |(
                method,
                node,
                edge,
                versioned,
                mut params,
                encoding,
                file_part,
                key_in_header,
                body_on_any_method,
            )| {
                if method != Method::POST && !body_on_any_method {
                    for p in &mut params {
                        p.place = Place::Query;
                    }
                }
                let mut path = String::new();
                if versioned {
                    path.push_str("/v21.0");
                }
                if let Some(n) = node {
                    path.push('/');
                    path.push_str(n);
                    if let Some(e) = edge {
                        path.push('/');
                        path.push_str(e);
                    }
                }
                if path.is_empty() {
                    path.push('/');
                }
                Shape {
                    method,
                    path,
                    params,
                    encoding,
                    file_part,
                    key_in_header,
                    body_on_any_method,
                }
            },
        )
}

/// The request a shape describes: target, headers and body.
fn render(shape: &Shape) -> (String, Vec<(String, String)>, Bytes) {
    // Names go on the wire as written, but for what a URL cannot hold raw.
    let enc_pair = |p: &Param| {
        let v: String = form_urlencoded::byte_serialize(p.value.as_bytes()).collect();
        let name = p
            .name
            .replace(' ', "+")
            .replace('[', "%5B")
            .replace(']', "%5D");
        format!("{name}={v}")
    };
    let mut query: Vec<String> = shape
        .params
        .iter()
        .filter(|p| matches!(p.place, Place::Query))
        .map(enc_pair)
        .collect();
    let mut headers = Vec::new();
    if shape.key_in_header {
        headers.push(("authorization".into(), format!("Bearer {READER_KEY}")));
    } else {
        query.push(format!("access_token={READER_KEY}"));
    }
    let target = format!("{}?{}", shape.path, query.join("&"));
    let body_params: Vec<&Param> = shape
        .params
        .iter()
        .filter(|p| matches!(p.place, Place::Body))
        .collect();
    let form_text = body_params
        .iter()
        .map(|p| enc_pair(p))
        .collect::<Vec<_>>()
        .join("&");
    let json_text = format!(
        "{{{}}}",
        body_params
            .iter()
            .map(|p| format!(
                "{}:{}",
                serde_json::Value::from(p.name.clone()),
                serde_json::Value::from(p.value.clone())
            ))
            .collect::<Vec<_>>()
            .join(",")
    );
    if shape.method != Method::POST && !shape.body_on_any_method {
        return (target, headers, Bytes::new());
    }
    let mut ct = |v: &str| headers.push(("content-type".to_string(), v.to_string()));
    let body = match shape.encoding {
        Encoding::Form => {
            ct("application/x-www-form-urlencoded");
            Bytes::from(form_text)
        }
        Encoding::FormUpperCaseType => {
            ct("APPLICATION/X-WWW-FORM-URLENCODED; Charset=UTF-8");
            Bytes::from(form_text)
        }
        Encoding::FormWithCharsetLatin1 => {
            ct("application/x-www-form-urlencoded; charset=iso-8859-1");
            Bytes::from(form_text)
        }
        Encoding::Json => {
            ct("application/json");
            Bytes::from(json_text)
        }
        Encoding::TextPlain => {
            ct("text/plain");
            Bytes::from(form_text)
        }
        Encoding::Unlabelled => Bytes::from(form_text),
        Encoding::FormLabelledJson => {
            ct("application/json");
            Bytes::from(form_text)
        }
        Encoding::JsonLabelledForm => {
            ct("application/x-www-form-urlencoded");
            Bytes::from(json_text)
        }
        Encoding::Multipart => {
            let mut parts: Vec<(&str, Option<&str>, &[u8])> = body_params
                .iter()
                .map(|p| (p.name.as_str(), None, p.value.as_bytes()))
                .collect();
            if let Some(f) = &shape.file_part {
                parts.push((f.as_str(), Some("x.png"), b"\x89PNG".as_slice()));
            }
            let (t, b) = multipart(&parts);
            ct(&t);
            b
        }
    };
    (target, headers, body)
}

/// Generated request shapes from the read-only client of Page 1001: whatever graphgate
/// answers, Graph's log shows only reads of Page 1001 with no token field, run with the
/// system token, and no client key reached Graph.
#[test]
fn no_generated_request_shape_makes_graph_do_what_the_client_may_not() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let s = rt.block_on(stack());
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 3000,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let answered = std::cell::RefCell::new(std::collections::BTreeMap::<u16, usize>::new());
    let batches_run = std::cell::Cell::new(0usize);
    let shapes = prop_oneof![3 => shape(), 1 => batch_shape(), 2 => twisted_shape()];
    let result = runner.run(&shapes, |shape| {
        let (target, headers, body) = render(&shape);
        let what = format!("{} {target} {headers:?} {:?}", shape.method, body);
        s.graph.clear_requests();
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let reply = rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(20),
                s.request(shape.method.clone(), &target, &headers, body),
            )
            .await
            .expect("answered")
        });
        *answered
            .borrow_mut()
            .entry(reply.status.as_u16())
            .or_default() += 1;
        prop_assert!(
            reply.status != StatusCode::INTERNAL_SERVER_ERROR,
            "{what}: {}",
            reply.text()
        );
        assert_within_reader_rights(&s.graph, &what);
        if s.graph.executed().iter().any(|c| c.in_batch) {
            batches_run.set(batches_run.get() + 1);
        }
        Ok(())
    });
    rt.block_on(s.stop());
    if let Err(e) = result {
        panic!("{e}");
    }
    // The generator reaches both sides: some shapes are refused, some go through.
    let answered = answered.into_inner();
    eprintln!(
        "answers by status: {answered:?}; batches that ran: {}",
        batches_run.get()
    );
    let ok = answered.get(&200).copied().unwrap_or(0);
    let refused: usize = answered
        .iter()
        .filter(|(s, _)| (400..500).contains(*s))
        .map(|(_, n)| n)
        .sum();
    assert!(ok > 0 && refused > 0, "answers: {answered:?}");
}
