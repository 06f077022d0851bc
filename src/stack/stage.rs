//! The future every stage below the respond layer returns: answered now, or later.
//!
//! One non-generic type for all of them, so stages compose without nesting futures: a stage
//! that passes the request on returns its inner stage's `Staged` as it is. A hit is
//! `Now` all the way up (no allocation); only what has to wait (a body, a miss, an upstream
//! call) is boxed, once.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::proxy::Answer;

/// What a stage service returns: see the module docs. `Now` is the hit path: boxing it
/// would allocate on every hit.
#[allow(clippy::large_enum_variant)]
pub enum Staged {
    /// Answered without waiting; taken when first polled.
    Now(Option<Answer>),
    /// The rest of the request, which waits for something.
    Later(Pin<Box<dyn Future<Output = Answer> + Send>>),
}

impl Staged {
    pub fn now(answer: Answer) -> Staged {
        Staged::Now(Some(answer))
    }

    pub fn later(rest: impl Future<Output = Answer> + Send + 'static) -> Staged {
        Staged::Later(Box::pin(rest))
    }

    /// The answer, if it is there without waiting (the respond layer finishes such a
    /// request in place).
    pub fn take_now(&mut self) -> Option<Answer> {
        match self {
            Staged::Now(answer) => answer.take(),
            Staged::Later(_) => None,
        }
    }
}

impl Future for Staged {
    type Output = Result<Answer, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Staged::Now(answer) => match answer.take() {
                Some(a) => Poll::Ready(Ok(a)),
                // Polled again after it answered: a caller bug, not a request's fault.
                None => Poll::Pending,
            },
            Staged::Later(rest) => rest.as_mut().poll(cx).map(Ok),
        }
    }
}

/// A stage that answers or passes the request on: the bound every stage's inner service
/// meets.
pub trait Stage<R>:
    tower::Service<R, Response = Answer, Error = Infallible, Future = Staged> + Clone + Send + 'static
{
}

impl<R, S> Stage<R> for S where
    S: tower::Service<R, Response = Answer, Error = Infallible, Future = Staged>
        + Clone
        + Send
        + 'static
{
}
