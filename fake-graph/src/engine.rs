//! The Graph semantics of the fake, independent of HTTP: authentication, routing, field
//! selection, paging, writes, `ids=` lookups, batches and rate limiting. One [`Engine`] runs
//! with the state lock held, so a call (or a whole batch) is atomic.

use std::collections::HashMap;
use std::ops::Bound::{Excluded, Unbounded};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde_json::{json, Map, Value};

use super::encode::{b64, b64_decode, graph_json, graph_time, trace_id};
use super::fields::{self, FieldSel};
use super::state::{appsecret_proof, PageData, PostData, Principal, QuotaKey, State};
use super::{ExecutedCall, FakeGraphConfig};

/// Most ids one `ids=` request or operations one batch may carry.
const MAX_IDS: usize = 50;
const DEFAULT_LIMIT: usize = 25;
const MAX_LIMIT: usize = 100;
/// The id `/me` resolves to for the system user.
pub(crate) const SYSTEM_USER_ID: &str = "9000";
const SYSTEM_USER_NAME: &str = "graphgate system user";
const DOCS_URL: &str = "https://developers.facebook.com/docs/graph-api";

/// Edges the fake implements; anything else under a node is "Unknown path components".
const PAGE_EDGES: &[&str] = &["feed", "posts"];

/// Generates `fbtrace_id`s / request ids: unique per server, deterministic in arrival order.
#[derive(Debug, Default)]
pub(crate) struct IdGen {
    next: AtomicU64,
}

impl IdGen {
    pub fn next(&self) -> (String, String) {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        (
            trace_id(n, 0x6772_6170_6867_6174),
            trace_id(n, 0x7265_7175_6573_7421),
        )
    }
}

/// The effective HTTP verb (after `method=` overrides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verb {
    Get,
    Post,
    Delete,
}

impl Verb {
    fn word(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::Post => "post",
            Verb::Delete => "delete",
        }
    }
}

/// Request parameters from the query string and form body, in arrival order; the last
/// occurrence of a key wins, so a form body overrides the query.
#[derive(Debug, Default, Clone)]
pub(crate) struct Params(pub Vec<(String, String)>);

impl Params {
    pub fn extend_urlencoded(&mut self, input: &[u8]) {
        self.0.extend(form_urlencoded::parse(input).into_owned());
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// One Graph call: a top-level HTTP request or one batch operation.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    pub verb: Verb,
    /// The version prefix the caller used, if any.
    pub version: Option<String>,
    pub segments: Vec<String>,
    pub params: Params,
    pub token: Option<String>,
    pub proof: Option<String>,
    pub in_batch: bool,
    /// Names of the file parts uploaded with the call.
    pub files: Vec<String>,
}

/// Splits a path into an optional `vNN.N` version and the remaining non-empty segments.
pub(crate) fn split_path(path: &str) -> (Option<String>, Vec<String>) {
    let mut segments: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect();
    let is_version = segments.first().is_some_and(|s| {
        let rest = s.strip_prefix('v').unwrap_or("");
        let (major, minor) = rest.split_once('.').unwrap_or((rest, "0"));
        !major.is_empty()
            && !minor.is_empty()
            && major.bytes().all(|b| b.is_ascii_digit())
            && minor.bytes().all(|b| b.is_ascii_digit())
    });
    let version = if is_version {
        Some(segments.remove(0))
    } else {
        None
    };
    (version, segments)
}

/// Percent-decodes a path segment, lossily for non-UTF-8.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A Graph error, rendered as `{"error":{...}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GraphError {
    pub status: u16,
    pub code: i64,
    pub subcode: Option<i64>,
    pub kind: &'static str,
    pub message: String,
    pub transient: Option<bool>,
    pub throttle: bool,
}

impl GraphError {
    pub fn new(status: u16, code: i64, kind: &'static str, message: impl Into<String>) -> Self {
        GraphError {
            status,
            code,
            subcode: None,
            kind,
            message: message.into(),
            transient: None,
            throttle: false,
        }
    }

    fn subcode(mut self, subcode: i64) -> Self {
        self.subcode = Some(subcode);
        self
    }

    fn transient(mut self) -> Self {
        self.transient = Some(true);
        self
    }

    /// A code-100 parameter error (`(#100) ...`).
    pub fn param(message: impl std::fmt::Display) -> Self {
        GraphError::new(400, 100, "OAuthException", format!("(#100) {message}"))
    }

    fn nonexisting_field(field: &str, node_type: &str) -> Self {
        GraphError::param(format!(
            "Tried accessing nonexisting field ({field}) on node type ({node_type})"
        ))
    }

    fn unsupported(verb: Verb, id: &str) -> Self {
        GraphError::new(
            400,
            100,
            "GraphMethodException",
            format!(
                "Unsupported {} request. Object with ID '{id}' does not exist, cannot be loaded \
                 due to missing permissions, or does not support this operation. Please read the \
                 Graph API documentation at {DOCS_URL}",
                verb.word()
            ),
        )
        .subcode(33)
    }

    fn unknown_path(rest: &[String]) -> Self {
        GraphError::new(
            400,
            2500,
            "OAuthException",
            format!("Unknown path components: /{}", rest.join("/")),
        )
    }

    fn missing_token() -> Self {
        GraphError::new(
            400,
            104,
            "OAuthException",
            "An access token is required to request this resource.",
        )
    }

    fn invalid_token() -> Self {
        GraphError::new(
            400,
            190,
            "OAuthException",
            "Invalid OAuth access token - Cannot parse access token",
        )
    }

    fn expired_token() -> Self {
        GraphError::new(
            400,
            190,
            "OAuthException",
            "Error validating access token: Session has expired on Thursday, 01-Jan-26 00:00:00 \
             PST. The current time is later.",
        )
        .subcode(463)
    }

    fn proof_missing() -> Self {
        GraphError::new(
            400,
            100,
            "GraphMethodException",
            "API calls from the server require an appsecret_proof argument",
        )
    }

    fn proof_invalid() -> Self {
        GraphError::new(
            400,
            100,
            "GraphMethodException",
            "Invalid appsecret_proof provided in the API argument",
        )
    }

    fn permission(message: &str) -> Self {
        GraphError::new(400, 200, "OAuthException", format!("(#200) {message}"))
    }

    /// Code 1: what Graph answers to over-long GETs (and sometimes to nothing in particular).
    pub fn unknown() -> Self {
        GraphError::new(500, 1, "OAuthException", "An unknown error has occurred.").transient()
    }

    /// Code 2: a transient service error.
    pub fn service() -> Self {
        GraphError::new(
            500,
            2,
            "OAuthException",
            "An unexpected error has occurred. Please retry your request later.",
        )
        .transient()
    }

    fn page_throttled() -> Self {
        let mut e = GraphError::new(
            403,
            80001,
            "OAuthException",
            "(#80001) There have been too many calls to this Page account. Wait a bit and try \
             again. For more info, please refer to \
             https://developers.facebook.com/docs/graph-api/overview/rate-limiting.",
        )
        .transient();
        e.throttle = true;
        e
    }

    fn app_throttled() -> Self {
        let mut e = GraphError::new(
            403,
            4,
            "OAuthException",
            "(#4) Application request limit reached",
        )
        .transient();
        e.throttle = true;
        e
    }

    /// Graph's `WWW-Authenticate` challenge, sent with every `OAuthException`.
    pub fn www_authenticate(&self) -> Option<String> {
        if self.kind != "OAuthException" {
            return None;
        }
        let reason = if matches!(self.code, 190 | 102) {
            "invalid_token"
        } else {
            "invalid_request"
        };
        let msg: String = self
            .message
            .chars()
            .map(|c| {
                if c == '"' || !(' '..='~').contains(&c) {
                    '\''
                } else {
                    c
                }
            })
            .collect();
        Some(format!(
            "OAuth \"Facebook Platform\" \"{reason}\" \"{msg}\""
        ))
    }

    pub fn to_json(&self, fbtrace_id: &str) -> Value {
        let mut e = Map::new();
        e.insert("message".into(), self.message.clone().into());
        e.insert("type".into(), self.kind.into());
        e.insert("code".into(), self.code.into());
        if let Some(s) = self.subcode {
            e.insert("error_subcode".into(), s.into());
        }
        if let Some(t) = self.transient {
            e.insert("is_transient".into(), t.into());
        }
        e.insert("fbtrace_id".into(), fbtrace_id.into());
        json!({ "error": e })
    }
}

/// Rate-limit readings gathered while serving one request, rendered as usage headers.
#[derive(Debug, Default, Clone)]
pub(crate) struct Usage {
    pub pages: std::collections::BTreeMap<String, Value>,
    pub app: Option<Value>,
}

impl Usage {
    fn merge(&mut self, other: &Usage) {
        for (k, v) in &other.pages {
            self.pages.insert(k.clone(), v.clone());
        }
        if other.app.is_some() {
            self.app.clone_from(&other.app);
        }
    }

    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if !self.pages.is_empty() {
            let map: Map<String, Value> = self.pages.clone().into_iter().collect();
            out.push(("x-business-use-case-usage", Value::Object(map).to_string()));
        }
        if let Some(app) = &self.app {
            out.push(("x-app-usage", app.to_string()));
        }
        out
    }
}

/// The result of one call.
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    pub status: u16,
    pub body: Value,
    pub error: Option<GraphError>,
    pub usage: Usage,
    /// A successful GET: gets an ETag and may be answered 304.
    pub cacheable: bool,
    pub trace_id: String,
    pub request_id: String,
}

/// What a resolved path node is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    User,
    Page(String),
    Post(String, u64),
}

impl Node {
    fn page_id(&self) -> Option<&str> {
        match self {
            Node::User => None,
            Node::Page(p) | Node::Post(p, _) => Some(p),
        }
    }

    fn quota(&self) -> QuotaKey {
        match self.page_id() {
            Some(p) => QuotaKey::Page(p.to_string()),
            None => QuotaKey::App,
        }
    }
}

/// What paging links need to point back at Graph with the caller's own credentials.
struct LinkCtx<'a> {
    version: &'a str,
    token: &'a str,
    proof: Option<&'a str>,
}

/// How to list a Page's posts: from the edge's query parameters or a nested field's modifiers.
struct ListSpec<'a> {
    edge: &'a str,
    limit: Option<&'a str>,
    after: Option<&'a str>,
    before: Option<&'a str>,
    fields: Option<Vec<FieldSel>>,
}

pub(crate) struct Engine<'a> {
    pub cfg: &'a FakeGraphConfig,
    pub st: &'a mut State,
    pub now: Instant,
    pub ids: &'a IdGen,
}

impl Engine<'_> {
    /// Serves one call end to end.
    pub fn execute(&mut self, call: &Call) -> Outcome {
        self.st.record_executed(executed_call(call));
        let (trace_id, request_id) = self.ids.next();
        let mut usage = Usage::default();
        let mut result = self.route(call, &mut usage);
        if let (Ok(Value::Object(body)), Some("all" | "info" | "warning")) =
            (&mut result, call.params.get("debug"))
        {
            // Graph's debug mode: a `__debug__` object next to the data.
            body.insert(
                "__debug__".into(),
                json!({"messages": [{
                    "link": "https://developers.facebook.com/docs/graph-api/using-graph-api/",
                    "message": "Debug mode is enabled (simulated Graph API).",
                    "type": "info",
                }]}),
            );
        }
        let cacheable = call.verb == Verb::Get && result.is_ok();
        match result {
            Ok(body) => Outcome {
                status: 200,
                body,
                error: None,
                usage,
                cacheable,
                trace_id,
                request_id,
            },
            Err(e) => Outcome {
                status: e.status,
                body: e.to_json(&trace_id),
                error: Some(e),
                usage,
                cacheable,
                trace_id,
                request_id,
            },
        }
    }

    fn route(&mut self, call: &Call, usage: &mut Usage) -> Result<Value, GraphError> {
        let token = call.token.as_deref().unwrap_or("");
        let principal = self.authenticate(token, call.proof.as_deref())?;
        let version = call.version.as_deref().unwrap_or(&self.cfg.default_version);
        let link = LinkCtx {
            version,
            token,
            proof: call.proof.as_deref().filter(|p| !p.is_empty()),
        };

        if let Some(ids) = call.params.get("ids") {
            let edge_only = match call.segments.as_slice() {
                [] => true,
                [one] => self.resolve(&principal, one).is_none(),
                _ => false,
            };
            if edge_only {
                return self.multi_id(call, &principal, ids, &link, usage);
            }
        }

        // `/?id=X`: Graph's lookup of one object by id (or URL).
        let root_id = call
            .segments
            .is_empty()
            .then(|| call.params.get("id"))
            .flatten()
            .filter(|_| call.verb == Verb::Get && call.params.get("batch").is_none());
        let Some(node_raw) = call.segments.first().map(String::as_str).or(root_id) else {
            if call.verb == Verb::Post && call.params.get("batch").is_some() {
                if call.in_batch {
                    return Err(GraphError::param("Batch requests cannot be nested"));
                }
                return self.batch(call, usage);
            }
            return Err(GraphError::new(
                400,
                100,
                "GraphMethodException",
                format!(
                    "Unsupported {} request. Please read the Graph API documentation at {DOCS_URL}",
                    call.verb.word()
                ),
            ));
        };

        let node = self.resolve(&principal, node_raw);
        let quota = node.as_ref().map_or(QuotaKey::App, Node::quota);
        self.charge(&quota, usage)?;
        let Some(node) = node else {
            return Err(GraphError::unsupported(call.verb, node_raw));
        };
        if call.segments.len() > 2 {
            return Err(GraphError::unknown_path(&call.segments[1..]));
        }
        self.check_access(&principal, &node)?;
        let edge = call.segments.get(1).map(String::as_str);

        match (call.verb, &node, edge) {
            (Verb::Get, _, _) => self.read(&principal, &node, edge, &call.params, &link),
            (Verb::Post, Node::Page(p), Some("feed")) => self.create_post(p, &call.params),
            (Verb::Post, Node::Page(p), Some("photos")) => {
                if !call.files.iter().any(|f| f == "source") && call.params.get("url").is_none() {
                    return Err(GraphError::new(
                        400,
                        324,
                        "OAuthException",
                        "(#324) Requires upload file",
                    ));
                }
                let mut params = call.params.clone();
                if params.get("message").is_none() {
                    let caption = params.get("caption").unwrap_or("(photo)").to_string();
                    params.0.push(("message".into(), caption));
                }
                self.create_post(p, &params)
            }
            (Verb::Post, Node::Page(p), None) => self.update_page(p, &call.params),
            (Verb::Post, Node::Post(p, n), None) => self.update_post(p, *n, &call.params, node_raw),
            (Verb::Delete, Node::Post(p, n), None) => self.delete_post(p, *n, node_raw),
            (_, Node::Page(_), Some(e)) if !PAGE_EDGES.contains(&e) => {
                Err(GraphError::unknown_path(&call.segments[1..]))
            }
            (verb, _, _) => Err(GraphError::unsupported(verb, node_raw)),
        }
    }

    fn authenticate(&self, token: &str, proof: Option<&str>) -> Result<Principal, GraphError> {
        if token.is_empty() {
            return Err(GraphError::missing_token());
        }
        if self.st.is_revoked(token) {
            return Err(GraphError::expired_token());
        }
        let principal = self
            .st
            .principal(token)
            .ok_or_else(GraphError::invalid_token)?;
        if let Some(secret) = &self.cfg.app_secret {
            match proof.filter(|p| !p.is_empty()) {
                None => return Err(GraphError::proof_missing()),
                Some(p) if !p.eq_ignore_ascii_case(&appsecret_proof(secret, token)) => {
                    return Err(GraphError::proof_invalid())
                }
                Some(_) => {}
            }
        }
        Ok(principal)
    }

    /// `me`, a Page id or a `PAGE_N` post id; `me` is the Page itself for Page tokens.
    fn resolve(&self, principal: &Principal, raw: &str) -> Option<Node> {
        if raw == "me" {
            return Some(match principal {
                Principal::SystemUser => Node::User,
                Principal::Page(p) => Node::Page(p.clone()),
            });
        }
        if raw == SYSTEM_USER_ID && *principal == Principal::SystemUser {
            return Some(Node::User);
        }
        if self.st.page(raw).is_some() {
            return Some(Node::Page(raw.to_string()));
        }
        let (page, n) = raw.rsplit_once('_')?;
        let n: u64 = n.parse().ok()?;
        self.st.page(page)?;
        Some(Node::Post(page.to_string(), n))
    }

    /// A Page token only works for its own Page.
    fn check_access(&self, principal: &Principal, node: &Node) -> Result<(), GraphError> {
        match (principal, node.page_id()) {
            (Principal::Page(own), Some(target)) if own != target => Err(GraphError::permission(
                "The Page access token does not belong to this Page",
            )),
            _ => Ok(()),
        }
    }

    /// Charges one call; a throttled call is an error carrying the usage that caused it.
    fn charge(&mut self, key: &QuotaKey, usage: &mut Usage) -> Result<(), GraphError> {
        let limit = match key {
            QuotaKey::Page(_) => self.cfg.page_calls_limit,
            QuotaKey::App => self.cfg.app_calls_limit,
        };
        let r = self.st.charge(key, limit, self.cfg.page_window, self.now);
        let pct = r.percent();
        let quiet = pct == 0 && self.st.omit_zero_usage;
        match key {
            // Meta leaves the usage headers out when usage is about 0.
            _ if quiet => {}
            QuotaKey::Page(p) => {
                usage.pages.insert(
                    p.clone(),
                    json!([{
                        "type": "pages",
                        "call_count": pct,
                        "total_cputime": pct / 2,
                        "total_time": pct / 2,
                        "estimated_time_to_regain_access": r.regain_minutes,
                    }]),
                );
            }
            QuotaKey::App => {
                usage.app = Some(json!({
                    "call_count": pct,
                    "total_time": pct / 2,
                    "total_cputime": pct / 2,
                }));
            }
        }
        match (r.throttled, key) {
            (false, _) => Ok(()),
            (true, QuotaKey::Page(_)) => Err(GraphError::page_throttled()),
            (true, QuotaKey::App) => Err(GraphError::app_throttled()),
        }
    }

    fn read(
        &self,
        principal: &Principal,
        node: &Node,
        edge: Option<&str>,
        params: &Params,
        link: &LinkCtx<'_>,
    ) -> Result<Value, GraphError> {
        let fields = parse_fields(params.get("fields"))?;
        match (node, edge) {
            (Node::Page(p), None) => {
                let page = self.page(p)?;
                let fields = fields.unwrap_or_else(|| default_fields(&["id", "name"]));
                self.page_json(page, principal, &fields, link)
            }
            (Node::Page(p), Some(edge)) if PAGE_EDGES.contains(&edge) => {
                let page = self.page(p)?;
                let spec = ListSpec {
                    edge,
                    limit: params.get("limit"),
                    after: params.get("after"),
                    before: params.get("before"),
                    fields,
                };
                list_posts(self.cfg, page, &spec, link)
            }
            (Node::Post(p, n), None) => {
                let page = self.page(p)?;
                let id = format!("{p}_{n}");
                let post = page
                    .posts
                    .get(n)
                    .ok_or_else(|| GraphError::unsupported(Verb::Get, &id))?;
                let fields = fields.unwrap_or_else(|| default_fields(POST_DEFAULT));
                post_json(p, *n, post, &fields)
            }
            (Node::User, None) => {
                let fields = fields.unwrap_or_else(|| default_fields(&["id", "name"]));
                let mut out = Map::new();
                for f in &fields {
                    let v: Value = match f.name.as_str() {
                        "id" => SYSTEM_USER_ID.into(),
                        "name" => SYSTEM_USER_NAME.into(),
                        other => return Err(GraphError::nonexisting_field(other, "User")),
                    };
                    out.insert(f.key().to_string(), v);
                }
                Ok(Value::Object(out))
            }
            (Node::User, Some("accounts")) => self.accounts(principal, fields, link),
            (_, Some(e)) => Err(GraphError::unknown_path(&[e.to_string()])),
        }
    }

    fn page(&self, id: &str) -> Result<&PageData, GraphError> {
        self.st
            .page(id)
            .ok_or_else(|| GraphError::unsupported(Verb::Get, id))
    }

    fn page_json(
        &self,
        page: &PageData,
        principal: &Principal,
        fields: &[FieldSel],
        link: &LinkCtx<'_>,
    ) -> Result<Value, GraphError> {
        let mut out = Map::new();
        for f in fields {
            let v: Value = match f.name.as_str() {
                "id" => page.id.clone().into(),
                "name" => page.name.clone().into(),
                "about" => page.about.clone().into(),
                "category" => page.category.clone().into(),
                "fan_count" => page.fan_count.into(),
                "link" => format!("https://www.facebook.com/{}", page.id).into(),
                "tasks" => json!([
                    "ANALYZE",
                    "ADVERTISE",
                    "MODERATE",
                    "CREATE_CONTENT",
                    "MANAGE"
                ]),
                "access_token" => match principal {
                    Principal::SystemUser => page.token.clone().into(),
                    Principal::Page(_) => {
                        return Err(GraphError::new(
                            400,
                            10,
                            "OAuthException",
                            "(#10) Application does not have permission for this action",
                        ))
                    }
                },
                edge @ ("feed" | "posts") => {
                    let spec = ListSpec {
                        edge,
                        limit: f.modifier("limit"),
                        after: f.modifier("after"),
                        before: f.modifier("before"),
                        fields: f.children.clone(),
                    };
                    list_posts(self.cfg, page, &spec, link)?
                }
                other => return Err(GraphError::nonexisting_field(other, "Page")),
            };
            out.insert(f.key().to_string(), v);
        }
        Ok(Value::Object(out))
    }

    /// `/me/accounts`: the Pages the system user manages, each with its Page token. Real Graph
    /// hands those tokens out here, which is why a gateway must scrub this reply.
    fn accounts(
        &self,
        principal: &Principal,
        fields: Option<Vec<FieldSel>>,
        link: &LinkCtx<'_>,
    ) -> Result<Value, GraphError> {
        let fields = fields.unwrap_or_else(|| {
            default_fields(&["access_token", "category", "name", "id", "tasks"])
        });
        let mut data = Vec::with_capacity(self.st.pages.len());
        for page in &self.st.pages {
            data.push(self.page_json(page, principal, &fields, link)?);
        }
        let mut out = Map::new();
        if let (Some(first), Some(last)) = (self.st.pages.first(), self.st.pages.last()) {
            out.insert(
                "paging".into(),
                json!({"cursors": {"before": cursor("acct", &first.id, 0), "after": cursor("acct", &last.id, 0)}}),
            );
        }
        out.insert("data".into(), Value::Array(data));
        Ok(Value::Object(out))
    }

    fn create_post(&mut self, page_id: &str, params: &Params) -> Result<Value, GraphError> {
        let message = params
            .get("message")
            .filter(|m| !m.trim().is_empty())
            .ok_or_else(|| GraphError::param("Missing message or attachment"))?
            .to_string();
        let page = self
            .st
            .page_mut(page_id)
            .ok_or_else(|| GraphError::unsupported(Verb::Post, page_id))?;
        let n = page.next_post;
        page.next_post += 1;
        page.posts.insert(
            n,
            PostData {
                message,
                created: PageData::post_time(n),
            },
        );
        Ok(json!({ "id": format!("{page_id}_{n}") }))
    }

    fn update_page(&mut self, page_id: &str, params: &Params) -> Result<Value, GraphError> {
        let about = params
            .get("about")
            .ok_or_else(|| GraphError::unsupported(Verb::Post, page_id))?
            .to_string();
        if let Some(page) = self.st.page_mut(page_id) {
            page.about = about;
        }
        Ok(json!({ "success": true }))
    }

    fn update_post(
        &mut self,
        page_id: &str,
        n: u64,
        params: &Params,
        raw: &str,
    ) -> Result<Value, GraphError> {
        let post = self
            .st
            .page_mut(page_id)
            .and_then(|p| p.posts.get_mut(&n))
            .ok_or_else(|| GraphError::unsupported(Verb::Post, raw))?;
        let message = params
            .get("message")
            .ok_or_else(|| GraphError::param("Missing message"))?;
        post.message = message.to_string();
        Ok(json!({ "success": true }))
    }

    fn delete_post(&mut self, page_id: &str, n: u64, raw: &str) -> Result<Value, GraphError> {
        self.st
            .page_mut(page_id)
            .and_then(|p| p.posts.remove(&n))
            .ok_or_else(|| GraphError::unsupported(Verb::Delete, raw))?;
        Ok(json!({ "success": true }))
    }

    /// `?ids=a,b[&fields=..]`, optionally with an edge path (`/feed?ids=..`). Each id is one call
    /// charged to its own quota; one unknown id or one throttled quota fails the whole request.
    fn multi_id(
        &mut self,
        call: &Call,
        principal: &Principal,
        ids: &str,
        link: &LinkCtx<'_>,
        usage: &mut Usage,
    ) -> Result<Value, GraphError> {
        if call.verb != Verb::Get {
            return Err(GraphError::param("ids= lookups only support GET"));
        }
        let mut wanted: Vec<&str> = Vec::new();
        for id in ids.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if !wanted.contains(&id) {
                wanted.push(id);
            }
            // Stop early: deduplication is quadratic and the request fails anyway.
            if wanted.len() > MAX_IDS {
                return Err(GraphError::param(format!(
                    "Too many IDs. Maximum: {MAX_IDS}. Provided: more than {MAX_IDS}."
                )));
            }
        }
        if wanted.is_empty() {
            return Err(GraphError::param("The parameter ids is required"));
        }
        let resolved: Vec<Option<Node>> = wanted
            .iter()
            .map(|id| self.resolve(principal, id))
            .collect();
        let missing: Vec<&str> = wanted
            .iter()
            .zip(&resolved)
            .filter(|(_, n)| n.is_none())
            .map(|(id, _)| *id)
            .collect();
        if !missing.is_empty() {
            self.charge(&QuotaKey::App, usage)?;
            return Err(GraphError::new(
                404,
                803,
                "OAuthException",
                format!(
                    "(#803) Some of the aliases you requested do not exist: {}",
                    missing.join(",")
                ),
            ));
        }
        let nodes: Vec<Node> = resolved.into_iter().flatten().collect();
        let mut throttled = None;
        for node in &nodes {
            if let Err(e) = self.charge(&node.quota(), usage) {
                throttled.get_or_insert(e);
            }
        }
        if let Some(e) = throttled {
            return Err(e);
        }
        let edge = call.segments.first().map(String::as_str);
        let mut out = Map::new();
        for (id, node) in wanted.iter().zip(&nodes) {
            self.check_access(principal, node)?;
            let v = self.read(principal, node, edge, &call.params, link)?;
            out.insert((*id).to_string(), v);
        }
        Ok(Value::Object(out))
    }

    /// `POST /` with `batch=[...]`: runs each operation as its own call, in order.
    fn batch(&mut self, call: &Call, usage: &mut Usage) -> Result<Value, GraphError> {
        let raw = call.params.get("batch").unwrap_or("");
        let ops = match serde_json::from_str::<Value>(raw) {
            Ok(Value::Array(ops)) => ops,
            _ => {
                return Err(GraphError::param(
                    "The parameter batch must be a JSON array",
                ))
            }
        };
        if ops.len() > MAX_IDS {
            return Err(GraphError::param(format!(
                "Too many requests in batch message. Maximum batch size is {MAX_IDS}"
            )));
        }
        let include_headers = call.params.get("include_headers") != Some("false");
        let mut named: HashMap<String, Option<Value>> = HashMap::new();
        let mut results = Vec::with_capacity(ops.len());
        for op in &ops {
            results.push(self.batch_op(op, call, include_headers, &mut named, usage));
        }
        Ok(Value::Array(results))
    }

    fn batch_op(
        &mut self,
        op: &Value,
        parent: &Call,
        include_headers: bool,
        named: &mut HashMap<String, Option<Value>>,
        usage: &mut Usage,
    ) -> Value {
        let name = op.get("name").and_then(Value::as_str).map(str::to_string);
        let prepared = decode_op(op, parent, Some(named));
        let outcome = match prepared {
            Ok(Some(op_call)) => self.execute(&op_call),
            // A dependency failed or was missing: the operation does not run.
            Ok(None) => {
                if let Some(n) = name {
                    named.insert(n, None);
                }
                return Value::Null;
            }
            Err(e) => {
                let (trace_id, request_id) = self.ids.next();
                Outcome {
                    status: e.status,
                    body: e.to_json(&trace_id),
                    error: Some(e),
                    usage: Usage::default(),
                    cacheable: false,
                    trace_id,
                    request_id,
                }
            }
        };
        usage.merge(&outcome.usage);
        if outcome.error.is_some() {
            self.st.counters.errors += 1;
        }
        let ok = outcome.error.is_none();
        let omit = op
            .get("omit_response_on_success")
            .and_then(Value::as_bool)
            .unwrap_or(name.is_some());
        if let Some(n) = name {
            named.insert(n, ok.then(|| outcome.body.clone()));
        }
        if ok && omit {
            return Value::Null;
        }
        let body = String::from_utf8_lossy(&graph_json(&outcome.body)).into_owned();
        let mut entry = Map::new();
        entry.insert("code".into(), outcome.status.into());
        if include_headers {
            let version = parent
                .version
                .as_deref()
                .unwrap_or(&self.cfg.default_version);
            let headers: Vec<Value> = op_headers(&outcome, version, &body)
                .into_iter()
                .map(|(name, value)| json!({ "name": name, "value": value }))
                .collect();
            entry.insert("headers".into(), Value::Array(headers));
        }
        entry.insert("body".into(), body.into());
        Value::Object(entry)
    }
}

/// Turns a batch operation into a [`Call`]; `Ok(None)` when a dependency did not succeed.
/// Without `named` (reading a batch without running it) dependencies are taken to have
/// succeeded and references are left as written.
pub(crate) fn decode_op(
    op: &Value,
    parent: &Call,
    named: Option<&HashMap<String, Option<Value>>>,
) -> Result<Option<Call>, GraphError> {
    if !op.is_object() {
        return Err(GraphError::param(
            "Each batch operation must be a JSON object",
        ));
    }
    let deps: Vec<&str> = match op.get("depends_on") {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if let Some(named) = named {
        if deps.iter().any(|d| !matches!(named.get(*d), Some(Some(_)))) {
            return Ok(None);
        }
    }
    let method = op
        .get("method")
        .and_then(Value::as_str)
        .unwrap_or("GET")
        .to_ascii_uppercase();
    let Some(relative_url) = op.get("relative_url").and_then(Value::as_str) else {
        return Err(GraphError::param("Missing relative_url in batch operation"));
    };
    let resolved = match named {
        Some(named) => substitute(relative_url, named),
        None => Some(relative_url.to_string()),
    };
    let Some(relative_url) = resolved else {
        return Ok(None);
    };
    let (path, query) = relative_url
        .split_once('?')
        .unwrap_or((relative_url.as_str(), ""));
    let (version, segments) = split_path(path);
    let mut params = Params::default();
    params.extend_urlencoded(query.as_bytes());
    match op.get("body") {
        Some(Value::String(body)) => {
            match named.map_or(Some(body.clone()), |n| substitute(body, n)) {
                Some(body) => params.extend_urlencoded(body.as_bytes()),
                None => return Ok(None),
            }
        }
        Some(Value::Object(fields)) => {
            for (k, v) in fields {
                let v = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                params.0.push((k.clone(), v));
            }
        }
        _ => {}
    }
    let verb = match method.as_str() {
        "GET" => Verb::Get,
        "DELETE" => Verb::Delete,
        // An operation runs under its own method; a `method=` inside it does not
        // override that (unlike on a top-level POST).
        "POST" => Verb::Post,
        other => {
            return Err(GraphError::param(format!(
                "Unsupported method {other} in batch operation"
            )))
        }
    };
    // An operation's own token needs its own proof; otherwise it inherits the batch's.
    let (token, proof) = match params.get("access_token") {
        Some(t) => (
            Some(t.to_string()),
            params.get("appsecret_proof").map(str::to_string),
        ),
        None => (parent.token.clone(), parent.proof.clone()),
    };
    Ok(Some(Call {
        verb,
        version,
        segments,
        params,
        token,
        proof,
        in_batch: true,
        files: Vec::new(),
    }))
}

/// What a call does, as the request log of executed calls shows it.
pub(crate) fn executed_call(call: &Call) -> ExecutedCall {
    ExecutedCall {
        verb: match call.verb {
            Verb::Get => "GET",
            Verb::Post => "POST",
            Verb::Delete => "DELETE",
        },
        segments: call.segments.clone(),
        ids: call
            .params
            .get("ids")
            .map(|ids| {
                ids.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default(),
        fields: call.params.get("fields").map(str::to_string),
        token: call.token.clone(),
        root_id: call
            .segments
            .is_empty()
            .then(|| call.params.get("id").map(str::to_string))
            .flatten(),
        in_batch: call.in_batch,
        is_batch: call.verb == Verb::Post
            && call.segments.is_empty()
            && call.params.get("batch").is_some()
            && call.params.get("ids").is_none(),
    }
}

/// `POST` with `method=GET|DELETE` is that method (Graph's escape hatch for long URLs and
/// clients without DELETE).
pub(crate) fn override_verb(params: &Params) -> Verb {
    match params.get("method").map(str::to_ascii_uppercase).as_deref() {
        Some("GET") => Verb::Get,
        Some("DELETE") => Verb::Delete,
        _ => Verb::Post,
    }
}

/// The sub-headers Graph reports for a batch operation.
fn op_headers(outcome: &Outcome, version: &str, body: &str) -> Vec<(String, String)> {
    let mut h = vec![
        (
            "Content-Type".to_string(),
            "text/javascript; charset=UTF-8".to_string(),
        ),
        ("facebook-api-version".to_string(), version.to_string()),
    ];
    let cache = if outcome.error.is_some() {
        "no-store"
    } else {
        "private, no-cache, no-store, must-revalidate"
    };
    h.push(("Cache-Control".to_string(), cache.to_string()));
    if outcome.cacheable {
        h.push(("ETag".to_string(), etag(body.as_bytes())));
    }
    if let Some(auth) = outcome
        .error
        .as_ref()
        .and_then(GraphError::www_authenticate)
    {
        h.push(("WWW-Authenticate".to_string(), auth));
    }
    for (name, value) in outcome.usage.headers() {
        h.push((name.to_string(), value));
    }
    h
}

/// A quoted strong ETag over the reply bytes.
pub(crate) fn etag(body: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("\"{}\"", &hex::encode(Sha256::digest(body))[..40])
}

/// Replaces `{result=NAME:$.path}` references with values from earlier named operations.
/// `None` when a reference names an operation that failed or did not run.
fn substitute(text: &str, named: &HashMap<String, Option<Value>>) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{result=") {
        let after = &rest[start + "{result=".len()..];
        let Some(end) = after.find('}') else { break };
        out.push_str(&rest[..start]);
        let (name, path) = after[..end].split_once(':')?;
        let value = named.get(name)?.as_ref()?;
        out.push_str(&jsonpath(value, path)?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Some(out)
}

/// A small JSONPath subset: `$.a.b`, `$.data.0.id`, `$.data[0].id`, `$.data.*.id`;
/// several matches are joined with commas, as Graph does.
fn jsonpath(root: &Value, path: &str) -> Option<String> {
    let path = path.trim().strip_prefix('$')?;
    let normalized = path.replace('[', ".").replace(']', "");
    let mut current = vec![root];
    for seg in normalized.split('.').filter(|s| !s.is_empty()) {
        let seg = seg.trim_matches(|c| c == '\'' || c == '"');
        let mut next = Vec::new();
        for v in current {
            match (seg, v) {
                ("*", Value::Array(a)) => next.extend(a.iter()),
                ("*", Value::Object(o)) => next.extend(o.values()),
                (s, Value::Array(a)) => next.extend(s.parse::<usize>().ok().and_then(|i| a.get(i))),
                (s, Value::Object(o)) => next.extend(o.get(s)),
                _ => {}
            }
        }
        current = next;
    }
    if current.is_empty() {
        return None;
    }
    let parts: Vec<String> = current
        .into_iter()
        .map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect();
    Some(parts.join(","))
}

const POST_DEFAULT: &[&str] = &["created_time", "message", "id"];
const POST_FIELDS: &[&str] = &["id", "message", "created_time"];

fn default_fields(names: &[&str]) -> Vec<FieldSel> {
    names
        .iter()
        .map(|n| FieldSel {
            name: (*n).to_string(),
            modifiers: Vec::new(),
            children: None,
        })
        .collect()
}

/// Parses `fields=`; `None` when absent or blank (the node's defaults apply).
fn parse_fields(raw: Option<&str>) -> Result<Option<Vec<FieldSel>>, GraphError> {
    let Some(raw) = raw else { return Ok(None) };
    let parsed = fields::parse(raw).map_err(GraphError::param)?;
    Ok((!parsed.is_empty()).then_some(parsed))
}

fn parse_limit(raw: Option<&str>) -> Result<usize, GraphError> {
    let Some(raw) = raw.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(DEFAULT_LIMIT);
    };
    if !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(GraphError::param(
            "The parameter limit must be a non-negative integer",
        ));
    }
    // All digits: only overflow can fail, and a huge limit is just the maximum.
    Ok(raw.parse::<usize>().unwrap_or(usize::MAX).min(MAX_LIMIT))
}

fn cursor(kind: &str, page: &str, n: u64) -> String {
    b64(format!("{kind}:{page}:{n}").as_bytes())
}

fn decode_cursor(page: &str, raw: &str, which: &str) -> Result<u64, GraphError> {
    let invalid = || GraphError::param(format!("The {which} cursor is invalid or has expired"));
    let bytes = b64_decode(raw.trim()).ok_or_else(invalid)?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let rest = text.strip_prefix("post:").ok_or_else(invalid)?;
    let (p, n) = rest.rsplit_once(':').ok_or_else(invalid)?;
    if p != page {
        return Err(invalid());
    }
    n.parse().map_err(|_| invalid())
}

fn post_json(
    page_id: &str,
    n: u64,
    post: &PostData,
    fields: &[FieldSel],
) -> Result<Value, GraphError> {
    let mut out = Map::new();
    for f in fields {
        let v: Value = match f.name.as_str() {
            "id" => format!("{page_id}_{n}").into(),
            "message" => post.message.clone().into(),
            "created_time" => graph_time(post.created).into(),
            other => return Err(GraphError::nonexisting_field(other, "PagePost")),
        };
        out.insert(f.key().to_string(), v);
    }
    Ok(Value::Object(out))
}

/// One page of a Page's posts, newest first, with Graph-style cursor paging and absolute
/// `next`/`previous` links that carry the caller's token (and proof).
fn list_posts(
    cfg: &FakeGraphConfig,
    page: &PageData,
    spec: &ListSpec<'_>,
    link: &LinkCtx<'_>,
) -> Result<Value, GraphError> {
    let limit = parse_limit(spec.limit)?;
    let fields = spec
        .fields
        .clone()
        .unwrap_or_else(|| default_fields(POST_DEFAULT));
    if let Some(bad) = fields
        .iter()
        .find(|f| !POST_FIELDS.contains(&f.name.as_str()))
    {
        return Err(GraphError::nonexisting_field(&bad.name, "PagePost"));
    }
    let items: Vec<(u64, &PostData)> = if let Some(after) = spec.after {
        let n = decode_cursor(&page.id, after, "after")?;
        page.posts
            .range(..n)
            .rev()
            .take(limit)
            .map(|(k, v)| (*k, v))
            .collect()
    } else if let Some(before) = spec.before {
        let n = decode_cursor(&page.id, before, "before")?;
        let mut v: Vec<_> = page
            .posts
            .range((Excluded(n), Unbounded))
            .take(limit)
            .map(|(k, v)| (*k, v))
            .collect();
        v.reverse();
        v
    } else {
        page.posts
            .iter()
            .rev()
            .take(limit)
            .map(|(k, v)| (*k, v))
            .collect()
    };
    let data = items
        .iter()
        .map(|(n, post)| post_json(&page.id, *n, post, &fields))
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = Map::new();
    out.insert("data".into(), Value::Array(data));
    let (Some(&(newest, _)), Some(&(oldest, _))) = (items.first(), items.last()) else {
        return Ok(Value::Object(out));
    };
    let before = cursor("post", &page.id, newest);
    let after = cursor("post", &page.id, oldest);
    let mut paging = Map::new();
    paging.insert(
        "cursors".into(),
        json!({ "before": before, "after": after }),
    );
    let fields_text = spec.fields.as_deref().map(fields::to_text);
    let make_link = |key: &str, cur: &str| {
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.append_pair("access_token", link.token);
        if let Some(p) = link.proof {
            q.append_pair("appsecret_proof", p);
        }
        if let Some(f) = &fields_text {
            q.append_pair("fields", f);
        }
        q.append_pair("limit", &limit.to_string());
        q.append_pair(key, cur);
        format!(
            "{}/{}/{}/{}?{}",
            cfg.link_base.trim_end_matches('/'),
            link.version,
            page.id,
            spec.edge,
            q.finish()
        )
    };
    if page
        .posts
        .range((Excluded(newest), Unbounded))
        .next()
        .is_some()
    {
        paging.insert("previous".into(), make_link("before", &before).into());
    }
    if page.posts.range(..oldest).next().is_some() {
        paging.insert("next".into(), make_link("after", &after).into());
    }
    out.insert("paging".into(), Value::Object(paging));
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(
            split_path("/v21.0/1001/feed"),
            (Some("v21.0".into()), vec!["1001".into(), "feed".into()])
        );
        assert_eq!(split_path("//me"), (None, vec!["me".into()]));
        assert_eq!(
            split_path("/v3/x%2Fy%"),
            (Some("v3".into()), vec!["x/y%".into()])
        );
        assert_eq!(
            split_path("/video/1"),
            (None, vec!["video".into(), "1".into()])
        );
    }

    #[test]
    fn jsonpath_subset() {
        let v = json!({"id": "1001_9", "data": [{"id": "a"}, {"id": "b"}]});
        assert_eq!(jsonpath(&v, "$.id").as_deref(), Some("1001_9"));
        assert_eq!(jsonpath(&v, "$.data.*.id").as_deref(), Some("a,b"));
        assert_eq!(jsonpath(&v, "$.data[1].id").as_deref(), Some("b"));
        assert_eq!(jsonpath(&v, "$.nope"), None);
        let mut named = HashMap::new();
        named.insert("first".to_string(), Some(v));
        assert_eq!(
            substitute("{result=first:$.id}?fields=id", &named).as_deref(),
            Some("1001_9?fields=id")
        );
        assert_eq!(substitute("{result=other:$.id}", &named), None);
    }

    #[test]
    fn limits() {
        assert_eq!(parse_limit(None).ok(), Some(25));
        assert_eq!(
            parse_limit(Some("99999999999999999999999999")).ok(),
            Some(100)
        );
        assert!(parse_limit(Some("-1")).is_err());
        assert_eq!(parse_limit(Some("0")).ok(), Some(0));
    }
}
