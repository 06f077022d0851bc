//! What a client asked for, parsed strictly enough to authorize, cache and attribute it:
//! the path (version, node, edges), ordered parameters, the effective method and batch
//! operations. Bad input becomes [`ProxyError::BadRequest`] with a message that says what.

use percent_encoding::percent_decode_str;
use serde_json::Value;

use crate::config::is_version;
use crate::error::ProxyError;

/// Longest id/edge segment accepted; Graph ids are far shorter.
const MAX_SEGMENT_LEN: usize = 256;
/// Graph's own limit for `ids=` and batch operations.
pub const MAX_IDS: usize = 50;
pub const MAX_BATCH_OPS: usize = 50;

/// Query or form parameters in their original order (duplicates kept).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params(Vec<(String, String)>);

impl Params {
    pub fn new() -> Self {
        Params(Vec::new())
    }

    /// Parses `a=1&b=2` strictly: percent-escapes must decode to UTF-8 and every name must
    /// pass [`check_name`]. Duplicates are kept; see [`Params::collapse_duplicates`].
    pub fn parse(s: &str) -> Result<Params, ProxyError> {
        let mut out = Vec::new();
        for pair in s.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let k = decode_component(k)?;
            check_name(&k)?;
            out.push((k, decode_component(v)?));
        }
        Ok(Params(out))
    }

    /// One value per name, so that what graphgate checks is what Graph reads whichever copy
    /// it takes: identical copies collapse to the first, copies that differ are refused. Names
    /// are compared ignoring ASCII case (Graph's handling of case is undocumented).
    /// `access_token` is left alone: the client key may legitimately appear twice, and
    /// [`crate::auth::presented_key`] refuses two different ones.
    pub fn collapse_duplicates(&mut self) -> Result<(), ProxyError> {
        // Nearly every request names each parameter once: then there is nothing to do.
        let repeated = if self.0.len() <= 16 {
            self.0.iter().enumerate().any(|(i, (k, _))| {
                k != "access_token" && self.0[..i].iter().any(|(n, _)| n.eq_ignore_ascii_case(k))
            })
        } else {
            true
        };
        if !repeated {
            return Ok(());
        }
        let conflict = |name: &str| {
            ProxyError::BadRequest(format!(
                "Parameter `{}` is given more than once with different values.",
                truncate(name, 64)
            ))
        };
        let mut kept: Vec<(String, String)> = Vec::with_capacity(self.0.len());
        // Small lists (nearly all requests) are checked pairwise; long ones through a map, so
        // a body of many parameters costs linear time.
        let mut seen: Option<std::collections::HashMap<String, usize>> =
            (self.0.len() > 16).then(std::collections::HashMap::new);
        for (k, v) in std::mem::take(&mut self.0) {
            if k == "access_token" {
                kept.push((k, v));
                continue;
            }
            let earlier = match &mut seen {
                Some(map) => map.get(&k.to_ascii_lowercase()).copied(),
                None => kept
                    .iter()
                    .position(|(n, _)| n != "access_token" && n.eq_ignore_ascii_case(&k)),
            };
            match earlier {
                Some(i) if kept[i].1 == v && kept[i].0 == k => {}
                Some(_) => return Err(conflict(&k)),
                None => {
                    if let Some(map) = &mut seen {
                        map.insert(k.to_ascii_lowercase(), kept.len());
                    }
                    kept.push((k, v));
                }
            }
        }
        self.0 = kept;
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.iter().any(|(k, _)| k == name)
    }

    /// Removes every occurrence of `name`.
    pub fn remove(&mut self, name: &str) {
        self.0.retain(|(k, _)| k != name);
    }

    /// Moves every occurrence of `name` out, in order.
    pub fn take(&mut self, name: &str) -> Params {
        let (taken, kept) = std::mem::take(&mut self.0)
            .into_iter()
            .partition(|(k, _)| k == name);
        self.0 = kept;
        Params(taken)
    }

    /// Sets `name` to one value, replacing any others.
    pub fn set(&mut self, name: &str, value: impl Into<String>) {
        self.remove(name);
        self.0.push((name.to_string(), value.into()));
    }

    /// A copy with room for `extra` more parameters, so adding them does not move the rest
    /// (the upstream form of a call gains its token and proof).
    pub fn cloned_with_room(&self, extra: usize) -> Params {
        let mut out = Vec::with_capacity(self.0.len() + extra);
        out.extend(self.0.iter().cloned());
        Params(out)
    }

    pub fn push(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0.push((name.into(), value.into()));
    }

    pub fn extend(&mut self, other: Params) {
        self.0.extend(other.0);
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// `application/x-www-form-urlencoded` text, as `form_urlencoded::Serializer` writes it.
    pub fn encode(&self) -> String {
        let len = self.0.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
        let mut out = String::with_capacity(len);
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                out.push('&');
            }
            encode_component(&mut out, k);
            out.push('=');
            encode_component(&mut out, v);
        }
        out
    }

    /// Url-encoded text for a batch operation's URL or body: like [`Params::encode`], but
    /// JSONPath references (`{result=name:$.id}`) stay readable, since Graph resolves them in
    /// the text before decoding it. [`Params::parse`] reads both encodings the same.
    pub fn encode_batch(&self) -> String {
        let mut out = String::new();
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                out.push('&');
            }
            out.extend(percent_encoding::utf8_percent_encode(k, BATCH_ENCODE));
            out.push('=');
            out.extend(percent_encoding::utf8_percent_encode(v, BATCH_ENCODE));
        }
        out
    }
}

/// Appends `s` form-urlencoded. Tokens, proofs and ids need no escaping and are copied as
/// they are (one check a byte, where the serializer's iterator costs several).
fn encode_component(out: &mut String, s: &str) {
    let unreserved = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'*' | b'-' | b'.' | b'_');
    if s.bytes().all(unreserved) {
        out.push_str(s);
    } else {
        out.extend(form_urlencoded::byte_serialize(s.as_bytes()));
    }
}

/// Parameter names graphgate reads itself. A spelling of one of them in another case is
/// refused: Graph might fold it to the name graphgate checked under a different value.
pub const CONTROL_PARAMS: &[&str] = &[
    "access_token",
    "appsecret_proof",
    "batch",
    "fields",
    "id",
    "ids",
    "include_headers",
    "method",
];

/// Longest parameter name accepted.
const MAX_NAME_LEN: usize = 128;

/// A parameter name must be ASCII letters, digits, `_` and `-`. Anything else is refused
/// rather than interpreted: PHP-style servers fold `.`, space and `[` in names into `_` or
/// arrays (`access.token`, `ids[]`), so a name graphgate sees as harmless could reach Graph
/// as one it checks.
pub fn check_name(name: &str) -> Result<(), ProxyError> {
    if name.is_empty() {
        return Err(ProxyError::BadRequest("Empty parameter name.".into()));
    }
    if name.len() > MAX_NAME_LEN
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(ProxyError::BadRequest(format!(
            "`{}` is not a valid parameter name: use letters, digits, `_` and `-`.",
            truncate(name, 64)
        )));
    }
    if let Some(control) = CONTROL_PARAMS
        .iter()
        .find(|c| c.eq_ignore_ascii_case(name) && **c != name)
    {
        return Err(ProxyError::BadRequest(format!(
            "Parameter `{}` must be spelled `{control}`.",
            truncate(name, 64)
        )));
    }
    Ok(())
}

/// What [`Params::encode_batch`] escapes: controls, space and the bytes that delimit or
/// escape url-encoded text (non-ASCII is always escaped).
const BATCH_ENCODE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'&')
    .add(b'+')
    .add(b'\\')
    .add(b'?');

/// One form-urlencoded name or value, decoded. Components without `+` or `%` (most of them:
/// `fields=id,name`, keys, ids) are copied once instead of going through both decoders.
fn decode_component(s: &str) -> Result<String, ProxyError> {
    if !s.bytes().any(|b| b == b'+' || b == b'%') {
        return Ok(s.to_string());
    }
    let plus_decoded = s.replace('+', " ");
    percent_decode_str(&plus_decoded)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| {
            ProxyError::BadRequest("Query parameters must be valid percent-encoded UTF-8.".into())
        })
}

/// `/v21.0/1001/feed` → version `v21.0`, segments `["1001", "feed"]`. Root `/` has no segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphPath {
    pub version: Option<String>,
    pub segments: Vec<String>,
}

impl GraphPath {
    pub fn parse(path: &str) -> Result<GraphPath, ProxyError> {
        let bad = |why: &str| ProxyError::BadRequest(format!("Malformed path: {why}."));
        let Some(rest) = path.strip_prefix('/') else {
            return Err(bad("it must start with /"));
        };
        let decoded = percent_decode_str(rest)
            .decode_utf8()
            .map_err(|_| bad("it is not valid UTF-8"))?;
        let trimmed = decoded.strip_suffix('/').unwrap_or(&decoded);
        let mut segments: Vec<String> = Vec::new();
        let mut version = None;
        if !trimmed.is_empty() {
            for (i, seg) in trimmed.split('/').enumerate() {
                if seg.is_empty() {
                    return Err(bad("empty path segment"));
                }
                if i == 0 && is_version(seg) {
                    version = Some(seg.to_string());
                    continue;
                }
                if seg.len() > MAX_SEGMENT_LEN {
                    return Err(bad("path segment too long"));
                }
                if seg == "." || seg == ".." || !seg.bytes().all(is_segment_byte) {
                    return Err(ProxyError::BadRequest(format!(
                        "Malformed path: `{}` is not a Graph node id or edge.",
                        truncate(seg, 64)
                    )));
                }
                segments.push(seg.to_string());
            }
        }
        if segments.len() > 4 {
            return Err(bad("too many path segments"));
        }
        Ok(GraphPath { version, segments })
    }

    /// The node the call addresses (`1001`, `me`, `1001_7`), `None` at the root.
    pub fn node(&self) -> Option<&str> {
        self.segments.first().map(String::as_str)
    }

    /// The edge after the node (`feed`), if any.
    pub fn edge(&self) -> Option<&str> {
        self.segments.get(1).map(String::as_str)
    }

    /// Path as sent upstream, with an explicit version when the client gave one.
    pub fn to_upstream_path(&self) -> String {
        let mut p = String::with_capacity(32);
        if let Some(v) = &self.version {
            p.push('/');
            p.push_str(v);
        }
        for s in &self.segments {
            p.push('/');
            p.push_str(s);
        }
        if p.is_empty() {
            p.push('/');
        }
        p
    }
}

fn is_segment_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@')
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The Page a node belongs to when that can be read off the id itself: a numeric id may be a
/// Page; `PAGEID_POSTID` belongs to `PAGEID`. Anything else (`me`, `act_1`) is unknown here.
pub fn page_of_node(node: &str) -> Option<&str> {
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if all_digits(node) {
        return Some(node);
    }
    match node.split_once('_') {
        Some((page, post)) if all_digits(page) && all_digits(post) => Some(page),
        _ => None,
    }
}

/// GET, POST or DELETE after applying Graph's `method=` override.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphMethod {
    Get,
    Post,
    Delete,
}

impl GraphMethod {
    pub fn from_http(m: &http::Method) -> Result<GraphMethod, ProxyError> {
        match *m {
            http::Method::GET | http::Method::HEAD => Ok(GraphMethod::Get),
            http::Method::POST => Ok(GraphMethod::Post),
            http::Method::DELETE => Ok(GraphMethod::Delete),
            ref other => Err(ProxyError::MethodNotAllowed(other.to_string())),
        }
    }

    fn from_param(s: &str) -> Result<GraphMethod, ProxyError> {
        match s.to_ascii_uppercase().as_str() {
            "GET" => Ok(GraphMethod::Get),
            "POST" => Ok(GraphMethod::Post),
            "DELETE" => Ok(GraphMethod::Delete),
            _ => Err(ProxyError::BadRequest(format!(
                "Unsupported method override `{}`.",
                truncate(s, 16)
            ))),
        }
    }

    pub fn is_write(self) -> bool {
        !matches!(self, GraphMethod::Get)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            GraphMethod::Get => "GET",
            GraphMethod::Post => "POST",
            GraphMethod::Delete => "DELETE",
        }
    }
}

/// The method Graph will execute: the `method=` parameter wins over the HTTP method.
pub fn effective_method(http: GraphMethod, params: &Params) -> Result<GraphMethod, ProxyError> {
    match params.get("method") {
        Some(m) => GraphMethod::from_param(m),
        None => Ok(http),
    }
}

/// The ids of an `ids=a,b,c` read, in request order. [`canonical_ids`] gives the text that
/// goes upstream, so Graph reads exactly the ids checked here.
pub fn parse_ids(params: &Params) -> Result<Vec<String>, ProxyError> {
    let Some(raw) = params.get("ids") else {
        return Ok(Vec::new());
    };
    let ids: Vec<String> = raw
        .split(',')
        .map(|s| s.trim_matches(|c: char| c.is_ascii_whitespace()))
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if ids.is_empty() {
        return Err(ProxyError::BadRequest("`ids` names no id.".into()));
    }
    if ids.len() > MAX_IDS {
        return Err(ProxyError::BadRequest(format!(
            "Too many ids: at most {MAX_IDS}."
        )));
    }
    for id in &ids {
        if id.len() > MAX_SEGMENT_LEN || !id.bytes().all(is_segment_byte) {
            return Err(ProxyError::BadRequest(format!(
                "`{}` is not a valid id in ids=.",
                truncate(id, 64)
            )));
        }
    }
    Ok(ids)
}

/// `ids` as sent upstream: the checked ids joined by commas, nothing else.
pub fn canonical_ids(ids: &[String]) -> String {
    ids.join(",")
}

/// The keys a batch operation may have. Anything else is refused: graphgate cannot check
/// what it does not know Graph to read.
const BATCH_OP_KEYS: &[&str] = &[
    "method",
    "relative_url",
    "body",
    "name",
    "depends_on",
    "omit_response_on_success",
    "attached_files",
];

/// One operation of a batch request, with its relative URL split into path and parameters.
/// [`BatchOp::to_upstream`] builds what goes to Graph from these parsed parts only.
#[derive(Debug, Clone)]
pub struct BatchOp {
    /// What the operation does: a write if any spelling of its method (the operation's
    /// `method`, a `method=` in its URL or body) is one.
    pub method: GraphMethod,
    pub path: GraphPath,
    /// Parameters of the relative URL, without `access_token`.
    pub query: Params,
    /// Parameters of the url-encoded body, without `access_token`.
    pub body: Params,
    /// The operation's own key, from its URL or body.
    own_token: Option<String>,
    /// Whether that key stood in the body (else the URL).
    own_token_in_body: bool,
    /// The other keys (`name`, `depends_on`, ...), passed on as given.
    pub extra: serde_json::Map<String, Value>,
}

impl BatchOp {
    /// The operation's own token, from its relative_url or body, if it carries one.
    pub fn own_token(&self) -> Option<&str> {
        self.own_token.as_deref()
    }

    /// Parameters of the op merged (query then body), for reading `ids`, `fields`, `method`.
    pub fn all_params(&self) -> Params {
        let mut p = self.query.clone();
        p.extend(self.body.clone());
        p
    }

    /// The operation as sent to Graph: its method, and a relative URL and body rebuilt from
    /// the checked parameters, with `token` (the injected token and proof) put where the
    /// operation carried its own key.
    pub fn to_upstream(&self, token: Option<&Params>) -> Value {
        let mut query = self.query.clone();
        let mut body = self.body.clone();
        if let Some(t) = token {
            // The key stood in the body or the URL: the token goes where it was.
            let target = if self.own_token_in_body {
                &mut body
            } else {
                &mut query
            };
            target.extend(t.clone());
        }
        let path = self.path.to_upstream_path();
        let path = path.trim_start_matches('/');
        let relative_url = if query.is_empty() {
            path.to_string()
        } else {
            format!("{path}?{}", query.encode_batch())
        };
        let mut op = serde_json::Map::with_capacity(self.extra.len() + 3);
        op.insert("method".into(), self.method.as_str().into());
        op.insert("relative_url".into(), relative_url.into());
        if !body.is_empty() {
            op.insert("body".into(), body.encode_batch().into());
        }
        for (k, v) in &self.extra {
            op.insert(k.clone(), v.clone());
        }
        Value::Object(op)
    }
}

/// Parses the `batch` form field. Duplicate keys (at any depth), unknown operation keys,
/// parameters given twice with different values, and a second, different key are refused.
pub fn parse_batch(json: &str) -> Result<Vec<BatchOp>, ProxyError> {
    let bad = |why: String| ProxyError::BadRequest(format!("Invalid batch: {why}"));
    let value = super::strict_json::parse(json.as_bytes()).map_err(bad)?;
    let Value::Array(items) = value else {
        return Err(bad("must be a JSON array".into()));
    };
    if items.is_empty() || items.len() > MAX_BATCH_OPS {
        return Err(bad(format!("must have 1 to {MAX_BATCH_OPS} operations")));
    }
    let mut ops = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let Value::Object(mut raw) = item else {
            return Err(bad(format!("operation {i} is not an object")));
        };
        if let Some(k) = raw.keys().find(|k| !BATCH_OP_KEYS.contains(&k.as_str())) {
            return Err(bad(format!(
                "operation {i} has a key graphgate does not pass on: `{}`",
                truncate(k, 64)
            )));
        }
        let op_method = match raw.remove("method") {
            None => None,
            Some(Value::String(m)) => Some(GraphMethod::from_param(&m)?),
            Some(_) => return Err(bad(format!("operation {i}: method must be a string"))),
        };
        let Some(Value::String(rel)) = raw.remove("relative_url") else {
            return Err(bad(format!("operation {i} has no relative_url")));
        };
        let rel = if rel.starts_with('/') {
            rel
        } else {
            format!("/{rel}")
        };
        if rel.contains('#') {
            return Err(bad(format!("operation {i}: relative_url has a fragment")));
        }
        let (path, query) = rel.split_once('?').unwrap_or((rel.as_str(), ""));
        let path = GraphPath::parse(path)?;
        let mut query = Params::parse(query)?;
        let mut body = match raw.remove("body") {
            None => Params::new(),
            Some(Value::String(b)) => Params::parse(&b)?,
            Some(_) => {
                return Err(bad(format!(
                    "operation {i}: body must be a url-encoded string"
                )))
            }
        };
        // Query and body together, as Graph merges them: one value per name.
        let mut merged = query.clone();
        merged.extend(body.clone());
        merged.collapse_duplicates()?;
        let key_query = query.take("access_token");
        let key_body = body.take("access_token");
        let own_token_in_body = !key_body.is_empty();
        let mut keys = key_query;
        keys.extend(key_body);
        let own_token = single_key(&keys)?;
        // Identical copies across query and body collapse into the query.
        dedup_across(&mut query, &mut body);
        let param_method = match merged.get("method") {
            Some(m) => Some(GraphMethod::from_param(m)?),
            None => None,
        };
        let method = strongest([op_method, param_method]);
        ops.push(BatchOp {
            method,
            path,
            query,
            body,
            own_token,
            own_token_in_body,
            extra: raw,
        });
    }
    Ok(ops)
}

/// The method an operation runs under the most permissive reading: DELETE if any spelling
/// says so, else POST if any does, else GET.
fn strongest(spellings: [Option<GraphMethod>; 2]) -> GraphMethod {
    let spelled = spellings.iter().flatten();
    if spelled.clone().any(|m| *m == GraphMethod::Delete) {
        GraphMethod::Delete
    } else if spelled.clone().any(|m| *m == GraphMethod::Post) {
        GraphMethod::Post
    } else {
        GraphMethod::Get
    }
}

/// The one key among `access_token` values (identical copies allowed).
fn single_key(keys: &Params) -> Result<Option<String>, ProxyError> {
    let mut found: Option<&str> = None;
    for k in keys.get_all("access_token") {
        match found {
            Some(prev) if prev != k => {
                return Err(ProxyError::BadRequest(
                    "A batch operation carries two different access tokens.".into(),
                ))
            }
            _ => found = Some(k),
        }
    }
    Ok(found.filter(|k| !k.trim().is_empty()).map(str::to_string))
}

/// Drops from `body` the parameters `query` already has with the same value, and collapses
/// identical copies within each (differing copies were refused before).
fn dedup_across(query: &mut Params, body: &mut Params) {
    let mut seen = std::collections::HashSet::new();
    query.0.retain(|(k, _)| seen.insert(k.clone()));
    body.0.retain(|(k, _)| seen.insert(k.clone()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The shortcut for text without escapes writes what the serializer writes.
        #[test]
        fn prop_encode_matches_the_serializer(
            pairs in proptest::collection::vec(("[ -~]{0,12}|\\PC{0,6}", "[A-Za-z0-9._*-]{0,40}|[ -~]{0,20}|\\PC{0,8}"), 0..6)
        ) {
            let params = Params(pairs.clone());
            let mut ser = form_urlencoded::Serializer::new(String::new());
            for (k, v) in &pairs {
                ser.append_pair(k, v);
            }
            prop_assert_eq!(params.encode(), ser.finish());
        }
    }

    #[test]
    fn params_roundtrip_and_strictness() {
        let p = Params::parse("fields=id%2Cname&limit=5&x=a+b").unwrap();
        assert_eq!(p.get("fields"), Some("id,name"));
        assert_eq!(p.get("x"), Some("a b"));
        assert_eq!(Params::parse(&p.encode()).unwrap(), p);
        assert!(Params::parse("a=%FF%FE").is_err());
        assert!(Params::parse("=x").is_err());
    }

    #[test]
    fn take_moves_every_occurrence_out_in_order() {
        let mut p = Params::parse("access_token=a&fields=id&access_token=b&limit=2").unwrap();
        let taken = p.take("access_token");
        assert_eq!(
            taken.get_all("access_token").collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(p, Params::parse("fields=id&limit=2").unwrap());
        assert!(p.take("access_token").is_empty());
    }

    #[test]
    fn paths() {
        let p = GraphPath::parse("/v21.0/1001/feed").unwrap();
        assert_eq!(p.version.as_deref(), Some("v21.0"));
        assert_eq!(p.node(), Some("1001"));
        assert_eq!(p.edge(), Some("feed"));
        assert_eq!(p.to_upstream_path(), "/v21.0/1001/feed");
        assert_eq!(GraphPath::parse("/").unwrap().segments.len(), 0);
        assert_eq!(
            GraphPath::parse("/v21.0/").unwrap().to_upstream_path(),
            "/v21.0"
        );
        for bad in [
            "/1001//feed",
            "/../etc",
            "/1001/<script>",
            "feed",
            "/a/b/c/d/e",
        ] {
            assert!(GraphPath::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pages_from_ids() {
        assert_eq!(page_of_node("1001"), Some("1001"));
        assert_eq!(page_of_node("1001_55"), Some("1001"));
        assert_eq!(page_of_node("me"), None);
        assert_eq!(page_of_node("act_123"), None);
    }

    #[test]
    fn method_override() {
        let p = Params::parse("method=delete").unwrap();
        assert_eq!(
            effective_method(GraphMethod::Post, &p).unwrap(),
            GraphMethod::Delete
        );
        let p = Params::parse("method=GET").unwrap();
        assert_eq!(
            effective_method(GraphMethod::Post, &p).unwrap(),
            GraphMethod::Get
        );
        assert!(
            effective_method(GraphMethod::Get, &Params::parse("method=PATCH").unwrap()).is_err()
        );
    }

    #[test]
    fn batch_ops() {
        let ops = parse_batch(
            r#"[{"method":"GET","relative_url":"1001?fields=id"},
                {"method":"POST","relative_url":"1001/feed","body":"message=hi&access_token=k"}]"#,
        )
        .unwrap();
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[1].method, GraphMethod::Post);
        assert_eq!(ops[1].own_token(), Some("k"));
        assert!(parse_batch("{}").is_err());
        assert!(parse_batch("[]").is_err());
        assert!(parse_batch(r#"[{"method":"GET"}]"#).is_err());
    }

    #[test]
    fn ids_limits() {
        let many = (0..51).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
        assert!(parse_ids(&Params::parse(&format!("ids={many}")).unwrap()).is_err());
        assert_eq!(
            parse_ids(&Params::parse("ids=1,2").unwrap()).unwrap(),
            vec!["1", "2"]
        );
    }
}
