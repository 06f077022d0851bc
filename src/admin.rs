//! The admin listener: `/healthz` (process alive), `/readyz` (accepting traffic; fails while
//! draining), `/metrics` (Prometheus text), `/admin/pages` (quota status of every known Page).
//! Endpoints under `/admin/` require the admin token
//! (`Authorization: Bearer <server.admin_token>`) and are refused when none is configured.

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;

use crate::proxy::Gateway;

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
        (&http::Method::GET, "/metrics") => text(
            StatusCode::OK,
            gw.metrics.render(),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        (_, path) if path.starts_with("/admin/") => {
            if !is_admin(gw, req.headers()) {
                return json(
                    StatusCode::UNAUTHORIZED,
                    serde_json::json!({"error": {"message": "admin token required", "type": "OAuthException", "code": 190}}),
                );
            }
            if req.method() == http::Method::GET && path == "/admin/pages" {
                return json(StatusCode::OK, gw.quota.status());
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
