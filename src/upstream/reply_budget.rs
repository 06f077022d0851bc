//! The memory budget of reply bodies (`upstream.max_buffered_reply_bytes`).
//!
//! graphgate buffers every reply whole (to check it, scrub it and rewrite its paging links),
//! so without a bound, many concurrent large replies (or clients reading them slowly) hold
//! that many bodies in memory at once. Each body in flight takes a [`Reservation`] of its
//! size from one [`ReplyBudget`]: an upstream reply as its bytes arrive (its declared length
//! up front), a cached body decompressed or copied for one client. A reply that does not fit
//! is refused (503) instead of buffered. A reservation is given back when dropped, and
//! [`held`] ties it to the response bytes handed to hyper, so it lasts until those bytes
//! have been written to the client (or the client is gone), however slowly that happens.
//!
//! Bodies stored in the cache are not counted here: the cache has its own bound.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use crate::metrics::Metrics;

/// Bytes of reply bodies held now, against the configured maximum. Cloning shares it.
#[derive(Clone)]
pub struct ReplyBudget(Arc<Inner>);

struct Inner {
    max: usize,
    used: AtomicUsize,
    metrics: Arc<Metrics>,
}

/// Some bytes of a [`ReplyBudget`], given back when dropped.
pub struct Reservation {
    budget: Arc<Inner>,
    bytes: usize,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reservation({} bytes)", self.bytes)
    }
}

/// A reply source, for `graphgate_reply_budget_rejections_total{source}`.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    /// A reply from Graph.
    Upstream,
    /// A cached body decompressed or copied for one client.
    Cache,
}

impl ReplyBudget {
    pub fn new(max: usize, metrics: Arc<Metrics>) -> ReplyBudget {
        ReplyBudget(Arc::new(Inner {
            max,
            used: AtomicUsize::new(0),
            metrics,
        }))
    }

    /// Reserves `bytes`, or `None` (counted as a rejection from `source`) when they do not
    /// fit.
    pub fn reserve(&self, bytes: usize, source: Source) -> Option<Reservation> {
        let mut r = Reservation {
            budget: self.0.clone(),
            bytes: 0,
        };
        r.grow_to(bytes, source).then_some(r)
    }

    /// Bytes reserved now.
    pub fn used(&self) -> usize {
        self.0.used.load(Ordering::Acquire)
    }
}

impl Inner {
    fn take(&self, bytes: usize) -> bool {
        let taken = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.max)
            })
            .is_ok();
        if taken {
            self.metrics
                .upstream
                .buffered_reply_bytes
                .add(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        taken
    }

    fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
        self.metrics
            .upstream
            .buffered_reply_bytes
            .sub(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
}

impl Reservation {
    /// Extends the reservation to `total` bytes; false (counted as a rejection from
    /// `source`, the reservation unchanged) when that does not fit.
    pub fn grow_to(&mut self, total: usize, source: Source) -> bool {
        let more = total.saturating_sub(self.bytes);
        if more == 0 {
            return true;
        }
        if !self.budget.take(more) {
            let label = match source {
                Source::Upstream => "upstream",
                Source::Cache => "cache",
            };
            self.budget
                .metrics
                .upstream
                .reply_budget_rejections
                .with_label_values(&[label])
                .inc();
            return false;
        }
        self.bytes = total;
        true
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.give_back(self.bytes);
        }
    }
}

/// `body` holding `reservations` until the last copy of it is dropped: hyper queues the
/// bytes it writes, so the reservation must live in the bytes, not in the response (which
/// hyper drops as soon as it has taken the body). No copy of the body is made.
pub fn held(body: Bytes, reservations: Vec<Arc<Reservation>>) -> Bytes {
    if reservations.is_empty() || body.is_empty() {
        return body;
    }
    Bytes::from_owner(Held {
        body,
        _reservations: reservations,
    })
}

struct Held {
    body: Bytes,
    _reservations: Vec<Arc<Reservation>>,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(max: usize) -> (ReplyBudget, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        (ReplyBudget::new(max, metrics.clone()), metrics)
    }

    #[test]
    fn reservations_stay_within_the_budget_and_are_given_back_on_drop() {
        let (b, m) = budget(100);
        let a = b.reserve(60, Source::Upstream).expect("fits");
        assert!(b.reserve(41, Source::Upstream).is_none());
        let mut c = b.reserve(10, Source::Cache).expect("fits");
        assert!(c.grow_to(40, Source::Cache));
        assert!(!c.grow_to(41, Source::Cache), "100 would be exceeded");
        assert_eq!(c.bytes(), 40);
        assert_eq!(b.used(), 100);
        assert_eq!(m.upstream.buffered_reply_bytes.get(), 100);
        drop(a);
        assert_eq!(b.used(), 40);
        drop(c);
        assert_eq!(b.used(), 0);
        assert_eq!(m.upstream.buffered_reply_bytes.get(), 0);
        let rejected = |s: &str| {
            m.upstream
                .reply_budget_rejections
                .with_label_values(&[s])
                .get()
        };
        assert_eq!((rejected("upstream"), rejected("cache")), (1, 1));
    }

    #[test]
    fn held_bytes_keep_their_reservation_until_the_last_copy_is_dropped() {
        let (b, _) = budget(1000);
        let r = Arc::new(b.reserve(500, Source::Upstream).expect("fits"));
        let body = held(Bytes::from(vec![7u8; 500]), vec![r]);
        let copy = body.slice(10..20);
        drop(body);
        assert_eq!(b.used(), 500, "a slice still holds the buffer");
        assert_eq!(&copy[..], &[7u8; 10]);
        drop(copy);
        assert_eq!(b.used(), 0);
    }
}
