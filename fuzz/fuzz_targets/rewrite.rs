//! The paging rewrite (`rewrite::prepare` + `finalize`): never panics, never leaves a known
//! secret in the bytes nor in any JSON string a client would decode, keeps JSON valid, and
//! points every paging link it keeps at graphgate. A body it must read and cannot (not JSON)
//! is refused, never passed on; JSON is always prepared.
#![no_main]
use std::sync::LazyLock;

use bytes::Bytes;
use graphgate::rewrite::{finalize, prepare, Secrets};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const PUBLIC: &str = "http://gw.internal:8080";
const SECRETS: [&str; 3] = [
    "EAAGsystemtoken0001",
    "0123456789abcdef0123456789abcdef",
    "EAAGpagetoken1001",
];
static HELD: LazyLock<Secrets> = LazyLock::new(|| Secrets::new(SECRETS));
const CLIENT_KEY: &str = "client key/1";

fn strings_contain_secret(v: &Value) -> Option<String> {
    let hit = |s: &str| SECRETS.iter().any(|x| s.contains(x));
    match v {
        Value::String(s) if hit(s) => Some(s.clone()),
        Value::Number(n) if hit(&n.to_string()) => Some(n.to_string()),
        Value::Array(a) => a.iter().find_map(strings_contain_secret),
        Value::Object(m) => m.iter().find_map(|(k, v)| {
            if hit(k) {
                Some(k.clone())
            } else {
                strings_contain_secret(v)
            }
        }),
        _ => None,
    }
}

fn check_links(v: &Value) {
    match v {
        Value::Object(m) => {
            if let Some(Value::Object(p)) = m.get("paging") {
                for k in ["next", "previous"] {
                    if let Some(Value::String(l)) = p.get(k) {
                        assert!(l.starts_with(PUBLIC), "paging link left pointing away: {l}");
                        let query = l.split_once('?').map(|(_, q)| q).unwrap_or("");
                        assert!(
                            !form_urlencoded::parse(query.as_bytes())
                                .any(|(k, _)| k == "appsecret_proof"),
                            "proof left in {l}"
                        );
                    }
                }
            }
            m.values().for_each(check_links);
        }
        Value::Array(a) => a.iter().for_each(check_links),
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, body)) = data.split_first() else {
        return;
    };
    let is_batch = flags & 1 == 1;
    let input_json = serde_json::from_slice::<Value>(body).is_ok();
    let prepared = match prepare(Bytes::copy_from_slice(body), is_batch, PUBLIC, &HELD) {
        Ok(prepared) => prepared,
        Err(e) => {
            assert!(
                !input_json,
                "JSON refused ({e}): {:?}",
                String::from_utf8_lossy(body)
            );
            return;
        }
    };
    let out = finalize(&prepared, CLIENT_KEY);
    for s in SECRETS {
        assert!(
            !out.windows(s.len()).any(|w| w == s.as_bytes()),
            "secret {s} left in {:?}",
            String::from_utf8_lossy(&out)
        );
    }
    if input_json {
        let v: Value = serde_json::from_slice(&out).unwrap_or_else(|e| {
            panic!(
                "JSON in, not JSON out ({e}): {:?} -> {:?}",
                String::from_utf8_lossy(body),
                String::from_utf8_lossy(&out)
            )
        });
        if let Some(s) = strings_contain_secret(&v) {
            panic!("a decoded JSON string holds a secret: {s:?}");
        }
        check_links(&v);
        if is_batch {
            if let Value::Array(items) = &v {
                for item in items {
                    if let Some(Value::String(b)) = item.get("body") {
                        if let Ok(inner) = serde_json::from_str::<Value>(b) {
                            check_links(&inner);
                        }
                    }
                }
            }
        }
    }
});
