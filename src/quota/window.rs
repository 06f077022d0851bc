//! The sliding-window count of calls this steward dispatched to one bucket: a ring of
//! sub-buckets.
//!
//! Meta counts a Page's calls over a rolling window (24 h for Pages), so the count must stay
//! cheap for any window length: the window is cut into [`SLOTS`] sub-buckets and only the
//! non-empty ones are kept, oldest first. Recording and expiring are O(1) amortized; memory
//! is at most `SLOTS + 1` pairs per bucket and nothing for a bucket that sent nothing lately.
//!
//! A sub-bucket's calls are treated as leaving the window at the *end* of the sub-bucket
//! plus the window plus a margin for the trip to Meta (Meta counts a call when it arrives,
//! which can be up to a round trip after we sent it): the latest any of them can leave, so
//! the count is never low. The price is at most one sub-bucket (1/128 of the window) plus
//! the round trip of lateness when a slot is released.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Sub-buckets per window.
pub const SLOTS: u32 = 128;

#[derive(Debug, Clone)]
pub struct Window {
    window: Duration,
    slot: Duration,
    /// Added to every release: the longest recent trip to Meta.
    margin: Duration,
    origin: Instant,
    /// (sub-bucket index, calls), ascending index, no zero counts.
    slots: VecDeque<(u64, u32)>,
    total: u32,
}

impl Window {
    pub fn new(window: Duration, origin: Instant) -> Window {
        let window = window.max(Duration::from_millis(1));
        Window {
            window,
            slot: (window / SLOTS).max(Duration::from_micros(1)),
            margin: Duration::ZERO,
            origin,
            slots: VecDeque::new(),
            total: 0,
        }
    }

    pub fn length(&self) -> Duration {
        self.window
    }

    /// Length of one sub-bucket.
    pub fn slot(&self) -> Duration {
        self.slot
    }

    /// How much later than our dispatch Meta may count a call (a recent round trip).
    pub fn set_margin(&mut self, margin: Duration) {
        self.margin = margin.min(self.window);
    }

    pub fn margin(&self) -> Duration {
        self.margin
    }

    fn index(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(since / self.slot.as_nanos().max(1)).unwrap_or(u64::MAX)
    }

    /// When sub-bucket `index` starts.
    fn starts_at(&self, index: u64) -> Instant {
        let start = self
            .slot
            .checked_mul(u32::try_from(index).unwrap_or(u32::MAX))
            .unwrap_or(Duration::MAX / 4);
        self.origin + start
    }

    /// When the calls of sub-bucket `index` stop counting.
    fn leaves_at(&self, index: u64) -> Instant {
        self.starts_at(index) + self.slot + self.window + self.margin
    }

    /// Forgets the sub-buckets that have left the window by `now`.
    pub fn expire(&mut self, now: Instant) {
        while let Some(&(index, calls)) = self.slots.front() {
            if self.leaves_at(index) > now {
                break;
            }
            self.slots.pop_front();
            self.total = self.total.saturating_sub(calls);
        }
    }

    /// Calls in the window at `now`.
    pub fn count(&mut self, now: Instant) -> u32 {
        self.expire(now);
        self.total
    }

    /// The count without expiring first (may include calls that already left).
    pub fn total(&self) -> u32 {
        self.total
    }

    /// Counts `units` calls dispatched at `at`; returns the count including them.
    pub fn record(&mut self, units: u32, at: Instant) -> u32 {
        self.expire(at);
        let index = self.index(at);
        match self.slots.back_mut() {
            Some((last, calls)) if *last == index => *calls = calls.saturating_add(units),
            // A late `at` (before the newest sub-bucket) goes into the newest one: counted
            // a little longer, never shorter.
            Some((last, calls)) if *last > index => *calls = calls.saturating_add(units),
            _ => self.slots.push_back((index, units)),
        }
        self.total = self.total.saturating_add(units);
        self.total
    }

    /// Takes back `units` recorded at `at` for a call that never went out.
    pub fn unrecord(&mut self, units: u32, at: Instant) {
        let index = self.index(at);
        // Its own sub-bucket, or the newer one a late record was merged into.
        if let Some((_, calls)) = self.slots.iter_mut().find(|(i, _)| *i >= index) {
            let back = units.min(*calls);
            *calls -= back;
            self.total = self.total.saturating_sub(back);
        }
        self.slots.retain(|(_, c)| *c > 0);
    }

    /// Calls Meta surely still counts when a call sent at `at` reaches it (up to the margin
    /// later): all but those sent more than a window before that.
    pub fn surely_counted(&self, at: Instant) -> u32 {
        let gone: u32 = self
            .slots
            .iter()
            .take_while(|&&(i, _)| self.starts_at(i) + self.window <= at + self.margin)
            .map(|&(_, c)| c)
            .sum();
        self.total.saturating_sub(gone)
    }

    /// When the oldest counted calls leave the window.
    pub fn next_release(&self) -> Option<Instant> {
        self.slots.front().map(|&(i, _)| self.leaves_at(i))
    }

    /// (time, calls leaving then), oldest first.
    pub fn releases(&self) -> impl Iterator<Item = (Instant, u32)> + '_ {
        self.slots.iter().map(|&(i, c)| (self.leaves_at(i), c))
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_calls_for_exactly_one_window_and_never_less() {
        let t0 = Instant::now();
        let w = Duration::from_secs(128);
        let mut win = Window::new(w, t0);
        assert_eq!(win.slot(), Duration::from_secs(1));
        win.record(1, t0 + Duration::from_millis(500));
        win.record(2, t0 + Duration::from_millis(900));
        win.record(1, t0 + Duration::from_millis(1500));
        assert_eq!(win.count(t0 + Duration::from_secs(2)), 4);
        // Sub-bucket 0 ends at 1 s: its calls leave at 1 s + the window, not before.
        assert_eq!(win.count(t0 + w + Duration::from_millis(999)), 4);
        assert_eq!(win.count(t0 + w + Duration::from_secs(1)), 1);
        assert_eq!(win.count(t0 + w + Duration::from_secs(2)), 0);
        assert!(win.is_empty());
    }

    #[test]
    fn releases_are_oldest_first_and_memory_stays_bounded() {
        let t0 = Instant::now();
        let w = Duration::from_secs(24 * 3600);
        let mut win = Window::new(w, t0);
        // A call every 10 s for two days: never more than SLOTS + 1 sub-buckets held.
        let mut now = t0;
        for _ in 0..(2 * 24 * 360) {
            win.record(1, now);
            assert!(win.slots.len() <= SLOTS as usize + 1);
            now += Duration::from_secs(10);
        }
        let times: Vec<Instant> = win.releases().map(|(t, _)| t).collect();
        assert!(times.windows(2).all(|p| p[0] < p[1]));
        // About one window's worth of calls (8640), within one sub-bucket.
        let n = win.count(now);
        assert!((8640..=8640 + 68).contains(&n), "{n}");
    }

    #[test]
    fn unrecord_gives_back_a_call_that_never_went_out() {
        let t0 = Instant::now();
        let mut win = Window::new(Duration::from_secs(10), t0);
        let at = t0 + Duration::from_millis(100);
        assert_eq!(win.record(3, at), 3);
        win.unrecord(2, at);
        assert_eq!(win.count(at), 1);
        win.unrecord(5, at);
        assert_eq!(win.count(at), 0);
        assert!(win.next_release().is_none());
    }
}
