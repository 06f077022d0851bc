//! The admin listener: `/healthz` (process alive), `/readyz` (accepting traffic; fails while
//! draining), `/metrics` (Prometheus text). Endpoints under `/admin/` require the admin token
//! (`Authorization: Bearer <server.admin_token>`) and are refused when none is configured:
//! - `GET /admin/pages`: the quota estimate of the busiest Pages and why calls wait
//!   (`?scope=fleet`: every live replica's busiest Pages, a row per replica, and the fleet's
//!   shared counts from Redis; see [`fleet`]);
//! - `GET /admin/cache`: cache figures, this replica's and (with Redis) a row per replica;
//! - `POST /admin/cache/purge?node=ID | ?prefix=READABLE_KEY_PREFIX | ?all=true` → `{"purged": N}`.

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;

use crate::proxy::Gateway;

pub mod fleet;

fn text(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Full<Bytes>> {
    text(status, value.to_string(), "application/json")
}

/// Does the request carry the configured admin token? Compared by digest so timing does not
/// reveal a prefix.
pub fn is_admin(gw: &Gateway, headers: &http::HeaderMap) -> bool {
    use sha2::{Digest, Sha256};
    let Some(expected) = &gw.config.server.admin_token else {
        return false;
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    Sha256::digest(presented.as_bytes()) == Sha256::digest(expected.expose().as_bytes())
}

pub async fn handle<B>(gw: &Gateway, req: Request<B>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&http::Method::GET, "/healthz") => text(StatusCode::OK, "ok\n", "text/plain"),
        (&http::Method::GET, "/readyz") => {
            if gw.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n", "text/plain")
            } else {
                text(StatusCode::OK, "ready\n", "text/plain")
            }
        }
        (&http::Method::GET, "/metrics") => {
            // Entry and byte gauges are read from moka after its pending maintenance.
            gw.cache.settle();
            gw.metrics
                .server
                .requests_in_flight
                .set(i64::try_from(gw.in_flight()).unwrap_or(i64::MAX));
            text(
                StatusCode::OK,
                gw.metrics.render(),
                "text/plain; version=0.0.4; charset=utf-8",
            )
        }
        (_, path) if path.starts_with("/admin/") => {
            if !is_admin(gw, req.headers()) {
                return json(
                    StatusCode::UNAUTHORIZED,
                    serde_json::json!({"error": {"message": "admin token required", "type": "OAuthException", "code": 190}}),
                );
            }
            if req.method() == http::Method::GET && path == "/admin/pages" {
                return match scope(req.uri().query().unwrap_or("")) {
                    Some(Scope::Local) => json(StatusCode::OK, gw.quota.status()),
                    Some(Scope::Fleet) => json(StatusCode::OK, fleet::pages(gw).await),
                    None => bad_scope(),
                };
            }
            if req.method() == http::Method::GET && path == "/admin/cache" {
                return json(StatusCode::OK, fleet::cache(gw).await);
            }
            if req.method() == http::Method::POST && path == "/admin/cache/purge" {
                return purge(gw, req.uri().query().unwrap_or("")).await;
            }
            json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": {"message": "no such admin endpoint", "type": "GraphMethodException", "code": 803}}),
            )
        }
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": {"message": "not found", "type": "GraphMethodException", "code": 803}}),
        ),
    }
}

/// Which replicas an admin view covers.
enum Scope {
    Local,
    Fleet,
}

/// `scope=local` (the default) or `scope=fleet`; `None` for anything else.
fn scope(query: &str) -> Option<Scope> {
    let mut out = Scope::Local;
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        if name == "scope" {
            out = match value.as_ref() {
                "local" => Scope::Local,
                "fleet" => Scope::Fleet,
                _ => return None,
            };
        }
    }
    Some(out)
}

fn bad_scope() -> Response<Full<Bytes>> {
    json(
        StatusCode::BAD_REQUEST,
        serde_json::json!({"error": {"message": "scope must be local or fleet", "type": "GraphMethodException", "code": 100}}),
    )
}

/// `POST /admin/cache/purge` with exactly one of `node=`, `prefix=` or `all=true`.
async fn purge(gw: &Gateway, query: &str) -> Response<Full<Bytes>> {
    let bad = |msg: &str| {
        json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": {"message": msg, "type": "GraphMethodException", "code": 100}}),
        )
    };
    let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let [(name, value)] = params.as_slice() else {
        return bad("give exactly one of node=, prefix= or all=true");
    };
    let purged = match (name.as_str(), value.as_str()) {
        ("node", node) if !node.is_empty() => gw.cache.purge_node(node).await,
        ("prefix", prefix) if !prefix.is_empty() => gw.cache.purge_prefix(prefix).await,
        ("all", "true") => gw.cache.purge_all().await,
        _ => return bad("give exactly one of node=, prefix= or all=true"),
    };
    tracing::info!(target: "graphgate::admin", purged, by = name.as_str(), "cache purge");
    json(StatusCode::OK, serde_json::json!({ "purged": purged }))
}
