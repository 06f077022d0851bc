//! Client keys and what each client may touch. A client key is worthless outside graphgate:
//! it is looked up by its SHA-256 digest, compared in constant time, and never sent upstream.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::config::{ClientConfig, Priority, Secret};
use crate::error::ProxyError;
use crate::graph::request::{page_of_node, GraphMethod, Params};

/// A known caller of graphgate.
#[derive(Debug)]
pub struct Client {
    pub name: String,
    /// `None` = every Page.
    pages: Option<HashSet<String>>,
    pub write: bool,
    pub priority: Priority,
    key: Secret,
}

impl Client {
    /// The key this client presented; used to put it back into rewritten paging links.
    pub fn key(&self) -> &Secret {
        &self.key
    }

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

#[derive(Debug, Default)]
pub struct ClientRegistry {
    by_digest: HashMap<[u8; 32], Arc<Client>>,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl ClientRegistry {
    pub fn new(clients: &[ClientConfig]) -> ClientRegistry {
        let by_digest = clients
            .iter()
            .map(|c| {
                let client = Client {
                    name: c.name.clone(),
                    pages: c.pages.as_ref().map(|p| p.iter().cloned().collect()),
                    write: c.write,
                    priority: c.priority,
                    key: c.key.clone(),
                };
                (digest(c.key.expose()), Arc::new(client))
            })
            .collect();
        ClientRegistry { by_digest }
    }

    /// Finds the client for a presented key. The map is keyed by digest, so lookup time does
    /// not depend on how much of a guessed key matches a real one.
    pub fn lookup(&self, key: &str) -> Result<Arc<Client>, ProxyError> {
        self.by_digest
            .get(&digest(key))
            .cloned()
            .ok_or(ProxyError::UnknownKey)
    }
}

/// The single key a request presents: from `access_token` in the query or form body, or
/// `Authorization: Bearer|OAuth`. The same key may appear more than once (an SDK adding its
/// token to a paging link that already carries it); different keys are refused.
pub fn presented_key(
    headers: &HeaderMap,
    query: &Params,
    form: &Params,
) -> Result<String, ProxyError> {
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
    for k in query.get_all("access_token") {
        offer(k)?;
    }
    for k in form.get_all("access_token") {
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
                key: Secret::new("key-reader-1"),
                pages: Some(vec!["1001".into()]),
                write: false,
                priority: Priority::Interactive,
            },
            ClientConfig {
                name: "admin".into(),
                key: Secret::new("key-admin-1"),
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
    fn key_sources_and_conflicts() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer k1".parse().unwrap());
        let q = Params::parse("access_token=k1").unwrap();
        assert_eq!(presented_key(&h, &q, &Params::new()).unwrap(), "k1");
        let q2 = Params::parse("access_token=k2").unwrap();
        assert!(presented_key(&h, &q2, &Params::new()).is_err());
        assert!(matches!(
            presented_key(&HeaderMap::new(), &Params::new(), &Params::new()),
            Err(ProxyError::MissingKey)
        ));
        let form = Params::parse("access_token=k3").unwrap();
        assert_eq!(
            presented_key(&HeaderMap::new(), &Params::new(), &form).unwrap(),
            "k3"
        );
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
