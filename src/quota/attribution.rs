//! Which budget a call is charged to, and how many units.
//!
//! Each Graph call unit (the node of a plain call, each id of `ids=`, each operation of a
//! batch, each id of an operation's `ids=`) is charged to one bucket, in this order:
//! 1. the `X-Graphgate-Page` header, when the client may touch that Page;
//! 2. the Page the node id names (`1001`, or `1001_55` for a post of Page 1001);
//! 3. the Page that `X-Business-Use-Case-Usage` reported for that node earlier;
//! 4. the app-level bucket.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;

use crate::graph::call::Call;
use crate::graph::request::{page_of_node, parse_ids};

/// A budget: one Page's BUC quota or the app's platform quota.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BucketKey {
    Page(String),
    App,
}

impl BucketKey {
    /// Name used in the RateLimit headers and in status output.
    pub fn policy_name(&self) -> &'static str {
        match self {
            BucketKey::Page(_) => "page",
            BucketKey::App => "app",
        }
    }
}

impl fmt::Display for BucketKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BucketKey::Page(p) => f.write_str(p),
            BucketKey::App => f.write_str("app"),
        }
    }
}

/// Units per bucket for one call, in key order (so multi-bucket admission always takes
/// buckets in the same order and cannot deadlock).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Charge(pub BTreeMap<BucketKey, u32>);

impl Charge {
    pub fn units(&self) -> u32 {
        self.0.values().sum()
    }

    pub fn single(&self) -> Option<&BucketKey> {
        match self.0.len() {
            1 => self.0.keys().next(),
            _ => None,
        }
    }
}

/// The node of every call unit in `call` (`None` for the root path).
pub fn call_units(call: &Call) -> Vec<Option<String>> {
    if let Some(ops) = &call.batch {
        let mut out = Vec::with_capacity(ops.len());
        for op in ops {
            match parse_ids(&op.all_params()) {
                Ok(ids) if !ids.is_empty() => out.extend(ids.into_iter().map(Some)),
                _ => out.push(op.path.node().map(str::to_string)),
            }
        }
        return out;
    }
    if !call.ids.is_empty() {
        return call.ids.iter().cloned().map(Some).collect();
    }
    vec![call.path.node().map(str::to_string)]
}

/// Charges every unit: `page_header` is the already-authorized `X-Graphgate-Page`.
pub fn charge(units: &[Option<String>], page_header: Option<&str>, learned: &NodePages) -> Charge {
    let mut out = BTreeMap::new();
    for node in units {
        let key = match (page_header, node.as_deref()) {
            (Some(p), _) => BucketKey::Page(p.to_string()),
            (None, Some(n)) => match page_of_node(n) {
                Some(p) => BucketKey::Page(p.to_string()),
                None => learned
                    .get(n)
                    .map_or(BucketKey::App, |p| BucketKey::Page(p.to_string())),
            },
            (None, None) => BucketKey::App,
        };
        *out.entry(key).or_insert(0) += 1;
    }
    Charge(out)
}

/// A bounded memory of node → Page learned from usage headers (e.g. a Page's username).
/// Oldest entries are forgotten first.
#[derive(Debug)]
pub struct NodePages {
    map: HashMap<String, String>,
    order: VecDeque<String>,
    cap: usize,
}

impl NodePages {
    pub fn new(cap: usize) -> NodePages {
        NodePages {
            map: HashMap::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    pub fn get(&self, node: &str) -> Option<&str> {
        self.map.get(node).map(String::as_str)
    }

    /// Remembers that `node` is charged to `page`. Only nodes whose Page cannot be read off
    /// the id are worth remembering; `me` depends on the token, so it is never learned.
    pub fn learn(&mut self, node: &str, page: &str) {
        if page_of_node(node).is_some() || node == "me" || page_of_node(page) != Some(page) {
            return;
        }
        if let Some(old) = self.map.get_mut(node) {
            *old = page.to_string();
            return;
        }
        while self.map.len() >= self.cap {
            match self.order.pop_front() {
                Some(oldest) => {
                    self.map.remove(&oldest);
                }
                None => break,
            }
        }
        self.map.insert(node.to_string(), page.to_string());
        self.order.push_back(node.to_string());
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::call::parse_call;
    use bytes::Bytes;
    use http::{HeaderMap, Method};

    fn call(method: Method, uri: &str, body: &str) -> Call {
        let mut h = HeaderMap::new();
        if !body.is_empty() {
            h.insert(
                "content-type",
                "application/x-www-form-urlencoded".parse().unwrap(),
            );
        }
        parse_call(
            &method,
            &uri.parse().unwrap(),
            &h,
            Bytes::from(body.to_string()),
        )
        .unwrap()
    }

    fn keys(c: &Charge) -> Vec<(String, u32)> {
        c.0.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn path_node_post_id_and_app() {
        let learned = NodePages::new(10);
        let c = call(Method::GET, "/v21.0/1001/feed", "");
        assert_eq!(
            keys(&charge(&call_units(&c), None, &learned)),
            [("1001".into(), 1)]
        );
        let c = call(Method::GET, "/1002_7?fields=id", "");
        assert_eq!(
            keys(&charge(&call_units(&c), None, &learned)),
            [("1002".into(), 1)]
        );
        let c = call(Method::GET, "/me/accounts", "");
        assert_eq!(
            keys(&charge(&call_units(&c), None, &learned)),
            [("app".into(), 1)]
        );
    }

    #[test]
    fn header_wins_then_learned_mapping() {
        let mut learned = NodePages::new(10);
        let c = call(Method::GET, "/acmecoffee", "");
        let units = call_units(&c);
        assert_eq!(keys(&charge(&units, None, &learned)), [("app".into(), 1)]);
        learned.learn("acmecoffee", "1001");
        assert_eq!(keys(&charge(&units, None, &learned)), [("1001".into(), 1)]);
        assert_eq!(
            keys(&charge(&units, Some("1002"), &learned)),
            [("1002".into(), 1)]
        );
    }

    #[test]
    fn ids_and_batch_charge_one_unit_each() {
        let learned = NodePages::new(10);
        let c = call(Method::GET, "/?ids=1001,1001_3,1002", "");
        assert_eq!(
            keys(&charge(&call_units(&c), None, &learned)),
            [("1001".into(), 2), ("1002".into(), 1)]
        );
        let batch = r#"[{"method":"GET","relative_url":"1001?fields=id"},{"method":"GET","relative_url":"?ids=1002,1002_1"},{"method":"GET","relative_url":"me"}]"#;
        let form = format!("batch={}", urlencode(batch));
        let c = call(Method::POST, "/", &form);
        assert_eq!(
            keys(&charge(&call_units(&c), None, &learned)),
            [("1001".into(), 1), ("1002".into(), 2), ("app".into(), 1)]
        );
    }

    fn urlencode(s: &str) -> String {
        form_urlencoded::byte_serialize(s.as_bytes()).collect()
    }

    #[test]
    fn learned_map_is_bounded_and_skips_ids_it_can_read() {
        let mut m = NodePages::new(2);
        m.learn("1001", "1001");
        m.learn("me", "1001");
        m.learn("a", "not-a-page");
        assert!(m.is_empty());
        m.learn("a", "1");
        m.learn("b", "2");
        m.learn("c", "3");
        assert_eq!(m.len(), 2);
        assert_eq!(m.get("a"), None);
        assert_eq!(m.get("c"), Some("3"));
    }
}
