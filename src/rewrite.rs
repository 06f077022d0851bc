//! Making Graph replies safe and useful to hand to a client:
//! - `paging.next` / `paging.previous` (at any depth, inside batch bodies too) point at
//!   graphgate's public URL, without appsecret_proof, and with a per-body [`KeyMarker`] where
//!   Graph put the token; [`finalize`] swaps the marker for the calling client's own key, so
//!   one prepared body (and one cache entry) serves every client. The marker is random per
//!   body and its occurrences are counted against the links rewritten, so text a client
//!   planted in Graph data (a post's message) is never taken for a link.
//! - `access_token` members (`/me/accounts`, `?fields=access_token`) are removed: graphgate
//!   never hands Meta tokens to clients.
//! - every token graphgate holds ([`Secrets`]) is redacted wherever it appears, under any
//!   name, in bodies and in reply headers.
//! - a body that needs this work but cannot be read as JSON (garbage, or nested deeper than
//!   the parser goes) is refused (502), never passed on unchecked.
//!
//! Graph escapes `/` as `\/` inside strings, so links are rewritten in parsed JSON, not bytes.

use std::num::NonZeroU64;

use aho_corasick::AhoCorasick;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use memchr::memmem;
use serde_json::Value;

use crate::error::ProxyError;

const REDACTED: &str = "[redacted]";

/// Searchers for the fixed needles every reply is scanned for, built once: building one is
/// more work than scanning a short header value with it.
struct Needles {
    paging: memmem::Finder<'static>,
    access_token: memmem::Finder<'static>,
    escape: memmem::Finder<'static>,
    token_start: memmem::Finder<'static>,
}

fn needles() -> &'static Needles {
    static NEEDLES: std::sync::OnceLock<Needles> = std::sync::OnceLock::new();
    NEEDLES.get_or_init(|| Needles {
        paging: memmem::Finder::new(b"\"paging\""),
        access_token: memmem::Finder::new(b"\"access_token\""),
        escape: memmem::Finder::new(b"\\u00"),
        token_start: memmem::Finder::new(b"EAA"),
    })
}

/// `__gg` + 16 hex digits + `__`: URL- and JSON-safe, so a byte replace in [`finalize`] is
/// exact.
pub const MARKER_LEN: usize = 22;

/// Stands for the caller's key in one prepared body. Held as its 64-bit value (never zero)
/// and spelled `__gg` + 16 hex digits + `__` where it is written or searched: a cached entry
/// carries one, so 8 bytes rather than 22.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyMarker(NonZeroU64);

impl std::fmt::Debug for KeyMarker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Display for KeyMarker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Spelled from ASCII only.
        f.write_str(std::str::from_utf8(&self.as_bytes()).unwrap_or("__gg________________"))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl KeyMarker {
    /// A fresh marker. Unpredictability is not what makes it safe (occurrences are counted,
    /// see [`prepare`]), only what keeps a count mismatch from ever happening.
    pub fn random() -> KeyMarker {
        let r = fastrand::u64(1..);
        KeyMarker(NonZeroU64::new(r).unwrap_or(NonZeroU64::MIN))
    }

    /// A marker read back from storage, if it has the marker's shape (all-zero digits,
    /// which [`KeyMarker::random`] never makes, are refused).
    pub fn from_bytes(b: &[u8]) -> Option<KeyMarker> {
        let m: &[u8; MARKER_LEN] = b.try_into().ok()?;
        if !(m.starts_with(b"__gg") && m.ends_with(b"__")) {
            return None;
        }
        let mut r = 0u64;
        for (i, c) in m[4..MARKER_LEN - 2].iter().enumerate() {
            let digit = HEX.iter().position(|h| h == c)? as u64;
            r |= digit << (i * 4);
        }
        NonZeroU64::new(r).map(KeyMarker)
    }

    /// The marker as written into a body: the lowest hex digit first.
    pub fn as_bytes(&self) -> [u8; MARKER_LEN] {
        let mut m = *b"__gg0000000000000000__";
        let r = self.0.get();
        for i in 0..16 {
            m[4 + i] = HEX[((r >> (i * 4)) & 0xf) as usize];
        }
        m
    }
}

/// A body ready to be stored or served, holding its [`KeyMarker`] where the caller's key goes.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedBody {
    pub bytes: Bytes,
    pub key_marker: Option<KeyMarker>,
}

impl PreparedBody {
    /// A body with no marker in it.
    pub fn plain(bytes: Bytes) -> PreparedBody {
        PreparedBody {
            bytes,
            key_marker: None,
        }
    }

    /// A part cut from this body (an `ids=` member, a batch element): it carries the marker
    /// only if the marker is in its bytes.
    pub fn part(&self, bytes: Bytes) -> PreparedBody {
        let key_marker = self
            .key_marker
            .filter(|m| memmem::find(&bytes, &m.as_bytes()).is_some());
        PreparedBody { bytes, key_marker }
    }
}

/// Joins bodies prepared separately (each with its own marker) into one: `join` gets the
/// parts' bytes with every marker replaced by one fresh marker, which none of the parts
/// holds otherwise.
pub fn join_bodies(
    parts: &[&PreparedBody],
    join: impl FnOnce(&[Bytes]) -> Bytes,
) -> Result<PreparedBody, ProxyError> {
    if parts.iter().all(|p| p.key_marker.is_none()) {
        let bytes: Vec<Bytes> = parts.iter().map(|p| p.bytes.clone()).collect();
        return Ok(PreparedBody::plain(join(&bytes)));
    }
    let common = KeyMarker::random();
    if parts
        .iter()
        .any(|p| memmem::find(&p.bytes, &common.as_bytes()).is_some())
    {
        return Err(unsafe_reply());
    }
    let bytes: Vec<Bytes> = parts
        .iter()
        .map(|p| match p.key_marker {
            Some(m) => replace_all(&p.bytes, &m.as_bytes(), &common.as_bytes()),
            None => p.bytes.clone(),
        })
        .collect();
    Ok(PreparedBody {
        bytes: join(&bytes),
        key_marker: Some(common),
    })
}

/// The tokens and secrets graphgate holds, any of which must never reach a client.
pub struct Secrets {
    finder: Option<AhoCorasick>,
    /// Some secret holds `/`, `\\` or `"`, which JSON may write escaped.
    escapable: bool,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets { .. }")
    }
}

impl Secrets {
    /// Secrets shorter than 4 bytes are ignored: they would redact ordinary text.
    pub fn new<S: AsRef<str>>(secrets: impl IntoIterator<Item = S>) -> Secrets {
        let list: Vec<String> = secrets
            .into_iter()
            .map(|s| s.as_ref().to_string())
            .filter(|s| s.len() >= 4)
            .collect();
        let finder = if list.is_empty() {
            None
        } else {
            AhoCorasick::new(&list).ok()
        };
        let escapable = list.iter().any(|s| s.contains(['/', '\\', '"']));
        Secrets { finder, escapable }
    }

    fn is_in(&self, hay: &[u8]) -> bool {
        self.finder.as_ref().is_some_and(|f| f.is_match(hay))
    }

    fn redact(&self, text: &str) -> String {
        match &self.finder {
            Some(f) => {
                let mut out = String::with_capacity(text.len());
                f.replace_all_with(text, &mut out, |_, _, dst| {
                    dst.push_str(REDACTED);
                    true
                });
                out
            }
            None => text.to_string(),
        }
    }

    fn redact_bytes(&self, hay: &[u8]) -> Vec<u8> {
        match &self.finder {
            Some(f) => {
                let mut out = Vec::with_capacity(hay.len());
                f.replace_all_with_bytes(hay, &mut out, |_, _, dst| {
                    dst.extend_from_slice(REDACTED.as_bytes());
                    true
                });
                out
            }
            None => hay.to_vec(),
        }
    }
}

fn unsafe_reply() -> ProxyError {
    ProxyError::UpstreamBadResponse("graphgate could not check the reply for tokens".into())
}

/// Prepares an upstream body for clients: paging links rewritten, `access_token` members
/// removed, secrets redacted. A body that needs this and cannot be read as JSON is an
/// error: graphgate does not pass on what it could not check.
pub fn prepare(
    body: Bytes,
    is_batch: bool,
    public_url: &str,
    secrets: &Secrets,
) -> Result<PreparedBody, ProxyError> {
    prepare_marked(body, is_batch, public_url, secrets, KeyMarker::random())
}

/// [`prepare`] with a given marker (tests choose one a body spells).
fn prepare_marked(
    body: Bytes,
    is_batch: bool,
    public_url: &str,
    secrets: &Secrets,
    marker: KeyMarker,
) -> Result<PreparedBody, ProxyError> {
    // `\u00XX` escapes can spell any ASCII key (`"pag\u0069ng"`); Graph never writes them,
    // so a body holding one is parsed to be sure.
    let n = needles();
    let needs_json = is_batch
        || n.paging.find(&body).is_some()
        || n.access_token.find(&body).is_some()
        || n.escape.find(&body).is_some();
    let mut prepared = PreparedBody::plain(body);
    if needs_json {
        let mut value =
            serde_json::from_slice::<Value>(&prepared.bytes).map_err(|_| unsafe_reply())?;
        let mut rw = Rewriter {
            public_url,
            marker,
            changed: false,
            links: 0,
        };
        if is_batch {
            rw.batch(&mut value);
        }
        rw.value(&mut value);
        if rw.changed {
            prepared.bytes = Bytes::from(serde_json::to_vec(&value).map_err(|_| unsafe_reply())?);
        }
        if rw.links > 0 {
            prepared.key_marker = Some(marker);
        }
        prepared.bytes = scrub(prepared.bytes, secrets);
        // Exactly the links rewritten hold the marker; anything else (a marker spelled in
        // Graph data, through escapes) would be filled with a client's key.
        let found = memmem::find_iter(&prepared.bytes, &marker.as_bytes()).count();
        if found != rw.links {
            return Err(unsafe_reply());
        }
        return Ok(prepared);
    }
    prepared.bytes = scrub(prepared.bytes, secrets);
    Ok(prepared)
}

/// The body for one client: the marker becomes the client's URL-encoded key.
pub fn finalize(body: &PreparedBody, client_key: &str) -> Bytes {
    let Some(marker) = body.key_marker else {
        return body.bytes.clone();
    };
    let key: String = form_urlencoded::byte_serialize(client_key.as_bytes()).collect();
    replace_all(&body.bytes, &marker.as_bytes(), key.as_bytes())
}

/// Reply headers as clients may see them: a `Location` loses its `access_token` and
/// `appsecret_proof` parameters, and any secret left in any header is redacted (a header
/// that is no longer valid after that is dropped).
pub fn scrub_headers(
    headers: Vec<(HeaderName, HeaderValue)>,
    secrets: &Secrets,
) -> Vec<(HeaderName, HeaderValue)> {
    headers
        .into_iter()
        .filter_map(|(name, value)| {
            let value = if name == http::header::LOCATION {
                strip_token_params(&value)?
            } else {
                value
            };
            let bytes = value.as_bytes();
            if !secrets.is_in(bytes) && !has_token_shape(bytes) {
                return Some((name, value));
            }
            let redacted = redact_token_shapes(&secrets.redact_bytes(bytes));
            HeaderValue::from_bytes(&redacted).ok().map(|v| (name, v))
        })
        .collect()
}

/// Meta access tokens start `EAA` and run on in letters and digits; headers get no
/// legitimate text of that shape, so any is redacted, held by graphgate or not (a Page token
/// Graph quotes in an error names a token graphgate never minted).
const TOKEN_SHAPE_MIN: usize = 24;

fn token_shapes(b: &[u8]) -> impl Iterator<Item = (usize, usize)> + '_ {
    needles().token_start.find_iter(b).filter_map(move |at| {
        let len = b[at..]
            .iter()
            .take_while(|c| c.is_ascii_alphanumeric())
            .count();
        (len >= TOKEN_SHAPE_MIN).then_some((at, at + len))
    })
}

fn has_token_shape(b: &[u8]) -> bool {
    token_shapes(b).next().is_some()
}

fn redact_token_shapes(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut last = 0;
    for (start, end) in token_shapes(b) {
        if start < last {
            continue;
        }
        out.extend_from_slice(&b[last..start]);
        out.extend_from_slice(REDACTED.as_bytes());
        last = end;
    }
    out.extend_from_slice(&b[last..]);
    out
}

/// A URL without its `access_token` / `appsecret_proof` query parameters.
fn strip_token_params(value: &HeaderValue) -> Option<HeaderValue> {
    let text = value.to_str().ok()?;
    let Some((base, query)) = text.split_once('?') else {
        return Some(value.clone());
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let name = pair.split_once('=').map_or(*pair, |(k, _)| k);
            let name = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
            !name.eq_ignore_ascii_case("access_token")
                && !name.eq_ignore_ascii_case("appsecret_proof")
        })
        .collect();
    let mut out = base.to_string();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    HeaderValue::from_str(&out).ok()
}

/// Removes every occurrence of each secret. Returns the input untouched (no copy) in the
/// normal case: no secret in the bytes and no escape that could hide one.
///
/// A JSON body is scrubbed as JSON: strings, keys and numbers that hold a secret once decoded
/// are redacted, and the body is re-serialized, so the result stays valid JSON. This matters
/// because a secret may be split by an escape (`"\uE31EAAG…"` holds the bytes `EAAG…` though
/// no decoded string does; a blind byte replace would cut the escape and break the JSON), or
/// hidden by one (`\u0045AAG…` decodes to `EAAG…`). Found by the `rewrite` fuzz target.
/// Anything else (not JSON) is scrubbed byte-wise.
pub fn scrub(body: Bytes, secrets: &Secrets) -> Bytes {
    if secrets.finder.is_none() {
        return body;
    }
    let in_bytes = secrets.is_in(&body);
    // Secrets are ASCII: only `\u00XX` escapes of ASCII (never sent by Graph, which escapes
    // `/` as `\/` and non-ASCII as `\uXXXX`) or `\/`-style ones could hide one.
    let escapes_may_hide = needles()
        .escape
        .find_iter(&body)
        .any(|at| body.get(at + 4).is_some_and(|b| (b'0'..=b'7').contains(b)))
        || (secrets.escapable && memchr::memchr(b'\\', &body).is_some());
    if !in_bytes && !escapes_may_hide {
        return body;
    }
    let mut body = body;
    if let Ok(mut value) = serde_json::from_slice::<Value>(&body) {
        let mut changed = false;
        scrub_value(&mut value, secrets, &mut changed);
        if changed || in_bytes {
            if let Ok(out) = serde_json::to_vec(&value) {
                body = Bytes::from(out);
            }
        }
    }
    // A secret spelled across an escape JSON itself writes (a control character's
    // `\u0012` followed by text): the string (or key) that encodes to it goes whole.
    if secrets.is_in(&body) {
        if let Ok(mut value) = serde_json::from_slice::<Value>(&body) {
            redact_encoded(&mut value, secrets);
            if let Ok(out) = serde_json::to_vec(&value) {
                body = Bytes::from(out);
            }
        }
    }
    // Not JSON, or a secret that survives all that: bytes, whatever that does to the syntax
    // (secrecy wins).
    if secrets.is_in(&body) {
        body = Bytes::from(secrets.redact_bytes(&body));
    }
    body
}

fn scrub_value(value: &mut Value, secrets: &Secrets, changed: &mut bool) {
    match value {
        Value::String(t) if secrets.is_in(t.as_bytes()) => {
            *t = secrets.redact(t);
            *changed = true;
        }
        Value::Number(n) if secrets.is_in(n.to_string().as_bytes()) => {
            *value = Value::String(REDACTED.into());
            *changed = true;
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|v| scrub_value(v, secrets, changed)),
        Value::Object(map) => {
            if map.keys().any(|k| secrets.is_in(k.as_bytes())) {
                let old = std::mem::take(map);
                for (k, v) in old {
                    let k = if secrets.is_in(k.as_bytes()) {
                        secrets.redact(&k)
                    } else {
                        k
                    };
                    map.insert(k, v);
                }
                *changed = true;
            }
            map.values_mut()
                .for_each(|v| scrub_value(v, secrets, changed));
        }
        _ => {}
    }
}

/// Replaces every string and key whose JSON encoding holds a secret with the redaction mark.
fn redact_encoded(value: &mut Value, secrets: &Secrets) {
    let encodes_secret =
        |t: &str| serde_json::to_string(t).map_or(true, |enc| secrets.is_in(enc.as_bytes()));
    match value {
        Value::String(t) if encodes_secret(t) => *t = REDACTED.into(),
        Value::Array(items) => items.iter_mut().for_each(|v| redact_encoded(v, secrets)),
        Value::Object(map) => {
            let old = std::mem::take(map);
            for (k, mut v) in old {
                redact_encoded(&mut v, secrets);
                let k = if encodes_secret(&k) {
                    REDACTED.into()
                } else {
                    k
                };
                map.insert(k, v);
            }
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

/// One body's link rewriting: where links point, the marker for the key, what was done.
struct Rewriter<'a> {
    public_url: &'a str,
    marker: KeyMarker,
    changed: bool,
    /// Links that received the marker.
    links: usize,
}

impl Rewriter<'_> {
    /// Batch replies carry each operation's body as a JSON string: rewrite inside it.
    fn batch(&mut self, value: &mut Value) {
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
            let outer_changed = std::mem::replace(&mut self.changed, false);
            self.value(&mut inner);
            if self.changed {
                // Could it not be written back, the body is dropped (and the marker count
                // then fails the reply) rather than kept with its links.
                *body = serde_json::to_string(&inner).unwrap_or_default();
            }
            self.changed |= outer_changed;
        }
    }

    fn value(&mut self, value: &mut Value) {
        match value {
            Value::Object(map) => {
                if map.remove("access_token").is_some() {
                    self.changed = true;
                }
                if let Some(Value::Object(paging)) = map.get_mut("paging") {
                    for key in ["next", "previous"] {
                        if let Some(Value::String(link)) = paging.get(key) {
                            match rewrite_link(link, self.public_url, self.marker) {
                                Some((new, keyed)) => {
                                    self.links += usize::from(keyed);
                                    paging.insert(key.to_string(), Value::String(new));
                                }
                                // A link we cannot parse could carry a token: drop it.
                                None => {
                                    paging.remove(key);
                                }
                            }
                            self.changed = true;
                        }
                    }
                }
                for v in map.values_mut() {
                    self.value(v);
                }
            }
            Value::Array(items) => {
                for v in items {
                    self.value(v);
                }
            }
            _ => {}
        }
    }
}

/// `https://graph.facebook.com/v21.0/1001/feed?access_token=T&appsecret_proof=P&after=X`
/// → `{public_url}/v21.0/1001/feed?access_token={marker}&after=X`, and whether the marker
/// went in.
pub fn rewrite_link(link: &str, public_url: &str, marker: KeyMarker) -> Option<(String, bool)> {
    let uri: http::Uri = link.parse().ok()?;
    let path = uri.path();
    let mut out = form_urlencoded::Serializer::new(String::new());
    let mut any = false;
    let mut keyed = false;
    if let Some(q) = uri.query() {
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            match k.as_ref() {
                "appsecret_proof" => {}
                "access_token" if !keyed => {
                    let spelled = marker.as_bytes();
                    // Spelled from ASCII only.
                    out.append_pair("access_token", std::str::from_utf8(&spelled).unwrap_or(""));
                    keyed = true;
                    any = true;
                }
                "access_token" => {}
                _ => {
                    out.append_pair(&k, &v);
                    any = true;
                }
            }
        }
    }
    let query = out.finish();
    let link = if any {
        format!("{public_url}{path}?{query}")
    } else {
        format!("{public_url}{path}")
    };
    Some((link, keyed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A marker reads back from its spelling, and only marker-shaped bytes read as one.
        #[test]
        fn prop_a_marker_reads_back_from_its_spelling(r in 1u64.., junk in proptest::collection::vec(any::<u8>(), 0..30)) {
            let m = KeyMarker(NonZeroU64::new(r).unwrap());
            let spelled = m.as_bytes();
            prop_assert_eq!(KeyMarker::from_bytes(&spelled), Some(m));
            prop_assert_eq!(m.to_string().into_bytes(), spelled.to_vec());
            if let Some(read) = KeyMarker::from_bytes(&junk) {
                prop_assert_eq!(&read.as_bytes()[..], &junk[..]);
            }
        }
    }

    #[test]
    fn markers_spell_as_before_and_zero_is_refused() {
        let m = KeyMarker::from_bytes(b"__gg0123456789abcdef__").unwrap();
        assert_eq!(&m.as_bytes(), b"__gg0123456789abcdef__");
        assert_eq!(KeyMarker::from_bytes(b"__gg0000000000000000__"), None);
        assert_eq!(KeyMarker::from_bytes(b"__gg0123456789abcdeF__"), None);
        assert_eq!(KeyMarker::from_bytes(b"__gg0123456789abcdef_"), None);
        assert_ne!(KeyMarker::random(), KeyMarker::random());
    }

    const PUBLIC: &str = "http://gw.internal:8080";

    fn secrets(list: &[&str]) -> Secrets {
        Secrets::new(list.iter().copied())
    }

    #[test]
    fn link_rewrite_replaces_host_token_and_drops_proof() {
        let m = KeyMarker::random();
        let (l, keyed) = rewrite_link(
            "https://graph.facebook.com/v21.0/1001/feed?access_token=SYSTOK&appsecret_proof=abc&limit=2&after=QVFI",
            PUBLIC,
            m,
        )
        .unwrap();
        assert!(keyed);
        assert_eq!(
            l,
            format!("{PUBLIC}/v21.0/1001/feed?access_token={m}&limit=2&after=QVFI")
        );
    }

    #[test]
    fn escaped_slashes_nested_paging_and_tokens() {
        let body = br#"{"data":[{"id":"1","comments":{"data":[],"paging":{"next":"https:\/\/graph.facebook.com\/v21.0\/1\/comments?access_token=SYSTOK&after=A"}}}],"paging":{"previous":"https:\/\/graph.facebook.com\/1001\/feed?access_token=SYSTOK&before=B"},"access_token":"PAGETOK"}"#;
        let p = prepare(
            Bytes::from_static(body),
            false,
            PUBLIC,
            &secrets(&["SYSTOK", "PAGETOK"]),
        )
        .unwrap();
        assert!(p.key_marker.is_some());
        let out = finalize(&p, "client key/1");
        let text = std::str::from_utf8(&out).unwrap();
        assert!(
            !text.contains("SYSTOK") && !text.contains("PAGETOK") && !text.contains("__gg"),
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
        let p = prepare(Bytes::from(body), true, PUBLIC, &secrets(&["SYSTOK"])).unwrap();
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
        let p = prepare(body.clone(), false, PUBLIC, &secrets(&["SYSTOK"])).unwrap();
        assert_eq!(p.bytes.as_ptr(), body.as_ptr());
        let leaked = prepare(
            Bytes::from_static(b"oops SYSTOK here"),
            false,
            PUBLIC,
            &secrets(&["SYSTOK"]),
        )
        .unwrap();
        assert_eq!(&leaked.bytes[..], b"oops [redacted] here");
    }

    /// Text planted in Graph data that looks like a marker (any marker: the old fixed
    /// placeholder, this body's own, spelled with escapes) is never filled with a key.
    #[test]
    fn planted_markers_are_never_filled_with_a_key() {
        let link = r#""paging":{"next":"https://graph.facebook.com/1001/feed?access_token=SYSTOK&after=A"}"#;
        for planted in [
            "__graphgate_client_key__".to_string(),
            "__gg0123456789abcdef__".to_string(),
            r"\u005f_gg0123456789abcdef__".to_string(),
        ] {
            let body = format!(r#"{{"data":[{{"message":"hi {planted}"}}],{link}}}"#);
            match prepare(Bytes::from(body), false, PUBLIC, &secrets(&["SYSTOK"])) {
                Ok(p) => {
                    let out = finalize(&p, "SECRETKEY");
                    let v: Value = serde_json::from_slice(&out).unwrap();
                    assert!(
                        !v["data"][0]["message"]
                            .as_str()
                            .unwrap()
                            .contains("SECRETKEY"),
                        "{v}"
                    );
                    assert!(v["paging"]["next"].as_str().unwrap().contains("SECRETKEY"));
                }
                Err(e) => panic!("{planted}: {e}"),
            }
        }
    }

    #[test]
    fn a_body_that_spells_its_own_marker_fails_closed() {
        let m = KeyMarker::from_bytes(b"__gg0123456789abcdef__").unwrap();
        let link = r#""paging":{"next":"https://graph.facebook.com/1/feed?access_token=T"}"#;
        for planted in [m.to_string(), m.to_string().replacen('_', r"\u005f", 1)] {
            let body = format!(r#"{{"message":"{planted}",{link}}}"#);
            let out = prepare_marked(Bytes::from(body), false, PUBLIC, &secrets(&[]), m);
            assert!(out.is_err(), "{planted}");
        }
        // The same body with another marker is fine.
        let body = format!(r#"{{"message":"{}",{link}}}"#, m);
        assert!(prepare(Bytes::from(body), false, PUBLIC, &secrets(&[])).is_ok());
    }

    #[test]
    fn unreadable_bodies_that_need_checking_fail_closed() {
        let deep = format!(
            r#"{}{{"access_token":"PAGETOK"}}{}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        assert!(prepare(Bytes::from(deep), false, PUBLIC, &secrets(&["X123"])).is_err());
        let garbage = br#"{"paging":{"next":"https://graph.facebook.com/1?access_token=T""#;
        assert!(prepare(Bytes::from_static(garbage), false, PUBLIC, &secrets(&[])).is_err());
        // Nothing to check: passed on as it is.
        let html = Bytes::from_static(b"<html>502</html>");
        assert_eq!(
            prepare(html.clone(), false, PUBLIC, &secrets(&[]))
                .unwrap()
                .bytes,
            html
        );
    }

    #[test]
    fn reply_headers_lose_tokens() {
        let s = secrets(&["SYSTOK", "PAGETOK"]);
        let headers = vec![
            (
                http::header::LOCATION,
                HeaderValue::from_static(
                    "https://scontent.example/p.jpg?access_token=PAGETOK&appsecret_proof=ab&oh=1",
                ),
            ),
            (
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static(
                    "OAuth \"Facebook Platform\" \"invalid_token\" \"SYSTOK\"",
                ),
            ),
            (
                HeaderName::from_static("x-fb-trace-id"),
                HeaderValue::from_static("dbg PAGETOK EAAGnotheldbygraphgate000000001"),
            ),
            (
                HeaderName::from_static("x-fb-rev"),
                HeaderValue::from_static("1"),
            ),
        ];
        let out = scrub_headers(headers, &s);
        assert_eq!(out[0].1, "https://scontent.example/p.jpg?oh=1");
        for (n, v) in &out {
            let v = v.to_str().unwrap();
            assert!(
                !v.contains("SYSTOK") && !v.contains("PAGETOK") && !v.contains("EAAG"),
                "{n}: {v}"
            );
        }
        assert_eq!(out.len(), 4);
    }

    /// Fuzz finding (rewrite target): a secret whose first byte ended a `\u` escape was
    /// replaced byte-wise, cutting the escape and breaking the JSON.
    #[test]
    fn a_secret_split_by_an_escape_keeps_the_json_valid() {
        let body = Bytes::from_static(b"\"\\uE31EAAGpagetoken10016\"");
        let out = scrub(body, &secrets(&["EAAGpagetoken1001"]));
        let v: Value = serde_json::from_slice(&out).expect("still JSON");
        assert!(
            memmem::find(&out, b"EAAGpagetoken1001").is_none(),
            "{out:?}"
        );
        assert_eq!(v.as_str().unwrap(), "\u{e31e}AAGpagetoken10016");
    }

    /// Found by the `rewrite` fuzz target: `\u0012` then `3456…` spells `0123456…` in the
    /// bytes serde_json writes back, though no decoded string holds it.
    #[test]
    fn a_secret_spelled_across_an_escape_json_writes_keeps_the_json_valid() {
        let secret = "0123456789abcdef0123456789abcdef";
        for body in [
            r#""x\u00123456789abcdef0123456789abcdef""#,
            r#"{"\u00123456789abcdef0123456789abcdef":[1]}"#,
        ] {
            let out = scrub(Bytes::from(body), &secrets(&[secret]));
            let v: Value = serde_json::from_slice(&out).expect("still JSON");
            assert!(memmem::find(&out, secret.as_bytes()).is_none(), "{out:?}");
            assert!(v.to_string().contains(REDACTED), "{v}");
        }
    }

    #[test]
    fn a_secret_hidden_by_escapes_is_redacted_once_decoded() {
        let body = Bytes::from_static(br#"{"a":"x\u0045AAGtok1","\u0045AAGtok1":1,"n":123456789}"#);
        let out = scrub(body, &secrets(&["EAAGtok1", "345678"]));
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

    #[test]
    fn joined_bodies_share_one_fresh_marker() {
        let a = PreparedBody {
            bytes: Bytes::from_static(b"\"__gg0000000000000001__\""),
            key_marker: KeyMarker::from_bytes(b"__gg0000000000000001__"),
        };
        let b = PreparedBody {
            bytes: Bytes::from_static(b"\"__gg0000000000000002__ __gg0000000000000001__\""),
            key_marker: KeyMarker::from_bytes(b"__gg0000000000000002__"),
        };
        let joined = join_bodies(&[&a, &b], |parts| {
            Bytes::from(
                parts
                    .iter()
                    .map(|p| std::str::from_utf8(p).unwrap())
                    .collect::<Vec<_>>()
                    .join(","),
            )
        })
        .unwrap();
        let out = finalize(&joined, "K");
        // b's text that spelled a's marker stays text.
        assert_eq!(&out[..], b"\"K\",\"K __gg0000000000000001__\"");
    }
}
