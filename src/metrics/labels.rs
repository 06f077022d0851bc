//! Bounded label values as types: code outside this module tree names a variant, never a
//! string, so a label value is spelled once and every value is known (for series created at
//! 0 and for per-series arrays indexed by variant).

/// Defines a bounded label as an enum: its variants, their label values, and `ALL` in
/// declaration order (the variant's index into per-series arrays is `self as usize`).
macro_rules! label_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $value:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The label value.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $value,)+
                }
            }
        }
    };
}

label_enum! {
    /// The route class of a request (`route` label); `Invalid` when it did not parse.
    Route {
        Node => "node",
        Edge => "edge",
        Ids => "ids",
        Batch => "batch",
        Root => "root",
        Invalid => "invalid",
        /// The Meta Webhooks endpoint.
        Webhook => "webhook",
    }
}

label_enum! {
    /// What became of a request to the Meta Webhooks endpoint
    /// (`graphgate_webhook_notifications_total{outcome}`).
    WebhookOutcome {
        /// A handshake with the right verify token, answered with its challenge.
        Verified => "verified",
        /// A handshake with a wrong token or mode, or without a usable challenge.
        HandshakeRefused => "handshake_refused",
        /// A delivery without a valid signature.
        BadSignature => "bad_signature",
        /// A signed delivery whose entries are older (or further ahead) than `max_age_s`.
        Stale => "stale",
        /// A signed delivery seen before within `max_age_s`: acknowledged, nothing purged.
        Replayed => "replayed",
        /// A signed delivery that is not a notification graphgate can read.
        Malformed => "malformed",
        /// A signed delivery for an object other than a Page: acknowledged, nothing purged.
        Ignored => "ignored",
        /// A signed delivery whose nodes were purged.
        Purged => "purged",
    }
}

label_enum! {
    /// The method class of a request (`method` label); HEAD counts as GET.
    RequestMethod {
        Get => "GET",
        Post => "POST",
        Delete => "DELETE",
        Other => "OTHER",
    }
}

impl RequestMethod {
    pub fn of(method: &http::Method) -> RequestMethod {
        match *method {
            http::Method::GET | http::Method::HEAD => RequestMethod::Get,
            http::Method::POST => RequestMethod::Post,
            http::Method::DELETE => RequestMethod::Delete,
            _ => RequestMethod::Other,
        }
    }
}

label_enum! {
    /// What the cache did: the `result` of a cache lookup and the `cache` label of a request
    /// (`none` there for a request the cache never saw, see [`cache_label`]).
    CacheResult {
        Hit => "hit",
        Miss => "miss",
        Stale => "stale",
        Bypass => "bypass",
    }
}

/// The `cache` label of a request: its cache result, `none` for one answered before the
/// cache (an error).
pub fn cache_label(result: Option<CacheResult>) -> &'static str {
    result.map_or("none", CacheResult::as_str)
}

label_enum! {
    /// A cache tier (`tier` label): in-process L1, shared L2 (Redis).
    CacheTier {
        L1 => "l1",
        L2 => "l2",
    }
}

label_enum! {
    /// Why graphgate answered with its own error (`graphgate_rejections_total{reason}`).
    Rejection {
        Unauthorized => "unauthorized",
        Forbidden => "forbidden",
        BadRequest => "bad_request",
        TooLarge => "too_large",
        BodyTimeout => "body_timeout",
        UpstreamConnect => "upstream_connect",
        UpstreamTimeout => "upstream_timeout",
        UpstreamBadResponse => "upstream_bad_response",
        UpstreamTooLarge => "upstream_too_large",
        BreakerOpen => "breaker_open",
        Overloaded => "overloaded",
        Throttled => "throttled",
        ShuttingDown => "shutting_down",
        Internal => "internal",
    }
}

label_enum! {
    /// Why an entry left a cache tier (`graphgate_cache_evictions_total{cause}`).
    Eviction {
        Size => "size",
        Expired => "expired",
        Explicit => "explicit",
        Replaced => "replaced",
    }
}

label_enum! {
    /// Why entries were dropped on purpose (`graphgate_cache_invalidations_total{reason}`):
    /// a successful write to their node, or an admin purge.
    InvalidationReason {
        Write => "write",
        Purge => "purge",
    }
}

label_enum! {
    /// Why a stale entry was served (`graphgate_cache_stale_served_total{reason}`):
    /// stale-while-revalidate, or stale-if-error.
    StaleReason {
        Revalidate => "revalidate",
        Error => "error",
    }
}

label_enum! {
    /// How a miss that found another replica filling the key ended
    /// (`graphgate_cache_lease_waits_total{outcome}`).
    LeaseWait {
        Filled => "filled",
        TookOver => "took_over",
        GaveUp => "gave_up",
    }
}

label_enum! {
    /// A listener (`listener` label): the public one, or the admin one.
    Listener {
        Public => "public",
        Admin => "admin",
    }
}

label_enum! {
    /// How a configuration reload ended (`graphgate_config_reloads_total{result}`).
    ConfigReload {
        Ok => "ok",
        Rejected => "rejected",
    }
}

label_enum! {
    /// A Redis operation (`graphgate_redis_errors_total{op}`).
    RedisOp {
        Get => "get",
        Store => "store",
        Invalidate => "invalidate",
        Publish => "publish",
        Lease => "lease",
        Admit => "admit",
        Pause => "pause",
        Refund => "refund",
        Ping => "ping",
        Subscribe => "subscribe",
        Purge => "purge",
        Observe => "observe",
        Heartbeat => "heartbeat",
        /// A replica's status record for the fleet-wide admin views.
        Status => "status",
        /// A read-only look at a shared Page budget (the fleet-wide admin view).
        Peek => "peek",
    }
}

label_enum! {
    /// Why a retry that was due was not made (`graphgate_upstream_retries_skipped_total`):
    /// the retry budget was spent, the deadline was near, or the breaker opened.
    RetrySkip {
        Budget => "budget",
        Deadline => "deadline",
        Breaker => "breaker",
    }
}

label_enum! {
    /// How a call's wait at the quota scheduler ended (`graphgate_quota_queue_wait_seconds`).
    QueueWait {
        Admitted => "admitted",
        Rejected => "rejected",
    }
}

label_enum! {
    /// Why the quota scheduler refused a call (`graphgate_quota_rejections_total{reason}`).
    QuotaRejection {
        QueueTimeout => "queue_timeout",
        QueueFull => "queue_full",
    }
}

label_enum! {
    /// Where a quota admission was decided
    /// (`graphgate_quota_admission_decisions_total{source}`): by the fleet's shared state in
    /// Redis, or locally.
    AdmissionSource {
        Redis => "redis",
        Local => "local",
    }
}

label_enum! {
    /// How Graph answered a call (`graphgate_upstream_requests_total{outcome}`): success, or
    /// the class of its error.
    GraphAnswer {
        Ok => "ok",
        Throttled => "throttled",
        AuthError => "auth_error",
        TransientError => "transient_error",
        GraphError => "graph_error",
        Http4xx => "http_4xx",
        Http5xx => "http_5xx",
    }
}

/// How a call to Graph ended (`graphgate_upstream_requests_total{outcome}`): Graph's answer,
/// or why there was none (labelled like the rejection it becomes, e.g. `upstream_timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamOutcome {
    Answered(GraphAnswer),
    Failed(Rejection),
}

impl UpstreamOutcome {
    /// The ways a call fails without an answer: its series exist from the start.
    pub const FAILURES: &'static [Rejection] = &[
        Rejection::UpstreamTimeout,
        Rejection::UpstreamConnect,
        Rejection::UpstreamBadResponse,
        Rejection::UpstreamTooLarge,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamOutcome::Answered(a) => a.as_str(),
            UpstreamOutcome::Failed(r) => r.as_str(),
        }
    }
}
