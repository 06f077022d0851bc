//! The innermost stage: the call goes to Graph. The gateway chooses the token (system user
//! or Page) and the appsecret_proof, admits every attempt through the per-Page quota
//! scheduler (waiting within the deadline, or 429), sends it with retries and the circuit
//! breaker, learns from the usage headers, makes cached reads of a written node stale, and
//! prepares the body for this client (paging links, scrubbing). Always waits: boxed.

use std::task::{Context, Poll};

use tower::Service;

use super::stage::Staged;
use super::GatewayHandle;
use crate::proxy::{Admitted, Answer};

#[derive(Clone)]
pub struct Upstream {
    gateway: GatewayHandle,
}

impl Upstream {
    pub fn new(gateway: GatewayHandle) -> Upstream {
        Upstream { gateway }
    }
}

impl Service<Admitted> for Upstream {
    type Response = Answer;
    type Error = std::convert::Infallible;
    type Future = Staged;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, a: Admitted) -> Staged {
        Staged::later(self.gateway.owned().upstream(a))
    }
}

#[cfg(test)]
mod tests {
    use http::StatusCode;
    use tower::ServiceExt;

    use super::*;
    use crate::stack::testing::{admitted, gateway, READ};

    #[tokio::test]
    async fn an_upstream_that_is_not_there_is_a_graph_style_502() {
        let gw = gateway();
        let answer = Upstream::new(gw.clone())
            .oneshot(admitted(&gw, READ, &[]))
            .await
            .unwrap();
        assert_eq!(answer.reply.unwrap_err().status(), StatusCode::BAD_GATEWAY);
        assert!(answer.record.client.is_some());
    }
}
