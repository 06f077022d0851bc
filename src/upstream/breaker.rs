//! A circuit breaker in front of Graph. Closed: calls flow and consecutive failures are
//! counted; `breaker_failures` in a row open it. Open: calls fail fast (503) until
//! `breaker_cooldown` has passed. Half-open: exactly one call is let through as a probe;
//! its success closes the breaker, its failure opens it for another cool-down, and the other
//! calls keep failing fast meanwhile. A probe whose caller goes away without an outcome (the
//! client hung up) hands the probe to the next call.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<State>,
    metrics: Arc<Metrics>,
}

/// Leave to send one call; report its outcome with [`Permit::record`].
pub struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    recorded: bool,
}

impl Breaker {
    /// `threshold` 0 disables the breaker (every call is admitted).
    pub fn new(threshold: u32, cooldown: Duration, metrics: Arc<Metrics>) -> Breaker {
        metrics.upstream.breaker_state.set(0);
        Breaker {
            threshold,
            cooldown,
            state: Mutex::new(State::Closed { failures: 0 }),
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a plain value always left consistent; a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, st: &mut State, new: State) {
        let gauge = match new {
            State::Closed { .. } => 0,
            State::HalfOpen { .. } => 1,
            State::Open { .. } => 2,
        };
        if matches!(new, State::Open { .. }) && !matches!(*st, State::Open { .. }) {
            self.metrics.upstream.breaker_opened.inc();
        }
        *st = new;
        self.metrics.upstream.breaker_state.set(gauge);
    }

    /// Admits a call, or says how long until the breaker may let one through.
    pub fn admit(&self) -> Result<Permit<'_>, Duration> {
        if self.threshold == 0 {
            return Ok(self.permit(false));
        }
        let mut st = self.lock();
        match *st {
            State::Closed { .. } => Ok(self.permit(false)),
            State::Open { until } => {
                let now = Instant::now();
                if now < until {
                    return Err(until - now);
                }
                self.set(&mut st, State::HalfOpen { probing: true });
                Ok(self.permit(true))
            }
            State::HalfOpen { probing: false } => {
                self.set(&mut st, State::HalfOpen { probing: true });
                Ok(self.permit(true))
            }
            // Another call is probing; it decides soon (bounded by the upstream timeout).
            State::HalfOpen { probing: true } => Err(Duration::from_secs(1)),
        }
    }

    fn permit(&self, probe: bool) -> Permit<'_> {
        Permit {
            breaker: self,
            probe,
            recorded: false,
        }
    }

    fn on_outcome(&self, probe: bool, healthy: bool) {
        if self.threshold == 0 {
            return;
        }
        let mut st = self.lock();
        match (*st, healthy) {
            (State::Closed { .. }, true) => *st = State::Closed { failures: 0 },
            (State::Closed { failures }, false) => {
                let failures = failures + 1;
                if failures >= self.threshold {
                    tracing::warn!(
                        failures,
                        cooldown_ms = self.cooldown.as_millis() as u64,
                        "circuit breaker open: Graph keeps failing"
                    );
                    let until = Instant::now() + self.cooldown;
                    self.set(&mut st, State::Open { until });
                } else {
                    *st = State::Closed { failures };
                }
            }
            (State::HalfOpen { .. }, true) if probe => {
                tracing::info!("circuit breaker closed: the probe call succeeded");
                self.set(&mut st, State::Closed { failures: 0 });
            }
            (State::HalfOpen { .. }, false) if probe => {
                let until = Instant::now() + self.cooldown;
                self.set(&mut st, State::Open { until });
            }
            // Late outcomes of calls admitted before the breaker opened change nothing.
            _ => {}
        }
    }

    #[cfg(test)]
    fn is_open(&self) -> bool {
        matches!(*self.lock(), State::Open { .. })
    }
}

impl Permit<'_> {
    /// Reports whether Graph behaved (answered with something other than a server failure).
    pub fn record(mut self, healthy: bool) {
        self.recorded = true;
        self.breaker.on_outcome(self.probe, healthy);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe && !self.recorded {
            let mut st = self.breaker.lock();
            if *st == (State::HalfOpen { probing: true }) {
                self.breaker
                    .set(&mut st, State::HalfOpen { probing: false });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(cooldown_ms: u64) -> Breaker {
        Breaker::new(
            3,
            Duration::from_millis(cooldown_ms),
            Arc::new(Metrics::new()),
        )
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let b = breaker(10_000);
        b.admit().unwrap().record(false);
        b.admit().unwrap().record(false);
        b.admit().unwrap().record(true);
        b.admit().unwrap().record(false);
        b.admit().unwrap().record(false);
        assert!(!b.is_open());
        b.admit().unwrap().record(false);
        assert!(b.is_open());
        assert!(b.admit().is_err());
        assert_eq!(b.metrics.upstream.breaker_state.get(), 2);
    }

    #[test]
    fn half_open_lets_one_probe_through() {
        let b = breaker(1);
        for _ in 0..3 {
            b.admit().unwrap().record(false);
        }
        std::thread::sleep(Duration::from_millis(5));
        let probe = b.admit().expect("probe after cool-down");
        assert!(b.admit().is_err(), "only one probe at a time");
        probe.record(false);
        assert!(b.is_open());
        std::thread::sleep(Duration::from_millis(5));
        let probe = b.admit().unwrap();
        probe.record(true);
        assert_eq!(b.metrics.upstream.breaker_state.get(), 0);
        assert!(b.admit().is_ok());
    }

    #[test]
    fn an_abandoned_probe_hands_over() {
        let b = breaker(1);
        for _ in 0..3 {
            b.admit().unwrap().record(false);
        }
        std::thread::sleep(Duration::from_millis(5));
        drop(b.admit().unwrap());
        b.admit().expect("next call probes").record(true);
        assert!(!b.is_open());
    }

    #[test]
    fn zero_threshold_disables() {
        let b = Breaker::new(0, Duration::from_secs(1), Arc::new(Metrics::new()));
        for _ in 0..100 {
            b.admit().unwrap().record(false);
        }
        assert!(b.admit().is_ok());
    }
}
