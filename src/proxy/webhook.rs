//! The Meta Webhooks endpoint on the public listener (`[webhooks] path`): the subscription
//! handshake, and signed Page change notifications turned into purges on every replica
//! through the cache's invalidation path. See [`crate::webhooks`] for the checks.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;

use super::{check_header_size, Answer, Gateway};
use crate::error::ProxyError;
use crate::metrics::Route;
use crate::webhooks::{self, SIGNATURE_HEADER};

const ROUTE: Route = Route::Webhook;

impl Gateway {
    /// Is this request for the webhooks endpoint?
    pub(crate) fn is_webhook(&self, path: &str) -> bool {
        self.webhooks.as_ref().is_some_and(|w| w.path() == path)
    }

    /// Answers a request to the webhooks endpoint; never sends anything to Graph.
    pub(crate) async fn webhook<B>(self: Arc<Self>, req: Request<B>) -> Answer
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        match self.webhook_reply(req).await {
            Ok(response) => Answer::plain(response, ROUTE),
            Err(e) => Answer::refused(e, ROUTE, None),
        }
    }

    async fn webhook_reply<B>(&self, req: Request<B>) -> Result<Response<Full<Bytes>>, ProxyError>
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let fail = |e: ProxyError| e;
        let Some(hooks) = self.webhooks.as_ref() else {
            return Err(fail(ProxyError::NotFound));
        };
        let count = |o: webhooks::Outcome| self.metrics.server.webhook(o);
        check_header_size(&req, self.config.server.max_header_bytes).map_err(fail)?;
        let response = match *req.method() {
            Method::GET => match hooks.handshake(req.uri().query()) {
                Ok(challenge) => {
                    count(webhooks::Outcome::Verified);
                    tracing::info!("webhook subscription verified");
                    reply("text/plain; charset=UTF-8", Bytes::from(challenge))
                }
                Err(o) => {
                    count(o);
                    return Err(fail(ProxyError::WebhookRefused(
                        "not a subscription handshake with the configured verify token",
                    )));
                }
            },
            Method::POST => {
                let (parts, body) = req.into_parts();
                let body = self
                    .read_body_within(body, &parts.headers, self.config.server.body_read_timeout)
                    .await
                    .map_err(fail)?;
                let signature = parts
                    .headers
                    .get(SIGNATURE_HEADER)
                    .map(HeaderValue::as_bytes);
                match hooks.check_delivery(signature, &body, SystemTime::now()) {
                    Ok(nodes) => {
                        let mut entries = 0;
                        for node in &nodes {
                            entries += self.cache.purge_node(node).await;
                        }
                        let outcome = if nodes.is_empty() {
                            webhooks::Outcome::Ignored
                        } else {
                            webhooks::Outcome::Purged
                        };
                        count(outcome);
                        tracing::info!(
                            outcome = outcome.as_str(),
                            nodes = nodes.len(),
                            entries,
                            "webhook delivery"
                        );
                        acknowledged()
                    }
                    Err(webhooks::Outcome::Replayed) => {
                        count(webhooks::Outcome::Replayed);
                        tracing::info!(outcome = "replayed", "webhook delivery seen before");
                        acknowledged()
                    }
                    Err(o) => {
                        count(o);
                        tracing::warn!(outcome = o.as_str(), "webhook delivery refused");
                        return Err(fail(match o {
                            webhooks::Outcome::Malformed => ProxyError::BadRequest(
                                "The webhook notification cannot be read.".into(),
                            ),
                            webhooks::Outcome::Stale => {
                                ProxyError::WebhookRefused("the notification is too old")
                            }
                            _ => ProxyError::WebhookRefused(
                                "X-Hub-Signature-256 does not match the body",
                            ),
                        }));
                    }
                }
            }
            ref other => return Err(fail(ProxyError::MethodNotAllowed(other.to_string()))),
        };
        Ok(response)
    }
}

/// What Meta expects for a delivery it need not send again.
fn acknowledged() -> Response<Full<Bytes>> {
    reply(
        "application/json; charset=UTF-8",
        Bytes::from_static(br#"{"success":true}"#),
    )
}

fn reply(content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = StatusCode::OK;
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
