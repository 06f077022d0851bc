//! The cache key of a read: what makes two Graph calls return the same bytes.
//!
//! Readable form: `{version}/{node}[/{edge}]?{params sorted by name}#{token identity}`, with
//! `fields` in canonical form and everything that does not change the reply removed
//! (`access_token`, `appsecret_proof`, `method`, JSONP `callback`, `_` cache-busters). The
//! token identity (`system`, `page:1001`) is part of the key because different tokens may
//! see different data; it names the token without revealing it, so the readable form is safe
//! to log and to match in the purge API. The map key is a 128-bit SHA-256 prefix of it.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::graph::fields::{canonicalize, FieldsError};
use crate::graph::request::Params;

/// Parameters that never change what Graph answers (or that graphgate strips anyway).
const IGNORED_PARAMS: &[&str] = &["access_token", "appsecret_proof", "method", "callback", "_"];

/// The hasher of the maps a request touches (keyed by [`KeyId`] and the like): foldhash,
/// seeded per process. Hashing with SipHash, the standard one, took about 2 % of a miss's
/// instructions in these maps. foldhash is not a cryptographic hash, but without the seed
/// keys cannot be lined up in one bucket, and these maps hold digests or are bounded.
pub type FastHash = foldhash::fast::RandomState;

/// A `HashMap` with [`FastHash`].
pub type FastMap<K, V> = std::collections::HashMap<K, V, FastHash>;

/// Digest of a readable key: the moka map key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub u128);

/// A computed key with what invalidation and TTL rules need to know about it.
#[derive(Debug, Clone)]
pub struct CacheKey {
    pub id: KeyId,
    /// Safe to log: carries no token or client key.
    pub readable: Arc<str>,
    /// First path segment (`1001`, `1001_7`, `me`), for invalidation by node.
    pub node: Option<Arc<str>>,
    /// Whether the path goes past the node (`/1001/feed`): a new post on a Page drops
    /// the Page's edges.
    pub has_edge: bool,
    /// `/node/edge` without the version, matched against `[[cache.rules]]`.
    pub rule_path: String,
}

/// Builds the key of a GET of `segments` with `params` under `identity`. Fails only when
/// `fields` is malformed (the proxy rejects those with 400 before asking).
pub fn build(
    version: &str,
    segments: &[String],
    params: &Params,
    identity: &str,
) -> Result<CacheKey, FieldsError> {
    let (readable, path_len) = key_text(version, segments, params, identity, false)?;
    let rule_path = readable[version.len()..version.len() + path_len].to_string();
    Ok(CacheKey {
        id: id_of(&readable),
        readable: Arc::from(readable),
        node: segments.first().map(|s| Arc::from(s.as_str())),
        has_edge: segments.len() > 1,
        rule_path,
    })
}

/// A key's readable text, `{version}{/segments}?{sorted params}#{identity}` (the path `/`
/// for the root), and the length of its path part. With `without_fields`, every `fields` parameter is left out.
fn key_text(
    version: &str,
    segments: &[String],
    params: &Params,
    identity: &str,
    without_fields: bool,
) -> Result<(String, usize), FieldsError> {
    let mut pairs: Vec<(&str, std::borrow::Cow<'_, str>)> = Vec::with_capacity(params.len());
    for (k, v) in params.iter() {
        if IGNORED_PARAMS.contains(&k) || (without_fields && k == "fields") {
            continue;
        }
        let v = if k == "fields" {
            std::borrow::Cow::Owned(canonicalize(v)?)
        } else {
            std::borrow::Cow::Borrowed(v)
        };
        pairs.push((k, v));
    }
    // Stable sort by name: the relative order of repeated parameters is kept, since Graph
    // may read only the first or last of them.
    pairs.sort_by(|a, b| a.0.cmp(b.0));

    let mut readable = String::with_capacity(version.len() + 96);
    readable.push_str(version);
    for s in segments {
        readable.push('/');
        readable.push_str(s);
    }
    if segments.is_empty() {
        readable.push('/');
    }
    let path_len = readable.len() - version.len();
    if !pairs.is_empty() {
        readable.push('?');
        let start = readable.len();
        let mut query = form_urlencoded::Serializer::for_suffix(readable, start);
        for (k, v) in &pairs {
            query.append_pair(k, v);
        }
        readable = query.finish();
    }
    readable.push('#');
    readable.push_str(identity);
    Ok((readable, path_len))
}

/// The id of a key's readable text: the first 128 bits of its SHA-256.
fn id_of(readable: &str) -> KeyId {
    let digest = Sha256::digest(readable.as_bytes());
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest[..16]);
    KeyId(u128::from_be_bytes(first))
}

/// The key of the same read without `fields` (the base that reads for different fields of
/// one node share), or `None` when the read names no fields.
pub fn base_of(
    version: &str,
    segments: &[String],
    params: &Params,
    identity: &str,
) -> Option<KeyId> {
    params.get("fields")?;
    key_text(version, segments, params, identity, true)
        .ok()
        .map(|(readable, _)| id_of(&readable))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(path: &[&str], query: &str) -> CacheKey {
        let segs: Vec<String> = path.iter().map(|s| s.to_string()).collect();
        build("v21.0", &segs, &Params::parse(query).unwrap(), "system").unwrap()
    }

    #[test]
    fn equivalent_fields_share_a_key_and_different_ones_do_not() {
        let a = key(&["1001"], "fields=id,name");
        assert_eq!(a.id, key(&["1001"], "fields=name,id").id);
        assert_eq!(a.id, key(&["1001"], "fields=id,name,id").id);
        assert_ne!(a.id, key(&["1001"], "fields=id").id);
        assert_ne!(a.id, key(&["1002"], "fields=id,name").id);
        assert_eq!(&*a.readable, "v21.0/1001?fields=id%2Cname#system");
    }

    #[test]
    fn tokens_and_noise_are_not_part_of_the_key() {
        let a = key(&["1001", "feed"], "limit=5&fields=message");
        let b = key(
            &["1001", "feed"],
            "access_token=secret-key&fields=message&appsecret_proof=p&callback=cb&_=123&method=GET&limit=5",
        );
        assert_eq!(a.id, b.id);
        assert!(!b.readable.contains("secret-key"));
        assert_eq!(a.node.as_deref(), Some("1001"));
        assert!(a.has_edge);
        assert_eq!(a.rule_path, "/1001/feed");
    }

    #[test]
    fn identity_version_and_values_matter() {
        let segs = vec!["1001".to_string()];
        let p = Params::parse("fields=id").unwrap();
        let sys = build("v21.0", &segs, &p, "system").unwrap();
        assert_ne!(sys.id, build("v21.0", &segs, &p, "page:1001").unwrap().id);
        assert_ne!(sys.id, build("v20.0", &segs, &p, "system").unwrap().id);
        assert_ne!(key(&["1001"], "limit=1").id, key(&["1001"], "limit=2").id);
    }

    #[test]
    fn malformed_fields_are_an_error() {
        let p = Params::parse("fields=a%7Bb").unwrap();
        assert!(build("v21.0", &["1".to_string()], &p, "system").is_err());
    }

    #[test]
    fn the_root_path_is_a_slash() {
        let p = Params::parse("ids=1,2&fields=id").unwrap();
        let k = build("v21.0", &[], &p, "system").unwrap();
        assert_eq!(k.rule_path, "/");
        assert_eq!(&*k.readable, "v21.0/?fields=id&ids=1%2C2#system");
        assert_eq!(k.node, None);
    }

    proptest! {
        /// The base of a read is the key of the same read with every `fields` left out,
        /// whatever the other parameters, their order and the path.
        #[test]
        fn prop_base_is_the_key_without_fields(
            pairs in prop::collection::vec(("(fields|limit|ids|[a-z]{1,4})", "[a-z0-9,]{0,6}"), 0..6),
            segments in prop::collection::vec("[0-9]{1,4}", 0..3),
        ) {
            let mut params = Params::new();
            for (k, v) in &pairs { params.push(k.clone(), v.clone()); }
            let mut rest = params.clone();
            rest.remove("fields");
            let expected = match params.get("fields") {
                Some(_) => build("v21.0", &segments, &rest, "system").ok().map(|k| k.id),
                None => None,
            };
            prop_assert_eq!(base_of("v21.0", &segments, &params, "system"), expected);
        }

        /// Parameter order never changes the key (names distinct, so no repeated-parameter
        /// order is involved).
        #[test]
        fn prop_param_order_does_not_matter(
            params in prop::collection::btree_map("[a-z]{1,6}", "[a-zA-Z0-9 ,]{0,8}", 0..8),
            seed in any::<u64>(),
        ) {
            let mut pairs: Vec<(String, String)> = params.into_iter().filter(|(k, _)| k != "fields").collect();
            let mut a = Params::new();
            for (k, v) in &pairs { a.push(k.clone(), v.clone()); }
            let mut rng = fastrand::Rng::with_seed(seed);
            rng.shuffle(&mut pairs);
            let mut b = Params::new();
            for (k, v) in &pairs { b.push(k.clone(), v.clone()); }
            let segs = vec!["1001".to_string()];
            let ka = build("v21.0", &segs, &a, "system").unwrap();
            let kb = build("v21.0", &segs, &b, "system").unwrap();
            prop_assert_eq!(ka.id, kb.id);
            prop_assert_eq!(ka.readable, kb.readable);
        }
    }
}
