//! Route: the Meta Webhooks endpoint (`[webhooks] path`) is answered here (handshake, signed
//! change notifications turned into purges); every other request passes on to the Graph
//! stages. Nothing from this route goes to Graph.

use std::task::{Context, Poll};

use bytes::Bytes;
use tower::Service;

use super::stage::{Stage, Staged};
use super::trace::Traced;
use super::GatewayHandle;
use crate::proxy::Answer;

#[derive(Clone)]
pub struct WebhookRoute<S> {
    inner: S,
    gateway: GatewayHandle,
}

impl<S> WebhookRoute<S> {
    /// This stage in front of `inner`.
    pub fn new(inner: S, gateway: GatewayHandle) -> WebhookRoute<S> {
        WebhookRoute { inner, gateway }
    }
}

impl<S, B> Service<Traced<B>> for WebhookRoute<S>
where
    S: Stage<Traced<B>>,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Answer;
    type Error = std::convert::Infallible;
    type Future = Staged;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, t: Traced<B>) -> Staged {
        if self.gateway.is_webhook(t.request.uri().path()) {
            Staged::later(self.gateway.owned().webhook(t.request))
        } else {
            self.inner.call(t)
        }
    }
}
