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
use serde_json::Value;

use super::entry::Entry;
use crate::error::ProxyError;
use crate::graph::request::{BatchOp, GraphMethod};
use crate::rewrite::{self, PreparedBody};

/// Whether the batch may be answered partly from the cache.
pub fn cacheable(ops: &[BatchOp]) -> bool {
    ops.iter().all(|op| {
        op.method == GraphMethod::Get
            && op.path.node().is_some()
            && op.extra.is_empty()
            && !op.query.contains("ids")
            && !op.body.contains("ids")
            && !op
                .query
                .iter()
                .chain(op.body.iter())
                .any(|(_, v)| v.contains("{result="))
    })
}

/// One reply element, `{"code":200,"headers":[…],"body":"…"}`, for a cached entry. The body
/// is JSON-escaped; the key marker survives escaping unchanged.
pub fn element(entry: &Entry, include_headers: bool) -> Option<PreparedBody> {
    let prepared = entry.body().ok()?;
    let body = std::str::from_utf8(&prepared.bytes).ok()?;
    let mut headers = vec![
        serde_json::json!({"name": "Content-Type", "value": "text/javascript; charset=UTF-8"}),
    ];
    let etag = entry.etag();
    if let Some(etag) = etag.as_ref().and_then(|v| v.to_str().ok()) {
        headers.push(serde_json::json!({"name": "ETag", "value": etag}));
    }
    let mut obj = serde_json::Map::new();
    obj.insert("code".into(), entry.status.as_u16().into());
    if include_headers {
        obj.insert("headers".into(), Value::Array(headers));
    }
    obj.insert("body".into(), Value::String(body.to_string()));
    let bytes = serde_json::to_vec(&Value::Object(obj)).ok()?;
    Some(prepared.part(Bytes::from(bytes)))
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
                Some((body.part(Bytes::from(b.clone().into_bytes())), etag))
            }
            _ => None,
        };
        out.push(Part {
            element: body.part(Bytes::from(bytes)),
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
pub fn assemble(elements: &[&PreparedBody]) -> Result<PreparedBody, ProxyError> {
    rewrite::join_bodies(elements, |bytes| {
        let len: usize = bytes.iter().map(|e| e.len() + 1).sum();
        let mut out = BytesMut::with_capacity(len + 2);
        out.put_u8(b'[');
        for (i, e) in bytes.iter().enumerate() {
            if i > 0 {
                out.put_u8(b',');
            }
            out.put_slice(e);
        }
        out.put_u8(b']');
        out.freeze()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::request::parse_batch;
    use crate::rewrite::KeyMarker;
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
                    br#"{"id":"1001","link":"x?access_token=__gg0123456789abcdef__"}"#,
                ),
                key_marker: KeyMarker::from_bytes(b"__gg0123456789abcdef__"),
            },
            Duration::from_secs(1),
        );
        let e = element(&entry, true).unwrap();
        assert!(e.key_marker.is_some());
        let joined = assemble(&[&e, &e]).unwrap();
        let parts = split(&joined).unwrap();
        assert_eq!(parts.len(), 2);
        let (body, etag) = parts[0].ok_body.clone().unwrap();
        // One fresh marker for the joined body, in place of the element's.
        let marker = joined.key_marker.unwrap();
        assert_ne!(Some(marker), e.key_marker);
        assert_eq!(body.key_marker, Some(marker));
        assert_eq!(
            rewrite::finalize(&body, "k"),
            rewrite::finalize(&entry.body().unwrap(), "k")
        );
        assert_eq!(etag.unwrap(), "\"t\"");
    }
}
