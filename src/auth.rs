//! Client keys and what each client may touch. A client key is worthless outside graphgate:
//! it is looked up by its SHA-256 digest and never sent upstream.
//!
//! Timing: the presented key is hashed before anything is compared, so the only comparisons
//! that depend on secret data are between SHA-256 digests. Learning how many leading bytes of
//! `SHA-256(guess)` match a stored digest does not help find a key (that would need a
//! preimage), so the lookup is safe against timing attacks without a constant-time compare.
//! The configuration may hold only the digest (`key_sha256`), so a leaked file leaks no key.
//!
//! The registry is swapped atomically on a configuration reload ([`ClientRegistry::replace`]);
//! a lookup is one atomic load, no lock.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderMap;

use crate::config::{ClientConfig, KeyDigest, Priority};
use crate::error::ProxyError;
use crate::graph::request::{page_of_node, GraphMethod, Params};
pub use crate::tls::PeerCertificate;

/// A known caller of graphgate.
#[derive(Debug)]
pub struct Client {
    pub name: String,
    /// `None` = every Page.
    pages: Option<HashSet<String>>,
    pub write: bool,
    pub priority: Priority,
}

impl Client {
    /// May this client touch `node`? Unrestricted clients may touch anything. Restricted
    /// clients may touch their Pages and `PAGEID_POSTID` objects of them; other nodes (`me`,
    /// objects whose Page cannot be read off the id) are refused, since they could reach
    /// other Pages' data.
    pub fn may_touch(&self, node: &str) -> bool {
        match &self.pages {
            None => true,
            Some(pages) => page_of_node(node).is_some_and(|p| pages.contains(p)),
        }
    }

    pub fn is_unrestricted(&self) -> bool {
        self.pages.is_none()
    }
}

/// The clients of one configuration, by key digest and by certificate subject.
#[derive(Debug, Default)]
struct Clients {
    by_digest: crate::cache::key::FastMap<KeyDigest, Arc<Client>>,
    by_subject: HashMap<String, Arc<Client>>,
    /// Which set this is: every set built gets a new number (see [`ClientRegistry::generation`]).
    generation: u64,
}

/// The number of the next client set built.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

/// Every known client; replaced as a whole on reload.
#[derive(Debug, Default)]
pub struct ClientRegistry {
    current: ArcSwap<Clients>,
}

impl Clients {
    fn new(clients: &[ClientConfig]) -> Clients {
        let mut out = Clients {
            generation: NEXT_GENERATION.fetch_add(1, Ordering::Relaxed),
            ..Clients::default()
        };
        for c in clients {
            let client = Arc::new(Client {
                name: c.name.clone(),
                pages: c.pages.as_ref().map(|p| p.iter().cloned().collect()),
                write: c.write,
                priority: c.priority,
            });
            if let Some(d) = c.key_sha256 {
                out.by_digest.insert(d, client.clone());
            }
            if let Some(subject) = &c.cert_subject {
                out.by_subject.insert(subject.clone(), client);
            }
        }
        out
    }
}

impl ClientRegistry {
    pub fn new(clients: &[ClientConfig]) -> ClientRegistry {
        ClientRegistry {
            current: ArcSwap::from_pointee(Clients::new(clients)),
        }
    }

    /// Swaps in the clients of a new configuration. Requests already past authentication
    /// keep the `Arc<Client>` they hold; later lookups see only the new set.
    pub fn replace(&self, clients: &[ClientConfig]) {
        self.current.store(Arc::new(Clients::new(clients)));
    }

    /// The number of the current client set: it changes whenever a reload swaps the set,
    /// so whatever was worked out from the clients (`crate::stack::recall`) knows it is stale.
    pub fn generation(&self) -> u64 {
        self.current.load().generation
    }

    /// Finds the client for a presented key (by its digest; see the module docs on timing).
    pub fn lookup(&self, key: &str) -> Result<Arc<Client>, ProxyError> {
        self.current
            .load()
            .by_digest
            .get(&KeyDigest::of(key))
            .cloned()
            .ok_or(ProxyError::UnknownKey)
    }

    /// Finds the client a verified TLS client certificate names (subject CN or a DNS SAN).
    pub fn lookup_subject<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Option<Arc<Client>> {
        let current = self.current.load();
        names
            .into_iter()
            .find_map(|n| current.by_subject.get(n).cloned())
    }

    /// Authenticates a request: by the key it presents, else by the verified client
    /// certificate of its connection ([`PeerCertificate`] in the request extensions). Returns
    /// the client and the key to put into rewritten paging links (empty for a certificate).
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        extensions: &http::Extensions,
        tokens: &Params,
    ) -> Result<(Arc<Client>, String), ProxyError> {
        match presented_key(headers, tokens) {
            Ok(key) => Ok((self.lookup(&key)?, key)),
            Err(ProxyError::MissingKey) => {
                let peer = extensions
                    .get::<PeerCertificate>()
                    .ok_or(ProxyError::MissingKey)?;
                let client = self
                    .lookup_subject(peer.names.iter().map(String::as_str))
                    .ok_or(ProxyError::UnknownKey)?;
                Ok((client, String::new()))
            }
            Err(e) => Err(e),
        }
    }
}

/// The single key a request presents: from `access_token` parameters (query or form body,
/// in `tokens`), or `Authorization: Bearer|OAuth`. The same key may appear more than once (an
/// SDK adding its token to a paging link that already carries it); different keys are refused.
pub fn presented_key(headers: &HeaderMap, tokens: &Params) -> Result<String, ProxyError> {
    let mut found: Option<String> = None;
    let mut offer = |k: &str| -> Result<(), ProxyError> {
        let k = k.trim();
        if k.is_empty() {
            return Ok(());
        }
        match &found {
            Some(prev) if prev != k => Err(ProxyError::BadRequest(
                "The request carries two different access tokens.".into(),
            )),
            Some(_) => Ok(()),
            None => {
                found = Some(k.to_string());
                Ok(())
            }
        }
    };
    for v in headers.get_all(http::header::AUTHORIZATION) {
        let v = v
            .to_str()
            .map_err(|_| ProxyError::BadRequest("Authorization header is not ASCII.".into()))?;
        let (scheme, token) = v.split_once(' ').unwrap_or((v, ""));
        if scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("oauth") {
            offer(token)?;
        }
    }
    for k in tokens.get_all("access_token") {
        offer(k)?;
    }
    found.ok_or(ProxyError::MissingKey)
}

/// Checks one Graph call (path node, `ids=`, method) against the client's permissions.
pub fn authorize(
    client: &Client,
    method: GraphMethod,
    node: Option<&str>,
    ids: &[String],
) -> Result<(), ProxyError> {
    if method.is_write() && !client.write {
        let what = match method {
            GraphMethod::Delete => "delete objects",
            _ => "write (POST)",
        };
        return Err(ProxyError::ForbiddenWrite(what.into()));
    }
    if client.is_unrestricted() {
        return Ok(());
    }
    if let Some(node) = node {
        if !client.may_touch(node) {
            return Err(ProxyError::ForbiddenPage(node.to_string()));
        }
    }
    for id in ids {
        if !client.may_touch(id) {
            return Err(ProxyError::ForbiddenPage(id.clone()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> ClientRegistry {
        ClientRegistry::new(&[
            ClientConfig {
                name: "reader".into(),
                key_sha256: Some(KeyDigest::of("key-reader-1")),
                cert_subject: None,
                pages: Some(vec!["1001".into()]),
                write: false,
                priority: Priority::Interactive,
            },
            ClientConfig {
                name: "admin".into(),
                key_sha256: Some(KeyDigest::of("key-admin-1")),
                cert_subject: Some("admin.example".into()),
                pages: None,
                write: true,
                priority: Priority::Batch,
            },
        ])
    }

    #[test]
    fn lookup_by_key() {
        let r = registry();
        assert_eq!(r.lookup("key-reader-1").unwrap().name, "reader");
        assert!(matches!(r.lookup("nope"), Err(ProxyError::UnknownKey)));
    }

    #[test]
    fn replace_swaps_the_whole_set() {
        let r = registry();
        r.replace(&[ClientConfig {
            name: "new".into(),
            key_sha256: Some(KeyDigest::of("key-new-00")),
            cert_subject: None,
            pages: None,
            write: false,
            priority: Priority::Interactive,
        }]);
        assert!(r.lookup("key-reader-1").is_err());
        assert_eq!(r.lookup("key-new-00").unwrap().name, "new");
        assert!(r.lookup_subject(["admin.example"]).is_none());
    }

    #[test]
    fn certificate_subjects_authenticate_without_a_key() {
        let r = registry();
        let mut ext = http::Extensions::new();
        let none = Params::new();
        assert!(matches!(
            r.authenticate(&HeaderMap::new(), &ext, &none),
            Err(ProxyError::MissingKey)
        ));
        ext.insert(PeerCertificate {
            names: vec!["other".into(), "admin.example".into()],
        });
        let (c, key) = r.authenticate(&HeaderMap::new(), &ext, &none).unwrap();
        assert_eq!((c.name.as_str(), key.as_str()), ("admin", ""));
        // A presented key wins over the certificate.
        let q = Params::parse("access_token=key-reader-1").unwrap();
        let (c, _) = r.authenticate(&HeaderMap::new(), &ext, &q).unwrap();
        assert_eq!(c.name, "reader");
        ext.insert(PeerCertificate {
            names: vec!["nobody".into()],
        });
        assert!(matches!(
            r.authenticate(&HeaderMap::new(), &ext, &none),
            Err(ProxyError::UnknownKey)
        ));
    }

    #[test]
    fn key_sources_and_conflicts() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer k1".parse().unwrap());
        let q = Params::parse("access_token=k1").unwrap();
        assert_eq!(presented_key(&h, &q).unwrap(), "k1");
        let q2 = Params::parse("access_token=k2").unwrap();
        assert!(presented_key(&h, &q2).is_err());
        assert!(matches!(
            presented_key(&HeaderMap::new(), &Params::new()),
            Err(ProxyError::MissingKey)
        ));
        let both = Params::parse("access_token=k3&access_token=k3").unwrap();
        assert_eq!(presented_key(&HeaderMap::new(), &both).unwrap(), "k3");
    }

    #[test]
    fn permissions() {
        let r = registry();
        let reader = r.lookup("key-reader-1").unwrap();
        assert!(authorize(&reader, GraphMethod::Get, Some("1001"), &[]).is_ok());
        assert!(authorize(&reader, GraphMethod::Get, Some("1001_5"), &[]).is_ok());
        assert!(authorize(&reader, GraphMethod::Get, Some("1002"), &[]).is_err());
        assert!(authorize(&reader, GraphMethod::Get, Some("me"), &[]).is_err());
        assert!(authorize(
            &reader,
            GraphMethod::Get,
            None,
            &["1001".into(), "1002".into()]
        )
        .is_err());
        assert!(matches!(
            authorize(&reader, GraphMethod::Post, Some("1001"), &[]),
            Err(ProxyError::ForbiddenWrite(_))
        ));
        let admin = r.lookup("key-admin-1").unwrap();
        assert!(authorize(&admin, GraphMethod::Delete, Some("me"), &[]).is_ok());
    }
}
