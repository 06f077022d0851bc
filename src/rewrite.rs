//! Making Graph replies safe and useful to hand to a client:
//! - `paging.next` / `paging.previous` (at any depth, inside batch bodies too) point at
//!   graphgate's public URL, without appsecret_proof, and with a placeholder where Graph put
//!   the token; [`finalize`] swaps the placeholder for the calling client's own key, so one
//!   prepared body (and one cache entry) serves every client.
//! - `access_token` members (`/me/accounts`, `?fields=access_token`) are removed: graphgate
//!   never hands Meta tokens to clients.
//! - as a last line of defence any known secret still in the bytes is replaced.
//!
//! Graph escapes `/` as `\/` inside strings, so links are rewritten in parsed JSON, not bytes.

use bytes::Bytes;
use memchr::memmem;
use serde_json::Value;

/// Stands for the caller's key in prepared bodies. URL- and JSON-safe, so a byte replace
/// in [`finalize`] is exact.
pub const KEY_PLACEHOLDER: &str = "__graphgate_client_key__";
const REDACTED: &[u8] = b"[redacted]";

/// A body ready to be stored or served, possibly holding [`KEY_PLACEHOLDER`].
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedBody {
    pub bytes: Bytes,
    pub has_key_placeholder: bool,
}

/// Prepares an upstream body for clients. `secrets` are scrubbed from the result whatever
/// the body is (JSON or not).
pub fn prepare(body: Bytes, is_batch: bool, public_url: &str, secrets: &[&str]) -> PreparedBody {
    let needs_json = is_batch
        || memmem::find(&body, b"\"paging\"").is_some()
        || memmem::find(&body, b"\"access_token\"").is_some();
    let mut prepared = PreparedBody {
        bytes: body,
        has_key_placeholder: false,
    };
    if needs_json {
        if let Ok(mut value) = serde_json::from_slice::<Value>(&prepared.bytes) {
            let mut changed = false;
            if is_batch {
                rewrite_batch(&mut value, public_url, &mut changed);
            }
            rewrite_value(&mut value, public_url, &mut changed);
            if changed {
                if let Ok(out) = serde_json::to_vec(&value) {
                    prepared.has_key_placeholder =
                        memmem::find(&out, KEY_PLACEHOLDER.as_bytes()).is_some();
                    prepared.bytes = Bytes::from(out);
                }
            }
        }
    }
    prepared.bytes = scrub(prepared.bytes, secrets);
    prepared
}

/// The body for one client: the placeholder becomes the client's URL-encoded key.
pub fn finalize(body: &PreparedBody, client_key: &str) -> Bytes {
    if !body.has_key_placeholder {
        return body.bytes.clone();
    }
    let key: String = form_urlencoded::byte_serialize(client_key.as_bytes()).collect();
    replace_all(&body.bytes, KEY_PLACEHOLDER.as_bytes(), key.as_bytes())
}

/// Removes every occurrence of each secret (of 4 bytes or more). Returns the input untouched
/// (no copy) in the normal case: no secret in the bytes and no escape that could hide one.
///
/// A JSON body is scrubbed as JSON: strings, keys and numbers that hold a secret once decoded
/// are redacted, and the body is re-serialized, so the result stays valid JSON. This matters
/// because a secret may be split by an escape (`"\uE31EAAG…"` holds the bytes `EAAG…` though
/// no decoded string does; a blind byte replace would cut the escape and break the JSON), or
/// hidden by one (`\u0045AAG…` decodes to `EAAG…`). Found by the `rewrite` fuzz target.
/// Anything else (not JSON) is scrubbed byte-wise.
pub fn scrub(body: Bytes, secrets: &[&str]) -> Bytes {
    let secrets: Vec<&str> = secrets.iter().copied().filter(|s| s.len() >= 4).collect();
    let in_bytes = secrets
        .iter()
        .any(|s| memmem::find(&body, s.as_bytes()).is_some());
    // Secrets are ASCII: only `\u00XX` escapes of ASCII (never sent by Graph, which escapes
    // `/` as `\/` and non-ASCII as `\uXXXX`) or `\/`-style ones could hide one.
    let escapes_may_hide = memmem::find_iter(&body, b"\\u00")
        .any(|at| body.get(at + 4).is_some_and(|b| (b'0'..=b'7').contains(b)))
        || (memchr::memchr(b'\\', &body).is_some()
            && secrets.iter().any(|s| s.contains(['/', '\\', '"'])));
    if !in_bytes && !escapes_may_hide {
        return body;
    }
    let mut body = body;
    if let Ok(mut value) = serde_json::from_slice::<Value>(&body) {
        let mut changed = false;
        scrub_value(&mut value, &secrets, &mut changed);
        if changed || in_bytes {
            if let Ok(out) = serde_json::to_vec(&value) {
                body = Bytes::from(out);
            }
        }
    }
    // Not JSON, or a secret that survives re-serialization: bytes, whatever that does to
    // the syntax (secrecy wins).
    for s in &secrets {
        if memmem::find(&body, s.as_bytes()).is_some() {
            body = replace_all(&body, s.as_bytes(), REDACTED);
        }
    }
    body
}

fn scrub_value(value: &mut Value, secrets: &[&str], changed: &mut bool) {
    let holds = |t: &str| secrets.iter().any(|s| t.contains(s));
    let redact = |t: &str| {
        let mut out = t.to_string();
        for s in secrets {
            out = out.replace(s, "[redacted]");
        }
        out
    };
    match value {
        Value::String(t) if holds(t) => {
            *t = redact(t);
            *changed = true;
        }
        Value::Number(n) if holds(&n.to_string()) => {
            *value = Value::String("[redacted]".into());
            *changed = true;
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|v| scrub_value(v, secrets, changed)),
        Value::Object(map) => {
            if map.keys().any(|k| holds(k)) {
                let old = std::mem::take(map);
                for (k, v) in old {
                    map.insert(if holds(&k) { redact(&k) } else { k }, v);
                }
                *changed = true;
            }
            map.values_mut()
                .for_each(|v| scrub_value(v, secrets, changed));
        }
        _ => {}
    }
}

fn replace_all(hay: &[u8], needle: &[u8], with: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(hay.len());
    let mut last = 0;
    for at in memmem::find_iter(hay, needle) {
        out.extend_from_slice(&hay[last..at]);
        out.extend_from_slice(with);
        last = at + needle.len();
    }
    out.extend_from_slice(&hay[last..]);
    Bytes::from(out)
}

/// Batch replies carry each operation's body as a JSON string: rewrite inside it.
fn rewrite_batch(value: &mut Value, public_url: &str, changed: &mut bool) {
    let Value::Array(items) = value else {
        return;
    };
    for item in items.iter_mut() {
        let Some(Value::String(body)) = item.get_mut("body") else {
            continue;
        };
        let Ok(mut inner) = serde_json::from_str::<Value>(body) else {
            continue;
        };
        let mut inner_changed = false;
        rewrite_value(&mut inner, public_url, &mut inner_changed);
        if inner_changed {
            if let Ok(s) = serde_json::to_string(&inner) {
                *body = s;
                *changed = true;
            }
        }
    }
}

fn rewrite_value(value: &mut Value, public_url: &str, changed: &mut bool) {
    match value {
        Value::Object(map) => {
            if map.remove("access_token").is_some() {
                *changed = true;
            }
            if let Some(Value::Object(paging)) = map.get_mut("paging") {
                for key in ["next", "previous"] {
                    if let Some(Value::String(link)) = paging.get(key) {
                        match rewrite_link(link, public_url) {
                            Some(new) => {
                                paging.insert(key.to_string(), Value::String(new));
                            }
                            // A link we cannot parse could carry a token: drop it.
                            None => {
                                paging.remove(key);
                            }
                        }
                        *changed = true;
                    }
                }
            }
            for v in map.values_mut() {
                rewrite_value(v, public_url, changed);
            }
        }
        Value::Array(items) => {
            for v in items {
                rewrite_value(v, public_url, changed);
            }
        }
        _ => {}
    }
}

/// `https://graph.facebook.com/v21.0/1001/feed?access_token=T&appsecret_proof=P&after=X`
/// → `{public_url}/v21.0/1001/feed?access_token=__graphgate_client_key__&after=X`.
pub fn rewrite_link(link: &str, public_url: &str) -> Option<String> {
    let uri: http::Uri = link.parse().ok()?;
    let path = uri.path();
    let mut out = form_urlencoded::Serializer::new(String::new());
    let mut any = false;
    if let Some(q) = uri.query() {
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            match k.as_ref() {
                "appsecret_proof" => {}
                "access_token" => {
                    out.append_pair("access_token", KEY_PLACEHOLDER);
                    any = true;
                }
                _ => {
                    out.append_pair(&k, &v);
                    any = true;
                }
            }
        }
    }
    let query = out.finish();
    Some(if any {
        format!("{public_url}{path}?{query}")
    } else {
        format!("{public_url}{path}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PUBLIC: &str = "http://gw.internal:8080";

    #[test]
    fn link_rewrite_replaces_host_token_and_drops_proof() {
        let l = rewrite_link(
            "https://graph.facebook.com/v21.0/1001/feed?access_token=SYSTOK&appsecret_proof=abc&limit=2&after=QVFI",
            PUBLIC,
        )
        .unwrap();
        assert_eq!(
            l,
            format!("{PUBLIC}/v21.0/1001/feed?access_token={KEY_PLACEHOLDER}&limit=2&after=QVFI")
        );
    }

    #[test]
    fn escaped_slashes_nested_paging_and_tokens() {
        let body = br#"{"data":[{"id":"1","comments":{"data":[],"paging":{"next":"https:\/\/graph.facebook.com\/v21.0\/1\/comments?access_token=SYSTOK&after=A"}}}],"paging":{"previous":"https:\/\/graph.facebook.com\/1001\/feed?access_token=SYSTOK&before=B"},"access_token":"PAGETOK"}"#;
        let p = prepare(
            Bytes::from_static(body),
            false,
            PUBLIC,
            &["SYSTOK", "PAGETOK"],
        );
        assert!(p.has_key_placeholder);
        let out = finalize(&p, "client key/1");
        let text = std::str::from_utf8(&out).unwrap();
        assert!(
            !text.contains("SYSTOK") && !text.contains("PAGETOK"),
            "{text}"
        );
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v["paging"]["previous"],
            format!("{PUBLIC}/1001/feed?access_token=client+key%2F1&before=B")
        );
        assert!(v["data"][0]["comments"]["paging"]["next"]
            .as_str()
            .unwrap()
            .starts_with(PUBLIC));
        assert!(v.get("access_token").is_none());
    }

    #[test]
    fn batch_bodies_are_rewritten() {
        let inner = r#"{"data":[],"paging":{"next":"https://graph.facebook.com/1001/feed?access_token=SYSTOK&after=A"}}"#;
        let body =
            serde_json::to_vec(&serde_json::json!([{"code":200,"body":inner}, null])).unwrap();
        let p = prepare(Bytes::from(body), true, PUBLIC, &["SYSTOK"]);
        let out = finalize(&p, "k1");
        let v: Value = serde_json::from_slice(&out).unwrap();
        let inner: Value = serde_json::from_str(v[0]["body"].as_str().unwrap()).unwrap();
        assert_eq!(
            inner["paging"]["next"],
            format!("{PUBLIC}/1001/feed?access_token=k1&after=A")
        );
        assert!(v[1].is_null());
    }

    #[test]
    fn plain_bodies_are_not_copied_and_secrets_are_scrubbed() {
        let body = Bytes::from_static(br#"{"id":"1001","name":"Acme"}"#);
        let p = prepare(body.clone(), false, PUBLIC, &["SYSTOK"]);
        assert_eq!(p.bytes.as_ptr(), body.as_ptr());
        let leaked = prepare(
            Bytes::from_static(b"oops SYSTOK here"),
            false,
            PUBLIC,
            &["SYSTOK"],
        );
        assert_eq!(&leaked.bytes[..], b"oops [redacted] here");
    }

    /// Fuzz finding (rewrite target): a secret whose first byte ended a `\u` escape was
    /// replaced byte-wise, cutting the escape and breaking the JSON.
    #[test]
    fn a_secret_split_by_an_escape_keeps_the_json_valid() {
        let body = Bytes::from_static(b"\"\\uE31EAAGpagetoken10016\"");
        let out = scrub(body, &["EAAGpagetoken1001"]);
        let v: Value = serde_json::from_slice(&out).expect("still JSON");
        assert!(
            memmem::find(&out, b"EAAGpagetoken1001").is_none(),
            "{out:?}"
        );
        assert_eq!(v.as_str().unwrap(), "\u{e31e}AAGpagetoken10016");
    }

    #[test]
    fn a_secret_hidden_by_escapes_is_redacted_once_decoded() {
        let body = Bytes::from_static(br#"{"a":"x\u0045AAGtok1","\u0045AAGtok1":1,"n":123456789}"#);
        let out = scrub(body, &["EAAGtok1", "345678"]);
        let v: Value = serde_json::from_slice(&out).expect("still JSON");
        let text = v.to_string();
        assert!(
            !text.contains("EAAGtok1") && !text.contains("345678"),
            "{text}"
        );
        assert_eq!(v["a"], "x[redacted]");
        assert_eq!(v["[redacted]"], 1);
        assert_eq!(v["n"], "[redacted]");
    }
}
