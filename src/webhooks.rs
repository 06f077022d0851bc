//! Meta Webhooks: Page change notifications purge what they name, on every replica, so cached
//! reads can live long and still show a change within a second.
//!
//! Meta first checks the endpoint with a handshake (`GET ?hub.mode=subscribe&hub.verify_token=
//! …&hub.challenge=…`, answered with the challenge when the token matches), then POSTs each
//! delivery signed with the app secret (`X-Hub-Signature-256: sha256=<hex HMAC-SHA256>` of the
//! raw body). Only a delivery whose signature holds, whose entries are recent
//! (`webhooks.max_age_s`) and that was not seen before purges anything; a refusal purges
//! nothing.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::{Secret, WebhooksConfig};
/// What became of a request to the endpoint; also its metric label.
pub use crate::metrics::WebhookOutcome as Outcome;

/// The signature header Meta sends with every delivery.
pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";

/// Deliveries remembered for replay detection: a bound on memory, far above Meta's rate.
const MAX_REMEMBERED: u64 = 100_000;
/// Entries and changes read from one delivery: Meta batches at most 1 000 changes.
const MAX_CHANGES: usize = 1_000;

/// The endpoint's state: its configuration and the deliveries seen lately.
pub struct Webhooks {
    cfg: WebhooksConfig,
    app_secret: Secret,
    /// SHA-256 of each accepted delivery's signature, kept for `max_age`.
    seen: moka::sync::Cache<[u8; 32], ()>,
}

impl Webhooks {
    pub fn new(cfg: &WebhooksConfig, app_secret: Secret) -> Webhooks {
        Webhooks {
            seen: moka::sync::Cache::builder()
                .max_capacity(MAX_REMEMBERED)
                .time_to_live(cfg.max_age)
                .build(),
            cfg: cfg.clone(),
            app_secret,
        }
    }

    pub fn path(&self) -> &str {
        &self.cfg.path
    }

    /// The subscription handshake: the challenge to echo, or why not.
    pub fn handshake(&self, query: Option<&str>) -> Result<String, Outcome> {
        let (mut mode, mut token, mut challenge) = (None, None, None);
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            let slot = match &*k {
                "hub.mode" => &mut mode,
                "hub.verify_token" => &mut token,
                "hub.challenge" => &mut challenge,
                _ => continue,
            };
            if slot.replace(v).is_some() {
                return Err(Outcome::HandshakeRefused);
            }
        }
        let token_ok = token
            .is_some_and(|t| same_digest(t.as_bytes(), self.cfg.verify_token.expose().as_bytes()));
        // The challenge is echoed into the reply: only a short plain token is.
        let challenge = challenge.filter(|c| {
            !c.is_empty()
                && c.len() <= 256
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        });
        match (mode.as_deref(), token_ok, challenge) {
            (Some("subscribe"), true, Some(c)) => Ok(c.into_owned()),
            _ => Err(Outcome::HandshakeRefused),
        }
    }

    /// Checks a delivery and reads which nodes it says changed (each to be purged with its
    /// edges). `Ok` with an empty list: nothing to purge (not a Page notification). A replay
    /// is reported as `Err(Replayed)`.
    pub fn check_delivery(
        &self,
        signature: Option<&[u8]>,
        body: &[u8],
        now: SystemTime,
    ) -> Result<Vec<String>, Outcome> {
        let signature = signature.ok_or(Outcome::BadSignature)?;
        let mac = signature
            .strip_prefix(b"sha256=")
            .and_then(|hex_mac| hex::decode(hex_mac).ok())
            .ok_or(Outcome::BadSignature)?;
        // Constant time: `verify_slice` compares without an early exit.
        mac_of(self.app_secret.expose(), body)
            .verify_slice(&mac)
            .map_err(|_| Outcome::BadSignature)?;

        let doc: Value = serde_json::from_slice(body).map_err(|_| Outcome::Malformed)?;
        let entries = doc
            .get("entry")
            .and_then(Value::as_array)
            .filter(|e| !e.is_empty())
            .ok_or(Outcome::Malformed)?;
        let newest = entries
            .iter()
            .map(|e| e.get("time").and_then(entry_time))
            .collect::<Option<Vec<_>>>()
            .and_then(|times| times.into_iter().max())
            .ok_or(Outcome::Malformed)?;
        let age = match now.duration_since(newest) {
            Ok(age) => age,
            Err(ahead) => ahead.duration(),
        };
        if age > self.cfg.max_age {
            return Err(Outcome::Stale);
        }
        let purges = if doc.get("object").and_then(Value::as_str) == Some("page") {
            page_purges(entries)?
        } else {
            Vec::new()
        };
        // Remembered only once it is known good, so a refused delivery can be sent again.
        let id: [u8; 32] = Sha256::digest(&mac).into();
        if !self.seen.entry(id).or_insert(()).is_fresh() {
            return Err(Outcome::Replayed);
        }
        Ok(purges)
    }
}

/// An entry's `time`: Unix seconds (Page notifications), or milliseconds (some objects).
fn entry_time(v: &Value) -> Option<SystemTime> {
    let t = v.as_u64()?;
    let secs = if t > 100_000_000_000 { t / 1000 } else { t };
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// A Graph node id as Meta sends it in notifications: digits, or digits joined by `_`.
fn node_id(v: Option<&Value>) -> Option<String> {
    let s = match v? {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.as_u64()?.to_string(),
        _ => return None,
    };
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_digit() || b == b'_')
        && !s.starts_with('_')
        && !s.ends_with('_');
    ok.then_some(s)
}

/// The nodes a Page notification's changes make stale: the Page (a field of it changed, or
/// its feed did, which its edges show) and every object a `feed` change names (post, comment,
/// reply, photo, video), each with its edges.
fn page_purges(entries: &[Value]) -> Result<Vec<String>, Outcome> {
    const OBJECT_KEYS: [&str; 6] = [
        "post_id",
        "comment_id",
        "parent_id",
        "photo_id",
        "video_id",
        "share_id",
    ];
    let mut out = Vec::new();
    let mut changes = 0;
    for entry in entries {
        let page = node_id(entry.get("id")).ok_or(Outcome::Malformed)?;
        // Entries without `changes` (Messenger's `messaging`) change nothing cached.
        let Some(list) = entry.get("changes").and_then(Value::as_array) else {
            continue;
        };
        for change in list {
            changes += 1;
            if changes > MAX_CHANGES {
                return Err(Outcome::Malformed);
            }
            let field = change
                .get("field")
                .and_then(Value::as_str)
                .ok_or(Outcome::Malformed)?;
            out.push(page.clone());
            if field == "feed" {
                let value = change.get("value");
                out.extend(
                    OBJECT_KEYS
                        .iter()
                        .filter_map(|k| node_id(value.and_then(|v| v.get(*k)))),
                );
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Equal inputs, compared through their digests so the time taken says nothing about where
/// they differ.
fn same_digest(a: &[u8], b: &[u8]) -> bool {
    let (da, db) = (Sha256::digest(a), Sha256::digest(b));
    da.iter()
        .zip(db.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// `sha256=<hex>` of `body` under `app_secret`, as Meta signs a delivery.
pub fn sign(app_secret: &str, body: &[u8]) -> String {
    let digest = mac_of(app_secret, body).finalize().into_bytes();
    format!("sha256={}", hex::encode(digest))
}

/// HMAC-SHA256 of `body` keyed with the app secret, as Meta signs deliveries.
fn mac_of(app_secret: &str, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(app_secret.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(body);
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "app-secret";

    fn hooks() -> Webhooks {
        Webhooks::new(
            &WebhooksConfig {
                path: "/webhooks".into(),
                verify_token: Secret::new("verify-me"),
                max_age: Duration::from_secs(3600),
            },
            Secret::new(SECRET),
        )
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn feed(post: &str, time: u64) -> Vec<u8> {
        serde_json::json!({"object":"page","entry":[{"id":"1001","time":time,"changes":[
            {"field":"feed","value":{"item":"post","verb":"edited","post_id":post}}]}]})
        .to_string()
        .into_bytes()
    }

    #[test]
    fn the_handshake_echoes_the_challenge_only_for_the_right_token() {
        let h = hooks();
        let q = "hub.mode=subscribe&hub.verify_token=verify-me&hub.challenge=1158201444";
        assert_eq!(h.handshake(Some(q)).unwrap(), "1158201444");
        for bad in [
            "hub.mode=subscribe&hub.verify_token=verify-you&hub.challenge=1",
            "hub.mode=unsubscribe&hub.verify_token=verify-me&hub.challenge=1",
            "hub.mode=subscribe&hub.verify_token=verify-me",
            "hub.mode=subscribe&hub.verify_token=verify-me&hub.challenge=%3Cscript%3E",
            "hub.mode=subscribe&hub.verify_token=x&hub.verify_token=verify-me&hub.challenge=1",
            "",
        ] {
            assert_eq!(
                h.handshake(Some(bad)),
                Err(Outcome::HandshakeRefused),
                "{bad}"
            );
        }
        assert_eq!(h.handshake(None), Err(Outcome::HandshakeRefused));
    }

    #[test]
    fn a_signed_recent_delivery_names_its_objects_once() {
        let h = hooks();
        let body = feed("1001_5", now());
        let sig = sign(SECRET, &body);
        assert_eq!(
            h.check_delivery(Some(sig.as_bytes()), &body, SystemTime::now()),
            Ok(vec!["1001".to_string(), "1001_5".to_string()])
        );
        assert_eq!(
            h.check_delivery(Some(sig.as_bytes()), &body, SystemTime::now()),
            Err(Outcome::Replayed)
        );
    }

    #[test]
    fn bad_signatures_stale_and_malformed_deliveries_are_refused() {
        let h = hooks();
        let body = feed("1001_5", now());
        let now = SystemTime::now();
        let wrong = sign("other-secret", &body);
        let mut flipped = sign(SECRET, &body).into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        for sig in [
            None,
            Some(wrong.as_bytes()),
            Some(&flipped[..]),
            Some(&b"sha1=abc"[..]),
            Some(&b"sha256=zz"[..]),
        ] {
            assert_eq!(
                h.check_delivery(sig, &body, now),
                Err(Outcome::BadSignature)
            );
        }
        for time in [now_secs() - 7200, now_secs() + 7200] {
            let old = feed("1001_5", time);
            let sig = sign(SECRET, &old);
            assert_eq!(
                h.check_delivery(Some(sig.as_bytes()), &old, now),
                Err(Outcome::Stale)
            );
        }
        for body in [
            b"not json".to_vec(),
            br#"{"object":"page","entry":[]}"#.to_vec(),
            format!(
                r#"{{"object":"page","entry":[{{"id":"x/../1","time":{},"changes":[]}}]}}"#,
                now_secs()
            )
            .into_bytes(),
            br#"{"object":"page","entry":[{"id":"1001","changes":[]}]}"#.to_vec(),
        ] {
            let sig = sign(SECRET, &body);
            assert_eq!(
                h.check_delivery(Some(sig.as_bytes()), &body, now),
                Err(Outcome::Malformed),
                "{}",
                String::from_utf8_lossy(&body)
            );
        }
    }

    fn now_secs() -> u64 {
        now()
    }

    #[test]
    fn page_fields_purge_the_page_and_other_objects_nothing() {
        let h = hooks();
        let body = serde_json::json!({"object":"page","entry":[
            {"id":"1002","time":now(),"changes":[{"field":"name","value":"New name"}]},
            {"id":"1001","time":now() * 1000,"changes":[{"field":"feed","value":{"item":"comment","verb":"add","post_id":"1001_5","comment_id":"5_77"}}]}]})
        .to_string()
        .into_bytes();
        let sig = sign(SECRET, &body);
        assert_eq!(
            h.check_delivery(Some(sig.as_bytes()), &body, SystemTime::now()),
            Ok(["1001", "1001_5", "1002", "5_77"]
                .map(String::from)
                .to_vec())
        );
        let user =
            serde_json::json!({"object":"user","entry":[{"id":"9","time":now(),"changes":[]}]})
                .to_string()
                .into_bytes();
        let sig = sign(SECRET, &user);
        assert_eq!(
            h.check_delivery(Some(sig.as_bytes()), &user, SystemTime::now()),
            Ok(vec![])
        );
    }
}
