//! Stage: authenticate and authorize. The client key is looked up (query, header or body,
//! never more than one); everything the call asks Graph to do (method, node, ids, fields,
//! batch operations) must be allowed to that client, else 401/403 and nothing goes further.
//! The call's quota hints are bound to the client (its priority, its Pages).

use std::task::{Context, Poll};

use tower::Service;

use super::stage::{Stage, Staged};
use super::GatewayHandle;
use crate::proxy::{Admitted, Answer, Parsed};

#[derive(Clone)]
pub struct Admit<S> {
    inner: S,
    gateway: GatewayHandle,
}

impl<S> Admit<S> {
    /// This stage in front of `inner`.
    pub fn new(inner: S, gateway: GatewayHandle) -> Admit<S> {
        Admit { inner, gateway }
    }
}

impl<S: Stage<Admitted>> Service<Parsed> for Admit<S> {
    type Response = Answer;
    type Error = std::convert::Infallible;
    type Future = Staged;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, parsed: Parsed) -> Staged {
        match self.gateway.admit_client(parsed) {
            Ok(admitted) => self.inner.call(admitted),
            Err(refused) => Staged::now(refused),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http::StatusCode;
    use tower::ServiceExt;

    use super::*;
    use crate::stack::testing::{gateway, parsed, passed_on, recorder, READ};

    #[tokio::test]
    async fn admission_refuses_unknown_keys_other_pages_and_token_fields() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let admit = Admit::new(
            recorder(seen.clone(), |a: &Admitted| {
                (a.client.name.clone(), a.key.clone())
            }),
            gateway(),
        );
        let answer = admit.clone().oneshot(parsed(READ)).await.unwrap();
        assert!(passed_on(&answer));
        assert_eq!(
            seen.lock().unwrap()[0],
            ("reader".to_string(), "reader-key".to_string())
        );
        for (path, status) in [
            ("/v21.0/1001?fields=id", StatusCode::UNAUTHORIZED),
            ("/v21.0/1001?access_token=nope", StatusCode::UNAUTHORIZED),
            ("/v21.0/1002?access_token=reader-key", StatusCode::FORBIDDEN),
            (
                "/v21.0/1001?fields=name.as(x),access_token&access_token=reader-key",
                StatusCode::FORBIDDEN,
            ),
            (
                "/v21.0/1001?fields=id,name(&access_token=reader-key",
                StatusCode::BAD_REQUEST,
            ),
        ] {
            let answer = admit.clone().oneshot(parsed(path)).await.unwrap();
            let refused = answer.reply.expect_err(path);
            assert_eq!(refused.status(), status, "{path}");
            // A refusal after authentication names the client in the record.
            assert_eq!(
                answer.record.client.is_some(),
                status != StatusCode::UNAUTHORIZED,
                "{path}"
            );
        }
        assert_eq!(
            seen.lock().unwrap().len(),
            1,
            "only the good request passed on"
        );
    }
}
