//! Batch reads in terms of per-operation entries: a `GET` operation's reply body is exactly
//! what `GET /{relative_url}` returns, so it shares that entry. Cached operations are
//! answered locally, the rest go upstream as one smaller batch, and the reply array is
//! merged back in request order.
//!
//! Only simple batches qualify: every operation a GET without `name`, `depends_on`,
//! `omit_response_on_success`, JSONPath references or `ids=`. Anything else has ordering or
//! dependency semantics the cache must not reorder, and goes upstream whole.

use bytes::{BufMut, Bytes, BytesMut};
use http::{header, HeaderValue};
use memchr::memmem;
use serde_json::Value;

use super::entry::Entry;
use crate::graph::request::{BatchOp, GraphMethod};
use crate::rewrite::{PreparedBody, KEY_PLACEHOLDER};

/// Whether the batch may be answered partly from the cache.
pub fn cacheable(ops: &[BatchOp]) -> bool {
    ops.iter().all(|op| {
        op.method == GraphMethod::Get
            && op.path.node().is_some()
            && !op.raw.contains_key("name")
            && !op.raw.contains_key("depends_on")
            && !op.raw.contains_key("omit_response_on_success")
            && !op.query.contains("ids")
            && !op.body.contains("ids")
            && op
                .raw
                .get("relative_url")
                .and_then(Value::as_str)
                .is_some_and(|u| !u.contains("{result="))
    })
}

/// One reply element, `{"code":200,"headers":[…],"body":"…"}`, for a cached entry. The body
/// is JSON-escaped; the client-key placeholder survives escaping unchanged.
pub fn element(entry: &Entry, include_headers: bool) -> Option<PreparedBody> {
    let prepared = entry.body().ok()?;
    let body = std::str::from_utf8(&prepared.bytes).ok()?;
    let mut headers = vec![
        serde_json::json!({"name": "Content-Type", "value": "text/javascript; charset=UTF-8"}),
    ];
    if let Some(etag) = entry.etag().and_then(|v| v.to_str().ok()) {
        headers.push(serde_json::json!({"name": "ETag", "value": etag}));
    }
    let mut obj = serde_json::Map::new();
    obj.insert("code".into(), entry.status.as_u16().into());
    if include_headers {
        obj.insert("headers".into(), Value::Array(headers));
    }
    obj.insert("body".into(), Value::String(body.to_string()));
    let bytes = serde_json::to_vec(&Value::Object(obj)).ok()?;
    Some(PreparedBody {
        bytes: Bytes::from(bytes),
        has_key_placeholder: prepared.has_key_placeholder,
    })
}

/// A reply element from Graph: the element as sent, and for a successful operation its
/// body and ETag, ready to store.
pub struct Part {
    pub element: PreparedBody,
    pub ok_body: Option<(PreparedBody, Option<HeaderValue>)>,
}

/// Splits a prepared batch reply into its elements. `None` when it is not a JSON array.
pub fn split(body: &PreparedBody) -> Option<Vec<Part>> {
    let items: Vec<Value> = serde_json::from_slice(&body.bytes).ok()?;
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let bytes = serde_json::to_vec(&item).ok()?;
        let placeholder = |b: &[u8]| {
            body.has_key_placeholder && memmem::find(b, KEY_PLACEHOLDER.as_bytes()).is_some()
        };
        let ok_body = match (&item.get("code"), item.get("body")) {
            (Some(Value::Number(c)), Some(Value::String(b))) if c.as_u64() == Some(200) => {
                let etag = item
                    .get("headers")
                    .and_then(Value::as_array)
                    .and_then(|hs| {
                        hs.iter().find(|h| {
                            h.get("name")
                                .and_then(Value::as_str)
                                .is_some_and(|n| n.eq_ignore_ascii_case("etag"))
                        })
                    })
                    .and_then(|h| h.get("value").and_then(Value::as_str))
                    .and_then(|v| HeaderValue::from_str(v).ok());
                Some((
                    PreparedBody {
                        bytes: Bytes::from(b.clone().into_bytes()),
                        has_key_placeholder: placeholder(b.as_bytes()),
                    },
                    etag,
                ))
            }
            _ => None,
        };
        out.push(Part {
            element: PreparedBody {
                has_key_placeholder: placeholder(&bytes),
                bytes: Bytes::from(bytes),
            },
            ok_body,
        });
    }
    Some(out)
}

/// Headers a per-operation entry replays when served as a plain GET.
pub fn entry_headers(etag: Option<HeaderValue>) -> Vec<(http::HeaderName, HeaderValue)> {
    let mut h = vec![(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=UTF-8"),
    )];
    if let Some(e) = etag {
        h.push((header::ETAG, e));
    }
    h
}

/// `[e1,e2,…]` from elements, without re-parsing them.
pub fn assemble(elements: &[&PreparedBody]) -> PreparedBody {
    let len: usize = elements.iter().map(|e| e.bytes.len() + 1).sum();
    let mut out = BytesMut::with_capacity(len + 2);
    out.put_u8(b'[');
    for (i, e) in elements.iter().enumerate() {
        if i > 0 {
            out.put_u8(b',');
        }
        out.put_slice(&e.bytes);
    }
    out.put_u8(b']');
    PreparedBody {
        bytes: out.freeze(),
        has_key_placeholder: elements.iter().any(|e| e.has_key_placeholder),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::request::parse_batch;
    use http::StatusCode;
    use std::time::Duration;

    #[test]
    fn only_simple_read_batches_qualify() {
        let ok = parse_batch(
            r#"[{"method":"GET","relative_url":"1001?fields=id"},{"relative_url":"1002"}]"#,
        )
        .unwrap();
        assert!(cacheable(&ok));
        for bad in [
            r#"[{"method":"POST","relative_url":"1001/feed","body":"message=x"}]"#,
            r#"[{"method":"GET","relative_url":"1001","name":"a"}]"#,
            r#"[{"method":"GET","relative_url":"?ids=1001,1002"}]"#,
            r#"[{"method":"GET","relative_url":"1001/comments?after={result=a:$.x}"}]"#,
        ] {
            assert!(!cacheable(&parse_batch(bad).unwrap()), "{bad}");
        }
    }

    #[test]
    fn elements_round_trip() {
        let entry = Entry::new(
            StatusCode::OK,
            entry_headers(Some(HeaderValue::from_static("\"t\""))),
            PreparedBody {
                bytes: Bytes::from_static(
                    br#"{"id":"1001","link":"x?access_token=__graphgate_client_key__"}"#,
                ),
                has_key_placeholder: true,
            },
            Duration::from_secs(1),
        );
        let e = element(&entry, true).unwrap();
        assert!(e.has_key_placeholder);
        let joined = assemble(&[&e, &e]);
        let parts = split(&joined).unwrap();
        assert_eq!(parts.len(), 2);
        let (body, etag) = parts[0].ok_body.clone().unwrap();
        assert_eq!(Some(&body), entry.body().ok().as_ref());
        assert!(body.has_key_placeholder);
        assert_eq!(etag.unwrap(), "\"t\"");
    }
}
