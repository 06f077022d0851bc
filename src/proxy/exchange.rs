//! What the stages of the public stack (`crate::stack`) hand each other: a request that got
//! further ([`Parsed`], then [`Admitted`]), and what came of it ([`Answer`]: the reply or the
//! error it becomes, with the request's [`Record`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body_util::Full;

use super::Call;
use crate::auth::Client;
use crate::error::ProxyError;
use crate::metrics::{CacheResult, Route};

/// A request after the parse stage: its head (the cache stage reads its conditional and
/// cache-control headers) and the parsed call.
pub struct Parsed {
    pub parts: http::request::Parts,
    pub call: Call,
    pub route: Route,
}

/// A request after authentication and authorization: who sent it, with which key.
pub struct Admitted {
    pub parts: http::request::Parts,
    pub call: Call,
    pub route: Route,
    pub client: Arc<Client>,
    /// The client key presented; paging links in the reply carry it.
    pub key: String,
}

/// What came of a request: the reply, or the error that becomes its Graph-style reply, and
/// the record the request metric and the access log line are written from. Every stage
/// answers with one, whether it served, refused or passed the request on.
pub struct Answer {
    pub reply: Result<Response<Full<Bytes>>, ProxyError>,
    pub record: Record,
}

/// The one record of a request: what the stages learned about it on the way (its route,
/// client, cache result, upstream time, Page, node, quota wait), as far as it got.
pub struct Record {
    pub route: Route,
    /// `None` before authentication (or when it failed).
    pub client: Option<Arc<Client>>,
    /// `None` when the cache never saw the request (an error, a webhook).
    pub cache: Option<CacheResult>,
    /// Time spent on the upstream call (or the fill it joined).
    pub upstream_ms: Option<u64>,
    /// The Page charged upstream, else the Page the call names (logs only).
    pub page: Option<String>,
    /// The node of the call's path (logs only).
    pub node: Option<String>,
    /// Time waited for quota budget (logs only).
    pub queue_wait: Option<Duration>,
}

impl Record {
    /// What is known of a request on `route` before anything but its client.
    pub fn of(route: Route, client: Option<Arc<Client>>) -> Record {
        Record {
            route,
            client,
            cache: None,
            upstream_ms: None,
            page: None,
            node: None,
            queue_wait: None,
        }
    }
}

impl Answer {
    /// A request refused (or failed) on `route`, with its client once known.
    pub fn refused(e: ProxyError, route: Route, client: Option<Arc<Client>>) -> Answer {
        Answer {
            reply: Err(e),
            record: Record::of(route, client),
        }
    }

    /// A reply that no cache or client took part in (the webhooks endpoint).
    pub fn plain(response: Response<Full<Bytes>>, route: Route) -> Answer {
        Answer {
            reply: Ok(response),
            record: Record::of(route, None),
        }
    }
}

impl Admitted {
    /// The answer for an admitted request that failed with `e`.
    pub fn reject(&self, e: ProxyError) -> Answer {
        Answer::refused(e, self.route, Some(self.client.clone()))
    }

    /// The answer for an admitted request that got `response`, with its whole record.
    pub fn answer(
        self,
        response: Response<Full<Bytes>>,
        cache: CacheResult,
        upstream_ms: Option<u128>,
    ) -> Answer {
        Answer {
            reply: Ok(response),
            record: Record {
                route: self.route,
                client: Some(self.client),
                cache: Some(cache),
                upstream_ms: upstream_ms.map(|ms| u64::try_from(ms).unwrap_or(u64::MAX)),
                page: super::log_page(&self.call),
                node: super::log_node(&self.call),
                queue_wait: self.call.stats.queue_wait(),
            },
        }
    }
}
