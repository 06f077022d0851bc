//! The retry budget, after Envoy's and Finagle's: every request deposits
//! `budget_percent / 100` of a retry, and a floor of `budget_min_per_s` retries per second
//! accrues with time; a retry spends one. So when Graph fails across the board, retries add
//! at most `budget_percent` % (plus the floor) to the load instead of multiplying it. The
//! balance is capped, which bounds a burst after a quiet period.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct RetryBudget {
    per_request: f64,
    per_second: f64,
    cap: f64,
    state: Mutex<Balance>,
}

struct Balance {
    tokens: f64,
    refilled: Instant,
}

impl RetryBudget {
    pub fn new(percent: u32, min_per_s: u32) -> RetryBudget {
        let per_second = f64::from(min_per_s);
        // Ten seconds of the floor, and never less than 10 retries in reserve.
        let cap = (per_second * 10.0).max(10.0);
        RetryBudget {
            per_request: f64::from(percent) / 100.0,
            per_second,
            cap,
            state: Mutex::new(Balance {
                tokens: per_second.min(cap),
                refilled: Instant::now(),
            }),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Balance) -> T) -> T {
        let mut b = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let elapsed = now.duration_since(b.refilled).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.per_second).min(self.cap);
        b.refilled = now;
        f(&mut b)
    }

    /// Called once per request (not per attempt).
    pub fn deposit(&self) {
        let (add, cap) = (self.per_request, self.cap);
        self.with(|b| b.tokens = (b.tokens + add).min(cap));
    }

    /// Takes one retry from the budget, if there is one.
    pub fn try_withdraw(&self) -> bool {
        self.with(|b| {
            if b.tokens >= 1.0 {
                b.tokens -= 1.0;
                true
            } else {
                false
            }
        })
    }
}

/// Full jitter: uniform in `[0, base * 2^attempt)`, the exponent capped at 2^6.
pub fn backoff(base: Duration, attempt: u32) -> Duration {
    let ceiling = base.saturating_mul(1 << attempt.min(6));
    let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    if ms == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(fastrand::u64(0..ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_a_share_of_requests() {
        // No floor: only deposits pay for retries.
        let b = RetryBudget::new(20, 0);
        let mut retried = 0;
        for _ in 0..1000 {
            b.deposit();
            if b.try_withdraw() {
                retried += 1;
            }
        }
        assert!((195..=200).contains(&retried), "{retried}");
    }

    #[test]
    fn the_floor_allows_a_few_without_traffic() {
        let b = RetryBudget::new(0, 3);
        let granted = (0..10).filter(|_| b.try_withdraw()).count();
        assert_eq!(granted, 3);
    }

    #[test]
    fn backoff_is_bounded() {
        for attempt in 0..20 {
            assert!(backoff(Duration::from_millis(50), attempt) < Duration::from_millis(50 * 64));
        }
        assert_eq!(backoff(Duration::ZERO, 3), Duration::ZERO);
    }
}
