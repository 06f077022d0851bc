//! The Redis link of a scaled-out fleet: health and failed operations. Every label is a
//! fixed set chosen in code.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Registry};

use super::labels::RedisOp;
use super::{counter, counter_vec, gauge};

pub struct RedisMetrics {
    /// 1 while Redis answers, 0 while graphgate runs on local state only. Registered only
    /// once Redis is configured ([`Metrics::redis_in_use`]): an install without Redis must
    /// not show it as down.
    pub up: IntGauge,
    /// 1 when `[redis] url` is set, else 0; dashboards and alerts tell "down" from "not used"
    /// by it.
    pub configured: IntGauge,
    /// Failed Redis operations, by op (get, store, invalidate, publish, lease, admit, pause,
    /// refund, ping, subscribe, purge, observe, heartbeat).
    pub errors: IntCounterVec,
    /// Invalidations received from other replicas and applied to the local tier.
    pub invalidations_received: IntCounter,
}

impl RedisMetrics {
    /// Counts one Redis operation that failed or timed out.
    pub fn error(&self, op: RedisOp) {
        self.errors.with_label_values(&[op.as_str()]).inc();
    }

    pub(super) fn new(r: &Registry) -> RedisMetrics {
        RedisMetrics {
            up: IntGauge::new(
                "graphgate_redis_up",
                "1 while Redis answers; 0 while running on local state (L1 only, local budgets). Exported only when Redis is configured.",
            )
            .expect("metric definition is valid"),
            configured: gauge(
                r,
                "graphgate_redis_configured",
                "1 when Redis is configured ([redis] url), else 0.",
            ),
            errors: counter_vec(
                r,
                "graphgate_redis_errors_total",
                "Redis operations that failed or timed out, by operation.",
                &["op"],
            ),
            invalidations_received: counter(
                r,
                "graphgate_redis_invalidations_received_total",
                "Invalidation messages from other replicas applied to the local cache tier.",
            ),
        }
    }
}
