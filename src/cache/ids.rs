//! `?ids=a,b,c` reads in terms of per-node entries: the reply is an object keyed by id whose
//! members are exactly what `GET /{id}` with the same parameters returns, so each member is
//! cached under that node's own key and a later `ids=` read is assembled from them.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::ProxyError;
use crate::rewrite::{self, PreparedBody};

/// Ids in request order without duplicates (Graph answers each id once).
pub fn unique(ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(ids.len());
    for id in ids {
        if !out.contains(id) {
            out.push(id.clone());
        }
    }
    out
}

/// Splits a prepared `ids=` reply into per-id bodies. `None` when it is not a JSON object.
pub fn split(body: &PreparedBody) -> Option<Vec<(String, PreparedBody)>> {
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&body.bytes).ok()?;
    let mut out = Vec::with_capacity(map.len());
    for (id, value) in map {
        let bytes = serde_json::to_vec(&value).ok()?;
        out.push((id, body.part(Bytes::from(bytes))));
    }
    Some(out)
}

/// Joins per-id bodies into `{"a":…,"b":…}` in the given order, without re-parsing them.
/// Ids are Graph ids (`[A-Za-z0-9_.:@-]`, checked by the request parser) and need no escaping.
pub fn assemble(parts: &[(&str, &PreparedBody)]) -> Result<PreparedBody, ProxyError> {
    let bodies: Vec<&PreparedBody> = parts.iter().map(|(_, b)| *b).collect();
    rewrite::join_bodies(&bodies, |bytes| {
        let len: usize = parts
            .iter()
            .zip(bytes)
            .map(|((id, _), b)| id.len() + b.len() + 4)
            .sum();
        let mut out = BytesMut::with_capacity(len + 2);
        out.put_u8(b'{');
        for (i, ((id, _), body)) in parts.iter().zip(bytes).enumerate() {
            if i > 0 {
                out.put_u8(b',');
            }
            out.put_u8(b'"');
            out.put_slice(id.as_bytes());
            out.put_slice(b"\":");
            out.put_slice(body);
        }
        out.put_u8(b'}');
        out.freeze()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_then_assemble_round_trips() {
        let body = PreparedBody::plain(Bytes::from_static(
            br#"{"1001":{"id":"1001","name":"A"},"1002":{"id":"1002"}}"#,
        ));
        let parts = split(&body).unwrap();
        assert_eq!(parts.len(), 2);
        let refs: Vec<(&str, &PreparedBody)> =
            parts.iter().rev().map(|(i, b)| (i.as_str(), b)).collect();
        let joined = assemble(&refs).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&joined.bytes).unwrap();
        assert_eq!(v["1001"]["name"], "A");
        assert_eq!(v["1002"]["id"], "1002");
        assert!(joined.bytes.starts_with(b"{\"1002\""));
        assert_eq!(
            unique(&["a".into(), "b".into(), "a".into()]),
            vec!["a", "b"]
        );
        assert!(split(&PreparedBody::plain(Bytes::from_static(b"[1]"))).is_none());
    }
}
